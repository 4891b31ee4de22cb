//! The UPnP-IGD client (v1 and v2): SSDP discovery of the gateway, its
//! device description, and the SOAP actions the port-mapping capability
//! needs, driven by the sans-IO codec in
//! [`reach_proto::nat::portmap::upnp`].
//!
//! Every socket is made through the injected [`UpnpNet`] (lab nodes live
//! in network namespaces of this process), and every await is bounded by a
//! named timeout. The client only ever talks to the gateway address it is
//! given: an SSDP answer from elsewhere is ignored, and a LOCATION or
//! control URL on another address is refused with
//! [`UpnpError::ForeignAddress`].

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use reach_proto::nat::portmap::upnp::{
    self as codec, Description, HttpResponse, PortMappingRequest, ServiceKind, SoapAction,
    SoapError, SsdpKind, SsdpMessage, UpnpFault, Url,
};
use reach_proto::nat::portmap::{DecodeError, Protocol};
use tokio::time::Instant;

use crate::socket::UdpBinder;
use crate::tcp::Connector;

/// Time for one HTTP exchange with the gateway (connect, request, response
/// read until it closes). miniupnpd answers in about a millisecond in the
/// lab; a busy consumer router in tens of ms. 3 s is far beyond both and
/// still short enough that a router that accepts and then hangs does not
/// stall the capability.
pub(crate) const HTTP_TIMEOUT: Duration = Duration::from_secs(3);
/// Interval between M-SEARCH rounds while discovering: SSDP is plain UDP,
/// so a lost search or answer is repeated. Our MX is 1 s, so a device
/// answers within that; searching again every 500 ms overlaps two rounds
/// per MX window without flooding the LAN.
pub(crate) const SSDP_RESEND: Duration = Duration::from_millis(500);
/// Time to bind the discovery socket through the injected binder (it runs
/// on a blocking thread, possibly entering a namespace).
pub(crate) const BIND_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest lease IGDv2 accepts (WANIPConnection:2 §2.3.15: one week); a
/// longer one is refused with error 402 by conforming routers.
pub(crate) const MAX_V2_LEASE_SECS: u32 = 604_800;
/// Distinct LOCATIONs from the gateway fetched at most in one discovery
/// (a router advertises one; a few allow for one per search target).
const MAX_LOCATIONS_TRIED: usize = 4;
/// Search targets sent in each M-SEARCH round: IGDv2 first, and IGDv1 for
/// routers that only answer that.
const SEARCH_TARGETS: [&str; 2] = [codec::ST_IGD_V2, codec::ST_IGD_V1];

/// How the client makes its sockets.
#[derive(Clone)]
pub(crate) struct UpnpNet {
    /// Binds the SSDP socket (count 1).
    pub udp: UdpBinder,
    /// Opens the TCP connections of HTTP and SOAP (blocking; called on a
    /// blocking thread).
    pub tcp: Connector,
}

impl UpnpNet {
    /// Sockets in this process's own network namespace.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn here() -> UpnpNet {
        UpnpNet {
            udp: std::sync::Arc::new(crate::socket::bind_here),
            tcp: std::sync::Arc::new(|to| std::net::TcpStream::connect_timeout(&to, HTTP_TIMEOUT)),
        }
    }
}

