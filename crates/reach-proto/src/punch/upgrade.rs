//! When to punch, how often, and how many at once: the timing policy of
//! upgrading relayed connections to direct ones.
//!
//! ```text
//! requester (dialed through the relay)          target (introduced by its relay)
//!   start ──► Ask{attempt} ──► asked(Introduced)    introduced ──(not relayed yet:
//!                 ▲                 │                 wait ≤ INTRODUCTION_SETTLE)──┐
//!                 │ PUNCH_RETRY_GAP ▼                                             ▼
//!                 └──── fails ◄── fire time ──► Punch{role, technique} ◄── fire time
//!                                  succeeds ──► Ended(Direct)
//!   after PUNCH_ATTEMPTS: Ended(Failed): the peer stays relayed
//!   fell_back ──(REPUNCH_AFTER_FALLBACK)──► Repunch ──► start
//! ```
//!
//! [`Upgrades`] never does I/O and never reads a clock: the driver feeds it
//! facts (`start`, `asked`, `introduced`, `relayed`, `punched`, `fell_back`)
//! and timeouts, each with `now` (time since an epoch of the driver's
//! choosing), and carries out the [`Action`]s it polls out. The roles swap
//! between attempts because each attempt asks the coordinator with the next
//! attempt number (see `coordinate::introduce`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use super::coordinate::{Introduction, Technique, acceptable};
use crate::PeerId;

/// Attempts per relayed connection; retries swap the roles.
pub const PUNCH_ATTEMPTS: u32 = 3;
/// Pause between attempts (a NAT may need its half-open state to expire).
pub const PUNCH_RETRY_GAP: Duration = Duration::from_secs(1);
/// One attempt, from firing to an established direct connection.
pub const PUNCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Punches this node takes part in at once: each holds sockets, timers and
/// a share of the probe budget.
pub const MAX_CONCURRENT_PUNCHES: usize = 16;
/// Birthday punches (either side) at once: each opens 256 sockets or sends
/// up to 2,048 probes, so one at a time bounds a node's descriptors and
/// probe rate whatever peers and coordinators ask.
pub const MAX_BIRTHDAY_PUNCHES: usize = 1;
/// How long a target waits for the relayed connection an introduction is
/// about: the requester asks right after its side of the handshake, which
/// may finish before ours.
pub const INTRODUCTION_SETTLE: Duration = Duration::from_secs(1);
/// Introductions waiting for their relayed connection at once: as many as
/// punches may run (more could not all be carried out anyway), so a
/// coordinator cannot make this table grow.
pub const MAX_SETTLING: usize = MAX_CONCURRENT_PUNCHES;
/// After a direct path died and traffic went back to the relay, the side
/// that dialed through the relay tries punching again this much later.
pub const REPUNCH_AFTER_FALLBACK: Duration = Duration::from_secs(30);

/// Why a punch did not give a direct connection. Each has a stable
/// [`PunchError::kind`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PunchError {
    #[error("no relay connection to coordinate the punch through")]
    /// This node holds no relay connection to the peer to ask through.
    NoCoordinator,
    #[error("the coordinator refused: {0}")]
    /// The coordinator said no (its reason).
    Refused(String),
    #[error("no punch packet got through within {0:?}")]
    /// No punch packet arrived within the attempt's time (how long).
    NoPath(Duration),
    #[error("a punch got through but the direct handshake failed: {0}")]
    /// Packets got through but the direct QUIC handshake failed (why).
    Handshake(String),
    #[error("punch abandoned: {0}")]
    /// The upgrade stopped before an attempt ended (why, e.g. the relayed
    /// connection closed).
    Abandoned(&'static str),
}

impl PunchError {
    /// A stable name of the error, for counters and logs.
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

/// Which side of a punch this node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// It dialed through the relay and asked the relay to coordinate.
    Requester,
    /// The relay introduced the requester to it.
    Target,
}

/// What came of an [`Action::Ask`]. The driver looks, in this order:
/// is the connection direct already, is it still relayed, is the relay
/// still connected; then asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asked {
    /// The coordinator's introduction for this side.
    Introduced(Introduction),
    /// The connection is direct already (the other side's handshake got
    /// through after all).
    Direct,
    /// The relayed connection closed.
    NotRelayed,
    /// No coordinator, or it refused.
    Failed(PunchError),
}

