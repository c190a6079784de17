//! The binary form of an [`Event`] inside a buffer record.
//!
//! Layout (all integers little-endian), versioned by its first byte so older
//! buffers stay readable after an upgrade:
//!
//! ```text
//! u8  version (2; 1 = the same without the id)
//! [u8; 12] event id (version 2 only)
//! u8  kind code
//! u8  priority (0 high, 1 normal)
//! u8  format (0 json, 1 binary)
//! u64 received_at_ms
//! u8  has_device_time, then u64 device_time_ms if 1
//! u16 device id length, device id bytes (UTF-8)
//! u16 source length, source bytes (UTF-8)
//! rest: payload
//! ```

use std::sync::Arc;

use bytes::{BufMut, Bytes};
use thiserror::Error;

use crate::{DeviceId, Event, EventId, EventKind, PayloadFormat, Priority};

/// The format written.
const VERSION: u8 = 2;
/// The format before events had ids; still read (the id is then derived from the record).
const VERSION_WITHOUT_ID: u8 = 1;
/// Bytes of the id in a version 2 record.
const ID_LEN: usize = 12;

/// Why a buffer record could not be read back as an event.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The record ends before a field it announces.
    #[error("event record truncated at byte {0}")]
    Truncated(usize),
    /// The record was written by a newer or unknown format.
    #[error("unknown event record version {0}")]
    Version(u8),
    /// A field holds a value no writer produces.
    #[error("invalid {field} in event record")]
    Invalid {
        /// The field that could not be read.
        field: &'static str,
    },
}

impl Event {
    /// Appends this event's record form to `out`.
    ///
    /// Ids and source names longer than 65,535 bytes are cut; sources enforce far
    /// smaller limits, so this never happens to a real event.
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u8(VERSION);
        out.put_slice(&self.id.to_bytes());
        out.put_u8(self.kind.code());
        out.put_u8(match self.priority {
            Priority::High => 0,
            Priority::Normal => 1,
        });
        out.put_u8(match self.format {
            PayloadFormat::Json => 0,
            PayloadFormat::Binary => 1,
        });
        out.put_u64_le(self.received_at_ms);
        match self.device_time_ms {
            Some(time) => {
                out.put_u8(1);
                out.put_u64_le(time);
            }
            None => out.put_u8(0),
        }
        put_short_str(out, self.device.as_str());
        put_short_str(out, &self.source);
        out.put_slice(&self.payload);
    }

    /// The longest record form of an event whose payload, device id and source name are
    /// at most these lengths: what a buffer must hold for a source's largest frame.
    pub fn max_encoded_len(payload_len: u64, device_id_len: usize, source_len: usize) -> u64 {
        let header = 4
            + ID_LEN
            + 8
            + 1
            + 8
            + 2
            + device_id_len.min(usize::from(u16::MAX))
            + 2
            + source_len.min(usize::from(u16::MAX));
        payload_len.saturating_add(header as u64)
    }

    /// Size of the record form, for sizing a buffer before `encode`.
    pub fn encoded_len(&self) -> usize {
        4 + ID_LEN
            + 8
            + 1
            + if self.device_time_ms.is_some() { 8 } else { 0 }
            + 2
            + self.device.as_str().len().min(usize::from(u16::MAX))
            + 2
            + self.source.len().min(usize::from(u16::MAX))
            + self.payload.len()
    }

    /// Reads an event back from its record form. The payload shares `record`'s memory.
    pub fn decode(record: Bytes) -> Result<Event, DecodeError> {
        let mut reader = Reader {
            data: &record,
            at: 0,
        };
        let stored_id = match reader.u8()? {
            VERSION => {
                let mut id = [0u8; ID_LEN];
                id.copy_from_slice(reader.take(ID_LEN)?);
                Some(EventId::from_bytes(id))
            }
            VERSION_WITHOUT_ID => None,
            version => return Err(DecodeError::Version(version)),
        };
        let kind =
            EventKind::from_code(reader.u8()?).ok_or(DecodeError::Invalid { field: "kind" })?;
        let priority = match reader.u8()? {
            0 => Priority::High,
            1 => Priority::Normal,
            _ => return Err(DecodeError::Invalid { field: "priority" }),
        };
        let format = match reader.u8()? {
            0 => PayloadFormat::Json,
            1 => PayloadFormat::Binary,
            _ => return Err(DecodeError::Invalid { field: "format" }),
        };
        let received_at_ms = reader.u64()?;
        let device_time_ms = match reader.u8()? {
            0 => None,
            1 => Some(reader.u64()?),
            _ => {
                return Err(DecodeError::Invalid {
                    field: "device time flag",
                });
            }
        };
        let device = DeviceId::new(reader.short_str("device id")?);
        let source: Arc<str> = Arc::from(reader.short_str("source")?);
        let payload = record.slice(reader.at..);
        let id = stored_id.unwrap_or_else(|| EventId::legacy(&record, received_at_ms));
        Ok(Event {
            id,
            device,
            kind,
            priority,
            received_at_ms,
            device_time_ms,
            source,
            format,
            payload,
        })
    }
}

