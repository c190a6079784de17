//! Config of the embedded MQTT broker: `[sources.NAME]` with `type = "mqtt_broker"`.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::device_topic::DeviceTopic;
use crate::config::{ByteSize, ConfigError, Context, HumanDuration};
use crate::sources::tcp::{AuthMode, ListenerTlsConfig};

/// `[sources.NAME]` with `type = "mqtt_broker"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttBrokerSourceConfig {
    /// Listen address.
    pub address: Spanned<SocketAddr>,
    /// Who may connect: `none`, `token` (password is one of `tokens`) or `registry`
    /// (user name = device id, password = its secret or JWT).
    #[serde(default)]
    pub auth: AuthMode,
    /// Accepted passwords when `auth = "token"`.
    #[serde(default)]
    pub tokens: Vec<String>,
    /// Allow `auth = "none"` on an address other than loopback.
    #[serde(default)]
    pub allow_anonymous_remote: bool,
    /// Topic pattern whose publishes become pipeline events: `{device}` and `{kind}`
    /// each a whole level.
    #[serde(default = "default_device_topic")]
    pub device_topic: String,
    /// Connections beyond this wait in the kernel's accept queue.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Largest packet accepted (and announced to MQTT 5 clients).
    #[serde(default = "default_max_packet_size")]
    pub max_packet_size: ByteSize,
    /// QoS 1/2 messages in flight per client, each way.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// Messages queued per session (offline, or beyond the in-flight window).
    #[serde(default = "default_max_queued_messages")]
    pub max_queued_messages: usize,
    /// Retained topics held.
    #[serde(default = "default_max_retained_messages")]
    pub max_retained_messages: usize,
    /// Subscriptions per session.
    #[serde(default = "default_max_subscriptions")]
    pub max_subscriptions: usize,
    /// Longest topic name or filter, in bytes.
    #[serde(default = "default_max_topic_length")]
    pub max_topic_length: usize,
    /// Most levels in a topic name or filter.
    #[serde(default = "default_max_topic_levels")]
    pub max_topic_levels: usize,
    /// Longest session expiry granted (and what a 3.1.1 persistent session gets).
    #[serde(default = "default_max_session_expiry")]
    pub max_session_expiry: HumanDuration,
    /// A connection must have sent its CONNECT within this.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Highest topic alias a MQTT 5 client may use (0 = none).
    #[serde(default = "default_topic_alias_maximum")]
    pub topic_alias_maximum: u16,
    /// TLS on the listener (MQTT over TLS; mutual TLS with `client_ca`).
    pub tls: Option<ListenerTlsConfig>,
}

fn default_device_topic() -> String {
    "devices/{device}/{kind}".into()
}
fn default_max_connections() -> usize {
    10_000
}
fn default_max_packet_size() -> ByteSize {
    ByteSize(256 * 1024)
}
fn default_max_inflight() -> u16 {
    32
}
fn default_max_queued_messages() -> usize {
    1000
}
fn default_max_retained_messages() -> usize {
    10_000
}
fn default_max_subscriptions() -> usize {
    100
}
fn default_max_topic_length() -> usize {
    1024
}
fn default_max_topic_levels() -> usize {
    32
}
fn default_max_session_expiry() -> HumanDuration {
    HumanDuration(Duration::from_secs(24 * 3600))
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_topic_alias_maximum() -> u16 {
    16
}

impl MqttBrokerSourceConfig {
    /// Checks the fields that need no other part of the config.
    pub fn check_fields(&self, context: &Context<'_>, name: &str) -> Result<(), ConfigError> {
        let key = |field: &str| format!("sources.{name}.{field}");
        if self.auth == AuthMode::None
            && !self.address.get_ref().ip().is_loopback()
            && !self.allow_anonymous_remote
        {
            return Err(context.key_error(
                &key("auth"),
                "auth = \"none\" is allowed only on a loopback address; use auth = \"token\" or \
                 \"registry\", or set allow_anonymous_remote = true to let anyone on the network \
                 publish",
            ));
        }
        if let Err(err) = DeviceTopic::parse(&self.device_topic) {
            return Err(context.key_error(&key("device_topic"), err.to_string()));
        }
        if !(64..=256 * 1024 * 1024).contains(&self.max_packet_size.0) {
            return Err(
                context.key_error(&key("max_packet_size"), "must be between 64B and 256MiB")
            );
        }
        let at_least_one = [
            ("max_connections", self.max_connections),
            ("max_inflight", usize::from(self.max_inflight)),
            ("max_queued_messages", self.max_queued_messages),
            ("max_subscriptions", self.max_subscriptions),
            ("max_topic_length", self.max_topic_length),
            ("max_topic_levels", self.max_topic_levels),
        ];
        for (field, value) in at_least_one {
            if value == 0 {
                return Err(context.key_error(&key(field), "must be at least 1"));
            }
        }
        if self.max_topic_length > 65_535 {
            return Err(context.key_error(&key("max_topic_length"), "must be at most 65535"));
        }
        if self.connect_timeout.0.is_zero() {
            return Err(context.key_error(&key("connect_timeout"), "must be above 0"));
        }
        if self.tokens.iter().any(String::is_empty) {
            return Err(context.key_error(&key("tokens"), "tokens cannot be empty"));
        }
        Ok(())
    }
}
