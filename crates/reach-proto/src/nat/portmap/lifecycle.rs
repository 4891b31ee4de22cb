//! The life of one port mapping, sans-IO.
//!
//! A mapping is only worth publishing if it works, and only worth keeping
//! if it is kept alive: routers restart and forget their mappings, flush
//! their tables, stop answering, and some report an external address that
//! does not forward. [`Lifecycle`] is the policy for one mapping of one
//! protocol (UDP or TCP) on one router, whatever the wire protocol (PCP,
//! NAT-PMP or UPnP-IGD: the runtime encodes [`Action::SendRequest`] and
//! reports what came back):
//!
//! ```text
//!            no answer after MAX_REQUEST_SENDS / refused
//!  Requesting ───────────────────────────────────────────► Revoked
//!      │ granted: Verify(external)            ▲  RETRY_AFTER_REVOKE
//!      ▼                                      │  (or the router restarted)
//!   Mapped ◄──────────┐ granted               │    └──► Requesting
//!      │ half the     │ (new external:        │
//!      │ lease        │  Unpublish + Verify)  │ MAX_FAILED_RENEWALS failed,
//!      ▼              │                       │ or the lease ran out:
//!   Renewing ─────────┴── failed: retry at ───┘ Unpublish
//!                         half the rest
//!   any state ── shutdown ──► Deleting (lifetime 0) ──► Done
//! ```
//!
//! - **Requests** are retransmitted with doubling timeouts from
//!   [`RETRANSMIT_INITIAL`] (RFC 6886 §3.1): up to [`MAX_REQUEST_SENDS`]
//!   for the first request, [`MAX_RENEWAL_SENDS`] for a renewal and
//!   [`MAX_DELETE_SENDS`] for the deletion at shutdown.
//! - **Publishing**: a granted external address is never published on the
//!   router's word. The machine asks the runtime to [`Action::Verify`] it
//!   from outside (a helper peer's unsolicited probe) and publishes only
//!   what passed; a failed address is verified again after the next
//!   renewal, so a router that lies is never published.
//! - **Renewal** at half the lease (RFC 6886 §3.3, RFC 6887 §11.2.1); a
//!   failed renewal is retried at half the remaining lease, and
//!   [`MAX_FAILED_RENEWALS`] in a row (or the lease running out) revoke
//!   the mapping: it is unpublished, and asked for again after
//!   [`RETRY_AFTER_REVOKE`].
//! - **Router restarts**: every epoch the router reports goes through an
//!   [`EpochTracker`]; an epoch that went back, or advanced too little for
//!   the time that passed (RFC 6886 §3.6, RFC 6887 §8.5), means the router
//!   lost its mappings, and ours is requested again at once.
//! - **Shutdown** unpublishes and deletes (lifetime 0), then is done.
//!
//! Inputs are method calls with `now` (a [`Duration`] since the driver's
//! epoch); outputs are [`Action`]s polled in order with
//! [`Lifecycle::poll_action`]; [`Lifecycle::poll_timeout`] says when to
//! call [`Lifecycle::handle_timeout`].

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

/// Lifetime asked for by default: one hour, the seed's (net-mesh) choice.
/// Renewed at half-life, a restarted or flushed router is noticed within
/// 30 minutes even when it sends no announcement; shorter leases cost one
/// small packet per mapping per half-life, longer ones only delay that.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// Shortest lifetime asked for: a lifetime of 0 would delete the mapping,
/// and below 2 s the half-life renewal would fall under
/// [`MIN_RENEW_DELAY`].
pub const MIN_LIFETIME: Duration = Duration::from_secs(2);
/// First retransmission timeout of a request, doubling after each send
/// (RFC 6886 §3.1). The router is on the local link and answers in
/// milliseconds, so 250 ms loses little time to one dropped packet.
pub const RETRANSMIT_INITIAL: Duration = Duration::from_millis(250);
/// Longest wait between two sends of a request (RFC 6886 §3.1 stops after
/// the wait of 64 s that follows its ninth send).
pub const RETRANSMIT_MAX: Duration = Duration::from_secs(64);
/// Sends of the first request at most (RFC 6886 §3.1: nine, about two
/// minutes in all) before the mapping counts as refused and waits
/// [`RETRY_AFTER_REVOKE`].
pub const MAX_REQUEST_SENDS: u32 = 9;
/// Sends of one renewal at most (250 ms + 500 ms + 1 s + 2 s: a renewal
/// gives up after 3.75 s). One lost packet does not fail a renewal; a
/// router that stays silent for that long fails it, and the next try comes
/// at half the remaining lease.
pub const MAX_RENEWAL_SENDS: u32 = 4;
/// Sends of the deletion at shutdown at most (1.75 s in all): shutdown
/// must not hang on a router that went away, and a mapping left behind
/// expires with its lease anyway.
pub const MAX_DELETE_SENDS: u32 = 3;
/// Failed renewals in a row that revoke a mapping (the seed's policy): the
/// third failure comes at about 7/8 of the lease, before the router drops
/// the mapping, so the record stops naming it in time.
pub const MAX_FAILED_RENEWALS: u32 = 3;
/// Shortest wait before a renewal, whatever the lease: a router granting
/// a one-second lease does not make us send more than a packet a second.
pub const MIN_RENEW_DELAY: Duration = Duration::from_secs(1);
/// Wait before asking again for a mapping that was revoked or refused. A
/// router that stopped answering may be rebooting; every five minutes
/// costs a few small packets and gets the mapping back soon after it
/// returns (a restart announcement brings it back at once).
pub const RETRY_AFTER_REVOKE: Duration = Duration::from_secs(5 * 60);

