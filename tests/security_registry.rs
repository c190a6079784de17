//! Issue 9, the registry, credential and admin findings, tried from the outside against the
//! built binary: each test is named after the finding it proves fixed.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::{
    Device, Gateway, GatewayConfig, Mosquitto, exchange, free_port, http_request,
    parse_http_response,
};
use serde_json::{Value, json};
use tokio::net::TcpSocket;

const ADMIN: &str = "admin-secret-for-security-tests";

/// A gateway whose TCP source authenticates against the registry, with the admin API on.
struct Setup {
    gateway: Gateway,
    devices: SocketAddr,
    _broker: Mosquitto,
}

async fn start(tail: &str) -> Setup {
    let broker = Mosquitto::start(free_port()).await;
    let config = GatewayConfig::new(broker.port)
        .source("auth = \"registry\"")
        .source("max_errors = 100")
        .tail("[registry]")
        .tail(tail);
    let devices = config.device_addr();
    let api_line = format!("address = \"127.0.0.1:{}\"", config.api_port);
    let text = config.render().replacen(
        &api_line,
        &format!("{api_line}\nadmin_token = \"{ADMIN}\""),
        1,
    );
    Setup {
        gateway: Gateway::start(&text).await,
        devices,
        _broker: broker,
    }
}

/// One HTTP/1.1 request from the loopback address `from`; returns the status, the raw
/// response head and the JSON body (`Null` when not JSON).
async fn request_from(
    from: [u8; 4],
    api: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> (u16, String, Value) {
    let request = http_request(method, path, bearer, body.as_ref());
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((from, 0)))
        .expect("bind a loopback source address");
    let mut stream = socket.connect(api).await.expect("connect to the API");
    let (_, text, _) = exchange(&mut stream, request.as_bytes()).await;
    parse_http_response(text.as_bytes())
}

/// An admin request from 127.0.0.1.
async fn admin(api: SocketAddr, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let (status, _, json) =
        request_from([127, 0, 0, 1], api, method, path, Some(ADMIN), body).await;
    (status, json)
}

/// Adds a device through the admin API; returns its `Provisioned` document.
async fn add_device(api: SocketAddr, id: &str) -> Value {
    let (status, provisioned) =
        admin(api, "POST", "/api/v1/devices", Some(json!({"id": id}))).await;
    assert_eq!(status, 201, "add {id}: {provisioned}");
    provisioned
}

fn text<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no {pointer} in {value}"))
}

