//! The ordered, bounded shutdown every task obeys.
//!
//! Sources stop accepting and reading, the pipeline drains into the buffers, the
//! buffer writers store what is queued, sinks say goodbye upstream (retained `offline`),
//! buffers sync, the registry flushes, the API goes last; all within
//! `gateway.shutdown_grace`. Past the grace, whatever has not stopped is left behind:
//! sinks are stopped and the buffers synced anyway, so shutdown ends within the grace
//! plus about two seconds. Every task is owned by a `TaskTracker` and told to stop by a
//! `CancellationToken`; nothing is detached.

use std::sync::Arc;
use std::time::Duration;

use fieldgate_registry::Registry;
use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Topology;

/// How long sinks may take past `shutdown_grace` to say goodbye upstream (retained
/// `offline`) once they are told to stop.
const SINK_GOODBYE: Duration = Duration::from_secs(1);
/// Bound on the final registry flush.
const REGISTRY_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);
/// How long alarm actions under way (a webhook attempt, a command) may take to end once
/// the pipeline has drained.
const ACTIONS_GOODBYE: Duration = Duration::from_secs(1);
/// Bound on the API and the observers ending.
const OBSERVERS_GOODBYE: Duration = Duration::from_millis(500);

/// A group of tasks stopped together: a token they all watch and a tracker to wait on.
#[derive(Clone, Default)]
pub struct TaskGroup {
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl TaskGroup {
    /// Spawns `task`, which must end soon after [`TaskGroup::token`] fires.
    pub fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task);
    }

    /// The token the group's tasks watch.
    pub fn token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Tells every task to stop and waits for them, at most `bound`.
    pub async fn stop(&self, bound: Duration) -> bool {
        self.stop.cancel();
        self.tasks.close();
        tokio::time::timeout(bound, self.tasks.wait()).await.is_ok()
    }
}

/// Stops `topology` in order; an error only when the final buffer sync failed.
pub async fn shutdown(
    topology: Topology,
    grace: Duration,
    registry: Option<Arc<Registry>>,
    observers: TaskGroup,
    api: TaskGroup,
) -> anyhow::Result<()> {
    tracing::info!(?grace, "shutting down");
    crate::telemetry::systemd::notify_stopping();
    topology
        .shared
        .api
        .ready
        .store(false, std::sync::atomic::Ordering::Release);
    observers.stop.cancel();
    observers.tasks.close();

    // Sources stop and the pipeline drains into the buffers, within the grace. A source
    // that does not stop (a peer that never lets a read or a close finish) must not keep
    // the sinks from stopping or the buffers from syncing: past the grace, what is still
    // in flight was never acked to anyone and is given up.
    let deadline = tokio::time::Instant::now() + grace;
    for source in topology.sources.values() {
        source.stop();
    }
    let drain = async {
        join_all(topology.sources.values().map(|source| source.stopped())).await;
        // Tickers deliver what they emitted while the writers still run.
        topology.transforms.stop_tickers().await;
        for sink in topology.sinks.values() {
            sink.stop_writer();
        }
        join_all(topology.sinks.values().map(|sink| sink.writer_stopped())).await;
    };
    let drained = tokio::time::timeout_at(deadline, drain).await.is_ok();
    if !drained {
        tracing::warn!(
            ?grace,
            "sources did not stop within shutdown_grace; stopping the buffer writers and sinks anyway"
        );
    }
    // No alarm is raised any more: actions under way get a moment, the rest is counted.
    if let Some(actions) = &topology.shared.transforms.actions {
        actions.shutdown(ACTIONS_GOODBYE).await;
    }
    // Stateful transforms see no more events: their state is final.
    topology.transforms.checkpoint_all().await;
    // Writers store what is queued and end even if a source still holds its intake.
    for sink in topology.sinks.values() {
        sink.stop_writer();
        sink.stop_sink();
    }
    let sinks_stopped = async {
        join_all(topology.sinks.values().map(|sink| sink.writer_stopped())).await;
        join_all(topology.sinks.values().map(|sink| sink.sink_stopped())).await;
    };
    // Sinks get the rest of the grace, and a moment to say goodbye upstream past it.
    let sinks_deadline = deadline.max(tokio::time::Instant::now() + SINK_GOODBYE);
    let sinks_done = tokio::time::timeout_at(sinks_deadline, sinks_stopped)
        .await
        .is_ok();
    // Nothing is routed any more: the failover switches have no reader.
    topology.failovers.stop().await;
    if sinks_done {
        tracing::info!("sinks stopped");
    } else {
        tracing::warn!("sinks did not stop in time; syncing the buffers without them");
    }
    let mut synced = true;
    for (name, sink) in &topology.sinks {
        if let Err(err) = sink.buffer.commit(true) {
            synced = false;
            tracing::error!(sink = %name, error = %err, "final buffer sync failed");
        }
    }
    if synced {
        tracing::info!(buffers = topology.sinks.len(), "buffers synced");
    }
    if let Some(registry) = registry {
        // A redb commit: off the async threads, and not forever.
        let flush = tokio::task::spawn_blocking(move || registry.flush());
        match tokio::time::timeout(REGISTRY_FLUSH_TIMEOUT, flush).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => tracing::error!(error = %err, "final registry flush failed"),
            Ok(Err(err)) => tracing::error!(error = %err, "final registry flush task failed"),
            Err(_) => tracing::error!("final registry flush did not finish in time"),
        }
    }
    // The API and the observers hold no data; do not let a slow scraper delay the exit.
    let observers_done = async {
        api.stop(OBSERVERS_GOODBYE).await;
        observers.tasks.wait().await;
    };
    let _observers_done = tokio::time::timeout(OBSERVERS_GOODBYE, observers_done).await;
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
