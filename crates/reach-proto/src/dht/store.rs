//! The record store: what this node holds for others.
//!
//! Limits protect honest records from a flooding publisher: a publisher may
//! hold at most [`StoreLimits::max_per_publisher`] records, a key at most
//! [`StoreLimits::max_per_key`], and the store at most
//! [`StoreLimits::max_records`]. When a limit is hit the *new* record is
//! refused: nothing already stored is ever evicted to make room, so flooding
//! cannot push honest records out. Expired records are dropped by
//! [`RecordStore::expire`].
//!
//! Identities are free, so per-publisher quotas alone do not stop one host
//! posing as a thousand publishers. Records stored for others therefore
//! also count against their sender's network ([`Source`]: the /24 or /48 the
//! storing request came from): one network may hold at most
//! [`StoreLimits::max_per_source`] records here and
//! [`StoreLimits::max_per_source_per_key`] at one key, so junk from one
//! network fills only its share and records from everyone else still fit.
//! And a node stores records only for keys it is among the k closest to
//! ([`among_closest`]), as Kademlia intends: a flooder cannot make one node
//! hold records for the whole keyspace.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use serde::Serialize;

use super::Key;
use super::record::{
    DeletionNotice, MAX_CLOCK_SKEW, MAX_MAILBOX_TTL, RecordError, RecordKind, SignedRecord,
};
use super::rpc::PageCursor;
use crate::PeerId;

/// Default: records held in total.
pub const MAX_RECORDS: usize = 65_536;
/// Default: records one publisher may hold here (one endpoint record, a few
/// dozen topics and mailbox messages).
pub const MAX_PER_PUBLISHER: usize = 64;
/// Default: records at one key (members of a topic, messages in a mailbox).
pub const MAX_PER_KEY: usize = 512;

/// Default: payload bytes held in total. Identities are free, so per-publisher
/// quotas alone would let many fake publishers fill memory (65,536 mailbox
/// records × 16 KiB ≈ 1 GiB); 64 MiB bounds it.
pub const MAX_BYTES: usize = 64 * 1024 * 1024;

/// Default: records one network ([`Source`]) may have stored here: a
/// sixteenth of the store, so a flood from one network leaves fifteen
/// sixteenths to the rest, while a network hosting many honest nodes
/// still stores thousands of records.
pub const MAX_PER_SOURCE: usize = MAX_RECORDS / 16;
/// Default: records one network may have stored at one key: an eighth of
/// a key's slots, so junk from one network can never block a topic or a
/// victim's mailbox at this node.
pub const MAX_PER_SOURCE_PER_KEY: usize = MAX_PER_KEY / 8;

/// Tombstones of deleted mailbox slots held at most. A tombstone costs
/// about 80 bytes, so the cap is a few MiB; it matches [`MAX_RECORDS`]
/// because most tombstones replace a record that was held. Past it, a
/// notice for a record held here still drops it (without a tombstone), and
/// a notice for one not held is refused with `quota_exceeded`.
pub const MAX_TOMBSTONES: usize = MAX_RECORDS;

/// How long a tombstone for a slot that was not held here lives: as long
/// as any record put later into that slot could (its longest lifetime plus
/// the clock skew we accept), so no lagging re-put outlives it.
pub const TOMBSTONE_UNHELD: std::time::Duration = MAX_MAILBOX_TTL.saturating_add(MAX_CLOCK_SKEW);

/// Tunables of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    /// Records stored in all ([`MAX_RECORDS`]).
    pub max_records: usize,
    /// Records one publisher may have here ([`MAX_PER_PUBLISHER`]).
    pub max_per_publisher: usize,
    /// Records at one key ([`MAX_PER_KEY`]).
    pub max_per_key: usize,
    /// Bytes of payload in all ([`MAX_BYTES`]).
    pub max_bytes: usize,
    /// Records one network may have here ([`MAX_PER_SOURCE`]).
    pub max_per_source: usize,
    /// Records one network may have at one key
    /// ([`MAX_PER_SOURCE_PER_KEY`]).
    pub max_per_source_per_key: usize,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            max_records: MAX_RECORDS,
            max_per_publisher: MAX_PER_PUBLISHER,
            max_per_key: MAX_PER_KEY,
            max_bytes: MAX_BYTES,
            max_per_source: MAX_PER_SOURCE,
            max_per_source_per_key: MAX_PER_SOURCE_PER_KEY,
        }
    }
}

/// The network a storing request came from, for the store's fairness
/// limits: the /24 of an IPv4 address (also IPv6-mapped), the /48 of an
/// IPv6 one. A loopback address counts on its own (it stands for one host
/// of a test or a lab, each on its own 127.x.y.z), the way the routing
/// table treats loopback as exempt from its per-/24 rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source([u8; 17]);

impl Source {
    /// The network `ip` belongs to.
    pub fn of(ip: IpAddr) -> Source {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let mut b = [0u8; 17];
        match ip {
            IpAddr::V4(v4) => {
                b[0] = 4;
                let o = v4.octets();
                let n = if v4.is_loopback() { 4 } else { 3 };
                b[1..1 + n].copy_from_slice(&o[..n]);
            }
            IpAddr::V6(v6) => {
                b[0] = 6;
                let o = v6.octets();
                let n = if v6.is_loopback() { 16 } else { 6 };
                b[1..1 + n].copy_from_slice(&o[..n]);
            }
        }
        Source(b)
    }
}