/// How a router's epoch is checked for a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochRule {
    /// RFC 6886 §3.6: the epoch must keep pace with the client's clock,
    /// allowing the router's clock to run 1/8 slow, plus 2 s for rounding
    /// to whole seconds.
    NatPmp,
    /// RFC 6887 §8.5: the epoch may not go back more than 1 s, and the
    /// server's and client's elapsed times may differ by no more than 1/16
    /// plus 2 s either way.
    Pcp,
}

/// Tells from a server's successive epoch times whether it lost its state
/// (restarted) in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochTracker {
    rule: EpochRule,
    /// The last epoch seen and when (driver's clock).
    prev: Option<(u32, Duration)>,
}

impl EpochTracker {
    /// A tracker that has seen nothing yet.
    pub fn new(rule: EpochRule) -> Self {
        EpochTracker { rule, prev: None }
    }

    /// Records `epoch`, received at `now`; true when it shows the server
    /// lost its state since the previous one. The first epoch seen never
    /// does.
    pub fn observe(&mut self, epoch: u32, now: Duration) -> bool {
        let lost = match self.prev {
            None => false,
            Some((prev, at)) => {
                let client = now.saturating_sub(at).as_secs();
                let (epoch, prev) = (u64::from(epoch), u64::from(prev));
                match self.rule {
                    EpochRule::NatPmp => epoch + 2 < prev + client * 7 / 8,
                    EpochRule::Pcp => {
                        let server = epoch.saturating_sub(prev);
                        epoch + 1 < prev
                            || client + 2 < server - server / 16
                            || server + 2 < client - client / 16
                    }
                }
            }
        };
        self.prev = Some((epoch, now));
        lost
    }
}

/// What the router granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The external address and port (for NAT-PMP: the external-address
    /// reply's IPv4 with the mapping reply's port).
    pub external: SocketAddr,
    /// The granted lifetime in seconds (0 in a deletion's answer).
    pub lifetime_secs: u32,
    /// The router's epoch in the answer (PCP and NAT-PMP; `None` for
    /// UPnP-IGD, which has none).
    pub epoch: Option<u32>,
}

/// A mapping the router granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The external address and port.
    pub external: SocketAddr,
    /// The lifetime the router granted.
    pub lifetime: Duration,
    /// When it was granted (driver's clock).
    pub granted_at: Duration,
    /// The router's epoch in the answer, if it reports one.
    pub epoch: Option<u32>,
}

impl Lease {
    /// When the router drops the mapping unless it is renewed.
    pub fn expires_at(&self) -> Duration {
        self.granted_at + self.lifetime
    }
}

/// Where the mapping stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The first request (or the first after a revocation) is out.
    Requesting,
    /// The router granted the mapping; renewed at half the lease.
    Mapped(Lease),
    /// A renewal (or a re-map after a router restart) is out.
    Renewing {
        /// The mapping being renewed.
        lease: Lease,
        /// Renewals that failed in a row before this one.
        failed: u32,
    },
    /// No mapping: refused, or revoked after failed renewals; asked for
    /// again after [`RETRY_AFTER_REVOKE`].
    Revoked,
    /// Shutting down: the deletion (lifetime 0) is out.
    Deleting,
    /// Deleted (or given up deleting): nothing more to do.
    Done,
}

/// What the machine asks its driver to do, in the order polled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send the mapping request (a retransmission repeats it unchanged);
    /// report the answer with [`Lifecycle::granted`] or
    /// [`Lifecycle::refused`].
    SendRequest {
        /// Lifetime to ask for, in seconds; 0 deletes the mapping.
        lifetime_secs: u32,
        /// The external address to suggest (the current one, so a renewal
        /// or a re-map after a restart keeps the port); `None`: no
        /// preference.
        suggested_external: Option<SocketAddr>,
    },
    /// Check from outside that `external` reaches us (an unsolicited probe
    /// from a helper peer); report [`Lifecycle::verified`].
    Verify(SocketAddr),
    /// `external` is verified: publish it as a direct address.
    Publish(SocketAddr),
    /// Stop publishing `external`.
    Unpublish(SocketAddr),
}

/// Counters for the runtime's port-mapping stats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Renewals the router granted.
    pub renewals: u64,
    /// Renewals that failed (no answer or refused).
    pub renewal_failures: u64,
    /// Times the router lost its state (epoch reset or reported restart).
    pub remaps: u64,
    /// Mappings revoked after failed renewals or an expired lease.
    pub revocations: u64,
    /// First requests refused or never answered.
    pub request_failures: u64,
    /// External addresses that failed verification.
    pub verify_failures: u64,
}

