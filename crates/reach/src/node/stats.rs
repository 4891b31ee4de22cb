//! Counters a node keeps about itself, exposed by `Node::stats` and the
//! control API.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::socket::DemuxStats;

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub messages_sent: AtomicU64,
    pub messages_received: AtomicU64,
    /// Messages sent again after their connection died unacknowledged.
    pub messages_resent: AtomicU64,
    /// Messages received a second time (and not delivered again).
    pub duplicate_messages: AtomicU64,
    pub message_bytes_sent: AtomicU64,
    pub message_bytes_received: AtomicU64,
    pub streams_opened: AtomicU64,
    pub streams_accepted: AtomicU64,
    pub protocol_streams_accepted: AtomicU64,
    pub protocol_streams_refused: AtomicU64,
    pub connections_outbound: AtomicU64,
    pub connections_inbound: AtomicU64,
    pub dial_failures: AtomicU64,
    pub inbound_handshake_failures: AtomicU64,
    /// Inbound handshakes asked to prove their address first (a QUIC Retry)
    /// because handshakes in flight were crowded.
    pub inbound_retried: AtomicU64,
    /// Inbound connection attempts refused by a connection limit.
    pub inbound_refused: AtomicU64,
    /// Inbound connections closed for carrying nothing.
    pub silent_connections_closed: AtomicU64,
    pub malformed_streams: AtomicU64,
    pub probes_answered: AtomicU64,
    pub probes_refused: AtomicU64,
    pub stun_answered: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn add(c: &AtomicU64, n: usize) {
    c.fetch_add(n as u64, Ordering::Relaxed);
}

/// A snapshot of a node's counters since it started.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct NodeStats {
    pub messages_sent: u64,
    pub messages_received: u64,
    pub messages_resent: u64,
    pub duplicate_messages: u64,
    pub message_bytes_sent: u64,
    pub message_bytes_received: u64,
    pub streams_opened: u64,
    pub streams_accepted: u64,
    /// Streams of application protocols handed to a listener.
    pub protocol_streams_accepted: u64,
    /// Streams refused because nobody here serves their protocol.
    pub protocol_streams_refused: u64,
    pub connections_outbound: u64,
    pub connections_inbound: u64,
    pub dial_failures: u64,
    pub inbound_handshake_failures: u64,
    pub inbound_retried: u64,
    pub inbound_refused: u64,
    pub silent_connections_closed: u64,
    /// Connection events the application did not read in time (see
    /// `NodeBuilder::connection_events`).
    pub connection_events_dropped: u64,
    /// Peer-table entries forgotten to keep the table bounded.
    pub peers_evicted: u64,
    /// Entries in the peer table now.
    pub peer_table_size: u64,
    /// Inbound connections now (handshaking or established).
    pub inbound_connections: u64,
    pub malformed_streams: u64,
    pub probes_answered: u64,
    pub probes_refused: u64,
    pub stun_answered: u64,
    pub quic_datagrams: u64,
    pub control_datagrams: u64,
    pub stun_datagrams: u64,
    pub unknown_datagrams_dropped: u64,
    pub queue_full_datagrams_dropped: u64,
    pub dht_lookups: u64,
    pub dht_rpcs_sent: u64,
    pub dht_rpcs_failed: u64,
    pub dht_rpcs_served: u64,
    pub dht_records_published: u64,
    pub dht_resolutions: u64,
    pub dht_resolution_failures: u64,
    pub dht_routing_table_size: u64,
    pub dht_records_stored: u64,
    pub relay_reservations_granted: u64,
    pub relay_reservations_refused: u64,
    pub relay_circuits_opened: u64,
    pub relay_circuits_refused: u64,
    pub relay_forwarded_packets: u64,
    pub relay_forwarded_bytes: u64,
    pub relay_dropped_unknown: u64,
    pub relay_dropped_rate_limited: u64,
    pub relayed_dials: u64,
    pub relayed_dial_failures: u64,
    pub relayed_packets_sent: u64,
    pub relayed_packets_received: u64,
    pub relay_mixed_dropped: u64,
    pub relay_acquisitions: u64,
    pub relay_acquisition_failures: u64,
    pub relay_losses: u64,
    /// Completed handshakes that negotiated the hybrid post-quantum group
    /// X25519MLKEM768.
    pub handshakes_x25519mlkem768: u64,
    /// Completed handshakes that negotiated classical X25519.
    pub handshakes_x25519: u64,
    /// Completed handshakes that negotiated any other group.
    pub handshakes_other_group: u64,
}

