//! `GET /v1/recv`: the backlog, `since`, and a reader slower than the node;
//! the caps on the API's event streams.

use std::time::Duration;

use bytes::Bytes;
use reach::api::recv::{RECV_BACKLOG_EVENTS, RecvEvent};
use reach::{Event, Node};

const DEADLINE: Duration = Duration::from_secs(60);

async fn node_and_api() -> (tempfile::TempDir, Node, reach::api::ApiServer) {
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
    (dir, node, api)
}

fn message(from: reach::PeerId, n: usize, fill: u8) -> Event {
    Event::Message {
        from,
        data: Bytes::from(vec![fill; n]),
    }
}

async fn next(events: &mut reach::api::client::EventStream) -> RecvEvent {
    let data = tokio::time::timeout(DEADLINE, events.next())
        .await
        .expect("an event within the deadline")
        .unwrap()
        .expect("the stream stays open");
    serde_json::from_str::<RecvEvent>(&data).unwrap()
}

fn seq(e: &RecvEvent) -> u64 {
    match e {
        RecvEvent::Message { seq, .. }
        | RecvEvent::Connected { seq, .. }
        | RecvEvent::Disconnected { seq, .. }
        | RecvEvent::PathChanged { seq, .. } => *seq,
        RecvEvent::Missed { .. } => 0,
    }
}

/// Opens streams of `path` until one gets in, calling `poke` before each
/// try: a closed stream's place is freed once the server notices the close,
/// at its next write to it, which `poke` causes.
async fn until_a_place_is_freed<F, Fut>(
    client: &reach::api::client::ApiClient,
    path: &str,
    mut poke: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        poke().await;
        if client.open_events(path).await.is_ok() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place was never freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn since_replays_the_backlog_and_says_what_fell_out_of_it() {
    let (dir, node, api) = node_and_api().await;
    let hub = api.recv_hub();
    let from = node.peer_id();
    let total = RECV_BACKLOG_EVENTS as u64 + 6;
    for i in 0..total {
        hub.publish(&message(from, 3, i as u8));
    }
    let client = reach::api::client::ApiClient::from_data_dir(dir.path()).unwrap();
    let mut events = client.open_events("/v1/recv?since=0").await.unwrap();
    // The six oldest fell out of the backlog: told first, then the rest.
    assert_eq!(next(&mut events).await, RecvEvent::Missed { count: 6 });
    for want in 7..=total {
        let e = next(&mut events).await;
        assert_eq!(seq(&e), want);
        let RecvEvent::Message {
            from: f,
            data_b64,
            len,
            ..
        } = e
        else {
            panic!("a message expected");
        };
        assert_eq!((f, len), (from.to_string(), 3));
        let data = reach::api::recv::base64_decode(&data_b64).unwrap();
        assert_eq!(data, vec![(want - 1) as u8; 3]);
    }
    // Live: what is published now arrives on the open stream.
    hub.publish(&message(from, 1, 42));
    assert_eq!(seq(&next(&mut events).await), total + 1);
    // Without since, a stream starts at the next event.
    let mut fresh = client.open_events("/v1/recv").await.unwrap();
    hub.publish(&message(from, 1, 43));
    assert_eq!(seq(&next(&mut fresh).await), total + 2);
    // A bad since is a JSON error.
    match client.open_events("/v1/recv?since=x").await {
        Err(reach::api::client::ClientError::Api { status, kind, .. }) => {
            assert_eq!((status, kind.as_str()), (400, "bad_request"));
        }
        other => panic!("expected bad_request, got {:?}", other.err()),
    }
    api.stop().await;
    node.shutdown().await;
}

#[tokio::test]
async fn a_reader_that_does_not_read_loses_the_oldest_and_is_told_how_many() {
    let (dir, node, api) = node_and_api().await;
    let hub = api.recv_hub();
    let from = node.peer_id();
    let client = reach::api::client::ApiClient::from_data_dir(dir.path()).unwrap();
    let mut events = client.open_events("/v1/recv").await.unwrap();
    // 96 MiB published while the reader reads nothing: the node does not
    // wait for it (publish returns at once; the backlog keeps ~85 MiB of
    // base64, three of these).
    let total = 6u64;
    for _ in 0..total {
        hub.publish(&message(from, reach::MAX_MESSAGE_LEN, 7));
    }
    let mut seqs = Vec::new();
    let mut missed = 0;
    while seqs.last() != Some(&total) {
        match next(&mut events).await {
            RecvEvent::Missed { count } => missed += count,
            e => seqs.push(seq(&e)),
        }
    }
    assert!(missed > 0, "a reader that read nothing missed nothing");
    assert_eq!(
        seqs.len() as u64 + missed,
        total,
        "every event is either read or counted as missed"
    );
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order");
    api.stop().await;
    node.shutdown().await;
}

#[tokio::test]
async fn streams_past_the_cap_are_refused_busy_until_one_closes() {
    let (dir, node, api) = node_and_api().await;
    let hub = api.recv_hub();
    let client = reach::api::client::ApiClient::from_data_dir(dir.path()).unwrap();
    let mut open = Vec::new();
    for _ in 0..reach::api::recv::MAX_RECV_CLIENTS {
        open.push(client.open_events("/v1/recv").await.unwrap());
    }
    match client.open_events("/v1/recv").await {
        Err(reach::api::client::ClientError::Api { status, kind, .. }) => {
            assert_eq!((status, kind.as_str()), (503, "busy"));
        }
        other => panic!("expected busy, got {:?}", other.err()),
    }
    // Other requests are still served.
    let _: serde_json::Value = client.get("/v1/peers").await.unwrap();
    // A closed stream's place is freed once the server notices the close,
    // at its next write: events are published until a new stream gets in.
    drop(open.pop());
    until_a_place_is_freed(&client, "/v1/recv", || {
        hub.publish(&message(node.peer_id(), 1, 0));
        async {}
    })
    .await;
    api.stop().await;
    node.shutdown().await;
}

#[tokio::test]
async fn topic_streams_past_their_cap_are_refused_busy_and_leave_recv_streams_alone() {
    let (dir, node, api) = node_and_api().await;
    let client = reach::api::client::ApiClient::from_data_dir(dir.path()).unwrap();
    let mut open = Vec::new();
    for i in 0..reach::api::topics::MAX_TOPIC_STREAMS {
        let path = format!("/v1/topics/sub?topic=room{}", i % 3);
        open.push(client.open_events(&path).await.unwrap());
    }
    match client.open_events("/v1/topics/sub?topic=another").await {
        Err(reach::api::client::ClientError::Api { status, kind, .. }) => {
            assert_eq!((status, kind.as_str()), (503, "busy"));
        }
        other => panic!("expected busy, got {:?}", other.err()),
    }
    // Their own cap: a /v1/recv stream and plain requests still get in.
    let _recv = client.open_events("/v1/recv").await.unwrap();
    let _: serde_json::Value = client.get("/v1/peers").await.unwrap();
    // A closed stream's place is freed once the server notices the close,
    // at its next write (a topic event or the SSE keep-alive): a publish on
    // its topic is such a write.
    drop(open.remove(0));
    until_a_place_is_freed(&client, "/v1/topics/sub?topic=another", || async {
        let _ = node.publish("room0", b"wake".to_vec()).await;
    })
    .await;
    api.stop().await;
    node.shutdown().await;
}
