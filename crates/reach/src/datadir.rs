//! The exclusive lock on a node's data dir.
//!
//! Two nodes on one data dir would share an identity (two peers with one
//! key confuse everyone who dials it), fight over the peer cache, and
//! overwrite each other's control API files, leaving the first node
//! unreachable from the CLI. So a node holds `<data dir>/lock` for its whole
//! life: an advisory `flock` taken without waiting, with the holder's pid
//! written inside for the error message of the next one.
//!
//! The kernel drops the lock when its holder exits, however it exits, so a
//! node killed with `kill -9` never leaves a stale lock behind: the file
//! stays, but nobody holds it, and the next start takes it. The file is
//! never deleted (deleting a lock file lets two processes lock two different
//! files of the same name).

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::keystore;

/// File name of the lock inside the data dir.
pub const LOCK_FILE_NAME: &str = "lock";
/// Largest lock file we read to find the holder's pid: a pid is at most
/// 10 digits and a newline; more is not ours.
const MAX_LOCK_FILE_LEN: u64 = 64;

/// An exclusive lock on a data dir, released when dropped (or when the
/// process exits).
#[derive(Debug)]
pub struct DataDirLock {
    file: File,
    path: PathBuf,
}

impl DataDirLock {
    /// Takes the lock on `data_dir` (creating the dir, 0700, if needed), or
    /// fails at once with [`Error::DataDirLocked`] naming the holder's pid.
    pub fn acquire(data_dir: &Path) -> Result<DataDirLock> {
        keystore::ensure_private_dir(data_dir)?;
        let path = data_dir.join(LOCK_FILE_NAME);
        let io = |context: &'static str| {
            let path = path.clone();
            move |source| Error::Io {
                context,
                path,
                source,
            }
        };
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io("opening the data dir lock"))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::DataDirLocked {
                    dir: data_dir.to_path_buf(),
                    pid: read_pid(&mut file),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(io("locking the data dir")(e));
            }
        }
        // Ours now: record who holds it, for the next one's error message.
        // Best effort: on a full disk the lock still holds, only the pid is
        // missing from the message.
        if let Err(e) = file
            .set_len(0)
            .and_then(|_| file.seek(SeekFrom::Start(0)))
            .and_then(|_| writeln!(file, "{}", std::process::id()))
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot write our pid into the data dir lock");
        }
        Ok(DataDirLock { file, path })
    }

    /// Path of the lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for DataDirLock {
    fn drop(&mut self) {
        // Closing the file releases the lock; unlocking first makes the
        // release independent of other handles to the same open file.
        let _ = self.file.unlock();
    }
}

/// The pid written by the holder, if it has written one yet.
fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(MAX_LOCK_FILE_LEN)
        .read_to_string(&mut text)
        .ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_pid_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("node");
        let first = DataDirLock::acquire(&data).unwrap();
        let err = DataDirLock::acquire(&data).unwrap_err();
        assert_eq!(err.kind(), "data_dir_locked");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains(&data.display().to_string()), "{msg}");
        drop(first);
        let again = DataDirLock::acquire(&data).unwrap();
        assert_eq!(
            fs::read_to_string(again.path()).unwrap().trim(),
            std::process::id().to_string()
        );
    }

    #[test]
    fn a_lock_file_left_behind_unlocked_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        // What a node killed with kill -9 leaves: the file with its pid.
        fs::write(dir.path().join(LOCK_FILE_NAME), "4000000\n").unwrap();
        let lock = DataDirLock::acquire(dir.path()).unwrap();
        assert_eq!(
            fs::read_to_string(lock.path()).unwrap().trim(),
            std::process::id().to_string()
        );
    }
}
