//! Iterative Kademlia lookups across a simulated network.
//!
//! The network is [`dhtnet`](super::dhtnet)'s: real identities, routing
//! tables, stores, joins and maintenance ([`Maintenance`]'s ticks every
//! [`MAINTENANCE_TICK`], stopping at the end of the measurement window);
//! lookups are reach-proto's real [`Lookup`] state machine, answered with
//! reach-proto's `server::answer`, as the runtime does.
//!
//! A run has two phases:
//!
//! 1. **Setup.** The network's nodes join in overlapping waves over
//!    [`SETUP_SPAN`] (see [`dhtnet`](super::dhtnet)). Joins are counted in
//!    [`LookupReport::join_lookups`], maintenance refreshes in
//!    [`LookupReport::maintenance_lookups`].
//! 2. **Measurement.** `lookups` lookups start at random times over
//!    `window`, each from a random live node for the key of another random
//!    live node ("live" = joined and not left). With churn `C`, `C * nodes`
//!    random live nodes leave silently (their entries stay in others' tables
//!    until queries to them fail) and as many fresh nodes run the full join
//!    procedure, at random times over the same window.
//!
//! A lookup succeeds if its result ([`Lookup::closest`]) holds the target
//! node. Its closest-found share is the overlap of that result with the true
//! k closest nodes alive when it finished (brute force, requester excluded).
//! A lookup whose requester or target left while it ran cannot be judged
//! fairly either way; it is reported apart ([`LookupReport::requester_left`],
//! [`LookupReport::target_left`]) and `success_rate_all` counts it as a
//! failure.

use std::time::{Duration, Instant};

use reach_proto::dht::Distance;
use reach_proto::dht::lookup::Lookup;
#[cfg(doc)]
use reach_proto::dht::maintenance::{MAINTENANCE_TICK, Maintenance};
use serde::Serialize;

use super::dhtnet::{Active, Ev, Net, Purpose, Query, Scenario, index_of};
pub use super::dhtnet::{MAX_JOIN_ATTEMPTS, SETUP_SPAN};
use crate::net::LinkModel;
use crate::stats::{mean, peak_rss_mib, quantile, ratio, round3};

/// Largest `nodes` accepted. Churn adds at most as many fresh nodes again,
/// and every node needs a distinct `10.x.y.z` address (2^24 - 2 of them).
pub const MAX_NODES: usize = 4_000_000;
/// Largest number of measured lookups accepted.
pub const MAX_LOOKUPS: usize = 10_000_000;
/// Default virtual time over which measured lookups and churn are spread.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);
/// Longest measurement window accepted.
pub const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Jitter of every link, as a fraction of its latency.
pub const LINK_JITTER: f64 = 0.1;
/// Parameters of a lookup run.
#[derive(Debug, Clone)]
pub struct LookupParams {
    pub nodes: usize,
    pub lookups: usize,
    pub seed: u64,
    pub link: LinkModel,
    /// Fraction of nodes replaced during the measured phase (0..=1).
    pub churn: f64,
    /// Virtual time over which measured lookups and churn are spread.
    pub window: Duration,
}

