//! Peers: the table of known peers and their connections, dialing by key,
//! and serving the connections peers open.
//!
//! This is the capability every other one builds on, so it depends on none
//! of them: what it needs from the rest of the node comes through three
//! small traits the builder plugs in. [`Resolve`] finds a peer's endpoint
//! record (the DHT implements it), [`Circuits`] dials through a relay and
//! names the relay behind a virtual address (the relay client implements
//! it), and [`ConnectionObserver`]s are told, synchronously and in order,
//! when a connection is registered or goes away (the relay client watches
//! circuits, hole punching starts upgrades and watches punched paths,
//! messaging queues connection events for the application).

mod dial;
pub(crate) mod serve;
mod table;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, RwLock, Weak};

use futures::future::BoxFuture;
use reach_proto::PeerId;
use reach_proto::dht::record::TypedAddr;

pub(crate) use table::{DHT_CONNECTION_IDLE, PeerTable};

use crate::error::{Error, Result};
use crate::events::PathKind;
use crate::node::Direction;
use crate::node::bus::{NodeEvent, PathReports};
use crate::node::core::Core;
use crate::node::limits::InboundGate;

/// Finds a peer's addresses by its key: the DHT's endpoint records.
pub(crate) trait Resolve: Send + Sync {
    /// The addresses `peer`'s endpoint record offers. `fresh`: the newest
    /// record the network has, not a stored or first-found one.
    fn resolve(&self, peer: PeerId, fresh: bool) -> BoxFuture<'_, Result<Vec<TypedAddr>>>;
}

/// Connections through relays: the relay client.
pub(crate) trait Circuits: Send + Sync {
    /// Opens an end-to-end connection to `peer` through `relay` (at
    /// `relay_addr`).
    fn dial_via(
        &self,
        relay: PeerId,
        relay_addr: SocketAddr,
        peer: PeerId,
    ) -> BoxFuture<'_, Result<quinn::Connection>>;
    /// The relay behind a circuit's virtual address; `None` once the relay
    /// client has forgotten the circuit (its connection is dead).
    fn relay_of(&self, addr: &SocketAddr) -> Option<PeerId>;
}

/// A connection the table just took in (see [`ConnectionObserver`]).
pub(crate) struct Registered<'a> {
    pub peer: PeerId,
    pub conn: &'a quinn::Connection,
    pub direction: Direction,
    /// It became the peer's connection in use (else it was kept as the
    /// relayed standby behind a direct one).
    pub in_use: bool,
}

/// A connection that closed (see [`ConnectionObserver`]).
pub(crate) struct Closed {
    pub peer: PeerId,
    /// It was the peer's connection in use and the relayed standby behind
    /// it took over (a punched path died).
    pub standby_took_over: bool,
    /// The peer has no connection left.
    pub none_left: bool,
}

/// Told about connections as the table changes, synchronously and in the
/// order the changes happened (so a reaction never races the next change).
/// Observers must not block: what takes time goes to a task.
pub(crate) trait ConnectionObserver: Send + Sync {
    /// A connection was registered.
    fn registered(&self, _c: &Registered<'_>) {}
    /// A connection closed.
    fn closed(&self, _c: &Closed) {}
    /// A peer connected, changed path or disconnected (also on the bus).
    fn path_event(&self, _e: &NodeEvent) {}
}

/// What serves unidirectional streams (messages).
pub(crate) type UniHandler =
    Arc<dyn Fn(PeerId, quinn::RecvStream) -> BoxFuture<'static, ()> + Send + Sync>;

/// What other capabilities plugged in. Held weakly: they hold the peers
/// strongly, and the node holds them all.
#[derive(Default)]
struct Hooks {
    resolve: OnceLock<Weak<dyn Resolve>>,
    circuits: OnceLock<Weak<dyn Circuits>>,
    observers: RwLock<Vec<Weak<dyn ConnectionObserver>>>,
    uni: OnceLock<UniHandler>,
}

/// Known peers, their connections, dialing, serving. See the module docs.
pub(crate) struct Peers {
    pub core: Arc<Core>,
    table: PeerTable,
    /// Counts inbound connections against the connection limits.
    pub gate: Arc<InboundGate>,
    /// The path each connected peer was last reported on.
    reports: PathReports,
    hooks: Hooks,
    /// Connects by key that dialed (see [`crate::histogram`]).
    pub(crate) connect_seconds: crate::histogram::Histogram,
    /// When the node was built, for its uptime.
    pub(crate) started: std::time::Instant,
}

impl std::ops::Deref for Peers {
    type Target = PeerTable;
    fn deref(&self) -> &PeerTable {
        &self.table
    }
}

impl Peers {
    pub(crate) fn new(core: Arc<Core>, table: PeerTable, gate: Arc<InboundGate>) -> Arc<Self> {
        Arc::new(Peers {
            core,
            table,
            gate,
            reports: PathReports::default(),
            hooks: Hooks::default(),
            connect_seconds: Default::default(),
            started: std::time::Instant::now(),
        })
    }

