//! The cloud link under a broker that misbehaves the way real ones do (issue 8): a
//! scripted fake broker (tests/common/fake_broker.rs) withholds, delays, reorders and
//! duplicates acks, answers with MQTT 5 reason codes, drops PUBREL/PUBCOMP, disconnects
//! mid-flight, enforces a maximum packet size and refuses connects; a real mosquitto
//! enforces `max_packet_size`. One test per behaviour of the "What must hold".
//!
//! What a test asserts is what the broker saw: an event is *delivered* when the broker
//! took responsibility for it (a success PUBACK written, or a QoS 2 packet id stored),
//! so "every event delivered" also means "none deleted from the buffer without its own
//! ack": a record deleted on someone else's ack never reaches the broker again.
//!
//! Wording the issue leaves open (dead-letter reasons, API paths and answers, CLI flags,
//! the event id's name) lives in the "contract" helpers below, in one place.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use common::fake_broker::{
    FakeBroker, Kind, Match, PacketInfo, Refuse, RelReply, Reply, Script, topic_matches,
};
use common::{
    BrokerOptions, Collector, Device, Gateway, GatewayConfig, Mosquitto, Msg, Subscriber,
    api_request, data_message, eventually, fieldgate_bin, free_port,
};
use serde_json::{Value, json};
use tokio::time::Instant;

/// Default bound of a wait in this file.
const LIMIT: Duration = Duration::from_secs(20);
/// Admin token of every gateway here (the dead-letter API is an admin API).
const ADMIN: &str = "cloud-link-admin-token";
/// Topic filter of device telemetry.
const TELEMETRY: &str = "gateways/+/devices/+/telemetry";
/// The gateway's retained status topic.
const STATUS: &str = "gateways/gw-1/status";
/// The gateway's client id (its id).
const CLIENT_ID: &str = "gw-1";

// ---------------------------------------------------------------------------------------
// contract: names the issue leaves to the implementation, kept in one place
// ---------------------------------------------------------------------------------------

/// `reason` label of `fieldgate_dropped_events_total` for a permanent negative ack.
const REASON_REJECTED: &str = "rejected";
/// `reason` label (and dead-letter reason) for a record larger than the broker's limit.
const REASON_TOO_LARGE: &str = "too_large";
/// MQTT 5 user property carrying the event id.
const ID_PROPERTY: &str = "id";

