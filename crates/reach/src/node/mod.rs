//! The [`Node`]: a reach peer running on one UDP socket.
//!
//! ```no_run
//! # async fn demo() -> reach::Result<()> {
//! use reach::{Event, Node};
//!
//! let alice = Node::builder().bind("127.0.0.1:0".parse().unwrap()).spawn().await?;
//! let bob = Node::builder().bind("127.0.0.1:0".parse().unwrap()).spawn().await?;
//!
//! // Dial Bob by his key at an address; the handshake proves it is him.
//! alice.connect(bob.peer_id(), [bob.local_addr()]).await?;
//! alice.send(bob.peer_id(), b"hello bob".to_vec()).await?;
//!
//! if let Some(Event::Message { from, data }) = bob.next_event().await {
//!     assert_eq!(from, alice.peer_id());
//!     assert_eq!(&data[..], b"hello bob");
//! }
//! alice.shutdown().await;
//! bob.shutdown().await;
//! # Ok(()) }
//! ```

mod builder;
pub mod bus;
pub mod codes;
pub(crate) mod core;
pub mod limits;
pub(crate) mod router;
pub(crate) mod rpc;
pub(crate) mod stats;
pub(crate) mod tasks;
mod wiring;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reach_proto::PeerId;
use reach_proto::wire::envelope::{Body, Envelope};
use serde::Serialize;

pub use crate::messaging::{EVENT_QUEUE, MAX_QUEUED_CONNECTION_EVENTS, MAX_QUEUED_MESSAGE_BYTES};
pub use builder::NodeBuilder;
pub use bus::{NodeEvent, NodeEvents};
pub use limits::ConnectionLimits;
pub use router::{PROTOCOL_BACKLOG, ProtocolListener};
pub use stats::NodeStats;

use crate::dht::Dht;
use crate::dht::join::JoinReport;
use crate::error::{Error, Result};
use crate::events::{Event, Stream};
use reach_proto::dht::record::TypedAddr;

/// How long `shutdown` waits for peers to acknowledge the close.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A connected peer, as reported by [`Node::connected_peers`].
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PeerInfo {
    pub peer: PeerId,
    pub addr: SocketAddr,
    pub rtt_ms: u64,
    pub direction: Direction,
    /// The relay the connection goes through (`addr` is then the relay's
    /// address); `None` for a direct connection.
    pub relay: Option<PeerId>,
    /// For a direct connection that replaced a relayed one (a punch): the
    /// relay of the relayed connection kept open behind it, which takes
    /// over if the direct path dies.
    pub standby_relay: Option<PeerId>,
    /// The key-exchange group the connection's handshake negotiated, e.g.
    /// `X25519MLKEM768` (post-quantum hybrid) or `X25519`.
    pub kx_group: Option<String>,
}

/// Who opened a connection.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

/// A running reach node. Cheap to clone; all clones share the node. The node
/// stops on [`Node::shutdown`] or when the last clone is dropped.
#[derive(Clone)]
pub struct Node {
    pub(crate) inner: Arc<Inner>,
    _guard: Arc<DropGuard>,
}

pub(crate) struct Inner {
    /// Identity, endpoint, tasks, bus, router (see [`core`]).
    pub core: Arc<core::Core>,
    /// Known peers, their connections, dialing (see [`crate::peers`]).
    pub peers: Arc<crate::peers::Peers>,
    /// Messages: the app's queue, the receive budget, the dedup window.
    pub messaging: Arc<crate::messaging::Messaging>,
    /// Durable messages: the outbox and its delivery (see [`crate::outbox`]).
    pub durable: Arc<crate::outbox::delivery::Durable>,
    pub topics: Arc<crate::topics::Topics>,
    /// The endpoint record's owner (see [`crate::advertise`]).
    pub advertiser: Arc<crate::advertise::Advertiser>,
    pub dht: Arc<Dht>,
    /// What the node knows about the NAT in front of it (see [`crate::nat`]).
    pub nat: Arc<crate::nat::Nat>,
    /// Port mapping on the router in front (see [`crate::portmap`]).
    pub portmap: Arc<crate::portmap::PortMap>,
    pub relay: Arc<crate::relay::RelayRuntime>,
    pub punch: Arc<crate::punch::PunchRuntime>,
    /// The exclusive lock on the data dir, if the node has one; released at
    /// shutdown, after the peer cache is saved and closed.
    pub dir_lock: std::sync::Mutex<Option<crate::datadir::DataDirLock>>,
}

