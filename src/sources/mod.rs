//! Sources: where events enter the gateway. Each turns device traffic (or the gateway's
//! own: HTTP ingestion, command results) into [`Event`]s and hands them to its
//! [`SourceOutput`].
//!
//! A source's config type lives in its module and implements [`SourceSpec`]; adding a
//! source type is one module plus one line in [`SourceConfig`]'s list.
//!
//! [`Event`]: fieldgate_core::Event

pub mod commands;
pub mod http;
#[cfg(feature = "modbus")]
pub mod modbus;
pub mod mqtt_broker;
pub mod tcp;

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::api::ingest::IngestOutput;
use crate::config::{ConfigError, Context, ListenerClaims, Settings};
use crate::devices::DeviceServices;
use crate::net::tls::ReloadableTls;
use crate::pipeline::SourceOutput;
use crate::telemetry::Metrics;

crate::config::component_types! {
    /// `[sources.NAME]`, by `type`.
    SourceConfig: dyn SourceSpec, "source";
    "tcp" => Tcp(tcp::TcpSourceConfig),
    "http" => Http(http::HttpSourceConfig),
    "commands" => Commands(commands::CommandsSourceConfig),
    #[cfg(feature = "modbus")]
    "modbus_tcp" => ModbusTcp(modbus::ModbusTcpConfig),
    #[cfg(feature = "modbus")]
    "modbus_rtu" => ModbusRtu(modbus::ModbusRtuConfig),
    "mqtt_broker" => MqttBroker(mqtt_broker::MqttBrokerSourceConfig),
}

/// What every source config offers the graph.
pub trait SourceSpec {
    /// Checks the source alone and against the gateway-wide settings; claims its
    /// listen address.
    fn check(
        &self,
        name: &str,
        settings: &Settings,
        listeners: &mut ListenerClaims<'_>,
        context: &Context<'_>,
    ) -> Result<(), ConfigError>;

    /// The largest payload one of its events can carry, for the buffer-size check.
    fn largest_event(&self) -> u64;

    /// Binds and prepares the source; the returned task runs until `context.stop`.
    fn build<'a>(
        &'a self,
        name: &'a str,
        context: SourceContext,
    ) -> BoxFuture<'a, anyhow::Result<RunningSource>>;
}

/// Everything a source gets besides its config.
pub struct SourceContext {
    /// Where its events go (the topology swaps the targets on reload).
    pub output: SourceOutput,
    /// Sessions, registry, commands, auth throttle and limits.
    pub services: Arc<DeviceServices>,
    /// HTTP ingestion's hook into the API, when the API serves it.
    pub ingest: Option<Arc<IngestOutput>>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Fires when the source must stop.
    pub stop: CancellationToken,
}

/// A built source.
pub struct RunningSource {
    /// Runs the source until its stop token fires and its connections are closed.
    pub task: BoxFuture<'static, ()>,
    /// Its TLS material, re-read in place on reload (connections stay open).
    pub tls: Option<Arc<ReloadableTls>>,
}
