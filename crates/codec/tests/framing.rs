//! Frame decoding against arbitrary input: round-trips, chunking, limits, hostile prefixes.

use bytes::{Bytes, BytesMut};
use fieldgate_codec::{FrameDecoder, FrameError, Framing, encode_frame};
use proptest::prelude::*;

const KIB_64: usize = 64 * 1024;

/// Feeds `stream` to a decoder in pieces of the given sizes (cycled), collecting every result.
/// Stops at the first fatal error. Checks the buffer bound whenever the decoder waits.
fn decode_chunked(
    framing: Framing,
    max_frame: usize,
    stream: &[u8],
    chunk_sizes: &[usize],
) -> Vec<Result<Bytes, FrameError>> {
    let mut decoder = FrameDecoder::new(framing, max_frame);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut rest = stream;
    let mut sizes = chunk_sizes.iter().copied().cycle();
    while !rest.is_empty() {
        let take = sizes.next().unwrap_or(1).clamp(1, rest.len());
        buf.extend_from_slice(&rest[..take]);
        rest = &rest[take..];
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => out.push(Ok(frame)),
                Ok(None) => {
                    assert!(buf.len() <= max_frame + 4, "holding {} bytes", buf.len());
                    break;
                }
                Err(err) => {
                    out.push(Err(err));
                    if err.is_fatal() {
                        return out;
                    }
                }
            }
        }
    }
    out
}

fn line_payload() -> impl Strategy<Value = Vec<u8>> {
    // Non-empty (empty lines are skipped), no `\n`, not ending in `\r` (stripped).
    prop::collection::vec(
        any::<u8>().prop_filter("no newline", |b| *b != b'\n'),
        1..300,
    )
    .prop_filter("no trailing CR", |p| p.last() != Some(&b'\r'))
}

proptest! {
    #[test]
    fn lines_round_trip_in_any_chunking(
        payloads in prop::collection::vec(line_payload(), 0..20),
        chunks in prop::collection::vec(1usize..64, 1..10),
    ) {
        let mut stream = BytesMut::new();
        for payload in &payloads {
            encode_frame(Framing::Lines, payload, &mut stream);
        }
        let frames = decode_chunked(Framing::Lines, 512, &stream, &chunks);
        let expected: Vec<_> = payloads.iter().map(|p| Ok(Bytes::copy_from_slice(p))).collect();
        prop_assert_eq!(frames, expected);
    }

    #[test]
    fn length_prefixed_round_trip_in_any_chunking(
        payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..300), 0..20),
        chunks in prop::collection::vec(1usize..64, 1..10),
    ) {
        let mut stream = BytesMut::new();
        for payload in &payloads {
            encode_frame(Framing::LengthPrefixed, payload, &mut stream);
        }
        let frames = decode_chunked(Framing::LengthPrefixed, 512, &stream, &chunks);
        let expected: Vec<_> = payloads.iter().map(|p| Ok(Bytes::copy_from_slice(p))).collect();
        prop_assert_eq!(frames, expected);
    }

    #[test]
    fn oversize_lines_reported_once_then_decoding_resumes(
        lines in prop::collection::vec((any::<bool>(), 1usize..200), 1..20),
        chunks in prop::collection::vec(1usize..80, 1..10),
    ) {
        const MAX: usize = 64;
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for (index, (oversize, extra)) in lines.iter().enumerate() {
            let len = if *oversize { MAX + extra } else { 1 + extra % MAX };
            let byte = b'a' + u8::try_from(index % 26).unwrap();
            let line = vec![byte; len];
            stream.extend_from_slice(&line);
            stream.push(b'\n');
            expected.push(if *oversize {
                Err(FrameError::TooLarge { limit: MAX })
            } else {
                Ok(Bytes::from(line))
            });
        }
        prop_assert_eq!(decode_chunked(Framing::Lines, MAX, &stream, &chunks), expected);
    }

    #[test]
    fn arbitrary_bytes_never_panic_either_framing(
        stream in prop::collection::vec(any::<u8>(), 0..2048),
        chunks in prop::collection::vec(1usize..300, 1..10),
        max_frame in 0usize..600,
    ) {
        for framing in [Framing::Lines, Framing::LengthPrefixed] {
            let frames = decode_chunked(framing, max_frame, &stream, &chunks);
            for frame in frames.into_iter().flatten() {
                prop_assert!(!frame.is_empty() && frame.len() <= max_frame);
            }
        }
    }
}

