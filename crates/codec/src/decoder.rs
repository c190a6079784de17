//! Splitting a connection's byte stream into frames, with a hard cap on frame size.
//!
//! Invariants: [`FrameDecoder::decode`] only ever consumes bytes from the front of the caller's
//! buffer; while it waits for more input the buffer holds at most `max_frame + 4` bytes; an
//! oversize `lines` frame is reported once and skipped, an oversize length prefix is fatal and
//! nothing is allocated for it.

use bytes::{Buf, Bytes, BytesMut};

use crate::framing::{Framing, LENGTH_PREFIX_LEN};

/// A frame broke the size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A line grew past the limit. Recoverable: the decoder skips to the end of that line.
    #[error("line longer than the {limit}-byte frame limit")]
    TooLarge {
        /// The configured `max_frame`.
        limit: usize,
    },
    /// A length prefix declared more than the limit. Fatal: the stream cannot be resynchronised.
    #[error("declared frame length {declared} exceeds the {limit}-byte frame limit")]
    DeclaredTooLarge {
        /// The length the device's prefix announced.
        declared: u32,
        /// The configured `max_frame`.
        limit: usize,
    },
}

impl FrameError {
    /// The wire error code (`"frame_too_large"`), also the metric `reason` label.
    pub fn reason(&self) -> &'static str {
        "frame_too_large"
    }

    /// Whether the connection must be closed: later bytes can no longer be framed.
    pub fn is_fatal(&self) -> bool {
        matches!(self, FrameError::DeclaredTooLarge { .. })
    }
}

/// Takes whole frames off the front of a connection's read buffer.
///
/// One per connection: in `lines` mode it remembers how far it has searched for `\n` and whether
/// it is skipping the rest of an oversize line.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    framing: Framing,
    max_frame: usize,
    /// `lines`: bytes at the front of the buffer already known to hold no `\n`.
    scanned: usize,
    /// `lines`: an oversize line was reported; drop bytes up to and including its `\n`.
    discarding: bool,
}

impl FrameDecoder {
    /// A decoder for `framing` that rejects frames over `max_frame` bytes.
    pub fn new(framing: Framing, max_frame: usize) -> Self {
        Self {
            framing,
            max_frame,
            scanned: 0,
            discarding: false,
        }
    }

