//! Limits on inbound connections, checked before any handshake work.
//!
//! Every inbound connection, from its first packet until it closes, holds a
//! [`Slot`]: it counts against the node's total, its source IP and its
//! network (/24 for IPv4, /48 for IPv6), and while its handshake runs
//! against the handshakes in flight. A connection attempt over any of these
//! limits is refused at once (quinn's `Incoming::refuse`: one small packet
//! back, no crypto, no state kept), so a flood from one host costs the node
//! little memory and leaves room for everyone else.
//!
//! Loopback sources are exempt from the per-IP and per-network limits by
//! default, as the DHT's routing table exempts them from its per-/24 rule:
//! a loopback peer can only be this machine, and tests run hundreds of
//! honest nodes on 127.0.0.1. [`ConnectionLimits::limit_loopback`] turns
//! the exemption off (the flood benchmark does, to measure the limits on
//! loopback). The total and the handshakes in flight are always limited.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Default: inbound connections at once (handshaking or established). At
/// about 90 KiB of QUIC state each, 1,024 bound them to about 90 MiB, while
/// a public node still serves a thousand peers at once.
pub const MAX_INBOUND_CONNECTIONS: usize = 1024;
/// Default: inbound connections from one IP address. Several honest nodes
/// may share an address (a NAT, a carrier-grade NAT), but 32 of them
/// dialing one node at once is already unusual; a flooder gets no more.
pub const MAX_CONNECTIONS_PER_IP: usize = 32;
/// Default: inbound connections from one /24 (IPv4) or /48 (IPv6): what one
/// network (a hoster, a site) may take, a eighth of the total, so at least
/// eight networks always find room.
pub const MAX_CONNECTIONS_PER_PREFIX: usize = 128;
/// Default: handshakes in flight at once. A handshake costs a signature and
/// a few packets; bounding them bounds the CPU a burst can take. Above the
/// per-network limit, so one network can never hold every handshake slot.
pub const MAX_HANDSHAKES_IN_FLIGHT: usize = 256;
/// Default: an inbound connection that has carried no stream and no
/// datagram either way this long after its handshake is closed, when it
/// takes room others may need: its IP or network holds at least half its
/// limit, or the node half its total (checked again every this long).
/// Every honest use starts with a request or a message right after the
/// handshake; a connection that only shook hands and sits silent is a
/// flood's cheapest way to hold memory. Without pressure it stays: the
/// dialer may hold it as its current connection, and closing it under
/// a send would fail that send.
pub const SILENT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Default: peer-table entries kept for peers that are neither connected
/// nor being dialed (their remembered addresses); beyond this the least
/// recently used are forgotten (a DHT lookup finds them again). Each costs
/// well under a KiB, so a flood of throwaway identities costs at most about
/// a MiB here.
pub const MAX_IDLE_PEERS: usize = 1024;
/// An inbound handshake that has not completed within this gives its slot
/// back when handshakes are crowded (see `InboundGate::handshakes_crowded`).
/// A handshake takes a few round trips; QUIC's own idle timeout (a minute)
/// would let a stalled one hold a slot far longer. Uncrowded, a slow one
/// keeps going: on an overloaded machine the dialer may already have
/// completed it, and aborting it would break that dialer's connection.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the node checks whether closed connections left memory to give
/// back to the OS (see [`trim_loop`]).
pub const TRIM_CHECK: Duration = Duration::from_secs(2);
/// Inbound connections that must have closed since the last trim before
/// the next one: a trim walks the heap (milliseconds), so it runs only
/// after a burst, never per connection.
pub const TRIM_AFTER_CLOSES: u64 = 64;

/// Tunable limits on inbound connections and the peer table; see the
/// constants of this module for the defaults and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_inbound: usize,
    pub max_per_ip: usize,
    pub max_per_prefix: usize,
    pub max_handshakes: usize,
    pub silent_timeout: Duration,
    pub max_idle_peers: usize,
    /// Apply the per-IP and per-network limits to loopback sources too
    /// (default: no, see the module docs).
    pub limit_loopback: bool,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_inbound: MAX_INBOUND_CONNECTIONS,
            max_per_ip: MAX_CONNECTIONS_PER_IP,
            max_per_prefix: MAX_CONNECTIONS_PER_PREFIX,
            max_handshakes: MAX_HANDSHAKES_IN_FLIGHT,
            silent_timeout: SILENT_CONNECTION_TIMEOUT,
            max_idle_peers: MAX_IDLE_PEERS,
            limit_loopback: false,
        }
    }
}