#[test]
fn hostile_length_prefix_is_fatal_without_allocating() {
    let mut decoder = FrameDecoder::new(Framing::LengthPrefixed, KIB_64);
    let mut buf = BytesMut::with_capacity(16);
    buf.extend_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF, b'{']);
    let capacity = buf.capacity();
    let err = decoder.decode(&mut buf).unwrap_err();
    assert_eq!(
        err,
        FrameError::DeclaredTooLarge {
            declared: u32::MAX,
            limit: KIB_64
        }
    );
    assert!(err.is_fatal());
    assert_eq!(err.reason(), "frame_too_large");
    assert_eq!(buf.capacity(), capacity);
    assert_eq!(buf.len(), 5, "a fatal error leaves the buffer alone");
}

#[test]
fn lines_64_kib_boundary() {
    let mut decoder = FrameDecoder::new(Framing::Lines, KIB_64);
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&vec![b'x'; KIB_64]);
    buf.extend_from_slice(b"\r\n");
    assert_eq!(decoder.decode(&mut buf).unwrap().unwrap().len(), KIB_64);

    // max + 1, whole line in the buffer: rejected, recoverable, next line still decodes.
    buf.extend_from_slice(&vec![b'y'; KIB_64 + 1]);
    buf.extend_from_slice(b"\n{}\n");
    let err = decoder.decode(&mut buf).unwrap_err();
    assert_eq!(err, FrameError::TooLarge { limit: KIB_64 });
    assert!(!err.is_fatal());
    assert_eq!(err.reason(), "frame_too_large");
    assert_eq!(
        decoder.decode(&mut buf).unwrap().unwrap(),
        Bytes::from_static(b"{}")
    );

    // max + 1, still waiting for the newline: rejected as soon as it is known, buffer released.
    buf.extend_from_slice(&vec![b'z'; KIB_64 + 1]);
    assert_eq!(
        decoder.decode(&mut buf),
        Err(FrameError::TooLarge { limit: KIB_64 })
    );
    assert!(buf.is_empty());
    buf.extend_from_slice(b"zzz\n{}\n");
    assert_eq!(
        decoder.decode(&mut buf).unwrap().unwrap(),
        Bytes::from_static(b"{}")
    );
}

#[test]
fn length_prefixed_64_kib_boundary() {
    let mut decoder = FrameDecoder::new(Framing::LengthPrefixed, KIB_64);
    let mut buf = BytesMut::new();
    encode_frame(Framing::LengthPrefixed, &vec![b'x'; KIB_64], &mut buf);
    assert_eq!(decoder.decode(&mut buf).unwrap().unwrap().len(), KIB_64);
    assert!(buf.is_empty());

    encode_frame(Framing::LengthPrefixed, &vec![b'x'; KIB_64 + 1], &mut buf);
    let err = decoder.decode(&mut buf).unwrap_err();
    assert!(err.is_fatal());
    assert_eq!(
        err,
        FrameError::DeclaredTooLarge {
            declared: 65_537,
            limit: KIB_64
        }
    );
}

#[test]
fn length_prefixed_waits_for_the_whole_frame() {
    let mut decoder = FrameDecoder::new(Framing::LengthPrefixed, KIB_64);
    let mut buf = BytesMut::from(&[0u8, 0, 0][..]);
    assert_eq!(decoder.decode(&mut buf), Ok(None));
    assert!(decoder.is_mid_frame(&buf));
    buf.extend_from_slice(&[3, b'a', b'b']);
    assert_eq!(decoder.decode(&mut buf), Ok(None));
    buf.extend_from_slice(b"c");
    assert_eq!(
        decoder.decode(&mut buf),
        Ok(Some(Bytes::from_static(b"abc")))
    );
    assert!(!decoder.is_mid_frame(&buf));
}
