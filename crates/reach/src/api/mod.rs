//! The local control API: HTTP/JSON on a loopback TCP port.
//!
//! `reach node` serves it; the CLI's other subcommands (`reach status`,
//! `reach send`, …) use it. Only the local user may: every request must carry
//! `Authorization: Bearer <token>`, where the token is random per start and
//! kept in `<data dir>/api-token` with 0600 permissions. The address is
//! published in `<data dir>/api.json` so clients find the node from its data
//! dir alone.
//!
//! Endpoints (all JSON):
//! - `GET  /v1/status`  — peer id, addresses, connected peers, counters
//! - `GET  /v1/stats`   — counters only
//! - `POST /v1/connect` — `{"peer": "<id>", "addrs": ["ip:port", …]}`
//! - `POST /v1/send`    — `{"peer": "<id>", "addrs": [...]?, "message": "text"}`
//!   (without addrs the peer is resolved through the DHT)
//! - `POST /v1/lookup`  — `{"peer": "<id>"}` → the peer's published addresses
//! - `GET  /v1/nat`     — NAT classification with connected peers as helpers
//! - `GET  /debug/routing` — the DHT routing table
//! - `GET  /debug/store`   — records this node holds for others
//! - `POST /v1/send?peer=<id>` — the body is the message's raw bytes
//! - `GET  /v1/recv[?since=N]` — server-sent events of what the node
//!   received; see [`recv`]
//! - `GET  /v1/peers` — connected peers with path kind and RTT
//! - `POST /v1/ping` — `{"peer": "<id>", "count": N}` → round trips; see [`daemon`]
//! - `POST /v1/dashboard/code` — a one-time dashboard login code; `GET
//!   /dashboard/login?code=` (no token: the code), `GET /dashboard`, `GET
//!   /dashboard/events` (token or session cookie); see [`dashboard`]
//!
//! Errors come back as `{"error": {"kind": "<stable kind>", "message": "…"}}`,
//! refusals by the server itself too: `unauthorized` (401), `not_found`
//! (404), `method_not_allowed` (405), `timeout` (408, a body not sent within
//! [`BODY_READ_TIMEOUT`]), `request_too_large` (413, a body over
//! [`MAX_REQUEST_BODY`]), `busy` (503, [`MAX_API_CONNECTIONS`] requests in
//! progress), `bad_request` (400, a request line or header that is not
//! HTTP/1.1), `uri_too_long` (414), `headers_too_large` (431, a request
//! head over [`MAX_REQUEST_HEAD`]). A connection that has not sent its request head within
//! [`HEADER_READ_TIMEOUT`] is closed without an answer.

pub mod client;
pub mod daemon;
pub mod dashboard;
pub mod metrics;
pub mod recv;
mod server;
mod slots;
pub mod topics;

pub use server::{ApiServer, raise_fd_limit, serve};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::node::{NodeStats, PeerInfo};
use crate::punch::PunchStats;
use crate::relay::RelayStatus;
use reach_proto::PeerId;

/// File in the data dir holding the bearer token.
pub const TOKEN_FILE: &str = "api-token";
/// File in the data dir telling clients where the API listens.
pub const DISCOVERY_FILE: &str = "api.json";
/// Default API listen address: loopback only, port picked by the OS.
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:0";
/// Largest request body the API accepts: the largest message
/// ([`crate::MAX_MESSAGE_LEN`], sent as is with `POST /v1/send?peer=`) plus
/// room for a JSON wrapper. A bigger message is refused with a JSON 413
/// (`request_too_large` past this, `message_too_large` between the two).
pub const MAX_REQUEST_BODY: usize = crate::MAX_MESSAGE_LEN + 64 * 1024;
/// Longest a client may take to send a request line and headers. The CLI
/// sends them in one write right after connecting; a connection that has
/// not finished them by then is stalled or hostile (slowloris) and only
/// holds a file descriptor: it is closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a client may take to send a request body once its headers are
/// in. [`MAX_REQUEST_BODY`] over loopback takes milliseconds; this only
/// bounds a client that stalls mid-body (answered with a JSON 408).
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections the API serves at once. The CLI opens one per command, so
/// real use is a handful; the cap keeps a flood of local connections from
/// taking the process's file descriptors (at most this many of them, far
/// below the default soft limit of 1024, which the node also raises at
/// start). At the cap, the connection that has waited longest without
/// sending its request head is closed to make room, so stalled connections
/// cannot lock out a real request; only when every connection is busy with
/// a real request is a new one refused (JSON 503).
pub const MAX_API_CONNECTIONS: usize = 256;
/// Largest request line plus headers the API reads. The CLI's requests
/// have a few short headers (well under 1 KiB); this leaves room for any
/// ordinary HTTP client while a head past it is refused (JSON 431) after
/// reading at most this much (hyper's own default is about 400 KiB).
pub const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// Where a running node's API is, as written to [`DISCOVERY_FILE`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Discovery {
    pub addr: SocketAddr,
    pub peer_id: PeerId,
    pub pid: u32,
}

