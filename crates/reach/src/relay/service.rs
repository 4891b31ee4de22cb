//! Serving relay requests: reservations and circuits (as a relay), and
//! incoming circuits (as a client of a relay).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use reach_proto::PeerId;
use reach_proto::relay::rpc::{RelayRequest, RelayResponse, refusal};
use reach_proto::wire::envelope::Body;

use super::client;
use crate::node::{Inner, stats};

/// How long a relay waits for the target to accept a circuit.
pub const INCOMING_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a relay drops idle circuits and expired reservations.
pub const EXPIRY_TICK: Duration = Duration::from_secs(10);

fn refuse(reason: &str) -> RelayResponse {
    RelayResponse::Refused {
        reason: reason.to_string(),
    }
}

/// Answers one relay request from `peer`, whose packets come from `remote`.
pub(crate) async fn serve(
    inner: Arc<Inner>,
    peer: PeerId,
    remote: SocketAddr,
    request: RelayRequest,
    mut send: quinn::SendStream,
) {
    let response = match request {
        RelayRequest::Reserve { punch } => {
            let answer = reserve(&inner, peer, remote);
            if matches!(answer, RelayResponse::Reserved { .. }) {
                let max = inner.relay.limits.max_clients;
                let paths = &inner.relay.paths;
                inner
                    .punch
                    .remember_info(peer, punch, max, |p| paths.has_reservation(p));
            }
            answer
        }
        RelayRequest::Connect { target } => connect(&inner, peer, remote, target).await,
        RelayRequest::Incoming { from, circuit } => {
            client::accept_incoming(&inner, peer, remote, from, circuit)
        }
        RelayRequest::Release => {
            inner.relay.paths.release(&peer);
            inner.punch.forget_info(&peer);
            RelayResponse::Accepted
        }
        RelayRequest::Punch {
            target,
            attempt,
            info,
        } => crate::punch::coordinate(&inner, peer, remote, target, attempt, info).await,
        RelayRequest::Introduce(intro) => crate::punch::on_introduce(&inner, peer, intro),
        RelayRequest::CloseCircuit { circuit } => {
            if inner.relay.paths.close_circuit(circuit, &peer) {
                RelayResponse::Accepted
            } else {
                refuse(refusal::NO_SUCH_CIRCUIT)
            }
        }
    };
    crate::node::rpc::answer(&mut send, Body::RelayResponse(response)).await;
}

fn reserve(inner: &Inner, peer: PeerId, remote: SocketAddr) -> RelayResponse {
    let c = &inner.relay.counters;
    if !inner.relay.is_serving() || inner.relay.paths.path(&remote).is_some() {
        stats::bump(&c.reservations_refused);
        return refuse(refusal::NOT_A_RELAY);
    }
    match inner.relay.paths.reserve(peer) {
        Ok(ttl) => {
            stats::bump(&c.reservations_granted);
            // The client's connection carries its circuits: keep it open.
            inner.peers.touch(&peer, true);
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

async fn connect(
    inner: &Arc<Inner>,
    peer: PeerId,
    remote: SocketAddr,
    target: PeerId,
) -> RelayResponse {
    let c = &inner.relay.counters;
    let refused = |reason: &str| {
        stats::bump(&c.circuits_refused);
        refuse(reason)
    };
    if !inner.relay.is_serving() {
        return refused(refusal::NOT_A_RELAY);
    }
    // No circuits over circuits: an end reached through another relay has
    // no address to forward to.
    if inner.relay.paths.path(&remote).is_some() {
        return refused(refusal::NOT_A_RELAY);
    }
    if !inner.relay.paths.has_reservation(&target) {
        return refused(refusal::NO_RESERVATION);
    }
    if inner.relay.paths.circuits_full() {
        return refused(refusal::TOO_MANY_CIRCUITS);
    }
    let Some(target_conn) = inner.peers.live(&target) else {
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
    if !matches!(answer, Ok(Ok(RelayResponse::Accepted))) {
        return refused(refusal::TARGET_UNREACHABLE);
    }
    let target_addr = target_conn.remote_address();
    if !inner
        .relay
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
pub(crate) async fn expire_loop(inner: Arc<Inner>) {
    let idle = inner.relay.limits.idle_expiry;
    loop {
        tokio::time::sleep(EXPIRY_TICK).await;
        inner.relay.paths.expire(idle);
    }
}

/// How the relay serves its signalling protocol
/// ([`reach_proto::wire::envelope::protocols::RELAY`]): one request per
/// stream, answered on it.
pub(crate) fn serve_stream(
    inner: std::sync::Arc<crate::node::Inner>,
    s: crate::node::router::Inbound,
) -> futures::future::BoxFuture<'static, ()> {
    Box::pin(async move {
        if let reach_proto::wire::envelope::Body::RelayRequest(req) = s.head.body {
            serve(inner, s.peer, s.remote, req, s.send).await
        }
    })
}
