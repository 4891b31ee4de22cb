//! The one owner of the node's endpoint record.
//!
//! Address facts come from the capabilities that learn them. The held
//! relay and the verified reachability come in as events on the bus
//! (`RelayAcquired`, `RelayLost`, `ReachabilityChanged`, stated by the
//! relay above this module), observed external addresses from NAT
//! discovery's state, the interfaces from the core, verified port mappings
//! as events from the port mapper (`PortMapped`, `PortUnmapped`). This module is the only one that turns them into a
//! record: it gathers the facts, lets [`reach_proto::endpoint::compose`]
//! decide the address set, numbers, signs, stores and publishes it, and
//! announces [`NodeEvent::RecordPublished`]. Whoever wants the record
//! refreshed (the DHT's maintenance schedule, the relay acquisition after a
//! change) calls [`Advertiser::publish`]; nobody else composes addresses.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use reach_proto::PeerId;
use reach_proto::dht::maintenance::ENDPOINT_TTL;
use reach_proto::dht::record::SignedRecord;
use reach_proto::endpoint::{AddressFacts, compose};
use tokio::sync::Mutex as AsyncMutex;

use crate::dht::{Dht, DhtMode};
use crate::nat::Nat;
use crate::node::bus::{NodeEvents, Reachability};
use crate::node::core::Core;
use crate::node::{NodeEvent, stats};

/// The facts other capabilities state about how this node is reached.
#[derive(Default)]
struct Pushed {
    /// The relay we hold a reservation at, and its address as published.
    relay: Option<(PeerId, SocketAddr)>,
    reachability: Reachability,
    /// Verified port mappings (see [`crate::portmap`]).
    mapped: Vec<SocketAddr>,
}

impl Pushed {
    /// Takes in one fact from the bus; other events say nothing about the
    /// record. A loss of a relay we no longer hold changes nothing.
    fn apply(&mut self, event: &NodeEvent) {
        match *event {
            NodeEvent::RelayAcquired { relay, addr } => self.relay = Some((relay, addr)),
            NodeEvent::RelayLost { relay } if self.relay.is_some_and(|(r, _)| r == relay) => {
                self.relay = None;
            }
            NodeEvent::ReachabilityChanged { reachability } => self.reachability = reachability,
            NodeEvent::PortMapped { external } if !self.mapped.contains(&external) => {
                self.mapped.push(external);
            }
            NodeEvent::PortUnmapped { external } => self.mapped.retain(|a| *a != external),
            _ => {}
        }
    }
}

/// The record's owner: its facts, its last sequence number, and one
/// publication at a time (two concurrent ones would race their sequence
/// numbers).
pub(crate) struct Advertiser {
    core: Arc<Core>,
    /// Where the record is stored and published.
    dht: Arc<Dht>,
    /// Our observed external addresses.
    nat: Arc<Nat>,
    seq: AtomicU64,
    publishing: AsyncMutex<()>,
    pushed: Mutex<Pushed>,
    /// The bus, from before any capability started: the source of the
    /// pushed facts. Drained by [`Self::catch_up`] before every
    /// composition, so a publication that follows a change (the relay
    /// states a new relay, then asks to publish) always carries it.
    events: Mutex<NodeEvents>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock means a panic mid-update elsewhere; the facts are
    // still whole values.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Advertiser {
    /// Subscribes to the bus at once: build it before anything that states
    /// address facts starts.
    pub(crate) fn new(core: Arc<Core>, dht: Arc<Dht>, nat: Arc<Nat>) -> Self {
        let events = Mutex::new(core.bus.subscribe());
        Advertiser {
            core,
            dht,
            nat,
            seq: AtomicU64::new(0),
            publishing: AsyncMutex::new(()),
            pushed: Mutex::default(),
            events,
        }
    }

    /// The next sequence number. They follow the wall clock, so a
    /// restarted node (which forgot its last one) still publishes a newer
    /// record.
    fn next_seq(&self, now_ms: u64) -> u64 {
        let prev = self.seq.load(Ordering::Relaxed);
        let seq = now_ms.max(prev + 1);
        self.seq.store(seq, Ordering::Relaxed);
        seq
    }

