//! Topics: publish/subscribe among the *homes* of a topic, sans-IO.
//!
//! A home is a node that serves members of a topic (itself when public,
//! else the relay a member holds). The homes of a topic keep federation
//! links, which the driver (the runtime, or the simulator) opens and closes;
//! this module never chooses peers. Over those links the [`overlay`] machine
//! runs PlumTree-style spanning trees (one per origin) with lazy repair:
//! eager push of whole messages on tree links, batched "I have" notices on
//! the other links, a pull (GRAFT) of what an "I have" announced and did not
//! arrive, PRUNE of a link that delivered a duplicate. Cycles in the link
//! graph are legal: the trees are what the eager links settle to.
//!
//! The driver's side, in short: [`Overlay::subscribe`] the topics the home
//! serves; [`Overlay::link_up`] / [`Overlay::link_down`] as federation links
//! open and close; feed every frame received to [`Overlay::handle_frame`]
//! (after [`TopicFrame::decode`]); local members through
//! [`Overlay::member_joined`], [`Overlay::member_left`],
//! [`Overlay::publish_from_member`]; call [`Overlay::handle_timeout`] at
//! [`Overlay::next_timeout`]; after each call drain
//! [`Overlay::poll_output`]: `Send` (encode and send on the link),
//! `Deliver` (to the home's members), `PresenceChanged`.
//!
//! - [`federation`]: configured federation homes, redialed with backoff;
//!   links closed when they share no topic.
//! - [`message`]: the signed message, its id, and the wire frames.
//! - [`order`]: per-origin high-water marks: exactly once, in order.
//! - [`overlay`]: the machine (links, tree, pulls, rate limits, cache).
//! - [`presence`]: members as deltas per home, heartbeats, stale sweep.
//! - [`publish`]: a member's publish window on its stream to its home.
//!
//! Every limit and every timer is a named constant below, with the reason
//! for its value.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::dht::Key;

pub mod federation;
pub mod message;
pub mod order;
pub mod overlay;
pub mod presence;
pub mod publish;

pub use message::{FrameError, MessageError, MessageId, ShortId, TopicFrame, TopicMessage};
pub use overlay::{Overlay, OverlayConfig, OverlayOutput, OverlayStats, PublishError};

