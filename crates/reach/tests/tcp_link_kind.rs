//! A connection over a TCP link is not a relayed one: both use virtual
//! addresses inside the socket, but only circuits through a relay count as
//! relayed connections. Real nodes on loopback.

use std::net::SocketAddr;

use reach::{Node, RelayMode};

mod common;
use common::{holds_relay, logs, loopback, outsider, until, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_link_connection_is_not_counted_as_relayed_and_a_relayed_one_is() {
    logs();
    // The relay takes TCP links on a port of its own, where nothing listens
    // for UDP: a node given that port as its bootstrap reaches nobody over
    // UDP and falls back to a TCP link, as behind a UDP-blocking firewall.
    let tcp = std::net::TcpListener::bind(loopback()).unwrap();
    let tcp_addr: SocketAddr = tcp.local_addr().unwrap();
    let relay = Node::builder()
        .bind(loopback())
        .relay_service(RelayMode::On)
        .acquire_relay(RelayMode::Off)
        .tcp_listener(tcp)
        .spawn()
        .await
        .unwrap();
    assert_ne!(
        tcp_addr,
        relay.local_addr(),
        "the link port is not the UDP one"
    );

    // Carol reaches the relay only over a TCP link.
    let carol = Node::builder()
        .bind(loopback())
        .bootstrap([tcp_addr])
        .relay_service(RelayMode::Off)
        .acquire_relay(RelayMode::Off)
        .hole_punching(false)
        .spawn()
        .await
        .unwrap();
    within("carol joins over a TCP link", carol.joined()).await;
    let to_relay = carol
        .connected_peers()
        .into_iter()
        .find(|p| p.peer == relay.peer_id())
        .expect("carol is connected to the relay");
    // The link shows as the TCP address it runs to, not as a relay.
    assert_eq!(
        to_relay.addr, tcp_addr,
        "carol's connection runs over the link"
    );
    assert_eq!(to_relay.relay, None);

    // Bob holds a reservation at the relay; Alice reaches him through it.
    let bob = Node::builder()
        .bind(loopback())
        .bootstrap([relay.local_addr()])
        .relay_service(RelayMode::Off)
        .acquire_relay(RelayMode::On)
        .hole_punching(false)
        .spawn()
        .await
        .unwrap();
    holds_relay(&bob, &relay).await;
    let alice = outsider().hole_punching(false).spawn().await.unwrap();
    alice
        .connect_via_relay(bob.peer_id(), relay.peer_id(), relay.local_addr())
        .await
        .unwrap();
    let to_bob = alice
        .connected_peers()
        .into_iter()
        .find(|p| p.peer == bob.peer_id())
        .expect("alice is connected to bob");
    assert_eq!(to_bob.relay, Some(relay.peer_id()));

    assert_eq!(alice.relay_status().relayed_connections, 1, "alice → bob");
    until("bob counts alice's relayed connection", || {
        bob.relay_status().relayed_connections == 1
    })
    .await;
    // The link is still up, and still not relayed, on either end of it.
    assert!(
        carol
            .connected_peers()
            .iter()
            .any(|p| p.peer == relay.peer_id() && p.addr == tcp_addr)
    );
    assert_eq!(carol.relay_status().relayed_connections, 0, "carol's link");
    assert!(
        relay
            .connected_peers()
            .iter()
            .any(|p| p.peer == carol.peer_id())
    );
    assert_eq!(
        relay.relay_status().relayed_connections,
        0,
        "the relay's own connections (one over a link) are all direct"
    );
}
