//! PCP, the Port Control Protocol (RFC 6887): NAT-PMP's successor on the
//! same UDP port, and the one port-mapping protocol that also opens IPv6
//! firewall pinholes.
//!
//! reach needs two opcodes: MAP (create, renew or, with lifetime 0, delete
//! a mapping; an IPv6 pinhole is a MAP with an IPv6 client address) and
//! ANNOUNCE (an empty request that tells whether a PCP server is there, and
//! the message a restarted server multicasts). Addresses are 128-bit on the
//! wire; IPv4 travels IPv4-mapped (`::ffff:a.b.c.d`, §5) and is decoded
//! back to [`IpAddr::V4`].
//!
//! Every response carries the server's epoch time (§8.5; see
//! [`super::lifecycle::EpochTracker`]) and, for MAP, the 12-byte nonce of
//! the request it answers: [`MapResponse::answers`] is how a client tells
//! its own mapping from a forged or stale reply. Options are skipped by
//! their length, at most [`MAX_OPTIONS`] of them, and must not overrun the
//! message. Responses from the network are untrusted: every malformed one
//! is a typed [`DecodeError`], never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use super::{DecodeError, Protocol, Reader, check_len};

/// The PCP version (RFC 6887 §7: 2; version 1 was never deployed, 0 is
/// NAT-PMP).
pub const VERSION: u8 = 2;
/// The R bit of the second byte: set in responses (§7.1).
pub const RESPONSE_BIT: u8 = 0x80;
/// Opcode of ANNOUNCE (§14.1).
pub const OP_ANNOUNCE: u8 = 0;
/// Opcode of MAP (§11).
pub const OP_MAP: u8 = 1;
/// Length of the common request and response headers (§7.1, §7.2).
pub const HEADER_LEN: usize = 24;
/// Length of MAP's opcode-specific data, in requests and responses (§11.1).
pub const MAP_DATA_LEN: usize = 36;
/// Length of a MAP request or response without options.
pub const MAP_LEN: usize = HEADER_LEN + MAP_DATA_LEN;
/// Length of the mapping nonce (§11.1: 96 bits).
pub const NONCE_LEN: usize = 12;
/// Length of an option's header: code, reserved, length (§7.3).
pub const OPTION_HEADER_LEN: usize = 4;
/// Options skipped at most in one message. reach sends none and the
/// options RFC 6887 defines (THIRD_PARTY, PREFER_FAILURE, FILTER) come
/// once each; a message with more is not a reply to us, and the bound keeps
/// the work per packet fixed whatever the router sends.
pub const MAX_OPTIONS: usize = 16;
/// First retransmission timeout of a request (§8.1.1: IRT = 3 s). reach's
/// lifecycle uses its own, shorter schedule (see
/// [`super::lifecycle::RETRANSMIT_INITIAL`]) because a router on the local
/// link answers within milliseconds.
pub const INITIAL_RETRANSMIT: Duration = Duration::from_secs(3);

/// The 96-bit nonce that names a mapping (§11.1); random per mapping and
/// kept across its renewals.
pub type Nonce = [u8; NONCE_LEN];

/// A PCP result code (§7.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResultCode {
    /// 0: success.
    Success,
    /// 1: the server does not speak this version.
    UnsupportedVersion,
    /// 2: the request is understood but not allowed (e.g. mapping off).
    NotAuthorized,
    /// 3: the request could not be parsed.
    MalformedRequest,
    /// 4: the server does not support this opcode.
    UnsupportedOpcode,
    /// 5: a mandatory option is not supported.
    UnsupportedOption,
    /// 6: an option is malformed.
    MalformedOption,
    /// 7: the server or the device it controls has a network failure.
    NetworkFailure,
    /// 8: the server has no resources for the request right now.
    NoResources,
    /// 9: the protocol is not supported.
    UnsupportedProtocol,
    /// 10: this client's mapping quota is used up.
    UserExceededQuota,
    /// 11: the suggested external port or address cannot be provided (only
    /// with PREFER_FAILURE, which reach does not send).
    CannotProvideExternal,
    /// 12: the client address in the request does not match the packet's
    /// source: there is another NAT between us and the server.
    AddressMismatch,
    /// 13: too many remote peers (PEER requests; not sent by reach).
    ExcessiveRemotePeers,
    /// A code RFC 6887 does not define: treated as a failure.
    Other(u8),
}

