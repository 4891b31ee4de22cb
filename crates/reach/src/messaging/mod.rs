//! Messaging: whole messages between peers, delivered once, and the queue
//! of events the application takes with `Node::next_event`.
//!
//! Sending ([`Messaging::send`]) writes one message per unidirectional
//! stream and returns when the peer's QUIC stack acknowledged it; if the
//! connection died first and traffic moved to another one (a dead direct
//! path fell back to its relay), it sends once more there. Receiving
//! ([`Messaging::receive`]) checks the announced length before allocating,
//! reserves the bytes from a budget the application gives back as it takes
//! messages, and drops a message id it delivered already.
//!
//! Messaging uses the core and the peers only. It observes the peers'
//! connections ([`ConnectionObserver::path_event`]) to queue connection
//! events for the application.

mod dedup;
mod queue;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reach_proto::PeerId;
use reach_proto::wire::envelope::{Body, Envelope, MAX_MESSAGE_LEN};
use reach_proto::wire::{FRAME_HEADER_LEN, frame};
use tokio::sync::Semaphore;

pub use queue::{EVENT_QUEUE, MAX_QUEUED_CONNECTION_EVENTS};

use crate::error::{Error, Result};
use crate::events::{Event, Stream};
use crate::node::bus::NodeEvent;
use crate::node::codes;
use crate::node::core::Core;
use crate::node::router::STREAM_HEADER_TIMEOUT;
use crate::node::stats;
use crate::peers::{ConnectionObserver, Peers};

/// Bytes of received messages the node holds for the application at most.
/// When the application falls behind, reading from peers pauses and QUIC flow
/// control slows the senders: nothing is dropped, memory stays bounded.
/// Must be at least [`MAX_MESSAGE_LEN`] so any single message fits.
pub const MAX_QUEUED_MESSAGE_BYTES: usize = 4 * MAX_MESSAGE_LEN;

/// Slowest accepted delivery of a message body, bytes per second, beyond
/// [`STREAM_HEADER_TIMEOUT`]: 64 KiB/s lets a 16 MiB message take 4+ minutes
/// on a poor link, yet bounds how long a stalled sender holds the budget.
pub const MIN_MESSAGE_RATE: usize = 64 * 1024;

/// The messaging capability's state.
pub(crate) struct Messaging {
    core: Arc<Core>,
    /// Who sends to whom: messages travel on the peers' connections.
    peers: Arc<Peers>,
    /// Events waiting for the application's `next_event`.
    pub(crate) queue: queue::AppQueue,
    /// Byte budget of received messages not yet taken by the application.
    pub(crate) budget: Arc<Semaphore>,
    /// Ids of received messages, to deliver a resent one once.
    pub(crate) seen: dedup::SeenMessages,
}

impl Messaging {
    pub(crate) fn new(core: Arc<Core>, peers: Arc<Peers>, connection_events: bool) -> Self {
        Messaging {
            core,
            peers,
            queue: queue::AppQueue::new(connection_events),
            budget: Arc::new(Semaphore::new(MAX_QUEUED_MESSAGE_BYTES)),
            seen: Default::default(),
        }
    }

    /// The next event for the application (waits for one).
    pub(crate) async fn next_event(&self) -> Option<Event> {
        let event = self.queue.pop().await?;
        if let Event::Message { data, .. } = &event {
            // Give the bytes back to the receive budget (see MAX_QUEUED_MESSAGE_BYTES).
            self.budget.add_permits(data.len());
        }
        Some(event)
    }

    /// Queues an event for the application, waiting for a free slot (see
    /// [`EVENT_QUEUE`]).
    pub(crate) async fn push_event(&self, event: Event) {
        self.queue.push(event).await;
    }

    /// Queues a connection event, if the application asked for them.
    pub(crate) fn push_connection_event(&self, event: Event) {
        self.queue.push_connection_event(event);
    }

    /// Connection events dropped because the application did not read them.
    pub(crate) fn dropped_connection_events(&self) -> u64 {
        self.queue.dropped_connection_events()
    }

    /// Sends one whole message reliably. Returns once the peer's QUIC stack
    /// has acknowledged every byte of it.
    ///
    /// Dials the peer first when there is no live connection but addresses
    /// are known. Messages larger than [`MAX_MESSAGE_LEN`] fail with
    /// [`Error::MessageTooLarge`]: use a stream for bulk data.
    pub(crate) async fn send(&self, peer: PeerId, data: Bytes) -> Result<()> {
        if data.len() > MAX_MESSAGE_LEN {
            return Err(Error::MessageTooLarge {
                size: data.len(),
                max: MAX_MESSAGE_LEN,
            });
        }
        let id = crate::util::random_u64()?;
        let prefix = Envelope::message_prefix(data.len(), id)?;
        let (first, used) = self.send_once(peer, &prefix, &data).await;
        let result = match first {
            // The connection died before the peer acknowledged the
            // message, and traffic has moved to another connection (a
            // dead direct path fell back to the relay): send it again
            // there. The peer delivers each message id once.
            Err(Error::ConnectionLost { .. })
                if used.as_ref().is_some_and(|c| {
                    // Closed (not merely a refused stream). The peer may
                    // have closed it before our own watch (or the
                    // connection's reader) noticed: let the standby take
                    // over now.
                    let id = c.stable_id();
                    // The peer closed it as silent (its inbound limits were
                    // under pressure) just as this message left: dial again.
                    let closed_as_silent = matches!(
                        c.close_reason(),
                        Some(quinn::ConnectionError::ApplicationClosed(a))
                            if a.error_code == crate::node::codes::SILENT.into()
                    );
                    c.close_reason().is_some()
                        && (closed_as_silent
                            || self.peers.remove_if_current(peer, id)
                            || self.peers.live(&peer).is_some_and(|l| l.stable_id() != id))
                }) =>
            {
                stats::bump(&self.core.counters.messages_resent);
                self.send_once(peer, &prefix, &data).await.0
            }
            other => other,
        };
        if result.is_ok() {
            stats::bump(&self.core.counters.messages_sent);
            stats::add(&self.core.counters.message_bytes_sent, data.len());
        }
        result
    }

