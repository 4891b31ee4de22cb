//! `reach bench outbox`: the durable outbox's store on this machine's disk.
//!
//! - **single**: one enqueue at a time, each awaited: enqueue-to-durable
//!   latency when nothing shares the fsync (target p99 ≤ 5 ms).
//! - **concurrent**: many enqueuers at once: throughput with group commit
//!   (target ≥ 10,000 critical messages/s), with the requests per commit
//!   that show the fsyncs being shared.
//! - **drain (store side)**: for every message of the backlog, what a
//!   sender's drain does to the store once the peer is back: poll what is
//!   due, count the attempt (durable), read the payload, delete it on the ack
//!   (durable). No network: this is the store's ceiling for the drain rate,
//!   not the end-to-end figure (that needs the node's resend path).
//!
//! It checks what it measures: after the run the outbox is reopened and must
//! hold exactly the messages enqueued and not drained, none quarantined; the
//! drain must have offered every backlog message once.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use reach::outbox::{Due, Outbox};
use reach::{Keypair, PeerId};
use reach_proto::outbox::Delivery;
use serde::Serialize;

/// Target of the issue: p99 of one enqueue until durable.
const TARGET_SINGLE_P99_MS: f64 = 5.0;
/// Target of the issue: critical messages per second with group commit.
const TARGET_MSGS_PER_S: f64 = 10_000.0;
/// Destinations the concurrent enqueuers spread over (a node sends to
/// several peers; per-destination quotas must not be what limits the run).
const DESTINATIONS: u8 = 8;

/// What `reach bench outbox --json` prints.
#[derive(Debug, Serialize)]
pub struct OutboxBenchReport {
    /// Where the file was, and its filesystem (fsync cost depends on it).
    pub dir: String,
    pub filesystem: String,
    pub payload_bytes: usize,
    pub single_messages: u32,
    pub single_p50_ms: f64,
    pub single_p99_ms: f64,
    pub single_max_ms: f64,
    pub concurrent_messages: u32,
    pub concurrency: u32,
    pub concurrent_msgs_per_s: f64,
    pub concurrent_p50_ms: f64,
    pub concurrent_p99_ms: f64,
    /// Enqueues per write transaction (one fsync each) in the concurrent
    /// run: group commit at work.
    pub concurrent_requests_per_commit: f64,
    /// Opening the file with both runs' messages on it (decrypting every
    /// entry, rebuilding the schedule).
    pub reopen_backlog_ms: f64,
    /// Store-side drain of the concurrent run's backlog: attempt + read +
    /// ack per message.
    pub drain_messages: u32,
    pub drain_store_msgs_per_s: f64,
    /// Checked after reopening: messages on disk, and rows quarantined.
    pub on_disk_after: usize,
    pub expected_on_disk_after: usize,
    pub quarantined: u64,
    pub file_bytes: u64,
    pub targets_met: bool,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The filesystem type `path` is on, from /proc/self/mountinfo (the mount
/// point that is the longest prefix of it); "unknown" elsewhere.
fn filesystem_of(path: &Path) -> String {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return "unknown".into();
    };
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mut best: Option<(usize, String)> = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(mount), Some(fstype)) = (fields.get(4), fields.get(sep + 1)) else {
            continue;
        };
        if path.starts_with(mount) && best.as_ref().is_none_or(|(n, _)| mount.len() >= *n) {
            best = Some((mount.len(), fstype.to_string()));
        }
    }
    best.map(|(_, f)| f).unwrap_or_else(|| "unknown".into())
}

fn peer(n: u8) -> PeerId {
    Keypair::from_secret_bytes([n.wrapping_add(1); 32]).peer_id()
}

