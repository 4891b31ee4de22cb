//! The durable outbox's policy, sans-IO: when to (re)send a pending message,
//! when to give up on it, and how a receiver recognises a message it has
//! already handed to the application.
//!
//! The runtime (`reach::outbox`) persists the entries; this module only
//! decides. Time comes in as `now` (a `Duration` since an epoch the caller
//! picks) and randomness as a caller-supplied `u64`, so the schedule is
//! tested in virtual time.
//!
//! - [`Delivery`]: critical (until acknowledged or expired) or moderate (a
//!   fixed number of attempts).
//! - [`retry_delay`]: capped exponential backoff with jitter.
//! - [`PendingSet`]: the per-destination scheduler. A destination's messages
//!   share one retry clock and go out in enqueue order; "the peer became
//!   reachable" makes the destination due at once.
//! - [`ReceivedLog`]: the receiver's per-sender record of message sequence
//!   numbers (a high-water mark plus a window bitmap), so each message is
//!   delivered exactly once, across restarts once persisted.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::PeerId;

/// Attempts a [`Delivery::Moderate`] message gets by default: the source
/// system's "moderate" class, three tries spread over the backoff (about
/// 0 s, 1 s, 3 s), enough to ride out a reconnect, few enough that a peer
/// that has gone away does not pin the message for long.
pub const DEFAULT_MODERATE_ATTEMPTS: u32 = 3;

/// Delay before the first retry after a failed or unacknowledged attempt.
/// One second is well above a round trip on any real path (so an ack in
/// flight is not raced by a resend) and short enough that a brief outage
/// costs little latency.
pub const FIRST_RETRY: Duration = Duration::from_secs(1);

/// Longest delay between retries. Retries are mostly driven by "the peer
/// became reachable" events; the timer is the fallback when no event comes
/// (an endpoint change we did not hear about), so a minute bounds the extra
/// latency while keeping an unreachable peer's traffic to one attempt a
/// minute.
pub const RETRY_CAP: Duration = Duration::from_secs(60);

/// Sequence numbers a [`ReceivedLog`] remembers below its high-water mark.
/// A message overtaken by more than this many later messages of the same
/// sender is reported [`Received::TooOld`]. Senders send a destination's
/// messages in order, so an overtake of 4096 does not happen in practice;
/// the bitmap costs 512 bytes per sender.
pub const RECEIVE_WINDOW: u64 = 4096;

const WINDOW_WORDS: usize = (RECEIVE_WINDOW / 64) as usize;

/// How hard the outbox tries to deliver a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Delivery {
    /// Retried until the receiver acknowledges it, or its TTL (if any)
    /// expires.
    Critical,
    /// Sent at most `attempts` times, then abandoned.
    Moderate {
        /// Sends before giving up (at least 1 counts; 0 is treated as 1).
        attempts: u32,
    },
}

impl Delivery {
    /// [`Delivery::Moderate`] with [`DEFAULT_MODERATE_ATTEMPTS`].
    pub const fn moderate() -> Self {
        Delivery::Moderate {
            attempts: DEFAULT_MODERATE_ATTEMPTS,
        }
    }
}

/// Why a pending message was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AbandonReason {
    /// A moderate message was sent its number of attempts without an ack.
    Attempts,
    /// The message's TTL passed before an ack.
    Expired,
}

impl AbandonReason {
    /// Stable machine-readable name.
    pub fn kind(&self) -> &'static str {
        match self {
            AbandonReason::Attempts => "attempts",
            AbandonReason::Expired => "expired",
        }
    }
}