/// Records a node hands to one newcomer at most ([`RecordStore::handoff`]):
/// a burst the newcomer's store limits absorb, and enough for the records
/// whose closest holder we are in any network where a node holds a few
/// dozen.
pub const MAX_HANDOFF_RECORDS: usize = 64;

/// Whether a node at `own` is among the `k` closest to `key`, judged by the
/// `known` contacts' keys (its routing table's closest to `key`): it is when
/// it knows fewer than `k`, or when it is closer to `key` than the k-th
/// closest it knows. A node stores records only for such keys.
pub fn among_closest(own: &Key, key: &Key, known: &[Key], k: usize) -> bool {
    if known.len() < k || k == 0 {
        return true;
    }
    let mut d: Vec<super::Distance> = known.iter().map(|c| c.distance(key)).collect();
    d.sort_unstable();
    own.distance(key) < d[k - 1]
}

/// A stored record and the network it came from (`None`: stored locally,
/// e.g. our own).
#[derive(Debug, Clone)]
struct Held {
    record: SignedRecord,
    source: Option<Source>,
}

/// What `put` did with an accepted record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// A new record took a free slot.
    Stored,
    /// It replaced an older seq of the same publisher's slot.
    Replaced,
    /// Exactly this record was already stored.
    Unchanged,
}

/// What [`RecordStore::delete`] did with a valid deletion notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// The record was held: it is dropped and its slot tombstoned.
    Dropped,
    /// No such record was held: the slot is tombstoned, so a later put of
    /// it is refused.
    Tombstoned,
    /// The slot was already tombstoned (a replayed or repeated notice):
    /// nothing changes.
    AlreadyDeleted,
}

/// Records held for others.
#[derive(Debug, Default)]
pub struct RecordStore {
    limits: StoreLimits,
    by_key: HashMap<(RecordKind, Key), Vec<Held>>,
    per_publisher: HashMap<PeerId, usize>,
    per_source: HashMap<Source, usize>,
    total: usize,
    bytes: usize,
    rejections: BTreeMap<&'static str, u64>,
    /// Deleted mailbox slots (key, publisher, seq): until when (Unix ms)
    /// a put of them is refused, and the notice's signature (the proof a
    /// refused publisher is shown, see [`RecordStore::tombstone`]).
    tombstones: HashMap<(Key, PeerId, u64), (u64, Vec<u8>)>,
}

/// A snapshot for status pages.
#[derive(Debug, Clone, Serialize)]
pub struct StoreSummary {
    /// Records held.
    pub records: usize,
    /// Distinct (kind, key) pairs held.
    pub keys: usize,
    /// Distinct publishers held.
    pub publishers: usize,
    /// Refusals so far, by [`RecordError::kind`].
    pub rejections: BTreeMap<&'static str, u64>,
}

impl RecordStore {
    /// An empty store with these limits.
    pub fn new(limits: StoreLimits) -> Self {
        RecordStore {
            limits,
            ..Default::default()
        }
    }

    fn same_slot(kind: RecordKind, a: &SignedRecord, b: &SignedRecord) -> bool {
        a.publisher == b.publisher && (kind != RecordKind::Mailbox || a.seq == b.seq)
    }

    /// Validates and stores `record`, a record of this node's own (no
    /// fairness limits). `now_ms` is Unix time.
    pub fn put(&mut self, record: SignedRecord, now_ms: u64) -> Result<PutOutcome, RecordError> {
        self.put_from(record, None, now_ms)
    }

    /// Validates and stores `record` that a peer at `source` asked this
    /// node to hold (see the module docs for the limits).
    pub fn put_from(
        &mut self,
        record: SignedRecord,
        source: Option<Source>,
        now_ms: u64,
    ) -> Result<PutOutcome, RecordError> {
        let res = self.try_put(record, source, now_ms);
        if let Err(e) = &res {
            *self.rejections.entry(e.kind()).or_default() += 1;
        }
        res
    }

    fn try_put(
        &mut self,
        record: SignedRecord,
        source: Option<Source>,
        now_ms: u64,
    ) -> Result<PutOutcome, RecordError> {
        record.validate(now_ms)?;
        let kind = record.kind;
        if kind == RecordKind::Mailbox
            && self
                .tombstones
                .get(&(record.key, record.publisher, record.seq))
                .is_some_and(|&(until, _)| until > now_ms)
        {
            return Err(RecordError::Deleted);
        }
        let slot = self.by_key.get(&(kind, record.key));
        if let Some(existing) = slot.and_then(|v| {
            v.iter()
                .map(|h| &h.record)
                .find(|r| Self::same_slot(kind, r, &record))
        }) {
            if existing == &record {
                return Ok(PutOutcome::Unchanged);
            }
            if kind == RecordKind::Mailbox || record.seq <= existing.seq {
                // A mailbox slot is (publisher, seq): different content under
                // the same seq is a replay.
                return Err(RecordError::Stale);
            }
            // A newer version takes the old one's place (and its count
            // against the network that first stored it).
            let v = self.by_key.entry((kind, record.key)).or_default();
            if let Some(h) = v
                .iter_mut()
                .find(|h| Self::same_slot(kind, &h.record, &record))
            {
                self.bytes = self.bytes - h.record.payload.len() + record.payload.len();
                h.record = record;
            }
            return Ok(PutOutcome::Replaced);
        }
        let publisher_count = self
            .per_publisher
            .get(&record.publisher)
            .copied()
            .unwrap_or(0);
        let key_count = slot.map_or(0, Vec::len);
        if publisher_count >= self.limits.max_per_publisher
            || key_count >= self.limits.max_per_key
            || self.total >= self.limits.max_records
            || self.bytes + record.payload.len() > self.limits.max_bytes
        {
            return Err(RecordError::QuotaExceeded);
        }
        if let Some(src) = source {
            let at_key = slot.map_or(0, |v| v.iter().filter(|h| h.source == source).count());
            if self.per_source.get(&src).copied().unwrap_or(0) >= self.limits.max_per_source
                || at_key >= self.limits.max_per_source_per_key
            {
                return Err(RecordError::SourceQuotaExceeded);
            }
            *self.per_source.entry(src).or_default() += 1;
        }
        *self.per_publisher.entry(record.publisher).or_default() += 1;
        self.total += 1;
        self.bytes += record.payload.len();
        self.by_key
            .entry((kind, record.key))
            .or_default()
            .push(Held { record, source });
        Ok(PutOutcome::Stored)
    }

