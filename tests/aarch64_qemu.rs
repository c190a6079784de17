//! The aarch64 release binary (`dist/fieldgate-VERSION-aarch64-linux`, built by
//! scripts/release.sh) under qemu-user: it starts, accepts devices, keeps their events in
//! its disk buffer across a restart while the cloud is down, and forwards them to a
//! mosquitto on loopback once it is up.
//!
//! Skipped, with a message, when dist/ has no aarch64 binary (a clean clone: the cross
//! build takes about 15 minutes, too long for CI) or when qemu-user is not installed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{
    AckSender, Collector, Gateway, GatewayConfig, Launch, Mosquitto, Subscriber, expected,
    free_port,
};

/// Events per device, and devices.
const MESSAGES: u64 = 100;
const DEVICES: [&str; 2] = ["arm-1", "arm-2"];
/// Emulation is slow: the whole run gets more than the usual waits.
const QEMU_WAIT: Duration = Duration::from_secs(90);

fn aarch64_binary() -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
        "dist/fieldgate-{}-aarch64-linux",
        env!("CARGO_PKG_VERSION")
    ));
    path.is_file().then_some(path)
}

fn qemu() -> Option<&'static str> {
    ["qemu-aarch64-static", "qemu-aarch64"]
        .into_iter()
        .find(|program| {
            Command::new(program)
                .arg("--version")
                .output()
                .is_ok_and(|output| output.status.success())
        })
}

#[tokio::test]
async fn aarch64_binary_buffers_across_a_restart_and_forwards_to_mosquitto() {
    let Some(binary) = aarch64_binary() else {
        eprintln!(
            "SKIPPED aarch64 under qemu-user: no dist/fieldgate-{}-aarch64-linux \
             (run scripts/release.sh to build it)",
            env!("CARGO_PKG_VERSION")
        );
        return;
    };
    let Some(qemu) = qemu() else {
        eprintln!(
            "SKIPPED aarch64 under qemu-user: qemu-user is not installed \
             (apt-get install qemu-user-static)"
        );
        return;
    };
    let version = Command::new(qemu)
        .arg(&binary)
        .arg("--version")
        .output()
        .expect("run the aarch64 binary");
    let version = String::from_utf8_lossy(&version.stdout);
    assert!(
        version.contains("target: aarch64-unknown-linux-gnu (static)"),
        "{version}"
    );

    // The cloud is down: devices' events are acked once they are in the disk buffer.
    let broker_port = free_port();
    let config = GatewayConfig::new(broker_port).source("ack = true");
    let launch = Launch {
        binary: Some(binary),
        prefix: vec![qemu.to_owned()],
        ..Launch::default()
    };
    let mut gateway = Gateway::spawn_with(&config.render(), launch);
    gateway.wait_ready().await;
    for device in DEVICES {
        let report = AckSender {
            limit: QEMU_WAIT,
            ..AckSender::new(config.device_addr(), device, MESSAGES)
        }
        .run()
        .await;
        assert_eq!(
            report.acked.len() as u64,
            MESSAGES,
            "{device}: not every event acked: {:?}",
            &report.errors[..report.errors.len().min(5)]
        );
    }
    // The devices' events, plus their connection status events.
    let data = (MESSAGES * DEVICES.len() as u64) as f64;
    gateway
        .wait_metric(
            "fieldgate_buffer_events",
            &[("sink", "cloud")],
            QEMU_WAIT,
            |v| v >= data,
        )
        .await;
    let status = gateway.terminate().await;
    assert!(status.success(), "exit status {status}");

    // The cloud comes up; the restarted gateway sends what its buffer kept.
    let broker = Mosquitto::start(broker_port).await;
    let sub = Subscriber::connect(broker.port).await;
    gateway.restart().await;
    let names: Vec<String> = DEVICES.iter().map(|d| (*d).to_owned()).collect();
    let mut collector = Collector::default();
    collector
        .wait_all(&sub, &expected(&names, MESSAGES), QEMU_WAIT)
        .await;
    gateway
        .wait_metric(
            "fieldgate_buffer_events",
            &[("sink", "cloud")],
            QEMU_WAIT,
            |v| v == 0.0,
        )
        .await;
    let status = gateway.terminate().await;
    assert!(status.success(), "exit status {status}");
}
