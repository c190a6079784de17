//! The gateway's one TOML file: plain data, loaded and validated before anything starts.
//!
//! Loading goes text → `${VAR}` interpolation → spanned TOML document → one typed struct
//! per component, so every error can name the file, the line and the key path. `check`
//! and `run` share this code; nothing here opens a socket.

mod error;
mod interpolate;
mod types;
mod units;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

pub use error::ConfigError;

/// The pseudo-source of HTTP ingestion (`POST /api/v1/devices/{id}/telemetry`) that sinks
/// list in `inputs`; available with `[registry]`.
pub const HTTP_SOURCE: &str = "http";
pub use types::*;

/// The config used by `fieldgate run` without `--config`: TCP devices on 127.0.0.1:7000,
/// the API on 127.0.0.1:8080, and a local NDJSON file sink plus the console.
pub const DEFAULT_CONFIG: &str = include_str!("default.toml");

/// Loads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
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
pub fn parse(
    file: &str,
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let text = interpolate::interpolate(text, env).map_err(|err| {
        let raw = error::Context { file, text };
        ConfigError {
            file: file.to_owned(),
            line: Some(err.line),
            key: raw.key_path_on_line(err.line),
            message: err.message,
        }
    })?;
    let context = error::Context { file, text: &text };
    let mut root = DeTable::parse(&text).map_err(|err| context.toml_error(&err, ""))?;
    let root_span = root.span();
    let sources = take_table(root.get_mut(), "sources", &context)?;
    let sinks = take_table(root.get_mut(), "sinks", &context)?;
    let top: TopLevel = deserialize(
        Spanned::new(root_span, DeValue::Table(root.into_inner())),
        &context,
        "",
    )?;

    let mut source_configs = BTreeMap::new();
    for (name, value) in sources {
        let path = format!("sources.{name}");
        let (kind, table) = component_type(value, &context, &path)?;
        let source = match kind.get_ref().as_str() {
            "tcp" => SourceConfig::Tcp(deserialize(table, &context, &path)?),
            other => {
                return Err(context.error_at(
                    kind.span(),
                    &format!("{path}.type"),
                    format!("unknown source type {other:?}; expected \"tcp\""),
                ));
            }
        };
        source_configs.insert(name, source);
    }

    let mut sink_configs = BTreeMap::new();
    for (name, value) in sinks {
        let path = format!("sinks.{name}");
        let (kind, table) = component_type(value, &context, &path)?;
        let sink = match kind.get_ref().as_str() {
            "mqtt" => SinkConfig::Mqtt(deserialize(table, &context, &path)?),
            "file" => SinkConfig::File(deserialize(table, &context, &path)?),
            "console" => SinkConfig::Console(deserialize(table, &context, &path)?),
            other => {
                return Err(context.error_at(
                    kind.span(),
                    &format!("{path}.type"),
                    format!(
                        "unknown sink type {other:?}; expected \"mqtt\", \"file\" or \"console\""
                    ),
                ));
            }
        };
        sink_configs.insert(name, sink);
    }

    let config = Config {
        gateway: top.gateway,
        log: top.log,
        api: top.api,
        watchdog: top.watchdog,
        registry: top.registry,
        sources: source_configs,
        sinks: sink_configs,
    };
    validate(&config, &context)?;
    Ok(config)
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
    #[serde(rename = "sinks", default)]
    _sinks: Option<serde::de::IgnoredAny>,
}

/// Removes `[key]` (a table of named components) from the root table.
fn take_table<'i>(
    root: &mut DeTable<'i>,
    key: &str,
    context: &error::Context<'_>,
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

/// Splits a component table into its `type` and the remaining keys.
fn component_type<'i>(
    value: Spanned<DeValue<'i>>,
    context: &error::Context<'_>,
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

fn deserialize<T: DeserializeOwned>(
    value: Spanned<DeValue<'_>>,
    context: &error::Context<'_>,
    path: &str,
) -> Result<T, ConfigError> {
    T::deserialize(ValueDeserializer::from(value)).map_err(|err| context.toml_error(&err, path))
}

