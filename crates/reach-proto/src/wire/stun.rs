//! A minimal STUN codec (RFC 8489): Binding requests and responses.
//!
//! Enough for a node to learn its reflexive address from any STUN server and
//! to answer Binding requests itself: the 20-byte header, XOR-MAPPED-ADDRESS
//! (and the legacy MAPPED-ADDRESS when reading). Other attributes are
//! skipped when reading and never written.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::WireError;
use super::datagram::{STUN_HEADER_LEN, STUN_MAGIC_COOKIE};

/// Binding request message type.
pub const BINDING_REQUEST: u16 = 0x0001;
/// Binding success response message type.
pub const BINDING_SUCCESS: u16 = 0x0101;
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// Largest STUN message read: attributes beyond this are not ours to care
/// about, and a bound keeps parsing cheap.
pub const MAX_STUN_LEN: usize = 1280;

/// A 96-bit transaction id.
pub type TransactionId = [u8; 12];

/// A decoded STUN message (only what reach uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StunMessage {
    /// Method and class bits of the header (e.g. Binding request or success
    /// response).
    pub method_class: u16,
    /// Matches a response to its request.
    pub transaction: TransactionId,
    /// The mapped address, if the message carried one.
    pub mapped: Option<SocketAddr>,
}

/// Encodes a Binding request.
pub fn binding_request(transaction: TransactionId) -> Vec<u8> {
    let mut out = Vec::with_capacity(STUN_HEADER_LEN);
    out.extend_from_slice(&BINDING_REQUEST.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&STUN_MAGIC_COOKIE);
    out.extend_from_slice(&transaction);
    out
}

/// Encodes a Binding success response carrying XOR-MAPPED-ADDRESS.
pub fn binding_response(transaction: TransactionId, mapped: SocketAddr) -> Vec<u8> {
    let mut attr = Vec::new();
    let xport = mapped.port() ^ u16::from_be_bytes([STUN_MAGIC_COOKIE[0], STUN_MAGIC_COOKIE[1]]);
    match mapped.ip() {
        IpAddr::V4(v4) => {
            attr.extend_from_slice(&[0, 0x01]);
            attr.extend_from_slice(&xport.to_be_bytes());
            for (i, b) in v4.octets().iter().enumerate() {
                attr.push(b ^ STUN_MAGIC_COOKIE[i]);
            }
        }
        IpAddr::V6(v6) => {
            attr.extend_from_slice(&[0, 0x02]);
            attr.extend_from_slice(&xport.to_be_bytes());
            let mut key = STUN_MAGIC_COOKIE.to_vec();
            key.extend_from_slice(&transaction);
            for (i, b) in v6.octets().iter().enumerate() {
                attr.push(b ^ key[i]);
            }
        }
    }
    let mut out = Vec::with_capacity(STUN_HEADER_LEN + 4 + attr.len());
    out.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
    out.extend_from_slice(&((4 + attr.len()) as u16).to_be_bytes());
    out.extend_from_slice(&STUN_MAGIC_COOKIE);
    out.extend_from_slice(&transaction);
    out.extend_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    out.extend_from_slice(&(attr.len() as u16).to_be_bytes());
    out.extend_from_slice(&attr);
    out
}

fn truncated(needed: usize, had: usize) -> WireError {
    WireError::Truncated { needed, had }
}

