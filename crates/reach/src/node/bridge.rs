//! Plugs the capabilities that still take the whole node (`Inner`) into the
//! peers' hooks ([`crate::peers::Resolve`],
//! [`crate::peers::ConnectionObserver`]). Each capability carved out of
//! `Inner` implements its hook itself and leaves this file.

use std::sync::{Arc, Weak};

use futures::future::BoxFuture;
use reach_proto::PeerId;
use reach_proto::dht::record::TypedAddr;

use super::Inner;
use super::bus::NodeEvent;
use crate::error::{Error, Result};
use crate::events::Event;
use crate::peers::{ConnectionObserver, Resolve};

/// See the module docs. Holds the node weakly: the node holds it.
pub(crate) struct Bridge(pub Weak<Inner>);

impl Bridge {
    fn node(&self) -> Option<Arc<Inner>> {
        self.0.upgrade()
    }
}

impl Resolve for Bridge {
    fn resolve(&self, peer: PeerId, fresh: bool) -> BoxFuture<'_, Result<Vec<TypedAddr>>> {
        Box::pin(async move {
            let inner = self.node().ok_or(Error::Shutdown)?;
            let found = if fresh {
                crate::dht::ops::resolve_fresh(&inner, peer).await
            } else {
                crate::dht::ops::resolve(&inner, peer).await
            };
            found.map(|(_, typed)| typed)
        })
    }
}

impl ConnectionObserver for Bridge {
    fn path_event(&self, e: &NodeEvent) {
        let Some(inner) = self.node() else { return };
        let for_app = match e {
            NodeEvent::PeerConnected {
                peer,
                path,
                direction,
            } => Event::Connected {
                peer: *peer,
                path: *path,
                direction: *direction,
            },
            NodeEvent::PeerDisconnected { peer } => Event::Disconnected { peer: *peer },
            NodeEvent::PathChanged { peer, path } => Event::PathChanged {
                peer: *peer,
                path: *path,
            },
            _ => return,
        };
        inner.messaging.push_connection_event(for_app);
    }
}