/// Delay before the next retry of a destination that has had `failures`
/// unanswered retry rounds (0 for the first): `FIRST_RETRY × 2^failures`
/// capped at [`RETRY_CAP`], then "equal jitter": half of it fixed, the other
/// half scaled by `jitter` (any random `u64`), so many senders that lost the
/// same peer at the same moment do not retry in lockstep, and the delay is
/// never below half the nominal one.
pub fn retry_delay(failures: u32, jitter: u64) -> Duration {
    let nominal = FIRST_RETRY
        .checked_mul(1u32.checked_shl(failures.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(RETRY_CAP)
        .min(RETRY_CAP);
    let half = nominal / 2;
    let half_nanos = half.as_nanos() as u64;
    // jitter / 2^64 of the other half, in integer arithmetic.
    let extra = ((half_nanos as u128 * jitter as u128) >> 64) as u64;
    half + Duration::from_nanos(extra)
}

/// Per-destination identifier of a durable message, chosen by the sender's
/// outbox at enqueue time; also the id on the wire (per sender and receiver).
pub type Seq = u64;

/// What [`PendingSet::next_due`] asks the caller to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send (or resend) message `id` to `peer`, then report it with
    /// [`PendingSet::on_attempt`].
    Send {
        /// The message.
        id: u64,
        /// Its destination.
        peer: PeerId,
    },
    /// Give message `id` up; it has been removed from the set.
    Abandon {
        /// The message.
        id: u64,
        /// Its destination.
        peer: PeerId,
        /// Why.
        reason: AbandonReason,
    },
}

#[derive(Debug, Clone)]
struct Pending {
    peer: PeerId,
    delivery: Delivery,
    expires: Option<Duration>,
    attempts: u32,
    /// Not yet offered by `next_due`: goes out at once, whatever the
    /// destination's retry clock says.
    fresh: bool,
}

#[derive(Debug, Clone, Default)]
struct Destination {
    /// Message ids in enqueue order.
    queue: VecDeque<u64>,
    /// When the destination's next retry round is due; `None` while the
    /// round just offered waits for its attempts to be reported.
    due: Option<Duration>,
    /// Retry rounds since the last ack or "reachable": the backoff exponent.
    failures: u32,
}

/// The scheduler of pending durable messages, grouped by destination.
///
/// Each destination has one retry clock: when it is due, every message
/// queued for it is offered in enqueue order (a destination's messages go
/// out FIFO). A message enqueued while the destination waits for its next
/// round is offered at once (the peer may well be reachable). After the
/// caller reports attempts ([`PendingSet::on_attempt`]) the destination's
/// next round is scheduled with [`retry_delay`]; an ack or
/// [`PendingSet::on_reachable`] resets the backoff, and "reachable" makes the
/// destination due immediately. A moderate message offered once more after
/// its last attempt is abandoned instead (so it gets exactly its number of
/// attempts, and a full retry delay for the last one's ack); a message whose
/// TTL passes is abandoned as expired.
#[derive(Debug, Clone, Default)]
pub struct PendingSet {
    msgs: HashMap<u64, Pending>,
    dests: HashMap<PeerId, Destination>,
    /// (due time, destination) of every scheduled destination.
    due: BTreeSet<(Duration, PeerId)>,
    /// (expiry, id) of every message with a TTL.
    expiries: BTreeSet<(Duration, u64)>,
    /// Ids not offered yet, in enqueue order.
    fresh: BTreeSet<u64>,
}

impl PendingSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Pending messages.
    pub fn len(&self) -> usize {
        self.msgs.len()
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// Adds message `id` for `peer` (ids must grow in enqueue order: FIFO per
    /// destination follows them). `attempts` is what it already had (a
    /// message reloaded after a restart); `expires` is when its TTL runs out.
    /// The message is offered by the next [`PendingSet::next_due`].
    pub fn insert(
        &mut self,
        id: u64,
        peer: PeerId,
        delivery: Delivery,
        expires: Option<Duration>,
        attempts: u32,
    ) {
        if self.msgs.contains_key(&id) {
            return;
        }
        self.msgs.insert(
            id,
            Pending {
                peer,
                delivery,
                expires,
                attempts,
                fresh: true,
            },
        );
        if let Some(at) = expires {
            self.expiries.insert((at, id));
        }
        self.fresh.insert(id);
        let dest = self.dests.entry(peer).or_default();
        // Ids grow, so pushing at the back keeps enqueue order; a reload may
        // insert out of order, so place it properly then.
        match dest.queue.back() {
            Some(&last) if last > id => {
                let pos = dest.queue.partition_point(|&x| x < id);
                dest.queue.insert(pos, id);
            }
            _ => dest.queue.push_back(id),
        }
    }

    /// Removes message `id` (acknowledged, cancelled); returns its
    /// destination if it was pending.
    pub fn remove(&mut self, id: u64) -> Option<PeerId> {
        let m = self.msgs.remove(&id)?;
        if let Some(at) = m.expires {
            self.expiries.remove(&(at, id));
        }
        self.fresh.remove(&id);
        if let Some(dest) = self.dests.get_mut(&m.peer) {
            if let Some(pos) = dest.queue.iter().position(|&x| x == id) {
                dest.queue.remove(pos);
            }
            if dest.queue.is_empty() {
                if let Some(at) = dest.due {
                    self.due.remove(&(at, m.peer));
                }
                self.dests.remove(&m.peer);
            }
        }
        Some(m.peer)
    }

    /// The receiver acknowledged message `id`: it is removed, and its
    /// destination's backoff starts over (the peer is evidently reachable).
    pub fn on_ack(&mut self, id: u64) -> Option<PeerId> {
        let peer = self.remove(id)?;
        if let Some(dest) = self.dests.get_mut(&peer) {
            dest.failures = 0;
        }
        Some(peer)
    }

    /// A connection to `peer` came up (or its endpoint record changed): its
    /// pending messages are due now, and its backoff starts over.
    pub fn on_reachable(&mut self, peer: PeerId, now: Duration) {
        let Some(dest) = self.dests.get_mut(&peer) else {
            return;
        };
        dest.failures = 0;
        if let Some(at) = dest.due.replace(now) {
            self.due.remove(&(at, peer));
        }
        self.due.insert((now, peer));
    }

    /// Message `id` was sent (or the send failed) at `now`: one more attempt.
    /// Schedules its destination's next round, `retry_delay` from now with
    /// `jitter` (a random `u64`), unless a round is already scheduled.
    pub fn on_attempt(&mut self, id: u64, now: Duration, jitter: u64) {
        let Some(m) = self.msgs.get_mut(&id) else {
            return;
        };
        m.attempts = m.attempts.saturating_add(1);
        let peer = m.peer;
        let Some(dest) = self.dests.get_mut(&peer) else {
            return;
        };
        if dest.due.is_none() {
            let at = now + retry_delay(dest.failures, jitter);
            dest.failures = dest.failures.saturating_add(1);
            dest.due = Some(at);
            self.due.insert((at, peer));
        }
    }

    /// Attempts message `id` has had.
    pub fn attempts(&self, id: u64) -> Option<u32> {
        self.msgs.get(&id).map(|m| m.attempts)
    }

    /// When message `id` goes out next: now if it has not been offered yet,
    /// else its destination's next round (`None` while a round's attempts are
    /// awaited).
    pub fn next_try(&self, id: u64, now: Duration) -> Option<Duration> {
        let m = self.msgs.get(&id)?;
        if m.fresh {
            return Some(now);
        }
        self.dests.get(&m.peer)?.due
    }

    /// The next instant [`PendingSet::next_due`] has something to do, if
    /// any: a destination's round, an expiry, or now for fresh messages.
    pub fn next_timeout(&self) -> Option<Duration> {
        let round = self.due.first().map(|&(at, _)| at);
        let expiry = self.expiries.first().map(|&(at, _)| at);
        let fresh = if self.fresh.is_empty() {
            None
        } else {
            Some(Duration::ZERO)
        };
        [round, expiry, fresh].into_iter().flatten().min()
    }

    /// What is due at `now`: expired messages and moderate messages out of
    /// attempts are abandoned (and removed); messages of due destinations,
    /// and fresh ones, are to be sent, each destination's in enqueue order.
    /// Every offered message should be reported with
    /// [`PendingSet::on_attempt`] once tried.
    pub fn next_due(&mut self, now: Duration) -> Vec<Action> {
        let mut out = Vec::new();
        while let Some(&(at, id)) = self.expiries.first() {
            if at > now {
                break;
            }
            if let Some(peer) = self.remove(id) {
                out.push(Action::Abandon {
                    id,
                    peer,
                    reason: AbandonReason::Expired,
                });
            } else {
                self.expiries.remove(&(at, id));
            }
        }
        let mut offered: Vec<u64> = Vec::new();
        while let Some(&(at, peer)) = self.due.first() {
            if at > now {
                break;
            }
            self.due.remove(&(at, peer));
            let Some(dest) = self.dests.get_mut(&peer) else {
                continue;
            };
            dest.due = None;
            let ids: Vec<u64> = dest.queue.iter().copied().collect();
            for id in ids {
                let Some(m) = self.msgs.get(&id) else {
                    continue;
                };
                let out_of_attempts = match m.delivery {
                    Delivery::Moderate { attempts } => m.attempts >= attempts.max(1),
                    Delivery::Critical => false,
                };
                if out_of_attempts {
                    self.remove(id);
                    out.push(Action::Abandon {
                        id,
                        peer,
                        reason: AbandonReason::Attempts,
                    });
                } else {
                    offered.push(id);
                    out.push(Action::Send { id, peer });
                }
            }
        }
        for id in offered {
            if let Some(m) = self.msgs.get_mut(&id) {
                m.fresh = false;
            }
            self.fresh.remove(&id);
        }
        // Fresh messages of destinations that were not due, in id (so
        // enqueue) order.
        for id in std::mem::take(&mut self.fresh) {
            if let Some(m) = self.msgs.get_mut(&id) {
                m.fresh = false;
                out.push(Action::Send { id, peer: m.peer });
            }
        }
        out
    }
}

/// What a receiver makes of an incoming sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Received {
    /// Not seen before: hand it to the application (after persisting).
    New,
    /// Seen before: acknowledge again, do not deliver.
    Duplicate,
    /// Below the window: whether it was seen cannot be told, so it is not
    /// delivered (never twice), but acknowledged so the sender stops.
    TooOld,
}

