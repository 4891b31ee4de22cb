//! `reach bench relay`: direct versus relayed, in one run, on loopback.
//!
//! Three roles in this process: a relay (in its own single-threaded runtime
//! on its own OS thread, so its forwarding rate is one core's), a target
//! that holds a reservation at it, and two dialers: one connects to the
//! target directly, the other through the relay. Both measure bulk
//! throughput over one stream and the round trip of an 8-byte ping on a
//! stream, alternately, so machine noise hits both alike.
//!
//! Hole punching is off on every node: otherwise the relayed connection is
//! upgraded to a direct one right away and "relayed" measures loopback. The
//! run checks that the relay forwarded at least every relayed bulk byte and
//! that the relayed connection still goes through the relay at the end, and
//! fails otherwise.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use reach::{Event, Node, PeerId, RelayLimits, RelayMode};
use serde::Serialize;

/// Bytes of a ping.
const PING_LEN: usize = 8;
/// Stream mode bytes.
const MODE_ECHO: u8 = b'E';
const MODE_SINK: u8 = b'S';
/// Write size of the bulk sender.
const CHUNK: usize = 64 * 1024;
/// Each phase must finish within this.
const PHASE_DEADLINE: Duration = Duration::from_secs(120);

/// What `reach bench relay --json` prints.
#[derive(Debug, Serialize)]
pub struct RelayBenchReport {
    pub bulk_bytes: u64,
    pub rounds: u32,
    pub direct_mib_s: f64,
    pub relayed_mib_s: f64,
    /// relayed / direct bulk throughput (target ≥ 0.5).
    pub bulk_ratio: f64,
    pub pings: u32,
    pub direct_rtt_p50_us: u64,
    pub relayed_rtt_p50_us: u64,
    /// relayed − direct round trip p50 (target ≤ 1000 µs).
    pub rtt_overhead_p50_us: i64,
    /// Packets the relay forwarded per second during the relayed bulk
    /// transfers, on one core (its runtime is single-threaded).
    pub relay_forwarded_pps: f64,
    pub relay_forwarded_packets: u64,
    /// Bytes the relay forwarded during the relayed bulk transfers (relay
    /// framing and QUIC overhead included, both directions): at least
    /// `bulk_bytes × rounds` if they really went through it.
    pub relay_forwarded_bytes: u64,
    pub relay_dropped: u64,
    /// The relay ran without per-client rate caps (the defaults cap each
    /// client at 8 MiB/s; see `RelayLimits`).
    pub relay_rate_caps: String,
}

/// Runs the benchmark.
pub async fn relay(bulk_mib: u64, rounds: u32, pings: u32) -> Result<RelayBenchReport> {
    let bulk_bytes = bulk_mib * 1024 * 1024;
    let (relay_id, relay_addr, relay_handle) = spawn_relay_thread()?;
    let target = Node::builder()
        .bind(loopback())
        .bootstrap([relay_addr])
        .relay_service(RelayMode::Off)
        .acquire_relay(RelayMode::On)
        .hole_punching(false)
        .spawn()
        .await?;
    tokio::spawn(serve(target.clone()));
    tokio::time::timeout(PHASE_DEADLINE, async {
        while target.relay_status().held_relay != Some(relay_id) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .context("the target did not get a reservation at the relay")?;
    let direct = dialer().await?;
    let relayed = dialer().await?;
    direct
        .connect(target.peer_id(), [target.local_addr()])
        .await?;
    relayed
        .connect_via_relay(target.peer_id(), relay_id, relay_addr)
        .await?;
    anyhow::ensure!(
        relayed
            .connected_peers()
            .iter()
            .any(|p| p.peer == target.peer_id() && p.relay == Some(relay_id)),
        "the relayed dialer is not connected through the relay"
    );

    let mut direct_rates = Vec::new();
    let mut relayed_rates = Vec::new();
    let mut relayed_time = Duration::ZERO;
    let before = relay_handle.stats();
    for _ in 0..rounds {
        direct_rates.push(bulk(&direct, target.peer_id(), bulk_bytes).await?.0);
        let (rate, took) = bulk(&relayed, target.peer_id(), bulk_bytes).await?;
        relayed_rates.push(rate);
        relayed_time += took;
    }
    let after = relay_handle.stats();
    let direct_rtt = pings_p50(&direct, target.peer_id(), pings).await?;
    let relayed_rtt = pings_p50(&relayed, target.peer_id(), pings).await?;
    let forwarded = after.packets - before.packets;
    let forwarded_bytes = after.bytes - before.bytes;
    let report = RelayBenchReport {
        bulk_bytes,
        rounds,
        direct_mib_s: median(&mut direct_rates),
        relayed_mib_s: median(&mut relayed_rates),
        bulk_ratio: 0.0,
        pings,
        direct_rtt_p50_us: direct_rtt.as_micros() as u64,
        relayed_rtt_p50_us: relayed_rtt.as_micros() as u64,
        rtt_overhead_p50_us: relayed_rtt.as_micros() as i64 - direct_rtt.as_micros() as i64,
        relay_forwarded_pps: forwarded as f64 / relayed_time.as_secs_f64().max(1e-9),
        relay_forwarded_packets: forwarded,
        relay_forwarded_bytes: forwarded_bytes,
        relay_dropped: after.dropped,
        relay_rate_caps: "off".into(),
    };
    let report = RelayBenchReport {
        bulk_ratio: round2(report.relayed_mib_s / report.direct_mib_s.max(1e-9)),
        ..report
    };
    let still_relayed = relayed
        .connected_peers()
        .iter()
        .any(|p| p.peer == target.peer_id() && p.relay == Some(relay_id));
    let still_direct = direct
        .connected_peers()
        .iter()
        .any(|p| p.peer == target.peer_id() && p.relay.is_none());
    let relayed_bulk = bulk_bytes * u64::from(rounds);
    for n in [&direct, &relayed, &target] {
        n.shutdown().await;
    }
    relay_handle.stop();
    let json = serde_json::to_string(&report).unwrap_or_default();
    anyhow::ensure!(
        still_relayed && still_direct,
        "the paths changed during the run (relayed dialer still through the relay: \
         {still_relayed}, direct dialer still direct: {still_direct}): the figures do not \
         measure what they say: {json}"
    );
    anyhow::ensure!(
        report.relay_forwarded_bytes >= relayed_bulk,
        "the relay forwarded {} bytes, fewer than the {relayed_bulk} bytes sent over the \
         relayed connection: they did not all go through the relay: {json}",
        report.relay_forwarded_bytes
    );
    Ok(report)
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    round2(v.get(v.len().saturating_sub(1) / 2).copied().unwrap_or(0.0))
}

async fn dialer() -> Result<Node> {
    Ok(Node::builder()
        .bind(loopback())
        .relay_service(RelayMode::Off)
        .acquire_relay(RelayMode::Off)
        .hole_punching(false)
        .spawn()
        .await?)
}

/// What the relay forwarded and dropped.
struct RelayCounts {
    packets: u64,
    bytes: u64,
    dropped: u64,
}

/// The relay node, on its own thread with a single-threaded runtime.
struct RelayHandle {
    node: Node,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RelayHandle {
    /// The relay's forwarding counters so far.
    fn stats(&self) -> RelayCounts {
        let s = self.node.stats();
        RelayCounts {
            packets: s.relay_paths.forwarded_packets,
            bytes: s.relay_paths.forwarded_bytes,
            dropped: s.relay_paths.dropped_unknown + s.relay_paths.dropped_rate_limited,
        }
    }

    fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn spawn_relay_thread() -> Result<(PeerId, SocketAddr, RelayHandle)> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready_tx.send(Err(anyhow::anyhow!("relay runtime: {e}")));
                return;
            }
        };
        rt.block_on(async move {
            let unlimited = RelayLimits {
                bytes_per_sec: u64::MAX / 4,
                packets_per_sec: u64::MAX / 4,
                ..RelayLimits::default()
            };
            let node = Node::builder()
                .bind(loopback())
                .relay_service(RelayMode::On)
                .acquire_relay(RelayMode::Off)
                .relay_limits(unlimited)
                .hole_punching(false)
                .spawn()
                .await;
            match node {
                Ok(node) => {
                    let _ = ready_tx.send(Ok(node.clone()));
                    let _ = stop_rx.await;
                    node.shutdown().await;
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                }
            }
        });
    });
    let node = ready_rx
        .recv()
        .context("the relay thread ended before starting")??;
    Ok((
        node.peer_id(),
        node.local_addr(),
        RelayHandle {
            node,
            stop: Some(stop_tx),
            thread: Some(thread),
        },
    ))
}

