//! `type = "dedup"`: drops an event identical to the last one kept for the same device
//! within `window` (by reading time), comparing the whole payload or only the listed
//! `fields`; drops are counted in `fieldgate_filtered_events_total`.
//!
//! The window runs from the last kept event, so a value repeated forever still passes
//! once per window (a heartbeat). Payloads are compared by a SHA-256 fingerprint
//! (truncated to 64 bits), which is stable across versions and so safe to checkpoint.

use std::sync::Arc;
use std::time::Duration;

use fieldgate_core::Event;
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use toml::Spanned;

use super::device_state::{
    SharedDeviceTable, TableMetrics, check_max_devices, default_max_devices, reading_time_ms,
};
use super::{Emitted, EventTransform, TransformServices, TransformSpec, payload};
use crate::config::{ConfigError, Context, HumanDuration};

/// Longest `window`.
const MAX_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);
/// Most `fields`.
const MAX_FIELDS: usize = 64;

/// `[transforms.NAME]` with `type = "dedup"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {
    /// Sources and transform outputs to read.
    pub inputs: Spanned<Vec<String>>,
    /// How long after a kept event an identical one is dropped.
    pub window: HumanDuration,
    /// Compare only these fields (dotted paths); the whole payload when absent.
    pub fields: Option<Vec<String>>,
    /// Devices tracked at most; the least recently seen is forgotten beyond.
    #[serde(default = "default_max_devices")]
    pub max_devices: usize,
}

/// Field paths to compare; `None` for the whole payload.
type Fields = Option<Vec<Vec<String>>>;

impl DedupConfig {
    fn compile(&self, name: &str, context: &Context<'_>) -> Result<(u64, Fields), ConfigError> {
        let key = |key: &str| format!("transforms.{name}.{key}");
        check_max_devices(name, self.max_devices, context)?;
        if self.window.0.is_zero() || self.window.0 > MAX_WINDOW {
            return Err(context.key_error(&key("window"), "must be above 0 and at most 7 days"));
        }
        let fields = match &self.fields {
            None => None,
            Some(fields) => {
                if fields.is_empty() || fields.len() > MAX_FIELDS {
                    return Err(context.key_error(
                        &key("fields"),
                        format!("list 1 to {MAX_FIELDS} fields, or leave it out to compare whole payloads"),
                    ));
                }
                let mut paths = Vec::new();
                for (index, field) in fields.iter().enumerate() {
                    paths.push(payload::split_path(field).ok_or_else(|| {
                        context.key_error(
                            &format!("transforms.{name}.fields[{index}]"),
                            format!("{field:?} is not a field path"),
                        )
                    })?);
                }
                Some(paths)
            }
        };
        Ok((
            u64::try_from(self.window.0.as_millis()).unwrap_or(u64::MAX),
            fields,
        ))
    }
}

impl TransformSpec for DedupConfig {
    fn inputs(&self) -> &Spanned<Vec<String>> {
        &self.inputs
    }

    fn check(&self, name: &str, context: &Context<'_>) -> Result<(), ConfigError> {
        self.compile(name, context).map(drop)
    }

    fn build(
        &self,
        name: &str,
        services: &TransformServices,
    ) -> Result<Arc<dyn EventTransform>, ConfigError> {
        let (window_ms, fields) = self.compile(name, &Context::running())?;
        Ok(Arc::new(Dedup {
            window_ms,
            fields,
            table: SharedDeviceTable::new(
                self.max_devices,
                TableMetrics::new(&services.metrics, name),
            ),
            filtered: services.metrics.filtered(name),
        }))
    }
}

/// The last kept event of a device (checkpointed).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct LastKept {
    fingerprint: u64,
    time_ms: u64,
}

struct Dedup {
    window_ms: u64,
    fields: Fields,
    table: SharedDeviceTable<LastKept>,
    filtered: Counter,
}

