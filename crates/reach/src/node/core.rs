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
}

impl Core {
    /// Whether the node has started to stop.
    pub(crate) fn is_shut_down(&self) -> bool {
        *self.shutdown_tx.borrow()
    }

    /// Runs a service task (see [`tasks::TaskSet::spawn`]).
    pub(crate) fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(fut);
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
