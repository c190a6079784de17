//! `type = "alarm"`: passes its input through unchanged and adds an `alarm` event
//! (kind `alarm`, high lane) whenever a device's alarm of this rule is raised or
//! cleared. One alarm per (rule, device), raised → acknowledged (through the API) →
//! cleared; kept across restarts through the transform's checkpoint.
//!
//! The alarm event's payload (documented in docs/RULES.md, "Alarms"):
//! `{"rule", "device", "detector", "field", "state": "raised"|"cleared", "severity",
//! "value", "threshold", "since", "at", "acknowledged"}`.
//!
//! A raise or clear also feeds the rule's local actions ([`actions`]: mqtt, command,
//! webhook), queued without waiting; they run on their own tasks.

pub(crate) mod actions;
mod board;
pub(crate) mod detector;

use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fieldgate_core::{DeviceId, Event, EventKind, PayloadFormat};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use toml::Spanned;

pub use self::actions::ActionServices;
use self::actions::{ActionConfig, ActionSet, ActionStatus, Job, Transition};
pub use self::board::{
    AckError, ActionFailure, Alarm, AlarmBoard, AlarmFilter, AlarmRule, AlarmState,
};
use self::detector::{Bands, Detector, DetectorState, Side, Verdict};
use super::device_state::{
    DeviceTable, TableMetrics, check_max_devices, default_max_devices, reading_time_ms,
};
use super::{Emitted, EventTransform, TransformServices, TransformSpec, payload};
use crate::config::{ConfigError, Context, HumanDuration};
use crate::telemetry::Metrics;

/// Longest `window` (rate of change), `duration` (stuck) and `interval` (missing).
const MAX_SPAN: Duration = Duration::from_secs(7 * 24 * 3600);
/// Shortest `interval` of `missing` (it is also the tick period).
const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Largest `count` and `warmup`.
const MAX_COUNT: u64 = 1_000_000;

/// Which detector a rule runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DetectorKind {
    /// The value against limits with hysteresis.
    Threshold,
    /// The value's change per second over a window.
    RateOfChange,
    /// An EWMA z-score outlier.
    Zscore,
    /// The same value for N readings or a duration.
    Stuck,
    /// No reading for N intervals.
    Missing,
}

/// An alarm's severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Act now.
    Critical,
    /// Act soon.
    #[default]
    Major,
    /// Act eventually.
    Minor,
    /// Worth a look.
    Warning,
    /// For the record.
    Info,
}

impl Severity {
    /// The name in events, metrics and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Major => "major",
            Severity::Minor => "minor",
            Severity::Warning => "warning",
            Severity::Info => "info",
        }
    }
}

/// `[transforms.NAME]` with `type = "alarm"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlarmConfig {
    /// Sources and transform outputs to read.
    pub inputs: Spanned<Vec<String>>,
    /// The detector.
    pub detector: DetectorKind,
    /// The payload field watched, as a dotted path.
    pub field: String,
    /// The alarm's severity.
    #[serde(default)]
    pub severity: Severity,
    /// Raise above this (threshold: the value; rate_of_change: its rate per second;
    /// zscore: the absolute z-score, default 3).
    pub above: Option<f64>,
    /// Clear below this once raised by `above` (default: `above`).
    pub clear_below: Option<f64>,
    /// Raise below this.
    pub below: Option<f64>,
    /// Clear above this once raised by `below` (default: `below`).
    pub clear_above: Option<f64>,
    /// rate_of_change: the window the rate is measured over (default 60s).
    pub window: Option<HumanDuration>,
    /// zscore: weight of a new reading in the EWMA mean and variance (default 0.1).
    pub alpha: Option<f64>,
    /// zscore: readings before it judges (default 20).
    pub warmup: Option<u64>,
    /// stuck: readings in a row; missing: intervals without a reading (default 3).
    pub count: Option<u64>,
    /// stuck: time with the same value.
    pub duration: Option<HumanDuration>,
    /// missing: the devices' expected reporting interval.
    pub interval: Option<HumanDuration>,
    /// Devices tracked at most; the least recently seen is forgotten beyond.
    #[serde(default = "default_max_devices")]
    pub max_devices: usize,
    /// Local actions on raise and clear (`[[transforms.NAME.actions]]`).
    #[serde(default)]
    pub actions: Vec<ActionConfig>,
}

