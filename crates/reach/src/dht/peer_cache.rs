//! The routing table on disk: `<data dir>/peers.redb`.
//!
//! A restarted node seeds its routing table from here, so it rejoins the
//! network without a bootstrap list. The file is a redb database (ACID: a
//! crash mid-write leaves the previous contents). A corrupt or unreadable
//! file is reported and set aside rather than deleted, and the node runs
//! without a cache.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use reach_proto::PeerId;
use reach_proto::dht::Contact;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::{Error, Result};

/// File name of the peer cache in the data dir.
pub const PEER_CACHE_FILE: &str = "peers.redb";
/// Contacts saved at most: a full table for a network of millions is a few
/// thousand; more would only slow startup.
pub const MAX_CACHED_PEERS: usize = 4096;

/// peer id bytes → postcard(SocketAddr)
const PEERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("peers");

/// The persisted peer cache.
pub struct PeerCache {
    db: Database,
    path: PathBuf,
}

impl PeerCache {
    /// Opens (creating if needed) the cache in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self> {
        let path = data_dir.join(PEER_CACHE_FILE);
        let db = Database::create(&path).map_err(|e| Error::Storage {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(PeerCache { db, path })
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::Storage {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    /// Replaces the cache with `contacts` (at most [`MAX_CACHED_PEERS`]).
    pub fn save(&self, contacts: &[Contact]) -> Result<()> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = tx.open_table(PEERS).map_err(|e| self.err(e))?;
            table.retain(|_, _| false).map_err(|e| self.err(e))?;
            for c in contacts.iter().take(MAX_CACHED_PEERS) {
                let addr = postcard::to_allocvec(&c.addr).map_err(|e| self.err(e))?;
                table
                    .insert(c.peer.as_bytes().as_slice(), addr.as_slice())
                    .map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Reads the cached contacts. Entries that do not decode are skipped
    /// (and counted in the returned number), never fatal.
    pub fn load(&self) -> Result<(Vec<Contact>, usize)> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = match tx.open_table(PEERS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok((Vec::new(), 0)),
            Err(e) => return Err(self.err(e)),
        };
        let mut out = Vec::new();
        let mut skipped = 0;
        for item in table.iter().map_err(|e| self.err(e))? {
            let Ok((k, v)) = item else {
                skipped += 1;
                continue;
            };
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

    #[test]
    fn a_corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(PEER_CACHE_FILE), b"not a database at all").unwrap();
        let err = PeerCache::open(dir.path()).err().unwrap();
        assert_eq!(err.kind(), "storage");
        assert!(err.to_string().contains(PEER_CACHE_FILE));
    }
}