/// The target: echoes pings, swallows bulk streams and acknowledges them.
async fn serve(node: Node) {
    while let Some(ev) = node.next_event().await {
        let Event::Stream(mut s) = ev else { continue };
        tokio::spawn(async move {
            let mut mode = [0u8; 1];
            if s.recv.read_exact(&mut mode).await.is_err() {
                return;
            }
            match mode[0] {
                MODE_ECHO => {
                    let mut buf = [0u8; PING_LEN];
                    while s.recv.read_exact(&mut buf).await.is_ok() {
                        if s.send.write_all(&buf).await.is_err() {
                            return;
                        }
                    }
                }
                MODE_SINK => {
                    let mut buf = vec![0u8; CHUNK];
                    while let Ok(Some(_)) = s.recv.read(&mut buf).await {}
                    let _ = s.send.write_all(b"k").await;
                    let _ = s.send.finish();
                }
                _ => {}
            }
        });
    }
}

/// Sends `bytes` on one stream; returns MiB/s and the time until the target
/// acknowledged having read everything.
async fn bulk(node: &Node, target: PeerId, bytes: u64) -> Result<(f64, Duration)> {
    let run = async {
        let mut s = node.open_stream(target).await?;
        let chunk = bytes::Bytes::from(vec![0x5a; CHUNK]);
        let started = Instant::now();
        s.send.write_all(&[MODE_SINK]).await?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            s.send.write_chunk(chunk.slice(..n)).await?;
            left -= n as u64;
        }
        s.send.finish()?;
        let mut ack = [0u8; 1];
        s.recv.read_exact(&mut ack).await?;
        let took = started.elapsed();
        anyhow::Ok((bytes as f64 / (1024.0 * 1024.0) / took.as_secs_f64(), took))
    };
    tokio::time::timeout(PHASE_DEADLINE, run)
        .await
        .context("bulk transfer timed out")?
}

/// The median round trip of `n` pings on one stream.
async fn pings_p50(node: &Node, target: PeerId, n: u32) -> Result<Duration> {
    let run = async {
        let mut s = node.open_stream(target).await?;
        s.send.write_all(&[MODE_ECHO]).await?;
        let mut times = Vec::with_capacity(n as usize);
        let mut buf = [0u8; PING_LEN];
        for i in 0..n {
            let started = Instant::now();
            s.send.write_all(&u64::from(i).to_le_bytes()).await?;
            s.recv.read_exact(&mut buf).await?;
            anyhow::ensure!(buf == u64::from(i).to_le_bytes(), "echo mismatch");
            times.push(started.elapsed());
        }
        times.sort();
        anyhow::Ok(times[times.len() / 2])
    };
    tokio::time::timeout(PHASE_DEADLINE, run)
        .await
        .context("pings timed out")?
}
