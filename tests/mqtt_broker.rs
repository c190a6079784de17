//! The embedded MQTT broker (`type = "mqtt_broker"`), black-box: the real gateway with
//! real clients (mosquitto_pub/mosquitto_sub, rumqttc, Python paho-mqtt 2.x in both
//! protocol versions) and a scripted raw-TCP client that misbehaves.
//!
//! What is shown: a QoS 1 PUBACK leaves only once the event is in the sink's buffer (a
//! full `block` buffer withholds it, and every PUBACKed event survives `kill -9`); both
//! protocol versions interoperate (wildcards, retained, wills, takeover, persistent
//! sessions, QoS 2, shared subscriptions, v5 properties, topic aliases); registry
//! credentials, ACLs, commands and revocation; hostile clients are refused cleanly and
//! never hurt another client.
//!
//! Python: `$FIELDGATE_PYTHON` (set by `scripts/test.sh` to the virtual environment it
//! installs paho-mqtt into), else `target/pyenv`, else `python3`.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::{
    Gateway, Mosquitto, Pki, Subscriber, api_request, device_objects, eventually, free_port,
};
use rumqttc::mqttbytes::{QoS, v4};
use rumqttc::v5::mqttbytes::{QoS as QoS5, v5};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

const ADMIN: &str = "admin-secret-for-tests";
const WAIT: Duration = Duration::from_secs(20);

/// A gateway config: the broker source `mqtt` on `broker`, one sink fed by it.
fn config(api: u16, broker: u16, source_extra: &str, sink: &str, tail: &str) -> String {
    format!(
        "[gateway]\nid = \"gw-1\"\nshutdown_grace = \"5s\"\n\n[api]\naddress = \"127.0.0.1:{api}\"\nadmin_token = \"{ADMIN}\"\n\n\
         [sources.mqtt]\ntype = \"mqtt_broker\"\naddress = \"127.0.0.1:{broker}\"\n{source_extra}\n\n{sink}\n\n{tail}\n"
    )
}

fn file_sink() -> String {
    "[sinks.local]\ntype = \"file\"\ninputs = [\"mqtt\"]".into()
}

fn cloud_sink(port: u16, buffer: &str) -> String {
    format!(
        "[sinks.cloud]\ntype = \"mqtt\"\ninputs = [\"mqtt\"]\nurl = \"mqtt://127.0.0.1:{port}\"\nkeep_alive = \"5s\"\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\n\n[sinks.cloud.buffer]\ntype = \"disk\"\n{buffer}"
    )
}

