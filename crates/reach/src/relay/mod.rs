//! Relays: the capability that makes every node reachable by key.
//!
//! - [`paths`]: circuits and virtual addresses, shared with the socket (the
//!   data path: relayed QUIC packets never leave the receive path of a relay);
//! - [`service`]: a publicly reachable node serving reservations and opening
//!   circuits;
//! - [`client`]: reserving at a relay, dialing a peer through its relay,
//!   accepting incoming circuits;
//! - [`acquire`]: the driver of reach-proto's acquisition state machine in a
//!   node that is not directly reachable.
//!
//! The relay sits above the DHT, NAT discovery and the endpoint record's
//! owner (it holds all three: the DHT for its state, NAT discovery for the
//! reachability check, the advertiser to publish the record when the held
//! relay or the reachability changed), and below hole punching, whose signalling rides on the relay protocol
//! ([`PunchSignals`]). It implements the peers' [`Circuits`] hook and
//! observes their connections (circuits are watched while used, a
//! client's reservation goes with its last connection).
//!
//! End-to-end encryption: the packets a relay forwards are the two peers'
//! own QUIC packets (TLS 1.3 keys only they hold); the relay sees who talks
//! to whom, when, and how much.

pub(crate) mod acquire;
pub(crate) mod client;
pub mod paths;
pub(crate) mod service;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use futures::future::BoxFuture;
use reach_proto::PeerId;
use reach_proto::punch::{Introduction, PunchInfo};
use reach_proto::relay::rpc::RelayResponse;
use reach_proto::relay::service::RelayLimits;
use serde::{Deserialize, Serialize};

use crate::advertise::Advertiser;
use crate::dht::Dht;
use crate::nat::Nat;
use crate::node::core::Core;
use crate::peers::{Circuits, Closed, ConnectionObserver, Peers, Registered};
use crate::portmap::PortMap;

/// Whether a node relays for others, or acquires a relay for itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayMode {
    /// Decide by reachability: serve as a relay once verified publicly
    /// reachable; acquire a relay once verified not to be.
    #[default]
    Auto,
    /// Always (a relay known to be public; a node known to be behind NAT).
    On,
    /// Never.
    Off,
}

impl std::str::FromStr for RelayMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(RelayMode::Auto),
            "on" => Ok(RelayMode::On),
            "off" => Ok(RelayMode::Off),
            other => Err(format!(
                "unknown relay mode {other:?}; one of: auto, on, off"
            )),
        }
    }
}

impl std::fmt::Display for RelayMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RelayMode::Auto => "auto",
            RelayMode::On => "on",
            RelayMode::Off => "off",
        })
    }
}

pub use crate::node::bus::Reachability;

crate::telemetry::metrics! {
    /// Counters of the relay capability.
    pub struct RelayCounters =>
    /// The relay capability's counters as [`NodeStats`](crate::NodeStats)
    /// shows them.
    pub struct RelayStats;
    atomic {
        /// Reservations this node granted as a relay.
        counter reservations_granted = "relay_reservations_granted",
        /// Reservations this node refused as a relay.
        counter reservations_refused = "relay_reservations_refused",
        /// Circuits this node opened as a relay.
        counter circuits_opened = "relay_circuits_opened",
        /// Circuits this node refused as a relay.
        counter circuits_refused = "relay_circuits_refused",
        /// Dials through a relay.
        counter relayed_dials,
        /// Dials through a relay that failed.
        counter relayed_dial_failures,
        /// Reservations this node acquired at a relay.
        counter acquisitions = "relay_acquisitions",
        /// Attempts to acquire a relay that failed.
        counter acquisition_failures = "relay_acquisition_failures",
        /// Held relays lost.
        counter relay_losses,
    }
}

/// What hole punching (the capability above the relay) does with relay
/// signalling: it rides on the relay protocol, but its state and policy
/// are punching's. Plugged in by the builder; held weakly (punching holds
/// the relay).
pub(crate) trait PunchSignals: Send + Sync {
    /// What this node tells a coordinator about its NAT (sent with a
    /// reservation).
    fn local_info(&self) -> PunchInfo;
    /// `peer` was granted a reservation here and said `info` about its NAT.
    fn reserved(&self, peer: PeerId, info: PunchInfo);
    /// `peer` released its reservation here.
    fn released(&self, peer: &PeerId);
    /// The coordinator's side: `peer` (at `remote`) asks to punch through
    /// to `target`.
    fn coordinate(
        &self,
        peer: PeerId,
        remote: SocketAddr,
        target: PeerId,
        attempt: u32,
        info: PunchInfo,
    ) -> BoxFuture<'_, RelayResponse>;
    /// The target's side: `relay` introduced a peer to punch with.
    fn introduced(&self, relay: PeerId, intro: Introduction) -> RelayResponse;
}

/// What the composition root plugged in. Held weakly: the node holds
/// them all (and punching holds the relay).
#[derive(Default)]
struct Hooks {
    punch: OnceLock<Weak<dyn PunchSignals>>,
}

