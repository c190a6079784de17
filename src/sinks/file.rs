//! The file sink: rotating NDJSON files (`events-<n>.ndjson`), one event per line.
//!
//! Records are acknowledged once written to the OS (a process crash loses nothing);
//! the oldest file is deleted when more than `max_files` exist.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fieldgate_core::envelope::write_event;
use tokio_util::sync::CancellationToken;

use crate::buffer::SinkBuffer;
use crate::config::{FileSinkConfig, OutputFormat};
use crate::telemetry::Metrics;

/// Events written per write call.
const BATCH: usize = 512;
/// Wait before retrying after a write error (disk full, directory removed).
const RETRY: Duration = Duration::from_secs(1);

/// The files being written.
struct Rotation {
    directory: PathBuf,
    max_file_size: u64,
    max_files: usize,
    index: u64,
    file: Option<File>,
    size: u64,
}

impl Rotation {
    fn open(directory: PathBuf, max_file_size: u64, max_files: usize) -> std::io::Result<Self> {
        std::fs::create_dir_all(&directory)?;
        let index = existing_indexes(&directory)?.into_iter().max().unwrap_or(1);
        Ok(Self {
            directory,
            max_file_size,
            max_files: max_files.max(1),
            index,
            file: None,
            size: 0,
        })
    }

    fn path(&self, index: u64) -> PathBuf {
        self.directory.join(format!("events-{index}.ndjson"))
    }

    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        if self.file.is_some()
            && self.size + data.len() as u64 > self.max_file_size
            && self.size > 0
        {
            self.index += 1;
            self.file = None;
            self.prune()?;
        }
        if self.file.is_none() {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.path(self.index))?;
            self.size = file.metadata()?.len();
            self.file = Some(file);
        }
        if let Some(file) = &mut self.file {
            file.write_all(data)?;
            self.size += data.len() as u64;
        }
        Ok(())
    }

    fn prune(&self) -> std::io::Result<()> {
        let mut indexes = existing_indexes(&self.directory)?;
        indexes.sort_unstable();
        // The file about to be created counts too.
        let keep = self.max_files.saturating_sub(1);
        if indexes.len() > keep {
            for index in &indexes[..indexes.len() - keep] {
                std::fs::remove_file(self.path(*index))?;
            }
        }
        Ok(())
    }
}

fn existing_indexes(directory: &Path) -> std::io::Result<Vec<u64>> {
    let mut indexes = Vec::new();
    for entry in std::fs::read_dir(directory)? {
        let name = entry?.file_name();
        let index = name
            .to_str()
            .and_then(|name| name.strip_prefix("events-"))
            .and_then(|rest| rest.strip_suffix(".ndjson"))
            .and_then(|number| number.parse::<u64>().ok());
        indexes.extend(index);
    }
    Ok(indexes)
}

/// Writes events to rotating files until `shutdown`.
pub async fn run(
    buffer: Arc<SinkBuffer>,
    config: &FileSinkConfig,
    directory: PathBuf,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let format: OutputFormat = config.format;
    let sent = metrics
        .sent_events
        .get_or_create(&Metrics::sink(buffer.sink()))
        .clone();
    let mut rotation = loop {
        match Rotation::open(directory.clone(), config.max_file_size.0, config.max_files) {
            Ok(rotation) => break rotation,
            Err(err) => {
                tracing::error!(sink = buffer.sink(), directory = %directory.display(), error = %err, "cannot open the output directory; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    () = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    };
    tracing::info!(sink = buffer.sink(), directory = %directory.display(), "writing events to files");
    let mut lines = Vec::with_capacity(64 * 1024);
    loop {
        let batch = tokio::select! {
            _ = shutdown.cancelled() => return,
            batch = buffer.next_batch(BATCH) => batch,
        };
        lines.clear();
        for delivery in &batch {
            write_event(format, &delivery.event, &mut lines);
            lines.push(b'\n');
        }
        if let Err(err) = rotation.write(&lines) {
            tracing::error!(sink = buffer.sink(), directory = %directory.display(), error = %err, "write failed; events stay buffered");
            rotation.file = None;
            buffer.rewind();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                () = tokio::time::sleep(RETRY) => {}
            }
            continue;
        }
        sent.inc_by(batch.len() as u64);
        buffer.ack(batch.iter().map(|delivery| (delivery.lane, delivery.id)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_and_prunes() {
        let dir = tempfile::tempdir().unwrap();
        let mut rotation = Rotation::open(dir.path().to_path_buf(), 10, 2).unwrap();
        for _ in 0..5 {
            rotation.write(b"0123456789").unwrap();
        }
        let mut indexes = existing_indexes(dir.path()).unwrap();
        indexes.sort_unstable();
        assert_eq!(indexes, vec![4, 5]);
        let reopened = Rotation::open(dir.path().to_path_buf(), 10, 2).unwrap();
        assert_eq!(reopened.index, 5);
    }
}
