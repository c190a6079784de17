//! The device side of the southbound framing: wrap payloads, split replies.
//!
//! `lines`: one JSON object per line (`\n`, a trailing `\r` stripped).
//! `length_prefixed`: a u32 big-endian length, then that many bytes.
//! Pure; reply frames are capped so a misbehaving peer cannot grow our memory.

use clap::ValueEnum;

/// Largest reply frame we accept from the gateway.
pub const MAX_REPLY: usize = 1024 * 1024;

/// Wire framing of a device connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Framing {
    /// Newline-delimited JSON.
    Lines,
    /// u32 big-endian length prefix.
    LengthPrefixed,
}

/// A reply frame that breaks the framing rules.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("reply frame of {len} bytes exceeds the {MAX_REPLY}-byte cap")]
pub struct OversizedReply {
    /// Declared or buffered length.
    pub len: usize,
}

impl Framing {
    /// Appends the frame header (length prefix) for a `len`-byte payload; call
    /// before writing the payload. Returns the index where the header starts.
    pub fn begin(self, out: &mut Vec<u8>) -> usize {
        let start = out.len();
        if self == Framing::LengthPrefixed {
            out.extend_from_slice(&[0; 4]);
        }
        start
    }

    /// Completes a frame begun at `start`: fills the length or appends `\n`.
    pub fn finish(self, out: &mut Vec<u8>, start: usize) {
        match self {
            Framing::Lines => out.push(b'\n'),
            Framing::LengthPrefixed => {
                let len = out.len() - start - 4;
                // Payloads are template-sized, far below 4 GiB; saturate rather than wrap.
                let len = u32::try_from(len).unwrap_or(u32::MAX);
                out[start..start + 4].copy_from_slice(&len.to_be_bytes());
            }
        }
    }

    /// Appends `payload` as one whole frame.
    pub fn encode(self, payload: &[u8], out: &mut Vec<u8>) {
        let start = self.begin(out);
        out.extend_from_slice(payload);
        self.finish(out, start);
    }

    /// Takes the next complete frame off the front of `buf`, if there is one.
    pub fn next_frame(self, buf: &mut Vec<u8>) -> Result<Option<Vec<u8>>, OversizedReply> {
        match self {
            Framing::Lines => match buf.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    let mut frame: Vec<u8> = buf.drain(..=end).collect();
                    frame.pop();
                    if frame.last() == Some(&b'\r') {
                        frame.pop();
                    }
                    Ok(Some(frame))
                }
                None if buf.len() > MAX_REPLY => Err(OversizedReply { len: buf.len() }),
                None => Ok(None),
            },
            Framing::LengthPrefixed => {
                let Some(header) = buf.first_chunk::<4>() else {
                    return Ok(None);
                };
                let len = usize::try_from(u32::from_be_bytes(*header)).unwrap_or(usize::MAX);
                if len > MAX_REPLY {
                    return Err(OversizedReply { len });
                }
                if buf.len() < 4 + len {
                    return Ok(None);
                }
                let frame = buf[4..4 + len].to_vec();
                buf.drain(..4 + len);
                Ok(Some(frame))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_with_crlf_and_partial_frames() {
        let mut buf = Vec::new();
        Framing::Lines.encode(b"{\"a\":1}", &mut buf);
        buf.extend_from_slice(b"{\"b\":2}\r\n{\"c\"");
        assert_eq!(
            Framing::Lines.next_frame(&mut buf).unwrap().unwrap(),
            b"{\"a\":1}"
        );
        assert_eq!(
            Framing::Lines.next_frame(&mut buf).unwrap().unwrap(),
            b"{\"b\":2}"
        );
        assert_eq!(Framing::Lines.next_frame(&mut buf).unwrap(), None);
        assert_eq!(buf, b"{\"c\"");
    }

    #[test]
    fn length_prefixed_round_trip_and_cap() {
        let mut buf = Vec::new();
        Framing::LengthPrefixed.encode(b"hello", &mut buf);
        assert_eq!(&buf[..4], &[0, 0, 0, 5]);
        buf.extend_from_slice(&[0, 0]);
        let framing = Framing::LengthPrefixed;
        assert_eq!(framing.next_frame(&mut buf).unwrap().unwrap(), b"hello");
        assert_eq!(framing.next_frame(&mut buf).unwrap(), None);
        let mut huge = u32::MAX.to_be_bytes().to_vec();
        assert!(framing.next_frame(&mut huge).is_err());
    }

    #[test]
    fn begin_finish_matches_encode() {
        for framing in [Framing::Lines, Framing::LengthPrefixed] {
            let mut a = Vec::new();
            let start = framing.begin(&mut a);
            a.extend_from_slice(b"{}");
            framing.finish(&mut a, start);
            let mut b = Vec::new();
            framing.encode(b"{}", &mut b);
            assert_eq!(a, b);
        }
    }
}
