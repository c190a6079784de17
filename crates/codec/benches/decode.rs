//! Southbound hot path: split a read buffer into frames and classify each frame, for
//! 75-byte JSON lines (74-byte objects), in both framings.
//!
//! `cargo bench -p fieldgate-codec --bench decode`

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{BatchSize, Criterion, Throughput};
use fieldgate_codec::{DeviceMessage, FrameDecoder, Framing, encode_frame, parse_message};

/// A 74-byte device object: with its `\n` a 75-byte line.
const OBJECT: &[u8] =
    b"{\"device\":\"dev-0001\",\"kind\":\"telemetry\",\"seq\":123456,\"temp\":21.5,\"rh\":405}";
/// Frames per read buffer: about what one 64 KiB socket read holds.
const FRAMES: usize = 800;
const MAX_FRAME: usize = 64 * 1024;

fn stream(framing: Framing) -> BytesMut {
    let mut out = BytesMut::new();
    for _ in 0..FRAMES {
        encode_frame(framing, OBJECT, &mut out);
    }
    out
}

fn name(framing: Framing) -> &'static str {
    match framing {
        Framing::Lines => "lines",
        Framing::LengthPrefixed => "length_prefixed",
    }
}

fn decode(c: &mut Criterion) {
    assert_eq!(OBJECT.len() + 1, 75);
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(FRAMES as u64));
    for framing in [Framing::Lines, Framing::LengthPrefixed] {
        let input = stream(framing);
        group.bench_function(format!("decode/{}", name(framing)), |b| {
            b.iter_batched_ref(
                || input.clone(),
                |buf| {
                    let mut decoder = FrameDecoder::new(framing, MAX_FRAME);
                    let mut frames = 0usize;
                    while let Ok(Some(frame)) = decoder.decode(buf) {
                        black_box(&frame);
                        frames += 1;
                    }
                    frames
                },
                BatchSize::SmallInput,
            );
        });
        group.bench_function(format!("decode_parse/{}", name(framing)), |b| {
            b.iter_batched_ref(
                || input.clone(),
                |buf| {
                    let mut decoder = FrameDecoder::new(framing, MAX_FRAME);
                    let mut data = 0usize;
                    while let Ok(Some(frame)) = decoder.decode(buf) {
                        if let Ok(DeviceMessage::Data { seq: Some(_), .. }) =
                            parse_message(black_box(&frame), false)
                        {
                            data += 1;
                        }
                    }
                    assert_eq!(data, FRAMES);
                    data
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

// A plain `main` instead of `criterion_group!`, whose generated function has no doc comment.
fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    decode(&mut criterion);
    criterion.final_summary();
}
