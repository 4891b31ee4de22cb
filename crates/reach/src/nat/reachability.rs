//! Whether unsolicited packets reach this node: what decides if it can
//! serve as a relay and be dialed directly, or needs a relay itself.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use reach_proto::wire::datagram::{FilterVia, MAX_FILTER_EXCLUDES};

use super::Nat;
use crate::node::bus::Reachability;
use crate::vaddr::is_virtual;

/// Other-host filtering tests per reachability check at most (each probe
/// from an already contacted IP is inconclusive and excluded next time).
pub const OTHER_HOST_ATTEMPTS: usize = 3;

impl Nat {
    /// Checks whether unsolicited packets reach us, with connected peers as
    /// helpers: public when a never-contacted host's probe gets through, or when
    /// our address is not translated and a probe from a port we never sent to
    /// gets through (a plain public host; firewalls drop that probe).
    pub(crate) async fn check_reachability(self: &Arc<Self>) -> Reachability {
        let mut helpers: Vec<SocketAddr> = self
            .peers
            .connected()
            .into_iter()
            .map(|p| p.addr)
            .filter(|a| !is_virtual(a))
            .collect();
        helpers.sort_by_key(|a| a.ip() == self.core.local_addr.ip());
        let Some(&helper) = helpers.first() else {
            return Reachability::Unknown;
        };
        let Ok(observed) = self.probe(helper).await else {
            return Reachability::Unknown;
        };
        let mut exclude: Vec<IpAddr> = helpers.iter().map(|a| a.ip()).collect();
        exclude.dedup();
        // A probe from an IP we sent to recently proves nothing (an
        // address-dependent filter lets it through): exclude it and ask again.
        // Peers all on our own IP (one host, e.g. loopback) have no other host
        // to ask.
        let other_hosts = helpers.iter().any(|a| a.ip() != self.core.local_addr.ip());
        for _ in 0..if other_hosts { OTHER_HOST_ATTEMPTS } else { 0 } {
            exclude.truncate(MAX_FILTER_EXCLUDES);
            let source = self
                .filter_probe_source(helper, FilterVia::OtherHost, exclude.clone())
                .await
                .ok()
                .flatten();
            match source {
                Some(from) if !self.core.socket.contacted_recently(from.ip()) => {
                    return Reachability::Public(observed);
                }
                Some(from) => exclude.insert(0, from.ip()),
                None => break,
            }
        }
        let untranslated = self.core.local_addrs().contains(&observed);
        if untranslated {
            let other_port = self
                .filter_test(helper, FilterVia::OtherPort, vec![])
                .await
                .unwrap_or(false);
            if other_port {
                return Reachability::Public(observed);
            }
        }
        Reachability::Private
    }
}

impl Nat {
    /// Whether `external`, an address our router says it forwards to us,
    /// reaches us from outside. A helper (a directly connected peer at
    /// another IP) must see us at `external`'s IP (a router that names
    /// another address lies, or sits behind a second NAT), and its
    /// unsolicited probe, from a port we never sent to and aimed at
    /// `external`'s port, must arrive (only the mapping lets it through).
    /// Waits up to `wait` for a helper to connect; `false` if none did or
    /// the probe did not arrive.
    pub(crate) async fn check_mapped(
        self: &Arc<Self>,
        external: SocketAddr,
        wait: std::time::Duration,
        max_helpers: usize,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        let mut events = self.core.bus.subscribe();
        let mut asked: Vec<SocketAddr> = Vec::new();
        loop {
            let helpers: Vec<SocketAddr> = self
                .peers
                .connected()
                .into_iter()
                .map(|p| p.addr)
                .filter(|a| {
                    !is_virtual(a)
                        && a.ip() != self.core.local_addr.ip()
                        && canonical(a.ip()) != canonical(external.ip())
                        && !asked.contains(a)
                })
                .collect();
            for helper in helpers {
                if asked.len() >= max_helpers {
                    return false;
                }
                asked.push(helper);
                let Ok(observed) = self.probe(helper).await else {
                    continue;
                };
                if canonical(observed.ip()) != canonical(external.ip()) {
                    tracing::debug!(%external, %observed, "the router's external address is not where peers see us");
                    return false;
                }
                let via = FilterVia::MappedPort(external.port());
                if let Ok(arrived) = self.filter_test(helper, via, vec![]).await {
                    return arrived;
                }
            }
            match tokio::time::timeout_at(deadline, events.next()).await {
                Ok(Some(_)) => continue,
                _ => return false,
            }
        }
    }
}

/// The IP in canonical form (IPv4-mapped IPv6 as IPv4), so addresses from
/// a dual-stack socket compare with the router's.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}
