//! Simultaneous open (and LAN-first): both sides send punch packets from
//! the main socket to the addresses the coordinator gave them, so each NAT
//! has a mapping towards the other when the other's packets arrive. The
//! dialer starts the QUIC handshake to the address the first packet from
//! the other side came from; the listener keeps punching until the
//! handshake arrives.

use std::time::Duration;

use reach_proto::punch::{Introduction, Role};
use reach_proto::wire::datagram::ControlPacket;
use tokio::time::Instant;

use super::{PUNCH_TIMEOUT, PunchError, PunchRuntime};

/// Punch packets sent per address at most in one attempt.
pub const PUNCH_PACKETS: u32 = 12;
/// Gap between them: twelve over about half a second cover the fire-time
/// error of paths up to a few hundred milliseconds.
pub const PUNCH_INTERVAL: Duration = Duration::from_millis(40);
/// Punches the listener sends on to the proven address while it waits for
/// the handshake (the dialer's NAT may need one more to open).
pub const LISTENER_EXTRA_PACKETS: u32 = PUNCH_PACKETS;

impl PunchRuntime {
    /// Carries out a simultaneous open (see the module docs).
    pub(super) async fn simultaneous_open(
        &self,
        intro: &Introduction,
        started: Instant,
        deadline: Instant,
    ) -> Result<Duration, PunchError> {
        let (_pending, mut arrivals) = self.expect(intro.id, &intro.addrs);
        let packet = ControlPacket::Punch { id: intro.id }.encode();
        let mut tick = tokio::time::interval(PUNCH_INTERVAL);
        let mut sent = 0;
        let from = loop {
            tokio::select! {
                _ = tick.tick(), if sent < PUNCH_PACKETS => {
                    for a in &intro.addrs {
                        let _ = self.core.socket.send_datagram(*a, &packet);
                    }
                    sent += 1;
                }
                Some(from) = arrivals.recv() => break from,
                // The other side dialed first and got through.
                true = self.wait_direct(&intro.peer, deadline) => return Ok(started.elapsed()),
                _ = tokio::time::sleep_until(deadline) => return Err(PunchError::NoPath(PUNCH_TIMEOUT)),
            }
        };
        let time_to_direct = started.elapsed();
        // Our NAT is open towards `from` (we sent there first, or it would not
        // have let the packet in); one more punch makes sure theirs is too.
        let _ = self.core.socket.send_datagram(from, &packet);
        match intro.role {
            Role::Dialer => {
                self.dial_and_register(&self.core.endpoint, intro.peer, from, deadline)
                    .await?;
                Ok(time_to_direct)
            }
            Role::Listener => {
                // Keep punching the proven address while waiting for the
                // dialer's handshake.
                loop {
                    tokio::select! {
                        _ = tick.tick(), if sent < PUNCH_PACKETS + LISTENER_EXTRA_PACKETS => {
                            let _ = self.core.socket.send_datagram(from, &packet);
                            sent += 1;
                        }
                        direct = self.wait_direct(&intro.peer, deadline) => {
                            return if direct {
                                Ok(time_to_direct)
                            } else {
                                Err(PunchError::Handshake("no handshake arrived".into()))
                            };
                        }
                    }
                }
            }
        }
    }
}
