//! The local control API: token required, status and send work.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use reach::api::client::{ApiClient, ClientError, raw_request};
use reach::api::{ApiErrorBody, SendRequest, SendResponse, Status};
use reach::{Event, Node};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DEADLINE: Duration = Duration::from_secs(20);

#[tokio::test]
async fn api_refuses_requests_without_the_token_and_serves_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::builder()
        .bind("127.0.0.1:0".parse().unwrap())
        .data_dir(dir.path())
        .spawn()
        .await
        .unwrap();
    let api = reach::api::serve(node.clone(), dir.path(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();

    // No token, wrong token: refused with 401 and a typed error body.
    let (status, body) = raw_request(api.addr(), None, "GET", "/v1/status", None)
        .await
        .unwrap();
    assert_eq!(status, 401);
    assert!(String::from_utf8_lossy(&body).contains("unauthorized"));
    let (status, _) = raw_request(api.addr(), Some("0000"), "GET", "/v1/status", None)
        .await
        .unwrap();
    assert_eq!(status, 401);
    // Unknown paths are refused before anything else without a token too.
    let (status, _) = raw_request(api.addr(), None, "GET", "/nope", None)
        .await
        .unwrap();
    assert_eq!(status, 401);

    // The token file is private.
    let mode = std::fs::metadata(dir.path().join(reach::api::TOKEN_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let client = ApiClient::from_data_dir(dir.path()).unwrap();
    let status: Status = client.get("/v1/status").await.unwrap();
    assert_eq!(status.peer_id, node.peer_id());
    assert_eq!(status.local_addr, node.local_addr());
    // Hole punching stats: every technique listed, nothing tried yet.
    let punch: serde_json::Value = client.get("/v1/punch").await.unwrap();
    let techniques: Vec<&str> = punch["techniques"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["technique"].as_str().unwrap())
        .collect();
    assert_eq!(
        techniques,
        ["lan_first", "simultaneous_open", "birthday", "stay_relayed"]
    );
    assert_eq!(punch["fallbacks"], 0);
    assert_eq!(
        serde_json::to_value(&status.punch.techniques).unwrap(),
        punch["techniques"]
    );
    // The status carries the counters as the same flat object as /v1/stats,
    // and the relay side as an object.
    let raw: serde_json::Value = client.get("/v1/status").await.unwrap();
    let stats: serde_json::Value = client.get("/v1/stats").await.unwrap();
    let keys =
        |v: &serde_json::Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
    assert_eq!(keys(&raw["stats"]), keys(&stats));
    assert!(stats["messages_sent"].is_u64() && stats["dht_lookups"].is_u64());
    assert!(raw["relay"]["serving"].is_boolean(), "{raw}");

    // Send through the API to another node.
    let other = Node::builder()
        .bind("127.0.0.1:0".parse().unwrap())
        .spawn()
        .await
        .unwrap();
    let resp: SendResponse = client
        .post(
            "/v1/send",
            &SendRequest {
                peer: other.peer_id(),
                addrs: vec![other.local_addr()],
                ticket: None,
                message: "via api".into(),
            },
        )
        .await
        .unwrap();
    assert!(resp.delivered);
    let ev = tokio::time::timeout(DEADLINE, other.next_event())
        .await
        .unwrap()
        .unwrap();
    match ev {
        Event::Message { from, data } => {
            assert_eq!(from, node.peer_id());
            assert_eq!(&data[..], b"via api");
        }
        other => panic!("unexpected {other:?}"),
    }
    let status: Status = client.get("/v1/status").await.unwrap();
    assert_eq!(status.connected_peers.len(), 1);
    assert_eq!(status.connected_peers[0].peer, other.peer_id());
    // Post-quantum by default, and the status says so.
    assert_eq!(status.post_quantum, "prefer");
    assert_eq!(
        status.connected_peers[0].kx_group.as_deref(),
        Some("X25519MLKEM768")
    );

    // Malformed bodies get a typed 400.
    let err = client
        .post::<_, SendResponse>(
            "/v1/send",
            &serde_json::json!({"peer": "nope", "message": "x"}),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Api { status: 400, .. }),
        "{err:?}"
    );

    api.stop().await;
    assert!(!dir.path().join(reach::api::DISCOVERY_FILE).exists());
}

#[tokio::test]
async fn api_refuses_a_non_loopback_listen_address() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::builder()
        .bind("127.0.0.1:0".parse().unwrap())
        .spawn()
        .await
        .unwrap();
    let err = reach::api::serve(node, dir.path(), "0.0.0.0:0".parse().unwrap())
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind(), "config");
}

