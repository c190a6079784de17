//! Black-box test harness: a real mosquitto, the built `fieldgate` binary, an MQTT
//! subscriber on the upstream broker and TCP devices speaking the device protocol.
//!
//! Every child process is killed on drop; every wait has a deadline; nothing sleeps to
//! synchronise (the short pauses below are poll intervals inside deadline-bound waits).
#![allow(dead_code)]

pub mod fake_broker;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

/// Default deadline for a wait in these tests.
pub const WAIT: Duration = Duration::from_secs(30);

/// Interval between two checks of a polled condition.
const POLL: Duration = Duration::from_millis(20);

/// A free TCP port on 127.0.0.1 (bound to port 0, read back, released).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

/// Polls `check` until it returns `Some`, or `None` once `limit` has passed.
pub async fn eventually<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Like [`eventually`] for an asynchronous check.
pub async fn eventually_async<T, F, Fut>(limit: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until `addr` accepts TCP connections, up to `limit`.
pub async fn wait_port_open(addr: SocketAddr, limit: Duration) -> bool {
    eventually_async(limit, || async move {
        match timeout(Duration::from_secs(1), TcpStream::connect(addr)).await {
            Ok(Ok(_)) => Some(()),
            _ => None,
        }
    })
    .await
    .is_some()
}

/// The last `lines` lines of a text file (empty when it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn signal(pid: u32, name: &str) {
    // The shell's builtin `kill`: no dependency on a procps binary.
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -{name} {pid}"))
        .status()
        .expect("run sh -c kill");
    assert!(status.success(), "kill -{name} {pid} failed: {status}");
}

/// SIGKILL (a no-op for a child that already exited) and reap.
fn kill_and_reap(child: &mut Child) {
    if let Err(err) = child.kill() {
        eprintln!("kill {}: {err}", child.id());
    }
    if let Err(err) = child.wait() {
        eprintln!("wait {}: {err}", child.id());
    }
}

/// Waits for `child` to exit, up to `limit`.
async fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    eventually(limit, || child.try_wait().ok().flatten()).await
}

// ---------------------------------------------------------------------------------------
// mosquitto
// ---------------------------------------------------------------------------------------

/// A TLS listener of the test broker.
#[derive(Clone, Debug)]
pub struct BrokerTls {
    /// Port of the TLS listener.
    pub port: u16,
    /// CA file (clients' certificates are checked against it).
    pub ca: PathBuf,
    /// Server certificate.
    pub cert: PathBuf,
    /// Server key.
    pub key: PathBuf,
    /// Mutual TLS.
    pub require_certificate: bool,
}

/// How to run a test broker.
#[derive(Clone, Debug, Default)]
pub struct BrokerOptions {
    /// Optional TLS listener beside the plain one.
    pub tls: Option<BrokerTls>,
    /// Keep sessions and retained messages across `stop()`/`start_again()`
    /// (saved on the SIGTERM that `stop()` sends).
    pub persistence: bool,
}

/// A mosquitto child process on 127.0.0.1.
pub struct Mosquitto {
    /// Port of the plain listener.
    pub port: u16,
    options: BrokerOptions,
    /// Extra lines for mosquitto.conf (global options such as `max_packet_size`).
    extra_conf: String,
    dir: TempDir,
    child: Option<Child>,
}

impl Mosquitto {
    /// Starts mosquitto with a plain listener on `port`, persistence off.
    pub async fn start(port: u16) -> Self {
        Self::start_with(port, BrokerOptions::default()).await
    }

    /// Starts mosquitto with `options`.
    pub async fn start_with(port: u16, options: BrokerOptions) -> Self {
        Self::start_with_conf(port, options, "").await
    }

    /// Starts mosquitto with `options` and `extra` global lines in its config file
    /// (e.g. `"max_packet_size 4000"`).
    pub async fn start_with_conf(port: u16, options: BrokerOptions, extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("mosquitto tempdir");
        let mut broker = Mosquitto {
            port,
            options,
            extra_conf: extra.to_string(),
            dir,
            child: None,
        };
        broker.write_conf();
        broker.start_again().await;
        broker
    }

