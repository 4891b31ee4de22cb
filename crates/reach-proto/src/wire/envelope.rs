//! The one versioned envelope for reach's own protocols on QUIC streams.
//!
//! Every reach stream starts with a framed [`Envelope`]. The first byte of the
//! body is the wire version; the rest is a postcard-encoded [`Body`]. Keeping
//! the version outside the postcard body means a future version can change
//! the body's shape entirely and still be told apart.

use serde::{Deserialize, Serialize};

use super::{WireError, decode_exact, frame};
use crate::dht::rpc::{DhtRequestMsg, DhtResponseMsg};
use crate::relay::rpc::{RelayRequest, RelayResponse};

/// The wire version this build speaks.
pub const WIRE_VERSION: u8 = 2;

/// Largest application message `Node::send` accepts, in bytes. Messages are
/// delivered whole, so the receiver must buffer one entirely: 16 MiB keeps
/// that bounded while leaving room for real payloads (files go over streams).
pub const MAX_MESSAGE_LEN: usize = 16 * 1024 * 1024;

/// Largest envelope that is not an application message (stream headers and
/// protocol messages): small, so a peer cannot make us buffer much before we
/// know what the stream is for.
pub const MAX_CONTROL_ENVELOPE_LEN: usize = 64 * 1024;

/// postcard's variant index of [`Body::Message`].
const MESSAGE_VARIANT: u8 = 0;

fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// What a stream carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// A whole application message, alone on a unidirectional stream.
    /// `id` is the sender's random message id: a message sent again over
    /// another connection (its first one died before the acknowledgement
    /// came back) is recognised and delivered once.
    Message { id: u64, data: Vec<u8> },
    /// Header of an application bidirectional stream; raw application bytes
    /// follow the frame.
    OpenStream,
    /// A DHT request, alone on a bidirectional stream; the answer comes back
    /// on the same stream as [`Body::DhtResponse`].
    DhtRequest(DhtRequestMsg),
    /// The answer to a [`Body::DhtRequest`].
    DhtResponse(DhtResponseMsg),
    /// A relay signalling request, alone on a bidirectional stream.
    RelayRequest(RelayRequest),
    /// The answer to a [`Body::RelayRequest`].
    RelayResponse(RelayResponse),
    /// Helper to one of its peers, alone on a bidirectional stream: "send an
    /// unsolicited filter probe with `nonce` to `target`" (a requester's
    /// address as the helper observed it; the other-host filtering test).
    /// Over QUIC, so nobody can make a node probe a third party by
    /// spoofing a peer's UDP source address. No answer.
    FilterProbeRequest {
        nonce: u64,
        target: std::net::SocketAddr,
    },
}

/// A versioned body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub version: u8,
    pub body: Body,
}

impl Envelope {
    /// An envelope of the current [`WIRE_VERSION`].
    pub fn new(body: Body) -> Self {
        Envelope {
            version: WIRE_VERSION,
            body,
        }
    }

    /// Encodes the envelope as one frame, ready to write to a stream.
    pub fn to_frame(&self) -> Result<Vec<u8>, WireError> {
        let body = vec![self.version];
        postcard::to_extend(&self.body, body).map_or_else(
            |e| Err(WireError::Malformed(e.to_string())),
            |b| frame::encode(&b),
        )
    }

    /// The bytes that precede a `len`-byte payload in the frame of
    /// `Envelope::new(Body::Message { id, data })`: frame header, version,
    /// variant, id and length. Lets a sender write a large message without
    /// copying it into an encoding buffer; identical to [`Self::to_frame`]'s
    /// output by construction (postcard encodes enum variants and lengths as
    /// LEB128 varints), which a test checks.
    pub fn message_prefix(len: usize, id: u64) -> Result<Vec<u8>, WireError> {
        if len > MAX_MESSAGE_LEN {
            return Err(WireError::TooLarge {
                len,
                max: MAX_MESSAGE_LEN,
            });
        }
        let mut body_head = vec![WIRE_VERSION, MESSAGE_VARIANT];
        push_varint(&mut body_head, id);
        push_varint(&mut body_head, len as u64);
        let mut out = frame::header(body_head.len() + len)?.to_vec();
        out.extend_from_slice(&body_head);
        Ok(out)
    }

    /// Decodes an envelope body (a frame without its header).
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let (&version, rest) = bytes
            .split_first()
            .ok_or(WireError::Truncated { needed: 1, had: 0 })?;
        if version != WIRE_VERSION {
            return Err(WireError::UnsupportedVersion(version));
        }
        let body = decode_exact(rest)?;
        Ok(Envelope { version, body })
    }

    /// Decodes one whole frame (header + body), as read to the end of a
    /// unidirectional stream.
    pub fn from_frame(bytes: &[u8], max: usize) -> Result<Self, WireError> {
        let (body, rest) = frame::split(bytes, max)?;
        if !rest.is_empty() {
            return Err(WireError::TrailingBytes(rest.len()));
        }
        Self::decode(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::MAX_FRAME_LEN;
    use proptest::prelude::*;

    #[test]
    fn message_round_trips() {
        let env = Envelope::new(Body::Message {
            id: 42,
            data: b"hi there".to_vec(),
        });
        let f = env.to_frame().unwrap();
        assert_eq!(Envelope::from_frame(&f, MAX_FRAME_LEN).unwrap(), env);
    }

    #[test]
    fn unknown_version_is_typed() {
        let mut f = Envelope::new(Body::OpenStream).to_frame().unwrap();
        f[4] = 9;
        assert_eq!(
            Envelope::from_frame(&f, MAX_FRAME_LEN),
            Err(WireError::UnsupportedVersion(9))
        );
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let env = Envelope::new(Body::OpenStream);
        let mut body = vec![WIRE_VERSION];
        body.extend(postcard::to_allocvec(&env.body).unwrap());
        body.push(0);
        assert_eq!(Envelope::decode(&body), Err(WireError::TrailingBytes(1)));
    }

    #[test]
    fn message_length_prefix_larger_than_input_is_an_error_not_an_allocation() {
        // Variant 0 (Message), id 1, announcing a ~4 GiB payload in 5 bytes.
        let body = [WIRE_VERSION, 0, 1, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(matches!(
            Envelope::decode(&body),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn message_prefix_matches_full_encoding() {
        for (len, id) in [0usize, 1, 127, 128, 300, 16_383, 16_384, 70_000]
            .into_iter()
            .zip([0, 1, 127, 128, u64::MAX, 99, 1 << 40, 7])
        {
            let payload = vec![7u8; len];
            let full = Envelope::new(Body::Message {
                id,
                data: payload.clone(),
            })
            .to_frame()
            .unwrap();
            let mut fast = Envelope::message_prefix(len, id).unwrap();
            fast.extend_from_slice(&payload);
            assert_eq!(fast, full, "len {len}");
        }
        assert!(Envelope::message_prefix(MAX_MESSAGE_LEN + 1, 0).is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Envelope::decode(&bytes);
            let _ = Envelope::from_frame(&bytes, MAX_FRAME_LEN);
        }

        #[test]
        fn messages_round_trip(payload in proptest::collection::vec(any::<u8>(), 0..2048), id: u64) {
            let env = Envelope::new(Body::Message { id, data: payload });
            let f = env.to_frame().unwrap();
            prop_assert_eq!(Envelope::from_frame(&f, MAX_FRAME_LEN).unwrap(), env);
        }
    }
}
