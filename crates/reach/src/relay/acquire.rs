//! Finding out whether this node is reachable, and if not, getting and
//! keeping a relay: the runtime driver of reach-proto's
//! [`RelayAcquisition`] state machine.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use reach_proto::dht::{K, Key};
use reach_proto::relay::acquire::{Action, Event, RelayAcquisition};

use super::{Reachability, RelayMode, RelayRuntime};
use crate::dht::DhtMode;
use crate::node::stats;
use crate::vaddr::is_virtual;

/// Relay candidates tried per acquisition round at most: the K DHT-closest
/// contacts and a dozen connected peers. Trying only the closest few left a
/// node none of whose eight closest contacts was a live relay without one
/// for a whole backoff (30 s) after its relay died, though relays were in
/// its routing table (found by `reach lab rooms`). A contact that is no
/// relay refuses at once; one that does not answer costs at most the relay
/// RPC timeout.
pub const MAX_CANDIDATES: usize = K + 12;
/// A health poll (a reservation renewal) must answer within this.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// Health polls that must fail in a row before the relay counts as lost
/// (a closed connection counts at once): one slow answer on a loaded
/// machine is not a dead relay.
pub const HEALTH_FAILURES: u32 = 2;
/// How often an unknown reachability is checked again (no helper yet).
pub const RECHECK_UNKNOWN: Duration = Duration::from_secs(5);
/// How long reachability waits for port mapping to find out whether the
/// router maps the node's port (a gateway on the LAN answers in
/// milliseconds; the outside check takes a round trip to a helper).
pub const PORTMAP_SETTLE: Duration = Duration::from_secs(5);
/// How often the driver looks at the routing table (a change cuts a
/// backoff short).
pub const ROUTING_WATCH: Duration = Duration::from_secs(1);

