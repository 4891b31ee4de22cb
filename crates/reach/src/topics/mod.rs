//! Topics (rooms): publish/subscribe by name, through any NAT, each message
//! once and in order per publisher, with presence.
//!
//! Every node runs one reach-proto [`Overlay`] (the sans-IO machine: trees,
//! pulls, rate limits, presence) and drives it here: its timers from
//! [`Overlay::next_timeout`] on tokio's clock, its frames on QUIC streams.
//!
//! - **Home.** A node is its own home when it holds no relay; a node that
//!   holds a relay uses that relay as its home, so a relay serves its
//!   clients' topics. A home with members of a topic says so in a signed
//!   DHT topic record at `Key::for_topic(name)` (refreshed every
//!   [`RECORD_REFRESH`], left to expire when its last member leaves), finds
//!   the topic's other homes by getting the records at that key, and opens
//!   federation links ([`wire::FED_PROTOCOL`]) to them (when two homes
//!   dial each other at once, both keep the link the smaller key dialed).
//! - **Member.** [`crate::Node::subscribe`] gives a [`Subscription`]. If the
//!   node is its own home the membership is local; else the node speaks
//!   [`wire::MEMBER_PROTOCOL`] to its home: subscribe, publish (the member
//!   signs its messages, up to [`PUBLISH_WINDOW`] in flight; the home
//!   checks that each comes from its origin's own authenticated stream, is
//!   the next seq, and passes its rate limits, and answers in order with a
//!   report or a typed refusal), deliveries and presence pushed by the
//!   home (the member checks every signature).
//! - **Configured federation** ([`TopicFederation`]): homes this home
//!   keeps a link to whatever the DHT says (redialed with reach-proto's
//!   [`StaticLinks`] backoff, 5 s doubling to 300 s), and *private* topics:
//!   never in the DHT, and carried only on links to *trusted* homes.
//! - **Re-homing.** When the held relay changes, every subscription moves to
//!   the new home and keeps its [`Subscription`]; per-origin high-water marks
//!   at the subscriber keep each message once and in order per publisher
//!   across the move.

pub mod wire;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reach_proto::PeerId;
use reach_proto::dht::record::{RecordKind, SignedRecord};
use reach_proto::topics::federation::{IdleLinks, MAX_CONFIGURED_HOMES, StaticLinks};
use reach_proto::topics::publish::{Answer as WindowAnswer, Outcome, PublishWindow};
use reach_proto::topics::{
    MAX_DATA_LEN, MAX_LINKS_PER_TOPIC, Overlay, OverlayConfig, OverlayOutput, PublishError,
    TopicFrame, TopicId, TopicMessage,
};
use serde::Serialize;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::dht::Dht;
use crate::error::{Error, Result};
use crate::node::bus::NodeEvent;
use crate::node::core::Core;
use crate::node::router::Inbound;
use crate::node::stats;
use crate::peers::Peers;
use crate::relay::RelayRuntime;
use wire::{FedFrame, MemberFrame};

/// Lifetime of this home's topic record in the DHT: a home that died
/// without a word stops being found this long after its last refresh.
pub const RECORD_TTL: Duration = Duration::from_secs(300);
/// How often a home republishes its topic records: well inside
/// [`RECORD_TTL`], so one failed put does not let the record lapse.
pub const RECORD_REFRESH: Duration = Duration::from_secs(120);
/// First wait between two lookups of a topic's homes after the topic
/// started being served here: a home that started at the same moment
/// published its record a moment later, and is found on the next look.
pub const DISCOVERY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between two lookups of a topic's homes: the wait doubles
/// from [`DISCOVERY_FIRST`] up to this, so a long-lived topic costs one DHT
/// lookup per 30 s and a new home is linked within 30 s at worst.
pub const DISCOVERY_MAX: Duration = Duration::from_secs(30);
/// Frames queued to one federation link or one member at most. Past it the
/// link is slower than the topics it carries: a link drops the frame (the
/// overlay pulls what went missing), a member stream is cut (the member
/// re-subscribes) and both are counted.
pub const SEND_QUEUE: usize = 4_096;
/// Events queued to one [`Subscription`] at most; past it the subscription
/// is told how many it missed ([`TopicEvent::Missed`]).
pub const SUBSCRIPTION_QUEUE: usize = 16_384;
/// How long a member waits for its home's answer to a publish or a
/// subscribe before it reports a timeout.
pub const HOME_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest sleep of a timer loop with nothing scheduled: bounds the wait
/// should a wake-up be missed.
const WAKE_BOUND: Duration = Duration::from_secs(60);
/// Wait before a member retries its home after a failed session: short,
/// since a member without a session receives nothing.
pub const RETRY_HOME: Duration = Duration::from_secs(1);

crate::telemetry::metrics! {
    /// Counters of topics.
    pub(crate) struct TopicsCounters =>
    /// Topics' counters as [`NodeStats`](crate::NodeStats) shows them.
    pub struct TopicsStats;
    atomic {
        /// Messages this node's members published that a home took.
        counter published = "topics_published",
        /// Messages handed to this node's subscriptions.
        counter delivered = "topics_delivered",
        /// Publishes refused by a rate limit (topic or publisher): this
        /// node's own, and those of the members it serves as a home.
        counter refused_rate = "topics_refused_rate",
        /// Publishes refused for another reason (size, signature, no home,
        /// not subscribed, no room), counted like `topics_refused_rate`.
        counter refused_other = "topics_refused_other",
        /// Federation links opened (either side).
        counter links_opened = "topics_links_opened",
        /// Federation links this home closed because they carried no topic
        /// both homes serve for the idle grace (`TopicLimits::link_idle_grace`).
        counter links_closed_idle = "topics_links_closed_idle",
        /// Frames dropped because a federation link's queue was full.
        counter link_frames_dropped = "topics_link_frames_dropped",
        /// Member streams cut because the member did not keep up.
        counter members_cut = "topics_members_cut",
        /// Frames from homes or members that did not decode or broke a rule.
        counter bad_frames = "topics_bad_frames",
        /// Subscriptions moved to a new home (the held relay changed).
        counter rehomed = "topics_rehomed",
        /// A private topic offered on a link by a home not trusted with it
        /// (not carried).
        counter untrusted_joins = "topics_untrusted_joins",
    }
    external {
        /// Federation links up now.
        gauge federation_links = "topics_federation_links",
        /// Topics this node serves as a home.
        gauge served = "topics_served",
        /// Presence frames (deltas, heartbeats, snapshot pages) whose
        /// home's signature did not verify: dropped, no view changed.
        counter bad_presence = "topics_bad_presence",
    }
}

/// Why a topic operation was refused. Each has a stable [`Self::kind`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicRefusal {
    /// The name is empty, too long or not printable.
    #[error("bad topic name: {0}")]
    BadName(String),
    /// Data over [`MAX_DATA_LEN`].
    #[error("message of {0} bytes (max {MAX_DATA_LEN})")]
    TooBig(usize),
    /// Publishing needs a subscription to the topic on this node.
    #[error("not subscribed to the topic (subscribe first)")]
    NotSubscribed,
    /// The node has no home session for the topic yet (its home is being
    /// reached, or was just lost).
    #[error("no home reached for the topic yet")]
    NoHome,
    /// The topic's rate limit at the home refused the message.
    #[error("topic rate limit")]
    TopicRateLimited,
    /// The publisher's rate limit at the home refused the message.
    #[error("publisher rate limit")]
    PublisherRateLimited,
    /// Anything else the home refused, by its kind (`too_many_topics`,
    /// `not_a_home`, a bad signature, …).
    #[error("refused by the home: {0}")]
    Home(String),
}

impl TopicRefusal {
    /// Stable machine-readable name.
    pub fn kind(&self) -> &'static str {
        match self {
            TopicRefusal::BadName(_) => "topic_bad_name",
            TopicRefusal::TooBig(_) => "topic_message_too_big",
            TopicRefusal::NotSubscribed => "topic_not_subscribed",
            TopicRefusal::NoHome => "topic_no_home",
            TopicRefusal::TopicRateLimited => "topic_rate_limited",
            TopicRefusal::PublisherRateLimited => "publisher_rate_limited",
            TopicRefusal::Home(_) => "topic_refused",
        }
    }

    fn from_publish(e: &PublishError) -> TopicRefusal {
        match e {
            PublishError::TopicRateLimited => TopicRefusal::TopicRateLimited,
            PublishError::PublisherRateLimited => TopicRefusal::PublisherRateLimited,
            PublishError::TooBig(n) => TopicRefusal::TooBig(*n),
            e => TopicRefusal::Home(e.kind().to_string()),
        }
    }

    fn from_kind(kind: &str) -> TopicRefusal {
        match kind {
            "topic_rate_limited" => TopicRefusal::TopicRateLimited,
            "publisher_rate_limited" => TopicRefusal::PublisherRateLimited,
            k => TopicRefusal::Home(k.to_string()),
        }
    }

    fn is_rate(&self) -> bool {
        matches!(
            self,
            TopicRefusal::TopicRateLimited | TopicRefusal::PublisherRateLimited
        )
    }
}

/// A message of a topic, as a subscriber gets it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopicDelivery {
    /// The topic's name.
    pub topic: String,
    /// The publisher (whose key signed it; checked here).
    pub from: PeerId,
    /// Its id: the publisher's sequence number on the topic (from 1).
    pub id: u64,
    /// The application's bytes.
    #[serde(serialize_with = "serialize_bytes")]
    pub data: Bytes,
}

fn serialize_bytes<S: serde::Serializer>(b: &Bytes, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_bytes(b)
}

