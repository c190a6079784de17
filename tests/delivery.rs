//! Delivery: many TCP devices' messages all reach a subscriber of the upstream broker,
//! complete and in per-device order, as envelopes, raw, and batched.

mod common;

use std::time::Duration;

use common::{
    Collector, Device, Gateway, GatewayConfig, Mosquitto, Subscriber, data_message, device_names,
    expected, free_port,
};

/// Connects `names` as devices and sends `count` messages each (seq 1..=count), all
/// devices concurrently. Returns the open connections (kept open until delivery).
async fn send_all(config: &GatewayConfig, names: &[String], count: u64) -> Vec<Device> {
    let mut tasks = Vec::new();
    for name in names {
        let addr = config.device_addr();
        let name = name.clone();
        tasks.push(tokio::spawn(async move {
            let mut device = Device::connect(addr)
                .await
                .unwrap_or_else(|e| panic!("{name}: connect {addr}: {e}"));
            let mut block = String::new();
            for seq in 1..=count {
                block.push_str(&data_message(&name, seq, 16).to_string());
                block.push('\n');
                // Write in chunks of 10 lines, so frames also cross TCP segment boundaries.
                if seq % 10 == 0 || seq == count {
                    device
                        .send_raw(block.as_bytes())
                        .await
                        .unwrap_or_else(|e| panic!("{name}: send seq {seq}: {e}"));
                    block.clear();
                }
            }
            device
        }));
    }
    let mut devices = Vec::new();
    for task in tasks {
        devices.push(task.await.expect("device task"));
    }
    devices
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_devices_times_one_hundred_messages_arrive_in_order() {
    let broker = Mosquitto::start(free_port()).await;
    let sub = Subscriber::connect(broker.port).await;
    let config = GatewayConfig::new(broker.port);
    let gateway = Gateway::start(&config.render()).await;

    let names = device_names("dev", 200);
    let _devices = send_all(&config, &names, 100).await;

    let want = expected(&names, 100);
    let mut collector = Collector::default();
    collector
        .wait_all(&sub, &want, Duration::from_secs(120))
        .await;

    let violations = collector.order_violations();
    assert!(
        violations.is_empty(),
        "per-device order broken for {} devices: {:?}",
        violations.len(),
        &violations[..violations.len().min(10)]
    );
    assert_eq!(
        collector.duplicates(),
        0,
        "duplicates without any failure injected"
    );

    // Envelope shape and topic of one message.
    let msg = sub
        .messages()
        .into_iter()
        .find(|m| m.topic == "gateways/gw-1/devices/dev-007/telemetry")
        .expect("a message of dev-007 on its telemetry topic");
    let envelope = msg.json().expect("envelope is JSON");
    assert_eq!(envelope["device"], "dev-007", "envelope: {envelope}");
    assert_eq!(envelope["kind"], "telemetry", "envelope: {envelope}");
    assert_eq!(envelope["source"], "devices", "envelope: {envelope}");
    assert!(
        envelope["id"].as_str().is_some_and(|id| id.len() == 20
            && id
                .bytes()
                .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())),
        "the envelope carries the event id (20 characters of Crockford base32): {envelope}"
    );
    assert!(
        envelope["received_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "received_at is an RFC 3339 UTC time: {envelope}"
    );
    assert_eq!(
        envelope["payload"]["device"], "dev-007",
        "payload unchanged: {envelope}"
    );
    assert_eq!(
        envelope["payload"]["temp"], 21.5,
        "payload unchanged: {envelope}"
    );

    let sent = gateway
        .wait_metric(
            "fieldgate_sent_events_total",
            &[("sink", "cloud")],
            Duration::from_secs(10),
            |v| v >= 20_000.0,
        )
        .await;
    let received = gateway
        .metric("fieldgate_received_events_total", &[("source", "devices")])
        .await
        .expect("fieldgate_received_events_total{source=\"devices\"}");
    assert!(received >= 20_000.0, "received_events_total = {received}");
    assert!(sent >= 20_000.0, "sent_events_total = {sent}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_format_forwards_the_device_json_unchanged() {
    let broker = Mosquitto::start(free_port()).await;
    let sub = Subscriber::connect(broker.port).await;
    let config = GatewayConfig::new(broker.port).sink("format = \"raw\"");
    let _gateway = Gateway::start(&config.render()).await;

    let names = device_names("raw", 10);
    let _devices = send_all(&config, &names, 100).await;

    let want = expected(&names, 100);
    let mut collector = Collector::default();
    collector
        .wait_all(&sub, &want, Duration::from_secs(60))
        .await;
    assert!(
        collector.order_violations().is_empty(),
        "{:?}",
        collector.order_violations()
    );

    let msg = sub
        .messages()
        .into_iter()
        .find(|m| m.topic == "gateways/gw-1/devices/raw-003/telemetry")
        .expect("a message of raw-003 on its telemetry topic");
    let json = msg.json().expect("raw payload is JSON");
    let seq = json["seq"].as_u64().expect("seq in the raw payload");
    assert_eq!(
        json,
        data_message("raw-003", seq, 16),
        "raw format must be the device's JSON unchanged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_with_qos_by_kind_delivers_in_order() {
    let broker = Mosquitto::start(free_port()).await;
    let sub = Subscriber::connect(broker.port).await;
    let config = GatewayConfig::new(broker.port)
        .sink("protocol = \"5\"")
        .sink("session_expiry = \"10m\"")
        .sink("qos_by_kind = { telemetry = 2, status = 1 }");
    let gateway = Gateway::start(&config.render()).await;

    let names = device_names("v5", 10);
    let _devices = send_all(&config, &names, 100).await;

    let mut collector = Collector::default();
    collector
        .wait_all(&sub, &expected(&names, 100), Duration::from_secs(60))
        .await;
    assert!(
        collector.order_violations().is_empty(),
        "{:?}",
        collector.order_violations()
    );
    // Every publish was acknowledged (PUBCOMP for the QoS 2 telemetry) and left the buffer.
    gateway
        .wait_metric(
            "fieldgate_buffer_events",
            &[("sink", "cloud")],
            Duration::from_secs(30),
            |v| v == 0.0,
        )
        .await;
    let retained = sub
        .messages()
        .into_iter()
        .any(|m| m.topic == "gateways/gw-1/status" && m.text() == "online");
    assert!(retained, "no online status over MQTT 5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batching_sends_arrays_to_the_batch_topic_complete_and_in_order() {
    let broker = Mosquitto::start(free_port()).await;
    let sub = Subscriber::connect(broker.port).await;
    let config = GatewayConfig::new(broker.port)
        .sink("batch_max_events = 50")
        .sink("batch_max_delay = \"20ms\"")
        .sink("batch_topic = \"gateways/{gateway}/batch\"");
    let _gateway = Gateway::start(&config.render()).await;

    let names = device_names("bat", 20);
    let _devices = send_all(&config, &names, 100).await;

    let want = expected(&names, 100);
    let mut collector = Collector::default();
    collector
        .wait_all(&sub, &want, Duration::from_secs(60))
        .await;
    assert!(
        collector.order_violations().is_empty(),
        "{:?}",
        collector.order_violations()
    );
    assert_eq!(collector.duplicates(), 0);

    let messages = sub.messages();
    let data: Vec<_> = messages
        .iter()
        .filter(|m| !m.topic.ends_with("/status"))
        .collect();
    for msg in &data {
        assert_eq!(msg.topic, "gateways/gw-1/batch", "batch_topic not used");
        let value = msg.json().expect("batch is JSON");
        let items = value.as_array().expect("a batch is a JSON array");
        assert!(
            !items.is_empty() && items.len() <= 50,
            "batch of {} events (batch_max_events = 50)",
            items.len()
        );
        assert!(
            items
                .iter()
                .all(|i| i.get("payload").is_some() && i.get("device").is_some()),
            "batch items are envelopes"
        );
    }
    let largest = data
        .iter()
        .filter_map(|m| m.json())
        .filter_map(|v| v.as_array().map(Vec::len))
        .max()
        .unwrap_or(0);
    assert!(
        largest > 1,
        "2,000 events sent in bursts but no batch held more than one event"
    );
}

/// One `length_prefixed` frame: u32 big-endian length, then the bytes.
fn frame(bytes: &[u8]) -> Vec<u8> {
    let len = u32::try_from(bytes.len()).expect("frame fits u32");
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

/// Reads one `length_prefixed` frame as JSON.
async fn read_frame(stream: &mut tokio::net::TcpStream) -> serde_json::Value {
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut len = [0u8; 4];
        stream.read_exact(&mut len).await?;
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        stream.read_exact(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    let body = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a frame from the gateway within 10 s")
        .expect("read frame");
    serde_json::from_slice(&body).expect("gateway frame is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn length_prefixed_framing_with_binary_payloads() {
    use base64::Engine as _;
    use tokio::io::AsyncWriteExt;

    let broker = Mosquitto::start(free_port()).await;
    let sub = Subscriber::connect(broker.port).await;
    let config = GatewayConfig::new(broker.port)
        .source("framing = \"length_prefixed\"")
        .source("ack = true");
    let _gateway = Gateway::start(&config.render()).await;

    let mut stream = tokio::net::TcpStream::connect(config.device_addr())
        .await
        .expect("connect");
    stream
        .write_all(&frame(br#"{"type":"hello","device":"lp-1"}"#))
        .await
        .expect("hello");
    let welcome = read_frame(&mut stream).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");

    // JSON frames, some containing newlines (no meaning in this framing).
    let mut bytes = Vec::new();
    for seq in 1..=50u64 {
        let json = format!("{{\"device\":\"lp-1\",\n\"seq\":{seq},\"note\":\"a\\nb\"}}");
        bytes.extend(frame(json.as_bytes()));
    }
    stream.write_all(&bytes).await.expect("send frames");
    for seq in 1..=50u64 {
        let ack = read_frame(&mut stream).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["seq"], seq, "{ack}");
    }
    // A binary frame: telemetry of the hello'd device, base64 in the envelope.
    let binary = [0x01u8, 0x02, 0xff, 0x00, b'\n', 0x7b];
    stream.write_all(&frame(&binary)).await.expect("binary");
    let ack = read_frame(&mut stream).await;
    assert_eq!(ack["type"], "ack", "{ack}");

    let mut collector = Collector::default();
    collector
        .wait_all(
            &sub,
            &expected(&["lp-1".to_string()], 50),
            Duration::from_secs(30),
        )
        .await;
    assert!(collector.order_violations().is_empty());
    let encoded = base64::engine::general_purpose::STANDARD.encode(binary);
    let found = sub
        .wait_until(Duration::from_secs(30), |msgs| {
            msgs.iter()
                .filter_map(common::Msg::json)
                .any(|e| e["payload"] == encoded.as_str())
        })
        .await;
    assert!(found, "binary frame not forwarded as base64 {encoded:?}");
    let envelope = sub
        .messages()
        .iter()
        .filter_map(common::Msg::json)
        .find(|e| e["payload"] == encoded.as_str())
        .expect("binary envelope");
    assert_eq!(envelope["encoding"], "base64", "{envelope}");
    assert_eq!(envelope["device"], "lp-1", "{envelope}");
}
