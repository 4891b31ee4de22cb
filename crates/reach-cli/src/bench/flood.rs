//! `reach bench flood`: a handshake flood and an identity churn against a
//! real `reach node` process, on loopback, while an honest peer keeps
//! sending.
//!
//! The target is this very binary run as `reach node` on a fresh data dir,
//! in its own process, so the RSS read from `/proc/<pid>/status` is the
//! target's alone. It runs with the default connection limits, except that
//! loopback sources are limited like any others (`limit_loopback`), so the
//! per-IP limit is visible here: the flooder dials from 127.0.0.1, the
//! honest peer from 127.0.1.1 (another /24).
//!
//! 1. The honest peer connects, sends [`WARMUP_MESSAGES`] so its
//!    connection's state is at steady state before the baseline RSS is
//!    read, then sends a numbered message every [`HONEST_INTERVAL`] until
//!    the end; the target prints each one, and the time from send to
//!    printed line is its latency.
//! 2. Flood: `handshakes` raw QUIC dials, each with a fresh identity, as
//!    fast as this process can make them ([`FLOOD_IN_FLIGHT`] at once);
//!    accepted connections are held open, silent, until the flood ends.
//! 3. Churn: `churn` fresh identities that connect and close at once.
//! 4. The target's RSS before, at peak (VmHWM) and after; its counters
//!    from the control API.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use reach::{Keypair, Node, PeerId, RelayMode};
use serde::Serialize;

/// The honest peer sends one message this often.
const HONEST_INTERVAL: Duration = Duration::from_millis(20);
/// Flood dials in flight at once: enough to keep the target's handshake
/// path saturated from one process.
const FLOOD_IN_FLIGHT: usize = 256;
/// Churn dials in flight at once (each closes right after its handshake).
const CHURN_IN_FLIGHT: usize = 16;
/// Quinn client endpoints the flood spreads over (each has one driver
/// task: more of them use both cores).
const FLOOD_ENDPOINTS: usize = 4;
/// A single dial gives up after this.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Every phase must finish within this.
const PHASE_DEADLINE: Duration = Duration::from_secs(300);
/// After the flood, how long the target gets to settle before its final
/// RSS is read (closing connections, QUIC's drain period of 3 PTOs).
const SETTLE: Duration = Duration::from_secs(3);
/// The flooder's source address and the honest peer's (another /24).
const FLOOD_IP: &str = "127.0.0.1";
const HONEST_IP: &str = "127.0.1.1";
/// Marker of the honest peer's messages in the target's output.
const MARK: &str = "flood-bench-honest-";
/// Messages the honest peer sends before the baseline is read, so the
/// baseline includes its connection at steady state. A connection's state
/// grows with the streams it has carried up to two bounds: quinn keeps one
/// receive-stream state for each of the [`reach::transport::MAX_CONCURRENT_UNI_STREAMS`]
/// stream slots it has used (about 370 bytes each, reused afterwards), and
/// the target remembers the ids of four times as many messages per sender
/// (`messaging::dedup::IDS_PER_PEER`). Measured: without this warm-up,
/// those ~1,000 stream states were allocated one by one while the flood
/// ran, scattered among its short-lived allocations, and each pinned a heap
/// page after the flood's memory was freed: about 2.5 MiB of the final
/// RSS (walking the target's heaps: ~2,000 live chunks of those two sizes
/// among the freed flood memory), from 0.4 MiB of live data that the
/// honest connection would have grown to with or without a flood.
const WARMUP_MESSAGES: u64 = 4 * reach::transport::MAX_CONCURRENT_UNI_STREAMS as u64 + 64;
/// Warm-up messages in flight at once.
const WARMUP_IN_FLIGHT: usize = 64;
/// Marker of the warm-up messages (not counted as honest messages).
const WARMUP_MARK: &str = "flood-bench-warmup-";

/// Targets the report is checked against.
pub const TARGET_PEAK_RSS_MIB: f64 = 256.0;
pub const TARGET_FINAL_RSS_GROWTH: f64 = 0.20;
pub const TARGET_P99_MS: f64 = 1000.0;

