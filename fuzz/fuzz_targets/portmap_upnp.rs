//! The UPnP-IGD decoders on arbitrary bytes, as a router (or a host posing
//! as one) could send them: the HTTP response, the device description and
//! every SOAP answer. None may panic; a description that parses only yields
//! URLs on the description's own address unless it names an absolute one,
//! and every URL it yields prints back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reach_proto::nat::portmap::upnp::{
    Description, HttpResponse, Url, decode_empty, decode_external_ip, decode_mapping_entry,
    decode_pinhole_id, decode_reserved_port,
};

fuzz_target!(|data: &[u8]| {
    let location = Url::parse("http://10.0.0.1:5000/rootDesc.xml").expect("a valid URL");
    // The bytes as a whole response if they decode as one, else as a body.
    let (status, body) = match HttpResponse::decode(data) {
        Ok(r) => (r.status, r.body),
        Err(_) => (200, data.to_vec()),
    };
    {
        let bytes = &body[..];
        if let Ok(d) = Description::parse(bytes, &location) {
            for url in std::iter::once(&d.control_url).chain(d.ipv6_firewall_url.as_ref()) {
                assert_eq!(Url::parse(&url.to_string()).as_ref(), Ok(url));
            }
        }
        let _ = decode_external_ip(status, bytes);
        let _ = decode_mapping_entry(status, bytes);
        let _ = decode_reserved_port(status, bytes);
        let _ = decode_pinhole_id(status, bytes);
        let _ = decode_empty("AddPortMapping", status, bytes);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(u) = location.join(s) {
            assert_eq!(Url::parse(&u.to_string()), Ok(u));
        }
    }
});
