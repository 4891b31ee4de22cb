//! Every decoder of bytes from the network, on arbitrary input: none may
//! panic, and whatever decodes must re-encode to something that decodes to
//! the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reach_proto::wire::datagram::{ControlPacket, classify};
use reach_proto::wire::envelope::Envelope;
use reach_proto::wire::{MAX_FRAME_LEN, frame};

fuzz_target!(|data: &[u8]| {
    let _ = classify(data);
    if let Ok(p) = ControlPacket::decode(data) {
        assert_eq!(ControlPacket::decode(&p.encode()).as_ref(), Ok(&p));
    }
    if let Ok(env) = Envelope::decode(data) {
        let f = env.to_frame().expect("a decoded envelope re-encodes");
        assert_eq!(Envelope::from_frame(&f, MAX_FRAME_LEN).as_ref(), Ok(&env));
    }
    let _ = Envelope::from_frame(data, MAX_FRAME_LEN);
    let _ = frame::split(data, MAX_FRAME_LEN);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<reach_proto::PeerId>();
    }
});
