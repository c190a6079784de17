//! `[[transforms.NAME.actions]]`: what an alarm rule does locally when one of its alarms
//! is raised or cleared, checked into [`ActionPlan`]s that cannot be invalid.
//!
//! One flat table per action, `type` choosing the kind; a key that does not apply to the
//! type is refused (as the detectors' keys are), so a typo never turns into a default.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::template::Template;
use super::webhook::Endpoint;
use crate::config::{ConfigError, Context, HumanDuration};

/// Actions per rule at most.
pub const MAX_ACTIONS: usize = 16;
/// Longest `name` and `command`.
const MAX_NAME: usize = 64;
/// Largest `retries`.
pub const MAX_RETRIES: u32 = 10;
/// Longest command `ttl`.
const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default command `ttl`: an alarm's command is stale soon.
const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// Shortest and longest webhook `timeout`.
const TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(60));
/// Shortest and longest webhook `backoff`.
const BACKOFF_RANGE: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(60));
/// Largest serialized `args`.
const MAX_ARGS_BYTES: usize = 16 * 1024;

/// An action's `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    /// Publish the alarm event's payload to the embedded MQTT broker.
    Mqtt,
    /// Send a command to a device through the command lifecycle.
    Command,
    /// HTTP POST the alarm event's payload, with retries.
    Webhook,
}

impl ActionKind {
    /// The name in the config, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Mqtt => "mqtt",
            ActionKind::Command => "command",
            ActionKind::Webhook => "webhook",
        }
    }
}

/// When an action runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transition {
    /// The alarm was raised.
    Raise,
    /// The alarm was cleared.
    Clear,
}

impl Transition {
    /// The name in the config, the API and `{state}` (`raised` / `cleared`).
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::Raise => "raise",
            Transition::Clear => "clear",
        }
    }

    /// The alarm's state after the transition, as the alarm event says it.
    pub fn state(self) -> &'static str {
        match self {
            Transition::Raise => "raised",
            Transition::Clear => "cleared",
        }
    }
}

/// One `[[transforms.NAME.actions]]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionConfig {
    /// `mqtt`, `command` or `webhook`.
    #[serde(rename = "type")]
    pub kind: ActionKind,
    /// The `action` label of its metrics and its name in the API (default: the type).
    pub name: Option<String>,
    /// On which transitions it runs (default both).
    pub on: Option<Vec<Transition>>,
    /// mqtt: the topic, with `{rule}`, `{device}`, `{state}`, `{severity}`.
    pub topic: Option<String>,
    /// mqtt: the `mqtt_broker` source to publish through (default: the only one).
    pub broker: Option<String>,
    /// mqtt: QoS of the publish (default 1).
    pub qos: Option<u8>,
    /// mqtt: publish retained (default false).
    pub retain: Option<bool>,
    /// command: the target device (default `"{device}"`, the alarm's device).
    pub device: Option<String>,
    /// command: the command name (e.g. `write` for a Modbus device).
    pub command: Option<String>,
    /// command: the command's parameters (a table).
    pub args: Option<serde_json::Value>,
    /// command: how long the command may wait for its device (default 5m).
    pub ttl: Option<HumanDuration>,
    /// webhook: `http[s]://host:port/path`.
    pub url: Option<String>,
    /// webhook: CA file (PEM) an `https://` receiver's certificate must chain to
    /// (default: the system's roots).
    pub ca: Option<PathBuf>,
    /// webhook: further attempts after a failed one (default 3).
    pub retries: Option<u32>,
    /// webhook: time allowed per attempt (default 5s).
    pub timeout: Option<HumanDuration>,
    /// webhook: delay before the first retry, doubled per retry (default 500ms).
    pub backoff: Option<HumanDuration>,
}

/// What an action does, checked.
#[derive(Debug, Clone)]
pub enum Target {
    /// Publish to the embedded broker.
    Mqtt {
        /// The broker source; `None`: the only one running.
        broker: Option<String>,
        /// The topic.
        topic: Template,
        /// QoS.
        qos: u8,
        /// Retain flag.
        retain: bool,
    },
    /// A device command.
    Command {
        /// The device.
        device: Template,
        /// The command's name.
        name: String,
        /// Its parameters.
        args: serde_json::Value,
        /// Its time to live.
        ttl: Duration,
    },
    /// An HTTP POST.
    Webhook(Endpoint),
}

