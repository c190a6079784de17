//! Builds the running gateway from a validated config and stops it in order.
//!
//! Start-up: API (so health is visible early), the watchdog, buffers (recovery), sinks,
//! sources, then `/readyz` turns ready. Shutdown: the watchdog and any CPU profile stop,
//! sources stop accepting and reading, the pipeline drains into the buffers, buffers sync,
//! sinks say goodbye upstream, all within `gateway.shutdown_grace`; the API goes last.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::v1::V1State;
use crate::api::{self, ApiState};
use crate::buffer::SinkBuffer;
use crate::buffer::writer::{self, WriterPolicy};
use crate::commands::CommandDispatcher;
use crate::config::{Config, HTTP_SOURCE, RegistryConfig, SinkConfig, SourceConfig};
use crate::pipeline::{Intake, SourceOutput, intake};
use crate::sinks;
use crate::sinks::deadletter::DeadLetters;
use crate::sources::DeviceServices;
use crate::sources::directory::{DeviceDirectory, close_revoked};
use crate::sources::tcp::TcpSource;
use crate::telemetry::Metrics;
use crate::telemetry::profiling::CpuProfiler;
use crate::telemetry::profiling::http::DebugState;
use crate::telemetry::watchdog::Watchdog;
use fieldgate_registry::{AuthThrottle, ThrottleConfig};

