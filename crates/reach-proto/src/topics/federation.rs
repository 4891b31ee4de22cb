//! Configured federation links: which homes to (re)dial, and when.
//!
//! Homes find each other through the DHT's topic records; an operator can
//! also name homes to keep a federation link to whatever the DHT says (a
//! private deployment, a backbone between known relays, a cycle for
//! redundancy). This machine holds, per configured home, whether a link is
//! up, being dialed, or waiting to be redialed: a dial that fails or a link
//! that drops is retried after [`REDIAL_FIRST`], doubling to
//! [`REDIAL_MAX`]; a link that comes up resets it. It never chooses peers
//! and never dials itself: the driver asks [`StaticLinks::due`] what to
//! dial, reports [`StaticLinks::on_up`], [`StaticLinks::on_down`] and
//! [`StaticLinks::on_failed`], and wakes at [`StaticLinks::next_timeout`].
//!
//! [`IdleLinks`] decides when a link is no longer needed: a link that
//! carries no topic both homes serve for [`LINK_IDLE_GRACE`] is closed
//! (links to configured homes excepted: they are kept on purpose). The
//! driver reports what each link carries ([`IdleLinks::update`]), closes
//! what [`IdleLinks::due`] returns, and wakes at
//! [`IdleLinks::next_timeout`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::TopicId;
use crate::PeerId;

/// First redial of a configured home after a failed dial or a lost link:
/// soon enough that a restarted home is back within seconds, late enough
/// that a home that is down costs a dial every few seconds at most.
pub const REDIAL_FIRST: Duration = Duration::from_secs(5);
/// Longest wait between redials of a configured home that keeps failing
/// (the doubling stops here): a home down for hours costs one dial every
/// five minutes.
pub const REDIAL_MAX: Duration = Duration::from_secs(300);
/// Configured federation homes at most: each is a QUIC connection kept
/// open; more than this is a configuration mistake, refused at start.
pub const MAX_CONFIGURED_HOMES: usize = 64;

/// How long a federation link may carry no topic both homes serve before
/// it is closed. Long enough that a member re-subscribing (a restart) or
/// moving to another relay, which leaves a topic and takes it up again
/// within seconds, does not make two homes drop their link and dial it
/// again (a DHT lookup, a QUIC handshake, the trees regrown); short enough
/// that a home whose members left stops holding links and connections it
/// does not need within a minute. The runtime makes it configurable
/// (`TopicLimits::link_idle_grace`), tests use a short one.
pub const LINK_IDLE_GRACE: Duration = Duration::from_secs(30);

/// Homes whose link this home closed for idleness that it remembers at
/// most (see [`IdleLinks::on_closed`]); past it the oldest is forgotten
/// (at worst a stale DHT record of it is dialed once more).
pub const MAX_CLOSED_REMEMBERED: usize = 1_024;
/// How long a closed idle link is remembered: a topic record lives at most
/// this long in the runtime (its lifetime, 5 min), so an older record of
/// the other home cannot be around any more.
pub const CLOSED_REMEMBERED_MS: u64 = 300_000;

/// Where a configured home stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// To be dialed at `at` (now, at start).
    Waiting {
        /// When.
        at: Duration,
        /// Failures in a row before this wait.
        failures: u32,
    },
    /// A dial is under way.
    Dialing {
        /// Failures in a row before it.
        failures: u32,
    },
    /// The link is up.
    Up,
}

/// The configured homes of one node.
#[derive(Debug, Clone)]
pub struct StaticLinks {
    homes: BTreeMap<PeerId, LinkState>,
}

/// The wait after `failures` failures in a row (at least one):
/// [`REDIAL_FIRST`], doubling, at most [`REDIAL_MAX`].
pub fn redial_after(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    REDIAL_FIRST.saturating_mul(1u32 << exp).min(REDIAL_MAX)
}

impl StaticLinks {
    /// Every home in `homes` (duplicates and `me` dropped) is due at once.
    pub fn new(me: PeerId, homes: impl IntoIterator<Item = PeerId>) -> Self {
        StaticLinks {
            homes: homes
                .into_iter()
                .filter(|h| *h != me)
                .map(|h| {
                    (
                        h,
                        LinkState::Waiting {
                            at: Duration::ZERO,
                            failures: 0,
                        },
                    )
                })
                .collect(),
        }
    }

