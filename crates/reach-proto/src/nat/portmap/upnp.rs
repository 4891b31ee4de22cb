//! UPnP-IGD (Internet Gateway Device v1 and v2), sans-IO: the third
//! port-mapping protocol, spoken by most consumer routers that speak
//! neither PCP nor NAT-PMP.
//!
//! A client finds the gateway with SSDP (an HTTP-like datagram multicast to
//! 239.255.255.250:1900, answered with the URL of an XML device
//! description), fetches that description with one HTTP/1.1 GET, picks the
//! WAN connection service in it, and then POSTs SOAP actions to that
//! service's control URL: `AddPortMapping`, `DeletePortMapping`,
//! `GetSpecificPortMappingEntry`, ... IGDv2 adds `AddAnyPortMapping` (the
//! router picks a free external port) and the `WANIPv6FirewallControl`
//! service (IPv6 pinholes).
//!
//! This module encodes every request and decodes every answer; it opens
//! no socket. Everything a router (or anyone on the LAN) sends is
//! untrusted: every decoder is bounded (sizes, header and element counts,
//! nesting depth are named constants below), refuses what it cannot read
//! with a typed [`DecodeError`] and never panics. The XML reader is a small
//! hand-rolled scanner for the subset IGD uses: elements, text, comments,
//! processing instructions and CDATA; a DOCTYPE (the only way to declare
//! entities) is refused, and only XML's five predefined entities and
//! character references are decoded.
//!
//! URLs are deliberately narrow ([`Url`]): `http://<IP literal>[:port]/path`.
//! A host name is refused, since we never resolve names and only ever talk
//! to the gateway that answered SSDP.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{DecodeError, Protocol};

/// UDP port SSDP listens on (UPnP Device Architecture 2.0, §1.1.2).
pub const SSDP_PORT: u16 = 1900;
/// SSDP's IPv4 multicast group (UDA 2.0 §1.1.2).
pub const SSDP_MULTICAST_V4: Ipv4Addr = Ipv4Addr::new(239, 255, 255, 250);
/// The search target of an IGDv2 root device.
pub const ST_IGD_V2: &str = "urn:schemas-upnp-org:device:InternetGatewayDevice:2";
/// The search target of an IGDv1 root device (many routers answer only this).
pub const ST_IGD_V1: &str = "urn:schemas-upnp-org:device:InternetGatewayDevice:1";
/// Service type of the IPv4 connection service, IGDv2.
pub const WAN_IP_CONNECTION_2: &str = "urn:schemas-upnp-org:service:WANIPConnection:2";
/// Service type of the IPv4 connection service, IGDv1.
pub const WAN_IP_CONNECTION_1: &str = "urn:schemas-upnp-org:service:WANIPConnection:1";
/// Service type of a PPPoE connection's service (IGDv1 DSL routers): same
/// port-mapping actions as WANIPConnection:1.
pub const WAN_PPP_CONNECTION_1: &str = "urn:schemas-upnp-org:service:WANPPPConnection:1";
/// Service type of IGDv2's IPv6 firewall (pinholes).
pub const WAN_IPV6_FIREWALL_1: &str = "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1";
/// MX of our M-SEARCH: seconds a device may wait before answering (UDA 2.0
/// §1.3.2 allows 1..=5). 1 keeps discovery fast; the answer comes at a
/// random time below it.
pub const MSEARCH_MX: u8 = 1;
/// Largest SSDP datagram decoded. UDA 2.0 §1.1.2 advises keeping SSDP
/// messages within one unfragmented datagram (≈1500 bytes); real answers
/// are about 450 bytes (miniupnpd's, in `testdata/upnp`). Twice the MTU
/// leaves room for long vendor headers.
pub const MAX_SSDP_LEN: usize = 3000;
/// Most header lines read in one SSDP message or HTTP response: real ones
/// carry about 10; anything beyond 64 is not a router speaking to us.
pub const MAX_HEADERS: usize = 64;
/// Largest HTTP response (head and body) decoded. A device description
/// is 3 KB (miniupnpd) to about 20 KB (vendor routers listing many
/// services and icons); SOAP answers are below 1 KB. 64 KiB bounds the
/// memory a hostile LAN host can make us spend.
pub const MAX_HTTP_RESPONSE: usize = 64 * 1024;
/// Most nested XML elements: a description nests root/device/deviceList/
/// device/deviceList/device/serviceList/service/controlURL = 9; 32 is
/// generous and stops a stack of opened tags.
pub const MAX_XML_DEPTH: usize = 32;
/// Most XML elements in one document: miniupnpd's description has 95;
/// vendor ones a few hundred. 4096 bounds the tree kept in memory.
pub const MAX_XML_ELEMENTS: usize = 4096;
/// Most chunks in a chunked HTTP body (each costs a size line to parse):
/// real servers send one or a few; 4096 still fits [`MAX_HTTP_RESPONSE`]
/// at 16 bytes a chunk.
pub const MAX_CHUNKS: usize = 4096;
/// Longest URL accepted (in its canonical form), as a router could otherwise make every request
/// we send carry its junk. Real control URLs are a few dozen bytes.
pub const MAX_URL_LEN: usize = 512;

