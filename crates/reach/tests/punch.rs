//! Hole punching with real nodes on loopback: a relayed connection upgrades
//! to a direct one by itself, and messages sent meanwhile arrive exactly
//! once. (Punching through real NATs, every technique, and falling back
//! when the direct path dies are the lab's: `crates/reach-lab/tests`.)

use std::collections::HashMap;
use std::time::Duration;

use reach::{Direction, Event, PathKind};

mod common;
use common::{holds_relay, logs, node_holding_a_relay, outsider, relay_node, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_connection_upgrades_to_direct_and_no_message_is_lost_or_doubled() {
    logs();
    let relay = relay_node().await;
    let bob = node_holding_a_relay(&relay).await;
    // Alice stays out of the DHT: no DHT request may open a direct path to
    // Bob before the punch does.
    let alice = outsider().connection_events(true).spawn().await.unwrap();
    holds_relay(&bob, &relay).await;

    alice
        .connect_via_relay(bob.peer_id(), relay.peer_id(), relay.local_addr())
        .await
        .unwrap();
    // Messages go out while the punch runs: each must arrive exactly once,
    // whichever connection carries it.
    const N: usize = 200;
    let sender = {
        let alice = alice.clone();
        let bob_id = bob.peer_id();
        tokio::spawn(async move {
            for i in 0..N {
                alice
                    .send(bob_id, format!("message {i}").into_bytes())
                    .await
                    .unwrap();
            }
        })
    };
    assert!(
        alice
            .wait_direct(bob.peer_id(), Duration::from_secs(20))
            .await,
        "the connection became direct: {:?}",
        alice.punch_stats()
    );
    let mut got: HashMap<String, usize> = HashMap::new();
    within("bob receives every message", async {
        while got.len() < N {
            match bob.next_event().await {
                Some(Event::Message { from, data }) => {
                    assert_eq!(from, alice.peer_id());
                    *got.entry(String::from_utf8(data.to_vec()).unwrap())
                        .or_default() += 1;
                }
                other => panic!("unexpected event {other:?}"),
            }
        }
    })
    .await;
    within("the sender finishes", sender).await.unwrap();
    assert!(got.values().all(|&n| n == 1), "a message arrived twice");

    let path = alice
        .connected_peers()
        .into_iter()
        .find(|p| p.peer == bob.peer_id())
        .unwrap();
    assert_eq!(path.relay, None, "traffic now goes direct: {path:?}");
    assert_eq!(
        path.standby_relay,
        Some(relay.peer_id()),
        "the relayed connection stays behind it: {path:?}"
    );
    let stats = alice.punch_stats();
    let outcome = stats
        .recent
        .iter()
        .find(|o| o.peer == bob.peer_id())
        .expect("an outcome for bob");
    assert!(outcome.direct, "{outcome:?}");
    // Loopback: both come from one IP, so the LAN addresses go first.
    assert_eq!(outcome.technique, "lan_first");
    assert!(outcome.time_to_direct_ms.is_some());
    // Alice's application heard the connection come up relayed, then
    // become direct (events about the relay itself aside).
    let mut paths = Vec::new();
    within("alice hears the path change", async {
        while paths.len() < 2 {
            match alice.next_event().await {
                Some(Event::Connected {
                    peer,
                    path,
                    direction,
                }) if peer == bob.peer_id() => {
                    assert_eq!(direction, Direction::Outbound);
                    paths.push(path);
                }
                Some(Event::PathChanged { peer, path }) if peer == bob.peer_id() => {
                    paths.push(path)
                }
                Some(Event::Disconnected { peer }) if peer == bob.peer_id() => {
                    panic!("bob disconnected")
                }
                Some(_) => {}
                None => panic!("alice stopped"),
            }
        }
    })
    .await;
    assert_eq!(
        paths,
        [
            PathKind::Relayed {
                relay: relay.peer_id()
            },
            PathKind::Direct
        ]
    );
    // A message after the upgrade goes direct, and arrives.
    alice.send(bob.peer_id(), b"after".to_vec()).await.unwrap();
    match within("bob receives", bob.next_event()).await {
        Some(Event::Message { data, .. }) => assert_eq!(&data[..], b"after"),
        other => panic!("unexpected event {other:?}"),
    }
}