    /// One try of [`send`]; also returns the connection it used.
    async fn send_once(
        &self,
        peer: PeerId,
        prefix: &[u8],
        data: &Bytes,
    ) -> (Result<()>, Option<quinn::Connection>) {
        let (mut stream, conn) = match self.peers.open_uni(peer).await {
            Ok(s) => s,
            Err(e) => return (Err(e), None),
        };
        // quinn's stream errors say only "connection lost": the
        // connection's own close reason says why.
        let lost = |e: &dyn std::fmt::Display| Error::ConnectionLost {
            peer,
            reason: conn
                .close_reason()
                .map_or_else(|| e.to_string(), |r| format!("{e}: {r}")),
        };
        let sent = async {
            stream.write_all(prefix).await.map_err(|e| lost(&e))?;
            stream
                .write_chunk(data.clone())
                .await
                .map_err(|e| lost(&e))?;
            stream.finish().map_err(|e| lost(&e))?;
            match stream.stopped().await {
                Ok(None) => Ok(()),
                Ok(Some(code)) => Err(Error::Refused {
                    peer,
                    code: code.into_inner(),
                }),
                Err(e) => Err(lost(&e)),
            }
        }
        .await;
        (sent, Some(conn))
    }

    /// Reads one message from a unidirectional stream and queues it for the
    /// application. The announced length is checked before any allocation and
    /// the bytes are reserved from the node's message budget first, so hostile
    /// or fast peers cannot grow memory without bound.
    pub(crate) async fn receive(&self, peer: PeerId, mut recv: quinn::RecvStream) {
        let refuse = |recv: &mut quinn::RecvStream, code: u32| {
            stats::bump(&self.core.counters.malformed_streams);
            let _ = recv.stop(code.into());
        };
        let mut head = [0u8; FRAME_HEADER_LEN];
        let header = tokio::time::timeout(STREAM_HEADER_TIMEOUT, recv.read_exact(&mut head)).await;
        if !matches!(header, Ok(Ok(()))) {
            return refuse(&mut recv, codes::MALFORMED);
        }
        let max_body = Envelope::message_prefix(MAX_MESSAGE_LEN, u64::MAX)
            .map(|p| p.len() - FRAME_HEADER_LEN + MAX_MESSAGE_LEN)
            .unwrap_or(MAX_MESSAGE_LEN);
        let len = match frame::parse_header(&head, max_body) {
            Ok(len) => len,
            Err(_) => return refuse(&mut recv, codes::TOO_LARGE),
        };
        let permit = match self.budget.clone().acquire_many_owned(len as u32).await {
            Ok(p) => p,
            Err(_) => return refuse(&mut recv, codes::SHUTTING_DOWN),
        };
        let mut body = vec![0u8; len];
        // A peer that announces a message and stalls must not hold the budget
        // forever: the body has to arrive at MIN_MESSAGE_RATE or better.
        let allowed = STREAM_HEADER_TIMEOUT + Duration::from_secs((len / MIN_MESSAGE_RATE) as u64);
        let read = tokio::time::timeout(allowed, async {
            recv.read_exact(&mut body).await.is_ok()
            // The stream must end right after the frame.
            && matches!(recv.read(&mut [0u8; 1]).await, Ok(None))
        })
        .await;
        if !matches!(read, Ok(true)) {
            drop(permit);
            return refuse(&mut recv, codes::MALFORMED);
        }
        let (id, data) = match Envelope::decode(&body) {
            Ok(Envelope {
                body: Body::Message { id, data },
                ..
            }) => (id, data),
            _ => return refuse(&mut recv, codes::MALFORMED),
        };
        if !self.seen.first_time(peer, id) {
            // Sent again after its first connection died unacknowledged: it
            // was delivered already.
            drop(permit);
            stats::bump(&self.core.counters.duplicate_messages);
            return;
        }
        // Keep only the payload's share of the budget; `next_event` returns it.
        let payload_len = data.len();
        drop(body);
        permit.forget();
        self.budget.add_permits(len - payload_len);
        self.peers.touch(&peer, true);
        stats::bump(&self.core.counters.messages_received);
        stats::add(&self.core.counters.message_bytes_received, payload_len);
        let event = Event::Message {
            from: peer,
            data: Bytes::from(data),
        };
        self.queue.push(event).await;
    }

    /// How `Node::open_stream`'s streams are served
    /// ([`reach_proto::wire::envelope::protocols::STREAM`]): handed to the
    /// application as [`Event::Stream`].
    pub(crate) async fn serve_stream(&self, s: crate::node::router::Inbound) {
        self.peers.touch(&s.peer, true);
        stats::bump(&self.core.counters.streams_accepted);
        self.queue
            .push(Event::Stream(Stream {
                peer: s.peer,
                send: s.send,
                recv: s.recv,
            }))
            .await;
    }
}

/// The application sees connection events (if it asked for them) in order
/// with its messages.
impl ConnectionObserver for Messaging {
    fn path_event(&self, e: &NodeEvent) {
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
        self.push_connection_event(for_app);
    }
}
