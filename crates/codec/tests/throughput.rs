//! Decode + parse throughput for 75-byte JSON lines. Run with
//! `cargo test --release -p fieldgate-codec --test throughput -- --ignored --nocapture`.

use bytes::BytesMut;
use fieldgate_codec::{DeviceMessage, FrameDecoder, Framing, parse_message};

#[test]
#[ignore = "benchmark; run in release with --ignored --nocapture"]
#[expect(
    clippy::disallowed_types,
    reason = "measures wall time; there is no runtime clock to pause"
)]
fn decode_and_parse_75_byte_lines() {
    const FRAMES: u64 = 2_000_000;
    const READ_SIZE: usize = 16 * 1024;
    let line = b"{\"device\":\"dev-0001\",\"kind\":\"telemetry\",\"seq\":123456,\"temp\":21.5,\"rh\":405}\n";
    assert_eq!(line.len(), 75);
    let stream: Vec<u8> = line.repeat(usize::try_from(FRAMES).unwrap());

    let start = std::time::Instant::now();
    let mut decoder = FrameDecoder::new(Framing::Lines, 64 * 1024);
    let mut buf = BytesMut::with_capacity(READ_SIZE * 2);
    let mut parsed = 0u64;
    for chunk in stream.chunks(READ_SIZE) {
        buf.extend_from_slice(chunk);
        while let Some(frame) = decoder.decode(&mut buf).unwrap() {
            if let DeviceMessage::Data { seq: Some(_), .. } = parse_message(&frame, false).unwrap()
            {
                parsed += 1;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    assert_eq!(parsed, FRAMES);
    #[expect(clippy::cast_precision_loss, reason = "a rate for display")]
    let rate = FRAMES as f64 / elapsed;
    println!(
        "decode+parse: {FRAMES} frames of 75 bytes in {elapsed:.3} s = {:.2} M frames/s, {:.0} MB/s",
        rate / 1e6,
        rate * 75.0 / 1e6
    );
}
