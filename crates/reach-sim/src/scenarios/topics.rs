//! The topic overlay at scale: reach-proto's real [`Overlay`] machine at
//! every home, over simulated federation links with latency, jitter, loss
//! and churn.
//!
//! A run:
//!
//! 1. **Setup** ([`SETUP`] of virtual time). `homes` homes serve one topic.
//!    Links: a random tree (home `i` links to a random earlier home) plus
//!    `homes * EXTRA_LINKS_PER_HOME` random extra links, so the overlay has
//!    cycles; each link has its own mean one-way latency, uniform in
//!    [[`LINK_LATENCY_MIN`], [`LINK_LATENCY_MAX`]], and every frame
//!    [`LINK_JITTER`] jitter and the `loss` probability. `members` members
//!    (real Ed25519 ids, spread evenly) join their homes; presence floods.
//! 2. **Measurement**: `messages` messages of `size` bytes at uniform random
//!    times over `messages / rate` seconds, each from one of [`PUBLISHERS`]
//!    members (signed by the member's key, handed to its home with
//!    `publish_from_member`, as the runtime does). Meanwhile
//!    [`PRESENCE_EVENTS`] member joins and leaves at random live homes, and
//!    with churn `C`: `C * homes` homes crash (not the publishers' homes)
//!    and as many fresh homes join (linking to [`JOIN_LINKS`] random live
//!    homes, their members joining). A crashed home's neighbours learn of
//!    it [`DEATH_DETECT`] later (`link_down`); the driver then re-links
//!    neighbours left with fewer than [`MIN_LINKS`] links and joins any
//!    split-off part of the overlay to the rest, as the runtime's topic
//!    records in the DHT would.
//! 3. **Drain** ([`DRAIN`]) for repairs and the stale sweep.
//!
//! A message is *expected* at every home alive when it was published and
//! for [`DEADLINE`] after (the publisher's home included: it delivers to
//! its own members). `delivery_rate` counts expected deliveries within
//! [`DEADLINE`]; `duplicates_delivered` counts a message delivered twice at
//! a home (whether expected or not). Every frame is really encoded
//! ([`TopicFrame::encode`]) and decoded at the receiver; byte counts are
//! the encoded sizes.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use reach_proto::topics::{
    Overlay, OverlayConfig, OverlayOutput, TopicFrame, TopicId, TopicMessage,
};
use reach_proto::{Keypair, PeerId};
use serde::Serialize;

use crate::engine::EventQueue;
use crate::net::LinkModel;
use crate::rng::Rng;
use crate::stats::{peak_rss_mib, quantile};

/// Largest `homes` accepted (churn adds as many again at most).
pub const MAX_HOMES: usize = 10_000;
/// Largest `members` accepted (each is a real Ed25519 id in memory).
pub const MAX_MEMBERS: usize = 1_000_000;
/// Largest `messages` accepted.
pub const MAX_MESSAGES: usize = 1_000_000;
/// Highest --rate accepted: the default per-topic limit of a home
/// ([`reach_proto::topics::DEFAULT_TOPIC_RATE`]) is per publisher's home,
/// so the topic as a whole may carry more, but not without bound.
pub const MAX_RATE: f64 = 100_000.0;
/// Virtual time before messages start: presence setup and first heartbeats.
pub const SETUP: Duration = Duration::from_secs(8);
/// Virtual time after the last message: repairs, stale sweeps.
pub const DRAIN: Duration = Duration::from_secs(25);
/// The delivery deadline the targets are stated for (issue #15).
pub const DEADLINE: Duration = Duration::from_secs(5);
/// Extra random links per home beyond the random tree: about four links
/// per home on average, so many cycles.
pub const EXTRA_LINKS_PER_HOME: f64 = 1.0;
/// Shortest mean one-way link latency (same region).
pub const LINK_LATENCY_MIN: Duration = Duration::from_millis(10);
/// Longest mean one-way link latency (across a continent).
pub const LINK_LATENCY_MAX: Duration = Duration::from_millis(60);
/// Jitter of every frame, as a fraction of its link's latency.
pub const LINK_JITTER: f64 = 0.1;
/// Members that publish (their homes never crash in the run).
pub const PUBLISHERS: usize = 20;
/// Member joins and leaves timed for presence convergence.
pub const PRESENCE_EVENTS: usize = 40;
/// Links a fresh home opens.
pub const JOIN_LINKS: usize = 3;
/// A home left with fewer links opens one more.
pub const MIN_LINKS: usize = 2;
/// How long a crashed home's neighbours take to notice (a QUIC keep-alive
/// timeout).
pub const DEATH_DETECT: Duration = Duration::from_secs(2);

