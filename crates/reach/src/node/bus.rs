//! The node's event bus: facts one capability states and others react to.
//!
//! A capability that learns something other parts of the node care about
//! (a peer connected, a path changed, the relay was lost, an external
//! address showed up) emits a [`NodeEvent`] on the [`Bus`] instead of
//! calling the interested modules itself. Consumers that may lag (the
//! application's [`crate::Node::subscribe`], the event log, metrics)
//! receive them through a bounded broadcast: a consumer that falls more
//! than [`BUS_CAPACITY`] events behind skips the oldest and is told how
//! many it missed. Reactions that must run in order with the peer table
//! (hole punching's liveness watch) stay inline where the table changes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use reach_proto::PeerId;
use serde::Serialize;
use tokio::sync::broadcast;

use super::Direction;
use crate::events::PathKind;
use serde::Deserialize;

/// Events a lagging subscriber may fall behind by before it skips the
/// oldest: a few seconds of a busy node's connection churn.
pub const BUS_CAPACITY: usize = 1024;

/// What a node found out about its own reachability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "addr")]
pub enum Reachability {
    /// Not checked yet (or no helper was available).
    #[default]
    Unknown,
    /// Unsolicited packets from a never-contacted host reach us at this
    /// address.
    Public(SocketAddr),
    /// They do not: we need a relay.
    Private,
}

/// Something that happened on the node. New kinds are added as
/// capabilities land: match with a wildcard arm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum NodeEvent {
    /// `peer` has a live connection and had none before.
    PeerConnected {
        peer: PeerId,
        path: PathKind,
        direction: Direction,
    },
    /// `peer` has no live connection any more.
    PeerDisconnected { peer: PeerId },
    /// Traffic to `peer` moved to another kind of path: a punch made it
    /// direct, or a dead direct path fell back to the relay.
    PathChanged { peer: PeerId, path: PathKind },
    /// Peers report seeing this node at `addr` (NAT-translated): confirmed
    /// once enough independent peers agree.
    ExternalAddrConfirmed { addr: SocketAddr },
    /// What the node found out about its reachability changed.
    ReachabilityChanged { reachability: Reachability },
    /// The node now holds a reservation at `relay` and publishes it.
    RelayAcquired { relay: PeerId, addr: SocketAddr },
    /// The node lost the relay it held (it looks for another).
    RelayLost { relay: PeerId },
    /// The node signed and stored its endpoint record at `stored` nodes.
    RecordPublished { seq: u64, stored: usize },
    /// `addr` is no longer confirmed: the reports that confirmed it are
    /// older than [`reach_proto::nat::OBSERVED_ADDR_TTL`] (after a network
    /// change nobody sees this node there any more).
    ExternalAddrExpired { addr: SocketAddr },
    /// The router maps `external` to this node, and a helper peer's probe
    /// reached the node through it: published as a direct address.
    PortMapped { external: SocketAddr },
    /// The mapping at `external` is gone (revoked, moved, or deleted at
    /// shutdown): no longer published.
    PortUnmapped { external: SocketAddr },
    /// A hole punch with `peer` ended: `direct` if it made the path direct
    /// (`time_to_direct_ms` from the punch request to the first packet
    /// from the peer's direct address), else why not (`error_kind`, `None`
    /// when the pair's NATs made the node stay relayed without trying).
    PunchOutcome {
        peer: PeerId,
        technique: &'static str,
        direct: bool,
        time_to_direct_ms: Option<u64>,
        error_kind: Option<&'static str>,
    },
    /// `peer` acknowledged durable message `id`: it is deleted from the
    /// outbox.
    OutboxDelivered { id: u64, peer: PeerId },
    /// Durable message `id` to `peer` was given up: `reason` is `attempts`
    /// (a moderate message used its attempts) or `expired` (its TTL).
    OutboxAbandoned {
        id: u64,
        peer: PeerId,
        reason: &'static str,
    },
    /// This node's subscription to `topic` is served by `home` (itself
    /// when it is its own home): after `subscribe`, and after each move to
    /// a new home.
    TopicJoined { topic: String, home: PeerId },
    /// This node's last subscription to `topic` was dropped.
    TopicLeft { topic: String },
    /// A topic federation link with the home `peer` is up.
    TopicLinkUp { peer: PeerId },
    /// The topic federation link with `peer` is gone.
    TopicLinkDown { peer: PeerId },
}

/// The sending side of the bus; cheap to clone.
#[derive(Clone)]
pub(crate) struct Bus {
    tx: broadcast::Sender<NodeEvent>,
}

impl Default for Bus {
    fn default() -> Self {
        Bus {
            tx: broadcast::channel(BUS_CAPACITY).0,
        }
    }
}

