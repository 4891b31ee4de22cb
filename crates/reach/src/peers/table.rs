//! The table of known peers: their addresses, their relays and their live
//! connection (and a relayed standby behind a punched one), bounded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use reach_proto::PeerId;
use tokio::sync::Mutex as AsyncMutex;

use crate::node::{Direction, PeerInfo, limits};
use crate::vaddr::is_virtual;
use reach_proto::dht::record::{AddrKind, TypedAddr};

/// Addresses remembered per peer; the oldest are forgotten first.
pub const MAX_ADDRS_PER_PEER: usize = 8;
/// Relays remembered per peer.
pub const MAX_RELAYS_PER_PEER: usize = 4;

/// Where a peer may be dialed.
#[derive(Debug, Clone, Default)]
pub(super) struct Known {
    pub addrs: Vec<SocketAddr>,
    pub relays: Vec<(PeerId, SocketAddr)>,
}

impl Known {
    /// What `peer`'s endpoint record offers: its addresses (LAN ones first)
    /// and its relays (never the peer itself, never a virtual address).
    pub fn from_record(peer: PeerId, typed: &[TypedAddr]) -> Self {
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

    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty() && self.relays.is_empty()
    }
}

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
    /// Uses that keep the connection open while they last without pinning
    /// it for good ([`PeerTable::hold`]: topic federation links): while
    /// any is held the connection is not closed as idle; after the last
    /// is released it is closed like one the DHT used, once idle.
    holds: u32,
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
    /// Idle entries kept at most (see [`limits::MAX_IDLE_PEERS`]).
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
        PeerTable::new(limits::MAX_IDLE_PEERS)
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

    pub(super) fn addrs_and_lock(&self, peer: PeerId) -> (Known, Arc<AsyncMutex<()>>) {
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

    /// A use of the connection to `peer` that lasts until
    /// [`PeerTable::release`]: it stays open meanwhile (unlike a DHT use)
    /// without being pinned open for good (unlike an application's).
    pub fn hold(&self, peer: &PeerId) {
        let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let t = &mut *guard;
        t.clock += 1;
        if let Some(e) = t.map.get_mut(peer) {
            e.holds = e.holds.saturating_add(1);
            e.last_used = Some(Instant::now());
            e.recency = t.clock;
        }
    }

    /// Ends a [`PeerTable::hold`]: the connection's idle time starts now.
    pub fn release(&self, peer: &PeerId) {
        let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = guard.map.get_mut(peer) {
            e.holds = e.holds.saturating_sub(1);
            e.last_used = Some(Instant::now());
        }
    }

    /// Connections that only the DHT used and that have been idle for
    /// `idle`.
    pub fn idle_dht_connections(&self, idle: Duration) -> Vec<quinn::Connection> {
        self.with(|m| {
            m.values()
                .filter(|e| {
                    !e.app_used && e.holds == 0 && e.last_used.is_some_and(|t| t.elapsed() >= idle)
                })
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