/// How an upgrade ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Direct; the time from the request to the first packet from the
    /// peer's direct address, when this side saw it.
    Direct(Option<Duration>),
    /// The coordinator chose to stay relayed (both NATs map per
    /// destination, or no UDP).
    StayRelayed,
    /// Every attempt failed (or the upgrade could not go on): the peer
    /// stays relayed. The last error.
    Failed(PunchError),
}

/// The end of one upgrade, to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The peer the upgrade was with.
    pub peer: PeerId,
    /// The technique of the last introduction (`StayRelayed` if none).
    pub technique: Technique,
    /// Attempts carried out (introductions acted on).
    pub attempts: u32,
    /// How it ended.
    pub ended: Ended,
}

impl Outcome {
    /// What to record, given whether the connection to the peer is direct
    /// by the time the driver records a failure: then the other side's
    /// handshake got through after all, which counts as direct if this side
    /// took part in an attempt, and as nothing otherwise.
    pub fn settle(self, direct_now: bool) -> Option<Outcome> {
        match self.ended {
            Ended::Failed(_) if direct_now && self.attempts == 0 => None,
            Ended::Failed(_) if direct_now => Some(Outcome {
                ended: Ended::Direct(None),
                ..self
            }),
            _ => Some(self),
        }
    }
}

/// Identifies one punch between [`Action::Punch`] and
/// [`Upgrades::punched`].
pub type Ticket = u64;

/// What the driver must do, in the order polled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Ask `relay` to coordinate attempt `attempt` of a punch with `peer`
    /// (the coordinator swaps the roles by the attempt number); report
    /// with [`Upgrades::asked`].
    Ask {
        /// The peer to punch to.
        peer: PeerId,
        /// The relay that coordinates.
        relay: PeerId,
        /// 0 for the first attempt.
        attempt: u32,
    },
    /// Report [`Upgrades::relayed`] as soon as a relayed connection with
    /// `peer` exists (one may exist already), if it does before `until`.
    AwaitRelayed {
        /// The peer.
        peer: PeerId,
        /// Give up waiting at this time (driver's clock).
        until: Duration,
    },
    /// Carry out this side's part of `intro` now (its fire time has come;
    /// `intro` carries the role and the technique), until `deadline`, then
    /// report with [`Upgrades::punched`]. `started` is when the punch was
    /// asked for (requester) or introduced (target): the time to direct
    /// counts from there.
    Punch {
        /// Hand back to [`Upgrades::punched`].
        ticket: Ticket,
        /// Whether this node asked or was introduced.
        side: Side,
        /// What the coordinator said: whom, where, how.
        intro: Introduction,
        /// When the punch was asked for or introduced.
        started: Duration,
        /// When the attempt gives up.
        deadline: Duration,
    },
    /// The upgrade with a peer ended: record it, through
    /// [`Outcome::settle`] with whether the connection is direct by then.
    Ended(Outcome),
    /// A direct path to `peer` fell back [`REPUNCH_AFTER_FALLBACK`] ago: if
    /// the connection is still relayed, [`Upgrades::start`] again.
    Repunch {
        /// The peer.
        peer: PeerId,
        /// The relay the connection goes through.
        relay: PeerId,
    },
}

/// Where one upgrade (requester side) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Waiting for the answer to `Ask`.
    Asking,
    /// Its punch (ticket) is waiting to fire or running.
    Punching(Ticket),
    /// Between attempts, until then.
    Gap(Duration),
}

#[derive(Debug, Clone)]
struct Upgrade {
    relay: PeerId,
    /// The attempt being asked for or carried out (0-based).
    attempt: u32,
    /// Attempts carried out.
    attempts: u32,
    technique: Technique,
    last: PunchError,
    asked_at: Duration,
    stage: Stage,
}

#[derive(Debug, Clone)]
struct Punch {
    side: Side,
    intro: Introduction,
    started: Duration,
    /// Fire time; `None` once fired.
    fire_at: Option<Duration>,
}

