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
//! Traversal is an optimisation: the relayed connection stays open
//! throughout (it carries traffic until the direct one takes over, and
//! stays as the standby), so a failed punch changes nothing for the
//! application.

pub(crate) mod birthday;
pub(crate) mod liveness;
pub(crate) mod open;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reach_proto::PeerId;
use reach_proto::punch::{Introduction, PunchInfo, Role, Technique};
use reach_proto::relay::rpc::{RelayRequest, RelayResponse, refusal};
use reach_proto::wire::datagram::ControlPacket;
use serde::Serialize;
use tokio::sync::{Notify, mpsc};

use crate::node::{Direction, Inner, inbound, peers};
use crate::relay::client;
use crate::relay::paths::is_virtual;

/// Opens `count` extra UDP sockets bound to `addr` (port 0), blocking (it
/// runs on a blocking thread): the birthday technique's many mappings.
/// Returns as many as it could open (an error only if none). The default
/// binds in this process's network namespace; the lab binds inside a
/// node's namespace.
pub type UdpBinder =
    Arc<dyn Fn(SocketAddr, usize) -> std::io::Result<Vec<std::net::UdpSocket>> + Send + Sync>;

/// The default [`UdpBinder`].
pub fn bind_here(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::UdpSocket>> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        match std::net::UdpSocket::bind(addr) {
            Ok(s) => out.push(s),
            Err(e) if out.is_empty() => return Err(e),
            Err(_) => break,
        }
    }
    Ok(out)
}

/// Attempts per relayed connection; retries swap the roles.
pub const PUNCH_ATTEMPTS: u32 = 3;
/// Pause between attempts (a NAT may need its half-open state to expire).
pub const PUNCH_RETRY_GAP: Duration = Duration::from_secs(1);
/// One attempt, from firing to an established direct connection.
pub const PUNCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Punches this node takes part in at once: each holds sockets, timers and
/// a share of the probe budget.
pub const MAX_CONCURRENT_PUNCHES: usize = 16;
/// Introductions a coordinator hands out per second at most (every one
/// makes two peers send packets).
pub const INTRODUCTIONS_PER_SEC: u32 = 50;
/// Per-peer outcomes remembered for `reach status`.
pub const MAX_OUTCOMES: usize = 256;
/// Time-to-direct samples kept for the median.
pub const TIME_SAMPLES: usize = 256;
/// How long a target waits for the relayed connection an introduction is
/// about: the requester asks right after its side of the handshake, which
/// may finish before ours.
pub const INTRODUCTION_SETTLE: Duration = Duration::from_secs(1);
/// Birthday punches (either side) at once: each opens 256 sockets or sends
/// up to 2,048 probes, so one at a time bounds a node's descriptors and
/// probe rate whatever peers and coordinators ask.
pub const MAX_BIRTHDAY_PUNCHES: usize = 1;
/// After a direct path died and traffic went back to the relay, the side
/// that dialed through the relay tries punching again this much later.
pub const REPUNCH_AFTER_FALLBACK: Duration = Duration::from_secs(30);
/// Punch acknowledgements sent per punch at most (one per punch packet
/// received, so a peer cannot make us send more than it sends).
pub const MAX_ACKS_PER_PUNCH: u32 = 32;

/// Why a punch did not give a direct connection. Each has a stable
/// [`PunchError::kind`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum PunchError {
    #[error("no relay connection to coordinate the punch through")]
    NoCoordinator,
    #[error("the coordinator refused: {0}")]
    Refused(String),
    #[error("no punch packet got through within {0:?}")]
    NoPath(Duration),
    #[error("a punch got through but the direct handshake failed: {0}")]
    Handshake(String),
    #[error("punch abandoned: {0}")]
    Abandoned(&'static str),
}

impl PunchError {
    pub fn kind(&self) -> &'static str {
        match self {
            PunchError::NoCoordinator => "punch_no_coordinator",
            PunchError::Refused(_) => "punch_refused",
            PunchError::NoPath(_) => "punch_no_path",
            PunchError::Handshake(_) => "punch_handshake_failed",
            PunchError::Abandoned(_) => "punch_abandoned",
        }
    }
}

/// Counters of one technique.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct TechniqueStats {
    pub technique: &'static str,
    /// Attempts this node took part in (as requester or target).
    pub attempts: u64,
    pub successes: u64,
    pub failures: u64,
}

