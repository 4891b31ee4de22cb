//! Topics across federated homes behind real kernel NATs (`reach lab
//! rooms`): members behind every NAT kind of the lab, four relays in a
//! configured federation cycle plus links found through the DHT, every
//! message once and in order, presence within 2 s, and a relay killed
//! mid-stream. Needs root and the lab's tools (scripts/test.sh installs
//! them). Without them the test explains why and passes, unless
//! REACH_LAB_REQUIRED=1 (CI), where it fails. One test in this binary, so
//! nothing else of the lab runs beside it.

use std::time::Duration;

use reach_lab::rooms::{RoomsOptions, STALE_DROP_LIMIT, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_reach_every_nat_kind_once_in_order_and_survive_a_relay_killed_mid_stream() {
    if !reach_lab::netns::lab_available_for_tests() {
        return;
    }
    let opts = RoomsOptions {
        messages: 10,
        before_kill: 5,
        after_rehome: 10,
        ..RoomsOptions::default()
    };
    let r = tokio::time::timeout(Duration::from_secs(300), run(&opts))
        .await
        .expect("rooms run within 5 minutes")
        .expect("rooms run");
    eprintln!(
        "{}",
        serde_json::to_string_pretty(&r).unwrap_or_else(|e| e.to_string())
    );
    // Homes: the four relays and the members that are their own homes;
    // links: the configured cycle and some found through the DHT.
    assert!(r.home_count >= 6, "homes: {:?}", r.homes);
    assert_eq!(r.links.configured_up, 4, "{:?}", r.links);
    assert!(r.links.discovered >= 1, "{:?}", r.links);
    for kind in reach_lab::nat::MATRIX_KINDS {
        assert!(
            r.members_per_kind.contains_key(kind.name()),
            "a member behind {}",
            kind.name()
        );
    }
    assert!(
        r.members.iter().any(|m| m.relay_homed),
        "some members are homed at relays"
    );
    // Presence: a join seen everywhere within 2 s.
    let p = r.presence_converge_ms.expect("presence converged");
    assert!(p <= 2_000, "presence converged after {p} ms");
    // Steady: every message once, in order, to every member.
    let s = &r.steady;
    assert_eq!(s.published, 10 * r.publishers.len() as u64, "{s:?}");
    assert!(s.publish_errors.is_empty(), "{s:?}");
    assert_eq!(s.delivered, s.expected, "{s:?}");
    assert_eq!(s.expected, s.published * r.members.len() as u64, "{s:?}");
    assert_eq!(
        (s.duplicates, s.order_violations, s.missed_events),
        (0, 0, 0)
    );
    // The relay killed mid-stream: its members re-home on another relay,
    // get what was published after, nothing twice or out of order; the
    // dead home leaves every view within 15 s.
    let f = &r.failover;
    assert!(f.killed_relay.is_some());
    assert!(!f.rehome_ms.is_empty(), "the killed relay had members");
    for (m, t) in &f.rehome_ms {
        assert!(t.is_some(), "{m} re-homed: {:?}", r.failed);
        assert!(f.rehomed_to[m].is_some() && f.rehomed_to[m] != f.killed_relay);
    }
    let ph = &f.phase;
    assert!(ph.published > 0, "{ph:?}");
    assert_eq!(ph.delivered, ph.expected, "{ph:?}");
    assert_eq!(
        (ph.duplicates, ph.order_violations, ph.missed_events),
        (0, 0, 0)
    );
    let stale = f.stale_drop_ms_max.expect("the dead home dropped out");
    assert!(
        stale <= STALE_DROP_LIMIT.as_millis() as u64,
        "the dead home dropped out after {stale} ms"
    );
    assert_eq!(f.saw_left_from_dead_home, f.survivors);
    // Nobody alive left anyone's view, and every view holds exactly the
    // survivors (the re-homed members included).
    assert_eq!(f.spurious_leaves, 0, "{:?}", f.spurious_leave_samples);
    assert!(f.views_whole_ms.is_some(), "{:?}", r.failed);
    assert!(r.passed, "failed checks: {:?}", r.failed);
}
