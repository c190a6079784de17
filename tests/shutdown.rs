//! Shutdown ends within `shutdown_grace` plus a few seconds, with sinks stopped and the
//! buffers synced, even when a peer hangs (issue 8, item 9): an HTTP client that stops in
//! the middle of a body, a TLS device that stops reading (so `close_notify` never goes
//! out). The hung reads and writes themselves time out too.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Gateway, Pki, api_request, data_message, free_port};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

const ADMIN: &str = "admin-secret-for-tests";
/// The gateways below stop within this grace...
const GRACE: Duration = Duration::from_secs(2);
/// ...plus at most this much.
const SLACK: Duration = Duration::from_secs(3);

/// A gateway with the registry (for HTTP ingestion), a TCP source in ack mode (registry
/// auth: no device uses it), and a file sink reading both, its disk buffer synced per
/// `fsync`.
fn config(fsync: &str) -> String {
    with_registry(&base_config(fsync, ""))
}

/// [`base_config`] plus the registry and HTTP ingestion.
fn with_registry(base: &str) -> String {
    base.replace("\n[sinks.local]\n", "\n[registry]\n\n[sinks.local]\n")
        .replace("ack = true\n", "ack = true\nauth = \"registry\"\n")
        .replace("inputs = [\"devices\"]", "inputs = [\"devices\", \"http\"]")
}

/// A gateway with a TCP source in ack mode and a file sink reading it, its disk buffer
/// synced per `fsync`. `tail` is appended (e.g. a TLS table for the source).
fn base_config(fsync: &str, tail: &str) -> String {
    format!(
        r#"[gateway]
id = "gw-1"
shutdown_grace = "{grace}s"

[api]
address = "127.0.0.1:{api}"
admin_token = "{ADMIN}"

[sources.devices]
type = "tcp"
address = "127.0.0.1:{devices}"
framing = "lines"
ack = true

[sinks.local]
type = "file"
inputs = ["devices"]

[sinks.local.buffer]
type = "disk"
max_size = "64MiB"
fsync = "{fsync}"

{tail}
"#,
        grace = GRACE.as_secs(),
        api = free_port(),
        devices = free_port(),
    )
}

fn device_addr(config: &str) -> SocketAddr {
    let table: toml::Table = toml::from_str(config).expect("config parses");
    table["sources"]["devices"]["address"]
        .as_str()
        .expect("address")
        .parse()
        .expect("socket address")
}

/// One admin API request; returns the status and the JSON body.
async fn admin(addr: SocketAddr, method: &str, path: &str, body: &Value) -> (u16, Value) {
    api_request(addr, method, path, Some(ADMIN), Some(body)).await
}

/// Provisions `id` and returns its access JWT.
async fn device_jwt(gateway: &Gateway, id: &str) -> String {
    let (status, provisioned) =
        admin(gateway.api, "POST", "/api/v1/devices", &json!({ "id": id })).await;
    assert_eq!(status, 201, "add {id}: {provisioned}");
    provisioned["tokens"]["access_token"]
        .as_str()
        .expect("a JWT")
        .to_string()
}

/// Starts an ingestion request that announces 1000 bytes of body, sends 10 and stops.
/// Returns once the handler is reading the body (it asked for it with `100 Continue`).
async fn stalled_ingest(gateway: &Gateway, jwt: &str) -> BufReader<TcpStream> {
    let head = format!(
        "POST /api/v1/devices/dev-1/telemetry HTTP/1.1\r\nHost: test\r\n\
         Authorization: Bearer {jwt}\r\nContent-Type: application/json\r\n\
         Content-Length: 1000\r\nExpect: 100-continue\r\n\r\n"
    );
    let mut stream = BufReader::new(TcpStream::connect(gateway.api).await.expect("connect"));
    stream
        .get_mut()
        .write_all(head.as_bytes())
        .await
        .expect("send the head");
    let mut line = String::new();
    timeout(Duration::from_secs(10), stream.read_line(&mut line))
        .await
        .expect("an interim answer")
        .expect("read");
    assert!(
        line.starts_with("HTTP/1.1 100"),
        "the handler should ask for the body: {line:?}"
    );
    let mut blank = String::new();
    timeout(Duration::from_secs(10), stream.read_line(&mut blank))
        .await
        .expect("end of the interim answer")
        .expect("read");
    stream
        .get_mut()
        .write_all(b"{\"temp\": 2")
        .await
        .expect("send part of the body");
    stream
}

