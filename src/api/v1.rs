//! The `/api/v1` router of the device registry and the state its handlers share: the
//! registry, the admin check, the device auth throttle and the HTTP ingestion output.
//!
//! These routes exist only when `[registry]` is configured. The admin token is checked by the
//! gateway-wide [`AdminAuth`]; failed device authentications (device JWT, provisioning and
//! refresh tokens) all go through [`V1State::auth_failed`]:
//! one counter, and one throttle keyed per source address and per (device id, source
//! address), so failures from one address never lock a device out of another.

use std::net::IpAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use fieldgate_registry::{AuthThrottle, Registry, ThrottleConfig};
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;

use super::admin::AdminAuth;
use super::ingest::{self, HTTP_SOURCE, IngestOutput};
use super::problem::ApiError;
use super::{commands, devices, openapi, provisioning, registration};
use crate::devices::commands::CommandDispatcher;
use crate::telemetry::Metrics;
use crate::telemetry::metrics::SourceLabel;

/// `source` label of `fieldgate_auth_failures_total` for device credentials over HTTP.
pub const DEVICE_SOURCE: &str = HTTP_SOURCE;

/// What the `/api/v1` handlers share.
pub struct V1State {
    /// The device registry.
    pub registry: Arc<Registry>,
    /// The admin check (shared with `/debug/pprof/*`); without a token the admin routes
    /// answer 404.
    pub admin: Arc<AdminAuth>,
    /// Where `POST /api/v1/devices/{id}/telemetry` sends events.
    pub ingest: Arc<IngestOutput>,
    /// `Event::source` of ingested events.
    pub source_name: Arc<str>,
    /// `fieldgate_received_events_total{source="http"}`.
    pub received: Counter,
    metrics: Arc<Metrics>,
    throttle: AuthThrottle,
    origin: Instant,
    commands: std::sync::OnceLock<Arc<CommandDispatcher>>,
}

impl V1State {
    /// State over `registry`, with default throttles.
    pub fn new(registry: Arc<Registry>, admin: Arc<AdminAuth>, metrics: Arc<Metrics>) -> Self {
        Self::with_throttle(registry, admin, metrics, ThrottleConfig::default())
    }

    /// State with a custom throttle policy (tests).
    pub fn with_throttle(
        registry: Arc<Registry>,
        admin: Arc<AdminAuth>,
        metrics: Arc<Metrics>,
        throttle: ThrottleConfig,
    ) -> Self {
        let received = metrics
            .received_events
            .get_or_create(&SourceLabel {
                source: HTTP_SOURCE.into(),
            })
            .clone();
        Self {
            registry,
            admin,
            ingest: Arc::new(IngestOutput::default()),
            source_name: Arc::from(HTTP_SOURCE),
            received,
            metrics,
            throttle: AuthThrottle::new(throttle),
            origin: Instant::now(),
            commands: std::sync::OnceLock::new(),
        }
    }

    /// Routes submitted commands through `dispatcher`, so a connected device gets them
    /// at once (without it they wait in the registry for the device's next connect).
    pub fn attach_commands(&self, dispatcher: Arc<CommandDispatcher>) {
        if self.commands.set(dispatcher).is_err() {
            tracing::warn!("a command dispatcher was already attached to the API");
        }
    }

    /// The gateway's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The attached command dispatcher, if any.
    pub fn commands(&self) -> Option<Arc<CommandDispatcher>> {
        self.commands.get().cloned()
    }

    /// 429 while `ip` (or `device` from `ip`) is serving a delay for earlier failures.
    pub fn check_throttle(&self, ip: IpAddr, device: Option<&str>) -> Result<(), ApiError> {
        self.throttle
            .check(ip, device, self.origin.elapsed())
            .map_err(ApiError::throttled)
    }

    /// Counts a failed authentication and lengthens the delays of `ip` and `device`.
    pub fn auth_failed(&self, ip: IpAddr, device: Option<&str>, source: &str) {
        self.throttle.failure(ip, device, self.origin.elapsed());
        if let Some(device) = device {
            self.registry.record_error(device);
        }
        self.metrics
            .auth_failures
            .get_or_create(&SourceLabel {
                source: source.into(),
            })
            .inc();
        tracing::debug!(peer = %ip, device_id = device.unwrap_or("-"), source, "authentication failed");
    }

    /// Runs a registry call that may write to disk on the blocking pool.
    pub async fn blocking<T, F>(&self, call: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Registry) -> T + Send + 'static,
    {
        let registry = Arc::clone(&self.registry);
        tokio::task::spawn_blocking(move || call(&registry))
            .await
            .map_err(|err| {
                tracing::error!(error = %err, "registry call failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "Internal error",
                    "the registry call did not finish; see the gateway log",
                )
            })
    }
}

/// Every `/api/v1` route.
pub fn router(state: Arc<V1State>) -> Router {
    Router::new()
        .route("/api/v1/openapi.json", get(openapi::document))
        .route("/api/v1/devices", post(devices::create).get(devices::list))
        .route(
            "/api/v1/devices/register/challenge",
            post(registration::challenge),
        )
        .route("/api/v1/devices/register", post(registration::register))
        .route("/api/v1/auth/refresh", post(registration::refresh))
        .route(
            "/api/v1/devices/{id}",
            get(devices::get)
                .patch(devices::patch)
                .delete(devices::delete),
        )
        .route("/api/v1/devices/{id}/rotate", post(devices::rotate))
        .route("/api/v1/jwt-key/rotate", post(super::admin::rotate_jwt_key))
        .route("/api/v1/devices/{id}/revoke", post(devices::revoke))
        .route("/api/v1/devices/{id}/status", get(devices::status))
        .route(
            "/api/v1/devices/{id}/commands",
            post(commands::submit).get(commands::list),
        )
        .route(
            "/api/v1/devices/{id}/commands/{command_id}",
            get(commands::get),
        )
        .route("/api/v1/devices/{id}/telemetry", post(ingest::telemetry))
        .route(
            "/api/v1/provisioning-tokens",
            post(provisioning::create).get(provisioning::list),
        )
        .route(
            "/api/v1/provisioning-tokens/{id}",
            axum::routing::delete(provisioning::revoke),
        )
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "Method not allowed",
                "this route does not accept this method",
            )
        })
        .with_state(state)
}
