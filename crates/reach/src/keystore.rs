//! The node's identity key on disk.
//!
//! The key lives in `<data dir>/identity.key` as one line of text,
//! `reach-ed25519-secret-v1:<64 hex digits>`, readable only by its owner
//! (0600). It is created on first run. A file that exists but is unreadable
//! or malformed is an error naming the file: it is never overwritten, because
//! losing the key means losing the node's address.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use reach_proto::Keypair;
use reach_proto::identity::SECRET_KEY_LEN;

use crate::error::{Error, Result};

/// File name of the identity key inside the data dir.
pub const KEY_FILE_NAME: &str = "identity.key";
/// Prefix of the key file's single line; the version lets the format change.
const KEY_PREFIX: &str = "reach-ed25519-secret-v1:";
/// Largest key file we read: the line is 89 bytes, anything much larger is
/// not ours.
const MAX_KEY_FILE_LEN: u64 = 1024;

/// Path of the key file inside `data_dir`.
pub fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join(KEY_FILE_NAME)
}

/// Loads the identity from `data_dir`, creating it (and the dir, 0700) if the
/// key file does not exist. Returns the keypair and whether it was created.
pub fn load_or_create(data_dir: &Path) -> Result<(Keypair, bool)> {
    ensure_private_dir(data_dir)?;
    let path = key_path(data_dir);
    match fs::symlink_metadata(&path) {
        Ok(_) => Ok((load(&path)?, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let kp = Keypair::generate();
            write_new(&path, &kp)?;
            Ok((kp, true))
        }
        Err(e) => Err(key_err(&path, format!("cannot inspect: {e}"))),
    }
}

/// Creates the data dir with 0700 permissions if it does not exist.
pub fn ensure_private_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(|source| Error::Io {
        context: "creating data dir",
        path: dir.to_path_buf(),
        source,
    })?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| Error::Io {
        context: "restricting data dir permissions",
        path: dir.to_path_buf(),
        source,
    })
}

fn key_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::KeyFile {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads and parses an existing key file.
pub fn load(path: &Path) -> Result<Keypair> {
    let meta = fs::metadata(path).map_err(|e| key_err(path, format!("cannot read: {e}")))?;
    if !meta.is_file() {
        return Err(key_err(path, "is not a regular file"));
    }
    if meta.len() > MAX_KEY_FILE_LEN {
        return Err(key_err(
            path,
            format!("is {} bytes, not a reach key file", meta.len()),
        ));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        // Like ssh: a secret others can read is no longer a secret.
        return Err(key_err(
            path,
            format!(
                "is readable by other users (mode {:o}); run: chmod 600 {}",
                meta.permissions().mode() & 0o777,
                path.display()
            ),
        ));
    }
    let text = fs::read_to_string(path).map_err(|e| key_err(path, format!("cannot read: {e}")))?;
    parse(&text).map_err(|reason| key_err(path, reason))
}

/// Parses the key file's contents.
fn parse(text: &str) -> std::result::Result<Keypair, String> {
    let line = text.trim_end_matches(['\n', '\r']);
    let hex = line
        .strip_prefix(KEY_PREFIX)
        .ok_or_else(|| format!("malformed: expected a line starting with {KEY_PREFIX:?}"))?;
    if hex.len() != SECRET_KEY_LEN * 2 {
        return Err(format!(
            "malformed: expected {} hex digits after the prefix, found {}",
            SECRET_KEY_LEN * 2,
            hex.len()
        ));
    }
    let mut seed = [0u8; SECRET_KEY_LEN];
    for (i, out) in seed.iter_mut().enumerate() {
        let pair = hex
            .get(2 * i..2 * i + 2)
            .ok_or("malformed: not ASCII hex")?;
        *out = u8::from_str_radix(pair, 16).map_err(|_| "malformed: not hex".to_string())?;
    }
    Ok(Keypair::from_secret_bytes(seed))
}

fn format_key(kp: &Keypair) -> String {
    let hex: String = kp
        .secret_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{KEY_PREFIX}{hex}\n")
}

/// Writes a brand-new key file with 0600 permissions; fails rather than
/// replace an existing file.
fn write_new(path: &Path, kp: &Keypair) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| key_err(path, format!("cannot create: {e}")))?;
    file.write_all(format_key(kp).as_bytes())
        .and_then(|_| file.sync_all())
        .map_err(|e| key_err(path, format!("cannot write: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_0600(path: &Path, text: &str) {
        fs::write(path, text).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn created_once_with_owner_only_permissions_then_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("node");
        let (a, created) = load_or_create(&data).unwrap();
        assert!(created);
        let mode = fs::metadata(key_path(&data)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (b, created) = load_or_create(&data).unwrap();
        assert!(!created);
        assert_eq!(a.peer_id(), b.peer_id());
    }

    #[test]
    fn malformed_key_is_an_error_naming_the_file_and_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_path(dir.path());
        write_0600(&path, "not a key\n");
        let err = load_or_create(dir.path()).unwrap_err();
        assert_eq!(err.kind(), "key_file");
        assert!(err.to_string().contains(&path.display().to_string()));
        assert_eq!(fs::read_to_string(&path).unwrap(), "not a key\n");

        write_0600(&path, &format!("{KEY_PREFIX}zz"));
        assert_eq!(load_or_create(dir.path()).unwrap_err().kind(), "key_file");
        write_0600(&path, &format!("{KEY_PREFIX}{}", "é".repeat(32)));
        assert_eq!(load_or_create(dir.path()).unwrap_err().kind(), "key_file");
    }

    #[test]
    fn a_key_readable_by_others_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (kp, _) = load_or_create(dir.path()).unwrap();
        let path = key_path(dir.path());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        assert_eq!(err.kind(), "key_file");
        assert!(err.to_string().contains("chmod 600"));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            load_or_create(dir.path()).unwrap().0.peer_id(),
            kp.peer_id()
        );
    }

    #[test]
    fn unreadable_key_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the key file should be cannot be read as a key.
        fs::create_dir(key_path(dir.path())).unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        assert_eq!(err.kind(), "key_file");
    }
}
