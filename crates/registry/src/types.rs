//! The registry's public data types: what callers send in and get back. Plain data, no behaviour.
//!
//! Invariant: no type here ever holds a stored secret or its hash; the only secrets in these
//! types are fresh ones in [`Provisioned`] and the provisioning-token secret, each shown once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the registry lives and how long its credentials last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryOptions {
    /// The redb file, normally `<data_dir>/registry.redb`; created (with its parent dir) on first open.
    pub path: PathBuf,
    /// The gateway id: the JWT issuer (`iss`).
    pub gateway_id: String,
    /// Lifetime of access JWTs (default 1 h).
    pub jwt_ttl: Duration,
    /// Lifetime of refresh tokens (default 30 days).
    pub refresh_ttl: Duration,
    /// Lifetime of a registration challenge nonce (default 5 min).
    pub challenge_ttl: Duration,
}

impl RegistryOptions {
    /// Options with the default lifetimes for the given file and gateway id.
    pub fn new(path: impl Into<PathBuf>, gateway_id: impl Into<String>) -> RegistryOptions {
        RegistryOptions {
            path: path.into(),
            gateway_id: gateway_id.into(),
            jwt_ttl: Duration::from_secs(3600),
            refresh_ttl: Duration::from_secs(30 * 24 * 3600),
            challenge_ttl: Duration::from_secs(300),
        }
    }
}

/// A device as an admin creates it (`POST /api/v1/devices`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default, deny_unknown_fields)]
pub struct NewDevice {
    /// Device id (1..=128 of `[A-Za-z0-9._:-]`); derived from the MAC/IMEI, or random, when absent.
    pub id: Option<String>,
    /// Human-readable name.
    pub name: Option<String>,
    /// Device model.
    pub model: Option<String>,
    /// Free-form labels, filterable in listings.
    pub labels: BTreeMap<String, String>,
    /// MAC address: 6 hex octets separated by `:` or `-` or nothing; stored lowercase with `:`.
    pub mac: Option<String>,
    /// IMEI: 15 digits with a valid Luhn check digit.
    pub imei: Option<String>,
    /// Ed25519 public key, base64 (standard or URL-safe, padded or not) of 32 bytes. A device
    /// with a key gets no shared secret.
    pub public_key: Option<String>,
}

/// Fresh credentials for a device: returned once, by add, register and rotate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Provisioned {
    /// The device as stored.
    pub device: Device,
    /// The device secret (base64url of 32 random bytes); `None` for key-based devices.
    pub secret: Option<String>,
    /// An access JWT and a refresh token.
    pub tokens: Tokens,
}

/// An access token and the single-use token to renew it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Tokens {
    /// HS256 JWT signed by the gateway: `{iss, sub, iat, exp, typ: "access", ver}`.
    pub access_token: String,
    /// Seconds until `access_token` expires.
    pub expires_in: u64,
    /// Opaque, single-use refresh token for [`crate::Registry::refresh`].
    pub refresh_token: String,
}

/// A registered device. Never contains a secret or its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Device {
    /// Device id.
    pub id: String,
    /// Human-readable name.
    pub name: Option<String>,
    /// Device model.
    pub model: Option<String>,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
    /// Normalised MAC (`00:11:22:33:44:55`).
    pub mac: Option<String>,
    /// IMEI (15 digits).
    pub imei: Option<String>,
    /// Ed25519 public key, standard base64 of 32 bytes.
    pub public_key: Option<String>,
    /// Creation time, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// Last connection or message, ms since the Unix epoch.
    pub last_seen_ms: Option<u64>,
    /// Online, offline or revoked.
    pub status: DeviceStatus,
    /// Messages received from this device.
    pub messages: u64,
    /// Payload bytes received from this device.
    pub bytes: u64,
    /// Errors counted against this device (protocol errors, failed auth).
    pub errors: u64,
}