fn python() -> PathBuf {
    if let Some(python) = std::env::var_os("FIELDGATE_PYTHON") {
        return PathBuf::from(python);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"),
        PathBuf::from,
    );
    let venv = target.join("pyenv").join("bin").join("python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// A scripted MQTT client on a raw socket, speaking through rumqttc's codec.
struct Raw {
    stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    async fn open(addr: SocketAddr) -> Self {
        Raw {
            stream: TcpStream::connect(addr)
                .await
                .expect("connect to the broker"),
            buf: BytesMut::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }

    async fn send4(&mut self, packet: v4::Packet) -> bool {
        let mut out = BytesMut::new();
        packet.write(&mut out, usize::MAX).expect("encode");
        self.send(&out).await
    }

    async fn send5(&mut self, packet: v5::Packet) -> bool {
        let mut out = BytesMut::new();
        packet.write(&mut out, None).expect("encode");
        self.send(&out).await
    }

    /// Reads more bytes; false on close, error or timeout.
    async fn fill(&mut self, deadline: Instant) -> bool {
        self.buf.reserve(4096);
        matches!(
            tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await,
            Ok(Ok(n)) if n > 0
        )
    }

    async fn next4(&mut self, limit: Duration) -> Option<v4::Packet> {
        let deadline = Instant::now() + limit;
        loop {
            match v4::Packet::read(&mut self.buf, 1 << 24) {
                Ok(packet) => return Some(packet),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(err) => panic!("the broker sent a bad packet: {err}"),
            }
            if !self.fill(deadline).await {
                return None;
            }
        }
    }

    async fn next5(&mut self, limit: Duration) -> Option<v5::Packet> {
        let deadline = Instant::now() + limit;
        loop {
            match v5::Packet::read(&mut self.buf, None) {
                Ok(packet) => return Some(packet),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(err) => panic!("the broker sent a bad packet: {err}"),
            }
            if !self.fill(deadline).await {
                return None;
            }
        }
    }

    /// Whether the broker closes the connection within `limit` (anything it sends first
    /// is skipped).
    async fn closed_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut scratch = [0u8; 1024];
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut scratch)).await {
                Ok(Ok(0) | Err(_)) => return true,
                Ok(Ok(_)) => {}
                Err(_) => return false,
            }
        }
    }

    async fn connect4(
        addr: SocketAddr,
        client: &str,
        login: Option<(&str, &str)>,
    ) -> (Self, v4::ConnectReturnCode) {
        let mut raw = Raw::open(addr).await;
        let mut connect = v4::Connect::new(client);
        connect.keep_alive = 30;
        if let Some((user, password)) = login {
            connect.set_login(user, password);
        }
        assert!(raw.send4(v4::Packet::Connect(connect)).await);
        match raw.next4(WAIT).await {
            Some(v4::Packet::ConnAck(ack)) => (raw, ack.code),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn connect5(
        addr: SocketAddr,
        client: &str,
        login: Option<(&str, &str)>,
    ) -> (Self, v5::ConnectReturnCode) {
        let mut raw = Raw::open(addr).await;
        let connect = v5::Connect {
            keep_alive: 30,
            client_id: client.into(),
            clean_start: true,
            properties: None,
        };
        let login = login.map(|(user, password)| v5::Login::new(user, password));
        assert!(raw.send5(v5::Packet::Connect(connect, None, login)).await);
        match raw.next5(WAIT).await {
            Some(v5::Packet::ConnAck(ack)) => (raw, ack.code),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }
}

fn publish4(topic: &str, qos: QoS, id: u16, payload: impl Into<Bytes>) -> v4::Packet {
    let mut publish = v4::Publish::new(topic, qos, payload.into());
    publish.pkid = id;
    v4::Packet::Publish(publish)
}

/// 3.3.4 / durability: a QoS 1 PUBACK means "in the buffer". With the cloud away and a
/// small `block` buffer, PUBACKs stop when it is full (the broker stops reading); after
/// `kill -9` and a restart every PUBACKed event reaches the cloud.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_3_4_puback_waits_for_the_buffer_and_survives_kill9() {
    let (api, broker, cloud) = (free_port(), free_port(), free_port());
    let text = config(
        api,
        broker,
        "auth = \"none\"\ndevice_topic = \"devices/{device}/{kind}\"\nmax_inflight = 8",
        &cloud_sink(cloud, "max_size = \"1MiB\"\nwhen_full = \"block\""),
        "",
    );
    let mut gateway = Gateway::start(&text).await;
    let addr: SocketAddr = ([127, 0, 0, 1], broker).into();
    let (raw, code) = Raw::connect4(addr, "pub-1", None).await;
    assert_eq!(code, v4::ConnectReturnCode::Success);
    const SENT: u16 = 600;
    let Raw { stream, buf } = raw;
    let (mut reader, mut writer) = stream.into_split();
    let pad = "x".repeat(4000);
    let writing = tokio::spawn(async move {
        for seq in 1..=SENT {
            let payload = json!({"device": "d1", "seq": seq, "pad": pad}).to_string();
            let mut out = BytesMut::new();
            publish4("devices/d1/telemetry", QoS::AtLeastOnce, seq, payload)
                .write(&mut out, usize::MAX)
                .expect("encode");
            if writer.write_all(&out).await.is_err() {
                return;
            }
        }
    });
    // Collect PUBACKs until none has come for 2 s.
    let mut acked = BTreeSet::new();
    let mut incoming = buf;
    loop {
        match v4::Packet::read(&mut incoming, 1 << 20) {
            Ok(v4::Packet::PubAck(ack)) => {
                acked.insert(ack.pkid);
                continue;
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(err) => panic!("bad packet: {err}"),
        }
        incoming.reserve(4096);
        match timeout(Duration::from_secs(2), reader.read_buf(&mut incoming)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => break,
        }
    }
    eprintln!(
        "{} of {SENT} publishes PUBACKed before the buffer filled",
        acked.len()
    );
    assert!(!acked.is_empty(), "nothing was acknowledged");
    assert!(
        acked.len() < usize::from(SENT),
        "all {SENT} PUBACKed although the 1 MiB buffer cannot hold them"
    );
    // PUBACKs in order, without gaps: 1..=K.
    let expected: BTreeSet<u16> = (1..=u16::try_from(acked.len()).expect("fits")).collect();
    assert_eq!(acked, expected, "PUBACKs out of order");
    writing.abort();

    gateway.kill9();
    let mut mosquitto = Mosquitto::start(cloud).await;
    let subscriber = Subscriber::connect_with(cloud, "gateways/#", None).await;
    gateway.restart().await;
    let all_there = subscriber
        .wait_until(Duration::from_secs(60), |msgs| {
            let seen: BTreeSet<u16> = msgs
                .iter()
                .flat_map(device_objects)
                .filter_map(|object| object["seq"].as_u64())
                .filter_map(|seq| u16::try_from(seq).ok())
                .collect();
            acked.is_subset(&seen)
        })
        .await;
    assert!(
        all_there,
        "a PUBACKed event was lost across kill -9\n{}",
        gateway.stderr_tail(30)
    );
    mosquitto.kill();
}

/// Interop with real clients of both versions: mosquitto_pub/mosquitto_sub (3.1.1 and
/// `-V 5`), rumqttc, and paho-mqtt 2.x running the conformance script for 3.1.1 and 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_of_both_versions_interoperate() {
    let (api, broker) = (free_port(), free_port());
    let text = config(
        api,
        broker,
        "auth = \"none\"\ndevice_topic = \"devices/{device}/{kind}\"",
        &file_sink(),
        "",
    );
    let gateway = Gateway::start(&text).await;
    let rumqttc_sub = Subscriber::connect_with(broker, "devices/#", None).await;
    let mosquitto_sub = std::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.to_string(),
            "-V",
            "5",
            "-q",
            "1",
        ])
        .args(["-t", "devices/+/alarm", "-C", "1", "-W", "15", "-v"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    // Give mosquitto_sub its SUBACK: wait until the broker routes to it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (version, qos, topic, payload) in [
        ("mqttv311", "1", "devices/m1/telemetry", r#"{"seq":1}"#),
        ("5", "2", "devices/m2/alarm", r#"{"seq":2}"#),
    ] {
        let status = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &broker.to_string(),
                "-V",
                version,
                "-q",
                qos,
            ])
            .args(["-t", topic, "-m", payload])
            .status()
            .expect("mosquitto_pub");
        assert!(status.success(), "mosquitto_pub -V {version} failed");
    }
    let output = mosquitto_sub
        .wait_with_output()
        .expect("mosquitto_sub output");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        r#"devices/m2/alarm {"seq":2}"#
    );
    assert!(
        rumqttc_sub.wait_until(WAIT, |msgs| msgs.len() >= 2).await,
        "rumqttc subscriber got {:?}",
        rumqttc_sub.messages()
    );
    // Both publishes became events in the file sink, device and kind from the topic.
    let sink_dir = gateway.data_dir.join("sinks").join("local");
    let events = eventually(WAIT, || {
        let mut lines = Vec::new();
        for entry in std::fs::read_dir(&sink_dir).ok()? {
            let text = std::fs::read_to_string(entry.ok()?.path()).ok()?;
            lines.extend(text.lines().map(str::to_owned));
        }
        (lines.len() >= 2).then_some(lines)
    })
    .await
    .expect("two events in the file sink");
    let events: Vec<Value> = events
        .iter()
        .map(|line| serde_json::from_str(line).expect("NDJSON"))
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["device"] == "m1" && e["kind"] == "telemetry" && e["payload"]["seq"] == 1)
    );
    assert!(
        events
            .iter()
            .any(|e| e["device"] == "m2" && e["kind"] == "alarm" && e["payload"]["seq"] == 2)
    );

    for version in ["3.1.1", "5"] {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/mqtt_broker_paho.py");
        let output = Command::new(python())
            .arg(&script)
            .args(["127.0.0.1", &broker.to_string(), version])
            .output()
            .expect("run python (is paho-mqtt installed? scripts/test.sh installs it)");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("ALL OK"),
            "paho-mqtt {version} checks failed:\n{stdout}\n{}\n{}",
            String::from_utf8_lossy(&output.stderr),
            gateway.stderr_tail(20)
        );
    }
}

