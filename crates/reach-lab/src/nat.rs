//! NAT kinds, in RFC 4787 terms, as nftables rulesets on router namespaces.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reach_proto::nat::{Filtering, Mapping};
use serde::Serialize;

use crate::miniupnpd::{MiniUpnpd, PortMapProtocol};
use crate::netns::{Lab, LabError};

/// The kinds of network a node can sit in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NatKind {
    /// No NAT, no firewall.
    Public,
    /// Endpoint-independent mapping and filtering (1:1 NAT, "full cone").
    EimEif,
    /// Endpoint-independent mapping, address-dependent filtering (1:1 NAT
    /// plus a forward filter keyed on a dynamic set of contacted IPs).
    EimAdf,
    /// Stock port-preserving masquerade: the common home router.
    EimApdf,
    /// Endpoint-dependent mapping: `masquerade fully-random`.
    Edm,
    /// An eim-apdf NAT behind a second one (carrier-grade NAT).
    Cgnat,
    /// No NAT, but unsolicited inbound dropped (a stateful firewall).
    Firewall,
    /// Two peers behind one eim-apdf router.
    SameNat,
    /// An eim-apdf router that drops all UDP from the inside: only TCP
    /// gets out (some corporate and hotel networks).
    UdpBlocked,
    /// An eim-apdf router running miniupnpd with only UPnP-IGD enabled.
    Upnp,
    /// An eim-apdf router running miniupnpd with only NAT-PMP answered.
    Natpmp,
    /// An eim-apdf router running miniupnpd with only PCP answered.
    Pcp,
}

/// The kinds whose router runs miniupnpd (see [`crate::miniupnpd`]). Not
/// in [`MATRIX_KINDS`] / [`ALL_KINDS`] yet: nodes do not map ports yet.
pub const PORTMAP_KINDS: [NatKind; 3] = [NatKind::Upnp, NatKind::Natpmp, NatKind::Pcp];

/// Every kind the connectivity matrix runs (`reach lab matrix`): the NAT
/// kinds, a network that blocks UDP, and the routers that map ports. The
/// port-mapping kinds come last, so in each pair with one of them it is
/// the side dialed (B): the pair shows whether its mapping lets a stranger
/// in directly on the first dial.
pub const MATRIX_KINDS: [NatKind; 12] = [
    NatKind::Public,
    NatKind::EimEif,
    NatKind::EimAdf,
    NatKind::EimApdf,
    NatKind::Edm,
    NatKind::Cgnat,
    NatKind::Firewall,
    NatKind::SameNat,
    NatKind::UdpBlocked,
    NatKind::Upnp,
    NatKind::Natpmp,
    NatKind::Pcp,
];

/// Every NAT kind the classification runs (`reach lab nat`), in matrix
/// order. (UDP-blocked networks cannot be classified: no UDP gets out.)
pub const ALL_KINDS: [NatKind; 8] = [
    NatKind::Public,
    NatKind::EimEif,
    NatKind::EimAdf,
    NatKind::EimApdf,
    NatKind::Edm,
    NatKind::Cgnat,
    NatKind::Firewall,
    NatKind::SameNat,
];

