//! Relay circuits as the shared socket sees them.
//!
//! **Client side.** quinn addresses every connection by a `SocketAddr`. A
//! connection through a relay gets a *virtual* address from 240.0.0.0/4
//! (reserved, never routable): packets quinn sends there are wrapped in a
//! relay frame and sent to the relay; relay frames arriving from the relay
//! are unwrapped and handed to quinn as if they came from the virtual
//! address. The end-to-end QUIC connection is an ordinary one; only the
//! socket knows it is relayed.
//!
//! **Relay side.** A circuit binds a random id to the two addresses of the
//! clients' own QUIC connections to the relay; a frame is forwarded only from
//! one of those addresses to the other, unchanged and unread, within the
//! reservation holder's rate allowance.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use reach_proto::PeerId;
use reach_proto::relay::service::{Drop as RelayDrop, RelayLimits, Reservations};
use serde::Serialize;

/// First octet of the virtual address range (240.0.0.0/4, "reserved for
/// future use": no real packet ever goes there).
const VIRTUAL_NET: u32 = 0xF000_0000;
/// Virtual addresses a node holds at once at most (each is one relayed
/// connection or a circuit being set up).
pub const MAX_VIRTUAL_PATHS: usize = 4096;
/// Circuits a relay forwards at once at most.
pub const MAX_CIRCUITS: usize = 4096;
/// Circuits one peer may have open at a relay at once, as dialer or as
/// target: no single peer can take every circuit.
pub const MAX_CIRCUITS_PER_PEER: usize = 64;
/// A circuit that has carried no frame this long after opening is dropped
/// (a handshake takes far less; idle circuits in use have keep-alives).
pub const UNUSED_CIRCUIT_EXPIRY: Duration = Duration::from_secs(15);

/// Port of relayed-circuit addresses (TCP links use port 2).
const CIRCUIT_PORT: u16 = 1;

/// Whether `addr` is a virtual address: a relayed circuit or a TCP link
/// (see [`crate::tcp`]), in either family's form. Virtual addresses mean
/// something only inside this process: they are never published, never
/// put in routing tables, never remembered as a peer's address.
pub fn is_virtual(addr: &SocketAddr) -> bool {
    virtual_index(addr).is_some() || crate::tcp::is_link(addr)
}

fn virtual_index(addr: &SocketAddr) -> Option<u32> {
    if addr.port() != CIRCUIT_PORT {
        return None;
    }
    let v4 = match addr.ip() {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(v6) => v6.to_ipv4_mapped()?,
    };
    let bits = u32::from(v4);
    (bits & 0xF000_0000 == VIRTUAL_NET && bits != u32::MAX).then_some(bits & 0x0FFF_FFFF)
}

fn virtual_addr(index: u32, v6: bool) -> SocketAddr {
    let v4 = Ipv4Addr::from(VIRTUAL_NET | (index & 0x0FFF_FFFF));
    let ip = if v6 {
        IpAddr::V6(v4.to_ipv6_mapped())
    } else {
        IpAddr::V4(v4)
    };
    SocketAddr::new(ip, CIRCUIT_PORT)
}

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

/// One circuit a relay forwards.
#[derive(Debug, Clone)]
struct Circuit {
    a: SocketAddr,
    b: SocketAddr,
    a_peer: PeerId,
    /// The reservation holder: its allowance pays for the circuit.
    b_peer: PeerId,
    opened: Instant,
    last_active: Instant,
    used: bool,
}

/// A circuit as `/debug` and tests see it.
#[derive(Debug, Clone, Serialize)]
pub struct CircuitInfo {
    pub circuit: u64,
    pub from: PeerId,
    pub to: PeerId,
    pub idle_ms: u64,
}

#[derive(Default)]
struct ClientPaths {
    by_index: HashMap<u32, VirtualPath>,
    by_circuit: HashMap<(SocketAddr, u64), u32>,
}

struct RelayState {
    reservations: Reservations,
    circuits: HashMap<u64, Circuit>,
    clock: Instant,
}

