//! The typed config: what each component accepts, with defaults.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fieldgate_core::EventKind;
use serde::Deserialize;
use toml::Spanned;

use super::error::{ConfigError, Context};
use super::units::{ByteSize, HumanDuration};
use crate::sinks::TopicTemplate;

/// The whole gateway config.
#[derive(Debug)]
pub struct Config {
    /// `[gateway]`: identity and storage.
    pub gateway: GatewayConfig,
    /// `[log]`: log level and format.
    pub log: LogConfig,
    /// `[api]`: the HTTP server for metrics and health; none when absent.
    pub api: Option<ApiConfig>,
    /// `[watchdog]`: the memory and resource watchdog, always on.
    pub watchdog: WatchdogConfig,
    /// `[registry]`: the device registry and its `/api/v1` routes; none when absent.
    pub registry: Option<RegistryConfig>,
    /// `[sources.NAME]`: where events come from.
    pub sources: BTreeMap<String, SourceConfig>,
    /// `[sinks.NAME]`: where events go, each behind its own buffer.
    pub sinks: BTreeMap<String, SinkConfig>,
}

/// `[gateway]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Gateway id, used in topics and as the default MQTT client id.
    pub id: String,
    /// Where buffers and file sinks keep their data.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// How long a graceful shutdown may take before the gateway exits anyway.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: HumanDuration,
    /// Bytes all device connections together may hold in unfinished frames; a connection
    /// whose partial frame would exceed it is closed.
    #[serde(default = "default_partial_frame_budget")]
    pub partial_frame_budget: ByteSize,
}

fn default_partial_frame_budget() -> ByteSize {
    ByteSize(64 * 1024 * 1024)
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}

fn default_shutdown_grace() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

/// `[log]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter such as `info` or `fieldgate=debug`; `RUST_LOG` wins.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// Human text or one JSON object per line.
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: default_log_level(),
            format: LogFormat::Text,
        }
    }
}

fn default_log_level() -> String {
    "info".into()
}

/// Log line format.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[api]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Listen address of the HTTP server.
    pub address: Spanned<SocketAddr>,
    /// Bearer token for the admin-only routes (`/debug/pprof/*` among them); without it
    /// they answer 404.
    pub admin_token: Option<String>,
    /// The admin token being rotated out: also accepted until `previous_admin_token_until`.
    pub previous_admin_token: Option<String>,
    /// When `previous_admin_token` stops working (RFC 3339, e.g. `"2026-12-03T00:00:00Z"`).
    #[serde(default, deserialize_with = "rfc3339_instant")]
    pub previous_admin_token_until: Option<std::time::SystemTime>,
    /// Time a client has to send a request's headers, counted from when the server starts
    /// waiting for them (so it also ends an idle keep-alive connection).
    #[serde(default = "default_api_header_timeout")]
    pub header_timeout: HumanDuration,
    /// A connection with no bytes read or written for this long is closed.
    #[serde(default = "default_api_idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// Open HTTP connections at most; more are refused.
    #[serde(default = "default_api_max_connections")]
    pub max_connections: usize,
    /// File descriptors kept free for device connections, buffers and the registry: the API
    /// refuses connections once fewer than this many are left under `RLIMIT_NOFILE`.
    #[serde(default = "default_api_fd_reserve")]
    pub fd_reserve: usize,
}

fn default_api_header_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
/// Above the longest CPU profile (`/debug/pprof/profile?seconds=60`), which sends nothing
/// until it is done.
fn default_api_idle_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(120))
}
fn default_api_max_connections() -> usize {
    256
}
fn default_api_fd_reserve() -> usize {
    128
}

impl ApiConfig {
    pub(super) fn check(&self, context: &Context<'_>) -> Result<(), ConfigError> {
        let whole = |field: &str, message: &str| {
            context
                .error_at(0..0, &format!("api.{field}"), message.into())
                .without_line()
        };
        if self.header_timeout.0.is_zero() {
            return Err(whole("header_timeout", "must be above 0"));
        }
        if self.idle_timeout.0.is_zero() {
            return Err(whole("idle_timeout", "must be above 0"));
        }
        if self.max_connections == 0 {
            return Err(whole("max_connections", "must be at least 1"));
        }
        if self.fd_reserve < 16 {
            return Err(whole(
                "fd_reserve",
                "must be at least 16: buffers, the registry and device listeners need them",
            ));
        }
        Ok(())
    }
}

/// An optional RFC 3339 timestamp.
fn rfc3339_instant<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<std::time::SystemTime>, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_rfc3339_weak(&text)
        .map(Some)
        .map_err(|err| {
            serde::de::Error::custom(format!(
                "{text:?} is not an RFC 3339 time such as \"2026-12-03T00:00:00Z\": {err}"
            ))
        })
}