/// Why a source whose devices name themselves without proof cannot share a gateway with
/// the registry: one device id namespace, so a claimed id could be a registered device's.
fn unproven_beside_registry(auth: AuthMode) -> String {
    let mode = match auth {
        AuthMode::None => "\"none\"",
        AuthMode::Token => "\"token\"",
        AuthMode::Registry => "\"registry\"",
    };
    format!(
        "auth = {mode} cannot be used beside [registry]: its devices name themselves without \
         proof, so one could claim a registered device's id, receive that device's commands \
         and report their results; use auth = \"registry\" on this source, or run \
         unregistered devices on a gateway without [registry]"
    )
}

/// Checks what one component cannot check alone: references and shared resources.
fn validate(config: &Config, context: &error::Context<'_>) -> Result<(), ConfigError> {
    if config.gateway.id.is_empty()
        || !config
            .gateway
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return Err(context
            .error_at(
                0..0,
                "gateway.id",
                format!(
                    "invalid gateway id {:?}: use 1 or more of A-Z a-z 0-9 . _ -",
                    config.gateway.id
                ),
            )
            .without_line());
    }
    if config.sinks.is_empty() {
        return Err(context
            .error_at(0..0, "sinks", "at least one sink is required".into())
            .without_line());
    }
    let mut listeners: Vec<(SocketAddr, String)> = Vec::new();
    let mut claim = |address: &Spanned<SocketAddr>, key: String| {
        let addr = *address.get_ref();
        for (other, other_key) in &listeners {
            let overlaps = other.ip() == addr.ip()
                || other.ip().is_unspecified()
                || addr.ip().is_unspecified();
            if other.port() == addr.port() && overlaps {
                return Err(context.error_at(
                    address.span(),
                    &key,
                    format!(
                        "{addr} is already used by `{other_key}`; two listeners cannot share a port"
                    ),
                ));
            }
        }
        listeners.push((addr, key));
        Ok(())
    };
    if let Some(api) = &config.api {
        claim(&api.address, "api.address".into())?;
        api.check(context)?;
        if api.admin_token.as_deref().is_some_and(str::is_empty) {
            return Err(context
                .error_at(
                    0..0,
                    "api.admin_token",
                    "cannot be empty; leave the key out to turn the admin routes off".into(),
                )
                .without_line());
        }
        let previous = (
            api.previous_admin_token.as_deref(),
            api.previous_admin_token_until,
        );
        let previous_error = match previous {
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => {
                Some("needs both previous_admin_token and previous_admin_token_until")
            }
            (Some(""), _) => Some("cannot be empty"),
            (Some(_), _) if api.admin_token.is_none() => Some("needs api.admin_token"),
            (Some(old), _) if api.admin_token.as_deref() == Some(old) => {
                Some("must differ from api.admin_token")
            }
            (Some(_), Some(_)) => None,
        };
        if let Some(message) = previous_error {
            return Err(context
                .error_at(0..0, "api.previous_admin_token", message.into())
                .without_line());
        }
    }
    config.watchdog.check(context)?;
    if let Some(registry) = &config.registry {
        registry.check(context)?;
        if config.sources.contains_key(HTTP_SOURCE) {
            return Err(context
                .error_at(
                    0..0,
                    &format!("sources.{HTTP_SOURCE}"),
                    format!("{HTTP_SOURCE:?} is the registry's HTTP ingestion source; rename this source"),
                )
                .without_line());
        }
    }
    if let Err(err) = tracing_subscriber::EnvFilter::try_new(&config.log.level) {
        return Err(context
            .error_at(
                0..0,
                "log.level",
                format!("invalid log filter {:?}: {err}", config.log.level),
            )
            .without_line());
    }
    let largest_frame = config
        .sources
        .values()
        .map(|source| match source {
            SourceConfig::Tcp(tcp) => tcp.max_frame.0,
        })
        .max()
        .unwrap_or(0);
    if config.gateway.partial_frame_budget.0 < largest_frame.max(64 * 1024) {
        return Err(context
            .error_at(
                0..0,
                "gateway.partial_frame_budget",
                "must be at least 64KiB and at least the largest max_frame of a source".into(),
            )
            .without_line());
    }
    if config.gateway.shutdown_grace.0.is_zero() {
        return Err(context
            .error_at(0..0, "gateway.shutdown_grace", "must be above 0".into())
            .without_line());
    }
    for (name, source) in &config.sources {
        match source {
            SourceConfig::Tcp(tcp) => {
                claim(&tcp.address, format!("sources.{name}.address"))?;
                tcp.check(context, name)?;
                if tcp.auth == AuthMode::Registry && config.registry.is_none() {
                    return Err(context
                        .error_at(
                            0..0,
                            &format!("sources.{name}.auth"),
                            "auth = \"registry\" needs a [registry] table".into(),
                        )
                        .without_line());
                }
                if config.registry.is_some() && tcp.auth != AuthMode::Registry {
                    return Err(context
                        .error_at(
                            0..0,
                            &format!("sources.{name}.auth"),
                            unproven_beside_registry(tcp.auth),
                        )
                        .without_line());
                }
                if tcp.auth == AuthMode::Token && tcp.tokens.is_empty() {
                    return Err(context
                        .error_at(
                            0..0,
                            &format!("sources.{name}.tokens"),
                            "auth = \"token\" needs at least one token".into(),
                        )
                        .without_line());
                }
            }
        }
    }
    for (name, sink) in &config.sinks {
        if sink.inputs().get_ref().is_empty() {
            return Err(context.error_at(
                sink.inputs().span(),
                &format!("sinks.{name}.inputs"),
                "a sink needs at least one input".into(),
            ));
        }
        for input in sink.inputs().get_ref() {
            if input == HTTP_SOURCE && config.registry.is_some() {
                if config.api.is_none() {
                    return Err(context.error_at(
                        sink.inputs().span(),
                        &format!("sinks.{name}.inputs"),
                        format!("input {HTTP_SOURCE:?} (HTTP ingestion) needs an [api] section"),
                    ));
                }
                continue;
            }
            if !config.sources.contains_key(input) {
                let known: Vec<&str> = config.sources.keys().map(String::as_str).collect();
                return Err(context.error_at(
                    sink.inputs().span(),
                    &format!("sinks.{name}.inputs"),
                    format!("input {input:?} names no source (sources: {known:?})"),
                ));
            }
        }
        sink.buffer().check(context, name)?;
        check_largest_frames_fit(config, context, name, sink)?;
        if let SinkConfig::Mqtt(mqtt) = sink {
            mqtt.check(context, name)?;
        }
    }
    for name in config.sources.keys() {
        let read = config
            .sinks
            .values()
            .any(|sink| sink.inputs().get_ref().contains(name));
        if !read {
            return Err(context
                .error_at(
                    0..0,
                    &format!("sources.{name}"),
                    "no sink lists this source in `inputs`; its events would be lost".into(),
                )
                .without_line());
        }
    }
    Ok(())
}

