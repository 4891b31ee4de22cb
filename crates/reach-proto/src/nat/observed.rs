//! External addresses as reported by peers.
//!
//! Every reply that can carry it tells us the source address the peer saw.
//! One peer could lie or sit behind the same NAT, so an address counts by the
//! number of *distinct reporter IPs*; it is `confirmed` once
//! [`CONFIRMATIONS`] distinct IPs agree.
//!
//! Reports age: one older than [`OBSERVED_ADDR_TTL`] no longer counts, so
//! after a network change the old external address stops being confirmed
//! once nobody reports it any more. Time is passed in (`now`, a
//! [`Duration`] since the caller's epoch); the set says which addresses
//! became or stopped being confirmed through [`ObservedAddrs::poll_change`]
//! and when the next one may lapse through [`ObservedAddrs::next_timeout`].

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Serialize;

use super::Mapping;

/// Distinct reporter IPs that confirm an external address.
pub const CONFIRMATIONS: usize = 2;
/// Addresses tracked at most; the least reported are forgotten first.
pub const MAX_TRACKED: usize = 32;
/// Reporter IPs remembered per address at most (the oldest report makes
/// room for a new reporter).
pub const MAX_REPORTERS: usize = 16;
/// How long one report counts. A running node is re-observed by every DHT
/// reply, and at the latest by the endpoint republish every 20 minutes
/// (reach's `REPUBLISH_INTERVAL`, whose put asks the closest nodes): 30
/// minutes outlasts that with a margin for one slow maintenance round, so
/// an idle node's address does not flap, yet after a network change the old
/// address stops being confirmed (and published) within half an hour.
pub const OBSERVED_ADDR_TTL: Duration = Duration::from_secs(30 * 60);

/// One external address and its support.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ScoredAddr {
    /// The external address peers reported.
    pub addr: SocketAddr,
    /// Distinct reporter IPs whose reports have not expired.
    pub reporters: usize,
    /// At least [`CONFIRMATIONS`] distinct IPs agree: it is published.
    pub confirmed: bool,
}

/// A change of an address's confirmation, in the order it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrChange {
    /// Enough distinct reporter IPs agree on the address now.
    Confirmed(SocketAddr),
    /// The address is no longer confirmed: the reports that confirmed it
    /// aged out (or, with [`MAX_TRACKED`] confirmed addresses, it was
    /// forgotten).
    Expired(SocketAddr),
}

/// The scored set of our external addresses.
#[derive(Debug, Clone, Default)]
pub struct ObservedAddrs {
    /// Per address: each reporter IP and when it last reported it.
    by_addr: HashMap<SocketAddr, HashMap<IpAddr, Duration>>,
    /// The addresses last reported confirmed through `changes`.
    announced: BTreeSet<SocketAddr>,
    /// Changes not yet taken by `poll_change`, at most one per address
    /// tracked or announced (see `sync`).
    changes: VecDeque<AddrChange>,
}

/// Whether a report made at `at` still counts at `now`.
fn live(at: Duration, now: Duration) -> bool {
    now.saturating_sub(at) < OBSERVED_ADDR_TTL
}

impl ObservedAddrs {
    /// Records that `reporter` saw us at `observed` at `now`.
    pub fn record(&mut self, observed: SocketAddr, reporter: IpAddr, now: Duration) {
        self.prune(now);
        if !self.by_addr.contains_key(&observed) && self.by_addr.len() >= MAX_TRACKED {
            // Forget the least supported address.
            if let Some(worst) = self
                .by_addr
                .iter()
                .min_by_key(|(a, r)| (r.len(), **a))
                .map(|(a, _)| *a)
            {
                self.by_addr.remove(&worst);
            }
        }
        let set = self.by_addr.entry(observed).or_default();
        if !set.contains_key(&reporter)
            && set.len() >= MAX_REPORTERS
            && let Some(oldest) = set
                .iter()
                .min_by_key(|(ip, at)| (**at, **ip))
                .map(|(ip, _)| *ip)
        {
            set.remove(&oldest);
        }
        set.insert(reporter, now);
        self.sync(now);
    }

    /// Forgets reports that no longer count at `now`; addresses that stop
    /// being confirmed come out of [`Self::poll_change`].
    pub fn expire(&mut self, now: Duration) {
        self.prune(now);
        self.sync(now);
    }

    /// The next change of confirmation, oldest first.
    pub fn poll_change(&mut self) -> Option<AddrChange> {
        self.changes.pop_front()
    }

    /// When the first confirmed address stops being confirmed unless new
    /// reports arrive: the time to call [`Self::expire`] next. `None` while
    /// no address is confirmed.
    pub fn next_timeout(&self) -> Option<Duration> {
        self.announced
            .iter()
            .filter_map(|a| self.by_addr.get(a))
            .filter_map(|r| {
                let mut times: Vec<Duration> = r.values().copied().collect();
                times.sort_unstable_by(|a, b| b.cmp(a));
                // Confirmed until the CONFIRMATIONS-th newest report ages out.
                times.get(CONFIRMATIONS - 1).map(|t| *t + OBSERVED_ADDR_TTL)
            })
            .min()
    }

