//! Each sink's store-and-forward buffer: two lanes (high, normal) of durable records.
//!
//! The buffer writer (see [`writer`]) appends what the pipeline delivers; the sink reads
//! records in order, high lane first, and acknowledges each one once its upstream did.
//! A record leaves the disk only after that acknowledgement.

mod age;
mod config;
mod recent;
pub mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use fieldgate_buffer::{
    BufferError, DEFAULT_MAX_RECORD_BYTES, DiskQueue, DiskQueueOptions, EMPTY_QUEUE_BYTES,
    MemoryQueue, Queue, RECORD_FRAMING_BYTES, RecordId,
};
use fieldgate_core::{Event, Priority};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use thiserror::Error;
use tokio::sync::Notify;

pub use self::config::{BufferConfig, BufferKind, FsyncPolicy, WhenFull};
use crate::telemetry::Metrics;

/// A buffer could not be opened.
#[derive(Debug, Error)]
#[error("cannot open the buffer of sink `{sink}` in {}", dir.display())]
pub struct OpenError {
    sink: String,
    dir: PathBuf,
    #[source]
    source: BufferError,
}

/// One record handed to a sink.
#[derive(Debug)]
pub struct Delivery {
    /// Lane it came from, needed to acknowledge it.
    pub lane: Priority,
    /// Its id in that lane.
    pub id: RecordId,
    /// The decoded event.
    pub event: Event,
}

struct Lanes {
    high: Queue,
    normal: Queue,
    /// In-memory copies of the latest appends, per lane (high, normal).
    recent: [recent::RecentEvents; 2],
    oldest: age::OldestRecord,
}

impl Lanes {
    fn lane(&mut self, priority: Priority) -> &mut Queue {
        match priority {
            Priority::High => &mut self.high,
            Priority::Normal => &mut self.normal,
        }
    }

    /// A lane with its in-memory copies.
    fn lane_and_recent(&mut self, priority: Priority) -> (&mut Queue, &mut recent::RecentEvents) {
        match priority {
            Priority::High => (&mut self.high, &mut self.recent[0]),
            Priority::Normal => (&mut self.normal, &mut self.recent[1]),
        }
    }

    fn bytes(&self) -> u64 {
        self.high.bytes() + self.normal.bytes()
    }
}

/// Longest record a disk lane accepts: the largest frame a source takes (16 MiB, the cap on
/// `sources.*.max_frame`) plus room for the event record's header.
const MAX_RECORD_BYTES: u32 = DEFAULT_MAX_RECORD_BYTES + 64 * 1024;

/// The longest event record (see `Event::encoded_len`) a buffer configured as `config`
/// can ever hold: what fits when both lanes are empty. `fieldgate check` compares every
/// source's largest record with this; at run time a longer one is refused as too large.
pub fn largest_record(config: &BufferConfig) -> u64 {
    match config.kind {
        BufferKind::Memory => config.max_size.0,
        // Both lanes' segment headers count against max_size, plus the record's framing.
        BufferKind::Disk => config
            .max_size
            .0
            .saturating_sub(2 * EMPTY_QUEUE_BYTES + RECORD_FRAMING_BYTES)
            .min(u64::from(MAX_RECORD_BYTES)),
    }
}

/// Why an append did not store the record.
#[derive(Debug)]
pub enum AppendError {
    /// The buffer holds too much to take the record now; acks will make room.
    Full,
    /// The record is longer than the buffer can ever hold, even empty: waiting is useless.
    TooLarge {
        /// The record's length.
        len: u64,
        /// The longest record the buffer takes ([`largest_record`]).
        max: u64,
    },
    /// The disk refused; the event cannot be stored.
    Storage(BufferError),
}

