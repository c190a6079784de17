//! The component graph: sources → transforms → sinks, typed from the config and checked
//! as a whole, then compiled into each source's routing tree.
//!
//! Rules `check` enforces: names are unique across kinds; every input names a source, a
//! transform (its default output) or a transform output (`NAME.OUTPUT`); no cycles;
//! every sink's inputs can produce events (a sink that is only another's `failover` may
//! have none); `failover` names another sink without a failover of its own; every
//! source and every transform's output is read by something (its events would be lost
//! otherwise), except the built-in sources (`http`, `commands`) and the named outputs of
//! a `route`; and the largest event of every source upstream of a sink (or of a sink it
//! is the failover of) fits that sink's buffer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::api::ingest::HTTP_SOURCE;
use crate::config::HumanDuration;
use crate::config::{self, ComponentTables, ConfigError, Context, ListenerClaims, Settings};
use crate::pipeline::{FailoverRoute, FailoverSwitch, Intake, Target, TransformNode};
use crate::sinks::SinkConfig;
use crate::sinks::failover::FailoverConfig;
use crate::sources::SourceConfig;
use crate::sources::commands::{COMMANDS_SOURCE, CommandsSourceConfig};
use crate::sources::http::HttpSourceConfig;
use crate::transforms::{EventTransform, StateOnChange, TransformConfig, TransformServices};

/// The whole running config: gateway-wide settings plus the component graph.
pub type Config = config::Config<Components>;

/// The components of a config, typed by kind.
#[derive(Debug, Clone, PartialEq)]
pub struct Components {
    /// `[sources.*]`, plus the built-in `http` and `commands` sources of `[registry]`.
    pub sources: BTreeMap<String, SourceConfig>,
    /// `[transforms.*]`.
    pub transforms: BTreeMap<String, TransformConfig>,
    /// `[sinks.*]`.
    pub sinks: BTreeMap<String, SinkConfig>,
    /// `state_on_change` of the transforms that set it.
    pub state_on_change: BTreeMap<String, StateOnChange>,
    /// `failover` and `failover_after` of the sinks that set them, by primary sink.
    pub failover: BTreeMap<String, FailoverConfig>,
}

/// The compiled graph: each source's routing tree and the transform nodes in it.
pub struct Compiled {
    /// Targets of every source, by name.
    pub routes: BTreeMap<String, Vec<Target>>,
    /// Every transform node reachable from a source, by name.
    pub nodes: BTreeMap<String, Arc<TransformNode>>,
}

