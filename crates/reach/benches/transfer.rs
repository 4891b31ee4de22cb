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
//! After criterion's report it prints one JSON line with throughputs and
//! the reach / quinn ratios, and writes it to
//! `target/criterion/transfer-ratio.json`. (What metrics and the event log
//! cost is the `observability` bench's question.)
//!
//! Run: `cargo bench -p reach --bench transfer`

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use reach::Keypair;
use tokio::runtime::Runtime;

mod common;
use common::{
    BATCH, BULK_BYTES, CHUNK, IN_FLIGHT, MESSAGE_LEN, ReachPair, criterion_dir, loopback, send_bulk,
};

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
    let rt = common::runtime();
    let reach_pair = rt.block_on(ReachPair::new(false));
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
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    let report = serde_json::json!({
        "bulk_mib_s": { "reach": bulk_reach, "quinn": bulk_quinn },
        "bulk_ratio_reach_over_quinn": ratio(bulk_reach, bulk_quinn),
        "messages_1k_per_s": { "reach": msg_reach, "quinn": msg_quinn },
        "messages_ratio_reach_over_quinn": ratio(msg_reach, msg_quinn),
        "bulk_bytes_per_iteration": BULK_BYTES,
        "messages_per_iteration": BATCH,
        "messages_in_flight": IN_FLIGHT,
    });
    println!("{report}");
    let _ = std::fs::write(
        criterion_dir().join("transfer-ratio.json"),
        report.to_string(),
    );
    rt.block_on(reach_pair.shutdown());
}

#[derive(Clone, Copy)]
enum Which {
    Reach,
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
    g.finish();
}
