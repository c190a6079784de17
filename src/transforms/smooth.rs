//! `type = "smooth"`: smooths one numeric field per device (moving average or median
//! over the last `window` readings, or an EWMA with `alpha`) and writes the result back
//! into the field or into `target`. Events without the field pass unchanged.
//!
//! Readings are taken in arrival order; the median filter removes single spikes that a
//! moving average would smear.

use std::collections::VecDeque;
use std::sync::Arc;

use fieldgate_core::Event;
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::device_state::{
    SharedDeviceTable, TableMetrics, check_max_devices, default_max_devices,
};
use super::{Emitted, EventTransform, TransformServices, TransformSpec, payload};
use crate::config::{ConfigError, Context};

/// Largest `window`.
const MAX_WINDOW: usize = 1000;

/// How to smooth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Mean of the last `window` readings.
    MovingAverage,
    /// Median of the last `window` readings.
    Median,
    /// Exponentially weighted moving average with `alpha`.
    Ewma,
}

/// `[transforms.NAME]` with `type = "smooth"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmoothConfig {
    /// Sources and transform outputs to read.
    pub inputs: Spanned<Vec<String>>,
    /// The numeric field, as a dotted path.
    pub field: String,
    /// How to smooth.
    pub method: Method,
    /// Readings averaged (moving_average, median).
    pub window: Option<usize>,
    /// Weight of a new reading (ewma), above 0 and at most 1.
    pub alpha: Option<f64>,
    /// Where the smoothed value goes (default: back into `field`).
    pub target: Option<String>,
    /// Devices tracked at most; the least recently seen is forgotten beyond.
    #[serde(default = "default_max_devices")]
    pub max_devices: usize,
}

enum Smoother {
    Window { size: usize, median: bool },
    Ewma { alpha: f64 },
}

impl SmoothConfig {
    fn compile(
        &self,
        name: &str,
        context: &Context<'_>,
    ) -> Result<(Vec<String>, Vec<String>, Smoother), ConfigError> {
        let key = |key: &str| format!("transforms.{name}.{key}");
        check_max_devices(name, self.max_devices, context)?;
        let field = payload::split_path(&self.field).ok_or_else(|| {
            context.key_error(
                &key("field"),
                format!("{:?} is not a field path", self.field),
            )
        })?;
        let target = match &self.target {
            Some(target) => payload::split_path(target).ok_or_else(|| {
                context.key_error(&key("target"), format!("{target:?} is not a field path"))
            })?,
            None => field.clone(),
        };
        let smoother = match self.method {
            Method::MovingAverage | Method::Median => {
                if self.alpha.is_some() {
                    return Err(
                        context.key_error(&key("alpha"), "applies only to method = \"ewma\"")
                    );
                }
                let size = self.window.ok_or_else(|| {
                    context.key_error(
                        &key("window"),
                        "needs the number of readings, e.g. window = 5",
                    )
                })?;
                if !(2..=MAX_WINDOW).contains(&size) {
                    return Err(context.key_error(
                        &key("window"),
                        format!("must be between 2 and {MAX_WINDOW}"),
                    ));
                }
                Smoother::Window {
                    size,
                    median: self.method == Method::Median,
                }
            }
            Method::Ewma => {
                if self.window.is_some() {
                    return Err(
                        context.key_error(&key("window"), "does not apply to method = \"ewma\"")
                    );
                }
                let alpha = self.alpha.ok_or_else(|| {
                    context.key_error(
                        &key("alpha"),
                        "needs the weight of a new reading, e.g. alpha = 0.2",
                    )
                })?;
                if !(alpha.is_finite() && alpha > 0.0 && alpha <= 1.0) {
                    return Err(context.key_error(&key("alpha"), "must be above 0 and at most 1"));
                }
                Smoother::Ewma { alpha }
            }
        };
        Ok((field, target, smoother))
    }
}

impl TransformSpec for SmoothConfig {
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
        let (field, target, smoother) = self.compile(name, &Context::running())?;
        Ok(Arc::new(Smooth {
            field,
            target,
            smoother,
            table: SharedDeviceTable::new(
                self.max_devices,
                TableMetrics::new(&services.metrics, name),
            ),
            not_json: services.metrics.transform_error(name, "not_json"),
        }))
    }
}

/// One device's smoothing state (checkpointed).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Readings {
    #[serde(default)]
    window: VecDeque<f64>,
    #[serde(default)]
    ewma: Option<f64>,
}

struct Smooth {
    field: Vec<String>,
    target: Vec<String>,
    smoother: Smoother,
    table: SharedDeviceTable<Readings>,
    not_json: Counter,
}

impl Smooth {
    fn smooth(&self, readings: &mut Readings, value: f64) -> f64 {
        match self.smoother {
            Smoother::Ewma { alpha } => {
                let next = readings
                    .ewma
                    .map_or(value, |last| last + alpha * (value - last));
                // Readings near f64::MAX can overflow the difference: start over.
                let next = if next.is_finite() { next } else { value };
                readings.ewma = Some(next);
                next
            }
            Smoother::Window { size, median } => {
                readings.window.push_back(value);
                while readings.window.len() > size {
                    readings.window.pop_front();
                }
                if median {
                    let mut sorted: Vec<f64> = readings.window.iter().copied().collect();
                    sorted.sort_by(f64::total_cmp);
                    let middle = sorted.len() / 2;
                    if sorted.len() % 2 == 0 {
                        (sorted[middle - 1] + sorted[middle]) / 2.0
                    } else {
                        sorted[middle]
                    }
                } else {
                    #[allow(clippy::cast_precision_loss, reason = "at most 1000 readings")]
                    let count = readings.window.len() as f64;
                    readings.window.iter().sum::<f64>() / count
                }
            }
        }
    }
}