/// One action, checked.
#[derive(Debug, Clone)]
pub struct ActionPlan {
    /// Its name (metrics label, API).
    pub name: String,
    /// Runs on raise.
    pub on_raise: bool,
    /// Runs on clear.
    pub on_clear: bool,
    /// What it does.
    pub target: Target,
}

impl ActionPlan {
    /// Whether it runs on `transition`.
    pub fn runs_on(&self, transition: Transition) -> bool {
        match transition {
            Transition::Raise => self.on_raise,
            Transition::Clear => self.on_clear,
        }
    }
}

/// Checks `actions` of rule `rule` into plans, or the first key that is wrong.
pub fn compile(
    rule: &str,
    actions: &[ActionConfig],
    context: &Context<'_>,
) -> Result<Vec<ActionPlan>, ConfigError> {
    if actions.len() > MAX_ACTIONS {
        return Err(context.key_error(
            &format!("transforms.{rule}.actions"),
            format!("at most {MAX_ACTIONS} actions per rule"),
        ));
    }
    let mut plans: Vec<ActionPlan> = Vec::with_capacity(actions.len());
    for (index, action) in actions.iter().enumerate() {
        let plan = action.compile(rule, index, context)?;
        if plans.iter().any(|other| other.name == plan.name) {
            return Err(context.key_error(
                &format!("transforms.{rule}.actions[{index}].name"),
                format!(
                    "a second action named {:?}: give each action of the rule its own `name`",
                    plan.name
                ),
            ));
        }
        plans.push(plan);
    }
    Ok(plans)
}

/// Checks the mqtt actions of rule `rule` against the config's `mqtt_broker` sources.
pub fn check_brokers(
    rule: &str,
    actions: &[ActionConfig],
    brokers: &[&str],
    context: &Context<'_>,
) -> Result<(), ConfigError> {
    for (index, action) in actions.iter().enumerate() {
        if action.kind != ActionKind::Mqtt {
            continue;
        }
        let key = |field: &str| format!("transforms.{rule}.actions[{index}].{field}");
        match &action.broker {
            Some(broker) if !brokers.contains(&broker.as_str()) => {
                return Err(context.key_error(
                    &key("broker"),
                    format!("{broker:?} is not a source of type \"mqtt_broker\""),
                ));
            }
            Some(_) => {}
            None if brokers.is_empty() => {
                return Err(context.key_error(
                    &key("type"),
                    "an mqtt action publishes to the embedded broker: add a source of type \
                     \"mqtt_broker\"",
                ));
            }
            None if brokers.len() > 1 => {
                return Err(context.key_error(
                    &key("broker"),
                    format!(
                        "several mqtt_broker sources ({}): name one",
                        brokers.join(", ")
                    ),
                ));
            }
            None => {}
        }
    }
    Ok(())
}

