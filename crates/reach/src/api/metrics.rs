//! `GET /metrics`: the node's counters in the Prometheus text exposition
//! format (version 0.0.4), token required like every route.
//!
//! Everything comes from what the node already keeps: every metric of every
//! group in [`NodeStats`](crate::NodeStats) (name, help, kind: see
//! [`crate::telemetry`]), the duration histograms ([`crate::histogram`]),
//! punch counters per technique, refused inputs by reason, build info and
//! uptime. The format is a few lines of text, so it is written here rather
//! than through a metrics crate.
//!
//! Names: `reach_` prefix; counters end in `_total` (once: a name already
//! ending in it is kept); units are suffixes (`_bytes`, `_seconds`). Labels
//! take values from fixed sets only (a technique, a refusal reason, the
//! version): the number of series never grows with peers, topics or
//! addresses ([`MAX_SERIES`]).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::node::Node;
use crate::telemetry::{MetricGroup, MetricKind};

/// The `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bound on the series one scrape holds (samples, not counting
/// `# HELP`/`# TYPE` lines). 200 today; the bound leaves room for the
/// capabilities still to land while catching any label that grows with
/// peers (the series test runs hundreds of peers against it).
pub const MAX_SERIES: usize = 400;

/// Refused inputs by reason: `reach_refused_total{reason=...}`. Each
/// reason is a fixed label value mapped from one existing counter (the
/// name it has in `NodeStats`), so the same count is also exported under
/// that counter's own name. `api_request_refused` is counted here (see
/// [`count_api_refusal`]).
pub const REFUSAL_REASONS: &[(&str, &str)] = &[
    // Address probes over the rate limit.
    ("probe_rate_limited", "probes_refused"),
    // Inbound connections over a connection limit.
    ("inbound_connection_limit", "inbound_refused"),
    // Inbound handshakes that failed (bad certificate, wrong key, timeout).
    ("inbound_handshake_failed", "inbound_handshake_failures"),
    // Inbound connections that carried nothing and were closed.
    ("silent_connection", "silent_connections_closed"),
    // Streams that did not start with a valid envelope.
    ("malformed_stream", "malformed_streams"),
    // Streams for a protocol nobody here serves.
    ("unknown_protocol", "protocol_streams_refused"),
    // Datagrams of no known kind.
    ("unknown_datagram", "unknown_datagrams_dropped"),
    // Non-QUIC datagrams over the node's full queue.
    ("datagram_queue_full", "queue_full_datagrams_dropped"),
    // TCP link datagrams too large or over a full queue, TCP connections
    // over the handshake or per-IP limit.
    ("tcp_link_limit", "tcp_dropped"),
    // Relay reservations this node refused as a relay.
    ("relay_reservation_refused", "relay_reservations_refused"),
    // Relay circuits this node refused as a relay.
    ("relay_circuit_refused", "relay_circuits_refused"),
    // Relay frames for an unknown circuit or from an unbound address.
    ("relay_unknown_circuit", "relay_dropped_unknown"),
    // Relay frames over the reservation holder's rate allowance.
    ("relay_rate_limited", "relay_dropped_rate_limited"),
    // Router replies (port mapping) that did not decode.
    ("portmap_bad_reply", "portmap_bad_replies"),
    // Topic publishes over a rate limit (this node's own, and its members'
    // at this home).
    ("topic_rate_limited", "topics_refused_rate"),
    // Topic frames from homes or members that did not decode or broke a
    // rule.
    ("topic_bad_frame", "topics_bad_frames"),
    // Presence frames whose home's signature did not verify (dropped).
    ("topic_bad_presence", "topics_bad_presence"),
];

/// The reason for control-API requests answered with a 4xx error.
pub const API_REFUSAL_REASON: &str = "api_request_refused";

/// Control-API requests refused with a 4xx error (no or a wrong token,
/// unknown route, bad JSON, body too large). Per process: a daemon serves
/// one API.
static API_REFUSALS: AtomicU64 = AtomicU64::new(0);

/// Counts one control-API request refused with a 4xx error.
pub(crate) fn count_api_refusal() {
    API_REFUSALS.fetch_add(1, Ordering::Relaxed);
}

/// Renames for metrics whose `NodeStats` name puts the unit in the middle
/// (the JSON names stay as they are: clients read them).
const RENAMES: &[(&str, &str)] = &[
    ("message_bytes_sent", "message_sent_bytes"),
    ("message_bytes_received", "message_received_bytes"),
];

/// The Prometheus name of a `NodeStats` metric.
pub fn prometheus_name(name: &str, kind: MetricKind) -> String {
    let base = RENAMES
        .iter()
        .find(|(from, _)| *from == name)
        .map_or(name, |(_, to)| to);
    let mut out = format!("reach_{base}");
    if kind == MetricKind::Counter && !out.ends_with("_total") {
        out.push_str("_total");
    }
    out
}

