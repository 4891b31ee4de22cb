//! DHT mailboxes at scale: messages deposited for offline recipients by
//! senders who then leave for good, fetched days later through churn.
//!
//! The network is [`dhtnet`](super::dhtnet)'s (real identities, routing
//! tables, [`RecordStore`](reach_proto::dht::store::RecordStore)s, joins,
//! maintenance, `server::answer`, hand-off of records to newcomers as the
//! runtime's `Dht::hand_off` does). On it:
//!
//! 1. **Setup**: `nodes` nodes join over
//!    [`SETUP_SPAN`](super::dhtnet::SETUP_SPAN).
//! 2. **Deposits**: `messages` deposits start at random times over
//!    [`DEPOSIT_SPAN`], each by a distinct random live node (the sender)
//!    for a distinct recipient that is offline (not in the network). The
//!    sender signs a [`RecordKind::Mailbox`] record with a throwaway key
//!    (payload: `payload` opaque bytes standing for the sealed message,
//!    lifetime [`MAX_MAILBOX_TTL`]) at [`deposit_key`]`(recipient, now)`,
//!    looks that key up (FindNode) and puts the record to the k closest
//!    the lookup found, as the runtime's `Dht::put` does. It leaves for
//!    good [`SENDER_LINGER`] later (no re-deposit).
//! 3. **Churn**: `churn * nodes` random live nodes leave and as many fresh
//!    ones join, at random times over the whole period (deposits and
//!    returns).
//! 4. **Returns**: each recipient comes online a random time up to
//!    [`RETURN_MAX`] after its message was deposited, joins the network
//!    like any node, then fetches [`epochs_to_fetch`]`(now)`: one GetRecords
//!    lookup per epoch, collecting every valid mailbox record from every
//!    node the lookup asks. It counts its message retrieved if one of them
//!    is it, then goes offline again.
//!
//! Virtual time zero is the middle of a mailbox epoch ([`START_EPOCH`]),
//! so the recipients returning more than about half an epoch after the
//! deposit fetch across an epoch boundary ([`MailboxReport::crossed_epoch`]).
//!
//! **Coarsened**: maintenance ticks. The runtime ticks every 30 s and
//! refreshes each bucket nobody looked up for 10 minutes; for 10,000 nodes
//! over 7 days that is ~100 million refresh lookups, hours of CPU. Here a
//! joined node ticks every [`MailboxParams::tick`] ([`DEFAULT_TICK`], a
//! day), with the runtime's own machine (so up to 4 refreshes per tick,
//! and expiry). Fewer refreshes can only make the result worse: refreshes
//! are how nodes drop departed contacts and meet newcomers (to whom records
//! are handed off), so tables here are staler than the runtime's and
//! lookups meet more dead contacts. Measured: 10,000 nodes, 20% churn, 1%
//! loss, seed 1, with a 6-hour tick (1.0 million refresh lookups, 10 CPU
//! minutes) and a 1-day tick (0.24 million, 3.5 CPU minutes) give the same
//! retrieval (1,000 of 1,000), the same lookups per retrieval (2.0) and
//! within 1% the same holders at fetch time (18.4 vs 18.5 live holders,
//! 17.7 vs 17.8 of the true 20 closest).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use reach_proto::Keypair;
use reach_proto::dht::Key;
use reach_proto::dht::record::{MAX_MAILBOX_TTL, RecordKind, SignedRecord};
use reach_proto::mailbox::{MAILBOX_EPOCH, deposit_key, epoch_of, epochs_to_fetch};
use serde::Serialize;

use super::dhtnet::{Active, Ev, Net, Purpose, Query, Scenario, index_of};
use crate::net::LinkModel;
use crate::stats::{mean, peak_rss_mib, quantile, ratio, round3};

