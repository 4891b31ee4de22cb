//! Joining the DHT and staying in it: the schedule, sans-IO.
//!
//! Two machines, both driven by the runtime (`reach::dht::join`) and by the
//! simulator (`reach-sim`'s lookup scenario):
//!
//! - [`JoinAttempt`]: one join. Contact the bootstrap nodes and look up our
//!   own key; if someone answered, refresh every bucket the table has,
//!   [`JOIN_PARALLEL_REFRESHES`] lookups at a time.
//! - [`Maintenance`]: the life of a node in the network. Join, retrying
//!   with backoff while nobody answers; then every [`MAINTENANCE_TICK`]
//!   refresh the buckets nobody looked up for [`REFRESH_INTERVAL`], at most
//!   [`MAX_REFRESHES_PER_TICK`] of them, republish the endpoint record every
//!   [`REPUBLISH_INTERVAL`] (or when our addresses changed), expire stored
//!   records and save the peer cache; rejoin when the table lost everyone.
//!
//! ```text
//!           join failed: retry in 1 s, 2 s, 4 s … ≤ MAINTENANCE_TICK
//!   Joining ◄───────────────────────────────────► Backoff
//!      │ joined
//!      ▼        tick: refresh / republish / expire / save
//!   Joined ─────────────────────────────────────────► Joined
//!      │ tick finds no live contact: Join (a failed rejoin waits a tick)
//! ```
//!
//! The machines never do I/O and read no clock: inputs are method calls with
//! `now` (a [`Duration`] since the driver's epoch), outputs are actions the
//! driver polls and carries out in order, and [`Maintenance::poll_timeout`]
//! says when to call [`Maintenance::handle_timeout`] next.

use std::collections::VecDeque;
use std::time::Duration;

use super::routing::RoutingTable;

/// Lifetime of our endpoint record.
pub const ENDPOINT_TTL: Duration = Duration::from_secs(3600);
/// How often the endpoint record is republished: three times per lifetime,
/// so two lost republishes still leave it alive.
pub const REPUBLISH_INTERVAL: Duration = Duration::from_secs(20 * 60);
/// A bucket with no lookup for this long is refreshed with a random one.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(10 * 60);
/// The maintenance loop wakes this often.
pub const MAINTENANCE_TICK: Duration = Duration::from_secs(30);
/// Bucket refreshes per maintenance tick at most, to spread the load.
pub const MAX_REFRESHES_PER_TICK: usize = 4;
/// First wait before retrying a join nobody answered; doubles up to
/// [`MAINTENANCE_TICK`].
pub const JOIN_RETRY_INITIAL: Duration = Duration::from_secs(1);
/// Contacts a join dials directly, as it dials bootstrap addresses, when
/// none in the routing table has answered in this run (a restart from the
/// peer cache, or every contact lost): the most recently seen first. Enough
/// that one live node among a stale cache is likely among them; few enough
/// that a restart sends a small burst.
pub const JOIN_CACHED_DIALS: usize = 16;
/// Lookups run at once while joining (one per bucket to fill).
pub const JOIN_PARALLEL_REFRESHES: usize = 8;
/// Bucket refreshes a join runs at most (buckets `0..` in order), so a node
/// that happens to share a very long prefix with a neighbour does not run
/// hundreds of lookups. `log2(nodes) + 3` stays below it up to millions of
/// nodes.
pub const MAX_JOIN_REFRESHES: usize = 24;

/// What a [`JoinAttempt`] asks its driver to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinAction {
    /// Contact the bootstrap nodes, then look up our own key; report
    /// [`JoinAttempt::self_lookup_done`].
    Bootstrap,
    /// Look up a random key in bucket `bucket` (a key sharing `bucket`
    /// leading bits with ours, [`super::Key::random_in_bucket`]); report
    /// [`JoinAttempt::refresh_done`].
    Refresh {
        /// The bucket's index (the shared prefix length).
        bucket: usize,
    },
}

/// How a join attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinOutcome {
    /// Someone answered (or there was nobody to ask) and every bucket was
    /// refreshed: publish our endpoint record, we are in.
    Joined,
    /// Nobody answered: not joined; [`Maintenance`] retries.
    NobodyAnswered,
}

/// One attempt to join: bootstrap and self-lookup, then one lookup per
/// bucket, at most [`JOIN_PARALLEL_REFRESHES`] at once.
#[derive(Debug, Clone)]
pub struct JoinAttempt {
    /// Buckets still to refresh, in order.
    queued: VecDeque<usize>,
    /// Refreshes handed out and not reported done.
    running: usize,
    bootstrapped: bool,
    outcome: Option<JoinOutcome>,
    actions: VecDeque<JoinAction>,
}

