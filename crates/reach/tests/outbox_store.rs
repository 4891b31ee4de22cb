//! The durable outbox on real files: reopen, kill -9, what is on disk,
//! tamper, quotas, the receiver's log.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reach::outbox::{
    DEFAULT_MAX_PER_PEER, Due, MAX_DURABLE_MESSAGE_LEN, MessageId, OUTBOX_FILE, Outbox,
    OutboxLimits, Receipt,
};
use reach::{Keypair, PeerId};
use reach_proto::outbox::{AbandonReason, Delivery, Received};

fn me() -> Keypair {
    Keypair::from_secret_bytes([7; 32])
}

fn peer(n: u8) -> PeerId {
    Keypair::from_secret_bytes([100 + n; 32]).peer_id()
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    getrandom::fill(&mut v).unwrap();
    v
}

/// Per destination: (id, seq) in id order.
fn by_peer(ob: &Outbox) -> BTreeMap<PeerId, Vec<(u64, u64)>> {
    let mut m: BTreeMap<PeerId, Vec<(u64, u64)>> = BTreeMap::new();
    for p in ob.pending() {
        m.entry(p.peer).or_default().push((p.id.0, p.seq));
    }
    m
}

fn assert_fifo(ob: &Outbox) {
    for (peer, list) in by_peer(ob) {
        assert!(
            list.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1),
            "{peer}: ids and sequence numbers out of step: {list:?}"
        );
    }
}

#[tokio::test]
async fn enqueue_then_reopen_keeps_everything_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut sent: HashMap<MessageId, (PeerId, Vec<u8>)> = HashMap::new();
    {
        let ob = Outbox::open(dir.path(), &me()).await.unwrap();
        // Three destinations, interleaved, some concurrently.
        for round in 0..20u8 {
            let futs = (0..3u8).map(|p| {
                let data = vec![round, p, 0xAB];
                let ob = &ob;
                async move {
                    let d = if p == 2 {
                        Delivery::moderate()
                    } else {
                        Delivery::Critical
                    };
                    let id = ob.enqueue(peer(p), data.clone(), d, None).await.unwrap();
                    (id, peer(p), data)
                }
            });
            for (id, p, data) in futures::future::join_all(futs).await {
                sent.insert(id, (p, data));
            }
        }
        assert_eq!(ob.pending().len(), 60);
        // Dropped without any flush or close.
    }
    let ob = Outbox::open(dir.path(), &me()).await.unwrap();
    assert_eq!(ob.quarantined(), 0);
    let pending = ob.pending();
    assert_eq!(pending.len(), sent.len());
    for p in &pending {
        let (peer, data) = &sent[&p.id];
        assert_eq!(&p.peer, peer);
        let out = ob.read(p.id).await.unwrap().expect("readable");
        assert_eq!(&out.data, data);
        assert_eq!(out.seq, p.seq);
        assert_eq!(out.peer, *peer);
    }
    assert_fifo(&ob);
    // Each destination's sequence numbers are 1..=20.
    for (_, list) in by_peer(&ob) {
        let seqs: Vec<u64> = list.iter().map(|x| x.1).collect();
        assert_eq!(seqs, (1..=20).collect::<Vec<u64>>());
    }
    // Everything is due at once, each destination in enqueue order.
    let due = ob.poll_due().await.unwrap();
    assert_eq!(due.len(), 60);
    let mut seen: HashMap<PeerId, u64> = HashMap::new();
    for d in due {
        let Due::Send { id, peer } = d else {
            panic!("nothing should be abandoned: {d:?}")
        };
        let last = seen.entry(peer).or_insert(0);
        assert!(id.0 > *last);
        *last = id.0;
    }
    // New ids continue after the old ones (never reused), seq continues too.
    let max = sent.keys().max().unwrap().0;
    let id = ob
        .enqueue(peer(0), b"next".to_vec(), Delivery::Critical, None)
        .await
        .unwrap();
    assert!(id.0 > max);
    assert_eq!(ob.read(id).await.unwrap().unwrap().seq, 21);
}

