//! Local alarm actions end to end against the built binary: one rule with the three
//! action types. A TCP device raises and clears the alarm; a subscriber on the embedded
//! broker receives both; a TCP device `plc-1` receives the `write` command and its
//! `command_result` reaches the sink; a webhook receiver written here answers 500, hangs,
//! closes without answering, then 200 (the action retries and succeeds), and later
//! fails for good (counted, and the error is shown on the alarm by `/api/v1/alarms`).
//! A Modbus PLC (tests/fixtures/modbus_sim.py) that overheats gets its fan coil written
//! by the alarm's `write` command, read back by the next poll. `fieldgate check` refuses an
//! mqtt action without an `mqtt_broker` source.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    Device, Gateway, Subscriber, api_request, eventually, eventually_async, fieldgate_bin,
    free_port,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

const ADMIN: &str = "actions-admin-token";
const WAIT: Duration = Duration::from_secs(20);

struct Layout {
    api: u16,
    devices: u16,
    broker: u16,
    hook: u16,
}

impl Layout {
    fn render(&self, actions: &str, with_broker: bool) -> String {
        let broker = if with_broker {
            format!(
                "[sources.local]\ntype = \"mqtt_broker\"\naddress = \"127.0.0.1:{}\"\n",
                self.broker
            )
        } else {
            String::new()
        };
        let inputs = if with_broker {
            r#"["overheat", "local"]"#
        } else {
            r#"["overheat"]"#
        };
        format!(
            r#"[gateway]
id = "gw-actions"
shutdown_grace = "5s"

[api]
address = "127.0.0.1:{api}"
admin_token = "{ADMIN}"

[sources.devices]
type = "tcp"
address = "127.0.0.1:{devices}"
framing = "lines"

{broker}
[transforms.overheat]
type = "alarm"
inputs = ["devices"]
detector = "threshold"
field = "temp"
above = 80.0
clear_below = 75.0
severity = "major"

{actions}

[sinks.out]
type = "file"
inputs = {inputs}
format = "envelope"
"#,
            api = self.api,
            devices = self.devices,
        )
    }

    fn device_addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.devices).into()
    }
}

fn actions(hook: u16) -> String {
    format!(
        r#"[[transforms.overheat.actions]]
type = "mqtt"
topic = "alarms/{{rule}}/{{device}}"

[[transforms.overheat.actions]]
type = "command"
device = "plc-1"
command = "write"
args = {{ point = "fan", value = true }}
on = ["raise"]

[[transforms.overheat.actions]]
type = "webhook"
url = "http://127.0.0.1:{hook}/hook"
retries = 5
timeout = "500ms"
backoff = "50ms""#
    )
}

/// A webhook receiver: the first connections follow `script` (500, hang, close), then
/// it answers `status` (changeable) and keeps the bodies it answered with 200.
struct Receiver {
    port: u16,
    bodies: Arc<Mutex<Vec<Value>>>,
    status: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_body(socket: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let read = socket.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
        let end = buffer.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0);
        if buffer.len() >= end + 4 + length {
            return Some(buffer[end + 4..end + 4 + length].to_vec());
        }
    }
}

async fn receiver(port: u16) -> Receiver {
    let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let status = Arc::new(AtomicUsize::new(200));
    let connections = Arc::new(AtomicUsize::new(0));
    let task = {
        let (bodies, status, connections) = (
            Arc::clone(&bodies),
            Arc::clone(&status),
            Arc::clone(&connections),
        );
        tokio::spawn(async move {
            let mut hung = Vec::new();
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let nth = connections.fetch_add(1, Ordering::SeqCst);
                let Some(body) = read_body(&mut socket).await else {
                    continue;
                };
                let code = match nth {
                    0 => 500,
                    1 => {
                        hung.push(socket);
                        continue;
                    }
                    2 => {
                        drop(socket);
                        continue;
                    }
                    _ => status.load(Ordering::SeqCst),
                };
                if code == 200 {
                    if let Ok(value) = serde_json::from_slice(&body) {
                        bodies.lock().expect("lock").push(value);
                    }
                }
                let answer = format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\n\r\n");
                drop(socket.write_all(answer.as_bytes()).await);
            }
        })
    };
    Receiver {
        port,
        bodies,
        status,
        connections,
        task,
    }
}

async fn alarms(api: SocketAddr) -> Vec<Value> {
    let (status, body) = api_request(api, "GET", "/api/v1/alarms", Some(ADMIN), None).await;
    assert_eq!(status, 200, "{body}");
    body["alarms"].as_array().cloned().unwrap_or_default()
}