/// Federation a home is configured with, beyond what the DHT finds
/// ([`crate::NodeBuilder::topic_federation`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicFederation {
    /// Homes to keep a federation link to, for every topic both serve,
    /// whatever the DHT says (dialed by PeerId like any peer; redialed 5 s
    /// after a failure, doubling to 300 s). At most
    /// [`MAX_CONFIGURED_HOMES`].
    pub peers: Vec<PeerId>,
    /// Homes trusted with the private topics.
    pub trusted: Vec<PeerId>,
    /// Topics federated only among trusted homes: this home publishes no
    /// DHT record for them, looks none up, and carries them only on links
    /// to homes in `trusted` (with none trusted, a private topic stays on
    /// this home).
    pub private_topics: Vec<String>,
}

impl TopicFederation {
    /// Checks the lists: a typed [`Error::Config`] for a bad topic name or
    /// too many homes.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.peers.len() > MAX_CONFIGURED_HOMES {
            return Err(Error::Config(format!(
                "{} federation peers configured (at most {MAX_CONFIGURED_HOMES})",
                self.peers.len()
            )));
        }
        for name in &self.private_topics {
            TopicId::from_name(name)
                .map_err(|e| Error::Config(format!("private topic {name:?}: {e}")))?;
        }
        Ok(())
    }
}

/// The configuration as the runtime uses it.
struct Federation {
    trusted: HashSet<PeerId>,
    private: HashSet<TopicId>,
}

impl Federation {
    /// Whether the link to `peer` may carry `topic`.
    fn allows(&self, peer: &PeerId, topic: &TopicId) -> bool {
        !self.private.contains(topic) || self.trusted.contains(peer)
    }
}

/// What a [`Subscription`] yields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TopicEvent {
    /// A message: each once, in order per publisher.
    Message(TopicDelivery),
    /// A member appeared at `home`.
    Joined {
        /// The member.
        member: PeerId,
        /// Its home.
        home: PeerId,
    },
    /// A member left (or its home went silent for `HOME_STALE`).
    Left {
        /// The member.
        member: PeerId,
        /// Its home.
        home: PeerId,
    },
    /// The subscription fell behind by [`SUBSCRIPTION_QUEUE`] events and
    /// this many were dropped.
    Missed {
        /// Events dropped.
        count: u64,
    },
}

/// What a publish reached, as far as the publisher's home knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PublishReport {
    /// The message's id (the publisher's sequence number on the topic).
    pub id: u64,
    /// The home that took it.
    pub home: PeerId,
    /// Homes of the topic the home knows (itself included).
    pub homes: u32,
    /// Members of the topic the home knows (the publisher included).
    pub members: u32,
}

/// A node's topics, for `reach status` and `/v1/status`.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct TopicsStatus {
    /// This node's home (itself when it holds no relay).
    pub home: Option<PeerId>,
    /// This node's subscriptions.
    pub subscribed: Vec<SubscribedStatus>,
    /// Topics this node serves as a home.
    pub served: Vec<ServedStatus>,
    /// Homes this node has a federation link with.
    pub links: Vec<PeerId>,
    /// The configured federation homes ([`TopicFederation::peers`]).
    pub configured: Vec<PeerId>,
}

/// One subscription of a node.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SubscribedStatus {
    /// The topic.
    pub topic: String,
    /// The home serving it now (`None` while it is being reached).
    pub home: Option<PeerId>,
    /// Members known.
    pub members: usize,
}

/// One topic a home serves.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ServedStatus {
    /// The topic.
    pub topic: String,
    /// Members served here (this node itself included when subscribed).
    pub members: usize,
    /// Federation links carrying it.
    pub links: usize,
}

/// A subscription to a topic; see [`crate::Node::subscribe`]. Dropping it
/// unsubscribes (once the node's last subscription to the topic is gone).
pub struct Subscription {
    topic: String,
    id: TopicId,
    key: u64,
    rx: mpsc::Receiver<TopicEvent>,
    missed: Arc<std::sync::atomic::AtomicU64>,
    topics: std::sync::Weak<Topics>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// The next message or presence change; `None` once the node stopped.
    pub async fn next(&mut self) -> Option<TopicEvent> {
        let missed = self.missed.swap(0, std::sync::atomic::Ordering::Relaxed);
        if missed > 0 {
            return Some(TopicEvent::Missed { count: missed });
        }
        self.rx.recv().await
    }

    /// The topic's name.
    pub fn topic(&self) -> &str {
        &self.topic
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(t) = self.topics.upgrade() {
            t.drop_subscription(self.id, self.key);
        }
    }
}

/// One subscriber's queue.
struct Sink {
    tx: mpsc::Sender<TopicEvent>,
    missed: Arc<std::sync::atomic::AtomicU64>,
}

/// Where this node's membership of a topic stands.
enum Attached {
    /// Not attached (home being reached).
    None,
    /// This node is its own home.
    Local,
    /// Attached to `home` through a member stream.
    Remote {
        home: PeerId,
        /// To the stream's session, which numbers, signs and sends.
        publish: mpsc::Sender<PublishJob>,
    },
}

/// A publish handed to a member stream's session: the data, and where
/// its outcome goes.
type PublishJob = (Vec<u8>, oneshot::Sender<Result<PublishReport>>);

/// Publishes a member has in flight to its home per topic at most (the
/// window's policy is reach-proto's [`PublishWindow`]).
pub use reach_proto::topics::publish::PUBLISH_WINDOW;

/// The home's answer to one of our publishes: its seq, and the homes and
/// members it reached or the refusal's kind.
type Answer = (u64, std::result::Result<(u32, u32), String>);

/// A member stream's publishes: which seq to sign next, what is in
/// flight, what goes again (reach-proto's machine; this module only signs,
/// writes and tells the callers).
type Publishing = PublishWindow<PublishJob>;

/// A topic this node subscribed to.
struct Mine {
    name: String,
    sinks: HashMap<u64, Sink>,
    /// Per publisher, the highest seq handed over: exactly once, in order,
    /// across homes.
    hwm: HashMap<PeerId, u64>,
    /// Members known, each with every home that lists it, the newest
    /// last (never empty). A member that re-homed is listed by its old home
    /// too until that home goes stale: the view keeps it while any home
    /// does, and reports it at the newest.
    members: BTreeMap<PeerId, Vec<PeerId>>,
    /// The seq of our last message that a home took (or may have).
    last_seq: u64,
    /// One publish at a time per topic while this node is its own home: a
    /// refused message must not leave a gap in our own seqs behind one that
    /// was taken. (Through a home, the member stream's session numbers the
    /// messages and keeps that rule with several in flight.)
    publishing: Arc<tokio::sync::Mutex<()>>,
    attached: Attached,
    session: CancellationToken,
}

/// A member a home serves over a stream.
struct RemoteMember {
    /// Encoded [`MemberFrame`]s for the member's stream.
    tx: mpsc::Sender<Bytes>,
    cut: CancellationToken,
}

/// A topic this node serves as a home.
struct Served {
    name: String,
    /// This node is a member itself.
    local: bool,
    remote: HashMap<PeerId, RemoteMember>,
    /// When the topic record is due again.
    record_due: Instant,
    /// When the topic's homes are looked up next, and the wait after.
    lookup_due: Instant,
    lookup_wait: Duration,
}

/// A federation link.
struct Link {
    id: u64,
    /// Dialed by the home with the smaller key: when both homes dialed at
    /// once, both keep this one.
    preferred: bool,
    /// Encoded [`FedFrame`]s for the link's stream.
    tx: mpsc::Sender<Bytes>,
    /// Topics the other home said it serves.
    theirs: BTreeSet<TopicId>,
    cut: CancellationToken,
}

struct State {
    overlay: Overlay,
    mine: HashMap<TopicId, Mine>,
    served: HashMap<TopicId, Served>,
    links: HashMap<PeerId, Link>,
    dialing: HashSet<PeerId>,
    /// The configured homes and their redial schedule.
    configured: StaticLinks,
    /// The links that carry no topic both homes serve, to close after the
    /// grace.
    idle: IdleLinks,
    next_key: u64,
    /// The overlay timeout the driver sleeps until (`None`: none, it waits
    /// to be woken): it is woken only when a flush makes the next timeout
    /// sooner, not after every frame.
    driver_at: Option<Duration>,
}