/// The UPnP error code a mapping's absence is answered with
/// (`GetSpecificPortMappingEntry`, `DeletePortMapping`).
pub const ERR_NO_SUCH_ENTRY: u16 = 714;
/// The external port is mapped to another client.
pub const ERR_CONFLICT: u16 = 718;
/// The router only accepts lease 0 (permanent; IGDv1 routers).
pub const ERR_ONLY_PERMANENT_LEASES: u16 = 725;
/// The router's policy refuses the action (miniupnpd's `deny` rules,
/// `secure_mode` for another client's address).
pub const ERR_NOT_AUTHORIZED: u16 = 606;

// ---------------------------------------------------------------- SSDP

/// An M-SEARCH for `st` (e.g. [`ST_IGD_V2`]), as sent to the multicast
/// group or unicast to the gateway (which miniupnpd also answers).
pub fn encode_msearch(st: &str) -> Vec<u8> {
    format!(
        "M-SEARCH * HTTP/1.1\r\nHOST: {SSDP_MULTICAST_V4}:{SSDP_PORT}\r\n\
         MAN: \"ssdp:discover\"\r\nMX: {MSEARCH_MX}\r\nST: {st}\r\n\r\n"
    )
    .into_bytes()
}

/// What an SSDP message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SsdpKind {
    /// `HTTP/1.1 200 OK`: an answer to our M-SEARCH.
    SearchResponse,
    /// `NOTIFY` with `NTS: ssdp:alive`: a device announcing itself (also
    /// after a restart, with a new BOOTID).
    Alive,
    /// `NOTIFY` with `NTS: ssdp:byebye`: a device leaving.
    ByeBye,
    /// `NOTIFY` with `NTS: ssdp:update`: a device changing its BOOTID.
    Update,
}

/// A decoded SSDP search response or NOTIFY.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SsdpMessage {
    /// Response or which NOTIFY.
    pub kind: SsdpKind,
    /// LOCATION: the description's URL, raw (parse it with [`Url::parse`]).
    /// A byebye carries none.
    pub location: Option<String>,
    /// ST (response) or NT (NOTIFY): what the message is about.
    pub target: String,
    /// USN: the device's unique name.
    pub usn: Option<String>,
    /// BOOTID.UPNP.ORG (UDA 1.1+): changes when the device restarts.
    pub boot_id: Option<u32>,
    /// CACHE-CONTROL max-age in seconds: how long the announcement holds.
    pub max_age: Option<u32>,
}

impl SsdpMessage {
    /// Decodes an SSDP datagram: a search response or a NOTIFY. An
    /// M-SEARCH (another client searching) is refused as
    /// [`DecodeError::UpnpUnexpected`].
    pub fn decode(bytes: &[u8]) -> Result<SsdpMessage, DecodeError> {
        if bytes.len() > MAX_SSDP_LEN {
            return Err(DecodeError::UpnpTooLong {
                len: bytes.len(),
                max: MAX_SSDP_LEN,
            });
        }
        let head = Head::parse(bytes, false)?;
        let notify = match &head.start {
            Start::Status(200) => false,
            Start::Status(_) => return Err(DecodeError::UpnpUnexpected("SSDP status not 200")),
            Start::Request(method) if method.eq_ignore_ascii_case("NOTIFY") => true,
            Start::Request(_) => return Err(DecodeError::UpnpUnexpected("SSDP request")),
        };
        let kind = if notify {
            let nts = head
                .get("nts")
                .ok_or(DecodeError::UpnpMissing("NTS header"))?;
            match nts.to_ascii_lowercase().as_str() {
                "ssdp:alive" => SsdpKind::Alive,
                "ssdp:byebye" => SsdpKind::ByeBye,
                "ssdp:update" => SsdpKind::Update,
                _ => return Err(DecodeError::UpnpUnexpected("NTS value")),
            }
        } else {
            SsdpKind::SearchResponse
        };
        let target = head
            .get(if notify { "nt" } else { "st" })
            .ok_or(DecodeError::UpnpMissing("ST/NT header"))?
            .to_string();
        let location = head.get("location").map(str::to_string);
        if location.is_none() && kind != SsdpKind::ByeBye {
            return Err(DecodeError::UpnpMissing("LOCATION header"));
        }
        let boot_id = match head.get("bootid.upnp.org") {
            Some(v) => Some(
                v.parse::<u32>()
                    .map_err(|_| DecodeError::UpnpBadValue("BOOTID.UPNP.ORG"))?,
            ),
            None => None,
        };
        let max_age = head.get("cache-control").and_then(parse_max_age);
        Ok(SsdpMessage {
            kind,
            location,
            target,
            usn: head.get("usn").map(str::to_string),
            boot_id,
            max_age,
        })
    }
}

/// `max-age = 120` out of a CACHE-CONTROL value (directives split by `,`).
fn parse_max_age(value: &str) -> Option<u32> {
    value.split(',').find_map(|d| {
        let (k, v) = d.split_once('=')?;
        if k.trim().eq_ignore_ascii_case("max-age") {
            v.trim().parse().ok()
        } else {
            None
        }
    })
}

// ---------------------------------------------------------------- HTTP head

/// The first line of an HTTP-like message.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Start {
    /// A status line's code.
    Status(u16),
    /// A request line's method.
    Request(String),
}

/// An HTTP-like head: start line and headers (names lowercased).
#[derive(Debug)]
struct Head {
    start: Start,
    headers: Vec<(String, String)>,
    /// Offset of the body (after the blank line).
    body_at: usize,
}