/// How the last punch with one peer ended.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PunchOutcome {
    /// Increases with every outcome this node records.
    pub seq: u64,
    pub peer: PeerId,
    pub technique: &'static str,
    pub direct: bool,
    pub attempts: u32,
    /// From the punch request to the first packet from the peer's direct
    /// address.
    pub time_to_direct_ms: Option<u64>,
    pub error_kind: Option<&'static str>,
    pub error: Option<String>,
}

/// Hole punching as `reach status` and `/v1/punch` show it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PunchStats {
    pub techniques: Vec<TechniqueStats>,
    /// Direct paths that died, their traffic moved back to the relay.
    pub fallbacks: u64,
    pub time_to_direct_ms_p50: Option<f64>,
    /// The latest outcome per peer, newest first.
    pub recent: Vec<PunchOutcome>,
}

/// How a punch ended, for [`outcome`].
enum Ended<'a> {
    /// Direct; the time to the first direct packet when this side saw it.
    Direct(Option<Duration>),
    /// Relayed by choice (the technique says so).
    Relayed,
    Failed(&'a PunchError),
}

/// The outcome to record.
fn outcome(peer: PeerId, technique: Technique, attempts: u32, ended: Ended<'_>) -> PunchOutcome {
    let (direct, time, error) = match ended {
        Ended::Direct(t) => (true, t, None),
        Ended::Relayed => (false, None, None),
        Ended::Failed(e) => (false, None, Some(e)),
    };
    PunchOutcome {
        seq: 0,
        peer,
        technique: technique.name(),
        direct,
        attempts,
        time_to_direct_ms: time.map(|t| t.as_millis() as u64),
        error_kind: error.map(|e| e.kind()),
        error: error.map(|e| e.to_string()),
    }
}

/// A punch this node is taking part in, waiting for the peer's packets.
struct Pending {
    allowed: Vec<IpAddr>,
    first: mpsc::Sender<SocketAddr>,
    acks_left: u32,
}

#[derive(Default)]
struct Counters {
    by_technique: HashMap<Technique, TechniqueStats>,
    fallbacks: u64,
    times: VecDeque<Duration>,
    outcomes: VecDeque<PunchOutcome>,
    seq: u64,
}

/// The node's hole-punching state.
pub(crate) struct PunchRuntime {
    /// Hole punching is on (the builder's `hole_punching`).
    pub enabled: bool,
    pending: Mutex<HashMap<u64, Pending>>,
    counters: Mutex<Counters>,
    active: AtomicUsize,
    /// Woken whenever a connection is registered.
    pub connections: Notify,
    /// The one birthday punch (either side) allowed at a time: 256 sockets
    /// or 2,048 probes each.
    pub birthday: tokio::sync::Semaphore,
    /// QUIC endpoints made on sockets a birthday punch opened, closed with
    /// the node.
    endpoints: Mutex<Vec<quinn::Endpoint>>,
    /// Direct connections whose path is being watched (by stable id).
    watched: Mutex<std::collections::HashSet<usize>>,
    /// Peers this node is upgrading (one upgrade per peer at a time).
    upgrading: Mutex<std::collections::HashSet<PeerId>>,
    /// The coordinator's budget of introductions.
    introductions: Mutex<crate::node::control::RateLimiter>,
    /// What peers holding a reservation here said about their NAT.
    infos: Mutex<HashMap<PeerId, PunchInfo>>,
}

impl PunchRuntime {
    pub(crate) fn new(enabled: bool) -> Self {
        PunchRuntime {
            enabled,
            pending: Mutex::default(),
            counters: Mutex::default(),
            active: AtomicUsize::new(0),
            connections: Notify::new(),
            birthday: tokio::sync::Semaphore::new(MAX_BIRTHDAY_PUNCHES),
            endpoints: Mutex::default(),
            watched: Mutex::default(),
            upgrading: Mutex::default(),
            introductions: Mutex::new(crate::node::control::RateLimiter::new(
                INTRODUCTIONS_PER_SEC,
            )),
            infos: Mutex::default(),
        }
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

/// Holds one of the [`MAX_CONCURRENT_PUNCHES`] slots.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
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

    fn slot(&self) -> Option<Slot<'_>> {
        let n = self.active.fetch_add(1, Ordering::Relaxed);
        let slot = Slot(&self.active);
        (n < MAX_CONCURRENT_PUNCHES).then_some(slot)
    }

