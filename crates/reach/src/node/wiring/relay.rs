//! The relay's place in the node: it serves its protocol, dials circuits
//! for the peers and observes their connections.

use std::sync::{Arc, Weak};

use reach_proto::wire::envelope::protocols;

use crate::node::Inner;
use crate::peers::{Circuits, ConnectionObserver};

/// Plugs the relay in: its protocol's handler, what it needs below it, and
/// its hooks into the peers (the dialer's circuits, a connection observer).
pub(in crate::node) fn plug_in(inner: &Arc<Inner>) {
    let relay = &inner.relay;
    inner
        .router
        .register_builtin(protocols::RELAY, relay.stream_handler());
    inner
        .peers
        .set_circuits(Arc::downgrade(relay) as Weak<dyn Circuits>);
    inner
        .peers
        .observe(Arc::downgrade(relay) as Weak<dyn ConnectionObserver>);
}
