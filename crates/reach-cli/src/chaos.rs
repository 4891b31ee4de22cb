//! `reach chaos outbox`: durable messages through kill -9, with real
//! `reach node` daemons on loopback.
//!
//! Two daemons, A and B, each on its own data dir and a fixed loopback port
//! (so a restarted node is where its peer remembers it). A's control API
//! commits critical durable messages for B, one at a time, numbered in the
//! payload (`chaos 000001`, …). Meanwhile B is stopped (SIGTERM) and
//! killed (SIGKILL) at random, A is killed at random, each restarted on its
//! data dir. The harness reads B's `--json` stdout as the application does:
//! a `durable_message` line is the message handed over.
//!
//! At the end (every send A acknowledged delivered and A's outbox empty for
//! B, within a deadline) it checks: nothing acknowledged was lost, nothing
//! was handed over twice, the order (B's `seq` and the payload numbers) was
//! kept. The delivery contract allows one thing to come again: a message B
//! printed just before it died and had not marked done yet comes again,
//! with the same `seq`, first thing after the restart. Only the tail of
//! what the previous B printed, and only before anything new, counts as
//! such a redelivery; anything else is a duplicate.
//!
//! Then, with both nodes up and left alone, moderate messages to a peer id
//! that never exists must be given up after exactly their attempts: seen in
//! A's outbox with `attempts` = N, never more, then gone, with an
//! `outbox_abandoned` line (reason `attempts`) in A's event log.
//!
//! Loopback only: durable delivery is end to end over whatever path the two
//! peers have (direct, relayed, punched); which path that is, the NAT lab's
//! tests cover. What this checks is what happens to the messages when the
//! processes die, which a NAT in between does not change.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use reach::api::client::ApiClient;
use reach::api::{OutboxResponse, SendResponse};
use reach::{Keypair, PeerId};
use serde::Serialize;

/// How long a node may take from spawn to its control API line: a debug
/// build on a loaded machine opens its stores and binds in well under this.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a SIGTERM'd node may take to shut down gracefully before it is
/// killed (counted as a kill then).
const TERM_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause between two chaos actions, at random within this range: short
/// enough that kills land mid-send and mid-drain, long enough that the
/// nodes get some work done in between.
const PAUSE_MS: (u64, u64) = (50, 600);
/// How long a node stays down at most after a kill or stop, at random
/// below this: B's downtime makes A's backlog grow.
const DOWNTIME_MS: u64 = 1200;
/// Poll interval of A's outbox in the end phase and the moderate check:
/// well below the first retry delay (1 s), so an attempt count is seen.
const POLL: Duration = Duration::from_millis(50);

/// What to run.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// Critical messages A's API must acknowledge.
    pub messages: u32,
    /// SIGKILLs (of A and B together) at least.
    pub kills: u32,
    /// Seed of the chaos schedule (which node, which signal, when).
    pub seed: u64,
    /// Sends per second at most (0: as fast as A's API answers), to spread
    /// a small run's sends over its kills.
    pub rate: u32,
    /// Moderate messages to a peer id that never exists.
    pub moderate_to_nowhere: u32,
    /// Attempts of those moderate messages.
    pub attempts: u32,
    /// Bound on the end phase (delivery of what is left, then the moderate
    /// check).
    pub deadline: Duration,
}