impl AlarmConfig {
    /// The detector this config describes, or the first key that is wrong.
    fn compile(&self, name: &str, context: &Context<'_>) -> Result<Detector, ConfigError> {
        let key = |key: &str| format!("transforms.{name}.{key}");
        let err = |name: &str, message: String| context.key_error(&key(name), message);
        let detector_name = match self.detector {
            DetectorKind::Threshold => "threshold",
            DetectorKind::RateOfChange => "rate_of_change",
            DetectorKind::Zscore => "zscore",
            DetectorKind::Stuck => "stuck",
            DetectorKind::Missing => "missing",
        };
        if payload::split_path(&self.field).is_none() {
            return Err(err(
                "field",
                format!(
                    "{:?} is not a field path: use dotted names such as \"temp\" or \"env.temp\"",
                    self.field
                ),
            ));
        }
        check_max_devices(name, self.max_devices, context)?;
        for (field, value) in [
            ("above", self.above),
            ("clear_below", self.clear_below),
            ("below", self.below),
            ("clear_above", self.clear_above),
            ("alpha", self.alpha),
        ] {
            if value.is_some_and(|value| !value.is_finite()) {
                return Err(err(field, "must be a finite number".into()));
            }
        }
        // Keys that mean nothing to this detector are refused, not ignored.
        let allowed: &[&str] = match self.detector {
            DetectorKind::Threshold => &["above", "clear_below", "below", "clear_above"],
            DetectorKind::RateOfChange => {
                &["above", "clear_below", "below", "clear_above", "window"]
            }
            DetectorKind::Zscore => &["above", "clear_below", "alpha", "warmup"],
            DetectorKind::Stuck => &["count", "duration"],
            DetectorKind::Missing => &["count", "interval"],
        };
        let given = [
            ("above", self.above.is_some()),
            ("clear_below", self.clear_below.is_some()),
            ("below", self.below.is_some()),
            ("clear_above", self.clear_above.is_some()),
            ("window", self.window.is_some()),
            ("alpha", self.alpha.is_some()),
            ("warmup", self.warmup.is_some()),
            ("count", self.count.is_some()),
            ("duration", self.duration.is_some()),
            ("interval", self.interval.is_some()),
        ];
        for (field, set) in given {
            if set && !allowed.contains(&field) {
                return Err(err(
                    field,
                    format!("does not apply to detector = {detector_name:?}"),
                ));
            }
        }
        let span = |field: &str, value: Option<HumanDuration>, default: Option<Duration>| {
            let value = value.map(|value| value.0).or(default);
            match value {
                Some(value) if value.is_zero() || value > MAX_SPAN => {
                    Err(err(field, "must be above 0 and at most 7 days".into()))
                }
                Some(value) => Ok(Some(u64::try_from(value.as_millis()).unwrap_or(u64::MAX))),
                None => Ok(None),
            }
        };
        let count = |default: Option<u64>, min: u64| match self.count.or(default) {
            Some(count) if count < min || count > MAX_COUNT => Err(err(
                "count",
                format!("must be between {min} and {MAX_COUNT}"),
            )),
            other => Ok(other),
        };
        Ok(match self.detector {
            DetectorKind::Threshold => Detector::Threshold(self.bands(&err, None)?),
            DetectorKind::RateOfChange => Detector::RateOfChange {
                window_ms: span("window", self.window, Some(Duration::from_secs(60)))?
                    .unwrap_or(60_000),
                bands: self.bands(&err, None)?,
            },
            DetectorKind::Zscore => {
                let alpha = self.alpha.unwrap_or(0.1);
                if !(alpha > 0.0 && alpha <= 1.0) {
                    return Err(err("alpha", "must be above 0 and at most 1".into()));
                }
                let warmup = self.warmup.unwrap_or(20);
                if warmup > MAX_COUNT {
                    return Err(err("warmup", format!("must be at most {MAX_COUNT}")));
                }
                let bands = self.bands(&err, Some(3.0))?;
                if bands.high.is_some_and(|(above, _)| above <= 0.0) {
                    return Err(err("above", "a z-score limit must be above 0".into()));
                }
                Detector::Zscore {
                    alpha,
                    warmup,
                    bands,
                }
            }
            DetectorKind::Stuck => {
                let count = count(None, 2)?;
                let duration_ms = span("duration", self.duration, None)?;
                if count.is_none() && duration_ms.is_none() {
                    return Err(err(
                        "count",
                        "detector = \"stuck\" needs `count` (readings) or `duration`".into(),
                    ));
                }
                Detector::Stuck { count, duration_ms }
            }
            DetectorKind::Missing => {
                let Some(interval) = self.interval else {
                    return Err(err(
                        "interval",
                        "detector = \"missing\" needs the devices' reporting `interval`".into(),
                    ));
                };
                if interval.0 < MIN_INTERVAL {
                    return Err(err("interval", "must be at least 100ms".into()));
                }
                Detector::Missing {
                    interval_ms: span("interval", Some(interval), None)?.unwrap_or(1000),
                    count: count(Some(3), 1)?.unwrap_or(3),
                }
            }
        })
    }

