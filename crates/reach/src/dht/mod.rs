//! The DHT capability of a node: reach-proto's Kademlia core driven over
//! reach's authenticated QUIC connections.
//!
//! - [`rpc`]: one request per bidirectional stream, client and server side
//!   (the answer itself is reach-proto's `dht::server::answer`);
//! - [`ops`]: iterative lookups (find node, get records, put records) and
//!   resolving a peer's endpoint record;
//! - [`join`]: bootstrapping, publishing our endpoint record, and the
//!   maintenance loop (bucket refresh, republish, expiry, peer cache), as
//!   reach-proto's `dht::maintenance` machines schedule them;
//! - [`peer_cache`]: the routing table persisted in the data dir (redb), so
//!   a restart rejoins without a bootstrap list.
//!
//! The DHT sits low in the node: it uses the core and the peers and nothing
//! above them. What it needs from above comes through small traits the
//! composition root plugs in (held weakly: the implementors hold the DHT):
//! [`RecordOwner`] publishes our endpoint record (advertise),
//! [`ObservedAddrs`] takes the address a peer saw us at (NAT), and
//! [`RelayAddrs`] names the relay behind a relayed address (the relay). The
//! DHT itself implements [`crate::peers::Resolve`], so dialing by key finds
//! addresses through it.

pub mod join;
pub mod ops;
pub mod pages;
pub mod peer_cache;
pub mod rpc;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use reach_proto::PeerId;
use reach_proto::dht::record::TypedAddr;
use reach_proto::dht::routing::{RoutingConfig, RoutingTable};
use reach_proto::dht::store::{RecordStore, StoreLimits};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::Result;
use crate::node::core::Core;
use crate::node::stats;
use crate::peers::Peers;

/// Whether a node serves the DHT or only uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DhtMode {
    /// Answers queries, stores records, enters others' routing tables.
    #[default]
    Server,
    /// Outbound-only: uses the DHT but never enters routing tables and
    /// answers no queries (for nodes that cannot be reached).
    Client,
}

crate::telemetry::metrics! {
    /// Counters of the DHT.
    pub(crate) struct DhtCounters =>
    /// The DHT's counters as [`NodeStats`](crate::NodeStats) shows them.
    pub struct DhtStats;
    atomic {
        /// Iterative lookups run.
        counter lookups = "dht_lookups",
        /// DHT requests sent.
        counter rpcs_sent = "dht_rpcs_sent",
        /// DHT requests that failed or timed out.
        counter rpcs_failed = "dht_rpcs_failed",
        /// DHT requests this node answered.
        counter rpcs_served = "dht_rpcs_served",
        /// Endpoint records this node published.
        counter records_published = "dht_records_published",
        /// Records handed to contacts new to the routing table that are
        /// now among their closest holders.
        counter records_handed_off = "dht_records_handed_off",
        /// Peers resolved to addresses through the DHT.
        counter resolutions = "dht_resolutions",
        /// Resolutions that found no valid record.
        counter resolution_failures = "dht_resolution_failures",
    }
    external {
        /// Contacts in the routing table now.
        gauge routing_table_size = "dht_routing_table_size",
        /// Records this node stores for others now.
        gauge records_stored = "dht_records_stored",
    }
}

/// The owner of our endpoint record (advertise, above the DHT): joining
/// and the maintenance schedule ask it to publish.
pub(crate) trait RecordOwner: Send + Sync {
    /// Composes, signs and publishes the endpoint record; returns how many
    /// nodes stored it.
    fn publish(&self) -> BoxFuture<'_, usize>;
    /// The external addresses confirmed now: when they change, the record
    /// is republished at the next maintenance tick.
    fn external_addrs(&self) -> Vec<SocketAddr>;
}

/// Takes the addresses peers report seeing us at (NAT discovery, above the
/// DHT): every DHT answer carries one.
pub(crate) trait ObservedAddrs: Send + Sync {
    /// The peer at `reporter` saw our packets come from `observed`.
    fn observed(&self, observed: SocketAddr, reporter: SocketAddr);
}

