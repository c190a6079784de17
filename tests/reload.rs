//! Live config reload against the built binary and a real mosquitto: while devices
//! stream in ack mode, a reload adds a file sink, changes one source's limit, removes
//! the file sink and refuses a broken config. No device of an unchanged source is
//! disconnected, no acknowledged event is lost, each change takes effect, the broken
//! config changes nothing. Plus SIGHUP, `--watch`, and `GET /api/v1/config`.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Gateway, Mosquitto, Subscriber, api_request, eventually, free_port};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

const ADMIN: &str = "reload-admin-token";
const DEVICES: usize = 200;
const OTHER_DEVICES: usize = 5;
const WAIT: Duration = Duration::from_secs(30);

/// Ports and the optional extra parts of the test's config.
struct Layout {
    api: u16,
    devices: u16,
    other: u16,
    mqtt: u16,
    archive_dir: Option<String>,
    other_max_frame: &'static str,
}

impl Layout {
    fn render(&self) -> String {
        let mut text = format!(
            r#"
[gateway]
id = "gw-reload"
shutdown_grace = "5s"

[api]
address = "127.0.0.1:{api}"
admin_token = "{ADMIN}"

[sources.devices]
type = "tcp"
address = "127.0.0.1:{devices}"
ack = true

[sources.other]
type = "tcp"
address = "127.0.0.1:{other}"
ack = true
max_frame = "{other_max_frame}"

[sinks.cloud]
type = "mqtt"
inputs = ["devices", "other"]
url = "mqtt://127.0.0.1:{mqtt}"
keep_alive = "5s"
reconnect_min = "100ms"
reconnect_max = "1s"
"#,
            api = self.api,
            devices = self.devices,
            other = self.other,
            mqtt = self.mqtt,
            other_max_frame = self.other_max_frame,
        );
        if let Some(dir) = &self.archive_dir {
            text.push_str(&format!(
                "\n[sinks.archive]\ntype = \"file\"\ninputs = [\"devices\"]\ndirectory = {dir:?}\n"
            ));
        }
        text
    }
}

/// What one streaming device saw.
#[derive(Default)]
struct DeviceLog {
    acked: Mutex<BTreeSet<(String, u64)>>,
    disconnects: AtomicUsize,
}

