//! Configuring and starting a [`Node`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use quinn::{EndpointConfig, Runtime, TokioRuntime};
use reach_proto::Keypair;
use tokio::sync::watch;

use super::{DropGuard, Inner, Node};
use crate::dht::peer_cache::PeerCache;
use crate::dht::{Dht, DhtMode};
use crate::error::{Error, Result};
use crate::keystore;
use crate::relay::RelayRuntime;
use crate::relay::paths::RelayPaths;
use crate::socket::DemuxSocket;
use crate::tcp::TcpLinks;

/// The default bind address: every IPv4 interface, a port the OS picks.
pub const DEFAULT_BIND: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// Builder of a [`Node`]; see [`Node::builder`].
#[derive(Default)]
pub struct NodeBuilder {
    bind: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    keypair: Option<Keypair>,
    bootstrap: Vec<SocketAddr>,
    dht_mode: DhtMode,
    socket: Option<std::net::UdpSocket>,
    alt_socket: Option<std::net::UdpSocket>,
    no_stun_server: bool,
    relay_service: crate::relay::RelayMode,
    acquire_relay: crate::relay::RelayMode,
    relay_limits: Option<reach_proto::relay::service::RelayLimits>,
    tcp_listener: Option<std::net::TcpListener>,
    tcp_connector: Option<crate::tcp::Connector>,
    udp_binder: Option<crate::punch::UdpBinder>,
    no_tcp_fallback: bool,
    no_hole_punching: bool,
    post_quantum: crate::handshake::PostQuantum,
    connection_limits: Option<super::ConnectionLimits>,
    connection_events: bool,
    store_limits: Option<reach_proto::dht::store::StoreLimits>,
    port_mapping: crate::portmap::PortMapping,
    event_log: crate::eventlog::EventLogConfig,
    mailbox_after: Option<std::time::Duration>,
    topic_limits: Option<reach_proto::topics::OverlayConfig>,
    topic_federation: crate::TopicFederation,
}

impl std::fmt::Debug for NodeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeBuilder")
            .field("bind", &self.bind)
            .field("data_dir", &self.data_dir)
            .field("bootstrap", &self.bootstrap)
            .field("dht_mode", &self.dht_mode)
            .finish_non_exhaustive()
    }
}

