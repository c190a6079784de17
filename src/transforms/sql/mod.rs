//! `type = "sql"`: eKuiper-style SQL rules over a transform's input events.
//!
//! The SQL text is parsed ([`parse`]) and checked ([`plan`]) once, when the config is
//! loaded; events then run through the checked plan ([`transform`]): expressions
//! ([`expr`]) per event, aggregates ([`aggregate`]) per group, windows ([`window`]) per
//! rule. The grammar, functions and window semantics are in docs/RULES.md.

pub mod aggregate;
pub mod expr;
pub mod parse;
pub mod plan;
pub mod transform;
pub mod value;
pub mod window;

use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use super::{EventTransform, TransformServices, TransformSpec};
use crate::config::{ConfigError, Context, HumanDuration};
use crate::transforms::payload;

pub use transform::SqlTransform;

/// Default `max_groups`.
pub const DEFAULT_MAX_GROUPS: usize = 10_000;
/// Default `max_samples`.
pub const DEFAULT_MAX_SAMPLES: usize = 10_000;
/// Upper bound of `max_groups` and `max_samples`.
pub const MAX_LIMIT: usize = 1_000_000;

/// `[transforms.NAME]` with `type = "sql"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlConfig {
    /// Sources and transform outputs to read.
    pub inputs: Spanned<Vec<String>>,
    /// The rule (`SELECT … FROM input …`).
    pub sql: Spanned<String>,
    /// A payload field holding the event time (epoch ms or RFC 3339); processing time
    /// (the gateway's receipt time) when unset.
    pub event_time: Option<String>,
    /// How long to wait for out-of-order events before a window closes (event time only).
    pub watermark: Option<HumanDuration>,
    /// Groups per window (sessions, sliding groups); rows of further groups are dropped
    /// and counted.
    #[serde(default = "default_max_groups")]
    pub max_groups: usize,
    /// Values kept per percentile and rows per sliding-window group.
    #[serde(default = "default_max_samples")]
    pub max_samples: usize,
    /// The kind of the events the rule emits: `"event"` or `"alarm"`.
    #[serde(default)]
    pub output_kind: OutputKind,
}

fn default_max_groups() -> usize {
    DEFAULT_MAX_GROUPS
}

fn default_max_samples() -> usize {
    DEFAULT_MAX_SAMPLES
}

/// The kind of a rule's output events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    /// `kind = event` (normal lane).
    #[default]
    Event,
    /// `kind = alarm` (high lane).
    Alarm,
}

/// How a rule tells time.
#[derive(Debug, Clone, PartialEq)]
pub enum TimeMode {
    /// The event's receipt time; nothing is ever late.
    Processing,
    /// A payload field; events older than the latest time seen minus `watermark_ms` are
    /// late (dropped, counted).
    Event {
        /// The field's dotted path.
        path: Vec<String>,
        /// The allowed lateness.
        watermark_ms: i64,
    },
}

impl SqlConfig {
    /// Parses and checks the SQL; `key` names the component in errors.
    pub fn compile(
        &self,
        name: &str,
        context: &Context<'_>,
    ) -> Result<(plan::Plan, TimeMode), ConfigError> {
        let key = format!("transforms.{name}");
        let sql = self.sql.get_ref();
        let plan = parse::parse(sql)
            .and_then(|query| plan::plan(sql, &query))
            .map_err(|err| self.sql_error(&key, context, &err))?;
        let inputs = self.inputs.get_ref();
        if !inputs.contains(&plan.from.0) {
            let err = parse::SqlError::new(
                plan.from.1.start,
                format!(
                    "FROM {:?} is not one of the transform's inputs {inputs:?}",
                    plan.from.0
                ),
            );
            return Err(self.sql_error(&key, context, &err));
        }
        let time = match (&self.event_time, self.watermark) {
            (None, None) => TimeMode::Processing,
            (None, Some(_)) => {
                return Err(context.key_error(
                    &format!("{key}.watermark"),
                    "a watermark needs `event_time` (processing time is never late)",
                ));
            }
            (Some(field), watermark) => {
                let path = payload::split_path(field).ok_or_else(|| {
                    context.key_error(
                        &format!("{key}.event_time"),
                        format!("{field:?} is not a dotted path such as \"ts\" or \"meta.ts\""),
                    )
                })?;
                let watermark_ms = watermark.map_or(0, |watermark| {
                    i64::try_from(watermark.0.as_millis()).unwrap_or(i64::MAX)
                });
                if watermark_ms > plan::MAX_WINDOW_MS {
                    return Err(context.key_error(&format!("{key}.watermark"), "at most 31 days"));
                }
                TimeMode::Event { path, watermark_ms }
            }
        };
        for (field, value) in [
            ("max_groups", self.max_groups),
            ("max_samples", self.max_samples),
        ] {
            if value == 0 || value > MAX_LIMIT {
                return Err(context.key_error(
                    &format!("{key}.{field}"),
                    format!("must be from 1 to {MAX_LIMIT}"),
                ));
            }
        }
        Ok((plan, time))
    }

    /// A config error for a SQL error: the file line of the position, the key, and the
    /// line and column inside the SQL text.
    fn sql_error(&self, key: &str, context: &Context<'_>, err: &parse::SqlError) -> ConfigError {
        let sql = self.sql.get_ref();
        let (line, column) = err.position(sql);
        let mut error = context.error_at(
            self.sql.span(),
            &format!("{key}.sql"),
            format!("SQL error at line {line}, column {column}: {err}"),
        );
        if context.text.is_empty() {
            return error.without_line();
        }
        // A multi-line string's first line break after the quotes is not part of the value.
        let raw = context.text.get(self.sql.span()).unwrap_or_default();
        let skipped = usize::from(
            (raw.starts_with("\"\"\"") || raw.starts_with("'''"))
                && raw[3..].starts_with(['\n', '\r']),
        );
        error.line = error.line.map(|first| first + skipped + line - 1);
        error
    }
}

impl TransformSpec for SqlConfig {
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
        Ok(Arc::new(self.build_sql(name, services)?))
    }
}

impl SqlConfig {
    /// Builds the rule as its concrete type (for `fieldgate rules test`, which flushes it).
    pub fn build_sql(
        &self,
        name: &str,
        services: &TransformServices,
    ) -> Result<SqlTransform, ConfigError> {
        let (plan, time) = self.compile(name, &Context::running())?;
        Ok(SqlTransform::new(name, self, plan, time, &services.metrics))
    }
}

#[cfg(test)]
mod tests;