impl Received {
    /// Stable machine-readable name.
    pub fn kind(&self) -> &'static str {
        match self {
            Received::New => "new",
            Received::Duplicate => "duplicate",
            Received::TooOld => "too_old",
        }
    }
}

/// A receiver's memory of one sender's sequence numbers: the highest seen
/// (`high`) and a bitmap of the [`RECEIVE_WINDOW`] numbers at and below it.
/// Sequence numbers start at 1; 0 is never valid (reported
/// [`Received::TooOld`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ReceivedLogWire", into = "ReceivedLogWire")]
pub struct ReceivedLog {
    high: u64,
    /// Bit `i` (word `i / 64`, bit `i % 64`) is set if `high - i` was seen.
    bits: [u64; WINDOW_WORDS],
}

impl Default for ReceivedLog {
    fn default() -> Self {
        ReceivedLog {
            high: 0,
            bits: [0; WINDOW_WORDS],
        }
    }
}

#[derive(Serialize, Deserialize)]
struct ReceivedLogWire {
    high: u64,
    bits: Vec<u64>,
}

impl From<ReceivedLog> for ReceivedLogWire {
    fn from(l: ReceivedLog) -> Self {
        ReceivedLogWire {
            high: l.high,
            bits: l.bits.to_vec(),
        }
    }
}

