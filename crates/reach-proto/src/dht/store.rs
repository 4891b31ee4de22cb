//! The record store: what this node holds for others.
//!
//! Limits protect honest records from a flooding publisher: a publisher may
//! hold at most [`StoreLimits::max_per_publisher`] records, a key at most
//! [`StoreLimits::max_per_key`], and the store at most
//! [`StoreLimits::max_records`]. When a limit is hit the *new* record is
//! refused: nothing already stored is ever evicted to make room, so flooding
//! cannot push honest records out. Expired records are dropped by
//! [`RecordStore::expire`].

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::Key;
use super::record::{RecordError, RecordKind, SignedRecord};
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

/// Tunables of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    pub max_records: usize,
    pub max_per_publisher: usize,
    pub max_per_key: usize,
    pub max_bytes: usize,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            max_records: MAX_RECORDS,
            max_per_publisher: MAX_PER_PUBLISHER,
            max_per_key: MAX_PER_KEY,
            max_bytes: MAX_BYTES,
        }
    }
}

/// What `put` did with an accepted record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Stored,
    Replaced,
    /// Exactly this record was already stored.
    Unchanged,
}

/// Records held for others.
#[derive(Debug, Default)]
pub struct RecordStore {
    limits: StoreLimits,
    by_key: HashMap<(RecordKind, Key), Vec<SignedRecord>>,
    per_publisher: HashMap<PeerId, usize>,
    total: usize,
    bytes: usize,
    rejections: BTreeMap<&'static str, u64>,
}

/// A snapshot for status pages.
#[derive(Debug, Clone, Serialize)]
pub struct StoreSummary {
    pub records: usize,
    pub keys: usize,
    pub publishers: usize,
    pub rejections: BTreeMap<&'static str, u64>,
}

impl RecordStore {
    pub fn new(limits: StoreLimits) -> Self {
        RecordStore {
            limits,
            ..Default::default()
        }
    }

    fn same_slot(kind: RecordKind, a: &SignedRecord, b: &SignedRecord) -> bool {
        a.publisher == b.publisher && (kind != RecordKind::Mailbox || a.seq == b.seq)
    }

    /// Validates and stores `record`. `now_ms` is Unix time.
    pub fn put(&mut self, record: SignedRecord, now_ms: u64) -> Result<PutOutcome, RecordError> {
        let res = self.try_put(record, now_ms);
        if let Err(e) = &res {
            *self.rejections.entry(e.kind()).or_default() += 1;
        }
        res
    }

    fn try_put(&mut self, record: SignedRecord, now_ms: u64) -> Result<PutOutcome, RecordError> {
        record.validate(now_ms)?;
        let kind = record.kind;
        let slot = self.by_key.get(&(kind, record.key));
        if let Some(existing) =
            slot.and_then(|v| v.iter().find(|r| Self::same_slot(kind, r, &record)))
        {
            if existing == &record {
                return Ok(PutOutcome::Unchanged);
            }
            if kind == RecordKind::Mailbox || record.seq <= existing.seq {
                // A mailbox slot is (publisher, seq): different content under
                // the same seq is a replay.
                return Err(RecordError::Stale);
            }
            let v = self.by_key.entry((kind, record.key)).or_default();
            if let Some(r) = v.iter_mut().find(|r| Self::same_slot(kind, r, &record)) {
                self.bytes = self.bytes - r.payload.len() + record.payload.len();
                *r = record;
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
        *self.per_publisher.entry(record.publisher).or_default() += 1;
        self.total += 1;
        self.bytes += record.payload.len();
        self.by_key
            .entry((kind, record.key))
            .or_default()
            .push(record);
        Ok(PutOutcome::Stored)
    }

    /// Live records of `kind` at `key`.
    pub fn get(&self, kind: RecordKind, key: &Key, now_ms: u64) -> Vec<SignedRecord> {
        self.by_key
            .get(&(kind, *key))
            .map(|v| {
                v.iter()
                    .filter(|r| r.expires_ms() > now_ms)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Drops expired records; returns how many.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let mut dropped = Vec::new();
        let mut freed = 0;
        self.by_key.retain(|_, v| {
            v.retain(|r| {
                let live = r.expires_ms() > now_ms;
                if !live {
                    dropped.push(r.publisher);
                    freed += r.payload.len();
                }
                live
            });
            !v.is_empty()
        });
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
        self.by_key.values().flatten()
    }

    pub fn len(&self) -> usize {
        self.total
    }

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
    use crate::dht::record::{AddrKind, TypedAddr};
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
}
