//! Building the running pieces from their configs: a sink behind its buffer and
//! writer, a source bound to its address. Each handle owns its tasks and knows how to
//! stop them; the topology decides when.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::future::BoxFuture;
use sha2::Digest as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::ApiState;
use crate::api::ingest::IngestOutput;
use crate::buffer::SinkBuffer;
use crate::buffer::writer::{self, WriterPolicy};
use crate::devices::DeviceServices;
use crate::devices::commands::CommandDispatcher;
use crate::devices::directory::DeviceDirectory;
use crate::net::tls::ReloadableTls;
use crate::pipeline::{Intake, IntakeReceiver, SourceOutput, intake};
use crate::sinks::deadletter::DeadLetters;
use crate::sinks::link::SinkLinks;
use crate::sinks::{SinkConfig, SinkContext};
use crate::sources::{SourceConfig, SourceContext};
use crate::telemetry::Metrics;
use crate::transforms::TransformServices;

/// How long a sink being replaced may take to say goodbye upstream.
pub const SINK_GOODBYE: Duration = Duration::from_secs(3);

/// What every component of the running gateway shares, made once at start-up.
pub struct Shared {
    /// `gateway.id`.
    pub gateway: String,
    /// `gateway.data_dir`.
    pub data_dir: PathBuf,
    /// Every metric.
    pub metrics: Arc<Metrics>,
    /// Connected devices.
    pub directory: Arc<DeviceDirectory>,
    /// Commands to devices, with `[registry]`.
    pub commands: Option<Arc<CommandDispatcher>>,
    /// What device-facing sources share.
    pub services: Arc<DeviceServices>,
    /// HTTP ingestion's hook, with `[registry]` and `[api]`.
    pub ingest: Option<Arc<IngestOutput>>,
    /// The API's state (dead-letter stores, config view, readiness).
    pub api: Arc<ApiState>,
    /// What transforms consult.
    pub transforms: TransformServices,
    /// Every sink's upstream link health, by name (outlives reloads).
    pub links: SinkLinks,
}

/// A running sink: its buffer, the writer filling it, and the sink task draining it.
pub struct SinkHandle {
    /// The config it runs with.
    pub config: SinkConfig,
    /// Its buffer.
    pub buffer: Arc<SinkBuffer>,
    /// Its intake, for the routes; the writer ends once every clone is gone.
    pub intake: Intake,
    /// Where its upstream's refusals go, for sinks that have them.
    pub deadletters: Option<Arc<DeadLetters>>,
    /// Fingerprint of the files it reads at start (TLS material).
    pub files: String,
    writer_stop: CancellationToken,
    writer: TaskTracker,
    sink_stop: CancellationToken,
    sink: TaskTracker,
}

impl SinkHandle {
    /// Opens the buffer (recovering it), starts its writer and the sink.
    pub fn start(name: &str, config: &SinkConfig, shared: &Shared) -> anyhow::Result<SinkHandle> {
        Self::start_with(name, config, shared, intake())
    }

    /// As [`SinkHandle::start`], on an intake made earlier (routes may already feed it).
    pub fn start_with(
        name: &str,
        config: &SinkConfig,
        shared: &Shared,
        (sender, receiver): (Intake, IntakeReceiver),
    ) -> anyhow::Result<SinkHandle> {
        let spec = config.spec();
        let buffer = Arc::new(SinkBuffer::open(
            name,
            spec.buffer(),
            &shared.data_dir,
            Arc::clone(&shared.metrics),
        )?);
        let deadletters = if spec.dead_letters() {
            Some(Arc::new(DeadLetters::open(name, &shared.data_dir)?))
        } else {
            None
        };
        let writer_stop = CancellationToken::new();
        let writer = TaskTracker::new();
        writer.spawn(writer::run(
            Arc::clone(&buffer),
            receiver,
            writer_policy(config),
            Arc::clone(&shared.metrics),
            writer_stop.clone(),
        ));
        writer.close();
        let mut handle = SinkHandle {
            config: config.clone(),
            buffer,
            intake: sender,
            deadletters,
            files: fingerprint(&spec.watched_files()),
            writer_stop,
            writer,
            sink_stop: CancellationToken::new(),
            sink: TaskTracker::new(),
        };
        handle.spawn_sink(name, shared);
        Ok(handle)
    }

    fn spawn_sink(&mut self, name: &str, shared: &Shared) {
        self.sink_stop = CancellationToken::new();
        self.sink = TaskTracker::new();
        let context = SinkContext {
            name: name.to_owned(),
            buffer: Arc::clone(&self.buffer),
            gateway: shared.gateway.clone(),
            data_dir: shared.data_dir.clone(),
            directory: Arc::clone(&shared.directory),
            commands: shared.commands.clone(),
            intake: self.intake.downgrade(),
            deadletters: self.deadletters.clone(),
            metrics: Arc::clone(&shared.metrics),
            link: shared.links.get(name),
            stop: self.sink_stop.clone(),
        };
        tracing::info!(
            sink = name,
            r#type = self.config.type_name(),
            "sink starting"
        );
        self.sink.spawn(self.config.spec().build(context));
        self.sink.close();
    }