/// Names the relay behind a relayed circuit's virtual address (the relay,
/// above the DHT): a record put through a relay counts against the relay's
/// network.
pub(crate) trait RelayAddrs: Send + Sync {
    /// The address of the relay that `remote` (a virtual address) goes
    /// through, as our connection to it sees it.
    fn relay_addr(&self, remote: &SocketAddr) -> Option<SocketAddr>;
}

/// What the composition root plugged in (see the module docs).
#[derive(Default)]
struct Hooks {
    owner: OnceLock<Weak<dyn RecordOwner>>,
    observed: OnceLock<Weak<dyn ObservedAddrs>>,
    relays: OnceLock<Weak<dyn RelayAddrs>>,
}

/// DHT state of a node.
pub(crate) struct Dht {
    pub core: Arc<Core>,
    pub peers: Arc<Peers>,
    pub mode: DhtMode,
    pub routing: Mutex<RoutingTable>,
    pub store: Mutex<RecordStore>,
    /// Epoch of the sans-IO core's clock (tokio's, so tests can pause it).
    pub clock: Instant,
    /// Bootstrap addresses given at build time; every join contacts them.
    pub bootstrap: Vec<SocketAddr>,
    pub cache: Option<peer_cache::PeerCache>,
    /// Becomes true once the first join (and endpoint publish) finished.
    pub joined: watch::Sender<bool>,
    pub counters: DhtCounters,
    /// Iterative lookups (see [`crate::histogram`]).
    pub lookup_seconds: crate::histogram::Histogram,
    /// Contacts new to the routing table, waiting for the records we hand
    /// them ([`Dht::hand_off`]).
    newcomers: Mutex<std::collections::VecDeque<reach_proto::dht::Contact>>,
    newcomer: tokio::sync::Notify,
    hooks: Hooks,
}

/// Newcomers waiting for their hand-off at most; beyond, a newcomer gets
/// nothing from us (its records still reach it from other holders or at
/// the publishers' next republish). Bounds the memory a churn of fresh
/// contacts can take.
pub const MAX_PENDING_HANDOFFS: usize = 256;

impl Dht {
    pub fn new(
        core: Arc<Core>,
        peers: Arc<Peers>,
        mode: DhtMode,
        bootstrap: Vec<SocketAddr>,
        cache: Option<peer_cache::PeerCache>,
    ) -> Self {
        let local = core.peer_id;
        Dht {
            core,
            peers,
            mode,
            routing: Mutex::new(RoutingTable::new(local, RoutingConfig::default())),
            store: Mutex::new(RecordStore::new(StoreLimits::default())),
            clock: Instant::now(),
            bootstrap,
            cache,
            joined: watch::channel(false).0,
            counters: DhtCounters::default(),
            lookup_seconds: Default::default(),
            newcomers: Default::default(),
            newcomer: Default::default(),
            hooks: Hooks::default(),
        }
    }

    /// Plugs in the owner of our endpoint record (once, at build).
    pub(crate) fn set_record_owner(&self, o: Weak<dyn RecordOwner>) {
        let _ = self.hooks.owner.set(o);
    }

    /// Plugs in what takes observed addresses (once, at build).
    pub(crate) fn set_observed_addrs(&self, o: Weak<dyn ObservedAddrs>) {
        let _ = self.hooks.observed.set(o);
    }

    /// Plugs in what names the relays behind relayed addresses (once, at
    /// build).
    pub(crate) fn set_relay_addrs(&self, r: Weak<dyn RelayAddrs>) {
        let _ = self.hooks.relays.set(r);
    }

    fn record_owner(&self) -> Option<Arc<dyn RecordOwner>> {
        self.hooks.owner.get()?.upgrade()
    }