/// A sink's buffer, shared by its writer and its sink.
pub struct SinkBuffer {
    sink: String,
    max_bytes: u64,
    /// Longest record that fits in the empty buffer.
    largest_record: u64,
    /// Framing bytes each record costs in a lane (0 in memory).
    framing: u64,
    lanes: Mutex<Lanes>,
    /// Serialises durable commits (see [`SinkBuffer::commit`]); never taken under `lanes`.
    syncing: Mutex<()>,
    /// Runs once between taking a sync's jobs and running them (tests only).
    #[cfg(test)]
    before_sync: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    readable: Notify,
    space: Notify,
    events_gauge: Gauge,
    bytes_gauge: Gauge,
    oldest_gauge: Gauge,
    corrupt_bytes: Counter,
    metrics: std::sync::Arc<Metrics>,
}

impl SinkBuffer {
    /// Opens (and recovers) the buffer of `sink` under `data_dir/buffers/<sink>/`.
    pub fn open(
        sink: &str,
        config: &BufferConfig,
        data_dir: &Path,
        metrics: std::sync::Arc<Metrics>,
    ) -> Result<Self, OpenError> {
        let label = Metrics::sink(sink);
        let corrupt_bytes = metrics.buffer_corrupt_bytes.get_or_create(&label).clone();
        let open_lane = |priority: Priority| -> Result<Queue, OpenError> {
            match config.kind {
                BufferKind::Memory => Ok(Queue::Memory(MemoryQueue::new(config.max_size.0))),
                BufferKind::Disk => {
                    let dir = data_dir.join("buffers").join(sink).join(priority.as_str());
                    let options = DiskQueueOptions {
                        max_bytes: config.max_size.0,
                        max_record_bytes: MAX_RECORD_BYTES,
                        ..DiskQueueOptions::default()
                    };
                    let (queue, report) =
                        DiskQueue::open(&dir, options).map_err(|source| OpenError {
                            sink: sink.to_owned(),
                            dir: dir.clone(),
                            source,
                        })?;
                    if report.truncated_bytes > 0 || !report.quarantined.is_empty() {
                        let quarantined: Vec<String> = report
                            .quarantined
                            .iter()
                            .map(|path| path.display().to_string())
                            .collect();
                        tracing::warn!(
                            sink,
                            lane = priority.as_str(),
                            truncated_bytes = report.truncated_bytes,
                            quarantined = %quarantined.join(", "),
                            "buffer recovered from a torn or corrupt segment; bad bytes were moved aside"
                        );
                        corrupt_bytes.inc_by(report.truncated_bytes);
                    }
                    if report.records > 0 {
                        tracing::info!(
                            sink,
                            lane = priority.as_str(),
                            records = report.records,
                            "buffer reopened with a backlog"
                        );
                    }
                    Ok(Queue::Disk(queue))
                }
            }
        };
        let high = open_lane(Priority::High)?;
        let normal = open_lane(Priority::Normal)?;
        let oldest = age::OldestRecord::new(high.len() + normal.len(), unix_now());
        let lanes = Lanes {
            high,
            normal,
            recent: Default::default(),
            oldest,
        };
        let buffer = Self {
            sink: sink.to_owned(),
            max_bytes: config.max_size.0,
            largest_record: largest_record(config),
            framing: match config.kind {
                BufferKind::Disk => RECORD_FRAMING_BYTES,
                BufferKind::Memory => 0,
            },
            lanes: Mutex::new(lanes),
            syncing: Mutex::new(()),
            #[cfg(test)]
            before_sync: Mutex::new(None),
            readable: Notify::new(),
            space: Notify::new(),
            events_gauge: metrics.buffer_events.get_or_create(&label).clone(),
            bytes_gauge: metrics.buffer_bytes.get_or_create(&label).clone(),
            oldest_gauge: metrics.buffer_oldest_event.get_or_create(&label).clone(),
            corrupt_bytes,
            metrics: std::sync::Arc::clone(&metrics),
        };
        buffer.update_gauges(&mut buffer.lock());
        Ok(buffer)
    }

    /// The sink's name.
    pub fn sink(&self) -> &str {
        &self.sink
    }

