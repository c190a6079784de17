//! The daemon's upkeep of the device registry: live status (last seen, counters) is kept
//! in memory by the registry and persisted here every few seconds, off the async threads.

use std::sync::Arc;
use std::time::Duration;

use fieldgate_registry::Registry;
use tokio_util::sync::CancellationToken;

/// How often live device status is written to disk: a crash loses at most this much of
/// last-seen times and counters, never credentials or commands (those are written at once).
const STATUS_PERSIST_INTERVAL: Duration = Duration::from_secs(5);

/// Persists live status every few seconds until `stop`, then once more.
pub async fn persist_status(registry: Arc<Registry>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(STATUS_PERSIST_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tick.tick() => false,
        };
        if registry.dirty_count() > 0 {
            let flushing = Arc::clone(&registry);
            match tokio::task::spawn_blocking(move || flushing.flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::error!(error = %err, "registry status not persisted"),
                Err(err) => tracing::error!(error = %err, "registry flush task failed"),
            }
        }
        if stopping {
            return;
        }
    }
}
