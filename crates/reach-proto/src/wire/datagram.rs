//! Non-QUIC datagrams on the shared UDP socket.
//!
//! QUIC, STUN and reach's control packets share one socket, so that the NAT
//! mapping a probe or punch opens is the mapping QUIC then uses. They are told
//! apart by the first byte (RFC 9443 multiplexing):
//! - QUIC always sets the "fixed bit" 0x40 (reach disables QUIC bit greasing,
//!   so a conforming peer never clears it towards us);
//! - STUN starts with two zero bits and carries the magic cookie at bytes 4..8;
//! - reach control packets start with [`CONTROL_MAGIC`], whose first byte
//!   (0x08) lies in the range RFC 7983 leaves unassigned;
//! - relayed packets start with [`RELAY_MAGIC`] (first byte 0x09, also
//!   unassigned), then an 8-byte circuit id, then the end-to-end QUIC packet
//!   the relay forwards without being able to read it.
//!
//! Anything else is [`DatagramKind::Unknown`] and is dropped.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::WireError;

/// The first bytes of every reach control packet.
pub const CONTROL_MAGIC: [u8; 4] = [0x08, b'R', b'C', b'H'];
/// The first bytes of every relayed packet.
pub const RELAY_MAGIC: [u8; 4] = [0x09, b'R', b'L', b'Y'];
/// Relay frame header: magic plus the big-endian circuit id.
pub const RELAY_HEADER_LEN: usize = RELAY_MAGIC.len() + 8;
/// Version of the control-packet format, the byte after the magic.
pub const CONTROL_VERSION: u8 = 1;
/// Largest control packet sent or accepted: below the 1200-byte minimum path
/// MTU QUIC assumes, so a control packet is never fragmented.
pub const MAX_CONTROL_PACKET_LEN: usize = 1200;
/// Every probe request is padded to this size. A reply is never larger than
/// its request, so a spoofed request cannot turn a node into an amplifier.
pub const PROBE_REQUEST_LEN: usize = 64;
/// How long a prober waits for a reply before sending the probe again.
pub const PROBE_RETRY_AFTER: Duration = Duration::from_millis(500);
/// Probe attempts before giving up: UDP may lose a packet or two, and four
/// attempts turn 10% loss per direction into a ~0.1% failure rate.
pub const PROBE_ATTEMPTS: u32 = 4;
/// The STUN magic cookie (RFC 8489 §5).
pub const STUN_MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
/// Size of a STUN header.
pub const STUN_HEADER_LEN: usize = 20;
/// The QUIC fixed bit (RFC 9000 §17).
const QUIC_FIXED_BIT: u8 = 0x40;

/// What a datagram on the shared socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramKind {
    /// A QUIC packet (fixed bit set): handed to quinn.
    Quic,
    /// A STUN message (magic cookie at its place).
    Stun,
    /// One of reach's own [`ControlPacket`]s (reach magic).
    Control,
    /// A packet of a relay circuit (see [`relay_frame`]).
    Relay,
    /// Anything else: dropped.
    Unknown,
}

/// Classifies a datagram by its first bytes. Never reads past `bytes`.
pub fn classify(bytes: &[u8]) -> DatagramKind {
    let Some(&first) = bytes.first() else {
        return DatagramKind::Unknown;
    };
    if first & QUIC_FIXED_BIT != 0 {
        return DatagramKind::Quic;
    }
    if bytes.len() >= STUN_HEADER_LEN && first & 0xC0 == 0 && bytes[4..8] == STUN_MAGIC_COOKIE {
        return DatagramKind::Stun;
    }
    if bytes.starts_with(&CONTROL_MAGIC) {
        return DatagramKind::Control;
    }
    if bytes.len() > RELAY_HEADER_LEN && bytes.starts_with(&RELAY_MAGIC) {
        return DatagramKind::Relay;
    }
    DatagramKind::Unknown
}

/// The header of a relayed packet on circuit `circuit`; the payload follows.
pub fn relay_header(circuit: u64) -> [u8; RELAY_HEADER_LEN] {
    let mut h = [0u8; RELAY_HEADER_LEN];
    h[..RELAY_MAGIC.len()].copy_from_slice(&RELAY_MAGIC);
    h[RELAY_MAGIC.len()..].copy_from_slice(&circuit.to_be_bytes());
    h
}

/// Splits a relayed packet into circuit id and payload; `None` if `bytes` is
/// not one (wrong magic, or no payload).
pub fn relay_frame(bytes: &[u8]) -> Option<(u64, &[u8])> {
    if bytes.len() <= RELAY_HEADER_LEN || !bytes.starts_with(&RELAY_MAGIC) {
        return None;
    }
    let (head, payload) = bytes.split_at(RELAY_HEADER_LEN);
    let id: [u8; 8] = head[RELAY_MAGIC.len()..].try_into().ok()?;
    Some((u64::from_be_bytes(id), payload))
}