    /// Changes the frame limit for the frames still to come, e.g. from a small limit before
    /// a device has authenticated to `max_frame` after. A line already being skipped stays
    /// skipped.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    /// The current frame limit.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Takes the next complete frame out of `buf`, consuming its bytes including the `\n` or the
    /// length prefix.
    ///
    /// `Ok(None)` means more bytes are needed. `lines`: `\n`-terminated, one trailing `\r`
    /// stripped, empty lines skipped; a line over `max_frame` gives [`FrameError::TooLarge`] once,
    /// then its remaining bytes are consumed and dropped up to the next `\n`.
    /// `length_prefixed`: a zero length is skipped; a declared length over `max_frame` gives
    /// [`FrameError::DeclaredTooLarge`] (fatal) and leaves `buf` untouched.
    ///
    /// Between calls the caller may only append to `buf`: the decoder remembers how much of it
    /// has already been searched for `\n`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        match self.framing {
            Framing::Lines => self.decode_line(buf),
            Framing::LengthPrefixed => self.decode_length_prefixed(buf),
        }
    }

    /// Whether a frame has started but not finished, given the buffer `decode` last returned
    /// `Ok(None)` for. The caller's `frame_timeout` runs while this is true.
    pub fn is_mid_frame(&self, buf: &BytesMut) -> bool {
        self.discarding || !buf.is_empty()
    }

    fn decode_line(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        loop {
            if self.discarding {
                match find_newline(buf) {
                    Some(end) => {
                        buf.advance(end + 1);
                        self.discarding = false;
                    }
                    None => {
                        buf.clear();
                        return Ok(None);
                    }
                }
            }
            let unscanned = buf.get(self.scanned..).unwrap_or_default();
            let Some(end) = find_newline(unscanned).map(|at| at + self.scanned) else {
                if waiting_line_len(buf) > self.max_frame {
                    buf.clear();
                    self.scanned = 0;
                    self.discarding = true;
                    return Err(FrameError::TooLarge {
                        limit: self.max_frame,
                    });
                }
                self.scanned = buf.len();
                return Ok(None);
            };
            self.scanned = 0;
            let line_len = match end.checked_sub(1) {
                Some(before) if buf[before] == b'\r' => before,
                _ => end,
            };
            if line_len > self.max_frame {
                buf.advance(end + 1);
                return Err(FrameError::TooLarge {
                    limit: self.max_frame,
                });
            }
            if line_len > 0 {
                return Ok(Some(take_frame(buf, end + 1, line_len)));
            }
            buf.advance(end + 1);
        }
    }

    fn decode_length_prefixed(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        loop {
            let Some(&[b0, b1, b2, b3]) = buf.get(..LENGTH_PREFIX_LEN) else {
                return Ok(None);
            };
            let declared = u32::from_be_bytes([b0, b1, b2, b3]);
            // A length that does not even fit a usize is certainly over the limit.
            let len = usize::try_from(declared).unwrap_or(usize::MAX);
            if len > self.max_frame {
                return Err(FrameError::DeclaredTooLarge {
                    declared,
                    limit: self.max_frame,
                });
            }
            if len == 0 {
                buf.advance(LENGTH_PREFIX_LEN);
                continue;
            }
            let total = LENGTH_PREFIX_LEN.saturating_add(len);
            if buf.len() < total {
                // Bounded by max_frame + 4, checked above.
                buf.reserve(total - buf.len());
                return Ok(None);
            }
            buf.advance(LENGTH_PREFIX_LEN);
            return Ok(Some(take_frame(buf, len, len)));
        }
    }
}

/// Frames up to this size that end the read buffer are copied out of it rather than split
/// off (see [`take_frame`]).
const COPY_OUT_MAX: usize = 4096;

/// Takes the first `consumed` bytes out of `buf` and returns the first `frame_len` of them.
///
/// A small frame that ends the buffer, the usual case of a device sending one message at a
/// time, is copied into a `Bytes` of its own and `buf` is emptied but keeps its memory, so
/// the next read needs no allocation and the frame costs exactly one. Splitting it off
/// instead would share `buf`'s memory: one allocation for the sharing and, as `buf` cannot
/// be reused while the frame lives, one for the next read.
fn take_frame(buf: &mut BytesMut, consumed: usize, frame_len: usize) -> Bytes {
    if consumed == buf.len() && frame_len <= COPY_OUT_MAX {
        let frame = Bytes::copy_from_slice(&buf[..frame_len]);
        buf.clear();
        return frame;
    }
    let mut frame = buf.split_to(consumed);
    frame.truncate(frame_len);
    frame.freeze()
}

fn find_newline(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&byte| byte == b'\n')
}

