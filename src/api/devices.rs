//! Admin routes over registered devices: create, list, get, patch, delete, rotate, revoke,
//! status.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use fieldgate_registry::{
    Device, DevicePage, DevicePatch, DeviceQuery, DeviceStatus, NewDevice, Provisioned,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::admin::Admin;
use super::extract::{ApiJson, ApiPath, ApiQuery, JsonResponse, ok};
use super::problem::{ApiError, Problem};
use super::v1::V1State;

/// Largest page a client may ask for.
const MAX_LIMIT: usize = 1000;

/// Filters and paging of `GET /api/v1/devices`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeviceListParams {
    /// Only devices with this status.
    pub status: Option<DeviceStatus>,
    /// Only devices with this label, as `key:value`.
    pub label: Option<String>,
    /// Only devices of this model.
    pub model: Option<String>,
    /// Case-insensitive substring of id, name, MAC or IMEI.
    pub search: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Page size, 1..=1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

impl DeviceListParams {
    /// The registry query, or a 400 naming the bad parameter.
    pub fn into_query(self) -> Result<DeviceQuery, ApiError> {
        let label = match self.label {
            None => None,
            Some(label) => match label.split_once(':') {
                Some((key, value)) if !key.is_empty() => Some((key.to_owned(), value.to_owned())),
                _ => return Err(ApiError::invalid("label", "expected key:value")),
            },
        };
        let limit = match self.limit {
            None => fieldgate_registry::DEFAULT_PAGE_LIMIT,
            Some(limit @ 1..=MAX_LIMIT) => limit,
            Some(_) => return Err(ApiError::invalid("limit", "must be between 1 and 1000")),
        };
        Ok(DeviceQuery {
            status: self.status,
            label,
            model: self.model,
            search: self.search,
            cursor: self.cursor,
            limit,
        })
    }
}

/// `GET /api/v1/devices/{id}/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeviceStatusView {
    /// Device id.
    pub id: String,
    /// Online, offline or revoked.
    pub status: DeviceStatus,
    /// Last connection or message, ms since the Unix epoch.
    pub last_seen_ms: Option<u64>,
    /// Messages received from the device.
    pub messages: u64,
    /// Payload bytes received from the device.
    pub bytes: u64,
    /// Errors counted against the device.
    pub errors: u64,
}

impl From<Device> for DeviceStatusView {
    fn from(device: Device) -> Self {
        Self {
            id: device.id,
            status: device.status,
            last_seen_ms: device.last_seen_ms,
            messages: device.messages,
            bytes: device.bytes,
            errors: device.errors,
        }
    }
}

/// Adds a device; answers its credentials, shown only this once.
#[utoipa::path(post, path = "/api/v1/devices", tag = "devices",
    request_body = NewDevice,
    responses(
        (status = 201, description = "Device created; `secret` and tokens are shown only once", body = Provisioned),
        (status = 400, description = "Invalid field or malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A device with this id or identifier exists", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin_token" = [])))]
pub async fn create(
    _admin: Admin,
    State(state): State<Arc<V1State>>,
    ApiJson(new): ApiJson<NewDevice>,
) -> Result<JsonResponse<Provisioned>, ApiError> {
    let provisioned = state
        .blocking(move |registry| registry.add_device(new))
        .await??;
    tracing::info!(device_id = %provisioned.device.id, "device added");
    Ok(JsonResponse(StatusCode::CREATED, provisioned))
}

/// Lists devices, filtered, one page at a time in id order.
#[utoipa::path(get, path = "/api/v1/devices", tag = "devices",
    params(DeviceListParams),
    responses(
        (status = 200, description = "One page of devices", body = DevicePage),
        (status = 400, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin_token" = [])))]
pub async fn list(
    _admin: Admin,
    State(state): State<Arc<V1State>>,
    ApiQuery(params): ApiQuery<DeviceListParams>,
) -> Result<JsonResponse<DevicePage>, ApiError> {
    let query = params.into_query()?;
    Ok(ok(state.registry.list_devices(&query)))
}

/// One device.
#[utoipa::path(get, path = "/api/v1/devices/{id}", tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 200, description = "The device", body = Device),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin_token" = [])))]
pub async fn get(
    _admin: Admin,
    State(state): State<Arc<V1State>>,
    ApiPath(id): ApiPath<String>,
) -> Result<JsonResponse<Device>, ApiError> {
    state
        .registry
        .get_device(&id)
        .map(ok)
        .ok_or_else(|| ApiError::not_found("device", &id))
}

/// Changes a device's name, model or labels.
#[utoipa::path(patch, path = "/api/v1/devices/{id}", tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    request_body = DevicePatch,
    responses(
        (status = 200, description = "The device after the change", body = Device),
        (status = 400, description = "Invalid field or malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin_token" = [])))]
pub async fn patch(
    _admin: Admin,
    State(state): State<Arc<V1State>>,
    ApiPath(id): ApiPath<String>,
    ApiJson(patch): ApiJson<DevicePatch>,
) -> Result<JsonResponse<Device>, ApiError> {
    let device = state
        .blocking(move |registry| registry.update_device(&id, patch))
        .await??;
    Ok(ok(device))
}

/// Deletes a device and closes its sessions.
#[utoipa::path(delete, path = "/api/v1/devices/{id}", tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin_token" = [])))]
pub async fn delete(
    _admin: Admin,
    State(state): State<Arc<V1State>>,
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    let deleted = id.clone();
    state
        .blocking(move |registry| registry.delete_device(&id))
        .await??;
    tracing::info!(device_id = %deleted, "device deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Replaces a device's secret and tokens; the old secret stops working at once.
#[utoipa::path(post, path = "/api/v1/devices/{id}/rotate", tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 200, description = "New credentials, shown only once", body = Provisioned),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin_token" = [])))]
pub async fn rotate(
    _admin: Admin,
    State(state): State<Arc<V1State>>,
    ApiPath(id): ApiPath<String>,
) -> Result<JsonResponse<Provisioned>, ApiError> {
    let provisioned = state
        .blocking(move |registry| registry.rotate_secret(&id))
        .await??;
    tracing::info!(device_id = %provisioned.device.id, "device credentials rotated");
    Ok(ok(provisioned))
}

/// Revokes a device: every authentication fails and its sessions are closed.
#[utoipa::path(post, path = "/api/v1/devices/{id}/revoke", tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 200, description = "The revoked device", body = Device),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin_token" = [])))]
pub async fn revoke(
    _admin: Admin,
    State(state): State<Arc<V1State>>,
    ApiPath(id): ApiPath<String>,
) -> Result<JsonResponse<Device>, ApiError> {
    let device = state
        .blocking(move |registry| registry.revoke_device(&id))
        .await??;
    tracing::info!(device_id = %device.id, "device revoked");
    Ok(ok(device))
}

/// A device's status, last seen and counters.
#[utoipa::path(get, path = "/api/v1/devices/{id}/status", tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 200, description = "Status and counters", body = DeviceStatusView),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such device", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin_token" = [])))]
pub async fn status(
    _admin: Admin,
    State(state): State<Arc<V1State>>,
    ApiPath(id): ApiPath<String>,
) -> Result<JsonResponse<DeviceStatusView>, ApiError> {
    state
        .registry
        .get_device(&id)
        .map(|device| ok(DeviceStatusView::from(device)))
        .ok_or_else(|| ApiError::not_found("device", &id))
}
