//! The protocol router: which handler serves a stream a peer opened.
//!
//! Every bidirectional stream starts with an envelope naming its protocol
//! ([`Body::protocol`]). reach's own capabilities (DHT, relay signalling,
//! filter probes, `open_stream`) register handlers here when the node is
//! built; applications register their own protocol names at any time with
//! [`crate::Node::accept_protocol`] and get the streams through a
//! [`ProtocolListener`], so several applications can share one node. A
//! stream for a protocol nobody registered is reset with
//! [`codes::UNKNOWN_PROTOCOL`]; the connection stays up.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock, Weak};

use futures::future::BoxFuture;
use reach_proto::PeerId;
use reach_proto::wire::envelope::{Body, Envelope, OPEN_ACCEPTED, check_protocol_name};
use tokio::sync::mpsc;

use super::{codes, stats};
use crate::error::{Error, Result};
use crate::events::Stream;

/// Streams of one application protocol waiting for
/// [`ProtocolListener::accept`]: beyond this, serving the peer's streams
/// waits for the application (QUIC's stream limit then slows the peer).
pub const PROTOCOL_BACKLOG: usize = 64;

/// A peer must send a new stream's header frame within this time.
pub const STREAM_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A stream a peer opened, with its header read.
pub(crate) struct Inbound {
    pub peer: PeerId,
    pub remote: SocketAddr,
    pub head: Envelope,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

/// How one of reach's own capabilities serves its streams.
///
/// The handler captures its capability's own handle (weakly: the router
/// lives in the core every capability holds).
pub(crate) type Handler = Arc<dyn Fn(Inbound) -> BoxFuture<'static, ()> + Send + Sync>;

/// A [`Handler`] that serves each stream with `serve` on capability `cap`,
/// held weakly: the router lives in the core every capability holds, so a
/// strong handle would keep a stopped node alive. Once the capability is
/// gone, its streams are dropped.
pub(crate) fn weak_handler<T, F, Fut>(cap: &Arc<T>, serve: F) -> Handler
where
    T: Send + Sync + 'static,
    F: Fn(Arc<T>, Inbound) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let cap = Arc::downgrade(cap);
    Arc::new(move |s| match cap.upgrade() {
        Some(cap) => Box::pin(serve(cap, s)),
        None => Box::pin(async {}),
    })
}

#[derive(Clone)]
enum Route {
    Builtin(Handler),
    /// An application's listener; `id` tells registrations of one name
    /// apart.
    App {
        id: u64,
        tx: mpsc::Sender<Stream>,
    },
}