    /// Whether `peer` is a configured home.
    pub fn contains(&self, peer: &PeerId) -> bool {
        self.homes.contains_key(peer)
    }

    /// The configured homes and where each stands.
    pub fn states(&self) -> impl Iterator<Item = (&PeerId, &LinkState)> {
        self.homes.iter()
    }

    /// The homes to dial now; each is then [`LinkState::Dialing`] until
    /// the driver reports how it went.
    pub fn due(&mut self, now: Duration) -> Vec<PeerId> {
        let mut out = Vec::new();
        for (peer, state) in self.homes.iter_mut() {
            if let LinkState::Waiting { at, failures } = *state
                && at <= now
            {
                *state = LinkState::Dialing { failures };
                out.push(*peer);
            }
        }
        out
    }

    /// A link to `peer` is up (dialed by either side).
    pub fn on_up(&mut self, peer: &PeerId) {
        if let Some(s) = self.homes.get_mut(peer) {
            *s = LinkState::Up;
        }
    }

    /// The dial of `peer` failed.
    pub fn on_failed(&mut self, peer: &PeerId, now: Duration) {
        if let Some(s) = self.homes.get_mut(peer)
            && let LinkState::Dialing { failures } = *s
        {
            let failures = failures.saturating_add(1);
            *s = LinkState::Waiting {
                at: now + redial_after(failures),
                failures,
            };
        }
    }

    /// The link to `peer` is gone: redialed after [`REDIAL_FIRST`].
    pub fn on_down(&mut self, peer: &PeerId, now: Duration) {
        if let Some(s) = self.homes.get_mut(peer)
            && *s == LinkState::Up
        {
            *s = LinkState::Waiting {
                at: now + redial_after(1),
                failures: 1,
            };
        }
    }

    /// When [`StaticLinks::due`] has something next (`None`: every home is
    /// up or being dialed).
    pub fn next_timeout(&self) -> Option<Duration> {
        self.homes
            .values()
            .filter_map(|s| match s {
                LinkState::Waiting { at, .. } => Some(*at),
                _ => None,
            })
            .min()
    }
}

/// The federation links that carry no topic both homes serve, each with
/// when it became so; one past the grace is to be closed.
///
/// It also remembers, per home whose link it closed, when (unix ms) and
/// which topics this home served then: the other home served none of
/// them, so its DHT records of those topics created before then are stale
/// (a record lives minutes after its home left the topic), and dialing it
/// on one would only open a link that closes again after the grace, over
/// and over until the record expires ([`IdleLinks::may_dial`]).
#[derive(Debug, Clone)]
pub struct IdleLinks {
    grace: Duration,
    since: BTreeMap<PeerId, Duration>,
    closed: BTreeMap<PeerId, (u64, BTreeSet<TopicId>)>,
}

impl IdleLinks {
    /// No idle link; a link idle for `grace` is due to close.
    pub fn new(grace: Duration) -> Self {
        IdleLinks {
            grace,
            since: BTreeMap::new(),
            closed: BTreeMap::new(),
        }
    }

