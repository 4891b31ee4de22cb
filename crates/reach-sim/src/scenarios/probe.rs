//! Address probes across a simulated network.
//!
//! Every node is a reach-proto endpoint with an address. Random nodes ask
//! random others "which address do you see me at?" with the real
//! [`ControlPacket`] encoding, retry policy and anti-amplification rule of
//! reach-proto, over links with latency, jitter and loss.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use reach_proto::wire::datagram::{ControlPacket, PROBE_ATTEMPTS, PROBE_RETRY_AFTER};
use serde::Serialize;

use crate::engine::EventQueue;
use crate::net::LinkModel;
use crate::rng::Rng;
use crate::stats::{peak_rss_mib, quantile};

/// Parameters of a probe run.
#[derive(Debug, Clone)]
pub struct ProbeParams {
    pub nodes: usize,
    pub probes: usize,
    pub seed: u64,
    pub link: LinkModel,
}

/// The JSON report of a probe run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProbeReport {
    pub scenario: &'static str,
    pub nodes: usize,
    pub probes: usize,
    pub seed: u64,
    pub latency_ms: f64,
    pub loss: f64,
    pub answered: usize,
    pub success_rate: f64,
    /// Share of answers whose observed address matched the prober's own.
    pub observed_correct_rate: f64,
    pub rtt_ms_p50: f64,
    pub rtt_ms_p99: f64,
    pub packets_per_probe: f64,
    pub virtual_s: f64,
}

enum Ev {
    /// Prober `from` sends (or resends) probe `id`.
    Send { id: usize },
    /// A datagram arrives at node `to` from address `from`.
    Deliver {
        to: usize,
        from: SocketAddr,
        bytes: Vec<u8>,
    },
}

struct Pending {
    from: usize,
    to: usize,
    nonce: u64,
    first_sent: Duration,
    attempts: u32,
    done: bool,
}

fn addr_of(i: usize) -> SocketAddr {
    // 10.0.0.0/8 addresses, only as values inside the simulator.
    let ip = Ipv4Addr::from(0x0A00_0000u32 + i as u32 + 1);
    SocketAddr::V4(SocketAddrV4::new(ip, 4433))
}