/// The shortest silent-connection timeout accepted: a silent connection is
/// looked at again every timeout, so a zero or tiny one would spin.
pub const MIN_SILENT_TIMEOUT: Duration = Duration::from_secs(1);

impl ConnectionLimits {
    /// Refuses settings that would lock everyone out or spin: every count
    /// at least 1, the silent timeout at least [`MIN_SILENT_TIMEOUT`].
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("max_inbound", self.max_inbound),
            ("max_per_ip", self.max_per_ip),
            ("max_per_prefix", self.max_per_prefix),
            ("max_handshakes", self.max_handshakes),
            ("max_idle_peers", self.max_idle_peers),
        ] {
            if v == 0 {
                return Err(format!("connection limit {name} must be at least 1"));
            }
        }
        if self.silent_timeout < MIN_SILENT_TIMEOUT {
            return Err(format!(
                "silent connection timeout must be at least {MIN_SILENT_TIMEOUT:?}"
            ));
        }
        Ok(())
    }
}

/// Why an inbound connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Total,
    PerIp,
    PerPrefix,
    Handshakes,
}

/// The network an address belongs to: its /24 (IPv4, also in IPv6-mapped
/// form) or /48 (IPv6).
pub(crate) fn prefix(ip: IpAddr) -> [u8; 7] {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            [4, o[0], o[1], o[2], 0, 0, 0]
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => prefix(IpAddr::V4(v4)),
            None => {
                let o = v6.octets();
                [6, o[0], o[1], o[2], o[3], o[4], o[5]]
            }
        },
    }
}

/// The IP in canonical form (IPv6-mapped IPv4 as IPv4).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[derive(Debug, Default)]
struct Counts {
    /// Inbound connections closed since the last trim.
    closed_since_trim: u64,
    total: usize,
    handshakes: usize,
    per_ip: HashMap<IpAddr, usize>,
    per_prefix: HashMap<[u8; 7], usize>,
}

/// The counts of inbound connections, shared by their slots.
#[derive(Debug)]
pub(crate) struct InboundGate {
    limits: ConnectionLimits,
    counts: Mutex<Counts>,
}

/// One inbound connection's share of the limits, given back when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    gate: Arc<InboundGate>,
    /// The source IP, when it counts against the per-IP limits.
    ip: Option<IpAddr>,
    handshaking: bool,
}

impl InboundGate {
    pub fn new(limits: ConnectionLimits) -> Arc<Self> {
        Arc::new(InboundGate {
            limits,
            counts: Mutex::default(),
        })
    }

    pub fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Plain counters: a panic elsewhere cannot leave them unusable.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a connection attempt from `remote` (handshake not yet done),
    /// or says which limit refuses it. `virtual_source`: the address is a
    /// relayed circuit or TCP link, which says nothing about the IP behind
    /// it (those are bounded where they are made).
    pub fn admit(
        self: &Arc<Self>,
        remote: SocketAddr,
        virtual_source: bool,
    ) -> Result<Slot, Refusal> {
        let l = &self.limits;
        let ip = canonical(remote.ip());
        let counted = !virtual_source && (l.limit_loopback || !ip.is_loopback());
        let mut c = self.counts();
        if c.total >= l.max_inbound {
            return Err(Refusal::Total);
        }
        if c.handshakes >= l.max_handshakes {
            return Err(Refusal::Handshakes);
        }
        if counted {
            if c.per_ip.get(&ip).copied().unwrap_or(0) >= l.max_per_ip {
                return Err(Refusal::PerIp);
            }
            if c.per_prefix.get(&prefix(ip)).copied().unwrap_or(0) >= l.max_per_prefix {
                return Err(Refusal::PerPrefix);
            }
            *c.per_ip.entry(ip).or_default() += 1;
            *c.per_prefix.entry(prefix(ip)).or_default() += 1;
        }
        c.total += 1;
        c.handshakes += 1;
        Ok(Slot {
            gate: self.clone(),
            ip: counted.then_some(ip),
            handshaking: true,
        })
    }

    /// Inbound connections (handshaking or established) right now.
    pub fn inbound(&self) -> usize {
        self.counts().total
    }

