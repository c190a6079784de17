//! The gateway's one TOML file: plain data, loaded and validated before anything starts.
//!
//! Loading goes text → `${VAR}` interpolation → spanned TOML document → typed sections,
//! so every error can name the file, the line and the key path. This module knows the
//! gateway-wide sections; the component tables (`[sources.*]`, `[transforms.*]`,
//! `[sinks.*]`) are handed to a [`Components`] implementation, which lives with the
//! components (see `crate::topology::graph`). `check`, `run` and reload share this code;
//! nothing here opens a socket.

mod component_types;
mod error;
mod interpolate;
mod listeners;
mod redact;
mod settings;
mod units;

use sha2::Digest as _;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

pub(crate) use component_types::component_types;
pub use error::{ConfigError, Context};
pub use listeners::ListenerClaims;
pub use settings::*;
pub use units::{ByteSize, HumanDuration};

/// The config used by `fieldgate run` without `--config`: TCP devices on 127.0.0.1:7000,
/// the API on 127.0.0.1:8080, and a local NDJSON file sink plus the console.
pub const DEFAULT_CONFIG: &str = include_str!("default.toml");

/// A whole config: the gateway-wide sections plus the components `C`.
#[derive(Debug)]
pub struct Config<C> {
    /// `[gateway]`, `[log]`, `[api]`, `[watchdog]`, `[registry]`.
    pub settings: Settings,
    /// `[sources.*]`, `[transforms.*]`, `[sinks.*]`, typed and checked as a graph.
    pub components: C,
    /// SHA-256 of the interpolated text, in hex: identifies the running config.
    pub hash: String,
    /// The interpolated text, for the redacted view of `GET /api/v1/config`.
    text: String,
}

impl<C> Config<C> {
    /// The config as JSON, with every secret (tokens, passwords) replaced by `"<redacted>"`.
    pub fn redacted(&self) -> serde_json::Value {
        redact::redacted(&self.text)
    }
}

/// The gateway-wide sections.
#[derive(Debug, PartialEq)]
pub struct Settings {
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
}

/// One `[KIND.NAME]` table before it is typed: its `type` and the other keys.
pub struct ComponentTable<'i> {
    /// The component's name (`devices` in `[sources.devices]`).
    pub name: String,
    /// Its key path (`sources.devices`), for errors.
    pub path: String,
    /// The value of `type`.
    pub type_name: Spanned<String>,
    /// Every key but `type`.
    table: Spanned<DeValue<'i>>,
}

impl ComponentTable<'_> {
    /// Deserializes the table into a component's config type.
    pub fn parse<T: serde::de::DeserializeOwned>(
        self,
        context: &Context<'_>,
    ) -> Result<T, ConfigError> {
        deserialize(self.table, context, &self.path)
    }

    /// Takes `key` out of the table (a key every component of a kind shares, read before
    /// the table is typed), deserialized; `None` when absent.
    pub fn take<T: serde::de::DeserializeOwned>(
        &mut self,
        key: &str,
        context: &Context<'_>,
    ) -> Result<Option<T>, ConfigError> {
        let DeValue::Table(table) = self.table.get_mut() else {
            return Ok(None);
        };
        let Some(value) = table.remove(key) else {
            return Ok(None);
        };
        // The error names the key from its line (`sinks.x` + `key`); without a line, the
        // key is added here.
        deserialize(value, context, &self.path)
            .map(Some)
            .map_err(|mut err| {
                if err.key.as_deref() == Some(self.path.as_str()) {
                    err.key = Some(format!("{}.{key}", self.path));
                }
                err
            })
    }

    /// The error for a `type` nobody knows; `known` lists the valid ones.
    pub fn unknown_type(&self, context: &Context<'_>, kind: &str, known: &[&str]) -> ConfigError {
        let known: Vec<String> = known.iter().map(|name| format!("{name:?}")).collect();
        context.error_at(
            self.type_name.span(),
            &format!("{}.type", self.path),
            format!(
                "unknown {kind} type {:?}; expected one of {}",
                self.type_name.get_ref(),
                known.join(", ")
            ),
        )
    }
}

