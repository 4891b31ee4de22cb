//! The routing table on disk: `<data dir>/peers.redb`.
//!
//! A restarted node seeds its routing table from here, so it rejoins the
//! network without a bootstrap list. The file is a redb database (ACID: a
//! crash or a failed write mid-commit leaves the previous contents).
//!
//! The cache is only a cache, and a node must never fail to start because
//! of it:
//! - a file that is not a readable cache (zero length, random bytes,
//!   truncated; redb errors or panics while opening or reading it) is moved
//!   aside to `peers.redb.corrupt-<unix seconds>` with a warning, and an
//!   empty cache is created in its place, filled by the next save;
//! - after a failed write (say the disk is full) the database handle is
//!   dropped, since redb refuses every later operation on it, and reopened
//!   on the next save, so the cache recovers once space returns. An I/O
//!   error is not corruption: the file is kept.

use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use reach_proto::PeerId;
use reach_proto::dht::Contact;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::{Error, Result};

/// File name of the peer cache in the data dir.
pub const PEER_CACHE_FILE: &str = "peers.redb";
/// Contacts saved at most: a full table for a network of millions is a few
/// thousand; more would only slow startup.
pub const MAX_CACHED_PEERS: usize = 4096;
/// What a corrupt cache is renamed to, followed by the unix time in seconds.
pub const CORRUPT_SUFFIX: &str = ".corrupt-";

/// peer id bytes → postcard(SocketAddr)
const PEERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("peers");

/// The persisted peer cache.
pub struct PeerCache {
    path: PathBuf,
    /// `None` after a failed open or write: reopened on the next use.
    db: Mutex<Option<Database>>,
    /// Set by [`PeerCache::close`]; read and written under `db`'s lock.
    closed: AtomicBool,
}

/// Why the database could not be used.
enum Failure {
    /// Not a readable cache: set it aside.
    Corrupt(String),
    /// The disk or the OS failed (full disk, permissions): keep the file.
    Io(String),
}

/// Runs `f`, turning a panic inside it (redb on some corrupt files) into a
/// [`Failure::Corrupt`].
fn contain<T>(f: impl FnOnce() -> T) -> std::result::Result<T, Failure> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|panic| {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string());
        Failure::Corrupt(format!("redb panicked: {msg}"))
    })
}

fn classify(e: impl Into<redb::Error>) -> Failure {
    use std::io::ErrorKind::{InvalidData, UnexpectedEof};
    match e.into() {
        // A file cut short, or bytes that are no database: not the disk's
        // fault.
        redb::Error::Io(e) if matches!(e.kind(), UnexpectedEof | InvalidData) => {
            Failure::Corrupt(e.to_string())
        }
        e @ (redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseAlreadyOpen) => {
            Failure::Io(e.to_string())
        }
        e => Failure::Corrupt(e.to_string()),
    }
}

/// Drops a database handle (redb commits its allocator state then),
/// containing a panic in its destructor; returns what went wrong.
fn close(db: Database) -> Option<String> {
    match contain(move || drop(db)) {
        Ok(()) => None,
        Err(Failure::Corrupt(r) | Failure::Io(r)) => Some(r),
    }
}

/// Reads every entry. Entries that do not decode are skipped and counted.
fn read_all(db: &Database) -> std::result::Result<(Vec<Contact>, usize), Failure> {
    let tx = db.begin_read().map_err(classify)?;
    let table = match tx.open_table(PEERS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok((Vec::new(), 0)),
        Err(e) => return Err(classify(e)),
    };
    let mut out = Vec::new();
    let mut skipped = 0;
    for item in table.iter().map_err(classify)? {
        let (k, v) = item.map_err(classify)?;
        let peer = PeerId::from_slice(k.value());
        let addr = postcard::from_bytes::<SocketAddr>(v.value());
        match (peer, addr) {
            (Ok(peer), Ok(addr)) if out.len() < MAX_CACHED_PEERS => {
                out.push(Contact::new(peer, addr))
            }
            _ => skipped += 1,
        }
    }
    Ok((out, skipped))
}

fn write_all(db: &Database, contacts: &[Contact]) -> std::result::Result<(), Failure> {
    let tx = db.begin_write().map_err(classify)?;
    {
        let mut table = tx.open_table(PEERS).map_err(classify)?;
        table.retain(|_, _| false).map_err(classify)?;
        for c in contacts.iter().take(MAX_CACHED_PEERS) {
            let addr =
                postcard::to_allocvec(&c.addr).map_err(|e| Failure::Corrupt(e.to_string()))?;
            table
                .insert(c.peer.as_bytes().as_slice(), addr.as_slice())
                .map_err(classify)?;
        }
    }
    tx.commit().map_err(classify)
}

