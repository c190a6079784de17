//! [`DiskQueue`]: a durable FIFO of opaque byte records in segment files, with out-of-order
//! acks, ack-driven deletion, eviction and read-time corruption skipping.
//!
//! Invariants:
//! - Record ids are consecutive; segment `k` holds ids `[first_k, first_{k+1})`, the active
//!   (last) segment holds `[first, next_id)`. Ids are never reused, across restarts too.
//! - Appends go to a userspace buffer (`pending`); `flush` hands it to the OS, `sync` makes
//!   data, ack position and directory entries durable. Nothing is deleted before it is acked
//!   (or evicted, or found corrupt).
//! - A sealed segment is deleted as soon as every id before its end is acked.
//! - `read_next` flushes pending appends itself when the reader reaches them, so a reader
//!   always sees every appended record.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::ack_file;
use crate::ack_set::AckSet;
use crate::error::{BufferError, IoContext};
use crate::format::{self, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use crate::fsutil;
use crate::options::DiskQueueOptions;
use crate::quarantine;
use crate::reader::{RecordRead, SegmentOpen, SegmentReader};
use crate::recovery::{self, RecoveryReport};
use crate::{Evicted, RecordId};

/// Appends are handed to the OS once this many bytes are buffered.
const PENDING_FLUSH_BYTES: usize = 256 * 1024;

/// A segment that is no longer written to.
#[derive(Debug)]
struct Sealed {
    /// Id of its first record.
    first_id: u64,
    /// Its size on disk.
    bytes: u64,
}

/// The segment being appended to.
#[derive(Debug)]
struct Active {
    /// Id of its first record.
    first_id: u64,
    /// Its path.
    path: PathBuf,
    /// Write handle, positioned at `file_len`; shared with [`SyncJob`]s, which fdatasync
    /// it without holding the queue.
    file: Arc<File>,
    /// Bytes handed to the OS.
    file_len: u64,
    /// Framed records not yet handed to the OS.
    pending: Vec<u8>,
    /// Id of the first record in `pending` (ids below it are readable from the file).
    pending_first_id: u64,
    /// Whether the file has data not yet fdatasynced.
    unsynced: bool,
}

/// Where the reader is.
#[derive(Debug)]
struct Cursor {
    /// First id of the segment being read.
    segment_first: u64,
    /// Id of the record at the reader's offset.
    next_id: u64,
    /// The open segment.
    reader: SegmentReader,
}

/// Location of one segment in the id space.
#[derive(Debug, Clone, Copy)]
struct SegmentSpan {
    /// First id.
    first: u64,
    /// One past the last id.
    end: u64,
    /// Whether it is the active segment.
    active: bool,
}

/// A durable FIFO queue of byte records in `<dir>/<20-digit first id>.seg` files.
///
/// Synchronous and cheap per call: no call reads more than one segment, except
/// [`DiskQueue::open`], which scans only the last segment.
#[derive(Debug)]
pub struct DiskQueue {
    /// The queue directory.
    dir: PathBuf,
    /// Sizing.
    options: DiskQueueOptions,
    /// Segments before the active one, oldest first.
    sealed: VecDeque<Sealed>,
    /// Sum of `sealed[..].bytes`.
    sealed_bytes: u64,
    /// Write handles of sealed segments with data not yet fdatasynced.
    unsynced_sealed: Vec<(u64, Arc<File>)>,
    /// The segment being written.
    active: Active,
    /// Id of the next appended record.
    next_id: u64,
    /// Acked (or evicted, or lost) ids.
    acks: AckSet,
    /// Whether `acks` changed since it was last persisted.
    acks_dirty: bool,
    /// Whether segment files were created or removed since the directory was last fsynced.
    dir_dirty: bool,
    /// `read_next` returns the first unacked record with id >= this.
    read_id: u64,
    /// The open reader, if any.
    cursor: Option<Cursor>,
    /// Records skipped as corrupt since the last `take_corrupt_skipped`.
    corrupt_skipped: u64,
}

impl DiskQueue {
    /// Opens or creates the queue in `dir`, recovering from a crash.
    ///
    /// Only the last segment is scanned; a torn or corrupt tail is copied to
    /// `<dir>/corrupt/` and cut, a segment with a bad header is moved there whole. Fails only
    /// on real I/O errors, never on bad data.
    pub fn open(
        dir: &Path,
        options: DiskQueueOptions,
    ) -> Result<(DiskQueue, RecoveryReport), BufferError> {
        let recovered = recovery::recover(dir, options.max_record_bytes)?;
        let mut report = recovered.report;
        let next_id = recovered.next_id;
        let mut sealed: VecDeque<Sealed> = recovered
            .older
            .iter()
            .map(|segment| Sealed {
                first_id: segment.first_id,
                bytes: segment.bytes,
            })
            .collect();
        let mut dir_dirty = false;
        let active = match recovered.last {
            Some((last, records)) if last.first_id + records == next_id => {
                reopen_active(dir, last.first_id, last.bytes, next_id)?
            }
            other => {
                if let Some((last, _)) = other {
                    sealed.push_back(Sealed {
                        first_id: last.first_id,
                        bytes: last.bytes,
                    });
                }
                dir_dirty = true;
                create_active(dir, next_id)?
            }
        };
        let sealed_bytes = sealed.iter().map(|segment| segment.bytes).sum();
        let mut queue = DiskQueue {
            dir: dir.to_path_buf(),
            options,
            sealed,
            sealed_bytes,
            unsynced_sealed: Vec::new(),
            active,
            next_id,
            read_id: recovered.acks.floor(),
            acks: recovered.acks,
            acks_dirty: false,
            dir_dirty,
            cursor: None,
            corrupt_skipped: 0,
        };
        queue.delete_acked_segments()?;
        report.segments = queue.sealed.len() + 1;
        report.records = queue.len();
        Ok((queue, report))
    }

    /// Appends one record and returns its id.
    ///
    /// The record sits in a userspace buffer until [`flush`](Self::flush) or
    /// [`sync`](Self::sync) (or until the buffer fills). On error nothing was appended:
    /// [`BufferError::Full`] when `bytes()` plus the record's size would exceed `max_bytes`,
    /// [`BufferError::RecordTooLarge`] over `max_record_bytes`.
    pub fn append(&mut self, record: &[u8]) -> Result<RecordId, BufferError> {
        let payload_len = u32::try_from(record.len())
            .ok()
            .filter(|&len| len <= self.options.max_record_bytes)
            .ok_or_else(|| BufferError::RecordTooLarge {
                queue: self.dir.display().to_string(),
                len: u64::try_from(record.len()).unwrap_or(u64::MAX),
                max: self.options.max_record_bytes,
            })?;
        let frame = RECORD_HEADER_LEN + u64::from(payload_len);
        if self.bytes() + self.space_needed(frame).1 > self.options.max_bytes {
            self.reclaim_acked_active()?;
        }
        let (needs_roll, needed) = self.space_needed(frame);
        if self.bytes() + needed > self.options.max_bytes {
            return Err(BufferError::Full {
                queue: self.dir.display().to_string(),
                needed,
                available: self.options.max_bytes.saturating_sub(self.bytes()),
            });
        }
        if needs_roll {
            self.roll_over()?;
            // The sealed segment may hold nothing but acked records.
            self.delete_acked_segments()?;
        }
        let frame_len = usize::try_from(frame).unwrap_or(usize::MAX);
        if !self.active.pending.is_empty()
            && self.active.pending.len().saturating_add(frame_len) > PENDING_FLUSH_BYTES
        {
            self.flush()?;
        }
        let pending = &mut self.active.pending;
        pending.extend_from_slice(&format::record_header(payload_len, record));
        pending.extend_from_slice(record);
        let id = self.next_id;
        self.next_id += 1;
        Ok(id)
    }

    /// Hands buffered appends to the OS: after this returns, killing the process loses
    /// nothing (power loss still may; see [`sync`](Self::sync)).
    pub fn flush(&mut self) -> Result<(), BufferError> {
        let active = &mut self.active;
        if active.pending.is_empty() {
            return Ok(());
        }
        if let Err(error) = (&*active.file).write_all(&active.pending) {
            // Undo a partial write so a retry appends at the right place. Best effort: if
            // this fails too, recovery cuts the partial record at the next start.
            let file_len = active.file_len;
            let _undone: std::io::Result<u64> = active
                .file
                .set_len(file_len)
                .and_then(|()| (&*active.file).seek(SeekFrom::Start(file_len)));
            return Err(BufferError::io(&active.path, error));
        }
        active.file_len += u64::try_from(active.pending.len()).unwrap_or(u64::MAX);
        active.pending.clear();
        active.pending_first_id = self.next_id;
        active.unsynced = true;
        Ok(())
    }

    /// Makes everything durable: flushes, fdatasyncs every segment written since the last
    /// sync, persists the ack position (`<dir>/ack`, temp file + rename) and fsyncs the
    /// directory if segment files were created or deleted. After this returns, power loss
    /// loses no appended record and re-delivers no record acked before the call.
    pub fn sync(&mut self) -> Result<(), BufferError> {
        let job = self.begin_sync()?;
        if let Err(error) = job.run() {
            self.sync_failed(job);
            return Err(error);
        }
        Ok(())
    }

    /// The first half of [`sync`](Self::sync), cheap: flushes appends to the OS and takes
    /// what must be made durable (segment handles, a snapshot of the ack position, whether
    /// the directory changed) into a [`SyncJob`], whose [`run`](SyncJob::run) does the slow
    /// part without borrowing the queue. Callers sharing the queue behind a lock run the
    /// job outside it, so appends and acks never wait for an fdatasync.
    ///
    /// Run jobs one at a time, in the order they were begun (a later job's ack position must
    /// not be overwritten by an earlier one's). Once a job's `run` returns `Ok`, everything
    /// appended and acked before `begin_sync` is durable. When it fails, hand it back to
    /// [`sync_failed`](Self::sync_failed) before beginning another.
    pub fn begin_sync(&mut self) -> Result<SyncJob, BufferError> {
        self.flush()?;
        let mut files: Vec<(PathBuf, Arc<File>)> = std::mem::take(&mut self.unsynced_sealed)
            .into_iter()
            .map(|(first_id, file)| (self.segment_path(first_id), file))
            .collect();
        if self.active.unsynced {
            files.push((self.active.path.clone(), Arc::clone(&self.active.file)));
            self.active.unsynced = false;
        }
        let acks = self.acks_dirty.then(|| self.acks.clone());
        self.acks_dirty = false;
        // Storing the ack position renames a file: the directory must be synced after it.
        let sync_dir = self.dir_dirty || acks.is_some();
        self.dir_dirty = false;
        Ok(SyncJob {
            dir: Some(self.dir.clone()),
            files,
            acks,
            sync_dir,
        })
    }

    /// A job from [`begin_sync`](Self::begin_sync) failed: marks what it carried as not
    /// yet durable again, so the next sync retries it.
    pub fn sync_failed(&mut self, job: SyncJob) {
        for (path, file) in job.files {
            if path == self.active.path {
                self.active.unsynced = true;
            } else if let Some(first_id) = path
                .file_name()
                .and_then(|name| name.to_str())
                .and_then(format::parse_segment_file_name)
                .filter(|first_id| self.sealed.iter().any(|s| s.first_id == *first_id))
            {
                self.unsynced_sealed.push((first_id, file));
            }
        }
        if job.acks.is_some() {
            self.acks_dirty = true;
        }
        if job.sync_dir {
            self.dir_dirty = true;
        }
    }

    /// The next unacked record after the read cursor, or `None` when the reader has caught
    /// up with every appended record.
    ///
    /// Flushes pending appends when the reader reaches them. A record failing its checksum
    /// is skipped with the rest of its segment (moved to `<dir>/corrupt/`), counted in
    /// [`take_corrupt_skipped`](Self::take_corrupt_skipped), and reading continues with the
    /// next segment.
    pub fn read_next(&mut self) -> Result<Option<(RecordId, Bytes)>, BufferError> {
        loop {
            self.read_id = self.read_id.max(self.acks.floor());
            if self.read_id >= self.next_id {
                return Ok(None);
            }
            let span = self.locate(self.read_id);
            let mut cursor = match self.cursor.take() {
                Some(cursor)
                    if cursor.segment_first == span.first && cursor.next_id <= self.read_id =>
                {
                    cursor
                }
                Some(mut cursor) if cursor.segment_first == span.first => {
                    cursor.reader.restart()?;
                    cursor.next_id = span.first;
                    cursor
                }
                _ => match SegmentReader::open(
                    &self.segment_path(span.first),
                    self.options.max_record_bytes,
                )? {
                    SegmentOpen::Ready(reader) => Cursor {
                        segment_first: span.first,
                        next_id: span.first,
                        reader,
                    },
                    SegmentOpen::BadHeader => {
                        self.quarantine_whole(span)?;
                        continue;
                    }
                },
            };
            if cursor.next_id >= span.end {
                self.read_id = self.read_id.max(span.end);
                continue;
            }
            if span.active && cursor.next_id >= self.active.pending_first_id {
                self.flush()?;
            }
            match cursor.reader.next_record()? {
                RecordRead::Record(payload) => {
                    let id = cursor.next_id;
                    cursor.next_id += 1;
                    self.cursor = Some(cursor);
                    if id < self.read_id {
                        continue; // catching up after a rewind or reopen
                    }
                    self.read_id = id + 1;
                    if !self.acks.is_acked(id) {
                        return Ok(Some((id, Bytes::from(payload))));
                    }
                }
                RecordRead::End | RecordRead::Corrupt => {
                    let offset = cursor.reader.offset();
                    self.skip_corrupt(span, offset, cursor.next_id)?;
                }
            }
        }
    }

    /// The id [`read_next`](Self::read_next) would return next, without reading it: the
    /// first unacked record at or after the read position, or `None` when caught up.
    pub fn next_unread(&self) -> Option<RecordId> {
        let mut id = self.read_id.max(self.acks.floor());
        while id < self.next_id {
            if !self.acks.is_acked(id) {
                return Some(id);
            }
            id += 1;
        }
        None
    }

    /// Moves the read position past `id` without reading it: the caller holds the record
    /// already (the sink's in-memory copy of what was just appended). `id` should be what
    /// [`next_unread`](Self::next_unread) returned; a smaller one changes nothing.
    pub fn skip_read(&mut self, id: RecordId) {
        self.read_id = self.read_id.max(id.saturating_add(1));
    }

    /// Marks one record delivered; acks may come in any order. Deletes segment files whose
    /// records (and all earlier ones) are now acked. Unknown or already acked ids are ignored.
    pub fn ack(&mut self, id: RecordId) -> Result<(), BufferError> {
        if id < self.next_id && self.acks.ack(id) {
            self.acks_dirty = true;
            self.delete_acked_segments()?;
        }
        Ok(())
    }

    /// Moves the read cursor back to the oldest unacked record, so records read but not
    /// acked are read again.
    pub fn rewind(&mut self) {
        self.read_id = self.acks.floor();
    }

    /// Deletes the oldest segment (rolling the active one over first if it is the only one
    /// and holds records) and returns how many unacked records and bytes went with it.
    pub fn evict_oldest(&mut self) -> Result<Evicted, BufferError> {
        if self.sealed.is_empty() {
            if self.next_id == self.active.first_id {
                return Ok(Evicted::default());
            }
            self.roll_over()?;
        }
        let Some(oldest) = self.sealed.front() else {
            return Ok(Evicted::default());
        };
        let (first_id, bytes) = (oldest.first_id, oldest.bytes);
        let end = self
            .sealed
            .get(1)
            .map_or(self.active.first_id, |s| s.first_id);
        self.remove_oldest_sealed()?;
        let records = self.acks.ack_range(first_id, end);
        self.acks_dirty = true;
        self.delete_acked_segments()?;
        Ok(Evicted { records, bytes })
    }

    /// Frees the bytes of acked records still held by the active segment, when every
    /// record is acked: afterwards an empty queue holds [`EMPTY_QUEUE_BYTES`] only.
    ///
    /// [`append`](Self::append) does this by itself when it runs out of room; a caller that
    /// enforces a shared limit over several queues calls it before deciding it is full.
    ///
    /// [`EMPTY_QUEUE_BYTES`]: crate::EMPTY_QUEUE_BYTES
    pub fn reclaim_acked(&mut self) -> Result<(), BufferError> {
        self.reclaim_acked_active()
    }

    /// Unacked records, including those read but not yet acked.
    pub fn len(&self) -> u64 {
        self.acks.unacked_in(self.acks.floor(), self.next_id)
    }

    /// Whether there is no unacked record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held by the queue on disk and in its write buffer (what `max_bytes` limits).
    pub fn bytes(&self) -> u64 {
        let pending = u64::try_from(self.active.pending.len()).unwrap_or(u64::MAX);
        self.sealed_bytes + self.active.file_len + pending
    }

    /// Records skipped as corrupt by `read_next` since the last call; resets the count.
    pub fn take_corrupt_skipped(&mut self) -> u64 {
        std::mem::take(&mut self.corrupt_skipped)
    }

    /// Path of the segment whose first id is `first_id`.
    fn segment_path(&self, first_id: u64) -> PathBuf {
        self.dir.join(format::segment_file_name(first_id))
    }

    /// `(roll needed, bytes needed)` to append a record framed in `frame` bytes.
    fn space_needed(&self, frame: u64) -> (bool, u64) {
        let active_bytes = self.bytes() - self.sealed_bytes;
        let needs_roll = self.next_id > self.active.first_id
            && active_bytes + frame > self.options.effective_segment_bytes();
        let needed = frame + if needs_roll { SEGMENT_HEADER_LEN } else { 0 };
        (needs_roll, needed)
    }

    /// The segment holding `id` (the oldest one if `id` precedes every segment).
    fn locate(&self, id: u64) -> SegmentSpan {
        if id >= self.active.first_id || self.sealed.is_empty() {
            return SegmentSpan {
                first: self.active.first_id,
                end: self.next_id,
                active: true,
            };
        }
        let index = self
            .sealed
            .partition_point(|segment| segment.first_id <= id)
            .saturating_sub(1);
        let first = self.sealed.get(index).map_or(0, |segment| segment.first_id);
        let end = self
            .sealed
            .get(index + 1)
            .map_or(self.active.first_id, |segment| segment.first_id);
        SegmentSpan {
            first,
            end,
            active: false,
        }
    }

    /// Seals the active segment and starts a new one at `next_id`. Needs at least one
    /// record in the active segment (so the new file name is new).
    fn roll_over(&mut self) -> Result<(), BufferError> {
        self.flush()?;
        let fresh = create_active(&self.dir, self.next_id)?;
        let old = std::mem::replace(&mut self.active, fresh);
        self.sealed.push_back(Sealed {
            first_id: old.first_id,
            bytes: old.file_len,
        });
        self.sealed_bytes += old.file_len;
        if old.unsynced {
            self.unsynced_sealed.push((old.first_id, old.file));
        }
        self.dir_dirty = true;
        Ok(())
    }

    /// When every record is acked but the active segment still holds them, replaces it with
    /// an empty one so its bytes are freed.
    fn reclaim_acked_active(&mut self) -> Result<(), BufferError> {
        if self.next_id > self.active.first_id && self.acks.floor() >= self.next_id {
            self.roll_over()?;
            self.delete_acked_segments()?;
        }
        Ok(())
    }

    /// Deletes sealed segments, oldest first, while every id before their end is acked.
    fn delete_acked_segments(&mut self) -> Result<(), BufferError> {
        while self.sealed.front().is_some() {
            let end = self
                .sealed
                .get(1)
                .map_or(self.active.first_id, |s| s.first_id);
            if end > self.acks.floor() {
                break;
            }
            self.remove_oldest_sealed()?;
        }
        Ok(())
    }

    /// Deletes the oldest sealed segment's file and forgets it.
    fn remove_oldest_sealed(&mut self) -> Result<(), BufferError> {
        let Some(oldest) = self.sealed.front() else {
            return Ok(());
        };
        let first_id = oldest.first_id;
        fsutil::remove_file_if_exists(&self.segment_path(first_id))?;
        self.forget_sealed(first_id);
        Ok(())
    }

    /// Drops every in-memory trace of the sealed segment `first_id` (file already gone).
    fn forget_sealed(&mut self, first_id: u64) {
        if let Some(index) = self.sealed.iter().position(|s| s.first_id == first_id)
            && let Some(segment) = self.sealed.remove(index)
        {
            self.sealed_bytes -= segment.bytes;
        }
        self.unsynced_sealed.retain(|(first, _)| *first != first_id);
        if self
            .cursor
            .as_ref()
            .is_some_and(|cursor| cursor.segment_first == first_id)
        {
            self.cursor = None;
        }
        self.dir_dirty = true;
    }

    /// The record `bad_id` at `offset` of `span` is torn or corrupt: quarantines the rest
    /// of the segment, marks its remaining ids gone and counts the unacked ones.
    fn skip_corrupt(
        &mut self,
        span: SegmentSpan,
        offset: u64,
        bad_id: u64,
    ) -> Result<(), BufferError> {
        self.cursor = None;
        if span.active {
            // Seal it first: the segment must stop growing before it is cut.
            self.roll_over()?;
        }
        let path = self.segment_path(span.first);
        if let Some(cut) = quarantine::cut_tail(&self.dir, &path, offset)?
            && let Some(segment) = self.sealed.iter_mut().find(|s| s.first_id == span.first)
        {
            segment.bytes -= cut.bytes;
            self.sealed_bytes -= cut.bytes;
        }
        self.mark_gone(bad_id, span.end)
    }

    /// `span`'s header is bad: moves the whole file to quarantine and marks its ids gone.
    fn quarantine_whole(&mut self, span: SegmentSpan) -> Result<(), BufferError> {
        self.cursor = None;
        if span.active {
            self.roll_over()?;
        }
        quarantine::move_whole(&self.dir, &self.segment_path(span.first))?;
        self.forget_sealed(span.first);
        self.mark_gone(span.first, span.end)
    }

    /// Acks ids `[start, end)` whose data is gone, counting the unacked ones as skipped.
    fn mark_gone(&mut self, start: u64, end: u64) -> Result<(), BufferError> {
        let skipped = self.acks.ack_range(start, end);
        self.corrupt_skipped += skipped;
        self.acks_dirty |= skipped > 0;
        self.read_id = self.read_id.max(end);
        self.delete_acked_segments()
    }
}

/// The slow half of a [`DiskQueue::sync`]: fdatasyncs, the ack position file and the
/// directory fsync, detached from the queue (see [`DiskQueue::begin_sync`]).
#[derive(Debug, Default)]
pub struct SyncJob {
    /// The queue directory; `None` for a job with nothing to do.
    dir: Option<PathBuf>,
    /// Segment files with data not yet fdatasynced.
    files: Vec<(PathBuf, Arc<File>)>,
    /// The ack position to persist, when it changed.
    acks: Option<AckSet>,
    /// Whether the directory must be fsynced.
    sync_dir: bool,
}

impl SyncJob {
    /// Whether running the job would touch the disk at all.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.acks.is_none() && !self.sync_dir
    }

    /// Makes durable what the job carries: data first, then the ack position, then the
    /// directory entries (new or deleted segments, the renamed ack file).
    pub fn run(&self) -> Result<(), BufferError> {
        for (path, file) in &self.files {
            file.sync_data().at(path)?;
        }
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        if let Some(acks) = &self.acks {
            ack_file::store(dir, acks)?;
        }
        if self.sync_dir {
            fsutil::sync_dir(dir)?;
        }
        Ok(())
    }
}