/// The JSON report of a lookup run (everything here depends only on the
/// parameters, seed included).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LookupReport {
    pub scenario: &'static str,
    pub nodes: usize,
    pub lookups: usize,
    pub seed: u64,
    pub latency_ms: f64,
    pub loss: f64,
    pub churn: f64,
    pub window_s: f64,
    /// Lookups judged: requester and target both still live when it ended.
    pub judged: usize,
    /// Lookups whose requester left while they ran (abandoned).
    pub requester_left: usize,
    /// Lookups whose target left while they ran.
    pub target_left: usize,
    /// Lookups never started (fewer than two live nodes) or still running
    /// at the end (cannot happen: every query times out).
    pub not_run: usize,
    /// Judged lookups whose result held the target.
    pub successes: usize,
    /// `successes / judged`.
    pub success_rate: f64,
    /// `successes / lookups`: lookups not judged count as failures.
    pub success_rate_all: f64,
    /// Mean share of the true k closest live nodes in the result.
    pub closest_found_rate: f64,
    pub hops_p50: f64,
    pub hops_p99: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    /// Requests plus responses sent (lost ones included) per judged lookup.
    pub msgs_per_lookup: f64,
    /// Timed-out queries per judged lookup.
    pub timeouts_per_lookup: f64,
    /// Routing-table entries per live node at the end.
    pub table_size_mean: f64,
    /// Allocated buckets per live node at the end.
    pub buckets_mean: f64,
    /// Lookups run by joins (self-lookups and bucket refreshes).
    pub join_lookups: usize,
    /// Bucket refreshes run by maintenance ticks of joined nodes.
    pub maintenance_lookups: usize,
    /// Joins that gave up after [`MAX_JOIN_ATTEMPTS`] bootstraps.
    pub join_failures: usize,
    /// Nodes that left / fresh nodes that joined during measurement.
    pub churn_left: usize,
    pub churn_joined: usize,
    /// Virtual time when the setup phase ended, and at the end of the run.
    pub setup_virtual_s: f64,
    pub virtual_s: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Running,
    RequesterLeft,
    TargetLeft,
    Judged {
        success: bool,
        /// Result ∩ truth, and the size of the truth.
        found: usize,
        truth: usize,
        hops: u32,
        latency: Duration,
        timeouts: u32,
    },
}

struct Measured {
    from: usize,
    target: usize,
    started: Duration,
    msgs: u64,
    verdict: Verdict,
}

/// The lookup scenario's state on top of the network.
struct LookupSim<'a> {
    p: &'a LookupParams,
    measured: Vec<Measured>,
}

/// Measured lookup number `idx` starts.
struct MeasureStart {
    idx: usize,
}

impl Scenario for LookupSim<'_> {
    type Event = MeasureStart;

    fn setup_done(net: &mut Net<Self>) {
        let p = net.s.p;
        net.horizon = Some(net.q.now() + p.window);
        let window_us = p.window.as_micros().max(1) as u64;
        for idx in 0..p.lookups {
            let at = Duration::from_micros(net.rng.below(window_us));
            net.q.schedule(at, Ev::Scenario(MeasureStart { idx }));
        }
        let churners = net.nodes.len() - p.nodes;
        for i in 0..churners {
            let at = Duration::from_micros(net.rng.below(window_us));
            net.q.schedule(at, Ev::Leave);
            let at = Duration::from_micros(net.rng.below(window_us));
            net.q.schedule(at, Ev::JoinStart { node: p.nodes + i });
        }
        net.s.measured = (0..p.lookups)
            .map(|_| Measured {
                from: 0,
                target: 0,
                started: Duration::ZERO,
                msgs: 0,
                verdict: Verdict::Running,
            })
            .collect();
    }

    fn lookup_done(net: &mut Net<Self>, idx: usize, done: Box<Active>) {
        let now = net.q.now();
        judge(net, idx, &done.lookup, now);
    }

    fn lookup_abandoned(net: &mut Net<Self>, idx: usize) {
        net.s.measured[idx].verdict = Verdict::RequesterLeft;
    }

    fn msg_sent(&mut self, idx: usize) {
        if let Some(m) = self.measured.get_mut(idx) {
            m.msgs += 1;
        }
    }

    fn on_event(net: &mut Net<Self>, MeasureStart { idx }: MeasureStart) {
        let now = net.q.now();
        let Some(from) = net.random_live(None) else {
            return;
        };
        let Some(target) = net.random_live(Some(from)) else {
            return;
        };
        net.s.measured[idx] = Measured {
            from,
            target,
            started: now,
            msgs: 0,
            verdict: Verdict::Running,
        };
        let key = net.nodes[target].key;
        net.start_lookup(from, key, Purpose::Scenario(idx), Query::FindNode);
    }
}

