//! The on-disk byte layout of segment files, as pure functions (no I/O).
//!
//! A segment file is named `<20-digit zero-padded first record id>.seg` and holds an
//! 8-byte header (`FGBUF\0` + u16 LE format version) followed by records, each
//! `u32 LE payload length, u32 LE crc32c(payload), payload`. A segment's record ids are
//! consecutive from the id in its name, so the next segment's name bounds its count.

/// Length of the segment header in bytes.
pub(crate) const SEGMENT_HEADER_LEN: u64 = 8;
/// Bytes of framing in front of every record payload.
pub(crate) const RECORD_HEADER_LEN: u64 = 8;
/// The current (and only) segment format version.
const FORMAT_VERSION: u16 = 1;
/// Magic bytes that open every segment file.
const SEGMENT_MAGIC: [u8; 6] = *b"FGBUF\0";
/// File name suffix of segment files.
const SEGMENT_SUFFIX: &str = ".seg";
/// Digits in a segment file name (enough for any u64).
const SEGMENT_ID_DIGITS: usize = 20;

/// The header every segment file starts with.
pub(crate) fn segment_header() -> [u8; 8] {
    let mut header = [0u8; 8];
    header[..6].copy_from_slice(&SEGMENT_MAGIC);
    header[6..].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header
}

/// Whether `bytes` is a segment header this version can read.
pub(crate) fn is_valid_segment_header(bytes: &[u8]) -> bool {
    bytes == segment_header()
}

/// The file name of the segment whose first record id is `first_id`.
pub(crate) fn segment_file_name(first_id: u64) -> String {
    format!(
        "{first_id:0width$}{SEGMENT_SUFFIX}",
        width = SEGMENT_ID_DIGITS
    )
}

/// The first record id encoded in a segment file name, or `None` if `name` is not one.
pub(crate) fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEGMENT_ID_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The framing header written in front of `payload`.
///
/// The caller guarantees `payload.len()` fits in a u32 (it is capped by `max_record_bytes`).
pub(crate) fn record_header(payload_len: u32, payload: &[u8]) -> [u8; 8] {
    let mut header = [0u8; 8];
    header[..4].copy_from_slice(&payload_len.to_le_bytes());
    header[4..].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    header
}

/// A decoded record framing header.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordHeader {
    /// Payload length in bytes.
    pub(crate) len: u32,
    /// Expected crc32c of the payload.
    pub(crate) crc: u32,
}

/// Decodes a record framing header.
pub(crate) fn decode_record_header(bytes: [u8; 8]) -> RecordHeader {
    let [l0, l1, l2, l3, c0, c1, c2, c3] = bytes;
    RecordHeader {
        len: u32::from_le_bytes([l0, l1, l2, l3]),
        crc: u32::from_le_bytes([c0, c1, c2, c3]),
    }
}

/// Whether `payload` matches the checksum in `header`.
pub(crate) fn payload_matches(header: RecordHeader, payload: &[u8]) -> bool {
    crc32c::crc32c(payload) == header.crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip() {
        for id in [0, 1, 42, u64::MAX] {
            let name = segment_file_name(id);
            assert_eq!(name.len(), 24);
            assert_eq!(parse_segment_file_name(&name), Some(id));
        }
    }

    #[test]
    fn foreign_names_are_not_segments() {
        for name in [
            "ack",
            "ack.tmp",
            "1.seg",
            "0000000000000000000a.seg",
            "00000000000000000001.seg.bad",
            "99999999999999999999.seg", // > u64::MAX
        ] {
            assert_eq!(parse_segment_file_name(name), None, "{name}");
        }
    }

    #[test]
    fn header_checks_magic_and_version() {
        assert!(is_valid_segment_header(&segment_header()));
        let mut other_version = segment_header();
        other_version[6] = 2;
        assert!(!is_valid_segment_header(&other_version));
        assert!(!is_valid_segment_header(&segment_header()[..7]));
    }

    #[test]
    fn record_header_round_trips() {
        let payload = b"hello";
        let header = decode_record_header(record_header(5, payload));
        assert_eq!(header.len, 5);
        assert!(payload_matches(header, payload));
        assert!(!payload_matches(header, b"hellp"));
    }
}