impl Default for JoinAttempt {
    fn default() -> Self {
        Self::new()
    }
}

impl JoinAttempt {
    /// Starts by asking the driver to bootstrap.
    pub fn new() -> Self {
        JoinAttempt {
            queued: VecDeque::new(),
            running: 0,
            bootstrapped: false,
            outcome: None,
            actions: VecDeque::from([JoinAction::Bootstrap]),
        }
    }

    /// The bootstrap and self-lookup finished. `answered`: someone answered,
    /// or there was nobody to ask (the first node of a network). `table` is
    /// the routing table as the self-lookup left it: it says which buckets
    /// exist to refresh.
    pub fn self_lookup_done(&mut self, answered: bool, table: &RoutingTable) {
        if self.bootstrapped || self.outcome.is_some() {
            return;
        }
        self.bootstrapped = true;
        if !answered {
            self.outcome = Some(JoinOutcome::NobodyAnswered);
            return;
        }
        // Every bucket the self-lookup left us (the region past the deepest
        // is the one the self-lookup itself searched).
        self.queued = (0..table.bucket_count()).take(MAX_JOIN_REFRESHES).collect();
        self.launch();
    }

    /// One of the refresh lookups handed out finished (whatever it found).
    pub fn refresh_done(&mut self) {
        if self.running == 0 {
            return;
        }
        self.running -= 1;
        self.launch();
    }

    fn launch(&mut self) {
        while self.running < JOIN_PARALLEL_REFRESHES {
            let Some(bucket) = self.queued.pop_front() else {
                break;
            };
            self.running += 1;
            self.actions.push_back(JoinAction::Refresh { bucket });
        }
        if self.running == 0 && self.queued.is_empty() {
            self.outcome = Some(JoinOutcome::Joined);
        }
    }

    /// The next thing to do, in order.
    pub fn poll_action(&mut self) -> Option<JoinAction> {
        self.actions.pop_front()
    }

    /// How the attempt ended, once it has.
    pub fn outcome(&self) -> Option<JoinOutcome> {
        self.outcome
    }
}

/// What [`Maintenance`] asks its driver to do, in the order polled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Run one [`JoinAttempt`] (publishing our endpoint record when it
    /// joins); report [`Maintenance::join_done`].
    Join,
    /// Look up a random key in bucket `bucket`, which nobody looked up for
    /// [`REFRESH_INTERVAL`] (the lookup marks it refreshed in the table).
    Refresh {
        /// The bucket's index (the shared prefix length).
        bucket: usize,
    },
    /// Publish our endpoint record; report [`Maintenance::published`].
    Republish,
    /// Drop stored records past their expiry.
    ExpireRecords,
    /// Save the routing table to the peer cache.
    SavePeerCache,
}

/// Where the node stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// A join runs (handed out as [`Action::Join`], not reported yet).
    Joining,
    /// Not joined yet; the next join starts at `until`.
    Backoff {
        /// When the next join starts (driver's clock).
        until: Duration,
    },
    /// Joined; the next maintenance tick is at `next_tick`.
    Joined {
        /// When the next maintenance tick falls due (driver's clock).
        next_tick: Duration,
    },
}

/// The join-and-maintenance schedule of one node.
#[derive(Debug, Clone)]
pub struct Maintenance {
    state: State,
    /// Joined at least once (a failed rejoin then waits for the next tick
    /// instead of backing off).
    ever_joined: bool,
    /// Wait before the next join retry.
    retry: Duration,
    last_publish: Duration,
    /// Our addresses changed since the last publish.
    publish_due: bool,
    actions: VecDeque<Action>,
}

impl Default for Maintenance {
    fn default() -> Self {
        Self::new()
    }
}

impl Maintenance {
    /// Starts joining at once.
    pub fn new() -> Self {
        Maintenance {
            state: State::Joining,
            ever_joined: false,
            retry: JOIN_RETRY_INITIAL,
            last_publish: Duration::ZERO,
            publish_due: false,
            actions: VecDeque::from([Action::Join]),
        }
    }

    /// Where the node stands now.
    pub fn state(&self) -> State {
        self.state
    }

    /// Whether a join ever succeeded.
    pub fn is_joined(&self) -> bool {
        self.ever_joined
    }

