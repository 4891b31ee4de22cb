//! The relay service's bookkeeping, sans-IO: who holds a reservation, for
//! how long, and how much each client may push through.
//!
//! The runtime asks [`Reservations::reserve`] when a client wants a relay
//! slot, [`Reservations::admit`] for every packet it is about to forward
//! (the relay never reads them: it only counts), and calls
//! [`Reservations::expire`] as time passes. Limits are named, configurable
//! values; the defaults make relayed traffic a real data path, not a
//! signalling trickle.

use std::collections::HashMap;
use std::time::Duration;

use crate::PeerId;
use crate::limits::TokenBucket;

/// Default: clients one relay serves at once.
pub const MAX_CLIENTS: usize = 512;
/// Default: a reservation lasts this long unless renewed; clients renew at
/// half-life.
pub const RESERVATION_TTL: Duration = Duration::from_secs(600);
/// Default: per-client bandwidth through the relay (bytes/s). 8 MiB/s is a
/// real data path (rust-libp2p's default circuit is 128 KiB in total).
pub const MAX_BYTES_PER_SEC: u64 = 8 * 1024 * 1024;
/// Default: per-client packet rate (packets/s).
pub const MAX_PACKETS_PER_SEC: u64 = 8192;
/// Default: a reservation with no traffic for this long is dropped.
pub const IDLE_EXPIRY: Duration = Duration::from_secs(120);
/// Token buckets hold this many seconds of allowance (bursts).
pub const BURST: Duration = Duration::from_secs(1);

/// The relay's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayLimits {
    /// Clients served at once ([`MAX_CLIENTS`]).
    pub max_clients: usize,
    /// How long a reservation lasts without renewal ([`RESERVATION_TTL`]).
    pub reservation_ttl: Duration,
    /// Per-client bandwidth, bytes/s ([`MAX_BYTES_PER_SEC`]).
    pub bytes_per_sec: u64,
    /// Per-client packet rate, packets/s ([`MAX_PACKETS_PER_SEC`]).
    pub packets_per_sec: u64,
    /// A reservation without traffic this long is dropped
    /// ([`IDLE_EXPIRY`]).
    pub idle_expiry: Duration,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            max_clients: MAX_CLIENTS,
            reservation_ttl: RESERVATION_TTL,
            bytes_per_sec: MAX_BYTES_PER_SEC,
            packets_per_sec: MAX_PACKETS_PER_SEC,
            idle_expiry: IDLE_EXPIRY,
        }
    }
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RefuseReason {
    #[error("the relay is at its client limit")]
    /// Every client slot is taken (see [`RelayLimits::max_clients`]).
    Full,
}

impl RefuseReason {
    /// A stable name of the reason, for the wire and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            RefuseReason::Full => "relay_full",
        }
    }
}

/// Why a packet was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// The sender holds no reservation.
    NoReservation,
    /// Over its bandwidth or packet-rate allowance.
    RateLimited,
}

/// A granted reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// When the reservation lapses unless renewed (driver's clock).
    pub expires: Duration,
    /// Whether the client already held one.
    pub renewed: bool,
}

#[derive(Debug, Clone)]
struct Client {
    expires: Duration,
    last_active: Duration,
    bytes: TokenBucket,
    packets: TokenBucket,
    forwarded_bytes: u64,
}

/// The relay's reservations.
#[derive(Debug, Default)]
pub struct Reservations {
    limits: RelayLimits,
    clients: HashMap<PeerId, Client>,
}

impl Reservations {
    /// No reservation yet, enforcing `limits`.
    pub fn new(limits: RelayLimits) -> Self {
        Reservations {
            limits,
            clients: HashMap::new(),
        }
    }

    /// Grants or renews `client`'s reservation.
    pub fn reserve(&mut self, client: PeerId, now: Duration) -> Result<Grant, RefuseReason> {
        let expires = now + self.limits.reservation_ttl;
        if let Some(c) = self.clients.get_mut(&client) {
            c.expires = expires;
            c.last_active = now;
            return Ok(Grant {
                expires,
                renewed: true,
            });
        }
        self.expire(now);
        if self.clients.len() >= self.limits.max_clients {
            return Err(RefuseReason::Full);
        }
        self.clients.insert(
            client,
            Client {
                expires,
                last_active: now,
                bytes: TokenBucket::new(self.limits.bytes_per_sec, BURST, now),
                packets: TokenBucket::new(self.limits.packets_per_sec, BURST, now),
                forwarded_bytes: 0,
            },
        );
        Ok(Grant {
            expires,
            renewed: false,
        })
    }

    /// Whether a packet of `len` bytes from `client` may be forwarded now.
    pub fn admit(&mut self, client: &PeerId, len: usize, now: Duration) -> Result<(), Drop> {
        self.admit_batch(client, len, 1, now)
    }