#[tokio::test]
async fn ack_cancel_attempts_and_abandon_are_durable() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (peer(0), peer(1), peer(2));
    let (ida, idb, idc, idd);
    {
        let ob = Outbox::open(dir.path(), &me()).await.unwrap();
        ida = ob
            .enqueue(a, b"a".to_vec(), Delivery::Critical, None)
            .await
            .unwrap();
        idb = ob
            .enqueue(a, b"b".to_vec(), Delivery::Critical, None)
            .await
            .unwrap();
        idc = ob
            .enqueue(b, b"c".to_vec(), Delivery::Moderate { attempts: 1 }, None)
            .await
            .unwrap();
        idd = ob
            .enqueue(
                c,
                b"d".to_vec(),
                Delivery::Critical,
                Some(Duration::from_secs(3600)),
            )
            .await
            .unwrap();
        assert_eq!(ob.poll_due().await.unwrap().len(), 4);
        for id in [ida, idb, idc, idd] {
            assert!(ob.record_attempt(id).await.unwrap());
        }
        assert!(ob.record_attempt(idb).await.unwrap());
        // The ack arrives by sequence number.
        assert_eq!(ob.ack_seq(a, 1).await.unwrap(), Some(ida));
        assert_eq!(ob.ack_seq(a, 1).await.unwrap(), None);
        assert!(!ob.ack(ida).await.unwrap());
        // b comes back: the moderate message had its one attempt.
        ob.on_reachable(b);
        let due = ob.poll_due().await.unwrap();
        assert_eq!(
            due,
            vec![Due::Abandoned {
                id: idc,
                peer: b,
                reason: AbandonReason::Attempts
            }]
        );
        assert!(ob.cancel(idd).await.unwrap());
        assert!(!ob.cancel(idd).await.unwrap());
        assert!(!ob.record_attempt(idd).await.unwrap());
    }
    let ob = Outbox::open(dir.path(), &me()).await.unwrap();
    let pending = ob.pending();
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0].id, idb);
    assert_eq!(pending[0].attempts, 2);
    assert_eq!(pending[0].seq, 2);
    assert!(pending[0].age < Duration::from_secs(60));
}

#[tokio::test]
async fn wait_due_wakes_on_enqueue_and_on_reachable() {
    let dir = tempfile::tempdir().unwrap();
    let ob = std::sync::Arc::new(Outbox::open(dir.path(), &me()).await.unwrap());
    // Nothing pending: the driver waits until a message arrives.
    let waiter = tokio::spawn({
        let ob = ob.clone();
        async move { ob.wait_due().await }
    });
    let id = ob
        .enqueue(peer(0), b"x".to_vec(), Delivery::Critical, None)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("an enqueue wakes the driver")
        .unwrap();
    assert_eq!(
        ob.poll_due().await.unwrap(),
        vec![Due::Send { id, peer: peer(0) }]
    );
    assert!(ob.record_attempt(id).await.unwrap());
    // The first retry is at least half of FIRST_RETRY away.
    let next = ob.pending()[0].next_try.expect("a retry is scheduled");
    assert!(next >= Duration::from_millis(400), "{next:?}");
    let started = Instant::now();
    let waiter = tokio::spawn({
        let ob = ob.clone();
        async move { ob.wait_due().await }
    });
    ob.on_reachable(peer(0));
    waiter.await.unwrap();
    // Woken by "reachable", not by the retry timer.
    assert!(started.elapsed() < Duration::from_millis(400));
    assert_eq!(
        ob.poll_due().await.unwrap(),
        vec![Due::Send { id, peer: peer(0) }]
    );
}