/// Relay state of a node.
pub(crate) struct RelayRuntime {
    core: Arc<Core>,
    peers: Arc<Peers>,
    /// Whether the node joined, the routing table (relay candidates), the
    /// clock of the acquisition machine, client or server mode.
    dht: Arc<Dht>,
    /// The reachability check.
    nat: Arc<Nat>,
    /// The endpoint record's owner: told to publish when the held relay or
    /// the reachability changed (it learns both from the bus).
    advertiser: Arc<Advertiser>,
    /// Port mapping: a verified mapping makes the node public (no relay).
    portmap: Arc<PortMap>,
    pub service: RelayMode,
    pub acquire: RelayMode,
    pub limits: RelayLimits,
    /// Serving reservations right now.
    pub serving: AtomicBool,
    /// The relay we hold a reservation at, as published.
    pub held: Mutex<Option<(PeerId, SocketAddr)>>,
    pub reachability: Mutex<Reachability>,
    pub counters: RelayCounters,
    /// From a relay lost to the next held (see [`crate::histogram`]).
    pub failover_seconds: crate::histogram::Histogram,
    /// Relay circuits, this node's as a client and as a relay; shared with
    /// the socket, which forwards and unwraps relayed packets.
    pub paths: Arc<paths::RelayPaths>,
    hooks: Hooks,
}

/// What the relay holds below it (see the module docs).
pub(crate) struct Below {
    pub core: Arc<Core>,
    pub peers: Arc<Peers>,
    pub dht: Arc<Dht>,
    pub nat: Arc<Nat>,
    pub advertiser: Arc<Advertiser>,
    pub portmap: Arc<PortMap>,
}

impl RelayRuntime {
    pub(crate) fn new(
        below: Below,
        service: RelayMode,
        acquire: RelayMode,
        limits: RelayLimits,
        paths: Arc<paths::RelayPaths>,
    ) -> Arc<Self> {
        let Below {
            core,
            peers,
            dht,
            nat,
            advertiser,
            portmap,
        } = below;
        Arc::new(RelayRuntime {
            core,
            peers,
            dht,
            nat,
            advertiser,
            portmap,
            service,
            acquire,
            limits,
            serving: AtomicBool::new(service == RelayMode::On),
            held: Mutex::new(None),
            reachability: Mutex::new(Reachability::Unknown),
            counters: RelayCounters::default(),
            failover_seconds: Default::default(),
            paths,
            hooks: Hooks::default(),
        })
    }

    /// Plugs in hole punching (once, at build).
    pub(crate) fn set_punch(&self, p: Weak<dyn PunchSignals>) {
        let _ = self.hooks.punch.set(p);
    }

    fn punch(&self) -> Option<Arc<dyn PunchSignals>> {
        self.hooks.punch.get()?.upgrade()
    }

    /// Has the endpoint record's owner publish the record.
    async fn publish(&self) {
        self.advertiser.publish().await;
    }

    pub fn held(&self) -> Option<(PeerId, SocketAddr)> {
        *self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the relay held now, announcing a change on the bus (where
    /// the record's owner learns it).
    pub fn set_held(&self, held: Option<(PeerId, SocketAddr)>) {
        use crate::node::NodeEvent;
        let before = std::mem::replace(
            &mut *self.held.lock().unwrap_or_else(|p| p.into_inner()),
            held,
        );
        if before == held {
            return;
        }
        if let Some((relay, _)) = before
            && held.is_none_or(|(r, _)| r != relay)
        {
            self.core.bus.emit(NodeEvent::RelayLost { relay });
        }
        if let Some((relay, addr)) = held {
            self.core.bus.emit(NodeEvent::RelayAcquired { relay, addr });
        }
    }

    pub fn reachability(&self) -> Reachability {
        *self.reachability.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records what the node found out about its reachability
    /// (announcing a change on the bus).
    pub fn set_reachability(&self, r: Reachability) {
        let before = std::mem::replace(
            &mut *self.reachability.lock().unwrap_or_else(|p| p.into_inner()),
            r,
        );
        if before != r {
            self.core
                .bus
                .emit(crate::node::NodeEvent::ReachabilityChanged { reachability: r });
        }
    }

    pub fn is_serving(&self) -> bool {
        self.serving.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The relay client's side of the peers' connections.
impl ConnectionObserver for RelayRuntime {
    fn registered(&self, c: &Registered<'_>) {
        if crate::vaddr::is_virtual(&c.conn.remote_address()) {
            self.watch_virtual(c.conn.clone());
        }
    }

    fn closed(&self, c: &Closed) {
        if c.none_left {
            // A relay client that left takes its reservation and circuits
            // along.
            self.paths.release(&c.peer);
        }
    }
}

/// Dialing through relays, for the peers' dialer.
impl Circuits for RelayRuntime {
    fn dial_via(
        &self,
        relay: PeerId,
        relay_addr: SocketAddr,
        peer: PeerId,
    ) -> BoxFuture<'_, crate::error::Result<quinn::Connection>> {
        RelayRuntime::dial_via(self, relay, relay_addr, peer)
    }

    fn relay_of(&self, addr: &SocketAddr) -> Option<PeerId> {
        Some(self.paths.path(addr)?.relay)
    }
}

/// The relay state as `Node::relay_status` and the control API show it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayStatus {
    pub service: RelayMode,
    pub acquire: RelayMode,
    pub serving: bool,
    pub reachability: Reachability,
    /// The relay this node holds a reservation at.
    pub held_relay: Option<PeerId>,
    pub held_relay_addr: Option<SocketAddr>,
    pub reservations: usize,
    pub circuits: Vec<paths::CircuitInfo>,
    pub relayed_connections: usize,
}
