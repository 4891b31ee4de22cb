//! Watching a direct path that replaced a relayed one.
//!
//! QUIC would notice a dead path only after its idle timeout (a minute);
//! meanwhile every send would hang. A direct connection that has a relayed
//! standby is watched instead (when, is reach-proto's `punch::liveness`):
//! when nothing has arrived on it for `PING_AFTER` (1 s), a QUIC datagram
//! (ack-eliciting, so the peer answers) is sent; when nothing has arrived
//! for `DIRECT_PATH_DEAD` (3 s), the path counts as dead: the relayed standby takes over in the peer table and the direct
//! connection is closed, which fails the sends waiting on it, and
//! `Node::send` then sends again over the relay.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reach_proto::PeerId;
use reach_proto::punch::liveness::{Liveness, Verdict};
use tokio::time::Instant;

use super::PunchRuntime;
use crate::node::Direction;

/// What a ping carries: one byte, read and dropped by the peer's watch.
const PING: &[u8] = &[0];
/// Close code of a direct connection whose path died.
pub const PATH_DEAD_CODE: u32 = 0x50;

impl PunchRuntime {
    /// Watches `conn`, `peer`'s direct connection, while it is in use (once
    /// per connection, however often this is called): reach-proto's
    /// [`Liveness`] says when to ping and when the path is dead.
    pub(crate) fn watch(self: &Arc<Self>, peer: PeerId, conn: quinn::Connection) {
        if !self.start_watching(&conn) {
            return;
        }
        let rt = self.clone();
        self.core.spawn(async move {
            let epoch = Instant::now();
            let mut watch = Liveness::new(conn.stats().udp_rx.datagrams, Duration::ZERO);
            while let Some(next) = watch.next_timeout() {
                tokio::select! {
                    _ = conn.closed() => break,
                    // The peer's pings: read and dropped, so they never pile
                    // up (and the counter is looked at as they arrive, so
                    // silence counts from the last one).
                    d = conn.read_datagram() => if d.is_err() { break },
                    _ = tokio::time::sleep_until(epoch + next) => {}
                }
                match watch.on_rx(conn.stats().udp_rx.datagrams, epoch.elapsed()) {
                    Verdict::Nothing => {}
                    Verdict::Ping => {
                        let _ = conn.send_datagram(Bytes::from_static(PING));
                    }
                    Verdict::Dead => {
                        rt.fall_back(peer, &conn);
                        break;
                    }
                }
            }
            rt.stop_watching(&conn);
        });
    }

    /// The direct path to `peer` died: traffic moves to the standby before
    /// the close fails the sends in progress (so their resend finds it),
    /// and the side that dialed through the relay tries punching again
    /// later.
    fn fall_back(self: &Arc<Self>, peer: PeerId, conn: &quinn::Connection) {
        if self.peers.remove_if_current(peer, conn.stable_id()) {
            self.moved_to_standby(peer);
        }
        conn.close(PATH_DEAD_CODE.into(), b"direct path lost");
    }

    /// Traffic to `peer` moved from a dead direct connection (ours noticed,
    /// or the peer closed it) to the relayed standby: counted, and the side
    /// that dialed through the relay punches again after
    /// [`super::REPUNCH_AFTER_FALLBACK`].
    pub(crate) fn moved_to_standby(self: &Arc<Self>, peer: PeerId) {
        self.fell_back();
        tracing::debug!(%peer, "direct path lost: back on the relay");
        if let Some((relayed, Direction::Outbound)) = self.peers.live_with_direction(&peer)
            && let Some(path) = self.relay.paths.path(&relayed.remote_address())
        {
            self.drive(|m, now| m.fell_back(peer, path.relay, now));
        }
    }
}
