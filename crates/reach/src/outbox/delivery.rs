//! Durable delivery: the outbox on the wire.
//!
//! The sender side drives the outbox's schedule ([`Outbox::poll_due`]):
//! one worker per destination opens one [`PROTOCOL`] stream and writes the
//! destination's due messages on it in enqueue order, reading the acks as
//! they come; an ack deletes the message ([`Outbox::ack_seq`]) and says
//! [`NodeEvent::OutboxDelivered`]. A destination whose connection comes up
//! is due at once ([`Outbox::on_reachable`], from the peer table's path
//! events), so the first resend leaves as soon as the peer is reachable,
//! not at the next retry tick.
//!
//! The receiver side records each message durably with its payload
//! ([`Outbox::receive`]) before it acks, and hands it to the application
//! as [`Event::Durable`]; the application says it is done with it
//! ([`crate::Node::durable_done`]) and only then is it deleted. A crash in
//! between hands it over again at the next start, with the same `seq`.
//! A duplicate (its first ack was lost) is acked and not handed over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reach_proto::PeerId;
use reach_proto::outbox::{AckOutcome, DurableFrame, PROTOCOL};
use reach_proto::wire::{FRAME_HEADER_LEN, frame};
use tokio::sync::mpsc;

use super::{Due, InboxId, MAX_DURABLE_MESSAGE_LEN, MessageId, Outbox, Receipt};
use crate::error::{Error, Result};
use crate::events::{DurableMessage, Event};
use crate::messaging::Messaging;
use crate::node::bus::NodeEvent;
use crate::node::core::Core;
use crate::node::router::Inbound;
use crate::node::stats;
use crate::peers::{ConnectionObserver, Peers};

/// Largest frame of [`PROTOCOL`]: a whole durable message and its header.
pub const MAX_DURABLE_FRAME: usize = MAX_DURABLE_MESSAGE_LEN + 64;
/// A destination worker with nothing to send for this long closes its
/// stream and ends; the next due message starts a new one.
pub const WORKER_IDLE: Duration = Duration::from_secs(5);
/// How long a worker waits for the ack of a message it wrote before it
/// gives the stream up (the messages stay pending and are retried).
pub const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Messages a worker writes ahead of their acks, at most: enough to keep a
/// long path busy, few enough that a dead stream strands little.
pub const MAX_UNACKED: usize = 256;
/// Messages (or acks) handled in one go at most: their attempts in one
/// commit and their frames in one write on the sender, their records in one
/// commit and their acks in one write on the receiver. One commit per
/// message capped a backlog's drain below 1,000 msgs/s; batches of what has
/// already arrived lift it several times without delaying anything (a lone
/// message is a batch of one).
pub const MAX_WRITE_BATCH: usize = 64;
/// How often a waiting worker checks that its connection is still the
/// peer's current one. A peer that died without closing its connection and
/// came back replaces it with a new one on the same kind of path, which
/// raises no `PeerConnected`; the worker would wait for acks on the dead one
/// until [`ACK_TIMEOUT`]. Checked this often, the first resend leaves within
/// this of the new connection (the target is 1 RTT + 100 ms).
pub const CONNECTION_CHECK: Duration = Duration::from_millis(50);

crate::telemetry::metrics! {
    /// Counters of durable delivery.
    pub(crate) struct OutboxCounters =>
    /// Durable delivery's counters as [`NodeStats`](crate::NodeStats) shows them.
    pub struct OutboxStats;
    atomic {
        /// Durable messages this node committed to its outbox.
        counter enqueued = "outbox_enqueued",
        /// Durable messages the receiver acknowledged.
        counter delivered = "outbox_delivered",
        /// Durable messages given up (attempts used up, or expired).
        counter abandoned = "outbox_abandoned",
        /// Durable messages written to a receiver (first tries and resends).
        counter sent = "outbox_sent",
        /// Durable messages received and handed to the application.
        counter received = "outbox_received",
        /// Durable messages received again (their ack was lost) and acked
        /// without handing them over twice.
        counter duplicates = "outbox_duplicates",
        /// Durable messages sealed and stored in their recipient's DHT
        /// mailbox (each deposit round that a storer accepted).
        counter mailbox_deposited = "outbox_mailbox_deposited",
        /// Durable messages too large for a mailbox, left on the direct
        /// path only.
        counter mailbox_too_large = "outbox_mailbox_too_large",
        /// Records read from this node's mailbox.
        counter mailbox_fetched = "outbox_mailbox_fetched",
        /// Mailbox records that opened and verified.
        counter mailbox_opened = "outbox_mailbox_opened",
        /// Mailbox records refused (not a box, not for us, bad signature).
        counter mailbox_rejected = "outbox_mailbox_rejected",
        /// Mailbox records storers dropped at our signed deletion notices.
        counter mailbox_deleted = "outbox_mailbox_deleted",
        /// Durable messages acked through the storers: a re-deposit was
        /// refused with the recipient's signed deletion notice.
        counter mailbox_acked = "outbox_mailbox_acked",
    }
    external {
        /// Durable messages waiting for their receiver's ack.
        gauge pending = "outbox_pending",
        /// Outbox entries that failed their integrity check and were set
        /// aside.
        gauge quarantined = "outbox_quarantined",
    }
}