/// An introduction waiting for its relayed connection.
#[derive(Debug, Clone)]
struct Settling {
    intro: Introduction,
    introduced_at: Duration,
    until: Duration,
}

/// The upgrade policy of one node: its upgrades as requester, the
/// introductions it acts on as target, the punches running (and the
/// budget they share), and the re-punches due after fallbacks.
#[derive(Debug, Clone, Default)]
pub struct Upgrades {
    upgrades: HashMap<PeerId, Upgrade>,
    settling: Vec<Settling>,
    punches: BTreeMap<Ticket, Punch>,
    next_ticket: Ticket,
    repunch: HashMap<PeerId, (PeerId, Duration)>,
    actions: VecDeque<Action>,
}

impl Upgrades {
    /// No upgrade running.
    pub fn new() -> Self {
        Self::default()
    }

    /// A relayed connection to `peer`, dialed by this node through
    /// `relay`, is up: upgrade it (one upgrade per peer at a time; false if
    /// one is running already).
    pub fn start(&mut self, peer: PeerId, relay: PeerId, now: Duration) -> bool {
        if self.upgrades.contains_key(&peer) {
            return false;
        }
        self.upgrades.insert(
            peer,
            Upgrade {
                relay,
                attempt: 0,
                attempts: 0,
                technique: Technique::StayRelayed,
                last: PunchError::NoCoordinator,
                asked_at: now,
                stage: Stage::Asking,
            },
        );
        self.actions.push_back(Action::Ask {
            peer,
            relay,
            attempt: 0,
        });
        true
    }

    /// Whether an upgrade with `peer` is running. Only the tests ask: the
    /// driver learns of upgrades through [`Upgrades::poll_action`].
    #[cfg(test)]
    fn is_upgrading(&self, peer: &PeerId) -> bool {
        self.upgrades.contains_key(peer)
    }

    /// Punches accepted and not yet reported (waiting to fire or running).
    /// Only the tests ask, to check slots are taken and freed.
    #[cfg(test)]
    fn active(&self) -> usize {
        self.punches.len()
    }

    /// Birthday punches among them.
    pub fn active_birthday(&self) -> usize {
        self.punches
            .values()
            .filter(|p| p.intro.technique == Technique::Birthday)
            .count()
    }

    /// The answer to `Ask` for `peer`.
    pub fn asked(&mut self, peer: PeerId, asked: Asked, now: Duration) {
        let Some(u) = self.upgrades.get_mut(&peer) else {
            return;
        };
        if u.stage != Stage::Asking {
            return;
        }
        match asked {
            // Direct after all: the other side's handshake got through.
            // Recorded only if this side took part in an attempt.
            Asked::Direct if u.attempts == 0 => {
                self.upgrades.remove(&peer);
            }
            Asked::Direct => self.end(peer, Some(Ended::Direct(None))),
            Asked::NotRelayed => {
                u.last = PunchError::Abandoned("the relayed connection closed");
                self.end(peer, None);
            }
            Asked::Failed(e) => {
                u.last = e;
                self.end(peer, None);
            }
            Asked::Introduced(intro) if intro.peer != peer => {
                u.last = PunchError::NoCoordinator;
                self.end(peer, None);
            }
            Asked::Introduced(intro) => {
                u.technique = intro.technique;
                if intro.technique == Technique::StayRelayed {
                    self.end(peer, Some(Ended::StayRelayed));
                    return;
                }
                u.attempts += 1;
                let started = u.asked_at;
                match self.accept(Side::Requester, intro, started, now) {
                    Ok(ticket) => {
                        if let Some(u) = self.upgrades.get_mut(&peer) {
                            u.stage = Stage::Punching(ticket);
                        }
                    }
                    Err(e) => self.attempt_failed(peer, e, now),
                }
            }
        }
    }

