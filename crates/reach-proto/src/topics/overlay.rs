//! The overlay machine: one per home, for all the topics it serves.
//!
//! PlumTree (Leitão, Pereira, Rodrigues 2007) over the links the driver
//! gives it:
//!
//! - **One tree per origin.** A link is *eager* (tree) or *lazy* for each
//!   origin (a publisher, or a home for its presence floods); a new link
//!   and a new origin start eager. A message is pushed whole on every link
//!   eager for its origin but the one it came from, and announced by id on
//!   every link lazy for it but that one ("I have", batched for
//!   [`IHAVE_DELAY`], at most [`MAX_IDS_PER_FRAME`] ids a frame).
//! - A duplicate from a link eager for its origin makes that link lazy for
//!   the origin on both ends (PRUNE): the eager links of an origin thin out
//!   to the tree of first arrivals, which is the fastest path from that
//!   origin, so in steady state each home gets each message once, by about
//!   the shortest path. Cycles in the link graph are legal: they are just
//!   lazy links. (One tree shared by all origins, as in the PlumTree
//!   paper, was tried first: concurrent messages from two origins prune two
//!   different links of one cycle and cut a home off the tree, so with
//!   many publishers it kept breaking and regrafting, with ~1.5 copies per
//!   message and repair-time latencies in the simulator.)
//! - An announced message that has not arrived by the tree within
//!   [`GRAFT_TIMEOUT`] is pulled with a GRAFT to an announcer, which makes
//!   that link eager for the origin again (tree repair); then retried every
//!   [`PULL_RETRY`] on the next announcer. The same goes for a gap: a
//!   message missing below one received is pulled from the link that
//!   brought the later one.
//! - Every [`DIGEST_INTERVAL`] while an origin is active, then at doubling
//!   intervals for [`DIGEST_TAIL_ROUNDS`] rounds after its last message
//!   (1, 2, 4, … 32 s), each link gets an "I have" of the latest seq
//!   delivered per such origin (a *tail digest*). Without it a message
//!   lost on a tree link whose "I have" notices were lost too would only
//!   be noticed when its origin sends again, i.e. never for the last
//!   message of a stream; with a fixed two rounds, two lost digests in a
//!   row lost it for good. QUIC links do not lose frames, but links die,
//!   and the simulator and the property tests drop frames at random.
//! - When a link dies, the home sends an empty GRAFT on each of its other
//!   links ("eager for every origin again"), so the trees through it heal
//!   before the next message or heartbeat; the duplicates that follow prune
//!   them back to trees. The origins whose trees are tracked are bounded
//!   ([`MAX_TREES_PER_TOPIC`]): past it every link is eager again for all.
//!
//! **Forwarding in order.** A home forwards (and announces) an origin's
//! messages only as it delivers them, in seq order. So whoever sent us seq
//! `n` of an origin has delivered every seq before `n` of it (from its own
//! first contact) and can answer a pull for them from its cache; a holder
//! answering "not cached" ([`TopicFrame::NotCached`]) for a message it
//! announced means the message is gone, and the gap is passed over at once
//! instead of after [`GAP_GIVE_UP`](super::GAP_GIVE_UP). The price: a lost message holds back
//! its origin's later ones for the repair time.
//!
//! **Limits at the publisher's home.** [`Overlay::publish`] (signed here)
//! and [`Overlay::publish_from_member`] (signed by a member) pass a token
//! bucket per topic ([`OverlayConfig::topic_rate`]) and per publisher
//! ([`OverlayConfig::publisher_rate`]); refusals are typed and counted.
//! Messages relayed by other homes are not rate limited here: their home
//! did that, and each topic's state is separate, so a flood on one topic
//! does not queue behind another's.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use super::message::{MessageError, MessageId, ShortId, TopicFrame, TopicMessage};
use super::order::{Offer, Origins};
use super::presence::{PresenceAction, TopicPresence};
use super::{
    CACHE_MAX_BYTES, CACHE_MAX_MESSAGES, DEFAULT_PUBLISHER_RATE, DEFAULT_TOPIC_RATE, GRAFT_TIMEOUT,
    IHAVE_DELAY, MAX_DATA_LEN, MAX_IDS_PER_FRAME, MAX_LINKS_PER_TOPIC, MAX_PUBLISH_BACKOFF,
    MAX_PUBLISHERS_TRACKED, MAX_TOPICS_PER_NODE, PULL_RETRY, RATE_BURST, TopicId,
};
use crate::limits::TokenBucket;
use crate::{Keypair, PeerId};