impl Head {
    /// Parses the head of `bytes`. `need_end`: the blank line ending the
    /// head must be there (HTTP); SSDP datagrams may omit it.
    fn parse(bytes: &[u8], need_end: bool) -> Result<Head, DecodeError> {
        let mut at = 0;
        let mut start = None;
        let mut headers = Vec::new();
        loop {
            let Some(rel) = bytes[at..].iter().position(|&b| b == b'\n') else {
                if need_end {
                    return Err(DecodeError::Truncated {
                        needed: bytes.len() + 1,
                        had: bytes.len(),
                    });
                }
                // A datagram's last line may lack its newline.
                let line = trim_cr(&bytes[at..]);
                if !line.is_empty() {
                    Head::line(line, &mut start, &mut headers)?;
                }
                at = bytes.len();
                break;
            };
            let line = trim_cr(&bytes[at..at + rel]);
            at += rel + 1;
            if line.is_empty() {
                if start.is_none() {
                    return Err(DecodeError::UpnpMalformed("empty start line"));
                }
                break;
            }
            Head::line(line, &mut start, &mut headers)?;
        }
        let start = start.ok_or(DecodeError::UpnpMalformed("no start line"))?;
        Ok(Head {
            start,
            headers,
            body_at: at,
        })
    }

    fn line(
        line: &[u8],
        start: &mut Option<Start>,
        headers: &mut Vec<(String, String)>,
    ) -> Result<(), DecodeError> {
        let line =
            std::str::from_utf8(line).map_err(|_| DecodeError::UpnpMalformed("not UTF-8"))?;
        if start.is_none() {
            *start = Some(parse_start(line)?);
            return Ok(());
        }
        if headers.len() >= MAX_HEADERS {
            return Err(DecodeError::UpnpLimit("header count"));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or(DecodeError::UpnpMalformed("header without colon"))?;
        let name = name.trim();
        if name.is_empty() {
            return Err(DecodeError::UpnpMalformed("empty header name"));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
        Ok(())
    }

    /// The first header named `name` (lowercase).
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn parse_start(line: &str) -> Result<Start, DecodeError> {
    let mut parts = line.splitn(3, ' ');
    let first = parts.next().unwrap_or_default();
    let second = parts
        .next()
        .ok_or(DecodeError::UpnpMalformed("start line"))?;
    if first.starts_with("HTTP/1.") {
        if second.len() != 3 {
            return Err(DecodeError::UpnpMalformed("status code"));
        }
        let code = second
            .parse::<u16>()
            .map_err(|_| DecodeError::UpnpMalformed("status code"))?;
        Ok(Start::Status(code))
    } else {
        let third = parts.next().unwrap_or_default();
        if !third.starts_with("HTTP/1.") || first.is_empty() {
            return Err(DecodeError::UpnpMalformed("start line"));
        }
        Ok(Start::Request(first.to_string()))
    }
}

// ---------------------------------------------------------------- URL

/// An `http://<IP literal>[:port]/path` URL: the only kind a gateway's
/// description and control URLs may be for us.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Url {
    /// The host, an IP literal.
    pub ip: IpAddr,
    /// The port (80 if the URL has none).
    pub port: u16,
    /// Path and query, starting with `/`; visible ASCII only (so it cannot
    /// break the request line it goes in).
    pub path: String,
}

impl Url {
    /// Parses an absolute URL. A host name, another scheme, a user part, an
    /// IPv6 zone or a path with spaces or control characters is refused.
    pub fn parse(s: &str) -> Result<Url, DecodeError> {
        if s.len() > MAX_URL_LEN {
            return Err(DecodeError::UpnpLimit("URL length"));
        }
        let rest = s
            .get(..7)
            .filter(|p| p.eq_ignore_ascii_case("http://"))
            .map(|_| &s[7..])
            .ok_or(DecodeError::UpnpBadUrl("not http://"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        check_path(path)?;
        if authority.contains('@') {
            return Err(DecodeError::UpnpBadUrl("user part"));
        }
        let (ip, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (addr, after) = v6
                .split_once(']')
                .ok_or(DecodeError::UpnpBadUrl("unclosed ["))?;
            let ip = addr
                .parse::<Ipv6Addr>()
                .map_err(|_| DecodeError::UpnpBadUrl("IPv6 literal"))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or(DecodeError::UpnpBadUrl("after ]"))?,
                ),
            };
            (IpAddr::V6(ip), port)
        } else {
            let (host, port) = match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            };
            let ip = host
                .parse::<Ipv4Addr>()
                .map_err(|_| DecodeError::UpnpHostname)?;
            (IpAddr::V4(ip), port)
        };
        let port = match port {
            None => 80,
            Some(p) => {
                if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(DecodeError::UpnpBadUrl("port"));
                }
                p.parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or(DecodeError::UpnpBadUrl("port"))?
            }
        };
        Url {
            ip,
            port,
            path: path.to_string(),
        }
        .bounded()
    }

    /// This URL if its canonical form (as [`fmt::Display`] prints it,
    /// which may add `:80`) fits [`MAX_URL_LEN`], so what we print we
    /// also parse back.
    fn bounded(self) -> Result<Url, DecodeError> {
        if self.to_string().len() > MAX_URL_LEN {
            return Err(DecodeError::UpnpLimit("URL length"));
        }
        Ok(self)
    }

