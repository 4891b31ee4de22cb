//! Direct transfer between two reach nodes on loopback, with a raw-quinn
//! baseline measured in the same run.
//!
//! The baseline uses quinn on a plain UDP socket with the *same* TLS
//! (Ed25519 identities) and transport settings, so the ratio isolates what
//! reach's own layer costs: the demultiplexing socket, the envelope, the
//! event queue.
//!
//! - `bulk/*`: one stream, [`BULK_BYTES`] per iteration, receiver drains it.
//! - `messages/*`: [`BATCH`] messages of [`MESSAGE_LEN`] bytes per iteration,
//!   [`IN_FLIGHT`] at a time, each a whole reliable message (one QUIC
//!   unidirectional stream, acknowledged before it counts).
//!
//! - `*/reach_event_log`: the same with each node's event log on (a data
//!   dir, as every `reach node` has): the cost of the event log, with the
//!   metrics (always on) in both reach variants.
//!
//! After criterion's report it prints one JSON line with throughputs, the
//! reach / quinn ratios and the event log on / off ratios, and writes it to
//! `target/criterion/transfer-ratio.json`.
//!
//! Run: `cargo bench -p reach --bench transfer`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use reach::{Event, Keypair, Node};
use tokio::runtime::Runtime;

/// Bytes per bulk iteration.
const BULK_BYTES: usize = 64 * 1024 * 1024;
/// Size of one write in the bulk test.
const CHUNK: usize = 64 * 1024;
/// Messages per `messages` iteration.
const BATCH: usize = 2_000;
/// Message size.
const MESSAGE_LEN: usize = 1024;
/// Messages in flight at once.
const IN_FLIGHT: usize = 64;

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

struct ReachPair {
    a: Node,
    b: Node,
    /// With `logged`: the nodes' data dirs, where their event logs go.
    dirs: Option<(tempfile::TempDir, tempfile::TempDir)>,
}

impl ReachPair {
    /// Two nodes; `logged`: each with a data dir, so each writes its event
    /// log (`events.jsonl`) as a `reach node` does.
    async fn new(logged: bool) -> Self {
        let dirs = logged.then(|| (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()));
        let node = |dir: Option<&tempfile::TempDir>| {
            let mut b = Node::builder().bind(loopback());
            if let Some(d) = dir {
                b = b.data_dir(d.path());
            }
            b.spawn()
        };
        let a = node(dirs.as_ref().map(|d| &d.0)).await.unwrap();
        let b = node(dirs.as_ref().map(|d| &d.1)).await.unwrap();
        a.connect(b.peer_id(), [b.local_addr()]).await.unwrap();
        // B drains every stream and message it gets.
        let bb = b.clone();
        tokio::spawn(async move {
            while let Some(ev) = bb.next_event().await {
                if let Event::Stream(mut s) = ev {
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; CHUNK];
                        while let Ok(Some(_)) = s.recv.read(&mut buf).await {}
                        let _ = s.send.finish();
                        let _ = s.send.stopped().await;
                    });
                }
            }
        });
        ReachPair { a, b, dirs }
    }

    /// Lines in A's event log (0 without one).
    fn logged_lines(&self) -> usize {
        self.dirs.as_ref().map_or(0, |(a, _)| {
            std::fs::read_to_string(a.path().join("events.jsonl")).map_or(0, |t| t.lines().count())
        })
    }

    async fn bulk(&self) {
        let mut s = self.a.open_stream(self.b.peer_id()).await.unwrap();
        send_bulk(&mut s.send).await;
        // Wait until B has read everything and closed its side.
        s.recv.read_to_end(0).await.unwrap();
    }

    async fn messages(&self) {
        let payload = bytes::Bytes::from(vec![7u8; MESSAGE_LEN]);
        let to = self.b.peer_id();
        let mut inflight: FuturesUnordered<_> = FuturesUnordered::new();
        for _ in 0..BATCH {
            if inflight.len() >= IN_FLIGHT {
                let r: reach::Result<()> = inflight.next().await.unwrap();
                r.unwrap();
            }
            inflight.push(self.a.send(to, payload.clone()));
        }
        while let Some(r) = inflight.next().await {
            r.unwrap();
        }
    }
}

