//! DHT requests over QUIC: one bidirectional stream per request.
//!
//! The requester writes one framed `Body::DhtRequest` and finishes its side;
//! the responder answers with one framed `Body::DhtResponse`. Both frames are
//! bounded by `MAX_CONTROL_ENVELOPE_LEN`.

use std::net::SocketAddr;
use std::time::Duration;

use reach_proto::PeerId;
use reach_proto::dht::Contact;
use reach_proto::dht::rpc::{DhtRequest, DhtRequestMsg, DhtResponse, DhtResponseMsg};
use reach_proto::dht::server;
use reach_proto::dht::store::Source;
use reach_proto::wire::envelope::Body;

use super::{Dht, DhtMode, unix_ms};
use crate::error::{Error, Result};
use crate::node::stats;

pub use reach_proto::dht::server::STORE_CLOSENESS_SLACK;

/// Time for one request, including dialing the peer if needed.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(3);

impl Dht {
    /// Sends `request` to `contact` and waits for the answer. Returns it with
    /// the address the answer actually came from (an existing connection may be
    /// at another address than the one a third party claimed for the contact).
    pub(crate) async fn request(
        &self,
        contact: Contact,
        request: DhtRequest,
    ) -> Result<(DhtResponseMsg, SocketAddr)> {
        let dht = self;
        stats::bump(&dht.counters.rpcs_sent);
        let res = tokio::time::timeout(RPC_TIMEOUT, self.request_inner(contact, request)).await;
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
        &self,
        contact: Contact,
        request: DhtRequest,
    ) -> Result<(DhtResponseMsg, SocketAddr)> {
        let peer = contact.peer;
        self.peers.remember_fallback(peer, contact.addr);
        let conn = self.peers.connection_known(peer, &[contact.addr]).await?;
        let msg = DhtRequestMsg {
            server_mode: self.mode == DhtMode::Server,
            request,
        };
        let answer = crate::node::rpc::call(&conn, Body::DhtRequest(msg))
            .await
            .map_err(|e| e.into_error(|reason| Error::Rpc { peer, reason }))?;
        match answer {
            Body::DhtResponse(r) => {
                let remote = conn.remote_address();
                self.observed_addr(r.observed, remote);
                Ok((r, remote))
            }
            _ => Err(Error::Rpc {
                peer,
                reason: "answered with something other than a DHT response".into(),
            }),
        }
    }

    /// Answers one DHT request from `peer`, whose packets come from `remote`.
    pub(crate) async fn serve(
        &self,
        peer: PeerId,
        remote: SocketAddr,
        msg: DhtRequestMsg,
        mut send: quinn::SendStream,
    ) {
        let dht = self;
        stats::bump(&dht.counters.rpcs_served);
        let response = if dht.mode == DhtMode::Client {
            DhtResponse::Refused {
                reason: "client_mode".into(),
            }
        } else {
            if msg.server_mode {
                dht.saw(Contact::new(peer, remote));
            }
            let source = match msg.request {
                DhtRequest::PutRecord { .. } => self.source_of(remote),
                _ => None,
            };
            // The table, then the store: never both locks at once.
            let near = server::Neighbourhood::of(&dht.routing(), &msg.request);
            server::answer(&near, &mut dht.store(), msg.request, source, unix_ms())
        };
        let reply = DhtResponseMsg {
            observed: remote,
            response,
        };
        crate::node::rpc::answer(&mut send, Body::DhtResponse(reply)).await;
    }

    /// The network a record put from `remote` counts against: a TCP-linked
    /// sender counts as its TCP peer's network; a relayed one as its relay's
    /// (circuits are bounded per peer at the relay, and publishers normally
    /// store directly).
    fn source_of(&self, remote: SocketAddr) -> Option<Source> {
        self.core
            .real_source(remote)
            .or_else(|| {
                let relay = self.relay_addr(&remote)?;
                self.core.real_source(relay)
            })
            .map(|a| Source::of(a.ip()))
    }
}
