//! `GET /metrics` on real nodes on loopback: the scrape of nodes that
//! connected by key, relayed and punched passes `promtool check metrics`,
//! the histograms count what happened, relay failover is timed, and the
//! number of series does not grow with the number of peers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reach::api::client::raw_request;
use reach::api::metrics::{MAX_SERIES, series_count};
use reach::{ConnectionLimits, Keypair, Node, RelayMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::{
    holds_relay, logs, loopback, node_holding_a_relay, outsider, relay_node, relayed_then_punched,
    until, within,
};

/// Starts the control API of `node` in a fresh data dir and scrapes
/// `/metrics` once with the token.
async fn scrape(node: &Node) -> String {
    let dir = tempfile::tempdir().unwrap();
    let api = reach::api::serve(node.clone(), dir.path(), loopback())
        .await
        .unwrap();
    let token = std::fs::read_to_string(dir.path().join(reach::api::TOKEN_FILE)).unwrap();
    let (status, body) = raw_request(api.addr(), Some(&token), "GET", "/metrics", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    api.stop().await;
    String::from_utf8(body).unwrap()
}

/// The value of the sample `series` (name and labels exactly as exposed).
fn value(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series} in the scrape:\n{scrape}"))
        .parse()
        .unwrap()
}

/// Whether promtool can run here; when it cannot, says why, and fails
/// instead where it is required (REACH_LAB_REQUIRED=1 or CI=true, as the
/// lab tests do: scripts/test.sh installs it).
fn promtool_available() -> bool {
    let found = std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        let required = std::env::var("REACH_LAB_REQUIRED").as_deref() == Ok("1")
            || std::env::var("CI").as_deref() == Ok("true");
        assert!(
            !required,
            "promtool is required here but not found (Debian package prometheus)"
        );
        eprintln!("skipping promtool: not installed (Debian package prometheus)");
    }
    found
}

