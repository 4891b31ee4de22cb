//! Hole punching's place in the node: it rides on relay signalling (the
//! relay's [`PunchSignals`]), observes the peers' connections and takes
//! its packets from NAT discovery's datagram loop ([`PunchPackets`]).

use std::sync::{Arc, Weak};

use crate::nat::PunchPackets;
use crate::node::Inner;
use crate::peers::ConnectionObserver;
use crate::relay::PunchSignals;

/// Plugs hole punching into the relay and the peers (after the relay, so
/// a relayed connection is watched before punching reacts to it).
pub(in crate::node) fn plug_in(inner: &Arc<Inner>) {
    let punch = &inner.punch;
    inner
        .relay
        .set_punch(Arc::downgrade(punch) as Weak<dyn PunchSignals>);
    inner
        .peers
        .observe(Arc::downgrade(punch) as Weak<dyn ConnectionObserver>);
    inner
        .nat
        .set_punch_packets(Arc::downgrade(punch) as Weak<dyn PunchPackets>);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    /// How long a stopped node's aborted tasks get to let go of what they
    /// held (they are dropped when the runtime next polls them).
    const RELEASE_DEADLINE: Duration = Duration::from_secs(5);

    /// Punching holds the relay and the relay holds punching (its
    /// signals): one of the two links must be weak, or neither is ever
    /// freed and every stopped node leaks its sockets and state.
    #[tokio::test]
    async fn a_stopped_and_dropped_node_frees_its_relay_and_punching() {
        let node = crate::Node::builder()
            .bind("127.0.0.1:0".parse().unwrap())
            .spawn()
            .await
            .unwrap();
        let relay = Arc::downgrade(&node.inner.relay);
        let punch = Arc::downgrade(&node.inner.punch);
        node.shutdown().await;
        drop(node);
        let deadline = tokio::time::Instant::now() + RELEASE_DEADLINE;
        while relay.strong_count() > 0 || punch.strong_count() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "still held after {RELEASE_DEADLINE:?}: relay {} times, punching {} times",
                relay.strong_count(),
                punch.strong_count()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
