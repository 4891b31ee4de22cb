//! Hole punching: upgrading a relayed connection to a direct one.
//!
//! The peer that dialed through a relay asks that relay (connected to both
//! peers, so it can observe both addresses and time both paths) to
//! coordinate; see reach-proto's `punch::coordinate` for the exchange. Each
//! side then carries out its part of the introduction:
//!
//! - [`open`]: simultaneous open (and LAN-first): both send punch packets
//!   from the main socket; the dialer starts a QUIC handshake to where the
//!   other's packets came from;
//! - [`birthday`]: for an endpoint-dependent NAT facing an
//!   endpoint-independent one;
//! - [`liveness`]: a direct connection that replaced a relayed one is
//!   watched; when its path dies, traffic falls back to the relayed one.
//!
//! When to punch, how often and how many at once is reach-proto's
//! `punch::upgrade` machine (and when a path is dead, `punch::liveness`);
//! `upgrade` drives it (the requester's and the target's side),
//! `coordinator` is the relay's side, `stats` what `reach status` shows.
//!
//! Punching sits above the relay (it holds the relay, whose circuits it
//! upgrades and whose signalling it rides on: it implements the relay's
//! [`PunchSignals`]) and NAT discovery (whose mapping it reports). It
//! observes the peers' connections: a relayed connection we dialed starts
//! an upgrade, a direct one with a relayed standby is watched.
//!
//! Traversal is an optimisation: the relayed connection stays open
//! throughout (it carries traffic until the direct one takes over, and
//! stays as the standby), so a failed punch changes nothing for the
//! application.

pub(crate) mod birthday;
mod coordinator;
pub(crate) mod liveness;
pub(crate) mod open;
mod stats;
mod upgrade;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use reach_proto::PeerId;
use reach_proto::punch::{Introduction, PunchInfo};
use reach_proto::relay::rpc::RelayResponse;
use reach_proto::wire::datagram::ControlPacket;
use tokio::sync::{Notify, mpsc};

use crate::nat::Nat;
use crate::node::Direction;
use crate::node::core::Core;
use crate::peers::{Closed, ConnectionObserver, Peers, Registered};
use crate::relay::{PunchSignals, RelayRuntime};

pub use coordinator::INTRODUCTIONS_PER_SEC;
pub use reach_proto::punch::upgrade::{
    INTRODUCTION_SETTLE, MAX_BIRTHDAY_PUNCHES, MAX_CONCURRENT_PUNCHES, PUNCH_ATTEMPTS,
    PUNCH_RETRY_GAP, PUNCH_TIMEOUT, PunchError, REPUNCH_AFTER_FALLBACK,
};
pub use stats::{MAX_OUTCOMES, PunchOutcome, PunchStats, TIME_SAMPLES, TechniqueStats};

pub use crate::socket::{UdpBinder, bind_here};

/// Punch acknowledgements sent per punch at most (one per punch packet
/// received, so a peer cannot make us send more than it sends).
pub const MAX_ACKS_PER_PUNCH: u32 = 32;

/// A punch this node is taking part in, waiting for the peer's packets.
struct Pending {
    allowed: Vec<IpAddr>,
    first: mpsc::Sender<SocketAddr>,
    acks_left: u32,
}

/// The node's hole-punching state.
pub(crate) struct PunchRuntime {
    core: Arc<Core>,
    peers: Arc<Peers>,
    /// The relay below: circuits to upgrade, the coordinator's RPC, the
    /// relay held and the reachability found.
    relay: Arc<RelayRuntime>,
    /// The NAT's mapping behaviour, told to coordinators.
    nat: Arc<Nat>,
    /// This runtime itself, for the tasks it starts from `&self` hooks.
    this: Weak<PunchRuntime>,
    /// Hole punching is on (the builder's `hole_punching`).
    pub enabled: bool,
    pending: Mutex<HashMap<u64, Pending>>,
    counters: Mutex<stats::Counters>,
    /// Woken whenever a connection is registered.
    pub connections: Notify,
    /// The upgrade policy: upgrades, punches running (and their budget),
    /// re-punches due. Its time counts from `epoch`.
    upgrades: Mutex<upgrade::Driven>,
    epoch: tokio::time::Instant,
    /// QUIC endpoints made on sockets a birthday punch opened, closed with
    /// the node.
    endpoints: Mutex<Vec<quinn::Endpoint>>,
    /// Direct connections whose path is being watched (by stable id).
    watched: Mutex<std::collections::HashSet<usize>>,
    /// The coordinator's budget of introductions.
    introductions: Mutex<crate::util::RateLimiter>,
    /// What peers holding a reservation here said about their NAT.
    infos: Mutex<HashMap<PeerId, PunchInfo>>,
    /// Opens the birthday technique's extra sockets.
    pub binder: UdpBinder,
}