/// What `reach bench flood --json` prints.
#[derive(Debug, Serialize)]
pub struct FloodBenchReport {
    pub handshakes: u64,
    pub handshakes_accepted: u64,
    /// Refused by the target's limits (QUIC CONNECTION_REFUSED).
    pub handshakes_refused: u64,
    /// Neither: timed out or failed otherwise.
    pub handshakes_failed: u64,
    pub flood_s: f64,
    /// Dials per second the flooder made.
    pub flood_rate_per_s: f64,
    pub churn: u64,
    pub churn_accepted: u64,
    pub churn_refused: u64,
    pub churn_failed: u64,
    pub churn_s: f64,
    /// Messages the honest peer sent before `target_rss_before_mib` was
    /// read (see `WARMUP_MESSAGES`): the baseline is the target with its
    /// honest connection at steady state.
    pub warmup_messages: u64,
    pub target_rss_before_mib: f64,
    /// The target's VmHWM: its peak RSS over its whole life.
    pub target_peak_rss_mib: f64,
    pub target_final_rss_mib: f64,
    /// final / before − 1.
    pub target_final_rss_growth: f64,
    /// The RSS split: anonymous memory (what the node allocated) and file
    /// pages (the binary's code as far as it has run), before and after.
    pub target_anon_before_mib: f64,
    pub target_anon_final_mib: f64,
    pub target_file_before_mib: f64,
    pub target_file_final_mib: f64,
    /// The target's own counters after the run.
    pub target_inbound_refused: u64,
    pub target_silent_connections_closed: u64,
    pub target_peers_evicted: u64,
    pub target_peer_table_size: u64,
    pub target_inbound_connections_after: u64,
    pub honest_sent: u64,
    /// Of those, sent while the flood or the churn ran.
    pub honest_sent_under_flood: u64,
    pub honest_delivered: u64,
    pub honest_delivery_rate: f64,
    pub honest_p50_ms: f64,
    pub honest_p99_ms: f64,
    pub honest_max_ms: f64,
    /// The target's per-IP limit (default limits, loopback limited too).
    pub per_ip_limit: usize,
    pub targets_met: bool,
}

/// The target process; killed and its data dir removed when dropped.
struct Target {
    child: Child,
    dir: PathBuf,
    pid: u32,
    peer: PeerId,
    addr: SocketAddr,
    /// Receive times of the honest peer's messages, by number.
    received: Arc<Mutex<HashMap<u64, Instant>>>,
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts `reach node` on a fresh data dir and waits for its id and port.
fn start_target() -> Result<Target> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir =
        std::env::temp_dir().join(format!("reach-bench-flood-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let config = dir.join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"{FLOOD_IP}:0\"\napi_listen = \"127.0.0.1:0\"\nrelay = \"off\"\n\
             acquire_relay = \"off\"\nhole_punching = false\n\
             [connection_limits]\nlimit_loopback = true\n"
        ),
    )?;
    let exe = std::env::current_exe().context("finding the reach binary")?;
    let mut child = Command::new(exe)
        .arg("node")
        .arg("--data-dir")
        .arg(&dir)
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the target `reach node`")?;
    let pid = child.id();
    let stdout = child.stdout.take().context("target stdout")?;
    let received: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    {
        let received = received.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(i) = line.find(MARK) {
                    let digits: String = line[i + MARK.len()..]
                        .chars()
                        .take_while(|c| c.is_ascii_digit())
                        .collect();
                    if let Ok(n) = digits.parse::<u64>()
                        && let Ok(mut r) = received.lock()
                    {
                        r.entry(n).or_insert_with(Instant::now);
                    }
                } else if tx.send(line).is_err() {
                    // Startup lines only; nobody listens afterwards.
                }
            }
        });
    }
    let mut target = Target {
        child,
        dir,
        pid,
        peer: Keypair::generate().peer_id(),
        addr: "127.0.0.1:0".parse()?,
        received,
    };
    (target.peer, target.addr) = super::node_identity(&rx, PHASE_DEADLINE, "the target")?;
    Ok(target)
}

/// The target's memory in MiB, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy)]
struct Mem {
    rss: f64,
    peak: f64,
    /// Of `rss`: anonymous memory (heap, stacks), what the node holds.
    anon: f64,
    /// Of `rss`: pages of files, i.e. the binary's code and data as far as
    /// it has run (shared, clean, reclaimable).
    file: f64,
}

fn mem(pid: u32) -> Result<Mem> {
    let (rss, peak, anon, file) = rss_mib(pid)?;
    Ok(Mem {
        rss,
        peak,
        anon,
        file,
    })
}

/// The target's VmRSS, VmHWM, RssAnon and RssFile in MiB.
fn rss_mib(pid: u32) -> Result<(f64, f64, f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context("reading the target's /proc status")?;
    let field = |name: &str| -> Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kib: f64 = line
            .split_whitespace()
            .nth(1)
            .context("malformed /proc status line")?
            .parse()?;
        Ok(kib / 1024.0)
    };
    Ok((
        field("VmRSS:")?,
        field("VmHWM:")?,
        field("RssAnon:")?,
        field("RssFile:")?,
    ))
}

#[derive(Default)]
struct Tally {
    accepted: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
}

