//! RFC 4787 classification from observations, without any special server.
//!
//! **Mapping** compares the mapped address that peers at *different IPs*
//! report for packets from our one socket: the same address for all →
//! endpoint-independent; different → endpoint-dependent. **Filtering** uses
//! unsolicited probes sent to our mapped address (the RFC 5780 CHANGE-REQUEST
//! idea, done with reach peers): one from an IP we never sent to (arrives →
//! endpoint-independent), one from a new port of an IP we did send to
//! (arrives → address-dependent); neither arrives → address-and-port
//! dependent.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

/// Distinct server IPs needed to judge the mapping.
pub const MIN_MAPPING_SERVERS: usize = 2;

/// RFC 4787 mapping behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mapping {
    /// One external address for every destination: hole punching works
    /// by simultaneous open.
    EndpointIndependent,
    /// A new external port per destination (a symmetric NAT): only the
    /// birthday technique or a relay helps.
    EndpointDependent,
    /// Not enough observations to tell.
    Unknown,
}

/// RFC 4787 filtering behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filtering {
    /// Anyone may send in once a mapping exists (full cone).
    EndpointIndependent,
    /// Only IPs we sent to may send in (restricted cone).
    AddressDependent,
    /// Only the exact IP and port we sent to may send in (port restricted).
    AddressAndPortDependent,
    /// Not tested, or the test was inconclusive.
    Unknown,
}

/// A peer at `server` saw our packets come from `observed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappingObservation {
    /// The peer that answered our probe.
    pub server: SocketAddr,
    /// Our address as that peer saw it.
    pub observed: SocketAddr,
}

/// What the mapping observations say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MappingResult {
    /// The mapping behaviour the observations show.
    pub mapping: Mapping,
    /// Whether any translation happens at all (observed ≠ local).
    pub translated: Option<bool>,
    /// Whether the NAT kept our local port.
    pub port_preserving: Option<bool>,
    /// Why the result is `Unknown`, if it is.
    pub note: Option<String>,
}

/// Classifies the mapping from observations of our socket bound at `local`.
pub fn classify_mapping(local: SocketAddr, obs: &[MappingObservation]) -> MappingResult {
    let unknown = |note: &str| MappingResult {
        mapping: Mapping::Unknown,
        translated: None,
        port_preserving: None,
        note: Some(note.to_string()),
    };
    // One server (same IP and port) reporting two mappings means the
    // mapping changed during the test: no verdict.
    let mut per_server: HashMap<SocketAddr, SocketAddr> = HashMap::new();
    for o in obs {
        if *per_server.entry(o.server).or_insert(o.observed) != o.observed {
            return unknown(
                "conflicting observations from one server: the mapping changed during the test",
            );
        }
    }
    // The first answer per server IP; different ports of one IP may differ
    // (that would be endpoint dependence too) but the cross-IP comparison
    // is the verdict RFC 4787 asks for.
    let mut per_server_ip: HashMap<IpAddr, SocketAddr> = HashMap::new();
    for o in obs {
        per_server_ip.entry(o.server.ip()).or_insert(o.observed);
    }
    if per_server_ip.len() < MIN_MAPPING_SERVERS {
        return unknown("too few observations: need peers at two different IPs");
    }
    let first = *per_server_ip.values().next().unwrap_or(&local);
    let all_same = per_server_ip.values().all(|a| *a == first);
    let all_observed: Vec<SocketAddr> = obs.iter().map(|o| o.observed).collect();
    MappingResult {
        mapping: if all_same {
            Mapping::EndpointIndependent
        } else {
            Mapping::EndpointDependent
        },
        translated: Some(all_observed.iter().any(|a| *a != local)),
        port_preserving: Some(all_observed.iter().all(|a| a.port() == local.port())),
        note: None,
    }
}

/// Results of the two unsolicited-probe tests (`None`: the test could not
/// run, e.g. no helper at another IP).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FilteringObservation {
    /// A probe from an IP we never sent to reached us.
    pub from_other_ip: Option<bool>,
    /// A probe from a new port of an IP we sent to reached us.
    pub from_other_port: Option<bool>,
}

