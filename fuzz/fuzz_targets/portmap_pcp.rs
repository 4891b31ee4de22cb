//! The PCP decoders (RFC 6887) on arbitrary bytes, as a router or anyone on
//! the LAN could send them: none may panic, options must be skipped within
//! bounds, and whatever decodes must re-encode to something that decodes
//! to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reach_proto::nat::portmap::pcp::{Request, Response};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Response::decode(data) {
        assert_eq!(Response::decode(&r.encode()), Ok(r));
        assert!(
            Request::decode(data).is_err(),
            "the R bit makes a message a request or a response, never both"
        );
    }
    if let Ok(r) = Request::decode(data) {
        assert_eq!(Request::decode(&r.encode()), Ok(r));
    }
});
