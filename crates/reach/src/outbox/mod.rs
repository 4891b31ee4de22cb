//! The durable outbox: messages that must survive a crash, on disk in
//! `<data dir>/outbox.redb`, encrypted, with the receiver's exactly-once log.
//!
//! - [`Outbox::enqueue`] returns a [`MessageId`] only once the message is
//!   durably committed (fsync'd): after that, kill -9 loses nothing.
//! - One writer thread owns the file (redb is synchronous). Every request
//!   queued while it commits goes into its next transaction: **group
//!   commit**, so many concurrent senders share one fsync. Each caller is
//!   answered when the commit that holds its request is durable.
//! - Every value is sealed with AES-256-GCM under a key derived from the
//!   node's identity ([`seal`]); table keys hold no peer id. A row that does
//!   not open on load is moved to quarantine and counted
//!   ([`Outbox::quarantined`]); everything else loads.
//! - The schedule (when to send what) is reach-proto's
//!   [`PendingSet`](reach_proto::outbox::PendingSet), kept in memory and
//!   rebuilt on open: [`Outbox::poll_due`], [`Outbox::on_reachable`],
//!   [`Outbox::next_timeout`].
//! - Quotas per destination and in total ([`OutboxLimits`]) refuse with
//!   [`Error::OutboxFull`].
//!
//! Receiver side: [`Outbox::receive`] records a message's sequence number
//! and keeps its payload in the inbox in one durable commit, before the ack;
//! the node hands it to the application and then calls
//! [`Outbox::inbox_done`]. A crash in between loses nothing: on start,
//! [`Outbox::inbox`] lists what was received and not yet handed over.
//!
//! Wire ids: each message gets a sequence number per destination
//! ([`PendingInfo::seq`], [`Outgoing::seq`]), starting at 1; the receiver
//! checks it with [`Outbox::record_received`] and acks it; the sender maps
//! the ack back with [`Outbox::ack_seq`].

pub mod delivery;
pub mod mailbox;
pub mod seal;
mod store;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use reach_proto::outbox::{Action, Delivery, PendingSet, Received};
use reach_proto::{Keypair, PeerId};
use redb::{Database, ReadableDatabase, ReadableTable};
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use seal::Sealer;
use store::{Done, EntryMeta, EntryRecord, Op, WriterState};

/// File name of the outbox in the data dir.
pub const OUTBOX_FILE: &str = "outbox.redb";

/// Largest durable message, in bytes. Smaller than the plain message limit
/// (16 MiB): an entry is written whole inside a group commit, so one huge
/// message would delay every other sender's commit, and it is read back
/// whole for each attempt. 1 MiB keeps a commit's worst case at a few
/// milliseconds of disk time; bulk data belongs on streams.
pub const MAX_DURABLE_MESSAGE_LEN: usize = 1024 * 1024;

/// Pending messages per destination, by default. The check sends
/// 10,000 critical messages to a peer that is offline for a while; 16,384
/// holds that with room, and bounds what one dead peer can pin.
pub const DEFAULT_MAX_PER_PEER: usize = 16_384;
/// Payload bytes pending per destination, by default: 64 MiB (64 of the
/// largest messages, or 16,384 of 4 KiB).
pub const DEFAULT_MAX_BYTES_PER_PEER: u64 = 64 * 1024 * 1024;
/// Pending messages in total, by default: the whole outbox is rebuilt in
/// memory (metadata only) on open, so its size bounds startup time and
/// memory (about 200 bytes each).
pub const DEFAULT_MAX_TOTAL: usize = 65_536;
/// Payload bytes pending in total, by default: 256 MiB of disk.
pub const DEFAULT_MAX_BYTES_TOTAL: u64 = 256 * 1024 * 1024;

/// Senders whose received log is kept, by default. Each costs about 600
/// bytes of memory and disk for good (forgetting one would let a duplicate
/// of its messages through); fresh identities are free to make, so the
/// number is capped, and a durable message from one sender too many is
/// refused (not acknowledged) with [`Error::OutboxFull`]. 16,384 senders
/// is ~10 MB.
pub const DEFAULT_MAX_SENDERS: usize = 16_384;

/// Received messages kept in the inbox until handed to the application, by
/// default. The node empties it as fast as the application reads events,
/// so it fills only while the application is slow or the node restarts;
/// past it, new durable messages are refused (not acked) and their senders
/// retry later.
pub const DEFAULT_MAX_INBOX: usize = 16_384;
/// Payload bytes in the inbox, by default: 64 MiB.
pub const DEFAULT_MAX_INBOX_BYTES: u64 = 64 * 1024 * 1024;