    /// Publishes our endpoint record through its owner; how many nodes
    /// stored it (0 when nobody owns it: a node shutting down).
    async fn publish_record(&self) -> usize {
        match self.record_owner() {
            Some(o) => o.publish().await,
            None => 0,
        }
    }

    /// Our confirmed external addresses, as the record's owner sees them.
    fn external_addrs(&self) -> Vec<SocketAddr> {
        self.record_owner()
            .map(|o| o.external_addrs())
            .unwrap_or_default()
    }

    /// Tells NAT discovery that the peer at `reporter` saw us at `observed`.
    fn observed_addr(&self, observed: SocketAddr, reporter: SocketAddr) {
        if let Some(o) = self.hooks.observed.get().and_then(Weak::upgrade) {
            o.observed(observed, reporter);
        }
    }

    /// The relay behind the relayed address `remote`, if the relay knows it.
    fn relay_addr(&self, remote: &SocketAddr) -> Option<SocketAddr> {
        self.hooks.relays.get()?.upgrade()?.relay_addr(remote)
    }

    /// The sans-IO core's notion of now.
    pub fn now(&self) -> Duration {
        self.clock.elapsed()
    }

    /// Records that `contact` answered or asked. A contact reached over a
    /// relay circuit, or over a TCP link it opened to us, has no address
    /// others could use: it stays out. One we reach over a TCP link we
    /// opened is recorded at the address we dialed.
    pub fn saw(&self, mut contact: reach_proto::dht::Contact) {
        if let Some(real) = self.core.links.dialed_remote(&contact.addr) {
            contact.addr = real;
        }
        if !crate::vaddr::is_virtual(&contact.addr) {
            let outcome = self.routing().on_seen(contact, self.now());
            if outcome == reach_proto::dht::routing::InsertOutcome::Inserted {
                let mut q = self.newcomers.lock().unwrap_or_else(|p| p.into_inner());
                if q.len() < MAX_PENDING_HANDOFFS {
                    q.push_back(contact);
                    self.newcomer.notify_one();
                }
            }
        }
    }

    /// Hands each contact new to the routing table the records it should
    /// now hold and that we are the closest holder of
    /// ([`RecordStore::handoff`]): without it a record published while the
    /// network was small stays at nodes that are no longer its closest, and
    /// lookups miss it until its publisher republishes.
    pub(crate) async fn hand_off(self: Arc<Self>) {
        use reach_proto::dht::rpc::DhtRequest;
        use reach_proto::dht::store::MAX_HANDOFF_RECORDS;
        use reach_proto::dht::{K, Key};
        loop {
            let next = self
                .newcomers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front();
            let Some(contact) = next else {
                self.newcomer.notified().await;
                continue;
            };
            let own = Key::for_peer(&self.core.peer_id);
            let records = {
                let routing = self.routing();
                self.store().handoff(
                    &own,
                    &contact.key(),
                    unix_ms(),
                    K,
                    MAX_HANDOFF_RECORDS,
                    |key| routing.closest(key, K).iter().map(|c| c.key()).collect(),
                )
            };
            for record in records {
                if let Err(e) = self
                    .request(contact, DhtRequest::PutRecord { record })
                    .await
                {
                    tracing::debug!(peer = %contact.peer, error = %e, "record hand-off failed");
                    break;
                }
                stats::bump(&self.counters.records_handed_off);
            }
        }
    }

    /// The DHT's counters, with the routing table and store sizes now.
    pub fn stats(&self) -> DhtStats {
        let mut s = self.counters.snapshot();
        s.routing_table_size = self.routing().len() as u64;
        s.records_stored = self.store().len() as u64;
        s
    }

