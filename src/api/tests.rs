//! Router tests of `/api/v1`: every route, its auth and its errors, through
//! `tower::ServiceExt::oneshot` on a registry in a temp dir.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode, header};
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey};
use fieldgate_registry::{ManualClock, Registry, RegistryOptions, ThrottleConfig};
use serde_json::{Value, json};
use tower::ServiceExt as _;

use super::v1::V1State;
use super::{ApiState, router};
use crate::pipeline::{SourceOutput, intake};
use crate::telemetry::Metrics;
use crate::telemetry::profiling::CpuProfiler;
use crate::telemetry::profiling::http::DebugState;

const ADMIN: &str = "admin-secret";
/// 2026-01-01, so a manual clock shows a plausible time.
const START_MS: u64 = 1_767_225_600_000;

struct Harness {
    app: Router,
    v1: Arc<V1State>,
    alarms: Arc<crate::transforms::alarm::AlarmBoard>,
    clock: Arc<ManualClock>,
    metrics: Arc<Metrics>,
    _dir: tempfile::TempDir,
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

impl Reply {
    fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }

    fn is_problem(&self) -> bool {
        self.headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|value| value == "application/problem+json")
            && self.body["status"].as_u64() == Some(u64::from(self.status.as_u16()))
            && self.body["type"].is_string()
            && self.body["title"].is_string()
            && self.body["detail"].is_string()
    }
}

fn harness_with(admin_token: Option<&str>, throttle: ThrottleConfig) -> Harness {
    let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
    let clock = Arc::new(ManualClock::new(START_MS));
    let mut options = RegistryOptions::new(dir.path().join("registry.redb"), "gw-test");
    options.jwt_ttl = Duration::from_secs(60);
    let registry = Registry::open_with_clock(options, Arc::clone(&clock) as _)
        .unwrap_or_else(|err| panic!("{err}"));
    let metrics = Arc::new(Metrics::new());
    let admin = Arc::new(super::admin::AdminAuth::with_throttle(
        admin_token,
        &metrics,
        throttle.clone(),
    ));
    let v1 = Arc::new(V1State::with_throttle(
        Arc::new(registry),
        Arc::clone(&admin),
        Arc::clone(&metrics),
        throttle,
    ));
    let alarms = Arc::new(crate::transforms::alarm::AlarmBoard::default());
    let state = Arc::new(ApiState {
        metrics: Arc::clone(&metrics),
        ready: AtomicBool::new(true),
        debug: Arc::new(DebugState {
            admin: Arc::clone(&admin),
            profiler: Arc::new(CpuProfiler::new(tokio_util::sync::CancellationToken::new())),
        }),
        v1: Some(Arc::clone(&v1)),
        deadletter: Arc::new(crate::api::deadletter::DeadLetterApi::new(Arc::clone(
            &admin,
        ))),
        alarms: Arc::new(crate::api::alarms::AlarmApi::new(
            Arc::clone(&admin),
            Arc::clone(&alarms),
        )),
        config: Arc::new(crate::api::config::ConfigApi::new(
            admin,
            tokio::sync::mpsc::channel(1).0,
        )),
    });
    Harness {
        app: router(state),
        v1,
        alarms,
        clock,
        metrics,
        _dir: dir,
    }
}

fn harness() -> Harness {
    harness_with(Some(ADMIN), ThrottleConfig::default())
}

impl Harness {
    async fn send(
        &self,
        method: Method,
        uri: &str,
        bearer: Option<&str>,
        body: Option<Value>,
        ip: IpAddr,
    ) -> Reply {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(token) = bearer {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = match body {
            Some(body) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Body::from(body.to_string())
            }
            None => Body::empty(),
        };
        let mut request = request.body(body).unwrap_or_else(|err| panic!("{err}"));
        request
            .extensions_mut()
            .insert(ConnectInfo(SocketAddr::new(ip, 40000)));
        self.dispatch(request).await
    }