impl PunchRuntime {
    pub(crate) fn new(
        core: Arc<Core>,
        peers: Arc<Peers>,
        relay: Arc<RelayRuntime>,
        nat: Arc<Nat>,
        enabled: bool,
        binder: UdpBinder,
    ) -> Arc<Self> {
        Arc::new_cyclic(|this| PunchRuntime {
            core,
            peers,
            relay,
            nat,
            this: this.clone(),
            enabled,
            binder,
            pending: Mutex::default(),
            counters: Mutex::default(),
            connections: Notify::new(),
            upgrades: Mutex::default(),
            epoch: tokio::time::Instant::now(),
            endpoints: Mutex::default(),
            watched: Mutex::default(),
            introductions: Mutex::new(crate::util::RateLimiter::new(INTRODUCTIONS_PER_SEC)),
            infos: Mutex::default(),
        })
    }

    /// This runtime as an `Arc` (for tasks); `None` once the node is gone.
    fn arc(&self) -> Option<Arc<Self>> {
        self.this.upgrade()
    }

    /// The upgrade machine's `now`.
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// The instant of the machine's time `t`.
    fn instant(&self, t: Duration) -> tokio::time::Instant {
        self.epoch + t
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes a pending punch when its attempt ends, however it ends.
pub(crate) struct PendingGuard<'a> {
    rt: &'a PunchRuntime,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.rt.pending).remove(&self.id);
    }
}

impl PunchRuntime {
    /// Waits for punch packets of punch `id` from the IPs of `addrs`; the
    /// first one's source goes to the returned receiver.
    pub(crate) fn expect(
        &self,
        id: u64,
        addrs: &[SocketAddr],
    ) -> (PendingGuard<'_>, mpsc::Receiver<SocketAddr>) {
        let (tx, rx) = mpsc::channel(1);
        lock(&self.pending).insert(
            id,
            Pending {
                allowed: addrs.iter().map(|a| a.ip()).collect(),
                first: tx,
                acks_left: MAX_ACKS_PER_PUNCH,
            },
        );
        (PendingGuard { rt: self, id }, rx)
    }

    /// Keeps what a reservation holder said about its NAT (bounded by the
    /// number of reservations the relay grants).
    pub(crate) fn remember_info(
        &self,
        peer: PeerId,
        mut info: PunchInfo,
        max: usize,
        holds: impl Fn(&PeerId) -> bool,
    ) {
        info.lan
            .truncate(reach_proto::punch::coordinate::MAX_LAN_ADDRS);
        let mut m = lock(&self.infos);
        if m.len() >= max && !m.contains_key(&peer) {
            // Forget those whose reservation expired without a release.
            m.retain(|p, _| holds(p));
            if m.len() >= max {
                return;
            }
        }
        m.insert(peer, info);
    }

    pub(crate) fn forget_info(&self, peer: &PeerId) {
        lock(&self.infos).remove(peer);
    }

    /// Keeps `endpoint` (a birthday punch's) until the node shuts down or
    /// it has no connection left.
    pub(crate) fn keep_endpoint(&self, endpoint: quinn::Endpoint) {
        let mut e = lock(&self.endpoints);
        e.retain(|e| e.open_connections() > 0);
        e.push(endpoint);
    }

    /// Closes every extra endpoint (node shutdown).
    pub(crate) fn close_endpoints(&self) {
        for e in lock(&self.endpoints).drain(..) {
            e.close(0u32.into(), b"shutdown");
        }
    }

    /// Marks `conn` as watched; false if it already was.
    pub(crate) fn start_watching(&self, conn: &quinn::Connection) -> bool {
        lock(&self.watched).insert(conn.stable_id())
    }

    pub(crate) fn stop_watching(&self, conn: &quinn::Connection) {
        lock(&self.watched).remove(&conn.stable_id());
    }

    pub(super) fn info_of(&self, peer: &PeerId) -> PunchInfo {
        lock(&self.infos)
            .get(peer)
            .cloned()
            .unwrap_or_else(PunchInfo::unknown)
    }
}

impl PunchRuntime {
    /// What this node tells a coordinator about itself.
    pub(crate) fn local_info(&self) -> PunchInfo {
        use reach_proto::nat::Filtering;
        let ipv4 = self.core.local_addr.is_ipv4();
        let mapping = self.nat.mapping(ipv4);
        let filtering = match self.relay.reachability() {
            crate::relay::Reachability::Public(_) => Filtering::EndpointIndependent,
            _ => Filtering::Unknown,
        };
        let mut lan = self.core.local_addrs();
        lan.truncate(reach_proto::punch::coordinate::MAX_LAN_ADDRS);
        PunchInfo {
            mapping,
            filtering,
            udp: !self.core.tcp_mode(),
            lan,
        }
    }

