//! The birthday technique (see reach-proto's `punch::birthday`): the hard
//! side (endpoint-dependent mapping) opens many sockets, so its NAT makes
//! many mappings towards the easy side; the easy side probes random ports
//! of the hard side's IP from its main socket until one hits. The hard
//! side's socket that got the probe then carries the QUIC connection: a
//! client-only QUIC endpoint is made on it, and lives as long as that
//! connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use reach_proto::punch::Introduction;
use reach_proto::punch::birthday::{
    BIRTHDAY_PROBE_RATE, BIRTHDAY_PROBES, BIRTHDAY_SOCKETS, probe_ports,
};
use reach_proto::wire::datagram::{ControlPacket, MAX_CONTROL_PACKET_LEN};
use tokio::time::Instant;

use super::{PUNCH_TIMEOUT, PunchError, PunchRuntime};

/// Rounds of packets each of the hard side's sockets sends (its mapping
/// must exist before the easy side's probe arrives, and a repeat lets an
/// easy side whose NAT filters only by address answer at once).
pub const HARD_SIDE_ROUNDS: u32 = 3;
/// Gap between those rounds.
pub const HARD_SIDE_ROUND_GAP: Duration = Duration::from_millis(300);
/// The easy side starts probing this long after the fire time, so the
/// hard side's first round of mappings exists when the probes arrive.
pub const EASY_SIDE_HEAD_START: Duration = Duration::from_millis(20);
/// The easy side sends its probes in bursts this far apart.
pub const PROBE_TICK: Duration = Duration::from_millis(10);

impl PunchRuntime {
    /// The hard side: many sockets, one packet each towards the easy side per
    /// round; the first socket a valid packet from the easy side reaches wins
    /// and dials QUIC from a new endpoint on it.
    pub(super) async fn birthday_hard_side(
        &self,
        intro: &Introduction,
        started: Instant,
        deadline: Instant,
    ) -> Result<Duration, PunchError> {
        let target = intro.addrs[0];
        let bind = SocketAddr::new(self.core.local_addr.ip(), 0);
        let binder = self.binder.clone();
        let opened = tokio::task::spawn_blocking(move || binder(bind, BIRTHDAY_SOCKETS))
            .await
            .map_err(|_| PunchError::Abandoned("the socket task failed"))?
            .map_err(|e| {
                tracing::debug!(error = %e, "birthday: no sockets");
                PunchError::Abandoned("could not open any socket")
            })?;
        let sockets: Vec<Arc<tokio::net::UdpSocket>> = opened
            .into_iter()
            .filter_map(|s| {
                s.set_nonblocking(true).ok()?;
                tokio::net::UdpSocket::from_std(s).ok().map(Arc::new)
            })
            .collect();
        if sockets.is_empty() {
            return Err(PunchError::Abandoned("could not open any socket"));
        }
        let id = intro.id;
        let punch = ControlPacket::Punch { id }.encode();
        let mut waits: FuturesUnordered<_> = sockets
            .iter()
            .cloned()
            .map(|s| async move {
                let mut buf = [0u8; MAX_CONTROL_PACKET_LEN];
                loop {
                    let (n, from) = s.recv_from(&mut buf).await.ok()?;
                    let ours = matches!(
                        ControlPacket::decode(&buf[..n]),
                        Ok(ControlPacket::Punch { id: i } | ControlPacket::PunchAck { id: i }) if i == id
                    );
                    if ours && from.ip() == target.ip() {
                        return Some((s, from));
                    }
                }
            })
            .collect();
        let mut round = 0;
        let mut rounds = tokio::time::interval(HARD_SIDE_ROUND_GAP);
        let (winner, from) = loop {
            tokio::select! {
                _ = rounds.tick(), if round < HARD_SIDE_ROUNDS => {
                    for s in &sockets {
                        let _ = s.try_send_to(&punch, target);
                    }
                    round += 1;
                }
                Some(found) = waits.next() => {
                    if let Some(found) = found {
                        break found;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return Err(PunchError::NoPath(PUNCH_TIMEOUT)),
            }
        };
        let time_to_direct = started.elapsed();
        let _ = winner.try_send_to(&ControlPacket::PunchAck { id }.encode(), from);
        // Only the winner lives on.
        drop(waits);
        drop(sockets);
        let socket = Arc::into_inner(winner)
            .and_then(|s| s.into_std().ok())
            .ok_or(PunchError::Abandoned("the winning socket is still in use"))?;
        let mut config = quinn::EndpointConfig::default();
        // As on the main socket: the easy side's shared socket tells QUIC
        // from its other packets by the fixed bit.
        config.grease_quic_bit(false);
        let endpoint = quinn::Endpoint::new(config, None, socket, Arc::new(quinn::TokioRuntime))
            .map_err(|e| PunchError::Handshake(e.to_string()))?;
        if let Err(e) = self
            .dial_and_register(&endpoint, intro.peer, from, deadline)
            .await
        {
            endpoint.close(0u32.into(), b"");
            return Err(e);
        }
        // The endpoint lives until its connection closes, or the node stops.
        self.keep_endpoint(endpoint);
        Ok(time_to_direct)
    }

    /// The easy side: probes distinct random ports of the hard side's IP from
    /// the main socket, within the probe budget and rate, until the hard side
    /// answers; then waits for its handshake.
    pub(super) async fn birthday_easy_side(
        &self,
        intro: &Introduction,
        started: Instant,
        deadline: Instant,
    ) -> Result<Duration, PunchError> {
        let hard_ip = intro.addrs[0].ip();
        let (_pending, mut arrivals) = self.expect(intro.id, &intro.addrs);
        tokio::time::sleep(EASY_SIDE_HEAD_START).await;
        let seed = crate::util::random_u64().unwrap_or(intro.id);
        let mut ports = probe_ports(seed).take(BIRTHDAY_PROBES);
        let per_tick =
            (BIRTHDAY_PROBE_RATE as u128 * PROBE_TICK.as_millis() / 1000).max(1) as usize;
        let probe = ControlPacket::Punch { id: intro.id }.encode();
        let mut tick = tokio::time::interval(PROBE_TICK);
        let mut exhausted = false;
        let from = loop {
            tokio::select! {
                _ = tick.tick(), if !exhausted => {
                    for _ in 0..per_tick {
                        match ports.next() {
                            Some(p) => {
                                let _ = self.core.socket.send_datagram(SocketAddr::new(hard_ip, p), &probe);
                            }
                            None => {
                                exhausted = true;
                                break;
                            }
                        }
                    }
                }
                Some(from) = arrivals.recv() => break from,
                true = self.wait_direct(&intro.peer, deadline) => return Ok(started.elapsed()),
                _ = tokio::time::sleep_until(deadline) => return Err(PunchError::NoPath(PUNCH_TIMEOUT)),
            }
        };
        let time_to_direct = started.elapsed();
        tracing::debug!(%from, "birthday: the hard side answered");
        if self.wait_direct(&intro.peer, deadline).await {
            Ok(time_to_direct)
        } else {
            Err(PunchError::Handshake("no handshake arrived".into()))
        }
    }
}
