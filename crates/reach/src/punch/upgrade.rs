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

use super::{PunchRuntime, lock};
use crate::node::Direction;
use crate::relay::client;

/// The machine, and the wake-up armed for it.
#[derive(Default)]
pub(super) struct Driven {
    machine: Upgrades,
    /// The earliest wake-up a timer task sleeps towards.
    armed: Option<Duration>,
}

impl PunchRuntime {
    /// Feeds the machine one input (at the node's `now`), runs the timers
    /// due, arms a wake-up for the next one and carries out the actions.
    pub(super) fn drive(self: &Arc<Self>, input: impl FnOnce(&mut Upgrades, Duration)) {
        let now = self.now();
        let mut d = lock(&self.upgrades);
        input(&mut d.machine, now);
        self.run(d, now);
    }

    /// The rest of [`Self::drive`], once the input is in.
    fn run(self: &Arc<Self>, mut d: std::sync::MutexGuard<'_, Driven>, now: Duration) {
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
            let rt = self.clone();
            self.core.spawn(async move {
                tokio::time::sleep_until(rt.instant(at)).await;
                let mut d = lock(&rt.upgrades);
                if d.armed == Some(at) {
                    d.armed = None;
                }
                let now = rt.now();
                rt.run(d, now);
            });
        }
        for a in actions {
            self.carry_out(a);
        }
    }

    fn carry_out(self: &Arc<Self>, action: Action) {
        match action {
            Action::Ask {
                peer,
                relay,
                attempt,
            } => {
                let rt = self.clone();
                self.core.spawn(async move {
                    let asked = rt.ask(peer, relay, attempt).await;
                    rt.drive(|m, now| m.asked(peer, asked, now));
                });
            }
            Action::AwaitRelayed { peer, until } => {
                let rt = self.clone();
                self.core.spawn(async move {
                    let until = rt.instant(until);
                    if rt.wait_until(until, || rt.peers.is_relayed(&peer)).await {
                        rt.drive(|m, now| m.relayed(peer, now));
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
                let rt = self.clone();
                self.core.spawn(async move {
                    let (started, deadline) = (rt.instant(started), rt.instant(deadline));
                    let result = rt.punch(&intro, started, deadline).await;
                    match (&result, side) {
                        (_, Side::Target) => {
                            tracing::debug!(peer = %intro.peer, technique = intro.technique.name(), ok = result.is_ok(), "punch (target side)")
                        }
                        (Err(e), Side::Requester) => {
                            tracing::debug!(peer = %intro.peer, attempt = intro.attempt, error = %e, "punch attempt failed")
                        }
                        _ => {}
                    }
                    rt.drive(|m, now| m.punched(ticket, result, now));
                });
            }
            Action::Ended(outcome) => self.ended(outcome),
            Action::Repunch { peer, relay } => {
                if self.peers.is_relayed(&peer) {
                    self.start_upgrade(peer, relay);
                }
            }
        }
    }

    /// Records how an upgrade ended.
    fn ended(&self, outcome: Outcome) {
        let peer = outcome.peer;
        if outcome.ended == Ended::StayRelayed {
            tracing::debug!(%peer, "punch: staying relayed (both NATs map per destination, or no UDP)");
        }
        if let Some(o) = outcome.settle(self.peers.is_direct(&peer)) {
            self.record(o);
        }
    }

    /// Starts upgrading the relayed connection to `peer` (made through
    /// `relay`) in the background.
    pub(crate) fn start_upgrade(self: &Arc<Self>, peer: PeerId, relay: PeerId) {
        if !self.enabled {
            return;
        }
        if self.core.tcp_mode() {
            // No UDP here: nothing to punch with.
            self.record(Outcome {
                peer,
                technique: Technique::StayRelayed,
                attempts: 0,
                ended: Ended::StayRelayed,
            });
            return;
        }
        self.drive(|m, now| {
            m.start(peer, relay, now);
        });
    }

    /// The requester's side of one attempt: whether the upgrade is still
    /// wanted, then the coordinator's introduction.
    async fn ask(&self, peer: PeerId, relay: PeerId, attempt: u32) -> Asked {
        if self.peers.is_direct(&peer) {
            return Asked::Direct;
        }
        if !self.peers.is_relayed(&peer) {
            return Asked::NotRelayed;
        }
        let Some(relay_conn) = self.peers.live(&relay) else {
            return Asked::Failed(PunchError::NoCoordinator);
        };
        let ask = RelayRequest::Punch {
            target: peer,
            attempt,
            info: self.local_info(),
        };
        match tokio::time::timeout(client::RELAY_RPC_TIMEOUT, client::rpc(&relay_conn, ask)).await {
            Ok(Ok(RelayResponse::Introduced(i))) => Asked::Introduced(i),
            Ok(Ok(RelayResponse::Refused { reason })) => Asked::Failed(PunchError::Refused(reason)),
            _ => Asked::Failed(PunchError::NoCoordinator),
        }
    }

    /// The target's side: the relay introduced `intro.peer`. Accepted only
    /// from the relay we hold a reservation at, for a peer we are
    /// connected to over a relay, and when UDP works here.
    pub(crate) fn on_introduce(
        self: &Arc<Self>,
        relay: PeerId,
        intro: Introduction,
    ) -> RelayResponse {
        let unwanted = || RelayResponse::Refused {
            reason: refusal::PUNCH_UNWANTED.into(),
        };
        if self.relay.held().is_none_or(|(r, _)| r != relay)
            || self.core.tcp_mode()
            || !self.enabled
        {
            return unwanted();
        }
        let relayed = self.peers.is_relayed(&intro.peer);
        let peer = intro.peer;
        self.drive(|m, now| {
            if let Err(e) = m.introduced(intro, relayed, now) {
                tracing::debug!(%peer, error = %e, "punch (target side) refused");
            }
        });
        RelayResponse::Accepted
    }

    /// Carries out this side's part of `intro` (its fire time has come),
    /// until `deadline`. Returns the time from `started` to the first
    /// packet from the peer's direct address.
    async fn punch(
        &self,
        intro: &Introduction,
        started: Instant,
        deadline: Instant,
    ) -> Result<Duration, PunchError> {
        self.count(intro.technique, |s| s.attempts += 1);
        tracing::debug!(peer = %intro.peer, technique = intro.technique.name(), role = ?intro.role, addrs = ?intro.addrs, "punching");
        let result = match (intro.technique, intro.role) {
            (Technique::Birthday, Role::Dialer) => {
                self.birthday_hard_side(intro, started, deadline).await
            }
            (Technique::Birthday, Role::Listener) => {
                self.birthday_easy_side(intro, started, deadline).await
            }
            _ => self.simultaneous_open(intro, started, deadline).await,
        };
        self.count(intro.technique, |s| {
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
        &self,
        endpoint: &quinn::Endpoint,
        peer: PeerId,
        addr: std::net::SocketAddr,
        deadline: Instant,
    ) -> Result<(), PunchError> {
        let conn = tokio::time::timeout_at(deadline, self.peers.dial_from(endpoint, peer, addr))
            .await
            .map_err(|_| PunchError::Handshake("timed out".into()))?
            .map_err(|e| PunchError::Handshake(e.to_string()))?;
        self.peers.register(peer, conn, Direction::Outbound);
        Ok(())
    }
}
