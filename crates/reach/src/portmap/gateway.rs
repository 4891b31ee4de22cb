//! Which router to ask for a port mapping: the default gateway from the
//! routing table, and whether it is one a port-mapping protocol can be
//! spoken to.

use std::net::{IpAddr, Ipv4Addr};

/// The kernel's IPv4 routing table (Linux).
const PROC_NET_ROUTE: &str = "/proc/net/route";
/// Route flags (`<linux/route.h>`): the route is up, and goes through a
/// gateway.
const RTF_UP: u32 = 0x1;
const RTF_GATEWAY: u32 = 0x2;

/// The IPv4 default gateway of this host (the one with the lowest metric),
/// if the routing table can be read and has one.
pub(crate) fn default_gateway_v4() -> Option<Ipv4Addr> {
    let text = std::fs::read_to_string(PROC_NET_ROUTE).ok()?;
    parse_default_gateway(&text)
}

/// The default gateway in `/proc/net/route`'s text: a line whose
/// destination and mask are 0 and whose flags say up and via a gateway.
/// Addresses are hex in host (little-endian) byte order.
fn parse_default_gateway(text: &str) -> Option<Ipv4Addr> {
    let mut best: Option<(u32, Ipv4Addr)> = None;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(dest), Some(gw), Some(flags), Some(metric), Some(mask)) =
            (f.get(1), f.get(2), f.get(3), f.get(6), f.get(7))
        else {
            continue;
        };
        let hex = |s: &str| u32::from_str_radix(s, 16).ok();
        let (Some(dest), Some(gw), Some(flags), Some(mask)) =
            (hex(dest), hex(gw), hex(flags), hex(mask))
        else {
            continue;
        };
        let metric: u32 = metric.parse().unwrap_or(u32::MAX);
        if dest != 0 || mask != 0 || flags & (RTF_UP | RTF_GATEWAY) != RTF_UP | RTF_GATEWAY {
            continue;
        }
        let gw = Ipv4Addr::from(gw.swap_bytes());
        if best.is_none_or(|(m, _)| metric < m) {
            best = Some((metric, gw));
        }
    }
    best.map(|(_, gw)| gw)
}

/// Whether a gateway found in the routing table is one to ask: a router on
/// a private network (RFC 1918, RFC 6598 shared address space, IPv6
/// unique-local or link-local). Port-mapping protocols are spoken to the
/// home or office router on the LAN; a host whose default gateway has a
/// public address has no NAT of its own to ask, so it sends nothing (and
/// never probes a provider's router). A gateway the operator configures is
/// asked whatever its address.
pub(crate) fn is_lan_gateway(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_private() || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            (s[0] & 0xfe00) == 0xfc00 || (s[0] & 0xffc0) == 0xfe80
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
wlan0\t0000A8C0\t00000000\t0001\t0\t0\t600\t00FFFFFF\t0\t0\t0
eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
wlan0\t00000000\t0100A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
";

    #[test]
    fn the_default_route_with_the_lowest_metric_wins() {
        assert_eq!(
            parse_default_gateway(TABLE),
            Some(Ipv4Addr::new(192, 168, 1, 1))
        );
    }

    #[test]
    fn tables_without_a_default_route_or_with_junk_give_none() {
        let no_default = TABLE
            .lines()
            .take(2)
            .map(|l| format!("{l}\n"))
            .collect::<String>();
        assert_eq!(parse_default_gateway(&no_default), None);
        assert_eq!(parse_default_gateway(""), None);
        assert_eq!(
            parse_default_gateway("h\neth0 00000000 zz 0003 0 0 0 00000000"),
            None
        );
        // A default route that is down does not count.
        assert_eq!(
            parse_default_gateway("h\neth0 00000000 0101A8C0 0002 0 0 0 00000000"),
            None
        );
    }

    #[test]
    fn only_lan_gateways_are_asked() {
        for lan in [
            "192.168.1.1",
            "10.0.0.1",
            "172.16.0.1",
            "100.64.0.1",
            "fd00::1",
            "fe80::1",
        ] {
            assert!(is_lan_gateway(lan.parse().unwrap()), "{lan}");
        }
        for public in [
            "192.0.2.1",
            "11.250.0.1",
            "8.8.8.8",
            "100.128.0.1",
            "2001:db8::1",
        ] {
            assert!(!is_lan_gateway(public.parse().unwrap()), "{public}");
        }
    }
}