#[tokio::test]
async fn the_file_holds_no_payload_and_no_peer_id_in_the_clear() {
    let dir = tempfile::tempdir().unwrap();
    let payloads: Vec<Vec<u8>> = (0..20).map(|_| random_bytes(200)).collect();
    let dests: Vec<PeerId> = (0..5).map(peer).collect();
    let senders: Vec<PeerId> = (10..15).map(peer).collect();
    {
        let ob = Outbox::open(dir.path(), &me()).await.unwrap();
        for (i, p) in payloads.iter().enumerate() {
            ob.enqueue(dests[i % 5], p.clone(), Delivery::Critical, None)
                .await
                .unwrap();
        }
        for (i, s) in senders.iter().enumerate() {
            for seq in 1..4 {
                assert_eq!(ob.record_received(*s, seq).await.unwrap(), Received::New);
            }
            // Received payloads wait in the inbox, sealed too.
            let r = ob.receive(*s, 4, payloads[i].clone()).await.unwrap();
            assert!(matches!(r, Receipt::New(_)));
        }
        assert_eq!(ob.inbox().await.unwrap().len(), senders.len());
        ob.close().await;
    }
    let raw = std::fs::read(dir.path().join(OUTBOX_FILE)).unwrap();
    let contains = |needle: &[u8]| raw.windows(needle.len()).any(|w| w == needle);
    // The control: the file is not empty of what we look for by accident —
    // a sealed value is there, with its length.
    assert!(raw.len() > payloads.len() * 200);
    for p in &payloads {
        // No 16-byte run of any payload.
        for chunk in p.chunks(16).filter(|c| c.len() == 16) {
            assert!(!contains(chunk), "payload bytes in the clear");
        }
    }
    for id in dests.iter().chain(&senders).chain([&me().peer_id()]) {
        for chunk in id.as_bytes().chunks(16) {
            assert!(!contains(chunk), "peer id {id} in the clear");
        }
    }
}

/// Finds `needle` in the file, once.
fn find_once(raw: &[u8], needle: &[u8]) -> usize {
    let hits: Vec<usize> = raw
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(hits.len(), 1, "expected the value exactly once in the file");
    hits[0]
}

fn raw_entry(path: &Path, id: u64) -> Vec<u8> {
    let db = redb::Database::open(path).unwrap();
    let tx = redb::ReadableDatabase::begin_read(&db).unwrap();
    let def: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("entries");
    let t = tx.open_table(def).unwrap();
    t.get(id).unwrap().unwrap().value().to_vec()
}

#[tokio::test]
async fn a_flipped_byte_is_detected_counted_and_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(OUTBOX_FILE);
    let mut ids = Vec::new();
    {
        let ob = Outbox::open(dir.path(), &me()).await.unwrap();
        for i in 0..6u8 {
            let data = vec![i; 100];
            ids.push(
                ob.enqueue(peer(i % 2), data, Delivery::Critical, None)
                    .await
                    .unwrap(),
            );
        }
        assert_eq!(ob.record_received(peer(9), 1).await.unwrap(), Received::New);
    }
    let victim = ids[2];
    let value = raw_entry(&path, victim.0);
    let mut raw = std::fs::read(&path).unwrap();
    let at = find_once(&raw, &value);
    raw[at + value.len() / 2] ^= 0x01;
    std::fs::write(&path, &raw).unwrap();

    let ob = Outbox::open(dir.path(), &me()).await.unwrap();
    assert_eq!(ob.quarantined(), 1);
    let left: Vec<MessageId> = ob.pending().iter().map(|p| p.id).collect();
    let expect: Vec<MessageId> = ids.iter().copied().filter(|&i| i != victim).collect();
    assert_eq!(left, expect);
    for id in &expect {
        let out = ob.read(*id).await.unwrap().unwrap();
        assert_eq!(out.data.len(), 100);
    }
    assert!(ob.read(victim).await.unwrap().is_none());
    // The receiver's log is intact.
    assert_eq!(
        ob.record_received(peer(9), 1).await.unwrap(),
        Received::Duplicate
    );
    drop(ob);
    // Set aside for good: the next open counts it still, and loses nothing.
    let ob = Outbox::open(dir.path(), &me()).await.unwrap();
    assert_eq!(ob.quarantined(), 1);
    assert_eq!(ob.pending().len(), 5);
}