    fn conf_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.conf")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.log")
    }

    fn write_conf(&self) {
        let dir = self.dir.path().display();
        let mut conf = String::new();
        conf.push_str("per_listener_settings false\nallow_anonymous true\n");
        // Running as root, mosquitto would switch to the `mosquitto` user and lose access
        // to the files in our temporary directory.
        if is_root() {
            conf.push_str("user root\n");
        }
        if self.options.persistence {
            conf.push_str(&format!(
                "persistence true\npersistence_location {dir}/\nautosave_interval 0\n"
            ));
        } else {
            conf.push_str("persistence false\n");
        }
        conf.push_str(&format!(
            "log_dest file {}\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\nconnection_messages true\n",
            self.log_path().display()
        ));
        // Unlimited queue for offline persistent subscribers (the default drops past 1000).
        conf.push_str("max_queued_messages 0\n");
        for line in self.extra_conf.lines() {
            conf.push_str(line);
            conf.push('\n');
        }
        conf.push_str(&format!("listener {} 127.0.0.1\n", self.port));
        if let Some(tls) = &self.options.tls {
            conf.push_str(&format!(
                "listener {} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {}\n",
                tls.port,
                tls.ca.display(),
                tls.cert.display(),
                tls.key.display(),
                tls.require_certificate
            ));
        }
        std::fs::write(self.conf_path(), conf).expect("write mosquitto.conf");
    }

    /// Starts the broker again on the same port(s), after `stop()` or `kill()`.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "mosquitto already running");
        let log = File::create(self.dir.path().join("mosquitto.out")).expect("mosquitto.out");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(self.conf_path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("spawn mosquitto (is it installed? scripts/test.sh installs it)");
        self.child = Some(child);
        let mut ports = vec![self.port];
        if let Some(tls) = &self.options.tls {
            ports.push(tls.port);
        }
        for port in ports {
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let up = wait_port_open(addr, WAIT).await;
            let exited_now = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if !up || exited_now.is_some() {
                panic!(
                    "mosquitto did not listen on {addr} within {WAIT:?} (exit: {exited_now:?})\n{}\n{}",
                    tail(&self.dir.path().join("mosquitto.out"), 20),
                    tail(&self.log_path(), 20)
                );
            }
        }
    }

    /// Stops the broker with SIGTERM (so persistence is saved), SIGKILL after 10 s.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "TERM");
            if wait_exit(&mut child, Duration::from_secs(10))
                .await
                .is_none()
            {
                kill_and_reap(&mut child);
            }
        }
    }

    /// Kills the broker with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }

    /// The broker's log, last `lines` lines.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path(), lines)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- mosquitto (port {}) log tail ----\n{}",
                self.port,
                self.log_tail(30)
            );
        }
        self.kill();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------
// gateway
// ---------------------------------------------------------------------------------------

/// Path of the built gateway binary.
pub fn fieldgate_bin() -> &'static str {
    env!("CARGO_BIN_EXE_fieldgate")
}

/// Plain HTTP/1.0 GET; returns status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let io = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = timeout(Duration::from_secs(5), io)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "http timeout"))??;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad HTTP response: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// An HTTP/1.1 response read to EOF: its status (0 when unreadable), its head, and its body
/// as JSON (`Null` when it is not JSON; a chunked body is undone first).
pub fn parse_http_response(response: &[u8]) -> (u16, String, Value) {
    let text = String::from_utf8_lossy(response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let json = serde_json::from_str(body)
        .or_else(|_| serde_json::from_str(&dechunk(body)))
        .unwrap_or(Value::Null);
    (status, head.to_owned(), json)
}

/// Undoes `Transfer-Encoding: chunked` (best effort).
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || tail.len() < size {
            break;
        }
        out.push_str(&tail[..size]);
        rest = tail[size..].trim_start_matches("\r\n");
    }
    out
}

/// An HTTP/1.1 request (`Connection: close`, JSON body, optional bearer token).
pub fn http_request(
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&Value>,
) -> String {
    let body = body.map(Value::to_string).unwrap_or_default();
    let auth = bearer
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Sends raw request bytes to `addr` and reads the answer to EOF, within 10 s; returns the
/// status, the whole response text and the JSON body.
pub async fn raw_http(addr: SocketAddr, request: &[u8]) -> (u16, String, Value) {
    let mut stream = TcpStream::connect(addr).await.expect("connect to the API");
    exchange(&mut stream, request).await
}

/// Writes `request` on `stream` and reads the answer to EOF, within 10 s; returns the
/// status, the whole response text and the JSON body.
pub async fn exchange(stream: &mut TcpStream, request: &[u8]) -> (u16, String, Value) {
    stream.write_all(request).await.expect("send request");
    let mut response = Vec::new();
    timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .expect("API answered in time")
        .expect("read response");
    let (status, _, json) = parse_http_response(&response);
    (
        status,
        String::from_utf8_lossy(&response).into_owned(),
        json,
    )
}

/// One API request with a JSON body and an optional bearer token; returns the status and
/// the JSON body.
pub async fn api_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value) {
    let request = http_request(method, path, bearer, body);
    let (status, _, json) = raw_http(addr, request.as_bytes()).await;
    (status, json)
}

/// One sample of a Prometheus text exposition.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// Parses every sample of a Prometheus text exposition.
pub fn parse_samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = line[..name_end].to_string();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if rest.starts_with('{') {
            let mut chars = rest.char_indices().skip(1);
            let mut key = String::new();
            let mut value = String::new();
            let mut in_value = false;
            let mut end = rest.len();
            while let Some((i, c)) = chars.next() {
                if in_value {
                    match c {
                        '\\' => {
                            if let Some((_, escaped)) = chars.next() {
                                value.push(match escaped {
                                    'n' => '\n',
                                    other => other,
                                });
                            }
                        }
                        '"' => {
                            labels.insert(
                                std::mem::take(&mut key).trim().to_string(),
                                std::mem::take(&mut value),
                            );
                            in_value = false;
                        }
                        other => value.push(other),
                    }
                } else {
                    match c {
                        '}' => {
                            end = i + 1;
                            break;
                        }
                        '"' => in_value = true,
                        '=' | ',' => {}
                        other => key.push(other),
                    }
                }
            }
            rest = &rest[end..];
        }
        let Some(value) = rest.split_whitespace().next() else {
            continue;
        };
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => match other.parse() {
                Ok(v) => v,
                Err(_) => continue,
            },
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// The first sample named `name` carrying all of `labels`.
pub fn find_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    matching(text, name, labels).first().map(|s| s.value)
}

