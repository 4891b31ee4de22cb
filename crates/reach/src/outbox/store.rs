//! The outbox's redb tables and the synchronous work on them: loading (with
//! tamper detection and quarantine) and applying one group-committed batch.
//!
//! Tables (every value sealed by [`Sealer`] with the table name and row key
//! as associated data; no peer id in any key):
//! - `entries`: message id (u64, global, growing) → the pending message
//!   (peer, per-destination sequence number, delivery, times, payload);
//! - `attempts`: message id → attempts so far (absent: 0), kept apart so an
//!   attempt does not rewrite the payload;
//! - `next_seq`: HMAC(peer) → the next sequence number for that destination;
//! - `received`: HMAC(peer) → that sender's [`ReceivedLog`];
//! - `inbox`: inbox id (u64, growing) → a received message (sender, seq,
//!   payload) recorded in the same commit as its sequence number, kept until
//!   the node has handed it to the application;
//! - `quarantine`: counter → a row that failed to open, as it was found;
//! - `meta`: name → value: the next message and inbox ids, and a key check (a sealed
//!   constant) that tells "another identity's outbox" from tampering.

use std::collections::HashMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use reach_proto::PeerId;
use reach_proto::outbox::{Delivery, Received, ReceivedLog};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::seal::Sealer;
use super::{OutboxLimits, Usage};

pub(super) const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
pub(super) const ATTEMPTS: TableDefinition<u64, &[u8]> = TableDefinition::new("attempts");
pub(super) const NEXT_SEQ: TableDefinition<&[u8], &[u8]> = TableDefinition::new("next_seq");
pub(super) const RECEIVED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("received");
pub(super) const QUARANTINE: TableDefinition<u64, &[u8]> = TableDefinition::new("quarantine");
pub(super) const INBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("inbox");
pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// redb's page cache for the outbox. Its default (1 GiB) is sized for
/// databases that are read a lot; the outbox is written once and read about
/// once per message, so 16 MiB (a backlog of ~50,000 small messages) is
/// plenty, and bounds what a full outbox costs in memory.
const CACHE_BYTES: usize = 16 * 1024 * 1024;

const META_NEXT_ID: &str = "next_id";
const META_NEXT_INBOX_ID: &str = "next_inbox_id";
const META_KEY_CHECK: &str = "key_check";
const KEY_CHECK_PLAINTEXT: &[u8] = b"reach outbox key check v1";

/// A pending message as stored (inside the seal).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct EntryRecord {
    pub peer: PeerId,
    pub seq: u64,
    pub delivery: Delivery,
    pub created_ms: u64,
    pub expires_ms: Option<u64>,
    pub payload: Vec<u8>,
}

/// A received message as stored (inside the seal).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct InboxRecord {
    pub sender: PeerId,
    pub seq: u64,
    pub payload: Vec<u8>,
}

/// A row set aside because it did not open.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct QuarantineRecord {
    pub table: String,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// Milliseconds since the unix epoch (0 if the clock is before it).
pub(super) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the writer thread needs to know about a pending entry.
#[derive(Debug, Clone)]
pub(super) struct EntryMeta {
    pub peer: PeerId,
    pub seq: u64,
    pub delivery: Delivery,
    pub created_ms: u64,
    pub expires_ms: Option<u64>,
    pub size: usize,
    pub attempts: u32,
}

/// The writer thread's own view of the file, kept in step with every commit
/// (reloaded from the file after a failed one).
#[derive(Debug, Default)]
pub(super) struct WriterState {
    pub next_id: u64,
    pub entries: HashMap<u64, EntryMeta>,
    pub usage: HashMap<PeerId, Usage>,
    pub total: Usage,
    pub next_seq: HashMap<PeerId, u64>,
    pub received: HashMap<PeerId, ReceivedLog>,
    pub quarantined: u64,
    /// Inbox rows: id → payload size.
    pub inbox: HashMap<u64, usize>,
    pub inbox_usage: Usage,
    pub next_inbox_id: u64,
}

/// Why loading failed.
#[derive(Debug)]
pub(super) enum LoadError {
    /// The key check does not open: another identity's outbox.
    KeyMismatch,
    /// redb failed.
    Db(String),
}

