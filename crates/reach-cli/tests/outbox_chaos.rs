//! A small `reach chaos outbox` in the test suite: real `reach node`
//! daemons on loopback, B stopped and killed and A killed at random while
//! A's API commits critical messages for B. The full size (10,000 messages,
//! 100 kills) is run by the command itself (see the README); here 300
//! messages spread over at least 10 kills must arrive with nothing lost,
//! nothing twice, in order, and moderate messages to nobody must be given
//! up after exactly their attempts.

use std::process::Command;
use std::time::Duration;

mod common;
use common::{Proc, REACH, ok, reach};

/// A `reach node` on `dir` at `listen`, joining through `bootstrap`.
fn daemon(dir: &std::path::Path, listen: &str, bootstrap: &str) -> Proc {
    let p = Proc::spawn(&[
        "node",
        "--json",
        "--data-dir",
        dir.to_str().unwrap(),
        "--listen",
        listen,
        "--api-listen",
        "127.0.0.1:0",
        "--bootstrap",
        bootstrap,
        "--relay",
        "off",
        "--acquire-relay",
        "off",
        "--no-port-mapping",
    ]);
    p.wait_line("control API");
    p
}

fn free_port() -> String {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().to_string()
}

/// B is killed (its connection is not closed) and comes straight back on
/// the same address: a message A sends then must not wait for A to notice
/// the dead connection (its ack timeout is 30 s): the restarted B's new
/// connection replaces it and the message goes out on that at once.
#[test]
fn a_message_reaches_a_peer_that_was_killed_and_came_straight_back() {
    let [a_dir, b_dir] = [(); 2].map(|_| tempfile::tempdir().unwrap());
    let (a_addr, b_addr) = (free_port(), free_port());
    let a_d = a_dir.path().to_str().unwrap();
    let b_id = ok(&reach(&[
        "id",
        "--data-dir",
        b_dir.path().to_str().unwrap(),
    ]))
    .trim()
    .to_string();
    let a = daemon(a_dir.path(), &a_addr, &b_addr);
    let b = daemon(b_dir.path(), &b_addr, &a_addr);
    ok(&reach(&[
        "send",
        "--durable",
        "critical",
        &b_id,
        "one",
        "--data-dir",
        a_d,
    ]));
    b.wait_for("the first message", |l| l.contains("\"text\":\"one\""));
    drop(b); // SIGKILL
    let b = daemon(b_dir.path(), &b_addr, &a_addr);
    ok(&reach(&[
        "send",
        "--durable",
        "critical",
        &b_id,
        "two",
        "--data-dir",
        a_d,
    ]));
    let got = b.wait_for_or_timeout(Duration::from_secs(5), |l| l.contains("\"text\":\"two\""));
    assert!(got.is_some(), "the message waited for the dead connection");
    drop(a);
}

#[test]
fn durable_messages_survive_random_kills_of_both_nodes() {
    let out = Command::new(REACH)
        .args([
            "chaos",
            "outbox",
            "--json",
            "--messages",
            "300",
            "--kills",
            "10",
            "--seed",
            "16",
            "--rate",
            "40",
            "--moderate-to-nowhere",
            "5",
            "--attempts",
            "2",
            "--deadline",
            "60",
        ])
        .env_remove("REACH_DATA_DIR")
        .output()
        .expect("run reach chaos outbox");
    let r = common::json_line(&out);
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("no {k} in {r}"));
    assert!(out.status.success(), "the command failed its checks: {r}");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(n("sent"), 300, "{r}");
    assert_eq!(n("lost"), 0, "{r}");
    assert_eq!(n("duplicates"), 0, "{r}");
    assert_eq!(n("order_violations"), 0, "{r}");
    // Everything acknowledged arrived; what a kill cut off may have too.
    assert_eq!(
        n("delivered"),
        n("sent") + n("unconfirmed_delivered"),
        "{r}"
    );
    assert!(
        n("kills") >= 10 && n("kills") == n("kills_a") + n("kills_b"),
        "{r}"
    );
    assert!(
        n("kills_a") > 0 && n("kills_b") > 0,
        "both were killed: {r}"
    );
    let m = &r["moderate"];
    assert_eq!(m["seen_at_attempts"], 5, "{r}");
    assert_eq!(m["max_attempts_seen"], 2, "{r}");
    assert_eq!(m["abandoned_logged"], 5, "{r}");
}