/// Counters of the relay data path.
#[derive(Debug, Default)]
pub struct RelayPathStats {
    /// Frames this node forwarded as a relay, and their bytes.
    pub forwarded_packets: AtomicU64,
    pub forwarded_bytes: AtomicU64,
    /// Frames dropped: unknown circuit, or from an address not bound to it.
    pub dropped_unknown: AtomicU64,
    /// Frames dropped over the reservation holder's rate allowance.
    pub dropped_rate_limited: AtomicU64,
    /// Relayed packets sent and received as a client.
    pub client_sent: AtomicU64,
    pub client_received: AtomicU64,
}

/// The relay circuits of one node, shared with its socket.
pub struct RelayPaths {
    v6: bool,
    next_index: AtomicU32,
    client: RwLock<ClientPaths>,
    relay: Mutex<RelayState>,
    pub stats: RelayPathStats,
}

impl RelayPaths {
    /// `v6`: whether the node's socket is IPv6 (virtual addresses then take
    /// the IPv4-mapped form quinn uses on such sockets).
    pub fn new(v6: bool, limits: RelayLimits) -> Self {
        RelayPaths {
            v6,
            next_index: AtomicU32::new(1),
            client: RwLock::new(ClientPaths::default()),
            relay: Mutex::new(RelayState {
                reservations: Reservations::new(limits),
                circuits: HashMap::new(),
                clock: Instant::now(),
            }),
            stats: RelayPathStats::default(),
        }
    }