/// The topics capability.
pub(crate) struct Topics {
    core: Arc<Core>,
    peers: Arc<Peers>,
    dht: Arc<Dht>,
    relay: Arc<RelayRuntime>,
    epoch: Instant,
    state: Mutex<State>,
    /// Wakes the driver: the overlay's next timeout may be sooner.
    wake: Notify,
    /// Wakes the discovery loop: a topic started being served.
    discover: Notify,
    federation: Federation,
    /// Wakes the configured-links loop: a topic started being served, a
    /// configured link went down, or a link became idle.
    redial: Notify,
    /// This node's home: itself, or the relay it holds; `None` while a node
    /// that needs a relay holds none.
    home: watch::Sender<Option<PeerId>>,
    pub(crate) counters: TopicsCounters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn topic_id(name: &str) -> Result<TopicId> {
    TopicId::from_name(name).map_err(|e| Error::Topic(TopicRefusal::BadName(e.to_string())))
}

impl Topics {
    pub(crate) fn new(
        core: Arc<Core>,
        peers: Arc<Peers>,
        dht: Arc<Dht>,
        relay: Arc<RelayRuntime>,
        config: OverlayConfig,
        federation: TopicFederation,
    ) -> Arc<Self> {
        let me = core.peer_id;
        // The incarnation grows with each start, so other homes know this
        // one's presence versions started over.
        let incarnation = crate::dht::unix_ms();
        let home = home_of(me, &relay);
        let overlay = Overlay::new(core.keypair.clone(), incarnation, config);
        Arc::new(Topics {
            core,
            peers,
            dht,
            relay,
            epoch: Instant::now(),
            state: Mutex::new(State {
                overlay,
                mine: HashMap::new(),
                served: HashMap::new(),
                links: HashMap::new(),
                dialing: HashSet::new(),
                configured: StaticLinks::new(me, federation.peers.iter().copied()),
                idle: IdleLinks::new(config.link_idle_grace),
                next_key: 0,
                driver_at: None,
            }),
            wake: Notify::new(),
            discover: Notify::new(),
            federation: Federation {
                trusted: federation.trusted.into_iter().collect(),
                // Validated by the builder: a bad name cannot be served
                // either, so skipping it loses nothing.
                private: federation
                    .private_topics
                    .iter()
                    .filter_map(|n| TopicId::from_name(n).ok())
                    .collect(),
            },
            redial: Notify::new(),
            home: watch::channel(home).0,
            counters: Default::default(),
        })
    }
}

/// This node's home: the relay it holds; else itself, unless it needs a
/// relay (it acquires one always, or it was found not reachable) and holds
/// none yet.
fn home_of(me: PeerId, relay: &RelayRuntime) -> Option<PeerId> {
    use crate::node::bus::Reachability;
    use crate::relay::RelayMode;
    if let Some((r, _)) = relay.held() {
        return Some(r);
    }
    match (relay.acquire, relay.reachability()) {
        (RelayMode::On, _) | (RelayMode::Auto, Reachability::Private) => None,
        _ => Some(me),
    }
}

/// Releases a [`crate::peers::PeerTable::hold`] of the connection to a
/// peer when its holder ends, however it ends.
struct Release(Arc<Peers>, PeerId);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.release(&self.1);
    }
}

/// Ends a spawned task when its owner ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn lost(peer: PeerId, why: &dyn std::fmt::Display) -> Error {
    Error::ConnectionLost {
        peer,
        reason: why.to_string(),
    }
}

async fn write_frame<T: Serialize>(send: &mut quinn::SendStream, f: &T) -> Result<()> {
    let bytes = wire::encode(f)?;
    send.write_all(&bytes)
        .await
        .map_err(|e| Error::Wire(reach_proto::wire::WireError::Malformed(e.to_string())))
}

/// Frames written to a stream in one write at most: what was queued
/// while the last write went out goes in the next one (one lock of the
/// QUIC connection, one wake of its driver, full packets), up to this.
pub const WRITE_BATCH: usize = 64;

/// Bytes of a [`MemberFrame::Published`] answer, about (header and a few
/// varints): what a batch's answers buffer reserves per publish.
const REPLY_LEN: usize = 16;

/// `f` encoded for a stream; `None` (logged) if it is over the frame limit,
/// which the frames made here never are.
fn encoded<T: Serialize>(f: &T) -> Option<Bytes> {
    match wire::encode_bytes(f) {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::warn!(error = %e, "a topics frame not sent");
            None
        }
    }
}

/// Offers `f` to a stream's queue; false if the queue is full or closed.
fn offer<T: Serialize>(tx: &mpsc::Sender<Bytes>, f: &T) -> bool {
    encoded(f).is_some_and(|b| tx.try_send(b).is_ok())
}

/// Writes the encoded frames of `rx` on `send` in order until the queue
/// closes, a write fails or `cut` fires, then finishes the stream: all
/// that is queued at once (up to [`WRITE_BATCH`]) in one write, copied
/// into one buffer. One per member stream and federation link: the
/// overlay's side only ever `try_send`s.
///
/// One buffer rather than the frames as they are: quinn keeps a stream's
/// unacknowledged data as a list of the chunks it was given and scans it
/// for every packet it sends, so a list of one ~200-byte chunk per frame
/// cost the home more (measured: a tenth of its CPU at saturation) than
/// copying a batch's frames together (a few KB of memcpy).
async fn write_loop(
    mut send: quinn::SendStream,
    mut rx: mpsc::Receiver<Bytes>,
    cut: CancellationToken,
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    loop {
        batch.clear();
        let n = tokio::select! {
            _ = cut.cancelled() => break,
            n = rx.recv_many(&mut batch, WRITE_BATCH) => n,
        };
        if n == 0 {
            break;
        }
        let chunk = if n == 1 {
            batch.swap_remove(0)
        } else {
            let mut all = BytesMut::with_capacity(batch.iter().map(Bytes::len).sum());
            for b in &batch {
                all.extend_from_slice(b);
            }
            all.freeze()
        };
        if send.write_chunk(chunk).await.is_err() {
            break;
        }
    }
    let _ = send.finish();
}

