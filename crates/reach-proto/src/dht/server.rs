//! What a DHT server node answers, sans-IO: a function of its routing table
//! and record store. The runtime (`reach::dht::rpc::serve`) and the
//! simulator both answer with it.
//!
//! An answer takes two steps, so a driver that keeps the table and the store
//! behind separate locks never holds both: [`Neighbourhood::of`] reads what
//! the answer needs from the table, then [`answer`] works on the store.

use super::record::RecordError;
use super::routing::RoutingTable;
use super::rpc::{
    DhtRequest, DhtResponse, MAX_CONTACTS_PER_RESPONSE, MAX_RECORD_BYTES_PER_RESPONSE,
    MAX_RECORDS_PER_RESPONSE,
};
use super::store::{DeleteOutcome, RecordStore, Source, among_closest};
use super::{Contact, K, Key};

/// A node stores a record when fewer than this many times k contacts it
/// knows are closer to the key. Its routing table holds contacts that are
/// dead or that a publisher's lookup never reached, so a strict k would
/// refuse honest stores under churn; the slack only lets a flooder place
/// records at twice as many nodes around a key.
pub const STORE_CLOSENESS_SLACK: usize = 2;

/// Bytes counted per record on top of its payload when bounding a response
/// by [`MAX_RECORD_BYTES_PER_RESPONSE`]: key, publisher, signature and the
/// other fixed fields, rounded up.
pub const RECORD_OVERHEAD_BYTES: usize = 200;

/// What an answer to one request needs from the routing table: our own key
/// and the contacts closest to the request's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbourhood {
    local: Key,
    /// Closest first: [`MAX_CONTACTS_PER_RESPONSE`] of them for a query,
    /// [`STORE_CLOSENESS_SLACK`] × k for a put.
    closest: Vec<Contact>,
}

impl Neighbourhood {
    /// Reads from `table` what the answer to `request` needs.
    pub fn of(table: &RoutingTable, request: &DhtRequest) -> Self {
        let closest = match request {
            DhtRequest::Ping => Vec::new(),
            DhtRequest::FindNode { target: key }
            | DhtRequest::GetRecords { key, .. }
            | DhtRequest::GetRecordsPage { key, .. } => {
                table.closest(key, MAX_CONTACTS_PER_RESPONSE)
            }
            DhtRequest::DeleteRecord { .. } => Vec::new(),
            DhtRequest::PutRecord { record } => {
                table.closest(&record.key, STORE_CLOSENESS_SLACK * K)
            }
        };
        Neighbourhood {
            local: table.local_key(),
            closest,
        }
    }

    /// The contacts a query's answer carries.
    fn closer(&self) -> Vec<Contact> {
        self.closest
            .iter()
            .take(MAX_CONTACTS_PER_RESPONSE)
            .copied()
            .collect()
    }

    /// Whether we are among the [`STORE_CLOSENESS_SLACK`] × k closest we
    /// know to `key` ([`among_closest`]).
    fn among_closest(&self, key: &Key) -> bool {
        let known: Vec<Key> = self.closest.iter().map(|c| c.key()).collect();
        among_closest(&self.local, key, &known, STORE_CLOSENESS_SLACK * K)
    }
}