/// Largest `nodes` accepted: with churners and recipients, every node needs
/// a distinct `10.x.y.z` address (2^24 - 2 of them).
pub const MAX_NODES: usize = 4_000_000;
/// Largest number of messages (one recipient each) accepted.
pub const MAX_MESSAGES: usize = 1_000_000;
/// Default number of messages.
pub const DEFAULT_MESSAGES: usize = 1_000;
/// Default payload bytes of a sealed message: within the 512–1000 bytes DHT
/// values are known to carry, rounded up to 1 KiB.
pub const DEFAULT_PAYLOAD: usize = 1024;
/// Virtual time over which deposits start, after setup: an hour of senders
/// giving up on reaching their peers directly.
pub const DEPOSIT_SPAN: Duration = Duration::from_secs(3600);
/// Latest a recipient returns after its message was deposited: the
/// record's lifetime ([`MAX_MAILBOX_TTL`], 7 days) less ten minutes, so a
/// recipient that returns at the last moment still has the time to join
/// and fetch before the record expires. (Later, the record is gone by
/// design; the runtime's sender re-deposits while the message is pending,
/// which this scenario's departed senders cannot.)
pub const RETURN_MAX: Duration =
    Duration::from_secs(MAX_MAILBOX_TTL.as_secs() - RETURN_MARGIN.as_secs());
/// See [`RETURN_MAX`].
pub const RETURN_MARGIN: Duration = Duration::from_secs(600);
/// How long a sender stays online after sending its puts, for the answers
/// (one round trip; a lost answer is the runtime's `RPC_TIMEOUT` anyway).
pub const SENDER_LINGER: Duration = Duration::from_secs(5);
/// Default maintenance tick of joined nodes (coarsened: see the module
/// docs): four bucket refreshes per node per day keep a 10,000-node week at
/// a few CPU minutes, and a 6-hour tick gives the same result.
pub const DEFAULT_TICK: Duration = Duration::from_secs(24 * 3600);
/// Coarsest tick accepted: a day, still seven refresh rounds a week.
pub const MAX_TICK: Duration = Duration::from_secs(24 * 3600);
/// The mailbox epoch whose middle is virtual time zero (epoch 2,976 began
/// on 2027-01-28; any epoch would do).
pub const START_EPOCH: u64 = 2_976;
/// Maintenance keeps ticking this long after the last possible return, so
/// every fetch runs in a maintained network.
pub const HORIZON_SLACK: Duration = Duration::from_secs(3600);

/// Parameters of a mailbox run.
#[derive(Debug, Clone)]
pub struct MailboxParams {
    pub nodes: usize,
    /// Messages deposited, one per recipient.
    pub messages: usize,
    pub seed: u64,
    pub link: LinkModel,
    /// Fraction of nodes replaced over the period (0..=1).
    pub churn: f64,
    /// Payload bytes per message.
    pub payload: usize,
    /// Maintenance tick of joined nodes.
    pub tick: Duration,
    /// Whether storers hand records to newcomers (the runtime does); off
    /// only to measure what the hand-off is worth.
    pub handoff: bool,
}

