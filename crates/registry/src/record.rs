//! The binary encodings of a stored device ([`DeviceRecord`]), in two parts with a table each.
//! Pure: bytes in, value or error out; nothing here panics on input.
//!
//! **Head** (`device_auth`): what authentication and live status need, fixed size; opening the
//! registry reads only these, and a status flush rewrites only these. Format 1:
//!
//! | bytes | field |
//! |---|---|
//! | 0 | format version (1) |
//! | 1 | flags: 1 revoked, 2 has secret hash, 4 has last seen |
//! | 2..34 | SHA-256 of the secret (zeros without one) |
//! | 34..42 | credential version |
//! | 42..50 | last seen, ms since the epoch (0 without one) |
//! | 50..74 | messages, bytes, errors |
//!
//! **Profile** (`device_records`): the rest, read on demand. Format 1:
//!
//! | bytes | field |
//! |---|---|
//! | 0 | format version (1) |
//! | 1 | flags: 1 has refresh hash |
//! | 2..34 | SHA-256 of the refresh token (zeros without one) |
//! | 34..50 | refresh expiry, creation time (ms) |
//! | 50.. | name, model, MAC, IMEI, public key: each a presence byte (0/1), then a `u16` length and UTF-8 |
//! | .. | labels: a `u16` count, then per label a `u16`-length key and value |
//!
//! Integers are little-endian. A later format takes a new version byte; decoders refuse
//! versions they do not know, and bytes after the last field.

use crate::crypto::Hash;
use crate::store::DeviceRecord;
use crate::types::{Device, DeviceStatus};

/// The format this build writes (both parts).
const FORMAT: u8 = 1;
/// Length of an encoded head.
const HEAD_LEN: usize = 74;

const REVOKED: u8 = 1;
const HAS_SECRET: u8 = 2;
const HAS_LAST_SEEN: u8 = 4;
const HAS_REFRESH: u8 = 1;

/// Why bytes are not a device record (the caller adds the table and key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RecordError {
    /// The first byte names a format this build cannot read.
    #[error("unknown record format {0}")]
    UnknownFormat(u8),
    /// The record ends inside a field.
    #[error("record ends inside {0}")]
    Truncated(&'static str),
    /// A string field is not UTF-8.
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
    /// Bytes follow the last field.
    #[error("{0} bytes after the last field")]
    Trailing(usize),
    /// A string or the label count does not fit its `u16` length (never for validated input).
    #[error("{0} is longer than 65,535")]
    TooLong(&'static str),
}

/// Live status and counters: what a status flush changes in a head.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Live {
    /// Last connection or message, ms since the epoch.
    pub(crate) last_seen_ms: Option<u64>,
    /// Messages received.
    pub(crate) messages: u64,
    /// Payload bytes received.
    pub(crate) bytes: u64,
    /// Errors counted.
    pub(crate) errors: u64,
}

impl Live {
    /// The live fields of a device.
    pub(crate) fn of(device: &Device) -> Live {
        Live {
            last_seen_ms: device.last_seen_ms,
            messages: device.messages,
            bytes: device.bytes,
            errors: device.errors,
        }
    }

    /// Copy into a device.
    pub(crate) fn apply_to(self, device: &mut Device) {
        device.last_seen_ms = self.last_seen_ms;
        device.messages = self.messages;
        device.bytes = self.bytes;
        device.errors = self.errors;
    }
}

/// What authentication and status need of a device: the fixed-size part of its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    /// Revoked by an admin.
    pub(crate) revoked: bool,
    /// SHA-256 of the secret; `None` for key-based and revoked devices.
    pub(crate) secret_hash: Option<Hash>,
    /// The credential version JWTs must carry.
    pub(crate) credential_version: u64,
    /// Live status and counters as last flushed.
    pub(crate) live: Live,
}

impl Head {
    /// The head of a record.
    pub(crate) fn of(record: &DeviceRecord) -> Head {
        Head {
            revoked: record.device.status == DeviceStatus::Revoked,
            secret_hash: record.secret_hash,
            credential_version: record.credential_version,
            live: Live::of(&record.device),
        }
    }
}

