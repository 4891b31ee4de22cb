//! `reach bench topics`, forwarding: what one topic home forwards.
//!
//! Two runs against one home, a `reach node` in a process of its own (its
//! `[topic_limits]` raised out of the way: the default 500 msg/s per topic
//! would be what is measured otherwise):
//!
//! - **saturation** ([`saturate`]): the home's capacity. A load generator
//!   in this process speaks the member protocol itself over real QUIC with
//!   reach's TLS identities (what a member node sends, minus its costs):
//!   [`SAT_PUBLISHERS`] members publish 100-byte messages signed before
//!   the clock starts, seqs in order, at most
//!   [`PUBLISH_WINDOW`](reach::topics::PUBLISH_WINDOW) unanswered each
//!   (the member protocol's window), every answer read and checked; they
//!   are members of the topic, so they also receive every message, as
//!   [`SAT_SUBSCRIBERS`] more members do. Every member reads and counts
//!   its deliveries (origin and seq parsed from the frame: each message
//!   once and in order per publisher) without checking signatures (a
//!   subscriber's cost, not the home's). The home sends each message to
//!   each of the `SAT_PUBLISHERS + SAT_SUBSCRIBERS` members: the fan-out.
//!   The shape is chosen so that the home is what bounds the rate on a
//!   2-core machine: few copies per message (the load generator's cost
//!   per copy received is about the home's per copy sent) and enough
//!   publishers that the home always has a batch waiting. Figures:
//!   distinct messages the home took per second (wall clock) and per
//!   CPU-second of its process, copies it delivered per second and per
//!   CPU-second, and the cores it used (near 1.0: the home, not the load
//!   generator, is the bottleneck; its overlay runs under one lock).
//! - **end to end** ([`forward`]): what an application sees. Real nodes
//!   (in this process) as members: [`PUBLISHERS`] publishing as fast as
//!   `Node::publish` lets them, one more subscribing; every member node
//!   checks the signature of every message it receives, so this run is
//!   bound by the members, not by the home.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::{Bytes, BytesMut};
use reach::topics::PUBLISH_WINDOW;
use reach::topics::wire::{self, MemberFrame};
use reach::{Keypair, Node, PeerId};
use reach_proto::topics::{TopicId, TopicMessage};
use reach_proto::wire::envelope::{Body, Envelope, OPEN_ACCEPTED};
use reach_proto::wire::{FRAME_HEADER_LEN, frame};
use tokio::sync::Semaphore;

use super::topics::{
    DEADLINE, HomeProcess, PAYLOAD, PUBLISHERS, cpu_s, loopback, member_at, members_seen,
    next_message,
};

/// Publishing members of the saturation run. Each keeps at most a window
/// of publishes unanswered, so the publishers bound what is in flight: with
/// 4 (128 in flight) the home idled a third of the time waiting for the
/// next batch; with 6 it is busy ~1 core (measured on 2 cores), while the
/// load generator, receiving 6 copies of each message, stays near half a
/// core.
pub const SAT_PUBLISHERS: usize = 6;
/// Members of the saturation run that only receive.
pub const SAT_SUBSCRIBERS: usize = 0;
/// Bytes asked of a stream per read in the load generator: a burst of
/// deliveries in one call.
const READ_CHUNK: usize = 256 * 1024;

/// What the saturation run measured.
pub struct Saturation {
    /// Distinct messages the home took.
    pub messages: u64,
    /// Copies it sent of each (one per member).
    pub copies_per_message: usize,
    /// Seconds from the first publish to the last copy received.
    pub s: f64,
    /// Every member received every message once, in order per publisher,
    /// and every publish was answered as taken.
    pub in_order_once: bool,
    /// CPU seconds of the home's process meanwhile.
    pub home_cpu_s: f64,
    /// CPU seconds of this process (the load generator) meanwhile.
    pub loadgen_cpu_s: f64,
}

/// One member connection of the load generator.
struct RawMember {
    _ep: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// Bytes read past the `Subscribed` answer.
    buf: BytesMut,
}