    fn count(&self, technique: Technique, f: impl FnOnce(&mut TechniqueStats)) {
        let mut c = lock(&self.counters);
        let e = c
            .by_technique
            .entry(technique)
            .or_insert_with(|| TechniqueStats {
                technique: technique.name(),
                ..Default::default()
            });
        f(e);
    }

    fn record(&self, mut outcome: PunchOutcome, time: Option<Duration>) {
        let mut c = lock(&self.counters);
        c.seq += 1;
        outcome.seq = c.seq;
        if let Some(t) = time {
            if c.times.len() >= TIME_SAMPLES {
                c.times.pop_front();
            }
            c.times.push_back(t);
        }
        c.outcomes.retain(|o| o.peer != outcome.peer);
        if c.outcomes.len() >= MAX_OUTCOMES {
            c.outcomes.pop_back();
        }
        c.outcomes.push_front(outcome);
    }

    /// The coordinator (or this node, without UDP) decided to stay relayed.
    fn stay_relayed(&self, peer: PeerId) {
        self.count(Technique::StayRelayed, |s| s.attempts += 1);
        self.record(
            outcome(peer, Technique::StayRelayed, 0, Ended::Relayed),
            None,
        );
    }

    /// A direct path died and its traffic went back to the relay.
    pub(crate) fn fell_back(&self) {
        lock(&self.counters).fallbacks += 1;
    }

    /// What the punch stats look like now.
    pub(crate) fn stats(&self) -> PunchStats {
        let c = lock(&self.counters);
        let mut times: Vec<Duration> = c.times.iter().copied().collect();
        times.sort();
        PunchStats {
            techniques: Technique::ALL
                .iter()
                .map(|t| {
                    c.by_technique.get(t).cloned().unwrap_or(TechniqueStats {
                        technique: t.name(),
                        ..Default::default()
                    })
                })
                .collect(),
            fallbacks: c.fallbacks,
            time_to_direct_ms_p50: times.get(times.len() / 2).map(|t| t.as_secs_f64() * 1000.0),
            recent: c.outcomes.iter().cloned().collect(),
        }
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

    fn info_of(&self, peer: &PeerId) -> PunchInfo {
        lock(&self.infos)
            .get(peer)
            .cloned()
            .unwrap_or_else(PunchInfo::unknown)
    }
}

/// What this node tells a coordinator about itself.
pub(crate) fn local_info(inner: &Inner) -> PunchInfo {
    use reach_proto::nat::{Filtering, Mapping};
    let ipv4 = inner.local_addr.is_ipv4();
    let mapping = inner
        .observed
        .lock()
        .map(|o| o.mapping(ipv4))
        .unwrap_or(Mapping::Unknown);
    let filtering = match inner.relay.reachability() {
        crate::relay::Reachability::Public(_) => Filtering::EndpointIndependent,
        _ => Filtering::Unknown,
    };
    let mut lan = crate::node::local_addrs_of(inner);
    lan.truncate(reach_proto::punch::coordinate::MAX_LAN_ADDRS);
    PunchInfo {
        mapping,
        filtering,
        udp: !inner.tcp_mode(),
        lan,
    }
}

/// A punch or punch acknowledgement arrived on the main socket.
pub(crate) fn on_packet(inner: &Inner, from: SocketAddr, packet: &ControlPacket) {
    let (id, is_punch) = match packet {
        ControlPacket::Punch { id } => (*id, true),
        ControlPacket::PunchAck { id } => (*id, false),
        _ => return,
    };
    let mut pending = lock(&inner.punch.pending);
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
        let _ = inner
            .socket
            .send_datagram(from, &ControlPacket::PunchAck { id }.encode());
    }
}

/// Waits until the connection to `peer` is direct, up to `deadline`.
pub(crate) async fn wait_direct(
    inner: &Inner,
    peer: &PeerId,
    deadline: tokio::time::Instant,
) -> bool {
    wait_until(inner, deadline, || inner.peers.is_direct(peer)).await
}

/// Waits until `cond` holds, checking again whenever a connection is
/// registered, up to `deadline`.
async fn wait_until(
    inner: &Inner,
    deadline: tokio::time::Instant,
    cond: impl Fn() -> bool,
) -> bool {
    loop {
        let notified = inner.punch.connections.notified();
        if cond() {
            return true;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return cond();
        }
    }
}