    /// The limits, each clear limit defaulting to its raise limit; `default_above` for
    /// detectors with a natural upper limit.
    fn bands(
        &self,
        err: &dyn Fn(&str, String) -> ConfigError,
        default_above: Option<f64>,
    ) -> Result<Bands, ConfigError> {
        let above = self.above.or(if self.below.is_none() {
            default_above
        } else {
            None
        });
        if above.is_none() && self.clear_below.is_some() {
            return Err(err("clear_below", "needs `above`".into()));
        }
        if self.below.is_none() && self.clear_above.is_some() {
            return Err(err("clear_above", "needs `below`".into()));
        }
        let high = match above {
            Some(above) => {
                let clear_below = self.clear_below.unwrap_or(above);
                if clear_below > above {
                    return Err(err(
                        "clear_below",
                        format!(
                            "{clear_below} is above `above` ({above}): the alarm would clear while still raised"
                        ),
                    ));
                }
                Some((above, clear_below))
            }
            None => None,
        };
        let low = match self.below {
            Some(below) => {
                let clear_above = self.clear_above.unwrap_or(below);
                if clear_above < below {
                    return Err(err(
                        "clear_above",
                        format!(
                            "{clear_above} is below `below` ({below}): the alarm would clear while still raised"
                        ),
                    ));
                }
                Some((below, clear_above))
            }
            None => None,
        };
        if let (Some((above, _)), Some((below, _))) = (high, low) {
            if below >= above {
                return Err(err("below", format!("must be below `above` ({above})")));
            }
        }
        if high.is_none() && low.is_none() {
            return Err(err("above", "needs `above` or `below`".into()));
        }
        Ok(Bands { high, low })
    }
}

impl TransformSpec for AlarmConfig {
    fn inputs(&self) -> &Spanned<Vec<String>> {
        &self.inputs
    }

    fn check(&self, name: &str, context: &Context<'_>) -> Result<(), ConfigError> {
        self.compile(name, context)?;
        actions::config::compile(name, &self.actions, context).map(drop)
    }

    fn build(
        &self,
        name: &str,
        services: &TransformServices,
    ) -> Result<Arc<dyn EventTransform>, ConfigError> {
        let detector = self.compile(name, &Context::running())?;
        let plans = actions::config::compile(name, &self.actions, &Context::running())?;
        let rule_name: Arc<str> = Arc::from(name);
        let status = Arc::new(ActionStatus::new(self.max_devices));
        let actions = ActionSet::start(
            &rule_name,
            self.severity.as_str(),
            plans,
            services.actions.as_ref(),
            &services.metrics,
            Arc::clone(&status),
        );
        let labels = Metrics::alarm(name, self.severity.as_str());
        let metrics = &services.metrics;
        let rule = Arc::new(AlarmTransform {
            name: rule_name,
            actions,
            action_status: status,
            field: self.field.clone(),
            path: payload::split_path(&self.field).unwrap_or_default(),
            severity: self.severity,
            detector,
            table: Mutex::new(DeviceTable::new(
                self.max_devices,
                TableMetrics::new(metrics, name),
            )),
            raised: metrics.alarms_raised.get_or_create(&labels).clone(),
            cleared: metrics.alarms_cleared.get_or_create(&labels).clone(),
            active: metrics.alarms_active.get_or_create(&labels).clone(),
            mine: std::sync::atomic::AtomicI64::new(0),
        });
        let weak: Weak<dyn AlarmRule> = Arc::downgrade(&rule) as Weak<AlarmTransform>;
        services.alarms.attach(name, weak);
        Ok(rule)
    }
}

