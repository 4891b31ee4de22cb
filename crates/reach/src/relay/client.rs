//! The client side of relaying: reserving a slot at a relay, dialing a peer
//! through its relay, and accepting circuits a relay announces.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use reach_proto::PeerId;
use reach_proto::punch::PunchInfo;
use reach_proto::relay::rpc::{RelayRequest, RelayResponse};
use reach_proto::wire::envelope::Body;

use super::RelayRuntime;
use crate::error::{Error, Result};
use crate::node::stats;
use crate::transport;

/// How long after its connection closed an end asks the relay to drop the
/// circuit: the QUIC close must cross the circuit first, or the other end
/// would only notice at its idle timeout.
pub const CIRCUIT_CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Time for one relay request, including dialing the relay if needed.
pub const RELAY_RPC_TIMEOUT: Duration = Duration::from_secs(3);

/// Sends one relay request on `conn` and reads the answer.
pub(crate) async fn rpc(conn: &quinn::Connection, request: RelayRequest) -> Result<RelayResponse> {
    let relay_failed = |reason| Error::Relay { reason };
    match crate::node::rpc::call(conn, Body::RelayRequest(request))
        .await
        .map_err(|e| e.into_error(relay_failed))?
    {
        Body::RelayResponse(r) => Ok(r),
        _ => Err(relay_failed(
            "answered with something other than a relay response".into(),
        )),
    }
}

impl RelayRuntime {
    /// The connection to `relay` (dialing `addr` if needed) and its answer to
    /// `request`, within [`RELAY_RPC_TIMEOUT`].
    async fn ask(
        &self,
        relay: PeerId,
        addr: SocketAddr,
        request: RelayRequest,
    ) -> Result<(quinn::Connection, RelayResponse)> {
        let go = async {
            let conn = self.peers.connection_known(relay, &[addr]).await?;
            let answer = rpc(&conn, request).await?;
            Ok((conn, answer))
        };
        tokio::time::timeout(RELAY_RPC_TIMEOUT, go)
            .await
            .map_err(|_| Error::Timeout("relay request"))?
    }

    /// Reserves (or renews) a slot at `relay`. Returns the connection that
    /// carries the reservation and its lifetime.
    pub(crate) async fn reserve(
        &self,
        relay: PeerId,
        addr: SocketAddr,
    ) -> Result<(quinn::Connection, Duration)> {
        let punch = self
            .punch()
            .map_or_else(PunchInfo::unknown, |p| p.local_info());
        match self
            .ask(relay, addr, RelayRequest::Reserve { punch })
            .await?
        {
            (conn, RelayResponse::Reserved { ttl_s }) => {
                // Circuits arrive on this connection: keep it open.
                self.peers.touch(&relay, true);
                Ok((conn, Duration::from_secs(u64::from(ttl_s))))
            }
            (_, RelayResponse::Refused { reason }) => Err(Error::RelayRefused { relay, reason }),
            _ => Err(Error::Relay {
                reason: format!("{relay} answered a reservation with something else"),
            }),
        }
    }

    /// Dials `target` through `relay`: asks the relay for a circuit, then runs
    /// an ordinary QUIC handshake with `target` over it.
    ///
    /// Boxed with a named type: dialing a relay may itself dial (the relay), and
    /// that recursion needs a concrete future type.
    pub(crate) fn dial_via(
        &self,
        relay: PeerId,
        relay_addr: SocketAddr,
        target: PeerId,
    ) -> BoxFuture<'_, Result<quinn::Connection>> {
        Box::pin(async move {
            stats::bump(&self.counters.relayed_dials);
            let res = self.dial_via_inner(relay, relay_addr, target).await;
            if res.is_err() {
                stats::bump(&self.counters.relayed_dial_failures);
            }
            res
        })
    }

    async fn dial_via_inner(
        &self,
        relay: PeerId,
        relay_addr: SocketAddr,
        target: PeerId,
    ) -> Result<quinn::Connection> {
        if relay == self.core.peer_id || relay == target {
            return Err(Error::Relay {
                reason: "a peer cannot be its own relay".into(),
            });
        }
        let (conn, answer) = self
            .ask(relay, relay_addr, RelayRequest::Connect { target })
            .await?;
        let circuit = match answer {
            RelayResponse::Circuit { circuit } => circuit,
            RelayResponse::Refused { reason } => return Err(Error::RelayRefused { relay, reason }),
            _ => {
                return Err(Error::Relay {
                    reason: format!("{relay} answered a circuit request with something else"),
                });
            }
        };
        let virt = self
            .paths
            .add_virtual(relay, conn.remote_address(), circuit)
            .ok_or_else(|| Error::Relay {
                reason: "too many relayed paths".into(),
            })?;
        // Forgets the path unless a connection came of it, also when this
        // dial is dropped because another attempt of a race won.
        let guard = ForgetUnlessUsed {
            paths: self.paths.clone(),
            addr: virt,
            keep: false,
        };
        let conn = self.peers.dial(target, virt).await?;
        self.paths.mark_used(&virt);
        let mut guard = guard;
        guard.keep = true;
        Ok(conn)
    }
}

