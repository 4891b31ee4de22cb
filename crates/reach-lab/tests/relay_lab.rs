//! Relays and hole punching against real kernel NATs: every pair of NAT
//! kinds connects by PeerId alone, punches through where a mapping allows,
//! reaches a node whose router maps its port (miniupnpd) directly on the
//! first dial, and relay failover. Needs root and the lab's tools
//! (scripts/test.sh installs them). Without them the tests explain why and
//! pass, unless REACH_LAB_REQUIRED=1 (CI), where they fail.

use std::time::Duration;

use reach_lab::nat::NatKind;
use reach_lab::pairs::{PairMatrixOptions, PairResult, failover, run};

fn lab_available() -> bool {
    reach_lab::netns::lab_available_for_tests()
}

/// What the punch must achieve for a pair: `Some(true)` direct in every
/// run, `Some(false)` stays relayed by design, `None` direct in all but one
/// run (the birthday technique is probabilistic: ~99.97% per attempt).
fn punch_target(p: &PairResult) -> Option<bool> {
    let kinds = [p.a, p.b];
    if p.b.portmap_protocol().is_some() {
        // B's router maps its port: dialed directly, nothing to punch.
        Some(true)
    } else if kinds.contains(&NatKind::UdpBlocked) || kinds == [NatKind::Edm, NatKind::Edm] {
        Some(false)
    } else if kinds.contains(&NatKind::Edm) {
        None
    } else {
        Some(true)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pair_of_nat_kinds_connects_by_peer_id_and_punches_where_mappings_allow() {
    if !lab_available() {
        return;
    }
    let opts = PairMatrixOptions {
        runs: 2,
        ..PairMatrixOptions::default()
    };
    let report = tokio::time::timeout(Duration::from_secs(600), run(&opts))
        .await
        .expect("matrix within 10 minutes")
        .expect("matrix run");
    for p in &report.pairs {
        eprintln!(
            "{:<11} {:<11} connected {}/{} direct {} relayed {} p50 {:?} ms; punch {} {:.0}% {:?} ms {} {}",
            p.a.name(),
            p.b.name(),
            p.connected,
            p.runs,
            p.direct,
            p.relayed,
            p.connect_ms_p50,
            p.strategy,
            p.direct_rate * 100.0,
            p.time_to_direct_ms_p50,
            p.error.as_deref().unwrap_or(""),
            p.punch_error.as_deref().unwrap_or("")
        );
    }
    assert_eq!(
        report.pairs.len(),
        78,
        "every unordered pair of the 12 kinds (8 NAT kinds, udp-blocked, upnp, natpmp, pcp)"
    );
    // A node whose router maps its port is reached directly on the first
    // dial in every run, from behind any NAT (over a TCP link to the mapped
    // TCP port from a UDP-blocked network): no relay, no punch.
    for p in report
        .pairs
        .iter()
        .filter(|p| p.b.portmap_protocol().is_some())
    {
        let pair = format!("{} -> {}: {p:?}", p.a.name(), p.b.name());
        assert_eq!(p.direct, p.runs, "direct on the first dial: {pair}");
        assert_eq!(p.strategy, "direct_dial", "{pair}");
    }
    for p in &report.pairs {
        assert_eq!(
            p.connected,
            p.runs,
            "{} -> {}: {:?}",
            p.a.name(),
            p.b.name(),
            p.error
        );
    }
    // Every connection, direct, relayed or over a TCP link (udp-blocked),
    // negotiated the post-quantum hybrid key exchange.
    for p in &report.pairs {
        assert_eq!(
            p.kx_groups.get(reach::handshake::HYBRID_GROUP_NAME),
            Some(&p.connected),
            "{} -> {}: {:?}",
            p.a.name(),
            p.b.name(),
            p.kx_groups
        );
    }
    // Behind NATs that filter, nodes needed relays and used them.
    assert!(report.pairs.iter().any(|p| p.relayed > 0));
    assert!(report.all_connected);
    for p in &report.pairs {
        let pair = format!("{} x {}: {p:?}", p.a.name(), p.b.name());
        let ended_direct = (p.direct_rate * f64::from(p.runs)).round() as u32;
        match punch_target(p) {
            Some(true) => assert_eq!(ended_direct, p.runs, "direct in every run: {pair}"),
            Some(false) => {
                assert_eq!(ended_direct, 0, "{pair}");
                assert_eq!(p.strategy, "stay_relayed", "{pair}");
            }
            None => {
                assert!(ended_direct + 1 >= p.runs, "{pair}");
                assert_eq!(p.strategy, "birthday", "{pair}");
            }
        }
    }
    // The techniques the coordinator picks.
    let strategy = |a: NatKind, b: NatKind| {
        report
            .pairs
            .iter()
            .find(|p| (p.a, p.b) == (a, b))
            .map(|p| p.strategy.clone())
    };
    assert_eq!(
        strategy(NatKind::EimApdf, NatKind::EimApdf).as_deref(),
        Some("simultaneous_open")
    );
    assert_eq!(
        strategy(NatKind::SameNat, NatKind::SameNat).as_deref(),
        Some("lan_first")
    );
    assert_eq!(
        strategy(NatKind::Public, NatKind::Public).as_deref(),
        Some("direct_dial")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_relay_fails_over_within_ten_seconds_and_the_peer_gets_through_by_key() {
    if !lab_available() {
        return;
    }
    let r = tokio::time::timeout(Duration::from_secs(240), failover())
        .await
        .expect("failover run within 4 minutes")
        .expect("failover run");
    eprintln!("{r:?}");
    assert_ne!(r.new_relay, Some(r.old_relay));
    assert!(
        r.republished_ms <= 10_000,
        "new relay held and republished after {} ms",
        r.republished_ms
    );
    assert!(r.reconnected_ms >= r.new_relay_ms);
}
