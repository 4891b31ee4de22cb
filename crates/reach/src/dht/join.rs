//! Joining the network and staying in it: drives reach-proto's
//! [`JoinAttempt`] and [`Maintenance`] machines with real lookups.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use reach_proto::dht::maintenance::{
    Action, JOIN_CACHED_DIALS, JoinAction, JoinAttempt, JoinOutcome, Maintenance,
};
use reach_proto::dht::{Contact, Key};
use serde::Serialize;

use super::ops::Query;
use super::{Dht, unix_ms};

pub use reach_proto::dht::maintenance::{
    ENDPOINT_TTL, JOIN_PARALLEL_REFRESHES, JOIN_RETRY_INITIAL, MAINTENANCE_TICK,
    MAX_REFRESHES_PER_TICK, REFRESH_INTERVAL, REPUBLISH_INTERVAL,
};

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

impl Dht {
    /// Contacts the bootstrap addresses, fills the routing table and publishes
    /// our endpoint record.
    pub(crate) async fn join(&self, extra: &[SocketAddr]) -> JoinReport {
        self.join_attempt(extra).await.0
    }

    /// One join, as [`JoinAttempt`] schedules it: bootstrap and self-lookup,
    /// then the bucket refreshes, [`JOIN_PARALLEL_REFRESHES`] at a time; when
    /// someone answered, publish our endpoint record and save the peer cache.
    async fn join_attempt(&self, extra: &[SocketAddr]) -> (JoinReport, JoinOutcome) {
        let dht = self;
        let mut addrs: Vec<SocketAddr> = dht.bootstrap.clone();
        addrs.extend_from_slice(extra);
        {
            // Nobody in the table has answered in this run (a restart from
            // the peer cache, or everyone lost): dial the remembered contacts
            // directly too. A lookup alone would give up on them for good
            // once they failed twice, and a node whose cache is all it knows
            // would then believe itself alone in the network.
            let table = dht.routing();
            if table.answered_len() == 0 {
                addrs.extend(
                    table
                        .rejoin_candidates(JOIN_CACHED_DIALS)
                        .iter()
                        .map(|c| c.addr),
                );
            }
        }
        addrs.sort();
        addrs.dedup();
        addrs.retain(|a| *a != self.core.local_addr);
        let mut report = JoinReport::default();
        let own = Key::for_peer(&self.core.peer_id);
        let mut attempt = JoinAttempt::new();
        let mut refreshes = FuturesUnordered::new();
        let outcome = loop {
            while let Some(action) = attempt.poll_action() {
                match action {
                    JoinAction::Bootstrap => {
                        self.bootstrap(&addrs, &mut report).await;
                        // Find our neighbours.
                        self.lookup(own, Query::FindNode).await;
                        let table = dht.routing();
                        // Nobody to ask (the first node of a network) counts as
                        // answered; contacts that are merely remembered do not.
                        let answered = table.answered_len() > 0 || addrs.is_empty();
                        attempt.self_lookup_done(answered, &table);
                        drop(table);
                        if answered && !addrs.is_empty() {
                            // Saved now, not only once the join is done: a
                            // node stopped (or killed) during the refreshes
                            // or the publication finds its neighbours at the
                            // next start without a bootstrap.
                            self.save_peer_cache();
                        }
                    }
                    JoinAction::Refresh { bucket } => refreshes.push(async move {
                        self.lookup(random_key_in(own, bucket), Query::FindNode)
                            .await;
                    }),
                }
            }
            if let Some(outcome) = attempt.outcome() {
                break outcome;
            }
            // The attempt waits for a refresh, so one runs.
            if refreshes.next().await.is_none() {
                break JoinOutcome::NobodyAnswered;
            }
            attempt.refresh_done();
        };
        report.routing_table_size = dht.routing().len();
        if outcome != JoinOutcome::Joined {
            // Nobody answered: not joined. The caller retries.
            return (report, outcome);
        }
        report.endpoint_replicas = self.publish_record().await;
        self.save_peer_cache();
        dht.joined.send_replace(true);
        tracing::info!(?report, "joined the DHT");
        (report, outcome)
    }