/// The event id in an envelope.
fn envelope_id(envelope: &Value) -> Option<String> {
    envelope
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// `GET` path of a sink's dead letters.
fn deadletter_path(sink: &str) -> String {
    format!("/api/v1/deadletter/{sink}")
}

/// `POST` path that moves a sink's dead letters back into its buffer.
fn deadletter_replay_path(sink: &str) -> String {
    format!("/api/v1/deadletter/{sink}/replay")
}

/// The entries of a dead-letter listing: a JSON array, or an object holding one.
fn deadletter_entries(body: &Value) -> Vec<Value> {
    match body {
        Value::Array(items) => items.clone(),
        Value::Object(map) => map
            .values()
            .find_map(|v| v.as_array().cloned())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// The count in a replay/purge answer: a number, or an object with one numeric field
/// (`count`, `replayed`, `purged`, ...).
fn answered_count(body: &Value) -> Option<u64> {
    match body {
        Value::Number(n) => n.as_u64(),
        Value::Object(map) => map
            .get("count")
            .and_then(Value::as_u64)
            .or_else(|| map.values().find_map(Value::as_u64)),
        _ => None,
    }
}

/// An entry's reason code, as a number (`135`) or text (`"0x87"`).
fn reason_code(entry: &Value) -> Option<u64> {
    match entry.get("reason_code")? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => {
            let s = s.trim();
            s.strip_prefix("0x")
                .map_or_else(|| s.parse().ok(), |hex| u64::from_str_radix(hex, 16).ok())
        }
        _ => None,
    }
}

/// Fields every dead-letter entry carries (`reason_code` too when the broker gave one),
/// each with the names accepted for it: the contract says `received_at`; the first
/// implementation answers `received_at_ms`.
const DEADLETTER_FIELDS: [&[&str]; 6] = [
    &["id"],
    &["reason"],
    &["device"],
    &["kind"],
    &["received_at", "received_at_ms"],
    &["size"],
];

/// Runs `fieldgate deadletter ARGS --api http://API --token ADMIN`.
async fn deadletter_cli(gateway: &Gateway, args: &[&str]) -> Output {
    let mut command = Command::new(fieldgate_bin());
    command
        .arg("deadletter")
        .args(args)
        .args(["--api", &format!("http://{}", gateway.api)])
        .args(["--token", ADMIN])
        .env_remove("FIELDGATE_ADMIN_TOKEN");
    tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap_or_else(|err| panic!("{err}"))
        .unwrap_or_else(|err| panic!("cannot run fieldgate deadletter: {err}"))
}

// ---------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------

/// A gateway config: one TCP source, the MQTT sink `cloud` on `port` with `protocol`.
fn link_config(port: u16, protocol: &str) -> GatewayConfig {
    GatewayConfig::new(port).sink(&format!("protocol = \"{protocol}\""))
}

/// The config text with the admin token.
fn render(config: &GatewayConfig) -> String {
    let api_line = format!("address = \"127.0.0.1:{}\"", config.api_port);
    config.render().replacen(
        &api_line,
        &format!("{api_line}\nadmin_token = \"{ADMIN}\""),
        1,
    )
}

/// Starts the gateway and waits until its link is up.
async fn start_connected(config: &GatewayConfig) -> Gateway {
    let gateway = Gateway::start(&render(config)).await;
    gateway
        .wait_metric(
            "fieldgate_upstream_connected",
            &[("sink", "cloud")],
            LIMIT,
            |v| v == 1.0,
        )
        .await;
    gateway
}

/// Connects as a device and sends `seqs` (one line each); keep the result alive until
/// the events are delivered.
async fn send(
    config: &GatewayConfig,
    device: &str,
    seqs: impl IntoIterator<Item = u64>,
    pad: usize,
) -> Device {
    let mut connection = Device::connect(config.device_addr())
        .await
        .unwrap_or_else(|e| panic!("{device}: connect: {e}"));
    let mut block = String::new();
    for seq in seqs {
        block.push_str(&data_message(device, seq, pad).to_string());
        block.push('\n');
    }
    connection
        .send_raw(block.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{device}: send: {e}"));
    connection
}

/// Sends `seqs` more on an open device connection.
async fn send_more(connection: &mut Device, device: &str, seqs: impl IntoIterator<Item = u64>) {
    let mut block = String::new();
    for seq in seqs {
        block.push_str(&data_message(device, seq, 16).to_string());
        block.push('\n');
    }
    connection
        .send_raw(block.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{device}: send: {e}"));
}

/// The (device, seq) pairs a payload carries (envelope, raw or batch).
fn events_in(payload: &[u8]) -> Vec<(String, u64)> {
    let msg = Msg {
        topic: String::new(),
        payload: Bytes::copy_from_slice(payload),
        retain: false,
    };
    common::device_objects(&msg)
        .into_iter()
        .filter_map(|o| {
            Some((
                o.get("device")?.as_str()?.to_string(),
                o.get("seq")?.as_u64()?,
            ))
        })
        .collect()
}

fn is_telemetry(topic: &str) -> bool {
    topic_matches(TELEMETRY, topic)
}

/// The seq of a single-event telemetry publish.
fn seq_of(publish: &PacketInfo) -> Option<u64> {
    if !is_telemetry(&publish.topic) {
        return None;
    }
    match events_in(&publish.payload).as_slice() {
        [(_, seq)] => Some(*seq),
        _ => None,
    }
}

/// Telemetry publishes carrying an event whose seq satisfies `pred`.
fn seqs(pred: impl Fn(u64) -> bool + Send + Sync + 'static) -> Match {
    Match::when(move |p| {
        is_telemetry(&p.topic) && events_in(&p.payload).iter().any(|(_, s)| pred(*s))
    })
}

/// Telemetry publishes carrying seq `seq`.
fn seq_is(seq: u64) -> Match {
    seqs(move |s| s == seq)
}

type Key = (String, u64);

/// How often each telemetry event was delivered.
fn delivered(broker: &FakeBroker) -> BTreeMap<Key, usize> {
    let mut out = BTreeMap::new();
    for d in broker.deliveries() {
        if is_telemetry(&d.topic) {
            for key in events_in(&d.payload) {
                *out.entry(key).or_insert(0) += 1;
            }
        }
    }
    out
}

/// `device` with `seqs`.
fn keys(device: &str, seqs: impl IntoIterator<Item = u64>) -> BTreeSet<Key> {
    seqs.into_iter().map(|s| (device.to_string(), s)).collect()
}

/// What the broker saw, for failure messages.
fn story(broker: &FakeBroker) -> String {
    let mut out = String::new();
    let connects = broker.connects();
    if connects.len() > 10 {
        out.push_str(&format!("  ({} connects, last 10:)\n", connects.len()));
    }
    for c in &connects[connects.len().saturating_sub(10)..] {
        out.push_str(&format!(
            "  connect #{} accepted={} clean={} session_present={}\n",
            c.conn, c.accepted, c.clean, c.session_present
        ));
    }
    let closed = broker.closed();
    for c in &closed[closed.len().saturating_sub(10)..] {
        out.push_str(&format!("  closed #{}: {}\n", c.conn, c.why));
    }
    let packets = broker.packets();
    let from = packets.len().saturating_sub(40);
    for p in &packets[from..] {
        let events = events_in(&p.payload);
        out.push_str(&format!(
            "  #{} {:?} id={} dup={} qos={} {} {:?} -> {}\n",
            p.conn, p.kind, p.packet_id, p.dup, p.qos, p.topic, events, p.answer
        ));
    }
    for v in broker.violations() {
        out.push_str(&format!("  VIOLATION {v}\n"));
    }
    out
}

/// Waits until every event in `expected` was delivered; panics with what is missing.
async fn wait_delivered(broker: &FakeBroker, expected: &BTreeSet<Key>, limit: Duration) {
    let done = broker
        .wait_for(limit, |b| {
            let got = delivered(b);
            expected.iter().all(|k| got.contains_key(k)).then_some(())
        })
        .await;
    if done.is_none() {
        let got = delivered(broker);
        let missing: Vec<&Key> = expected.iter().filter(|k| !got.contains_key(*k)).collect();
        let received: BTreeSet<Key> = broker
            .publishes()
            .iter()
            .filter(|p| is_telemetry(&p.topic))
            .flat_map(|p| events_in(&p.payload))
            .collect();
        let never_sent = missing.iter().filter(|k| !received.contains(**k)).count();
        panic!(
            "not delivered within {limit:?}: {} of {} missing ({never_sent} of them never \
             published), first {:?}\n{}",
            missing.len(),
            expected.len(),
            &missing[..missing.len().min(10)],
            story(broker)
        );
    }
}

/// Waits until the sink's buffer is empty.
async fn wait_buffer_empty(gateway: &Gateway) {
    gateway
        .wait_metric(
            "fieldgate_buffer_events",
            &[("sink", "cloud")],
            LIMIT,
            |v| v == 0.0,
        )
        .await;
}

/// A metric's value, 0 when absent.
async fn metric_or_zero(gateway: &Gateway, name: &str, labels: &[(&str, &str)]) -> f64 {
    gateway.metric(name, labels).await.unwrap_or(0.0)
}

/// One HTTP/1.1 request with the admin token; returns the status and the JSON body
/// (Null when the body is not JSON).
async fn api(addr: SocketAddr, method: &str, path: &str) -> (u16, Value) {
    api_request(addr, method, path, Some(ADMIN), None).await
}

async fn api_json(addr: SocketAddr, method: &str, path: &str, body: &Value) -> (u16, Value) {
    api_request(addr, method, path, Some(ADMIN), Some(body)).await
}

/// The sink's dead letters via the API.
async fn deadletters(gateway: &Gateway) -> Vec<Value> {
    let (status, body) = api(gateway.api, "GET", &deadletter_path("cloud")).await;
    assert_eq!(status, 200, "GET {}: {body}", deadletter_path("cloud"));
    deadletter_entries(&body)
}

/// Waits until the dead-letter store holds `n` entries; returns them.
async fn wait_deadletters(gateway: &Gateway, n: usize) -> Vec<Value> {
    let found = eventually_entries(gateway, n).await;
    found.unwrap_or_else(|| {
        panic!(
            "dead-letter store of `cloud` did not reach {n} entries within {LIMIT:?}\n{}",
            gateway.stderr_tail(30)
        )
    })
}

async fn eventually_entries(gateway: &Gateway, n: usize) -> Option<Vec<Value>> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let (status, body) = api(gateway.api, "GET", &deadletter_path("cloud")).await;
        if status == 200 {
            let entries = deadletter_entries(&body);
            if entries.len() == n {
                return Some(entries);
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks the shape of a dead-letter entry.
fn assert_entry(entry: &Value, device: &str, reason: &str, code: Option<u64>) {
    for names in DEADLETTER_FIELDS {
        assert!(
            names.iter().any(|name| entry.get(name).is_some()),
            "entry lacks {names:?}: {entry}"
        );
    }
    assert_eq!(entry["device"], device, "{entry}");
    assert_eq!(entry["reason"], reason, "{entry}");
    assert_eq!(entry["kind"], "telemetry", "{entry}");
    if let Some(code) = code {
        assert_eq!(reason_code(entry), Some(code), "{entry}");
    }
}

/// Times of accepted CONNECTs.
fn accepted_at(broker: &FakeBroker) -> Vec<Instant> {
    broker
        .connects()
        .iter()
        .filter(|c| c.accepted)
        .map(|c| c.at)
        .collect()
}

fn gaps(times: &[Instant]) -> Vec<Duration> {
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

/// How long a growing backoff may take to show: the documented fast window at
/// `reconnect_min` (30 s, docs/CONFIG.md) plus a few doubling attempts.
const GROWTH_LIMIT: Duration = Duration::from_secs(40);

/// Waits until the delays between successive attempts (`times`) have grown: three in a
/// row at least twice `min` (a jittered `min` never is). Checks every delay on the way:
/// no hot loop (none under half of `min`), none beyond `max`. Returns the delays.
/// Holds for exponential-from-the-start as for fast-then-exponential policies.
async fn wait_backoff_growth(
    broker: &FakeBroker,
    min: Duration,
    max: Duration,
    times: impl Fn(&FakeBroker) -> Vec<Instant>,
) -> Vec<Duration> {
    let grown = broker
        .wait_for(GROWTH_LIMIT, |b| {
            let gaps = gaps(&times(b));
            let n = gaps.len();
            (n >= 3 && gaps[n - 3..].iter().all(|g| *g >= min * 2)).then_some(gaps)
        })
        .await;
    let gaps = grown.unwrap_or_else(|| {
        let gaps = gaps(&times(broker));
        panic!(
            "delays did not grow within {GROWTH_LIMIT:?} ({} attempts), last: {:?}\n{}",
            gaps.len() + 1,
            &gaps[gaps.len().saturating_sub(8)..],
            story(broker)
        )
    });
    let floor = min.mul_f64(0.45);
    assert!(
        gaps.iter().all(|g| *g >= floor),
        "an attempt came less than {floor:?} after the last (reconnect_min = {min:?}): {:?}",
        gaps.iter().min()
    );
    assert!(
        gaps.iter().all(|g| *g <= max + Duration::from_millis(1500)),
        "a delay exceeded reconnect_max = {max:?}: {:?}",
        gaps.iter().max()
    );
    gaps
}

// ---------------------------------------------------------------------------------------
// control: the harness itself, against a broker that behaves
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_a_well_behaved_broker_gets_everything_exactly_once() {
    for (protocol, qos) in [("3.1.1", 1), ("5", 2)] {
        let broker = FakeBroker::start(Script::new()).await;
        let config = link_config(broker.port, protocol).sink(&format!("qos = {qos}"));
        let gateway = start_connected(&config).await;
        let _device = send(&config, "ctl", 1..=50, 16).await;
        let expected = keys("ctl", 1..=50);
        wait_delivered(&broker, &expected, LIMIT).await;
        wait_buffer_empty(&gateway).await;
        assert_exactly_once(&broker, &expected);
        assert!(broker.violations().is_empty(), "{}", story(&broker));
        assert_eq!(broker.accepted_connects(), 1, "{}", story(&broker));
        let connect = &broker.connects()[0];
        assert_eq!(connect.client_id, CLIENT_ID);
        assert!(!connect.clean, "the default keeps the session");
        assert!(
            broker.is_subscribed(CLIENT_ID, "gateways/gw-1/devices/+/commands"),
            "{}",
            story(&broker)
        );
        assert_eq!(broker.retained(STATUS), Some(Bytes::from("online")));
    }
}

// ---------------------------------------------------------------------------------------
// a. never stall (issue item 1)
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withheld_puback_does_not_stall_the_link_after_reconnect() {
    let script = Script::new().on_times(Match::topic(TELEMETRY), Reply::Withhold, Some(1));
    let broker = FakeBroker::start(script).await;
    let config = link_config(broker.port, "3.1.1")
        .sink("qos = 1")
        .sink("max_inflight = 2")
        .sink("keep_alive = \"2s\"");
    let gateway = start_connected(&config).await;
    let _device = send(&config, "stall", 1..=20, 16).await;

    // The link dies on its own (keep-alive, ack timeout) or, at the latest after three
    // keep-alives, the broker drops it: either way the next connection must publish.
    let died = broker
        .wait_for(Duration::from_secs(6), |b| {
            (b.accepted_connects() >= 2).then_some(())
        })
        .await;
    if died.is_none() {
        eprintln!("link still up 6 s after the withheld PUBACK: the broker drops it");
        broker.disconnect_all();
    }
    let reconnected = broker
        .wait_for(LIMIT, |b| accepted_at(b).get(1).copied())
        .await
        .unwrap_or_else(|| panic!("no reconnect\n{}", story(&broker)));
    wait_delivered(&broker, &keys("stall", 1..=20), LIMIT).await;

    let resumed = broker
        .deliveries()
        .iter()
        .filter(|d| d.conn > 0 && is_telemetry(&d.topic) && d.at >= reconnected)
        .map(|d| d.at - reconnected)
        .min();
    eprintln!("first telemetry delivery {resumed:?} after the reconnect");
    let resumed = resumed.expect("a telemetry delivery after the reconnect");
    assert!(
        resumed <= Duration::from_secs(3),
        "publishing resumed only {resumed:?} after the reconnect\n{}",
        story(&broker)
    );
    wait_buffer_empty(&gateway).await;
}

// ---------------------------------------------------------------------------------------
// b. MQTT 5 negative acks (issue item 2)
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_puback_not_authorized_dead_letters_the_event_and_counts_it_dropped() {
    let broker = FakeBroker::start(Script::new().on(seq_is(3), Reply::Code(0x87))).await;
    let config = link_config(broker.port, "5").sink("qos = 1");
    let gateway = start_connected(&config).await;
    let _device = send(&config, "rej", 1..=10, 16).await;

    let others = keys("rej", (1..=10).filter(|s| *s != 3));
    wait_delivered(&broker, &others, LIMIT).await;
    wait_buffer_empty(&gateway).await;
    gateway
        .wait_metric(
            "fieldgate_dropped_events_total",
            &[("sink", "cloud"), ("reason", REASON_REJECTED)],
            Duration::from_secs(10),
            |v| v == 1.0,
        )
        .await;

    // Sent counts what the broker accepted: every delivered device event, not the
    // rejected one (the broker acks everything else in order, so no duplicates).
    let accepted = broker
        .deliveries()
        .iter()
        .filter(|d| d.topic != STATUS)
        .count();
    let sent = gateway
        .metric("fieldgate_sent_events_total", &[("sink", "cloud")])
        .await
        .expect("fieldgate_sent_events_total{sink=\"cloud\"}");
    assert_eq!(
        sent, accepted as f64,
        "sent_events_total counts the rejected event too (broker accepted {accepted})"
    );
    assert!(!delivered(&broker).contains_key(&("rej".to_string(), 3)));
    let attempts = broker
        .publishes()
        .iter()
        .filter(|p| seq_of(p) == Some(3))
        .count();
    assert_eq!(
        attempts,
        1,
        "a permanent reject is not retried\n{}",
        story(&broker)
    );

    let entries = wait_deadletters(&gateway, 1).await;
    assert_entry(&entries[0], "rej", REASON_REJECTED, Some(0x87));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_topic_name_invalid_and_payload_format_invalid_are_permanent() {
    let script = Script::new()
        .on(seq_is(2), Reply::Code(0x90))
        .on(seq_is(4), Reply::Code(0x99));
    let broker = FakeBroker::start(script).await;
    let config = link_config(broker.port, "5").sink("qos = 1");
    let gateway = start_connected(&config).await;
    let _device = send(&config, "perm", 1..=6, 16).await;

    wait_delivered(&broker, &keys("perm", [1, 3, 5, 6]), LIMIT).await;
    wait_buffer_empty(&gateway).await;
    gateway
        .wait_metric(
            "fieldgate_dropped_events_total",
            &[("sink", "cloud"), ("reason", REASON_REJECTED)],
            Duration::from_secs(10),
            |v| v == 2.0,
        )
        .await;
    let entries = wait_deadletters(&gateway, 2).await;
    let mut codes: Vec<u64> = entries.iter().filter_map(reason_code).collect();
    codes.sort_unstable();
    assert_eq!(codes, vec![0x90, 0x99], "{entries:?}");
    for entry in &entries {
        assert_entry(entry, "perm", REASON_REJECTED, None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_transient_reject_is_retried_until_the_broker_accepts() {
    let script = Script::new()
        .on_times(seq_is(3), Reply::Code(0x97), Some(2))
        .on_times(seq_is(5), Reply::Code(0x80), Some(1))
        .on_times(seq_is(7), Reply::Code(0x83), Some(1));
    let broker = FakeBroker::start(script).await;
    let config = link_config(broker.port, "5").sink("qos = 1");
    let gateway = start_connected(&config).await;
    let _device = send(&config, "quota", 1..=10, 16).await;

    wait_delivered(&broker, &keys("quota", 1..=10), LIMIT).await;
    wait_buffer_empty(&gateway).await;
    let attempts: Vec<Instant> = broker
        .publishes()
        .iter()
        .filter(|p| seq_of(p) == Some(3))
        .map(|p| p.at)
        .collect();
    eprintln!("seq 3 attempts at gaps {:?}", gaps(&attempts));
    assert_eq!(
        attempts.len(),
        3,
        "rejected twice, accepted the third time\n{}",
        story(&broker)
    );
    let dropped = metric_or_zero(
        &gateway,
        "fieldgate_dropped_events_total",
        &[("sink", "cloud"), ("reason", REASON_REJECTED)],
    )
    .await;
    assert_eq!(dropped, 0.0, "a transient reject is not a drop");
    assert!(deadletters(&gateway).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_failing_pubrec_frees_the_inflight_slot_at_once() {
    let broker = FakeBroker::start(Script::new().on(seq_is(2), Reply::Code(0x87))).await;
    let config = link_config(broker.port, "5")
        .sink("qos = 2")
        .sink("max_inflight = 1");
    let gateway = start_connected(&config).await;
    let _device = send(&config, "rec", 1..=5, 16).await;

    wait_delivered(&broker, &keys("rec", [1, 3, 4, 5]), Duration::from_secs(10)).await;
    assert_eq!(
        broker.accepted_connects(),
        1,
        "the slot was freed only by a reconnect\n{}",
        story(&broker)
    );
    let entries = wait_deadletters(&gateway, 1).await;
    assert_entry(&entries[0], "rec", REASON_REJECTED, Some(0x87));
    wait_buffer_empty(&gateway).await;
}

// ---------------------------------------------------------------------------------------
// c. records larger than the broker's maximum packet size (issue item 3)
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_event_is_dead_lettered_against_mosquitto_max_packet_size() {
    let broker = Mosquitto::start_with_conf(
        free_port(),
        BrokerOptions::default(),
        "max_packet_size 4000",
    )
    .await;
    let sub = Subscriber::connect(broker.port).await;
    let config = link_config(broker.port, "5");
    let gateway = start_connected(&config).await;

    let mut device = Device::connect(config.device_addr())
        .await
        .expect("connect");
    let mut lines = String::new();
    for (seq, pad) in [(1, 16), (2, 6000), (3, 16), (4, 16), (5, 16)] {
        lines.push_str(&data_message("big", seq, pad).to_string());
        lines.push('\n');
    }
    device.send_raw(lines.as_bytes()).await.expect("send");

    let want = [("big".to_string(), [1, 3, 4, 5].into_iter().collect())]
        .into_iter()
        .collect();
    let mut collector = Collector::default();
    collector.wait_all(&sub, &want, LIMIT).await;
    gateway
        .wait_metric(
            "fieldgate_dropped_events_total",
            &[("sink", "cloud"), ("reason", REASON_TOO_LARGE)],
            Duration::from_secs(10),
            |v| v == 1.0,
        )
        .await;
    let entries = wait_deadletters(&gateway, 1).await;
    assert_entry(&entries[0], "big", REASON_TOO_LARGE, None);
    wait_buffer_empty(&gateway).await;
    assert!(
        !collector.seen["big"].contains(&2),
        "the oversized event cannot have arrived"
    );

    let log = broker.log_tail(100_000);
    let connects = log
        .lines()
        .filter(|l| l.contains("New client connected") && l.contains(&format!(" as {CLIENT_ID} ")))
        .count();
    let onlines = sub
        .messages()
        .iter()
        .filter(|m| m.topic == STATUS && m.text() == "online")
        .count();
    eprintln!("gateway connects in mosquitto's log: {connects}; online statuses: {onlines}");
    assert!(
        connects <= 2,
        "the link flapped: {connects} connects\n{}",
        broker.log_tail(30)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_event_is_dead_lettered_with_the_sink_max_packet_size_on_3_1_1() {
    let broker = FakeBroker::start(Script::new().max_packet_size(4096)).await;
    let config = link_config(broker.port, "3.1.1").sink("max_packet_size = \"4KiB\"");
    let gateway = start_connected(&config).await;

    let mut device = Device::connect(config.device_addr())
        .await
        .expect("connect");
    let mut lines = String::new();
    for (seq, pad) in [(1, 16), (2, 6000), (3, 16), (4, 16), (5, 16)] {
        lines.push_str(&data_message("big3", seq, pad).to_string());
        lines.push('\n');
    }
    device.send_raw(lines.as_bytes()).await.expect("send");

    wait_delivered(&broker, &keys("big3", [1, 3, 4, 5]), LIMIT).await;
    gateway
        .wait_metric(
            "fieldgate_dropped_events_total",
            &[("sink", "cloud"), ("reason", REASON_TOO_LARGE)],
            Duration::from_secs(10),
            |v| v == 1.0,
        )
        .await;
    let entries = wait_deadletters(&gateway, 1).await;
    assert_entry(&entries[0], "big3", REASON_TOO_LARGE, None);
    wait_buffer_empty(&gateway).await;
    eprintln!(
        "connects: {}, oversized packets seen by the broker: {}",
        broker.accepted_connects(),
        broker.oversized().len()
    );
    assert!(
        broker.accepted_connects() <= 2,
        "the link flapped\n{}",
        story(&broker)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_event_is_dead_lettered_from_the_v5_connack_limit() {
    // No sink setting: the limit comes only from CONNACK's Maximum Packet Size.
    let broker = FakeBroker::start(Script::new().max_packet_size(4096)).await;
    let config = link_config(broker.port, "5");
    let gateway = start_connected(&config).await;

    let mut device = Device::connect(config.device_addr())
        .await
        .expect("connect");
    let mut lines = String::new();
    for (seq, pad) in [(1, 16), (2, 6000), (3, 16), (4, 16), (5, 16)] {
        lines.push_str(&data_message("big5", seq, pad).to_string());
        lines.push('\n');
    }
    device.send_raw(lines.as_bytes()).await.expect("send");

    wait_delivered(&broker, &keys("big5", [1, 3, 4, 5]), LIMIT).await;
    let entries = wait_deadletters(&gateway, 1).await;
    assert_entry(&entries[0], "big5", REASON_TOO_LARGE, None);
    wait_buffer_empty(&gateway).await;
    assert!(
        broker.oversized().is_empty(),
        "the gateway sent a packet larger than the limit it was told in CONNACK\n{}",
        story(&broker)
    );
    assert_eq!(broker.accepted_connects(), 1, "{}", story(&broker));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_receive_maximum_caps_the_inflight_window() {
    // The broker takes 3 unacknowledged publishes at a time (more: DISCONNECT 0x93).
    let script = Script::new().receive_maximum(3).on(
        Match::topic(TELEMETRY),
        Reply::Delay(Duration::from_millis(50)),
    );
    let broker = FakeBroker::start(script).await;
    let config = link_config(broker.port, "5")
        .sink("qos = 1")
        .sink("max_inflight = 10");
    let gateway = start_connected(&config).await;
    let _device = send(&config, "rmax", 1..=30, 16).await;

    wait_delivered(&broker, &keys("rmax", 1..=30), LIMIT).await;
    wait_buffer_empty(&gateway).await;
    assert!(
        broker.max_outstanding() <= 3,
        "{} publishes unacked at once with Receive Maximum 3\n{}",
        broker.max_outstanding(),
        story(&broker)
    );
    assert_eq!(broker.accepted_connects(), 1, "{}", story(&broker));
}

// ---------------------------------------------------------------------------------------
// d. backoff (must hold)
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connects_back_off_with_growing_jittered_delays() {
    let min = Duration::from_millis(100);
    let max = Duration::from_secs(2);
    let broker = FakeBroker::start(Script::new().refuse_connects(u64::MAX, Refuse::Code(5))).await;
    let config = link_config(broker.port, "3.1.1")
        .sink("reconnect_min = \"100ms\"")
        .sink("reconnect_max = \"2s\"");
    let _gateway = Gateway::start(&render(&config)).await;

    let gaps = wait_backoff_growth(&broker, min, max, |b| {
        b.connects().iter().map(|c| c.at).collect()
    })
    .await;
    let distinct: BTreeSet<u128> = gaps.iter().map(|g| g.as_millis() / 5).collect();
    eprintln!(
        "{} refused connects; last delays {:?}",
        gaps.len() + 1,
        &gaps[gaps.len().saturating_sub(6)..]
    );
    assert!(distinct.len() > 2, "no jitter: {gaps:?}");
    broker.behave();
    let accepted = broker
        .wait_for(LIMIT, |b| (b.accepted_connects() == 1).then_some(()))
        .await;
    assert!(accepted.is_some(), "{}", story(&broker));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backoff_resets_only_after_a_healthy_connection() {
    // Every connection is dropped right after its CONNACK: a CONNACK alone is not health,
    // so the delays must grow as if the connects had been refused.
    let min = Duration::from_millis(100);
    let max = Duration::from_secs(2);
    let broker = FakeBroker::start(Script::new().drop_after_connack(u64::MAX)).await;
    let config = link_config(broker.port, "3.1.1")
        .sink("reconnect_min = \"100ms\"")
        .sink("reconnect_max = \"2s\"");
    let gateway = Gateway::start(&render(&config)).await;
    let _device = send(&config, "flap", 1..=5, 16).await;

    let flapping = wait_backoff_growth(&broker, min, max, accepted_at).await;
    eprintln!(
        "{} connections dropped at CONNACK; last delays {:?}",
        flapping.len() + 1,
        &flapping[flapping.len().saturating_sub(6)..]
    );

    // Healthy now: acks flow. After that a drop reconnects at the minimum delay again.
    broker.behave();
    wait_delivered(&broker, &keys("flap", 1..=5), LIMIT).await;
    wait_buffer_empty(&gateway).await;
    let before = broker.accepted_connects();
    let dropped_at = Instant::now();
    broker.disconnect_all();
    let back = broker
        .wait_for(LIMIT, |b| accepted_at(b).get(before).copied())
        .await
        .unwrap_or_else(|| {
            panic!(
                "no reconnect after a healthy connection\n{}",
                story(&broker)
            )
        });
    let delay = back - dropped_at;
    eprintln!("reconnect after a healthy connection took {delay:?}");
    assert!(
        delay <= Duration::from_millis(1000),
        "backoff not reset after a healthy connection: {delay:?} (reconnect_min = 100ms)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_event_arrives_promptly_after_a_short_outage_with_default_backoff() {
    let mut broker = FakeBroker::start(Script::new()).await;
    let config = link_config(broker.port, "3.1.1");
    // The harness sets a fast backoff; this test is about the defaults.
    let text: String = render(&config)
        .lines()
        .filter(|l| !l.starts_with("reconnect_min") && !l.starts_with("reconnect_max"))
        .map(|l| format!("{l}\n"))
        .collect();
    let gateway = Gateway::start(&text).await;
    let _first = send(&config, "short", [1], 16).await;
    wait_delivered(&broker, &keys("short", [1]), LIMIT).await;

    broker.stop().await;
    gateway
        .wait_metric(
            "fieldgate_upstream_connected",
            &[("sink", "cloud")],
            LIMIT,
            |v| v == 0.0,
        )
        .await;
    let _during = send(&config, "short", 2..=20, 16).await;
    // The outage itself (a scenario length, not a synchronisation): the gateway's
    // reconnect attempts fail meanwhile and its backoff grows.
    tokio::time::sleep(Duration::from_secs(4)).await;
    broker.start_again().await;
    let back = Instant::now();
    let first = broker
        .wait_for(LIMIT, |b| {
            b.deliveries()
                .iter()
                .filter(|d| is_telemetry(&d.topic) && d.at >= back)
                .map(|d| d.at)
                .min()
        })
        .await
        .unwrap_or_else(|| panic!("nothing delivered after the outage\n{}", story(&broker)));
    let resume = first - back;
    eprintln!("first event {resume:?} after the broker was back (4 s outage, default backoff)");
    assert!(
        resume <= Duration::from_secs(5),
        "first event only {resume:?} after the broker was back"
    );
    wait_delivered(&broker, &keys("short", 1..=20), LIMIT).await;
}

// ---------------------------------------------------------------------------------------
// e. QoS 2 across reconnects and restarts (issue item 5)
// ---------------------------------------------------------------------------------------

/// Asserts every telemetry event of `expected` was delivered exactly once.
fn assert_exactly_once(broker: &FakeBroker, expected: &BTreeSet<Key>) {
    let got = delivered(broker);
    let wrong: Vec<(&Key, usize)> = expected
        .iter()
        .map(|k| (k, got.get(k).copied().unwrap_or(0)))
        .filter(|(_, n)| *n != 1)
        .collect();
    assert!(
        wrong.is_empty(),
        "not delivered exactly once (event, deliveries): {wrong:?}\n{}",
        story(broker)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_unanswered_publish_is_resent_with_dup_and_the_same_packet_id() {
    // The broker stores the first telemetry PUBLISH, answers nothing and drops the link.
    let script = Script::new().on_times(Match::topic(TELEMETRY), Reply::Disconnect, Some(1));
    let broker = FakeBroker::start(script).await;
    let config = link_config(broker.port, "5").sink("qos = 2");
    let gateway = start_connected(&config).await;
    let _device = send(&config, "q2a", 1..=5, 16).await;

    let expected = keys("q2a", 1..=5);
    wait_delivered(&broker, &expected, LIMIT).await;
    wait_buffer_empty(&gateway).await;
    let publishes = broker.publishes();
    let cut = publishes
        .iter()
        .find(|p| p.answer == "Disconnect")
        .expect("the scripted disconnect happened")
        .clone();
    let seq = seq_of(&cut).expect("a single event");
    let resend = publishes
        .iter()
        .find(|p| p.conn > cut.conn && seq_of(p) == Some(seq))
        .unwrap_or_else(|| panic!("seq {seq} not resent\n{}", story(&broker)));
    let connect = broker
        .connects()
        .into_iter()
        .find(|c| c.conn == resend.conn)
        .expect("connect");
    assert!(connect.session_present, "{}", story(&broker));
    assert!(resend.dup, "resend without DUP\n{}", story(&broker));
    assert_eq!(
        resend.packet_id,
        cut.packet_id,
        "resent with another packet id\n{}",
        story(&broker)
    );
    assert_exactly_once(&broker, &expected);
    assert!(broker.violations().is_empty(), "{}", story(&broker));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_pubrel_is_resent_after_a_lost_pubcomp_and_the_publish_is_not() {
    // The first PUBREL is processed but its PUBCOMP is lost with the connection.
    let script = Script::new().on_pubrel(Some(0), RelReply::ReleaseAndDisconnect, Some(1));
    let broker = FakeBroker::start(script).await;
    let config = link_config(broker.port, "3.1.1").sink("qos = 2");
    let gateway = start_connected(&config).await;
    let _device = send(&config, "q2b", 1..=5, 16).await;

    let expected = keys("q2b", 1..=5);
    wait_delivered(&broker, &expected, LIMIT).await;
    wait_buffer_empty(&gateway).await;
    let packets = broker.packets();
    let rel = packets
        .iter()
        .find(|p| p.kind == Kind::PubRel)
        .expect("a PUBREL")
        .clone();
    let released = packets
        .iter()
        .filter(|p| p.kind == Kind::Publish && p.conn == rel.conn && p.packet_id == rel.packet_id)
        .last()
        .expect("the PUBLISH of the released id")
        .clone();
    let resent_rel = packets
        .iter()
        .any(|p| p.kind == Kind::PubRel && p.conn > rel.conn && p.packet_id == rel.packet_id);
    assert!(
        resent_rel,
        "PUBREL {} not resent after the reconnect\n{}",
        rel.packet_id,
        story(&broker)
    );
    let republished = packets
        .iter()
        .filter(|p| p.kind == Kind::Publish && p.conn > rel.conn && p.payload == released.payload)
        .count();
    assert_eq!(
        republished,
        0,
        "the released message was published again\n{}",
        story(&broker)
    );
    assert_exactly_once(&broker, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_late_pubcomp_is_not_credited_to_another_publish() {
    // The first PUBREL is dropped with the connection; on the new connection the resent
    // PUBREL's PUBCOMP comes 2 s late while publishing goes on with a small window.
    let script = Script::new()
        .on_pubrel(Some(0), RelReply::Disconnect, Some(1))
        .on_pubrel(Some(1), RelReply::Delay(Duration::from_secs(2)), Some(1));
    let broker = FakeBroker::start(script).await;
    let config = link_config(broker.port, "5")
        .sink("qos = 2")
        .sink("max_inflight = 2");
    let gateway = start_connected(&config).await;
    let _device = send(&config, "q2c", 1..=30, 16).await;

    let expected = keys("q2c", 1..=30);
    wait_delivered(&broker, &expected, LIMIT).await;
    wait_buffer_empty(&gateway).await;
    assert!(
        broker.violations().is_empty(),
        "a packet id was reused before its flow ended\n{}",
        story(&broker)
    );
    assert_exactly_once(&broker, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_unfinished_flows_survive_kill9_with_dup_and_the_same_packet_ids() {
    // Seqs 1-3 get PUBREC but their PUBREL is ignored; 4-6 get no PUBREC at all.
    let script = Script::new()
        .on(seqs(|s| (4..=6).contains(&s)), Reply::Withhold)
        .on_pubrel(None, RelReply::Ignore, None);
    let broker = FakeBroker::start(script).await;
    let config = link_config(broker.port, "5")
        .sink("qos = 2")
        .sink("max_inflight = 10")
        .sink("clean_session = false");
    let mut gateway = start_connected(&config).await;
    let _device = send(&config, "k9", 1..=6, 16).await;

    let ids: BTreeMap<u64, u16> = broker
        .wait_for(LIMIT, |b| {
            let packets = b.packets();
            let ids: BTreeMap<u64, u16> = packets
                .iter()
                .filter(|p| p.kind == Kind::Publish && p.conn == 0)
                .filter_map(|p| Some((seq_of(p)?, p.packet_id)))
                .collect();
            let released = (1..=3).all(|s| {
                ids.get(&s).is_some_and(|id| {
                    packets
                        .iter()
                        .any(|p| p.kind == Kind::PubRel && p.packet_id == *id)
                })
            });
            (ids.len() == 6 && released).then_some(ids)
        })
        .await
        .unwrap_or_else(|| panic!("flows did not reach the scripted state\n{}", story(&broker)));

    gateway.kill9();
    broker.behave();
    gateway.restart().await;
    let expected = keys("k9", 1..=6);
    wait_delivered(&broker, &expected, LIMIT).await;
    broker
        .wait_for(LIMIT, |b| {
            b.qos2_pending(CLIENT_ID).is_empty().then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("flows left unfinished\n{}", story(&broker)));
    wait_buffer_empty(&gateway).await;

    let restart_conn = broker
        .connects()
        .into_iter()
        .filter(|c| c.accepted)
        .nth(1)
        .expect("a connection after the restart");
    assert!(
        !restart_conn.clean && restart_conn.session_present,
        "{restart_conn:?}"
    );
    let after: Vec<PacketInfo> = broker
        .packets()
        .into_iter()
        .filter(|p| p.conn >= restart_conn.conn)
        .collect();
    for seq in 1..=3 {
        let id = ids[&seq];
        assert!(
            after
                .iter()
                .any(|p| p.kind == Kind::PubRel && p.packet_id == id),
            "PUBREL {id} (seq {seq}) not resent after the restart\n{}",
            story(&broker)
        );
        assert!(
            !after.iter().any(|p| seq_of(p) == Some(seq)),
            "seq {seq} published again although the broker had PUBREC'd it\n{}",
            story(&broker)
        );
    }
    for seq in 4..=6 {
        let resend = after
            .iter()
            .find(|p| seq_of(p) == Some(seq))
            .unwrap_or_else(|| panic!("seq {seq} not resent\n{}", story(&broker)));
        assert!(
            resend.dup && resend.packet_id == ids[&seq],
            "seq {seq} resent with dup={} id={} (was id {})\n{}",
            resend.dup,
            resend.packet_id,
            ids[&seq],
            story(&broker)
        );
    }
    assert_exactly_once(&broker, &expected);
}

// ---------------------------------------------------------------------------------------
// f. commands are stored before they are acknowledged (issue item 6)
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_commands_are_acknowledged_only_after_they_are_stored() {
    const COMMANDS: u16 = 40;
    let broker = FakeBroker::start(Script::new()).await;
    // Beside a registry, device sources must authenticate (`check` refuses `auth = "none"`).
    let config = link_config(broker.port, "3.1.1")
        .source("auth = \"registry\"")
        .tail("[registry]");
    let mut gateway = start_connected(&config).await;
    let (status, device) = api_json(
        gateway.api,
        "POST",
        "/api/v1/devices",
        &json!({"id": "cmd-dev"}),
    )
    .await;
    assert_eq!(status, 201, "add device: {device}");
    let filter = "gateways/gw-1/devices/+/commands";
    broker
        .wait_for(LIMIT, |b| b.is_subscribed(CLIENT_ID, filter).then_some(()))
        .await
        .unwrap_or_else(|| panic!("no subscription to {filter}\n{}", story(&broker)));

    // Kill the gateway the moment the PUBACK of the last command of a burst arrives
    // (one socket write, so the gateway reads the burst at once).
    let killer = Killer::arm(gateway.pid());
    let fired = Arc::new(AtomicBool::new(false));
    let hook_fired = Arc::clone(&fired);
    let hook_killer = Arc::clone(&killer);
    broker.script(|s| {
        *s = std::mem::take(s).on_packet(move |p| {
            if p.kind == Kind::PubAck
                && p.packet_id == COMMANDS
                && !hook_fired.swap(true, Ordering::SeqCst)
            {
                hook_killer.fire();
            }
        });
    });
    let bodies: Vec<String> = (1..=COMMANDS)
        .map(|n| json!({"id": format!("c-{n}"), "name": "reboot", "params": {"n": n}}).to_string())
        .collect();
    let topic = "gateways/gw-1/devices/cmd-dev/commands";
    let burst: Vec<(&str, &[u8], u8)> = bodies.iter().map(|b| (topic, b.as_bytes(), 1)).collect();
    let ids = broker
        .publish_burst_to(CLIENT_ID, &burst)
        .expect("gateway connected");
    assert_eq!(
        ids,
        (1..=COMMANDS).collect::<Vec<_>>(),
        "fresh session: packet ids count from 1"
    );
    let died = eventually(LIMIT, || gateway.exited()).await;
    assert!(
        died.is_some(),
        "the last PUBACK never came (killed: {})\n{}",
        fired.load(Ordering::SeqCst),
        story(&broker)
    );
    gateway.kill9();
    broker.set_script(Script::new());
    let acked: Vec<String> = broker
        .outbound()
        .iter()
        .filter(|o| o.acked_at.is_some())
        .map(|o| format!("c-{}", o.packet_id))
        .collect();
    gateway.restart().await;
    let (status, body) = api(gateway.api, "GET", "/api/v1/devices/cmd-dev/commands").await;
    assert_eq!(status, 200, "{body}");
    let stored: BTreeSet<String> = body
        .as_array()
        .unwrap_or_else(|| panic!("a JSON list of commands: {body}"))
        .iter()
        .filter_map(|c| c.get("id").and_then(Value::as_str).map(str::to_owned))
        .collect();
    let lost: Vec<&String> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    eprintln!(
        "{} commands acked before the kill, {} stored",
        acked.len(),
        stored.len()
    );
    assert!(
        lost.is_empty(),
        "{} commands PUBACKed to the broker but not stored: {lost:?}",
        lost.len()
    );
}

/// A `sh` that waits for a line on its stdin, then runs `kill -9 PID`: armed before, it
/// kills within microseconds of [`Killer::fire`], fast enough to land between an ack on
/// the wire and whatever the gateway does next.
struct Killer {
    child: Mutex<std::process::Child>,
    stdin: Mutex<Option<std::process::ChildStdin>>,
}

impl Killer {
    fn arm(pid: u32) -> Arc<Self> {
        // `&&`: an EOF (the test ending without firing) must not kill anything.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("read line && kill -9 {pid}"))
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let stdin = child.stdin.take();
        Arc::new(Killer {
            child: Mutex::new(child),
            stdin: Mutex::new(stdin),
        })
    }

    fn fire(&self) {
        let stdin = self.stdin.lock().expect("lock").take();
        if let Some(mut stdin) = stdin {
            if let Err(err) = stdin.write_all(b"go\n").and_then(|()| stdin.flush()) {
                eprintln!("killer: {err}");
            }
        }
    }
}

impl Drop for Killer {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(PoisonError::into_inner);
        // Already exited after firing, or killed now: either way reaped.
        if let Err(err) = child.kill() {
            eprintln!("killer: {err}");
        }
        if let Err(err) = child.wait() {
            eprintln!("killer: {err}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// g. batching without batch_topic (issue item 7)
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_without_batch_topic_respect_the_inflight_window_and_do_not_flood() {
    const DEVICES: usize = 20;
    const EACH: u64 = 20;
    const WINDOW: usize = 4;
    let script = Script::new().on(
        Match::topic(TELEMETRY),
        Reply::Delay(Duration::from_millis(30)),
    );
    let broker = FakeBroker::start(script).await;
    let config = link_config(broker.port, "3.1.1")
        .sink("qos = 1")
        .sink(&format!("max_inflight = {WINDOW}"))
        .sink("batch_max_events = 50");
    let gateway = start_connected(&config).await;
    let names: Vec<String> = (0..DEVICES).map(|i| format!("bat-{i:02}")).collect();
    let mut devices = Vec::new();
    for name in &names {
        devices.push(send(&config, name, 1..=EACH, 16).await);
    }
    let mut expected = BTreeSet::new();
    for name in &names {
        expected.extend(keys(name, 1..=EACH));
    }

    let half = expected.len() / 2;
    broker
        .wait_for(LIMIT, |b| (delivered(b).len() >= half).then_some(()))
        .await
        .unwrap_or_else(|| panic!("not half delivered\n{}", story(&broker)));
    broker.disconnect_all();
    let all = broker
        .wait_for(LIMIT, |b| {
            let got = delivered(b);
            expected.iter().all(|k| got.contains_key(k)).then_some(())
        })
        .await;
    if all.is_none() {
        let buffered = gateway
            .metric("fieldgate_buffer_events", &[("sink", "cloud")])
            .await;
        eprintln!("after the disconnect, fieldgate_buffer_events = {buffered:?}");
    }
    wait_delivered(&broker, &expected, Duration::from_secs(1)).await;
    wait_buffer_empty(&gateway).await;

    // A publish all of whose events the broker had received before is a duplicate.
    let mut seen: BTreeSet<Key> = BTreeSet::new();
    let mut duplicate_publishes = 0;
    let mut duplicate_events = 0;
    for p in broker.publishes().iter().filter(|p| is_telemetry(&p.topic)) {
        let events = events_in(&p.payload);
        let again = events.iter().filter(|e| seen.contains(*e)).count();
        duplicate_events += again;
        if again == events.len() && !events.is_empty() {
            duplicate_publishes += 1;
        }
        seen.extend(events);
    }
    eprintln!(
        "max outstanding {}, duplicate publishes {duplicate_publishes}, duplicate events {duplicate_events}",
        broker.max_outstanding()
    );
    assert!(
        broker.max_outstanding() <= WINDOW,
        "{} publishes unacked at once with max_inflight = {WINDOW}",
        broker.max_outstanding()
    );
    assert!(
        duplicate_publishes <= WINDOW,
        "{duplicate_publishes} duplicate publishes after one disconnect (window {WINDOW})"
    );
    drop(devices);
}

// ---------------------------------------------------------------------------------------
// h. disconnect mid-flight, reordered and duplicated acks
// ---------------------------------------------------------------------------------------

/// Sends 100 events through a broker playing `script` (after a first rule: the acks
/// for `withheld` never come while it plays, so those must stay buffered). Then the
/// broker behaves and drops the link: everything arrives and the buffer empties.
async fn nothing_lost_under(
    protocol: &str,
    withheld: &[u64],
    script: impl FnOnce(Script) -> Script,
) {
    let withheld_set: BTreeSet<u64> = withheld.iter().copied().collect();
    let held = withheld_set.clone();
    let script = script(Script::new().on(seqs(move |s| held.contains(&s)), Reply::Withhold));
    let broker = FakeBroker::start(script).await;
    let config = link_config(broker.port, protocol)
        .sink("qos = 1")
        .sink("max_inflight = 10");
    let gateway = start_connected(&config).await;
    let _device = send(&config, "mis", 1..=100, 16).await;

    let others = keys("mis", (1..=100).filter(|s| !withheld_set.contains(s)));
    wait_delivered(&broker, &others, LIMIT).await;
    if !withheld.is_empty() {
        let buffered = gateway
            .metric("fieldgate_buffer_events", &[("sink", "cloud")])
            .await
            .unwrap_or(0.0);
        assert!(
            buffered >= withheld.len() as f64,
            "only {buffered} events buffered while {} were never acked: deleted on another ack\n{}",
            withheld.len(),
            story(&broker)
        );
    }
    broker.behave();
    broker.disconnect_all();
    wait_delivered(&broker, &keys("mis", 1..=100), LIMIT).await;
    wait_buffer_empty(&gateway).await;
    assert!(broker.violations().is_empty(), "{}", story(&broker));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_mid_flight_loses_nothing() {
    nothing_lost_under("3.1.1", &[70, 71, 72], |s| {
        s.on(
            Match::topic(TELEMETRY).first_send().nth(20),
            Reply::Disconnect,
        )
        .on(
            Match::topic(TELEMETRY).first_send().nth(50),
            Reply::Disconnect,
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordered_acks_lose_nothing() {
    nothing_lost_under("5", &[40, 41, 42, 43, 44], |s| {
        s.on(seqs(|s| s % 3 == 0 && s <= 90), Reply::Defer).on(
            seqs(|s| s % 7 == 0),
            Reply::Delay(Duration::from_millis(200)),
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_acks_lose_nothing() {
    nothing_lost_under("3.1.1", &[41, 42, 43, 44, 45], |s| {
        s.on(seqs(|s| s % 2 == 0), Reply::Duplicate)
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// i. dead-letter operations
// ---------------------------------------------------------------------------------------

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadletter_list_replay_and_purge_via_api_and_cli() {
    let script = Script::new().on(seqs(|s| s == 2 || s == 4), Reply::Code(0x87));
    let broker = FakeBroker::start(script).await;
    let config = link_config(broker.port, "5").sink("qos = 1");
    let gateway = start_connected(&config).await;
    let mut device = send(&config, "dl", 1..=5, 16).await;
    wait_delivered(&broker, &keys("dl", [1, 3, 5]), LIMIT).await;

    // List: API and CLI.
    let entries = wait_deadletters(&gateway, 2).await;
    for entry in &entries {
        assert_entry(entry, "dl", REASON_REJECTED, Some(0x87));
        assert!(entry["size"].as_u64().is_some_and(|s| s > 0), "{entry}");
    }
    let listed = deadletter_cli(&gateway, &["list", "cloud"]).await;
    assert!(listed.status.success(), "{}", text(&listed));
    for entry in &entries {
        let id = entry["id"]
            .as_str()
            .map_or_else(|| entry["id"].to_string(), str::to_owned);
        assert!(
            text(&listed).contains(&id),
            "CLI list lacks {id}: {}",
            text(&listed)
        );
    }

    // Replay (API) once the cause is fixed: both arrive.
    broker.behave();
    let (status, answer) = api(gateway.api, "POST", &deadletter_replay_path("cloud")).await;
    assert!((200..300).contains(&status), "replay: {status} {answer}");
    assert_eq!(answered_count(&answer), Some(2), "replay answer: {answer}");
    wait_delivered(&broker, &keys("dl", 1..=5), LIMIT).await;
    wait_buffer_empty(&gateway).await;
    assert!(deadletters(&gateway).await.is_empty());

    // Another reject; purge (CLI) drops it; replay (CLI) then has nothing to do.
    broker.set_script(Script::new().on(seq_is(6), Reply::Code(0x87)));
    send_more(&mut device, "dl", [6]).await;
    wait_deadletters(&gateway, 1).await;
    let purged = deadletter_cli(&gateway, &["purge", "cloud"]).await;
    assert!(purged.status.success(), "{}", text(&purged));
    assert!(
        text(&purged).contains('1'),
        "purge reports its count: {}",
        text(&purged)
    );
    assert!(deadletters(&gateway).await.is_empty());
    let replayed = deadletter_cli(&gateway, &["replay", "cloud"]).await;
    assert!(replayed.status.success(), "{}", text(&replayed));
    assert!(
        text(&replayed).contains('0'),
        "replay reports its count: {}",
        text(&replayed)
    );
    let (status, answer) = api(gateway.api, "DELETE", &deadletter_path("cloud")).await;
    assert!((200..300).contains(&status), "purge: {status} {answer}");
    assert_eq!(answered_count(&answer), Some(0), "purge answer: {answer}");
    assert!(!delivered(&broker).contains_key(&("dl".to_string(), 6)));
}

// ---------------------------------------------------------------------------------------
// j. a stable event id
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_id_is_stable_across_redeliveries_and_a_v5_user_property() {
    let broker =
        FakeBroker::start(Script::new().on_times(seq_is(3), Reply::Withhold, Some(1))).await;
    let config = link_config(broker.port, "5").sink("qos = 1");
    let mut gateway = start_connected(&config).await;
    let mut device = send(&config, "eid", 1..=5, 16).await;
    wait_delivered(&broker, &keys("eid", [1, 2, 4, 5]), LIMIT).await;
    // The withheld one is resent on the next connection.
    broker.disconnect_all();
    wait_delivered(&broker, &keys("eid", 1..=5), LIMIT).await;

    // Seq 7 is withheld until the gateway is killed; it is resent after the restart.
    broker.set_script(Script::new().on(seq_is(7), Reply::Withhold));
    send_more(&mut device, "eid", 6..=8).await;
    wait_delivered(&broker, &keys("eid", [6, 8]), LIMIT).await;
    broker
        .wait_for(LIMIT, |b| {
            b.publishes()
                .iter()
                .any(|p| seq_of(p) == Some(7))
                .then_some(())
        })
        .await
        .expect("seq 7 published");
    gateway.kill9();
    broker.behave();
    gateway.restart().await;
    wait_delivered(&broker, &keys("eid", 1..=8), LIMIT).await;

    let mut ids: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for p in broker.publishes() {
        let Some(seq) = seq_of(&p) else { continue };
        let envelope: Value = serde_json::from_slice(&p.payload).expect("envelope JSON");
        let id =
            envelope_id(&envelope).unwrap_or_else(|| panic!("envelope without an id: {envelope}"));
        assert!(!id.is_empty(), "{envelope}");
        assert_eq!(
            p.user_property(ID_PROPERTY),
            Some(id.as_str()),
            "user property {ID_PROPERTY:?} differs from the envelope id: {:?}",
            p.user_properties
        );
        ids.entry(seq).or_default().insert(id);
    }
    for (seq, set) in &ids {
        assert_eq!(set.len(), 1, "seq {seq} carried different ids: {set:?}");
    }
    let distinct: BTreeSet<&String> = ids.values().flatten().collect();
    assert_eq!(distinct.len(), 8, "ids are unique per event: {ids:?}");
    let resends = |seq: u64| {
        broker
            .publishes()
            .iter()
            .filter(|p| seq_of(p) == Some(seq))
            .count()
    };
    assert!(resends(3) >= 2 && resends(7) >= 2, "{}", story(&broker));
}

// ---------------------------------------------------------------------------------------
// k. shutdown
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_acks_withheld_exits_within_the_grace_and_says_offline() {
    let broker = FakeBroker::start(Script::new().on(Match::any(), Reply::Withhold)).await;
    let config = link_config(broker.port, "3.1.1").sink("qos = 1");
    let mut gateway = start_connected(&config).await;
    let _device = send(&config, "term", 1..=10, 16).await;
    broker
        .wait_for(LIMIT, |b| {
            b.publishes()
                .iter()
                .any(|p| is_telemetry(&p.topic))
                .then_some(())
        })
        .await
        .expect("telemetry reached the broker");

    let started = Instant::now();
    let status = gateway.terminate().await;
    let took = started.elapsed();
    eprintln!("exit {status} {took:?} after SIGTERM (shutdown_grace = 5s)");
    assert!(
        took <= Duration::from_secs(5 + 3),
        "shutdown took {took:?}, beyond shutdown_grace + 3 s\n{}",
        gateway.stderr_tail(30)
    );
    let offline_published = broker
        .publishes()
        .iter()
        .any(|p| p.topic == STATUS && p.retain && p.text() == "offline");
    let offline_will = broker
        .wills()
        .iter()
        .any(|w| w.topic == STATUS && w.retain && w.payload.as_ref() == b"offline");
    assert!(
        offline_published || offline_will,
        "neither a retained offline nor the will\n{}",
        story(&broker)
    );
    assert_eq!(broker.retained(STATUS), Some(Bytes::from("offline")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_full_window_leaves_offline_to_the_will() {
    // One slot, held by an unacknowledged device event (the gateway status is acked): there
    // is no room for a clean `offline`, so the gateway must not DISCONNECT (that would
    // cancel the will and leave the retained `online` standing).
    let broker =
        FakeBroker::start(Script::new().on(Match::topic("gateways/+/devices/#"), Reply::Withhold))
            .await;
    let config = link_config(broker.port, "3.1.1")
        .sink("qos = 1")
        .sink("max_inflight = 1");
    let mut gateway = start_connected(&config).await;
    let _device = send(&config, "full", 1..=3, 16).await;
    broker
        .wait_for(LIMIT, |b| {
            let device_event = b
                .publishes()
                .iter()
                .any(|p| p.topic.starts_with("gateways/gw-1/devices/"));
            (device_event && b.retained(STATUS) == Some(Bytes::from("online"))).then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("no withheld device event or no online\n{}", story(&broker)));
    let started = Instant::now();
    gateway.terminate().await;
    assert!(
        started.elapsed() <= Duration::from_secs(5 + 3),
        "shutdown took {:?}\n{}",
        started.elapsed(),
        gateway.stderr_tail(30)
    );
    broker
        .wait_for(LIMIT, |b| {
            (b.retained(STATUS) == Some(Bytes::from("offline"))).then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("retained status is not offline\n{}", story(&broker)));
}
