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
//!
//! Relayed packets take a detour through here too (see
//! [`crate::relay::paths`]): sends to a virtual address are wrapped in a
//! relay frame for the relay; frames from a relay are unwrapped and handed
//! to quinn from the virtual address; frames of circuits this node relays
//! are forwarded at once, without leaving the receive path.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::IpAddr;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use reach_proto::wire::datagram::{RELAY_HEADER_LEN, relay_frame, relay_header};
use reach_proto::wire::{DatagramKind, classify};
use tokio::sync::mpsc;

use crate::relay::paths::RelayPaths;
use crate::tcp::{TcpLinks, is_link};
use crate::vaddr::is_virtual;

/// Capacity of the queue of non-QUIC datagrams waiting for the node. When it
/// is full (a flood), further ones are dropped and counted: UDP control
/// traffic is lossy by nature and must never stall QUIC.
pub const NON_QUIC_QUEUE: usize = 1024;

/// Batches of nothing but non-QUIC datagrams read in one `poll_recv` before
/// yielding: a flood of junk must not monopolise the executor thread.
pub const MAX_NON_QUIC_BATCHES_PER_POLL: usize = 16;

/// Largest relayed send (all segments with their relay headers) in one
/// system call, below UDP's 64 KiB limit.
pub const MAX_RELAYED_BATCH_BYTES: usize = 60_000;

/// How long a destination counts as "contacted": NATs with address-dependent
/// filtering typically keep a contacted address open for up to 5 minutes.
pub const CONTACT_MEMORY: Duration = Duration::from_secs(300);
/// Destination IPs remembered at most; beyond that, every IP counts as
/// contacted (a filtering test is then inconclusive, never wrongly open).
pub const MAX_CONTACTED: usize = 8192;

/// The IPs this socket sent to recently. A filtering test's probe from such
/// an IP proves nothing: an address-dependent filter lets it through.
#[derive(Default)]
struct Contacted {
    last: AtomicU64,
    map: Mutex<HashMap<IpAddr, Instant>>,
    overflow_until: Mutex<Option<Instant>>,
}

impl Contacted {
    fn note(&self, ip: IpAddr) {
        let tag = match ip {
            IpAddr::V4(v4) => u64::from(u32::from(v4)),
            IpAddr::V6(v6) => {
                let b = u128::from(v6);
                (b as u64) ^ ((b >> 64) as u64) ^ (1 << 63)
            }
        };
        // Consecutive sends mostly go to one peer: skip the map then.
        if self.last.swap(tag, Ordering::Relaxed) == tag {
            return;
        }
        let now = Instant::now();
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(ip, now);
        if m.len() > MAX_CONTACTED {
            m.retain(|_, t| now.duration_since(*t) < CONTACT_MEMORY);
            if m.len() > MAX_CONTACTED {
                m.clear();
                *self
                    .overflow_until
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(now + CONTACT_MEMORY);
            }
        }
    }

    fn recently(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let overflow = self
            .overflow_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|until| now < until);
        overflow
            || self
                .map
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&ip)
                .is_some_and(|t| now.duration_since(*t) < CONTACT_MEMORY)
    }
}

thread_local! {
    /// The buffer relayed sends are assembled in (one per sending thread).
    static RELAY_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A non-QUIC datagram received on the shared socket.
#[derive(Debug, Clone)]
pub struct NonQuicDatagram {
    pub from: SocketAddr,
    pub kind: DatagramKind,
    pub data: Bytes,
}

crate::telemetry::metrics! {
    /// Counters of what the demultiplexer saw.
    pub struct DemuxCounters =>
    /// The demultiplexer's counters as [`NodeStats`](crate::NodeStats) shows them.
    pub struct DatagramStats;
    atomic {
        /// QUIC datagrams handed to quinn.
        counter quic_datagrams,
        /// reach control datagrams (address probes and answers).
        counter control_datagrams,
        /// STUN datagrams.
        counter stun_datagrams,
        /// Datagrams of no known kind, dropped.
        counter unknown_dropped = "unknown_datagrams_dropped",
        /// Non-QUIC datagrams dropped because the node's queue was full.
        counter queue_full_dropped = "queue_full_datagrams_dropped",
        /// Relayed segments dropped because GRO had coalesced them with
        /// packets of another path (QUIC retransmits them).
        counter relay_mixed_dropped,
    }
}

/// quinn's socket with non-QUIC datagrams diverted to the node.
pub struct DemuxSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    to_node: mpsc::Sender<NonQuicDatagram>,
    stats: Arc<DemuxCounters>,
    paths: Arc<RelayPaths>,
    links: Arc<TcpLinks>,
    /// Alternates which path `poll_recv` reads first.
    links_turn: std::sync::atomic::AtomicBool,
    contacted: Contacted,
}

