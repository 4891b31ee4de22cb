//! What a node tells the application: messages and streams from peers.

use bytes::Bytes;
use reach_proto::PeerId;

/// An application bidirectional stream with a peer. `send` and `recv` are
/// quinn streams: they implement tokio's `AsyncWrite` / `AsyncRead`.
#[derive(Debug)]
pub struct Stream {
    /// The authenticated peer at the other end.
    pub peer: PeerId,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

/// Something a peer did that the application should hear about.
#[derive(Debug)]
pub enum Event {
    /// A whole message sent with `Node::send`.
    Message { from: PeerId, data: Bytes },
    /// A stream the peer opened with `Node::open_stream`.
    Stream(Stream),
}

impl Event {
    /// The authenticated peer the event came from.
    pub fn peer(&self) -> PeerId {
        match self {
            Event::Message { from, .. } => *from,
            Event::Stream(s) => s.peer,
        }
    }
}