/// Why a UPnP exchange failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpnpError {
    /// No IGD answered SSDP from the gateway within the time given.
    #[error("no UPnP-IGD gateway answered at {0}")]
    NoGateway(IpAddr),
    /// An exchange did not finish within its bound.
    #[error("UPnP {0} timed out")]
    Timeout(&'static str),
    /// A socket operation failed.
    #[error("UPnP socket: {0}")]
    Io(#[from] io::Error),
    /// An HTTP status that is neither success nor a SOAP fault.
    #[error("UPnP HTTP status {0}")]
    Http(u16),
    /// The router refused the action with a UPnP error.
    #[error("UPnP error {code}: {description}", code = .0.code, description = .0.description)]
    Soap(UpnpFault),
    /// The router's answer could not be decoded.
    #[error("UPnP answer: {0}")]
    Decode(#[from] DecodeError),
    /// A LOCATION or control URL on an address other than the gateway's.
    #[error("UPnP URL on {0}, not on the gateway")]
    ForeignAddress(IpAddr),
    #[cfg_attr(not(test), allow(dead_code))]
    /// The gateway offers no WANIPv6FirewallControl service.
    #[error("the UPnP gateway has no IPv6 firewall service")]
    NoIpv6Firewall,
    /// An address of the wrong family (IPv6 for a port mapping, IPv4 for a
    /// pinhole).
    #[error("UPnP: {0} is of the wrong address family for this action")]
    AddressFamily(IpAddr),
}

impl UpnpError {
    /// Stable machine-readable name of this error kind.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            UpnpError::NoGateway(_) => "upnp_no_gateway",
            UpnpError::Timeout(_) => "upnp_timeout",
            UpnpError::Io(_) => "upnp_io",
            UpnpError::Http(_) => "upnp_http",
            UpnpError::Soap(_) => "upnp_soap",
            UpnpError::Decode(_) => "upnp_decode",
            UpnpError::ForeignAddress(_) => "upnp_foreign_address",
            UpnpError::NoIpv6Firewall => "upnp_no_ipv6_firewall",
            UpnpError::AddressFamily(_) => "upnp_address_family",
        }
    }

    /// The UPnP error code, for [`UpnpError::Soap`].
    pub(crate) fn soap_code(&self) -> Option<u16> {
        match self {
            UpnpError::Soap(f) => Some(f.code),
            _ => None,
        }
    }
}

impl From<SoapError> for UpnpError {
    fn from(e: SoapError) -> Self {
        match e {
            SoapError::Fault(f) => UpnpError::Soap(f),
            SoapError::Decode(d) => UpnpError::Decode(d),
        }
    }
}

/// A mapping the router granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mapped {
    /// The external port (the internal one, unless IGDv2's
    /// AddAnyPortMapping picked another after a conflict).
    pub external_port: u16,
    /// The lease granted in seconds; 0: the router only accepts permanent
    /// mappings (error 725), so this one must be deleted explicitly.
    pub lease_secs: u32,
}

/// A gateway that answered SSDP and described an IGD connection service.
#[derive(Debug, Clone)]
pub(crate) struct Igd {
    gateway: IpAddr,
    service: ServiceKind,
    control_url: Url,
    #[cfg_attr(not(test), allow(dead_code))]
    ipv6_firewall_url: Option<Url>,
    boot_id: Option<u32>,
}

/// Sends M-SEARCH from `local_ip` to 239.255.255.250:1900 and unicast to
/// `gateway:1900` (which miniupnpd also answers), takes the first answer
/// from `gateway` only, and fetches its description; all within `timeout`.
pub(crate) async fn discover(
    net: &UpnpNet,
    local_ip: IpAddr,
    gateway: IpAddr,
    timeout: Duration,
) -> Result<Igd, UpnpError> {
    let deadline = Instant::now() + timeout;
    let binder = net.udp.clone();
    let bind = SocketAddr::new(local_ip, 0);
    let std = tokio::time::timeout(
        BIND_TIMEOUT,
        tokio::task::spawn_blocking(move || binder(bind, 1)),
    )
    .await
    .map_err(|_| UpnpError::Timeout("bind"))?
    .map_err(io::Error::other)??
    .pop()
    .ok_or_else(|| io::Error::other("the binder opened no socket"))?;
    std.set_nonblocking(true)?;
    let sock = tokio::net::UdpSocket::from_std(std)?;
    let mut targets = vec![SocketAddr::new(gateway, codec::SSDP_PORT)];
    if gateway.is_ipv4() {
        targets.push(SocketAddr::new(
            codec::SSDP_MULTICAST_V4.into(),
            codec::SSDP_PORT,
        ));
    }
    let mut buf = vec![0u8; codec::MAX_SSDP_LEN + 1];
    let mut next_search = Instant::now();
    let mut last_error = None;
    // LOCATIONs already fetched without success: the gateway answers every
    // search round (4 answers each), and one failing description is not
    // fetched again and again.
    let mut tried: Vec<Option<String>> = Vec::new();
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if now >= next_search {
            for st in SEARCH_TARGETS {
                let msg = codec::encode_msearch(st);
                for to in &targets {
                    // A failed send (no multicast route) leaves the others.
                    let _ = sock.send_to(&msg, to).await;
                }
            }
            next_search = now + SSDP_RESEND;
        }
        let until = next_search.min(deadline);
        let (n, from) = match tokio::time::timeout_at(until, sock.recv_from(&mut buf)).await {
            Err(_) => continue,
            // e.g. an ICMP error surfaced on the socket: keep listening.
            Ok(Err(_)) => continue,
            Ok(Ok(got)) => got,
        };
        if from.ip() != gateway {
            continue;
        }
        let answer = match SsdpMessage::decode(&buf[..n]) {
            Ok(m) if m.kind == SsdpKind::SearchResponse => m,
            _ => continue,
        };
        if tried.contains(&answer.location) || tried.len() >= MAX_LOCATIONS_TRIED {
            continue;
        }
        let attempt = tokio::time::timeout_at(deadline, describe(net, gateway, &answer)).await;
        match attempt {
            Ok(Ok(igd)) => return Ok(igd),
            Ok(Err(e)) => {
                tried.push(answer.location);
                last_error = Some(e);
            }
            Err(_) => return Err(UpnpError::Timeout("description")),
        }
    }
    Err(last_error.unwrap_or(UpnpError::NoGateway(gateway)))
}

