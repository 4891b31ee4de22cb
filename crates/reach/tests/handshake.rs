//! Post-quantum key exchange on real connections over loopback: what two
//! nodes negotiate for each combination of modes, and that it shows.

mod common;

use common::{loopback, within};
use reach::{Node, PostQuantum};

const HYBRID: &str = "X25519MLKEM768";

async fn node(pq: PostQuantum) -> Node {
    Node::builder()
        .bind(loopback())
        .post_quantum(pq)
        .spawn()
        .await
        .unwrap()
}

/// The group `a` shows for its connection to `b`.
fn group_to(a: &Node, b: &Node) -> Option<String> {
    a.connected_peers()
        .into_iter()
        .find(|p| p.peer == b.peer_id())
        .and_then(|p| p.kx_group)
}

/// Connects and waits until both sides list the connection.
async fn connect(a: &Node, b: &Node) -> reach::Result<()> {
    a.connect(b.peer_id(), [b.local_addr()]).await?;
    common::until("the listener lists the connection", || {
        group_to(b, a).is_some()
    })
    .await;
    Ok(())
}

#[tokio::test]
async fn two_nodes_negotiate_the_hybrid_group_by_default_and_show_it() {
    let a = Node::builder().bind(loopback()).spawn().await.unwrap();
    let b = Node::builder().bind(loopback()).spawn().await.unwrap();
    assert_eq!(a.post_quantum(), PostQuantum::Prefer);
    within("connect", connect(&a, &b)).await.unwrap();
    assert_eq!(group_to(&a, &b).as_deref(), Some(HYBRID));
    assert_eq!(group_to(&b, &a).as_deref(), Some(HYBRID));
    // Counted on both sides, by group.
    assert!(a.stats().handshakes.hybrid >= 1);
    assert!(b.stats().handshakes.hybrid >= 1);
    assert_eq!(a.stats().handshakes.x25519, 0);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn prefer_falls_back_to_classical_with_a_node_that_has_pq_off() {
    let prefer = node(PostQuantum::Prefer).await;
    let off = node(PostQuantum::Off).await;
    // Both directions: the preferring side as dialer and as listener.
    within("connect", connect(&prefer, &off)).await.unwrap();
    assert_eq!(group_to(&prefer, &off).as_deref(), Some("X25519"));
    assert_eq!(group_to(&off, &prefer).as_deref(), Some("X25519"));
    let other_off = node(PostQuantum::Off).await;
    within("connect", connect(&other_off, &prefer))
        .await
        .unwrap();
    assert_eq!(group_to(&prefer, &other_off).as_deref(), Some("X25519"));
    assert_eq!(prefer.stats().handshakes.hybrid, 0);
    assert!(prefer.stats().handshakes.x25519 >= 2);
    for n in [prefer, off, other_off] {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn require_refuses_a_classical_peer_with_its_typed_error() {
    let require = node(PostQuantum::Require).await;
    let off = node(PostQuantum::Off).await;
    let err = within(
        "the refused dial",
        require.connect(off.peer_id(), [off.local_addr()]),
    )
    .await
    .expect_err("a classical peer must be refused");
    assert_eq!(err.kind(), "pq_required", "{err}");
    assert!(
        err.to_string().contains(&off.peer_id().to_string()),
        "{err}"
    );
    // The other way round: the classical dialer is refused by the listener
    // (no group in common) and nothing is left connected.
    let err = within(
        "the refused dial",
        off.connect(require.peer_id(), [require.local_addr()]),
    )
    .await
    .expect_err("a node that requires pq refuses a classical dialer");
    assert_eq!(err.kind(), "connect", "{err}");
    assert!(require.connected_peers().is_empty());
    // Two nodes that both require it connect with the hybrid group.
    let other = node(PostQuantum::Require).await;
    within("connect", connect(&require, &other)).await.unwrap();
    assert_eq!(group_to(&require, &other).as_deref(), Some(HYBRID));
    for n in [require, off, other] {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn post_quantum_modes_parse_from_their_config_spelling() {
    for mode in [PostQuantum::Prefer, PostQuantum::Require, PostQuantum::Off] {
        assert_eq!(mode.as_str().parse::<PostQuantum>(), Ok(mode));
    }
    assert!("kyber".parse::<PostQuantum>().is_err());
}

#[tokio::test]
async fn a_relayed_connection_negotiates_the_hybrid_group_end_to_end() {
    use reach::RelayMode;
    let relay = Node::builder()
        .bind(loopback())
        .relay_service(RelayMode::On)
        .acquire_relay(RelayMode::Off)
        .spawn()
        .await
        .unwrap();
    let target = Node::builder()
        .bind(loopback())
        .bootstrap([relay.local_addr()])
        .relay_service(RelayMode::Off)
        .acquire_relay(RelayMode::On)
        .hole_punching(false)
        .spawn()
        .await
        .unwrap();
    common::until("the target holds the relay", || {
        target.relay_status().held_relay == Some(relay.peer_id())
    })
    .await;
    let dialer = Node::builder()
        .bind(loopback())
        .relay_service(RelayMode::Off)
        .acquire_relay(RelayMode::Off)
        .hole_punching(false)
        .spawn()
        .await
        .unwrap();
    within(
        "the relayed dial",
        dialer.connect_via_relay(target.peer_id(), relay.peer_id(), relay.local_addr()),
    )
    .await
    .unwrap();
    let conn = dialer
        .connected_peers()
        .into_iter()
        .find(|p| p.peer == target.peer_id())
        .expect("connected to the target");
    assert_eq!(
        conn.relay,
        Some(relay.peer_id()),
        "the connection is relayed"
    );
    // The two ends' own handshake, through the relay's circuit.
    assert_eq!(conn.kx_group.as_deref(), Some(HYBRID));
    for n in [dialer, target, relay] {
        n.shutdown().await;
    }
}

/// Every handshake proves the peer's key afresh: after talking to A, a dial
/// for B that reaches A (a stale address, or a relay in between) must not
/// be answered by A's TLS session (no resumption), and re-bootstrapping
/// through an address already joined learns its identity again.
#[tokio::test]
async fn a_dial_for_one_peer_answered_by_another_is_refused_even_after_talking_to_it() {
    let a = node(PostQuantum::Prefer).await;
    let b = node(PostQuantum::Prefer).await;
    let c = node(PostQuantum::Prefer).await;
    within("connect to A", connect(&c, &a)).await.unwrap();
    let err = within(
        "a dial for B at A's address",
        c.connect(b.peer_id(), [a.local_addr()]),
    )
    .await
    .expect_err("A must not pass for B");
    assert_eq!(err.kind(), "peer_id_mismatch", "{err}");
    assert!(c.connected_peers().iter().all(|p| p.peer != b.peer_id()));
    // Bootstrapping twice through A reaches A both times.
    for _ in 0..2 {
        let report = within("bootstrap", c.bootstrap(&[a.local_addr()])).await;
        assert_eq!(report.bootstrap_reached, 1, "{report:?}");
    }
    for n in [a, b, c] {
        n.shutdown().await;
    }
}