/// Requests one group commit takes at most: bounds one transaction's size
/// (and so the latency of the callers at its front); more wait for the next.
pub const MAX_BATCH: usize = 4096;

/// Quotas of an outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxLimits {
    /// Pending messages per destination.
    pub max_per_peer: usize,
    /// Payload bytes pending per destination.
    pub max_bytes_per_peer: u64,
    /// Pending messages in total.
    pub max_total: usize,
    /// Payload bytes pending in total.
    pub max_bytes_total: u64,
    /// Senders whose received log is kept (receiver side).
    pub max_senders: usize,
    /// Received messages in the inbox.
    pub max_inbox: usize,
    /// Payload bytes in the inbox.
    pub max_inbox_bytes: u64,
}

impl Default for OutboxLimits {
    fn default() -> Self {
        OutboxLimits {
            max_per_peer: DEFAULT_MAX_PER_PEER,
            max_bytes_per_peer: DEFAULT_MAX_BYTES_PER_PEER,
            max_total: DEFAULT_MAX_TOTAL,
            max_bytes_total: DEFAULT_MAX_BYTES_TOTAL,
            max_senders: DEFAULT_MAX_SENDERS,
            max_inbox: DEFAULT_MAX_INBOX,
            max_inbox_bytes: DEFAULT_MAX_INBOX_BYTES,
        }
    }
}

impl OutboxLimits {
    /// Whether the inbox can take a message of `size` bytes more.
    fn refuse_inbox(&self, inbox: &Usage, size: usize) -> Option<(&'static str, String)> {
        if inbox.count + 1 > self.max_inbox {
            Some(("inbox", format!("{} messages", self.max_inbox)))
        } else if inbox.bytes + size as u64 > self.max_inbox_bytes {
            Some(("inbox", format!("{} bytes", self.max_inbox_bytes)))
        } else {
            None
        }
    }

    /// Which quota (if any) adding a message of `size` bytes would break.
    fn refuse(&self, peer: &Usage, total: &Usage, size: usize) -> Option<(&'static str, String)> {
        let size = size as u64;
        if peer.count + 1 > self.max_per_peer {
            Some(("destination", format!("{} messages", self.max_per_peer)))
        } else if peer.bytes + size > self.max_bytes_per_peer {
            Some(("destination", format!("{} bytes", self.max_bytes_per_peer)))
        } else if total.count + 1 > self.max_total {
            Some(("total", format!("{} messages", self.max_total)))
        } else if total.bytes + size > self.max_bytes_total {
            Some(("total", format!("{} bytes", self.max_bytes_total)))
        } else {
            None
        }
    }
}

/// Messages and payload bytes pending.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Messages.
    pub count: usize,
    /// Payload bytes.
    pub bytes: u64,
}

impl Usage {
    fn add(&mut self, size: usize) {
        self.count += 1;
        self.bytes += size as u64;
    }
    fn sub(&mut self, size: usize) {
        self.count = self.count.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(size as u64);
    }
}

/// A durable message's id on this node: unique for the life of the outbox
/// file (never reused), growing in enqueue order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub u64);

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A received message's place in the inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InboxId(pub u64);

/// What [`Outbox::receive`] made of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipt {
    /// New: durably in the inbox. Ack it, hand it to the application, then
    /// [`Outbox::inbox_done`].
    New(InboxId),
    /// Received before: ack it again, do not deliver.
    Duplicate,
    /// Below the receive window: ack it, do not deliver (see
    /// [`Received::TooOld`]).
    TooOld,
}

/// A received message waiting in the inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// Its place in the inbox.
    pub id: InboxId,
    /// Who sent it.
    pub sender: PeerId,
    /// Its sequence number from `sender`.
    pub seq: u64,
    /// The payload.
    pub data: Vec<u8>,
}

/// A pending message, as [`Outbox::pending`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingInfo {
    /// Its id.
    pub id: MessageId,
    /// Its destination.
    pub peer: PeerId,
    /// Its sequence number towards `peer` (the id on the wire).
    pub seq: u64,
    /// Its delivery class.
    pub delivery: Delivery,
    /// Payload bytes.
    pub size: usize,
    /// Attempts so far.
    pub attempts: u32,
    /// Time since it was enqueued (wall clock).
    pub age: Duration,
    /// When it was enqueued, Unix milliseconds (mailbox records are
    /// created at this time, so every deposit is the same record).
    pub created_ms: u64,
    /// Time until the next attempt (zero: due now); `None` while an attempt
    /// round awaits its outcome.
    pub next_try: Option<Duration>,
}

/// A message to send, as [`Outbox::read`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Its id.
    pub id: MessageId,
    /// Its destination.
    pub peer: PeerId,
    /// Its sequence number towards `peer`.
    pub seq: u64,
    /// Its delivery class.
    pub delivery: Delivery,
    /// The payload.
    pub data: Vec<u8>,
}