/// Parameters of a topics run.
#[derive(Debug, Clone)]
pub struct TopicsParams {
    pub homes: usize,
    pub members: usize,
    pub messages: usize,
    pub seed: u64,
    /// Fraction of homes that crash, and of fresh homes that join (0..=1).
    pub churn: f64,
    /// Per-frame loss probability.
    pub loss: f64,
    /// Payload bytes per message.
    pub size: usize,
    /// Messages per second over the whole topic.
    pub rate: f64,
}

/// The JSON report (everything but `wall_s` and `peak_rss_mib` depends only
/// on the parameters).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TopicsReport {
    pub scenario: &'static str,
    pub homes: usize,
    pub members: usize,
    pub messages: usize,
    pub seed: u64,
    pub churn: f64,
    pub loss: f64,
    pub size: usize,
    pub rate: f64,
    pub publishers: usize,
    pub links_at_start: usize,
    /// (message, home) pairs expected.
    pub expected: u64,
    /// Share of expected deliveries made within [`DEADLINE`].
    pub delivery_rate: f64,
    /// Share made by the end of the run.
    pub delivery_rate_eventual: f64,
    pub duplicates_delivered: u64,
    /// Message frames sent per delivery at a home other than the origin's,
    /// over all messages (the first messages of each origin flood every
    /// link until the duplicates prune its tree).
    pub payload_copies_per_home_per_message: f64,
    /// The same over the messages of the second half of the window (the
    /// trees formed: steady state).
    pub payload_copies_steady: f64,
    /// Encoded bytes of control frames / of message frames, from the first
    /// message to the end.
    pub control_bytes_per_payload_byte: f64,
    /// The same for "I have" frames alone, and for presence frames alone.
    pub ihave_bytes_per_payload_byte: f64,
    pub presence_bytes_per_payload_byte: f64,
    /// Control bytes before the first message (presence setup).
    pub setup_control_bytes: u64,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    /// Shortest-path latency over the links (mean latencies) from the
    /// origin's home at publish time.
    pub shortest_path_ms_p50: f64,
    pub shortest_path_ms_p99: f64,
    /// Every home had every member when messages started.
    pub presence_setup_complete: bool,
    /// Member join/leave events and how long until every live home saw
    /// them.
    pub presence_events: usize,
    pub presence_converged: usize,
    pub presence_convergence_ms_p50: f64,
    pub presence_convergence_ms_p99: f64,
    pub presence_convergence_ms_max: f64,
    /// Members that left but are still listed at a live home at the end.
    pub presence_left_still_listed: usize,
    /// Crashed homes and, over them and every live home, the longest time
    /// until the crashed home's members were dropped.
    pub homes_crashed: usize,
    pub homes_joined: usize,
    pub crashed_members_dropped_s_max: f64,
    /// Members of crashed homes still listed somewhere at the end.
    pub crashed_members_left: usize,
    pub grafts: u64,
    pub prunes: u64,
    pub gaps_skipped: u64,
    pub refused_publishes: u64,
    pub virtual_s: f64,
}

/// A report with the wall-clock figures.
#[derive(Debug, Clone, Serialize)]
pub struct TopicsOutput {
    #[serde(flatten)]
    pub report: TopicsReport,
    pub wall_s: f64,
    pub peak_rss_mib: f64,
}

enum Ev {
    Frame {
        from: usize,
        to: usize,
        bytes: Vec<u8>,
    },
    Wake {
        home: usize,
    },
    Publish {
        k: usize,
    },
    Presence {
        e: usize,
    },
    Crash {
        home: usize,
    },
    Join {
        home: usize,
    },
    Noticed {
        home: usize,
        dead: usize,
    },
}

struct Home {
    overlay: Overlay,
    alive: bool,
    joined_at: Duration,
    died_at: Option<Duration>,
    wake_at: Option<Duration>,
    members: Vec<PeerId>,
}

struct Msg {
    at: Duration,
    publisher: usize,
    origin_home: usize,
    published: bool,
    /// First delivery time per home.
    got: Vec<Option<Duration>>,
    /// Message frames sent for it.
    frames: u64,
    bound: Vec<f64>,
}

struct PresenceEv {
    at: Duration,
    home: usize,
    member: PeerId,
    joined: bool,
    done: bool,
}

