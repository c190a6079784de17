//! Commands to devices: queued in the registry, delivered over the device's connection,
//! tracked to a result.
//!
//! States: queued → sent (handed to the connection) → delivered (written to the socket)
//! → succeeded / failed, or expired once the TTL passes in queued or sent. A command for
//! an offline device waits in the registry and goes out when the device connects. Every
//! end state reaches the cloud as a `command_result` event.
//!
//! Every state change is a redb commit (an fsync): the async methods run it on the
//! blocking pool, so a connection or sink task never stalls a runtime worker on the disk.
//! [`CommandDispatcher::submit`] blocks, for callers already on a blocking thread.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fieldgate_core::{DeviceId, Event, EventKind, PayloadFormat};
use fieldgate_registry::{Command, CommandState, NewCommand, Registry, RegistryError};
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use super::directory::{CommandError, DeviceCommand, DeviceDirectory};
use crate::clock::now_ms;
use crate::pipeline::SourceOutput;

/// How often expired commands are looked for.
const EXPIRY_SWEEP: Duration = Duration::from_secs(1);

/// Moves commands between the registry, connections and the cloud.
pub struct CommandDispatcher {
    registry: Arc<Registry>,
    directory: Arc<DeviceDirectory>,
    /// Where results the gateway itself produces (expired) go: the output of the
    /// `commands` source while it runs; none before and after.
    results: std::sync::Mutex<Option<SourceOutput>>,
}

impl CommandDispatcher {
    /// A dispatcher over `registry` and the connected devices.
    pub fn new(registry: Arc<Registry>, directory: Arc<DeviceDirectory>) -> Self {
        Self {
            registry,
            directory,
            results: std::sync::Mutex::new(None),
        }
    }

    /// Where gateway-made results go from now on (the `commands` source's output).
    pub fn open_results(&self, output: SourceOutput) {
        *self
            .results
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(output);
    }

    /// Stops sending gateway-made results (the `commands` source stopped).
    pub fn close_results(&self) {
        *self
            .results
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// Queues a command and hands it to the device at once if it is connected.
    /// Idempotent by command id.
    ///
    /// Blocks on registry commits: call it from a blocking thread (the API runs it through
    /// `spawn_blocking`), never directly from an async task.
    pub fn submit(&self, device: &str, command: NewCommand) -> Result<Command, RegistryError> {
        let queued = self.registry.submit_command(device, command, now_ms())?;
        if queued.state == CommandState::Queued {
            self.deliver_pending_blocking(&DeviceId::new(device));
        }
        Ok(self
            .registry
            .get_command(device, &queued.id)
            .unwrap_or(queued))
    }

    /// The command `command_id` of `device` as the registry has it now (an in-memory
    /// read), for callers that follow a command to its end state.
    pub fn status(&self, device: &str, command_id: &str) -> Option<Command> {
        self.registry.get_command(device, command_id)
    }

    /// Hands every queued command of `device` to its connection (called when it connects).
    pub async fn deliver_pending(self: &Arc<Self>, device: &DeviceId) {
        let this = Arc::clone(self);
        let device = device.clone();
        self.off_thread(move || this.deliver_pending_blocking(&device))
            .await;
    }

    /// [`deliver_pending`](Self::deliver_pending), blocking on the registry commits.
    fn deliver_pending_blocking(&self, device: &DeviceId) {
        for command in self.registry.pending_commands(device.as_str(), now_ms()) {
            let params = match RawValue::from_string(command.params.to_string()) {
                Ok(params) => params,
                Err(err) => {
                    tracing::error!(device = %device, command = %command.id, error = %err, "command params not serialisable");
                    continue;
                }
            };
            let outgoing = DeviceCommand {
                device: device.clone(),
                id: command.id.clone(),
                name: command.name.clone(),
                params,
            };
            match self.directory.send(outgoing) {
                Ok(()) => self.mark(device.as_str(), &command.id, CommandState::Sent, None),
                // Offline or busy: it stays queued and is retried on the next connect.
                Err(CommandError::Offline | CommandError::Busy) => break,
            }
        }
    }

    /// The connection wrote the command to the device.
    pub async fn delivered(self: &Arc<Self>, device: &DeviceId, command_id: &str) {
        let this = Arc::clone(self);
        let (device, command_id) = (device.clone(), command_id.to_owned());
        self.off_thread(move || {
            this.mark(device.as_str(), &command_id, CommandState::Delivered, None);
        })
        .await;
    }

    /// The device answered: `status` "ok" is success, anything else failure.
    pub async fn result(self: &Arc<Self>, device: &DeviceId, command_id: &str, frame: &[u8]) {
        let result: Option<serde_json::Value> = serde_json::from_slice(frame).ok();
        let succeeded = result
            .as_ref()
            .and_then(|value| value.get("status"))
            .and_then(|status| status.as_str())
            == Some("ok");
        let state = if succeeded {
            CommandState::Succeeded
        } else {
            CommandState::Failed
        };
        let this = Arc::clone(self);
        let (device, command_id) = (device.clone(), command_id.to_owned());
        self.off_thread(move || this.mark(device.as_str(), &command_id, state, result))
            .await;
    }

    /// Runs registry work that commits to disk on the blocking pool and waits for it.
    async fn off_thread(&self, work: impl FnOnce() + Send + 'static) {
        if let Err(err) = tokio::task::spawn_blocking(work).await {
            tracing::error!(error = %err, "registry update did not finish");
        }
    }

    fn mark(
        &self,
        device: &str,
        command_id: &str,
        state: CommandState,
        result: Option<serde_json::Value>,
    ) {
        if let Err(err) = self
            .registry
            .mark_command(device, command_id, state, result, now_ms())
        {
            // Unknown ids (a command sent without the registry, a late result) are not errors.
            tracing::debug!(device, command = command_id, error = %err, "command state not updated");
        }
    }

    /// Expires overdue commands every second until `stop`, reporting each upstream.
    pub async fn run_expiry(self: Arc<Self>, stop: CancellationToken) {
        let mut sweep = tokio::time::interval(EXPIRY_SWEEP);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = sweep.tick() => {}
            }
            let registry = Arc::clone(&self.registry);
            let expired =
                match tokio::task::spawn_blocking(move || registry.expire_commands(now_ms())).await
                {
                    Ok(expired) => expired,
                    Err(err) => {
                        tracing::error!(error = %err, "command expiry did not finish");
                        Vec::new()
                    }
                };
            for command in expired {
                tracing::info!(device = %command.device_id, command = %command.id, "command expired");
                self.report(
                    &command.device_id,
                    &command.id,
                    "expired",
                    "command TTL passed before the device answered",
                );
            }
        }
    }

    /// Sends a gateway-made `command_result` through the `commands` source, without
    /// waiting: a full intake loses the report (logged), never the command's state in the
    /// registry.
    pub fn report(&self, device: &str, command_id: &str, status: &str, error: &str) {
        let payload = serde_json::json!({ "type": "command_result", "id": command_id, "status": status, "error": error });
        let event = Event::new(
            DeviceId::new(device),
            EventKind::CommandResult,
            Arc::from("gateway"),
            now_ms(),
            PayloadFormat::Json,
            Bytes::from(payload.to_string()),
        );
        let output = self
            .results
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let lost = output.map_or(0, |output| output.try_send(event));
        if lost > 0 {
            tracing::warn!(
                device,
                command = command_id,
                status,
                lost,
                "command result not buffered: intake full or closed"
            );
        }
    }
}
