//! A sink's dead-letter store: events its upstream refused for good, kept on disk in
//! `<data_dir>/deadletter/<sink>/` until an operator replays or purges them.
//!
//! A record moves here before it leaves the sink's buffer (stored and fsynced first,
//! then acknowledged there), so a refused event is never lost, only parked. Each entry
//! is the buffer record unchanged behind a small header: why it was refused, the
//! broker's reason code, and when.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use bytes::{Buf, BufMut, Bytes};
use fieldgate_buffer::{BufferError, DiskQueue, DiskQueueOptions, RecordId};
use fieldgate_core::Event;
use serde::Serialize;

/// Bytes the dead letters of one sink may take on disk.
const MAX_BYTES: u64 = 256 * 1024 * 1024;
/// Header version of an entry.
const VERSION: u8 = 1;
/// Header length: version, reason, code, rejected-at milliseconds.
const HEADER_LEN: usize = 1 + 1 + 1 + 8;

/// Why an event was dead-lettered; also its `reason` label in
/// `fieldgate_dropped_events_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadReason {
    /// The upstream answered with a permanent failure reason code.
    Rejected,
    /// The message exceeds the upstream's maximum packet size.
    TooLarge,
}

impl DeadReason {
    /// The metric label and API value.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::Rejected => "rejected",
            DeadReason::TooLarge => "too_large",
        }
    }

    fn to_byte(self) -> u8 {
        match self {
            DeadReason::Rejected => 1,
            DeadReason::TooLarge => 2,
        }
    }

    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(DeadReason::Rejected),
            2 => Some(DeadReason::TooLarge),
            _ => None,
        }
    }
}

/// One event to park.
#[derive(Debug)]
pub struct NewDeadLetter<'a> {
    /// Why.
    pub reason: DeadReason,
    /// The upstream's reason code, if it gave one.
    pub code: Option<u8>,
    /// The event.
    pub event: &'a Event,
}

/// A parked event as the API lists it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterInfo {
    /// Position in the store.
    pub id: RecordId,
    /// Why it was refused.
    pub reason: DeadReason,
    /// The upstream's reason code (MQTT 5), if any.
    pub reason_code: Option<u8>,
    /// When it was refused (Unix milliseconds).
    pub rejected_at_ms: u64,
    /// The event's device.
    pub device: String,
    /// The event's kind.
    pub kind: &'static str,
    /// When the gateway received the event (Unix milliseconds).
    pub received_at_ms: u64,
    /// Payload bytes.
    pub size: usize,
}

/// A parked event with its buffer record, for a replay.
#[derive(Debug)]
pub struct DeadRecord {
    /// Position in the store.
    pub id: RecordId,
    /// The decoded event.
    pub event: Event,
}

/// The store could not be opened or used.
#[derive(Debug, thiserror::Error)]
#[error("dead-letter store of sink `{sink}` in {}", dir.display())]
pub struct DeadLetterError {
    sink: String,
    dir: PathBuf,
    #[source]
    source: BufferError,
}

/// The dead letters of one sink.
pub struct DeadLetters {
    sink: String,
    dir: PathBuf,
    queue: Mutex<DiskQueue>,
}

impl DeadLetters {
    /// Opens (and recovers) the store of `sink` under `data_dir/deadletter/<sink>/`.
    pub fn open(sink: &str, data_dir: &Path) -> Result<Self, DeadLetterError> {
        let dir = data_dir.join("deadletter").join(sink);
        let (queue, report) =
            DiskQueue::open(&dir, DiskQueueOptions::new(MAX_BYTES)).map_err(|source| {
                DeadLetterError {
                    sink: sink.to_owned(),
                    dir: dir.clone(),
                    source,
                }
            })?;
        if report.records > 0 {
            tracing::warn!(
                sink,
                records = report.records,
                "dead-lettered events are waiting: `fieldgate deadletter list {sink}`"
            );
        }
        Ok(Self {
            sink: sink.to_owned(),
            dir,
            queue: Mutex::new(queue),
        })
    }

