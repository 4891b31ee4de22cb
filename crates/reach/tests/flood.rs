//! Floods from one host against a real node on loopback: connection limits,
//! silent connections, the peer table's bound, and the DHT store's fairness.
//! Distinct loopback addresses (127.0.0.1, 127.0.0.2, 127.0.1.1) stand for
//! distinct hosts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use reach::{ConnectionLimits, Event, Keypair, Node, PeerId};
use reach_proto::dht::Key;
use reach_proto::dht::record::{RecordKind, SignedRecord};
use reach_proto::dht::rpc::{DhtRequest, DhtRequestMsg, DhtResponse};
use reach_proto::wire::envelope::{Body, Envelope, MAX_CONTROL_ENVELOPE_LEN};

/// Every wait is bounded by this.
const DEADLINE: Duration = Duration::from_secs(120);

fn at(ip: &str) -> SocketAddr {
    format!("{ip}:0").parse().unwrap()
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {DEADLINE:?}"))
}

/// Polls `cond` until it holds, up to [`DEADLINE`].
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// A raw QUIC dial to `node` as identity `kp` from `ep`.
async fn raw_dial(
    ep: &quinn::Endpoint,
    node: &Node,
    kp: &Keypair,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let (tls, _) = reach::tls::client_config(kp, node.peer_id()).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let cfg = quinn::ClientConfig::new(Arc::new(crypto));
    ep.connect_with(cfg, node.local_addr(), reach::tls::SERVER_NAME)
        .unwrap()
        .await
}

fn is_refused(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::ConnectionClosed(c)
        if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED)
}