    /// The join handed out as [`Action::Join`] ended (and, if it joined,
    /// published our endpoint record).
    pub fn join_done(&mut self, now: Duration, outcome: JoinOutcome) {
        if self.state != State::Joining {
            return;
        }
        match outcome {
            JoinOutcome::Joined => {
                self.ever_joined = true;
                self.retry = JOIN_RETRY_INITIAL;
                self.last_publish = now;
                self.publish_due = false;
                self.state = State::Joined {
                    next_tick: now + MAINTENANCE_TICK,
                };
            }
            // Lost everyone after being in (e.g. the network was down):
            // the next tick tries again.
            JoinOutcome::NobodyAnswered if self.ever_joined => {
                self.state = State::Joined {
                    next_tick: now + MAINTENANCE_TICK,
                };
            }
            // Never in: the bootstrap node may be starting too, or
            // overloaded. Back off, doubling up to a tick.
            JoinOutcome::NobodyAnswered => {
                self.state = State::Backoff {
                    until: now + self.retry,
                };
                self.retry = (self.retry * 2).min(MAINTENANCE_TICK);
            }
        }
    }

    /// Our own addresses changed: republish at the next tick.
    pub fn addresses_changed(&mut self) {
        self.publish_due = true;
    }

    /// Our endpoint record was published (by [`Action::Republish`] or by
    /// anyone else who publishes it, e.g. relay acquisition).
    pub fn published(&mut self, now: Duration) {
        self.last_publish = now;
        self.publish_due = false;
    }

    /// When to call [`Maintenance::handle_timeout`] next; `None` while a
    /// join runs (its end is reported instead).
    pub fn poll_timeout(&self) -> Option<Duration> {
        match self.state {
            State::Joining => None,
            State::Backoff { until } => Some(until),
            State::Joined { next_tick } => Some(next_tick),
        }
    }

    /// Time passed. `table` is the routing table now: which buckets are
    /// stale, and whether anyone is left.
    pub fn handle_timeout(&mut self, now: Duration, table: &RoutingTable) {
        match self.state {
            State::Joining => {}
            State::Backoff { until } => {
                if now >= until {
                    self.join();
                }
            }
            State::Joined { next_tick } => {
                if now < next_tick {
                    return;
                }
                if table.live_len() == 0 {
                    self.join();
                    return;
                }
                for bucket in table
                    .buckets_to_refresh(now, REFRESH_INTERVAL)
                    .into_iter()
                    .take(MAX_REFRESHES_PER_TICK)
                {
                    self.actions.push_back(Action::Refresh { bucket });
                }
                if self.publish_due || now.saturating_sub(self.last_publish) >= REPUBLISH_INTERVAL {
                    self.actions.push_back(Action::Republish);
                }
                self.actions.push_back(Action::ExpireRecords);
                self.actions.push_back(Action::SavePeerCache);
                self.state = State::Joined {
                    next_tick: now + MAINTENANCE_TICK,
                };
            }
        }
    }

    fn join(&mut self) {
        self.state = State::Joining;
        self.actions.push_back(Action::Join);
    }

    /// The next thing to do, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::dht::{Contact, Key};
    use crate::{Keypair, PeerId};

