//! DHT requests and responses (carried in the wire envelope).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::record::{RecordKind, SignedRecord};
use super::{Contact, Key};

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
    Ping,
    FindNode { target: Key },
    GetRecords { kind: RecordKind, key: Key },
    PutRecord { record: SignedRecord },
}

/// A request plus what the responder needs to know about the requester.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhtRequestMsg {
    /// False for outbound-only (client-mode) nodes, which never enter
    /// routing tables.
    pub server_mode: bool,
    pub request: DhtRequest,
}

/// A DHT response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DhtResponse {
    Pong,
    Nodes {
        closer: Vec<Contact>,
    },
    Records {
        records: Vec<SignedRecord>,
        closer: Vec<Contact>,
    },
    Stored,
    /// The request was refused; `reason` is a stable error kind.
    Refused {
        reason: String,
    },
}

/// A response plus the address the responder saw the request come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhtResponseMsg {
    pub observed: SocketAddr,
    pub response: DhtResponse,
}
