//! Iterative Kademlia lookups across a simulated network.
//!
//! Every node has a real Ed25519 identity, a fake address (`10.x.y.z:4433`,
//! only a value: nothing touches the network, and the simulator reads a
//! contact's node index back from it), reach-proto's real [`RoutingTable`]
//! and [`RecordStore`], and the runtime's join and maintenance schedule:
//! reach-proto's [`Maintenance`] and [`JoinAttempt`] machines. Lookups are
//! reach-proto's real [`Lookup`] state machine and nodes answer with
//! reach-proto's [`server::answer`], as the runtime does; this module only
//! carries FindNode requests and responses over links with latency, jitter
//! and loss, and feeds back answers, timeouts and timers in virtual time.
//!
//! A run has two phases:
//!
//! 1. **Setup.** Nodes join in overlapping waves: join `i` starts at
//!    `i * SETUP_SPAN / nodes` of virtual time, with the same event machinery
//!    and link model as the measured phase (no instant-answer shortcut). A
//!    join is the runtime's [`JoinAttempt`]: the joiner's bootstrap is one
//!    random already-joined node, entered into its table; it looks up its
//!    own key, then refreshes every bucket its table has (at most
//!    [`MAX_JOIN_REFRESHES`], [`JOIN_PARALLEL_REFRESHES`] lookups at a
//!    time) with one lookup each for a random key in that bucket; it has
//!    joined when they have all finished. A self-lookup nobody answered (the
//!    bootstrap left, or a datagram was lost) fails the attempt, and
//!    [`Maintenance`] retries it with backoff through a fresh random
//!    bootstrap, at most [`MAX_JOIN_ATTEMPTS`] times. Joined nodes run
//!    [`Maintenance`]'s ticks every [`MAINTENANCE_TICK`]: bucket refreshes
//!    (counted in [`LookupReport::maintenance_lookups`]) and republishing
//!    (nothing to carry here: the simulator has no records in flight).
//!    Ticks stop at the end of the measurement window, so a run ends.
//!    Tables are built only by these protocols: requesters enter
//!    responders' tables (`on_seen`, every node is in server mode),
//!    responders enter requesters' tables, timed-out queries count as
//!    failures. (Joining strictly one after another took hours of virtual
//!    time for 10,000 nodes, over which, with packet loss, idle nodes slowly
//!    dropped out of every table.)
//! 2. **Measurement.** `lookups` lookups start at random times over
//!    `window`, each from a random live node for the key of another random
//!    live node ("live" = joined and not left). With churn `C`, `C * nodes`
//!    random live nodes leave silently (their entries stay in others' tables
//!    until queries to them fail) and as many fresh nodes run the full join
//!    procedure, at random times over the same window.
//!
//! A lookup succeeds if its result ([`Lookup::closest`]) holds the target
//! node. Its closest-found share is the overlap of that result with the true
//! k closest nodes alive when it finished (brute force, requester excluded).
//! A lookup whose requester or target left while it ran cannot be judged
//! fairly either way; it is reported apart ([`LookupReport::requester_left`],
//! [`LookupReport::target_left`]) and `success_rate_all` counts it as a
//! failure.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use reach_proto::dht::lookup::{Lookup, LookupConfig};
use reach_proto::dht::maintenance::{Action, JoinAction, JoinAttempt, JoinOutcome, Maintenance};
#[cfg(doc)]
use reach_proto::dht::maintenance::{
    JOIN_PARALLEL_REFRESHES, MAINTENANCE_TICK, MAX_JOIN_REFRESHES,
};
use reach_proto::dht::routing::{RoutingConfig, RoutingTable};
use reach_proto::dht::rpc::{DhtRequest, DhtResponse};
use reach_proto::dht::server;
use reach_proto::dht::store::{RecordStore, StoreLimits};
use reach_proto::dht::{Contact, Distance, Key};
use reach_proto::{Keypair, PeerId};
use serde::Serialize;

use crate::engine::EventQueue;
use crate::net::LinkModel;
use crate::rng::Rng;
use crate::stats::{peak_rss_mib, quantile};

