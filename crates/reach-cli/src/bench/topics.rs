//! `reach bench topics`: topics (rooms) on loopback, release build.
//!
//! - **forwarding**: one home (a relay node: its members' home) and
//!   [`PUBLISHERS`] members publishing 100-byte messages on one topic as fast
//!   as each may (as many publishes at once as a member keeps in flight per
//!   topic, `reach::topics::PUBLISH_WINDOW`), a subscriber member of the
//!   same home. The home is a `reach node` in a process of its
//!   own (its `[topic_limits]` raised: the default 500 msg/s per topic would
//!   be what is measured otherwise); the members are nodes in this process.
//!   The home forwards every message from a member stream to each member's
//!   stream (the publishers are members too: publishing needs a
//!   subscription), so it sends [`PUBLISHERS`] + 1 copies of each. Figures:
//!   messages the subscriber received per second (end to end), and the
//!   home's own CPU (its process's utime + stime from `/proc`, before and
//!   after) per message and the messages it forwards per CPU-second: its
//!   capacity, whatever the members in this process cost (target ≥
//!   100,000). Checked: every message arrived once and in order per
//!   publisher; every publish report and the subscriber's status name the
//!   measured home's process.
//! - **hop**: two homes federated on a topic; a publisher and a subscriber
//!   on the first, a subscriber on the second. One message at a time; the
//!   second subscriber's latency minus the first's is what one federation
//!   hop adds (target p99 ≤ 1 ms).
//! - **flood**: a quiet topic's one-at-a-time latency with another topic of
//!   the same home flooded at 10× its rate limit against without; the home
//!   and the flooders are processes of their own (see
//!   [`super::topics_flood`]; target within +10%).
//!
//! The hop run keeps all nodes in this process.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use reach::topics::{Subscription, TopicEvent};
use reach::{Node, PeerId, RelayMode, TopicLimits};
use serde::Serialize;

/// Target of the issue: messages one home forwards per second (checked on
/// the home's messages per CPU-second).
const TARGET_FORWARD_MSGS_PER_S: f64 = 100_000.0;
/// Target of the issue: latency one federation hop adds, p99.
const TARGET_HOP_P99_MS: f64 = 1.0;
/// Target of the issue: a flooded topic leaves another's p99 within this.
const TARGET_FLOOD_P99_RATIO: f64 = 1.10;
/// Members publishing at once in the forwarding run.
pub(super) const PUBLISHERS: usize = 8;
/// The saturation run's publishers each send this many times the
/// `--messages` of the end-to-end run's: the home takes them several times
/// faster, and a run of seconds keeps CPU ticks (10 ms) under 1% of it.
const SATURATION_SCALE: u64 = 10;
/// Payload of every message (the 100 bytes).
pub(super) const PAYLOAD: usize = 100;
/// How long a new member may take to hold the home as its relay: on
/// loopback it takes milliseconds; one that has none by then never tried
/// the home (see [`member_at`]).
const MEMBER_WAIT: Duration = Duration::from_secs(5);
/// Fresh nodes tried for one member of a home process.
const MEMBER_ATTEMPTS: usize = 5;
/// Members made at most to get two on one home and one on the other.
const HOP_MAX_MEMBERS: usize = 24;
/// Messages before the hop measurement starts (tree formation).
const HOP_WARMUP: u32 = 20;
/// Bound on every wait (setup, delivery).
pub(super) const DEADLINE: Duration = Duration::from_secs(60);