impl<E: Into<redb::Error>> From<E> for LoadError {
    fn from(e: E) -> Self {
        LoadError::Db(e.into().to_string())
    }
}

fn decode<T: for<'de> Deserialize<'de>>(
    sealer: &Sealer,
    table: &str,
    key: &[u8],
    value: &[u8],
) -> Option<T> {
    let plain = sealer.open(table, key, value).ok()?;
    postcard::from_bytes(&plain).ok()
}

pub(super) fn seal_value<T: Serialize>(sealer: &Sealer, table: &str, key: &[u8], v: &T) -> Vec<u8> {
    // postcard into a Vec fails only on types serde cannot encode, which
    // these records are not.
    let plain = postcard::to_allocvec(v).expect("outbox records encode");
    sealer.seal(table, key, &plain)
}

/// Reads the whole file, sets aside every row that does not open (moving it
/// to `quarantine` in one durable commit), and rebuilds the writer's state.
pub(super) fn load(db: &Database, sealer: &Sealer) -> Result<WriterState, LoadError> {
    // Create the tables, check (or write) the key check.
    {
        let tx = db.begin_write()?;
        {
            let mut meta = tx.open_table(META)?;
            let check = meta.get(META_KEY_CHECK)?.map(|v| v.value().to_vec());
            match check {
                Some(v) => {
                    if sealer
                        .open("meta", META_KEY_CHECK.as_bytes(), &v)
                        .map(|p| p != KEY_CHECK_PLAINTEXT)
                        .unwrap_or(true)
                    {
                        return Err(LoadError::KeyMismatch);
                    }
                }
                None => {
                    let sealed =
                        sealer.seal("meta", META_KEY_CHECK.as_bytes(), KEY_CHECK_PLAINTEXT);
                    meta.insert(META_KEY_CHECK, sealed.as_slice())?;
                }
            }
            tx.open_table(ENTRIES)?;
            tx.open_table(ATTEMPTS)?;
            tx.open_table(NEXT_SEQ)?;
            tx.open_table(RECEIVED)?;
            tx.open_table(QUARANTINE)?;
            tx.open_table(INBOX)?;
        }
        tx.commit()?;
    }

    let mut st = WriterState::default();
    let mut bad: Vec<QuarantineRecord> = Vec::new();
    let tx = db.begin_read()?;
    let mut max_id = 0u64;
    {
        let entries = tx.open_table(ENTRIES)?;
        for item in entries.iter()? {
            let (k, v) = item?;
            let id = k.value();
            let key = id.to_be_bytes();
            max_id = max_id.max(id);
            match decode::<EntryRecord>(sealer, "entries", &key, v.value()) {
                Some(e) => {
                    st.entries.insert(
                        id,
                        EntryMeta {
                            peer: e.peer,
                            seq: e.seq,
                            delivery: e.delivery,
                            created_ms: e.created_ms,
                            expires_ms: e.expires_ms,
                            size: e.payload.len(),
                            attempts: 0,
                        },
                    );
                    let u = st.usage.entry(e.peer).or_default();
                    u.add(e.payload.len());
                    st.total.add(e.payload.len());
                    let next = st.next_seq.entry(e.peer).or_insert(1);
                    *next = (*next).max(e.seq.saturating_add(1));
                }
                None => bad.push(QuarantineRecord {
                    table: "entries".into(),
                    key: key.to_vec(),
                    value: v.value().to_vec(),
                }),
            }
        }
    }
    let mut max_inbox = 0u64;
    {
        let inbox = tx.open_table(INBOX)?;
        for item in inbox.iter()? {
            let (k, v) = item?;
            let id = k.value();
            let key = id.to_be_bytes();
            max_inbox = max_inbox.max(id);
            match decode::<InboxRecord>(sealer, "inbox", &key, v.value()) {
                Some(m) => {
                    st.inbox.insert(id, m.payload.len());
                    st.inbox_usage.add(m.payload.len());
                }
                None => bad.push(QuarantineRecord {
                    table: "inbox".into(),
                    key: key.to_vec(),
                    value: v.value().to_vec(),
                }),
            }
        }
    }
    let mut orphans = Vec::new();
    {
        let attempts = tx.open_table(ATTEMPTS)?;
        for item in attempts.iter()? {
            let (k, v) = item?;
            let id = k.value();
            let key = id.to_be_bytes();
            match decode::<u32>(sealer, "attempts", &key, v.value()) {
                Some(n) => match st.entries.get_mut(&id) {
                    Some(e) => e.attempts = n,
                    None => orphans.push(id),
                },
                None => bad.push(QuarantineRecord {
                    table: "attempts".into(),
                    key: key.to_vec(),
                    value: v.value().to_vec(),
                }),
            }
        }
    }
    for (name, def) in [("next_seq", NEXT_SEQ), ("received", RECEIVED)] {
        let table = tx.open_table(def)?;
        for item in table.iter()? {
            let (k, v) = item?;
            let key = k.value();
            let ok = if name == "next_seq" {
                decode::<(PeerId, u64)>(sealer, name, key, v.value())
                    .filter(|(peer, _)| sealer.peer_name(peer) == key)
                    .map(|(peer, next)| {
                        let n = st.next_seq.entry(peer).or_insert(1);
                        *n = (*n).max(next);
                    })
            } else {
                decode::<(PeerId, ReceivedLog)>(sealer, name, key, v.value())
                    .filter(|(peer, _)| sealer.peer_name(peer) == key)
                    .map(|(peer, log)| {
                        st.received.insert(peer, log);
                    })
            };
            if ok.is_none() {
                bad.push(QuarantineRecord {
                    table: name.into(),
                    key: key.to_vec(),
                    value: v.value().to_vec(),
                });
            }
        }
    }
    let meta = tx.open_table(META)?;
    let stored_next = meta
        .get(META_NEXT_ID)?
        .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(1);
    let stored_inbox = meta
        .get(META_NEXT_INBOX_ID)?
        .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(1);
    // Never reuse an id, whatever the meta rows say.
    st.next_id = stored_next.max(max_id.saturating_add(1)).max(1);
    st.next_inbox_id = stored_inbox.max(max_inbox.saturating_add(1)).max(1);
    let mut quarantined = tx.open_table(QUARANTINE)?.len()?;
    drop(meta);
    drop(tx);

    if !bad.is_empty() || !orphans.is_empty() {
        let tx = db.begin_write()?;
        {
            let mut q = tx.open_table(QUARANTINE)?;
            let first_q = q.last()?.map(|(k, _)| k.value() + 1).unwrap_or(0);
            for (next_q, rec) in (first_q..).zip(&bad) {
                tracing::warn!(
                    table = %rec.table,
                    "outbox: a row failed to decrypt or verify (tampered or damaged); set aside in quarantine"
                );
                let bytes = postcard::to_allocvec(rec).expect("quarantine records encode");
                q.insert(next_q, bytes.as_slice())?;
                quarantined += 1;
            }
            let mut entries = tx.open_table(ENTRIES)?;
            let mut attempts = tx.open_table(ATTEMPTS)?;
            let mut next_seq = tx.open_table(NEXT_SEQ)?;
            let mut received = tx.open_table(RECEIVED)?;
            let mut inbox = tx.open_table(INBOX)?;
            for rec in &bad {
                match rec.table.as_str() {
                    "entries" | "attempts" | "inbox" => {
                        let Ok(key) = <[u8; 8]>::try_from(rec.key.as_slice()) else {
                            continue;
                        };
                        let id = u64::from_be_bytes(key);
                        match rec.table.as_str() {
                            "entries" => entries.remove(id)?,
                            "attempts" => attempts.remove(id)?,
                            _ => inbox.remove(id)?,
                        };
                    }
                    "next_seq" => {
                        next_seq.remove(rec.key.as_slice())?;
                    }
                    _ => {
                        received.remove(rec.key.as_slice())?;
                    }
                }
            }
            for id in &orphans {
                attempts.remove(*id)?;
            }
        }
        tx.commit()?;
    }
    st.quarantined = quarantined;
    Ok(st)
}

