//! Relays with real nodes on loopback: reservations, circuits carrying
//! end-to-end QUIC, what the relay can see, a full relay, failover.
//! (Reachability across real NATs is the lab's job: `reach lab matrix`.)

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reach::{Event, Keypair, Node, PeerId, RelayLimits, RelayMode};
use tokio::net::UdpSocket;

mod common;
use common::{logs, loopback, outsider, until, within};

async fn relay_node(limits: Option<RelayLimits>, kp: Option<Keypair>) -> Node {
    let mut b = Node::builder()
        .bind(loopback())
        .relay_service(RelayMode::On)
        .acquire_relay(RelayMode::Off);
    if let Some(l) = limits {
        b = b.relay_limits(l);
    }
    if let Some(kp) = kp {
        b = b.keypair(kp);
    }
    b.spawn().await.unwrap()
}

/// A node that always holds a relay, joined through `seeds`.
async fn relayed_node(seeds: &[SocketAddr], kp: Option<Keypair>) -> Node {
    let mut b = Node::builder()
        .bind(loopback())
        .bootstrap(seeds.iter().copied())
        .relay_service(RelayMode::Off)
        .acquire_relay(RelayMode::On);
    if let Some(kp) = kp {
        b = b.keypair(kp);
    }
    b.spawn().await.unwrap()
}

/// A UDP forwarder in front of a relay, recording every datagram the relay
/// sends or receives through it: the relay's whole view of the traffic.
/// Each client gets its own upstream socket, so the relay sees clients at
/// distinct addresses, as it would through NATs.
struct Tap {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
}

async fn tap(relay: SocketAddr) -> Tap {
    let front = Arc::new(UdpSocket::bind(loopback()).await.unwrap());
    let addr = front.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let seen2 = seen.clone();
    tokio::spawn(async move {
        let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
        let mut buf = vec![0u8; 65536];
        // Bounded: the forwarder stops when the test (and its runtime) ends.
        while let Ok((n, from)) = front.recv_from(&mut buf).await {
            seen2.lock().unwrap().push(buf[..n].to_vec());
            let up = match upstreams.get(&from) {
                Some(u) => u.clone(),
                None => {
                    let u = Arc::new(UdpSocket::bind(loopback()).await.unwrap());
                    u.connect(relay).await.unwrap();
                    upstreams.insert(from, u.clone());
                    let (front, seen) = (front.clone(), seen2.clone());
                    let back = u.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65536];
                        while let Ok(n) = back.recv(&mut buf).await {
                            seen.lock().unwrap().push(buf[..n].to_vec());
                            let _ = front.send_to(&buf[..n], from).await;
                        }
                    });
                    u
                }
            };
            let _ = up.send(&buf[..n]).await;
        }
    });
    Tap { addr, seen }
}

