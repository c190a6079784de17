//! Builds the running gateway from a validated config and stops it in order.
//!
//! Start-up: API (so health is visible early), the watchdog, buffers (recovery), sinks,
//! sources, then `/readyz` turns ready. Shutdown: the watchdog and any CPU profile stop,
//! sources stop accepting and reading, the pipeline drains into the buffers, buffers sync,
//! sinks say goodbye upstream, all within `gateway.shutdown_grace`; the API goes last.
//! Past the grace, whatever has not stopped is left behind: sinks are stopped and the
//! buffers synced anyway, so shutdown ends within the grace plus about two seconds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

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
use crate::sources::limits::{FdReserve, PartialFrameBudget};
use crate::sources::tcp::TcpSource;
use crate::telemetry::Metrics;
use crate::telemetry::profiling::CpuProfiler;
use crate::telemetry::profiling::http::DebugState;
use crate::telemetry::watchdog::Watchdog;
use fieldgate_registry::{AuthThrottle, ThrottleConfig};

/// How long sinks may take past `shutdown_grace` to say goodbye upstream (retained
/// `offline`) once they are told to stop.
const SINK_GOODBYE: Duration = Duration::from_secs(1);
/// Bound on the final registry flush at shutdown.
const REGISTRY_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on the API and watchdog ending at shutdown.
const OBSERVERS_GOODBYE: Duration = Duration::from_millis(500);
/// File descriptors kept free for buffers and device listeners when there is no `[api]`.
const DEFAULT_FD_RESERVE: usize = 128;

/// Runs the gateway until SIGTERM or SIGINT, then shuts down gracefully.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    crate::data_dir::secure(&config.gateway.data_dir)?;
    let metrics = Arc::new(Metrics::new());
    crate::telemetry::inventory::declare(&metrics, &config);
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
    let fds = Arc::new(FdReserve::new(
        config
            .api
            .as_ref()
            .map_or(DEFAULT_FD_RESERVE, |api| api.fd_reserve),
    ));
    let services = Arc::new(DeviceServices {
        directory: Arc::clone(&directory),
        registry: registry.clone(),
        commands: commands.clone(),
        throttle: AuthThrottle::new(ThrottleConfig::default()),
        started: tokio::time::Instant::now(),
        frame_budget: PartialFrameBudget::new(
            usize::try_from(config.gateway.partial_frame_budget.0).unwrap_or(usize::MAX),
        ),
        fds: Arc::clone(&fds),
    });
    let admin = Arc::new(admin_auth(&config, &metrics));
    let v1_state = registry.as_ref().map(|registry| {
        let ingest_enabled = config.sinks.values().any(|sink| {
            sink.inputs()
                .get_ref()
                .iter()
                .any(|input| input == HTTP_SOURCE)
        });
        Arc::new(V1State::new(
            Arc::clone(registry),
            Arc::clone(&admin),
            ingest_enabled,
            Arc::clone(&metrics),
        ))
    });
    let api_state = Arc::new(ApiState {
        metrics: Arc::clone(&metrics),
        ready: false.into(),
        debug: Arc::new(DebugState {
            admin: Arc::clone(&admin),
            profiler: Arc::clone(&profiler),
        }),
        v1: v1_state.clone(),
        deadletter: Arc::new(api::deadletter::DeadLetterApi::new(Arc::clone(&admin))),
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
            api::ServeLimits::from_config(api, Arc::clone(&fds)),
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
    observer_tasks.spawn(crate::telemetry::systemd::watchdog(observer_stop.clone()));

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
    crate::telemetry::systemd::notify_ready();
    tracing::info!(gateway = %config.gateway.id, sources = config.sources.len(), sinks = config.sinks.len(), "fieldgate ready");

    wait_for_signal().await;
    tracing::info!(grace = ?config.gateway.shutdown_grace.0, "shutting down");
    api_state.ready.store(false, Ordering::Release);
    crate::telemetry::systemd::notify_stopping();
    observer_stop.cancel();
    observer_tasks.close();

    // Sources stop and the pipeline drains into the buffers, within the grace. A source
    // that does not stop (a peer that never lets a read or a close finish) must not keep
    // the sinks from stopping or the buffers from syncing: past the grace, what is still
    // in flight was never acked to anyone and is given up.
    let grace = config.gateway.shutdown_grace.0;
    let deadline = tokio::time::Instant::now() + grace;
    source_stop.cancel();
    if let Some(v1) = &v1_state {
        v1.ingest.close();
    }
    source_tasks.close();
    writers.close();
    sink_tasks.close();
    let drain = async {
        source_tasks.wait().await;
        writer_stop.cancel();
        writers.wait().await;
    };
    let drained = tokio::time::timeout_at(deadline, drain).await.is_ok();
    if !drained {
        tracing::warn!(
            ?grace,
            "sources did not stop within shutdown_grace; stopping the buffer writers and sinks anyway"
        );
    }
    // Writers store what is queued and end even if a source still holds its intake.
    writer_stop.cancel();
    sink_stop.cancel();
    let sinks_stopped = async {
        writers.wait().await;
        sink_tasks.wait().await;
    };
    // Sinks get the rest of the grace, and a moment to say goodbye upstream past it.
    let sinks_deadline = deadline.max(tokio::time::Instant::now() + SINK_GOODBYE);
    let sinks_done = tokio::time::timeout_at(sinks_deadline, sinks_stopped)
        .await
        .is_ok();
    if sinks_done {
        tracing::info!("sinks stopped");
    } else {
        tracing::warn!("sinks did not stop in time; syncing the buffers without them");
    }
    let mut synced = true;
    for (name, buffer) in &buffers {
        if let Err(err) = buffer.commit(true) {
            synced = false;
            tracing::error!(sink = %name, error = %err, "final buffer sync failed");
        }
    }
    if synced {
        tracing::info!(buffers = buffers.len(), "buffers synced");
    }
    if let Some(registry) = &registry {
        // A redb commit: off the async threads, and not forever.
        let registry = Arc::clone(registry);
        let flush = tokio::task::spawn_blocking(move || registry.flush());
        match tokio::time::timeout(REGISTRY_FLUSH_TIMEOUT, flush).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => tracing::error!(error = %err, "final registry flush failed"),
            Ok(Err(err)) => tracing::error!(error = %err, "final registry flush task failed"),
            Err(_) => tracing::error!("final registry flush did not finish in time"),
        }
    }
    api_stop.cancel();
    api_tasks.close();
    // The API and the watchdog hold no data; do not let a slow scraper delay the exit.
    let observers = async {
        api_tasks.wait().await;
        observer_tasks.wait().await;
    };
    let _observers_done = tokio::time::timeout(OBSERVERS_GOODBYE, observers).await;
    if !synced {
        anyhow::bail!("the final buffer sync failed; the buffers recover at the next start");
    }
    if drained && sinks_done {
        tracing::info!("shutdown complete");
    } else {
        tracing::warn!(
            ?grace,
            "shutdown cut short after shutdown_grace; acked events are in the synced buffers"
        );
    }
    Ok(())
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

/// The one admin check of every admin route, from `[api]`.
fn admin_auth(config: &Config, metrics: &Metrics) -> crate::api::admin::AdminAuth {
    let api = config.api.as_ref();
    let auth =
        crate::api::admin::AdminAuth::new(api.and_then(|api| api.admin_token.as_deref()), metrics);
    match api.and_then(|api| {
        api.previous_admin_token
            .as_deref()
            .zip(api.previous_admin_token_until)
    }) {
        Some((previous, until)) => auth.with_previous(previous, until),
        None => auth,
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