/// Opens (or creates) the database file.
///
/// A new file is made under a temporary name and renamed into place once
/// redb has written it whole: a kill -9 during a node's very first start
/// must not leave a half-made `outbox.redb` that every later start refuses
/// as corrupt (a file that exists is never replaced: it may hold messages).
pub(super) fn open_db(path: &Path) -> Result<Database, String> {
    if !path.exists() {
        let fresh = path.with_extension("redb.new");
        // A leftover from an interrupted creation holds nothing.
        let _ = std::fs::remove_file(&fresh);
        drop(build(&fresh)?);
        std::fs::rename(&fresh, path).map_err(|e| format!("creating {}: {e}", path.display()))?;
        if let Some(dir) = path.parent()
            && let Ok(d) = std::fs::File::open(dir)
        {
            // The rename itself must survive a crash too.
            let _ = d.sync_all();
        }
    }
    build(path)
}

fn build(path: &Path) -> Result<Database, String> {
    let r = std::panic::catch_unwind(|| {
        redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
    });
    match r {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("redb panicked opening the file".into()),
    }
}

/// One request's effect on the file, applied inside the batch's transaction.
pub(super) enum Op {
    Enqueue {
        peer: PeerId,
        data: Vec<u8>,
        delivery: Delivery,
        expires_ms: Option<u64>,
    },
    Remove {
        id: u64,
    },
    Attempt {
        id: u64,
    },
    Received {
        sender: PeerId,
        seq: u64,
        /// Kept in the inbox, in the same commit, if new.
        payload: Option<Vec<u8>>,
    },
    InboxDone {
        id: u64,
    },
}