/// The durable-delivery capability: the outbox (when the node has a data
/// dir) and the per-destination workers.
pub(crate) struct Durable {
    core: Arc<Core>,
    peers: Arc<Peers>,
    messaging: Arc<Messaging>,
    /// `None` without a data dir, and once the node has closed it
    /// ([`Durable::close`]): the file must be free for the next node on
    /// the data dir as soon as this one has stopped.
    outbox: Mutex<Option<Arc<Outbox>>>,
    /// The running worker of each destination: the ids it still has to
    /// write go through its channel, so one destination's messages leave in
    /// order on one stream.
    workers: Mutex<HashMap<PeerId, mpsc::UnboundedSender<MessageId>>>,
    pub(crate) counters: OutboxCounters,
}

impl Durable {
    pub(crate) fn new(
        core: Arc<Core>,
        peers: Arc<Peers>,
        messaging: Arc<Messaging>,
        outbox: Option<Outbox>,
    ) -> Self {
        Durable {
            core,
            peers,
            messaging,
            outbox: Mutex::new(outbox.map(Arc::new)),
            workers: Default::default(),
            counters: Default::default(),
        }
    }

    pub(crate) fn handle(&self) -> Option<Arc<Outbox>> {
        lock(&self.outbox).clone()
    }

    fn outbox(&self) -> Result<Arc<Outbox>> {
        self.handle().ok_or(Error::NoDataDir {
            what: "durable messages",
        })
    }

    /// Closes the outbox (what is queued is committed first). Called once
    /// the node's tasks have stopped, so this is the last handle and the
    /// file is released for the next node on the data dir.
    pub(crate) fn close(&self) {
        let outbox = lock(&self.outbox).take();
        drop(outbox);
    }

    /// Commits `data` for `peer` and returns its id once it is on disk.
    pub(crate) async fn send(
        &self,
        peer: PeerId,
        data: Vec<u8>,
        delivery: reach_proto::outbox::Delivery,
        ttl: Option<Duration>,
    ) -> Result<MessageId> {
        if peer == self.core.peer_id {
            return Err(Error::Config(
                "a durable message to this node itself".to_string(),
            ));
        }
        let id = self.outbox()?.enqueue(peer, data, delivery, ttl).await?;
        stats::bump(&self.counters.enqueued);
        Ok(id)
    }

    /// Pending messages, oldest first.
    pub(crate) fn pending(&self) -> Vec<super::PendingInfo> {
        self.handle().map(|o| o.pending()).unwrap_or_default()
    }

    pub(crate) async fn cancel(&self, id: MessageId) -> Result<bool> {
        self.outbox()?.cancel(id).await
    }

    pub(crate) async fn done(&self, id: InboxId) -> Result<bool> {
        self.outbox()?.inbox_done(id).await
    }

    /// The counters, with the gauges read now.
    pub(crate) fn stats(&self) -> OutboxStats {
        let mut s = self.counters.snapshot();
        if let Some(o) = self.handle() {
            s.pending = o.usage().count as u64;
            s.quarantined = o.quarantined();
        }
        s
    }

