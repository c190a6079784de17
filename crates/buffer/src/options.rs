//! Sizing options of a disk queue.

/// Default segment file size: small enough that deleting one frees space promptly.
pub const DEFAULT_SEGMENT_BYTES: u64 = 8 * 1024 * 1024;
/// Default cap on one record's payload.
pub const DEFAULT_MAX_RECORD_BYTES: u32 = 16 * 1024 * 1024;
/// Smallest segment size the queue shrinks `segment_bytes` to for small `max_bytes`.
const MIN_EFFECTIVE_SEGMENT_BYTES: u64 = 4096;

/// How large a disk queue and its files may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskQueueOptions {
    /// Bytes on disk the queue may hold (segment files, headers and framing included).
    pub max_bytes: u64,
    /// A new segment file is started when appending would take the active one past this.
    /// The queue uses at most a quarter of `max_bytes` (but at least 4 KiB), so that
    /// `evict_oldest` never has to drop the whole queue at once.
    pub segment_bytes: u64,
    /// Longest record payload accepted; longer lengths found on disk are treated as corrupt.
    pub max_record_bytes: u32,
}

impl DiskQueueOptions {
    /// Options with the given `max_bytes` and default segment and record sizes.
    pub fn new(max_bytes: u64) -> Self {
        DiskQueueOptions {
            max_bytes,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
        }
    }

    /// The segment size actually used (see [`DiskQueueOptions::segment_bytes`]).
    pub(crate) fn effective_segment_bytes(&self) -> u64 {
        self.segment_bytes
            .min((self.max_bytes / 4).max(MIN_EFFECTIVE_SEGMENT_BYTES))
    }
}

impl Default for DiskQueueOptions {
    /// 1 GiB, the configuration default for `max_size`.
    fn default() -> Self {
        DiskQueueOptions::new(1024 * 1024 * 1024)
    }
}
