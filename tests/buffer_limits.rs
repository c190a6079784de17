//! A record larger than a sink's buffer never wedges the buffer writer (issue 8, item 4):
//! `check` refuses a source whose largest frame cannot fit the buffers it feeds, and a
//! frame that does fit the empty buffer is stored even when acked records still sit in
//! the buffer's segment files.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Device, Gateway, data_message, fieldgate_bin, free_port};
use serde_json::Value;

/// A gateway with a TCP source in ack mode and a file sink behind a 1 MiB disk buffer.
fn config(max_frame: &str) -> String {
    format!(
        r#"[gateway]
id = "gw-1"
shutdown_grace = "5s"

[api]
address = "127.0.0.1:{api}"

[sources.devices]
type = "tcp"
address = "127.0.0.1:{devices}"
framing = "lines"
ack = true
max_frame = "{max_frame}"

[sinks.local]
type = "file"
inputs = ["devices"]

[sinks.local.buffer]
type = "disk"
max_size = "1MiB"
when_full = "block"
"#,
        api = free_port(),
        devices = free_port(),
    )
}

fn device_addr(config: &str) -> std::net::SocketAddr {
    let table: toml::Table = toml::from_str(config).expect("config parses");
    table["sources"]["devices"]["address"]
        .as_str()
        .expect("address")
        .parse()
        .expect("socket address")
}

/// Sends one frame and returns the gateway's answer to it (`ack` or `nack`).
async fn send_acked(device: &mut Device, message: &Value) -> Value {
    device.send_json(message).await.expect("send frame");
    loop {
        let reply = device
            .read_json(Duration::from_secs(20))
            .await
            .expect("an answer within 20 s: the buffer writer must not wedge")
            .expect("connection open");
        if matches!(reply["type"].as_str(), Some("ack" | "nack")) {
            return reply;
        }
    }
}

#[test]
fn check_rejects_a_frame_that_cannot_fit_the_buffer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fieldgate.toml");
    std::fs::write(&path, config("4MiB")).expect("write config");
    let output = Command::new(fieldgate_bin())
        .arg("check")
        .arg(&path)
        .output()
        .expect("run fieldgate check");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "check accepted a 4 MiB frame for a 1 MiB buffer"
    );
    assert!(
        stderr.contains("sinks.local.buffer.max_size")
            && stderr.contains("sources.devices.max_frame"),
        "the error names both keys:\n{stderr}"
    );

    // 1000 KiB plus the event header fits a 1 MiB buffer.
    std::fs::write(&path, config("1000KiB")).expect("write config");
    let output = Command::new(fieldgate_bin())
        .arg("check")
        .arg(&path)
        .output()
        .expect("run fieldgate check");
    assert!(
        output.status.success(),
        "check refused a frame that fits:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Acked records left in the active segment used to count against `max_size` until the
/// next append *inside* the segment file, which a `Full` buffer never got to: a frame
/// that fits the empty buffer then waited forever, and the device got no answer.
#[tokio::test]
async fn a_large_frame_is_stored_although_acked_records_fill_the_segment() {
    let config = config("1000KiB");
    let addr = device_addr(&config);
    let gateway = Gateway::start(&config).await;
    let mut device = Device::connect(addr).await.expect("connect");

    // Two 100 KB frames: stored, acked, written out by the file sink and acked there, but
    // still in the 256 KiB active segment of the normal lane.
    for seq in 1..=2 {
        let reply = send_acked(&mut device, &data_message("dev-1", seq, 100_000)).await;
        assert_eq!(reply["type"], "ack", "{reply}");
    }
    gateway
        .wait_metric(
            "fieldgate_sent_events_total",
            &[("sink", "local")],
            Duration::from_secs(20),
            |sent| sent >= 2.0,
        )
        .await;
    gateway
        .wait_metric(
            "fieldgate_buffer_events",
            &[("sink", "local")],
            Duration::from_secs(20),
            |events| events == 0.0,
        )
        .await;

    // 850 KB fits the empty 1 MiB buffer, not beside 200 KB of acked records.
    let reply = send_acked(&mut device, &data_message("dev-1", 3, 850_000)).await;
    assert_eq!(reply["type"], "ack", "{reply}");
    assert_eq!(reply["seq"], 3, "{reply}");

    // The writer goes on: another device's frame is acked too.
    let mut other = Device::connect(addr).await.expect("connect");
    let reply = send_acked(&mut other, &data_message("dev-2", 1, 10)).await;
    assert_eq!(reply["type"], "ack", "{reply}");
    assert_eq!(
        gateway
            .metric(
                "fieldgate_dropped_events_total",
                &[("sink", "local"), ("reason", "too_large")]
            )
            .await
            .unwrap_or(0.0),
        0.0
    );
}