fn sink_lines(dir: &std::path::Path) -> Vec<Value> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .filter_map(|file| std::fs::read_to_string(file).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|line| serde_json::from_str(line).ok())
                .collect::<Vec<Value>>()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raise_and_clear_run_mqtt_command_and_webhook_actions() {
    let layout = Layout {
        api: free_port(),
        devices: free_port(),
        broker: free_port(),
        hook: free_port(),
    };
    let hook = receiver(layout.hook).await;
    let gateway = Gateway::start(&layout.render(&actions(hook.port), true)).await;
    let api = gateway.api;
    let subscriber = Subscriber::connect_with(layout.broker, "alarms/#", None).await;

    let mut plc = Device::connect(layout.device_addr()).await.expect("plc");
    plc.hello("plc-1").await;
    let mut boiler = Device::connect(layout.device_addr()).await.expect("boiler");
    boiler
        .send_json(&json!({"device": "boiler-1", "seq": 1, "temp": 85.5}))
        .await
        .expect("reading");

    // The command reaches plc-1; its result goes on like any device's.
    let command = plc.expect_type("command", WAIT).await;
    assert_eq!(command["name"], "write", "{command}");
    assert_eq!(command["params"], json!({"point": "fan", "value": true}));
    let id = command["id"].as_str().expect("id").to_owned();
    assert!(id.starts_with("alarm.overheat.boiler-1.raise."), "{id}");
    plc.send_json(&json!({"type": "command_result", "id": id, "status": "ok"}))
        .await
        .expect("result");
    let output = gateway.data_dir.join("sinks").join("out");
    let result = eventually(WAIT, || {
        sink_lines(&output)
            .into_iter()
            .find(|line| line["kind"] == "command_result" && line["payload"]["id"] == id)
    })
    .await;
    let result = result.expect("the command_result reaches the sink");
    assert_eq!(result["device"], "plc-1", "{result}");

    // The local subscriber gets the raise.
    let topic = "alarms/overheat/boiler-1";
    assert!(
        subscriber
            .wait_until(WAIT, |msgs| msgs.iter().any(|m| m.topic == topic))
            .await,
        "no publish on {topic}"
    );
    let raised = subscriber.messages()[0].json().expect("json");
    assert_eq!(raised["state"], "raised", "{raised}");
    assert_eq!(raised["value"], 85.5, "{raised}");

    // The webhook got through a 500, a hang and a closed connection.
    let delivered = eventually(WAIT, || {
        let bodies = hook.bodies.lock().expect("lock").clone();
        (!bodies.is_empty()).then_some(bodies)
    })
    .await
    .expect("the webhook is delivered after its retries");
    assert_eq!(delivered[0]["state"], "raised");
    assert_eq!(delivered[0]["rule"], "overheat");
    assert!(hook.connections.load(Ordering::SeqCst) >= 4);
    let webhook = [("rule", "overheat"), ("action", "webhook")];
    gateway
        .wait_metric(
            "fieldgate_alarm_action_successes_total",
            &webhook,
            WAIT,
            |v| v == 1.0,
        )
        .await;
    assert_eq!(
        gateway
            .metric("fieldgate_alarm_action_retries_total", &webhook)
            .await,
        Some(3.0)
    );
    assert_eq!(
        gateway
            .metric("fieldgate_alarm_action_failures_total", &webhook)
            .await,
        Some(0.0)
    );
    for action in ["mqtt", "command"] {
        gateway
            .wait_metric(
                "fieldgate_alarm_action_successes_total",
                &[("rule", "overheat"), ("action", action)],
                WAIT,
                |v| v == 1.0,
            )
            .await;
    }

    // Now the receiver refuses for good: the clear's webhook fails, counted and shown.
    hook.status.store(503, Ordering::SeqCst);
    boiler
        .send_json(&json!({"device": "boiler-1", "seq": 2, "temp": 70.0}))
        .await
        .expect("reading");
    assert!(
        subscriber
            .wait_until(WAIT, |msgs| msgs.iter().any(
                |m| m.topic == topic && m.json().is_some_and(|v| v["state"] == "cleared")
            ))
            .await,
        "no cleared publish"
    );
    gateway
        .wait_metric(
            "fieldgate_alarm_action_failures_total",
            &webhook,
            WAIT,
            |v| v == 1.0,
        )
        .await;
    let shown = eventually_async(WAIT, || async {
        let listed = alarms(api).await;
        let alarm = listed.first()?.clone();
        (alarm["state"] == "cleared" && alarm["action_errors"].is_array()).then_some(alarm)
    })
    .await
    .expect("the failure is shown on the alarm");
    let errors = shown["action_errors"].as_array().expect("array");
    assert_eq!(errors.len(), 1, "{shown}");
    assert_eq!(errors[0]["action"], "webhook");
    assert_eq!(errors[0]["on"], "clear");
    let error = errors[0]["error"].as_str().expect("text");
    assert!(
        error.contains("HTTP 503") && error.contains("6 attempts"),
        "{error}"
    );
    // The command is `on = ["raise"]`: no second command.
    if let Ok(Some(frame)) = plc.read_json(Duration::from_millis(300)).await {
        assert_ne!(frame["type"], "command", "{frame}");
    }
}

