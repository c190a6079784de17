//! `type = "route"`: sends each event to every named output whose condition it meets
//! (`NAME.OUTPUT` in a later `inputs`), or to `NAME._unmatched` when it meets none.

use std::collections::BTreeMap;
use std::sync::Arc;

use fieldgate_core::Event;
use fieldgate_registry::Registry;
use serde::Deserialize;
use toml::Spanned;

use super::condition::{Condition, ConditionConfig, LazyPayload};
use super::{Emitted, EventTransform, TransformServices, TransformSpec};
use crate::config::{ConfigError, Context};

/// The output of events that meet no route.
pub const UNMATCHED: &str = "_unmatched";

/// `[transforms.NAME]` with `type = "route"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Sources and transform outputs to read.
    pub inputs: Spanned<Vec<String>>,
    /// Output name → the condition an event must meet to take it.
    pub routes: BTreeMap<String, ConditionConfig>,
}

impl TransformSpec for RouteConfig {
    fn inputs(&self) -> &Spanned<Vec<String>> {
        &self.inputs
    }

    fn outputs(&self) -> Vec<String> {
        self.routes
            .keys()
            .cloned()
            .chain([UNMATCHED.to_owned()])
            .collect()
    }

    fn check(&self, name: &str, context: &Context<'_>) -> Result<(), ConfigError> {
        if self.routes.is_empty() {
            return Err(context.key_error(
                &format!("transforms.{name}.routes"),
                "a route transform needs at least one route",
            ));
        }
        for (output, condition) in &self.routes {
            let key = format!("transforms.{name}.routes.{output}");
            let valid = !output.is_empty()
                && !output.starts_with('_')
                && output
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c));
            if !valid {
                return Err(context.key_error(
                    &key,
                    format!(
                        "invalid output name {output:?}: use A-Z a-z 0-9 - _, not starting with _"
                    ),
                ));
            }
            condition.compile(&key, context)?;
        }
        Ok(())
    }

    fn build(
        &self,
        name: &str,
        services: &TransformServices,
    ) -> Result<Arc<dyn EventTransform>, ConfigError> {
        let context = Context::running();
        let routes = self
            .routes
            .iter()
            .map(|(output, condition)| {
                condition.compile(&format!("transforms.{name}.routes.{output}"), &context)
            })
            .collect::<Result<_, _>>()?;
        Ok(Arc::new(Route {
            routes,
            registry: services.registry.clone(),
        }))
    }
}

struct Route {
    /// In output order; `_unmatched` is the port after the last.
    routes: Vec<Condition>,
    registry: Option<Arc<Registry>>,
}

impl EventTransform for Route {
    fn apply(&self, event: Event, out: &mut Emitted) {
        let mut payload = LazyPayload::default();
        let matched: Vec<usize> = self
            .routes
            .iter()
            .enumerate()
            .filter(|(_, condition)| {
                condition.matches(&event, &mut payload, self.registry.as_deref())
            })
            .map(|(port, _)| port)
            .collect();
        match matched.split_last() {
            None => out.emit(self.routes.len(), event),
            Some((&last, rest)) => {
                for &port in rest {
                    out.emit(port, event.clone());
                }
                out.emit(last, event);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transforms::tests::{build, event_json, run};

    #[test]
    fn every_matching_route_gets_a_copy_and_the_rest_is_unmatched() {
        let config = r#"
            inputs = ["d"]
            [routes.eu]
            field = "region"
            eq = "eu"
            [routes.hot]
            field = "temp"
            gt = 30
        "#;
        let spec: RouteConfig = toml::from_str(config).expect("valid");
        assert_eq!(spec.outputs(), ["eu", "hot", UNMATCHED]);
        let route = build::<RouteConfig>(config);
        let ports = |payload: &[u8]| -> Vec<usize> {
            run(&*route, event_json(payload))
                .into_iter()
                .map(|(port, _)| port)
                .collect()
        };
        assert_eq!(ports(br#"{"region":"eu","temp":31}"#), [0, 1]);
        assert_eq!(ports(br#"{"region":"us","temp":31}"#), [1]);
        assert_eq!(ports(br#"{"region":"us","temp":1}"#), [2]);
        assert_eq!(ports(b"binary\x00"), [2]);
    }
}