/// Classifies the filtering.
pub fn classify_filtering(f: FilteringObservation) -> Filtering {
    match (f.from_other_ip, f.from_other_port) {
        (Some(true), _) => Filtering::EndpointIndependent,
        (_, Some(true)) => Filtering::AddressDependent,
        (Some(false), Some(false)) => Filtering::AddressAndPortDependent,
        _ => Filtering::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn obs(server: &str, observed: &str) -> MappingObservation {
        MappingObservation {
            server: sa(server),
            observed: sa(observed),
        }
    }

    const LOCAL: &str = "10.0.1.2:5000";

    #[test]
    fn same_mapped_address_for_two_ips_is_endpoint_independent() {
        let r = classify_mapping(
            sa(LOCAL),
            &[
                obs("203.0.113.10:7000", "203.0.113.2:5000"),
                obs("203.0.113.11:7000", "203.0.113.2:5000"),
            ],
        );
        assert_eq!(r.mapping, Mapping::EndpointIndependent);
        assert_eq!(r.translated, Some(true));
        assert_eq!(r.port_preserving, Some(true));
    }

    #[test]
    fn different_ports_per_destination_is_endpoint_dependent() {
        let r = classify_mapping(
            sa(LOCAL),
            &[
                obs("203.0.113.10:7000", "203.0.113.2:51253"),
                obs("203.0.113.11:7000", "203.0.113.2:21336"),
            ],
        );
        assert_eq!(r.mapping, Mapping::EndpointDependent);
        assert_eq!(r.port_preserving, Some(false));
    }

    #[test]
    fn no_translation_is_reported_as_such() {
        let local = "203.0.113.50:4433";
        let r = classify_mapping(
            sa(local),
            &[
                obs("203.0.113.10:7000", local),
                obs("203.0.113.11:7000", local),
            ],
        );
        assert_eq!(r.mapping, Mapping::EndpointIndependent);
        assert_eq!(r.translated, Some(false));
    }

    #[test]
    fn too_few_or_conflicting_samples_are_unknown() {
        assert_eq!(classify_mapping(sa(LOCAL), &[]).mapping, Mapping::Unknown);
        // Two observations from one IP do not make two servers.
        let r = classify_mapping(
            sa(LOCAL),
            &[
                obs("203.0.113.10:7000", "203.0.113.2:5000"),
                obs("203.0.113.10:7001", "203.0.113.2:5000"),
            ],
        );
        assert_eq!(r.mapping, Mapping::Unknown);
        assert!(r.note.unwrap().contains("too few"));
        // One server saw two different mappings: unstable, not a verdict.
        let r = classify_mapping(
            sa(LOCAL),
            &[
                obs("203.0.113.10:7000", "203.0.113.2:5000"),
                obs("203.0.113.10:7000", "203.0.113.2:6000"),
                obs("203.0.113.11:7000", "203.0.113.2:5000"),
            ],
        );
        assert_eq!(r.mapping, Mapping::Unknown);
        assert!(r.note.unwrap().contains("conflicting"));
    }

    #[test]
    fn filtering_from_probe_results() {
        let f = |ip, port| {
            classify_filtering(FilteringObservation {
                from_other_ip: ip,
                from_other_port: port,
            })
        };
        assert_eq!(f(Some(true), Some(true)), Filtering::EndpointIndependent);
        // Other IP arrives but other port was lost: EIF still (loss is
        // possible, a passing probe is proof).
        assert_eq!(f(Some(true), Some(false)), Filtering::EndpointIndependent);
        assert_eq!(f(Some(false), Some(true)), Filtering::AddressDependent);
        assert_eq!(
            f(Some(false), Some(false)),
            Filtering::AddressAndPortDependent
        );
        assert_eq!(f(None, Some(false)), Filtering::Unknown);
        assert_eq!(f(None, None), Filtering::Unknown);
    }
}