/// Encode a head ([`HEAD_LEN`] bytes).
pub(crate) fn encode_head(head: &Head) -> Vec<u8> {
    let mut flags = 0;
    if head.revoked {
        flags |= REVOKED;
    }
    if head.secret_hash.is_some() {
        flags |= HAS_SECRET;
    }
    if head.live.last_seen_ms.is_some() {
        flags |= HAS_LAST_SEEN;
    }
    let mut out = Vec::with_capacity(HEAD_LEN);
    out.extend_from_slice(&[FORMAT, flags]);
    out.extend_from_slice(&head.secret_hash.unwrap_or_default());
    out.extend_from_slice(&head.credential_version.to_le_bytes());
    out.extend_from_slice(&head.live.last_seen_ms.unwrap_or_default().to_le_bytes());
    out.extend_from_slice(&head.live.messages.to_le_bytes());
    out.extend_from_slice(&head.live.bytes.to_le_bytes());
    out.extend_from_slice(&head.live.errors.to_le_bytes());
    out
}

/// Decode a head.
pub(crate) fn decode_head(bytes: &[u8]) -> Result<Head, RecordError> {
    let mut reader = Reader::new(bytes);
    reader.format()?;
    let flags = reader.u8("flags")?;
    let secret_hash = reader.array::<32>("secret hash")?;
    let credential_version = reader.u64("credential version")?;
    let last_seen_ms = reader.u64("last seen")?;
    let live = Live {
        last_seen_ms: (flags & HAS_LAST_SEEN != 0).then_some(last_seen_ms),
        messages: reader.u64("messages")?,
        bytes: reader.u64("bytes")?,
        errors: reader.u64("errors")?,
    };
    reader.end()?;
    Ok(Head {
        revoked: flags & REVOKED != 0,
        secret_hash: (flags & HAS_SECRET != 0).then_some(secret_hash),
        credential_version,
        live,
    })
}

/// Encode the profile of a record (its id is the table key and is not repeated).
pub(crate) fn encode_profile(record: &DeviceRecord) -> Result<Vec<u8>, RecordError> {
    let device = &record.device;
    let mut out = Vec::with_capacity(128);
    out.push(FORMAT);
    out.push(if record.refresh_hash.is_some() {
        HAS_REFRESH
    } else {
        0
    });
    out.extend_from_slice(&record.refresh_hash.unwrap_or_default());
    out.extend_from_slice(&record.refresh_expires_at_ms.to_le_bytes());
    out.extend_from_slice(&device.created_at_ms.to_le_bytes());
    for (field, value) in [
        ("name", &device.name),
        ("model", &device.model),
        ("mac", &device.mac),
        ("imei", &device.imei),
        ("public_key", &device.public_key),
    ] {
        match value {
            Some(text) => {
                out.push(1);
                write_str(&mut out, field, text)?;
            }
            None => out.push(0),
        }
    }
    let count = u16::try_from(device.labels.len()).map_err(|_| RecordError::TooLong("labels"))?;
    out.extend_from_slice(&count.to_le_bytes());
    for (key, value) in &device.labels {
        write_str(&mut out, "label key", key)?;
        write_str(&mut out, "label value", value)?;
    }
    Ok(out)
}

fn write_str(out: &mut Vec<u8>, field: &'static str, text: &str) -> Result<(), RecordError> {
    let len = u16::try_from(text.len()).map_err(|_| RecordError::TooLong(field))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    Ok(())
}

/// A decoded profile whose strings still point into the encoded bytes: listing filters read
/// it without allocating, and only the devices of a page are copied out.
#[derive(Debug, Clone)]
pub(crate) struct View<'a> {
    refresh_hash: Option<Hash>,
    refresh_expires_at_ms: u64,
    created_at_ms: u64,
    /// Human-readable name.
    pub(crate) name: Option<&'a str>,
    /// Device model.
    pub(crate) model: Option<&'a str>,
    /// Normalised MAC.
    pub(crate) mac: Option<&'a str>,
    /// IMEI.
    pub(crate) imei: Option<&'a str>,
    public_key: Option<&'a str>,
    labels: Vec<(&'a str, &'a str)>,
}