impl Drop for DiskQueue {
    /// Best effort: hands pending appends to the OS and persists the ack position, so a
    /// clean shutdown without `sync` neither loses records nor re-delivers acked ones.
    fn drop(&mut self) {
        // Nowhere to report errors from drop; the next open recovers from either failing.
        let _flushed: Result<(), BufferError> = self.flush();
        if self.acks_dirty {
            let _stored: Result<(), BufferError> =
                ack_file::store(&self.dir, &self.acks).and_then(|()| fsutil::sync_dir(&self.dir));
        }
    }
}

/// Creates a new, empty segment file starting at `first_id`.
fn create_active(dir: &Path, first_id: u64) -> Result<Active, BufferError> {
    let path = dir.join(format::segment_file_name(first_id));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .at(&path)?;
    file.write_all(&format::segment_header()).at(&path)?;
    Ok(Active {
        first_id,
        path,
        file: Arc::new(file),
        file_len: SEGMENT_HEADER_LEN,
        pending: Vec::new(),
        pending_first_id: first_id,
        unsynced: true,
    })
}

/// Opens a recovered segment (`len` valid bytes, records up to `next_id`) for appending.
fn reopen_active(dir: &Path, first_id: u64, len: u64, next_id: u64) -> Result<Active, BufferError> {
    let path = dir.join(format::segment_file_name(first_id));
    let mut file = OpenOptions::new().write(true).open(&path).at(&path)?;
    file.seek(SeekFrom::Start(len)).at(&path)?;
    Ok(Active {
        first_id,
        path,
        file: Arc::new(file),
        file_len: len,
        pending: Vec::new(),
        pending_first_id: next_id,
        // Recovered bytes may still be only in the page cache after a kill -9.
        unsynced: true,
    })
}
