//! The SSDP decoder (UPnP-IGD discovery) on arbitrary datagrams, as anyone
//! on the LAN could multicast them: none may panic, and whatever decodes
//! carries what its kind requires (a LOCATION unless it is a byebye), and a
//! LOCATION that parses as a URL prints back to the same URL.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reach_proto::nat::portmap::upnp::{SsdpKind, SsdpMessage, Url};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = SsdpMessage::decode(data) {
        assert!(m.kind == SsdpKind::ByeBye || m.location.is_some());
        if let Some(Ok(url)) = m.location.as_deref().map(Url::parse) {
            assert_eq!(Url::parse(&url.to_string()), Ok(url));
        }
    }
});