/// The JSON report of a mailbox run (everything here depends only on the
/// parameters, seed included).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MailboxReport {
    pub scenario: &'static str,
    pub nodes: usize,
    pub seed: u64,
    pub latency_ms: f64,
    pub loss: f64,
    pub churn: f64,
    pub payload_bytes: usize,
    pub tick_s: f64,
    pub handoff: bool,
    /// Messages to deposit (one recipient each).
    pub messages: usize,
    /// Messages whose sender put the record to at least one node that
    /// stored it.
    pub deposited: usize,
    /// Stores acknowledged per deposited message (k = 20 asked).
    pub stored_acks_mean: f64,
    /// Messages a returning recipient found.
    pub retrieved: usize,
    /// `retrieved / messages`.
    pub retrieval_rate: f64,
    /// Fetch lookups made by recipients / messages retrieved (one message
    /// per recipient: two epochs, two lookups). Recipients' join lookups are
    /// not counted: a node coming online joins anyway.
    pub lookups_per_retrieval: f64,
    /// Fetch lookups per recipient that fetched.
    pub lookups_per_recipient: f64,
    /// Recipients that fetched across an epoch boundary (the message in the
    /// previous epoch's key).
    pub crossed_epoch: usize,
    /// Recipients whose join gave up (they never fetched).
    pub recipient_join_failures: usize,
    /// Missed messages nobody alive held when the recipient fetched.
    pub missed_no_holder: usize,
    /// Missed messages some live node held when the recipient fetched.
    pub missed_with_holder: usize,
    /// For each missed message that was fetched: live holders, and how many
    /// of the true k closest live nodes held it, at fetch time.
    pub missed_holders: Vec<(usize, usize)>,
    /// Live nodes holding a message when its recipient fetched: mean, min.
    pub holders_at_fetch_mean: f64,
    pub holders_at_fetch_min: usize,
    /// Of the true k closest live nodes to the key at fetch time, how many
    /// held the message (mean).
    pub closest_holding_mean: f64,
    /// Fetch lookup latency, p50 and p99.
    pub fetch_ms_p50: f64,
    pub fetch_ms_p99: f64,
    /// Unexpired mailbox record copies held by live nodes when the last
    /// recipient had fetched, and the messages they are copies of (by the
    /// end of the run every record has expired: they live 7 days).
    pub copies_at_last_fetch: usize,
    pub messages_alive_at_last_fetch: usize,
    /// Messages whose record had not expired yet then (deposited less than
    /// 7 days before): the most that can be alive.
    pub messages_unexpired_at_last_fetch: usize,
    /// Records sent to newcomers by their closest holders.
    pub handoffs: usize,
    /// Store refusals over the run, by reason (mailbox puts and hand-offs
    /// alike).
    pub store_rejections: BTreeMap<&'static str, u64>,
    pub join_lookups: usize,
    pub maintenance_lookups: usize,
    pub join_failures: usize,
    pub churn_left: usize,
    pub churn_joined: usize,
    pub senders_left: usize,
    pub setup_virtual_s: f64,
    /// Virtual time at the end of the run (days are 86,400 s).
    pub virtual_s: f64,
}

/// One message and its recipient.
struct Message {
    /// The recipient's node (offline until it returns).
    recipient: usize,
    sender: Option<usize>,
    /// The record, until it is put.
    record: Option<SignedRecord>,
    /// Its key and throwaway publisher.
    key: Key,
    publisher: Option<reach_proto::PeerId>,
    deposit_epoch: u64,
    /// When its record expires (Unix ms).
    expires_ms: u64,
    acks: usize,
    /// Fetch lookups still running.
    fetching: u8,
    fetch_lookups: u8,
    fetched: bool,
    retrieved: bool,
    crossed: bool,
    holders: usize,
    closest_holding: usize,
    fetch_started: Duration,
}

/// The mailbox scenario's state on top of the network.
struct MailboxSim<'a> {
    p: &'a MailboxParams,
    msgs: Vec<Message>,
    /// First recipient node.
    recipient_base: usize,
    senders_left: usize,
    fetch_ms: Vec<f64>,
    /// Recipients done fetching.
    fetches_done: usize,
    /// Record copies, messages alive and messages unexpired when the last
    /// one was.
    census: (usize, usize, usize),
}

enum MbEv {
    /// Message `msg` is deposited.
    Deposit { msg: usize },
    /// A sender is done and leaves for good.
    SenderLeaves { node: usize },
    /// The recipient of `msg` comes online.
    Return { msg: usize },
}

/// Tags: deposit of message `m` is `m` (its lookup and its puts), the fetch
/// of epoch `e` (0 current, 1 previous) by its recipient `M + 2m + e`.
fn fetch_tag(messages: usize, msg: usize, e: usize) -> usize {
    messages + 2 * msg + e
}