    /// The relay introduced `intro.peer` to this node (the driver checked
    /// it came from the relay this node holds a reservation at); `relayed`:
    /// whether a relayed connection with that peer exists already. An
    /// error if it is refused at once (the requester's attempt then fails
    /// by its own deadline).
    pub fn introduced(
        &mut self,
        intro: Introduction,
        relayed: bool,
        now: Duration,
    ) -> Result<(), PunchError> {
        if relayed {
            return self.accept(Side::Target, intro, now, now).map(|_| ());
        }
        if self.settling.len() >= MAX_SETTLING {
            return Err(PunchError::Abandoned("too many introductions waiting"));
        }
        let until = now + INTRODUCTION_SETTLE;
        self.actions.push_back(Action::AwaitRelayed {
            peer: intro.peer,
            until,
        });
        self.settling.push(Settling {
            intro,
            introduced_at: now,
            until,
        });
        Ok(())
    }

    /// A relayed connection with `peer` exists now: the introductions
    /// waiting for it go ahead.
    pub fn relayed(&mut self, peer: PeerId, now: Duration) {
        let (ready, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.settling)
            .into_iter()
            .partition(|s| s.intro.peer == peer && now < s.until);
        self.settling = rest;
        for s in ready {
            let _ = self.accept(Side::Target, s.intro, s.introduced_at, now);
        }
    }

    /// Punch `ticket` ended: the time to direct, or why not.
    pub fn punched(&mut self, ticket: Ticket, result: Result<Duration, PunchError>, now: Duration) {
        let Some(p) = self.punches.remove(&ticket) else {
            return;
        };
        if p.side == Side::Target {
            return;
        }
        let peer = p.intro.peer;
        if !self
            .upgrades
            .get(&peer)
            .is_some_and(|u| u.stage == Stage::Punching(ticket))
        {
            return;
        }
        match result {
            Ok(t) => self.end(peer, Some(Ended::Direct(Some(t)))),
            Err(e) => self.attempt_failed(peer, e, now),
        }
    }

    /// A direct path to `peer` died and traffic went back to the relayed
    /// connection this node dialed through `relay`: punch again
    /// [`REPUNCH_AFTER_FALLBACK`] later (the earliest one due stands).
    pub fn fell_back(&mut self, peer: PeerId, relay: PeerId, now: Duration) {
        self.repunch
            .entry(peer)
            .or_insert((relay, now + REPUNCH_AFTER_FALLBACK));
    }

    /// When the machine next needs [`Upgrades::handle_timeout`].
    pub fn next_timeout(&self) -> Option<Duration> {
        let gaps = self.upgrades.values().filter_map(|u| match u.stage {
            Stage::Gap(until) => Some(until),
            _ => None,
        });
        let fires = self.punches.values().filter_map(|p| p.fire_at);
        let settles = self.settling.iter().map(|s| s.until);
        let repunches = self.repunch.values().map(|(_, at)| *at);
        gaps.chain(fires).chain(settles).chain(repunches).min()
    }

    /// Advances time to `now`.
    pub fn handle_timeout(&mut self, now: Duration) {
        // Punches whose fire time has come, in ticket order.
        for (&ticket, p) in self.punches.iter_mut() {
            if p.fire_at.is_some_and(|t| now >= t) {
                p.fire_at = None;
                self.actions.push_back(Action::Punch {
                    ticket,
                    side: p.side,
                    intro: p.intro.clone(),
                    started: p.started,
                    deadline: now + PUNCH_TIMEOUT,
                });
            }
        }
        // Retries whose gap is over.
        let mut due: Vec<PeerId> = self
            .upgrades
            .iter()
            .filter(|(_, u)| matches!(u.stage, Stage::Gap(until) if now >= until))
            .map(|(p, _)| *p)
            .collect();
        due.sort();
        for peer in due {
            let Some(u) = self.upgrades.get_mut(&peer) else {
                continue;
            };
            if u.attempt + 1 >= PUNCH_ATTEMPTS {
                self.end(peer, None);
                continue;
            }
            u.attempt += 1;
            u.asked_at = now;
            u.stage = Stage::Asking;
            self.actions.push_back(Action::Ask {
                peer,
                relay: u.relay,
                attempt: u.attempt,
            });
        }
        // Introductions whose relayed connection never came.
        self.settling.retain(|s| now < s.until);
        // Re-punches due.
        let mut due: Vec<(PeerId, PeerId)> = self
            .repunch
            .iter()
            .filter(|(_, (_, at))| now >= *at)
            .map(|(p, (r, _))| (*p, *r))
            .collect();
        due.sort();
        for (peer, relay) in due {
            self.repunch.remove(&peer);
            self.actions.push_back(Action::Repunch { peer, relay });
        }
    }

