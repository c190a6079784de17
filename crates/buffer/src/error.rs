//! The crate's error type: every variant names the queue (directory or file path) it is about.

use std::path::PathBuf;

/// Why a buffer operation failed.
///
/// Bad *data* never shows up here: corrupt records are quarantined and counted instead.
/// Only real I/O failures, full queues and caller mistakes are errors.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// An I/O operation on `path` failed (permissions, disk full, disk error).
    #[error("buffer I/O error on {}", path.display())]
    Io {
        /// The file or directory the operation was about.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The record does not fit: appending it would take the queue over its `max_bytes`.
    /// Nothing was written.
    #[error("buffer {queue} is full: record needs {needed} bytes, {available} available")]
    Full {
        /// The queue's directory, or `memory` for an in-memory queue.
        queue: String,
        /// Bytes the record would take, including its framing.
        needed: u64,
        /// Bytes left under `max_bytes`.
        available: u64,
    },
    /// The record is larger than the queue's `max_record_bytes`. Nothing was written.
    #[error("record of {len} bytes exceeds the {max}-byte record limit of buffer {queue}")]
    RecordTooLarge {
        /// The queue's directory, or `memory` for an in-memory queue.
        queue: String,
        /// Size of the rejected record.
        len: u64,
        /// The configured limit.
        max: u32,
    },
}

impl BufferError {
    /// Wraps an I/O error with the path it happened on.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BufferError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Shorthand for attaching a path to `std::io::Result`s.
pub(crate) trait IoContext<T> {
    /// Maps an I/O error to [`BufferError::Io`] naming `path`.
    fn at(self, path: &std::path::Path) -> Result<T, BufferError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: &std::path::Path) -> Result<T, BufferError> {
        self.map_err(|source| BufferError::io(path, source))
    }
}
