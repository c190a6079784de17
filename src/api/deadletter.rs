//! `/api/v1/deadletter/{sink}`: list, replay and purge the events a sink's upstream
//! refused for good (see [`crate::sinks::deadletter`]). Admin token required.
//!
//! - `GET /api/v1/deadletter/{sink}?limit=N`: the parked events, oldest first.
//! - `POST /api/v1/deadletter/{sink}/replay`: moves them back into the sink's buffer
//!   (after the cause was fixed); answers how many.
//! - `DELETE /api/v1/deadletter/{sink}`: drops them for good; answers how many.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use fieldgate_core::Priority;
use serde::{Deserialize, Serialize};

use super::admin::{AdminAuth, denied_problem};
use super::extract::ClientIp;
use super::problem::ApiError;
use crate::buffer::{AppendError, SinkBuffer};
use crate::sinks::deadletter::{DeadLetterInfo, DeadLetters};

/// Listed at most per request unless `limit` says otherwise.
const DEFAULT_LIMIT: usize = 100;
/// Largest `limit` accepted.
const MAX_LIMIT: usize = 10_000;

/// A sink's dead letters and the buffer they are replayed into.
pub type SinkDeadLetters = (Arc<DeadLetters>, Arc<SinkBuffer>);

/// What the dead-letter handlers share.
pub struct DeadLetterApi {
    admin: Arc<AdminAuth>,
    sinks: RwLock<BTreeMap<String, SinkDeadLetters>>,
}

impl DeadLetterApi {
    /// Routes guarded by the gateway's admin check (404 without a token); sinks attach later.
    pub fn new(admin: Arc<AdminAuth>) -> Self {
        Self {
            admin,
            sinks: RwLock::new(BTreeMap::new()),
        }
    }

    /// Makes the sinks' stores reachable (at start-up and after every reload).
    pub fn attach(&self, sinks: BTreeMap<String, SinkDeadLetters>) {
        *self
            .sinks
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = sinks;
    }

    fn authorize(&self, ip: ClientIp, headers: &HeaderMap) -> Result<(), ApiError> {
        self.admin.check(ip.0, headers).map_err(denied_problem)
    }

    fn sink(&self, name: &str) -> Result<SinkDeadLetters, ApiError> {
        self.sinks
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
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
    ip: ClientIp,
    headers: HeaderMap,
) -> Result<Json<Listing>, ApiError> {
    state.authorize(ip, &headers)?;
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
    ip: ClientIp,
    headers: HeaderMap,
) -> Result<Json<Count>, ApiError> {
    state.authorize(ip, &headers)?;
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
        let mut replayed = Vec::new();
        let mut offset = 0;
        let mut failure = None;
        while offset < encoded.len() {
            let (stored, error) = buffer.append(&encoded[offset..]);
            replayed.extend(
                records[offset..offset + stored]
                    .iter()
                    .map(|record| record.id),
            );
            offset += stored;
            match error {
                None => break,
                Some(AppendError::TooLarge { len, max }) => {
                    // It can never fit this buffer: it stays parked; go on with the rest.
                    tracing::warn!(
                        sink = buffer.sink(),
                        len,
                        max,
                        "a dead letter larger than the buffer stays parked"
                    );
                    offset += 1;
                }
                Some(AppendError::Full) => {
                    tracing::warn!(
                        sink = buffer.sink(),
                        replayed = replayed.len(),
                        "buffer full: dead-letter replay stopped early"
                    );
                    break;
                }
                Some(AppendError::Storage(err)) => {
                    failure = Some(err);
                    break;
                }
            }
        }
        // Durable in the buffer before it leaves the dead-letter store.
        buffer.commit(true).map_err(storage_error)?;
        store.remove(&replayed).map_err(storage_error)?;
        if let Some(err) = failure {
            return Err(storage_error(err));
        }
        let stored = replayed.len();
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
    ip: ClientIp,
    headers: HeaderMap,
) -> Result<Json<Count>, ApiError> {
    state.authorize(ip, &headers)?;
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
