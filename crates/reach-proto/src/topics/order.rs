//! Exactly once, in order per publisher: per-origin high-water marks.
//!
//! For each origin of a topic a home keeps the highest seq it has delivered
//! (`hwm`, the high-water mark) and the messages that arrived ahead of a gap
//! (at most [`MAX_AHEAD_PER_ORIGIN`], and [`MAX_BUFFERED_BYTES_PER_TOPIC`]
//! for all origins). A message at `hwm + 1` is delivered, then whatever it
//! unblocks; one at or below `hwm`, or already buffered, is a duplicate.
//! This is not a time window: a duplicate arriving an hour late is still
//! recognised, as long as its origin is remembered
//! ([`MAX_ORIGINS_PER_TOPIC`], least recently heard forgotten first).
//!
//! **First contact.** A home hearing an origin for the first time at seq `s`
//! starts its stream there (`hwm = s - 1`): a home that joins a topic late
//! does not replay history. Except for a young stream (`s <=
//! FIRST_CONTACT_BACKFILL + 1`): then it starts at seq 1 and pulls the gap,
//! because on a fresh topic the first message heard may have overtaken an
//! earlier one on another path, and starting at `s` would lose that one.
//!
//! A gap that cannot be filled (a message no cache holds any more) is
//! given up: [`Origins::give_up`] after [`GAP_GIVE_UP`], or
//! [`Origins::mark_lost`] when every holder said it has it no more. A given
//! up seq is a tombstone: delivery passes over it in order.
//!
//! **Far ahead.** A message more than [`MAX_AHEAD_PER_ORIGIN`] past the
//! high-water mark (a home cut off for a long while, a publisher restarted
//! at a higher seq) moves the window: what is buffered below it is handed
//! out first, the seqs passed over are counted ([`Origins::take_jumped`]),
//! and the rest of the window is pulled like any gap.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use super::message::{OriginTag, tag_of};
use super::{
    FIRST_CONTACT_BACKFILL, GAP_GIVE_UP, MAX_AHEAD_PER_ORIGIN, MAX_BUFFERED_BYTES_PER_TOPIC,
    MAX_ORIGINS_PER_TOPIC,
};
use crate::PeerId;

/// What [`Origins::offer`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Already delivered, given up, or buffered: a duplicate.
    Duplicate,
    /// Kept: deliverable now or buffered behind a gap.
    Accepted,
    /// The topic's buffer is full: dropped (it is pulled again once the
    /// gap closes).
    NoRoom,
}

struct Stream<T> {
    hwm: u64,
    /// Seq → message (`None`: given up).
    ahead: BTreeMap<u64, Option<(T, usize)>>,
    /// Since when the head of `ahead` has waited on a gap.
    gap_since: Option<Duration>,
    /// Messages at or below `hwm` still to hand out (after a jump).
    released: VecDeque<Option<(T, usize)>>,
    stamp: u64,
}

/// The per-origin streams of one topic.
pub struct Origins<T> {
    streams: HashMap<PeerId, Stream<T>>,
    lru: BTreeMap<u64, PeerId>,
    tags: HashMap<OriginTag, PeerId>,
    gapped: BTreeSet<PeerId>,
    tick: u64,
    cap: usize,
    buffered_bytes: usize,
    jumped: u64,
}

impl<T> Default for Origins<T> {
    fn default() -> Self {
        Self::with_capacity(MAX_ORIGINS_PER_TOPIC)
    }
}

impl<T> Origins<T> {
    /// Tracks at most `cap` origins.
    pub fn with_capacity(cap: usize) -> Self {
        Origins {
            streams: HashMap::new(),
            lru: BTreeMap::new(),
            tags: HashMap::new(),
            gapped: BTreeSet::new(),
            tick: 0,
            cap: cap.max(1),
            buffered_bytes: 0,
            jumped: 0,
        }
    }

    /// Origins tracked.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    /// True when no origin is tracked.
    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// The high-water mark of `origin`, if tracked.
    pub fn hwm(&self, origin: &PeerId) -> Option<u64> {
        self.streams.get(origin).map(|s| s.hwm)
    }

    /// Seqs passed over by window jumps since the last call.
    pub fn take_jumped(&mut self) -> u64 {
        std::mem::take(&mut self.jumped)
    }