impl std::ops::Deref for Inner {
    type Target = core::Core;
    fn deref(&self) -> &core::Core {
        &self.core
    }
}

/// Signals shutdown when the last `Node` clone goes away.
struct DropGuard(Arc<Inner>);

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.0.begin_shutdown();
    }
}

impl Inner {
    /// Stops the node at once: tasks are aborted where they stand. What
    /// the last dropped `Node` handle does (nobody is left to wait).
    fn begin_shutdown(&self) {
        self.tasks.abort();
        self.close();
    }

    /// Stops the node gracefully: services stop, flushing tasks get
    /// [`tasks::SHUTDOWN_FLUSH_DEADLINE`] to finish, then the rest is
    /// aborted and the endpoint closed.
    async fn graceful_shutdown(&self) {
        if self.is_shut_down() {
            // Someone else is stopping it: done when they are.
            self.wait_closed().await;
            return;
        }
        self.shutdown_tx.send_replace(true);
        let report = self.tasks.stop(tasks::SHUTDOWN_FLUSH_DEADLINE).await;
        if !report.flushed {
            tracing::warn!("shutdown: tasks still flushing at the deadline were aborted");
        }
        if !report.dropped {
            tracing::warn!(
                "shutdown: tasks still running after their abort; the data dir may stay busy until they end"
            );
        }
        self.close();
    }

    /// Saves what must outlive the node and closes the endpoint, the
    /// punch sockets and the data dir. Idempotent.
    fn close(&self) {
        if self.begin_close() {
            self.dht.save_peer_cache();
        }
        if let Some(cache) = &self.dht.cache {
            cache.close();
        }
        self.durable.close();
        self.shutdown_tx.send_replace(true);
        self.endpoint.close(0u32.into(), b"shutdown");
        self.punch.close_endpoints();
        if let Ok(mut lock) = self.dir_lock.lock() {
            lock.take();
        }
        self.finish_close();
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("peer_id", &self.inner.peer_id)
            .field("local_addr", &self.inner.local_addr)
            .finish()
    }
}

