//! Relay acquisition: how a node that is not directly reachable gets, keeps
//! and replaces a relay, and when its endpoint record must change (the
//! record's addresses themselves are composed in one place,
//! [`crate::endpoint::compose`]).
//!
//! ```text
//!            success                     relay lost / left our K closest
//! Acquiring ─────────► Holding ───────────────────────────► Lost
//!     │ failure            ▲                                  │ publish direct-only
//!     ▼                    │ success                          ▼ first, then
//!  Backoff ──(timer or routing change)──► Acquiring ◄─────────┘
//! ```
//!
//! The machine never does I/O. The driver feeds [`Event`]s and timeouts in
//! and carries out the [`Action`]s it polls out, in order: the order is part
//! of the contract ("republish the direct-only set BEFORE re-acquiring", so
//! nobody keeps dialing a dead relay).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use crate::PeerId;

/// First backoff after a failed acquisition.
pub const BACKOFF_INITIAL: Duration = Duration::from_secs(30);
/// Longest backoff: relays come and go; five minutes bounds how long a node
/// stays unreachable after the network recovers.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// How often a held relay's health is polled (besides connection-loss
/// events): at most 5 s, so a silently dead relay is noticed quickly.
pub const HEALTH_POLL: Duration = Duration::from_secs(5);

/// The states of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Looking for a relay: waiting for the driver's `Reserved` or
    /// `ReservationFailed`.
    Acquiring,
    /// A relay holds our reservation; its address is published.
    Holding {
        /// The relay that holds our reservation.
        relay: PeerId,
        /// Our relayed address there (published).
        addr: SocketAddr,
    },
    /// The held relay went away; a new one is sought at once.
    Lost,
    /// Every candidate failed; try again later.
    Backoff {
        /// When the next acquisition starts (driver's clock).
        until: Duration,
    },
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A reservation at `relay` succeeded.
    Reserved {
        /// The relay.
        relay: PeerId,
        /// Our relayed address there.
        addr: SocketAddr,
    },
    /// Every candidate refused or failed.
    ReservationFailed,
    /// The connection to the held relay closed, or a health poll failed.
    RelayLost,
    /// The held relay is no longer among our K closest DHT peers.
    RelayLeftClosest,
    /// The routing table changed (new peers: maybe new relay candidates).
    RoutingChanged,
}

/// What the driver must do, in the order polled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The relay to publish changed: record it as held (`None`: no relay)
    /// and republish the endpoint record before the next action.
    Publish {
        /// The relay held now and its address; `None` while holding none.
        relay: Option<(PeerId, SocketAddr)>,
    },
    /// Pick relay candidates (public, healthy, DHT-close first) and try to
    /// reserve at them; report back `Reserved` or `ReservationFailed`.
    Acquire,
    /// Check the held relay is still alive; report `RelayLost` if not.
    CheckHealth {
        /// The held relay.
        relay: PeerId,
    },
}

/// The relay-acquisition state machine.
#[derive(Debug, Clone)]
pub struct RelayAcquisition {
    state: State,
    failures: u32,
    next_health: Option<Duration>,
    actions: VecDeque<Action>,
}

impl Default for RelayAcquisition {
    fn default() -> Self {
        Self::new()
    }
}

impl RelayAcquisition {
    /// Starts in `Acquiring`, asking the driver to acquire.
    pub fn new() -> Self {
        let mut m = RelayAcquisition {
            state: State::Acquiring,
            failures: 0,
            next_health: None,
            actions: VecDeque::new(),
        };
        m.actions.push_back(Action::Acquire);
        m
    }

    /// Where the machine stands now.
    pub fn state(&self) -> State {
        self.state
    }

    /// The backoff after `failures` consecutive failures: 30 s, ×2 each,
    /// capped at 300 s.
    pub fn backoff(failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(16);
        BACKOFF_INITIAL.saturating_mul(1u32 << exp).min(BACKOFF_MAX)
    }

    fn acquire(&mut self) {
        self.state = State::Acquiring;
        self.next_health = None;
        self.actions.push_back(Action::Acquire);
    }

    /// Feeds an event in.
    pub fn handle(&mut self, event: Event, now: Duration) {
        match (self.state, event) {
            (State::Acquiring, Event::Reserved { relay, addr }) => {
                self.failures = 0;
                self.state = State::Holding { relay, addr };
                self.next_health = Some(now + HEALTH_POLL);
                self.actions.push_back(Action::Publish {
                    relay: Some((relay, addr)),
                });
            }
            (State::Acquiring, Event::ReservationFailed) => {
                self.failures += 1;
                let until = now + Self::backoff(self.failures);
                self.state = State::Backoff { until };
                self.actions.push_back(Action::Publish { relay: None });
            }
            (State::Holding { .. }, Event::RelayLost | Event::RelayLeftClosest) => {
                self.state = State::Lost;
                self.next_health = None;
                // Without the relay first, so nobody keeps dialing the dead
                // one…
                self.actions.push_back(Action::Publish { relay: None });
                // …then look for a new one.
                self.acquire();
            }
            (State::Backoff { .. }, Event::RoutingChanged) => self.acquire(),
            // Anything else is stale (e.g. a late reservation result).
            _ => {}
        }
    }

    /// When the machine next needs `handle_timeout`.
    pub fn poll_timeout(&self) -> Option<Duration> {
        match self.state {
            State::Backoff { until } => Some(until),
            State::Holding { .. } => self.next_health,
            _ => None,
        }
    }

