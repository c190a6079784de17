//! Conditions on an event, shared by `filter` and `route`: on its kind, its device (a
//! glob), the device's labels in the registry, and fields of its payload. Every part
//! given must hold.

use std::collections::BTreeMap;

use fieldgate_core::{Event, EventKind};
use fieldgate_registry::Registry;
use serde::Deserialize;
use serde_json::Value;

use super::payload;
use crate::config::{ConfigError, Context};

/// A condition as written in the config.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConditionConfig {
    /// One kind or a list of kinds (`"telemetry"`, `["alarm", "status"]`).
    #[serde(default)]
    pub kind: OneOrMany,
    /// A device id pattern: `*` matches any run of characters, `?` one character.
    pub device: Option<String>,
    /// Labels the device must have in the registry, with these values.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// One payload field test, inline: `field = "temp"` with `gt = 30`, …
    pub field: Option<String>,
    /// Inline test: equal to.
    pub eq: Option<Value>,
    /// Inline test: not equal to.
    pub ne: Option<Value>,
    /// Inline test: a number greater than.
    pub gt: Option<f64>,
    /// Inline test: a number at least.
    pub ge: Option<f64>,
    /// Inline test: a number less than.
    pub lt: Option<f64>,
    /// Inline test: a number at most.
    pub le: Option<f64>,
    /// Inline test: the field is present (true) or absent (false).
    pub exists: Option<bool>,
    /// More payload field tests.
    #[serde(default)]
    pub fields: Vec<FieldTestConfig>,
}

/// One string or a list of strings.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// Not given.
    #[default]
    None,
    /// One value.
    One(String),
    /// Several values.
    Many(Vec<String>),
}

/// A test of one payload field.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldTestConfig {
    /// Dotted path into the JSON payload (`"env.temp"`).
    pub field: String,
    /// Equal to.
    pub eq: Option<Value>,
    /// Not equal to.
    pub ne: Option<Value>,
    /// A number greater than.
    pub gt: Option<f64>,
    /// A number at least.
    pub ge: Option<f64>,
    /// A number less than.
    pub lt: Option<f64>,
    /// A number at most.
    pub le: Option<f64>,
    /// Present (true) or absent (false).
    pub exists: Option<bool>,
}

/// A checked condition, ready to evaluate.
#[derive(Debug)]
pub struct Condition {
    kinds: Vec<EventKind>,
    device: Option<String>,
    labels: Vec<(String, String)>,
    fields: Vec<FieldTest>,
}

#[derive(Debug)]
struct FieldTest {
    path: Vec<String>,
    ops: Vec<Op>,
}

#[derive(Debug)]
enum Op {
    Eq(Value),
    Ne(Value),
    Gt(f64),
    Ge(f64),
    Lt(f64),
    Le(f64),
    Exists(bool),
}

/// A payload parsed at most once, when a test first needs it.
#[derive(Default)]
pub struct LazyPayload(Option<Option<Value>>);

impl LazyPayload {
    fn get(&mut self, event: &Event) -> Option<&Value> {
        self.0.get_or_insert_with(|| payload::parse(event)).as_ref()
    }
}

impl ConditionConfig {
    /// Checks the condition and compiles it; `key` names it in errors.
    pub fn compile(&self, key: &str, context: &Context<'_>) -> Result<Condition, ConfigError> {
        let kind_names: Vec<&String> = match &self.kind {
            OneOrMany::None => Vec::new(),
            OneOrMany::One(kind) => vec![kind],
            OneOrMany::Many(kinds) => kinds.iter().collect(),
        };
        let mut kinds = Vec::new();
        for name in kind_names {
            let kind = EventKind::parse(name).ok_or_else(|| {
                context.key_error(
                    &format!("{key}.kind"),
                    format!(
                        "unknown kind {name:?}; kinds: telemetry, status, alarm, command_result, event"
                    ),
                )
            })?;
            kinds.push(kind);
        }
        if self.device.as_deref().is_some_and(str::is_empty) {
            return Err(context.key_error(&format!("{key}.device"), "cannot be empty"));
        }
        let inline = FieldTestConfig {
            field: self.field.clone().unwrap_or_default(),
            eq: self.eq.clone(),
            ne: self.ne.clone(),
            gt: self.gt,
            ge: self.ge,
            lt: self.lt,
            le: self.le,
            exists: self.exists,
        };
        let mut fields = Vec::new();
        if self.field.is_some() {
            fields.push(inline.compile(key, context)?);
        } else if inline.has_ops() {
            return Err(context.key_error(
                &format!("{key}.field"),
                "a comparison (eq, ne, gt, ge, lt, le, exists) needs `field`",
            ));
        }
        for (index, test) in self.fields.iter().enumerate() {
            fields.push(test.compile(&format!("{key}.fields[{index}]"), context)?);
        }
        Ok(Condition {
            kinds,
            device: self.device.clone(),
            labels: self
                .labels
                .iter()
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect(),
            fields,
        })
    }
}

