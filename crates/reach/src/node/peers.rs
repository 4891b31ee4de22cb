//! The table of known peers: their addresses and their live connection, and
//! dialing by key.
//!
//! One connection per peer is kept and reused. Dials to one peer are
//! serialised by a per-peer lock, so concurrent `send`s to a peer that is not
//! connected yet share one handshake instead of racing several.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use reach_proto::PeerId;
use tokio::sync::Mutex as AsyncMutex;

use super::{Direction, Inner, PeerInfo, inbound, stats};
use crate::dht::ops;
use crate::error::{Error, Result};
use crate::handshake::{self, PostQuantum};
use crate::vaddr::is_virtual;
use crate::{tls, transport};
use reach_proto::dht::record::{AddrKind, TypedAddr};

/// Addresses remembered per peer; the oldest are forgotten first.
pub const MAX_ADDRS_PER_PEER: usize = 8;
/// Relays remembered per peer.
pub const MAX_RELAYS_PER_PEER: usize = 4;
/// Happy eyeballs: how long direct addresses have to themselves before the
/// relayed dial starts too. A direct path wins when it works quickly; a
/// NATed peer costs this much extra at most.
pub const RELAY_DIAL_DELAY: Duration = Duration::from_millis(250);
/// Network lookups of a peer's record per dial at most, [`FRESH_RESOLVE_GAP`]
/// apart, while each finds nothing new to dial: a peer that just lost its
/// relay republishes within seconds.
pub const FRESH_RESOLVES: usize = 4;
/// The gap between those lookups.
pub const FRESH_RESOLVE_GAP: Duration = Duration::from_secs(1);
/// When dialing known addresses has not succeeded within this, the peer's
/// endpoint record is looked up in parallel (it may have moved, or changed
/// relays).
pub const RESOLVE_AFTER: Duration = Duration::from_secs(1);

#[derive(Default)]
struct PeerEntry {
    addrs: Vec<SocketAddr>,
    /// Relays the peer published (relay id, relay address), newest first.
    relays: Vec<(PeerId, SocketAddr)>,
    conn: Option<(quinn::Connection, Direction)>,
    /// A relayed connection kept open behind a direct one that replaced it
    /// (a punch succeeded): if the direct path dies, traffic moves back to
    /// it at once instead of waiting for a redial.
    standby: Option<(quinn::Connection, Direction)>,
    dial_lock: Arc<AsyncMutex<()>>,
    /// The application sent or received a message or stream on the current
    /// connection: it is kept open (with keep-alives) until a side closes it.
    app_used: bool,
    /// The application has used this peer at some point (a message, a
    /// stream, a dial): its remembered addresses may exist nowhere else
    /// (e.g. given by the user), so the entry outlives its connections and
    /// is evicted only after every entry the application never used.
    ever_app_used: bool,
    /// Last DHT request on the current connection, either way.
    last_used: Option<Instant>,
    /// When the entry was last used, on the table's logical clock: the
    /// least recent idle entries are forgotten first.
    recency: u64,
}

impl PeerEntry {
    /// Neither connected nor being dialed: only remembered addresses,
    /// which a DHT lookup can find again.
    fn is_idle(&self) -> bool {
        let alive = |c: &Option<(quinn::Connection, Direction)>| {
            c.as_ref().is_some_and(|(c, _)| c.close_reason().is_none())
        };
        !alive(&self.conn) && !alive(&self.standby) && Arc::strong_count(&self.dial_lock) == 1
    }
}

/// A connection that only ever carried DHT requests is closed after this
/// long without one. DHT lookups touch many peers once; keeping each of
/// those connections alive forever would grow without bound.
pub const DHT_CONNECTION_IDLE: Duration = Duration::from_secs(120);

/// Known peers and their connections.
pub(crate) struct PeerTable {
    entries: Mutex<Entries>,
    /// Idle entries kept at most (see [`super::limits::MAX_IDLE_PEERS`]).
    max_idle: usize,
}

#[derive(Default)]
struct Entries {
    map: HashMap<PeerId, PeerEntry>,
    /// The logical clock of `recency`.
    clock: u64,
    /// Table size at which the next pruning pass runs.
    prune_at: usize,
    /// Entries forgotten so far.
    evicted: u64,
}

