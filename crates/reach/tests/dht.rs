//! The DHT with real nodes on loopback: real QUIC, real UDP, one process.

use std::net::SocketAddr;
use std::time::Duration;

use reach::{Event, Node, PeerId};

/// Every wait is bounded by this.
const DEADLINE: Duration = Duration::from_secs(120);

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {DEADLINE:?}"))
}

/// Starts `n` nodes that bootstrap from `seed` and waits until all joined.
async fn network(seed: &Node, n: usize) -> Vec<Node> {
    let mut nodes = Vec::new();
    for _ in 0..n {
        let node = Node::builder()
            .bind(loopback())
            .bootstrap([seed.local_addr()])
            .spawn()
            .await
            .unwrap();
        nodes.push(node);
    }
    for n in &nodes {
        within("join", n.joined()).await;
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_nodes_resolve_and_connect_to_each_other_by_peer_id_alone() {
    let seed = Node::builder().bind(loopback()).spawn().await.unwrap();
    within("seed join", seed.joined()).await;
    let mut nodes = network(&seed, 49).await;
    nodes.insert(0, seed);
    let n = nodes.len();
    assert_eq!(n, 50);

    // Every node dials 10 others chosen pseudo-randomly, by PeerId only: the
    // address comes from the endpoint record in the DHT.
    let mut tasks = tokio::task::JoinSet::new();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for i in 0..n {
        let mut targets = Vec::new();
        while targets.len() < 10 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let t = (x % n as u64) as usize;
            if t != i && !targets.contains(&t) {
                targets.push(t);
            }
        }
        for t in targets {
            let from = nodes[i].clone();
            let to: PeerId = nodes[t].peer_id();
            let want = nodes[t].local_addr();
            tasks.spawn(async move {
                // Resolve through the DHT (the endpoint record), then dial
                // by key alone and send.
                let addrs = from
                    .lookup(to)
                    .await
                    .map_err(|e| format!("{i} -> {t} lookup: {e}"))?;
                if !addrs.iter().any(|a| a.addr == want) {
                    return Err(format!("{i} -> {t}: record lacks {want}: {addrs:?}"));
                }
                from.connect(to, [])
                    .await
                    .map_err(|e| format!("{i} -> {t}: {e}"))?;
                from.send(to, format!("hi from {i}").into_bytes())
                    .await
                    .map_err(|e| format!("{i} -> {t} send: {e}"))
            });
        }
    }
    let mut failures = Vec::new();
    within("all dials", async {
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = r.unwrap() {
                failures.push(e);
            }
        }
    })
    .await;
    assert!(
        failures.is_empty(),
        "{} of 500 failed: {failures:?}",
        failures.len()
    );
    let resolved: u64 = nodes.iter().map(|n| n.stats().dht.resolutions).sum();
    assert!(
        resolved >= 500,
        "every pair resolved through the DHT: {resolved}"
    );
    // Each node received its messages.
    let mut received = 0;
    for node in &nodes {
        while let Ok(Some(Event::Message { .. })) =
            tokio::time::timeout(Duration::from_millis(1), node.next_event()).await
        {
            received += 1;
        }
    }
    assert_eq!(received, 500);
    for node in &nodes {
        let r = node.routing_snapshot();
        assert!(
            r.size >= 10,
            "routing table of {} has {}",
            node.peer_id(),
            r.size
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_rejoins_from_its_data_dir_alone() {
    let seed = Node::builder().bind(loopback()).spawn().await.unwrap();
    within("seed join", seed.joined()).await;
    let others = network(&seed, 9).await;
    let dir = tempfile::tempdir().unwrap();
    let first = Node::builder()
        .bind(loopback())
        .data_dir(dir.path())
        .bootstrap([seed.local_addr()])
        .spawn()
        .await
        .unwrap();
    within("join", first.joined()).await;
    let id = first.peer_id();
    first.shutdown().await;
    drop(first);

    // No bootstrap list this time: only what the data dir remembers.
    let again = Node::builder()
        .bind(loopback())
        .data_dir(dir.path())
        .spawn()
        .await
        .unwrap();
    assert_eq!(again.peer_id(), id);
    within("rejoin", again.joined()).await;
    assert!(again.routing_snapshot().size >= 5);
    let target = others[7].peer_id();
    let addrs = within("lookup", again.lookup(target)).await.unwrap();
    assert!(addrs.iter().any(|a| a.addr == others[7].local_addr()));
    within("connect", again.connect(target, [])).await.unwrap();
}

/// A network that grows: a record published when it had two nodes must
/// still be found once it has thirty, although the nodes that stored it
/// are no longer the closest to its key (the holders hand it on), and
/// although its publisher and its first holder have gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_published_in_a_small_network_is_found_after_it_grew() {
    let seed = Node::builder().bind(loopback()).spawn().await.unwrap();
    within("seed join", seed.joined()).await;
    let early = network(&seed, 1).await.remove(0);
    let (early_id, early_addr) = (early.peer_id(), early.local_addr());
    let later = network(&seed, 30).await;
    // The publisher and the one node that stored it back then both go.
    let handed: u64 = [&seed, &early]
        .into_iter()
        .chain(&later)
        .map(|n| n.stats().dht.records_handed_off)
        .sum();
    for gone in [early, seed] {
        gone.shutdown().await;
    }
    // All at once: each may wait out a query to the nodes that went.
    let lookups = later.iter().enumerate().map(|(i, n)| async move {
        match n.lookup(early_id).await {
            Ok(addrs) if addrs.iter().any(|a| a.addr == early_addr) => None,
            other => Some(format!("node {i}: {other:?}")),
        }
    });
    let failures: Vec<String> = within("lookups", futures::future::join_all(lookups))
        .await
        .into_iter()
        .flatten()
        .collect();
    assert!(
        failures.is_empty(),
        "{} of 30 lookups failed ({handed} records handed off): {failures:?}",
        failures.len()
    );
    assert!(handed > 0, "nobody handed a record to a newcomer");
}

/// A laptop that starts while its network is down: it must keep trying the
/// contacts it remembers, not decide it is the first node of a network (and
/// then never ask them again once they failed twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_while_its_contacts_are_down_rejoins_when_they_return() {
    use reach_proto::dht::routing::Health;
    let seed_dir = tempfile::tempdir().unwrap();
    let seed_node = |bind: SocketAddr| Node::builder().bind(bind).data_dir(seed_dir.path()).spawn();
    let seed = seed_node(loopback()).await.unwrap();
    let seed_addr = seed.local_addr();
    let seed_id = seed.peer_id();
    within("seed join", seed.joined()).await;
    let dir = tempfile::tempdir().unwrap();
    let laptop = || Node::builder().bind(loopback()).data_dir(dir.path());
    let first = laptop().bootstrap([seed_addr]).spawn().await.unwrap();
    within("join", first.joined()).await;
    first.shutdown().await;
    drop(first);
    seed.shutdown().await;
    drop(seed);

    // The laptop starts with only its cache, and its one contact is down.
    let again = laptop().spawn().await.unwrap();
    let failed = within("the cached contact to fail", async {
        loop {
            let s = again.routing_snapshot();
            if s.entries
                .iter()
                .any(|e| e.peer == seed_id && e.health == Health::Bad)
            {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(failed.size, 1, "the cache kept its contact: {failed:?}");

    // The network returns (same identity, same address): the laptop gets
    // back in by itself, through the join retries.
    let back = seed_node(seed_addr).await.unwrap();
    within("rejoin once the contact is back", async {
        loop {
            let s = again.routing_snapshot();
            if s.entries
                .iter()
                .any(|e| e.peer == seed_id && e.health == Health::Good)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    within("joined", again.joined()).await;
    drop(back);
}

#[tokio::test]
async fn looking_up_an_unknown_peer_is_a_typed_not_found() {
    let seed = Node::builder().bind(loopback()).spawn().await.unwrap();
    within("seed join", seed.joined()).await;
    let nodes = network(&seed, 4).await;
    let stranger = reach::Keypair::generate().peer_id();
    let err = within("lookup", nodes[0].lookup(stranger))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "not_found");
}

#[tokio::test]
async fn the_bootstrap_node_itself_can_be_found_by_key() {
    let seed = Node::builder().bind(loopback()).spawn().await.unwrap();
    within("seed join", seed.joined()).await;
    let nodes = network(&seed, 1).await;
    let addrs = within("lookup", nodes[0].lookup(seed.peer_id()))
        .await
        .unwrap();
    assert_eq!(addrs[0].addr, seed.local_addr());
}

/// A hand-driven QUIC connection to `node` speaking raw reach frames, as a
/// hostile peer would.
async fn raw_connection(node: &Node, kp: &reach::Keypair) -> (quinn::Endpoint, quinn::Connection) {
    let (tls, _) = reach::tls::client_config(kp, node.peer_id()).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let cfg = quinn::ClientConfig::new(std::sync::Arc::new(crypto));
    let ep = quinn::Endpoint::client(loopback()).unwrap();
    let conn = ep
        .connect_with(cfg, node.local_addr(), reach::tls::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    (ep, conn)
}

/// Sends raw bytes on a new stream; returns the decoded answer, if any.
async fn raw_exchange(
    conn: &quinn::Connection,
    bytes: &[u8],
) -> Option<reach_proto::dht::rpc::DhtResponse> {
    use reach_proto::wire::envelope::{Body, Envelope, MAX_CONTROL_ENVELOPE_LEN};
    let (mut send, mut recv) = conn.open_bi().await.ok()?;
    send.write_all(bytes).await.ok()?;
    let _ = send.finish();
    let answer = tokio::time::timeout(DEADLINE, recv.read_to_end(1 << 20))
        .await
        .ok()?
        .ok()?;
    match Envelope::from_frame(&answer, MAX_CONTROL_ENVELOPE_LEN)
        .ok()?
        .body
    {
        Body::DhtResponse(r) => Some(r.response),
        _ => None,
    }
}

fn put_frame(record: reach_proto::dht::record::SignedRecord) -> Vec<u8> {
    use reach_proto::dht::rpc::{DhtRequest, DhtRequestMsg};
    use reach_proto::wire::envelope::{Body, Envelope};
    Envelope::new(Body::DhtRequest(DhtRequestMsg {
        server_mode: false,
        request: DhtRequest::PutRecord { record },
    }))
    .to_frame()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_dht_messages_never_panic_or_evict_honest_records() {
    use reach_proto::dht::Key;
    use reach_proto::dht::record::{RecordKind, SignedRecord};
    use reach_proto::dht::rpc::DhtResponse;

    let seed = Node::builder().bind(loopback()).spawn().await.unwrap();
    within("seed join", seed.joined()).await;
    let nodes = network(&seed, 5).await;
    let honest = nodes[0].peer_id();
    let held_before = seed.store_snapshot().summary.records;
    assert!(
        held_before >= 6,
        "the seed holds everyone's endpoint record"
    );

    let attacker = reach::Keypair::generate();
    let (_ep, conn) = raw_connection(&seed, &attacker).await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let hour = Duration::from_secs(3600);

    // Announces a 4 GiB frame: refused before anything is allocated.
    assert_eq!(raw_exchange(&conn, &u32::MAX.to_be_bytes()).await, None);
    // Garbage after a valid length.
    let mut garbage = 12u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xff; 12]);
    assert_eq!(raw_exchange(&conn, &garbage).await, None);

    // A forged endpoint record for the honest peer: bad signature.
    let mut forged = SignedRecord::endpoint(&attacker, vec![], u64::MAX, now_ms, hour);
    forged.publisher = honest;
    forged.key = Key::for_peer(&honest);
    assert_eq!(
        raw_exchange(&conn, &put_frame(forged)).await,
        Some(DhtResponse::Refused {
            reason: "bad_signature".into()
        })
    );
    // An oversize mailbox record.
    let huge = SignedRecord::sign(
        &attacker,
        RecordKind::Mailbox,
        Key::for_peer(&honest),
        1,
        now_ms,
        hour,
        vec![0; 40 * 1024],
    );
    assert_eq!(
        raw_exchange(&conn, &put_frame(huge)).await,
        Some(DhtResponse::Refused {
            reason: "oversize".into()
        })
    );
    // A flood of valid records from one publisher: the quota stops it.
    let mut refused = 0;
    for i in 0..200 {
        let r = SignedRecord::topic(&attacker, &format!("spam-{i}"), 1, now_ms, hour);
        if let Some(DhtResponse::Refused { reason }) = raw_exchange(&conn, &put_frame(r)).await {
            assert_eq!(reason, "quota_exceeded");
            refused += 1;
        }
    }
    assert_eq!(refused, 200 - reach_proto::dht::store::MAX_PER_PUBLISHER);

    // Nothing honest was evicted, the rejections were counted, and the
    // node still answers lookups for the honest peer.
    let after = seed.store_snapshot();
    assert_eq!(
        after.summary.records,
        held_before + reach_proto::dht::store::MAX_PER_PUBLISHER
    );
    assert_eq!(after.summary.rejections.get("bad_signature"), Some(&1));
    assert_eq!(after.summary.rejections.get("oversize"), Some(&1));
    let addrs = within("lookup", nodes[3].lookup(honest)).await.unwrap();
    assert_eq!(addrs[0].addr, nodes[0].local_addr());
    assert!(seed.stats().core.malformed_streams >= 2);
}

#[tokio::test]
async fn client_mode_nodes_use_the_dht_but_stay_out_of_routing_tables() {
    let seed = Node::builder().bind(loopback()).spawn().await.unwrap();
    within("seed join", seed.joined()).await;
    let servers = network(&seed, 4).await;
    let client = Node::builder()
        .bind(loopback())
        .bootstrap([seed.local_addr()])
        .dht_mode(reach::DhtMode::Client)
        .spawn()
        .await
        .unwrap();
    within("client join", client.joined()).await;
    // The client resolves and reaches servers by key.
    within("connect", client.connect(servers[2].peer_id(), []))
        .await
        .unwrap();
    // Nobody lists the client as a DHT contact, and it published nothing.
    for n in servers.iter().chain([&seed]) {
        assert!(
            n.routing_snapshot()
                .entries
                .iter()
                .all(|e| e.peer != client.peer_id())
        );
    }
    let err = within("lookup", servers[0].lookup(client.peer_id()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "not_found");
}