    pub fn routing(&self) -> std::sync::MutexGuard<'_, RoutingTable> {
        // A poisoned lock means a panic mid-update elsewhere; the table is
        // still a valid table.
        self.routing.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn store(&self) -> std::sync::MutexGuard<'_, RecordStore> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Wall-clock Unix time in milliseconds (records travel between nodes, so
/// they carry real time).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The routing table as `/debug/routing` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RoutingSnapshot {
    pub local_key: String,
    pub mode: DhtMode,
    pub size: usize,
    pub bucket_sizes: Vec<usize>,
    pub network_size_estimate: Option<f64>,
    pub entries: Vec<RoutingEntry>,
}

/// One contact of a [`RoutingSnapshot`].
#[derive(Debug, Clone, Serialize)]
pub struct RoutingEntry {
    pub peer: PeerId,
    pub addr: SocketAddr,
    pub bucket: usize,
    pub health: reach_proto::dht::routing::Health,
    pub last_seen_s_ago: u64,
}

impl RoutingSnapshot {
    pub(crate) fn of(dht: &Dht) -> Self {
        let table = dht.routing();
        let local = table.local_key();
        let now = dht.now();
        let closest: Vec<reach_proto::dht::Key> = table
            .closest(&local, reach_proto::dht::K)
            .iter()
            .map(|c| c.key())
            .collect();
        RoutingSnapshot {
            local_key: local.to_string(),
            mode: dht.mode,
            size: table.len(),
            bucket_sizes: table.bucket_sizes(),
            network_size_estimate: reach_proto::dht::estimate::network_size(&local, &closest)
                .map(|n| n + 1.0),
            entries: table
                .iter()
                .map(|e| RoutingEntry {
                    peer: e.contact.peer,
                    addr: e.contact.addr,
                    bucket: local.common_prefix_len(&e.key),
                    health: e.health,
                    last_seen_s_ago: now.saturating_sub(e.last_seen).as_secs(),
                })
                .collect(),
        }
    }
}

/// The record store as `/debug/store` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct StoreSnapshot {
    #[serde(flatten)]
    pub summary: reach_proto::dht::store::StoreSummary,
    pub records: Vec<StoredRecord>,
}

/// One record of a [`StoreSnapshot`].
#[derive(Debug, Clone, Serialize)]
pub struct StoredRecord {
    pub kind: reach_proto::dht::record::RecordKind,
    pub key: String,
    pub publisher: PeerId,
    pub seq: u64,
    pub expires_in_s: u64,
    pub payload_len: usize,
}

/// Records listed by `/debug/store` at most.
pub const MAX_LISTED_RECORDS: usize = 1000;

impl StoreSnapshot {
    pub(crate) fn of(dht: &Dht) -> Self {
        let store = dht.store();
        let now = unix_ms();
        StoreSnapshot {
            summary: store.summary(),
            records: store
                .iter()
                .take(MAX_LISTED_RECORDS)
                .map(|r| StoredRecord {
                    kind: r.kind,
                    key: r.key.to_string(),
                    publisher: r.publisher,
                    seq: r.seq,
                    expires_in_s: r.expires_ms().saturating_sub(now) / 1000,
                    payload_len: r.payload.len(),
                })
                .collect(),
        }
    }
}

impl Dht {
    /// How the DHT serves its stream protocol
    /// ([`reach_proto::wire::envelope::protocols::DHT`]): one request per
    /// stream, answered on it.
    pub(crate) async fn serve_stream(self: Arc<Self>, s: crate::node::router::Inbound) {
        if let reach_proto::wire::envelope::Body::DhtRequest(msg) = s.head.body {
            self.peers.touch(&s.peer, false);
            self.serve(s.peer, s.remote, msg, s.send).await
        }
    }
}

/// Dialing by key finds the peer's addresses in its endpoint record.
impl crate::peers::Resolve for Dht {
    fn resolve(&self, peer: PeerId, fresh: bool) -> BoxFuture<'_, Result<Vec<TypedAddr>>> {
        Box::pin(async move {
            let found = if fresh {
                self.resolve_fresh(peer).await
            } else {
                Dht::resolve(self, peer).await
            };
            found.map(|(_, typed)| typed)
        })
    }
}