/// Where verification of the external address stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verification {
    /// Nothing to verify (no mapping).
    None,
    /// [`Action::Verify`] is out for this address.
    Pending(SocketAddr),
    /// This address failed; verified again after the next grant.
    Failed(SocketAddr),
    /// This address passed and is published.
    Published(SocketAddr),
}

/// A request handed out and not answered yet.
#[derive(Debug, Clone, Copy)]
struct Outstanding {
    action: Action,
    /// Sends so far.
    sends: u32,
    /// Sends allowed.
    max_sends: u32,
    /// When the latest send times out.
    deadline: Duration,
}

/// The lifecycle of one mapping.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    state: State,
    requested_secs: u32,
    epochs: Option<EpochTracker>,
    request: Option<Outstanding>,
    /// When the next renewal (Mapped) or retry (Revoked) falls due.
    wake_at: Duration,
    failed_renewals: u32,
    verification: Verification,
    stats: Stats,
    actions: VecDeque<Action>,
    /// Renew at least this often, whatever the lease (see
    /// [`Lifecycle::with_max_renew_interval`]).
    max_renew_interval: Option<Duration>,
}

impl Lifecycle {
    /// Starts requesting a mapping at `now` for `lifetime` (at least
    /// [`MIN_LIFETIME`], at most `u32::MAX` seconds). `epoch_rule`: how to
    /// read the router's epochs (`None` for UPnP-IGD).
    pub fn new(now: Duration, lifetime: Duration, epoch_rule: Option<EpochRule>) -> Self {
        let secs = lifetime.max(MIN_LIFETIME).as_secs();
        let mut m = Lifecycle {
            state: State::Requesting,
            requested_secs: u32::try_from(secs).unwrap_or(u32::MAX),
            epochs: epoch_rule.map(EpochTracker::new),
            request: None,
            wake_at: now,
            failed_renewals: 0,
            verification: Verification::None,
            stats: Stats::default(),
            actions: VecDeque::new(),
            max_renew_interval: None,
        };
        m.send(now, None, MAX_REQUEST_SENDS);
        m
    }

    /// Renews at least every `interval`, however long the lease. A router
    /// that flushed its table (or restarted without announcing it) tells
    /// no client; asking again is the only way a client finds out, and
    /// the renewal re-makes the mapping. So this bounds how long a
    /// vanished mapping stays unnoticed, at one small request per
    /// interval.
    pub fn with_max_renew_interval(mut self, interval: Duration) -> Self {
        self.max_renew_interval = Some(interval.max(MIN_RENEW_DELAY));
        self
    }

    /// The wait before the next renewal, `natural` by the lease.
    fn renew_in(&self, natural: Duration) -> Duration {
        let natural = natural.max(MIN_RENEW_DELAY);
        self.max_renew_interval.map_or(natural, |m| natural.min(m))
    }

    /// Where the mapping stands.
    pub fn state(&self) -> State {
        self.state
    }

    /// The published (verified) external address, if any.
    pub fn published(&self) -> Option<SocketAddr> {
        match self.verification {
            Verification::Published(a) => Some(a),
            _ => None,
        }
    }

    /// Counters since the start.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The next thing to do, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When to call [`Self::handle_timeout`] next; `None` once done.
    pub fn poll_timeout(&self) -> Option<Duration> {
        match self.state {
            State::Done => None,
            State::Requesting | State::Renewing { .. } | State::Deleting => {
                self.request.map(|r| r.deadline)
            }
            State::Mapped(_) | State::Revoked => Some(self.wake_at),
        }
    }

    /// Time passed: retransmit, give up on a request, renew, or retry
    /// after a revocation, whatever is due at `now`.
    pub fn handle_timeout(&mut self, now: Duration) {
        match self.state {
            State::Done => {}
            State::Requesting | State::Renewing { .. } | State::Deleting => {
                let Some(mut r) = self.request else { return };
                if now < r.deadline {
                    return;
                }
                if r.sends < r.max_sends {
                    r.sends += 1;
                    r.deadline = now + backoff(r.sends);
                    self.request = Some(r);
                    self.actions.push_back(r.action);
                } else {
                    self.request_failed(now);
                }
            }
            State::Mapped(lease) => {
                if now >= self.wake_at {
                    self.renew(now, lease);
                }
            }
            State::Revoked => {
                if now >= self.wake_at {
                    self.state = State::Requesting;
                    self.send(now, None, MAX_REQUEST_SENDS);
                }
            }
        }
    }