impl Bus {
    /// States a fact. Never blocks; with no subscriber it goes nowhere.
    pub fn emit(&self, event: NodeEvent) {
        tracing::trace!(?event, "node event");
        let _ = self.tx.send(event);
    }

    /// A new subscription, starting with the next event.
    pub fn subscribe(&self) -> NodeEvents {
        NodeEvents {
            rx: self.tx.subscribe(),
            missed: 0,
        }
    }
}

/// A subscription to a node's [`NodeEvent`]s (see [`crate::Node::subscribe`]).
pub struct NodeEvents {
    rx: broadcast::Receiver<NodeEvent>,
    missed: u64,
}

impl NodeEvents {
    /// The next event; `None` once the node is gone. A subscriber that fell
    /// more than [`BUS_CAPACITY`] events behind skips the oldest: see
    /// [`Self::missed`].
    pub async fn next(&mut self) -> Option<NodeEvent> {
        loop {
            match self.rx.recv().await {
                Ok(ev) => return Some(ev),
                Err(broadcast::error::RecvError::Lagged(n)) => self.missed += n,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// The next event if one is waiting, without waiting (`None` when none
    /// is, or the node is gone); skipped events count in [`Self::missed`].
    pub fn try_next(&mut self) -> Option<NodeEvent> {
        loop {
            match self.rx.try_recv() {
                Ok(ev) => return Some(ev),
                Err(broadcast::error::TryRecvError::Lagged(n)) => self.missed += n,
                Err(_) => return None,
            }
        }
    }

    /// Events skipped so far because this subscriber lagged.
    pub fn missed(&self) -> u64 {
        self.missed
    }
}

/// The path each connected peer was last reported on, so connection
/// events describe transitions: `PeerConnected` once, `PathChanged` only
/// when the kind of path changes, `PeerDisconnected` once. Holds one entry
/// per connected peer.
#[derive(Default)]
pub(crate) struct PathReports {
    last: Mutex<HashMap<PeerId, PathKind>>,
}

impl PathReports {
    /// Compares `peer`'s current path (`None`: not connected) with the last
    /// report and returns the event the change makes, if any. `current` is
    /// computed under the reports' lock, so concurrent reports for one peer
    /// come out in the order the table changed.
    pub fn update(
        &self,
        peer: PeerId,
        current: impl FnOnce() -> Option<(PathKind, Direction)>,
    ) -> Option<NodeEvent> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match (last.get(&peer).copied(), current()) {
            (None, None) => None,
            (Some(_), None) => {
                last.remove(&peer);
                Some(NodeEvent::PeerDisconnected { peer })
            }
            (None, Some((path, direction))) => {
                last.insert(peer, path);
                Some(NodeEvent::PeerConnected {
                    peer,
                    path,
                    direction,
                })
            }
            (Some(before), Some((path, _))) if before != path => {
                last.insert(peer, path);
                Some(NodeEvent::PathChanged { peer, path })
            }
            (Some(_), Some(_)) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        reach_proto::Keypair::generate().peer_id()
    }

    #[test]
    fn reports_are_transitions() {
        let r = PathReports::default();
        let (p, relay) = (peer(), peer());
        let relayed = PathKind::Relayed { relay };
        let out = Direction::Outbound;
        assert_eq!(r.update(p, || None), None);
        assert_eq!(
            r.update(p, || Some((relayed, out))),
            Some(NodeEvent::PeerConnected {
                peer: p,
                path: relayed,
                direction: out
            })
        );
        assert_eq!(r.update(p, || Some((relayed, out))), None);
        assert_eq!(
            r.update(p, || Some((PathKind::Direct, out))),
            Some(NodeEvent::PathChanged {
                peer: p,
                path: PathKind::Direct
            })
        );
        assert_eq!(
            r.update(p, || Some((relayed, Direction::Inbound))),
            Some(NodeEvent::PathChanged {
                peer: p,
                path: relayed
            })
        );
        assert_eq!(
            r.update(p, || None),
            Some(NodeEvent::PeerDisconnected { peer: p })
        );
        assert_eq!(r.update(p, || None), None);
        assert!(r.last.lock().unwrap().is_empty(), "no entry left behind");
    }

    #[tokio::test]
    async fn a_lagging_subscriber_is_told_how_much_it_missed() {
        let bus = Bus::default();
        let mut sub = bus.subscribe();
        let relay = peer();
        for _ in 0..BUS_CAPACITY + 10 {
            bus.emit(NodeEvent::RelayLost { relay });
        }
        assert_eq!(sub.next().await, Some(NodeEvent::RelayLost { relay }));
        assert_eq!(sub.missed(), 10);
        drop(bus);
        let mut rest = 0;
        while sub.next().await.is_some() {
            rest += 1;
        }
        assert_eq!(rest, BUS_CAPACITY - 1);
    }
}
