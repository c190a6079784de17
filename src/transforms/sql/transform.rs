//! The running rule: evaluates the plan per event, keeps the window state behind a mutex
//! (never held across `.await`: everything here is synchronous), closes windows on events
//! and ticks, and checkpoints/restores that state as JSON.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fieldgate_core::{DeviceId, Event, EventKind, PayloadFormat};
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::expr::{Expr, Scope};
use super::plan::{Output, Plan, WindowPlan};
use super::value::Value;
use super::window::{Closed, Limits, Overflows, WindowState};
use super::{OutputKind, SqlConfig, TimeMode};
use crate::telemetry::Metrics;
use crate::transforms::{Emitted, EventTransform, payload};

/// Version of the checkpoint format.
const CHECKPOINT_VERSION: u32 = 1;

/// Shortest and longest tick interval.
const MIN_TICK: Duration = Duration::from_millis(10);
const MAX_TICK: Duration = Duration::from_secs(1);

/// Why a checkpoint could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Not a checkpoint of this format.
    #[error("rule {rule:?}: unreadable state: {source}")]
    Malformed {
        /// The transform.
        rule: String,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// Written by another version of the format.
    #[error("rule {rule:?}: state format version {found}, expected {CHECKPOINT_VERSION}")]
    Version {
        /// The transform.
        rule: String,
        /// The version found.
        found: u32,
    },
    /// Written by a rule with other SQL or time settings.
    #[error("rule {rule:?}: the state belongs to a different SQL or time setting")]
    OtherRule {
        /// The transform.
        rule: String,
    },
}

/// The `reason` labels a rule counts in `fieldgate_transform_errors_total`.
pub const ERROR_REASONS: &[&str] = &[
    "late",
    "no_event_time",
    "not_json",
    "group_overflow",
    "sample_overflow",
];

/// The error counters of one rule (`fieldgate_transform_errors_total{transform,reason}`).
struct Counters {
    filtered: Counter,
    late: Counter,
    no_event_time: Counter,
    not_json: Counter,
    group_overflow: Counter,
    sample_overflow: Counter,
}

/// A running `type = "sql"` transform.
pub struct SqlTransform {
    name: Arc<str>,
    plan: Plan,
    time: TimeMode,
    limits: Limits,
    kind: EventKind,
    /// What a checkpoint must have been written by: the SQL and time settings.
    fingerprint: String,
    state: Mutex<WindowState>,
    counters: Counters,
}

#[derive(Serialize)]
struct CheckpointRef<'a> {
    version: u32,
    rule: &'a str,
    state: &'a WindowState,
}

#[derive(Deserialize)]
struct Checkpoint {
    version: u32,
    rule: String,
    state: WindowState,
}

impl SqlTransform {
    /// A rule named `name` running `plan`.
    pub fn new(
        name: &str,
        config: &SqlConfig,
        plan: Plan,
        time: TimeMode,
        metrics: &Metrics,
    ) -> Self {
        let fingerprint = format!(
            "{}\n{:?}\n{:?}",
            config.sql.get_ref(),
            config.event_time,
            config.watermark.map(|watermark| watermark.0)
        );
        Self {
            name: Arc::from(name),
            plan,
            time,
            limits: Limits {
                max_groups: config.max_groups,
                max_samples: config.max_samples,
            },
            kind: match config.output_kind {
                OutputKind::Event => EventKind::Event,
                OutputKind::Alarm => EventKind::Alarm,
            },
            fingerprint,
            state: Mutex::new(WindowState::default()),
            counters: Counters {
                filtered: metrics.filtered(name),
                late: metrics.transform_error(name, "late"),
                no_event_time: metrics.transform_error(name, "no_event_time"),
                not_json: metrics.transform_error(name, "not_json"),
                group_overflow: metrics.transform_error(name, "group_overflow"),
                sample_overflow: metrics.transform_error(name, "sample_overflow"),
            },
        }
    }

    /// The stream its `FROM` names.
    pub fn from(&self) -> &str {
        &self.plan.from.0
    }