impl NatKind {
    pub fn name(&self) -> &'static str {
        match self {
            NatKind::Public => "public",
            NatKind::EimEif => "eim-eif",
            NatKind::EimAdf => "eim-adf",
            NatKind::EimApdf => "eim-apdf",
            NatKind::Edm => "edm",
            NatKind::Cgnat => "cgnat",
            NatKind::Firewall => "firewall",
            NatKind::SameNat => "same-nat",
            NatKind::UdpBlocked => "udp-blocked",
            NatKind::Upnp => "upnp",
            NatKind::Natpmp => "natpmp",
            NatKind::Pcp => "pcp",
        }
    }

    pub fn parse(s: &str) -> Option<NatKind> {
        MATRIX_KINDS
            .iter()
            .chain(PORTMAP_KINDS.iter())
            .copied()
            .find(|k| k.name() == s)
    }

    /// The one port-mapping protocol this kind's router answers, if any.
    pub fn portmap_protocol(&self) -> Option<PortMapProtocol> {
        match self {
            NatKind::Upnp => Some(PortMapProtocol::Upnp),
            NatKind::Natpmp => Some(PortMapProtocol::Natpmp),
            NatKind::Pcp => Some(PortMapProtocol::Pcp),
            _ => None,
        }
    }

    /// The behaviour the lab configures, which classification must find.
    pub fn expected(&self) -> (Mapping, Filtering) {
        use Filtering::*;
        match self {
            NatKind::Public => (Mapping::EndpointIndependent, EndpointIndependent),
            NatKind::EimEif => (Mapping::EndpointIndependent, EndpointIndependent),
            NatKind::EimAdf => (Mapping::EndpointIndependent, AddressDependent),
            NatKind::EimApdf
            | NatKind::Cgnat
            | NatKind::SameNat
            | NatKind::Firewall
            | NatKind::Upnp
            | NatKind::Natpmp
            | NatKind::Pcp => (Mapping::EndpointIndependent, AddressAndPortDependent),
            NatKind::Edm => (Mapping::EndpointDependent, AddressAndPortDependent),
            NatKind::UdpBlocked => (Mapping::Unknown, Unknown),
        }
    }

    /// Whether the node's address is translated.
    pub fn translated(&self) -> bool {
        !matches!(self, NatKind::Public | NatKind::Firewall)
    }
}

/// The shared "internet" of a lab run: a bridge namespace and a namespace of
/// public hosts.
pub struct Internet {
    pub bridge: String,
    pub public: String,
    ports: u32,
    /// Namespaces plugged into the bridge, with their interface on it.
    attached: Vec<(String, String)>,
    /// Whether some router has a WAN address in [`PORTMAP_WAN_PREFIX`]:
    /// then every namespace on the bridge has an on-link route to it.
    portmap_prefix: bool,
    /// Whether the public namespace has its IPv6 address
    /// ([`Internet::enable_ipv6`]).
    ipv6: bool,
    /// Routed public subnets behind routers (subnet, gateway, router ns):
    /// every host on the internet needs them, as on the real one.
    routes: Vec<(String, String, String)>,
}

/// The public subnet, inside the lab only.
pub const PUBLIC_PREFIX: &str = "203.0.113";

/// Where routers that run miniupnpd take their WAN address (`.100 + i`):
/// miniupnpd refuses to map behind a reserved address and counts TEST-NET
/// as reserved, but treats 11.250.0.0/24 as public (its own tests use
/// 11.250.42.12). Only ever inside the lab's namespaces, on the same bridge
/// as [`PUBLIC_PREFIX`] (on-link routes both ways); the lab checks that the
/// root namespace has no route to it before using it.
pub const PORTMAP_WAN_PREFIX: &str = "11.250.0";

/// The lab's IPv6 "internet" (a /64 of the documentation prefix, only
/// inside the lab's namespaces; this machine's root namespace uses fd00::/64):
/// the public namespace is `::10`, IPv6 routers' WANs `::{100+i}`.
pub const PUBLIC_PREFIX6: &str = "2001:db8:0:ffff";

impl Internet {
    pub fn build(lab: &mut Lab) -> Result<Internet, LabError> {
        let bridge = lab.add_ns("inet")?;
        lab.run(&["ip", "-n", &bridge, "link", "add", "br0", "type", "bridge"])?;
        lab.run(&["ip", "-n", &bridge, "link", "set", "br0", "up"])?;
        let public = lab.add_ns("pub")?;
        let mut net = Internet {
            bridge,
            public: public.clone(),
            ports: 0,
            attached: Vec::new(),
            portmap_prefix: false,
            ipv6: false,
            routes: Vec::new(),
        };
        net.attach(lab, &public, "eth0", &format!("{PUBLIC_PREFIX}.10/24"))?;
        Ok(net)
    }