impl ResultCode {
    /// The code's number on the wire.
    pub fn to_u8(self) -> u8 {
        match self {
            ResultCode::Success => 0,
            ResultCode::UnsupportedVersion => 1,
            ResultCode::NotAuthorized => 2,
            ResultCode::MalformedRequest => 3,
            ResultCode::UnsupportedOpcode => 4,
            ResultCode::UnsupportedOption => 5,
            ResultCode::MalformedOption => 6,
            ResultCode::NetworkFailure => 7,
            ResultCode::NoResources => 8,
            ResultCode::UnsupportedProtocol => 9,
            ResultCode::UserExceededQuota => 10,
            ResultCode::CannotProvideExternal => 11,
            ResultCode::AddressMismatch => 12,
            ResultCode::ExcessiveRemotePeers => 13,
            ResultCode::Other(n) => n,
        }
    }

    /// The code with number `n`.
    pub fn from_u8(n: u8) -> ResultCode {
        match n {
            0 => ResultCode::Success,
            1 => ResultCode::UnsupportedVersion,
            2 => ResultCode::NotAuthorized,
            3 => ResultCode::MalformedRequest,
            4 => ResultCode::UnsupportedOpcode,
            5 => ResultCode::UnsupportedOption,
            6 => ResultCode::MalformedOption,
            7 => ResultCode::NetworkFailure,
            8 => ResultCode::NoResources,
            9 => ResultCode::UnsupportedProtocol,
            10 => ResultCode::UserExceededQuota,
            11 => ResultCode::CannotProvideExternal,
            12 => ResultCode::AddressMismatch,
            13 => ResultCode::ExcessiveRemotePeers,
            n => ResultCode::Other(n),
        }
    }
}

/// The opcodes reach sends (and so the responses it decodes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Opcode {
    /// ANNOUNCE (0).
    Announce,
    /// MAP (1).
    Map,
}

impl Opcode {
    /// The opcode's number (without the R bit).
    pub fn to_u8(self) -> u8 {
        match self {
            Opcode::Announce => OP_ANNOUNCE,
            Opcode::Map => OP_MAP,
        }
    }

    fn from_u8(n: u8) -> Result<Opcode, DecodeError> {
        match n {
            OP_ANNOUNCE => Ok(Opcode::Announce),
            OP_MAP => Ok(Opcode::Map),
            other => Err(DecodeError::UnknownOpcode(other)),
        }
    }
}

/// A MAP request (§11.1): create, renew or (lifetime 0) delete a mapping.
/// With an IPv6 client address it opens an IPv6 pinhole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MapRequest {
    /// Requested lifetime in seconds; 0 deletes the mapping (§15).
    pub lifetime_secs: u32,
    /// Our own address as we send from it (the server compares it with
    /// the packet's source, §8.1).
    pub client: IpAddr,
    /// Names the mapping; the same for every renewal (§11.1).
    pub nonce: Nonce,
    /// UDP or TCP.
    pub protocol: Protocol,
    /// The port on this host the mapping forwards to.
    pub internal_port: u16,
    /// The external port we would like; 0: no preference.
    pub suggested_external_port: u16,
    /// The external address we would like; the unspecified address of the
    /// client's family (`0.0.0.0` or `::`): no preference (§11.1).
    pub suggested_external_ip: IpAddr,
}

impl MapRequest {
    /// A request to map `internal_port` for `lifetime_secs`, suggesting the
    /// same external port (reach keeps ports as they are) and any external
    /// address of the client's family.
    pub fn new(
        client: IpAddr,
        nonce: Nonce,
        protocol: Protocol,
        internal_port: u16,
        lifetime_secs: u32,
    ) -> MapRequest {
        let any = match client {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        MapRequest {
            lifetime_secs,
            client,
            nonce,
            protocol,
            internal_port,
            suggested_external_port: internal_port,
            suggested_external_ip: any,
        }
    }
}

/// A PCP request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Request {
    /// ANNOUNCE (§14.1): no payload, lifetime 0. Sent to learn whether a
    /// PCP server is there (and its epoch).
    Announce {
        /// Our own address as we send from it.
        client: IpAddr,
    },
    /// MAP (§11.1).
    Map(MapRequest),
}