/// One DHT request on a new stream; the decoded answer.
async fn rpc(conn: &quinn::Connection, request: DhtRequest) -> Option<DhtResponse> {
    let frame = Envelope::new(Body::DhtRequest(DhtRequestMsg {
        server_mode: false,
        request,
    }))
    .to_frame()
    .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.ok()?;
    send.write_all(&frame).await.ok()?;
    let _ = send.finish();
    let answer = tokio::time::timeout(DEADLINE, recv.read_to_end(1 << 20))
        .await
        .ok()?
        .ok()?;
    match Envelope::from_frame(&answer, MAX_CONTROL_ENVELOPE_LEN)
        .ok()?
        .body
    {
        Body::DhtResponse(r) => Some(r.response),
        _ => None,
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn next_message(node: &Node) -> (PeerId, Vec<u8>) {
    loop {
        match within("a message", node.next_event()).await {
            Some(Event::Message { from, data }) => return (from, data.to_vec()),
            Some(_) => continue,
            None => panic!("node shut down"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_host_is_refused_silent_connections_close_and_peers_are_evicted() {
    let limits = ConnectionLimits {
        max_per_ip: 4,
        silent_timeout: Duration::from_secs(1),
        max_idle_peers: 50,
        limit_loopback: true,
        ..ConnectionLimits::default()
    };
    let target = Node::builder()
        .bind(at("127.0.0.1"))
        .connection_limits(limits)
        .spawn()
        .await
        .unwrap();
    let honest = Node::builder().bind(at("127.0.1.1")).spawn().await.unwrap();
    within(
        "honest connect",
        honest.connect(target.peer_id(), [target.local_addr()]),
    )
    .await
    .unwrap();

    // 40 fresh identities from one IP at once: the per-IP limit admits 4.
    let ep = quinn::Endpoint::client(at("127.0.0.1")).unwrap();
    let dials = (0..40).map(|_| {
        let (ep, target) = (ep.clone(), target.clone());
        async move { raw_dial(&ep, &target, &Keypair::generate()).await }
    });
    let results = within("flood", futures::future::join_all(dials)).await;
    let held: Vec<quinn::Connection> = results.iter().filter_map(|r| r.clone().ok()).collect();
    let refused = results
        .iter()
        .filter(|r| r.as_ref().is_err_and(is_refused))
        .count();
    assert_eq!(held.len(), 4, "the per-IP limit admits exactly 4");
    assert_eq!(refused, 36, "the rest are refused before any handshake");
    assert_eq!(target.stats().core.inbound_refused, 36);

    // Another host still connects and delivers under the flood.
    within(
        "honest send",
        honest.send(target.peer_id(), b"still here".to_vec()),
    )
    .await
    .unwrap();
    assert_eq!(
        next_message(&target).await,
        (honest.peer_id(), b"still here".to_vec())
    );

    // The flood's connections carry nothing and crowd their IP: closed
    // after the silent timeout while they hold at least half its limit
    // (the last one below half may stay), which gives their slots back.
    until("silent closes", || {
        held.iter().filter(|c| c.close_reason().is_some()).count() >= 3
    })
    .await;
    for c in held.iter().filter(|c| c.close_reason().is_some()) {
        let reason = c.close_reason().unwrap();
        assert!(
            matches!(&reason, quinn::ConnectionError::ApplicationClosed(a) if a.error_code == 4u32.into()),
            "{reason:?}"
        );
    }
    assert!(target.stats().core.silent_connections_closed >= 3);
    until("slots given back", || {
        target.stats().core.inbound_connections <= 2
    })
    .await;
    let again = within("dial after", raw_dial(&ep, &target, &Keypair::generate())).await;
    assert!(again.is_ok(), "{again:?}");
    drop(again);
    drop(held);

    // 200 identities connect and close: the peer table stays bounded.
    for _ in 0..200 {
        if let Ok(c) = raw_dial(&ep, &target, &Keypair::generate()).await {
            c.close(0u32.into(), b"bye");
            let _ = c.closed().await;
        }
    }
    let s = target.stats();
    assert!(s.core.peer_table_size <= 50 + 50 / 8 + 4, "{s:?}");
    assert!(s.core.peers_evicted >= 140, "{s:?}");
    // The honest peer, connected all along, was never forgotten.
    within(
        "honest send",
        honest.send(target.peer_id(), b"after".to_vec()),
    )
    .await
    .unwrap();
    assert_eq!(
        next_message(&target).await,
        (honest.peer_id(), b"after".to_vec())
    );
    ep.close(0u32.into(), b"done");
    honest.shutdown().await;
    target.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_records_from_one_ip_leave_room_for_an_honest_record_from_another() {
    use reach_proto::dht::store::{MAX_PER_SOURCE, MAX_PER_SOURCE_PER_KEY};
    let target = Node::builder().bind(at("127.0.0.1")).spawn().await.unwrap();
    within("target join", target.joined()).await;

    // 1,000 throwaway identities, 10 valid records each, all over one
    // connection from 127.0.0.1: 2 into a victim's mailbox, 8 topics.
    let victim = Key::for_peer(&Keypair::generate().peer_id());
    let ep = quinn::Endpoint::client(at("127.0.0.1")).unwrap();
    let conn = within("dial", raw_dial(&ep, &target, &Keypair::generate()))
        .await
        .unwrap();
    let now = now_ms();
    let hour = Duration::from_secs(3600);
    let mut records = Vec::new();
    for i in 0..1000 {
        let kp = Keypair::generate();
        for j in 0..10u64 {
            records.push(if j < 2 {
                SignedRecord::sign(&kp, RecordKind::Mailbox, victim, j + 1, now, hour, vec![1])
            } else {
                SignedRecord::topic(&kp, &format!("junk-{i}-{j}"), 1, now, hour)
            });
        }
    }
    use futures::StreamExt;
    let answers: Vec<Option<DhtResponse>> = within(
        "flood of puts",
        futures::stream::iter(records)
            .map(|record| rpc(&conn, DhtRequest::PutRecord { record }))
            .buffer_unordered(64)
            .collect(),
    )
    .await;
    let stored = answers
        .iter()
        .filter(|a| **a == Some(DhtResponse::Stored))
        .count();
    let share_refusals = answers
        .iter()
        .filter(|a| {
            **a == Some(DhtResponse::Refused {
                reason: "source_quota_exceeded".into(),
            })
        })
        .count();
    assert_eq!(stored, MAX_PER_SOURCE, "one IP gets exactly its share");
    assert_eq!(share_refusals, 10_000 - MAX_PER_SOURCE);

    // An honest node at another address joins through the target: its
    // endpoint record is accepted there.
    let honest = Node::builder()
        .bind(at("127.0.0.2"))
        .bootstrap([target.local_addr()])
        .spawn()
        .await
        .unwrap();
    within("honest join", honest.joined()).await;
    let honest_key = Key::for_peer(&honest.peer_id());
    let held_by_target = rpc(
        &conn,
        DhtRequest::GetRecords {
            kind: RecordKind::Endpoint,
            key: honest_key,
        },
    )
    .await;
    match held_by_target {
        Some(DhtResponse::Records { records, .. }) => {
            assert!(
                records.iter().any(|r| r.publisher == honest.peer_id()),
                "the target holds the honest record"
            );
        }
        other => panic!("unexpected answer {other:?}"),
    }
    // A message into the victim's mailbox from that other address is
    // accepted too: the junk holds only its share of the key's slots.
    let honest_ep = quinn::Endpoint::client(at("127.0.0.2")).unwrap();
    let honest_conn = within("dial", raw_dial(&honest_ep, &target, &Keypair::generate()))
        .await
        .unwrap();
    let mail = SignedRecord::sign(
        &Keypair::generate(),
        RecordKind::Mailbox,
        victim,
        // Newest first in answers (which carry 64 records at most).
        3,
        now,
        hour,
        b"hello".to_vec(),
    );
    assert_eq!(
        rpc(&honest_conn, DhtRequest::PutRecord { record: mail }).await,
        Some(DhtResponse::Stored)
    );
    match rpc(
        &honest_conn,
        DhtRequest::GetRecords {
            kind: RecordKind::Mailbox,
            key: victim,
        },
    )
    .await
    {
        Some(DhtResponse::Records { records, .. }) => {
            let junk = records.iter().filter(|r| r.payload != b"hello").count();
            assert!(junk <= MAX_PER_SOURCE_PER_KEY, "{junk} junk records");
            assert!(records.iter().any(|r| r.payload == b"hello"));
        }
        other => panic!("unexpected answer {other:?}"),
    }

    // And a third node resolves the honest node by key.
    let third = Node::builder()
        .bind(at("127.0.0.3"))
        .bootstrap([target.local_addr()])
        .spawn()
        .await
        .unwrap();
    within("third join", third.joined()).await;
    let addrs = within("lookup", third.lookup(honest.peer_id()))
        .await
        .unwrap();
    assert!(addrs.iter().any(|a| a.addr == honest.local_addr()));
    ep.close(0u32.into(), b"done");
    honest_ep.close(0u32.into(), b"done");
    for n in [third, honest, target] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_limits_from_the_builder_bound_one_networks_share() {
    let limits = reach::StoreLimits {
        max_per_source: 20,
        max_per_source_per_key: 3,
        ..reach::StoreLimits::default()
    };
    let target = Node::builder()
        .bind(at("127.0.0.1"))
        .store_limits(limits)
        .spawn()
        .await
        .unwrap();
    within("target join", target.joined()).await;
    let ep = quinn::Endpoint::client(at("127.0.0.1")).unwrap();
    let conn = within("dial", raw_dial(&ep, &target, &Keypair::generate()))
        .await
        .unwrap();
    let (now, hour) = (now_ms(), Duration::from_secs(3600));
    let put = async |record: SignedRecord| {
        rpc(&conn, DhtRequest::PutRecord { record }).await == Some(DhtResponse::Stored)
    };

    // Ten identities fill one victim's mailbox key: this network gets 3.
    let victim = Key::for_peer(&Keypair::generate().peer_id());
    let mut at_victim = 0;
    for _ in 0..10 {
        let kp = Keypair::generate();
        let r = SignedRecord::sign(&kp, RecordKind::Mailbox, victim, 1, now, hour, vec![1]);
        at_victim += usize::from(put(r).await);
    }
    assert_eq!(at_victim, 3, "the per-key share set through the builder");

    // Thirty more keys: the network's whole share is 20.
    let mut elsewhere = 0;
    for i in 0..30 {
        let r = SignedRecord::topic(&Keypair::generate(), &format!("t-{i}"), 1, now, hour);
        elsewhere += usize::from(put(r).await);
    }
    assert_eq!(
        at_victim + elsewhere,
        20,
        "the share set through the builder"
    );
    ep.close(0u32.into(), b"done");
    target.shutdown().await;

    // A zero limit is a config error, not a store that refuses everything.
    let err = Node::builder()
        .bind(at("127.0.0.1"))
        .store_limits(reach::StoreLimits {
            max_per_source: 0,
            ..reach::StoreLimits::default()
        })
        .spawn()
        .await
        .expect_err("a zero store limit is refused");
    assert_eq!(err.kind(), "config");
}