fn put_short_str(out: &mut impl BufMut, text: &str) {
    let mut end = text.len().min(usize::from(u16::MAX));
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    // `end` <= u16::MAX by the line above, so the conversion cannot fail.
    out.put_u16_le(u16::try_from(end).unwrap_or(u16::MAX));
    out.put_slice(&text.as_bytes()[..end]);
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(len)
            .filter(|end| *end <= self.data.len());
        let end = end.ok_or(DecodeError::Truncated(self.at))?;
        let bytes = &self.data[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(raw))
    }

    fn short_str(&mut self, field: &'static str) -> Result<&'a str, DecodeError> {
        let mut raw = [0u8; 2];
        raw.copy_from_slice(self.take(2)?);
        let len = usize::from(u16::from_le_bytes(raw));
        std::str::from_utf8(self.take(len)?).map_err(|_| DecodeError::Invalid { field })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_event() -> impl Strategy<Value = Event> {
        (
            "[a-z0-9-]{1,40}",
            0usize..5,
            any::<bool>(),
            any::<bool>(),
            any::<u64>(),
            proptest::option::of(any::<u64>()),
            "[a-z]{1,12}",
            proptest::collection::vec(any::<u8>(), 0..512),
        )
            .prop_map(
                |(device, kind, high, binary, received, device_time, source, payload)| Event {
                    id: EventId::generate(),
                    device: DeviceId::new(&device),
                    kind: EventKind::ALL[kind],
                    priority: if high {
                        Priority::High
                    } else {
                        Priority::Normal
                    },
                    received_at_ms: received,
                    device_time_ms: device_time,
                    source: Arc::from(source.as_str()),
                    format: if binary {
                        PayloadFormat::Binary
                    } else {
                        PayloadFormat::Json
                    },
                    payload: Bytes::from(payload),
                },
            )
    }

    proptest! {
        #[test]
        fn round_trips(event in arb_event()) {
            let mut out = Vec::new();
            event.encode(&mut out);
            prop_assert_eq!(out.len(), event.encoded_len());
            prop_assert!(
                out.len() as u64
                    <= Event::max_encoded_len(
                        event.payload.len() as u64,
                        event.device.as_str().len(),
                        event.source.len()
                    )
            );
            prop_assert_eq!(Event::decode(Bytes::from(out)).unwrap(), event);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ignored = Event::decode(Bytes::from(bytes)).is_ok();
        }

        #[test]
        fn every_truncation_is_an_error_or_shorter_payload(event in arb_event(), cut in 0usize..64) {
            let mut out = Vec::new();
            event.encode(&mut out);
            let header = out.len() - event.payload.len();
            let cut = cut.min(header);
            if cut < header {
                prop_assert!(Event::decode(Bytes::from(out[..cut].to_vec())).is_err());
            }
        }
    }

    #[test]
    fn version_1_records_still_decode_with_a_stable_id() {
        // A version 1 record as the previous release wrote it: alarm, high, json, no
        // device time, device "dev-1", source "devices".
        let mut record = vec![1, 2, 0, 0];
        record.extend_from_slice(&1_764_143_349_123_u64.to_le_bytes());
        record.push(0);
        record.extend_from_slice(&5u16.to_le_bytes());
        record.extend_from_slice(b"dev-1");
        record.extend_from_slice(&7u16.to_le_bytes());
        record.extend_from_slice(b"devices");
        record.extend_from_slice(b"{\"smoke\":true}");
        let event = Event::decode(Bytes::from(record.clone())).unwrap();
        assert_eq!(event.kind, EventKind::Alarm);
        assert_eq!(event.device.as_str(), "dev-1");
        assert_eq!(&event.payload[..], b"{\"smoke\":true}");
        // The same id every time the record is read, so redeliveries stay recognisable.
        let again = Event::decode(Bytes::from(record)).unwrap();
        assert_eq!(event.id(), again.id());
        assert_eq!(event.id().timestamp_ms(), 1_764_143_349_123);
        // Written again (version 2), it keeps that id.
        let mut out = Vec::new();
        event.encode(&mut out);
        assert_eq!(out[0], 2);
        assert_eq!(Event::decode(Bytes::from(out)).unwrap().id(), event.id());
    }

    #[test]
    fn the_id_survives_the_buffer_and_new_events_get_new_ids() {
        let event = Event::new(
            DeviceId::new("dev-1"),
            EventKind::Telemetry,
            Arc::from("devices"),
            1,
            PayloadFormat::Json,
            Bytes::from_static(b"{}"),
        );
        let mut out = Vec::new();
        event.encode(&mut out);
        assert_eq!(Event::decode(Bytes::from(out)).unwrap().id(), event.id());
        assert_eq!(event.clone().id(), event.id());
        let other = Event::new(
            DeviceId::new("dev-1"),
            EventKind::Telemetry,
            Arc::from("devices"),
            1,
            PayloadFormat::Json,
            Bytes::from_static(b"{}"),
        );
        assert_ne!(other.id(), event.id());
    }

    #[test]
    fn unknown_version_is_rejected() {
        assert_eq!(
            Event::decode(Bytes::from_static(&[9, 0])),
            Err(DecodeError::Version(9))
        );
    }

    #[test]
    fn kind_names_round_trip() {
        for kind in EventKind::ALL {
            assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(EventKind::parse("bogus"), None);
    }
}
