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
//! End-to-end encryption: the packets a relay forwards are the two peers'
//! own QUIC packets (TLS 1.3 keys only they hold); the relay sees who talks
//! to whom, when, and how much.

pub(crate) mod acquire;
pub(crate) mod client;
pub mod paths;
pub(crate) mod service;

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use reach_proto::PeerId;
use reach_proto::relay::service::RelayLimits;
use serde::{Deserialize, Serialize};

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

/// Relay state of a node.
pub(crate) struct RelayRuntime {
    pub service: RelayMode,
    pub acquire: RelayMode,
    pub limits: RelayLimits,
    /// Serving reservations right now.
    pub serving: AtomicBool,
    /// The relay we hold a reservation at, as published.
    pub held: Mutex<Option<(PeerId, SocketAddr)>>,
    pub reachability: Mutex<Reachability>,
    pub counters: RelayCounters,
    /// Relay circuits, this node's as a client and as a relay; shared with
    /// the socket, which forwards and unwraps relayed packets.
    pub paths: std::sync::Arc<paths::RelayPaths>,
    /// Where changes of the held relay and of reachability are announced.
    bus: crate::node::bus::Bus,
}

impl RelayRuntime {
    pub fn new(
        service: RelayMode,
        acquire: RelayMode,
        limits: RelayLimits,
        paths: std::sync::Arc<paths::RelayPaths>,
        bus: crate::node::bus::Bus,
    ) -> Self {
        RelayRuntime {
            service,
            acquire,
            limits,
            serving: AtomicBool::new(service == RelayMode::On),
            held: Mutex::new(None),
            reachability: Mutex::new(Reachability::Unknown),
            counters: RelayCounters::default(),
            paths,
            bus,
        }
    }

    pub fn held(&self) -> Option<(PeerId, SocketAddr)> {
        *self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the relay held now (announcing a change on the bus).
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
            self.bus.emit(NodeEvent::RelayLost { relay });
        }
        if let Some((relay, addr)) = held {
            self.bus.emit(NodeEvent::RelayAcquired { relay, addr });
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
            self.bus
                .emit(crate::node::NodeEvent::ReachabilityChanged { reachability: r });
        }
    }

    pub fn is_serving(&self) -> bool {
        self.serving.load(std::sync::atomic::Ordering::Relaxed)
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
