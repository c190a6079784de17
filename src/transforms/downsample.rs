//! `type = "downsample"`: keeps one event per device per `interval` (by the reading's
//! time) or every `every`-th event of a device, and drops the rest (counted in
//! `fieldgate_filtered_events_total`).
//!
//! By time, a reading older than the device's last kept one is dropped: it falls in an
//! interval that already has its event.

use std::sync::Arc;
use std::time::Duration;

use fieldgate_core::Event;
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::device_state::{
    SharedDeviceTable, TableMetrics, check_max_devices, default_max_devices, reading_time_ms,
};
use super::{Emitted, EventTransform, TransformServices, TransformSpec};
use crate::config::{ConfigError, Context, HumanDuration};

/// Longest `interval`.
const MAX_INTERVAL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Largest `every`.
const MAX_EVERY: u64 = 1_000_000;

/// `[transforms.NAME]` with `type = "downsample"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownsampleConfig {
    /// Sources and transform outputs to read.
    pub inputs: Spanned<Vec<String>>,
    /// Keep at most one event per device per interval.
    pub interval: Option<HumanDuration>,
    /// Or: keep every N-th event of a device (the first, the N+1-th, ...).
    pub every: Option<u64>,
    /// Devices tracked at most; the least recently seen is forgotten beyond.
    #[serde(default = "default_max_devices")]
    pub max_devices: usize,
}

#[derive(Debug, Clone, Copy)]
enum Rate {
    Interval(u64),
    Every(u64),
}

impl DownsampleConfig {
    fn compile(&self, name: &str, context: &Context<'_>) -> Result<Rate, ConfigError> {
        let key = |key: &str| format!("transforms.{name}.{key}");
        check_max_devices(name, self.max_devices, context)?;
        match (self.interval, self.every) {
            (Some(interval), None) => {
                if interval.0.is_zero() || interval.0 > MAX_INTERVAL {
                    return Err(
                        context.key_error(&key("interval"), "must be above 0 and at most 7 days")
                    );
                }
                Ok(Rate::Interval(
                    u64::try_from(interval.0.as_millis()).unwrap_or(u64::MAX),
                ))
            }
            (None, Some(every)) => {
                if !(1..=MAX_EVERY).contains(&every) {
                    return Err(context
                        .key_error(&key("every"), format!("must be between 1 and {MAX_EVERY}")));
                }
                Ok(Rate::Every(every))
            }
            (Some(_), Some(_)) => {
                Err(context.key_error(&key("every"), "give `interval` or `every`, not both"))
            }
            (None, None) => Err(context.key_error(
                &key("interval"),
                "needs `interval` (e.g. \"10s\") or `every` (e.g. 10)",
            )),
        }
    }
}

impl TransformSpec for DownsampleConfig {
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
        Ok(Arc::new(Downsample {
            rate: self.compile(name, &Context::running())?,
            table: SharedDeviceTable::new(
                self.max_devices,
                TableMetrics::new(&services.metrics, name),
            ),
            filtered: services.metrics.filtered(name),
        }))
    }
}

/// One device's state (checkpointed): the last kept reading time, or the count seen.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Kept {
    last_kept_ms: Option<u64>,
    seen: u64,
}

struct Downsample {
    rate: Rate,
    table: SharedDeviceTable<Kept>,
    filtered: Counter,
}

impl EventTransform for Downsample {
    fn apply(&self, event: Event, out: &mut Emitted) {
        let keep = {
            let mut table = self.table.lock();
            let kept = table.entry(&event.device, Kept::default, drop);
            match self.rate {
                Rate::Every(every) => {
                    let keep = kept.seen % every == 0;
                    kept.seen = kept.seen.wrapping_add(1);
                    keep
                }
                Rate::Interval(interval_ms) => {
                    let time = reading_time_ms(&event);
                    let keep = kept
                        .last_kept_ms
                        .is_none_or(|last| time >= last.saturating_add(interval_ms));
                    if keep {
                        kept.last_kept_ms = Some(time);
                    }
                    keep
                }
            }
        };
        if keep {
            out.emit(0, event);
        } else {
            self.filtered.inc();
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

    fn kept(transform: &dyn EventTransform, readings: &[(&str, u64)]) -> String {
        readings
            .iter()
            .map(|(device, time)| {
                if run(transform, reading(device, *time, "{}")).is_empty() {
                    '.'
                } else {
                    'k'
                }
            })
            .collect()
    }

    #[test]
    fn one_per_interval_per_device_with_late_readings() {
        let by_time = build::<DownsampleConfig>("inputs = [\"d\"]\ninterval = \"10s\"");
        let readings = [
            ("a", 0),
            ("a", 4_000),
            ("b", 5_000),
            ("a", 10_000),
            // Late: its interval already had its event.
            ("a", 9_000),
            ("a", 19_999),
            ("a", 20_000),
            ("b", 14_000),
            ("b", 15_000),
        ];
        assert_eq!(kept(&*by_time, &readings), "k.kk..k.k");
    }

    #[test]
    fn every_nth_per_device_and_checkpointed() {
        let text = "inputs = [\"d\"]\nevery = 3";
        let every = build::<DownsampleConfig>(text);
        let readings: Vec<(&str, u64)> = (0..7).map(|time| ("a", time)).collect();
        assert_eq!(kept(&*every, &readings[..4]), "k..k");
        let restored = build::<DownsampleConfig>(text);
        restored
            .restore(&every.checkpoint().expect("stateful"))
            .expect("restores");
        assert_eq!(kept(&*restored, &readings[4..]), "..k");
    }

    #[test]
    fn hostile_configs_name_their_key() {
        for (text, key) in [
            ("", "transforms.t.interval"),
            ("interval = \"0s\"", "transforms.t.interval"),
            ("interval = \"1000d\"", "transforms.t.interval"),
            ("every = 0", "transforms.t.every"),
            ("every = 2\ninterval = \"1s\"", "transforms.t.every"),
        ] {
            let error = check_error::<DownsampleConfig>(&format!("inputs = [\"d\"]\n{text}"));
            assert!(error.contains(key), "{text}: {error}");
        }
    }
}