    /// The next action to carry out.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Takes a punch slot for `intro` (fires at its fire delay), or says why
    /// not.
    fn accept(
        &mut self,
        side: Side,
        intro: Introduction,
        started: Duration,
        now: Duration,
    ) -> Result<Ticket, PunchError> {
        if self.punches.len() >= MAX_CONCURRENT_PUNCHES {
            return Err(PunchError::Abandoned("too many punches at once"));
        }
        if !acceptable(&intro) {
            return Err(PunchError::Refused(
                "the introduction is beyond this node's bounds".into(),
            ));
        }
        if intro.technique == Technique::Birthday && self.active_birthday() >= MAX_BIRTHDAY_PUNCHES
        {
            return Err(PunchError::Abandoned("another birthday punch is running"));
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let fire_at = now + Duration::from_millis(u64::from(intro.fire_in_ms));
        self.punches.insert(
            ticket,
            Punch {
                side,
                intro,
                started,
                fire_at: Some(fire_at),
            },
        );
        Ok(ticket)
    }

    /// An attempt of the upgrade with `peer` failed: retry after the gap.
    fn attempt_failed(&mut self, peer: PeerId, e: PunchError, now: Duration) {
        if let Some(u) = self.upgrades.get_mut(&peer) {
            u.last = e;
            u.stage = Stage::Gap(now + PUNCH_RETRY_GAP);
        }
    }

    /// Ends the upgrade with `peer`: `ended`, or a failure with the last
    /// error.
    fn end(&mut self, peer: PeerId, ended: Option<Ended>) {
        let Some(u) = self.upgrades.remove(&peer) else {
            return;
        };
        let ended = ended.unwrap_or(Ended::Failed(u.last));
        let (technique, attempts) = match ended {
            // Recorded as its own technique, with no attempt.
            Ended::StayRelayed => (Technique::StayRelayed, 0),
            _ => (u.technique, u.attempts),
        };
        self.actions.push_back(Action::Ended(Outcome {
            peer,
            technique,
            attempts,
            ended,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Keypair;
    use crate::nat::{Filtering, Mapping};
    use crate::punch::coordinate::{Party, PunchInfo, Role, introduce};

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn id(n: u8) -> PeerId {
        Keypair::from_secret_bytes([n; 32]).peer_id()
    }

    fn party(peer: PeerId, mapping: Mapping, observed: &str) -> Party {
        Party {
            peer,
            info: PunchInfo {
                mapping,
                filtering: Filtering::AddressAndPortDependent,
                udp: true,
                lan: Vec::new(),
            },
            observed: observed.parse().unwrap(),
            rtt: MS(20),
        }
    }

    /// What a coordinator tells `me` (the requester) for `attempt` with
    /// `peer`, both behind endpoint-independent NATs unless `hard`.
    fn intro(me: PeerId, peer: PeerId, attempt: u32, hard: bool) -> Introduction {
        let a = party(me, Mapping::EndpointIndependent, "198.51.100.7:4000");
        let mapping = if hard {
            Mapping::EndpointDependent
        } else {
            Mapping::EndpointIndependent
        };
        let b = party(peer, mapping, "203.0.113.9:5000");
        introduce(u64::from(attempt) + 1, &a, &b, attempt).0
    }

    fn drain(m: &mut Upgrades) -> Vec<Action> {
        std::iter::from_fn(|| m.poll_action()).collect()
    }

    /// Runs the timers up to `now`.
    fn advance(m: &mut Upgrades, now: Duration) -> Vec<Action> {
        let mut out = Vec::new();
        while let Some(t) = m.next_timeout().filter(|t| *t <= now) {
            m.handle_timeout(t);
            out.extend(drain(m));
        }
        out
    }

    fn the_punch(actions: &[Action]) -> (Ticket, Introduction, Duration) {
        match actions {
            [
                Action::Punch {
                    ticket,
                    intro,
                    deadline,
                    ..
                },
            ] => (*ticket, intro.clone(), *deadline),
            other => panic!("expected one punch, got {other:?}"),
        }
    }

    #[test]
    fn retries_swap_roles_and_stop_after_the_attempts_leaving_the_peer_relayed() {
        let (me, peer, relay) = (id(1), id(2), id(3));
        let mut m = Upgrades::new();
        assert!(m.start(peer, relay, MS(0)));
        let mut now = MS(0);
        let mut roles = Vec::new();
        for attempt in 0..PUNCH_ATTEMPTS {
            assert_eq!(
                drain(&mut m),
                vec![Action::Ask {
                    peer,
                    relay,
                    attempt
                }]
            );
            let i = intro(me, peer, attempt, false);
            m.asked(peer, Asked::Introduced(i.clone()), now);
            assert!(drain(&mut m).is_empty(), "nothing before the fire time");
            let fire = now + MS(u64::from(i.fire_in_ms));
            let (ticket, fired, deadline) = the_punch(&advance(&mut m, fire));
            assert_eq!(fired, i);
            assert_eq!(deadline, fire + PUNCH_TIMEOUT);
            roles.push(fired.role);
            now = deadline;
            m.punched(ticket, Err(PunchError::NoPath(PUNCH_TIMEOUT)), now);
            assert!(drain(&mut m).is_empty());
            // No retry before the gap is over.
            assert!(advance(&mut m, now + PUNCH_RETRY_GAP - MS(1)).is_empty());
            now += PUNCH_RETRY_GAP;
            if attempt + 1 < PUNCH_ATTEMPTS {
                m.handle_timeout(now);
            }
        }
        assert_eq!(roles, vec![Role::Dialer, Role::Listener, Role::Dialer]);
        // After the last attempt's gap: the end, the peer stays relayed.
        assert_eq!(
            advance(&mut m, now),
            vec![Action::Ended(Outcome {
                peer,
                technique: Technique::SimultaneousOpen,
                attempts: PUNCH_ATTEMPTS,
                ended: Ended::Failed(PunchError::NoPath(PUNCH_TIMEOUT)),
            })]
        );
        assert!(!m.is_upgrading(&peer));
        assert_eq!(m.next_timeout(), None, "no further attempt");
        assert!(advance(&mut m, now + Duration::from_secs(3600)).is_empty());
    }

    #[test]
    fn a_success_ends_the_upgrade_with_the_time_to_direct() {
        let (me, peer, relay) = (id(1), id(2), id(3));
        let mut m = Upgrades::new();
        m.start(peer, relay, MS(100));
        drain(&mut m);
        let i = intro(me, peer, 0, false);
        m.asked(peer, Asked::Introduced(i.clone()), MS(130));
        let (ticket, ..) = the_punch(&advance(&mut m, MS(130 + u64::from(i.fire_in_ms))));
        m.punched(ticket, Ok(MS(180)), MS(300));
        assert_eq!(
            drain(&mut m),
            vec![Action::Ended(Outcome {
                peer,
                technique: Technique::SimultaneousOpen,
                attempts: 1,
                ended: Ended::Direct(Some(MS(180))),
            })]
        );
        assert_eq!(m.active(), 0, "the slot is free again");
    }

    #[test]
    fn only_one_upgrade_per_peer_at_a_time() {
        let (peer, other, relay) = (id(2), id(4), id(3));
        let mut m = Upgrades::new();
        assert!(m.start(peer, relay, MS(0)));
        assert!(!m.start(peer, relay, MS(10)), "a second relayed connection");
        assert!(m.start(other, relay, MS(10)), "another peer is independent");
        assert_eq!(drain(&mut m).len(), 2, "one Ask per peer");
        // Once it ended (the coordinator refused), a new one may start.
        m.asked(
            peer,
            Asked::Failed(PunchError::Refused("no".into())),
            MS(20),
        );
        assert!(
            matches!(&drain(&mut m)[..], [Action::Ended(o)] if o.peer == peer && o.attempts == 0)
        );
        assert!(m.start(peer, relay, MS(30)));
    }

    #[test]
    fn only_one_birthday_punch_at_a_time() {
        let (me, relay) = (id(1), id(3));
        let (p1, p2) = (id(10), id(11));
        let mut m = Upgrades::new();
        m.start(p1, relay, MS(0));
        m.start(p2, relay, MS(0));
        drain(&mut m);
        let i1 = intro(me, p1, 0, true);
        assert_eq!(i1.technique, Technique::Birthday);
        m.asked(p1, Asked::Introduced(i1), MS(10));
        assert_eq!(m.active_birthday(), 1);
        // The second one's attempt fails at once, and is retried after the gap.
        m.asked(p2, Asked::Introduced(intro(me, p2, 0, true)), MS(10));
        assert_eq!(m.active_birthday(), 1);
        // A target-side birthday introduction is refused too.
        let mut as_target = intro(id(12), me, 0, true);
        as_target.peer = id(12);
        assert_eq!(
            m.introduced(as_target, true, MS(10)),
            Err(PunchError::Abandoned("another birthday punch is running"))
        );
        assert_eq!((m.active(), m.active_birthday()), (1, 1));
        // A non-birthday punch may run alongside.
        assert_eq!(
            m.introduced(intro(id(13), me, 0, false), true, MS(10)),
            Ok(())
        );
        assert_eq!((m.active(), m.active_birthday()), (2, 1));
        let fired = advance(&mut m, MS(10) + MS(u64::from(MAX_FIRE)));
        let birthday: Vec<_> = fired
            .iter()
            .filter_map(|a| match a {
                Action::Punch { ticket, intro, .. } if intro.technique == Technique::Birthday => {
                    Some((*ticket, intro.peer))
                }
                _ => None,
            })
            .collect();
        assert_eq!(birthday.len(), 1, "{fired:?}");
        assert_eq!(birthday[0].1, p1);
        // p2 retried after its gap, but p1's still runs: refused again.
        assert!(fired.contains(&Action::Ask {
            peer: p2,
            relay,
            attempt: 1
        }));
        // When p1's ends, p2's next attempt may run.
        m.punched(
            birthday[0].0,
            Err(PunchError::NoPath(PUNCH_TIMEOUT)),
            MS(2000),
        );
        drain(&mut m);
        assert_eq!(m.active_birthday(), 0);
        m.asked(p2, Asked::Introduced(intro(me, p2, 1, true)), MS(2000));
        assert_eq!(m.active_birthday(), 1);
    }

    /// Longer than any fire delay of the test introductions.
    const MAX_FIRE: u32 = super::super::coordinate::MAX_FIRE_DELAY_MS;

    #[test]
    fn punches_at_once_are_bounded() {
        let me = id(1);
        let mut m = Upgrades::new();
        let refused = (0..MAX_CONCURRENT_PUNCHES + 5)
            .filter(|n| {
                let peer = id(20 + *n as u8);
                let mut i = intro(peer, me, 0, false);
                i.peer = peer;
                m.introduced(i, true, MS(0)).is_err()
            })
            .count();
        assert_eq!(refused, 5);
        assert_eq!(m.active(), MAX_CONCURRENT_PUNCHES);
        // Waiting introductions are bounded too.
        let waiting = (0..MAX_SETTLING + 3)
            .filter(|n| {
                let peer = id(100 + *n as u8);
                let mut i = intro(peer, me, 0, false);
                i.peer = peer;
                m.introduced(i, false, MS(0)).is_ok()
            })
            .count();
        assert_eq!(waiting, MAX_SETTLING);
        let fired = advance(&mut m, MS(u64::from(MAX_FIRE)));
        let punches = fired
            .iter()
            .filter(|a| matches!(a, Action::Punch { .. }))
            .count();
        assert_eq!(punches, MAX_CONCURRENT_PUNCHES);
    }

    #[test]
    fn the_target_waits_for_its_relayed_connection_but_not_forever() {
        let (me, peer) = (id(1), id(2));
        let mut m = Upgrades::new();
        let mut i = intro(peer, me, 0, false);
        i.peer = peer;
        assert_eq!(m.introduced(i.clone(), false, MS(0)), Ok(()));
        assert_eq!(
            drain(&mut m),
            vec![Action::AwaitRelayed {
                peer,
                until: INTRODUCTION_SETTLE
            }]
        );
        assert_eq!(m.active(), 0, "no slot taken while waiting");
        m.relayed(peer, MS(400));
        assert_eq!(m.active(), 1);
        let (_, fired, _) = the_punch(&advance(&mut m, MS(400 + u64::from(i.fire_in_ms))));
        assert_eq!(fired, i);

        // Too late: dropped.
        let mut m = Upgrades::new();
        let _ = m.introduced(i, false, MS(0));
        drain(&mut m);
        assert!(advance(&mut m, INTRODUCTION_SETTLE).is_empty());
        m.relayed(peer, INTRODUCTION_SETTLE);
        assert_eq!(m.active(), 0);
        assert_eq!(m.next_timeout(), None);
    }

    #[test]
    fn repunch_fires_thirty_seconds_after_a_fallback_and_not_before() {
        let (peer, relay) = (id(2), id(3));
        let mut m = Upgrades::new();
        let at = Duration::from_secs(100);
        m.fell_back(peer, relay, at);
        // A second fallback meanwhile does not push it later.
        m.fell_back(peer, relay, at + MS(5000));
        assert_eq!(m.next_timeout(), Some(at + REPUNCH_AFTER_FALLBACK));
        assert!(advance(&mut m, at + REPUNCH_AFTER_FALLBACK - MS(1)).is_empty());
        assert_eq!(
            advance(&mut m, at + REPUNCH_AFTER_FALLBACK),
            vec![Action::Repunch { peer, relay }]
        );
        assert_eq!(m.next_timeout(), None, "once");
        // The driver found it still relayed: a new upgrade.
        assert!(m.start(peer, relay, at + REPUNCH_AFTER_FALLBACK));
        assert!(matches!(
            &drain(&mut m)[..],
            [Action::Ask { attempt: 0, .. }]
        ));
    }

    #[test]
    fn staying_relayed_and_direct_after_all_end_the_upgrade() {
        let (me, peer, relay) = (id(1), id(2), id(3));
        let mut m = Upgrades::new();
        m.start(peer, relay, MS(0));
        drain(&mut m);
        let mut i = intro(me, peer, 0, false);
        i.technique = Technique::StayRelayed;
        i.addrs.clear();
        m.asked(peer, Asked::Introduced(i), MS(5));
        assert_eq!(
            drain(&mut m),
            vec![Action::Ended(Outcome {
                peer,
                technique: Technique::StayRelayed,
                attempts: 0,
                ended: Ended::StayRelayed,
            })]
        );
        // Direct before any attempt: nothing to record.
        m.start(peer, relay, MS(10));
        drain(&mut m);
        m.asked(peer, Asked::Direct, MS(11));
        assert!(drain(&mut m).is_empty());
        assert!(!m.is_upgrading(&peer));
        // A failure while the connection turned direct counts as direct.
        let failed = Outcome {
            peer,
            technique: Technique::SimultaneousOpen,
            attempts: 2,
            ended: Ended::Failed(PunchError::NoPath(PUNCH_TIMEOUT)),
        };
        assert_eq!(
            failed.clone().settle(true).map(|o| o.ended),
            Some(Ended::Direct(None))
        );
        assert_eq!(failed.clone().settle(false), Some(failed.clone()));
        let none = Outcome {
            attempts: 0,
            ..failed
        };
        assert_eq!(none.settle(true), None);
    }

    #[test]
    fn an_introduction_beyond_the_bounds_fails_the_attempt() {
        let (me, peer, relay) = (id(1), id(2), id(3));
        let mut m = Upgrades::new();
        m.start(peer, relay, MS(0));
        drain(&mut m);
        let mut i = intro(me, peer, 0, false);
        i.fire_in_ms = MAX_FIRE + 1;
        m.asked(peer, Asked::Introduced(i), MS(0));
        assert_eq!(m.active(), 0);
        assert_eq!(
            advance(&mut m, PUNCH_RETRY_GAP),
            vec![Action::Ask {
                peer,
                relay,
                attempt: 1
            }]
        );
    }
}
