//! The one versioned envelope for reach's own protocols on QUIC streams.
//!
//! Every reach stream starts with a framed [`Envelope`]. The first byte of the
//! body is the wire version; the rest is a postcard-encoded [`Body`]. Keeping
//! the version outside the postcard body means a future version can change
//! the body's shape entirely and still be told apart.
//!
//! **Versions are negotiable, not an exact match.** [`Body`] only grows at
//! the end, and each body is sent with the oldest version that knows it
//! ([`Body::version`]): a version-2 node still understands every version-2
//! body a newer node sends, and a body it does not know fails with the
//! typed [`WireError::UnknownBody`], which a receiver answers by refusing
//! that one stream, not the connection. Versions below
//! [`MIN_WIRE_VERSION`] are refused.
//!
//! **Protocols.** Each stream a peer opens belongs to one protocol, named
//! by [`Body::protocol`]: reach's own (the [`protocols`] names, carried as
//! their historic body kinds) or any application protocol
//! ([`Body::Open`]), which nodes route to whoever registered that name.

use serde::{Deserialize, Serialize};

use super::{WireError, decode_exact, frame};
use crate::dht::rpc::{DhtRequestMsg, DhtResponseMsg};
use crate::relay::rpc::{RelayRequest, RelayResponse};

/// The newest wire version this build speaks.
pub const WIRE_VERSION: u8 = 3;
/// The oldest wire version this build still accepts: version 2 is the
/// one nodes before protocol routing spoke.
pub const MIN_WIRE_VERSION: u8 = 2;
/// The version of every body kind that predates [`Body::Open`].
const V2: u8 = 2;

/// Longest protocol name: room for a reverse-DNS name and a version,
/// small enough to bound what a stream header costs.
pub const MAX_PROTOCOL_NAME_LEN: usize = 64;

/// Names of reach's own stream protocols, as the router knows them.
pub mod protocols {
    /// DHT requests ([`super::Body::DhtRequest`]).
    pub const DHT: &str = "reach/dht";
    /// Relay signalling ([`super::Body::RelayRequest`]).
    pub const RELAY: &str = "reach/relay";
    /// Filter-probe requests ([`super::Body::FilterProbeRequest`]).
    pub const FILTER_PROBE: &str = "reach/filter-probe";
    /// `Node::open_stream`'s application streams ([`super::Body::OpenStream`]).
    pub const STREAM: &str = "reach/stream";
    /// Durable messages ([`crate::outbox::DurableFrame`]s after an
    /// [`super::Body::Open`] header).
    pub const OUTBOX: &str = "reach/outbox/1";
    /// Topic federation links between homes (the runtime's topic frames
    /// after an [`super::Body::Open`] header).
    pub const TOPICS_FED: &str = "reach/topics/fed/1";
    /// A topic member's stream to its home.
    pub const TOPICS_MEMBER: &str = "reach/topics/member/1";
    /// reach's own protocols that are opened by name (their streams carry
    /// frames of their own after the header, not envelope bodies).
    pub const OPENED_BY_NAME: &[&str] = &[OUTBOX, TOPICS_FED, TOPICS_MEMBER];
    /// The prefix reserved for reach's own protocols.
    pub const RESERVED_PREFIX: &str = "reach/";
}

/// Why a protocol name is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolNameError {
    #[error("empty protocol name")]
    /// The name has no characters.
    Empty,
    #[error("protocol name of {0} bytes exceeds {MAX_PROTOCOL_NAME_LEN}")]
    /// The name is longer than [`MAX_PROTOCOL_NAME_LEN`] bytes (its length).
    TooLong(usize),
    #[error("protocol names are printable ASCII without spaces")]
    /// The name has a space, a control or a non-ASCII character.
    NotPrintable,
    #[error("the prefix \"reach/\" is reserved for reach's own protocols")]
    /// The name starts with `reach/`, kept for reach's own protocols.
    Reserved,
}

/// Checks an application protocol name: 1 to [`MAX_PROTOCOL_NAME_LEN`]
/// bytes of printable ASCII without spaces (e.g. `myapp/chat/1`), not
/// starting with [`protocols::RESERVED_PREFIX`].
pub fn check_protocol_name(name: &str) -> Result<(), ProtocolNameError> {
    if name.is_empty() {
        return Err(ProtocolNameError::Empty);
    }
    if name.len() > MAX_PROTOCOL_NAME_LEN {
        return Err(ProtocolNameError::TooLong(name.len()));
    }
    if !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ProtocolNameError::NotPrintable);
    }
    if name.starts_with(protocols::RESERVED_PREFIX) {
        return Err(ProtocolNameError::Reserved);
    }
    Ok(())
}

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
    Message {
        /// The sender's random message id (deduplication across connections).
        id: u64,
        /// The application's bytes.
        data: Vec<u8>,
    },
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
        /// The probe's nonce, echoed so the requester can match it.
        nonce: u64,
        /// Where the probe goes: the requester as the helper saw it.
        target: std::net::SocketAddr,
    },
    /// Header of a bidirectional stream of an application protocol
    /// (version 3). The receiver answers one [`OPEN_ACCEPTED`] byte when a
    /// handler took the stream; raw protocol bytes follow either way. A
    /// node without a handler resets the stream with its "unknown
    /// protocol" code.
    Open {
        /// The application protocol's name (see [`check_protocol_name`]).
        protocol: String,
    },
}

/// The byte a receiver writes when it routed a [`Body::Open`] stream to a
/// handler.
pub const OPEN_ACCEPTED: u8 = 0;

