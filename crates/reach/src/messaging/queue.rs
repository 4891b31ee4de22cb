//! The queue of events waiting for the application's `next_event`.
//!
//! Messages and streams wait for a free slot (at most [`EVENT_QUEUE`]
//! queued): when the application falls behind, reading from peers pauses
//! and QUIC flow control slows the senders. Connection events never wait
//! (the peer table must not stall on a slow application); they share the
//! queue, so they arrive in order with the messages, and at most
//! [`MAX_QUEUED_CONNECTION_EVENTS`] of them wait at once: beyond that the
//! newest are dropped and counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::{Mutex as AsyncMutex, OwnedSemaphorePermit, Semaphore, mpsc};

use crate::events::Event;

/// Messages and streams queued for the application before inbound
/// processing waits for it to catch up.
pub const EVENT_QUEUE: usize = 1024;
/// Connection events queued for the application at most: an application
/// that never reads them costs this much memory and no more.
pub const MAX_QUEUED_CONNECTION_EVENTS: usize = 4096;

struct Queued {
    event: Event,
    /// The slot a message or stream holds until the application takes it.
    _slot: Option<OwnedSemaphorePermit>,
}

pub(crate) struct AppQueue {
    tx: mpsc::UnboundedSender<Queued>,
    rx: AsyncMutex<mpsc::UnboundedReceiver<Queued>>,
    slots: Arc<Semaphore>,
    /// Whether the application asked for connection events.
    connection_events: bool,
    queued_connection_events: AtomicUsize,
    dropped_connection_events: AtomicU64,
}

impl AppQueue {
    pub fn new(connection_events: bool) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        AppQueue {
            tx,
            rx: AsyncMutex::new(rx),
            slots: Arc::new(Semaphore::new(EVENT_QUEUE)),
            connection_events,
            queued_connection_events: AtomicUsize::new(0),
            dropped_connection_events: AtomicU64::new(0),
        }
    }

    /// Queues a message or stream, waiting for a free slot.
    pub async fn push(&self, event: Event) {
        let Ok(slot) = self.slots.clone().acquire_owned().await else {
            return;
        };
        let _ = self.tx.send(Queued {
            event,
            _slot: Some(slot),
        });
    }

    /// Queues a connection event if the application asked for them and
    /// fewer than [`MAX_QUEUED_CONNECTION_EVENTS`] wait already.
    pub fn push_connection_event(&self, event: Event) {
        if !self.connection_events {
            return;
        }
        if self.queued_connection_events.fetch_add(1, Ordering::SeqCst)
            >= MAX_QUEUED_CONNECTION_EVENTS
        {
            self.queued_connection_events.fetch_sub(1, Ordering::SeqCst);
            self.dropped_connection_events
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        let _ = self.tx.send(Queued { event, _slot: None });
    }

    /// The next queued event (waits for one).
    pub async fn pop(&self) -> Option<Event> {
        let queued = self.rx.lock().await.recv().await?;
        if queued._slot.is_none() {
            self.queued_connection_events.fetch_sub(1, Ordering::SeqCst);
        }
        Some(queued.event)
    }

    /// Connection events dropped because the application did not read them.
    pub fn dropped_connection_events(&self) -> u64 {
        self.dropped_connection_events.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn peer() -> reach_proto::PeerId {
        reach_proto::Keypair::generate().peer_id()
    }

    #[tokio::test(start_paused = true)]
    async fn messages_wait_for_a_slot_and_connection_events_never_do() {
        let q = Arc::new(AppQueue::new(true));
        let from = peer();
        for _ in 0..EVENT_QUEUE {
            q.push(Event::Message {
                from,
                data: Bytes::new(),
            })
            .await;
        }
        // Full of messages: one more waits...
        let q2 = q.clone();
        let blocked = tokio::spawn(async move {
            q2.push(Event::Message {
                from,
                data: Bytes::from_static(b"late"),
            })
            .await
        });
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert!(!blocked.is_finished());
        // ...a connection event does not.
        q.push_connection_event(Event::Disconnected { peer: from });
        for _ in 0..EVENT_QUEUE {
            assert!(matches!(q.pop().await, Some(Event::Message { .. })));
        }
        assert!(matches!(q.pop().await, Some(Event::Disconnected { .. })));
        blocked.await.unwrap();
        assert!(matches!(q.pop().await, Some(Event::Message { data, .. }) if &data[..] == b"late"));
    }

    #[tokio::test]
    async fn connection_events_are_bounded_and_only_when_asked_for() {
        let off = AppQueue::new(false);
        off.push_connection_event(Event::Disconnected { peer: peer() });
        assert_eq!(off.queued_connection_events.load(Ordering::SeqCst), 0);

        let q = AppQueue::new(true);
        let p = peer();
        for _ in 0..MAX_QUEUED_CONNECTION_EVENTS + 5 {
            q.push_connection_event(Event::Disconnected { peer: p });
        }
        assert_eq!(q.dropped_connection_events(), 5);
        q.pop().await;
        q.push_connection_event(Event::Disconnected { peer: p });
        assert_eq!(q.dropped_connection_events(), 5, "room again after a pop");
    }
}