/// Opens a member stream to the home as `kp` and subscribes to `topic`:
/// what a member node does, over its own QUIC endpoint.
async fn raw_member(home: &HomeProcess, kp: &Keypair, topic: &str) -> Result<RawMember> {
    let (tls, _) = reach::tls::client_config(kp, home.peer)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(reach::transport::transport_config());
    let ep = quinn::Endpoint::client(loopback())?;
    let conn = tokio::time::timeout(
        DEADLINE,
        ep.connect_with(cfg, home.addr, reach::tls::SERVER_NAME)?,
    )
    .await
    .context("dialing the home")??;
    let (mut send, mut recv) = conn.open_bi().await?;
    let open = Envelope::new(Body::Open {
        protocol: wire::MEMBER_PROTOCOL.to_string(),
    })
    .to_frame()?;
    send.write_all(&open).await?;
    send.write_all(&wire::encode(&MemberFrame::Subscribe {
        topic: topic.to_string(),
    })?)
    .await?;
    let mut answer = [0u8; 1];
    tokio::time::timeout(DEADLINE, recv.read_exact(&mut answer))
        .await
        .context("the home's answer to the stream")??;
    ensure!(answer[0] == OPEN_ACCEPTED, "the home refused the stream");
    let mut m = RawMember {
        _ep: ep,
        conn,
        send,
        recv,
        buf: BytesMut::new(),
    };
    // The first frame is the answer to the subscribe.
    loop {
        if let Some((body, rest)) = split_frame(&m.buf)? {
            ensure!(
                body.first() == Some(&SUBSCRIBED),
                "the home did not answer the subscribe with Subscribed"
            );
            let used = m.buf.len() - rest;
            let _ = m.buf.split_to(used);
            return Ok(m);
        }
        read_more(&mut m.recv, &mut m.buf).await?;
    }
}

/// Postcard's indexes of the [`MemberFrame`] variants the load generator
/// reads (checked against the enum by a test).
const SUBSCRIBED: u8 = 1;
const PUBLISHED: u8 = 4;
const PUBLISH_REFUSED: u8 = 5;
const DELIVER: u8 = 6;
const PRESENCE: u8 = 7;

/// The first whole frame of `buf`: its body and the bytes left after it.
fn split_frame(buf: &[u8]) -> Result<Option<(&[u8], usize)>> {
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let len = frame::parse_header(buf, wire::MAX_STREAM_FRAME)?;
    let end = FRAME_HEADER_LEN + len;
    Ok((buf.len() >= end).then(|| (&buf[FRAME_HEADER_LEN..end], buf.len() - end)))
}

/// Appends what the stream has to `buf`; an error at its end or after
/// [`DEADLINE`] with nothing.
async fn read_more(recv: &mut quinn::RecvStream, buf: &mut BytesMut) -> Result<()> {
    match tokio::time::timeout(DEADLINE, recv.read_chunk(READ_CHUNK, true)).await {
        Ok(Ok(Some(chunk))) => {
            buf.extend_from_slice(&chunk.bytes);
            Ok(())
        }
        Ok(Ok(None)) => bail!("the home ended a member stream"),
        Ok(Err(e)) => bail!("a member stream failed: {e}"),
        Err(_) => bail!("nothing from the home within {DEADLINE:?}"),
    }
}

/// A postcard varint (LEB128) off the front of `b`.
fn varint(b: &mut &[u8]) -> Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&x, rest) = b.split_first().context("a truncated varint")?;
        *b = rest;
        v |= u64::from(x & 0x7f) << shift;
        if x & 0x80 == 0 {
            return Ok(v);
        }
    }
    bail!("a varint over 64 bits")
}

/// What one member of the load generator counted.
struct Counted {
    /// Copies delivered to it.
    delivered: u64,
    /// Every copy was the next seq of its publisher.
    in_order: bool,
    /// Its publishes answered as taken.
    taken: u64,
}