impl Default for PeerTable {
    fn default() -> Self {
        PeerTable::new(super::limits::MAX_IDLE_PEERS)
    }
}

impl PeerTable {
    pub fn new(max_idle: usize) -> Self {
        PeerTable {
            entries: Mutex::new(Entries {
                prune_at: max_idle,
                ..Entries::default()
            }),
            max_idle,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut HashMap<PeerId, PeerEntry>) -> R) -> R {
        // A poisoned lock only means another task panicked mid-update of a
        // plain map; the map itself is still consistent enough to use.
        let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard.map)
    }

    /// Like `with`, for a call that uses `peer` (creating its entry if
    /// needed): marks it most recently used, and when the table has grown
    /// past the pruning mark forgets the least recently used idle entries
    /// beyond `max_idle`. Pruning sorts the idle entries, so it runs only
    /// after the table grew by an eighth of `max_idle`: amortised cost per
    /// call O(log n).
    fn with_peer<R>(&self, peer: PeerId, f: impl FnOnce(&mut PeerEntry) -> R) -> R {
        let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let t = &mut *guard;
        t.clock += 1;
        let e = t.map.entry(peer).or_default();
        e.recency = t.clock;
        let out = f(e);
        if t.map.len() > t.prune_at {
            let mut idle: Vec<(bool, u64, PeerId)> = t
                .map
                .iter()
                .filter(|(p, e)| **p != peer && e.is_idle())
                .map(|(p, e)| (e.ever_app_used, e.recency, *p))
                .collect();
            if idle.len() > self.max_idle {
                idle.sort_unstable();
                let excess = idle.len() - self.max_idle;
                for (_, _, p) in &idle[..excess] {
                    t.map.remove(p);
                }
                t.evicted += excess as u64;
                if t.map.capacity() > 4 * t.map.len().max(16) {
                    t.map.shrink_to_fit();
                }
            }
            t.prune_at = t.map.len() + self.max_idle / 8 + 1;
        }
        out
    }

    /// Forgets `peer` at once if nothing needs its entry: no live
    /// connection, no dial in progress, and the application never used the
    /// connection that just closed (an identity that connected and left:
    /// a flood of those would otherwise fill the table up to its bound,
    /// and each surviving entry pins a page of the heap its connection
    /// was allocated among). Returns whether it did.
    pub fn forget_if_unused(&self, peer: &PeerId) -> bool {
        let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let t = &mut *guard;
        let unused = t
            .map
            .get(peer)
            .is_some_and(|e| e.is_idle() && !e.ever_app_used && e.relays.is_empty());
        if unused {
            t.map.remove(peer);
            t.evicted += 1;
        }
        unused
    }

    /// Entries forgotten so far to keep the table bounded.
    pub fn evicted(&self) -> u64 {
        self.entries.lock().map_or(0, |t| t.evicted)
    }

    /// Entries in the table (connected or not).
    pub fn len(&self) -> usize {
        self.with(|m| m.len())
    }

    /// Adds addresses for `peer`, newest first, keeping at most
    /// [`MAX_ADDRS_PER_PEER`].
    pub fn remember(&self, peer: PeerId, addrs: impl IntoIterator<Item = SocketAddr>) {
        // Virtual (relayed) addresses mean nothing outside this process's
        // circuits; relays are remembered as relays.
        let new: Vec<SocketAddr> = addrs.into_iter().filter(|a| !is_virtual(a)).collect();
        if new.is_empty() {
            return;
        }
        self.with_peer(peer, |e| {
            let mut merged: Vec<SocketAddr> = Vec::new();
            for a in new.iter().chain(e.addrs.iter()) {
                if !merged.contains(a) {
                    merged.push(*a);
                }
            }
            merged.truncate(MAX_ADDRS_PER_PEER);
            e.addrs = merged;
        });
    }

    /// Remembers the typed addresses of `peer`'s endpoint record: relays as
    /// relays, the others as addresses (LAN ones first).
    pub fn remember_typed(&self, peer: PeerId, typed: &[TypedAddr]) {
        let Known { addrs, relays } = Known::from_record(peer, typed);
        self.remember(peer, addrs);
        if relays.is_empty() {
            return;
        }
        self.with_peer(peer, |e| {
            // A record's relays replace the old ones: a peer that changed
            // relays is not to be dialed through the old one.
            e.relays = relays;
            e.relays.truncate(MAX_RELAYS_PER_PEER);
        });
    }

    /// Adds `addr` as the least preferred address of `peer` if it is new
    /// and there is room.
    pub fn remember_fallback(&self, peer: PeerId, addr: SocketAddr) {
        if is_virtual(&addr) {
            return;
        }
        self.with_peer(peer, |e| {
            if !e.addrs.contains(&addr) && e.addrs.len() < MAX_ADDRS_PER_PEER {
                e.addrs.push(addr);
            }
        });
    }

    /// The live connection to `peer`, if any.
    pub fn live(&self, peer: &PeerId) -> Option<quinn::Connection> {
        self.live_with_direction(peer).map(|(c, _)| c)
    }

    fn addrs_and_lock(&self, peer: PeerId) -> (Known, Arc<AsyncMutex<()>>) {
        self.with_peer(peer, |e| {
            (
                Known {
                    addrs: e.addrs.clone(),
                    relays: e.relays.clone(),
                },
                e.dial_lock.clone(),
            )
        })
    }

    /// Records a new live connection to `peer`. A direct connection
    /// replaces a relayed one, which stays open as the standby; a relayed
    /// connection arriving while a direct one lives becomes the standby;
    /// otherwise the new connection replaces the old. Returns whether the
    /// new connection is the one traffic now uses.
    pub fn insert(&self, peer: PeerId, conn: quinn::Connection, dir: Direction) -> bool {
        let alive = |c: &quinn::Connection| c.close_reason().is_none();
        let new_direct = !is_virtual(&conn.remote_address());
        self.with_peer(peer, |e| {
            let current = e.conn.as_ref().filter(|(c, _)| alive(c)).cloned();
            // A standby pushed out by a newer one is idle (traffic runs on
            // the direct connection): close it, or its keep-alives would
            // hold it, and its relay circuit, forever.
            let mut replace_standby = |new: (quinn::Connection, Direction)| {
                let new_id = new.0.stable_id();
                if let Some((displaced, _)) = e.standby.replace(new)
                    && displaced.stable_id() != new_id
                {
                    displaced.close(0u32.into(), b"replaced");
                }
            };
            match current {
                Some((old, _)) if !new_direct && !is_virtual(&old.remote_address()) => {
                    replace_standby((conn, dir));
                    return false;
                }
                Some(old) if new_direct && is_virtual(&old.0.remote_address()) => {
                    replace_standby(old);
                }
                Some(_) => {}
                None => e.app_used = false,
            }
            e.conn = Some((conn, dir));
            e.last_used = Some(Instant::now());
            true
        })
    }

    /// Whether the connection to `peer` is live and relayed.
    pub fn is_relayed(&self, peer: &PeerId) -> bool {
        self.live(peer).is_some_and(|c| {
            crate::vaddr::class_of(&c.remote_address()) == crate::vaddr::AddrClass::Relayed
        })
    }

    /// The live connection to `peer` and who opened it. When the current
    /// one has closed and nobody has noticed yet, a live standby takes its
    /// place here, so no caller dials while one is available.
    pub fn live_with_direction(&self, peer: &PeerId) -> Option<(quinn::Connection, Direction)> {
        let alive = |c: &quinn::Connection| c.close_reason().is_none();
        self.with(|m| {
            let e = m.get_mut(peer)?;
            if e.conn.as_ref().is_none_or(|(c, _)| !alive(c))
                && e.standby.as_ref().is_some_and(|(s, _)| alive(s))
            {
                e.conn = e.standby.take();
            }
            e.conn.clone().filter(|(c, _)| alive(c))
        })
    }

    /// Whether the connection to `peer` is live and direct.
    pub fn is_direct(&self, peer: &PeerId) -> bool {
        self.live(peer)
            .is_some_and(|c| !is_virtual(&c.remote_address()))
    }

    /// The relayed connection kept behind `peer`'s direct one, if live.
    pub fn standby(&self, peer: &PeerId) -> Option<quinn::Connection> {
        self.with(|m| {
            m.get(peer)
                .and_then(|e| e.standby.as_ref().map(|(c, _)| c.clone()))
                .filter(|c| c.close_reason().is_none())
        })
    }

    /// Notes a use of the connection to `peer`: by the application (which
    /// pins it open) or by the DHT (which refreshes its idle timer).
    pub fn touch(&self, peer: &PeerId, app: bool) {
        let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let t = &mut *guard;
        t.clock += 1;
        if let Some(e) = t.map.get_mut(peer) {
            e.app_used |= app;
            e.ever_app_used |= app;
            e.last_used = Some(Instant::now());
            e.recency = t.clock;
        }
    }

    /// Connections that only the DHT used and that have been idle for
    /// `idle`.
    pub fn idle_dht_connections(&self, idle: Duration) -> Vec<quinn::Connection> {
        self.with(|m| {
            m.values()
                .filter(|e| !e.app_used && e.last_used.is_some_and(|t| t.elapsed() >= idle))
                .filter_map(|e| e.conn.as_ref().map(|(c, _)| c.clone()))
                .filter(|c| c.close_reason().is_none())
                .collect()
        })
    }

    /// Forgets `conn` if it is recorded for `peer`; when it was the one in
    /// use, a live standby takes its place. Returns whether a standby did.
    pub fn remove_if_current(&self, peer: PeerId, stable_id: usize) -> bool {
        self.with(|m| {
            let Some(e) = m.get_mut(&peer) else {
                return false;
            };
            if e.standby
                .as_ref()
                .is_some_and(|(c, _)| c.stable_id() == stable_id)
            {
                e.standby = None;
            }
            if e.conn
                .as_ref()
                .is_none_or(|(c, _)| c.stable_id() != stable_id)
            {
                return false;
            }
            e.conn = e.standby.take().filter(|(c, _)| c.close_reason().is_none());
            e.conn.is_some()
        })
    }

    /// Forgets every connection to `peer` and returns them (to close).
    pub fn take_all(&self, peer: &PeerId) -> Vec<quinn::Connection> {
        self.with(|m| {
            let Some(e) = m.get_mut(peer) else {
                return Vec::new();
            };
            e.conn
                .take()
                .into_iter()
                .chain(e.standby.take())
                .map(|(c, _)| c)
                .collect()
        })
    }

    /// Peers with a live connection, sorted by peer id.
    pub fn connected(&self) -> Vec<PeerInfo> {
        let mut out: Vec<PeerInfo> = self.with(|m| {
            m.iter()
                .filter_map(|(peer, e)| {
                    let (c, dir) = e.conn.as_ref()?;
                    c.close_reason().is_none().then(|| PeerInfo {
                        peer: *peer,
                        addr: c.remote_address(),
                        rtt_ms: c.rtt().as_millis() as u64,
                        direction: *dir,
                        relay: None,
                        standby_relay: None,
                        kx_group: crate::handshake::negotiated_group(c),
                    })
                })
                .collect()
        });
        out.sort_by_key(|p| p.peer);
        out
    }
}