/// One device's state under a rule (checkpointed).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct DeviceAlarm {
    detector: DetectorState,
    /// Wall-clock receipt of the newest reading, ms (for `missing`).
    #[serde(default)]
    last_heard_ms: u64,
    /// The side that raised the active alarm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    side: Option<Side>,
    /// The device's alarm: active, or the last one cleared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    alarm: Option<AlarmRecord>,
}

/// The persistent part of an alarm (the rule's fixed parts come from its config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct AlarmRecord {
    state: AlarmState,
    value: Option<f64>,
    threshold: Option<f64>,
    since: u64,
    acknowledged_at: Option<u64>,
    cleared_at: Option<u64>,
}

struct AlarmTransform {
    name: Arc<str>,
    /// The rule's local actions, fed on raise and clear.
    actions: ActionSet,
    /// The actions' last failures per device, shown with the alarm.
    action_status: Arc<ActionStatus>,
    field: String,
    path: Vec<String>,
    severity: Severity,
    detector: Detector,
    table: Mutex<DeviceTable<DeviceAlarm>>,
    raised: Counter,
    cleared: Counter,
    /// `fieldgate_alarms_active`, shared by every instance of the rule across reloads:
    /// each instance adds exactly its own active alarms (`mine`) and takes them back when
    /// it is dropped, so a replaced or removed rule leaves the gauge right.
    active: Gauge,
    mine: std::sync::atomic::AtomicI64,
}

impl AlarmTransform {
    fn lock(&self) -> std::sync::MutexGuard<'_, DeviceTable<DeviceAlarm>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn view(&self, device: &DeviceId, record: &AlarmRecord) -> Alarm {
        Alarm {
            rule: self.name.to_string(),
            device: device.as_str().to_owned(),
            detector: self.detector.name().to_owned(),
            field: self.field.clone(),
            severity: self.severity.as_str().to_owned(),
            state: record.state,
            value: record.value,
            threshold: record.threshold,
            since: record.since,
            acknowledged_at: record.acknowledged_at,
            cleared_at: record.cleared_at,
            action_errors: self.action_status.of(device),
        }
    }

    /// Applies `verdict` to `entry`, emitting the alarm event on port 0.
    fn decide(
        &self,
        device: &DeviceId,
        entry: &mut DeviceAlarm,
        verdict: Verdict,
        at_ms: u64,
        out: &mut Emitted,
    ) {
        let record = match verdict {
            Verdict::Raise {
                value,
                threshold,
                side,
            } => {
                entry.side = Some(side);
                self.raised.inc();
                self.count_active(1);
                AlarmRecord {
                    state: AlarmState::Raised,
                    value,
                    threshold,
                    since: at_ms,
                    acknowledged_at: None,
                    cleared_at: None,
                }
            }
            Verdict::Clear { value, threshold } => {
                entry.side = None;
                let Some(previous) = entry.alarm.take() else {
                    return;
                };
                self.cleared.inc();
                self.count_active(-1);
                AlarmRecord {
                    state: AlarmState::Cleared,
                    value,
                    threshold,
                    cleared_at: Some(at_ms),
                    ..previous
                }
            }
        };
        let transition = if record.state.is_active() {
            Transition::Raise
        } else {
            Transition::Clear
        };
        let alarm = self.view(device, &record);
        entry.alarm = Some(record);
        let event = self.event(device, &alarm, at_ms);
        if !self.actions.is_empty() {
            self.actions.fire(&Job {
                transition,
                device: device.clone(),
                payload: event.payload.clone(),
                at_ms,
            });
        }
        out.emit(0, event);
    }

    fn event(&self, device: &DeviceId, alarm: &Alarm, at_ms: u64) -> Event {
        let payload = serde_json::json!({
            "rule": alarm.rule,
            "device": alarm.device,
            "detector": alarm.detector,
            "field": alarm.field,
            "state": if alarm.state.is_active() { "raised" } else { "cleared" },
            "severity": alarm.severity,
            "value": alarm.value,
            "threshold": alarm.threshold,
            "since": alarm.since,
            "at": at_ms,
            "acknowledged": alarm.acknowledged_at.is_some(),
        });
        let mut event = Event::new(
            device.clone(),
            EventKind::Alarm,
            Arc::clone(&self.name),
            crate::clock::now_ms(),
            PayloadFormat::Json,
            Bytes::from(serde_json::to_vec(&payload).unwrap_or_default()),
        );
        event.device_time_ms = Some(at_ms);
        event
    }

    /// Adds `change` active alarms to this instance's share of the gauge.
    fn count_active(&self, change: i64) {
        self.mine
            .fetch_add(change, std::sync::atomic::Ordering::Relaxed);
        self.active.inc_by(change);
    }

    /// Sets this instance's share to the active alarms in `table`.
    fn recount(&self, table: &DeviceTable<DeviceAlarm>) {
        let active = table
            .iter()
            .filter(|(_, entry)| entry.side.is_some())
            .count();
        let active = i64::try_from(active).unwrap_or(i64::MAX);
        let before = self.mine.swap(active, std::sync::atomic::Ordering::Relaxed);
        self.active.inc_by(active - before);
    }
}