impl Request {
    /// The request's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAP_LEN);
        let (op, lifetime, client) = match self {
            Request::Announce { client } => (OP_ANNOUNCE, 0, *client),
            Request::Map(m) => (OP_MAP, m.lifetime_secs, m.client),
        };
        out.push(VERSION);
        out.push(op);
        out.extend_from_slice(&[0, 0]); // reserved
        out.extend_from_slice(&lifetime.to_be_bytes());
        out.extend_from_slice(&wire_ip(client));
        if let Request::Map(m) = self {
            put_map_data(
                &mut out,
                &m.nonce,
                m.protocol,
                m.internal_port,
                m.suggested_external_port,
                m.suggested_external_ip,
            );
        }
        out
    }

    /// Decodes a request (what a server, or a test server, receives).
    /// Options are skipped.
    pub fn decode(bytes: &[u8]) -> Result<Request, DecodeError> {
        check_message(bytes)?;
        let mut r = Reader::new(bytes);
        let _version = r.u8()?;
        let op = r.u8()?;
        if op & RESPONSE_BIT != 0 {
            return Err(DecodeError::WrongDirection {
                expected: "request",
            });
        }
        let opcode = Opcode::from_u8(op)?;
        let _reserved = r.u16()?;
        let lifetime_secs = r.u32()?;
        let client = read_ip(&mut r)?;
        let request = match opcode {
            Opcode::Announce => Request::Announce { client },
            Opcode::Map => {
                let d = read_map_data(&mut r)?;
                Request::Map(MapRequest {
                    lifetime_secs,
                    client,
                    nonce: d.nonce,
                    protocol: d.protocol,
                    internal_port: d.internal_port,
                    suggested_external_port: d.external.port(),
                    suggested_external_ip: d.external.ip(),
                })
            }
        };
        skip_options(&mut r)?;
        Ok(request)
    }
}

/// MAP's part of a response (§11.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MapResponse {
    /// The nonce of the request this answers.
    pub nonce: Nonce,
    /// UDP or TCP.
    pub protocol: Protocol,
    /// The internal port the mapping forwards to.
    pub internal_port: u16,
    /// The assigned external address and port (IPv4 decoded from its
    /// IPv4-mapped form, IPv6 as is).
    pub external: SocketAddr,
}

impl MapResponse {
    /// Whether this answers `request`: same nonce, protocol and internal
    /// port (§11.4, processing a MAP response: the client matches a response to its mapping by these;
    /// anything else is stale or forged and is ignored).
    pub fn answers(&self, request: &MapRequest) -> bool {
        self.nonce == request.nonce
            && self.protocol == request.protocol
            && self.internal_port == request.internal_port
    }
}

/// A PCP response (§7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Response {
    /// The request this answers.
    pub opcode: Opcode,
    /// Success, or why not.
    pub result: ResultCode,
    /// On success the granted lifetime in seconds; on an error how long
    /// the error is expected to last (§7.2, §15).
    pub lifetime_secs: u32,
    /// The server's epoch time: seconds since it (re)started (§8.5).
    pub epoch: u32,
    /// MAP's data: always there in a successful MAP response; in an error
    /// response only if the server sent it.
    pub map: Option<MapResponse>,
}

