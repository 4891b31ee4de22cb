//! Relay circuits as the shared socket sees them.
//!
//! **Client side.** quinn addresses every connection by a `SocketAddr`. A
//! connection through a relay gets a *virtual* address (`crate::vaddr`, of
//! kind `AddrClass::Relayed`): packets quinn sends there are wrapped in a
//! relay frame and sent to the relay; relay frames arriving from the relay
//! are unwrapped and handed to quinn as if they came from the virtual
//! address. The end-to-end QUIC connection is an ordinary one; only the
//! socket knows it is relayed.
//!
//! **Relay side.** A circuit binds a random id to the two addresses of the
//! clients' own QUIC connections to the relay; a frame is forwarded only from
//! one of those addresses to the other, unchanged and unread, within the
//! reservation holder's rate allowance. The policy (caps, expiry, who may
//! forward to whom) is reach-proto's [`Circuits`] machine; this side only
//! gives it the time, from tokio's clock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use reach_proto::PeerId;
pub use reach_proto::relay::circuits::{
    CircuitInfo, MAX_CIRCUITS, MAX_CIRCUITS_PER_PEER, UNUSED_CIRCUIT_EXPIRY,
};
use reach_proto::relay::circuits::{Circuits, ForwardDrop};
use reach_proto::relay::service::RelayLimits;
use tokio::time::Instant;

use crate::vaddr::{AddrClass, VirtualAddrs};

/// Virtual addresses a node holds at once at most (each is one relayed
/// connection or a circuit being set up).
pub const MAX_VIRTUAL_PATHS: usize = 4096;

/// Where a virtual address leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtualPath {
    /// The relay's address, as our connection to it sees it.
    pub relay_addr: SocketAddr,
    pub relay: PeerId,
    pub circuit: u64,
    /// A registered connection uses it (it is forgotten when that closes).
    pub used: bool,
}

#[derive(Default)]
struct ClientPaths {
    by_index: HashMap<u32, VirtualPath>,
    by_circuit: HashMap<(SocketAddr, u64), u32>,
}

crate::telemetry::metrics! {
    /// Counters of the relay data path.
    pub struct RelayPathCounters =>
    /// The relay data path's counters as [`NodeStats`](crate::NodeStats)
    /// shows them.
    pub struct RelayPathStats;
    atomic {
        /// Frames this node forwarded as a relay.
        counter forwarded_packets = "relay_forwarded_packets",
        /// Bytes of the frames this node forwarded as a relay.
        counter forwarded_bytes = "relay_forwarded_bytes",
        /// Frames dropped: unknown circuit, or from an address not bound to it.
        counter dropped_unknown = "relay_dropped_unknown",
        /// Frames dropped over the reservation holder's rate allowance.
        counter dropped_rate_limited = "relay_dropped_rate_limited",
        /// Relayed packets sent as a client.
        counter client_sent = "relayed_packets_sent",
        /// Relayed packets received as a client.
        counter client_received = "relayed_packets_received",
    }
}

/// The relay circuits of one node, shared with its socket.
pub struct RelayPaths {
    /// Relayed-circuit addresses.
    addrs: VirtualAddrs,
    client: RwLock<ClientPaths>,
    relay: Mutex<Circuits>,
    /// Time zero of the relay side's clock (tokio's, so tests can pause it).
    epoch: Instant,
    pub stats: RelayPathCounters,
}

impl RelayPaths {
    /// `v6`: whether the node's socket is IPv6 (virtual addresses then take
    /// the IPv4-mapped form quinn uses on such sockets).
    pub fn new(v6: bool, limits: RelayLimits) -> Self {
        RelayPaths {
            addrs: VirtualAddrs::new(AddrClass::Relayed, v6),
            client: RwLock::new(ClientPaths::default()),
            relay: Mutex::new(Circuits::new(limits)),
            epoch: Instant::now(),
            stats: RelayPathCounters::default(),
        }
    }