impl FieldTestConfig {
    fn has_ops(&self) -> bool {
        self.eq.is_some()
            || self.ne.is_some()
            || self.gt.is_some()
            || self.ge.is_some()
            || self.lt.is_some()
            || self.le.is_some()
            || self.exists.is_some()
    }

    fn compile(&self, key: &str, context: &Context<'_>) -> Result<FieldTest, ConfigError> {
        let path = payload::split_path(&self.field).ok_or_else(|| {
            context.key_error(
                &format!("{key}.field"),
                format!(
                    "{:?} is not a dotted path such as \"temp\" or \"env.temp\"",
                    self.field
                ),
            )
        })?;
        let mut ops = Vec::new();
        ops.extend(self.eq.clone().map(Op::Eq));
        ops.extend(self.ne.clone().map(Op::Ne));
        ops.extend(self.gt.map(Op::Gt));
        ops.extend(self.ge.map(Op::Ge));
        ops.extend(self.lt.map(Op::Lt));
        ops.extend(self.le.map(Op::Le));
        ops.extend(self.exists.map(Op::Exists));
        if ops.is_empty() {
            return Err(context.key_error(
                key,
                format!(
                    "field {:?} needs a comparison: eq, ne, gt, ge, lt, le or exists",
                    self.field
                ),
            ));
        }
        Ok(FieldTest { path, ops })
    }
}

impl Condition {
    /// Whether `event` meets every part of the condition.
    pub fn matches(
        &self,
        event: &Event,
        payload: &mut LazyPayload,
        registry: Option<&Registry>,
    ) -> bool {
        if !self.kinds.is_empty() && !self.kinds.contains(&event.kind) {
            return false;
        }
        if let Some(pattern) = &self.device {
            if !glob_match(pattern.as_bytes(), event.device.as_str().as_bytes()) {
                return false;
            }
        }
        if !self.labels.is_empty() {
            let Some(device) =
                registry.and_then(|registry| registry.get_device(event.device.as_str()))
            else {
                return false;
            };
            let labelled = self
                .labels
                .iter()
                .all(|(name, value)| device.labels.get(name) == Some(value));
            if !labelled {
                return false;
            }
        }
        if self.fields.is_empty() {
            return true;
        }
        let value = payload.get(event);
        self.fields.iter().all(|test| {
            let field = value.and_then(|value| payload::get(value, &test.path));
            test.ops.iter().all(|op| op.holds(field))
        })
    }
}

impl Op {
    fn holds(&self, field: Option<&Value>) -> bool {
        let number = field.and_then(Value::as_f64);
        match self {
            Op::Exists(expected) => field.is_some() == *expected,
            Op::Eq(expected) => field.is_some_and(|field| json_eq(field, expected)),
            Op::Ne(expected) => !field.is_some_and(|field| json_eq(field, expected)),
            Op::Gt(limit) => number.is_some_and(|number| number > *limit),
            Op::Ge(limit) => number.is_some_and(|number| number >= *limit),
            Op::Lt(limit) => number.is_some_and(|number| number < *limit),
            Op::Le(limit) => number.is_some_and(|number| number <= *limit),
        }
    }
}

/// Equality where `1` and `1.0` are the same number.
fn json_eq(left: &Value, right: &Value) -> bool {
    match (left.as_f64(), right.as_f64()) {
        (Some(left), Some(right)) => left == right,
        _ => left == right,
    }
}

