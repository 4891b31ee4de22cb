//! External addresses as reported by peers.
//!
//! Every reply that can carry it tells us the source address the peer saw.
//! One peer could lie or sit behind the same NAT, so an address counts by the
//! number of *distinct reporter IPs*; it is `confirmed` once
//! [`CONFIRMATIONS`] distinct IPs agree.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use super::Mapping;

/// Distinct reporter IPs that confirm an external address.
pub const CONFIRMATIONS: usize = 2;
/// Addresses tracked at most; the least reported are forgotten first.
pub const MAX_TRACKED: usize = 32;
/// Reporter IPs remembered per address at most.
pub const MAX_REPORTERS: usize = 16;

/// One external address and its support.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ScoredAddr {
    pub addr: SocketAddr,
    pub reporters: usize,
    pub confirmed: bool,
}

/// The scored set of our external addresses.
#[derive(Debug, Clone, Default)]
pub struct ObservedAddrs {
    by_addr: HashMap<SocketAddr, BTreeSet<IpAddr>>,
}

impl ObservedAddrs {
    /// Records that `reporter` saw us at `observed`.
    pub fn record(&mut self, observed: SocketAddr, reporter: IpAddr) {
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
        if set.len() < MAX_REPORTERS {
            set.insert(reporter);
        }
    }

    /// All addresses, best supported first.
    pub fn scored(&self) -> Vec<ScoredAddr> {
        let mut v: Vec<ScoredAddr> = self
            .by_addr
            .iter()
            .map(|(a, r)| ScoredAddr {
                addr: *a,
                reporters: r.len(),
                confirmed: r.len() >= CONFIRMATIONS,
            })
            .collect();
        v.sort_by(|a, b| b.reporters.cmp(&a.reporters).then(a.addr.cmp(&b.addr)));
        v
    }

    /// The best confirmed address of each family.
    pub fn confirmed(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        for s in self.scored().into_iter().filter(|s| s.confirmed) {
            if !out.iter().any(|a| a.is_ipv4() == s.addr.is_ipv4()) {
                out.push(s.addr);
            }
        }
        out
    }
}

impl ObservedAddrs {
    /// The mapping behaviour these reports imply, for one address family:
    /// endpoint-independent when a majority of at least two reporter IPs
    /// saw one address, endpoint-dependent when reporters at two or more
    /// IPs saw us at different addresses and no address has a majority
    /// (the NAT picked a mapping per destination), else unknown. The
    /// running node's cheap version of `classify_mapping`: it needs no
    /// extra probes, only what DHT replies already report.
    pub fn mapping(&self, ipv4: bool) -> Mapping {
        let mut reporters: BTreeSet<IpAddr> = BTreeSet::new();
        let mut best = 0;
        for (addr, r) in &self.by_addr {
            if addr.is_ipv4() != ipv4 {
                continue;
            }
            reporters.extend(r.iter().copied());
            best = best.max(r.len());
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

    #[test]
    fn an_address_is_confirmed_by_distinct_reporter_ips_only() {
        let mut o = ObservedAddrs::default();
        let a: SocketAddr = "203.0.113.2:5000".parse().unwrap();
        o.record(a, ip(1));
        o.record(a, ip(1));
        assert!(o.confirmed().is_empty(), "one reporter twice is one");
        o.record(a, ip(2));
        assert_eq!(o.confirmed(), vec![a]);
        // A liar reporting another address does not displace it.
        let b: SocketAddr = "203.0.113.99:1".parse().unwrap();
        o.record(b, ip(9));
        assert_eq!(o.scored()[0].addr, a);
        assert_eq!(o.confirmed(), vec![a]);
    }

    #[test]
    fn mapping_from_reports() {
        let mut o = ObservedAddrs::default();
        assert_eq!(o.mapping(true), Mapping::Unknown);
        let a: SocketAddr = "203.0.113.2:5000".parse().unwrap();
        o.record(a, ip(1));
        assert_eq!(o.mapping(true), Mapping::Unknown, "one reporter");
        o.record(a, ip(2));
        assert_eq!(o.mapping(true), Mapping::EndpointIndependent);
        // One liar does not flip a majority.
        o.record("203.0.113.2:1".parse().unwrap(), ip(3));
        assert_eq!(o.mapping(true), Mapping::EndpointIndependent);
        assert_eq!(o.mapping(false), Mapping::Unknown, "no IPv6 reports");

        // A new port for every reporter: endpoint-dependent.
        let mut edm = ObservedAddrs::default();
        for i in 1..=3u8 {
            edm.record(
                SocketAddr::from(([203, 0, 113, 2], 40000 + u16::from(i))),
                ip(i),
            );
        }
        assert_eq!(edm.mapping(true), Mapping::EndpointDependent);
    }

    #[test]
    fn tracking_is_bounded() {
        let mut o = ObservedAddrs::default();
        for i in 0..200u16 {
            o.record(SocketAddr::from(([203, 0, 113, 2], i)), ip((i % 250) as u8));
        }
        assert!(o.scored().len() <= MAX_TRACKED);
    }
}