#[tokio::test]
async fn an_entry_moved_to_another_key_fails_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(OUTBOX_FILE);
    let (a, b);
    {
        let ob = Outbox::open(dir.path(), &me()).await.unwrap();
        a = ob
            .enqueue(peer(0), b"first".to_vec(), Delivery::Critical, None)
            .await
            .unwrap();
        b = ob
            .enqueue(peer(1), b"second".to_vec(), Delivery::Critical, None)
            .await
            .unwrap();
    }
    // Copy a's sealed value over b's row (a valid ciphertext, wrong place).
    let value = raw_entry(&path, a.0);
    {
        let db = redb::Database::open(&path).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("entries");
            let mut t = tx.open_table(def).unwrap();
            t.insert(b.0, value.as_slice()).unwrap();
        }
        tx.commit().unwrap();
    }
    let ob = Outbox::open(dir.path(), &me()).await.unwrap();
    assert_eq!(ob.quarantined(), 1);
    let left: Vec<MessageId> = ob.pending().iter().map(|p| p.id).collect();
    assert_eq!(left, vec![a]);
    assert_eq!(ob.read(a).await.unwrap().unwrap().data, b"first");
}

#[tokio::test]
async fn another_identity_cannot_open_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    {
        let ob = Outbox::open(dir.path(), &me()).await.unwrap();
        ob.enqueue(peer(0), b"x".to_vec(), Delivery::Critical, None)
            .await
            .unwrap();
    }
    let other = Keypair::from_secret_bytes([8; 32]);
    let err = Outbox::open(dir.path(), &other)
        .await
        .err()
        .expect("refused");
    assert_eq!(err.kind(), "outbox_key_mismatch");
    // Nothing was quarantined or lost by the attempt.
    let ob = Outbox::open(dir.path(), &me()).await.unwrap();
    assert_eq!(ob.quarantined(), 0);
    assert_eq!(ob.pending().len(), 1);
}

#[tokio::test]
async fn a_file_that_is_no_database_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(OUTBOX_FILE);
    let junk = random_bytes(64 * 1024);
    std::fs::write(&path, &junk).unwrap();
    let err = Outbox::open(dir.path(), &me())
        .await
        .err()
        .expect("refused");
    assert_eq!(err.kind(), "outbox_corrupt", "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        junk,
        "the file is kept as it was"
    );
}

/// A kill -9 while the very first start created the file leaves only the
/// half-made temporary file: the next start makes a fresh outbox.
#[tokio::test]
async fn a_creation_cut_short_leaves_nothing_that_blocks_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let half_made = dir.path().join(format!("{OUTBOX_FILE}.new"));
    std::fs::write(&half_made, random_bytes(100)).unwrap();
    let ob = Outbox::open(dir.path(), &me())
        .await
        .expect("a fresh outbox");
    let id = ob
        .enqueue(peer(1), b"after".to_vec(), Delivery::Critical, None)
        .await
        .unwrap();
    assert_eq!(ob.pending()[0].id, id);
    assert!(!half_made.exists(), "the leftover is gone");
}

#[tokio::test]
async fn quotas_and_size_give_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let limits = OutboxLimits {
        max_per_peer: 3,
        max_bytes_per_peer: 1000,
        max_total: 5,
        max_bytes_total: 1500,
        max_senders: 2,
        ..OutboxLimits::default()
    };
    let ob = Outbox::open_with_limits(dir.path(), &me(), limits)
        .await
        .unwrap();
    let c = Delivery::Critical;
    let mut a_ids = Vec::new();
    for _ in 0..3 {
        a_ids.push(ob.enqueue(peer(0), vec![0; 10], c, None).await.unwrap());
    }
    let err = ob.enqueue(peer(0), vec![0; 10], c, None).await.unwrap_err();
    assert_eq!(err.kind(), "outbox_full");
    assert!(err.to_string().contains("destination"), "{err}");
    // Per-destination bytes.
    ob.enqueue(peer(1), vec![0; 600], c, None).await.unwrap();
    let err = ob
        .enqueue(peer(1), vec![0; 600], c, None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "outbox_full");
    // Total bytes: 30 + 600 + 900 > 1500.
    let err = ob
        .enqueue(peer(2), vec![0; 900], c, None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "outbox_full");
    assert!(err.to_string().contains("total"), "{err}");
    // Total count: 4 pending, one more fits, then full.
    ob.enqueue(peer(2), vec![0; 1], c, None).await.unwrap();
    let err = ob.enqueue(peer(3), vec![0; 1], c, None).await.unwrap_err();
    assert_eq!(err.kind(), "outbox_full");
    assert_eq!(ob.pending().len(), 5);
    // An ack makes room.
    assert!(ob.ack(a_ids[0]).await.unwrap());
    ob.enqueue(peer(0), vec![0; 10], c, None).await.unwrap();
    // Too large for a durable message, whatever the quotas.
    let err = ob
        .enqueue(peer(4), vec![0; MAX_DURABLE_MESSAGE_LEN + 1], c, None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "message_too_large");
    assert_eq!(ob.pending().len(), 5);
    // Receiver side: a third sender is refused, the first two go on.
    assert_eq!(ob.record_received(peer(5), 1).await.unwrap(), Received::New);
    assert_eq!(ob.record_received(peer(6), 1).await.unwrap(), Received::New);
    let err = ob.record_received(peer(7), 1).await.unwrap_err();
    assert_eq!(err.kind(), "outbox_full");
    assert!(err.to_string().contains("senders"), "{err}");
    assert_eq!(ob.record_received(peer(5), 2).await.unwrap(), Received::New);
    // The defaults hold the 10,000-message backlog to one peer.
    const { assert!(DEFAULT_MAX_PER_PEER >= 10_000) };
}

