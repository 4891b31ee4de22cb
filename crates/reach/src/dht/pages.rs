//! Every record under a key, and deleting records: what mailboxes need
//! from the DHT beyond a lookup.
//!
//! [`Dht::get_all`] finds the nodes closest to a key and pages through
//! each one's records there ([`DhtRequest::GetRecordsPage`]), so a mailbox
//! with hundreds of messages is read whole (a plain `GetRecords` answers
//! one response's worth). [`Dht::delete_at`] sends signed deletion notices
//! to the nodes closest to a key.

use std::collections::HashSet;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use reach_proto::dht::record::{DeletionNotice, RecordKind, SignedRecord};
use reach_proto::dht::rpc::{DhtRequest, DhtResponse, PageCursor};
use reach_proto::dht::{Contact, Key};

use super::ops::Query;
use super::{Dht, unix_ms};

/// Pages asked of one node for one key at most: with
/// [`MAX_RECORDS_PER_RESPONSE`](reach_proto::dht::rpc::MAX_RECORDS_PER_RESPONSE)
/// records a page that is 4,096 records, eight times what a node holds at
/// one key ([`MAX_PER_KEY`](reach_proto::dht::store::MAX_PER_KEY)), so it
/// never cuts an honest mailbox short and bounds a node that pages forever.
pub const MAX_PAGES_PER_NODE: usize = 64;

/// Distinct records [`Dht::get_all`] collects at most: twice what one node
/// may hold at a key, so the union of k honest storers' copies fits while a
/// flood of junk from many storers cannot grow without bound.
pub const MAX_RECORDS_PER_GET: usize = 2 * reach_proto::dht::store::MAX_PER_KEY;

/// Deletion requests in flight at once: each is one stream to a storer;
/// k storers times a mailbox's messages would otherwise open thousands.
pub const MAX_PARALLEL_DELETES: usize = 32;

impl Dht {
    /// Every valid record of `kind` at `key` held by the nodes closest to
    /// it (and by this node), with those nodes (where to send deletions).
    pub(crate) async fn get_all(
        &self,
        kind: RecordKind,
        key: Key,
    ) -> (Vec<SignedRecord>, Vec<Contact>) {
        let out = self.lookup(key, Query::FindNode).await;
        let now_ms = unix_ms();
        let mut seen: HashSet<PageCursor> = HashSet::new();
        let mut records = Vec::new();
        let mut keep = |r: SignedRecord, records: &mut Vec<SignedRecord>| {
            if records.len() < MAX_RECORDS_PER_GET
                && r.kind == kind
                && r.key == key
                && r.validate(now_ms).is_ok()
                && seen.insert(PageCursor::of(&r))
            {
                records.push(r);
            }
        };
        for r in self.store().get(kind, &key, now_ms) {
            keep(r, &mut records);
        }
        let mut pages: FuturesUnordered<_> = out
            .closest
            .iter()
            .map(|&c| async move { (c, self.pages_of(c, kind, key).await) })
            .collect();
        while let Some((_, got)) = pages.next().await {
            for r in got {
                keep(r, &mut records);
            }
        }
        (records, out.closest)
    }

    /// Every record of `kind` at `key` that `contact` holds, page by page.
    async fn pages_of(&self, contact: Contact, kind: RecordKind, key: Key) -> Vec<SignedRecord> {
        let mut all = Vec::new();
        let mut after = None;
        for _ in 0..MAX_PAGES_PER_NODE {
            let req = DhtRequest::GetRecordsPage { kind, key, after };
            let Ok((msg, _)) = self.request(contact, req).await else {
                break;
            };
            let DhtResponse::RecordsPage { records, next, .. } = msg.response else {
                break;
            };
            // A cursor that does not advance would page forever.
            let advanced = match (next, after) {
                (Some(n), Some(a)) => n > a,
                (Some(_), None) => true,
                (None, _) => false,
            };
            all.extend(records);
            if !advanced {
                break;
            }
            after = next;
        }
        all
    }

    /// Stores a mailbox record at the k closest nodes to its key, like
    /// [`Dht::put`]; also says whether a storer showed a valid deletion
    /// notice for it (its slot was deleted with the record's own key: for
    /// a mailbox record, by the recipient once it had the message).
    pub(crate) async fn put_mailbox(&self, record: SignedRecord) -> (usize, bool) {
        let answers = self.put_answers(&record).await;
        let stored = answers
            .iter()
            .filter(|r| **r == DhtResponse::Stored)
            .count();
        let deleted = answers.iter().any(|r| {
            matches!(r, DhtResponse::Tombstoned { notice }
                if notice.kind == record.kind
                    && notice.key == record.key
                    && notice.publisher == record.publisher
                    && notice.seq == record.seq
                    && notice.validate().is_ok())
        });
        (stored, deleted)
    }

    /// Sends `notices` (all for records at `key`) to `storers` and applies
    /// them to this node's own store. Returns how many (notice, node) pairs
    /// dropped a record.
    pub(crate) async fn delete_at(&self, storers: &[Contact], notices: &[DeletionNotice]) -> usize {
        let now_ms = unix_ms();
        let mut dropped = 0;
        {
            let mut store = self.store();
            for n in notices {
                if store.delete(n, now_ms) == Ok(reach_proto::dht::store::DeleteOutcome::Dropped) {
                    dropped += 1;
                }
            }
        }
        let mut pairs = Vec::with_capacity(storers.len() * notices.len());
        for &c in storers {
            for n in notices {
                pairs.push((c, DhtRequest::DeleteRecord { notice: n.clone() }));
            }
        }
        let mut sends = futures::stream::iter(pairs)
            .map(|(c, req)| self.request(c, req))
            .buffer_unordered(MAX_PARALLEL_DELETES);
        while let Some(r) = sends.next().await {
            if matches!(r, Ok((m, _)) if m.response == DhtResponse::Deleted { held: true }) {
                dropped += 1;
            }
        }
        dropped
    }

    /// Sends `notices` for records at `key` to the nodes closest to it
    /// (found by a lookup).
    pub(crate) async fn delete(&self, key: Key, notices: &[DeletionNotice]) -> usize {
        let out = self.lookup(key, Query::FindNode).await;
        self.delete_at(&out.closest, notices).await
    }
}