fn held(node: &Node) -> Option<PeerId> {
    node.relay_status().held_relay
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_traffic_is_end_to_end_encrypted_and_the_relay_sees_no_plaintext() {
    let relay = relay_node(None, None).await;
    let tap = tap(relay.local_addr()).await;
    let bob = relayed_node(&[tap.addr], None).await;
    // No hole punching: this test is about what the relay sees.
    let alice = Node::builder()
        .bind(loopback())
        .bootstrap([tap.addr])
        .acquire_relay(RelayMode::Off)
        .hole_punching(false)
        .spawn()
        .await
        .unwrap();
    within("bob joins", bob.joined()).await;
    within("alice joins", alice.joined()).await;
    until("bob holds the relay", || {
        held(&bob) == Some(relay.peer_id())
    })
    .await;

    alice
        .connect_via_relay(bob.peer_id(), relay.peer_id(), tap.addr)
        .await
        .unwrap();
    let path = alice
        .connected_peers()
        .into_iter()
        .find(|p| p.peer == bob.peer_id())
        .unwrap();
    assert_eq!(
        path.relay,
        Some(relay.peer_id()),
        "the connection is relayed"
    );

    let secret = b"the eagle lands at dawn: 8f3k2-relay-plaintext-canary".repeat(40);
    alice.send(bob.peer_id(), secret.clone()).await.unwrap();
    match within("bob receives", bob.next_event()).await {
        Some(Event::Message { from, data }) => {
            assert_eq!(from, alice.peer_id());
            assert_eq!(&data[..], &secret[..]);
        }
        other => panic!("expected the message, got {other:?}"),
    }
    // A stream both ways through the circuit.
    let mut s = alice.open_stream(bob.peer_id()).await.unwrap();
    s.send.write_all(b"ping through the relay").await.unwrap();
    s.send.finish().unwrap();
    let Some(Event::Stream(mut b)) = within("bob's stream", bob.next_event()).await else {
        panic!("expected a stream");
    };
    let got = b.recv.read_to_end(1024).await.unwrap();
    assert_eq!(got, b"ping through the relay");

    let st = relay.stats();
    assert!(
        st.relay_paths.forwarded_bytes as usize >= secret.len(),
        "the relay forwarded the message's bytes ({st:?})"
    );
    assert_eq!(st.relay.circuits_opened, 1);
    let seen = tap.seen.lock().unwrap();
    let needle = b"8f3k2-relay-plaintext-canary";
    assert!(
        !seen
            .iter()
            .any(|d| d.windows(needle.len()).any(|w| w == needle)),
        "plaintext visible to the relay"
    );
    let relayed: usize = seen
        .iter()
        .filter(|d| d.starts_with(&[0x09, b'R', b'L', b'Y']))
        .map(|d| d.len())
        .sum();
    assert!(
        relayed >= 2 * secret.len(),
        "the tap saw the relayed frames ({relayed} bytes)"
    );
}

/// A keypair whose peer id is farther from `from` (XOR of key hashes) than
/// `than`'s: decides which candidate a node tries first.
fn farther(from: &PeerId, than: &PeerId) -> Keypair {
    use reach_proto::dht::Key;
    let (f, t) = (Key::for_peer(from), Key::for_peer(than));
    loop {
        let kp = Keypair::generate();
        if f.distance(&Key::for_peer(&kp.peer_id())) > f.distance(&t) {
            return kp;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_relay_refuses_and_the_client_finds_another() {
    let full_limits = RelayLimits {
        max_clients: 1,
        ..RelayLimits::default()
    };
    let bob_kp = Keypair::generate();
    let r1 = relay_node(Some(full_limits), None).await;
    // The first client takes r1's only slot.
    let first = relayed_node(&[r1.local_addr()], None).await;
    until("the first client holds r1", || {
        held(&first) == Some(r1.peer_id())
    })
    .await;
    // r2 is farther from Bob than r1, so Bob asks r1 first.
    let r2 = relay_node(None, Some(farther(&bob_kp.peer_id(), &r1.peer_id()))).await;
    r2.bootstrap(&[r1.local_addr()]).await;
    let bob = relayed_node(&[r1.local_addr(), r2.local_addr()], Some(bob_kp)).await;
    until("bob holds r2", || held(&bob) == Some(r2.peer_id())).await;
    assert!(
        r1.stats().relay.reservations_refused >= 1,
        "r1 refused Bob: {:?}",
        r1.stats()
    );
    assert_eq!(r1.relay_status().reservations, 1);
    assert_eq!(held(&first), Some(r1.peer_id()), "the first client kept r1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_relay_republishes_and_holds_a_new_one_within_ten_seconds() {
    logs();
    let r1 = relay_node(None, None).await;
    let r2 = relay_node(None, None).await;
    r2.bootstrap(&[r1.local_addr()]).await;
    let bob = relayed_node(&[r1.local_addr(), r2.local_addr()], None).await;
    let alice = Node::builder()
        .bind(loopback())
        .bootstrap([r2.local_addr()])
        .relay_service(RelayMode::Off)
        .acquire_relay(RelayMode::Off)
        .spawn()
        .await
        .unwrap();
    within("alice joins", alice.joined()).await;
    until("bob holds a relay", || held(&bob).is_some()).await;
    let (old, other) = if held(&bob) == Some(r1.peer_id()) {
        (r1, r2)
    } else {
        (r2, r1)
    };
    let published_relay = |addrs: &[reach::TypedAddr]| {
        addrs
            .iter()
            .find(|a| a.kind == reach::AddrKind::Relay)
            .and_then(|a| a.via)
    };
    // The record with the relay reaches the DHT (the join-time record had
    // none).
    within("relay published", async {
        while alice
            .lookup(bob.peer_id())
            .await
            .map_or(true, |r| published_relay(&r) != Some(old.peer_id()))
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    let lost_at = Instant::now();
    old.shutdown().await;
    until("bob holds the other relay", || {
        held(&bob) == Some(other.peer_id())
    })
    .await;
    // Republished: a fresh lookup finds the new relay first.
    within("republished", async {
        loop {
            if let Ok(r) = alice.lookup(bob.peer_id()).await
                && published_relay(&r) == Some(other.peer_id())
                && r[0].kind == reach::AddrKind::Relay
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let took = lost_at.elapsed();
    assert!(
        took <= Duration::from_secs(10),
        "new relay held and published after {took:?}"
    );
    assert!(bob.stats().relay.relay_losses >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_relayed_connection_frees_its_circuit_at_the_relay() {
    logs();
    let relay = relay_node(None, None).await;
    let bob = relayed_node(&[relay.local_addr()], None).await;
    // Alice is not in the DHT, so her only path to Bob is the relay's.
    let alice = outsider().hole_punching(false).spawn().await.unwrap();
    within("bob joins", bob.joined()).await;
    until("bob holds the relay", || {
        held(&bob) == Some(relay.peer_id())
    })
    .await;
    alice
        .connect_via_relay(bob.peer_id(), relay.peer_id(), relay.local_addr())
        .await
        .unwrap();
    assert_eq!(relay.relay_status().circuits.len(), 1);
    alice.disconnect(bob.peer_id());
    // Far sooner than the 120 s idle expiry: the ends say it is done.
    until("the relay dropped the circuit", || {
        relay.relay_status().circuits.is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_with_only_a_relay_reaches_the_node_through_it() {
    let relay = relay_node(None, None).await;
    let target = relayed_node(&[relay.local_addr()], None).await;
    until("target holds the relay", || held(&target).is_some()).await;
    // The ticket as the target would share it, cut down to its relay: the
    // dialer knows no DHT node and no direct address.
    let mut ticket = target.ticket();
    assert_eq!(ticket.addrs[0].kind, reach::AddrKind::Relay);
    ticket.addrs.retain(|a| a.kind == reach::AddrKind::Relay);
    let ticket: reach::Ticket = ticket.to_string().parse().unwrap();
    let dialer = Node::builder()
        .bind(loopback())
        .relay_service(RelayMode::Off)
        .acquire_relay(RelayMode::Off)
        .spawn()
        .await
        .unwrap();
    within("dial by ticket", dialer.connect_ticket(&ticket))
        .await
        .unwrap();
    let path = dialer
        .connected_peers()
        .into_iter()
        .find(|p| p.peer == target.peer_id())
        .map(|p| p.relay);
    assert_eq!(
        path,
        Some(held(&target)),
        "connected through the target's relay"
    );
    dialer
        .send(target.peer_id(), b"via the ticket's relay".to_vec())
        .await
        .unwrap();
    let got = within("delivered", async {
        loop {
            if let Some(Event::Message { data, .. }) = target.next_event().await {
                return data;
            }
        }
    })
    .await;
    assert_eq!(&got[..], b"via the ticket's relay");
}