/// What the scheduler asks of the driver, from [`Outbox::poll_due`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Send message `id` to `peer`: [`Outbox::record_attempt`] first, then
    /// [`Outbox::read`] and send.
    Send {
        /// The message.
        id: MessageId,
        /// Its destination.
        peer: PeerId,
    },
    /// Message `id` was abandoned and durably deleted.
    Abandoned {
        /// The message.
        id: MessageId,
        /// Its destination.
        peer: PeerId,
        /// Why.
        reason: reach_proto::outbox::AbandonReason,
    },
}

struct Request {
    op: Op,
    reply: oneshot::Sender<Result<Done>>,
}

struct Shared {
    set: PendingSet,
    entries: BTreeMap<u64, EntryMeta>,
    by_seq: HashMap<(PeerId, u64), u64>,
}

/// The durable outbox. Cheap to share behind an `Arc`; every method takes
/// `&self`. Dropping it lets the writer finish what is queued and joins it.
pub struct Outbox {
    path: PathBuf,
    db: Arc<Database>,
    /// Reads running on the blocking pool: closing waits for them, since a
    /// read that outlived the outbox would keep the file open (and locked
    /// against the next node on the data dir) after the node stopped.
    reads: Arc<InFlight>,
    sealer: Arc<Sealer>,
    tx: Option<mpsc::Sender<Request>>,
    writer: Option<std::thread::JoinHandle<()>>,
    shared: Arc<Mutex<Shared>>,
    quarantined: Arc<AtomicU64>,
    commits: Arc<AtomicU64>,
    /// Woken when something may have become due: a commit that enqueued,
    /// or "reachable".
    wake: Arc<tokio::sync::Notify>,
    epoch: Instant,
}