/// Reads a member's stream (`recv`, with what was read of it in `buf`)
/// until it received `total` deliveries and `answers` answers to its
/// publishes (each returning a place to `window`): origin and seq of each
/// delivery checked against `publishers`' next seqs, no signature checked.
async fn count(
    recv: &mut quinn::RecvStream,
    buf: &mut BytesMut,
    topic: TopicId,
    publishers: &[PeerId],
    total: u64,
    answers: u64,
    window: Option<&Semaphore>,
) -> Result<Counted> {
    let mut next = vec![1u64; publishers.len()];
    let mut c = Counted {
        delivered: 0,
        in_order: true,
        taken: 0,
    };
    while c.delivered < total || c.taken < answers {
        let mut at = 0;
        while let Some((body, _)) = split_frame(&buf[at..])? {
            at += FRAME_HEADER_LEN + body.len();
            let (&kind, mut rest) = body.split_first().context("an empty frame")?;
            match kind {
                DELIVER => {
                    // topic (32), origin (32), seq (varint), data, signature.
                    ensure!(rest.len() > 64, "a short delivery");
                    c.in_order &= rest[..32] == topic.0;
                    let origin = &rest[32..64];
                    rest = &rest[64..];
                    let seq = varint(&mut rest)?;
                    match publishers.iter().position(|p| p.as_bytes() == origin) {
                        Some(i) if next[i] == seq => next[i] += 1,
                        _ => c.in_order = false,
                    }
                    c.delivered += 1;
                }
                PUBLISHED => {
                    let seq = varint(&mut rest)?;
                    c.taken += 1;
                    c.in_order &= seq == c.taken;
                    if let Some(w) = window {
                        w.add_permits(1);
                    }
                }
                PUBLISH_REFUSED => bail!("the home refused a publish"),
                PRESENCE | SUBSCRIBED => {}
                k => bail!("an unexpected frame {k} from the home"),
            }
        }
        let _ = buf.split_to(at);
        if c.delivered < total || c.taken < answers {
            read_more(recv, buf).await?;
        }
    }
    Ok(c)
}

/// `per_publisher` messages of `kp` on `topic`, signed and encoded as
/// publish frames back to back, with each frame's end offset.
fn presigned(kp: &Keypair, topic: TopicId, per_publisher: u64) -> Result<(Bytes, Vec<usize>)> {
    let mut all = Vec::new();
    let mut ends = Vec::with_capacity(per_publisher as usize);
    for seq in 1..=per_publisher {
        let msg = TopicMessage::sign(kp, topic, seq, vec![7u8; PAYLOAD])?;
        all.extend_from_slice(&wire::encode(&MemberFrame::Publish(msg))?);
        ends.push(all.len());
    }
    Ok((Bytes::from(all), ends))
}

/// Writes the pre-signed frames, at most [`PUBLISH_WINDOW`] unanswered:
/// each write takes as many as the window has room for, as one chunk.
async fn publish_all(
    mut send: quinn::SendStream,
    frames: Bytes,
    ends: Vec<usize>,
    window: Arc<Semaphore>,
) -> Result<quinn::SendStream> {
    let (mut sent, mut from) = (0usize, 0usize);
    while sent < ends.len() {
        let first = tokio::time::timeout(DEADLINE, window.acquire())
            .await
            .context("no publish answered within the deadline")??;
        first.forget();
        let mut n = 1;
        while sent + n < ends.len()
            && let Ok(p) = window.try_acquire()
        {
            p.forget();
            n += 1;
        }
        sent += n;
        let to = ends[sent - 1];
        send.write_chunk(frames.slice(from..to)).await?;
        from = to;
    }
    // The stream stays open until the run ends: the home would end the
    // member's stream (and its deliveries) at our end.
    Ok(send)
}

