//! The error type of the reach runtime.

use std::net::SocketAddr;
use std::path::PathBuf;

use reach_proto::PeerId;
use reach_proto::wire::WireError;

/// Everything that can go wrong in the reach runtime. Each variant has a
/// stable machine-readable [`Error::kind`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("cannot bind UDP socket on {addr}: {source}{hint}", hint = bind_hint(source))]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("identity key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    #[error("{context} ({path}): {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("expected peer {expected} but {addr} presented {actual}")]
    PeerIdMismatch {
        expected: PeerId,
        actual: PeerId,
        addr: SocketAddr,
    },
    #[error("could not connect to {peer}: {reason}")]
    Connect { peer: PeerId, reason: String },
    /// This node requires post-quantum key exchange (`pq = "require"`) and
    /// the peer offers none (it runs with `pq = "off"` or an older reach).
    #[error(
        "{peer} at {addr} cannot do post-quantum key exchange (X25519MLKEM768), which this node requires (pq = \"require\")"
    )]
    PostQuantumRequired { peer: PeerId, addr: SocketAddr },
    #[error("no known address for {0}; pass addresses to connect() first")]
    NoAddress(PeerId),
    #[error("connection to {peer} lost: {reason}")]
    ConnectionLost { peer: PeerId, reason: String },
    #[error("message of {size} bytes exceeds the limit of {max} bytes")]
    MessageTooLarge { size: usize, max: usize },
    #[error("peer {peer} refused the message (code {code})")]
    Refused { peer: PeerId, code: u64 },
    #[error("protocol violation: {0}")]
    Wire(#[from] WireError),
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("the node has shut down")]
    Shutdown,
    #[error("invalid protocol name {name:?}: {reason}")]
    InvalidProtocolName {
        name: String,
        reason: reach_proto::wire::envelope::ProtocolNameError,
    },
    #[error("protocol {protocol:?} is already registered on this node")]
    ProtocolInUse { protocol: String },
    #[error("peer {peer} does not serve protocol {protocol:?}")]
    ProtocolNotSupported { peer: PeerId, protocol: String },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("storage {path}: {reason}")]
    Storage { path: PathBuf, reason: String },
    #[error("could not resolve {0}: no endpoint record found in the DHT")]
    NotFound(PeerId),
    #[error("DHT request to {peer} failed: {reason}")]
    Rpc { peer: PeerId, reason: String },
    #[error("relay request failed: {reason}")]
    Relay { reason: String },
    #[error("relay {relay} refused: {reason}")]
    RelayRefused { relay: PeerId, reason: String },
    #[error(
        "data dir {dir} is in use by another reach node ({holder}); stop that node first, or use another data dir",
        holder = match pid { Some(p) => format!("pid {p}"), None => "pid not known yet".to_string() }
    )]
    DataDirLocked { dir: PathBuf, pid: Option<u32> },
    #[error(
        "identity key file {path} is {what} (an interrupted first start?): delete it to create a new identity, or restore it from a backup",
        what = if *len == 0 { "empty".to_string() } else { format!("incomplete ({len} bytes)") }
    )]
    KeyFileIncomplete { path: PathBuf, len: u64 },
    /// A durable message would break an outbox quota (`scope` is
    /// "destination", "total", or "senders" on the receiving side).
    #[error("the outbox is full: {scope} quota of {limit} reached")]
    OutboxFull { scope: &'static str, limit: String },
    /// The outbox file cannot be read as a database (damaged beyond the
    /// per-entry quarantine); it is kept as it is, never replaced.
    #[error("outbox {path} is corrupt: {reason}")]
    OutboxCorrupt { path: PathBuf, reason: String },
    /// The outbox file was written under another identity's key.
    #[error(
        "outbox {path} belongs to another identity (its key check does not open with this node's key): restore the identity key, or move the file away"
    )]
    OutboxKeyMismatch { path: PathBuf },
    /// `what` needs a data dir, and the node was built without one.
    #[error("{what} need a data dir: build the node with NodeBuilder::data_dir")]
    NoDataDir { what: &'static str },
    /// A topic operation was refused (see
    /// [`TopicRefusal::kind`](crate::topics::TopicRefusal::kind)).
    #[error("{0}")]
    Topic(crate::topics::TopicRefusal),
}

fn bind_hint(err: &std::io::Error) -> &'static str {
    if err.kind() == std::io::ErrorKind::AddrInUse {
        " (is another reach node already using this port? choose another with --listen)"
    } else {
        ""
    }
}

impl Error {
    /// Stable machine-readable name of this error kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Bind { source, .. } if source.kind() == std::io::ErrorKind::AddrInUse => {
                "addr_in_use"
            }
            Error::Bind { .. } => "bind",
            Error::KeyFile { .. } => "key_file",
            Error::Io { .. } => "io",
            Error::Tls(_) => "tls",
            Error::PeerIdMismatch { .. } => "peer_id_mismatch",
            Error::Connect { .. } => "connect",
            Error::PostQuantumRequired { .. } => "pq_required",
            Error::NoAddress(_) => "no_address",
            Error::ConnectionLost { .. } => "connection_lost",
            Error::MessageTooLarge { .. } => "message_too_large",
            Error::Refused { .. } => "refused",
            Error::Wire(e) => e.kind(),
            Error::Timeout(_) => "timeout",
            Error::Shutdown => "shutdown",
            Error::InvalidProtocolName { .. } => "invalid_protocol_name",
            Error::ProtocolInUse { .. } => "protocol_in_use",
            Error::ProtocolNotSupported { .. } => "protocol_not_supported",
            Error::Config(_) => "config",
            Error::Storage { .. } => "storage",
            Error::NotFound(_) => "not_found",
            Error::Rpc { .. } => "rpc",
            Error::Relay { .. } => "relay",
            Error::RelayRefused { .. } => "relay_refused",
            Error::DataDirLocked { .. } => "data_dir_locked",
            Error::KeyFileIncomplete { .. } => "key_file_incomplete",
            Error::OutboxFull { .. } => "outbox_full",
            Error::OutboxCorrupt { .. } => "outbox_corrupt",
            Error::OutboxKeyMismatch { .. } => "outbox_key_mismatch",
            Error::NoDataDir { .. } => "no_data_dir",
            Error::Topic(r) => r.kind(),
        }
    }
}

/// Result alias of the reach runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;
