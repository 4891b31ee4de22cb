//! The QUIC handshake of every reach connection: post-quantum key exchange,
//! TLS configs computed once per node, and what each handshake learned.
//!
//! **Key exchange.** By default every connection negotiates X25519MLKEM768,
//! the hybrid of X25519 and ML-KEM-768 (FIPS 203) that TLS stacks deploy
//! today: recorded traffic stays confidential even against a future quantum
//! computer, and the classical half keeps it at least as strong as X25519
//! alone. [`PostQuantum`] chooses between preferring it (default), requiring
//! it, and classical only.
//!
//! **Once per node, not per dial.** The certificate, the signing key and the
//! rustls configs are built when the node starts. A dial only allocates a
//! small [`DialCrypto`] carrying the identity it expects; the shared rustls
//! config learns that identity through the handshake context below.
//!
//! **What a handshake learned.** quinn keeps the rustls connection private,
//! so the negotiated group and the identity the peer presented cannot be
//! read from it afterwards. Instead each quinn crypto session is wrapped
//! ([`ReachSession`]) and installs its own [`HandshakeContext`] in a
//! thread-local for the duration of each synchronous call into rustls. The
//! certificate verifiers and the key-exchange groups (also wrapped:
//! [`Recorded`]) run inside those calls, read the identity the dialer
//! expects and report what they saw into the context. Nothing is guessed:
//! the group is the one whose key exchange actually completed.

use std::any::Any;
use std::cell::RefCell;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::crypto::{self, ExportKeyingMaterialError, KeyPair, Keys, PacketKey};
use quinn::{ConnectError, ConnectionId, TransportConfig};
use quinn_proto::transport_parameters::TransportParameters;
use reach_proto::{Keypair, PeerId};
use rustls::NamedGroup;
use rustls::crypto::aws_lc_rs::kx_group;
use rustls::crypto::{ActiveKeyExchange, CompletedKeyExchange, SharedSecret, SupportedKxGroup};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::{tls, transport};

/// How a node uses post-quantum (hybrid) key exchange.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PostQuantum {
    /// Offer X25519MLKEM768 first and use it with every peer that can;
    /// accept classical peers (X25519) without an extra round trip.
    #[default]
    Prefer,
    /// Only X25519MLKEM768: a peer that cannot do it is refused
    /// ([`Error::PostQuantumRequired`] on the dialing side).
    Require,
    /// Classical key exchange only (X25519, then the NIST curves).
    Off,
}

impl PostQuantum {
    /// The config-file and CLI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PostQuantum::Prefer => "prefer",
            PostQuantum::Require => "require",
            PostQuantum::Off => "off",
        }
    }

    /// The key-exchange groups offered and accepted, most preferred first.
    pub(crate) fn kx_groups(self) -> Vec<&'static dyn SupportedKxGroup> {
        match self {
            PostQuantum::Prefer => vec![&HYBRID, &X25519, &P256, &P384],
            PostQuantum::Require => vec![&HYBRID],
            PostQuantum::Off => vec![&X25519, &P256, &P384],
        }
    }
}

/// A post-quantum mode that is not `prefer`, `require` or `off`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown post-quantum mode {0:?} (expected prefer, require or off)")]
pub struct UnknownPostQuantumMode(pub String);

impl std::str::FromStr for PostQuantum {
    type Err = UnknownPostQuantumMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "prefer" => Ok(PostQuantum::Prefer),
            "require" => Ok(PostQuantum::Require),
            "off" => Ok(PostQuantum::Off),
            other => Err(UnknownPostQuantumMode(other.into())),
        }
    }
}

impl fmt::Display for PostQuantum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The hybrid group's IANA name, as shown in status and stats.
pub const HYBRID_GROUP_NAME: &str = "X25519MLKEM768";

