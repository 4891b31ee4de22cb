//! Addresses given for one call apply to that call: a failed one is not
//! remembered and never slows down or explains a later call.

mod common;

use std::time::{Duration, Instant};

use common::{loopback, within};
use reach::{Event, Node};

/// A dial that goes anywhere (a live node, a refusal) takes well under
/// this on loopback; a dial to a silent address takes the 10 s handshake
/// timeout.
const PROMPT: Duration = Duration::from_secs(3);

async fn node() -> Node {
    Node::builder().bind(loopback()).spawn().await.unwrap()
}

async fn received(node: &Node) -> Vec<u8> {
    within("a message", async {
        loop {
            if let Some(Event::Message { data, .. }) = node.next_event().await {
                return data.to_vec();
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_failed_user_address_is_not_reused_by_later_calls() {
    common::logs();
    let alice = node().await;
    let bob = node().await;
    let impostor = node().await;
    let bob_id = bob.peer_id();

    // An address where someone else answers: fails fast, naming it.
    let t = Instant::now();
    let err = within(
        "dial the impostor",
        alice.connect(bob_id, [impostor.local_addr()]),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), "peer_id_mismatch", "{err}");
    assert!(t.elapsed() < PROMPT, "took {:?}", t.elapsed());

    // A later send with no address does not dial it again: it fails at
    // once for want of an address (Bob is in no DHT this node knows), not
    // with the impostor's error.
    let t = Instant::now();
    let err = within("send without address", alice.send(bob_id, &b"x"[..]))
        .await
        .unwrap_err();
    assert_ne!(err.kind(), "peer_id_mismatch", "{err}");
    assert!(
        !err.to_string().contains(&impostor.local_addr().to_string()),
        "{err}"
    );
    assert!(t.elapsed() < PROMPT, "took {:?}", t.elapsed());

    // An address where nothing answers: the handshake times out.
    let silent = std::net::UdpSocket::bind(loopback()).unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let err = within(
        "dial a silent address",
        alice.connect(bob_id, [silent_addr]),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains(&silent_addr.to_string()), "{err}");

    // The right address now: prompt, and it delivers.
    let t = Instant::now();
    within("dial bob", alice.connect(bob_id, [bob.local_addr()]))
        .await
        .unwrap();
    within("send", alice.send(bob_id, &b"one"[..]))
        .await
        .unwrap();
    assert!(t.elapsed() < PROMPT, "took {:?}", t.elapsed());
    assert_eq!(received(&bob).await, b"one");

    // The address that worked is remembered: after a disconnect, a send
    // with no address redials it at once, without the silent one's
    // timeout or error.
    alice.disconnect(bob_id);
    common::until("the connection is closed", || {
        alice.connected_peers().iter().all(|p| p.peer != bob_id)
    })
    .await;
    let t = Instant::now();
    within("send again", alice.send(bob_id, &b"two"[..]))
        .await
        .unwrap();
    assert!(t.elapsed() < PROMPT, "took {:?}", t.elapsed());
    assert_eq!(received(&bob).await, b"two");
    drop(silent);
}