struct Sim<'a> {
    p: &'a TopicsParams,
    q: EventQueue<Ev>,
    rng: Rng,
    topic: TopicId,
    homes: Vec<Option<Home>>,
    ids: Vec<PeerId>,
    /// Each home's node key (signs its presence).
    keys: Vec<Keypair>,
    index: HashMap<PeerId, usize>,
    links: BTreeMap<(usize, usize), LinkModel>,
    publishers: Vec<(Keypair, usize, u64)>,
    msgs: Vec<Msg>,
    by_id: HashMap<(PeerId, u64), usize>,
    pev: Vec<PresenceEv>,
    /// (member, joined) → presence event.
    tracked: HashMap<(PeerId, bool), usize>,
    /// (home, event) → first time seen.
    pseen: HashMap<(usize, usize), Duration>,
    /// (observer, crashed home) → last drop of one of its members.
    dropped_at: HashMap<(usize, usize), Duration>,
    measuring: bool,
    duplicates: u64,
    payload_frames: u64,
    payload_bytes: u64,
    control_bytes: u64,
    ihave_bytes: u64,
    presence_bytes: u64,
    setup_bytes: u64,
}

fn is_presence(f: &TopicFrame) -> bool {
    matches!(
        f,
        TopicFrame::PresenceDelta { .. }
            | TopicFrame::Heartbeat { .. }
            | TopicFrame::SnapshotRequest { .. }
            | TopicFrame::SnapshotPage { .. }
    )
}

impl<'a> Sim<'a> {
    fn link_model(&mut self) -> LinkModel {
        let span = (LINK_LATENCY_MAX - LINK_LATENCY_MIN).as_secs_f64();
        LinkModel {
            latency: LINK_LATENCY_MIN + Duration::from_secs_f64(span * self.rng.unit()),
            jitter: LINK_JITTER,
            loss: self.p.loss,
        }
    }

    fn degree(&self, h: usize) -> usize {
        self.links.range((h, 0)..(h + 1, 0)).count()
    }

    fn alive(&self, h: usize) -> bool {
        self.homes[h].as_ref().is_some_and(|x| x.alive)
    }

    fn connect(&mut self, a: usize, b: usize) -> bool {
        if a == b || self.links.contains_key(&(a, b)) || !self.alive(a) || !self.alive(b) {
            return false;
        }
        let limit = reach_proto::topics::MAX_LINKS_PER_TOPIC;
        if self.degree(a) >= limit || self.degree(b) >= limit {
            return false;
        }
        let m = self.link_model();
        self.links.insert((a, b), m);
        self.links.insert((b, a), m);
        let (ia, ib) = (self.ids[a], self.ids[b]);
        let topic = self.topic;
        if let Some(h) = self.homes[a].as_mut() {
            let _ = h.overlay.link_up(ib, &[topic]);
        }
        if let Some(h) = self.homes[b].as_mut() {
            let _ = h.overlay.link_up(ia, &[topic]);
        }
        self.flush(a);
        self.flush(b);
        true
    }

    fn flush(&mut self, i: usize) {
        let now = self.q.now();
        loop {
            let Some(home) = self.homes[i].as_mut() else {
                return;
            };
            let Some(o) = home.overlay.poll_output() else {
                break;
            };
            match o {
                OverlayOutput::Send { to, frame } => {
                    let Some(&j) = self.index.get(&to) else {
                        continue;
                    };
                    let Some(link) = self.links.get(&(i, j)).copied() else {
                        continue;
                    };
                    let bytes = frame.encode();
                    let n = bytes.len() as u64;
                    if !self.measuring {
                        if !frame.is_payload() {
                            self.setup_bytes += n;
                        }
                    } else if let TopicFrame::Message(m) = &frame {
                        self.payload_frames += 1;
                        self.payload_bytes += n;
                        if let Some(&k) = self.by_id.get(&(m.origin, m.seq)) {
                            self.msgs[k].frames += 1;
                        }
                    } else {
                        self.control_bytes += n;
                        if matches!(frame, TopicFrame::IHave { .. }) {
                            self.ihave_bytes += n;
                        } else if is_presence(&frame) {
                            self.presence_bytes += n;
                        }
                    }
                    if let Some(d) = link.delay(&mut self.rng) {
                        self.q.schedule(
                            d,
                            Ev::Frame {
                                from: i,
                                to: j,
                                bytes,
                            },
                        );
                    }
                }
                OverlayOutput::Deliver { msg, .. } => {
                    if let Some(&k) = self.by_id.get(&(msg.origin, msg.seq)) {
                        let slot = &mut self.msgs[k].got[i];
                        if slot.is_some() {
                            self.duplicates += 1;
                        } else {
                            *slot = Some(now);
                        }
                    }
                }
                OverlayOutput::PresenceChanged {
                    member,
                    home,
                    joined,
                    ..
                } => {
                    if let Some(&e) = self.tracked.get(&(member, joined))
                        && now >= self.pev[e].at
                    {
                        self.pseen.entry((i, e)).or_insert(now);
                    }
                    if !joined
                        && let Some(&h) = self.index.get(&home)
                        && self.homes[h].as_ref().is_some_and(|x| !x.alive)
                    {
                        let t = self.dropped_at.entry((i, h)).or_insert(now);
                        *t = (*t).max(now);
                    }
                }
            }
        }
        let Some(home) = self.homes[i].as_mut() else {
            return;
        };
        if let Some(t) = home.overlay.next_timeout() {
            let t = t.max(now);
            if home.wake_at.is_none_or(|w| t < w) {
                home.wake_at = Some(t);
                self.q.schedule(t - now, Ev::Wake { home: i });
            }
        }
    }