/// A key-exchange group's name as reach shows it.
pub fn group_name(group: NamedGroup) -> String {
    match group {
        NamedGroup::X25519MLKEM768 => HYBRID_GROUP_NAME.into(),
        NamedGroup::X25519 => "X25519".into(),
        NamedGroup::secp256r1 => "secp256r1".into(),
        NamedGroup::secp384r1 => "secp384r1".into(),
        other => format!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------
// The per-handshake context.

/// What one handshake expects and learns. Owned by the connection's
/// [`ReachSession`] (and by the dialer, which reads it after a failure).
#[derive(Debug, Default)]
pub(crate) struct HandshakeContext {
    /// The identity the dialer asked for (`None`: any, learned).
    expected: Option<PeerId>,
    /// The identity the peer's certificate carried.
    seen: Mutex<Option<PeerId>>,
    /// The key-exchange group whose exchange completed.
    group: Mutex<Option<NamedGroup>>,
}

impl HandshakeContext {
    /// The identity the peer presented, if its certificate was checked.
    pub(crate) fn seen(&self) -> Option<PeerId> {
        self.seen.lock().ok().and_then(|s| *s)
    }

    /// The negotiated key-exchange group, once the exchange completed.
    pub(crate) fn group(&self) -> Option<NamedGroup> {
        self.group.lock().ok().and_then(|g| *g)
    }
}

thread_local! {
    /// The context of the handshake whose rustls call runs on this thread.
    static CURRENT: RefCell<Option<Arc<HandshakeContext>>> = const { RefCell::new(None) };
}

/// Runs `f` (a synchronous call into rustls) with `ctx` as the current
/// handshake context; the previous one is restored afterwards, even if `f`
/// panics.
fn within<R>(ctx: &Arc<HandshakeContext>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Arc<HandshakeContext>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let prev = self.0.take();
            CURRENT.with(|c| *c.borrow_mut() = prev);
        }
    }
    let _restore = Restore(CURRENT.with(|c| c.replace(Some(ctx.clone()))));
    f()
}

/// The current handshake's context, when a reach session is in a rustls
/// call on this thread (`None` for TLS used outside QUIC, e.g. TCP links).
pub(crate) fn current() -> Option<Arc<HandshakeContext>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// Records what a verifier saw in the current handshake. Returns `None`
/// when no handshake context is in scope, else the identity that
/// handshake expects (`Some(None)`: any).
pub(crate) fn report_seen(actual: PeerId) -> Option<Option<PeerId>> {
    let ctx = current()?;
    if let Ok(mut seen) = ctx.seen.lock() {
        *seen = Some(actual);
    }
    Some(ctx.expected)
}

fn report_group(group: NamedGroup) {
    if let Some(ctx) = current()
        && let Ok(mut g) = ctx.group.lock()
    {
        *g = Some(group);
    }
}

// ---------------------------------------------------------------------------
// Key-exchange groups that report which one completed.