/// The live connection to `peer`, dialing its known addresses if needed,
/// and resolving its endpoint record through the DHT when none is known or
/// none works.
pub(crate) async fn connection(inner: &Arc<Inner>, peer: PeerId) -> Result<quinn::Connection> {
    connection_via(inner, peer, &[]).await
}

/// Like [`connection`], also trying `hint` (addresses the user gave for
/// this call). A hint is remembered only if it produced the authenticated
/// connection (see [`dial_any`]): an address that failed once is not tried
/// again by later calls that did not give it.
pub(crate) async fn connection_via(
    inner: &Arc<Inner>,
    peer: PeerId,
    hint: &[SocketAddr],
) -> Result<quinn::Connection> {
    let conn = connect_with(inner, peer, hint, true).await?;
    inner.peers.touch(&peer, true);
    Ok(conn)
}

/// Like [`connection`] but never consults the DHT (the DHT itself uses this,
/// so a lookup cannot recurse into more lookups). `hint` addresses are tried
/// along with the known ones.
pub(crate) async fn connection_known(
    inner: &Arc<Inner>,
    peer: PeerId,
    hint: &[SocketAddr],
) -> Result<quinn::Connection> {
    let conn = connect_with(inner, peer, hint, false).await?;
    inner.peers.touch(&peer, false);
    Ok(conn)
}