    fn start_home(&mut self, h: usize, members: Vec<PeerId>) {
        let now = self.q.now();
        let mut overlay = Overlay::new(self.keys[h].clone(), 1, OverlayConfig::default());
        let _ = overlay.subscribe(self.topic, now);
        for m in &members {
            let _ = overlay.member_joined(self.topic, *m, now);
        }
        self.homes[h] = Some(Home {
            overlay,
            alive: true,
            joined_at: now,
            died_at: None,
            wake_at: None,
            members,
        });
        self.flush(h);
    }

    fn live(&self) -> Vec<usize> {
        (0..self.homes.len()).filter(|h| self.alive(*h)).collect()
    }

    /// Joins every part of the live overlay to the part holding the lowest
    /// live home.
    fn heal(&mut self) {
        let live = self.live();
        let Some(&root) = live.first() else {
            return;
        };
        loop {
            let mut seen = BTreeSet::from([root]);
            let mut todo = VecDeque::from([root]);
            while let Some(a) = todo.pop_front() {
                let next: Vec<usize> = self
                    .links
                    .range((a, 0)..(a + 1, 0))
                    .map(|((_, b), _)| *b)
                    .collect();
                for b in next {
                    if seen.insert(b) {
                        todo.push_back(b);
                    }
                }
            }
            let Some(&out) = live.iter().find(|h| !seen.contains(h)) else {
                return;
            };
            let inside: Vec<usize> = seen.into_iter().collect();
            let mut linked = false;
            for _ in 0..16 {
                let to = inside[self.rng.below(inside.len() as u64) as usize];
                if self.connect(out, to) {
                    linked = true;
                    break;
                }
            }
            if !linked {
                return;
            }
        }
    }

    fn dijkstra(&self, src: usize) -> Vec<f64> {
        let n = self.homes.len();
        let mut dist = vec![f64::INFINITY; n];
        let mut done = vec![false; n];
        dist[src] = 0.0;
        for _ in 0..n {
            let Some(u) = (0..n)
                .filter(|i| !done[*i] && dist[*i].is_finite())
                .min_by(|a, b| dist[*a].total_cmp(&dist[*b]))
            else {
                break;
            };
            done[u] = true;
            for ((_, v), l) in self.links.range((u, 0)..(u + 1, 0)) {
                let d = dist[u] + l.latency.as_secs_f64() * 1000.0;
                if d < dist[*v] {
                    dist[*v] = d;
                }
            }
        }
        dist
    }