    fn lock(&self) -> MutexGuard<'_, DiskQueue> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn error(&self, source: BufferError) -> DeadLetterError {
        DeadLetterError {
            sink: self.sink.clone(),
            dir: self.dir.clone(),
            source,
        }
    }

    /// Parks `letters` durably (fsynced before returning). Blocks on the disk.
    pub fn store(&self, letters: &[NewDeadLetter<'_>], now_ms: u64) -> Result<(), DeadLetterError> {
        let mut queue = self.lock();
        let mut record = Vec::new();
        for letter in letters {
            record.clear();
            record.put_u8(VERSION);
            record.put_u8(letter.reason.to_byte());
            record.put_u8(letter.code.unwrap_or(0));
            record.put_u64(now_ms);
            letter.event.encode(&mut record);
            queue.append(&record).map_err(|err| self.error(err))?;
        }
        queue.sync().map_err(|err| self.error(err))
    }

    /// Parked events, oldest first, at most `limit`.
    pub fn list(&self, limit: usize) -> Result<Vec<DeadLetterInfo>, DeadLetterError> {
        let mut infos = Vec::new();
        self.scan(limit, |id, header, event| {
            infos.push(DeadLetterInfo {
                id,
                reason: header.reason,
                reason_code: header.code,
                rejected_at_ms: header.rejected_at_ms,
                device: event.device.as_str().to_owned(),
                kind: event.kind.as_str(),
                received_at_ms: event.received_at_ms,
                size: event.payload.len(),
            });
        })?;
        Ok(infos)
    }

    /// Parked events with their records, oldest first, at most `limit`.
    pub fn records(&self, limit: usize) -> Result<Vec<DeadRecord>, DeadLetterError> {
        let mut records = Vec::new();
        self.scan(limit, |id, _, event| records.push(DeadRecord { id, event }))?;
        Ok(records)
    }

    fn scan(
        &self,
        limit: usize,
        mut visit: impl FnMut(RecordId, Header, Event),
    ) -> Result<(), DeadLetterError> {
        let mut queue = self.lock();
        queue.rewind();
        let mut seen = 0;
        while seen < limit {
            let Some((id, record)) = queue.read_next().map_err(|err| self.error(err))? else {
                break;
            };
            match decode(record) {
                Some((header, event)) => {
                    visit(id, header, event);
                    seen += 1;
                }
                None => {
                    tracing::error!(sink = %self.sink, id, "undecodable dead letter removed");
                    queue.ack(id).map_err(|err| self.error(err))?;
                }
            }
        }
        queue.rewind();
        Ok(())
    }

    /// Removes entries (after a replay or on purge), durably.
    pub fn remove(&self, ids: &[RecordId]) -> Result<(), DeadLetterError> {
        let mut queue = self.lock();
        for &id in ids {
            queue.ack(id).map_err(|err| self.error(err))?;
        }
        queue.sync().map_err(|err| self.error(err))
    }

    /// Entries parked.
    pub fn count(&self) -> u64 {
        self.lock().len()
    }
}

#[derive(Debug, Clone, Copy)]
struct Header {
    reason: DeadReason,
    code: Option<u8>,
    rejected_at_ms: u64,
}

fn decode(mut record: Bytes) -> Option<(Header, Event)> {
    if record.len() < HEADER_LEN || record[0] != VERSION {
        return None;
    }
    record.advance(1);
    let reason = DeadReason::from_byte(record.get_u8())?;
    let code = Some(record.get_u8()).filter(|code| *code != 0);
    let rejected_at_ms = record.get_u64();
    let event = Event::decode(record).ok()?;
    Some((
        Header {
            reason,
            code,
            rejected_at_ms,
        },
        event,
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use fieldgate_core::{DeviceId, EventKind, PayloadFormat};

    use super::*;

    fn event(device: &str, payload: &'static [u8]) -> Event {
        Event::new(
            DeviceId::new(device),
            EventKind::Telemetry,
            Arc::from("devices"),
            1_000,
            PayloadFormat::Json,
            Bytes::from_static(payload),
        )
    }

    #[test]
    fn parked_events_survive_a_reopen_and_leave_only_when_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let letters = DeadLetters::open("cloud", dir.path()).expect("opens");
        let a = event("dev-a", b"{\"a\":1}");
        let b = event("dev-b", b"{\"b\":2}");
        letters
            .store(
                &[
                    NewDeadLetter {
                        reason: DeadReason::Rejected,
                        code: Some(0x87),
                        event: &a,
                    },
                    NewDeadLetter {
                        reason: DeadReason::TooLarge,
                        code: None,
                        event: &b,
                    },
                ],
                5_000,
            )
            .expect("stored");
        drop(letters);
        let letters = DeadLetters::open("cloud", dir.path()).expect("reopens");
        let listed = letters.list(10).expect("lists");
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].device, "dev-a");
        assert_eq!(listed[0].reason, DeadReason::Rejected);
        assert_eq!(listed[0].reason_code, Some(0x87));
        assert_eq!(listed[1].reason, DeadReason::TooLarge);
        assert_eq!(listed[1].reason_code, None);
        assert_eq!(listed[1].rejected_at_ms, 5_000);
        // Listing twice shows the same entries (listing does not consume).
        assert_eq!(letters.list(10).expect("lists").len(), 2);
        let records = letters.records(1).expect("records");
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].event.payload, a.payload);
        letters.remove(&[records[0].id]).expect("removed");
        drop(letters);
        let letters = DeadLetters::open("cloud", dir.path()).expect("reopens");
        let listed = letters.list(10).expect("lists");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].device, "dev-b");
    }
}
