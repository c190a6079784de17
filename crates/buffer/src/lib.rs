//! fieldgate's store-and-forward buffer: a bounded FIFO of opaque byte records per sink
//! lane, on disk ([`DiskQueue`]) or in memory ([`MemoryQueue`]), unified as [`Queue`].
//!
//! Records get increasing [`RecordId`]s that are never reused. Delivery is at-least-once:
//! a record leaves the queue only when acked (or evicted, or found corrupt); after a crash,
//! records acked since the last `sync` are delivered again, never lost.
#![forbid(unsafe_code)]

mod ack_file;
mod ack_set;
mod disk;
mod error;
mod format;
mod fsutil;
mod memory;
mod options;
mod quarantine;
mod queue;
mod reader;
mod recovery;

pub use disk::{DiskQueue, SyncJob};
pub use error::BufferError;
pub use memory::MemoryQueue;
pub use options::{DEFAULT_MAX_RECORD_BYTES, DEFAULT_SEGMENT_BYTES, DiskQueueOptions};
pub use queue::Queue;
pub use recovery::RecoveryReport;

/// Bytes of framing a [`DiskQueue`] adds in front of every record (length and checksum).
pub const RECORD_FRAMING_BYTES: u64 = format::RECORD_HEADER_LEN;
/// Bytes an empty [`DiskQueue`] holds: its active segment's header.
pub const EMPTY_QUEUE_BYTES: u64 = format::SEGMENT_HEADER_LEN;

/// Identifies a record: increasing in append order, never reused, stable across restarts.
pub type RecordId = u64;

/// What [`DiskQueue::evict_oldest`] or [`MemoryQueue::evict_oldest`] dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Evicted {
    /// Unacked records dropped (the ones the caller should count as lost).
    pub records: u64,
    /// Bytes freed.
    pub bytes: u64,
}