    fn step(&mut self, ev: Ev) {
        let now = self.q.now();
        match ev {
            Ev::Frame { from, to, bytes } => {
                if !self.links.contains_key(&(from, to)) {
                    return;
                }
                let Ok(frame) = TopicFrame::decode(&bytes) else {
                    return;
                };
                let from_id = self.ids[from];
                if let Some(h) = self.homes[to].as_mut() {
                    h.overlay.handle_frame(from_id, frame, now);
                }
                self.flush(to);
            }
            Ev::Wake { home } => {
                let Some(h) = self.homes[home].as_mut() else {
                    return;
                };
                if !h.alive {
                    return;
                }
                if h.wake_at == Some(now) {
                    h.wake_at = None;
                }
                if h.overlay.next_timeout().is_some_and(|t| t <= now) {
                    h.overlay.handle_timeout(now);
                }
                self.flush(home);
            }
            Ev::Publish { k } => {
                self.measuring = true;
                let publisher = self.msgs[k].publisher;
                let home = self.publishers[publisher].1;
                if !self.alive(home) {
                    return;
                }
                self.publishers[publisher].2 += 1;
                let seq = self.publishers[publisher].2;
                let data = vec![(k % 251) as u8; self.p.size];
                let Ok(msg) =
                    TopicMessage::sign(&self.publishers[publisher].0, self.topic, seq, data)
                else {
                    return;
                };
                self.by_id.insert((msg.origin, seq), k);
                self.msgs[k].bound = self.dijkstra(home);
                self.msgs[k].origin_home = home;
                self.msgs[k].at = now;
                self.msgs[k].published = true;
                if let Some(h) = self.homes[home].as_mut() {
                    let _ = h.overlay.publish_from_member(msg, now);
                }
                self.flush(home);
            }
            Ev::Presence { e } => {
                let home = self.pev[e].home;
                let (member, joined) = (self.pev[e].member, self.pev[e].joined);
                if !self.alive(home) {
                    self.pev[e].done = false;
                    return;
                }
                self.pev[e].at = now;
                self.pev[e].done = true;
                let topic = self.topic;
                if let Some(h) = self.homes[home].as_mut() {
                    let _ = if joined {
                        h.overlay.member_joined(topic, member, now)
                    } else {
                        h.overlay.member_left(topic, member, now)
                    };
                }
                self.flush(home);
            }
            Ev::Crash { home } => {
                let Some(h) = self.homes[home].as_mut() else {
                    return;
                };
                h.alive = false;
                h.died_at = Some(now);
                let neighbours: Vec<usize> = self
                    .links
                    .range((home, 0)..(home + 1, 0))
                    .map(|((_, b), _)| *b)
                    .collect();
                for b in neighbours {
                    self.links.remove(&(home, b));
                    self.links.remove(&(b, home));
                    self.q.schedule(
                        DEATH_DETECT,
                        Ev::Noticed {
                            home: b,
                            dead: home,
                        },
                    );
                }
            }
            Ev::Noticed { home, dead } => {
                let dead_id = self.ids[dead];
                if let Some(h) = self.homes[home].as_mut() {
                    h.overlay.link_down(dead_id);
                }
                self.flush(home);
                if self.alive(home) && self.degree(home) < MIN_LINKS {
                    let live = self.live();
                    for _ in 0..16 {
                        let to = live[self.rng.below(live.len() as u64) as usize];
                        if self.connect(home, to) {
                            break;
                        }
                    }
                }
                self.heal();
            }
            Ev::Join { home } => {
                let per = self.p.members / self.p.homes.max(1);
                let members: Vec<PeerId> = (0..per).map(|_| self.new_member()).collect();
                self.start_home(home, members);
                let live = self.live();
                let mut made = 0;
                for _ in 0..(JOIN_LINKS * 8) {
                    if made >= JOIN_LINKS {
                        break;
                    }
                    let to = live[self.rng.below(live.len() as u64) as usize];
                    if self.connect(home, to) {
                        made += 1;
                    }
                }
                self.heal();
            }
        }
    }

    fn new_member(&mut self) -> PeerId {
        Keypair::from_secret_bytes(self.rng.bytes32()).peer_id()
    }
}