/// Where a peer may be dialed.
#[derive(Debug, Clone, Default)]
struct Known {
    addrs: Vec<SocketAddr>,
    relays: Vec<(PeerId, SocketAddr)>,
}

impl Known {
    /// What `peer`'s endpoint record offers: its addresses (LAN ones first)
    /// and its relays (never the peer itself, never a virtual address).
    fn from_record(peer: PeerId, typed: &[TypedAddr]) -> Self {
        // A peer that publishes a relay found itself unreachable: its
        // unverified (merely observed) address would only be filtered by
        // its NAT, and an unsolicited packet to it leaves a conntrack
        // entry on that NAT that makes the peer's own packets towards us
        // leave from another port, which spoils the hole punch that
        // follows. Such a peer is dialed at its LAN addresses (a shared
        // NAT) and its relay, then punched.
        let has_relay = typed.iter().any(|t| t.kind == AddrKind::Relay);
        let mut direct: Vec<&TypedAddr> = typed
            .iter()
            .filter(|t| t.kind != AddrKind::Relay)
            .filter(|t| !(has_relay && t.kind == AddrKind::Unverified))
            .collect();
        direct.sort_by_key(|t| t.kind != AddrKind::Lan);
        Known {
            addrs: direct.iter().map(|t| t.addr).collect(),
            relays: typed
                .iter()
                .filter(|t| t.kind == AddrKind::Relay)
                .filter_map(|t| Some((t.via?, t.addr)))
                .filter(|(r, a)| *r != peer && !is_virtual(a))
                .collect(),
        }
    }