/// The sum of all samples named `name` carrying all of `labels` (0 when none).
pub fn sum_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    matching(text, name, labels).iter().map(|s| s.value).sum()
}

fn matching(text: &str, name: &str, labels: &[(&str, &str)]) -> Vec<Sample> {
    parse_samples(text)
        .into_iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

/// Builds a gateway config with one TCP source `devices` and one MQTT sink `cloud`.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// API port.
    pub api_port: u16,
    /// TCP device port.
    pub device_port: u16,
    /// Upstream broker port.
    pub mqtt_port: u16,
    /// Extra lines in `[sources.devices]`.
    pub source: Vec<String>,
    /// Extra lines in `[sinks.cloud]` (may override the defaults below).
    pub sink: Vec<String>,
    /// Extra lines in `[sinks.cloud.buffer]`.
    pub buffer: Vec<String>,
    /// Raw TOML appended at the end (sub-tables).
    pub tail: String,
}

impl GatewayConfig {
    /// A config on fresh free ports for the gateway, pointing at `mqtt_port`.
    pub fn new(mqtt_port: u16) -> Self {
        GatewayConfig {
            api_port: free_port(),
            device_port: free_port(),
            mqtt_port,
            source: Vec::new(),
            sink: Vec::new(),
            buffer: Vec::new(),
            tail: String::new(),
        }
    }

    /// Adds a line to `[sources.devices]`.
    pub fn source(mut self, line: &str) -> Self {
        self.source.push(line.to_string());
        self
    }

    /// Adds a line to `[sinks.cloud]`.
    pub fn sink(mut self, line: &str) -> Self {
        self.sink.push(line.to_string());
        self
    }

    /// Adds a line to `[sinks.cloud.buffer]`.
    pub fn buffer(mut self, line: &str) -> Self {
        self.buffer.push(line.to_string());
        self
    }

    /// Appends raw TOML at the end.
    pub fn tail(mut self, text: &str) -> Self {
        self.tail.push_str(text);
        self.tail.push('\n');
        self
    }

    /// Address of the device listener.
    pub fn device_addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.device_port).into()
    }

    /// The TOML text.
    pub fn render(&self) -> String {
        let sink_keys: Vec<&str> = self
            .sink
            .iter()
            .filter_map(|l| l.split('=').next().map(str::trim))
            .collect();
        let mut sink = vec![
            "type = \"mqtt\"".to_string(),
            "inputs = [\"devices\"]".to_string(),
        ];
        let defaults = [
            ("url", format!("\"mqtt://127.0.0.1:{}\"", self.mqtt_port)),
            ("keep_alive", "\"5s\"".to_string()),
            ("reconnect_min", "\"100ms\"".to_string()),
            ("reconnect_max", "\"1s\"".to_string()),
        ];
        for (key, value) in defaults {
            if !sink_keys.contains(&key) {
                sink.push(format!("{key} = {value}"));
            }
        }
        sink.extend(self.sink.iter().cloned());
        let mut buffer = vec!["type = \"disk\"".to_string()];
        buffer.extend(self.buffer.iter().cloned());
        let framing = if self
            .source
            .iter()
            .any(|l| l.trim_start().starts_with("framing"))
        {
            ""
        } else {
            "framing = \"lines\"\n"
        };
        format!(
            "[gateway]\nid = \"gw-1\"\nshutdown_grace = \"5s\"\n\n[api]\naddress = \"127.0.0.1:{api}\"\n\n\
             [sources.devices]\ntype = \"tcp\"\naddress = \"127.0.0.1:{dev}\"\n{framing}{source}\n\n\
             [sinks.cloud]\n{sink}\n\n[sinks.cloud.buffer]\n{buffer}\n\n{tail}",
            api = self.api_port,
            dev = self.device_port,
            source = self.source.join("\n"),
            sink = sink.join("\n"),
            buffer = buffer.join("\n"),
            tail = self.tail,
        )
    }
}

/// How to run the gateway: the binary, a program to run it under (qemu-user) and extra
/// environment variables.
#[derive(Clone, Debug, Default)]
pub struct Launch {
    /// The gateway binary; the one cargo built when `None`.
    pub binary: Option<PathBuf>,
    /// Runs `PREFIX... BINARY run --config FILE` (e.g. `qemu-aarch64-static`).
    pub prefix: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// More arguments after `run --config FILE` (`--watch`).
    pub args: Vec<String>,
}

/// The gateway binary running as a child process.
pub struct Gateway {
    dir: TempDir,
    config_path: PathBuf,
    /// The gateway's data directory (inside its temporary directory).
    pub data_dir: PathBuf,
    /// The API address (from `[api] address`).
    pub api: SocketAddr,
    stderr_path: PathBuf,
    child: Option<Child>,
    runs: u32,
    launch: Launch,
}

impl Gateway {
    /// Writes `config` (with `data_dir` set inside a temporary directory), runs
    /// `fieldgate run --config FILE` and waits until `/readyz` answers 200.
    pub async fn start(config: &str) -> Self {
        let mut gateway = Self::spawn(config);
        gateway.wait_ready().await;
        gateway
    }

