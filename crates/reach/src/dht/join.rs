//! Joining the network and staying in it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use reach_proto::dht::record::{AddrKind, SignedRecord, TypedAddr};
use reach_proto::dht::{Contact, Key};
use serde::Serialize;

use super::ops::{self, Query};
use super::{DhtMode, unix_ms};
use crate::node::{Inner, peers, stats};

/// Lifetime of our endpoint record.
pub const ENDPOINT_TTL: Duration = Duration::from_secs(3600);
/// How often the endpoint record is republished: three times per lifetime,
/// so two lost republishes still leave it alive.
pub const REPUBLISH_INTERVAL: Duration = Duration::from_secs(20 * 60);
/// A bucket with no lookup for this long is refreshed with a random one.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(10 * 60);
/// The maintenance loop wakes this often.
pub const MAINTENANCE_TICK: Duration = Duration::from_secs(30);
/// Bucket refreshes per maintenance tick at most, to spread the load.
pub const MAX_REFRESHES_PER_TICK: usize = 4;
/// First wait before retrying a join nobody answered; doubles up to
/// [`MAINTENANCE_TICK`].
pub const JOIN_RETRY_INITIAL: Duration = Duration::from_secs(1);
/// Lookups run at once while joining (one per bucket to fill).
pub const JOIN_PARALLEL_REFRESHES: usize = 8;

/// What a join achieved.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JoinReport {
    /// Bootstrap addresses that answered.
    pub bootstrap_reached: usize,
    /// Contacts in the routing table afterwards.
    pub routing_table_size: usize,
    /// Nodes that stored our endpoint record.
    pub endpoint_replicas: usize,
}

/// The addresses we publish: each bound address, tagged `Lan` when it is
/// loopback or private and `Unverified` otherwise (nothing has confirmed
/// yet that the outside can reach it).
pub(crate) fn own_addrs(local: &[SocketAddr]) -> Vec<TypedAddr> {
    let is_local = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00 || v6.is_unicast_link_local()
        }
    };
    let mut out: Vec<TypedAddr> = local
        .iter()
        .map(|a| TypedAddr {
            kind: if is_local(a.ip()) {
                AddrKind::Lan
            } else {
                AddrKind::Unverified
            },
            addr: *a,
            via: None,
        })
        .collect();
    out.truncate(reach_proto::dht::record::MAX_ENDPOINT_ADDRS);
    out
}

/// Contacts the bootstrap addresses, fills the routing table and publishes
/// our endpoint record.
pub(crate) async fn join(inner: &Arc<Inner>, extra: &[SocketAddr]) -> JoinReport {
    let dht = &inner.dht;
    let mut addrs: Vec<SocketAddr> = dht.bootstrap.lock().map(|b| b.clone()).unwrap_or_default();
    addrs.extend_from_slice(extra);
    addrs.sort();
    addrs.dedup();
    addrs.retain(|a| *a != inner.local_addr);
    let mut report = JoinReport::default();
    dial_bootstrap(inner, &addrs, &mut report).await;
    if report.bootstrap_reached == 0 && !addrs.is_empty() && inner.tcp_fallback && !inner.tcp_mode()
    {
        // Nobody answers over UDP: perhaps this network blocks it. Try TCP
        // links to the same addresses; if they work, every dial from now on
        // goes over TCP.
        inner
            .tcp_mode
            .store(true, std::sync::atomic::Ordering::Relaxed);
        dial_bootstrap(inner, &addrs, &mut report).await;
        if report.bootstrap_reached == 0 {
            inner
                .tcp_mode
                .store(false, std::sync::atomic::Ordering::Relaxed);
        } else {
            tracing::warn!("no bootstrap node answers over UDP: using TCP links");
        }
    }
    // Find our neighbours, then fill every bucket we know of.
    let own = Key::for_peer(&inner.peer_id);
    ops::lookup(inner, own, Query::FindNode).await;
    let buckets = dht.routing().bucket_count();
    let targets: Vec<Key> = (0..buckets).map(|cpl| random_key_in(own, cpl)).collect();
    futures::stream::iter(targets)
        .for_each_concurrent(JOIN_PARALLEL_REFRESHES, |k| async move {
            ops::lookup(inner, k, Query::FindNode).await;
        })
        .await;
    report.routing_table_size = dht.routing().len();
    if dht.routing().live_len() == 0 && !addrs.is_empty() {
        // Nobody answered: not joined. The caller retries.
        return report;
    }
    report.endpoint_replicas = publish_endpoint(inner).await;
    save_peer_cache(inner);
    dht.joined.send_replace(true);
    tracing::debug!(?report, "joined the DHT");
    report
}

/// Dials every bootstrap address at once; counts and records who answers.
async fn dial_bootstrap(inner: &Arc<Inner>, addrs: &[SocketAddr], report: &mut JoinReport) {
    let dht = &inner.dht;
    let mut dials: FuturesUnordered<_> = addrs
        .iter()
        .map(|&a| {
            let inner = inner.clone();
            async move { (a, peers::dial_unknown(&inner, a).await) }
        })
        .collect();
    while let Some((addr, res)) = dials.next().await {
        match res {
            Ok(peer) => {
                report.bootstrap_reached += 1;
                dht.routing().on_seen(Contact::new(peer, addr), dht.now());
            }
            Err(e) => tracing::warn!(%addr, error = %e, "bootstrap node unreachable"),
        }
    }
}

