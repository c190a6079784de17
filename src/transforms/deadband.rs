//! `type = "deadband"`: report by exception. An event of a device passes only when one
//! of the listed fields moved beyond its band since the last value that device
//! reported; the others are dropped (counted in `fieldgate_filtered_events_total`).
//!
//! Events without any listed numeric field (other kinds, binary or malformed payloads)
//! pass unchanged: there is nothing to judge them by.

use std::collections::BTreeMap;
use std::sync::Arc;

use fieldgate_core::Event;
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use toml::Spanned;

use super::device_state::{
    SharedDeviceTable, TableMetrics, check_max_devices, default_max_devices,
};
use super::{Emitted, EventTransform, TransformServices, TransformSpec, payload};
use crate::config::{ConfigError, Context};

/// One field's band.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Band {
    /// A change larger than this passes.
    pub absolute: Option<f64>,
    /// A change larger than this percentage of the last reported value passes.
    pub percent: Option<f64>,
}

/// `[transforms.NAME]` with `type = "deadband"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadbandConfig {
    /// Sources and transform outputs to read.
    pub inputs: Spanned<Vec<String>>,
    /// The band of each watched field, by dotted path.
    pub fields: BTreeMap<String, Band>,
    /// Devices tracked at most; the least recently seen is forgotten beyond.
    #[serde(default = "default_max_devices")]
    pub max_devices: usize,
}

impl TransformSpec for DeadbandConfig {
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
        Ok(Arc::new(Deadband {
            fields: self.compile(name, &Context::running())?,
            table: SharedDeviceTable::new(
                self.max_devices,
                TableMetrics::new(&services.metrics, name),
            ),
            filtered: services.metrics.filtered(name),
        }))
    }
}

impl DeadbandConfig {
    fn compile(&self, name: &str, context: &Context<'_>) -> Result<Vec<Field>, ConfigError> {
        check_max_devices(name, self.max_devices, context)?;
        if self.fields.is_empty() {
            return Err(context.key_error(
                &format!("transforms.{name}.fields"),
                "list at least one field, e.g. fields = { temp = { absolute = 0.5 } }",
            ));
        }
        let mut fields = Vec::new();
        for (field, band) in &self.fields {
            let key = format!("transforms.{name}.fields.{field}");
            let Some(path) = payload::split_path(field) else {
                return Err(context.key_error(&key, format!("{field:?} is not a field path")));
            };
            for (what, value) in [("absolute", band.absolute), ("percent", band.percent)] {
                if value.is_some_and(|value| !value.is_finite() || value < 0.0) {
                    return Err(context.key_error(
                        &format!("{key}.{what}"),
                        "must be a finite number, 0 or above",
                    ));
                }
            }
            if band.absolute.is_none() && band.percent.is_none() {
                return Err(context.key_error(&key, "needs `absolute`, `percent` or both"));
            }
            fields.push(Field {
                path,
                absolute: band.absolute,
                percent: band.percent,
            });
        }
        Ok(fields)
    }
}

struct Field {
    path: Vec<String>,
    absolute: Option<f64>,
    percent: Option<f64>,
}

impl Field {
    /// Whether `value` moved beyond the band since `last`.
    fn moved(&self, last: f64, value: f64) -> bool {
        let change = (value - last).abs();
        self.absolute.is_some_and(|band| change > band)
            || self
                .percent
                .is_some_and(|percent| change > last.abs() * percent / 100.0)
    }
}

struct Deadband {
    fields: Vec<Field>,
    /// Last reported value per field (by index), per device.
    table: SharedDeviceTable<Vec<Option<f64>>>,
    filtered: Counter,
}

