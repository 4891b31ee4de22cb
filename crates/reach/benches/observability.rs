//! What metrics and the event log cost the data path: the same transfers
//! between two reach nodes on loopback with observability off and on, in
//! one process, in alternating rounds.
//!
//! - **off**: nodes without a data dir (no event log) and no control API.
//! - **on**: each node with a data dir, so it writes its event log
//!   (`events.jsonl`) as every `reach node` does, and its control API
//!   served, with a scraper fetching `/metrics` and `/v1/status` from both
//!   every [`SCRAPE_INTERVAL`] while the round runs (what Prometheus and the
//!   dashboard do). Counters and histograms are always on: they are plain
//!   atomics in both configurations, so "on" adds the event log, the API
//!   and the scrapes.
//!
//! Each round runs off and on back to back (order flipped every round, so
//! drift of the machine hits both alike) and measures wall time and the
//! process's CPU time (user + system, every thread) per iteration. CPU time
//! is what the data path costs and shakes less than throughput on a busy
//! machine. The report gives the median over rounds of the on / off ratios:
//! `cost_pct` is how much more CPU per byte or per message "on" takes.
//! A second "off" pair measured the same way is the control: its ratio to
//! the first (`control_cpu_ratio_off_over_off`) is the noise floor of the
//! run, against which a cost of a few percent must be read.
//! The bench checks that it measured what it says: the on nodes wrote event
//! log lines and every scrape returned reach metrics.
//!
//! Run: `cargo bench -p reach --bench observability` (prints one JSON line,
//! also written to `target/criterion/observability-cost.json`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::{BATCH, BULK_BYTES, IN_FLIGHT, MESSAGE_LEN, ReachPair, criterion_dir, loopback};

/// Alternating rounds; the median of their ratios is reported.
const ROUNDS: usize = 12;
/// Bulk iterations ([`common::BULK_BYTES`] each) per configuration per round.
const BULK_ITERS: usize = 3;
/// Message batches ([`common::BATCH`] each) per configuration per round.
const MESSAGE_ITERS: usize = 3;
/// How often the scraper reads `/metrics` and `/v1/status` of each node:
/// faster than any Prometheus setup, as fast as the dashboard.
const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);

/// The process's CPU time so far (every thread, user + system).
fn cpu_time() -> Duration {
    // SAFETY: getrusage writes into the struct we pass and nothing else.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    assert_eq!(rc, 0, "getrusage failed");
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// A node's control API: address and token.
struct Api {
    addr: SocketAddr,
    token: String,
    _server: reach::api::ApiServer,
}

/// A pair of nodes, observed or not.
struct Pair {
    nodes: ReachPair,
    /// With observability on: both nodes' control APIs, served.
    apis: Vec<Api>,
}

impl Pair {
    async fn new(observed: bool) -> Self {
        let nodes = ReachPair::new(observed).await;
        let mut apis = Vec::new();
        if let Some((da, db)) = &nodes.dirs {
            for (node, dir) in [(&nodes.a, da), (&nodes.b, db)] {
                let server = reach::api::serve(node.clone(), dir.path(), loopback())
                    .await
                    .unwrap();
                let disc: serde_json::Value = serde_json::from_slice(
                    &std::fs::read(reach::api::discovery_path(dir.path())).unwrap(),
                )
                .unwrap();
                apis.push(Api {
                    addr: disc["addr"].as_str().unwrap().parse().unwrap(),
                    token: std::fs::read_to_string(reach::api::token_path(dir.path()))
                        .unwrap()
                        .trim()
                        .to_string(),
                    _server: server,
                });
            }
        }
        Pair { nodes, apis }
    }

    async fn bulk(&self) {
        self.nodes.bulk().await
    }

    async fn messages(&self) {
        self.nodes.messages().await
    }
}

/// One GET with the bearer token; the body if the answer is 200.
async fn get(api: &Api, path: &str) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(api.addr).await.ok()?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        api.addr, api.token
    );
    s.write_all(req.as_bytes()).await.ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.ok()?;
    resp.starts_with("HTTP/1.1 200")
        .then(|| resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()))
        .flatten()
}

