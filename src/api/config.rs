//! `/api/v1/config`: the running config and live reload. Admin token required.
//!
//! - `GET /api/v1/config`: the running config as JSON with secrets redacted, its hash,
//!   and the buffers left on disk by sinks no longer in the config.
//! - `POST /api/v1/config/reload`: re-reads the `--config` file and applies it (as
//!   `kill -HUP` does); answers what changed, or why nothing did.
//! - `GET /api/v1/sinks`: the running sinks' link health and failover state
//!   ([`super::sinks`]).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::admin::{AdminAuth, denied_problem};
use super::extract::ClientIp;
use super::problem::ApiError;
use super::sinks::SinkBoard;

/// How long a reload request waits for the topology to apply it.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// The running config as the API shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConfigView {
    /// SHA-256 of the running config text.
    pub hash: String,
    /// The running config, secrets redacted.
    pub config: serde_json::Value,
    /// Buffers of sinks that are no longer configured, kept until deleted by hand.
    pub detached_buffers: Vec<DetachedBuffer>,
}

/// A buffer on disk whose sink is not in the running config.
#[derive(Debug, Clone, Serialize)]
pub struct DetachedBuffer {
    /// The sink it belonged to.
    pub sink: String,
    /// Its directory.
    pub path: String,
    /// Bytes it holds on disk.
    pub bytes: u64,
}

/// What a reload did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadReport {
    /// `"applied"` or `"unchanged"`.
    pub result: &'static str,
    /// Hash of the config now running.
    pub hash: String,
    /// Components started (`sources.NAME`, `sinks.NAME`).
    pub added: Vec<String>,
    /// Components rebuilt because their settings changed.
    pub changed: Vec<String>,
    /// Components stopped (a removed sink's buffer stays on disk).
    pub removed: Vec<String>,
    /// Sources whose TLS certificates and keys were re-read in place.
    pub tls_reloaded: Vec<String>,
}

/// A reload request from the API, answered by the topology.
pub type ReloadRequest = oneshot::Sender<Result<ReloadReport, String>>;

/// What the config handlers share with the topology.
pub struct ConfigApi {
    admin: Arc<AdminAuth>,
    view: RwLock<ConfigView>,
    sinks: RwLock<Arc<SinkBoard>>,
    reload: mpsc::Sender<ReloadRequest>,
}

impl ConfigApi {
    /// Handlers guarded by `admin`; reloads are sent to `reload`.
    pub fn new(admin: Arc<AdminAuth>, reload: mpsc::Sender<ReloadRequest>) -> Self {
        Self {
            admin,
            view: RwLock::new(ConfigView::default()),
            sinks: RwLock::new(Arc::new(SinkBoard::default())),
            reload,
        }
    }

    /// Publishes the running config (at start-up and after every reload).
    pub fn show(&self, view: ConfigView) {
        *self
            .view
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = view;
    }

    /// Publishes the running sinks (at start-up and after every reload).
    pub fn show_sinks(&self, board: SinkBoard) {
        *self
            .sinks
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(board);
    }

    /// The running sinks.
    pub fn sinks(&self) -> Arc<SinkBoard> {
        Arc::clone(
            &self
                .sinks
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// The admin check of these routes.
    pub fn admin(&self) -> &AdminAuth {
        &self.admin
    }

    fn current(&self) -> ConfigView {
        self.view
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The routes.
pub fn router(state: Arc<ConfigApi>) -> Router {
    Router::new()
        .route("/api/v1/config", get(show))
        .route("/api/v1/config/reload", post(reload))
        .route("/api/v1/sinks", get(super::sinks::list))
        .with_state(state)
}

async fn show(
    State(state): State<Arc<ConfigApi>>,
    ip: ClientIp,
    headers: HeaderMap,
) -> Result<Json<ConfigView>, ApiError> {
    state.admin.check(ip.0, &headers).map_err(denied_problem)?;
    Ok(Json(state.current()))
}

async fn reload(
    State(state): State<Arc<ConfigApi>>,
    ip: ClientIp,
    headers: HeaderMap,
) -> Result<Json<ReloadReport>, ApiError> {
    state.admin.check(ip.0, &headers).map_err(denied_problem)?;
    let unavailable = |detail: &str| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "Not ready",
            detail.to_owned(),
        )
        .with_retry_after(Duration::from_secs(1))
    };
    let (answer, outcome) = oneshot::channel();
    state
        .reload
        .send(answer)
        .await
        .map_err(|_| unavailable("the gateway is shutting down"))?;
    match tokio::time::timeout(RELOAD_TIMEOUT, outcome).await {
        Ok(Ok(Ok(report))) => Ok(Json(report)),
        Ok(Ok(Err(error))) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "reload_failed",
            "Reload failed",
            format!("{error}; the running config is unchanged"),
        )),
        Ok(Err(_)) => Err(unavailable("the gateway is shutting down")),
        Err(_) => Err(unavailable("the reload did not finish in time")),
    }
}