    /// `reference` (a controlURL: absolute, absolute-path or relative)
    /// resolved against this URL (the URLBase or the LOCATION; RFC 3986
    /// §5.2, without dot-segment removal: routers do not send them).
    pub fn join(&self, reference: &str) -> Result<Url, DecodeError> {
        let reference = reference.trim();
        if reference.len() > MAX_URL_LEN {
            return Err(DecodeError::UpnpLimit("URL length"));
        }
        if reference.contains("://") {
            return Url::parse(reference);
        }
        let path = if reference.starts_with('/') {
            reference.to_string()
        } else {
            // Relative: replace what follows the base path's last '/'.
            let base = self.path.split(['?', '#']).next().unwrap_or("/");
            let dir = &base[..base.rfind('/').map_or(0, |i| i + 1)];
            format!("{}{reference}", if dir.is_empty() { "/" } else { dir })
        };
        check_path(&path)?;
        Url {
            ip: self.ip,
            port: self.port,
            path,
        }
        .bounded()
    }

    /// The `Host:` header value: `ip:port`, `[v6]:port`.
    pub fn host_header(&self) -> String {
        match self.ip {
            IpAddr::V4(ip) => format!("{ip}:{}", self.port),
            IpAddr::V6(ip) => format!("[{ip}]:{}", self.port),
        }
    }

    /// Where to connect.
    pub fn socket_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.ip, self.port)
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.host_header(), self.path)
    }
}

fn check_path(path: &str) -> Result<(), DecodeError> {
    if !path.starts_with('/') {
        return Err(DecodeError::UpnpBadUrl("path"));
    }
    if !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(DecodeError::UpnpBadUrl("path character"));
    }
    Ok(())
}

// ---------------------------------------------------------------- HTTP

/// An HTTP/1.1 GET of `url` (the device description).
pub fn encode_get(url: &Url) -> Vec<u8> {
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        url.path,
        url.host_header()
    )
    .into_bytes()
}

/// An HTTP/1.1 SOAP POST of `action` to `url` (the service's control URL).
pub fn encode_soap_post(url: &Url, service_type: &str, action: &SoapAction) -> Vec<u8> {
    let body = action.envelope(service_type);
    let mut out = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: text/xml; charset=\"utf-8\"\r\n\
         SOAPAction: \"{service_type}#{}\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        url.path,
        url.host_header(),
        action.name,
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// A decoded HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code (200; 500 for a SOAP fault).
    pub status: u16,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// Decodes a complete response (what was read until the server closed
    /// the connection, as we ask with `Connection: close`). The body is
    /// delimited by Content-Length, chunked encoding, or the end of the
    /// bytes; a body shorter than announced is [`DecodeError::Truncated`].
    pub fn decode(bytes: &[u8]) -> Result<HttpResponse, DecodeError> {
        if bytes.len() > MAX_HTTP_RESPONSE {
            return Err(DecodeError::UpnpTooLong {
                len: bytes.len(),
                max: MAX_HTTP_RESPONSE,
            });
        }
        let head = Head::parse(bytes, true)?;
        let Start::Status(status) = head.start else {
            return Err(DecodeError::UpnpUnexpected("HTTP request"));
        };
        let rest = &bytes[head.body_at..];
        let chunked = head
            .get("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let body = if chunked {
            dechunk(rest)?
        } else if let Some(len) = head.get("content-length") {
            let len: usize = len
                .parse()
                .map_err(|_| DecodeError::UpnpBadValue("Content-Length"))?;
            match rest.get(..len) {
                Some(b) => b.to_vec(),
                None => {
                    return Err(DecodeError::Truncated {
                        needed: head.body_at.saturating_add(len),
                        had: bytes.len(),
                    });
                }
            }
        } else {
            rest.to_vec()
        };
        Ok(HttpResponse { status, body })
    }
}

/// Decodes a chunked body (RFC 9112 §7.1), trailers ignored.
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let mut body = Vec::new();
    for _ in 0..MAX_CHUNKS {
        let nl = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(DecodeError::Truncated {
                needed: rest.len() + 1,
                had: rest.len(),
            })?;
        let line = std::str::from_utf8(trim_cr(&rest[..nl]))
            .map_err(|_| DecodeError::UpnpMalformed("chunk size"))?;
        let size = line.split(';').next().unwrap_or_default().trim();
        if size.is_empty() || size.len() > 8 {
            return Err(DecodeError::UpnpMalformed("chunk size"));
        }
        let size = usize::from_str_radix(size, 16)
            .map_err(|_| DecodeError::UpnpMalformed("chunk size"))?;
        rest = &rest[nl + 1..];
        if size == 0 {
            return Ok(body);
        }
        let data = rest.get(..size).ok_or(DecodeError::Truncated {
            needed: size,
            had: rest.len(),
        })?;
        body.extend_from_slice(data);
        rest = &rest[size..];
        // The CRLF after the chunk's data.
        rest = rest
            .strip_prefix(b"\r\n")
            .or_else(|| rest.strip_prefix(b"\n"))
            .ok_or(DecodeError::UpnpMalformed("chunk end"))?;
    }
    Err(DecodeError::UpnpLimit("chunk count"))
}

// ---------------------------------------------------------------- XML

/// One element of a parsed XML document.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Element {
    /// Local name (namespace prefix dropped: `s:Envelope` is `Envelope`).
    name: String,
    parent: Option<usize>,
    /// Indices of the child elements, in order.
    children: Vec<usize>,
    /// Text directly inside, entities decoded.
    text: String,
}

/// A parsed XML document: elements in document order.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Xml {
    elements: Vec<Element>,
}

