//! A simulated DHT network, shared by the scenarios that need one
//! (`lookup`, `mailbox`).
//!
//! Every node has a real Ed25519 identity, a fake address (`10.x.y.z:4433`,
//! only a value: nothing touches the network, and the simulator reads a
//! contact's node index back from it), reach-proto's real [`RoutingTable`]
//! and [`RecordStore`], and the runtime's join and maintenance schedule:
//! reach-proto's [`Maintenance`] and [`JoinAttempt`] machines. Lookups are
//! reach-proto's real [`Lookup`] state machine and nodes answer with
//! reach-proto's [`server::answer`], as the runtime does; this module only
//! carries requests and responses over links with latency, jitter and loss,
//! and feeds back answers, timeouts and timers in virtual time.
//!
//! **Setup.** Nodes join in overlapping waves: join `i` starts at
//! `i * SETUP_SPAN / nodes` of virtual time (the scenario schedules them),
//! with the same event machinery and link model as the measured phase (no
//! instant-answer shortcut). A join is the runtime's [`JoinAttempt`]: the
//! joiner's bootstrap is one random already-joined node, entered into its
//! table; it looks up its own key, then refreshes every bucket its table has
//! (at most [`MAX_JOIN_REFRESHES`], [`JOIN_PARALLEL_REFRESHES`] lookups at a
//! time) with one lookup each for a random key in that bucket; it has joined
//! when they have all finished. A self-lookup nobody answered (the bootstrap
//! left, or a datagram was lost) fails the attempt, and [`Maintenance`]
//! retries it with backoff through a fresh random bootstrap, at most
//! [`MAX_JOIN_ATTEMPTS`] times. Joined nodes run [`Maintenance`]'s ticks
//! (every [`MAINTENANCE_TICK`], or every [`Net::tick`] when a scenario
//! coarsens them): bucket refreshes (counted in
//! [`Net::maintenance_lookups`]), expiry of stored records, and
//! republishing (nothing to carry: no node here publishes an endpoint
//! record). Ticks stop at [`Net::horizon`], so a run ends. Tables are built
//! only by these protocols: requesters enter responders' tables (`on_seen`,
//! every node is in server mode), responders of lookup queries enter
//! requesters' tables, timed-out queries count as failures. (Joining
//! strictly one after another took hours of virtual time for 10,000 nodes,
//! over which, with packet loss, idle nodes slowly dropped out of every
//! table.)
//!
//! **Records.** A request is any [`DhtRequest`]: FindNode, GetRecords (a
//! lookup collects every valid record of the asked kind at its key from
//! every node it queries, as the runtime's `Dht::lookup` does) or
//! PutRecord (answered by [`server::answer`], so the store's limits and the
//! "among the closest" rule apply, with the sender's network as the
//! [`Source`]). As in the runtime's `Dht::saw`, a contact new to a routing
//! table ([`InsertOutcome::Inserted`]) is handed the records it should now
//! hold and that this node is the closest holder of
//! ([`RecordStore::handoff`], at most [`MAX_HANDOFF_RECORDS`]), each as a
//! PutRecord request. (The runtime sends them one after another and stops
//! at the first failure; here they leave at once and each may be lost.)
//!
//! A scenario plugs in through [`Scenario`]: its own events, what happens
//! when setup is done, when a node has joined, and when one of its lookups
//! or puts finishes.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use reach_proto::dht::lookup::{Lookup, LookupConfig};
use reach_proto::dht::maintenance::{Action, JoinAction, JoinAttempt, JoinOutcome, Maintenance};
#[cfg(doc)]
use reach_proto::dht::maintenance::{
    JOIN_PARALLEL_REFRESHES, MAINTENANCE_TICK, MAX_JOIN_REFRESHES,
};
use reach_proto::dht::record::{RecordKind, SignedRecord};
use reach_proto::dht::routing::{InsertOutcome, RoutingConfig, RoutingTable};
use reach_proto::dht::rpc::{DhtRequest, DhtResponse};
use reach_proto::dht::server;
use reach_proto::dht::store::{MAX_HANDOFF_RECORDS, RecordStore, Source, StoreLimits};
use reach_proto::dht::{Contact, Key};
use reach_proto::{Keypair, PeerId};

