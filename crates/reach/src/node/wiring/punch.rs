//! Hole punching's place in the node: it rides on relay signalling (the
//! relay's [`PunchSignals`]) and observes the peers' connections.

use std::sync::{Arc, Weak};

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
}