/// Runs the gateway until SIGTERM or SIGINT, then shuts down gracefully.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());
    let directory = Arc::new(DeviceDirectory::default());
    // Observers (watchdog, CPU profiles) stop first at shutdown: they hold no data.
    let observer_stop = CancellationToken::new();
    let observer_tasks = TaskTracker::new();
    let profiler = Arc::new(CpuProfiler::new(observer_stop.clone()));
    // The registry opens before the API so its routes are there from the first request.
    let registry = match &config.registry {
        Some(registry_config) => Some(open_registry(&config, registry_config)?),
        None => None,
    };
    let commands = registry.as_ref().map(|registry| {
        Arc::new(CommandDispatcher::new(
            Arc::clone(registry),
            Arc::clone(&directory),
        ))
    });
    let services = Arc::new(DeviceServices {
        directory: Arc::clone(&directory),
        registry: registry.clone(),
        commands: commands.clone(),
        throttle: AuthThrottle::new(ThrottleConfig::default()),
        started: tokio::time::Instant::now(),
    });
    let v1_state = registry.as_ref().map(|registry| {
        let ingest_enabled = config.sinks.values().any(|sink| {
            sink.inputs()
                .get_ref()
                .iter()
                .any(|input| input == HTTP_SOURCE)
        });
        Arc::new(V1State::new(
            Arc::clone(registry),
            config.api.as_ref().and_then(|api| api.admin_token.clone()),
            ingest_enabled,
            Arc::clone(&metrics),
        ))
    });
    let api_state = Arc::new(ApiState {
        metrics: Arc::clone(&metrics),
        ready: false.into(),
        debug: Arc::new(DebugState {
            admin_token: config.api.as_ref().and_then(|api| api.admin_token.clone()),
            profiler: Arc::clone(&profiler),
        }),
        v1: v1_state.clone(),
        deadletter: Arc::new(api::deadletter::DeadLetterApi::new(
            config.api.as_ref().and_then(|api| api.admin_token.clone()),
            Arc::clone(&metrics),
        )),
    });

    let api_stop = CancellationToken::new();
    let api_tasks = TaskTracker::new();
    if let Some(api) = &config.api {
        let address = *api.address.get_ref();
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("api: cannot listen on {address}"))?;
        tracing::info!(%address, "API listening");
        api_tasks.spawn(api::serve(
            listener,
            Arc::clone(&api_state),
            api_stop.clone(),
        ));
    }

    std::fs::create_dir_all(&config.gateway.data_dir).with_context(|| {
        format!(
            "cannot create data_dir {}",
            config.gateway.data_dir.display()
        )
    })?;
    let watchdog = Watchdog::new(
        &config.watchdog,
        Arc::clone(&metrics),
        config.sinks.keys().map(String::as_str),
        &config.gateway.data_dir,
        Arc::clone(&profiler),
    );
    observer_tasks.spawn(watchdog.run(observer_stop.clone()));

    // Buffers and intakes, one per sink.
    let mut buffers = BTreeMap::new();
    let mut intakes: BTreeMap<String, Intake> = BTreeMap::new();
    let writers = TaskTracker::new();
    let writer_stop = CancellationToken::new();
    for (name, sink) in &config.sinks {
        let buffer_config = sink.buffer();
        let buffer = SinkBuffer::open(
            name,
            buffer_config,
            &config.gateway.data_dir,
            Arc::clone(&metrics),
        )?;
        let buffer = Arc::new(buffer);
        let (sender, receiver) = intake();
        let policy = WriterPolicy {
            when_full: buffer_config.when_full,
            fsync: buffer_config.fsync,
            fsync_interval: buffer_config.fsync_interval.0,
        };
        writers.spawn(writer::run(
            Arc::clone(&buffer),
            receiver,
            policy,
            Arc::clone(&metrics),
            writer_stop.clone(),
        ));
        buffers.insert(name.clone(), buffer);
        intakes.insert(name.clone(), sender);
    }

    // Dead-letter stores, one per sink that can refuse events.
    let mut deadletters = BTreeMap::new();
    for (name, sink) in &config.sinks {
        if let SinkConfig::Mqtt(_) = sink {
            let store = DeadLetters::open(name, &config.gateway.data_dir)?;
            deadletters.insert(name.clone(), Arc::new(store));
        }
    }
    api_state.attach_deadletters(
        deadletters
            .iter()
            .map(|(name, store)| {
                (
                    name.clone(),
                    (Arc::clone(store), Arc::clone(&buffers[name])),
                )
            })
            .collect(),
    );

    // Sinks.
    let sink_stop = CancellationToken::new();
    let sink_tasks = TaskTracker::new();
    for (name, sink) in &config.sinks {
        let buffer = Arc::clone(&buffers[name]);
        let stop = sink_stop.clone();
        let sink_metrics = Arc::clone(&metrics);
        let config = Arc::clone(&config);
        let name = name.clone();
        match sink {
            SinkConfig::Mqtt(_) => {
                let context = sinks::mqtt::MqttSinkContext {
                    gateway: config.gateway.id.clone(),
                    directory: Arc::clone(&directory),
                    commands: commands.clone(),
                    intake: intakes[&name].downgrade(),
                    deadletters: Arc::clone(&deadletters[&name]),
                    data_dir: config.gateway.data_dir.clone(),
                    metrics: sink_metrics,
                };
                sink_tasks.spawn(async move {
                    let SinkConfig::Mqtt(mqtt) = &config.sinks[&name] else {
                        return;
                    };
                    if let Err(err) = sinks::mqtt::run(buffer, mqtt, context, stop).await {
                        tracing::error!(sink = %name, error = %err, "sink failed");
                    }
                });
            }
            SinkConfig::File(file) => {
                let directory = file
                    .directory
                    .clone()
                    .unwrap_or_else(|| config.gateway.data_dir.join("sinks").join(&name));
                sink_tasks.spawn(async move {
                    let SinkConfig::File(file) = &config.sinks[&name] else {
                        return;
                    };
                    sinks::file::run(buffer, file, directory, sink_metrics, stop).await;
                });
            }
            SinkConfig::Console(_) => {
                sink_tasks.spawn(async move {
                    let SinkConfig::Console(console) = &config.sinks[&name] else {
                        return;
                    };
                    sinks::console::run(buffer, console, sink_metrics, stop).await;
                });
            }
        }
    }

    // Sources, each feeding the sinks that list it.
    let source_stop = CancellationToken::new();
    let source_tasks = TaskTracker::new();
    for (name, source) in &config.sources {
        let targets = config
            .sinks
            .iter()
            .filter(|(_, sink)| sink.inputs().get_ref().iter().any(|input| input == name))
            .map(|(sink_name, _)| intakes[sink_name].clone())
            .collect();
        let output = SourceOutput::new(targets);
        match source {
            SourceConfig::Tcp(tcp) => {
                let source = TcpSource::bind(
                    name,
                    tcp,
                    output,
                    Arc::clone(&services),
                    Arc::clone(&metrics),
                )
                .await?;
                source_tasks.spawn(source.run(source_stop.clone()));
            }
        }
    }
    // HTTP ingestion is a source too: it feeds the sinks listing "http".
    if let Some(v1) = &v1_state {
        let targets = config
            .sinks
            .iter()
            .filter(|(_, sink)| {
                sink.inputs()
                    .get_ref()
                    .iter()
                    .any(|input| input == HTTP_SOURCE)
            })
            .map(|(sink_name, _)| intakes[sink_name].clone())
            .collect();
        v1.ingest.open(SourceOutput::new(targets));
    }
    // Registry services: command expiry and closing revoked devices' connections.
    if let (Some(registry), Some(commands)) = (&registry, &commands) {
        commands.open_results(intakes.values().map(Intake::downgrade).collect());
        if let Some(v1) = &v1_state {
            v1.attach_commands(Arc::clone(commands));
        }
        observer_tasks.spawn(Arc::clone(commands).run_expiry(observer_stop.clone()));
        observer_tasks.spawn(close_revoked(
            Arc::clone(&directory),
            registry.revocations(),
            observer_stop.clone(),
        ));
        observer_tasks.spawn(crate::registry::persist_status(
            Arc::clone(registry),
            observer_stop.clone(),
        ));
    }
    // Only sources may keep the intakes open, so they close when the sources stop.
    drop(intakes);

    api_state.ready.store(true, Ordering::Release);
    tracing::info!(gateway = %config.gateway.id, sources = config.sources.len(), sinks = config.sinks.len(), "fieldgate ready");

    wait_for_signal().await;
    tracing::info!(grace = ?config.gateway.shutdown_grace.0, "shutting down");
    api_state.ready.store(false, Ordering::Release);
    observer_stop.cancel();
    observer_tasks.close();

    let sequence = async {
        source_stop.cancel();
        if let Some(v1) = &v1_state {
            v1.ingest.close();
        }
        source_tasks.close();
        source_tasks.wait().await;
        writer_stop.cancel();
        writers.close();
        writers.wait().await;
        sink_stop.cancel();
        sink_tasks.close();
        sink_tasks.wait().await;
        for (name, buffer) in &buffers {
            if let Err(err) = buffer.commit(true) {
                tracing::error!(sink = %name, error = %err, "final buffer sync failed");
            }
        }
        if let Some(Err(err)) = registry.as_ref().map(|registry| registry.flush()) {
            tracing::error!(error = %err, "final registry flush failed");
        }
    };
    let finished = tokio::time::timeout(config.gateway.shutdown_grace.0, sequence).await;
    api_stop.cancel();
    api_tasks.close();
    // The API and the watchdog hold no data; do not let a slow scraper delay the exit.
    let observers = async {
        api_tasks.wait().await;
        observer_tasks.wait().await;
    };
    let _observers_done = tokio::time::timeout(std::time::Duration::from_secs(1), observers).await;
    match finished {
        Ok(()) => {
            tracing::info!("shutdown complete");
            Ok(())
        }
        Err(_) => anyhow::bail!(
            "shutdown did not finish within {:?}; unacknowledged events stay in the buffers",
            config.gateway.shutdown_grace.0
        ),
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn wait_for_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

/// Opens (or creates) `<data_dir>/registry.redb`, loading every device into memory.
fn open_registry(
    config: &Config,
    registry: &RegistryConfig,
) -> anyhow::Result<Arc<fieldgate_registry::Registry>> {
    let path = config.gateway.data_dir.join("registry.redb");
    let mut options = fieldgate_registry::RegistryOptions::new(&path, config.gateway.id.clone());
    options.jwt_ttl = registry.jwt_ttl.0;
    options.refresh_ttl = registry.refresh_ttl.0;
    let opened = fieldgate_registry::Registry::open(options)
        .with_context(|| format!("registry: cannot open {}", path.display()))?;
    tracing::info!(path = %path.display(), devices = opened.len(), "device registry open");
    Ok(Arc::new(opened))
}