/// Largest `nodes` accepted. Churn adds at most as many fresh nodes again,
/// and every node needs a distinct `10.x.y.z` address (2^24 - 2 of them).
pub const MAX_NODES: usize = 4_000_000;
/// Largest number of measured lookups accepted.
pub const MAX_LOOKUPS: usize = 10_000_000;
/// Default virtual time over which measured lookups and churn are spread.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);
/// Longest measurement window accepted.
pub const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Join attempts of a node whose self-lookups get no answer (its bootstrap
/// node left, or a packet was lost), each through a fresh random bootstrap
/// node, before the simulator gives up on it (the runtime retries forever;
/// a run must end). With [`Maintenance`]'s backoff the fifth attempt starts
/// 15 s after the first.
pub const MAX_JOIN_ATTEMPTS: u32 = 5;
/// Jitter of every link, as a fraction of its latency.
pub const LINK_JITTER: f64 = 0.1;
/// Virtual time over which the setup joins start (evenly spaced). Half the
/// runtime's 10-minute bucket-refresh interval, which is not simulated.
pub const SETUP_SPAN: Duration = Duration::from_secs(300);

/// Parameters of a lookup run.
#[derive(Debug, Clone)]
pub struct LookupParams {
    pub nodes: usize,
    pub lookups: usize,
    pub seed: u64,
    pub link: LinkModel,
    /// Fraction of nodes replaced during the measured phase (0..=1).
    pub churn: f64,
    /// Virtual time over which measured lookups and churn are spread.
    pub window: Duration,
}

/// The JSON report of a lookup run (everything here depends only on the
/// parameters, seed included).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LookupReport {
    pub scenario: &'static str,
    pub nodes: usize,
    pub lookups: usize,
    pub seed: u64,
    pub latency_ms: f64,
    pub loss: f64,
    pub churn: f64,
    pub window_s: f64,
    /// Lookups judged: requester and target both still live when it ended.
    pub judged: usize,
    /// Lookups whose requester left while they ran (abandoned).
    pub requester_left: usize,
    /// Lookups whose target left while they ran.
    pub target_left: usize,
    /// Lookups never started (fewer than two live nodes) or still running
    /// at the end (cannot happen: every query times out).
    pub not_run: usize,
    /// Judged lookups whose result held the target.
    pub successes: usize,
    /// `successes / judged`.
    pub success_rate: f64,
    /// `successes / lookups`: lookups not judged count as failures.
    pub success_rate_all: f64,
    /// Mean share of the true k closest live nodes in the result.
    pub closest_found_rate: f64,
    pub hops_p50: f64,
    pub hops_p99: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    /// Requests plus responses sent (lost ones included) per judged lookup.
    pub msgs_per_lookup: f64,
    /// Timed-out queries per judged lookup.
    pub timeouts_per_lookup: f64,
    /// Routing-table entries per live node at the end.
    pub table_size_mean: f64,
    /// Allocated buckets per live node at the end.
    pub buckets_mean: f64,
    /// Lookups run by joins (self-lookups and bucket refreshes).
    pub join_lookups: usize,
    /// Bucket refreshes run by maintenance ticks of joined nodes.
    pub maintenance_lookups: usize,
    /// Joins that gave up after [`MAX_JOIN_ATTEMPTS`] bootstraps.
    pub join_failures: usize,
    /// Nodes that left / fresh nodes that joined during measurement.
    pub churn_left: usize,
    pub churn_joined: usize,
    /// Virtual time when the setup phase ended, and at the end of the run.
    pub setup_virtual_s: f64,
    pub virtual_s: f64,
}

/// Why a lookup runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    JoinSelf,
    JoinRefresh,
    /// A maintenance tick's bucket refresh.
    Refresh,
    /// Measured lookup number `idx`.
    Measured(usize),
}

/// A lookup in progress.
struct Active {
    owner: usize,
    purpose: Purpose,
    lookup: Lookup,
    /// When a [`Ev::Wake`] is already scheduled for it.
    wake_at: Option<Duration>,
}

/// Lookup ids index [`Sim::lookups`]; ids are never reused, so a stale
/// event can never reach a younger lookup.
type LookupId = usize;

/// Tag carried by messages of measured lookups, for counting them.
const UNTAGGED: usize = usize::MAX;

enum Ev {
    /// A node starts joining (setup phase or churn).
    JoinStart { node: usize },
    /// `node`'s [`Maintenance`] asked to be woken at `at`.
    Maintenance { node: usize, at: Duration },
    /// A FindNode request arrives at `to`.
    Request {
        from: usize,
        to: usize,
        lookup: LookupId,
        target: Key,
        tag: usize,
    },
    /// A FindNode response arrives at `to`.
    Response {
        from: usize,
        to: usize,
        lookup: LookupId,
        closer: Vec<Contact>,
    },
    /// `lookup` asked to be woken now ([`Lookup::poll_timeout`]): queries
    /// may have timed out or be due again.
    Wake { lookup: LookupId },
    /// Measured lookup `idx` starts.
    MeasureStart { idx: usize },
    /// A random live node leaves.
    Leave,
}