/// SIGTERM; asserts the gateway exits in time, cleanly, after stopping its sinks and
/// syncing its buffers.
async fn terminate_in_time(gateway: &mut Gateway) {
    let started = Instant::now();
    let status = gateway.terminate().await;
    let took = started.elapsed();
    let log = gateway.stderr();
    assert!(
        took <= GRACE + SLACK,
        "shutdown took {took:?} (grace {GRACE:?}):\n{}",
        gateway.stderr_tail(30)
    );
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        gateway.stderr_tail(30)
    );
    assert!(
        log.contains("sinks stopped") && log.contains("buffers synced"),
        "sinks stopped and buffers synced at shutdown:\n{}",
        gateway.stderr_tail(30)
    );
}

#[tokio::test]
async fn sigterm_ends_in_time_while_an_ingest_body_stalls() {
    let mut gateway = Gateway::start(&config("always")).await;
    let jwt = device_jwt(&gateway, "dev-1").await;
    let _stalled = stalled_ingest(&gateway, &jwt).await;
    terminate_in_time(&mut gateway).await;
}

#[tokio::test]
async fn a_stalled_ingest_body_times_out() {
    let gateway = Gateway::start(&config("always")).await;
    let jwt = device_jwt(&gateway, "dev-1").await;
    let mut stalled = stalled_ingest(&gateway, &jwt).await;
    let mut status_line = String::new();
    timeout(Duration::from_secs(30), stalled.read_line(&mut status_line))
        .await
        .expect("the gateway answers a stalled body instead of waiting forever")
        .expect("read the answer");
    assert!(
        status_line.starts_with("HTTP/1.1 408"),
        "408 Request Timeout: {status_line:?}"
    );
}

/// A TLS device in ack mode that never reads: it sends frames until the gateway, whose
/// acks fill the socket, is stuck writing and stops reading too (no progress for 3 s).
/// The returned task owns the connection and keeps it open, blocked in a write.
async fn tls_device_that_stops_reading(addr: SocketAddr, pki: &Pki) -> JoinHandle<()> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).expect("add CA");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    // A small receive window, so the gateway's acks fill it quickly.
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let tcp = socket.connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
    let mut stream = timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .expect("TLS handshake in time")
    .expect("TLS handshake");
    let mut chunk = String::new();
    for seq in 0..100 {
        chunk.push_str(&data_message("tls-1", seq, 0).to_string());
        chunk.push('\n');
    }
    let sent = Arc::new(AtomicUsize::new(0));
    let sender = {
        let sent = Arc::clone(&sent);
        tokio::spawn(async move {
            for _ in 0..10_000 {
                if stream.write_all(chunk.as_bytes()).await.is_err() {
                    return;
                }
                sent.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let mut last = 0;
    let mut progress = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "the gateway kept reading although its acks were never read"
        );
        assert!(
            !sender.is_finished(),
            "the gateway closed the connection early"
        );
        let now = sent.load(Ordering::SeqCst);
        if now != last {
            last = now;
            progress = Instant::now();
        } else if progress.elapsed() >= Duration::from_secs(3) {
            return sender;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn tls_tail(pki: &Pki) -> String {
    let path = |p: &Path| format!("{:?}", p.display().to_string());
    format!(
        "[sources.devices.tls]\ncert = {}\nkey = {}\n",
        path(&pki.server_cert),
        path(&pki.server_key)
    )
}

#[tokio::test]
async fn sigterm_ends_in_time_while_a_tls_device_stops_reading() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let config = base_config("never", &tls_tail(&pki));
    let mut gateway = Gateway::start(&config).await;
    let _stuck = tls_device_that_stops_reading(device_addr(&config), &pki).await;
    terminate_in_time(&mut gateway).await;
}

#[tokio::test]
async fn a_tls_device_that_stops_reading_does_not_hold_its_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let config = base_config("never", &tls_tail(&pki));
    let gateway = Gateway::start(&config).await;
    let _stuck = tls_device_that_stops_reading(device_addr(&config), &pki).await;
    // The ack write times out, then the TLS close (which cannot be sent either) must time
    // out too, or the connection holds its slot of `max_connections` forever.
    gateway
        .wait_metric(
            "fieldgate_connections",
            &[("source", "devices")],
            Duration::from_secs(40),
            |connections| connections == 0.0,
        )
        .await;
}
