//! [`MemoryQueue`]: the in-memory queue with the disk queue's API, for `type = "memory"`
//! buffers. Nothing survives a restart; `flush` and `sync` do nothing.
//!
//! Invariant: `entries[i]` holds id `first_id + i`; the front entry is always unacked, and an
//! acked entry's payload is freed at once.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::error::BufferError;
use crate::{Evicted, RecordId};

/// Name used for memory queues in error messages.
const MEMORY_QUEUE_NAME: &str = "memory";

/// A bounded in-memory FIFO of byte records with the [`DiskQueue`](crate::DiskQueue) API.
#[derive(Debug)]
pub struct MemoryQueue {
    /// Payload bytes the queue may hold.
    max_bytes: u64,
    /// Payload bytes held (unacked records only).
    bytes: u64,
    /// Id of `entries[0]`.
    first_id: u64,
    /// Records from `first_id` on; `None` once acked.
    entries: VecDeque<Option<Bytes>>,
    /// Unacked records.
    unacked: u64,
    /// Index into `entries` of the next record `read_next` considers.
    read_index: usize,
}

impl MemoryQueue {
    /// An empty queue holding at most `max_bytes` of payload.
    pub fn new(max_bytes: u64) -> Self {
        MemoryQueue {
            max_bytes,
            bytes: 0,
            first_id: 0,
            entries: VecDeque::new(),
            unacked: 0,
            read_index: 0,
        }
    }

    /// Appends one record and returns its id; [`BufferError::Full`] (nothing stored) when
    /// it would take the queue over `max_bytes`.
    pub fn append(&mut self, record: &[u8]) -> Result<RecordId, BufferError> {
        let needed = u64::try_from(record.len()).unwrap_or(u64::MAX);
        if self.bytes.saturating_add(needed) > self.max_bytes {
            return Err(BufferError::Full {
                queue: MEMORY_QUEUE_NAME.to_owned(),
                needed,
                available: self.max_bytes.saturating_sub(self.bytes),
            });
        }
        self.entries.push_back(Some(Bytes::copy_from_slice(record)));
        self.bytes += needed;
        self.unacked += 1;
        Ok(self.next_id() - 1)
    }

    /// Does nothing: memory queues are not durable.
    pub fn flush(&mut self) -> Result<(), BufferError> {
        Ok(())
    }

    /// Does nothing: memory queues are not durable.
    pub fn sync(&mut self) -> Result<(), BufferError> {
        Ok(())
    }

    /// The next unacked record after the read cursor, or `None` when caught up.
    pub fn read_next(&mut self) -> Result<Option<(RecordId, Bytes)>, BufferError> {
        while let Some(entry) = self.entries.get(self.read_index) {
            let index = self.read_index;
            self.read_index += 1;
            if let Some(payload) = entry {
                return Ok(Some((self.id_at(index), payload.clone())));
            }
        }
        Ok(None)
    }

    /// See [`DiskQueue::next_unread`](crate::DiskQueue::next_unread).
    pub fn next_unread(&self) -> Option<RecordId> {
        (self.read_index..self.entries.len())
            .find(|&index| self.entries[index].is_some())
            .map(|index| self.id_at(index))
    }

    /// See [`DiskQueue::skip_read`](crate::DiskQueue::skip_read).
    pub fn skip_read(&mut self, id: RecordId) {
        let past = id
            .saturating_add(1)
            .checked_sub(self.first_id)
            .and_then(|offset| usize::try_from(offset).ok())
            .map_or(0, |offset| offset.min(self.entries.len()));
        self.read_index = self.read_index.max(past);
    }

    /// Marks one record delivered; unknown or already acked ids are ignored.
    pub fn ack(&mut self, id: RecordId) -> Result<(), BufferError> {
        let index = id
            .checked_sub(self.first_id)
            .and_then(|offset| usize::try_from(offset).ok());
        if let Some(entry) = index.and_then(|index| self.entries.get_mut(index))
            && let Some(payload) = entry.take()
        {
            self.bytes -= u64::try_from(payload.len()).unwrap_or(0);
            self.unacked -= 1;
        }
        self.pop_acked_front();
        Ok(())
    }

    /// Moves the read cursor back to the oldest unacked record.
    pub fn rewind(&mut self) {
        self.read_index = 0;
    }

    /// Drops the oldest unacked record; returns what was dropped (nothing if empty).
    pub fn evict_oldest(&mut self) -> Result<Evicted, BufferError> {
        let Some(Some(payload)) = self.entries.front() else {
            return Ok(Evicted::default());
        };
        let bytes = u64::try_from(payload.len()).unwrap_or(0);
        self.ack(self.first_id)?;
        Ok(Evicted { records: 1, bytes })
    }

    /// Does nothing: an acked entry's payload is freed at once.
    pub fn reclaim_acked(&mut self) -> Result<(), BufferError> {
        Ok(())
    }

    /// Unacked records, including those read but not yet acked.
    pub fn len(&self) -> u64 {
        self.unacked
    }

    /// Whether there is no unacked record.
    pub fn is_empty(&self) -> bool {
        self.unacked == 0
    }

    /// Payload bytes of unacked records (what `max_bytes` limits).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Always 0: memory does not rot. Present so [`Queue`](crate::Queue) treats both alike.
    pub fn take_corrupt_skipped(&mut self) -> u64 {
        0
    }

    /// Id the next appended record gets.
    fn next_id(&self) -> u64 {
        self.first_id + u64::try_from(self.entries.len()).unwrap_or(u64::MAX)
    }

    /// Id of `entries[index]`.
    fn id_at(&self, index: usize) -> u64 {
        self.first_id + u64::try_from(index).unwrap_or(u64::MAX)
    }

    /// Drops acked entries from the front, keeping the read cursor on the same record.
    fn pop_acked_front(&mut self) {
        while let Some(None) = self.entries.front() {
            self.entries.pop_front();
            self.first_id += 1;
            self.read_index = self.read_index.saturating_sub(1);
        }
    }
}
