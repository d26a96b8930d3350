//! Fuzzes `protocol::Event::decode` on raw stream entries: what the
//! projector reads from Redis must never panic it, and whatever decodes
//! re-encodes to an event that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use seckill_workers::protocol::Event;

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = Event::decode(data) {
        let again = Event::decode(event.encode().as_bytes()).expect("re-encoded event decodes");
        assert_eq!(again, event);
    }
});
