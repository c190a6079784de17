//! Hostile devices (invalid JSON, oversize frames, random bytes, slow-loris, error floods)
//! beside well-behaved ones: errors are answered and counted, bad connections closed after
//! `max_errors`, good devices unaffected, and no file descriptor leaks over 1,000
//! connect/disconnect cycles.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{
    Collector, Device, Gateway, GatewayConfig, Mosquitto, Subscriber, data_message, device_names,
    eventually, expected, free_port, sum_metric,
};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

const MAX_ERRORS: usize = 3;

fn hostile_config(mqtt_port: u16) -> GatewayConfig {
    GatewayConfig::new(mqtt_port)
        .source("max_frame = \"1KiB\"")
        .source(&format!("max_errors = {MAX_ERRORS}"))
        .source("frame_timeout = \"1s\"")
}

fn code(frame: &Value) -> &str {
    frame.get("code").and_then(Value::as_str).unwrap_or("")
}

/// Reads frames until an error frame arrives; returns its code.
async fn expect_error(device: &mut Device, what: &str) -> String {
    let frame = device.expect_type("error", Duration::from_secs(10)).await;
    let code = code(&frame).to_string();
    eprintln!("{what}: {frame}");
    code
}

/// A good device: hello, then `count` messages, paced a little so it overlaps the attacks.
async fn good_device(addr: SocketAddr, name: String, count: u64) -> Device {
    let mut device = Device::connect(addr).await.expect("good device connects");
    device.hello(&name).await;
    for seq in 1..=count {
        device
            .send_json(&data_message(&name, seq, 8))
            .await
            .unwrap_or_else(|e| panic!("{name}: send {seq}: {e}"));
        if seq % 20 == 0 {
            tokio::task::yield_now().await;
        }
    }
    device
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_devices_are_answered_counted_and_closed_good_ones_unaffected() {
    let broker = Mosquitto::start(free_port()).await;
    let sub = Subscriber::connect(broker.port).await;
    let config = hostile_config(broker.port);
    let mut gateway = Gateway::start(&config.render()).await;
    let addr = config.device_addr();

    let names = device_names("good", 20);
    let good: Vec<_> = names
        .iter()
        .map(|n| tokio::spawn(good_device(addr, n.clone(), 200)))
        .collect();

    // Invalid JSON: one error frame, the connection stays usable.
    let invalid_json = tokio::spawn(async move {
        let mut d = Device::connect(addr).await.expect("connect");
        d.send_raw(b"{\"device\": \"bad-json\", \"seq\": 1,,}\n")
            .await
            .expect("send");
        let code = expect_error(&mut d, "invalid JSON").await;
        assert_eq!(code, "invalid_json");
        // Still open after one error (max_errors = 3): a valid frame is accepted.
        d.send_json(&json!({"device": "bad-json", "seq": 2, "ok": true}))
            .await
            .expect("send after one error");
    });

    // Not an object, and data without a device.
    let shapes = tokio::spawn(async move {
        let mut d = Device::connect(addr).await.expect("connect");
        d.send_raw(b"[1, 2, 3]\n").await.expect("send");
        assert_eq!(expect_error(&mut d, "array").await, "not_an_object");
        d.send_raw(b"{\"seq\": 1}\n").await.expect("send");
        assert_eq!(expect_error(&mut d, "no device").await, "missing_device");
    });

    // Oversize frame (> max_frame = 1 KiB).
    let oversize = tokio::spawn(async move {
        let mut d = Device::connect(addr).await.expect("connect");
        let mut frame = json!({"device": "big", "pad": "y".repeat(4096)}).to_string();
        frame.push('\n');
        // The gateway may close before reading everything: a failed write is fine.
        let _sent = d.send_raw(frame.as_bytes()).await;
        assert_eq!(expect_error(&mut d, "oversize").await, "frame_too_large");
    });

    // Random bytes: errors, then closed after max_errors.
    let random = tokio::spawn(async move {
        let mut d = Device::connect(addr).await.expect("connect");
        let mut rng = fastrand::Rng::with_seed(7);
        let mut bytes: Vec<u8> = (0..4096).map(|_| rng.u8(..)).collect();
        for chunk in bytes.chunks_mut(97) {
            if let Some(last) = chunk.last_mut() {
                *last = b'\n';
            }
        }
        let _sent = d.send_raw(&bytes).await;
        let frames = d.expect_closed(Duration::from_secs(10)).await;
        assert!(
            frames.iter().any(|f| f["type"] == "error"),
            "random bytes got no error frame: {frames:?}"
        );
        frames.len()
    });

    // Error flood: exactly max_errors bad frames -> too_many_errors, then closed.
    let flood = tokio::spawn(async move {
        let mut d = Device::connect(addr).await.expect("connect");
        for _ in 0..MAX_ERRORS {
            d.send_raw(b"nope\n").await.expect("send");
        }
        let frames = d.expect_closed(Duration::from_secs(10)).await;
        let errors: Vec<&str> = frames.iter().map(code).collect();
        assert!(
            errors.iter().filter(|c| **c == "invalid_json").count() >= MAX_ERRORS - 1,
            "expected invalid_json errors before the close, got {frames:?}"
        );
        assert!(
            errors.contains(&"too_many_errors"),
            "expected a too_many_errors frame before the close, got {frames:?}"
        );
    });

    // Slow-loris: half a frame, then silence. frame_timeout = 1 s.
    let slow_loris = tokio::spawn(async move {
        let mut d = Device::connect(addr).await.expect("connect");
        let started = Instant::now();
        d.send_raw(b"{\"device\": \"slow\", \"seq\": 1, \"te")
            .await
            .expect("send");
        let frame = d.expect_type("error", Duration::from_secs(10)).await;
        assert_eq!(code(&frame), "frame_timeout", "{frame}");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(900),
            "frame_timeout after only {waited:?}"
        );
        waited
    });

    invalid_json.await.expect("invalid JSON device");
    shapes.await.expect("shape errors device");
    oversize.await.expect("oversize device");
    let random_frames = random.await.expect("random bytes device");
    flood.await.expect("error flood device");
    let loris_wait = slow_loris.await.expect("slow-loris device");
    eprintln!(
        "random bytes: {random_frames} frames before close; slow-loris timed out after {loris_wait:?}"
    );

    let _good_conns: Vec<Device> = {
        let mut out = Vec::new();
        for task in good {
            out.push(task.await.expect("good device"));
        }
        out
    };
    let mut want = expected(&names, 200);
    want.insert("bad-json".to_string(), [2].into());
    let mut collector = Collector::default();
    collector
        .wait_all(&sub, &want, Duration::from_secs(60))
        .await;
    assert!(
        collector.order_violations().is_empty(),
        "{:?}",
        collector.order_violations()
    );
    for device in ["big", "slow"] {
        assert!(
            !collector.seen.contains_key(device),
            "a rejected frame of {device} was forwarded"
        );
    }

    let metrics = gateway.metrics().await;
    let failures = sum_metric(
        &metrics,
        "fieldgate_protocol_parse_failures_total",
        &[("source", "devices")],
    );
    let by_reason: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("fieldgate_protocol_parse_failures_total"))
        .collect();
    eprintln!("parse failures: {by_reason:?}");
    // 1 invalid JSON + 2 shapes + 1 oversize + >= 1 random + 3 flood + 1 slow-loris.
    assert!(
        failures >= 9.0,
        "fieldgate_protocol_parse_failures_total{{source=\"devices\"}} = {failures}, expected >= 9: {by_reason:?}"
    );
    for reason in ["invalid_json", "frame_too_large", "frame_timeout"] {
        assert!(
            by_reason
                .iter()
                .any(|l| l.contains(&format!("reason=\"{reason}\""))),
            "no parse failure counted with reason {reason:?}: {by_reason:?}"
        );
    }
    assert!(gateway.exited().is_none(), "the gateway died");
    assert!(
        !gateway.stderr().contains("panicked"),
        "the gateway panicked:\n{}",
        gateway.stderr_tail(40)
    );
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or_else(|e| panic!("read /proc/{pid}/fd: {e}"))
}