/// A device's state as the gateway sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DeviceStatus {
    /// At least one open connection.
    Online,
    /// No open connection.
    Offline,
    /// Revoked by an admin: every authentication fails.
    Revoked,
}

impl DeviceStatus {
    /// The snake_case name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Online => "online",
            DeviceStatus::Offline => "offline",
            DeviceStatus::Revoked => "revoked",
        }
    }
}

/// Filters and paging for [`crate::Registry::list_devices`]. Devices are listed in id order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct DeviceQuery {
    /// Only devices with this status.
    pub status: Option<DeviceStatus>,
    /// Only devices with this label key set to this value.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Vec<String>>))]
    pub label: Option<(String, String)>,
    /// Only devices of this model (exact match).
    pub model: Option<String>,
    /// Case-insensitive substring of id, name, MAC or IMEI.
    pub search: Option<String>,
    /// `next_cursor` of the previous page; the page starts after it.
    pub cursor: Option<String>,
    /// Page size, clamped to 1..=1000 (default 100).
    pub limit: usize,
}

impl Default for DeviceQuery {
    fn default() -> DeviceQuery {
        DeviceQuery {
            status: None,
            label: None,
            model: None,
            search: None,
            cursor: None,
            limit: DEFAULT_PAGE_LIMIT,
        }
    }
}

/// Default page size of [`DeviceQuery`].
pub const DEFAULT_PAGE_LIMIT: usize = 100;
/// Largest page size of [`DeviceQuery`].
pub const MAX_PAGE_LIMIT: usize = 1000;

/// One page of devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DevicePage {
    /// The devices of this page, in id order.
    pub devices: Vec<Device>,
    /// Cursor for the next page; `None` on the last page.
    pub next_cursor: Option<String>,
    /// Number of devices matching the filters, over all pages.
    pub total: usize,
}

/// Changes to a device: `None` leaves a field alone, `Some(None)` clears it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default, deny_unknown_fields)]
pub struct DevicePatch {
    /// New name (`null` clears it).
    #[serde(deserialize_with = "crate::types::double_option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub name: Option<Option<String>>,
    /// New model (`null` clears it).
    #[serde(deserialize_with = "crate::types::double_option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub model: Option<Option<String>>,
    /// New labels, replacing all old ones.
    pub labels: Option<BTreeMap<String, String>>,
}

/// A provisioning token as an admin creates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewProvisioningToken {
    /// What the token is for.
    #[serde(default)]
    pub label: Option<String>,
    /// How many registrations it allows (>= 1).
    #[serde(default = "one")]
    pub max_uses: u32,
    /// How long it is valid, e.g. `"24h"` (a humantime string; a number is seconds).
    #[serde(with = "crate::types::duration_text", default = "one_day")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "24h"))]
    pub ttl: Duration,
}

fn one() -> u32 {
    1
}

fn one_day() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// A provisioning token, without its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProvisioningToken {
    /// Token id (`pt-` + 16 hex digits); not a secret.
    pub id: String,
    /// What the token is for.
    pub label: Option<String>,
    /// How many registrations it allows.
    pub max_uses: u32,
    /// How many it has been used for.
    pub uses: u32,
    /// Expiry, ms since the Unix epoch.
    pub expires_at_ms: u64,
    /// Revoked by an admin.
    pub revoked: bool,
    /// Creation time, ms since the Unix epoch.
    pub created_at_ms: u64,
}

/// A single-use registration challenge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Challenge {
    /// Standard base64 of 32 random bytes. The device signs the decoded 32 bytes.
    pub nonce: String,
    /// Expiry, ms since the Unix epoch.
    pub expires_at_ms: u64,
}