impl EventTransform for Deadband {
    fn apply(&self, event: Event, out: &mut Emitted) {
        let values: Vec<Option<f64>> = match payload::parse(&event) {
            Some(value) => self
                .fields
                .iter()
                .map(|field| payload::get(&value, &field.path).and_then(serde_json::Value::as_f64))
                .collect(),
            None => Vec::new(),
        };
        if values.iter().all(Option::is_none) {
            out.emit(0, event);
            return;
        }
        let passes = {
            let mut table = self.table.lock();
            let last = table.entry(&event.device, || vec![None; self.fields.len()], drop);
            last.resize(self.fields.len(), None);
            let passes = self.fields.iter().zip(values.iter().zip(last.iter())).any(
                |(field, (value, last))| match (value, last) {
                    (Some(value), Some(last)) => field.moved(*last, *value),
                    (Some(_), None) => true,
                    (None, _) => false,
                },
            );
            if passes {
                for (slot, value) in last.iter_mut().zip(values) {
                    if value.is_some() {
                        *slot = value;
                    }
                }
            }
            passes
        };
        if passes {
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

    const CONFIG: &str = "inputs = [\"d\"]\nfields = { temp = { absolute = 0.5 }, \"env.hum\" = { percent = 10.0 } }";

    fn passed(transform: &dyn EventTransform, device: &str, payloads: &[&str]) -> String {
        (0u64..)
            .zip(payloads)
            .map(|(time, payload)| {
                if run(transform, reading(device, time, payload)).is_empty() {
                    '.'
                } else {
                    'p'
                }
            })
            .collect()
    }

    #[test]
    fn reports_by_exception_per_field_and_device() {
        let deadband = build::<DeadbandConfig>(CONFIG);
        let temps = [
            r#"{"temp":20.0}"#,
            r#"{"temp":20.4}"#,
            r#"{"temp":20.6}"#,
            r#"{"temp":21.0}"#,
            r#"{"temp":21.2}"#,
            r#"{"temp":20.0,"env":{"hum":50}}"#,
            r#"{"temp":20.0,"env":{"hum":54}}"#,
            r#"{"temp":20.0,"env":{"hum":56}}"#,
            r#"{"other":1}"#,
            "not json",
        ];
        // 20.6 moved 0.6 from the reported 20.0; 21.2 moved 0.6 from 20.6; hum 56 is
        // 12% above the reported 50; the last two have nothing to judge by.
        assert_eq!(passed(&*deadband, "a", &temps), "p.p.pp.ppp");
        // Another device starts from nothing.
        assert_eq!(passed(&*deadband, "b", &[r#"{"temp":21.2}"#]), "p");
    }

    #[test]
    fn state_survives_a_checkpoint() {
        let deadband = build::<DeadbandConfig>(CONFIG);
        assert_eq!(passed(&*deadband, "a", &[r#"{"temp":20.0}"#]), "p");
        let state = deadband.checkpoint().expect("stateful");
        let restored = build::<DeadbandConfig>(CONFIG);
        restored.restore(&state).expect("restores");
        assert_eq!(passed(&*restored, "a", &[r#"{"temp":20.1}"#]), ".");
        assert!(restored.restore(b"{").is_err());
    }

    #[test]
    fn hostile_configs_name_their_key() {
        for (text, key) in [
            ("inputs = [\"d\"]\nfields = {}", "transforms.t.fields"),
            (
                "inputs = [\"d\"]\nfields = { temp = {} }",
                "transforms.t.fields.temp",
            ),
            (
                "inputs = [\"d\"]\nfields = { temp = { absolute = nan } }",
                "transforms.t.fields.temp.absolute",
            ),
            (
                "inputs = [\"d\"]\nfields = { temp = { percent = -1.0 } }",
                "transforms.t.fields.temp.percent",
            ),
            (
                "inputs = [\"d\"]\nfields = { \"a..b\" = { absolute = 1.0 } }",
                "transforms.t.fields.a..b",
            ),
            (
                "inputs = [\"d\"]\nfields = { temp = { absolute = 1.0 } }\nmax_devices = 0",
                "transforms.t.max_devices",
            ),
        ] {
            let error = check_error::<DeadbandConfig>(text);
            assert!(error.contains(key), "{text}: {error}");
        }
        assert!(
            check_error::<DeadbandConfig>(
                "inputs = [\"d\"]\nfields = { temp = { absolute = 1.0, typo = 2 } }"
            )
            .contains("typo")
        );
    }
}
