//! The admin-only `/debug/pprof/*` routes of the HTTP API.
//!
//! Off unless `api.admin_token` is set: without a token every route answers 404, as if it
//! did not exist. With one, a request needs `Authorization: Bearer <token>` (401 otherwise,
//! 429 while its address is throttled) before anything else is looked at, so an anonymous
//! caller learns nothing about the build. The check is the gateway's one admin check,
//! [`AdminAuth`]: constant time, throttled, counted.
//!
//! - `GET /debug/pprof/profile?seconds=N&format=flamegraph|pprof`: a CPU profile over N
//!   seconds (1..=60, default 10); 409 while another profile runs, 501 without the
//!   `profiling` feature.
//! - `GET /debug/pprof/heap`: always 501; the system allocator keeps no allocation sites.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::{CpuProfiler, MAX_PROFILE_DURATION, ProfileError, ProfileFormat};
use crate::api::admin::{AdminAuth, AdminDenied};
use crate::api::extract::ClientIp;

/// A CPU profile's length when the request names none.
const DEFAULT_PROFILE_SECONDS: u64 = 10;

/// What the debug routes need: who may call them and the profiler they drive.
#[derive(Debug)]
pub struct DebugState {
    /// The gateway's admin check; without an admin token the routes are off (404).
    pub admin: Arc<AdminAuth>,
    /// The gateway's one CPU profiler.
    pub profiler: Arc<CpuProfiler>,
}

/// The `/debug/pprof/*` routes, ready to merge into the API router.
pub fn routes<S>(state: Arc<DebugState>) -> Router<S> {
    Router::new()
        .route("/debug/pprof/profile", get(cpu_profile))
        .route("/debug/pprof/heap", get(heap_profile))
        .with_state(state)
}

/// A JSON `{"error": message}` body with `status`.
fn json_error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "error": message }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A refusal of the admin check as the debug routes answer it.
fn denied_response(denied: AdminDenied) -> Response {
    match denied {
        AdminDenied::Disabled => StatusCode::NOT_FOUND.into_response(),
        AdminDenied::Throttled(wait) => {
            let mut response = json_error(
                StatusCode::TOO_MANY_REQUESTS,
                "too many failed attempts from this address; retry later",
            );
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
            response
        }
        AdminDenied::Missing | AdminDenied::Wrong => {
            let mut response = json_error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong admin token: send `Authorization: Bearer <api.admin_token>`",
            );
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}

/// 404 when no token is configured, 429 while the caller's address is throttled, 401 unless
/// the request carries an admin token.
fn authorize(state: &DebugState, ip: IpAddr, headers: &HeaderMap) -> Result<(), AdminDenied> {
    state.admin.check(ip, headers)
}

/// What a profile request asked for.
#[derive(Debug, PartialEq, Eq)]
struct ProfileRequest {
    duration: Duration,
    format: ProfileFormat,
}

/// Parses `seconds=N` (1..=60) and `format=flamegraph|svg|pprof`; other keys are ignored.
fn parse_profile_query(query: Option<&str>) -> Result<ProfileRequest, String> {
    let max_seconds = MAX_PROFILE_DURATION.as_secs();
    let mut request = ProfileRequest {
        duration: Duration::from_secs(DEFAULT_PROFILE_SECONDS),
        format: ProfileFormat::Flamegraph,
    };
    for pair in query.unwrap_or_default().split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "seconds" => match value.parse::<u64>() {
                Ok(seconds @ 1..) if seconds <= max_seconds => {
                    request.duration = Duration::from_secs(seconds);
                }
                _ => {
                    return Err(format!(
                        "seconds={value:?}: must be a whole number from 1 to {max_seconds}"
                    ));
                }
            },
            "format" => {
                request.format = match value {
                    "flamegraph" | "svg" => ProfileFormat::Flamegraph,
                    "pprof" | "protobuf" => ProfileFormat::Pprof,
                    other => {
                        return Err(format!(
                            "format={other:?}: use \"flamegraph\" (SVG) or \"pprof\" (protobuf)"
                        ));
                    }
                };
            }
            _ => {}
        }
    }
    Ok(request)
}

