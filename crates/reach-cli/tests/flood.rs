//! A small `reach bench flood` in the test suite: a real `reach node`
//! process flooded from one loopback address while an honest peer at
//! another keeps sending. The full-size targets are checked by the command
//! itself (see the README); here: every honest message arrives, the flood
//! is refused, and the target's memory stays bounded (loosely: a debug
//! build on a shared machine).

use std::process::Command;

mod common;
use common::REACH;

#[test]
fn a_small_flood_is_refused_while_the_honest_peer_delivers_everything() {
    let out = Command::new(REACH)
        .args([
            "bench",
            "flood",
            "--json",
            "--handshakes",
            "2000",
            "--churn",
            "2000",
        ])
        .output()
        .expect("run reach bench flood");
    let r = common::json_line(&out);
    let n = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("no {k} in {r}"));
    assert!(n("honest_sent_under_flood") > 0.0, "{r}");
    assert_eq!(n("honest_delivered"), n("honest_sent"), "{r}");
    assert_eq!(n("handshakes"), 2000.0);
    assert!(
        n("handshakes_refused") > 0.0,
        "the per-IP limit refused: {r}"
    );
    // The per-IP limit holds while the flood's connections stay open.
    assert!(n("handshakes_accepted") < 2000.0, "{r}");
    assert_eq!(
        n("handshakes_accepted") + n("handshakes_refused") + n("handshakes_failed"),
        2000.0
    );
    assert!(n("churn_accepted") > 0.0, "{r}");
    assert!(n("target_peers_evicted") > 0.0, "{r}");
    assert!(
        n("target_peer_table_size") <= 1024.0 + 1024.0 / 8.0 + 2.0,
        "{r}"
    );
    assert!(n("target_peak_rss_mib") < 512.0, "{r}");
}