/// One connect/disconnect cycle of a few kinds.
async fn cycle(addr: SocketAddr, i: usize) {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        panic!("cycle {i}: connect failed");
    };
    let payload: &[u8] = match i % 4 {
        0 => b"",
        1 => b"{\"device\":\"cycler\",\"seq\":1}\n",
        2 => b"garbage\n",
        _ => b"{\"device\":\"cyc",
    };
    if !payload.is_empty() {
        let _sent = stream.write_all(payload).await;
    }
    if i % 8 == 3 {
        // Abortive close (RST) for some.
        let _linger = stream.set_zero_linger();
    }
    drop(stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_fds_back_to_baseline_after_1000_connect_disconnect_cycles() {
    let broker = Mosquitto::start(free_port()).await;
    let config = hostile_config(broker.port);
    let gateway = Gateway::start(&config.render()).await;
    let addr = config.device_addr();
    let pid = gateway.pid();

    // Warm up (lazy allocations, upstream connection), then take the baseline.
    for i in 0..20 {
        cycle(addr, i).await;
    }
    gateway
        .wait_metric(
            "fieldgate_connections",
            &[("source", "devices")],
            Duration::from_secs(15),
            |v| v == 0.0,
        )
        .await;
    let baseline = open_fds(pid);
    let metric_baseline = gateway.metric("process_open_fds", &[]).await;

    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..20 {
        tasks.push(tokio::spawn(async move {
            for j in 0..50 {
                cycle(addr, worker * 50 + j).await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("cycle worker");
    }
    eprintln!("1,000 connect/disconnect cycles in {:?}", started.elapsed());

    let slack = 5;
    let back = eventually(Duration::from_secs(15), || {
        let now = open_fds(pid);
        (now <= baseline + slack).then_some(now)
    })
    .await;
    let now = open_fds(pid);
    assert!(
        back.is_some(),
        "open FDs {now} did not return to baseline {baseline} (+{slack}) within 15 s"
    );
    let connections = gateway
        .wait_metric(
            "fieldgate_connections",
            &[("source", "devices")],
            Duration::from_secs(15),
            |v| v == 0.0,
        )
        .await;
    let metric_now = gateway.metric("process_open_fds", &[]).await;
    eprintln!(
        "open fds: baseline {baseline}, after {now}; process_open_fds {metric_baseline:?} -> {metric_now:?}; connections {connections}"
    );
    assert!(
        metric_now.is_some(),
        "process_open_fds metric missing from /metrics"
    );
}

/// The latest device status (`online`/`offline`) published for `device`.
fn last_status(msgs: &[common::Msg], device: &str) -> Option<String> {
    let topic = format!("gateways/gw-1/devices/{device}/status");
    msgs.iter()
        .filter(|m| m.topic == topic)
        .flat_map(common::device_objects)
        .filter_map(|p| p.get("status").and_then(Value::as_str).map(str::to_string))
        .last()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_device_is_closed_and_marked_offline_heartbeats_keep_one_alive() {
    let broker = Mosquitto::start(free_port()).await;
    let sub = Subscriber::connect(broker.port).await;
    let config = GatewayConfig::new(broker.port)
        .source("heartbeat_interval = \"300ms\"")
        .source("heartbeat_misses = 3");
    let _gateway = Gateway::start(&config.render()).await;
    let addr = config.device_addr();

    let mut silent = Device::connect(addr).await.expect("connect");
    silent.hello("silent-1").await;
    let mut lively = Device::connect(addr).await.expect("connect");
    lively.hello("lively-1").await;
    assert!(
        sub.wait_until(Duration::from_secs(10), |m| {
            last_status(m, "silent-1").as_deref() == Some("online")
        })
        .await,
        "no online status for silent-1"
    );

    // The lively device sends a heartbeat every 100 ms for 2.5 s (> 3 x 300 ms).
    let started = Instant::now();
    let keep_alive = tokio::spawn(async move {
        while started.elapsed() < Duration::from_millis(2500) {
            lively
                .send_json(&json!({"type": "heartbeat"}))
                .await
                .expect("heartbeat: lively device was closed despite heartbeats");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        lively
    });

    // Silent for 3 x 300 ms: closed.
    let frames = silent.expect_closed(Duration::from_secs(10)).await;
    let closed_after = started.elapsed();
    eprintln!("silent device closed after {closed_after:?}; frames {frames:?}");
    assert!(
        closed_after >= Duration::from_millis(600),
        "closed after only {closed_after:?}"
    );
    assert!(
        sub.wait_until(Duration::from_secs(10), |m| {
            last_status(m, "silent-1").as_deref() == Some("offline")
        })
        .await,
        "silent-1 not marked offline upstream"
    );
    let offline = sub
        .messages()
        .into_iter()
        .rfind(|m| m.topic == "gateways/gw-1/devices/silent-1/status")
        .expect("status message");
    eprintln!(
        "offline status: {} (retain {})",
        offline.text(),
        offline.retain
    );

    let mut lively = keep_alive.await.expect("keep-alive task");
    lively
        .send_json(&data_message("lively-1", 1, 8))
        .await
        .expect("lively device still connected");
    let mut collector = Collector::default();
    collector
        .wait_all(
            &sub,
            &expected(&["lively-1".to_string()], 1),
            Duration::from_secs(10),
        )
        .await;
    assert_ne!(
        last_status(&sub.messages(), "lively-1").as_deref(),
        Some("offline"),
        "lively-1 was marked offline despite heartbeats"
    );

    // Device status events are published retained: a fresh subscriber sees offline.
    let fresh =
        Subscriber::connect_with(broker.port, "gateways/gw-1/devices/silent-1/status", None).await;
    assert!(
        fresh
            .wait_until(Duration::from_secs(5), |m| m
                .first()
                .is_some_and(|m| m.retain
                    && last_status(std::slice::from_ref(m), "silent-1").as_deref()
                        == Some("offline")))
            .await,
        "no retained offline status for silent-1: {:?}",
        fresh.messages()
    );
}