/// Connects from a chosen loopback address and sends a hello; returns the reply.
async fn hello_from(from: [u8; 4], devices: SocketAddr, id: &str, token: &str) -> Value {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((from, 0)))
        .expect("bind a loopback source address");
    let stream = socket.connect(devices).await.expect("connect");
    let mut device = Device::new(stream);
    device
        .send_json(&json!({"type": "hello", "device": id, "token": token}))
        .await
        .expect("send hello");
    device
        .read_json(Duration::from_secs(10))
        .await
        .expect("a reply")
        .expect("not closed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_2_readd_does_not_revive_old_jwts() {
    let setup = start("").await;
    let api = setup.gateway.api;
    let first = add_device(api, "dev-2").await;
    let old_jwt = text(&first, "/tokens/access_token");
    let reply = hello_from([127, 0, 0, 1], setup.devices, "dev-2", old_jwt).await;
    assert_eq!(reply["type"], "welcome", "{reply}");

    let (status, body) = admin(api, "DELETE", "/api/v1/devices/dev-2", None).await;
    assert_eq!(status, 204, "{body}");
    let second = add_device(api, "dev-2").await;

    let reply = hello_from([127, 0, 0, 1], setup.devices, "dev-2", old_jwt).await;
    assert_eq!(
        reply["code"], "unauthorized",
        "a JWT from before the delete works again: {reply}"
    );
    let reply = hello_from(
        [127, 0, 0, 2],
        setup.devices,
        "dev-2",
        text(&second, "/tokens/access_token"),
    )
    .await;
    assert_eq!(reply["type"], "welcome", "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_3_known_mac_does_not_take_over_a_device() {
    let setup = start("").await;
    let api = setup.gateway.api;
    let (status, created) = admin(
        api,
        "POST",
        "/api/v1/provisioning-tokens",
        Some(json!({"max_uses": 10})),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let token = text(&created, "/secret").to_owned();
    let registration = json!({"provisioning_token": token, "mac": "00:11:22:33:44:55"});

    let (status, _, real) = request_from(
        [127, 0, 0, 1],
        api,
        "POST",
        "/api/v1/devices/register",
        None,
        Some(registration.clone()),
    )
    .await;
    assert_eq!(status, 201, "{real}");
    let id = text(&real, "/device/id").to_owned();
    let secret = text(&real, "/secret").to_owned();

    // Same token, same MAC, another caller: refused, counted, and the real device keeps
    // its credentials.
    let (status, _, refused) = request_from(
        [127, 0, 0, 9],
        api,
        "POST",
        "/api/v1/devices/register",
        None,
        Some(registration),
    )
    .await;
    assert_eq!(status, 409, "takeover by MAC: {refused}");
    assert!(refused.get("secret").is_none(), "{refused}");
    let reply = hello_from([127, 0, 0, 1], setup.devices, &id, &secret).await;
    assert_eq!(reply["type"], "welcome", "real device locked out: {reply}");
    setup
        .gateway
        .wait_metric(
            "fieldgate_auth_failures_total",
            &[("source", "http")],
            Duration::from_secs(10),
            |value| value >= 1.0,
        )
        .await;

    // The admin re-provision is a rotation: new secret, the old one stops working.
    let (status, rotated) = admin(api, "POST", &format!("/api/v1/devices/{id}/rotate"), None).await;
    assert_eq!(status, 200, "{rotated}");
    let reply = hello_from(
        [127, 0, 0, 2],
        setup.devices,
        &id,
        text(&rotated, "/secret"),
    )
    .await;
    assert_eq!(reply["type"], "welcome", "{reply}");
}

/// Every permission bit for group or others under `dir`, as `path mode` lines.
fn loose_entries(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut loose = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let metadata = std::fs::symlink_metadata(&path).expect("stat");
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            loose.push(format!("{} {mode:o}", path.display()));
        }
        if metadata.is_dir() {
            for entry in std::fs::read_dir(&path).expect("read_dir") {
                stack.push(entry.expect("entry").path());
            }
        }
    }
    loose
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_4_data_dir_and_files_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let mut setup = start("[sinks.local]\ntype = \"file\"\ninputs = [\"devices\"]").await;
    let api = setup.gateway.api;
    let provisioned = add_device(api, "dev-4").await;
    let socket = TcpSocket::new_v4().expect("socket");
    let stream = socket.connect(setup.devices).await.expect("connect");
    let mut device = Device::new(stream);
    device
        .send_json(
            &json!({"type": "hello", "device": "dev-4", "token": text(&provisioned, "/secret")}),
        )
        .await
        .expect("hello");
    device.expect_type("welcome", Duration::from_secs(10)).await;
    device
        .send_json(&json!({"seq": 1, "temp": 20}))
        .await
        .expect("send");
    setup
        .gateway
        .wait_metric(
            "fieldgate_received_events_total",
            &[("source", "devices")],
            Duration::from_secs(10),
            |value| value >= 1.0,
        )
        .await;
    let data = setup.gateway.data_dir.clone();
    let registry = data.join("registry.redb");
    assert!(registry.exists());
    // Created owner-only under the test's (looser) umask.
    let loose = loose_entries(&data);
    assert!(loose.is_empty(), "readable by others: {loose:#?}");
    drop(device);

    // Loosened while stopped: tightened at start-up, with a log line naming the path.
    setup.gateway.terminate().await;
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&registry, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    setup.gateway.restart().await;
    let loose = loose_entries(&data);
    assert!(loose.is_empty(), "not tightened at start-up: {loose:#?}");
    let log = setup.gateway.stderr();
    assert!(
        log.contains("tightened permissions") && log.contains("registry.redb"),
        "no log line names the tightened file:\n{}",
        setup.gateway.stderr_tail(30)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_6_one_admin_check_for_every_admin_route() {
    let setup = start("").await;
    let api = setup.gateway.api;
    let attacker = [127, 0, 0, 6];
    // Guesses of every length against the debug endpoint: 401, counted like the API's.
    for guess in [
        "a",
        "admin-secret-for-security-testz",
        "x".repeat(300).as_str(),
        "",
        "b",
    ] {
        let (status, _, body) = request_from(
            attacker,
            api,
            "GET",
            "/debug/pprof/heap",
            Some(guess).filter(|guess| !guess.is_empty()),
            None,
        )
        .await;
        assert_eq!(status, 401, "{guess:?}: {body}");
    }
    let (status, _, body) = request_from(
        attacker,
        api,
        "GET",
        "/debug/pprof/heap",
        Some("wrong"),
        None,
    )
    .await;
    assert_eq!(status, 401, "{body}");
    // Throttled now, on the debug routes and the API alike, even with the right token.
    let (status, head, body) =
        request_from(attacker, api, "GET", "/debug/pprof/heap", Some(ADMIN), None).await;
    assert_eq!(status, 429, "debug route not throttled: {body}");
    assert!(head.to_ascii_lowercase().contains("retry-after"), "{head}");
    let (status, _, body) =
        request_from(attacker, api, "GET", "/api/v1/devices", Some(ADMIN), None).await;
    assert_eq!(status, 429, "{body}");
    let failures = setup
        .gateway
        .metric("fieldgate_auth_failures_total", &[("source", "api_admin")])
        .await
        .unwrap_or(0.0);
    assert!(failures >= 6.0, "admin failures counted: {failures}");
    // Another address is not locked out (finding 10 for the admin token).
    let (status, _, body) = request_from(
        [127, 0, 0, 7],
        api,
        "GET",
        "/debug/pprof/heap",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(status, 501, "{body}");
    let (status, _, body) = request_from(
        [127, 0, 0, 7],
        api,
        "GET",
        "/api/v1/devices",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let log = setup.gateway.stderr();
    assert!(
        log.contains("admin request refused"),
        "{}",
        setup.gateway.stderr_tail(20)
    );
    assert!(!log.contains(ADMIN), "the admin token leaked into the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_9_device_ids_cannot_throttle_addresses() {
    let setup = start("").await;
    let good = add_device(setup.gateway.api, "good").await;
    // A device id that spells the old address key of 127.0.10.50.
    for attempt in 0..20 {
        let reply = hello_from(
            [127, 0, 0, 1],
            setup.devices,
            "ip:127.0.10.50",
            &format!("guess-{attempt}"),
        )
        .await;
        assert_eq!(reply["code"], "unauthorized", "{reply}");
    }
    let reply = hello_from(
        [127, 0, 10, 50],
        setup.devices,
        "good",
        text(&good, "/secret"),
    )
    .await;
    assert_eq!(
        reply["type"], "welcome",
        "failures for a device id throttled an address: {reply}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_10_lockout_does_not_deny_the_real_device() {
    let setup = start("").await;
    let victim = add_device(setup.gateway.api, "victim").await;
    let secret = text(&victim, "/secret");
    for attempt in 0..20 {
        let reply = hello_from(
            [127, 0, 0, 66],
            setup.devices,
            "victim",
            &format!("guess-{attempt}"),
        )
        .await;
        assert_eq!(reply["code"], "unauthorized", "{reply}");
    }
    // The attacker's address is slowed down, even with the right secret...
    let reply = hello_from([127, 0, 0, 66], setup.devices, "victim", secret).await;
    assert_eq!(reply["code"], "unauthorized", "{reply}");
    // ...but the real device, from its own address, gets in.
    let reply = hello_from([127, 0, 0, 10], setup.devices, "victim", secret).await;
    assert_eq!(
        reply["type"], "welcome",
        "someone else's failures locked the device out: {reply}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_12_refresh_revokes_the_old_access_token() {
    let setup = start("").await;
    let api = setup.gateway.api;
    let provisioned = add_device(api, "dev-12").await;
    let old_jwt = text(&provisioned, "/tokens/access_token");
    let (status, _, renewed) = request_from(
        [127, 0, 0, 1],
        api,
        "POST",
        "/api/v1/auth/refresh",
        None,
        Some(json!({"refresh_token": text(&provisioned, "/tokens/refresh_token")})),
    )
    .await;
    assert_eq!(status, 200, "{renewed}");
    let reply = hello_from([127, 0, 0, 1], setup.devices, "dev-12", old_jwt).await;
    assert_eq!(
        reply["code"], "unauthorized",
        "the replaced access token still works: {reply}"
    );
    let reply = hello_from(
        [127, 0, 0, 2],
        setup.devices,
        "dev-12",
        text(&renewed, "/access_token"),
    )
    .await;
    assert_eq!(reply["type"], "welcome", "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_key_rotation_keeps_issued_tokens_working() {
    let setup = start("").await;
    let api = setup.gateway.api;
    let before = add_device(api, "dev-k").await;
    let (status, rotated) = admin(api, "POST", "/api/v1/jwt-key/rotate", None).await;
    assert_eq!(status, 200, "{rotated}");
    assert!(
        rotated["previous_key_valid_until_ms"].as_u64().is_some(),
        "{rotated}"
    );
    let reply = hello_from(
        [127, 0, 0, 1],
        setup.devices,
        "dev-k",
        text(&before, "/tokens/access_token"),
    )
    .await;
    assert_eq!(
        reply["type"], "welcome",
        "old-key JWT refused in its grace period: {reply}"
    );
    let after = add_device(api, "dev-l").await;
    let reply = hello_from(
        [127, 0, 0, 1],
        setup.devices,
        "dev-l",
        text(&after, "/tokens/access_token"),
    )
    .await;
    assert_eq!(reply["type"], "welcome", "{reply}");
    // Without the admin token the route is refused.
    let (status, _, _) = request_from(
        [127, 0, 0, 2],
        api,
        "POST",
        "/api/v1/jwt-key/rotate",
        None,
        None,
    )
    .await;
    assert_eq!(status, 401);
}
