//! The gateway-wide sections of the config: `[gateway]`, `[log]`, `[api]`, `[registry]`,
//! `[watchdog]`. Plain data with defaults; components bring their own config types.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::error::{ConfigError, Context};
use super::units::{ByteSize, HumanDuration};

/// `[gateway]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
    /// How often stateful transforms (alarms, smoothing, ...) write their state to
    /// `<data_dir>/transforms/NAME.state`; also written at a graceful shutdown.
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval: HumanDuration,
}

fn default_checkpoint_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
        if self.admin_token.as_deref().is_some_and(str::is_empty) {
            return Err(whole(
                "admin_token",
                "cannot be empty; leave the key out to turn the admin routes off",
            ));
        }
        let previous_error = match (
            self.previous_admin_token.as_deref(),
            self.previous_admin_token_until,
        ) {
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => {
                Some("needs both previous_admin_token and previous_admin_token_until")
            }
            (Some(""), _) => Some("cannot be empty"),
            (Some(_), _) if self.admin_token.is_none() => Some("needs api.admin_token"),
            (Some(old), _) if self.admin_token.as_deref() == Some(old) => {
                Some("must differ from api.admin_token")
            }
            (Some(_), Some(_)) => None,
        };
        if let Some(message) = previous_error {
            return Err(whole("previous_admin_token", message));
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