    /// Applies every fact stated on the bus so far (never waits). Called
    /// before each composition, and by the composition root on every bus
    /// event so the subscription never falls [`crate::node::bus::BUS_CAPACITY`]
    /// events behind.
    pub(crate) fn catch_up(&self) {
        let mut events = lock(&self.events);
        let missed = events.missed();
        while let Some(Some(event)) = events.next().now_or_never() {
            lock(&self.pushed).apply(&event);
        }
        if events.missed() > missed {
            tracing::warn!(
                missed = events.missed() - missed,
                "the endpoint record's owner fell behind the bus: address facts may be stale until they change again"
            );
        }
    }

    /// The facts the node knows about how it can be reached, from their
    /// owners.
    fn facts(&self) -> AddressFacts {
        let pushed = lock(&self.pushed);
        AddressFacts {
            relay: pushed.relay,
            verified: match pushed.reachability {
                Reachability::Public(addr) => Some(addr),
                _ => None,
            },
            mapped: pushed.mapped.clone(),
            observed: self.nat.confirmed(),
            local: self.core.local_addrs(),
        }
    }

    /// The address set the record would carry now (what a ticket shares).
    pub(crate) fn addresses(&self) -> Vec<reach_proto::dht::record::TypedAddr> {
        self.catch_up();
        compose(&self.facts())
    }

    /// Our confirmed external addresses (a change calls for a republish).
    pub(crate) fn external_addrs(&self) -> Vec<SocketAddr> {
        self.nat.confirmed()
    }

    /// Composes, signs and publishes the endpoint record; returns how many
    /// nodes stored it. A DHT client publishes nothing.
    pub(crate) async fn publish(&self) -> usize {
        let dht = &self.dht;
        if dht.mode == DhtMode::Client {
            return 0;
        }
        let _one_at_a_time = self.publishing.lock().await;
        self.catch_up();
        let addrs = compose(&self.facts());
        let now_ms = crate::dht::unix_ms();
        let seq = self.next_seq(now_ms);
        let record = SignedRecord::endpoint(&self.core.keypair, addrs, seq, now_ms, ENDPOINT_TTL);
        // We are one of the closest to our own key by definition: keep a copy.
        let _ = dht.store().put(record.clone(), now_ms);
        let stored = dht.put(record).await;
        stats::add(&dht.counters.records_published, stored);
        self.core
            .bus
            .emit(NodeEvent::RecordPublished { seq, stored });
        stored
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reach_proto::Keypair;

    fn relay() -> (PeerId, SocketAddr) {
        (
            Keypair::generate().peer_id(),
            "192.0.2.7:4433".parse().unwrap(),
        )
    }

    #[test]
    fn the_bus_facts_end_as_the_relay_left_them() {
        let mut p = Pushed::default();
        let (a, a_addr) = relay();
        let (b, b_addr) = relay();
        p.apply(&NodeEvent::RelayAcquired {
            relay: a,
            addr: a_addr,
        });
        assert_eq!(p.relay, Some((a, a_addr)));
        // Switching relays: the old one's loss, then the new one.
        p.apply(&NodeEvent::RelayLost { relay: a });
        p.apply(&NodeEvent::RelayAcquired {
            relay: b,
            addr: b_addr,
        });
        assert_eq!(p.relay, Some((b, b_addr)));
        // A late loss of a relay no longer held keeps the new one.
        p.apply(&NodeEvent::RelayLost { relay: a });
        assert_eq!(p.relay, Some((b, b_addr)));
        p.apply(&NodeEvent::RelayLost { relay: b });
        assert_eq!(p.relay, None);
    }

    #[test]
    fn reachability_follows_the_latest_check_and_other_events_change_nothing() {
        let mut p = Pushed::default();
        let public: SocketAddr = "198.51.100.1:9000".parse().unwrap();
        p.apply(&NodeEvent::ReachabilityChanged {
            reachability: Reachability::Public(public),
        });
        assert_eq!(p.reachability, Reachability::Public(public));
        p.apply(&NodeEvent::ExternalAddrConfirmed { addr: public });
        p.apply(&NodeEvent::RecordPublished { seq: 1, stored: 3 });
        assert_eq!(p.reachability, Reachability::Public(public));
        assert_eq!(p.relay, None);
        p.apply(&NodeEvent::ReachabilityChanged {
            reachability: Reachability::Private,
        });
        assert_eq!(p.reachability, Reachability::Private);
    }
}