/// Messages a topic may be waiting for at once (announced or in gaps):
/// sixteen full "I have" frames.
pub const MAX_MISSING_PER_TOPIC: usize = 16 * MAX_IDS_PER_FRAME;
/// Pull attempts of one missing message before it is dropped from the
/// wanted list (a gap is then passed over after [`super::GAP_GIVE_UP`]):
/// with [`PULL_RETRY`] about four seconds of asking.
pub const MAX_PULL_ATTEMPTS: u32 = 10;
/// Between tail digests (see the module docs): the repair time of a lost
/// last message is about this plus [`GRAFT_TIMEOUT`].
pub const DIGEST_INTERVAL: Duration = Duration::from_secs(1);
/// Tail digests of an origin after its last message, at 1, 2, 4, …
/// digest intervals: the last one 2^(rounds-1) intervals after (32 s).
/// Each round is one more chance for a home whose copy and announcements
/// were all lost to notice, at the cost of a few ids per link.
pub const DIGEST_TAIL_ROUNDS: u32 = 6;
/// Origins per topic whose pruned links are remembered (publishers and
/// homes). Past it the memory is cleared, every link is eager again and
/// duplicates prune the trees anew.
pub const MAX_TREES_PER_TOPIC: usize = 8_192;
/// Bytes a message is counted for in buffers beyond its data: the header
/// and signature.
const MESSAGE_OVERHEAD: usize = 160;

/// Rate limits of a home (the runtime fills it from its config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlayConfig {
    /// Messages per second per topic accepted from local publishers.
    pub topic_rate: u64,
    /// Messages per second per publisher per topic.
    pub publisher_rate: u64,
    /// How long a federation link may carry no topic both homes serve
    /// before the runtime closes it (default
    /// [`LINK_IDLE_GRACE`](super::federation::LINK_IDLE_GRACE); the overlay
    /// itself does not use it).
    pub link_idle_grace: Duration,
}

impl Default for OverlayConfig {
    fn default() -> Self {
        OverlayConfig {
            topic_rate: DEFAULT_TOPIC_RATE,
            publisher_rate: DEFAULT_PUBLISHER_RATE,
            link_idle_grace: super::federation::LINK_IDLE_GRACE,
        }
    }
}

/// What the machine asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverlayOutput {
    /// Send `frame` to the home `to` (over the federation link).
    Send {
        /// A linked home.
        to: PeerId,
        /// What to send.
        frame: TopicFrame,
    },
    /// Hand `msg` to this home's members of `topic`: each message once, in
    /// order per origin.
    Deliver {
        /// The topic.
        topic: TopicId,
        /// The verified message.
        msg: TopicMessage,
    },
    /// A member of `topic` at `home` appeared or vanished.
    PresenceChanged {
        /// The topic.
        topic: TopicId,
        /// The member.
        member: PeerId,
        /// Its home.
        home: PeerId,
        /// True on join.
        joined: bool,
    },
}

/// Counters of a home's overlay (monotonic).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlayStats {
    /// New messages received from other homes.
    pub messages_received: u64,
    /// Copies of messages already had.
    pub duplicates_received: u64,
    /// Messages delivered (handed to members), local ones included.
    pub delivered: u64,
    /// Seqs passed over because no holder had them.
    pub gaps_skipped: u64,
    /// Messages refused for a bad signature, size or seq.
    pub bad_messages: u64,
    /// Publishes refused by the topic's rate limit.
    pub refused_topic_rate: u64,
    /// Publishes refused by the publisher's rate limit.
    pub refused_publisher_rate: u64,
    /// Messages dropped for want of buffer room ahead of a gap.
    pub no_room: u64,
    /// GRAFT frames sent.
    pub grafts_sent: u64,
    /// PRUNE frames sent.
    pub prunes_sent: u64,
    /// Pulled ids a holder answered "not cached" for.
    pub not_cached: u64,
    /// Missing messages given up after [`MAX_PULL_ATTEMPTS`].
    pub pulls_given_up: u64,
    /// Frames for topics not served here or from homes not linked for the
    /// topic, or over a limit.
    pub ignored_frames: u64,
    /// Presence frames (deltas, heartbeats, snapshots) refused because the
    /// home they speak for did not sign them: forged or altered by a home
    /// on the way. They change no view and go no further.
    pub bad_presence: u64,
}

/// Why a publish was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// This home does not serve the topic.
    #[error("topic not subscribed at this home")]
    NotSubscribed,
    /// Data over [`MAX_DATA_LEN`].
    #[error("message of {0} bytes (max {MAX_DATA_LEN})")]
    TooBig(usize),
    /// The topic's rate limit refused it.
    #[error("topic rate limit")]
    TopicRateLimited,
    /// The publisher's rate limit refused it.
    #[error("publisher rate limit")]
    PublisherRateLimited,
    /// A member's message that does not verify.
    #[error("bad message: {0}")]
    BadMessage(MessageError),
    /// Too far ahead of the publisher's previous message (the buffer ahead
    /// is full).
    #[error("no buffer room for the message")]
    NoRoom,
}

impl PublishError {
    /// Stable machine-readable name.
    pub fn kind(&self) -> &'static str {
        match self {
            PublishError::NotSubscribed => "topic_not_subscribed",
            PublishError::TooBig(_) => "message_too_big",
            PublishError::TopicRateLimited => "topic_rate_limited",
            PublishError::PublisherRateLimited => "publisher_rate_limited",
            PublishError::BadMessage(e) => e.kind(),
            PublishError::NoRoom => "topic_no_room",
        }
    }
}

/// Why a topic operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// At [`MAX_TOPICS_PER_NODE`].
    #[error("too many topics (max {MAX_TOPICS_PER_NODE})")]
    TooManyTopics,
    /// The topic is not served here.
    #[error("topic not subscribed at this home")]
    NotSubscribed,
    /// At [`MAX_LINKS_PER_TOPIC`].
    #[error("too many links for the topic (max {MAX_LINKS_PER_TOPIC})")]
    TooManyLinks,
    /// At [`super::MAX_MEMBERS_PER_TOPIC`].
    #[error("too many members")]
    TooManyMembers,
}

