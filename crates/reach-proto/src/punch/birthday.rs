//! The birthday technique for a NAT that maps every destination to a new
//! port (endpoint-dependent mapping), facing one that does not.
//!
//! The hard side opens [`BIRTHDAY_SOCKETS`] sockets and sends one packet
//! from each towards the easy side's address: its NAT creates that many
//! mappings at ports nobody can predict. The easy side, whose one mapping
//! is known, sends probes to distinct random ports of the hard side's IP;
//! a probe that hits one of those mappings comes from exactly the address
//! the mapping was made for, so the hard NAT lets it in, and the socket
//! behind it has found a path. With 256 mappings among 64,512 ports and
//! 2,048 probes, a hit is ~99.97% likely (see [`hit_probability`]).

/// Sockets (mappings) the hard side opens.
pub const BIRTHDAY_SOCKETS: usize = 256;
/// Probes the easy side sends at most per attempt.
pub const BIRTHDAY_PROBES: usize = 2048;
/// Probes per second at most: a burst of 2,048 small packets paced over
/// about a second, gentle on the NATs' tables and the path.
pub const BIRTHDAY_PROBE_RATE: u32 = 2000;
/// The lowest port NATs allocate (below it lie the well-known ports).
pub const FIRST_NAT_PORT: u16 = 1024;
/// How many ports a NAT may allocate from.
pub const NAT_PORTS: u32 = 65536 - FIRST_NAT_PORT as u32;

/// The chance that `probes` distinct random ports hit at least one of
/// `mappings` random ports among `ports`.
pub fn hit_probability(mappings: usize, probes: usize, ports: u32) -> f64 {
    // P(all miss) = C(ports - mappings, probes) / C(ports, probes).
    let mut miss = 1.0f64;
    let n = f64::from(ports);
    for i in 0..probes {
        let i = i as f64;
        miss *= (n - mappings as f64 - i).max(0.0) / (n - i);
    }
    1.0 - miss
}

/// Distinct ports in `FIRST_NAT_PORT..=65535`, in a pseudo-random order
/// drawn from `seed`: a full-period walk `start + i·step (mod NAT_PORTS)`
/// with `step` coprime to `NAT_PORTS`, so no port repeats within
/// `NAT_PORTS` probes.
pub fn probe_ports(seed: u64) -> impl Iterator<Item = u16> {
    let n = u64::from(NAT_PORTS);
    let start = seed % n;
    // NAT_PORTS = 2^10 · 3^2 · 7: a step that none of those divide.
    let mut step = ((seed >> 20) % n) | 1;
    while step.is_multiple_of(3) || step.is_multiple_of(7) {
        step += 2;
    }
    (0..n).map(move |i| {
        let offset = (start + i * step) % n;
        // offset < NAT_PORTS, so the sum fits a u16.
        (u64::from(FIRST_NAT_PORT) + offset) as u16
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn the_default_budget_almost_always_hits() {
        let p = hit_probability(BIRTHDAY_SOCKETS, BIRTHDAY_PROBES, NAT_PORTS);
        assert!(p > 0.999, "{p}");
        // Fewer probes, less luck: the budget matters.
        assert!(hit_probability(BIRTHDAY_SOCKETS, 256, NAT_PORTS) < 0.7);
        assert_eq!(hit_probability(0, 100, NAT_PORTS), 0.0);
    }

    #[test]
    fn probe_ports_are_distinct_and_in_range() {
        for seed in [0, 1, 12345, u64::MAX, 0xdead_beef_cafe] {
            let ports: Vec<u16> = probe_ports(seed).take(BIRTHDAY_PROBES * 4).collect();
            let distinct: HashSet<u16> = ports.iter().copied().collect();
            assert_eq!(distinct.len(), ports.len(), "seed {seed}");
            assert!(ports.iter().all(|&p| p >= FIRST_NAT_PORT));
        }
        let all: HashSet<u16> = probe_ports(99).collect();
        assert_eq!(all.len() as u32, NAT_PORTS);
        // Different seeds, different orders.
        let a: Vec<u16> = probe_ports(1).take(8).collect();
        let b: Vec<u16> = probe_ports(2 << 20).take(8).collect();
        assert_ne!(a, b);
    }
}