use crate::engine::EventQueue;
use crate::net::LinkModel;
use crate::rng::Rng;

/// Join attempts of a node whose self-lookups get no answer (its bootstrap
/// node left, or a packet was lost), each through a fresh random bootstrap
/// node, before the simulator gives up on it (the runtime retries forever;
/// a run must end). With [`Maintenance`]'s backoff the fifth attempt starts
/// 15 s after the first.
pub const MAX_JOIN_ATTEMPTS: u32 = 5;
/// Virtual time over which the setup joins start (evenly spaced). Half the
/// runtime's 10-minute bucket-refresh interval.
pub const SETUP_SPAN: Duration = Duration::from_secs(300);
/// Tag of requests and lookups no scenario asked for (joins, maintenance,
/// hand-offs).
pub const UNTAGGED: usize = usize::MAX;

/// What a scenario adds to the shared network.
pub trait Scenario: Sized {
    /// The scenario's own events ([`Ev::Scenario`]).
    type Event;
    /// Every setup node is done joining (joined or gave up).
    fn setup_done(net: &mut Net<Self>);
    /// `node` finished its first join.
    fn joined(_net: &mut Net<Self>, _node: usize) {}
    /// A lookup the scenario started with `tag` finished.
    fn lookup_done(net: &mut Net<Self>, tag: usize, done: Box<Active>);
    /// A lookup the scenario started with `tag` was abandoned: its owner left.
    fn lookup_abandoned(_net: &mut Net<Self>, _tag: usize) {}
    /// A message (request or response) of the scenario's `tag` was sent.
    fn msg_sent(&mut self, _tag: usize) {}
    /// A put the scenario sent with `tag` was answered by `from`.
    fn put_answered(_net: &mut Net<Self>, _tag: usize, _from: usize, _stored: bool) {}
    /// A scenario event is due.
    fn on_event(net: &mut Net<Self>, ev: Self::Event);
}

/// Why a lookup runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    JoinSelf,
    JoinRefresh,
    /// A maintenance tick's bucket refresh.
    Refresh,
    /// The scenario's, with its tag.
    Scenario(usize),
}

/// What a lookup asks each node it queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    FindNode,
    /// Every record of this kind at the target (as the runtime's
    /// `Query::GetRecords { first: false }`).
    GetRecords(RecordKind),
}

/// A lookup in progress.
pub struct Active {
    pub owner: usize,
    pub purpose: Purpose,
    pub query: Query,
    pub lookup: Lookup,
    /// Valid records of the asked kind at the target, from every answer.
    pub records: Vec<SignedRecord>,
    /// When a [`Ev::Wake`] is already scheduled for it.
    wake_at: Option<Duration>,
}

/// Lookup ids index [`Net::lookups`]; ids are never reused, so a stale
/// event can never reach a younger lookup.
pub type LookupId = usize;

/// An event of the network, or of the scenario.
pub enum Ev<X> {
    /// A node starts joining (setup phase or churn).
    JoinStart { node: usize },
    /// `node`'s [`Maintenance`] asked to be woken at `at`.
    Maintenance { node: usize, at: Duration },
    /// A request arrives at `to`; `lookup` is the lookup it serves, if any.
    Request {
        from: usize,
        to: usize,
        lookup: Option<LookupId>,
        request: DhtRequest,
        tag: usize,
    },
    /// A response arrives at `to`.
    Response {
        from: usize,
        to: usize,
        lookup: Option<LookupId>,
        response: DhtResponse,
        tag: usize,
    },
    /// `lookup` asked to be woken now ([`Lookup::poll_timeout`]): queries
    /// may have timed out or be due again.
    Wake { lookup: LookupId },
    /// A random live node leaves.
    Leave,
    /// The scenario's own.
    Scenario(X),
}

