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
//! - **drain (end to end)**: two real nodes in this process on loopback,
//!   data dirs in temp dirs. A commits a backlog (10,000 by default) for B
//!   while B is down; B starts and connects to A; the time until A's outbox
//!   is empty (every message acked) gives the drain rate (target ≥ 5,000
//!   msgs/s). B must have received each message once, in order.
//! - **resend**: over several trials, a message for a peer that is down
//!   has had its first attempt fail and waits for its retry; the peer starts
//!   and connects. Measured: from A's `NodeEvent::PeerConnected` for it to
//!   B receiving the message (target ≤ 1 RTT + 100 ms), p50/p99. A trial
//!   counts only if the message was still waiting for its retry timer when
//!   it arrived: the resend is the one the connection triggered.
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
/// Target of the issue: drain of a backlog once the peer is back.
const TARGET_DRAIN_MSGS_PER_S: f64 = 5_000.0;
/// Target of the issue: first resend after "reachable", on top of 1 RTT.
const TARGET_RESEND_EXTRA_MS: f64 = 100.0;
/// Concurrent enqueuers filling the end-to-end backlog (group commit makes
/// the filling quick; it is not what is measured).
const BACKLOG_ENQUEUERS: usize = 64;
/// A resend trial starts only when the message's retry is at least this far
/// off, so a resend that arrives before it was triggered by the connection.
const RESEND_MARGIN: Duration = Duration::from_millis(300);
/// Bound on every wait of the end-to-end parts.
const E2E_DEADLINE: Duration = Duration::from_secs(120);

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
    /// End-to-end drain: the backlog, the seconds from B's connect until
    /// A's outbox was empty, the rate, and what B received (distinct, and
    /// in order).
    pub drain_backlog: u32,
    pub drain_s: f64,
    pub drain_msgs_per_s: f64,
    pub drain_received_distinct: u64,
    pub drain_received_in_order: bool,
    /// Message frames A wrote during the drain (first tries and resends),
    /// and the copies B received again and only acked: a figure above the
    /// backlog is work the drain repeated.
    pub drain_frames_sent: u64,
    pub drain_receiver_duplicates: u64,
    /// From "peer reachable" to the first resend received, per trial.
    pub resend_trials: u32,
    pub resend_p50_ms: f64,
    pub resend_p99_ms: f64,
    pub resend_max_ms: f64,
    /// Round trip A↔B on this path (ping), the target's "1 RTT".
    pub rtt_ms: f64,
    pub resend_target_ms: f64,
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
    backlog: u32,
    resend_trials: u32,
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
    let r = match run(&dir, single, messages, concurrency, size).await {
        Ok(mut report) => {
            let e2e = dir.join("e2e");
            let d = delivery(&e2e, backlog, resend_trials, size).await;
            let _ = std::fs::remove_dir_all(&e2e);
            d.map(|f| {
                f.apply(&mut report);
                report
            })
        }
        Err(e) => Err(e),
    };
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
        drain_backlog: 0,
        drain_s: 0.0,
        drain_msgs_per_s: 0.0,
        drain_received_distinct: 0,
        drain_received_in_order: false,
        drain_frames_sent: 0,
        drain_receiver_duplicates: 0,
        resend_trials: 0,
        resend_p50_ms: 0.0,
        resend_p99_ms: 0.0,
        resend_max_ms: 0.0,
        rtt_ms: 0.0,
        resend_target_ms: 0.0,
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

/// What the end-to-end parts measured.
struct DeliveryFigures {
    backlog: u32,
    drain: Duration,
    received_distinct: u64,
    received_in_order: bool,
    frames_sent: u64,
    receiver_duplicates: u64,
    resend_ms: Vec<f64>,
    rtt_ms: f64,
}

impl DeliveryFigures {
    fn apply(self, r: &mut OutboxBenchReport) {
        let mut lat = self.resend_ms;
        lat.sort_by(f64::total_cmp);
        r.drain_backlog = self.backlog;
        r.drain_s = self.drain.as_secs_f64();
        r.drain_msgs_per_s = self.backlog as f64 / self.drain.as_secs_f64().max(1e-9);
        r.drain_received_distinct = self.received_distinct;
        r.drain_received_in_order = self.received_in_order;
        r.drain_frames_sent = self.frames_sent;
        r.drain_receiver_duplicates = self.receiver_duplicates;
        r.resend_trials = lat.len() as u32;
        r.resend_p50_ms = percentile(&lat, 50.0);
        r.resend_p99_ms = percentile(&lat, 99.0);
        r.resend_max_ms = lat.last().copied().unwrap_or(0.0);
        r.rtt_ms = self.rtt_ms;
        r.resend_target_ms = self.rtt_ms + TARGET_RESEND_EXTRA_MS;
        r.targets_met = r.targets_met
            && r.drain_msgs_per_s >= TARGET_DRAIN_MSGS_PER_S
            && r.resend_p99_ms <= r.resend_target_ms;
    }
}

async fn spawn_node(dir: &Path) -> Result<reach::Node> {
    std::fs::create_dir_all(dir)?;
    Ok(reach::Node::builder()
        .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .data_dir(dir)
        .spawn()
        .await?)
}