impl Scenario for MailboxSim<'_> {
    type Event = MbEv;

    fn setup_done(net: &mut Net<Self>) {
        let p = net.s.p;
        let period = DEPOSIT_SPAN + RETURN_MAX;
        net.horizon = Some(net.q.now() + period + HORIZON_SLACK);
        let span_us = DEPOSIT_SPAN.as_micros() as u64;
        for msg in 0..p.messages {
            let at = Duration::from_micros(net.rng.below(span_us));
            net.q.schedule(at, Ev::Scenario(MbEv::Deposit { msg }));
        }
        let period_us = period.as_micros() as u64;
        let churners = net.s.recipient_base - p.nodes;
        for i in 0..churners {
            let at = Duration::from_micros(net.rng.below(period_us));
            net.q.schedule(at, Ev::Leave);
            let at = Duration::from_micros(net.rng.below(period_us));
            net.q.schedule(at, Ev::JoinStart { node: p.nodes + i });
        }
    }

    fn joined(net: &mut Net<Self>, node: usize) {
        let Some(msg) = node.checked_sub(net.s.recipient_base) else {
            return;
        };
        // A recipient: it fetches and goes offline again; churn does not
        // pick it, nor does anyone bootstrap through it.
        net.live_remove(node);
        let now = net.q.now();
        let unix = net.unix_ms();
        let peer = net.nodes[node].peer;
        let m = &mut net.s.msgs[msg];
        m.fetching = 2;
        m.fetched = true;
        m.fetch_started = now;
        m.crossed = epoch_of(unix) != m.deposit_epoch;
        let messages = net.s.p.messages;
        for (e, epoch) in epochs_to_fetch(unix).into_iter().enumerate() {
            let key = Key::for_mailbox(&peer, epoch);
            let tag = fetch_tag(messages, msg, e);
            net.start_lookup(
                node,
                key,
                Purpose::Scenario(tag),
                Query::GetRecords(RecordKind::Mailbox),
            );
        }
    }

    fn lookup_done(net: &mut Net<Self>, tag: usize, done: Box<Active>) {
        let messages = net.s.p.messages;
        if tag < messages {
            deposit_found(net, tag, &done);
        } else {
            fetch_done(net, (tag - messages) / 2, &done);
        }
    }

    fn lookup_abandoned(net: &mut Net<Self>, tag: usize) {
        // Only a fetch whose recipient left could be abandoned, and
        // recipients leave only once both fetches are done.
        let messages = net.s.p.messages;
        if let Some(m) = tag
            .checked_sub(messages)
            .and_then(|t| net.s.msgs.get_mut(t / 2))
        {
            m.fetching = m.fetching.saturating_sub(1);
        }
    }

    fn put_answered(net: &mut Net<Self>, tag: usize, _from: usize, stored: bool) {
        if let Some(m) = net.s.msgs.get_mut(tag) {
            m.acks += usize::from(stored);
        }
    }

    fn on_event(net: &mut Net<Self>, ev: MbEv) {
        match ev {
            MbEv::Deposit { msg } => deposit(net, msg),
            MbEv::SenderLeaves { node } => {
                net.leave(node);
                net.s.senders_left += 1;
            }
            MbEv::Return { msg } => {
                let node = net.s.msgs[msg].recipient;
                net.start_node(node);
            }
        }
    }
}