/// A device's self-registration request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default, deny_unknown_fields)]
pub struct Registration {
    /// The provisioning token secret given by an admin.
    pub provisioning_token: String,
    /// MAC address; the device id becomes `mac-001122334455`.
    pub mac: Option<String>,
    /// IMEI; the device id becomes `imei-<15 digits>` (when no MAC is given).
    pub imei: Option<String>,
    /// Ed25519 public key (base64 of 32 bytes); requires `nonce` and `signature`.
    pub public_key: Option<String>,
    /// A nonce from [`crate::Registry::challenge`], exactly as returned.
    pub nonce: Option<String>,
    /// Base64 Ed25519 signature (64 bytes) over the nonce's decoded 32 bytes.
    pub signature: Option<String>,
    /// Human-readable name.
    pub name: Option<String>,
    /// Device model.
    pub model: Option<String>,
}

/// A command for a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewCommand {
    /// Command id, unique per device (1..=128 of `[A-Za-z0-9._:-]`); the idempotency key.
    pub id: String,
    /// Command name, e.g. `reboot`.
    pub name: String,
    /// Parameters, any JSON (default `{}`).
    #[serde(default = "empty_object")]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub params: serde_json::Value,
    /// Time to live, e.g. `"5m"` (default `"1h"`; a number is seconds).
    #[serde(with = "crate::types::duration_text", default = "one_hour")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "5m"))]
    pub ttl: Duration,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

fn one_hour() -> Duration {
    Duration::from_secs(3600)
}

/// A command and where it is in its life.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Command {
    /// Command id (unique per device).
    pub id: String,
    /// Target device.
    pub device_id: String,
    /// Command name.
    pub name: String,
    /// Parameters.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub params: serde_json::Value,
    /// Current state.
    pub state: CommandState,
    /// Submission time, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// After this, a queued or sent command expires.
    pub expires_at_ms: u64,
    /// Last state change, ms since the Unix epoch.
    pub updated_at_ms: u64,
    /// The device's result (for succeeded / failed).
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub result: Option<serde_json::Value>,
}

/// Command states: queued → sent → delivered → succeeded | failed; queued | sent → expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum CommandState {
    /// Waiting for the device.
    Queued,
    /// Written to the device's transport.
    Sent,
    /// Acknowledged by the device.
    Delivered,
    /// Done, successfully.
    Succeeded,
    /// Done, unsuccessfully.
    Failed,
    /// Not delivered before its TTL.
    Expired,
}

impl CommandState {
    /// The snake_case name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandState::Queued => "queued",
            CommandState::Sent => "sent",
            CommandState::Delivered => "delivered",
            CommandState::Succeeded => "succeeded",
            CommandState::Failed => "failed",
            CommandState::Expired => "expired",
        }
    }

    /// Succeeded, failed or expired: no further transition.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            CommandState::Succeeded | CommandState::Failed | CommandState::Expired
        )
    }

    /// Whether `self -> next` is allowed. Forward skips are allowed (a transport without
    /// delivery receipts may go sent → succeeded, or queued → delivered); staying put is not.
    pub fn can_become(self, next: CommandState) -> bool {
        use CommandState::*;
        match (self, next) {
            (Queued | Sent, Expired) => true,
            (_, Expired) => false,
            (Queued, Sent | Delivered | Succeeded | Failed) => true,
            (Sent, Delivered | Succeeded | Failed) => true,
            (Delivered, Succeeded | Failed) => true,
            _ => false,
        }
    }
}

/// Accept a field that is present-and-null as `Some(None)` (absent stays `None` via `default`).
pub(crate) fn double_option<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

/// Durations as humantime text (`"5m"`), or a plain number of seconds on input.
pub(crate) mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub(crate) fn serialize<S: Serializer>(
        value: &Duration,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*value).to_string())
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Text {
        Seconds(u64),
        Human(String),
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Duration, D::Error> {
        match Text::deserialize(deserializer)? {
            Text::Seconds(secs) => Ok(Duration::from_secs(secs)),
            Text::Human(text) if text.len() <= 64 => humantime::parse_duration(&text)
                .map_err(|error| D::Error::custom(format!("invalid duration {text:?}: {error}"))),
            Text::Human(_) => Err(D::Error::custom("duration text longer than 64 bytes")),
        }
    }
}
