//! The node's own events, as a subscriber sees them: a node that acquires a
//! relay announces it, then publishes a record that names it first.

use reach::{AddrKind, NodeEvent};

mod common;
use common::{logs, node_holding_a_relay, relay_node, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquiring_a_relay_is_announced_and_republished() {
    logs();
    let relay = relay_node().await;
    let bob = node_holding_a_relay(&relay).await;
    // Joining and the reachability check come first: subscribing now
    // misses nothing of the acquisition.
    let mut events = bob.subscribe();
    let (held, seq) = within("bob acquires and republishes", async {
        let mut held = None;
        while let Some(ev) = events.next().await {
            match ev {
                NodeEvent::RelayAcquired { relay: r, addr } => {
                    assert_eq!(r, relay.peer_id());
                    assert_eq!(addr, relay.local_addr());
                    held = Some(r);
                }
                NodeEvent::RecordPublished { seq, stored } if held.is_some() => {
                    assert!(stored >= 1, "the relay stored it");
                    return (held, seq);
                }
                _ => {}
            }
        }
        panic!("bob stopped");
    })
    .await;
    assert_eq!(held, Some(relay.peer_id()));
    assert_eq!(events.missed(), 0);
    // What was published names the relay first.
    let addrs = within("lookup", relay.lookup(bob.peer_id())).await.unwrap();
    assert_eq!(addrs[0].kind, AddrKind::Relay);
    assert_eq!(addrs[0].via, Some(relay.peer_id()));
    assert!(seq > 0);
    for n in [bob, relay] {
        n.shutdown().await;
    }
}
