//! `GET /api/v1/sinks`: every running sink with its upstream link health and its
//! failover state (admin token required, as for the config it describes).
//!
//! The topology attaches a [`SinkBoard`] at start-up and after every reload; the handler
//! reads the live link health and failover switches through it, so an answer is current
//! to the moment it is made.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use serde::Serialize;
use tokio::time::Instant;

use super::admin::denied_problem;
use super::config::ConfigApi;
use super::extract::ClientIp;
use super::problem::ApiError;
use crate::sinks::failover::{FailoverStatus, FailoverView};
use crate::sinks::link::LinkHealth;

/// One sink as the board knows it.
pub struct BoardEntry {
    /// The sink's name.
    pub name: String,
    /// Its `type`.
    pub r#type: &'static str,
    /// Its link health, for sinks with an upstream.
    pub link: Option<LinkHealth>,
}

/// The running sinks and their failovers.
#[derive(Default)]
pub struct SinkBoard {
    /// Every sink, by name.
    pub sinks: Vec<BoardEntry>,
    /// The failover switches.
    pub failovers: FailoverView,
}

/// `GET /api/v1/sinks`.
#[derive(Debug, Serialize)]
pub struct SinkList {
    /// Every running sink, by name.
    pub sinks: Vec<SinkStatus>,
}

/// One sink's state.
#[derive(Debug, Serialize)]
pub struct SinkStatus {
    /// The sink's name.
    pub name: String,
    /// Its `type`.
    pub r#type: &'static str,
    /// Its upstream link, for sinks with one (MQTT).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkStatus>,
    /// Its failover, when it names a failover sink.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverStatus>,
    /// The sinks that fail over to this one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failover_for: Vec<String>,
}

/// An upstream link's health.
#[derive(Debug, Serialize)]
pub struct LinkStatus {
    /// Whether it has a healthy connection.
    pub up: bool,
    /// Seconds since it became up or down.
    pub for_seconds: f64,
}

impl SinkBoard {
    /// The state of every sink now.
    pub fn list(&self) -> SinkList {
        let now = Instant::now();
        SinkList {
            sinks: self
                .sinks
                .iter()
                .map(|sink| SinkStatus {
                    name: sink.name.clone(),
                    r#type: sink.r#type,
                    link: sink.link.as_ref().map(|link| {
                        let state = link.current();
                        LinkStatus {
                            up: state.up,
                            for_seconds: now.saturating_duration_since(state.since).as_secs_f64(),
                        }
                    }),
                    failover: self.failovers.status(&sink.name),
                    failover_for: self.failovers.primaries_of(&sink.name),
                })
                .collect(),
        }
    }
}

/// `GET /api/v1/sinks`.
pub async fn list(
    State(state): State<Arc<ConfigApi>>,
    ip: ClientIp,
    headers: HeaderMap,
) -> Result<Json<SinkList>, ApiError> {
    state
        .admin()
        .check(ip.0, &headers)
        .map_err(denied_problem)?;
    Ok(Json(state.sinks().list()))
}
