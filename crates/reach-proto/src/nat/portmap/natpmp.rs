//! NAT-PMP (RFC 6886): the older of the two port-mapping protocols that
//! share UDP port 5351, still the only one many home routers (and every
//! AirPort) speak.
//!
//! Two requests exist: "what is your external IPv4 address" (opcode 0) and
//! "map this UDP (1) or TCP (2) port for this many seconds" (lifetime 0
//! deletes). Every response carries the router's *seconds since start of
//! epoch*, which is how a client notices a router restart (§3.6; see
//! [`super::lifecycle::EpochTracker`]).
//!
//! Requests and responses are both encoded and decoded: the client encodes
//! requests and decodes responses; a test router (and the fuzz target's
//! round trip) does the reverse. Responses from the network are untrusted:
//! a short, over-long, wrong-version or wrong-opcode reply is a typed
//! [`DecodeError`], never a panic. Bytes after a complete message are
//! ignored, as RFC 6886 gives them no meaning and some routers pad.

use std::net::Ipv4Addr;
use std::time::Duration;

use super::{DecodeError, Protocol, Reader, check_len};

/// The only NAT-PMP version (RFC 6886 §3).
pub const VERSION: u8 = 0;
/// Opcode of the external-address request (§3.2).
pub const OP_EXTERNAL_ADDRESS: u8 = 0;
/// Opcode of a UDP mapping request (§3.3).
pub const OP_MAP_UDP: u8 = 1;
/// Opcode of a TCP mapping request (§3.3).
pub const OP_MAP_TCP: u8 = 2;
/// Added to the request's opcode in its response (§3: "128 + OP").
pub const RESPONSE_BIT: u8 = 128;
/// Length of the external-address request: version and opcode.
pub const EXTERNAL_ADDRESS_REQUEST_LEN: usize = 2;
/// Length of a mapping request (§3.3).
pub const MAP_REQUEST_LEN: usize = 12;
/// Length of every response's common part: version, opcode, result code,
/// seconds since start of epoch. An error response may be only this long
/// (§3.5: "Unsupported Version" replies carry nothing else).
pub const RESPONSE_HEADER_LEN: usize = 8;
/// Length of a successful external-address response (§3.2).
pub const EXTERNAL_ADDRESS_RESPONSE_LEN: usize = 12;
/// Length of a successful mapping response (§3.3).
pub const MAP_RESPONSE_LEN: usize = 16;
/// First retransmission timeout of a request (§3.1: 250 ms, doubling).
pub const INITIAL_RETRANSMIT: Duration = Duration::from_millis(250);
/// Requests sent at most before concluding the gateway does not speak
/// NAT-PMP (§3.1: the ninth attempt, after which the client has waited
/// 64 s since the eighth).
pub const MAX_ATTEMPTS: u32 = 9;
/// Mapping lifetime RFC 6886 §3.3 recommends asking for: two hours.
pub const RECOMMENDED_LIFETIME_SECS: u32 = 7200;

/// A NAT-PMP result code (§3.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResultCode {
    /// 0: the request succeeded.
    Success,
    /// 1: the router does not speak this version.
    UnsupportedVersion,
    /// 2: the router supports mapping but it is disabled (e.g. by the user).
    NotAuthorized,
    /// 3: the router has no external address yet (e.g. DHCP pending).
    NetworkFailure,
    /// 4: the router cannot create more mappings.
    OutOfResources,
    /// 5: the router does not know the opcode.
    UnsupportedOpcode,
    /// A code RFC 6886 does not define: treated as a failure.
    Other(u16),
}

impl ResultCode {
    /// The code's number on the wire.
    pub fn to_u16(self) -> u16 {
        match self {
            ResultCode::Success => 0,
            ResultCode::UnsupportedVersion => 1,
            ResultCode::NotAuthorized => 2,
            ResultCode::NetworkFailure => 3,
            ResultCode::OutOfResources => 4,
            ResultCode::UnsupportedOpcode => 5,
            ResultCode::Other(n) => n,
        }
    }

    /// The code with number `n`.
    pub fn from_u16(n: u16) -> ResultCode {
        match n {
            0 => ResultCode::Success,
            1 => ResultCode::UnsupportedVersion,
            2 => ResultCode::NotAuthorized,
            3 => ResultCode::NetworkFailure,
            4 => ResultCode::OutOfResources,
            5 => ResultCode::UnsupportedOpcode,
            n => ResultCode::Other(n),
        }
    }
}

/// Which request a message is or answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Opcode {
    /// The external-address request (0).
    ExternalAddress,
    /// A mapping request for a protocol (1: UDP, 2: TCP).
    Map(Protocol),
}

