//! A node's data dir under crashes, a second node and a full disk.
//!
//! The full-disk test mounts a tmpfs and needs root: without it, it prints
//! why and passes, unless REACH_LAB_REQUIRED=1 (CI), where it fails.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{loopback, within};
use reach::{Node, PeerId};

async fn spawn_in(dir: &Path, bootstrap: &[std::net::SocketAddr]) -> reach::Result<Node> {
    Node::builder()
        .bind(loopback())
        .data_dir(dir)
        .bootstrap(bootstrap.iter().copied())
        .spawn()
        .await
}

fn knows(node: &Node, peer: PeerId) -> bool {
    node.routing_snapshot()
        .entries
        .iter()
        .any(|e| e.peer == peer)
}

/// Two `shutdown` calls at once: whichever returns first, the node is
/// closed by then (the data dir is free for the next start), not still
/// stopping behind the other caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_shutdowns_each_return_only_once_the_node_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..20 {
        let node = spawn_in(dir.path(), &[]).await.unwrap();
        let (a, b) = (node.clone(), node.clone());
        let first = tokio::spawn(async move { a.shutdown().await });
        let second = tokio::spawn(async move { b.shutdown().await });
        within("a shutdown", futures::future::select(first, second)).await;
        let again = spawn_in(dir.path(), &[]).await;
        assert!(again.is_ok(), "data dir still locked: {:?}", again.err());
        let again = again.unwrap();
        again.shutdown().await;
        drop(node);
    }
}

#[tokio::test]
async fn a_second_node_on_a_locked_data_dir_refuses_naming_the_pid() {
    let dir = tempfile::tempdir().unwrap();
    let first = spawn_in(dir.path(), &[]).await.unwrap();
    let err = spawn_in(dir.path(), &[]).await.expect_err("second node");
    assert_eq!(err.kind(), "data_dir_locked");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("pid {}", std::process::id())),
        "{msg}"
    );
    // The first one is untouched and still the identity of the dir.
    let id = first.peer_id();
    first.shutdown().await;
    drop(first);
    // Shut down, it lets go: the next start takes the dir.
    let again = spawn_in(dir.path(), &[]).await.unwrap();
    assert_eq!(again.peer_id(), id);
}

/// A tmpfs mounted on a temp dir, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "2m"), or says why it cannot.
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed (needs root): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn filler(&self) -> PathBuf {
        self.path().join("filler")
    }

    /// Writes a file until the tmpfs is full.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.filler()).unwrap();
        let chunk = vec![0xa5u8; 4096];
        // Bounded: a tmpfs of a few MiB fills long before this.
        for _ in 0..1_000_000 {
            if let Err(e) = f.write_all(&chunk) {
                assert_eq!(e.raw_os_error(), Some(28), "expected ENOSPC, got {e}");
                return;
            }
        }
        panic!("the tmpfs never filled");
    }

    fn free(&self) {
        std::fs::remove_file(self.filler()).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: succeeds even if a file on it is still open.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_never_corrupts_the_identity_and_the_peer_cache_recovers() {
    common::logs();
    let fs = match Tmpfs::mount("4m") {
        Ok(fs) => fs,
        Err(why) => {
            if std::env::var("REACH_LAB_REQUIRED").as_deref() == Ok("1") {
                panic!("REACH_LAB_REQUIRED=1 but {why}");
            }
            eprintln!("skipping the full-disk test: {why}");
            return;
        }
    };
    let seed = Node::builder().bind(loopback()).spawn().await.unwrap();
    within("seed join", seed.joined()).await;
    let dir = fs.path().join("node");
    let node = spawn_in(&dir, &[seed.local_addr()]).await.unwrap();
    within("join", node.joined()).await;
    let id = node.peer_id();
    let key_path = dir.join(reach::keystore::KEY_FILE_NAME);
    let key = std::fs::read(&key_path).unwrap();

    let fresh = fs.path().join("fresh");
    std::fs::create_dir(&fresh).unwrap();
    fs.fill();
    // A first start on the full disk fails, and leaves no identity file
    // (never an empty one).
    let err = reach::keystore::load_or_create(&fresh).unwrap_err();
    assert_eq!(err.kind(), "key_file", "{err}");
    assert!(!fresh.join(reach::keystore::KEY_FILE_NAME).exists());

    // Meanwhile a new peer joins; the node learns it while its disk is full.
    let late = Node::builder()
        .bind(loopback())
        .bootstrap([seed.local_addr()])
        .spawn()
        .await
        .unwrap();
    within("late join", late.joined()).await;
    within("lookup", node.lookup(late.peer_id())).await.unwrap();
    assert!(knows(&node, late.peer_id()));
    let err = node.save_peer_cache().unwrap_err();
    assert_eq!(err.kind(), "storage", "{err}");
    // The node keeps running: it still reaches and delivers.
    within("connect", node.connect(late.peer_id(), [late.local_addr()]))
        .await
        .unwrap();
    within("send", node.send(late.peer_id(), "disk full, still here"))
        .await
        .unwrap();
    match within("message", late.next_event()).await {
        Some(reach::Event::Message { from, data }) => {
            assert_eq!(from, id);
            assert_eq!(&data[..], b"disk full, still here");
        }
        other => panic!("expected the message, got {other:?}"),
    }
    assert_eq!(std::fs::read(&key_path).unwrap(), key);

    // Space returns: the same process saves again, the late peer included.
    fs.free();
    node.save_peer_cache().unwrap();
    node.shutdown().await;
    drop(node);
    let again = spawn_in(&dir, &[]).await.unwrap();
    assert_eq!(again.peer_id(), id);
    assert!(knows(&again, late.peer_id()), "the recovered save is lost");
    assert!(knows(&again, seed.peer_id()));

    // A save that fails on a full disk leaves the previous contents.
    fs.fill();
    assert!(again.save_peer_cache().is_err());
    again.shutdown().await;
    drop(again);
    fs.free();
    let third = spawn_in(&dir, &[]).await.unwrap();
    assert_eq!(third.peer_id(), id);
    assert!(knows(&third, late.peer_id()));
    assert!(knows(&third, seed.peer_id()));
    assert_eq!(std::fs::read(&key_path).unwrap(), key);
    third.shutdown().await;
}