async fn send_bulk(send: &mut quinn::SendStream) {
    let chunk = bytes::Bytes::from(vec![0x5Au8; CHUNK]);
    for _ in 0..BULK_BYTES / CHUNK {
        send.write_chunk(chunk.clone()).await.unwrap();
    }
    send.finish().unwrap();
}

/// Plain quinn with reach's TLS and transport settings.
struct QuinnPair {
    conn: quinn::Connection,
    _server: quinn::Endpoint,
    _client: quinn::Endpoint,
}

impl QuinnPair {
    async fn new() -> Self {
        let server_kp = Keypair::generate();
        let client_kp = Keypair::generate();
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(
            reach::tls::server_config(&server_kp).unwrap(),
        )
        .unwrap();
        let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server_cfg.transport_config(reach::transport::transport_config());
        let server = quinn::Endpoint::server(server_cfg, loopback()).unwrap();
        let server_addr = server.local_addr().unwrap();
        let srv = server.clone();
        tokio::spawn(async move {
            while let Some(incoming) = srv.accept().await {
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    let c2 = conn.clone();
                    tokio::spawn(async move {
                        while let Ok(mut r) = c2.accept_uni().await {
                            tokio::spawn(async move {
                                let _ = r.read_to_end(MESSAGE_LEN + 64).await;
                            });
                        }
                    });
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; CHUNK];
                            while let Ok(Some(_)) = recv.read(&mut buf).await {}
                            let _ = send.finish();
                            let _ = send.stopped().await;
                        });
                    }
                });
            }
        });
        let (client_tls, _) = reach::tls::client_config(&client_kp, server_kp.peer_id()).unwrap();
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).unwrap();
        let mut client_cfg = quinn::ClientConfig::new(Arc::new(crypto));
        client_cfg.transport_config(reach::transport::transport_config());
        let client = quinn::Endpoint::client(loopback()).unwrap();
        let conn = client
            .connect_with(client_cfg, server_addr, reach::tls::SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        QuinnPair {
            conn,
            _server: server,
            _client: client,
        }
    }

    async fn bulk(&self) {
        let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
        send_bulk(&mut send).await;
        recv.read_to_end(0).await.unwrap();
    }

    async fn messages(&self) {
        let payload = bytes::Bytes::from(vec![7u8; MESSAGE_LEN]);
        let mut inflight = FuturesUnordered::new();
        let one = || {
            let conn = self.conn.clone();
            let payload = payload.clone();
            async move {
                let mut s = conn.open_uni().await?;
                s.write_chunk(payload).await?;
                s.finish()?;
                s.stopped().await?;
                let ok: anyhow_free::Result = Ok(());
                ok
            }
        };
        for _ in 0..BATCH {
            if inflight.len() >= IN_FLIGHT {
                let r: anyhow_free::Result = inflight.next().await.unwrap();
                r.unwrap();
            }
            inflight.push(one());
        }
        while let Some(r) = inflight.next().await {
            r.unwrap();
        }
    }
}

/// A boxed error type without pulling anyhow into the library's dev-deps.
mod anyhow_free {
    pub type Result = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

fn criterion_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"))
        .join("criterion")
}