/// What an op did, for the caller and for the shared view.
#[derive(Debug, Clone)]
pub(super) enum Done {
    Enqueued {
        id: u64,
        meta: EntryMeta,
    },
    Removed {
        id: u64,
        existed: bool,
    },
    Attempted {
        id: u64,
        existed: bool,
    },
    /// The verdict, and the inbox id of a new message with a payload.
    Received(Received, Option<u64>),
    Handed {
        existed: bool,
    },
    Full {
        scope: &'static str,
        limit: String,
    },
}

/// Applies `ops` in one write transaction, durably committed. On error
/// nothing is committed and `st` may be ahead of the file: the caller
/// reloads it.
pub(super) fn apply_batch(
    db: &Database,
    sealer: &Sealer,
    limits: &OutboxLimits,
    st: &mut WriterState,
    ops: Vec<Op>,
) -> Result<Vec<Done>, redb::Error> {
    let mut tx = db.begin_write()?;
    tx.set_durability(redb::Durability::Immediate)
        .map_err(|e| redb::Error::Corrupted(e.to_string()))?;
    let mut done = Vec::with_capacity(ops.len());
    {
        let mut entries = tx.open_table(ENTRIES)?;
        let mut attempts = tx.open_table(ATTEMPTS)?;
        let mut next_seq = tx.open_table(NEXT_SEQ)?;
        let mut received = tx.open_table(RECEIVED)?;
        let mut inbox = tx.open_table(INBOX)?;
        let mut meta = tx.open_table(META)?;
        let mut seq_dirty: Vec<PeerId> = Vec::new();
        let mut recv_dirty: Vec<PeerId> = Vec::new();
        let first_id = st.next_id;
        let first_inbox_id = st.next_inbox_id;
        for op in ops {
            match op {
                Op::Enqueue {
                    peer,
                    data,
                    delivery,
                    expires_ms,
                } => {
                    let size = data.len();
                    let u = st.usage.get(&peer).copied().unwrap_or_default();
                    if let Some((scope, limit)) = limits.refuse(&u, &st.total, size) {
                        done.push(Done::Full { scope, limit });
                        continue;
                    }
                    let id = st.next_id;
                    st.next_id += 1;
                    let seq_slot = st.next_seq.entry(peer).or_insert(1);
                    let seq = *seq_slot;
                    *seq_slot += 1;
                    if !seq_dirty.contains(&peer) {
                        seq_dirty.push(peer);
                    }
                    let rec = EntryRecord {
                        peer,
                        seq,
                        delivery,
                        created_ms: unix_ms(),
                        expires_ms,
                        payload: data,
                    };
                    let sealed = seal_value(sealer, "entries", &id.to_be_bytes(), &rec);
                    entries.insert(id, sealed.as_slice())?;
                    st.usage.entry(peer).or_default().add(size);
                    st.total.add(size);
                    let meta = EntryMeta {
                        peer,
                        seq,
                        delivery,
                        created_ms: rec.created_ms,
                        expires_ms,
                        size,
                        attempts: 0,
                    };
                    st.entries.insert(id, meta.clone());
                    done.push(Done::Enqueued { id, meta });
                }
                Op::Remove { id } => {
                    let existed = match st.entries.remove(&id) {
                        Some(e) => {
                            entries.remove(id)?;
                            attempts.remove(id)?;
                            if let Some(u) = st.usage.get_mut(&e.peer) {
                                u.sub(e.size);
                                if u.count == 0 {
                                    st.usage.remove(&e.peer);
                                }
                            }
                            st.total.sub(e.size);
                            true
                        }
                        None => false,
                    };
                    done.push(Done::Removed { id, existed });
                }
                Op::Attempt { id } => {
                    let existed = match st.entries.get_mut(&id) {
                        Some(e) => {
                            e.attempts = e.attempts.saturating_add(1);
                            let sealed =
                                seal_value(sealer, "attempts", &id.to_be_bytes(), &e.attempts);
                            attempts.insert(id, sealed.as_slice())?;
                            true
                        }
                        None => false,
                    };
                    done.push(Done::Attempted { id, existed });
                }
                Op::Received {
                    sender,
                    seq,
                    payload,
                } => {
                    if !st.received.contains_key(&sender) && st.received.len() >= limits.max_senders
                    {
                        done.push(Done::Full {
                            scope: "senders",
                            limit: format!("{} senders", limits.max_senders),
                        });
                        continue;
                    }
                    let verdict =
                        st.received
                            .get(&sender)
                            .map(|l| l.check(seq))
                            .unwrap_or(if seq == 0 {
                                Received::TooOld
                            } else {
                                Received::New
                            });
                    let mut inbox_id = None;
                    if verdict == Received::New
                        && let Some(payload) = payload
                    {
                        let size = payload.len();
                        if let Some((scope, limit)) = limits.refuse_inbox(&st.inbox_usage, size) {
                            done.push(Done::Full { scope, limit });
                            continue;
                        }
                        let id = st.next_inbox_id;
                        st.next_inbox_id += 1;
                        let rec = InboxRecord {
                            sender,
                            seq,
                            payload,
                        };
                        let sealed = seal_value(sealer, "inbox", &id.to_be_bytes(), &rec);
                        inbox.insert(id, sealed.as_slice())?;
                        st.inbox.insert(id, size);
                        st.inbox_usage.add(size);
                        inbox_id = Some(id);
                    }
                    let log = st.received.entry(sender).or_default();
                    let verdict = log.check_and_record(seq);
                    if verdict == Received::New && !recv_dirty.contains(&sender) {
                        recv_dirty.push(sender);
                    }
                    done.push(Done::Received(verdict, inbox_id));
                }
                Op::InboxDone { id } => {
                    let existed = match st.inbox.remove(&id) {
                        Some(size) => {
                            inbox.remove(id)?;
                            st.inbox_usage.sub(size);
                            true
                        }
                        None => false,
                    };
                    done.push(Done::Handed { existed });
                }
            }
        }
        for peer in seq_dirty {
            let name = sealer.peer_name(&peer);
            let next = st.next_seq.get(&peer).copied().unwrap_or(1);
            let sealed = seal_value(sealer, "next_seq", &name, &(peer, next));
            next_seq.insert(name.as_slice(), sealed.as_slice())?;
        }
        for peer in recv_dirty {
            let name = sealer.peer_name(&peer);
            if let Some(log) = st.received.get(&peer) {
                let sealed = seal_value(sealer, "received", &name, &(peer, log));
                received.insert(name.as_slice(), sealed.as_slice())?;
            }
        }
        if st.next_id != first_id {
            meta.insert(META_NEXT_ID, st.next_id.to_be_bytes().as_slice())?;
        }
        if st.next_inbox_id != first_inbox_id {
            meta.insert(
                META_NEXT_INBOX_ID,
                st.next_inbox_id.to_be_bytes().as_slice(),
            )?;
        }
    }
    tx.commit()?;
    Ok(done)
}