    /// Like [`Gateway::start`], with more arguments after `run --config FILE`.
    pub async fn start_with_args(config: &str, args: &[&str]) -> Self {
        let mut gateway = Self::spawn_with_args(config, args);
        gateway.wait_ready().await;
        gateway
    }

    /// Like [`Gateway::start`] without waiting for readiness.
    pub fn spawn(config: &str) -> Self {
        Self::spawn_with(config, Launch::default())
    }

    /// Like [`Gateway::spawn`], with more arguments after `run --config FILE`.
    pub fn spawn_with_args(config: &str, args: &[&str]) -> Self {
        Self::spawn_with(
            config,
            Launch {
                args: args.iter().map(|arg| (*arg).to_owned()).collect(),
                ..Launch::default()
            },
        )
    }

    /// Like [`Gateway::spawn`], run as `launch` says.
    pub fn spawn_with(config: &str, launch: Launch) -> Self {
        let dir = tempfile::tempdir().expect("gateway tempdir");
        let data_dir = dir.path().join("data");
        let config = with_data_dir(config, &data_dir);
        let table: toml::Table = toml::from_str(&config).expect("test config parses as TOML");
        let api = table
            .get("api")
            .and_then(|api| api.get("address"))
            .and_then(|a| a.as_str())
            .expect("test config needs [api] address")
            .parse()
            .expect("api address");
        let config_path = dir.path().join("fieldgate.toml");
        std::fs::write(&config_path, config).expect("write config");
        let stderr_path = dir.path().join("stderr.log");
        let mut gateway = Gateway {
            dir,
            config_path,
            data_dir,
            api,
            stderr_path,
            child: None,
            runs: 0,
            launch,
        };
        gateway.spawn_child();
        gateway
    }

    fn spawn_child(&mut self) {
        assert!(self.child.is_none(), "gateway already running");
        self.runs += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .expect("open stderr log");
        writeln!(log, "===== fieldgate run #{} =====", self.runs).expect("write log");
        let binary = self
            .launch
            .binary
            .clone()
            .unwrap_or_else(|| PathBuf::from(fieldgate_bin()));
        let mut command = match self.launch.prefix.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        let child = command
            .envs(self.launch.env.iter().cloned())
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .args(&self.launch.args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn fieldgate");
        self.child = Some(child);
    }

    /// Waits until `/readyz` answers 200; panics with the stderr tail otherwise.
    pub async fn wait_ready(&mut self) {
        let api = self.api;
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok((200, _)) = http_get(api, "/readyz").await {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "fieldgate exited before it was ready: {status}\n{}",
                    self.stderr_tail(40)
                );
            }
            assert!(
                Instant::now() < deadline,
                "fieldgate /readyz on {api} not 200 within {WAIT:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Process id of the running gateway.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("gateway running").id()
    }

    /// Replaces the config file (with `data_dir` set as at start), for a reload.
    pub fn rewrite_config(&self, config: &str) {
        let config = with_data_dir(config, &self.data_dir);
        let staged = self.config_path.with_extension("new");
        std::fs::write(&staged, config).expect("write config");
        // Replaced in one step, as editors and config managers do.
        std::fs::rename(&staged, &self.config_path).expect("replace config");
    }

    /// The config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }

    /// SIGTERM; waits (up to 30 s) for the exit status.
    pub async fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("gateway running");
        signal(child.id(), "TERM");
        match wait_exit(&mut child, WAIT).await {
            Some(status) => status,
            None => {
                kill_and_reap(&mut child);
                panic!(
                    "fieldgate did not exit within {WAIT:?} of SIGTERM\n{}",
                    self.stderr_tail(40)
                );
            }
        }
    }

    /// Runs the gateway again with the same config and data dir; waits until ready.
    pub async fn restart(&mut self) {
        self.spawn_child();
        self.wait_ready().await;
    }

    /// Whether the child has exited (reaping it if so).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// GET /metrics.
    pub async fn metrics(&self) -> String {
        match http_get(self.api, "/metrics").await {
            Ok((200, body)) => body,
            other => panic!("GET /metrics failed: {other:?}"),
        }
    }

    /// One sample of /metrics.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        find_metric(&self.metrics().await, name, labels)
    }

    /// Waits until the metric's value satisfies `pred`; returns it.
    pub async fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        limit: Duration,
        pred: impl Fn(f64) -> bool,
    ) -> f64 {
        let found = eventually_async(limit, || async {
            let text = http_get(self.api, "/metrics").await.ok()?.1;
            find_metric(&text, name, labels).filter(|v| pred(*v))
        })
        .await;
        match found {
            Some(v) => v,
            None => {
                let current = http_get(self.api, "/metrics")
                    .await
                    .map(|(_, body)| {
                        body.lines()
                            .filter(|l| l.starts_with(name))
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .unwrap_or_default();
                panic!(
                    "metric {name}{labels:?} did not reach the expected value within {limit:?}; now:\n{current}"
                )
            }
        }
    }

    /// Everything the gateway wrote to stderr, all runs.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The last `lines` lines of stderr.
    pub fn stderr_tail(&self, lines: usize) -> String {
        tail(&self.stderr_path, lines)
    }

    /// Segment files of a sink's lane, sorted.
    pub fn segments(&self, sink: &str, lane: &str) -> Vec<PathBuf> {
        let dir = self.data_dir.join("buffers").join(sink).join(lane);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "seg"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- fieldgate stderr tail ({}) ----\n{}",
                self.stderr_path.display(),
                self.stderr_tail(60)
            );
        }
        self.kill9();
    }
}

