//! Relays against real kernel NATs: every pair of NAT kinds connects by
//! PeerId alone, and relay failover. Needs root and the lab's tools
//! (scripts/test.sh installs them). Without them the tests explain why and
//! pass, unless REACH_LAB_REQUIRED=1 (CI), where they fail.

use std::time::Duration;

use reach_lab::pairs::{PairMatrixOptions, failover, run};

fn lab_available() -> bool {
    reach_lab::netns::lab_available_for_tests()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pair_of_nat_kinds_connects_by_peer_id_alone() {
    if !lab_available() {
        return;
    }
    let opts = PairMatrixOptions {
        runs: 2,
        ..PairMatrixOptions::default()
    };
    let report = tokio::time::timeout(Duration::from_secs(420), run(&opts))
        .await
        .expect("matrix within 7 minutes")
        .expect("matrix run");
    for p in &report.pairs {
        eprintln!(
            "{:<9} {:<9} connected {}/{} direct {} relayed {} p50 {:?} ms {}",
            p.a.name(),
            p.b.name(),
            p.connected,
            p.runs,
            p.direct,
            p.relayed,
            p.connect_ms_p50,
            p.error.as_deref().unwrap_or("")
        );
    }
    assert_eq!(
        report.pairs.len(),
        45,
        "every unordered pair of the 9 kinds (8 NAT kinds and udp-blocked)"
    );
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
    // Behind NATs that filter, nodes needed relays and used them.
    assert!(report.pairs.iter().any(|p| p.relayed > 0));
    assert!(report.all_connected);
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
