//! `reach lab rooms`: topics across federated homes behind real kernel NATs.
//!
//! One lab run: four public relays (203.0.113.10–13, relay service on by
//! the default `auto` mode; the first is everyone's bootstrap) configured
//! with federation links forming a cycle (`R0 → R1 → R2 → R3 → R0`,
//! [`reach::TopicFederation::peers`]), and one member node per site of
//! every kind of the lab ([`MATRIX_KINDS`]; two public sites and both hosts
//! of the same-nat site), none of them a relay. A member that holds a relay
//! has that relay as its home; a public one (or one whose router maps its
//! port) is its own home and finds the other homes through the DHT topic
//! records (discovered links). The relays subscribe too.
//!
//! - **Presence.** The self-homed subscribe first and the overlay forms;
//!   then every relay-homed member subscribes at once, and every member's
//!   view must hold every member within [`PRESENCE_LIMIT`] of the last
//!   join.
//! - **Steady.** Publishers (a public member, the edm and the udp-blocked
//!   members) publish [`RoomsOptions::messages`] each; every member must get
//!   every message exactly once, in order per publisher.
//! - **A relay killed mid-stream.** While the publishers keep publishing,
//!   the relay with the most members (not a publisher's home when there is
//!   a choice) is shut down. Its members must re-home on another relay and
//!   receive, exactly once and in order, everything published after they
//!   re-homed; the others everything; and every survivor's view must lose
//!   the dead home (its own membership, by `TopicEvent::Left` with its id
//!   as the home) within [`STALE_DROP_LIMIT`] of the kill, no live member
//!   may leave any view, and then every view must hold exactly the
//!   survivors.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reach::{Node, PeerId, RelayMode, TopicEvent};
use serde::Serialize;

use crate::nat::{Internet, MATRIX_KINDS, NatKind, Site};
use crate::netns::{Lab, LabError};
use crate::pairs::{node_builder_in, settle};

/// The topic every member subscribes to.
pub const TOPIC: &str = "lab-room";
/// Relays (public homes of the members behind NATs), linked in a
/// configured cycle: at least three make a cycle, and one more leaves a
/// choice of relays after one is killed.
pub const RELAYS: usize = 4;
/// The target: a join visible in every member's view this soon
/// after the last member subscribed.
pub const PRESENCE_LIMIT: Duration = Duration::from_secs(2);
/// The target: a dead home's members gone from every other
/// member's view this soon after the kill (the overlay drops a home silent
/// for `HOME_STALE`, 15 s, counted from the last thing heard from it).
pub const STALE_DROP_LIMIT: Duration = reach_proto::topics::HOME_STALE;
/// Time the homes have to link up and agree on the first members (the
/// first DHT lookup of a topic's homes runs 1 s after a home starts
/// serving it; configured links are dialed at once).
pub const FORM_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a phase's messages have to reach every member before the ones
/// missing count as lost.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);
/// Time the killed relay's members have to re-home.
pub const REHOME_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after the kill the survivors' views are watched for the dead
/// home to drop out (twice the target: a late drop is measured, not just
/// failed).
pub const STALE_WATCH: Duration = Duration::from_secs(30);
/// Publishes of one publisher in the failover phase at most (a bound on
/// the loop: at [`RoomsOptions::failover_interval`] apart, the stream
/// outlasts [`REHOME_TIMEOUT`] long before this).
pub const MAX_FAILOVER_MESSAGES: u32 = 2_000;
/// Time the survivors' views have, once the dead home is gone from all
/// of them, to hold exactly the survivors (they should already: a member
/// that re-homed is announced by its new home within the presence limit).
pub const VIEW_SETTLE: Duration = Duration::from_secs(5);
/// The DHT-closest contacts a node tries first for a relay (all of its K
/// closest, then connected peers). Only for the diagnosis of a member that
/// did not re-home.
const RELAY_CANDIDATES: usize = reach_proto::dht::K;
/// Spurious leaves quoted in the report at most.
const SAMPLES: usize = 8;
/// How often conditions are polled.
const POLL: Duration = Duration::from_millis(20);

/// Options of a rooms run.
#[derive(Debug, Clone)]
pub struct RoomsOptions {
    /// Messages per publisher in the steady phase.
    pub messages: u32,
    /// Messages per publisher in the failover phase before the relay is
    /// killed.
    pub before_kill: u32,
    /// Messages per publisher once every member of the killed relay has
    /// re-homed (the publishers keep publishing in between).
    pub after_rehome: u32,
    /// Pause between two publishes of one publisher in the failover phase
    /// (so the stream spans the kill and the re-homing).
    pub failover_interval: Duration,
}

impl Default for RoomsOptions {
    fn default() -> Self {
        RoomsOptions {
            messages: 20,
            before_kill: 5,
            after_rehome: 20,
            failover_interval: Duration::from_millis(100),
        }
    }
}

