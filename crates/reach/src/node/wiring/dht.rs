//! What the DHT needs from the capabilities above it: the owner of our
//! endpoint record, NAT discovery (observed addresses) and the relay (the
//! relay behind a relayed address). See [`crate::dht`]'s traits.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use futures::future::BoxFuture;
use reach_proto::wire::envelope::protocols;

use crate::advertise::Advertiser;
use crate::dht::{ObservedAddrs, RecordOwner, RelayAddrs};
use crate::node::Inner;
use crate::node::router::weak_handler;
use crate::peers::Resolve;

/// Plugs the DHT in: its protocol's handler, dialing by key, and what it
/// needs from above.
pub(in crate::node) fn plug_in(inner: &Arc<Inner>) {
    inner.router.register_builtin(
        protocols::DHT,
        weak_handler(
            &inner.dht,
            |dht, s| async move { dht.serve_stream(s).await },
        ),
    );
    inner
        .peers
        .set_resolver(Arc::downgrade(&inner.dht) as Weak<dyn Resolve>);
    let dht = &inner.dht;
    dht.set_record_owner(Arc::downgrade(&inner.advertiser) as Weak<dyn RecordOwner>);
    dht.set_observed_addrs(Arc::downgrade(&inner.nat) as Weak<dyn ObservedAddrs>);
    dht.set_relay_addrs(Arc::downgrade(&inner.relay) as Weak<dyn RelayAddrs>);
}

/// The advertiser owns the record and reads NAT's confirmed addresses.
impl RecordOwner for Advertiser {
    fn publish(&self) -> BoxFuture<'_, usize> {
        Box::pin(Advertiser::publish(self))
    }

    fn external_addrs(&self) -> Vec<SocketAddr> {
        Advertiser::external_addrs(self)
    }
}

/// NAT discovery keeps our observed addresses.
impl ObservedAddrs for crate::nat::Nat {
    fn observed(&self, observed: SocketAddr, reporter: SocketAddr) {
        self.record_observed(observed, reporter);
    }
}

/// The relay's circuit table knows which relay each virtual address goes
/// through.
impl RelayAddrs for crate::relay::RelayRuntime {
    fn relay_addr(&self, remote: &SocketAddr) -> Option<SocketAddr> {
        Some(self.paths.path(remote)?.relay_addr)
    }
}