impl TryFrom<ReceivedLogWire> for ReceivedLog {
    type Error = &'static str;
    fn try_from(w: ReceivedLogWire) -> Result<Self, Self::Error> {
        let bits: [u64; WINDOW_WORDS] = w
            .bits
            .try_into()
            .map_err(|_| "received log: wrong bitmap length")?;
        Ok(ReceivedLog { high: w.high, bits })
    }
}

impl ReceivedLog {
    /// A log that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// The highest sequence number seen (0: none).
    pub fn high(&self) -> u64 {
        self.high
    }

    fn bit(&self, offset: u64) -> bool {
        let (w, b) = ((offset / 64) as usize, offset % 64);
        self.bits[w] & (1 << b) != 0
    }

    fn set(&mut self, offset: u64) {
        let (w, b) = ((offset / 64) as usize, offset % 64);
        self.bits[w] |= 1 << b;
    }

    /// Shifts the window up by `by`: offsets grow.
    fn shift(&mut self, by: u64) {
        if by >= RECEIVE_WINDOW {
            self.bits = [0; WINDOW_WORDS];
            return;
        }
        let words = (by / 64) as usize;
        let bits = (by % 64) as u32;
        let mut next = [0u64; WINDOW_WORDS];
        for i in (words..WINDOW_WORDS).rev() {
            let src = i - words;
            let mut v = self.bits[src] << bits;
            if bits > 0 && src > 0 {
                v |= self.bits[src - 1] >> (64 - bits);
            }
            next[i] = v;
        }
        self.bits = next;
    }

    /// Whether `seq` would be new, without recording it.
    pub fn check(&self, seq: u64) -> Received {
        if seq == 0 {
            return Received::TooOld;
        }
        if seq > self.high {
            return Received::New;
        }
        let offset = self.high - seq;
        if offset >= RECEIVE_WINDOW {
            Received::TooOld
        } else if self.bit(offset) {
            Received::Duplicate
        } else {
            Received::New
        }
    }

    /// Classifies `seq` and records it if new.
    pub fn check_and_record(&mut self, seq: u64) -> Received {
        let verdict = self.check(seq);
        if verdict == Received::New {
            if seq > self.high {
                let by = seq - self.high;
                self.shift(by);
                self.high = seq;
            }
            self.set(self.high - seq);
        }
        verdict
    }
}

