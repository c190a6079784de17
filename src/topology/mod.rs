//! The running gateway: builds the shared services and the component graph from a
//! validated config, keeps it running through reloads, and stops it in order.
//!
//! Start-up: API (so health is visible early), the watchdog, the registry, sinks
//! (buffers recovered, writers, sink tasks), routes, sources, then `/readyz` turns
//! ready. [`build`] makes the pieces, [`graph`] checks and compiles the config's graph,
//! [`reload`] applies a new config to the running pieces, [`shutdown`] stops them.

mod build;
#[cfg(test)]
mod config_tests;
#[cfg(test)]
mod failover_tests;
mod graph;
mod reload;
mod shutdown;
mod stateful;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use tokio::sync::mpsc;

use self::build::{PendingSource, Shared, SinkHandle, SourceHandle};
pub use self::graph::{Components, Config};
use self::shutdown::TaskGroup;
use self::stateful::TransformRuntime;
use crate::api::config::{ConfigApi, ConfigView};
use crate::api::v1::V1State;
use crate::api::{self, ApiState};
use crate::devices::DeviceServices;
use crate::devices::commands::CommandDispatcher;
use crate::devices::directory::DeviceDirectory;
use crate::net::limits::{FdReserve, PartialFrameBudget};
use crate::sinks::failover::Failovers;
use crate::telemetry::Metrics;
use crate::telemetry::profiling::CpuProfiler;
use crate::telemetry::profiling::http::DebugState;
use crate::telemetry::watchdog::Watchdog;
use crate::transforms::TransformServices;
use fieldgate_registry::{AuthThrottle, ThrottleConfig};

/// File descriptors kept free for buffers and device listeners when there is no `[api]`.
const DEFAULT_FD_RESERVE: usize = 128;

/// How `fieldgate run` was started.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// The `--config` file, re-read on reload; none for the embedded default.
    pub config_path: Option<PathBuf>,
    /// Reload when the file changes (`--watch`).
    pub watch: bool,
}

/// The running components.
pub struct Topology {
    /// The config they run.
    pub config: Arc<Config>,
    /// What they share.
    pub shared: Arc<Shared>,
    /// Running sources, by name.
    pub sources: BTreeMap<String, SourceHandle>,
    /// Running sinks, by name.
    pub sinks: BTreeMap<String, SinkHandle>,
    /// Running transforms: their instances, tickers and checkpoints.
    pub transforms: TransformRuntime,
    /// The failover monitors of the sinks that name a failover sink.
    pub failovers: Failovers,
}

impl Topology {
    /// Starts every sink, compiles the routes, then binds and starts every source.
    async fn start(config: Arc<Config>, shared: Arc<Shared>) -> anyhow::Result<Topology> {
        let mut sinks = BTreeMap::new();
        for (name, sink) in &config.components.sinks {
            sinks.insert(name.clone(), SinkHandle::start(name, sink, &shared)?);
        }
        build::attach_deadletters(&shared.api, &sinks);
        let failovers = Failovers::start(
            &config.components.failover,
            &shared.links,
            &shared.metrics,
            None,
        );
        let mut transforms = TransformRuntime::new(&shared.data_dir, Arc::clone(&shared.metrics));
        let prepared = transforms.prepare(&config.components, &shared.transforms)?;
        let compiled = config.components.compile_with_failover(
            &build::intakes(&sinks),
            &failovers.switches(),
            &shared.transforms,
            &prepared.transforms(),
        )?;
        transforms.commit(prepared, &compiled.nodes).await;
        let mut routes = compiled.routes;
        let mut sources = BTreeMap::new();
        for (name, source) in &config.components.sources {
            let pending = PendingSource::bind(name, source, &shared).await?;
            pending
                .handle
                .output
                .replace(routes.remove(name).unwrap_or_default());
            sources.insert(name.clone(), pending.start());
        }
        let topology = Topology {
            config,
            shared,
            sources,
            sinks,
            transforms,
            failovers,
        };
        topology.publish();
        Ok(topology)
    }