    fn is_empty(&self) -> bool {
        self.addrs.is_empty() && self.relays.is_empty()
    }
}

async fn connect_with(
    inner: &Arc<Inner>,
    peer: PeerId,
    hint: &[SocketAddr],
    resolve: bool,
) -> Result<quinn::Connection> {
    if inner.is_shut_down() {
        return Err(Error::Shutdown);
    }
    if peer == inner.peer_id {
        return Err(Error::Connect {
            peer,
            reason: "that is this node's own id".into(),
        });
    }
    if let Some(c) = inner.peers.live(&peer) {
        return Ok(c);
    }
    let (_, lock) = inner.peers.addrs_and_lock(peer);
    // DHT requests (resolve = false) never wait for a dial in progress: a
    // lookup run by that very dial may be querying this peer.
    let _dialing = if resolve {
        Some(lock.lock().await)
    } else {
        lock.try_lock().ok()
    };
    // Someone else may have connected while we waited for the lock.
    if let Some(c) = inner.peers.live(&peer) {
        return Ok(c);
    }
    let (mut known, _) = inner.peers.addrs_and_lock(peer);
    for h in hint {
        if !known.addrs.contains(h) {
            known.addrs.push(*h);
        }
    }
    let conn = if !resolve {
        if known.is_empty() {
            return Err(Error::NoAddress(peer));
        }
        dial_any(inner, peer, &known).await?
    } else {
        dial_or_resolve(inner, peer, known).await?
    };
    inbound::register(inner, peer, conn.clone(), Direction::Outbound);
    Ok(conn)
}

/// Dials the known addresses and, if that has not worked within
/// [`RESOLVE_AFTER`] (at once when nothing is known), also resolves the
/// peer's endpoint record and dials what is new in it. The first
/// authenticated connection wins.
///
/// Boxed with a named type: resolving runs DHT requests, which dial.
fn dial_or_resolve(
    inner: &Arc<Inner>,
    peer: PeerId,
    known: Known,
) -> futures::future::BoxFuture<'_, Result<quinn::Connection>> {
    Box::pin(dial_or_resolve_inner(inner, peer, known))
}

