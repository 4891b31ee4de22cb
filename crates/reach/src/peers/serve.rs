//! Accepting connections and serving what peers send on them.

use std::sync::Arc;

use reach_proto::PeerId;
use reach_proto::wire::envelope::{Envelope, MAX_CONTROL_ENVELOPE_LEN};
use reach_proto::wire::{FRAME_HEADER_LEN, frame};

use super::{Closed, Peers, Registered};
use crate::node::router::STREAM_HEADER_TIMEOUT;
use crate::node::{Direction, codes, limits, stats};
use crate::tls;

/// Accepts incoming connections until the endpoint closes. Each attempt
/// must first get a slot from the node's [`limits::InboundGate`]; one over
/// a limit is refused before any handshake work.
pub(crate) async fn accept_loop(peers: Arc<Peers>) {
    while let Some(incoming) = peers.core.endpoint.accept().await {
        let remote = incoming.remote_address();
        if !incoming.remote_address_validated() && peers.gate.handshakes_crowded() {
            // Under a handshake flood: make the source prove its address
            // first (costs an honest dialer one round trip).
            stats::bump(&peers.core.counters.inbound_retried);
            if let Err(e) = incoming.retry() {
                e.into_incoming().ignore();
            }
            continue;
        }
        // A TCP link counts as its TCP peer's address: one host cannot
        // open unbounded connections through one link.
        let source = peers.core.real_source(remote);
        let mut slot = match peers.gate.admit(source.unwrap_or(remote), source.is_none()) {
            Ok(slot) => slot,
            Err(why) => {
                stats::bump(&peers.core.counters.inbound_refused);
                tracing::trace!(%remote, ?why, "inbound connection refused");
                incoming.refuse();
                continue;
            }
        };
        let peers2 = peers.clone();
        peers.core.spawn(async move {
            let handshake = async {
                let connecting = incoming.accept()?;
                tokio::pin!(connecting);
                loop {
                    match tokio::time::timeout(limits::HANDSHAKE_TIMEOUT, &mut connecting).await {
                        Ok(done) => return done.map(Some),
                        // A slow handshake gives its slot up only when
                        // others need the slots; else QUIC's own timeouts
                        // decide (an overloaded but honest node must not
                        // abort handshakes its dialers already completed).
                        Err(_) if peers2.gate.handshakes_crowded() => return Ok(None),
                        Err(_) => continue,
                    }
                }
            };
            let conn = match handshake.await {
                Ok(Some(c)) => c,
                Ok(None) => {
                    stats::bump(&peers2.core.counters.inbound_handshake_failures);
                    tracing::debug!(%remote, "inbound handshake timed out");
                    return;
                }
                Err(e) => {
                    stats::bump(&peers2.core.counters.inbound_handshake_failures);
                    tracing::debug!(error = %e, "inbound handshake failed");
                    return;
                }
            };
            slot.handshake_done();
            let Some(peer) = remote_peer_id(&conn) else {
                stats::bump(&peers2.core.counters.inbound_handshake_failures);
                conn.close(codes::MALFORMED.into(), b"no identity");
                return;
            };
            stats::bump(&peers2.core.counters.connections_inbound);
            peers2.register_slot(peer, conn, Direction::Inbound, Some(slot));
        });
    }
}

/// The authenticated identity of the remote end of `conn`.
pub(crate) fn remote_peer_id(conn: &quinn::Connection) -> Option<PeerId> {
    let identity = conn.peer_identity()?;
    let certs = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    tls::peer_id_from_cert(certs.first()?).ok()
}

impl Peers {
    /// Records `conn` as the connection to `peer` and starts serving it.
    pub(crate) fn register(
        self: &Arc<Self>,
        peer: PeerId,
        conn: quinn::Connection,
        dir: Direction,
    ) {
        self.register_slot(peer, conn, dir, None)
    }

    /// [`Peers::register`], for an inbound connection holding `slot` until
    /// it closes.
    fn register_slot(
        self: &Arc<Self>,
        peer: PeerId,
        conn: quinn::Connection,
        dir: Direction,
        slot: Option<limits::Slot>,
    ) {
        if dir == Direction::Inbound && !crate::vaddr::is_virtual(&conn.remote_address()) {
            // The address an inbound connection came from is a way back.
            self.table.remember_fallback(peer, conn.remote_address());
        }
        let in_use = self.table.insert(peer, conn.clone(), dir);
        tracing::debug!(%peer, addr = %conn.remote_address(), ?dir, in_use, "connected");
        let registered = Registered {
            peer,
            conn: &conn,
            direction: dir,
            in_use,
        };
        self.each_observer(|o| o.registered(&registered));
        self.report_path(peer);
        self.core.spawn(serve(self.clone(), peer, conn, slot));
    }
}

