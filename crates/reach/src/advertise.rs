//! The one owner of the node's endpoint record.
//!
//! Address facts live with the capabilities that learn them: the held relay
//! and the reachability check with the relay, observed external addresses
//! with NAT, the interfaces with the node, port mappings (to come) with the
//! port mapper. This module is the only one that turns them into a record:
//! it gathers the facts, lets [`reach_proto::endpoint::compose`] decide the
//! address set, numbers, signs, stores and publishes it, and announces
//! [`NodeEvent::RecordPublished`]. Whoever wants the record refreshed (the
//! DHT's maintenance schedule, the relay acquisition after a change) calls
//! [`publish`]; nobody else composes addresses.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use reach_proto::dht::maintenance::ENDPOINT_TTL;
use reach_proto::dht::record::SignedRecord;
use reach_proto::endpoint::{AddressFacts, compose};
use tokio::sync::Mutex as AsyncMutex;

use crate::dht::DhtMode;
use crate::node::bus::Reachability;
use crate::node::{Inner, NodeEvent, stats};

/// The record's state: its last sequence number, and one publication at a
/// time (two concurrent ones would race their sequence numbers).
#[derive(Default)]
pub(crate) struct Advertiser {
    seq: AtomicU64,
    publishing: AsyncMutex<()>,
}

impl Advertiser {
    /// The next sequence number. They follow the wall clock, so a
    /// restarted node (which forgot its last one) still publishes a newer
    /// record.
    fn next_seq(&self, now_ms: u64) -> u64 {
        let prev = self.seq.load(Ordering::Relaxed);
        let seq = now_ms.max(prev + 1);
        self.seq.store(seq, Ordering::Relaxed);
        seq
    }
}

/// The facts the node knows about how it can be reached, from their owners.
pub(crate) fn facts(inner: &Inner) -> AddressFacts {
    AddressFacts {
        relay: inner.relay.held(),
        verified: match inner.relay.reachability() {
            Reachability::Public(addr) => Some(addr),
            _ => None,
        },
        mapped: Vec::new(),
        observed: inner.nat.confirmed(),
        local: inner.local_addrs(),
    }
}

/// Composes, signs and publishes the endpoint record; returns how many
/// nodes stored it. A DHT client publishes nothing.
pub(crate) async fn publish(inner: &Arc<Inner>) -> usize {
    let dht = &inner.dht;
    if dht.mode == DhtMode::Client {
        return 0;
    }
    let _one_at_a_time = inner.advertiser.publishing.lock().await;
    let addrs = compose(&facts(inner));
    let now_ms = crate::dht::unix_ms();
    let seq = inner.advertiser.next_seq(now_ms);
    let record = SignedRecord::endpoint(&inner.keypair, addrs, seq, now_ms, ENDPOINT_TTL);
    // We are one of the closest to our own key by definition: keep a copy.
    let _ = dht.store().put(record.clone(), now_ms);
    let stored = dht.put(record).await;
    stats::add(&dht.counters.records_published, stored);
    inner.bus.emit(NodeEvent::RecordPublished { seq, stored });
    stored
}