/// Mean time per iteration in seconds, from criterion's saved estimates.
fn mean_secs(group: &str, id: &str) -> Option<f64> {
    let path = criterion_dir()
        .join(group)
        .join(id)
        .join("new/estimates.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    Some(v["mean"]["point_estimate"].as_f64()? / 1e9)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let reach_pair = rt.block_on(ReachPair::new(false));
    let logged_pair = rt.block_on(ReachPair::new(true));
    let quinn_pair = rt.block_on(QuinnPair::new());
    let mut c = Criterion::default()
        .output_directory(&criterion_dir())
        .configure_from_args();

    bench_group(
        &mut c,
        &rt,
        "bulk",
        Throughput::Bytes(BULK_BYTES as u64),
        10,
        |rt, which| match which {
            Which::Reach => rt.block_on(reach_pair.bulk()),
            Which::ReachLogged => rt.block_on(logged_pair.bulk()),
            Which::Quinn => rt.block_on(quinn_pair.bulk()),
        },
    );
    bench_group(
        &mut c,
        &rt,
        "messages",
        Throughput::Elements(BATCH as u64),
        20,
        |rt, which| match which {
            Which::Reach => rt.block_on(reach_pair.messages()),
            Which::ReachLogged => rt.block_on(logged_pair.messages()),
            Which::Quinn => rt.block_on(quinn_pair.messages()),
        },
    );
    c.final_summary();

    let mib = |secs: Option<f64>| secs.map(|s| BULK_BYTES as f64 / (1024.0 * 1024.0) / s);
    let per_sec = |secs: Option<f64>| secs.map(|s| BATCH as f64 / s);
    let bulk_reach = mib(mean_secs("bulk", "reach"));
    let bulk_quinn = mib(mean_secs("bulk", "quinn"));
    let msg_reach = per_sec(mean_secs("messages", "reach"));
    let msg_quinn = per_sec(mean_secs("messages", "quinn"));
    let bulk_logged = mib(mean_secs("bulk", "reach_event_log"));
    let msg_logged = per_sec(mean_secs("messages", "reach_event_log"));
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    // The logged pair must really have written its event log.
    let log_lines = logged_pair.logged_lines();
    assert!(log_lines > 0, "the event-log pair wrote no event log");
    let report = serde_json::json!({
        "bulk_mib_s": { "reach": bulk_reach, "quinn": bulk_quinn },
        "bulk_ratio_reach_over_quinn": ratio(bulk_reach, bulk_quinn),
        "messages_1k_per_s": { "reach": msg_reach, "quinn": msg_quinn },
        "messages_ratio_reach_over_quinn": ratio(msg_reach, msg_quinn),
        "event_log_on": {
            "bulk_mib_s": bulk_logged,
            "messages_1k_per_s": msg_logged,
            "bulk_ratio_on_over_off": ratio(bulk_logged, bulk_reach),
            "messages_ratio_on_over_off": ratio(msg_logged, msg_reach),
            "event_log_lines": log_lines,
        },
        "bulk_bytes_per_iteration": BULK_BYTES,
        "messages_per_iteration": BATCH,
        "messages_in_flight": IN_FLIGHT,
    });
    println!("{report}");
    let _ = std::fs::write(
        criterion_dir().join("transfer-ratio.json"),
        report.to_string(),
    );
    rt.block_on(async {
        reach_pair.a.shutdown().await;
        reach_pair.b.shutdown().await;
        logged_pair.a.shutdown().await;
        logged_pair.b.shutdown().await;
    });
}

#[derive(Clone, Copy)]
enum Which {
    Reach,
    /// Reach with the event log on (nodes with a data dir).
    ReachLogged,
    Quinn,
}

fn bench_group(
    c: &mut Criterion,
    rt: &Runtime,
    name: &str,
    throughput: Throughput,
    samples: usize,
    mut run: impl FnMut(&Runtime, Which),
) {
    let mut g = c.benchmark_group(name);
    g.throughput(throughput)
        .sample_size(samples)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8));
    // Interleave: the machine's noise hits both sides alike.
    g.bench_function("quinn", |b| b.iter(|| run(rt, Which::Quinn)));
    g.bench_function("reach", |b| b.iter(|| run(rt, Which::Reach)));
    g.bench_function("reach_event_log", |b| {
        b.iter(|| run(rt, Which::ReachLogged))
    });
    g.finish();
}