/// Longest topic name in bytes: the DHT's topic records carry the name, so
/// the same bound as theirs.
pub const MAX_TOPIC_NAME_LEN: usize = crate::dht::record::MAX_TOPIC_LEN;
/// Largest message payload: big enough for a chat message with a thumbnail
/// or a telemetry batch, small enough that one message never monopolises a
/// federation link; bulk data goes peer to peer.
pub const MAX_DATA_LEN: usize = 64 * 1024;
/// Largest encoded frame accepted by [`TopicFrame::decode`]: one message at
/// [`MAX_DATA_LEN`] plus its header, or a control frame of the largest
/// batch; checked before anything is decoded or allocated.
pub const MAX_FRAME_LEN: usize = MAX_DATA_LEN + 32 * 1024;
/// Topics one home serves at most: each costs a cache and per-origin state.
pub const MAX_TOPICS_PER_NODE: usize = 1_024;
/// Members of one topic a home tracks at most (its own and other homes'
/// together): presence beyond this is dropped and counted, so a flood of
/// fake members cannot exhaust memory.
pub const MAX_MEMBERS_PER_TOPIC: usize = 100_000;
/// Federation links per topic at most: the tree needs only a few; the rest
/// are lazy repair paths that cost an "I have" per message each.
pub const MAX_LINKS_PER_TOPIC: usize = 32;
/// Messages buffered ahead of a gap per origin: covers reordering across
/// paths and one lost message at 500 msg/s for half a second.
pub const MAX_AHEAD_PER_ORIGIN: u64 = 256;
/// Bytes buffered ahead of gaps per topic, all origins together: bounds
/// memory under loss whatever the message sizes.
pub const MAX_BUFFERED_BYTES_PER_TOPIC: usize = 16 * 1024 * 1024;
/// Origins tracked per topic (least recently heard is forgotten first). An
/// origin forgotten and heard again is treated as new (its stream restarts
/// at the seq heard), so this must exceed the active publishers of a topic.
pub const MAX_ORIGINS_PER_TOPIC: usize = 4_096;
/// Messages kept per topic to answer pulls: at the default 500 msg/s, eight
/// seconds of history, longer than any repair takes ([`GAP_GIVE_UP`]).
pub const CACHE_MAX_MESSAGES: usize = 4_096;
/// Bytes kept per topic to answer pulls, whatever the message sizes.
pub const CACHE_MAX_BYTES: usize = 32 * 1024 * 1024;
/// Message ids per "I have", GRAFT or "not cached" frame at most (the batch
/// size): 1,024 ids of 16 bytes keep a control frame near 16 KiB.
pub const MAX_IDS_PER_FRAME: usize = 1_024;
/// Members per presence delta or snapshot page at most (the page size): 512
/// ids of 32 bytes keep a presence frame near 16 KiB.
pub const MAX_PRESENCE_PAGE: usize = 512;
/// Default rate limit per topic at the publisher's home (issue #15).
pub const DEFAULT_TOPIC_RATE: u64 = 500;
/// Default rate limit per publisher per topic at its home: a fifth of the
/// topic, so a single member cannot take the whole topic's budget.
pub const DEFAULT_PUBLISHER_RATE: u64 = 100;
/// Burst allowance of both rate limits: one second's worth.
pub const RATE_BURST: Duration = Duration::from_secs(1);
/// Longest a home waits before it reads the next publish of a publisher
/// it refused for rate ([`overlay::Overlay::publish_backoff`]): a second,
/// the rate limits' own horizon ([`RATE_BURST`]); with limits configured
/// near zero a member's stream still moves.
pub const MAX_PUBLISH_BACKOFF: Duration = Duration::from_secs(1);
/// Publishers per topic whose rate a home tracks (its own members only):
/// the least recently seen is forgotten first.
pub const MAX_PUBLISHERS_TRACKED: usize = 4_096;
/// Origins a home starts from seq 1 (pulling what it missed) when it first
/// hears them at a seq at most this: a stream this young is still in the
/// caches, and starting at the first seq heard would lose a message that
/// was overtaken on another path. An older stream starts at the seq heard.
pub const FIRST_CONTACT_BACKFILL: u64 = 64;

/// How long "I have" notices are gathered before they are sent as one frame
/// per lazy link: amortises the frame header over ~50 ids at 500 msg/s and
/// adds at most this to a repair.
pub const IHAVE_DELAY: Duration = Duration::from_millis(100);
/// How long a message announced by an "I have" (or known missing below a
/// received one) may take to arrive by the tree before it is pulled with a
/// GRAFT. Longer than the usual difference between the tree path and the
/// announcing path (a few hops at tens of ms plus [`IHAVE_DELAY`]), or the
/// tree churns with needless grafts.
pub const GRAFT_TIMEOUT: Duration = Duration::from_millis(600);
/// Between pull attempts of one missing message (next announcer, or the
/// same again when the GRAFT or the answer was lost).
pub const PULL_RETRY: Duration = Duration::from_millis(400);
/// How long a gap in an origin's stream may block delivery before the home
/// skips it (counted): the message is gone from every cache it asked.
pub const GAP_GIVE_UP: Duration = Duration::from_secs(10);
/// How long local presence changes are gathered into one delta.
pub const PRESENCE_BATCH_DELAY: Duration = Duration::from_millis(50);
/// A home's presence heartbeat: (home, version) flooded over the tree, so
/// the others know the home lives and whether they missed a delta.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// How soon after a delta a home sends an extra heartbeat, so a home that
/// lost the delta pulls the snapshot within the 2 s presence target
/// instead of at the next regular heartbeat.
pub const PRESENCE_CONFIRM: Duration = Duration::from_secs(1);
/// A home not heard for this long has its members dropped (issue #15:
/// three heartbeats).
pub const HOME_STALE: Duration = Duration::from_secs(15);
/// A home not heard for this long (one heartbeat missed, with margin) has
/// its presence tree re-grafted: every link is asked to push its frames
/// again. Its tree can break without a link dying here (a home upstream
/// pruned the only path, or lost its parent and its re-graft reached
/// others but not its own children), and presence has no "I have"
/// repair as messages do; without this a live home would be dropped at
/// [`HOME_STALE`]. The two heartbeats left before then come by the new
/// paths. Found by `reach lab rooms` (a live home dropped 13.5 s after a
/// relay was killed).
pub const PRESENCE_REGRAFT: Duration = Duration::from_secs(7);
/// How long a snapshot pull may take before it is asked again.
pub const SNAPSHOT_RETRY: Duration = Duration::from_secs(1);