/// `*` matches any run of bytes, `?` exactly one; everything else itself.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((star_p, star_t)) => {
                    p = star_p + 1;
                    t = star_t + 1;
                    star = Some((star_p, star_t + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use fieldgate_core::{DeviceId, PayloadFormat};
    use std::sync::Arc;

    fn event(device: &str, kind: EventKind, payload: &[u8], format: PayloadFormat) -> Event {
        Event::new(
            DeviceId::new(device),
            kind,
            Arc::from("src"),
            0,
            format,
            Bytes::copy_from_slice(payload),
        )
    }

    fn compile(toml_text: &str) -> Result<Condition, ConfigError> {
        let config: ConditionConfig = toml::from_str(toml_text).expect("valid toml");
        let context = Context {
            file: "test.toml",
            text: toml_text,
        };
        config.compile("transforms.t.condition", &context)
    }

    #[test]
    fn globs() {
        assert!(glob_match(b"sensor-*", b"sensor-12"));
        assert!(glob_match(b"*-12", b"sensor-12"));
        assert!(glob_match(b"s?nsor*", b"sensor"));
        assert!(!glob_match(b"sensor-?", b"sensor-12"));
        assert!(glob_match(b"*", b""));
        assert!(!glob_match(b"a*b", b"acbd"));
    }

    #[test]
    fn kind_device_and_fields_must_all_hold() {
        let condition = compile(
            r#"
            kind = ["telemetry", "alarm"]
            device = "sensor-*"
            field = "env.temp"
            gt = 30
            "#,
        )
        .expect("valid");
        let hot = event(
            "sensor-1",
            EventKind::Telemetry,
            br#"{"env":{"temp":31.5}}"#,
            PayloadFormat::Json,
        );
        let cold = event(
            "sensor-1",
            EventKind::Telemetry,
            br#"{"env":{"temp":20}}"#,
            PayloadFormat::Json,
        );
        let other = event(
            "pump-1",
            EventKind::Telemetry,
            br#"{"env":{"temp":31.5}}"#,
            PayloadFormat::Json,
        );
        let status = event(
            "sensor-1",
            EventKind::Status,
            br#"{"env":{"temp":31.5}}"#,
            PayloadFormat::Json,
        );
        for (event, expected) in [(hot, true), (cold, false), (other, false), (status, false)] {
            assert_eq!(
                condition.matches(&event, &mut LazyPayload::default(), None),
                expected,
                "{event:?}"
            );
        }
    }

    #[test]
    fn payloads_that_are_not_json_have_no_fields() {
        let condition = compile("field = \"temp\"\nexists = false").expect("valid");
        for event in [
            event(
                "d",
                EventKind::Telemetry,
                b"\x00\x01binary",
                PayloadFormat::Binary,
            ),
            event("d", EventKind::Telemetry, b"{not json", PayloadFormat::Json),
        ] {
            assert!(condition.matches(&event, &mut LazyPayload::default(), None));
        }
        let condition = compile("field = \"temp\"\nge = 0").expect("valid");
        let binary = event("d", EventKind::Telemetry, b"\x00", PayloadFormat::Binary);
        assert!(!condition.matches(&binary, &mut LazyPayload::default(), None));
    }

    #[test]
    fn eq_compares_numbers_as_numbers_and_strings_as_strings() {
        let condition = compile("field = \"mode\"\neq = \"auto\"").expect("valid");
        let auto = event(
            "d",
            EventKind::Telemetry,
            br#"{"mode":"auto"}"#,
            PayloadFormat::Json,
        );
        assert!(condition.matches(&auto, &mut LazyPayload::default(), None));
        let condition = compile("field = \"n\"\neq = 1").expect("valid");
        let one = event(
            "d",
            EventKind::Telemetry,
            br#"{"n":1.0}"#,
            PayloadFormat::Json,
        );
        assert!(condition.matches(&one, &mut LazyPayload::default(), None));
    }

    #[test]
    fn labels_without_a_registry_never_match() {
        let condition = compile("labels = { site = \"north\" }").expect("valid");
        let event = event("d", EventKind::Telemetry, b"{}", PayloadFormat::Json);
        assert!(!condition.matches(&event, &mut LazyPayload::default(), None));
    }

    #[test]
    fn bad_conditions_name_the_key() {
        let err = compile("kind = \"telemetri\"").expect_err("unknown kind");
        assert_eq!(err.key.as_deref(), Some("transforms.t.condition.kind"));
        let err = compile("gt = 3").expect_err("no field");
        assert_eq!(err.key.as_deref(), Some("transforms.t.condition.field"));
        let err = compile("field = \"a..b\"\ngt = 1").expect_err("bad path");
        assert_eq!(err.key.as_deref(), Some("transforms.t.condition.field"));
        let err = compile("fields = [{ field = \"a\" }]").expect_err("no op");
        assert_eq!(err.key.as_deref(), Some("transforms.t.condition.fields[0]"));
    }
}
