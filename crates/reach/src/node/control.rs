//! Non-QUIC datagrams on the shared socket: reach control packets (address
//! probes today; punch and classification probes later) and STUN.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reach_proto::wire::datagram::{ControlPacket, DatagramKind, PROBE_ATTEMPTS, PROBE_RETRY_AFTER};
use tokio::sync::{mpsc, oneshot};

use super::{Inner, stats};
use crate::error::{Error, Result};
use crate::socket::NonQuicDatagram;

/// Probe replies a node sends per second at most, whoever asks: answering is
/// cheap, but a node must not become a packet cannon.
pub const MAX_PROBE_REPLIES_PER_SEC: u32 = 1000;
/// Outstanding probes this node waits on at most.
pub const MAX_PENDING_PROBES: usize = 256;

/// Probes sent by this node that await a reply, by nonce.
#[derive(Default)]
pub(crate) struct PendingProbes {
    waiting: Mutex<HashMap<u64, (SocketAddr, oneshot::Sender<SocketAddr>)>>,
}

impl PendingProbes {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, (SocketAddr, oneshot::Sender<SocketAddr>)>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Handles non-QUIC datagrams until the node stops.
pub(crate) async fn datagram_loop(inner: Arc<Inner>, mut rx: mpsc::Receiver<NonQuicDatagram>) {
    let mut limiter = RateLimiter::new(MAX_PROBE_REPLIES_PER_SEC);
    while let Some(d) = rx.recv().await {
        // STUN is recognised and counted by the demultiplexer; answering and
        // sending Binding requests belongs to the NAT-awareness capability.
        if d.kind == DatagramKind::Control {
            handle_control(&inner, &d, &mut limiter);
        }
    }
}

fn handle_control(inner: &Inner, d: &NonQuicDatagram, limiter: &mut RateLimiter) {
    let Ok(packet) = ControlPacket::decode(&d.data) else {
        tracing::trace!(from = %d.from, "malformed control packet dropped");
        return;
    };
    match packet {
        ControlPacket::Probe { nonce } => {
            let reply = ControlPacket::ProbeReply {
                nonce,
                observed: d.from,
            }
            .encode();
            // Never answer with more bytes than were sent to us, and only
            // to the address the request came from.
            if reply.len() > d.data.len() || !limiter.allow(Instant::now()) {
                stats::bump(&inner.counters.probes_refused);
                return;
            }
            if inner.socket.send_datagram(d.from, &reply).is_ok() {
                stats::bump(&inner.counters.probes_answered);
            }
        }
        ControlPacket::ProbeReply { nonce, observed } => {
            let mut waiting = inner.probes.lock();
            // Only the address we probed may answer a probe.
            if waiting.get(&nonce).is_some_and(|(to, _)| *to == d.from)
                && let Some((_, tx)) = waiting.remove(&nonce)
            {
                let _ = tx.send(observed);
            }
        }
    }
}

/// Sends probes to `addr` until one is answered or attempts run out.
pub(crate) async fn probe(inner: &Arc<Inner>, addr: SocketAddr) -> Result<SocketAddr> {
    let mut nonce_bytes = [0u8; 8];
    getrandom::fill(&mut nonce_bytes).map_err(|e| Error::Config(format!("random: {e}")))?;
    let nonce = u64::from_le_bytes(nonce_bytes);
    let (tx, mut rx) = oneshot::channel();
    {
        let mut waiting = inner.probes.lock();
        if waiting.len() >= MAX_PENDING_PROBES {
            return Err(Error::Config(format!(
                "too many probes in flight (limit {MAX_PENDING_PROBES})"
            )));
        }
        waiting.insert(nonce, (addr, tx));
    }
    let packet = ControlPacket::Probe { nonce }.encode();
    let mut result = Err(Error::Timeout("address probe"));
    for _ in 0..PROBE_ATTEMPTS {
        let _ = inner.socket.send_datagram(addr, &packet);
        match tokio::time::timeout(PROBE_RETRY_AFTER, &mut rx).await {
            Ok(Ok(observed)) => {
                result = Ok(observed);
                break;
            }
            Ok(Err(_)) => break,
            Err(_) => continue,
        }
    }
    inner.probes.lock().remove(&nonce);
    result
}

/// A fixed-window rate limiter (per second). Coarse, but enough to bound
/// what a node sends in answer to unsolicited packets.
struct RateLimiter {
    per_sec: u32,
    window_start: Option<Instant>,
    used: u32,
}

impl RateLimiter {
    fn new(per_sec: u32) -> Self {
        RateLimiter {
            per_sec,
            window_start: None,
            used: 0,
        }
    }

    fn allow(&mut self, now: Instant) -> bool {
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