/// What `reach bench topics --json` prints.
#[derive(Debug, Serialize)]
pub struct TopicsBenchReport {
    pub payload_bytes: usize,
    pub forward_publishers: usize,
    /// Copies the home sends of each message: one per member.
    pub forward_copies_per_message: usize,
    pub forward_messages: u64,
    pub forward_s: f64,
    /// End to end: messages the subscriber received per second.
    pub forward_msgs_per_s: f64,
    pub forward_in_order_once: bool,
    /// CPU the home's process spent in the forwarding run.
    pub forward_home_cpu_s: f64,
    pub forward_home_cpu_ms_per_message: f64,
    /// Cores the home kept busy on average (its CPU over the run's time):
    /// under 1, the home was not what bounded the end-to-end rate.
    pub forward_home_cores: f64,
    /// The home's capacity: messages forwarded per CPU-second it spent
    /// (the figure the target is checked on).
    pub forward_home_msgs_per_cpu_s: f64,
    /// CPU the members (this process: 9 nodes, each checking the signature
    /// of every message it receives) spent in the forwarding run.
    pub forward_members_cpu_s: f64,
    pub forward_members_cpu_ms_per_message: f64,
    /// The saturation run (see `topics_forward`): the home's capacity with
    /// a load generator speaking the member protocol (pre-signed
    /// publishes, no signature checks on receipt), the home the bottleneck.
    pub capacity_publishers: usize,
    pub capacity_subscribers: usize,
    /// Copies the home sends of each message: one per member (the
    /// publishers are members too).
    pub capacity_copies_per_message: usize,
    /// Distinct messages the home took.
    pub capacity_messages: u64,
    pub capacity_s: f64,
    /// Distinct messages taken per second (wall clock).
    pub capacity_msgs_per_s: f64,
    /// Copies delivered per second (wall clock; as NATS' bench counts
    /// subscriber msgs/s).
    pub capacity_copies_per_s: f64,
    pub capacity_home_cpu_s: f64,
    /// Cores the home used on average: near 1.0, it was saturated.
    pub capacity_home_cores: f64,
    pub capacity_home_msgs_per_cpu_s: f64,
    pub capacity_home_copies_per_cpu_s: f64,
    /// Cores the load generator (this process) used meanwhile.
    pub capacity_loadgen_cores: f64,
    /// Every member got every message once, in order per publisher, and
    /// every publish was answered as taken.
    pub capacity_in_order_once: bool,
    pub hop_messages: u32,
    pub hop_one_home_p50_ms: f64,
    pub hop_one_home_p99_ms: f64,
    pub hop_two_homes_p50_ms: f64,
    pub hop_two_homes_p99_ms: f64,
    pub hop_added_p50_ms: f64,
    pub hop_added_p99_ms: f64,
    pub flood_messages: u32,
    pub flood_quiet_p99_alone_ms: f64,
    pub flood_quiet_p99_flooded_ms: f64,
    pub flood_p99_ratio: f64,
    /// Publishes the flooders offered per second, and handed to
    /// `Node::publish` (the rest held back by the home's backpressure).
    pub flood_offered_per_s: f64,
    pub flood_sent_per_s: f64,
    pub flood_refused: u64,
    /// The home had a CPU of its own in the flood run (see
    /// [`super::topics_flood`]).
    pub flood_pinned: bool,
    /// Cores the home used while the quiet topic was timed alone, and
    /// while the other was flooded.
    pub flood_home_cores_alone: f64,
    pub flood_home_cores_flooded: f64,
    pub flood_limit_per_s: u64,
    pub targets_met: bool,
}

pub(super) fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

async fn home(limits: TopicLimits) -> Result<Node> {
    Ok(Node::builder()
        .bind(loopback())
        .relay_service(RelayMode::On)
        .acquire_relay(RelayMode::Off)
        .topic_limits(limits)
        .spawn()
        .await?)
}