/// A sender seals (here: opaque bytes) and signs the message with a
/// throwaway key, and looks up the k closest to its mailbox key.
fn deposit(net: &mut Net<MailboxSim<'_>>, msg: usize) {
    // The sender is taken out of the live set at once: no other deposit
    // picks it, churn does not take it mid-deposit, and it leaves by itself.
    let Some(sender) = net.random_live(None) else {
        return;
    };
    net.live_remove(sender);
    let unix = net.unix_ms();
    let recipient = net.nodes[net.s.msgs[msg].recipient].peer;
    let key = deposit_key(&recipient, unix);
    let throwaway = Keypair::from_secret_bytes(net.rng.bytes32());
    let payload: Vec<u8> = (0..net.s.p.payload).map(|i| (i ^ msg) as u8).collect();
    let record = SignedRecord::sign(
        &throwaway,
        RecordKind::Mailbox,
        key,
        1,
        unix,
        MAX_MAILBOX_TTL,
        payload,
    );
    let m = &mut net.s.msgs[msg];
    m.sender = Some(sender);
    m.key = key;
    m.publisher = Some(record.publisher);
    m.deposit_epoch = epoch_of(unix);
    m.expires_ms = record.expires_ms();
    m.record = Some(record);
    let back = Duration::from_micros(net.rng.below(RETURN_MAX.as_micros() as u64));
    net.q.schedule(back, Ev::Scenario(MbEv::Return { msg }));
    net.start_lookup(sender, key, Purpose::Scenario(msg), Query::FindNode);
}

/// The sender's lookup found the closest nodes: it puts the record to each.
fn deposit_found(net: &mut Net<MailboxSim<'_>>, msg: usize, done: &Active) {
    let sender = done.owner;
    let Some(record) = net.s.msgs[msg].record.take() else {
        return;
    };
    for c in done.lookup.closest() {
        if let Some(to) = index_of(&c.addr).filter(|&to| to < net.nodes.len()) {
            let request = reach_proto::dht::rpc::DhtRequest::PutRecord {
                record: record.clone(),
            };
            net.send_request(sender, to, None, request, msg);
        }
    }
    net.q.schedule(
        SENDER_LINGER,
        Ev::Scenario(MbEv::SenderLeaves { node: sender }),
    );
}

/// One of a recipient's fetch lookups ended.
fn fetch_done(net: &mut Net<MailboxSim<'_>>, msg: usize, done: &Active) {
    let now = net.q.now();
    let now_ms = net.unix_ms();
    let m = &net.s.msgs[msg];
    let publisher = m.publisher;
    let found = done
        .records
        .iter()
        .any(|r| Some(r.publisher) == publisher && r.seq == 1);
    let started = m.fetch_started;
    net.s
        .fetch_ms
        .push(now.saturating_sub(started).as_secs_f64() * 1000.0);
    let m = &mut net.s.msgs[msg];
    m.retrieved |= found;
    m.fetch_lookups += 1;
    m.fetching = m.fetching.saturating_sub(1);
    if m.fetching > 0 {
        return;
    }
    // Both done: where was the message (for the report's why), then the
    // recipient goes offline again.
    let key = m.key;
    let (holders, closest_holding) = holders_of(net, &key, publisher, now_ms);
    let m = &mut net.s.msgs[msg];
    m.holders = holders;
    m.closest_holding = closest_holding;
    let node = m.recipient;
    net.leave(node);
    net.s.fetches_done += 1;
    if net.s.fetches_done == net.s.msgs.len() {
        net.s.census = census(net, now_ms);
    }
}

/// Unexpired mailbox record copies held by live nodes, the messages they
/// are copies of, and the messages not expired yet.
fn census(net: &Net<MailboxSim<'_>>, now_ms: u64) -> (usize, usize, usize) {
    let mut copies = 0;
    let mut messages = std::collections::HashSet::new();
    for n in net.nodes.iter().filter(|n| n.alive) {
        for r in n.store.iter() {
            if r.kind == RecordKind::Mailbox && r.expires_ms() > now_ms {
                copies += 1;
                messages.insert(r.publisher);
            }
        }
    }
    let unexpired = net.s.msgs.iter().filter(|m| m.expires_ms > now_ms).count();
    (copies, messages.len(), unexpired)
}

