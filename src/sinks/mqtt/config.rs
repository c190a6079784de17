//! Config of the MQTT sink: `[sinks.NAME]` with `type = "mqtt"`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use fieldgate_core::EventKind;
use fieldgate_core::envelope::OutputFormat;
use serde::Deserialize;
use toml::Spanned;

use super::BrokerAddress;
use crate::buffer::BufferConfig;
use crate::config::{ByteSize, ConfigError, Context, HumanDuration};
use crate::sinks::TopicTemplate;

/// `[sinks.NAME]` with `type = "mqtt"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSinkConfig {
    /// Sources to read.
    pub inputs: Spanned<Vec<String>>,
    /// Buffer in front of the sink.
    #[serde(default)]
    pub buffer: BufferConfig,
    /// `mqtt://host:port` or `mqtts://host:port`; a broker on this host when left out.
    #[serde(default = "default_url")]
    pub url: Spanned<String>,
    /// MQTT client id; defaults to the gateway id. Keep it stable for a persistent session.
    pub client_id: Option<String>,
    /// Protocol version.
    #[serde(default)]
    pub protocol: MqttProtocol,
    /// Topic per event.
    #[serde(default = "default_topic")]
    pub topic: TopicTemplate,
    /// Default QoS for every kind.
    #[serde(default = "default_qos")]
    pub qos: Qos,
    /// QoS per event kind, overriding `qos`.
    #[serde(default)]
    pub qos_by_kind: BTreeMap<String, Qos>,
    /// Envelope or raw device JSON.
    #[serde(default)]
    pub format: OutputFormat,
    /// Start a fresh session on every connect (loses queued commands).
    #[serde(default)]
    pub clean_session: bool,
    /// MQTT 5 session expiry.
    #[serde(default = "default_session_expiry")]
    pub session_expiry: HumanDuration,
    /// MQTT keepalive.
    #[serde(default = "default_keep_alive")]
    pub keep_alive: HumanDuration,
    /// Broker user name.
    pub username: Option<String>,
    /// Broker password (use `${ENV}`).
    pub password: Option<String>,
    /// Retained gateway status topic (`online`, will `offline`).
    #[serde(default = "default_status_topic")]
    pub status_topic: TopicTemplate,
    /// Topic filter the gateway subscribes to for device commands.
    #[serde(default = "default_command_topic")]
    pub command_topic: TopicTemplate,
    /// First reconnect delay.
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min: HumanDuration,
    /// Largest reconnect delay.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max: HumanDuration,
    /// Publishes awaiting acknowledgement at once.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// Largest packet the broker accepts; larger events are dead-lettered. MQTT 5 brokers
    /// announce theirs in CONNACK (the smaller of the two applies).
    #[serde(default)]
    pub max_packet_size: Option<ByteSize>,
    /// A publish unacknowledged this long means a stuck link: reconnect and resend.
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout: HumanDuration,
    /// Events per publish; above 1 a publish carries a JSON array.
    #[serde(default = "default_batch_max_events")]
    pub batch_max_events: usize,
    /// How long a batch may wait to fill.
    #[serde(default = "default_batch_max_delay")]
    pub batch_max_delay: HumanDuration,
    /// One topic for all batches (placeholders `{gateway}`, `{source}`).
    pub batch_topic: Option<TopicTemplate>,
    /// TLS options for `mqtts://`.
    pub tls: Option<ClientTlsConfig>,
}

fn default_topic() -> TopicTemplate {
    TopicTemplate::parse("gateways/{gateway}/devices/{device}/{kind}")
        .expect("built-in template is valid")
}
fn default_status_topic() -> TopicTemplate {
    TopicTemplate::parse("gateways/{gateway}/status").expect("built-in template is valid")
}
fn default_command_topic() -> TopicTemplate {
    TopicTemplate::parse("gateways/{gateway}/devices/+/commands")
        .expect("built-in template is valid")
}
fn default_qos() -> Qos {
    Qos(1)
}
fn default_session_expiry() -> HumanDuration {
    HumanDuration(Duration::from_secs(3600))
}
fn default_keep_alive() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_reconnect_min() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_reconnect_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_max_inflight() -> u16 {
    // Enough to keep a broker 1-2 ms away busy at tens of thousands of publishes/s.
    500
}
fn default_ack_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_batch_max_events() -> usize {
    1
}
fn default_batch_max_delay() -> HumanDuration {
    HumanDuration(Duration::from_millis(5))
}

impl MqttSinkConfig {
    /// The QoS for one kind of event.
    pub fn qos_for(&self, kind: EventKind) -> Qos {
        self.qos_by_kind
            .get(kind.as_str())
            .copied()
            .unwrap_or(self.qos)
    }