fn storage(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Storage {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // Nothing panics while holding it; if it did, the state is still whole.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Outbox {
    /// Opens (creating if needed) `<dir>/outbox.redb` with the default
    /// limits.
    pub async fn open(dir: &Path, keypair: &Keypair) -> Result<Outbox> {
        Self::open_with_limits(dir, keypair, OutboxLimits::default()).await
    }

    /// Opens (creating if needed) `<dir>/outbox.redb`. Rows that do not
    /// decrypt are quarantined (see [`Outbox::quarantined`]). Errors:
    /// [`Error::OutboxKeyMismatch`] if the file belongs to another identity,
    /// [`Error::OutboxCorrupt`] if redb cannot read it, [`Error::Storage`]
    /// if it is in use or the disk fails.
    pub async fn open_with_limits(
        dir: &Path,
        keypair: &Keypair,
        limits: OutboxLimits,
    ) -> Result<Outbox> {
        let path = dir.join(OUTBOX_FILE);
        let sealer = Arc::new(Sealer::new(keypair));
        let (db, st) = {
            let p = path.clone();
            let sealer = sealer.clone();
            tokio::task::spawn_blocking(move || open_and_load(&p, &sealer))
                .await
                .map_err(|e| storage(&path, e))??
        };
        let db = Arc::new(db);
        let epoch = Instant::now();
        let mut shared = Shared {
            set: PendingSet::new(),
            entries: BTreeMap::new(),
            by_seq: HashMap::new(),
        };
        let now_ms = store::unix_ms();
        // In id order: the scheduler's per-destination queues are then
        // built by appending.
        let mut ids: Vec<u64> = st.entries.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            if let Some(e) = st.entries.get(&id) {
                shared.insert(id, e.clone(), now_ms, Duration::ZERO);
            }
        }
        let shared = Arc::new(Mutex::new(shared));
        let quarantined = Arc::new(AtomicU64::new(st.quarantined));
        let commits = Arc::new(AtomicU64::new(0));
        let wake = Arc::new(tokio::sync::Notify::new());
        let (tx, rx) = mpsc::channel::<Request>();
        let writer = {
            let db = db.clone();
            let sealer = sealer.clone();
            let shared = shared.clone();
            let path = path.clone();
            let counters = Counters {
                quarantined: quarantined.clone(),
                commits: commits.clone(),
                wake: wake.clone(),
            };
            std::thread::Builder::new()
                .name("reach-outbox".into())
                .spawn(move || {
                    writer_loop(rx, db, sealer, limits, st, shared, epoch, path, counters)
                })
                .map_err(|source| Error::Io {
                    context: "starting the outbox writer thread",
                    path: dir.to_path_buf(),
                    source,
                })?
        };
        Ok(Outbox {
            path,
            db,
            reads: Arc::default(),
            sealer,
            tx: Some(tx),
            writer: Some(writer),
            shared,
            quarantined,
            commits,
            wake,
            epoch,
        })
    }

    /// Path of the outbox file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn request(&self, op: Op) -> Result<Done> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .as_ref()
            .ok_or(Error::Shutdown)?
            .send(Request { op, reply })
            .map_err(|_| Error::Shutdown)?;
        rx.await.map_err(|_| Error::Shutdown)?
    }

    /// Adds a message for `peer`; returns its id once it is durably on disk.
    /// `ttl` bounds how long it is retried (critical) or kept (moderate).
    /// Errors: [`Error::MessageTooLarge`] above [`MAX_DURABLE_MESSAGE_LEN`],
    /// [`Error::OutboxFull`] past a quota, [`Error::Storage`] if the disk
    /// fails (then nothing was stored).
    pub async fn enqueue(
        &self,
        peer: PeerId,
        data: impl Into<Vec<u8>>,
        delivery: Delivery,
        ttl: Option<Duration>,
    ) -> Result<MessageId> {
        let data = data.into();
        if data.len() > MAX_DURABLE_MESSAGE_LEN {
            return Err(Error::MessageTooLarge {
                size: data.len(),
                max: MAX_DURABLE_MESSAGE_LEN,
            });
        }
        let expires_ms = ttl.map(|t| store::unix_ms().saturating_add(t.as_millis() as u64));
        match self
            .request(Op::Enqueue {
                peer,
                data,
                delivery,
                expires_ms,
            })
            .await?
        {
            Done::Enqueued { id, .. } => Ok(MessageId(id)),
            Done::Full { scope, limit } => Err(Error::OutboxFull { scope, limit }),
            other => Err(storage(&self.path, format!("unexpected answer {other:?}"))),
        }
    }

    /// Queues `ops` for the writer in this order before waiting for any of
    /// them, so they share one commit (two at most, if the writer was
    /// between batches) instead of one each; the answers come back in the
    /// same order. How a drain moves thousands of messages a second.
    async fn request_many(&self, ops: Vec<Op>) -> Vec<Result<Done>> {
        let Some(tx) = self.tx.as_ref() else {
            return ops.iter().map(|_| Err(Error::Shutdown)).collect();
        };
        let mut waiting = Vec::with_capacity(ops.len());
        for op in ops {
            let (reply, rx) = oneshot::channel();
            waiting.push(match tx.send(Request { op, reply }) {
                Ok(()) => Some(rx),
                Err(_) => None,
            });
        }
        let mut out = Vec::with_capacity(waiting.len());
        for rx in waiting {
            out.push(match rx {
                Some(rx) => rx.await.unwrap_or(Err(Error::Shutdown)),
                None => Err(Error::Shutdown),
            });
        }
        out
    }

    async fn remove(&self, id: MessageId) -> Result<bool> {
        match self.request(Op::Remove { id: id.0 }).await? {
            Done::Removed { existed, .. } => Ok(existed),
            other => Err(storage(&self.path, format!("unexpected answer {other:?}"))),
        }
    }

    /// The receiver acknowledged `id`: it is deleted (durably) and leaves the
    /// schedule. `false` if it was not pending (acked twice, cancelled).
    pub async fn ack(&self, id: MessageId) -> Result<bool> {
        self.remove(id).await
    }

    /// An ack from `peer` for sequence number `seq`: the id it acknowledged,
    /// if pending, now deleted.
    pub async fn ack_seq(&self, peer: PeerId, seq: u64) -> Result<Option<MessageId>> {
        let id = lock(&self.shared).by_seq.get(&(peer, seq)).copied();
        match id {
            Some(id) if self.remove(MessageId(id)).await? => Ok(Some(MessageId(id))),
            _ => Ok(None),
        }
    }

    /// Acks from `peer` for these sequence numbers, in one commit: for each,
    /// the id it acknowledged if it was pending (now deleted).
    pub async fn ack_seqs(&self, peer: PeerId, seqs: &[u64]) -> Result<Vec<Option<MessageId>>> {
        let ids: Vec<Option<u64>> = {
            let sh = lock(&self.shared);
            seqs.iter()
                .map(|s| sh.by_seq.get(&(peer, *s)).copied())
                .collect()
        };
        let ops = ids.iter().flatten().map(|&id| Op::Remove { id }).collect();
        let mut done = self.request_many(ops).await.into_iter();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(match id {
                Some(id) => match done.next() {
                    Some(Ok(Done::Removed { existed: true, .. })) => Some(MessageId(id)),
                    Some(Ok(_)) | None => None,
                    Some(Err(e)) => return Err(e),
                },
                None => None,
            });
        }
        Ok(out)
    }

    /// Cancels `id`: deleted, never sent again. `false` if it was not
    /// pending.
    pub async fn cancel(&self, id: MessageId) -> Result<bool> {
        self.remove(id).await
    }

    /// Counts one attempt of `id`, durably, and schedules its destination's
    /// next retry. Call it before sending, so a crash can only under-send a
    /// moderate message, never exceed its attempts. `false` if not pending.
    pub async fn record_attempt(&self, id: MessageId) -> Result<bool> {
        match self.request(Op::Attempt { id: id.0 }).await? {
            Done::Attempted { existed, .. } => Ok(existed),
            other => Err(storage(&self.path, format!("unexpected answer {other:?}"))),
        }
    }

    /// [`Outbox::record_attempt`] for several messages in one commit; for
    /// each, whether it was still pending.
    pub async fn record_attempts(&self, ids: &[MessageId]) -> Result<Vec<bool>> {
        let ops = ids.iter().map(|id| Op::Attempt { id: id.0 }).collect();
        let mut out = Vec::with_capacity(ids.len());
        for d in self.request_many(ops).await {
            match d? {
                Done::Attempted { existed, .. } => out.push(existed),
                other => {
                    return Err(storage(&self.path, format!("unexpected answer {other:?}")));
                }
            }
        }
        Ok(out)
    }

    /// Receiver side: records sequence number `seq` from `sender`, durably
    /// before returning. [`Received::New`]: hand it to the application, then
    /// ack; otherwise only ack. [`Error::OutboxFull`] (do not ack) for a
    /// new sender past [`OutboxLimits::max_senders`].
    pub async fn record_received(&self, sender: PeerId, seq: u64) -> Result<Received> {
        match self
            .request(Op::Received {
                sender,
                seq,
                payload: None,
            })
            .await?
        {
            Done::Received(r, _) => Ok(r),
            Done::Full { scope, limit } => Err(Error::OutboxFull { scope, limit }),
            other => Err(storage(&self.path, format!("unexpected answer {other:?}"))),
        }
    }

    /// Receiver side: records `seq` from `sender` and, if new, keeps `data`
    /// in the inbox, in one durable commit before returning. Errors:
    /// [`Error::OutboxFull`] (do not ack; the sender retries) for a new
    /// sender past [`OutboxLimits::max_senders`] or a full inbox.
    pub async fn receive(
        &self,
        sender: PeerId,
        seq: u64,
        data: impl Into<Vec<u8>>,
    ) -> Result<Receipt> {
        let data = data.into();
        if data.len() > MAX_DURABLE_MESSAGE_LEN {
            return Err(Error::MessageTooLarge {
                size: data.len(),
                max: MAX_DURABLE_MESSAGE_LEN,
            });
        }
        match self
            .request(Op::Received {
                sender,
                seq,
                payload: Some(data),
            })
            .await?
        {
            Done::Received(Received::New, Some(id)) => Ok(Receipt::New(InboxId(id))),
            Done::Received(Received::Duplicate, _) => Ok(Receipt::Duplicate),
            Done::Received(Received::TooOld, _) => Ok(Receipt::TooOld),
            Done::Full { scope, limit } => Err(Error::OutboxFull { scope, limit }),
            other => Err(storage(&self.path, format!("unexpected answer {other:?}"))),
        }
    }

    /// [`Outbox::receive`] for several messages of `sender` in one commit,
    /// in order; one receipt (or refusal) each.
    pub async fn receive_many(
        &self,
        sender: PeerId,
        messages: Vec<(u64, Vec<u8>)>,
    ) -> Vec<Result<Receipt>> {
        let mut ops = Vec::with_capacity(messages.len());
        let mut out: Vec<Option<Result<Receipt>>> = Vec::with_capacity(messages.len());
        for (seq, data) in messages {
            if data.len() > MAX_DURABLE_MESSAGE_LEN {
                out.push(Some(Err(Error::MessageTooLarge {
                    size: data.len(),
                    max: MAX_DURABLE_MESSAGE_LEN,
                })));
                continue;
            }
            out.push(None);
            ops.push(Op::Received {
                sender,
                seq,
                payload: Some(data),
            });
        }
        let mut done = self.request_many(ops).await.into_iter();
        out.into_iter()
            .map(|r| match r {
                Some(refused) => refused,
                None => match done.next() {
                    Some(Ok(Done::Received(Received::New, Some(id)))) => {
                        Ok(Receipt::New(InboxId(id)))
                    }
                    Some(Ok(Done::Received(Received::Duplicate, _))) => Ok(Receipt::Duplicate),
                    Some(Ok(Done::Received(Received::TooOld, _))) => Ok(Receipt::TooOld),
                    Some(Ok(Done::Full { scope, limit })) => {
                        Err(Error::OutboxFull { scope, limit })
                    }
                    Some(Ok(other)) => {
                        Err(storage(&self.path, format!("unexpected answer {other:?}")))
                    }
                    Some(Err(e)) => Err(e),
                    None => Err(Error::Shutdown),
                },
            })
            .collect()
    }

    /// The application has the inbox message `id`: delete it (durably).
    /// `false` if it was not there.
    pub async fn inbox_done(&self, id: InboxId) -> Result<bool> {
        match self.request(Op::InboxDone { id: id.0 }).await? {
            Done::Handed { existed } => Ok(existed),
            other => Err(storage(&self.path, format!("unexpected answer {other:?}"))),
        }
    }

    /// Received messages not yet handed to the application, in the order
    /// they were received: on start, deliver these first.
    pub async fn inbox(&self) -> Result<Vec<Incoming>> {
        self.blocking_read(read_inbox).await
    }

    /// Reads message `id` for sending. `None` if not pending.
    pub async fn read(&self, id: MessageId) -> Result<Option<Outgoing>> {
        self.blocking_read(move |db, sealer, path| read_entry(db, sealer, path, id))
            .await
    }

    /// Reads several messages for sending in one read transaction; `None`
    /// for one no longer pending.
    pub async fn read_many(&self, ids: Vec<MessageId>) -> Result<Vec<Option<Outgoing>>> {
        self.blocking_read(move |db, sealer, path| {
            let tx = db.begin_read().map_err(|e| storage(path, e))?;
            ids.into_iter()
                .map(|id| read_entry_in(&tx, sealer, path, id))
                .collect()
        })
        .await
    }

    /// Runs `read` on the blocking pool (redb is synchronous), counted in
    /// [`Outbox::reads`] until it has let go of the file.
    async fn blocking_read<T, F>(&self, read: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Database, &Sealer, &Path) -> Result<T> + Send + 'static,
    {
        let lease = ReadLease::start(&self.reads, self.db.clone());
        let sealer = self.sealer.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let out = match &lease.db {
                Some(db) => read(db, &sealer, &path),
                None => Err(Error::Shutdown),
            };
            drop(lease);
            out
        })
        .await
        .map_err(|e| storage(&self.path, e))?
    }

    /// The pending messages, in id (so enqueue) order.
    pub fn pending(&self) -> Vec<PendingInfo> {
        let now = self.epoch.elapsed();
        let now_ms = store::unix_ms();
        let sh = lock(&self.shared);
        sh.entries
            .iter()
            .map(|(&id, e)| PendingInfo {
                id: MessageId(id),
                peer: e.peer,
                seq: e.seq,
                delivery: e.delivery,
                size: e.size,
                attempts: sh.set.attempts(id).unwrap_or(e.attempts),
                age: Duration::from_millis(now_ms.saturating_sub(e.created_ms)),
                created_ms: e.created_ms,
                next_try: sh.set.next_try(id, now).map(|t| t.saturating_sub(now)),
            })
            .collect()
    }

    /// Pending messages and payload bytes.
    pub fn usage(&self) -> Usage {
        let sh = lock(&self.shared);
        let mut u = Usage::default();
        for e in sh.entries.values() {
            u.add(e.size);
        }
        u
    }

    /// A connection to `peer` came up (or its endpoint changed): its pending
    /// messages are due now.
    pub fn on_reachable(&self, peer: PeerId) {
        let now = self.epoch.elapsed();
        lock(&self.shared).set.on_reachable(peer, now);
        self.wake.notify_one();
    }

    /// Waits until [`Outbox::poll_due`] has something to do: the next
    /// retry or expiry, a new message, or a destination that became
    /// reachable. For one driver task (a single waiter).
    pub async fn wait_due(&self) {
        loop {
            let notified = self.wake.notified();
            match self.next_timeout() {
                Some(at) if at <= Instant::now() => return,
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at.into()) => return,
                        _ = notified => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// When [`Outbox::poll_due`] next has something to do.
    pub fn next_timeout(&self) -> Option<Instant> {
        lock(&self.shared)
            .set
            .next_timeout()
            .map(|d| self.epoch + d)
    }

    /// What is due now: messages to send (each destination's in enqueue
    /// order), and messages abandoned (out of attempts, or expired), which
    /// are durably deleted before this returns.
    pub async fn poll_due(&self) -> Result<Vec<Due>> {
        let now = self.epoch.elapsed();
        let actions = lock(&self.shared).set.next_due(now);
        let mut out = Vec::with_capacity(actions.len());
        let mut deletes = Vec::new();
        for a in actions {
            match a {
                Action::Send { id, peer } => out.push(Due::Send {
                    id: MessageId(id),
                    peer,
                }),
                Action::Abandon { id, peer, reason } => {
                    deletes.push(self.remove(MessageId(id)));
                    out.push(Due::Abandoned {
                        id: MessageId(id),
                        peer,
                        reason,
                    });
                }
            }
        }
        for r in futures::future::join_all(deletes).await {
            r?;
        }
        Ok(out)
    }

    /// Rows set aside because they failed to decrypt or verify, in the life
    /// of this file (metrics read it).
    pub fn quarantined(&self) -> u64 {
        self.quarantined.load(Ordering::Relaxed)
    }

    /// Write transactions committed since open: with [`Outbox::quarantined`]
    /// a metric, and the measure of group commit (requests per commit).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Stops the writer after what is queued, and waits for it.
    pub async fn close(mut self) {
        self.tx.take();
        if let Some(w) = self.writer.take() {
            let _ = tokio::task::spawn_blocking(move || w.join()).await;
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(w) = self.writer.take() {
            // The writer ends once the queue is drained (at most one batch).
            let _ = w.join();
        }
        self.reads.wait_idle();
    }
}

/// A count of reads in flight, and a way to wait for none.
#[derive(Default)]
struct InFlight {
    count: Mutex<usize>,
    idle: std::sync::Condvar,
}

impl InFlight {
    fn wait_idle(&self) {
        let mut n = self.count.lock().unwrap_or_else(|e| e.into_inner());
        while *n > 0 {
            n = self.idle.wait(n).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// One read's hold on the file: counted from before it is queued until it
/// has dropped its handle of the database (also when the read is dropped
/// unrun, as on a runtime's shutdown).
struct ReadLease {
    /// `Some` until dropped.
    db: Option<Arc<Database>>,
    reads: Arc<InFlight>,
}

impl ReadLease {
    fn start(reads: &Arc<InFlight>, db: Arc<Database>) -> ReadLease {
        *reads.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        ReadLease {
            db: Some(db),
            reads: reads.clone(),
        }
    }
}

impl Drop for ReadLease {
    fn drop(&mut self) {
        // Let go of the database before counting the read as done: the
        // outbox's own handle must be the last.
        drop(self.db.take());
        let mut n = self.reads.count.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.reads.idle.notify_all();
        }
    }
}

impl Shared {
    fn insert(&mut self, id: u64, e: EntryMeta, now_ms: u64, now: Duration) {
        let expires = e
            .expires_ms
            .map(|at| now + Duration::from_millis(at.saturating_sub(now_ms)));
        self.set.insert(id, e.peer, e.delivery, expires, e.attempts);
        self.by_seq.insert((e.peer, e.seq), id);
        self.entries.insert(id, e);
    }

    fn remove(&mut self, id: u64) {
        self.set.remove(id);
        if let Some(e) = self.entries.remove(&id) {
            self.by_seq.remove(&(e.peer, e.seq));
        }
    }
}

fn open_and_load(path: &Path, sealer: &Sealer) -> Result<(Database, WriterState)> {
    let db = store::open_db(path).map_err(|reason| match reason.as_str() {
        r if r.contains("already open") => storage(path, r),
        _ => Error::OutboxCorrupt {
            path: path.to_path_buf(),
            reason,
        },
    })?;
    let st = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| store::load(&db, sealer)))
        .map_err(|_| Error::OutboxCorrupt {
            path: path.to_path_buf(),
            reason: "redb panicked reading the file".into(),
        })?
        .map_err(|e| match e {
            store::LoadError::KeyMismatch => Error::OutboxKeyMismatch {
                path: path.to_path_buf(),
            },
            store::LoadError::Db(reason) => Error::OutboxCorrupt {
                path: path.to_path_buf(),
                reason,
            },
        })?;
    Ok((db, st))
}

fn read_entry(
    db: &Database,
    sealer: &Sealer,
    path: &Path,
    id: MessageId,
) -> Result<Option<Outgoing>> {
    let tx = db.begin_read().map_err(|e| storage(path, e))?;
    read_entry_in(&tx, sealer, path, id)
}

fn read_entry_in(
    tx: &redb::ReadTransaction,
    sealer: &Sealer,
    path: &Path,
    id: MessageId,
) -> Result<Option<Outgoing>> {
    let table = tx
        .open_table(store::ENTRIES)
        .map_err(|e| storage(path, e))?;
    let Some(v) = table.get(id.0).map_err(|e| storage(path, e))? else {
        return Ok(None);
    };
    let plain = sealer
        .open("entries", &id.0.to_be_bytes(), v.value())
        .map_err(|_| Error::OutboxCorrupt {
            path: path.to_path_buf(),
            reason: format!("entry {id} failed to verify"),
        })?;
    let rec: EntryRecord = postcard::from_bytes(&plain).map_err(|e| Error::OutboxCorrupt {
        path: path.to_path_buf(),
        reason: format!("entry {id}: {e}"),
    })?;
    Ok(Some(Outgoing {
        id,
        peer: rec.peer,
        seq: rec.seq,
        delivery: rec.delivery,
        data: rec.payload,
    }))
}

struct Counters {
    quarantined: Arc<AtomicU64>,
    commits: Arc<AtomicU64>,
    wake: Arc<tokio::sync::Notify>,
}

fn read_inbox(db: &Database, sealer: &Sealer, path: &Path) -> Result<Vec<Incoming>> {
    let tx = db.begin_read().map_err(|e| storage(path, e))?;
    let table = tx.open_table(store::INBOX).map_err(|e| storage(path, e))?;
    let mut out = Vec::new();
    for item in table.iter().map_err(|e| storage(path, e))? {
        let (k, v) = item.map_err(|e| storage(path, e))?;
        let id = k.value();
        // Rows that do not open were quarantined at load; one damaged since
        // is skipped here (and quarantined at the next open).
        let Ok(plain) = sealer.open("inbox", &id.to_be_bytes(), v.value()) else {
            tracing::warn!(id, "outbox: an inbox row failed to verify; skipped");
            continue;
        };
        let Ok(rec) = postcard::from_bytes::<store::InboxRecord>(&plain) else {
            continue;
        };
        out.push(Incoming {
            id: InboxId(id),
            sender: rec.sender,
            seq: rec.seq,
            data: rec.payload,
        });
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn writer_loop(
    rx: mpsc::Receiver<Request>,
    db: Arc<Database>,
    sealer: Arc<Sealer>,
    limits: OutboxLimits,
    mut st: WriterState,
    shared: Arc<Mutex<Shared>>,
    epoch: Instant,
    path: PathBuf,
    counters: Counters,
) {
    let Counters {
        quarantined,
        commits,
        wake,
    } = counters;
    let mut jitter_seed = [0u8; 8];
    let _ = getrandom::fill(&mut jitter_seed);
    let mut jitter = u64::from_le_bytes(jitter_seed) | 1;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let (ops, replies): (Vec<Op>, Vec<_>) = batch.into_iter().map(|r| (r.op, r.reply)).unzip();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            store::apply_batch(&db, &sealer, &limits, &mut st, ops)
        }));
        match result {
            Ok(Ok(done)) => {
                commits.fetch_add(1, Ordering::Relaxed);
                {
                    let now = epoch.elapsed();
                    let now_ms = store::unix_ms();
                    let mut sh = lock(&shared);
                    for d in &done {
                        match d {
                            Done::Enqueued { id, meta } => {
                                sh.insert(*id, meta.clone(), now_ms, now)
                            }
                            Done::Removed { id, .. } => sh.remove(*id),
                            Done::Attempted { id, existed: true } => {
                                // xorshift64: jitter needs spread, not secrecy.
                                jitter ^= jitter << 13;
                                jitter ^= jitter >> 7;
                                jitter ^= jitter << 17;
                                sh.set.on_attempt(*id, now, jitter);
                                if let Some(e) = sh.entries.get_mut(id) {
                                    e.attempts = e.attempts.saturating_add(1);
                                }
                            }
                            _ => {}
                        }
                    }
                }
                // A new message is due now; an attempt schedules its
                // destination's next round: either may move the next
                // deadline the driver sleeps towards.
                if done
                    .iter()
                    .any(|d| matches!(d, Done::Enqueued { .. } | Done::Attempted { .. }))
                {
                    wake.notify_one();
                }
                for (reply, d) in replies.into_iter().zip(done) {
                    let _ = reply.send(Ok(d));
                }
            }
            Ok(Err(e)) => {
                let reason = e.to_string();
                tracing::warn!(path = %path.display(), error = %reason, "outbox commit failed");
                for reply in replies {
                    let _ = reply.send(Err(storage(&path, &reason)));
                }
                // The transaction was not committed: start again from what
                // the file holds.
                match store::load(&db, &sealer) {
                    Ok(fresh) => {
                        quarantined.store(fresh.quarantined, Ordering::Relaxed);
                        st = fresh
                    }
                    Err(e) => tracing::warn!(error = ?e, "outbox reload failed"),
                }
            }
            Err(_) => {
                for reply in replies {
                    let _ = reply.send(Err(storage(&path, "redb panicked during a commit")));
                }
                if let Ok(fresh) = store::load(&db, &sealer) {
                    quarantined.store(fresh.quarantined, Ordering::Relaxed);
                    st = fresh;
                }
            }
        }
    }
}
