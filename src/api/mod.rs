//! The HTTP API: `/metrics` (Prometheus), `/healthz` (alive), `/readyz` (listeners bound
//! and buffers open), and the admin-only `/debug/pprof/*` routes of
//! [`crate::telemetry::profiling::http`], the running config and its reload
//! ([`config`]), dead letters ([`deadletter`]), alarms ([`alarms`]); with `[registry]`, the device registry's
//! `/api/v1` routes of [`v1`].
//!
//! Invariants: a client gets `header_timeout` to send a request's headers (also while a
//! kept-alive connection waits for its next request), a connection with no traffic for
//! `idle_timeout` is closed, at most `max_connections` are open, and none is accepted
//! while fewer than `fd_reserve` file descriptors are left: a flood of the HTTP port cannot
//! starve the device listeners and the buffers of descriptors. Every refusal is counted in
//! `fieldgate_refused_connections_total{source="api",reason}`.

pub mod admin;
pub mod alarms;
pub mod commands;
pub mod config;
pub mod deadletter;
pub mod devices;
pub mod extract;
pub mod ingest;
pub mod openapi;
pub mod problem;
pub mod provisioning;
pub mod registration;
pub mod sinks;
#[cfg(test)]
mod tests;
pub mod v1;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ApiConfig;
use crate::net::limits::{FdReserve, FdUser};

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
    /// `/api/v1/alarms`.
    pub alarms: Arc<alarms::AlarmApi>,
    /// `/api/v1/config` and its reload.
    pub config: Arc<config::ConfigApi>,
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
        .merge(alarms::router(Arc::clone(&state.alarms)))
        .merge(config::router(Arc::clone(&state.config)))
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

/// `source` label of `fieldgate_refused_connections_total` for the HTTP listener.
pub const API_SOURCE: &str = "api";

/// How the HTTP listener bounds its connections.
pub struct ServeLimits {
    /// Time to receive a request's headers.
    pub header_timeout: Duration,
    /// Time without traffic after which a connection is closed.
    pub idle_timeout: Duration,
    /// Open connections at most.
    pub max_connections: usize,
    /// The gateway's file descriptor reserve.
    pub fds: Arc<FdReserve>,
}

impl ServeLimits {
    /// The limits of `[api]`.
    pub fn from_config(api: &ApiConfig, fds: Arc<FdReserve>) -> Self {
        Self {
            header_timeout: api.header_timeout.0,
            idle_timeout: api.idle_timeout.0,
            max_connections: api.max_connections,
            fds,
        }
    }
}

/// Serves until `shutdown`: one task per connection, each bounded by `limits`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ApiState>,
    limits: ServeLimits,
    shutdown: CancellationToken,
) {
    let metrics = Arc::clone(&state.metrics);
    let app = router(state);
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let limits = Arc::new(limits);
    let connections = TaskTracker::new();
    loop {
        let (socket, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %err, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            metrics.refused(API_SOURCE, "max_connections");
            tracing::warn!(%peer, reason = "max_connections", "API connection refused: too many open");
            continue;
        };
        if !limits.fds.admit(FdUser::Api) {
            metrics.refused(API_SOURCE, "fd_reserve");
            tracing::warn!(%peer, reason = "fd_reserve", "API connection refused: file descriptors are running out");
            continue;
        }
        connections.spawn(serve_connection(
            socket,
            peer,
            app.clone(),
            Arc::clone(&limits),
            Arc::clone(&metrics),
            shutdown.clone(),
            permit,
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Serves one HTTP/1.1 connection until the client leaves, a limit ends it, or shutdown
/// (which lets the request in flight finish).
async fn serve_connection(
    socket: TcpStream,
    peer: std::net::SocketAddr,
    app: Router,
    limits: Arc<ServeLimits>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    use tower::ServiceExt as _;
    let origin = Instant::now();
    let activity = Arc::new(AtomicU64::new(0));
    let io = hyper_util::rt::TokioIo::new(Tracked {
        inner: socket,
        origin,
        activity: Arc::clone(&activity),
    });
    let service = hyper::service::service_fn(
        move |mut request: axum::extract::Request<hyper::body::Incoming>| {
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            app.clone().oneshot(request)
        },
    );
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut draining = false;
    loop {
        let last = Duration::from_millis(activity.load(Ordering::Acquire));
        let idle_deadline = origin + last + limits.idle_timeout;
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(err) = served {
                    if err.is_timeout() {
                        metrics.refused(API_SOURCE, "header_timeout");
                        tracing::info!(%peer, reason = "header_timeout", "API connection closed: headers not received in time");
                    } else {
                        tracing::debug!(%peer, error = %err, "API connection ended with an error");
                    }
                }
                break;
            }
            () = tokio::time::sleep_until(idle_deadline) => {
                let since = origin.elapsed().saturating_sub(Duration::from_millis(activity.load(Ordering::Acquire)));
                if since >= limits.idle_timeout {
                    metrics.refused(API_SOURCE, "idle_timeout");
                    tracing::info!(%peer, reason = "idle_timeout", "API connection closed: idle");
                    break;
                }
            }
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
    drop(permit);
}

/// A socket that records when bytes last moved, for the idle timeout.
struct Tracked {
    inner: TcpStream,
    origin: Instant,
    /// Milliseconds since `origin` of the last read or write.
    activity: Arc<AtomicU64>,
}

impl Tracked {
    fn touch(&self) {
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.activity.store(now, Ordering::Release);
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            self.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            self.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
