//! The flood part of `reach bench topics`: does a 10× flood on one topic
//! slow another topic of the same home?
//!
//! Three processes, so that what is shared is the home and nothing else:
//!
//! - the **home**: a `reach node` (default topic limits: 500 msg/s per
//!   topic, 100 per publisher);
//! - the **flooders**: [`FLOODERS`] members of the home in a process of
//!   their own (`reach bench topics-flooder`, hidden), each subscribed to
//!   the loud topic and, while told to flood, offering publishes paced so
//!   that together they offer [`FLOOD_FACTOR`] times the loud topic's rate
//!   limit, without waiting for answers ([`FLOOD_IN_FLIGHT`] at once);
//!   the home refuses what is over the limit with a typed error and reads
//!   a refused publisher no faster than its limit, so the rest is held
//!   back at the flooders (reported: offered, sent, refused);
//! - this process: a publisher and a subscriber of the quiet topic, timing
//!   one message at a time from publish to arrival.
//!
//! The quiet topic is timed in [`ROUNDS`] rounds, each once alone and once
//! with the flood on, so a change in the machine's load over the run falls
//! on both; the p99 of all flooded samples is compared with the p99 of all
//! quiet ones (target: within +10%).
//!
//! On a machine with two CPUs or more the home runs on the first CPU of
//! this process's set, and this process (the quiet members) on the others.
//! The flooders run on the home's CPU with idle scheduling (`chrt
//! --idle`): they get only what the home leaves, and a waking home takes
//! the CPU from them at once, so the home's isolation is what is measured,
//! not whether the flooders' own signing and verifying (which would run on
//! their own machines) steal the quiet members' CPU. (With the flooders on
//! the quiet members' CPU instead, even at idle priority, the quiet p99
//! rose ×2–3 while the home's own CPU went from 0.02 to 0.05 of a core.) The
//! report says whether it was pinned.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use reach::{Node, PeerId, Subscription, TopicLimits};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::topics::{HomeProcess, member_at, members_seen, next_message, percentile, pinned_reach};

/// Members flooding the loud topic.
pub const FLOODERS: usize = 4;
/// The flood offers this many times the loud topic's rate limit.
pub const FLOOD_FACTOR: u64 = 10;
/// Publishes one flooder keeps in flight at most: a flooding application
/// calls `publish` again without waiting for the last answer, up to what a
/// member keeps in flight per topic anyway.
const FLOOD_IN_FLIGHT: usize = reach::topics::PUBLISH_WINDOW;
/// Alternations of "quiet alone" and "quiet under the flood".
const ROUNDS: u32 = 5;
/// After the flood is switched on, how long before timing starts (the
/// flooders reach their pace and the home its steady refusing).
const RAMP: Duration = Duration::from_millis(300);
/// Gap between two timed quiet messages: under the default per-publisher
/// limit (100/s).
const QUIET_GAP: Duration = Duration::from_millis(12);
/// Bound on every wait for the flooder process (its setup included).
const DEADLINE: Duration = Duration::from_secs(60);
const QUIET: &str = "bench-quiet";
const LOUD: &str = "bench-loud";
/// Payload of every message (the 100 bytes).
const PAYLOAD: usize = 100;

/// What the flood run measured.
#[derive(Debug)]
pub struct FloodRun {
    /// p99 of the quiet topic alone, ms.
    pub alone_p99_ms: f64,
    /// p99 of the quiet topic while the loud one is flooded, ms.
    pub flooded_p99_ms: f64,
    /// Publishes the flooders' pace offered per second while flooding.
    pub offered_per_s: f64,
    /// Of them, per second, the ones handed to `Node::publish`.
    pub sent_per_s: f64,
    /// Of them, refused by the home.
    pub refused: u64,
    /// Whether the home had a CPU of its own.
    pub pinned: bool,
    /// Cores the home used while the quiet topic was timed alone, and
    /// while flooded: what the flood costs the home.
    pub home_cores_alone: f64,
    pub home_cores_flooded: f64,
}

/// CPU seconds and wall seconds spent in one condition.
#[derive(Debug, Default)]
struct Spent {
    cpu_s: f64,
    wall_s: f64,
}

impl Spent {
    fn cores(&self) -> f64 {
        (self.cpu_s / self.wall_s.max(1e-3) * 1000.0).round() / 1000.0
    }
}

/// What the flooder process prints when its stdin closes.
#[derive(Debug, Serialize, Deserialize)]
struct FlooderTotals {
    /// Publishes the flooders' pace offered.
    offered: u64,
    /// Of them, handed to `Node::publish` (at most [`FLOOD_IN_FLIGHT`]
    /// per flooder at once: the others were held back by the home's
    /// backpressure).
    sent: u64,
    /// Publishes refused (by the home, or the node's own window).
    refused: u64,
    flooding_s: f64,
}