/// `[registry]`: the device registry, kept in `<data_dir>/registry.redb`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Lifetime of a device access token (JWT).
    #[serde(default = "default_jwt_ttl")]
    pub jwt_ttl: HumanDuration,
    /// Lifetime of a refresh token; longer than `jwt_ttl`.
    #[serde(default = "default_refresh_ttl")]
    pub refresh_ttl: HumanDuration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            jwt_ttl: default_jwt_ttl(),
            refresh_ttl: default_refresh_ttl(),
        }
    }
}

/// An access token living longer than a day is a secret, not a session.
const MAX_JWT_TTL: Duration = Duration::from_secs(24 * 3600);
/// A refresh token living longer than a year outlives any sensible rotation policy.
const MAX_REFRESH_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

impl RegistryConfig {
    pub(super) fn check(&self, context: &Context<'_>) -> Result<(), ConfigError> {
        let whole = |field: &str, message: &str| {
            context
                .error_at(0..0, &format!("registry.{field}"), message.into())
                .without_line()
        };
        if self.jwt_ttl.0 < Duration::from_secs(1) || self.jwt_ttl.0 > MAX_JWT_TTL {
            return Err(whole("jwt_ttl", "must be between 1s and 24h"));
        }
        if self.refresh_ttl.0 <= self.jwt_ttl.0 || self.refresh_ttl.0 > MAX_REFRESH_TTL {
            return Err(whole(
                "refresh_ttl",
                "must be longer than jwt_ttl and at most 366 days",
            ));
        }
        Ok(())
    }
}

fn default_jwt_ttl() -> HumanDuration {
    HumanDuration(Duration::from_secs(3600))
}
fn default_refresh_ttl() -> HumanDuration {
    HumanDuration(Duration::from_secs(30 * 24 * 3600))
}

/// `[watchdog]`: how often the process is sampled and when RSS growth is alarming.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchdogConfig {
    /// Time between two samples of RSS, open FDs, tasks and buffer sizes.
    #[serde(default = "default_watchdog_interval")]
    pub interval: HumanDuration,
    /// RSS growth per minute above which the watchdog warns and writes a profile.
    #[serde(default = "default_rss_growth_limit")]
    pub rss_growth_limit: ByteSize,
    /// RSS the gateway should stay under; the watchdog acts above 90 % of it.
    #[serde(default)]
    pub rss_limit: Option<ByteSize>,
    /// Least time between two warnings with a profile.
    #[serde(default = "default_watchdog_cooldown")]
    pub cooldown: HumanDuration,
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        Self {
            interval: default_watchdog_interval(),
            rss_growth_limit: default_rss_growth_limit(),
            rss_limit: None,
            cooldown: default_watchdog_cooldown(),
        }
    }
}

/// Sampling `/proc` more often than this costs more than it tells.
const MIN_WATCHDOG_INTERVAL: Duration = Duration::from_millis(100);

impl WatchdogConfig {
    pub(super) fn check(&self, context: &Context<'_>) -> Result<(), ConfigError> {
        let whole = |field: &str, message: &str| {
            context
                .error_at(0..0, &format!("watchdog.{field}"), message.into())
                .without_line()
        };
        if self.interval.0 < MIN_WATCHDOG_INTERVAL {
            return Err(whole("interval", "must be at least 100ms"));
        }
        if self.cooldown.0.is_zero() {
            return Err(whole("cooldown", "must be above 0"));
        }
        if self.rss_growth_limit.0 == 0 {
            return Err(whole("rss_growth_limit", "must be above 0B"));
        }
        if self.rss_limit.is_some_and(|limit| limit.0 == 0) {
            return Err(whole("rss_limit", "must be above 0B"));
        }
        Ok(())
    }
}

fn default_watchdog_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_rss_growth_limit() -> ByteSize {
    ByteSize(50 * 1024 * 1024)
}
fn default_watchdog_cooldown() -> HumanDuration {
    HumanDuration(Duration::from_secs(600))
}

/// `[sources.NAME]`, by `type`.
#[derive(Debug)]
pub enum SourceConfig {
    /// `type = "tcp"`.
    Tcp(TcpSourceConfig),
}

