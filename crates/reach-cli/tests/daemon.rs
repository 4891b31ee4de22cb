//! The daemon as other programs use it: `reach recv` (the `/v1/recv`
//! event stream), binary `reach send --file` / stdin, `reach peers`,
//! `reach ping`, `reach connect`, version and uptime in `reach status`.
//! Real `reach node` processes on loopback.

use std::io::Write;
use std::process::{Command, Stdio};

mod common;
use common::{Proc, REACH, ok, reach};

/// A `reach node` on loopback with its data dir, peer id and address.
struct Node {
    proc: Proc,
    dir: tempfile::TempDir,
    id: String,
    addr: String,
}

impl Node {
    fn start() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap().to_string();
        let proc = Proc::spawn(&[
            "node",
            "--data-dir",
            &d,
            "--listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
            "--no-port-mapping",
        ]);
        proc.wait_for("control API", |l| l.contains("control API"));
        let status: serde_json::Value =
            serde_json::from_str(&ok(&reach(&["status", "--json", "--data-dir", &d]))).unwrap();
        Node {
            proc,
            id: status["peer_id"].as_str().unwrap().to_string(),
            addr: status["local_addr"].as_str().unwrap().to_string(),
            dir,
        }
    }

    fn dir(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }
}

/// `n` bytes covering every byte value, in no simple pattern.
fn binary(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The bytes of a `recv --json` message line.
fn message_bytes(line: &str) -> (String, Vec<u8>) {
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["kind"], "message", "{line}");
    let data = reach::api::recv::base64_decode(v["data_b64"].as_str().unwrap()).unwrap();
    assert_eq!(v["len"].as_u64(), Some(data.len() as u64));
    (v["from"].as_str().unwrap().to_string(), data)
}

#[test]
fn recv_follow_gets_text_and_ten_mib_binary_from_file_and_stdin_intact() {
    let a = Node::start();
    let b = Node::start();
    // From the start of B's backlog: nothing sent before it connected is lost.
    let follow = Proc::spawn(&[
        "recv",
        "--follow",
        "--json",
        "--since",
        "0",
        "--data-dir",
        b.dir(),
    ]);

    ok(&reach(&[
        "send",
        &b.id,
        "hello\ndaemon",
        "--addr",
        &b.addr,
        "--data-dir",
        a.dir(),
    ]));
    let connected = follow.wait_for("a connected event", |l| l.contains("\"connected\""));
    assert!(connected.contains(&a.id), "{connected}");
    let (from, data) = message_bytes(&follow.wait_for("a message", |l| l.contains("\"message\"")));
    assert_eq!(
        (from.as_str(), data.as_slice()),
        (a.id.as_str(), &b"hello\ndaemon"[..])
    );

    // 10 MiB of binary from a file.
    let big = binary(10 * 1024 * 1024, 7);
    let file = a.dir.path().join("big.bin");
    std::fs::write(&file, &big).unwrap();
    let sent = ok(&reach(&[
        "send",
        &b.id,
        "--file",
        file.to_str().unwrap(),
        "--data-dir",
        a.dir(),
    ]));
    assert!(
        sent.contains(&format!("delivered {} bytes", big.len())),
        "{sent}"
    );
    let (_, got) = message_bytes(&follow.wait_for("the file", |l| l.contains("\"message\"")));
    assert!(got == big, "the file arrived changed ({} bytes)", got.len());

    // 10 MiB of other binary from stdin.
    let other = binary(10 * 1024 * 1024, 99);
    let mut child = Command::new(REACH)
        .args(["send", &b.id, "-", "--data-dir", a.dir()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&other).unwrap();
    ok(&child.wait_with_output().unwrap());
    let (_, got) = message_bytes(&follow.wait_for("stdin's", |l| l.contains("\"message\"")));
    assert!(
        got == other,
        "stdin's message arrived changed ({} bytes)",
        got.len()
    );

    // Without --follow: the first message of the backlog, as escaped text.
    let first = ok(&reach(&["recv", "--since", "0", "--data-dir", b.dir()]));
    assert_eq!(first, format!("message from {}: hello\\ndaemon\n", a.id));

    // Over the message limit: refused before sending, naming the limit.
    let huge = a.dir.path().join("huge.bin");
    std::fs::write(&huge, vec![0u8; reach::MAX_MESSAGE_LEN + 1]).unwrap();
    let out = reach(&[
        "send",
        &b.id,
        "--file",
        huge.to_str().unwrap(),
        "--data-dir",
        a.dir(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("limit"));
    drop(follow);
    drop(b.proc);
}

#[test]
fn the_api_takes_a_message_of_the_limit_and_refuses_more_with_json() {
    let a = Node::start();
    let b = Node::start();
    ok(&reach(&[
        "connect",
        &b.id,
        "--addr",
        &b.addr,
        "--data-dir",
        a.dir(),
    ]));
    let disc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.dir.path().join("api.json")).unwrap()).unwrap();
    let addr = disc["addr"].as_str().unwrap().parse().unwrap();
    let token = std::fs::read_to_string(a.dir.path().join("api-token")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let post = |len: usize| {
        rt.block_on(reach::api::client::raw_request_typed(
            addr,
            Some(token.trim()),
            "POST",
            &format!("/v1/send?peer={}", b.id),
            "application/octet-stream",
            vec![b'x'; len],
        ))
        .unwrap()
    };
    let (status, body) = post(reach::MAX_MESSAGE_LEN);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let (status, body) = post(reach::MAX_MESSAGE_LEN + 1);
    assert_eq!(status, 413);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["kind"], "message_too_large", "{v}");
    let (status, body) = post(reach::api::MAX_REQUEST_BODY + 1);
    assert_eq!(status, 413);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["kind"], "request_too_large", "{v}");
    // The stream needs the token too.
    let (status, _) = rt
        .block_on(reach::api::client::raw_request(
            addr, None, "GET", "/v1/recv", None,
        ))
        .unwrap();
    assert_eq!(status, 401);
}