#[tokio::test]
async fn the_received_log_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (s, t) = (peer(1), peer(2));
    {
        let ob = Outbox::open(dir.path(), &me()).await.unwrap();
        // Out of order, concurrently, with duplicates: each New once.
        let seqs = [3u64, 1, 2, 3, 5, 1];
        let res = futures::future::join_all(seqs.iter().map(|&q| ob.record_received(s, q))).await;
        let news: Vec<u64> = seqs
            .iter()
            .zip(&res)
            .filter(|(_, r)| *r.as_ref().unwrap() == Received::New)
            .map(|(q, _)| *q)
            .collect();
        let mut sorted = news.clone();
        sorted.sort();
        assert_eq!(sorted, vec![1, 2, 3, 5]);
        assert_eq!(ob.record_received(t, 1).await.unwrap(), Received::New);
    }
    let ob = Outbox::open(dir.path(), &me()).await.unwrap();
    for q in [1, 2, 3, 5] {
        assert_eq!(ob.record_received(s, q).await.unwrap(), Received::Duplicate);
    }
    assert_eq!(ob.record_received(s, 4).await.unwrap(), Received::New);
    assert_eq!(ob.record_received(t, 1).await.unwrap(), Received::Duplicate);
    assert_eq!(ob.record_received(t, 2).await.unwrap(), Received::New);
    assert_eq!(ob.record_received(s, 0).await.unwrap(), Received::TooOld);
}

#[tokio::test]
async fn the_inbox_keeps_a_received_message_until_it_is_handed_over() {
    let dir = tempfile::tempdir().unwrap();
    let s = peer(1);
    let (i1, i2);
    {
        let ob = Outbox::open(dir.path(), &me()).await.unwrap();
        let Receipt::New(a) = ob.receive(s, 1, b"one".to_vec()).await.unwrap() else {
            panic!("new")
        };
        i1 = a;
        assert_eq!(
            ob.receive(s, 1, b"one".to_vec()).await.unwrap(),
            Receipt::Duplicate
        );
        let Receipt::New(b) = ob.receive(s, 2, b"two".to_vec()).await.unwrap() else {
            panic!("new")
        };
        i2 = b;
        assert_ne!(i1, i2);
        assert!(ob.inbox_done(i1).await.unwrap());
        assert!(!ob.inbox_done(i1).await.unwrap());
        // The node dies before handing "two" to the application.
    }
    let ob = Outbox::open(dir.path(), &me()).await.unwrap();
    let inbox = ob.inbox().await.unwrap();
    assert_eq!(inbox.len(), 1);
    assert_eq!((inbox[0].id, inbox[0].sender, inbox[0].seq), (i2, s, 2));
    assert_eq!(inbox[0].data, b"two");
    // The sender's retry of it is a duplicate: delivered once, from the inbox.
    assert_eq!(
        ob.receive(s, 2, b"two".to_vec()).await.unwrap(),
        Receipt::Duplicate
    );
    assert_eq!(
        ob.receive(s, 0, b"x".to_vec()).await.unwrap(),
        Receipt::TooOld
    );
    assert!(ob.inbox_done(i2).await.unwrap());
    drop(ob);
    let ob = Outbox::open(dir.path(), &me()).await.unwrap();
    assert!(ob.inbox().await.unwrap().is_empty());
    // Inbox ids are not reused.
    let Receipt::New(c) = ob.receive(s, 3, b"three".to_vec()).await.unwrap() else {
        panic!("new")
    };
    assert!(c > i2);
}