/// Forgets a virtual address on drop unless told to keep it.
struct ForgetUnlessUsed {
    paths: Arc<crate::relay::paths::RelayPaths>,
    addr: SocketAddr,
    keep: bool,
}

impl Drop for ForgetUnlessUsed {
    fn drop(&mut self) {
        if !self.keep {
            self.paths.forget_virtual(&self.addr);
        }
    }
}

impl RelayRuntime {
    /// Ties a relayed connection to the connection with its relay (called for
    /// every registered connection over a virtual address): when the relay
    /// connection closes, the circuit is gone and the relayed connection is
    /// closed at once (rather than after the idle timeout), so the next send
    /// redials by key; when the relayed connection closes, its virtual address
    /// is forgotten.
    pub(crate) fn watch_virtual(&self, conn: quinn::Connection) {
        let paths = self.paths.clone();
        paths.mark_used(&conn.remote_address());
        let relay_conn = paths
            .path(&conn.remote_address())
            .and_then(|p| self.peers.live(&p.relay).map(|c| (p.relay, c)));
        if let Some((relay, _)) = &relay_conn {
            // The relay forgets our circuits when this connection closes: keep
            // it open as long as we use it.
            self.peers.touch(relay, true);
        }
        let circuit = paths.path(&conn.remote_address()).map(|p| p.circuit);
        self.core.spawn(async move {
            match relay_conn {
                Some((_, rc)) => {
                    tokio::select! {
                        _ = conn.closed() => {
                            // Tell the relay the circuit is done (best effort),
                            // once our CONNECTION_CLOSE has had time to cross it.
                            if let Some(circuit) = circuit {
                                tokio::time::sleep(CIRCUIT_CLOSE_GRACE).await;
                                let close = rpc(&rc, RelayRequest::CloseCircuit { circuit });
                                let _ = tokio::time::timeout(RELAY_RPC_TIMEOUT, close).await;
                            }
                        }
                        _ = rc.closed() => conn.close(0u32.into(), b"relay lost"),
                    }
                }
                None => {
                    conn.closed().await;
                }
            }
            paths.forget_virtual(&conn.remote_address());
        });
    }

    /// A relay announced circuit `circuit` from `from`: accept it if we hold a
    /// reservation at that relay, so the handshake that follows reaches us.
    pub(crate) fn accept_incoming(
        &self,
        relay: PeerId,
        relay_addr: SocketAddr,
        from: PeerId,
        circuit: u64,
    ) -> RelayResponse {
        if self.held().is_none_or(|(r, _)| r != relay) {
            return RelayResponse::Refused {
                reason: reach_proto::relay::rpc::refusal::NOT_RESERVED.into(),
            };
        }
        let Some(virt) = self.paths.add_virtual(relay, relay_addr, circuit) else {
            return RelayResponse::Refused {
                reason: reach_proto::relay::rpc::refusal::TOO_MANY_CIRCUITS.into(),
            };
        };
        tracing::debug!(%from, %relay, circuit, "accepted a relayed circuit");
        // If no handshake comes over it in time, the path is dropped again;
        // once a connection uses it, it lives as long as that connection.
        let paths = self.paths.clone();
        self.core.spawn(async move {
            tokio::time::sleep(transport::CONNECT_TIMEOUT).await;
            if paths.path(&virt).is_some_and(|p| !p.used) {
                paths.forget_virtual(&virt);
            }
        });
        RelayResponse::Accepted
    }
}