/// Whether `conn` has carried a stream or a datagram, either way.
fn carried_traffic(conn: &quinn::Connection) -> bool {
    let s = conn.stats();
    s.frame_rx.stream + s.frame_tx.stream + s.frame_rx.datagram + s.frame_tx.datagram > 0
}

/// Serves the streams a peer opens on one connection until it closes. An
/// inbound direct connection (`slot` held) that carries nothing within the
/// silent timeout while its address is crowded is closed (see
/// [`limits::SILENT_CONNECTION_TIMEOUT`]).
async fn serve(
    peers: Arc<Peers>,
    peer: PeerId,
    conn: quinn::Connection,
    slot: Option<limits::Slot>,
) {
    let mut watch_silence =
        slot.is_some() && peers.core.real_source(conn.remote_address()).is_some();
    let silent = tokio::time::sleep(peers.gate.limits().silent_timeout);
    tokio::pin!(silent);
    loop {
        tokio::select! {
            _ = &mut silent, if watch_silence => {
                if carried_traffic(&conn) {
                    watch_silence = false;
                } else if slot.as_ref().is_some_and(|s| s.under_pressure()) {
                    watch_silence = false;
                    stats::bump(&peers.core.counters.silent_connections_closed);
                    conn.close(codes::SILENT.into(), b"silent");
                } else {
                    // Look again later: pressure may come.
                    let period = peers.gate.limits().silent_timeout;
                    silent.as_mut().reset(tokio::time::Instant::now() + period);
                }
            },
            uni = conn.accept_uni() => match uni {
                Ok(s) => match peers.hooks.uni.get() {
                    Some(handler) => peers.core.spawn(handler(peer, s)),
                    None => drop(s),
                },
                Err(_) => break,
            },
            bi = conn.accept_bi() => match bi {
                Ok((send, recv)) => peers.core.spawn(receive_stream(peers.clone(), peer, conn.remote_address(), send, recv)),
                Err(_) => break,
            },
        }
    }
    let standby_took_over = peers.table.remove_if_current(peer, conn.stable_id());
    let none_left = peers.table.live(&peer).is_none();
    peers.each_observer(|o| {
        o.closed(&Closed {
            peer,
            standby_took_over,
            none_left,
        })
    });
    if none_left && slot.is_some() {
        // An inbound peer that never used its connection for anything of
        // the application's leaves no entry behind.
        peers.table.forget_if_unused(&peer);
    }
    drop(slot);
    peers.report_path(peer);
    tracing::debug!(%peer, reason = ?conn.close_reason(), "disconnected");
}

/// Reads the header of a bidirectional stream and hands the stream to its
/// protocol's handler (see [`crate::node::router`]).
async fn receive_stream(
    peers: Arc<Peers>,
    peer: PeerId,
    remote: std::net::SocketAddr,
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let header = tokio::time::timeout(STREAM_HEADER_TIMEOUT, read_control_frame(&mut recv)).await;
    let head = match header {
        Ok(Some(Ok(head))) => head,
        // A newer node's kind of stream: refused like an unknown protocol.
        Ok(Some(Err(reach_proto::wire::WireError::UnknownBody(_)))) => {
            return crate::node::router::refuse(&peers.core.counters, send, recv);
        }
        _ => {
            stats::bump(&peers.core.counters.malformed_streams);
            let _ = recv.stop(codes::MALFORMED.into());
            return;
        }
    };
    let router = peers.core.router.clone();
    router
        .dispatch(
            &peers.core.counters,
            crate::node::router::Inbound {
                peer,
                remote,
                head,
                send,
                recv,
            },
            |peer| peers.table.touch(&peer, true),
        )
        .await;
}

/// Reads one small framed envelope (at most [`MAX_CONTROL_ENVELOPE_LEN`]):
/// `None` when the stream ended or failed first, else what decoding said.
async fn read_control_frame(
    recv: &mut quinn::RecvStream,
) -> Option<std::result::Result<Envelope, reach_proto::wire::WireError>> {
    let mut head = [0u8; FRAME_HEADER_LEN];
    recv.read_exact(&mut head).await.ok()?;
    let len = match frame::parse_header(&head, MAX_CONTROL_ENVELOPE_LEN) {
        Ok(len) => len,
        Err(e) => return Some(Err(e)),
    };
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.ok()?;
    Some(Envelope::decode(&body))
}
