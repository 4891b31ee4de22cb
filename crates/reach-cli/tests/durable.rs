//! `reach send --durable` and `reach outbox` with real `reach node` daemons
//! on loopback: a message to a node that is down, the sender killed with
//! SIGKILL after the commit, both back: the message arrives, once.

use std::path::Path;
use std::time::{Duration, Instant};

mod common;
use common::{DEADLINE, Proc, loopback_config, ok, reach, status};

/// A `reach node` on `dir`, once it serves its control API.
fn node(dir: &Path, cfg: &Path, extra: &[&str]) -> Proc {
    let p = common::node(dir, cfg, extra);
    p.wait_line("control API");
    p
}

fn outbox(dir: &Path) -> Vec<serde_json::Value> {
    let out = ok(&reach(&[
        "outbox",
        "--json",
        "--data-dir",
        dir.to_str().unwrap(),
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["pending"].as_array().cloned().unwrap_or_default()
}

#[test]
fn a_durable_message_survives_the_receiver_down_and_the_sender_killed() {
    let [a_dir, b_dir, cfg_dir] = [(); 3].map(|_| tempfile::tempdir().unwrap());
    let cfg = loopback_config(cfg_dir.path(), "reach.toml", "");
    let (a_d, b_d) = (
        a_dir.path().to_str().unwrap(),
        b_dir.path().to_str().unwrap(),
    );
    let b_id = ok(&reach(&["id", "--data-dir", b_d])).trim().to_string();

    // B is down. A commits a durable message for it.
    let a = node(a_dir.path(), &cfg, &[]);
    let sent = ok(&reach(&[
        "send",
        "--durable",
        "critical",
        &b_id,
        "kept for you",
        "--data-dir",
        a_d,
    ]));
    assert!(sent.contains("committed durable message 1"), "{sent}");
    let pending = outbox(a_dir.path());
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0]["peer"], b_id.as_str());
    let text = ok(&reach(&["outbox", "--data-dir", a_d]));
    assert!(text.contains("critical") && text.contains(&b_id), "{text}");

    // A dies without a chance to flush anything, and starts again.
    drop(a);
    let a = node(a_dir.path(), &cfg, &[]);
    assert_eq!(
        outbox(a_dir.path()).len(),
        1,
        "the message survived kill -9"
    );
    let a_addr = status(a_dir.path())["local_addr"]
        .as_str()
        .unwrap()
        .to_string();

    // B comes up and joins through A: A hears of it and delivers.
    let b = node(b_dir.path(), &cfg, &["--bootstrap", &a_addr]);
    let line = b.wait_line("durable message from");
    assert!(line.ends_with("#1: kept for you"), "{line}");
    let end = Instant::now() + DEADLINE;
    while !outbox(a_dir.path()).is_empty() {
        assert!(Instant::now() < end, "A's outbox did not empty");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        ok(&reach(&["outbox", "--data-dir", a_d])).trim(),
        "outbox empty: every durable message was delivered (or given up)"
    );
    // B printed it, so it is done: a restart of B does not print it again.
    b.terminate();
    let b = node(b_dir.path(), &cfg, &["--bootstrap", &a_addr]);
    let again = b.wait_for_or_timeout(Duration::from_secs(2), |l| {
        l.contains("durable message from")
    });
    assert!(again.is_none(), "handed over twice: {again:?}");
    drop(a);
}

#[test]
fn bad_durable_options_are_refused_before_anything_is_sent() {
    let peer = reach::Keypair::generate().peer_id().to_string();
    let out = reach(&["send", "--attempts", "2", &peer, "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--durable"));
    let out = reach(&["send", "--durable", "sometimes", &peer, "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("critical"));
}
