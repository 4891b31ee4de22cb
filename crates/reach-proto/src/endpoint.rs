//! What a node's endpoint record says: its typed address set, composed from
//! the facts the node knows about how it can be reached.
//!
//! One pure function decides the set and its order, so every source of
//! addresses (the held relay, a reachability check, peers' observations,
//! port mappings, the interfaces) feeds one place and the rules live beside
//! their tests. The runtime's `advertise` module gathers the facts, calls
//! [`compose`], signs and publishes.

use std::net::{IpAddr, SocketAddr};

use crate::PeerId;
use crate::dht::record::{AddrKind, MAX_ENDPOINT_ADDRS, TypedAddr};

/// What a node knows about how others can reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressFacts {
    /// The relay the node holds a reservation at, and the address others
    /// reach that relay at.
    pub relay: Option<(PeerId, SocketAddr)>,
    /// An address a never-contacted host reached the node at: verified
    /// reachable from outside.
    pub verified: Option<SocketAddr>,
    /// External addresses the gateway mapped for the node (UPnP, NAT-PMP,
    /// PCP) that a helper's unsolicited probe reached the node through:
    /// verified, published as direct. (A mapping the router only promised
    /// is not a fact the record carries.)
    pub mapped: Vec<SocketAddr>,
    /// External addresses peers at two or more IPs agree they see the node
    /// at: behind a NAT, the ones the outside can try.
    pub observed: Vec<SocketAddr>,
    /// The addresses of the node's own interfaces.
    pub local: Vec<SocketAddr>,
}

/// Whether `ip` only means something on the local network (private,
/// loopback, link-local, unique-local).
pub fn is_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00 || v6.is_unicast_link_local()
        }
    }
}

/// The address set to publish, best first: the relay (it works from
/// anywhere), the verified address and verified port mappings (direct),
/// observed external addresses (unverified), then the interfaces (`Lan`
/// when local-only, else unverified). Each address once, at most
/// [`MAX_ENDPOINT_ADDRS`].
pub fn compose(facts: &AddressFacts) -> Vec<TypedAddr> {
    let mut out: Vec<TypedAddr> = Vec::new();
    let mut push = |kind: AddrKind, addr: SocketAddr, via: Option<PeerId>| {
        if !out.iter().any(|a| a.addr == addr) {
            out.push(TypedAddr { kind, addr, via });
        }
    };
    if let Some((relay, addr)) = facts.relay {
        push(AddrKind::Relay, addr, Some(relay));
    }
    if let Some(addr) = facts.verified {
        push(AddrKind::Direct, addr, None);
    }
    for &addr in &facts.mapped {
        push(AddrKind::Direct, addr, None);
    }
    for &addr in &facts.observed {
        push(AddrKind::Unverified, addr, None);
    }
    for &addr in &facts.local {
        let kind = if is_local(addr.ip()) {
            AddrKind::Lan
        } else {
            AddrKind::Unverified
        };
        push(kind, addr, None);
    }
    out.truncate(MAX_ENDPOINT_ADDRS);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Keypair;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_relay_goes_first_then_verified_then_external_then_interfaces() {
        let relay = Keypair::from_secret_bytes([3; 32]).peer_id();
        let facts = AddressFacts {
            relay: Some((relay, a("203.0.113.1:4433"))),
            verified: Some(a("198.51.100.2:5000")),
            mapped: vec![a("198.51.100.2:6000")],
            observed: vec![a("198.51.100.2:5001")],
            local: vec![a("192.168.1.5:5000"), a("198.51.100.9:5000")],
        };
        let set = compose(&facts);
        let kinds: Vec<AddrKind> = set.iter().map(|t| t.kind).collect();
        assert_eq!(
            kinds,
            [
                AddrKind::Relay,
                AddrKind::Direct,
                AddrKind::Direct,
                AddrKind::Unverified,
                AddrKind::Lan,
                AddrKind::Unverified
            ]
        );
        assert_eq!(set[0].via, Some(relay));
        assert_eq!(
            set[2].addr,
            a("198.51.100.2:6000"),
            "a verified mapping is direct, before observed addresses"
        );
    }

    #[test]
    fn an_address_appears_once_under_its_best_kind() {
        let facts = AddressFacts {
            verified: Some(a("198.51.100.2:5000")),
            observed: vec![a("198.51.100.2:5000")],
            local: vec![a("198.51.100.2:5000")],
            ..AddressFacts::default()
        };
        let set = compose(&facts);
        assert_eq!(set.len(), 1);
        assert_eq!(set[0].kind, AddrKind::Direct);
    }

    #[test]
    fn the_set_is_bounded_and_empty_facts_publish_nothing() {
        assert!(compose(&AddressFacts::default()).is_empty());
        let facts = AddressFacts {
            local: (0..40).map(|i| a(&format!("10.0.0.{i}:1"))).collect(),
            ..AddressFacts::default()
        };
        assert_eq!(compose(&facts).len(), MAX_ENDPOINT_ADDRS);
    }

    #[test]
    fn local_only_addresses_are_lan() {
        for ip in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.0.1",
            "127.0.0.1",
            "169.254.1.1",
        ] {
            assert!(is_local(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["::1", "fd00::1", "fe80::1"] {
            assert!(is_local(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["198.51.100.1", "2001:db8::1", "11.250.0.5"] {
            assert!(!is_local(ip.parse().unwrap()), "{ip}");
        }
    }
}
