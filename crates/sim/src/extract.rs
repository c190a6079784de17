//! Pulls (device, seq, send time) samples out of an upstream MQTT payload.
//!
//! Accepted shapes: the device JSON itself (gateway `raw` format or MQTT
//! devices), a gateway envelope whose `"payload"` holds the device JSON, or a
//! JSON array (a batch) of either. Pure: bytes in, samples out.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

/// One message recognised in a payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Device id, from the device JSON or else from the envelope.
    pub device: String,
    /// The device's sequence number.
    pub seq: u64,
    /// Send time, microseconds since the Unix epoch.
    pub send_us: u64,
}

/// The fields we look at in an object; everything else is ignored.
#[derive(Deserialize)]
struct Record<'a> {
    #[serde(borrow, default)]
    device: Option<Cow<'a, str>>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    t: Option<u64>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
}

/// What one payload yielded.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Extracted {
    /// Objects that carried no (device, seq, t): status events, foreign traffic, bad JSON.
    pub unrecognized: u64,
}

/// Appends every sample found in `payload` to `out`.
pub fn extract(payload: &[u8], out: &mut Vec<Sample>) -> Extracted {
    let mut result = Extracted::default();
    match payload.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => match serde_json::from_slice::<Vec<&RawValue>>(payload) {
            Ok(items) => {
                for item in items {
                    if !extract_object(item.get().as_bytes(), out) {
                        result.unrecognized += 1;
                    }
                }
            }
            Err(_) => result.unrecognized += 1,
        },
        Some(b'{') => {
            if !extract_object(payload, out) {
                result.unrecognized += 1;
            }
        }
        _ => result.unrecognized += 1,
    }
    result
}

/// Extracts one sample from a JSON object; false when it has none.
fn extract_object(object: &[u8], out: &mut Vec<Sample>) -> bool {
    let Ok(record) = serde_json::from_slice::<Record<'_>>(object) else {
        return false;
    };
    if let (Some(device), Some(seq), Some(send_us)) = (&record.device, record.seq, record.t) {
        out.push(Sample {
            device: device.as_ref().to_owned(),
            seq,
            send_us,
        });
        return true;
    }
    // An envelope: the device JSON is the payload; the device id may sit on
    // either level (a hello'd device can leave it out of its own JSON).
    let Some(inner) = record.payload else {
        return false;
    };
    if !inner.get().starts_with('{') {
        return false;
    }
    let Ok(inner) = serde_json::from_str::<Record<'_>>(inner.get()) else {
        return false;
    };
    match (inner.device.or(record.device), inner.seq, inner.t) {
        (Some(device), Some(seq), Some(send_us)) => {
            out.push(Sample {
                device: device.into_owned(),
                seq,
                send_us,
            });
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(payload: &str) -> (Vec<Sample>, u64) {
        let mut out = Vec::new();
        let extracted = extract(payload.as_bytes(), &mut out);
        (out, extracted.unrecognized)
    }

    fn sample(device: &str, seq: u64, send_us: u64) -> Sample {
        Sample {
            device: device.into(),
            seq,
            send_us,
        }
    }

    #[test]
    fn plain_device_object() {
        let (samples, bad) = run(r#"{"device":"dev-1","seq":3,"t":1000,"temp":20.5,"pad":"xx"}"#);
        assert_eq!(samples, vec![sample("dev-1", 3, 1000)]);
        assert_eq!(bad, 0);
    }

    #[test]
    fn gateway_envelope() {
        let (samples, bad) = run(
            r#"{"device":"dev-2","kind":"telemetry","received_at":"2026-11-26T07:49:09.123Z",
                "source":"devices","payload":{"device":"dev-2","seq":9,"t":77,"temp":1.0}}"#,
        );
        assert_eq!(samples, vec![sample("dev-2", 9, 77)]);
        assert_eq!(bad, 0);
    }

    #[test]
    fn envelope_without_device_in_payload_uses_the_envelope_device() {
        let (samples, _) = run(r#"{"device":"dev-3","payload":{"seq":1,"t":5}}"#);
        assert_eq!(samples, vec![sample("dev-3", 1, 5)]);
    }

    #[test]
    fn array_of_envelopes_and_raw_objects() {
        let (samples, bad) = run(
            r#"[{"device":"dev-1","kind":"telemetry","payload":{"device":"dev-1","seq":1,"t":10}},
                {"device":"dev-1","kind":"status","payload":{"status":"online"}},
                {"device":"dev-2","seq":4,"t":20}]"#,
        );
        assert_eq!(
            samples,
            vec![sample("dev-1", 1, 10), sample("dev-2", 4, 20)]
        );
        assert_eq!(bad, 1);
    }

    #[test]
    fn escaped_device_ids_are_unescaped() {
        let (samples, _) = run(r#"{"device":"dev\u002d1","seq":1,"t":2}"#);
        assert_eq!(samples, vec![sample("dev-1", 1, 2)]);
    }

    #[test]
    fn non_device_payloads_are_counted_not_fatal() {
        for payload in [
            "online",
            "",
            "{not json",
            r#"{"device":"dev-1","kind":"status","payload":{"status":"offline"}}"#,
            r#"{"device":"dev-1","payload":"AAEC","encoding":"base64"}"#,
            r#"{"device":"dev-1","seq":"one","t":1}"#,
            "[1,2",
        ] {
            let (samples, bad) = run(payload);
            assert!(samples.is_empty(), "{payload}");
            assert_eq!(bad, 1, "{payload}");
        }
    }
}
