//! `reach bench connect`: how long a fresh dialer takes from "connect" to
//! its first echoed byte, for raw quinn and for reach, in one run on
//! loopback.
//!
//! Four variants, interleaved round by round so machine noise hits all
//! alike; each round uses a fresh dialer (new identity, new endpoint or
//! node) whose setup is *not* timed, so what is measured is the per-dial
//! cost: the handshake, and whatever reach does before the first stream:
//!
//! - `quinn_server_auth`: raw quinn, the server presents reach's kind of
//!   certificate (self-signed Ed25519), the client pins it; no client cert.
//! - `quinn_mutual`: raw quinn with reach's own TLS configs (mutual Ed25519
//!   authentication, same key-exchange groups, hybrid first): the baseline
//!   reach must stay close to.
//! - `quinn_mutual_classical`: the same with `pq = off`: what the hybrid
//!   key exchange costs raw quinn.
//! - `reach_classical`: two reach nodes with `pq = off`.
//! - `reach_hybrid`: two reach nodes with the default `pq = prefer`; every
//!   connection must negotiate X25519MLKEM768 (checked, not assumed).
//!
//! The raw-quinn variants use the same transport settings and the same
//! key-exchange preference as reach (`prefer`), so the comparison isolates
//! what reach adds on top of a handshake. A fresh reach dialer is a whole
//! node whose own start-up tasks may still run during its first dial: that
//! counts against reach, as it would for a real application.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use reach::handshake::HYBRID_GROUP_NAME;
use reach::{Event, Keypair, Node, PostQuantum, RelayMode};
use serde::Serialize;

/// Each dial-to-echo must finish within this: a loopback dial takes a few
/// milliseconds, so 10 s only trips on a real fault (and says which
/// variant), never on noise.
const DIAL_DEADLINE: Duration = Duration::from_secs(10);