/// `promtool check metrics` on `scrape`: its complaints (empty when it
/// reports no problem).
fn promtool_problems(scrape: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        assert!(said.trim().is_empty(), "promtool said: {said}");
        String::new()
    } else {
        format!("promtool failed ({}): {said}", out.status)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_of_nodes_that_connected_relayed_and_punched_pass_promtool() {
    logs();
    let relay = relay_node().await;
    let bob = node_holding_a_relay(&relay).await;
    // Alice stays out of the DHT: her path to Bob starts relayed and
    // becomes direct by a punch.
    let alice = outsider().spawn().await.unwrap();
    // Carol dials Bob by key and address (she stays out of the DHT: a
    // DHT member would already be connected to Bob by its lookups, and
    // a connect that finds a live connection does not dial).
    let carol = outsider().spawn().await.unwrap();
    holds_relay(&bob, &relay).await;
    relayed_then_punched(&alice, &bob, &relay).await;
    let before = Instant::now();
    within(
        "carol connects",
        carol.connect(bob.peer_id(), [bob.local_addr()]),
    )
    .await
    .unwrap();
    let took = before.elapsed().as_secs_f64();

    let a = scrape(&alice).await;
    let r = scrape(&relay).await;
    let c = scrape(&carol).await;
    let b = scrape(&bob).await;

    // What happened shows.
    assert_eq!(
        value(&a, "reach_punch_time_to_direct_seconds_count"),
        1.0,
        "{a}"
    );
    assert!(value(&a, "reach_punch_successes_total{technique=\"lan_first\"}") >= 1.0);
    assert!(value(&a, "reach_relayed_dials_total") >= 1.0);
    assert!(value(&r, "reach_relay_circuits_opened_total") >= 1.0);
    assert!(value(&r, "reach_relay_forwarded_packets_total") >= 1.0);
    assert!(value(&r, "reach_relay_reservations_granted_total") >= 1.0);
    assert_eq!(value(&c, "reach_connect_seconds_count"), 1.0, "{c}");
    let connect_sum = value(&c, "reach_connect_seconds_sum");
    assert!(
        connect_sum > 0.0 && connect_sum <= took,
        "connect took {connect_sum}s by the histogram, {took}s as the test saw it"
    );
    assert!(value(&b, "reach_dht_lookup_seconds_count") >= 1.0);
    assert_eq!(
        value(&c, "reach_connect_seconds_bucket{le=\"+Inf\"}"),
        value(&c, "reach_connect_seconds_count")
    );
    assert_eq!(
        value(
            &a,
            &format!(
                "reach_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    assert!(value(&a, "reach_uptime_seconds") > 0.0);
    for s in [&a, &r, &c, &b] {
        assert!(!s.contains("_total_total"));
        assert!(series_count(s) <= MAX_SERIES, "{} series", series_count(s));
    }

    if promtool_available() {
        for (who, s) in [("alice", &a), ("relay", &r), ("carol", &c), ("bob", &b)] {
            let problems = promtool_problems(s);
            assert!(problems.is_empty(), "{who}: {problems}\n{s}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_the_token_and_refusals_are_counted() {
    let node = Node::builder().bind(loopback()).spawn().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let api = reach::api::serve(node.clone(), dir.path(), loopback())
        .await
        .unwrap();
    let (status, body) = raw_request(api.addr(), None, "GET", "/metrics", None)
        .await
        .unwrap();
    assert_eq!(status, 401);
    assert!(String::from_utf8_lossy(&body).contains("unauthorized"));
    let token = std::fs::read_to_string(dir.path().join(reach::api::TOKEN_FILE)).unwrap();
    let (status, body) = raw_request(api.addr(), Some(&token), "GET", "/metrics", None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let s = String::from_utf8(body).unwrap();
    assert!(value(&s, "reach_refused_total{reason=\"api_request_refused\"}") >= 1.0);
    // Every reason is listed, zero or not.
    for (reason, _) in reach::api::metrics::REFUSAL_REASONS {
        value(&s, &format!("reach_refused_total{{reason=\"{reason}\"}}"));
    }
    // A request head hyper cannot parse is refused (JSON 400) and counted.
    let refused = |s: &str| value(s, "reach_refused_total{reason=\"api_request_refused\"}");
    let before = refused(&s);
    let mut tcp = tokio::net::TcpStream::connect(api.addr()).await.unwrap();
    tcp.write_all(b"NOT HTTP AT ALL\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    within("the refusal", tcp.read_to_end(&mut answer))
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&answer).contains("bad_request"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let (_, body) = raw_request(api.addr(), Some(&token), "GET", "/metrics", None)
        .await
        .unwrap();
    assert!(refused(&String::from_utf8(body).unwrap()) > before);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_failover_is_timed_from_loss_to_the_next_relay_held() {
    logs();
    let r1 = relay_node().await;
    let r2 = relay_node().await;
    r2.bootstrap(&[r1.local_addr()]).await;
    let bob = Node::builder()
        .bind(loopback())
        .bootstrap([r1.local_addr(), r2.local_addr()])
        .relay_service(RelayMode::Off)
        .acquire_relay(RelayMode::On)
        .spawn()
        .await
        .unwrap();
    let held = |n: &Node| n.relay_status().held_relay;
    until("bob holds a relay", || held(&bob).is_some()).await;
    let failover = |n: &Node| {
        n.histograms()
            .into_iter()
            .find(|h| h.name == "reach_relay_failover_seconds")
            .unwrap()
            .snapshot
    };
    assert_eq!(failover(&bob).count, 0, "no relay lost yet");
    let (old, other) = if held(&bob) == Some(r1.peer_id()) {
        (r1, r2)
    } else {
        (r2, r1)
    };
    let lost_at = Instant::now();
    old.shutdown().await;
    until("bob holds the other relay", || {
        held(&bob) == Some(other.peer_id())
    })
    .await;
    let took = lost_at.elapsed().as_secs_f64();
    let f = failover(&bob);
    assert_eq!(f.count, 1, "{f:?}");
    assert!(
        f.sum_seconds > 0.0 && f.sum_seconds <= took,
        "failover {}s by the histogram, {took}s as the test saw it",
        f.sum_seconds
    );
    let s = scrape(&bob).await;
    assert_eq!(value(&s, "reach_relay_failover_seconds_count"), 1.0);
    if promtool_available() {
        let problems = promtool_problems(&s);
        assert!(problems.is_empty(), "{problems}\n{s}");
    }
}

/// Peers the series test connects to one node. Each is a real QUIC
/// connection with its own identity, dialed from one client endpoint.
const MANY_PEERS: usize = 1000;
/// Handshakes the test runs at once (under the node's limit of handshakes
/// in flight, so none is asked to retry).
const DIAL_BATCH: usize = 100;

async fn raw_dial(ep: &quinn::Endpoint, node: &Node) -> quinn::Connection {
    let kp = Keypair::generate();
    let (tls, _) = reach::tls::client_config(&kp, node.peer_id()).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    // Keep every connection alive while the others are dialed: a loaded
    // machine takes longer than the node's idle timeout for a thousand
    // handshakes, and a silent connection would idle out before the scrape.
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    cfg.transport_config(Arc::new(transport));
    ep.connect_with(cfg, node.local_addr(), reach::tls::SERVER_NAME)
        .unwrap()
        .await
        .unwrap()
}

/// The series of a scrape without their values.
fn series_names(scrape: &str) -> Vec<String> {
    scrape
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.rsplit_once(' ').unwrap().0.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_number_of_series_does_not_grow_with_peers() {
    logs();
    let node = Node::builder()
        .bind(loopback())
        .connection_limits(ConnectionLimits {
            // The dials take a while in a debug build: none may be closed
            // as silent before the scrape.
            silent_timeout: Duration::from_secs(300),
            ..ConnectionLimits::default()
        })
        .spawn()
        .await
        .unwrap();
    let ep = quinn::Endpoint::client(loopback()).unwrap();
    let mut conns = Vec::new();
    for _ in 0..3 {
        conns.push(within("dial", raw_dial(&ep, &node)).await);
    }
    until("3 peers", || node.stats().core.inbound_connections == 3).await;
    let few = scrape(&node).await;

    let started = Instant::now();
    while conns.len() < MANY_PEERS {
        let n = DIAL_BATCH.min(MANY_PEERS - conns.len());
        let batch = futures::future::join_all((0..n).map(|_| raw_dial(&ep, &node)));
        conns.extend(within("a batch of dials", batch).await);
    }
    // Counted once its handshake is through (the open-connection gauge
    // counts admitted connections, some still in their handshake).
    until("every peer connected", || {
        node.stats().core.connections_inbound == MANY_PEERS as u64
    })
    .await;
    eprintln!("{MANY_PEERS} peers connected in {:?}", started.elapsed());
    let many = scrape(&node).await;
    // Every dial was accepted; a few of these silent peers (they answer
    // none of the node's requests) may already be gone again on a loaded
    // machine, which is not what this test is about.
    let open = value(&many, "reach_inbound_connections");
    assert!(
        open <= MANY_PEERS as f64 && open >= MANY_PEERS as f64 * 0.9,
        "{open} inbound connections open"
    );
    assert_eq!(
        value(&many, "reach_connections_inbound_total"),
        MANY_PEERS as f64
    );
    assert_eq!(series_names(&few), series_names(&many));
    assert!(
        series_count(&many) <= MAX_SERIES,
        "{} series",
        series_count(&many)
    );
    eprintln!(
        "series with 3 peers: {}, with {MANY_PEERS}: {}",
        series_count(&few),
        series_count(&many)
    );
    for c in &conns {
        c.close(0u32.into(), b"done");
    }
    ep.wait_idle().await;
}
