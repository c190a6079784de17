//! The file sink: rotating NDJSON files (`events-<n>.ndjson`), one event per line.
//!
//! Records are acknowledged (and so deleted from the buffer) only once their lines are
//! fdatasynced: power loss loses nothing acked. Lines are written whole: a write or sync
//! that fails cuts the file back to its last complete line before the batch is retried,
//! and a file found with a torn last line (a crash mid-write) is cut the same way when it
//! is opened again. The oldest file is deleted when more than `max_files` exist.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fieldgate_core::envelope::{OutputFormat, write_event};
use futures_util::future::BoxFuture;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use toml::Spanned;

use super::{SinkContext, SinkSpec};
use crate::buffer::{BufferConfig, SinkBuffer, blocking};
use crate::config::ByteSize;
use crate::telemetry::Metrics;

/// `[sinks.NAME]` with `type = "file"`: rotating NDJSON files.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// Sources to read.
    pub inputs: Spanned<Vec<String>>,
    /// Buffer in front of the sink.
    #[serde(default)]
    pub buffer: BufferConfig,
    /// Output directory; `<data_dir>/sinks/<name>` when absent.
    pub directory: Option<PathBuf>,
    /// Rotate after this many bytes.
    #[serde(default = "default_max_file_size")]
    pub max_file_size: ByteSize,
    /// Keep this many files; the oldest is deleted on rotation.
    #[serde(default = "default_max_files")]
    pub max_files: usize,
    /// Envelope or raw device JSON.
    #[serde(default)]
    pub format: OutputFormat,
}

fn default_max_file_size() -> ByteSize {
    ByteSize(64 * 1024 * 1024)
}
fn default_max_files() -> usize {
    10
}

impl SinkSpec for FileSinkConfig {
    fn inputs(&self) -> &Spanned<Vec<String>> {
        &self.inputs
    }

    fn inputs_mut(&mut self) -> &mut toml::Spanned<Vec<String>> {
        &mut self.inputs
    }

    fn buffer(&self) -> &BufferConfig {
        &self.buffer
    }

    fn build(&self, context: SinkContext) -> BoxFuture<'static, ()> {
        let directory = self
            .directory
            .clone()
            .unwrap_or_else(|| context.data_dir.join("sinks").join(&context.name));
        let config = self.clone();
        Box::pin(async move {
            run(
                context.buffer,
                &config,
                directory,
                context.metrics,
                context.stop,
            )
            .await;
        })
    }
}

/// Events written per write call.
const BATCH: usize = 512;
/// Wait before retrying after a write error (disk full, directory removed).
const RETRY: Duration = Duration::from_secs(1);
/// Bytes read per step when looking back for the last complete line.
const TAIL_CHUNK: u64 = 64 * 1024;

/// One output file, as the sink uses it (a trait so tests can make writes fail).
trait OutputFile: Send {
    /// Appends all of `data` at the end of the file.
    fn append(&mut self, data: &[u8]) -> io::Result<()>;
    /// Cuts the file to `len` bytes.
    fn truncate(&mut self, len: u64) -> io::Result<()>;
    /// fdatasync.
    fn sync(&mut self) -> io::Result<()>;
}

impl OutputFile for File {
    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        // Opened with O_APPEND: every write goes to the current end, also after a cut.
        self.write_all(data)
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.set_len(len)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.sync_data()
    }
}

/// Opens `path` for appending; returns it with the length of its complete lines.
type Opener = Arc<dyn Fn(&Path) -> io::Result<(Box<dyn OutputFile>, u64)> + Send + Sync>;

/// Opens (creating) an output file for appending, first cutting a torn last line.
fn open_output(path: &Path) -> io::Result<(Box<dyn OutputFile>, u64)> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)?;
    let len = file.metadata()?.len();
    let complete = complete_lines_len(&mut file, len)?;
    if complete < len {
        tracing::warn!(path = %path.display(), cut = len - complete, "output file ended in a torn line; cut it");
        file.set_len(complete)?;
        file.sync_data()?;
    }
    if len == 0 {
        // A new file: make its directory entry durable before lines are acked in it.
        if let Some(directory) = path.parent() {
            File::open(directory)?.sync_all()?;
        }
    }
    Ok((Box::new(file), complete))
}