    async fn dispatch(&self, request: Request<Body>) -> Reply {
        let response = self
            .app
            .clone()
            .oneshot(request)
            .await
            .unwrap_or_else(|never| match never {});
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap_or_else(|err| panic!("{err}"));
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn admin(&self, method: Method, uri: &str, body: Option<Value>) -> Reply {
        self.send(method, uri, Some(ADMIN), body, local()).await
    }

    async fn public(&self, method: Method, uri: &str, body: Option<Value>) -> Reply {
        self.send(method, uri, None, body, local()).await
    }

    /// A provisioning token secret allowing `max_uses` registrations.
    async fn provisioning_token(&self, max_uses: u32) -> String {
        let reply = self
            .admin(
                Method::POST,
                "/api/v1/provisioning-tokens",
                Some(json!({"label": "line 3", "max_uses": max_uses, "ttl": "1h"})),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        reply.body["secret"]
            .as_str()
            .unwrap_or_else(|| panic!("no secret: {}", reply.body))
            .to_owned()
    }

    fn auth_failures(&self, source: &str) -> String {
        let text = self.metrics.encode();
        text.lines()
            .find(|line| {
                line.starts_with(&format!(
                    "fieldgate_auth_failures_total{{source=\"{source}\"}}"
                ))
            })
            .unwrap_or("")
            .to_owned()
    }
}

fn local() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
}

#[tokio::test]
async fn admin_routes_need_the_admin_token() {
    let h = harness();
    for ((method, uri), index) in [
        (Method::GET, "/api/v1/devices"),
        (Method::POST, "/api/v1/devices"),
        (Method::GET, "/api/v1/devices/x"),
        (Method::PATCH, "/api/v1/devices/x"),
        (Method::DELETE, "/api/v1/devices/x"),
        (Method::POST, "/api/v1/devices/x/rotate"),
        (Method::POST, "/api/v1/devices/x/revoke"),
        (Method::GET, "/api/v1/devices/x/status"),
        (Method::GET, "/api/v1/devices/x/commands"),
        (Method::POST, "/api/v1/devices/x/commands"),
        (Method::GET, "/api/v1/devices/x/commands/c"),
        (Method::GET, "/api/v1/provisioning-tokens"),
        (Method::POST, "/api/v1/provisioning-tokens"),
        (Method::DELETE, "/api/v1/provisioning-tokens/x"),
    ]
    .into_iter()
    .zip(0u8..)
    {
        // Each route from fresh addresses, so the throttle stays out of the way.
        let missing = h
            .send(
                method.clone(),
                uri,
                None,
                Some(json!({})),
                ip(2 * index + 1),
            )
            .await;
        assert_eq!(missing.status, StatusCode::UNAUTHORIZED, "{method} {uri}");
        assert!(missing.is_problem(), "{method} {uri}: {}", missing.body);
        assert_eq!(missing.code(), "missing_token");
        let wrong = h
            .send(
                method.clone(),
                uri,
                Some("admin-secreT"),
                Some(json!({})),
                ip(2 * index + 2),
            )
            .await;
        assert_eq!(wrong.status, StatusCode::UNAUTHORIZED, "{method} {uri}");
        assert_eq!(wrong.code(), "bad_admin_token");
    }
    assert!(
        h.auth_failures("api_admin").ends_with(" 28"),
        "{}",
        h.auth_failures("api_admin")
    );
}

#[tokio::test]
async fn admin_routes_are_off_without_a_token() {
    let h = harness_with(None, ThrottleConfig::default());
    let reply = h.admin(Method::GET, "/api/v1/devices", None).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.code(), "admin_disabled");
    assert!(reply.is_problem());
}

#[tokio::test]
async fn device_lifecycle() {
    let h = harness();
    let created = h
        .admin(
            Method::POST,
            "/api/v1/devices",
            Some(json!({"id": "pump-1", "name": "Pump", "model": "P100", "labels": {"site": "north"}})),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    assert_eq!(created.body["device"]["id"], "pump-1");
    assert!(created.body["secret"].is_string());
    assert!(created.body["tokens"]["access_token"].is_string());

    let again = h
        .admin(
            Method::POST,
            "/api/v1/devices",
            Some(json!({"id": "pump-1"})),
        )
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert_eq!(again.code(), "conflict");
    assert!(again.is_problem());

    let got = h.admin(Method::GET, "/api/v1/devices/pump-1", None).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body["labels"]["site"], "north");
    assert!(got.body.get("secret").is_none());

    let patched = h
        .admin(
            Method::PATCH,
            "/api/v1/devices/pump-1",
            Some(json!({"name": null, "labels": {"site": "south"}})),
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.body);
    assert_eq!(patched.body["name"], Value::Null);
    assert_eq!(patched.body["labels"]["site"], "south");

    let status = h
        .admin(Method::GET, "/api/v1/devices/pump-1/status", None)
        .await;
    assert_eq!(status.status, StatusCode::OK);
    assert_eq!(status.body["status"], "offline");
    assert_eq!(status.body["messages"], 0);

    let rotated = h
        .admin(Method::POST, "/api/v1/devices/pump-1/rotate", None)
        .await;
    assert_eq!(rotated.status, StatusCode::OK);
    assert_ne!(rotated.body["secret"], created.body["secret"]);

    let revoked = h
        .admin(Method::POST, "/api/v1/devices/pump-1/revoke", None)
        .await;
    assert_eq!(revoked.status, StatusCode::OK);
    assert_eq!(revoked.body["status"], "revoked");

    let deleted = h
        .admin(Method::DELETE, "/api/v1/devices/pump-1", None)
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    for (method, uri) in [
        (Method::GET, "/api/v1/devices/pump-1"),
        (Method::DELETE, "/api/v1/devices/pump-1"),
        (Method::GET, "/api/v1/devices/pump-1/status"),
        (Method::POST, "/api/v1/devices/pump-1/rotate"),
        (Method::POST, "/api/v1/devices/pump-1/revoke"),
        (Method::GET, "/api/v1/devices/pump-1/commands"),
    ] {
        let reply = h.admin(method.clone(), uri, None).await;
        assert_eq!(
            reply.status,
            StatusCode::NOT_FOUND,
            "{method} {uri}: {}",
            reply.body
        );
        assert_eq!(reply.code(), "not_found");
        assert!(reply.is_problem());
    }
}