/// A device that sends `{"device":ID,"seq":N}` and waits for each ack, reconnecting
/// when its connection drops, until `stop`.
async fn stream_device(
    address: SocketAddr,
    id: String,
    log: Arc<DeviceLog>,
    stop: Arc<AtomicBool>,
) {
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Ok(socket) = TcpStream::connect(address).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (read, mut write) = socket.into_split();
        let mut lines = BufReader::new(read).lines();
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            seq += 1;
            let frame = format!("{{\"device\":\"{id}\",\"seq\":{seq}}}\n");
            if write.write_all(frame.as_bytes()).await.is_err() {
                break;
            }
            match tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await {
                Ok(Ok(Some(line))) => {
                    let answer: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                    if answer["type"] == "ack" && answer["seq"] == seq {
                        log.acked.lock().await.insert((id.clone(), seq));
                    }
                }
                _ => break,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !stop.load(Ordering::Relaxed) {
            log.disconnects.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Waits until the devices have had `more` events acked beyond what they have now, so
/// every reload happens in the middle of traffic.
async fn wait_for_more_acks(log: &DeviceLog, more: usize) {
    let before = log.acked.lock().await.len();
    let streamed = eventually(WAIT, || {
        (log.acked.try_lock().ok()?.len() >= before + more).then_some(())
    })
    .await;
    assert!(streamed.is_some(), "devices are not being acked");
}

async fn reload(api: SocketAddr) -> (u16, Value) {
    api_request(api, "POST", "/api/v1/config/reload", Some(ADMIN), None).await
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn lines_in(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| {
                    std::fs::read_to_string(entry.path())
                        .map(|text| text.lines().count())
                        .unwrap_or(0)
                })
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reloads_while_200_devices_stream_lose_nothing_acked() {
    let mqtt_port = free_port();
    let _broker = Mosquitto::start(mqtt_port).await;
    let subscriber = Subscriber::connect(mqtt_port).await;
    let archive = tempfile::tempdir().expect("archive dir");
    let mut layout = Layout {
        api: free_port(),
        devices: free_port(),
        other: free_port(),
        mqtt: mqtt_port,
        archive_dir: None,
        other_max_frame: "64KiB",
    };
    let gateway = Gateway::start(&layout.render()).await;
    let api = gateway.api;

    let stop = Arc::new(AtomicBool::new(false));
    let main_log = Arc::new(DeviceLog::default());
    let other_log = Arc::new(DeviceLog::default());
    let mut devices = Vec::new();
    for index in 0..DEVICES {
        devices.push(tokio::spawn(stream_device(
            ([127, 0, 0, 1], layout.devices).into(),
            format!("dev-{index}"),
            Arc::clone(&main_log),
            Arc::clone(&stop),
        )));
    }
    for index in 0..OTHER_DEVICES {
        devices.push(tokio::spawn(stream_device(
            ([127, 0, 0, 1], layout.other).into(),
            format!("other-{index}"),
            Arc::clone(&other_log),
            Arc::clone(&stop),
        )));
    }
    let streaming = eventually(WAIT, || {
        (main_log.acked.try_lock().ok()?.len() > DEVICES * 3).then_some(())
    })
    .await;
    assert!(streaming.is_some(), "devices are not being acked");

    // 1. Add a file sink.
    layout.archive_dir = Some(archive.path().display().to_string());
    gateway.rewrite_config(&layout.render());
    let (status, report) = reload(api).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(strings(&report["added"]), ["sinks.archive"], "{report}");
    assert!(strings(&report["changed"]).is_empty(), "{report}");
    let archived = eventually(WAIT, || (lines_in(archive.path()) > DEVICES).then_some(())).await;
    assert!(archived.is_some(), "the added file sink receives events");

    wait_for_more_acks(&main_log, DEVICES * 2).await;

    // 2. Change the other source's limit: only its devices reconnect, and the new limit
    //    holds for the next connection.
    layout.other_max_frame = "1KiB";
    gateway.rewrite_config(&layout.render());
    let (status, report) = reload(api).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(strings(&report["changed"]), ["sources.other"], "{report}");
    let mut probe = TcpStream::connect(("127.0.0.1", layout.other))
        .await
        .expect("connect to the changed source");
    let big = format!(
        "{{\"device\":\"probe\",\"seq\":1,\"pad\":\"{}\"}}\n",
        "x".repeat(2000)
    );
    probe.write_all(big.as_bytes()).await.expect("send");
    let mut answer = String::new();
    let mut reader = BufReader::new(&mut probe);
    let read = tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut answer)).await;
    assert!(
        matches!(read, Ok(Ok(_))),
        "an answer to the oversized frame"
    );
    assert!(
        answer.contains("frame_too_large"),
        "the new 1KiB limit applies: {answer}"
    );

    wait_for_more_acks(&main_log, DEVICES * 2).await;

    // 3. Remove the file sink: its buffer stays on disk and is reported.
    layout.archive_dir = None;
    gateway.rewrite_config(&layout.render());
    let (status, report) = reload(api).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(strings(&report["removed"]), ["sinks.archive"], "{report}");
    let (status, view) = api_request(api, "GET", "/api/v1/config", Some(ADMIN), None).await;
    assert_eq!(status, 200);
    assert_eq!(view["detached_buffers"][0]["sink"], "archive", "{view}");
    assert!(gateway.data_dir.join("buffers").join("archive").is_dir());
    let hash = view["hash"].as_str().expect("hash").to_owned();

    wait_for_more_acks(&main_log, DEVICES * 2).await;

    // 4. A broken config changes nothing.
    gateway.rewrite_config(&layout.render().replace("ack = true", "ack = maybe"));
    let (status, problem) = reload(api).await;
    assert_eq!(status, 422, "{problem}");
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("fieldgate.toml:") && detail.contains("sources.devices.ack"),
        "the error names the file, line and key: {problem}"
    );
    let (_, view) = api_request(api, "GET", "/api/v1/config", Some(ADMIN), None).await;
    assert_eq!(view["hash"], hash.as_str());
    assert_eq!(
        gateway
            .metric("fieldgate_config_reloads_total", &[("result", "failed")])
            .await,
        Some(1.0)
    );
    assert_eq!(
        gateway
            .metric("fieldgate_config_reloads_total", &[("result", "applied")])
            .await,
        Some(3.0)
    );
    assert_eq!(
        gateway
            .metric("fieldgate_config_hash", &[("hash", hash.as_str())])
            .await,
        Some(1.0)
    );

    // Keep streaming a moment after the last reload, then stop and count.
    let before = main_log.acked.lock().await.len();
    let more = eventually(WAIT, || {
        (main_log.acked.try_lock().ok()?.len() > before + DEVICES).then_some(())
    })
    .await;
    assert!(more.is_some(), "devices are still acked after the reloads");
    stop.store(true, Ordering::Relaxed);
    for device in devices {
        let _ended = tokio::time::timeout(Duration::from_secs(15), device).await;
    }
    assert_eq!(
        main_log.disconnects.load(Ordering::Relaxed),
        0,
        "a device of the unchanged source was disconnected"
    );
    assert!(
        other_log.disconnects.load(Ordering::Relaxed) >= OTHER_DEVICES,
        "the changed source's devices reconnected"
    );

    let mut acked = main_log.acked.lock().await.clone();
    acked.extend(other_log.acked.lock().await.iter().cloned());
    let delivered = subscriber
        .wait_until(Duration::from_secs(60), |messages| {
            let seen: BTreeSet<(String, u64)> = messages
                .iter()
                .flat_map(common::device_objects)
                .filter_map(|object| {
                    Some((
                        object["device"].as_str()?.to_owned(),
                        object["seq"].as_u64()?,
                    ))
                })
                .collect();
            acked.iter().all(|event| seen.contains(event))
        })
        .await;
    assert!(
        delivered,
        "every acknowledged event reaches the broker ({} acked)\n{}",
        acked.len(),
        gateway.stderr_tail(30)
    );
}

#[tokio::test]
async fn sighup_and_watch_reload_the_file() {
    let mqtt_port = free_port();
    let _broker = Mosquitto::start(mqtt_port).await;
    let archive = tempfile::tempdir().expect("archive dir");
    let mut layout = Layout {
        api: free_port(),
        devices: free_port(),
        other: free_port(),
        mqtt: mqtt_port,
        archive_dir: None,
        other_max_frame: "64KiB",
    };
    let gateway = Gateway::start_with_args(&layout.render(), &["--watch"]).await;
    let applied = |gateway: &Gateway| {
        let gateway_api = gateway.api;
        async move {
            common::http_get(gateway_api, "/metrics")
                .await
                .ok()
                .and_then(|(_, text)| {
                    common::find_metric(
                        &text,
                        "fieldgate_config_reloads_total",
                        &[("result", "applied")],
                    )
                })
                .unwrap_or(0.0)
        }
    };

    // --watch: replacing the file applies it.
    layout.archive_dir = Some(archive.path().display().to_string());
    gateway.rewrite_config(&layout.render());
    let watched = common::eventually_async(WAIT, || async {
        (applied(&gateway).await >= 1.0).then_some(())
    })
    .await;
    assert!(
        watched.is_some(),
        "--watch reloads a replaced file\n{}",
        gateway.stderr_tail(20)
    );

    // SIGHUP: the same, on demand (and an unchanged file reloads as "unchanged").
    let status = std::process::Command::new("kill")
        .args(["-HUP", &gateway.pid().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(status.success());
    let unchanged = common::eventually_async(WAIT, || async {
        let text = common::http_get(gateway.api, "/metrics").await.ok()?.1;
        common::find_metric(
            &text,
            "fieldgate_config_reloads_total",
            &[("result", "unchanged")],
        )
        .filter(|count| *count >= 1.0)
    })
    .await;
    assert!(
        unchanged.is_some(),
        "SIGHUP reloads\n{}",
        gateway.stderr_tail(20)
    );

    // GET /api/v1/config shows the running config without its secrets.
    let (status, view) = api_request(gateway.api, "GET", "/api/v1/config", Some(ADMIN), None).await;
    assert_eq!(status, 200);
    assert!(
        !view.to_string().contains(ADMIN),
        "the admin token is redacted"
    );
    assert_eq!(view["config"]["sinks"]["archive"]["type"], "file");
    let (status, _) = api_request(gateway.api, "GET", "/api/v1/config", None, None).await;
    assert_eq!(status, 401, "the config is admin-only");
}