pub struct Node {
    pub peer: PeerId,
    pub key: Key,
    pub table: RoutingTable,
    /// Records held for others.
    pub store: RecordStore,
    pub alive: bool,
    /// Finished its join procedure (bootstrap, self-lookup, refreshes).
    pub joined: bool,
    /// Gave up joining after [`MAX_JOIN_ATTEMPTS`]: no longer driven.
    pub gave_up: bool,
    /// Join attempts since the last successful join.
    join_attempts: u32,
    maintenance: Maintenance,
    /// The join running, if one is.
    join: Option<JoinAttempt>,
    /// When a [`Ev::Maintenance`] is scheduled for it.
    maintenance_wake: Option<Duration>,
    /// Index in [`Net::live`], when in it.
    live_pos: Option<usize>,
}

/// The simulated network and the scenario riding on it.
pub struct Net<S: Scenario> {
    pub s: S,
    pub rng: Rng,
    pub q: EventQueue<Ev<S::Event>>,
    pub lcfg: LookupConfig,
    rcfg: RoutingConfig,
    pub link: LinkModel,
    pub nodes: Vec<Node>,
    /// Nodes alive and joined: requesters, targets and bootstraps.
    pub live: Vec<usize>,
    lookups: Vec<Option<Box<Active>>>,
    /// Nodes of the setup phase: `0..setup_nodes`.
    pub setup_nodes: usize,
    /// When the setup phase ended.
    pub setup_end: Option<Duration>,
    /// Setup joins not finished yet.
    setup_pending: usize,
    /// Maintenance ticks of joined nodes past this are not run (set by the
    /// scenario, so a run ends).
    pub horizon: Option<Duration>,
    /// Coarser maintenance ticks than the runtime's, if set: a joined node's
    /// next tick is at least this far after the last.
    pub tick: Option<Duration>,
    /// Unix time (ms) at virtual time zero, for record times.
    pub unix_base_ms: u64,
    /// Whether records are handed to newcomers (as the runtime does); off
    /// only to measure what the hand-off is worth.
    pub handoff: bool,
    pub join_lookups: usize,
    pub maintenance_lookups: usize,
    pub join_failures: usize,
    pub churn_left: usize,
    pub churn_joined: usize,
    /// Records sent to newcomers ([`RecordStore::handoff`]).
    pub handoffs_sent: usize,
    /// Store refusals of nodes that have left (live ones are read at the
    /// end).
    pub gone_rejections: BTreeMap<&'static str, u64>,
    /// Virtual time of the last event that did something (maintenance
    /// wakes past the end of the run do nothing).
    pub last_active: Duration,
}

/// The fake address of node `i`: `10.0.0.0 + i + 1`, port 4433.
pub fn addr_of(i: usize) -> SocketAddr {
    let ip = Ipv4Addr::from(0x0A00_0000u32.wrapping_add(i as u32).wrapping_add(1));
    SocketAddr::V4(SocketAddrV4::new(ip, 4433))
}

/// The node index behind an address made by [`addr_of`].
pub fn index_of(addr: &SocketAddr) -> Option<usize> {
    match addr {
        SocketAddr::V4(v4) => {
            let n = u32::from(*v4.ip()).checked_sub(0x0A00_0001)?;
            (n < 1 << 24).then_some(n as usize)
        }
        SocketAddr::V6(_) => None,
    }
}

impl<S: Scenario> Net<S> {
    /// A network of `total_nodes` identities (none alive yet), of which the
    /// first `setup_nodes` form the setup phase.
    pub fn new(s: S, seed: u64, link: LinkModel, setup_nodes: usize, total_nodes: usize) -> Self {
        let mut rng = Rng::new(seed);
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
        Net {
            s,
            rng,
            q: EventQueue::default(),
            lcfg: LookupConfig::default(),
            rcfg,
            link,
            nodes,
            live: Vec::new(),
            lookups: Vec::new(),
            setup_nodes,
            setup_end: None,
            setup_pending: setup_nodes,
            horizon: None,
            tick: None,
            unix_base_ms: 0,
            handoff: true,
            join_lookups: 0,
            maintenance_lookups: 0,
            join_failures: 0,
            churn_left: 0,
            churn_joined: 0,
            handoffs_sent: 0,
            gone_rejections: BTreeMap::new(),
            last_active: Duration::ZERO,
        }
    }