/// The component tables of a document, by kind.
pub struct ComponentTables<'i> {
    /// `[sources.*]`.
    pub sources: Vec<ComponentTable<'i>>,
    /// `[transforms.*]`.
    pub transforms: Vec<ComponentTable<'i>>,
    /// `[sinks.*]`.
    pub sinks: Vec<ComponentTable<'i>>,
}

/// What the component side of a config implements: typing the tables and checking the
/// graph they form, given the (already checked) gateway-wide settings.
pub trait Components: Sized {
    /// Types every table and checks the whole graph.
    fn parse(
        tables: ComponentTables<'_>,
        settings: &Settings,
        listeners: &mut ListenerClaims<'_>,
        context: &Context<'_>,
    ) -> Result<Self, ConfigError>;
}

/// Loads and validates a config file.
pub fn load<C: Components>(path: &std::path::Path) -> Result<Config<C>, ConfigError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|err| ConfigError {
        file: name.clone(),
        line: None,
        key: None,
        message: format!("cannot read the config file: {err}"),
    })?;
    parse(&name, &text, |var| std::env::var(var).ok())
}

/// Parses and validates config text; `file` names it in errors, `env` resolves `${VAR}`.
pub fn parse<C: Components>(
    file: &str,
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Config<C>, ConfigError> {
    let text = interpolate::interpolate(text, env).map_err(|err| {
        let raw = Context { file, text };
        ConfigError {
            file: file.to_owned(),
            line: Some(err.line),
            key: raw.key_path_on_line(err.line),
            message: err.message,
        }
    })?;
    let context = Context { file, text: &text };
    let mut root = DeTable::parse(&text).map_err(|err| context.toml_error(&err, ""))?;
    let root_span = root.span();
    let sources = take_table(root.get_mut(), "sources", &context)?;
    let transforms = take_table(root.get_mut(), "transforms", &context)?;
    let sinks = take_table(root.get_mut(), "sinks", &context)?;
    // The top level first: a typo such as `[sink.x]` is reported as such, not as a
    // component missing its `type`.
    let top: TopLevel = deserialize(
        Spanned::new(root_span, DeValue::Table(root.into_inner())),
        &context,
        "",
    )?;
    let tables = ComponentTables {
        sources: split_components(sources, "sources", &context)?,
        transforms: split_components(transforms, "transforms", &context)?,
        sinks: split_components(sinks, "sinks", &context)?,
    };
    let settings = Settings {
        gateway: top.gateway,
        log: top.log,
        api: top.api,
        watchdog: top.watchdog,
        registry: top.registry,
    };
    settings.check(&context)?;
    let mut listeners = ListenerClaims::new(&context);
    if let Some(api) = &settings.api {
        listeners.claim(&api.address, "api.address".into())?;
    }
    let components = C::parse(tables, &settings, &mut listeners, &context)?;
    let hash = hex(&sha2::Sha256::digest(text.as_bytes()));
    Ok(Config {
        settings,
        components,
        hash,
        text: text.into_owned(),
    })
}

/// Lower-case hex of `bytes` (the config hash, file fingerprints).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The top-level keys other than the component maps.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TopLevel {
    gateway: GatewayConfig,
    #[serde(default)]
    log: LogConfig,
    api: Option<ApiConfig>,
    #[serde(default)]
    watchdog: WatchdogConfig,
    registry: Option<RegistryConfig>,
    // Taken out before this struct is read; named here so a typo such as `[sink.x]`
    // lists them among the expected keys.
    #[serde(rename = "sources", default)]
    _sources: Option<serde::de::IgnoredAny>,
    #[serde(rename = "transforms", default)]
    _transforms: Option<serde::de::IgnoredAny>,
    #[serde(rename = "sinks", default)]
    _sinks: Option<serde::de::IgnoredAny>,
}

