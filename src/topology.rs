//! Builds the running gateway from a validated config and stops it in order.
//!
//! Start-up: API (so health is visible early), buffers (recovery), sinks, sources, then
//! `/readyz` turns ready. Shutdown: sources stop accepting and reading, the pipeline
//! drains into the buffers, buffers sync, sinks say goodbye upstream, all within
//! `gateway.shutdown_grace`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, ApiState};
use crate::buffer::SinkBuffer;
use crate::buffer::writer::{self, WriterPolicy};
use crate::config::{Config, SinkConfig, SourceConfig};
use crate::pipeline::{Intake, SourceOutput, intake};
use crate::sinks;
use crate::sources::directory::DeviceDirectory;
use crate::sources::tcp::TcpSource;
use crate::telemetry::Metrics;

/// Runs the gateway until SIGTERM or SIGINT, then shuts down gracefully.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());
    let directory = Arc::new(DeviceDirectory::default());
    let api_state = Arc::new(ApiState {
        metrics: Arc::clone(&metrics),
        ready: false.into(),
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
                    intake: intakes[&name].downgrade(),
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
                    Arc::clone(&directory),
                    Arc::clone(&metrics),
                )
                .await?;
                source_tasks.spawn(source.run(source_stop.clone()));
            }
        }
    }
    // Only sources may keep the intakes open, so they close when the sources stop.
    drop(intakes);

    api_state.ready.store(true, Ordering::Release);
    tracing::info!(gateway = %config.gateway.id, sources = config.sources.len(), sinks = config.sinks.len(), "fieldgate ready");

    wait_for_signal().await;
    tracing::info!(grace = ?config.gateway.shutdown_grace.0, "shutting down");
    api_state.ready.store(false, Ordering::Release);

    let sequence = async {
        source_stop.cancel();
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
    };
    let finished = tokio::time::timeout(config.gateway.shutdown_grace.0, sequence).await;
    api_stop.cancel();
    api_tasks.close();
    // The API holds no data; do not let a slow scraper delay the exit.
    let _api_done = tokio::time::timeout(std::time::Duration::from_secs(1), api_tasks.wait()).await;
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