impl Xml {
    /// Parses `bytes` within the module's bounds.
    fn parse(bytes: &[u8]) -> Result<Xml, DecodeError> {
        if bytes.len() > MAX_HTTP_RESPONSE {
            return Err(DecodeError::UpnpTooLong {
                len: bytes.len(),
                max: MAX_HTTP_RESPONSE,
            });
        }
        let s = std::str::from_utf8(bytes).map_err(|_| DecodeError::UpnpXml("not UTF-8"))?;
        let mut elements: Vec<Element> = Vec::new();
        let mut stack: Vec<usize> = Vec::new();
        let mut seen_root = false;
        let mut at = 0;
        while at < s.len() {
            let rest = &s[at..];
            let Some(lt) = rest.find('<') else {
                text(&mut elements, &stack, rest)?;
                break;
            };
            text(&mut elements, &stack, &rest[..lt])?;
            let tag = &rest[lt..];
            at += lt;
            if let Some(after) = tag.strip_prefix("<?") {
                at += 2
                    + after
                        .find("?>")
                        .ok_or(DecodeError::UpnpXml("unclosed <?"))?
                    + 2;
            } else if let Some(after) = tag.strip_prefix("<!--") {
                at += 4
                    + after
                        .find("-->")
                        .ok_or(DecodeError::UpnpXml("unclosed comment"))?
                    + 3;
            } else if let Some(after) = tag.strip_prefix("<![CDATA[") {
                let end = after
                    .find("]]>")
                    .ok_or(DecodeError::UpnpXml("unclosed CDATA"))?;
                let top = *stack.last().ok_or(DecodeError::UpnpXml("CDATA outside"))?;
                elements[top].text.push_str(&after[..end]);
                at += 9 + end + 3;
            } else if tag.starts_with("<!") {
                // DOCTYPE: the one place entities are declared. IGD never
                // sends one, so refusing it is how entities stay unexpanded.
                return Err(DecodeError::UpnpXml("DOCTYPE"));
            } else if let Some(after) = tag.strip_prefix("</") {
                let end = after
                    .find('>')
                    .ok_or(DecodeError::UpnpXml("unclosed end tag"))?;
                let name = local_name(after[..end].trim_end());
                let open = stack.pop().ok_or(DecodeError::UpnpXml("stray end tag"))?;
                if elements[open].name != name {
                    return Err(DecodeError::UpnpXml("mismatched end tag"));
                }
                at += 2 + end + 1;
            } else {
                let end = tag_end(&tag[1..]).ok_or(DecodeError::UpnpXml("unclosed tag"))?;
                let inner = &tag[1..1 + end];
                let (inner, empty) = match inner.strip_suffix('/') {
                    Some(i) => (i, true),
                    None => (inner, false),
                };
                let name_end = inner
                    .find(|c: char| c.is_ascii_whitespace())
                    .unwrap_or(inner.len());
                let name = local_name(&inner[..name_end]);
                if name.is_empty() {
                    return Err(DecodeError::UpnpXml("empty tag name"));
                }
                if stack.is_empty() {
                    if seen_root {
                        return Err(DecodeError::UpnpXml("second root element"));
                    }
                    seen_root = true;
                }
                if elements.len() >= MAX_XML_ELEMENTS {
                    return Err(DecodeError::UpnpLimit("XML element count"));
                }
                if stack.len() >= MAX_XML_DEPTH {
                    return Err(DecodeError::UpnpLimit("XML depth"));
                }
                let index = elements.len();
                let parent = stack.last().copied();
                elements.push(Element {
                    name: name.to_string(),
                    parent,
                    children: Vec::new(),
                    text: String::new(),
                });
                if let Some(p) = parent {
                    elements[p].children.push(index);
                }
                if !empty {
                    stack.push(index);
                }
                at += 1 + end + 1;
            }
        }
        if !stack.is_empty() {
            return Err(DecodeError::UpnpXml("unclosed element"));
        }
        if !seen_root {
            return Err(DecodeError::UpnpXml("no element"));
        }
        Ok(Xml { elements })
    }

    /// Indices of the children of `parent`.
    fn children(&self, parent: usize) -> impl Iterator<Item = usize> + '_ {
        self.elements[parent].children.iter().copied()
    }

    /// The text of `parent`'s first child named `name`.
    fn child_text(&self, parent: usize, name: &str) -> Option<&str> {
        self.children(parent)
            .find(|&i| self.elements[i].name == name)
            .map(|i| self.elements[i].text.trim())
    }

    /// Indices of every element named `name`.
    fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = usize> + 'a {
        self.elements
            .iter()
            .enumerate()
            .filter(move |(_, e)| e.name == name)
            .map(|(i, _)| i)
    }
}

/// Where a start tag's `>` is (quotes in attribute values skipped).
fn tag_end(s: &str) -> Option<usize> {
    let mut quote = None;
    for (i, c) in s.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '>') => return Some(i),
            (None, '<') => return None,
            _ => {}
        }
    }
    None
}

fn local_name(qname: &str) -> &str {
    qname.rsplit(':').next().unwrap_or(qname)
}

/// Adds `raw` text (entities decoded) to the open element, if any. Text
/// outside the root must be whitespace.
fn text(elements: &mut [Element], stack: &[usize], raw: &str) -> Result<(), DecodeError> {
    if raw.is_empty() {
        return Ok(());
    }
    match stack.last() {
        Some(&top) => {
            // The document is bounded by MAX_HTTP_RESPONSE and decoding
            // only shortens text, so texts stay within it.
            let decoded = decode_entities(raw)?;
            elements[top].text.push_str(&decoded);
            Ok(())
        }
        None if raw.trim().is_empty() => Ok(()),
        None => Err(DecodeError::UpnpXml("text outside the root")),
    }
}

