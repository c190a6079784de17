//! `type = "remap"`: reshapes a JSON payload: rename, scale and offset, unit
//! conversion, set, drop, applied in that order. A payload that is not a JSON object
//! passes unchanged and is counted in `fieldgate_transform_errors_total{reason="not_json"}`.

use std::collections::BTreeMap;
use std::sync::Arc;

use fieldgate_core::Event;
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use serde_json::Value;
use toml::Spanned;

use super::units::{Conversion, conversion};
use super::{Emitted, EventTransform, TransformServices, TransformSpec, payload};
use crate::config::{ConfigError, Context};

/// `[transforms.NAME]` with `type = "remap"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemapConfig {
    /// Sources and transform outputs to read.
    pub inputs: Spanned<Vec<String>>,
    /// Old field path → new field path.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// Field path → `factor` and `offset`: `value * factor + offset`.
    #[serde(default)]
    pub scale: BTreeMap<String, ScaleConfig>,
    /// Field path → `from` and `to` units (`degF` → `degC`, `psi` → `kPa`, …).
    #[serde(default)]
    pub convert: BTreeMap<String, ConvertConfig>,
    /// Field path → value to set (any TOML value).
    #[serde(default)]
    pub set: BTreeMap<String, Value>,
    /// Field paths to remove.
    #[serde(default)]
    pub drop: Vec<String>,
}

/// `value * factor + offset`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleConfig {
    /// Multiplier.
    #[serde(default = "one")]
    pub factor: f64,
    /// Added after multiplying.
    #[serde(default)]
    pub offset: f64,
}

fn one() -> f64 {
    1.0
}

/// A unit conversion.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvertConfig {
    /// The unit the device reports.
    pub from: String,
    /// The unit to forward.
    pub to: String,
}

impl TransformSpec for RemapConfig {
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
        let mut remap = self.compile(name, &Context::running())?;
        remap.not_json = services.metrics.transform_error(name, "not_json");
        Ok(Arc::new(remap))
    }
}

impl RemapConfig {
    fn compile(&self, name: &str, context: &Context<'_>) -> Result<Remap, ConfigError> {
        let key = |part: &str, path: &str| format!("transforms.{name}.{part}.{path}");
        let path = |part: &str, text: &str| {
            payload::split_path(text).ok_or_else(|| {
                context.key_error(
                    &key(part, text),
                    format!("{text:?} is not a dotted path such as \"temp\" or \"env.temp\""),
                )
            })
        };
        let mut steps = Vec::new();
        for (old, new) in &self.rename {
            steps.push(Step::Rename(path("rename", old)?, path("rename", new)?));
        }
        for (field, scale) in &self.scale {
            if !scale.factor.is_finite() || !scale.offset.is_finite() {
                return Err(
                    context.key_error(&key("scale", field), "factor and offset must be finite")
                );
            }
            steps.push(Step::Linear(
                path("scale", field)?,
                Conversion {
                    factor: scale.factor,
                    offset: scale.offset,
                },
            ));
        }
        for (field, units) in &self.convert {
            let linear = conversion(&units.from, &units.to)
                .map_err(|message| context.key_error(&key("convert", field), message))?;
            steps.push(Step::Linear(path("convert", field)?, linear));
        }
        for (field, value) in &self.set {
            steps.push(Step::Set(path("set", field)?, value.clone()));
        }
        for field in &self.drop {
            steps.push(Step::Drop(path("drop", field)?));
        }
        if steps.is_empty() {
            return Err(context.key_error(
                &format!("transforms.{name}"),
                "a remap needs at least one of rename, scale, convert, set, drop",
            ));
        }
        Ok(Remap {
            steps,
            not_json: Counter::default(),
        })
    }
}

#[derive(Debug)]
enum Step {
    Rename(Vec<String>, Vec<String>),
    Linear(Vec<String>, Conversion),
    Set(Vec<String>, Value),
    Drop(Vec<String>),
}

struct Remap {
    steps: Vec<Step>,
    not_json: Counter,
}

impl EventTransform for Remap {
    fn apply(&self, mut event: Event, out: &mut Emitted) {
        let Some(mut value @ Value::Object(_)) = payload::parse(&event) else {
            self.not_json.inc();
            out.emit(0, event);
            return;
        };
        for step in &self.steps {
            match step {
                Step::Rename(old, new) => {
                    if let Some(moved) = payload::remove(&mut value, old) {
                        payload::set(&mut value, new, moved);
                    }
                }
                Step::Linear(field, linear) => {
                    if let Some(number) = payload::get_mut(&mut value, field) {
                        if let Some(scaled) = number
                            .as_f64()
                            .map(|x| x * linear.factor + linear.offset)
                            .and_then(serde_json::Number::from_f64)
                        {
                            *number = Value::Number(scaled);
                        }
                    }
                }
                Step::Set(field, new) => {
                    payload::set(&mut value, field, new.clone());
                }
                Step::Drop(field) => {
                    payload::remove(&mut value, field);
                }
            }
        }
        if let Some(encoded) = payload::encode(&value) {
            event.payload = encoded;
        }
        out.emit(0, event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transforms::tests::{build, event_json, run};

    fn payload_of(events: Vec<(usize, Event)>) -> Value {
        assert_eq!(events.len(), 1);
        serde_json::from_slice(&events[0].1.payload).expect("json")
    }

    #[test]
    fn renames_scales_converts_sets_and_drops() {
        let remap = build::<RemapConfig>(
            r#"
            inputs = ["d"]
            rename = { t = "temp", "raw.p" = "pressure" }
            set = { site = "north", "meta.v" = 2 }
            drop = ["debug"]
            [scale.counts]
            factor = 0.1
            offset = 1
            [convert.temp]
            from = "degF"
            to = "degC"
            "#,
        );
        let out = payload_of(run(
            &*remap,
            event_json(br#"{"t":212,"raw":{"p":3},"counts":10,"debug":true}"#),
        ));
        assert_eq!(
            out,
            serde_json::json!({"temp":100.0,"raw":{},"pressure":3,"counts":2.0,"site":"north","meta":{"v":2}})
        );
    }

    #[test]
    fn payloads_that_are_not_json_objects_pass_unchanged() {
        let remap = build::<RemapConfig>("inputs = [\"d\"]\ndrop = [\"x\"]");
        for raw in [&b"not json"[..], b"[1,2]", b"\x00\xff"] {
            let events = run(&*remap, event_json(raw));
            assert_eq!(events.len(), 1);
            assert_eq!(&events[0].1.payload[..], raw);
        }
    }

    #[test]
    fn a_field_that_is_not_a_number_is_left_alone() {
        let remap = build::<RemapConfig>("inputs = [\"d\"]\nscale.t = { factor = 2.0 }");
        let out = payload_of(run(&*remap, event_json(br#"{"t":"hot"}"#)));
        assert_eq!(out, serde_json::json!({"t":"hot"}));
    }
}
