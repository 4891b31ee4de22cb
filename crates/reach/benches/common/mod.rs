//! What the benches share: two reach nodes on loopback, connected, with the
//! receiver draining everything, and the two workloads they measure.

// Each bench uses a part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use reach::{Event, Node};

/// Bytes per bulk iteration (one stream).
pub const BULK_BYTES: usize = 64 * 1024 * 1024;
/// Write size of a bulk stream.
pub const CHUNK: usize = 64 * 1024;
/// Messages per `messages` iteration.
pub const BATCH: usize = 2_000;
/// Message size.
pub const MESSAGE_LEN: usize = 1024;
/// Messages in flight at once.
pub const IN_FLIGHT: usize = 64;

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// The benches' runtime: two workers, as the machines they run on have
/// two cores.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Where criterion and the benches' JSON reports go.
pub fn criterion_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"))
        .join("criterion")
}

/// Two connected nodes: A sends, B drains.
pub struct ReachPair {
    pub a: Node,
    pub b: Node,
    /// With data dirs: A's and B's, where their event logs go.
    pub dirs: Option<(tempfile::TempDir, tempfile::TempDir)>,
}

impl ReachPair {
    /// Two nodes; `with_data_dirs`: each with a data dir, so each writes
    /// its event log (`events.jsonl`) as a `reach node` does.
    pub async fn new(with_data_dirs: bool) -> Self {
        let dirs =
            with_data_dirs.then(|| (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()));
        let node = |dir: Option<&tempfile::TempDir>| {
            let mut b = Node::builder().bind(loopback());
            if let Some(d) = dir {
                b = b.data_dir(d.path());
            }
            b.spawn()
        };
        let a = node(dirs.as_ref().map(|d| &d.0)).await.unwrap();
        let b = node(dirs.as_ref().map(|d| &d.1)).await.unwrap();
        a.connect(b.peer_id(), [b.local_addr()]).await.unwrap();
        // B drains every stream and message it gets.
        let bb = b.clone();
        tokio::spawn(async move {
            while let Some(ev) = bb.next_event().await {
                if let Event::Stream(mut s) = ev {
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; CHUNK];
                        while let Ok(Some(_)) = s.recv.read(&mut buf).await {}
                        let _ = s.send.finish();
                        let _ = s.send.stopped().await;
                    });
                }
            }
        });
        ReachPair { a, b, dirs }
    }

    /// Lines in both nodes' event logs (0 without data dirs).
    pub fn logged_lines(&self) -> usize {
        self.dirs.as_ref().map_or(0, |(da, db)| {
            [da, db]
                .iter()
                .map(|d| {
                    std::fs::read_to_string(d.path().join("events.jsonl"))
                        .map_or(0, |t| t.lines().count())
                })
                .sum()
        })
    }

    /// One stream of [`BULK_BYTES`], until B has read it all.
    pub async fn bulk(&self) {
        let mut s = self.a.open_stream(self.b.peer_id()).await.unwrap();
        send_bulk(&mut s.send).await;
        // Wait until B has read everything and closed its side.
        s.recv.read_to_end(0).await.unwrap();
    }

    /// [`BATCH`] messages, [`IN_FLIGHT`] at a time, each acknowledged.
    pub async fn messages(&self) {
        let payload = bytes::Bytes::from(vec![7u8; MESSAGE_LEN]);
        let to = self.b.peer_id();
        let mut inflight: FuturesUnordered<_> = FuturesUnordered::new();
        for _ in 0..BATCH {
            if inflight.len() >= IN_FLIGHT {
                let r: reach::Result<()> = inflight.next().await.unwrap();
                r.unwrap();
            }
            inflight.push(self.a.send(to, payload.clone()));
        }
        while let Some(r) = inflight.next().await {
            r.unwrap();
        }
    }

    pub async fn shutdown(&self) {
        self.a.shutdown().await;
        self.b.shutdown().await;
    }
}

/// Writes [`BULK_BYTES`] in [`CHUNK`]s and finishes the stream.
pub async fn send_bulk(send: &mut quinn::SendStream) {
    let chunk = bytes::Bytes::from(vec![0x5Au8; CHUNK]);
    for _ in 0..BULK_BYTES / CHUNK {
        send.write_chunk(chunk.clone()).await.unwrap();
    }
    send.finish().unwrap();
}