impl Response {
    /// The response's bytes (what a server sends; for test routers and
    /// round-trip tests).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAP_LEN);
        out.push(VERSION);
        out.push(RESPONSE_BIT | self.opcode.to_u8());
        out.push(0); // reserved
        out.push(self.result.to_u8());
        out.extend_from_slice(&self.lifetime_secs.to_be_bytes());
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&[0; 12]); // reserved
        if let Some(m) = &self.map {
            put_map_data(
                &mut out,
                &m.nonce,
                m.protocol,
                m.internal_port,
                m.external.port(),
                m.external.ip(),
            );
        }
        out
    }

    /// Decodes a response from the server (untrusted): checks the length
    /// rules of §7 and the R bit, skips options.
    pub fn decode(bytes: &[u8]) -> Result<Response, DecodeError> {
        check_message(bytes)?;
        let mut r = Reader::new(bytes);
        let _version = r.u8()?;
        let op = r.u8()?;
        if op & RESPONSE_BIT == 0 {
            return Err(DecodeError::WrongDirection {
                expected: "response",
            });
        }
        let opcode = Opcode::from_u8(op & !RESPONSE_BIT)?;
        let _reserved = r.u8()?;
        let result = ResultCode::from_u8(r.u8()?);
        let lifetime_secs = r.u32()?;
        let epoch = r.u32()?;
        let _reserved = r.take::<12>()?;
        let has_map_data =
            opcode == Opcode::Map && (result == ResultCode::Success || bytes.len() >= MAP_LEN);
        let map = if has_map_data {
            let d = read_map_data(&mut r)?;
            Some(MapResponse {
                nonce: d.nonce,
                protocol: d.protocol,
                internal_port: d.internal_port,
                external: d.external,
            })
        } else {
            None
        };
        skip_options(&mut r)?;
        Ok(Response {
            opcode,
            result,
            lifetime_secs,
            epoch,
            map,
        })
    }
}

/// §7 and §8.3: a message shorter than the header, longer than
/// [`super::MAX_MESSAGE_LEN`] or not a multiple of 4 bytes is invalid. The
/// version is checked first: a NAT-PMP router answers a PCP request with a
/// short version-0 reply (RFC 6887 §9), and the caller must learn that it
/// speaks NAT-PMP, not merely that the reply was short.
fn check_message(bytes: &[u8]) -> Result<(), DecodeError> {
    check_len(bytes)?;
    if let Some(&version) = bytes.first()
        && version != VERSION
    {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Truncated {
            needed: HEADER_LEN,
            had: bytes.len(),
        });
    }
    if !bytes.len().is_multiple_of(4) {
        return Err(DecodeError::NotMultipleOf4(bytes.len()));
    }
    Ok(())
}

/// An address as PCP carries it: IPv6, or IPv4-mapped IPv6 (§5).
fn wire_ip(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Reads a 128-bit address; an IPv4-mapped one comes back as IPv4.
fn read_ip(r: &mut Reader<'_>) -> Result<IpAddr, DecodeError> {
    let v6 = Ipv6Addr::from(r.take::<16>()?);
    Ok(match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    })
}

fn put_map_data(
    out: &mut Vec<u8>,
    nonce: &Nonce,
    protocol: Protocol,
    internal_port: u16,
    external_port: u16,
    external_ip: IpAddr,
) {
    out.extend_from_slice(nonce);
    out.push(protocol.iana_number());
    out.extend_from_slice(&[0; 3]); // reserved
    out.extend_from_slice(&internal_port.to_be_bytes());
    out.extend_from_slice(&external_port.to_be_bytes());
    out.extend_from_slice(&wire_ip(external_ip));
}

/// MAP's opcode-specific data, as read.
struct MapData {
    nonce: Nonce,
    protocol: Protocol,
    internal_port: u16,
    external: SocketAddr,
}

fn read_map_data(r: &mut Reader<'_>) -> Result<MapData, DecodeError> {
    let nonce = r.take::<NONCE_LEN>()?;
    let number = r.u8()?;
    let protocol =
        Protocol::from_iana_number(number).ok_or(DecodeError::UnknownProtocol(number))?;
    let _reserved = r.take::<3>()?;
    let internal_port = r.u16()?;
    let external_port = r.u16()?;
    let ip = read_ip(r)?;
    Ok(MapData {
        nonce,
        protocol,
        internal_port,
        external: SocketAddr::new(ip, external_port),
    })
}