    fn peer(i: u64) -> PeerId {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&i.to_le_bytes());
        Keypair::from_secret_bytes(seed).peer_id()
    }

    fn addr(i: u64) -> SocketAddr {
        SocketAddr::from(([198, 51, (i % 250) as u8, (i / 250) as u8], 4433))
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// A table of our own with `n` good contacts, seen at `now`.
    fn table(n: u64, now: Duration) -> RoutingTable {
        let mut t = RoutingTable::new(peer(0), Default::default());
        for i in 1..=n {
            t.on_seen(Contact::new(peer(i), addr(i)), now);
        }
        t
    }

    fn drain(m: &mut Maintenance) -> Vec<Action> {
        std::iter::from_fn(|| m.poll_action()).collect()
    }

    /// Runs the machine in virtual time until `until`, answering every join
    /// with `outcome`; returns when each join started.
    fn run_joins(
        m: &mut Maintenance,
        t: &RoutingTable,
        until: Duration,
        outcome: impl Fn(usize) -> JoinOutcome,
    ) -> Vec<Duration> {
        let mut now = Duration::ZERO;
        let mut joins = Vec::new();
        loop {
            for a in drain(m) {
                if a == Action::Join {
                    joins.push(now);
                    m.join_done(now, outcome(joins.len()));
                }
            }
            match m.poll_timeout() {
                Some(at) if at <= until => {
                    now = at;
                    m.handle_timeout(now, t);
                }
                _ => return joins,
            }
        }
    }

    #[test]
    fn join_retries_with_doubling_capped_backoff_until_joined() {
        let mut m = Maintenance::new();
        let t = RoutingTable::new(peer(0), Default::default());
        // Nobody answers for 120 s: 1, 2, 4, 8, 16, then every 30 s.
        let joins = run_joins(&mut m, &t, secs(120), |_| JoinOutcome::NobodyAnswered);
        let gaps: Vec<u64> = joins.windows(2).map(|w| (w[1] - w[0]).as_secs()).collect();
        assert_eq!(gaps, [1, 2, 4, 8, 16, 30, 30]);
        assert!(!m.is_joined());

        // The fourth attempt joins: no more joins, ticks from then on.
        let mut m = Maintenance::new();
        let t = table(3, Duration::ZERO);
        let joins = run_joins(&mut m, &t, secs(600), |n| {
            if n < 4 {
                JoinOutcome::NobodyAnswered
            } else {
                JoinOutcome::Joined
            }
        });
        assert_eq!(joins, [secs(0), secs(1), secs(3), secs(7)]);
        assert!(m.is_joined());
        assert_eq!(
            m.state(),
            State::Joined {
                next_tick: secs(7 + 30 * 20)
            }
        );
    }

    #[test]
    fn nothing_happens_before_a_timeout_or_while_joining() {
        let mut m = Maintenance::new();
        assert_eq!(m.poll_timeout(), None, "a join runs");
        assert_eq!(drain(&mut m), [Action::Join]);
        m.handle_timeout(secs(100), &table(1, Duration::ZERO));
        assert!(drain(&mut m).is_empty());
        m.join_done(secs(100), JoinOutcome::Joined);
        m.handle_timeout(secs(129), &table(1, Duration::ZERO));
        assert!(drain(&mut m).is_empty(), "tick not due");
        assert_eq!(m.poll_timeout(), Some(secs(130)));
    }

    #[test]
    fn refresh_only_stale_buckets_at_most_four_per_tick() {
        let mut m = Maintenance::new();
        drain(&mut m);
        m.join_done(Duration::ZERO, JoinOutcome::Joined);
        // A table with many buckets, all just looked up.
        let mut t = table(400, Duration::ZERO);
        let own = Key::for_peer(&peer(0));
        let buckets = t.buckets_to_refresh(Duration::ZERO, Duration::ZERO);
        assert!(buckets.len() > MAX_REFRESHES_PER_TICK + 1, "{buckets:?}");
        for &b in &buckets {
            t.mark_refreshed(&own.random_in_bucket(b, [7; 32]), Duration::ZERO);
        }
        let refreshes = |actions: &[Action]| -> Vec<usize> {
            actions
                .iter()
                .filter_map(|a| match a {
                    Action::Refresh { bucket } => Some(*bucket),
                    _ => None,
                })
                .collect()
        };
        // Ticks before REFRESH_INTERVAL: no refresh but of the bucket one
        // past the deepest (the region around ourselves, where new nodes
        // appear: it has no bucket yet, so no lookup ever counts for it).
        let past = t.bucket_count();
        assert_eq!(buckets.last(), Some(&past));
        let mut now = Duration::ZERO;
        while now + MAINTENANCE_TICK < REFRESH_INTERVAL {
            now = m.poll_timeout().unwrap();
            m.handle_timeout(now, &t);
            let a = drain(&mut m);
            assert_eq!(refreshes(&a), [past], "at {now:?}");
            assert_eq!(a[1..], [Action::ExpireRecords, Action::SavePeerCache]);
        }
        // Bucket 1 was looked up meanwhile: it stays fresh.
        t.mark_refreshed(&own.random_in_bucket(1, [9; 32]), secs(300));
        // The first tick at or past REFRESH_INTERVAL: the first four stale.
        now = m.poll_timeout().unwrap();
        assert_eq!(now, REFRESH_INTERVAL);
        m.handle_timeout(now, &t);
        let stale: Vec<usize> = buckets.iter().copied().filter(|&b| b != 1).collect();
        assert_eq!(
            refreshes(&drain(&mut m)),
            stale[..MAX_REFRESHES_PER_TICK].to_vec()
        );
        // The driver ran them (each lookup marks its bucket); the next tick
        // takes the next four.
        for &b in &stale[..MAX_REFRESHES_PER_TICK] {
            t.mark_refreshed(&own.random_in_bucket(b, [3; 32]), now);
        }
        now = m.poll_timeout().unwrap();
        m.handle_timeout(now, &t);
        let next = refreshes(&drain(&mut m));
        assert_eq!(
            next,
            stale[MAX_REFRESHES_PER_TICK..]
                .iter()
                .copied()
                .take(MAX_REFRESHES_PER_TICK)
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn republish_every_interval_and_when_addresses_change() {
        let mut m = Maintenance::new();
        drain(&mut m);
        m.join_done(secs(5), JoinOutcome::Joined);
        let t = table(3, Duration::ZERO);
        let mut republished = Vec::new();
        let end = secs(5) + REPUBLISH_INTERVAL * 3;
        while let Some(now) = m.poll_timeout().filter(|&at| at <= end) {
            m.handle_timeout(now, &t);
            for a in drain(&mut m) {
                if a == Action::Republish {
                    republished.push(now);
                    // Publishing takes a second.
                    m.published(now + secs(1));
                }
            }
        }
        // Joining published at 5 s; then every 20 min, on the first tick
        // at least REPUBLISH_INTERVAL after the last publish.
        let expect: Vec<Duration> = (1..=3)
            .map(|i| secs(5) + REPUBLISH_INTERVAL * i + MAINTENANCE_TICK * (i - 1))
            .filter(|&at| at <= end)
            .collect();
        assert_eq!(republished, expect);

        // Changed addresses go out at the next tick, not 20 min later.
        m.addresses_changed();
        let now = m.poll_timeout().unwrap();
        m.handle_timeout(now, &t);
        assert!(drain(&mut m).contains(&Action::Republish));
    }

    #[test]
    fn a_table_that_lost_everyone_rejoins_at_the_next_tick() {
        let mut m = Maintenance::new();
        drain(&mut m);
        m.join_done(Duration::ZERO, JoinOutcome::Joined);
        let mut t = table(1, Duration::ZERO);
        for _ in 0..crate::dht::routing::BAD_AFTER_FAILURES {
            t.on_failure(&peer(1));
        }
        assert_eq!(t.live_len(), 0);
        m.handle_timeout(secs(30), &t);
        assert_eq!(drain(&mut m), [Action::Join]);
        // A failed rejoin waits a tick rather than backing off from 1 s.
        m.join_done(secs(33), JoinOutcome::NobodyAnswered);
        assert_eq!(m.poll_timeout(), Some(secs(63)));
    }

    fn drain_join(j: &mut JoinAttempt) -> Vec<JoinAction> {
        std::iter::from_fn(|| j.poll_action()).collect()
    }

    #[test]
    fn join_refreshes_every_bucket_eight_at_a_time() {
        let t = table(400, Duration::ZERO);
        let buckets: Vec<usize> = (0..t.bucket_count()).collect();
        assert!(buckets.len() > JOIN_PARALLEL_REFRESHES, "{buckets:?}");
        let mut j = JoinAttempt::new();
        assert_eq!(drain_join(&mut j), [JoinAction::Bootstrap]);
        j.self_lookup_done(true, &t);
        let mut asked = drain_join(&mut j);
        assert_eq!(asked.len(), JOIN_PARALLEL_REFRESHES);
        let mut done = 0;
        while j.outcome().is_none() {
            j.refresh_done();
            done += 1;
            let more = drain_join(&mut j);
            assert!(more.len() <= 1, "one finished, at most one more starts");
            asked.extend(more);
            assert!(asked.len() - done <= JOIN_PARALLEL_REFRESHES);
        }
        let want: Vec<JoinAction> = buckets
            .iter()
            .map(|&bucket| JoinAction::Refresh { bucket })
            .collect();
        assert_eq!(asked, want);
        assert_eq!(done, buckets.len());
        assert_eq!(j.outcome(), Some(JoinOutcome::Joined));
    }

    #[test]
    fn join_nobody_answered_fails_and_alone_joins_at_once() {
        let mut j = JoinAttempt::new();
        drain_join(&mut j);
        j.self_lookup_done(false, &table(3, Duration::ZERO));
        assert_eq!(j.outcome(), Some(JoinOutcome::NobodyAnswered));
        assert!(drain_join(&mut j).is_empty(), "no refresh after a failure");

        // The first node: nobody to ask, an empty table, nothing to
        // refresh: joined at once.
        let mut j = JoinAttempt::new();
        drain_join(&mut j);
        j.self_lookup_done(true, &RoutingTable::new(peer(0), Default::default()));
        assert!(drain_join(&mut j).is_empty());
        assert_eq!(j.outcome(), Some(JoinOutcome::Joined));
    }
}