    /// The router answered the outstanding request with success.
    pub fn granted(&mut self, now: Duration, grant: Grant) {
        match self.state {
            State::Deleting => {
                self.finish();
                return;
            }
            State::Requesting | State::Renewing { .. } => {}
            // A late duplicate of an answer already taken.
            State::Mapped(_) | State::Revoked | State::Done => return,
        }
        if grant.lifetime_secs == 0 {
            // A mapping for no time is no mapping.
            self.request_failed(now);
            return;
        }
        let restarted = match (&mut self.epochs, grant.epoch) {
            (Some(t), Some(e)) => t.observe(e, now),
            _ => false,
        };
        if let State::Renewing { .. } = self.state {
            self.stats.renewals += 1;
            if restarted {
                // The router lost the mapping; this renewal re-made it.
                self.stats.remaps += 1;
            }
        }
        self.request = None;
        self.failed_renewals = 0;
        let lifetime = Duration::from_secs(u64::from(grant.lifetime_secs));
        let lease = Lease {
            external: grant.external,
            lifetime,
            granted_at: now,
            epoch: grant.epoch,
        };
        self.state = State::Mapped(lease);
        // A router granting more than asked is renewed as if it had
        // granted what was asked: that is the pace we chose.
        let asked = Duration::from_secs(u64::from(self.requested_secs));
        self.wake_at = now + self.renew_in(lifetime.min(asked) / 2);
        match self.verification {
            Verification::Published(a) | Verification::Pending(a) if a == grant.external => {}
            old => {
                if let Verification::Published(a) = old {
                    self.actions.push_back(Action::Unpublish(a));
                }
                self.verification = Verification::Pending(grant.external);
                self.actions.push_back(Action::Verify(grant.external));
            }
        }
    }

    /// The router answered the outstanding request with an error (or an
    /// answer that grants nothing).
    pub fn refused(&mut self, now: Duration) {
        match self.state {
            State::Requesting | State::Renewing { .. } | State::Deleting => {
                self.request_failed(now)
            }
            State::Mapped(_) | State::Revoked | State::Done => {}
        }
    }

    /// The router reported `epoch` in a message that is not the answer to
    /// our request (an ANNOUNCE answer or announcement, a NAT-PMP
    /// external-address answer, another mapping's answer): if it shows a
    /// restart, the mapping is requested again at once.
    pub fn observe_epoch(&mut self, now: Duration, epoch: u32) {
        let restarted = self.epochs.as_mut().is_some_and(|t| t.observe(epoch, now));
        if restarted {
            self.server_lost_state(now);
        }
    }

    /// The router lost its state (an epoch reset, a UPnP router answering
    /// afresh, a restart announcement): request the mapping again now.
    pub fn server_lost_state(&mut self, now: Duration) {
        match self.state {
            State::Mapped(lease) => {
                self.stats.remaps += 1;
                self.renew(now, lease);
            }
            State::Revoked => {
                self.state = State::Requesting;
                self.send(now, None, MAX_REQUEST_SENDS);
            }
            // A request is out already and re-makes the mapping.
            State::Requesting | State::Renewing { .. } | State::Deleting | State::Done => {}
        }
    }

    /// The outside check of `external` ended: `reachable` if the probe
    /// arrived. Publishes a reachable address; a result for an address
    /// that is no longer ours is ignored.
    pub fn verified(&mut self, _now: Duration, external: SocketAddr, reachable: bool) {
        if self.verification != Verification::Pending(external) {
            return;
        }
        if !matches!(self.state, State::Mapped(_) | State::Renewing { .. }) {
            return;
        }
        if reachable {
            self.verification = Verification::Published(external);
            self.actions.push_back(Action::Publish(external));
        } else {
            self.verification = Verification::Failed(external);
            self.stats.verify_failures += 1;
        }
    }

    /// Clean shutdown: unpublish, then delete the mapping (lifetime 0);
    /// done when the router answers or after [`MAX_DELETE_SENDS`].
    pub fn shutdown(&mut self, now: Duration) {
        if matches!(self.state, State::Deleting | State::Done) {
            return;
        }
        self.unpublish();
        self.state = State::Deleting;
        self.send(now, Some(0), MAX_DELETE_SENDS);
    }

    /// Whether the machine is finished (after shutdown).
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Hands out a request and arms its timeout. `lifetime_secs`: `None`
    /// for the requested lifetime.
    fn send(&mut self, now: Duration, lifetime_secs: Option<u32>, max_sends: u32) {
        let suggested_external = match self.state {
            State::Renewing { lease, .. } => Some(lease.external),
            _ => None,
        };
        let action = Action::SendRequest {
            lifetime_secs: lifetime_secs.unwrap_or(self.requested_secs),
            suggested_external,
        };
        self.request = Some(Outstanding {
            action,
            sends: 1,
            max_sends,
            deadline: now + backoff(1),
        });
        self.actions.push_back(action);
    }

    fn renew(&mut self, now: Duration, lease: Lease) {
        self.state = State::Renewing {
            lease,
            failed: self.failed_renewals,
        };
        self.send(now, None, MAX_RENEWAL_SENDS);
    }

    /// The outstanding request was refused or never answered.
    fn request_failed(&mut self, now: Duration) {
        self.request = None;
        match self.state {
            State::Requesting => {
                self.stats.request_failures += 1;
                self.revoke(now);
            }
            State::Renewing { lease, .. } => {
                self.stats.renewal_failures += 1;
                self.failed_renewals += 1;
                let expires = lease.expires_at();
                if self.failed_renewals >= MAX_FAILED_RENEWALS || now >= expires {
                    self.stats.revocations += 1;
                    self.revoke(now);
                } else {
                    self.state = State::Mapped(lease);
                    self.wake_at = now + self.renew_in((expires - now) / 2);
                }
            }
            State::Deleting => self.finish(),
            State::Mapped(_) | State::Revoked | State::Done => {}
        }
    }