/// Decode a profile without copying its strings.
pub(crate) fn view(bytes: &[u8]) -> Result<View<'_>, RecordError> {
    let mut reader = Reader::new(bytes);
    reader.format()?;
    let flags = reader.u8("flags")?;
    let refresh_hash = reader.array::<32>("refresh hash")?;
    let refresh_expires_at_ms = reader.u64("refresh expiry")?;
    let created_at_ms = reader.u64("creation time")?;
    let name = reader.opt_str("name")?;
    let model = reader.opt_str("model")?;
    let mac = reader.opt_str("mac")?;
    let imei = reader.opt_str("imei")?;
    let public_key = reader.opt_str("public_key")?;
    let count = reader.u16("label count")?;
    let mut labels = Vec::with_capacity(usize::from(count).min(bytes.len() / 4));
    for _ in 0..count {
        let key = reader.str("label key")?;
        let value = reader.str("label value")?;
        labels.push((key, value));
    }
    reader.end()?;
    Ok(View {
        refresh_hash: (flags & HAS_REFRESH != 0).then_some(refresh_hash),
        refresh_expires_at_ms,
        created_at_ms,
        name,
        model,
        mac,
        imei,
        public_key,
        labels,
    })
}

impl View<'_> {
    /// SHA-256 of the live refresh token.
    pub(crate) fn refresh_hash(&self) -> Option<Hash> {
        self.refresh_hash
    }

    /// The value of label `key`.
    pub(crate) fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(stored, _)| *stored == key)
            .map(|(_, value)| *value)
    }

    /// Device `id` as stored: this profile with `head`'s status and counters.
    pub(crate) fn to_device(&self, id: &str, head: &Head) -> Device {
        let owned = |text: Option<&str>| text.map(str::to_owned);
        let mut device = Device {
            id: id.to_owned(),
            name: owned(self.name),
            model: owned(self.model),
            labels: self
                .labels
                .iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                .collect(),
            mac: owned(self.mac),
            imei: owned(self.imei),
            public_key: owned(self.public_key),
            created_at_ms: self.created_at_ms,
            last_seen_ms: None,
            status: if head.revoked {
                DeviceStatus::Revoked
            } else {
                DeviceStatus::Offline
            },
            messages: 0,
            bytes: 0,
            errors: 0,
        };
        head.live.apply_to(&mut device);
        device
    }

    /// The whole record of device `id`, from this profile and its head.
    pub(crate) fn to_record(&self, id: &str, head: &Head) -> DeviceRecord {
        DeviceRecord {
            device: self.to_device(id, head),
            secret_hash: head.secret_hash,
            credential_version: head.credential_version,
            refresh_hash: self.refresh_hash,
            refresh_expires_at_ms: self.refresh_expires_at_ms,
            connections: 0,
        }
    }
}