/// Starts upgrading the relayed connection to `peer` (made through
/// `relay`) in the background.
pub(crate) fn start_upgrade(inner: &Arc<Inner>, peer: PeerId, relay: PeerId) {
    if !inner.punch.enabled {
        return;
    }
    if inner.tcp_mode() {
        // No UDP here: nothing to punch with.
        inner.punch.stay_relayed(peer);
        return;
    }
    if !lock(&inner.punch.upgrading).insert(peer) {
        return;
    }
    let inner2 = inner.clone();
    inner.spawn(async move {
        upgrade(&inner2, peer, relay).await;
        lock(&inner2.punch.upgrading).remove(&peer);
    });
}

/// The requester's side: asks the relay to coordinate, carries out the
/// introduction, retries with swapped roles.
async fn upgrade(inner: &Arc<Inner>, peer: PeerId, relay: PeerId) {
    let rt = &inner.punch;
    let mut technique = Technique::StayRelayed;
    let mut last = PunchError::NoCoordinator;
    let mut attempts = 0;
    let direct_after_all = |attempts: u32, technique: Technique| {
        let direct = inner.peers.is_direct(&peer);
        if direct && attempts > 0 {
            // The other side's handshake got through after all.
            rt.record(
                outcome(peer, technique, attempts, Ended::Direct(None)),
                None,
            );
        }
        direct
    };
    for attempt in 0..PUNCH_ATTEMPTS {
        if direct_after_all(attempts, technique) {
            return;
        }
        if !inner.peers.is_relayed(&peer) {
            last = PunchError::Abandoned("the relayed connection closed");
            break;
        }
        let Some(relay_conn) = inner.peers.live(&relay) else {
            last = PunchError::NoCoordinator;
            break;
        };
        let started = Instant::now();
        let ask = RelayRequest::Punch {
            target: peer,
            attempt,
            info: local_info(inner),
        };
        let intro =
            match tokio::time::timeout(client::RELAY_RPC_TIMEOUT, client::rpc(&relay_conn, ask))
                .await
            {
                Ok(Ok(RelayResponse::Introduced(i))) if i.peer == peer => i,
                Ok(Ok(RelayResponse::Refused { reason })) => {
                    last = PunchError::Refused(reason);
                    break;
                }
                _ => {
                    last = PunchError::NoCoordinator;
                    break;
                }
            };
        technique = intro.technique;
        if technique == Technique::StayRelayed {
            tracing::debug!(%peer, "punch: staying relayed (both NATs map per destination, or no UDP)");
            rt.stay_relayed(peer);
            return;
        }
        attempts += 1;
        match execute(inner, &intro, started).await {
            Ok(t) => {
                rt.record(
                    outcome(peer, technique, attempts, Ended::Direct(Some(t))),
                    Some(t),
                );
                return;
            }
            Err(e) => {
                tracing::debug!(%peer, attempt, error = %e, "punch attempt failed");
                last = e;
            }
        }
        tokio::time::sleep(PUNCH_RETRY_GAP).await;
    }
    if direct_after_all(attempts, technique) {
        return;
    }
    rt.record(
        outcome(peer, technique, attempts, Ended::Failed(&last)),
        None,
    );
}

/// The dialer's last step: a QUIC handshake with `peer` at `addr` from
/// `endpoint`, registered as the peer's (direct) connection.
async fn dial_and_register(
    inner: &Arc<Inner>,
    endpoint: &quinn::Endpoint,
    peer: PeerId,
    addr: SocketAddr,
    deadline: tokio::time::Instant,
) -> Result<(), PunchError> {
    let conn = tokio::time::timeout_at(deadline, peers::dial_from(inner, endpoint, peer, addr))
        .await
        .map_err(|_| PunchError::Handshake("timed out".into()))?
        .map_err(|e| PunchError::Handshake(e.to_string()))?;
    inbound::register(inner, peer, conn, Direction::Outbound);
    Ok(())
}

