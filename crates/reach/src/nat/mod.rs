//! NAT awareness of a node: external addresses, RFC 4787 classification,
//! hairpinning, reachability and STUN, driven over the node's one socket.
//!
//! - [`Nat`]: the capability's state (what peers report about our address,
//!   requests awaiting answers, the answer budget, the STUN server switch,
//!   the alternate socket), held by the node as one field.
//! - `probe`: the client side: address probes, filtering tests, STUN
//!   binding requests, with retries.
//! - `datagrams`: the non-QUIC datagram loop: answers probes, filter tests
//!   and STUN requests, completes our own requests, hands punch packets to
//!   [`crate::punch`].
//! - `reachability`: whether unsolicited packets reach us.
//! - [`report`]: `reach nat`'s [`NatReport`].

pub(crate) mod datagrams;
pub(crate) mod probe;
pub(crate) mod reachability;
pub mod report;

use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use reach_proto::nat::observed::{AddrChange, OBSERVED_ADDR_TTL, ScoredAddr};
use reach_proto::nat::{Mapping, ObservedAddrs};
use tokio::sync::Notify;
use tokio::time::Instant;

pub use datagrams::MAX_REPLIES_PER_SEC;
pub use report::{MAPPING_HELPERS, NatReport};

use std::sync::{Arc, OnceLock, Weak};

use reach_proto::wire::datagram::ControlPacket;

use crate::node::bus::{Bus, NodeEvent};
use crate::node::core::Core;
use crate::peers::Peers;
use crate::util::RateLimiter;

// Observed addresses must outlive the endpoint republish, which re-observes
// an otherwise idle node (see OBSERVED_ADDR_TTL), or its address flaps.
const _: () = assert!(
    OBSERVED_ADDR_TTL.as_secs()
        > crate::dht::join::REPUBLISH_INTERVAL.as_secs()
            + 2 * crate::dht::join::MAINTENANCE_TICK.as_secs()
);

/// The punch capability's packets (`Punch`, `PunchAck`), which arrive
/// with the other control packets; hole punching sits above NAT discovery,
/// so it plugs this in (see [`Nat::set_punch_packets`]).
pub(crate) trait PunchPackets: Send + Sync {
    /// A punch packet `packet` arrived from `from`.
    fn on_packet(&self, from: SocketAddr, packet: &ControlPacket);
}

/// The NAT capability: what the node knows about the NAT in front of it,
/// and the non-QUIC datagrams that find it out (probes, filtering tests,
/// STUN).
pub(crate) struct Nat {
    core: Arc<Core>,
    peers: Arc<Peers>,
    punch: OnceLock<Weak<dyn PunchPackets>>,
    /// Requests this node sent that await an answer.
    pending: probe::PendingProbes,
    /// One budget for every answer to unsolicited packets (probe replies,
    /// filter probes, STUN responses): see [`MAX_REPLIES_PER_SEC`].
    replies: Mutex<RateLimiter>,
    /// Answer STUN Binding requests (public nodes).
    stun_server: bool,
    /// A second socket on our IP, used only to send filtering-test probes
    /// from a port requesters never sent to.
    alt: Option<std::net::UdpSocket>,
    /// Our external addresses as peers report them.
    external: ExternalAddrs,
}

/// Our external addresses as peers report them, and the bus that hears
/// when one is confirmed or expires.
pub(crate) struct ExternalAddrs {
    observed: Mutex<ObservedAddrs>,
    /// Wakes the expiry task when an address became confirmed (its
    /// deadline may be the next one).
    confirmed: Notify,
    /// Where `observed`'s time counts from (tokio's clock, so tests can
    /// pause it).
    epoch: Instant,
    bus: Bus,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Nat {
    pub(crate) fn new(
        core: Arc<Core>,
        peers: Arc<Peers>,
        stun_server: bool,
        alt: Option<std::net::UdpSocket>,
    ) -> Self {
        Nat {
            peers,
            punch: OnceLock::new(),
            pending: probe::PendingProbes::default(),
            replies: Mutex::new(RateLimiter::new(MAX_REPLIES_PER_SEC)),
            stun_server,
            alt,
            external: ExternalAddrs::new(core.bus.clone()),
            core,
        }
    }

    /// Our external addresses as peers report them.
    pub(crate) fn external(&self) -> &ExternalAddrs {
        &self.external
    }

    /// See [`ExternalAddrs::record`].
    pub(crate) fn record_observed(&self, observed: SocketAddr, reporter: SocketAddr) {
        self.external.record(observed, reporter);
    }

    /// See [`ExternalAddrs::scored`].
    pub(crate) fn scored(&self) -> Vec<ScoredAddr> {
        self.external.scored()
    }

    /// See [`ExternalAddrs::confirmed`].
    pub(crate) fn confirmed(&self) -> Vec<SocketAddr> {
        self.external.confirmed()
    }

    /// See [`ExternalAddrs::mapping`].
    pub(crate) fn mapping(&self, ipv4: bool) -> Mapping {
        self.external.mapping(ipv4)
    }

    /// Plugs in hole punching's packet handler (once, at build).
    pub(crate) fn set_punch_packets(&self, p: Weak<dyn PunchPackets>) {
        let _ = self.punch.set(p);
    }

    /// Hands a punch packet to hole punching, if it is plugged in.
    fn punch_packet(&self, from: SocketAddr, packet: &ControlPacket) {
        if let Some(p) = self.punch.get().and_then(Weak::upgrade) {
            p.on_packet(from, packet);
        }
    }

    /// Whether the answer budget allows one more answer now.
    pub(crate) fn allow_reply(&self) -> bool {
        lock(&self.replies).allow(Instant::now())
    }

    /// Whether this node answers STUN Binding requests.
    pub(crate) fn stun_server(&self) -> bool {
        self.stun_server
    }

    /// The alternate socket for filtering tests, if this node has one.
    pub(crate) fn alt_socket(&self) -> std::io::Result<&std::net::UdpSocket> {
        self.alt
            .as_ref()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no alternate socket"))
    }
}

impl ExternalAddrs {
    pub(crate) fn new(bus: Bus) -> Self {
        ExternalAddrs {
            observed: Mutex::default(),
            confirmed: Notify::new(),
            epoch: Instant::now(),
            bus,
        }
    }