/// Fetches and reads the description an SSDP answer points to.
async fn describe(net: &UpnpNet, gateway: IpAddr, answer: &SsdpMessage) -> Result<Igd, UpnpError> {
    let location = Url::parse(
        answer
            .location
            .as_deref()
            .ok_or(DecodeError::UpnpMissing("LOCATION header"))?,
    )?;
    let response = exchange(net, gateway, &location, codec::encode_get(&location)).await?;
    if response.status != 200 {
        return Err(UpnpError::Http(response.status));
    }
    let d = Description::parse(&response.body, &location)?;
    for url in std::iter::once(&d.control_url).chain(d.ipv6_firewall_url.as_ref()) {
        if url.ip != gateway {
            return Err(UpnpError::ForeignAddress(url.ip));
        }
    }
    Ok(Igd {
        gateway,
        service: d.service,
        control_url: d.control_url,
        ipv6_firewall_url: d.ipv6_firewall_url,
        boot_id: answer.boot_id,
    })
}

/// One HTTP exchange with the gateway: connect through the injected
/// connector, send `request`, read the answer until the gateway closes (we
/// send `Connection: close`), at most [`codec::MAX_HTTP_RESPONSE`] bytes.
async fn exchange(
    net: &UpnpNet,
    gateway: IpAddr,
    url: &Url,
    request: Vec<u8>,
) -> Result<HttpResponse, UpnpError> {
    if url.ip != gateway {
        return Err(UpnpError::ForeignAddress(url.ip));
    }
    let connector = net.tcp.clone();
    let to = url.socket_addr();
    let blocking = tokio::task::spawn_blocking(move || -> io::Result<Vec<u8>> {
        let mut stream = connector(to)?;
        // Bound the blocking thread too, not only our wait for it.
        stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
        stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
        stream.write_all(&request)?;
        let mut bytes = Vec::new();
        (&mut stream)
            .take(codec::MAX_HTTP_RESPONSE as u64 + 1)
            .read_to_end(&mut bytes)?;
        Ok(bytes)
    });
    let bytes = tokio::time::timeout(HTTP_TIMEOUT, blocking)
        .await
        .map_err(|_| UpnpError::Timeout("HTTP"))?
        .map_err(io::Error::other)??;
    Ok(HttpResponse::decode(&bytes)?)
}

impl Igd {
    /// IGD version of the chosen service: 2 (WANIPConnection:2) or 1.
    pub(crate) fn version(&self) -> u8 {
        self.service.version()
    }

    /// BOOTID.UPNP.ORG of the SSDP answer, if the router sent one: a
    /// different one later means the router restarted.
    pub(crate) fn boot_id(&self) -> Option<u32> {
        self.boot_id
    }

    // IPv6 pinholes (IGDv2 WANIPv6FirewallControl) are tested against
    // miniupnpd; the node itself opens IPv6 pinholes with PCP.
    #[cfg_attr(not(test), allow(dead_code))]
    /// The gateway's address.
    pub(crate) fn gateway(&self) -> IpAddr {
        self.gateway
    }