    fn state(&self) -> MutexGuard<'_, WindowState> {
        // A panic while holding the lock cannot leave the state half-updated in a way
        // that matters more than losing it: keep going with what is there.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn watermark_delay(&self) -> i64 {
        match &self.time {
            TimeMode::Processing => 0,
            TimeMode::Event { watermark_ms, .. } => *watermark_ms,
        }
    }

    /// Closes every open time window and session now, whatever the time: the end of a
    /// recorded input in `fieldgate rules test`.
    pub fn flush(&self, out: &mut Emitted) {
        let Output::Window(plan) = &self.plan.output else {
            return;
        };
        let mut closed = Vec::new();
        let clock = {
            let mut state = self.state();
            state.flush(plan, &mut closed);
            state.clock
        };
        self.emit_closed(plan, closed, clock, out);
    }

    /// Turns closed groups into output events.
    fn emit_closed(
        &self,
        plan: &WindowPlan,
        closed: Vec<Closed>,
        clock: Option<i64>,
        out: &mut Emitted,
    ) {
        for group in closed {
            let now_ms = clock.unwrap_or(group.window.1).max(group.window.1);
            let scope = Scope {
                event: None,
                payload: None,
                keys: &group.keys,
                aggregates: &group.results,
                window: group.window,
                now_ms,
            };
            if let Some(having) = &plan.having {
                if !having.eval(&scope).is_true() {
                    continue;
                }
            }
            let device = plan
                .device_key
                .and_then(|index| group.keys.get(index))
                .and_then(Value::to_text)
                .map_or_else(|| DeviceId::new(&self.name), |text| DeviceId::new(&text));
            let time = u64::try_from(group.window.1).unwrap_or(0);
            out.emit(0, self.output_event(device, time, &plan.columns, &scope));
        }
    }

    fn output_event(
        &self,
        device: DeviceId,
        time_ms: u64,
        columns: &[(String, Expr)],
        scope: &Scope<'_>,
    ) -> Event {
        let mut object = serde_json::Map::with_capacity(columns.len());
        for (name, expr) in columns {
            object.insert(name.clone(), expr.eval(scope).to_json());
        }
        // A map of JSON values always serializes.
        let payload = serde_json::to_vec(&Json::Object(object)).unwrap_or_default();
        Event::new(
            device,
            self.kind,
            self.name.clone(),
            time_ms,
            PayloadFormat::Json,
            Bytes::from(payload),
        )
    }

    /// The event's time for the rule, epoch ms; `None` when its event-time field is
    /// missing or unreadable.
    fn event_time(&self, event: &Event, parsed: Option<&Json>) -> Option<i64> {
        match &self.time {
            TimeMode::Processing => Some(i64::try_from(event.received_at_ms).unwrap_or(i64::MAX)),
            TimeMode::Event { path, .. } => parsed
                .and_then(|json| payload::get(json, path))
                .and_then(time_of),
        }
    }
}

/// An event-time field's value: epoch ms (a number) or an RFC 3339 string.
pub fn time_of(value: &Json) -> Option<i64> {
    match value {
        Json::Number(number) => {
            let ms = number.as_f64()?;
            // Finite and within ±2^62 ms: the conversion is exact enough and cannot wrap.
            #[allow(clippy::cast_possible_truncation, reason = "range checked")]
            (ms.is_finite() && ms.abs() < 4.6e18).then_some(ms as i64)
        }
        Json::String(text) => {
            let time = humantime::parse_rfc3339_weak(text).ok()?;
            let ms = time.duration_since(UNIX_EPOCH).ok()?.as_millis();
            i64::try_from(ms).ok()
        }
        _ => None,
    }
}

fn epoch_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |elapsed| {
        i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
    })
}