    /// Whether handshakes in flight fill at least half their limit: then
    /// only sources that proved their address (a QUIC Retry round trip) get
    /// a handshake slot, so spoofed Initial packets cannot hold the slots.
    pub fn handshakes_crowded(&self) -> bool {
        self.counts().handshakes * 2 >= self.limits.max_handshakes
    }
}

impl Slot {
    /// Whether this connection's IP or network holds at least half its
    /// limit, or the node at least half its total.
    pub fn under_pressure(&self) -> bool {
        let l = &self.gate.limits;
        let c = self.gate.counts();
        if c.total * 2 >= l.max_inbound {
            return true;
        }
        let Some(ip) = self.ip else {
            return false;
        };
        c.per_ip.get(&ip).copied().unwrap_or(0) * 2 >= l.max_per_ip
            || c.per_prefix.get(&prefix(ip)).copied().unwrap_or(0) * 2 >= l.max_per_prefix
    }

    /// The handshake is over: the slot no longer counts as one in flight.
    pub fn handshake_done(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            let mut c = self.gate.counts();
            c.handshakes = c.handshakes.saturating_sub(1);
        }
    }
}

fn release<K: std::hash::Hash + Eq>(m: &mut HashMap<K, usize>, k: &K) {
    if let Some(n) = m.get_mut(k) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            m.remove(k);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.gate.counts();
        c.total = c.total.saturating_sub(1);
        c.closed_since_trim += 1;
        if self.handshaking {
            c.handshakes = c.handshakes.saturating_sub(1);
        }
        if let Some(ip) = self.ip {
            release(&mut c.per_ip, &ip);
            release(&mut c.per_prefix, &prefix(ip));
        }
        // Give the maps' memory back after a flood from many addresses.
        if c.per_ip.capacity() > 64 && c.per_ip.len() < c.per_ip.capacity() / 4 {
            c.per_ip.shrink_to_fit();
            c.per_prefix.shrink_to_fit();
        }
    }
}

