//! `reach demo`: a local reach network on loopback.
//!
//! Starts N nodes in this process, each on its own UDP socket on 127.0.0.1.
//! Phase 1: every node joins the DHT through node 0 and publishes its
//! endpoint record.
//! Phase 2: every node sends M messages, each to a different peer, dialing
//! it by public key alone: the address comes from the DHT (a real, mutually
//! authenticated QUIC handshake per pair).
//! Then a few newcomers join through node 0 and reach nodes by key the
//! long way, as in a network too large to know: each asks the DHT afresh
//! for the target's signed endpoint record and dials what it lists.
//! Phase 3: every node opens a stream to its neighbour (again by key),
//! writes a block and checks that the neighbour echoes it back intact.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reach::{Event, Node, PeerId};
use serde::Serialize;
use tokio::task::JoinSet;

use crate::cli::DemoArgs;

/// Bytes each node writes on its demo stream.
const STREAM_BLOCK: usize = 256 * 1024;
/// Nodes that join at once.
const JOIN_WAVE: usize = 25;
/// Nodes that join last (as DHT clients) and reach existing nodes by key
/// the long way. In a network this small every node soon knows every
/// other, so a plain dial reuses what it knows; a newcomer asks the DHT
/// afresh for each target's endpoint record, as a dial to an unknown peer
/// in a large network does, then dials it.
const NEWCOMERS: usize = 3;
/// Existing nodes each newcomer dials by key (and sends a message).
const NEWCOMER_DIALS: usize = 3;
/// The demo gives up (and says so) if it has not finished by then.
const DEMO_DEADLINE: Duration = Duration::from_secs(120);

/// The machine-readable summary printed by `reach demo --json`.
#[derive(Debug, Serialize)]
pub struct DemoReport {
    pub nodes: u32,
    /// Time until every node had joined the DHT and published its record.
    pub join_ms: u64,
    /// Mean DHT routing-table size after joining.
    pub routing_table_mean: f64,
    /// Dials that needed a DHT lookup (the others reused a connection the
    /// DHT traffic had already opened).
    pub dht_resolutions: u64,
    /// Of those, the newcomers' fresh lookups of endpoint records.
    pub newcomer_resolutions: u64,
    /// Median time a newcomer's reach by key took: the fresh lookup of the
    /// endpoint record and the handshake.
    pub newcomer_connect_ms_p50: f64,
    pub connections: u64,
    /// Median time `connect` took (a fresh handshake, or reuse of one).
    pub connect_ms_p50: f64,
    pub messages_sent: u64,
    pub messages_delivered: u64,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    pub streams_opened: u64,
    pub streams_verified: u64,
    pub stream_bytes: u64,
    /// Durable messages committed for a node while it was offline.
    pub durable_sent: u64,
    /// Of those, handed to it once it was back.
    pub durable_delivered: u64,
    /// Each exactly once, in the order sent.
    pub durable_in_order_once: bool,
    /// From its restart to the last of them.
    pub durable_after_return_ms: u64,
    pub wall_ms: u64,
}

pub async fn run(args: DemoArgs) -> Result<()> {
    if !args.loopback {
        match reach_lab::story::available() {
            Ok(()) => return story(args.json).await,
            Err(why) => eprintln!(
                "reach demo: not telling the NAT story in a lab ({why}); running the loopback demo"
            ),
        }
    }
    loopback(args).await
}

/// The NAT lab story (as root with the lab's tools): see
/// [`reach_lab::story`].
async fn story(json: bool) -> Result<()> {
    let quiet = |_: &str| {};
    let loud = |line: &str| eprintln!("{line}");
    let progress: &dyn Fn(&str) = if json { &quiet } else { &loud };
    let report = tokio::time::timeout(DEMO_DEADLINE, reach_lab::story::run(progress))
        .await
        .with_context(|| format!("the lab story did not finish within {DEMO_DEADLINE:?}"))??;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "reach demo: {} in {} ms",
            if report.as_told {
                "dialed by key through a port mapping, a relay and a punch, and from a UDP-blocked network"
            } else {
                "the story did NOT go as told (see above)"
            },
            report.wall_ms
        );
    }
    if !report.as_told {
        bail!("the lab story did not go as told");
    }
    Ok(())
}