impl EventTransform for Smooth {
    fn apply(&self, mut event: Event, out: &mut Emitted) {
        let Some(mut value) = payload::parse(&event) else {
            if event.format == fieldgate_core::PayloadFormat::Json {
                self.not_json.inc();
            }
            out.emit(0, event);
            return;
        };
        let Some(reading) = payload::get(&value, &self.field).and_then(serde_json::Value::as_f64)
        else {
            out.emit(0, event);
            return;
        };
        let smoothed = {
            let mut table = self.table.lock();
            let readings = table.entry(&event.device, Readings::default, drop);
            self.smooth(readings, reading)
        };
        if let Some(number) = serde_json::Number::from_f64(smoothed) {
            if payload::set(&mut value, &self.target, serde_json::Value::Number(number)) {
                if let Some(bytes) = payload::encode(&value) {
                    event.payload = bytes;
                }
            }
        }
        out.emit(0, event);
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

    fn outputs(transform: &dyn EventTransform, field: &str, values: &[f64]) -> Vec<f64> {
        (0u64..)
            .zip(values)
            .map(|(time, value)| {
                let events = run(
                    transform,
                    reading("a", time, &format!("{{\"temp\":{value}}}")),
                );
                let payload: serde_json::Value =
                    serde_json::from_slice(&events[0].1.payload).expect("json");
                payload[field].as_f64().expect("number")
            })
            .collect()
    }

    #[test]
    fn moving_average_median_and_ewma() {
        let average = build::<SmoothConfig>(
            "inputs = [\"d\"]\nfield = \"temp\"\nmethod = \"moving_average\"\nwindow = 3",
        );
        assert_eq!(
            outputs(&*average, "temp", &[3.0, 6.0, 9.0, 30.0]),
            vec![3.0, 4.5, 6.0, 15.0]
        );
        let median = build::<SmoothConfig>(
            "inputs = [\"d\"]\nfield = \"temp\"\nmethod = \"median\"\nwindow = 3\ntarget = \"temp_f\"",
        );
        // The spike at 100 never comes through.
        assert_eq!(
            outputs(&*median, "temp_f", &[20.0, 100.0, 21.0, 22.0]),
            vec![20.0, 60.0, 21.0, 22.0]
        );
        let ewma = build::<SmoothConfig>(
            "inputs = [\"d\"]\nfield = \"temp\"\nmethod = \"ewma\"\nalpha = 0.5",
        );
        assert_eq!(
            outputs(&*ewma, "temp", &[10.0, 20.0, 20.0]),
            vec![10.0, 15.0, 17.5]
        );
        // Without the field, unchanged.
        let event = reading("a", 9, r#"{"hum":1}"#);
        assert_eq!(run(&*ewma, event.clone())[0].1, event);
    }

    #[test]
    fn smoothing_resumes_from_a_checkpoint() {
        let text = "inputs = [\"d\"]\nfield = \"temp\"\nmethod = \"ewma\"\nalpha = 0.5";
        let ewma = build::<SmoothConfig>(text);
        outputs(&*ewma, "temp", &[10.0]);
        let restored = build::<SmoothConfig>(text);
        restored
            .restore(&ewma.checkpoint().expect("stateful"))
            .expect("restores");
        assert_eq!(outputs(&*restored, "temp", &[20.0]), vec![15.0]);
    }

    #[test]
    fn hostile_configs_name_their_key() {
        for (text, key) in [
            (
                "field = \"\"\nmethod = \"ewma\"\nalpha = 0.5",
                "transforms.t.field",
            ),
            ("field = \"t\"\nmethod = \"ewma\"", "transforms.t.alpha"),
            (
                "field = \"t\"\nmethod = \"ewma\"\nalpha = nan",
                "transforms.t.alpha",
            ),
            (
                "field = \"t\"\nmethod = \"ewma\"\nalpha = 1.5",
                "transforms.t.alpha",
            ),
            (
                "field = \"t\"\nmethod = \"ewma\"\nalpha = 0.5\nwindow = 3",
                "transforms.t.window",
            ),
            (
                "field = \"t\"\nmethod = \"median\"\nwindow = 1",
                "transforms.t.window",
            ),
            (
                "field = \"t\"\nmethod = \"median\"\nwindow = 100000000",
                "transforms.t.window",
            ),
            ("field = \"t\"\nmethod = \"median\"", "transforms.t.window"),
            (
                "field = \"t\"\nmethod = \"median\"\nwindow = 3\ntarget = \"x.\"",
                "transforms.t.target",
            ),
        ] {
            let error = check_error::<SmoothConfig>(&format!("inputs = [\"d\"]\n{text}"));
            assert!(error.contains(key), "{text}: {error}");
        }
    }
}