/// The durable-delivery protocol: the sender opens one stream of it per
/// destination and writes its pending messages in enqueue order; the
/// receiver answers each with an ack once it is durably recorded.
pub const PROTOCOL: &str = crate::wire::envelope::protocols::OUTBOX;

/// One frame of [`PROTOCOL`], postcard-encoded inside a length-prefixed
/// frame ([`crate::wire::frame`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DurableFrame {
    /// Sender → receiver: message `seq` (per sender and receiver, from 1).
    Message {
        /// Its sequence number.
        seq: Seq,
        /// The payload.
        data: Vec<u8>,
    },
    /// Receiver → sender: what became of message `seq`.
    Ack {
        /// The message.
        seq: Seq,
        /// What the receiver did with it.
        outcome: AckOutcome,
    },
}

/// What a receiver did with a durable message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AckOutcome {
    /// Durably recorded and queued for the application: the sender may
    /// delete it.
    Accepted,
    /// Received before (the first ack was lost): delete it too.
    Duplicate,
    /// Not taken now (the receiver's inbox is full): the sender keeps it
    /// and tries again later; the receiver reads no further on this stream,
    /// so what follows is not taken out of order.
    Refused,
}

impl AckOutcome {
    /// Whether the sender may delete the message.
    pub fn delivered(self) -> bool {
        matches!(self, AckOutcome::Accepted | AckOutcome::Duplicate)
    }
}

impl DurableFrame {
    /// Encodes the frame (postcard).
    pub fn encode(&self) -> Vec<u8> {
        // Encoding these plain enums into a Vec cannot fail.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decodes a frame; bad bytes are a typed error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Self, crate::wire::WireError> {
        postcard::from_bytes(bytes)
            .map_err(|e| crate::wire::WireError::Malformed(format!("durable frame: {e}")))
    }
}

#[cfg(test)]
mod wire_tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_a_typed_error() {
        for f in [
            DurableFrame::Message {
                seq: 7,
                data: b"hello".to_vec(),
            },
            DurableFrame::Ack {
                seq: u64::MAX,
                outcome: AckOutcome::Refused,
            },
        ] {
            assert_eq!(DurableFrame::decode(&f.encode()), Ok(f));
        }
        assert!(DurableFrame::decode(&[9, 9, 9]).is_err());
        assert!(DurableFrame::decode(&[]).is_err());
        assert!(AckOutcome::Duplicate.delivered() && !AckOutcome::Refused.delivered());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Keypair;
    use proptest::prelude::*;