/// Live nodes holding the message of `publisher` at `key`, and how many of
/// the true k closest live nodes to `key` do.
fn holders_of(
    net: &Net<MailboxSim<'_>>,
    key: &Key,
    publisher: Option<reach_proto::PeerId>,
    now_ms: u64,
) -> (usize, usize) {
    let holds = |i: usize| {
        net.nodes[i]
            .store
            .get(RecordKind::Mailbox, key, now_ms)
            .iter()
            .any(|r| Some(r.publisher) == publisher)
    };
    let mut alive: Vec<(reach_proto::dht::Distance, usize)> = net
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.alive)
        .map(|(i, n)| (n.key.distance(key), i))
        .collect();
    let holders = alive.iter().filter(|&&(_, i)| holds(i)).count();
    let k = net.lcfg.k;
    if alive.len() > k {
        alive.select_nth_unstable(k);
        alive.truncate(k);
    }
    let closest = alive.iter().filter(|&&(_, i)| holds(i)).count();
    (holders, closest)
}

fn report(net: Net<MailboxSim<'_>>) -> MailboxReport {
    let p = net.s.p;
    let msgs = &net.s.msgs;
    let deposited: Vec<&Message> = msgs.iter().filter(|m| m.acks > 0).collect();
    let retrieved = msgs.iter().filter(|m| m.retrieved).count();
    let fetched: Vec<&Message> = msgs.iter().filter(|m| m.fetched).collect();
    let fetch_lookups: usize = msgs.iter().map(|m| usize::from(m.fetch_lookups)).sum();
    let missed = fetched.iter().filter(|m| !m.retrieved);
    let mut fetch_ms = net.s.fetch_ms.clone();
    MailboxReport {
        scenario: "mailbox",
        nodes: p.nodes,
        seed: p.seed,
        latency_ms: p.link.latency.as_secs_f64() * 1000.0,
        loss: p.link.loss,
        churn: p.churn,
        payload_bytes: p.payload,
        tick_s: p.tick.as_secs_f64(),
        handoff: p.handoff,
        messages: p.messages,
        deposited: deposited.len(),
        stored_acks_mean: round3(mean(deposited.iter().map(|m| m.acks as f64))),
        retrieved,
        retrieval_rate: round6(ratio(retrieved, p.messages)),
        lookups_per_retrieval: round3(ratio(fetch_lookups, retrieved)),
        lookups_per_recipient: round3(ratio(fetch_lookups, fetched.len())),
        crossed_epoch: fetched.iter().filter(|m| m.crossed).count(),
        recipient_join_failures: msgs
            .iter()
            .filter(|m| net.nodes[m.recipient].gave_up)
            .count(),
        missed_no_holder: missed.clone().filter(|m| m.holders == 0).count(),
        missed_with_holder: missed.clone().filter(|m| m.holders > 0).count(),
        missed_holders: missed.map(|m| (m.holders, m.closest_holding)).collect(),
        holders_at_fetch_mean: round3(mean(fetched.iter().map(|m| m.holders as f64))),
        holders_at_fetch_min: fetched.iter().map(|m| m.holders).min().unwrap_or(0),
        closest_holding_mean: round3(mean(fetched.iter().map(|m| m.closest_holding as f64))),
        fetch_ms_p50: round3(quantile(&mut fetch_ms, 0.5)),
        fetch_ms_p99: round3(quantile(&mut fetch_ms, 0.99)),
        copies_at_last_fetch: net.s.census.0,
        messages_alive_at_last_fetch: net.s.census.1,
        messages_unexpired_at_last_fetch: net.s.census.2,
        handoffs: net.handoffs_sent,
        store_rejections: net.rejections(),
        join_lookups: net.join_lookups,
        maintenance_lookups: net.maintenance_lookups,
        join_failures: net.join_failures,
        churn_left: net.churn_left,
        churn_joined: net.churn_joined,
        senders_left: net.s.senders_left,
        setup_virtual_s: round3(net.setup_end.unwrap_or_default().as_secs_f64()),
        virtual_s: round3(net.last_active.as_secs_f64()),
    }
}

fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

