//! Hole punching against real kernel NATs: a relayed connection upgrades to
//! direct while messages flow, falls back to the relay when the direct path
//! dies and becomes direct again when it returns, with every message
//! delivered exactly once and no send error.
//! (The per-pair punch results are asserted with the matrix in
//! `relay_lab.rs`.) Needs root and the lab's tools, like the other lab
//! tests.

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_loses_nothing_and_a_dead_direct_path_falls_back_to_the_relay() {
    if !reach_lab::netns::lab_available_for_tests() {
        return;
    }
    let r = tokio::time::timeout(Duration::from_secs(240), reach_lab::pairs::upgrade())
        .await
        .expect("upgrade run within 4 minutes")
        .expect("upgrade run");
    eprintln!("{r:?}");
    assert_eq!(r.technique, "simultaneous_open");
    assert_eq!(r.send_errors, 0, "no send failed");
    assert_eq!(r.received, r.sent, "every message arrived");
    assert_eq!(r.duplicates, 0, "no message arrived twice");
    // The liveness watch declares a silent path dead after 3 s.
    assert!(
        r.fallback_ms <= 10_000,
        "back on the relay after {} ms",
        r.fallback_ms
    );
    // The dialer's node said so as it happened: connected over the relay,
    // direct after the punch, relayed after the cut, direct again.
    assert_eq!(
        r.path_events,
        ["relayed", "direct", "relayed", "direct"],
        "path events for the target"
    );
    // (`upgrade` fails unless the connection became direct again after the
    // path came back: the dialer punches again 30 s after a fallback.)
}