/// Answer of `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub peer_id: PeerId,
    pub local_addr: SocketAddr,
    pub local_addrs: Vec<SocketAddr>,
    pub connected_peers: Vec<ConnectedPeer>,
    /// The node's post-quantum mode: `prefer`, `require` or `off`.
    #[serde(default)]
    pub post_quantum: String,
    /// External addresses as peers reported them, best supported first.
    #[serde(default)]
    pub external: Vec<reach_proto::nat::observed::ScoredAddr>,
    /// The relay side: serving, held relay, reservations, circuits.
    #[serde(default)]
    pub relay: RelayStatus,
    /// Hole punching: per technique attempts, successes, failures;
    /// fallbacks; time to direct; the latest outcome per peer.
    #[serde(default)]
    pub punch: PunchStats,
    /// The node's counters (the same object as `GET /v1/stats`).
    pub stats: NodeStats,
    /// Topics: this node's home, subscriptions, served topics, links.
    #[serde(default)]
    pub topics: crate::topics::TopicsStatus,
    /// Version, build profile and uptime (absent from older daemons).
    #[serde(default)]
    pub build: Option<daemon::BuildInfo>,
}

/// One connected peer in a [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnectedPeer {
    pub peer: PeerId,
    pub addr: SocketAddr,
    pub rtt_ms: u64,
    pub direction: String,
    /// The relay the connection goes through, if relayed.
    #[serde(default)]
    pub relay: Option<PeerId>,
    /// The relay of the relayed connection kept behind a punched direct
    /// one, if any.
    #[serde(default)]
    pub standby_relay: Option<PeerId>,
    /// The key-exchange group the connection negotiated (`X25519MLKEM768`:
    /// post-quantum hybrid).
    #[serde(default)]
    pub kx_group: Option<String>,
}

impl From<PeerInfo> for ConnectedPeer {
    fn from(p: PeerInfo) -> Self {
        ConnectedPeer {
            peer: p.peer,
            addr: p.addr,
            rtt_ms: p.rtt_ms,
            direction: format!("{:?}", p.direction).to_lowercase(),
            relay: p.relay,
            standby_relay: p.standby_relay,
            kx_group: p.kx_group,
        }
    }
}

/// Body of `POST /v1/connect`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectRequest {
    pub peer: PeerId,
    #[serde(default)]
    pub addrs: Vec<SocketAddr>,
    /// A ticket for `peer` (see [`crate::Ticket`]): dial its addresses and
    /// relays first.
    #[serde(default)]
    pub ticket: Option<String>,
}

/// Body of `POST /v1/send`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    pub peer: PeerId,
    #[serde(default)]
    pub addrs: Vec<SocketAddr>,
    /// A ticket for `peer` (see [`crate::Ticket`]): dial its addresses and
    /// relays first.
    #[serde(default)]
    pub ticket: Option<String>,
    pub message: String,
}

/// Body of `POST /v1/lookup`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupRequest {
    pub peer: PeerId,
}

/// Answer of `POST /v1/lookup`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LookupResponse {
    pub peer: PeerId,
    pub addrs: Vec<reach_proto::dht::record::TypedAddr>,
}

/// Answer of `POST /v1/send`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SendResponse {
    /// The peer has the message (plain sends); `false` for a durable send,
    /// which is committed to the outbox and delivered later.
    pub delivered: bool,
    pub bytes: usize,
    /// A durable send's message id (see `GET /v1/outbox`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durable_id: Option<u64>,
}

/// One pending durable message of `GET /v1/outbox`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub id: u64,
    pub peer: PeerId,
    pub seq: u64,
    /// `critical`, or `moderate` with its attempts.
    pub delivery: String,
    pub bytes: usize,
    pub attempts: u32,
    pub age_ms: u64,
    /// Until the next attempt; absent while an attempt awaits its ack.
    pub next_try_ms: Option<u64>,
}

/// Body of `GET /v1/outbox`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutboxResponse {
    pub pending: Vec<OutboxEntry>,
}

impl From<crate::outbox::PendingInfo> for OutboxEntry {
    fn from(p: crate::outbox::PendingInfo) -> Self {
        OutboxEntry {
            id: p.id.0,
            peer: p.peer,
            seq: p.seq,
            delivery: match p.delivery {
                crate::Delivery::Critical => "critical".into(),
                crate::Delivery::Moderate { attempts } => format!("moderate ({attempts} attempts)"),
            },
            bytes: p.size,
            attempts: p.attempts,
            age_ms: p.age.as_millis() as u64,
            next_try_ms: p.next_try.map(|d| d.as_millis() as u64),
        }
    }
}

/// Error body of every failed request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiErrorBody {
    pub error: ApiErrorDetail,
}

/// The `error` member of [`ApiErrorBody`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiErrorDetail {
    pub kind: String,
    pub message: String,
}

/// Path of the token file in `data_dir`.
pub fn token_path(data_dir: &Path) -> PathBuf {
    data_dir.join(TOKEN_FILE)
}

/// Path of the discovery file in `data_dir`.
pub fn discovery_path(data_dir: &Path) -> PathBuf {
    data_dir.join(DISCOVERY_FILE)
}