impl ActionConfig {
    fn compile(
        &self,
        rule: &str,
        index: usize,
        context: &Context<'_>,
    ) -> Result<ActionPlan, ConfigError> {
        let key = |field: &str| format!("transforms.{rule}.actions[{index}].{field}");
        let err = |field: &str, message: String| context.key_error(&key(field), message);
        let kind = self.kind.as_str();
        let allowed: &[&str] = match self.kind {
            ActionKind::Mqtt => &["topic", "broker", "qos", "retain"],
            ActionKind::Command => &["device", "command", "args", "ttl"],
            ActionKind::Webhook => &["url", "ca", "retries", "timeout", "backoff"],
        };
        let given = [
            ("topic", self.topic.is_some()),
            ("broker", self.broker.is_some()),
            ("qos", self.qos.is_some()),
            ("retain", self.retain.is_some()),
            ("device", self.device.is_some()),
            ("command", self.command.is_some()),
            ("args", self.args.is_some()),
            ("ttl", self.ttl.is_some()),
            ("url", self.url.is_some()),
            ("ca", self.ca.is_some()),
            ("retries", self.retries.is_some()),
            ("timeout", self.timeout.is_some()),
            ("backoff", self.backoff.is_some()),
        ];
        for (field, set) in given {
            if set && !allowed.contains(&field) {
                return Err(err(field, format!("does not apply to type = {kind:?}")));
            }
        }
        let name = self.name.clone().unwrap_or_else(|| kind.to_owned());
        if name.is_empty()
            || name.len() > MAX_NAME
            || !name
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.'))
        {
            return Err(err(
                "name",
                format!("must be 1 to {MAX_NAME} of A-Z a-z 0-9 _ - ."),
            ));
        }
        let (on_raise, on_clear) = match &self.on {
            None => (true, true),
            Some(on) if on.is_empty() => {
                return Err(err("on", "name \"raise\", \"clear\" or both".into()));
            }
            Some(on) => {
                let raise = on.iter().filter(|t| **t == Transition::Raise).count();
                let clear = on.len() - raise;
                if raise > 1 || clear > 1 {
                    return Err(err("on", "names a transition twice".into()));
                }
                (raise == 1, clear == 1)
            }
        };
        let target = match self.kind {
            ActionKind::Mqtt => {
                let topic = self
                    .topic
                    .as_deref()
                    .ok_or_else(|| err("topic", "an mqtt action needs a `topic`".into()))?;
                let topic = Template::parse(topic).map_err(|why| err("topic", why))?;
                if let Some(bad) = topic
                    .literals()
                    .find(|text| text.contains(['+', '#', '\0']))
                {
                    return Err(err(
                        "topic",
                        format!("{bad:?}: a topic name has no `+`, `#` or NUL"),
                    ));
                }
                let qos = self.qos.unwrap_or(1);
                if qos > 2 {
                    return Err(err("qos", "must be 0, 1 or 2".into()));
                }
                if self.broker.as_deref().is_some_and(str::is_empty) {
                    return Err(err("broker", "must name an mqtt_broker source".into()));
                }
                Target::Mqtt {
                    broker: self.broker.clone(),
                    topic,
                    qos,
                    retain: self.retain.unwrap_or(false),
                }
            }
            ActionKind::Command => {
                let name = self
                    .command
                    .clone()
                    .ok_or_else(|| err("command", "a command action needs a `command`".into()))?;
                if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
                    return Err(err(
                        "command",
                        format!("must be 1 to {MAX_NAME} bytes without control characters"),
                    ));
                }
                let device = Template::parse(self.device.as_deref().unwrap_or("{device}"))
                    .map_err(|why| err("device", why))?;
                if let Some(literal) = device.as_literal() {
                    fieldgate_codec::validate_device_id(literal)
                        .map_err(|why| err("device", format!("{literal:?}: {why}")))?;
                }
                let args = self
                    .args
                    .clone()
                    .unwrap_or_else(|| serde_json::Value::Object(serde_json::Map::new()));
                if !args.is_object() {
                    return Err(err("args", "must be a table".into()));
                }
                if serde_json::to_vec(&args).map_or(usize::MAX, |bytes| bytes.len())
                    > MAX_ARGS_BYTES
                {
                    return Err(err("args", "larger than 16KiB".into()));
                }
                let ttl = self.ttl.map_or(DEFAULT_TTL, |ttl| ttl.0);
                if ttl.is_zero() || ttl > MAX_TTL {
                    return Err(err("ttl", "must be above 0 and at most 30 days".into()));
                }
                Target::Command {
                    device,
                    name,
                    args,
                    ttl,
                }
            }
            ActionKind::Webhook => {
                let url = self
                    .url
                    .as_deref()
                    .ok_or_else(|| err("url", "a webhook action needs a `url`".into()))?;
                let retries = self.retries.unwrap_or(3);
                if retries > MAX_RETRIES {
                    return Err(err("retries", format!("at most {MAX_RETRIES}")));
                }
                let within = |field: &str,
                              value: Option<HumanDuration>,
                              default,
                              range: (Duration, Duration)| {
                    let value = value.map_or(default, |value| value.0);
                    if value < range.0 || value > range.1 {
                        Err(err(
                            field,
                            format!("must be from {:?} to {:?}", range.0, range.1),
                        ))
                    } else {
                        Ok(value)
                    }
                };
                let timeout = within(
                    "timeout",
                    self.timeout,
                    Duration::from_secs(5),
                    TIMEOUT_RANGE,
                )?;
                let backoff = within(
                    "backoff",
                    self.backoff,
                    Duration::from_millis(500),
                    BACKOFF_RANGE,
                )?;
                if self.ca.is_some() && !url.starts_with("https://") {
                    return Err(err("ca", "is for an https:// url".into()));
                }
                let endpoint = Endpoint::parse(url, self.ca.as_deref(), timeout, retries, backoff)
                    .map_err(|why| err(if why.starts_with("ca ") { "ca" } else { "url" }, why))?;
                Target::Webhook(endpoint)
            }
        };
        Ok(ActionPlan {
            name,
            on_raise,
            on_clear,
            target,
        })
    }
}