    /// All addresses with reports that count at `now`, best supported first.
    pub fn scored(&self, now: Duration) -> Vec<ScoredAddr> {
        let mut v: Vec<ScoredAddr> = self
            .by_addr
            .iter()
            .map(|(a, r)| (a, r.values().filter(|t| live(**t, now)).count()))
            .filter(|(_, n)| *n > 0)
            .map(|(a, n)| ScoredAddr {
                addr: *a,
                reporters: n,
                confirmed: n >= CONFIRMATIONS,
            })
            .collect();
        v.sort_by(|a, b| b.reporters.cmp(&a.reporters).then(a.addr.cmp(&b.addr)));
        v
    }

    /// The best confirmed address of each family at `now`.
    pub fn confirmed(&self, now: Duration) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        for s in self.scored(now).into_iter().filter(|s| s.confirmed) {
            if !out.iter().any(|a| a.is_ipv4() == s.addr.is_ipv4()) {
                out.push(s.addr);
            }
        }
        out
    }

    /// Drops reports that no longer count, and addresses left without any.
    fn prune(&mut self, now: Duration) {
        self.by_addr.retain(|_, r| {
            r.retain(|_, t| live(*t, now));
            !r.is_empty()
        });
    }

    /// Queues a change for every address whose confirmation differs from
    /// what was last announced.
    fn sync(&mut self, now: Duration) {
        let current: BTreeSet<SocketAddr> = self
            .scored(now)
            .into_iter()
            .filter(|s| s.confirmed)
            .map(|s| s.addr)
            .collect();
        for gone in self.announced.difference(&current) {
            self.changes.push_back(AddrChange::Expired(*gone));
        }
        for new in current.difference(&self.announced) {
            self.changes.push_back(AddrChange::Confirmed(*new));
        }
        self.announced = current;
        // A caller that never polls must not grow this without bound: only
        // the latest changes matter to it.
        while self.changes.len() > 2 * MAX_TRACKED {
            self.changes.pop_front();
        }
    }
}

