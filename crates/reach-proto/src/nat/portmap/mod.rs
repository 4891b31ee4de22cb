//! Port mapping, sans-IO: asking the router in front of us to forward a
//! port, and keeping that mapping alive.
//!
//! A mapped port makes a node reachable without relays or hole punching,
//! but the router's replies are untrusted input (routers crash, restart,
//! flush their tables and sometimes lie about the external address). This
//! module holds the parts that need no socket and no clock, so they are
//! unit-tested and fuzzed here and driven by the runtime (`reach`) later:
//!
//! - [`natpmp`]: the NAT-PMP codec (RFC 6886).
//! - [`pcp`]: the PCP codec (RFC 6887): MAP requests for IPv4 mappings and
//!   IPv6 pinholes, and ANNOUNCE.
//! - [`status`]: what the runtime reports about its mappings.
//! - [`upnp`]: the UPnP-IGD codec (v1 and v2): SSDP, the device
//!   description, HTTP/1.1 and the SOAP actions.
//! - [`lifecycle`]: the life of one mapping: request with backoff, verify
//!   from outside before publishing, renew at half the lease, re-map after
//!   a router restart, revoke after repeated failed renewals, delete at
//!   shutdown.
//!
//! Every decoder takes untrusted bytes and returns a typed [`DecodeError`];
//! none panics or reads past the message.

pub mod lifecycle;
pub mod natpmp;
pub mod pcp;
pub mod status;
pub mod upnp;

/// UDP port a NAT-PMP or PCP server listens on (RFC 6886 §3, RFC 6887
/// §19.1: both protocols share it, so one socket probes for both).
pub const SERVER_PORT: u16 = 5351;
/// UDP port a client listens on for the server's unsolicited announcements
/// (multicast to 224.0.0.1 / ff02::1 after a restart or an address change;
/// RFC 6886 §3.2.1, RFC 6887 §19.1).
pub const CLIENT_PORT: u16 = 5350;
/// Largest message decoded. RFC 6887 §7 caps PCP messages at 1100 bytes
/// (so they fit any path MTU); NAT-PMP messages are at most 16 bytes, so
/// anything longer than the PCP cap is not a reply from a real router.
pub const MAX_MESSAGE_LEN: usize = 1100;

/// The transport protocol a mapping is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// UDP: the node's QUIC socket.
    Udp,
    /// TCP: the node's link listener.
    Tcp,
}

impl Protocol {
    /// IANA protocol number, as PCP carries it (RFC 6887 §11.1).
    pub fn iana_number(self) -> u8 {
        match self {
            Protocol::Udp => 17,
            Protocol::Tcp => 6,
        }
    }

    /// The protocol with IANA number `n`, if it is one of ours.
    pub fn from_iana_number(n: u8) -> Option<Protocol> {
        match n {
            17 => Some(Protocol::Udp),
            6 => Some(Protocol::Tcp),
            _ => None,
        }
    }
}

