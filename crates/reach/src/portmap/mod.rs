//! Port mapping: asking the router in front of the node to forward the
//! node's port (PCP, NAT-PMP or UPnP-IGD), verifying from outside that it
//! does, and keeping the mapping alive.
//!
//! A verified mapping makes a node behind a NAT reachable like a public
//! node: no relay needed, no hole punching. It is an optimisation, never a
//! requirement: without a router that speaks one of the protocols the node
//! works as before (relay, punching).
//!
//! - [`PortMap`]: the capability (its configuration, its status, the
//!   counters); it sits above NAT discovery (whose helper probes verify a
//!   mapping) and below the endpoint record's owner, which hears of a
//!   verified mapping as a bus fact ([`NodeEvent::PortMapped`]).
//! - `driver`: the task that finds the gateway, picks the protocol and
//!   drives one [`Lifecycle`] per mapping (UDP for QUIC, TCP for links).
//! - `gateway`: the default gateway, and which gateways are asked at all.
//!
//! The policy (retransmissions, renewal at half the lease, router
//! restarts, revocation, deletion at shutdown) is sans-IO in
//! [`reach_proto::nat::portmap`].
//!
//! [`Lifecycle`]: reach_proto::nat::portmap::lifecycle::Lifecycle
//! [`NodeEvent::PortMapped`]: crate::NodeEvent::PortMapped

mod driver;
pub(crate) mod gateway;
pub(crate) mod upnp;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::nat::Nat;
use crate::node::core::Core;

pub use reach_proto::nat::portmap::lifecycle::DEFAULT_LIFETIME;
pub use reach_proto::nat::portmap::status::{PortMapProtocol, PortMapState, PortMapStatus};

/// How long the PCP and NAT-PMP probes of discovery wait for the gateway:
/// three sends (250 ms doubling, RFC 6886 §3.1). A router on the LAN
/// answers in milliseconds; one that has not answered by then does not
/// speak the protocol, and UPnP gets its turn.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1750);
/// Once UPnP-IGD answered, how long from the start of discovery PCP and
/// NAT-PMP still get (PCP and NAT-PMP are preferred, but a router on the
/// LAN answers them within milliseconds: two sends, 250 ms apart, cover a
/// lost packet; waiting the full [`PROBE_TIMEOUT`] would only delay a
/// UPnP-only router's mapping).
pub const PREFERRED_WAIT_AFTER_UPNP: Duration = Duration::from_millis(500);
/// How long UPnP-IGD discovery (SSDP search, the description) may take.
pub const UPNP_DISCOVERY_TIMEOUT: Duration = Duration::from_secs(3);
/// After NAT-PMP answered, how long to wait for a PCP answer to the probe
/// sent at the same time (PCP is preferred; a router speaking both answers
/// both at once).
pub const PCP_GRACE: Duration = Duration::from_millis(100);
/// A mapping is renewed at least this often, whatever its lease: a router
/// that flushed its table tells no client, and asking again is how a
/// client notices and re-makes it (so a flushed mapping is back within
/// this, plus one round trip). One small request per interval.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// How often the gateway's epoch is asked for (a PCP ANNOUNCE or a NAT-PMP
/// external-address request: a few bytes each way on the LAN). A router
/// that restarted lost every mapping, and not every router announces its
/// restart (miniupnpd announces only in PCP, which a NAT-PMP-only router
/// may not speak); its epoch going back in the answer re-maps at once, so a
/// restart is noticed within this plus one round trip.
pub const EPOCH_CHECK_INTERVAL: Duration = Duration::from_secs(4);
/// Description put on a UPnP mapping (routers show it in their UI).
pub const MAPPING_DESCRIPTION: &str = "reach";
/// How long a verification waits for a helper peer (a connected peer at
/// another IP) to turn up, and how long one helper may take.
pub const VERIFY_WAIT: Duration = Duration::from_secs(30);
/// Helpers one verification asks at most (the next one when a helper does
/// not answer).
pub const VERIFY_HELPERS: usize = 3;
/// When no protocol answered, discovery is tried again after this (the
/// router may come up later, or have UPnP turned on).
pub const REDISCOVER_AFTER: Duration = Duration::from_secs(5 * 60);

/// How a node maps its port (see [`crate::NodeBuilder::port_mapping`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMapping {
    /// Ask the router at all. Default: yes.
    pub enabled: bool,
    /// The router to ask; `None`: the default gateway from the routing
    /// table, if it is on a private network (see
    /// [`PortMapping::gateway`]'s docs in the README).
    pub gateway: Option<IpAddr>,
    /// Lifetime asked for each mapping (renewed at half of it, and at
    /// least every [`REFRESH_INTERVAL`]).
    pub lifetime: Duration,
}

