//! Non-QUIC datagrams on the shared socket: reach control packets (address
//! probes, filtering tests) and STUN (client and server).
//!
//! Safety of the network: every answer goes only to the source address of
//! the packet that asked for it, answers are never larger than requests
//! (requests are padded), and all answers share one rate limit. The one
//! packet sent elsewhere, a relayed filter probe, is sent only on behalf of
//! an authenticated peer (asked over its QUIC connection), to the address
//! that peer observed, and under the same rate limit.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reach_proto::wire::datagram::{
    ControlPacket, DatagramKind, FilterVia, PROBE_ATTEMPTS, PROBE_RETRY_AFTER,
};
use reach_proto::wire::envelope::{Body, Envelope};
use reach_proto::wire::stun;
use tokio::sync::{mpsc, oneshot};

use super::{Inner, stats};
use crate::error::{Error, Result};
use crate::socket::NonQuicDatagram;

/// Answers (probe replies, filter probes, STUN responses) a node sends per
/// second at most, whoever asks: answering is cheap, but a node must not
/// become a packet cannon.
pub const MAX_REPLIES_PER_SEC: u32 = 1000;
/// Outstanding requests of one kind this node waits on at most.
pub const MAX_PENDING: usize = 256;

/// One waiting request: who may answer, and where the (sender, value)
/// answer goes.
type Waiter = (
    Option<SocketAddr>,
    oneshot::Sender<(SocketAddr, SocketAddr)>,
);

/// Requests this node sent that await an answer, by id. The answer must
/// come from `expect_from` when set.
pub(crate) struct Waiters<K> {
    map: Mutex<HashMap<K, Waiter>>,
}

