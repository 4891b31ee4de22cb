//! The local control API: token required, status and send work.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use reach::api::client::{ApiClient, ClientError, raw_request};
use reach::api::{SendRequest, SendResponse, Status};
use reach::{Event, Node};

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
    assert_eq!(status.punch["techniques"], punch["techniques"]);

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