/// Inserts `data_dir = "..."` into the `[gateway]` table (unless it already has one).
fn with_data_dir(config: &str, data_dir: &Path) -> String {
    let mut out = String::new();
    let has_data_dir = config
        .lines()
        .any(|l| l.trim_start().starts_with("data_dir"));
    for line in config.lines() {
        out.push_str(line);
        out.push('\n');
        if line.trim() == "[gateway]" && !has_data_dir {
            out.push_str(&format!(
                "data_dir = {:?}\n",
                data_dir.display().to_string()
            ));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// MQTT subscriber
// ---------------------------------------------------------------------------------------

/// A publish received by a [`Subscriber`].
#[derive(Clone, Debug)]
pub struct Msg {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// Retain flag as delivered.
    pub retain: bool,
}

impl Msg {
    /// The payload as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// The payload parsed as JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.payload).ok()
    }
}

/// An MQTT client on the upstream broker collecting every publish it receives.
pub struct Subscriber {
    client: AsyncClient,
    messages: Arc<Mutex<Vec<Msg>>>,
    subacks: Arc<AtomicUsize>,
    connected: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

static CLIENT_SEQ: AtomicU64 = AtomicU64::new(0);

impl Subscriber {
    /// Subscribes to `gateways/#` at QoS 1 with a clean session.
    pub async fn connect(port: u16) -> Self {
        Self::connect_with(port, "gateways/#", None).await
    }

    /// Subscribes to `filter` at QoS 1; a `session` client id makes the session
    /// persistent (clean session off), so it survives a broker restart with persistence.
    pub async fn connect_with(port: u16, filter: &str, session: Option<&str>) -> Self {
        let client_id = match session {
            Some(id) => id.to_string(),
            None => format!(
                "test-sub-{}-{}",
                std::process::id(),
                CLIENT_SEQ.fetch_add(1, Ordering::Relaxed)
            ),
        };
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(5));
        options.set_clean_session(session.is_none());
        options.set_max_packet_size(16 * 1024 * 1024, 16 * 1024 * 1024);
        let (client, mut eventloop) = AsyncClient::new(options, 1000);
        let messages = Arc::new(Mutex::new(Vec::new()));
        let subacks = Arc::new(AtomicUsize::new(0));
        let connected = Arc::new(AtomicBool::new(false));
        let task = {
            let client = client.clone();
            let messages = Arc::clone(&messages);
            let subacks = Arc::clone(&subacks);
            let connected = Arc::clone(&connected);
            let filter = filter.to_string();
            tokio::spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                            connected.store(true, Ordering::SeqCst);
                            if !ack.session_present {
                                client
                                    .try_subscribe(filter.clone(), QoS::AtLeastOnce)
                                    .expect("queue subscribe");
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            subacks.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            messages.lock().expect("lock").push(Msg {
                                topic: p.topic.clone(),
                                payload: p.payload.clone(),
                                retain: p.retain,
                            });
                        }
                        Ok(_) => {}
                        Err(_) => {
                            connected.store(false, Ordering::SeqCst);
                            // Reconnect backoff while the broker is away.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            })
        };
        let subscriber = Subscriber {
            client,
            messages,
            subacks,
            connected,
            task,
        };
        let subacks = Arc::clone(&subscriber.subacks);
        assert!(
            eventually(WAIT, || (subacks.load(Ordering::SeqCst) > 0).then_some(()))
                .await
                .is_some(),
            "subscriber on port {port} got no SUBACK within {WAIT:?}"
        );
        subscriber
    }

    /// A copy of every message received so far.
    pub fn messages(&self) -> Vec<Msg> {
        self.messages.lock().expect("lock").clone()
    }

    /// Messages received since `cursor` (advancing it).
    pub fn take_new(&self, cursor: &mut usize) -> Vec<Msg> {
        let messages = self.messages.lock().expect("lock");
        let new = messages[(*cursor).min(messages.len())..].to_vec();
        *cursor = messages.len();
        new
    }

    /// Number of messages received so far.
    pub fn count(&self) -> usize {
        self.messages.lock().expect("lock").len()
    }

    /// Whether the client is connected now.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// Waits until `pred` holds for the received messages; false on timeout.
    pub async fn wait_until(&self, limit: Duration, mut pred: impl FnMut(&[Msg]) -> bool) -> bool {
        eventually(limit, || {
            let messages = self.messages.lock().expect("lock");
            pred(&messages).then_some(())
        })
        .await
        .is_some()
    }

    /// Publishes (QoS 1).
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>, retain: bool) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .expect("publish");
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Objects carried by a message: the envelope's `payload` (or the raw object), for a
/// single message or each element of a batch.
pub fn device_objects(msg: &Msg) -> Vec<Value> {
    let Some(value) = msg.json() else {
        return Vec::new();
    };
    let items = match value {
        Value::Array(items) => items,
        other => vec![other],
    };
    items
        .into_iter()
        .map(|item| {
            let is_envelope = item.get("received_at").is_some() && item.get("payload").is_some();
            if is_envelope {
                item.get("payload").cloned().unwrap_or(Value::Null)
            } else {
                item
            }
        })
        .collect()
}

/// Per-device sequence numbers, in arrival order, of test messages
/// (objects with "device" and "seq"), from the given messages.
pub fn seqs_by_device<'a>(msgs: impl IntoIterator<Item = &'a Msg>) -> HashMap<String, Vec<u64>> {
    let mut out: HashMap<String, Vec<u64>> = HashMap::new();
    for msg in msgs {
        for object in device_objects(msg) {
            if let (Some(device), Some(seq)) = (
                object.get("device").and_then(Value::as_str),
                object.get("seq").and_then(Value::as_u64),
            ) {
                out.entry(device.to_string()).or_default().push(seq);
            }
        }
    }
    out
}

/// Incrementally collects test messages from a subscriber, per device.
#[derive(Default)]
pub struct Collector {
    cursor: usize,
    /// Seqs per device in arrival order (with duplicates).
    pub arrivals: HashMap<String, Vec<u64>>,
    /// Distinct seqs per device.
    pub seen: HashMap<String, BTreeSet<u64>>,
}

impl Collector {
    /// Takes in what arrived since the last call.
    pub fn update(&mut self, sub: &Subscriber) {
        let new = sub.take_new(&mut self.cursor);
        for (device, seqs) in seqs_by_device(&new) {
            let seen = self.seen.entry(device.clone()).or_default();
            seen.extend(seqs.iter().copied());
            self.arrivals.entry(device).or_default().extend(seqs);
        }
    }

    /// Number of distinct (device, seq) pairs.
    pub fn distinct(&self) -> usize {
        self.seen.values().map(BTreeSet::len).sum()
    }

    /// Total arrivals including duplicates.
    pub fn total(&self) -> usize {
        self.arrivals.values().map(Vec::len).sum()
    }

    /// Arrivals minus distinct: the duplicates.
    pub fn duplicates(&self) -> usize {
        self.total() - self.distinct()
    }

    /// Whether every expected seq of every device has arrived.
    pub fn has_all(&self, expected: &HashMap<String, BTreeSet<u64>>) -> bool {
        expected.iter().all(|(device, seqs)| {
            self.seen
                .get(device)
                .is_some_and(|seen| seqs.iter().all(|s| seen.contains(s)))
        })
    }

    /// A description of what is missing (first 10 per device, at most 10 devices).
    pub fn missing(&self, expected: &HashMap<String, BTreeSet<u64>>) -> String {
        let mut out = String::new();
        let mut devices: Vec<&String> = expected.keys().collect();
        devices.sort();
        let mut shown = 0;
        let mut total_missing = 0;
        for device in devices {
            let seen = self.seen.get(device);
            let missing: Vec<u64> = expected[device]
                .iter()
                .copied()
                .filter(|s| !seen.is_some_and(|seen| seen.contains(s)))
                .collect();
            total_missing += missing.len();
            if !missing.is_empty() && shown < 10 {
                shown += 1;
                out.push_str(&format!(
                    "  {device}: {} missing, first {:?}\n",
                    missing.len(),
                    &missing[..missing.len().min(10)]
                ));
            }
        }
        format!("{total_missing} missing in total\n{out}")
    }

    /// Waits until everything in `expected` has arrived; panics with what is missing.
    pub async fn wait_all(
        &mut self,
        sub: &Subscriber,
        expected: &HashMap<String, BTreeSet<u64>>,
        limit: Duration,
    ) {
        let done = eventually(limit, || {
            self.update(sub);
            self.has_all(expected).then_some(())
        })
        .await;
        if done.is_none() {
            self.update(sub);
            panic!(
                "not everything arrived upstream within {limit:?}: {}",
                self.missing(expected)
            );
        }
    }

    /// Devices whose arrivals are not in increasing seq order (ignoring duplicates of
    /// seqs already seen, i.e. replays), with the first violation.
    pub fn order_violations(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (device, seqs) in &self.arrivals {
            let mut max: Option<u64> = None;
            let mut seen = BTreeSet::new();
            for (i, seq) in seqs.iter().enumerate() {
                let first_time = seen.insert(*seq);
                if first_time && max.is_some_and(|m| *seq < m) {
                    out.push(format!(
                        "{device}: seq {seq} arrived after {} (arrival #{i})",
                        max.unwrap_or_default()
                    ));
                    break;
                }
                max = max.max(Some(*seq));
            }
        }
        out.sort();
        out
    }
}

/// Expected seqs: devices `names` each with seqs `1..=count`.
pub fn expected(names: &[String], count: u64) -> HashMap<String, BTreeSet<u64>> {
    names
        .iter()
        .map(|n| (n.clone(), (1..=count).collect()))
        .collect()
}

// ---------------------------------------------------------------------------------------
// devices
// ---------------------------------------------------------------------------------------

/// A device connection speaking the `lines` framing.
pub struct Device<S = TcpStream> {
    reader: BufReader<tokio::io::ReadHalf<S>>,
    writer: tokio::io::WriteHalf<S>,
}

impl Device<TcpStream> {
    /// Connects to the gateway's device listener.
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout"))??;
        stream.set_nodelay(true)?;
        Ok(Device::new(stream))
    }
}

impl<S: AsyncRead + AsyncWrite> Device<S> {
    /// Wraps an established stream.
    pub fn new(stream: S) -> Self {
        let (read, write) = tokio::io::split(stream);
        Device {
            reader: BufReader::new(read),
            writer: write,
        }
    }

    /// Sends one JSON object as a line.
    pub async fn send_json(&mut self, value: &Value) -> std::io::Result<()> {
        let mut line = value.to_string();
        line.push('\n');
        self.send_raw(line.as_bytes()).await
    }

    /// Sends bytes as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes).await?;
        self.writer.flush().await
    }

    /// Reads one line (without the newline); `Ok(None)` on EOF; error on timeout.
    pub async fn read_line(&mut self, limit: Duration) -> std::io::Result<Option<String>> {
        let mut line = String::new();
        let n = timeout(limit, self.reader.read_line(&mut line))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "no line from the gateway")
            })??;
        if n == 0 {
            return Ok(None);
        }
        Ok(Some(line.trim_end_matches(['\r', '\n']).to_string()))
    }

    /// Reads one line and parses it as JSON; `Ok(None)` on EOF.
    pub async fn read_json(&mut self, limit: Duration) -> std::io::Result<Option<Value>> {
        match self.read_line(limit).await? {
            None => Ok(None),
            Some(line) => serde_json::from_str(&line).map(Some).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("gateway sent non-JSON line {line:?}: {e}"),
                )
            }),
        }
    }

    /// Reads frames until one has `"type": kind`; returns it (panics on EOF/timeout).
    pub async fn expect_type(&mut self, kind: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        let mut other = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_json(left).await {
                Ok(Some(frame)) if frame.get("type").and_then(Value::as_str) == Some(kind) => {
                    return frame;
                }
                Ok(Some(frame)) => other.push(frame),
                Ok(None) => panic!("connection closed before a {kind:?} frame; got {other:?}"),
                Err(e) => panic!("no {kind:?} frame within {limit:?} ({e}); got {other:?}"),
            }
        }
    }

    /// Sends a hello and waits for the welcome.
    pub async fn hello(&mut self, device: &str) -> Value {
        self.send_json(&serde_json::json!({"type": "hello", "device": device}))
            .await
            .expect("send hello");
        self.expect_type("welcome", Duration::from_secs(10)).await
    }

    /// Reads until EOF (or error such as a reset); returns the frames read meanwhile.
    /// Panics when the connection is still open after `limit`.
    pub async fn expect_closed(&mut self, limit: Duration) -> Vec<Value> {
        let deadline = Instant::now() + limit;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_line(left).await {
                Ok(None) => return frames,
                Ok(Some(line)) => {
                    frames.push(serde_json::from_str(&line).unwrap_or(Value::String(line)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    panic!("connection still open after {limit:?}; frames so far: {frames:?}")
                }
                Err(_) => return frames,
            }
        }
    }
}