/// Runs the scenario. Returns the report and the real time it took.
pub fn run(p: &ProbeParams) -> (ProbeReport, Duration) {
    let started = Instant::now();
    let mut rng = Rng::new(p.seed);
    let by_addr: HashMap<SocketAddr, usize> = (0..p.nodes).map(|i| (addr_of(i), i)).collect();
    let mut q = EventQueue::default();
    let mut pending = Vec::with_capacity(p.probes);
    let mut by_nonce = HashMap::new();
    for id in 0..p.probes {
        let from = rng.below(p.nodes as u64) as usize;
        let mut to = rng.below(p.nodes as u64 - 1) as usize;
        if to >= from {
            to += 1;
        }
        let nonce = rng.next_u64();
        by_nonce.insert(nonce, id);
        pending.push(Pending {
            from,
            to,
            nonce,
            first_sent: Duration::ZERO,
            attempts: 0,
            done: false,
        });
        // Spread the probes over the first second.
        q.schedule(Duration::from_micros(rng.below(1_000_000)), Ev::Send { id });
    }
    let mut packets = 0usize;
    let mut rtts = Vec::new();
    let mut observed_ok = 0usize;
    while let Some((now, ev)) = q.pop() {
        match ev {
            Ev::Send { id } => {
                let pr = &mut pending[id];
                if pr.done || pr.attempts >= PROBE_ATTEMPTS {
                    continue;
                }
                if pr.attempts == 0 {
                    pr.first_sent = now;
                }
                pr.attempts += 1;
                packets += 1;
                let bytes = ControlPacket::Probe { nonce: pr.nonce }.encode();
                let (from, to) = (pr.from, pr.to);
                if let Some(d) = p.link.delay(&mut rng) {
                    q.schedule(
                        d,
                        Ev::Deliver {
                            to,
                            from: addr_of(from),
                            bytes,
                        },
                    );
                }
                q.schedule(PROBE_RETRY_AFTER, Ev::Send { id });
            }
            Ev::Deliver { to, from, bytes } => match ControlPacket::decode(&bytes) {
                Ok(ControlPacket::Probe { nonce }) => {
                    let reply = ControlPacket::ProbeReply {
                        nonce,
                        observed: from,
                    }
                    .encode();
                    // reach-proto's rule: never answer with more bytes.
                    if reply.len() > bytes.len() {
                        continue;
                    }
                    packets += 1;
                    if let (Some(d), Some(&back)) = (p.link.delay(&mut rng), by_addr.get(&from)) {
                        q.schedule(
                            d,
                            Ev::Deliver {
                                to: back,
                                from: addr_of(to),
                                bytes: reply,
                            },
                        );
                    }
                }
                Ok(ControlPacket::ProbeReply { nonce, observed }) => {
                    let Some(&id) = by_nonce.get(&nonce) else {
                        continue;
                    };
                    let pr = &mut pending[id];
                    if pr.done || pr.from != to || addr_of(pr.to) != from {
                        continue;
                    }
                    pr.done = true;
                    rtts.push((now - pr.first_sent).as_secs_f64() * 1000.0);
                    if observed == addr_of(pr.from) {
                        observed_ok += 1;
                    }
                }
                // Other control packets (filtering tests) play no part in
                // probing; garbage is dropped like a real endpoint would.
                Ok(_) | Err(_) => {}
            },
        }
    }
    let answered = rtts.len();
    let report = ProbeReport {
        scenario: "probe",
        nodes: p.nodes,
        probes: p.probes,
        seed: p.seed,
        latency_ms: p.link.latency.as_secs_f64() * 1000.0,
        loss: p.link.loss,
        answered,
        success_rate: ratio(answered, p.probes),
        observed_correct_rate: ratio(observed_ok, answered),
        rtt_ms_p50: round3(quantile(&mut rtts, 0.5)),
        rtt_ms_p99: round3(quantile(&mut rtts, 0.99)),
        packets_per_probe: round3(packets as f64 / p.probes.max(1) as f64),
        virtual_s: round3(q.now().as_secs_f64()),
    };
    (report, started.elapsed())
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The report plus real-time figures that vary between runs.
#[derive(Debug, Serialize)]
pub struct ProbeOutput {
    #[serde(flatten)]
    pub report: ProbeReport,
    pub wall_s: f64,
    pub peak_rss_mib: f64,
}

/// Runs and adds the real-time figures.
pub fn run_with_wall(p: &ProbeParams) -> ProbeOutput {
    let (report, wall) = run(p);
    ProbeOutput {
        report,
        wall_s: round3(wall.as_secs_f64()),
        peak_rss_mib: round3(peak_rss_mib()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(loss: f64, seed: u64) -> ProbeParams {
        ProbeParams {
            nodes: 200,
            probes: 2_000,
            seed,
            link: LinkModel {
                latency: Duration::from_millis(50),
                jitter: 0.1,
                loss,
            },
        }
    }

    #[test]
    fn same_seed_same_numbers_other_seed_other_numbers() {
        let a = run(&params(0.05, 1)).0;
        assert_eq!(a, run(&params(0.05, 1)).0);
        assert_ne!(a, run(&params(0.05, 2)).0);
    }

    #[test]
    fn lossless_probes_all_answer_in_one_round_trip() {
        let r = run(&params(0.0, 9)).0;
        assert_eq!(r.success_rate, 1.0);
        assert_eq!(r.observed_correct_rate, 1.0);
        assert_eq!(r.packets_per_probe, 2.0);
        assert!((90.0..=110.0).contains(&r.rtt_ms_p50), "{}", r.rtt_ms_p50);
    }

    #[test]
    fn retries_recover_from_loss() {
        // 10% loss per packet: one attempt fails ~19% of the time, four
        // attempts ~0.1%.
        let r = run(&params(0.10, 5)).0;
        assert!(r.success_rate > 0.99, "{}", r.success_rate);
        assert!(r.packets_per_probe > 2.0);
        assert!(r.rtt_ms_p99 > 500.0, "some answers needed a retry");
    }
}
