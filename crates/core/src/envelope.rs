//! What sinks write: the JSON envelope around a device's payload, or the payload raw.
//!
//! The device's JSON is spliced in unchanged (it was validated on receipt), so encoding
//! an event never re-parses it. Binary payloads become base64 strings.

use base64::Engine as _;
use serde::Deserialize;

use crate::{Event, PayloadFormat};

/// How an event is written out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputFormat {
    /// `{"id", "device", "kind", "received_at", "source", "payload"}`.
    #[default]
    Envelope,
    /// The device's JSON unchanged.
    Raw,
}

/// Appends one event in `format` to `out`.
pub fn write_event(format: OutputFormat, event: &Event, out: &mut Vec<u8>) {
    match (format, event.format) {
        (OutputFormat::Raw, PayloadFormat::Json) => {
            out.extend_from_slice(trim_json(&event.payload))
        }
        (OutputFormat::Raw, PayloadFormat::Binary) => {
            out.push(b'"');
            out.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(&event.payload)
                    .as_bytes(),
            );
            out.push(b'"');
        }
        (OutputFormat::Envelope, _) => write_envelope(event, out),
    }
}

/// Appends a JSON array of events to `out`.
pub fn write_batch<'a>(
    format: OutputFormat,
    events: impl IntoIterator<Item = &'a Event>,
    out: &mut Vec<u8>,
) {
    out.push(b'[');
    for (index, event) in events.into_iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        write_event(format, event, out);
    }
    out.push(b']');
}

fn write_envelope(event: &Event, out: &mut Vec<u8>) {
    // The id's alphabet needs no JSON escaping.
    out.extend_from_slice(b"{\"id\":\"");
    out.extend_from_slice(&event.id().to_text());
    out.extend_from_slice(b"\",\"device\":");
    write_json_string(event.device.as_str(), out);
    out.extend_from_slice(b",\"kind\":\"");
    out.extend_from_slice(event.kind.as_str().as_bytes());
    out.extend_from_slice(b"\",\"received_at\":\"");
    write_rfc3339_ms(event.received_at_ms, out);
    out.push(b'"');
    if let Some(device_time) = event.device_time_ms {
        out.extend_from_slice(b",\"device_time\":\"");
        write_rfc3339_ms(device_time, out);
        out.push(b'"');
    }
    out.extend_from_slice(b",\"source\":");
    write_json_string(&event.source, out);
    match event.format {
        PayloadFormat::Json => {
            out.extend_from_slice(b",\"payload\":");
            out.extend_from_slice(trim_json(&event.payload));
        }
        PayloadFormat::Binary => {
            out.extend_from_slice(b",\"payload\":\"");
            out.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(&event.payload)
                    .as_bytes(),
            );
            out.extend_from_slice(b"\",\"encoding\":\"base64\"");
        }
    }
    out.push(b'}');
}

/// Device frames may carry surrounding whitespace; the JSON value itself is unchanged.
fn trim_json(payload: &[u8]) -> &[u8] {
    payload.trim_ascii()
}

fn write_json_string(text: &str, out: &mut Vec<u8>) {
    // Serializing a &str into a Vec cannot fail.
    if serde_json::to_writer(&mut *out, text).is_err() {
        out.extend_from_slice(b"\"\"");
    }
}

/// `2026-11-26T07:49:09.123Z` for milliseconds since the epoch.
pub fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(epoch_ms(ms)).to_string()
}

/// Writes [`rfc3339_ms`] into `out` without an intermediate `String`.
fn write_rfc3339_ms(ms: u64, out: &mut Vec<u8>) {
    use std::io::Write as _;
    // Writing into a Vec cannot fail.
    if write!(out, "{}", humantime::format_rfc3339_millis(epoch_ms(ms))).is_err() {
        out.extend_from_slice(rfc3339_ms(ms).as_bytes());
    }
}

fn epoch_ms(ms: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DeviceId, EventKind};
    use bytes::Bytes;

    fn event(payload: &'static [u8], format: PayloadFormat) -> Event {
        let mut event = Event::new(
            DeviceId::new("dev-1"),
            EventKind::Telemetry,
            "devices".into(),
            1_764_143_349_123,
            format,
            Bytes::from_static(payload),
        );
        event.device_time_ms = Some(1_764_143_349_000);
        event
    }

    #[test]
    fn envelope_keeps_payload_unchanged() {
        let mut out = Vec::new();
        let event = event(b" {\"temp\": 21.5, \"x\":[1,2]}\r", PayloadFormat::Json);
        write_event(OutputFormat::Envelope, &event, &mut out);
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["id"], event.id().to_string());
        assert_eq!(
            value["id"].as_str().unwrap().len(),
            crate::EVENT_ID_TEXT_LEN
        );
        assert_eq!(value["device"], "dev-1");
        assert_eq!(value["kind"], "telemetry");
        assert_eq!(value["received_at"], "2025-11-26T07:49:09.123Z");
        assert_eq!(value["device_time"], "2025-11-26T07:49:09.000Z");
        assert_eq!(value["source"], "devices");
        assert_eq!(
            value["payload"],
            serde_json::json!({"temp": 21.5, "x": [1, 2]})
        );
        assert!(
            String::from_utf8(out)
                .unwrap()
                .contains("{\"temp\": 21.5, \"x\":[1,2]}")
        );
    }

    #[test]
    fn binary_is_base64() {
        let mut out = Vec::new();
        write_event(
            OutputFormat::Envelope,
            &event(b"\x00\xff", PayloadFormat::Binary),
            &mut out,
        );
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["payload"], "AP8=");
        assert_eq!(value["encoding"], "base64");
    }

    #[test]
    fn batch_is_an_array_of_the_same() {
        let events = [
            event(b"{\"a\":1}", PayloadFormat::Json),
            event(b"{\"a\":2}", PayloadFormat::Json),
        ];
        let mut out = Vec::new();
        write_batch(OutputFormat::Raw, &events, &mut out);
        assert_eq!(out, b"[{\"a\":1},{\"a\":2}]");
    }
}
