//! Serving relay requests: reservations and circuits (as a relay), and
//! incoming circuits (as a client of a relay).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use reach_proto::PeerId;
use reach_proto::relay::rpc::{RelayRequest, RelayResponse, refusal};
use reach_proto::wire::envelope::Body;

use super::{RelayRuntime, client};
use crate::node::router::{self, Handler, Inbound};
use crate::node::stats;

/// How long a relay waits for the target to accept a circuit. Shorter than
/// the requester's whole budget ([`client::RELAY_RPC_TIMEOUT`], which also
/// covers reaching the relay), so the requester hears a typed
/// `target_unreachable` instead of timing out itself.
pub const INCOMING_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a relay drops idle circuits and expired reservations.
pub const EXPIRY_TICK: Duration = Duration::from_secs(10);

fn refuse(reason: &str) -> RelayResponse {
    RelayResponse::Refused {
        reason: reason.to_string(),
    }
}

impl RelayRuntime {
    /// Answers one relay request from `peer`, whose packets come from
    /// `remote`.
    pub(crate) async fn serve(
        &self,
        peer: PeerId,
        remote: SocketAddr,
        request: RelayRequest,
        mut send: quinn::SendStream,
    ) {
        // Punching rides on relay signalling; without it (the node is
        // going away) its requests are unwanted.
        let unwanted = || refuse(refusal::PUNCH_UNWANTED);
        let response = match request {
            RelayRequest::Reserve { punch } => {
                let answer = self.reserve_here(peer, remote);
                if matches!(answer, RelayResponse::Reserved { .. })
                    && let Some(p) = self.punch()
                {
                    p.reserved(peer, punch);
                }
                answer
            }
            RelayRequest::Connect { target } => self.connect(peer, remote, target).await,
            RelayRequest::Incoming { from, circuit } => {
                self.accept_incoming(peer, remote, from, circuit)
            }
            RelayRequest::Release => {
                self.paths.release(&peer);
                if let Some(p) = self.punch() {
                    p.released(&peer);
                }
                RelayResponse::Accepted
            }
            RelayRequest::Punch {
                target,
                attempt,
                info,
            } => match self.punch() {
                Some(p) => p.coordinate(peer, remote, target, attempt, info).await,
                None => unwanted(),
            },
            RelayRequest::Introduce(intro) => match self.punch() {
                Some(p) => p.introduced(peer, intro),
                None => unwanted(),
            },
            RelayRequest::CloseCircuit { circuit } => {
                if self.paths.close_circuit(circuit, &peer) {
                    RelayResponse::Accepted
                } else {
                    refuse(refusal::NO_SUCH_CIRCUIT)
                }
            }
        };
        crate::node::rpc::answer(&mut send, Body::RelayResponse(response)).await;
    }

    /// A reservation request, as a relay.
    fn reserve_here(&self, peer: PeerId, remote: SocketAddr) -> RelayResponse {
        let c = &self.counters;
        if !self.is_serving() || self.paths.path(&remote).is_some() {
            stats::bump(&c.reservations_refused);
            return refuse(refusal::NOT_A_RELAY);
        }
        match self.paths.reserve(peer) {
            Ok(ttl) => {
                stats::bump(&c.reservations_granted);
                // The client's connection carries its circuits: keep it open.
                self.peers.touch(&peer, true);
                RelayResponse::Reserved {
                    ttl_s: ttl.as_secs().min(u64::from(u32::MAX)) as u32,
                }
            }
            Err(e) => {
                stats::bump(&c.reservations_refused);
                refuse(e.kind())
            }
        }
    }

    async fn connect(&self, peer: PeerId, remote: SocketAddr, target: PeerId) -> RelayResponse {
        let c = &self.counters;
        let refused = |reason: &str| {
            stats::bump(&c.circuits_refused);
            refuse(reason)
        };
        if !self.is_serving() {
            return refused(refusal::NOT_A_RELAY);
        }
        // No circuits over circuits: an end reached through another relay has
        // no address to forward to.
        if self.paths.path(&remote).is_some() {
            return refused(refusal::NOT_A_RELAY);
        }
        if !self.paths.has_reservation(&target) {
            return refused(refusal::NO_RESERVATION);
        }
        if self.paths.circuits_full() {
            return refused(refusal::TOO_MANY_CIRCUITS);
        }
        let Some(target_conn) = self.peers.live(&target) else {
            return refused(refusal::TARGET_UNREACHABLE);
        };
        let Ok(circuit) = crate::util::random_u64() else {
            return refused(refusal::TOO_MANY_CIRCUITS);
        };
        let ask = RelayRequest::Incoming {
            from: peer,
            circuit,
        };
        let answer = tokio::time::timeout(INCOMING_TIMEOUT, client::rpc(&target_conn, ask)).await;
        if answer.is_err() {
            // A client that does not answer a one-line request for this long
            // is not reachable on this connection (it may have replaced it
            // and lost the close): close it, so the client's next request,
            // or its reservation's health check, starts on a fresh one
            // instead of every requester timing out on the dead one.
            tracing::debug!(%target, "target did not answer a circuit request; closing its connection");
            target_conn.close(0u32.into(), b"unanswered circuit request");
        }
        if !matches!(answer, Ok(Ok(RelayResponse::Accepted))) {
            return refused(refusal::TARGET_UNREACHABLE);
        }
        let target_addr = target_conn.remote_address();
        if !self
            .paths
            .open_circuit(circuit, (peer, remote), (target, target_addr))
        {
            return refused(refusal::TOO_MANY_CIRCUITS);
        }
        stats::bump(&c.circuits_opened);
        tracing::debug!(from = %peer, to = %target, circuit, "circuit opened");
        RelayResponse::Circuit { circuit }
    }

    /// Drops idle circuits and expired reservations until the node stops.
    pub(crate) async fn expire_loop(self: Arc<Self>) {
        let idle = self.limits.idle_expiry;
        loop {
            tokio::time::sleep(EXPIRY_TICK).await;
            self.paths.expire(idle);
        }
    }

    /// How the relay serves its signalling protocol
    /// ([`reach_proto::wire::envelope::protocols::RELAY`]): one request per
    /// stream, answered on it. Holds the relay weakly: the router is the
    /// node's, and the node holds the relay.
    pub(crate) fn stream_handler(self: &Arc<Self>) -> Handler {
        router::weak_handler(self, |relay: Arc<Self>, s: Inbound| async move {
            if let Body::RelayRequest(req) = s.head.body {
                relay.serve(s.peer, s.remote, req, s.send).await
            }
        })
    }
}
