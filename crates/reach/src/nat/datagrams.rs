//! Non-QUIC datagrams on the shared socket: reach control packets (address
//! probes, filtering tests, punch packets) and STUN (client and server).
//!
//! Safety of the network: every answer goes only to the source address of
//! the packet that asked for it, answers are never larger than requests
//! (requests are padded), and all answers share one rate limit. The one
//! packet sent elsewhere, a relayed filter probe, is sent only on behalf of
//! an authenticated peer (asked over its QUIC connection), to the address
//! that peer observed, and under the same rate limit.

use std::net::SocketAddr;
use std::sync::Arc;

use reach_proto::wire::datagram::{ControlPacket, DatagramKind, FilterVia, PROBE_RETRY_AFTER};
use reach_proto::wire::envelope::Body;
use reach_proto::wire::stun;
use tokio::sync::mpsc;

use super::Nat;
use crate::node::stats;
use crate::socket::NonQuicDatagram;

/// Answers (probe replies, filter probes, STUN responses) a node sends per
/// second at most, whoever asks: answering is cheap, but a node must not
/// become a packet cannon.
pub const MAX_REPLIES_PER_SEC: u32 = 1000;

impl Nat {
    /// Handles non-QUIC datagrams until the node stops.
    pub(crate) async fn datagram_loop(self: Arc<Self>, mut rx: mpsc::Receiver<NonQuicDatagram>) {
        while let Some(d) = rx.recv().await {
            match d.kind {
                DatagramKind::Control => self.handle_control(&d),
                DatagramKind::Stun => self.handle_stun(&d),
                _ => {}
            }
        }
    }

    /// Serves a filter-probe request
    /// ([`reach_proto::wire::envelope::protocols::FILTER_PROBE`]): a peer asked
    /// us (over QUIC) to send the unsolicited probe of another node's filtering
    /// test to `target`. No answer.
    pub(crate) fn serve_filter_probe(&self, s: crate::node::router::Inbound) {
        if let Body::FilterProbeRequest { nonce, target } = s.head.body {
            self.send_filter_probe(nonce, target);
        }
    }

    fn send_filter_probe(&self, nonce: u64, target: SocketAddr) {
        if !self.allow_reply() {
            stats::bump(&self.core.counters.probes_refused);
            return;
        }
        let probe = ControlPacket::FilterProbe { nonce }.encode();
        if self.core.socket.send_datagram(target, &probe).is_ok() {
            stats::bump(&self.core.counters.probes_answered);
        }
    }

    fn reply(&self, to: SocketAddr, request_len: usize, bytes: &[u8]) {
        // Never answer with more bytes than were sent to us.
        if bytes.len() > request_len || !self.allow_reply() {
            stats::bump(&self.core.counters.probes_refused);
            return;
        }
        if self.core.socket.send_datagram(to, bytes).is_ok() {
            stats::bump(&self.core.counters.probes_answered);
        }
    }

    fn handle_control(self: &Arc<Self>, d: &NonQuicDatagram) {
        let Ok(packet) = ControlPacket::decode(&d.data) else {
            tracing::trace!(from = %d.from, "malformed control packet dropped");
            return;
        };
        match packet {
            ControlPacket::Probe { nonce } => {
                let answer = ControlPacket::ProbeReply {
                    nonce,
                    observed: d.from,
                }
                .encode();
                self.reply(d.from, d.data.len(), &answer);
            }
            ControlPacket::ProbeReply { nonce, observed } => {
                // Only an answer to a probe we sent, from where we sent it,
                // counts as a report of our external address.
                if self.pending.probes.complete(nonce, d.from, observed) {
                    self.record_observed(observed, d.from);
                }
            }
            ControlPacket::FilterTest {
                nonce,
                via,
                exclude,
            } => {
                if !self.allow_reply() {
                    stats::bump(&self.core.counters.probes_refused);
                    return;
                }
                let probe = ControlPacket::FilterProbe { nonce }.encode();
                if probe.len() > d.data.len() {
                    return;
                }
                match via {
                    FilterVia::OtherPort => self.send_from_other_port(d.from, &probe),
                    FilterVia::MappedPort(port) => {
                        self.send_from_other_port(SocketAddr::new(d.from.ip(), port), &probe);
                    }
                    FilterVia::OtherHost => {
                        // A connected peer at an IP the requester never sent to.
                        let helper = self.peers.connected().into_iter().find(|p| {
                            !crate::vaddr::is_virtual(&p.addr)
                                && p.addr.ip() != self.core.local_addr.ip()
                                && p.addr.ip() != d.from.ip()
                                && !exclude.contains(&p.addr.ip())
                        });
                        if let Some(conn) = helper.and_then(|h| self.peers.live(&h.peer)) {
                            let target = d.from;
                            self.core.spawn(async move {
                                let ask = crate::node::rpc::tell(
                                    &conn,
                                    Body::FilterProbeRequest { nonce, target },
                                );
                                let _ = tokio::time::timeout(PROBE_RETRY_AFTER, ask).await;
                            });
                        }
                    }
                }
            }
            ControlPacket::FilterProbe { nonce } => {
                let _ = self.pending.filter.complete(nonce, d.from, d.from);
            }
            ControlPacket::Punch { .. } | ControlPacket::PunchAck { .. } => {
                self.punch_packet(d.from, &packet);
            }
        }
    }

    /// Sends `bytes` to `to` from a fresh socket on our IP: a port the
    /// requester never sent to (RFC 5780's alternate port).
    fn send_from_other_port(&self, to: SocketAddr, bytes: &[u8]) {
        match self.alt_socket() {
            Ok(sock) => {
                let _ = sock.send_to(bytes, to);
            }
            Err(e) => tracing::debug!(error = %e, "no alternate port for a filter test"),
        }
    }

    fn handle_stun(&self, d: &NonQuicDatagram) {
        let Ok(msg) = stun::decode(&d.data) else {
            return;
        };
        match msg.method_class {
            stun::BINDING_REQUEST if self.stun_server() => {
                let answer = stun::binding_response(msg.transaction, d.from);
                // A STUN response is 12 bytes longer than a bare request; STUN
                // clients expect that, so the limit here is the rate limit.
                if self.allow_reply() && self.core.socket.send_datagram(d.from, &answer).is_ok() {
                    stats::bump(&self.core.counters.stun_answered);
                }
            }
            stun::BINDING_SUCCESS => {
                if let Some(mapped) = msg.mapped {
                    let _ = self.pending.stun.complete(msg.transaction, d.from, mapped);
                }
            }
            _ => {}
        }
    }
}
