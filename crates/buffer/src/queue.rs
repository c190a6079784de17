//! [`Queue`]: one type for disk and memory buffers, so the daemon handles both alike.

use bytes::Bytes;

use crate::disk::{DiskQueue, SyncJob};
use crate::error::BufferError;
use crate::memory::MemoryQueue;
use crate::{Evicted, RecordId};

/// A disk or memory queue; every method delegates to the one inside.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "one Queue per sink lane, never moved in hot paths; boxing would only add noise"
)]
pub enum Queue {
    /// A durable queue in segment files.
    Disk(DiskQueue),
    /// A queue in memory, lost on restart.
    Memory(MemoryQueue),
}

/// Calls `$method` on whichever queue is inside.
macro_rules! delegate {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match $self {
            Queue::Disk(queue) => queue.$method($($arg),*),
            Queue::Memory(queue) => queue.$method($($arg),*),
        }
    };
}

impl Queue {
    /// See [`DiskQueue::append`].
    pub fn append(&mut self, record: &[u8]) -> Result<RecordId, BufferError> {
        delegate!(self.append(record))
    }

    /// See [`DiskQueue::flush`].
    pub fn flush(&mut self) -> Result<(), BufferError> {
        delegate!(self.flush())
    }

    /// See [`DiskQueue::sync`].
    pub fn sync(&mut self) -> Result<(), BufferError> {
        delegate!(self.sync())
    }

    /// See [`DiskQueue::begin_sync`]; a memory queue's job does nothing.
    pub fn begin_sync(&mut self) -> Result<SyncJob, BufferError> {
        match self {
            Queue::Disk(queue) => queue.begin_sync(),
            Queue::Memory(_) => Ok(SyncJob::default()),
        }
    }

    /// See [`DiskQueue::sync_failed`].
    pub fn sync_failed(&mut self, job: SyncJob) {
        if let Queue::Disk(queue) = self {
            queue.sync_failed(job);
        }
    }

    /// See [`DiskQueue::read_next`].
    pub fn read_next(&mut self) -> Result<Option<(RecordId, Bytes)>, BufferError> {
        delegate!(self.read_next())
    }

    /// See [`DiskQueue::next_unread`].
    pub fn next_unread(&self) -> Option<RecordId> {
        delegate!(self.next_unread())
    }

    /// See [`DiskQueue::skip_read`].
    pub fn skip_read(&mut self, id: RecordId) {
        delegate!(self.skip_read(id))
    }

    /// See [`DiskQueue::ack`].
    pub fn ack(&mut self, id: RecordId) -> Result<(), BufferError> {
        delegate!(self.ack(id))
    }

    /// See [`DiskQueue::rewind`].
    pub fn rewind(&mut self) {
        delegate!(self.rewind())
    }

    /// See [`DiskQueue::evict_oldest`] and [`MemoryQueue::evict_oldest`].
    pub fn evict_oldest(&mut self) -> Result<Evicted, BufferError> {
        delegate!(self.evict_oldest())
    }

    /// See [`DiskQueue::reclaim_acked`].
    pub fn reclaim_acked(&mut self) -> Result<(), BufferError> {
        delegate!(self.reclaim_acked())
    }

    /// Whether the queue is on disk (and so holds [`EMPTY_QUEUE_BYTES`] and adds
    /// [`RECORD_FRAMING_BYTES`] per record).
    ///
    /// [`EMPTY_QUEUE_BYTES`]: crate::EMPTY_QUEUE_BYTES
    /// [`RECORD_FRAMING_BYTES`]: crate::RECORD_FRAMING_BYTES
    pub fn is_disk(&self) -> bool {
        matches!(self, Queue::Disk(_))
    }

    /// See [`DiskQueue::len`].
    pub fn len(&self) -> u64 {
        delegate!(self.len())
    }

    /// See [`DiskQueue::is_empty`].
    pub fn is_empty(&self) -> bool {
        delegate!(self.is_empty())
    }

    /// See [`DiskQueue::bytes`].
    pub fn bytes(&self) -> u64 {
        delegate!(self.bytes())
    }

    /// See [`DiskQueue::take_corrupt_skipped`].
    pub fn take_corrupt_skipped(&mut self) -> u64 {
        delegate!(self.take_corrupt_skipped())
    }
}