/// Protocol name → handler.
#[derive(Default)]
pub(crate) struct Router {
    routes: RwLock<HashMap<String, Route>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Router {
    /// Registers one of reach's own protocols (at build time).
    pub fn register_builtin(&self, name: &'static str, handler: Handler) {
        self.write()
            .insert(name.to_string(), Route::Builtin(handler));
    }

    /// Registers an application protocol; fails if the name is invalid or
    /// already registered on this node.
    pub fn register_app(self: &Arc<Self>, name: &str) -> Result<ProtocolListener> {
        check_protocol_name(name).map_err(|reason| Error::InvalidProtocolName {
            name: name.to_string(),
            reason,
        })?;
        let mut routes = self.write();
        if let Some(Route::App { tx, .. }) = routes.get(name)
            && !tx.is_closed()
        {
            return Err(Error::ProtocolInUse {
                protocol: name.to_string(),
            });
        }
        if matches!(routes.get(name), Some(Route::Builtin(_))) {
            return Err(Error::ProtocolInUse {
                protocol: name.to_string(),
            });
        }
        let (tx, rx) = mpsc::channel(PROTOCOL_BACKLOG);
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        routes.insert(name.to_string(), Route::App { id, tx });
        Ok(ProtocolListener {
            id,
            protocol: name.to_string(),
            rx,
            router: Arc::downgrade(self),
        })
    }

    fn route(&self, name: &str) -> Option<Route> {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Route>> {
        self.routes.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands a stream whose header was read to its protocol's handler, or
    /// refuses it. `app_used` is told the peer when an application
    /// protocol takes the stream.
    pub async fn dispatch(
        &self,
        counters: &stats::Counters,
        stream: Inbound,
        app_used: impl FnOnce(PeerId),
    ) {
        let route = stream.head.body.protocol().and_then(|p| self.route(p));
        match route {
            Some(Route::Builtin(handler)) => handler(stream).await,
            Some(Route::App { tx, .. }) => {
                let Inbound {
                    peer,
                    mut send,
                    recv,
                    ..
                } = stream;
                if tx.is_closed() {
                    return refuse(counters, send, recv);
                }
                app_used(peer);
                if send.write_all(&[OPEN_ACCEPTED]).await.is_err() {
                    return;
                }
                stats::bump(&counters.protocol_streams_accepted);
                let _ = tx.send(Stream { peer, send, recv }).await;
            }
            None => refuse(counters, stream.send, stream.recv),
        }
    }
}

/// Refuses a stream of a protocol nobody here serves; the connection
/// stays up.
pub(crate) fn refuse(
    counters: &stats::Counters,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    stats::bump(&counters.protocol_streams_refused);
    let _ = send.reset(codes::UNKNOWN_PROTOCOL.into());
    let _ = recv.stop(codes::UNKNOWN_PROTOCOL.into());
}

/// The streams peers open for one application protocol; see
/// [`crate::Node::accept_protocol`]. Dropping it unregisters the protocol.
#[derive(Debug)]
pub struct ProtocolListener {
    id: u64,
    protocol: String,
    rx: mpsc::Receiver<Stream>,
    router: Weak<Router>,
}

impl ProtocolListener {
    /// The next stream a peer opened for this protocol; `None` once the
    /// node has shut down.
    pub async fn accept(&mut self) -> Option<Stream> {
        self.rx.recv().await
    }

    /// The protocol's name.
    pub fn protocol(&self) -> &str {
        &self.protocol
    }
}

impl Drop for ProtocolListener {
    fn drop(&mut self) {
        let Some(router) = self.router.upgrade() else {
            return;
        };
        let mut routes = router.write();
        // Only our own registration: a newer listener may have taken the
        // name after this one was closed.
        if let Some(Route::App { id, .. }) = routes.get(&self.protocol)
            && *id == self.id
        {
            routes.remove(&self.protocol);
        }
    }
}

/// Opens a stream of `protocol` to `peer` on `conn` and waits for the
/// peer's handler to take it. The name is not checked here: reach's own
/// capabilities open `reach/…` protocols this way; `Node::open_protocol`
/// checks an application's name first.
pub(crate) async fn open(conn: &quinn::Connection, peer: PeerId, protocol: &str) -> Result<Stream> {
    use quinn::{ReadError, ReadExactError};
    let lost = |e: &dyn std::fmt::Display| Error::ConnectionLost {
        peer,
        reason: e.to_string(),
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
    let header = Envelope::new(Body::Open {
        protocol: protocol.to_string(),
    })
    .to_frame()?;
    send.write_all(&header).await.map_err(|e| lost(&e))?;
    let unsupported = || Error::ProtocolNotSupported {
        peer,
        protocol: protocol.to_string(),
    };
    let mut answer = [0u8; 1];
    let read = tokio::time::timeout(STREAM_HEADER_TIMEOUT, recv.read_exact(&mut answer))
        .await
        .map_err(|_| Error::Timeout("waiting for the peer to accept the stream"))?;
    match read {
        Ok(()) if answer[0] == OPEN_ACCEPTED => Ok(Stream { peer, send, recv }),
        Ok(()) => Err(Error::Wire(reach_proto::wire::WireError::Malformed(
            format!("peer answered {} to a stream open", answer[0]),
        ))),
        // Reset with "unknown protocol"; a node older than protocol
        // routing ends or stops the stream as malformed.
        Err(ReadExactError::ReadError(ReadError::Reset(_)))
        | Err(ReadExactError::FinishedEarly(_)) => Err(unsupported()),
        Err(ReadExactError::ReadError(e)) => Err(lost(&e)),
    }
}