/// What one received segment turned out to be.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Seg {
    /// QUIC from the sender's real address.
    Quic,
    /// QUIC relayed on a circuit: from this virtual address.
    Relayed(SocketAddr),
    /// Handled here (diverted, forwarded or dropped).
    Done,
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
        paths: Arc<RelayPaths>,
        links: Arc<TcpLinks>,
    ) -> (
        Arc<Self>,
        mpsc::Receiver<NonQuicDatagram>,
        Arc<DemuxCounters>,
    ) {
        let (tx, rx) = mpsc::channel(NON_QUIC_QUEUE);
        let stats = Arc::new(DemuxCounters::default());
        let sock = Arc::new(DemuxSocket {
            inner,
            to_node: tx,
            stats: stats.clone(),
            paths,
            links,
            links_turn: std::sync::atomic::AtomicBool::new(false),
            contacted: Contacted::default(),
        });
        (sock, rx, stats)
    }

    /// Sends one non-QUIC datagram from the shared socket. Best effort: if the
    /// socket buffer is full the datagram is dropped, as UDP would.
    pub fn send_datagram(&self, to: SocketAddr, data: &[u8]) -> io::Result<()> {
        self.contacted.note(to.ip());
        self.send_raw(to, data, None)
    }

    /// Sends over a TCP link when `to` is a link address, else over UDP.
    fn send_raw(&self, to: SocketAddr, data: &[u8], segment_size: Option<usize>) -> io::Result<()> {
        if let Some(sent) = self.links.send(&to, data, segment_size) {
            return sent;
        }
        self.inner.try_send(&Transmit {
            destination: to,
            ecn: None,
            contents: data,
            segment_size,
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

    /// Whether this socket sent to `ip` within [`CONTACT_MEMORY`].
    pub fn contacted_recently(&self, ip: IpAddr) -> bool {
        self.contacted.recently(ip)
    }

    /// Sorts one received segment.
    fn sort(&self, from: SocketAddr, seg: &[u8]) -> Seg {
        match classify(seg) {
            DatagramKind::Quic => Seg::Quic,
            DatagramKind::Relay => self.relay_segment(from, seg),
            kind => {
                self.divert(from, kind, seg);
                Seg::Done
            }
        }
    }

    /// A relay frame: ours to unwrap, or a circuit we relay, or junk.
    fn relay_segment(&self, from: SocketAddr, seg: &[u8]) -> Seg {
        let Some((circuit, _)) = relay_frame(seg) else {
            return Seg::Done;
        };
        if let Some(v) = self.paths.virtual_for(from, circuit) {
            self.paths
                .stats
                .client_received
                .fetch_add(1, Ordering::Relaxed);
            return Seg::Relayed(v);
        }
        if let Some(to) = self.paths.forward_to(circuit, from, seg.len()) {
            let sent = self.send_raw(to, seg, None);
            if sent.is_ok() {
                let st = &self.paths.stats;
                st.forwarded_packets.fetch_add(1, Ordering::Relaxed);
                st.forwarded_bytes
                    .fetch_add(seg.len() as u64, Ordering::Relaxed);
            }
        }
        Seg::Done
    }

    /// A relay's fast path: a buffer whose segments are all frames of one
    /// circuit this node relays is forwarded whole, as one GSO send, the way
    /// the kernel coalesced it. Returns whether the buffer was handled.
    fn forward_batch(&self, from: SocketAddr, data: &[u8], stride: usize) -> bool {
        if classify(data) != DatagramKind::Relay {
            return false;
        }
        let Some((circuit, _)) = relay_frame(data) else {
            return false;
        };
        let header = &data[..RELAY_HEADER_LEN];
        let same_circuit = data
            .chunks(stride)
            .all(|seg| seg.len() > RELAY_HEADER_LEN && &seg[..RELAY_HEADER_LEN] == header);
        if !same_circuit || self.paths.virtual_for(from, circuit).is_some() {
            return false;
        }
        let segments = data.len().div_ceil(stride) as u64;
        let Some(to) = self
            .paths
            .forward_batch_to(circuit, from, data.len(), segments)
        else {
            return true;
        };
        let sent = if segments as usize <= self.inner.max_transmit_segments() {
            self.send_raw(to, data, (segments > 1).then_some(stride))
        } else {
            // More than one GSO send may carry (or GSO is off): one by one.
            data.chunks(stride)
                .try_for_each(|seg| self.send_raw(to, seg, None))
        };
        if sent.is_ok() {
            let st = &self.paths.stats;
            st.forwarded_packets.fetch_add(segments, Ordering::Relaxed);
            st.forwarded_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        true
    }

    /// Handles one received buffer in place: diverts non-QUIC segments,
    /// forwards relayed ones, unwraps ours. Returns whether something is
    /// left for quinn (then `meta` and `buf` describe it).
    fn filter(&self, meta: &mut RecvMeta, buf: &mut [u8]) -> bool {
        let stride = meta.stride.max(1);
        let len = meta.len.min(buf.len());
        if self.forward_batch(meta.addr, &buf[..len], stride) {
            return false;
        }
        // The common case, one plain QUIC datagram or a GRO batch of them,
        // goes through untouched and without allocating.
        if buf[..len]
            .chunks(stride)
            .all(|seg| classify(seg) == DatagramKind::Quic)
        {
            self.stats.quic_datagrams.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        let kinds: Vec<Seg> = buf[..len]
            .chunks(stride)
            .map(|seg| self.sort(meta.addr, seg))
            .collect();
        // What quinn gets: the segments of the first path seen. GRO only
        // merges packets of one sender, so a second path in one buffer is
        // rare; its segments are dropped and QUIC resends them.
        let Some(&first) = kinds.iter().find(|k| **k != Seg::Done) else {
            return false;
        };
        let mixed = kinds
            .iter()
            .filter(|k| **k != Seg::Done && **k != first)
            .count();
        if mixed > 0 {
            self.stats
                .relay_mixed_dropped
                .fetch_add(mixed as u64, Ordering::Relaxed);
        }
        let keep = |i: usize| kinds[i] == first;
        let (header, to) = match first {
            Seg::Relayed(v) => (RELAY_HEADER_LEN, v),
            _ => (0, meta.addr),
        };
        // Compact the kept segments, minus any relay header, to the front.
        let out_stride = stride - header;
        let mut out_len = 0;
        let mut kept = 0;
        for (i, start) in (0..len).step_by(stride).enumerate() {
            if !keep(i) {
                continue;
            }
            let end = (start + stride).min(len);
            let seg_len = end - start - header;
            if kept > 0 && out_len % out_stride != 0 {
                // A short segment may only come last in a GRO batch; it
                // did, since only the last chunk can be short.
                break;
            }
            buf.copy_within(start + header..end, out_len);
            out_len += seg_len;
            kept += 1;
        }
        meta.len = out_len;
        meta.stride = if kept > 1 { out_stride } else { out_len };
        meta.addr = to;
        if first == Seg::Quic {
            self.stats.quic_datagrams.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    /// Filters the first `n` received buffers and moves those that still
    /// hold QUIC to the front, in order; returns how many. Swapping whole
    /// slots keeps each meta paired with its buffer.
    fn keep_quic(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta], n: usize) -> usize {
        let mut kept = 0;
        for i in 0..n {
            if self.filter(&mut meta[i], &mut bufs[i]) {
                if i != kept {
                    meta.swap(i, kept);
                    bufs.swap(i, kept);
                }
                kept += 1;
            }
        }
        kept
    }

    /// Sends quinn's transmit to a virtual address: each segment wrapped in
    /// a relay frame, as one GSO batch to the relay.
    fn send_relayed(&self, transmit: &Transmit) -> io::Result<()> {
        let Some(path) = self.paths.path(&transmit.destination) else {
            // The circuit is gone: the packet is lost, as on a dead path.
            return Ok(());
        };
        let seg_size = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        self.contacted.note(path.relay_addr.ip());
        let header = relay_header(path.circuit);
        // Wrapped segments grow by the header; keep each batch inside the
        // 64 KiB a UDP send can carry. One buffer per thread, reused.
        let per_batch = (MAX_RELAYED_BATCH_BYTES / (seg_size + RELAY_HEADER_LEN)).max(1);
        let segments: Vec<&[u8]> = transmit.contents.chunks(seg_size).collect();
        let mut first_error = None;
        for batch in segments.chunks(per_batch) {
            let sent = RELAY_BUF.with_borrow_mut(|out| {
                out.clear();
                for seg in batch {
                    out.extend_from_slice(&header);
                    out.extend_from_slice(seg);
                }
                self.send_raw(
                    path.relay_addr,
                    out,
                    (batch.len() > 1).then_some(seg_size + RELAY_HEADER_LEN),
                )
            });
            match sent {
                Ok(()) => {
                    self.paths
                        .stats
                        .client_sent
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                    break;
                }
            }
        }
        match first_error {
            // Nothing went out: let quinn wait for the socket and retry.
            Some(e) if segments.len() <= per_batch => Err(e),
            // Part went out: the rest is lost, as on any lossy path.
            _ => Ok(()),
        }
    }
}

impl AsyncUdpSocket for DemuxSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        if is_link(&transmit.destination) {
            return self.send_raw(
                transmit.destination,
                transmit.contents,
                transmit.segment_size,
            );
        }
        if is_virtual(&transmit.destination) {
            return self.send_relayed(transmit);
        }
        self.contacted.note(transmit.destination.ip());
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        // Datagrams that came over TCP links, every other call first (so
        // neither path can starve the other); they go through the same
        // sorting as UDP ones.
        let links_first = !self.links_turn.fetch_xor(true, Ordering::Relaxed);
        let injected = if links_first {
            self.links.poll_injected(cx, bufs, meta)
        } else {
            0
        };
        if injected == bufs.len().min(meta.len()) {
            // More may be queued, and no waker is registered for it.
            cx.waker().wake_by_ref();
        }
        if injected > 0 {
            let kept = self.keep_quic(bufs, meta, injected);
            if kept > 0 {
                return Poll::Ready(Ok(kept));
            }
        }
        for _ in 0..MAX_NON_QUIC_BATCHES_PER_POLL {
            let n = match self.inner.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(n)) => n,
                Poll::Pending if !links_first => {
                    // UDP had nothing: now the links.
                    let injected = self.links.poll_injected(cx, bufs, meta);
                    if injected == bufs.len().min(meta.len()) {
                        cx.waker().wake_by_ref();
                    }
                    let kept = self.keep_quic(bufs, meta, injected);
                    if kept > 0 {
                        return Poll::Ready(Ok(kept));
                    }
                    return Poll::Pending;
                }
                other => return other,
            };
            let kept = self.keep_quic(bufs, meta, n);
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

/// Opens `count` extra UDP sockets bound to `addr`, blocking (it runs on a
/// blocking thread): the birthday technique's many mappings, and the port
/// mapper's sockets.
/// Returns as many as it could open (an error only if none). The default
/// binds in this process's network namespace; the lab binds inside a
/// node's namespace.
pub type UdpBinder = std::sync::Arc<
    dyn Fn(SocketAddr, usize) -> std::io::Result<Vec<std::net::UdpSocket>> + Send + Sync,
>;

/// The default [`UdpBinder`].
pub fn bind_here(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::UdpSocket>> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        match std::net::UdpSocket::bind(addr) {
            Ok(s) => out.push(s),
            Err(e) if out.is_empty() => return Err(e),
            Err(_) => break,
        }
    }
    Ok(out)
}