impl Opcode {
    /// The opcode's number in a request.
    pub fn to_u8(self) -> u8 {
        match self {
            Opcode::ExternalAddress => OP_EXTERNAL_ADDRESS,
            Opcode::Map(Protocol::Udp) => OP_MAP_UDP,
            Opcode::Map(Protocol::Tcp) => OP_MAP_TCP,
        }
    }

    fn from_u8(op: u8) -> Result<Opcode, DecodeError> {
        match op {
            OP_EXTERNAL_ADDRESS => Ok(Opcode::ExternalAddress),
            OP_MAP_UDP => Ok(Opcode::Map(Protocol::Udp)),
            OP_MAP_TCP => Ok(Opcode::Map(Protocol::Tcp)),
            other => Err(DecodeError::UnknownOpcode(other)),
        }
    }
}

/// A mapping request (§3.3), or a deletion when `lifetime_secs` is 0
/// (§3.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MapRequest {
    /// UDP or TCP.
    pub protocol: Protocol,
    /// The port on this host the mapping forwards to.
    pub internal_port: u16,
    /// The external port we would like (the router may pick another); 0:
    /// no preference.
    pub suggested_external_port: u16,
    /// Requested lifetime in seconds; 0 deletes the mapping.
    pub lifetime_secs: u32,
}

impl MapRequest {
    /// A request to delete the mapping of `internal_port`: lifetime 0 and
    /// suggested external port 0, as §3.4 requires.
    pub fn delete(protocol: Protocol, internal_port: u16) -> MapRequest {
        MapRequest {
            protocol,
            internal_port,
            suggested_external_port: 0,
            lifetime_secs: 0,
        }
    }
}

/// A NAT-PMP request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Request {
    /// "What is your external IPv4 address?" (§3.2).
    ExternalAddress,
    /// Create, renew or (lifetime 0) delete a mapping (§3.3, §3.4).
    Map(MapRequest),
}

impl Request {
    /// The request's bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Request::ExternalAddress => vec![VERSION, OP_EXTERNAL_ADDRESS],
            Request::Map(m) => {
                let mut out = Vec::with_capacity(MAP_REQUEST_LEN);
                out.push(VERSION);
                out.push(Opcode::Map(m.protocol).to_u8());
                out.extend_from_slice(&0u16.to_be_bytes()); // reserved
                out.extend_from_slice(&m.internal_port.to_be_bytes());
                out.extend_from_slice(&m.suggested_external_port.to_be_bytes());
                out.extend_from_slice(&m.lifetime_secs.to_be_bytes());
                out
            }
        }
    }

    /// Decodes a request (what a router, or a test router, receives).
    pub fn decode(bytes: &[u8]) -> Result<Request, DecodeError> {
        let (mut r, op) = header(bytes, false)?;
        match op {
            Opcode::ExternalAddress => Ok(Request::ExternalAddress),
            Opcode::Map(protocol) => {
                let _reserved = r.u16()?;
                Ok(Request::Map(MapRequest {
                    protocol,
                    internal_port: r.u16()?,
                    suggested_external_port: r.u16()?,
                    lifetime_secs: r.u32()?,
                }))
            }
        }
    }
}

/// Checks the length, the version and the direction (`response`: the
/// response bit set) of a message; returns its opcode and a reader at the
/// rest.
fn header(bytes: &[u8], response: bool) -> Result<(Reader<'_>, Opcode), DecodeError> {
    check_len(bytes)?;
    let mut r = Reader::new(bytes);
    let version = r.u8()?;
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let op = r.u8()?;
    if (op & RESPONSE_BIT != 0) != response {
        return Err(DecodeError::WrongDirection {
            expected: if response { "response" } else { "request" },
        });
    }
    Ok((r, Opcode::from_u8(op & !RESPONSE_BIT)?))
}

/// A successful mapping response (§3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MapResponse {
    /// UDP or TCP (from the opcode).
    pub protocol: Protocol,
    /// The router's seconds since start of epoch.
    pub epoch: u32,
    /// The internal port the mapping forwards to (it names the mapping).
    pub internal_port: u16,
    /// The external port the router assigned (0 after a deletion).
    pub external_port: u16,
    /// The lifetime the router granted, in seconds (0 after a deletion).
    pub lifetime_secs: u32,
}

/// A NAT-PMP response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Response {
    /// The router's external IPv4 address (§3.2).
    ExternalAddress {
        /// The router's seconds since start of epoch.
        epoch: u32,
        /// The router's external address.
        external: Ipv4Addr,
    },
    /// A mapping was created, renewed or deleted (§3.3, §3.4).
    Map(MapResponse),
    /// The router refused the request: `result` is never
    /// [`ResultCode::Success`]. Its other fields are undefined (§3.5), so
    /// they are not read.
    Failure {
        /// The request this answers.
        request: Opcode,
        /// Why it failed.
        result: ResultCode,
        /// The router's seconds since start of epoch.
        epoch: u32,
    },
}

