//! The daemon's other endpoints for programs: binary send
//! (`POST /v1/send?peer=<id>`), `GET /v1/peers`, `POST /v1/ping` and the
//! echo protocol it uses, and the version/uptime/build part of the status.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::node::{Node, PeerInfo};
use reach_proto::PeerId;

/// The application protocol `reach ping` uses: the peer's daemon echoes
/// every 8-byte probe back on the same stream. (`reach/` is reserved for
/// the node's own protocols, so this lives outside it.)
pub const PING_PROTOCOL: &str = "reachd/ping/1";
/// Bytes of one probe: a counter, echoed as is.
const PING_PROBE_LEN: usize = 8;
/// Most probes one `POST /v1/ping` sends: each waits up to
/// [`PING_TIMEOUT`], and the request must end within the client's
/// 30 s request timeout (`client::REQUEST_TIMEOUT`) in the worst case.
pub const MAX_PING_COUNT: u32 = 20;
/// Longest one probe (or the dial before the first) may take before the
/// peer counts as unreachable.
pub const PING_TIMEOUT: Duration = Duration::from_millis(1400);
/// Longest the echo side serves one stream: a peer that keeps a ping stream
/// open forever holds only this much of our time.
const ECHO_STREAM_LIFETIME: Duration = Duration::from_secs(60);

/// Body of `POST /v1/ping`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PingRequest {
    pub peer: PeerId,
    /// Round trips, 1 to [`MAX_PING_COUNT`] (default 1).
    #[serde(default)]
    pub count: Option<u32>,
}

/// Answer of `POST /v1/ping`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PingResponse {
    pub peer: PeerId,
    /// The path the probes took: `direct`, `relayed` or `tcp`.
    pub path: String,
    /// Each round trip in microseconds, in order.
    pub rtts_us: Vec<u64>,
}

/// One entry of `GET /v1/peers`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerEntry {
    pub peer: PeerId,
    pub addr: std::net::SocketAddr,
    /// `direct`, `relayed` or `tcp` (a TCP link, for a network that
    /// blocks UDP).
    pub path: String,
    pub rtt_ms: u64,
    pub direction: String,
    #[serde(default)]
    pub relay: Option<PeerId>,
}

impl From<PeerInfo> for PeerEntry {
    fn from(p: PeerInfo) -> Self {
        PeerEntry {
            peer: p.peer,
            addr: p.addr,
            path: if p.relay.is_some() {
                "relayed"
            } else {
                "direct"
            }
            .into(),
            rtt_ms: p.rtt_ms,
            direction: format!("{:?}", p.direction).to_lowercase(),
            relay: p.relay,
        }
    }
}

/// The connected peers with their path kinds.
pub(crate) fn peer_entries(node: &Node) -> Vec<PeerEntry> {
    let paths: std::collections::HashMap<_, _> = node.peer_paths().into_iter().collect();
    node.connected_peers()
        .into_iter()
        .map(|p| {
            let path = paths.get(&p.peer).map(super::recv::path_word);
            let mut entry = PeerEntry::from(p);
            if let Some(path) = path {
                entry.path = path.into();
            }
            entry
        })
        .collect()
}

/// Answer of `GET /v1/peers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeersResponse {
    pub peers: Vec<PeerEntry>,
}

/// The build this daemon runs, for `/v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
pub struct BuildInfo {
    /// `CARGO_PKG_VERSION` of the reach crate.
    pub version: String,
    /// `debug` or `release`.
    pub profile: String,
    /// Seconds since the control API started (with the node, for `reach node`).
    pub uptime_s: u64,
}

pub(crate) fn build_info(started: Instant) -> BuildInfo {
    BuildInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        profile: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
        .into(),
        uptime_s: started.elapsed().as_secs(),
    }
}

/// Serves [`PING_PROTOCOL`] on `node` until the node shuts down: each
/// stream gets its probes echoed. `None` if another listener holds the name.
pub(crate) fn spawn_echo(node: &Node) -> Option<tokio::task::JoinHandle<()>> {
    let mut listener = match node.accept_protocol(PING_PROTOCOL) {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(error = %e, "ping echo not served");
            return None;
        }
    };
    Some(tokio::spawn(async move {
        while let Some(mut stream) = listener.accept().await {
            tokio::spawn(async move {
                let echo = async {
                    let mut probe = [0u8; PING_PROBE_LEN];
                    while stream.recv.read_exact(&mut probe).await.is_ok() {
                        if stream.send.write_all(&probe).await.is_err() {
                            break;
                        }
                    }
                    let _ = stream.send.finish();
                };
                let _ = tokio::time::timeout(ECHO_STREAM_LIFETIME, echo).await;
            });
        }
    }))
}

/// Sends `count` probes to `peer` over [`PING_PROTOCOL`], one after the
/// other, and returns each round trip.
pub(crate) async fn ping(node: &Node, peer: PeerId, count: u32) -> Result<PingResponse> {
    let mut stream = tokio::time::timeout(PING_TIMEOUT, node.open_protocol(peer, PING_PROTOCOL))
        .await
        .map_err(|_| Error::Timeout("opening a ping stream"))??;
    let mut rtts_us = Vec::with_capacity(count as usize);
    for i in 0..u64::from(count) {
        let probe = i.to_be_bytes();
        let start = Instant::now();
        let round = async {
            stream.send.write_all(&probe).await.ok()?;
            let mut back = [0u8; PING_PROBE_LEN];
            stream.recv.read_exact(&mut back).await.ok()?;
            Some(back)
        };
        match tokio::time::timeout(PING_TIMEOUT, round).await {
            Ok(Some(back)) if back == probe => {}
            Ok(_) => return Err(Error::Timeout("ping echo")),
            Err(_) => return Err(Error::Timeout("ping echo")),
        }
        rtts_us.push(start.elapsed().as_micros() as u64);
    }
    let _ = stream.send.finish();
    let path = node
        .peer_paths()
        .into_iter()
        .find(|(p, _)| *p == peer)
        .map(|(_, path)| super::recv::path_word(&path).to_string())
        .unwrap_or_else(|| "unknown".into());
    Ok(PingResponse {
        peer,
        path,
        rtts_us,
    })
}
