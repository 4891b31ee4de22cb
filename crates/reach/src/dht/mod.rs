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

pub mod join;
pub mod ops;
pub mod peer_cache;
pub mod rpc;

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reach_proto::PeerId;
use reach_proto::dht::routing::{RoutingConfig, RoutingTable};
use reach_proto::dht::store::{RecordStore, StoreLimits};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

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

/// DHT state of a node.
pub(crate) struct Dht {
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
}

impl Dht {
    pub fn new(
        local: PeerId,
        mode: DhtMode,
        bootstrap: Vec<SocketAddr>,
        cache: Option<peer_cache::PeerCache>,
    ) -> Self {
        Dht {
            mode,
            routing: Mutex::new(RoutingTable::new(local, RoutingConfig::default())),
            store: Mutex::new(RecordStore::new(StoreLimits::default())),
            clock: Instant::now(),
            bootstrap,
            cache,
            joined: watch::channel(false).0,
            counters: DhtCounters::default(),
        }
    }

    /// The sans-IO core's notion of now.
    pub fn now(&self) -> Duration {
        self.clock.elapsed()
    }

    /// Records that `contact` answered or asked. A contact reached over a
    /// relay circuit, or over a TCP link it opened to us, has no address
    /// others could use: it stays out. One we reach over a TCP link we
    /// opened is recorded at the address we dialed.
    pub fn saw(&self, links: &crate::tcp::TcpLinks, mut contact: reach_proto::dht::Contact) {
        if let Some(real) = links.dialed_remote(&contact.addr) {
            contact.addr = real;
        }
        if !crate::relay::paths::is_virtual(&contact.addr) {
            self.routing().on_seen(contact, self.now());
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

/// How the DHT serves its stream protocol ([`reach_proto::wire::envelope::protocols::DHT`]):
/// one request per stream, answered on it.
pub(crate) fn serve_stream(
    inner: std::sync::Arc<crate::node::Inner>,
    s: crate::node::router::Inbound,
) -> futures::future::BoxFuture<'static, ()> {
    Box::pin(async move {
        if let reach_proto::wire::envelope::Body::DhtRequest(msg) = s.head.body {
            inner.peers.touch(&s.peer, false);
            rpc::serve(inner, s.peer, s.remote, msg, s.send).await
        }
    })
}