/// Scrapes both APIs of `pair` every [`SCRAPE_INTERVAL`] while `active`;
/// counts good scrapes in `ok` and bad ones in `bad`.
async fn scrape_loop(
    pair: Arc<Pair>,
    active: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    bad: Arc<AtomicUsize>,
) {
    let apis = &pair.apis;
    if apis.is_empty() {
        return;
    }
    let mut tick = tokio::time::interval(SCRAPE_INTERVAL);
    loop {
        tick.tick().await;
        if !active.load(Ordering::Relaxed) {
            continue;
        }
        for api in apis {
            let metrics = get(api, "/metrics").await;
            let status = get(api, "/v1/status").await;
            let good = metrics.is_some_and(|m| m.contains("reach_build_info"))
                && status.is_some_and(|s| s.contains("peer_id"));
            let counter = if good { &ok } else { &bad };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Wall and CPU time per iteration of `iters` runs of `f`.
fn measure<F: Future<Output = ()>>(
    rt: &tokio::runtime::Runtime,
    iters: usize,
    mut f: impl FnMut() -> F,
) -> (f64, f64) {
    let (w0, c0) = (Instant::now(), cpu_time());
    for _ in 0..iters {
        rt.block_on(f());
    }
    let (wall, cpu) = (w0.elapsed(), cpu_time() - c0);
    (
        wall.as_secs_f64() / iters as f64,
        cpu.as_secs_f64() / iters as f64,
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Ratios of one round: on / off (bulk wall, bulk cpu, msgs wall, msgs
/// cpu), then the control off2 / off (bulk cpu, msgs cpu).
type Ratios = [f64; 6];

fn main() {
    // `cargo bench` passes `--bench`. Without it this is `cargo test
    // --all-targets` running every target once: one short round (messages
    // only, in a debug build) checks that the bench still works.
    let measuring = std::env::args().any(|a| a == "--bench");
    let (rounds_wanted, bulk_iters, message_iters) = if measuring {
        (ROUNDS, BULK_ITERS, MESSAGE_ITERS)
    } else {
        (1, 0, 1)
    };
    let rt = common::runtime();
    let active = Arc::new(AtomicBool::new(false));
    let (ok, bad) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut rounds: Vec<Ratios> = Vec::new();
    let mut lines = 0;
    for round in 0..rounds_wanted {
        // Fresh pairs every round: two connections differ a little (paths
        // through the kernel, congestion state) and that difference must
        // average out over rounds rather than masquerade as a cost.
        let off = Arc::new(rt.block_on(Pair::new(false)));
        let on = Arc::new(rt.block_on(Pair::new(true)));
        // The control: a second "off" pair, measured like the others. Its
        // ratio to the first says how large the noise is.
        let off2 = Arc::new(rt.block_on(Pair::new(false)));
        let scraper = rt.spawn(scrape_loop(
            on.clone(),
            active.clone(),
            ok.clone(),
            bad.clone(),
        ));
        for p in [&off, &on, &off2] {
            if measuring {
                rt.block_on(p.bulk());
            }
            rt.block_on(p.messages());
        }
        let run = |p: &Arc<Pair>, observed: bool| {
            active.store(observed, Ordering::Relaxed);
            let bulk = measure(&rt, bulk_iters, || p.bulk());
            let msgs = measure(&rt, message_iters, || p.messages());
            active.store(false, Ordering::Relaxed);
            (bulk, msgs)
        };
        let (o, n, c) = if round % 2 == 0 {
            let o = run(&off, false);
            let n = run(&on, true);
            (o, n, run(&off2, false))
        } else {
            let c = run(&off2, false);
            let n = run(&on, true);
            (run(&off, false), n, c)
        };
        rounds.push([
            n.0.0 / o.0.0,
            n.0.1 / o.0.1,
            n.1.0 / o.1.0,
            n.1.1 / o.1.1,
            c.0.1 / o.0.1,
            c.1.1 / o.1.1,
        ]);
        if !measuring {
            // Too short a round for the 1 s scraper: one scrape by hand.
            for api in &on.apis {
                let good = rt
                    .block_on(get(api, "/metrics"))
                    .is_some_and(|m| m.contains("reach_build_info"));
                let counter = if good { &ok } else { &bad };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
        scraper.abort();
        lines += on.nodes.logged_lines();
        rt.block_on(async {
            for p in [&off, &on, &off2] {
                p.nodes.shutdown().await;
            }
        });
    }
    let col = |i: usize| median(rounds.iter().map(|r| r[i]).collect());
    let (scrapes, failed) = (ok.load(Ordering::Relaxed), bad.load(Ordering::Relaxed));
    assert!(lines > 0, "the observed pair wrote no event log");
    assert!(
        scrapes > 0,
        "no scrape succeeded: the on rounds were not observed"
    );
    assert_eq!(failed, 0, "a scrape failed");
    let pct = |r: f64| (r - 1.0) * 100.0;
    let report = serde_json::json!({
        "rounds": rounds_wanted,
        "bulk": {
            "bytes_per_iteration": BULK_BYTES,
            "cpu_ratio_on_over_off": col(1),
            "wall_ratio_on_over_off": col(0),
            "cost_pct": pct(col(1)),
            "control_cpu_ratio_off_over_off": col(4),
        },
        "messages": {
            "per_iteration": BATCH,
            "bytes": MESSAGE_LEN,
            "in_flight": IN_FLIGHT,
            "cpu_ratio_on_over_off": col(3),
            "wall_ratio_on_over_off": col(2),
            "cost_pct": pct(col(3)),
            "control_cpu_ratio_off_over_off": col(5),
        },
        "target_cost_pct_max": 3.0,
        "event_log_lines": lines,
        "scrapes": scrapes,
    });
    println!("{report}");
    let dir = criterion_dir();
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("observability-cost.json"), report.to_string());
}