/// Every source's largest event must fit the (empty) buffer of each sink it feeds: under
/// `when_full = "block"` a larger one would wait for room that can never exist, and under
/// the other policies it would be dropped every time.
fn check_largest_frames_fit(
    config: &Config,
    context: &error::Context<'_>,
    sink_name: &str,
    sink: &SinkConfig,
) -> Result<(), ConfigError> {
    let largest = crate::buffer::largest_record(sink.buffer());
    let max_size = sink.buffer().max_size.0;
    for input in sink.inputs().get_ref() {
        let (frame, frame_key) = match config.sources.get(input) {
            Some(SourceConfig::Tcp(tcp)) => (tcp.max_frame.0, format!("sources.{input}.max_frame")),
            None if input == HTTP_SOURCE => (
                crate::api::ingest::MAX_BODY as u64,
                format!("the {HTTP_SOURCE:?} ingestion body limit"),
            ),
            None => continue,
        };
        let needed = fieldgate_core::Event::max_encoded_len(
            frame,
            fieldgate_codec::MAX_DEVICE_ID_LEN,
            input.len(),
        );
        if needed > largest {
            return Err(context
                .error_at(
                    0..0,
                    &format!("sinks.{sink_name}.buffer.max_size"),
                    format!(
                        "{max_size} bytes cannot hold the largest event of input {input:?}: \
                         {frame_key} = {frame} bytes needs {needed} bytes in the buffer with \
                         its event header and the buffer's framing, and at most {largest} fit; \
                         raise sinks.{sink_name}.buffer.max_size or lower {frame_key}"
                    ),
                )
                .without_line());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
