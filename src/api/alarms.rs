//! `/api/v1/alarms`: the alarms of every `type = "alarm"` transform, listed and
//! acknowledged (admin token required, like the other admin routes).
//!
//! - `GET /api/v1/alarms?state=raised|acknowledged|cleared|active&device=ID&rule=NAME&limit=N`:
//!   alarms by rule then device (`active` = raised or acknowledged).
//! - `POST /api/v1/alarms/{rule}/{device}/ack`: acknowledges a raised alarm (idempotent:
//!   an acknowledged one answers as is); 404 when the rule or its alarm for the device
//!   does not exist, 409 when the alarm is already cleared.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::admin::{AdminAuth, denied_problem};
use super::extract::{ApiPath, ApiQuery, ClientIp, JsonResponse, ok};
use super::problem::{ApiError, Problem};
use crate::clock::now_ms;
use crate::transforms::alarm::{AckError, Alarm, AlarmBoard, AlarmFilter, AlarmState};

/// Listed at most per request unless `limit` says otherwise.
const DEFAULT_LIMIT: usize = 1000;
/// Largest `limit` accepted.
const MAX_LIMIT: usize = 10_000;

/// What the alarm handlers share.
pub struct AlarmApi {
    admin: Arc<AdminAuth>,
    board: Arc<AlarmBoard>,
}

impl AlarmApi {
    /// Routes over `board`, guarded by the gateway's admin check.
    pub fn new(admin: Arc<AdminAuth>, board: Arc<AlarmBoard>) -> Self {
        Self { admin, board }
    }

    fn authorize(&self, ip: ClientIp, headers: &HeaderMap) -> Result<(), ApiError> {
        self.admin.check(ip.0, headers).map_err(denied_problem)
    }
}

/// The routes.
pub fn router(state: Arc<AlarmApi>) -> Router {
    Router::new()
        .route("/api/v1/alarms", get(list))
        .route("/api/v1/alarms/{rule}/{device}/ack", post(acknowledge))
        .with_state(state)
}

/// Filters of `GET /api/v1/alarms`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    state: Option<String>,
    device: Option<String>,
    rule: Option<String>,
    limit: Option<usize>,
}

/// A page of alarms.
#[derive(Debug, Serialize, ToSchema)]
pub struct AlarmList {
    /// Alarms matching the filters, in all.
    pub total: usize,
    /// At most `limit` of them, by rule then device.
    pub alarms: Vec<Alarm>,
}

/// Lists alarms: active ones and the last cleared one per rule and device.
#[utoipa::path(get, path = "/api/v1/alarms", tag = "alarms",
    params(
        ("state" = Option<String>, Query, description = "raised, acknowledged, cleared or active (raised or acknowledged)"),
        ("device" = Option<String>, Query, description = "Only this device's alarms"),
        ("rule" = Option<String>, Query, description = "Only this rule's (alarm transform's) alarms"),
        ("limit" = Option<usize>, Query, description = "At most this many (1..=10000, default 1000)"),
    ),
    responses(
        (status = 200, description = "The alarms", body = AlarmList),
        (status = 400, description = "Invalid filter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin_token" = [])))]
pub async fn list(
    State(state): State<Arc<AlarmApi>>,
    ip: ClientIp,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<JsonResponse<AlarmList>, ApiError> {
    state.authorize(ip, &headers)?;
    let mut filter = AlarmFilter {
        device: query.device,
        rule: query.rule,
        ..AlarmFilter::default()
    };
    match query.state.as_deref() {
        None => {}
        Some("active") => filter.active = true,
        Some("raised") => filter.state = Some(AlarmState::Raised),
        Some("acknowledged") => filter.state = Some(AlarmState::Acknowledged),
        Some("cleared") => filter.state = Some(AlarmState::Cleared),
        Some(_) => {
            return Err(ApiError::invalid(
                "state",
                "expected raised, acknowledged, cleared or active",
            ));
        }
    }
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::invalid(
            "limit",
            format!("must be between 1 and {MAX_LIMIT}"),
        ));
    }
    let mut alarms = state.board.list(&filter);
    let total = alarms.len();
    alarms.truncate(limit);
    Ok(ok(AlarmList { total, alarms }))
}

/// Acknowledges the raised alarm of a rule for a device.
#[utoipa::path(post, path = "/api/v1/alarms/{rule}/{device}/ack", tag = "alarms",
    params(
        ("rule" = String, Path, description = "The rule: the alarm transform's name"),
        ("device" = String, Path, description = "Device id"),
    ),
    responses(
        (status = 200, description = "The alarm, acknowledged", body = Alarm),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such rule, or no alarm of it for the device", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The alarm is cleared already", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin_token" = [])))]
pub async fn acknowledge(
    State(state): State<Arc<AlarmApi>>,
    ip: ClientIp,
    headers: HeaderMap,
    ApiPath((rule, device)): ApiPath<(String, String)>,
) -> Result<JsonResponse<Alarm>, ApiError> {
    state.authorize(ip, &headers)?;
    match state.board.acknowledge(&rule, &device, now_ms()) {
        Ok(alarm) => {
            tracing::info!(rule = %alarm.rule, device_id = %alarm.device, "alarm acknowledged");
            Ok(ok(alarm))
        }
        Err(AckError::NoRule(rule)) => Err(ApiError::not_found("alarm rule", &rule)),
        Err(err @ AckError::NoAlarm { .. }) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "Not found",
            err.to_string(),
        )),
        Err(err @ AckError::Cleared { .. }) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "Conflict",
            err.to_string(),
        )),
    }
}