impl NodeStats {
    pub(crate) fn collect(
        c: &Counters,
        d: &DemuxStats,
        dht: &crate::dht::Dht,
        r: &crate::relay::RelayCounters,
        p: &crate::relay::paths::RelayPathStats,
        h: &crate::handshake::HandshakeStats,
    ) -> Self {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NodeStats {
            messages_sent: g(&c.messages_sent),
            messages_received: g(&c.messages_received),
            messages_resent: g(&c.messages_resent),
            duplicate_messages: g(&c.duplicate_messages),
            message_bytes_sent: g(&c.message_bytes_sent),
            message_bytes_received: g(&c.message_bytes_received),
            streams_opened: g(&c.streams_opened),
            streams_accepted: g(&c.streams_accepted),
            protocol_streams_accepted: g(&c.protocol_streams_accepted),
            protocol_streams_refused: g(&c.protocol_streams_refused),
            connections_outbound: g(&c.connections_outbound),
            connections_inbound: g(&c.connections_inbound),
            dial_failures: g(&c.dial_failures),
            inbound_handshake_failures: g(&c.inbound_handshake_failures),
            inbound_retried: g(&c.inbound_retried),
            inbound_refused: g(&c.inbound_refused),
            silent_connections_closed: g(&c.silent_connections_closed),
            // Filled in by `Node::stats` (the peer table and the gate
            // keep these).
            peers_evicted: 0,
            connection_events_dropped: 0,
            peer_table_size: 0,
            inbound_connections: 0,
            malformed_streams: g(&c.malformed_streams),
            probes_answered: g(&c.probes_answered),
            probes_refused: g(&c.probes_refused),
            stun_answered: g(&c.stun_answered),
            quic_datagrams: g(&d.quic_datagrams),
            control_datagrams: g(&d.control_datagrams),
            stun_datagrams: g(&d.stun_datagrams),
            unknown_datagrams_dropped: g(&d.unknown_dropped),
            queue_full_datagrams_dropped: g(&d.queue_full_dropped),
            dht_lookups: g(&dht.counters.lookups),
            dht_rpcs_sent: g(&dht.counters.rpcs_sent),
            dht_rpcs_failed: g(&dht.counters.rpcs_failed),
            dht_rpcs_served: g(&dht.counters.rpcs_served),
            dht_records_published: g(&dht.counters.records_published),
            dht_resolutions: g(&dht.counters.resolutions),
            dht_resolution_failures: g(&dht.counters.resolution_failures),
            dht_routing_table_size: dht.routing().len() as u64,
            dht_records_stored: dht.store().len() as u64,
            relay_reservations_granted: g(&r.reservations_granted),
            relay_reservations_refused: g(&r.reservations_refused),
            relay_circuits_opened: g(&r.circuits_opened),
            relay_circuits_refused: g(&r.circuits_refused),
            relay_forwarded_packets: g(&p.forwarded_packets),
            relay_forwarded_bytes: g(&p.forwarded_bytes),
            relay_dropped_unknown: g(&p.dropped_unknown),
            relay_dropped_rate_limited: g(&p.dropped_rate_limited),
            relayed_dials: g(&r.relayed_dials),
            relayed_dial_failures: g(&r.relayed_dial_failures),
            relayed_packets_sent: g(&p.client_sent),
            relayed_packets_received: g(&p.client_received),
            relay_mixed_dropped: g(&d.relay_mixed_dropped),
            relay_acquisitions: g(&r.acquisitions),
            relay_acquisition_failures: g(&r.acquisition_failures),
            relay_losses: g(&r.relay_losses),
            handshakes_x25519mlkem768: h.hybrid(),
            handshakes_x25519: h.x25519(),
            handshakes_other_group: h.other(),
        }
    }
}