    /// Shows the running config in the API and the metrics (every series it implies at
    /// zero, so dashboards never show "no data").
    fn publish(&self) {
        crate::telemetry::inventory::declare(&self.shared.metrics, &self.config);
        let detached = build::detached_buffers(&self.shared.data_dir, &self.sinks);
        let metrics = &self.shared.metrics;
        metrics.set_config_hash(&self.config.hash);
        metrics.detached_buffer_bytes.clear();
        for buffer in &detached {
            metrics
                .detached_buffer_bytes
                .get_or_create(&Metrics::sink(&buffer.sink))
                .set(i64::try_from(buffer.bytes).unwrap_or(i64::MAX));
            tracing::warn!(sink = %buffer.sink, path = %buffer.path, bytes = buffer.bytes, "buffer of a sink no longer configured is kept on disk; delete it by hand when it is not needed");
        }
        self.shared
            .api
            .config
            .show_sinks(crate::api::sinks::SinkBoard {
                sinks: self
                    .sinks
                    .iter()
                    .map(|(name, sink)| crate::api::sinks::BoardEntry {
                        name: name.clone(),
                        r#type: sink.config.type_name(),
                        link: sink
                            .config
                            .spec()
                            .has_upstream()
                            .then(|| self.shared.links.get(name)),
                    })
                    .collect(),
                failovers: self.failovers.view(),
            });
        self.shared.api.config.show(ConfigView {
            hash: self.config.hash.clone(),
            config: self.config.redacted(),
            detached_buffers: detached,
        });
    }
}