    /// Bytes buffered ahead of gaps.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered_bytes
    }

    /// Whether `seq` of `origin` was delivered, given up or is buffered.
    pub fn has(&self, origin: &PeerId, seq: u64) -> bool {
        self.streams
            .get(origin)
            .is_some_and(|s| seq <= s.hwm || s.ahead.contains_key(&seq))
    }

    /// [`Origins::has`] by origin tag.
    pub fn has_short(&self, tag: &OriginTag, seq: u64) -> bool {
        self.tags.get(tag).is_some_and(|o| self.has(o, seq))
    }

    /// The tracked origin with this tag.
    pub fn origin_of(&self, tag: &OriginTag) -> Option<PeerId> {
        self.tags.get(tag).copied()
    }

    fn touch(&mut self, origin: &PeerId) {
        self.tick += 1;
        if let Some(s) = self.streams.get_mut(origin) {
            self.lru.remove(&s.stamp);
            s.stamp = self.tick;
            self.lru.insert(self.tick, *origin);
        }
    }

    fn ensure(&mut self, origin: &PeerId, seq: u64) {
        if self.streams.contains_key(origin) {
            return;
        }
        if self.streams.len() >= self.cap
            && let Some((_, old)) = self.lru.pop_first()
            && let Some(s) = self.streams.remove(&old)
        {
            self.tags.remove(&tag_of(&old));
            self.gapped.remove(&old);
            self.buffered_bytes -= s
                .ahead
                .values()
                .chain(s.released.iter())
                .map(|v| v.as_ref().map_or(0, |(_, n)| *n))
                .sum::<usize>();
        }
        let hwm = if seq <= FIRST_CONTACT_BACKFILL + 1 {
            0
        } else {
            seq - 1
        };
        self.tick += 1;
        self.streams.insert(
            *origin,
            Stream {
                hwm,
                ahead: BTreeMap::new(),
                gap_since: None,
                released: VecDeque::new(),
                stamp: self.tick,
            },
        );
        self.lru.insert(self.tick, *origin);
        self.tags.insert(tag_of(origin), *origin);
    }

    /// Offers message `seq` of `origin` (`size` bytes) at `now`.
    pub fn offer(
        &mut self,
        origin: &PeerId,
        seq: u64,
        item: T,
        size: usize,
        now: Duration,
    ) -> Offer {
        self.ensure(origin, seq);
        self.touch(origin);
        let room = self.buffered_bytes + size <= MAX_BUFFERED_BYTES_PER_TOPIC;
        let Some(s) = self.streams.get_mut(origin) else {
            return Offer::NoRoom;
        };
        if seq <= s.hwm || s.ahead.contains_key(&seq) {
            return Offer::Duplicate;
        }
        if seq > s.hwm.saturating_add(1) && !room {
            return Offer::NoRoom;
        }
        if seq - s.hwm > MAX_AHEAD_PER_ORIGIN {
            // The stream is further on than the buffer reaches (a long
            // partition, or a publisher that restarted at a higher seq):
            // move the window so `seq` is its last slot. What is buffered
            // below the new window is released first, in order; the seqs
            // passed over are counted; the rest of the window is pulled.
            let new_hwm = seq - MAX_AHEAD_PER_ORIGIN;
            let keep = s.ahead.split_off(&(new_hwm + 1));
            let below = std::mem::replace(&mut s.ahead, keep);
            self.jumped += (new_hwm - s.hwm) - below.len() as u64;
            s.released.extend(below.into_values());
            s.hwm = new_hwm;
            s.gap_since = None;
        }
        s.ahead.insert(seq, Some((item, size)));
        self.buffered_bytes += size;
        if s.ahead
            .first_key_value()
            .is_some_and(|(k, _)| *k != s.hwm.saturating_add(1))
        {
            s.gap_since.get_or_insert(now);
            self.gapped.insert(*origin);
        }
        Offer::Accepted
    }

    /// Gives up `seq` of `origin` (nobody can send it): delivery passes over
    /// it. False if it was already delivered, buffered or given up.
    pub fn mark_lost(&mut self, origin: &PeerId, seq: u64) -> bool {
        let Some(s) = self.streams.get_mut(origin) else {
            return false;
        };
        if seq <= s.hwm || s.ahead.contains_key(&seq) || seq - s.hwm > MAX_AHEAD_PER_ORIGIN {
            return false;
        }
        s.ahead.insert(seq, None);
        true
    }

    /// The next message of `origin` in order, if it is here: `Some(None)`
    /// for a given-up seq (passed over), `Some(Some(item))` to deliver.
    pub fn pop_ready(&mut self, origin: &PeerId, now: Duration) -> Option<Option<T>> {
        let s = self.streams.get_mut(origin)?;
        if let Some(v) = s.released.pop_front() {
            return Some(v.map(|(item, size)| {
                self.buffered_bytes -= size;
                item
            }));
        }
        let first = s.ahead.first_entry()?;
        if *first.key() != s.hwm.saturating_add(1) {
            return None;
        }
        let (seq, v) = first.remove_entry();
        s.hwm = seq;
        match s.ahead.first_key_value() {
            None => {
                s.gap_since = None;
                self.gapped.remove(origin);
            }
            Some((k, _)) if *k == s.hwm.saturating_add(1) => {}
            Some(_) => {
                // A fresh gap behind the one just closed.
                s.gap_since = Some(now);
            }
        }
        Some(v.map(|(item, size)| {
            self.buffered_bytes -= size;
            item
        }))
    }

    /// The seqs of `origin` missing below its highest buffered one (at most
    /// [`MAX_AHEAD_PER_ORIGIN`]).
    pub fn gaps(&self, origin: &PeerId) -> Vec<u64> {
        let Some(s) = self.streams.get(origin) else {
            return Vec::new();
        };
        let Some((&last, _)) = s.ahead.last_key_value() else {
            return Vec::new();
        };
        (s.hwm.saturating_add(1)..last)
            .filter(|q| !s.ahead.contains_key(q))
            .collect()
    }

    /// When the oldest gap is due to be given up.
    pub fn next_give_up(&self) -> Option<Duration> {
        self.gapped
            .iter()
            .filter_map(|o| self.streams.get(o)?.gap_since)
            .min()
            .map(|t| t + GAP_GIVE_UP)
    }

    /// Gives up every gap older than [`GAP_GIVE_UP`] at `now`: returns the
    /// origins whose streams can move on and the seqs given up.
    pub fn give_up(&mut self, now: Duration) -> Vec<(PeerId, Vec<u64>)> {
        let due: Vec<PeerId> = self
            .gapped
            .iter()
            .filter(|o| {
                self.streams
                    .get(o)
                    .and_then(|s| s.gap_since)
                    .is_some_and(|t| t + GAP_GIVE_UP <= now)
            })
            .copied()
            .collect();
        let mut out = Vec::new();
        for o in due {
            let lost = self.gaps(&o);
            let Some(s) = self.streams.get_mut(&o) else {
                continue;
            };
            let head = s.ahead.first_key_value().map(|(k, _)| *k);
            let skipped: Vec<u64> = lost
                .into_iter()
                .filter(|q| head.is_some_and(|h| *q < h))
                .collect();
            for q in &skipped {
                s.ahead.insert(*q, None);
            }
            out.push((o, skipped));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(i: u8) -> PeerId {
        crate::Keypair::from_secret_bytes([i; 32]).peer_id()
    }

    fn drain(o: &mut Origins<u64>, p: &PeerId) -> Vec<Option<u64>> {
        std::iter::from_fn(|| o.pop_ready(p, Duration::ZERO)).collect()
    }

    const T0: Duration = Duration::ZERO;

    #[test]
    fn delivers_in_order_once_and_buffers_ahead_of_a_gap() {
        let mut o = Origins::default();
        let a = peer(1);
        assert_eq!(o.offer(&a, 1, 1, 10, T0), Offer::Accepted);
        assert_eq!(drain(&mut o, &a), vec![Some(1)]);
        assert_eq!(o.offer(&a, 3, 3, 10, T0), Offer::Accepted);
        assert_eq!(o.offer(&a, 4, 4, 10, T0), Offer::Accepted);
        assert_eq!(drain(&mut o, &a), vec![], "blocked on 2");
        assert_eq!(o.gaps(&a), vec![2]);
        assert_eq!(o.offer(&a, 3, 3, 10, T0), Offer::Duplicate);
        assert_eq!(o.offer(&a, 2, 2, 10, T0), Offer::Accepted);
        assert_eq!(drain(&mut o, &a), vec![Some(2), Some(3), Some(4)]);
        assert_eq!(o.offer(&a, 2, 2, 10, T0), Offer::Duplicate, "late copy");
        assert_eq!(o.buffered_bytes(), 0);
        assert_eq!(o.hwm(&a), Some(4));
    }

    #[test]
    fn first_contact_starts_young_streams_at_one_and_old_ones_where_heard() {
        let mut o = Origins::default();
        let (young, old) = (peer(1), peer(2));
        o.offer(&young, 5, 5, 1, T0);
        assert_eq!(drain(&mut o, &young), vec![]);
        assert_eq!(o.gaps(&young), vec![1, 2, 3, 4]);
        let s = FIRST_CONTACT_BACKFILL + 10;
        o.offer(&old, s, s, 1, T0);
        assert_eq!(drain(&mut o, &old), vec![Some(s)]);
        assert_eq!(o.offer(&old, s - 1, 0, 1, T0), Offer::Duplicate);
    }

    #[test]
    fn buffer_ahead_is_bounded_and_a_stream_far_ahead_moves_the_window() {
        let mut o = Origins::default();
        let a = peer(1);
        o.offer(&a, 1, 1, 1, T0);
        drain(&mut o, &a);
        let big = MAX_BUFFERED_BYTES_PER_TOPIC + 1;
        assert_eq!(o.offer(&a, 3, 0, big, T0), Offer::NoRoom);
        assert_eq!(o.offer(&a, 3, 3, 1, T0), Offer::Accepted);
        // Seq 2 never came; then the stream shows up far beyond the
        // buffer: 3 is handed out, 2 and 4..=12 are passed over, the
        // window now ends at the new seq.
        let far = 12 + MAX_AHEAD_PER_ORIGIN;
        assert_eq!(o.offer(&a, far, far, 1, T0), Offer::Accepted);
        assert_eq!(o.take_jumped(), 10);
        assert_eq!(o.hwm(&a), Some(12));
        assert_eq!(drain(&mut o, &a), vec![Some(3)]);
        assert_eq!(o.gaps(&a).len() as u64, MAX_AHEAD_PER_ORIGIN - 1);
        assert_eq!(o.offer(&a, 3, 3, 1, T0), Offer::Duplicate);
        assert_eq!(o.buffered_bytes(), 1);
    }

    #[test]
    fn gaps_are_given_up_after_the_timeout_and_lost_seqs_passed_over() {
        let mut o = Origins::default();
        let a = peer(1);
        let t = Duration::from_secs(100);
        o.offer(&a, 1, 1, 1, t);
        drain(&mut o, &a);
        o.offer(&a, 4, 4, 1, t);
        assert_eq!(o.next_give_up(), Some(t + GAP_GIVE_UP));
        assert!(
            o.give_up(t + GAP_GIVE_UP - Duration::from_millis(1))
                .is_empty()
        );
        assert_eq!(o.give_up(t + GAP_GIVE_UP), vec![(a, vec![2, 3])]);
        assert_eq!(drain(&mut o, &a), vec![None, None, Some(4)]);
        assert_eq!(o.next_give_up(), None);
        // mark_lost: a holder said it no longer has 5.
        o.offer(&a, 6, 6, 1, t);
        assert!(o.mark_lost(&a, 5));
        assert!(!o.mark_lost(&a, 5));
        assert_eq!(drain(&mut o, &a), vec![None, Some(6)]);
    }

    #[test]
    fn the_largest_seq_does_not_overflow() {
        let mut o = Origins::default();
        let a = peer(1);
        assert_eq!(o.offer(&a, u64::MAX, 1, 1, T0), Offer::Accepted);
        assert_eq!(drain(&mut o, &a), vec![Some(1)]);
        assert_eq!(o.offer(&a, u64::MAX, 1, 1, T0), Offer::Duplicate);
        assert_eq!(o.offer(&a, 5, 1, 1, T0), Offer::Duplicate);
        assert!(o.gaps(&a).is_empty());
        assert!(!o.mark_lost(&a, u64::MAX));
        assert_eq!(drain(&mut o, &a), vec![]);
    }

    #[test]
    fn origins_are_bounded_least_recently_heard_first() {
        let mut o = Origins::with_capacity(2);
        let (a, b, c) = (peer(1), peer(2), peer(3));
        o.offer(&a, 1, 1, 1, T0);
        o.offer(&b, 1, 1, 1, T0);
        o.offer(&a, 2, 2, 1, T0);
        o.offer(&c, 1, 1, 1, T0);
        assert_eq!(o.len(), 2);
        assert!(o.hwm(&b).is_none(), "b was the least recently heard");
        assert!(o.origin_of(&tag_of(&a)).is_some());
        assert!(o.origin_of(&tag_of(&b)).is_none());
    }
}