    /// Replaces the sink task with one running `config` on the same buffer and writer:
    /// what the old task had in flight is delivered again by the new one. Only for a
    /// config whose buffer settings are unchanged.
    pub async fn restart_sink(&mut self, name: &str, config: &SinkConfig, shared: &Shared) {
        self.sink_stop.cancel();
        if tokio::time::timeout(SINK_GOODBYE, self.sink.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                sink = name,
                "sink did not stop in time; replacing it anyway"
            );
        }
        self.buffer.rewind();
        self.config = config.clone();
        self.files = fingerprint(&config.spec().watched_files());
        self.spawn_sink(name, shared);
    }

    /// Stops taking events: the writer stores what is queued and ends.
    pub fn stop_writer(&self) {
        self.writer_stop.cancel();
    }

    /// Resolves once the writer has ended.
    pub async fn writer_stopped(&self) {
        self.writer.wait().await;
    }

    /// Tells the sink to say goodbye upstream and end.
    pub fn stop_sink(&self) {
        self.sink_stop.cancel();
    }

    /// Resolves once the sink task has ended.
    pub async fn sink_stopped(&self) {
        self.sink.wait().await;
    }

    /// Stops writer and sink in order (bounded), then syncs the buffer; for a sink
    /// removed or rebuilt by a reload. Nothing is lost: what the writer took is stored
    /// and synced, what the sink did not deliver stays in the buffer.
    pub async fn stop(self, name: &str) {
        drop(self.intake);
        // Routes to this sink are gone; give sends already under way a moment to land.
        if tokio::time::timeout(Duration::from_millis(500), self.writer.wait())
            .await
            .is_err()
        {
            self.writer_stop.cancel();
            self.writer.wait().await;
        }
        self.sink_stop.cancel();
        if tokio::time::timeout(SINK_GOODBYE, self.sink.wait())
            .await
            .is_err()
        {
            tracing::warn!(sink = name, "sink did not stop in time");
        }
        if let Err(err) = self.buffer.commit(true) {
            tracing::error!(sink = name, error = %err, "buffer sync failed");
        }
    }
}

fn writer_policy(config: &SinkConfig) -> WriterPolicy {
    let buffer = config.spec().buffer();
    WriterPolicy {
        when_full: buffer.when_full,
        fsync: buffer.fsync,
        fsync_interval: buffer.fsync_interval.0,
    }
}

/// A digest of the files' contents (missing files count as empty), to notice
/// certificates replaced on disk.
pub fn fingerprint(files: &[PathBuf]) -> String {
    let mut digest = sha2::Sha256::new();
    for file in files {
        digest.update(file.as_os_str().as_encoded_bytes());
        digest.update(std::fs::read(file).unwrap_or_default());
    }
    crate::config::hex(&digest.finalize())
}

/// A source that is bound but not yet running.
pub struct PendingSource {
    /// The handle it will run under.
    pub handle: SourceHandle,
    task: BoxFuture<'static, ()>,
}

/// A running source.
pub struct SourceHandle {
    /// Where its events go; the topology swaps the targets.
    pub output: SourceOutput,
    /// Its TLS material, re-read in place on reload.
    pub tls: Option<Arc<ReloadableTls>>,
    stop: CancellationToken,
    task: TaskTracker,
}

impl PendingSource {
    /// Builds and binds `config`; it accepts nothing until [`PendingSource::start`].
    pub async fn bind(
        name: &str,
        config: &SourceConfig,
        shared: &Shared,
    ) -> anyhow::Result<PendingSource> {
        let output = SourceOutput::default();
        let stop = CancellationToken::new();
        let context = SourceContext {
            output: output.clone(),
            services: Arc::clone(&shared.services),
            ingest: shared.ingest.clone(),
            metrics: Arc::clone(&shared.metrics),
            stop: stop.clone(),
        };
        tracing::debug!(source = name, r#type = config.type_name(), "source binding");
        let running = config
            .spec()
            .build(name, context)
            .await
            .with_context(|| format!("source `{name}`"))?;
        Ok(PendingSource {
            handle: SourceHandle {
                output,
                tls: running.tls,
                stop,
                task: TaskTracker::new(),
            },
            task: running.task,
        })
    }

    /// Starts accepting (set the output's targets first).
    pub fn start(self) -> SourceHandle {
        self.handle.task.spawn(self.task);
        self.handle.task.close();
        self.handle
    }
}

impl SourceHandle {
    /// Tells the source to stop accepting and close its connections.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Resolves once the source and its connections have ended.
    pub async fn stopped(&self) {
        self.task.wait().await;
    }
}

/// The sinks' intakes, by name, for compiling routes.
pub fn intakes(sinks: &BTreeMap<String, SinkHandle>) -> BTreeMap<String, Intake> {
    sinks
        .iter()
        .map(|(name, sink)| (name.clone(), sink.intake.clone()))
        .collect()
}

/// Makes the dead-letter stores of `sinks` reachable through the API.
pub fn attach_deadletters(api: &ApiState, sinks: &BTreeMap<String, SinkHandle>) {
    api.attach_deadletters(
        sinks
            .iter()
            .filter_map(|(name, sink)| {
                let store = sink.deadletters.as_ref()?;
                Some((name.clone(), (Arc::clone(store), Arc::clone(&sink.buffer))))
            })
            .collect(),
    );
}

/// Buffers under `<data_dir>/buffers` whose sink is not in `sinks`, with their size.
pub fn detached_buffers(
    data_dir: &Path,
    sinks: &BTreeMap<String, SinkHandle>,
) -> Vec<crate::api::config::DetachedBuffer> {
    let Ok(entries) = std::fs::read_dir(data_dir.join("buffers")) else {
        return Vec::new();
    };
    let mut detached: Vec<_> = entries
        .filter_map(Result::ok)
        .filter(|entry| entry.path().is_dir())
        .filter_map(|entry| {
            let sink = entry.file_name().to_str()?.to_owned();
            (!sinks.contains_key(&sink)).then(|| crate::api::config::DetachedBuffer {
                bytes: directory_size(&entry.path()),
                path: entry.path().display().to_string(),
                sink,
            })
        })
        .collect();
    detached.sort_by(|a, b| a.sink.cmp(&b.sink));
    detached
}

fn directory_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => directory_size(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}
