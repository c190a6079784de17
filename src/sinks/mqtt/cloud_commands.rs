//! Commands from the cloud: a PUBLISH on the command topic becomes a queued registry
//! command (or, without a registry, a message to the connected device).
//!
//! The sink acknowledges the PUBLISH to the broker only after [`accept`] returned
//! [`Accepted::Stored`] or [`Accepted::Answered`]: a command is stored before the cloud
//! hears that the gateway has it. [`Accepted::Retry`] (the registry could not write)
//! withholds the ack, so the broker delivers the command again on the next connection.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fieldgate_core::{DeviceId, Event, EventKind, PayloadFormat};
use fieldgate_registry::{NewCommand, RegistryError};
use serde_json::value::RawValue;

use super::MqttSinkContext;
use crate::clock::now_ms;
use crate::devices::directory::DeviceCommand;
use crate::pipeline::Item;
use crate::sinks::single_wildcard_match;

/// How long a cloud command waits for its device unless it says `"ttl"`.
const DEFAULT_COMMAND_TTL: Duration = Duration::from_secs(3600);

/// What became of a command message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Queued in the registry or handed to the device.
    Stored,
    /// Refused with a `command_result` error event (or ignored as malformed): done.
    Answered,
    /// Not stored for a transient reason: do not acknowledge it.
    Retry,
}

#[derive(serde::Deserialize)]
struct CommandMessage {
    id: String,
    name: String,
    #[serde(default)]
    params: Option<Box<RawValue>>,
    #[serde(default)]
    ttl: Option<String>,
}

/// Handles one message on the command topic `filter`.
pub async fn accept(
    context: &MqttSinkContext,
    sink: &str,
    filter: &str,
    topic: &str,
    payload: Bytes,
) -> Accepted {
    let Some(device) = single_wildcard_match(filter, topic) else {
        tracing::debug!(sink, topic, "ignoring message outside the command topic");
        return Accepted::Answered;
    };
    if fieldgate_codec::validate_device_id(device).is_err() {
        tracing::warn!(sink, topic, "command for an invalid device id ignored");
        return Accepted::Answered;
    }
    let device = DeviceId::new(device);
    let command: CommandMessage = match serde_json::from_slice(&payload) {
        Ok(command) => command,
        Err(err) => {
            tracing::warn!(sink, %device, error = %err, "malformed command ignored");
            let id = serde_json::from_slice::<serde_json::Value>(&payload)
                .ok()
                .and_then(|value| value.get("id")?.as_str().map(str::to_owned));
            if let Some(id) = id {
                command_error(
                    context,
                    sink,
                    device,
                    &id,
                    &format!("malformed command: {err}"),
                );
            }
            return Accepted::Answered;
        }
    };
    let params = match command.params {
        Some(params) => params,
        None => match RawValue::from_string("{}".into()) {
            Ok(empty) => empty,
            Err(_) => return Accepted::Answered,
        },
    };
    let id = command.id.clone();
    let Some(commands) = &context.commands else {
        let delivered = context.directory.send(DeviceCommand {
            device: device.clone(),
            id: command.id,
            name: command.name,
            params,
        });
        match delivered {
            Ok(()) => tracing::info!(sink, %device, command = id, "command sent to device"),
            Err(err) => command_error(context, sink, device, &id, &err.to_string()),
        }
        return Accepted::Stored;
    };
    // With a registry the command is queued (TTL, retries on reconnect) and tracked.
    let ttl = match command.ttl.as_deref().map(humantime::parse_duration) {
        None => DEFAULT_COMMAND_TTL,
        Some(Ok(ttl)) => ttl,
        Some(Err(err)) => {
            command_error(context, sink, device, &id, &format!("invalid ttl: {err}"));
            return Accepted::Answered;
        }
    };
    let new = NewCommand {
        id: command.id,
        name: command.name,
        params: serde_json::from_str(params.get()).unwrap_or(serde_json::Value::Null),
        ttl,
    };
    // A redb commit blocks on the disk: keep it off the async workers.
    let commands = Arc::clone(commands);
    let target = device.clone();
    let submitted =
        tokio::task::spawn_blocking(move || commands.submit(target.as_str(), new)).await;
    match submitted {
        Ok(Ok(queued)) => {
            tracing::info!(sink, %device, command = id, state = queued.state.as_str(), "command accepted");
            Accepted::Stored
        }
        Ok(Err(err @ RegistryError::Storage { .. })) => {
            tracing::error!(sink, %device, command = id, error = %err, "command not stored; the broker will deliver it again");
            Accepted::Retry
        }
        Ok(Err(err)) => {
            command_error(context, sink, device, &id, &err.to_string());
            Accepted::Answered
        }
        Err(join) => {
            tracing::error!(sink, %device, command = id, error = %join, "command submission failed");
            Accepted::Retry
        }
    }
}

/// Reports a refused command as a `command_result` event with status `error`.
fn command_error(context: &MqttSinkContext, sink: &str, device: DeviceId, id: &str, error: &str) {
    tracing::info!(sink, %device, command = id, error, "command failed");
    let payload = serde_json::json!({ "type": "command_result", "id": id, "status": "error", "error": error });
    let event = Event::new(
        device,
        EventKind::CommandResult,
        Arc::from("gateway"),
        now_ms(),
        PayloadFormat::Json,
        Bytes::from(payload.to_string()),
    );
    // The sink must not wait on its own intake; a full or closed lane drops the result.
    if !context.intake.try_send(Item { event, ack: None }) {
        context.metrics.dropped(sink, "intake_full", 1);
    }
}
