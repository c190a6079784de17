//! The device registry on the TCP entry point: devices authenticate with their secret or
//! JWT, a revoked device is cut off within a second, brute force is slowed without
//! hurting other devices, and commands wait for offline devices until their TTL.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{
    Device, Gateway, GatewayConfig, Mosquitto, Pki, Subscriber, api_request, free_port, tls_device,
};
use serde_json::{Value, json};
use tokio::net::TcpSocket;
use tokio::time::Instant;

const ADMIN: &str = "admin-secret-for-tests";

/// A gateway whose TCP source authenticates against the registry.
async fn start(broker: u16) -> Gateway {
    start_with(broker, "").await
}

/// The same with extra TOML at the end (e.g. `[sources.devices.tls]`).
async fn start_with(broker: u16, tail: &str) -> Gateway {
    let config = GatewayConfig::new(broker)
        .source("auth = \"registry\"")
        .source("max_errors = 100")
        .tail("[registry]")
        .tail(tail);
    let api_line = format!("address = \"127.0.0.1:{}\"", config.api_port);
    let text = config.render().replacen(
        &api_line,
        &format!("{api_line}\nadmin_token = \"{ADMIN}\""),
        1,
    );
    Gateway::start(&text).await
}

/// One HTTP/1.1 request with the admin token; returns the status and the JSON body.
async fn api(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    api_request(addr, method, path, Some(ADMIN), body.as_ref()).await
}

/// Adds a device through the admin API and returns its secret and access token.
async fn add_device(gateway: &Gateway, id: &str) -> (String, String) {
    let (status, provisioned) = api(
        gateway.api,
        "POST",
        "/api/v1/devices",
        Some(json!({"id": id})),
    )
    .await;
    assert_eq!(status, 201, "add {id}: {provisioned}");
    let secret = provisioned["secret"]
        .as_str()
        .expect("a secret")
        .to_string();
    let jwt = provisioned["tokens"]["access_token"]
        .as_str()
        .expect("a JWT")
        .to_string();
    (secret, jwt)
}

/// Connects from a chosen loopback address (per-address throttling keeps them apart).
async fn connect_from(local: [u8; 4], gateway: SocketAddr) -> Device {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((local, 0)))
        .expect("bind a loopback source address");
    let stream = socket.connect(gateway).await.expect("connect");
    Device::new(stream)
}

