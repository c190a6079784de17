//! Configs of the TCP device source: `[sources.NAME]` with `type = "tcp"`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::config::{ByteSize, ConfigError, Context, HumanDuration};

/// `[sources.NAME]` with `type = "tcp"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
    pub fn check_fields(&self, context: &Context<'_>, name: &str) -> Result<(), ConfigError> {
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsConfig {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA (PEM).
    pub client_ca: Option<PathBuf>,
}