async fn dial_or_resolve_inner(
    inner: &Arc<Inner>,
    peer: PeerId,
    known: Known,
) -> Result<quinn::Connection> {
    use futures::FutureExt;
    let nothing_known = known.is_empty();
    let direct = {
        let known = known.clone();
        async move {
            if known.is_empty() {
                return Err(Error::NoAddress(peer));
            }
            dial_any(inner, peer, &known).await
        }
    };
    // Known addresses that all failed start the lookup at once.
    let (direct_failed, direct_failed_rx) = tokio::sync::oneshot::channel::<()>();
    let mut direct_failed = Some(direct_failed);
    let via_record = async move {
        if !nothing_known {
            tokio::select! {
                _ = tokio::time::sleep(RESOLVE_AFTER) => {}
                _ = direct_failed_rx => {}
            }
        }
        let mut tried = known;
        let mut last = Error::NotFound(peer);
        // A stored or first-found record first (fast); if its addresses
        // fail, the newest record the network has.
        for attempt in 0..=FRESH_RESOLVES {
            let fresh = attempt > 0;
            if attempt > 1 {
                // The peer may be between relays, its new record not yet
                // published: look again shortly.
                tokio::time::sleep(FRESH_RESOLVE_GAP).await;
            }
            let found = if fresh {
                ops::resolve_fresh(inner, peer).await
            } else {
                ops::resolve(inner, peer).await
            };
            let typed = match found {
                Ok((_, typed)) => typed,
                Err(e) => {
                    tracing::debug!(%peer, fresh, error = %e, "no endpoint record");
                    last = e;
                    // No record anywhere: waiting will not make one. (A
                    // record that offers nothing new is looked up again.)
                    if fresh {
                        break;
                    }
                    continue;
                }
            };
            tracing::debug!(%peer, fresh, ?typed, "endpoint record");
            inner.peers.remember_typed(peer, &typed);
            let mut new = Known::from_record(peer, &typed);
            new.addrs.retain(|a| !tried.addrs.contains(a));
            new.relays.retain(|r| !tried.relays.contains(r));
            if new.is_empty() {
                continue;
            }
            tried.addrs.extend(&new.addrs);
            tried.relays.extend(&new.relays);
            match dial_any(inner, peer, &new).await {
                Ok(c) => return Ok(c),
                Err(e) => last = e,
            }
        }
        Err(last)
    };
    let mut direct = direct.boxed().fuse();
    let mut via_record = via_record.boxed().fuse();
    let mut direct_err = None;
    let mut record_err = None;
    while direct_err.is_none() || record_err.is_none() {
        futures::select! {
            r = direct => match r {
                Ok(c) => return Ok(c),
                // A proven impostor at a known address is not fixed by a
                // lookup.
                Err(e @ Error::PeerIdMismatch { .. }) => return Err(e),
                Err(e) => {
                    direct_err = Some(e);
                    if let Some(tx) = direct_failed.take() {
                        let _ = tx.send(());
                    }
                }
            },
            r = via_record => match r {
                Ok(c) => return Ok(c),
                Err(e) => record_err = Some(e),
            },
        }
    }
    // The most telling error: what the known addresses said, unless there
    // were none.
    match (direct_err, record_err) {
        (Some(Error::NoAddress(_)), Some(e)) | (None, Some(e)) => Err(e),
        (Some(Error::Connect { reason, .. }), Some(e)) if !matches!(e, Error::NotFound(_)) => {
            Err(Error::Connect {
                peer,
                reason: format!("{reason}; then through its DHT record: {e}"),
            })
        }
        (Some(e), _) => Err(e),
        (None, None) => Err(Error::NoAddress(peer)),
    }
}