struct Node {
    peer: PeerId,
    key: Key,
    table: RoutingTable,
    /// Records held for others (none travel in this scenario, but FindNode
    /// is answered by the same function that would answer for them).
    store: RecordStore,
    alive: bool,
    /// Finished its join procedure (bootstrap, self-lookup, refreshes).
    joined: bool,
    /// Gave up joining after [`MAX_JOIN_ATTEMPTS`]: no longer driven.
    gave_up: bool,
    /// Join attempts since the last successful join.
    join_attempts: u32,
    maintenance: Maintenance,
    /// The join running, if one is.
    join: Option<JoinAttempt>,
    /// When a [`Ev::Maintenance`] is scheduled for it.
    maintenance_wake: Option<Duration>,
    /// Index in [`Sim::live`], when in it.
    live_pos: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Running,
    RequesterLeft,
    TargetLeft,
    Judged {
        success: bool,
        /// Result ∩ truth, and the size of the truth.
        found: usize,
        truth: usize,
        hops: u32,
        latency: Duration,
        timeouts: u32,
    },
}

struct Measured {
    from: usize,
    target: usize,
    started: Duration,
    msgs: u64,
    verdict: Verdict,
}

struct Sim<'a> {
    p: &'a LookupParams,
    rng: Rng,
    q: EventQueue<Ev>,
    lcfg: LookupConfig,
    rcfg: RoutingConfig,
    nodes: Vec<Node>,
    /// Nodes alive and joined: requesters, targets and bootstraps.
    live: Vec<usize>,
    lookups: Vec<Option<Box<Active>>>,
    measured: Vec<Measured>,
    setup_end: Option<Duration>,
    /// Setup joins not finished yet.
    setup_pending: usize,
    join_lookups: usize,
    maintenance_lookups: usize,
    join_failures: usize,
    churn_left: usize,
    /// Virtual time of the last event that did something (maintenance
    /// wakes past the end of the run do nothing).
    last_active: Duration,
    churn_joined: usize,
}

/// The fake address of node `i`: `10.0.0.0 + i + 1`, port 4433.
fn addr_of(i: usize) -> SocketAddr {
    let ip = Ipv4Addr::from(0x0A00_0000u32.wrapping_add(i as u32).wrapping_add(1));
    SocketAddr::V4(SocketAddrV4::new(ip, 4433))
}

/// The node index behind an address made by [`addr_of`].
fn index_of(addr: &SocketAddr) -> Option<usize> {
    match addr {
        SocketAddr::V4(v4) => {
            let n = u32::from(*v4.ip()).checked_sub(0x0A00_0001)?;
            (n < 1 << 24).then_some(n as usize)
        }
        SocketAddr::V6(_) => None,
    }
}

impl<'a> Sim<'a> {
    fn new(p: &'a LookupParams, total_nodes: usize) -> Self {
        let mut rng = Rng::new(p.seed);
        let rcfg = RoutingConfig {
            // Sim addresses are fake: the subnet limit would only bite on
            // the shared 10.0.0.0/8 numbering.
            max_per_subnet: usize::MAX,
            ..RoutingConfig::default()
        };
        let nodes = (0..total_nodes)
            .map(|_| {
                let peer = Keypair::from_secret_bytes(rng.bytes32()).peer_id();
                Node {
                    peer,
                    key: Key::for_peer(&peer),
                    table: RoutingTable::new(peer, rcfg),
                    store: RecordStore::new(StoreLimits::default()),
                    alive: false,
                    joined: false,
                    gave_up: false,
                    join_attempts: 0,
                    maintenance: Maintenance::new(),
                    join: None,
                    maintenance_wake: None,
                    live_pos: None,
                }
            })
            .collect();
        Sim {
            p,
            rng,
            q: EventQueue::default(),
            lcfg: LookupConfig::default(),
            rcfg,
            nodes,
            live: Vec::new(),
            lookups: Vec::new(),
            measured: Vec::new(),
            setup_end: None,
            setup_pending: p.nodes,
            join_lookups: 0,
            maintenance_lookups: 0,
            join_failures: 0,
            last_active: Duration::ZERO,
            churn_left: 0,
            churn_joined: 0,
        }
    }

    fn contact(&self, i: usize) -> Contact {
        Contact::new(self.nodes[i].peer, addr_of(i))
    }