impl Default for PortMapping {
    fn default() -> Self {
        PortMapping {
            enabled: true,
            gateway: None,
            lifetime: DEFAULT_LIFETIME,
        }
    }
}

impl PortMapping {
    /// No port mapping.
    pub fn disabled() -> Self {
        PortMapping {
            enabled: false,
            ..PortMapping::default()
        }
    }
}

crate::telemetry::metrics! {
    /// Counters of port mapping.
    pub(crate) struct PortMapCounters =>
    /// Port mapping's counters as [`NodeStats`](crate::NodeStats) shows them.
    pub struct PortMapStats;
    atomic {
        /// Mappings the router granted (first grants and re-grants after a
        /// revocation, both protocols).
        counter granted = "portmap_granted",
        /// Renewals the router granted.
        counter renewals = "portmap_renewals",
        /// Renewals that failed (no answer, or refused).
        counter renewal_failures = "portmap_renewal_failures",
        /// First requests refused or never answered.
        counter request_failures = "portmap_request_failures",
        /// Times the router lost its mappings (restart, flush seen through
        /// an epoch, an announcement or a new UPnP boot id) and they were
        /// made again.
        counter remaps = "portmap_remaps",
        /// Mappings revoked after failed renewals or an expired lease.
        counter revocations = "portmap_revocations",
        /// External addresses that failed the outside check.
        counter verify_failures = "portmap_verify_failures",
        /// Router replies that did not decode (dropped, counted).
        counter bad_replies = "portmap_bad_replies",
        /// Mappings deleted at shutdown (the router confirmed).
        counter deleted = "portmap_deleted",
    }
    external {
        /// Verified mappings published now (0 or 1).
        gauge active = "portmap_active",
    }
}

/// Where the driver opens its sockets: in the node's network (a namespace
/// in the lab, where nodes run in-process).
#[derive(Clone)]
pub(crate) struct Net {
    pub udp: crate::socket::UdpBinder,
    /// Opens TCP connections (UPnP's HTTP and SOAP), blocking.
    pub tcp: crate::tcp::Connector,
}

/// The port-mapping capability.
pub(crate) struct PortMap {
    core: Arc<Core>,
    nat: Arc<Nat>,
    config: PortMapping,
    net: Net,
    /// Whether the node listens for TCP links (then its TCP port is
    /// mapped too).
    tcp_listener: bool,
    status: watch::Sender<PortMapStatus>,
    pub counters: PortMapCounters,
    /// The node's start: what `mapped_after_ms` counts from.
    started: Instant,
}

impl PortMap {
    pub(crate) fn new(
        core: Arc<Core>,
        nat: Arc<Nat>,
        config: PortMapping,
        net: Net,
        tcp_listener: bool,
    ) -> Self {
        let off = !config.enabled || core.local_addr.ip().is_loopback();
        let state = if off {
            PortMapState::Off
        } else {
            PortMapState::Discovering
        };
        PortMap {
            core,
            nat,
            config,
            net,
            tcp_listener,
            status: watch::channel(PortMapStatus::new(state)).0,
            counters: PortMapCounters::default(),
            started: Instant::now(),
        }
    }

    /// Starts the driver (a flushing task: at shutdown it deletes the
    /// mappings before the node closes its socket).
    pub(crate) fn start(self: &Arc<Self>) {
        if self.status.borrow().state == PortMapState::Off {
            return;
        }
        let me = self.clone();
        self.core
            .tasks
            .spawn_flushing(async move { me.run().await });
    }

    /// Where port mapping stands now.
    pub(crate) fn status(&self) -> PortMapStatus {
        self.status.borrow().clone()
    }

    /// The verified, published mapping, if any.
    pub(crate) fn published(&self) -> Option<SocketAddr> {
        self.status.borrow().published
    }

    /// Watches the status (the relay capability waits on it).
    pub(crate) fn watch(&self) -> watch::Receiver<PortMapStatus> {
        self.status.subscribe()
    }

    /// Waits until the outcome is known (see [`PortMapState::is_settled`])
    /// or `timeout` passed; returns the published mapping, if any.
    pub(crate) async fn settled(&self, timeout: Duration) -> Option<SocketAddr> {
        let mut rx = self.watch();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|s| s.state.is_settled())).await;
        self.published()
    }

    /// The counters, with the gauge filled in.
    pub(crate) fn stats(&self) -> PortMapStats {
        let mut s = self.counters.snapshot();
        s.active = u64::from(self.published().is_some());
        s
    }

    fn update(&self, f: impl FnOnce(&mut PortMapStatus)) {
        self.status.send_modify(f);
    }
}