/// Dials a bare address whose identity we do not know yet (bootstrap):
/// accepts any valid identity and returns it.
pub(crate) async fn dial_unknown(inner: &Arc<Inner>, addr: SocketAddr) -> Result<PeerId> {
    let fail = |reason: String| Error::Config(format!("bootstrap {addr}: {reason}"));
    let (connecting, _) = start_handshake(inner, &inner.endpoint, None, addr, fail).await?;
    let conn = tokio::time::timeout(transport::CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| Error::Timeout("bootstrap handshake"))?
        .map_err(|e| fail(e.to_string()))?;
    let Some(peer) = inbound::remote_peer_id(&conn) else {
        conn.close(inbound::codes::MALFORMED.into(), b"no identity");
        return Err(fail("no identity in the handshake".into()));
    };
    if peer == inner.peer_id {
        conn.close(0u32.into(), b"self");
        return Err(fail("that address is this node itself".into()));
    }
    stats::bump(&inner.counters.connections_outbound);
    inner.peers.remember(peer, [addr]);
    inbound::register(inner, peer, conn, Direction::Outbound);
    Ok(peer)
}

/// Opens a unidirectional stream to `peer`, redialing once if the recorded
/// connection turns out to be dead (nothing has been sent on it yet, so the
/// retry cannot duplicate a message). Also returns the connection.
pub(crate) async fn open_uni(
    inner: &Arc<Inner>,
    peer: PeerId,
) -> Result<(quinn::SendStream, quinn::Connection)> {
    let conn = connection(inner, peer).await?;
    match conn.open_uni().await {
        Ok(s) => Ok((s, conn)),
        Err(_) => {
            inner.peers.remove_if_current(peer, conn.stable_id());
            let conn = connection(inner, peer).await?;
            conn.open_uni()
                .await
                .map(|s| (s, conn.clone()))
                .map_err(|e| Error::ConnectionLost {
                    peer,
                    reason: e.to_string(),
                })
        }
    }
}

/// Dials all direct addresses at once and, [`RELAY_DIAL_DELAY`] later (at
/// once if there are none), through each relay; the first authenticated
/// connection wins. The direct address that won is remembered (first):
/// it is proven to be the peer's.
async fn dial_any(inner: &Arc<Inner>, peer: PeerId, known: &Known) -> Result<quinn::Connection> {
    use futures::FutureExt;
    let delay = if known.addrs.is_empty() {
        Duration::ZERO
    } else {
        RELAY_DIAL_DELAY
    };
    let mut attempts: FuturesUnordered<_> = known
        .addrs
        .iter()
        .map(|&a| dial(inner, peer, a).map(move |r| (r, Some(a))).boxed())
        .collect();
    for &(relay, relay_addr) in &known.relays {
        attempts.push(
            async move {
                tokio::time::sleep(delay).await;
                let r = crate::relay::client::dial_via(inner, relay, relay_addr, peer).await;
                (r, None)
            }
            .boxed(),
        );
    }
    let mut failures = Vec::new();
    while let Some((res, addr)) = attempts.next().await {
        match res {
            Ok(conn) => {
                stats::bump(&inner.counters.connections_outbound);
                if let Some(a) = addr {
                    inner.peers.remember(peer, [a]);
                }
                return Ok(conn);
            }
            Err(e) => failures.push(e),
        }
    }
    stats::bump(&inner.counters.dial_failures);
    // A proven wrong identity, or a peer that cannot meet our key-exchange
    // requirement, is the most useful thing to report.
    if let Some(pos) = failures.iter().position(|e| {
        matches!(
            e,
            Error::PeerIdMismatch { .. } | Error::PostQuantumRequired { .. }
        )
    }) {
        return Err(failures.swap_remove(pos));
    }
    let reasons: Vec<String> = failures.iter().map(|e| e.to_string()).collect();
    Err(Error::Connect {
        peer,
        reason: reasons.join("; "),
    })
}

/// Starts a QUIC handshake with whoever is at `addr` (over a TCP link in
/// TCP mode), accepting only `expected` (any identity when `None`; the
/// returned handshake context tells who answered). Addressing failures go
/// through `fail`.
async fn start_handshake(
    inner: &Arc<Inner>,
    endpoint: &quinn::Endpoint,
    expected: Option<PeerId>,
    addr: SocketAddr,
    fail: impl Fn(String) -> Error,
) -> Result<(quinn::Connecting, Arc<handshake::HandshakeContext>)> {
    let (cfg, seen) = inner.tls.dial_config(expected);
    let quic_addr = inner
        .dial_addr(addr)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let connecting = endpoint
        .connect_with(cfg, quic_addr, tls::SERVER_NAME)
        .map_err(|e| fail(e.to_string()))?;
    Ok((connecting, seen))
}