/// XML's five predefined entities and character references; anything else
/// (a declared entity) is refused.
fn decode_entities(raw: &str) -> Result<String, DecodeError> {
    if !raw.contains('&') {
        return Ok(raw.to_string());
    }
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        let semi = after
            .find(';')
            .filter(|&i| i <= 10)
            .ok_or(DecodeError::UpnpXml("unterminated entity"))?;
        let ent = &after[..semi];
        let c = match ent {
            "lt" => '<',
            "gt" => '>',
            "amp" => '&',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let n = if let Some(hex) = ent.strip_prefix("#x") {
                    u32::from_str_radix(hex, 16).ok()
                } else if let Some(dec) = ent.strip_prefix('#') {
                    dec.parse::<u32>().ok()
                } else {
                    return Err(DecodeError::UpnpXml("undeclared entity"));
                };
                n.and_then(char::from_u32)
                    .ok_or(DecodeError::UpnpXml("bad character reference"))?
            }
        };
        out.push(c);
        rest = &after[semi + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `s` escaped for XML text.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

// ---------------------------------------------------------------- description

/// Which IGD connection service a gateway offers (in order of preference).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceKind {
    /// WANIPConnection:2 (IGDv2: AddAnyPortMapping).
    WanIp2,
    /// WANIPConnection:1.
    WanIp1,
    /// WANPPPConnection:1.
    WanPpp1,
}

impl ServiceKind {
    /// The service type string.
    pub fn service_type(self) -> &'static str {
        match self {
            ServiceKind::WanIp2 => WAN_IP_CONNECTION_2,
            ServiceKind::WanIp1 => WAN_IP_CONNECTION_1,
            ServiceKind::WanPpp1 => WAN_PPP_CONNECTION_1,
        }
    }

    /// IGD version: 2 for WANIPConnection:2, else 1.
    pub fn version(self) -> u8 {
        match self {
            ServiceKind::WanIp2 => 2,
            _ => 1,
        }
    }
}

/// What a client needs from a device description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description {
    /// The chosen connection service.
    pub service: ServiceKind,
    /// Its control URL, resolved.
    pub control_url: Url,
    /// WANIPv6FirewallControl:1's control URL, resolved, if offered.
    pub ipv6_firewall_url: Option<Url>,
}

impl Description {
    /// Parses a device description fetched from `location`: picks
    /// WANIPConnection:2, else :1, else WANPPPConnection:1 among the
    /// services of WANConnectionDevices, and resolves its controlURL
    /// against the URLBase (if any) or `location`.
    pub fn parse(xml: &[u8], location: &Url) -> Result<Description, DecodeError> {
        let doc = Xml::parse(xml)?;
        let root = 0;
        if doc.elements[root].name != "root" {
            return Err(DecodeError::UpnpXml("root element is not <root>"));
        }
        let base = match doc.child_text(root, "URLBase").filter(|b| !b.is_empty()) {
            Some(b) => Url::parse(b)?,
            None => location.clone(),
        };
        let mut best: Option<(ServiceKind, usize)> = None;
        let mut firewall = None;
        for service in doc.named("service") {
            if !doc.in_connection_device(service) {
                continue;
            }
            let Some(st) = doc.child_text(service, "serviceType") else {
                continue;
            };
            let kind = match st {
                WAN_IP_CONNECTION_2 => ServiceKind::WanIp2,
                WAN_IP_CONNECTION_1 => ServiceKind::WanIp1,
                WAN_PPP_CONNECTION_1 => ServiceKind::WanPpp1,
                WAN_IPV6_FIREWALL_1 => {
                    firewall = firewall.or(Some(service));
                    continue;
                }
                _ => continue,
            };
            // ServiceKind's order is the preference order.
            if best.is_none_or(|(b, _)| rank(kind) < rank(b)) {
                best = Some((kind, service));
            }
        }
        let (service, at) = best.ok_or(DecodeError::UpnpMissing("WAN connection service"))?;
        let control = doc
            .child_text(at, "controlURL")
            .ok_or(DecodeError::UpnpMissing("controlURL"))?;
        let control_url = base.join(control)?;
        let ipv6_firewall_url = match firewall.and_then(|f| doc.child_text(f, "controlURL")) {
            Some(c) => Some(base.join(c)?),
            None => None,
        };
        Ok(Description {
            service,
            control_url,
            ipv6_firewall_url,
        })
    }
}

fn rank(kind: ServiceKind) -> u8 {
    match kind {
        ServiceKind::WanIp2 => 0,
        ServiceKind::WanIp1 => 1,
        ServiceKind::WanPpp1 => 2,
    }
}

impl Xml {
    /// Whether `service` sits in a WANConnectionDevice's serviceList.
    fn in_connection_device(&self, service: usize) -> bool {
        let device = self.elements[service]
            .parent
            .filter(|&l| self.elements[l].name == "serviceList")
            .and_then(|l| self.elements[l].parent)
            .filter(|&d| self.elements[d].name == "device");
        device
            .and_then(|d| self.child_text(d, "deviceType"))
            .is_some_and(|t| t.starts_with("urn:schemas-upnp-org:device:WANConnectionDevice:"))
    }
}