/// Length of `file` up to and including its last `\n` (0 without one).
fn complete_lines_len(file: &mut File, len: u64) -> io::Result<u64> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut end = len;
    let mut chunk = Vec::new();
    while end > 0 {
        let start = end.saturating_sub(TAIL_CHUNK);
        chunk.resize(usize::try_from(end - start).unwrap_or(0), 0);
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk)?;
        if let Some(at) = chunk.iter().rposition(|byte| *byte == b'\n') {
            return Ok(start + at as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// The files being written.
struct Rotation {
    directory: PathBuf,
    max_file_size: u64,
    max_files: usize,
    index: u64,
    file: Option<Box<dyn OutputFile>>,
    /// Bytes of complete, synced lines in `file`.
    size: u64,
    open: Opener,
}

impl Rotation {
    fn open(
        directory: PathBuf,
        max_file_size: u64,
        max_files: usize,
        open: Opener,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(&directory)?;
        let index = existing_indexes(&directory)?.into_iter().max().unwrap_or(1);
        Ok(Self {
            directory,
            max_file_size,
            max_files: max_files.max(1),
            index,
            file: None,
            size: 0,
            open,
        })
    }

    fn path(&self, index: u64) -> PathBuf {
        self.directory.join(format!("events-{index}.ndjson"))
    }

    /// Appends whole lines and fdatasyncs them. On error the file holds exactly what it
    /// held before (complete lines), so the caller retries the same lines.
    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if self.file.is_some()
            && self.size + data.len() as u64 > self.max_file_size
            && self.size > 0
        {
            // Everything in the old file is synced already (each batch is).
            self.index += 1;
            self.file = None;
            self.prune()?;
        }
        let file = match &mut self.file {
            Some(file) => file,
            None => {
                let (file, size) = (self.open)(&self.path(self.index))?;
                self.size = size;
                self.file.insert(file)
            }
        };
        let written = file.append(data).and_then(|()| file.sync());
        if let Err(err) = written {
            // Part of the batch may be in the file (a short write), or all of it with its
            // durability unknown (a failed sync): cut it, the retry writes it whole.
            if let Err(cut) = file.truncate(self.size) {
                tracing::warn!(error = %cut, "cannot cut a failed write; the file is reopened (and its torn tail cut) before the retry");
                self.file = None;
            }
            return Err(err);
        }
        self.size += data.len() as u64;
        Ok(())
    }

    fn prune(&self) -> io::Result<()> {
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

fn existing_indexes(directory: &Path) -> io::Result<Vec<u64>> {
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

/// What the sink needs from its config.
#[derive(Debug, Clone, Copy)]
struct Settings {
    format: OutputFormat,
    max_file_size: u64,
    max_files: usize,
}

/// Writes events to rotating files until `shutdown`.
pub async fn run(
    buffer: Arc<SinkBuffer>,
    config: &FileSinkConfig,
    directory: PathBuf,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let settings = Settings {
        format: config.format,
        max_file_size: config.max_file_size.0,
        max_files: config.max_files,
    };
    run_with(
        buffer,
        settings,
        directory,
        metrics,
        shutdown,
        Arc::new(open_output),
    )
    .await;
}

async fn run_with(
    buffer: Arc<SinkBuffer>,
    settings: Settings,
    directory: PathBuf,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    open: Opener,
) {
    let sent = metrics
        .sent_events
        .get_or_create(&Metrics::sink(buffer.sink()))
        .clone();
    let mut rotation = loop {
        match Rotation::open(
            directory.clone(),
            settings.max_file_size,
            settings.max_files,
            Arc::clone(&open),
        ) {
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
            write_event(settings.format, &delivery.event, &mut lines);
            lines.push(b'\n');
        }
        // A write and an fdatasync: off the async worker while the disk works.
        if let Err(err) = blocking(|| rotation.write(&lines)) {
            tracing::error!(sink = buffer.sink(), directory = %directory.display(), error = %err, "write failed; events stay buffered");
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
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// How many of the next calls fail, for every file an opener of the plan makes (a
    /// failing append writes half its bytes first).
    #[derive(Default)]
    struct Plan {
        fail_appends: AtomicUsize,
        fail_syncs: AtomicUsize,
        /// Syncs attempted.
        syncs: AtomicUsize,
    }

    struct FlakyFile(Box<dyn OutputFile>, Arc<Plan>);

    fn take(counter: &AtomicUsize) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    impl OutputFile for FlakyFile {
        fn append(&mut self, data: &[u8]) -> io::Result<()> {
            if take(&self.1.fail_appends) {
                // A short write: half a batch, ending mid-line, then an error.
                self.0.append(&data[..data.len() / 2])?;
                return Err(io::Error::other("injected write failure"));
            }
            self.0.append(data)
        }

        fn truncate(&mut self, len: u64) -> io::Result<()> {
            self.0.truncate(len)
        }

        fn sync(&mut self) -> io::Result<()> {
            self.1.syncs.fetch_add(1, Ordering::SeqCst);
            if take(&self.1.fail_syncs) {
                return Err(io::Error::other("injected sync failure"));
            }
            self.0.sync()
        }
    }

    fn open_flaky(plan: &Arc<Plan>) -> Opener {
        let plan = Arc::clone(plan);
        Arc::new(move |path: &Path| {
            let (file, len) = open_output(path)?;
            let file: Box<dyn OutputFile> = Box::new(FlakyFile(file, Arc::clone(&plan)));
            Ok((file, len))
        })
    }

    fn plain() -> Opener {
        Arc::new(open_output)
    }

    fn content(dir: &Path) -> String {
        let mut indexes = existing_indexes(dir).unwrap();
        indexes.sort_unstable();
        indexes
            .into_iter()
            .map(|index| {
                std::fs::read_to_string(dir.join(format!("events-{index}.ndjson"))).unwrap()
            })
            .collect()
    }

    #[test]
    fn rotates_and_prunes() {
        let dir = tempfile::tempdir().unwrap();
        let mut rotation = Rotation::open(dir.path().to_path_buf(), 10, 2, plain()).unwrap();
        for _ in 0..5 {
            rotation.write(b"012345678\n").unwrap();
        }
        let mut indexes = existing_indexes(dir.path()).unwrap();
        indexes.sort_unstable();
        assert_eq!(indexes, vec![4, 5]);
        let reopened = Rotation::open(dir.path().to_path_buf(), 10, 2, plain()).unwrap();
        assert_eq!(reopened.index, 5);
    }

    #[test]
    fn a_failed_write_is_cut_back_and_retried_whole() {
        let plan = Arc::new(Plan::default());
        let dir = tempfile::tempdir().unwrap();
        let mut rotation =
            Rotation::open(dir.path().to_path_buf(), 1 << 20, 2, open_flaky(&plan)).unwrap();
        rotation.write(b"{\"a\":1}\n{\"a\":2}\n").unwrap();
        plan.fail_appends.store(1, Ordering::SeqCst);
        let batch = b"{\"a\":3}\n{\"a\":4}\n{\"a\":5}\n";
        assert!(rotation.write(batch).is_err());
        assert_eq!(
            content(dir.path()),
            "{\"a\":1}\n{\"a\":2}\n",
            "no torn line"
        );
        rotation.write(batch).unwrap();
        assert_eq!(
            content(dir.path()),
            "{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n{\"a\":4}\n{\"a\":5}\n"
        );
    }

    #[test]
    fn a_failed_sync_is_cut_back_so_the_retry_does_not_duplicate() {
        let plan = Arc::new(Plan::default());
        let dir = tempfile::tempdir().unwrap();
        let mut rotation =
            Rotation::open(dir.path().to_path_buf(), 1 << 20, 2, open_flaky(&plan)).unwrap();
        rotation.write(b"{\"a\":1}\n").unwrap();
        plan.fail_syncs.store(1, Ordering::SeqCst);
        assert!(rotation.write(b"{\"a\":2}\n").is_err());
        assert_eq!(content(dir.path()), "{\"a\":1}\n");
        rotation.write(b"{\"a\":2}\n").unwrap();
        assert_eq!(content(dir.path()), "{\"a\":1}\n{\"a\":2}\n");
    }

    #[test]
    fn a_torn_line_left_by_a_crash_is_cut_when_the_file_is_reopened() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("events-1.ndjson"),
            "{\"a\":1}\n{\"a\":2}\n{\"a\":",
        )
        .unwrap();
        let mut rotation = Rotation::open(dir.path().to_path_buf(), 1 << 20, 2, plain()).unwrap();
        rotation.write(b"{\"a\":3}\n").unwrap();
        assert_eq!(content(dir.path()), "{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n");
        // A file with no complete line at all is emptied.
        std::fs::write(dir.path().join("events-1.ndjson"), "{\"a\":").unwrap();
        let mut rotation = Rotation::open(dir.path().to_path_buf(), 1 << 20, 2, plain()).unwrap();
        rotation.write(b"{\"a\":4}\n").unwrap();
        assert_eq!(content(dir.path()), "{\"a\":4}\n");
    }

    /// Waits (bounded) until `done`.
    async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn records_leave_the_buffer_only_once_their_lines_are_synced() {
        use bytes::Bytes;
        use fieldgate_core::{DeviceId, Event, EventKind, PayloadFormat};

        let plan = Arc::new(Plan::default());
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let buffer = Arc::new(
            SinkBuffer::open(
                "local",
                &BufferConfig::default(),
                &dir.path().join("data"),
                Arc::clone(&metrics),
            )
            .unwrap(),
        );
        let records: Vec<_> = (1..=3)
            .map(|n| {
                let event = Event::new(
                    DeviceId::new("dev-1"),
                    EventKind::Telemetry,
                    Arc::from("devices"),
                    1,
                    PayloadFormat::Json,
                    Bytes::from(format!("{{\"n\":{n}}}")),
                );
                let mut record = Vec::new();
                event.encode(&mut record);
                (event.priority, record)
            })
            .collect();
        assert_eq!(buffer.append(&records).0, 3);
        buffer.commit(true).unwrap();
        let events = metrics
            .buffer_events
            .get_or_create(&Metrics::sink("local"))
            .clone();
        // Every sync fails for now: the lines may reach the file, the records stay.
        plan.fail_syncs.store(usize::MAX, Ordering::SeqCst);
        let out = dir.path().join("out");
        let stop = CancellationToken::new();
        let settings = Settings {
            format: OutputFormat::Raw,
            max_file_size: 1 << 20,
            max_files: 2,
        };
        let sink = tokio::spawn(run_with(
            Arc::clone(&buffer),
            settings,
            out.clone(),
            Arc::clone(&metrics),
            stop.clone(),
            open_flaky(&plan),
        ));
        // Two attempts (a retry), each writing the lines and failing to sync them.
        wait_until("two failed syncs", || {
            plan.syncs.load(Ordering::SeqCst) >= 2
        })
        .await;
        assert_eq!(events.get(), 3, "nothing acked before an fsync succeeded");
        assert_eq!(content(&out), "", "failed batches are cut back");
        plan.fail_syncs.store(0, Ordering::SeqCst);
        wait_until("records acked once synced", || events.get() == 0).await;
        assert_eq!(content(&out), "{\"n\":1}\n{\"n\":2}\n{\"n\":3}\n");
        stop.cancel();
        sink.await.unwrap();
    }
}
