//! The NAT-PMP decoders (RFC 6886) on arbitrary bytes, as a router or
//! anyone on the LAN could send them: none may panic, and whatever decodes
//! must re-encode to something that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reach_proto::nat::portmap::natpmp::{Request, Response};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Response::decode(data) {
        let _ = r.epoch();
        assert_eq!(Response::decode(&r.encode()), Ok(r));
    }
    if let Ok(r) = Request::decode(data) {
        assert_eq!(Request::decode(&r.encode()), Ok(r));
    }
});