    fn live_add(&mut self, i: usize) {
        if self.nodes[i].live_pos.is_none() {
            self.nodes[i].live_pos = Some(self.live.len());
            self.live.push(i);
        }
    }

    fn live_remove(&mut self, i: usize) {
        if let Some(pos) = self.nodes[i].live_pos.take() {
            self.live.swap_remove(pos);
            if let Some(&moved) = self.live.get(pos) {
                self.nodes[moved].live_pos = Some(pos);
            }
        }
    }

    /// A random live node other than `except`, if there is one.
    fn random_live(&mut self, except: Option<usize>) -> Option<usize> {
        let n = self.live.len();
        let skip = except.and_then(|e| self.nodes[e].live_pos);
        let choices = n - usize::from(skip.is_some());
        if choices == 0 {
            return None;
        }
        let mut pos = self.rng.below(choices as u64) as usize;
        if skip.is_some_and(|s| pos >= s) {
            pos += 1;
        }
        Some(self.live[pos])
    }

    /// Carries out what `node`'s join attempt and maintenance ask for,
    /// until neither asks anything more, then sleeps until the next
    /// maintenance timer. Lookups that finish at once (no seeds) re-enter
    /// here; every step re-reads the machines, so that is harmless.
    fn drive(&mut self, node: usize) {
        let now = self.q.now();
        loop {
            let n = &mut self.nodes[node];
            if !n.alive || n.gave_up {
                return;
            }
            if let Some(j) = n.join.as_mut() {
                if let Some(action) = j.poll_action() {
                    self.join_action(node, action);
                    continue;
                }
                if let Some(outcome) = j.outcome() {
                    n.join = None;
                    if outcome == JoinOutcome::Joined {
                        n.join_attempts = 0;
                        if !n.joined {
                            self.complete_join(node);
                        }
                    }
                    self.nodes[node].maintenance.join_done(now, outcome);
                    continue;
                }
            }
            let Some(action) = self.nodes[node].maintenance.poll_action() else {
                break;
            };
            match action {
                Action::Join => {
                    let n = &mut self.nodes[node];
                    if n.join_attempts >= MAX_JOIN_ATTEMPTS {
                        n.gave_up = true;
                        self.join_failures += 1;
                        // Still alive (it answers whoever learnt of it),
                        // but never a requester, target or bootstrap.
                        self.setup_join_done(node);
                        return;
                    }
                    n.join_attempts += 1;
                    n.join = Some(JoinAttempt::new());
                }
                Action::Refresh { bucket } => {
                    let key = self.nodes[node]
                        .key
                        .random_in_bucket(bucket, self.rng.bytes32());
                    self.start_lookup(node, key, Purpose::Refresh);
                }
                // No records travel in this scenario: publishing is done
                // as soon as asked.
                Action::Republish => self.nodes[node].maintenance.published(now),
                Action::ExpireRecords => {
                    let now_ms = now.as_millis() as u64;
                    self.nodes[node].store.expire(now_ms);
                }
                // No disk in the simulator.
                Action::SavePeerCache => {}
            }
        }
        self.schedule_maintenance(node);
    }

    fn join_action(&mut self, node: usize, action: JoinAction) {
        match action {
            JoinAction::Bootstrap => {
                let now = self.q.now();
                let Some(boot) = self.random_live(Some(node)) else {
                    // The first node: nobody to ask.
                    let n = &mut self.nodes[node];
                    if let Some(j) = n.join.as_mut() {
                        j.self_lookup_done(true, &n.table);
                    }
                    return;
                };
                let c = self.contact(boot);
                let n = &mut self.nodes[node];
                n.table.add_unknown(c, now);
                let key = n.key;
                self.start_lookup(node, key, Purpose::JoinSelf);
            }
            JoinAction::Refresh { bucket } => {
                let key = self.nodes[node]
                    .key
                    .random_in_bucket(bucket, self.rng.bytes32());
                self.start_lookup(node, key, Purpose::JoinRefresh);
            }
        }
    }

    /// The end of the measurement window, once known: maintenance ticks
    /// past it are not run.
    fn horizon(&self) -> Option<Duration> {
        self.setup_end.map(|s| s + self.p.window)
    }

    fn schedule_maintenance(&mut self, node: usize) {
        let now = self.q.now();
        let n = &self.nodes[node];
        let Some(at) = n.maintenance.poll_timeout() else {
            return;
        };
        if n.maintenance_wake == Some(at) || self.past_horizon(node, at) {
            return;
        }
        self.nodes[node].maintenance_wake = Some(at);
        self.q
            .schedule(at.saturating_sub(now), Ev::Maintenance { node, at });
    }

