//! The `reach` binary as a user runs it.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{DEADLINE, Proc, REACH, reach};

#[test]
fn demo_json_runs_twenty_nodes_and_delivers_everything() {
    let out = reach(&["demo", "--loopback", "--json", "--nodes", "20"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let line = stdout.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["nodes"], 20);
    let sent = v["messages_sent"].as_u64().unwrap();
    // 20 nodes x 5 messages, and 3 newcomers x 3 reached by key.
    assert_eq!(sent, 109);
    // The newcomers' dials really went through the DHT: one fresh lookup
    // of a signed endpoint record each.
    assert_eq!(v["newcomer_resolutions"].as_u64(), Some(9));
    assert!(v["dht_resolutions"].as_u64().unwrap() >= 9);
    assert_eq!(v["messages_delivered"].as_u64().unwrap(), sent);
    assert_eq!(v["streams_verified"], v["streams_opened"]);
    assert!(v["wall_ms"].as_u64().is_some());
    assert!(v["connections"].as_u64().unwrap() >= 100);
    // Durable messages to a node that was offline arrived when it returned.
    assert_eq!(v["durable_delivered"], v["durable_sent"]);
    assert_eq!(v["durable_in_order_once"], true);
}

#[test]
fn id_is_created_once_and_a_malformed_key_is_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let first = reach(&["id", "--data-dir", d]);
    assert!(first.status.success());
    let id = String::from_utf8(first.stdout).unwrap();
    assert_eq!(id.trim().len(), 52);
    let again = reach(&["id", "--data-dir", d]);
    assert_eq!(String::from_utf8(again.stdout).unwrap(), id);

    let key = dir.path().join("identity.key");
    std::fs::write(&key, "garbage").unwrap();
    let bad = reach(&["id", "--data-dir", d]);
    assert!(!bad.status.success());
    let err = String::from_utf8(bad.stderr).unwrap();
    assert!(err.contains(key.to_str().unwrap()), "{err}");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), "garbage");
}

#[test]
fn status_without_a_running_node_says_how_to_start_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = reach(&["status", "--data-dir", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("no running node"), "{err}");
    assert!(err.contains("reach node"), "{err}");
}

#[test]
fn config_with_unknown_key_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("reach.toml");
    std::fs::write(&cfg, "lisen = \"127.0.0.1:0\"\n").unwrap();
    let out = reach(&[
        "node",
        "--config",
        cfg.to_str().unwrap(),
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains(cfg.to_str().unwrap()) && err.contains("lisen"),
        "{err}"
    );
}

/// A `reach node` child on `data_dir` with `config` and `extra` flags.
fn start_node(data_dir: &Path, config: &Path, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(REACH);
    cmd.args(["node", "--data-dir", data_dir.to_str().unwrap()])
        .args(["--config", config.to_str().unwrap()])
        .args(extra);
    Proc::command(cmd)
}

