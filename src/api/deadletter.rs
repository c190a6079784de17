//! `/api/v1/deadletter/{sink}`: list, replay and purge the events a sink's upstream
//! refused for good (see [`crate::sinks::deadletter`]). Admin token required.
//!
//! - `GET /api/v1/deadletter/{sink}?limit=N`: the parked events, oldest first.
//! - `POST /api/v1/deadletter/{sink}/replay`: moves them back into the sink's buffer
//!   (after the cause was fixed); answers how many.
//! - `DELETE /api/v1/deadletter/{sink}`: drops them for good; answers how many.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use fieldgate_core::Priority;
use serde::{Deserialize, Serialize};

use super::admin::constant_time_eq;
use super::extract::bearer;
use super::problem::ApiError;
use crate::buffer::{AppendError, SinkBuffer};
use crate::sinks::deadletter::{DeadLetterInfo, DeadLetters};
use crate::telemetry::Metrics;
use crate::telemetry::metrics::SourceLabel;

/// Listed at most per request unless `limit` says otherwise.
const DEFAULT_LIMIT: usize = 100;
/// Largest `limit` accepted.
const MAX_LIMIT: usize = 10_000;

/// A sink's dead letters and the buffer they are replayed into.
pub type SinkDeadLetters = (Arc<DeadLetters>, Arc<SinkBuffer>);

/// What the dead-letter handlers share.
pub struct DeadLetterApi {
    admin_token: Option<String>,
    metrics: Arc<Metrics>,
    sinks: OnceLock<BTreeMap<String, SinkDeadLetters>>,
}

impl DeadLetterApi {
    /// Routes guarded by `admin_token` (404 without one); sinks attach later.
    pub fn new(admin_token: Option<String>, metrics: Arc<Metrics>) -> Self {
        Self {
            admin_token,
            metrics,
            sinks: OnceLock::new(),
        }
    }

    /// Makes the sinks' stores reachable (once, when they are open).
    pub fn attach(&self, sinks: BTreeMap<String, SinkDeadLetters>) {
        if self.sinks.set(sinks).is_err() {
            tracing::warn!("dead-letter stores attached twice; keeping the first");
        }
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(expected) = self.admin_token.as_deref() else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "admin_disabled",
                "Admin routes disabled",
                "set api.admin_token in the config to enable the admin routes",
            ));
        };
        let presented = bearer(headers).unwrap_or_default();
        if presented.is_empty() || !constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
            self.metrics
                .auth_failures
                .get_or_create(&SourceLabel {
                    source: super::v1::ADMIN_SOURCE.into(),
                })
                .inc();
            tracing::warn!(route = "deadletter", "admin authentication failed");
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "bad_admin_token",
                "Bad admin token",
                "this route needs `Authorization: Bearer <admin token>`",
            ));
        }
        Ok(())
    }

    fn sink(&self, name: &str) -> Result<SinkDeadLetters, ApiError> {
        self.sinks
            .get()
            .and_then(|sinks| sinks.get(name))
            .map(|(store, buffer)| (Arc::clone(store), Arc::clone(buffer)))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "No such sink",
                    format!("sink {name:?} has no dead-letter store (only MQTT sinks do)"),
                )
            })
    }
}

/// The routes.
pub fn router(state: Arc<DeadLetterApi>) -> Router {
    Router::new()
        .route("/api/v1/deadletter/{sink}", get(list).delete(purge))
        .route("/api/v1/deadletter/{sink}/replay", post(replay))
        .with_state(state)
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

#[derive(Debug, Serialize)]
struct Listing {
    sink: String,
    total: u64,
    entries: Vec<DeadLetterInfo>,
}

#[derive(Debug, Serialize)]
struct Count {
    sink: String,
    count: usize,
    remaining: u64,
}

fn storage_error(err: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "storage",
        "Storage error",
        err.to_string(),
    )
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(storage_error)?
}

async fn list(
    State(state): State<Arc<DeadLetterApi>>,
    Path(sink): Path<String>,
    Query(query): Query<ListQuery>,
    headers: HeaderMap,
) -> Result<Json<Listing>, ApiError> {
    state.authorize(&headers)?;
    let (store, _) = state.sink(&sink)?;
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT);
    let (total, entries) = blocking(move || {
        let entries = store.list(limit).map_err(storage_error)?;
        Ok((store.count(), entries))
    })
    .await?;
    Ok(Json(Listing {
        sink,
        total,
        entries,
    }))
}

async fn replay(
    State(state): State<Arc<DeadLetterApi>>,
    Path(sink): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Count>, ApiError> {
    state.authorize(&headers)?;
    let (store, buffer) = state.sink(&sink)?;
    let (count, remaining) = blocking(move || {
        let records = store.records(MAX_LIMIT).map_err(storage_error)?;
        let encoded: Vec<(Priority, Vec<u8>)> = records
            .iter()
            .map(|record| {
                let mut bytes = Vec::with_capacity(record.event.encoded_len());
                record.event.encode(&mut bytes);
                (record.event.priority, bytes)
            })
            .collect();
        let (stored, error) = buffer.append(&encoded);
        // Durable in the buffer before it leaves the dead-letter store.
        buffer.commit(true).map_err(storage_error)?;
        let ids: Vec<_> = records
            .iter()
            .take(stored)
            .map(|record| record.id)
            .collect();
        store.remove(&ids).map_err(storage_error)?;
        match error {
            Some(AppendError::Full) => {
                tracing::warn!(
                    sink = buffer.sink(),
                    replayed = stored,
                    "buffer full: dead-letter replay stopped early"
                );
            }
            Some(AppendError::Storage(err)) => return Err(storage_error(err)),
            None => {}
        }
        Ok((stored, store.count()))
    })
    .await?;
    tracing::info!(
        sink,
        count,
        remaining,
        "dead letters replayed into the buffer"
    );
    Ok(Json(Count {
        sink,
        count,
        remaining,
    }))
}

async fn purge(
    State(state): State<Arc<DeadLetterApi>>,
    Path(sink): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Count>, ApiError> {
    state.authorize(&headers)?;
    let (store, _) = state.sink(&sink)?;
    let (count, remaining) = blocking(move || {
        let ids: Vec<_> = store
            .records(usize::MAX)
            .map_err(storage_error)?
            .into_iter()
            .map(|record| record.id)
            .collect();
        store.remove(&ids).map_err(storage_error)?;
        Ok((ids.len(), store.count()))
    })
    .await?;
    tracing::warn!(sink, count, "dead letters purged");
    Ok(Json(Count {
        sink,
        count,
        remaining,
    }))
}