async fn hello(device: &mut Device, id: &str, token: &str) -> Value {
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
async fn secret_and_jwt_authenticate_and_revocation_closes_within_a_second() {
    let broker = Mosquitto::start(free_port()).await;
    let sub = Subscriber::connect(broker.port).await;
    let config_port = broker.port;
    let gateway = start(config_port).await;
    let devices = gateway_device_addr(&gateway);
    let (secret, jwt) = add_device(&gateway, "dev-a").await;

    // Wrong secret: unauthorized and closed.
    let mut intruder = Device::connect(devices).await.expect("connect");
    let reply = hello(&mut intruder, "dev-a", "not-the-secret").await;
    assert_eq!(reply["code"], "unauthorized", "{reply}");
    intruder.expect_closed(Duration::from_secs(5)).await;

    // A JWT works too.
    let mut by_jwt = Device::connect(devices).await.expect("connect");
    assert_eq!(hello(&mut by_jwt, "dev-a", &jwt).await["type"], "welcome");
    drop(by_jwt);

    // The secret works; data flows.
    let mut device = Device::connect(devices).await.expect("connect");
    assert_eq!(
        hello(&mut device, "dev-a", &secret).await["type"],
        "welcome"
    );
    device
        .send_json(&json!({"seq": 1, "temp": 20}))
        .await
        .expect("send");
    assert!(
        sub.wait_until(Duration::from_secs(20), |msgs| msgs
            .iter()
            .any(|m| m.topic == "gateways/gw-1/devices/dev-a/telemetry"))
            .await,
        "telemetry from the authenticated device did not arrive"
    );

    // Revoked mid-session: the connection is closed within a second.
    let revoked_at = Instant::now();
    let (status, body) = api(gateway.api, "POST", "/api/v1/devices/dev-a/revoke", None).await;
    assert_eq!(status, 200, "{body}");
    device.expect_closed(Duration::from_secs(1)).await;
    assert!(
        revoked_at.elapsed() < Duration::from_secs(1),
        "closed after {:?}",
        revoked_at.elapsed()
    );

    // And cannot come back.
    let mut again = Device::connect(devices).await.expect("connect");
    assert_eq!(
        hello(&mut again, "dev-a", &secret).await["code"],
        "unauthorized"
    );
}

fn gateway_device_addr(gateway: &Gateway) -> SocketAddr {
    let text = std::fs::read_to_string(gateway.config_path()).expect("config");
    let source = text
        .split("[sources.devices]")
        .nth(1)
        .expect("source table");
    let address = source
        .lines()
        .find_map(|line| line.strip_prefix("address = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .expect("source address");
    address.parse().expect("socket address")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brute_force_is_throttled_and_other_devices_are_unaffected() {
    let broker = Mosquitto::start(free_port()).await;
    let gateway = start(broker.port).await;
    let devices = gateway_device_addr(&gateway);
    let (victim_secret, _) = add_device(&gateway, "victim").await;
    let (good_secret, _) = add_device(&gateway, "good").await;

    for attempt in 0..20 {
        let mut attacker = connect_from([127, 0, 0, 1], devices).await;
        let reply = hello(&mut attacker, "victim", &format!("guess-{attempt}")).await;
        assert_eq!(reply["code"], "unauthorized", "attempt {attempt}: {reply}");
    }
    // The right secret from the attacking address is refused while the delay lasts.
    let mut attacker = connect_from([127, 0, 0, 1], devices).await;
    let reply = hello(&mut attacker, "victim", &victim_secret).await;
    assert_eq!(
        reply["code"], "unauthorized",
        "throttle did not hold: {reply}"
    );
    assert!(
        reply["message"]
            .as_str()
            .unwrap_or_default()
            .contains("too many"),
        "{reply}"
    );

    // Another device from another address is not slowed.
    let started = Instant::now();
    let mut good = connect_from([127, 0, 0, 2], devices).await;
    assert_eq!(
        hello(&mut good, "good", &good_secret).await["type"],
        "welcome"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "good device waited {:?}",
        started.elapsed()
    );

    let failures = gateway
        .metric("fieldgate_auth_failures_total", &[("source", "devices")])
        .await;
    assert!(
        failures.unwrap_or(0.0) >= 20.0,
        "auth failures counted: {failures:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_wait_for_offline_devices_until_their_ttl() {
    let broker = Mosquitto::start(free_port()).await;
    let sub = Subscriber::connect(broker.port).await;
    let gateway = start(broker.port).await;
    let devices = gateway_device_addr(&gateway);
    let (secret, _) = add_device(&gateway, "dev-c").await;

    let queue = |id: &str, ttl: &str| json!({"id": id, "name": "reboot", "params": {"delay": 1}, "ttl": ttl});
    let (status, queued) = api(
        gateway.api,
        "POST",
        "/api/v1/devices/dev-c/commands",
        Some(queue("c-long", "5m")),
    )
    .await;
    assert_eq!(status, 202, "{queued}");
    assert_eq!(queued["state"], "queued");
    let (status, _) = api(
        gateway.api,
        "POST",
        "/api/v1/devices/dev-c/commands",
        Some(queue("c-short", "1s")),
    )
    .await;
    assert_eq!(status, 202);

    // The short one expires while the device is away, and the cloud hears of it.
    let expired = sub
        .wait_until(Duration::from_secs(15), |msgs| {
            msgs.iter()
                .filter(|m| m.topic == "gateways/gw-1/devices/dev-c/command_result")
                .flat_map(common::device_objects)
                .any(|p| p["id"] == "c-short" && p["status"] == "expired")
        })
        .await;
    assert!(expired, "no expired result upstream: {:?}", sub.messages());
    let (_, short) = api(
        gateway.api,
        "GET",
        "/api/v1/devices/dev-c/commands/c-short",
        None,
    )
    .await;
    assert_eq!(short["state"], "expired", "{short}");

    // The long one is delivered when the device connects, and its result is recorded.
    let mut device = Device::connect(devices).await.expect("connect");
    assert_eq!(
        hello(&mut device, "dev-c", &secret).await["type"],
        "welcome"
    );
    let command = device.expect_type("command", Duration::from_secs(10)).await;
    assert_eq!(command["id"], "c-long");
    assert_eq!(command["params"], json!({"delay": 1}));
    device
        .send_json(&json!({"type": "command_result", "id": "c-long", "status": "ok", "uptime": 3}))
        .await
        .expect("send result");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, long) = api(
            gateway.api,
            "GET",
            "/api/v1/devices/dev-c/commands/c-long",
            None,
        )
        .await;
        if long["state"] == "succeeded" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "command not marked succeeded: {long}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // An online device gets a new command at once.
    let (status, _) = api(
        gateway.api,
        "POST",
        "/api/v1/devices/dev-c/commands",
        Some(queue("c-now", "1m")),
    )
    .await;
    assert_eq!(status, 202);
    let command = device.expect_type("command", Duration::from_secs(5)).await;
    assert_eq!(command["id"], "c-now");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_names_a_registered_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let path = |p: &std::path::Path| p.display().to_string().replace('\\', "/");
    let tls = format!(
        "[sources.devices.tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"",
        path(&pki.server_cert),
        path(&pki.server_key),
        path(&pki.ca)
    );
    let broker = Mosquitto::start(free_port()).await;
    let sub = Subscriber::connect(broker.port).await;
    let gateway = start_with(broker.port, &tls).await;
    let devices = gateway_device_addr(&gateway);

    // The test PKI's client certificate has CN "gw-1": unknown to the registry yet.
    let mut unknown = tls_device(devices, &pki, true).await.expect("TLS connect");
    let reply = unknown
        .read_json(Duration::from_secs(5))
        .await
        .expect("a reply")
        .expect("an error frame");
    assert_eq!(reply["code"], "unauthorized", "{reply}");
    unknown.expect_closed(Duration::from_secs(5)).await;

    // Registered: the certificate alone authenticates; no hello, no secret.
    add_device(&gateway, "gw-1").await;
    let mut device = tls_device(devices, &pki, true).await.expect("TLS connect");
    device
        .send_json(&json!({"seq": 1, "temp": 21}))
        .await
        .expect("send");
    assert!(
        sub.wait_until(Duration::from_secs(20), |msgs| msgs
            .iter()
            .any(|m| m.topic == "gateways/gw-1/devices/gw-1/telemetry"))
            .await,
        "telemetry from the certified device did not arrive"
    );

    // Revoked: the session ends, and the certificate no longer gets in.
    let (status, _) = api(gateway.api, "POST", "/api/v1/devices/gw-1/revoke", None).await;
    assert_eq!(status, 200);
    device.expect_closed(Duration::from_secs(1)).await;
    let mut again = tls_device(devices, &pki, true).await.expect("TLS connect");
    let reply = again
        .read_json(Duration::from_secs(5))
        .await
        .expect("a reply")
        .expect("an error frame");
    assert_eq!(reply["code"], "unauthorized", "{reply}");
}