/// IPs a filter test may ask the helper to avoid at most.
pub const MAX_FILTER_EXCLUDES: usize = 8;

/// Who should send the unsolicited probe of a filter test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FilterVia {
    /// The helper itself, from a port we never sent to.
    OtherPort,
    /// A peer of the helper at an IP we never sent to.
    OtherHost,
    /// The helper itself, from a port we never sent to, to this port at
    /// the IP it sees the request come from: checks that a port mapping
    /// on our router forwards (the probe arrives only through it). The
    /// target's IP is always the requester's own, so nobody can aim
    /// probes at a third party.
    MappedPort(u16),
}

/// reach's own non-QUIC packets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlPacket {
    /// "Which address do you see me at?" Padded to [`PROBE_REQUEST_LEN`].
    Probe {
        /// Random; the reply echoes it so a forged reply is not believed.
        nonce: u64,
    },
    /// The answer: the source address the probe arrived from.
    ProbeReply {
        /// The probe's nonce.
        nonce: u64,
        /// The source address the probe came from, as the helper saw it.
        observed: SocketAddr,
    },
    /// "Send an unsolicited [`ControlPacket::FilterProbe`] to the address
    /// you see this packet come from", either from another port of the
    /// helper or from a peer of the helper at an IP not in `exclude` (the
    /// helper asks that peer over their authenticated QUIC connection:
    /// `Body::FilterProbeRequest`).
    /// Padded to [`PROBE_REQUEST_LEN`].
    FilterTest {
        /// Random; the filter probe carries it back.
        nonce: u64,
        /// Who sends the unsolicited probe.
        via: FilterVia,
        /// IPs the requester already sent to (its NAT would let their probe in
        /// anyway): a peer at one of them must not be picked.
        exclude: Vec<std::net::IpAddr>,
    },
    /// The unsolicited probe itself.
    FilterProbe {
        /// The nonce of the [`ControlPacket::FilterTest`] it answers.
        nonce: u64,
    },
    /// A hole-punching packet of punch `id` (the token the coordinator gave
    /// both peers): opens our NAT towards the peer, and tells the peer where
    /// our packets come from.
    Punch {
        /// The punch's token from the coordinator.
        id: u64,
    },
    /// "Your punch `id` reached me" (sent back to where it came from).
    PunchAck {
        /// The token of the punch that arrived.
        id: u64,
    },
}

impl ControlPacket {
    /// Requests are padded so that no reply is larger than its request.
    fn is_request(&self) -> bool {
        matches!(
            self,
            ControlPacket::Probe { .. } | ControlPacket::FilterTest { .. }
        )
    }
}

impl ControlPacket {
    /// Encodes the packet with magic and version; probes are zero-padded to
    /// [`PROBE_REQUEST_LEN`].
    pub fn encode(&self) -> Vec<u8> {
        let mut out = CONTROL_MAGIC.to_vec();
        out.push(CONTROL_VERSION);
        // Serialising these fixed-shape enums into a Vec cannot fail.
        let mut out = postcard::to_extend(self, out).expect("control packet encoding");
        if self.is_request() && out.len() < PROBE_REQUEST_LEN {
            // Padding goes after the body; the decoder accepts trailing
            // zeros only after requests (see `decode`).
            out.resize(PROBE_REQUEST_LEN, 0);
        }
        out
    }