/// A test data message: `{"device": .., "seq": .., "v": ..}` padded with `pad` bytes.
pub fn data_message(device: &str, seq: u64, pad: usize) -> Value {
    serde_json::json!({"device": device, "seq": seq, "temp": 21.5, "pad": "x".repeat(pad)})
}

/// Device names `dev-000`, `dev-001`, ...
pub fn device_names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:03}")).collect()
}

/// What an ack-mode sender achieved.
#[derive(Debug, Default)]
pub struct AckReport {
    /// Seqs the gateway acknowledged.
    pub acked: BTreeSet<u64>,
    /// Seqs the gateway refused with a nack.
    pub nacked: BTreeSet<u64>,
    /// Connections made.
    pub connections: u32,
    /// Messages written (including resends).
    pub sent: u64,
    /// Error frames received.
    pub errors: Vec<Value>,
}

/// A device sending `1..=count` in ack mode with at most `window` unacknowledged, until
/// all are acked or `limit` passes. With `reconnect`, a lost connection is re-established
/// (retrying until the deadline) and everything not acked is sent again.
#[derive(Clone, Debug)]
pub struct AckSender {
    /// Gateway device listener.
    pub addr: SocketAddr,
    /// Device id (in every message).
    pub device: String,
    /// Messages to send, seqs `1..=count`.
    pub count: u64,
    /// Most unacknowledged messages in flight.
    pub window: usize,
    /// Padding bytes per message.
    pub pad: usize,
    /// Acks across senders, for the test to watch.
    pub acks: Arc<AtomicU64>,
    /// Reconnect and resend after a lost connection.
    pub reconnect: bool,
    /// Deadline for the whole run.
    pub limit: Duration,
}