async fn cpu_profile(
    State(state): State<Arc<DebugState>>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if let Err(denied) = authorize(&state, ip, &headers) {
        return denied_response(denied);
    }
    let request = match parse_profile_query(query.as_deref()) {
        Ok(request) => request,
        Err(message) => return json_error(StatusCode::BAD_REQUEST, &message),
    };
    tracing::info!(
        seconds = request.duration.as_secs(),
        format = request.format.name(),
        "taking a CPU profile for the admin API"
    );
    match state
        .profiler
        .capture(request.duration, request.format)
        .await
    {
        Ok(body) => (
            [(header::CONTENT_TYPE, request.format.content_type())],
            body,
        )
            .into_response(),
        Err(err) => {
            let status = match &err {
                ProfileError::NotBuilt => StatusCode::NOT_IMPLEMENTED,
                ProfileError::Busy => StatusCode::CONFLICT,
                ProfileError::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
                ProfileError::Failed { .. } => {
                    let cause = std::error::Error::source(&err).map(ToString::to_string);
                    tracing::error!(error = %err, cause = cause.as_deref().unwrap_or(""), "CPU profile failed");
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            };
            json_error(status, &err.to_string())
        }
    }
}

async fn heap_profile(
    State(state): State<Arc<DebugState>>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
) -> Response {
    if let Err(denied) = authorize(&state, ip, &headers) {
        return denied_response(denied);
    }
    json_error(
        StatusCode::NOT_IMPLEMENTED,
        "heap profiles are not available: fieldgate uses the system allocator, which records no allocation sites; use /debug/pprof/profile for CPU, and process_resident_memory_bytes and the watchdog's profiles in <data_dir>/profiles/ for memory",
    )
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tokio_util::sync::CancellationToken;
    use tower::ServiceExt as _;

    use super::*;

    fn router(admin_token: Option<&str>) -> Router {
        routes(Arc::new(DebugState {
            admin: Arc::new(AdminAuth::new(
                admin_token,
                &crate::telemetry::Metrics::new(),
            )),
            profiler: Arc::new(CpuProfiler::new(CancellationToken::new())),
        }))
    }

    async fn get_status(
        router: Router,
        uri: &str,
        token: Option<&str>,
    ) -> (StatusCode, HeaderMap, String) {
        let mut request = Request::get(uri);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let response = router
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn without_a_configured_token_the_routes_do_not_exist() {
        for uri in ["/debug/pprof/profile?seconds=1", "/debug/pprof/heap"] {
            let (status, _, _) = get_status(router(None), uri, Some("anything")).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
            let (status, _, _) = get_status(router(None), uri, None).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
        }
    }

    #[tokio::test]
    async fn a_missing_or_wrong_token_is_unauthorized() {
        for uri in ["/debug/pprof/profile?seconds=1", "/debug/pprof/heap"] {
            for token in [None, Some("wrong"), Some("s3cret-but-longer"), Some("")] {
                let (status, headers, body) = get_status(router(Some("s3cret")), uri, token).await;
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{uri} {token:?}");
                assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
                assert!(body.contains("admin token"), "{body}");
            }
        }
        // Another scheme with the right secret is still refused.
        let response = router(Some("s3cret"))
            .oneshot(
                Request::get("/debug/pprof/heap")
                    .header(header::AUTHORIZATION, "Basic s3cret")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn the_right_token_reaches_the_handlers() {
        let (status, _, body) =
            get_status(router(Some("s3cret")), "/debug/pprof/heap", Some("s3cret")).await;
        assert_eq!(status, StatusCode::NOT_IMPLEMENTED);
        assert!(body.contains("system allocator"), "{body}");

        let (status, _, body) = get_status(
            router(Some("s3cret")),
            "/debug/pprof/profile?seconds=0",
            Some("s3cret"),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(body.contains("seconds"), "{body}");
    }

    #[cfg(not(feature = "profiling"))]
    #[tokio::test]
    async fn without_the_feature_the_profile_is_not_implemented() {
        let (status, headers, body) = get_status(
            router(Some("s3cret")),
            "/debug/pprof/profile?seconds=1",
            Some("s3cret"),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_IMPLEMENTED);
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        let error: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(
            error["error"]
                .as_str()
                .unwrap()
                .contains("`profiling` feature"),
            "{body}"
        );
    }

    #[cfg(feature = "profiling")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_the_feature_a_profile_is_served_and_a_second_is_refused() {
        let _sampler = super::super::TEST_SAMPLER.lock().await;
        let router = router(Some("s3cret"));
        let first = tokio::spawn(get_status(
            router.clone(),
            "/debug/pprof/profile?seconds=2",
            Some("s3cret"),
        ));
        // Wait, with a deadline, until the first request holds the sampler.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !super::super::BUSY.load(std::sync::atomic::Ordering::Acquire) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "first profile never started"
            );
            tokio::task::yield_now().await;
        }
        let (status, _, body) = get_status(
            router.clone(),
            "/debug/pprof/profile?seconds=1",
            Some("s3cret"),
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        let (status, headers, body) = first.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(headers[header::CONTENT_TYPE], "image/svg+xml");
        assert!(body.contains("<svg"));
    }

    #[test]
    fn profile_queries() {
        let parse = parse_profile_query;
        assert_eq!(
            parse(None).unwrap(),
            ProfileRequest {
                duration: Duration::from_secs(10),
                format: ProfileFormat::Flamegraph
            }
        );
        assert_eq!(
            parse(Some("seconds=60&format=pprof")).unwrap(),
            ProfileRequest {
                duration: Duration::from_secs(60),
                format: ProfileFormat::Pprof
            }
        );
        assert_eq!(
            parse(Some("seconds=1&debug=1")).unwrap().duration,
            Duration::from_secs(1)
        );
        for bad in [
            "seconds=0",
            "seconds=61",
            "seconds=-1",
            "seconds=",
            "seconds=1.5",
            "format=png",
        ] {
            assert!(parse(Some(bad)).is_err(), "{bad}");
        }
    }

    /// Finding 6: the debug routes share the admin check: failures are counted under
    /// `source="api_admin"` and throttled (429), whatever the length of the guess.
    #[tokio::test]
    async fn finding_6_failures_are_counted_and_throttled() {
        let metrics = crate::telemetry::Metrics::new();
        let router = routes(Arc::new(DebugState {
            admin: Arc::new(AdminAuth::new(Some("s3cret"), &metrics)),
            profiler: Arc::new(CpuProfiler::new(CancellationToken::new())),
        }));
        for guess in ["x", "s3creT", "a-much-longer-guess", "s", "s3cre"] {
            let (status, _, _) = get_status(router.clone(), "/debug/pprof/heap", Some(guess)).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{guess}");
        }
        let (status, _, _) = get_status(router.clone(), "/debug/pprof/heap", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, headers, _) =
            get_status(router.clone(), "/debug/pprof/heap", Some("s3cret")).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert!(headers.contains_key(header::RETRY_AFTER));
        let text = metrics.encode();
        assert!(
            text.contains("fieldgate_auth_failures_total{source=\"api_admin\"} 7"),
            "{text}"
        );
    }
}
