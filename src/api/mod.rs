//! The HTTP API: `/metrics` (Prometheus), `/healthz` (alive), `/readyz` (listeners bound
//! and buffers open), and the admin-only `/debug/pprof/*` routes of
//! [`crate::telemetry::profiling::http`]; with `[registry]`, the device registry's
//! `/api/v1` routes of [`v1`].

pub mod admin;
pub mod commands;
pub mod deadletter;
pub mod devices;
pub mod extract;
pub mod ingest;
pub mod openapi;
pub mod problem;
pub mod provisioning;
pub mod registration;
#[cfg(test)]
mod tests;
pub mod v1;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Metrics;
use crate::telemetry::profiling::http::{self as debug_routes, DebugState};

/// What the handlers read.
pub struct ApiState {
    /// Every metric.
    pub metrics: Arc<Metrics>,
    /// Set once every listener is bound and every buffer is open.
    pub ready: AtomicBool,
    /// The admin token and CPU profiler behind `/debug/pprof/*`.
    pub debug: Arc<DebugState>,
    /// The device registry's `/api/v1` routes; none without `[registry]`.
    pub v1: Option<Arc<v1::V1State>>,
    /// `/api/v1/deadletter/{sink}`.
    pub deadletter: Arc<deadletter::DeadLetterApi>,
}

impl ApiState {
    /// Makes the sinks' dead-letter stores reachable through the API.
    pub fn attach_deadletters(
        &self,
        sinks: std::collections::BTreeMap<String, deadletter::SinkDeadLetters>,
    ) {
        self.deadletter.attach(sinks);
    }
}

/// The routes.
pub fn router(state: Arc<ApiState>) -> Router {
    let v1_routes = state.v1.clone().map(v1::router).unwrap_or_default();
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(debug_routes::routes(Arc::clone(&state.debug)))
        .with_state(Arc::clone(&state))
        .merge(v1_routes)
        .merge(deadletter::router(Arc::clone(&state.deadletter)))
}

async fn metrics(State(state): State<Arc<ApiState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

async fn readyz(State(state): State<Arc<ApiState>>) -> impl IntoResponse {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

/// Serves until `shutdown`.
pub async fn serve(listener: TcpListener, state: Arc<ApiState>, shutdown: CancellationToken) {
    let app = router(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    if let Err(err) = served {
        tracing::error!(error = %err, "API server failed");
    }
}