    /// Whether `packets` packets of `len` bytes in all may be forwarded now
    /// (a batch the kernel coalesced).
    pub fn admit_batch(
        &mut self,
        client: &PeerId,
        len: usize,
        packets: u64,
        now: Duration,
    ) -> Result<(), Drop> {
        let c = self
            .clients
            .get_mut(client)
            .filter(|c| c.expires > now)
            .ok_or(Drop::NoReservation)?;
        if !c.packets.take(packets, now) || !c.bytes.take(len as u64, now) {
            return Err(Drop::RateLimited);
        }
        c.last_active = now;
        c.forwarded_bytes += len as u64;
        Ok(())
    }

    /// Drops expired and idle reservations; returns who lost theirs.
    pub fn expire(&mut self, now: Duration) -> Vec<PeerId> {
        let idle = self.limits.idle_expiry;
        let gone: Vec<PeerId> = self
            .clients
            .iter()
            .filter(|(_, c)| c.expires <= now || now.saturating_sub(c.last_active) >= idle)
            .map(|(p, _)| *p)
            .collect();
        for p in &gone {
            self.clients.remove(p);
        }
        gone
    }

    /// Cancels `client`'s reservation (it disconnected).
    pub fn release(&mut self, client: &PeerId) {
        self.clients.remove(client);
    }

    /// Whether `client` holds an unexpired reservation (as of the last
    /// `expire`).
    pub fn holds(&self, client: &PeerId) -> bool {
        self.clients.contains_key(client)
    }

    /// Reservations held.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Whether no reservation is held.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Bytes forwarded for `client` so far (what the relay learns: who
    /// talks, and how much).
    pub fn forwarded_bytes(&self, client: &PeerId) -> u64 {
        self.clients.get(client).map_or(0, |c| c.forwarded_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Keypair;

    fn peer(i: u8) -> PeerId {
        Keypair::from_secret_bytes([i; 32]).peer_id()
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn refuses_cleanly_at_the_client_limit_and_frees_slots_on_expiry() {
        let limits = RelayLimits {
            max_clients: 2,
            ..RelayLimits::default()
        };
        let mut r = Reservations::new(limits);
        assert!(r.reserve(peer(1), S(0)).is_ok());
        assert!(r.reserve(peer(2), S(0)).is_ok());
        assert_eq!(r.reserve(peer(3), S(1)), Err(RefuseReason::Full));
        // Renewal of an existing client always works.
        assert_eq!(
            r.reserve(peer(1), S(2)),
            Ok(Grant {
                expires: S(2) + RESERVATION_TTL,
                renewed: true
            })
        );
        // After peer 2 idles out, peer 3 gets its slot.
        let later = S(0) + IDLE_EXPIRY;
        r.admit(&peer(1), 100, later - S(1)).unwrap();
        assert!(r.reserve(peer(3), later).is_ok());
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn forwards_only_for_reserved_clients_within_their_allowance() {
        let limits = RelayLimits {
            bytes_per_sec: 10_000,
            packets_per_sec: 1_000,
            ..RelayLimits::default()
        };
        let mut r = Reservations::new(limits);
        assert_eq!(r.admit(&peer(1), 10, S(0)), Err(Drop::NoReservation));
        r.reserve(peer(1), S(0)).unwrap();
        // A one-second burst of 10,000 bytes, then the bucket is dry…
        assert!((0..10).all(|_| r.admit(&peer(1), 1000, S(0)).is_ok()));
        assert_eq!(r.admit(&peer(1), 1000, S(0)), Err(Drop::RateLimited));
        // …and refills at the configured rate.
        assert!(
            r.admit(&peer(1), 1000, S(0) + Duration::from_millis(100))
                .is_ok()
        );
        assert_eq!(r.forwarded_bytes(&peer(1)), 11_000);
    }

    #[test]
    fn the_default_allowance_is_a_data_path() {
        let mut r = Reservations::new(RelayLimits::default());
        r.reserve(peer(1), S(0)).unwrap();
        // 10 s of 1,200-byte packets at 6 MiB/s all pass.
        let per_sec = 6 * 1024 * 1024 / 1200;
        let mut t = Duration::ZERO;
        let step = Duration::from_secs(1) / per_sec;
        for _ in 0..(per_sec * 10) {
            assert!(r.admit(&peer(1), 1200, t).is_ok(), "dropped at {t:?}");
            t += step;
        }
    }

    #[test]
    fn reservations_expire_without_renewal() {
        let mut r = Reservations::new(RelayLimits::default());
        r.reserve(peer(1), S(0)).unwrap();
        assert_eq!(
            r.admit(&peer(1), 1, RESERVATION_TTL),
            Err(Drop::NoReservation)
        );
        assert_eq!(r.expire(RESERVATION_TTL), vec![peer(1)]);
        assert!(r.is_empty());
    }
}