    /// Plugs in the DHT's lookups (once, at build).
    pub(crate) fn set_resolver(&self, r: Weak<dyn Resolve>) {
        let _ = self.hooks.resolve.set(r);
    }

    /// Plugs in the relay client (once, at build).
    pub(crate) fn set_circuits(&self, c: Weak<dyn Circuits>) {
        let _ = self.hooks.circuits.set(c);
    }

    /// Adds an observer of connections (at build; called in this order).
    pub(crate) fn observe(&self, o: Weak<dyn ConnectionObserver>) {
        self.hooks
            .observers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(o);
    }

    /// Plugs in what serves unidirectional streams (once, at build).
    pub(crate) fn set_uni_handler(&self, h: UniHandler) {
        let _ = self.hooks.uni.set(h);
    }

    fn resolver(&self) -> Option<Arc<dyn Resolve>> {
        self.hooks.resolve.get()?.upgrade()
    }

    fn circuits(&self) -> Option<Arc<dyn Circuits>> {
        self.hooks.circuits.get()?.upgrade()
    }

    fn each_observer(&self, f: impl Fn(&dyn ConnectionObserver)) {
        let observers: Vec<_> = self
            .hooks
            .observers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for o in observers {
            f(&*o);
        }
    }

    /// Looks `peer`'s record up through the plugged-in resolver.
    async fn resolve(&self, peer: PeerId, fresh: bool) -> Result<Vec<TypedAddr>> {
        match self.resolver() {
            Some(r) => r.resolve(peer, fresh).await,
            None => Err(Error::NotFound(peer)),
        }
    }

    /// Dials `peer` through `relay` with the plugged-in relay client.
    async fn dial_via(
        &self,
        relay: PeerId,
        relay_addr: SocketAddr,
        peer: PeerId,
    ) -> Result<quinn::Connection> {
        match self.circuits() {
            Some(c) => c.dial_via(relay, relay_addr, peer).await,
            None => Err(Error::Shutdown),
        }
    }

    /// The kind of path a connection to `addr` (its remote address) uses.
    /// `None` for a relayed circuit the relay client has forgotten: its
    /// connection is dead.
    pub(crate) fn path_kind(&self, addr: &SocketAddr) -> Option<PathKind> {
        use crate::vaddr::AddrClass;
        match crate::vaddr::class_of(addr) {
            AddrClass::Direct => Some(PathKind::Direct),
            AddrClass::Link => Some(PathKind::TcpLink),
            AddrClass::Relayed => self
                .circuits()?
                .relay_of(addr)
                .map(|relay| PathKind::Relayed { relay }),
        }
    }

    /// Reports `peer`'s connection state after the table changed: emits
    /// `PeerConnected`, `PathChanged` or `PeerDisconnected` on the bus and
    /// to the observers when the state differs from the last report.
    pub(crate) fn report_path(&self, peer: PeerId) {
        let event = self.reports.update(peer, || {
            let (conn, dir) = self.table.live_with_direction(&peer)?;
            Some((self.path_kind(&conn.remote_address())?, dir))
        });
        let Some(event) = event else { return };
        self.each_observer(|o| o.path_event(&event));
        self.core.bus.emit(event);
    }
}