// ---------------------------------------------------------------- SOAP

/// A SOAP action: its name and arguments, in the order the service's
/// description lists them (some routers insist).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SoapAction {
    /// The action's name, e.g. `AddPortMapping`.
    pub name: &'static str,
    /// Argument names and values (escaped when encoded).
    pub args: Vec<(&'static str, String)>,
}

/// `UDP` / `TCP`, as WANIPConnection's NewProtocol spells it.
fn proto_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Udp => "UDP",
        Protocol::Tcp => "TCP",
    }
}

impl SoapAction {
    /// `GetExternalIPAddress` (answer: [`decode_external_ip`]).
    pub fn get_external_ip() -> SoapAction {
        SoapAction {
            name: "GetExternalIPAddress",
            args: Vec::new(),
        }
    }

    fn mapping_args(m: &PortMappingRequest) -> Vec<(&'static str, String)> {
        vec![
            ("NewRemoteHost", String::new()),
            ("NewExternalPort", m.external_port.to_string()),
            ("NewProtocol", proto_name(m.protocol).into()),
            ("NewInternalPort", m.internal_port.to_string()),
            ("NewInternalClient", m.internal_client.to_string()),
            ("NewEnabled", "1".into()),
            ("NewPortMappingDescription", m.description.clone()),
            ("NewLeaseDuration", m.lease_secs.to_string()),
        ]
    }

    /// `AddPortMapping` (answer: empty, [`decode_empty`]).
    pub fn add_port_mapping(m: &PortMappingRequest) -> SoapAction {
        SoapAction {
            name: "AddPortMapping",
            args: SoapAction::mapping_args(m),
        }
    }

    /// `AddAnyPortMapping`, IGDv2: the router may grant another external
    /// port (answer: [`decode_reserved_port`]).
    pub fn add_any_port_mapping(m: &PortMappingRequest) -> SoapAction {
        SoapAction {
            name: "AddAnyPortMapping",
            args: SoapAction::mapping_args(m),
        }
    }

    /// `DeletePortMapping` (answer: empty; 714 if there was none).
    pub fn delete_port_mapping(protocol: Protocol, external_port: u16) -> SoapAction {
        SoapAction {
            name: "DeletePortMapping",
            args: vec![
                ("NewRemoteHost", String::new()),
                ("NewExternalPort", external_port.to_string()),
                ("NewProtocol", proto_name(protocol).into()),
            ],
        }
    }

    /// `GetSpecificPortMappingEntry` (answer: [`decode_mapping_entry`];
    /// 714 if absent).
    pub fn get_specific_port_mapping_entry(protocol: Protocol, external_port: u16) -> SoapAction {
        SoapAction {
            name: "GetSpecificPortMappingEntry",
            args: vec![
                ("NewRemoteHost", String::new()),
                ("NewExternalPort", external_port.to_string()),
                ("NewProtocol", proto_name(protocol).into()),
            ],
        }
    }

    /// WANIPv6FirewallControl `AddPinhole` from any remote host and port
    /// to `internal` (answer: [`decode_pinhole_id`]).
    pub fn add_pinhole(
        protocol: Protocol,
        internal_client: Ipv6Addr,
        internal_port: u16,
        lease_secs: u32,
    ) -> SoapAction {
        SoapAction {
            name: "AddPinhole",
            args: vec![
                // An empty RemoteHost and RemotePort 0 are wildcards.
                ("RemoteHost", String::new()),
                ("RemotePort", "0".into()),
                ("InternalClient", internal_client.to_string()),
                ("InternalPort", internal_port.to_string()),
                ("Protocol", protocol.iana_number().to_string()),
                ("LeaseTime", lease_secs.to_string()),
            ],
        }
    }

    /// `UpdatePinhole`: a new lease for pinhole `id` (answer: empty).
    pub fn update_pinhole(id: u16, lease_secs: u32) -> SoapAction {
        SoapAction {
            name: "UpdatePinhole",
            args: vec![
                ("UniqueID", id.to_string()),
                ("NewLeaseTime", lease_secs.to_string()),
            ],
        }
    }

    /// `DeletePinhole` (answer: empty).
    pub fn delete_pinhole(id: u16) -> SoapAction {
        SoapAction {
            name: "DeletePinhole",
            args: vec![("UniqueID", id.to_string())],
        }
    }

    /// The SOAP envelope (the POST's body).
    pub fn envelope(&self, service_type: &str) -> String {
        let mut args = String::new();
        for (k, v) in &self.args {
            args.push_str(&format!("<{k}>{}</{k}>", escape(v)));
        }
        format!(
            "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
             s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>\
             <u:{name} xmlns:u=\"{st}\">{args}</u:{name}></s:Body></s:Envelope>\r\n",
            name = self.name,
            st = escape(service_type),
        )
    }
}

/// The arguments of a port mapping request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMappingRequest {
    /// UDP or TCP.
    pub protocol: Protocol,
    /// External port wanted (IGD has no "any": AddAnyPortMapping treats
    /// it as a hint).
    pub external_port: u16,
    /// Port on the client.
    pub internal_port: u16,
    /// The client's LAN address (IGD port mappings are IPv4).
    pub internal_client: Ipv4Addr,
    /// Lease in seconds; 0 is "permanent" in IGDv1 (IGDv2 caps it at a week).
    pub lease_secs: u32,
    /// Shown in the router's UI.
    pub description: String,
}

