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
/// Longest fire delay a side accepts: far above any RTT-derived delay, and
/// a punch must not hold its slot for long on a coordinator's word.
pub const MAX_FIRE_DELAY_MS: u32 = 2000;

/// What a peer tells a coordinator about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PunchInfo {
    /// Its NAT's mapping behaviour (picks the technique).
    pub mapping: Mapping,
    /// Its NAT's filtering behaviour.
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
    /// Same external IP: LAN addresses first, then the NAT's hairpin
    /// ([`Strategy::LanFirst`]).
    LanFirst,
    /// Both send to the other's observed address at the same moment
    /// ([`Strategy::SimultaneousOpen`]).
    SimultaneousOpen,
    /// Many mappings against random ports, for an endpoint-dependent NAT
    /// ([`Strategy::Birthday`]).
    Birthday,
    /// No technique can work for this pair: keep the relay
    /// ([`Strategy::StayRelayed`]).
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
    /// How to punch.
    pub technique: Technique,
    /// This side's part in the technique.
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
    /// Who it is.
    pub peer: PeerId,
    /// What it said about its NAT and its addresses.
    pub info: PunchInfo,
    /// Its address as seen on its own connection to the coordinator.
    pub observed: SocketAddr,
    /// The round-trip time of that connection.
    pub rtt: Duration,
}

/// Whether `a` is a LAN address a punch may be aimed at: private,
/// shared (100.64/10), link-local or unique-local, never loopback (that
/// would aim at the other side's own host) and never a public address (the
/// claim cannot be checked, so it must not point at the internet).
pub(crate) fn is_lan_target(a: &SocketAddr) -> bool {
    use std::net::IpAddr;
    if a.port() == 0 {
        return false;
    }
    match a.ip() {
        IpAddr::V4(v4) => {
            let [x, y, ..] = v4.octets();
            v4.is_private() || v4.is_link_local() || (x == 100 && (64..128).contains(&y))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80
        }
    }
}

/// Whether an introduction is one this side may act on: a technique with
/// addresses, at most one observed address plus [`MAX_LAN_ADDRS`] LAN ones
/// (only LAN-first has any), none unspecified or multicast, and a fire
/// delay of at most [`MAX_FIRE_DELAY_MS`]. A coordinator is another node:
/// what it says is bounded before a packet goes out.
pub fn acceptable(intro: &Introduction) -> bool {
    let sendable =
        |a: &SocketAddr| a.port() != 0 && !a.ip().is_unspecified() && !a.ip().is_multicast();
    let Some((observed, lan)) = intro.addrs.split_last() else {
        return false;
    };
    let lan_ok = match intro.technique {
        Technique::LanFirst => lan.len() <= MAX_LAN_ADDRS && lan.iter().all(is_lan_target),
        _ => lan.is_empty(),
    };
    intro.technique != Technique::StayRelayed
        && sendable(observed)
        && lan_ok
        && intro.fire_in_ms <= MAX_FIRE_DELAY_MS
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
        let lan = p
            .info
            .lan
            .iter()
            .filter(|a| is_lan_target(a))
            .take(MAX_LAN_ADDRS);
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
            &["10.0.0.2:4000", "0.0.0.0:1", "127.0.0.1:4000", "8.8.8.8:53"],
            10,
        );
        let b = party(EDM, "198.51.100.7:4001", &["10.0.0.3:4001"], 10);
        let (ia, ib) = introduce(1, &a, &b, 0);
        assert_eq!(ia.technique, Technique::LanFirst);
        assert_eq!(ia.addrs, vec!["10.0.0.3:4001".parse().unwrap(), b.observed]);
        // Unspecified, loopback and public "LAN" addresses are never passed on.
        assert_eq!(ib.addrs, vec!["10.0.0.2:4000".parse().unwrap(), a.observed]);
        assert!(acceptable(&ia) && acceptable(&ib));
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

    #[test]
    fn a_side_refuses_introductions_beyond_the_bounds() {
        let a = party(EIM, "198.51.100.7:4000", &[], 10);
        let b = party(EIM, "203.0.113.9:5000", &[], 10);
        let (good, _) = introduce(1, &a, &b, 0);
        assert!(acceptable(&good));
        let mut many = good.clone();
        many.addrs.push("203.0.113.10:1".parse().unwrap());
        assert!(!acceptable(&many), "a second public address");
        let mut late = good.clone();
        late.fire_in_ms = MAX_FIRE_DELAY_MS + 1;
        assert!(!acceptable(&late));
        let mut none = good.clone();
        none.addrs.clear();
        assert!(!acceptable(&none));
        let mut lan = good.clone();
        lan.technique = Technique::LanFirst;
        lan.addrs.insert(0, "1.1.1.1:53".parse().unwrap());
        assert!(!acceptable(&lan), "a public address posing as LAN");
        lan.addrs[0] = "192.168.1.5:4000".parse().unwrap();
        assert!(acceptable(&lan));
    }

    #[test]
    fn lan_targets_are_private_ranges_only() {
        for ok in [
            "10.1.2.3:1",
            "172.16.0.1:1",
            "192.168.0.1:1",
            "100.64.0.1:1",
            "169.254.1.1:1",
            "[fd00::1]:1",
            "[fe80::1]:1",
        ] {
            assert!(is_lan_target(&ok.parse().unwrap()), "{ok}");
        }
        for bad in [
            "127.0.0.1:1",
            "8.8.8.8:1",
            "100.128.0.1:1",
            "[::1]:1",
            "[2001:db8::1]:1",
            "10.0.0.1:0",
        ] {
            assert!(!is_lan_target(&bad.parse().unwrap()), "{bad}");
        }
    }
}
