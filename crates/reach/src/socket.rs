//! One UDP socket shared by QUIC and reach's non-QUIC packets.
//!
//! [`DemuxSocket`] wraps quinn's tokio UDP socket. Every datagram quinn reads
//! passes through [`DemuxSocket::poll_recv`], which hands STUN and reach
//! control packets to the node over a bounded channel and lets only QUIC
//! through. Sharing the socket matters for NAT traversal: a probe or punch
//! packet opens the very NAT mapping that QUIC then uses.
//!
//! Generic receive offload (GRO) can coalesce several same-sized datagrams
//! from one sender into one buffer (`stride` bytes each). Non-QUIC segments are
//! copied out one by one; a buffer holding only non-QUIC segments is removed
//! from the batch; a mixed buffer is passed on whole, and quinn drops its
//! non-QUIC segments because their QUIC fixed bit is clear (reach disables
//! fixed-bit greasing).

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use reach_proto::wire::{DatagramKind, classify};
use tokio::sync::mpsc;

/// Capacity of the queue of non-QUIC datagrams waiting for the node. When it
/// is full (a flood), further ones are dropped and counted: UDP control
/// traffic is lossy by nature and must never stall QUIC.
pub const NON_QUIC_QUEUE: usize = 1024;

/// Batches of nothing but non-QUIC datagrams read in one `poll_recv` before
/// yielding: a flood of junk must not monopolise the executor thread.
pub const MAX_NON_QUIC_BATCHES_PER_POLL: usize = 16;

/// A non-QUIC datagram received on the shared socket.
#[derive(Debug, Clone)]
pub struct NonQuicDatagram {
    pub from: SocketAddr,
    pub kind: DatagramKind,
    pub data: Bytes,
}

/// Counters of what the demultiplexer saw.
#[derive(Debug, Default)]
pub struct DemuxStats {
    pub quic_datagrams: AtomicU64,
    pub control_datagrams: AtomicU64,
    pub stun_datagrams: AtomicU64,
    pub unknown_dropped: AtomicU64,
    pub queue_full_dropped: AtomicU64,
}

/// quinn's socket with non-QUIC datagrams diverted to the node.
pub struct DemuxSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    to_node: mpsc::Sender<NonQuicDatagram>,
    stats: Arc<DemuxStats>,
}

impl fmt::Debug for DemuxSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DemuxSocket")
            .field("inner", &self.inner)
            .finish()
    }
}

impl DemuxSocket {
    /// Wraps `inner`; non-QUIC datagrams are sent to the returned receiver.
    pub fn new(
        inner: Arc<dyn AsyncUdpSocket>,
    ) -> (Arc<Self>, mpsc::Receiver<NonQuicDatagram>, Arc<DemuxStats>) {
        let (tx, rx) = mpsc::channel(NON_QUIC_QUEUE);
        let stats = Arc::new(DemuxStats::default());
        let sock = Arc::new(DemuxSocket {
            inner,
            to_node: tx,
            stats: stats.clone(),
        });
        (sock, rx, stats)
    }

    /// Sends one non-QUIC datagram from the shared socket. Best effort: if the
    /// socket buffer is full the datagram is dropped, as UDP would.
    pub fn send_datagram(&self, to: SocketAddr, data: &[u8]) -> io::Result<()> {
        self.inner.try_send(&Transmit {
            destination: to,
            ecn: None,
            contents: data,
            segment_size: None,
            src_ip: None,
        })
    }

    fn divert(&self, from: SocketAddr, kind: DatagramKind, seg: &[u8]) {
        let counter = match kind {
            DatagramKind::Control => &self.stats.control_datagrams,
            DatagramKind::Stun => &self.stats.stun_datagrams,
            _ => {
                self.stats.unknown_dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let d = NonQuicDatagram {
            from,
            kind,
            data: Bytes::copy_from_slice(seg),
        };
        if self.to_node.try_send(d).is_err() {
            self.stats
                .queue_full_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Diverts the non-QUIC segments of one received buffer; returns whether
    /// any QUIC segment remains for quinn.
    fn filter(&self, meta: &RecvMeta, buf: &[u8]) -> bool {
        let stride = meta.stride.max(1);
        let data = &buf[..meta.len.min(buf.len())];
        let mut has_quic = false;
        for seg in data.chunks(stride) {
            match classify(seg) {
                DatagramKind::Quic => has_quic = true,
                kind => self.divert(meta.addr, kind, seg),
            }
        }
        if has_quic {
            self.stats.quic_datagrams.fetch_add(1, Ordering::Relaxed);
        }
        has_quic
    }
}

impl AsyncUdpSocket for DemuxSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        for _ in 0..MAX_NON_QUIC_BATCHES_PER_POLL {
            let n = match self.inner.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(n)) => n,
                other => return other,
            };
            // Compact the batch: keep buffers that still hold QUIC at the
            // front, in order. Swapping whole slots keeps each meta paired
            // with its buffer.
            let mut kept = 0;
            for i in 0..n {
                if self.filter(&meta[i], &bufs[i]) {
                    if i != kept {
                        meta.swap(i, kept);
                        bufs.swap(i, kept);
                    }
                    kept += 1;
                }
            }
            if kept > 0 {
                return Poll::Ready(Ok(kept));
            }
            // Everything was non-QUIC: read again (this registers the waker
            // if nothing more is ready).
        }
        // A flood of non-QUIC datagrams: yield to other tasks, but ask to be
        // polled again at once.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