    /// A punch or punch acknowledgement arrived on the main socket.
    pub(crate) fn on_packet(self: &Arc<Self>, from: SocketAddr, packet: &ControlPacket) {
        let (id, is_punch) = match packet {
            ControlPacket::Punch { id } => (*id, true),
            ControlPacket::PunchAck { id } => (*id, false),
            _ => return,
        };
        let mut pending = lock(&self.pending);
        tracing::trace!(%from, id, is_punch, known = pending.contains_key(&id), "punch packet");
        let Some(p) = pending.get_mut(&id) else {
            return;
        };
        if !p.allowed.contains(&from.ip()) {
            return;
        }
        let _ = p.first.try_send(from);
        if is_punch && p.acks_left > 0 {
            p.acks_left -= 1;
            let _ = self
                .core
                .socket
                .send_datagram(from, &ControlPacket::PunchAck { id }.encode());
        }
    }

    /// Waits until the connection to `peer` is direct, up to `deadline`.
    pub(crate) async fn wait_direct(&self, peer: &PeerId, deadline: tokio::time::Instant) -> bool {
        self.wait_until(deadline, || self.peers.is_direct(peer))
            .await
    }

    /// Waits until `cond` holds, checking again whenever a connection is
    /// registered, up to `deadline`.
    async fn wait_until(&self, deadline: tokio::time::Instant, cond: impl Fn() -> bool) -> bool {
        loop {
            let notified = self.connections.notified();
            if cond() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return cond();
            }
        }
    }
}

/// Punching's side of relay signalling.
impl PunchSignals for PunchRuntime {
    fn local_info(&self) -> PunchInfo {
        PunchRuntime::local_info(self)
    }

    fn reserved(&self, peer: PeerId, info: PunchInfo) {
        let max = self.relay.limits.max_clients;
        let paths = &self.relay.paths;
        self.remember_info(peer, info, max, |p| paths.has_reservation(p));
    }

    fn released(&self, peer: &PeerId) {
        self.forget_info(peer);
    }

    fn coordinate(
        &self,
        peer: PeerId,
        remote: SocketAddr,
        target: PeerId,
        attempt: u32,
        info: PunchInfo,
    ) -> BoxFuture<'_, RelayResponse> {
        Box::pin(PunchRuntime::coordinate(
            self, peer, remote, target, attempt, info,
        ))
    }

    fn introduced(&self, relay: PeerId, intro: Introduction) -> RelayResponse {
        match self.arc() {
            Some(rt) => rt.on_introduce(relay, intro),
            None => RelayResponse::Refused {
                reason: reach_proto::relay::rpc::refusal::PUNCH_UNWANTED.into(),
            },
        }
    }
}

/// Punching's reactions to the peers' connections.
/// Punch packets arrive on the main socket with NAT discovery's control
/// packets; NAT hands them over.
impl crate::nat::PunchPackets for PunchRuntime {
    fn on_packet(&self, from: SocketAddr, packet: &ControlPacket) {
        if let Some(rt) = self.arc() {
            PunchRuntime::on_packet(&rt, from, packet);
        }
    }
}

impl ConnectionObserver for PunchRuntime {
    fn registered(&self, c: &Registered<'_>) {
        let Some(rt) = self.arc() else { return };
        let relayed = crate::vaddr::is_virtual(&c.conn.remote_address());
        self.connections.notify_waiters();
        if self.peers.standby(&c.peer).is_some()
            && let Some(direct) = self.peers.live(&c.peer)
            && !crate::vaddr::is_virtual(&direct.remote_address())
        {
            // A direct connection with a relayed one behind it: watch its
            // path (whichever of the two arrived last).
            rt.watch(c.peer, direct);
        }
        if relayed && c.in_use && c.direction == Direction::Outbound {
            // We dialed through a relay: try for a direct path.
            if let Some(path) = self.relay.paths.path(&c.conn.remote_address()) {
                rt.start_upgrade(c.peer, path.relay);
            }
        }
    }

    fn closed(&self, c: &Closed) {
        if c.standby_took_over
            && let Some(rt) = self.arc()
        {
            // The peer closed a punched connection: back on the relay.
            rt.moved_to_standby(c.peer);
        }
        if c.none_left {
            // What a relay client said about its NAT goes with it.
            self.forget_info(&c.peer);
        }
    }
}