    /// Live records of `kind` at `key`.
    pub fn get(&self, kind: RecordKind, key: &Key, now_ms: u64) -> Vec<SignedRecord> {
        self.by_key
            .get(&(kind, *key))
            .map(|v| {
                v.iter()
                    .map(|h| &h.record)
                    .filter(|r| r.expires_ms() > now_ms)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Live records of `kind` at `key` after `after`, in (publisher, seq)
    /// order: one page of every value under the key. At most `max_records`
    /// records and `max_bytes` bytes (each counted as its payload plus
    /// `overhead`), but always at least one if any remain, so paging
    /// advances. The cursor is the last record returned when more remain.
    #[allow(clippy::too_many_arguments)]
    pub fn page(
        &self,
        kind: RecordKind,
        key: &Key,
        after: Option<PageCursor>,
        now_ms: u64,
        max_records: usize,
        max_bytes: usize,
        overhead: usize,
    ) -> (Vec<SignedRecord>, Option<PageCursor>) {
        let mut live: Vec<&SignedRecord> = self
            .by_key
            .get(&(kind, *key))
            .map(|v| {
                v.iter()
                    .map(|h| &h.record)
                    .filter(|r| r.expires_ms() > now_ms)
                    .filter(|r| after.is_none_or(|c| PageCursor::of(r) > c))
                    .collect()
            })
            .unwrap_or_default();
        live.sort_by_key(|r| PageCursor::of(r));
        let mut out = Vec::new();
        let mut bytes = 0;
        for r in &live {
            let size = r.payload.len() + overhead;
            if !out.is_empty() && (out.len() >= max_records || bytes + size > max_bytes) {
                break;
            }
            bytes += size;
            out.push((*r).clone());
        }
        let next = if out.len() < live.len() {
            out.last().map(PageCursor::of)
        } else {
            None
        };
        (out, next)
    }

    /// Applies a signed deletion notice: drops the record it names and
    /// tombstones its slot until the record would have expired (or, when
    /// not held, for [`TOMBSTONE_UNHELD`]), so a lagging re-put of it is
    /// refused with [`RecordError::Deleted`]. Refusals (forged signature,
    /// a kind that is not deletable, no room for a tombstone) are counted
    /// like put refusals.
    pub fn delete(
        &mut self,
        notice: &DeletionNotice,
        now_ms: u64,
    ) -> Result<DeleteOutcome, RecordError> {
        let res = self.try_delete(notice, now_ms);
        if let Err(e) = &res {
            *self.rejections.entry(e.kind()).or_default() += 1;
        }
        res
    }

    fn try_delete(
        &mut self,
        notice: &DeletionNotice,
        now_ms: u64,
    ) -> Result<DeleteOutcome, RecordError> {
        notice.validate()?;
        let slot = (notice.key, notice.publisher, notice.seq);
        if self.tombstones.get(&slot).is_some_and(|&(t, _)| t > now_ms) {
            return Ok(DeleteOutcome::AlreadyDeleted);
        }
        let held = self
            .by_key
            .get_mut(&(notice.kind, notice.key))
            .and_then(|v| {
                let i = v.iter().position(|h| {
                    h.record.publisher == notice.publisher && h.record.seq == notice.seq
                })?;
                let h = v.swap_remove(i);
                Some(h)
            });
        match held {
            Some(h) => {
                if self
                    .by_key
                    .get(&(notice.kind, notice.key))
                    .is_some_and(Vec::is_empty)
                {
                    self.by_key.remove(&(notice.kind, notice.key));
                }
                self.forget(&h);
                if self.tombstones.len() < MAX_TOMBSTONES {
                    self.tombstones
                        .insert(slot, (h.record.expires_ms(), notice.signature.clone()));
                }
                Ok(DeleteOutcome::Dropped)
            }
            None => {
                if self.tombstones.len() >= MAX_TOMBSTONES {
                    return Err(RecordError::QuotaExceeded);
                }
                let until = now_ms.saturating_add(TOMBSTONE_UNHELD.as_millis() as u64);
                self.tombstones
                    .insert(slot, (until, notice.signature.clone()));
                Ok(DeleteOutcome::Tombstoned)
            }
        }
    }

    /// Takes a dropped record out of the counts.
    fn forget(&mut self, h: &Held) {
        if let Some(s) = &h.source
            && let Some(n) = self.per_source.get_mut(s)
        {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(s);
            }
        }
        if let Some(n) = self.per_publisher.get_mut(&h.record.publisher) {
            *n -= 1;
            if *n == 0 {
                self.per_publisher.remove(&h.record.publisher);
            }
        }
        self.total -= 1;
        self.bytes -= h.record.payload.len();
    }

    /// The deletion notice behind the live tombstone of `record`'s slot,
    /// if any: what a storer answers a put of a deleted record with, so
    /// its publisher can check that the deletion was signed with the
    /// record's key (for a mailbox record: that the recipient has it).
    pub fn tombstone(&self, record: &SignedRecord, now_ms: u64) -> Option<DeletionNotice> {
        let (until, sig) = self
            .tombstones
            .get(&(record.key, record.publisher, record.seq))?;
        (*until > now_ms).then(|| DeletionNotice {
            kind: RecordKind::Mailbox,
            key: record.key,
            publisher: record.publisher,
            seq: record.seq,
            signature: sig.clone(),
        })
    }

    /// Tombstones held (deleted mailbox slots not yet expired).
    pub fn tombstones(&self) -> usize {
        self.tombstones.len()
    }

    /// Drops expired records (and expired tombstones); returns how many
    /// records.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        self.tombstones.retain(|_, (until, _)| *until > now_ms);
        let mut dropped = Vec::new();
        let mut sources = Vec::new();
        let mut freed = 0;
        self.by_key.retain(|_, v| {
            v.retain(|h| {
                let live = h.record.expires_ms() > now_ms;
                if !live {
                    dropped.push(h.record.publisher);
                    sources.extend(h.source);
                    freed += h.record.payload.len();
                }
                live
            });
            !v.is_empty()
        });
        for s in &sources {
            if let Some(n) = self.per_source.get_mut(s) {
                *n -= 1;
                if *n == 0 {
                    self.per_source.remove(s);
                }
            }
        }
        for p in &dropped {
            if let Some(n) = self.per_publisher.get_mut(p) {
                *n -= 1;
                if *n == 0 {
                    self.per_publisher.remove(p);
                }
            }
        }
        self.total -= dropped.len();
        self.bytes -= freed;
        dropped.len()
    }

    /// Every stored record (for replication to new neighbours).
    pub fn iter(&self) -> impl Iterator<Item = &SignedRecord> {
        self.by_key.values().flatten().map(|h| &h.record)
    }

    /// The records to hand to `newcomer`, a contact just added to our
    /// routing table: Kademlia's rule for a network that grows. A record
    /// stored while the network was small sits at nodes that are no longer
    /// its closest, and a lookup that ends at the new closest nodes would
    /// miss it until its publisher republishes (minutes to an hour). A
    /// record goes to the newcomer when the newcomer is among the `k`
    /// closest to its key, and no contact we know but the newcomer is
    /// closer to the key than we are: of the nodes holding it, about one
    /// (the closest) sends it. `closest_known(key)` gives our routing
    /// table's `k` closest contacts to `key`. At most `max`, nearest to
    /// the newcomer first; expired records are not handed on.
    pub fn handoff(
        &self,
        own: &Key,
        newcomer: &Key,
        now_ms: u64,
        k: usize,
        max: usize,
        mut closest_known: impl FnMut(&Key) -> Vec<Key>,
    ) -> Vec<SignedRecord> {
        let mut out: Vec<&SignedRecord> = self
            .iter()
            .filter(|r| r.expires_ms() > now_ms)
            .filter(|r| {
                let known: Vec<Key> = closest_known(&r.key)
                    .into_iter()
                    .filter(|c| c != newcomer && c != own)
                    .collect();
                let ours = own.distance(&r.key);
                let theirs = newcomer.distance(&r.key);
                let we_are_closest_holder = known.iter().all(|c| c.distance(&r.key) > ours);
                // Among the k closest of everyone we know, ourselves included.
                let closer_than_newcomer =
                    known.iter().filter(|c| c.distance(&r.key) < theirs).count()
                        + usize::from(ours < theirs);
                we_are_closest_holder && closer_than_newcomer < k
            })
            .collect();
        out.sort_by_key(|r| newcomer.distance(&r.key));
        out.into_iter().take(max).cloned().collect()
    }

    /// Records stored here on behalf of the network `source`. Only the
    /// tests read it (the per-source share is enforced inside `put_from`).
    #[cfg(test)]
    fn held_for(&self, source: &Source) -> usize {
        self.per_source.get(source).copied().unwrap_or(0)
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.total
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Refusals so far, by reason.
    pub fn rejections(&self) -> &BTreeMap<&'static str, u64> {
        &self.rejections
    }

    /// Counts a refusal that happened before `put` (e.g. an undecodable
    /// record on the wire).
    pub fn count_rejection(&mut self, e: &RecordError) {
        *self.rejections.entry(e.kind()).or_default() += 1;
    }

    /// Counts for a status page.
    pub fn summary(&self) -> StoreSummary {
        StoreSummary {
            records: self.total,
            keys: self.by_key.len(),
            publishers: self.per_publisher.len(),
            rejections: self.rejections.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Keypair;
    use crate::dht::K;
    use crate::dht::record::{AddrKind, DeletionNotice, TypedAddr};
    use std::time::Duration;

    const NOW: u64 = 1_800_000_000_000;
    const HOUR: Duration = Duration::from_secs(3600);

    fn endpoint(kp: &Keypair, seq: u64, port: u16) -> SignedRecord {
        let addrs = vec![TypedAddr {
            kind: AddrKind::Direct,
            addr: std::net::SocketAddr::from(([198, 51, 100, 1], port)),
            via: None,
        }];
        SignedRecord::endpoint(kp, addrs, seq, NOW, HOUR)
    }

    #[test]
    fn newer_seq_replaces_older_is_refused_same_is_unchanged() {
        let mut s = RecordStore::default();
        let kp = Keypair::generate();
        assert_eq!(s.put(endpoint(&kp, 5, 1), NOW), Ok(PutOutcome::Stored));
        assert_eq!(s.put(endpoint(&kp, 5, 1), NOW), Ok(PutOutcome::Unchanged));
        assert_eq!(s.put(endpoint(&kp, 4, 2), NOW), Err(RecordError::Stale));
        assert_eq!(s.put(endpoint(&kp, 5, 3), NOW), Err(RecordError::Stale));
        assert_eq!(s.put(endpoint(&kp, 6, 4), NOW), Ok(PutOutcome::Replaced));
        let got = s.get(RecordKind::Endpoint, &Key::for_peer(&kp.peer_id()), NOW);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].seq, 6);
        assert_eq!(s.len(), 1);
        assert_eq!(s.rejections().get("stale_seq"), Some(&2));
    }

    #[test]
    fn a_record_is_handed_to_a_closer_newcomer_by_its_closest_holder_only() {
        let mut s = RecordStore::default();
        let owner = Keypair::generate();
        let rec = endpoint(&owner, 1, 1);
        let key = rec.key;
        s.put(rec, NOW).unwrap();
        // Keys at chosen distances from the record's key: flip one bit, the
        // higher the bit, the farther.
        let at = |bit: usize| {
            let mut b = key.0;
            b[bit / 8] ^= 0x80 >> (bit % 8);
            Key(b)
        };
        let (own, near, nearer, far) = (at(40), at(60), at(100), at(10));
        let table = |others: Vec<Key>| move |_: &Key| others.clone();
        // We hold it, nobody we know is closer: a closer newcomer gets it.
        let got = s.handoff(&own, &near, NOW, K, 8, table(vec![far, near]));
        assert_eq!(got.len(), 1);
        // Someone we know is closer than us: that node hands it over, not us.
        assert!(
            s.handoff(&own, &near, NOW, K, 8, table(vec![nearer, near]))
                .is_empty()
        );
        // We are the closest holder, but the newcomer is not among the k
        // closest we know of: it gets nothing; with a larger k it would.
        let closest = at(200);
        let crowd = vec![at(20), at(30), far];
        assert!(
            s.handoff(&closest, &far, NOW, 3, 8, table(crowd.clone()))
                .is_empty()
        );
        assert_eq!(s.handoff(&closest, &far, NOW, 4, 8, table(crowd)).len(), 1);
        // Expired records are not handed on.
        let later = NOW + 2 * HOUR.as_millis() as u64;
        assert!(
            s.handoff(&own, &near, later, K, 8, table(vec![near]))
                .is_empty()
        );
        // The cap holds.
        assert!(
            s.handoff(&own, &near, NOW, K, 0, table(vec![near]))
                .is_empty()
        );
    }

    #[test]
    fn topics_aggregate_many_publishers() {
        let mut s = RecordStore::default();
        for _ in 0..10 {
            let kp = Keypair::generate();
            s.put(SignedRecord::topic(&kp, "room", 1, NOW, HOUR), NOW)
                .unwrap();
        }
        assert_eq!(
            s.get(RecordKind::Topic, &Key::for_topic("room"), NOW).len(),
            10
        );
    }

    #[test]
    fn a_flooding_publisher_hits_its_quota_and_evicts_nobody() {
        let limits = StoreLimits {
            max_records: 100,
            max_per_publisher: 8,
            max_per_key: 50,
            ..StoreLimits::default()
        };
        let mut s = RecordStore::new(limits);
        let honest = Keypair::generate();
        s.put(endpoint(&honest, 1, 1), NOW).unwrap();
        let flooder = Keypair::generate();
        let mut refused = 0;
        for i in 0..1000 {
            let r = SignedRecord::topic(&flooder, &format!("t{i}"), 1, NOW, HOUR);
            if s.put(r, NOW) == Err(RecordError::QuotaExceeded) {
                refused += 1;
            }
        }
        assert_eq!(refused, 1000 - 8);
        assert_eq!(
            s.get(RecordKind::Endpoint, &Key::for_peer(&honest.peer_id()), NOW)
                .len(),
            1
        );
        // Many flooders: the total cap refuses, still evicting nobody.
        for _ in 0..50 {
            let kp = Keypair::generate();
            for i in 0..8 {
                let _ = s.put(
                    SignedRecord::topic(&kp, &format!("x{i}"), 1, NOW, HOUR),
                    NOW,
                );
            }
        }
        assert_eq!(s.len(), 100);
        assert_eq!(
            s.get(RecordKind::Endpoint, &Key::for_peer(&honest.peer_id()), NOW)
                .len(),
            1
        );
    }

    #[test]
    fn the_byte_budget_bounds_memory_against_many_publishers() {
        let limits = StoreLimits {
            max_bytes: 40 * 1024,
            ..StoreLimits::default()
        };
        let mut s = RecordStore::new(limits);
        let key = Key([3; 32]);
        let mut stored = 0;
        for _ in 0..10 {
            let kp = Keypair::generate();
            let r = SignedRecord::sign(
                &kp,
                RecordKind::Mailbox,
                key,
                1,
                NOW,
                HOUR,
                vec![0; 16 * 1024],
            );
            if s.put(r, NOW).is_ok() {
                stored += 1;
            }
        }
        assert_eq!(
            stored, 2,
            "two 16 KiB payloads fit in 40 KiB, a third does not"
        );
        assert_eq!(s.expire(NOW + 2 * 3_600_000), 2);
        let kp = Keypair::generate();
        let r = SignedRecord::sign(
            &kp,
            RecordKind::Mailbox,
            key,
            1,
            NOW + 2 * 3_600_000,
            HOUR,
            vec![0; 16 * 1024],
        );
        assert!(
            s.put(r, NOW + 2 * 3_600_000).is_ok(),
            "expiry frees the budget"
        );
    }

    #[test]
    fn bad_records_are_counted_by_reason() {
        let mut s = RecordStore::default();
        let kp = Keypair::generate();
        let mut bad = endpoint(&kp, 1, 1);
        bad.signature[0] ^= 1;
        assert_eq!(s.put(bad, NOW), Err(RecordError::BadSignature));
        assert_eq!(s.rejections().get("bad_signature"), Some(&1));
        assert!(s.is_empty());
    }

    #[test]
    fn expiry_drops_records_and_frees_quota() {
        let mut s = RecordStore::default();
        let kp = Keypair::generate();
        s.put(endpoint(&kp, 1, 1), NOW).unwrap();
        let later = NOW + 2 * 3_600_000;
        assert!(
            s.get(RecordKind::Endpoint, &Key::for_peer(&kp.peer_id()), later)
                .is_empty()
        );
        assert_eq!(s.expire(later), 1);
        assert!(s.is_empty());
        assert_eq!(s.summary().publishers, 0);
    }

    #[test]
    fn mailbox_holds_many_messages_per_sender() {
        let mut s = RecordStore::default();
        let sender = Keypair::generate();
        let key = Key::for_peer(&Keypair::generate().peer_id());
        for seq in 1..=3 {
            let r = SignedRecord::sign(
                &sender,
                RecordKind::Mailbox,
                key,
                seq,
                NOW,
                HOUR,
                vec![seq as u8],
            );
            assert_eq!(s.put(r, NOW), Ok(PutOutcome::Stored));
        }
        let replay = SignedRecord::sign(&sender, RecordKind::Mailbox, key, 2, NOW, HOUR, vec![9]);
        assert_eq!(s.put(replay, NOW), Err(RecordError::Stale));
        assert_eq!(s.get(RecordKind::Mailbox, &key, NOW).len(), 3);
    }

    fn src(ip: &str) -> Option<Source> {
        Some(Source::of(ip.parse().unwrap()))
    }

    #[test]
    fn one_network_fills_only_its_share_and_others_still_store() {
        let limits = StoreLimits {
            max_per_source: 100,
            max_per_source_per_key: 8,
            ..StoreLimits::default()
        };
        let mut s = RecordStore::new(limits);
        let victim = Key::for_peer(&Keypair::generate().peer_id());
        let flood = src("198.51.100.7");
        let (mut stored, mut refused) = (0, 0);
        // 1,000 throwaway identities, 10 records each, from one host:
        // mailbox junk at the victim's key, and topics.
        for n in 0..1000 {
            let kp = Keypair::generate();
            for i in 0..10u64 {
                let r = if i < 2 {
                    SignedRecord::sign(&kp, RecordKind::Mailbox, victim, i + 1, NOW, HOUR, vec![1])
                } else {
                    SignedRecord::topic(&kp, &format!("junk-{n}-{i}"), 1, NOW, HOUR)
                };
                match s.put_from(r, flood, NOW) {
                    Ok(_) => stored += 1,
                    Err(RecordError::SourceQuotaExceeded) => refused += 1,
                    Err(e) => panic!("unexpected refusal {e}"),
                }
            }
        }
        assert_eq!(stored, 100, "the network got exactly its share");
        assert_eq!(refused, 10_000 - 100);
        assert_eq!(
            s.held_for(&Source::of("198.51.100.7".parse().unwrap())),
            100
        );
        assert_eq!(s.get(RecordKind::Mailbox, &victim, NOW).len(), 8);
        // The same /24 shares the share.
        let kp = Keypair::generate();
        assert_eq!(
            s.put_from(endpoint(&kp, 1, 1), src("198.51.100.200"), NOW),
            Err(RecordError::SourceQuotaExceeded)
        );
        // An honest sender on another network: its endpoint record and a
        // message into the victim's mailbox are both accepted.
        let honest = Keypair::generate();
        assert_eq!(
            s.put_from(endpoint(&honest, 1, 1), src("203.0.113.5"), NOW),
            Ok(PutOutcome::Stored)
        );
        let mail = SignedRecord::sign(&honest, RecordKind::Mailbox, victim, 1, NOW, HOUR, vec![7]);
        assert_eq!(
            s.put_from(mail, src("203.0.113.5"), NOW),
            Ok(PutOutcome::Stored)
        );
        assert_eq!(s.get(RecordKind::Mailbox, &victim, NOW).len(), 9);
        assert_eq!(s.rejections().get("source_quota_exceeded"), Some(&9901));
        // Records stored locally (our own) are not counted against anyone.
        assert_eq!(
            s.put(endpoint(&Keypair::generate(), 1, 1), NOW),
            Ok(PutOutcome::Stored)
        );
    }

    #[test]
    fn expiry_gives_a_network_its_share_back() {
        let limits = StoreLimits {
            max_per_source: 2,
            ..StoreLimits::default()
        };
        let mut s = RecordStore::new(limits);
        let from = src("192.0.2.1");
        for _ in 0..2 {
            s.put_from(endpoint(&Keypair::generate(), 1, 1), from, NOW)
                .unwrap();
        }
        let late = endpoint(&Keypair::generate(), 1, 1);
        assert_eq!(
            s.put_from(late, from, NOW),
            Err(RecordError::SourceQuotaExceeded)
        );
        let later = NOW + 2 * 3_600_000;
        assert_eq!(s.expire(later), 2);
        let kp = Keypair::generate();
        let r = SignedRecord::endpoint(&kp, vec![], 1, later, HOUR);
        assert_eq!(s.put_from(r, from, later), Ok(PutOutcome::Stored));
        // A newer version of a stored record replaces it within the share.
        let r2 = SignedRecord::endpoint(&kp, vec![], 2, later, HOUR);
        assert_eq!(s.put_from(r2, from, later), Ok(PutOutcome::Replaced));
        assert_eq!(s.held_for(&Source::of("192.0.2.9".parse().unwrap())), 1);
    }

    #[test]
    fn sources_are_networks_and_loopback_addresses_count_apart() {
        let of = |s: &str| Source::of(s.parse().unwrap());
        assert_eq!(of("198.51.100.1"), of("198.51.100.254"));
        assert_eq!(of("198.51.100.1"), of("::ffff:198.51.100.9"));
        assert_ne!(of("198.51.100.1"), of("198.51.101.1"));
        assert_eq!(of("2001:db8:1:1::1"), of("2001:db8:1:ffff::2"));
        assert_ne!(of("2001:db8:1::1"), of("2001:db8:2::1"));
        assert_ne!(of("127.0.0.1"), of("127.0.0.2"));
        assert_eq!(of("127.0.0.1"), of("::ffff:127.0.0.1"));
    }

    fn mail(kp: &Keypair, key: Key, seq: u64, len: usize) -> SignedRecord {
        SignedRecord::sign(
            kp,
            RecordKind::Mailbox,
            key,
            seq,
            NOW,
            HOUR,
            vec![seq as u8; len],
        )
    }

    #[test]
    fn paging_returns_every_record_once_in_order() {
        let mut s = RecordStore::default();
        let key = Key([9; 32]);
        let mut all = Vec::new();
        for _ in 0..40 {
            let kp = Keypair::generate();
            for seq in 1..=3 {
                let r = mail(&kp, key, seq, 1000);
                s.put(r.clone(), NOW).unwrap();
                all.push(r);
            }
        }
        // Another key's and another kind's records are not in the pages.
        s.put(mail(&Keypair::generate(), Key([8; 32]), 1, 10), NOW)
            .unwrap();
        let (mut got, mut after, mut pages) = (Vec::new(), None, 0);
        loop {
            let (page, next) = s.page(RecordKind::Mailbox, &key, after, NOW, 16, 8 * 1024, 200);
            assert!(!page.is_empty());
            assert!(page.len() <= 16);
            assert!(page.iter().map(|r| r.payload.len() + 200).sum::<usize>() <= 8 * 1024);
            got.extend(page);
            pages += 1;
            match next {
                Some(c) => after = Some(c),
                None => break,
            }
            assert!(pages < 100, "paging does not advance");
        }
        assert_eq!(got.len(), all.len(), "every record, none twice");
        let cursors: Vec<PageCursor> = got.iter().map(PageCursor::of).collect();
        assert!(cursors.windows(2).all(|w| w[0] < w[1]), "strictly ordered");
        all.sort_by_key(PageCursor::of);
        assert_eq!(got, all);
        assert!(
            pages >= 120 / 7,
            "8 KiB pages hold 7 records: {pages} pages"
        );
        // A record bigger than a page still comes, alone, so paging advances.
        let big_key = Key([7; 32]);
        s.put(mail(&Keypair::generate(), big_key, 1, 16 * 1024), NOW)
            .unwrap();
        let (page, next) = s.page(RecordKind::Mailbox, &big_key, None, NOW, 16, 1024, 200);
        assert_eq!((page.len(), next), (1, None));
        // Expired records are not paged.
        let later = NOW + 2 * HOUR.as_millis() as u64;
        assert!(
            s.page(RecordKind::Mailbox, &key, None, later, 16, 8192, 200)
                .0
                .is_empty()
        );
    }

    #[test]
    fn a_signed_deletion_drops_the_record_and_forged_or_replayed_ones_do_nothing() {
        let mut s = RecordStore::default();
        let key = Key([5; 32]);
        let throwaway = Keypair::generate();
        let r1 = mail(&throwaway, key, 1, 100);
        let r2 = mail(&throwaway, key, 2, 100);
        s.put(r1.clone(), NOW).unwrap();
        s.put(r2.clone(), NOW).unwrap();
        assert_eq!(s.len(), 2);

        // Forged: signed by someone else, or a valid signature moved to
        // another slot, or a truncated signature.
        let mallory = Keypair::generate();
        let mut forged = DeletionNotice::sign(&mallory, RecordKind::Mailbox, key, 1);
        forged.publisher = throwaway.peer_id();
        assert_eq!(s.delete(&forged, NOW), Err(RecordError::BadSignature));
        let mut moved = DeletionNotice::for_record(&throwaway, &r1);
        moved.seq = 2;
        assert_eq!(s.delete(&moved, NOW), Err(RecordError::BadSignature));
        let mut short = DeletionNotice::for_record(&throwaway, &r1);
        short.signature.truncate(10);
        assert_eq!(s.delete(&short, NOW), Err(RecordError::BadSignature));
        assert_eq!(s.len(), 2, "nothing dropped by forgeries");
        assert_eq!(s.rejections().get("bad_signature"), Some(&3));

        // Only mailbox records are deletable.
        let owner = Keypair::generate();
        s.put(endpoint(&owner, 1, 1), NOW).unwrap();
        let n = DeletionNotice::sign(
            &owner,
            RecordKind::Endpoint,
            Key::for_peer(&owner.peer_id()),
            1,
        );
        assert_eq!(s.delete(&n, NOW), Err(RecordError::NotDeletable));
        assert_eq!(s.len(), 3);

        // Valid: r1 goes, r2 stays, quotas are given back.
        let valid = DeletionNotice::for_record(&throwaway, &r1);
        assert_eq!(s.delete(&valid, NOW), Ok(DeleteOutcome::Dropped));
        assert_eq!(s.get(RecordKind::Mailbox, &key, NOW), vec![r2.clone()]);
        assert_eq!(s.len(), 2);
        assert_eq!(s.summary().records, 2);
        // Replayed: no effect, no error.
        assert_eq!(s.delete(&valid, NOW), Ok(DeleteOutcome::AlreadyDeleted));
        assert_eq!(s.get(RecordKind::Mailbox, &key, NOW), vec![r2]);
        assert_eq!(s.tombstones(), 1);
        // The last record at the key: the key goes too.
        let n2 = DeletionNotice::sign(&throwaway, RecordKind::Mailbox, key, 2);
        assert_eq!(s.delete(&n2, NOW), Ok(DeleteOutcome::Dropped));
        assert_eq!(s.summary().keys, 1, "only the endpoint's key is left");
        assert_eq!(s.summary().publishers, 1);
    }

    #[test]
    fn a_tombstone_refuses_the_deleted_slot_until_it_would_have_expired() {
        let mut s = RecordStore::default();
        let key = Key([6; 32]);
        let throwaway = Keypair::generate();
        let r = mail(&throwaway, key, 1, 100);
        s.put(r.clone(), NOW).unwrap();
        s.delete(&DeletionNotice::for_record(&throwaway, &r), NOW)
            .unwrap();
        // A lagging re-deposit of the same record cannot resurrect it, and
        // its publisher is shown the signed notice.
        assert_eq!(s.put(r.clone(), NOW + 1000), Err(RecordError::Deleted));
        let proof = s.tombstone(&r, NOW + 1000).unwrap();
        assert_eq!(proof, DeletionNotice::for_record(&throwaway, &r));
        assert_eq!(proof.validate(), Ok(()));
        assert_eq!(s.rejections().get("deleted"), Some(&1));
        // Another slot of the same publisher is not affected.
        assert_eq!(
            s.put(mail(&throwaway, key, 2, 100), NOW),
            Ok(PutOutcome::Stored)
        );
        // Once the record would have expired, the tombstone goes.
        let later = r.expires_ms();
        s.expire(later);
        assert_eq!(s.tombstones(), 0);

        // A notice that arrives before the record (the recipient's storer
        // set differs from the sender's): the slot is tombstoned anyway and
        // the later put is refused.
        let t2 = Keypair::generate();
        let early = DeletionNotice::sign(&t2, RecordKind::Mailbox, key, 1);
        assert_eq!(s.delete(&early, NOW), Ok(DeleteOutcome::Tombstoned));
        assert_eq!(s.put(mail(&t2, key, 1, 10), NOW), Err(RecordError::Deleted));
        // That tombstone outlives any record that could be put later.
        let unheld_until = NOW + TOMBSTONE_UNHELD.as_millis() as u64;
        s.expire(unheld_until - 1);
        assert_eq!(s.tombstones(), 1);
        s.expire(unheld_until);
        assert_eq!(s.tombstones(), 0);
    }

    #[test]
    fn a_node_stores_only_for_keys_it_is_among_the_closest_to() {
        let own = Key([0; 32]);
        let near = Key([0, 0, 0, 1]
            .iter()
            .copied()
            .chain([0; 28])
            .collect::<Vec<u8>>()
            .try_into()
            .unwrap());
        let mut far = [0u8; 32];
        far[0] = 0x80;
        let far = Key(far);
        // Known contacts all sit around `far`.
        let known: Vec<Key> = (1..=30u8)
            .map(|i| {
                let mut k = far.0;
                k[31] = i;
                Key(k)
            })
            .collect();
        assert!(among_closest(&own, &near, &known, 20), "near us: ours");
        assert!(
            !among_closest(&own, &far, &known, 20),
            "20 known are closer"
        );
        assert!(
            among_closest(&own, &far, &known[..19], 20),
            "knowing fewer than k, we may be among the k closest"
        );
        // Closer than the k-th: accepted, even with closer ones known.
        assert!(among_closest(&known[0], &far, &known[1..], 20));
    }
}