impl TopicError {
    /// Stable machine-readable name.
    pub fn kind(&self) -> &'static str {
        match self {
            TopicError::TooManyTopics => "too_many_topics",
            TopicError::NotSubscribed => "topic_not_subscribed",
            TopicError::TooManyLinks => "too_many_links",
            TopicError::TooManyMembers => "too_many_members",
        }
    }
}

/// Messages kept to answer pulls, oldest evicted first.
#[derive(Default)]
struct Cache {
    order: VecDeque<ShortId>,
    map: HashMap<ShortId, TopicMessage>,
    bytes: usize,
}

impl Cache {
    fn insert(&mut self, msg: TopicMessage) {
        let id = msg.short_id();
        if self.map.contains_key(&id) {
            return;
        }
        self.bytes += msg.data.len() + MESSAGE_OVERHEAD;
        self.order.push_back(id);
        self.map.insert(id, msg);
        while self.order.len() > CACHE_MAX_MESSAGES || self.bytes > CACHE_MAX_BYTES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(m) = self.map.remove(&old) {
                self.bytes -= m.data.len() + MESSAGE_OVERHEAD;
            }
        }
    }
}

struct Missing {
    announcers: Vec<PeerId>,
    attempts: u32,
    due: Duration,
    /// Known missing below a received message (not just announced).
    gap: bool,
}

struct Pending {
    msg: TopicMessage,
    from: Option<PeerId>,
}

/// An origin's place in its digest tail.
struct Tail {
    seq: u64,
    /// Digest ticks since its last delivery: it is in the digests of ticks
    /// 1, 2, 4, … 2^(DIGEST_TAIL_ROUNDS-1), then dropped.
    ticks: u32,
}

struct TopicState {
    links: BTreeSet<PeerId>,
    /// Origin → links lazy for it (all others are eager).
    lazy_for: BTreeMap<PeerId, BTreeSet<PeerId>>,
    origins: Origins<Pending>,
    cache: Cache,
    missing: BTreeMap<ShortId, Missing>,
    ihave: BTreeMap<PeerId, Vec<ShortId>>,
    ihave_due: Option<Duration>,
    /// Origins in their digest tail: the latest seq delivered, and the
    /// digest ticks since.
    tails: BTreeMap<PeerId, Tail>,
    /// The next digest tick, while any origin is in its tail.
    digest_due: Option<Duration>,
    topic_bucket: TokenBucket,
    publishers: HashMap<PeerId, (TokenBucket, Duration)>,
    next_seq: HashMap<PeerId, u64>,
    presence: TopicPresence,
}

type Out = VecDeque<OverlayOutput>;

fn send(out: &mut Out, to: PeerId, frame: TopicFrame) {
    out.push_back(OverlayOutput::Send { to, frame });
}

impl TopicState {
    fn linked(&self, p: &PeerId) -> bool {
        self.links.contains(p)
    }

    fn is_lazy(&self, origin: &PeerId, p: &PeerId) -> bool {
        self.lazy_for.get(origin).is_some_and(|s| s.contains(p))
    }

    /// Makes `p` lazy for `origin`; true if it was eager.
    fn prune(&mut self, origin: PeerId, p: PeerId) -> bool {
        if !self.links.contains(&p) {
            return false;
        }
        if !self.lazy_for.contains_key(&origin) && self.lazy_for.len() >= MAX_TREES_PER_TOPIC {
            self.lazy_for.clear();
        }
        self.lazy_for.entry(origin).or_default().insert(p)
    }

    fn make_eager(&mut self, origin: &PeerId, p: &PeerId) {
        if let Some(s) = self.lazy_for.get_mut(origin) {
            s.remove(p);
        }
    }

    /// A new message or flood of `origin` came first over `from`: if we
    /// had that link lazy, it is a tree link again, on both ends.
    fn first_from(&mut self, topic: TopicId, origin: PeerId, from: PeerId, out: &mut Out) {
        if self.is_lazy(&origin, &from) {
            self.make_eager(&origin, &from);
            send(out, from, TopicFrame::Eager { topic, origin });
        }
    }

    fn make_eager_for_all(&mut self, p: &PeerId) {
        for s in self.lazy_for.values_mut() {
            s.remove(p);
        }
    }