    // IPv6 pinholes (IGDv2 WANIPv6FirewallControl) are tested against
    // miniupnpd; the node itself opens IPv6 pinholes with PCP.
    #[cfg_attr(not(test), allow(dead_code))]
    /// Whether the gateway offers IPv6 pinholes (WANIPv6FirewallControl).
    pub(crate) fn has_ipv6_firewall(&self) -> bool {
        self.ipv6_firewall_url.is_some()
    }

    /// Posts `action` to the service at `url`; (status, body) of a success
    /// (200) or a fault (500).
    async fn call(
        &self,
        net: &UpnpNet,
        url: &Url,
        service_type: &str,
        action: &SoapAction,
    ) -> Result<(u16, Vec<u8>), UpnpError> {
        let request = codec::encode_soap_post(url, service_type, action);
        let r = exchange(net, self.gateway, url, request).await?;
        if r.status != 200 && r.status != 500 {
            return Err(UpnpError::Http(r.status));
        }
        Ok((r.status, r.body))
    }

    async fn call_connection(
        &self,
        net: &UpnpNet,
        action: &SoapAction,
    ) -> Result<(u16, Vec<u8>), UpnpError> {
        self.call(net, &self.control_url, self.service.service_type(), action)
            .await
    }

    /// The router's external address (GetExternalIPAddress).
    pub(crate) async fn external_ip(&self, net: &UpnpNet) -> Result<IpAddr, UpnpError> {
        let (status, body) = self
            .call_connection(net, &SoapAction::get_external_ip())
            .await?;
        Ok(codec::decode_external_ip(status, &body)?)
    }

    /// Maps external port `internal.port()` (the internal port kept as is)
    /// to `internal` for `lease_secs` (at least 1: 0 would mean "permanent"
    /// in IGDv1). On a conflict (718) an IGDv2 router is asked with
    /// AddAnyPortMapping for another port; a router that only accepts
    /// permanent leases (725) is asked again with 0, which [`Mapped`] says.
    pub(crate) async fn add_port_mapping(
        &self,
        net: &UpnpNet,
        protocol: Protocol,
        internal: SocketAddr,
        lease_secs: u32,
        description: &str,
    ) -> Result<Mapped, UpnpError> {
        let IpAddr::V4(client) = internal.ip() else {
            return Err(UpnpError::AddressFamily(internal.ip()));
        };
        let mut lease = lease_secs.max(1);
        if self.version() >= 2 {
            lease = lease.min(MAX_V2_LEASE_SECS);
        }
        let mut request = PortMappingRequest {
            protocol,
            external_port: internal.port(),
            internal_port: internal.port(),
            internal_client: client,
            lease_secs: lease,
            description: description.to_string(),
        };
        let first = self.add(net, &request).await;
        match first {
            Ok(()) => Ok(Mapped {
                external_port: internal.port(),
                lease_secs: lease,
            }),
            Err(e) if e.soap_code() == Some(codec::ERR_ONLY_PERMANENT_LEASES) => {
                request.lease_secs = 0;
                self.add(net, &request).await?;
                Ok(Mapped {
                    external_port: internal.port(),
                    lease_secs: 0,
                })
            }
            Err(e) if e.soap_code() == Some(codec::ERR_CONFLICT) && self.version() >= 2 => {
                let action = SoapAction::add_any_port_mapping(&request);
                let (status, body) = self.call_connection(net, &action).await?;
                let port = codec::decode_reserved_port(status, &body)?;
                Ok(Mapped {
                    external_port: port,
                    lease_secs: lease,
                })
            }
            Err(e) => Err(e),
        }
    }

    async fn add(&self, net: &UpnpNet, request: &PortMappingRequest) -> Result<(), UpnpError> {
        let action = SoapAction::add_port_mapping(request);
        let (status, body) = self.call_connection(net, &action).await?;
        Ok(codec::decode_empty(action.name, status, &body)?)
    }

    /// Deletes the mapping of `external_port`. One that is already gone
    /// (714) counts as deleted.
    pub(crate) async fn delete_port_mapping(
        &self,
        net: &UpnpNet,
        protocol: Protocol,
        external_port: u16,
    ) -> Result<(), UpnpError> {
        let action = SoapAction::delete_port_mapping(protocol, external_port);
        let (status, body) = self.call_connection(net, &action).await?;
        match codec::decode_empty(action.name, status, &body) {
            Err(SoapError::Fault(f)) if f.code == codec::ERR_NO_SUCH_ENTRY => Ok(()),
            other => Ok(other?),
        }
    }