/// One variant's figures.
#[derive(Debug, Serialize)]
pub struct VariantReport {
    /// Connect to first echoed byte.
    pub median_us: u64,
    pub p99_us: u64,
    /// Of that, connect until the connection was established (the rest is
    /// the first stream's round trip): tells where time goes.
    pub handshake_median_us: u64,
    /// Key-exchange groups the connections negotiated (reach variants; the
    /// raw-quinn ones use the same groups but cannot show them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

/// What `reach bench connect --json` prints.
#[derive(Debug, Serialize)]
pub struct ConnectBenchReport {
    pub dialers: u32,
    pub quinn_server_auth: VariantReport,
    pub quinn_mutual: VariantReport,
    pub quinn_mutual_classical: VariantReport,
    pub reach_classical: VariantReport,
    pub reach_hybrid: VariantReport,
    /// reach (hybrid) median / raw quinn with mutual auth median (target ≤ 1.25).
    pub ratio_hybrid_vs_quinn_mutual: f64,
    /// reach (hybrid) median / reach (classical) median (target ≤ 1.10, or
    /// at most +1 ms).
    pub ratio_hybrid_vs_classical: f64,
    /// reach (hybrid) median − reach (classical) median, in µs.
    pub hybrid_extra_us: i64,
    /// mutual authentication's cost in raw quinn: quinn_mutual / quinn_server_auth.
    pub ratio_quinn_mutual_vs_server_auth: f64,
}

/// Runs the benchmark with `dialers` fresh dialers per variant.
pub async fn connect(dialers: u32) -> Result<ConnectBenchReport> {
    let quinn_server_auth = RawServer::start(RawAuth::ServerOnly)?;
    let quinn_mutual = RawServer::start(RawAuth::Mutual(PostQuantum::Prefer))?;
    let quinn_classical = RawServer::start(RawAuth::Mutual(PostQuantum::Off))?;
    let reach_off = echo_node(PostQuantum::Off).await?;
    let reach_pq = echo_node(PostQuantum::Prefer).await?;

    let mut times: [Vec<Sample>; 5] = Default::default();
    let mut groups: [Vec<String>; 2] = Default::default();
    // One untimed round first: one-time costs (crypto library set-up,
    // lazily built tables) belong to no dial.
    quinn_server_auth.dial_once().await?;
    quinn_mutual.dial_once().await?;
    quinn_classical.dial_once().await?;
    reach_dial_once(&reach_off, PostQuantum::Off).await?;
    reach_dial_once(&reach_pq, PostQuantum::Prefer).await?;
    for _ in 0..dialers {
        times[0].push(quinn_server_auth.dial_once().await?);
        times[1].push(quinn_mutual.dial_once().await?);
        times[4].push(quinn_classical.dial_once().await?);
        for (i, (target, pq)) in [
            (&reach_off, PostQuantum::Off),
            (&reach_pq, PostQuantum::Prefer),
        ]
        .into_iter()
        .enumerate()
        {
            let (took, group) = reach_dial_once(target, pq).await?;
            times[2 + i].push(took);
            if !groups[i].contains(&group) {
                groups[i].push(group);
            }
        }
    }
    if groups[1] != [HYBRID_GROUP_NAME] {
        bail!(
            "the hybrid variant negotiated {:?}, not only {HYBRID_GROUP_NAME}",
            groups[1]
        );
    }
    if groups[0] != ["X25519"] {
        bail!(
            "the classical variant negotiated {:?}, not only X25519",
            groups[0]
        );
    }
    reach_off.shutdown().await;
    reach_pq.shutdown().await;
    quinn_server_auth.close();
    quinn_mutual.close();
    quinn_classical.close();

    let [t_sa, t_mu, t_off, t_pq, t_mc] = times;
    let [g_off, g_pq] = groups;
    let v = |t: Vec<Sample>, groups: Vec<String>| {
        let (handshake, _) = median_p99(t.iter().map(|s| s.handshake).collect());
        let (median, p99) = median_p99(t.into_iter().map(|s| s.total).collect());
        VariantReport {
            median_us: median.as_micros() as u64,
            p99_us: p99.as_micros() as u64,
            handshake_median_us: handshake.as_micros() as u64,
            groups,
        }
    };
    let quinn_server_auth = v(t_sa, Vec::new());
    let quinn_mutual = v(t_mu, Vec::new());
    let quinn_mutual_classical = v(t_mc, Vec::new());
    let reach_classical = v(t_off, g_off);
    let reach_hybrid = v(t_pq, g_pq);
    let ratio = |a: u64, b: u64| round2(a as f64 / (b as f64).max(1.0));
    Ok(ConnectBenchReport {
        dialers,
        ratio_hybrid_vs_quinn_mutual: ratio(reach_hybrid.median_us, quinn_mutual.median_us),
        ratio_hybrid_vs_classical: ratio(reach_hybrid.median_us, reach_classical.median_us),
        hybrid_extra_us: reach_hybrid.median_us as i64 - reach_classical.median_us as i64,
        ratio_quinn_mutual_vs_server_auth: ratio(
            quinn_mutual.median_us,
            quinn_server_auth.median_us,
        ),
        quinn_server_auth,
        quinn_mutual,
        quinn_mutual_classical,
        reach_classical,
        reach_hybrid,
    })
}

/// One dial's times.
struct Sample {
    /// Until the connection was established.
    handshake: Duration,
    /// Until the first byte came back.
    total: Duration,
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Median and 99th percentile (nearest rank).
fn median_p99(mut t: Vec<Duration>) -> (Duration, Duration) {
    t.sort();
    let at = |q: f64| {
        let rank = ((q * t.len() as f64).ceil() as usize).clamp(1, t.len().max(1));
        t.get(rank - 1).copied().unwrap_or_default()
    };
    (at(0.5), at(0.99))
}

/// A reach node with nothing else to do (no relay, no punching), so only
/// the connection itself is measured.
fn quiet_node(pq: PostQuantum) -> reach::NodeBuilder {
    Node::builder()
        .bind(loopback())
        .relay_service(RelayMode::Off)
        .acquire_relay(RelayMode::Off)
        .hole_punching(false)
        .post_quantum(pq)
}

/// A reach node that echoes every stream opened to it.
async fn echo_node(pq: PostQuantum) -> Result<Node> {
    let node = quiet_node(pq).spawn().await?;
    let serving = node.clone();
    tokio::spawn(async move {
        while let Some(ev) = serving.next_event().await {
            let Event::Stream(mut s) = ev else { continue };
            tokio::spawn(async move {
                let mut b = [0u8; 1];
                if s.recv.read_exact(&mut b).await.is_ok() {
                    let _ = s.send.write_all(&b).await;
                    let _ = s.send.finish();
                }
            });
        }
    });
    Ok(node)
}

/// One fresh reach dialer: connect by key (address given), open a stream,
/// one byte there and back. Returns the time and the negotiated group.
async fn reach_dial_once(target: &Node, pq: PostQuantum) -> Result<(Sample, String)> {
    let dialer = quiet_node(pq).spawn().await?;
    let run = async {
        let started = Instant::now();
        dialer
            .connect(target.peer_id(), [target.local_addr()])
            .await?;
        let handshake = started.elapsed();
        let mut s = dialer.open_stream(target.peer_id()).await?;
        s.send.write_all(b"x").await?;
        let mut b = [0u8; 1];
        s.recv.read_exact(&mut b).await?;
        let total = started.elapsed();
        anyhow::ensure!(&b == b"x", "echo mismatch");
        anyhow::Ok(Sample { handshake, total })
    };
    let took = tokio::time::timeout(DIAL_DEADLINE, run)
        .await
        .context("reach dial timed out")??;
    let group = dialer
        .connected_peers()
        .into_iter()
        .find(|p| p.peer == target.peer_id())
        .and_then(|p| p.kx_group)
        .context("no key-exchange group on the reach connection")?;
    dialer.shutdown().await;
    Ok((took, group))
}

/// How a raw quinn baseline authenticates.
#[derive(Clone, Copy)]
enum RawAuth {
    /// The server only; the client pins the server's key.
    ServerOnly,
    /// Both ends, with reach's TLS configs and this key-exchange mode.
    Mutual(PostQuantum),
}

/// A raw quinn echo server with reach's certificate kind.
struct RawServer {
    endpoint: quinn::Endpoint,
    server_key: Keypair,
    auth: RawAuth,
}

impl RawServer {
    fn start(auth: RawAuth) -> Result<Self> {
        let server_key = Keypair::generate();
        let tls = match auth {
            RawAuth::Mutual(pq) => reach::tls::server_config_with(&server_key, pq)?,
            RawAuth::ServerOnly => reach::tls::server_config_without_client_auth(&server_key)?,
        };
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        cfg.transport_config(reach::transport::transport_config());
        let endpoint = quinn::Endpoint::server(cfg, loopback())?;
        let accepting = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let mut b = [0u8; 1];
                        if recv.read_exact(&mut b).await.is_ok() {
                            let _ = send.write_all(&b).await;
                            let _ = send.finish();
                        }
                    }
                });
            }
        });
        Ok(RawServer {
            endpoint,
            server_key,
            auth,
        })
    }

    /// One fresh client (new identity and endpoint, set up untimed), then
    /// connect, one byte there and back.
    async fn dial_once(&self) -> Result<Sample> {
        let server = self.server_key.peer_id();
        let tls = match self.auth {
            RawAuth::Mutual(pq) => {
                reach::tls::client_config_with(&Keypair::generate(), server, pq)?.0
            }
            RawAuth::ServerOnly => reach::tls::client_config_without_client_auth(server)?,
        };
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        cfg.transport_config(reach::transport::transport_config());
        let mut client = quinn::Endpoint::client(loopback())?;
        client.set_default_client_config(cfg);
        let server = self.endpoint.local_addr()?;
        let run = async {
            let started = Instant::now();
            let conn = client.connect(server, reach::tls::SERVER_NAME)?.await?;
            let handshake = started.elapsed();
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(b"x").await?;
            let mut b = [0u8; 1];
            recv.read_exact(&mut b).await?;
            let total = started.elapsed();
            anyhow::ensure!(&b == b"x", "echo mismatch");
            conn.close(0u32.into(), b"done");
            anyhow::Ok(Sample { handshake, total })
        };
        let took = tokio::time::timeout(DIAL_DEADLINE, run)
            .await
            .context("raw quinn dial timed out")??;
        client.close(0u32.into(), b"done");
        Ok(took)
    }

    fn close(&self) {
        self.endpoint.close(0u32.into(), b"done");
    }
}