    /// The sans-IO core's notion of now.
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Records that the peer at `reporter` saw us at `observed`, and says
    /// on the bus which addresses became (or stopped being) confirmed.
    /// Reports over relayed paths say nothing about our own address.
    pub(crate) fn record(&self, observed: SocketAddr, reporter: SocketAddr) {
        use crate::vaddr::is_virtual;
        if is_virtual(&observed) || is_virtual(&reporter) {
            return;
        }
        let changes = {
            let mut o = lock(&self.observed);
            o.record(observed, reporter.ip(), self.now());
            drain(&mut o)
        };
        if changes
            .iter()
            .any(|c| matches!(c, AddrChange::Confirmed(_)))
        {
            self.confirmed.notify_one();
        }
        emit(&self.bus, changes);
    }

    /// Our external addresses as peers have reported them recently, best
    /// supported first.
    pub(crate) fn scored(&self) -> Vec<ScoredAddr> {
        lock(&self.observed).scored(self.now())
    }

    /// The best confirmed external address of each family.
    pub(crate) fn confirmed(&self) -> Vec<SocketAddr> {
        lock(&self.observed).confirmed(self.now())
    }

    /// The mapping behaviour recent reports imply (see
    /// [`ObservedAddrs::mapping`]).
    pub(crate) fn mapping(&self, ipv4: bool) -> Mapping {
        lock(&self.observed).mapping(ipv4, self.now())
    }

    /// Runs until the node stops: whenever a confirmed address's reports
    /// age out, says so on the bus (`ExternalAddrExpired`). Sleeps until the
    /// next such deadline, or until a new confirmation may bring it closer.
    pub(crate) async fn expiry_loop(&self) {
        loop {
            let next = lock(&self.observed).next_timeout();
            match next {
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(self.epoch + at) => {}
                        _ = self.confirmed.notified() => {}
                    }
                }
                None => self.confirmed.notified().await,
            }
            let changes = {
                let mut o = lock(&self.observed);
                o.expire(self.now());
                drain(&mut o)
            };
            emit(&self.bus, changes);
        }
    }
}

fn drain(o: &mut ObservedAddrs) -> Vec<AddrChange> {
    std::iter::from_fn(|| o.poll_change()).collect()
}

fn emit(bus: &Bus, changes: Vec<AddrChange>) {
    for c in changes {
        bus.emit(match c {
            AddrChange::Confirmed(addr) => {
                tracing::info!(%addr, "external address confirmed by peers");
                NodeEvent::ExternalAddrConfirmed { addr }
            }
            AddrChange::Expired(addr) => {
                tracing::info!(%addr, "external address expired");
                NodeEvent::ExternalAddrExpired { addr }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// In tokio's paused clock: an address two peers confirm is announced,
    /// and announced as expired once their reports are older than the TTL;
    /// a fresh report in between keeps it.
    #[tokio::test(start_paused = true)]
    async fn confirmed_addresses_expire_on_the_bus() {
        let bus = Bus::default();
        let nat = std::sync::Arc::new(ExternalAddrs::new(bus.clone()));
        let mut events = bus.subscribe();
        let task = tokio::spawn({
            let nat = nat.clone();
            async move { nat.expiry_loop().await }
        });
        let ext = addr("203.0.113.2:5000");
        nat.record(ext, addr("198.51.100.1:4433"));
        nat.record(ext, addr("198.51.100.2:4433"));
        assert_eq!(
            events.next().await,
            Some(NodeEvent::ExternalAddrConfirmed { addr: ext })
        );
        // Half a TTL later one reporter says it again: the address now
        // lapses a TTL after the other, older report.
        tokio::time::sleep(OBSERVED_ADDR_TTL / 2).await;
        nat.record(ext, addr("198.51.100.1:4433"));
        tokio::time::sleep(OBSERVED_ADDR_TTL / 2 - Duration::from_secs(1)).await;
        assert_eq!(nat.confirmed(), vec![ext]);
        let started = Instant::now();
        // Bounded: a missing event fails the test instead of hanging it.
        let expired = tokio::time::timeout(OBSERVED_ADDR_TTL, events.next()).await;
        assert_eq!(
            expired,
            Ok(Some(NodeEvent::ExternalAddrExpired { addr: ext }))
        );
        assert_eq!(started.elapsed(), Duration::from_secs(1), "at the deadline");
        assert!(nat.confirmed().is_empty());
        assert_eq!(nat.scored()[0].reporters, 1);
        task.abort();
    }

    #[test]
    fn relayed_reports_are_ignored() {
        let nat = ExternalAddrs::new(Bus::default());
        // A relayed circuit's virtual address (see crate::vaddr).
        let relayed = SocketAddr::from(([240, 0, 0, 5], 1));
        assert!(crate::vaddr::is_virtual(&relayed));
        nat.record(relayed, addr("198.51.100.1:4433"));
        nat.record(addr("203.0.113.2:5000"), relayed);
        assert!(nat.scored().is_empty());
    }
}
