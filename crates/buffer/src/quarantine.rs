//! Moves damaged bytes out of a queue into `<dir>/corrupt/`, durably, before they are cut.
//!
//! Files are named `<segment name>.<offset>.bad` (offset 0 = the whole segment). Bad bytes
//! are never silently deleted: they are copied and fsynced before the segment is truncated.

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::error::{BufferError, IoContext};

/// Name of the quarantine folder inside the queue directory.
const CORRUPT_DIR: &str = "corrupt";
/// How many `.N` suffixes to try before overwriting an older quarantine file.
const MAX_NAME_ATTEMPTS: u32 = 1000;

/// Bytes moved to quarantine by one operation.
#[derive(Debug)]
pub(crate) struct Quarantined {
    /// Where the bytes now are.
    pub(crate) path: PathBuf,
    /// How many bytes were moved.
    pub(crate) bytes: u64,
}

/// Copies `segment[offset..]` to quarantine and truncates the segment to `offset`.
///
/// Returns `None` when there is nothing past `offset`.
pub(crate) fn cut_tail(
    dir: &Path,
    segment: &Path,
    offset: u64,
) -> Result<Option<Quarantined>, BufferError> {
    let mut source = OpenOptions::new()
        .read(true)
        .write(true)
        .open(segment)
        .at(segment)?;
    let len = source.metadata().at(segment)?.len();
    if len <= offset {
        return Ok(None);
    }
    let target = target_path(dir, segment, offset)?;
    let mut copy = File::create(&target).at(&target)?;
    source.seek(SeekFrom::Start(offset)).at(segment)?;
    let bytes = std::io::copy(&mut source, &mut copy).at(&target)?;
    copy.sync_all().at(&target)?;
    sync_dir(&target)?;
    source.set_len(offset).at(segment)?;
    source.sync_data().at(segment)?;
    Ok(Some(Quarantined {
        path: target,
        bytes,
    }))
}

/// Moves a whole segment file into quarantine.
pub(crate) fn move_whole(dir: &Path, segment: &Path) -> Result<Quarantined, BufferError> {
    let bytes = fs::metadata(segment).at(segment)?.len();
    let target = target_path(dir, segment, 0)?;
    fs::rename(segment, &target).at(&target)?;
    sync_dir(&target)?;
    Ok(Quarantined {
        path: target,
        bytes,
    })
}

/// Creates the quarantine folder and picks a file name not used yet.
fn target_path(dir: &Path, segment: &Path, offset: u64) -> Result<PathBuf, BufferError> {
    let corrupt = dir.join(CORRUPT_DIR);
    fs::create_dir_all(&corrupt).at(&corrupt)?;
    let name = segment
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let base = corrupt.join(format!("{name}.{offset}.bad"));
    let mut candidate = base.clone();
    for attempt in 1..MAX_NAME_ATTEMPTS {
        if !candidate.exists() {
            break;
        }
        candidate = corrupt.join(format!("{name}.{offset}.bad.{attempt}"));
    }
    Ok(candidate)
}

/// Fsyncs the directory holding `path`, so a new or renamed entry survives power loss.
fn sync_dir(path: &Path) -> Result<(), BufferError> {
    match path.parent() {
        Some(parent) => crate::fsutil::sync_dir(parent),
        None => Ok(()),
    }
}
