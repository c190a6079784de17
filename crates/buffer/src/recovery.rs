//! Start-up recovery of a queue directory: finds the segments, scans only the last one,
//! cuts a torn or corrupt tail, quarantines unreadable segments and loads the ack position.
//!
//! Bad data never fails recovery; only real I/O errors do. Older segments are not read
//! (only their 8-byte header is checked), so start-up cost does not grow with the backlog.

use std::fs;
use std::path::{Path, PathBuf};

use crate::ack_file::{self, LoadedAcks};
use crate::ack_set::AckSet;
use crate::error::{BufferError, IoContext};
use crate::format;
use crate::fsutil;
use crate::quarantine;
use crate::reader::{self, RecordRead, SegmentOpen, SegmentReader};

/// What `DiskQueue::open` found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment files in use after recovery (including the active one).
    pub segments: usize,
    /// Unacked records in the queue after recovery.
    pub records: u64,
    /// Bytes cut from the tail of the last segment (torn write or corruption).
    pub truncated_bytes: u64,
    /// Files written to `<dir>/corrupt/` by this recovery.
    pub quarantined: Vec<PathBuf>,
    /// Record ids known lost because their whole segment had a bad header.
    pub lost_records: u64,
    /// The ack file existed but could not be read: every record still on disk will be
    /// delivered again (duplicates, never loss).
    pub ack_file_unreadable: bool,
}

/// A segment file kept by recovery.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SegmentFile {
    /// Id of its first record (from the file name).
    pub(crate) first_id: u64,
    /// Its size in bytes.
    pub(crate) bytes: u64,
}

/// The recovered state of a queue directory.
#[derive(Debug)]
pub(crate) struct Recovered {
    /// Every kept segment but the last, ascending by first id.
    pub(crate) older: Vec<SegmentFile>,
    /// The last kept segment (scanned) and how many valid records it holds.
    pub(crate) last: Option<(SegmentFile, u64)>,
    /// The id the next appended record gets.
    pub(crate) next_id: u64,
    /// Acked ids (including ids known lost).
    pub(crate) acks: AckSet,
    /// What was repaired (`segments` and `records` are filled in by the caller).
    pub(crate) report: RecoveryReport,
}

/// Recovers the queue in `dir`, creating the directory if needed.
pub(crate) fn recover(dir: &Path, max_record_bytes: u32) -> Result<Recovered, BufferError> {
    fs::create_dir_all(dir).at(dir)?;
    let mut report = RecoveryReport::default();
    let mut ids = list_segments(dir)?;

    // Find the last usable segment, scanning it fully; quarantine unusable ones after it.
    let mut newest_assigned = 0u64;
    let mut last = None;
    while let Some(first_id) = ids.pop() {
        newest_assigned = newest_assigned.max(first_id);
        let path = dir.join(format::segment_file_name(first_id));
        if fs::metadata(&path).at(&path)?.len() == 0 {
            // A segment created just before a crash, before its header reached the disk.
            fsutil::remove_file_if_exists(&path)?;
            continue;
        }
        match scan_last(dir, &path, max_record_bytes, &mut report)? {
            Some((bytes, records)) => {
                last = Some((SegmentFile { first_id, bytes }, records));
                break;
            }
            None => continue,
        }
    }

    // Older segments: check the header only; a bad one is moved aside with all its ids.
    let mut older = Vec::with_capacity(ids.len());
    let mut lost_ranges = Vec::new();
    let bounds: Vec<u64> = ids
        .iter()
        .skip(1)
        .copied()
        .chain(last.map(|(segment, _)| segment.first_id))
        .collect();
    for (&first_id, &end) in ids.iter().zip(&bounds) {
        let path = dir.join(format::segment_file_name(first_id));
        if reader::has_valid_header(&path)? {
            let bytes = fs::metadata(&path).at(&path)?.len();
            older.push(SegmentFile { first_id, bytes });
        } else {
            let moved = quarantine::move_whole(dir, &path)?;
            report.quarantined.push(moved.path);
            lost_ranges.push((first_id, end));
        }
    }

    let mut acks = match ack_file::load(dir)? {
        LoadedAcks::Valid(acks) => acks,
        LoadedAcks::Missing => AckSet::new(0),
        LoadedAcks::Unreadable => {
            report.ack_file_unreadable = true;
            AckSet::new(0)
        }
    };
    let scanned_end = last.map_or(0, |(segment, records)| segment.first_id + records);
    let highest_acked = acks.ranges().last().map_or(acks.floor(), |(_, end)| end);
    // Never reuse an id that may have been handed out before: ids in a quarantined last
    // segment, or acked ids whose records were cut, count as assigned.
    let next_id = scanned_end.max(newest_assigned).max(highest_acked);
    let lowest = older
        .first()
        .or(last.as_ref().map(|(segment, _)| segment))
        .map_or(next_id, |segment| segment.first_id);
    acks.clamp(lowest, next_id);
    for (start, end) in lost_ranges {
        report.lost_records += acks.ack_range(start, end);
    }
    // Ids between the last valid record and next_id have no data: nothing to deliver.
    acks.ack_range(scanned_end, next_id);

    Ok(Recovered {
        older,
        last,
        next_id,
        acks,
        report,
    })
}

/// Segment first ids found in `dir`, ascending. Other files are ignored.
fn list_segments(dir: &Path) -> Result<Vec<u64>, BufferError> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        let is_file = entry.file_type().at(&entry.path())?.is_file();
        if let (true, Some(id)) = (
            is_file,
            entry
                .file_name()
                .to_str()
                .and_then(format::parse_segment_file_name),
        ) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Scans a last segment, cutting a bad tail; returns `(bytes kept, valid records)`, or `None`
/// if its header is bad (the file is then quarantined whole).
fn scan_last(
    dir: &Path,
    path: &Path,
    max_record_bytes: u32,
    report: &mut RecoveryReport,
) -> Result<Option<(u64, u64)>, BufferError> {
    let mut reader = match SegmentReader::open(path, max_record_bytes)? {
        SegmentOpen::Ready(reader) => reader,
        SegmentOpen::BadHeader => {
            let moved = quarantine::move_whole(dir, path)?;
            report.quarantined.push(moved.path);
            return Ok(None);
        }
    };
    let mut records = 0u64;
    loop {
        match reader.next_record()? {
            RecordRead::Record(_) => records += 1,
            RecordRead::End => return Ok(Some((reader.offset(), records))),
            RecordRead::Corrupt => {
                let good = reader.offset();
                drop(reader);
                if let Some(cut) = quarantine::cut_tail(dir, path, good)? {
                    report.truncated_bytes += cut.bytes;
                    report.quarantined.push(cut.path);
                }
                return Ok(Some((good, records)));
            }
        }
    }
}