    /// Plugs namespace `ns` into the bridge as interface `dev` with `addr`.
    pub fn attach(
        &mut self,
        lab: &mut Lab,
        ns: &str,
        dev: &str,
        addr: &str,
    ) -> Result<(), LabError> {
        self.ports += 1;
        let port = format!("p{}", self.ports);
        lab.veth(ns, dev, addr, &self.bridge.clone(), &port, "")?;
        lab.run(&[
            "ip",
            "-n",
            &self.bridge,
            "link",
            "set",
            &port,
            "master",
            "br0",
        ])?;
        let portmap_subnet = format!("{PORTMAP_WAN_PREFIX}.0/24");
        if addr.starts_with(&format!("{PORTMAP_WAN_PREFIX}.")) {
            self.enable_portmap_prefix(lab)?;
            let public_subnet = format!("{PUBLIC_PREFIX}.0/24");
            lab.run(&["ip", "-n", ns, "route", "add", &public_subnet, "dev", dev])?;
        } else if self.portmap_prefix {
            lab.run(&["ip", "-n", ns, "route", "add", &portmap_subnet, "dev", dev])?;
        }
        for (subnet, via, _) in &self.routes {
            lab.run(&["ip", "-n", ns, "route", "add", subnet, "via", via])?;
        }
        self.attached.push((ns.to_string(), dev.to_string()));
        Ok(())
    }

    /// Puts [`PORTMAP_WAN_PREFIX`] on the bridge: an on-link route to it in
    /// every namespace already attached (later ones get it in `attach`).
    /// Refuses if the root namespace has a route to it more specific than
    /// its default route: the lab must not shadow or reach a real network.
    fn enable_portmap_prefix(&mut self, lab: &Lab) -> Result<(), LabError> {
        if self.portmap_prefix {
            return Ok(());
        }
        let subnet = format!("{PORTMAP_WAN_PREFIX}.0/24");
        let routes = lab.run(&["ip", "-4", "route", "show", "match", &subnet])?;
        if let Some(route) = routes
            .lines()
            .map(str::trim)
            .find(|r| !r.is_empty() && !r.starts_with("default"))
        {
            return Err(LabError::Other(format!(
                "the root namespace has a route to {subnet} ({route}); the lab uses that range \
                 for miniupnpd routers only when it is unused here"
            )));
        }
        for (ns, dev) in &self.attached {
            lab.run(&["ip", "-n", ns, "route", "add", &subnet, "dev", dev])?;
        }
        self.portmap_prefix = true;
        Ok(())
    }

    /// Gives the public namespace its IPv6 address ([`PUBLIC_PREFIX6`]`::10`)
    /// and returns it.
    pub fn enable_ipv6(&mut self, lab: &Lab) -> Result<Ipv6Addr, LabError> {
        let addr = format!("{PUBLIC_PREFIX6}::10");
        if !self.ipv6 {
            let cidr = format!("{addr}/64");
            lab.run(&[
                "ip",
                "-n",
                &self.public,
                "addr",
                "add",
                &cidr,
                "dev",
                "eth0",
                "nodad",
            ])?;
            self.ipv6 = true;
        }
        addr.parse()
            .map_err(|_| LabError::Other(format!("bad address {addr}")))
    }

    /// Makes `subnet` reachable through the router namespace `router` at
    /// `via` from every namespace on the internet, now and later.
    pub fn add_route(
        &mut self,
        lab: &Lab,
        subnet: &str,
        via: &str,
        router: &str,
    ) -> Result<(), LabError> {
        for (ns, _) in self.attached.iter().filter(|(ns, _)| ns != router) {
            lab.run(&["ip", "-n", ns, "route", "add", subnet, "via", via])?;
        }
        self.routes
            .push((subnet.to_string(), via.to_string(), router.to_string()));
        Ok(())
    }

    /// Adds another public IP (`.host`) to the public namespace.
    pub fn add_public_ip(&self, lab: &Lab, host: u8) -> Result<IpAddr, LabError> {
        let cidr = format!("{PUBLIC_PREFIX}.{host}/24");
        lab.run(&[
            "ip",
            "-n",
            &self.public,
            "addr",
            "add",
            &cidr,
            "dev",
            "eth0",
        ])?;
        Ok(IpAddr::V4(Ipv4Addr::new(203, 0, 113, host)))
    }
}

