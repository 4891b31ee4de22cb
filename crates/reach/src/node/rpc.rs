//! One request and its answer on a bidirectional stream: how reach's own
//! protocols (DHT, relay signalling, filter probes) talk, written once.
//!
//! The asker opens a stream, writes one framed envelope and finishes its
//! side; the server reads it (the router did), writes one framed envelope
//! back and finishes. Both envelopes are small control envelopes
//! ([`MAX_CONTROL_ENVELOPE_LEN`]); a larger answer is an error, not an
//! allocation.

use reach_proto::wire::envelope::{Body, Envelope, MAX_CONTROL_ENVELOPE_LEN};
use reach_proto::wire::{FRAME_HEADER_LEN, WireError};

/// Why a call failed: the stream (the peer or the path), or what the peer
/// sent.
#[derive(Debug)]
pub(crate) enum CallError {
    /// Opening, writing or reading the stream failed.
    Stream(String),
    /// The answer was not a valid envelope.
    Wire(WireError),
}

impl CallError {
    /// The node error for this failure: stream failures in the caller's
    /// own variant (`Error::Rpc`, `Error::Relay`, …), bad answers as
    /// [`crate::Error::Wire`].
    pub fn into_error(self, stream: impl FnOnce(String) -> crate::Error) -> crate::Error {
        match self {
            CallError::Stream(reason) => stream(reason),
            CallError::Wire(e) => crate::Error::Wire(e),
        }
    }
}

fn stream_failed(e: impl std::fmt::Display) -> CallError {
    CallError::Stream(e.to_string())
}

/// Sends `request` on a new stream of `conn` and returns the answer's body.
pub(crate) async fn call(conn: &quinn::Connection, request: Body) -> Result<Body, CallError> {
    let frame = Envelope::new(request).to_frame().map_err(CallError::Wire)?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(stream_failed)?;
    send.write_all(&frame).await.map_err(stream_failed)?;
    send.finish().map_err(stream_failed)?;
    let bytes = recv
        .read_to_end(MAX_CONTROL_ENVELOPE_LEN + FRAME_HEADER_LEN)
        .await
        .map_err(stream_failed)?;
    Envelope::from_frame(&bytes, MAX_CONTROL_ENVELOPE_LEN)
        .map(|e| e.body)
        .map_err(CallError::Wire)
}

/// Sends `request` on a new stream of `conn` when no answer is expected.
pub(crate) async fn tell(conn: &quinn::Connection, request: Body) -> Result<(), CallError> {
    let frame = Envelope::new(request).to_frame().map_err(CallError::Wire)?;
    let (mut send, _recv) = conn.open_bi().await.map_err(stream_failed)?;
    send.write_all(&frame).await.map_err(stream_failed)?;
    send.finish().map_err(stream_failed)
}

/// Writes the answer to a request and finishes the stream. Best effort:
/// an asker that went away needs no answer.
pub(crate) async fn answer(send: &mut quinn::SendStream, response: Body) {
    if let Ok(frame) = Envelope::new(response).to_frame() {
        let _ = send.write_all(&frame).await;
        let _ = send.finish();
    }
}