    fn lock(&self) -> MutexGuard<'_, Lanes> {
        // A panic while holding the lock cannot leave the queues half-updated in a way we
        // could repair here; keep serving rather than poison every later call.
        self.lanes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn update_gauges(&self, lanes: &mut Lanes) {
        let events = lanes.high.len() + lanes.normal.len();
        self.events_gauge
            .set(i64::try_from(events).unwrap_or(i64::MAX));
        self.bytes_gauge
            .set(i64::try_from(lanes.bytes()).unwrap_or(i64::MAX));
        let oldest = lanes.oldest.oldest(events).unwrap_or(0);
        self.oldest_gauge
            .set(i64::try_from(oldest).unwrap_or(i64::MAX));
    }

    /// Appends encoded records to their lanes. Stops at the first record that does not
    /// fit or fails, returning how many were stored and why it stopped.
    ///
    /// A record over [`largest_record`] fails with
    /// [`AppendError::TooLarge`], never [`AppendError::Full`]: `Full` always means that
    /// acknowledgements will eventually make room for it.
    pub fn append<R: AsRef<[u8]>>(
        &self,
        records: &[(Priority, R)],
    ) -> (usize, Option<AppendError>) {
        self.append_with(records.len(), |index| {
            let (priority, record) = &records[index];
            (*priority, record.as_ref(), None)
        })
    }

