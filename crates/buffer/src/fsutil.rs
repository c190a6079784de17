//! Small filesystem helpers shared by the disk queue modules.

use std::fs::File;
use std::path::Path;

use crate::error::{BufferError, IoContext};

/// Fsyncs a directory so that entries created, renamed or removed in it survive power loss.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), BufferError> {
    File::open(dir).at(dir)?.sync_all().at(dir)
}

/// Removes a file; a file that is already gone is not an error.
pub(crate) fn remove_file_if_exists(path: &Path) -> Result<(), BufferError> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            Err(BufferError::io(path, error))
        }
        _ => Ok(()),
    }
}