#[test]
fn peers_ping_and_status_show_the_peer_rtts_version_and_uptime() {
    let a = Node::start();
    let b = Node::start();
    ok(&reach(&[
        "connect",
        &b.id,
        "--addr",
        &b.addr,
        "--data-dir",
        a.dir(),
    ]));

    let peers: serde_json::Value =
        serde_json::from_str(&ok(&reach(&["peers", "--json", "--data-dir", a.dir()]))).unwrap();
    let list = peers["peers"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{peers}");
    assert_eq!(list[0]["peer"], b.id.as_str());
    assert_eq!(list[0]["addr"], b.addr.as_str());
    assert_eq!(list[0]["path"], "direct");
    let text = ok(&reach(&["peers", "--data-dir", a.dir()]));
    assert!(text.contains(&b.id) && text.contains("direct"), "{text}");

    let pinged = ok(&reach(&[
        "ping",
        &b.id,
        "--count",
        "3",
        "--data-dir",
        a.dir(),
    ]));
    let replies: Vec<&str> = pinged
        .lines()
        .filter(|l| l.starts_with("reply from"))
        .collect();
    assert_eq!(replies.len(), 3, "{pinged}");
    for r in &replies {
        assert!(r.contains(" ms") && r.contains("path=direct"), "{r}");
    }
    // A peer no one knows: a typed error, not a hang.
    let other_dir = tempfile::tempdir().unwrap();
    let stranger_id = ok(&reach(&[
        "id",
        "--data-dir",
        other_dir.path().to_str().unwrap(),
    ]));
    let stranger = reach(&["ping", stranger_id.trim(), "--data-dir", a.dir()]);
    assert!(!stranger.status.success());
    assert!(String::from_utf8_lossy(&stranger.stderr).starts_with("error: "));
    // A stopped peer cannot be pinged either.
    drop(b.proc);

    let status: serde_json::Value =
        serde_json::from_str(&ok(&reach(&["status", "--json", "--data-dir", a.dir()]))).unwrap();
    assert_eq!(status["build"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(status["build"]["uptime_s"].is_u64(), "{status}");
    let profile = status["build"]["profile"].as_str().unwrap();
    assert!(profile == "debug" || profile == "release");
    let text = ok(&reach(&["status", "--data-dir", a.dir()]));
    assert!(
        text.contains(&format!("version   {}", env!("CARGO_PKG_VERSION"))) && text.contains("up "),
        "{text}"
    );
    let out = reach(&["ping", &b.id, "--data-dir", a.dir()]);
    assert!(!out.status.success());
}