impl AckSender {
    /// Defaults: window 100, pad 32, no reconnect, 60 s.
    pub fn new(addr: SocketAddr, device: &str, count: u64) -> Self {
        AckSender {
            addr,
            device: device.to_string(),
            count,
            window: 100,
            pad: 32,
            acks: Arc::new(AtomicU64::new(0)),
            reconnect: false,
            limit: Duration::from_secs(60),
        }
    }

    /// Runs the sender to completion (or its deadline).
    pub async fn run(self) -> AckReport {
        send_acked(self).await
    }
}

async fn send_acked(sender: AckSender) -> AckReport {
    let AckSender {
        addr,
        device,
        count,
        window,
        pad,
        acks,
        reconnect,
        limit,
    } = sender;
    let deadline = Instant::now() + limit;
    let report = Arc::new(Mutex::new(AckReport::default()));
    while Instant::now() < deadline {
        let done = report.lock().expect("lock").acked.len() as u64 >= count;
        if done {
            break;
        }
        let stream = match timeout(Duration::from_secs(2), TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            _ if reconnect => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            other => panic!("{device}: connect to {addr} failed: {other:?}"),
        };
        stream.set_nodelay(true).expect("TCP_NODELAY");
        let pending: Vec<u64> = {
            let mut r = report.lock().expect("lock");
            r.connections += 1;
            (1..=count).filter(|s| !r.acked.contains(s)).collect()
        };
        let (read, mut write) = stream.into_split();
        let window_sem = Arc::new(tokio::sync::Semaphore::new(window));
        let writer = {
            let window_sem = Arc::clone(&window_sem);
            let report = Arc::clone(&report);
            let device = device.clone();
            tokio::spawn(async move {
                let mut batch = Vec::new();
                for seq in pending {
                    let permit = window_sem.acquire().await.expect("semaphore open");
                    permit.forget();
                    batch.clear();
                    batch.extend_from_slice(data_message(&device, seq, pad).to_string().as_bytes());
                    batch.push(b'\n');
                    if write.write_all(&batch).await.is_err() {
                        return;
                    }
                    report.lock().expect("lock").sent += 1;
                }
                // Keep the write half open until the reader is done.
                std::future::pending::<()>().await;
            })
        };
        let mut lines = BufReader::new(read).lines();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // No ack for 10 s while messages are outstanding: treat as a dead connection.
            let wait = left.min(Duration::from_secs(10));
            match timeout(wait, lines.next_line()).await {
                Ok(Ok(Some(line))) => {
                    let frame: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                    let kind = frame.get("type").and_then(Value::as_str).unwrap_or("");
                    let seq = frame.get("seq").and_then(Value::as_u64);
                    let mut r = report.lock().expect("lock");
                    match (kind, seq) {
                        ("ack", Some(seq)) => {
                            if r.acked.insert(seq) {
                                acks.fetch_add(1, Ordering::SeqCst);
                            }
                            window_sem.add_permits(1);
                        }
                        ("nack", Some(seq)) => {
                            r.nacked.insert(seq);
                            window_sem.add_permits(1);
                        }
                        _ => r.errors.push(frame),
                    }
                    if r.acked.len() as u64 >= count {
                        break;
                    }
                }
                _ => break,
            }
        }
        writer.abort();
        if !reconnect {
            break;
        }
    }
    let mut report = report.lock().expect("lock");
    std::mem::take(&mut *report)
}