impl EventTransform for SqlTransform {
    fn apply(&self, event: Event, out: &mut Emitted) {
        let event_time = matches!(self.time, TimeMode::Event { .. });
        let parsed = if self.plan.needs_payload || event_time {
            let parsed = payload::parse(&event);
            if parsed.is_none() {
                self.counters.not_json.inc();
            }
            parsed
        } else {
            None
        };
        let Some(time) = self.event_time(&event, parsed.as_ref()) else {
            self.counters.no_event_time.inc();
            return;
        };
        let received = i64::try_from(event.received_at_ms).unwrap_or(i64::MAX);
        let scope = Scope {
            event: Some(&event),
            payload: parsed.as_ref(),
            keys: &[],
            aggregates: &[],
            window: (0, 0),
            now_ms: received,
        };
        if let Some(filter) = &self.plan.filter {
            if !filter.eval(&scope).is_true() {
                self.counters.filtered.inc();
                return;
            }
        }
        match &self.plan.output {
            Output::PassThrough => out.emit(0, event),
            Output::Project(columns) => {
                let mut projected =
                    self.output_event(event.device.clone(), event.received_at_ms, columns, &scope);
                projected.device_time_ms = event.device_time_ms;
                out.emit(0, projected);
            }
            Output::Window(plan) => {
                let keys = plan
                    .keys
                    .iter()
                    .map(|key| key.eval(&scope).into_owned())
                    .collect();
                let args: Vec<Value<'_>> = plan
                    .aggregates
                    .iter()
                    .map(|(_, arg)| arg.as_ref().map_or(Value::Null, |arg| arg.eval(&scope)))
                    .collect();
                let delay = self.watermark_delay();
                let mut closed = Vec::new();
                let mut overflows = Overflows::default();
                let clock = {
                    let mut state = self.state();
                    let time = match (&self.time, state.clock) {
                        // Processing time: an event is never older than the rule's clock.
                        (TimeMode::Processing, Some(clock)) => time.max(clock),
                        (TimeMode::Event { .. }, Some(clock))
                            if time < clock.saturating_sub(delay) =>
                        {
                            drop(state);
                            self.counters.late.inc();
                            return;
                        }
                        _ => time,
                    };
                    let clock = state.clock.map_or(time, |clock| clock.max(time));
                    state.clock = Some(clock);
                    let watermark = clock.saturating_sub(delay);
                    state.advance(plan, watermark, &mut closed);
                    state.add(
                        plan,
                        self.limits,
                        watermark,
                        time,
                        keys,
                        &args,
                        &mut overflows,
                        &mut closed,
                    );
                    clock
                };
                self.counters.group_overflow.inc_by(overflows.groups);
                self.counters.sample_overflow.inc_by(overflows.samples);
                self.emit_closed(plan, closed, Some(clock), out);
            }
        }
    }

    fn tick_interval(&self) -> Option<Duration> {
        let Output::Window(plan) = &self.plan.output else {
            return None;
        };
        if !matches!(self.time, TimeMode::Processing) {
            return None;
        }
        let shortest = u64::try_from(plan.window.shortest_ms()?).unwrap_or(u64::MAX);
        Some((Duration::from_millis(shortest) / 10).clamp(MIN_TICK, MAX_TICK))
    }

    fn tick(&self, now: SystemTime, out: &mut Emitted) {
        let Output::Window(plan) = &self.plan.output else {
            return;
        };
        if !matches!(self.time, TimeMode::Processing) {
            return;
        }
        let now = epoch_ms(now);
        let mut closed = Vec::new();
        let clock = {
            let mut state = self.state();
            let clock = state.clock.map_or(now, |clock| clock.max(now));
            state.clock = Some(clock);
            state.advance(plan, clock, &mut closed);
            clock
        };
        self.emit_closed(plan, closed, Some(clock), out);
    }

    fn checkpoint(&self) -> Option<Vec<u8>> {
        if !matches!(self.plan.output, Output::Window(_)) {
            return None;
        }
        let state = self.state();
        let checkpoint = CheckpointRef {
            version: CHECKPOINT_VERSION,
            rule: &self.fingerprint,
            state: &state,
        };
        // Plain data with string-free map keys: serializing cannot fail.
        serde_json::to_vec(&checkpoint).ok()
    }

    fn restore(&self, state: &[u8]) -> anyhow::Result<()> {
        let rule = self.name.to_string();
        let checkpoint: Checkpoint =
            serde_json::from_slice(state).map_err(|source| RestoreError::Malformed {
                rule: rule.clone(),
                source,
            })?;
        if checkpoint.version != CHECKPOINT_VERSION {
            return Err(RestoreError::Version {
                rule,
                found: checkpoint.version,
            }
            .into());
        }
        if checkpoint.rule != self.fingerprint {
            return Err(RestoreError::OtherRule { rule }.into());
        }
        *self.state() = checkpoint.state;
        Ok(())
    }
}