fn judge(net: &mut Net<LookupSim<'_>>, idx: usize, lookup: &Lookup, now: Duration) {
    let m = &net.s.measured[idx];
    let (from, target, started) = (m.from, m.target, m.started);
    if !net.nodes[target].alive {
        net.s.measured[idx].verdict = Verdict::TargetLeft;
        return;
    }
    let key = lookup.target();
    let result = lookup.closest();
    let target_peer = net.nodes[target].peer;
    let success = result.iter().any(|c| c.peer == target_peer);
    // The true k closest nodes alive now, requester excluded.
    let mut all: Vec<(Distance, usize)> = net
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, n)| n.alive && *i != from)
        .map(|(i, n)| (n.key.distance(&key), i))
        .collect();
    let k = net.lcfg.k;
    if all.len() > k {
        all.select_nth_unstable(k);
        all.truncate(k);
    }
    let found = result
        .iter()
        .filter(|c| index_of(&c.addr).is_some_and(|i| all.iter().any(|&(_, t)| t == i)))
        .count();
    let stats = lookup.stats();
    net.s.measured[idx].verdict = Verdict::Judged {
        success,
        found,
        truth: all.len(),
        hops: stats.hops,
        latency: now.saturating_sub(started),
        timeouts: stats.failures,
    };
}

fn report(net: Net<LookupSim<'_>>) -> LookupReport {
    let p = net.s.p;
    let mut judged = 0;
    let mut requester_left = 0;
    let mut target_left = 0;
    let mut not_run = 0;
    let mut successes = 0;
    let mut found_sum = 0.0;
    let mut hops = Vec::new();
    let mut latencies = Vec::new();
    let mut msgs = 0u64;
    let mut timeouts = 0u64;
    for m in &net.s.measured {
        match m.verdict {
            Verdict::Running => not_run += 1,
            Verdict::RequesterLeft => requester_left += 1,
            Verdict::TargetLeft => target_left += 1,
            Verdict::Judged {
                success,
                found,
                truth,
                hops: h,
                latency,
                timeouts: t,
            } => {
                judged += 1;
                successes += usize::from(success);
                found_sum += ratio(found, truth.min(net.lcfg.k));
                hops.push(f64::from(h));
                latencies.push(latency.as_secs_f64() * 1000.0);
                msgs += m.msgs;
                timeouts += u64::from(t);
            }
        }
    }
    let live: Vec<_> = net.live.iter().map(|&i| &net.nodes[i]).collect();
    let table_size_mean = mean(live.iter().map(|n| n.table.len() as f64));
    let buckets_mean = mean(live.iter().map(|n| n.table.bucket_count() as f64));
    LookupReport {
        scenario: "lookup",
        nodes: p.nodes,
        lookups: p.lookups,
        seed: p.seed,
        latency_ms: p.link.latency.as_secs_f64() * 1000.0,
        loss: p.link.loss,
        churn: p.churn,
        window_s: p.window.as_secs_f64(),
        judged,
        requester_left,
        target_left,
        not_run,
        successes,
        success_rate: round3(ratio(successes, judged)),
        success_rate_all: round3(ratio(successes, p.lookups)),
        closest_found_rate: round3(if judged == 0 {
            0.0
        } else {
            found_sum / judged as f64
        }),
        hops_p50: quantile(&mut hops, 0.5),
        hops_p99: quantile(&mut hops, 0.99),
        latency_ms_p50: round3(quantile(&mut latencies, 0.5)),
        latency_ms_p99: round3(quantile(&mut latencies, 0.99)),
        msgs_per_lookup: round3(msgs as f64 / judged.max(1) as f64),
        timeouts_per_lookup: round3(timeouts as f64 / judged.max(1) as f64),
        table_size_mean: round3(table_size_mean),
        buckets_mean: round3(buckets_mean),
        join_lookups: net.join_lookups,
        maintenance_lookups: net.maintenance_lookups,
        join_failures: net.join_failures,
        churn_left: net.churn_left,
        churn_joined: net.churn_joined,
        setup_virtual_s: round3(net.setup_end.unwrap_or_default().as_secs_f64()),
        virtual_s: round3(net.last_active.as_secs_f64()),
    }
}

