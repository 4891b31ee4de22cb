//! TCP links: the way out for a node whose network blocks UDP entirely.
//!
//! A link is a TLS 1.3 connection over TCP (the node's own Ed25519
//! certificate, like its QUIC connections: to a middlebox it looks like
//! HTTPS) that carries the node's datagrams (QUIC packets, relay frames),
//! each prefixed by its 2-byte length, after a short magic preamble. The socket treats a link as one more path: quinn sees the
//! far end at a *link address* (240.0.0.0/4, port 2, never routable), so the
//! QUIC connection over it is the ordinary end-to-end encrypted one, and
//! relayed circuits work over it unchanged. Every node listens for links on
//! its UDP port number; a node that cannot reach anyone over UDP dials its
//! peers (in practice: its bootstrap nodes and its relay) over TCP instead.
//!
//! TCP brings head-of-line blocking: it is the fallback, never the default.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use quinn::udp::RecvMeta;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::vaddr::{AddrClass, VirtualAddrs};

/// The preamble a link starts with inside the TLS (both directions): name
/// and version.
pub const LINK_MAGIC: [u8; 8] = *b"REACHTC1";
/// Largest datagram a link carries: QUIC packets (≤ 1,452 bytes after MTU
/// discovery) plus a relay header, with room to spare. A larger length
/// prefix closes the link (nothing reach sends is that big).
pub const MAX_LINK_DATAGRAM: usize = 2048;
/// A link that delivers nothing for this long is closed (QUIC keep-alives
/// every 15 s keep a used link busy).
pub const LINK_IDLE: Duration = Duration::from_secs(120);
/// Links from one IP address at most.
pub const MAX_LINKS_PER_IP: usize = 16;
/// Link handshakes (TLS and preamble) in progress at once at most.
pub const MAX_PENDING_HANDSHAKES: usize = 64;
/// Pause after a failed `accept` (e.g. out of file descriptors), so the
/// loop does not spin.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Datagrams queued per link for sending; beyond that they are dropped, as
/// a full UDP socket buffer would (QUIC recovers).
pub const LINK_QUEUE: usize = 2048;
/// Datagrams received over all links waiting for the socket.
pub const INJECT_QUEUE: usize = 4096;
/// Links a node keeps at most (inbound and outbound).
pub const MAX_LINKS: usize = 1024;
/// Time to open a link (TCP handshake and preamble).
pub const LINK_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `addr` is a link address (either family's form; see
/// `crate::vaddr`).
pub fn is_link(addr: &SocketAddr) -> bool {
    crate::vaddr::class_of(addr) == AddrClass::Link
}

/// Opens a TCP connection to an address, blocking (it runs on a blocking
/// thread). For sockets that must be created elsewhere, e.g. inside another
/// network namespace.
pub type Connector = Arc<dyn Fn(SocketAddr) -> io::Result<std::net::TcpStream> + Send + Sync>;

struct Link {
    tx: mpsc::Sender<Bytes>,
    /// The TCP peer's real address.
    remote: SocketAddr,
    /// We dialed it (its `remote` is a peer's published address).
    outbound: bool,
}

crate::telemetry::metrics! {
    /// Counters of the links.
    pub struct LinkCounters =>
    /// The TCP links' counters as [`NodeStats`](crate::NodeStats) shows them.
    pub struct LinkStats;
    atomic {
        /// TCP links this node opened.
        counter opened = "tcp_links_opened",
        /// TCP links peers opened and this node accepted.
        counter accepted = "tcp_links_accepted",
        /// Datagrams sent over TCP links.
        counter sent = "tcp_datagrams_sent",
        /// Datagrams received over TCP links.
        counter received = "tcp_datagrams_received",
        /// Datagrams too large or over a full link queue, and accepted TCP
        /// connections refused (handshakes crowded, or too many links from
        /// one IP), all dropped.
        counter dropped = "tcp_dropped",
    }
}

/// The TCP links of one node, shared with its socket.
pub struct TcpLinks {
    /// Link addresses.
    addrs: VirtualAddrs,
    links: Mutex<HashMap<u32, Link>>,
    inject_tx: mpsc::Sender<(SocketAddr, Bytes)>,
    inject_rx: Mutex<mpsc::Receiver<(SocketAddr, Bytes)>>,
    shutdown: watch::Receiver<bool>,
    connector: Option<Connector>,
    tls_client: TlsConnector,
    tls_server: TlsAcceptor,
    /// Links open now: the socket skips the link queue while there are none.
    open: std::sync::atomic::AtomicUsize,
    /// The socket's receiver while it skips the link queue, woken when the
    /// first link opens (else a node with no UDP traffic would never look
    /// at the link's first datagrams).
    first_link: futures::task::AtomicWaker,
    pub stats: LinkCounters,
}

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

impl TcpLinks {
    /// `tls`: the node's client and server TLS configs (any valid reach
    /// identity is accepted: the QUIC connection inside authenticates the
    /// peer that matters).
    pub fn new(
        v6: bool,
        shutdown: watch::Receiver<bool>,
        connector: Option<Connector>,
        tls: (Arc<rustls::ClientConfig>, Arc<rustls::ServerConfig>),
    ) -> Arc<Self> {
        let (inject_tx, inject_rx) = mpsc::channel(INJECT_QUEUE);
        Arc::new(TcpLinks {
            addrs: VirtualAddrs::new(AddrClass::Link, v6),
            links: Mutex::new(HashMap::new()),
            inject_tx,
            inject_rx: Mutex::new(inject_rx),
            shutdown,
            connector,
            tls_client: TlsConnector::from(tls.0),
            tls_server: TlsAcceptor::from(tls.1),
            open: std::sync::atomic::AtomicUsize::new(0),
            first_link: futures::task::AtomicWaker::new(),
            stats: LinkCounters::default(),
        })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Link>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn addr_of(&self, index: u32) -> SocketAddr {
        self.addrs.addr(index)
    }

    fn link_index(&self, addr: &SocketAddr) -> Option<u32> {
        self.addrs.index(addr)
    }

    /// Sends a datagram (or a GSO batch of `segment_size` segments) over
    /// the link at `dest`. `None` if `dest` is not a link address.
    pub fn send(
        &self,
        dest: &SocketAddr,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> Option<io::Result<()>> {
        let index = self.link_index(dest)?;
        let tx = self.map().get(&index).map(|l| l.tx.clone());
        let Some(tx) = tx else {
            // The link is gone: the datagram is lost, as on a dead path.
            return Some(Ok(()));
        };
        let seg = segment_size.unwrap_or(contents.len()).max(1);
        for d in contents.chunks(seg) {
            if d.len() > MAX_LINK_DATAGRAM || tx.try_send(Bytes::copy_from_slice(d)).is_err() {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            } else {
                self.stats.sent.fetch_add(1, Ordering::Relaxed);
            }
        }
        Some(Ok(()))
    }

    /// The real address behind a link we dialed (a peer's published
    /// address, usable as its contact address).
    pub fn dialed_remote(&self, addr: &SocketAddr) -> Option<SocketAddr> {
        let index = self.link_index(addr)?;
        self.map()
            .get(&index)
            .filter(|l| l.outbound)
            .map(|l| l.remote)
    }

    /// The TCP peer's address behind a link, either direction.
    pub fn remote(&self, addr: &SocketAddr) -> Option<SocketAddr> {
        let index = self.link_index(addr)?;
        self.map().get(&index).map(|l| l.remote)
    }

    /// Moves received link datagrams into quinn's buffers; returns how many.
    pub fn poll_injected(
        &self,
        cx: &mut Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> usize {
        if self.open.load(Ordering::Relaxed) == 0 {
            self.first_link.register(cx.waker());
            // A link that opened meanwhile wakes nobody: look again.
            if self.open.load(Ordering::SeqCst) == 0 {
                return 0;
            }
        }
        let Ok(mut rx) = self.inject_rx.try_lock() else {
            return 0;
        };
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let Poll::Ready(Some((addr, data))) = rx.poll_recv(cx) else {
                break;
            };
            let len = data.len().min(bufs[n].len());
            bufs[n][..len].copy_from_slice(&data[..len]);
            meta[n] = RecvMeta {
                addr,
                len,
                stride: len,
                ecn: None,
                dst_ip: None,
            };
            n += 1;
        }
        n
    }

    /// The link to `remote` (opening one if needed); returns its address.
    pub async fn connect(self: &Arc<Self>, remote: SocketAddr) -> io::Result<SocketAddr> {
        let existing = self
            .map()
            .iter()
            .find(|(_, l)| l.outbound && l.remote == remote && !l.tx.is_closed())
            .map(|(i, _)| *i);
        if let Some(i) = existing {
            return Ok(self.addr_of(i));
        }
        let connector = self.connector.clone();
        let tls = self.tls_client.clone();
        let open = async {
            let tcp = match connector {
                Some(c) => {
                    let std = tokio::task::spawn_blocking(move || c(remote))
                        .await
                        .map_err(io::Error::other)??;
                    std.set_nonblocking(true)?;
                    TcpStream::from_std(std)?
                }
                None => TcpStream::connect(remote).await?,
            };
            tcp.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::try_from(crate::tls::SERVER_NAME)
                .map_err(io::Error::other)?;
            let mut stream = tls.connect(name, tcp).await?;
            stream.write_all(&LINK_MAGIC).await?;
            stream.flush().await?;
            let mut magic = [0u8; LINK_MAGIC.len()];
            stream.read_exact(&mut magic).await?;
            if magic != LINK_MAGIC {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "not a reach TCP link",
                ));
            }
            let (r, w) = tokio::io::split(stream);
            io::Result::Ok((Box::new(r) as Reader, Box::new(w) as Writer))
        };
        let (r, w) = tokio::time::timeout(LINK_TIMEOUT, open)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TCP link timed out"))??;
        self.stats.opened.fetch_add(1, Ordering::Relaxed);
        self.start(r, w, remote, true)
    }

    /// Accepts links until the node stops.
    pub async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        let mut shutdown = self.shutdown.clone();
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            let Ok((tcp, remote)) = accepted else {
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            };
            let from_ip = self
                .map()
                .values()
                .filter(|l| l.remote.ip() == remote.ip() && !l.tx.is_closed())
                .count();
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if from_ip >= MAX_LINKS_PER_IP {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let links = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let greet = async {
                    tcp.set_nodelay(true)?;
                    let mut stream = links.tls_server.accept(tcp).await?;
                    let mut magic = [0u8; LINK_MAGIC.len()];
                    stream.read_exact(&mut magic).await?;
                    if magic != LINK_MAGIC {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "bad magic"));
                    }
                    stream.write_all(&LINK_MAGIC).await?;
                    stream.flush().await?;
                    let (r, w) = tokio::io::split(stream);
                    io::Result::Ok((Box::new(r) as Reader, Box::new(w) as Writer))
                };
                if let Ok(Ok((r, w))) = tokio::time::timeout(LINK_TIMEOUT, greet).await {
                    links.stats.accepted.fetch_add(1, Ordering::Relaxed);
                    let _ = links.start(r, w, remote, false);
                }
            });
        }
    }

    /// Registers a link and starts its reader and writer.
    fn start(
        self: &Arc<Self>,
        read: Reader,
        write: Writer,
        remote: SocketAddr,
        outbound: bool,
    ) -> io::Result<SocketAddr> {
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        let index = {
            let mut map = self.map();
            map.retain(|_, l| !l.tx.is_closed());
            if map.len() >= MAX_LINKS {
                return Err(io::Error::other("too many TCP links"));
            }
            let index = self.addrs.allocate();
            map.insert(
                index,
                Link {
                    tx,
                    remote,
                    outbound,
                },
            );
            index
        };
        let addr = self.addr_of(index);
        self.open.fetch_add(1, Ordering::SeqCst);
        self.first_link.wake();
        tokio::spawn(write_loop(write, rx, self.shutdown.clone()));
        tokio::spawn(read_loop(
            Arc::downgrade(self),
            read,
            addr,
            index,
            self.inject_tx.clone(),
            self.shutdown.clone(),
        ));
        Ok(addr)
    }
}