#[tokio::test]
async fn a_full_inbox_refuses_without_recording() {
    let dir = tempfile::tempdir().unwrap();
    let limits = OutboxLimits {
        max_inbox: 1,
        ..OutboxLimits::default()
    };
    let ob = Outbox::open_with_limits(dir.path(), &me(), limits)
        .await
        .unwrap();
    let s = peer(1);
    let Receipt::New(first) = ob.receive(s, 1, b"a".to_vec()).await.unwrap() else {
        panic!("new")
    };
    let err = ob.receive(s, 2, b"b".to_vec()).await.unwrap_err();
    assert_eq!(err.kind(), "outbox_full");
    assert!(err.to_string().contains("inbox"), "{err}");
    // Not recorded: once there is room, the sender's retry is new.
    assert!(ob.inbox_done(first).await.unwrap());
    assert!(matches!(
        ob.receive(s, 2, b"b".to_vec()).await.unwrap(),
        Receipt::New(_)
    ));
    let err = ob
        .receive(s, 3, vec![0; MAX_DURABLE_MESSAGE_LEN + 1])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "message_too_large");
}

// ---- kill -9 ----

const CHILD_ENV: &str = "REACH_OUTBOX_KILL9_CHILD_DIR";
/// The round number: the child's received sequence numbers start at
/// round × RX_SEQ_STRIDE + 1, above everything earlier rounds received.
const CHILD_ROUND_ENV: &str = "REACH_OUTBOX_KILL9_ROUND";
const RX_SEQ_STRIDE: u64 = 1_000_000;
/// The sender whose messages the child receives.
const RX_SENDER: u8 = 50;
/// Concurrent enqueuers in the child.
const CHILD_TASKS: usize = 8;
/// Each child enqueuer stops by itself after this many messages, and the
/// child after this long, so a child the parent failed to kill ends anyway.
const CHILD_MAX_PER_TASK: usize = 5000;
const CHILD_MAX_RUN: Duration = Duration::from_secs(30);

