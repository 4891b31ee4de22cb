//! The coordinator's part of a hole punch: from what each peer says about
//! its NAT and what the coordinator itself observes, one introduction for
//! each side.
//!
//! ```text
//! A (requester)            coordinator C              B (target)
//!   ── Punch{B, info_A} ──►
//!                           introduce(A, B)
//!   ◄── Introduction ─────  ── Introduction ────────►
//!   (wait fire_in_ms)                          (wait fire_in_ms)
//!   ══ punch packets ══════════════════════════════► ◄═══ punch packets
//!   ══ QUIC handshake (the dialer) ═════════════════►
//! ```
//!
//! Anti-reflection: the address each side is sent to is the one the
//! coordinator *observed* on the other side's own connection to it, never an
//! address a peer merely claims, so nobody can aim a punch at a third party.
//! LAN addresses (which nobody can prove) are passed on only when both peers
//! come from one external IP (they are behind one NAT), and at most
//! [`MAX_LAN_ADDRS`] of them.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::strategy::{self, NatClass, Side, Strategy};
use crate::PeerId;
use crate::nat::{Filtering, Mapping};

/// LAN addresses a peer may offer for a punch.
pub const MAX_LAN_ADDRS: usize = 4;

/// What a peer tells a coordinator about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PunchInfo {
    pub mapping: Mapping,
    pub filtering: Filtering,
    /// Whether the peer can use UDP at all (false: it reaches the world
    /// only over TCP links, and a punch cannot help).
    pub udp: bool,
    /// Its addresses on its own networks.
    pub lan: Vec<SocketAddr>,
}

impl PunchInfo {
    /// A peer that knows nothing about its NAT yet.
    pub fn unknown() -> Self {
        PunchInfo {
            mapping: Mapping::Unknown,
            filtering: Filtering::Unknown,
            udp: true,
            lan: Vec::new(),
        }
    }

    fn class(&self) -> NatClass {
        NatClass {
            mapping: self.mapping,
            filtering: self.filtering,
        }
    }
}

/// The technique of one punch, as the wire names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Technique {
    LanFirst,
    SimultaneousOpen,
    Birthday,
    StayRelayed,
}

impl Technique {
    /// Every technique, in the order stats list them.
    pub const ALL: [Technique; 4] = [
        Technique::LanFirst,
        Technique::SimultaneousOpen,
        Technique::Birthday,
        Technique::StayRelayed,
    ];

    /// The stable name used in stats and the matrix.
    pub fn name(&self) -> &'static str {
        match self {
            Technique::LanFirst => "lan_first",
            Technique::SimultaneousOpen => "simultaneous_open",
            Technique::Birthday => "birthday",
            Technique::StayRelayed => "stay_relayed",
        }
    }
}

/// What one side does in a punch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Starts the QUIC handshake once a punch packet got through. In the
    /// birthday technique, the hard side: it opens many mappings and dials
    /// from the one that got through.
    Dialer,
    /// Punches and waits for the handshake. In the birthday technique, the
    /// easy side: it probes ports of the hard side's IP.
    Listener,
}

/// The coordinator's message to one side of a punch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Introduction {
    /// The punch's token: punch packets carry it, nothing else matches.
    pub id: u64,
    /// The other side.
    pub peer: PeerId,
    pub technique: Technique,
    pub role: Role,
    /// Where to send: the other side's address as the coordinator observed
    /// it, then (same NAT only) its LAN addresses.
    pub addrs: Vec<SocketAddr>,
    /// Wait this long after receiving the introduction, then start: both
    /// sides start at the same moment.
    pub fire_in_ms: u32,
    /// 0 for the first attempt; retries alternate the roles.
    pub attempt: u32,
}

/// One side of a punch as the coordinator sees it.
#[derive(Debug, Clone)]
pub struct Party {
    pub peer: PeerId,
    pub info: PunchInfo,
    /// Its address as seen on its own connection to the coordinator.
    pub observed: SocketAddr,
    /// The round-trip time of that connection.
    pub rtt: Duration,
}

/// Whether an address a peer offers is one a punch may be aimed at.
fn usable(a: &SocketAddr) -> bool {
    let ip = a.ip();
    a.port() != 0
        && !ip.is_unspecified()
        && !ip.is_multicast()
        && ip != std::net::Ipv4Addr::BROADCAST
}