    /// Decodes a control packet from untrusted bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() > MAX_CONTROL_PACKET_LEN {
            return Err(WireError::TooLarge {
                len: bytes.len(),
                max: MAX_CONTROL_PACKET_LEN,
            });
        }
        let rest = bytes
            .strip_prefix(&CONTROL_MAGIC)
            .ok_or(WireError::BadMagic)?;
        let (&version, body) = rest.split_first().ok_or(WireError::Truncated {
            needed: CONTROL_MAGIC.len() + 1,
            had: bytes.len(),
        })?;
        if version != CONTROL_VERSION {
            return Err(WireError::UnsupportedVersion(version));
        }
        let (packet, tail): (ControlPacket, _) =
            postcard::take_from_bytes(body).map_err(|e| WireError::Malformed(e.to_string()))?;
        if let ControlPacket::FilterTest { exclude, .. } = &packet
            && exclude.len() > MAX_FILTER_EXCLUDES
        {
            return Err(WireError::TooLarge {
                len: exclude.len(),
                max: MAX_FILTER_EXCLUDES,
            });
        }
        let padding_ok = packet.is_request() && tail.iter().all(|&b| b == 0);
        if !tail.is_empty() && !padding_ok {
            return Err(WireError::TrailingBytes(tail.len()));
        }
        Ok(packet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn classifies_each_kind() {
        assert_eq!(classify(&[]), DatagramKind::Unknown);
        // QUIC short header and long header.
        assert_eq!(classify(&[0x40, 1, 2]), DatagramKind::Quic);
        assert_eq!(classify(&[0xC3, 0, 0, 0, 1]), DatagramKind::Quic);
        let mut stun = vec![0u8, 1, 0, 0];
        stun.extend_from_slice(&STUN_MAGIC_COOKIE);
        stun.extend_from_slice(&[7; 12]);
        assert_eq!(classify(&stun), DatagramKind::Stun);
        // Right cookie, too short for a STUN header.
        assert_eq!(classify(&stun[..19]), DatagramKind::Unknown);
        let probe = ControlPacket::Probe { nonce: 1 }.encode();
        assert_eq!(classify(&probe), DatagramKind::Control);
        assert_eq!(classify(b"\x00garbage"), DatagramKind::Unknown);
        let mut relayed = relay_header(7).to_vec();
        relayed.push(0x40);
        assert_eq!(classify(&relayed), DatagramKind::Relay);
        // A header without payload is nothing.
        assert_eq!(
            classify(&relayed[..RELAY_HEADER_LEN]),
            DatagramKind::Unknown
        );
    }

    #[test]
    fn relay_frames_round_trip() {
        let mut bytes = relay_header(u64::MAX - 3).to_vec();
        bytes.extend_from_slice(b"quic");
        assert_eq!(relay_frame(&bytes), Some((u64::MAX - 3, &b"quic"[..])));
        assert_eq!(relay_frame(&bytes[..RELAY_HEADER_LEN]), None);
        assert_eq!(relay_frame(b"\x09RLX0000000000payload"), None);
    }

    #[test]
    fn probe_is_padded_and_reply_is_never_larger() {
        let probe = ControlPacket::Probe { nonce: u64::MAX }.encode();
        assert_eq!(probe.len(), PROBE_REQUEST_LEN);
        let v6: SocketAddr = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
            .parse()
            .unwrap();
        let reply = ControlPacket::ProbeReply {
            nonce: u64::MAX,
            observed: v6,
        }
        .encode();
        assert!(
            reply.len() <= probe.len(),
            "{} > {}",
            reply.len(),
            probe.len()
        );
    }

    #[test]
    fn filter_packets_round_trip_and_replies_stay_small() {
        let req = ControlPacket::FilterTest {
            nonce: 9,
            via: FilterVia::OtherHost,
            exclude: vec!["203.0.113.10".parse().unwrap()],
        };
        let bytes = req.encode();
        assert!(bytes.len() >= PROBE_REQUEST_LEN);
        assert_eq!(ControlPacket::decode(&bytes), Ok(req));
        let probe = ControlPacket::FilterProbe { nonce: u64::MAX }.encode();
        assert!(probe.len() <= PROBE_REQUEST_LEN);
        let too_many = ControlPacket::FilterTest {
            nonce: 1,
            via: FilterVia::OtherPort,
            exclude: vec!["203.0.113.10".parse().unwrap(); MAX_FILTER_EXCLUDES + 1],
        };
        assert!(ControlPacket::decode(&too_many.encode()).is_err());
    }

    #[test]
    fn round_trips_and_rejects_bad_headers() {
        let p = ControlPacket::ProbeReply {
            nonce: 42,
            observed: "198.51.100.7:4433".parse().unwrap(),
        };
        let bytes = p.encode();
        assert_eq!(ControlPacket::decode(&bytes), Ok(p));
        let mut wrong_version = bytes.clone();
        wrong_version[4] = 2;
        assert_eq!(
            ControlPacket::decode(&wrong_version),
            Err(WireError::UnsupportedVersion(2))
        );
        assert_eq!(ControlPacket::decode(b"nope"), Err(WireError::BadMagic));
        let mut trailing = bytes;
        trailing.push(0);
        assert_eq!(
            ControlPacket::decode(&trailing),
            Err(WireError::TrailingBytes(1))
        );
        let huge = vec![0u8; MAX_CONTROL_PACKET_LEN + 1];
        assert!(matches!(
            ControlPacket::decode(&huge),
            Err(WireError::TooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn decode_and_classify_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1300)) {
            let _ = classify(&bytes);
            let _ = ControlPacket::decode(&bytes);
            let _ = relay_frame(&bytes);
        }

        #[test]
        fn decode_never_panics_after_valid_magic(tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut bytes = CONTROL_MAGIC.to_vec();
            bytes.push(CONTROL_VERSION);
            bytes.extend(tail);
            let _ = ControlPacket::decode(&bytes);
        }
    }
}