impl NodeBuilder {
    /// The UDP address to bind (default `0.0.0.0:0`). Bind `[::]:port` for a
    /// dual-stack socket that serves IPv4 and IPv6 on one port.
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = Some(addr);
        self
    }

    /// Where the node keeps its identity (`identity.key`, created on first
    /// start) and its state (the peer cache), locked to one node at a time.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Use this identity instead of one from a data dir (tests, demos,
    /// ephemeral nodes). Without a data dir or keypair the node gets a fresh
    /// random identity.
    pub fn keypair(mut self, keypair: Keypair) -> Self {
        self.keypair = Some(keypair);
        self
    }

    /// Bare `ip:port` addresses of nodes to join the DHT through (their
    /// identities are learned in the handshake). A node with a data dir also
    /// rejoins through the peers it knew last time, so this list is only
    /// needed on the very first start.
    pub fn bootstrap(mut self, addrs: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.bootstrap.extend(addrs);
        self
    }

    /// Use this already-bound UDP socket instead of binding one (e.g. a
    /// socket created inside another network namespace). Overrides `bind`.
    pub fn socket(mut self, socket: std::net::UdpSocket) -> Self {
        self.socket = Some(socket);
        self
    }

    /// The second socket used only to send filtering-test probes from
    /// another port. Without it the node binds one next to its main socket.
    pub fn alt_socket(mut self, socket: std::net::UdpSocket) -> Self {
        self.alt_socket = Some(socket);
        self
    }

    /// Whether to answer STUN Binding requests (default: yes).
    pub fn stun_server(mut self, enabled: bool) -> Self {
        self.no_stun_server = !enabled;
        self
    }

    /// Whether to relay for others: `Auto` (default) serves once the node
    /// has verified that it is publicly reachable; `On` serves at once (a
    /// node known to be public); `Off` never.
    pub fn relay_service(mut self, mode: crate::relay::RelayMode) -> Self {
        self.relay_service = mode;
        self
    }

    /// Whether to acquire a relay: `Auto` (default) once the node has
    /// verified that it is not reachable from outside; `On` always (a node
    /// known to sit behind NAT); `Off` never. Client-mode nodes never do.
    pub fn acquire_relay(mut self, mode: crate::relay::RelayMode) -> Self {
        self.acquire_relay = mode;
        self
    }

    /// Limits of the relay service (clients, reservation lifetime, rates,
    /// idle expiry); see [`reach_proto::relay::service`] for the defaults.
    pub fn relay_limits(mut self, limits: reach_proto::relay::service::RelayLimits) -> Self {
        self.relay_limits = Some(limits);
        self
    }

    /// The TCP listener for links from peers whose UDP is blocked (see
    /// [`crate::tcp`]). Without it the node listens on its UDP port number
    /// on TCP, if that port is free.
    pub fn tcp_listener(mut self, listener: std::net::TcpListener) -> Self {
        self.tcp_listener = Some(listener);
        self
    }

    /// How to open outgoing TCP links (e.g. from inside another network
    /// namespace). Default: an ordinary connect.
    pub fn tcp_connector(mut self, connector: crate::tcp::Connector) -> Self {
        self.tcp_connector = Some(connector);
        self
    }

    /// How to open the extra UDP sockets hole punching needs against a NAT
    /// that maps per destination (default: bind in this process's network
    /// namespace). For nodes whose socket was made elsewhere, e.g. inside
    /// another network namespace.
    pub fn udp_binder(mut self, binder: crate::punch::UdpBinder) -> Self {
        self.udp_binder = Some(binder);
        self
    }

    /// Whether to fall back to TCP links when no bootstrap node answers
    /// over UDP (default: yes).
    pub fn tcp_fallback(mut self, enabled: bool) -> Self {
        self.no_tcp_fallback = !enabled;
        self
    }

    /// Whether relayed connections try to upgrade to direct ones by hole
    /// punching, and this node takes part in punches peers ask for
    /// (default: yes).
    pub fn hole_punching(mut self, enabled: bool) -> Self {
        self.no_hole_punching = !enabled;
        self
    }

    /// Post-quantum key exchange: prefer (default), require or off. See
    /// [`PostQuantum`](crate::handshake::PostQuantum).
    pub fn post_quantum(mut self, mode: crate::handshake::PostQuantum) -> Self {
        self.post_quantum = mode;
        self
    }

    /// Limits on inbound connections, handshakes, silent connections and
    /// the peer table; see [`super::limits`] for the defaults.
    pub fn connection_limits(mut self, limits: super::ConnectionLimits) -> Self {
        self.connection_limits = Some(limits);
        self
    }

    /// How long a critical durable message waits for its unreachable
    /// recipient before it is also sealed into the recipient's DHT mailbox
    /// (default [`crate::outbox::mailbox::DEFAULT_MAILBOX_AFTER`], 30 s;
    /// tests shorten it).
    pub fn mailbox_after(mut self, after: std::time::Duration) -> Self {
        self.mailbox_after = Some(after);
        self
    }

    /// Rate limits this node applies as a topic home to the messages its
    /// members publish: per topic and per publisher per topic, in messages
    /// a second (defaults [`reach_proto::topics::DEFAULT_TOPIC_RATE`] and
    /// [`reach_proto::topics::DEFAULT_PUBLISHER_RATE`]). Messages over a
    /// limit are refused to the publisher with a typed error and counted.
    /// Both must be at least 1.
    pub fn topic_limits(mut self, limits: crate::TopicLimits) -> Self {
        self.topic_limits = Some(limits);
        self
    }

    /// Federation this node keeps as a topic home beyond what the DHT
    /// finds: configured homes to stay linked with, trusted homes, and
    /// private topics (see [`crate::TopicFederation`]). Checked at
    /// [`NodeBuilder::spawn`]: a bad private topic name or more than
    /// [`reach_proto::topics::federation::MAX_CONFIGURED_HOMES`] homes is
    /// an [`Error::Config`].
    pub fn topic_federation(mut self, federation: crate::TopicFederation) -> Self {
        self.topic_federation = federation;
        self
    }

    /// Limits of the DHT record store this node keeps for others: in
    /// total, per publisher, per key, in bytes, and per sending network
    /// (see [`reach_proto::dht::store`] for the defaults and why).
    /// Every limit must be at least 1.
    pub fn store_limits(mut self, limits: reach_proto::dht::store::StoreLimits) -> Self {
        self.store_limits = Some(limits);
        self
    }

    /// Also deliver [`crate::Event::Connected`], [`crate::Event::Disconnected`]
    /// and [`crate::Event::PathChanged`] through `next_event` (off by
    /// default, so an application that only waits for messages sees only
    /// messages and streams). [`crate::Node::subscribe`] sees them either way.
    pub fn connection_events(mut self, on: bool) -> Self {
        self.connection_events = on;
        self
    }

    /// How the node asks the router in front of it to forward its port
    /// (PCP, NAT-PMP, UPnP-IGD). On by default: the default gateway is
    /// asked if it is on a private network, and a mapping verified from
    /// outside makes the node reachable without a relay. A node bound to
    /// loopback never asks. [`PortMapping::disabled`](crate::PortMapping::disabled)
    /// turns it off.
    pub fn port_mapping(mut self, config: crate::portmap::PortMapping) -> Self {
        self.port_mapping = config;
        self
    }

    /// Server (default) or client (outbound-only) DHT mode.
    pub fn dht_mode(mut self, mode: DhtMode) -> Self {
        self.dht_mode = mode;
        self
    }

    /// Whether a node with a data dir writes its event log,
    /// `<data dir>/events.jsonl` (on by default; see [`crate::eventlog`]).
    pub fn event_log(mut self, on: bool) -> Self {
        self.event_log.enabled = on;
        self
    }

    /// The event log's settings: on/off and its rotation (size, files kept).
    pub fn event_log_config(mut self, config: crate::eventlog::EventLogConfig) -> Self {
        self.event_log = config;
        self
    }

    /// Binds the socket and starts the node's tasks, including joining the
    /// DHT in the background (see [`Node::joined`]).
    pub async fn spawn(self) -> Result<Node> {
        if let Some(limits) = &self.connection_limits {
            limits.validate().map_err(Error::Config)?;
        }
        if let Some(l) = &self.store_limits {
            for (name, v) in [
                ("max_records", l.max_records),
                ("max_per_publisher", l.max_per_publisher),
                ("max_per_key", l.max_per_key),
                ("max_bytes", l.max_bytes),
                ("max_per_source", l.max_per_source),
                ("max_per_source_per_key", l.max_per_source_per_key),
            ] {
                if v == 0 {
                    return Err(Error::Config(format!(
                        "store limit {name} must be at least 1"
                    )));
                }
            }
        }
        if let Some(l) = &self.topic_limits
            && (l.topic_rate == 0 || l.publisher_rate == 0)
        {
            return Err(Error::Config(
                "topic rate limits must be at least 1 message a second".into(),
            ));
        }
        if let Some(l) = &self.topic_limits
            && l.link_idle_grace.is_zero()
        {
            // Zero would close a new link before the other home's first
            // `Join` could arrive.
            return Err(Error::Config(
                "the topic link idle grace must be more than zero".into(),
            ));
        }
        self.topic_federation.validate()?;
        // Before anything in the data dir is read or written: one node per
        // data dir (see crate::datadir).
        let dir_lock = match &self.data_dir {
            Some(dir) => Some(crate::datadir::DataDirLock::acquire(dir)?),
            None => None,
        };
        let keypair = match (self.keypair, &self.data_dir) {
            (Some(kp), _) => kp,
            (None, Some(dir)) => keystore::load_or_create(dir)?.0,
            (None, None) => Keypair::generate(),
        };
        let bind = self.bind.unwrap_or(DEFAULT_BIND);
        let std_socket = match self.socket {
            Some(s) => s,
            None => std::net::UdpSocket::bind(bind)
                .map_err(|source| Error::Bind { addr: bind, source })?,
        };
        let local_addr = std_socket
            .local_addr()
            .map_err(|source| Error::Bind { addr: bind, source })?;
        let alt = match self.alt_socket {
            Some(s) => Some(s),
            // Best effort: without it the node only cannot help others'
            // filtering tests.
            None => std::net::UdpSocket::bind(SocketAddr::new(local_addr.ip(), 0)).ok(),
        };
        // It only ever sends one small datagram at a time from the datagram
        // loop, which must never block.
        let alt = alt.filter(|s| s.set_nonblocking(true).is_ok());
        let runtime = Arc::new(TokioRuntime);
        let udp = runtime
            .wrap_udp_socket(std_socket)
            .map_err(|source| Error::Bind { addr: bind, source })?;
        let relay_limits = self.relay_limits.unwrap_or_default();
        let paths = Arc::new(RelayPaths::new(local_addr.is_ipv6(), relay_limits));
        let (shutdown_tx, _) = watch::channel(false);
        // Certificate, keys and TLS configs: once per node, not per dial.
        let tls = crate::handshake::NodeTls::new(&keypair, self.post_quantum)?;
        let link_tls = tls.link_configs();
        let links = TcpLinks::new(
            local_addr.is_ipv6(),
            shutdown_tx.subscribe(),
            self.tcp_connector.clone(),
            link_tls,
        );
        let (socket, non_quic_rx, demux_stats) =
            DemuxSocket::new(udp, paths.clone(), links.clone());
        // Best effort: without a listener only peers behind UDP-blocking
        // networks cannot use this node.
        let tcp_listener = match self.tcp_listener {
            Some(l) => Some(l),
            None => std::net::TcpListener::bind(local_addr).ok(),
        }
        .and_then(|l| {
            l.set_nonblocking(true).ok()?;
            tokio::net::TcpListener::from_std(l).ok()
        });

        let mut endpoint_config = EndpointConfig::default();
        // Peers must never clear the QUIC fixed bit towards us: it is how the
        // shared socket tells QUIC from STUN and control packets.
        endpoint_config.grease_quic_bit(false);
        let mut server_config = tls.server_config();
        // A client's address must not change under an open connection: a
        // relay binds circuits to it, and quinn adopts a migrated address
        // before validating it (a spoofed packet could redirect a circuit).
        // Path upgrades (hole punching) make new connections instead.
        server_config.migration(false);
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config,
            Some(server_config),
            socket.clone(),
            runtime,
        )
        .map_err(|source| Error::Bind { addr: bind, source })?;

        let cache = match &self.data_dir {
            Some(dir) => match PeerCache::open(dir) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "running without a peer cache");
                    None
                }
            },
            None => None,
        };
        let connection_limits = self.connection_limits.unwrap_or_default();
        let bus = super::bus::Bus::default();
        let router = Arc::new(super::router::Router::default());
        let core = Arc::new(super::core::Core {
            peer_id: keypair.peer_id(),
            keypair,
            tls,
            endpoint,
            socket,
            local_addr,
            links: links.clone(),
            tcp: crate::tcp::TcpMode::new(!self.no_tcp_fallback),
            counters: Default::default(),
            demux_stats,
            bus: bus.clone(),
            router,
            tasks: Default::default(),
            shutdown_tx,
            closed: watch::channel(Default::default()).0,
        });
        let peers = crate::peers::Peers::new(
            core.clone(),
            crate::peers::PeerTable::new(connection_limits.max_idle_peers),
            super::limits::InboundGate::new(connection_limits),
        );
        let dht = Dht::new(
            core.clone(),
            peers.clone(),
            self.dht_mode,
            self.bootstrap,
            cache,
        );
        if let Some(limits) = self.store_limits {
            *dht.store() = reach_proto::dht::store::RecordStore::new(limits);
        }
        if let Some(cache) = &dht.cache {
            match cache.load() {
                Ok((contacts, skipped)) => {
                    let mut table = dht.routing();
                    for c in contacts {
                        table.add_unknown(c, dht.now());
                    }
                    if skipped > 0 {
                        tracing::warn!(skipped, "skipped unreadable peer cache entries");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not read the peer cache"),
            }
        }
        let dht = Arc::new(dht);
        let nat = Arc::new(crate::nat::Nat::new(
            core.clone(),
            peers.clone(),
            !self.no_stun_server,
            alt,
        ));
        let udp_binder = self
            .udp_binder
            .clone()
            .unwrap_or_else(|| std::sync::Arc::new(crate::socket::bind_here));
        let portmap = Arc::new(crate::portmap::PortMap::new(
            core.clone(),
            nat.clone(),
            self.port_mapping.clone(),
            crate::portmap::Net {
                udp: udp_binder.clone(),
                tcp: self.tcp_connector.clone().unwrap_or_else(|| {
                    std::sync::Arc::new(|to| {
                        std::net::TcpStream::connect_timeout(
                            &to,
                            crate::portmap::upnp::HTTP_TIMEOUT,
                        )
                    })
                }),
            },
            tcp_listener.is_some(),
        ));
        let advertiser = Arc::new(crate::advertise::Advertiser::new(
            core.clone(),
            dht.clone(),
            nat.clone(),
        ));
        let messaging = Arc::new(crate::messaging::Messaging::new(
            core.clone(),
            peers.clone(),
            self.connection_events,
        ));
        let relay = RelayRuntime::new(
            crate::relay::Below {
                core: core.clone(),
                peers: peers.clone(),
                dht: dht.clone(),
                nat: nat.clone(),
                advertiser: advertiser.clone(),
                portmap: portmap.clone(),
            },
            self.relay_service,
            self.acquire_relay,
            relay_limits,
            paths,
        );
        let punch = crate::punch::PunchRuntime::new(
            core.clone(),
            peers.clone(),
            relay.clone(),
            nat.clone(),
            !self.no_hole_punching,
            udp_binder,
        );
        // A durable message must survive a crash: the outbox lives in the
        // data dir, and a node whose outbox cannot be opened does not start
        // (it would otherwise drop what it promised to deliver).
        let outbox = match &self.data_dir {
            Some(dir) => Some(crate::outbox::Outbox::open(dir, &core.keypair).await?),
            None => None,
        };
        let durable = Arc::new(crate::outbox::delivery::Durable::new(
            core.clone(),
            peers.clone(),
            messaging.clone(),
            outbox,
        ));
        let topics = crate::topics::Topics::new(
            core.clone(),
            peers.clone(),
            dht.clone(),
            relay.clone(),
            self.topic_limits.unwrap_or_default(),
            self.topic_federation.clone(),
        );
        let inner = Arc::new(Inner {
            core: core.clone(),
            peers: peers.clone(),
            messaging,
            durable,
            topics,
            advertiser,
            dht,
            nat,
            portmap,
            relay,
            punch,
            dir_lock: std::sync::Mutex::new(dir_lock),
        });
        // Subscribed before any task runs: the log misses no event.
        if let (Some(dir), true) = (&self.data_dir, self.event_log.enabled) {
            crate::eventlog::start(&inner, dir, self.event_log, inner.peer_id, local_addr);
        }
        if let Some(l) = tcp_listener {
            inner.spawn(links.accept_loop(l));
        }
        plug_in(&inner);
        inner.spawn(crate::peers::serve::accept_loop(inner.peers.clone()));
        inner.spawn(super::limits::trim_loop(inner.peers.gate.clone()));
        inner.spawn(inner.nat.clone().datagram_loop(non_quic_rx));
        inner.spawn({
            let nat = inner.nat.clone();
            async move { nat.external().expiry_loop().await }
        });
        inner.spawn(inner.dht.clone().maintain());
        inner.spawn(inner.dht.clone().hand_off());
        inner.portmap.start();
        inner.spawn(inner.relay.clone().drive());
        inner.spawn(inner.relay.clone().expire_loop());
        inner.spawn(inner.durable.clone().run());
        crate::outbox::mailbox::Mailbox::new(
            inner.core.clone(),
            inner.peers.clone(),
            inner.dht.clone(),
            inner.durable.clone(),
            self.mailbox_after
                .unwrap_or(crate::outbox::mailbox::DEFAULT_MAILBOX_AFTER),
        )
        .start();
        inner.spawn(inner.topics.clone().drive());
        inner.spawn(inner.topics.clone().watch_home());
        inner.spawn(inner.topics.clone().discovery());
        inner.spawn(inner.topics.clone().configured_links());
        tracing::debug!(peer_id = %inner.peer_id, addr = %local_addr, "node started");
        Ok(Node {
            _guard: Arc::new(DropGuard(inner.clone())),
            inner,
        })
    }
}

/// Plugs the capabilities into each other and into the router (see
/// [`super::wiring`]). The order is the order connection observers are
/// called in: the relay watches a relayed connection before punching reacts
/// to it, and messaging queues the connection event last.
fn plug_in(inner: &Arc<Inner>) {
    use super::wiring;
    wiring::relay::plug_in(inner);
    wiring::punch::plug_in(inner);
    wiring::dht::plug_in(inner);
    wiring::nat::plug_in(inner);
    wiring::outbox::plug_in(inner);
    wiring::topics::plug_in(inner);
    wiring::messaging::plug_in(inner);
    wiring::advertise::plug_in(inner);
}
