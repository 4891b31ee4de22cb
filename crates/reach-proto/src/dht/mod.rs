//! The Kademlia DHT, sans-IO.
//!
//! - [`key`]: the 256-bit keyspace and XOR distance.
//! - [`routing`]: the routing table (k-buckets with IP-diversity limits and
//!   peer health).
//! - [`lookup`]: the iterative lookup state machine (α parallel queries,
//!   per-query timeouts, time passed in).
//! - [`record`]: signed records (endpoint, topic, mailbox) and their
//!   validation.
//! - [`store`]: the record store with limits, expiry and per-publisher quotas.
//! - [`rpc`]: the DHT request/response messages.
//! - [`estimate`]: network-size estimation from the routing table.
//! - [`maintenance`]: joining and the maintenance schedule (join retry,
//!   bucket refresh, republish) as state machines.
//! - [`server`]: what a node answers to each request.
//!
//! Time is a [`std::time::Duration`] since an arbitrary epoch chosen by the
//! driver (the runtime: node start; the simulator: virtual time zero).
//! Record timestamps are Unix milliseconds, because they travel between
//! nodes.

pub mod estimate;
pub mod key;
pub mod lookup;
pub mod maintenance;
pub mod record;
pub mod routing;
pub mod rpc;
pub mod server;
pub mod store;

pub use key::{Distance, Key};

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::PeerId;

/// Replication factor and bucket size (Kademlia's k).
pub const K: usize = 20;
/// Parallel queries of a lookup (Kademlia's α).
pub const ALPHA: usize = 3;

/// A DHT contact: who and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Contact {
    /// Its identity: a connection to `addr` must prove it in the TLS
    /// handshake.
    pub peer: PeerId,
    /// Where it was last reachable.
    pub addr: SocketAddr,
}

impl Contact {
    /// A contact for `peer` at `addr`.
    pub fn new(peer: PeerId, addr: SocketAddr) -> Self {
        Contact { peer, addr }
    }

    /// This contact's position in the keyspace.
    pub fn key(&self) -> Key {
        Key::for_peer(&self.peer)
    }
}
