//! Watching a direct path that replaced a relayed one.
//!
//! QUIC would notice a dead path only after its idle timeout (a minute);
//! meanwhile every send would hang. A direct connection that has a relayed
//! standby is watched instead: when nothing has arrived on it for
//! [`PING_AFTER`], a QUIC datagram (ack-eliciting, so the peer answers) is
//! sent; when nothing has arrived for [`DIRECT_PATH_DEAD`], the path counts
//! as dead: the relayed standby takes over in the peer table and the direct
//! connection is closed, which fails the sends waiting on it, and
//! `Node::send` then sends again over the relay.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reach_proto::PeerId;

use crate::node::Inner;

/// How often the watch looks at the connection's receive counter.
pub const LIVENESS_TICK: Duration = Duration::from_millis(250);
/// Silence after which the watch elicits an answer.
pub const PING_AFTER: Duration = Duration::from_secs(1);
/// Silence after which the direct path counts as dead: three pings
/// unanswered, far above any RTT a direct path that beat its relay has.
pub const DIRECT_PATH_DEAD: Duration = Duration::from_secs(3);
/// Close code of a direct connection whose path died.
pub const PATH_DEAD_CODE: u32 = 0x50;

/// Watches `conn`, `peer`'s direct connection, while it is in use.
pub(crate) fn watch(inner: &Arc<Inner>, peer: PeerId, conn: quinn::Connection) {
    let inner2 = inner.clone();
    inner.spawn(async move {
        let mut last_rx = conn.stats().udp_rx.datagrams;
        let mut quiet = Duration::ZERO;
        let mut tick = tokio::time::interval(LIVENESS_TICK);
        loop {
            tokio::select! {
                _ = conn.closed() => return,
                // The peer's pings: read and dropped, so they never pile up.
                d = conn.read_datagram() => if d.is_err() { return },
                _ = tick.tick() => {}
            }
            let rx = conn.stats().udp_rx.datagrams;
            if rx != last_rx {
                last_rx = rx;
                quiet = Duration::ZERO;
                continue;
            }
            quiet += LIVENESS_TICK;
            if quiet >= DIRECT_PATH_DEAD {
                break;
            }
            if quiet >= PING_AFTER {
                let _ = conn.send_datagram(Bytes::from_static(&[0]));
            }
        }
        // Move traffic to the standby before the close fails the sends
        // in progress, so their retry finds it.
        if inner2.peers.remove_if_current(peer, conn.stable_id()) {
            inner2.punch.fell_back();
            tracing::debug!(%peer, "direct path lost: back on the relay");
        }
        conn.close(PATH_DEAD_CODE.into(), b"direct path lost");
    });
}