/// A node that joins through `via` and holds a relay (its home), with the
/// relay it holds.
async fn member_of_any(via: &Node) -> Result<(Node, PeerId)> {
    let n = Node::builder()
        .bind(loopback())
        .bootstrap([via.local_addr()])
        .relay_service(RelayMode::Off)
        .acquire_relay(RelayMode::On)
        .spawn()
        .await?;
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(relay) = n.relay_status().held_relay {
            return Ok((n, relay));
        }
        ensure!(Instant::now() < deadline, "a member got no home");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `node` sees `count` members of `topic`.
pub(crate) async fn members_seen(node: &Node, topic: &str, count: usize) -> Result<()> {
    let deadline = Instant::now() + DEADLINE;
    while node.members(topic)?.len() < count {
        ensure!(
            Instant::now() < deadline,
            "presence of {topic} did not converge"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The next message of `sub` (presence changes skipped).
pub(crate) async fn next_message(sub: &mut Subscription) -> Result<(PeerId, u64)> {
    loop {
        match tokio::time::timeout(DEADLINE, sub.next()).await {
            Ok(Some(TopicEvent::Message(m))) => return Ok((m.from, m.id)),
            Ok(Some(TopicEvent::Missed { count })) => bail!("a subscriber missed {count} events"),
            Ok(Some(_)) => {}
            Ok(None) => bail!("the subscriber's node stopped"),
            Err(_) => bail!("no message within {DEADLINE:?}"),
        }
    }
}

/// User plus system CPU seconds of process `pid` (`"self"` for this
/// one) from Linux `/proc/<pid>/stat`, in clock ticks of 1/100 s; an error
/// where that cannot be read (the figure would be made up otherwise).
pub(super) fn cpu_s(pid: &str) -> Result<f64> {
    const TICKS_PER_S: f64 = 100.0;
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<f64> {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("no CPU times in {path}"))
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    Ok((tick(11)? + tick(12)?) / TICKS_PER_S)
}

/// The measured home: `reach node` on a fresh data dir in a process of its
/// own; killed and its data dir removed when dropped.
pub(crate) struct HomeProcess {
    child: Child,
    dir: PathBuf,
    pub(super) peer: PeerId,
    pub(super) addr: SocketAddr,
}

impl Drop for HomeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl HomeProcess {
    /// Starts it (relay service on, so it is its members' home; topic
    /// limits at `rate`, the defaults if `None`; on the CPUs `cpus` names,
    /// as `taskset -c` takes them, if given) and waits for its id and
    /// address.
    pub(crate) fn start(rate: Option<u64>, cpus: Option<&str>) -> Result<HomeProcess> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir =
            std::env::temp_dir().join(format!("reach-bench-topics-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let config = dir.join("home.toml");
        let limits = rate.map_or(String::new(), |rate| {
            format!("[topic_limits]\nrate_per_topic = {rate}\nrate_per_publisher = {rate}\n")
        });
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\napi_listen = \"127.0.0.1:0\"\nrelay = \"on\"\n\
                 acquire_relay = \"off\"\nhole_punching = false\nport_mapping = false\n\
                 event_log = false\n{limits}"
            ),
        )?;
        let mut child = pinned_reach(cpus, false)?
            .arg("node")
            .arg("--data-dir")
            .arg(&dir)
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the home `reach node`")?;
        let stdout = child.stdout.take().context("the home's stdout")?;
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        // Reads the home's stdout to its end (so the home never blocks on
        // a full pipe); the startup lines go to `rx`.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut home = HomeProcess {
            child,
            dir,
            peer: reach::Keypair::generate().peer_id(),
            addr: loopback(),
        };
        (home.peer, home.addr) = super::node_identity(&rx, DEADLINE, "the home")?;
        Ok(home)
    }

    /// Its peer id and address.
    pub(crate) fn identity(&self) -> (PeerId, SocketAddr) {
        (self.peer, self.addr)
    }

    /// CPU seconds the home's process has used.
    pub(crate) fn cpu_s(&self) -> Result<f64> {
        cpu_s(&self.child.id().to_string())
    }
}

/// This very binary as a command, run on the CPUs `cpus` names (`taskset
/// -c`'s list) if given, and with idle scheduling (`chrt --idle`: only
/// when those CPUs have nothing else to do) if `idle`: `chrt` and
/// `taskset` exec it, so the child's pid is the binary's own.
pub(crate) fn pinned_reach(cpus: Option<&str>, idle: bool) -> Result<Command> {
    let exe = std::env::current_exe().context("finding the reach binary")?;
    Ok(match cpus {
        Some(cpus) => {
            let mut c = if idle {
                let mut c = Command::new("chrt");
                c.args(["--idle", "0", "taskset"]);
                c
            } else {
                Command::new("taskset")
            };
            c.arg("-c").arg(cpus).arg(exe);
            c
        }
        None => Command::new(exe),
    })
}

/// A node whose home is the node `home` at `addr` (the only relay it knows).
///
/// A node tries as relays the few DHT contacts closest to its key
/// (`reach::relay` tries 8), relays or not; with the other members in the
/// DHT, the home may be left out of them and the node gets no relay. Such
/// a node is replaced by a fresh one (another key), at most
/// [`MEMBER_ATTEMPTS`] times.
pub(crate) async fn member_at(addr: SocketAddr, home: PeerId) -> Result<Node> {
    for _ in 0..MEMBER_ATTEMPTS {
        let n = Node::builder()
            .bind(loopback())
            .bootstrap([addr])
            .relay_service(RelayMode::Off)
            .acquire_relay(RelayMode::On)
            .spawn()
            .await?;
        let deadline = Instant::now() + MEMBER_WAIT;
        while Instant::now() < deadline {
            if let Some(relay) = n.relay_status().held_relay {
                ensure!(relay == home, "a member took another home");
                return Ok(n);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        n.shutdown().await;
    }
    bail!("no member got the home as its relay in {MEMBER_ATTEMPTS} attempts")
}

pub(crate) fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    (v[i.min(v.len() - 1)] * 1000.0).round() / 1000.0
}

pub async fn topics(forward_messages: u64, latency_messages: u32) -> Result<TopicsBenchReport> {
    let cap = super::topics_forward::saturate(forward_messages * SATURATION_SCALE).await?;
    let fwd = super::topics_forward::forward(forward_messages).await?;
    let forwarded = forward_messages * PUBLISHERS as u64;
    let hop = hop(latency_messages).await?;
    let flood = super::topics_flood::flood(latency_messages).await?;
    let ratio = if flood.alone_p99_ms > 0.0 {
        flood.flooded_p99_ms / flood.alone_p99_ms
    } else {
        0.0
    };
    let per_msg_ms = |cpu: f64| (cpu * 1e6 / forwarded as f64).round() / 1000.0;
    // No CPU tick seen (a run far too short to measure): no capacity.
    let capacity = if fwd.home_cpu_s > 0.0 {
        (forwarded as f64 / fwd.home_cpu_s).round()
    } else {
        0.0
    };
    let cap_s = cap.s.max(1e-3);
    let cap_cpu = cap.home_cpu_s.max(0.01);
    let copies = cap.messages as f64 * cap.copies_per_message as f64;
    let cap_msgs_per_s = (cap.messages as f64 / cap_s).round();
    let targets_met = cap_msgs_per_s >= TARGET_FORWARD_MSGS_PER_S
        && hop.added_p99 <= TARGET_HOP_P99_MS
        && ratio <= TARGET_FLOOD_P99_RATIO;
    Ok(TopicsBenchReport {
        payload_bytes: PAYLOAD,
        forward_publishers: PUBLISHERS,
        forward_copies_per_message: PUBLISHERS + 1,
        forward_messages: forwarded,
        forward_s: fwd.s,
        forward_msgs_per_s: fwd.msgs_per_s.round(),
        forward_in_order_once: fwd.in_order,
        forward_home_cpu_s: (fwd.home_cpu_s * 100.0).round() / 100.0,
        forward_home_cpu_ms_per_message: per_msg_ms(fwd.home_cpu_s),
        forward_home_cores: ((fwd.home_cpu_s / fwd.s.max(1e-3)) * 100.0).round() / 100.0,
        forward_home_msgs_per_cpu_s: capacity,
        forward_members_cpu_s: (fwd.members_cpu_s * 100.0).round() / 100.0,
        forward_members_cpu_ms_per_message: per_msg_ms(fwd.members_cpu_s),
        capacity_publishers: super::topics_forward::SAT_PUBLISHERS,
        capacity_subscribers: super::topics_forward::SAT_SUBSCRIBERS,
        capacity_copies_per_message: cap.copies_per_message,
        capacity_messages: cap.messages,
        capacity_s: (cap.s * 1000.0).round() / 1000.0,
        capacity_msgs_per_s: cap_msgs_per_s,
        capacity_copies_per_s: (copies / cap_s).round(),
        capacity_home_cpu_s: (cap.home_cpu_s * 100.0).round() / 100.0,
        capacity_home_cores: ((cap.home_cpu_s / cap_s) * 100.0).round() / 100.0,
        capacity_home_msgs_per_cpu_s: (cap.messages as f64 / cap_cpu).round(),
        capacity_home_copies_per_cpu_s: (copies / cap_cpu).round(),
        capacity_loadgen_cores: ((cap.loadgen_cpu_s / cap_s) * 100.0).round() / 100.0,
        capacity_in_order_once: cap.in_order_once,
        hop_messages: latency_messages,
        hop_one_home_p50_ms: hop.one_p50,
        hop_two_homes_p50_ms: hop.two_p50,
        hop_one_home_p99_ms: hop.one_p99,
        hop_two_homes_p99_ms: hop.two_p99,
        hop_added_p50_ms: hop.added_p50,
        hop_added_p99_ms: hop.added_p99,
        flood_messages: latency_messages,
        flood_quiet_p99_alone_ms: flood.alone_p99_ms,
        flood_quiet_p99_flooded_ms: flood.flooded_p99_ms,
        flood_p99_ratio: (ratio * 1000.0).round() / 1000.0,
        flood_offered_per_s: flood.offered_per_s.round(),
        flood_sent_per_s: flood.sent_per_s.round(),
        flood_refused: flood.refused,
        flood_pinned: flood.pinned,
        flood_home_cores_alone: flood.home_cores_alone,
        flood_home_cores_flooded: flood.home_cores_flooded,
        flood_limit_per_s: TopicLimits::default().topic_rate,
        targets_met,
    })
}

/// Latencies of the hop run, ms: publish to the near home's subscriber
/// (one home), to the far home's (two homes), and the difference per
/// message (what the federation hop adds).
struct Hop {
    one_p50: f64,
    one_p99: f64,
    two_p50: f64,
    two_p99: f64,
    added_p50: f64,
    added_p99: f64,
}

/// Two federated homes (see [`Hop`]).
async fn hop(messages: u32) -> Result<Hop> {
    const TOPIC: &str = "bench-hop";
    let h1 = home(TopicLimits::default()).await?;
    let h2 = Node::builder()
        .bind(loopback())
        .bootstrap([h1.local_addr()])
        .relay_service(RelayMode::On)
        .acquire_relay(RelayMode::Off)
        .spawn()
        .await?;
    // A member holds whichever relay answers first: make members until
    // two hold h1 (publisher, first subscriber) and one holds h2.
    let (mut on1, mut on2, mut extra) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..HOP_MAX_MEMBERS {
        if on1.len() >= 2 && !on2.is_empty() {
            break;
        }
        let (n, relay) = member_of_any(&h1).await?;
        match relay {
            r if r == h1.peer_id() && on1.len() < 2 => on1.push(n),
            r if r == h2.peer_id() && on2.is_empty() => on2.push(n),
            _ => extra.push(n),
        }
    }
    for n in extra {
        n.shutdown().await;
    }
    ensure!(
        on1.len() == 2 && on2.len() == 1,
        "members did not spread over the two homes"
    );
    let (s1, p) = (on1.remove(1), on1.remove(0));
    let s2 = on2.remove(0);
    let _sp = p.subscribe_topic(TOPIC)?;
    let mut sub1 = s1.subscribe_topic(TOPIC)?;
    let mut sub2 = s2.subscribe_topic(TOPIC)?;
    // Both homes see all three members: the homes found each other and
    // federate the topic.
    members_seen(&s2, TOPIC, 3).await?;
    members_seen(&s1, TOPIC, 3).await?;
    let (mut one, mut two) = (Vec::new(), Vec::new());
    // Paced under the default per-publisher limit (100/s).
    let gap = Duration::from_millis(15);
    // Warm-up, not measured: the first messages of an origin build its
    // tree (eager links) between the homes.
    for _ in 0..HOP_WARMUP {
        let report = p.publish(TOPIC, vec![1u8; PAYLOAD]).await?;
        let (a, b) = tokio::join!(next_message(&mut sub1), next_message(&mut sub2));
        let ((_, id1), (_, id2)) = (a?, b?);
        ensure!(
            id1 == report.id && id2 == report.id,
            "a message out of order"
        );
        tokio::time::sleep(gap).await;
    }
    // Each subscriber waits in its own task from before the publish, so
    // each arrival is timed when it happens.
    for _ in 0..messages {
        let sent = Instant::now();
        let r1 = tokio::spawn(async move {
            let m = next_message(&mut sub1).await;
            (m, sent.elapsed(), sub1)
        });
        let r2 = tokio::spawn(async move {
            let m = next_message(&mut sub2).await;
            (m, sent.elapsed(), sub2)
        });
        p.publish(TOPIC, vec![1u8; PAYLOAD]).await?;
        let (m1, t1, back1) = r1.await?;
        let (m2, t2, back2) = r2.await?;
        m1?;
        m2?;
        sub1 = back1;
        sub2 = back2;
        one.push(t1.as_secs_f64() * 1000.0);
        two.push(t2.as_secs_f64() * 1000.0);
        tokio::time::sleep(gap).await;
    }
    // What the hop adds, message by message: the same publish's arrival
    // at the far home's subscriber minus at the near home's.
    let mut added: Vec<f64> = two.iter().zip(&one).map(|(b, a)| b - a).collect();
    let r = Hop {
        one_p50: percentile(&mut one.clone(), 0.5),
        one_p99: percentile(&mut one, 0.99),
        two_p50: percentile(&mut two.clone(), 0.5),
        two_p99: percentile(&mut two, 0.99),
        added_p50: percentile(&mut added.clone(), 0.5),
        added_p99: percentile(&mut added, 0.99),
    };
    drop((sub1, sub2));
    for n in [p, s1, s2, h2, h1] {
        n.shutdown().await;
    }
    Ok(r)
}