/// Runs the scenario; returns the report and the wall time.
pub fn run(p: &TopicsParams) -> (TopicsReport, Duration) {
    let started = Instant::now();
    let p = &TopicsParams {
        homes: p.homes.clamp(2, MAX_HOMES),
        members: p.members.min(MAX_MEMBERS),
        messages: p.messages.min(MAX_MESSAGES),
        churn: if p.churn.is_nan() {
            0.0
        } else {
            p.churn.clamp(0.0, 1.0)
        },
        loss: if p.loss.is_nan() {
            0.0
        } else {
            p.loss.clamp(0.0, 0.99)
        },
        size: p.size.min(reach_proto::topics::MAX_DATA_LEN),
        rate: if p.rate.is_finite() && p.rate > 0.0 {
            p.rate
        } else {
            100.0
        },
        ..p.clone()
    };
    let churners = (p.homes as f64 * p.churn).round() as usize;
    let total = p.homes + churners;
    let mut rng = Rng::new(p.seed);
    let keys: Vec<Keypair> = (0..total)
        .map(|_| Keypair::from_secret_bytes(rng.bytes32()))
        .collect();
    let ids: Vec<PeerId> = keys.iter().map(Keypair::peer_id).collect();
    let mut sim = Sim {
        p,
        q: EventQueue::default(),
        rng,
        topic: TopicId::from_name("sim-room").unwrap_or(TopicId([0; 32])),
        homes: (0..total).map(|_| None).collect(),
        index: ids.iter().enumerate().map(|(i, x)| (*x, i)).collect(),
        ids,
        keys,
        links: BTreeMap::new(),
        publishers: Vec::new(),
        msgs: Vec::new(),
        by_id: HashMap::new(),
        pev: Vec::new(),
        tracked: HashMap::new(),
        pseen: HashMap::new(),
        dropped_at: HashMap::new(),
        measuring: false,
        duplicates: 0,
        payload_frames: 0,
        payload_bytes: 0,
        control_bytes: 0,
        ihave_bytes: 0,
        presence_bytes: 0,
        setup_bytes: 0,
    };
    // Setup: homes, members, links.
    for h in 0..p.homes {
        let per = p.members / p.homes + usize::from(h < p.members % p.homes);
        let members: Vec<PeerId> = (0..per).map(|_| sim.new_member()).collect();
        sim.start_home(h, members);
    }
    for i in 1..p.homes {
        let j = sim.rng.below(i as u64) as usize;
        sim.connect(i, j);
    }
    let extra = (p.homes as f64 * EXTRA_LINKS_PER_HOME).round() as usize;
    for _ in 0..extra {
        let a = sim.rng.below(p.homes as u64) as usize;
        let b = sim.rng.below(p.homes as u64) as usize;
        sim.connect(a, b);
    }
    let links_at_start = sim.links.len() / 2;
    // Publishers: members of random homes, which never crash.
    let publishers = PUBLISHERS.min(p.members.max(1));
    let mut protected = BTreeSet::new();
    for _ in 0..publishers {
        let home = sim.rng.below(p.homes as u64) as usize;
        protected.insert(home);
        let kp = Keypair::from_secret_bytes(sim.rng.bytes32());
        sim.publishers.push((kp, home, 0));
    }
    let window = Duration::from_secs_f64(p.messages as f64 / p.rate);
    let mut times: Vec<Duration> = (0..p.messages)
        .map(|_| window.mul_f64(sim.rng.unit()))
        .collect();
    times.sort();
    for (k, t) in times.into_iter().enumerate() {
        let publisher = sim.rng.below(publishers as u64) as usize;
        sim.msgs.push(Msg {
            at: Duration::ZERO,
            publisher,
            origin_home: 0,
            published: false,
            got: vec![None; total],
            frames: 0,
            bound: Vec::new(),
        });
        sim.q.schedule(SETUP + t, Ev::Publish { k });
    }
    // Presence events: a join, and for half of them a leave later.
    for e in 0..PRESENCE_EVENTS {
        let t = window.mul_f64(sim.rng.unit());
        let home = sim.rng.below(p.homes as u64) as usize;
        let (member, joined) = if e % 2 == 0 {
            (sim.new_member(), true)
        } else {
            let prev = &sim.pev[e - 1];
            (prev.member, false)
        };
        let (at, home) = if joined {
            (SETUP + t, home)
        } else {
            let prev = &sim.pev[e - 1];
            (prev.at + Duration::from_secs(2), prev.home)
        };
        sim.tracked.insert((member, joined), e);
        sim.pev.push(PresenceEv {
            at,
            home,
            member,
            joined,
            done: false,
        });
        sim.q.schedule(at, Ev::Presence { e });
    }
    // Churn.
    let candidates: Vec<usize> = (0..p.homes).filter(|h| !protected.contains(h)).collect();
    let mut pool = candidates;
    let mut crashed = 0;
    for _ in 0..churners.min(pool.len()) {
        let i = sim.rng.below(pool.len() as u64) as usize;
        let home = pool.swap_remove(i);
        let t = window.mul_f64(sim.rng.unit());
        sim.q.schedule(SETUP + t, Ev::Crash { home });
        crashed += 1;
    }
    for j in 0..churners {
        let t = window.mul_f64(sim.rng.unit());
        sim.q.schedule(SETUP + t, Ev::Join { home: p.homes + j });
    }
    // Presence setup completeness is checked when messages start.
    let end = SETUP + window + DRAIN;
    let mut setup_checked = false;
    let mut presence_setup_complete = false;
    while let Some((at, ev)) = sim.q.pop() {
        if at > end {
            break;
        }
        if !setup_checked && at >= SETUP {
            setup_checked = true;
            let total_members = p.members;
            presence_setup_complete = sim
                .homes
                .iter()
                .flatten()
                .all(|h| h.overlay.members(&sim.topic).len() == total_members);
        }
        sim.step(ev);
    }
    // Deliveries.
    let mut expected = 0u64;
    let mut on_time = 0u64;
    let mut eventually = 0u64;
    let mut lat = Vec::new();
    let mut bound = Vec::new();
    let mut remote = 0u64;
    let (mut steady_frames, mut steady_remote) = (0u64, 0u64);
    let half = SETUP + window / 2;
    for m in sim.msgs.iter().filter(|m| m.published) {
        if m.at >= half {
            steady_frames += m.frames;
            steady_remote += m
                .got
                .iter()
                .enumerate()
                .filter(|(h, g)| g.is_some() && *h != m.origin_home)
                .count() as u64;
        }
        for (h, home) in sim.homes.iter().enumerate() {
            let Some(home) = home else { continue };
            let alive_through = home.died_at.is_none_or(|d| d > m.at + DEADLINE);
            if home.joined_at > m.at || !alive_through {
                continue;
            }
            expected += 1;
            if let Some(t) = m.got[h] {
                eventually += 1;
                if t <= m.at + DEADLINE {
                    on_time += 1;
                }
                if h != m.origin_home {
                    remote += 1;
                    lat.push((t - m.at).as_secs_f64() * 1000.0);
                    bound.push(m.bound.get(h).copied().unwrap_or(0.0));
                }
            }
        }
    }
    // Presence convergence: every home alive from the event to the end.
    let mut conv = Vec::new();
    let mut done_events = 0;
    for (e, ev) in sim.pev.iter().enumerate() {
        if !ev.done {
            continue;
        }
        done_events += 1;
        let mut worst = Some(Duration::ZERO);
        for (h, home) in sim.homes.iter().enumerate() {
            let Some(home) = home else { continue };
            if !home.alive || home.joined_at > ev.at || h == ev.home {
                continue;
            }
            // A leave is news only to a home that listed the member (a
            // home that joined after the join and took its snapshot after
            // the leave never did); the end check below covers the rest.
            if !ev.joined && e > 0 && !sim.pseen.contains_key(&(h, e - 1)) {
                continue;
            }
            match sim.pseen.get(&(h, e)) {
                Some(t) => worst = worst.map(|w| w.max(*t - ev.at)),
                None => worst = None,
            }
        }
        if let Some(w) = worst {
            conv.push(w.as_secs_f64() * 1000.0);
        }
    }
    let converged = conv.len();
    let left: BTreeSet<PeerId> = sim
        .pev
        .iter()
        .filter(|e| e.done && !e.joined)
        .map(|e| e.member)
        .collect();
    let left_still_listed: usize = sim
        .homes
        .iter()
        .flatten()
        .filter(|h| h.alive)
        .map(|h| {
            h.overlay
                .members(&sim.topic)
                .iter()
                .filter(|(m, _)| left.contains(m))
                .count()
        })
        .sum();
    // Crashed homes' members.
    let mut crashed_max = 0.0f64;
    let mut crashed_left = 0usize;
    for (d, home) in sim.homes.iter().enumerate() {
        let Some(dead) = home else { continue };
        let Some(died) = dead.died_at else { continue };
        let gone: BTreeSet<PeerId> = dead.members.iter().copied().collect();
        for (h, obs) in sim.homes.iter().enumerate() {
            let Some(obs) = obs else { continue };
            if !obs.alive {
                continue;
            }
            let left = obs
                .overlay
                .members(&sim.topic)
                .iter()
                .filter(|(m, _)| gone.contains(m))
                .count();
            crashed_left += left;
            if let Some(t) = sim.dropped_at.get(&(h, d)) {
                crashed_max = crashed_max.max((*t - died).as_secs_f64());
            }
        }
    }
    let mut stats = reach_proto::topics::OverlayStats::default();
    for h in sim.homes.iter().flatten() {
        let s = h.overlay.stats();
        stats.grafts_sent += s.grafts_sent;
        stats.prunes_sent += s.prunes_sent;
        stats.gaps_skipped += s.gaps_skipped;
        stats.refused_topic_rate += s.refused_topic_rate + s.refused_publisher_rate;
    }
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let report = TopicsReport {
        scenario: "topics",
        homes: p.homes,
        members: p.members,
        messages: p.messages,
        seed: p.seed,
        churn: p.churn,
        loss: p.loss,
        size: p.size,
        rate: p.rate,
        publishers,
        links_at_start,
        expected,
        delivery_rate: round6(ratio(on_time, expected)),
        delivery_rate_eventual: round6(ratio(eventually, expected)),
        duplicates_delivered: sim.duplicates,
        payload_copies_per_home_per_message: round6(ratio(sim.payload_frames, remote)),
        payload_copies_steady: round6(ratio(steady_frames, steady_remote)),
        control_bytes_per_payload_byte: round6(ratio(sim.control_bytes, sim.payload_bytes)),
        ihave_bytes_per_payload_byte: round6(ratio(sim.ihave_bytes, sim.payload_bytes)),
        presence_bytes_per_payload_byte: round6(ratio(sim.presence_bytes, sim.payload_bytes)),
        setup_control_bytes: sim.setup_bytes,
        latency_ms_p50: round3(quantile(&mut lat.clone(), 0.5)),
        latency_ms_p99: round3(quantile(&mut lat, 0.99)),
        shortest_path_ms_p50: round3(quantile(&mut bound.clone(), 0.5)),
        shortest_path_ms_p99: round3(quantile(&mut bound, 0.99)),
        presence_setup_complete,
        presence_events: done_events,
        presence_converged: converged,
        presence_convergence_ms_p50: round3(quantile(&mut conv.clone(), 0.5)),
        presence_convergence_ms_p99: round3(quantile(&mut conv.clone(), 0.99)),
        presence_convergence_ms_max: round3(quantile(&mut conv, 1.0)),
        presence_left_still_listed: left_still_listed,
        homes_crashed: crashed,
        homes_joined: churners,
        crashed_members_dropped_s_max: round3(crashed_max),
        crashed_members_left: crashed_left,
        grafts: stats.grafts_sent,
        prunes: stats.prunes_sent,
        gaps_skipped: stats.gaps_skipped,
        refused_publishes: stats.refused_topic_rate,
        virtual_s: round3(end.as_secs_f64()),
    };
    (report, started.elapsed())
}

