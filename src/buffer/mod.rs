//! Each sink's store-and-forward buffer: two lanes (high, normal) of durable records.
//!
//! The buffer writer (see [`writer`]) appends what the pipeline delivers; the sink reads
//! records in order, high lane first, and acknowledges each one once its upstream did.
//! A record leaves the disk only after that acknowledgement.

pub mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use fieldgate_buffer::{BufferError, DiskQueue, DiskQueueOptions, MemoryQueue, Queue, RecordId};
use fieldgate_core::{Event, Priority};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use thiserror::Error;
use tokio::sync::Notify;

use crate::config::{BufferConfig, BufferKind};
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
}

impl Lanes {
    fn lane(&mut self, priority: Priority) -> &mut Queue {
        match priority {
            Priority::High => &mut self.high,
            Priority::Normal => &mut self.normal,
        }
    }

    fn bytes(&self) -> u64 {
        self.high.bytes() + self.normal.bytes()
    }
}

/// Why an append did not store the record.
#[derive(Debug)]
pub enum AppendError {
    /// The buffer holds `max_size` already.
    Full,
    /// The disk refused; the event cannot be stored.
    Storage(BufferError),
}

/// A sink's buffer, shared by its writer and its sink.
pub struct SinkBuffer {
    sink: String,
    max_bytes: u64,
    lanes: Mutex<Lanes>,
    readable: Notify,
    space: Notify,
    events_gauge: Gauge,
    bytes_gauge: Gauge,
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
                        ..DiskQueueOptions::default()
                    };
                    let (queue, report) =
                        DiskQueue::open(&dir, options).map_err(|source| OpenError {
                            sink: sink.to_owned(),
                            dir: dir.clone(),
                            source,
                        })?;
                    if report.truncated_bytes > 0 || !report.quarantined.is_empty() {
                        tracing::warn!(
                            sink,
                            lane = priority.as_str(),
                            truncated_bytes = report.truncated_bytes,
                            quarantined = ?report.quarantined,
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
        let lanes = Lanes {
            high: open_lane(Priority::High)?,
            normal: open_lane(Priority::Normal)?,
        };
        let buffer = Self {
            sink: sink.to_owned(),
            max_bytes: config.max_size.0,
            lanes: Mutex::new(lanes),
            readable: Notify::new(),
            space: Notify::new(),
            events_gauge: metrics.buffer_events.get_or_create(&label).clone(),
            bytes_gauge: metrics.buffer_bytes.get_or_create(&label).clone(),
            corrupt_bytes,
            metrics: std::sync::Arc::clone(&metrics),
        };
        buffer.update_gauges(&buffer.lock());
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

    fn update_gauges(&self, lanes: &Lanes) {
        let events = lanes.high.len() + lanes.normal.len();
        self.events_gauge
            .set(i64::try_from(events).unwrap_or(i64::MAX));
        self.bytes_gauge
            .set(i64::try_from(lanes.bytes()).unwrap_or(i64::MAX));
    }

    /// Appends encoded records to their lanes. Stops at the first record that does not
    /// fit or fails, returning how many were stored and why it stopped.
    pub fn append(&self, records: &[(Priority, Vec<u8>)]) -> (usize, Option<AppendError>) {
        let mut lanes = self.lock();
        let mut stored = 0;
        let mut error = None;
        for (priority, record) in records {
            // Record header overhead is small; count the payload against max_size.
            if lanes.bytes() + record.len() as u64 > self.max_bytes {
                error = Some(AppendError::Full);
                break;
            }
            match lanes.lane(*priority).append(record) {
                Ok(_) => stored += 1,
                Err(BufferError::Full { .. }) => {
                    error = Some(AppendError::Full);
                    break;
                }
                Err(err) => {
                    error = Some(AppendError::Storage(err));
                    break;
                }
            }
        }
        self.update_gauges(&lanes);
        (stored, error)
    }

    /// Makes appended records visible to the sink and safe from a process crash;
    /// with `durable`, also from power loss.
    pub fn commit(&self, durable: bool) -> Result<(), BufferError> {
        let write = || -> Result<(), BufferError> {
            let mut lanes = self.lock();
            for priority in Priority::ALL {
                let lane = lanes.lane(priority);
                if durable { lane.sync()? } else { lane.flush()? }
            }
            Ok(())
        };
        if durable {
            // fdatasync can take milliseconds (hundreds on a busy disk): tell the runtime,
            // so connections and sinks on this worker move to another thread meanwhile.
            blocking(write)?;
        } else {
            write()?;
        }
        self.readable.notify_waiters();
        Ok(())
    }

    /// Evicts the oldest normal-lane segment (high lane only when normal is empty);
    /// returns how many records were evicted.
    pub fn evict_oldest(&self) -> Result<u64, BufferError> {
        let mut lanes = self.lock();
        let mut evicted = lanes.normal.evict_oldest()?.records;
        if evicted == 0 {
            evicted = lanes.high.evict_oldest()?.records;
        }
        self.update_gauges(&lanes);
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
                let lane = lanes.lane(priority);
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
        self.update_gauges(&lanes);
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

/// Runs `work` that blocks on the disk, letting a multi-thread runtime hand this
/// worker's other tasks to another thread first. On other runtimes it just runs it.
fn blocking<R>(work: impl FnOnce() -> R) -> R {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|handle| handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi_thread {
        tokio::task::block_in_place(work)
    } else {
        work()
    }
}