/// Gives the memory of closed connections back to the OS after a burst.
///
/// Measured with `reach bench flood`: after 20,000 refused handshakes and
/// 20,000 connect-then-close identities the node's live data was back to
/// its pre-flood size, yet its RSS stayed at the flood's peak. glibc's
/// malloc returns freed memory to the OS only from the top of each heap;
/// the thousands of small allocations a QUIC connection makes, freed in
/// another order than made, leave the heaps' middles free but resident.
/// `malloc_trim(0)` releases those free pages too.
///
/// Once a burst is over (a check finds fewer closes than
/// [`TRIM_AFTER_CLOSES`]) it trims once more: a closed connection's QUIC
/// state is freed only after its drain period, often after the trim its
/// close triggered, and with no closes to follow nothing else would hand
/// those pages back (one `reach bench flood` run ended with 11 MiB more
/// resident than others, which fits this).
pub(crate) async fn trim_loop(gate: Arc<InboundGate>) {
    let mut tick = tokio::time::interval(TRIM_CHECK);
    let mut burst_trimmed = false;
    loop {
        tick.tick().await;
        let closed = std::mem::take(&mut gate.counts().closed_since_trim);
        if closed >= TRIM_AFTER_CLOSES {
            release_freed_memory();
            burst_trimmed = true;
        } else if std::mem::take(&mut burst_trimmed) {
            release_freed_memory();
        } else {
            gate.counts().closed_since_trim += closed;
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_freed_memory() {
    // SAFETY: malloc_trim only walks and trims glibc's own heaps, under
    // their locks; it takes no pointers and is safe to call from any
    // thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_freed_memory() {}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            max_inbound: 10,
            max_per_ip: 2,
            max_per_prefix: 3,
            max_handshakes: 5,
            ..ConnectionLimits::default()
        }
    }

    #[test]
    fn per_ip_and_per_prefix_limits_refuse_and_free_on_drop() {
        let g = InboundGate::new(limits());
        let a = g.admit(addr("198.51.100.1:1"), false).unwrap();
        let _b = g.admit(addr("198.51.100.1:2"), false).unwrap();
        assert_eq!(
            g.admit(addr("198.51.100.1:3"), false).unwrap_err(),
            Refusal::PerIp
        );
        // IPv6-mapped is the same host.
        assert_eq!(
            g.admit(addr("[::ffff:198.51.100.1]:3"), false).unwrap_err(),
            Refusal::PerIp
        );
        let _c = g.admit(addr("198.51.100.2:1"), false).unwrap();
        assert_eq!(
            g.admit(addr("198.51.100.3:1"), false).unwrap_err(),
            Refusal::PerPrefix
        );
        // Another network is unaffected.
        let _d = g.admit(addr("203.0.113.1:1"), false).unwrap();
        drop(a);
        let _e = g.admit(addr("198.51.100.3:1"), false).unwrap();
        assert_eq!(g.inbound(), 4);
    }

    #[test]
    fn limits_that_lock_everyone_out_or_spin_are_refused() {
        assert!(ConnectionLimits::default().validate().is_ok());
        let zero = ConnectionLimits {
            max_per_ip: 0,
            ..ConnectionLimits::default()
        };
        assert!(zero.validate().unwrap_err().contains("max_per_ip"));
        let spin = ConnectionLimits {
            silent_timeout: Duration::ZERO,
            ..ConnectionLimits::default()
        };
        assert!(spin.validate().unwrap_err().contains("silent"));
    }

    #[test]
    fn pressure_is_half_a_limit() {
        let g = InboundGate::new(ConnectionLimits {
            max_per_ip: 4,
            max_per_prefix: 100,
            ..limits()
        });
        let a = g.admit(addr("198.51.100.1:1"), false).unwrap();
        assert!(!a.under_pressure());
        let _b = g.admit(addr("198.51.100.1:2"), false).unwrap();
        assert!(a.under_pressure(), "2 of 4 from one IP");
        let other = g.admit(addr("203.0.113.1:1"), false).unwrap();
        assert!(!other.under_pressure());
        let lo = g.admit(addr("127.0.0.1:1"), false).unwrap();
        assert!(
            !lo.under_pressure(),
            "exempt loopback: only the total counts"
        );
    }

    #[test]
    fn ipv6_counts_per_48() {
        let g = InboundGate::new(limits());
        let _a = g.admit(addr("[2001:db8:1:1::1]:1"), false).unwrap();
        let _b = g.admit(addr("[2001:db8:1:2::1]:1"), false).unwrap();
        let _c = g.admit(addr("[2001:db8:1:3::1]:1"), false).unwrap();
        assert_eq!(
            g.admit(addr("[2001:db8:1:4::1]:1"), false).unwrap_err(),
            Refusal::PerPrefix
        );
        let _d = g.admit(addr("[2001:db8:2::1]:1"), false).unwrap();
    }

    #[test]
    fn handshakes_in_flight_and_total_are_bounded() {
        let g = InboundGate::new(limits());
        let mut slots: Vec<Slot> = (1..=5)
            .map(|i| g.admit(addr(&format!("10.0.{i}.1:1")), false).unwrap())
            .collect();
        assert_eq!(
            g.admit(addr("10.0.9.1:1"), false).unwrap_err(),
            Refusal::Handshakes
        );
        for s in &mut slots {
            s.handshake_done();
            s.handshake_done(); // idempotent
        }
        for i in 6..=10 {
            let mut s = g.admit(addr(&format!("10.0.{i}.1:1")), false).unwrap();
            s.handshake_done();
            slots.push(s);
        }
        assert_eq!(
            g.admit(addr("10.0.99.1:1"), false).unwrap_err(),
            Refusal::Total
        );
        slots.clear();
        assert_eq!(g.inbound(), 0);
        assert!(g.admit(addr("10.0.99.1:1"), false).is_ok());
    }

    #[test]
    fn loopback_and_virtual_sources_are_exempt_unless_asked() {
        let g = InboundGate::new(limits());
        let held: Vec<Slot> = (0..5)
            .map(|_| g.admit(addr("127.0.0.1:1"), false).unwrap())
            .collect();
        drop(held);
        let held: Vec<Slot> = (0..5)
            .map(|_| g.admit(addr("240.0.0.1:1"), true).unwrap())
            .collect();
        drop(held);
        let strict = InboundGate::new(ConnectionLimits {
            limit_loopback: true,
            ..limits()
        });
        let _a = strict.admit(addr("127.0.0.1:1"), false).unwrap();
        let _b = strict.admit(addr("127.0.0.1:2"), false).unwrap();
        assert_eq!(
            strict.admit(addr("127.0.0.1:3"), false).unwrap_err(),
            Refusal::PerIp
        );
        let _c = strict.admit(addr("127.0.1.1:1"), false).unwrap();
    }
}