/// Why bytes from a router (or, for a test router, from a client) could not
/// be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message ended before a field it must have.
    #[error("truncated port-mapping message: needed {needed} bytes, had {had}")]
    Truncated {
        /// Bytes the decoder needed to go on.
        needed: usize,
        /// Bytes there were.
        had: usize,
    },
    /// Longer than [`MAX_MESSAGE_LEN`]: refused unread.
    #[error("port-mapping message of {0} bytes exceeds {MAX_MESSAGE_LEN} bytes")]
    TooLong(usize),
    /// A PCP message whose length is not a multiple of 4 (RFC 6887 §7: such
    /// a message is invalid and dropped).
    #[error("PCP message of {0} bytes is not a multiple of 4")]
    NotMultipleOf4(usize),
    /// A version this codec does not speak: a NAT-PMP reply (version 0) to
    /// a PCP request means the router speaks only NAT-PMP, and a PCP reply
    /// (version 2) to a NAT-PMP request the reverse.
    #[error("unsupported port-mapping version {0}")]
    UnsupportedVersion(u8),
    /// A request where a response was expected, or the reverse (the
    /// response bit of the opcode says which).
    #[error("expected a {expected}, got the other direction")]
    WrongDirection {
        /// What the caller decoded: "request" or "response".
        expected: &'static str,
    },
    /// An opcode this codec does not send (so no reply to it is expected).
    #[error("unexpected opcode {0}")]
    UnknownOpcode(u8),
    /// A protocol number other than UDP or TCP.
    #[error("unexpected protocol number {0}")]
    UnknownProtocol(u8),
    /// A PCP option whose length runs past the end of the message.
    #[error("PCP option at byte {at} overruns the message")]
    MalformedOption {
        /// Offset of the option's header in the message.
        at: usize,
    },
    /// More PCP options than [`pcp::MAX_OPTIONS`].
    #[error("more than {} PCP options", pcp::MAX_OPTIONS)]
    TooManyOptions,
    /// A UPnP message (SSDP datagram, HTTP response, XML document) longer
    /// than its bound: refused unread.
    #[error("UPnP message of {len} bytes exceeds {max} bytes")]
    UpnpTooLong {
        /// Its length.
        len: usize,
        /// The bound ([`upnp::MAX_SSDP_LEN`] or [`upnp::MAX_HTTP_RESPONSE`]).
        max: usize,
    },
    /// A UPnP message that is not HTTP-like (start line, headers, chunks).
    #[error("malformed UPnP message: {0}")]
    UpnpMalformed(&'static str),
    /// A well-formed message of a kind not expected here (another client's
    /// M-SEARCH, an SSDP error status, ...).
    #[error("unexpected UPnP message: {0}")]
    UpnpUnexpected(&'static str),
    /// A header, element or argument the message must carry is missing.
    #[error("UPnP message lacks {0}")]
    UpnpMissing(&'static str),
    /// A header, element or argument whose value does not parse.
    #[error("bad value in UPnP message: {0}")]
    UpnpBadValue(&'static str),
    /// A count, length or depth bound of [`upnp`] exceeded.
    #[error("UPnP message exceeds the {0} bound")]
    UpnpLimit(&'static str),
    /// XML that the scanner refuses (not well-formed, a DOCTYPE, an
    /// undeclared entity).
    #[error("bad UPnP XML: {0}")]
    UpnpXml(&'static str),
    /// A URL that is not `http://<ip>[:port]/path`.
    #[error("bad UPnP URL: {0}")]
    UpnpBadUrl(&'static str),
    /// A URL with a host name: we never resolve names, and only talk to the
    /// gateway's address.
    #[error("UPnP URL names a host instead of an IP address")]
    UpnpHostname,
}

impl DecodeError {
    /// Stable machine-readable name of this error kind.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Truncated { .. } => "portmap_truncated",
            DecodeError::TooLong(_) => "portmap_too_long",
            DecodeError::NotMultipleOf4(_) => "portmap_not_multiple_of_4",
            DecodeError::UnsupportedVersion(_) => "portmap_unsupported_version",
            DecodeError::WrongDirection { .. } => "portmap_wrong_direction",
            DecodeError::UnknownOpcode(_) => "portmap_unknown_opcode",
            DecodeError::UnknownProtocol(_) => "portmap_unknown_protocol",
            DecodeError::MalformedOption { .. } => "portmap_malformed_option",
            DecodeError::TooManyOptions => "portmap_too_many_options",
            DecodeError::UpnpTooLong { .. } => "portmap_upnp_too_long",
            DecodeError::UpnpMalformed(_) => "portmap_upnp_malformed",
            DecodeError::UpnpUnexpected(_) => "portmap_upnp_unexpected",
            DecodeError::UpnpMissing(_) => "portmap_upnp_missing",
            DecodeError::UpnpBadValue(_) => "portmap_upnp_bad_value",
            DecodeError::UpnpLimit(_) => "portmap_upnp_limit",
            DecodeError::UpnpXml(_) => "portmap_upnp_xml",
            DecodeError::UpnpBadUrl(_) => "portmap_upnp_bad_url",
            DecodeError::UpnpHostname => "portmap_upnp_hostname",
        }
    }
}

/// A bounds-checked big-endian reader over untrusted bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, at: 0 }
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let end = self.at + N;
        let slice = self.bytes.get(self.at..end).ok_or(DecodeError::Truncated {
            needed: end,
            had: self.bytes.len(),
        })?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        self.at = end;
        Ok(out)
    }

    fn skip(&mut self, n: usize) -> Result<(), DecodeError> {
        let end = self.at.saturating_add(n);
        if end > self.bytes.len() {
            return Err(DecodeError::Truncated {
                needed: end,
                had: self.bytes.len(),
            });
        }
        self.at = end;
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.at >= self.bytes.len()
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take()?))
    }
}

/// Refuses messages longer than [`MAX_MESSAGE_LEN`].
fn check_len(bytes: &[u8]) -> Result<(), DecodeError> {
    if bytes.len() > MAX_MESSAGE_LEN {
        return Err(DecodeError::TooLong(bytes.len()));
    }
    Ok(())
}
