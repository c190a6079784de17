//! Persists an [`AckSet`] in `<dir>/ack` by write-temp + fsync + rename, and reads it back.
//!
//! Layout: `FGACK\0`, u16 LE version, u64 LE floor, u32 LE range count, that many
//! `(u64 LE start, u64 LE end)` pairs, u32 LE crc32c of everything before it. A missing file
//! means "nothing acked yet"; an unreadable one is reported and treated the same, which can
//! only cause re-delivery, never loss.

use std::fs;
use std::io::Write;
use std::path::Path;

use crate::ack_set::AckSet;
use crate::error::{BufferError, IoContext};

/// Name of the ack position file inside the queue directory.
const ACK_FILE: &str = "ack";
/// Name of the temporary file the ack position is written to before the rename.
const ACK_TEMP_FILE: &str = "ack.tmp";
/// Magic bytes that open the ack file.
const ACK_MAGIC: [u8; 6] = *b"FGACK\0";
/// Ack file format version.
const ACK_VERSION: u16 = 1;
/// Bytes before the ranges: magic, version, floor, range count.
const FIXED_LEN: usize = 6 + 2 + 8 + 4;

/// What was found in the ack file at open.
#[derive(Debug)]
pub(crate) enum LoadedAcks {
    /// No ack file: nothing was ever acked (or it was never synced).
    Missing,
    /// A valid ack file.
    Valid(AckSet),
    /// The file exists but cannot be decoded.
    Unreadable,
}

/// Reads `<dir>/ack`. Fails only on I/O errors other than "not found".
pub(crate) fn load(dir: &Path) -> Result<LoadedAcks, BufferError> {
    let path = dir.join(ACK_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(LoadedAcks::Missing);
        }
        Err(error) => return Err(BufferError::io(path, error)),
    };
    Ok(match decode(&bytes) {
        Some(set) => LoadedAcks::Valid(set),
        None => LoadedAcks::Unreadable,
    })
}

/// Writes `acks` to `<dir>/ack` atomically (temp file, fdatasync, rename).
///
/// The caller fsyncs the directory to make the rename itself durable.
pub(crate) fn store(dir: &Path, acks: &AckSet) -> Result<(), BufferError> {
    let temp = dir.join(ACK_TEMP_FILE);
    let mut file = fs::File::create(&temp).at(&temp)?;
    file.write_all(&encode(acks)).at(&temp)?;
    file.sync_data().at(&temp)?;
    let path = dir.join(ACK_FILE);
    fs::rename(&temp, &path).at(&path)
}

/// Encodes an ack set in the ack file layout.
fn encode(acks: &AckSet) -> Vec<u8> {
    let ranges: Vec<(u64, u64)> = acks.ranges().collect();
    let mut out = Vec::with_capacity(FIXED_LEN + ranges.len() * 16 + 4);
    out.extend_from_slice(&ACK_MAGIC);
    out.extend_from_slice(&ACK_VERSION.to_le_bytes());
    out.extend_from_slice(&acks.floor().to_le_bytes());
    // Ranges are disjoint ids below 2^64, so far fewer than 2^32 of them in practice; a
    // count that does not fit would only make the file unreadable (re-delivery, no loss).
    out.extend_from_slice(
        &u32::try_from(ranges.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    for (start, end) in ranges {
        out.extend_from_slice(&start.to_le_bytes());
        out.extend_from_slice(&end.to_le_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes the ack file layout; `None` on any inconsistency.
fn decode(bytes: &[u8]) -> Option<AckSet> {
    let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return None;
    }
    let (fixed, mut rest) = body.split_at_checked(FIXED_LEN)?;
    if fixed[..6] != ACK_MAGIC || fixed[6..8] != ACK_VERSION.to_le_bytes() {
        return None;
    }
    let floor = u64::from_le_bytes(fixed[8..16].try_into().ok()?);
    let count = u32::from_le_bytes(fixed[16..20].try_into().ok()?);
    if usize::try_from(count).ok()?.checked_mul(16)? != rest.len() {
        return None;
    }
    let mut ranges = Vec::new();
    while let Some((pair, tail)) = rest.split_at_checked(16) {
        let start = u64::from_le_bytes(pair[..8].try_into().ok()?);
        let end = u64::from_le_bytes(pair[8..].try_into().ok()?);
        ranges.push((start, end));
        rest = tail;
    }
    Some(AckSet::from_parts(floor, ranges))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(load(dir.path()).unwrap(), LoadedAcks::Missing));
        let acks = AckSet::from_parts(7, [(9, 12), (20, 21)]);
        store(dir.path(), &acks).unwrap();
        match load(dir.path()).unwrap() {
            LoadedAcks::Valid(loaded) => assert_eq!(loaded, acks),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn any_damage_makes_it_unreadable_not_wrong() {
        let bytes = encode(&AckSet::from_parts(7, [(9, 12)]));
        for i in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x40;
            assert_eq!(decode(&damaged), None, "flip at {i}");
            assert_eq!(decode(&bytes[..i]), None, "truncated to {i}");
        }
    }
}
