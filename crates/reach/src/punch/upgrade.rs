//! The driver of reach-proto's upgrade machine (`punch::upgrade`): the
//! machine decides when to ask, when to fire, when to retry, when to give
//! up and when to punch again; this file carries that out with tokio
//! timers and I/O: the coordinator RPC (requester), waiting for the
//! relayed connection an introduction is about (target), and the
//! techniques themselves.

use std::sync::Arc;
use std::time::Duration;

use reach_proto::PeerId;
use reach_proto::punch::upgrade::{Action, Asked, Ended, Outcome, PunchError, Side, Upgrades};
use reach_proto::punch::{Introduction, Role, Technique};
use reach_proto::relay::rpc::{RelayRequest, RelayResponse, refusal};
use tokio::time::Instant;

use super::{birthday, local_info, lock, open, wait_until};
use crate::node::{Direction, Inner};
use crate::relay::client;

/// The machine, and the wake-up armed for it.
#[derive(Default)]
pub(super) struct Driven {
    machine: Upgrades,
    /// The earliest wake-up a timer task sleeps towards.
    armed: Option<Duration>,
}

/// Feeds the machine one input (at the node's `now`), runs the timers due,
/// arms a wake-up for the next one and carries out the actions.
pub(super) fn drive(inner: &Arc<Inner>, input: impl FnOnce(&mut Upgrades, Duration)) {
    let now = inner.punch.now();
    let mut d = lock(&inner.punch.upgrades);
    input(&mut d.machine, now);
    run(inner, d, now);
}

/// The rest of [`drive`], once the input is in.
fn run(inner: &Arc<Inner>, mut d: std::sync::MutexGuard<'_, Driven>, now: Duration) {
    if d.machine.next_timeout().is_some_and(|t| t <= now) {
        d.machine.handle_timeout(now);
    }
    let actions: Vec<Action> = std::iter::from_fn(|| d.machine.poll_action()).collect();
    let arm = match (d.machine.next_timeout(), d.armed) {
        (Some(next), Some(armed)) if armed <= next => None,
        (Some(next), _) => {
            d.armed = Some(next);
            Some(next)
        }
        (None, _) => None,
    };
    drop(d);
    if let Some(at) = arm {
        let inner2 = inner.clone();
        inner.spawn(async move {
            tokio::time::sleep_until(inner2.punch.instant(at)).await;
            let mut d = lock(&inner2.punch.upgrades);
            if d.armed == Some(at) {
                d.armed = None;
            }
            let now = inner2.punch.now();
            run(&inner2, d, now);
        });
    }
    for a in actions {
        carry_out(inner, a);
    }
}

fn carry_out(inner: &Arc<Inner>, action: Action) {
    match action {
        Action::Ask {
            peer,
            relay,
            attempt,
        } => {
            let inner2 = inner.clone();
            inner.spawn(async move {
                let asked = ask(&inner2, peer, relay, attempt).await;
                drive(&inner2, |m, now| m.asked(peer, asked, now));
            });
        }
        Action::AwaitRelayed { peer, until } => {
            let inner2 = inner.clone();
            inner.spawn(async move {
                let until = inner2.punch.instant(until);
                if wait_until(&inner2, until, || inner2.peers.is_relayed(&peer)).await {
                    drive(&inner2, |m, now| m.relayed(peer, now));
                } else {
                    tracing::debug!(%peer, "introduced to a peer we have no relayed connection with");
                }
            });
        }
        Action::Punch {
            ticket,
            side,
            intro,
            started,
            deadline,
        } => {
            let inner2 = inner.clone();
            inner.spawn(async move {
                let (started, deadline) =
                    (inner2.punch.instant(started), inner2.punch.instant(deadline));
                let result = punch(&inner2, &intro, started, deadline).await;
                match (&result, side) {
                    (_, Side::Target) => {
                        tracing::debug!(peer = %intro.peer, technique = intro.technique.name(), ok = result.is_ok(), "punch (target side)")
                    }
                    (Err(e), Side::Requester) => {
                        tracing::debug!(peer = %intro.peer, attempt = intro.attempt, error = %e, "punch attempt failed")
                    }
                    _ => {}
                }
                drive(&inner2, |m, now| m.punched(ticket, result, now));
            });
        }
        Action::Ended(outcome) => ended(inner, outcome),
        Action::Repunch { peer, relay } => {
            if inner.peers.is_relayed(&peer) {
                start_upgrade(inner, peer, relay);
            }
        }
    }
}

