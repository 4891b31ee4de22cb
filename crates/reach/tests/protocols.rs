//! Application protocols on the router: several registered on one node
//! carry data while the DHT, the relay and messaging keep working; a
//! protocol the peer does not serve is refused with a typed error and the
//! connection stays up.

use reach::{Error, Event, Node, RelayMode};

mod common;
use common::{logs, loopback, node_holding_a_relay, relay_node, until, within};

/// Serves `listener`: each stream gets back what it sent, prefixed.
fn echo(mut listener: reach::ProtocolListener, prefix: &'static [u8]) {
    tokio::spawn(async move {
        while let Some(mut s) = listener.accept().await {
            tokio::spawn(async move {
                let data = s.recv.read_to_end(1 << 20).await.unwrap();
                s.send.write_all(prefix).await.unwrap();
                s.send.write_all(&data).await.unwrap();
                s.send.finish().unwrap();
                let _ = s.send.stopped().await;
            });
        }
    });
}

async fn ask(node: &Node, peer: reach::PeerId, protocol: &str, data: &[u8]) -> Vec<u8> {
    let mut s = node.open_protocol(peer, protocol).await.unwrap();
    assert_eq!(s.peer, peer);
    s.send.write_all(data).await.unwrap();
    s.send.finish().unwrap();
    s.recv.read_to_end(1 << 20).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_protocols_share_a_node_with_dht_relay_and_messaging() {
    logs();
    let relay = relay_node().await;
    let bob = node_holding_a_relay(&relay).await;
    // Alice serves no relay: bob must pick the relay node (on loopback
    // everyone is public, and a serving alice could be closer to bob).
    let alice = Node::builder()
        .bind(loopback())
        .bootstrap([relay.local_addr()])
        .relay_service(RelayMode::Off)
        .acquire_relay(RelayMode::Off)
        .spawn()
        .await
        .unwrap();
    within("bob joins", bob.joined()).await;
    within("alice joins", alice.joined()).await;
    until("bob holds the relay", || {
        bob.relay_status().held_relay == Some(relay.peer_id())
    })
    .await;

    // Two applications on each node, each with its own protocol.
    echo(bob.accept_protocol("echo/1").unwrap(), b"bob echo: ");
    echo(bob.accept_protocol("shout/1").unwrap(), b"BOB: ");
    echo(alice.accept_protocol("echo/1").unwrap(), b"alice echo: ");

    // Dialing by key goes through the DHT; then both protocols carry data,
    // both ways.
    assert_eq!(
        within("echo", ask(&alice, bob.peer_id(), "echo/1", b"hi")).await,
        b"bob echo: hi"
    );
    assert_eq!(
        within("shout", ask(&alice, bob.peer_id(), "shout/1", b"hey")).await,
        b"BOB: hey"
    );
    assert_eq!(
        within("echo back", ask(&bob, alice.peer_id(), "echo/1", b"yo")).await,
        b"alice echo: yo"
    );
    // Many streams at once, interleaved with messages.
    let mut asks = Vec::new();
    for i in 0..20 {
        let asker = alice.clone();
        let bob_id = bob.peer_id();
        asks.push(tokio::spawn(async move {
            let msg = format!("n{i}");
            let got = ask(&asker, bob_id, "echo/1", msg.as_bytes()).await;
            assert_eq!(got, format!("bob echo: {msg}").into_bytes());
        }));
        alice
            .send(bob.peer_id(), format!("message {i}").into_bytes())
            .await
            .unwrap();
    }
    for a in asks {
        within("an ask", a).await.unwrap();
    }
    // Each message is its own stream: all arrive, once, in any order.
    let mut got = Vec::new();
    for _ in 0..20 {
        match within("a message", bob.next_event()).await {
            Some(Event::Message { from, data }) => {
                assert_eq!(from, alice.peer_id());
                got.push(String::from_utf8(data.to_vec()).unwrap());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    got.sort();
    let mut want: Vec<String> = (0..20).map(|i| format!("message {i}")).collect();
    want.sort();
    assert_eq!(got, want);
    // The DHT still answers, and the relay is still held.
    let addrs = within("lookup", alice.lookup(bob.peer_id())).await.unwrap();
    assert!(!addrs.is_empty());
    assert_eq!(bob.relay_status().held_relay, Some(relay.peer_id()));
    assert_eq!(bob.stats().core.protocol_streams_accepted, 22);
    assert_eq!(bob.stats().core.protocol_streams_refused, 0);
    for n in [alice, bob, relay] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_protocol_is_refused_typed_and_the_connection_stays_up() {
    logs();
    let alice = Node::builder().bind(loopback()).spawn().await.unwrap();
    let bob = Node::builder().bind(loopback()).spawn().await.unwrap();
    alice
        .connect(bob.peer_id(), [bob.local_addr()])
        .await
        .unwrap();
    let conn_before = alice.connected_peers();

    let err = within("open", alice.open_protocol(bob.peer_id(), "nobody/1"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::ProtocolNotSupported { peer, protocol }
            if *peer == bob.peer_id() && protocol == "nobody/1"),
        "{err}"
    );
    assert_eq!(err.kind(), "protocol_not_supported");
    assert_eq!(bob.stats().core.protocol_streams_refused, 1);

    // The same connection still carries messages and other protocols.
    alice
        .send(bob.peer_id(), b"still here".to_vec())
        .await
        .unwrap();
    match within("message", bob.next_event()).await {
        Some(Event::Message { data, .. }) => assert_eq!(&data[..], b"still here"),
        other => panic!("unexpected {other:?}"),
    }
    echo(bob.accept_protocol("late/1").unwrap(), b"");
    assert_eq!(
        within("late", ask(&alice, bob.peer_id(), "late/1", b"x")).await,
        b"x"
    );
    let conn_after = alice.connected_peers();
    assert_eq!(conn_before.len(), 1);
    assert_eq!(conn_after.len(), 1);
    assert_eq!(alice.stats().core.connections_outbound, 1, "no redial");

    for n in [alice, bob] {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn protocol_names_and_registrations_are_checked() {
    let node = Node::builder().bind(loopback()).spawn().await.unwrap();
    for bad in ["", "has space", "reach/dht", &"x".repeat(65)] {
        let err = node.accept_protocol(bad).unwrap_err();
        assert_eq!(err.kind(), "invalid_protocol_name", "{bad:?}: {err}");
    }
    let first = node.accept_protocol("app/1").unwrap();
    assert_eq!(first.protocol(), "app/1");
    let err = node.accept_protocol("app/1").unwrap_err();
    assert_eq!(err.kind(), "protocol_in_use");
    // Dropping the listener frees the name.
    drop(first);
    let again = node.accept_protocol("app/1").unwrap();
    drop(again);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_listener_stops_serving_its_protocol() {
    let alice = Node::builder().bind(loopback()).spawn().await.unwrap();
    let bob = Node::builder().bind(loopback()).spawn().await.unwrap();
    alice
        .connect(bob.peer_id(), [bob.local_addr()])
        .await
        .unwrap();
    let listener = bob.accept_protocol("gone/1").unwrap();
    drop(listener);
    let err = within("open", alice.open_protocol(bob.peer_id(), "gone/1"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "protocol_not_supported");
    for n in [alice, bob] {
        n.shutdown().await;
    }
}
