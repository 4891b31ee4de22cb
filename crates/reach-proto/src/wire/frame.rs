//! Length-prefixed frames on QUIC streams.
//!
//! A frame is a 4-byte big-endian body length followed by the body. The length
//! is checked against [`MAX_FRAME_LEN`] *before* anything is allocated, so a
//! hostile peer cannot make a node reserve memory by announcing a huge frame.

use super::WireError;

/// Bytes in a frame header.
pub const FRAME_HEADER_LEN: usize = 4;

/// Largest frame body accepted: the largest application message
/// ([`crate::wire::envelope::MAX_MESSAGE_LEN`]) plus room for its envelope.
pub const MAX_FRAME_LEN: usize = super::envelope::MAX_MESSAGE_LEN + 1024;

/// Writes a frame header for a body of `len` bytes.
pub fn header(len: usize) -> Result<[u8; FRAME_HEADER_LEN], WireError> {
    if len > MAX_FRAME_LEN {
        return Err(WireError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    // MAX_FRAME_LEN < u32::MAX, so the cast is lossless.
    Ok((len as u32).to_be_bytes())
}

/// Reads a frame header and returns the body length it announces, refusing
/// lengths over `max` (which must not exceed [`MAX_FRAME_LEN`]).
pub fn parse_header(bytes: &[u8], max: usize) -> Result<usize, WireError> {
    let head: [u8; FRAME_HEADER_LEN] = bytes
        .get(..FRAME_HEADER_LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or(WireError::Truncated {
            needed: FRAME_HEADER_LEN,
            had: bytes.len(),
        })?;
    let len = u32::from_be_bytes(head) as usize;
    let max = max.min(MAX_FRAME_LEN);
    if len > max {
        return Err(WireError::TooLarge { len, max });
    }
    Ok(len)
}

/// Encodes `body` as one frame (header + body).
pub fn encode(body: &[u8]) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
    out.extend_from_slice(&header(body.len())?);
    out.extend_from_slice(body);
    Ok(out)
}

/// Splits one whole frame off the front of `bytes`, returning its body and
/// the rest.
pub fn split(bytes: &[u8], max: usize) -> Result<(&[u8], &[u8]), WireError> {
    let len = parse_header(bytes, max)?;
    let rest = &bytes[FRAME_HEADER_LEN..];
    if rest.len() < len {
        return Err(WireError::Truncated {
            needed: FRAME_HEADER_LEN + len,
            had: bytes.len(),
        });
    }
    Ok(rest.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let f = encode(b"hello").unwrap();
        let (body, rest) = split(&f, MAX_FRAME_LEN).unwrap();
        assert_eq!(body, b"hello");
        assert!(rest.is_empty());
    }

    #[test]
    fn announced_length_over_limit_is_refused_before_reading() {
        let head = (u32::MAX).to_be_bytes();
        assert!(matches!(
            parse_header(&head, MAX_FRAME_LEN),
            Err(WireError::TooLarge { .. })
        ));
        let head = 100u32.to_be_bytes();
        assert_eq!(
            parse_header(&head, 10),
            Err(WireError::TooLarge { len: 100, max: 10 })
        );
    }

    #[test]
    fn oversize_body_cannot_be_encoded() {
        assert!(matches!(
            header(MAX_FRAME_LEN + 1),
            Err(WireError::TooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn split_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64), max in 0usize..128) {
            let _ = split(&bytes, max);
        }
    }
}