/// Not a test on its own: the child process of
/// `kill_9_loses_nothing_acknowledged` (run with `--ignored` by it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of kill_9_loses_nothing_acknowledged"]
async fn kill9_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let ob = std::sync::Arc::new(Outbox::open(Path::new(&dir), &me()).await.unwrap());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..CHILD_TASKS {
        let ob = ob.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..CHILD_MAX_PER_TASK {
                if start.elapsed() > CHILD_MAX_RUN {
                    break;
                }
                let p = (task % 3) as u8;
                let data = format!("{task}-{i}").into_bytes();
                let id = ob
                    .enqueue(peer(p), data, Delivery::Critical, None)
                    .await
                    .unwrap();
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                writeln!(out, "ID {} {} {} {}", id.0, p, task, i).unwrap();
                out.flush().unwrap();
            }
        }));
    }
    // The receiving side at the same time: each message recorded and kept
    // in the inbox before it is "acked" (printed).
    let round: u64 = std::env::var(CHILD_ROUND_ENV).unwrap().parse().unwrap();
    tasks.push(tokio::spawn({
        let ob = ob.clone();
        async move {
            for i in 1..=CHILD_MAX_PER_TASK as u64 {
                if start.elapsed() > CHILD_MAX_RUN {
                    break;
                }
                let seq = round * RX_SEQ_STRIDE + i;
                let r = ob
                    .receive(peer(RX_SENDER), seq, seq.to_be_bytes().to_vec())
                    .await
                    .unwrap();
                let Receipt::New(id) = r else {
                    panic!("{seq} not new: {r:?}")
                };
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                writeln!(out, "RX {} {}", seq, id.0).unwrap();
                out.flush().unwrap();
            }
        }
    }));
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn kill_9_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acknowledged: HashMap<u64, (u8, String)> = HashMap::new();
    let mut received: HashMap<u64, u64> = HashMap::new(); // inbox id → seq
    for round in 0..4 {
        let mut child = Command::new(&exe)
            .args(["--exact", "kill9_child", "--ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .env(CHILD_ENV, dir.path())
            .env(CHILD_ROUND_ENV, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        // Kill after a random number of acknowledged messages.
        let kill_after = 50 + (u16::from_le_bytes(random_bytes(2).try_into().unwrap()) % 1500);
        let mut lines: Vec<Vec<u8>> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut ids_seen = 0;
        while ids_seen < kill_after as usize {
            assert!(Instant::now() < deadline, "the child printed too little");
            let mut line = Vec::new();
            let n = stdout.read_until(b'\n', &mut line).unwrap();
            assert!(n > 0, "the child ended before it was killed");
            if line.starts_with(b"ID ") {
                ids_seen += 1;
            }
            lines.push(line);
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Whatever it printed before dying counts too.
        let mut rest = Vec::new();
        stdout.read_to_end(&mut rest).unwrap();
        for l in rest.split_inclusive(|&b| b == b'\n') {
            lines.push(l.to_vec());
        }
        for line in lines {
            // Only whole lines: a line cut by the kill was not yet printed.
            let Some(text) = line.strip_suffix(b"\n") else {
                continue;
            };
            let text = String::from_utf8_lossy(text);
            let f: Vec<&str> = text.split(' ').collect();
            if f.len() == 3 && f[0] == "RX" {
                let seq: u64 = f[1].parse().unwrap();
                let id: u64 = f[2].parse().unwrap();
                assert!(received.insert(id, seq).is_none(), "inbox id {id} twice");
                continue;
            }
            if f.len() != 5 || f[0] != "ID" {
                continue;
            }
            let id: u64 = f[1].parse().unwrap();
            let p: u8 = f[2].parse().unwrap();
            let prev = acknowledged.insert(id, (p, format!("{}-{}", f[3], f[4])));
            assert!(prev.is_none(), "id {id} handed out twice");
        }
        // The file opens cleanly and holds every acknowledged message.
        let ob = Outbox::open(dir.path(), &me()).await.unwrap();
        assert_eq!(ob.quarantined(), 0, "round {round}");
        let pending: HashMap<u64, PeerId> =
            ob.pending().into_iter().map(|p| (p.id.0, p.peer)).collect();
        for (id, (p, _)) in &acknowledged {
            assert_eq!(
                pending.get(id),
                Some(&peer(*p)),
                "round {round}: id {id} lost"
            );
        }
        // Spot-check payloads (all of them would take long in debug builds).
        for (id, (_, data)) in acknowledged.iter().take(200) {
            let out = ob.read(MessageId(*id)).await.unwrap().unwrap();
            assert_eq!(out.data, data.as_bytes());
        }
        assert_fifo(&ob);
        // Every message the receiver acknowledged is in the inbox, and its
        // sender's retry is a duplicate.
        let inbox: HashMap<u64, (u64, Vec<u8>)> = ob
            .inbox()
            .await
            .unwrap()
            .into_iter()
            .map(|m| (m.id.0, (m.seq, m.data)))
            .collect();
        for (id, seq) in &received {
            let (s, data) = inbox.get(id).unwrap_or_else(|| panic!("inbox {id} lost"));
            assert_eq!((s, data.as_slice()), (seq, seq.to_be_bytes().as_slice()));
        }
        let this_round: Vec<u64> = received
            .values()
            .copied()
            .filter(|s| s / RX_SEQ_STRIDE == round)
            .collect();
        for seq in this_round.iter().take(50) {
            assert_eq!(
                ob.receive(peer(RX_SENDER), *seq, b"again".to_vec())
                    .await
                    .unwrap(),
                Receipt::Duplicate
            );
        }
        let distinct: HashSet<u64> = pending.keys().copied().collect();
        assert!(distinct.len() >= acknowledged.len());
        drop(ob);
    }
    assert!(acknowledged.len() >= 4 * 50);
    assert!(!received.is_empty());
}
