//! Keeps the endpoint record's owner current with the address facts other
//! capabilities state on the bus (the held relay, reachability): see
//! [`crate::advertise`].

use std::sync::{Arc, Weak};

use crate::advertise::Advertiser;
use crate::node::Inner;
use crate::node::bus::NodeEvents;

/// Starts keeping the advertiser's facts current.
pub(in crate::node) fn plug_in(inner: &Arc<Inner>) {
    inner.spawn(keep_facts_current(
        Arc::downgrade(&inner.advertiser),
        inner.bus.subscribe(),
    ));
}

/// Runs for the node's lifetime: on every bus event (`wake`, a
/// subscription of its own), lets the advertiser take in the facts stated
/// so far. The advertiser also catches up before each publication, so a
/// publication never misses a fact; this keeps its subscription from
/// falling behind between publications (20 minutes of connection events).
pub(crate) async fn keep_facts_current(advertiser: Weak<Advertiser>, mut wake: NodeEvents) {
    while wake.next().await.is_some() {
        let Some(advertiser) = advertiser.upgrade() else {
            return;
        };
        advertiser.catch_up();
    }
}
