//! The node's identity key on disk.
//!
//! The key lives in `<data dir>/identity.key` as one line of text,
//! `reach-ed25519-secret-v1:<64 hex digits>`, readable only by its owner
//! (0600). It is created on first run. A file that exists but is unreadable
//! or malformed is an error naming the file: it is never overwritten, because
//! losing the key means losing the node's address.
//!
//! A new key is written to a temporary file in the same dir, fsynced, then
//! linked into place (which never replaces an existing file) and the dir
//! fsynced: a crash or a full disk leaves `identity.key` either absent or
//! whole. An empty or partial file (left by an older version that wrote in
//! place) is [`Error::KeyFileIncomplete`], which says how to recover; never a
//! silent new identity.

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
/// Prefix of the temporary file a new key is written to before it is linked
/// into place; `<pid>-<n>` follows (n counts writes in this process), so
/// concurrent first starts (say `reach id` next to `reach node`, or two
/// threads) never share one.
const TMP_PREFIX: &str = "identity.key.tmp-";
/// Numbers the temporary files of this process.
static TMP_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

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
            let stored = write_new(&path, &kp)?;
            let created = stored.peer_id() == kp.peer_id();
            Ok((stored, created))
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
    let bytes = fs::read(path).map_err(|e| key_err(path, format!("cannot read: {e}")))?;
    if is_incomplete(&bytes) {
        return Err(Error::KeyFileIncomplete {
            path: path.to_path_buf(),
            len: bytes.len() as u64,
        });
    }
    let text = String::from_utf8(bytes).map_err(|_| key_err(path, "malformed: not text"))?;
    parse(&text).map_err(|reason| key_err(path, reason))
}

/// Whether `bytes` look like a key file cut short: empty, all zero bytes
/// (what some filesystems show of a file whose data never reached the disk),
/// or a proper prefix of a well-formed line.
fn is_incomplete(bytes: &[u8]) -> bool {
    let full = KEY_PREFIX.len() + SECRET_KEY_LEN * 2;
    if bytes.len() >= full {
        return false;
    }
    if bytes.iter().all(|&b| b == 0) {
        return true;
    }
    let (head, tail) = bytes.split_at(bytes.len().min(KEY_PREFIX.len()));
    KEY_PREFIX.as_bytes().starts_with(head) && tail.iter().all(u8::is_ascii_hexdigit)
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

/// Writes a brand-new key file with 0600 permissions, atomically: to a
/// temporary file, fsynced, hard-linked to `path` (which fails rather than
/// replace an existing file), then the dir fsynced so the name survives a
/// crash. If another process created the key first, its key is returned.
fn write_new(path: &Path, kp: &Keypair) -> Result<Keypair> {
    let dir = path.parent().unwrap_or(Path::new("."));
    remove_stale_tmp_files(dir);
    let n = TMP_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!("{TMP_PREFIX}{}-{n}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(format_key(kp).as_bytes())?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(key_err(
            path,
            format!("cannot write {}: {e}", tmp.display()),
        ));
    }
    let placed = match fs::hard_link(&tmp, path) {
        // Filesystems without hard links: a rename, which would replace a
        // key created meanwhile, so look first (the data dir lock keeps
        // other nodes out; this only races a concurrent `reach id`).
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists && !path.exists() => {
            fs::rename(&tmp, path)
        }
        other => other,
    };
    let _ = fs::remove_file(&tmp);
    match placed {
        Ok(()) => {}
        // Someone else's first start won: theirs is the identity.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return load(path),
        Err(e) => return Err(key_err(path, format!("cannot create: {e}"))),
    }
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| key_err(path, format!("cannot sync {}: {e}", dir.display())))?;
    // Read back what is on disk: after a rename fallback a concurrent first
    // start may have placed its key last, and every process must agree.
    load(path)
}

/// Removes temporary key files left by writers that no longer run (killed
/// between writing and linking). Best effort: they hold a key that was
/// never used, and are only clutter.
fn remove_stale_tmp_files(dir: &Path) {
    // Without /proc we cannot tell a live writer from a dead one.
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some((pid, _)) = name
            .to_str()
            .and_then(|n| n.strip_prefix(TMP_PREFIX))
            .and_then(|n| n.split_once('-'))
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_file(entry.path());
        }
    }
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

    #[test]
    fn an_absent_key_is_created_whole_with_no_temporary_file_left() {
        let dir = tempfile::tempdir().unwrap();
        let (kp, created) = load_or_create(dir.path()).unwrap();
        assert!(created);
        let text = fs::read_to_string(key_path(dir.path())).unwrap();
        assert_eq!(text, format_key(&kp));
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![KEY_FILE_NAME.to_string()]);
    }

    #[test]
    fn an_empty_key_is_a_typed_error_saying_how_to_recover_and_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_path(dir.path());
        write_0600(&path, "");
        let err = load_or_create(dir.path()).unwrap_err();
        assert_eq!(err.kind(), "key_file_incomplete");
        let msg = err.to_string();
        assert!(msg.contains("is empty"), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("delete it") && msg.contains("backup"), "{msg}");
        // Never a silent new identity: the file is still empty.
        assert_eq!(fs::read(&path).unwrap().len(), 0);
        assert_eq!(
            load_or_create(dir.path()).unwrap_err().kind(),
            "key_file_incomplete"
        );
    }

    #[test]
    fn a_partial_key_is_a_typed_error_and_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let whole = format_key(&Keypair::generate());
        let path = key_path(dir.path());
        for cut in [10, KEY_PREFIX.len(), KEY_PREFIX.len() + 7, whole.len() - 2] {
            write_0600(&path, &whole[..cut]);
            let err = load_or_create(dir.path()).unwrap_err();
            assert_eq!(err.kind(), "key_file_incomplete", "cut at {cut}");
            assert!(
                err.to_string()
                    .contains(&format!("incomplete ({cut} bytes)"))
            );
            assert_eq!(fs::read_to_string(&path).unwrap(), whole[..cut]);
        }
        // Zero bytes where the data never reached the disk.
        fs::write(&path, [0u8; 40]).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            load_or_create(dir.path()).unwrap_err().kind(),
            "key_file_incomplete"
        );
        // The whole line without its newline is still a key.
        write_0600(&path, whole.trim_end());
        assert!(load_or_create(dir.path()).is_ok());
    }

    #[test]
    fn a_stale_temporary_file_is_removed_and_a_live_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        // pid 4000000 is above Linux's largest pid: nobody runs as it.
        let stale = dir.path().join(format!("{TMP_PREFIX}4000000-0"));
        let live = dir.path().join(format!("{TMP_PREFIX}1-0"));
        fs::write(&stale, "x").unwrap();
        fs::write(&live, "x").unwrap();
        load_or_create(dir.path()).unwrap();
        assert!(!stale.exists());
        assert!(live.exists());
    }

    #[test]
    fn concurrent_first_starts_agree_on_one_identity() {
        let dir = tempfile::tempdir().unwrap();
        let results: Vec<(Keypair, bool)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| load_or_create(dir.path()).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let id = results[0].0.peer_id();
        assert!(results.iter().all(|(kp, _)| kp.peer_id() == id));
        assert_eq!(results.iter().filter(|(_, created)| *created).count(), 1);
        assert_eq!(load(&key_path(dir.path())).unwrap().peer_id(), id);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
