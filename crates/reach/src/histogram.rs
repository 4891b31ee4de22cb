//! Fixed-bucket histograms of durations, for `/metrics`.
//!
//! A [`Histogram`] is a few atomics: one count per bucket and a sum, so
//! recording costs one `fetch_add` per field and never takes a lock or
//! allocates (metrics are always on, on the data path too). The buckets are
//! fixed at compile time ([`LATENCY_BUCKETS_SECONDS`]) and there are no
//! labels, so a histogram is always the same number of series whatever the
//! number of peers.
//!
//! The node keeps four, each where the thing it times happens:
//! connect by key (`reach_connect_seconds`, in `peers`), DHT lookups
//! (`reach_dht_lookup_seconds`, in `dht`), punch time to direct
//! (`reach_punch_time_to_direct_seconds`, in `punch`) and relay failover
//! (`reach_relay_failover_seconds`, in `relay`). [`Node::histograms`]
//! collects them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::node::Node;

/// Upper bounds (seconds) of the latency buckets. From 1 ms (a dial on a
/// LAN) to 60 s (a relay failover that needs a new DHT walk, or a punch
/// that ran every technique); anything slower lands in `+Inf`. Roughly
/// 2.5x apart, the spacing Prometheus' own defaults use, so a quantile is
/// read to within one step.
pub const LATENCY_BUCKETS_SECONDS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

/// Buckets including `+Inf`.
const SLOTS: usize = LATENCY_BUCKETS_SECONDS.len() + 1;

/// A histogram of durations over [`LATENCY_BUCKETS_SECONDS`].
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    buckets: [AtomicU64; SLOTS],
    /// Sum of the observations, nanoseconds (overflows after 584 years).
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let slot = LATENCY_BUCKETS_SECONDS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(SLOTS - 1);
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Records the time since `start`.
    pub fn observe_since(&self, start: Instant) {
        self.observe(start.elapsed());
    }

    /// The counts now. The count is the sum of the buckets read, so the
    /// exposition's `+Inf` bucket always equals `_count`.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        HistogramSnapshot {
            count: counts.iter().sum(),
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            counts,
        }
    }
}

/// A histogram's counts at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Observations per bucket of [`LATENCY_BUCKETS_SECONDS`], then `+Inf`
    /// (not cumulative).
    pub counts: Vec<u64>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl HistogramSnapshot {
    /// `(upper bound, cumulative count)` per bucket, `+Inf` last, as the
    /// exposition lists them.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut acc = 0;
        LATENCY_BUCKETS_SECONDS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(&self.counts)
            .map(|(b, c)| {
                acc += c;
                (b, acc)
            })
            .collect()
    }
}

/// One of the node's histograms: its Prometheus name (with the `reach_`
/// prefix and the `_seconds` unit), help, and counts.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedHistogram {
    pub name: &'static str,
    pub help: &'static str,
    pub snapshot: HistogramSnapshot,
}

impl Node {
    /// The node's duration histograms (see [`crate::histogram`]).
    pub fn histograms(&self) -> Vec<NamedHistogram> {
        let h = |name, help, snapshot| NamedHistogram {
            name,
            help,
            snapshot,
        };
        vec![
            h(
                "reach_connect_seconds",
                "Time to connect to a peer by key (dial, resolving its record in the DHT when needed), successful connects only.",
                self.inner.peers.connect_seconds.snapshot(),
            ),
            h(
                "reach_dht_lookup_seconds",
                "Time an iterative DHT lookup took (node or record lookups, including maintenance).",
                self.inner.dht.lookup_seconds.snapshot(),
            ),
            h(
                "reach_punch_time_to_direct_seconds",
                "From a punch request to the first packet from the peer's direct address, successful punches only.",
                self.inner.punch.time_to_direct_seconds(),
            ),
            h(
                "reach_relay_failover_seconds",
                "From losing the relay this node held to holding the next one.",
                self.inner.relay.failover_seconds.snapshot(),
            ),
        ]
    }

    /// How long since the node was built.
    pub fn uptime(&self) -> Duration {
        self.inner.peers.started.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500)); // <= 0.001
        h.observe(Duration::from_millis(1)); // <= 0.001 (bounds are inclusive)
        h.observe(Duration::from_millis(30)); // <= 0.05
        h.observe(Duration::from_secs(3600)); // +Inf
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert!(
            (s.sum_seconds - 3600.0315).abs() < 1e-6,
            "{}",
            s.sum_seconds
        );
        let cum = s.cumulative();
        assert_eq!(cum.len(), LATENCY_BUCKETS_SECONDS.len() + 1);
        assert_eq!(cum[0], (0.001, 2));
        assert_eq!(cum[4], (0.025, 2));
        assert_eq!(cum[5], (0.05, 3));
        assert_eq!(cum[13], (60.0, 3));
        assert_eq!(cum[14].1, 4);
        assert!(cum[14].0.is_infinite());
    }

    #[test]
    fn buckets_increase() {
        assert!(LATENCY_BUCKETS_SECONDS.windows(2).all(|w| w[0] < w[1]));
    }
}