    /// Whether a maintenance tick of `node` at `at` falls after the run
    /// (join retries always run: they are bounded by [`MAX_JOIN_ATTEMPTS`]).
    fn past_horizon(&self, node: usize, at: Duration) -> bool {
        self.nodes[node].maintenance.is_joined() && self.horizon().is_some_and(|h| at > h)
    }

    fn complete_join(&mut self, node: usize) {
        self.nodes[node].joined = true;
        self.live_add(node);
        self.setup_join_done(node);
    }

    /// `node` is done joining (joined or gave up): once every setup node is,
    /// the measurement starts.
    fn setup_join_done(&mut self, node: usize) {
        if node < self.p.nodes && self.setup_end.is_none() {
            self.setup_pending = self.setup_pending.saturating_sub(1);
            if self.setup_pending == 0 {
                self.start_measurement();
            }
        }
    }

    fn start_measurement(&mut self) {
        self.setup_end = Some(self.q.now());
        let window_us = self.p.window.as_micros().max(1) as u64;
        for idx in 0..self.p.lookups {
            let at = Duration::from_micros(self.rng.below(window_us));
            self.q.schedule(at, Ev::MeasureStart { idx });
        }
        let churners = self.nodes.len() - self.p.nodes;
        for i in 0..churners {
            let at = Duration::from_micros(self.rng.below(window_us));
            self.q.schedule(at, Ev::Leave);
            let at = Duration::from_micros(self.rng.below(window_us));
            self.q.schedule(
                at,
                Ev::JoinStart {
                    node: self.p.nodes + i,
                },
            );
        }
        self.measured = (0..self.p.lookups)
            .map(|_| Measured {
                from: 0,
                target: 0,
                started: Duration::ZERO,
                msgs: 0,
                verdict: Verdict::Running,
            })
            .collect();
    }

    fn start_lookup(&mut self, owner: usize, target: Key, purpose: Purpose) {
        let seeds = self.nodes[owner].table.closest(&target, self.lcfg.k);
        let lookup = Lookup::new(target, self.nodes[owner].peer, seeds, self.lcfg);
        let id = self.lookups.len();
        self.lookups.push(Some(Box::new(Active {
            owner,
            purpose,
            lookup,
            wake_at: None,
        })));
        match purpose {
            Purpose::JoinSelf | Purpose::JoinRefresh => self.join_lookups += 1,
            Purpose::Refresh => self.maintenance_lookups += 1,
            Purpose::Measured(_) => {}
        }
        self.step(id);
    }

    /// Sends whatever the lookup wants sent, then finishes it if done.
    fn step(&mut self, id: LookupId) {
        let now = self.q.now();
        let Some(a) = self.lookups.get_mut(id).and_then(|a| a.as_deref_mut()) else {
            return;
        };
        let owner = a.owner;
        let tag = match a.purpose {
            Purpose::Measured(idx) => idx,
            _ => UNTAGGED,
        };
        let target = a.lookup.target();
        loop {
            let queries = a.lookup.poll_queries(now);
            if queries.is_empty() {
                break;
            }
            for c in queries {
                let Some(to) = index_of(&c.addr).filter(|&to| to < self.nodes.len()) else {
                    // Not a simulated node: cannot happen, but fail it
                    // rather than wait for a timeout.
                    a.lookup.on_failure(&c.peer);
                    continue;
                };
                if let Some(m) = self.measured.get_mut(tag) {
                    m.msgs += 1;
                }
                if let Some(d) = self.p.link.delay(&mut self.rng) {
                    self.q.schedule(
                        d,
                        Ev::Request {
                            from: owner,
                            to,
                            lookup: id,
                            target,
                            tag,
                        },
                    );
                }
            }
        }
        if a.lookup.is_finished() {
            self.finish(id);
            return;
        }
        // Sleep until the lookup next needs us, like the runtime does.
        if let Some(at) = a.lookup.poll_timeout()
            && a.wake_at.is_none_or(|w| at < w || w < now)
        {
            a.wake_at = Some(at);
            self.q
                .schedule(at.saturating_sub(now), Ev::Wake { lookup: id });
        }
    }

    /// The lookup if it is still running and its owner still alive; a
    /// lookup whose owner left is abandoned here.
    fn running(&mut self, id: LookupId) -> Option<&mut Active> {
        let owner = self.lookups.get(id)?.as_ref()?.owner;
        if !self.nodes[owner].alive {
            if let Some(a) = self.lookups[id].take()
                && let Purpose::Measured(idx) = a.purpose
            {
                self.measured[idx].verdict = Verdict::RequesterLeft;
            }
            return None;
        }
        self.lookups[id].as_deref_mut()
    }

