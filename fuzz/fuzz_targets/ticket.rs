//! Ticket parsing on arbitrary text, as a user pastes it or a program
//! passes it along: none may panic, and whatever parses must print back to
//! exactly the text it came from (one spelling per ticket).
#![no_main]

use libfuzzer_sys::fuzz_target;
use reach_proto::Ticket;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = text.parse::<Ticket>() {
        assert_eq!(t.to_string(), text);
    }
});