/// A key-exchange group of the aws-lc-rs provider that reports into the
/// current handshake context when its exchange completes.
#[derive(Debug)]
struct Recorded(&'static dyn SupportedKxGroup);

static HYBRID: Recorded = Recorded(kx_group::X25519MLKEM768);
static X25519: Recorded = Recorded(kx_group::X25519);
static P256: Recorded = Recorded(kx_group::SECP256R1);
static P384: Recorded = Recorded(kx_group::SECP384R1);

impl SupportedKxGroup for Recorded {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, rustls::Error> {
        Ok(Box::new(RecordedActive(self.0.start()?)))
    }

    fn start_and_complete(
        &self,
        peer_pub_key: &[u8],
    ) -> Result<CompletedKeyExchange, rustls::Error> {
        // The server side: one call does the whole exchange.
        let done = self.0.start_and_complete(peer_pub_key)?;
        report_group(done.group);
        Ok(done)
    }

    fn name(&self) -> NamedGroup {
        self.0.name()
    }

    fn fips(&self) -> bool {
        self.0.fips()
    }

    fn usable_for_version(&self, version: rustls::ProtocolVersion) -> bool {
        self.0.usable_for_version(version)
    }
}

/// The client side of a [`Recorded`] exchange.
struct RecordedActive(Box<dyn ActiveKeyExchange>);

impl ActiveKeyExchange for RecordedActive {
    fn complete(self: Box<Self>, peer_pub_key: &[u8]) -> Result<SharedSecret, rustls::Error> {
        let group = self.0.group();
        let secret = self.0.complete(peer_pub_key)?;
        report_group(group);
        Ok(secret)
    }

    /// A hybrid share also carries a plain X25519 share, so a classical
    /// server answers it without a HelloRetryRequest round trip.
    fn hybrid_component(&self) -> Option<(NamedGroup, &[u8])> {
        self.0.hybrid_component()
    }

    fn complete_hybrid_component(
        self: Box<Self>,
        peer_pub_key: &[u8],
    ) -> Result<SharedSecret, rustls::Error> {
        let group = self.0.hybrid_component().map(|(g, _)| g);
        let secret = self.0.complete_hybrid_component(peer_pub_key)?;
        if let Some(group) = group {
            report_group(group);
        }
        Ok(secret)
    }

    fn pub_key(&self) -> &[u8] {
        self.0.pub_key()
    }

    fn group(&self) -> NamedGroup {
        self.0.group()
    }
}

// ---------------------------------------------------------------------------
// Counters.

crate::telemetry::metrics! {
    /// Completed TLS handshakes by negotiated key-exchange group (counted when
    /// TLS completes, so also handshakes whose connection the node then closed,
    /// e.g. a dial that reached itself).
    pub struct HandshakeCounters =>
    /// The handshake counters as [`NodeStats`](crate::NodeStats) shows them.
    pub struct HandshakeStats;
    atomic {
        /// Completed handshakes that negotiated the hybrid post-quantum group
        /// X25519MLKEM768.
        counter hybrid = "handshakes_x25519mlkem768",
        /// Completed handshakes that negotiated classical X25519.
        counter x25519 = "handshakes_x25519",
        /// Completed handshakes that negotiated any other group.
        counter other = "handshakes_other_group",
    }
}

impl HandshakeCounters {
    fn count(&self, group: Option<NamedGroup>) {
        let c = match group {
            Some(NamedGroup::X25519MLKEM768) => &self.hybrid,
            Some(NamedGroup::X25519) => &self.x25519,
            _ => &self.other,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------
// quinn crypto wrappers.

/// What [`quinn::Connection::handshake_data`] returns for reach connections.
#[derive(Debug, Clone)]
pub struct HandshakeInfo {
    /// The negotiated application protocol (reach's ALPN).
    pub alpn: Option<Vec<u8>>,
    /// The negotiated key-exchange group (`None` before it completed).
    pub group: Option<NamedGroup>,
}

/// The negotiated key-exchange group of a reach connection, by name.
pub fn negotiated_group(conn: &quinn::Connection) -> Option<String> {
    let info = conn.handshake_data()?.downcast::<HandshakeInfo>().ok()?;
    info.group.map(group_name)
}

/// A quinn crypto session that runs every rustls call inside its own
/// [`HandshakeContext`] and counts its handshake once it completes.
struct ReachSession {
    inner: Box<dyn crypto::Session>,
    ctx: Arc<HandshakeContext>,
    stats: Arc<HandshakeCounters>,
    counted: bool,
}

impl crypto::Session for ReachSession {
    fn initial_keys(&self, dst_cid: &ConnectionId, side: quinn::Side) -> Keys {
        self.inner.initial_keys(dst_cid, side)
    }

    fn handshake_data(&self) -> Option<Box<dyn Any>> {
        // Ready when quinn's is (ALPN known), with the group read now.
        let quinn_data = self.inner.handshake_data()?;
        let alpn = quinn_data
            .downcast::<quinn::crypto::rustls::HandshakeData>()
            .ok()
            .and_then(|d| d.protocol);
        Some(Box::new(HandshakeInfo {
            alpn,
            group: self.ctx.group(),
        }))
    }

    fn peer_identity(&self) -> Option<Box<dyn Any>> {
        self.inner.peer_identity()
    }

    fn early_crypto(&self) -> Option<(Box<dyn quinn::crypto::HeaderKey>, Box<dyn PacketKey>)> {
        self.inner.early_crypto()
    }

    fn early_data_accepted(&self) -> Option<bool> {
        self.inner.early_data_accepted()
    }

    fn is_handshaking(&self) -> bool {
        self.inner.is_handshaking()
    }

    fn read_handshake(&mut self, buf: &[u8]) -> Result<bool, quinn_proto::TransportError> {
        let inner = &mut self.inner;
        let result = within(&self.ctx, || inner.read_handshake(buf));
        if !self.counted && result.is_ok() && !self.inner.is_handshaking() {
            self.counted = true;
            self.stats.count(self.ctx.group());
        }
        result
    }

    fn transport_parameters(
        &self,
    ) -> Result<Option<TransportParameters>, quinn_proto::TransportError> {
        self.inner.transport_parameters()
    }

    fn write_handshake(&mut self, buf: &mut Vec<u8>) -> Option<Keys> {
        let inner = &mut self.inner;
        within(&self.ctx, || inner.write_handshake(buf))
    }

    fn next_1rtt_keys(&mut self) -> Option<KeyPair<Box<dyn PacketKey>>> {
        self.inner.next_1rtt_keys()
    }

    fn is_valid_retry(&self, orig_dst_cid: &ConnectionId, header: &[u8], payload: &[u8]) -> bool {
        self.inner.is_valid_retry(orig_dst_cid, header, payload)
    }

    fn export_keying_material(
        &self,
        output: &mut [u8],
        label: &[u8],
        context: &[u8],
    ) -> Result<(), ExportKeyingMaterialError> {
        self.inner.export_keying_material(output, label, context)
    }
}

/// One dial's crypto config: the node's shared rustls client config plus
/// the context of this handshake (which identity it must reach).
struct DialCrypto {
    shared: Arc<QuicClientConfig>,
    ctx: Arc<HandshakeContext>,
    stats: Arc<HandshakeCounters>,
}

impl crypto::ClientConfig for DialCrypto {
    fn start_session(
        self: Arc<Self>,
        version: u32,
        _server_name: &str,
        params: &TransportParameters,
    ) -> Result<Box<dyn crypto::Session>, ConnectError> {
        // Identity is checked by key: the name on the wire is a constant.
        let shared = self.shared.clone();
        let inner = within(&self.ctx, || {
            crypto::ClientConfig::start_session(shared, version, tls::SERVER_NAME, params)
        })?;
        Ok(Box::new(ReachSession {
            inner,
            ctx: self.ctx.clone(),
            stats: self.stats.clone(),
            counted: false,
        }))
    }
}

/// The node's server crypto config: each accepted handshake gets a fresh
/// context.
struct AcceptCrypto {
    shared: Arc<QuicServerConfig>,
    stats: Arc<HandshakeCounters>,
}

impl crypto::ServerConfig for AcceptCrypto {
    fn initial_keys(
        &self,
        version: u32,
        dst_cid: &ConnectionId,
    ) -> Result<Keys, quinn::crypto::UnsupportedVersion> {
        self.shared.initial_keys(version, dst_cid)
    }

    fn retry_tag(&self, version: u32, orig_dst_cid: &ConnectionId, packet: &[u8]) -> [u8; 16] {
        self.shared.retry_tag(version, orig_dst_cid, packet)
    }

    fn start_session(
        self: Arc<Self>,
        version: u32,
        params: &TransportParameters,
    ) -> Box<dyn crypto::Session> {
        let ctx = Arc::new(HandshakeContext::default());
        let shared = self.shared.clone();
        let inner = within(&ctx, || {
            crypto::ServerConfig::start_session(shared, version, params)
        });
        Box::new(ReachSession {
            inner,
            ctx,
            stats: self.stats.clone(),
            counted: false,
        })
    }
}

// ---------------------------------------------------------------------------
// The node's TLS, built once.

/// Everything a node's handshakes need, computed once when it starts.
pub(crate) struct NodeTls {
    pq: PostQuantum,
    link_client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    quic_client: Arc<QuicClientConfig>,
    quic_server: Arc<AcceptCrypto>,
    transport: Arc<TransportConfig>,
    stats: Arc<HandshakeCounters>,
}

impl NodeTls {
    pub(crate) fn new(keypair: &Keypair, pq: PostQuantum) -> Result<Self, Error> {
        let quic_client = tls::client_config_accepting(keypair, tls::Accept::PerDial, pq)?.0;
        let quic_client = Arc::new(
            QuicClientConfig::try_from(Arc::new(quic_client))
                .map_err(|e| Error::Tls(e.to_string()))?,
        );
        let link_client = Arc::new(tls::client_config_accepting(keypair, tls::Accept::Any, pq)?.0);
        let server = Arc::new(tls::server_config_with(keypair, pq)?);
        let stats = Arc::new(HandshakeCounters::default());
        let quic_server = Arc::new(AcceptCrypto {
            shared: Arc::new(
                QuicServerConfig::try_from(server.clone())
                    .map_err(|e| Error::Tls(e.to_string()))?,
            ),
            stats: stats.clone(),
        });
        Ok(NodeTls {
            pq,
            link_client,
            server,
            quic_client,
            quic_server,
            transport: transport::transport_config(),
            stats,
        })
    }

    pub(crate) fn pq(&self) -> PostQuantum {
        self.pq
    }

    pub(crate) fn stats(&self) -> &HandshakeCounters {
        &self.stats
    }

    /// The TLS configs of TCP links (any reach identity: the QUIC
    /// connection inside authenticates the peer that matters).
    pub(crate) fn link_configs(&self) -> (Arc<rustls::ClientConfig>, Arc<rustls::ServerConfig>) {
        (self.link_client.clone(), self.server.clone())
    }

    /// The QUIC server config of the node's endpoint.
    pub(crate) fn server_config(&self) -> quinn::ServerConfig {
        let mut cfg = quinn::ServerConfig::with_crypto(self.quic_server.clone());
        cfg.transport_config(self.transport.clone());
        cfg
    }

    /// The config of one dial that accepts only `expected` (any identity
    /// when `None`), and the context that tells who answered.
    pub(crate) fn dial_config(
        &self,
        expected: Option<PeerId>,
    ) -> (quinn::ClientConfig, Arc<HandshakeContext>) {
        let ctx = Arc::new(HandshakeContext {
            expected,
            ..HandshakeContext::default()
        });
        let mut cfg = quinn::ClientConfig::new(Arc::new(DialCrypto {
            shared: self.quic_client.clone(),
            ctx: ctx.clone(),
            stats: self.stats.clone(),
        }));
        cfg.transport_config(self.transport.clone());
        (cfg, ctx)
    }
}

/// Whether a failed dial shows the peer refusing our ClientHello: it sent
/// TLS alert 40 (handshake_failure) before presenting any certificate.
/// rustls sends that alert when nothing we offered is acceptable; between
/// reach nodes the cipher suites and the signature scheme are fixed, so
/// with `pq = "require"` it is the key-exchange groups that differ.
pub(crate) fn refused_our_hello(err: &quinn::ConnectionError, ctx: &HandshakeContext) -> bool {
    /// TLS alert handshake_failure (RFC 8446, section 6).
    const HANDSHAKE_FAILURE_ALERT: u8 = 40;
    let quinn::ConnectionError::ConnectionClosed(close) = err else {
        return false;
    };
    close.error_code == quinn_proto::TransportErrorCode::crypto(HANDSHAKE_FAILURE_ALERT)
        && ctx.seen().is_none()
        && ctx.group().is_none()
}