    fn client_read(&self) -> std::sync::RwLockReadGuard<'_, ClientPaths> {
        self.client.read().unwrap_or_else(|p| p.into_inner())
    }

    fn client_write(&self) -> std::sync::RwLockWriteGuard<'_, ClientPaths> {
        self.client.write().unwrap_or_else(|p| p.into_inner())
    }

    fn relay_state(&self) -> std::sync::MutexGuard<'_, RelayState> {
        self.relay.lock().unwrap_or_else(|p| p.into_inner())
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
            return Some(virtual_addr(i, self.v6));
        }
        if c.by_index.len() >= MAX_VIRTUAL_PATHS {
            return None;
        }
        let index = self.next_index.fetch_add(1, Ordering::Relaxed) & 0x0FFF_FFFF;
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
        Some(virtual_addr(index, self.v6))
    }

    /// Forgets a virtual address (its connection closed or never came).
    pub fn forget_virtual(&self, addr: &SocketAddr) {
        let Some(index) = virtual_index(addr) else {
            return;
        };
        let mut c = self.client_write();
        if let Some(p) = c.by_index.remove(&index) {
            c.by_circuit.remove(&(p.relay_addr, p.circuit));
        }
    }

    /// Marks a virtual address as carrying a registered connection.
    pub fn mark_used(&self, addr: &SocketAddr) {
        let Some(index) = virtual_index(addr) else {
            return;
        };
        if let Some(p) = self.client_write().by_index.get_mut(&index) {
            p.used = true;
        }
    }

    /// Where the virtual address `addr` leads.
    pub fn path(&self, addr: &SocketAddr) -> Option<VirtualPath> {
        let index = virtual_index(addr)?;
        self.client_read().by_index.get(&index).copied()
    }

    /// The virtual address of frames of `circuit` arriving from `from`.
    pub fn virtual_for(&self, from: SocketAddr, circuit: u64) -> Option<SocketAddr> {
        let index = *self.client_read().by_circuit.get(&(from, circuit))?;
        Some(virtual_addr(index, self.v6))
    }

    /// Virtual addresses in use.
    pub fn virtual_count(&self) -> usize {
        self.client_read().by_index.len()
    }

    // ---- relay side ----

    /// Grants or renews `client`'s reservation.
    pub fn reserve(
        &self,
        client: PeerId,
    ) -> Result<Duration, reach_proto::relay::service::RefuseReason> {
        let mut r = self.relay_state();
        let now = r.clock.elapsed();
        let grant = r.reservations.reserve(client, now)?;
        Ok(grant.expires.saturating_sub(now))
    }

    /// Whether `client` holds a reservation here.
    pub fn has_reservation(&self, client: &PeerId) -> bool {
        let mut r = self.relay_state();
        let now = r.clock.elapsed();
        r.reservations.expire(now);
        r.reservations.holds(client)
    }

    /// Drops circuit `id` if `by` is one of its ends (its connection over
    /// it closed). Returns whether it did.
    pub fn close_circuit(&self, id: u64, by: &PeerId) -> bool {
        let mut r = self.relay_state();
        let is_end = r
            .circuits
            .get(&id)
            .is_some_and(|c| c.a_peer == *by || c.b_peer == *by);
        if is_end {
            r.circuits.remove(&id);
        }
        is_end
    }

    /// Whether a circuit joins `a` and `b` (either way round).
    pub fn has_circuit_between(&self, a: &PeerId, b: &PeerId) -> bool {
        self.relay_state()
            .circuits
            .values()
            .any(|c| (c.a_peer == *a && c.b_peer == *b) || (c.a_peer == *b && c.b_peer == *a))
    }

    /// Drops `client`'s reservation and every circuit it is an end of.
    pub fn release(&self, client: &PeerId) {
        let mut r = self.relay_state();
        r.reservations.release(client);
        r.circuits
            .retain(|_, c| c.a_peer != *client && c.b_peer != *client);
    }

    /// Reservations held here.
    pub fn reservation_count(&self) -> usize {
        self.relay_state().reservations.len()
    }

    /// Opens circuit `id` between `a` (the dialer) and `b` (the reservation
    /// holder). False if at [`MAX_CIRCUITS`] or the id is taken.
    pub fn open_circuit(&self, id: u64, a: (PeerId, SocketAddr), b: (PeerId, SocketAddr)) -> bool {
        let mut r = self.relay_state();
        let per_peer = |p: &PeerId| {
            r.circuits
                .values()
                .filter(|c| c.a_peer == *p || c.b_peer == *p)
                .count()
        };
        if r.circuits.len() >= MAX_CIRCUITS
            || r.circuits.contains_key(&id)
            || per_peer(&a.0) >= MAX_CIRCUITS_PER_PEER
            || per_peer(&b.0) >= MAX_CIRCUITS_PER_PEER
        {
            return false;
        }
        r.circuits.insert(
            id,
            Circuit {
                a: a.1,
                b: b.1,
                a_peer: a.0,
                b_peer: b.0,
                opened: Instant::now(),
                last_active: Instant::now(),
                used: false,
            },
        );
        true
    }

    /// Whether more circuits fit.
    pub fn circuits_full(&self) -> bool {
        self.relay_state().circuits.len() >= MAX_CIRCUITS
    }

    /// Drops circuits idle for `idle` and expired reservations.
    pub fn expire(&self, idle: Duration) {
        let mut r = self.relay_state();
        let now = r.clock.elapsed();
        let gone = r.reservations.expire(now);
        r.circuits.retain(|_, c| {
            c.last_active.elapsed() < idle
                && !gone.contains(&c.b_peer)
                && (c.used || c.opened.elapsed() < UNUSED_CIRCUIT_EXPIRY)
        });
    }

    /// The circuits this node forwards.
    pub fn circuits(&self) -> Vec<CircuitInfo> {
        let r = self.relay_state();
        let mut out: Vec<CircuitInfo> = r
            .circuits
            .iter()
            .map(|(id, c)| CircuitInfo {
                circuit: *id,
                from: c.a_peer,
                to: c.b_peer,
                idle_ms: c.last_active.elapsed().as_millis() as u64,
            })
            .collect();
        out.sort_by_key(|c| c.circuit);
        out
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
        let mut r = self.relay_state();
        let now = r.clock.elapsed();
        let Some(c) = r.circuits.get_mut(&circuit) else {
            self.stats
                .dropped_unknown
                .fetch_add(packets, Ordering::Relaxed);
            return None;
        };
        let to = if from == c.a {
            c.b
        } else if from == c.b {
            c.a
        } else {
            self.stats
                .dropped_unknown
                .fetch_add(packets, Ordering::Relaxed);
            return None;
        };
        c.last_active = Instant::now();
        c.used = true;
        let holder = c.b_peer;
        match r.reservations.admit_batch(&holder, len, packets, now) {
            Ok(()) => Some(to),
            Err(RelayDrop::RateLimited) => {
                self.stats
                    .dropped_rate_limited
                    .fetch_add(packets, Ordering::Relaxed);
                None
            }
            Err(RelayDrop::NoReservation) => {
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
    use reach_proto::Keypair;
    use std::net::Ipv6Addr;

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