impl<K> Default for Waiters<K> {
    fn default() -> Self {
        Waiters {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Copy> Waiters<K> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Waiter>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(
        &self,
        key: K,
        expect_from: Option<SocketAddr>,
    ) -> Result<oneshot::Receiver<(SocketAddr, SocketAddr)>> {
        let mut m = self.lock();
        if m.len() >= MAX_PENDING {
            return Err(Error::Config(format!(
                "too many requests in flight (limit {MAX_PENDING})"
            )));
        }
        let (tx, rx) = oneshot::channel();
        m.insert(key, (expect_from, tx));
        Ok(rx)
    }

    /// Completes the waiter for `key` with (sender, value) if `from` is
    /// allowed to answer it.
    /// Returns whether an answer was expected (only those are believed).
    fn complete(&self, key: K, from: SocketAddr, value: SocketAddr) -> bool {
        let mut m = self.lock();
        if m.get(&key)
            .is_some_and(|(e, _)| e.is_none_or(|e| e == from))
            && let Some((_, tx)) = m.remove(&key)
        {
            let _ = tx.send((from, value));
            return true;
        }
        false
    }

    fn cancel(&self, key: K) {
        self.lock().remove(&key);
    }
}

/// All the kinds of waiters.
#[derive(Default)]
pub(crate) struct PendingProbes {
    pub probes: Waiters<u64>,
    pub filter: Waiters<u64>,
    pub stun: Waiters<stun::TransactionId>,
}

/// Handles non-QUIC datagrams until the node stops.
pub(crate) async fn datagram_loop(inner: Arc<Inner>, mut rx: mpsc::Receiver<NonQuicDatagram>) {
    while let Some(d) = rx.recv().await {
        let mut limiter = inner.replies.lock().unwrap_or_else(|p| p.into_inner());
        match d.kind {
            DatagramKind::Control => handle_control(&inner, &d, &mut limiter),
            DatagramKind::Stun => handle_stun(&inner, &d, &mut limiter),
            _ => {}
        }
    }
}

/// A peer asked us (over QUIC) to send the unsolicited probe of another
/// node's filtering test to `target`.
/// How filter-probe requests are served
/// ([`reach_proto::wire::envelope::protocols::FILTER_PROBE`]): no answer.
pub(crate) fn filter_probe_handler() -> super::router::Handler {
    Arc::new(|inner, s| {
        Box::pin(async move {
            if let reach_proto::wire::envelope::Body::FilterProbeRequest { nonce, target } =
                s.head.body
            {
                send_filter_probe(&inner, nonce, target);
            }
        })
    })
}

pub(crate) fn send_filter_probe(inner: &Inner, nonce: u64, target: SocketAddr) {
    let allowed = inner
        .replies
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .allow(Instant::now());
    if !allowed {
        stats::bump(&inner.counters.probes_refused);
        return;
    }
    let probe = ControlPacket::FilterProbe { nonce }.encode();
    if inner.socket.send_datagram(target, &probe).is_ok() {
        stats::bump(&inner.counters.probes_answered);
    }
}

fn reply(
    inner: &Inner,
    limiter: &mut RateLimiter,
    to: SocketAddr,
    request_len: usize,
    bytes: &[u8],
) {
    // Never answer with more bytes than were sent to us.
    if bytes.len() > request_len || !limiter.allow(Instant::now()) {
        stats::bump(&inner.counters.probes_refused);
        return;
    }
    if inner.socket.send_datagram(to, bytes).is_ok() {
        stats::bump(&inner.counters.probes_answered);
    }
}

fn handle_control(inner: &Arc<Inner>, d: &NonQuicDatagram, limiter: &mut RateLimiter) {
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
            reply(inner, limiter, d.from, d.data.len(), &answer);
        }
        ControlPacket::ProbeReply { nonce, observed } => {
            // Only an answer to a probe we sent, from where we sent it,
            // counts as a report of our external address.
            if inner.probes.probes.complete(nonce, d.from, observed) {
                inner.observed_addr(observed, d.from);
            }
        }
        ControlPacket::FilterTest {
            nonce,
            via,
            exclude,
        } => {
            if !limiter.allow(Instant::now()) {
                stats::bump(&inner.counters.probes_refused);
                return;
            }
            let probe = ControlPacket::FilterProbe { nonce }.encode();
            if probe.len() > d.data.len() {
                return;
            }
            match via {
                FilterVia::OtherPort => send_from_other_port(inner, d.from, &probe),
                FilterVia::OtherHost => {
                    // A connected peer at an IP the requester never sent to.
                    let helper = inner.peers.connected().into_iter().find(|p| {
                        !crate::relay::paths::is_virtual(&p.addr)
                            && p.addr.ip() != inner.local_addr.ip()
                            && p.addr.ip() != d.from.ip()
                            && !exclude.contains(&p.addr.ip())
                    });
                    if let Some(conn) = helper.and_then(|h| inner.peers.live(&h.peer)) {
                        let target = d.from;
                        inner.spawn(async move {
                            let ask = async {
                                let (mut send, _recv) = conn.open_bi().await.ok()?;
                                let frame =
                                    Envelope::new(Body::FilterProbeRequest { nonce, target })
                                        .to_frame()
                                        .ok()?;
                                send.write_all(&frame).await.ok()?;
                                send.finish().ok()
                            };
                            let _ = tokio::time::timeout(PROBE_RETRY_AFTER, ask).await;
                        });
                    }
                }
            }
        }
        ControlPacket::FilterProbe { nonce } => {
            let _ = inner.probes.filter.complete(nonce, d.from, d.from);
        }
        ControlPacket::Punch { .. } | ControlPacket::PunchAck { .. } => {
            crate::punch::on_packet(inner, d.from, &packet);
        }
    }
}

/// Sends `bytes` to `to` from a fresh socket on our IP: a port the
/// requester never sent to (RFC 5780's alternate port).
fn send_from_other_port(inner: &Inner, to: SocketAddr, bytes: &[u8]) {
    match inner.alt_socket() {
        Ok(sock) => {
            let _ = sock.send_to(bytes, to);
        }
        Err(e) => tracing::debug!(error = %e, "no alternate port for a filter test"),
    }
}

fn handle_stun(inner: &Inner, d: &NonQuicDatagram, limiter: &mut RateLimiter) {
    let Ok(msg) = stun::decode(&d.data) else {
        return;
    };
    match msg.method_class {
        stun::BINDING_REQUEST if inner.stun_server => {
            let answer = stun::binding_response(msg.transaction, d.from);
            // A STUN response is 12 bytes longer than a bare request; STUN
            // clients expect that, so the limit here is the rate limit.
            if limiter.allow(Instant::now()) && inner.socket.send_datagram(d.from, &answer).is_ok()
            {
                stats::bump(&inner.counters.stun_answered);
            }
        }
        stun::BINDING_SUCCESS => {
            if let Some(mapped) = msg.mapped {
                let _ = inner.probes.stun.complete(msg.transaction, d.from, mapped);
            }
        }
        _ => {}
    }
}

