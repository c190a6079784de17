//! Sinks: where events leave the gateway. Each reads its own buffer and acknowledges
//! records only once its destination has them.
//!
//! A sink may name a `failover` sink that takes its new events while its upstream is
//! unreachable ([`failover`]); sinks with an upstream report their link's health for it
//! ([`link`]).
//!
//! A sink's config type lives in its module and implements [`SinkSpec`]; adding a sink
//! type is one module plus one line in [`SinkConfig`]'s list.

pub mod console;
pub mod deadletter;
pub mod failover;
pub mod file;
pub mod link;
pub mod mqtt;
mod topic;

use std::path::PathBuf;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use toml::Spanned;

pub use topic::{TopicTemplate, single_wildcard_match};

use self::deadletter::DeadLetters;
use crate::buffer::{BufferConfig, SinkBuffer};
use crate::config::{ConfigError, Context};
use crate::devices::commands::CommandDispatcher;
use crate::devices::directory::DeviceDirectory;
use crate::pipeline::WeakIntake;
use crate::telemetry::Metrics;

crate::config::component_types! {
    /// `[sinks.NAME]`, by `type`.
    SinkConfig: dyn SinkSpec, "sink";
    "mqtt" => Mqtt(mqtt::MqttSinkConfig),
    "file" => File(file::FileSinkConfig),
    "console" => Console(console::ConsoleSinkConfig),
}

/// What every sink config offers the graph.
pub trait SinkSpec {
    /// The sources and transform outputs it reads.
    fn inputs(&self) -> &Spanned<Vec<String>>;

    /// The same, to compare two configs regardless of their inputs.
    fn inputs_mut(&mut self) -> &mut Spanned<Vec<String>>;

    /// The buffer in front of it.
    fn buffer(&self) -> &BufferConfig;

    /// Checks what serde cannot (ranges, URLs, topic templates).
    fn check(&self, _name: &str, _context: &Context<'_>) -> Result<(), ConfigError> {
        Ok(())
    }

    /// Whether its upstream can refuse an event for good (it then gets a dead-letter store).
    fn dead_letters(&self) -> bool {
        false
    }

    /// Whether it has an upstream link that can be unreachable (and so reports its
    /// [`link::LinkHealth`]); only such a sink may name a `failover` sink.
    fn has_upstream(&self) -> bool {
        false
    }

    /// Files it reads at start (TLS material): a change to one restarts the sink on
    /// reload even when its config is unchanged.
    fn watched_files(&self) -> Vec<PathBuf> {
        Vec::new()
    }

    /// The running sink: reads `context.buffer` until `context.stop`.
    fn build(&self, context: SinkContext) -> BoxFuture<'static, ()>;
}

/// Everything a running sink gets besides its config.
pub struct SinkContext {
    /// The sink's name.
    pub name: String,
    /// Its buffer.
    pub buffer: Arc<SinkBuffer>,
    /// The gateway id, for topics and the client id.
    pub gateway: String,
    /// The data directory (file sink default directory, QoS 2 session state).
    pub data_dir: PathBuf,
    /// Connected devices, for commands from the cloud.
    pub directory: Arc<DeviceDirectory>,
    /// Tracked commands when the registry is configured.
    pub commands: Option<Arc<CommandDispatcher>>,
    /// The sink's own intake (command errors it reports); weak, never keeps it open.
    pub intake: WeakIntake,
    /// Where refused events go, for sinks that have [`SinkSpec::dead_letters`].
    pub deadletters: Option<Arc<DeadLetters>>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Where a sink with an upstream reports its link's health (failover reads it).
    pub link: link::LinkHealth,
    /// Fires when the sink must stop.
    pub stop: CancellationToken,
}