/// The saturation run: the home process, [`SAT_PUBLISHERS`] publishing
/// `per_publisher` messages each, [`SAT_SUBSCRIBERS`] receiving.
pub async fn saturate(per_publisher: u64) -> Result<Saturation> {
    const TOPIC: &str = "bench-capacity";
    let topic = TopicId::from_name(TOPIC)?;
    let home = HomeProcess::start(Some(u64::MAX / 4), None)?;
    let keys: Vec<Keypair> = (0..SAT_PUBLISHERS + SAT_SUBSCRIBERS)
        .map(|_| Keypair::generate())
        .collect();
    let publishers: Arc<Vec<PeerId>> =
        Arc::new(keys[..SAT_PUBLISHERS].iter().map(|k| k.peer_id()).collect());
    // Signed before the clock starts, on every core.
    let mut signing = tokio::task::JoinSet::new();
    for (i, kp) in keys[..SAT_PUBLISHERS].iter().enumerate() {
        let kp = kp.clone();
        signing.spawn_blocking(move || presigned(&kp, topic, per_publisher).map(|f| (i, f)));
    }
    let mut frames: Vec<Option<(Bytes, Vec<usize>)>> = vec![None; SAT_PUBLISHERS];
    while let Some(r) = signing.join_next().await {
        let (i, f) = r??;
        frames[i] = Some(f);
    }
    let mut members = Vec::new();
    for kp in &keys {
        members.push(raw_member(&home, kp, TOPIC).await?);
    }
    let total = per_publisher * SAT_PUBLISHERS as u64;
    let home_before = home.cpu_s()?;
    let loadgen_before = cpu_s("self")?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, m) in members.into_iter().enumerate() {
        let publishers = publishers.clone();
        let mine = frames.get_mut(i).and_then(Option::take);
        tasks.spawn(async move {
            let RawMember {
                _ep,
                conn,
                send,
                mut recv,
                mut buf,
            } = m;
            let c = match mine {
                Some((f, ends)) => {
                    let window = Arc::new(Semaphore::new(PUBLISH_WINDOW));
                    let writer = tokio::spawn(publish_all(send, f, ends, window.clone()));
                    let c = count(
                        &mut recv,
                        &mut buf,
                        topic,
                        &publishers,
                        total,
                        per_publisher,
                        Some(&window),
                    )
                    .await?;
                    (c, writer.await??)
                }
                None => (
                    count(&mut recv, &mut buf, topic, &publishers, total, 0, None).await?,
                    send,
                ),
            };
            let took = started.elapsed();
            Ok::<_, anyhow::Error>((c, took, (conn, _ep)))
        });
    }
    let mut in_order_once = true;
    let mut s = Duration::ZERO;
    let mut held = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let ((c, send), took, conn) = r.context("a load generator task")??;
        in_order_once &= c.in_order && c.delivered == total;
        s = s.max(took);
        held.push((conn, send));
    }
    let home_cpu_s = home.cpu_s()? - home_before;
    let loadgen_cpu_s = cpu_s("self")? - loadgen_before;
    for ((conn, _), _) in &held {
        conn.close(0u32.into(), b"done");
    }
    drop(held);
    drop(home);
    Ok(Saturation {
        messages: total,
        copies_per_message: SAT_PUBLISHERS + SAT_SUBSCRIBERS,
        s: s.as_secs_f64(),
        in_order_once,
        home_cpu_s,
        loadgen_cpu_s,
    })
}

/// A node whose home is the `home` process (the only relay it knows).
async fn member_of_process(home: &HomeProcess) -> Result<Node> {
    member_at(home.addr, home.peer).await
}

/// What the forwarding run measured.
pub struct Forward {
    /// Messages the subscriber received per second.
    pub msgs_per_s: f64,
    /// Seconds from the first publish to the last message received.
    pub s: f64,
    /// Every message arrived once and in order per publisher.
    pub in_order: bool,
    /// CPU seconds of the home's process meanwhile.
    pub home_cpu_s: f64,
    /// CPU seconds of this process (the members) meanwhile.
    pub members_cpu_s: f64,
}