/// Removes `[key]` (a table of named components) from the root table.
fn take_table<'i>(
    root: &mut DeTable<'i>,
    key: &str,
    context: &Context<'_>,
) -> Result<Vec<(String, Spanned<DeValue<'i>>)>, ConfigError> {
    let Some(value) = root.remove(key) else {
        return Ok(Vec::new());
    };
    let span = value.span();
    match value.into_inner() {
        DeValue::Table(table) => Ok(table
            .into_iter()
            .map(|(name, value)| (name.into_inner().into_owned(), value))
            .collect()),
        other => Err(context.error_at(
            span,
            key,
            format!(
                "expected a table of named components, found {}",
                other.type_str()
            ),
        )),
    }
}

/// Splits each component of `[key]` into its `type` and the other keys.
fn split_components<'i>(
    components: Vec<(String, Spanned<DeValue<'i>>)>,
    key: &str,
    context: &Context<'_>,
) -> Result<Vec<ComponentTable<'i>>, ConfigError> {
    components
        .into_iter()
        .map(|(name, value)| {
            let path = format!("{key}.{name}");
            let (type_name, table) = component_type(value, context, &path)?;
            Ok(ComponentTable {
                name,
                path,
                type_name,
                table,
            })
        })
        .collect()
}

/// Splits a component table into its `type` and the remaining keys.
fn component_type<'i>(
    value: Spanned<DeValue<'i>>,
    context: &Context<'_>,
    path: &str,
) -> Result<(Spanned<String>, Spanned<DeValue<'i>>), ConfigError> {
    let span = value.span();
    let DeValue::Table(mut table) = value.into_inner() else {
        return Err(context.error_at(span.clone(), path, "expected a table".into()));
    };
    let Some(kind) = table.remove("type") else {
        return Err(context.error_at(span, path, "missing key `type`".into()));
    };
    let kind_span = kind.span();
    let Some(kind_name) = kind.get_ref().as_str().map(str::to_owned) else {
        return Err(context.error_at(
            kind_span,
            &format!("{path}.type"),
            "expected a string".into(),
        ));
    };
    Ok((
        Spanned::new(kind_span, kind_name),
        Spanned::new(span, DeValue::Table(table)),
    ))
}

fn deserialize<T: serde::de::DeserializeOwned>(
    value: Spanned<DeValue<'_>>,
    context: &Context<'_>,
    path: &str,
) -> Result<T, ConfigError> {
    T::deserialize(ValueDeserializer::from(value)).map_err(|err| context.toml_error(&err, path))
}

impl Settings {
    /// Checks what the gateway-wide sections cannot check field by field.
    fn check(&self, context: &Context<'_>) -> Result<(), ConfigError> {
        let id = &self.gateway.id;
        if id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return Err(context.key_error(
                "gateway.id",
                format!("invalid gateway id {id:?}: use 1 or more of A-Z a-z 0-9 . _ -"),
            ));
        }
        if self.gateway.shutdown_grace.0.is_zero() {
            return Err(context.key_error("gateway.shutdown_grace", "must be above 0"));
        }
        let checkpoint = self.gateway.checkpoint_interval.0;
        if checkpoint < std::time::Duration::from_millis(100)
            || checkpoint > std::time::Duration::from_secs(3600)
        {
            return Err(context.key_error(
                "gateway.checkpoint_interval",
                "must be between 100ms and 1h",
            ));
        }
        if self.gateway.partial_frame_budget.0 < 64 * 1024 {
            return Err(context.key_error(
                "gateway.partial_frame_budget",
                "must be at least 64KiB and at least the largest max_frame of a source",
            ));
        }
        if let Some(api) = &self.api {
            api.check(context)?;
        }
        self.watchdog.check(context)?;
        if let Some(registry) = &self.registry {
            registry.check(context)?;
        }
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(context.key_error(
                "log.level",
                format!("invalid log filter {:?}: {err}", self.log.level),
            ));
        }
        Ok(())
    }
}
