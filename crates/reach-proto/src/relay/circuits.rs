//! A relay's circuit table, sans-IO: which circuits it forwards, between
//! which two addresses, for how long, and within whose allowance.
//!
//! A circuit binds a random id to the two addresses of the clients' own
//! QUIC connections to the relay: the dialer (`a`) and the reservation
//! holder (`b`). A frame is forwarded only from one of those addresses to
//! the other, unchanged and unread, and only while the holder's rate
//! allowance ([`Reservations`]) admits it. Circuits end when one of their
//! two ends closes them, when either end releases its reservation, when the
//! holder's reservation expires, or when they idle out.
//!
//! The runtime owns the sockets and the clock: it passes `now` (time since
//! an epoch of its choosing) into every call that depends on time, and
//! calls [`Circuits::expire`] as time passes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::service::{Drop as ReservationDrop, RefuseReason, RelayLimits, Reservations};
use crate::PeerId;

/// Circuits a relay forwards at once at most.
pub const MAX_CIRCUITS: usize = 4096;
/// Circuits one peer may have open at a relay at once, as dialer or as
/// target: no single peer can take every circuit.
pub const MAX_CIRCUITS_PER_PEER: usize = 64;
/// A circuit that has carried no frame this long after opening is dropped
/// (a handshake takes far less; idle circuits in use have keep-alives).
pub const UNUSED_CIRCUIT_EXPIRY: Duration = Duration::from_secs(15);

/// One end of a circuit: the peer, and the address of its own connection
/// to the relay.
pub type End = (PeerId, SocketAddr);

/// Why a circuit was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenRefused {
    /// [`MAX_CIRCUITS`] are open.
    Full,
    /// One of the ends has [`MAX_CIRCUITS_PER_PEER`] open.
    PeerLimit,
    /// The id is taken.
    IdTaken,
}

/// Why a frame was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardDrop {
    /// No circuit of that id.
    UnknownCircuit,
    /// The frame came from neither of the circuit's two addresses.
    NotAnEnd,
    /// The reservation holder's reservation is gone.
    NoReservation,
    /// Over the holder's bandwidth or packet-rate allowance.
    RateLimited,
}

/// A circuit as `/debug` and tests see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CircuitInfo {
    /// The circuit's id (frames carry it).
    pub circuit: u64,
    /// The dialer.
    pub from: PeerId,
    /// The reservation holder.
    pub to: PeerId,
    /// Time since the circuit last carried a frame (or opened).
    pub idle_ms: u64,
}

#[derive(Debug, Clone)]
struct Circuit {
    a: SocketAddr,
    b: SocketAddr,
    a_peer: PeerId,
    /// The reservation holder: its allowance pays for the circuit.
    b_peer: PeerId,
    opened: Duration,
    last_active: Duration,
    used: bool,
}

impl Circuit {
    fn has_end(&self, p: &PeerId) -> bool {
        self.a_peer == *p || self.b_peer == *p
    }

    /// Its distinct ends (one, if a peer dialed itself).
    fn peers(&self) -> impl Iterator<Item = PeerId> {
        let b = (self.b_peer != self.a_peer).then_some(self.b_peer);
        std::iter::once(self.a_peer).chain(b)
    }
}

/// Counts, per peer, the circuits it is an end of.
fn uncount(per_peer: &mut HashMap<PeerId, usize>, c: &Circuit) {
    for p in c.peers() {
        if let Some(n) = per_peer.get_mut(&p) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per_peer.remove(&p);
            }
        }
    }
}

/// A relay's reservations and the circuits it forwards.
#[derive(Debug)]
pub struct Circuits {
    reservations: Reservations,
    circuits: HashMap<u64, Circuit>,
    /// Circuits per end, for [`MAX_CIRCUITS_PER_PEER`].
    per_peer: HashMap<PeerId, usize>,
}

impl Circuits {
    /// A relay with no reservation and no circuit, enforcing `limits`.
    pub fn new(limits: RelayLimits) -> Self {
        Circuits {
            reservations: Reservations::new(limits),
            circuits: HashMap::new(),
            per_peer: HashMap::new(),
        }
    }

    /// Drops the circuits for which `keep` is false.
    fn retain(&mut self, mut keep: impl FnMut(&Circuit) -> bool) {
        let per_peer = &mut self.per_peer;
        self.circuits.retain(|_, c| {
            let k = keep(c);
            if !k {
                uncount(per_peer, c);
            }
            k
        });
    }

    // ---- reservations ----

