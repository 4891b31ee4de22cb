//! Helpers shared by the loopback integration tests of relays and hole
//! punching. (Each test file compiles this on its own and uses a part.)
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

/// Every wait is bounded by this.
pub const DEADLINE: Duration = Duration::from_secs(60);

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {DEADLINE:?}"))
}

/// Waits until `cond` holds, checking every 20 ms, for at most DEADLINE.
pub async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// `REACH_LOG=reach=debug cargo test …` shows the nodes' logs.
pub fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("REACH_LOG"))
        .with_test_writer()
        .try_init();
}

/// A public node as `key`, its own topic home (no relay service, no relay
/// acquired), in the DHT through `via`, with `federation` configured.
pub async fn topic_home(
    via: &reach::Node,
    key: reach::Keypair,
    federation: reach::TopicFederation,
) -> reach::Node {
    let n = reach::Node::builder()
        .keypair(key)
        .bind(loopback())
        .bootstrap([via.local_addr()])
        .relay_service(reach::RelayMode::Off)
        .acquire_relay(reach::RelayMode::Off)
        .topic_federation(federation)
        .spawn()
        .await
        .unwrap();
    within("the public node joins", n.joined()).await;
    n
}

/// A node that serves as a relay and holds none itself.
pub async fn relay_node() -> reach::Node {
    reach::Node::builder()
        .bind(loopback())
        .relay_service(reach::RelayMode::On)
        .acquire_relay(reach::RelayMode::Off)
        .spawn()
        .await
        .unwrap()
}

/// A node that joins through `relay` and holds a relay (serving none).
pub async fn node_holding_a_relay(relay: &reach::Node) -> reach::Node {
    reach::Node::builder()
        .bind(loopback())
        .bootstrap([relay.local_addr()])
        .relay_service(reach::RelayMode::Off)
        .acquire_relay(reach::RelayMode::On)
        .spawn()
        .await
        .unwrap()
}

/// A node out of the DHT that holds no relay: it reaches others only the way
/// a test tells it to, so no DHT request opens a direct path before a punch
/// does.
pub fn outsider() -> reach::NodeBuilder {
    reach::Node::builder()
        .bind(loopback())
        .acquire_relay(reach::RelayMode::Off)
}

/// Waits until `holder` joined through `relay` and holds it.
pub async fn holds_relay(holder: &reach::Node, relay: &reach::Node) {
    within("the relay holder joins", holder.joined()).await;
    until("the relay holder holds the relay", || {
        holder.relay_status().held_relay == Some(relay.peer_id())
    })
    .await;
}

/// How long a relayed connection's punch may take to make it direct.
pub const PUNCH_WAIT: Duration = Duration::from_secs(20);

/// `from` reaches `to` through `relay` (the relayed path first), and a
/// punch makes the connection direct within [`PUNCH_WAIT`].
pub async fn relayed_then_punched(from: &reach::Node, to: &reach::Node, relay: &reach::Node) {
    from.connect_via_relay(to.peer_id(), relay.peer_id(), relay.local_addr())
        .await
        .unwrap();
    assert!(
        from.wait_direct(to.peer_id(), PUNCH_WAIT).await,
        "the connection became direct: {:?}",
        from.punch_stats()
    );
}