/// `[sources.NAME]` with `type = "tcp"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpSourceConfig {
    /// Listen address.
    pub address: Spanned<SocketAddr>,
    /// How frames are delimited.
    #[serde(default)]
    pub framing: FramingConfig,
    /// Who may send.
    #[serde(default)]
    pub auth: AuthMode,
    /// Accepted tokens when `auth = "token"`.
    #[serde(default)]
    pub tokens: Vec<String>,
    /// Answer each message once it is in every buffer.
    #[serde(default)]
    pub ack: bool,
    /// Largest frame accepted.
    #[serde(default = "default_max_frame")]
    pub max_frame: ByteSize,
    /// Connections beyond this wait in the kernel's accept queue.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Per-connection frame rate limit; 0 = unlimited. Above it the gateway stops reading.
    #[serde(default)]
    pub max_frames_per_second: u32,
    /// Protocol errors tolerated before the connection is closed.
    #[serde(default = "default_max_errors")]
    pub max_errors: u32,
    /// Expected interval between frames of a live device.
    #[serde(default = "default_heartbeat_interval")]
    pub heartbeat_interval: HumanDuration,
    /// Missed intervals before a device is closed and marked offline.
    #[serde(default = "default_heartbeat_misses")]
    pub heartbeat_misses: u32,
    /// A started frame must be complete within this.
    #[serde(default = "default_frame_timeout")]
    pub frame_timeout: HumanDuration,
    /// A connection that has not named a device (hello, or a first data frame under
    /// `auth = "none"`) by then is closed; heartbeats do not count.
    #[serde(default = "default_hello_timeout")]
    pub hello_timeout: HumanDuration,
    /// Largest frame before a successful hello when `auth` is `token` or `registry`
    /// (never more than `max_frame`).
    #[serde(default = "default_unauthenticated_max_frame")]
    pub unauthenticated_max_frame: ByteSize,
    /// TLS on the listener.
    pub tls: Option<ListenerTlsConfig>,
}

impl TcpSourceConfig {
    pub(super) fn check(&self, context: &Context<'_>, name: &str) -> Result<(), ConfigError> {
        let whole = |field: &str, message: &str| {
            context
                .error_at(0..0, &format!("sources.{name}.{field}"), message.into())
                .without_line()
        };
        if !(16..=16 * 1024 * 1024).contains(&self.max_frame.0) {
            return Err(whole("max_frame", "must be between 16B and 16MiB"));
        }
        if self.heartbeat_interval.0.is_zero() || self.heartbeat_misses == 0 {
            return Err(whole(
                "heartbeat_interval",
                "heartbeat_interval and heartbeat_misses must be above 0",
            ));
        }
        if self.frame_timeout.0.is_zero() {
            return Err(whole("frame_timeout", "must be above 0"));
        }
        if self.hello_timeout.0.is_zero() {
            return Err(whole("hello_timeout", "must be above 0"));
        }
        if self.unauthenticated_max_frame.0 < 256 {
            return Err(whole("unauthenticated_max_frame", "must be at least 256B"));
        }
        if self.max_connections == 0 {
            return Err(whole("max_connections", "must be at least 1"));
        }
        if self.max_errors == 0 {
            return Err(whole("max_errors", "must be at least 1"));
        }
        if self.tokens.iter().any(String::is_empty) {
            return Err(whole("tokens", "tokens cannot be empty"));
        }
        Ok(())
    }
}

fn default_max_frame() -> ByteSize {
    ByteSize(64 * 1024)
}
fn default_max_connections() -> usize {
    10_000
}
fn default_max_errors() -> u32 {
    10
}
fn default_heartbeat_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_heartbeat_misses() -> u32 {
    3
}
fn default_frame_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_hello_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_unauthenticated_max_frame() -> ByteSize {
    ByteSize(4 * 1024)
}

/// TCP framing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FramingConfig {
    /// One JSON object per `\n`-terminated line.
    #[default]
    Lines,
    /// A u32 big-endian length, then the payload.
    LengthPrefixed,
}

/// Device authentication on a source.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Anyone who can connect may send.
    #[default]
    None,
    /// A hello with one of the configured tokens is required first.
    Token,
    /// A hello with the device's secret or JWT from the registry is required first.
    Registry,
}

/// `[sources.NAME.tls]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsConfig {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA (PEM).
    pub client_ca: Option<PathBuf>,
}

/// `[sinks.NAME]`, by `type`.
#[derive(Debug)]
pub enum SinkConfig {
    /// `type = "mqtt"` (boxed: by far the largest).
    Mqtt(Box<MqttSinkConfig>),
    /// `type = "file"`.
    File(FileSinkConfig),
    /// `type = "console"`.
    Console(ConsoleSinkConfig),
}

impl SinkConfig {
    /// The sources this sink reads.
    pub fn inputs(&self) -> &Spanned<Vec<String>> {
        match self {
            SinkConfig::Mqtt(sink) => &sink.inputs,
            SinkConfig::File(sink) => &sink.inputs,
            SinkConfig::Console(sink) => &sink.inputs,
        }
    }

    /// The buffer in front of this sink.
    pub fn buffer(&self) -> &BufferConfig {
        match self {
            SinkConfig::Mqtt(sink) => &sink.buffer,
            SinkConfig::File(sink) => &sink.buffer,
            SinkConfig::Console(sink) => &sink.buffer,
        }
    }
}

/// How an event is written out (the envelope code lives beside the event model).
pub use fieldgate_core::envelope::OutputFormat;