fn random_key_in(own: Key, cpl: usize) -> Key {
    let mut r = [0u8; 32];
    // Randomness failing here only makes refresh targets less random.
    let _ = getrandom::fill(&mut r);
    own.random_in_bucket(cpl, r)
}

/// Publishes our endpoint record to the k closest nodes (server mode only).
/// Returns how many stored it.
pub(crate) async fn publish_endpoint(inner: &Arc<Inner>) -> usize {
    let dht = &inner.dht;
    if dht.mode == DhtMode::Client {
        return 0;
    }
    let mut addrs: Vec<TypedAddr> = Vec::new();
    // The relay first: it is what works from anywhere.
    if let Some((relay, addr)) = inner.relay.held() {
        addrs.push(TypedAddr {
            kind: AddrKind::Relay,
            addr,
            via: Some(relay),
        });
    }
    // An address a never-contacted host reached us at is verified.
    if let crate::relay::Reachability::Public(addr) = inner.relay.reachability() {
        addrs.push(TypedAddr {
            kind: AddrKind::Direct,
            addr,
            via: None,
        });
    }
    // External addresses that peers at two or more IPs agree on: behind a
    // NAT they are the ones the outside can try. Unverified until a
    // reachability check confirms them.
    for ext in inner.nat.confirmed() {
        if !addrs.iter().any(|a| a.addr == ext) {
            addrs.push(TypedAddr {
                kind: AddrKind::Unverified,
                addr: ext,
                via: None,
            });
        }
    }
    for local in own_addrs(&crate::node::local_addrs_of(inner)) {
        if !addrs.iter().any(|a| a.addr == local.addr) {
            addrs.push(local);
        }
    }
    addrs.truncate(reach_proto::dht::record::MAX_ENDPOINT_ADDRS);
    // Sequence numbers follow the wall clock, so a restarted node (which
    // forgot its last seq) still publishes a newer record.
    let now_ms = unix_ms();
    let prev = dht.endpoint_seq.load(Ordering::Relaxed);
    let seq = now_ms.max(prev + 1);
    dht.endpoint_seq.store(seq, Ordering::Relaxed);
    let record = SignedRecord::endpoint(&inner.keypair, addrs, seq, now_ms, ENDPOINT_TTL);
    // We are one of the closest to our own key by definition: keep a copy.
    let _ = dht.store().put(record.clone(), now_ms);
    let stored = ops::put(inner, record).await;
    stats::add(&dht.counters.records_published, stored);
    stored
}

pub(crate) fn save_peer_cache(inner: &Inner) {
    let Some(cache) = &inner.dht.cache else {
        return;
    };
    let contacts: Vec<Contact> = inner.dht.routing().iter().map(|e| e.contact).collect();
    if let Err(e) = cache.save(&contacts) {
        tracing::warn!(error = %e, "could not save the peer cache");
    }
}

/// Keeps the node in the network: joins, then periodically refreshes stale
/// buckets, republishes the endpoint record, expires stored records and
/// saves the peer cache.
pub(crate) async fn maintain(inner: Arc<Inner>) {
    let dht = &inner.dht;
    // Join, retrying with backoff while nobody answers (the bootstrap node
    // may be starting too, or overloaded).
    let mut retry = JOIN_RETRY_INITIAL;
    loop {
        join(&inner, &[]).await;
        if *dht.joined.borrow() {
            break;
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(MAINTENANCE_TICK);
    }
    let mut last_publish = dht.now();
    let mut last_external: Vec<SocketAddr> = Vec::new();
    loop {
        tokio::time::sleep(MAINTENANCE_TICK).await;
        if dht.routing().live_len() == 0 {
            // Lost everyone (e.g. the network was down): start over.
            join(&inner, &[]).await;
            last_publish = dht.now();
            continue;
        }
        let own = Key::for_peer(&inner.peer_id);
        let stale = dht
            .routing()
            .buckets_to_refresh(dht.now(), REFRESH_INTERVAL);
        for cpl in stale.into_iter().take(MAX_REFRESHES_PER_TICK) {
            ops::lookup(&inner, random_key_in(own, cpl), Query::FindNode).await;
        }
        let external = inner.nat.confirmed();
        let external_changed = external != last_external;
        if external_changed || dht.now().saturating_sub(last_publish) >= REPUBLISH_INTERVAL {
            last_external = external;
            publish_endpoint(&inner).await;
            last_publish = dht.now();
        }
        dht.store().expire(unix_ms());
        save_peer_cache(&inner);
        for conn in inner.peers.idle_dht_connections(peers::DHT_CONNECTION_IDLE) {
            conn.close(0u32.into(), b"idle");
        }
    }
}