/// A node an input can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Node<'a> {
    /// A source.
    Source(&'a str),
    /// One output port (by index) of a transform.
    Transform(&'a str, usize),
}

impl config::Components for Components {
    fn parse(
        tables: ComponentTables<'_>,
        settings: &Settings,
        listeners: &mut ListenerClaims<'_>,
        context: &Context<'_>,
    ) -> Result<Self, ConfigError> {
        let mut sources = BTreeMap::new();
        for table in tables.sources {
            let name = table.name.clone();
            sources.insert(name, SourceConfig::parse(table, context)?);
        }
        let mut transforms = BTreeMap::new();
        let mut state_on_change = BTreeMap::new();
        for mut table in tables.transforms {
            let name = table.name.clone();
            if let Some(policy) = table.take::<StateOnChange>("state_on_change", context)? {
                state_on_change.insert(name.clone(), policy);
            }
            transforms.insert(name, TransformConfig::parse(table, context)?);
        }
        let mut sinks = BTreeMap::new();
        let mut failover = BTreeMap::new();
        for mut table in tables.sinks {
            let name = table.name.clone();
            let to = table.take::<toml::Spanned<String>>("failover", context)?;
            let after = table.take::<toml::Spanned<HumanDuration>>("failover_after", context)?;
            if let (None, Some(after)) = (&to, &after) {
                return Err(context.error_at(
                    after.span(),
                    &format!("sinks.{name}.failover_after"),
                    "`failover_after` needs `failover`, the sink that takes over".into(),
                ));
            }
            if let Some(config) = FailoverConfig::from_keys(to, after) {
                failover.insert(name.clone(), config);
            }
            sinks.insert(name, SinkConfig::parse(table, context)?);
        }
        let mut components = Components {
            sources,
            transforms,
            sinks,
            state_on_change,
            failover,
        };
        components.add_built_ins(settings, context)?;
        components.check(settings, listeners, context)?;
        Ok(components)
    }
}

impl Components {
    /// The registry's own sources, unless the config declares them.
    fn add_built_ins(
        &mut self,
        settings: &Settings,
        context: &Context<'_>,
    ) -> Result<(), ConfigError> {
        if settings.registry.is_none() {
            return Ok(());
        }
        for (name, what) in [
            (HTTP_SOURCE, "HTTP ingestion"),
            (COMMANDS_SOURCE, "command-result"),
        ] {
            let declared_type = self.sources.get(name).map(SourceConfig::type_name);
            if declared_type.is_some_and(|kind| kind != name) {
                return Err(context.key_error(
                    &format!("sources.{name}"),
                    format!("{name:?} is the registry's {what} source; rename this source"),
                ));
            }
        }
        if settings.api.is_some() {
            self.sources
                .entry(HTTP_SOURCE.to_owned())
                .or_insert_with(|| SourceConfig::Http(HttpSourceConfig::default()));
        }
        self.sources
            .entry(COMMANDS_SOURCE.to_owned())
            .or_insert_with(|| SourceConfig::Commands(CommandsSourceConfig::default()));
        Ok(())
    }

    /// Whether `name` is a source the gateway adds by itself (read by nobody is fine).
    fn is_built_in(&self, name: &str) -> bool {
        matches!(
            self.sources.get(name),
            Some(SourceConfig::Http(_) | SourceConfig::Commands(_))
        )
    }

    fn check(
        &self,
        settings: &Settings,
        listeners: &mut ListenerClaims<'_>,
        context: &Context<'_>,
    ) -> Result<(), ConfigError> {
        for name in self.transforms.keys() {
            if self.sources.contains_key(name) {
                return Err(context.key_error(
                    &format!("transforms.{name}"),
                    format!("{name:?} is also a source; inputs could not tell them apart"),
                ));
            }
        }
        for (name, source) in &self.sources {
            source.spec().check(name, settings, listeners, context)?;
        }
        let brokers: Vec<&str> = self
            .sources
            .iter()
            .filter(|(_, source)| source.type_name() == "mqtt_broker")
            .map(|(name, _)| name.as_str())
            .collect();
        for (name, transform) in &self.transforms {
            transform.spec().check(name, context)?;
            if let TransformConfig::Alarm(alarm) = transform {
                crate::transforms::alarm::actions::config::check_brokers(
                    name,
                    &alarm.actions,
                    &brokers,
                    context,
                )?;
            }
        }
        if self.sinks.is_empty() {
            return Err(context.key_error("sinks", "at least one sink is required"));
        }
        for (name, sink) in &self.sinks {
            sink.spec().check(name, context)?;
            sink.spec().buffer().check(context, name)?;
        }
        self.check_failover(context)?;
        let inputs = self.resolve_inputs(settings, context)?;
        self.check_cycles(&inputs, context)?;
        self.check_everything_read(&inputs, context)?;
        for (name, sink) in &self.sinks {
            let mut upstream = self.upstream_sources(&inputs, &format!("sinks.{name}"));
            // A failover sink also takes its primaries' events.
            for (primary, failover) in &self.failover {
                if failover.to.get_ref() == name {
                    upstream.extend(self.upstream_sources(&inputs, &format!("sinks.{primary}")));
                }
            }
            if upstream.is_empty() {
                return Err(context.key_error(
                    &format!("sinks.{name}.inputs"),
                    "its inputs can never produce an event",
                ));
            }
            check_largest_events_fit(self, context, name, sink, &upstream)?;
        }
        Ok(())
    }

    /// `failover`: names another sink, which has no failover of its own (no chains, no
    /// cycles), from a sink with an upstream, after a non-zero time.
    fn check_failover(&self, context: &Context<'_>) -> Result<(), ConfigError> {
        for (primary, failover) in &self.failover {
            let to = failover.to.get_ref();
            let key = format!("sinks.{primary}.failover");
            let error = |message: String| context.error_at(failover.to.span(), &key, message);
            if to == primary {
                return Err(error(format!(
                    "sink {primary:?} cannot fail over to itself; name another sink"
                )));
            }
            if !self.sinks.contains_key(to) {
                let sinks: Vec<&str> = self.sinks.keys().map(String::as_str).collect();
                return Err(error(format!(
                    "failover names no sink {to:?} (sinks: {sinks:?})"
                )));
            }
            if let Some(next) = self.failover.get(to) {
                return Err(error(format!(
                    "sink {to:?} has a failover of its own ({to:?} → {:?}); failover does not \
                     chain: name a sink without `failover`",
                    next.to.get_ref()
                )));
            }
            let sink = &self.sinks[primary];
            if !sink.spec().has_upstream() {
                return Err(error(format!(
                    "a {:?} sink has no upstream that can be unreachable; only \
                     \"mqtt\" sinks can fail over",
                    sink.type_name()
                )));
            }
            if failover.after().is_zero() {
                return Err(context.error_at(
                    failover.after.span(),
                    &format!("sinks.{primary}.failover_after"),
                    "must be more than 0s: every start and reconnect would fail over".into(),
                ));
            }
        }
        Ok(())
    }

    /// Whether `sink` is some sink's failover (it may then have no inputs of its own).
    fn is_failover_target(&self, sink: &str) -> bool {
        self.failover
            .values()
            .any(|failover| failover.to.get_ref() == sink)
    }

    /// Every consumer's inputs, resolved to nodes; keys are `transforms.NAME` and
    /// `sinks.NAME`.
    fn resolve_inputs<'a>(
        &'a self,
        settings: &Settings,
        context: &Context<'_>,
    ) -> Result<BTreeMap<String, Vec<Node<'a>>>, ConfigError> {
        let consumers = self
            .transforms
            .iter()
            .map(|(name, transform)| (format!("transforms.{name}"), transform.spec().inputs()))
            .chain(
                self.sinks
                    .iter()
                    .map(|(name, sink)| (format!("sinks.{name}"), sink.spec().inputs())),
            );
        let mut resolved = BTreeMap::new();
        for (key, inputs) in consumers {
            let error = |message: String| {
                context.error_at(inputs.span(), &format!("{key}.inputs"), message)
            };
            if inputs.get_ref().is_empty() {
                let backup = key
                    .strip_prefix("sinks.")
                    .is_some_and(|sink| self.is_failover_target(sink));
                if !backup {
                    return Err(error("needs at least one input".into()));
                }
            }
            let mut nodes = Vec::new();
            for input in inputs.get_ref() {
                if input == HTTP_SOURCE
                    && settings.registry.is_some()
                    && settings.api.is_none()
                    && !self.sources.contains_key(input)
                {
                    return Err(error(format!(
                        "input {HTTP_SOURCE:?} (HTTP ingestion) needs an [api] section"
                    )));
                }
                nodes.push(self.node(input).map_err(error)?);
            }
            resolved.insert(key, nodes);
        }
        Ok(resolved)
    }

    /// The node an input names, or why it names none.
    fn node<'a>(&'a self, input: &str) -> Result<Node<'a>, String> {
        if let Some((name, _)) = self.sources.get_key_value(input) {
            return Ok(Node::Source(name));
        }
        let (transform, port) = match input.split_once('.') {
            Some((transform, port)) => (transform, port),
            None => (input, ""),
        };
        if let Some((name, config)) = self.transforms.get_key_value(transform) {
            let outputs = config.spec().outputs();
            return match outputs.iter().position(|output| output == port) {
                Some(index) => Ok(Node::Transform(name, index)),
                None if port.is_empty() => Err(format!(
                    "transform {name:?} has only named outputs: {}",
                    named(name, &outputs)
                )),
                None => Err(format!(
                    "transform {name:?} has no output {port:?}; its outputs: {}",
                    named(name, &outputs)
                )),
            };
        }
        let sources: Vec<&str> = self.sources.keys().map(String::as_str).collect();
        let transforms: Vec<&str> = self.transforms.keys().map(String::as_str).collect();
        Err(format!(
            "input {input:?} names no source or transform (sources: {sources:?}, transforms: {transforms:?})"
        ))
    }

    fn check_cycles(
        &self,
        inputs: &BTreeMap<String, Vec<Node<'_>>>,
        context: &Context<'_>,
    ) -> Result<(), ConfigError> {
        // Depth-first from every transform; `path` is the chain being explored.
        fn visit<'a>(
            name: &'a str,
            inputs: &'a BTreeMap<String, Vec<Node<'a>>>,
            done: &mut BTreeSet<&'a str>,
            path: &mut Vec<&'a str>,
        ) -> Option<Vec<&'a str>> {
            if done.contains(name) {
                return None;
            }
            if let Some(start) = path.iter().position(|step| *step == name) {
                let mut cycle = path[start..].to_vec();
                cycle.push(name);
                return Some(cycle);
            }
            path.push(name);
            for node in inputs
                .get(&format!("transforms.{name}"))
                .into_iter()
                .flatten()
            {
                if let Node::Transform(upstream, _) = node {
                    if let Some(cycle) = visit(upstream, inputs, done, path) {
                        return Some(cycle);
                    }
                }
            }
            path.pop();
            done.insert(name);
            None
        }
        let mut done = BTreeSet::new();
        for name in self.transforms.keys() {
            if let Some(mut cycle) = visit(name, inputs, &mut done, &mut Vec::new()) {
                // Inputs point upstream; show the flow of events.
                cycle.reverse();
                return Err(context.key_error(
                    &format!("transforms.{}.inputs", cycle[0]),
                    format!("the graph has a cycle: {}", cycle.join(" → ")),
                ));
            }
        }
        Ok(())
    }

    fn check_everything_read(
        &self,
        inputs: &BTreeMap<String, Vec<Node<'_>>>,
        context: &Context<'_>,
    ) -> Result<(), ConfigError> {
        let read: BTreeSet<Node<'_>> = inputs.values().flatten().copied().collect();
        for name in self.sources.keys() {
            if !read.contains(&Node::Source(name)) && !self.is_built_in(name) {
                return Err(context.key_error(
                    &format!("sources.{name}"),
                    "no sink or transform lists this source in `inputs`; its events would be lost",
                ));
            }
        }
        for (name, transform) in &self.transforms {
            let outputs = transform.spec().outputs();
            let default_read = outputs
                .iter()
                .position(String::is_empty)
                .is_none_or(|port| read.contains(&Node::Transform(name, port)));
            let any_read =
                (0..outputs.len()).any(|port| read.contains(&Node::Transform(name, port)));
            if !default_read || !any_read {
                return Err(context.key_error(
                    &format!("transforms.{name}"),
                    "nothing lists this transform's output in `inputs`; its events would be lost",
                ));
            }
        }
        Ok(())
    }

    /// The sources whose events can reach the consumer `key` (`sinks.NAME`).
    fn upstream_sources<'a>(
        &'a self,
        inputs: &'a BTreeMap<String, Vec<Node<'a>>>,
        key: &str,
    ) -> BTreeSet<&'a str> {
        let mut sources = BTreeSet::new();
        let mut seen = BTreeSet::new();
        let mut pending: Vec<&Node<'a>> = inputs.get(key).into_iter().flatten().collect();
        while let Some(node) = pending.pop() {
            match node {
                Node::Source(name) => {
                    sources.insert(*name);
                }
                Node::Transform(name, _) => {
                    if seen.insert(*name) {
                        pending.extend(
                            inputs
                                .get(&format!("transforms.{name}"))
                                .into_iter()
                                .flatten(),
                        );
                    }
                }
            }
        }
        sources
    }

    /// What transform `name` does with its state when its config changes.
    pub fn state_on_change(&self, name: &str) -> StateOnChange {
        self.state_on_change.get(name).copied().unwrap_or_default()
    }

    /// Compiles the routing tree of every source: `intakes` are the sinks' intakes,
    /// `instances` the running transforms to use (the others are built from `services`).
    /// Each transform is in the graph once, shared by every path through it.
    #[cfg(test)]
    pub fn compile(
        &self,
        intakes: &BTreeMap<String, Intake>,
        services: &TransformServices,
        instances: &BTreeMap<String, Arc<dyn EventTransform>>,
    ) -> Result<Compiled, ConfigError> {
        self.compile_with_failover(intakes, &BTreeMap::new(), services, instances)
    }

    /// As [`Components::compile`], with the failover `switches` of the primary sinks: a
    /// sink with a switch (and a failover sink among `intakes`) becomes one
    /// [`Target::Failover`] hop; without one, its events always go to it.
    pub fn compile_with_failover(
        &self,
        intakes: &BTreeMap<String, Intake>,
        switches: &BTreeMap<String, Arc<FailoverSwitch>>,
        services: &TransformServices,
        instances: &BTreeMap<String, Arc<dyn EventTransform>>,
    ) -> Result<Compiled, ConfigError> {
        let mut compiler = Compiler {
            components: self,
            intakes,
            switches,
            services,
            instances,
            built: BTreeMap::new(),
        };
        let mut routes = BTreeMap::new();
        for name in self.sources.keys() {
            let mut targets = compiler.targets_of(name, None)?;
            if name == COMMANDS_SOURCE && targets.is_empty() {
                // Read by nobody explicitly: every sink, as before the graph existed.
                targets = intakes.values().cloned().map(Target::Sink).collect();
            }
            routes.insert(name.clone(), targets);
        }
        Ok(Compiled {
            routes,
            nodes: compiler.built,
        })
    }
}