/// What `reach chaos outbox --json` prints.
#[derive(Debug, Default, Serialize)]
pub struct ChaosReport {
    pub seed: u64,
    pub messages: u32,
    /// Sends per second at most (0: unpaced).
    pub rate: u32,
    /// Sends A's API acknowledged (committed to its outbox).
    pub sent: u64,
    /// Sends whose answer was cut off by a kill of A: maybe committed,
    /// maybe not. Such a message may be delivered (once) or not.
    pub unconfirmed_sends: u64,
    pub unconfirmed_delivered: u64,
    /// Distinct messages B handed over.
    pub delivered: u64,
    /// Acknowledged but never handed over.
    pub lost: u64,
    /// Handed over again outside the contract.
    pub duplicates: u64,
    /// A message handed over after one with a higher `seq` or payload
    /// number.
    pub order_violations: u64,
    /// Lines B printed that are not a well-formed message of this run
    /// (another peer, a payload never sent, a `seq` with another payload).
    pub malformed: u64,
    /// Handed over again by a restarted B right after a SIGKILL of B: the
    /// tail of what it printed before, first thing after the restart (the
    /// delivery contract).
    pub redelivered_after_kill: u64,
    /// The same after a SIGTERM of B (a graceful stop can end the daemon
    /// between printing a message and marking it done).
    pub redelivered_after_term: u64,
    /// Longest run of redelivered messages after one restart.
    pub redelivered_max_run: u64,
    pub kills: u32,
    pub kills_a: u32,
    pub kills_b: u32,
    /// Graceful stops of B (SIGTERM), not counted as kills.
    pub stops_b: u32,
    /// Seconds until A's API acknowledged every message.
    pub send_s: f64,
    /// The last chaos action (`kill_b`, `stop_b`, `kill_a`) and what A
    /// still held for B then.
    pub last_action: String,
    pub pending_after_chaos: u64,
    /// Seconds from the last chaos action until everything was delivered
    /// and A's outbox held nothing for B.
    pub drain_after_chaos_s: f64,
    pub wall_s: f64,
    pub moderate: ModerateReport,
    /// Every check held.
    pub ok: bool,
    /// What failed, if anything.
    pub failures: Vec<String>,
}

/// The moderate messages to a peer id that never exists.
#[derive(Debug, Default, Serialize)]
pub struct ModerateReport {
    pub messages: u32,
    pub attempts: u32,
    /// Seen in A's outbox with exactly `attempts` attempts.
    pub seen_at_attempts: u32,
    /// Highest attempt count seen for any of them.
    pub max_attempts_seen: u32,
    /// Gone from A's outbox.
    pub gone: u32,
    /// `outbox_abandoned` lines with reason `attempts` in A's event log.
    pub abandoned_logged: u32,
    pub abandon_s: f64,
}

/// A small deterministic generator (splitmix64): the schedule follows from
/// the seed alone, no crate needed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// How a B process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Kill,
    Term,
}

/// The application's view of B's output: every durable message line, in
/// order, per B process ("instance").
#[derive(Default)]
struct Checker {
    sender: String,
    /// seq → payload number, first hand-over.
    by_seq: HashMap<u64, u64>,
    delivered: BTreeSet<u64>,
    max_seq: u64,
    max_payload: u64,
    cur_instance: u32,
    cur_prints: Vec<u64>,
    /// Whether the current instance printed a message not printed before.
    cur_fresh: bool,
    /// Position in `prev_prints` of the current instance's last redelivery.
    cur_redelivered: Option<usize>,
    cur_run: u64,
    /// What the last instance that printed anything printed, and how it
    /// ended.
    prev_prints: Vec<u64>,
    prev_stop: Option<Stop>,
    /// How each instance ended (set before the next one starts).
    stops: HashMap<u32, Stop>,
    duplicates: u64,
    order_violations: u64,
    malformed: u64,
    redelivered_after_kill: u64,
    redelivered_after_term: u64,
    redelivered_max_run: u64,
    /// Highest payload number the sender has tried so far.
    highest_tried: u64,
}