/// Records how an upgrade ended.
fn ended(inner: &Arc<Inner>, outcome: Outcome) {
    let peer = outcome.peer;
    if outcome.ended == Ended::StayRelayed {
        tracing::debug!(%peer, "punch: staying relayed (both NATs map per destination, or no UDP)");
    }
    if let Some(o) = outcome.settle(inner.peers.is_direct(&peer)) {
        inner.punch.record(o);
    }
}

/// Starts upgrading the relayed connection to `peer` (made through
/// `relay`) in the background.
pub(crate) fn start_upgrade(inner: &Arc<Inner>, peer: PeerId, relay: PeerId) {
    if !inner.punch.enabled {
        return;
    }
    if inner.core.tcp_mode() {
        // No UDP here: nothing to punch with.
        inner.punch.record(Outcome {
            peer,
            technique: Technique::StayRelayed,
            attempts: 0,
            ended: Ended::StayRelayed,
        });
        return;
    }
    drive(inner, |m, now| {
        m.start(peer, relay, now);
    });
}

/// The requester's side of one attempt: whether the upgrade is still
/// wanted, then the coordinator's introduction.
async fn ask(inner: &Arc<Inner>, peer: PeerId, relay: PeerId, attempt: u32) -> Asked {
    if inner.peers.is_direct(&peer) {
        return Asked::Direct;
    }
    if !inner.peers.is_relayed(&peer) {
        return Asked::NotRelayed;
    }
    let Some(relay_conn) = inner.peers.live(&relay) else {
        return Asked::Failed(PunchError::NoCoordinator);
    };
    let ask = RelayRequest::Punch {
        target: peer,
        attempt,
        info: local_info(inner),
    };
    match tokio::time::timeout(client::RELAY_RPC_TIMEOUT, client::rpc(&relay_conn, ask)).await {
        Ok(Ok(RelayResponse::Introduced(i))) => Asked::Introduced(i),
        Ok(Ok(RelayResponse::Refused { reason })) => Asked::Failed(PunchError::Refused(reason)),
        _ => Asked::Failed(PunchError::NoCoordinator),
    }
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
        || inner.core.tcp_mode()
        || !inner.punch.enabled
    {
        return unwanted();
    }
    let relayed = inner.peers.is_relayed(&intro.peer);
    let peer = intro.peer;
    drive(inner, |m, now| {
        if let Err(e) = m.introduced(intro, relayed, now) {
            tracing::debug!(%peer, error = %e, "punch (target side) refused");
        }
    });
    RelayResponse::Accepted
}

/// Carries out this side's part of `intro` (its fire time has come), until
/// `deadline`. Returns the time from `started` to the first packet from the
/// peer's direct address.
async fn punch(
    inner: &Arc<Inner>,
    intro: &Introduction,
    started: Instant,
    deadline: Instant,
) -> Result<Duration, PunchError> {
    let rt = &inner.punch;
    rt.count(intro.technique, |s| s.attempts += 1);
    tracing::debug!(peer = %intro.peer, technique = intro.technique.name(), role = ?intro.role, addrs = ?intro.addrs, "punching");
    let result = match (intro.technique, intro.role) {
        (Technique::Birthday, Role::Dialer) => {
            birthday::hard_side(inner, intro, started, deadline).await
        }
        (Technique::Birthday, Role::Listener) => {
            birthday::easy_side(inner, intro, started, deadline).await
        }
        _ => open::run(inner, intro, started, deadline).await,
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

/// The dialer's last step: a QUIC handshake with `peer` at `addr` from
/// `endpoint`, registered as the peer's (direct) connection.
pub(super) async fn dial_and_register(
    inner: &Arc<Inner>,
    endpoint: &quinn::Endpoint,
    peer: PeerId,
    addr: std::net::SocketAddr,
    deadline: Instant,
) -> Result<(), PunchError> {
    let conn = tokio::time::timeout_at(deadline, inner.peers.dial_from(endpoint, peer, addr))
        .await
        .map_err(|_| PunchError::Handshake("timed out".into()))?
        .map_err(|e| PunchError::Handshake(e.to_string()))?;
    inner.peers.register(peer, conn, Direction::Outbound);
    Ok(())
}