    /// The sender's loop: hands what a previous run received but did not
    /// hand over to the application, then sends what is due and reports
    /// what was abandoned, until the node stops.
    pub(crate) async fn run(self: Arc<Self>) {
        let Some(outbox) = self.handle() else {
            return;
        };
        match outbox.inbox().await {
            Ok(waiting) => {
                for m in waiting {
                    self.hand_over(m.id, m.sender, m.seq, m.data).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not read the durable inbox"),
        }
        loop {
            match outbox.poll_due().await {
                Ok(due) => {
                    for d in due {
                        match d {
                            Due::Send { id, peer } => {
                                tracing::debug!(%peer, %id, "durable message due");
                                self.dispatch(peer, id)
                            }
                            Due::Abandoned { id, peer, reason } => {
                                stats::bump(&self.counters.abandoned);
                                tracing::info!(%peer, %id, reason = reason.kind(), "durable message abandoned");
                                self.core.bus.emit(NodeEvent::OutboxAbandoned {
                                    id: id.0,
                                    peer,
                                    reason: reason.kind(),
                                });
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "outbox: could not read what is due");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            outbox.wait_due().await;
        }
    }

    /// Gives message `id` to `peer`'s worker, starting one if none runs.
    fn dispatch(self: &Arc<Self>, peer: PeerId, id: MessageId) {
        let mut workers = lock(&self.workers);
        if let Some(tx) = workers.get(&peer)
            && tx.send(id).is_ok()
        {
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(id);
        workers.insert(peer, tx);
        let me = self.clone();
        self.core.spawn(async move { me.worker(peer, rx).await });
    }

    /// One destination's worker: one stream, the messages in order, the
    /// acks as they come. On any failure the messages it still holds are
    /// counted as attempted, so the schedule retries them with backoff.
    async fn worker(self: Arc<Self>, peer: PeerId, mut rx: mpsc::UnboundedReceiver<MessageId>) {
        let Some(outbox) = self.handle() else {
            return;
        };
        let result = self.serve_destination(&outbox, peer, &mut rx).await;
        let replaced =
            matches!(&result, Err(Error::ConnectionLost { reason, .. }) if reason == REPLACED);
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "durable delivery: stream given up");
        }
        // Whatever the worker still holds was not written: it counts as
        // attempted (the peer was not reachable) and waits for its round.
        lock(&self.workers).remove(&peer);
        while let Ok(id) = rx.try_recv() {
            let _ = outbox.record_attempt(id).await;
        }
        // The peer came back on a newer connection: what is pending goes
        // out on it at once, through a new worker (this one is gone).
        if replaced {
            outbox.on_reachable(peer);
        }
    }

    async fn serve_destination(
        &self,
        outbox: &Outbox,
        peer: PeerId,
        rx: &mut mpsc::UnboundedReceiver<MessageId>,
    ) -> Result<()> {
        // The first id decides whether there is anything to do at all.
        let Some(first) = rx.recv().await else {
            return Ok(());
        };
        tracing::debug!(%peer, id = %first, "durable delivery: connecting");
        let conn = match self.peers.connection(peer).await {
            Ok(c) => c,
            Err(e) => {
                let _ = outbox.record_attempt(first).await;
                return Err(e);
            }
        };
        // Opening waits for the peer's answer: not on a connection a newer
        // one has replaced (the peer died and came back).
        let opened = tokio::select! {
            s = crate::node::router::open(&conn, peer, PROTOCOL) => s,
            newer = replaced(&self.peers, peer, conn.stable_id()) => {
                Err(lost(peer, &if newer { REPLACED } else { "the connection closed" }))
            }
        };
        let stream = match opened {
            Ok(s) => s,
            Err(e) => {
                let _ = outbox.record_attempt(first).await;
                return Err(e);
            }
        };
        let (mut send, mut recv) = (stream.send, stream.recv);
        // Acks are read by a task of their own: a read cut off mid-frame
        // (as a `select!` would) would lose the stream's framing.
        let (ack_tx, mut acks) = mpsc::channel(MAX_UNACKED);
        let reader = tokio::spawn(async move {
            loop {
                let f = read_frame(&mut recv, MAX_DURABLE_FRAME).await;
                let end = f.is_err();
                if ack_tx.send(f).await.is_err() || end {
                    return;
                }
            }
        });
        let _stop_reader = AbortOnDrop(reader);
        let mut unacked: std::collections::VecDeque<u64> = Default::default();
        // The stream starts at the head of the destination's queue: an
        // older message whose attempt failed (it waits for its retry round)
        // goes out before `first`, or the receiver would hand them over out
        // of order. Ids grow in enqueue order; `pending` is oldest first.
        let mut head: std::collections::VecDeque<MessageId> = outbox
            .pending()
            .into_iter()
            .filter(|p| p.peer == peer && p.id.0 < first.0)
            .map(|p| p.id)
            .collect();
        head.push_back(first);
        loop {
            // Take what is ready, up to the room ahead of the acks, and send
            // it as one batch: one commit counts all their attempts (first,
            // so a crash after the write can only under-count), one read
            // transaction fetches them, one write carries them.
            let room = MAX_UNACKED
                .saturating_sub(unacked.len())
                .min(MAX_WRITE_BATCH);
            let mut batch = Vec::new();
            while batch.len() < room {
                match head.pop_front().or_else(|| rx.try_recv().ok()) {
                    Some(id) => batch.push(id),
                    None => break,
                }
            }
            if !batch.is_empty() {
                let still = outbox.record_attempts(&batch).await?;
                let live: Vec<MessageId> = batch
                    .into_iter()
                    .zip(still)
                    .filter_map(|(id, pending)| pending.then_some(id))
                    .collect(); // the others were acked or cancelled meanwhile
                let mut bytes = Vec::new();
                for msg in outbox.read_many(live).await?.into_iter().flatten() {
                    bytes.extend_from_slice(&frame::encode(
                        &DurableFrame::Message {
                            seq: msg.seq,
                            data: msg.data,
                        }
                        .encode(),
                    )?);
                    unacked.push_back(msg.seq);
                    stats::bump(&self.counters.sent);
                }
                send.write_all(&bytes).await.map_err(|e| lost(peer, &e))?;
                continue;
            }
            let room = unacked.len() < MAX_UNACKED;
            // Wait for an ack (when one is owed) or for more to send.
            tokio::select! {
                ack = acks.recv(), if !unacked.is_empty() => {
                    // Every ack already read goes in the same commit.
                    let mut seqs = vec![take_ack(peer, ack, &mut unacked)?];
                    while seqs.len() < MAX_WRITE_BATCH && !unacked.is_empty() {
                        match acks.try_recv() {
                            Ok(a) => seqs.push(take_ack(peer, Some(a), &mut unacked)?),
                            Err(_) => break,
                        }
                    }
                    for id in outbox.ack_seqs(peer, &seqs).await?.into_iter().flatten() {
                        stats::bump(&self.counters.delivered);
                        self.core.bus.emit(NodeEvent::OutboxDelivered { id: id.0, peer });
                    }
                }
                more = rx.recv(), if room => {
                    match more {
                        Some(id) => head.push_back(id),
                        None => return Ok(()),
                    }
                }
                newer = replaced(&self.peers, peer, conn.stable_id()) => {
                    return Err(lost(peer, &if newer { REPLACED } else { "the connection closed" }));
                }
                _ = tokio::time::sleep(if unacked.is_empty() { WORKER_IDLE } else { ACK_TIMEOUT }) => {
                    if unacked.is_empty() {
                        let _ = send.finish();
                        return Ok(());
                    }
                    return Err(Error::Timeout("waiting for a durable message's ack"));
                }
            }
        }
    }

    /// Serves a [`PROTOCOL`] stream a peer opened: records each message,
    /// hands new ones to the application, acks each, in order.
    pub(crate) async fn serve_stream(&self, s: Inbound) {
        let Inbound {
            peer,
            mut send,
            mut recv,
            ..
        } = s;
        let Some(outbox) = self.handle() else {
            // No data dir: no durable messages here.
            crate::node::router::refuse(&self.core.counters, send, recv);
            return;
        };
        if send
            .write_all(&[reach_proto::wire::envelope::OPEN_ACCEPTED])
            .await
            .is_err()
        {
            return;
        }
        // Frames are read by a task of their own, so that what has arrived
        // meanwhile can be recorded in one commit and acked in one write
        // (a read cut off mid-frame, as a `select!` would, loses framing).
        let (frame_tx, mut frames) = mpsc::channel(MAX_UNACKED);
        let reader = tokio::spawn(async move {
            // Finished, reset or malformed: the stream ends there.
            while let Ok(DurableFrame::Message { seq, data }) =
                read_frame(&mut recv, MAX_DURABLE_FRAME).await
            {
                if frame_tx.send((seq, data)).await.is_err() {
                    return;
                }
            }
        });
        let _stop_reader = AbortOnDrop(reader);
        while let Some(first) = frames.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_WRITE_BATCH {
                match frames.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let receipts = outbox.receive_many(peer, batch.clone()).await;
            let mut acks = Vec::new();
            let mut refused = false;
            for ((seq, data), receipt) in batch.into_iter().zip(receipts) {
                let outcome = match receipt {
                    Ok(Receipt::New(inbox)) => {
                        stats::bump(&self.counters.received);
                        self.hand_over(inbox, peer, seq, data).await;
                        AckOutcome::Accepted
                    }
                    Ok(Receipt::Duplicate | Receipt::TooOld) => {
                        stats::bump(&self.counters.duplicates);
                        AckOutcome::Duplicate
                    }
                    Err(e) => {
                        tracing::debug!(%peer, seq, error = %e, "durable message refused");
                        AckOutcome::Refused
                    }
                };
                // After a refusal the sender takes nothing more from this
                // stream: later messages are not acked (it resends them).
                if !refused {
                    let Ok(bytes) = frame::encode(&DurableFrame::Ack { seq, outcome }.encode())
                    else {
                        return;
                    };
                    acks.extend_from_slice(&bytes);
                    refused = !outcome.delivered();
                }
            }
            if send.write_all(&acks).await.is_err() || refused {
                return;
            }
        }
    }

    pub(crate) async fn hand_over(&self, inbox: InboxId, from: PeerId, seq: u64, data: Vec<u8>) {
        self.messaging
            .push_event(Event::Durable(DurableMessage {
                from,
                seq,
                data: data.into(),
                inbox,
            }))
            .await;
    }
}

/// A new connection makes its peer's pending messages due at once.
impl ConnectionObserver for Durable {
    fn path_event(&self, e: &NodeEvent) {
        if let (NodeEvent::PeerConnected { peer, .. }, Some(o)) = (e, self.handle()) {
            o.on_reachable(*peer);
        }
    }
}

/// Why a worker gave its stream up when the peer's connection was replaced
/// by a newer one (the peer died and came back).
const REPLACED: &str = "the connection was replaced by a newer one";

/// Resolves once `peer`'s current connection is no longer the one with
/// `id`: `true` if another one replaced it, `false` if none is left.
async fn replaced(peers: &Peers, peer: PeerId, id: usize) -> bool {
    loop {
        tokio::time::sleep(CONNECTION_CHECK).await;
        match peers.live(&peer).map(|c| c.stable_id()) {
            Some(now) if now == id => {}
            Some(_) => return true,
            None => return false,
        }
    }
}

/// Checks that an ack is the one owed next and takes it off `unacked`:
/// acks come in order, and a refusal ends the stream.
fn take_ack(
    peer: PeerId,
    ack: Option<Result<DurableFrame>>,
    unacked: &mut std::collections::VecDeque<u64>,
) -> Result<u64> {
    let ack = ack
        .ok_or_else(|| lost(peer, &"the ack reader stopped"))?
        .map_err(|e| lost(peer, &e))?;
    let malformed = |what: String| Error::Wire(reach_proto::wire::WireError::Malformed(what));
    let DurableFrame::Ack { seq, outcome } = ack else {
        return Err(malformed("a message frame where an ack belongs".into()));
    };
    if unacked.front() != Some(&seq) {
        return Err(malformed(format!("ack for {seq} out of order")));
    }
    unacked.pop_front();
    if !outcome.delivered() {
        // The receiver takes nothing more on this stream.
        return Err(malformed("the receiver refused (its inbox is full)".into()));
    }
    Ok(seq)
}

/// Aborts a stream's reader task when its user ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn lost(peer: PeerId, e: &dyn std::fmt::Display) -> Error {
    Error::ConnectionLost {
        peer,
        reason: e.to_string(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads one length-prefixed frame of at most `max` bytes and decodes it.
async fn read_frame(recv: &mut quinn::RecvStream, max: usize) -> Result<DurableFrame> {
    let mut head = [0u8; FRAME_HEADER_LEN];
    recv.read_exact(&mut head)
        .await
        .map_err(|e| Error::Wire(reach_proto::wire::WireError::Malformed(e.to_string())))?;
    let len = frame::parse_header(&head, max)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| Error::Wire(reach_proto::wire::WireError::Malformed(e.to_string())))?;
    Ok(DurableFrame::decode(&body)?)
}