    /// Schedules the setup joins, evenly spaced over [`SETUP_SPAN`].
    pub fn schedule_setup(&mut self) {
        let spacing = SETUP_SPAN / u32::try_from(self.setup_nodes.max(1)).unwrap_or(u32::MAX);
        let mut at = Duration::ZERO;
        for node in 0..self.setup_nodes {
            self.q.schedule(at, Ev::JoinStart { node });
            at += spacing;
        }
    }

    /// Runs every event; `each` is called after each one with whether the
    /// setup phase is over.
    pub fn run(&mut self, mut each: impl FnMut(bool)) {
        while let Some((at, ev)) = self.q.pop() {
            if self.on_event(ev) {
                self.last_active = at;
            }
            each(self.setup_end.is_some());
        }
    }

    /// Unix milliseconds now (records carry real time).
    pub fn unix_ms(&self) -> u64 {
        self.unix_base_ms + self.q.now().as_millis() as u64
    }

    pub fn contact(&self, i: usize) -> Contact {
        Contact::new(self.nodes[i].peer, addr_of(i))
    }

    fn live_add(&mut self, i: usize) {
        if self.nodes[i].live_pos.is_none() {
            self.nodes[i].live_pos = Some(self.live.len());
            self.live.push(i);
        }
    }

    /// Takes `i` out of the live set (it is no longer picked as a
    /// bootstrap, target or leaver) without stopping it.
    pub fn live_remove(&mut self, i: usize) {
        if let Some(pos) = self.nodes[i].live_pos.take() {
            self.live.swap_remove(pos);
            if let Some(&moved) = self.live.get(pos) {
                self.nodes[moved].live_pos = Some(pos);
            }
        }
    }

