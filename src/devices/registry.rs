//! The daemon's glue to the device registry: opening it, persisting live status (last
//! seen, counters, kept in memory by the registry) every few seconds off the async
//! threads, and closing every session of a device whose credentials were revoked.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use fieldgate_core::DeviceId;
use fieldgate_registry::Registry;
use tokio_util::sync::CancellationToken;

use super::directory::DeviceDirectory;
use crate::config::RegistryConfig;

/// Opens (or creates) `<data_dir>/registry.redb`.
pub fn open(
    data_dir: &Path,
    gateway: &str,
    config: &RegistryConfig,
) -> anyhow::Result<Arc<Registry>> {
    let path = data_dir.join("registry.redb");
    let mut options = fieldgate_registry::RegistryOptions::new(&path, gateway.to_owned());
    options.jwt_ttl = config.jwt_ttl.0;
    options.refresh_ttl = config.refresh_ttl.0;
    let opened = Registry::open(options)
        .with_context(|| format!("registry: cannot open {}", path.display()))?;
    tracing::info!(path = %path.display(), devices = opened.len(), "device registry open");
    Ok(Arc::new(opened))
}

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

/// Closes the connection of every device whose id arrives on `revoked` (registry
/// revocations, deletions, secret rotations) until `stop`.
pub async fn close_revoked(
    directory: Arc<DeviceDirectory>,
    mut revoked: tokio::sync::broadcast::Receiver<String>,
    stop: CancellationToken,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let id = tokio::select! {
            _ = stop.cancelled() => return,
            id = revoked.recv() => id,
        };
        match id {
            Ok(id) => {
                let sessions = directory.close(&DeviceId::new(&id));
                if sessions > 0 {
                    tracing::info!(device = %id, sessions, "credentials revoked: every session closed");
                }
            }
            // Missed ids after a burst: their next authentication fails anyway.
            Err(RecvError::Lagged(missed)) => tracing::warn!(missed, "revocation notices missed"),
            Err(RecvError::Closed) => return,
        }
    }
}
