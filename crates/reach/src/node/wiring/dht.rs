//! What the DHT needs from the capabilities above it: the owner of our
//! endpoint record, NAT discovery (observed addresses) and the relay (the
//! relay behind a relayed address). See [`crate::dht`]'s traits.

use std::net::SocketAddr;

use futures::future::BoxFuture;

use crate::dht::{ObservedAddrs, RecordOwner, RelayAddrs};
use crate::node::bridge::Bridge;

impl RecordOwner for Bridge {
    fn publish(&self) -> BoxFuture<'_, usize> {
        Box::pin(async move {
            match self.0.upgrade() {
                Some(inner) => crate::advertise::publish(&inner).await,
                None => 0,
            }
        })
    }

    fn external_addrs(&self) -> Vec<SocketAddr> {
        self.0
            .upgrade()
            .map(|inner| inner.nat.confirmed())
            .unwrap_or_default()
    }
}

impl ObservedAddrs for Bridge {
    fn observed(&self, observed: SocketAddr, reporter: SocketAddr) {
        if let Some(inner) = self.0.upgrade() {
            inner.observed_addr(observed, reporter);
        }
    }
}

impl RelayAddrs for Bridge {
    fn relay_addr(&self, remote: &SocketAddr) -> Option<SocketAddr> {
        Some(self.0.upgrade()?.relay.paths.path(remote)?.relay_addr)
    }
}