/// A home of the topic (a node that serves it).
#[derive(Debug, Clone, Serialize)]
pub struct HomeReport {
    pub peer: PeerId,
    /// `relay`, or the kind of the member that is its own home.
    pub role: String,
    /// Members it serves (itself included when it is one).
    pub members: usize,
    /// Federation links up, in total.
    pub links: usize,
    /// Of them, configured ones (either side configured the other).
    pub configured_links: usize,
}

/// A member of the topic.
#[derive(Debug, Clone, Serialize)]
pub struct MemberReport {
    pub peer: PeerId,
    /// `relay` for the relays, else the member's NAT kind.
    pub kind: String,
    pub home: Option<PeerId>,
    /// Whether its home is a relay (else itself).
    pub relay_homed: bool,
    pub publisher: bool,
}

/// Federation links among the homes (undirected pairs).
#[derive(Debug, Clone, Serialize, Default)]
pub struct LinksReport {
    /// Pairs of the configured cycle.
    pub configured_expected: usize,
    /// Of them, up.
    pub configured_up: usize,
    /// Other links up: found through the DHT topic records.
    pub discovered: usize,
    pub total: usize,
}

/// Deliveries of one phase.
#[derive(Debug, Clone, Serialize, Default)]
pub struct PhaseReport {
    /// Messages the publishers' homes took (an `Ok` report).
    pub published: u64,
    /// Publishes that returned an error, by kind.
    pub publish_errors: BTreeMap<String, u64>,
    /// (member, message) pairs that had to arrive.
    pub expected: u64,
    /// Of them, delivered.
    pub delivered: u64,
    /// Messages a member got more than once.
    pub duplicates: u64,
    /// Messages a member got after a later one of the same publisher.
    pub order_violations: u64,
    /// `TopicEvent::Missed` counts (subscriptions that fell behind).
    pub missed_events: u64,
    /// From the phase's first publish until every expected message was
    /// delivered (`None`: some never were).
    pub all_delivered_ms: Option<u64>,
}

