//! Counters a node keeps about itself, exposed by `Node::stats` and the
//! control API.

use std::sync::atomic::{AtomicU64, Ordering};

crate::telemetry::metrics! {
    /// Counters the node core keeps: messages, streams, connections,
    /// probes.
    pub(crate) struct Counters =>
    /// The node core's counters as [`NodeStats`] shows them.
    pub struct CoreStats;
    atomic {
        /// Messages sent.
        counter messages_sent,
        /// Messages received and delivered.
        counter messages_received,
        /// Messages sent again after their connection died unacknowledged.
        counter messages_resent,
        /// Messages received a second time (and not delivered again).
        counter duplicate_messages,
        /// Bytes of messages sent.
        counter message_bytes_sent,
        /// Bytes of messages received.
        counter message_bytes_received,
        /// Streams this node opened.
        counter streams_opened,
        /// Streams peers opened and the application got.
        counter streams_accepted,
        /// Streams of application protocols handed to a listener.
        counter protocol_streams_accepted,
        /// Streams refused because nobody here serves their protocol.
        counter protocol_streams_refused,
        /// Connections this node dialed.
        counter connections_outbound,
        /// Connections peers dialed.
        counter connections_inbound,
        /// Dials that failed.
        counter dial_failures,
        /// Inbound handshakes that failed.
        counter inbound_handshake_failures,
        /// Inbound handshakes asked to prove their address first (a QUIC Retry)
        /// because handshakes in flight were crowded.
        counter inbound_retried,
        /// Inbound connection attempts refused by a connection limit.
        counter inbound_refused,
        /// Inbound connections closed for carrying nothing.
        counter silent_connections_closed,
        /// Streams that did not start with a valid envelope.
        counter malformed_streams,
        /// Address probes answered.
        counter probes_answered,
        /// Address probes refused (rate limit).
        counter probes_refused,
        /// STUN binding requests answered.
        counter stun_answered,
    }
    external {
        /// Connection events the application did not read in time (see
        /// `NodeBuilder::connection_events`).
        counter connection_events_dropped,
        /// Peer-table entries forgotten to keep the table bounded.
        counter peers_evicted,
        /// Entries in the peer table now.
        gauge peer_table_size,
        /// Inbound connections now (handshaking or established).
        gauge inbound_connections,
    }
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn add(c: &AtomicU64, n: usize) {
    c.fetch_add(n as u64, Ordering::Relaxed);
}

crate::telemetry::node_stats! {
    /// A snapshot of a node's counters since it started, assembled from the
    /// modules' metric groups. It serializes as one flat JSON object (each
    /// group is flattened; see `crate::telemetry`), and lists every metric
    /// through [`MetricGroup`](crate::telemetry::MetricGroup).
    pub struct NodeStats {
        /// Messages, streams, connections, probes.
        pub core: CoreStats,
        /// Datagrams the socket demultiplexed, by kind.
        pub datagrams: crate::socket::DatagramStats,
        /// The DHT.
        pub dht: crate::dht::DhtStats,
        /// The relay capability: reservations, circuits, relayed dials,
        /// acquisition.
        pub relay: crate::relay::RelayStats,
        /// The relay data path: forwarded and relayed packets.
        pub relay_paths: crate::relay::paths::RelayPathStats,
        /// Completed TLS handshakes by key-exchange group.
        pub handshakes: crate::handshake::HandshakeStats,
        /// TCP links.
        pub tcp: crate::tcp::LinkStats,
        /// Port mapping: grants, renewals, failures by kind, active.
        pub portmap: crate::portmap::PortMapStats,
        /// Durable messages: enqueued, sent, delivered, abandoned, received.
        pub outbox: crate::outbox::delivery::OutboxStats,
        /// Topics: published, delivered, refused, federation links.
        pub topics: crate::topics::TopicsStats,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::telemetry::{MetricGroup, MetricKind};

    /// The stats JSON fields `reach status`, `/v1/stats`, `/v1/status`, the
    /// README and scripts have read since before the metric groups existed:
    /// none may be renamed or dropped.
    const FIELDS_CLIENTS_READ: &[&str] = &[
        "messages_sent",
        "messages_received",
        "messages_resent",
        "duplicate_messages",
        "message_bytes_sent",
        "message_bytes_received",
        "streams_opened",
        "streams_accepted",
        "protocol_streams_accepted",
        "protocol_streams_refused",
        "connections_outbound",
        "connections_inbound",
        "dial_failures",
        "inbound_handshake_failures",
        "inbound_retried",
        "inbound_refused",
        "silent_connections_closed",
        "connection_events_dropped",
        "peers_evicted",
        "peer_table_size",
        "inbound_connections",
        "malformed_streams",
        "probes_answered",
        "probes_refused",
        "stun_answered",
        "quic_datagrams",
        "control_datagrams",
        "stun_datagrams",
        "unknown_datagrams_dropped",
        "queue_full_datagrams_dropped",
        "dht_lookups",
        "dht_rpcs_sent",
        "dht_rpcs_failed",
        "dht_rpcs_served",
        "dht_records_published",
        "dht_records_handed_off",
        "dht_resolutions",
        "dht_resolution_failures",
        "dht_routing_table_size",
        "dht_records_stored",
        "relay_reservations_granted",
        "relay_reservations_refused",
        "relay_circuits_opened",
        "relay_circuits_refused",
        "relay_forwarded_packets",
        "relay_forwarded_bytes",
        "relay_dropped_unknown",
        "relay_dropped_rate_limited",
        "relayed_dials",
        "relayed_dial_failures",
        "relayed_packets_sent",
        "relayed_packets_received",
        "relay_mixed_dropped",
        "relay_acquisitions",
        "relay_acquisition_failures",
        "relay_losses",
        "handshakes_x25519mlkem768",
        "handshakes_x25519",
        "handshakes_other_group",
    ];

    #[tokio::test]
    async fn every_declared_metric_is_in_a_running_nodes_stats_json() {
        let node = crate::Node::builder()
            .bind("127.0.0.1:0".parse().unwrap())
            .spawn()
            .await
            .unwrap();
        let stats = node.stats();
        let json = serde_json::to_value(&stats).unwrap();
        let obj = json.as_object().expect("the stats are one flat object");
        let listed = stats.metrics();
        for (m, value) in &listed {
            assert_eq!(
                obj.get(m.name).and_then(|v| v.as_u64()),
                Some(*value),
                "{} is declared but not in the stats JSON as listed: {json}",
                m.name
            );
        }
        // Nothing in the JSON that no group declares (so a /metrics page
        // built from the groups shows everything the JSON does).
        assert_eq!(obj.len(), listed.len(), "{json}");
        // One bump shows in both the typed field and the JSON.
        bump(&node.inner.counters.stun_answered);
        let json = serde_json::to_value(node.stats()).unwrap();
        assert_eq!(json["stun_answered"], 1);
        node.shutdown().await;
    }

    #[test]
    fn metric_names_are_unique_documented_and_keep_the_old_json_fields() {
        let listed = NodeStats::default().metrics();
        let names: HashSet<&str> = listed.iter().map(|(m, _)| m.name).collect();
        assert_eq!(names.len(), listed.len(), "a metric name is declared twice");
        for (m, _) in &listed {
            assert!(!m.help.is_empty(), "{} has no doc comment", m.name);
            assert_eq!(m.help, m.help.trim(), "{}", m.name);
        }
        for f in FIELDS_CLIENTS_READ {
            assert!(names.contains(f), "{f} is gone from the stats");
        }
        let kind = |n: &str| listed.iter().find(|(m, _)| m.name == n).unwrap().0.kind;
        assert_eq!(kind("peer_table_size"), MetricKind::Gauge);
        assert_eq!(kind("dht_routing_table_size"), MetricKind::Gauge);
        assert_eq!(kind("messages_sent"), MetricKind::Counter);
    }

    #[test]
    fn every_metric_round_trips_through_the_json_under_its_name() {
        // Give each metric a different value, by name only.
        let listed = NodeStats::default().metrics();
        let want: serde_json::Map<String, serde_json::Value> = listed
            .iter()
            .enumerate()
            .map(|(i, (m, _))| (m.name.to_string(), (i as u64 + 1).into()))
            .collect();
        let stats: NodeStats =
            serde_json::from_value(serde_json::Value::Object(want.clone())).unwrap();
        for (i, (m, v)) in stats.metrics().iter().enumerate() {
            assert_eq!(*v, i as u64 + 1, "{} lands in another field", m.name);
        }
        assert_eq!(
            serde_json::to_value(&stats).unwrap(),
            serde_json::Value::Object(want.clone())
        );
        // Typed access reads the same values.
        assert_eq!(stats.core.messages_sent, want["messages_sent"]);
        assert_eq!(stats.dht.lookups, want["dht_lookups"]);
        assert_eq!(stats.relay_paths.client_sent, want["relayed_packets_sent"]);
        // A daemon without a newer field still parses (missing is zero).
        let old: NodeStats =
            serde_json::from_value(serde_json::json!({"messages_sent": 3})).unwrap();
        assert_eq!(old.core.messages_sent, 3);
        assert_eq!(old.tcp.opened, 0);
    }
}
