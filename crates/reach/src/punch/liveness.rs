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

use super::REPUNCH_AFTER_FALLBACK;
use crate::node::{Direction, Inner};

/// How often the watch looks at the connection's receive counter.
pub const LIVENESS_TICK: Duration = Duration::from_millis(250);
/// Silence after which the watch elicits an answer.
pub const PING_AFTER: Duration = Duration::from_secs(1);
/// Silence after which the direct path counts as dead: two seconds of
/// pings (one per tick after the first second) unanswered, far above any
/// RTT of a direct path that beat its relay. An idle watched connection
/// thus costs about one small packet per second each way.
pub const DIRECT_PATH_DEAD: Duration = Duration::from_secs(3);
/// What a ping carries: one byte, read and dropped by the peer's watch.
const PING: &[u8] = &[0];
/// Close code of a direct connection whose path died.
pub const PATH_DEAD_CODE: u32 = 0x50;

/// Watches `conn`, `peer`'s direct connection, while it is in use (once
/// per connection, however often this is called).
pub(crate) fn watch(inner: &Arc<Inner>, peer: PeerId, conn: quinn::Connection) {
    if !inner.punch.start_watching(&conn) {
        return;
    }
    let inner2 = inner.clone();
    inner.spawn(async move {
        let mut last_rx = conn.stats().udp_rx.datagrams;
        let mut quiet = Duration::ZERO;
        let mut tick = tokio::time::interval(LIVENESS_TICK);
        loop {
            tokio::select! {
                _ = conn.closed() => break,
                // The peer's pings: read and dropped, so they never pile up.
                d = conn.read_datagram() => if d.is_err() { break },
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
                fall_back(&inner2, peer, &conn);
                break;
            }
            if quiet >= PING_AFTER {
                let _ = conn.send_datagram(Bytes::from_static(PING));
            }
        }
        inner2.punch.stop_watching(&conn);
    });
}

/// The direct path to `peer` died: traffic moves to the standby before the
/// close fails the sends in progress (so their resend finds it), and the
/// side that dialed through the relay tries punching again later.
fn fall_back(inner: &Arc<Inner>, peer: PeerId, conn: &quinn::Connection) {
    if inner.peers.remove_if_current(peer, conn.stable_id()) {
        moved_to_standby(inner, peer);
    }
    conn.close(PATH_DEAD_CODE.into(), b"direct path lost");
}

/// Traffic to `peer` moved from a dead direct connection (ours noticed, or
/// the peer closed it) to the relayed standby: counted, and the side that
/// dialed through the relay punches again after [`REPUNCH_AFTER_FALLBACK`].
pub(crate) fn moved_to_standby(inner: &Arc<Inner>, peer: PeerId) {
    inner.punch.fell_back();
    tracing::debug!(%peer, "direct path lost: back on the relay");
    if let Some((relayed, Direction::Outbound)) = inner.peers.live_with_direction(&peer)
        && let Some(path) = inner.paths.path(&relayed.remote_address())
    {
        let inner2 = inner.clone();
        inner.spawn(async move {
            tokio::time::sleep(REPUNCH_AFTER_FALLBACK).await;
            if inner2.peers.is_relayed(&peer) {
                super::start_upgrade(&inner2, peer, path.relay);
            }
        });
    }
}