/// One QUIC handshake with `peer` at `addr` (real or virtual).
pub(crate) async fn dial(
    inner: &Arc<Inner>,
    peer: PeerId,
    addr: SocketAddr,
) -> Result<quinn::Connection> {
    dial_from(inner, &inner.endpoint, peer, addr).await
}

/// One QUIC handshake with `peer` at `addr` from `endpoint` (the node's
/// own, or one on a socket a punch opened).
pub(crate) async fn dial_from(
    inner: &Arc<Inner>,
    endpoint: &quinn::Endpoint,
    peer: PeerId,
    addr: SocketAddr,
) -> Result<quinn::Connection> {
    let fail = |reason: String| Error::Connect {
        peer,
        reason: format!("{addr}: {reason}"),
    };
    let (connecting, seen) = start_handshake(inner, endpoint, Some(peer), addr, fail).await?;
    let result = tokio::time::timeout(transport::CONNECT_TIMEOUT, connecting).await;
    let mismatch = || {
        let actual = seen.seen()?;
        (actual != peer).then_some(Error::PeerIdMismatch {
            expected: peer,
            actual,
            addr,
        })
    };
    match result {
        // The verifier already refused any other key; the certificate the
        // connection carries is checked again so that no path (a resumed
        // session, a verifier without its dial context) can hand back a
        // connection to someone else.
        Ok(Ok(conn)) => match inbound::remote_peer_id(&conn) {
            Some(actual) if actual == peer => Ok(conn),
            actual => {
                conn.close(inbound::codes::MALFORMED.into(), b"wrong identity");
                Err(match actual {
                    Some(actual) => Error::PeerIdMismatch {
                        expected: peer,
                        actual,
                        addr,
                    },
                    None => fail("no identity in the handshake".into()),
                })
            }
        },
        Ok(Err(e))
            if inner.tls.pq() == PostQuantum::Require
                && handshake::refused_our_hello(&e, &seen) =>
        {
            Err(Error::PostQuantumRequired { peer, addr })
        }
        Ok(Err(e)) => Err(mismatch().unwrap_or_else(|| fail(e.to_string()))),
        Err(_) => Err(fail(format!(
            "no handshake within {:?}",
            transport::CONNECT_TIMEOUT
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], 1000 + i))
    }

    fn known_addrs(t: &PeerTable, peer: PeerId) -> Vec<SocketAddr> {
        t.with(|m| m.get(&peer).map(|e| e.addrs.clone()).unwrap_or_default())
    }

    #[test]
    fn the_table_is_bounded_and_forgets_peers_the_application_never_used_first() {
        let t = PeerTable::new(8);
        // A peer the application used, with an address known nowhere else.
        let app_peer = reach_proto::Keypair::generate().peer_id();
        t.remember(app_peer, [addr(0)]);
        t.touch(&app_peer, true);
        // Then many DHT contacts, each used more recently than it.
        for i in 1..=100 {
            t.remember(reach_proto::Keypair::generate().peer_id(), [addr(i)]);
        }
        // Pruned back to 8 idle entries whenever it grows past 8 + 8/8 + 1.
        assert!(t.len() <= 8 + 8 / 8 + 2, "bounded: {} entries", t.len());
        assert!(t.evicted() >= 90);
        assert_eq!(known_addrs(&t, app_peer), vec![addr(0)]);
        // An entry the application used is never forgotten just because a
        // connection of its closed unused; one it never used is.
        assert!(!t.forget_if_unused(&app_peer));
        let dht_peer = reach_proto::Keypair::generate().peer_id();
        t.remember(dht_peer, [addr(200)]);
        assert!(t.forget_if_unused(&dht_peer));
        assert!(known_addrs(&t, dht_peer).is_empty());
    }
}