    /// What the router holds for `external_port` (GetSpecificPortMappingEntry);
    /// None if nothing.
    pub(crate) async fn mapping(
        &self,
        net: &UpnpNet,
        protocol: Protocol,
        external_port: u16,
    ) -> Result<Option<codec::MappingEntry>, UpnpError> {
        let action = SoapAction::get_specific_port_mapping_entry(protocol, external_port);
        let (status, body) = self.call_connection(net, &action).await?;
        Ok(codec::decode_mapping_entry(status, &body)?)
    }

    /// Whether the router still holds a mapping of `external_port` (a
    /// flushed table answers no).
    pub(crate) async fn mapping_exists(
        &self,
        net: &UpnpNet,
        protocol: Protocol,
        external_port: u16,
    ) -> Result<bool, UpnpError> {
        Ok(self.mapping(net, protocol, external_port).await?.is_some())
    }

    #[cfg_attr(not(test), allow(dead_code))]
    fn firewall(&self) -> Result<&Url, UpnpError> {
        self.ipv6_firewall_url
            .as_ref()
            .ok_or(UpnpError::NoIpv6Firewall)
    }

    #[cfg_attr(not(test), allow(dead_code))]
    /// Opens an IPv6 pinhole from anywhere to `internal` for `lease_secs`
    /// (AddPinhole); returns its UniqueID for updates and deletion.
    pub(crate) async fn add_pinhole(
        &self,
        net: &UpnpNet,
        protocol: Protocol,
        internal: SocketAddr,
        lease_secs: u32,
    ) -> Result<u16, UpnpError> {
        let IpAddr::V6(client) = internal.ip() else {
            return Err(UpnpError::AddressFamily(internal.ip()));
        };
        let url = self.firewall()?;
        let action = SoapAction::add_pinhole(protocol, client, internal.port(), lease_secs.max(1));
        let (status, body) = self
            .call(net, url, codec::WAN_IPV6_FIREWALL_1, &action)
            .await?;
        Ok(codec::decode_pinhole_id(status, &body)?)
    }

    #[cfg_attr(not(test), allow(dead_code))]
    /// Renews pinhole `id` for `lease_secs` (UpdatePinhole).
    pub(crate) async fn update_pinhole(
        &self,
        net: &UpnpNet,
        id: u16,
        lease_secs: u32,
    ) -> Result<(), UpnpError> {
        let url = self.firewall()?;
        let action = SoapAction::update_pinhole(id, lease_secs.max(1));
        let (status, body) = self
            .call(net, url, codec::WAN_IPV6_FIREWALL_1, &action)
            .await?;
        Ok(codec::decode_empty(action.name, status, &body)?)
    }

    #[cfg_attr(not(test), allow(dead_code))]
    /// Closes pinhole `id` (DeletePinhole).
    pub(crate) async fn delete_pinhole(&self, net: &UpnpNet, id: u16) -> Result<(), UpnpError> {
        let url = self.firewall()?;
        let action = SoapAction::delete_pinhole(id);
        let (status, body) = self
            .call(net, url, codec::WAN_IPV6_FIREWALL_1, &action)
            .await?;
        Ok(codec::decode_empty(action.name, status, &body)?)
    }
}

/// Decodes an SSDP NOTIFY datagram (for a listener on
/// 239.255.255.250:1900): the LOCATION and BOOTID of an IGD's `ssdp:alive`
/// or `ssdp:update`; None for anything else (byebye, other devices,
/// garbage). The caller still checks the sender is the gateway.
pub(crate) fn decode_notify(datagram: &[u8]) -> Option<(Url, Option<u32>)> {
    let m = SsdpMessage::decode(datagram).ok()?;
    if !matches!(m.kind, SsdpKind::Alive | SsdpKind::Update) {
        return None;
    }
    if !m
        .target
        .starts_with("urn:schemas-upnp-org:device:InternetGatewayDevice:")
    {
        return None;
    }
    Some((Url::parse(m.location.as_deref()?).ok()?, m.boot_id))
}

#[cfg(test)]
mod tests;
