//! The two ways a connection delimits frames, and writing one frame in either.
//!
//! `lines`: payload then `\n`. `length_prefixed`: a big-endian `u32` byte count, then the
//! payload. The gateway answers a device in the framing of its connection.

use bytes::{BufMut, BytesMut};

/// Bytes in a `length_prefixed` frame header.
pub(crate) const LENGTH_PREFIX_LEN: usize = 4;

/// How frames are delimited on a connection (config `framing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Framing {
    /// `"lines"`: one frame per `\n`-terminated line; a trailing `\r` is dropped.
    Lines,
    /// `"length_prefixed"`: a `u32` big-endian length, then that many bytes.
    LengthPrefixed,
}

/// Appends `payload` to `out` as one frame: `payload` + `\n`, or the big-endian `u32` length + `payload`.
///
/// For [`Framing::Lines`] the payload must not contain `\n` (nor end in `\r`), or the peer
/// reads different frames; [`crate::encode_reply`] guarantees that for replies. A payload over
/// `u32::MAX` bytes cannot be length-prefixed and is not written at all, which keeps the stream
/// in sync; gateway payloads are far below that.
pub fn encode_frame(framing: Framing, payload: &[u8], out: &mut BytesMut) {
    match framing {
        Framing::Lines => {
            out.reserve(payload.len() + 1);
            out.extend_from_slice(payload);
            out.put_u8(b'\n');
        }
        Framing::LengthPrefixed => {
            let Ok(len) = u32::try_from(payload.len()) else {
                return;
            };
            out.reserve(LENGTH_PREFIX_LEN + payload.len());
            out.put_u32(len);
            out.extend_from_slice(payload);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_appends_newline() {
        let mut out = BytesMut::new();
        encode_frame(Framing::Lines, b"{}", &mut out);
        assert_eq!(&out[..], b"{}\n");
    }

    #[test]
    fn length_prefixed_writes_big_endian_length() {
        let mut out = BytesMut::new();
        encode_frame(Framing::LengthPrefixed, b"{}", &mut out);
        assert_eq!(&out[..], b"\x00\x00\x00\x02{}");
    }
}
