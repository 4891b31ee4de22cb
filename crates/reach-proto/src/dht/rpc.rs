//! DHT requests and responses (carried in the wire envelope).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::record::{DeletionNotice, RecordKind, SignedRecord};
use super::{Contact, Key};
use crate::PeerId;

/// Contacts returned per response at most (k).
pub const MAX_CONTACTS_PER_RESPONSE: usize = super::K;
/// Records returned per response at most; the envelope size limit is the
/// other bound (the responder stops adding records before exceeding it).
pub const MAX_RECORDS_PER_RESPONSE: usize = 64;
/// Bytes of records a response carries at most, below the 64 KiB envelope
/// limit with room for contacts.
pub const MAX_RECORD_BYTES_PER_RESPONSE: usize = 48 * 1024;

/// A DHT request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DhtRequest {
    /// "Are you alive?" Refreshes routing-table health.
    Ping,
    /// "Which contacts do you know closest to `target`?" (the lookup step).
    FindNode {
        /// The key the requester looks for contacts near.
        target: Key,
    },
    /// "Give me your records of `kind` at `key`, or closer contacts."
    GetRecords {
        /// Which kind of record.
        kind: RecordKind,
        /// Where it is stored.
        key: Key,
    },
    /// "Store this record": sent to the nodes closest to its key.
    PutRecord {
        /// The record; the responder validates it before storing.
        record: SignedRecord,
    },
    /// "Give me one page of every record of `kind` at `key`, after
    /// `after`": [`DhtRequest::GetRecords`] answers only what fits in one
    /// response; paging through this returns every value under a key (a
    /// mailbox may hold hundreds of messages).
    GetRecordsPage {
        /// Which kind of record.
        kind: RecordKind,
        /// Where it is stored.
        key: Key,
        /// Where the previous page ended (`None`: from the start).
        after: Option<PageCursor>,
    },
    /// "Drop this record of mine": a signed deletion notice (mailbox
    /// records only; see [`DeletionNotice`]).
    DeleteRecord {
        /// The notice; the responder verifies it before dropping anything.
        notice: DeletionNotice,
    },
}

/// A position in the (publisher, seq) order of the records at one key:
/// the last record of a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PageCursor {
    /// The record's publisher.
    pub publisher: PeerId,
    /// The record's seq.
    pub seq: u64,
}

impl PageCursor {
    /// The position of `record`.
    pub fn of(record: &SignedRecord) -> Self {
        PageCursor {
            publisher: record.publisher,
            seq: record.seq,
        }
    }
}

/// A request plus what the responder needs to know about the requester.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhtRequestMsg {
    /// False for outbound-only (client-mode) nodes, which never enter
    /// routing tables.
    pub server_mode: bool,
    /// What is asked.
    pub request: DhtRequest,
}

/// A DHT response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DhtResponse {
    /// The answer to [`DhtRequest::Ping`].
    Pong,
    /// Contacts closer to the target (the answer to
    /// [`DhtRequest::FindNode`]).
    Nodes {
        /// The responder's closest contacts to the target, at most k.
        closer: Vec<Contact>,
    },
    /// The answer to [`DhtRequest::GetRecords`]: what is stored here, and
    /// contacts closer to the key to ask next.
    Records {
        /// Valid records of the asked kind at the key.
        records: Vec<SignedRecord>,
        /// The responder's closest contacts to the key.
        closer: Vec<Contact>,
    },
    /// The record was stored (or already was).
    Stored,
    /// The request was refused; `reason` is a stable error kind.
    Refused {
        /// The refusal's kind (e.g. a [`RecordError::kind`](super::record::RecordError::kind)).
        reason: String,
    },
    /// The answer to [`DhtRequest::GetRecordsPage`].
    RecordsPage {
        /// Valid records of the asked kind at the key, in (publisher, seq)
        /// order, after the asked cursor.
        records: Vec<SignedRecord>,
        /// Where to continue; `None` when this page was the last.
        next: Option<PageCursor>,
        /// The responder's closest contacts to the key.
        closer: Vec<Contact>,
    },
    /// The answer to [`DhtRequest::DeleteRecord`]: the slot is deleted here.
    Deleted {
        /// Whether the record was held here (else only tombstoned).
        held: bool,
    },
    /// The answer to a [`DhtRequest::PutRecord`] of a record whose slot was
    /// deleted: the refusal, with the signed notice that deleted it, so
    /// the publisher can verify it (a mailbox sender learns that the
    /// recipient has the message).
    Tombstoned {
        /// The deletion notice, signed by the record's publisher key.
        notice: DeletionNotice,
    },
}

/// A response plus the address the responder saw the request come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhtResponseMsg {
    /// The requester's address as the responder saw it: how a node
    /// learns its external address from its DHT peers.
    pub observed: SocketAddr,
    /// The answer.
    pub response: DhtResponse,
}
