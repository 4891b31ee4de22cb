//! The NAT lab against real kernel NATs. Needs root and the lab's tools
//! (scripts/test.sh installs them). Without them the test explains why and
//! passes, unless REACH_LAB_REQUIRED=1 (CI), where it fails.

use reach_lab::matrix::{NatMatrixOptions, run};

fn lab_available() -> bool {
    reach_lab::netns::lab_available_for_tests()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_nat_kind_is_classified_as_configured_and_agrees_with_coturn() {
    if !lab_available() {
        return;
    }
    let report = tokio::time::timeout(
        std::time::Duration::from_secs(240),
        run(&NatMatrixOptions::default()),
    )
    .await
    .expect("lab run within 4 minutes")
    .expect("lab run");
    for k in &report.kinds {
        eprintln!(
            "{:<9} expected {:?}/{:?} measured {:?}/{:?} external {:?} coturn {:?} interop {}",
            k.kind.name(),
            k.expected_mapping,
            k.expected_filtering,
            k.measured_mapping,
            k.measured_filtering,
            k.external,
            k.coturn_external,
            k.stunclient_interop
        );
    }
    for k in &report.kinds {
        assert!(
            k.matches,
            "{}: classification differs: {k:?}",
            k.kind.name()
        );
        assert!(
            k.coturn_agrees,
            "{}: coturn disagrees: {k:?}",
            k.kind.name()
        );
        assert!(
            k.stunclient_interop,
            "{}: turnutils_stunclient failed",
            k.kind.name()
        );
    }
    assert!(report.all_match);
}