/// Fresh nodes joining during measurement: `churn * nodes`, rounded
/// (`churn` already clamped to 0..=1).
fn churners(p: &LookupParams) -> usize {
    (p.churn * p.nodes as f64).round() as usize
}

/// Runs the scenario. Returns the report, the real time it took and the
/// real time of the setup phase. Parameters beyond the limits are clamped
/// to them (the report shows what ran).
pub fn run(p: &LookupParams) -> (LookupReport, Duration, Duration) {
    let started = Instant::now();
    let p = &LookupParams {
        nodes: p.nodes.min(MAX_NODES),
        lookups: p.lookups.min(MAX_LOOKUPS),
        churn: if p.churn.is_nan() {
            0.0
        } else {
            p.churn.clamp(0.0, 1.0)
        },
        window: p.window.min(MAX_WINDOW),
        ..p.clone()
    };
    let total = p.nodes + churners(p);
    let s = LookupSim {
        p,
        measured: Vec::new(),
    };
    let mut net = Net::new(s, p.seed, p.link, p.nodes, total);
    net.schedule_setup();
    let mut setup_wall = None;
    net.run(|setup_over| {
        if setup_wall.is_none() && setup_over {
            setup_wall = Some(started.elapsed());
        }
    });
    let setup_wall = setup_wall.unwrap_or_else(|| started.elapsed());
    (report(net), started.elapsed(), setup_wall)
}

/// The report plus real-time figures that vary between runs.
#[derive(Debug, Serialize)]
pub struct LookupOutput {
    #[serde(flatten)]
    pub report: LookupReport,
    pub setup_s: f64,
    pub wall_s: f64,
    pub peak_rss_mib: f64,
}

/// Runs and adds the real-time figures.
pub fn run_with_wall(p: &LookupParams) -> LookupOutput {
    let (report, wall, setup) = run(p);
    LookupOutput {
        report,
        setup_s: round3(setup.as_secs_f64()),
        wall_s: round3(wall.as_secs_f64()),
        peak_rss_mib: round3(peak_rss_mib()),
    }
}

/// The link model of the CLI: `latency` one-way, [`LINK_JITTER`], `loss`.
pub fn link(latency: Duration, loss: f64) -> LinkModel {
    LinkModel {
        latency,
        jitter: LINK_JITTER,
        loss,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(nodes: usize, seed: u64, loss: f64, churn: f64) -> LookupParams {
        LookupParams {
            nodes,
            lookups: 100,
            seed,
            link: link(Duration::from_millis(50), loss),
            churn,
            window: Duration::from_secs(5),
        }
    }

    #[test]
    fn same_seed_same_report_and_small_network_finds_everything() {
        let p = params(300, 3, 0.0, 0.0);
        let a = run(&p).0;
        assert_eq!(a, run(&p).0);
        assert_eq!(a.judged, 100);
        assert_eq!(a.success_rate, 1.0, "{a:?}");
        assert!(a.closest_found_rate >= 0.95, "{a:?}");
        assert!(a.hops_p50 >= 1.0 && a.msgs_per_lookup > 0.0, "{a:?}");
        assert_ne!(a, run(&params(300, 4, 0.0, 0.0)).0);
    }

    #[test]
    fn churn_and_loss_still_terminate_and_report() {
        let r = run(&params(300, 5, 0.02, 0.3)).0;
        assert_eq!(r.churn_left, 90);
        assert_eq!(r.churn_joined, 90);
        assert_eq!(r.not_run, 0);
        assert_eq!(r.judged + r.requester_left + r.target_left, r.lookups);
        assert!(r.judged > 0);
        assert!((0.0..=1.0).contains(&r.success_rate));
        assert!(r.success_rate > 0.8, "{r:?}");
        assert!(r.timeouts_per_lookup > 0.0, "{r:?}");
    }
}
