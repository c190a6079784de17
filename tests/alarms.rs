//! Alarms end to end against the built binary: a TCP device drives the issue's
//! `type = "alarm"` contract; the alarm is raised (an `alarm` event in the file sink),
//! acknowledged through `/api/v1/alarms` and `fieldgate alarms ack`, survives `kill -9`
//! (checkpoint) and a graceful restart, and clears. Hostile alarm configs are refused
//! by `fieldgate check` with their key path.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{
    Device, Gateway, api_request, eventually, eventually_async, fieldgate_bin, free_port,
};
use serde_json::{Value, json};

const ADMIN: &str = "alarms-admin-token";
const WAIT: Duration = Duration::from_secs(20);

struct Layout {
    api: u16,
    devices: u16,
}

impl Layout {
    fn new() -> Self {
        Self {
            api: free_port(),
            devices: free_port(),
        }
    }

    fn render(&self, transform: &str) -> String {
        format!(
            r#"[gateway]
id = "gw-alarms"
shutdown_grace = "5s"
checkpoint_interval = "200ms"

[api]
address = "127.0.0.1:{api}"
admin_token = "{ADMIN}"

[sources.devices]
type = "tcp"
address = "127.0.0.1:{devices}"
framing = "lines"

{transform}

[sinks.out]
type = "file"
inputs = ["overheat"]
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

/// The issue's contract, as written.
const CONTRACT: &str = r#"[transforms.overheat]
type = "alarm"
inputs = ["devices"]
detector = "threshold"
field = "temp"
above = 80.0
clear_below = 75.0
severity = "major""#;

async fn send_temp(device: &mut Device, name: &str, seq: u64, temp: f64) {
    device
        .send_json(&json!({"device": name, "seq": seq, "temp": temp}))
        .await
        .expect("send reading");
}

async fn alarms(api: SocketAddr, query: &str) -> Value {
    let (status, body) = api_request(
        api,
        "GET",
        &format!("/api/v1/alarms{query}"),
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Waits until the alarm list for `query` has `count` entries; returns them.
async fn wait_alarms(api: SocketAddr, query: &str, count: usize) -> Vec<Value> {
    let found = eventually_async(WAIT, || async {
        let listing = alarms(api, query).await;
        let found = listing["alarms"].as_array().cloned().unwrap_or_default();
        (found.len() == count).then_some(found)
    })
    .await;
    match found {
        Some(found) => found,
        None => panic!(
            "alarms{query}: expected {count} within {WAIT:?}, have {}",
            alarms(api, query).await
        ),
    }
}

/// Every event the file sink wrote under `dir`, once each (a `kill -9` makes the sink
/// deliver again what it had not acknowledged yet: at least once, deduplicated by id).
fn sink_lines(dir: &Path) -> Vec<Value> {
    let mut seen = std::collections::HashSet::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
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
        .filter(|line: &Value| seen.insert(line["id"].to_string()))
        .collect()
}

/// The alarm payloads the file sink wrote, in order.
fn alarm_events(dir: &Path) -> Vec<Value> {
    sink_lines(dir)
        .into_iter()
        .filter(|line| line["kind"] == "alarm")
        .map(|line| line["payload"].clone())
        .collect()
}

fn checkpoint_file(gateway: &Gateway) -> PathBuf {
    gateway.data_dir.join("transforms").join("overheat.state")
}

#[tokio::test]
async fn raise_ack_survive_kill9_and_restart_then_clear() {
    let layout = Layout::new();
    let mut gateway = Gateway::start(&layout.render(CONTRACT)).await;
    let api = gateway.api;
    let output = gateway.data_dir.join("sinks").join("out");
    let mut device = Device::connect(layout.device_addr())
        .await
        .expect("connect");
    send_temp(&mut device, "boiler-1", 1, 70.0).await;
    send_temp(&mut device, "boiler-1", 2, 85.5).await;
    send_temp(&mut device, "boiler-2", 1, 60.0).await;

    let raised = wait_alarms(api, "?state=raised", 1).await;
    assert_eq!(raised[0]["rule"], "overheat");
    assert_eq!(raised[0]["device"], "boiler-1");
    assert_eq!(raised[0]["severity"], "major");
    assert_eq!(raised[0]["value"], 85.5);
    let events = eventually(WAIT, || {
        let events = alarm_events(&output);
        (!events.is_empty()).then_some(events)
    })
    .await
    .expect("the alarm event reaches the sink");
    assert_eq!(events[0]["state"], "raised");
    assert_eq!(events[0]["threshold"], 80.0);
    // The readings pass through unchanged.
    let telemetry = eventually(WAIT, || {
        let lines: Vec<Value> = sink_lines(&output)
            .into_iter()
            .filter(|line| line["kind"] == "telemetry")
            .collect();
        (lines.len() == 3).then_some(lines)
    })
    .await
    .expect("three readings in the sink");
    assert_eq!(telemetry[1]["payload"]["temp"], 85.5);

    // Acknowledge with the API; a wrong token is refused.
    let (status, _) = api_request(
        api,
        "POST",
        "/api/v1/alarms/overheat/boiler-1/ack",
        Some("nope"),
        None,
    )
    .await;
    assert_eq!(status, 401);
    let (status, body) = api_request(
        api,
        "POST",
        "/api/v1/alarms/overheat/boiler-1/ack",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "acknowledged");
    let (status, _) = api_request(
        api,
        "POST",
        "/api/v1/alarms/overheat/boiler-2/ack",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(status, 404);

    // kill -9 once the checkpoint holds the acknowledgement.
    let file = checkpoint_file(&gateway);
    eventually(WAIT, || {
        let text = std::fs::read(&file).ok()?;
        String::from_utf8_lossy(&text)
            .contains("acknowledged")
            .then_some(())
    })
    .await
    .expect("a checkpoint with the acknowledged alarm");
    drop(device);
    gateway.kill9();
    gateway.restart().await;
    let after_kill = wait_alarms(api, "?state=acknowledged", 1).await;
    assert_eq!(after_kill[0]["device"], "boiler-1");
    assert_eq!(after_kill[0]["since"], raised[0]["since"]);

    // Still too hot after the restart: no second raise.
    let mut device = Device::connect(layout.device_addr())
        .await
        .expect("reconnect");
    send_temp(&mut device, "boiler-1", 3, 90.0).await;
    send_temp(&mut device, "boiler-1", 4, 78.0).await;
    eventually(WAIT, || {
        let lines = sink_lines(&output);
        (lines
            .iter()
            .filter(|line| line["kind"] == "telemetry")
            .count()
            == 5)
            .then_some(())
    })
    .await
    .expect("readings after the restart reach the sink");
    assert_eq!(alarm_events(&output).len(), 1, "no second raise");
    drop(device);

    // Graceful restart: the final checkpoint keeps the state too.
    let status = gateway.terminate().await;
    assert!(status.success(), "{}", gateway.stderr_tail(30));
    gateway.restart().await;
    wait_alarms(api, "?state=active&device=boiler-1", 1).await;

    // Cool down: cleared, through the CLI-visible API and as an event.
    let mut device = Device::connect(layout.device_addr())
        .await
        .expect("reconnect");
    send_temp(&mut device, "boiler-1", 5, 74.0).await;
    let cleared = wait_alarms(api, "?state=cleared", 1).await;
    assert_eq!(cleared[0]["device"], "boiler-1");
    assert!(cleared[0]["acknowledged_at"].is_u64());
    let events = eventually(WAIT, || {
        let events = alarm_events(&output);
        (events.len() == 2).then_some(events)
    })
    .await
    .expect("the clear event reaches the sink");
    assert_eq!(events[1]["state"], "cleared");
    assert_eq!(events[1]["acknowledged"], true);
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains("fieldgate_alarms_active{transform=\"overheat\",severity=\"major\"} 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_cli_lists_and_acknowledges() {
    let layout = Layout::new();
    let gateway = Gateway::start(&layout.render(CONTRACT)).await;
    let mut device = Device::connect(layout.device_addr())
        .await
        .expect("connect");
    send_temp(&mut device, "pump:7", 1, 99.0).await;
    wait_alarms(gateway.api, "?state=raised", 1).await;
    let api = format!("http://127.0.0.1:{}", layout.api);
    let cli = |args: &[&str]| {
        let output = Command::new(fieldgate_bin())
            .arg("alarms")
            .args(args)
            .args(["--api", &api, "--token", ADMIN])
            .output()
            .expect("run fieldgate alarms");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ok, stdout, stderr) = cli(&["list", "--state", "raised"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("pump:7") && stdout.contains("raised"),
        "{stdout}"
    );
    let (ok, stdout, stderr) = cli(&["ack", "overheat", "pump:7"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("acknowledged"), "{stdout}");
    let (ok, _, stderr) = cli(&["ack", "overheat", "pump:7"]);
    assert!(ok, "acknowledging twice is fine: {stderr}");
    let (ok, _, stderr) = cli(&["ack", "nope", "pump:7"]);
    assert!(!ok && stderr.contains("404"), "{stderr}");
    let (ok, stdout, _) = cli(&["list", "--state", "acknowledged", "--json"]);
    assert!(ok);
    let listing: Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(listing["total"], 1);
}

#[test]
fn check_refuses_hostile_alarm_configs_with_the_key_path() {
    let layout = Layout::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fieldgate.toml");
    let base = "[transforms.overheat]\ntype = \"alarm\"\ninputs = [\"devices\"]\n";
    for (body, key) in [
        (
            "detector = \"threshold\"\nfield = \"temp\"\nabove = nan",
            "transforms.overheat.above",
        ),
        (
            "detector = \"threshold\"\nfield = \"temp\"\nabove = 80.0\nclear_below = 85.0",
            "transforms.overheat.clear_below",
        ),
        (
            "detector = \"threshold\"\nfield = \"\"\nabove = 80.0",
            "transforms.overheat.field",
        ),
        (
            "detector = \"rate_of_change\"\nfield = \"temp\"\nabove = 1.0\nwindow = \"100000d\"",
            "transforms.overheat.window",
        ),
        (
            "detector = \"threshold\"\nfield = \"temp\"\nabove = 80.0\nstate_on_change = \"maybe\"",
            "transforms.overheat.state_on_change",
        ),
    ] {
        std::fs::write(&path, layout.render(&format!("{base}{body}"))).expect("write config");
        let output = Command::new(fieldgate_bin())
            .arg("check")
            .arg(&path)
            .output()
            .expect("run fieldgate check");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "accepted:\n{body}");
        assert!(stderr.contains(key), "{body}\n→ {stderr}");
    }
    std::fs::write(&path, layout.render(CONTRACT)).expect("write config");
    let output = Command::new(fieldgate_bin())
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

/// A reload that changes the rule keeps its alarms by default and drops them with
/// `state_on_change = "reset"`; the report names the transform.
#[tokio::test]
async fn reload_keeps_or_resets_the_state_as_configured() {
    let layout = Layout::new();
    let gateway = Gateway::start(&layout.render(CONTRACT)).await;
    let api = gateway.api;
    let mut device = Device::connect(layout.device_addr())
        .await
        .expect("connect");
    send_temp(&mut device, "boiler-1", 1, 90.0).await;
    wait_alarms(api, "?state=raised", 1).await;

    let reload = |transform: String| {
        gateway.rewrite_config(&layout.render(&transform));
        async move {
            let (status, report) =
                api_request(api, "POST", "/api/v1/config/reload", Some(ADMIN), None).await;
            assert_eq!(status, 200, "{report}");
            report
        }
    };
    let report = reload(CONTRACT.replace("above = 80.0", "above = 85.0")).await;
    assert_eq!(report["result"], "applied", "{report}");
    assert!(
        report["changed"]
            .as_array()
            .is_some_and(|changed| changed.contains(&json!("transforms.overheat"))),
        "{report}"
    );
    wait_alarms(api, "?state=raised", 1).await;
    let report = reload(format!(
        "{}\nstate_on_change = \"reset\"",
        CONTRACT.replace("above = 80.0", "above = 86.0")
    ))
    .await;
    assert_eq!(report["result"], "applied", "{report}");
    wait_alarms(api, "", 0).await;
    // The new rule judges the next reading on its own limits.
    send_temp(&mut device, "boiler-1", 2, 85.5).await;
    send_temp(&mut device, "boiler-1", 3, 87.0).await;
    let raised = wait_alarms(api, "?state=raised", 1).await;
    assert_eq!(raised[0]["threshold"], 86.0);
}

/// `detector = "missing"` runs on the transform's ticker inside the gateway: a device
/// that goes quiet is raised without any event arriving, and its next reading clears it;
/// the alarm events reach the sink.
#[tokio::test]
async fn a_quiet_device_raises_a_missing_data_alarm() {
    let layout = Layout::new();
    let rule = r#"[transforms.overheat]
type = "alarm"
inputs = ["devices"]
detector = "missing"
field = "temp"
interval = "500ms"
count = 2
severity = "critical""#;
    let gateway = Gateway::start(&layout.render(rule)).await;
    let output = gateway.data_dir.join("sinks").join("out");
    let mut device = Device::connect(layout.device_addr())
        .await
        .expect("connect");
    send_temp(&mut device, "meter-1", 1, 20.0).await;
    let raised = wait_alarms(gateway.api, "?state=raised", 1).await;
    assert_eq!(raised[0]["detector"], "missing");
    assert_eq!(raised[0]["severity"], "critical");
    assert_eq!(raised[0]["threshold"], 1.0);
    send_temp(&mut device, "meter-1", 2, 20.5).await;
    wait_alarms(gateway.api, "?state=cleared", 1).await;
    let events = eventually(WAIT, || {
        let events = alarm_events(&output);
        (events.len() >= 2).then_some(events)
    })
    .await
    .expect("raise and clear reach the sink");
    assert_eq!(events[0]["state"], "raised");
    assert_eq!(events[0]["value"], Value::Null);
    assert_eq!(events[1]["state"], "cleared");
}