/// One site: where a node of a given kind lives.
pub struct Site {
    pub kind: NatKind,
    /// Namespace the node's socket lives in.
    pub node_ns: String,
    /// The node's own (inside) address.
    pub node_ip: IpAddr,
    /// Second node of a same-nat site.
    pub peer: Option<(String, IpAddr)>,
    /// The outermost router, if any.
    pub router: Option<String>,
    /// Where the site's packets come from on the internet.
    pub public_ip: IpAddr,
    /// The router's miniupnpd (kinds in [`PORTMAP_KINDS`]); stopped when
    /// the site is dropped.
    pub miniupnpd: Option<MiniUpnpd>,
    /// The node's IPv6 address, once [`Site::enable_ipv6`] gave it one.
    pub node_ip6: Option<Ipv6Addr>,
}

/// A masquerading router, which (like a home router: OpenWrt's default
/// `wan` zone rejects input) drops unsolicited packets addressed to itself
/// on its WAN side. That matters for hole punching: a packet accepted to
/// the router's own address leaves an UNREPLIED conntrack entry for its
/// 4-tuple, and the router then moves the inside host's next mapping
/// towards that peer to another port (measured in this lab); a dropped
/// packet's entry is never confirmed.
fn masquerade(extra: &str) -> String {
    format!(
        "table ip nat {{
  chain post {{
    type nat hook postrouting priority 100;
    oifname \"wan\" masquerade {extra}
  }}
}}
table ip router_input {{
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname \"wan\" ct state established,related accept
    iifname \"wan\" drop
  }}
}}
"
    )
}

fn one_to_one(wan_ip: &str, inside: &str) -> String {
    format!(
        "table ip nat {{
  chain pre {{
    type nat hook prerouting priority -100;
    iifname \"wan\" ip daddr {wan_ip} dnat to {inside}
  }}
  chain post {{
    type nat hook postrouting priority 100;
    oifname \"wan\" ip saddr {inside} snat to {wan_ip}
  }}
}}
"
    )
}

/// Address-dependent filtering: remember every IP the inside sent to (for a
/// while) and let inbound through only from those.
const ADF_FILTER: &str = "table ip filter {
  set contacted { type ipv4_addr; flags timeout; }
  chain forward_filter {
    type filter hook forward priority 0; policy drop;
    iifname \"lan\" oifname \"wan\" update @contacted { ip daddr timeout 300s } accept
    ct state established,related accept
    iifname \"wan\" ip saddr @contacted accept
  }
}
";

/// Nothing over UDP leaves the inside.
const UDP_BLOCK: &str = "table ip filter {
  chain forward_filter {
    type filter hook forward priority 0; policy accept;
    iifname \"lan\" meta l4proto udp drop
  }
}
";

const STATEFUL_FIREWALL: &str = "table ip filter {
  chain forward_filter {
    type filter hook forward priority 0; policy drop;
    iifname \"lan\" accept
    ct state established,related accept
  }
}
";

/// The chains miniupnpd manages on a port-mapping router (the layout of
/// Debian's /etc/miniupnpd/nft_init.sh, in a table of its own; names
/// passed to miniupnpd by [`crate::miniupnpd`]). The forward chain is the
/// router's stateful filter, for IPv4 and IPv6: what the LAN sends and its
/// replies pass, and from outside only what a miniupnpd rule accepts (a
/// mapping's DNATed packets, an IPv6 pinhole). Unsolicited packets to the
/// WAN address itself are not forwarded (nothing DNATs them) and are
/// dropped by the masquerading router's input chain: eim-apdf.
pub const MINIUPNPD_CHAINS: &str = "table inet miniupnpd {
  chain forward {
    type filter hook forward priority 0; policy drop;
    iifname \"lan\" accept
    ct state established,related accept
    jump miniupnpd
  }
  chain miniupnpd {
  }
  chain prerouting {
    type nat hook prerouting priority -100; policy accept;
    jump prerouting_miniupnpd
  }
  chain postrouting {
    type nat hook postrouting priority 100; policy accept;
    jump postrouting_miniupnpd
  }
  chain prerouting_miniupnpd {
  }
  chain postrouting_miniupnpd {
  }
}
";