    /// Grants or renews `client`'s reservation; returns how long it lasts.
    pub fn reserve(&mut self, client: PeerId, now: Duration) -> Result<Duration, RefuseReason> {
        let grant = self.reservations.reserve(client, now)?;
        Ok(grant.expires.saturating_sub(now))
    }

    /// Whether `client` holds an unexpired reservation at `now`.
    pub fn has_reservation(&mut self, client: &PeerId, now: Duration) -> bool {
        self.reservations.expire(now);
        self.reservations.holds(client)
    }

    /// Drops `client`'s reservation and every circuit it is an end of (it
    /// left, or its connection to the relay closed).
    pub fn release(&mut self, client: &PeerId) {
        self.reservations.release(client);
        self.retain(|c| !c.has_end(client));
    }

    /// Reservations held (as of the last expiry).
    pub fn reservation_count(&self) -> usize {
        self.reservations.len()
    }

    // ---- circuits ----

    /// Opens circuit `id` between `a` (the dialer) and `b` (the reservation
    /// holder).
    pub fn open(&mut self, id: u64, a: End, b: End, now: Duration) -> Result<(), OpenRefused> {
        if self.is_full() {
            return Err(OpenRefused::Full);
        }
        if self.circuits.contains_key(&id) {
            return Err(OpenRefused::IdTaken);
        }
        let count = |p: &PeerId| self.per_peer.get(p).copied().unwrap_or(0);
        if count(&a.0) >= MAX_CIRCUITS_PER_PEER || count(&b.0) >= MAX_CIRCUITS_PER_PEER {
            return Err(OpenRefused::PeerLimit);
        }
        let c = Circuit {
            a: a.1,
            b: b.1,
            a_peer: a.0,
            b_peer: b.0,
            opened: now,
            last_active: now,
            used: false,
        };
        for p in c.peers() {
            *self.per_peer.entry(p).or_default() += 1;
        }
        self.circuits.insert(id, c);
        Ok(())
    }

    /// Whether [`MAX_CIRCUITS`] are open.
    pub fn is_full(&self) -> bool {
        self.circuits.len() >= MAX_CIRCUITS
    }

    /// Drops circuit `id` if `by` is one of its ends (its connection over
    /// it closed). Returns whether it did.
    pub fn close(&mut self, id: u64, by: &PeerId) -> bool {
        let is_end = self.circuits.get(&id).is_some_and(|c| c.has_end(by));
        if is_end && let Some(c) = self.circuits.remove(&id) {
            uncount(&mut self.per_peer, &c);
        }
        is_end
    }

    /// Whether a circuit joins `a` and `b` (either way round).
    pub fn has_circuit_between(&self, a: &PeerId, b: &PeerId) -> bool {
        self.circuits
            .values()
            .any(|c| (c.a_peer == *a && c.b_peer == *b) || (c.a_peer == *b && c.b_peer == *a))
    }

    /// Where to forward `packets` frames of `circuit` (`len` bytes in all)
    /// that came from `from`: the other end, if `from` is an end and the
    /// holder's allowance admits them. A frame from an end counts as use
    /// of the circuit even when the allowance drops it.
    pub fn forward(
        &mut self,
        circuit: u64,
        from: SocketAddr,
        len: usize,
        packets: u64,
        now: Duration,
    ) -> Result<SocketAddr, ForwardDrop> {
        let c = self
            .circuits
            .get_mut(&circuit)
            .ok_or(ForwardDrop::UnknownCircuit)?;
        let to = if from == c.a {
            c.b
        } else if from == c.b {
            c.a
        } else {
            return Err(ForwardDrop::NotAnEnd);
        };
        c.last_active = now;
        c.used = true;
        let holder = c.b_peer;
        match self.reservations.admit_batch(&holder, len, packets, now) {
            Ok(()) => Ok(to),
            Err(ReservationDrop::RateLimited) => Err(ForwardDrop::RateLimited),
            Err(ReservationDrop::NoReservation) => Err(ForwardDrop::NoReservation),
        }
    }

    /// Drops expired and idle reservations, and the circuits that are idle
    /// for `idle`, never used within [`UNUSED_CIRCUIT_EXPIRY`] of opening,
    /// or whose holder no longer has a reservation.
    pub fn expire(&mut self, now: Duration, idle: Duration) {
        self.reservations.expire(now);
        let reservations = &self.reservations;
        let per_peer = &mut self.per_peer;
        self.circuits.retain(|_, c| {
            let keep = now.saturating_sub(c.last_active) < idle
                && reservations.holds(&c.b_peer)
                && (c.used || now.saturating_sub(c.opened) < UNUSED_CIRCUIT_EXPIRY);
            if !keep {
                uncount(per_peer, c);
            }
            keep
        });
    }