/// A `UPnPError` in a SOAP fault (UDA 2.0 §3.2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpnpFault {
    /// errorCode: 606, 714, 718, 725, ...
    pub code: u16,
    /// errorDescription, as sent (bounded by the response's size).
    pub description: String,
}

/// Why a SOAP answer is not the success asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SoapError {
    /// The router answered with a UPnP fault.
    #[error("UPnP error {}: {}", .0.code, .0.description)]
    Fault(UpnpFault),
    /// The answer could not be decoded.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// The arguments of `action`'s SOAP answer (`<u:{action}Response>`'s
/// children, in order), or the fault it carries. `status` is the HTTP
/// status: a fault comes with 500, success with 200.
pub fn decode_soap(
    action: &str,
    status: u16,
    body: &[u8],
) -> Result<Vec<(String, String)>, SoapError> {
    let doc = Xml::parse(body)?;
    if doc.elements[0].name != "Envelope" {
        return Err(DecodeError::UpnpXml("root element is not <Envelope>").into());
    }
    if let Some(err) = doc.named("UPnPError").next() {
        let code = doc
            .child_text(err, "errorCode")
            .ok_or(DecodeError::UpnpMissing("errorCode"))?
            .parse::<u16>()
            .map_err(|_| DecodeError::UpnpBadValue("errorCode"))?;
        let description = doc
            .child_text(err, "errorDescription")
            .unwrap_or_default()
            .to_string();
        return Err(SoapError::Fault(UpnpFault { code, description }));
    }
    if doc.named("Fault").next().is_some() {
        return Err(DecodeError::UpnpMissing("UPnPError in fault").into());
    }
    if status != 200 {
        return Err(DecodeError::UpnpBadValue("HTTP status").into());
    }
    let want = format!("{action}Response");
    let resp = doc
        .named(&want)
        .next()
        .ok_or(DecodeError::UpnpMissing("action response"))?;
    Ok(doc
        .children(resp)
        .map(|i| {
            let e = &doc.elements[i];
            (e.name.clone(), e.text.trim().to_string())
        })
        .collect())
}

fn arg<'a>(args: &'a [(String, String)], name: &'static str) -> Result<&'a str, DecodeError> {
    args.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .ok_or(DecodeError::UpnpMissing(name))
}

fn arg_parse<T: std::str::FromStr>(
    args: &[(String, String)],
    name: &'static str,
) -> Result<T, DecodeError> {
    arg(args, name)?
        .parse()
        .map_err(|_| DecodeError::UpnpBadValue(name))
}

/// A success answer without arguments (AddPortMapping, DeletePortMapping,
/// UpdatePinhole, DeletePinhole).
pub fn decode_empty(action: &str, status: u16, body: &[u8]) -> Result<(), SoapError> {
    decode_soap(action, status, body).map(|_| ())
}

/// GetExternalIPAddress's answer. An empty or unparsable address (a router
/// without WAN address sends "") is [`DecodeError::UpnpBadValue`].
pub fn decode_external_ip(status: u16, body: &[u8]) -> Result<IpAddr, SoapError> {
    let args = decode_soap("GetExternalIPAddress", status, body)?;
    Ok(arg_parse(&args, "NewExternalIPAddress")?)
}

/// AddAnyPortMapping's answer: the external port granted.
pub fn decode_reserved_port(status: u16, body: &[u8]) -> Result<u16, SoapError> {
    let args = decode_soap("AddAnyPortMapping", status, body)?;
    Ok(arg_parse(&args, "NewReservedPort")?)
}

/// What GetSpecificPortMappingEntry says about a mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingEntry {
    /// Where it forwards to.
    pub internal_client: IpAddr,
    /// The port it forwards to.
    pub internal_port: u16,
    /// Whether enabled.
    pub enabled: bool,
    /// Its description.
    pub description: String,
    /// Remaining lease (0: permanent).
    pub lease_secs: u32,
}

/// GetSpecificPortMappingEntry's answer; `Ok(None)` for fault 714 (no such
/// mapping).
pub fn decode_mapping_entry(status: u16, body: &[u8]) -> Result<Option<MappingEntry>, SoapError> {
    let args = match decode_soap("GetSpecificPortMappingEntry", status, body) {
        Ok(a) => a,
        Err(SoapError::Fault(f)) if f.code == ERR_NO_SUCH_ENTRY => return Ok(None),
        Err(e) => return Err(e),
    };
    let enabled = match arg(&args, "NewEnabled")? {
        "1" | "true" | "yes" => true,
        "0" | "false" | "no" => false,
        _ => return Err(DecodeError::UpnpBadValue("NewEnabled").into()),
    };
    Ok(Some(MappingEntry {
        internal_client: arg_parse(&args, "NewInternalClient")?,
        internal_port: arg_parse(&args, "NewInternalPort")?,
        enabled,
        description: arg(&args, "NewPortMappingDescription")
            .unwrap_or_default()
            .to_string(),
        lease_secs: arg_parse(&args, "NewLeaseDuration")?,
    }))
}

/// AddPinhole's answer: the pinhole's UniqueID.
pub fn decode_pinhole_id(status: u16, body: &[u8]) -> Result<u16, SoapError> {
    let args = decode_soap("AddPinhole", status, body)?;
    Ok(arg_parse(&args, "UniqueID")?)
}

#[cfg(test)]
mod tests;
