//! The TCP source's read path: arbitrary bytes, fed in arbitrary chunks to a frame decoder of
//! either framing, every frame classified. Must not panic, and never hold more than
//! `max_frame` plus the 4-byte prefix while waiting.
#![no_main]

use bytes::BytesMut;
use fieldgate_codec::{FrameDecoder, Framing, parse_message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First byte: framing and binary flag; second: chunk size; rest: the stream.
    let [mode, chunk, stream @ ..] = data else {
        return;
    };
    let framing = if mode & 1 == 0 {
        Framing::Lines
    } else {
        Framing::LengthPrefixed
    };
    let allow_binary = mode & 2 != 0;
    let max_frame = 512;
    let chunk = usize::from(*chunk).max(1);
    let mut decoder = FrameDecoder::new(framing, max_frame);
    let mut buf = BytesMut::new();
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(!frame.is_empty() && frame.len() <= max_frame);
                    let _outcome = parse_message(&frame, allow_binary);
                }
                Ok(None) => {
                    assert!(buf.len() <= max_frame + 4);
                    break;
                }
                Err(err) if err.is_fatal() => return,
                Err(_) => {}
            }
        }
    }
});