/// Decodes a STUN message from untrusted bytes.
pub fn decode(bytes: &[u8]) -> Result<StunMessage, WireError> {
    if bytes.len() > MAX_STUN_LEN {
        return Err(WireError::TooLarge {
            len: bytes.len(),
            max: MAX_STUN_LEN,
        });
    }
    if bytes.len() < STUN_HEADER_LEN {
        return Err(truncated(STUN_HEADER_LEN, bytes.len()));
    }
    if bytes[0] & 0xC0 != 0 || bytes[4..8] != STUN_MAGIC_COOKIE {
        return Err(WireError::BadMagic);
    }
    let method_class = u16::from_be_bytes([bytes[0], bytes[1]]);
    let len = usize::from(u16::from_be_bytes([bytes[2], bytes[3]]));
    if len % 4 != 0 {
        return Err(WireError::Malformed(
            "STUN length not a multiple of 4".into(),
        ));
    }
    if bytes.len() < STUN_HEADER_LEN + len {
        return Err(truncated(STUN_HEADER_LEN + len, bytes.len()));
    }
    let mut transaction = [0u8; 12];
    transaction.copy_from_slice(&bytes[8..20]);
    let mut attrs = &bytes[STUN_HEADER_LEN..STUN_HEADER_LEN + len];
    let mut mapped = None;
    let mut xor_mapped = None;
    while !attrs.is_empty() {
        if attrs.len() < 4 {
            return Err(truncated(4, attrs.len()));
        }
        let ty = u16::from_be_bytes([attrs[0], attrs[1]]);
        let alen = usize::from(u16::from_be_bytes([attrs[2], attrs[3]]));
        let padded = alen.div_ceil(4) * 4;
        if attrs.len() < 4 + padded {
            return Err(truncated(4 + padded, attrs.len()));
        }
        let value = &attrs[4..4 + alen];
        match ty {
            ATTR_XOR_MAPPED_ADDRESS => xor_mapped = Some(parse_address(value, true, &transaction)?),
            ATTR_MAPPED_ADDRESS => mapped = Some(parse_address(value, false, &transaction)?),
            _ => {}
        }
        attrs = &attrs[4 + padded..];
    }
    Ok(StunMessage {
        method_class,
        transaction,
        mapped: xor_mapped.or(mapped),
    })
}

fn parse_address(v: &[u8], xor: bool, tx: &TransactionId) -> Result<SocketAddr, WireError> {
    let bad = || WireError::Malformed("bad STUN address attribute".into());
    if v.len() < 4 {
        return Err(bad());
    }
    let mut port = u16::from_be_bytes([v[2], v[3]]);
    if xor {
        port ^= u16::from_be_bytes([STUN_MAGIC_COOKIE[0], STUN_MAGIC_COOKIE[1]]);
    }
    let mut key = STUN_MAGIC_COOKIE.to_vec();
    key.extend_from_slice(tx);
    let ip = match (v[1], v.len()) {
        (0x01, 8) => {
            let mut o = [0u8; 4];
            for i in 0..4 {
                o[i] = if xor { v[4 + i] ^ key[i] } else { v[4 + i] };
            }
            IpAddr::V4(Ipv4Addr::from(o))
        }
        (0x02, 20) => {
            let mut o = [0u8; 16];
            for i in 0..16 {
                o[i] = if xor { v[4 + i] ^ key[i] } else { v[4 + i] };
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return Err(bad()),
    };
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::datagram::{DatagramKind, classify};
    use proptest::prelude::*;

    #[test]
    fn request_and_response_round_trip() {
        let tx = [7u8; 12];
        let req = binding_request(tx);
        assert_eq!(classify(&req), DatagramKind::Stun);
        let m = decode(&req).unwrap();
        assert_eq!(m.method_class, BINDING_REQUEST);
        assert_eq!(m.mapped, None);
        for addr in ["203.0.113.9:61000", "[2001:db8::7]:443"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let resp = binding_response(tx, addr);
            assert_eq!(classify(&resp), DatagramKind::Stun);
            let m = decode(&resp).unwrap();
            assert_eq!(m.method_class, BINDING_SUCCESS);
            assert_eq!(m.transaction, tx);
            assert_eq!(m.mapped, Some(addr));
        }
    }

    #[test]
    fn decodes_a_known_rfc5769_style_response() {
        // XOR-MAPPED-ADDRESS for 192.0.2.1:32853 (RFC 5769 §2.2 values).
        let tx = [
            0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
        ];
        let mut msg = vec![0x01, 0x01, 0x00, 0x0c, 0x21, 0x12, 0xa4, 0x42];
        msg.extend_from_slice(&tx);
        msg.extend_from_slice(&[
            0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43,
        ]);
        let m = decode(&msg).unwrap();
        assert_eq!(m.mapped, Some("192.0.2.1:32853".parse().unwrap()));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
            let mut with_header = binding_request([1; 12]);
            with_header[2..4].copy_from_slice(&((bytes.len() as u16) & !3).to_be_bytes());
            with_header.extend_from_slice(&bytes);
            let _ = decode(&with_header);
        }
    }
}