    /// The link to `peer` was closed for idleness at `now_ms` (unix ms)
    /// while this home served `serving`.
    pub fn on_closed(
        &mut self,
        peer: PeerId,
        now_ms: u64,
        serving: impl IntoIterator<Item = TopicId>,
    ) {
        self.closed
            .retain(|_, (at, _)| now_ms.saturating_sub(*at) < CLOSED_REMEMBERED_MS);
        if self.closed.len() >= MAX_CLOSED_REMEMBERED
            && let Some(oldest) = self
                .closed
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(p, _)| *p)
        {
            self.closed.remove(&oldest);
        }
        self.closed
            .insert(peer, (now_ms, serving.into_iter().collect()));
    }

    /// A link to `peer` is up again: nothing of it is stale any more.
    pub fn on_linked(&mut self, peer: &PeerId) {
        self.closed.remove(peer);
    }

    /// Whether to dial `peer` for `topic` on its DHT record created at
    /// `record_created_ms` (unix ms): not when the record predates an idle
    /// close of the link to it while this home served the topic (the
    /// other home did not serve it then; a newer record says it does
    /// again).
    pub fn may_dial(&self, peer: &PeerId, topic: &TopicId, record_created_ms: u64) -> bool {
        match self.closed.get(peer) {
            Some((at, topics)) => !(topics.contains(topic) && record_created_ms < *at),
            None => true,
        }
    }

    /// The link to `peer` is up and carries a topic both homes serve
    /// (`shared`) or none. `kept`: a link to a configured home, never
    /// closed for idleness (it is there on purpose, for the next topic the
    /// two homes serve; closing it would only make the configured-links
    /// schedule dial it again). Returns true when the link has just become
    /// idle (its grace starts now: the driver's next wake-up may be
    /// sooner).
    pub fn update(&mut self, peer: PeerId, shared: bool, kept: bool, now: Duration) -> bool {
        if shared || kept {
            self.since.remove(&peer);
            return false;
        }
        match self.since.entry(peer) {
            std::collections::btree_map::Entry::Occupied(_) => false,
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(now);
                true
            }
        }
    }

    /// The link to `peer` is gone.
    pub fn remove(&mut self, peer: &PeerId) {
        self.since.remove(peer);
    }

    /// Whether the link to `peer` is idle (carries no shared topic).
    pub fn is_idle(&self, peer: &PeerId) -> bool {
        self.since.contains_key(peer)
    }

    /// The links idle for the grace by `now`, to close; forgotten here.
    pub fn due(&mut self, now: Duration) -> Vec<PeerId> {
        let grace = self.grace;
        let due: Vec<PeerId> = self
            .since
            .iter()
            .filter(|(_, since)| now.saturating_sub(**since) >= grace)
            .map(|(p, _)| *p)
            .collect();
        for p in &due {
            self.since.remove(p);
        }
        due
    }

    /// When [`IdleLinks::due`] has something next (`None`: no idle link).
    pub fn next_timeout(&self) -> Option<Duration> {
        self.since.values().min().map(|s| *s + self.grace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u8) -> PeerId {
        crate::Keypair::from_secret_bytes([i; 32]).peer_id()
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn every_configured_home_but_this_one_is_dialed_at_once_and_only_once() {
        let mut l = StaticLinks::new(id(1), [id(1), id(2), id(3), id(2)]);
        assert_eq!(l.next_timeout(), Some(Duration::ZERO));
        let mut due = l.due(S(0));
        due.sort();
        let mut want = vec![id(2), id(3)];
        want.sort();
        assert_eq!(due, want);
        assert!(l.due(S(0)).is_empty(), "dialing: not again");
        assert_eq!(l.next_timeout(), None);
    }

    #[test]
    fn a_failing_home_is_redialed_at_5_10_20_s_up_to_300_s_and_reset_by_a_link() {
        let h = id(2);
        let mut l = StaticLinks::new(id(1), [h]);
        let mut now = S(0);
        let mut waits = Vec::new();
        for _ in 0..9 {
            assert_eq!(l.due(now), vec![h]);
            l.on_failed(&h, now);
            let next = l.next_timeout().unwrap();
            waits.push((next - now).as_secs());
            assert!(l.due(next - Duration::from_millis(1)).is_empty());
            now = next;
        }
        assert_eq!(waits, vec![5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(l.due(now), vec![h]);
        l.on_up(&h);
        assert_eq!(l.next_timeout(), None);
        // Lost after coming up: back to the first wait.
        l.on_down(&h, now);
        assert_eq!(l.next_timeout(), Some(now + REDIAL_FIRST));
    }

    #[test]
    fn a_link_the_other_home_dialed_counts_as_up_and_unconfigured_peers_are_ignored() {
        let h = id(2);
        let mut l = StaticLinks::new(id(1), [h]);
        l.on_up(&h);
        assert!(l.due(S(100)).is_empty());
        l.on_failed(&id(9), S(1));
        l.on_down(&id(9), S(1));
        assert!(!l.contains(&id(9)));
        assert_eq!(l.next_timeout(), None);
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn a_link_with_no_shared_topic_closes_at_the_grace_and_not_before() {
        let h = id(2);
        let mut l = IdleLinks::new(LINK_IDLE_GRACE);
        // Up, and carrying a topic: nothing to close.
        assert!(!l.update(h, true, false, S(0)));
        assert_eq!(l.next_timeout(), None);
        // The last shared topic left at 10 s.
        assert!(l.update(h, false, false, S(10)));
        assert!(l.is_idle(&h));
        // Told again (another Leave, a topic served elsewhere): the grace
        // does not start over.
        assert!(!l.update(h, false, false, S(20)));
        assert_eq!(l.next_timeout(), Some(S(10) + LINK_IDLE_GRACE));
        assert!(l.due(S(10) + LINK_IDLE_GRACE - MS(1)).is_empty());
        assert_eq!(l.due(S(10) + LINK_IDLE_GRACE), vec![h]);
        // Closed once: forgotten.
        assert!(l.due(S(100)).is_empty());
        assert_eq!(l.next_timeout(), None);
    }

    #[test]
    fn a_topic_shared_again_within_the_grace_keeps_the_link() {
        let h = id(2);
        let mut l = IdleLinks::new(LINK_IDLE_GRACE);
        l.update(h, false, false, S(0));
        // A member re-subscribed after 25 s: shared again.
        l.update(h, true, false, S(25));
        assert!(!l.is_idle(&h));
        assert!(l.due(S(60)).is_empty(), "kept");
        // Idle again later: a whole new grace from then.
        l.update(h, false, false, S(70));
        assert!(l.due(S(70) + LINK_IDLE_GRACE - MS(1)).is_empty());
        assert_eq!(l.due(S(70) + LINK_IDLE_GRACE), vec![h]);
    }

    #[test]
    fn a_link_to_a_configured_home_is_never_closed_for_idleness() {
        let (configured, found) = (id(2), id(3));
        let mut l = IdleLinks::new(LINK_IDLE_GRACE);
        assert!(!l.update(configured, false, true, S(0)));
        l.update(found, false, false, S(0));
        assert_eq!(l.due(S(3600)), vec![found]);
        assert!(!l.is_idle(&configured));
        assert_eq!(l.next_timeout(), None);
    }

    #[test]
    fn a_link_that_went_down_is_not_closed_again() {
        let (a, b) = (id(2), id(3));
        let mut l = IdleLinks::new(MS(500));
        l.update(a, false, false, S(0));
        l.update(b, false, false, MS(100));
        l.remove(&a);
        assert_eq!(l.next_timeout(), Some(MS(600)));
        assert_eq!(l.due(S(1)), vec![b]);
    }

    #[test]
    fn a_stale_record_of_a_home_whose_link_closed_idle_is_not_dialed() {
        let h = id(2);
        let (x, y) = (TopicId([1; 32]), TopicId([2; 32]));
        let mut l = IdleLinks::new(LINK_IDLE_GRACE);
        // Closed at t = 1,000,000 ms while this home served x.
        l.on_closed(h, 1_000_000, [x]);
        // A record of x from before: h had left x, the record lingers.
        assert!(!l.may_dial(&h, &x, 999_000));
        // A record of x created since: h serves x again.
        assert!(l.may_dial(&h, &x, 1_000_001));
        // A topic this home did not serve then: h may well serve it.
        assert!(l.may_dial(&h, &y, 0));
        // Linked again: forgotten.
        l.on_linked(&h);
        assert!(l.may_dial(&h, &x, 0));
        // Remembered for a record's lifetime at most.
        l.on_closed(h, 1_000_000, [x]);
        l.on_closed(id(3), 1_000_000 + CLOSED_REMEMBERED_MS, [y]);
        assert!(l.may_dial(&h, &x, 0), "forgotten with its records");
        assert!(!l.may_dial(&id(3), &y, 0));
    }
}
