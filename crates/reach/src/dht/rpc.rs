//! DHT requests over QUIC: one bidirectional stream per request.
//!
//! The requester writes one framed `Body::DhtRequest` and finishes its side;
//! the responder answers with one framed `Body::DhtResponse`. Both frames are
//! bounded by `MAX_CONTROL_ENVELOPE_LEN`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use reach_proto::PeerId;
use reach_proto::dht::record::RecordError;
use reach_proto::dht::rpc::{
    DhtRequest, DhtRequestMsg, DhtResponse, DhtResponseMsg, MAX_CONTACTS_PER_RESPONSE,
    MAX_RECORD_BYTES_PER_RESPONSE, MAX_RECORDS_PER_RESPONSE,
};
use reach_proto::dht::store::{Source, among_closest};
use reach_proto::dht::{Contact, K, Key};
use reach_proto::wire::envelope::{Body, Envelope, MAX_CONTROL_ENVELOPE_LEN};

use super::{DhtMode, unix_ms};
use crate::error::{Error, Result};
use crate::node::{Inner, peers, stats};

/// Time for one request, including dialing the peer if needed.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(3);

/// Sends `request` to `contact` and waits for the answer. Returns it with
/// the address the answer actually came from (an existing connection may be
/// at another address than the one a third party claimed for the contact).
pub(crate) async fn request(
    inner: &Arc<Inner>,
    contact: Contact,
    request: DhtRequest,
) -> Result<(DhtResponseMsg, SocketAddr)> {
    let dht = &inner.dht;
    stats::bump(&dht.counters.rpcs_sent);
    let res = tokio::time::timeout(RPC_TIMEOUT, request_inner(inner, contact, request)).await;
    let res = match res {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout("DHT request")),
    };
    if res.is_err() {
        stats::bump(&dht.counters.rpcs_failed);
    }
    res
}

async fn request_inner(
    inner: &Arc<Inner>,
    contact: Contact,
    request: DhtRequest,
) -> Result<(DhtResponseMsg, SocketAddr)> {
    let peer = contact.peer;
    inner.peers.remember_fallback(peer, contact.addr);
    let conn = peers::connection_known(inner, peer, &[contact.addr]).await?;
    let fail = |e: &dyn std::fmt::Display| Error::Rpc {
        peer,
        reason: e.to_string(),
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| fail(&e))?;
    let msg = DhtRequestMsg {
        server_mode: inner.dht.mode == DhtMode::Server,
        request,
    };
    let frame = Envelope::new(Body::DhtRequest(msg)).to_frame()?;
    send.write_all(&frame).await.map_err(|e| fail(&e))?;
    send.finish().map_err(|e| fail(&e))?;
    let bytes = recv
        .read_to_end(MAX_CONTROL_ENVELOPE_LEN + reach_proto::wire::FRAME_HEADER_LEN)
        .await
        .map_err(|e| fail(&e))?;
    match Envelope::from_frame(&bytes, MAX_CONTROL_ENVELOPE_LEN)?.body {
        Body::DhtResponse(r) => {
            let remote = conn.remote_address();
            inner.observed_addr(r.observed, remote);
            Ok((r, remote))
        }
        _ => Err(fail(&"answered with something other than a DHT response")),
    }
}

/// Answers one DHT request from `peer`, whose packets come from `remote`.
pub(crate) async fn serve(
    inner: Arc<Inner>,
    peer: PeerId,
    remote: SocketAddr,
    msg: DhtRequestMsg,
    mut send: quinn::SendStream,
) {
    let dht = &inner.dht;
    stats::bump(&dht.counters.rpcs_served);
    let response = if dht.mode == DhtMode::Client {
        DhtResponse::Refused {
            reason: "client_mode".into(),
        }
    } else {
        if msg.server_mode {
            dht.saw(&inner.links, Contact::new(peer, remote));
        }
        answer(&inner, remote, msg.request)
    };
    let reply = DhtResponseMsg {
        observed: remote,
        response,
    };
    if let Ok(frame) = Envelope::new(Body::DhtResponse(reply)).to_frame() {
        let _ = send.write_all(&frame).await;
        let _ = send.finish();
    }
}

/// Whether this node is among the k closest it knows to `key` (see
/// [`reach_proto::dht::store::among_closest`]).
fn is_among_closest(inner: &Inner, key: &Key) -> bool {
    let k = STORE_CLOSENESS_SLACK * K;
    let known: Vec<Key> = inner
        .dht
        .routing()
        .closest(key, k)
        .iter()
        .map(|c| c.key())
        .collect();
    among_closest(&Key::for_peer(&inner.peer_id), key, &known, k)
}

/// A node stores a record when fewer than this many times k contacts it
/// knows are closer to the key. Its routing table holds contacts that are
/// dead or that a publisher's lookup never reached, so a strict k would
/// refuse honest stores under churn; the slack only lets a flooder place
/// records at twice as many nodes around a key.
pub const STORE_CLOSENESS_SLACK: usize = 2;

fn closer(inner: &Inner, target: &Key) -> Vec<Contact> {
    inner
        .dht
        .routing()
        .closest(target, MAX_CONTACTS_PER_RESPONSE)
}

/// The answer to `request` from a peer whose packets come from `remote`.
fn answer(inner: &Inner, remote: SocketAddr, request: DhtRequest) -> DhtResponse {
    let dht = &inner.dht;
    match request {
        DhtRequest::Ping => DhtResponse::Pong,
        DhtRequest::FindNode { target } => DhtResponse::Nodes {
            closer: closer(inner, &target),
        },
        DhtRequest::GetRecords { kind, key } => {
            let mut records = dht.store().get(kind, &key, unix_ms());
            // Newest first, then bounded by count and bytes.
            records.sort_by_key(|r| std::cmp::Reverse(r.seq));
            let mut bytes = 0;
            records.retain(|r| {
                bytes += r.payload.len() + 200;
                bytes <= MAX_RECORD_BYTES_PER_RESPONSE
            });
            records.truncate(MAX_RECORDS_PER_RESPONSE);
            DhtResponse::Records {
                records,
                closer: closer(inner, &key),
            }
        }
        DhtRequest::PutRecord { record } => {
            let stored = if is_among_closest(inner, &record.key) {
                // A TCP-linked sender counts as its TCP peer's network; a
                // relayed one as its relay's (circuits are bounded per peer
                // at the relay, and publishers normally store directly).
                let source = inner
                    .real_source(remote)
                    .or_else(|| {
                        let relay = inner.paths.path(&remote)?.relay_addr;
                        inner.real_source(relay)
                    })
                    .map(|a| Source::of(a.ip()));
                dht.store().put_from(record, source, unix_ms())
            } else {
                let e = RecordError::NotClosest;
                dht.store().count_rejection(&e);
                Err(e)
            };
            match stored {
                Ok(_) => DhtResponse::Stored,
                Err(e) => DhtResponse::Refused {
                    reason: e.kind().to_string(),
                },
            }
        }
    }
}
