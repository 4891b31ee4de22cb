//! Wire formats of reach.
//!
//! Two carriers exist:
//! - **QUIC streams** carry [`Envelope`]s: a version byte plus a postcard body,
//!   framed by a 4-byte big-endian length ([`frame`]).
//! - **Bare UDP datagrams** on the node's one socket carry everything that is not
//!   QUIC: STUN (recognised by its magic cookie) and reach's own small control
//!   packets ([`datagram`]).
//!
//! Every decoder here takes untrusted bytes and returns a typed [`WireError`];
//! none of them panics or allocates more than the named limits allow.

pub mod datagram;
pub mod envelope;
pub mod frame;
pub mod stun;

pub use datagram::{ControlPacket, DatagramKind, classify};
pub use envelope::{Body, Envelope, MIN_WIRE_VERSION, WIRE_VERSION};
pub use frame::{FRAME_HEADER_LEN, MAX_FRAME_LEN};

/// Why bytes from the network could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    /// A length prefix announced more bytes than a frame may hold; refused
    /// before anything is buffered.
    TooLarge {
        /// The length the frame header announced.
        len: usize,
        /// The largest frame this build accepts.
        max: usize,
    },
    #[error("truncated input: needed {needed} bytes, had {had}")]
    /// The input ended in the middle of a header or body.
    Truncated {
        /// Bytes the decoder needed to go on.
        needed: usize,
        /// Bytes there were.
        had: usize,
    },
    #[error(
        "unsupported wire version {0} (this build speaks versions {MIN_WIRE_VERSION} to {WIRE_VERSION})"
    )]
    /// The peer speaks a wire version outside this build's range.
    UnsupportedVersion(u8),
    #[error("not a reach control packet (bad magic)")]
    /// A datagram that claims to be a control packet lacks its magic bytes.
    BadMagic,
    #[error("malformed body: {0}")]
    /// The body did not decode (the decoder's message says where).
    Malformed(String),
    #[error("{0} trailing bytes after the body")]
    /// Bytes were left after a complete body: the frame is refused rather
    /// than half-read.
    TrailingBytes(usize),
    /// A body kind this build does not know: sent by a newer node. The
    /// stream is refused as an unknown protocol; the connection stays.
    #[error("unknown body kind {0} (from a newer version)")]
    UnknownBody(u64),
}

impl WireError {
    /// Stable machine-readable name of this error kind.
    pub fn kind(&self) -> &'static str {
        match self {
            WireError::TooLarge { .. } => "wire_too_large",
            WireError::Truncated { .. } => "wire_truncated",
            WireError::UnsupportedVersion(_) => "wire_unsupported_version",
            WireError::BadMagic => "wire_bad_magic",
            WireError::Malformed(_) => "wire_malformed",
            WireError::TrailingBytes(_) => "wire_trailing_bytes",
            WireError::UnknownBody(_) => "wire_unknown_body",
        }
    }
}

/// Decodes a postcard value that must consume `bytes` exactly.
pub(crate) fn decode_exact<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, WireError> {
    let (value, rest) =
        postcard::take_from_bytes(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes(rest.len()));
    }
    Ok(value)
}