    /// Appends `count` records like [`append`](Self::append), taking record `i` from
    /// `record(i)`: its lane, its encoding and, when given, the event it encodes, which is
    /// then kept in memory (bounded) so that the sink takes it without reading it back
    /// from disk and decoding it. A closure rather than a slice, so that the writer
    /// hands over its encoded batch without building a list per batch.
    pub fn append_with<'a>(
        &self,
        count: usize,
        record: impl Fn(usize) -> (Priority, &'a [u8], Option<&'a Event>),
    ) -> (usize, Option<AppendError>) {
        let mut lanes = self.lock();
        let mut stored = 0;
        let mut error = None;
        for index in 0..count {
            let (priority, record, event) = record(index);
            let len = record.len() as u64;
            if len > self.largest_record {
                error = Some(AppendError::TooLarge {
                    len,
                    max: self.largest_record,
                });
                break;
            }
            if lanes.bytes() + len + self.framing > self.max_bytes {
                // Acked records may still sit in the lanes' active segments: free them
                // before calling the buffer full, or a record that fits an empty buffer
                // could wait forever for acks that already came.
                for priority in Priority::ALL {
                    if let Err(err) = lanes.lane(priority).reclaim_acked() {
                        tracing::warn!(sink = %self.sink, lane = priority.as_str(), error = %err, "cannot reclaim acked buffer space");
                    }
                }
                if lanes.bytes() + len + self.framing > self.max_bytes {
                    error = Some(AppendError::Full);
                    break;
                }
            }
            let (lane, recent) = lanes.lane_and_recent(priority);
            match lane.append(record) {
                Ok(id) => {
                    stored += 1;
                    if let Some(event) = event {
                        recent.keep(id, event);
                    }
                }
                Err(BufferError::Full { .. }) => {
                    error = Some(AppendError::Full);
                    break;
                }
                Err(BufferError::RecordTooLarge { len, max, .. }) => {
                    error = Some(AppendError::TooLarge {
                        len,
                        max: u64::from(max),
                    });
                    break;
                }
                Err(err) => {
                    error = Some(AppendError::Storage(err));
                    break;
                }
            }
        }
        lanes.oldest.appended(stored as u64, unix_now());
        self.update_gauges(&mut lanes);
        (stored, error)
    }

    /// Makes appended records visible to the sink and safe from a process crash;
    /// with `durable`, also from power loss.
    ///
    /// The fdatasyncs run outside the lanes' lock (appends, reads and acks go on meanwhile),
    /// one durable commit at a time: when `commit(true)` returns `Ok`, every record
    /// appended before the call is on disk, so its device may be acked.
    pub fn commit(&self, durable: bool) -> Result<(), BufferError> {
        if !durable {
            let mut lanes = self.lock();
            for priority in Priority::ALL {
                lanes.lane(priority).flush()?;
            }
            drop(lanes);
            self.readable.notify_waiters();
            return Ok(());
        }
        // Held across the whole sync, so syncs finish in the order they began: a later
        // one never overwrites a newer ack position with an older one, and a commit that
        // finds nothing left to sync knows the earlier one it waited for succeeded.
        let _syncing = self
            .syncing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let jobs = {
            let mut lanes = self.lock();
            let high = lanes.high.begin_sync()?;
            match lanes.normal.begin_sync() {
                Ok(normal) => [high, normal],
                Err(err) => {
                    lanes.high.sync_failed(high);
                    return Err(err);
                }
            }
        };
        // Flushed: the sink may read the new records while the disk catches up.
        self.readable.notify_waiters();
        #[cfg(test)]
        if let Some(hook) = self
            .before_sync
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            hook();
        }
        // fdatasync can take milliseconds (hundreds on a busy disk): tell the runtime,
        // so connections and sinks on this worker move to another thread meanwhile.
        let result = blocking(|| {
            for (index, job) in jobs.iter().enumerate() {
                job.run().map_err(|err| (index, err))?;
            }
            Ok(())
        });
        if let Err((failed, err)) = result {
            // The lanes from the failed one on are not durable: the next sync retries them.
            let mut lanes = self.lock();
            for (index, (priority, job)) in Priority::ALL.into_iter().zip(jobs).enumerate() {
                if index >= failed {
                    lanes.lane(priority).sync_failed(job);
                }
            }
            return Err(err);
        }
        Ok(())
    }

    /// Tells the sink that records were appended, before they are flushed: it may take them
    /// from memory (see [`recent`]), or read them from the queue, which flushes first.
    pub fn announce(&self) {
        self.readable.notify_waiters();
    }

    /// Evicts the oldest normal-lane segment (high lane only when normal is empty);
    /// returns how many records were evicted.
    pub fn evict_oldest(&self) -> Result<u64, BufferError> {
        let mut lanes = self.lock();
        let mut evicted = lanes.normal.evict_oldest()?.records;
        if evicted == 0 {
            evicted = lanes.high.evict_oldest()?.records;
        }
        self.update_gauges(&mut lanes);
        Ok(evicted)
    }

    /// Waits until an ack may have freed space.
    pub async fn space_freed(&self) {
        self.space.notified().await;
    }

    /// The next unread record, high lane first, without waiting.
    pub fn try_next(&self) -> Option<Delivery> {
        let mut lanes = self.lock();
        for priority in Priority::ALL {
            loop {
                let (lane, recent) = lanes.lane_and_recent(priority);
                if let Some((id, event)) = recent.take_next(lane) {
                    return Some(Delivery {
                        lane: priority,
                        id,
                        event,
                    });
                }
                match lane.read_next() {
                    Ok(Some((id, record))) => match Event::decode(record) {
                        Ok(event) => {
                            return Some(Delivery {
                                lane: priority,
                                id,
                                event,
                            });
                        }
                        Err(err) => {
                            tracing::error!(sink = %self.sink, lane = priority.as_str(), id, error = %err, "undecodable buffer record skipped");
                            self.metrics.dropped(&self.sink, "corrupt", 1);
                            if let Err(err) = lane.ack(id) {
                                tracing::error!(sink = %self.sink, error = %err, "cannot acknowledge a skipped record");
                            }
                        }
                    },
                    Ok(None) => break,
                    Err(err) => {
                        tracing::error!(sink = %self.sink, lane = priority.as_str(), error = %err, "buffer read failed");
                        break;
                    }
                }
            }
            let skipped = lanes.lane(priority).take_corrupt_skipped();
            if skipped > 0 {
                self.metrics.dropped(&self.sink, "corrupt", skipped);
                self.corrupt_bytes.inc();
            }
        }
        None
    }

    /// The next unread record, waiting for one.
    pub async fn next(&self) -> Delivery {
        loop {
            let notified = self.readable.notified();
            if let Some(delivery) = self.try_next() {
                return delivery;
            }
            notified.await;
        }
    }

    /// Waits for one record, then takes up to `max` in all without waiting further.
    pub async fn next_batch(&self, max: usize) -> Vec<Delivery> {
        let mut batch = vec![self.next().await];
        while batch.len() < max {
            match self.try_next() {
                Some(delivery) => batch.push(delivery),
                None => break,
            }
        }
        batch
    }

    /// The upstream acknowledged these records: they may leave the buffer.
    pub fn ack(&self, records: impl IntoIterator<Item = (Priority, RecordId)>) {
        let mut lanes = self.lock();
        for (priority, id) in records {
            if let Err(err) = lanes.lane(priority).ack(id) {
                tracing::error!(sink = %self.sink, lane = priority.as_str(), id, error = %err, "buffer acknowledgement failed");
            }
        }
        self.update_gauges(&mut lanes);
        drop(lanes);
        self.space.notify_waiters();
    }

    /// Reads unacknowledged records again from the oldest (after an upstream reconnect).
    pub fn rewind(&self) {
        let mut lanes = self.lock();
        lanes.high.rewind();
        lanes.normal.rewind();
        drop(lanes);
        self.readable.notify_waiters();
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// Runs `work` that blocks on the disk, letting a multi-thread runtime hand this
/// worker's other tasks to another thread first. On other runtimes it just runs it.
pub(crate) fn blocking<R>(work: impl FnOnce() -> R) -> R {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|handle| handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi_thread {
        tokio::task::block_in_place(work)
    } else {
        work()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use fieldgate_core::{DeviceId, Event, EventKind, PayloadFormat, Priority};

    use super::*;
    use crate::buffer::{BufferConfig, BufferKind};
    use crate::telemetry::Metrics;

    /// An encoded event record of kind `kind` whose payload is `len` bytes of `fill`.
    pub(crate) fn record(kind: EventKind, len: usize, fill: u8) -> (Priority, Vec<u8>) {
        let event = Event::new(
            DeviceId::new("dev-1"),
            kind,
            Arc::from("devices"),
            1_764_143_349_123,
            PayloadFormat::Binary,
            Bytes::from(vec![fill; len]),
        );
        let mut out = Vec::with_capacity(event.encoded_len());
        event.encode(&mut out);
        (event.priority, out)
    }

    fn config(kind: BufferKind, max_size: u64) -> BufferConfig {
        let mut config = BufferConfig {
            kind,
            ..BufferConfig::default()
        };
        config.max_size.0 = max_size;
        config
    }

    fn open(dir: &Path, kind: BufferKind, max_size: u64) -> (SinkBuffer, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let buffer = SinkBuffer::open("cloud", &config(kind, max_size), dir, Arc::clone(&metrics))
            .expect("open buffer");
        (buffer, metrics)
    }

    fn gauges(metrics: &Metrics) -> (i64, i64) {
        let label = Metrics::sink("cloud");
        (
            metrics.buffer_events.get_or_create(&label).get(),
            metrics.buffer_bytes.get_or_create(&label).get(),
        )
    }

    fn payload_fill(delivery: &Delivery) -> u8 {
        delivery.event.payload[0]
    }

    #[test]
    fn reads_high_lane_first_and_each_lane_in_order() {
        for kind in [BufferKind::Disk, BufferKind::Memory] {
            let dir = tempfile::tempdir().unwrap();
            let (buffer, _metrics) = open(dir.path(), kind, 1 << 20);
            let records = [
                record(EventKind::Telemetry, 10, 1),
                record(EventKind::Alarm, 10, 2),
                record(EventKind::Telemetry, 10, 3),
                record(EventKind::Status, 10, 4),
            ];
            let (stored, error) = buffer.append(&records);
            assert_eq!(stored, 4);
            assert!(error.is_none(), "{error:?}");
            buffer.commit(false).unwrap();
            let read: Vec<(Priority, u8)> = std::iter::from_fn(|| buffer.try_next())
                .map(|delivery| (delivery.lane, payload_fill(&delivery)))
                .collect();
            assert_eq!(
                read,
                [
                    (Priority::High, 2),
                    (Priority::High, 4),
                    (Priority::Normal, 1),
                    (Priority::Normal, 3)
                ],
                "{kind:?}"
            );
        }
    }

    #[test]
    fn ack_removes_and_rewind_rereads_the_rest() {
        for kind in [BufferKind::Disk, BufferKind::Memory] {
            let dir = tempfile::tempdir().unwrap();
            let (buffer, metrics) = open(dir.path(), kind, 1 << 20);
            let records: Vec<_> = (1..=3)
                .map(|fill| record(EventKind::Telemetry, 100, fill))
                .collect();
            assert_eq!(buffer.append(&records).0, 3);
            buffer.commit(true).unwrap();
            let (events, bytes) = gauges(&metrics);
            assert_eq!(events, 3, "{kind:?}");
            assert!(bytes >= 300, "{kind:?}: {bytes}");

            let first = buffer.try_next().unwrap();
            let second = buffer.try_next().unwrap();
            assert_eq!((payload_fill(&first), payload_fill(&second)), (1, 2));
            buffer.ack([(second.lane, second.id)]);
            assert_eq!(gauges(&metrics).0, 2, "{kind:?}");

            // The unacked first record and the unread third come again; the acked one not.
            buffer.rewind();
            let again: Vec<u8> = std::iter::from_fn(|| buffer.try_next())
                .map(|delivery| payload_fill(&delivery))
                .collect();
            assert_eq!(again, [1, 3], "{kind:?}");
            buffer.rewind();
            let all: Vec<(Priority, RecordId)> = std::iter::from_fn(|| buffer.try_next())
                .map(|delivery| (delivery.lane, delivery.id))
                .collect();
            buffer.ack(all);
            assert_eq!(gauges(&metrics).0, 0, "{kind:?}");
            assert!(buffer.try_next().is_none());
        }
    }

    #[test]
    fn full_until_acks_make_room() {
        for kind in [BufferKind::Disk, BufferKind::Memory] {
            let dir = tempfile::tempdir().unwrap();
            // Room for three 4 KiB records, not four.
            let (buffer, _metrics) = open(dir.path(), kind, 14 * 1024);
            let records: Vec<_> = (1..=4)
                .map(|fill| record(EventKind::Telemetry, 4096, fill))
                .collect();
            let (stored, error) = buffer.append(&records);
            assert_eq!(stored, 3, "{kind:?}");
            assert!(
                matches!(error, Some(AppendError::Full)),
                "{kind:?}: {error:?}"
            );
            buffer.commit(false).unwrap();
            let first = buffer.try_next().unwrap();
            buffer.ack([(first.lane, first.id)]);
            let (stored, error) = buffer.append(&records[3..]);
            assert_eq!(stored, 1, "{kind:?}: {error:?}");
        }
    }

    #[test]
    fn a_record_larger_than_the_empty_buffer_is_too_large_not_full() {
        for kind in [BufferKind::Disk, BufferKind::Memory] {
            let dir = tempfile::tempdir().unwrap();
            let (buffer, _metrics) = open(dir.path(), kind, 64 * 1024);
            let largest = largest_record(&config(kind, 64 * 1024));
            let largest_len = usize::try_from(largest).expect("64 KiB fits a usize");
            let header = record(EventKind::Telemetry, 0, 0).1.len();
            let too_large = record(EventKind::Telemetry, largest_len - header + 1, 7);
            match buffer.append(std::slice::from_ref(&too_large)) {
                (0, Some(AppendError::TooLarge { len, max })) => {
                    assert_eq!((len, max), (largest + 1, largest), "{kind:?}");
                }
                other => panic!("{kind:?}: expected TooLarge, got {other:?}"),
            }
            // The largest record does fit the empty buffer.
            let fits = record(EventKind::Telemetry, largest_len - header, 7);
            let (stored, error) = buffer.append(&[fits]);
            assert_eq!(stored, 1, "{kind:?}: {error:?}");
        }
    }

    #[test]
    fn acked_records_in_the_active_segment_do_not_keep_the_buffer_full() {
        let dir = tempfile::tempdir().unwrap();
        // 64 KiB buffer: 16 KiB segments. Three acked 5 KB records stay in the active
        // segment (they do not fill it, so it never rolls over and is never deleted).
        let (buffer, metrics) = open(dir.path(), BufferKind::Disk, 64 * 1024);
        let small: Vec<_> = (1..=3)
            .map(|fill| record(EventKind::Telemetry, 5000, fill))
            .collect();
        assert_eq!(buffer.append(&small).0, 3);
        buffer.commit(false).unwrap();
        let read: Vec<(Priority, RecordId)> = std::iter::from_fn(|| buffer.try_next())
            .map(|delivery| (delivery.lane, delivery.id))
            .collect();
        buffer.ack(read);
        assert_eq!(gauges(&metrics).0, 0);
        // Fits the empty buffer, not beside the acked bytes: they must be reclaimed, or
        // `block` would wait for acks that already came.
        let big = record(EventKind::Telemetry, 60_000, 9);
        let (stored, error) = buffer.append(&[big]);
        assert_eq!(stored, 1, "{error:?}");
        buffer.commit(false).unwrap();
        assert_eq!(buffer.try_next().map(|d| payload_fill(&d)), Some(9));
    }

    #[test]
    fn appends_reads_and_acks_do_not_wait_for_a_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (buffer, _metrics) = open(dir.path(), BufferKind::Disk, 1 << 20);
        let buffer = Arc::new(buffer);
        assert_eq!(buffer.append(&[record(EventKind::Telemetry, 100, 1)]).0, 1);
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        // Stands for a slow fdatasync: the sync stays in progress until the test says go.
        *buffer.before_sync.lock().unwrap() = Some(Box::new(move || {
            started_tx.send(()).unwrap();
            let _released = go_rx.recv_timeout(std::time::Duration::from_secs(60));
        }));
        let syncing = {
            let buffer = Arc::clone(&buffer);
            std::thread::spawn(move || buffer.commit(true))
        };
        started_rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the sync starts");
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let worker = {
            let buffer = Arc::clone(&buffer);
            std::thread::spawn(move || {
                let delivery = buffer.try_next().expect("the committed record");
                buffer.ack([(delivery.lane, delivery.id)]);
                let (stored, _) = buffer.append(&[record(EventKind::Alarm, 100, 2)]);
                done_tx.send(stored).unwrap();
            })
        };
        let stored = done_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("read, ack and append finish while the sync is in progress");
        assert_eq!(stored, 1);
        go_tx.send(()).unwrap();
        syncing.join().unwrap().unwrap();
        worker.join().unwrap();
        // The next sync persists what happened meanwhile.
        buffer.commit(true).unwrap();
    }

    #[tokio::test]
    async fn next_waits_for_a_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (buffer, _metrics) = open(dir.path(), BufferKind::Disk, 1 << 20);
        let buffer = Arc::new(buffer);
        let reader = {
            let buffer = Arc::clone(&buffer);
            tokio::spawn(async move { payload_fill(&buffer.next().await) })
        };
        tokio::task::yield_now().await;
        assert!(!reader.is_finished());
        assert_eq!(buffer.append(&[record(EventKind::Alarm, 8, 5)]).0, 1);
        buffer.commit(false).unwrap();
        let fill = tokio::time::timeout(std::time::Duration::from_secs(10), reader)
            .await
            .expect("next() resolves after the commit")
            .unwrap();
        assert_eq!(fill, 5);
    }

    #[test]
    fn reopened_disk_buffer_keeps_unacked_records() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (buffer, _metrics) = open(dir.path(), BufferKind::Disk, 1 << 20);
            let records: Vec<_> = (1..=3)
                .map(|fill| record(EventKind::Telemetry, 50, fill))
                .collect();
            assert_eq!(buffer.append(&records).0, 3);
            buffer.commit(true).unwrap();
            let first = buffer.try_next().unwrap();
            buffer.ack([(first.lane, first.id)]);
            buffer.commit(true).unwrap();
        }
        let (buffer, metrics) = open(dir.path(), BufferKind::Disk, 1 << 20);
        assert_eq!(gauges(&metrics).0, 2);
        let left: Vec<u8> = std::iter::from_fn(|| buffer.try_next())
            .map(|delivery| payload_fill(&delivery))
            .collect();
        assert_eq!(left, [2, 3]);
    }
}