/// Escapes a `# HELP` text: backslash and newline.
fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Escapes a label value: backslash, double quote and newline.
fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The scrape: every metric of `node` in the text format.
pub fn render(node: &Node) -> String {
    let mut out = String::with_capacity(16 * 1024);
    header(
        &mut out,
        "reach_build_info",
        "The reach version this node runs (the value is always 1).",
        "gauge",
    );
    let _ = writeln!(
        out,
        "reach_build_info{{version=\"{}\"}} 1",
        escape_label(env!("CARGO_PKG_VERSION"))
    );
    header(
        &mut out,
        "reach_uptime_seconds",
        "Seconds since the node started.",
        "gauge",
    );
    let _ = writeln!(out, "reach_uptime_seconds {}", node.uptime().as_secs_f64());

    let stats = node.stats();
    let metrics = stats.metrics();
    for (m, v) in &metrics {
        let name = prometheus_name(m.name, m.kind);
        header(&mut out, &name, m.help, m.kind.as_str());
        let _ = writeln!(out, "{name} {v}");
    }

    header(
        &mut out,
        "reach_refused_total",
        "Inputs refused or dropped, by reason (a fixed set: see the README's Metrics section).",
        "counter",
    );
    for (reason, field) in REFUSAL_REASONS {
        let v = metrics
            .iter()
            .find(|(m, _)| m.name == *field)
            .map_or(0, |(_, v)| *v);
        let _ = writeln!(out, "reach_refused_total{{reason=\"{reason}\"}} {v}");
    }
    let _ = writeln!(
        out,
        "reach_refused_total{{reason=\"{API_REFUSAL_REASON}\"}} {}",
        API_REFUSALS.load(Ordering::Relaxed)
    );

    let punch = node.punch_stats();
    type Field = fn(&crate::punch::TechniqueStats) -> u64;
    let per_technique: [(&str, &str, Field); 3] = [
        (
            "reach_punch_attempts_total",
            "Hole-punch attempts this node took part in, by technique.",
            |t| t.attempts,
        ),
        (
            "reach_punch_successes_total",
            "Hole punches that reached a direct path, by technique.",
            |t| t.successes,
        ),
        (
            "reach_punch_failures_total",
            "Hole punches that failed, by technique.",
            |t| t.failures,
        ),
    ];
    for (name, help, field) in per_technique {
        header(&mut out, name, help, "counter");
        for t in &punch.techniques {
            let _ = writeln!(
                out,
                "{name}{{technique=\"{}\"}} {}",
                escape_label(&t.technique),
                field(t)
            );
        }
    }
    header(
        &mut out,
        "reach_punch_fallbacks_total",
        "Direct paths that died, their traffic moved back to the relay.",
        "counter",
    );
    let _ = writeln!(out, "reach_punch_fallbacks_total {}", punch.fallbacks);

    for h in node.histograms() {
        header(&mut out, h.name, h.help, "histogram");
        for (le, count) in h.snapshot.cumulative() {
            let le = if le.is_infinite() {
                "+Inf".to_string()
            } else {
                le.to_string()
            };
            let _ = writeln!(out, "{}_bucket{{le=\"{le}\"}} {count}", h.name);
        }
        let _ = writeln!(out, "{}_sum {}", h.name, h.snapshot.sum_seconds);
        let _ = writeln!(out, "{}_count {}", h.name, h.snapshot.count);
    }
    out
}

/// Samples in a scrape (lines that are not comments or blank).
pub fn series_count(scrape: &str) -> usize {
    scrape
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::NodeStats;

    #[test]
    fn counters_end_in_total_once_and_units_are_suffixes() {
        assert_eq!(
            prometheus_name("messages_sent", MetricKind::Counter),
            "reach_messages_sent_total"
        );
        assert_eq!(
            prometheus_name("already_total", MetricKind::Counter),
            "reach_already_total"
        );
        assert_eq!(
            prometheus_name("message_bytes_sent", MetricKind::Counter),
            "reach_message_sent_bytes_total"
        );
        assert_eq!(
            prometheus_name("peer_table_size", MetricKind::Gauge),
            "reach_peer_table_size"
        );
        for (m, _) in NodeStats::default().metrics() {
            let n = prometheus_name(m.name, m.kind);
            assert!(!n.contains("_total_total"), "{n}");
            assert!(!n.contains("_bytes_") || n.ends_with("_bytes_total"), "{n}");
        }
    }

    #[test]
    fn every_refusal_reason_maps_to_a_counter_nodestats_has() {
        let metrics = NodeStats::default().metrics();
        for (reason, field) in REFUSAL_REASONS {
            let m = metrics.iter().find(|(m, _)| m.name == *field);
            assert!(
                m.is_some_and(|(m, _)| m.kind == MetricKind::Counter),
                "reason {reason}: no counter named {field} in NodeStats"
            );
        }
        let mut reasons: Vec<&str> = REFUSAL_REASONS.iter().map(|(r, _)| *r).collect();
        reasons.push(API_REFUSAL_REASON);
        let n = reasons.len();
        reasons.sort();
        reasons.dedup();
        assert_eq!(reasons.len(), n, "a reason is listed twice");
    }

    #[test]
    fn labels_and_help_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(escape_help("a\\b\nc"), "a\\\\b\\nc");
    }
}
