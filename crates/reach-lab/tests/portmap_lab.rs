//! Port mapping against real miniupnpd (`reach lab portmap`): for each
//! protocol a node behind a router speaking only it maps its port within
//! the target, is verified and reached directly by a stranger, renews,
//! re-maps after the router restarts and after its table is flushed, and
//! leaves no mapping after a clean shutdown; behind a router that lies
//! about its external address, the lie is caught and never published; and
//! through an IPv6 firewall a PCP pinhole makes a node reachable. Needs root and the lab's
//! tools (scripts/test.sh installs them, miniupnpd included). Without them
//! the test explains why and passes, unless REACH_LAB_REQUIRED=1 (CI),
//! where it fails.

use std::time::Duration;

use reach_lab::portmap::{PortmapOptions, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_port_mapping_protocol_maps_verifies_renews_remaps_and_cleans_up() {
    if !reach_lab::netns::lab_available_for_tests() {
        return;
    }
    let opts = PortmapOptions::default();
    let report = tokio::time::timeout(Duration::from_secs(300), run(&opts))
        .await
        .expect("within 5 minutes")
        .expect("lab run");
    for r in &report.results {
        eprintln!("{r:?}");
    }
    assert_eq!(report.results.len(), opts.kinds.len());
    for r in &report.results {
        assert!(r.error.is_none(), "{}: {:?}", r.kind.name(), r.error);
        assert!(
            r.router_forwards,
            "{}: the router's chain forwards",
            r.kind.name()
        );
        assert!(r.verified && r.reachable_from_outside, "{r:?}");
        assert!(r.renewed, "{r:?}");
        assert_eq!(r.left_after_shutdown, Some(0), "{r:?}");
        assert!(r.targets_met, "{r:?}");
    }
    // A router that lies about its external address: the node's outside
    // check fails and the address is never published.
    assert_eq!(report.lying_error, None);
    assert_eq!(report.lying_routers.len(), opts.kinds.len());
    for l in &report.lying_routers {
        assert!(l.caught(), "{l:?}");
    }
    // Behind the lab's IPv6 firewall, a node with an IPv6 socket opens a
    // PCP pinhole, a helper's unsolicited probe gets in through it, and the
    // shutdown deletes it.
    assert_eq!(report.ipv6_error, None);
    let v6 = report.ipv6.as_ref().expect("the IPv6 check ran");
    assert!(v6.ok(), "{v6:?}");
    assert!(report.all_met);
}