async fn write_loop(
    write: Writer,
    mut rx: mpsc::Receiver<Bytes>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut w = BufWriter::new(write);
    loop {
        let d = tokio::select! {
            d = rx.recv() => d,
            _ = shutdown.wait_for(|s| *s) => None,
        };
        let Some(d) = d else { break };
        let len = (d.len() as u16).to_be_bytes();
        if w.write_all(&len).await.is_err() || w.write_all(&d).await.is_err() {
            break;
        }
        // Batch what is queued, then flush.
        if rx.is_empty() && w.flush().await.is_err() {
            break;
        }
    }
    let _ = w.shutdown().await;
}

async fn read_loop(
    links: Weak<TcpLinks>,
    mut read: Reader,
    addr: SocketAddr,
    index: u32,
    inject: mpsc::Sender<(SocketAddr, Bytes)>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; MAX_LINK_DATAGRAM];
    loop {
        let frame = async {
            let mut len = [0u8; 2];
            read.read_exact(&mut len).await?;
            let len = usize::from(u16::from_be_bytes(len));
            if len > MAX_LINK_DATAGRAM {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "oversized datagram",
                ));
            }
            read.read_exact(&mut buf[..len]).await?;
            io::Result::Ok(len)
        };
        let len = tokio::select! {
            r = tokio::time::timeout(LINK_IDLE, frame) => match r {
                Ok(Ok(len)) => len,
                _ => break,
            },
            _ = shutdown.wait_for(|s| *s) => break,
        };
        if let Some(l) = links.upgrade() {
            l.stats.received.fetch_add(1, Ordering::Relaxed);
        }
        if inject
            .send((addr, Bytes::copy_from_slice(&buf[..len])))
            .await
            .is_err()
        {
            break;
        }
    }
    if let Some(l) = links.upgrade() {
        l.map().remove(&index);
        // Datagrams still queued are delivered once the socket polls the
        // links again; with no link left they wait for the next one.
        l.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether this node dials over TCP links instead of UDP: decided when it
/// joins (no bootstrap node answers over UDP, but one does over a link),
/// read by every dial.
pub(crate) struct TcpMode {
    active: std::sync::atomic::AtomicBool,
    /// The builder allows switching to links at all.
    fallback: bool,
}

impl TcpMode {
    pub(crate) fn new(fallback: bool) -> Self {
        TcpMode {
            active: std::sync::atomic::AtomicBool::new(false),
            fallback,
        }
    }

    /// Every dial goes over a TCP link (UDP is blocked).
    pub(crate) fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    pub(crate) fn set_active(&self, on: bool) {
        self.active.store(on, Ordering::Relaxed);
    }

    /// Whether the node may switch to links when UDP reaches nobody.
    pub(crate) fn fallback_allowed(&self) -> bool {
        self.fallback
    }
}