    /// Takes a new message in (verified by the caller or signed here).
    fn receive(
        &mut self,
        topic: TopicId,
        msg: TopicMessage,
        from: Option<PeerId>,
        now: Duration,
        out: &mut Out,
        stats: &mut OverlayStats,
    ) -> Result<MessageId, PublishError> {
        let id = msg.id();
        let short = msg.short_id();
        let size = msg.data.len() + MESSAGE_OVERHEAD;
        match self
            .origins
            .offer(&id.origin, id.seq, Pending { msg, from }, size, now)
        {
            Offer::Accepted => stats.gaps_skipped += self.origins.take_jumped(),
            Offer::Duplicate => {
                stats.duplicates_received += 1;
                return Ok(id);
            }
            Offer::NoRoom => {
                stats.no_room += 1;
                return Err(PublishError::NoRoom);
            }
        }
        if from.is_some() {
            stats.messages_received += 1;
        }
        self.missing.remove(&short);
        self.drain(topic, id.origin, now, out, stats);
        for seq in self.origins.gaps(&id.origin) {
            let s = ShortId {
                tag: short.tag,
                seq,
            };
            if !self.missing.contains_key(&s) && self.missing.len() >= MAX_MISSING_PER_TOPIC {
                continue;
            }
            let e = self.missing.entry(s).or_insert(Missing {
                announcers: Vec::new(),
                attempts: 0,
                due: now + GRAFT_TIMEOUT,
                gap: true,
            });
            e.gap = true;
            // The sender of seq n has every seq below n, not those between
            // n and a later one buffered from elsewhere.
            if let Some(p) = from
                && seq < id.seq
                && !e.announcers.contains(&p)
            {
                e.announcers.push(p);
            }
        }
        Ok(id)
    }

    /// Delivers and forwards whatever of `origin` is ready, in order.
    fn drain(
        &mut self,
        topic: TopicId,
        origin: PeerId,
        now: Duration,
        out: &mut Out,
        stats: &mut OverlayStats,
    ) {
        while let Some(v) = self.origins.pop_ready(&origin, now) {
            match v {
                None => stats.gaps_skipped += 1,
                Some(p) => self.deliver(topic, p, now, out, stats),
            }
        }
    }

    fn deliver(
        &mut self,
        topic: TopicId,
        p: Pending,
        now: Duration,
        out: &mut Out,
        stats: &mut OverlayStats,
    ) {
        let short = p.msg.short_id();
        self.missing.remove(&short);
        let empty = BTreeSet::new();
        let lazy = self.lazy_for.get(&p.msg.origin).unwrap_or(&empty);
        let mut full = Vec::new();
        for peer in &self.links {
            if Some(*peer) == p.from {
                continue;
            }
            if !lazy.contains(peer) {
                send(out, *peer, TopicFrame::Message(p.msg.clone()));
            } else {
                let q = self.ihave.entry(*peer).or_default();
                q.push(short);
                if q.len() >= MAX_IDS_PER_FRAME {
                    full.push(*peer);
                }
                self.ihave_due.get_or_insert(now + IHAVE_DELAY);
            }
        }
        for peer in full {
            if let Some(ids) = self.ihave.remove(&peer) {
                send(out, peer, TopicFrame::IHave { topic, ids });
            }
        }
        self.tails.insert(
            p.msg.origin,
            Tail {
                seq: p.msg.seq,
                ticks: 0,
            },
        );
        self.digest_due.get_or_insert(now + DIGEST_INTERVAL);
        self.cache.insert(p.msg.clone());
        stats.delivered += 1;
        out.push_back(OverlayOutput::Deliver { topic, msg: p.msg });
    }