/// One home (its own process), [`PUBLISHERS`] members publishing
/// `per_publisher` messages each, one subscriber.
pub async fn forward(per_publisher: u64) -> Result<Forward> {
    const TOPIC: &str = "bench-forward";
    // Limits out of the way: what the home costs is measured, not them.
    let home = HomeProcess::start(Some(u64::MAX / 4), None)?;
    let s = member_of_process(&home).await?;
    let mut sub = s.subscribe_topic(TOPIC)?;
    let mut pubs = Vec::new();
    let mut subs = Vec::new();
    for _ in 0..PUBLISHERS {
        let p = member_of_process(&home).await?;
        subs.push(p.subscribe_topic(TOPIC)?);
        pubs.push(p);
    }
    members_seen(&s, TOPIC, PUBLISHERS + 1).await?;
    for n in pubs.iter().chain([&s]) {
        ensure!(
            n.topics_status()
                .subscribed
                .iter()
                .all(|t| t.home == Some(home.peer)),
            "a member's home is not the measured one"
        );
    }
    let total = per_publisher * PUBLISHERS as u64;
    let started = Instant::now();
    let home_before = home.cpu_s()?;
    let members_before = cpu_s("self")?;
    let mut tasks = tokio::task::JoinSet::new();
    for p in &pubs {
        let p = p.clone();
        let measured = home.peer;
        tasks.spawn(async move {
            use futures::StreamExt;
            let data = vec![7u8; PAYLOAD];
            // As many publishes at once as a member keeps in flight.
            let mut calls = futures::stream::iter(0..per_publisher)
                .map(|_| p.publish(TOPIC, data.clone()))
                .buffer_unordered(PUBLISH_WINDOW);
            while let Some(r) = calls.next().await {
                ensure!(r?.home == measured, "a message was taken by another home");
            }
            anyhow::Ok(())
        });
    }
    let mut last: BTreeMap<PeerId, u64> = BTreeMap::new();
    let mut in_order = true;
    for _ in 0..total {
        let (from, id) = next_message(&mut sub).await?;
        let prev = last.insert(from, id).unwrap_or(0);
        in_order &= id == prev + 1;
    }
    let took = started.elapsed().as_secs_f64();
    let home_cpu_s = home.cpu_s()? - home_before;
    let members_cpu_s = cpu_s("self")? - members_before;
    while let Some(r) = tasks.join_next().await {
        r.context("a publisher task")??;
    }
    in_order &= last.len() == PUBLISHERS && last.values().all(|n| *n == per_publisher);
    drop(subs);
    for n in pubs.into_iter().chain([s]) {
        n.shutdown().await;
    }
    drop(home);
    Ok(Forward {
        msgs_per_s: total as f64 / took,
        s: (took * 1000.0).round() / 1000.0,
        in_order,
        home_cpu_s,
        members_cpu_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_generator_reads_the_frames_the_home_sends() {
        let kp = Keypair::from_secret_bytes([3; 32]);
        let topic = TopicId::from_name("t").unwrap();
        let msg = TopicMessage::sign(&kp, topic, 300, vec![1; PAYLOAD]).unwrap();
        let body = |f: &MemberFrame| wire::encode(f).unwrap()[FRAME_HEADER_LEN..].to_vec();
        let d = body(&MemberFrame::Deliver(msg));
        assert_eq!(d[0], DELIVER);
        assert_eq!(&d[1..33], &topic.0);
        assert_eq!(&d[33..65], kp.peer_id().as_bytes());
        assert_eq!(varint(&mut &d[65..]).unwrap(), 300);
        let p = body(&MemberFrame::Published {
            seq: 129,
            homes: 1,
            members: 2,
        });
        assert_eq!((p[0], varint(&mut &p[1..]).unwrap()), (PUBLISHED, 129));
        let r = body(&MemberFrame::PublishRefused {
            seq: 1,
            kind: "x".into(),
        });
        assert_eq!(r[0], PUBLISH_REFUSED);
        let s = body(&MemberFrame::Subscribed {
            seq_seen: 0,
            members: vec![],
        });
        assert_eq!(s[0], SUBSCRIBED);
        let pr = body(&MemberFrame::Presence {
            member: kp.peer_id(),
            home: kp.peer_id(),
            joined: true,
        });
        assert_eq!(pr[0], PRESENCE);
        assert!(varint(&mut &[0x80u8][..]).is_err(), "a truncated varint");
    }
}