#[tokio::test]
async fn validation_errors_are_400_problems() {
    let h = harness();
    for body in [
        json!({"mac": "not-a-mac"}),
        json!({"imei": "123"}),
        json!({"id": "has space"}),
        json!({"public_key": "short"}),
        json!({"unknown_field": 1}),
        json!([1, 2]),
    ] {
        let reply = h
            .admin(Method::POST, "/api/v1/devices", Some(body.clone()))
            .await;
        assert!(reply.status.is_client_error(), "{body}: {}", reply.status);
        assert!(reply.is_problem(), "{body}: {}", reply.body);
    }
    let bad_mac = h
        .admin(Method::POST, "/api/v1/devices", Some(json!({"mac": "zz"})))
        .await;
    assert_eq!(bad_mac.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad_mac.code(), "invalid_field");

    let mut request = Request::post("/api/v1/devices")
        .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{not json"))
        .unwrap_or_else(|err| panic!("{err}"));
    request
        .extensions_mut()
        .insert(ConnectInfo(SocketAddr::new(local(), 1)));
    let malformed = h.dispatch(request).await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    assert_eq!(malformed.code(), "malformed_request");
    assert!(malformed.is_problem());

    for uri in [
        "/api/v1/devices?limit=0",
        "/api/v1/devices?limit=1001",
        "/api/v1/devices?limit=x",
        "/api/v1/devices?status=sleeping",
        "/api/v1/devices?label=nocolon",
    ] {
        let reply = h.admin(Method::GET, uri, None).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{uri}");
        assert!(reply.is_problem(), "{uri}: {}", reply.body);
    }
    let token = h
        .admin(
            Method::POST,
            "/api/v1/provisioning-tokens",
            Some(json!({"max_uses": 0})),
        )
        .await;
    assert_eq!(token.status, StatusCode::BAD_REQUEST);
    assert_eq!(token.code(), "invalid_field");
    let token = h
        .admin(
            Method::POST,
            "/api/v1/provisioning-tokens",
            Some(json!({"ttl": "1000000 years"})),
        )
        .await;
    assert!(token.status.is_client_error(), "{}", token.body);
    let wrong_method = h.admin(Method::PUT, "/api/v1/devices", None).await;
    assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(wrong_method.is_problem());
}

#[tokio::test]
async fn listing_filters_and_pages() {
    let h = harness();
    for (id, site) in [("a-1", "north"), ("a-2", "south"), ("a-3", "north")] {
        let reply = h
            .admin(
                Method::POST,
                "/api/v1/devices",
                Some(json!({"id": id, "labels": {"site": site}})),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED);
    }
    let first = h.admin(Method::GET, "/api/v1/devices?limit=2", None).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body["total"], 3);
    let ids: Vec<&str> = first.body["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|device| device["id"].as_str())
        .collect();
    assert_eq!(ids, ["a-1", "a-2"]);
    let cursor = first.body["next_cursor"]
        .as_str()
        .unwrap_or_else(|| panic!("no cursor: {}", first.body));
    let second = h
        .admin(
            Method::GET,
            &format!("/api/v1/devices?limit=2&cursor={cursor}"),
            None,
        )
        .await;
    assert_eq!(second.body["devices"][0]["id"], "a-3");
    assert_eq!(second.body["next_cursor"], Value::Null);

    let north = h
        .admin(Method::GET, "/api/v1/devices?label=site:north", None)
        .await;
    assert_eq!(north.body["total"], 2);
    let search = h
        .admin(Method::GET, "/api/v1/devices?search=A-2", None)
        .await;
    assert_eq!(search.body["total"], 1);
    let offline = h
        .admin(Method::GET, "/api/v1/devices?status=offline", None)
        .await;
    assert_eq!(offline.body["total"], 3);
}

#[tokio::test]
async fn provisioning_tokens_create_list_revoke() {
    let h = harness();
    let created = h
        .admin(
            Method::POST,
            "/api/v1/provisioning-tokens",
            Some(json!({"label": "batch 7", "max_uses": 3, "ttl": "2h"})),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let id = created.body["token"]["id"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let secret = created.body["secret"].as_str().unwrap_or("").to_owned();
    let listed = h
        .admin(Method::GET, "/api/v1/provisioning-tokens", None)
        .await;
    assert_eq!(listed.status, StatusCode::OK);
    assert_eq!(listed.body[0]["id"], id.as_str());
    assert_eq!(listed.body[0]["max_uses"], 3);
    assert!(!listed.body.to_string().contains(&secret), "secret listed");

    let revoked = h
        .admin(
            Method::DELETE,
            &format!("/api/v1/provisioning-tokens/{id}"),
            None,
        )
        .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    let unknown = h
        .admin(
            Method::DELETE,
            "/api/v1/provisioning-tokens/pt-0000000000000000",
            None,
        )
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert!(unknown.is_problem());
    let refused = h
        .public(
            Method::POST,
            "/api/v1/devices/register",
            Some(json!({"provisioning_token": secret, "mac": "00:11:22:33:44:55"})),
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn registration_without_a_key_counts_uses_and_refuses_a_takeover() {
    let h = harness();
    let token = h.provisioning_token(2).await;
    let body = json!({"provisioning_token": token, "mac": "00-11-22-33-44-55", "name": "meter"});
    let first = h
        .public(Method::POST, "/api/v1/devices/register", Some(body.clone()))
        .await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    assert_eq!(first.body["device"]["id"], "mac-001122334455");
    assert!(first.body["secret"].is_string());
    // Finding 3: the same MAC again, without the device's key, is a conflict (no use spent).
    let second = h
        .public(Method::POST, "/api/v1/devices/register", Some(body.clone()))
        .await;
    assert_eq!(second.status, StatusCode::CONFLICT, "{}", second.body);
    assert!(second.body.get("secret").is_none());
    let third = h
        .public(
            Method::POST,
            "/api/v1/devices/register",
            Some(json!({"provisioning_token": token, "mac": "00:11:22:33:44:66"})),
        )
        .await;
    assert_eq!(third.status, StatusCode::CREATED, "{}", third.body);

    // Both uses are spent.
    let exhausted = h
        .public(
            Method::POST,
            "/api/v1/devices/register",
            Some(json!({"provisioning_token": token, "imei": "356938035643809"})),
        )
        .await;
    assert_eq!(
        exhausted.status,
        StatusCode::FORBIDDEN,
        "{}",
        exhausted.body
    );
    assert_eq!(exhausted.code(), "forbidden");
    assert!(exhausted.is_problem());

    let wrong = h
        .public(
            Method::POST,
            "/api/v1/devices/register",
            Some(json!({"provisioning_token": "nope", "imei": "356938035643809"})),
        )
        .await;
    assert_eq!(wrong.status, StatusCode::FORBIDDEN);
    assert!(!h.auth_failures("http").is_empty());
}

#[tokio::test]
async fn registration_with_a_key_proves_possession_once() {
    let h = harness();
    let token = h.provisioning_token(5).await;
    let key = SigningKey::from_bytes(&[7; 32]);
    let public_key =
        base64::engine::general_purpose::STANDARD.encode(key.verifying_key().as_bytes());

    let challenge = h
        .public(Method::POST, "/api/v1/devices/register/challenge", None)
        .await;
    assert_eq!(challenge.status, StatusCode::OK);
    let nonce = challenge.body["nonce"].as_str().unwrap_or("").to_owned();
    let nonce_bytes = base64::engine::general_purpose::STANDARD
        .decode(&nonce)
        .unwrap_or_else(|err| panic!("{err}"));
    let signature =
        base64::engine::general_purpose::STANDARD.encode(key.sign(&nonce_bytes).to_bytes());
    let body = json!({
        "provisioning_token": token, "imei": "356938035643809",
        "public_key": public_key, "nonce": nonce, "signature": signature,
    });
    let registered = h
        .public(Method::POST, "/api/v1/devices/register", Some(body.clone()))
        .await;
    assert_eq!(
        registered.status,
        StatusCode::CREATED,
        "{}",
        registered.body
    );
    assert_eq!(registered.body["device"]["id"], "imei-356938035643809");
    assert_eq!(registered.body["secret"], Value::Null);

    let replayed = h
        .public(Method::POST, "/api/v1/devices/register", Some(body))
        .await;
    assert_eq!(replayed.status, StatusCode::FORBIDDEN, "{}", replayed.body);
    assert!(replayed.is_problem());

    // A bad signature over a fresh nonce.
    let challenge = h
        .public(Method::POST, "/api/v1/devices/register/challenge", None)
        .await;
    let forged = json!({
        "provisioning_token": token, "imei": "356938035643809",
        "public_key": public_key, "nonce": challenge.body["nonce"], "signature": signature,
    });
    let refused = h
        .public(Method::POST, "/api/v1/devices/register", Some(forged))
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);

    // Same identifier, different key: conflict.
    let other = SigningKey::from_bytes(&[8; 32]);
    let challenge = h
        .public(Method::POST, "/api/v1/devices/register/challenge", None)
        .await;
    let nonce = challenge.body["nonce"].as_str().unwrap_or("").to_owned();
    let nonce_bytes = base64::engine::general_purpose::STANDARD
        .decode(&nonce)
        .unwrap_or_else(|err| panic!("{err}"));
    let conflicting = json!({
        "provisioning_token": token, "imei": "356938035643809",
        "public_key": base64::engine::general_purpose::STANDARD.encode(other.verifying_key().as_bytes()),
        "nonce": nonce,
        "signature": base64::engine::general_purpose::STANDARD.encode(other.sign(&nonce_bytes).to_bytes()),
    });
    let conflict = h
        .public(Method::POST, "/api/v1/devices/register", Some(conflicting))
        .await;
    assert_eq!(conflict.status, StatusCode::CONFLICT, "{}", conflict.body);
}

#[tokio::test]
async fn refresh_is_single_use() {
    let h = harness();
    let created = h
        .admin(Method::POST, "/api/v1/devices", Some(json!({"id": "r-1"})))
        .await;
    let refresh_token = created.body["tokens"]["refresh_token"].clone();
    let refreshed = h
        .public(
            Method::POST,
            "/api/v1/auth/refresh",
            Some(json!({"refresh_token": refresh_token})),
        )
        .await;
    assert_eq!(refreshed.status, StatusCode::OK, "{}", refreshed.body);
    assert!(refreshed.body["access_token"].is_string());
    assert_ne!(refreshed.body["refresh_token"], refresh_token);
    let reused = h
        .public(
            Method::POST,
            "/api/v1/auth/refresh",
            Some(json!({"refresh_token": refresh_token})),
        )
        .await;
    assert_eq!(reused.status, StatusCode::UNAUTHORIZED, "{}", reused.body);
    assert!(reused.is_problem());
}

#[tokio::test]
async fn commands_queue_idempotently() {
    let h = harness();
    h.admin(Method::POST, "/api/v1/devices", Some(json!({"id": "c-1"})))
        .await;
    let command = json!({"id": "cmd-1", "name": "reboot", "params": {"delay": 5}, "ttl": "5m"});
    let queued = h
        .admin(
            Method::POST,
            "/api/v1/devices/c-1/commands",
            Some(command.clone()),
        )
        .await;
    assert_eq!(queued.status, StatusCode::ACCEPTED, "{}", queued.body);
    assert_eq!(queued.body["state"], "queued");
    let created_at = queued.body["created_at_ms"].as_u64().unwrap_or(0);
    assert_eq!(
        queued.body["expires_at_ms"].as_u64(),
        Some(created_at + 300_000)
    );
    let again = h
        .admin(Method::POST, "/api/v1/devices/c-1/commands", Some(command))
        .await;
    assert_eq!(again.status, StatusCode::ACCEPTED);
    assert_eq!(again.body["created_at_ms"], queued.body["created_at_ms"]);
    let different = h
        .admin(
            Method::POST,
            "/api/v1/devices/c-1/commands",
            Some(json!({"id": "cmd-1", "name": "shutdown"})),
        )
        .await;
    assert_eq!(different.status, StatusCode::CONFLICT);
    let listed = h
        .admin(Method::GET, "/api/v1/devices/c-1/commands", None)
        .await;
    assert_eq!(listed.body.as_array().map(Vec::len), Some(1));
    let got = h
        .admin(Method::GET, "/api/v1/devices/c-1/commands/cmd-1", None)
        .await;
    assert_eq!(got.body["name"], "reboot");
    let missing = h
        .admin(Method::GET, "/api/v1/devices/c-1/commands/nope", None)
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let no_device = h
        .admin(
            Method::POST,
            "/api/v1/devices/ghost/commands",
            Some(json!({"id": "x", "name": "reboot"})),
        )
        .await;
    assert_eq!(no_device.status, StatusCode::NOT_FOUND);
    let bad_ttl = h
        .admin(
            Method::POST,
            "/api/v1/devices/c-1/commands",
            Some(json!({"id": "cmd-2", "name": "reboot", "ttl": "0s"})),
        )
        .await;
    assert_eq!(bad_ttl.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn telemetry_enters_the_pipeline_with_a_valid_jwt() {
    let h = harness();
    let (intake, mut receiver) = intake();
    h.v1.ingest
        .open(SourceOutput::new(vec![crate::pipeline::Target::Sink(
            intake,
        )]));
    let stored = tokio::spawn(async move {
        let mut events = Vec::new();
        while let Some(item) = receiver.normal.recv().await {
            if let Some(ack) = item.ack {
                ack.confirm();
            }
            events.push(item.event);
            if events.len() == 2 {
                break;
            }
        }
        events
    });
    let created = h
        .admin(Method::POST, "/api/v1/devices", Some(json!({"id": "t-1"})))
        .await;
    let jwt = created.body["tokens"]["access_token"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let uri = "/api/v1/devices/t-1/telemetry";
    let accepted = h
        .send(
            Method::POST,
            uri,
            Some(&jwt),
            Some(json!([{"temp": 21.5}, {"temp": 22.0, "ts": 5}])),
            local(),
        )
        .await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{}", accepted.body);
    assert_eq!(accepted.body, json!({"accepted": 2}));
    let events = stored.await.unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(events[0].device.as_str(), "t-1");
    assert_eq!(&*events[0].source, "http");
    assert_eq!(&events[0].payload[..], br#"{"temp":21.5}"#);
    assert_eq!(events[1].device_time_ms, Some(5));
    let status = h
        .admin(Method::GET, "/api/v1/devices/t-1/status", None)
        .await;
    assert_eq!(status.body["messages"], 2, "{}", status.body);

    // Another device's token, none, garbage.
    h.admin(Method::POST, "/api/v1/devices", Some(json!({"id": "t-2"})))
        .await;
    let other = h
        .send(
            Method::POST,
            "/api/v1/devices/t-2/telemetry",
            Some(&jwt),
            Some(json!({})),
            local(),
        )
        .await;
    assert_eq!(other.status, StatusCode::FORBIDDEN);
    assert_eq!(other.code(), "wrong_device");
    let none = h
        .send(Method::POST, uri, None, Some(json!({})), local())
        .await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert_eq!(none.code(), "missing_token");
    let garbage = h
        .send(
            Method::POST,
            uri,
            Some("not.a.jwt"),
            Some(json!({})),
            local(),
        )
        .await;
    assert_eq!(garbage.status, StatusCode::UNAUTHORIZED);
    assert!(garbage.is_problem());
    let bad_body = h
        .send(Method::POST, uri, Some(&jwt), Some(json!(42)), local())
        .await;
    assert_eq!(bad_body.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad_body.code(), "invalid_json");

    // Expired: the registry's clock moves past the 60 s lifetime.
    h.clock.advance(Duration::from_secs(3600));
    let expired = h
        .send(
            Method::POST,
            uri,
            Some(&jwt),
            Some(json!({"temp": 1})),
            local(),
        )
        .await;
    assert_eq!(expired.status, StatusCode::UNAUTHORIZED, "{}", expired.body);
    assert_eq!(expired.code(), "token_expired");
    assert!(!h.auth_failures("http").is_empty());
}

#[tokio::test]
async fn telemetry_body_is_capped() {
    let h = harness();
    let (intake, _receiver) = intake();
    h.v1.ingest
        .open(SourceOutput::new(vec![crate::pipeline::Target::Sink(
            intake,
        )]));
    let created = h
        .admin(Method::POST, "/api/v1/devices", Some(json!({"id": "big"})))
        .await;
    let jwt = created.body["tokens"]["access_token"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let huge = format!("{{\"blob\":\"{}\"}}", "x".repeat(super::ingest::MAX_BODY));
    let mut request = Request::post("/api/v1/devices/big/telemetry")
        .header(header::AUTHORIZATION, format!("Bearer {jwt}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(huge))
        .unwrap_or_else(|err| panic!("{err}"));
    request
        .extensions_mut()
        .insert(ConnectInfo(SocketAddr::new(local(), 1)));
    let reply = h.dispatch(request).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.code(), "payload_too_large");
}

#[tokio::test]
async fn telemetry_without_an_http_sink_is_404() {
    let h = harness();
    let created = h
        .admin(Method::POST, "/api/v1/devices", Some(json!({"id": "n-1"})))
        .await;
    let jwt = created.body["tokens"]["access_token"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    // The harness says a sink lists "http" but none is attached yet: not ready.
    let reply = h
        .send(
            Method::POST,
            "/api/v1/devices/n-1/telemetry",
            Some(&jwt),
            Some(json!({})),
            local(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.code(), "not_ready");
    assert!(reply.headers.contains_key(header::RETRY_AFTER));
}

#[tokio::test]
async fn brute_force_is_throttled_per_address_and_device_address() {
    let throttle = ThrottleConfig {
        free_failures: 2,
        base_delay: Duration::from_secs(30),
        ..ThrottleConfig::default()
    };
    let h = harness_with(Some(ADMIN), throttle);
    for id in ["victim", "bystander"] {
        h.admin(Method::POST, "/api/v1/devices", Some(json!({"id": id})))
            .await;
    }
    let bystander = h
        .admin(Method::POST, "/api/v1/devices/bystander/rotate", None)
        .await;
    let bystander_jwt = bystander.body["tokens"]["access_token"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let victim = h
        .admin(Method::POST, "/api/v1/devices/victim/rotate", None)
        .await;
    let victim_jwt = victim.body["tokens"]["access_token"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let (intake, mut receiver) = intake();
    h.v1.ingest
        .open(SourceOutput::new(vec![crate::pipeline::Target::Sink(
            intake,
        )]));
    let _drain = tokio::spawn(async move {
        while let Some(item) = receiver.normal.recv().await {
            if let Some(ack) = item.ack {
                ack.confirm();
            }
        }
    });

    // The attacker's address is throttled for the victim's id.
    let mut statuses = Vec::new();
    for _ in 0..5u8 {
        let reply = h
            .send(
                Method::POST,
                "/api/v1/devices/victim/telemetry",
                Some("forged"),
                Some(json!({})),
                ip(100),
            )
            .await;
        statuses.push(reply.status.as_u16());
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            assert!(reply.is_problem());
            assert_eq!(reply.code(), "too_many_attempts");
            let retry: u64 = reply.headers[header::RETRY_AFTER]
                .to_str()
                .ok()
                .and_then(|value| value.parse().ok())
                .unwrap_or(0);
            assert!((1..=30).contains(&retry), "{retry}");
        }
    }
    assert_eq!(statuses, [401, 401, 401, 429, 429]);

    // Finding 10: the victim itself, from its own address, is not locked out.
    let victim_ok = h
        .send(
            Method::POST,
            "/api/v1/devices/victim/telemetry",
            Some(&victim_jwt),
            Some(json!({"v": 1})),
            ip(101),
        )
        .await;
    assert_eq!(victim_ok.status, StatusCode::ACCEPTED, "{}", victim_ok.body);

    // Another device, from another address, is unaffected.
    let ok = h
        .send(
            Method::POST,
            "/api/v1/devices/bystander/telemetry",
            Some(&bystander_jwt),
            Some(json!({"v": 1})),
            ip(7),
        )
        .await;
    assert_eq!(ok.status, StatusCode::ACCEPTED, "{}", ok.body);

    // One address failing the admin token is throttled too.
    let mut admin_statuses = Vec::new();
    for _ in 0..4 {
        let reply = h
            .send(Method::GET, "/api/v1/devices", Some("guess"), None, ip(50))
            .await;
        admin_statuses.push(reply.status.as_u16());
    }
    assert_eq!(admin_statuses, [401, 401, 401, 429]);
    let still_ok = h.admin(Method::GET, "/api/v1/devices", None).await;
    assert_eq!(still_ok.status, StatusCode::OK);
}

#[tokio::test]
async fn openapi_document_lists_every_route() {
    let h = harness();
    let reply = h.public(Method::GET, "/api/v1/openapi.json", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply.body["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3."))
    );
    let paths = reply.body["paths"]
        .as_object()
        .unwrap_or_else(|| panic!("no paths: {}", reply.body));
    for path in [
        "/api/v1/devices",
        "/api/v1/devices/{id}",
        "/api/v1/devices/{id}/rotate",
        "/api/v1/devices/{id}/revoke",
        "/api/v1/devices/{id}/status",
        "/api/v1/devices/{id}/commands",
        "/api/v1/devices/{id}/commands/{command_id}",
        "/api/v1/devices/{id}/telemetry",
        "/api/v1/provisioning-tokens",
        "/api/v1/provisioning-tokens/{id}",
        "/api/v1/devices/register/challenge",
        "/api/v1/devices/register",
        "/api/v1/auth/refresh",
    ] {
        assert!(paths.contains_key(path), "{path} missing");
    }
    let schemes = &reply.body["components"]["securitySchemes"];
    assert_eq!(schemes["admin_token"]["scheme"], "bearer");
    assert!(reply.body["components"]["schemas"]["Problem"].is_object());
}

#[tokio::test]
async fn routes_are_absent_without_a_registry() {
    let metrics = Arc::new(Metrics::new());
    let state = Arc::new(ApiState {
        metrics: Arc::clone(&metrics),
        ready: AtomicBool::new(true),
        debug: Arc::new(DebugState {
            admin: Arc::new(super::admin::AdminAuth::new(None, &metrics)),
            profiler: Arc::new(CpuProfiler::new(tokio_util::sync::CancellationToken::new())),
        }),
        v1: None,
        deadletter: Arc::new(crate::api::deadletter::DeadLetterApi::new(Arc::new(
            super::admin::AdminAuth::new(None, &metrics),
        ))),
        alarms: Arc::new(crate::api::alarms::AlarmApi::new(
            Arc::new(super::admin::AdminAuth::new(None, &metrics)),
            Arc::default(),
        )),
        config: Arc::new(crate::api::config::ConfigApi::new(
            Arc::new(super::admin::AdminAuth::new(None, &metrics)),
            tokio::sync::mpsc::channel(1).0,
        )),
    });
    let response = router(state)
        .oneshot(
            Request::get("/api/v1/openapi.json")
                .body(Body::empty())
                .unwrap_or_else(|err| panic!("{err}")),
        )
        .await
        .unwrap_or_else(|never| match never {});
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn alarms_are_listed_filtered_and_acknowledged() {
    use crate::transforms::alarm::AlarmConfig;
    use crate::transforms::{Emitted, TransformServices, TransformSpec};
    let harness = harness();
    let services = TransformServices {
        registry: None,
        metrics: Arc::clone(&harness.metrics),
        alarms: Arc::clone(&harness.alarms),
        actions: None,
    };
    let text = "inputs = [\"d\"]\ndetector = \"threshold\"\nfield = \"temp\"\nabove = 80.0";
    let config: AlarmConfig = toml::from_str(text).unwrap_or_else(|err| panic!("{err}"));
    let rule = config
        .build("overheat", &services)
        .unwrap_or_else(|err| panic!("{err}"));
    for (device, temp) in [("dev/1", 90), ("dev-2", 20), ("dev-3", 85)] {
        let event = crate::transforms::tests::reading(device, 1, &format!("{{\"temp\":{temp}}}"));
        rule.apply(event, &mut Emitted::default());
    }
    let reply = harness.public(Method::GET, "/api/v1/alarms", None).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let reply = harness
        .admin(Method::GET, "/api/v1/alarms?state=active", None)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["total"], 2);
    assert_eq!(reply.body["alarms"][0]["device"], "dev-3");
    assert_eq!(reply.body["alarms"][0]["state"], "raised");
    let reply = harness
        .admin(Method::GET, "/api/v1/alarms?state=bogus", None)
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.is_problem());
    let reply = harness
        .admin(Method::GET, "/api/v1/alarms?limit=0", None)
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    // A device id with a slash travels percent-encoded.
    let reply = harness
        .admin(Method::POST, "/api/v1/alarms/overheat/dev%2F1/ack", None)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["state"], "acknowledged");
    let reply = harness
        .admin(
            Method::GET,
            "/api/v1/alarms?state=acknowledged&device=dev%2F1",
            None,
        )
        .await;
    assert_eq!(reply.body["total"], 1);
    let reply = harness
        .admin(Method::POST, "/api/v1/alarms/overheat/dev-2/ack", None)
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert!(reply.is_problem());
    let reply = harness
        .admin(Method::POST, "/api/v1/alarms/nope/dev-3/ack", None)
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    rule.apply(
        crate::transforms::tests::reading("dev-3", 2, "{\"temp\":10}"),
        &mut Emitted::default(),
    );
    let reply = harness
        .admin(Method::POST, "/api/v1/alarms/overheat/dev-3/ack", None)
        .await;
    assert_eq!(reply.status, StatusCode::CONFLICT);
    assert_eq!(reply.code(), "conflict");
    let reply = harness
        .admin(Method::GET, "/api/v1/openapi.json", None)
        .await;
    assert!(reply.body["paths"]["/api/v1/alarms"]["get"].is_object());
    assert!(reply.body["paths"]["/api/v1/alarms/{rule}/{device}/ack"]["post"].is_object());
}