impl Dedup {
    fn fingerprint(&self, event: &Event) -> u64 {
        let mut digest = sha2::Sha256::new();
        match (&self.fields, payload::parse(event)) {
            (Some(fields), Some(value)) => {
                for path in fields {
                    let field = payload::get(&value, path).unwrap_or(&serde_json::Value::Null);
                    digest.update(field.to_string().as_bytes());
                    digest.update([0]);
                }
            }
            // Whole payloads, and payloads that are not JSON, compare byte for byte.
            _ => digest.update(&event.payload),
        }
        let hash = digest.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&hash[..8]);
        u64::from_le_bytes(first)
    }
}

impl EventTransform for Dedup {
    fn apply(&self, event: Event, out: &mut Emitted) {
        let fingerprint = self.fingerprint(&event);
        let time_ms = reading_time_ms(&event);
        let duplicate = {
            let mut table = self.table.lock();
            let mut fresh = false;
            let last = table.entry(
                &event.device,
                || {
                    fresh = true;
                    LastKept {
                        fingerprint,
                        time_ms,
                    }
                },
                drop,
            );
            let duplicate = !fresh
                && last.fingerprint == fingerprint
                && last.time_ms.abs_diff(time_ms) < self.window_ms;
            if !duplicate {
                *last = LastKept {
                    fingerprint,
                    time_ms,
                };
            }
            duplicate
        };
        if duplicate {
            self.filtered.inc();
        } else {
            out.emit(0, event);
        }
    }

    fn checkpoint(&self) -> Option<Vec<u8>> {
        self.table.checkpoint()
    }

    fn restore(&self, state: &[u8]) -> anyhow::Result<()> {
        self.table.restore(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transforms::tests::{build, check_error, reading, run};

    fn kept(transform: &dyn EventTransform, readings: &[(&str, u64, &str)]) -> String {
        readings
            .iter()
            .map(|(device, time, payload)| {
                if run(transform, reading(device, *time, payload)).is_empty() {
                    '.'
                } else {
                    'k'
                }
            })
            .collect()
    }

    #[test]
    fn drops_repeats_within_the_window_per_device() {
        let dedup = build::<DedupConfig>("inputs = [\"d\"]\nwindow = \"10s\"");
        let readings = [
            ("a", 0, r#"{"temp":1}"#),
            ("a", 1_000, r#"{"temp":1}"#),
            ("b", 1_000, r#"{"temp":1}"#),
            ("a", 2_000, r#"{"temp":2}"#),
            ("a", 3_000, r#"{"temp":2}"#),
            // Out of order but within the window of the last kept one: still a repeat.
            ("a", 1_500, r#"{"temp":2}"#),
            // A window after the last kept one: passes as a heartbeat.
            ("a", 12_000, r#"{"temp":2}"#),
        ];
        assert_eq!(kept(&*dedup, &readings), "k.kk..k");
    }

    #[test]
    fn compares_only_the_listed_fields() {
        let dedup = build::<DedupConfig>("inputs = [\"d\"]\nwindow = \"1m\"\nfields = [\"temp\"]");
        let readings = [
            ("a", 0, r#"{"temp":1,"seq":1}"#),
            ("a", 1, r#"{"temp":1,"seq":2}"#),
            ("a", 2, r#"{"temp":3,"seq":3}"#),
        ];
        assert_eq!(kept(&*dedup, &readings), "k.k");
        let restored =
            build::<DedupConfig>("inputs = [\"d\"]\nwindow = \"1m\"\nfields = [\"temp\"]");
        restored
            .restore(&dedup.checkpoint().expect("stateful"))
            .expect("restores");
        assert_eq!(kept(&*restored, &[("a", 3, r#"{"temp":3,"seq":4}"#)]), ".");
    }

    #[test]
    fn hostile_configs_name_their_key() {
        for (text, key) in [
            ("window = \"0s\"", "transforms.t.window"),
            ("window = \"100000d\"", "transforms.t.window"),
            ("window = \"1s\"\nfields = []", "transforms.t.fields"),
            (
                "window = \"1s\"\nfields = [\"ok\", \"\"]",
                "transforms.t.fields[1]",
            ),
        ] {
            let error = check_error::<DedupConfig>(&format!("inputs = [\"d\"]\n{text}"));
            assert!(error.contains(key), "{text}: {error}");
        }
        assert!(check_error::<DedupConfig>("inputs = [\"d\"]").contains("window"));
    }
}