    fn finish(&mut self, id: LookupId) {
        let Some(a) = self.lookups.get_mut(id).and_then(Option::take) else {
            return;
        };
        let now = self.q.now();
        let owner = a.owner;
        let target = a.lookup.target();
        self.nodes[owner].table.mark_refreshed(&target, now);
        let node = &mut self.nodes[owner];
        match a.purpose {
            Purpose::JoinSelf => {
                // Answered means someone answered the self-lookup. The
                // table is no judge: the silent bootstrap stays in it (of
                // unknown health) after one failure, and refreshing the
                // buckets it spans never finds our own neighbourhood.
                let answered = !a.lookup.closest().is_empty();
                if let Some(j) = node.join.as_mut() {
                    j.self_lookup_done(answered, &node.table);
                }
                self.drive(owner);
            }
            Purpose::JoinRefresh => {
                if let Some(j) = node.join.as_mut() {
                    j.refresh_done();
                }
                self.drive(owner);
            }
            Purpose::Refresh => {}
            Purpose::Measured(idx) => self.judge(idx, &a.lookup, now),
        }
    }

    fn judge(&mut self, idx: usize, lookup: &Lookup, now: Duration) {
        let m = &self.measured[idx];
        let (from, target, started) = (m.from, m.target, m.started);
        if !self.nodes[target].alive {
            self.measured[idx].verdict = Verdict::TargetLeft;
            return;
        }
        let key = lookup.target();
        let result = lookup.closest();
        let target_peer = self.nodes[target].peer;
        let success = result.iter().any(|c| c.peer == target_peer);
        // The true k closest nodes alive now, requester excluded.
        let mut all: Vec<(Distance, usize)> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| n.alive && *i != from)
            .map(|(i, n)| (n.key.distance(&key), i))
            .collect();
        let k = self.lcfg.k;
        if all.len() > k {
            all.select_nth_unstable(k);
            all.truncate(k);
        }
        let found = result
            .iter()
            .filter(|c| index_of(&c.addr).is_some_and(|i| all.iter().any(|&(_, t)| t == i)))
            .count();
        let stats = lookup.stats();
        self.measured[idx].verdict = Verdict::Judged {
            success,
            found,
            truth: all.len(),
            hops: stats.hops,
            latency: now.saturating_sub(started),
            timeouts: stats.failures,
        };
    }

    /// Handles `ev`; false if it did nothing (a maintenance wake that is
    /// stale or past the end of the run).
    fn on_event(&mut self, ev: Ev) -> bool {
        let now = self.q.now();
        match ev {
            Ev::JoinStart { node } => {
                if node >= self.p.nodes {
                    self.churn_joined += 1;
                }
                self.nodes[node].alive = true;
                self.drive(node);
            }
            Ev::Maintenance { node, at } => {
                let n = &self.nodes[node];
                if !n.alive || n.gave_up || n.maintenance_wake != Some(at) {
                    return false;
                }
                self.nodes[node].maintenance_wake = None;
                if self.past_horizon(node, at) {
                    return false;
                }
                let n = &mut self.nodes[node];
                n.maintenance.handle_timeout(now, &n.table);
                self.drive(node);
            }
            Ev::Request {
                from,
                to,
                lookup,
                target,
                tag,
            } => {
                if !self.nodes[to].alive {
                    return true; // the dead never answer
                }
                let n = &mut self.nodes[to];
                let request = DhtRequest::FindNode { target };
                let now_ms = now.as_millis() as u64;
                let near = server::Neighbourhood::of(&n.table, &request);
                let closer = match server::answer(&near, &mut n.store, request, None, now_ms) {
                    DhtResponse::Nodes { closer } => closer,
                    _ => Vec::new(),
                };
                let c = self.contact(from);
                self.nodes[to].table.on_seen(c, now);
                if let Some(m) = self.measured.get_mut(tag) {
                    m.msgs += 1;
                }
                if let Some(d) = self.p.link.delay(&mut self.rng) {
                    self.q.schedule(
                        d,
                        Ev::Response {
                            from: to,
                            to: from,
                            lookup,
                            closer,
                        },
                    );
                }
            }
            Ev::Response {
                from,
                to,
                lookup,
                closer,
            } => {
                if !self.nodes[to].alive {
                    return true;
                }
                let c = self.contact(from);
                self.nodes[to].table.on_seen(c, now);
                let peer = self.nodes[from].peer;
                if let Some(a) = self.running(lookup) {
                    a.lookup.on_response(&peer, &closer);
                    self.step(lookup);
                }
            }
            Ev::Wake { lookup } => {
                let Some(a) = self.running(lookup) else {
                    return true;
                };
                if a.wake_at == Some(now) {
                    a.wake_at = None;
                }
                let owner = a.owner;
                let failed = a.lookup.handle_timeout(now);
                for peer in &failed {
                    self.nodes[owner].table.on_failure(peer);
                }
                self.step(lookup);
            }
            Ev::MeasureStart { idx } => {
                let Some(from) = self.random_live(None) else {
                    return true;
                };
                let Some(target) = self.random_live(Some(from)) else {
                    return true;
                };
                self.measured[idx] = Measured {
                    from,
                    target,
                    started: now,
                    msgs: 0,
                    verdict: Verdict::Running,
                };
                let key = self.nodes[target].key;
                self.start_lookup(from, key, Purpose::Measured(idx));
            }
            Ev::Leave => {
                // Keep at least two live nodes so lookups stay possible.
                if self.live.len() <= 2 {
                    return true;
                }
                let Some(node) = self.random_live(None) else {
                    return true;
                };
                self.live_remove(node);
                let n = &mut self.nodes[node];
                n.alive = false;
                // Its state is gone with it; free the memory.
                n.table = RoutingTable::new(n.peer, self.rcfg);
                n.store = RecordStore::new(StoreLimits::default());
                n.join = None;
                self.churn_left += 1;
            }
        }
        true
    }

    fn report(self) -> LookupReport {
        let p = self.p;
        let mut judged = 0;
        let mut requester_left = 0;
        let mut target_left = 0;
        let mut not_run = 0;
        let mut successes = 0;
        let mut found_sum = 0.0;
        let mut hops = Vec::new();
        let mut latencies = Vec::new();
        let mut msgs = 0u64;
        let mut timeouts = 0u64;
        for m in &self.measured {
            match m.verdict {
                Verdict::Running => not_run += 1,
                Verdict::RequesterLeft => requester_left += 1,
                Verdict::TargetLeft => target_left += 1,
                Verdict::Judged {
                    success,
                    found,
                    truth,
                    hops: h,
                    latency,
                    timeouts: t,
                } => {
                    judged += 1;
                    successes += usize::from(success);
                    found_sum += ratio(found, truth.min(self.lcfg.k));
                    hops.push(f64::from(h));
                    latencies.push(latency.as_secs_f64() * 1000.0);
                    msgs += m.msgs;
                    timeouts += u64::from(t);
                }
            }
        }
        let live: Vec<&Node> = self.live.iter().map(|&i| &self.nodes[i]).collect();
        let table_size_mean = mean(live.iter().map(|n| n.table.len() as f64));
        let buckets_mean = mean(live.iter().map(|n| n.table.bucket_count() as f64));
        LookupReport {
            scenario: "lookup",
            nodes: p.nodes,
            lookups: p.lookups,
            seed: p.seed,
            latency_ms: p.link.latency.as_secs_f64() * 1000.0,
            loss: p.link.loss,
            churn: p.churn,
            window_s: p.window.as_secs_f64(),
            judged,
            requester_left,
            target_left,
            not_run,
            successes,
            success_rate: round3(ratio(successes, judged)),
            success_rate_all: round3(ratio(successes, p.lookups)),
            closest_found_rate: round3(if judged == 0 {
                0.0
            } else {
                found_sum / judged as f64
            }),
            hops_p50: quantile(&mut hops, 0.5),
            hops_p99: quantile(&mut hops, 0.99),
            latency_ms_p50: round3(quantile(&mut latencies, 0.5)),
            latency_ms_p99: round3(quantile(&mut latencies, 0.99)),
            msgs_per_lookup: round3(msgs as f64 / judged.max(1) as f64),
            timeouts_per_lookup: round3(timeouts as f64 / judged.max(1) as f64),
            table_size_mean: round3(table_size_mean),
            buckets_mean: round3(buckets_mean),
            join_lookups: self.join_lookups,
            maintenance_lookups: self.maintenance_lookups,
            join_failures: self.join_failures,
            churn_left: self.churn_left,
            churn_joined: self.churn_joined,
            setup_virtual_s: round3(self.setup_end.unwrap_or_default().as_secs_f64()),
            virtual_s: round3(self.last_active.as_secs_f64()),
        }
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { 0.0 } else { sum / n as f64 }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Fresh nodes joining during measurement: `churn * nodes`, rounded
/// (`churn` already clamped to 0..=1).
fn churners(p: &LookupParams) -> usize {
    (p.churn * p.nodes as f64).round() as usize
}

/// Runs the scenario. Returns the report, the real time it took and the
/// real time of the setup phase. Parameters beyond the limits are clamped
/// to them (the report shows what ran).
pub fn run(p: &LookupParams) -> (LookupReport, Duration, Duration) {
    let started = Instant::now();
    let p = &LookupParams {
        nodes: p.nodes.min(MAX_NODES),
        lookups: p.lookups.min(MAX_LOOKUPS),
        churn: if p.churn.is_nan() {
            0.0
        } else {
            p.churn.clamp(0.0, 1.0)
        },
        window: p.window.min(MAX_WINDOW),
        ..p.clone()
    };
    let total = p.nodes + churners(p);
    let mut sim = Sim::new(p, total);
    let mut setup_wall = None;
    // Joins start evenly spaced over SETUP_SPAN.
    let spacing = SETUP_SPAN / u32::try_from(p.nodes.max(1)).unwrap_or(u32::MAX);
    let mut at = Duration::ZERO;
    for node in 0..p.nodes {
        sim.q.schedule(at, Ev::JoinStart { node });
        at += spacing;
    }
    while let Some((at, ev)) = sim.q.pop() {
        if sim.on_event(ev) {
            sim.last_active = at;
        }
        if setup_wall.is_none() && sim.setup_end.is_some() {
            setup_wall = Some(started.elapsed());
        }
    }
    let setup_wall = setup_wall.unwrap_or_else(|| started.elapsed());
    (sim.report(), started.elapsed(), setup_wall)
}

/// The report plus real-time figures that vary between runs.
#[derive(Debug, Serialize)]
pub struct LookupOutput {
    #[serde(flatten)]
    pub report: LookupReport,
    pub setup_s: f64,
    pub wall_s: f64,
    pub peak_rss_mib: f64,
}

/// Runs and adds the real-time figures.
pub fn run_with_wall(p: &LookupParams) -> LookupOutput {
    let (report, wall, setup) = run(p);
    LookupOutput {
        report,
        setup_s: round3(setup.as_secs_f64()),
        wall_s: round3(wall.as_secs_f64()),
        peak_rss_mib: round3(peak_rss_mib()),
    }
}

/// The link model of the CLI: `latency` one-way, [`LINK_JITTER`], `loss`.
pub fn link(latency: Duration, loss: f64) -> LinkModel {
    LinkModel {
        latency,
        jitter: LINK_JITTER,
        loss,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(nodes: usize, seed: u64, loss: f64, churn: f64) -> LookupParams {
        LookupParams {
            nodes,
            lookups: 100,
            seed,
            link: link(Duration::from_millis(50), loss),
            churn,
            window: Duration::from_secs(5),
        }
    }

    #[test]
    fn addresses_map_back_to_nodes() {
        for i in [0, 1, 255, 256, 65_535, 1 << 20, (1 << 24) - 2] {
            assert_eq!(index_of(&addr_of(i)), Some(i));
        }
        assert_eq!(index_of(&SocketAddr::from(([127, 0, 0, 1], 1))), None);
    }

    #[test]
    fn same_seed_same_report_and_small_network_finds_everything() {
        let p = params(300, 3, 0.0, 0.0);
        let a = run(&p).0;
        assert_eq!(a, run(&p).0);
        assert_eq!(a.judged, 100);
        assert_eq!(a.success_rate, 1.0, "{a:?}");
        assert!(a.closest_found_rate >= 0.95, "{a:?}");
        assert!(a.hops_p50 >= 1.0 && a.msgs_per_lookup > 0.0, "{a:?}");
        assert_ne!(a, run(&params(300, 4, 0.0, 0.0)).0);
    }

    #[test]
    fn churn_and_loss_still_terminate_and_report() {
        let r = run(&params(300, 5, 0.02, 0.3)).0;
        assert_eq!(r.churn_left, 90);
        assert_eq!(r.churn_joined, 90);
        assert_eq!(r.not_run, 0);
        assert_eq!(r.judged + r.requester_left + r.target_left, r.lookups);
        assert!(r.judged > 0);
        assert!((0.0..=1.0).contains(&r.success_rate));
        assert!(r.success_rate > 0.8, "{r:?}");
        assert!(r.timeouts_per_lookup > 0.0, "{r:?}");
    }
}