/// A topic: the DHT key its topic records live under,
/// [`Key::for_topic`](crate::dht::Key::for_topic)`(name)`, so a home finds
/// the other homes of a topic by the same 32 bytes it names it with.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TopicId(pub [u8; 32]);

/// Why a topic name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicNameError {
    /// The empty name.
    #[error("empty topic name")]
    Empty,
    /// Over [`MAX_TOPIC_NAME_LEN`] bytes.
    #[error("topic name of {0} bytes (max {MAX_TOPIC_NAME_LEN})")]
    TooLong(usize),
    /// Not UTF-8 or holding a control character.
    #[error("topic name is not printable UTF-8")]
    NotText,
}

impl TopicNameError {
    /// Stable machine-readable name.
    pub fn kind(&self) -> &'static str {
        match self {
            TopicNameError::Empty => "topic_name_empty",
            TopicNameError::TooLong(_) => "topic_name_too_long",
            TopicNameError::NotText => "topic_name_not_text",
        }
    }
}

impl TopicId {
    /// The id of the topic called `name` (non-empty, at most
    /// [`MAX_TOPIC_NAME_LEN`] bytes, no control characters).
    pub fn from_name(name: &str) -> Result<TopicId, TopicNameError> {
        if name.is_empty() {
            return Err(TopicNameError::Empty);
        }
        if name.len() > MAX_TOPIC_NAME_LEN {
            return Err(TopicNameError::TooLong(name.len()));
        }
        if name.chars().any(char::is_control) {
            return Err(TopicNameError::NotText);
        }
        Ok(TopicId(Key::for_topic(name).0))
    }

    /// [`TopicId::from_name`] for a name received as bytes.
    pub fn from_name_bytes(name: &[u8]) -> Result<TopicId, TopicNameError> {
        let s = std::str::from_utf8(name).map_err(|_| TopicNameError::NotText)?;
        Self::from_name(s)
    }

    /// The DHT key of the topic's records.
    pub fn key(&self) -> Key {
        Key(self.0)
    }
}

impl fmt::Debug for TopicId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TopicId(")?;
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_id_is_the_dht_key_and_names_are_checked() {
        let t = TopicId::from_name("lobby").unwrap();
        assert_eq!(t.key(), Key::for_topic("lobby"));
        assert_ne!(t, TopicId::from_name("lobby2").unwrap());
        assert_eq!(TopicId::from_name(""), Err(TopicNameError::Empty));
        let long = "x".repeat(MAX_TOPIC_NAME_LEN + 1);
        assert_eq!(
            TopicId::from_name(&long).unwrap_err().kind(),
            "topic_name_too_long"
        );
        assert!(TopicId::from_name(&"é".repeat(MAX_TOPIC_NAME_LEN / 2)).is_ok());
        assert_eq!(TopicId::from_name("a\nb"), Err(TopicNameError::NotText));
        assert_eq!(
            TopicId::from_name_bytes(&[0xff, 0x00]),
            Err(TopicNameError::NotText)
        );
    }
}