/// Length of an unterminated line's content so far: a final `\r` may still turn out to be the
/// `\r` of `\r\n`, so it does not count yet.
fn waiting_line_len(buf: &[u8]) -> usize {
    buf.strip_suffix(b"\r").unwrap_or(buf).len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(
        decoder: &mut FrameDecoder,
        buf: &mut BytesMut,
    ) -> Vec<Result<Bytes, FrameError>> {
        let mut out = Vec::new();
        loop {
            match decoder.decode(buf) {
                Ok(Some(frame)) => out.push(Ok(frame)),
                Ok(None) => return out,
                Err(err) => {
                    let fatal = err.is_fatal();
                    out.push(Err(err));
                    if fatal {
                        return out;
                    }
                }
            }
        }
    }

    #[test]
    fn lines_strip_cr_and_skip_empty() {
        let mut decoder = FrameDecoder::new(Framing::Lines, 16);
        let mut buf = BytesMut::from(&b"\n\r\na\r\nb\n\nc"[..]);
        let frames = decode_all(&mut decoder, &mut buf);
        assert_eq!(
            frames,
            vec![Ok(Bytes::from_static(b"a")), Ok(Bytes::from_static(b"b"))]
        );
        assert_eq!(&buf[..], b"c");
        assert!(decoder.is_mid_frame(&buf));
    }

    #[test]
    fn a_frame_ending_the_buffer_leaves_the_buffer_reusable() {
        for framing in [Framing::Lines, Framing::LengthPrefixed] {
            let mut decoder = FrameDecoder::new(framing, 1024);
            let mut wire = BytesMut::new();
            crate::encode_frame(framing, b"{\"a\":1}", &mut wire);
            crate::encode_frame(framing, b"{\"b\":2}", &mut wire);
            let mut buf = BytesMut::with_capacity(256);
            buf.extend_from_slice(&wire);
            let capacity = buf.capacity();
            let frames = decode_all(&mut decoder, &mut buf);
            assert_eq!(
                frames,
                vec![
                    Ok(Bytes::from_static(b"{\"a\":1}")),
                    Ok(Bytes::from_static(b"{\"b\":2}"))
                ],
                "{framing:?}"
            );
            assert!(buf.is_empty());
            // The first frame was split off and still shares the memory; once it is gone,
            // the buffer takes the next read without allocating.
            drop(frames);
            buf.extend_from_slice(&wire);
            assert!(buf.capacity() >= wire.len(), "{framing:?}");
            assert!(
                buf.capacity() <= capacity,
                "{framing:?}: the buffer was replaced"
            );
            assert_eq!(decode_all(&mut decoder, &mut buf).len(), 2);
        }
    }

    #[test]
    fn waiting_cr_does_not_count_against_limit() {
        let mut decoder = FrameDecoder::new(Framing::Lines, 3);
        let mut buf = BytesMut::from(&b"abc\r"[..]);
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        buf.extend_from_slice(b"\n");
        assert_eq!(
            decoder.decode(&mut buf),
            Ok(Some(Bytes::from_static(b"abc")))
        );
    }

    #[test]
    fn oversize_line_while_discarding_keeps_buffer_empty() {
        let mut decoder = FrameDecoder::new(Framing::Lines, 4);
        let mut buf = BytesMut::from(&b"abcdef"[..]);
        assert_eq!(
            decoder.decode(&mut buf),
            Err(FrameError::TooLarge { limit: 4 })
        );
        assert!(buf.is_empty());
        buf.extend_from_slice(b"ghijkl");
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        assert!(buf.is_empty());
        assert!(decoder.is_mid_frame(&buf));
        buf.extend_from_slice(b"mn\nok\n");
        assert_eq!(
            decoder.decode(&mut buf),
            Ok(Some(Bytes::from_static(b"ok")))
        );
        assert!(!decoder.is_mid_frame(&buf));
    }

    #[test]
    fn zero_length_frames_are_skipped() {
        let mut decoder = FrameDecoder::new(Framing::LengthPrefixed, 8);
        let mut buf = BytesMut::from(&b"\0\0\0\0\0\0\0\x01x\0\0"[..]);
        let frames = decode_all(&mut decoder, &mut buf);
        assert_eq!(frames, vec![Ok(Bytes::from_static(b"x"))]);
        assert_eq!(&buf[..], b"\0\0");
    }

    #[test]
    fn raising_the_limit_accepts_larger_frames() {
        let mut decoder = FrameDecoder::new(Framing::Lines, 4);
        let mut buf = BytesMut::from(&b"abcdef"[..]);
        assert_eq!(
            decoder.decode(&mut buf),
            Err(FrameError::TooLarge { limit: 4 })
        );
        buf.extend_from_slice(b"\n");
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        decoder.set_max_frame(8);
        assert_eq!(decoder.max_frame(), 8);
        buf.extend_from_slice(b"abcdefgh\n");
        assert_eq!(
            decoder.decode(&mut buf),
            Ok(Some(Bytes::from_static(b"abcdefgh")))
        );
    }
}