impl Node {
    /// Starts configuring a node.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    /// This node's address: its public key.
    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    /// The address the node's UDP socket is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Addresses peers on this machine's networks can dial: the bound address,
    /// or, when bound to an unspecified address (`0.0.0.0` / `[::]`), one per
    /// local interface address of the matching family.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.inner.local_addrs()
    }

    /// Connects to `peer` at one of `addrs` (tried in parallel; the first
    /// authenticated handshake wins) unless a live connection exists.
    /// `addrs` apply to this call only: the one that produced the
    /// authenticated connection is remembered, so later `send`s redial on
    /// their own; one that failed is forgotten, never tried again by a later
    /// call. With no addresses (or none that works) the peer's endpoint
    /// record is looked up in the DHT: dialing by key alone.
    ///
    /// Fails with [`Error::PeerIdMismatch`] when the remote proves a different
    /// key than `peer`.
    pub async fn connect(
        &self,
        peer: PeerId,
        addrs: impl IntoIterator<Item = SocketAddr>,
    ) -> Result<()> {
        let hint: Vec<SocketAddr> = addrs.into_iter().collect();
        self.inner
            .peers
            .connection_via(peer, &hint)
            .await
            .map(|_| ())
    }

    /// Sends one whole message reliably. Returns once the peer's QUIC stack
    /// has acknowledged every byte of it.
    ///
    /// Dials the peer first when there is no live connection but addresses
    /// are known. Messages larger than [`crate::MAX_MESSAGE_LEN`] fail with
    /// [`Error::MessageTooLarge`]: use a stream for bulk data.
    ///
    /// Each message travels on a stream of its own and is delivered once,
    /// but two messages (even sent one after the other) may reach the
    /// peer's application in either order: when order matters, use one
    /// stream ([`Node::open_stream`]) or number the messages.
    pub async fn send(&self, peer: PeerId, data: impl Into<Bytes>) -> Result<()> {
        self.inner.messaging.send(peer, data.into()).await
    }

    /// Sends `data` to `peer` durably: returns the message's id once it is
    /// committed to the outbox on disk (kill -9 after that loses nothing),
    /// then delivers it whenever `peer` is reachable, each message once and
    /// in the order sent, until the peer acknowledges it
    /// ([`NodeEvent::OutboxDelivered`]) or it is given up
    /// ([`NodeEvent::OutboxAbandoned`]): a [`Delivery::Moderate`] message
    /// after its attempts, any message after its `ttl`. The peer receives
    /// it as [`Event::Durable`].
    ///
    /// Needs a data dir ([`Error::NoDataDir`]); messages are at most
    /// [`crate::outbox::MAX_DURABLE_MESSAGE_LEN`] bytes; the outbox's
    /// quotas refuse with [`Error::OutboxFull`].
    ///
    /// [`Delivery::Moderate`]: reach_proto::outbox::Delivery::Moderate
    pub async fn send_durable(
        &self,
        peer: PeerId,
        data: impl Into<Vec<u8>>,
        delivery: reach_proto::outbox::Delivery,
        ttl: Option<std::time::Duration>,
    ) -> Result<crate::outbox::MessageId> {
        self.inner
            .durable
            .send(peer, data.into(), delivery, ttl)
            .await
    }

    /// The durable messages waiting for their receivers' acks.
    pub fn outbox(&self) -> Vec<crate::outbox::PendingInfo> {
        self.inner.durable.pending()
    }

    /// Gives up durable message `id`; `false` if it was no longer pending
    /// (delivered, abandoned or unknown).
    pub async fn cancel_durable(&self, id: crate::outbox::MessageId) -> Result<bool> {
        self.inner.durable.cancel(id).await
    }

    /// The application has taken care of `msg`: it is deleted, and not
    /// handed over again after a restart.
    pub async fn durable_done(&self, msg: &crate::events::DurableMessage) -> Result<()> {
        self.inner.durable.done(msg.inbox).await.map(|_| ())
    }

    /// Opens a bidirectional stream to `peer` (dialing if needed). The peer
    /// receives it as [`Event::Stream`].
    pub async fn open_stream(&self, peer: PeerId) -> Result<Stream> {
        let conn = self.inner.peers.connection(peer).await?;
        let lost = |e: &dyn std::fmt::Display| Error::ConnectionLost {
            peer,
            reason: e.to_string(),
        };
        let (mut send, recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
        let header = Envelope::new(Body::OpenStream).to_frame()?;
        send.write_all(&header).await.map_err(|e| lost(&e))?;
        stats::bump(&self.inner.counters.streams_opened);
        Ok(Stream { peer, send, recv })
    }

    /// Registers an application protocol on this node: streams peers open
    /// with [`Node::open_protocol`] for `protocol` arrive at the returned
    /// listener. Several applications can share a node, each with its own
    /// protocols. Names are printable ASCII without spaces, at most
    /// [`reach_proto::wire::envelope::MAX_PROTOCOL_NAME_LEN`] bytes, e.g.
    /// `myapp/chat/1` (the `reach/` prefix is reserved). Dropping the
    /// listener unregisters the protocol.
    ///
    /// Fails with [`Error::ProtocolInUse`] while another listener holds the
    /// name, and [`Error::InvalidProtocolName`] for a bad name.
    pub fn accept_protocol(&self, protocol: &str) -> Result<ProtocolListener> {
        self.inner.router.register_app(protocol)
    }

    /// Opens a bidirectional stream of `protocol` to `peer` (dialing if
    /// needed) and waits until the peer's listener for it took the stream.
    ///
    /// Fails with [`Error::ProtocolNotSupported`] when the peer serves no
    /// such protocol (or runs a reach version without protocol routing);
    /// the connection stays up either way.
    pub async fn open_protocol(&self, peer: PeerId, protocol: &str) -> Result<Stream> {
        reach_proto::wire::envelope::check_protocol_name(protocol).map_err(|reason| {
            Error::InvalidProtocolName {
                name: protocol.to_string(),
                reason,
            }
        })?;
        let conn = self.inner.peers.connection(peer).await?;
        let stream = router::open(&conn, peer, protocol).await?;
        self.inner.peers.touch(&peer, true);
        stats::bump(&self.inner.counters.streams_opened);
        Ok(stream)
    }

    /// Waits for the next message or stream from any peer. Returns `None`
    /// once the node has shut down. Several tasks may wait at once; each
    /// event goes to one of them.
    pub async fn next_event(&self) -> Option<Event> {
        let mut shutdown = self.inner.shutdown_tx.subscribe();
        tokio::select! {
            ev = self.inner.messaging.next_event() => ev,
            _ = shutdown.wait_for(|s| *s) => None,
        }
    }

    /// Subscribes to the node's own events: connections and paths, external
    /// addresses, reachability, the held relay, record publication. Each
    /// subscription sees every event from now on (a subscriber that falls
    /// far behind skips the oldest; see [`NodeEvents::missed`]).
    pub fn subscribe(&self) -> NodeEvents {
        self.inner.bus.subscribe()
    }

    /// The node's post-quantum key-exchange mode.
    pub fn post_quantum(&self) -> crate::handshake::PostQuantum {
        self.inner.tls.pq()
    }

    /// Peers with a live connection.
    pub fn connected_peers(&self) -> Vec<PeerInfo> {
        let mut peers = self.inner.peers.connected();
        for p in &mut peers {
            p.standby_relay = self
                .inner
                .peers
                .standby(&p.peer)
                .and_then(|s| self.inner.relay.paths.path(&s.remote_address()))
                .map(|path| path.relay);
            if let Some(path) = self.inner.relay.paths.path(&p.addr) {
                p.addr = self
                    .inner
                    .links
                    .remote(&path.relay_addr)
                    .unwrap_or(path.relay_addr);
                p.relay = Some(path.relay);
            } else if let Some(remote) = self.inner.core.links.remote(&p.addr) {
                p.addr = remote;
            }
        }
        peers
    }

    /// Closes the connection to `peer`, if any (the peer sees it closed).
    /// The next `send` or `connect` dials again. A connection that carries
    /// a relay reservation (ours at `peer`, or `peer`'s here) stays open:
    /// the node itself needs it.
    pub fn disconnect(&self, peer: PeerId) {
        let carries_reservation = self.inner.relay.held().is_some_and(|(r, _)| r == peer)
            || self.inner.relay.paths.has_reservation(&peer);
        if carries_reservation {
            return;
        }
        for conn in self.inner.peers.take_all(&peer) {
            conn.close(0u32.into(), b"disconnect");
        }
    }

    /// A ticket for this node: its peer id and the addresses its endpoint
    /// record would carry now (its relay first, if it holds one). Share it
    /// out of band; [`Node::connect_ticket`] dials it without the DHT.
    pub fn ticket(&self) -> reach_proto::Ticket {
        reach_proto::Ticket::new(self.inner.peer_id, self.inner.advertiser.addresses())
    }

    /// Connects to the node a ticket names: at its direct addresses, then
    /// through the relays it lists, then by its key through the DHT.
    /// Returns the last error when nothing worked.
    pub async fn connect_ticket(&self, ticket: &reach_proto::Ticket) -> Result<()> {
        use reach_proto::dht::record::AddrKind;
        let peer = ticket.peer;
        let direct: Vec<SocketAddr> = ticket
            .addrs
            .iter()
            .filter(|a| a.kind != AddrKind::Relay)
            .map(|a| a.addr)
            .collect();
        let mut last = None;
        let tried_dht = !direct.is_empty();
        if tried_dht {
            match self.connect(peer, direct).await {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        for a in ticket.addrs.iter().filter(|a| a.kind == AddrKind::Relay) {
            if let Some(relay) = a.via {
                match self.connect_via_relay(peer, relay, a.addr).await {
                    Ok(()) => return Ok(()),
                    Err(e) => last = Some(e),
                }
            }
        }
        match last {
            // A direct dial that failed already looked the peer up in the DHT.
            Some(e) if tried_dht => Err(e),
            _ => self.connect(peer, []).await,
        }
    }

    /// Connects to `peer` through `relay` (at `relay_addr`), even if a
    /// direct path exists, unless a live connection exists already. For
    /// tests and measurements; `connect` picks relays by itself.
    pub async fn connect_via_relay(
        &self,
        peer: PeerId,
        relay: PeerId,
        relay_addr: SocketAddr,
    ) -> Result<()> {
        if self.inner.peers.live(&peer).is_some() {
            return Ok(());
        }
        let conn = self.inner.relay.dial_via(relay, relay_addr, peer).await?;
        stats::bump(&self.inner.counters.connections_outbound);
        self.inner.peers.register(peer, conn, Direction::Outbound);
        Ok(())
    }

    /// The relay side of this node: whether it serves as a relay, which
    /// relay it holds, its reservations and circuits.
    pub fn relay_status(&self) -> crate::relay::RelayStatus {
        let r = &self.inner.relay;
        let held = r.held();
        crate::relay::RelayStatus {
            service: r.service,
            acquire: r.acquire,
            serving: r.is_serving(),
            reachability: r.reachability(),
            held_relay: held.map(|(p, _)| p),
            held_relay_addr: held.map(|(_, a)| a),
            reservations: self.inner.relay.paths.reservation_count(),
            circuits: self.inner.relay.paths.circuits(),
            relayed_connections: self
                .inner
                .peers
                .connected()
                .iter()
                .filter(|p| crate::vaddr::class_of(&p.addr) == crate::vaddr::AddrClass::Relayed)
                .count(),
        }
    }

    /// Hole punching so far: attempts, successes and failures per
    /// technique, fallbacks to the relay, time to direct, and the latest
    /// outcome per peer.
    pub fn punch_stats(&self) -> crate::punch::PunchStats {
        self.inner.punch.stats()
    }

    /// Waits up to `timeout` until the connection to `peer` is direct (a
    /// relayed connection upgrades by itself when a punch succeeds).
    /// Returns whether it is.
    pub async fn wait_direct(&self, peer: PeerId, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        self.inner.punch.wait_direct(&peer, deadline).await
    }

    /// Asks the node at `addr` which address it sees this node's packets come
    /// from, over the shared UDP socket (no QUIC involved).
    pub async fn observed_addr(&self, addr: SocketAddr) -> Result<SocketAddr> {
        self.inner.nat.probe(addr).await
    }

    /// Classifies the NAT in front of this node with the help of reach
    /// nodes at `helpers` (at least two distinct IPs for the mapping test;
    /// the first helper also runs the filtering tests and needs a peer at a
    /// third IP for the endpoint-independent-filtering test).
    pub async fn nat_report_with(&self, helpers: &[SocketAddr]) -> crate::nat::NatReport {
        let mut report = self.inner.nat.report_with(helpers).await;
        report.port_mapping = Some(self.inner.portmap.status());
        report
    }

    /// Classifies the NAT with connected peers as helpers.
    pub async fn nat_report(&self) -> crate::nat::NatReport {
        let helpers: Vec<SocketAddr> = self
            .connected_peers()
            .iter()
            .filter(|p| p.relay.is_none())
            .map(|p| p.addr)
            .collect();
        self.nat_report_with(&helpers).await
    }

    /// Asks a STUN server (RFC 8489 Binding) for our reflexive address,
    /// over the node's own socket.
    pub async fn stun(&self, server: SocketAddr) -> Result<SocketAddr> {
        self.inner.nat.stun_binding(server).await
    }

    /// Our external addresses as peers have reported them so far.
    pub fn external_addrs(&self) -> Vec<reach_proto::nat::observed::ScoredAddr> {
        self.inner.nat.scored()
    }

    /// Looks up `peer`'s endpoint record in the DHT and returns its
    /// addresses (without connecting): the newest record the closest nodes
    /// hold, even if this node stores an older copy. Fails with
    /// [`Error::NotFound`] when no node holds a valid record.
    pub async fn lookup(&self, peer: PeerId) -> Result<Vec<TypedAddr>> {
        let (_, addrs) = self.inner.dht.resolve_fresh(peer).await?;
        Ok(addrs)
    }

    /// Joins the DHT through `addrs` (bare `ip:port`: identities are learned
    /// in the handshake), fills the routing table and publishes this node's
    /// endpoint record.
    pub async fn bootstrap(&self, addrs: &[SocketAddr]) -> JoinReport {
        self.inner.dht.join(addrs).await
    }

    /// Waits until the node has joined the DHT (started by `spawn`): some
    /// peer answered (or no bootstrap peers were given: the first node of a
    /// network) and the endpoint record was published. A join nobody
    /// answers is retried with backoff; bound this wait with a timeout.
    pub async fn joined(&self) {
        let mut rx = self.inner.dht.joined.subscribe();
        let _ = rx.wait_for(|j| *j).await;
    }

    /// The DHT routing table, for status pages.
    pub fn routing_snapshot(&self) -> crate::dht::RoutingSnapshot {
        crate::dht::RoutingSnapshot::of(&self.inner.dht)
    }

    /// The DHT record store, for status pages.
    pub fn store_snapshot(&self) -> crate::dht::StoreSnapshot {
        crate::dht::StoreSnapshot::of(&self.inner.dht)
    }

    /// The records of `kind` this node's DHT store holds for others, whole
    /// (what a storer sees: the mailbox tests check that it reveals no
    /// payload and no peer id).
    pub fn stored_records(
        &self,
        kind: reach_proto::dht::record::RecordKind,
    ) -> Vec<reach_proto::dht::record::SignedRecord> {
        let now = crate::dht::unix_ms();
        self.inner
            .dht
            .store()
            .iter()
            .filter(|r| r.kind == kind && r.expires_ms() > now)
            .cloned()
            .collect()
    }

    /// What port mapping did: the router's protocol, the mapped and the
    /// published address, the lease, renewals (see [`crate::portmap`]).
    pub fn port_mapping(&self) -> crate::portmap::PortMapStatus {
        self.inner.portmap.status()
    }

    /// Counters since the node started.
    pub fn stats(&self) -> NodeStats {
        let mut core = self.inner.counters.snapshot();
        core.peers_evicted = self.inner.peers.evicted();
        core.connection_events_dropped = self.inner.messaging.dropped_connection_events();
        core.peer_table_size = self.inner.peers.len() as u64;
        core.inbound_connections = self.inner.peers.gate.inbound() as u64;
        NodeStats {
            core,
            datagrams: self.inner.demux_stats.snapshot(),
            dht: self.inner.dht.stats(),
            relay: self.inner.relay.counters.snapshot(),
            relay_paths: self.inner.relay.paths.stats.snapshot(),
            handshakes: self.inner.tls.stats().snapshot(),
            tcp: self.inner.core.links.stats.snapshot(),
            portmap: self.inner.portmap.stats(),
            outbox: self.inner.durable.stats(),
            topics: self.inner.topics.stats(),
        }
    }

    /// Saves the routing table to the peer cache now (the node also saves it
    /// after joining, every maintenance tick and at shutdown). `Ok` without
    /// doing anything for a node without a data dir.
    pub fn save_peer_cache(&self) -> Result<()> {
        let Some(cache) = &self.inner.dht.cache else {
            return Ok(());
        };
        let contacts: Vec<reach_proto::dht::Contact> =
            self.inner.dht.routing().iter().map(|e| e.contact).collect();
        cache.save(&contacts)
    }

    /// Closes every connection, tells peers, and stops the node's tasks.
    /// Waits up to [`SHUTDOWN_GRACE`] for peers to acknowledge. Releases the
    /// data dir (see [`crate::datadir`]).
    pub async fn shutdown(&self) {
        self.inner.graceful_shutdown().await;
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.inner.endpoint.wait_idle()).await;
    }
}

impl Node {
    /// Subscribes to the topic `name`: messages (each once, in order per
    /// publisher) and presence changes come from the [`Subscription`];
    /// dropping it unsubscribes. The node's home serves it: the node itself
    /// when it holds no relay, else its relay (the subscription moves with
    /// the relay). (`subscribe` is the node's event bus.)
    ///
    /// [`Subscription`]: crate::topics::Subscription
    pub fn subscribe_topic(&self, name: &str) -> Result<crate::topics::Subscription> {
        self.inner.topics.subscribe(name)
    }

    /// Publishes `data` on the topic `name` (this node must be subscribed
    /// to it): a report of the homes and members the node's home knows, or
    /// a typed refusal ([`Error::Topic`]: rate limits, size, no home yet).
    pub async fn publish(
        &self,
        name: &str,
        data: impl Into<Vec<u8>>,
    ) -> Result<crate::topics::PublishReport> {
        self.inner.topics.publish(name, data.into()).await
    }

    /// Members of the topic `name` known here: (member, its home).
    pub fn members(&self, name: &str) -> Result<Vec<(PeerId, PeerId)>> {
        self.inner.topics.members(name)
    }

    /// This node's topics: its home, subscriptions, served topics, links.
    pub fn topics_status(&self) -> crate::topics::TopicsStatus {
        self.inner.topics.status()
    }

    /// The path kind of each live connection (direct, relayed, TCP link),
    /// as [`Event::Connected`] reports it; a peer whose relayed circuit is
    /// already gone is left out.
    pub fn peer_paths(&self) -> Vec<(PeerId, crate::events::PathKind)> {
        self.inner
            .peers
            .connected()
            .into_iter()
            .filter_map(|p| Some((p.peer, self.inner.peers.path_kind(&p.addr)?)))
            .collect()
    }
}
