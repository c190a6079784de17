//! Issue 9, the network side: each finding tried from the outside against the built
//! binary, named after the finding. Each test failed on the code before its fix.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::{
    Device, Gateway, Pki, api_request, eventually, eventually_async, free_port,
    parse_http_response, raw_http, tls_device,
};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const ADMIN: &str = "admin-secret-for-security-tests";

/// Ports of one test gateway.
struct Ports {
    api: u16,
    devices: u16,
    secure: u16,
}

impl Ports {
    fn new() -> Self {
        Self {
            api: free_port(),
            devices: free_port(),
            secure: free_port(),
        }
    }

    fn devices(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.devices).into()
    }

    fn secure(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.secure).into()
    }
}

/// A gateway with `[api]` (admin token, extra `api` lines), the TCP source `devices`
/// (`source` lines), the given extra TOML, and a file sink `local` fed by `inputs`.
fn config(ports: &Ports, api: &str, source: &str, inputs: &str, tail: &str) -> String {
    format!(
        "[gateway]\nid = \"gw-sec\"\nshutdown_grace = \"5s\"\n\n\
         [api]\naddress = \"127.0.0.1:{api_port}\"\nadmin_token = \"{ADMIN}\"\n{api}\n\n\
         [sources.devices]\ntype = \"tcp\"\naddress = \"127.0.0.1:{devices}\"\nframing = \"lines\"\n{source}\n\n\
         {tail}\n\n\
         [sinks.local]\ntype = \"file\"\ninputs = [{inputs}]\n\
         [sinks.local.buffer]\nfsync = \"always\"\n",
        api_port = ports.api,
        devices = ports.devices,
    )
}

/// Parses an HTTP/1.1 response's status and JSON body.
fn parse_response(response: &[u8]) -> (u16, Value) {
    let (status, _, json) = parse_http_response(response);
    (status, json)
}

/// One HTTP/1.1 request (`Connection: close`) with the admin token and a JSON body.
async fn api(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    api_request(addr, method, path, Some(ADMIN), body.as_ref()).await
}

/// Sends raw request bytes, reads to EOF; returns status, the raw text and the JSON body.
async fn raw_request(addr: SocketAddr, request: &[u8]) -> (u16, String, Value) {
    raw_http(addr, request).await
}