/// [`run`] with the wall-clock figures.
pub fn run_with_wall(p: &TopicsParams) -> TopicsOutput {
    let (report, wall) = run(p);
    TopicsOutput {
        report,
        wall_s: round3(wall.as_secs_f64()),
        peak_rss_mib: round3(peak_rss_mib()),
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(homes: usize, messages: usize, churn: f64, loss: f64, seed: u64) -> TopicsParams {
        TopicsParams {
            homes,
            members: homes * 10,
            messages,
            seed,
            churn,
            loss,
            size: 1024,
            rate: 100.0,
        }
    }

    #[test]
    fn steady_state_meets_the_targets_and_is_deterministic() {
        // The 1,000 messages: control bytes are mostly presence,
        // whose [`PRESENCE_EVENTS`] are the same whatever the messages, so
        // fewer messages would test another ratio than the target's (300
        // gave 0.112 once presence was signed, 0.098 at the 100
        // homes).
        let p = params(30, 1_000, 0.0, 0.0, 7);
        let a = run(&p).0;
        eprintln!("{}", serde_json::to_string(&a).unwrap());
        assert_eq!(a.delivery_rate, 1.0);
        assert_eq!(a.duplicates_delivered, 0);
        assert!(a.payload_copies_steady <= 1.1, "{a:?}");
        assert!(a.payload_copies_per_home_per_message <= 1.3, "{a:?}");
        assert!(a.control_bytes_per_payload_byte <= 0.1, "{a:?}");
        assert!(a.presence_setup_complete);
        assert_eq!(a.presence_converged, a.presence_events);
        assert!(a.presence_convergence_ms_max <= 2_000.0, "{a:?}");
        assert_eq!(a.presence_left_still_listed, 0, "{a:?}");
        // The trees follow first arrivals: about the shortest path, which
        // per-frame jitter (±LINK_JITTER) lets no delivery beat by more.
        assert!(
            a.latency_ms_p50 >= a.shortest_path_ms_p50 * (1.0 - LINK_JITTER),
            "{a:?}"
        );
        assert!(a.latency_ms_p50 <= a.shortest_path_ms_p50 * 1.2, "{a:?}");
        assert_eq!(a, run(&p).0, "same seed, same report");
    }

    #[test]
    fn churn_and_loss_still_deliver_on_time_without_duplicates() {
        let a = run(&params(30, 300, 0.2, 0.01, 3)).0;
        eprintln!("{}", serde_json::to_string(&a).unwrap());
        assert!(a.delivery_rate >= 0.999, "{a:?}");
        assert_eq!(a.duplicates_delivered, 0);
        assert_eq!(a.homes_crashed, 6);
        assert_eq!(a.crashed_members_left, 0, "{a:?}");
        assert_eq!(a.presence_left_still_listed, 0, "{a:?}");
        assert!(a.crashed_members_dropped_s_max <= 20.0, "{a:?}");
    }
}