    /// Advances time.
    pub fn handle_timeout(&mut self, now: Duration) {
        match self.state {
            State::Backoff { until } if now >= until => self.acquire(),
            State::Holding { relay, .. } if self.next_health.is_some_and(|t| now >= t) => {
                self.next_health = Some(now + HEALTH_POLL);
                self.actions.push_back(Action::CheckHealth { relay });
            }
            _ => {}
        }
    }

    /// The next action to carry out.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Keypair;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn relay() -> (PeerId, SocketAddr) {
        (
            Keypair::from_secret_bytes([7; 32]).peer_id(),
            "203.0.113.10:4433".parse().unwrap(),
        )
    }

    fn drain(m: &mut RelayAcquisition) -> Vec<Action> {
        std::iter::from_fn(|| m.poll_action()).collect()
    }

    #[test]
    fn starts_acquiring_and_publishes_relay_first_on_success() {
        let mut m = RelayAcquisition::new();
        assert_eq!(drain(&mut m), vec![Action::Acquire]);
        let (r, a) = relay();
        m.handle(Event::Reserved { relay: r, addr: a }, S(1));
        assert_eq!(m.state(), State::Holding { relay: r, addr: a });
        assert_eq!(
            drain(&mut m),
            vec![Action::Publish {
                relay: Some((r, a))
            }]
        );
    }

    #[test]
    fn failure_publishes_direct_only_and_backs_off() {
        let mut m = RelayAcquisition::new();
        drain(&mut m);
        m.handle(Event::ReservationFailed, S(10));
        assert_eq!(m.state(), State::Backoff { until: S(40) });
        assert_eq!(drain(&mut m), vec![Action::Publish { relay: None }]);
        // Not before the deadline…
        m.handle_timeout(S(39));
        assert!(drain(&mut m).is_empty());
        // …then again.
        m.handle_timeout(S(40));
        assert_eq!(m.state(), State::Acquiring);
        assert_eq!(drain(&mut m), vec![Action::Acquire]);
    }

    #[test]
    fn backoff_doubles_caps_and_resets_on_success() {
        assert_eq!(RelayAcquisition::backoff(1), S(30));
        assert_eq!(RelayAcquisition::backoff(2), S(60));
        assert_eq!(RelayAcquisition::backoff(3), S(120));
        assert_eq!(RelayAcquisition::backoff(4), S(240));
        assert_eq!(RelayAcquisition::backoff(5), S(300));
        assert_eq!(RelayAcquisition::backoff(50), S(300));
        let mut m = RelayAcquisition::new();
        let mut now = S(0);
        for expected in [30, 60, 120] {
            m.handle(Event::ReservationFailed, now);
            let State::Backoff { until } = m.state() else {
                panic!()
            };
            assert_eq!(until - now, S(expected));
            now = until;
            m.handle_timeout(now);
        }
        let (r, a) = relay();
        m.handle(Event::Reserved { relay: r, addr: a }, now);
        m.handle(Event::RelayLost, now);
        m.handle(Event::ReservationFailed, now);
        assert_eq!(
            m.state(),
            State::Backoff { until: now + S(30) },
            "reset after success"
        );
    }

    #[test]
    fn routing_change_cuts_backoff_short() {
        let mut m = RelayAcquisition::new();
        m.handle(Event::ReservationFailed, S(0));
        drain(&mut m);
        m.handle(Event::RoutingChanged, S(1));
        assert_eq!(m.state(), State::Acquiring);
        assert_eq!(drain(&mut m), vec![Action::Acquire]);
        // In other states a routing change does nothing.
        m.handle(Event::RoutingChanged, S(2));
        assert!(drain(&mut m).is_empty());
    }

    #[test]
    fn loss_republishes_direct_only_before_reacquiring() {
        for loss in [Event::RelayLost, Event::RelayLeftClosest] {
            let mut m = RelayAcquisition::new();
            let (r, a) = relay();
            m.handle(Event::Reserved { relay: r, addr: a }, S(1));
            drain(&mut m);
            m.handle(loss, S(2));
            assert_eq!(
                drain(&mut m),
                vec![Action::Publish { relay: None }, Action::Acquire],
                "without the relay first, then look for another"
            );
            assert_eq!(m.state(), State::Acquiring);
        }
    }

    #[test]
    fn holding_polls_health_every_five_seconds() {
        let mut m = RelayAcquisition::new();
        let (r, a) = relay();
        m.handle(Event::Reserved { relay: r, addr: a }, S(0));
        drain(&mut m);
        assert_eq!(m.poll_timeout(), Some(HEALTH_POLL));
        m.handle_timeout(S(4));
        assert!(drain(&mut m).is_empty());
        m.handle_timeout(S(5));
        assert_eq!(drain(&mut m), vec![Action::CheckHealth { relay: r }]);
        assert_eq!(m.poll_timeout(), Some(S(10)));
    }

    #[test]
    fn stale_results_are_ignored() {
        let mut m = RelayAcquisition::new();
        let (r, a) = relay();
        m.handle(Event::Reserved { relay: r, addr: a }, S(0));
        drain(&mut m);
        // A late failure from an earlier attempt changes nothing.
        m.handle(Event::ReservationFailed, S(1));
        assert_eq!(m.state(), State::Holding { relay: r, addr: a });
        assert!(drain(&mut m).is_empty());
    }
}
