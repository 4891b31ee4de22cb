//! Two or more real nodes on loopback: QUIC over real UDP sockets.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use reach::{Error, Event, Keypair, Node};

/// Every wait in these tests is bounded by this deadline.
const DEADLINE: Duration = Duration::from_secs(20);

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn node() -> Node {
    Node::builder().bind(loopback()).spawn().await.unwrap()
}

async fn next_event(node: &Node) -> Event {
    tokio::time::timeout(DEADLINE, node.next_event())
        .await
        .expect("event within deadline")
        .expect("node still running")
}

async fn next_message(node: &Node) -> (reach::PeerId, Vec<u8>) {
    match next_event(node).await {
        Event::Message { from, data } => (from, data.to_vec()),
        other => panic!("expected a message, got {other:?}"),
    }
}

#[tokio::test]
async fn two_nodes_exchange_messages_both_ways_on_one_connection() {
    let a = node().await;
    let b = node().await;
    a.connect(b.peer_id(), [b.local_addr()]).await.unwrap();
    a.send(b.peer_id(), b"ping".to_vec()).await.unwrap();
    assert_eq!(next_message(&b).await, (a.peer_id(), b"ping".to_vec()));
    // B answers over the connection A opened: no address needed.
    b.send(a.peer_id(), b"pong".to_vec()).await.unwrap();
    assert_eq!(next_message(&a).await, (b.peer_id(), b"pong".to_vec()));
    // The listener learned the dialer's identity from the handshake.
    let seen_by_b = b.connected_peers();
    assert_eq!(seen_by_b.len(), 1);
    assert_eq!(seen_by_b[0].peer, a.peer_id());
    assert_eq!(seen_by_b[0].direction, reach::Direction::Inbound);
    // Reused: still one connection each after traffic both ways.
    assert_eq!(a.connected_peers().len(), 1);
    assert_eq!(a.stats().core.connections_outbound, 1);
    assert_eq!(b.stats().core.connections_outbound, 0);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn many_messages_arrive_complete_and_in_full() {
    let a = node().await;
    let b = node().await;
    a.connect(b.peer_id(), [b.local_addr()]).await.unwrap();
    let big = vec![0xABu8; 3 * 1024 * 1024];
    a.send(b.peer_id(), big.clone()).await.unwrap();
    assert_eq!(next_message(&b).await.1, big);
    let mut sends = Vec::new();
    for i in 0..200u32 {
        let a = a.clone();
        let to = b.peer_id();
        sends.push(tokio::spawn(async move {
            a.send(to, i.to_be_bytes().to_vec()).await
        }));
    }
    let mut got = Vec::new();
    for _ in 0..200 {
        let (_, data) = next_message(&b).await;
        got.push(u32::from_be_bytes(data.try_into().unwrap()));
    }
    for s in sends {
        s.await.unwrap().unwrap();
    }
    got.sort();
    assert_eq!(got, (0..200).collect::<Vec<_>>());
}

#[tokio::test]
async fn streams_carry_bytes_both_ways() {
    let a = node().await;
    let b = node().await;
    a.connect(b.peer_id(), [b.local_addr()]).await.unwrap();
    let mut s = a.open_stream(b.peer_id()).await.unwrap();
    s.send.write_all(b"hello stream").await.unwrap();
    s.send.finish().unwrap();
    let Event::Stream(mut incoming) = next_event(&b).await else {
        panic!("expected a stream");
    };
    assert_eq!(incoming.peer, a.peer_id());
    let buf = incoming.recv.read_to_end(1024).await.unwrap();
    assert_eq!(buf, b"hello stream");
    incoming.send.write_all(b"echo").await.unwrap();
    incoming.send.finish().unwrap();
    let back = s.recv.read_to_end(1024).await.unwrap();
    assert_eq!(back, b"echo");
}

#[tokio::test]
async fn handshake_fails_with_typed_error_on_peer_id_mismatch() {
    let a = node().await;
    let b = node().await;
    let impostor_expectation = Keypair::generate().peer_id();
    let err = a
        .connect(impostor_expectation, [b.local_addr()])
        .await
        .unwrap_err();
    match &err {
        Error::PeerIdMismatch {
            expected, actual, ..
        } => {
            assert_eq!(*expected, impostor_expectation);
            assert_eq!(*actual, b.peer_id());
        }
        other => panic!("expected PeerIdMismatch, got {other:?}"),
    }
    assert_eq!(err.kind(), "peer_id_mismatch");
    assert!(a.connected_peers().is_empty());
    // The real key still works afterwards.
    a.connect(b.peer_id(), [b.local_addr()]).await.unwrap();
}

#[tokio::test]
async fn too_large_message_is_a_typed_error() {
    let a = node().await;
    let b = node().await;
    a.connect(b.peer_id(), [b.local_addr()]).await.unwrap();
    let err = a
        .send(b.peer_id(), vec![0u8; reach::MAX_MESSAGE_LEN + 1])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "message_too_large");
}

