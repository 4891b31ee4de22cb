//! Dialing a peer by its key: known addresses first, then its endpoint
//! record (found through [`super::Resolve`], which the DHT implements) and
//! the relays it names.
//!
//! One connection per peer is kept and reused. Dials to one peer are
//! serialised by a per-peer lock, so concurrent `send`s to a peer that is not
//! connected yet share one handshake instead of racing several.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use reach_proto::PeerId;

use super::table::Known;
use super::{Peers, serve};
use crate::error::{Error, Result};
use crate::handshake::{self, PostQuantum};
use crate::node::{Direction, codes, stats};
use crate::{tls, transport};

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

impl Peers {
    /// The live connection to `peer`, dialing its known addresses if needed,
    /// and resolving its endpoint record through the DHT when none is known or
    /// none works.
    pub(crate) async fn connection(self: &Arc<Self>, peer: PeerId) -> Result<quinn::Connection> {
        self.connection_via(peer, &[]).await
    }

    /// Like [`connection`], also trying `hint` (addresses the user gave for
    /// this call). A hint is remembered only if it produced the authenticated
    /// connection (see [`dial_any`]): an address that failed once is not tried
    /// again by later calls that did not give it.
    pub(crate) async fn connection_via(
        self: &Arc<Self>,
        peer: PeerId,
        hint: &[SocketAddr],
    ) -> Result<quinn::Connection> {
        let conn = self.connect_with(peer, hint, true).await?;
        self.table.touch(&peer, true);
        Ok(conn)
    }

    /// Like [`connection`] without pinning the connection open: the caller
    /// keeps it open with [`PeerTable::hold`](super::PeerTable::hold) for
    /// as long as it uses it (a topic federation link), after which it is
    /// closed once idle like a connection the DHT used.
    pub(crate) async fn connection_unpinned(
        self: &Arc<Self>,
        peer: PeerId,
    ) -> Result<quinn::Connection> {
        let conn = self.connect_with(peer, &[], true).await?;
        self.table.touch(&peer, false);
        Ok(conn)
    }

    /// Like [`connection`] but never consults the DHT (the DHT itself uses this,
    /// so a lookup cannot recurse into more lookups). `hint` addresses are tried
    /// along with the known ones.
    pub(crate) async fn connection_known(
        self: &Arc<Self>,
        peer: PeerId,
        hint: &[SocketAddr],
    ) -> Result<quinn::Connection> {
        let conn = self.connect_with(peer, hint, false).await?;
        self.table.touch(&peer, false);
        Ok(conn)
    }

    async fn connect_with(
        self: &Arc<Self>,
        peer: PeerId,
        hint: &[SocketAddr],
        resolve: bool,
    ) -> Result<quinn::Connection> {
        if self.core.is_shut_down() {
            return Err(Error::Shutdown);
        }
        if peer == self.core.peer_id {
            return Err(Error::Connect {
                peer,
                reason: "that is this node's own id".into(),
            });
        }
        if let Some(c) = self.table.live(&peer) {
            return Ok(c);
        }
        let (_, lock) = self.table.addrs_and_lock(peer);
        // DHT requests (resolve = false) never wait for a dial in progress: a
        // lookup run by that very dial may be querying this peer.
        let _dialing = if resolve {
            Some(lock.lock().await)
        } else {
            lock.try_lock().ok()
        };
        // Someone else may have connected while we waited for the lock.
        if let Some(c) = self.table.live(&peer) {
            return Ok(c);
        }
        let (mut known, _) = self.table.addrs_and_lock(peer);
        for h in hint {
            if !known.addrs.contains(h) {
                known.addrs.push(*h);
            }
        }
        let conn = if !resolve {
            if known.is_empty() {
                return Err(Error::NoAddress(peer));
            }
            self.dial_any(peer, &known).await?
        } else {
            let start = std::time::Instant::now();
            let conn = self.dial_or_resolve(peer, known).await?;
            self.connect_seconds.observe_since(start);
            conn
        };
        self.register(peer, conn.clone(), Direction::Outbound);
        Ok(conn)
    }

