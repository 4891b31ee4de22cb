//! Which hole-punching technique a pair of NATs calls for, and the
//! synchronised moment both sides start sending.
//!
//! Pure functions of what the classification found and what the coordinator
//! measured, so they are tested exhaustively here.

use std::time::Duration;

use crate::nat::{Filtering, Mapping};

/// What a peer's classification said about its NAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatClass {
    /// Its mapping behaviour.
    pub mapping: Mapping,
    /// Its filtering behaviour.
    pub filtering: Filtering,
}

/// The technique for one pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Both behind one NAT (same external IP): LAN addresses first, then
    /// the NAT's hairpin.
    LanFirst,
    /// At least one side maps endpoint-independently: both send to the
    /// other's observed address at the same moment from the main socket.
    SimultaneousOpen,
    /// One side maps per destination (`hard`), the other does not: the hard
    /// side opens many mappings towards the easy side, the easy side probes
    /// random ports of the hard side's IP (the birthday technique).
    Birthday {
        /// The side that maps per destination.
        hard: Side,
    },
    /// Both map per destination, or a mapping is unknown: stay relayed.
    StayRelayed,
}

/// One of the two peers of a punch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The peer that asked for the punch.
    A,
    /// The peer it wants to reach.
    B,
}

/// Picks the technique for peers `a` and `b`; `same_external_ip` when the
/// coordinator saw both come from one IP.
pub fn choose(a: NatClass, b: NatClass, same_external_ip: bool) -> Strategy {
    use Mapping::*;
    if same_external_ip {
        return Strategy::LanFirst;
    }
    match (a.mapping, b.mapping) {
        (EndpointIndependent, _) | (_, EndpointIndependent) => match (a.mapping, b.mapping) {
            (EndpointDependent, EndpointIndependent) => Strategy::Birthday { hard: Side::A },
            (EndpointIndependent, EndpointDependent) => Strategy::Birthday { hard: Side::B },
            // One side unknown, the other easy: a simultaneous open works
            // whenever the unknown side turns out easy, and costs little.
            _ => Strategy::SimultaneousOpen,
        },
        _ => Strategy::StayRelayed,
    }
}

/// Who sends first on attempt `attempt` (0-based): retries alternate the
/// roles instead of repeating the same attempt. (In the birthday technique
/// the hard side's role is fixed by its NAT; this flips who starts.)
pub(crate) fn initiator(attempt: u32) -> Side {
    if attempt.is_multiple_of(2) {
        Side::A
    } else {
        Side::B
    }
}

/// The margin added to the fire time so both introductions have surely
/// arrived (jitter of the path to the slower side).
pub const FIRE_MARGIN: Duration = Duration::from_millis(20);

/// When each side fires, as a delay after it receives its introduction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FireDelays {
    /// Side A's delay.
    pub a: Duration,
    /// Side B's delay.
    pub b: Duration,
}

/// The coordinator sends both introductions at once; the one to A arrives
/// after `rtt_a / 2`, the one to B after `rtt_b / 2`. Both sides must fire
/// at the same moment: the later arrival plus [`FIRE_MARGIN`]. Each side's
/// delay is that moment minus its own arrival time.
pub fn fire_delays(rtt_a: Duration, rtt_b: Duration) -> FireDelays {
    let arrive_a = rtt_a / 2;
    let arrive_b = rtt_b / 2;
    let fire = arrive_a.max(arrive_b) + FIRE_MARGIN;
    FireDelays {
        a: fire - arrive_a,
        b: fire - arrive_b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EIM: Mapping = Mapping::EndpointIndependent;
    const EDM: Mapping = Mapping::EndpointDependent;
    const UNK: Mapping = Mapping::Unknown;

    fn class(mapping: Mapping) -> NatClass {
        NatClass {
            mapping,
            filtering: Filtering::AddressAndPortDependent,
        }
    }

    #[test]
    fn strategy_by_pair_of_mappings() {
        let cases = [
            (EIM, EIM, Strategy::SimultaneousOpen),
            (EIM, UNK, Strategy::SimultaneousOpen),
            (UNK, EIM, Strategy::SimultaneousOpen),
            (EDM, EIM, Strategy::Birthday { hard: Side::A }),
            (EIM, EDM, Strategy::Birthday { hard: Side::B }),
            (EDM, EDM, Strategy::StayRelayed),
            (EDM, UNK, Strategy::StayRelayed),
            (UNK, UNK, Strategy::StayRelayed),
        ];
        for (a, b, want) in cases {
            assert_eq!(choose(class(a), class(b), false), want, "{a:?} x {b:?}");
        }
    }

    #[test]
    fn same_nat_goes_lan_first_whatever_the_mapping() {
        for m in [EIM, EDM, UNK] {
            assert_eq!(choose(class(m), class(m), true), Strategy::LanFirst);
        }
    }

    #[test]
    fn filtering_alone_never_changes_the_strategy() {
        let open = NatClass {
            mapping: EIM,
            filtering: Filtering::EndpointIndependent,
        };
        assert_eq!(
            choose(open, class(EIM), false),
            choose(class(EIM), class(EIM), false)
        );
    }

    #[test]
    fn retries_alternate_the_initiator() {
        assert_eq!(initiator(0), Side::A);
        assert_eq!(initiator(1), Side::B);
        assert_eq!(initiator(2), Side::A);
    }

    #[test]
    fn both_sides_fire_at_the_same_moment_after_the_later_arrival() {
        let ms = Duration::from_millis;
        let d = fire_delays(ms(100), ms(40));
        // A hears at 50 ms, B at 20 ms; both fire at 50 + margin.
        assert_eq!(ms(50) + d.a, ms(20) + d.b);
        assert_eq!(d.a, FIRE_MARGIN);
        assert_eq!(d.b, ms(30) + FIRE_MARGIN);
        let even = fire_delays(ms(60), ms(60));
        assert_eq!(even.a, even.b);
        let zero = fire_delays(Duration::ZERO, Duration::ZERO);
        assert_eq!(zero.a, FIRE_MARGIN);
    }
}
