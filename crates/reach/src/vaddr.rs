//! Virtual addresses: how the socket tells quinn about paths that are not a
//! plain UDP address.
//!
//! quinn addresses every connection by a `SocketAddr`. A connection through
//! a relay ([`crate::relay::paths`]) or over a TCP link ([`crate::tcp`])
//! gets a *virtual* address from 240.0.0.0/4 (reserved, never routable: no
//! real packet ever goes there); the port says which kind it is, the low 28
//! bits of the IPv4 address are an index into the owner's table. On an IPv6
//! socket the address takes the IPv4-mapped form quinn uses there.
//!
//! Virtual addresses mean something only inside this process: they are
//! never published, never put in routing tables, never remembered as a
//! peer's address.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};

/// The virtual range 240.0.0.0/4 ("reserved for future use").
const VIRTUAL_NET: u32 = 0xF000_0000;
/// The bits that say an IPv4 address is in [`VIRTUAL_NET`].
const NET_MASK: u32 = 0xF000_0000;
/// The bits of a virtual address that carry the index. The all-ones index
/// would be 255.255.255.255, the broadcast address: never handed out.
const INDEX_MASK: u32 = !NET_MASK;

/// What kind of path an address a connection reports leads over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum AddrClass {
    /// A real UDP address: the connection goes straight to the peer.
    Direct,
    /// A circuit through a relay ([`crate::relay::paths`]).
    Relayed,
    /// A TCP link ([`crate::tcp`]).
    Link,
}

impl AddrClass {
    /// The port of this kind's virtual addresses.
    const fn port(self) -> Option<u16> {
        match self {
            AddrClass::Direct => None,
            AddrClass::Relayed => Some(1),
            AddrClass::Link => Some(2),
        }
    }

    fn of_port(port: u16) -> Option<Self> {
        match port {
            1 => Some(AddrClass::Relayed),
            2 => Some(AddrClass::Link),
            _ => None,
        }
    }
}

/// The kind of path `addr` leads over (either family's form).
pub(crate) fn class_of(addr: &SocketAddr) -> AddrClass {
    decode(addr).map_or(AddrClass::Direct, |(class, _)| class)
}

/// Whether `addr` is virtual: a relayed circuit or a TCP link.
pub(crate) fn is_virtual(addr: &SocketAddr) -> bool {
    class_of(addr) != AddrClass::Direct
}

/// The kind and index of a virtual address.
fn decode(addr: &SocketAddr) -> Option<(AddrClass, u32)> {
    let class = AddrClass::of_port(addr.port())?;
    let v4 = match addr.ip() {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(v6) => v6.to_ipv4_mapped()?,
    };
    let bits = u32::from(v4);
    (bits & NET_MASK == VIRTUAL_NET && bits & INDEX_MASK != INDEX_MASK)
        .then_some((class, bits & INDEX_MASK))
}

/// Hands out the virtual addresses of one kind for one socket.
pub(crate) struct VirtualAddrs {
    class: AddrClass,
    v6: bool,
    next: AtomicU32,
}

impl VirtualAddrs {
    /// `class`: [`AddrClass::Relayed`] or [`AddrClass::Link`]. `v6`: whether
    /// the socket is IPv6 (addresses then take the IPv4-mapped form).
    pub fn new(class: AddrClass, v6: bool) -> Self {
        debug_assert!(class.port().is_some(), "direct addresses are not virtual");
        VirtualAddrs {
            class,
            v6,
            next: AtomicU32::new(1),
        }
    }

    /// A fresh index (they wrap around after 2^28 - 1; the owner's table
    /// holds far fewer at once).
    pub fn allocate(&self) -> u32 {
        loop {
            let index = self.next.fetch_add(1, Ordering::Relaxed) & INDEX_MASK;
            if index != INDEX_MASK {
                return index;
            }
        }
    }

    /// The address of `index`.
    pub fn addr(&self, index: u32) -> SocketAddr {
        let v4 = Ipv4Addr::from(VIRTUAL_NET | (index & INDEX_MASK));
        let ip = if self.v6 {
            IpAddr::V6(v4.to_ipv6_mapped())
        } else {
            IpAddr::V4(v4)
        };
        SocketAddr::new(ip, self.class.port().unwrap_or(0))
    }

    /// The index of `addr`, if it is one of this kind's addresses.
    pub fn index(&self, addr: &SocketAddr) -> Option<u32> {
        decode(addr)
            .filter(|(class, _)| *class == self.class)
            .map(|(_, index)| index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn mapped(addr: SocketAddr) -> SocketAddr {
        match addr.ip() {
            IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), addr.port()),
            IpAddr::V6(_) => addr,
        }
    }

    #[test]
    fn addresses_round_trip_in_both_forms_and_keep_their_kind() {
        for v6 in [false, true] {
            let relayed = VirtualAddrs::new(AddrClass::Relayed, v6);
            let links = VirtualAddrs::new(AddrClass::Link, v6);
            let (r, l) = (relayed.allocate(), links.allocate());
            let (ra, la) = (relayed.addr(r), links.addr(l));
            assert_eq!(ra.is_ipv6(), v6);
            assert_eq!(relayed.index(&ra), Some(r));
            assert_eq!(links.index(&la), Some(l));
            // The same index of the other kind is another address.
            assert_eq!(links.index(&ra), None);
            assert_eq!(relayed.index(&la), None);
            assert_eq!(class_of(&ra), AddrClass::Relayed);
            assert_eq!(class_of(&la), AddrClass::Link);
            // Either family's form decodes alike.
            assert_eq!(relayed.index(&mapped(ra)), Some(r));
            assert_eq!(class_of(&mapped(la)), AddrClass::Link);
            let v4 = SocketAddr::new(
                match ra.ip() {
                    IpAddr::V6(v6) => IpAddr::V4(v6.to_ipv4_mapped().unwrap()),
                    ip => ip,
                },
                ra.port(),
            );
            assert_eq!(relayed.index(&v4), Some(r));
        }
    }

    #[test]
    fn real_addresses_are_direct() {
        for a in [
            "203.0.113.10:4433",
            "127.0.0.1:1",
            "127.0.0.1:2",
            "239.255.255.255:1",
            "255.255.255.255:1",
            "255.255.255.255:2",
            "240.0.0.1:3",
            "[::1]:1",
            "[2001:db8::1]:2",
            "[fe80::f000:1]:1",
        ] {
            let addr: SocketAddr = a.parse().unwrap();
            assert_eq!(class_of(&addr), AddrClass::Direct, "{a}");
            assert!(!is_virtual(&addr), "{a}");
        }
        assert!(!is_virtual(&SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 1)));
        assert!(is_virtual(&"240.0.0.1:1".parse().unwrap()));
        assert!(is_virtual(&"[::ffff:240.0.0.1]:2".parse().unwrap()));
    }

    #[test]
    fn indices_are_distinct_and_never_the_broadcast_address() {
        let a = VirtualAddrs::new(AddrClass::Link, false);
        let first = a.allocate();
        assert_ne!(first, a.allocate());
        // Just before the wrap: the all-ones index is skipped.
        a.next.store(INDEX_MASK - 1, Ordering::Relaxed);
        assert_eq!(a.allocate(), INDEX_MASK - 1);
        let after = a.allocate();
        assert_ne!(after, INDEX_MASK);
        assert_eq!(a.index(&a.addr(after)), Some(after));
    }
}
