//! What the DHT needs from the capabilities above it: the owner of our
//! endpoint record, NAT discovery (observed addresses) and the relay (the
//! relay behind a relayed address). See [`crate::dht`]'s traits.

use std::net::SocketAddr;

use futures::future::BoxFuture;

use crate::advertise::Advertiser;
use crate::dht::{ObservedAddrs, RecordOwner, RelayAddrs};

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