/// Hands `ev` to every subscriber of `mine` without waiting: a full queue
/// counts the event as missed for that subscriber.
fn push(mine: &Mine, ev: &TopicEvent) {
    for sink in mine.sinks.values() {
        if let Err(mpsc::error::TrySendError::Full(_)) = sink.tx.try_send(ev.clone()) {
            sink.missed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// A member changed: updates the view and tells the subscribers. A member
/// joining at another home moved there (reported as joined at it); a leave
/// from one of its homes changes nothing while another still lists it.
fn presence_mine(mine: &mut Mine, member: PeerId, home: PeerId, joined: bool) {
    if joined {
        let homes = mine.members.entry(member).or_default();
        if homes.last() != Some(&home) {
            homes.retain(|h| *h != home);
            homes.push(home);
            push(mine, &TopicEvent::Joined { member, home });
        }
    } else if let Some(homes) = mine.members.get_mut(&member)
        && homes.contains(&home)
    {
        homes.retain(|h| *h != home);
        if homes.is_empty() {
            mine.members.remove(&member);
            push(mine, &TopicEvent::Left { member, home });
        }
    }
}

/// The member view as (member, its newest home) pairs.
fn member_list(mine: &Mine) -> impl Iterator<Item = (PeerId, PeerId)> + '_ {
    mine.members
        .iter()
        .filter_map(|(m, homes)| Some((*m, *homes.last()?)))
}

/// Replaces the member view with a home's snapshot (which may list a member
/// at several homes), telling the subscribers what changed: a member no
/// longer listed left, a new one joined, one whose newest home is no
/// longer listed moved.
fn resync_members(mine: &mut Mine, list: Vec<(PeerId, PeerId)>) {
    let old = std::mem::take(&mut mine.members);
    let mut new: BTreeMap<PeerId, Vec<PeerId>> = BTreeMap::new();
    for (m, h) in list {
        let homes = new.entry(m).or_default();
        if !homes.contains(&h) {
            homes.push(h);
        }
    }
    for (m, homes) in new.iter_mut() {
        // Where the member was reported before stays its newest home while
        // it is still listed there: no event for what did not change.
        if let Some(was) = old.get(m).and_then(|o| o.last())
            && let Some(i) = homes.iter().position(|h| h == was)
        {
            let h = homes.remove(i);
            homes.push(h);
        }
    }
    for (m, homes) in &old {
        if !new.contains_key(m)
            && let Some(h) = homes.last()
        {
            push(
                mine,
                &TopicEvent::Left {
                    member: *m,
                    home: *h,
                },
            );
        }
    }
    for (m, homes) in &new {
        let (now, before) = (homes.last(), old.get(m).and_then(|o| o.last()));
        if let Some(h) = now
            && now != before
        {
            push(
                mine,
                &TopicEvent::Joined {
                    member: *m,
                    home: *h,
                },
            );
        }
    }
    mine.members = new;
}

impl Topics {
    fn me(&self) -> PeerId {
        self.core.peer_id
    }

    /// The overlay's clock: time since this capability started (tokio's
    /// clock, so tests can pause it).
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Hands a verified message to this node's subscribers of `topic`,
    /// once per publisher seq.
    fn deliver_mine(&self, mine: &mut Mine, msg: &TopicMessage) {
        let hwm = mine.hwm.entry(msg.origin).or_insert(0);
        if msg.seq <= *hwm {
            return;
        }
        *hwm = msg.seq;
        stats::bump(&self.counters.delivered);
        let ev = TopicEvent::Message(TopicDelivery {
            topic: mine.name.clone(),
            from: msg.origin,
            id: msg.seq,
            data: Bytes::from(msg.data.clone()),
        });
        push(mine, &ev);
    }

    /// Carries out what the overlay asked for. Called, with the state
    /// locked, after every call into the overlay; never waits (queues are
    /// offered frames with `try_send`).
    fn flush(&self, st: &mut State) {
        loop {
            let mut cut = Vec::new();
            while let Some(out) = st.overlay.poll_output() {
                match out {
                    OverlayOutput::Send { to, frame } => {
                        if let Some(l) = st.links.get(&to)
                            && !offer(&l.tx, &FedFrame::Overlay(frame.encode()))
                        {
                            stats::bump(&self.counters.link_frames_dropped);
                        }
                    }
                    OverlayOutput::Deliver { topic, msg } => {
                        let Some(s) = st.served.get(&topic) else {
                            continue;
                        };
                        if s.local
                            && let Some(mine) = st.mine.get_mut(&topic)
                        {
                            self.deliver_mine(mine, &msg);
                        }
                        // Encoded once for all the members.
                        if s.remote.is_empty() {
                            continue;
                        }
                        let frame = match wire::encode_deliver(&msg) {
                            Ok(f) => f,
                            Err(e) => {
                                tracing::warn!(error = %e, "a topics frame not sent");
                                continue;
                            }
                        };
                        for (peer, m) in &s.remote {
                            if m.tx.try_send(frame.clone()).is_err() {
                                cut.push((topic, *peer));
                            }
                        }
                    }
                    OverlayOutput::PresenceChanged {
                        topic,
                        member,
                        home,
                        joined,
                    } => {
                        let Some(s) = st.served.get(&topic) else {
                            continue;
                        };
                        if s.local
                            && let Some(mine) = st.mine.get_mut(&topic)
                        {
                            presence_mine(mine, member, home, joined);
                        }
                        let f = MemberFrame::Presence {
                            member,
                            home,
                            joined,
                        };
                        let Some(frame) = encoded(&f) else {
                            continue;
                        };
                        for (peer, m) in &s.remote {
                            if m.tx.try_send(frame.clone()).is_err() {
                                cut.push((topic, *peer));
                            }
                        }
                    }
                }
            }
            if cut.is_empty() {
                break;
            }
            // A member that does not keep up is cut (it re-subscribes)
            // rather than given a gap it cannot see.
            let now = self.now();
            for (topic, peer) in cut {
                if let Some(s) = st.served.get_mut(&topic)
                    && let Some(m) = s.remote.remove(&peer)
                {
                    m.cut.cancel();
                    stats::bump(&self.counters.members_cut);
                    let _ = st.overlay.member_left(topic, peer, now);
                    self.maybe_unserve(st, topic);
                }
            }
        }
        let next = st.overlay.next_timeout();
        if next.is_some_and(|n| st.driver_at.is_none_or(|d| n < d)) {
            st.driver_at = next;
            self.wake.notify_one();
        }
    }

    /// Starts serving `topic` here (nothing if it is already).
    fn serve(
        &self,
        st: &mut State,
        topic: TopicId,
        name: &str,
    ) -> std::result::Result<(), &'static str> {
        if st.served.contains_key(&topic) {
            return Ok(());
        }
        st.overlay
            .subscribe(topic, self.now())
            .map_err(|e| e.kind())?;
        let now = Instant::now();
        st.served.insert(
            topic,
            Served {
                name: name.to_string(),
                local: false,
                remote: HashMap::new(),
                record_due: now,
                lookup_due: now,
                lookup_wait: DISCOVERY_FIRST,
            },
        );
        let State { overlay, links, .. } = st;
        for (peer, link) in links.iter() {
            if !self.federation.allows(peer, &topic) {
                continue;
            }
            let _ = offer(&link.tx, &FedFrame::Join(topic));
            if link.theirs.contains(&topic) {
                let _ = overlay.link_up(*peer, &[topic]);
            }
        }
        self.review_links(st);
        self.discover.notify_one();
        self.redial.notify_one();
        Ok(())
    }

    /// Stops serving `topic` once it has no member here.
    fn maybe_unserve(&self, st: &mut State, topic: TopicId) {
        let Some(s) = st.served.get(&topic) else {
            return;
        };
        if s.local || !s.remote.is_empty() {
            return;
        }
        st.served.remove(&topic);
        st.overlay.unsubscribe(topic);
        for (peer, link) in st.links.iter() {
            if self.federation.allows(peer, &topic) {
                let _ = offer(&link.tx, &FedFrame::Leave(topic));
            }
        }
        self.review_links(st);
    }

    /// Notes whether the link to `peer` carries a topic both homes serve
    /// (a link that stops doing so is closed after the idle grace, unless
    /// it goes to a configured home).
    fn review_link(&self, st: &mut State, peer: PeerId) {
        let Some(link) = st.links.get(&peer) else {
            st.idle.remove(&peer);
            return;
        };
        let shared = link.theirs.iter().any(|t| st.served.contains_key(t));
        let kept = st.configured.contains(&peer);
        if st.idle.update(peer, shared, kept, self.now()) {
            self.redial.notify_one();
        }
    }

    /// [`Self::review_link`] for every link (the topics served changed).
    fn review_links(&self, st: &mut State) {
        let peers: Vec<PeerId> = st.links.keys().copied().collect();
        for peer in peers {
            self.review_link(st, peer);
        }
    }

    /// What a publish reached as far as this home knows.
    fn report(st: &State, topic: TopicId, home: PeerId, id: u64) -> PublishReport {
        let members = st.overlay.members(&topic);
        let mut homes: HashSet<PeerId> = members.iter().map(|(_, h)| *h).collect();
        homes.insert(home);
        let (eager, lazy) = st.overlay.links_of(&topic, &home);
        homes.extend(eager);
        homes.extend(lazy);
        PublishReport {
            id,
            home,
            homes: homes.len() as u32,
            members: members.len() as u32,
        }
    }

    // ---- the application's side ----

    /// A new subscription to `name`.
    pub(crate) fn subscribe(self: &Arc<Self>, name: &str) -> Result<Subscription> {
        let topic = topic_id(name)?;
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_QUEUE);
        let missed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut st = self.state();
        let key = st.next_key;
        st.next_key += 1;
        let sink = Sink {
            tx: tx.clone(),
            missed: missed.clone(),
        };
        match st.mine.get_mut(&topic) {
            Some(mine) => {
                // A second subscription starts with the members known.
                for (member, home) in member_list(mine) {
                    let _ = tx.try_send(TopicEvent::Joined { member, home });
                }
                mine.sinks.insert(key, sink);
            }
            None => {
                if st.mine.len() >= reach_proto::topics::MAX_TOPICS_PER_NODE {
                    return Err(Error::Topic(TopicRefusal::Home(
                        "too_many_topics".to_string(),
                    )));
                }
                let session = CancellationToken::new();
                st.mine.insert(
                    topic,
                    Mine {
                        name: name.to_string(),
                        sinks: HashMap::from([(key, sink)]),
                        hwm: HashMap::new(),
                        members: BTreeMap::new(),
                        last_seq: 0,
                        publishing: Arc::new(tokio::sync::Mutex::new(())),
                        attached: Attached::None,
                        session: session.clone(),
                    },
                );
                let me = self.clone();
                self.core
                    .spawn(async move { me.session(topic, session).await });
            }
        }
        Ok(Subscription {
            topic: name.to_string(),
            id: topic,
            key,
            rx,
            missed,
            topics: Arc::downgrade(self),
        })
    }

    fn drop_subscription(&self, topic: TopicId, key: u64) {
        let mut st = self.state();
        let st = &mut *st;
        let Some(mine) = st.mine.get_mut(&topic) else {
            return;
        };
        mine.sinks.remove(&key);
        if !mine.sinks.is_empty() {
            return;
        }
        let Some(mine) = st.mine.remove(&topic) else {
            return;
        };
        mine.session.cancel();
        self.detach_local(st, topic);
        self.core
            .bus
            .emit(NodeEvent::TopicLeft { topic: mine.name });
    }

    /// Publishes `data` on `name` (this node must be subscribed to it).
    pub(crate) async fn publish(&self, name: &str, data: Vec<u8>) -> Result<PublishReport> {
        let result = self.publish_inner(name, data).await;
        match &result {
            Ok(_) => stats::bump(&self.counters.published),
            Err(Error::Topic(r)) if r.is_rate() => stats::bump(&self.counters.refused_rate),
            Err(_) => stats::bump(&self.counters.refused_other),
        }
        result
    }

    async fn publish_inner(&self, name: &str, data: Vec<u8>) -> Result<PublishReport> {
        let topic = topic_id(name)?;
        if data.len() > MAX_DATA_LEN {
            return Err(Error::Topic(TopicRefusal::TooBig(data.len())));
        }
        let (gate, remote) = {
            let st = self.state();
            let mine = st
                .mine
                .get(&topic)
                .ok_or(Error::Topic(TopicRefusal::NotSubscribed))?;
            let remote = match &mine.attached {
                Attached::None => return Err(Error::Topic(TopicRefusal::NoHome)),
                Attached::Local => None,
                Attached::Remote { home, publish } => Some((*home, publish.clone())),
            };
            (mine.publishing.clone(), remote)
        };
        if let Some((home, tx)) = remote {
            let (otx, orx) = oneshot::channel();
            if tx.send((data, otx)).await.is_err() {
                return Err(Error::Topic(TopicRefusal::NoHome));
            }
            return match tokio::time::timeout(HOME_TIMEOUT, orx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(lost(home, &"the home session ended")),
                Err(_) => Err(Error::Timeout("waiting for the topic home's answer")),
            };
        }
        let _one_at_a_time = gate.lock().await;
        let seq = {
            let st = self.state();
            let mine = st
                .mine
                .get(&topic)
                .ok_or(Error::Topic(TopicRefusal::NotSubscribed))?;
            if !matches!(mine.attached, Attached::Local) {
                // The home moved meanwhile.
                return Err(Error::Topic(TopicRefusal::NoHome));
            }
            mine.last_seq + 1
        };
        let msg = TopicMessage::sign(&self.core.keypair, topic, seq, data)
            .map_err(|e| Error::Topic(TopicRefusal::Home(e.kind().to_string())))?;
        let result = {
            let mut st = self.state();
            let st = &mut *st;
            // Signed here, by this node's key: nothing to check.
            let r = st
                .overlay
                .publish_from_authenticated_member(msg, self.now());
            let r = r
                .map(|_| Self::report(st, topic, self.me(), seq))
                .map_err(|e| Error::Topic(TopicRefusal::from_publish(&e)));
            self.flush(st);
            r
        };
        // A message refused leaves its seq free.
        if result.is_ok()
            && let Some(mine) = self.state().mine.get_mut(&topic)
        {
            mine.last_seq = mine.last_seq.max(seq);
        }
        result
    }

    /// Members of `name` this node knows (member, home).
    pub(crate) fn members(&self, name: &str) -> Result<Vec<(PeerId, PeerId)>> {
        let topic = topic_id(name)?;
        let st = self.state();
        if let Some(mine) = st.mine.get(&topic) {
            return Ok(member_list(mine).collect());
        }
        Ok(st.overlay.members(&topic))
    }

    pub(crate) fn status(&self) -> TopicsStatus {
        let st = self.state();
        let mut subscribed: Vec<SubscribedStatus> = st
            .mine
            .values()
            .map(|m| SubscribedStatus {
                topic: m.name.clone(),
                home: match &m.attached {
                    Attached::None => None,
                    Attached::Local => Some(self.me()),
                    Attached::Remote { home, .. } => Some(*home),
                },
                members: m.members.len(),
            })
            .collect();
        subscribed.sort_by(|a, b| a.topic.cmp(&b.topic));
        let mut served: Vec<ServedStatus> = st
            .served
            .iter()
            .map(|(t, s)| ServedStatus {
                topic: s.name.clone(),
                members: s.remote.len() + usize::from(s.local),
                links: st.links.values().filter(|l| l.theirs.contains(t)).count(),
            })
            .collect();
        served.sort_by(|a, b| a.topic.cmp(&b.topic));
        let mut links: Vec<PeerId> = st.links.keys().copied().collect();
        links.sort();
        let configured = st.configured.states().map(|(p, _)| *p).collect();
        TopicsStatus {
            home: *self.home.borrow(),
            subscribed,
            served,
            links,
            configured,
        }
    }

    pub(crate) fn stats(&self) -> TopicsStats {
        let mut s = self.counters.snapshot();
        let st = self.state();
        s.federation_links = st.links.len() as u64;
        s.served = st.served.len() as u64;
        s.bad_presence = st.overlay.stats().bad_presence;
        s
    }

    // ---- membership sessions ----

    /// Makes this node a member of `topic` at itself.
    fn attach_local(&self, topic: TopicId) -> bool {
        let me = self.me();
        let mut guard = self.state();
        let st = &mut *guard;
        let Some(name) = st.mine.get(&topic).map(|m| m.name.clone()) else {
            return false;
        };
        if let Err(kind) = self.serve(st, topic, &name) {
            tracing::warn!(topic = %name, kind, "cannot serve the topic");
            return false;
        }
        if let Err(e) = st.overlay.member_joined(topic, me, self.now()) {
            tracing::warn!(topic = %name, kind = e.kind(), "cannot join the topic");
            self.maybe_unserve(st, topic);
            return false;
        }
        if let Some(s) = st.served.get_mut(&topic) {
            s.local = true;
        }
        let members = st.overlay.members(&topic);
        let seen = st.overlay.delivered_up_to(&topic, &me).unwrap_or(0);
        if let Some(mine) = st.mine.get_mut(&topic) {
            mine.last_seq = mine.last_seq.max(seen);
            resync_members(mine, members);
            mine.attached = Attached::Local;
        }
        self.flush(st);
        drop(guard);
        self.core.bus.emit(NodeEvent::TopicJoined {
            topic: name,
            home: me,
        });
        true
    }

    fn detach_local(&self, st: &mut State, topic: TopicId) {
        if let Some(mine) = st.mine.get_mut(&topic) {
            mine.attached = Attached::None;
        }
        let Some(s) = st.served.get_mut(&topic) else {
            return;
        };
        if !s.local {
            return;
        }
        s.local = false;
        let _ = st.overlay.member_left(topic, self.me(), self.now());
        self.maybe_unserve(st, topic);
        self.flush(st);
    }

    fn set_detached(&self, topic: TopicId) {
        if let Some(mine) = self.state().mine.get_mut(&topic) {
            mine.attached = Attached::None;
        }
    }

    /// Keeps this node a member of `topic` at its home, moving with the
    /// home, until the subscription is dropped.
    async fn session(self: Arc<Self>, topic: TopicId, cancel: CancellationToken) {
        let mut home_rx = self.home.subscribe();
        let me = self.me();
        // The home that served the topic last: attaching at another one is
        // a move (counted).
        let mut served_by: Option<PeerId> = None;
        loop {
            let home = *home_rx.borrow_and_update();
            match home {
                None => {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        r = home_rx.changed() => if r.is_err() { return },
                    }
                    continue;
                }
                Some(h) if h == me => {
                    if !self.attach_local(topic) {
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = home_rx.changed() => {}
                            _ = tokio::time::sleep(RETRY_HOME) => {}
                        }
                        continue;
                    }
                    self.moved(&mut served_by, me);
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        r = home_rx.changed() => if r.is_err() { return },
                    }
                    let mut st = self.state();
                    self.detach_local(&mut st, topic);
                }
                Some(h) => {
                    let r = tokio::select! {
                        _ = cancel.cancelled() => return,
                        r = self.remote_session(topic, h, &mut home_rx, &mut served_by) => r,
                    };
                    self.set_detached(topic);
                    if let Err(e) = r {
                        tracing::debug!(home = %h, error = %e, "topic home session ended");
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = home_rx.changed() => {}
                            _ = tokio::time::sleep(RETRY_HOME) => {}
                        }
                    }
                }
            }
        }
    }

    /// Notes that `home` serves the topic now, counting a move.
    fn moved(&self, served_by: &mut Option<PeerId>, home: PeerId) {
        if served_by.is_some_and(|p| p != home) {
            stats::bump(&self.counters.rehomed);
        }
        *served_by = Some(home);
    }

    /// One member stream to `home`: `Ok` when the home changed (the caller
    /// moves on), an error when the stream failed.
    async fn remote_session(
        &self,
        topic: TopicId,
        home: PeerId,
        home_rx: &mut watch::Receiver<Option<PeerId>>,
        served_by: &mut Option<PeerId>,
    ) -> Result<()> {
        let Some(name) = self.state().mine.get(&topic).map(|m| m.name.clone()) else {
            return Ok(());
        };
        let conn = self.peers.connection(home).await?;
        let s = crate::node::router::open(&conn, home, wire::MEMBER_PROTOCOL).await?;
        let (mut send, mut recv) = (s.send, s.recv);
        write_frame(
            &mut send,
            &MemberFrame::Subscribe {
                topic: name.clone(),
            },
        )
        .await?;
        let first = tokio::time::timeout(HOME_TIMEOUT, wire::read::<MemberFrame>(&mut recv))
            .await
            .map_err(|_| Error::Timeout("waiting for the topic home's answer"))??;
        let (seq_seen, members) = match first {
            Some(MemberFrame::Subscribed { seq_seen, members }) => (seq_seen, members),
            Some(MemberFrame::Refused { kind }) => {
                return Err(Error::Topic(TopicRefusal::from_kind(&kind)));
            }
            _ => {
                stats::bump(&self.counters.bad_frames);
                return Err(Error::Wire(reach_proto::wire::WireError::Malformed(
                    "the topic home did not answer the subscribe".into(),
                )));
            }
        };
        let (pub_tx, mut pub_rx) = mpsc::channel(PUBLISH_WINDOW);
        let first_seq = {
            let mut st = self.state();
            let Some(mine) = st.mine.get_mut(&topic) else {
                return Ok(());
            };
            mine.last_seq = mine.last_seq.max(seq_seen);
            let first_seq = mine.last_seq + 1;
            resync_members(mine, members);
            mine.attached = Attached::Remote {
                home,
                publish: pub_tx,
            };
            first_seq
        };
        self.moved(served_by, home);
        self.core
            .bus
            .emit(NodeEvent::TopicJoined { topic: name, home });
        // The reader keeps a frame cut off mid-way by the `select!` (its
        // reads are cancel safe), and hands over whatever has arrived.
        let mut reader = wire::FrameReader::default();
        let mut frames = Vec::with_capacity(wire::READ_BATCH);
        let mut pubs = Publishing::new(first_seq);
        let ended: Result<()> = async {
            loop {
                tokio::select! {
                    r = reader.read_batch::<MemberFrame>(&mut recv, &mut frames, wire::READ_BATCH) => match r {
                        Ok(true) => {
                            let answers = self.on_member_frames(topic, &mut frames)?;
                            self.answered(home, &mut pubs, answers);
                            while let Some(job) = pubs.next_again() {
                                self.send_publish(topic, home, &mut send, &mut pubs, job).await?;
                            }
                        }
                        Ok(false) => return Err(lost(home, &"the topic home ended the stream")),
                        Err(e) => return Err(Error::Wire(e)),
                    },
                    Some(job) = pub_rx.recv(), if pubs.can_send_new() => {
                        self.send_publish(topic, home, &mut send, &mut pubs, job).await?;
                    }
                    r = home_rx.changed() => {
                        if r.is_err() || *home_rx.borrow() != Some(home) {
                            let _ = send.finish();
                            return Ok(());
                        }
                    }
                }
            }
        }
        .await;
        // What is still in flight may have been taken: the next session
        // numbers above every seq handed out (the callers are told the
        // session ended).
        if let Some(mine) = self.state().mine.get_mut(&topic) {
            mine.last_seq = mine.last_seq.max(pubs.last_handed_out());
        }
        ended
    }

    /// Numbers, signs and sends `job` as the next seq.
    async fn send_publish(
        &self,
        topic: TopicId,
        home: PeerId,
        send: &mut quinn::SendStream,
        pubs: &mut Publishing,
        job: PublishJob,
    ) -> Result<()> {
        let (data, reply) = job;
        let seq = pubs.begin();
        let msg = match TopicMessage::sign(&self.core.keypair, topic, seq, data.clone()) {
            Ok(m) => m,
            Err(e) => {
                pubs.not_sent(seq);
                let _ = reply.send(Err(Error::Topic(TopicRefusal::Home(e.kind().to_string()))));
                return Ok(());
            }
        };
        if let Err(e) = write_frame(send, &MemberFrame::Publish(msg)).await {
            // Its seq stays handed out: the write may have gone part way.
            let _ = reply.send(Err(lost(home, &e)));
            return Err(lost(home, &"writing to the topic home failed"));
        }
        pubs.sent(seq, (data, reply));
        Ok(())
    }

    /// The home's answers to our publishes, in the order sent: the callers
    /// told, what must go again (sent behind a refused one) queued in
    /// order, the window moved.
    fn answered(&self, home: PeerId, pubs: &mut Publishing, answers: Vec<Answer>) {
        for (seq, answer) in answers {
            let a = match &answer {
                Ok(_) => WindowAnswer::Taken,
                Err(kind) if kind == wire::OUT_OF_ORDER => WindowAnswer::OutOfOrder,
                Err(_) => WindowAnswer::Refused,
            };
            match (pubs.answer(seq, a), answer) {
                (Some(Outcome::Taken { seq, item }), Ok((homes, members))) => {
                    let _ = item.1.send(Ok(PublishReport {
                        id: seq,
                        home,
                        homes,
                        members,
                    }));
                }
                (Some(Outcome::Refused { item, .. }), Err(kind)) => {
                    let _ = item
                        .1
                        .send(Err(Error::Topic(TopicRefusal::from_kind(&kind))));
                }
                // Ignored, or to go again (the window keeps it).
                _ => {}
            }
        }
    }

    /// Handles the frames the home sent (drained from `frames`): the
    /// deliveries' signatures checked first, then all under one lock. The
    /// answers to our publishes are returned, in order: (seq, homes and
    /// members reached, or the refusal's kind).
    fn on_member_frames(
        &self,
        topic: TopicId,
        frames: &mut Vec<MemberFrame>,
    ) -> Result<Vec<Answer>> {
        // A subscriber checks every message's signature: its home cannot
        // forge or alter one in another's name.
        frames.retain(|f| match f {
            MemberFrame::Deliver(msg) if msg.topic != topic || msg.verify().is_err() => {
                stats::bump(&self.counters.bad_frames);
                false
            }
            _ => true,
        });
        let mut answers = Vec::new();
        let mut st = self.state();
        for f in frames.drain(..) {
            match f {
                MemberFrame::Deliver(msg) => {
                    if let Some(mine) = st.mine.get_mut(&topic) {
                        self.deliver_mine(mine, &msg);
                    }
                }
                MemberFrame::Presence {
                    member,
                    home,
                    joined,
                } => {
                    if let Some(mine) = st.mine.get_mut(&topic) {
                        presence_mine(mine, member, home, joined);
                    }
                }
                MemberFrame::Published {
                    seq,
                    homes,
                    members,
                } => answers.push((seq, Ok((homes, members)))),
                MemberFrame::PublishRefused { seq, kind } => answers.push((seq, Err(kind))),
                _ => {
                    stats::bump(&self.counters.bad_frames);
                    return Err(Error::Wire(reach_proto::wire::WireError::Malformed(
                        "a member-side frame from the topic home".into(),
                    )));
                }
            }
        }
        Ok(answers)
    }

    // ---- the home's side: members ----

    /// Serves a member's [`wire::MEMBER_PROTOCOL`] stream.
    pub(crate) async fn serve_member(self: Arc<Self>, s: Inbound) {
        let Inbound {
            peer,
            mut send,
            mut recv,
            ..
        } = s;
        if send
            .write_all(&[reach_proto::wire::envelope::OPEN_ACCEPTED])
            .await
            .is_err()
        {
            return;
        }
        let first = tokio::time::timeout(HOME_TIMEOUT, wire::read::<MemberFrame>(&mut recv)).await;
        let Ok(Ok(Some(MemberFrame::Subscribe { topic: name }))) = first else {
            tracing::debug!(%peer, ?first, "a member stream without a subscribe");
            stats::bump(&self.counters.bad_frames);
            return;
        };
        let (tx, rx) = mpsc::channel(SEND_QUEUE);
        let cut = CancellationToken::new();
        let accepted = self.accept_member(peer, &name, &tx, &cut);
        // The next seq taken from the member on this stream: any at first
        // (a member that moved here may continue above what this home has
        // seen of it: what its last home took and did not pass on yet),
        // then the one after the last taken, or the last refused.
        let mut expected = None;
        let topic = match accepted {
            Ok(t) => t,
            Err(kind) => {
                let _ = write_frame(
                    &mut send,
                    &MemberFrame::Refused {
                        kind: kind.to_string(),
                    },
                )
                .await;
                let _ = send.finish();
                return;
            }
        };
        let wcut = cut.clone();
        self.core.spawn(write_loop(send, rx, wcut));
        // Whatever frames have arrived are taken together: one lock of the
        // state for the batch, and the answers queued together.
        let mut reader = wire::FrameReader::default();
        let mut frames = Vec::with_capacity(wire::READ_BATCH);
        let mut msgs = Vec::with_capacity(wire::READ_BATCH);
        'frames: loop {
            frames.clear();
            let r = tokio::select! {
                _ = cut.cancelled() => break,
                r = reader.read_batch_with(&mut recv, &mut frames, wire::READ_BATCH, wire::HomePublish::decode) => r,
            };
            match r {
                Ok(true) => {}
                Ok(false) => break,
                Err(_) => {
                    stats::bump(&self.counters.bad_frames);
                    break;
                }
            }
            let mut bad = false;
            for f in frames.drain(..) {
                match f {
                    Some(p) => msgs.push((p.seq(), p.into_message(peer))),
                    None => {
                        bad = true;
                        break;
                    }
                }
            }
            let (replies, backoff) = self.member_publish(topic, peer, &mut msgs, &mut expected);
            if let Some(replies) = replies
                && tx.try_send(replies).is_err()
            {
                cut.cancel();
                stats::bump(&self.counters.members_cut);
                break 'frames;
            }
            if bad {
                stats::bump(&self.counters.bad_frames);
                break;
            }
            // Refused for rate: the next publish is read once it could be
            // taken (`Overlay::publish_backoff`), so a flooding member
            // costs this home about its limit's worth of work; its excess
            // waits in its own flow-control window.
            if !backoff.is_zero() {
                tokio::select! {
                    _ = cut.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
        }
        let mut st = self.state();
        let st = &mut *st;
        let ours = st
            .served
            .get(&topic)
            .and_then(|s| s.remote.get(&peer))
            .is_some_and(|m| m.tx.same_channel(&tx));
        if ours {
            if let Some(s) = st.served.get_mut(&topic) {
                s.remote.remove(&peer);
            }
            let _ = st.overlay.member_left(topic, peer, self.now());
            self.maybe_unserve(st, topic);
            self.flush(st);
        }
    }

    /// Registers `peer` as a member of `name` here, its first frame (the
    /// answer) queued before anything else.
    fn accept_member(
        &self,
        peer: PeerId,
        name: &str,
        tx: &mpsc::Sender<Bytes>,
        cut: &CancellationToken,
    ) -> std::result::Result<TopicId, &'static str> {
        let topic = TopicId::from_name(name).map_err(|e| e.kind())?;
        if home_of(self.me(), &self.relay) != Some(self.me()) {
            return Err("not_a_home");
        }
        let mut guard = self.state();
        let st = &mut *guard;
        self.serve(st, topic, name)?;
        if let Err(e) = st.overlay.member_joined(topic, peer, self.now()) {
            self.maybe_unserve(st, topic);
            return Err(e.kind());
        }
        let mut members = st.overlay.members(&topic);
        members.truncate(wire::MAX_SNAPSHOT);
        let seq_seen = st.overlay.delivered_up_to(&topic, &peer).unwrap_or(0);
        let _ = offer(tx, &MemberFrame::Subscribed { seq_seen, members });
        if let Some(s) = st.served.get_mut(&topic)
            && let Some(old) = s.remote.insert(
                peer,
                RemoteMember {
                    tx: tx.clone(),
                    cut: cut.clone(),
                },
            )
        {
            old.cut.cancel();
        }
        self.flush(st);
        Ok(topic)
    }

    /// Takes the messages member `peer` published on its stream (drained
    /// from `msgs`: each seq, and the message unless its origin is not the
    /// stream's peer), in order, under one lock: the answers, encoded
    /// back to back in one buffer (one queue slot and one wake for the
    /// batch; `None` for none), and, if one was refused for rate, how long
    /// until one would be taken.
    /// `expected` is the next seq taken from the member on this stream
    /// (`None`: any); one past it was sent behind a refused one and is
    /// refused as [`wire::OUT_OF_ORDER`] (the member sends it again with
    /// the free seq), so a refusal leaves no gap however many publishes
    /// the member has in flight.
    fn member_publish(
        &self,
        topic: TopicId,
        peer: PeerId,
        msgs: &mut Vec<(u64, Option<TopicMessage>)>,
        expected: &mut Option<u64>,
    ) -> (Option<Bytes>, Duration) {
        if msgs.is_empty() {
            return (None, Duration::ZERO);
        }
        let mut replies = Vec::with_capacity(msgs.len() * REPLY_LEN);
        let mut rate_refused = false;
        let mut guard = self.state();
        let st = &mut *guard;
        let now = self.now();
        // What a publish reached is the same for the whole batch: nothing
        // else changes the topic while the lock is held.
        let mut report = None;
        for (seq, msg) in msgs.drain(..) {
            let reply = if let Some(msg) = msg.filter(|m| m.topic == topic) {
                if expected.is_some_and(|e| seq > e) {
                    MemberFrame::PublishRefused {
                        seq,
                        kind: wire::OUT_OF_ORDER.into(),
                    }
                } else {
                    self.take_from_member(st, topic, seq, msg, now, expected, &mut report)
                }
            } else {
                stats::bump(&self.counters.bad_frames);
                MemberFrame::PublishRefused {
                    seq,
                    kind: "topic_not_the_publisher".into(),
                }
            };
            rate_refused |= matches!(&reply, MemberFrame::PublishRefused { kind, .. }
                if TopicRefusal::from_kind(kind).is_rate());
            if let Some(b) = encoded(&reply) {
                replies.extend_from_slice(&b);
            }
        }
        self.flush(st);
        let backoff = if rate_refused {
            st.overlay.publish_backoff(&topic, &peer, now)
        } else {
            Duration::ZERO
        };
        (Some(Bytes::from(replies)), backoff)
    }

    /// One publish of a member's stream, its seq in order: the answer.
    #[allow(clippy::too_many_arguments)]
    fn take_from_member(
        &self,
        st: &mut State,
        topic: TopicId,
        seq: u64,
        msg: TopicMessage,
        now: Duration,
        expected: &mut Option<u64>,
        report: &mut Option<PublishReport>,
    ) -> MemberFrame {
        // The stream's peer is the message's origin (checked when it was
        // decoded: `wire::HomePublish::into_message`; QUIC's mutual TLS
        // authenticated the peer's key): that proves who sent it, so the
        // home does not check its signature again (see
        // `Overlay::publish_from_authenticated_member`); every other home
        // and every subscriber does.
        match st.overlay.publish_from_authenticated_member(msg, now) {
            Ok(_) => {
                *expected = Some(expected.map_or(seq + 1, |e| e.max(seq + 1)));
                let rep = *report.get_or_insert_with(|| Self::report(st, topic, self.me(), seq));
                MemberFrame::Published {
                    seq,
                    homes: rep.homes,
                    members: rep.members,
                }
            }
            Err(e) => {
                // Its seq stays free: the member's next message
                // must take it.
                expected.get_or_insert(seq);
                let counter = match e {
                    PublishError::TopicRateLimited | PublishError::PublisherRateLimited => {
                        &self.counters.refused_rate
                    }
                    _ => &self.counters.refused_other,
                };
                stats::bump(counter);
                MemberFrame::PublishRefused {
                    seq,
                    kind: e.kind().to_string(),
                }
            }
        }
    }

    // ---- the home's side: federation ----

    /// Serves a federation stream another home opened.
    pub(crate) async fn serve_fed(self: Arc<Self>, s: Inbound) {
        let Inbound {
            peer,
            mut send,
            recv,
            ..
        } = s;
        if send
            .write_all(&[reach_proto::wire::envelope::OPEN_ACCEPTED])
            .await
            .is_err()
        {
            return;
        }
        self.run_link(peer, send, recv, false).await;
    }

    async fn dial(self: Arc<Self>, peer: PeerId) {
        let opened = async {
            // Not pinned open: the link holds the connection while it
            // lasts (`run_link`), and an idle one is closed once unused.
            let conn = self.peers.connection_unpinned(peer).await?;
            crate::node::router::open(&conn, peer, wire::FED_PROTOCOL).await
        }
        .await;
        {
            let mut st = self.state();
            st.dialing.remove(&peer);
            if opened.is_err() {
                let now = self.now();
                st.configured.on_failed(&peer, now);
            }
        }
        match opened {
            Ok(s) => self.run_link(peer, s.send, s.recv, true).await,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "federation link not opened");
                self.redial.notify_one();
            }
        }
    }

    /// One federation link, until it fails or a newer one replaces it.
    async fn run_link(
        self: Arc<Self>,
        peer: PeerId,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        dialed: bool,
    ) {
        let (tx, rx) = mpsc::channel(SEND_QUEUE);
        let cut = CancellationToken::new();
        let preferred = dialed == (self.me() < peer);
        let id = {
            let mut guard = self.state();
            let st = &mut *guard;
            // Both homes dialed at once: the link the smaller key dialed
            // stays, on both sides.
            if st.links.get(&peer).is_some_and(|l| l.preferred) && !preferred {
                drop(guard);
                let _ = send.finish();
                return;
            }
            let id = st.next_key;
            st.next_key += 1;
            let link = Link {
                id,
                preferred,
                tx: tx.clone(),
                theirs: BTreeSet::new(),
                cut: cut.clone(),
            };
            if let Some(old) = st.links.insert(peer, link) {
                old.cut.cancel();
                st.overlay.link_down(peer);
            }
            for topic in st.served.keys() {
                if self.federation.allows(&peer, topic) {
                    let _ = offer(&tx, &FedFrame::Join(*topic));
                }
            }
            st.configured.on_up(&peer);
            // Idle until the other home's first `Join` arrives (a whole
            // grace from now, even if a link it replaced was idle).
            st.idle.on_linked(&peer);
            st.idle.remove(&peer);
            self.review_link(st, peer);
            self.flush(st);
            id
        };
        drop(tx);
        // The connection stays open while the link lasts (either side).
        self.peers.hold(&peer);
        let _hold = Release(self.peers.clone(), peer);
        stats::bump(&self.counters.links_opened);
        self.core.bus.emit(NodeEvent::TopicLinkUp { peer });
        let wcut = cut.clone();
        let writer = tokio::spawn(write_loop(send, rx, wcut));
        let _writer = AbortOnDrop(writer);
        // Whatever frames have arrived are handled together, under one lock.
        let mut reader = wire::FrameReader::default();
        let mut frames = Vec::with_capacity(wire::READ_BATCH);
        // The other home finished the stream (rather than it failing).
        let mut finished = false;
        loop {
            frames.clear();
            let r = tokio::select! {
                _ = cut.cancelled() => break,
                r = reader.read_batch::<FedFrame>(&mut recv, &mut frames, wire::READ_BATCH) => r,
            };
            match r {
                Ok(true) => {}
                Ok(false) => {
                    finished = true;
                    break;
                }
                Err(_) => {
                    stats::bump(&self.counters.bad_frames);
                    break;
                }
            }
            let mut guard = self.state();
            let st = &mut *guard;
            let now = self.now();
            let mut replaced = false;
            let mut topics_changed = false;
            for f in frames.drain(..) {
                let State {
                    overlay,
                    links,
                    served,
                    ..
                } = &mut *st;
                let Some(link) = links.get_mut(&peer).filter(|l| l.id == id) else {
                    replaced = true;
                    break;
                };
                match f {
                    FedFrame::Join(t) => {
                        topics_changed = true;
                        if !self.federation.allows(&peer, &t) {
                            // A private topic from a home not trusted with
                            // it: not carried (and not even remembered).
                            stats::bump(&self.counters.untrusted_joins);
                        } else if link.theirs.len() < reach_proto::topics::MAX_TOPICS_PER_NODE
                            && link.theirs.insert(t)
                            && served.contains_key(&t)
                        {
                            let _ = overlay.link_up(peer, &[t]);
                        }
                    }
                    FedFrame::Leave(t) => {
                        topics_changed = true;
                        if link.theirs.remove(&t) && served.contains_key(&t) {
                            // The overlay has no per-topic link_down: the
                            // link goes down and comes back with what is
                            // shared.
                            overlay.link_down(peer);
                            let both: Vec<TopicId> = link
                                .theirs
                                .iter()
                                .filter(|t| served.contains_key(t))
                                .copied()
                                .collect();
                            let _ = overlay.link_up(peer, &both);
                        }
                    }
                    FedFrame::Overlay(bytes) => match TopicFrame::decode(&bytes) {
                        Ok(frame) => overlay.handle_frame(peer, frame, now),
                        Err(_) => stats::bump(&self.counters.bad_frames),
                    },
                }
            }
            if topics_changed && !replaced {
                self.review_link(st, peer);
            }
            self.flush(st);
            if replaced {
                break;
            }
        }
        let mut guard = self.state();
        let st = &mut *guard;
        if st.links.get(&peer).is_some_and(|l| l.id == id) {
            st.links.remove(&peer);
            if finished && st.idle.is_idle(&peer) {
                // The other home closed it for idleness: remembered as if
                // this one had (its stale records are not dialed).
                let serving: Vec<TopicId> = st.served.keys().copied().collect();
                st.idle.on_closed(peer, crate::dht::unix_ms(), serving);
            }
            st.idle.remove(&peer);
            st.overlay.link_down(peer);
            let now = self.now();
            st.configured.on_down(&peer, now);
            self.flush(st);
            drop(guard);
            self.redial.notify_one();
            self.core.bus.emit(NodeEvent::TopicLinkDown { peer });
        }
    }

    // ---- tasks ----

    /// Runs the overlay's timers until the node stops.
    pub(crate) async fn drive(self: Arc<Self>) {
        loop {
            let next = {
                let mut st = self.state();
                let now = self.now();
                if st.overlay.next_timeout().is_some_and(|t| t <= now) {
                    st.overlay.handle_timeout(now);
                    self.flush(&mut st);
                }
                let next = st.overlay.next_timeout();
                st.driver_at = next;
                next
            };
            self.sleep_until(next, &self.wake).await;
        }
    }

    /// Sleeps until `next` (on the overlay's clock) or until `wake` is
    /// notified; with nothing scheduled, until woken (a long sleep bounds
    /// the wait should a wake-up be missed).
    async fn sleep_until(&self, next: Option<Duration>, wake: &Notify) {
        let sleep = match next {
            Some(t) => tokio::time::sleep_until(self.epoch + t),
            None => tokio::time::sleep(WAKE_BOUND),
        };
        tokio::select! {
            _ = sleep => {}
            _ = wake.notified() => {}
        }
    }

    /// Follows the held relay: this node's home changes with it.
    pub(crate) async fn watch_home(self: Arc<Self>) {
        let mut events = self.core.bus.subscribe();
        loop {
            let home = home_of(self.me(), &self.relay);
            self.home.send_if_modified(|h| {
                let changed = *h != home;
                *h = home;
                changed
            });
            loop {
                match events.next().await {
                    None => return,
                    Some(
                        NodeEvent::RelayAcquired { .. }
                        | NodeEvent::RelayLost { .. }
                        | NodeEvent::ReachabilityChanged { .. },
                    ) => break,
                    Some(_) => {}
                }
            }
        }
    }

    /// Keeps the configured federation links up while this node serves a
    /// topic (dials what [`StaticLinks`] says is due) and closes the links
    /// [`IdleLinks`] says are idle past the grace, until the node stops.
    pub(crate) async fn configured_links(self: Arc<Self>) {
        loop {
            let next = {
                let mut guard = self.state();
                let st = &mut *guard;
                let now = self.now();
                for peer in st.idle.due(now) {
                    if let Some(link) = st.links.get(&peer) {
                        // Its task finishes the stream, takes the link down
                        // and releases the connection (closed once idle).
                        tracing::debug!(%peer, "federation link idle: closed");
                        link.cut.cancel();
                        stats::bump(&self.counters.links_closed_idle);
                        let serving: Vec<TopicId> = st.served.keys().copied().collect();
                        st.idle.on_closed(peer, crate::dht::unix_ms(), serving);
                    }
                }
                let idle_next = st.idle.next_timeout();
                let configured_next = if st.served.is_empty() {
                    None
                } else {
                    for peer in st.configured.due(now) {
                        if st.links.contains_key(&peer) {
                            st.configured.on_up(&peer);
                            continue;
                        }
                        if !st.dialing.insert(peer) {
                            // A discovery dial is under way: its outcome
                            // reaches the schedule all the same.
                            continue;
                        }
                        let t = self.clone();
                        self.core.spawn(async move { t.dial(peer).await });
                    }
                    st.configured.next_timeout()
                };
                match (configured_next, idle_next) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            };
            // Nothing due: woken by a served topic, a lost link or an idle
            // one.
            self.sleep_until(next, &self.redial).await;
        }
    }

    /// Publishes this home's topic records and finds the topics' other
    /// homes, until the node stops.
    pub(crate) async fn discovery(self: Arc<Self>) {
        loop {
            let now = Instant::now();
            let mut records = Vec::new();
            let mut lookups = Vec::new();
            let mut next = now + DISCOVERY_MAX;
            {
                let mut st = self.state();
                for (topic, s) in st.served.iter_mut() {
                    if self.federation.private.contains(topic) {
                        // Never in the DHT: its homes are configured.
                        continue;
                    }
                    if s.record_due <= now {
                        records.push(s.name.clone());
                        s.record_due = now + RECORD_REFRESH;
                    }
                    if s.lookup_due <= now {
                        lookups.push(*topic);
                        s.lookup_due = now + s.lookup_wait;
                        s.lookup_wait = (s.lookup_wait * 2).min(DISCOVERY_MAX);
                    }
                    next = next.min(s.record_due).min(s.lookup_due);
                }
            }
            for name in records {
                let me = self.clone();
                self.core
                    .spawn(async move { me.publish_record(name).await });
            }
            for topic in lookups {
                let me = self.clone();
                self.core.spawn(async move { me.find_homes(topic).await });
            }
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = self.discover.notified() => {}
            }
        }
    }

    async fn publish_record(&self, name: String) {
        let now_ms = crate::dht::unix_ms();
        let record = SignedRecord::topic(&self.core.keypair, &name, now_ms, now_ms, RECORD_TTL);
        // Here too: a lookup does not ask the node that runs it.
        let _ = self.dht.store().put(record.clone(), now_ms);
        let stored = self.dht.put(record).await;
        tracing::debug!(topic = %name, stored, "topic record published");
    }

    async fn find_homes(self: Arc<Self>, topic: TopicId) {
        let key = topic.key();
        let now_ms = crate::dht::unix_ms();
        let mut records = self.dht.store().get(RecordKind::Topic, &key, now_ms);
        let query = crate::dht::ops::Query::GetRecords {
            kind: RecordKind::Topic,
            first: false,
        };
        records.extend(self.dht.lookup(key, query).await.records);
        let me = self.me();
        // Each home with the newest of its records.
        let mut homes: BTreeMap<PeerId, u64> = BTreeMap::new();
        for r in records
            .iter()
            .filter(|r| r.key == key && r.kind == RecordKind::Topic)
            .filter(|r| r.validate(now_ms).is_ok())
            .filter(|r| r.publisher != me)
        {
            let created = homes.entry(r.publisher).or_default();
            *created = (*created).max(r.created_ms);
        }
        let mut st = self.state();
        if !st.served.contains_key(&topic) {
            return;
        }
        // Not a home whose link closed idle on a record from before (it
        // left the topic; the record lingers).
        homes.retain(|h, created| st.idle.may_dial(h, &topic, *created));
        let homes = homes.into_keys();
        let mut linked = st
            .links
            .values()
            .filter(|l| l.theirs.contains(&topic))
            .count();
        for h in homes {
            if linked >= MAX_LINKS_PER_TOPIC {
                break;
            }
            if st.links.contains_key(&h) || st.dialing.contains(&h) {
                continue;
            }
            st.dialing.insert(h);
            linked += 1;
            let t = self.clone();
            self.core.spawn(async move { t.dial(h).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mine() -> (Mine, mpsc::Receiver<TopicEvent>) {
        let (tx, rx) = mpsc::channel(16);
        let sink = Sink {
            tx,
            missed: Default::default(),
        };
        let m = Mine {
            name: "t".into(),
            sinks: HashMap::from([(0, sink)]),
            hwm: HashMap::new(),
            members: BTreeMap::new(),
            last_seq: 0,
            publishing: Default::default(),
            attached: Attached::None,
            session: CancellationToken::new(),
        };
        (m, rx)
    }

    fn id(n: u8) -> PeerId {
        reach_proto::Keypair::from_secret_bytes([n; 32]).peer_id()
    }

    #[test]
    fn a_leave_from_a_home_the_member_left_changes_nothing() {
        let (mut m, mut rx) = mine();
        let (a, h1, h2) = (id(1), id(2), id(3));
        presence_mine(&mut m, a, h1, true);
        // The member moved to h2; the old home's stale sweep comes later.
        presence_mine(&mut m, a, h2, true);
        presence_mine(&mut m, a, h1, false);
        assert_eq!(member_list(&m).collect::<Vec<_>>(), [(a, h2)]);
        let got: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(
            got,
            [
                TopicEvent::Joined {
                    member: a,
                    home: h1
                },
                TopicEvent::Joined {
                    member: a,
                    home: h2
                },
            ]
        );
    }

    #[test]
    fn a_snapshot_from_a_new_home_reports_only_the_differences() {
        let (mut m, mut rx) = mine();
        let (a, b, c, h) = (id(1), id(2), id(3), id(4));
        resync_members(&mut m, vec![(a, h), (b, h)]);
        while rx.try_recv().is_ok() {}
        resync_members(&mut m, vec![(b, h), (c, h)]);
        let got: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(
            got,
            [
                TopicEvent::Left { member: a, home: h },
                TopicEvent::Joined { member: c, home: h },
            ]
        );
    }

    /// Found by `reach lab rooms`: a member re-subscribing at a new home
    /// got a snapshot listing another re-homed member at the dead home and
    /// at its new one, kept only one of the two, and lost the member when
    /// the dead home went stale.
    #[test]
    fn a_member_listed_by_a_dead_home_and_a_new_one_stays_when_the_dead_one_goes() {
        let (mut m, mut rx) = mine();
        let (b, dead, new_home) = (id(1), id(2), id(3));
        resync_members(&mut m, vec![(b, new_home), (b, dead)]);
        // The dead home goes stale: its members leave from it.
        presence_mine(&mut m, b, dead, false);
        assert_eq!(
            member_list(&m).collect::<Vec<_>>().len(),
            1,
            "b is still here"
        );
        let got: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert!(
            !got.iter().any(|e| matches!(e, TopicEvent::Left { .. })),
            "{got:?}"
        );
        // Its last home says it left: now it is gone.
        let last = member_list(&m).next().map(|(_, h)| h).unwrap();
        presence_mine(&mut m, b, last, false);
        assert_eq!(member_list(&m).count(), 0);
        assert!(matches!(
            rx.try_recv(),
            Ok(TopicEvent::Left { member, .. }) if member == b
        ));
    }

    #[test]
    fn a_full_subscriber_queue_counts_what_it_missed() {
        let (tx, _rx) = mpsc::channel(1);
        let missed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (mut m, _) = mine();
        m.sinks = HashMap::from([(
            0,
            Sink {
                tx,
                missed: missed.clone(),
            },
        )]);
        for _ in 0..3 {
            push(&m, &TopicEvent::Missed { count: 0 });
        }
        assert_eq!(missed.load(std::sync::atomic::Ordering::Relaxed), 2);
    }
}
