//! Admin routes over device commands: submit (idempotent by command id), list, get.
//!
//! Submitting queues the command in the registry and, through the command dispatcher,
//! hands it to the device at once when it is connected; the daemon then moves the
//! command through its states.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use fieldgate_registry::{Command, NewCommand};

use super::admin::Admin;
use super::extract::{ApiJson, ApiPath, JsonResponse, ok};
use super::problem::{ApiError, Problem};
use super::v1::V1State;
use crate::clock::now_ms;

/// Longest time a command may wait for its device.
const MAX_COMMAND_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Queues a command for a device; the same id and body again answers the same command.
#[utoipa::path(post, path = "/api/v1/devices/{id}/commands", tag = "commands",
    params(("id" = String, Path, description = "Device id")),
    request_body = NewCommand,
    responses(
        (status = 202, description = "Command queued (or already known with this id and body)", body = Command),
        (status = 400, description = "Invalid field or malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The command id is taken by a different command", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin_token" = [])))]
pub async fn submit(
    _admin: Admin,
    State(state): State<Arc<V1State>>,
    ApiPath(id): ApiPath<String>,
    ApiJson(new): ApiJson<NewCommand>,
) -> Result<JsonResponse<Command>, ApiError> {
    if new.ttl.is_zero() || new.ttl > MAX_COMMAND_TTL {
        return Err(ApiError::invalid(
            "ttl",
            "must be above 0 and at most 30 days",
        ));
    }
    let command = match state.commands() {
        // Delivered at once when the device is connected.
        Some(dispatcher) => {
            state
                .blocking(move |_| dispatcher.submit(&id, new))
                .await??
        }
        None => {
            state
                .blocking(move |registry| registry.submit_command(&id, new, now_ms()))
                .await??
        }
    };
    tracing::info!(device_id = %command.device_id, command_id = %command.id, name = %command.name, "command queued");
    Ok(JsonResponse(StatusCode::ACCEPTED, command))
}

/// Every command of a device.
#[utoipa::path(get, path = "/api/v1/devices/{id}/commands", tag = "commands",
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 200, description = "The device's commands", body = Vec<Command>),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin_token" = [])))]
pub async fn list(
    _admin: Admin,
    State(state): State<Arc<V1State>>,
    ApiPath(id): ApiPath<String>,
) -> Result<JsonResponse<Vec<Command>>, ApiError> {
    if state.registry.get_device(&id).is_none() {
        return Err(ApiError::not_found("device", &id));
    }
    Ok(ok(state.registry.list_commands(&id)))
}

/// One command and its state.
#[utoipa::path(get, path = "/api/v1/devices/{id}/commands/{command_id}", tag = "commands",
    params(
        ("id" = String, Path, description = "Device id"),
        ("command_id" = String, Path, description = "Command id"),
    ),
    responses(
        (status = 200, description = "The command", body = Command),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device or command", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin_token" = [])))]
pub async fn get(
    _admin: Admin,
    State(state): State<Arc<V1State>>,
    ApiPath((id, command_id)): ApiPath<(String, String)>,
) -> Result<JsonResponse<Command>, ApiError> {
    state
        .registry
        .get_command(&id, &command_id)
        .map(ok)
        .ok_or_else(|| ApiError::not_found("command", &command_id))
}
