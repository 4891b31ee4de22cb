//! Durable messages between real nodes on loopback: real QUIC, real files.

use std::time::Duration;

use reach::{Delivery, Event, Node, NodeEvent, PeerId};

mod common;
use common::{loopback, until, within};

async fn node_in(dir: &std::path::Path, bootstrap: Option<std::net::SocketAddr>) -> Node {
    let mut b = Node::builder().bind(loopback()).data_dir(dir);
    if let Some(s) = bootstrap {
        b = b.bootstrap([s]);
    }
    b.spawn().await.unwrap()
}

/// The next durable message `node` hands over, skipping other events.
async fn next_durable(node: &Node) -> reach::DurableMessage {
    within("a durable message", async {
        loop {
            if let Some(Event::Durable(m)) = node.next_event().await {
                return m;
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_to_an_offline_peer_arrive_once_and_in_order_when_it_returns() {
    let seed = Node::builder().bind(loopback()).spawn().await.unwrap();
    within("seed join", seed.joined()).await;
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = node_in(a_dir.path(), Some(seed.local_addr())).await;
    let b = node_in(b_dir.path(), Some(seed.local_addr())).await;
    within("joins", async { tokio::join!(a.joined(), b.joined()) }).await;
    let b_id = b.peer_id();
    b.shutdown().await;
    drop(b);

    // B is away: every send still returns once the message is on disk.
    const N: u64 = 50;
    let mut events = a.subscribe();
    let mut ids = Vec::new();
    for i in 0..N {
        let id = a
            .send_durable(b_id, format!("m{i}"), Delivery::Critical, None)
            .await
            .unwrap();
        ids.push(id);
    }
    assert_eq!(a.outbox().len() as u64, N);

    // B comes back and reaches A: A's pending messages go out at once.
    let b = node_in(b_dir.path(), Some(seed.local_addr())).await;
    assert_eq!(b.peer_id(), b_id);
    within("B reaches A", b.connect(a.peer_id(), [a.local_addr()]))
        .await
        .unwrap();
    for i in 0..N {
        let m = next_durable(&b).await;
        assert_eq!((m.from, m.seq), (a.peer_id(), i + 1), "in order, once");
        assert_eq!(m.data, format!("m{i}").as_bytes());
        b.durable_done(&m).await.unwrap();
    }
    let mut delivered = Vec::new();
    within("A hears every ack", async {
        while delivered.len() < N as usize {
            if let Some(NodeEvent::OutboxDelivered { id, peer }) = events.next().await {
                assert_eq!(peer, b_id);
                delivered.push(id);
            }
        }
    })
    .await;
    delivered.sort();
    assert_eq!(delivered, ids.iter().map(|i| i.0).collect::<Vec<_>>());
    until("A's outbox is empty", || a.outbox().is_empty()).await;
    assert_eq!(a.stats().outbox.delivered, N);
    assert_eq!(b.stats().outbox.received, N);
    // Nothing more, and nothing twice.
    let extra = tokio::time::timeout(Duration::from_millis(300), next_durable(&b)).await;
    assert!(extra.is_err(), "a message came twice: {extra:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_not_marked_done_is_handed_over_again_after_a_restart_and_only_then() {
    common::logs();
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = node_in(a_dir.path(), None).await;
    let b = node_in(b_dir.path(), None).await;
    a.connect(b.peer_id(), [b.local_addr()]).await.unwrap();
    let mut events = a.subscribe();
    a.send_durable(b.peer_id(), "once", Delivery::Critical, None)
        .await
        .unwrap();
    let m = next_durable(&b).await;
    assert_eq!((m.seq, &m.data[..]), (1, &b"once"[..]));
    within("the ack", async {
        while !matches!(events.next().await, Some(NodeEvent::OutboxDelivered { .. })) {}
    })
    .await;
    // B stops before it is done with the message: it comes back.
    b.shutdown().await;
    drop(b);
    let b = node_in(b_dir.path(), None).await;
    let again = next_durable(&b).await;
    assert_eq!((again.from, again.seq), (a.peer_id(), 1));
    b.durable_done(&again).await.unwrap();
    b.shutdown().await;
    drop(b);
    // Done: not again.
    let b = node_in(b_dir.path(), None).await;
    let extra = tokio::time::timeout(Duration::from_millis(500), next_durable(&b)).await;
    assert!(extra.is_err(), "handed over after done: {extra:?}");
    assert!(a.outbox().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moderate_message_to_a_peer_that_never_answers_is_abandoned_after_its_attempts() {
    common::logs();
    let dir = tempfile::tempdir().unwrap();
    let a = node_in(dir.path(), None).await;
    // A key nobody runs: no record, no address, never reachable.
    let nobody: PeerId = reach::Keypair::generate().peer_id();
    let mut events = a.subscribe();
    let id = a
        .send_durable(nobody, "lost", Delivery::Moderate { attempts: 2 }, None)
        .await
        .unwrap();
    let reason = within("the abandon", async {
        loop {
            if let Some(NodeEvent::OutboxAbandoned {
                id: got, reason, ..
            }) = events.next().await
            {
                assert_eq!(got, id.0);
                return reason;
            }
        }
    })
    .await;
    assert_eq!(reason, "attempts");
    assert!(a.outbox().is_empty());
    assert_eq!(a.stats().outbox.abandoned, 1);
    assert_eq!(a.stats().outbox.delivered, 0);
}

#[tokio::test]
async fn durable_messages_need_a_data_dir() {
    let a = Node::builder().bind(loopback()).spawn().await.unwrap();
    let err = a
        .send_durable(
            reach::Keypair::generate().peer_id(),
            "x",
            Delivery::Critical,
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "no_data_dir", "{err}");
}

/// A message whose attempt failed waits for its retry round; a newer one
/// for the same peer must not overtake it when the peer comes back: the
/// receiver hands them over in the order they were sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_message_does_not_overtake_one_waiting_for_its_retry() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = node_in(a_dir.path(), None).await;
    // B on an address of its own, so no other test's node takes its port
    // while it is down.
    let b = Node::builder()
        .bind("127.0.0.2:0".parse().unwrap())
        .data_dir(b_dir.path())
        .spawn()
        .await
        .unwrap();
    let (b_id, b_addr) = (b.peer_id(), b.local_addr());
    a.connect(b_id, [b_addr]).await.unwrap();
    b.shutdown().await;
    drop(b);

    // B is down: the first message's attempt fails, its retry is scheduled.
    a.send_durable(b_id, "first", Delivery::Critical, None)
        .await
        .unwrap();
    until("the first attempt failed and a retry is scheduled", || {
        a.outbox().first().is_some_and(|p| {
            p.attempts >= 1 && p.next_try.is_some_and(|t| t > Duration::from_millis(300))
        })
    })
    .await;

    // B is back where A knows it, and A sends a second message before the
    // first one's retry is due.
    // (The old endpoint's socket may linger a moment after shutdown.)
    let b = within("B binds its old address again", async {
        loop {
            match Node::builder()
                .bind(b_addr)
                .data_dir(b_dir.path())
                .spawn()
                .await
            {
                Ok(b) => return b,
                Err(e) if matches!(e.kind(), "bind" | "addr_in_use") => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    a.send_durable(b_id, "second", Delivery::Critical, None)
        .await
        .unwrap();
    let m = next_durable(&b).await;
    assert_eq!((m.seq, &m.data[..]), (1, &b"first"[..]), "in order");
    b.durable_done(&m).await.unwrap();
    let m = next_durable(&b).await;
    assert_eq!((m.seq, &m.data[..]), (2, &b"second"[..]));
    b.durable_done(&m).await.unwrap();
    until("A's outbox is empty", || a.outbox().is_empty()).await;
}