/// Adds a device through the admin API and returns its secret and access token.
async fn add_device(api_addr: SocketAddr, id: &str) -> (String, String) {
    let (status, provisioned) =
        api(api_addr, "POST", "/api/v1/devices", Some(json!({"id": id}))).await;
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

/// Sends a hello with `token` and returns the gateway's answer.
async fn hello<S: AsyncRead + AsyncWrite>(device: &mut Device<S>, id: &str, token: &str) -> Value {
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

/// Waits until the peer closes (EOF or reset); the elapsed time, or `None` after `limit`.
async fn closed_within<S: AsyncRead + AsyncWrite>(
    device: &mut Device<S>,
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    loop {
        let left = limit.checked_sub(started.elapsed())?;
        match device.read_line(left).await {
            Ok(None) => return Some(started.elapsed()),
            Ok(Some(_)) => {}
            Err(err) if err.kind() == std::io::ErrorKind::TimedOut => return None,
            Err(_) => return Some(started.elapsed()),
        }
    }
}

/// A keep-alive HTTP/1.1 connection for device telemetry.
struct KeepAlive {
    stream: TcpStream,
}

impl KeepAlive {
    async fn connect(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.expect("connect to the API"),
        }
    }

    /// Posts one telemetry object; the status, or `None` when the connection is gone.
    async fn post(&mut self, id: &str, jwt: &str) -> Option<u16> {
        let body = r#"{"temp": 20}"#;
        let request = format!(
            "POST /api/v1/devices/{id}/telemetry HTTP/1.1\r\nHost: test\r\n\
             Authorization: Bearer {jwt}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.stream.write_all(request.as_bytes()).await.ok()?;
        // Read one response: headers, then Content-Length bytes of body.
        let mut response = Vec::new();
        let read = async {
            loop {
                let mut chunk = [0u8; 4096];
                let n = self.stream.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                response.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&response).into_owned();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length = head
                        .lines()
                        .find_map(|line| {
                            let (name, value) = line.split_once(':')?;
                            name.eq_ignore_ascii_case("content-length")
                                .then(|| value.trim().parse::<usize>().ok())
                                .flatten()
                        })
                        .unwrap_or(0);
                    if body.len() >= length {
                        return Some(parse_response(&response).0);
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .ok()
            .flatten()
    }
}

/// Events the file sink `local` wrote, as JSON lines.
fn stored_events(data_dir: &Path) -> Vec<Value> {
    let dir = data_dir.join("sinks").join("local");
    let mut events = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return events;
    };
    for entry in entries.flatten() {
        if let Ok(text) = std::fs::read_to_string(entry.path()) {
            events.extend(
                text.lines()
                    .filter_map(|line| serde_json::from_str(line).ok()),
            );
        }
    }
    events
}

/// Finding 1: revoking, rotating or deleting a device closes every one of its sessions
/// (two plain TCP sessions and a TLS session on a second listener) within a second, and
/// its next HTTP telemetry request on an open keep-alive connection is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_1_revoke_closes_every_session() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let ports = Ports::new();
    let secure = format!(
        "[registry]\n\n[sources.secure]\ntype = \"tcp\"\naddress = \"127.0.0.1:{}\"\n\
         framing = \"lines\"\nauth = \"registry\"\n\
         [sources.secure.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        ports.secure,
        pki.server_cert.display(),
        pki.server_key.display()
    );
    let text = config(
        &ports,
        "",
        "auth = \"registry\"",
        "\"devices\", \"secure\", \"http\"",
        &secure,
    );
    let gateway = Gateway::start(&text).await;
    let api_addr = gateway.api;

    for (id, action) in [
        ("dev-revoked", ("POST", "/revoke")),
        ("dev-rotated", ("POST", "/rotate")),
        ("dev-deleted", ("DELETE", "")),
    ] {
        let (secret, jwt) = add_device(api_addr, id).await;
        let mut first = Device::connect(ports.devices()).await.expect("connect");
        assert_eq!(hello(&mut first, id, &secret).await["type"], "welcome");
        let mut second = Device::connect(ports.devices()).await.expect("connect");
        assert_eq!(hello(&mut second, id, &secret).await["type"], "welcome");
        let mut tls = tls_device(ports.secure(), &pki, false)
            .await
            .expect("TLS connect");
        assert_eq!(hello(&mut tls, id, &secret).await["type"], "welcome");
        let mut http = KeepAlive::connect(api_addr).await;
        assert_eq!(
            http.post(id, &jwt).await,
            Some(202),
            "{id}: telemetry before"
        );

        let (method, suffix) = action;
        let (status, body) = api(
            api_addr,
            method,
            &format!("/api/v1/devices/{id}{suffix}"),
            None,
        )
        .await;
        assert!(
            (200..300).contains(&status),
            "{id}: {method} {suffix}: {status} {body}"
        );
        let limit = Duration::from_secs(1);
        let first_closed = closed_within(&mut first, limit).await;
        let second_closed = closed_within(&mut second, limit).await;
        let tls_closed = closed_within(&mut tls, limit).await;
        assert!(
            first_closed.is_some() && second_closed.is_some() && tls_closed.is_some(),
            "{id}: sessions still open a second after {method} {suffix}: first {first_closed:?}, \
             second {second_closed:?}, tls {tls_closed:?}\n{}",
            gateway.stderr_tail(30)
        );
        let refused = http.post(id, &jwt).await;
        assert!(
            refused.is_none_or(|status| status == 401 || status == 403),
            "{id}: HTTP telemetry after {method} {suffix}: {refused:?}"
        );
    }
}

/// Finding 5: a source whose devices name themselves without proof (`auth = "none"` or a
/// shared `"token"`) beside `[registry]` could impersonate registered devices; `check`
/// refuses the file with one message that names the key and says why.
#[test]
fn finding_5_unauthenticated_source_beside_registry_is_refused() {
    let ports = Ports::new();
    for (auth, mode) in [
        ("", "\"none\""),
        ("auth = \"none\"", "\"none\""),
        ("auth = \"token\"\ntokens = [\"t1\"]", "\"token\""),
    ] {
        let text = config(&ports, "", auth, "\"devices\"", "[registry]\n");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, &text).expect("write config");
        let output = std::process::Command::new(common::fieldgate_bin())
            .arg("check")
            .arg(&path)
            .output()
            .expect("run fieldgate check");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "{mode}: check accepted an unauthenticated source beside [registry]"
        );
        assert!(
            stderr.contains("sources.devices.auth")
                && stderr.contains(&format!("auth = {mode} cannot be used beside [registry]"))
                && stderr.contains("registered device's id"),
            "{mode}: unclear message:\n{stderr}"
        );
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{mode}: one message expected:\n{stderr}"
        );
    }
    // The same gateway with registry authentication passes.
    let text = config(
        &ports,
        "",
        "auth = \"registry\"",
        "\"devices\"",
        "[registry]\n",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, &text).expect("write config");
    let output = std::process::Command::new(common::fieldgate_bin())
        .arg("check")
        .arg(&path)
        .output()
        .expect("run fieldgate check");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Reads frames until an `error` frame arrives or the connection ends; returns its code.