/// Skips the options after the opcode-specific data (§7.3): each is a
/// 4-byte header and `length` bytes of data padded to a multiple of 4. An
/// option running past the end of the message, or more than
/// [`MAX_OPTIONS`], is an error.
fn skip_options(r: &mut Reader<'_>) -> Result<(), DecodeError> {
    let mut count = 0;
    while !r.is_empty() {
        count += 1;
        if count > MAX_OPTIONS {
            return Err(DecodeError::TooManyOptions);
        }
        let at = r.at;
        let header = r
            .take::<OPTION_HEADER_LEN>()
            .map_err(|_| DecodeError::MalformedOption { at })?;
        let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        let padded = len.div_ceil(4) * 4;
        r.skip(padded)
            .map_err(|_| DecodeError::MalformedOption { at })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nat::portmap::MAX_MESSAGE_LEN;

    const NONCE: Nonce = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[10] = 0xff;
        out[11] = 0xff;
        out[12..].copy_from_slice(&a);
        out
    }

    /// A MAP response for 192.168.1.10 ↦ 203.0.113.7:50000, built byte by
    /// byte from the figures of §7.2 and §11.1.
    fn map_response_bytes() -> Vec<u8> {
        let mut b = vec![
            2,    // Version = 2
            0x81, // R = 1, Opcode = MAP
            0,    // Reserved
            0,    // Result Code = SUCCESS
        ];
        b.extend_from_slice(&3600u32.to_be_bytes()); // Lifetime
        b.extend_from_slice(&1234u32.to_be_bytes()); // Epoch Time
        b.extend_from_slice(&[0; 12]); // Reserved (96 bits)
        b.extend_from_slice(&NONCE); // Mapping Nonce
        b.extend_from_slice(&[17, 0, 0, 0]); // Protocol = UDP, Reserved
        b.extend_from_slice(&4433u16.to_be_bytes()); // Internal Port
        b.extend_from_slice(&50000u16.to_be_bytes()); // Assigned External Port
        b.extend_from_slice(&v4_mapped([203, 0, 113, 7])); // Assigned External IP
        b
    }

    #[test]
    fn map_request_layout() {
        // §7.1 common header, then §11.1 MAP data.
        let req = MapRequest::new(
            IpAddr::V4(Ipv4Addr::new(192, 168, 1, 10)),
            NONCE,
            Protocol::Udp,
            4433,
            7200,
        );
        let bytes = Request::Map(req).encode();
        let mut want = vec![2, 1, 0, 0]; // Version, R = 0 | MAP, Reserved
        want.extend_from_slice(&7200u32.to_be_bytes()); // Requested Lifetime
        want.extend_from_slice(&v4_mapped([192, 168, 1, 10])); // Client IP
        want.extend_from_slice(&NONCE);
        want.extend_from_slice(&[17, 0, 0, 0]);
        want.extend_from_slice(&4433u16.to_be_bytes()); // Internal Port
        want.extend_from_slice(&4433u16.to_be_bytes()); // Suggested External Port
        // No preference: the IPv4-mapped all-zeros address (§11.1).
        want.extend_from_slice(&v4_mapped([0, 0, 0, 0]));
        assert_eq!(bytes, want);
        assert_eq!(bytes.len(), MAP_LEN);
        assert_eq!(Request::decode(&bytes), Ok(Request::Map(req)));
    }

    #[test]
    fn ipv6_pinhole_is_map_with_an_ipv6_client() {
        let client: IpAddr = "2001:db8::10".parse().unwrap();
        let req = MapRequest::new(client, NONCE, Protocol::Tcp, 4433, 600);
        let bytes = Request::Map(req).encode();
        let ip: Ipv6Addr = "2001:db8::10".parse().unwrap();
        assert_eq!(&bytes[8..24], &ip.octets());
        assert_eq!(bytes[36], 6, "TCP is protocol 6");
        // No preference for IPv6 is `::` (§11.1).
        assert_eq!(&bytes[44..60], &[0; 16]);
        assert_eq!(Request::decode(&bytes), Ok(Request::Map(req)));
        // And the response's IPv6 external address decodes as IPv6.
        let mut resp = map_response_bytes();
        resp[36] = 6;
        resp[44..60].copy_from_slice(&ip.octets());
        let r = Response::decode(&resp).unwrap();
        let m = r.map.unwrap();
        assert_eq!(m.external, SocketAddr::new(IpAddr::V6(ip), 50000));
        assert!(m.answers(&req));
    }

    #[test]
    fn delete_is_lifetime_zero() {
        // §15: a MAP request with Requested Lifetime 0 deletes the mapping.
        let req = MapRequest::new(
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
            NONCE,
            Protocol::Udp,
            4433,
            0,
        );
        assert_eq!(&Request::Map(req).encode()[4..8], &[0, 0, 0, 0]);
    }

    #[test]
    fn announce_request_layout() {
        // §14.1: ANNOUNCE has no opcode-specific data; lifetime 0.
        let client = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        let bytes = Request::Announce { client }.encode();
        assert_eq!(bytes.len(), HEADER_LEN);
        assert_eq!(&bytes[..8], &[2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&bytes[8..], &v4_mapped([10, 0, 0, 2]));
        assert_eq!(Request::decode(&bytes), Ok(Request::Announce { client }));
    }

    #[test]
    fn map_response_decodes_and_matches_its_request() {
        let bytes = map_response_bytes();
        let r = Response::decode(&bytes).unwrap();
        assert_eq!(r.opcode, Opcode::Map);
        assert_eq!(r.result, ResultCode::Success);
        assert_eq!(r.lifetime_secs, 3600);
        assert_eq!(r.epoch, 1234);
        let m = r.map.unwrap();
        assert_eq!(m.external, "203.0.113.7:50000".parse().unwrap());
        assert_eq!(r.encode(), bytes);

        let client = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 10));
        let ours = MapRequest::new(client, NONCE, Protocol::Udp, 4433, 3600);
        assert!(m.answers(&ours));
        let mut other_nonce = ours;
        other_nonce.nonce[0] ^= 1;
        assert!(!m.answers(&other_nonce), "another mapping's nonce");
        let tcp = MapRequest::new(client, NONCE, Protocol::Tcp, 4433, 3600);
        assert!(!m.answers(&tcp), "same nonce, other protocol");
        let port = MapRequest::new(client, NONCE, Protocol::Udp, 4434, 3600);
        assert!(!m.answers(&port), "same nonce, other internal port");
    }

    #[test]
    fn options_are_skipped_by_their_padded_length() {
        let mut bytes = map_response_bytes();
        // §7.3: code, reserved, length 5 → 5 data bytes + 3 padding.
        bytes.extend_from_slice(&[3, 0, 0, 5, 1, 2, 3, 4, 5, 0, 0, 0]);
        // A zero-length option.
        bytes.extend_from_slice(&[1, 0, 0, 0]);
        let r = Response::decode(&bytes).unwrap();
        assert_eq!(r.map.unwrap().internal_port, 4433);

        // An option whose length runs past the message.
        let mut overrun = map_response_bytes();
        overrun.extend_from_slice(&[3, 0, 0, 9, 1, 2, 3, 4]);
        assert_eq!(
            Response::decode(&overrun),
            Err(DecodeError::MalformedOption { at: MAP_LEN })
        );
        // More options than the bound.
        let mut many = map_response_bytes();
        for _ in 0..=MAX_OPTIONS {
            many.extend_from_slice(&[1, 0, 0, 0]);
        }
        assert_eq!(Response::decode(&many), Err(DecodeError::TooManyOptions));
    }

    #[test]
    fn error_responses_are_typed() {
        // A NOT_AUTHORIZED answer with only the common header: no MAP data.
        let mut bytes = map_response_bytes();
        bytes[3] = 2;
        let header_only = &bytes[..HEADER_LEN];
        let r = Response::decode(header_only).unwrap();
        assert_eq!(r.result, ResultCode::NotAuthorized);
        assert_eq!(r.map, None);
        // The same with the request's MAP data copied back.
        let r = Response::decode(&bytes).unwrap();
        assert_eq!(r.result, ResultCode::NotAuthorized);
        assert!(r.map.is_some());
        for n in 0..=13u8 {
            assert_eq!(ResultCode::from_u8(n).to_u8(), n);
            assert_ne!(ResultCode::from_u8(n), ResultCode::Other(n));
        }
        assert_eq!(ResultCode::from_u8(200), ResultCode::Other(200));
    }

    #[test]
    fn malformed_responses_are_typed_errors() {
        let good = map_response_bytes();
        assert_eq!(
            Response::decode(&good[..20]),
            Err(DecodeError::Truncated {
                needed: HEADER_LEN,
                had: 20
            })
        );
        // A successful MAP response without its data.
        assert_eq!(
            Response::decode(&good[..HEADER_LEN]),
            Err(DecodeError::Truncated {
                needed: HEADER_LEN + NONCE_LEN,
                had: HEADER_LEN
            })
        );
        assert_eq!(
            Response::decode(&good[..30]),
            Err(DecodeError::NotMultipleOf4(30))
        );
        let mut long = good.clone();
        long.resize(MAX_MESSAGE_LEN + 4, 0);
        assert_eq!(
            Response::decode(&long),
            Err(DecodeError::TooLong(MAX_MESSAGE_LEN + 4))
        );
        // A NAT-PMP router answering a PCP MAP request with its 8-byte
        // "unsupported version" reply (RFC 6886 §3.5): version 0, opcode
        // 128 + 1, result 1, epoch.
        assert_eq!(
            Response::decode(&[0, 129, 0, 1, 0, 0, 0, 7]),
            Err(DecodeError::UnsupportedVersion(0))
        );
        let mut natpmp = good.clone();
        natpmp[0] = 0;
        assert_eq!(
            Response::decode(&natpmp),
            Err(DecodeError::UnsupportedVersion(0))
        );
        // R bit clear: our own request reflected.
        let mut request = good.clone();
        request[1] = OP_MAP;
        assert_eq!(
            Response::decode(&request),
            Err(DecodeError::WrongDirection {
                expected: "response"
            })
        );
        // PEER (2) is never sent, so no PEER response is expected.
        let mut peer = good.clone();
        peer[1] = RESPONSE_BIT | 2;
        assert_eq!(Response::decode(&peer), Err(DecodeError::UnknownOpcode(2)));
        // Protocol 0 ("all protocols") is not one reach maps.
        let mut all = good.clone();
        all[36] = 0;
        assert_eq!(Response::decode(&all), Err(DecodeError::UnknownProtocol(0)));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn decode_never_panics_and_round_trips(
                bytes in proptest::collection::vec(any::<u8>(), 0..256)
            ) {
                if let Ok(r) = Response::decode(&bytes) {
                    prop_assert_eq!(Response::decode(&r.encode()), Ok(r));
                }
                if let Ok(r) = Request::decode(&bytes) {
                    prop_assert_eq!(Request::decode(&r.encode()), Ok(r));
                }
            }

            #[test]
            fn well_formed_headers_with_random_tails_never_panic(
                tail in proptest::collection::vec(any::<u8>(), 0..128),
                result in any::<u8>(),
            ) {
                let mut bytes = map_response_bytes();
                bytes[3] = result;
                bytes.truncate(HEADER_LEN);
                bytes.extend_from_slice(&tail);
                let _ = Response::decode(&bytes);
            }

            #[test]
            fn map_requests_round_trip(
                v6 in any::<bool>(),
                addr in any::<[u8; 16]>(),
                nonce in any::<[u8; 12]>(),
                internal_port in any::<u16>(),
                lifetime_secs in any::<u32>(),
            ) {
                let client = if v6 {
                    IpAddr::V6(Ipv6Addr::from(addr))
                } else {
                    IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
                };
                let req = Request::Map(MapRequest::new(
                    client, nonce, Protocol::Udp, internal_port, lifetime_secs,
                ));
                let decoded = Request::decode(&req.encode()).unwrap();
                // An IPv6 address that happens to be IPv4-mapped comes
                // back as IPv4; everything else unchanged.
                if let (Request::Map(d), Request::Map(r)) = (decoded, req) {
                    prop_assert_eq!(d.nonce, r.nonce);
                    prop_assert_eq!(d.internal_port, r.internal_port);
                    prop_assert_eq!(d.lifetime_secs, r.lifetime_secs);
                    prop_assert_eq!(wire_ip(d.client), wire_ip(r.client));
                } else {
                    prop_assert!(false, "decoded to another kind");
                }
            }
        }
    }
}