/// A cursor over a record's bytes; every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, at: 0 }
    }

    fn take(&mut self, len: usize, field: &'static str) -> Result<&'a [u8], RecordError> {
        let end = self
            .at
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len())
            .ok_or(RecordError::Truncated(field))?;
        let bytes: &'a [u8] = self.bytes;
        let slice = &bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], RecordError> {
        let slice = self.take(N, field)?;
        // `take` returned exactly N bytes.
        slice.try_into().map_err(|_| RecordError::Truncated(field))
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, RecordError> {
        self.array::<1>(field).map(|[byte]| byte)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, RecordError> {
        self.array(field).map(u16::from_le_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, RecordError> {
        self.array(field).map(u64::from_le_bytes)
    }

    fn str(&mut self, field: &'static str) -> Result<&'a str, RecordError> {
        let len = self.u16(field)?;
        let bytes = self.take(usize::from(len), field)?;
        std::str::from_utf8(bytes).map_err(|_| RecordError::NotUtf8(field))
    }

    fn opt_str(&mut self, field: &'static str) -> Result<Option<&'a str>, RecordError> {
        match self.u8(field)? {
            0 => Ok(None),
            _ => self.str(field).map(Some),
        }
    }

    fn format(&mut self) -> Result<(), RecordError> {
        match self.u8("format")? {
            FORMAT => Ok(()),
            other => Err(RecordError::UnknownFormat(other)),
        }
    }

    fn end(&self) -> Result<(), RecordError> {
        match self.bytes.len() - self.at {
            0 => Ok(()),
            trailing => Err(RecordError::Trailing(trailing)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn text() -> impl Strategy<Value = String> {
        "\\PC{0,40}"
    }

    fn record() -> impl Strategy<Value = DeviceRecord> {
        (
            (
                proptest::option::of(text()),
                proptest::option::of(text()),
                proptest::collection::btree_map(text(), text(), 0..5),
                proptest::option::of(text()),
                proptest::option::of(text()),
                proptest::option::of(text()),
                any::<u64>(),
            ),
            (
                proptest::option::of(any::<u64>()),
                any::<bool>(),
                any::<[u64; 3]>(),
                proptest::option::of(any::<[u8; 32]>()),
                any::<u64>(),
                proptest::option::of(any::<[u8; 32]>()),
                any::<u64>(),
            ),
        )
            .prop_map(
                |(
                    (name, model, labels, mac, imei, public_key, created_at_ms),
                    (last_seen_ms, revoked, counters, secret, version, refresh, refresh_expires),
                )| DeviceRecord {
                    device: Device {
                        id: "dev-1".into(),
                        name,
                        model,
                        labels,
                        mac,
                        imei,
                        public_key,
                        created_at_ms,
                        last_seen_ms,
                        status: if revoked {
                            DeviceStatus::Revoked
                        } else {
                            DeviceStatus::Offline
                        },
                        messages: counters[0],
                        bytes: counters[1],
                        errors: counters[2],
                    },
                    secret_hash: secret,
                    credential_version: version,
                    refresh_hash: refresh,
                    refresh_expires_at_ms: refresh_expires,
                    connections: 0,
                },
            )
    }

    fn plain_record() -> DeviceRecord {
        DeviceRecord::new(Device {
            id: "dev-1".into(),
            name: Some("x".into()),
            model: None,
            labels: BTreeMap::new(),
            mac: None,
            imei: None,
            public_key: None,
            created_at_ms: 1,
            last_seen_ms: None,
            status: DeviceStatus::Offline,
            messages: 0,
            bytes: 0,
            errors: 0,
        })
    }

    proptest! {
        #[test]
        fn a_record_round_trips(record in record()) {
            let head_bytes = encode_head(&Head::of(&record));
            prop_assert_eq!(head_bytes.len(), HEAD_LEN);
            let head = decode_head(&head_bytes)?;
            prop_assert_eq!(head, Head::of(&record));
            let profile = encode_profile(&record)?;
            prop_assert_eq!(view(&profile)?.to_record("dev-1", &head), record);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            // Errors are expected; only a panic fails this.
            decode_head(&bytes).ok();
            if let Ok(view) = view(&bytes) {
                view.label("a");
            }
        }

        #[test]
        fn every_truncation_is_an_error(record in record()) {
            let head = encode_head(&Head::of(&record));
            let profile = encode_profile(&record)?;
            for len in 0..head.len() {
                prop_assert!(decode_head(&head[..len]).is_err());
            }
            for len in 0..profile.len() {
                prop_assert!(view(&profile[..len]).is_err());
            }
        }
    }

    #[test]
    fn unknown_formats_and_trailing_bytes_are_refused() -> Result<(), RecordError> {
        let record = plain_record();
        let mut profile = encode_profile(&record)?;
        let mut head = encode_head(&Head::of(&record));
        profile.push(0);
        head.push(0);
        assert_eq!(view(&profile).err(), Some(RecordError::Trailing(1)));
        assert_eq!(decode_head(&head).err(), Some(RecordError::Trailing(1)));
        profile[0] = 2;
        head[0] = 2;
        assert_eq!(view(&profile).err(), Some(RecordError::UnknownFormat(2)));
        assert_eq!(
            decode_head(&head).err(),
            Some(RecordError::UnknownFormat(2))
        );
        Ok(())
    }

    #[test]
    fn a_string_longer_than_u16_is_refused_not_truncated() {
        let mut record = plain_record();
        record.device.name = Some("x".repeat(70_000));
        assert_eq!(encode_profile(&record), Err(RecordError::TooLong("name")));
        record.device.name = None;
        assert!(encode_profile(&record).is_ok());
    }
}
