//! `reach events`: the event log of real `reach node` daemons on loopback,
//! read from the data dir while the node runs (`--follow`) and after it
//! stopped, including a line cut short by a crash.

use std::path::Path;

mod common;
use common::{Proc, loopback_config, node, ok, reach, status};

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
    let cfg = loopback_config(cfg_dir.path(), "reach.toml", "");
    let a = node(a_dir.path(), &cfg, &[]);
    a.wait_for("announcing the control API", |l| l.contains("control API"));
    let a_addr = local_addr(a_dir.path());
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

fn local_addr(dir: &Path) -> String {
    status(dir)["local_addr"].as_str().unwrap().to_string()
}

#[test]
fn events_follow_shows_a_relayed_connection_punched_to_direct() {
    let [r_dir, b_dir, a_dir, cfg_dir] = [(); 4].map(|_| tempfile::tempdir().unwrap());
    // R relays for others; B holds a relay at R; A is on its own (no
    // bootstrap, no DHT): it knows B only by the relay in B's ticket.
    let relay_cfg = loopback_config(cfg_dir.path(), "relay.toml", "relay = \"on\"\n");
    let holder_cfg = loopback_config(cfg_dir.path(), "holder.toml", "acquire_relay = \"on\"\n");
    let plain_cfg = loopback_config(cfg_dir.path(), "plain.toml", "");
    let r = node(r_dir.path(), &relay_cfg, &[]);
    r.wait_for("R's control API", |l| l.contains("control API"));
    let r_addr = local_addr(r_dir.path());
    let b = node(b_dir.path(), &holder_cfg, &["--bootstrap", &r_addr]);
    b.wait_for("B's control API", |l| l.contains("control API"));
    let end = std::time::Instant::now() + common::DEADLINE;
    while status(b_dir.path())["relay"]["held_relay"].is_null() {
        assert!(std::time::Instant::now() < end, "B holds no relay");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let a = node(a_dir.path(), &plain_cfg, &[]);
    a.wait_for("A's control API", |l| l.contains("control API"));
    let follow = Proc::spawn(&[
        "events",
        "--follow",
        "--data-dir",
        a_dir.path().to_str().unwrap(),
    ]);
    follow.wait_for("with A's start", |l| l.contains(" start "));

    // B's ticket, keeping only its relay: the one way a node behind a NAT
    // can be reached before a punch.
    let ticket: reach::Ticket = ok(&reach(&[
        "id",
        "--ticket",
        "--data-dir",
        b_dir.path().to_str().unwrap(),
    ]))
    .trim()
    .parse()
    .expect("B's ticket parses");
    let relayed_only = reach::Ticket::new(
        ticket.peer,
        ticket
            .addrs
            .iter()
            .copied()
            .filter(|a| a.kind == reach_proto::dht::record::AddrKind::Relay)
            .collect(),
    );
    assert!(
        !relayed_only.addrs.is_empty(),
        "B's ticket has its relay: {ticket}"
    );
    let b_id = ticket.peer.to_string();
    ok(&reach(&[
        "connect",
        &relayed_only.to_string(),
        "--data-dir",
        a_dir.path().to_str().unwrap(),
    ]));
    let up = follow.wait_for("with the relayed connection to B", |l| {
        l.contains("connection_up") && l.contains(&b_id)
    });
    assert!(up.contains("path=relayed"), "{up}");
    // The punch's outcome and the path upgrade, in either order.
    let is_punch = |l: &str| l.contains(" punch ") && l.contains(&b_id);
    let is_upgrade =
        |l: &str| l.contains("path_upgraded") && l.contains(&b_id) && l.contains("path=direct");
    let first = follow.wait_for("with the punch to B or the upgrade", |l| {
        is_punch(l) || is_upgrade(l)
    });
    let punch = if is_punch(&first) {
        follow.wait_for("with the path upgraded to direct", is_upgrade);
        first
    } else {
        follow.wait_for("with the punch to B", is_punch)
    };
    assert!(punch.contains("direct=true"), "{punch}");
    drop((a, b, r));
}

#[test]
fn a_line_cut_short_by_a_crash_is_skipped_with_a_warning() {
    let (dir, cfg_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = loopback_config(cfg_dir.path(), "reach.toml", "");
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