async fn node_with_api(dir: &std::path::Path) -> (Node, reach::api::ApiServer, String) {
    let node = Node::builder()
        .bind("127.0.0.1:0".parse().unwrap())
        .data_dir(dir)
        .spawn()
        .await
        .unwrap();
    let api = reach::api::serve(node.clone(), dir, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let token = std::fs::read_to_string(dir.join(reach::api::TOKEN_FILE)).unwrap();
    (node, api, token)
}

fn error_kind(body: &[u8]) -> String {
    let e: ApiErrorBody = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not a JSON error ({e}): {}", String::from_utf8_lossy(body)));
    e.error.kind
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_do_not_lock_out_a_real_request_and_are_closed() {
    // This process holds both ends: as `reach node` does, lift the
    // open-files soft limit (often 1024) to the hard one.
    reach::api::raise_fd_limit();
    let dir = tempfile::tempdir().unwrap();
    let (node, api, _) = node_with_api(dir.path()).await;
    const HALF_OPEN: usize = 1100;
    const { assert!(HALF_OPEN > reach::api::MAX_API_CONNECTIONS) };

    // Any local process, no token needed: connect, send part of a request
    // head, never finish it.
    let mut stalled = Vec::with_capacity(HALF_OPEN);
    for _ in 0..HALF_OPEN {
        let mut s = tokio::time::timeout(DEADLINE, TcpStream::connect(api.addr()))
            .await
            .expect("connect in time")
            .expect("connect");
        // The server may already have closed it to make room.
        let _ = s
            .write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthoriza")
            .await;
        stalled.push(s);
    }
    let flooded = Instant::now();

    // The user's request is answered at once, long before any of them
    // timed out.
    let client = ApiClient::from_data_dir(dir.path()).unwrap();
    let status: Status = tokio::time::timeout(DEADLINE, client.get("/v1/status"))
        .await
        .expect("answer in time")
        .unwrap();
    assert_eq!(status.peer_id, node.peer_id());
    assert!(
        flooded.elapsed() < reach::api::HEADER_READ_TIMEOUT,
        "answered after {:?}",
        flooded.elapsed()
    );

    // Every stalled connection is closed by the server: the oldest to make
    // room, the rest once their header time is up.
    let deadline = tokio::time::Instant::from_std(flooded)
        + reach::api::HEADER_READ_TIMEOUT
        + Duration::from_secs(5);
    for (i, mut s) in stalled.into_iter().enumerate() {
        let mut sink = Vec::new();
        let closed = tokio::time::timeout_at(deadline, s.read_to_end(&mut sink)).await;
        assert!(closed.is_ok(), "stalled connection {i} still open");
    }
    // And the API still serves.
    let _: Status = client.get("/v1/status").await.unwrap();
    api.stop().await;
}

#[tokio::test]
async fn every_refusal_is_a_json_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, api, token) = node_with_api(dir.path()).await;
    let bearer = token.trim();
    let token = Some(bearer);

    // A body over the limit: 413 with a typed body, not plain text.
    let big = serde_json::to_vec(&serde_json::json!({
        "peer": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "message": "x".repeat(reach::api::MAX_REQUEST_BODY + 1),
    }))
    .unwrap();
    let (status, body) = raw_request(api.addr(), token, "POST", "/v1/send", Some(big))
        .await
        .unwrap();
    assert_eq!(status, 413);
    assert_eq!(error_kind(&body), "request_too_large");

    // No such endpoint, wrong method.
    let (status, body) = raw_request(api.addr(), token, "GET", "/nope", None)
        .await
        .unwrap();
    assert_eq!((status, error_kind(&body).as_str()), (404, "not_found"));
    let (status, body) = raw_request(api.addr(), token, "GET", "/v1/send", None)
        .await
        .unwrap();
    assert_eq!(
        (status, error_kind(&body).as_str()),
        (405, "method_not_allowed")
    );

    // A body that stops coming: 408 once the body time is up.
    let mut s = TcpStream::connect(api.addr()).await.unwrap();
    let head = format!(
        "POST /v1/send HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 100\r\n\r\n{{\"peer\"",
        bearer
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut resp = Vec::new();
    tokio::time::timeout(
        reach::api::BODY_READ_TIMEOUT + DEADLINE,
        s.read_to_end(&mut resp),
    )
    .await
    .expect("an answer")
    .unwrap();
    assert!(started.elapsed() >= reach::api::BODY_READ_TIMEOUT);
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    let body = &resp[resp.find("\r\n\r\n").unwrap() + 4..];
    assert_eq!(error_kind(body.as_bytes()), "timeout");
    api.stop().await;
}

/// Sends `request` as raw bytes and returns the status and the JSON
/// error kind of the answer.
async fn raw_refusal(api: &reach::api::ApiServer, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(api.addr()).await.unwrap();
    // The server may answer and stop reading before all of it is written.
    let _ = s.write_all(request).await;
    let mut resp = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut resp))
        .await
        .expect("an answer in time")
        .expect("an answer, not a reset");
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let status = resp
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {resp:?}"));
    let head_end = resp.find("\r\n\r\n").expect("a whole head") + 4;
    assert!(
        resp[..head_end]
            .to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{resp}"
    );
    (status, error_kind(&resp.as_bytes()[head_end..]))
}