    /// The open circuits, by id.
    pub fn list(&self, now: Duration) -> Vec<CircuitInfo> {
        let mut out: Vec<CircuitInfo> = self
            .circuits
            .iter()
            .map(|(id, c)| CircuitInfo {
                circuit: *id,
                from: c.a_peer,
                to: c.b_peer,
                idle_ms: now.saturating_sub(c.last_active).as_millis() as u64,
            })
            .collect();
        out.sort_by_key(|c| c.circuit);
        out
    }

    /// Open circuits.
    pub fn len(&self) -> usize {
        self.circuits.len()
    }

    /// Whether no circuit is open.
    pub fn is_empty(&self) -> bool {
        self.circuits.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Keypair;
    use crate::relay::service::IDLE_EXPIRY;

    fn peer(i: u16) -> PeerId {
        let mut secret = [7u8; 32];
        secret[..2].copy_from_slice(&i.to_le_bytes());
        Keypair::from_secret_bytes(secret).peer_id()
    }

    fn addr(i: u16) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, 1], 1000 + i))
    }

    fn end(i: u16) -> End {
        (peer(i), addr(i))
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    /// A table where peer 2 holds a reservation and circuit 9 joins peer 1
    /// (dialer) to it.
    fn one_circuit(limits: RelayLimits) -> Circuits {
        let mut c = Circuits::new(limits);
        c.reserve(peer(2), S(0)).unwrap();
        c.open(9, end(1), end(2), S(0)).unwrap();
        c
    }

    #[test]
    fn an_unused_circuit_expires_and_a_used_one_does_not() {
        let mut c = Circuits::new(RelayLimits::default());
        c.reserve(peer(2), S(0)).unwrap();
        c.open(1, end(1), end(2), S(0)).unwrap();
        c.open(2, end(3), end(2), S(0)).unwrap();
        // Circuit 2 carries a frame; circuit 1 never does.
        let at = Duration::from_millis(100);
        assert_eq!(c.forward(2, addr(3), 100, 1, at), Ok(addr(2)));
        let just_before = UNUSED_CIRCUIT_EXPIRY - Duration::from_millis(1);
        c.expire(just_before, IDLE_EXPIRY);
        assert_eq!(c.len(), 2, "nothing expires early");
        c.expire(UNUSED_CIRCUIT_EXPIRY, IDLE_EXPIRY);
        let left: Vec<u64> = c
            .list(UNUSED_CIRCUIT_EXPIRY)
            .iter()
            .map(|i| i.circuit)
            .collect();
        assert_eq!(left, vec![2]);
        assert_eq!(
            c.forward(1, addr(1), 100, 1, UNUSED_CIRCUIT_EXPIRY),
            Err(ForwardDrop::UnknownCircuit)
        );
    }

    #[test]
    fn a_used_circuit_idles_out_after_the_idle_expiry_unless_it_carries_frames() {
        let idle = S(30);
        let mut c = one_circuit(RelayLimits::default());
        // Keep the holder's reservation alive and the circuit busy.
        let mut t = S(0);
        while t < S(100) {
            assert_eq!(c.forward(9, addr(1), 10, 1, t), Ok(addr(2)));
            c.expire(t, idle);
            t += S(10);
        }
        assert_eq!(c.list(t)[0].idle_ms, 10_000);
        c.expire(t + idle - S(10), idle);
        assert!(c.is_empty(), "idle for {idle:?}: dropped");
    }

    #[test]
    fn circuits_of_a_holder_whose_reservation_expired_are_dropped() {
        let limits = RelayLimits::default();
        let mut c = one_circuit(limits);
        assert_eq!(c.forward(9, addr(1), 10, 1, S(1)), Ok(addr(2)));
        let later = S(1) + limits.idle_expiry;
        assert!(!c.has_reservation(&peer(2), later));
        c.expire(later, Duration::MAX);
        assert!(c.is_empty());
    }

    #[test]
    fn the_total_and_per_peer_caps_refuse() {
        let mut c = Circuits::new(RelayLimits::default());
        // 64 dialers × 64 holders: every peer at its per-peer cap, and the
        // table at its total cap.
        let side = MAX_CIRCUITS_PER_PEER as u16;
        assert_eq!(usize::from(side) * usize::from(side), MAX_CIRCUITS);
        let mut id = 0;
        for i in 0..side {
            for j in side..2 * side {
                c.open(id, end(i), end(j), S(0)).unwrap();
                id += 1;
            }
        }
        assert!(c.is_full());
        assert_eq!(
            c.open(id, end(1000), end(1001), S(0)),
            Err(OpenRefused::Full)
        );
        // One circuit closes: strangers get the slot, a capped peer does not.
        assert!(c.close(0, &peer(0)));
        assert_eq!(
            c.open(id, end(1), end(1001), S(0)),
            Err(OpenRefused::PeerLimit)
        );
        assert_eq!(
            c.open(id, end(1000), end(side + 1), S(0)),
            Err(OpenRefused::PeerLimit)
        );
        assert_eq!(c.open(id, end(1000), end(1001), S(0)), Ok(()));
        assert_eq!(
            c.open(id + 1, end(1002), end(1003), S(0)),
            Err(OpenRefused::Full)
        );
        // A capped peer that leaves takes its circuits' slots with it, and
        // has its whole allowance again when it comes back.
        c.release(&peer(1));
        assert_eq!(c.len(), MAX_CIRCUITS - MAX_CIRCUITS_PER_PEER);
        for k in 0..side {
            c.open(id + 1 + u64::from(k), end(1), end(2000 + k), S(0))
                .unwrap();
        }
        assert!(c.is_full());
        assert!(c.close(1, &peer(0)));
        assert_eq!(
            c.open(id + 100, end(1), end(1002), S(0)),
            Err(OpenRefused::PeerLimit)
        );
    }

    #[test]
    fn an_id_is_not_opened_twice() {
        let mut c = one_circuit(RelayLimits::default());
        assert_eq!(c.open(9, end(3), end(2), S(0)), Err(OpenRefused::IdTaken));
        assert_eq!(c.list(S(0)).len(), 1);
        assert_eq!(c.list(S(0))[0].from, peer(1));
    }

    #[test]
    fn frames_go_only_between_the_two_bound_ends_within_the_allowance() {
        let limits = RelayLimits {
            packets_per_sec: 3,
            ..RelayLimits::default()
        };
        let mut c = one_circuit(limits);
        assert_eq!(c.forward(9, addr(1), 100, 1, S(0)), Ok(addr(2)));
        assert_eq!(c.forward(9, addr(2), 100, 1, S(0)), Ok(addr(1)));
        // A third address (even a peer's real one elsewhere) is no end.
        assert_eq!(
            c.forward(9, addr(3), 100, 1, S(0)),
            Err(ForwardDrop::NotAnEnd)
        );
        assert_eq!(
            c.forward(8, addr(1), 100, 1, S(0)),
            Err(ForwardDrop::UnknownCircuit)
        );
        // The third packet within the second is allowed; the fourth is over.
        assert_eq!(c.forward(9, addr(1), 100, 1, S(0)), Ok(addr(2)));
        assert_eq!(
            c.forward(9, addr(1), 100, 1, S(0)),
            Err(ForwardDrop::RateLimited)
        );
        // A batch counts every packet in it.
        assert_eq!(
            c.forward(9, addr(1), 200, 2, S(1) - Duration::from_millis(400)),
            Err(ForwardDrop::RateLimited)
        );
        assert_eq!(c.forward(9, addr(1), 200, 2, S(1)), Ok(addr(2)));
    }

    #[test]
    fn releasing_a_client_drops_its_reservation_and_its_circuits() {
        let mut c = one_circuit(RelayLimits::default());
        c.reserve(peer(4), S(0)).unwrap();
        c.open(10, end(3), end(4), S(0)).unwrap();
        // The dialer's release drops its circuit too.
        c.open(11, end(1), end(4), S(0)).unwrap();
        c.release(&peer(2));
        assert!(!c.has_reservation(&peer(2), S(1)));
        assert_eq!(
            c.forward(9, addr(1), 10, 1, S(1)),
            Err(ForwardDrop::UnknownCircuit)
        );
        c.release(&peer(1));
        let left: Vec<u64> = c.list(S(1)).iter().map(|i| i.circuit).collect();
        assert_eq!(left, vec![10]);
        assert_eq!(c.reservation_count(), 1);
        assert!(c.has_circuit_between(&peer(4), &peer(3)));
        assert!(!c.has_circuit_between(&peer(4), &peer(1)));
    }

    #[test]
    fn only_an_end_closes_a_circuit() {
        let mut c = one_circuit(RelayLimits::default());
        assert!(!c.close(9, &peer(3)), "a stranger");
        assert!(!c.close(8, &peer(1)), "no such circuit");
        assert_eq!(c.len(), 1);
        assert!(c.close(9, &peer(2)));
        assert!(c.is_empty());
        assert!(!c.close(9, &peer(1)), "already closed");
    }
}
