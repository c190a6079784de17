//! What operators see of a running gateway: every metric from start-up, the Grafana
//! dashboard's and the Prometheus alerts' metrics on `/metrics`, the alert rules under
//! promtool, systemd notifications, and `--version`.

mod common;

use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Gateway, GatewayConfig, Launch, free_port, parse_samples};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Sinks of the test config: `cloud` (MQTT, its broker down) and `archive` (file).
fn config() -> String {
    // Nothing listens on the MQTT port: a gateway whose upstream is down must still
    // export every series.
    GatewayConfig::new(free_port())
        .tail(
            "[transforms.keep]\ntype = \"filter\"\ninputs = [\"devices\"]\n\
             condition = { kind = \"telemetry\" }\n\n\
             [transforms.shape]\ntype = \"remap\"\ninputs = [\"keep\"]\nset = { site = \"a\" }\n\n\
             [transforms.hot]\ntype = \"alarm\"\ninputs = [\"shape\"]\ndetector = \"threshold\"\n\
             field = \"temp\"\nabove = 80.0\n\n\
             [[transforms.hot.actions]]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:9/hook\"\n\n\
             [sinks.archive]\ntype = \"file\"\ninputs = [\"devices\", \"hot\"]",
        )
        .render()
}

/// Metric names (`fieldgate_*`, `process_*`) in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = ["fieldgate_", "process_"]
        .iter()
        .filter_map(|prefix| rest.find(prefix))
        .min()
    {
        let preceded_by_word = rest[..start]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if !preceded_by_word {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// The `(name, labels)` pairs the README's `/metrics` row promises.
fn readme_metrics() -> Vec<(String, Vec<String>)> {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).expect("README");
    let row = readme
        .lines()
        .find(|line| line.starts_with("| `/metrics` |"))
        .expect("README has a /metrics row");
    row.split('`')
        .skip(1)
        .step_by(2)
        .filter(|code| code.starts_with("fieldgate_") || code.starts_with("process_"))
        .map(|code| match code.split_once('{') {
            Some((name, labels)) => (
                name.to_owned(),
                labels
                    .trim_end_matches('}')
                    .split(',')
                    .map(str::to_owned)
                    .collect(),
            ),
            None => (code.to_owned(), Vec::new()),
        })
        .collect()
}

#[tokio::test]
async fn every_readme_metric_is_there_at_start_up_for_every_source_and_sink() {
    let gateway = Gateway::start(&config()).await;
    let text = gateway.metrics().await;
    let samples = parse_samples(&text);
    let promised = readme_metrics();
    assert!(promised.len() >= 14, "README /metrics row: {promised:?}");
    let mut missing = Vec::new();
    for (name, labels) in &promised {
        // Only for the buffers of sinks that are no longer configured: none at start-up.
        if name == "fieldgate_detached_buffer_bytes" {
            continue;
        }
        // A histogram's samples are its `_count`, `_sum` and `_bucket` series.
        let series = if name.ends_with("_seconds") && name.contains("latency") {
            format!("{name}_count")
        } else {
            name.clone()
        };
        let mut wanted: Vec<(&str, &str)> = Vec::new();
        if labels.iter().any(|label| label == "source") {
            wanted.push(("source", "devices"));
        }
        if labels.iter().any(|label| label == "transform") {
            wanted.push(("transform", "*"));
        }
        if labels.iter().any(|label| label == "sink") {
            wanted.push(("sink", "cloud"));
            // The file sink has no upstream: no connection state, no upstream latency.
            if !name.contains("upstream") && !name.contains("latency") {
                wanted.push(("sink", "archive"));
            }
        }
        if wanted.is_empty() {
            if !samples.iter().any(|sample| sample.name == series) {
                missing.push(series.clone());
            }
            continue;
        }
        for (label, value) in wanted {
            let found = samples.iter().any(|sample| {
                sample.name == series
                    && (value == "*" || sample.labels.get(label).map(String::as_str) == Some(value))
                    // An empty disk buffer holds its segment headers: bytes, not events;
                    // the test's broker is not there, so connecting fails.
                    && (sample.value == 0.0
                        || series == "fieldgate_buffer_bytes"
                        || series == "fieldgate_upstream_connect_failures_total")
            });
            if !found {
                missing.push(format!("{series}{{{label}=\"{value}\"}}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "missing (or not 0) at start-up: {missing:?}\n{text}"
    );
}

/// Every PromQL expression (`"expr"`) in a Grafana dashboard.
fn dashboard_exprs(value: &serde_json::Value, exprs: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match value {
                    serde_json::Value::String(expr) if key == "expr" => exprs.push(expr.clone()),
                    _ => dashboard_exprs(value, exprs),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                dashboard_exprs(item, exprs);
            }
        }
        _ => {}
    }
}

#[tokio::test]
async fn dashboard_and_alert_metrics_exist_on_a_running_gateway() {
    let dashboard_path = Path::new(ROOT).join("deploy/grafana/fieldgate.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dashboard_path).expect("dashboard"))
            .expect("dashboard is JSON");
    assert_eq!(dashboard["uid"], "fieldgate-overview", "the uid is fixed");
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    assert!(
        variables
            .iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "a Prometheus data source variable"
    );
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 15, "dashboard queries: {exprs:?}");
    let mut used = metric_names(&exprs.join("\n"));
    let alerts = std::fs::read_to_string(Path::new(ROOT).join("deploy/prometheus/alerts.yml"))
        .expect("alerts.yml");
    let alert_metrics = metric_names(&alerts);
    assert!(alert_metrics.len() >= 5, "alert metrics: {alert_metrics:?}");
    used.extend(alert_metrics);

    let gateway = Gateway::start(&config()).await;
    let text = gateway.metrics().await;
    let exported: BTreeSet<String> = parse_samples(&text)
        .into_iter()
        .map(|sample| sample.name)
        .collect();
    let missing: Vec<&String> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "used by the dashboard or alerts but not on /metrics: {missing:?}\n{text}"
    );
}

/// promtool from PATH or from where scripts/test.sh unpacks Debian's prometheus package.
fn promtool() -> Option<PathBuf> {
    let unpacked = Path::new(ROOT).join("target/tools/prometheus/usr/bin/promtool");
    if unpacked.is_file() {
        return Some(unpacked);
    }
    Command::new("promtool")
        .arg("--version")
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|_| PathBuf::from("promtool"))
}

#[test]
fn alert_rules_pass_promtool() {
    let Some(promtool) = promtool() else {
        eprintln!(
            "SKIPPED alert_rules_pass_promtool: promtool is not installed \
             (scripts/test.sh unpacks Debian's prometheus package into target/tools)"
        );
        return;
    };
    let output = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(Path::new(ROOT).join("deploy/prometheus/alerts.yml"))
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool check rules: {text}");
    assert!(text.contains("SUCCESS: 5 rules found"), "{text}");
}

/// Receives the next notification, up to `limit`.
fn next_notification(socket: &UnixDatagram, limit: Duration) -> Option<String> {
    socket.set_read_timeout(Some(limit)).expect("timeout");
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[tokio::test]
async fn tells_systemd_ready_pings_the_watchdog_and_says_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    let launch = Launch {
        env: vec![
            ("NOTIFY_SOCKET".into(), path.display().to_string()),
            // Pings every 100 ms.
            ("WATCHDOG_USEC".into(), "200000".into()),
        ],
        ..Launch::default()
    };
    let mut gateway = Gateway::spawn_with(&config(), launch);
    let mut seen = Vec::new();
    let ready = loop {
        let Some(message) = next_notification(&socket, common::WAIT) else {
            panic!(
                "no READY=1 within {:?}; got {seen:?}\n{}",
                common::WAIT,
                gateway.stderr_tail(30)
            );
        };
        if message.lines().any(|line| line == "READY=1") {
            break message;
        }
        seen.push(message);
    };
    // READY comes after the listeners bound and the buffers opened: /readyz agrees.
    let (status, _) = common::http_get(gateway.api, "/readyz")
        .await
        .expect("GET /readyz");
    assert_eq!(
        status, 200,
        "READY=1 sent before /readyz turned ready: {ready}"
    );
    let mut pings = 0;
    while pings < 3 {
        let message = next_notification(&socket, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("watchdog pings stopped after {pings}"));
        if message == "WATCHDOG=1" {
            pings += 1;
        }
    }
    let status = gateway.terminate().await;
    assert!(status.success(), "exit status {status}");
    let mut stopping = false;
    while let Some(message) = next_notification(&socket, Duration::from_millis(500)) {
        stopping |= message.lines().any(|line| line == "STOPPING=1");
    }
    assert!(stopping, "no STOPPING=1 at shutdown");
}

#[test]
fn version_names_commit_target_and_features() {
    let output = Command::new(common::fieldgate_bin())
        .arg("--version")
        .output()
        .expect("run fieldgate --version");
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).expect("utf-8");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some(concat!("fieldgate ", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(ROOT)
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map_or_else(
            || "unknown".to_owned(),
            |output| String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        );
    assert_eq!(
        lines.get(1),
        Some(&format!("commit: {commit}").as_str()),
        "{text}"
    );
    let target = lines.get(2).copied().unwrap_or_default();
    assert!(
        target.starts_with(&format!("target: {}-", std::env::consts::ARCH))
            && target.contains("linux"),
        "{text}"
    );
    let enabled: Vec<&str> = [
        ("count-allocations", cfg!(feature = "count-allocations")),
        ("modbus", cfg!(feature = "modbus")),
        ("profiling", cfg!(feature = "profiling")),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect();
    let features = if enabled.is_empty() {
        "features: none".to_owned()
    } else {
        format!("features: {}", enabled.join(","))
    };
    assert_eq!(lines.get(3).copied(), Some(features.as_str()), "{text}");
}