/// Registry mode: user name = device id, password = its secret. Bad credentials get
/// CONNACK 0x04 / 0x86; a device is listed as connected, publishes only its own topics,
/// subscribes only to its commands, gets cloud commands and reports results that mark
/// the command succeeded; revocation closes its connection within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_devices_authenticate_get_commands_and_are_revoked() {
    let (api, broker) = (free_port(), free_port());
    let text = config(
        api,
        broker,
        "auth = \"registry\"\ndevice_topic = \"devices/{device}/{kind}\"",
        &file_sink(),
        "[registry]",
    );
    let gateway = Gateway::start(&text).await;
    let (status, provisioned) = api_request(
        gateway.api,
        "POST",
        "/api/v1/devices",
        Some(ADMIN),
        Some(&json!({"id": "dev-1"})),
    )
    .await;
    assert_eq!(status, 201, "{provisioned}");
    let secret = provisioned["secret"].as_str().expect("secret").to_owned();
    let addr: SocketAddr = ([127, 0, 0, 1], broker).into();

    let (_, code) = Raw::connect4(addr, "c1", Some(("dev-1", "wrong"))).await;
    assert_eq!(code, v4::ConnectReturnCode::BadUserNamePassword);
    let (_, code) = Raw::connect5(addr, "c2", Some(("dev-1", "wrong"))).await;
    assert_eq!(code, v5::ConnectReturnCode::BadUserNamePassword);
    let (_, code) = Raw::connect4(addr, "c3", None).await;
    assert_eq!(code, v4::ConnectReturnCode::BadUserNamePassword);

    let (mut device, code) = Raw::connect5(addr, "dev-1-client", Some(("dev-1", &secret))).await;
    assert_eq!(code, v5::ConnectReturnCode::Success);
    // ACL: only its own commands topic.
    let subscribe = |id: u16, filter: &str| {
        let mut subscribe = v5::Subscribe::new(v5::Filter::new(filter, QoS5::AtLeastOnce), None);
        subscribe.pkid = id;
        v5::Packet::Subscribe(subscribe)
    };
    assert!(device.send5(subscribe(1, "#")).await);
    match device.next5(WAIT).await {
        Some(v5::Packet::SubAck(ack)) => assert_eq!(
            ack.return_codes,
            vec![v5::SubscribeReasonCode::NotAuthorized]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    assert!(device.send5(subscribe(2, "devices/dev-1/commands")).await);
    match device.next5(WAIT).await {
        Some(v5::Packet::SubAck(ack)) => assert_eq!(
            ack.return_codes,
            vec![v5::SubscribeReasonCode::Success(QoS5::AtLeastOnce)]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // Another device's topic: PUBACK 0x87.
    let mut foreign = v5::Publish::new("devices/dev-2/telemetry", QoS5::AtLeastOnce, "{}", None);
    foreign.pkid = 3;
    assert!(device.send5(v5::Packet::Publish(foreign)).await);
    match device.next5(WAIT).await {
        Some(v5::Packet::PubAck(ack)) => assert_eq!(ack.reason, v5::PubAckReason::NotAuthorized),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    // A command from the cloud arrives on devices/dev-1/commands.
    let (status, body) = api_request(
        gateway.api,
        "POST",
        "/api/v1/devices/dev-1/commands",
        Some(ADMIN),
        Some(&json!({"id": "cmd-1", "name": "reboot", "params": {"delay": 1}, "ttl": "5m"})),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let command = loop {
        match device.next5(WAIT).await {
            Some(v5::Packet::Publish(publish)) => break publish,
            Some(_) => {}
            None => panic!("no command delivered"),
        }
    };
    assert_eq!(&command.topic[..], b"devices/dev-1/commands");
    let payload: Value = serde_json::from_slice(&command.payload).expect("command JSON");
    assert_eq!(payload["id"], "cmd-1");
    assert_eq!(payload["params"], json!({"delay": 1}));
    if command.qos != QoS5::AtMostOnce {
        assert!(
            device
                .send5(v5::Packet::PubAck(v5::PubAck::new(command.pkid, None)))
                .await
        );
    }
    let mut result = v5::Publish::new(
        "devices/dev-1/command_results",
        QoS5::AtLeastOnce,
        r#"{"id":"cmd-1","status":"ok"}"#,
        None,
    );
    result.pkid = 4;
    assert!(device.send5(v5::Packet::Publish(result)).await);
    match device.next5(WAIT).await {
        Some(v5::Packet::PubAck(ack)) => assert_eq!(ack.reason, v5::PubAckReason::Success),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    let succeeded = common::eventually_async(WAIT, || async {
        let (_, command) = api_request(
            gateway.api,
            "GET",
            "/api/v1/devices/dev-1/commands/cmd-1",
            Some(ADMIN),
            None,
        )
        .await;
        (command["state"] == "succeeded").then_some(())
    })
    .await;
    assert!(succeeded.is_some(), "the command was not marked succeeded");
    // Status events and the command result reached the sink.
    let sink_dir = gateway.data_dir.join("sinks").join("local");
    let kinds = eventually(WAIT, || {
        let mut kinds = BTreeSet::new();
        for entry in std::fs::read_dir(&sink_dir).ok()? {
            let text = std::fs::read_to_string(entry.ok()?.path()).ok()?;
            for line in text.lines() {
                let event: Value = serde_json::from_str(line).ok()?;
                kinds.insert(event["kind"].as_str()?.to_owned());
            }
        }
        (kinds.contains("status") && kinds.contains("command_result")).then_some(kinds)
    })
    .await;
    assert!(
        kinds.is_some(),
        "no status or command_result event in the sink"
    );
    // Revocation closes the session within a second (DISCONNECT 0x98 first).
    let (status, _) = api_request(
        gateway.api,
        "POST",
        "/api/v1/devices/dev-1/revoke",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let started = Instant::now();
    assert!(
        device.closed_within(Duration::from_secs(2)).await,
        "revoked device still connected"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "revocation took {:?}",
        started.elapsed()
    );
    let (_, code) = Raw::connect5(addr, "again", Some(("dev-1", &secret))).await;
    assert_eq!(code, v5::ConnectReturnCode::BadUserNamePassword);
}

/// Hostile clients: each is refused or closed cleanly, memory stays bounded, and a
/// well-behaved client beside them keeps publishing and receiving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_are_refused_and_others_are_unaffected() {
    let (api, broker) = (free_port(), free_port());
    let text = config(
        api,
        broker,
        "auth = \"none\"\nconnect_timeout = \"1s\"\nmax_packet_size = \"4KiB\"\nmax_inflight = 4\nmax_queued_messages = 10",
        &file_sink(),
        "",
    );
    let gateway = Gateway::start(&text).await;
    let addr: SocketAddr = ([127, 0, 0, 1], broker).into();
    let good = Subscriber::connect_with(broker, "good/#", None).await;

    // Garbage instead of CONNECT: closed.
    let mut garbage = Raw::open(addr).await;
    garbage.send(b"GET / HTTP/1.1\r\n\r\n").await;
    assert!(garbage.closed_within(WAIT).await, "garbage kept open");

    // PUBLISH before CONNECT: closed, nothing routed.
    let mut early = Raw::open(addr).await;
    let mut out = BytesMut::new();
    publish4("good/early", QoS::AtMostOnce, 0, "x")
        .write(&mut out, usize::MAX)
        .expect("encode");
    early.send(&out).await;
    assert!(
        early.closed_within(WAIT).await,
        "PUBLISH before CONNECT kept open"
    );

    // A CONNECT that never finishes (half a packet, then silence): closed by connect_timeout.
    let mut half = Raw::open(addr).await;
    half.send(&[0x10, 0x20, 0x00, 0x04, b'M']).await;
    let started = Instant::now();
    assert!(
        half.closed_within(Duration::from_secs(5)).await,
        "half CONNECT kept open"
    );
    assert!(started.elapsed() < Duration::from_secs(3));

    // Slowloris: a byte every 200 ms never completes a CONNECT in time.
    let mut slow = Raw::open(addr).await;
    let slow_started = Instant::now();
    let mut cut = false;
    for byte in [
        0x10u8, 0x10, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x1e, 0x00,
    ] {
        if !slow.send(&[byte]).await {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        cut || slow.closed_within(Duration::from_secs(3)).await,
        "slowloris kept open"
    );
    assert!(slow_started.elapsed() < Duration::from_secs(5));

    // Unknown protocol level: CONNACK 0x01, closed.
    let mut old = Raw::open(addr).await;
    old.send(&[
        0x10, 0x0c, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x03, 0x02, 0x00, 0x1e, 0x00, 0x00,
    ])
    .await;
    match old.next4(WAIT).await {
        Some(v4::Packet::ConnAck(ack)) => {
            assert_eq!(ack.code, v4::ConnectReturnCode::RefusedProtocolVersion)
        }
        other => panic!("expected CONNACK 0x01, got {other:?}"),
    }

    // Oversize (announced 1 MiB > 4 KiB): v5 gets DISCONNECT 0x95 and is closed.
    let (mut big, _) = Raw::connect5(addr, "big", None).await;
    big.send(&[0x30, 0x80, 0x80, 0x40]).await;
    match big.next5(WAIT).await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::PacketTooLarge)
        }
        other => panic!("expected DISCONNECT 0x95, got {other:?}"),
    }
    assert!(big.closed_within(WAIT).await);

    // Malformed after CONNECT (SUBSCRIBE with reserved flags): DISCONNECT 0x81.
    let (mut bad, _) = Raw::connect5(addr, "bad", None).await;
    bad.send(&[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00])
        .await;
    match bad.next5(WAIT).await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::MalformedPacket)
        }
        other => panic!("expected DISCONNECT 0x81, got {other:?}"),
    }

    // Packet-id reuse at QoS 2: a resend before PUBREL is acknowledged, not delivered twice.
    let (mut reuse, _) = Raw::connect4(addr, "reuse", None).await;
    for _ in 0..3 {
        let mut publish = v4::Publish::new("good/q2", QoS::ExactlyOnce, "once");
        publish.pkid = 7;
        publish.dup = true;
        reuse.send4(v4::Packet::Publish(publish)).await;
        match reuse.next4(WAIT).await {
            Some(v4::Packet::PubRec(rec)) => assert_eq!(rec.pkid, 7),
            other => panic!("expected PUBREC, got {other:?}"),
        }
    }
    reuse.send4(v4::Packet::PubRel(v4::PubRel::new(7))).await;
    assert!(matches!(
        reuse.next4(WAIT).await,
        Some(v4::Packet::PubComp(_))
    ));

    // A subscriber that never acknowledges QoS 1: the window (4) fills, the queue (10)
    // bounds the rest, the excess is counted, and nothing else slows down.
    let (mut hoarder, _) = Raw::connect4(addr, "hoarder", None).await;
    let mut subscribe = v4::Subscribe::new("good/flood", QoS::AtLeastOnce);
    subscribe.pkid = 1;
    hoarder.send4(v4::Packet::Subscribe(subscribe)).await;
    assert!(matches!(
        hoarder.next4(WAIT).await,
        Some(v4::Packet::SubAck(_))
    ));
    let (mut flooder, _) = Raw::connect4(addr, "flooder", None).await;
    for id in 1..=100u16 {
        flooder
            .send4(publish4("good/flood", QoS::AtLeastOnce, id, "f"))
            .await;
    }
    let mut acks = 0;
    while acks < 100 {
        match flooder.next4(WAIT).await {
            Some(v4::Packet::PubAck(_)) => acks += 1,
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    let mut held = 0;
    while let Some(v4::Packet::Publish(_)) = hoarder.next4(Duration::from_millis(500)).await {
        held += 1;
    }
    assert_eq!(held, 4, "the in-flight window was not respected");
    // 100 published: 4 in flight, 10 queued, 86 refused and counted.
    gateway
        .wait_metric(
            "fieldgate_mqtt_dropped_messages_total",
            &[("source", "mqtt"), ("reason", "queue_full")],
            WAIT,
            |v| v >= 86.0,
        )
        .await;

    // The good client never noticed.
    let mut client = Raw::connect4(addr, "good-pub", None).await.0;
    for id in 1..=5u16 {
        client
            .send4(publish4("good/ok", QoS::AtLeastOnce, id, "fine"))
            .await;
        assert!(matches!(
            client.next4(WAIT).await,
            Some(v4::Packet::PubAck(_))
        ));
    }
    assert!(
        good.wait_until(WAIT, |msgs| msgs
            .iter()
            .filter(|m| m.topic == "good/ok")
            .count()
            == 5
            && msgs.iter().filter(|m| m.topic == "good/q2").count() == 1)
            .await,
        "the good subscriber missed messages: {:?}",
        good.messages()
            .iter()
            .map(|m| m.topic.clone())
            .collect::<Vec<_>>()
    );
}

/// `auth = "none"` only on loopback unless `allow_anonymous_remote = true`, and a bad
/// `device_topic`: `fieldgate check` names the key.
#[test]
fn check_names_anonymous_remote_and_bad_device_topic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |source: &str| {
        let text = format!(
            "[gateway]\nid = \"gw-1\"\n\n[sources.mqtt]\ntype = \"mqtt_broker\"\n{source}\n\n{}\n",
            file_sink()
        );
        let path = dir.path().join("fieldgate.toml");
        std::fs::write(&path, text).expect("write config");
        let output = Command::new(common::fieldgate_bin())
            .arg("check")
            .arg(&path)
            .output()
            .expect("run check");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ok, stderr) = run("address = \"0.0.0.0:1883\"\nauth = \"none\"");
    assert!(!ok);
    assert!(
        stderr.contains("sources.mqtt.auth") && stderr.contains("loopback"),
        "{stderr}"
    );
    let (ok, stderr) =
        run("address = \"0.0.0.0:1883\"\nauth = \"none\"\nallow_anonymous_remote = true");
    assert!(ok, "{stderr}");
    let (ok, stderr) = run("address = \"127.0.0.1:1883\"\ndevice_topic = \"devices/+/{kind}\"");
    assert!(!ok);
    assert!(stderr.contains("sources.mqtt.device_topic"), "{stderr}");
    let (ok, stderr) = run("address = \"127.0.0.1:1883\"\nauth = \"token\"");
    assert!(!ok);
    assert!(stderr.contains("sources.mqtt.tokens"), "{stderr}");
    let (ok, stderr) = run("address = \"127.0.0.1:1883\"\nmax_packet_size = \"1GiB\"");
    assert!(!ok);
    assert!(stderr.contains("sources.mqtt.max_packet_size"), "{stderr}");
}

/// 5.0 §3.4.2.1: an event the buffer refuses (`when_full = "drop_newest"`, full) gets
/// PUBACK 0x97 on MQTT 5, and a 3.1.1 client (no negative ack) is disconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_negative_puback_when_the_buffer_refuses() {
    let (api, broker, cloud) = (free_port(), free_port(), free_port());
    let text = config(
        api,
        broker,
        "auth = \"none\"",
        &cloud_sink(cloud, "max_size = \"1MiB\"\nwhen_full = \"drop_newest\""),
        "",
    );
    let _gateway = Gateway::start(&text).await;
    let addr: SocketAddr = ([127, 0, 0, 1], broker).into();
    let (mut client, code) = Raw::connect5(addr, "v5-pub", None).await;
    assert_eq!(code, v5::ConnectReturnCode::Success);
    let pad = "y".repeat(4000);
    let mut refused = None;
    for id in 1..=400u16 {
        let payload = json!({"seq": id, "pad": pad}).to_string();
        let mut publish =
            v5::Publish::new("devices/d1/telemetry", QoS5::AtLeastOnce, payload, None);
        publish.pkid = id;
        assert!(client.send5(v5::Packet::Publish(publish)).await);
        match client.next5(WAIT).await {
            Some(v5::Packet::PubAck(ack)) => {
                assert_eq!(ack.pkid, id);
                if ack.reason != v5::PubAckReason::Success {
                    eprintln!("publish {id} refused with {:?}", ack.reason);
                    refused = Some(ack.reason);
                    break;
                }
            }
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    assert_eq!(
        refused,
        Some(v5::PubAckReason::QuotaExceeded),
        "the full buffer never refused"
    );
    let (mut old, _) = Raw::connect4(addr, "v311-pub", None).await;
    let payload = json!({"seq": 0, "pad": pad}).to_string();
    assert!(
        old.send4(publish4(
            "devices/d1/telemetry",
            QoS::AtLeastOnce,
            1,
            payload
        ))
        .await
    );
    assert!(
        old.closed_within(WAIT).await,
        "3.1.1 client not disconnected on a refused event"
    );
}

/// 3.1.1 §4.4 / 5.0 §4.4: unacknowledged QoS 1 deliveries are resent with DUP and the
/// same packet ids when a persistent session resumes, and not after they are acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_4_4_inflight_messages_are_resent_with_dup_on_resume() {
    let (api, broker) = (free_port(), free_port());
    let text = config(api, broker, "auth = \"none\"", &file_sink(), "");
    let _gateway = Gateway::start(&text).await;
    let addr: SocketAddr = ([127, 0, 0, 1], broker).into();
    let persistent = |client: &str| {
        let mut connect = v4::Connect::new(client);
        connect.keep_alive = 30;
        connect.clean_session = false;
        v4::Packet::Connect(connect)
    };
    let mut keeper = Raw::open(addr).await;
    keeper.send4(persistent("keeper")).await;
    assert!(matches!(
        keeper.next4(WAIT).await,
        Some(v4::Packet::ConnAck(_))
    ));
    let mut subscribe = v4::Subscribe::new("r/t", QoS::AtLeastOnce);
    subscribe.pkid = 1;
    keeper.send4(v4::Packet::Subscribe(subscribe)).await;
    assert!(matches!(
        keeper.next4(WAIT).await,
        Some(v4::Packet::SubAck(_))
    ));
    let (mut publisher, _) = Raw::connect4(addr, "publisher", None).await;
    for id in 1..=3u16 {
        publisher
            .send4(publish4("r/t", QoS::AtLeastOnce, id, format!("m{id}")))
            .await;
        assert!(matches!(
            publisher.next4(WAIT).await,
            Some(v4::Packet::PubAck(_))
        ));
    }
    let mut first = Vec::new();
    while first.len() < 3 {
        match keeper.next4(WAIT).await {
            Some(v4::Packet::Publish(publish)) => {
                first.push((publish.pkid, publish.payload, publish.dup))
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    assert!(first.iter().all(|(_, _, dup)| !dup));
    drop(keeper);
    let mut again = Raw::open(addr).await;
    again.send4(persistent("keeper")).await;
    match again.next4(WAIT).await {
        Some(v4::Packet::ConnAck(ack)) => assert!(ack.session_present, "session not resumed"),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let mut resent = Vec::new();
    while resent.len() < 3 {
        match again.next4(WAIT).await {
            Some(v4::Packet::Publish(publish)) => {
                resent.push((publish.pkid, publish.payload, publish.dup))
            }
            other => panic!("expected a resent PUBLISH, got {other:?}"),
        }
    }
    let expected: Vec<_> = first
        .iter()
        .map(|(id, payload, _)| (*id, payload.clone(), true))
        .collect();
    assert_eq!(
        resent, expected,
        "not resent in order with DUP and the same ids"
    );
    for (id, _, _) in &resent {
        again.send4(v4::Packet::PubAck(v4::PubAck::new(*id))).await;
    }
    // Acked: a further resume resends nothing.
    again.send4(v4::Packet::Disconnect).await;
    assert!(again.closed_within(WAIT).await);
    let mut third = Raw::open(addr).await;
    third.send4(persistent("keeper")).await;
    assert!(
        matches!(third.next4(WAIT).await, Some(v4::Packet::ConnAck(ack)) if ack.session_present)
    );
    assert!(
        third.next4(Duration::from_millis(500)).await.is_none(),
        "acked messages resent"
    );
}

/// 3.1.2.10 / 3.1.2.5: a client silent for 1.5x its keep alive is closed and its will
/// published; PINGREQ keeps it alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_expiry_closes_and_publishes_the_will() {
    let (api, broker) = (free_port(), free_port());
    let text = config(api, broker, "auth = \"none\"", &file_sink(), "");
    let _gateway = Gateway::start(&text).await;
    let addr: SocketAddr = ([127, 0, 0, 1], broker).into();
    let watcher = Subscriber::connect_with(broker, "wills/#", None).await;
    let connect = |client: &str| {
        let mut connect = v4::Connect::new(client);
        connect.keep_alive = 1;
        connect.last_will = Some(v4::LastWill::new(
            format!("wills/{client}"),
            "gone",
            QoS::AtLeastOnce,
            false,
        ));
        v4::Packet::Connect(connect)
    };
    let mut pinger = Raw::open(addr).await;
    pinger.send4(connect("pinger")).await;
    assert!(matches!(
        pinger.next4(WAIT).await,
        Some(v4::Packet::ConnAck(_))
    ));
    let mut silent = Raw::open(addr).await;
    silent.send4(connect("silent")).await;
    assert!(matches!(
        silent.next4(WAIT).await,
        Some(v4::Packet::ConnAck(_))
    ));
    let started = Instant::now();
    // The pinger pings every 500 ms for 3 s and stays; the silent one is closed after 1.5 s.
    let mut silent_closed = None;
    while started.elapsed() < Duration::from_secs(3) {
        pinger.send4(v4::Packet::PingReq).await;
        assert!(
            matches!(pinger.next4(WAIT).await, Some(v4::Packet::PingResp)),
            "PINGRESP missing"
        );
        if silent_closed.is_none() && silent.closed_within(Duration::from_millis(500)).await {
            silent_closed = Some(started.elapsed());
        }
    }
    let closed = silent_closed.expect("the silent client was not closed");
    assert!(
        closed >= Duration::from_millis(1400) && closed < Duration::from_millis(2600),
        "closed after {closed:?}"
    );
    assert!(
        watcher
            .wait_until(WAIT, |msgs| msgs.iter().any(|m| m.topic == "wills/silent"))
            .await,
        "the will was not published"
    );
    assert!(!watcher.messages().iter().any(|m| m.topic == "wills/pinger"));
}

/// Unfinished packets of all connections together stay within the gateway's
/// `partial_frame_budget`: beyond it a connection is closed (counted), and the bytes come
/// back when the hoarders go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_packets_stay_within_the_gateway_budget() {
    let (api, broker) = (free_port(), free_port());
    let text = config(
        api,
        broker,
        "auth = \"none\"\nmax_packet_size = \"4KiB\"",
        &file_sink(),
        "",
    )
    .replacen(
        "shutdown_grace = \"5s\"",
        "shutdown_grace = \"5s\"\npartial_frame_budget = \"64KiB\"",
        1,
    );
    let gateway = Gateway::start(&text).await;
    let addr: SocketAddr = ([127, 0, 0, 1], broker).into();
    let mut hoarders = Vec::new();
    for index in 0..24 {
        let mut hoarder = Raw::open(addr).await;
        hoarder
            .send4(v4::Packet::Connect(v4::Connect::new(format!(
                "hoarder-{index}"
            ))))
            .await;
        // Once the budget is gone, even a CONNECT is not read: that connection closes.
        if !matches!(
            hoarder.next4(Duration::from_secs(2)).await,
            Some(v4::Packet::ConnAck(_))
        ) {
            continue;
        }
        // A PUBLISH announcing 4000 bytes, of which 3900 arrive.
        let mut partial = vec![0x30, 0xa0, 0x1f, 0x00, 0x01, b't'];
        partial.extend(std::iter::repeat_n(b'x', 3900));
        hoarder.send(&partial).await;
        hoarders.push(hoarder);
    }
    gateway
        .wait_metric(
            "fieldgate_refused_connections_total",
            &[("source", "mqtt"), ("reason", "partial_frame_budget")],
            WAIT,
            |v| v >= 1.0,
        )
        .await;
    drop(hoarders);
    // The budget came back: a new client publishes a 3 KiB message.
    let ok = common::eventually_async(WAIT, || async {
        let mut client = Raw::open(addr).await;
        client
            .send4(v4::Packet::Connect(v4::Connect::new("after")))
            .await;
        match client.next4(Duration::from_secs(2)).await {
            Some(v4::Packet::ConnAck(ack)) if ack.code == v4::ConnectReturnCode::Success => {}
            _ => return None,
        }
        client
            .send4(publish4(
                "devices/d1/telemetry",
                QoS::AtLeastOnce,
                1,
                "z".repeat(3000),
            ))
            .await;
        matches!(
            client.next4(Duration::from_secs(2)).await,
            Some(v4::Packet::PubAck(_))
        )
        .then_some(())
    })
    .await;
    assert!(ok.is_some(), "the budget did not come back");
}

/// MQTT over TLS (the listener's `tls` table): mosquitto_pub with the CA publishes an
/// event; with `client_ca` and `auth = "registry"` a client certificate whose CN is a
/// registered device authenticates it without a password, and no certificate, no session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_and_client_certificates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let (api, broker) = (free_port(), free_port());
    let tls = format!(
        "[sources.mqtt.tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"",
        pki.server_cert.display(),
        pki.server_key.display(),
        pki.ca.display()
    );
    let text = config(
        api,
        broker,
        "auth = \"registry\"",
        &file_sink(),
        &format!("[registry]\n\n{tls}"),
    );
    let gateway = Gateway::start(&text).await;
    let (status, body) = api_request(
        gateway.api,
        "POST",
        "/api/v1/devices",
        Some(ADMIN),
        Some(&json!({"id": "gw-1"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let publish = |with_cert: bool| {
        let mut command = Command::new("mosquitto_pub");
        command
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &broker.to_string(),
                "-V",
                "5",
                "-q",
                "1",
            ])
            .arg("--cafile")
            .arg(&pki.ca)
            .args([
                "-i",
                "tls-client",
                "-t",
                "devices/gw-1/telemetry",
                "-m",
                r#"{"tls":true}"#,
            ]);
        if with_cert {
            command
                .arg("--cert")
                .arg(&pki.client_cert)
                .arg("--key")
                .arg(&pki.client_key);
        }
        command.output().expect("mosquitto_pub")
    };
    let output = publish(true);
    assert!(
        output.status.success(),
        "mosquitto_pub over mutual TLS failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        gateway.stderr_tail(20)
    );
    let output = publish(false);
    assert!(
        !output.status.success(),
        "a client without a certificate got a session"
    );
    let sink_dir = gateway.data_dir.join("sinks").join("local");
    let found = eventually(WAIT, || {
        for entry in std::fs::read_dir(&sink_dir).ok()? {
            let text = std::fs::read_to_string(entry.ok()?.path()).ok()?;
            if text
                .lines()
                .any(|line| line.contains(r#""tls":true"#) && line.contains(r#""device":"gw-1""#))
            {
                return Some(());
            }
        }
        None
    })
    .await;
    assert!(found.is_some(), "the TLS publish did not become an event");
}