async fn error_code<S: AsyncRead + AsyncWrite>(
    device: &mut Device<S>,
    limit: Duration,
) -> Option<String> {
    let started = Instant::now();
    loop {
        let left = limit.checked_sub(started.elapsed())?;
        match device.read_json(left).await {
            Ok(Some(frame)) if frame["type"] == "error" => {
                return frame["code"].as_str().map(str::to_owned);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return None,
        }
    }
}

/// Finding 7: a connection that names no device within `hello_timeout` (default 10 s) is
/// closed, whether silent or sending heartbeats, counted and logged; a correct hello
/// waiting behind connections that filled `max_connections` then gets its welcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_7_hello_deadline_closes_silent_and_heartbeat_only_connections() {
    let ports = Ports::new();
    let text = config(
        &ports,
        "",
        "auth = \"registry\"\nmax_connections = 2",
        "\"devices\"",
        "[registry]\n",
    );
    let gateway = Gateway::start(&text).await;
    let (secret, _) = add_device(gateway.api, "dev-late").await;

    let started = Instant::now();
    let mut silent = Device::connect(ports.devices()).await.expect("connect");
    let mut chatty = Device::connect(ports.devices()).await.expect("connect");
    // Both slots are taken: this one waits in the accept queue.
    let mut waiting = Device::connect(ports.devices()).await.expect("connect");
    waiting
        .send_json(&json!({"type": "hello", "device": "dev-late", "token": secret}))
        .await
        .expect("send hello");

    let heartbeats = async {
        let mut every = tokio::time::interval(Duration::from_millis(500));
        loop {
            every.tick().await;
            if chatty
                .send_json(&json!({"type": "heartbeat"}))
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let limit = Duration::from_secs(14);
    let (silent_code, ()) = tokio::join!(error_code(&mut silent, limit), async {
        let _stopped = tokio::time::timeout(limit, heartbeats).await;
    });
    assert_eq!(silent_code.as_deref(), Some("hello_timeout"));
    assert!(
        closed_within(&mut silent, Duration::from_secs(2))
            .await
            .is_some()
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(9) && elapsed < Duration::from_secs(14),
        "closed after {elapsed:?}"
    );
    assert!(
        closed_within(&mut chatty, Duration::from_secs(2))
            .await
            .is_some(),
        "a connection sending only heartbeats outlived the hello deadline"
    );
    let welcome = waiting
        .read_json(Duration::from_secs(5))
        .await
        .expect("an answer")
        .expect("not closed");
    assert_eq!(welcome["type"], "welcome", "{welcome}");

    gateway
        .wait_metric(
            "fieldgate_refused_connections_total",
            &[("source", "devices"), ("reason", "hello_timeout")],
            Duration::from_secs(5),
            |count| count >= 2.0,
        )
        .await;
    let log = gateway.stderr();
    assert!(
        log.contains("hello_timeout") && log.contains("connection closed by a defence"),
        "{}",
        gateway.stderr_tail(20)
    );
}

/// Finding 11, per connection: before a hello authenticates it, a connection may hold at
/// most `unauthenticated_max_frame` (default 4 KiB) of a frame; a longer unfinished line is
/// answered, counted and closed, and an authenticated device still sends 60 KB frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_11_unauthenticated_partial_frames_are_capped() {
    let ports = Ports::new();
    let text = config(
        &ports,
        "",
        "auth = \"registry\"",
        "\"devices\"",
        "[registry]\n",
    );
    let gateway = Gateway::start(&text).await;
    let (secret, _) = add_device(gateway.api, "dev-big").await;

    let mut intruders = Vec::new();
    for _ in 0..20 {
        let mut intruder = Device::connect(ports.devices()).await.expect("connect");
        intruder
            .send_raw(&vec![b'x'; 60 * 1024])
            .await
            .expect("send a partial line");
        intruders.push(intruder);
    }
    for intruder in &mut intruders {
        assert_eq!(
            error_code(intruder, Duration::from_secs(5))
                .await
                .as_deref(),
            Some("unauthenticated_frame_too_large")
        );
        assert!(
            closed_within(intruder, Duration::from_secs(2))
                .await
                .is_some()
        );
    }
    gateway
        .wait_metric(
            "fieldgate_refused_connections_total",
            &[
                ("source", "devices"),
                ("reason", "unauthenticated_frame_too_large"),
            ],
            Duration::from_secs(5),
            |count| count >= 20.0,
        )
        .await;

    let mut device = Device::connect(ports.devices()).await.expect("connect");
    assert_eq!(
        hello(&mut device, "dev-big", &secret).await["type"],
        "welcome"
    );
    device
        .send_json(&json!({"seq": 1, "pad": "y".repeat(60 * 1024)}))
        .await
        .expect("send a large frame");
    let stored = eventually(Duration::from_secs(10), || {
        stored_events(&gateway.data_dir)
            .into_iter()
            .find(|event| event["device"] == "dev-big" && event["kind"] == "telemetry")
    })
    .await;
    assert!(
        stored.is_some(),
        "the authenticated 60 KB frame was not stored"
    );
}

/// Finding 11, gateway-wide: all connections together hold at most
/// `gateway.partial_frame_budget` in unfinished frames; the connection that would exceed it
/// is answered, counted and closed, and the budget is given back when connections end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_11_partial_frame_budget_is_gateway_wide() {
    let ports = Ports::new();
    let text = config(&ports, "", "max_frame = \"64KiB\"", "\"devices\"", "").replacen(
        "shutdown_grace = \"5s\"",
        "shutdown_grace = \"5s\"\npartial_frame_budget = \"256KiB\"",
        1,
    );
    let gateway = Gateway::start(&text).await;

    let mut senders = Vec::new();
    for _ in 0..8 {
        let mut sender = Device::connect(ports.devices()).await.expect("connect");
        sender
            .send_raw(&vec![b'x'; 60 * 1024])
            .await
            .expect("send a partial line");
        senders.push(sender);
    }
    let refused = gateway
        .wait_metric(
            "fieldgate_refused_connections_total",
            &[("source", "devices"), ("reason", "partial_frame_budget")],
            Duration::from_secs(10),
            |count| count >= 1.0,
        )
        .await;
    assert!(refused < 8.0, "every connection was refused: {refused}");
    let mut refused_codes = 0;
    for sender in &mut senders {
        if error_code(sender, Duration::from_millis(500))
            .await
            .as_deref()
            == Some("partial_frame_budget")
        {
            refused_codes += 1;
        }
    }
    assert!(
        refused_codes >= 1,
        "no connection was told why it was closed"
    );
    // Every connection ends: the budget comes back, and new large frames fit again.
    drop(senders);
    let stored = eventually_async(Duration::from_secs(15), || async {
        let mut sender = Device::connect(ports.devices()).await.ok()?;
        let line = format!(
            "{}\n",
            json!({"device": "dev-after", "pad": "z".repeat(60 * 1024)})
        );
        sender.send_raw(line.as_bytes()).await.ok()?;
        eventually(Duration::from_secs(2), || {
            stored_events(&gateway.data_dir)
                .into_iter()
                .find(|event| event["device"] == "dev-after")
        })
        .await
    })
    .await;
    assert!(
        stored.is_some(),
        "the budget was not returned after the burst"
    );
    assert!(
        gateway.stderr().contains("partial_frame_budget"),
        "{}",
        gateway.stderr_tail(20)
    );
}