impl Response {
    /// The router's seconds since start of epoch, which every response
    /// carries (§3.6).
    pub fn epoch(&self) -> u32 {
        match self {
            Response::ExternalAddress { epoch, .. } | Response::Failure { epoch, .. } => *epoch,
            Response::Map(m) => m.epoch,
        }
    }

    /// The response's bytes (what a router sends; for test routers and
    /// round-trip tests).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAP_RESPONSE_LEN);
        let (op, result, epoch) = match self {
            Response::ExternalAddress { epoch, .. } => {
                (Opcode::ExternalAddress, ResultCode::Success, *epoch)
            }
            Response::Map(m) => (Opcode::Map(m.protocol), ResultCode::Success, m.epoch),
            Response::Failure {
                request,
                result,
                epoch,
            } => (*request, *result, *epoch),
        };
        out.push(VERSION);
        out.push(RESPONSE_BIT | op.to_u8());
        out.extend_from_slice(&result.to_u16().to_be_bytes());
        out.extend_from_slice(&epoch.to_be_bytes());
        match self {
            Response::ExternalAddress { external, .. } => {
                out.extend_from_slice(&external.octets());
            }
            Response::Map(m) => {
                out.extend_from_slice(&m.internal_port.to_be_bytes());
                out.extend_from_slice(&m.external_port.to_be_bytes());
                out.extend_from_slice(&m.lifetime_secs.to_be_bytes());
            }
            Response::Failure { .. } => {}
        }
        out
    }

    /// Decodes a response from the router (untrusted).
    pub fn decode(bytes: &[u8]) -> Result<Response, DecodeError> {
        let (mut r, request) = header(bytes, true)?;
        let result = ResultCode::from_u16(r.u16()?);
        let epoch = r.u32()?;
        if result != ResultCode::Success {
            return Ok(Response::Failure {
                request,
                result,
                epoch,
            });
        }
        match request {
            Opcode::ExternalAddress => Ok(Response::ExternalAddress {
                epoch,
                external: Ipv4Addr::from(r.take::<4>()?),
            }),
            Opcode::Map(protocol) => Ok(Response::Map(MapResponse {
                protocol,
                epoch,
                internal_port: r.u16()?,
                external_port: r.u16()?,
                lifetime_secs: r.u32()?,
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nat::portmap::MAX_MESSAGE_LEN;

    // Byte layouts written from the figures of RFC 6886.

    #[test]
    fn external_address_request_is_two_bytes() {
        // §3.2: | Vers = 0 | OP = 0 |
        assert_eq!(Request::ExternalAddress.encode(), vec![0, 0]);
        assert_eq!(Request::decode(&[0, 0]), Ok(Request::ExternalAddress));
    }

    #[test]
    fn external_address_response_layout() {
        // §3.2: | Vers = 0 | OP = 128 + 0 | Result Code (16) |
        //       | Seconds Since Start of Epoch (32) |
        //       | External IPv4 Address (a.b.c.d) (32) |
        let bytes = [
            0, 128, 0, 0, // version, opcode, result 0
            0, 0, 0x0e, 0x10, // epoch 3600
            203, 0, 113, 7, // external address
        ];
        let r = Response::decode(&bytes).unwrap();
        assert_eq!(
            r,
            Response::ExternalAddress {
                epoch: 3600,
                external: Ipv4Addr::new(203, 0, 113, 7),
            }
        );
        assert_eq!(r.epoch(), 3600);
        assert_eq!(r.encode(), bytes);
    }

    #[test]
    fn map_request_layout() {
        // §3.3: | Vers = 0 | OP = x | Reserved (16) |
        //       | Internal Port | Suggested External Port |
        //       | Requested Port Mapping Lifetime in Seconds (32) |
        let req = Request::Map(MapRequest {
            protocol: Protocol::Udp,
            internal_port: 4433,
            suggested_external_port: 4433,
            lifetime_secs: 7200,
        });
        let bytes = req.encode();
        assert_eq!(
            bytes,
            vec![0, 1, 0, 0, 0x11, 0x51, 0x11, 0x51, 0, 0, 0x1c, 0x20]
        );
        assert_eq!(Request::decode(&bytes), Ok(req));
        let tcp = Request::Map(MapRequest {
            protocol: Protocol::Tcp,
            ..MapRequest::delete(Protocol::Udp, 80)
        });
        assert_eq!(tcp.encode()[1], OP_MAP_TCP);
    }

    #[test]
    fn delete_is_lifetime_zero_and_port_zero() {
        // §3.4: lifetime 0 and suggested external port 0.
        let bytes = Request::Map(MapRequest::delete(Protocol::Tcp, 4433)).encode();
        assert_eq!(bytes, vec![0, 2, 0, 0, 0x11, 0x51, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn map_response_layout() {
        // §3.3: | Vers = 0 | OP = 128 + x | Result Code |
        //       | Seconds Since Start of Epoch |
        //       | Internal Port | Mapped External Port |
        //       | Port Mapping Lifetime in Seconds |
        let bytes = [
            0, 129, 0, 0, // UDP response, success
            0, 0, 0, 42, // epoch
            0x11, 0x51, 0xc3, 0x50, // internal 4433, external 50000
            0, 0, 0x0e, 0x10, // lifetime 3600
        ];
        let r = Response::decode(&bytes).unwrap();
        assert_eq!(
            r,
            Response::Map(MapResponse {
                protocol: Protocol::Udp,
                epoch: 42,
                internal_port: 4433,
                external_port: 50000,
                lifetime_secs: 3600,
            })
        );
        assert_eq!(r.encode(), bytes);
        // Bytes after a complete response are ignored.
        let mut padded = bytes.to_vec();
        padded.extend_from_slice(&[0; 4]);
        assert_eq!(Response::decode(&padded), Ok(r));
    }

    #[test]
    fn result_codes_are_typed() {
        // §3.5: codes 0..=5, anything else is still a failure.
        for (n, code) in [
            (1, ResultCode::UnsupportedVersion),
            (2, ResultCode::NotAuthorized),
            (3, ResultCode::NetworkFailure),
            (4, ResultCode::OutOfResources),
            (5, ResultCode::UnsupportedOpcode),
            (77, ResultCode::Other(77)),
        ] {
            assert_eq!(ResultCode::from_u16(n), code);
            assert_eq!(code.to_u16(), n);
            // An error response may stop after the epoch (§3.5).
            let bytes = [0, 130, 0, n as u8, 0, 0, 0, 9];
            assert_eq!(
                Response::decode(&bytes),
                Ok(Response::Failure {
                    request: Opcode::Map(Protocol::Tcp),
                    result: code,
                    epoch: 9,
                })
            );
        }
    }

    #[test]
    fn malformed_replies_are_typed_errors() {
        assert_eq!(
            Response::decode(&[]),
            Err(DecodeError::Truncated { needed: 1, had: 0 })
        );
        // A success that stops early.
        assert_eq!(
            Response::decode(&[0, 129, 0, 0, 0, 0, 0, 1, 0x11]),
            Err(DecodeError::Truncated { needed: 10, had: 9 })
        );
        assert_eq!(
            Response::decode(&[0, 128, 0, 0, 0, 0, 0, 1, 1, 2, 3]),
            Err(DecodeError::Truncated {
                needed: 12,
                had: 11
            })
        );
        // A PCP server answering in PCP.
        assert_eq!(
            Response::decode(&[2, 128, 0, 1]),
            Err(DecodeError::UnsupportedVersion(2))
        );
        // Our own request echoed back (opcode without the response bit).
        assert_eq!(
            Response::decode(&[0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(DecodeError::WrongDirection {
                expected: "response"
            })
        );
        assert_eq!(
            Response::decode(&[0, 128 + 3, 0, 0, 0, 0, 0, 0]),
            Err(DecodeError::UnknownOpcode(3))
        );
        assert_eq!(
            Response::decode(&vec![0; MAX_MESSAGE_LEN + 1]),
            Err(DecodeError::TooLong(MAX_MESSAGE_LEN + 1))
        );
        assert_eq!(
            Request::decode(&[0, 129]),
            Err(DecodeError::WrongDirection {
                expected: "request"
            })
        );
        assert_eq!(
            Request::decode(&[0, 1, 0, 0, 0]),
            Err(DecodeError::Truncated { needed: 6, had: 5 })
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn decode_never_panics_and_round_trips(
                bytes in proptest::collection::vec(any::<u8>(), 0..64)
            ) {
                if let Ok(r) = Response::decode(&bytes) {
                    prop_assert_eq!(Response::decode(&r.encode()), Ok(r));
                }
                if let Ok(r) = Request::decode(&bytes) {
                    prop_assert_eq!(Request::decode(&r.encode()), Ok(r));
                }
            }

            #[test]
            fn map_requests_round_trip(
                udp in any::<bool>(),
                internal_port in any::<u16>(),
                suggested_external_port in any::<u16>(),
                lifetime_secs in any::<u32>(),
            ) {
                let req = Request::Map(MapRequest {
                    protocol: if udp { Protocol::Udp } else { Protocol::Tcp },
                    internal_port,
                    suggested_external_port,
                    lifetime_secs,
                });
                let bytes = req.encode();
                prop_assert_eq!(bytes.len(), MAP_REQUEST_LEN);
                prop_assert_eq!(Request::decode(&bytes), Ok(req));
            }
        }
    }
}