    /// Dials the known addresses and, if that has not worked within
    /// [`RESOLVE_AFTER`] (at once when nothing is known), also resolves the
    /// peer's endpoint record and dials what is new in it. The first
    /// authenticated connection wins.
    ///
    /// Boxed with a named type: resolving runs DHT requests, which dial.
    fn dial_or_resolve(
        self: &Arc<Self>,
        peer: PeerId,
        known: Known,
    ) -> futures::future::BoxFuture<'_, Result<quinn::Connection>> {
        Box::pin(self.dial_or_resolve_inner(peer, known))
    }

    async fn dial_or_resolve_inner(
        self: &Arc<Self>,
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
                self.dial_any(peer, &known).await
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
                let found = self.resolve(peer, fresh).await;
                let typed = match found {
                    Ok(typed) => typed,
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
                self.table.remember_typed(peer, &typed);
                let mut new = Known::from_record(peer, &typed);
                new.addrs.retain(|a| !tried.addrs.contains(a));
                new.relays.retain(|r| !tried.relays.contains(r));
                if new.is_empty() {
                    continue;
                }
                tried.addrs.extend(&new.addrs);
                tried.relays.extend(&new.relays);
                match self.dial_any(peer, &new).await {
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
    pub(crate) async fn dial_unknown(self: &Arc<Self>, addr: SocketAddr) -> Result<PeerId> {
        let fail = |reason: String| Error::Config(format!("bootstrap {addr}: {reason}"));
        let (connecting, _) = self
            .start_handshake(&self.core.endpoint, None, addr, fail)
            .await?;
        let conn = tokio::time::timeout(transport::CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| Error::Timeout("bootstrap handshake"))?
            .map_err(|e| fail(e.to_string()))?;
        let Some(peer) = serve::remote_peer_id(&conn) else {
            conn.close(codes::MALFORMED.into(), b"no identity");
            return Err(fail("no identity in the handshake".into()));
        };
        if peer == self.core.peer_id {
            conn.close(0u32.into(), b"self");
            return Err(fail("that address is this node itself".into()));
        }
        stats::bump(&self.core.counters.connections_outbound);
        self.table.remember(peer, [addr]);
        self.register(peer, conn, Direction::Outbound);
        Ok(peer)
    }

    /// Opens a unidirectional stream to `peer`, redialing once if the recorded
    /// connection turns out to be dead (nothing has been sent on it yet, so the
    /// retry cannot duplicate a message). Also returns the connection.
    pub(crate) async fn open_uni(
        self: &Arc<Self>,
        peer: PeerId,
    ) -> Result<(quinn::SendStream, quinn::Connection)> {
        let conn = self.connection(peer).await?;
        match conn.open_uni().await {
            Ok(s) => Ok((s, conn)),
            Err(_) => {
                self.table.remove_if_current(peer, conn.stable_id());
                let conn = self.connection(peer).await?;
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
    async fn dial_any(self: &Arc<Self>, peer: PeerId, known: &Known) -> Result<quinn::Connection> {
        use futures::FutureExt;
        let delay = if known.addrs.is_empty() {
            Duration::ZERO
        } else {
            RELAY_DIAL_DELAY
        };
        let mut attempts: FuturesUnordered<_> = known
            .addrs
            .iter()
            .map(|&a| self.dial(peer, a).map(move |r| (r, Some(a))).boxed())
            .collect();
        for &(relay, relay_addr) in &known.relays {
            attempts.push(
                async move {
                    tokio::time::sleep(delay).await;
                    let r = self.dial_via(relay, relay_addr, peer).await;
                    (r, None)
                }
                .boxed(),
            );
        }
        let mut failures = Vec::new();
        while let Some((res, addr)) = attempts.next().await {
            match res {
                Ok(conn) => {
                    stats::bump(&self.core.counters.connections_outbound);
                    if let Some(a) = addr {
                        self.table.remember(peer, [a]);
                    }
                    return Ok(conn);
                }
                Err(e) => failures.push(e),
            }
        }
        stats::bump(&self.core.counters.dial_failures);
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
        self: &Arc<Self>,
        endpoint: &quinn::Endpoint,
        expected: Option<PeerId>,
        addr: SocketAddr,
        fail: impl Fn(String) -> Error,
    ) -> Result<(quinn::Connecting, Arc<handshake::HandshakeContext>)> {
        let (cfg, seen) = self.core.tls.dial_config(expected);
        let quic_addr = self
            .core
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
        self: &Arc<Self>,
        peer: PeerId,
        addr: SocketAddr,
    ) -> Result<quinn::Connection> {
        self.dial_from(&self.core.endpoint, peer, addr).await
    }

    /// One QUIC handshake with `peer` at `addr` from `endpoint` (the node's
    /// own, or one on a socket a punch opened).
    pub(crate) async fn dial_from(
        self: &Arc<Self>,
        endpoint: &quinn::Endpoint,
        peer: PeerId,
        addr: SocketAddr,
    ) -> Result<quinn::Connection> {
        let fail = |reason: String| Error::Connect {
            peer,
            reason: format!("{addr}: {reason}"),
        };
        let (connecting, seen) = self
            .start_handshake(endpoint, Some(peer), addr, fail)
            .await?;
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
            Ok(Ok(conn)) => match serve::remote_peer_id(&conn) {
                Some(actual) if actual == peer => Ok(conn),
                actual => {
                    conn.close(codes::MALFORMED.into(), b"wrong identity");
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
                if self.core.tls.pq() == PostQuantum::Require
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
}