    fn check_rate(
        &mut self,
        config: &OverlayConfig,
        publisher: PeerId,
        now: Duration,
        stats: &mut OverlayStats,
    ) -> Result<(), PublishError> {
        if !self.publishers.contains_key(&publisher)
            && self.publishers.len() >= MAX_PUBLISHERS_TRACKED
            && let Some(oldest) = self
                .publishers
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(p, _)| *p)
        {
            self.publishers.remove(&oldest);
        }
        let (bucket, last) = self.publishers.entry(publisher).or_insert_with(|| {
            (
                TokenBucket::new(config.publisher_rate, RATE_BURST, now),
                now,
            )
        });
        *last = now;
        if !bucket.take(1, now) {
            stats.refused_publisher_rate += 1;
            return Err(PublishError::PublisherRateLimited);
        }
        if !self.topic_bucket.take(1, now) {
            stats.refused_topic_rate += 1;
            return Err(PublishError::TopicRateLimited);
        }
        Ok(())
    }

    fn apply_presence(
        &mut self,
        topic: TopicId,
        acts: Vec<PresenceAction>,
        out: &mut Out,
        stats: &mut OverlayStats,
    ) {
        for a in acts {
            match a {
                PresenceAction::Flood {
                    frame,
                    origin,
                    except,
                } => {
                    // Over the home's tree.
                    for p in &self.links {
                        if Some(*p) != except && !self.is_lazy(&origin, p) {
                            send(out, *p, frame.clone());
                        }
                    }
                }
                PresenceAction::FloodDelta {
                    frame,
                    origin,
                    all,
                    except,
                } => {
                    for p in &self.links {
                        if Some(*p) != except && (all || !self.is_lazy(&origin, p)) {
                            send(out, *p, frame.clone());
                        }
                    }
                }
                PresenceAction::First { origin, from } => {
                    self.first_from(topic, origin, from, out);
                }
                PresenceAction::Duplicate { origin, from } => {
                    if self.prune(origin, from) {
                        stats.prunes_sent += 1;
                        send(out, from, TopicFrame::Prune { topic, origin });
                    }
                }
                PresenceAction::Send { to, frame } => send(out, to, frame),
                PresenceAction::Regraft { origin } => {
                    for p in &self.links {
                        send(out, *p, TopicFrame::Eager { topic, origin });
                    }
                }
                PresenceAction::Changed {
                    member,
                    home,
                    joined,
                } => out.push_back(OverlayOutput::PresenceChanged {
                    topic,
                    member,
                    home,
                    joined,
                }),
            }
        }
    }

    fn next_timeout(&self) -> Option<Duration> {
        let missing = self.missing.values().map(|m| m.due).min();
        [
            self.ihave_due,
            self.digest_due,
            missing,
            self.origins.next_give_up(),
            self.presence.next_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn on_timeout(
        &mut self,
        topic: TopicId,
        now: Duration,
        signer: &Keypair,
        out: &mut Out,
        stats: &mut OverlayStats,
    ) {
        if self.ihave_due.is_some_and(|t| t <= now) {
            self.ihave_due = None;
            for (peer, ids) in std::mem::take(&mut self.ihave) {
                for chunk in ids.chunks(MAX_IDS_PER_FRAME) {
                    send(
                        out,
                        peer,
                        TopicFrame::IHave {
                            topic,
                            ids: chunk.to_vec(),
                        },
                    );
                }
            }
        }
        if self.digest_due.is_some_and(|t| t <= now) {
            let last_tick = 1u32 << (DIGEST_TAIL_ROUNDS - 1);
            let mut ids = Vec::new();
            self.tails.retain(|origin, tail| {
                tail.ticks += 1;
                if tail.ticks.is_power_of_two() {
                    ids.push(ShortId::from(MessageId {
                        origin: *origin,
                        seq: tail.seq,
                    }));
                }
                tail.ticks < last_tick
            });
            for peer in &self.links {
                for chunk in ids.chunks(MAX_IDS_PER_FRAME) {
                    send(
                        out,
                        *peer,
                        TopicFrame::IHave {
                            topic,
                            ids: chunk.to_vec(),
                        },
                    );
                }
            }
            self.digest_due = (!self.tails.is_empty()).then_some(now + DIGEST_INTERVAL);
        }
        // Pulls.
        let due: Vec<ShortId> = self
            .missing
            .iter()
            .filter(|(_, m)| m.due <= now)
            .map(|(k, _)| *k)
            .collect();
        let mut asks: BTreeMap<PeerId, Vec<ShortId>> = BTreeMap::new();
        for id in due {
            let Some(e) = self.missing.get_mut(&id) else {
                continue;
            };
            let links = &self.links;
            e.announcers.retain(|a| links.contains(a));
            let candidates: Vec<PeerId> = if !e.announcers.is_empty() {
                e.announcers.clone()
            } else if e.gap {
                links.iter().copied().collect()
            } else {
                Vec::new()
            };
            if candidates.is_empty() || e.attempts >= MAX_PULL_ATTEMPTS {
                if !candidates.is_empty() {
                    stats.pulls_given_up += 1;
                }
                self.missing.remove(&id);
                continue;
            }
            let target = candidates[e.attempts as usize % candidates.len()];
            e.attempts += 1;
            e.due = now + PULL_RETRY;
            asks.entry(target).or_default().push(id);
        }
        for (peer, ids) in asks {
            for id in &ids {
                if let Some(origin) = self.origins.origin_of(&id.tag) {
                    self.make_eager(&origin, &peer);
                }
            }
            for chunk in ids.chunks(MAX_IDS_PER_FRAME) {
                stats.grafts_sent += 1;
                send(
                    out,
                    peer,
                    TopicFrame::Graft {
                        topic,
                        ids: chunk.to_vec(),
                    },
                );
            }
        }
        // Gaps nobody filled.
        for (origin, seqs) in self.origins.give_up(now) {
            for seq in seqs {
                self.missing.remove(&ShortId {
                    tag: super::message::tag_of(&origin),
                    seq,
                });
            }
            self.drain(topic, origin, now, out, stats);
        }
        let mut acts = Vec::new();
        self.presence.on_timeout(now, signer, &mut acts);
        self.apply_presence(topic, acts, out, stats);
    }
}

/// The overlay machine of one home.
pub struct Overlay {
    me: PeerId,
    /// This home's key: signs its presence (deltas, heartbeats).
    signer: Keypair,
    incarnation: u64,
    config: OverlayConfig,
    topics: BTreeMap<TopicId, TopicState>,
    links: HashMap<PeerId, BTreeSet<TopicId>>,
    out: Out,
    stats: OverlayStats,
}

impl Overlay {
    /// The machine of the home whose node key is `signer` (it signs the
    /// home's presence, see [`super::presence`]). `incarnation` must grow
    /// with each start of the home (e.g. its start time in ms), so the
    /// others know its presence versions started over.
    pub fn new(signer: Keypair, incarnation: u64, config: OverlayConfig) -> Self {
        Overlay {
            me: signer.peer_id(),
            signer,
            incarnation,
            config,
            topics: BTreeMap::new(),
            links: HashMap::new(),
            out: VecDeque::new(),
            stats: OverlayStats::default(),
        }
    }

    /// This home.
    pub fn me(&self) -> PeerId {
        self.me
    }

    /// Counters.
    pub fn stats(&self) -> &OverlayStats {
        &self.stats
    }

    /// Serve `topic` here (this home has, or will have, members of it).
    pub fn subscribe(&mut self, topic: TopicId, now: Duration) -> Result<(), TopicError> {
        if self.topics.contains_key(&topic) {
            return Ok(());
        }
        if self.topics.len() >= MAX_TOPICS_PER_NODE {
            return Err(TopicError::TooManyTopics);
        }
        self.topics.insert(
            topic,
            TopicState {
                links: BTreeSet::new(),
                lazy_for: BTreeMap::new(),
                origins: Origins::default(),
                cache: Cache::default(),
                missing: BTreeMap::new(),
                ihave: BTreeMap::new(),
                ihave_due: None,
                tails: BTreeMap::new(),
                digest_due: None,
                topic_bucket: TokenBucket::new(self.config.topic_rate, RATE_BURST, now),
                publishers: HashMap::new(),
                next_seq: HashMap::new(),
                presence: TopicPresence::new(&self.signer, topic, self.incarnation, now),
            },
        );
        Ok(())
    }

    /// Stop serving `topic`: its state (cache, streams, presence) is
    /// dropped; the driver closes the topic's links.
    pub fn unsubscribe(&mut self, topic: TopicId) {
        self.topics.remove(&topic);
        for set in self.links.values_mut() {
            set.remove(&topic);
        }
        self.links.retain(|_, s| !s.is_empty());
    }

    /// Topics served here.
    pub fn topics(&self) -> Vec<TopicId> {
        self.topics.keys().copied().collect()
    }

    /// A federation link to `peer` carries `topics` (added to what it
    /// carried). New links start eager for every origin. Topics not served here are skipped;
    /// a topic at [`MAX_LINKS_PER_TOPIC`] refuses the link (the others are
    /// still added).
    pub fn link_up(&mut self, peer: PeerId, topics: &[TopicId]) -> Result<(), TopicError> {
        let mut result = Ok(());
        for topic in topics {
            let Some(t) = self.topics.get_mut(topic) else {
                continue;
            };
            if t.linked(&peer) {
                continue;
            }
            if t.links.len() >= MAX_LINKS_PER_TOPIC {
                result = Err(TopicError::TooManyLinks);
                continue;
            }
            t.links.insert(peer);
            self.links.entry(peer).or_default().insert(*topic);
        }
        result
    }

    /// The link to `peer` is gone. Pulls asked of it move to other
    /// announcers; the other links are grafted for every origin (tree
    /// repair, see the module docs).
    pub fn link_down(&mut self, peer: PeerId) {
        let Some(topics) = self.links.remove(&peer) else {
            return;
        };
        for topic in topics {
            let Some(t) = self.topics.get_mut(&topic) else {
                continue;
            };
            t.links.remove(&peer);
            t.make_eager_for_all(&peer);
            t.lazy_for.retain(|_, s| !s.is_empty());
            t.ihave.remove(&peer);
            for m in t.missing.values_mut() {
                m.announcers.retain(|a| *a != peer);
            }
            for p in &t.links {
                self.stats.grafts_sent += 1;
                send(
                    &mut self.out,
                    *p,
                    TopicFrame::Graft {
                        topic,
                        ids: Vec::new(),
                    },
                );
            }
        }
    }

    /// The tree (eager) and lazy links of `origin`'s tree on `topic`.
    pub fn links_of(&self, topic: &TopicId, origin: &PeerId) -> (Vec<PeerId>, Vec<PeerId>) {
        self.topics
            .get(topic)
            .map_or((Vec::new(), Vec::new()), |t| {
                t.links.iter().partition(|p| !t.is_lazy(origin, p))
            })
    }

    /// A local member joined `topic` here; announced to the other homes.
    pub fn member_joined(
        &mut self,
        topic: TopicId,
        member: PeerId,
        now: Duration,
    ) -> Result<(), TopicError> {
        self.member_change(topic, member, true, now)
    }

    /// A local member left `topic` here.
    pub fn member_left(
        &mut self,
        topic: TopicId,
        member: PeerId,
        now: Duration,
    ) -> Result<(), TopicError> {
        self.member_change(topic, member, false, now)
    }

    fn member_change(
        &mut self,
        topic: TopicId,
        member: PeerId,
        joined: bool,
        now: Duration,
    ) -> Result<(), TopicError> {
        let t = self
            .topics
            .get_mut(&topic)
            .ok_or(TopicError::NotSubscribed)?;
        let mut acts = Vec::new();
        let before = t.presence.dropped;
        t.presence.local_change(member, joined, now, &mut acts);
        let refused = t.presence.dropped > before;
        t.apply_presence(topic, acts, &mut self.out, &mut self.stats);
        if refused {
            Err(TopicError::TooManyMembers)
        } else {
            Ok(())
        }
    }

    /// Members of `topic` known here, with their homes.
    pub fn members(&self, topic: &TopicId) -> Vec<(PeerId, PeerId)> {
        self.topics
            .get(topic)
            .map_or_else(Vec::new, |t| t.presence.members())
    }

    /// Local members of `topic`.
    pub fn local_members(&self, topic: &TopicId) -> usize {
        self.topics
            .get(topic)
            .map_or(0, |t| t.presence.local_members())
    }

    /// (incarnation, version, member count) of `home` for `topic` as known
    /// here.
    pub fn presence_view(&self, topic: &TopicId, home: &PeerId) -> Option<(u64, u64, usize)> {
        self.topics.get(topic)?.presence.view_of(home)
    }

    /// The highest seq of `origin` delivered here on `topic`.
    pub fn delivered_up_to(&self, topic: &TopicId, origin: &PeerId) -> Option<u64> {
        self.topics.get(topic)?.origins.hwm(origin)
    }

    /// After a publish of `publisher` on `topic` was refused for rate: how
    /// long until its own bucket and the topic's would both take one again,
    /// at most [`MAX_PUBLISH_BACKOFF`] (zero for a topic or publisher not
    /// tracked here).
    ///
    /// A home reads that publisher's stream no sooner: a publisher over its
    /// limit is read at its limit, and what it sends beyond waits in its
    /// own QUIC flow-control window instead of costing the home a refusal
    /// each. So a flood on one topic costs the home about its rate limit's
    /// worth of work, whatever the flood's size, and the other topics keep
    /// their latency.
    pub fn publish_backoff(&self, topic: &TopicId, publisher: &PeerId, now: Duration) -> Duration {
        let Some(t) = self.topics.get(topic) else {
            return Duration::ZERO;
        };
        let own = t
            .publishers
            .get(publisher)
            .map_or(Duration::ZERO, |(bucket, _)| bucket.wait(1, now));
        own.max(t.topic_bucket.wait(1, now))
            .min(MAX_PUBLISH_BACKOFF)
    }

    /// Publishes `data` on `topic` as `keypair` (this home, or a member
    /// whose key it holds), next seq of that origin. Rate limited.
    pub fn publish(
        &mut self,
        topic: TopicId,
        data: Vec<u8>,
        keypair: &Keypair,
        now: Duration,
    ) -> Result<MessageId, PublishError> {
        let t = self
            .topics
            .get_mut(&topic)
            .ok_or(PublishError::NotSubscribed)?;
        if data.len() > MAX_DATA_LEN {
            return Err(PublishError::TooBig(data.len()));
        }
        let origin = keypair.peer_id();
        t.check_rate(&self.config, origin, now, &mut self.stats)?;
        let hwm = t.origins.hwm(&origin).unwrap_or(0);
        let next = t.next_seq.entry(origin).or_insert(0);
        *next = (*next).max(hwm).saturating_add(1);
        let msg =
            TopicMessage::sign(keypair, topic, *next, data).map_err(PublishError::BadMessage)?;
        t.receive(topic, msg, None, now, &mut self.out, &mut self.stats)
    }

    /// A member's message (signed by it) arriving at its home. A
    /// retransmission of one already taken is accepted again (`Ok`, not
    /// charged, not sent twice).
    pub fn publish_from_member(
        &mut self,
        msg: TopicMessage,
        now: Duration,
    ) -> Result<MessageId, PublishError> {
        self.take_from_member(msg, true, now)
    }

    /// A message its publisher handed to this home itself, on a connection
    /// authenticated as the publisher: the caller checked that `msg.origin`
    /// is the peer whose key authenticated the connection (QUIC with mutual
    /// TLS on Ed25519 keys). That proves who sent it as well as the
    /// signature would, so the signature is not checked here (an Ed25519
    /// verification is most of what forwarding a message costs a home);
    /// size and seq are. Nothing is forgeable by this: the message goes on
    /// with the signature its publisher made, every other home and every
    /// subscriber checks it, and a publisher that sends a bad one only
    /// loses its own message (and holds its next ones back at the other
    /// homes until they give up on it). As [`Overlay::publish_from_member`]
    /// otherwise.
    pub fn publish_from_authenticated_member(
        &mut self,
        msg: TopicMessage,
        now: Duration,
    ) -> Result<MessageId, PublishError> {
        self.take_from_member(msg, false, now)
    }

    fn take_from_member(
        &mut self,
        msg: TopicMessage,
        verify: bool,
        now: Duration,
    ) -> Result<MessageId, PublishError> {
        let t = self
            .topics
            .get_mut(&msg.topic)
            .ok_or(PublishError::NotSubscribed)?;
        if t.origins.has(&msg.origin, msg.seq) {
            // Taken before (checked then): nothing is sent again, whatever
            // this copy carries.
            return Ok(msg.id());
        }
        // The rate limits before the signature: a flood over the limit is
        // refused for the price of a token-bucket check, not an Ed25519
        // verification each (what lets one topic's flood leave the others
        // alone). A message that then fails to verify has used its
        // publisher's token, as a valid one would have.
        t.check_rate(&self.config, msg.origin, now, &mut self.stats)?;
        let checked = if verify {
            msg.verify()
        } else {
            msg.check_form()
        };
        if let Err(e) = checked {
            self.stats.bad_messages += 1;
            return Err(match e {
                MessageError::TooBig(n) => PublishError::TooBig(n),
                e => PublishError::BadMessage(e),
            });
        }
        let topic = msg.topic;
        t.receive(topic, msg, None, now, &mut self.out, &mut self.stats)
    }

    /// A frame from the linked home `from`.
    pub fn handle_frame(&mut self, from: PeerId, frame: TopicFrame, now: Duration) {
        let topic = frame.topic();
        let Some(t) = self.topics.get_mut(&topic) else {
            self.stats.ignored_frames += 1;
            return;
        };
        if !t.linked(&from) || !frame.within_limits() {
            self.stats.ignored_frames += 1;
            return;
        }
        let out = &mut self.out;
        let stats = &mut self.stats;
        let mut acts = Vec::new();
        let forged_before = t.presence.forged;
        match frame {
            TopicFrame::Message(msg) => {
                if t.origins.has(&msg.origin, msg.seq) {
                    stats.duplicates_received += 1;
                    if t.prune(msg.origin, from) {
                        stats.prunes_sent += 1;
                        send(
                            out,
                            from,
                            TopicFrame::Prune {
                                topic,
                                origin: msg.origin,
                            },
                        );
                    }
                    return;
                }
                if msg.verify().is_err() {
                    stats.bad_messages += 1;
                    return;
                }
                t.first_from(topic, msg.origin, from, out);
                let _ = t.receive(topic, msg, Some(from), now, out, stats);
            }
            TopicFrame::IHave { ids, .. } => {
                for id in ids {
                    if t.origins.has_short(&id.tag, id.seq) {
                        continue;
                    }
                    if let Some(e) = t.missing.get_mut(&id) {
                        if !e.announcers.contains(&from) {
                            e.announcers.push(from);
                        }
                    } else if t.missing.len() < MAX_MISSING_PER_TOPIC {
                        t.missing.insert(
                            id,
                            Missing {
                                announcers: vec![from],
                                attempts: 0,
                                due: now + GRAFT_TIMEOUT,
                                gap: false,
                            },
                        );
                    }
                }
            }
            TopicFrame::Graft { ids, .. } => {
                if ids.is_empty() {
                    t.make_eager_for_all(&from);
                }
                let mut gone = Vec::new();
                for id in ids {
                    match t.cache.map.get(&id) {
                        Some(m) => {
                            let origin = m.origin;
                            send(out, from, TopicFrame::Message(m.clone()));
                            t.make_eager(&origin, &from);
                        }
                        None => gone.push(id),
                    }
                }
                if !gone.is_empty() {
                    send(out, from, TopicFrame::NotCached { topic, ids: gone });
                }
            }
            TopicFrame::Prune { origin, .. } => {
                t.prune(origin, from);
            }
            TopicFrame::Eager { origin, .. } => t.make_eager(&origin, &from),
            TopicFrame::NotCached { ids, .. } => {
                let mut unblocked = BTreeSet::new();
                for id in ids {
                    let Some(e) = t.missing.get_mut(&id) else {
                        continue;
                    };
                    stats.not_cached += 1;
                    let was_announcer = e.announcers.contains(&from);
                    e.announcers.retain(|a| *a != from);
                    if !was_announcer || !e.announcers.is_empty() {
                        continue;
                    }
                    // Every holder we knew of has it no more.
                    let gap = e.gap;
                    t.missing.remove(&id);
                    if gap
                        && let Some(origin) = t.origins.origin_of(&id.tag)
                        && t.origins.mark_lost(&origin, id.seq)
                    {
                        unblocked.insert(origin);
                    }
                }
                for origin in unblocked {
                    t.drain(topic, origin, now, out, stats);
                }
            }
            TopicFrame::PresenceDelta {
                home,
                incarnation,
                version,
                changes,
                members_digest,
                signature,
                ..
            } => t.presence.on_delta(
                from,
                home,
                incarnation,
                version,
                changes,
                members_digest,
                signature,
                now,
                &mut acts,
            ),
            TopicFrame::Heartbeat {
                home,
                incarnation,
                version,
                beat,
                signature,
                ..
            } => t.presence.on_heartbeat(
                from,
                home,
                incarnation,
                version,
                beat,
                signature,
                now,
                &mut acts,
            ),
            TopicFrame::SnapshotRequest { home, page, .. } => {
                t.presence.on_snapshot_request(from, home, page, &mut acts)
            }
            TopicFrame::SnapshotPage {
                home,
                incarnation,
                version,
                page,
                last,
                members,
                changes_digest,
                signature,
                ..
            } => t.presence.on_snapshot_page(
                from,
                home,
                (incarnation, version),
                page,
                last,
                members,
                changes_digest,
                signature,
                now,
                &mut acts,
            ),
        }
        stats.bad_presence += t.presence.forged - forged_before;
        t.apply_presence(topic, acts, out, stats);
    }

    /// When [`Overlay::handle_timeout`] wants to run next.
    pub fn next_timeout(&self) -> Option<Duration> {
        self.topics.values().filter_map(|t| t.next_timeout()).min()
    }

    /// Runs the timers due at `now`: "I have" batches, pulls, gap give-ups,
    /// presence deltas, heartbeats, stale sweeps, snapshot retries.
    pub fn handle_timeout(&mut self, now: Duration) {
        for (topic, t) in self.topics.iter_mut() {
            t.on_timeout(*topic, now, &self.signer, &mut self.out, &mut self.stats);
        }
    }

    /// The next output, if any.
    pub fn poll_output(&mut self) -> Option<OverlayOutput> {
        self.out.pop_front()
    }
}

#[cfg(test)]
mod tests;