// ---------------------------------------------------------------------------------------
// TLS material
// ---------------------------------------------------------------------------------------

/// A CA with a server certificate (SAN 127.0.0.1, localhost) and a client certificate,
/// written as PEM files.
pub struct Pki {
    /// CA certificate (PEM file).
    pub ca: PathBuf,
    /// Server certificate (PEM file).
    pub server_cert: PathBuf,
    /// Server key (PEM file).
    pub server_key: PathBuf,
    /// Client certificate (PEM file).
    pub client_cert: PathBuf,
    /// Client key (PEM file).
    pub client_key: PathBuf,
    /// CA certificate, DER.
    pub ca_der: rustls::pki_types::CertificateDer<'static>,
    /// Client certificate, DER.
    pub client_cert_der: rustls::pki_types::CertificateDer<'static>,
    /// Client key, PKCS#8 DER.
    pub client_key_der: Vec<u8>,
}

impl Pki {
    /// Generates the certificates into `dir`.
    pub fn generate(dir: &Path) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "fieldgate test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca cert");

        let server_key = KeyPair::generate().expect("server key");
        let mut server_params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .expect("server params");
        server_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server_params
            .signed_by(&server_key, &ca)
            .expect("server cert");

        let client_key = KeyPair::generate().expect("client key");
        let mut client_params =
            CertificateParams::new(vec!["gw-1".to_string()]).expect("client params");
        client_params
            .distinguished_name
            .push(DnType::CommonName, "gw-1");
        client_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client_params
            .signed_by(&client_key, &ca)
            .expect("client cert");

        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("write pem");
            path
        };
        Pki {
            ca: write("ca.pem", ca.pem()),
            server_cert: write("server.pem", server_cert.pem()),
            server_key: write("server.key", server_key.serialize_pem()),
            client_cert: write("client.pem", client_cert.pem()),
            client_key: write("client.key", client_key.serialize_pem()),
            ca_der: ca.der().clone(),
            client_cert_der: client_cert.der().clone(),
            client_key_der: client_key.serialize_der(),
        }
    }
}

/// Connects to a TLS device listener, trusting the test CA, optionally with the client
/// certificate (mutual TLS).
pub async fn tls_device(
    addr: SocketAddr,
    pki: &Pki,
    client_cert: bool,
) -> std::io::Result<Device<tokio_rustls::client::TlsStream<TcpStream>>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).expect("add CA");
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots);
    let config = if client_cert {
        builder
            .with_client_auth_cert(
                vec![pki.client_cert_der.clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(
                    rustls::pki_types::PrivatePkcs8KeyDer::from(pki.client_key_der.clone()),
                ),
            )
            .expect("client cert")
    } else {
        builder.with_no_client_auth()
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
    let stream = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timeout")
        })??;
    Ok(Device::new(stream))
}
