//! `reach nat`: what a node finds out about the NAT in front of it, with
//! peers as helpers.

use std::net::{IpAddr, SocketAddr};

use reach_proto::nat::classify::{classify_filtering, classify_mapping};
use reach_proto::nat::observed::ScoredAddr;
use reach_proto::nat::{Filtering, FilteringObservation, Mapping, MappingObservation};
use reach_proto::wire::datagram::{FilterVia, MAX_FILTER_EXCLUDES};
use serde::Serialize;

use std::sync::Arc;

use super::Nat;

/// Helpers used for the mapping test (distinct IPs).
pub const MAPPING_HELPERS: usize = 2;

/// What a node knows about the NAT in front of it (`reach nat`).
#[derive(Debug, Clone, Serialize)]
pub struct NatReport {
    /// The address our socket is bound to.
    pub local: SocketAddr,
    /// External addresses as peers reported them, best supported first.
    pub external: Vec<ScoredAddr>,
    pub mapping: Mapping,
    pub filtering: Filtering,
    /// Whether our address is translated at all.
    pub translated: Option<bool>,
    pub port_preserving: Option<bool>,
    /// Whether packets to our own external address come back to us.
    pub hairpin: Option<bool>,
    /// The peers that helped.
    pub helpers: Vec<SocketAddr>,
    /// Why something is unknown.
    pub note: Option<String>,
    /// Port mapping (PCP / NAT-PMP / UPnP-IGD): the protocol the router
    /// speaks, the mapped and published address, the lease, renewals.
    pub port_mapping: Option<reach_proto::nat::portmap::status::PortMapStatus>,
}

impl Nat {
    /// Classifies the NAT in front of this node with the help of reach
    /// nodes at `helpers` (at least two distinct IPs for the mapping test;
    /// the first helper also runs the filtering tests and needs a peer at a
    /// third IP for the endpoint-independent-filtering test).
    pub(crate) async fn report_with(self: &Arc<Self>, helpers: &[SocketAddr]) -> NatReport {
        let local = self.core.local_addr;
        let mut used: Vec<SocketAddr> = Vec::new();
        let mut ips: Vec<IpAddr> = Vec::new();
        for h in helpers {
            if !ips.contains(&h.ip()) && used.len() < MAPPING_HELPERS {
                ips.push(h.ip());
                used.push(*h);
            }
        }
        let mut obs = Vec::new();
        for h in &used {
            if let Ok(observed) = self.probe(*h).await {
                obs.push(MappingObservation {
                    server: *h,
                    observed,
                });
            }
        }
        let mapping = classify_mapping(local, &obs);
        let mut filtering = FilteringObservation::default();
        if let Some(a) = used.first() {
            filtering.from_other_port = self
                .filter_test(*a, FilterVia::OtherPort, vec![])
                .await
                .ok();
            // Every IP we sent to must be avoided for the other-host probe.
            let mut exclude = ips.clone();
            for p in self.peers.connected() {
                if !exclude.contains(&p.addr.ip()) {
                    exclude.push(p.addr.ip());
                }
            }
            exclude.truncate(MAX_FILTER_EXCLUDES);
            filtering.from_other_ip = self
                .filter_test(*a, FilterVia::OtherHost, exclude)
                .await
                .ok();
        }
        let external = self.scored();
        let hairpin = match (mapping.translated, obs.first()) {
            (Some(true), Some(o)) => Some(self.probe(o.observed).await.is_ok()),
            _ => None,
        };
        NatReport {
            local,
            external,
            mapping: mapping.mapping,
            filtering: classify_filtering(filtering),
            translated: mapping.translated,
            port_preserving: mapping.port_preserving,
            hairpin,
            helpers: used,
            note: mapping.note,
            port_mapping: None,
        }
    }
}