/// Runs the scenario; returns the report and the real time it took.
/// Parameters beyond the limits are clamped to them (the report shows what
/// ran).
pub fn run(p: &MailboxParams) -> (MailboxReport, Duration) {
    let started = Instant::now();
    let p = &MailboxParams {
        nodes: p.nodes.clamp(2, MAX_NODES),
        messages: p.messages.min(MAX_MESSAGES),
        churn: if p.churn.is_nan() {
            0.0
        } else {
            p.churn.clamp(0.0, 1.0)
        },
        tick: p.tick.clamp(Duration::from_secs(1), MAX_TICK),
        payload: p.payload.min(reach_proto::dht::record::MAX_MAILBOX_PAYLOAD),
        ..p.clone()
    };
    let churners = (p.churn * p.nodes as f64).round() as usize;
    let recipient_base = p.nodes + churners;
    let total = recipient_base + p.messages;
    let s = MailboxSim {
        p,
        msgs: Vec::new(),
        recipient_base,
        senders_left: 0,
        fetch_ms: Vec::new(),
        fetches_done: 0,
        census: (0, 0, 0),
    };
    let mut net = Net::new(s, p.seed, p.link, p.nodes, total);
    net.tick = Some(p.tick);
    net.handoff = p.handoff;
    net.unix_base_ms =
        START_EPOCH * MAILBOX_EPOCH.as_millis() as u64 + MAILBOX_EPOCH.as_millis() as u64 / 2;
    net.s.msgs = (0..p.messages)
        .map(|i| Message {
            recipient: recipient_base + i,
            sender: None,
            record: None,
            key: Key([0; 32]),
            publisher: None,
            deposit_epoch: 0,
            expires_ms: 0,
            acks: 0,
            fetching: 0,
            fetch_lookups: 0,
            fetched: false,
            retrieved: false,
            crossed: false,
            holders: 0,
            closest_holding: 0,
            fetch_started: Duration::ZERO,
        })
        .collect();
    net.schedule_setup();
    net.run(|_| {});
    (report(net), started.elapsed())
}

/// The report plus real-time figures that vary between runs.
#[derive(Debug, Serialize)]
pub struct MailboxOutput {
    #[serde(flatten)]
    pub report: MailboxReport,
    pub wall_s: f64,
    pub peak_rss_mib: f64,
}

/// Runs and adds the real-time figures.
pub fn run_with_wall(p: &MailboxParams) -> MailboxOutput {
    let (report, wall) = run(p);
    MailboxOutput {
        report,
        wall_s: round3(wall.as_secs_f64()),
        peak_rss_mib: round3(peak_rss_mib()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(nodes: usize, messages: usize, seed: u64, churn: f64, loss: f64) -> MailboxParams {
        MailboxParams {
            nodes,
            messages,
            seed,
            link: super::super::lookup::link(Duration::from_millis(50), loss),
            churn,
            payload: DEFAULT_PAYLOAD,
            tick: MAX_TICK,
            handoff: true,
        }
    }

    #[test]
    fn a_small_network_with_churn_and_loss_delivers_every_mailbox_message_deterministically() {
        // Small enough for a debug build: 200 nodes, 40 messages, a day's
        // maintenance tick, 7 virtual days.
        let p = params(200, 40, 7, 0.2, 0.01);
        let a = run(&p).0;
        assert_eq!(a, run(&p).0, "same seed, same report");
        assert_eq!(a.messages, 40);
        assert_eq!(a.deposited, 40, "{a:?}");
        assert!(a.stored_acks_mean > 15.0, "{a:?}");
        assert_eq!(a.retrieved, 40, "{a:?}");
        assert_eq!(a.retrieval_rate, 1.0, "{a:?}");
        assert_eq!(a.lookups_per_retrieval, 2.0, "{a:?}");
        assert!(a.crossed_epoch > 0, "some fetches span an epoch: {a:?}");
        assert_eq!((a.churn_left, a.churn_joined, a.senders_left), (40, 40, 40));
        assert!(a.virtual_s > 7.0 * 86_400.0, "{a:?}");
    }
}