impl RelayRuntime {
    /// Runs for the node's lifetime: checks reachability after joining,
    /// turns the relay service on for a public node (mode `auto`), and
    /// acquires and keeps a relay for a node that needs one. A verified
    /// port mapping makes the node public without a check; a relay held
    /// meanwhile is given up once one is verified, and the check runs again
    /// when a mapping goes.
    pub(crate) async fn drive(self: Arc<Self>) {
        let mut joined = self.dht.joined.subscribe();
        if joined.wait_for(|j| *j).await.is_err() {
            return;
        }
        let mut mapping = self.portmap.watch();
        loop {
            let mapped = self.portmap.settled(PORTMAP_SETTLE).await;
            let reach = self.decide_reachability(mapped).await;
            if let Reachability::Public(_) = reach {
                if self.service == RelayMode::Auto {
                    self.serving
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                // Republish with the now verified address.
                self.publish().await;
            }
            let wants_relay = match self.acquire {
                RelayMode::On => true,
                RelayMode::Off => false,
                RelayMode::Auto => reach == Reachability::Private,
            };
            if wants_relay && self.dht.mode == DhtMode::Server {
                if self.acquire == RelayMode::On {
                    self.hold_relay().await;
                    return;
                }
                tokio::select! {
                    _ = self.hold_relay() => return,
                    r = mapping.wait_for(|s| s.published.is_some()) => {
                        if r.is_err() {
                            return;
                        }
                    }
                }
                tracing::info!("port mapping verified: the relay is no longer needed");
                self.set_held(None);
                continue;
            }
            if mapped.is_none() {
                return;
            }
            // Public through the mapping: if it goes, decide again.
            if mapping.wait_for(|s| s.published.is_none()).await.is_err() {
                return;
            }
        }
    }

    /// Whether unsolicited packets reach us: through a verified port
    /// mapping, not at all (UDP blocked), or as the check finds out.
    async fn decide_reachability(&self, mapped: Option<SocketAddr>) -> Reachability {
        let needs_check = self.service == RelayMode::Auto || self.acquire == RelayMode::Auto;
        let reach = if let Some(addr) = mapped {
            Reachability::Public(addr)
        } else if self.core.tcp_mode() {
            // UDP is blocked: nobody can reach us but through a relay.
            Reachability::Private
        } else if needs_check {
            loop {
                let reach = self.nat.check_reachability().await;
                if reach != Reachability::Unknown {
                    tracing::info!(?reach, "reachability checked");
                    break reach;
                }
                tokio::time::sleep(RECHECK_UNKNOWN).await;
            }
        } else {
            return Reachability::Unknown;
        };
        self.set_reachability(reach);
        reach
    }

    /// The acquisition loop: carries out the machine's actions in order and
    /// feeds it what happens.
    async fn hold_relay(&self) {
        let mut m = RelayAcquisition::new();
        let now = || self.dht.now();
        let mut relay_conn: Option<quinn::Connection> = None;
        // The relay just lost is not retried at once; a relay chosen from
        // outside our K closest is not dropped for being outside them.
        let mut lost: Option<reach_proto::PeerId> = None;
        // When the held relay was lost, for the failover histogram.
        let mut lost_at: Option<std::time::Instant> = None;
        let mut was_close = false;
        let mut failed_polls = 0u32;
        let mut routing_size = self.dht.routing().len();
        loop {
            while let Some(action) = m.poll_action() {
                match action {
                    Action::Publish { relay } => {
                        self.set_held(relay);
                        self.publish().await;
                    }
                    Action::Acquire => match self.acquire_one(lost.take()).await {
                        Some((relay, addr, conn)) => {
                            was_close = self.among_closest(relay);
                            stats::bump(&self.counters.acquisitions);
                            if let Some(t) = lost_at.take() {
                                self.failover_seconds.observe_since(t);
                            }
                            tracing::info!(%relay, %addr, "holding a relay");
                            relay_conn = Some(conn);
                            m.handle(Event::Reserved { relay, addr }, now());
                        }
                        None => {
                            stats::bump(&self.counters.acquisition_failures);
                            m.handle(Event::ReservationFailed, now());
                        }
                    },
                    Action::CheckHealth { relay } => {
                        let alive = match self.held() {
                            Some((r, addr)) if r == relay => {
                                tokio::time::timeout(HEALTH_TIMEOUT, self.reserve(relay, addr))
                                    .await
                                    .is_ok_and(|r| r.is_ok())
                            }
                            _ => false,
                        };
                        failed_polls = if alive { 0 } else { failed_polls + 1 };
                        if failed_polls >= HEALTH_FAILURES {
                            failed_polls = 0;
                            lost = Some(relay);
                            lost_at = Some(std::time::Instant::now());
                            self.relay_lost(&mut m, &mut relay_conn);
                        } else if alive && was_close && !self.among_closest(relay) {
                            // Still alive, but no longer one of our K closest:
                            // hand over to a closer one (publishing direct-only
                            // first, as on a loss).
                            m.handle(Event::RelayLeftClosest, now());
                            relay_conn = None;
                        }
                    }
                }
            }
            let wait = m
                .poll_timeout()
                .map(|t| t.saturating_sub(now()))
                .unwrap_or(ROUTING_WATCH)
                .min(ROUTING_WATCH);
            let closed = async {
                match &relay_conn {
                    Some(c) => {
                        c.closed().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {
                    m.handle_timeout(now());
                    let size = self.dht.routing().len();
                    if size != routing_size {
                        routing_size = size;
                        m.handle(Event::RoutingChanged, now());
                    }
                }
                _ = closed => {
                    lost = self.held().map(|(r, _)| r);
                    lost_at = Some(std::time::Instant::now());
                    self.relay_lost(&mut m, &mut relay_conn);
                }
            }
        }
    }

    fn relay_lost(&self, m: &mut RelayAcquisition, relay_conn: &mut Option<quinn::Connection>) {
        stats::bump(&self.counters.relay_losses);
        tracing::info!(relay = ?self.held(), "relay lost");
        // Closing it (if a health poll found it dead) also closes the
        // connections relayed through it, so their peers redial.
        if let Some(c) = relay_conn.take() {
            c.close(0u32.into(), b"relay lost");
        }
        m.handle(Event::RelayLost, self.dht.now());
    }

    /// Whether `relay` is among our K closest contacts, or we know fewer
    /// than K (then every contact is "close").
    fn among_closest(&self, relay: reach_proto::PeerId) -> bool {
        let table = self.dht.routing();
        let own = Key::for_peer(&self.core.peer_id);
        let closest = table.closest(&own, K);
        closest.len() < K || closest.iter().any(|c| c.peer == relay)
    }

    /// Tries candidates, DHT-closest first, until one grants a reservation.
    async fn acquire_one(
        &self,
        exclude: Option<reach_proto::PeerId>,
    ) -> Option<(reach_proto::PeerId, SocketAddr, quinn::Connection)> {
        let own = Key::for_peer(&self.core.peer_id);
        let mut candidates: Vec<(reach_proto::PeerId, SocketAddr)> = self
            .dht
            .routing()
            .closest(&own, K)
            .into_iter()
            .map(|c| (c.peer, c.addr))
            .collect();
        // Connected peers we already know are alive come next.
        for p in self.peers.connected() {
            if !candidates.iter().any(|(id, _)| *id == p.peer) {
                candidates.push((p.peer, p.addr));
            }
        }
        candidates.retain(|(id, a)| !is_virtual(a) && Some(*id) != exclude);
        for (relay, addr) in candidates.into_iter().take(MAX_CANDIDATES) {
            match self.reserve(relay, addr).await {
                Ok((conn, _ttl)) => {
                    // Published for others: the relay's real address, also
                    // when we reach it over a TCP link.
                    let remote = conn.remote_address();
                    let public = self.core.links.dialed_remote(&remote).unwrap_or(remote);
                    return Some((relay, public, conn));
                }
                Err(e) => tracing::debug!(%relay, error = %e, "relay candidate refused"),
            }
        }
        None
    }
}