#[test]
fn two_node_daemons_talk_through_the_cli() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("reach.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:0\"\napi_listen = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let status = |dir: &Path| -> serde_json::Value {
        let out = reach(&["status", "--json", "--data-dir", dir.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let a = start_node(a_dir.path(), &cfg, &[]);
    a.wait_line("control API");
    let sa = status(a_dir.path());
    let a_addr = sa["local_addr"].as_str().unwrap().to_string();
    // The status carries the hole-punching stats, every technique listed.
    assert_eq!(sa["punch"]["techniques"].as_array().map(Vec::len), Some(4));
    // B joins the DHT through A's bare address.
    let b = start_node(b_dir.path(), &cfg, &["--bootstrap", &a_addr]);
    b.wait_line("control API");
    b.wait_line("dht         joined");
    let sb = status(b_dir.path());
    let b_id = sb["peer_id"].as_str().unwrap().to_string();
    let b_addr = sb["local_addr"].as_str().unwrap().to_string();
    let id_out = reach(&["id", "--data-dir", a_dir.path().to_str().unwrap()]);
    assert_eq!(
        String::from_utf8(id_out.stdout).unwrap().trim(),
        sa["peer_id"].as_str().unwrap()
    );

    let sent = reach(&[
        "send",
        &b_id,
        "hello from the cli",
        "--addr",
        &b_addr,
        "--data-dir",
        a_dir.path().to_str().unwrap(),
    ]);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let line = b.wait_line("message from");
    assert_eq!(
        line,
        format!(
            "message from {}: hello from the cli",
            sa["peer_id"].as_str().unwrap()
        )
    );
    let text =
        String::from_utf8(reach(&["status", "--data-dir", a_dir.path().to_str().unwrap()]).stdout)
            .unwrap();
    assert!(
        text.contains("1 connected") && text.contains(&b_id),
        "{text}"
    );
    // The connection's key exchange is post-quantum, and status shows it.
    assert!(text.contains("X25519MLKEM768"), "{text}");
    assert!(text.contains("handshake pq prefer"), "{text}");

    // B finds A by key alone, through the DHT, and sends without an address.
    let a_id = sa["peer_id"].as_str().unwrap();
    let found = reach(&[
        "lookup",
        a_id,
        "--json",
        "--data-dir",
        b_dir.path().to_str().unwrap(),
    ]);
    assert!(
        found.status.success(),
        "{}",
        String::from_utf8_lossy(&found.stderr)
    );
    let found: serde_json::Value = serde_json::from_slice(&found.stdout).unwrap();
    assert_eq!(found["addrs"][0]["addr"].as_str().unwrap(), a_addr);
    let by_key = reach(&[
        "send",
        a_id,
        "by key",
        "--data-dir",
        b_dir.path().to_str().unwrap(),
    ]);
    assert!(
        by_key.status.success(),
        "{}",
        String::from_utf8_lossy(&by_key.stderr)
    );
    let line = a.wait_line("message from");
    assert_eq!(line, format!("message from {b_id}: by key"));
    let unknown = reach(&[
        "lookup",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "--data-dir",
        b_dir.path().to_str().unwrap(),
    ]);
    assert!(!unknown.status.success());

    // A bad peer id is a usage error from clap, naming the problem.
    let bad = reach(&[
        "send",
        "not-a-peer",
        "x",
        "--data-dir",
        a_dir.path().to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("peer id"));

    assert!(a.terminate().success());
    assert!(b.terminate().success());
    assert!(!a_dir.path().join("api.json").exists());
}

#[test]
fn received_messages_print_as_one_escaped_line_or_one_json_object() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let c_dir = tempfile::tempdir().unwrap();
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("reach.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:0\"\napi_listen = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let status = |dir: &Path| -> serde_json::Value {
        let out = reach(&["status", "--json", "--data-dir", dir.to_str().unwrap()]);
        assert!(out.status.success());
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let a = start_node(a_dir.path(), &cfg, &[]);
    let b = start_node(b_dir.path(), &cfg, &[]);
    let c = start_node(c_dir.path(), &cfg, &["--json"]);
    for n in [&a, &b, &c] {
        n.wait_line("control API");
    }
    let a_id = status(a_dir.path())["peer_id"]
        .as_str()
        .unwrap()
        .to_string();
    let send = |to_dir: &Path, text: &str| {
        let s = status(to_dir);
        let out = reach(&[
            "send",
            s["peer_id"].as_str().unwrap(),
            text,
            "--addr",
            s["local_addr"].as_str().unwrap(),
            "--data-dir",
            a_dir.path().to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // A peer tries to forge a line from another peer and to colour the
    // terminal; then a harmless message follows.
    let forged = "hi\nmessage from mallory: x\x1b[31m";
    send(b_dir.path(), forged);
    send(b_dir.path(), "after");
    // The two lines printed are the two messages: nothing was injected.
    let mut lines = [b.wait_line("message from"), b.wait_line("message from")];
    lines.sort();
    assert_eq!(
        lines,
        [
            format!("message from {a_id}: after"),
            format!("message from {a_id}: hi\\nmessage from mallory: x\\u{{1b}}[31m"),
        ]
    );

    // --json: one object per message, the text exactly as sent.
    send(c_dir.path(), forged);
    let line = c.wait_line("\"event\":\"message\"");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["peer"], a_id.as_str());
    assert_eq!(v["text"], forged);
    assert_eq!(v["len"], forged.len());
    assert!(!line.contains('\x1b'));
}

#[test]
fn bench_relay_goes_through_the_relay() {
    let out = reach(&[
        "bench", "relay", "--json", "--mib", "4", "--rounds", "2", "--pings", "20",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let relayed_bulk = v["bulk_bytes"].as_u64().unwrap() * v["rounds"].as_u64().unwrap();
    assert_eq!(relayed_bulk, 2 * 4 * 1024 * 1024);
    assert!(
        v["relay_forwarded_bytes"].as_u64().unwrap() >= relayed_bulk,
        "{v}"
    );
    assert!(v["bulk_ratio"].as_f64().unwrap() > 0.0);
}

#[test]
fn the_api_answers_through_a_flood_of_half_open_connections_with_few_descriptors() {
    // This process holds the flood's 1,100 client ends.
    reach::api::raise_fd_limit();
    let dir = tempfile::tempdir().unwrap();
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("reach.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:0\"\napi_listen = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    // The node may hold at most 1,024 descriptors (soft and hard limit), as
    // under a common default: fewer than the flood's connections.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "ulimit -n 1024 && exec \"$0\" \"$@\"", REACH])
        .args(["node", "--data-dir", dir.path().to_str().unwrap()])
        .args(["--config", cfg.to_str().unwrap()]);
    let node = Proc::command(cmd);
    node.wait_line("control API");
    let disc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("api.json")).unwrap()).unwrap();
    let api: std::net::SocketAddr = disc["addr"].as_str().unwrap().parse().unwrap();

    let mut stalled = Vec::new();
    for _ in 0..1100 {
        let mut s = std::net::TcpStream::connect_timeout(&api, DEADLINE).expect("connect");
        // The node may already have closed it to make room.
        let _ = s.write_all(b"POST /v1/send HTTP/1.1\r\nHost: x\r\nContent-Le");
        stalled.push(s);
    }
    let flooded = Instant::now();
    // The node holds at most its connection cap of them, far from its
    // descriptor limit.
    let pid = node.child.id();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    assert!(fds < 512, "the node holds {fds} descriptors");
    let out = reach(&[
        "status",
        "--json",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["peer_id"], disc["peer_id"]);
    // Answered at once, not when the stalled connections' header time
    // (5 s) is up and frees descriptors.
    assert!(
        flooded.elapsed() < Duration::from_secs(2),
        "{:?}",
        flooded.elapsed()
    );
    drop(stalled);
    assert!(node.terminate().success());
}

#[test]
fn a_ticket_reaches_a_node_that_shares_no_dht() {
    // Two daemons, neither bootstrapped: no DHT holds either's record, so
    // only the ticket can say where A is.
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("reach.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:0\"\napi_listen = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let a = start_node(a_dir.path(), &cfg, &[]);
    a.wait_line("control API");
    let b = start_node(b_dir.path(), &cfg, &[]);
    b.wait_line("control API");
    let out = reach(&[
        "id",
        "--ticket",
        "--data-dir",
        a_dir.path().to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ticket = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(ticket.starts_with("reach1"), "{ticket}");
    let parsed: reach::Ticket = ticket.parse().expect("the ticket parses");
    let a_id = reach(&["id", "--data-dir", a_dir.path().to_str().unwrap()]);
    assert_eq!(
        parsed.peer.to_string(),
        String::from_utf8(a_id.stdout).unwrap().trim()
    );
    assert!(!parsed.addrs.is_empty(), "the ticket carries addresses");

    // By id alone B cannot find A; by ticket it can.
    let b_dir_s = b_dir.path().to_str().unwrap();
    let by_id = reach(&[
        "send",
        &parsed.peer.to_string(),
        "by id",
        "--data-dir",
        b_dir_s,
    ]);
    assert!(
        !by_id.status.success(),
        "no DHT, no record: the send must fail"
    );
    let sent = reach(&["send", &ticket, "by ticket", "--data-dir", b_dir_s]);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    a.wait_line("by ticket");

    // A malformed ticket is refused with a clear error, before any dial.
    let mut bad = ticket.clone();
    bad.truncate(ticket.len() - 7);
    let refused = reach(&["send", &bad, "x", "--data-dir", b_dir_s]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("ticket"), "{err}");
    drop(b);
}

#[test]
fn demo_tells_the_nat_story_in_a_lab_where_it_can() {
    if !reach_lab::netns::lab_available_for_tests() {
        return;
    }
    let out = reach(&["demo", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(out.stdout.trim_ascii()).expect("one JSON object");
    assert_eq!(v["as_told"], true, "{v}");
    let steps = v["steps"].as_array().unwrap();
    assert_eq!(steps[0]["first_path"], "direct", "to the port-mapped node");
    assert_eq!(steps[1]["first_path"], "relayed");
    assert_eq!(steps[1]["ended_direct"], true, "punched to direct");
    assert_eq!(
        steps[2]["first_path"], "relayed",
        "from the UDP-blocked network"
    );
    assert!(steps.iter().all(|s| s["delivered"] == true));
}