/// Opens the file at `path` and reads it through once, so a corrupt file is
/// found now rather than at the first save.
fn open_checked(path: &Path) -> std::result::Result<Database, Failure> {
    match std::fs::metadata(path) {
        // redb would silently make a new database of an empty file; but a
        // cache is never empty on disk, so something cut it short.
        Ok(meta) if meta.len() == 0 => return Err(Failure::Corrupt("the file is empty".into())),
        _ => {}
    }
    let db = contain(|| Database::create(path))?.map_err(classify)?;
    match contain(|| read_all(&db)) {
        Ok(Ok(_)) => Ok(db),
        Ok(Err(f)) | Err(f) => {
            let _ = close(db);
            Err(f)
        }
    }
}

/// Renames a corrupt cache out of the way; returns the new path.
fn set_aside(path: &Path) -> std::io::Result<PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let base = format!("{}{CORRUPT_SUFFIX}{secs}", path.display());
    let mut aside = PathBuf::from(&base);
    // Several corrupt files within one second keep distinct names.
    let mut n = 1;
    while aside.exists() {
        aside = PathBuf::from(format!("{base}.{n}"));
        n += 1;
    }
    std::fs::rename(path, &aside)?;
    Ok(aside)
}

impl PeerCache {
    /// Opens (creating if needed) the cache in `data_dir`. A corrupt file is
    /// set aside and replaced by an empty cache (with a warning); if the file
    /// cannot be opened for another reason (full disk, permissions) the cache
    /// starts closed and the next save tries again. Fails only if a corrupt
    /// file cannot be set aside.
    pub fn open(data_dir: &Path) -> Result<Self> {
        let cache = PeerCache {
            path: data_dir.join(PEER_CACHE_FILE),
            db: Mutex::new(None),
            closed: AtomicBool::new(false),
        };
        match cache.reopen() {
            Ok(db) => *cache.lock() = Some(db),
            Err(e @ Error::Io { .. }) => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "peer cache unavailable; retrying at the next save")
            }
        }
        Ok(cache)
    }

    /// Path of the cache file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, Option<Database>> {
        // Panics are contained inside, so the lock is never poisoned; if it
        // were, the guarded handle is still sound.
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn err(&self, reason: impl Into<String>) -> Error {
        Error::Storage {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// Opens the file, setting a corrupt one aside and starting afresh.
    /// `Error::Io` if a corrupt file cannot be set aside; `Error::Storage`
    /// for other failures (the file is kept).
    fn reopen(&self) -> Result<Database> {
        match open_checked(&self.path) {
            Ok(db) => Ok(db),
            Err(Failure::Io(reason)) => Err(self.err(reason)),
            Err(Failure::Corrupt(reason)) => {
                self.set_aside_with_warning(&reason)?;
                match open_checked(&self.path) {
                    Ok(db) => Ok(db),
                    Err(Failure::Io(r) | Failure::Corrupt(r)) => Err(self.err(r)),
                }
            }
        }
    }

    /// Runs `f` on the open database, opening it first if needed. After a
    /// failure the handle is dropped, to be reopened next time.
    fn with_db<T>(
        &self,
        f: impl FnOnce(&Database) -> std::result::Result<T, Failure>,
    ) -> Result<T> {
        let mut guard = self.lock();
        if self.closed.load(Ordering::Relaxed) {
            return Err(self.err("the peer cache is closed (the node shut down)"));
        }
        let db = match guard.take() {
            Some(db) => db,
            None => self.reopen()?,
        };
        match contain(|| f(&db)).and_then(|r| r) {
            Ok(v) => {
                *guard = Some(db);
                Ok(v)
            }
            Err(Failure::Io(r)) => {
                // Not the file's fault: keep it, whatever closing says.
                let _ = close(db);
                Err(self.err(r))
            }
            Err(Failure::Corrupt(r)) => {
                // Damage the first read-through missed (redb reads some
                // pages only when writing): the next use starts afresh.
                let _ = close(db);
                self.set_aside_with_warning(&r)?;
                Err(self.err(r))
            }
        }
    }

    /// Closes the handle; redb commits on close, and may panic there on a
    /// damaged file, which is then set aside for the next start.
    fn close_db(&self, db: Database) {
        if let Some(reason) = close(db)
            && let Err(e) = self.set_aside_with_warning(&reason)
        {
            tracing::warn!(error = %e, "could not set the corrupt peer cache aside");
        }
    }

    /// Moves the corrupt file aside and says so.
    fn set_aside_with_warning(&self, reason: &str) -> Result<()> {
        let aside = set_aside(&self.path).map_err(|source| Error::Io {
            context: "setting a corrupt peer cache aside",
            path: self.path.clone(),
            source,
        })?;
        tracing::warn!(
            path = %self.path.display(),
            moved_to = %aside.display(),
            %reason,
            "the peer cache is corrupt: set it aside, starting with an empty one"
        );
        Ok(())
    }

    /// Replaces the cache with `contacts` (at most [`MAX_CACHED_PEERS`]).
    /// A failed save leaves the previous contents.
    pub fn save(&self, contacts: &[Contact]) -> Result<()> {
        self.with_db(|db| write_all(db, contacts))
    }

    /// Reads the cached contacts. Entries that do not decode are skipped
    /// (and counted in the returned number), never fatal.
    pub fn load(&self) -> Result<(Vec<Contact>, usize)> {
        self.with_db(read_all)
    }

    /// Closes the database file for good (at shutdown): later saves and
    /// loads fail, so nothing reopens it after the node let go of its data
    /// dir.
    pub fn close(&self) {
        let mut guard = self.lock();
        self.closed.store(true, Ordering::Relaxed);
        if let Some(db) = guard.take() {
            self.close_db(db);
        }
    }
}

impl Drop for PeerCache {
    fn drop(&mut self) {
        if let Some(db) = self.lock().take() {
            self.close_db(db);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reach_proto::Keypair;

    #[test]
    fn saves_and_loads_contacts() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PeerCache::open(dir.path()).unwrap();
        assert!(cache.load().unwrap().0.is_empty());
        let contacts: Vec<Contact> = (0..10)
            .map(|i| {
                Contact::new(
                    Keypair::generate().peer_id(),
                    SocketAddr::from(([127, 0, 0, 1], 1000 + i)),
                )
            })
            .collect();
        cache.save(&contacts).unwrap();
        drop(cache);
        let cache = PeerCache::open(dir.path()).unwrap();
        let (mut got, skipped) = cache.load().unwrap();
        assert_eq!(skipped, 0);
        let mut want = contacts.clone();
        got.sort_by_key(|c| c.addr);
        want.sort_by_key(|c| c.addr);
        assert_eq!(got, want);
        // Saving replaces.
        cache.save(&contacts[..3]).unwrap();
        assert_eq!(cache.load().unwrap().0.len(), 3);
    }

    fn corrupt_files(dir: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(CORRUPT_SUFFIX))
            .collect()
    }

    fn some_contacts(n: u16) -> Vec<Contact> {
        (0..n)
            .map(|i| {
                Contact::new(
                    Keypair::generate().peer_id(),
                    SocketAddr::from(([127, 0, 0, 1], 1000 + i)),
                )
            })
            .collect()
    }

    /// A corrupt file is set aside with its bytes intact, and the cache works.
    fn assert_set_aside_and_rebuilt(dir: &Path, bytes: &[u8]) {
        std::fs::write(dir.join(PEER_CACHE_FILE), bytes).unwrap();
        let cache = PeerCache::open(dir).unwrap();
        let aside = corrupt_files(dir);
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert_eq!(std::fs::read(&aside[0]).unwrap(), bytes);
        std::fs::remove_file(&aside[0]).unwrap();
        assert!(cache.load().unwrap().0.is_empty());
        let contacts = some_contacts(5);
        cache.save(&contacts).unwrap();
        drop(cache);
        let cache = PeerCache::open(dir).unwrap();
        assert_eq!(cache.load().unwrap().0.len(), 5);
        assert!(corrupt_files(dir).is_empty());
        drop(cache);
        std::fs::remove_file(dir.join(PEER_CACHE_FILE)).unwrap();
    }

    #[test]
    fn empty_random_and_garbage_files_are_set_aside_and_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        assert_set_aside_and_rebuilt(dir.path(), b"");
        assert_set_aside_and_rebuilt(dir.path(), b"not a database at all");
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let random: Vec<u8> = (0..64 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert_set_aside_and_rebuilt(dir.path(), &random);
    }

    #[test]
    fn every_truncation_and_bit_flip_of_a_good_cache_opens_without_panic() {
        let dir = tempfile::tempdir().unwrap();
        let good = {
            let cache = PeerCache::open(dir.path()).unwrap();
            cache.save(&some_contacts(50)).unwrap();
            drop(cache);
            std::fs::read(dir.path().join(PEER_CACHE_FILE)).unwrap()
        };
        let mut damaged: Vec<Vec<u8>> = Vec::new();
        let step = (good.len() / 64).max(1);
        for cut in (0..good.len()).step_by(step) {
            damaged.push(good[..cut].to_vec());
        }
        for at in (0..good.len()).step_by(step) {
            let mut v = good.clone();
            v[at] ^= 0xff;
            damaged.push(v);
        }
        for bytes in damaged {
            std::fs::write(dir.path().join(PEER_CACHE_FILE), &bytes).unwrap();
            // Whatever redb makes of it: the cache opens, loads and saves.
            let cache = PeerCache::open(dir.path()).unwrap();
            let _ = cache.load().unwrap();
            // Damage found only when writing fails that save and sets the
            // file aside; the next save works.
            if cache.save(&some_contacts(3)).is_err() {
                assert_eq!(corrupt_files(dir.path()).len(), 1);
                cache.save(&some_contacts(3)).unwrap();
            }
            assert_eq!(cache.load().unwrap().0.len(), 3);
            drop(cache);
            for f in corrupt_files(dir.path()) {
                std::fs::remove_file(f).unwrap();
            }
        }
    }
}