#[tokio::test]
async fn send_to_an_unknown_peer_is_a_typed_not_found() {
    let a = node().await;
    let err = a
        .send(Keypair::generate().peer_id(), b"x".to_vec())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "not_found");
}

#[tokio::test]
async fn garbage_datagrams_leave_the_node_working() {
    let a = node().await;
    let b = node().await;
    a.connect(b.peer_id(), [b.local_addr()]).await.unwrap();
    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for i in 0..2000usize {
        // xorshift: varied lengths and first bytes, including QUIC-looking ones.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = (seed % 1400) as usize;
        let pkt: Vec<u8> = (0..len)
            .map(|j| (seed >> (j % 56)) as u8 ^ i as u8)
            .collect();
        let _ = junk.send_to(&pkt, b.local_addr());
    }
    // Truncated control packet and STUN-looking header too.
    let _ = junk.send_to(b"\x08RCH", b.local_addr());
    let _ = junk.send_to(
        &[0, 1, 0, 0, 0x21, 0x12, 0xA4, 0x42, 0, 0, 0, 0],
        b.local_addr(),
    );
    a.send(b.peer_id(), b"still alive".to_vec()).await.unwrap();
    assert_eq!(next_message(&b).await.1, b"still alive");
    // A fresh node can still connect to the flooded one.
    let c = node().await;
    c.connect(b.peer_id(), [b.local_addr()]).await.unwrap();
    let stats = b.stats();
    assert!(stats.datagrams.unknown_dropped + stats.datagrams.quic_datagrams > 0);
}

#[tokio::test]
async fn control_packets_share_the_quic_socket() {
    let a = node().await;
    let b = node().await;
    a.connect(b.peer_id(), [b.local_addr()]).await.unwrap();
    // A probe from A's QUIC socket reports A's QUIC address.
    let observed = tokio::time::timeout(DEADLINE, a.observed_addr(b.local_addr()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(observed, a.local_addr());
    assert_eq!(b.stats().core.probes_answered, 1);
    a.send(b.peer_id(), b"after probe".to_vec()).await.unwrap();
    assert_eq!(next_message(&b).await.1, b"after probe");
}

#[tokio::test]
async fn second_node_on_a_busy_port_fails_clearly() {
    let a = node().await;
    let err = Node::builder()
        .bind(a.local_addr())
        .spawn()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "addr_in_use");
    let text = err.to_string();
    assert!(text.contains(&a.local_addr().to_string()), "{text}");
    assert!(text.contains("another reach node"), "{text}");
}

#[tokio::test]
async fn identity_persists_in_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let a = Node::builder()
        .bind(loopback())
        .data_dir(dir.path())
        .spawn()
        .await
        .unwrap();
    let id = a.peer_id();
    a.shutdown().await;
    drop(a);
    let again = Node::builder()
        .bind(loopback())
        .data_dir(dir.path())
        .spawn()
        .await
        .unwrap();
    assert_eq!(again.peer_id(), id);
}

#[tokio::test]
async fn shutdown_ends_events_and_refuses_sends() {
    let a = node().await;
    let b = node().await;
    a.connect(b.peer_id(), [b.local_addr()]).await.unwrap();
    a.shutdown().await;
    assert!(a.next_event().await.is_none());
    let err = a.send(b.peer_id(), b"x".to_vec()).await.unwrap_err();
    assert_eq!(err.kind(), "shutdown");
}
