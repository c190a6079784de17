//! Transforms: pure functions from one event to zero or more events, between the
//! sources and the sinks of the graph.
//!
//! A transform's config type lives in its own module and implements [`TransformSpec`];
//! adding a transform type is one module plus one line in [`TransformConfig`]'s list.
//! Payloads stay raw bytes until a transform needs a field ([`payload`]); an event no
//! transform touches is never parsed by the gateway.

pub(crate) mod alarm;
mod condition;
pub(crate) mod deadband;
pub(crate) mod dedup;
pub(crate) mod device_state;
pub(crate) mod downsample;
pub(crate) mod filter;
mod payload;
pub(crate) mod remap;
mod route;
pub(crate) mod smooth;
pub(crate) mod sql;
mod units;

use std::sync::Arc;

use fieldgate_core::Event;
use fieldgate_registry::Registry;
use toml::Spanned;

use crate::config::{ConfigError, Context};
use crate::telemetry::Metrics;

crate::config::component_types! {
    /// `[transforms.NAME]`, by `type`.
    TransformConfig: dyn TransformSpec, "transform";
    "filter" => Filter(filter::FilterConfig),
    "remap" => Remap(remap::RemapConfig),
    "route" => Route(route::RouteConfig),
    "alarm" => Alarm(alarm::AlarmConfig),
    "deadband" => Deadband(deadband::DeadbandConfig),
    "smooth" => Smooth(smooth::SmoothConfig),
    "downsample" => Downsample(downsample::DownsampleConfig),
    "dedup" => Dedup(dedup::DedupConfig),
    "sql" => Sql(sql::SqlConfig),
}

/// `state_on_change`, a key of every transform: what a stateful transform does with its
/// state when its config changed (on reload, or since the checkpoint at start-up).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateOnChange {
    /// Hand the state to the new config (when it cannot read it, it starts empty).
    #[default]
    Keep,
    /// Start empty.
    Reset,
}

/// What every transform config offers the graph.
pub trait TransformSpec {
    /// The sources and transform outputs it reads.
    fn inputs(&self) -> &Spanned<Vec<String>>;

    /// Its output ports, in the order it emits them: `""` is the default output, named
    /// by the transform's name alone; others are named `NAME.PORT`.
    fn outputs(&self) -> Vec<String> {
        vec![String::new()]
    }

    /// Checks what serde cannot (ranges, units, names).
    fn check(&self, name: &str, context: &Context<'_>) -> Result<(), ConfigError>;

    /// Builds the runtime transform (errors only for what `check` would have refused).
    fn build(
        &self,
        name: &str,
        services: &TransformServices,
    ) -> Result<Arc<dyn EventTransform>, ConfigError>;
}

/// What transforms may consult while they run.
#[derive(Clone)]
pub struct TransformServices {
    /// Registered devices, for conditions on labels.
    pub registry: Option<Arc<Registry>>,
    /// Counters of filtered events and transform errors.
    pub metrics: Arc<Metrics>,
    /// The alarms of every `alarm` transform, for the API.
    pub alarms: Arc<alarm::AlarmBoard>,
    /// What alarm actions run with; `None` where actions must not run (`rules test`).
    pub actions: Option<alarm::ActionServices>,
}

/// A running transform.
pub trait EventTransform: Send + Sync {
    /// Applies the transform to `event`, emitting what comes out.
    fn apply(&self, event: Event, out: &mut Emitted);

    /// How often the topology calls [`tick`](Self::tick); `None` (the default) for a
    /// transform that only reacts to events.
    fn tick_interval(&self) -> Option<std::time::Duration> {
        None
    }

    /// Emits what the passage of time alone produces (closed windows, missing-data
    /// alarms). `now` is wall-clock time, so tests can drive it.
    fn tick(&self, _now: std::time::SystemTime, _out: &mut Emitted) {}

    /// The transform's state for a checkpoint, or `None` when it keeps none.
    fn checkpoint(&self) -> Option<Vec<u8>> {
        None
    }

    /// Restores state written by [`checkpoint`](Self::checkpoint) of a transform with the
    /// same config; an error when the bytes cannot be read (the caller logs it and starts
    /// empty).
    fn restore(&self, _state: &[u8]) -> anyhow::Result<()> {
        Ok(())
    }
}

/// What a transform emitted for one event: events with their output port.
#[derive(Default)]
pub struct Emitted {
    events: Vec<(usize, Event)>,
}

impl Emitted {
    /// Emits `event` on output `port` (0 = the default output).
    pub fn emit(&mut self, port: usize, event: Event) {
        self.events.push((port, event));
    }

    /// Everything emitted, in order.
    pub fn into_events(self) -> Vec<(usize, Event)> {
        self.events
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! Helpers for the transform tests.

    use std::sync::Arc;

    use bytes::Bytes;
    use fieldgate_core::{DeviceId, Event, EventKind, PayloadFormat};

    use super::{Emitted, EventTransform, TransformServices, TransformSpec};
    use crate::config::Context;
    use crate::telemetry::Metrics;

    /// A telemetry event of device `d` with a JSON-format payload (possibly malformed).
    pub fn event_json(payload: &[u8]) -> Event {
        Event::new(
            DeviceId::new("d"),
            EventKind::Telemetry,
            Arc::from("src"),
            0,
            PayloadFormat::Json,
            Bytes::copy_from_slice(payload),
        )
    }

    /// Parses, checks and builds a transform config.
    pub fn build<T: TransformSpec + serde::de::DeserializeOwned>(
        text: &str,
    ) -> Arc<dyn EventTransform> {
        let spec: T = toml::from_str(text).expect("valid toml");
        let context = Context { file: "t", text };
        spec.check("t", &context).expect("valid transform");
        let services = TransformServices {
            registry: None,
            metrics: Arc::new(Metrics::new()),
            alarms: Arc::default(),
            actions: None,
        };
        spec.build("t", &services).expect("builds")
    }

    /// A telemetry event of device `device` at device time `time_ms` with a JSON payload.
    pub fn reading(device: &str, time_ms: u64, payload: &str) -> Event {
        let mut event = Event::new(
            DeviceId::new(device),
            EventKind::Telemetry,
            Arc::from("src"),
            time_ms,
            PayloadFormat::Json,
            Bytes::copy_from_slice(payload.as_bytes()),
        );
        event.device_time_ms = Some(time_ms);
        event
    }

    /// The config check's error for a transform config, as `fieldgate check` prints it.
    pub fn check_error<T: TransformSpec + serde::de::DeserializeOwned>(text: &str) -> String {
        let context = Context { file: "t", text };
        match toml::from_str::<T>(text) {
            Ok(spec) => match spec.check("t", &context) {
                Ok(()) => panic!("config accepted: {text}"),
                Err(err) => err.to_string(),
            },
            Err(err) => err.to_string(),
        }
    }

    /// Applies `transform` to one event.
    pub fn run(transform: &dyn EventTransform, event: Event) -> Vec<(usize, Event)> {
        let mut emitted = Emitted::default();
        transform.apply(event, &mut emitted);
        emitted.into_events()
    }
}