    fn peer(n: u8) -> PeerId {
        Keypair::from_secret_bytes([n; 32]).peer_id()
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn sends(actions: &[Action]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { id, .. } => Some(*id),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_jitter_stays_within_half() {
        assert_eq!(retry_delay(0, 0), FIRST_RETRY / 2);
        assert!(retry_delay(0, u64::MAX) <= FIRST_RETRY);
        assert!(retry_delay(0, u64::MAX) > FIRST_RETRY * 99 / 100);
        assert_eq!(retry_delay(1, 0), FIRST_RETRY);
        assert_eq!(retry_delay(2, 0), FIRST_RETRY * 2);
        assert_eq!(retry_delay(20, 0), RETRY_CAP / 2);
        assert_eq!(retry_delay(u32::MAX, 0), RETRY_CAP / 2);
        assert!(retry_delay(u32::MAX, u64::MAX) <= RETRY_CAP);
        let mid = retry_delay(3, u64::MAX / 2);
        assert!(mid > FIRST_RETRY * 5 && mid < FIRST_RETRY * 7, "{mid:?}");
    }

    #[test]
    fn moderate_is_abandoned_after_exactly_n_attempts() {
        let mut set = PendingSet::new();
        let p = peer(1);
        set.insert(1, p, Delivery::Moderate { attempts: 3 }, None, 0);
        let mut now = S(0);
        let mut attempts = 0;
        let mut abandoned = None;
        for _ in 0..20 {
            for a in set.next_due(now) {
                match a {
                    Action::Send { id, .. } => {
                        attempts += 1;
                        set.on_attempt(id, now, 0);
                    }
                    Action::Abandon { reason, .. } => abandoned = Some((reason, now)),
                }
            }
            if abandoned.is_some() {
                break;
            }
            now = set.next_timeout().expect("something scheduled");
        }
        assert_eq!(attempts, 3);
        let (reason, at) = abandoned.expect("abandoned");
        assert_eq!(reason, AbandonReason::Attempts);
        // Sent at 0, 0.5 s, 1.5 s; abandoned after the third's retry delay.
        assert_eq!(at, Duration::from_millis(3500));
        assert!(set.is_empty());
        assert_eq!(set.next_timeout(), None);
    }

    #[test]
    fn critical_retries_until_acked_with_capped_backoff() {
        let mut set = PendingSet::new();
        let p = peer(1);
        set.insert(7, p, Delivery::Critical, None, 0);
        let mut now = S(0);
        let mut times = Vec::new();
        for _ in 0..30 {
            for a in set.next_due(now) {
                if let Action::Send { id, .. } = a {
                    times.push(now);
                    set.on_attempt(id, now, u64::MAX);
                }
            }
            now = set.next_timeout().unwrap();
        }
        assert_eq!(times.len(), 30);
        let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.windows(2).all(|g| g[1] >= g[0]));
        assert!(gaps.iter().all(|g| *g <= RETRY_CAP));
        assert!(*gaps.last().unwrap() > RETRY_CAP * 99 / 100);
        assert_eq!(set.attempts(7), Some(30));
        assert_eq!(set.on_ack(7), Some(p));
        assert!(set.is_empty());
        assert_eq!(set.next_timeout(), None);
        assert!(set.next_due(now + S(3600)).is_empty());
    }

    #[test]
    fn critical_with_ttl_expires() {
        let mut set = PendingSet::new();
        let p = peer(1);
        set.insert(1, p, Delivery::Critical, Some(S(10)), 0);
        let mut now = S(0);
        let mut sends = 0;
        loop {
            let mut done = false;
            for a in set.next_due(now) {
                match a {
                    Action::Send { id, .. } => {
                        sends += 1;
                        set.on_attempt(id, now, 0);
                    }
                    Action::Abandon { id, reason, .. } => {
                        assert_eq!((id, reason), (1, AbandonReason::Expired));
                        assert_eq!(now, S(10));
                        done = true;
                    }
                }
            }
            if done {
                break;
            }
            now = set.next_timeout().unwrap();
            assert!(now <= S(10));
        }
        // 0, 0.5, 1.5, 3.5, 7.5 (then 15.5 is past the TTL).
        assert_eq!(sends, 5);
        assert!(set.is_empty());
    }

    #[test]
    fn reachable_resends_at_once_and_resets_backoff() {
        let mut set = PendingSet::new();
        let p = peer(1);
        set.insert(1, p, Delivery::Critical, None, 0);
        let mut now = S(0);
        for _ in 0..10 {
            for a in set.next_due(now) {
                if let Action::Send { id, .. } = a {
                    set.on_attempt(id, now, 0);
                }
            }
            now = set.next_timeout().unwrap();
        }
        // Backed off to tens of seconds; the peer comes back now.
        let back = now - S(5);
        assert!(set.next_due(back).is_empty());
        set.on_reachable(p, back);
        assert_eq!(set.next_timeout(), Some(back));
        assert_eq!(sends(&set.next_due(back)), vec![1]);
        set.on_attempt(1, back, 0);
        // Backoff starts over: the next round is FIRST_RETRY / 2 later.
        assert_eq!(set.next_timeout(), Some(back + FIRST_RETRY / 2));
        // A reachable event for a peer with nothing pending is a no-op.
        set.on_reachable(peer(9), back);
        assert_eq!(set.next_timeout(), Some(back + FIRST_RETRY / 2));
    }

    #[test]
    fn fifo_per_destination_and_fresh_messages_go_out_at_once() {
        let mut set = PendingSet::new();
        let (a, b) = (peer(1), peer(2));
        set.insert(1, a, Delivery::Critical, None, 0);
        set.insert(2, b, Delivery::Critical, None, 0);
        set.insert(3, a, Delivery::Critical, None, 0);
        assert_eq!(set.next_timeout(), Some(Duration::ZERO));
        assert_eq!(sends(&set.next_due(S(0))), vec![1, 2, 3]);
        for id in [1, 2, 3] {
            set.on_attempt(id, S(0), 0);
        }
        // A new message for a while its destination waits: at once.
        set.insert(4, a, Delivery::Critical, None, 0);
        assert_eq!(sends(&set.next_due(S(0))), vec![4]);
        set.on_attempt(4, S(0), 0);
        assert!(set.next_due(S(0)).is_empty());
        // The retry round resends a's messages in enqueue order.
        let round = set.next_due(S(1));
        let a_ids: Vec<u64> = round
            .iter()
            .filter_map(|x| match x {
                Action::Send { id, peer } if *peer == a => Some(*id),
                _ => None,
            })
            .collect();
        assert_eq!(a_ids, vec![1, 3, 4]);
        assert_eq!(sends(&round).len(), 4);
        // Acked and cancelled messages leave.
        assert_eq!(set.on_ack(3), Some(a));
        assert_eq!(set.remove(2), Some(b));
        assert_eq!(set.remove(2), None);
        assert_eq!(set.len(), 2);
        // A reload inserts out of order: still FIFO by id.
        let mut re = PendingSet::new();
        for id in [9, 5, 7] {
            re.insert(id, a, Delivery::Critical, None, 2);
        }
        re.on_reachable(a, S(0));
        assert_eq!(sends(&re.next_due(S(0))), vec![5, 7, 9]);
        assert_eq!(re.attempts(5), Some(2));
    }

    #[test]
    fn received_log_basics() {
        let mut log = ReceivedLog::new();
        assert_eq!(log.check_and_record(0), Received::TooOld);
        assert_eq!(log.check_and_record(1), Received::New);
        assert_eq!(log.check_and_record(1), Received::Duplicate);
        assert_eq!(log.check_and_record(3), Received::New);
        assert_eq!(log.check_and_record(2), Received::New);
        assert_eq!(log.check_and_record(2), Received::Duplicate);
        assert_eq!(log.high(), 3);
        let far = 3 + RECEIVE_WINDOW;
        assert_eq!(log.check_and_record(far), Received::New);
        // 3 is now exactly RECEIVE_WINDOW below: out of the window.
        assert_eq!(log.check_and_record(3), Received::TooOld);
        assert_eq!(log.check_and_record(4), Received::New);
        assert_eq!(log.check_and_record(4), Received::Duplicate);
        let bytes = postcard::to_allocvec(&log).unwrap();
        let back: ReceivedLog = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, log);
        assert_eq!(back.check(4), Received::Duplicate);
        // A bitmap of the wrong length does not decode.
        let bad = postcard::to_allocvec(&ReceivedLogWire {
            high: 5,
            bits: vec![0; 3],
        })
        .unwrap();
        assert!(postcard::from_bytes::<ReceivedLog>(&bad).is_err());
    }

