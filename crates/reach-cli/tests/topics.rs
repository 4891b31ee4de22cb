//! `reach sub`, `reach pub`, `reach members` with a real `reach node`
//! daemon on loopback (its own topic home).

use std::path::Path;

mod common;
use common::{Proc, loopback_config, ok, reach};

/// A `reach node` on `dir`, once it serves its control API.
fn node(dir: &Path, cfg: &Path) -> Proc {
    let p = common::node(dir, cfg, &[]);
    p.wait_line("control API");
    p
}

#[test]
fn pub_reaches_sub_once_in_order_and_members_lists_the_node() {
    let [dir, cfg_dir, files] = [(); 3].map(|_| tempfile::tempdir().unwrap());
    let cfg = loopback_config(cfg_dir.path(), "reach.toml", "");
    let d = dir.path().to_str().unwrap();
    let _node = node(dir.path(), &cfg);
    let id = ok(&reach(&["id", "--data-dir", d])).trim().to_string();

    let sub = Proc::spawn(&["sub", "my room", "--json", "--count", "2", "--data-dir", d]);
    // The node's own membership shows up first: the subscription is live.
    sub.wait_for("the node joining", |l| {
        l.contains("\"joined\"") && l.contains(&id)
    });
    let status = ok(&reach(&["status", "--data-dir", d]));
    assert!(
        status.contains("topics    1 subscribed, 1 served as a home"),
        "{status}"
    );
    let members = ok(&reach(&["members", "my room", "--json", "--data-dir", d]));
    let v: serde_json::Value = serde_json::from_str(&members).unwrap();
    assert_eq!(v["members"][0]["member"], id.as_str(), "{members}");

    let out = ok(&reach(&["pub", "my room", "hello room", "--data-dir", d]));
    assert!(out.contains("as message 1"), "{out}");
    let file = files.path().join("payload.bin");
    std::fs::write(&file, [0u8, 159, 146, 150]).unwrap();
    let out = ok(&reach(&[
        "pub",
        "my room",
        "--file",
        file.to_str().unwrap(),
        "--json",
        "--data-dir",
        d,
    ]));
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["id"], 2, "{out}");
    assert_eq!(report["home"], id.as_str());

    let first = sub.wait_for("message 1", |l| l.contains("\"message\""));
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(
        (first["id"].as_u64(), first["from"].as_str()),
        (Some(1), Some(id.as_str()))
    );
    assert_eq!(first["data_b64"], "aGVsbG8gcm9vbQ==");
    let second = sub.wait_for("message 2", |l| l.contains("\"message\""));
    let second: serde_json::Value = serde_json::from_str(&second).unwrap();
    assert_eq!(second["id"], 2);
    assert_eq!(second["len"], 4);

    // Over a topic message's limit: refused before anything is sent.
    let big = files.path().join("big.bin");
    std::fs::write(&big, vec![1u8; 64 * 1024 + 1]).unwrap();
    let out = reach(&[
        "pub",
        "my room",
        "--file",
        big.to_str().unwrap(),
        "--data-dir",
        d,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("limit"));
}