    /// Dials the bootstrap addresses; when none answers over UDP, tries TCP
    /// links to them.
    async fn bootstrap(&self, addrs: &[SocketAddr], report: &mut JoinReport) {
        self.dial_bootstrap(addrs, report).await;
        if report.bootstrap_reached == 0
            && !addrs.is_empty()
            && self.core.tcp.fallback_allowed()
            && !self.core.tcp_mode()
        {
            // Nobody answers over UDP: perhaps this network blocks it. Try TCP
            // links to the same addresses; if they work, every dial from now on
            // goes over TCP.
            self.core.tcp.set_active(true);
            self.dial_bootstrap(addrs, report).await;
            if report.bootstrap_reached == 0 {
                self.core.tcp.set_active(false);
            } else {
                tracing::warn!("no bootstrap node answers over UDP: using TCP links");
            }
        }
    }

    /// Dials every bootstrap address at once; counts and records who answers.
    async fn dial_bootstrap(&self, addrs: &[SocketAddr], report: &mut JoinReport) {
        let dht = self;
        let mut dials: FuturesUnordered<_> = addrs
            .iter()
            .map(|&a| {
                let peers = self.peers.clone();
                async move { (a, peers.dial_unknown(a).await) }
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
}

fn random_key_in(own: Key, cpl: usize) -> Key {
    let mut r = [0u8; 32];
    // Randomness failing here only makes refresh targets less random.
    let _ = getrandom::fill(&mut r);
    own.random_in_bucket(cpl, r)
}

impl Dht {
    /// Saves the routing table to the peer cache (if the node has one),
    /// logging a failure: the next save tries again.
    pub(crate) fn save_peer_cache(&self) {
        let Some(cache) = &self.cache else {
            return;
        };
        let contacts: Vec<Contact> = self.routing().iter().map(|e| e.contact).collect();
        if let Err(e) = cache.save(&contacts) {
            tracing::warn!(error = %e, "could not save the peer cache");
        }
    }

    /// Keeps the node in the network as [`Maintenance`] schedules it: joins
    /// (retrying with backoff while nobody answers), then every
    /// [`MAINTENANCE_TICK`] refreshes stale buckets, republishes the endpoint
    /// record when due or when our external addresses changed, expires stored
    /// records, closes idle DHT connections and saves the peer cache.
    pub(crate) async fn maintain(self: Arc<Self>) {
        let dht = &self;
        let own = Key::for_peer(&self.core.peer_id);
        let mut m = Maintenance::new();
        let mut last_external: Vec<SocketAddr> = Vec::new();
        loop {
            while let Some(action) = m.poll_action() {
                match action {
                    Action::Join => {
                        let (_, outcome) = self.join_attempt(&[]).await;
                        m.join_done(dht.now(), outcome);
                    }
                    Action::Refresh { bucket } => {
                        self.lookup(random_key_in(own, bucket), Query::FindNode)
                            .await;
                    }
                    Action::Republish => {
                        self.publish_record().await;
                        m.published(dht.now());
                    }
                    Action::ExpireRecords => {
                        dht.store().expire(unix_ms());
                        for conn in self
                            .peers
                            .idle_dht_connections(crate::peers::DHT_CONNECTION_IDLE)
                        {
                            conn.close(0u32.into(), b"idle");
                        }
                    }
                    Action::SavePeerCache => self.save_peer_cache(),
                }
            }
            // Every join is reported at once above, so there is always a timer.
            let Some(at) = m.poll_timeout() else {
                tracing::error!("DHT maintenance has nothing scheduled: stopping");
                return;
            };
            tokio::time::sleep_until(dht.clock + at).await;
            if m.is_joined() {
                let external = self.external_addrs();
                if external != last_external {
                    last_external = external;
                    m.addresses_changed();
                }
            }
            let now = dht.now();
            m.handle_timeout(now, &dht.routing());
        }
    }
}
