//! What a node tells the application: messages and streams from peers, and
//! (when asked for with `NodeBuilder::connection_events`) connections coming
//! and going.

use bytes::Bytes;
use reach_proto::PeerId;
use serde::Serialize;

use crate::node::Direction;

/// An application bidirectional stream with a peer. `send` and `recv` are
/// quinn streams: they implement tokio's `AsyncWrite` / `AsyncRead`.
#[derive(Debug)]
pub struct Stream {
    /// The authenticated peer at the other end.
    pub peer: PeerId,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

/// How traffic to a peer travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
#[non_exhaustive]
pub enum PathKind {
    /// Straight over UDP between the two nodes (possibly through NATs).
    Direct,
    /// Through a relay, end-to-end encrypted.
    Relayed { relay: PeerId },
    /// Over a TCP link (UDP is blocked on one side).
    TcpLink,
}

impl std::fmt::Display for PathKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathKind::Direct => f.write_str("direct"),
            PathKind::Relayed { relay } => write!(f, "relayed via {relay}"),
            PathKind::TcpLink => f.write_str("tcp link"),
        }
    }
}

/// Something a peer did that the application should hear about. New kinds
/// may be added: match with a wildcard arm.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A whole message sent with `Node::send`.
    Message { from: PeerId, data: Bytes },
    /// A stream the peer opened with `Node::open_stream`.
    Stream(Stream),
    /// `peer` is connected and was not before (only with
    /// `NodeBuilder::connection_events`).
    Connected {
        peer: PeerId,
        path: PathKind,
        direction: Direction,
    },
    /// `peer` has no connection any more (only with
    /// `NodeBuilder::connection_events`).
    Disconnected { peer: PeerId },
    /// Traffic to `peer` moved to another kind of path: a punch made it
    /// direct, or a dead direct path fell back to the relay (only with
    /// `NodeBuilder::connection_events`).
    PathChanged { peer: PeerId, path: PathKind },
    /// A durable message (`Node::send_durable`). Call `Node::durable_done`
    /// once the application has taken care of it: until then it is handed
    /// over again after a restart.
    Durable(DurableMessage),
}

/// A durable message, received once and kept on disk until the application
/// says it is done with it.
#[derive(Debug, Clone)]
pub struct DurableMessage {
    /// The authenticated sender.
    pub from: PeerId,
    /// Its number from `from`: increasing in the order `from` sent them, and
    /// the same when a message is handed over again after a restart (an
    /// application that stores its own progress skips a `seq` it has).
    pub seq: u64,
    pub data: Bytes,
    pub(crate) inbox: crate::outbox::InboxId,
}

impl Event {
    /// The authenticated peer the event came from or is about.
    pub fn peer(&self) -> PeerId {
        match self {
            Event::Message { from, .. } => *from,
            Event::Stream(s) => s.peer,
            Event::Connected { peer, .. }
            | Event::Disconnected { peer }
            | Event::PathChanged { peer, .. } => *peer,
            Event::Durable(m) => m.from,
        }
    }
}