    pub fn check_fields(&self, context: &Context<'_>, name: &str) -> Result<(), ConfigError> {
        let url = self.url.get_ref();
        if !(url.starts_with("mqtt://") || url.starts_with("mqtts://")) {
            return Err(context.error_at(
                self.url.span(),
                &format!("sinks.{name}.url"),
                format!("{url:?} must start with mqtt:// or mqtts://"),
            ));
        }
        if BrokerAddress::parse(url).is_none() {
            return Err(context.error_at(
                self.url.span(),
                &format!("sinks.{name}.url"),
                format!("{url:?} is not mqtt[s]://HOST:PORT"),
            ));
        }
        let key = |field: &str| format!("sinks.{name}.{field}");
        let whole = |field: &str, message: String| {
            context.error_at(0..0, &key(field), message).without_line()
        };
        for kind in self.qos_by_kind.keys() {
            if EventKind::parse(kind).is_none() {
                return Err(whole(
                    "qos_by_kind",
                    format!(
                        "unknown kind {kind:?}; kinds: telemetry, status, alarm, command_result, event"
                    ),
                ));
            }
        }
        if self.max_inflight == 0 || self.max_inflight == u16::MAX {
            return Err(whole("max_inflight", "must be between 1 and 65534".into()));
        }
        if self
            .max_packet_size
            .is_some_and(|size| !(64..=268_435_455).contains(&size.0))
        {
            return Err(whole(
                "max_packet_size",
                "must be between 64B and 256MiB (MQTT's largest packet)".into(),
            ));
        }
        if self.ack_timeout.0 < Duration::from_secs(1) {
            return Err(whole("ack_timeout", "must be at least 1s".into()));
        }
        if self.batch_max_events == 0 || self.batch_max_events > 10_000 {
            return Err(whole(
                "batch_max_events",
                "must be between 1 and 10000".into(),
            ));
        }
        if self.reconnect_min.0 > self.reconnect_max.0 || self.reconnect_min.0.is_zero() {
            return Err(whole(
                "reconnect_min",
                "must be above 0 and at most reconnect_max".into(),
            ));
        }
        if self.keep_alive.0 < Duration::from_secs(1)
            || self.keep_alive.0 > Duration::from_secs(65535)
        {
            return Err(whole("keep_alive", "must be between 1s and 65535s".into()));
        }
        if self.password.is_some() && self.username.is_none() {
            return Err(whole("password", "a password needs a username".into()));
        }
        for (field, template) in [
            ("topic", Some(&self.topic)),
            ("status_topic", Some(&self.status_topic)),
            ("batch_topic", self.batch_topic.as_ref()),
        ] {
            if template.is_some_and(TopicTemplate::has_wildcards) {
                return Err(whole(field, "a publish topic cannot contain + or #".into()));
            }
        }
        if !self.status_topic.uses_only_gateway() {
            return Err(whole(
                "status_topic",
                "may only use the {gateway} placeholder".into(),
            ));
        }
        if self
            .batch_topic
            .as_ref()
            .is_some_and(TopicTemplate::is_per_event)
        {
            return Err(whole(
                "batch_topic",
                "may only use the {gateway} and {source} placeholders".into(),
            ));
        }
        let command = self.command_topic.render_gateway("gw");
        if command.matches('+').count() != 1
            || command.contains('#')
            || !self.command_topic.uses_only_gateway()
        {
            return Err(whole(
                "command_topic",
                "needs exactly one `+` level (the device id), no `#`, and no placeholder but {gateway}".into(),
            ));
        }
        if let Some(tls) = &self.tls {
            if tls.cert.is_some() != tls.key.is_some() {
                return Err(whole("tls", "cert and key must be given together".into()));
            }
        }
        Ok(())
    }
}

/// MQTT protocol version.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum MqttProtocol {
    /// MQTT 3.1.1.
    #[default]
    V311,
    /// MQTT 5.0.
    V5,
}

impl<'de> Deserialize<'de> for MqttProtocol {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = MqttProtocol;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("\"3.1.1\" or \"5\"")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<MqttProtocol, E> {
                match text {
                    "3.1.1" | "4" => Ok(MqttProtocol::V311),
                    "5" | "5.0" => Ok(MqttProtocol::V5),
                    other => Err(E::custom(format!(
                        "unknown MQTT protocol {other:?}; use \"3.1.1\" or \"5\""
                    ))),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, number: i64) -> Result<MqttProtocol, E> {
                match number {
                    5 => Ok(MqttProtocol::V5),
                    other => Err(E::custom(format!(
                        "unknown MQTT protocol {other}; use \"3.1.1\" or \"5\""
                    ))),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// An MQTT QoS level, 0..=2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qos(pub u8);

impl<'de> Deserialize<'de> for Qos {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// Names the expected value in the config's words, not as `i64`.
        struct Level;
        impl serde::de::Visitor<'_> for Level {
            type Value = i64;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an integer 0, 1 or 2")
            }
            fn visit_i64<E: serde::de::Error>(self, level: i64) -> Result<i64, E> {
                Ok(level)
            }
        }
        let level = deserializer.deserialize_i64(Level)?;
        match u8::try_from(level) {
            Ok(level @ 0..=2) => Ok(Qos(level)),
            _ => Err(serde::de::Error::custom(format!(
                "QoS must be 0, 1 or 2, not {level}"
            ))),
        }
    }
}

/// `[sinks.NAME.tls]` for `mqtts://`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsConfig {
    /// CA certificates to trust (PEM); system roots when absent.
    pub ca: Option<PathBuf>,
    /// Client certificate chain for mutual TLS (PEM).
    pub cert: Option<PathBuf>,
    /// Client private key for mutual TLS (PEM).
    pub key: Option<PathBuf>,
}

/// The broker a sink without `url` publishes to: one on this host, on MQTT's port.
fn default_url() -> Spanned<String> {
    Spanned::new(0..0, DEFAULT_URL.to_owned())
}

/// See [`default_url`].
const DEFAULT_URL: &str = "mqtt://127.0.0.1:1883";
