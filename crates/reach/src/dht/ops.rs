//! Lookups: reach-proto's [`Lookup`] state machine driven with real RPCs.

use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use reach_proto::PeerId;
use reach_proto::dht::lookup::{Lookup, LookupConfig};
use reach_proto::dht::record::{RecordKind, SignedRecord, TypedAddr};
use reach_proto::dht::rpc::{DhtRequest, DhtResponse};
use reach_proto::dht::{Contact, K, Key};

use super::{Dht, unix_ms};
use crate::error::{Error, Result};
use crate::node::stats;

/// A lookup's queries may take this long (dialing a new peer included)
/// before the lookup moves on without them.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// What a lookup asks each peer.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Query {
    FindNode,
    /// Collect records of `kind`; `first` ends the lookup at the first
    /// valid one (resolving an endpoint needs one answer, not all).
    GetRecords {
        kind: RecordKind,
        first: bool,
    },
}

/// The result of a lookup.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub closest: Vec<Contact>,
    pub records: Vec<SignedRecord>,
}

impl Dht {
    /// Runs one iterative lookup for `target`.
    pub(crate) async fn lookup(&self, target: Key, query: Query) -> Outcome {
        let dht = self;
        stats::bump(&dht.counters.lookups);
        let started = std::time::Instant::now();
        let seeds = dht.routing().closest(&target, K);
        let cfg = LookupConfig {
            query_timeout: QUERY_TIMEOUT,
            ..LookupConfig::default()
        };
        let mut l = Lookup::new(target, self.core.peer_id, seeds, cfg);
        let request = match query {
            Query::FindNode => DhtRequest::FindNode { target },
            Query::GetRecords { kind, .. } => DhtRequest::GetRecords { kind, key: target },
        };
        let mut records: Vec<SignedRecord> = Vec::new();
        let mut inflight = FuturesUnordered::new();
        loop {
            for c in l.poll_queries(dht.now()) {
                let req = request.clone();
                inflight.push(async move { (c, self.request(c, req).await) });
            }
            if l.is_finished() || inflight.is_empty() {
                break;
            }
            let deadline = l
                .poll_timeout()
                .map(|t| t.saturating_sub(dht.now()))
                .unwrap_or(QUERY_TIMEOUT);
            tokio::select! {
                Some((c, res)) = inflight.next() => match res {
                    Ok((msg, remote)) => match msg.response {
                        DhtResponse::Nodes { closer } => {
                            // Record where the answer came from, not what a third
                            // party claimed.
                            dht.saw(Contact::new(c.peer, remote));
                            l.on_response(&c.peer, &closer);
                        }
                        DhtResponse::Records { records: got, closer } => {
                            dht.saw(Contact::new(c.peer, remote));
                            let now_ms = unix_ms();
                            for r in got {
                                let wanted = matches!(query, Query::GetRecords { kind, .. } if kind == r.kind);
                                if wanted && r.key == target && r.validate(now_ms).is_ok() && !records.contains(&r) {
                                    records.push(r);
                                }
                            }
                            l.on_response(&c.peer, &closer);
                            if matches!(query, Query::GetRecords { first: true, .. }) && !records.is_empty() {
                                l.finish();
                            }
                        }
                        _ => l.on_failure(&c.peer),
                    },
                    Err(_) => {
                        dht.routing().on_failure(&c.peer);
                        l.on_failure(&c.peer);
                    }
                },
                _ = tokio::time::sleep(deadline) => {
                    let mut routing = dht.routing();
                    for p in l.handle_timeout(dht.now()) {
                        routing.on_failure(&p);
                    }
                }
            }
        }
        dht.routing().mark_refreshed(&target, dht.now());
        dht.lookup_seconds.observe_since(started);
        let st = l.stats();
        tracing::debug!(
            ?target,
            hops = st.hops,
            queries = st.queries,
            failures = st.failures,
            "lookup done"
        );
        Outcome {
            closest: l.closest(),
            records,
        }
    }

    /// Stores `record` locally (when it is ours to hold too) and at the k
    /// closest nodes to its key. Returns how many remote nodes accepted it.
    pub(crate) async fn put(&self, record: SignedRecord) -> usize {
        self.put_answers(&record)
            .await
            .iter()
            .filter(|r| **r == DhtResponse::Stored)
            .count()
    }

    /// Sends `record` to the k closest nodes to its key (found by a lookup)
    /// and returns the answers of those that answered.
    pub(crate) async fn put_answers(&self, record: &SignedRecord) -> Vec<DhtResponse> {
        let out = self.lookup(record.key, Query::FindNode).await;
        let mut puts: FuturesUnordered<_> = out
            .closest
            .into_iter()
            .map(|c| {
                let req = DhtRequest::PutRecord {
                    record: record.clone(),
                };
                async move { self.request(c, req).await }
            })
            .collect();
        let mut answers = Vec::new();
        while let Some(r) = puts.next().await {
            if let Ok((m, _)) = r {
                answers.push(m.response);
            }
        }
        answers
    }

    /// Resolves `peer`'s addresses from its endpoint record: the local store
    /// first, then the DHT.
    pub(crate) async fn resolve(&self, peer: PeerId) -> Result<(SignedRecord, Vec<TypedAddr>)> {
        self.resolve_from(peer, false).await
    }

    /// Like [`Dht::resolve`], but asks the network even when a copy is stored here,
    /// and collects the answers of all the closest nodes (newest wins): for
    /// when the addresses of a stored or first-found record did not work (the
    /// peer may have changed relays since).
    pub(crate) async fn resolve_fresh(
        &self,
        peer: PeerId,
    ) -> Result<(SignedRecord, Vec<TypedAddr>)> {
        self.resolve_from(peer, true).await
    }

    async fn resolve_from(
        &self,
        peer: PeerId,
        fresh: bool,
    ) -> Result<(SignedRecord, Vec<TypedAddr>)> {
        let dht = self;
        stats::bump(&dht.counters.resolutions);
        let key = Key::for_peer(&peer);
        let now_ms = unix_ms();
        let mut candidates = dht.store().get(RecordKind::Endpoint, &key, now_ms);
        if candidates.is_empty() || fresh {
            let out = self
                .lookup(
                    key,
                    Query::GetRecords {
                        kind: RecordKind::Endpoint,
                        first: !fresh,
                    },
                )
                .await;
            candidates.extend(out.records);
        }
        let best = candidates
            .into_iter()
            .filter(|r| r.publisher == peer && r.validate(now_ms).is_ok())
            .max_by_key(|r| r.seq);
        let Some(record) = best else {
            stats::bump(&dht.counters.resolution_failures);
            return Err(Error::NotFound(peer));
        };
        let addrs = record.endpoint_addrs().map_err(|_| Error::NotFound(peer))?;
        Ok((record, addrs))
    }
}