/// The CPUs of this process, if it may use two or more, `taskset` can say
/// which (`taskset -c -p`: "pid N's current affinity list: 0,1") and
/// `chrt` is there to run the flooders idle (both util-linux); `None`
/// otherwise (the run is then not pinned, and says so).
fn own_cpus() -> Option<Vec<String>> {
    let chrt = std::process::Command::new("chrt")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !chrt.is_ok_and(|s| s.success()) {
        return None;
    }
    let out = std::process::Command::new("taskset")
        .args(["-c", "-p", &std::process::id().to_string()])
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let list = text.rsplit_once(':')?.1.trim().to_string();
    let cpus: Vec<String> = list
        .split(',')
        .flat_map(|part| match part.split_once('-') {
            Some((a, b)) => match (a.parse::<u32>(), b.parse::<u32>()) {
                (Ok(a), Ok(b)) => (a..=b).map(|c| c.to_string()).collect(),
                _ => Vec::new(),
            },
            None => vec![part.to_string()],
        })
        .collect();
    (out.status.success() && cpus.len() >= 2).then_some(cpus)
}

/// Moves every thread of this process to `cpus` (`taskset -c` list).
fn pin_self(cpus: &str) -> Result<()> {
    let status = std::process::Command::new("taskset")
        .args(["-a", "-c", "-p", cpus, &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status()
        .context("running taskset")?;
    ensure!(
        status.success(),
        "taskset could not pin the bench to {cpus}"
    );
    Ok(())
}

/// The flooder process, driven over its stdin (`flood`, `pause`; closed:
/// stop and print the totals) and read from its stdout.
struct Flooder {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Drop for Flooder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Flooder {
    fn start(home: (PeerId, SocketAddr), cpus: Option<&str>) -> Result<Flooder> {
        let rate = FLOOD_FACTOR * TopicLimits::default().topic_rate;
        // On the home's CPU, idle: it runs only when the home has nothing
        // to do, and a waking home preempts it.
        let mut cmd = pinned_reach(cpus, true)?;
        let mut child = cmd
            .args(["bench", "topics-flooder", "--home-id"])
            .arg(home.0.to_string())
            .arg("--home-addr")
            .arg(home.1.to_string())
            .args(["--topic", LOUD, "--members"])
            .arg(FLOODERS.to_string())
            .arg("--rate")
            .arg(rate.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the flooder process")?;
        let stdout = child.stdout.take().context("the flooder's stdout")?;
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let stdin = child.stdin.take();
        Ok(Flooder {
            child,
            stdin,
            lines,
        })
    }

    /// Waits for the line `want`.
    async fn expect(&mut self, want: &str) -> Result<()> {
        let line = tokio::time::timeout(DEADLINE, self.lines.recv())
            .await
            .with_context(|| format!("the flooder did not say {want:?} in time"))?
            .with_context(|| format!("the flooder stopped before saying {want:?}"))?;
        ensure!(line == want, "the flooder said {line:?}, not {want:?}");
        Ok(())
    }

    /// Sends `command` and waits for its acknowledgement `ack`.
    async fn tell(&mut self, command: &str, ack: &str) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .context("the flooder's stdin is closed")?;
        writeln!(stdin, "{command}").context("writing to the flooder")?;
        stdin.flush()?;
        self.expect(ack).await
    }

    /// Closes its stdin and reads its totals.
    async fn finish(mut self) -> Result<FlooderTotals> {
        self.stdin = None;
        let line = tokio::time::timeout(DEADLINE, self.lines.recv())
            .await
            .context("the flooder did not print its totals in time")?
            .context("the flooder stopped without its totals")?;
        serde_json::from_str(&line).with_context(|| format!("the flooder's totals: {line:?}"))
    }
}

/// The flood run (see the module doc), `messages` quiet messages timed in
/// each condition.
pub async fn flood(messages: u32) -> Result<FloodRun> {
    let cpus = own_cpus();
    let (home_cpu, rest) = match &cpus {
        Some(c) => (Some(c[0].clone()), Some(c[1..].join(","))),
        None => (None, None),
    };
    let home = HomeProcess::start(None, home_cpu.as_deref())?;
    if let Some(rest) = &rest {
        pin_self(rest)?;
    }
    let run = flood_with(&home, home_cpu.as_deref(), messages).await;
    if let Some(all) = &cpus {
        pin_self(&all.join(","))?;
    }
    let (alone, flooded, totals, spent) = run?;
    Ok(FloodRun {
        alone_p99_ms: alone,
        flooded_p99_ms: flooded,
        home_cores_alone: spent[0].cores(),
        home_cores_flooded: spent[1].cores(),
        offered_per_s: totals.offered as f64 / totals.flooding_s.max(1e-3),
        sent_per_s: totals.sent as f64 / totals.flooding_s.max(1e-3),
        refused: totals.refused,
        pinned: cpus.is_some(),
    })
}

async fn flood_with(
    home: &HomeProcess,
    home_cpu: Option<&str>,
    messages: u32,
) -> Result<(f64, f64, FlooderTotals, [Spent; 2])> {
    let (home_id, home_addr) = home.identity();
    let mut flooder = Flooder::start((home_id, home_addr), home_cpu)?;
    let p = member_at(home_addr, home_id).await?;
    let s = member_at(home_addr, home_id).await?;
    let _sp = p.subscribe_topic(QUIET)?;
    let mut sub = s.subscribe_topic(QUIET)?;
    members_seen(&s, QUIET, 2).await?;
    flooder.expect("ready").await?;
    let (mut alone, mut flooded) = (Vec::new(), Vec::new());
    let mut spent = [Spent::default(), Spent::default()];
    let per_round = messages.div_ceil(ROUNDS);
    for _ in 0..ROUNDS {
        let (cpu, wall) = (home.cpu_s()?, Instant::now());
        alone.extend(quiet_latencies(&p, &mut sub, per_round).await?);
        spent[0].cpu_s += home.cpu_s()? - cpu;
        spent[0].wall_s += wall.elapsed().as_secs_f64();
        flooder.tell("flood", "flooding").await?;
        tokio::time::sleep(RAMP).await;
        let (cpu, wall) = (home.cpu_s()?, Instant::now());
        flooded.extend(quiet_latencies(&p, &mut sub, per_round).await?);
        spent[1].cpu_s += home.cpu_s()? - cpu;
        spent[1].wall_s += wall.elapsed().as_secs_f64();
        flooder.tell("pause", "paused").await?;
    }
    let totals = flooder.finish().await?;
    drop(sub);
    for n in [p, s] {
        n.shutdown().await;
    }
    Ok((
        percentile(&mut alone, 0.99),
        percentile(&mut flooded, 0.99),
        totals,
        spent,
    ))
}

/// Latencies (ms) of `messages` quiet messages published one at a time by
/// `p` and received on `sub`.
async fn quiet_latencies(p: &Node, sub: &mut Subscription, messages: u32) -> Result<Vec<f64>> {
    let mut lat = Vec::new();
    for _ in 0..messages {
        let sent = Instant::now();
        p.publish(QUIET, vec![3u8; PAYLOAD]).await?;
        next_message(sub).await?;
        lat.push(sent.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(QUIET_GAP).await;
    }
    Ok(lat)
}

/// `reach bench topics-flooder`: `members` members of the home `home_id`
/// at `home_addr`, subscribed to `topic`; prints `ready`, then floods
/// while told (stdin `flood` → `flooding`, `pause` → `paused`), offering
/// `rate` publishes per second together; when stdin closes, prints its
/// totals as one JSON line.
pub async fn flooder(
    home_id: PeerId,
    home_addr: SocketAddr,
    topic: String,
    members: usize,
    rate: u64,
) -> Result<()> {
    ensure!(members > 0 && rate > 0, "members and rate must be positive");
    let mut nodes = Vec::new();
    let mut subs = Vec::new();
    for _ in 0..members {
        let n = member_at(home_addr, home_id).await?;
        subs.push(n.subscribe_topic(&topic)?);
        nodes.push(n);
    }
    for n in &nodes {
        members_seen(n, &topic, members).await?;
    }
    let (on, _) = watch::channel(false);
    let offered = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let gap = Duration::from_secs_f64(members as f64 / rate as f64);
    for n in &nodes {
        let (n, mut on, offered, sent, refused, topic) = (
            n.clone(),
            on.subscribe(),
            offered.clone(),
            sent.clone(),
            refused.clone(),
            topic.clone(),
        );
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(gap);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut inflight = tokio::task::JoinSet::new();
            loop {
                if !*on.borrow_and_update() {
                    if on.wait_for(|on| *on).await.is_err() {
                        break;
                    }
                    // No burst of the ticks missed while paused.
                    tick.reset();
                    continue;
                }
                tokio::select! {
                    _ = tick.tick() => {
                        offered.fetch_add(1, Ordering::Relaxed);
                        if inflight.len() < FLOOD_IN_FLIGHT {
                            sent.fetch_add(1, Ordering::Relaxed);
                            let (n, topic) = (n.clone(), topic.clone());
                            inflight.spawn(async move {
                                n.publish(&topic, vec![9u8; PAYLOAD]).await.is_ok()
                            });
                        }
                    }
                    Some(done) = inflight.join_next() => {
                        if !matches!(done, Ok(true)) {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        });
    }
    println!("ready");
    let (tx, mut commands) = mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut flooding_s = 0.0;
    let mut since: Option<Instant> = None;
    while let Some(command) = commands.recv().await {
        match command.trim() {
            "flood" => {
                since.get_or_insert_with(Instant::now);
                on.send_replace(true);
                println!("flooding");
            }
            "pause" => {
                on.send_replace(false);
                flooding_s += since.take().map_or(0.0, |t| t.elapsed().as_secs_f64());
                println!("paused");
            }
            other => bail!("unknown flooder command {other:?}"),
        }
    }
    on.send_replace(false);
    flooding_s += since.take().map_or(0.0, |t| t.elapsed().as_secs_f64());
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let totals = FlooderTotals {
        offered: offered.load(Ordering::Relaxed),
        sent: sent.load(Ordering::Relaxed),
        refused: refused.load(Ordering::Relaxed),
        flooding_s,
    };
    println!("{}", serde_json::to_string(&totals)?);
    drop(subs);
    for n in nodes {
        n.shutdown().await;
    }
    Ok(())
}