/// `NAME.OUTPUT` for each named output (`NAME` for the default one).
fn named(name: &str, outputs: &[String]) -> String {
    outputs
        .iter()
        .map(|output| {
            if output.is_empty() {
                name.to_owned()
            } else {
                format!("{name}.{output}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

struct Compiler<'a> {
    components: &'a Components,
    intakes: &'a BTreeMap<String, Intake>,
    switches: &'a BTreeMap<String, Arc<FailoverSwitch>>,
    services: &'a TransformServices,
    instances: &'a BTreeMap<String, Arc<dyn EventTransform>>,
    built: BTreeMap<String, Arc<TransformNode>>,
}

impl Compiler<'_> {
    /// Targets reading `name` (a source, or a transform's output `port`).
    fn targets_of(&mut self, name: &str, port: Option<&str>) -> Result<Vec<Target>, ConfigError> {
        let wanted = match port {
            None | Some("") => name.to_owned(),
            Some(port) => format!("{name}.{port}"),
        };
        let reads = |inputs: &toml::Spanned<Vec<String>>| inputs.get_ref().contains(&wanted);
        let mut targets = Vec::new();
        let transforms: Vec<&String> = self
            .components
            .transforms
            .iter()
            .filter(|(_, transform)| reads(transform.spec().inputs()))
            .map(|(name, _)| name)
            .collect();
        for transform in transforms {
            targets.push(Target::Transform(self.transform(transform)?));
        }
        for (sink, config) in &self.components.sinks {
            if reads(config.spec().inputs()) {
                if let Some(intake) = self.intakes.get(sink) {
                    targets.push(self.sink_target(sink, intake));
                }
            }
        }
        Ok(targets)
    }

    /// The hop to `sink`: its intake, or a failover route when it has a failover sink.
    fn sink_target(&self, sink: &str, intake: &Intake) -> Target {
        let failover = self.components.failover.get(sink).and_then(|failover| {
            Some((
                self.switches.get(sink)?,
                self.intakes.get(failover.to.get_ref())?,
            ))
        });
        match failover {
            Some((switch, backup)) => Target::Failover(Arc::new(FailoverRoute {
                primary: intake.clone(),
                backup: backup.clone(),
                switch: Arc::clone(switch),
            })),
            None => Target::Sink(intake.clone()),
        }
    }

    fn transform(&mut self, name: &str) -> Result<Arc<TransformNode>, ConfigError> {
        if let Some(node) = self.built.get(name) {
            return Ok(Arc::clone(node));
        }
        let config = &self.components.transforms[name];
        tracing::debug!(
            transform = name,
            r#type = config.type_name(),
            "transform built"
        );
        let transform = match self.instances.get(name) {
            Some(instance) => Arc::clone(instance),
            None => config.spec().build(name, self.services)?,
        };
        let mut outputs = Vec::new();
        for port in config.spec().outputs() {
            outputs.push(self.targets_of(name, Some(&port))?);
        }
        let node = Arc::new(TransformNode { transform, outputs });
        self.built.insert(name.to_owned(), Arc::clone(&node));
        Ok(node)
    }
}

/// Every upstream source's largest event must fit the (empty) buffer of the sink: under
/// `when_full = "block"` a larger one would wait for room that can never exist, and
/// under the other policies it would be dropped every time.
fn check_largest_events_fit(
    components: &Components,
    context: &Context<'_>,
    sink_name: &str,
    sink: &SinkConfig,
    upstream: &BTreeSet<&str>,
) -> Result<(), ConfigError> {
    let buffer = sink.spec().buffer();
    let largest = crate::buffer::largest_record(buffer);
    let max_size = buffer.max_size.0;
    for input in upstream {
        let Some(source) = components.sources.get(*input) else {
            continue;
        };
        let frame = source.spec().largest_event();
        let frame_key = match source {
            SourceConfig::Tcp(_) => format!("sources.{input}.max_frame"),
            SourceConfig::MqttBroker(_) => format!("sources.{input}.max_packet_size"),
            _ => format!("the {input:?} source's largest event"),
        };
        let needed = fieldgate_core::Event::max_encoded_len(
            frame,
            fieldgate_codec::MAX_DEVICE_ID_LEN,
            input.len(),
        );
        if needed > largest {
            return Err(context.key_error(
                &format!("sinks.{sink_name}.buffer.max_size"),
                format!(
                    "{max_size} bytes cannot hold the largest event of input {input:?}: \
                     {frame_key} = {frame} bytes needs {needed} bytes in the buffer with \
                     its event header and the buffer's framing, and at most {largest} fit; \
                     raise sinks.{sink_name}.buffer.max_size or lower {frame_key}"
                ),
            ));
        }
    }
    Ok(())
}