/// Runs the gateway until SIGTERM or SIGINT, reloading on SIGHUP, on
/// `POST /api/v1/config/reload` and (with `--watch`) when the file changes; then shuts
/// down gracefully.
pub async fn run(config: Config, options: RunOptions) -> anyhow::Result<()> {
    let settings = &config.settings;
    let data_dir = settings.gateway.data_dir.clone();
    crate::data_dir::secure(&data_dir)?;
    let metrics = Arc::new(Metrics::new());
    let directory = Arc::new(DeviceDirectory::default());
    // Observers (watchdog, CPU profiles, registry upkeep) stop first: they hold no data.
    let observers = TaskGroup::default();
    let profiler = Arc::new(CpuProfiler::new(observers.token()));
    // The registry opens before the API so its routes are there from the first request.
    let registry = match &settings.registry {
        Some(registry) => Some(crate::devices::registry::open(
            &data_dir,
            &settings.gateway.id,
            registry,
        )?),
        None => None,
    };
    let commands = registry.as_ref().map(|registry| {
        Arc::new(CommandDispatcher::new(
            Arc::clone(registry),
            Arc::clone(&directory),
        ))
    });
    let fds = Arc::new(FdReserve::new(
        settings
            .api
            .as_ref()
            .map_or(DEFAULT_FD_RESERVE, |api| api.fd_reserve),
    ));
    let local_brokers = Arc::new(crate::devices::local_brokers::LocalBrokers::default());
    let services = Arc::new(DeviceServices {
        directory: Arc::clone(&directory),
        registry: registry.clone(),
        commands: commands.clone(),
        throttle: AuthThrottle::new(ThrottleConfig::default()),
        started: tokio::time::Instant::now(),
        frame_budget: PartialFrameBudget::new(
            usize::try_from(settings.gateway.partial_frame_budget.0).unwrap_or(usize::MAX),
        ),
        fds: Arc::clone(&fds),
        local_brokers: Arc::clone(&local_brokers),
    });
    let admin = Arc::new(admin_auth(settings, &metrics));
    let v1_state = registry.as_ref().map(|registry| {
        Arc::new(V1State::new(
            Arc::clone(registry),
            Arc::clone(&admin),
            Arc::clone(&metrics),
        ))
    });
    let (reload_requests, mut reload_inbox) = mpsc::channel(4);
    let alarms = Arc::new(crate::transforms::alarm::AlarmBoard::default());
    let api_state = Arc::new(ApiState {
        metrics: Arc::clone(&metrics),
        ready: false.into(),
        debug: Arc::new(DebugState {
            admin: Arc::clone(&admin),
            profiler: Arc::clone(&profiler),
        }),
        v1: v1_state.clone(),
        deadletter: Arc::new(api::deadletter::DeadLetterApi::new(Arc::clone(&admin))),
        alarms: Arc::new(api::alarms::AlarmApi::new(
            Arc::clone(&admin),
            Arc::clone(&alarms),
        )),
        config: Arc::new(ConfigApi::new(Arc::clone(&admin), reload_requests)),
    });

    let api_tasks = TaskGroup::default();
    if let Some(api) = &settings.api {
        let address = *api.address.get_ref();
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("api: cannot listen on {address}"))?;
        tracing::info!(%address, "API listening");
        api_tasks.spawn(api::serve(
            listener,
            Arc::clone(&api_state),
            api::ServeLimits::from_config(api, Arc::clone(&fds)),
            api_tasks.token(),
        ));
    }

    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data_dir {}", data_dir.display()))?;
    let watchdog = Watchdog::new(
        &settings.watchdog,
        Arc::clone(&metrics),
        config.components.sinks.keys().map(String::as_str),
        &data_dir,
        Arc::clone(&profiler),
    );
    observers.spawn(watchdog.run(observers.token()));
    observers.spawn(crate::telemetry::systemd::watchdog(observers.token()));
    if let (Some(registry), Some(commands)) = (&registry, &commands) {
        if let Some(v1) = &v1_state {
            v1.attach_commands(Arc::clone(commands));
        }
        observers.spawn(crate::devices::registry::close_revoked(
            Arc::clone(&directory),
            registry.revocations(),
            observers.token(),
        ));
        observers.spawn(crate::devices::registry::persist_status(
            Arc::clone(registry),
            observers.token(),
        ));
    }

    let shared = Arc::new(Shared {
        gateway: settings.gateway.id.clone(),
        data_dir,
        metrics: Arc::clone(&metrics),
        directory: Arc::clone(&directory),
        commands: commands.clone(),
        services,
        ingest: v1_state.as_ref().map(|v1| Arc::clone(&v1.ingest)),
        api: Arc::clone(&api_state),
        transforms: TransformServices {
            registry: registry.clone(),
            metrics: Arc::clone(&metrics),
            alarms,
            actions: Some(crate::transforms::alarm::ActionServices::new(
                local_brokers,
                directory,
                commands,
            )),
        },
        links: crate::sinks::link::SinkLinks::default(),
    });
    let grace = settings.gateway.shutdown_grace.0;
    let checkpoint_interval = settings.gateway.checkpoint_interval.0;
    let mut topology = Topology::start(Arc::new(config), shared).await?;
    observers.spawn(
        topology
            .transforms
            .checkpoint_task(checkpoint_interval, observers.token()),
    );

    let mut file_changes = match (&options.config_path, options.watch) {
        (Some(path), true) => Some(reload::watch(path.clone(), observers.clone())),
        _ => None,
    };
    api_state.ready.store(true, Ordering::Release);
    crate::telemetry::systemd::notify_ready();
    tracing::info!(
        gateway = %topology.shared.gateway,
        sources = topology.sources.len(),
        sinks = topology.sinks.len(),
        config = %topology.config.hash,
        "fieldgate ready"
    );

    let mut hangups = signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut terminate = signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
            _ = hangups.recv() => {
                tracing::info!("SIGHUP: reloading the config");
                let _report = reload::reload(&mut topology, options.config_path.as_deref()).await;
            }
            Some(answer) = reload_inbox.recv() => {
                let report = reload::reload(&mut topology, options.config_path.as_deref()).await;
                // The caller may have given up waiting; the reload stands either way.
                let _unheard = answer.send(report);
            }
            Some(()) = async { file_changes.as_mut()?.recv().await } => {
                tracing::info!("config file changed: reloading");
                let _report = reload::reload(&mut topology, options.config_path.as_deref()).await;
            }
        }
    }
    shutdown::shutdown(topology, grace, registry, observers, api_tasks).await
}

fn signal(kind: tokio::signal::unix::SignalKind) -> anyhow::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(kind).context("cannot listen for signals")
}

/// The one admin check of every admin route, from `[api]`.
fn admin_auth(settings: &crate::config::Settings, metrics: &Metrics) -> api::admin::AdminAuth {
    let api = settings.api.as_ref();
    let auth = api::admin::AdminAuth::new(api.and_then(|api| api.admin_token.as_deref()), metrics);
    match api.and_then(|api| {
        api.previous_admin_token
            .as_deref()
            .zip(api.previous_admin_token_until)
    }) {
        Some((previous, until)) => auth.with_previous(previous, until),
        None => auth,
    }
}