impl Drop for AlarmTransform {
    fn drop(&mut self) {
        self.active
            .dec_by(self.mine.load(std::sync::atomic::Ordering::Relaxed));
    }
}

impl EventTransform for AlarmTransform {
    fn apply(&self, event: Event, out: &mut Emitted) {
        // Our own alarm events (a rule reading another rule's output) are not readings.
        if event.kind != EventKind::Alarm {
            let value =
                payload::parse(&event).and_then(|value| payload::get(&value, &self.path).cloned());
            if let Some(value) = value {
                let time_ms = reading_time_ms(&event);
                let mut table = self.lock();
                let mut evicted_active = 0;
                let entry = table.entry(&event.device, DeviceAlarm::default, |gone| {
                    evicted_active += i64::from(gone.side.is_some());
                });
                entry.last_heard_ms = entry.last_heard_ms.max(event.received_at_ms);
                if let Some(verdict) =
                    self.detector
                        .reading(&mut entry.detector, time_ms, &value, entry.side)
                {
                    self.decide(&event.device, entry, verdict, time_ms, out);
                }
                if evicted_active > 0 {
                    self.count_active(-evicted_active);
                }
            }
        }
        out.emit(0, event);
    }

    fn tick_interval(&self) -> Option<Duration> {
        match self.detector {
            Detector::Missing { interval_ms, .. } => {
                Some(Duration::from_millis(interval_ms.max(100)))
            }
            _ => None,
        }
    }

    fn tick(&self, now: SystemTime, out: &mut Emitted) {
        let now_ms = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            });
        let mut table = self.lock();
        for (device, entry) in table.iter_mut() {
            if let Some(verdict) = self
                .detector
                .silence(entry.last_heard_ms, now_ms, entry.side)
            {
                self.decide(device, entry, verdict, now_ms, out);
            }
        }
    }

    fn checkpoint(&self) -> Option<Vec<u8>> {
        Some(self.lock().checkpoint())
    }

    fn restore(&self, state: &[u8]) -> anyhow::Result<()> {
        let mut table = self.lock();
        table.restore(state)?;
        // A device's silence is counted from the restart, not across the downtime.
        let now_ms = crate::clock::now_ms();
        for (_, entry) in table.iter_mut() {
            entry.last_heard_ms = entry.last_heard_ms.max(now_ms);
        }
        self.recount(&table);
        Ok(())
    }
}

impl AlarmRule for AlarmTransform {
    fn alarms(&self) -> Vec<Alarm> {
        let table = self.lock();
        table
            .iter()
            .filter_map(|(device, entry)| Some(self.view(device, entry.alarm.as_ref()?)))
            .collect()
    }

    fn acknowledge(&self, device: &str, now_ms: u64) -> Result<Alarm, AckError> {
        let id = DeviceId::new(device);
        let mut table = self.lock();
        let no_alarm = || AckError::NoAlarm {
            rule: self.name.to_string(),
            device: device.to_owned(),
        };
        let record = table
            .get_mut(&id)
            .and_then(|entry| entry.alarm.as_mut())
            .ok_or_else(no_alarm)?;
        match record.state {
            AlarmState::Cleared => Err(AckError::Cleared {
                rule: self.name.to_string(),
                device: device.to_owned(),
            }),
            AlarmState::Acknowledged => Ok(self.view(&id, record)),
            AlarmState::Raised => {
                record.state = AlarmState::Acknowledged;
                record.acknowledged_at = Some(now_ms);
                Ok(self.view(&id, record))
            }
        }
    }
}

#[cfg(test)]
mod tests;