    fn client_read(&self) -> std::sync::RwLockReadGuard<'_, ClientPaths> {
        self.client.read().unwrap_or_else(|p| p.into_inner())
    }

    fn client_write(&self) -> std::sync::RwLockWriteGuard<'_, ClientPaths> {
        self.client.write().unwrap_or_else(|p| p.into_inner())
    }

    fn relay_state(&self) -> std::sync::MutexGuard<'_, Circuits> {
        self.relay.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Now, on the relay side's clock.
    fn now(&self) -> Duration {
        Instant::now().saturating_duration_since(self.epoch)
    }

    // ---- client side ----

    /// Allocates the virtual address of circuit `circuit` at the relay at
    /// `relay_addr`; `None` when [`MAX_VIRTUAL_PATHS`] are in use.
    pub fn add_virtual(
        &self,
        relay: PeerId,
        relay_addr: SocketAddr,
        circuit: u64,
    ) -> Option<SocketAddr> {
        let mut c = self.client_write();
        if let Some(&i) = c.by_circuit.get(&(relay_addr, circuit)) {
            return Some(self.addrs.addr(i));
        }
        if c.by_index.len() >= MAX_VIRTUAL_PATHS {
            return None;
        }
        let index = self.addrs.allocate();
        c.by_index.insert(
            index,
            VirtualPath {
                relay_addr,
                relay,
                circuit,
                used: false,
            },
        );
        c.by_circuit.insert((relay_addr, circuit), index);
        Some(self.addrs.addr(index))
    }

    /// Forgets a virtual address (its connection closed or never came).
    pub fn forget_virtual(&self, addr: &SocketAddr) {
        let Some(index) = self.addrs.index(addr) else {
            return;
        };
        let mut c = self.client_write();
        if let Some(p) = c.by_index.remove(&index) {
            c.by_circuit.remove(&(p.relay_addr, p.circuit));
        }
    }

    /// Marks a virtual address as carrying a registered connection.
    pub fn mark_used(&self, addr: &SocketAddr) {
        let Some(index) = self.addrs.index(addr) else {
            return;
        };
        if let Some(p) = self.client_write().by_index.get_mut(&index) {
            p.used = true;
        }
    }

    /// Where the virtual address `addr` leads.
    pub fn path(&self, addr: &SocketAddr) -> Option<VirtualPath> {
        let index = self.addrs.index(addr)?;
        self.client_read().by_index.get(&index).copied()
    }

    /// The virtual address of frames of `circuit` arriving from `from`.
    pub fn virtual_for(&self, from: SocketAddr, circuit: u64) -> Option<SocketAddr> {
        let index = *self.client_read().by_circuit.get(&(from, circuit))?;
        Some(self.addrs.addr(index))
    }

    // ---- relay side ----

    /// Grants or renews `client`'s reservation.
    pub fn reserve(
        &self,
        client: PeerId,
    ) -> Result<Duration, reach_proto::relay::service::RefuseReason> {
        let now = self.now();
        self.relay_state().reserve(client, now)
    }

    /// Whether `client` holds a reservation here.
    pub fn has_reservation(&self, client: &PeerId) -> bool {
        let now = self.now();
        self.relay_state().has_reservation(client, now)
    }

    /// Drops circuit `id` if `by` is one of its ends (its connection over
    /// it closed). Returns whether it did.
    pub fn close_circuit(&self, id: u64, by: &PeerId) -> bool {
        self.relay_state().close(id, by)
    }

    /// Whether a circuit joins `a` and `b` (either way round).
    pub fn has_circuit_between(&self, a: &PeerId, b: &PeerId) -> bool {
        self.relay_state().has_circuit_between(a, b)
    }

    /// Drops `client`'s reservation and every circuit it is an end of.
    pub fn release(&self, client: &PeerId) {
        self.relay_state().release(client);
    }

    /// Reservations held here.
    pub fn reservation_count(&self) -> usize {
        self.relay_state().reservation_count()
    }

    /// Opens circuit `id` between `a` (the dialer) and `b` (the reservation
    /// holder). False if at [`MAX_CIRCUITS`] (or [`MAX_CIRCUITS_PER_PEER`]
    /// for either end) or the id is taken.
    pub fn open_circuit(&self, id: u64, a: (PeerId, SocketAddr), b: (PeerId, SocketAddr)) -> bool {
        let now = self.now();
        self.relay_state().open(id, a, b, now).is_ok()
    }

    /// Whether more circuits fit.
    pub fn circuits_full(&self) -> bool {
        self.relay_state().is_full()
    }

    /// Drops circuits idle for `idle` (or unused since opening for
    /// [`UNUSED_CIRCUIT_EXPIRY`]) and expired reservations.
    pub fn expire(&self, idle: Duration) {
        let now = self.now();
        self.relay_state().expire(now, idle);
    }

    /// The circuits this node forwards.
    pub fn circuits(&self) -> Vec<CircuitInfo> {
        let now = self.now();
        self.relay_state().list(now)
    }

    /// Where to forward a frame of `circuit` that came from `from`: the
    /// other end, if `from` is an end and the holder's allowance admits
    /// `len` bytes.
    pub fn forward_to(&self, circuit: u64, from: SocketAddr, len: usize) -> Option<SocketAddr> {
        self.forward_batch_to(circuit, from, len, 1)
    }

    /// Like [`Self::forward_to`] for `packets` frames of `len` bytes in all.
    pub fn forward_batch_to(
        &self,
        circuit: u64,
        from: SocketAddr,
        len: usize,
        packets: u64,
    ) -> Option<SocketAddr> {
        let now = self.now();
        let verdict = self.relay_state().forward(circuit, from, len, packets, now);
        match verdict {
            Ok(to) => Some(to),
            Err(ForwardDrop::RateLimited) => {
                self.stats
                    .dropped_rate_limited
                    .fetch_add(packets, Ordering::Relaxed);
                None
            }
            Err(
                ForwardDrop::UnknownCircuit | ForwardDrop::NotAnEnd | ForwardDrop::NoReservation,
            ) => {
                self.stats
                    .dropped_unknown
                    .fetch_add(packets, Ordering::Relaxed);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vaddr::{class_of, is_virtual};
    use reach_proto::Keypair;
    use std::net::{IpAddr, Ipv6Addr};

    fn peer() -> PeerId {
        Keypair::generate().peer_id()
    }

    #[test]
    fn virtual_addresses_round_trip_in_both_forms() {
        let p = RelayPaths::new(false, RelayLimits::default());
        let relay: SocketAddr = "203.0.113.10:4433".parse().unwrap();
        let r = peer();
        let v = p.add_virtual(r, relay, 42).unwrap();
        assert!(is_virtual(&v));
        assert_eq!(class_of(&v), AddrClass::Relayed);
        assert_eq!(p.virtual_for(relay, 42), Some(v));
        assert_eq!(p.path(&v).map(|x| x.circuit), Some(42));
        let mapped = SocketAddr::new(
            match v.ip() {
                IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
                ip => ip,
            },
            v.port(),
        );
        assert!(is_virtual(&mapped));
        assert!(!is_virtual(&relay));
        assert!(!is_virtual(&"255.255.255.255:1".parse().unwrap()));
        assert!(!is_virtual(&SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 1)));
        p.forget_virtual(&v);
        assert_eq!(p.virtual_for(relay, 42), None);
    }

    #[test]
    fn relay_forwards_only_between_the_bound_ends_within_the_allowance() {
        let limits = RelayLimits {
            packets_per_sec: 3,
            ..RelayLimits::default()
        };
        let p = RelayPaths::new(false, limits);
        let (a, b) = (peer(), peer());
        let a_addr: SocketAddr = "198.51.100.1:1000".parse().unwrap();
        let b_addr: SocketAddr = "198.51.100.2:2000".parse().unwrap();
        let stranger: SocketAddr = "198.51.100.3:3000".parse().unwrap();
        p.reserve(b).unwrap();
        assert!(p.open_circuit(9, (a, a_addr), (b, b_addr)));
        assert!(!p.open_circuit(9, (a, a_addr), (b, b_addr)), "id reuse");
        assert_eq!(p.forward_to(9, a_addr, 100), Some(b_addr));
        assert_eq!(p.forward_to(9, b_addr, 100), Some(a_addr));
        assert_eq!(p.forward_to(9, stranger, 100), None);
        assert_eq!(p.forward_to(8, a_addr, 100), None);
        // Third packet within the second: allowed; the fourth is over.
        assert_eq!(p.forward_to(9, a_addr, 100), Some(b_addr));
        assert_eq!(p.forward_to(9, a_addr, 100), None);
        assert_eq!(p.stats.dropped_rate_limited.load(Ordering::Relaxed), 1);
        p.release(&b);
        assert_eq!(p.forward_to(9, a_addr, 100), None);
        assert!(p.circuits().is_empty());
    }
}