/// Carries out one introduction: waits for the fire time, then the
/// technique's part for this side. Returns the time from `started` to the
/// first packet from the peer's direct address.
async fn execute(
    inner: &Arc<Inner>,
    intro: &Introduction,
    started: Instant,
) -> Result<Duration, PunchError> {
    let rt = &inner.punch;
    let Some(_slot) = rt.slot() else {
        return Err(PunchError::Abandoned("too many punches at once"));
    };
    if !reach_proto::punch::coordinate::acceptable(intro) {
        return Err(PunchError::Refused(
            "the introduction is beyond this node's bounds".into(),
        ));
    }
    let _birthday = if intro.technique == Technique::Birthday {
        match rt.birthday.try_acquire() {
            Ok(permit) => Some(permit),
            Err(_) => return Err(PunchError::Abandoned("another birthday punch is running")),
        }
    } else {
        None
    };
    rt.count(intro.technique, |s| s.attempts += 1);
    tracing::debug!(peer = %intro.peer, technique = intro.technique.name(), role = ?intro.role, addrs = ?intro.addrs, fire_in_ms = intro.fire_in_ms, "punching");
    tokio::time::sleep(Duration::from_millis(u64::from(intro.fire_in_ms))).await;
    let result = match (intro.technique, intro.role) {
        (Technique::Birthday, Role::Dialer) => birthday::hard_side(inner, intro, started).await,
        (Technique::Birthday, Role::Listener) => birthday::easy_side(inner, intro, started).await,
        _ => open::run(inner, intro, started).await,
    };
    rt.count(intro.technique, |s| {
        if result.is_ok() {
            s.successes += 1
        } else {
            s.failures += 1
        }
    });
    result
}

/// The target's side: the relay introduced `intro.peer`. Accepted only from
/// the relay we hold a reservation at, for a peer we are connected to over
/// a relay, and when UDP works here.
pub(crate) fn on_introduce(
    inner: &Arc<Inner>,
    relay: PeerId,
    intro: Introduction,
) -> RelayResponse {
    let unwanted = || RelayResponse::Refused {
        reason: refusal::PUNCH_UNWANTED.into(),
    };
    if inner.relay.held().is_none_or(|(r, _)| r != relay)
        || inner.tcp_mode()
        || !inner.punch.enabled
    {
        return unwanted();
    }
    let inner2 = inner.clone();
    inner.spawn(async move {
        let started = Instant::now();
        let peer = intro.peer;
        let settle = tokio::time::Instant::now() + INTRODUCTION_SETTLE;
        if !wait_until(&inner2, settle, || inner2.peers.is_relayed(&peer)).await {
            tracing::debug!(%peer, "introduced to a peer we have no relayed connection with");
            return;
        }
        let outcome = execute(&inner2, &intro, started).await;
        tracing::debug!(%peer, technique = intro.technique.name(), ok = outcome.is_ok(), "punch (target side)");
    });
    RelayResponse::Accepted
}

/// The coordinator's side: `peer` (at `remote`) asks to punch through to
/// `target`, which holds a reservation here.
pub(crate) async fn coordinate(
    inner: &Arc<Inner>,
    peer: PeerId,
    remote: SocketAddr,
    target: PeerId,
    attempt: u32,
    info: PunchInfo,
) -> RelayResponse {
    use reach_proto::punch::coordinate::{Party, introduce};
    let refused = |reason: &str| RelayResponse::Refused {
        reason: reason.into(),
    };
    if !inner.relay.is_serving() || is_virtual(&remote) {
        return refused(refusal::NOT_A_RELAY);
    }
    if !inner.paths.has_reservation(&target) {
        return refused(refusal::NO_RESERVATION);
    }
    // Only the two ends of a circuit here may punch: nobody else learns
    // the target's address or spends the introduction budget on it.
    if !inner.paths.has_circuit_between(&peer, &target) {
        return refused(refusal::PUNCH_NO_CIRCUIT);
    }
    let (Some(requester_conn), Some(target_conn)) =
        (inner.peers.live(&peer), inner.peers.live(&target))
    else {
        return refused(refusal::TARGET_UNREACHABLE);
    };
    if !lock(&inner.punch.introductions).allow(Instant::now()) {
        return refused(refusal::PUNCH_RATE);
    }
    let Ok(id) = crate::node::control::random_u64() else {
        return refused(refusal::PUNCH_RATE);
    };
    let requester = Party {
        peer,
        info,
        observed: remote,
        rtt: requester_conn.rtt(),
    };
    let target_party = Party {
        peer: target,
        info: inner.punch.info_of(&target),
        observed: target_conn.remote_address(),
        rtt: target_conn.rtt(),
    };
    let (for_requester, for_target) = introduce(id, &requester, &target_party, attempt);
    if for_requester.technique != Technique::StayRelayed {
        // Both introductions leave now; the fire delays absorb the
        // difference in path lengths.
        inner.spawn(async move {
            let _ = tokio::time::timeout(
                client::RELAY_RPC_TIMEOUT,
                client::rpc(&target_conn, RelayRequest::Introduce(for_target)),
            )
            .await;
        });
    }
    tracing::debug!(from = %peer, to = %target, technique = for_requester.technique.name(), "introduced");
    RelayResponse::Introduced(for_requester)
}