/// Runs the benchmark in `dir` (a fresh directory under the system temp
/// dir if `None`, removed afterwards).
pub async fn outbox(
    single: u32,
    messages: u32,
    concurrency: u32,
    size: usize,
    dir: Option<PathBuf>,
) -> Result<OutboxBenchReport> {
    let (dir, remove) = match dir {
        Some(d) => (d, false),
        None => {
            let d = std::env::temp_dir().join(format!(
                "reach-bench-outbox-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            ));
            (d, true)
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let r = run(&dir, single, messages, concurrency, size).await;
    if remove {
        let _ = std::fs::remove_dir_all(&dir);
    }
    r
}

async fn run(
    dir: &Path,
    single: u32,
    messages: u32,
    concurrency: u32,
    size: usize,
) -> Result<OutboxBenchReport> {
    let key = Keypair::generate();
    let file = dir.join(reach::outbox::OUTBOX_FILE);
    ensure!(
        !file.exists(),
        "{} exists already: pass an empty --dir",
        file.display()
    );
    let ob = Arc::new(Outbox::open(dir, &key).await?);
    let payload = vec![0x5Au8; size];

    // One at a time.
    let mut lat = Vec::with_capacity(single as usize);
    for i in 0..single {
        let t = Instant::now();
        ob.enqueue(
            peer((i % DESTINATIONS as u32) as u8),
            payload.clone(),
            Delivery::Critical,
            None,
        )
        .await?;
        lat.push(ms(t.elapsed()));
    }
    lat.sort_by(f64::total_cmp);

    // Many at once.
    let commits_before = ob.commits();
    let per_task = messages.div_ceil(concurrency.max(1));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..concurrency {
        let ob = ob.clone();
        let payload = payload.clone();
        let n = per_task.min(messages.saturating_sub(task * per_task));
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(n as usize);
            let dest = peer((task % DESTINATIONS as u32) as u8);
            for _ in 0..n {
                let t = Instant::now();
                ob.enqueue(dest, payload.clone(), Delivery::Critical, None)
                    .await?;
                lat.push(ms(t.elapsed()));
            }
            anyhow::Ok(lat)
        }));
    }
    let mut conc_lat = Vec::with_capacity(messages as usize);
    for t in tasks {
        conc_lat.extend(t.await??);
    }
    let elapsed = start.elapsed();
    let commits = (ob.commits() - commits_before).max(1);
    ensure!(
        conc_lat.len() == messages as usize,
        "the concurrent run enqueued {} of {messages}",
        conc_lat.len()
    );
    conc_lat.sort_by(f64::total_cmp);

    // Reopen with the whole backlog on disk: what a restart costs.
    drop(ob);
    let reopen_start = Instant::now();
    let ob = Arc::new(Outbox::open(dir, &key).await?);
    let reopen = reopen_start.elapsed();
    ensure!(
        ob.pending().len() == (single + messages) as usize,
        "reopened with {} of {} messages",
        ob.pending().len(),
        single + messages
    );

    // Drain the concurrent run's messages (the single run's stay).
    let single_ids: HashSet<u64> = ob
        .pending()
        .iter()
        .take(single as usize)
        .map(|p| p.id.0)
        .collect();
    for d in 0..DESTINATIONS {
        ob.on_reachable(peer(d));
    }
    let drain_start = Instant::now();
    let due = ob.poll_due().await?;
    let backlog: Vec<_> = due
        .into_iter()
        .filter_map(|d| match d {
            Due::Send { id, .. } if !single_ids.contains(&id.0) => Some(id),
            _ => None,
        })
        .collect();
    ensure!(
        backlog.len() == messages as usize,
        "the drain was offered {} of {messages} backlog messages",
        backlog.len()
    );
    let chunks: Vec<Vec<_>> = backlog
        .chunks(backlog.len().div_ceil(concurrency.max(1) as usize).max(1))
        .map(|c| c.to_vec())
        .collect();
    let mut tasks = Vec::new();
    for chunk in chunks {
        let ob = ob.clone();
        tasks.push(tokio::spawn(async move {
            for id in chunk {
                ensure!(ob.record_attempt(id).await?, "{id} vanished");
                let out = ob.read(id).await?.context("a due message is unreadable")?;
                ensure!(out.data.len() == size, "payload of {id} changed");
                ensure!(ob.ack(id).await?, "{id} acked twice");
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let drain_elapsed = drain_start.elapsed();

    // Check: what is on disk after reopening.
    drop(ob);
    let file_bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    let ob = Outbox::open(dir, &key).await?;
    let on_disk_after = ob.pending().len();
    let quarantined = ob.quarantined();
    ob.close().await;

    let single_p99 = percentile(&lat, 99.0);
    let rate = messages as f64 / elapsed.as_secs_f64();
    let expected = single as usize;
    let report = OutboxBenchReport {
        dir: dir.display().to_string(),
        filesystem: filesystem_of(dir),
        payload_bytes: size,
        single_messages: single,
        single_p50_ms: percentile(&lat, 50.0),
        single_p99_ms: single_p99,
        single_max_ms: lat.last().copied().unwrap_or(0.0),
        concurrent_messages: messages,
        concurrency,
        concurrent_msgs_per_s: rate,
        concurrent_p50_ms: percentile(&conc_lat, 50.0),
        concurrent_p99_ms: percentile(&conc_lat, 99.0),
        concurrent_requests_per_commit: messages as f64 / commits as f64,
        reopen_backlog_ms: ms(reopen),
        drain_messages: messages,
        drain_store_msgs_per_s: messages as f64 / drain_elapsed.as_secs_f64(),
        on_disk_after,
        expected_on_disk_after: expected,
        quarantined,
        file_bytes,
        targets_met: single_p99 <= TARGET_SINGLE_P99_MS
            && rate >= TARGET_MSGS_PER_S
            && on_disk_after == expected
            && quarantined == 0,
    };
    ensure!(
        report.on_disk_after == expected && quarantined == 0,
        "after reopening, {} messages on disk (expected {expected}), {quarantined} quarantined",
        report.on_disk_after
    );
    Ok(report)
}