/// The gateway started under `prlimit --nofile=LIMIT` (the harness's [`Gateway`] cannot
/// lower a child's limit before it starts); killed on drop.
struct LimitedGateway {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl LimitedGateway {
    async fn start(config: &str, api: SocketAddr, nofile: u32) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        let config = config.replacen(
            "[gateway]\n",
            &format!(
                "[gateway]\ndata_dir = {:?}\n",
                data_dir.display().to_string()
            ),
            1,
        );
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, config).expect("write config");
        let log = std::fs::File::create(dir.path().join("stderr.log")).expect("log file");
        let child = std::process::Command::new("prlimit")
            .arg(format!("--nofile={nofile}:{nofile}"))
            .arg(common::fieldgate_bin())
            .arg("run")
            .arg("--config")
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn prlimit fieldgate");
        let mut gateway = Self { child, dir };
        let ready = eventually_async(Duration::from_secs(30), || async {
            matches!(common::http_get(api, "/readyz").await, Ok((200, _))).then_some(())
        })
        .await;
        assert!(ready.is_some(), "not ready:\n{}", gateway.stderr());
        assert!(gateway.child.try_wait().ok().flatten().is_none(), "exited");
        gateway
    }

    fn data_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    fn stderr_tail(&self, lines: usize) -> String {
        let text = self.stderr();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for LimitedGateway {
    fn drop(&mut self) {
        let _killed = self.child.kill();
        let _reaped = self.child.wait();
    }
}

/// Finding 8: under a 300-descriptor limit, 500 slow-header connections to the HTTP port
/// are refused beyond the descriptor reserve and cut off after the header timeout, while a
/// device still connects and its events are still stored; no accept fails for lack of
/// descriptors. Every limit is at its default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_8_http_flood_leaves_devices_and_buffers_working() {
    let ports = Ports::new();
    let text = config(&ports, "", "ack = true", "\"devices\"", "");
    let api_addr: SocketAddr = ([127, 0, 0, 1], ports.api).into();
    let gateway = LimitedGateway::start(&text, api_addr, 300).await;

    let mut slow = Vec::new();
    for _ in 0..500 {
        let mut stream = TcpStream::connect(api_addr)
            .await
            .expect("connect to the API");
        // A request line and one header, never the blank line that ends them.
        let _sent = stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await;
        slow.push(stream);
    }

    // Devices still connect, and their events still reach the disk buffer and the sink.
    let mut device = Device::connect(ports.devices())
        .await
        .expect("device connects");
    device
        .send_json(&json!({"type": "hello", "device": "dev-flood"}))
        .await
        .expect("send hello");
    let welcome = device.read_json(Duration::from_secs(10)).await;
    assert!(
        matches!(&welcome, Ok(Some(frame)) if frame["type"] == "welcome"),
        "no welcome during the flood: {welcome:?}\n{}",
        gateway.stderr_tail(20)
    );
    for seq in 1..=20u64 {
        device
            .send_json(&json!({"seq": seq, "temp": 20}))
            .await
            .expect("send");
    }
    let mut acked = 0;
    while acked < 20 {
        let frame = device
            .read_json(Duration::from_secs(10))
            .await
            .expect("an ack in time")
            .expect("device connection open");
        assert_eq!(frame["type"], "ack", "{frame}");
        acked += 1;
    }
    let stored = eventually(Duration::from_secs(10), || {
        let count = stored_events(&gateway.data_dir())
            .iter()
            .filter(|event| event["device"] == "dev-flood" && event["kind"] == "telemetry")
            .count();
        (count == 20).then_some(count)
    })
    .await;
    assert_eq!(stored, Some(20), "events not stored during the flood");

    // The slow connections are cut off after the header timeout (10 s by default).
    let mut cut = 0;
    for stream in &mut slow {
        let mut buf = [0u8; 512];
        match tokio::time::timeout(Duration::from_secs(15), stream.read(&mut buf)).await {
            Ok(_) => cut += 1,
            Err(_) => break,
        }
    }
    assert_eq!(cut, slow.len(), "slow-header connections stayed open");
    drop(slow);
    let metrics = eventually_async(Duration::from_secs(10), || async {
        common::http_get(api_addr, "/metrics")
            .await
            .ok()
            .map(|(_, body)| body)
    })
    .await
    .expect("metrics after the flood");
    let refused = |reason: &str| {
        common::find_metric(
            &metrics,
            "fieldgate_refused_connections_total",
            &[("source", "api"), ("reason", reason)],
        )
        .unwrap_or(0.0)
    };
    assert!(
        refused("fd_reserve") > 0.0,
        "no API connection refused for the FD reserve"
    );
    assert!(
        refused("header_timeout") > 0.0,
        "no API connection cut for its headers"
    );
    let log = gateway.stderr();
    assert!(
        !log.contains("Too many open files") && !log.contains("sync failed"),
        "descriptors ran out:\n{}",
        gateway.stderr_tail(20)
    );
}