/// The relay killed mid-stream.
#[derive(Debug, Clone, Serialize, Default)]
pub struct FailoverReport {
    pub killed_relay: Option<PeerId>,
    /// Whether a publisher had the killed relay as its home.
    pub killed_a_publishers_home: bool,
    /// The killed relay's members (behind NATs) and when each re-homed, ms
    /// after the kill (`None`: never, within the timeout).
    pub rehome_ms: BTreeMap<String, Option<u64>>,
    /// Where each went.
    pub rehomed_to: BTreeMap<String, Option<PeerId>>,
    /// Per member of the killed relay, how many of the other relays were
    /// among its eight DHT-closest contacts (the relay candidates it tries
    /// first) just before the kill: a diagnosis for slow re-homing.
    pub relays_near_at_kill: BTreeMap<String, usize>,
    /// Messages published after each re-homed (all of which it must get).
    pub after_rehome_expected: BTreeMap<String, u64>,
    /// Per surviving member, ms from the kill until its view had no member
    /// at the dead home any more (`None`: not within the watch).
    pub stale_drop_ms: BTreeMap<String, Option<u64>>,
    /// The slowest of them.
    pub stale_drop_ms_max: Option<u64>,
    /// Survivors that got `TopicEvent::Left` with the dead relay as home.
    pub saw_left_from_dead_home: usize,
    pub survivors: usize,
    /// `TopicEvent::Left` a survivor got, from the kill on, for a member
    /// at a home that did not die (nobody left: each is a live member
    /// dropped from a view).
    pub spurious_leaves: u64,
    /// The first few of them: "observer (kind) saw member (kind) leave
    /// home H at t ms".
    pub spurious_leave_samples: Vec<String>,
    /// From the moment the dead home was gone from every view until every
    /// survivor's view held exactly the survivors (`None`: not within
    /// [`VIEW_SETTLE`]).
    pub views_whole_ms: Option<u64>,
    /// Deliveries while and after the relay died (re-homed members: the
    /// messages published after they re-homed).
    pub phase: PhaseReport,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct RoomsReport {
    pub topic: String,
    pub homes: Vec<HomeReport>,
    pub home_count: usize,
    pub members: Vec<MemberReport>,
    pub members_per_kind: BTreeMap<String, u32>,
    pub links: LinksReport,
    /// From the first subscribe of the self-homed until their links were up
    /// and their views agreed.
    pub homes_formed_ms: u64,
    /// From the last relay-homed member's subscribe until every member's
    /// view held every member (`None`: not within the limit's watch).
    pub presence_converge_ms: Option<u64>,
    pub publishers: Vec<PeerId>,
    pub steady: PhaseReport,
    pub failover: FailoverReport,
    pub wall_ms: u64,
    pub passed: bool,
    /// The checks that failed, in words.
    pub failed: Vec<String>,
}

fn public(host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(203, 0, 113, host))
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Everything one member's subscription yielded, with arrival times.
type EventLog = Arc<Mutex<Vec<(Instant, TopicEvent)>>>;

/// One node of the run.
struct Member {
    node: Node,
    /// `relay` or the NAT kind's name.
    kind: String,
    relay: bool,
    log: EventLog,
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl Member {
    fn id(&self) -> PeerId {
        self.node.peer_id()
    }

    /// Subscribes and records every event until the node stops.
    fn subscribe(&mut self) -> Result<(), LabError> {
        let mut sub = self.node.subscribe_topic(TOPIC)?;
        let log = self.log.clone();
        self.reader = Some(tokio::spawn(async move {
            while let Some(ev) = sub.next().await {
                if let Ok(mut l) = log.lock() {
                    l.push((Instant::now(), ev));
                }
            }
        }));
        Ok(())
    }

    fn events(&self) -> Vec<(Instant, TopicEvent)> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    fn view(&self) -> BTreeMap<PeerId, PeerId> {
        self.node
            .members(TOPIC)
            .map(|v| v.into_iter().collect())
            .unwrap_or_default()
    }

    fn home(&self) -> Option<PeerId> {
        self.node
            .topics_status()
            .subscribed
            .iter()
            .find(|s| s.topic == TOPIC)
            .and_then(|s| s.home)
    }
}

/// Polls `cond` every [`POLL`] until it holds or `limit` passed; the time
/// it took, if it held.
async fn until(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    loop {
        if cond() {
            return Some(started.elapsed());
        }
        if started.elapsed() >= limit {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What one publisher did: per message id, when its publish started.
#[derive(Default)]
struct Published {
    ok: BTreeMap<u64, Instant>,
    errors: BTreeMap<String, u64>,
}

/// Publishes `count` messages, `gap` apart, or with `stop`, until `stop`
/// has said so and `count` more were published (at most
/// [`MAX_FAILOVER_MESSAGES`]).
async fn publish_run(
    node: Node,
    tag: String,
    count: u32,
    gap: Duration,
    stop: Option<tokio::sync::watch::Receiver<bool>>,
) -> Published {
    let mut out = Published::default();
    let mut after_stop = 0;
    for i in 0..MAX_FAILOVER_MESSAGES {
        match &stop {
            None if i >= count => break,
            Some(s) if *s.borrow() => {
                if after_stop >= count {
                    break;
                }
                after_stop += 1;
            }
            _ => {}
        }
        let started = Instant::now();
        let data = format!("{tag}-{i}").into_bytes();
        match tokio::time::timeout(reach::topics::HOME_TIMEOUT * 2, node.publish(TOPIC, data)).await
        {
            Ok(Ok(r)) => {
                out.ok.insert(r.id, started);
            }
            Ok(Err(e)) => *out.errors.entry(e.kind().to_string()).or_default() += 1,
            Err(_) => *out.errors.entry("lab_timeout".into()).or_default() += 1,
        }
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
    }
    out
}

/// Deliveries of one member: per publisher, the ids in arrival order
/// (events after `since` only).
fn deliveries(events: &[(Instant, TopicEvent)], since: Instant) -> BTreeMap<PeerId, Vec<u64>> {
    let mut out: BTreeMap<PeerId, Vec<u64>> = BTreeMap::new();
    for (at, ev) in events {
        if let TopicEvent::Message(m) = ev
            && *at >= since
            && m.topic == TOPIC
        {
            out.entry(m.from).or_default().push(m.id);
        }
    }
    out
}

/// Counts a member's deliveries against what it had to get: (delivered of
/// the expected, duplicates, order violations).
fn score(
    got: &BTreeMap<PeerId, Vec<u64>>,
    want: &BTreeMap<PeerId, BTreeSet<u64>>,
) -> (u64, u64, u64) {
    let (mut delivered, mut dup, mut order) = (0, 0, 0);
    for (from, ids) in got {
        let mut seen = BTreeSet::new();
        let mut max = 0;
        for id in ids {
            if !seen.insert(*id) {
                dup += 1;
            } else if *id < max {
                order += 1;
            }
            max = max.max(*id);
        }
        if let Some(w) = want.get(from) {
            delivered += w.intersection(&seen).count() as u64;
        }
    }
    (delivered, dup, order)
}

fn missed(events: &[(Instant, TopicEvent)]) -> u64 {
    events
        .iter()
        .map(|(_, e)| match e {
            TopicEvent::Missed { count } => *count,
            _ => 0,
        })
        .sum()
}

/// Waits until every member in `want` holds its expected messages (or the
/// timeout); the time it took from `started`.
async fn wait_delivered(
    members: &[&Member],
    want: &BTreeMap<PeerId, BTreeMap<PeerId, BTreeSet<u64>>>,
    since: Instant,
    started: Instant,
) -> Option<u64> {
    let total: u64 = want
        .values()
        .map(|w| w.values().map(|s| s.len() as u64).sum::<u64>())
        .sum();
    until(DELIVERY_TIMEOUT, || {
        let got: u64 = members
            .iter()
            .filter_map(|m| {
                let w = want.get(&m.id())?;
                Some(score(&deliveries(&m.events(), since), w).0)
            })
            .sum();
        got >= total
    })
    .await
    .map(|_| ms(started.elapsed()))
}

/// Fills a phase report from the members' logs.
fn phase_report(
    members: &[&Member],
    want: &BTreeMap<PeerId, BTreeMap<PeerId, BTreeSet<u64>>>,
    since: Instant,
    published: &[Published],
    all_delivered_ms: Option<u64>,
) -> PhaseReport {
    let mut r = PhaseReport {
        all_delivered_ms,
        ..PhaseReport::default()
    };
    for p in published {
        r.published += p.ok.len() as u64;
        for (k, n) in &p.errors {
            *r.publish_errors.entry(k.clone()).or_default() += n;
        }
    }
    for m in members {
        let Some(w) = want.get(&m.id()) else {
            continue;
        };
        let events = m.events();
        let (delivered, dup, order) = score(&deliveries(&events, since), w);
        r.expected += w.values().map(|s| s.len() as u64).sum::<u64>();
        r.delivered += delivered;
        r.duplicates += dup;
        r.order_violations += order;
        r.missed_events += missed(&events);
    }
    r
}

/// Builds the lab, runs both phases and tears everything down.
pub async fn run(opts: &RoomsOptions) -> Result<RoomsReport, LabError> {
    let started = Instant::now();
    let mut lab = Lab::new()?;
    let mut net = Internet::build(&mut lab)?;
    // The relays: known keys, so each can be configured with the next.
    let keys: Vec<reach::Keypair> = (0..RELAYS).map(|_| reach::Keypair::generate()).collect();
    let relay_ids: Vec<PeerId> = keys.iter().map(|k| k.peer_id()).collect();
    let mut all: Vec<Member> = Vec::new();
    let mut seed = None;
    for (i, key) in keys.into_iter().enumerate() {
        let host = 10 + i as u8;
        if host != 10 {
            net.add_public_ip(&lab, host)?;
        }
        let node = node_builder_in(&lab, &net.public, public(host), seed, None)?
            .keypair(key)
            .topic_federation(reach::TopicFederation {
                peers: vec![relay_ids[(i + 1) % RELAYS]],
                ..Default::default()
            })
            .spawn()
            .await?;
        seed.get_or_insert(node.local_addr());
        all.push(Member {
            node,
            kind: "relay".into(),
            relay: true,
            log: Default::default(),
            reader: None,
        });
    }
    // One member per site of every kind: two public sites, both hosts of
    // the same-nat site. Sites are kept: miniupnpd stops with its site.
    let mut sites: Vec<Site> = Vec::new();
    let mut places: Vec<(NatKind, String, IpAddr, Option<IpAddr>)> = Vec::new();
    let mut site_no = 0u8;
    for kind in MATRIX_KINDS {
        let copies = if kind == NatKind::Public { 2 } else { 1 };
        for _ in 0..copies {
            site_no += 1;
            let site = Site::build(&mut lab, &mut net, kind, site_no, 0)?;
            let gateway = site.miniupnpd.as_ref().map(|m| m.lan_ip());
            places.push((kind, site.node_ns.clone(), site.node_ip, gateway));
            if let Some((ns, ip)) = site.peer.clone() {
                places.push((kind, ns, ip, None));
            }
            sites.push(site);
        }
    }
    for (kind, ns, ip, gateway) in places {
        let node = node_builder_in(&lab, &ns, ip, seed, gateway)?
            // Members are not relays: the relays are the four above.
            .relay_service(RelayMode::Off)
            .spawn()
            .await?;
        all.push(Member {
            node,
            kind: kind.name().to_string(),
            relay: false,
            log: Default::default(),
            reader: None,
        });
    }
    let settled = futures::future::join_all(all.iter().map(|m| settle(&m.node))).await;
    if let Some(i) = settled.iter().position(|ok| !ok) {
        return Err(LabError::Other(format!(
            "rooms: the {} node did not settle within {:?}",
            all[i].kind,
            crate::pairs::SETTLE_TIMEOUT
        )));
    }
    let result = phases(opts, &mut all, &relay_ids, started).await;
    for m in &all {
        if let Some(r) = &m.reader {
            r.abort();
        }
    }
    futures::future::join_all(all.iter().map(|m| m.node.shutdown())).await;
    drop(sites);
    lab.teardown();
    result
}

/// How many of `relays` are among `m`'s [`RELAY_CANDIDATES`] DHT-closest
/// contacts (the relay candidates it tries first), and its routing table's
/// size.
fn relays_among_closest(m: &Member, relays: &BTreeSet<PeerId>) -> (usize, usize) {
    use reach_proto::dht::Key;
    let own = Key::for_peer(&m.id());
    let mut entries = m.node.routing_snapshot().entries;
    entries.sort_by_key(|e| Key::for_peer(&e.peer).distance(&own));
    let near = entries
        .iter()
        .take(RELAY_CANDIDATES)
        .filter(|e| relays.contains(&e.peer))
        .count();
    (near, entries.len())
}

/// Whether `m`'s node is its own home (else a relay is).
fn self_homed(m: &Member) -> bool {
    m.node.topics_status().home == Some(m.id())
}

async fn phases(
    opts: &RoomsOptions,
    all: &mut [Member],
    relay_ids: &[PeerId],
    started: Instant,
) -> Result<RoomsReport, LabError> {
    let mut failed: Vec<String> = Vec::new();
    // Homes first: the relays and the self-homed members.
    let first: Vec<usize> = (0..all.len())
        .filter(|&i| all[i].relay || self_homed(&all[i]))
        .collect();
    let later: Vec<usize> = (0..all.len()).filter(|i| !first.contains(i)).collect();
    let forming = Instant::now();
    for &i in &first {
        all[i].subscribe()?;
    }
    let first_ids: BTreeSet<PeerId> = first.iter().map(|&i| all[i].id()).collect();
    let cycle_up = |all: &[Member]| {
        (0..RELAYS).all(|i| {
            let next = relay_ids[(i + 1) % RELAYS];
            all[i].node.topics_status().links.contains(&next)
        })
    };
    let formed = until(FORM_TIMEOUT, || {
        cycle_up(all)
            && first.iter().all(|&i| {
                let m = &all[i];
                !m.node.topics_status().links.is_empty()
                    && m.view().keys().copied().collect::<BTreeSet<_>>() == first_ids
            })
    })
    .await;
    let homes_formed_ms = ms(forming.elapsed());
    if formed.is_none() {
        failed.push(format!(
            "the homes did not link up and agree on their members within {FORM_TIMEOUT:?}"
        ));
    }

    // Then every member behind a relay joins at once.
    for &i in &later {
        all[i].subscribe()?;
    }
    let last_join = Instant::now();
    let everyone: BTreeSet<PeerId> = all.iter().map(|m| m.id()).collect();
    let converged = until(PRESENCE_LIMIT * 5, || {
        all.iter()
            .all(|m| m.view().keys().copied().collect::<BTreeSet<_>>() == everyone)
    })
    .await;
    let presence_converge_ms = converged.map(|_| ms(last_join.elapsed()));
    match presence_converge_ms {
        Some(t) if t <= ms(PRESENCE_LIMIT) => {}
        t => failed.push(format!(
            "presence converged after {t:?} ms (limit {} ms)",
            ms(PRESENCE_LIMIT)
        )),
    }
    // Every member has a home now.
    until(FORM_TIMEOUT, || all.iter().all(|m| m.home().is_some())).await;

    // The homes, links and members as they stand.
    let configured_pairs: BTreeSet<(PeerId, PeerId)> = (0..RELAYS)
        .map(|i| {
            let (a, b) = (relay_ids[i], relay_ids[(i + 1) % RELAYS]);
            (a.min(b), a.max(b))
        })
        .collect();
    let mut homes = Vec::new();
    let mut pairs: BTreeSet<(PeerId, PeerId)> = BTreeSet::new();
    for m in all.iter() {
        let st = m.node.topics_status();
        let Some(served) = st.served.iter().find(|s| s.topic == TOPIC) else {
            continue;
        };
        let me = m.id();
        for l in &st.links {
            pairs.insert((me.min(*l), me.max(*l)));
        }
        homes.push(HomeReport {
            peer: me,
            role: if m.relay {
                "relay".into()
            } else {
                m.kind.clone()
            },
            members: served.members,
            links: st.links.len(),
            configured_links: st
                .links
                .iter()
                .filter(|l| configured_pairs.contains(&(me.min(**l), me.max(**l))))
                .count(),
        });
    }
    let links = LinksReport {
        configured_expected: configured_pairs.len(),
        configured_up: pairs.intersection(&configured_pairs).count(),
        discovered: pairs.difference(&configured_pairs).count(),
        total: pairs.len(),
    };
    if homes.len() < 6 {
        failed.push(format!(
            "{} homes serve the topic (at least 6)",
            homes.len()
        ));
    }
    if links.configured_up < links.configured_expected {
        failed.push(format!(
            "{} of the {} configured links are up",
            links.configured_up, links.configured_expected
        ));
    }
    if links.discovered == 0 {
        failed.push("no discovered federation link".into());
    }
    let home_of: BTreeMap<PeerId, Option<PeerId>> =
        all.iter().map(|m| (m.id(), m.home())).collect();
    let mut members_per_kind: BTreeMap<String, u32> = BTreeMap::new();
    for m in all.iter().filter(|m| !m.relay) {
        *members_per_kind.entry(m.kind.clone()).or_default() += 1;
    }
    for kind in MATRIX_KINDS {
        if !members_per_kind.contains_key(kind.name()) {
            failed.push(format!("no member behind {}", kind.name()));
        }
    }

    // Publishers: a public member, the edm and the udp-blocked ones.
    let pick = |kind: NatKind| all.iter().position(|m| !m.relay && m.kind == kind.name());
    let publisher_idx: Vec<usize> = [NatKind::Public, NatKind::Edm, NatKind::UdpBlocked]
        .into_iter()
        .filter_map(pick)
        .collect();
    let publishers: Vec<PeerId> = publisher_idx.iter().map(|&i| all[i].id()).collect();
    let members_report: Vec<MemberReport> = all
        .iter()
        .map(|m| {
            let home = home_of.get(&m.id()).copied().flatten();
            MemberReport {
                peer: m.id(),
                kind: m.kind.clone(),
                home,
                relay_homed: home.is_some_and(|h| h != m.id() && relay_ids.contains(&h)),
                publisher: publishers.contains(&m.id()),
            }
        })
        .collect();

    // Phase 1: steady.
    let steady_started = Instant::now();
    let published: Vec<Published> = futures::future::join_all(publisher_idx.iter().map(|&i| {
        let node = all[i].node.clone();
        publish_run(
            node,
            all[i].kind.clone(),
            opts.messages,
            Duration::ZERO,
            None,
        )
    }))
    .await;
    let want_all: BTreeMap<PeerId, BTreeSet<u64>> = publishers
        .iter()
        .zip(&published)
        .map(|(p, r)| (*p, r.ok.keys().copied().collect()))
        .collect();
    let want: BTreeMap<PeerId, BTreeMap<PeerId, BTreeSet<u64>>> =
        all.iter().map(|m| (m.id(), want_all.clone())).collect();
    let refs: Vec<&Member> = all.iter().collect();
    let done = wait_delivered(&refs, &want, steady_started, steady_started).await;
    let steady = phase_report(&refs, &want, steady_started, &published, done);
    if steady.published != u64::from(opts.messages) * publishers.len() as u64 {
        failed.push(format!(
            "steady: {} of {} publishes taken",
            steady.published,
            u64::from(opts.messages) * publishers.len() as u64
        ));
    }
    check_phase("steady", &steady, true, &mut failed);

    // Phase 2: the relay with the most members (not a publisher's home if
    // there is a choice) dies while the publishers publish.
    let homed_at = |r: &PeerId| {
        all.iter()
            .filter(|m| !m.relay && home_of.get(&m.id()) == Some(&Some(*r)))
            .count()
    };
    let publisher_homes: BTreeSet<PeerId> = publishers
        .iter()
        .filter_map(|p| home_of.get(p).copied().flatten())
        .collect();
    let victim = relay_ids
        .iter()
        .filter(|r| homed_at(r) > 0)
        .max_by_key(|r| (!publisher_homes.contains(r), homed_at(r)))
        .copied();
    let mut failover = FailoverReport::default();
    if let Some(victim) = victim {
        failover = failover_phase(
            opts,
            all,
            &publisher_idx,
            victim,
            &home_of,
            relay_ids,
            &mut failed,
        )
        .await;
    } else {
        failed.push("no relay is the home of a member behind a NAT".into());
    }

    let passed = failed.is_empty();
    Ok(RoomsReport {
        topic: TOPIC.into(),
        home_count: homes.len(),
        homes,
        members: members_report,
        members_per_kind,
        links,
        homes_formed_ms,
        presence_converge_ms,
        publishers,
        steady,
        failover,
        wall_ms: ms(started.elapsed()),
        passed,
        failed,
    })
}

/// The checks every phase must pass.
/// (Publish errors are allowed only where a publisher's home died.)
fn check_phase(name: &str, r: &PhaseReport, no_errors: bool, failed: &mut Vec<String>) {
    if no_errors && !r.publish_errors.is_empty() {
        failed.push(format!("{name}: publishes failed: {:?}", r.publish_errors));
    }
    if r.published == 0 {
        failed.push(format!("{name}: nothing published"));
    }
    if r.delivered != r.expected {
        failed.push(format!(
            "{name}: {} of {} deliveries",
            r.delivered, r.expected
        ));
    }
    if r.duplicates > 0 {
        failed.push(format!("{name}: {} duplicates", r.duplicates));
    }
    if r.order_violations > 0 {
        failed.push(format!("{name}: {} out of order", r.order_violations));
    }
    if r.missed_events > 0 {
        failed.push(format!("{name}: {} events missed", r.missed_events));
    }
}

/// Phase 2: kills `victim` while the publishers publish.
async fn failover_phase(
    opts: &RoomsOptions,
    all: &mut [Member],
    publisher_idx: &[usize],
    victim: PeerId,
    home_of: &BTreeMap<PeerId, Option<PeerId>>,
    relay_ids: &[PeerId],
    failed: &mut Vec<String>,
) -> FailoverReport {
    let mut rep = FailoverReport {
        killed_relay: Some(victim),
        ..FailoverReport::default()
    };
    let Some(victim_idx) = all.iter().position(|m| m.id() == victim) else {
        failed.push("the relay to kill is not in the run".into());
        return rep;
    };
    let homed: Vec<usize> = (0..all.len())
        .filter(|&i| !all[i].relay && home_of.get(&all[i].id()) == Some(&Some(victim)))
        .collect();
    rep.killed_a_publishers_home = publisher_idx.iter().any(|i| homed.contains(i));
    let phase_started = Instant::now();
    let (rehomed_tx, rehomed_rx) = tokio::sync::watch::channel(false);
    let runs: Vec<_> = publisher_idx
        .iter()
        .map(|&i| {
            tokio::spawn(publish_run(
                all[i].node.clone(),
                all[i].kind.clone(),
                opts.after_rehome,
                opts.failover_interval,
                Some(rehomed_rx.clone()),
            ))
        })
        .collect();
    // Mid-stream: once the publishers are a few messages in.
    tokio::time::sleep(opts.failover_interval * opts.before_kill.max(1)).await;
    let live: BTreeSet<PeerId> = relay_ids
        .iter()
        .filter(|r| **r != victim)
        .copied()
        .collect();
    for &i in &homed {
        let (near, _) = relays_among_closest(&all[i], &live);
        rep.relays_near_at_kill
            .insert(all[i].id().to_string(), near);
    }
    let killed_at = Instant::now();
    // Shut down beside the watch: a shutdown waits for peers to
    // acknowledge, and the members may re-home meanwhile.
    let killer = {
        let node = all[victim_idx].node.clone();
        tokio::spawn(async move { node.shutdown().await })
    };
    // Re-homing of the dead relay's members.
    let mut rehomed_at: BTreeMap<PeerId, Instant> = BTreeMap::new();
    let _ = until(REHOME_TIMEOUT, || {
        for &i in &homed {
            let m = &all[i];
            if rehomed_at.contains_key(&m.id()) {
                continue;
            }
            if let Some(h) = m.home()
                && h != victim
            {
                rehomed_at.insert(m.id(), Instant::now());
            }
        }
        rehomed_at.len() == homed.len()
    })
    .await;
    // The publishers publish `after_rehome` more each, then stop.
    let _ = rehomed_tx.send(true);
    let _ = killer.await;
    for &i in &homed {
        let m = &all[i];
        let key = m.id().to_string();
        let at = rehomed_at.get(&m.id());
        rep.rehome_ms
            .insert(key.clone(), at.map(|t| ms(t.duration_since(killed_at))));
        let to = at.and(m.home());
        rep.rehomed_to.insert(key.clone(), to);
        match to {
            None => {
                let relay = m.node.relay_status();
                let live: BTreeSet<PeerId> = relay_ids
                    .iter()
                    .filter(|r| **r != victim)
                    .copied()
                    .collect();
                let (near, table) = relays_among_closest(m, &live);
                failed.push(format!(
                    "{key} ({}) did not re-home within {REHOME_TIMEOUT:?}: holds relay {:?} \
                     (the dead one: {}), reachability {:?}, topic home {:?}; live relays among \
                     its {RELAY_CANDIDATES} closest contacts now: {near} (routing table: {table})",
                    m.kind,
                    relay.held_relay,
                    relay.held_relay == Some(victim),
                    relay.reachability,
                    m.home()
                ))
            }
            Some(h) if !relay_ids.contains(&h) || h == victim => failed.push(format!(
                "{key} ({}) re-homed on {h}, not another relay",
                m.kind
            )),
            Some(_) => {}
        }
    }
    let mut published = Vec::new();
    for r in runs {
        published.push(r.await.unwrap_or_default());
    }
    let publishers: Vec<PeerId> = publisher_idx.iter().map(|&i| all[i].id()).collect();
    // What each survivor had to get: everything; a re-homed member what was
    // published after it re-homed.
    let mut want: BTreeMap<PeerId, BTreeMap<PeerId, BTreeSet<u64>>> = BTreeMap::new();
    for (i, m) in all.iter().enumerate() {
        if i == victim_idx {
            continue;
        }
        let after = rehomed_at.get(&m.id()).copied();
        if homed.contains(&i) && after.is_none() {
            continue;
        }
        let w: BTreeMap<PeerId, BTreeSet<u64>> = publishers
            .iter()
            .zip(&published)
            .map(|(p, r)| {
                let ids =
                    r.ok.iter()
                        .filter(|(_, at)| after.is_none_or(|a| **at >= a))
                        .map(|(id, _)| *id)
                        .collect();
                (*p, ids)
            })
            .collect();
        if homed.contains(&i) {
            rep.after_rehome_expected
                .insert(m.id().to_string(), w.values().map(|s| s.len() as u64).sum());
        }
        if homed.contains(&i) && w.values().all(|ids| ids.is_empty()) {
            failed.push(format!(
                "{} ({}) re-homed after the last publish: nothing to check",
                m.id(),
                m.kind
            ));
        }
        want.insert(m.id(), w);
    }
    let survivors: Vec<&Member> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim_idx)
        .map(|(_, m)| m)
        .collect();
    let done = wait_delivered(&survivors, &want, phase_started, phase_started).await;
    rep.phase = phase_report(&survivors, &want, phase_started, &published, done);
    check_phase(
        "failover",
        &rep.phase,
        !rep.killed_a_publishers_home,
        failed,
    );

    // The dead home drops out of every survivor's view.
    let clean =
        |m: &Member| m.view().values().all(|h| *h != victim) && !m.view().contains_key(&victim);
    let watch_left = STALE_WATCH.saturating_sub(killed_at.elapsed());
    until(watch_left, || survivors.iter().all(|m| clean(m))).await;
    rep.survivors = survivors.len();
    let everyone: BTreeSet<PeerId> = survivors.iter().map(|m| m.id()).collect();
    let kind_of: BTreeMap<PeerId, String> = all.iter().map(|m| (m.id(), m.kind.clone())).collect();
    rep.views_whole_ms = until(VIEW_SETTLE, || {
        survivors
            .iter()
            .all(|m| m.view().keys().copied().collect::<BTreeSet<_>>() == everyone)
    })
    .await
    .map(ms);
    let mut max = Some(0);
    for m in &survivors {
        let events = m.events();
        let left_at = events
            .iter()
            .filter(|(at, ev)| {
                *at >= killed_at && matches!(ev, TopicEvent::Left { home, .. } if *home == victim)
            })
            .map(|(at, _)| *at)
            .last();
        if left_at.is_some() {
            rep.saw_left_from_dead_home += 1;
        }
        for (at, ev) in &events {
            if let TopicEvent::Left { member, home } = ev
                && *at >= killed_at
                && *home != victim
            {
                rep.spurious_leaves += 1;
                if rep.spurious_leave_samples.len() < SAMPLES {
                    rep.spurious_leave_samples.push(format!(
                        "{} ({}) saw {member} ({}) leave home {home} at {} ms",
                        m.id(),
                        m.kind,
                        kind_of.get(member).map_or("?", |k| k.as_str()),
                        ms(at.duration_since(killed_at))
                    ));
                }
            }
        }
        // When the view lost its last member at the dead home: the last
        // event that removed one (a Left from it, or a re-join elsewhere).
        let gone = if clean(m) {
            let last = events
                .iter()
                .filter(|(at, ev)| {
                    *at >= killed_at
                        && match ev {
                            TopicEvent::Left { home, .. } => *home == victim,
                            TopicEvent::Joined { member, .. } => {
                                home_of.get(member) == Some(&Some(victim))
                            }
                            _ => false,
                        }
                })
                .map(|(at, _)| *at)
                .last();
            Some(last.map_or(0, |t| ms(t.duration_since(killed_at))))
        } else {
            None
        };
        rep.stale_drop_ms.insert(m.id().to_string(), gone);
        max = match (max, gone) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
    }
    rep.stale_drop_ms_max = max;
    match max {
        Some(t) if t <= ms(STALE_DROP_LIMIT) => {}
        t => failed.push(format!(
            "the dead home dropped out of every view after {t:?} ms (limit {} ms)",
            ms(STALE_DROP_LIMIT)
        )),
    }
    if rep.saw_left_from_dead_home < rep.survivors {
        failed.push(format!(
            "{} of {} survivors saw a Left from the dead home",
            rep.saw_left_from_dead_home, rep.survivors
        ));
    }
    if rep.spurious_leaves > 0 {
        failed.push(format!(
            "{} leaves of live members at live homes: {:?}",
            rep.spurious_leaves, rep.spurious_leave_samples
        ));
    }
    for m in &survivors {
        let view = m.view();
        let seen: BTreeSet<PeerId> = view.keys().copied().collect();
        if seen != everyone {
            let missing: Vec<String> = everyone
                .difference(&seen)
                .map(|p| format!("{p} ({})", kind_of[p]))
                .collect();
            let extra: Vec<String> = seen
                .difference(&everyone)
                .map(|p| format!("{p} at {:?}", view.get(p)))
                .collect();
            failed.push(format!(
                "after the failover, the view of {} ({}) misses {missing:?} and has {extra:?}",
                m.id(),
                m.kind
            ));
        }
    }
    rep
}