/// The answer to `request` of the node whose routing table gave `near`
/// ([`Neighbourhood::of`] for this same request) and whose records are in
/// `store`.
///
/// `source` is the network the request came from (a record put counts
/// against that network's share of the store); `now_ms` is Unix time, for
/// record expiry. A put of a record this node is not among the closest to
/// is refused, and the refusal counted in the store.
pub fn answer(
    near: &Neighbourhood,
    store: &mut RecordStore,
    request: DhtRequest,
    source: Option<Source>,
    now_ms: u64,
) -> DhtResponse {
    match request {
        DhtRequest::Ping => DhtResponse::Pong,
        DhtRequest::FindNode { .. } => DhtResponse::Nodes {
            closer: near.closer(),
        },
        DhtRequest::GetRecords { kind, key } => {
            let mut records = store.get(kind, &key, now_ms);
            // Newest first, then bounded by count and bytes.
            records.sort_by_key(|r| std::cmp::Reverse(r.seq));
            let mut bytes = 0;
            records.retain(|r| {
                bytes += r.payload.len() + RECORD_OVERHEAD_BYTES;
                bytes <= MAX_RECORD_BYTES_PER_RESPONSE
            });
            records.truncate(MAX_RECORDS_PER_RESPONSE);
            DhtResponse::Records {
                records,
                closer: near.closer(),
            }
        }
        DhtRequest::PutRecord { record } => {
            let proof = store.tombstone(&record, now_ms);
            let stored = if near.among_closest(&record.key) {
                store.put_from(record, source, now_ms)
            } else {
                let e = RecordError::NotClosest;
                store.count_rejection(&e);
                Err(e)
            };
            match (stored, proof) {
                (Ok(_), _) => DhtResponse::Stored,
                (Err(RecordError::Deleted), Some(notice)) => DhtResponse::Tombstoned { notice },
                (Err(e), _) => DhtResponse::Refused {
                    reason: e.kind().to_string(),
                },
            }
        }
        DhtRequest::GetRecordsPage { kind, key, after } => {
            let (records, next) = store.page(
                kind,
                &key,
                after,
                now_ms,
                MAX_RECORDS_PER_RESPONSE,
                MAX_RECORD_BYTES_PER_RESPONSE,
                RECORD_OVERHEAD_BYTES,
            );
            DhtResponse::RecordsPage {
                records,
                next,
                closer: near.closer(),
            }
        }
        // A deletion needs no closeness check: only the publisher can sign
        // it, and it only ever frees room.
        DhtRequest::DeleteRecord { notice } => match store.delete(&notice, now_ms) {
            Ok(outcome) => DhtResponse::Deleted {
                held: outcome == DeleteOutcome::Dropped,
            },
            Err(e) => DhtResponse::Refused {
                reason: e.kind().to_string(),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use super::*;
    use crate::Keypair;
    use crate::dht::Contact;
    use crate::dht::record::SignedRecord;
    use crate::dht::store::StoreLimits;

    const NOW_MS: u64 = 1_800_000_000_000;

    /// Whether the node owning `table` is among the k closest it knows to `key`
    /// (see [`among_closest`], with [`STORE_CLOSENESS_SLACK`]).
    fn is_among_closest(table: &RoutingTable, key: &Key) -> bool {
        let k = STORE_CLOSENESS_SLACK * K;
        let known: Vec<Key> = table.closest(key, k).iter().map(|c| c.key()).collect();
        among_closest(&table.local_key(), key, &known, k)
    }

    fn keypair(i: u64) -> Keypair {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&i.to_le_bytes());
        Keypair::from_secret_bytes(seed)
    }

    fn addr(i: u64) -> SocketAddr {
        SocketAddr::from(([198, 51, (i % 250) as u8, (i / 250) as u8], 4433))
    }

    /// Node 0's table with contacts 1..=n.
    fn table(n: u64) -> (RoutingTable, Vec<Contact>) {
        let mut t = RoutingTable::new(keypair(0).peer_id(), Default::default());
        let contacts: Vec<Contact> = (1..=n)
            .map(|i| Contact::new(keypair(i).peer_id(), addr(i)))
            .collect();
        for c in &contacts {
            t.on_seen(*c, Duration::ZERO);
        }
        (t, contacts)
    }

    fn store() -> RecordStore {
        RecordStore::new(StoreLimits::default())
    }

    /// Answers as a driver does: the table first, then the store.
    fn ask(t: &RoutingTable, s: &mut RecordStore, request: DhtRequest, now_ms: u64) -> DhtResponse {
        let near = Neighbourhood::of(t, &request);
        answer(&near, s, request, None, now_ms)
    }

    #[test]
    fn find_node_answers_the_k_closest_it_knows() {
        let (t, contacts) = table(300);
        let target = Key::for_topic("somewhere");
        let DhtResponse::Nodes { closer } =
            ask(&t, &mut store(), DhtRequest::FindNode { target }, NOW_MS)
        else {
            panic!("not a Nodes answer");
        };
        // Brute force over what the table holds.
        let mut held: Vec<Contact> = t.iter().map(|e| e.contact).collect();
        assert!(held.len() > K && held.len() <= contacts.len());
        held.sort_by_key(|c| c.key().distance(&target));
        assert_eq!(closer, held[..K].to_vec());
        assert_eq!(
            ask(&t, &mut store(), DhtRequest::Ping, NOW_MS),
            DhtResponse::Pong
        );
    }

    #[test]
    fn get_records_answers_the_stored_record_and_closer_contacts() {
        let (t, _) = table(50);
        let mut s = store();
        let publisher = keypair(7);
        let record = SignedRecord::endpoint(&publisher, vec![], 1, NOW_MS, Duration::from_secs(60));
        let key = record.key;
        assert!(s.put(record.clone(), NOW_MS).is_ok());
        let request = DhtRequest::GetRecords {
            kind: record.kind,
            key,
        };
        let DhtResponse::Records { records, closer } = ask(&t, &mut s, request.clone(), NOW_MS)
        else {
            panic!("not a Records answer");
        };
        assert_eq!(records, vec![record]);
        assert_eq!(closer, t.closest(&key, K));
        // Past its lifetime it is no longer answered.
        let later = NOW_MS + 61_000;
        let DhtResponse::Records { records, .. } = ask(&t, &mut s, request, later) else {
            panic!("not a Records answer");
        };
        assert!(records.is_empty());
    }

    #[test]
    fn paged_get_and_signed_deletion_over_the_wire_requests() {
        use crate::dht::record::{DeletionNotice, RecordKind};
        let (t, _) = table(5);
        let mut s = store();
        let key = Key([4; 32]);
        let throwaways: Vec<Keypair> = (0..100).map(|i| keypair(10_000 + i)).collect();
        for kp in &throwaways {
            let r = SignedRecord::sign(
                kp,
                RecordKind::Mailbox,
                key,
                1,
                NOW_MS,
                Duration::from_secs(60),
                vec![1; 1000],
            );
            let put = DhtRequest::PutRecord { record: r };
            assert_eq!(ask(&t, &mut s, put, NOW_MS), DhtResponse::Stored);
        }
        // Paging returns all 100; a plain get only one response's worth.
        let (mut all, mut after) = (Vec::new(), None);
        loop {
            let req = DhtRequest::GetRecordsPage {
                kind: RecordKind::Mailbox,
                key,
                after,
            };
            let DhtResponse::RecordsPage { records, next, .. } = ask(&t, &mut s, req, NOW_MS)
            else {
                panic!("not a RecordsPage answer");
            };
            all.extend(records);
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert_eq!(all.len(), 100);
        let DhtResponse::Records { records, .. } = ask(
            &t,
            &mut s,
            DhtRequest::GetRecords {
                kind: RecordKind::Mailbox,
                key,
            },
            NOW_MS,
        ) else {
            panic!("not a Records answer");
        };
        assert!(records.len() < 100);
        // A signed deletion drops one; a forged one is refused by kind.
        let notice = DeletionNotice::sign(&throwaways[0], RecordKind::Mailbox, key, 1);
        let del = DhtRequest::DeleteRecord { notice };
        assert_eq!(
            ask(&t, &mut s, del.clone(), NOW_MS),
            DhtResponse::Deleted { held: true }
        );
        assert_eq!(
            ask(&t, &mut s, del, NOW_MS),
            DhtResponse::Deleted { held: false }
        );
        let mut forged = DeletionNotice::sign(&keypair(1), RecordKind::Mailbox, key, 1);
        forged.publisher = throwaways[1].peer_id();
        assert_eq!(
            ask(
                &t,
                &mut s,
                DhtRequest::DeleteRecord { notice: forged },
                NOW_MS
            ),
            DhtResponse::Refused {
                reason: "bad_signature".into()
            }
        );
        assert_eq!(s.len(), 99);
        // A re-put of the deleted record is answered with the notice.
        let again = SignedRecord::sign(
            &throwaways[0],
            RecordKind::Mailbox,
            key,
            1,
            NOW_MS,
            Duration::from_secs(60),
            vec![1; 1000],
        );
        assert_eq!(
            ask(&t, &mut s, DhtRequest::PutRecord { record: again }, NOW_MS),
            DhtResponse::Tombstoned {
                notice: DeletionNotice::sign(&throwaways[0], RecordKind::Mailbox, key, 1)
            }
        );
    }

    #[test]
    fn put_is_stored_only_near_the_key() {
        // Few contacts: among the closest to anything.
        let (t, _) = table(5);
        let mut s = store();
        let record = SignedRecord::topic(&keypair(9), "t", 1, NOW_MS, Duration::from_secs(60));
        let put = DhtRequest::PutRecord {
            record: record.clone(),
        };
        assert_eq!(ask(&t, &mut s, put.clone(), NOW_MS), DhtResponse::Stored);
        assert_eq!(s.len(), 1);

        // Many contacts, all closer to the key than we are: refused and
        // counted.
        let mut far = RoutingTable::new(keypair(0).peer_id(), Default::default());
        let own = far.local_key();
        let mut i = 1000;
        while far.closest(&record.key, STORE_CLOSENESS_SLACK * K).len() < STORE_CLOSENESS_SLACK * K
            || is_among_closest(&far, &record.key)
        {
            let c = Contact::new(keypair(i).peer_id(), addr(i));
            if c.key().distance(&record.key) < own.distance(&record.key) {
                far.on_seen(c, Duration::ZERO);
            }
            i += 1;
            assert!(i < 200_000, "could not build a table closer than us");
        }
        let mut s = store();
        assert_eq!(
            ask(&far, &mut s, put, NOW_MS),
            DhtResponse::Refused {
                reason: RecordError::NotClosest.kind().to_string()
            }
        );
        assert!(s.is_empty());
        assert_eq!(s.rejections().get(RecordError::NotClosest.kind()), Some(&1));
    }
}