/// Finding 8, the other HTTP bounds: beyond `api.max_connections` a connection is closed at
/// once, and a connection with no traffic for `api.idle_timeout` (slow headers or a stalled
/// body) is closed; both counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_8_api_connection_cap_and_idle_timeout() {
    let ports = Ports::new();
    let text = config(
        &ports,
        "max_connections = 4\nidle_timeout = \"1s\"\nheader_timeout = \"5s\"",
        "auth = \"registry\"",
        "\"devices\", \"http\"",
        "[registry]\n",
    );
    let gateway = Gateway::start(&text).await;
    let api_addr = gateway.api;
    let (_, jwt) = add_device(api_addr, "dev-slow").await;

    // A stalled body: headers complete, 10 of 100 bytes sent.
    let mut stalled = TcpStream::connect(api_addr).await.expect("connect");
    let request = format!(
        "POST /api/v1/devices/dev-slow/telemetry HTTP/1.1\r\nHost: t\r\n\
         Authorization: Bearer {jwt}\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n{{\"temp\": 1"
    );
    stalled.write_all(request.as_bytes()).await.expect("send");
    let mut slow = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(api_addr).await.expect("connect");
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .expect("send");
        slow.push(stream);
    }
    // The fifth is over the cap: closed at once, without an answer.
    let mut over = TcpStream::connect(api_addr).await.expect("connect");
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_millis(800), over.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "a connection over max_connections was kept: {read:?}"
    );
    // The idle ones are cut after about a second, long before the 5 s header timeout.
    let started = Instant::now();
    for stream in slow.iter_mut().chain(std::iter::once(&mut stalled)) {
        let read = tokio::time::timeout(Duration::from_secs(4), stream.read(&mut buf)).await;
        assert!(read.is_ok(), "an idle API connection stayed open");
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    gateway
        .wait_metric(
            "fieldgate_refused_connections_total",
            &[("source", "api"), ("reason", "idle_timeout")],
            Duration::from_secs(5),
            |count| count >= 4.0,
        )
        .await;
    gateway
        .wait_metric(
            "fieldgate_refused_connections_total",
            &[("source", "api"), ("reason", "max_connections")],
            Duration::from_secs(5),
            |count| count >= 1.0,
        )
        .await;
}