impl Checker {
    fn line(&mut self, instance: u32, line: &str) {
        if instance != self.cur_instance {
            if !self.cur_prints.is_empty() {
                self.prev_prints = std::mem::take(&mut self.cur_prints);
                self.prev_stop = self.stops.get(&self.cur_instance).copied();
            }
            self.cur_instance = instance;
            self.cur_fresh = false;
            self.cur_redelivered = None;
            self.cur_run = 0;
        }
        if !line.starts_with('{') {
            return;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            self.malformed += 1;
            return;
        };
        if v["event"] != "durable_message" {
            return;
        }
        let payload = v["text"]
            .as_str()
            .and_then(|t| t.strip_prefix("chaos "))
            .and_then(|n| n.parse::<u64>().ok());
        let (Some(seq), Some(payload)) = (v["seq"].as_u64(), payload) else {
            self.malformed += 1;
            return;
        };
        if v["peer"] != self.sender.as_str() || payload == 0 || payload > self.highest_tried {
            self.malformed += 1;
            return;
        }
        if let Some(&first) = self.by_seq.get(&seq) {
            if first != payload {
                self.malformed += 1;
                return;
            }
            let pos = self.prev_prints.iter().position(|&s| s == seq);
            let allowed =
                !self.cur_fresh && pos.is_some_and(|p| self.cur_redelivered.is_none_or(|r| p > r));
            if allowed {
                self.cur_redelivered = pos;
                self.cur_run += 1;
                self.redelivered_max_run = self.redelivered_max_run.max(self.cur_run);
                match self.prev_stop {
                    Some(Stop::Term) => self.redelivered_after_term += 1,
                    _ => self.redelivered_after_kill += 1,
                }
            } else {
                self.duplicates += 1;
            }
            self.cur_prints.push(seq);
            return;
        }
        if seq <= self.max_seq || payload <= self.max_payload {
            self.order_violations += 1;
        }
        self.max_seq = self.max_seq.max(seq);
        self.max_payload = self.max_payload.max(payload);
        self.by_seq.insert(seq, payload);
        self.delivered.insert(payload);
        self.cur_fresh = true;
        self.cur_prints.push(seq);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One `reach node` daemon, restarted on the same data dir and port.
struct Daemon {
    name: &'static str,
    dir: PathBuf,
    listen: SocketAddr,
    bootstrap: SocketAddr,
    child: Option<Child>,
    reader: Option<std::thread::JoinHandle<()>>,
    instance: u32,
    /// B's lines go to the checker; A's are only read for its API address.
    checker: Option<Arc<Mutex<Checker>>>,
}

impl Daemon {
    /// Starts the daemon and waits for its control API; returns a client.
    fn start(&mut self) -> Result<ApiClient> {
        self.instance += 1;
        let exe = std::env::current_exe().context("finding the reach binary")?;
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("chaos-stderr.log"))?;
        let mut child = Command::new(exe)
            .args(["node", "--json", "--data-dir"])
            .arg(&self.dir)
            .args(["--listen", &self.listen.to_string()])
            .args(["--api-listen", "127.0.0.1:0"])
            .args(["--bootstrap", &self.bootstrap.to_string()])
            .args(["--relay", "off", "--acquire-relay", "off"])
            .args(["--no-port-mapping", "--no-hole-punching"])
            .env_remove("REACH_DATA_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        let stdout = child.stdout.take().context("stdout")?;
        let (api_tx, api_rx) = std::sync::mpsc::channel();
        let checker = self.checker.clone();
        let instance = self.instance;
        self.reader = Some(std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("control API http://") {
                    let addr = rest.split_whitespace().next().unwrap_or_default();
                    let _ = api_tx.send(addr.to_string());
                }
                if let Some(c) = &checker {
                    lock(c).line(instance, &line);
                }
            }
        }));
        self.child = Some(child);
        let addr = api_rx
            .recv_timeout(START_TIMEOUT)
            .with_context(|| format!("{} did not serve its control API", self.name))?;
        let addr: SocketAddr = addr.parse().context("the control API address")?;
        let token = std::fs::read_to_string(self.dir.join(reach::api::TOKEN_FILE))
            .context("reading the API token")?;
        Ok(ApiClient::new(addr, token.trim().to_string()))
    }

    /// Stops the daemon (SIGKILL, or SIGTERM with a bounded wait) and waits
    /// until its output is read to the end. Returns how it ended.
    fn stop(&mut self, how: Stop) -> Result<Stop> {
        let Some(mut child) = self.child.take() else {
            return Ok(how);
        };
        let mut ended = how;
        match how {
            Stop::Kill => child.kill()?,
            Stop::Term => {
                Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status()
                    .context("running kill -TERM")?;
                let end = Instant::now() + TERM_TIMEOUT;
                while child.try_wait()?.is_none() {
                    if Instant::now() > end {
                        child.kill()?;
                        ended = Stop::Kill;
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        child.wait()?;
        if let Some(c) = &self.checker {
            lock(c).stops.insert(self.instance, ended);
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        Ok(ended)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A free UDP port on loopback (bound, then released for the node).
fn free_udp_port() -> Result<SocketAddr> {
    let s = UdpSocket::bind("127.0.0.1:0")?;
    Ok(s.local_addr()?)
}

/// Runs the chaos in fresh temp dirs (removed afterwards).
pub async fn outbox(opts: ChaosOptions) -> Result<ChaosReport> {
    let root = std::env::temp_dir().join(format!(
        "reach-chaos-outbox-{}-{}",
        std::process::id(),
        opts.seed
    ));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    let r = run(&root, opts).await;
    if r.as_ref().is_ok_and(|r| r.ok) {
        let _ = std::fs::remove_dir_all(&root);
    } else {
        eprintln!("kept the nodes' data dirs for a look: {}", root.display());
    }
    r
}

async fn run(root: &Path, opts: ChaosOptions) -> Result<ChaosReport> {
    let start = Instant::now();
    let (a_dir, b_dir) = (root.join("a"), root.join("b"));
    std::fs::create_dir_all(&a_dir)?;
    std::fs::create_dir_all(&b_dir)?;
    let a_id = reach::keystore::load_or_create(&a_dir)?.0.peer_id();
    let b_id = reach::keystore::load_or_create(&b_dir)?.0.peer_id();
    let (a_addr, b_addr) = (free_udp_port()?, free_udp_port()?);
    let checker = Arc::new(Mutex::new(Checker {
        sender: a_id.to_string(),
        ..Default::default()
    }));
    let mut a = Daemon {
        name: "A",
        dir: a_dir.clone(),
        listen: a_addr,
        bootstrap: b_addr,
        child: None,
        reader: None,
        instance: 0,
        checker: None,
    };
    let mut b = Daemon {
        name: "B",
        dir: b_dir,
        listen: b_addr,
        bootstrap: a_addr,
        child: None,
        reader: None,
        instance: 0,
        checker: Some(checker.clone()),
    };
    let a_api = Arc::new(Mutex::new(Some(a.start()?)));
    b.start()?;

    // The sender: one message at a time through A's API, numbered.
    let acked = Arc::new(Mutex::new(BTreeSet::<u64>::new()));
    let unconfirmed = Arc::new(Mutex::new(BTreeSet::<u64>::new()));
    let sender = {
        let (a_api, acked, unconfirmed, checker) = (
            a_api.clone(),
            acked.clone(),
            unconfirmed.clone(),
            checker.clone(),
        );
        let path = format!("/v1/send?peer={b_id}&durable=critical");
        let n = opts.messages as usize;
        let gap = match opts.rate {
            0 => Duration::ZERO,
            r => Duration::from_secs(1) / r,
        };
        tokio::spawn(async move {
            let mut next = 1u64;
            while lock(&acked).len() < n {
                tokio::time::sleep(gap).await;
                let Some(client) = lock(&a_api).clone() else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                lock(&checker).highest_tried = next;
                let body = format!("chaos {next:06}").into_bytes();
                match client.post_bytes::<SendResponse>(&path, body).await {
                    Ok(r) if r.durable_id.is_some() => lock(&acked).insert(next),
                    // Cut off by a kill of A (or refused while it starts):
                    // maybe committed. The next message gets a new number.
                    _ => lock(&unconfirmed).insert(next),
                };
                next += 1;
            }
            start.elapsed()
        })
    };

    // The chaos: until enough kills and the sender is done.
    let mut rng = Rng(opts.seed);
    let mut report = ChaosReport {
        seed: opts.seed,
        messages: opts.messages,
        rate: opts.rate,
        ..Default::default()
    };
    let chaos = {
        let mut step = |report: &mut ChaosReport| -> Result<()> {
            std::thread::sleep(Duration::from_millis(rng.range(PAUSE_MS.0, PAUSE_MS.1)));
            let down = Duration::from_millis(rng.range(0, DOWNTIME_MS));
            match rng.range(0, 9) {
                0..=3 => {
                    report.last_action = "kill_b".into();
                    if b.stop(Stop::Kill)? == Stop::Kill {
                        report.kills_b += 1;
                    }
                    std::thread::sleep(down);
                    b.start()?;
                }
                4..=5 => {
                    report.last_action = "stop_b".into();
                    match b.stop(Stop::Term)? {
                        Stop::Term => report.stops_b += 1,
                        Stop::Kill => report.kills_b += 1,
                    }
                    std::thread::sleep(down);
                    b.start()?;
                }
                _ => {
                    report.last_action = "kill_a".into();
                    *lock(&a_api) = None;
                    a.stop(Stop::Kill)?;
                    report.kills_a += 1;
                    std::thread::sleep(down / 4);
                    *lock(&a_api) = Some(a.start()?);
                }
            }
            Ok(())
        };
        let mut result = Ok(());
        while report.kills_a + report.kills_b < opts.kills || !sender.is_finished() {
            if start.elapsed() > opts.deadline * 4 {
                result = Err(anyhow::anyhow!("the chaos phase ran past its bound"));
                break;
            }
            if let Err(e) = tokio::task::block_in_place(|| step(&mut report)) {
                result = Err(e);
                break;
            }
        }
        result
    };
    report.kills = report.kills_a + report.kills_b;
    chaos?;
    let send_elapsed = sender.await.context("the sender task")?;
    report.send_s = send_elapsed.as_secs_f64();
    let chaos_end = Instant::now();
    let client = lock(&a_api).clone().context("A's API")?;

    // Both up: everything acknowledged must arrive, A's outbox must empty.
    let end = Instant::now() + opts.deadline;
    let mut failures = Vec::new();
    let mut first_poll = true;
    loop {
        let all = {
            let c = lock(&checker);
            lock(&acked).iter().all(|p| c.delivered.contains(p))
        };
        let pending: OutboxResponse = client.get("/v1/outbox").await?;
        let left = pending.pending.iter().filter(|e| e.peer == b_id).count();
        if first_poll {
            report.pending_after_chaos = left as u64;
            first_poll = false;
        }
        if all && left == 0 {
            break;
        }
        if Instant::now() > end {
            failures.push(format!(
                "not everything delivered within {:?}: {left} pending at A",
                opts.deadline
            ));
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    report.drain_after_chaos_s = chaos_end.elapsed().as_secs_f64();

    // Moderate messages to nobody, with the nodes left alone.
    if opts.moderate_to_nowhere > 0 {
        report.moderate = moderate(&client, &a_dir, &opts, &mut failures).await?;
    }

    a.stop(Stop::Term)?;
    b.stop(Stop::Term)?;
    let c = lock(&checker);
    let acked = lock(&acked);
    let unconfirmed = lock(&unconfirmed);
    report.sent = acked.len() as u64;
    report.unconfirmed_sends = unconfirmed.len() as u64;
    report.unconfirmed_delivered = unconfirmed
        .iter()
        .filter(|p| c.delivered.contains(p))
        .count() as u64;
    report.delivered = c.delivered.len() as u64;
    report.lost = acked.iter().filter(|p| !c.delivered.contains(p)).count() as u64;
    report.duplicates = c.duplicates;
    report.order_violations = c.order_violations;
    report.malformed = c.malformed;
    report.redelivered_after_kill = c.redelivered_after_kill;
    report.redelivered_after_term = c.redelivered_after_term;
    report.redelivered_max_run = c.redelivered_max_run;
    report.wall_s = start.elapsed().as_secs_f64();
    for (what, n) in [
        ("lost", report.lost),
        ("duplicates", report.duplicates),
        ("order_violations", report.order_violations),
        ("malformed", report.malformed),
    ] {
        if n > 0 {
            failures.push(format!("{what}: {n}"));
        }
    }
    if report.sent < opts.messages as u64 {
        failures.push(format!("A acknowledged {} sends", report.sent));
    }
    if report.kills < opts.kills {
        failures.push(format!("{} kills", report.kills));
    }
    report.ok = failures.is_empty();
    report.failures = failures;
    Ok(report)
}

/// Moderate messages to a peer id nobody has: each must be seen with
/// exactly its attempts, never more, then be gone and logged abandoned.
async fn moderate(
    client: &ApiClient,
    a_dir: &Path,
    opts: &ChaosOptions,
    failures: &mut Vec<String>,
) -> Result<ModerateReport> {
    // A peer id from the seed: no node of this run has its key.
    let mut rng = Rng(opts.seed ^ 0x006E_6F77_6865_7265);
    let mut secret = [0u8; 32];
    for chunk in secret.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next().to_le_bytes());
    }
    let nowhere: PeerId = Keypair::from_secret_bytes(secret).peer_id();
    let start = Instant::now();
    let path = format!(
        "/v1/send?peer={nowhere}&durable=moderate&attempts={}",
        opts.attempts
    );
    let mut ids = BTreeSet::new();
    for i in 0..opts.moderate_to_nowhere {
        let r: SendResponse = client
            .post_bytes(&path, format!("to nowhere {i}").into_bytes())
            .await?;
        ids.insert(r.durable_id.context("no durable id")?);
    }
    let mut max_seen: HashMap<u64, u32> = HashMap::new();
    let end = Instant::now() + opts.deadline;
    let still = loop {
        let pending: OutboxResponse = client.get("/v1/outbox").await?;
        let mut left = 0;
        for e in pending.pending.iter().filter(|e| ids.contains(&e.id)) {
            left += 1;
            let m = max_seen.entry(e.id).or_default();
            *m = (*m).max(e.attempts);
        }
        if left == 0 {
            break 0;
        }
        if Instant::now() > end {
            failures.push(format!("{left} moderate messages still pending"));
            break left;
        }
        tokio::time::sleep(POLL).await;
    };
    let abandon_s = start.elapsed().as_secs_f64();
    // The event log is written by a task of its own: wait for the lines.
    let logged = loop {
        let text = std::fs::read_to_string(reach::eventlog::log_path(a_dir)).unwrap_or_default();
        let n = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| {
                v["kind"] == "outbox_abandoned"
                    && v["reason"] == "attempts"
                    && v["peer"] == nowhere.to_string().as_str()
                    && v["id"].as_u64().is_some_and(|id| ids.contains(&id))
            })
            .count() as u32;
        if n >= opts.moderate_to_nowhere || Instant::now() > end {
            break n;
        }
        tokio::time::sleep(POLL).await;
    };
    let r = ModerateReport {
        messages: opts.moderate_to_nowhere,
        attempts: opts.attempts,
        seen_at_attempts: max_seen.values().filter(|&&n| n == opts.attempts).count() as u32,
        max_attempts_seen: max_seen.values().copied().max().unwrap_or(0),
        gone: opts.moderate_to_nowhere - still,
        abandoned_logged: logged,
        abandon_s,
    };
    if r.seen_at_attempts != r.messages || r.max_attempts_seen > opts.attempts {
        failures.push(format!(
            "moderate: {} of {} seen at {} attempts, max {}",
            r.seen_at_attempts, r.messages, opts.attempts, r.max_attempts_seen
        ));
    }
    if r.abandoned_logged != r.messages {
        failures.push(format!(
            "moderate: {} of {} abandonments logged",
            r.abandoned_logged, r.messages
        ));
    }
    if abandon_s > opts.deadline.as_secs_f64() {
        bail!("the moderate check ran past its deadline");
    }
    Ok(r)
}