impl ObservedAddrs {
    /// The mapping behaviour the reports that count at `now` imply, for one
    /// address family: endpoint-independent when a majority of at least two
    /// reporter IPs saw one address, endpoint-dependent when reporters at
    /// two or more IPs saw us at different addresses and no address has a
    /// majority (the NAT picked a mapping per destination), else unknown.
    /// The running node's cheap version of `classify_mapping`: it needs no
    /// extra probes, only what DHT replies already report.
    pub fn mapping(&self, ipv4: bool, now: Duration) -> Mapping {
        let mut reporters: BTreeSet<IpAddr> = BTreeSet::new();
        let mut best = 0;
        for (addr, r) in &self.by_addr {
            if addr.is_ipv4() != ipv4 {
                continue;
            }
            let alive: Vec<IpAddr> = r
                .iter()
                .filter(|(_, t)| live(**t, now))
                .map(|(ip, _)| *ip)
                .collect();
            best = best.max(alive.len());
            reporters.extend(alive);
        }
        let total = reporters.len();
        if total < CONFIRMATIONS {
            Mapping::Unknown
        } else if best >= CONFIRMATIONS && best * 2 > total {
            Mapping::EndpointIndependent
        } else {
            Mapping::EndpointDependent
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(i: u8) -> IpAddr {
        IpAddr::from([198, 51, 100, i])
    }

    const T0: Duration = Duration::ZERO;

    fn changes(o: &mut ObservedAddrs) -> Vec<AddrChange> {
        std::iter::from_fn(|| o.poll_change()).collect()
    }

    #[test]
    fn an_address_is_confirmed_by_distinct_reporter_ips_only() {
        let mut o = ObservedAddrs::default();
        let a: SocketAddr = "203.0.113.2:5000".parse().unwrap();
        o.record(a, ip(1), T0);
        o.record(a, ip(1), T0);
        assert!(o.confirmed(T0).is_empty(), "one reporter twice is one");
        assert!(changes(&mut o).is_empty());
        o.record(a, ip(2), T0);
        assert_eq!(o.confirmed(T0), vec![a]);
        assert_eq!(changes(&mut o), vec![AddrChange::Confirmed(a)]);
        // A liar reporting another address does not displace it.
        let b: SocketAddr = "203.0.113.99:1".parse().unwrap();
        o.record(b, ip(9), T0);
        assert_eq!(o.scored(T0)[0].addr, a);
        assert_eq!(o.confirmed(T0), vec![a]);
        assert!(changes(&mut o).is_empty());
    }

    #[test]
    fn a_confirmed_address_expires_without_new_reports() {
        let mut o = ObservedAddrs::default();
        let a: SocketAddr = "203.0.113.2:5000".parse().unwrap();
        let t1 = Duration::from_secs(60);
        o.record(a, ip(1), T0);
        o.record(a, ip(2), t1);
        assert_eq!(changes(&mut o), vec![AddrChange::Confirmed(a)]);
        // Confirmed until the older of the two reports ages out.
        assert_eq!(o.next_timeout(), Some(OBSERVED_ADDR_TTL));
        let just_before = OBSERVED_ADDR_TTL - Duration::from_millis(1);
        o.expire(just_before);
        assert_eq!(o.confirmed(just_before), vec![a]);
        assert!(changes(&mut o).is_empty());
        // The queries already ignore the stale report, before `expire`.
        assert!(o.confirmed(OBSERVED_ADDR_TTL).is_empty());
        assert_eq!(o.scored(OBSERVED_ADDR_TTL)[0].reporters, 1);
        o.expire(OBSERVED_ADDR_TTL);
        assert_eq!(changes(&mut o), vec![AddrChange::Expired(a)]);
        assert_eq!(o.next_timeout(), None);
        // Once the last report ages out the address is gone altogether.
        o.expire(t1 + OBSERVED_ADDR_TTL);
        assert!(o.scored(t1 + OBSERVED_ADDR_TTL).is_empty());
        assert!(changes(&mut o).is_empty(), "expired once");
    }

    #[test]
    fn fresh_reports_keep_an_address_confirmed() {
        let mut o = ObservedAddrs::default();
        let a: SocketAddr = "203.0.113.2:5000".parse().unwrap();
        let step = OBSERVED_ADDR_TTL / 2;
        let mut now = T0;
        for _ in 0..10 {
            o.record(a, ip(1), now);
            o.record(a, ip(2), now);
            now += step;
            o.expire(now);
            assert_eq!(o.confirmed(now), vec![a]);
        }
        assert_eq!(changes(&mut o), vec![AddrChange::Confirmed(a)]);
        // A network change: reports now name `b`; `a` lapses, `b` takes over.
        let b: SocketAddr = "192.0.2.7:6000".parse().unwrap();
        o.record(b, ip(1), now);
        o.record(b, ip(3), now);
        assert_eq!(changes(&mut o), vec![AddrChange::Confirmed(b)]);
        // `a` was last reported half a TTL before `b` first was.
        let later = now + OBSERVED_ADDR_TTL - Duration::from_secs(1);
        o.record(b, ip(1), later);
        o.record(b, ip(3), later);
        assert_eq!(o.confirmed(later), vec![b]);
        assert_eq!(changes(&mut o), vec![AddrChange::Expired(a)]);
    }

    #[test]
    fn mapping_from_reports() {
        let mut o = ObservedAddrs::default();
        assert_eq!(o.mapping(true, T0), Mapping::Unknown);
        let a: SocketAddr = "203.0.113.2:5000".parse().unwrap();
        o.record(a, ip(1), T0);
        assert_eq!(o.mapping(true, T0), Mapping::Unknown, "one reporter");
        o.record(a, ip(2), T0);
        assert_eq!(o.mapping(true, T0), Mapping::EndpointIndependent);
        // One liar does not flip a majority.
        o.record("203.0.113.2:1".parse().unwrap(), ip(3), T0);
        assert_eq!(o.mapping(true, T0), Mapping::EndpointIndependent);
        assert_eq!(o.mapping(false, T0), Mapping::Unknown, "no IPv6 reports");
        // Old reports say nothing about the NAT in front of us now.
        assert_eq!(o.mapping(true, OBSERVED_ADDR_TTL), Mapping::Unknown);

        // A new port for every reporter: endpoint-dependent.
        let mut edm = ObservedAddrs::default();
        for i in 1..=3u8 {
            edm.record(
                SocketAddr::from(([203, 0, 113, 2], 40000 + u16::from(i))),
                ip(i),
                T0,
            );
        }
        assert_eq!(edm.mapping(true, T0), Mapping::EndpointDependent);
    }

    #[test]
    fn tracking_is_bounded() {
        let mut o = ObservedAddrs::default();
        for i in 0..200u16 {
            o.record(
                SocketAddr::from(([203, 0, 113, 2], i)),
                ip((i % 250) as u8),
                T0,
            );
        }
        assert!(o.scored(T0).len() <= MAX_TRACKED);
        let a: SocketAddr = "203.0.113.2:5000".parse().unwrap();
        for i in 0..=255u8 {
            o.record(a, ip(i), Duration::from_secs(u64::from(i)));
        }
        let now = Duration::from_secs(255);
        assert_eq!(o.scored(now)[0].reporters, MAX_REPORTERS);
        // The newest reporters were kept.
        o.record(a, ip(0), now);
        assert_eq!(o.scored(now)[0].reporters, MAX_REPORTERS);
        assert!(o.changes.len() <= 2 * MAX_TRACKED);
    }
}