/// Number of [`Body`] kinds this build knows: a larger variant index is a
/// newer node's body ([`WireError::UnknownBody`]).
const BODY_KINDS: u64 = 8;

impl Body {
    /// The oldest wire version that knows this body: what it is sent with.
    pub fn version(&self) -> u8 {
        match self {
            Body::Open { .. } => 3,
            _ => V2,
        }
    }

    /// The protocol a stream starting with this body belongs to; `None` for
    /// bodies that never start a stream a peer opens (answers, and an
    /// `Open` naming one of reach's own protocols).
    pub fn protocol(&self) -> Option<&str> {
        match self {
            Body::OpenStream => Some(protocols::STREAM),
            Body::DhtRequest(_) => Some(protocols::DHT),
            Body::RelayRequest(_) => Some(protocols::RELAY),
            Body::FilterProbeRequest { .. } => Some(protocols::FILTER_PROBE),
            // Reach's own protocols are opened by name only when they are
            // made for it (OPENED_BY_NAME): a peer that tries another gets
            // the answer of an unknown protocol, not a built-in handler fed
            // a body it does not speak.
            Body::Open { protocol } if protocols::OPENED_BY_NAME.contains(&protocol.as_str()) => {
                Some(protocol)
            }
            Body::Open { protocol } if protocol.starts_with(protocols::RESERVED_PREFIX) => None,
            Body::Open { protocol } => Some(protocol),
            Body::Message { .. } | Body::DhtResponse(_) | Body::RelayResponse(_) => None,
        }
    }
}

/// The LEB128 varint at the start of `bytes`, if complete and at most 64
/// bits.
fn leading_varint(bytes: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    for (i, b) in bytes.iter().take(10).enumerate() {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// A versioned body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The wire version the sender framed this body with.
    pub version: u8,
    /// What the stream carries.
    pub body: Body,
}

impl Envelope {
    /// An envelope of the oldest version that knows `body` (see the module
    /// docs: older nodes keep understanding what they know).
    pub fn new(body: Body) -> Self {
        Envelope {
            version: body.version(),
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
        let mut body_head = vec![V2, MESSAGE_VARIANT];
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
        if version < MIN_WIRE_VERSION {
            return Err(WireError::UnsupportedVersion(version));
        }
        // A newer node's body kind is told apart from garbage: the variant
        // index is postcard's leading varint.
        if let Some(variant) = leading_varint(rest)
            && variant >= BODY_KINDS
        {
            return Err(WireError::UnknownBody(variant));
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

    #[test]
    fn an_open_naming_a_reserved_protocol_routes_nowhere() {
        let open = |p: &str| Body::Open {
            protocol: p.to_string(),
        };
        assert_eq!(open("chat/1").protocol(), Some("chat/1"));
        assert_eq!(open(protocols::DHT).protocol(), None);
        assert_eq!(open("reach/anything").protocol(), None);
        assert_eq!(Body::OpenStream.protocol(), Some(protocols::STREAM));
    }
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
    fn versions_older_than_the_minimum_are_refused_typed() {
        let mut f = Envelope::new(Body::OpenStream).to_frame().unwrap();
        f[4] = 1;
        assert_eq!(
            Envelope::from_frame(&f, MAX_FRAME_LEN),
            Err(WireError::UnsupportedVersion(1))
        );
    }

    #[test]
    fn old_bodies_keep_version_2_and_open_is_version_3() {
        // A version-2 node compares the version byte exactly: every body
        // it knows must still arrive as version 2.
        let f = Envelope::new(Body::OpenStream).to_frame().unwrap();
        assert_eq!(f[4], 2);
        let open = Body::Open {
            protocol: "chat/1".into(),
        };
        let f = Envelope::new(open.clone()).to_frame().unwrap();
        assert_eq!(f[4], 3);
        let env = Envelope::from_frame(&f, MAX_FRAME_LEN).unwrap();
        assert_eq!(env.body, open);
        assert_eq!(env.body.protocol(), Some("chat/1"));
    }

    #[test]
    fn a_newer_nodes_body_is_understood_when_known_and_typed_when_not() {
        // Version 9 carrying a body this build knows: understood.
        let mut f = Envelope::new(Body::OpenStream).to_frame().unwrap();
        f[4] = 9;
        assert_eq!(
            Envelope::from_frame(&f, MAX_FRAME_LEN).unwrap().body,
            Body::OpenStream
        );
        // A body kind from the future: typed, not "malformed".
        assert_eq!(
            Envelope::decode(&[9, 8, 1, 2, 3]),
            Err(WireError::UnknownBody(8))
        );
        assert_eq!(
            Envelope::decode(&[3, 0x80, 0x01]),
            Err(WireError::UnknownBody(128))
        );
    }

    #[test]
    fn protocol_names_are_checked() {
        assert_eq!(check_protocol_name("myapp/chat/1"), Ok(()));
        assert_eq!(check_protocol_name(""), Err(ProtocolNameError::Empty));
        assert_eq!(
            check_protocol_name(&"x".repeat(MAX_PROTOCOL_NAME_LEN + 1)),
            Err(ProtocolNameError::TooLong(MAX_PROTOCOL_NAME_LEN + 1))
        );
        assert_eq!(
            check_protocol_name("my app"),
            Err(ProtocolNameError::NotPrintable)
        );
        assert_eq!(
            check_protocol_name("é"),
            Err(ProtocolNameError::NotPrintable)
        );
        assert_eq!(
            check_protocol_name("reach/dht"),
            Err(ProtocolNameError::Reserved)
        );
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let env = Envelope::new(Body::OpenStream);
        let mut body = vec![env.version];
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