    fn revoke(&mut self, now: Duration) {
        self.unpublish();
        self.failed_renewals = 0;
        self.state = State::Revoked;
        self.wake_at = now + RETRY_AFTER_REVOKE;
    }

    fn unpublish(&mut self) {
        if let Verification::Published(a) = self.verification {
            self.actions.push_back(Action::Unpublish(a));
        }
        self.verification = Verification::None;
    }

    fn finish(&mut self) {
        self.request = None;
        self.state = State::Done;
    }
}

/// The wait after send number `sends` (1-based): doubling from
/// [`RETRANSMIT_INITIAL`], at most [`RETRANSMIT_MAX`].
fn backoff(sends: u32) -> Duration {
    let doublings = sends.saturating_sub(1).min(16);
    (RETRANSMIT_INITIAL * (1u32 << doublings)).min(RETRANSMIT_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u32 = 3600;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn ext(port: u16) -> SocketAddr {
        SocketAddr::from(([203, 0, 113, 7], port))
    }

    fn actions(m: &mut Lifecycle) -> Vec<Action> {
        std::iter::from_fn(|| m.poll_action()).collect()
    }

    fn grant(port: u16, lifetime_secs: u32, epoch: u32) -> Grant {
        Grant {
            external: ext(port),
            lifetime_secs,
            epoch: Some(epoch),
        }
    }

    /// A mapping granted at `t` with epoch `epoch`, verified and published.
    fn published(t: Duration, epoch: u32) -> Lifecycle {
        let mut m = Lifecycle::new(t, secs(u64::from(HOUR)), Some(EpochRule::Pcp));
        assert_eq!(
            actions(&mut m),
            vec![Action::SendRequest {
                lifetime_secs: HOUR,
                suggested_external: None
            }]
        );
        m.granted(t, grant(4433, HOUR, epoch));
        assert_eq!(actions(&mut m), vec![Action::Verify(ext(4433))]);
        assert_eq!(m.published(), None, "not before verification");
        m.verified(t, ext(4433), true);
        assert_eq!(actions(&mut m), vec![Action::Publish(ext(4433))]);
        assert_eq!(m.published(), Some(ext(4433)));
        m
    }

    fn renewal_request() -> Action {
        Action::SendRequest {
            lifetime_secs: HOUR,
            suggested_external: Some(ext(4433)),
        }
    }

    #[test]
    fn renews_at_half_the_lease() {
        let t0 = secs(10);
        let mut m = published(t0, 100);
        let half = t0 + secs(u64::from(HOUR) / 2);
        assert_eq!(m.poll_timeout(), Some(half));
        m.handle_timeout(half - Duration::from_millis(1));
        assert!(actions(&mut m).is_empty(), "not early");
        m.handle_timeout(half);
        assert_eq!(actions(&mut m), vec![renewal_request()]);
        assert!(matches!(m.state(), State::Renewing { failed: 0, .. }));
        m.granted(half, grant(4433, HOUR, 100 + HOUR / 2));
        assert!(actions(&mut m).is_empty(), "same address stays published");
        assert_eq!(m.published(), Some(ext(4433)));
        assert_eq!(m.stats().renewals, 1);
        assert_eq!(m.stats().remaps, 0);
        assert_eq!(m.poll_timeout(), Some(half + secs(u64::from(HOUR) / 2)));
        // A router granting a day is still renewed at half of what we asked.
        let later = half + secs(u64::from(HOUR) / 2);
        m.handle_timeout(later);
        actions(&mut m);
        m.granted(later, grant(4433, 86400, 100 + HOUR));
        assert_eq!(m.poll_timeout(), Some(later + secs(u64::from(HOUR) / 2)));
        // And a one-second lease does not make it spin.
        let next = later + secs(u64::from(HOUR) / 2);
        m.handle_timeout(next);
        actions(&mut m);
        m.granted(next, grant(4433, 1, 100 + HOUR + HOUR / 2));
        assert_eq!(m.poll_timeout(), Some(next + MIN_RENEW_DELAY));
    }

    #[test]
    fn a_renew_interval_cap_renews_long_leases_early_and_remakes_a_flushed_mapping() {
        let interval = secs(30);
        let mut m = Lifecycle::new(Duration::ZERO, DEFAULT_LIFETIME, Some(EpochRule::Pcp))
            .with_max_renew_interval(interval);
        actions(&mut m);
        m.granted(Duration::ZERO, grant(4433, HOUR, 10));
        assert_eq!(m.poll_timeout(), Some(interval), "30 s, not half an hour");
        m.handle_timeout(interval);
        assert_eq!(
            actions(&mut m),
            vec![
                Action::Verify(ext(4433)),
                Action::SendRequest {
                    lifetime_secs: HOUR,
                    suggested_external: Some(ext(4433)),
                }
            ]
        );
        // The router had flushed its table; the renewal made the mapping
        // again and the lease starts over.
        m.granted(interval, grant(4433, HOUR, 40));
        assert_eq!(m.stats().renewals, 1);
        assert_eq!(m.poll_timeout(), Some(interval * 2));
        // A lease shorter than twice the cap is renewed at its half.
        m.handle_timeout(interval * 2);
        actions(&mut m);
        m.granted(interval * 2, grant(4433, 20, 70));
        assert_eq!(m.poll_timeout(), Some(interval * 2 + secs(10)));
    }

    #[test]
    fn first_request_backs_off_then_waits_and_retries() {
        let mut m = Lifecycle::new(Duration::ZERO, DEFAULT_LIFETIME, Some(EpochRule::NatPmp));
        let first = actions(&mut m);
        assert_eq!(first.len(), 1);
        let mut now = Duration::ZERO;
        let mut waits = Vec::new();
        for _ in 1..MAX_REQUEST_SENDS {
            let deadline = m.poll_timeout().unwrap();
            waits.push(deadline - now);
            now = deadline;
            m.handle_timeout(now);
            assert_eq!(actions(&mut m), first, "a retransmission repeats it");
        }
        // 250 ms doubling: 0.25, 0.5, 1 … 32 s between the nine sends.
        assert_eq!(waits[0], RETRANSMIT_INITIAL);
        assert_eq!(waits[7], secs(32));
        assert!(waits.windows(2).all(|w| w[1] == 2 * w[0]));
        // After the last send's 64 s, it gives up and waits.
        let deadline = m.poll_timeout().unwrap();
        assert_eq!(deadline - now, secs(64));
        m.handle_timeout(deadline);
        assert!(actions(&mut m).is_empty());
        assert_eq!(m.state(), State::Revoked);
        assert_eq!(m.stats().request_failures, 1);
        assert_eq!(m.poll_timeout(), Some(deadline + RETRY_AFTER_REVOKE));
        m.handle_timeout(deadline + RETRY_AFTER_REVOKE);
        assert_eq!(actions(&mut m), first, "asked again");
        assert_eq!(m.state(), State::Requesting);
    }

    #[test]
    fn a_refused_request_waits_before_asking_again() {
        let mut m = Lifecycle::new(Duration::ZERO, DEFAULT_LIFETIME, None);
        actions(&mut m);
        m.refused(secs(1));
        assert_eq!(m.state(), State::Revoked);
        assert_eq!(m.poll_timeout(), Some(secs(1) + RETRY_AFTER_REVOKE));
        // A grant for no time is refused too.
        let mut m = Lifecycle::new(Duration::ZERO, DEFAULT_LIFETIME, None);
        actions(&mut m);
        m.granted(secs(1), grant(4433, 0, 0));
        assert_eq!(m.state(), State::Revoked);
        assert!(actions(&mut m).is_empty(), "nothing to verify");
    }

    #[test]
    fn epoch_reset_remaps_at_once() {
        let mut m = published(Duration::ZERO, 1000);
        // An epoch that kept pace: nothing happens.
        m.observe_epoch(secs(60), 1060);
        assert!(actions(&mut m).is_empty());
        // The router restarted: its epoch went back. Re-map now, not at
        // half-life, suggesting the port we had.
        m.observe_epoch(secs(120), 5);
        assert_eq!(actions(&mut m), vec![renewal_request()]);
        assert_eq!(m.stats().remaps, 1);
        // It came back with another port: the old one is unpublished and
        // the new one verified before it is published.
        m.granted(secs(120), grant(5000, HOUR, 5));
        assert_eq!(
            actions(&mut m),
            vec![Action::Unpublish(ext(4433)), Action::Verify(ext(5000))]
        );
        assert_eq!(m.published(), None);
        m.verified(secs(121), ext(5000), true);
        assert_eq!(actions(&mut m), vec![Action::Publish(ext(5000))]);
    }

    #[test]
    fn epoch_reset_seen_in_a_renewal_counts_as_a_remap() {
        let mut m = published(Duration::ZERO, 1000);
        let half = secs(u64::from(HOUR) / 2);
        m.handle_timeout(half);
        actions(&mut m);
        // The router restarted 30 s ago (epoch 30 after 1000); this renewal
        // re-made the same mapping, which stays published.
        m.granted(half, grant(4433, HOUR, 30));
        assert_eq!(m.stats().remaps, 1);
        assert_eq!(m.published(), Some(ext(4433)));
    }

    #[test]
    fn epoch_rules() {
        for rule in [EpochRule::Pcp, EpochRule::NatPmp] {
            let mut t = EpochTracker::new(rule);
            assert!(!t.observe(500, secs(0)), "{rule:?}: first");
            assert!(!t.observe(1500, secs(1000)), "{rule:?}: in step");
            assert!(!t.observe(1499, secs(1000)), "{rule:?}: 1 s back");
            assert!(t.observe(10, secs(1010)), "{rule:?}: went back");
            // Restarted long ago: the epoch is ahead of the previous one
            // but far behind the time that passed.
            assert!(!t.observe(100, secs(1100)), "{rule:?}: in step again");
            assert!(t.observe(600, secs(3100)), "{rule:?}: advanced too little");
        }
        // PCP also catches a server clock running far ahead.
        let mut t = EpochTracker::new(EpochRule::Pcp);
        t.observe(0, secs(0));
        assert!(t.observe(2000, secs(1000)));
        // A clock 5 % slow passes both rules.
        for rule in [EpochRule::Pcp, EpochRule::NatPmp] {
            let mut t = EpochTracker::new(rule);
            t.observe(0, secs(0));
            assert!(!t.observe(950, secs(1000)), "{rule:?}");
        }
    }

    #[test]
    fn three_failed_renewals_revoke_before_the_lease_runs_out() {
        let mut m = published(Duration::ZERO, 1000);
        let expires = secs(u64::from(HOUR));
        for failure in 1..=MAX_FAILED_RENEWALS {
            let renew_at = m.poll_timeout().unwrap();
            m.handle_timeout(renew_at);
            assert_eq!(actions(&mut m), vec![renewal_request()]);
            // The router stays silent through every retransmission.
            for _ in 0..MAX_RENEWAL_SENDS {
                let deadline = m.poll_timeout().unwrap();
                m.handle_timeout(deadline);
            }
            assert_eq!(m.stats().renewal_failures, u64::from(failure));
            let acts = actions(&mut m);
            if failure < MAX_FAILED_RENEWALS {
                assert_eq!(acts, vec![renewal_request(); 3], "retransmissions");
                assert_eq!(m.published(), Some(ext(4433)), "still published");
                let next = m.poll_timeout().unwrap();
                assert!(next < expires, "retried within the lease");
            } else {
                assert_eq!(acts.last(), Some(&Action::Unpublish(ext(4433))));
                assert_eq!(m.state(), State::Revoked);
                assert_eq!(m.published(), None);
                assert_eq!(m.stats().revocations, 1);
            }
        }
        let revoked_at = m.poll_timeout().unwrap() - RETRY_AFTER_REVOKE;
        assert!(revoked_at < expires, "revoked before the router drops it");
    }

    #[test]
    fn a_success_between_failures_resets_the_count() {
        let mut m = published(Duration::ZERO, 1000);
        let fail_once = |m: &mut Lifecycle| {
            let at = m.poll_timeout().unwrap();
            m.handle_timeout(at);
            m.refused(at);
        };
        fail_once(&mut m);
        fail_once(&mut m);
        let at = m.poll_timeout().unwrap();
        m.handle_timeout(at);
        m.granted(at, grant(4433, HOUR, 1000 + at.as_secs() as u32));
        fail_once(&mut m);
        fail_once(&mut m);
        assert!(matches!(m.state(), State::Mapped(_)));
        assert_eq!(m.published(), Some(ext(4433)));
    }

    #[test]
    fn a_lying_router_is_never_published() {
        let mut m = Lifecycle::new(Duration::ZERO, secs(u64::from(HOUR)), Some(EpochRule::Pcp));
        actions(&mut m);
        m.granted(Duration::ZERO, grant(4433, HOUR, 1));
        assert_eq!(actions(&mut m), vec![Action::Verify(ext(4433))]);
        // A result for an address we did not ask about changes nothing.
        m.verified(secs(1), ext(9999), true);
        assert!(actions(&mut m).is_empty());
        m.verified(secs(1), ext(4433), false);
        assert!(actions(&mut m).is_empty());
        assert_eq!(m.published(), None);
        // Each renewal checks again; the router keeps lying.
        for _ in 0..3 {
            let at = m.poll_timeout().unwrap();
            m.handle_timeout(at);
            m.granted(at, grant(4433, HOUR, 1 + at.as_secs() as u32));
            let acts = actions(&mut m);
            assert!(acts.contains(&Action::Verify(ext(4433))));
            assert!(!acts.iter().any(|a| matches!(a, Action::Publish(_))));
            m.verified(at, ext(4433), false);
            assert!(actions(&mut m).is_empty());
        }
        assert_eq!(m.published(), None);
        assert_eq!(m.stats().verify_failures, 4);
    }

    #[test]
    fn shutdown_unpublishes_and_deletes() {
        let mut m = published(Duration::ZERO, 1000);
        m.shutdown(secs(5));
        assert_eq!(
            actions(&mut m),
            vec![
                Action::Unpublish(ext(4433)),
                Action::SendRequest {
                    lifetime_secs: 0,
                    suggested_external: None
                }
            ]
        );
        assert_eq!(m.state(), State::Deleting);
        // NAT-PMP answers a deletion with lifetime 0.
        m.granted(secs(5), grant(0, 0, 1005));
        assert!(m.is_done());
        assert_eq!(m.poll_timeout(), None);
        m.shutdown(secs(6));
        assert!(actions(&mut m).is_empty(), "done is done");
    }

    #[test]
    fn shutdown_does_not_hang_on_a_silent_router() {
        let mut m = published(Duration::ZERO, 1000);
        m.shutdown(secs(5));
        actions(&mut m);
        let mut steps = 0;
        while let Some(t) = m.poll_timeout() {
            m.handle_timeout(t);
            steps += 1;
            assert!(steps <= MAX_DELETE_SENDS, "bounded");
        }
        assert!(m.is_done());
        let deletes = actions(&mut m);
        assert_eq!(deletes.len() as u32, MAX_DELETE_SENDS - 1, "retransmitted");
    }

    #[test]
    fn late_answers_are_ignored() {
        let mut m = published(Duration::ZERO, 1000);
        m.granted(secs(1), grant(6000, HOUR, 1001));
        m.refused(secs(1));
        assert!(actions(&mut m).is_empty());
        assert_eq!(m.published(), Some(ext(4433)));
        assert!(matches!(m.state(), State::Mapped(_)));
    }

    #[test]
    fn tiny_lifetimes_are_raised_so_zero_never_deletes() {
        let mut m = Lifecycle::new(Duration::ZERO, Duration::ZERO, None);
        assert_eq!(
            actions(&mut m),
            vec![Action::SendRequest {
                lifetime_secs: MIN_LIFETIME.as_secs() as u32,
                suggested_external: None
            }]
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// One input, as a router, a verifier and the clock may deliver
        /// them, in any order.
        #[derive(Debug, Clone)]
        enum Event {
            /// Advance to the next timeout and handle it.
            Timeout,
            /// Let some seconds pass and handle a (maybe early) timeout.
            Wait(u16),
            Granted {
                port: u16,
                lifetime_secs: u32,
                epoch: u32,
            },
            Refused,
            Verified {
                port: u16,
                reachable: bool,
            },
            Epoch(u32),
            LostState,
        }

        fn event() -> impl Strategy<Value = Event> {
            let port = prop_oneof![Just(4433u16), Just(5000u16)];
            let lifetime = prop_oneof![Just(0u32), Just(1), Just(60), Just(3600)];
            prop_oneof![
                3 => Just(Event::Timeout),
                1 => any::<u16>().prop_map(Event::Wait),
                2 => (port.clone(), lifetime, 0u32..5000).prop_map(|(port, lifetime_secs, epoch)| {
                    Event::Granted { port, lifetime_secs, epoch }
                }),
                1 => Just(Event::Refused),
                2 => (port, any::<bool>())
                    .prop_map(|(port, reachable)| Event::Verified { port, reachable }),
                1 => (0u32..5000).prop_map(Event::Epoch),
                1 => Just(Event::LostState),
            ]
        }

        proptest! {
            /// Whatever happens: only a verified address is published, at
            /// most one at a time, every Unpublish names what was
            /// published, time always moves on, nothing deletes before
            /// shutdown, and shutdown ends in bounded steps with nothing
            /// published.
            #[test]
            fn invariants_hold_under_any_inputs(
                events in proptest::collection::vec(event(), 0..120)
            ) {
                let mut now = Duration::ZERO;
                let mut m = Lifecycle::new(now, DEFAULT_LIFETIME, Some(EpochRule::Pcp));
                let mut published: Option<SocketAddr> = None;
                let mut check = |m: &mut Lifecycle, verified_ok: Option<SocketAddr>,
                                 shutting_down: bool|
                 -> Result<(), TestCaseError> {
                    for a in std::iter::from_fn(|| m.poll_action()) {
                        match a {
                            Action::Publish(x) => {
                                prop_assert_eq!(Some(x), verified_ok, "published unverified");
                                prop_assert_eq!(published, None, "two published");
                                published = Some(x);
                            }
                            Action::Unpublish(x) => {
                                prop_assert_eq!(published, Some(x));
                                published = None;
                            }
                            Action::SendRequest { lifetime_secs, .. } => {
                                prop_assert_eq!(lifetime_secs == 0, shutting_down);
                            }
                            Action::Verify(_) => {}
                        }
                    }
                    prop_assert_eq!(m.published(), published);
                    Ok(())
                };
                check(&mut m, None, false)?;
                for e in events {
                    let mut verified_ok = None;
                    match e {
                        Event::Timeout => {
                            if let Some(t) = m.poll_timeout() {
                                now = now.max(t);
                                m.handle_timeout(now);
                                if let Some(next) = m.poll_timeout() {
                                    prop_assert!(next > now, "no progress at {now:?}");
                                }
                            }
                        }
                        Event::Wait(s) => {
                            now += Duration::from_secs(u64::from(s));
                            m.handle_timeout(now);
                        }
                        Event::Granted { port, lifetime_secs, epoch } => m.granted(
                            now,
                            Grant { external: ext(port), lifetime_secs, epoch: Some(epoch) },
                        ),
                        Event::Refused => m.refused(now),
                        Event::Verified { port, reachable } => {
                            m.verified(now, ext(port), reachable);
                            if reachable {
                                verified_ok = Some(ext(port));
                            }
                        }
                        Event::Epoch(e) => m.observe_epoch(now, e),
                        Event::LostState => m.server_lost_state(now),
                    }
                    check(&mut m, verified_ok, false)?;
                }
                m.shutdown(now);
                check(&mut m, None, true)?;
                prop_assert_eq!(m.published(), None, "shutdown unpublishes");
                let mut steps = 0;
                while let Some(t) = m.poll_timeout() {
                    now = now.max(t);
                    m.handle_timeout(now);
                    check(&mut m, None, true)?;
                    steps += 1;
                    prop_assert!(steps <= MAX_DELETE_SENDS);
                }
                prop_assert!(m.is_done());
            }
        }
    }
}
