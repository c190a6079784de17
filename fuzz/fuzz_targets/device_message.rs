//! The device message parser on one arbitrary frame, binary allowed or not. Must not panic.
#![no_main]

use fieldgate_codec::parse_message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|frame: &[u8]| {
    let _outcome = parse_message(frame, false);
    let _outcome = parse_message(frame, true);
});