#[test]
fn check_refuses_an_mqtt_action_without_a_broker_source() {
    let layout = Layout {
        api: free_port(),
        devices: free_port(),
        broker: free_port(),
        hook: free_port(),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.toml");
    let run_check = |config: String| {
        std::fs::write(&path, config).expect("write");
        Command::new(fieldgate_bin())
            .arg("check")
            .arg(&path)
            .output()
            .expect("run fieldgate check")
    };
    let output = run_check(layout.render(&actions(layout.hook), false));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("transforms.overheat.actions[0].type") && stderr.contains("mqtt_broker"),
        "{stderr}"
    );
    let named =
        "[[transforms.overheat.actions]]\ntype = \"mqtt\"\ntopic = \"a\"\nbroker = \"devices\"";
    let output = run_check(layout.render(named, true));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("transforms.overheat.actions[0].broker"),
        "{stderr}"
    );
    let https = "[[transforms.overheat.actions]]\ntype = \"webhook\"\nurl = \"https://hooks.example.com/x\"";
    let output = run_check(layout.render(https, false));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = run_check(layout.render(&format!("{https}\nca = \"/nonexistent/ca.pem\""), false));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("transforms.overheat.actions[0].ca"),
        "{stderr}"
    );
    let output = run_check(layout.render(&actions(layout.hook), true));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The Python with pymodbus (target/pyenv, or `FIELDGATE_PYTHON`), or `None`.
fn pymodbus() -> Option<std::path::PathBuf> {
    let python = std::env::var_os("FIELDGATE_PYTHON").map_or_else(
        || {
            let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
                || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"),
                std::path::PathBuf::from,
            );
            target.join("pyenv").join("bin").join("python")
        },
        std::path::PathBuf::from,
    );
    let ok = Command::new(&python)
        .args(["-c", "import pymodbus.simulator"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !ok {
        eprintln!(
            "SKIPPED: pymodbus is not installed for {}; run scripts/test.sh",
            python.display()
        );
    }
    ok.then_some(python)
}

/// modbus_sim.py, killed on drop.
struct Sim(std::process::Child, Arc<Mutex<Vec<String>>>);

impl Drop for Sim {
    fn drop(&mut self) {
        drop(self.0.kill());
        drop(self.0.wait());
    }
}

async fn modbus_sim(python: &std::path::Path, spec: &Value) -> Sim {
    use std::io::BufRead as _;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/modbus_sim.py");
    let mut child = Command::new(python)
        .arg(script)
        .arg(spec.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start modbus_sim.py");
    let stdout = child.stdout.take().expect("stdout");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&lines);
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            sink.lock().expect("lock").push(line);
        }
    });
    let sim = Sim(child, lines);
    let ready = eventually(Duration::from_secs(30), || {
        sim.1
            .lock()
            .expect("lock")
            .iter()
            .any(|line| line.starts_with("READY"))
            .then_some(())
    })
    .await;
    assert!(ready.is_some(), "modbus_sim.py not ready within 30s");
    sim
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overheating_modbus_plc_gets_its_fan_coil_written() {
    let Some(python) = pymodbus() else { return };
    let port = free_port();
    // temp = 905 × 0.1 = 90.5 °C: the first poll raises the alarm; the fan coil is off.
    let _sim = modbus_sim(
        &python,
        &json!({"mode": "tcp", "port": port, "devices": [{"unit": 1, "holding": {"0": 905}, "coils": {"3": false}}]}),
    )
    .await;
    let config = format!(
        r#"[gateway]
id = "gw-plc"
shutdown_grace = "5s"

[api]
address = "127.0.0.1:{api}"
admin_token = "{ADMIN}"

[sources.plc]
type = "modbus_tcp"
address = "127.0.0.1:{port}"
device = "plc-1"
poll_interval = "100ms"
report_on_change = true

[[sources.plc.points]]
name = "temp"
area = "holding"
address = 0
type = "u16"
scale = 0.1

[[sources.plc.points]]
name = "fan"
area = "coil"
address = 3
type = "bool"
writable = true

[transforms.overheat]
type = "alarm"
inputs = ["plc"]
detector = "threshold"
field = "temp"
above = 80.0
clear_below = 75.0

[[transforms.overheat.actions]]
type = "command"
on = ["raise"]
command = "write"
args = {{ fan = true }}

[sinks.out]
type = "file"
inputs = ["overheat"]
format = "envelope"
"#,
        api = free_port(),
    );
    let gateway = Gateway::start(&config).await;
    let output = gateway.data_dir.join("sinks").join("out");
    let result = eventually(WAIT, || {
        sink_lines(&output).into_iter().find(|line| {
            line["kind"] == "command_result"
                && line["payload"]["id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("alarm.overheat.plc-1.raise."))
        })
    })
    .await
    .unwrap_or_else(|| panic!("no command_result\n{}", gateway.stderr_tail(30)));
    assert_eq!(result["payload"]["status"], "ok", "{result}");
    // The next polls read the coil back on.
    let read_back = eventually(WAIT, || {
        sink_lines(&output)
            .into_iter()
            .find(|line| line["kind"] == "telemetry" && line["payload"]["fan"] == true)
    })
    .await;
    assert!(
        read_back.is_some(),
        "fan never read back on\n{}",
        gateway.stderr_tail(30)
    );
    gateway
        .wait_metric(
            "fieldgate_alarm_action_successes_total",
            &[("rule", "overheat"), ("action", "command")],
            WAIT,
            |v| v == 1.0,
        )
        .await;
}