/// miniupnpd's `enable_natpmp=yes` answers both NAT-PMP (version 0) and PCP
/// (version 2) on UDP 5351. To make a router speak only one of them, drop
/// the other version's packets (first payload byte, `@th,64,8`) both ways
/// on the LAN side: requests in, and miniupnpd's announcements out.
fn only_version(protocol: PortMapProtocol) -> Option<String> {
    let keep = match protocol {
        PortMapProtocol::Natpmp => 0,
        PortMapProtocol::Pcp => 2,
        PortMapProtocol::Upnp => return None,
    };
    Some(format!(
        "table inet portmap_only {{
  chain input {{
    type filter hook input priority -10; policy accept;
    iifname \"lan\" udp dport 5351 @th,64,8 != {keep} drop
  }}
  chain output {{
    type filter hook output priority -10; policy accept;
    oifname \"lan\" udp sport 5351 @th,64,8 != {keep} drop
  }}
}}
"
    ))
}

/// A router namespace with `wan` on the internet and `lan` to `inside_ns`.
fn router(
    lab: &mut Lab,
    net: &mut Internet,
    name: &str,
    wan_cidr: &str,
) -> Result<String, LabError> {
    let r = lab.add_ns(name)?;
    net.attach(lab, &r, "wan", wan_cidr)?;
    lab.exec(&r, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    Ok(r)
}

fn client(
    lab: &mut Lab,
    name: &str,
    router: &str,
    cidr: &str,
    gw: &str,
) -> Result<String, LabError> {
    let c = lab.add_ns(name)?;
    lab.veth(&c, "eth0", cidr, router, "lan", "")?;
    lab.run(&["ip", "-n", &c, "route", "add", "default", "via", gw])?;
    Ok(c)
}

impl Site {
    /// Builds site number `i` (1..=50) of `kind`, with `delay_ms` of netem on
    /// each router's WAN side.
    pub fn build(
        lab: &mut Lab,
        net: &mut Internet,
        kind: NatKind,
        i: u8,
        delay_ms: u32,
    ) -> Result<Site, LabError> {
        let wan_prefix = match kind.portmap_protocol() {
            Some(_) => PORTMAP_WAN_PREFIX,
            None => PUBLIC_PREFIX,
        };
        let wan_ip = format!("{wan_prefix}.{}", 100 + i);
        let wan = format!("{wan_ip}/24");
        let lan_gw = format!("10.{i}.0.1");
        let lan_gw_cidr = format!("{lan_gw}/24");
        let inside = format!("10.{i}.0.2");
        let inside_cidr = format!("{inside}/24");
        let ip = |s: &str| -> Result<IpAddr, LabError> {
            s.parse()
                .map_err(|_| LabError::Other(format!("bad address {s}")))
        };
        let site = match kind {
            NatKind::Public => {
                let ns = lab.add_ns(&format!("s{i}"))?;
                let addr = format!("{PUBLIC_PREFIX}.{}", 150 + i);
                net.attach(lab, &ns, "eth0", &format!("{addr}/24"))?;
                Site {
                    kind,
                    node_ns: ns,
                    node_ip: ip(&addr)?,
                    peer: None,
                    router: None,
                    public_ip: ip(&addr)?,
                    miniupnpd: None,
                    node_ip6: None,
                }
            }
            NatKind::Firewall => {
                // A public /29 behind a router that routes (no NAT) and drops
                // unsolicited inbound.
                let r = router(lab, net, &format!("r{i}"), &wan)?;
                let base = 8 * u32::from(i);
                let gw = format!("198.51.100.{}", base + 1);
                let addr = format!("198.51.100.{}", base + 2);
                let c = client(lab, &format!("c{i}"), &r, &format!("{addr}/29"), &gw)?;
                lab.run(&[
                    "ip",
                    "-n",
                    &r,
                    "addr",
                    "add",
                    &format!("{gw}/29"),
                    "dev",
                    "lan",
                ])?;
                let subnet = format!("198.51.100.{base}/29");
                net.add_route(lab, &subnet, &wan_ip, &r)?;
                lab.nft(&r, STATEFUL_FIREWALL)?;
                Site {
                    kind,
                    node_ns: c,
                    node_ip: ip(&addr)?,
                    peer: None,
                    router: Some(r),
                    public_ip: ip(&addr)?,
                    miniupnpd: None,
                    node_ip6: None,
                }
            }
            NatKind::Cgnat => {
                let outer = router(lab, net, &format!("r{i}"), &wan)?;
                let inner = lab.add_ns(&format!("r{i}i"))?;
                let shared_gw = format!("100.64.{i}.1");
                lab.veth(
                    &inner,
                    "wan",
                    &format!("100.64.{i}.2/24"),
                    &outer,
                    "lan",
                    &format!("{shared_gw}/24"),
                )?;
                lab.run(&[
                    "ip", "-n", &inner, "route", "add", "default", "via", &shared_gw,
                ])?;
                lab.exec(&inner, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
                let c = client(lab, &format!("c{i}"), &inner, &inside_cidr, &lan_gw)?;
                lab.run(&[
                    "ip",
                    "-n",
                    &inner,
                    "addr",
                    "add",
                    &lan_gw_cidr,
                    "dev",
                    "lan",
                ])?;
                lab.nft(&inner, &masquerade(""))?;
                lab.nft(&outer, &masquerade(""))?;
                Site {
                    kind,
                    node_ns: c,
                    node_ip: ip(&inside)?,
                    peer: None,
                    router: Some(outer),
                    public_ip: ip(&wan_ip)?,
                    miniupnpd: None,
                    node_ip6: None,
                }
            }
            _ => {
                let r = router(lab, net, &format!("r{i}"), &wan)?;
                let c = client(lab, &format!("c{i}"), &r, &inside_cidr, &lan_gw)?;
                lab.run(&["ip", "-n", &r, "addr", "add", &lan_gw_cidr, "dev", "lan"])?;
                let mut peer = None;
                let mut miniupnpd = None;
                match kind {
                    NatKind::EimEif => lab.nft(&r, &one_to_one(&wan_ip, &inside))?,
                    NatKind::EimAdf => {
                        lab.nft(&r, &one_to_one(&wan_ip, &inside))?;
                        lab.nft(&r, ADF_FILTER)?;
                    }
                    NatKind::Edm => lab.nft(&r, &masquerade("fully-random"))?,
                    NatKind::UdpBlocked => {
                        lab.nft(&r, &masquerade(""))?;
                        lab.nft(&r, UDP_BLOCK)?;
                    }
                    NatKind::SameNat => {
                        lab.nft(&r, &masquerade(""))?;
                        // A second host on the same LAN, via a bridge-less
                        // second veth from the router.
                        let second = format!("10.{i}.1.2");
                        let c2 = lab.add_ns(&format!("c{i}b"))?;
                        lab.veth(
                            &c2,
                            "eth0",
                            &format!("{second}/24"),
                            &r,
                            "lan2",
                            &format!("10.{i}.1.1/24"),
                        )?;
                        lab.run(&[
                            "ip",
                            "-n",
                            &c2,
                            "route",
                            "add",
                            "default",
                            "via",
                            &format!("10.{i}.1.1"),
                        ])?;
                        // Masquerade covers both LANs (oifname "wan").
                        peer = Some((c2, ip(&second)?));
                    }
                    NatKind::Upnp | NatKind::Natpmp | NatKind::Pcp => {
                        let protocol = kind.portmap_protocol().ok_or_else(|| {
                            LabError::Other(format!("{} maps no ports", kind.name()))
                        })?;
                        lab.nft(&r, &masquerade(""))?;
                        lab.nft(&r, MINIUPNPD_CHAINS)?;
                        if let Some(rules) = only_version(protocol) {
                            lab.nft(&r, &rules)?;
                        }
                        let mut daemon = MiniUpnpd::new(&r, protocol, ip(&lan_gw)?)?;
                        daemon.start(lab)?;
                        miniupnpd = Some(daemon);
                    }
                    _ => lab.nft(&r, &masquerade(""))?,
                }
                Site {
                    kind,
                    node_ns: c,
                    node_ip: ip(&inside)?,
                    peer,
                    router: Some(r),
                    public_ip: ip(&wan_ip)?,
                    miniupnpd,
                    node_ip6: None,
                }
            }
        };
        if let Some(r) = &site.router {
            lab.netem(r, "wan", delay_ms)?;
        }
        Ok(site)
    }

    /// Cuts the site off from `ip` (both ways) at its router, as when a
    /// path between two sites dies; traffic to everyone else still flows.
    pub fn cut_off(&self, lab: &Lab, ip: IpAddr) -> Result<(), LabError> {
        let r = self
            .router
            .as_ref()
            .ok_or_else(|| LabError::Other("a site without a router cannot be cut off".into()))?;
        lab.nft(
            r,
            &format!(
                "table ip cut {{
  chain forward_cut {{
    type filter hook forward priority -10; policy accept;
    ip daddr {ip} drop
    ip saddr {ip} drop
  }}
}}
"
            ),
        )
    }

    /// Undoes [`Site::cut_off`].
    pub fn reconnect(&self, lab: &Lab) -> Result<(), LabError> {
        let r = self
            .router
            .as_ref()
            .ok_or_else(|| LabError::Other("a site without a router".into()))?;
        lab.nft(r, "delete table ip cut\n")
    }

    /// Makes the site's router an IPv6 firewall too (issue #14's IPv6
    /// check): the node gets `2001:db8:{i}::2/64` behind router
    /// `2001:db8:{i}::1` (WAN [`PUBLIC_PREFIX6`]`::{100+i}`, routed, no NAT),
    /// whose forward chain ([`MINIUPNPD_CHAINS`]) drops unsolicited inbound
    /// IPv6 unless a miniupnpd pinhole accepts it; miniupnpd is restarted
    /// listening on the router's LAN IPv6 address. Only for sites whose
    /// router runs miniupnpd. Returns the node's IPv6 address.
    pub fn enable_ipv6(&mut self, lab: &Lab, net: &mut Internet) -> Result<Ipv6Addr, LabError> {
        let (Some(r), Some(daemon)) = (self.router.clone(), self.miniupnpd.as_mut()) else {
            return Err(LabError::Other(
                "IPv6 is only built for sites whose router runs miniupnpd".into(),
            ));
        };
        let i = match self.node_ip {
            IpAddr::V4(v4) => v4.octets()[1],
            IpAddr::V6(_) => return Err(LabError::Other("site without an IPv4 LAN".into())),
        };
        net.enable_ipv6(lab)?;
        let wan6 = format!("{PUBLIC_PREFIX6}::{}", 100 + u16::from(i));
        let lan6 = format!("2001:db8:{i}::1");
        let node6 = format!("2001:db8:{i}::2");
        let add = |ns: &str, addr: &str, dev: &str| -> Result<String, LabError> {
            let cidr = format!("{addr}/64");
            lab.run(&["ip", "-n", ns, "addr", "add", &cidr, "dev", dev, "nodad"])
        };
        add(&r, &wan6, "wan")?;
        add(&r, &lan6, "lan")?;
        add(&self.node_ns, &node6, "eth0")?;
        lab.run(&[
            "ip",
            "-n",
            &self.node_ns,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &lan6,
        ])?;
        lab.exec(&r, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
        let subnet = format!("2001:db8:{i}::/64");
        lab.run(&[
            "ip",
            "-n",
            &net.public,
            "-6",
            "route",
            "add",
            &subnet,
            "via",
            &wan6,
        ])?;
        let lan6: Ipv6Addr = lan6
            .parse()
            .map_err(|_| LabError::Other(format!("bad address {lan6}")))?;
        daemon.set_lan_ip6(Some(lan6));
        daemon.restart(lab)?;
        let node6: Ipv6Addr = node6
            .parse()
            .map_err(|_| LabError::Other(format!("bad address {node6}")))?;
        self.node_ip6 = Some(node6);
        Ok(node6)
    }

    /// The node's socket address inside its namespace (port 0: any).
    pub fn node_bind(&self) -> SocketAddr {
        SocketAddr::new(self.node_ip, 0)
    }
}