impl Tally {
    fn count(&self, r: &Result<quinn::Connection, DialError>) {
        let c = match r {
            Ok(_) => &self.accepted,
            Err(DialError::Refused) => &self.refused,
            Err(DialError::Other) => &self.failed,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

enum DialError {
    Refused,
    Other,
}

/// One raw QUIC dial to the target with a fresh identity.
async fn dial_fresh(
    ep: &quinn::Endpoint,
    target: PeerId,
    addr: SocketAddr,
) -> Result<quinn::Connection, DialError> {
    let kp = Keypair::generate();
    let (tls, _) = reach::tls::client_config(&kp, target).map_err(|_| DialError::Other)?;
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|_| DialError::Other)?;
    let cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let connecting = ep
        .connect_with(cfg, addr, reach::tls::SERVER_NAME)
        .map_err(|_| DialError::Other)?;
    match tokio::time::timeout(DIAL_TIMEOUT, connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(quinn::ConnectionError::ConnectionClosed(close)))
            if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            Err(DialError::Refused)
        }
        _ => Err(DialError::Other),
    }
}

/// `n` dials from `endpoints`, `in_flight` at once; `hold` keeps the
/// accepted connections open (returned), otherwise each is closed at once.
async fn dial_many(
    endpoints: &[quinn::Endpoint],
    target: &Target,
    n: u64,
    in_flight: usize,
    hold: bool,
    tally: &Tally,
) -> Vec<quinn::Connection> {
    use futures::StreamExt;
    let (peer, addr) = (target.peer, target.addr);
    futures::stream::iter(0..n)
        .map(|i| {
            let ep = endpoints[i as usize % endpoints.len()].clone();
            async move {
                let r = dial_fresh(&ep, peer, addr).await;
                tally.count(&r);
                match r {
                    Ok(c) if hold => Some(c),
                    Ok(c) => {
                        c.close(0u32.into(), b"bye");
                        None
                    }
                    Err(_) => None,
                }
            }
        })
        .buffer_unordered(in_flight)
        .filter_map(|c| async move { c })
        .collect()
        .await
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs the benchmark.
pub async fn flood(handshakes: u64, churn: u64) -> Result<FloodBenchReport> {
    let target = start_target()?;
    let honest = Node::builder()
        .bind(format!("{HONEST_IP}:0").parse()?)
        .relay_service(RelayMode::Off)
        .acquire_relay(RelayMode::Off)
        .hole_punching(false)
        .spawn()
        .await
        .context("starting the honest peer")?;
    tokio::time::timeout(PHASE_DEADLINE, honest.connect(target.peer, [target.addr]))
        .await
        .context("the honest peer could not connect in time")??;

    // Warm up the honest connection to its steady state (see
    // WARMUP_MESSAGES), then the baseline below is fair to it.
    {
        use futures::StreamExt;
        let to = target.peer;
        let failed = tokio::time::timeout(
            PHASE_DEADLINE,
            futures::stream::iter(0..WARMUP_MESSAGES)
                .map(|n| {
                    let honest = honest.clone();
                    async move {
                        honest
                            .send(to, format!("{WARMUP_MARK}{n}").into_bytes())
                            .await
                            .is_err()
                    }
                })
                .buffer_unordered(WARMUP_IN_FLIGHT)
                .filter(|failed| futures::future::ready(*failed))
                .count(),
        )
        .await
        .context("the warm-up did not finish in time")?;
        anyhow::ensure!(failed == 0, "{failed} warm-up messages failed");
    }

    // The honest sender runs through every phase.
    let sent: Arc<Mutex<Vec<(Instant, bool)>>> = Arc::default();
    let flooding = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let (honest, sent, flooding, stop) =
            (honest.clone(), sent.clone(), flooding.clone(), stop.clone());
        let to = target.peer;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HONEST_INTERVAL);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let n = {
                    let Ok(mut s) = sent.lock() else { break };
                    s.push((Instant::now(), flooding.load(Ordering::Relaxed)));
                    s.len() as u64 - 1
                };
                // Each send on its own task: a slow one must not delay
                // the next (latency is measured per message).
                let honest = honest.clone();
                tokio::spawn(async move {
                    let _ = honest.send(to, format!("{MARK}{n}").into_bytes()).await;
                });
            }
        })
    };
    // Warm up, then the baseline.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = mem(target.pid)?;
    let rss_before = before.rss;

    let mut endpoints = Vec::new();
    for _ in 0..FLOOD_ENDPOINTS {
        endpoints.push(
            quinn::Endpoint::client(format!("{FLOOD_IP}:0").parse()?)
                .context("binding a flood endpoint")?,
        );
    }
    flooding.store(true, Ordering::Relaxed);
    let flood_tally = Tally::default();
    let t0 = Instant::now();
    let held = tokio::time::timeout(
        PHASE_DEADLINE,
        dial_many(
            &endpoints,
            &target,
            handshakes,
            FLOOD_IN_FLIGHT,
            true,
            &flood_tally,
        ),
    )
    .await
    .context("the flood did not finish in time")?;
    let flood_s = t0.elapsed().as_secs_f64();
    for c in &held {
        c.close(0u32.into(), b"bye");
    }
    drop(held);

    let churn_tally = Tally::default();
    let t1 = Instant::now();
    tokio::time::timeout(
        PHASE_DEADLINE,
        dial_many(
            &endpoints,
            &target,
            churn,
            CHURN_IN_FLIGHT,
            false,
            &churn_tally,
        ),
    )
    .await
    .context("the churn did not finish in time")?;
    let churn_s = t1.elapsed().as_secs_f64();
    flooding.store(false, Ordering::Relaxed);
    for ep in &endpoints {
        ep.close(0u32.into(), b"done");
    }
    for ep in &endpoints {
        let _ = tokio::time::timeout(SETTLE, ep.wait_idle()).await;
    }
    drop(endpoints);

    // Let the target settle, the honest messages drain, then measure.
    tokio::time::sleep(SETTLE).await;
    stop.store(true, Ordering::Relaxed);
    let _ = sender.await;
    let sent = sent.lock().map(|s| s.clone()).unwrap_or_default();
    let drain_end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < drain_end
        && target.received.lock().map(|r| r.len()).unwrap_or(0) < sent.len()
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = mem(target.pid)?;
    let (rss_after, rss_peak) = (after.rss, after.peak);
    let stats = target_stats(&target.dir).await?;
    honest.shutdown().await;

    let received = target
        .received
        .lock()
        .map(|r| r.clone())
        .unwrap_or_default();
    let mut lat: Vec<f64> = sent
        .iter()
        .enumerate()
        .filter_map(|(n, (at, _))| {
            let got = received.get(&(n as u64))?;
            Some(got.saturating_duration_since(*at).as_secs_f64() * 1000.0)
        })
        .collect();
    lat.sort_by(f64::total_cmp);
    let honest_sent = sent.len() as u64;
    let honest_delivered = lat.len() as u64;
    let under_flood = sent.iter().filter(|(_, f)| *f).count() as u64;
    anyhow::ensure!(
        under_flood > 0,
        "the honest peer sent nothing while the flood ran: the flood was too short to measure"
    );
    let delivery = honest_delivered as f64 / honest_sent.max(1) as f64;
    let growth = rss_after / rss_before - 1.0;
    let p99 = percentile(&lat, 0.99);
    let report = FloodBenchReport {
        handshakes,
        handshakes_accepted: flood_tally.accepted.load(Ordering::Relaxed),
        handshakes_refused: flood_tally.refused.load(Ordering::Relaxed),
        handshakes_failed: flood_tally.failed.load(Ordering::Relaxed),
        flood_s,
        flood_rate_per_s: handshakes as f64 / flood_s.max(1e-9),
        churn,
        churn_accepted: churn_tally.accepted.load(Ordering::Relaxed),
        churn_refused: churn_tally.refused.load(Ordering::Relaxed),
        churn_failed: churn_tally.failed.load(Ordering::Relaxed),
        churn_s,
        warmup_messages: WARMUP_MESSAGES,
        target_rss_before_mib: rss_before,
        target_peak_rss_mib: rss_peak,
        target_final_rss_mib: rss_after,
        target_final_rss_growth: growth,
        target_anon_before_mib: before.anon,
        target_anon_final_mib: after.anon,
        target_file_before_mib: before.file,
        target_file_final_mib: after.file,
        target_inbound_refused: stat(&stats, "inbound_refused"),
        target_silent_connections_closed: stat(&stats, "silent_connections_closed"),
        target_peers_evicted: stat(&stats, "peers_evicted"),
        target_peer_table_size: stat(&stats, "peer_table_size"),
        target_inbound_connections_after: stat(&stats, "inbound_connections"),
        honest_sent,
        honest_sent_under_flood: under_flood,
        honest_delivered,
        honest_delivery_rate: delivery,
        honest_p50_ms: percentile(&lat, 0.50),
        honest_p99_ms: p99,
        honest_max_ms: lat.last().copied().unwrap_or(0.0),
        per_ip_limit: reach::ConnectionLimits::default().max_per_ip,
        targets_met: rss_peak <= TARGET_PEAK_RSS_MIB
            && growth <= TARGET_FINAL_RSS_GROWTH
            && honest_delivered == honest_sent
            && p99 <= TARGET_P99_MS,
    };
    Ok(report)
}

/// The target's `/v1/stats`, through its control API.
async fn target_stats(dir: &std::path::Path) -> Result<serde_json::Value> {
    let client = reach::api::client::ApiClient::from_data_dir(dir)
        .context("reaching the target's control API")?;
    Ok(client.get("/v1/stats").await?)
}

fn stat(v: &serde_json::Value, name: &str) -> u64 {
    v.get(name).and_then(|x| x.as_u64()).unwrap_or(0)
}