/// The two introductions (requester's, target's) of attempt `attempt` of
/// punch `id`.
pub fn introduce(
    id: u64,
    requester: &Party,
    target: &Party,
    attempt: u32,
) -> (Introduction, Introduction) {
    let same_ip = requester.observed.ip() == target.observed.ip();
    let strategy = if requester.info.udp && target.info.udp {
        strategy::choose(requester.info.class(), target.info.class(), same_ip)
    } else {
        Strategy::StayRelayed
    };
    let (technique, dialer) = match strategy {
        Strategy::LanFirst => (Technique::LanFirst, strategy::initiator(attempt)),
        Strategy::SimultaneousOpen => (Technique::SimultaneousOpen, strategy::initiator(attempt)),
        Strategy::Birthday { hard } => (Technique::Birthday, hard),
        Strategy::StayRelayed => (Technique::StayRelayed, Side::A),
    };
    let delays = strategy::fire_delays(requester.rtt, target.rtt);
    let addrs_of = |p: &Party| -> Vec<SocketAddr> {
        if technique == Technique::StayRelayed {
            return Vec::new();
        }
        let lan = p.info.lan.iter().filter(|a| usable(a)).take(MAX_LAN_ADDRS);
        let mut out: Vec<SocketAddr> = if technique == Technique::LanFirst {
            lan.copied().chain([p.observed]).collect()
        } else {
            vec![p.observed]
        };
        out.dedup();
        out
    };
    let ms = |d: Duration| d.as_millis().min(u128::from(u32::MAX)) as u32;
    let role = |side: Side| {
        if side == dialer {
            Role::Dialer
        } else {
            Role::Listener
        }
    };
    (
        Introduction {
            id,
            peer: target.peer,
            technique,
            role: role(Side::A),
            addrs: addrs_of(target),
            fire_in_ms: ms(delays.a),
            attempt,
        },
        Introduction {
            id,
            peer: requester.peer,
            technique,
            role: role(Side::B),
            addrs: addrs_of(requester),
            fire_in_ms: ms(delays.b),
            attempt,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Keypair;

    fn party(mapping: Mapping, observed: &str, lan: &[&str], rtt_ms: u64) -> Party {
        Party {
            peer: Keypair::generate().peer_id(),
            info: PunchInfo {
                mapping,
                filtering: Filtering::AddressAndPortDependent,
                udp: true,
                lan: lan.iter().map(|a| a.parse().unwrap()).collect(),
            },
            observed: observed.parse().unwrap(),
            rtt: Duration::from_millis(rtt_ms),
        }
    }

    const EIM: Mapping = Mapping::EndpointIndependent;
    const EDM: Mapping = Mapping::EndpointDependent;

    #[test]
    fn each_side_is_sent_to_the_address_the_coordinator_observed() {
        let a = party(EIM, "198.51.100.7:4000", &["10.0.0.2:4000"], 40);
        let b = party(EIM, "203.0.113.9:5000", &["10.0.1.2:5000"], 100);
        let (ia, ib) = introduce(7, &a, &b, 0);
        assert_eq!(ia.technique, Technique::SimultaneousOpen);
        assert_eq!(ia.addrs, vec![b.observed], "no unprovable LAN address");
        assert_eq!(ib.addrs, vec![a.observed]);
        assert_eq!((ia.peer, ib.peer), (b.peer, a.peer));
        assert_eq!((ia.id, ib.id), (7, 7));
        // Synchronised: A hears at 20 ms, B at 50 ms.
        assert_eq!(20 + ia.fire_in_ms, 50 + ib.fire_in_ms);
    }

    #[test]
    fn retries_swap_who_dials() {
        let a = party(EIM, "198.51.100.7:4000", &[], 10);
        let b = party(EIM, "203.0.113.9:5000", &[], 10);
        let (a0, b0) = introduce(1, &a, &b, 0);
        let (a1, b1) = introduce(2, &a, &b, 1);
        assert_eq!((a0.role, b0.role), (Role::Dialer, Role::Listener));
        assert_eq!((a1.role, b1.role), (Role::Listener, Role::Dialer));
    }

    #[test]
    fn behind_one_nat_lan_addresses_come_first() {
        let a = party(
            EIM,
            "198.51.100.7:4000",
            &["10.0.0.2:4000", "0.0.0.0:1"],
            10,
        );
        let b = party(EDM, "198.51.100.7:4001", &["10.0.0.3:4001"], 10);
        let (ia, ib) = introduce(1, &a, &b, 0);
        assert_eq!(ia.technique, Technique::LanFirst);
        assert_eq!(ia.addrs, vec!["10.0.0.3:4001".parse().unwrap(), b.observed]);
        // The unusable address is never passed on.
        assert_eq!(ib.addrs, vec!["10.0.0.2:4000".parse().unwrap(), a.observed]);
    }

    #[test]
    fn lan_addresses_are_bounded() {
        let lan: Vec<String> = (0..20).map(|i| format!("10.0.0.{i}:1")).collect();
        let lan: Vec<&str> = lan.iter().map(|s| s.as_str()).collect();
        let a = party(EIM, "198.51.100.7:4000", &lan, 10);
        let b = party(EIM, "198.51.100.7:4001", &[], 10);
        let (_, ib) = introduce(1, &a, &b, 0);
        assert_eq!(ib.addrs.len(), MAX_LAN_ADDRS + 1);
    }

    #[test]
    fn the_hard_side_dials_in_the_birthday_technique() {
        let easy = party(EIM, "198.51.100.7:4000", &[], 10);
        let hard = party(EDM, "203.0.113.9:5000", &[], 10);
        for attempt in 0..3 {
            let (ie, ih) = introduce(1, &easy, &hard, attempt);
            assert_eq!(ie.technique, Technique::Birthday);
            assert_eq!((ie.role, ih.role), (Role::Listener, Role::Dialer));
            let (ih, ie) = introduce(1, &hard, &easy, attempt);
            assert_eq!((ih.role, ie.role), (Role::Dialer, Role::Listener));
        }
    }

    #[test]
    fn no_udp_or_two_hard_sides_stay_relayed_with_no_address_to_send_to() {
        let mut tcp = party(EIM, "198.51.100.7:4000", &[], 10);
        tcp.info.udp = false;
        let b = party(EIM, "203.0.113.9:5000", &[], 10);
        let (ia, ib) = introduce(1, &tcp, &b, 0);
        assert_eq!(ia.technique, Technique::StayRelayed);
        assert!(ia.addrs.is_empty() && ib.addrs.is_empty());
        let h1 = party(EDM, "198.51.100.7:4000", &[], 10);
        let h2 = party(EDM, "203.0.113.9:5000", &[], 10);
        assert_eq!(
            introduce(1, &h1, &h2, 0).0.technique,
            Technique::StayRelayed
        );
    }
}
