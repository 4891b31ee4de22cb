//! The relay's needs below it, and its place in the node: NAT discovery's
//! reachability check and the endpoint record's owner reach the relay
//! through [`ReachabilityCheck`] and [`RecordPublisher`], implemented here
//! over today's functions (they still take the whole node); the relay
//! itself serves its protocol, dials circuits for the peers and observes
//! their connections.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use futures::future::BoxFuture;
use reach_proto::PeerId;
use reach_proto::wire::envelope::protocols;

use crate::node::Inner;
use crate::node::bridge::Bridge;
use crate::peers::{Circuits, ConnectionObserver};
use crate::relay::{Reachability, ReachabilityCheck, RecordPublisher};

impl ReachabilityCheck for Bridge {
    fn check_reachability(&self) -> BoxFuture<'_, Reachability> {
        Box::pin(async move {
            match self.0.upgrade() {
                Some(inner) => inner.nat.check_reachability().await,
                None => Reachability::Unknown,
            }
        })
    }
}

impl RecordPublisher for Bridge {
    fn relay_changed(&self, _held: Option<(PeerId, SocketAddr)>) {
        // The advertiser still reads the held relay from the relay itself
        // when it composes the record.
    }

    fn publish(&self) -> BoxFuture<'_, usize> {
        Box::pin(async move {
            match self.0.upgrade() {
                Some(inner) => crate::advertise::publish(&inner).await,
                None => 0,
            }
        })
    }
}

/// Plugs the relay in: its protocol's handler, what it needs below it, and
/// its hooks into the peers (the dialer's circuits, a connection observer).
pub(in crate::node) fn plug_in(inner: &Arc<Inner>) {
    let relay = &inner.relay;
    inner
        .router
        .register_builtin(protocols::RELAY, relay.stream_handler());
    let bridge = Arc::downgrade(&inner.bridge);
    relay.set_reachability_check(bridge.clone());
    relay.set_publisher(bridge);
    inner
        .peers
        .set_circuits(Arc::downgrade(relay) as Weak<dyn Circuits>);
    inner
        .peers
        .observe(Arc::downgrade(relay) as Weak<dyn ConnectionObserver>);
}
