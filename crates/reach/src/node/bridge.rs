//! Plugs the capabilities that still take the whole node (`Inner`) into the
//! peers' hooks ([`crate::peers::Circuits`],
//! [`crate::peers::ConnectionObserver`]). Each capability carved out of
//! `Inner` implements its hook itself and leaves this file.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use futures::future::BoxFuture;
use reach_proto::PeerId;

use super::{Direction, Inner};
use crate::error::{Error, Result};
use crate::peers::{Circuits, Closed, ConnectionObserver, Registered};

/// See the module docs. Holds the node weakly: the node holds it.
pub(crate) struct Bridge(pub Weak<Inner>);

impl Bridge {
    fn node(&self) -> Option<Arc<Inner>> {
        self.0.upgrade()
    }
}

impl Circuits for Bridge {
    fn dial_via(
        &self,
        relay: PeerId,
        relay_addr: SocketAddr,
        peer: PeerId,
    ) -> BoxFuture<'_, Result<quinn::Connection>> {
        Box::pin(async move {
            let inner = self.node().ok_or(Error::Shutdown)?;
            crate::relay::client::dial_via(&inner, relay, relay_addr, peer).await
        })
    }

    fn relay_of(&self, addr: &SocketAddr) -> Option<PeerId> {
        Some(self.node()?.relay.paths.path(addr)?.relay)
    }
}

impl ConnectionObserver for Bridge {
    fn registered(&self, c: &Registered<'_>) {
        let Some(inner) = self.node() else { return };
        let relayed = crate::vaddr::is_virtual(&c.conn.remote_address());
        if relayed {
            crate::relay::client::watch_virtual(&inner, c.conn.clone());
        }
        inner.punch.connections.notify_waiters();
        if inner.peers.standby(&c.peer).is_some()
            && let Some(direct) = inner.peers.live(&c.peer)
            && !crate::vaddr::is_virtual(&direct.remote_address())
        {
            // A direct connection with a relayed one behind it: watch its
            // path (whichever of the two arrived last).
            crate::punch::liveness::watch(&inner, c.peer, direct);
        }
        if relayed && c.in_use && c.direction == Direction::Outbound {
            // We dialed through a relay: try for a direct path.
            if let Some(path) = inner.relay.paths.path(&c.conn.remote_address()) {
                crate::punch::start_upgrade(&inner, c.peer, path.relay);
            }
        }
    }

    fn closed(&self, c: &Closed) {
        let Some(inner) = self.node() else { return };
        if c.standby_took_over {
            // The peer closed a punched connection: back on the relay.
            crate::punch::liveness::moved_to_standby(&inner, c.peer);
        }
        if c.none_left {
            // A relay client that left takes its reservation and circuits
            // along.
            inner.relay.paths.release(&c.peer);
            inner.punch.forget_info(&c.peer);
        }
    }
}