/// `[sinks.NAME]` with `type = "mqtt"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSinkConfig {
    /// Sources to read.
    pub inputs: Spanned<Vec<String>>,
    /// Buffer in front of the sink.
    #[serde(default)]
    pub buffer: BufferConfig,
    /// `mqtt://host:port` or `mqtts://host:port`.
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

    pub(super) fn check(&self, context: &Context<'_>, name: &str) -> Result<(), ConfigError> {
        let url = self.url.get_ref();
        if !(url.starts_with("mqtt://") || url.starts_with("mqtts://")) {
            return Err(context.error_at(
                self.url.span(),
                &format!("sinks.{name}.url"),
                format!("{url:?} must start with mqtt:// or mqtts://"),
            ));
        }
        if crate::sinks::mqtt::BrokerAddress::parse(url).is_none() {
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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsConfig {
    /// CA certificates to trust (PEM); system roots when absent.
    pub ca: Option<PathBuf>,
    /// Client certificate chain for mutual TLS (PEM).
    pub cert: Option<PathBuf>,
    /// Client private key for mutual TLS (PEM).
    pub key: Option<PathBuf>,
}

/// `[sinks.NAME]` with `type = "file"`: rotating NDJSON files.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// Sources to read.
    pub inputs: Spanned<Vec<String>>,
    /// Buffer in front of the sink.
    #[serde(default)]
    pub buffer: BufferConfig,
    /// Output directory; `<data_dir>/sinks/<name>` when absent.
    pub directory: Option<PathBuf>,
    /// Rotate after this many bytes.
    #[serde(default = "default_max_file_size")]
    pub max_file_size: ByteSize,
    /// Keep this many files; the oldest is deleted on rotation.
    #[serde(default = "default_max_files")]
    pub max_files: usize,
    /// Envelope or raw device JSON.
    #[serde(default)]
    pub format: OutputFormat,
}

fn default_max_file_size() -> ByteSize {
    ByteSize(64 * 1024 * 1024)
}
fn default_max_files() -> usize {
    10
}

/// `[sinks.NAME]` with `type = "console"`: one line per event on stdout.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSinkConfig {
    /// Sources to read.
    pub inputs: Spanned<Vec<String>>,
    /// Buffer in front of the sink.
    #[serde(default)]
    pub buffer: BufferConfig,
    /// Envelope or raw device JSON.
    #[serde(default)]
    pub format: OutputFormat,
}

/// `[sinks.NAME.buffer]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    /// Disk (default) or memory.
    #[serde(default, rename = "type")]
    pub kind: BufferKind,
    /// Largest size of the buffer's data.
    #[serde(default = "default_max_size")]
    pub max_size: ByteSize,
    /// What happens to new events when the buffer is full.
    #[serde(default)]
    pub when_full: WhenFull,
    /// When appends are forced to stable storage.
    #[serde(default)]
    pub fsync: FsyncPolicy,
    /// The period of `fsync = "interval"`.
    #[serde(default = "default_fsync_interval")]
    pub fsync_interval: HumanDuration,
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            kind: BufferKind::Disk,
            max_size: default_max_size(),
            when_full: WhenFull::Block,
            fsync: FsyncPolicy::Interval,
            fsync_interval: default_fsync_interval(),
        }
    }
}

/// The smallest buffer that can hold a largest frame with room to spare.
const MIN_BUFFER_SIZE: u64 = 1024 * 1024;

impl BufferConfig {
    pub(super) fn check(&self, context: &Context<'_>, sink: &str) -> Result<(), ConfigError> {
        let whole = |field: &str, message: &str| {
            context
                .error_at(
                    0..0,
                    &format!("sinks.{sink}.buffer.{field}"),
                    message.into(),
                )
                .without_line()
        };
        if self.max_size.0 < MIN_BUFFER_SIZE {
            return Err(whole("max_size", "must be at least 1MiB"));
        }
        if self.fsync_interval.0 < Duration::from_millis(1) {
            return Err(whole("fsync_interval", "must be at least 1ms"));
        }
        Ok(())
    }
}

fn default_max_size() -> ByteSize {
    ByteSize(1 << 30)
}
fn default_fsync_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}

/// Buffer storage.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BufferKind {
    /// Segment files in the data dir: survives restarts and crashes.
    #[default]
    Disk,
    /// RAM only: lost on restart.
    Memory,
}

/// What a full buffer does with a new event.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Wait for room: backpressure reaches the devices.
    #[default]
    Block,
    /// Drop the new event and count it.
    DropNewest,
    /// Evict the oldest buffered events and count them.
    DropOldest,
}

/// When buffer appends reach stable storage.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// Before a device is acked: nothing acked is lost even on power loss.
    Always,
    /// Every `fsync_interval`: power loss may lose up to that much.
    #[default]
    Interval,
    /// Never forced: the OS decides.
    Never,
}
