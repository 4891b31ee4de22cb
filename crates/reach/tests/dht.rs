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
            tasks.spawn(async move {
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
    let resolved: u64 = nodes.iter().map(|n| n.stats().dht_resolutions).sum();
    assert!(resolved >= 1, "dials went through the DHT");
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
