//! A small `reach bench topics` in the test suite: a home in a `reach node`
//! process of its own, members publishing through it, two federated homes,
//! and a flood from a flooder process of its own. The full-size targets
//! are checked by the command itself (see the README); here: every
//! forwarded message arrives once and in order, a publish crosses the
//! federation hop, and the flooded home refuses the flood while the quiet
//! topic keeps delivering (the push-back itself: topics_hostile's
//! `a_member_flooding_over_its_rate_is_read_no_faster_than_its_rate`).

use std::process::Command;

mod common;
use common::REACH;

#[test]
fn a_small_topics_bench_forwards_in_order_and_refuses_the_flood() {
    let out = Command::new(REACH)
        .args([
            "bench",
            "topics",
            "--json",
            "--messages",
            "20",
            "--latency-messages",
            "20",
        ])
        .output()
        .expect("run reach bench topics");
    // The JSON is printed whether or not the targets were met (a debug
    // build on a shared machine need not meet them).
    let r = common::json_line(&out);
    let n = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("no {k} in {r}"));
    assert_eq!(r["forward_in_order_once"], true, "{r}");
    assert!(n("hop_two_homes_p50_ms") > 0.0, "{r}");
    assert!(n("flood_quiet_p99_flooded_ms") > 0.0, "{r}");
    assert!(n("flood_refused") > 0.0, "the home refused the flood: {r}");
    assert!(n("flood_offered_per_s") > n("flood_limit_per_s"), "{r}");
}