/// Polls `cond` every few ms until it holds, for at most [`E2E_DEADLINE`].
async fn until(what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let end = Instant::now() + E2E_DEADLINE;
    while !cond() {
        ensure!(Instant::now() < end, "{what}: not within {E2E_DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> Result<T> {
    tokio::time::timeout(E2E_DEADLINE, f)
        .await
        .map_err(|_| anyhow::anyhow!("{what}: not within {E2E_DEADLINE:?}"))
}

/// A peer that is down: its identity exists (in `dir`), its node does not
/// run yet.
fn absent_peer(dir: &Path) -> Result<PeerId> {
    std::fs::create_dir_all(dir)?;
    Ok(reach::keystore::load_or_create(dir)?.0.peer_id())
}

/// B's application: takes `n` durable messages, marks each done (in tasks
/// of their own, so the marks share commits), returns their seqs and when
/// the first arrived.
fn receive(b: reach::Node, n: usize) -> tokio::task::JoinHandle<Result<(Vec<u64>, Instant)>> {
    tokio::spawn(async move {
        let mut seqs = Vec::with_capacity(n);
        let mut first = None;
        let mut done = tokio::task::JoinSet::new();
        while seqs.len() < n {
            match b.next_event().await {
                Some(reach::Event::Durable(m)) => {
                    first.get_or_insert_with(Instant::now);
                    seqs.push(m.seq);
                    let b = b.clone();
                    done.spawn(async move { b.durable_done(&m).await });
                }
                Some(_) => {}
                None => break,
            }
        }
        while let Some(r) = done.join_next().await {
            r??;
        }
        Ok((seqs, first.context("nothing received")?))
    })
}

/// The end-to-end parts: the drain of a backlog and the resend trials.
async fn delivery(root: &Path, backlog: u32, trials: u32, size: usize) -> Result<DeliveryFigures> {
    let a = spawn_node(&root.join("a")).await?;
    let (a_id, a_addr) = (a.peer_id(), a.local_addr());

    // The drain: A's backlog for B, committed while B is down.
    let b_dir = root.join("b-drain");
    let b_id = absent_peer(&b_dir)?;
    let payload = vec![0x5Au8; size];
    let mut fill = tokio::task::JoinSet::new();
    let per = (backlog as usize).div_ceil(BACKLOG_ENQUEUERS);
    for t in 0..BACKLOG_ENQUEUERS {
        let n = per.min((backlog as usize).saturating_sub(t * per));
        let (a, payload) = (a.clone(), payload.clone());
        fill.spawn(async move {
            for _ in 0..n {
                a.send_durable(b_id, payload.clone(), Delivery::Critical, None)
                    .await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = fill.join_next().await {
        r??;
    }
    ensure!(
        a.outbox().len() == backlog as usize,
        "A holds {} of the {backlog} backlog",
        a.outbox().len()
    );
    // Every message has had its try (B is down) and waits for its retry.
    until("the backlog's first attempts", || {
        a.outbox()
            .iter()
            .all(|p| p.attempts >= 1 && p.next_try.is_some())
    })
    .await?;
    let b = spawn_node(&b_dir).await?;
    let app = receive(b.clone(), backlog as usize);
    let sent_before = a.stats().outbox.sent;
    let start = Instant::now();
    bounded("B connects to A", b.connect(a_id, [a_addr])).await??;
    // The gauge, not the list: polling must not slow down what it measures.
    until("A's outbox empties", || a.stats().outbox.pending == 0).await?;
    let drain = start.elapsed();
    let frames_sent = a.stats().outbox.sent - sent_before;
    let receiver_duplicates = b.stats().outbox.duplicates;
    let (seqs, _) = bounded("B's application", app).await???;
    let distinct: std::collections::BTreeSet<u64> = seqs.iter().copied().collect();
    let in_order = seqs.windows(2).all(|w| w[0] < w[1]);
    ensure!(
        distinct.len() == backlog as usize && seqs.len() == backlog as usize,
        "B received {} messages, {} distinct, of {backlog}",
        seqs.len(),
        distinct.len()
    );
    let rtt_ms = a
        .connected_peers()
        .iter()
        .find(|p| p.peer == b_id)
        .map(|p| p.rtt_ms as f64)
        .unwrap_or(0.0);
    b.shutdown().await;

    // The resend: per trial a fresh peer that is down, one message waiting
    // for its retry, then the peer connects.
    let mut resend_ms = Vec::new();
    for t in 0..trials {
        let b_dir = root.join(format!("b-resend-{t}"));
        let b_id = absent_peer(&b_dir)?;
        a.send_durable(b_id, format!("resend {t}"), Delivery::Critical, None)
            .await?;
        let waiting = |a: &reach::Node| {
            a.outbox()
                .iter()
                .find(|p| p.peer == b_id)
                .and_then(|p| p.next_try.filter(|_| p.attempts >= 1))
        };
        until("the first attempt fails", || {
            waiting(&a).is_some_and(|n| n > RESEND_MARGIN)
        })
        .await?;
        let retry_at = Instant::now() + waiting(&a).unwrap_or_default();
        let mut bus = a.subscribe();
        let connected = tokio::spawn(async move {
            loop {
                match bus.next().await {
                    Some(reach::NodeEvent::PeerConnected { peer, .. }) if peer == b_id => {
                        return Some(Instant::now());
                    }
                    Some(_) => {}
                    None => return None,
                }
            }
        });
        let b = spawn_node(&b_dir).await?;
        let app = receive(b.clone(), 1);
        bounded("B connects to A", b.connect(a_id, [a_addr])).await??;
        let (_, got) = bounded("the resend", app).await???;
        let reachable = bounded("A's PeerConnected", connected)
            .await??
            .context("A's event bus closed")?;
        ensure!(
            got < retry_at,
            "trial {t}: the message came by its retry timer, not by the connection"
        );
        resend_ms.push(ms(got.saturating_duration_since(reachable)));
        until("A's outbox empties", || a.stats().outbox.pending == 0).await?;
        b.shutdown().await;
    }
    a.shutdown().await;
    Ok(DeliveryFigures {
        backlog,
        drain,
        received_distinct: distinct.len() as u64,
        received_in_order: in_order,
        frames_sent,
        receiver_duplicates,
        resend_ms,
        rtt_ms,
    })
}
