//! `reach events`: the event log of real `reach node` daemons on loopback,
//! read from the data dir while the node runs (`--follow`) and after it
//! stopped, including a line cut short by a crash.

use std::path::Path;

mod common;
use common::{Proc, reach};

/// A `reach node` child on `dir` with config `cfg` and `extra` flags.
fn node(dir: &Path, cfg: &Path, extra: &[&str]) -> Proc {
    let mut args = vec![
        "node",
        "--data-dir",
        dir.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Proc::spawn(&args)
}

fn loopback_config(dir: &Path) -> std::path::PathBuf {
    let cfg = dir.join("reach.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:0\"\napi_listen = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    cfg
}

fn peer_id(dir: &Path) -> String {
    let out = reach(&["id", "--data-dir", dir.to_str().unwrap()]);
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn events_follow_shows_a_connection_made_after_it_started() {
    let (a_dir, b_dir, cfg_dir) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let cfg = loopback_config(cfg_dir.path());
    let a = node(a_dir.path(), &cfg, &[]);
    a.wait_for("announcing the control API", |l| l.contains("control API"));
    let a_addr = {
        let out = reach(&[
            "status",
            "--json",
            "--data-dir",
            a_dir.path().to_str().unwrap(),
        ]);
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        s["local_addr"].as_str().unwrap().to_string()
    };
    let follow = Proc::spawn(&[
        "events",
        "--follow",
        "--data-dir",
        a_dir.path().to_str().unwrap(),
    ]);
    follow.wait_for("with the node's start", |l| l.contains(" start "));

    // B starts after the follower and joins through A: A logs B's
    // connection, and the follower prints it.
    let b_id = peer_id(b_dir.path());
    let b = node(b_dir.path(), &cfg, &["--bootstrap", &a_addr]);
    let line = follow.wait_for("with B's connection", |l| {
        l.contains("connection_up") && l.contains(&b_id)
    });
    assert!(
        line.contains("direction=inbound") && line.contains("path=direct"),
        "{line}"
    );
    b.terminate();
    follow.wait_for("with B's disconnection", |l| {
        l.contains("connection_down") && l.contains(&b_id)
    });
    a.terminate();
    follow.wait_for("with the node's stop", |l| l.contains(" stop"));
}

#[test]
fn a_line_cut_short_by_a_crash_is_skipped_with_a_warning() {
    let (dir, cfg_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = loopback_config(cfg_dir.path());
    let a = node(dir.path(), &cfg, &[]);
    a.wait_for("announcing the control API", |l| l.contains("control API"));
    a.terminate();
    let log = dir.path().join("events.jsonl");
    let good = std::fs::read_to_string(&log).unwrap();
    let good_lines: Vec<&str> = good.lines().collect();
    assert!(good_lines.len() >= 2, "{good}");
    // A crash cut a line short; the next run went on after it.
    let cut = "{\"v\":1,\"ts\":\"2026-11-26T21:3";
    std::fs::write(
        &log,
        format!("{}\n{cut}\n{}\n", good_lines[0], good_lines[1..].join("\n")),
    )
    .unwrap();

    let d = dir.path().to_str().unwrap();
    let json = reach(&["events", "--json", "--data-dir", d]);
    assert!(json.status.success());
    assert_eq!(
        String::from_utf8(json.stdout).unwrap(),
        good,
        "the good lines, as they are"
    );
    let err = String::from_utf8(json.stderr).unwrap();
    assert!(
        err.contains("warning") && err.contains("events.jsonl:2"),
        "{err}"
    );

    let text = reach(&["events", "--data-dir", d]);
    assert!(text.status.success());
    let out = String::from_utf8(text.stdout).unwrap();
    assert_eq!(out.lines().count(), good_lines.len(), "{out}");
    assert!(out.lines().next().unwrap().contains(" start "), "{out}");
    assert!(out.lines().last().unwrap().contains(" stop"), "{out}");

    // A last line without its newline (the crash was the end) is skipped too.
    std::fs::write(&log, format!("{good}{cut}")).unwrap();
    let json = reach(&["events", "--json", "--data-dir", d]);
    assert!(json.status.success());
    assert_eq!(String::from_utf8(json.stdout).unwrap(), good);
    assert!(String::from_utf8(json.stderr).unwrap().contains("warning"));
}

/// One log line as the node writes it, numbered.
fn numbered(n: u32) -> String {
    format!("{{\"v\":1,\"ts\":\"2026-11-26T21:30:05.123Z\",\"kind\":\"relay_lost\",\"n\":{n}}}\n")
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

#[test]
fn events_follow_goes_on_through_a_rotation_without_losing_a_line() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("events.jsonl");
    append(&log, &numbered(1));
    let follow = Proc::spawn(&[
        "events",
        "--follow",
        "--json",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    follow.wait_for("1", |l| l == numbered(1).trim_end());
    // As the node rotates: a last line into the old file, the rename, the
    // next lines into a new file (the follower may be mid-sleep throughout).
    append(&log, &numbered(2));
    std::fs::rename(&log, dir.path().join("events.1.jsonl")).unwrap();
    append(&log, &numbered(3));
    append(&log, &numbered(4));
    let mut got = Vec::new();
    for n in 2..=4 {
        got.push(follow.wait_for(&n.to_string(), |l| l.contains("\"n\":")));
    }
    let want: Vec<String> = (2..=4)
        .map(|n| numbered(n).trim_end().to_string())
        .collect();
    assert_eq!(got, want);
}
