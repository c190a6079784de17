//! `type = "filter"`: keeps the events that meet a condition, drops (and counts) the rest.

use std::sync::Arc;

use fieldgate_core::Event;
use fieldgate_registry::Registry;
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use toml::Spanned;

use super::condition::{Condition, ConditionConfig, LazyPayload};
use super::{Emitted, EventTransform, TransformServices, TransformSpec};
use crate::config::{ConfigError, Context};

/// `[transforms.NAME]` with `type = "filter"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Sources and transform outputs to read.
    pub inputs: Spanned<Vec<String>>,
    /// What an event must meet to pass.
    pub condition: ConditionConfig,
    /// Drop the events that meet the condition instead, and keep the rest.
    #[serde(default)]
    pub invert: bool,
}

impl TransformSpec for FilterConfig {
    fn inputs(&self) -> &Spanned<Vec<String>> {
        &self.inputs
    }

    fn check(&self, name: &str, context: &Context<'_>) -> Result<(), ConfigError> {
        self.condition
            .compile(&format!("transforms.{name}.condition"), context)
            .map(drop)
    }

    fn build(
        &self,
        name: &str,
        services: &TransformServices,
    ) -> Result<Arc<dyn EventTransform>, ConfigError> {
        Ok(Arc::new(Filter {
            condition: self
                .condition
                .compile(&format!("transforms.{name}.condition"), &Context::running())?,
            invert: self.invert,
            registry: services.registry.clone(),
            filtered: services.metrics.filtered(name),
        }))
    }
}

struct Filter {
    condition: Condition,
    invert: bool,
    registry: Option<Arc<Registry>>,
    filtered: Counter,
}

impl EventTransform for Filter {
    fn apply(&self, event: Event, out: &mut Emitted) {
        let meets = self.condition.matches(
            &event,
            &mut LazyPayload::default(),
            self.registry.as_deref(),
        );
        if meets != self.invert {
            out.emit(0, event);
        } else {
            self.filtered.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transforms::tests::{build, event_json, run};

    #[test]
    fn keeps_what_meets_the_condition() {
        let filter =
            build::<FilterConfig>("inputs = [\"d\"]\ncondition = { field = \"temp\", gt = 30 }");
        assert_eq!(run(&*filter, event_json(br#"{"temp":31}"#)).len(), 1);
        assert_eq!(run(&*filter, event_json(br#"{"temp":29}"#)).len(), 0);
        assert_eq!(run(&*filter, event_json(b"not json")).len(), 0);
    }

    #[test]
    fn invert_drops_what_meets_the_condition() {
        let filter = build::<FilterConfig>(
            "inputs = [\"d\"]\ninvert = true\ncondition = { field = \"debug\", exists = true }",
        );
        assert_eq!(run(&*filter, event_json(br#"{"debug":1}"#)).len(), 0);
        assert_eq!(run(&*filter, event_json(br#"{"temp":1}"#)).len(), 1);
        assert_eq!(run(&*filter, event_json(b"\xff\xfe")).len(), 1);
    }
}
