//! The event log with real nodes on loopback: `<data dir>/events.jsonl`
//! records connections, a punch to direct, start and stop, and rotates at
//! its configured size without losing a line it did not count as dropped.

use std::path::Path;

use reach::eventlog::{EventLogConfig, log_path, rotated_path};
use reach::{Node, PeerId};
use serde_json::Value;

mod common;
use common::{
    holds_relay, logs, loopback, node_holding_a_relay, outsider, relay_node, relayed_then_punched,
    until, within,
};

/// The log's lines, oldest first: rotated files `keep..=1`, then the
/// current one. Every line must be a JSON object with `v`, `ts`, `kind`.
fn read_log(dir: &Path, keep: usize) -> Vec<Value> {
    let mut files: Vec<_> = (1..=keep).rev().map(|n| rotated_path(dir, n)).collect();
    files.push(log_path(dir));
    let mut out = Vec::new();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        for l in text.lines() {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: bad line {l:?}: {e}", f.display()));
            assert_eq!(v["v"], 1, "{l}");
            assert!(v["ts"].as_str().is_some_and(|t| t.ends_with('Z')), "{l}");
            out.push(v);
        }
    }
    out
}

fn has(lines: &[Value], kind: &str, pred: impl Fn(&Value) -> bool) -> bool {
    lines.iter().any(|l| l["kind"] == kind && pred(l))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_logged_with_its_peer_and_the_node_logs_start_and_stop() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let alice = Node::builder()
        .bind(loopback())
        .data_dir(dir.path())
        .spawn()
        .await
        .unwrap();
    let bob = Node::builder().bind(loopback()).spawn().await.unwrap();
    let bob_id = bob.peer_id().to_string();
    alice
        .connect(bob.peer_id(), [bob.local_addr()])
        .await
        .unwrap();
    until("the log shows the connection", || {
        has(&read_log(dir.path(), 0), "connection_up", |l| {
            l["peer"] == bob_id.as_str() && l["path"] == "direct" && l["direction"] == "outbound"
        })
    })
    .await;
    let lines = read_log(dir.path(), 0);
    assert_eq!(lines[0]["kind"], "start");
    assert_eq!(lines[0]["peer_id"], alice.peer_id().to_string());
    bob.shutdown().await;
    until("the log shows the disconnection", || {
        has(&read_log(dir.path(), 0), "connection_down", |l| {
            l["peer"] == bob_id.as_str()
        })
    })
    .await;
    within("alice stops", alice.shutdown()).await;
    let lines = read_log(dir.path(), 0);
    assert_eq!(lines.last().unwrap()["kind"], "stop", "{lines:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_punch_to_direct_is_logged_as_a_path_upgrade_and_a_punch_outcome() {
    logs();
    let relay = relay_node().await;
    let bob = node_holding_a_relay(&relay).await;
    let dir = tempfile::tempdir().unwrap();
    // Alice stays out of the DHT, as in tests/punch.rs: only the punch may
    // open a direct path to Bob.
    let alice = outsider().data_dir(dir.path()).spawn().await.unwrap();
    holds_relay(&bob, &relay).await;
    relayed_then_punched(&alice, &bob, &relay).await;
    let bob_id = bob.peer_id().to_string();
    let relay_id = relay.peer_id().to_string();
    until(
        "the log shows the relayed connection, the upgrade and the punch",
        || {
            let lines = read_log(dir.path(), 0);
            has(&lines, "connection_up", |l| {
                l["peer"] == bob_id.as_str()
                    && l["path"] == "relayed"
                    && l["relay"] == relay_id.as_str()
            }) && has(&lines, "path_upgraded", |l| {
                l["peer"] == bob_id.as_str() && l["path"] == "direct"
            }) && has(&lines, "punch", |l| {
                l["peer"] == bob_id.as_str()
                    && l["direct"] == true
                    && l["technique"].is_string()
                    && l["time_to_direct_ms"].is_u64()
            })
        },
    )
    .await;
}

/// The rotation test's file size: a handful of lines per file.
const SMALL_FILE: u64 = 1000;
/// Rotated files kept in the rotation test.
const KEEP: usize = 2;
/// Peers connected in the rotation test: enough lines to rotate several
/// times past KEEP.
const PEERS: usize = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_the_configured_files_and_loses_no_uncounted_line() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let alice = Node::builder()
        .bind(loopback())
        .data_dir(dir.path())
        .event_log_config(EventLogConfig {
            enabled: true,
            max_file_bytes: SMALL_FILE,
            keep_files: KEEP,
        })
        .spawn()
        .await
        .unwrap();
    let mut order: Vec<String> = Vec::new();
    let mut peers: Vec<Node> = Vec::new();
    for _ in 0..PEERS {
        let p = Node::builder().bind(loopback()).spawn().await.unwrap();
        p.connect(alice.peer_id(), [alice.local_addr()])
            .await
            .unwrap();
        let id: PeerId = p.peer_id();
        until("alice sees the peer", || {
            alice.connected_peers().iter().any(|c| c.peer == id)
        })
        .await;
        order.push(id.to_string());
        peers.push(p);
    }
    let last = order.last().unwrap().clone();
    until("the log shows the last connection", || {
        has(&read_log(dir.path(), KEEP), "connection_up", |l| {
            l["peer"] == last.as_str()
        })
    })
    .await;

    assert!(
        !rotated_path(dir.path(), KEEP + 1).exists(),
        "only {KEEP} rotated files are kept"
    );
    for n in 1..=KEEP {
        let len = std::fs::metadata(rotated_path(dir.path(), n))
            .unwrap()
            .len();
        assert!(len <= SMALL_FILE, "events.{n}.jsonl is {len} bytes");
    }
    let lines = read_log(dir.path(), KEEP);
    let ups: Vec<&str> = lines
        .iter()
        .filter(|l| l["kind"] == "connection_up")
        .map(|l| l["peer"].as_str().unwrap())
        .collect();
    let dropped: u64 = lines
        .iter()
        .filter(|l| l["kind"] == "dropped")
        .map(|l| l["count"].as_u64().unwrap())
        .sum();
    // The oldest lines went with the deleted file; from the first one kept,
    // every connection is there, in order, unless counted as dropped.
    assert!(ups.len() < PEERS, "the oldest lines were rotated away");
    let first = order.iter().position(|p| p == ups[0]).unwrap();
    let expected = &order[first..];
    let mut it = expected.iter();
    for up in &ups {
        assert!(
            it.any(|p| p == up),
            "connection_up lines out of order: {ups:?}"
        );
    }
    let missing = (expected.len() - ups.len()) as u64;
    assert!(
        missing <= dropped,
        "{missing} connections missing from the kept files, {dropped} counted as dropped"
    );
}