    proptest! {
        /// Any order and duplication of deliveries within the window yields
        /// each sequence number exactly once, also across a save and load.
        #[test]
        fn each_seq_exactly_once_within_the_window(
            base in 1u64..1_000_000,
            offsets in proptest::collection::vec(0u64..RECEIVE_WINDOW, 1..600),
            dups in proptest::collection::vec(any::<proptest::sample::Index>(), 0..600),
            shuffle_seed in any::<u64>(),
            reload_at in any::<proptest::sample::Index>(),
        ) {
            let mut deliveries: Vec<u64> = offsets.iter().map(|o| base + o).collect();
            for d in &dups {
                deliveries.push(deliveries[d.index(deliveries.len())]);
            }
            // Fisher-Yates with a splitmix64 stream.
            let mut s = shuffle_seed;
            let mut next = || {
                s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^ (z >> 31)
            };
            for i in (1..deliveries.len()).rev() {
                let j = (next() % (i as u64 + 1)) as usize;
                deliveries.swap(i, j);
            }
            let reload = reload_at.index(deliveries.len());
            let mut log = ReceivedLog::new();
            let mut delivered = std::collections::BTreeMap::<u64, u32>::new();
            for (i, seq) in deliveries.iter().enumerate() {
                if i == reload {
                    let bytes = postcard::to_allocvec(&log).unwrap();
                    log = postcard::from_bytes(&bytes).unwrap();
                }
                match log.check_and_record(*seq) {
                    Received::New => *delivered.entry(*seq).or_default() += 1,
                    Received::Duplicate => prop_assert!(delivered.contains_key(seq)),
                    Received::TooOld => prop_assert!(false, "{seq} too old within the window"),
                }
            }
            let distinct: BTreeSet<u64> = deliveries.iter().copied().collect();
            prop_assert_eq!(delivered.len(), distinct.len());
            prop_assert!(delivered.values().all(|&n| n == 1));
        }
    }
}