pub(crate) fn random_u64() -> Result<u64> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| Error::Config(format!("random: {e}")))?;
    Ok(u64::from_le_bytes(b))
}

/// Sends `packet` to `to` up to [`PROBE_ATTEMPTS`] times until `rx` fires.
async fn retry_until<T>(
    inner: &Inner,
    to: SocketAddr,
    packet: &[u8],
    mut rx: oneshot::Receiver<T>,
    wait: Duration,
) -> Option<T> {
    for _ in 0..PROBE_ATTEMPTS {
        let _ = inner.socket.send_datagram(to, packet);
        match tokio::time::timeout(wait, &mut rx).await {
            Ok(Ok(v)) => return Some(v),
            Ok(Err(_)) => return None,
            Err(_) => continue,
        }
    }
    None
}

/// Asks `addr` which address it sees us at.
pub(crate) async fn probe(inner: &Arc<Inner>, addr: SocketAddr) -> Result<SocketAddr> {
    let nonce = random_u64()?;
    let rx = inner.probes.probes.register(nonce, Some(addr))?;
    let packet = ControlPacket::Probe { nonce }.encode();
    let got = retry_until(inner, addr, &packet, rx, PROBE_RETRY_AFTER).await;
    inner.probes.probes.cancel(nonce);
    got.map(|(_, observed)| observed)
        .ok_or(Error::Timeout("address probe"))
}

/// Runs one filtering test through `helper`: whether an unsolicited probe
/// sent as `via` reaches us. `Ok(false)` when none arrived in time.
pub(crate) async fn filter_test(
    inner: &Arc<Inner>,
    helper: SocketAddr,
    via: FilterVia,
    exclude: Vec<std::net::IpAddr>,
) -> Result<bool> {
    Ok(filter_probe_source(inner, helper, via, exclude)
        .await?
        .is_some())
}

/// Like [`filter_test`], returning where the probe came from.
pub(crate) async fn filter_probe_source(
    inner: &Arc<Inner>,
    helper: SocketAddr,
    via: FilterVia,
    exclude: Vec<std::net::IpAddr>,
) -> Result<Option<SocketAddr>> {
    let nonce = random_u64()?;
    let rx = inner.probes.filter.register(nonce, None)?;
    let packet = ControlPacket::FilterTest {
        nonce,
        via,
        exclude,
    }
    .encode();
    let got = retry_until(inner, helper, &packet, rx, PROBE_RETRY_AFTER).await;
    inner.probes.filter.cancel(nonce);
    Ok(got.map(|(from, _)| from))
}

/// Asks the STUN server at `server` for our reflexive address.
pub(crate) async fn stun_binding(inner: &Arc<Inner>, server: SocketAddr) -> Result<SocketAddr> {
    let mut tx = [0u8; 12];
    getrandom::fill(&mut tx).map_err(|e| Error::Config(format!("random: {e}")))?;
    let rx = inner.probes.stun.register(tx, Some(server))?;
    let packet = stun::binding_request(tx);
    let got = retry_until(inner, server, &packet, rx, PROBE_RETRY_AFTER).await;
    inner.probes.stun.cancel(tx);
    got.map(|(_, mapped)| mapped)
        .ok_or(Error::Timeout("STUN binding request"))
}

/// A fixed-window rate limiter (per second). Coarse, but enough to bound
/// what a node sends in answer to unsolicited packets.
pub(crate) struct RateLimiter {
    per_sec: u32,
    window_start: Option<Instant>,
    used: u32,
}

impl RateLimiter {
    pub(crate) fn new(per_sec: u32) -> Self {
        RateLimiter {
            per_sec,
            window_start: None,
            used: 0,
        }
    }

    pub(crate) fn allow(&mut self, now: Instant) -> bool {
        let fresh = self
            .window_start
            .is_none_or(|s| now.duration_since(s) >= Duration::from_secs(1));
        if fresh {
            self.window_start = Some(now);
            self.used = 0;
        }
        if self.used < self.per_sec {
            self.used += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_caps_each_window() {
        let mut l = RateLimiter::new(3);
        let t0 = Instant::now();
        assert!((0..3).all(|_| l.allow(t0)));
        assert!(!l.allow(t0 + Duration::from_millis(999)));
        assert!(l.allow(t0 + Duration::from_secs(1)));
    }
}