async fn loopback(args: DemoArgs) -> Result<()> {
    let report = tokio::time::timeout(DEMO_DEADLINE, simulate(&args))
        .await
        .with_context(|| format!("demo did not finish within {DEMO_DEADLINE:?}"))??;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_summary(&report);
    }
    if report.messages_delivered != report.messages_sent
        || report.streams_verified != report.streams_opened
    {
        bail!("the demo lost data: see the summary above");
    }
    Ok(())
}

/// Which peers node `i` of `n` sends its `m` messages to: distinct peers,
/// spread over the ring so that the network is well mixed.
fn targets(i: usize, n: usize, m: usize) -> Vec<usize> {
    let want = m.min(n - 1);
    let strided = (1..n).map(|k| (i + k * 7) % n);
    // Successors cover every other node, so `want` is always reached.
    let successors = (1..n).map(|k| (i + k) % n);
    let mut out = Vec::with_capacity(want);
    for t in strided.chain(successors) {
        if out.len() == want {
            break;
        }
        if t != i && !out.contains(&t) {
            out.push(t);
        }
    }
    out
}

async fn simulate(args: &DemoArgs) -> Result<DemoReport> {
    let n = args.nodes as usize;
    let m = args.messages as usize;
    let progress = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
    };
    progress.set_style(
        ProgressStyle::with_template("{spinner} {msg:<28} [{bar:30}] {pos}/{len}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );

    let started = Instant::now();
    progress.set_message("starting nodes, joining the DHT");
    progress.set_length(n as u64);
    // Nodes join in waves of JOIN_WAVE, each through a random node that has
    // already joined: a real network grows like that, and a 2-core machine
    // does not drown in a few hundred simultaneous handshakes.
    let mut nodes: Vec<Node> = Vec::with_capacity(n);
    let mut pick = 0x9E37_79B9_7F4A_7C15u64;
    while nodes.len() < n {
        let wave_start = nodes.len();
        let wave_end = (wave_start + JOIN_WAVE).min(n);
        for _ in wave_start..wave_end {
            let mut builder = Node::builder().bind("127.0.0.1:0".parse()?);
            if wave_start > 0 {
                pick ^= pick << 13;
                pick ^= pick >> 7;
                pick ^= pick << 17;
                let via = &nodes[(pick % wave_start as u64) as usize];
                builder = builder.bootstrap([via.local_addr()]);
            } else if !nodes.is_empty() {
                builder = builder.bootstrap([nodes[0].local_addr()]);
            }
            let node = builder.spawn().await.context("starting a demo node")?;
            nodes.push(node);
        }
        for node in &nodes[wave_start..wave_end] {
            node.joined().await;
            progress.inc(1);
        }
    }
    let join_ms = started.elapsed().as_millis() as u64;
    let routing_table_mean = nodes
        .iter()
        .map(|n| n.routing_snapshot().size as f64)
        .sum::<f64>()
        / n as f64;
    // Receivers: count messages (with latency) and echo streams.
    let plan: Vec<Vec<usize>> = (0..n).map(|i| targets(i, n, m)).collect();
    // Newcomers: fresh nodes that know only node 0 and dial at once, by
    // key, nodes they have never met (before their own join has met
    // anyone): each dial looks the target's endpoint record up in the DHT
    // through node 0, as a new node in a large network does. They are DHT
    // clients, so no joined node learns of them.
    let newcomer_plan: Vec<Vec<usize>> = (0..NEWCOMERS)
        .map(|k| {
            (0..NEWCOMER_DIALS.min(n - 1))
                .map(|j| 1 + (k * NEWCOMER_DIALS + j) % (n - 1))
                .collect()
        })
        .collect();
    let mut expected = vec![0usize; n];
    for t in plan.iter().chain(&newcomer_plan).flatten() {
        expected[*t] += 1;
    }
    let mut receivers = JoinSet::new();
    for (i, node) in nodes.iter().enumerate() {
        let node = node.clone();
        let want = expected[i];
        let progress = progress.clone();
        receivers.spawn(async move { receive(node, want, 1, started, progress).await });
    }

    progress.set_message("sending messages");
    progress.set_position(0);
    progress.set_length(plan.iter().map(Vec::len).sum::<usize>() as u64);
    let mut senders = JoinSet::new();
    for (i, tos) in plan.iter().enumerate() {
        for &t in tos {
            let from = nodes[i].clone();
            let to = nodes[t].clone();
            senders.spawn(async move {
                let dial_start = Instant::now();
                // By key alone: the address comes from the DHT.
                from.connect(to.peer_id(), []).await?;
                let dial_ms = dial_start.elapsed().as_secs_f64() * 1000.0;
                let sent_at = started.elapsed().as_micros() as u64;
                let body = format!("{sent_at} hello from node {i} to node {t}");
                from.send(to.peer_id(), body.into_bytes()).await?;
                anyhow::Ok(dial_ms)
            });
        }
    }
    let mut messages_sent = 0u64;
    let mut dial_ms = Vec::new();
    while let Some(r) = senders.join_next().await {
        dial_ms.push(
            r.context("sender task")?
                .context("sending a demo message")?,
        );
        messages_sent += 1;
    }

    progress.set_message("newcomers dial by key");
    let mut newcomers = Vec::with_capacity(NEWCOMERS);
    for _ in 0..NEWCOMERS {
        newcomers.push(
            Node::builder()
                .bind("127.0.0.1:0".parse()?)
                .dht_mode(reach::DhtMode::Client)
                .bootstrap([nodes[0].local_addr()])
                .spawn()
                .await
                .context("starting a newcomer")?,
        );
    }
    for nc in &newcomers {
        nc.joined().await;
    }
    let mut newcomer_ms = Vec::new();
    for (k, tos) in newcomer_plan.iter().enumerate() {
        for &t in tos {
            let from = newcomers[k].clone();
            let to = nodes[t].peer_id();
            let dial_start = Instant::now();
            // The signed endpoint record, asked of the DHT afresh (not
            // from a cache), then a dial of the addresses it lists.
            let record = from
                .lookup(to)
                .await
                .context("a newcomer's lookup of an endpoint record")?;
            let addrs: Vec<std::net::SocketAddr> = record.iter().map(|a| a.addr).collect();
            from.connect(to, addrs)
                .await
                .context("a newcomer's dial by key")?;
            newcomer_ms.push(dial_start.elapsed().as_secs_f64() * 1000.0);
            let sent_at = started.elapsed().as_micros() as u64;
            let body = format!("{sent_at} hello from newcomer {k} to node {t}");
            from.send(to, body.into_bytes()).await?;
            messages_sent += 1;
        }
    }
    let newcomer_resolutions: u64 = newcomers.iter().map(|n| n.stats().dht.resolutions).sum();

    progress.set_message("streaming blocks");
    let mut streams = JoinSet::new();
    for i in 0..n {
        let from = nodes[i].clone();
        let to = nodes[(i + 1) % n].peer_id();
        let block: Vec<u8> = (0..STREAM_BLOCK).map(|b| (b * 31 + i) as u8).collect();
        streams.spawn(async move { stream_echo(from, to, block).await });
    }
    let mut streams_verified = 0u64;
    while let Some(r) = streams.join_next().await {
        if r.context("stream task")?? {
            streams_verified += 1;
        }
    }

    let mut latencies = Vec::new();
    while let Some(r) = receivers.join_next().await {
        latencies.extend(r.context("receiver task")??);
    }
    progress.set_message("durable messages to an offline node");
    let durable = durable_story(&nodes[0]).await?;
    let wall_ms = started.elapsed().as_millis() as u64;
    progress.finish_and_clear();

    let connections: u64 = nodes
        .iter()
        .map(|n| n.stats().core.connections_outbound)
        .sum();
    let dht_resolutions: u64 = nodes
        .iter()
        .chain(&newcomers)
        .map(|n| n.stats().dht.resolutions)
        .sum();
    futures_shutdown(&nodes).await;
    futures_shutdown(&newcomers).await;
    dial_ms.sort_by(f64::total_cmp);
    newcomer_ms.sort_by(f64::total_cmp);
    latencies.sort_by(f64::total_cmp);
    Ok(DemoReport {
        nodes: args.nodes,
        join_ms,
        routing_table_mean: (routing_table_mean * 10.0).round() / 10.0,
        dht_resolutions,
        newcomer_resolutions,
        newcomer_connect_ms_p50: percentile(&newcomer_ms, 0.50),
        connections,
        connect_ms_p50: percentile(&dial_ms, 0.50),
        messages_sent,
        messages_delivered: latencies.len() as u64,
        latency_ms_p50: percentile(&latencies, 0.50),
        latency_ms_p99: percentile(&latencies, 0.99),
        streams_opened: n as u64,
        streams_verified,
        stream_bytes: (n * STREAM_BLOCK) as u64,
        durable_sent: DURABLE_MESSAGES as u64,
        durable_delivered: durable.delivered,
        durable_in_order_once: durable.in_order_once,
        durable_after_return_ms: durable.after_return_ms,
        wall_ms,
    })
}

/// Durable messages the demo sends to a node while it is offline.
const DURABLE_MESSAGES: usize = 20;

/// What the durable part of the demo saw.
struct DurableSeen {
    delivered: u64,
    in_order_once: bool,
    after_return_ms: u64,
}

/// A sender and a receiver with data dirs join through `via`; the receiver
/// stops; the sender commits [`DURABLE_MESSAGES`] durable messages for it;
/// the receiver starts again on its data dir, and they arrive, once and in
/// order.
async fn durable_story(via: &Node) -> Result<DurableSeen> {
    let root = std::env::temp_dir().join(format!(
        "reach-demo-{}-{}",
        std::process::id(),
        via.peer_id()
    ));
    let result = durable_story_in(via, &root).await;
    let _ = std::fs::remove_dir_all(&root);
    result
}

async fn durable_story_in(via: &Node, root: &std::path::Path) -> Result<DurableSeen> {
    let start = |name: &str| {
        Node::builder()
            .bind("127.0.0.1:0".parse().expect("a loopback address"))
            .data_dir(root.join(name))
            .bootstrap([via.local_addr()])
            .spawn()
    };
    let sender = start("sender").await.context("starting the sender")?;
    let receiver = start("receiver").await.context("starting the receiver")?;
    sender.joined().await;
    receiver.joined().await;
    let to = receiver.peer_id();
    receiver.shutdown().await;
    drop(receiver);
    for i in 0..DURABLE_MESSAGES {
        sender
            .send_durable(to, format!("durable {i}"), reach::Delivery::Critical, None)
            .await
            .context("committing a durable message")?;
    }
    let back = Instant::now();
    let receiver = start("receiver").await.context("restarting the receiver")?;
    let mut seqs = Vec::new();
    while seqs.len() < DURABLE_MESSAGES {
        match tokio::time::timeout(DEMO_DEADLINE, receiver.next_event()).await {
            Ok(Some(Event::Durable(m))) => {
                seqs.push(m.seq);
                receiver.durable_done(&m).await?;
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    let after_return_ms = back.elapsed().as_millis() as u64;
    let in_order_once = seqs == (1..=DURABLE_MESSAGES as u64).collect::<Vec<_>>();
    sender.shutdown().await;
    receiver.shutdown().await;
    Ok(DurableSeen {
        delivered: seqs.len() as u64,
        in_order_once,
        after_return_ms,
    })
}

/// Shuts all nodes down at once (each waits briefly for its peers to
/// acknowledge the close).
async fn futures_shutdown(nodes: &[Node]) {
    let mut set = JoinSet::new();
    for node in nodes {
        let node = node.clone();
        set.spawn(async move { node.shutdown().await });
    }
    while set.join_next().await.is_some() {}
}

/// Collects `messages` messages and echoes `streams` streams; returns the
/// message latencies in milliseconds.
async fn receive(
    node: Node,
    messages: usize,
    streams: usize,
    started: Instant,
    progress: ProgressBar,
) -> Result<Vec<f64>> {
    let mut latencies = Vec::with_capacity(messages);
    let mut echoed = 0;
    let mut echoes = JoinSet::new();
    while latencies.len() < messages || echoed < streams {
        let Some(event) = node.next_event().await else {
            bail!("node stopped before the demo finished");
        };
        match event {
            Event::Message { data, .. } => {
                let text = String::from_utf8_lossy(&data);
                let sent_at: u64 = text
                    .split(' ')
                    .next()
                    .and_then(|t| t.parse().ok())
                    .context("demo message without a timestamp")?;
                let now = started.elapsed().as_micros() as u64;
                latencies.push(now.saturating_sub(sent_at) as f64 / 1000.0);
                progress.inc(1);
            }
            Event::Stream(mut s) => {
                echoed += 1;
                echoes.spawn(async move {
                    let data = s.recv.read_to_end(STREAM_BLOCK).await?;
                    s.send.write_all(&data).await?;
                    s.send.finish()?;
                    s.send.stopped().await?;
                    anyhow::Ok(())
                });
            }
            _ => {}
        }
    }
    while let Some(r) = echoes.join_next().await {
        r.context("echo task")??;
    }
    Ok(latencies)
}

/// Writes `block` on a new stream to `to` and checks the echo.
async fn stream_echo(from: Node, to: PeerId, block: Vec<u8>) -> Result<bool> {
    let mut s = from.open_stream(to).await?;
    s.send.write_all(&block).await?;
    s.send.finish()?;
    let back = s.recv.read_to_end(STREAM_BLOCK).await?;
    Ok(back == block)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    (sorted[idx.min(sorted.len() - 1)] * 1000.0).round() / 1000.0
}

fn print_summary(r: &DemoReport) {
    let ok = |good: bool| if good { "ok" } else { "LOST DATA" };
    println!(
        "reach demo: {} nodes on 127.0.0.1, one UDP socket each",
        r.nodes
    );
    println!(
        "  dht          all joined in {} ms, {:.1} contacts per routing table",
        r.join_ms, r.routing_table_mean
    );
    println!(
        "  dialing      by public key alone: {} DHT resolutions, {} QUIC handshakes, connect p50 {:.2} ms",
        r.dht_resolutions, r.connections, r.connect_ms_p50
    );
    println!(
        "  newcomers    {NEWCOMERS} joined last, reached {NEWCOMER_DIALS} nodes each by key: {} fresh DHT lookups of signed endpoint records, lookup + connect p50 {:.2} ms",
        r.newcomer_resolutions, r.newcomer_connect_ms_p50
    );
    println!(
        "  messages     {}/{} delivered  {}   latency p50 {:.2} ms, p99 {:.2} ms",
        r.messages_delivered,
        r.messages_sent,
        ok(r.messages_delivered == r.messages_sent),
        r.latency_ms_p50,
        r.latency_ms_p99
    );
    println!(
        "  streams      {}/{} echoed intact ({} KiB each way)  {}",
        r.streams_verified,
        r.streams_opened,
        STREAM_BLOCK / 1024,
        ok(r.streams_verified == r.streams_opened)
    );
    println!(
        "  durable      {}/{} committed for a node while it was offline, delivered once and in order  {}   {} ms after it came back",
        r.durable_delivered,
        r.durable_sent,
        ok(r.durable_delivered == r.durable_sent && r.durable_in_order_once),
        r.durable_after_return_ms
    );
    println!("  wall time    {} ms", r.wall_ms);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_distinct_and_never_self() {
        for n in [2usize, 3, 7, 14, 20, 21, 49, 100] {
            for m in [1usize, 5, 100] {
                for i in 0..n {
                    let t = targets(i, n, m);
                    assert_eq!(t.len(), m.min(n - 1), "n={n} m={m} i={i}");
                    assert!(!t.contains(&i));
                    let mut d = t.clone();
                    d.sort();
                    d.dedup();
                    assert_eq!(d.len(), t.len());
                }
            }
        }
    }

    #[test]
    fn percentile_picks_ranks() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