#[tokio::test]
async fn malformed_and_oversized_request_heads_get_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (node, api, _) = node_with_api(dir.path()).await;

    // A request line that is not HTTP.
    let (status, kind) = raw_refusal(&api, b"NOT AN HTTP REQUEST\r\n\r\n").await;
    assert_eq!((status, kind.as_str()), (400, "bad_request"));
    let (status, kind) = raw_refusal(&api, b"\x16\x03\x01\x02\x00garbage\r\n\r\n").await;
    assert_eq!((status, kind.as_str()), (400, "bad_request"));

    // A header far over the head limit.
    let big = format!(
        "GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(4 * reach::api::MAX_REQUEST_HEAD)
    );
    let (status, kind) = raw_refusal(&api, big.as_bytes()).await;
    assert_eq!((status, kind.as_str()), (431, "headers_too_large"));

    // The API still serves after them.
    let client = ApiClient::from_data_dir(dir.path()).unwrap();
    let status: Status = client.get("/v1/status").await.unwrap();
    assert_eq!(status.peer_id, node.peer_id());
    api.stop().await;
}

#[tokio::test]
async fn a_stopping_api_server_leaves_a_newer_servers_discovery_file() {
    let dir = tempfile::tempdir().unwrap();
    let discovery = dir.path().join(reach::api::DISCOVERY_FILE);
    let (_old_node, old_api, _) = node_with_api(dir.path()).await;
    // A second node's server on the same data dir (library use: the
    // data-dir lock is the daemon's) replaces the discovery file.
    let new_node = Node::builder()
        .bind("127.0.0.1:0".parse().unwrap())
        .spawn()
        .await
        .unwrap();
    let new_api = reach::api::serve(new_node.clone(), dir.path(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();

    // The old one stops late: the new one's file stays and clients reach it.
    old_api.stop().await;
    assert!(
        discovery.exists(),
        "the newer server's api.json was removed"
    );
    let client = ApiClient::from_data_dir(dir.path()).unwrap();
    let status: Status = client.get("/v1/status").await.unwrap();
    assert_eq!(status.peer_id, new_node.peer_id());

    // The new one removes its own file when it stops.
    new_api.stop().await;
    assert!(!discovery.exists(), "a stopped server left its api.json");
}