/// Finding 12 (network side): a device may not publish `"kind":"status"` over TCP or HTTP
/// (the gateway's word; refused, named and counted), HTTP telemetry without a JSON
/// Content-Type is 415, and a 404 does not echo a 10 kB path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_12_status_kind_content_type_and_long_paths() {
    let ports = Ports::new();
    let text = config(
        &ports,
        "",
        "auth = \"registry\"",
        "\"devices\", \"http\"",
        "[registry]\n",
    );
    let gateway = Gateway::start(&text).await;
    let api_addr = gateway.api;
    let (secret, jwt) = add_device(api_addr, "dev-s").await;

    let mut device = Device::connect(ports.devices()).await.expect("connect");
    assert_eq!(
        hello(&mut device, "dev-s", &secret).await["type"],
        "welcome"
    );
    device
        .send_json(&json!({"kind": "status", "status": "online"}))
        .await
        .expect("send");
    assert_eq!(
        error_code(&mut device, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("reserved_kind")
    );
    gateway
        .wait_metric(
            "fieldgate_protocol_parse_failures_total",
            &[("source", "devices"), ("reason", "reserved_kind")],
            Duration::from_secs(5),
            |count| count >= 1.0,
        )
        .await;

    let post = |content_type: Option<&str>, body: &str| {
        let header = content_type
            .map(|value| format!("Content-Type: {value}\r\n"))
            .unwrap_or_default();
        format!(
            "POST /api/v1/devices/dev-s/telemetry HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {jwt}\r\n\
             {header}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let (status, _, problem) = raw_request(api_addr, post(None, r#"{"t":1}"#).as_bytes()).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (415, Some("unsupported_media_type"))
    );
    let (status, _, _) =
        raw_request(api_addr, post(Some("text/plain"), r#"{"t":1}"#).as_bytes()).await;
    assert_eq!(status, 415);
    let (status, _, problem) = raw_request(
        api_addr,
        post(
            Some("application/json"),
            r#"{"kind":"status","status":"online"}"#,
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (400, Some("reserved_kind")),
        "{problem}"
    );
    let (status, _, _) = raw_request(
        api_addr,
        post(Some("application/json; charset=utf-8"), r#"{"t":1}"#).as_bytes(),
    )
    .await;
    assert_eq!(status, 202);
    gateway
        .wait_metric(
            "fieldgate_protocol_parse_failures_total",
            &[("source", "http"), ("reason", "reserved_kind")],
            Duration::from_secs(5),
            |count| count >= 1.0,
        )
        .await;

    let long = "a".repeat(10 * 1024);
    let request = format!(
        "GET /api/v1/devices/{long} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {ADMIN}\r\n\
         Connection: close\r\n\r\n"
    );
    let (status, raw, problem) = raw_request(api_addr, request.as_bytes()).await;
    assert_eq!(status, 404, "{problem}");
    assert!(raw.len() < 1024, "the 404 is {} bytes long", raw.len());
    assert!(
        !gateway.stderr().contains(&"a".repeat(300)),
        "the log echoes the long path"
    );
}