    /// A random live node other than `except`, if there is one.
    pub fn random_live(&mut self, except: Option<usize>) -> Option<usize> {
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

    /// Brings `node` up: it starts its join.
    pub fn start_node(&mut self, node: usize) {
        self.nodes[node].alive = true;
        self.drive(node);
    }

    /// `node` leaves silently: its state is gone with it (its entries stay
    /// in others' tables until queries to them fail).
    pub fn leave(&mut self, node: usize) {
        self.live_remove(node);
        let n = &mut self.nodes[node];
        n.alive = false;
        for (kind, count) in n.store.rejections() {
            *self.gone_rejections.entry(kind).or_default() += count;
        }
        // Free the memory.
        n.table = RoutingTable::new(n.peer, self.rcfg);
        n.store = RecordStore::new(StoreLimits::default());
        n.join = None;
    }

    /// Store refusals of every node that ever ran, by reason.
    pub fn rejections(&self) -> BTreeMap<&'static str, u64> {
        let mut all = self.gone_rejections.clone();
        for n in self.nodes.iter().filter(|n| n.alive) {
            for (kind, count) in n.store.rejections() {
                *all.entry(kind).or_default() += count;
            }
        }
        all
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
                    self.start_lookup(node, key, Purpose::Refresh, Query::FindNode);
                }
                // No node here publishes an endpoint record: publishing is
                // done as soon as asked.
                Action::Republish => self.nodes[node].maintenance.published(now),
                Action::ExpireRecords => {
                    let now_ms = self.unix_ms();
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
                self.start_lookup(node, key, Purpose::JoinSelf, Query::FindNode);
            }
            JoinAction::Refresh { bucket } => {
                let key = self.nodes[node]
                    .key
                    .random_in_bucket(bucket, self.rng.bytes32());
                self.start_lookup(node, key, Purpose::JoinRefresh, Query::FindNode);
            }
        }
    }

    fn schedule_maintenance(&mut self, node: usize) {
        let now = self.q.now();
        let n = &self.nodes[node];
        let Some(mut at) = n.maintenance.poll_timeout() else {
            return;
        };
        if let Some(tick) = self.tick
            && n.maintenance.is_joined()
        {
            at = at.max(now + tick);
        }
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
        self.nodes[node].maintenance.is_joined() && self.horizon.is_some_and(|h| at > h)
    }

    fn complete_join(&mut self, node: usize) {
        self.nodes[node].joined = true;
        self.live_add(node);
        self.setup_join_done(node);
        S::joined(self, node);
    }

    /// `node` is done joining (joined or gave up): once every setup node is,
    /// the scenario's measurement starts.
    fn setup_join_done(&mut self, node: usize) {
        if node < self.setup_nodes && self.setup_end.is_none() {
            self.setup_pending = self.setup_pending.saturating_sub(1);
            if self.setup_pending == 0 {
                self.setup_end = Some(self.q.now());
                S::setup_done(self);
            }
        }
    }

    /// Starts a lookup of `owner` for `target`.
    pub fn start_lookup(&mut self, owner: usize, target: Key, purpose: Purpose, query: Query) {
        let seeds = self.nodes[owner].table.closest(&target, self.lcfg.k);
        let lookup = Lookup::new(target, self.nodes[owner].peer, seeds, self.lcfg);
        let id = self.lookups.len();
        self.lookups.push(Some(Box::new(Active {
            owner,
            purpose,
            query,
            lookup,
            records: Vec::new(),
            wake_at: None,
        })));
        match purpose {
            Purpose::JoinSelf | Purpose::JoinRefresh => self.join_lookups += 1,
            Purpose::Refresh => self.maintenance_lookups += 1,
            Purpose::Scenario(_) => {}
        }
        self.step(id);
    }

    /// Sends `request` from `from` to `to` over a link (it may be lost).
    pub fn send_request(
        &mut self,
        from: usize,
        to: usize,
        lookup: Option<LookupId>,
        request: DhtRequest,
        tag: usize,
    ) {
        if tag != UNTAGGED {
            self.s.msg_sent(tag);
        }
        if let Some(d) = self.link.delay(&mut self.rng) {
            self.q.schedule(
                d,
                Ev::Request {
                    from,
                    to,
                    lookup,
                    request,
                    tag,
                },
            );
        }
    }

    /// Sends whatever the lookup wants sent, then finishes it if done.
    fn step(&mut self, id: LookupId) {
        let now = self.q.now();
        let Some(a) = self.lookups.get_mut(id).and_then(|a| a.as_deref_mut()) else {
            return;
        };
        let owner = a.owner;
        let tag = match a.purpose {
            Purpose::Scenario(tag) => tag,
            _ => UNTAGGED,
        };
        let target = a.lookup.target();
        let request = match a.query {
            Query::FindNode => DhtRequest::FindNode { target },
            Query::GetRecords(kind) => DhtRequest::GetRecords { kind, key: target },
        };
        loop {
            let Some(a) = self.lookups.get_mut(id).and_then(|a| a.as_deref_mut()) else {
                return;
            };
            let queries = a.lookup.poll_queries(now);
            if queries.is_empty() {
                break;
            }
            for c in queries {
                let Some(to) = index_of(&c.addr).filter(|&to| to < self.nodes.len()) else {
                    // Not a simulated node: cannot happen, but fail it
                    // rather than wait for a timeout.
                    if let Some(a) = self.lookups[id].as_deref_mut() {
                        a.lookup.on_failure(&c.peer);
                    }
                    continue;
                };
                self.send_request(owner, to, Some(id), request.clone(), tag);
            }
        }
        let Some(a) = self.lookups.get_mut(id).and_then(|a| a.as_deref_mut()) else {
            return;
        };
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
                && let Purpose::Scenario(tag) = a.purpose
            {
                S::lookup_abandoned(self, tag);
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
            Purpose::Scenario(tag) => S::lookup_done(self, tag, a),
        }
    }

    /// `node` saw `contact` (index `other`); a contact new to its table is
    /// handed the records it should now hold, as the runtime's `Dht::saw`
    /// and `Dht::hand_off` do.
    fn saw(&mut self, node: usize, other: usize) {
        let now = self.q.now();
        let c = self.contact(other);
        let n = &mut self.nodes[node];
        if n.table.on_seen(c, now) != InsertOutcome::Inserted || n.store.is_empty() || !self.handoff
        {
            return;
        }
        let k = self.lcfg.k;
        let now_ms = self.unix_ms();
        let n = &self.nodes[node];
        let records = n
            .store
            .handoff(&n.key, &c.key(), now_ms, k, MAX_HANDOFF_RECORDS, |key| {
                n.table.closest(key, k).iter().map(|c| c.key()).collect()
            });
        for record in records {
            self.handoffs_sent += 1;
            self.send_request(
                node,
                other,
                None,
                DhtRequest::PutRecord { record },
                UNTAGGED,
            );
        }
    }

    /// Handles `ev`; false if it did nothing (a maintenance wake that is
    /// stale or past the end of the run).
    fn on_event(&mut self, ev: Ev<S::Event>) -> bool {
        let now = self.q.now();
        match ev {
            Ev::JoinStart { node } => {
                if node >= self.setup_nodes {
                    self.churn_joined += 1;
                }
                self.start_node(node);
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
                request,
                tag,
            } => {
                if !self.nodes[to].alive {
                    return true; // the dead never answer
                }
                let now_ms = self.unix_ms();
                let source = match request {
                    DhtRequest::PutRecord { .. } => Some(Source::of(addr_of(from).ip())),
                    _ => None,
                };
                let n = &mut self.nodes[to];
                let near = server::Neighbourhood::of(&n.table, &request);
                let response = server::answer(&near, &mut n.store, request, source, now_ms);
                if tag != UNTAGGED {
                    self.s.msg_sent(tag);
                }
                if let Some(d) = self.link.delay(&mut self.rng) {
                    self.q.schedule(
                        d,
                        Ev::Response {
                            from: to,
                            to: from,
                            lookup,
                            response,
                            tag,
                        },
                    );
                }
                self.saw(to, from);
            }
            Ev::Response {
                from,
                to,
                lookup,
                response,
                tag,
            } => {
                if !self.nodes[to].alive {
                    return true;
                }
                let Some(lookup) = lookup else {
                    // A put's answer (the runtime's `put` and hand-off do
                    // not enter the answerer into the table).
                    if tag != UNTAGGED {
                        S::put_answered(self, tag, from, response == DhtResponse::Stored);
                    }
                    return true;
                };
                self.saw(to, from);
                let peer = self.nodes[from].peer;
                let now_ms = self.unix_ms();
                if let Some(a) = self.running(lookup) {
                    match response {
                        DhtResponse::Nodes { closer } => a.lookup.on_response(&peer, &closer),
                        DhtResponse::Records { records, closer } => {
                            let target = a.lookup.target();
                            for r in records {
                                let wanted =
                                    matches!(a.query, Query::GetRecords(kind) if kind == r.kind);
                                if wanted
                                    && r.key == target
                                    && r.validate(now_ms).is_ok()
                                    && !a.records.contains(&r)
                                {
                                    a.records.push(r);
                                }
                            }
                            a.lookup.on_response(&peer, &closer);
                        }
                        _ => a.lookup.on_failure(&peer),
                    }
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
            Ev::Leave => {
                // Keep at least two live nodes so lookups stay possible.
                if self.live.len() <= 2 {
                    return true;
                }
                let Some(node) = self.random_live(None) else {
                    return true;
                };
                self.leave(node);
                self.churn_left += 1;
            }
            Ev::Scenario(x) => S::on_event(self, x),
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_map_back_to_nodes() {
        for i in [0, 1, 255, 256, 65_535, 1 << 20, (1 << 24) - 2] {
            assert_eq!(index_of(&addr_of(i)), Some(i));
        }
        assert_eq!(index_of(&SocketAddr::from(([127, 0, 0, 1], 1))), None);
    }
}
