//! The node's core: what every capability may hold a handle to.
//!
//! The core is identity, the endpoint on its one socket, the task set, the
//! event bus, the protocol router and the node's own counters. It knows no
//! capability: the DHT, the relay, hole punching, NAT discovery and
//! messaging each hold an `Arc<Core>` next to their own state, and the
//! composition root (`node::Inner`) holds them all.

use std::net::SocketAddr;
use std::sync::Arc;

use reach_proto::{Keypair, PeerId};
use tokio::sync::watch;

use super::{bus, router, stats, tasks};
use crate::socket::{DemuxCounters, DemuxSocket};

/// Identity, endpoint, tasks, bus and router: see the module docs.
pub(crate) struct Core {
    pub keypair: Keypair,
    pub peer_id: PeerId,
    /// TLS configs and handshake counters, built once.
    pub tls: crate::handshake::NodeTls,
    pub endpoint: quinn::Endpoint,
    pub socket: Arc<DemuxSocket>,
    pub local_addr: SocketAddr,
    /// TCP links (QUIC over TCP where UDP is blocked) on the same socket.
    pub links: Arc<crate::tcp::TcpLinks>,
    /// Whether dials go over TCP links (UDP is blocked here).
    pub tcp: crate::tcp::TcpMode,
    /// The node's own counters (connections, messages, streams).
    pub counters: stats::Counters,
    pub demux_stats: Arc<DemuxCounters>,
    /// Facts for whoever subscribed (see [`bus`]).
    pub bus: bus::Bus,
    /// Which handler serves a stream, by protocol.
    pub router: Arc<router::Router>,
    /// Every task the node runs; see [`tasks`] for how they stop.
    pub tasks: tasks::TaskSet,
    /// Set (to `true`) once the node starts stopping.
    pub shutdown_tx: watch::Sender<bool>,
    /// How far stopping got (see [`Stopping`]).
    pub closed: watch::Sender<Stopping>,
}

/// How far a node got in stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Stopping {
    #[default]
    Running,
    /// Closing: saving state, closing the endpoint.
    Closing,
    /// Closed: every later `shutdown` returns at once.
    Closed,
}

impl Core {
    /// Whether the node has started to stop.
    pub(crate) fn is_shut_down(&self) -> bool {
        *self.shutdown_tx.borrow()
    }

    /// Starts closing; `true` for the first caller only (who saves what
    /// must outlive the node).
    pub(crate) fn begin_close(&self) -> bool {
        self.closed.send_if_modified(|s| {
            let first = *s == Stopping::Running;
            if first {
                *s = Stopping::Closing;
            }
            first
        })
    }

    /// Marks the node closed, waking [`Core::wait_closed`].
    pub(crate) fn finish_close(&self) {
        self.closed.send_replace(Stopping::Closed);
    }

    /// Waits until the node is closed.
    pub(crate) async fn wait_closed(&self) {
        let mut closed = self.closed.subscribe();
        let _ = closed.wait_for(|s| *s == Stopping::Closed).await;
    }

    /// Runs a service task (see [`tasks::TaskSet::spawn`]).
    pub(crate) fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(fut);
    }

    /// The network address a peer's packets really come from: `addr`
    /// itself for a direct path, the TCP peer's address for a TCP link, and
    /// `None` for a relayed circuit (bounded at the relay, per peer). Limits
    /// per IP and per network count sources by this.
    pub(crate) fn real_source(&self, addr: SocketAddr) -> Option<SocketAddr> {
        if !crate::vaddr::is_virtual(&addr) {
            return Some(addr);
        }
        self.links.remote(&addr)
    }

    /// Whether every dial goes over a TCP link (UDP is blocked).
    pub(crate) fn tcp_mode(&self) -> bool {
        self.tcp.active()
    }

    /// The address to hand quinn for dialing `addr`: `addr` itself, or in
    /// TCP mode the link to it (opened if needed).
    pub(crate) async fn dial_addr(&self, addr: SocketAddr) -> crate::error::Result<SocketAddr> {
        if !self.tcp_mode() || crate::vaddr::is_virtual(&addr) {
            return Ok(addr);
        }
        self.links
            .connect(addr)
            .await
            .map_err(|e| crate::error::Error::Io {
                context: "opening a TCP link",
                path: std::path::PathBuf::from(addr.to_string()),
                source: e,
            })
    }

    /// The addresses peers can dial, see [`crate::Node::local_addrs`].
    pub(crate) fn local_addrs(&self) -> Vec<SocketAddr> {
        let bound = self.local_addr;
        if !bound.ip().is_unspecified() {
            return vec![bound];
        }
        let mut out: Vec<SocketAddr> = if_addrs::get_if_addrs()
            .unwrap_or_default()
            .into_iter()
            .map(|i| i.ip())
            .filter(|ip| ip.is_ipv4() == bound.is_ipv4() || bound.is_ipv6())
            .map(|ip| SocketAddr::new(ip, bound.port()))
            .collect();
        out.sort();
        out.dedup();
        out
    }
}
