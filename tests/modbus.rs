//! Modbus sources against real peers: pymodbus as a Modbus TCP server and as an RTU server
//! on a pseudo-terminal bus (tests/fixtures/modbus_sim.py), and a scripted misbehaving
//! Modbus TCP server written here.
//!
//! Python: `$FIELDGATE_PYTHON` (set by `scripts/test.sh`, which installs pymodbus into
//! `target/pyenv`), else that environment if it exists, else `python3`. Without pymodbus
//! the tests that need it print SKIPPED and pass; scripts/test.sh installs it so they run.

mod common;

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Gateway, Mosquitto, Subscriber, eventually, free_port};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

const PYTHON_ENV: &str = "FIELDGATE_PYTHON";

fn python() -> PathBuf {
    if let Some(python) = std::env::var_os(PYTHON_ENV) {
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

/// The Python with pymodbus, or `None` (the caller prints SKIPPED).
fn pymodbus() -> Option<PathBuf> {
    let python = python();
    let ok = Command::new(&python)
        .args(["-c", "import pymodbus.simulator"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if ok {
        Some(python)
    } else {
        eprintln!(
            "SKIPPED: pymodbus is not installed for {}; run scripts/test.sh (it installs it \
             into target/pyenv)",
            python.display()
        );
        None
    }
}

/// A pymodbus server (tests/fixtures/modbus_sim.py), killed on drop.
struct Sim {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Sim {
    async fn start(python: &Path, spec: &Value) -> Sim {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/modbus_sim.py");
        let mut child = Command::new(python)
            .arg(script)
            .arg(spec.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start modbus_sim.py");
        let stdout = child.stdout.take().expect("sim stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sink.lock().expect("sim lines").push(line);
            }
        });
        let mut sim = Sim { child, lines };
        let ready = eventually(Duration::from_secs(30), || {
            assert!(
                sim.child.try_wait().expect("sim status").is_none(),
                "modbus_sim.py exited early"
            );
            sim.lines()
                .iter()
                .any(|line| line.starts_with("READY"))
                .then_some(())
        })
        .await;
        assert!(ready.is_some(), "modbus_sim.py not ready within 30s");
        sim
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("sim lines").clone()
    }

    /// Every request the server saw: (unit, function code, address, count).
    fn requests(&self) -> Vec<(u8, u8, u16, u16)> {
        self.lines()
            .iter()
            .filter_map(|line| {
                let mut parts = line.strip_prefix("REQ ")?.split(' ');
                Some((
                    parts.next()?.parse().ok()?,
                    parts.next()?.parse().ok()?,
                    parts.next()?.parse().ok()?,
                    parts.next()?.parse().ok()?,
                ))
            })
            .collect()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        drop(self.child.kill());
        drop(self.child.wait());
    }
}

/// Every event the file sink `sink` wrote so far, as parsed envelopes.
fn events(gateway: &Gateway, sink: &str) -> Vec<Value> {
    let dir = gateway.data_dir.join("sinks").join(sink);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|path| path.extension().is_some_and(|ext| ext == "ndjson"));
    files.sort();
    files
        .iter()
        .flat_map(|path| {
            std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn payloads_of(events: &[Value], device: &str) -> Vec<Value> {
    events
        .iter()
        .filter(|event| event["device"] == device && event["kind"] == "telemetry")
        .map(|event| event["payload"].clone())
        .collect()
}

fn gateway_config(api_port: u16, sources: &str, inputs: &[&str]) -> String {
    let inputs: Vec<String> = inputs.iter().map(|name| format!("{name:?}")).collect();
    format!(
        "[gateway]\nid = \"gw-1\"\nshutdown_grace = \"5s\"\n\n[api]\naddress = \"127.0.0.1:{api_port}\"\n\n\
         {sources}\n\n[sinks.events]\ntype = \"file\"\ninputs = [{}]\n\n[sinks.events.buffer]\ntype = \"disk\"\n",
        inputs.join(", ")
    )
}

/// Wire bytes of a value whose big-endian bytes are `be`, in byte order `order`, as
/// registers. The permutations are written out per the usual naming (A = most significant
/// byte), independently of the gateway's codec.
fn registers(be: &[u8], order: &str) -> Vec<u16> {
    let permutation: Vec<usize> = match (be.len(), order) {
        (2, "ABCD" | "CDAB") => vec![0, 1],
        (2, "BADC" | "DCBA") => vec![1, 0],
        (4, "ABCD") => vec![0, 1, 2, 3],
        (4, "CDAB") => vec![2, 3, 0, 1],
        (4, "BADC") => vec![1, 0, 3, 2],
        (4, "DCBA") => vec![3, 2, 1, 0],
        (8, "ABCD") => vec![0, 1, 2, 3, 4, 5, 6, 7],
        (8, "CDAB") => vec![6, 7, 4, 5, 2, 3, 0, 1],
        (8, "BADC") => vec![1, 0, 3, 2, 5, 4, 7, 6],
        (8, "DCBA") => vec![7, 6, 5, 4, 3, 2, 1, 0],
        other => panic!("no permutation for {other:?}"),
    };
    let wire: Vec<u8> = permutation.iter().map(|&index| be[index]).collect();
    wire.chunks(2)
        .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
        .collect()
}

const ORDERS: [&str; 4] = ["ABCD", "CDAB", "BADC", "DCBA"];

/// Every type in every byte order, laid out back to back from holding register 0: the
/// points TOML, the registers to serve and the values expected in the event.
fn type_table() -> (String, serde_json::Map<String, Value>, Vec<(String, Value)>) {
    let cases: Vec<(&str, Vec<u8>, Value)> = vec![
        ("u16", 54321u16.to_be_bytes().to_vec(), json!(54321)),
        ("i16", (-1234i16).to_be_bytes().to_vec(), json!(-1234)),
        (
            "u32",
            3_000_000_000u32.to_be_bytes().to_vec(),
            json!(3_000_000_000u32),
        ),
        (
            "i32",
            (-2_000_000_000i32).to_be_bytes().to_vec(),
            json!(-2_000_000_000),
        ),
        ("f32", 21.5f32.to_be_bytes().to_vec(), json!(21.5)),
        (
            "u64",
            0x0123_4567_89AB_CDEFu64.to_be_bytes().to_vec(),
            json!(0x0123_4567_89AB_CDEFu64),
        ),
        (
            "i64",
            (-1_234_567_890_123i64).to_be_bytes().to_vec(),
            json!(-1_234_567_890_123i64),
        ),
        (
            "f64",
            (-12345.678f64).to_be_bytes().to_vec(),
            json!(-12345.678),
        ),
    ];
    let mut points = String::new();
    let mut holding = serde_json::Map::new();
    let mut expected = Vec::new();
    let mut address = 0usize;
    for (data_type, be, value) in &cases {
        for order in ORDERS {
            let name = format!("{data_type}_{order}");
            points.push_str(&format!(
                "[[sources.plc1.points]]\nname = {name:?}\narea = \"holding\"\naddress = {address}\n\
                 type = {data_type:?}\nbyte_order = {order:?}\n\n"
            ));
            for (offset, register) in registers(be, order).into_iter().enumerate() {
                holding.insert((address + offset).to_string(), json!(register));
            }
            address += be.len() / 2;
            expected.push((name, value.clone()));
        }
    }
    // A string of 4 registers ("PLC-42", NUL-padded), in both byte arrangements.
    for order in ["ABCD", "BADC"] {
        let name = format!("string_{order}");
        points.push_str(&format!(
            "[[sources.plc1.points]]\nname = {name:?}\narea = \"holding\"\naddress = {address}\n\
             type = \"string\"\ncount = 4\nbyte_order = {order:?}\n\n"
        ));
        let mut bytes = b"PLC-42".to_vec();
        bytes.resize(8, 0);
        for (offset, pair) in bytes.chunks(2).enumerate() {
            let register = u16::from_be_bytes([pair[0], pair[1]]);
            let register = if order == "BADC" {
                register.swap_bytes()
            } else {
                register
            };
            holding.insert((address + offset).to_string(), json!(register));
        }
        address += 4;
        expected.push((name, json!("PLC-42")));
    }
    assert_eq!(address, 88, "the table is one read of 88 registers");
    (points, holding, expected)
}

/// Every type and byte order reads back as written; adjacent points are one read; the
/// issue's point (f32 with scale 0.1) works as written; the CLI reads the same values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_tcp_reads_every_type_and_order_in_coalesced_requests() {
    let Some(python) = pymodbus() else { return };
    let port = free_port();
    let (points, mut holding, expected) = type_table();
    // The issue's temperature point: f32 ABCD at 200, raw 215.0, scale 0.1.
    for (offset, register) in registers(&215.0f32.to_be_bytes(), "ABCD")
        .into_iter()
        .enumerate()
    {
        holding.insert((200 + offset).to_string(), json!(register));
    }
    let sim = Sim::start(
        &python,
        &json!({"mode": "tcp", "port": port, "devices": [{
            "unit": 1,
            "holding": holding,
            "input": {"7": 4242},
            "coils": {"3": true},
            "discrete": {"5": true},
        }]}),
    )
    .await;
    let source = format!(
        r#"[sources.plc1]
type = "modbus_tcp"
address = "127.0.0.1:{port}"
unit_id = 1
poll_interval = "200ms"
device = "plc-1"

[[sources.plc1.points]]
name = "temperature"
area = "holding"        # coil | discrete | holding | input
address = 200
type = "f32"            # bool u16 i16 u32 i32 f32 u64 i64 f64 string
byte_order = "ABCD"     # ABCD CDAB BADC DCBA
scale = 0.1
unit = "degC"

[[sources.plc1.points]]
name = "level"
area = "input"
address = 7
type = "u16"
offset = -42

[[sources.plc1.points]]
name = "pump"
area = "coil"
address = 3
type = "bool"

[[sources.plc1.points]]
name = "door"
area = "discrete"
address = 5
type = "bool"

{points}"#
    );
    let api_port = free_port();
    let gateway = Gateway::start(&gateway_config(api_port, &source, &["plc1"])).await;
    let payloads = eventually(Duration::from_secs(20), || {
        let payloads = payloads_of(&events(&gateway, "events"), "plc-1");
        (payloads.len() >= 3).then_some(payloads)
    })
    .await
    .unwrap_or_else(|| panic!("no events from plc-1\n{}", gateway.stderr_tail(30)));
    let payload = &payloads[0];
    for (name, value) in &expected {
        assert_eq!(&payload[name], value, "point {name} in {payload}");
        assert_eq!(payload["quality"][name], "good", "{name}");
    }
    assert_eq!(payload["temperature"], json!(21.5));
    assert_eq!(payload["units"]["temperature"], "degC");
    assert_eq!(payload["level"], json!(4200.0));
    assert_eq!(payload["pump"], json!(true));
    assert_eq!(payload["door"], json!(true));
    assert!(payload["ts"].as_u64().is_some());
    // Coalescing, counted at the device: per poll one read of the 88-register table, one of
    // the temperature, one input, one coil and one discrete read.
    let table_read = |request: &&(u8, u8, u16, u16)| **request == (1, 3, 0, 88);
    eventually(Duration::from_secs(10), || {
        (sim.requests().iter().filter(table_read).count() >= 3).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("table reads: {:?}", sim.requests()));
    let requests = sim.requests();
    let table_reads = requests.iter().filter(table_read).count();
    let holding_reads: Vec<_> = requests.iter().filter(|request| request.1 == 3).collect();
    assert!(
        holding_reads
            .iter()
            .all(|request| matches!(request, (1, 3, 0, 88) | (1, 3, 200, 2))),
        "unexpected holding reads: {holding_reads:?}"
    );
    let polls = table_reads;
    let per_poll = requests.len() as f64 / polls as f64;
    assert!(
        (4.5..=5.5).contains(&per_poll),
        "{} requests for {polls} polls: {requests:?}",
        requests.len()
    );
    let sent = gateway
        .metric("fieldgate_modbus_requests_total", &[("source", "plc1")])
        .await
        .unwrap_or(0.0);
    assert!(sent >= 15.0, "requests metric {sent}");
    assert_eq!(
        gateway
            .metric("fieldgate_modbus_points", &[("source", "plc1")])
            .await,
        Some((expected.len() + 4) as f64)
    );

    // The commissioning CLI reads the same registers and decodes them alike.
    let output = Command::new(common::fieldgate_bin())
        .args([
            "modbus",
            "read",
            &format!("127.0.0.1:{port}"),
            "--unit",
            "1",
            "--area",
            "holding",
            "--address",
            "200",
            "--count",
            "1",
            "--type",
            "f32",
            "--byte-order",
            "ABCD",
        ])
        .output()
        .expect("run fieldgate modbus read");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.trim(), "200: 215.0 (0x4357 0x0000)");
    let output = Command::new(common::fieldgate_bin())
        .args([
            "modbus",
            "read",
            &format!("127.0.0.1:{port}"),
            "--area",
            "coil",
            "--address",
            "2",
            "--count",
            "2",
        ])
        .output()
        .expect("run fieldgate modbus read");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "2: false\n3: true\n"
    );
}

/// Exceptions give a bad quality for the refused points only; a device that goes away
/// turns stale, then bad, is retried under backoff and comes back good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_exception_outage_and_recovery() {
    let Some(python) = pymodbus() else { return };
    let port = free_port();
    let spec = json!({"mode": "tcp", "port": port, "devices": [{
        "unit": 1,
        "holding": {"0": 1234, "100": 7},
        "exception": {"holding:100": 2},
    }]});
    let sim = Sim::start(&python, &spec).await;
    let source = format!(
        r#"[sources.plc]
type = "modbus_tcp"
address = "127.0.0.1:{port}"
device = "plc-2"
poll_interval = "150ms"
timeout = "300ms"
retries = 1
backoff_min = "200ms"
backoff_max = "500ms"

[[sources.plc.points]]
name = "ok"
area = "holding"
address = 0
type = "u16"

[[sources.plc.points]]
name = "refused"
area = "holding"
address = 100
type = "u16"
"#
    );
    let gateway = Gateway::start(&gateway_config(free_port(), &source, &["plc"])).await;
    let first = eventually(Duration::from_secs(20), || {
        payloads_of(&events(&gateway, "events"), "plc-2")
            .into_iter()
            .next()
    })
    .await
    .unwrap_or_else(|| panic!("no events\n{}", gateway.stderr_tail(30)));
    assert_eq!(first["ok"], json!(1234));
    assert_eq!(first["quality"]["ok"], "good");
    assert_eq!(first["refused"], Value::Null);
    assert_eq!(first["quality"]["refused"], "bad");
    gateway
        .wait_metric(
            "fieldgate_modbus_errors_total",
            &[("source", "plc"), ("kind", "exception")],
            Duration::from_secs(10),
            |value| value >= 1.0,
        )
        .await;
    let output = Command::new(common::fieldgate_bin())
        .args([
            "modbus",
            "read",
            &format!("127.0.0.1:{port}"),
            "--address",
            "100",
        ])
        .output()
        .expect("run fieldgate modbus read");
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("exception 0x02 (illegal_data_address)"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // The device goes away: stale, then bad; connect errors counted.
    drop(sim);
    let seen = events(&gateway, "events").len();
    let bad = eventually(Duration::from_secs(20), || {
        payloads_of(&events(&gateway, "events")[seen..], "plc-2")
            .into_iter()
            .find(|payload| payload["quality"]["ok"] == "bad")
    })
    .await
    .unwrap_or_else(|| panic!("never bad\n{}", gateway.stderr_tail(30)));
    assert_eq!(bad["ok"], Value::Null);
    let after_outage = events(&gateway, "events");
    assert!(
        payloads_of(&after_outage[seen..], "plc-2")
            .iter()
            .any(|payload| payload["quality"]["ok"] == "stale" && payload["ok"] == json!(1234)),
        "no stale value between good and bad"
    );
    gateway
        .wait_metric(
            "fieldgate_modbus_errors_total",
            &[("source", "plc"), ("kind", "connect")],
            Duration::from_secs(10),
            |value| value >= 2.0,
        )
        .await;
    // Status events bracket the outage: online at first, offline with the error kind.
    let statuses: Vec<Value> = events(&gateway, "events")
        .into_iter()
        .filter(|event| event["device"] == "plc-2" && event["kind"] == "status")
        .map(|event| event["payload"].clone())
        .collect();
    assert_eq!(
        statuses.first(),
        Some(&json!({"status": "online"})),
        "{statuses:?}"
    );
    assert!(
        statuses
            .iter()
            .any(|status| status["status"] == "offline" && status["reason"].is_string()),
        "{statuses:?}"
    );
    // Back: good again within the backoff.
    let _sim = Sim::start(&python, &spec).await;
    let seen = after_outage.len();
    eventually(Duration::from_secs(20), || {
        payloads_of(&events(&gateway, "events")[seen..], "plc-2")
            .into_iter()
            .find(|payload| payload["quality"]["ok"] == "good")
    })
    .await
    .unwrap_or_else(|| panic!("never good again\n{}", gateway.stderr_tail(30)));
    eventually(Duration::from_secs(10), || {
        let online = events(&gateway, "events")
            .iter()
            .filter(|event| {
                event["device"] == "plc-2" && event["payload"] == json!({"status": "online"})
            })
            .count();
        (online >= 2).then_some(())
    })
    .await
    .expect("online again after the outage");
}

/// How the fake server answers one request.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    /// A correct answer: register 0 holds the request number.
    Good,
    /// No answer at all.
    Withhold,
    /// An exception response with this code.
    Exception(u8),
    /// A correct answer with the transaction id + 1.
    WrongTransaction,
    /// A correct answer from another unit.
    WrongUnit,
    /// An MBAP header whose length is 0.
    ZeroLength,
    /// An MBAP header announcing 65535 bytes, then 10 bytes of junk.
    Oversize,
    /// An answer with two registers for a read of one.
    LongAnswer,
    /// Half of an MBAP header, then nothing.
    Short,
    /// The connection is closed without an answer.
    Disconnect,
}

/// A misbehaving Modbus TCP device: each request gets the next behaviour of `script`.
async fn fake_device(listener: TcpListener, script: Vec<Behaviour>, served: Arc<AtomicUsize>) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            return;
        };
        let script = script.clone();
        let served = Arc::clone(&served);
        tokio::spawn(async move {
            loop {
                let mut header = [0u8; 7];
                if socket.read_exact(&mut header).await.is_err() {
                    return;
                }
                let length = usize::from(u16::from_be_bytes([header[4], header[5]]));
                let mut pdu = vec![0u8; length.saturating_sub(1)];
                if socket.read_exact(&mut pdu).await.is_err() {
                    return;
                }
                let number = served.fetch_add(1, Ordering::SeqCst);
                let behaviour = script[number % script.len()];
                let (tid, unit, function) = (
                    u16::from_be_bytes([header[0], header[1]]),
                    header[6],
                    pdu.first().copied().unwrap_or(0),
                );
                let answer = |tid: u16, unit: u8, body: &[u8]| {
                    let mut frame = tid.to_be_bytes().to_vec();
                    frame.extend_from_slice(&[0, 0]);
                    frame.extend_from_slice(
                        &u16::try_from(body.len() + 1)
                            .expect("short body")
                            .to_be_bytes(),
                    );
                    frame.push(unit);
                    frame.extend_from_slice(body);
                    frame
                };
                let value = u16::try_from(number % 60_000)
                    .expect("below 60000")
                    .to_be_bytes();
                let good = [function, 2, value[0], value[1]];
                let frame = match behaviour {
                    Behaviour::Good => answer(tid, unit, &good),
                    Behaviour::Withhold => continue,
                    Behaviour::Exception(code) => answer(tid, unit, &[function | 0x80, code]),
                    Behaviour::WrongTransaction => answer(tid.wrapping_add(1), unit, &good),
                    Behaviour::WrongUnit => answer(tid, unit.wrapping_add(1), &good),
                    Behaviour::ZeroLength => vec![header[0], header[1], 0, 0, 0, 0, unit, function],
                    Behaviour::Oversize => {
                        let mut frame = vec![header[0], header[1], 0, 0, 0xFF, 0xFF, unit];
                        frame.extend_from_slice(&[0xAB; 10]);
                        frame
                    }
                    Behaviour::LongAnswer => answer(tid, unit, &[function, 4, 0, 1, 0, 2]),
                    Behaviour::Short => vec![header[0], header[1], 0],
                    Behaviour::Disconnect => return,
                };
                if socket.write_all(&frame).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// A device that withholds, rejects, lies about transaction and unit ids, sends
/// malformed, short and oversize frames and hangs up: it gets bad qualities and counted
/// errors, is recovered from every time, never panics the gateway, and a healthy device
/// on another source keeps its schedule throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_device_is_contained() {
    let Some(python) = pymodbus() else { return };
    let healthy_port = free_port();
    let _healthy = Sim::start(
        &python,
        &json!({"mode": "tcp", "port": healthy_port, "devices": [{"unit": 1, "holding": {"0": 99}}]}),
    ).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bad_port = listener.local_addr().unwrap().port();
    let served = Arc::new(AtomicUsize::new(0));
    use Behaviour::*;
    let script = vec![
        Good,
        Withhold,
        Good,
        Exception(4),
        Good,
        WrongTransaction,
        Good,
        ZeroLength,
        Good,
        LongAnswer,
        Good,
        Disconnect,
        Good,
        Oversize,
        Good,
        WrongUnit,
        Good,
        Short,
        Good,
        Exception(0x0B),
    ];
    let fake = tokio::spawn(fake_device(listener, script, Arc::clone(&served)));
    let source = format!(
        r#"[sources.bad]
type = "modbus_tcp"
address = "127.0.0.1:{bad_port}"
device = "bad-1"
poll_interval = "100ms"
timeout = "250ms"
retries = 0
backoff_min = "100ms"
backoff_max = "200ms"

[[sources.bad.points]]
name = "counter"
area = "holding"
address = 0
type = "u16"

[sources.good]
type = "modbus_tcp"
address = "127.0.0.1:{healthy_port}"
device = "good-1"
poll_interval = "100ms"

[[sources.good.points]]
name = "value"
area = "holding"
address = 0
type = "u16"
"#
    );
    let gateway = Gateway::start(&gateway_config(free_port(), &source, &["bad", "good"])).await;
    // Two rounds of the script.
    eventually(Duration::from_secs(40), || {
        (served.load(Ordering::SeqCst) >= 40).then_some(())
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the fake device saw {} requests\n{}",
            served.load(Ordering::SeqCst),
            gateway.stderr_tail(30)
        )
    });
    let started = tokio::time::Instant::now();
    let good_before = payloads_of(&events(&gateway, "events"), "good-1").len();
    for kind in ["timeout", "exception", "protocol", "malformed", "io"] {
        gateway
            .wait_metric(
                "fieldgate_modbus_errors_total",
                &[("source", "bad"), ("kind", kind)],
                Duration::from_secs(20),
                |value| value >= 1.0,
            )
            .await;
    }
    let all = events(&gateway, "events");
    let bad = payloads_of(&all, "bad-1");
    assert!(
        bad.iter().any(|p| p["quality"]["counter"] == "good"),
        "never good"
    );
    assert!(
        bad.iter().any(|p| p["quality"]["counter"] != "good"),
        "misbehaviour never showed in the quality"
    );
    // Recovery after each fault: a good value follows every bad one but the last.
    let last_good = bad
        .iter()
        .rposition(|p| p["quality"]["counter"] == "good")
        .unwrap();
    let first_bad = bad
        .iter()
        .position(|p| p["quality"]["counter"] != "good")
        .unwrap();
    assert!(last_good > first_bad, "no recovery after the first fault");
    // The healthy source polled on at its pace (~10/s) while the fake misbehaved.
    let good = payloads_of(&all, "good-1");
    assert!(
        good.iter()
            .all(|p| p["quality"]["value"] == "good" && p["value"] == 99)
    );
    let elapsed = started.elapsed().as_secs_f64().max(0.1);
    let rate = (good.len() - good_before) as f64 / elapsed;
    assert!(
        good.len() >= 20,
        "the healthy device got only {} events ({rate:.1}/s at the end)",
        good.len()
    );
    assert!(
        gateway.stderr().find("panicked").is_none(),
        "{}",
        gateway.stderr_tail(40)
    );
    fake.abort();
}

/// RTU over a pseudo-terminal bus with two units: both report their values, one request
/// at a time; garbled answers (stray bytes, broken CRC) are counted and recovered from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_rtu_bus_with_two_units_recovers_from_garbled_frames() {
    let Some(python) = pymodbus() else { return };
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("bus");
    let sim = Sim::start(
        &python,
        &json!({"mode": "rtu", "link": link, "baud": 19200, "garble_every": 6, "devices": [
            {"unit": 1, "holding": {"0": 111}},
            {"unit": 2, "holding": {"0": 222}, "coils": {"1": true}},
        ]}),
    )
    .await;
    let source = format!(
        r#"[sources.bus]
type = "modbus_rtu"
port = {link:?}
baud = 19200
parity = "none"
stop_bits = 1
poll_interval = "100ms"
timeout = "300ms"
retries = 1
backoff_min = "100ms"
backoff_max = "300ms"

[[sources.bus.devices]]
unit_id = 1
device = "meter-1"
[[sources.bus.devices.points]]
name = "power"
area = "holding"
address = 0
type = "u16"

[[sources.bus.devices]]
unit_id = 2
device = "meter-2"
[[sources.bus.devices.points]]
name = "power"
area = "holding"
address = 0
type = "u16"
[[sources.bus.devices.points]]
name = "relay"
area = "coil"
address = 1
type = "bool"
"#,
        link = link.display().to_string()
    );
    let gateway = Gateway::start(&gateway_config(free_port(), &source, &["bus"])).await;
    // A garbled answer never decodes (tokio-modbus drops bytes looking for a valid CRC):
    // it ends as a timeout or a malformed frame, after which the bus is resynchronised.
    common::eventually_async(Duration::from_secs(30), || async {
        let text = gateway.metrics().await;
        let failed = common::sum_metric(
            &text,
            "fieldgate_modbus_errors_total",
            &[("source", "bus"), ("kind", "timeout")],
        ) + common::sum_metric(
            &text,
            "fieldgate_modbus_errors_total",
            &[("source", "bus"), ("kind", "malformed")],
        );
        (failed >= 2.0).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("no garbled answer counted\n{}", gateway.stderr_tail(30)));
    let seen = events(&gateway, "events").len();
    let (one, two) = eventually(Duration::from_secs(30), || {
        let all = events(&gateway, "events");
        let one: Vec<Value> = payloads_of(&all[seen..], "meter-1")
            .into_iter()
            .filter(|p| p["quality"]["power"] == "good")
            .collect();
        let two: Vec<Value> = payloads_of(&all[seen..], "meter-2")
            .into_iter()
            .filter(|p| p["quality"]["power"] == "good")
            .collect();
        (one.len() >= 3 && two.len() >= 3).then_some((one, two))
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "no good values after garbled frames\n{}",
            gateway.stderr_tail(40)
        )
    });
    assert!(one.iter().all(|p| p["power"] == 111));
    assert!(two.iter().all(|p| p["power"] == 222 && p["relay"] == true));
    let units: std::collections::BTreeSet<u8> =
        sim.requests().iter().map(|request| request.0).collect();
    assert_eq!(units, [1, 2].into_iter().collect());
}

/// A cloud command `write` reaches the Modbus device through the command path: the
/// registers change (same conversion and byte order as reads) and a `command_result`
/// goes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_command_writes_registers_and_reports_a_result() {
    let Some(python) = pymodbus() else { return };
    let broker = Mosquitto::start(free_port()).await;
    let subscriber = Subscriber::connect(broker.port).await;
    let port = free_port();
    let _sim = Sim::start(
        &python,
        &json!({"mode": "tcp", "port": port, "devices": [{"unit": 1, "holding": {"10": 200}}]}),
    )
    .await;
    let config = format!(
        r#"[gateway]
id = "gw-1"
shutdown_grace = "5s"

[api]
address = "127.0.0.1:{api}"

[sources.plc]
type = "modbus_tcp"
address = "127.0.0.1:{port}"
device = "plc-w"
poll_interval = "100ms"
report_on_change = true

[[sources.plc.points]]
name = "setpoint"
area = "holding"
address = 10
type = "u16"
scale = 0.1
writable = true

[[sources.plc.points]]
name = "limit"
area = "holding"
address = 20
type = "f32"
byte_order = "CDAB"
writable = true

[sinks.cloud]
type = "mqtt"
inputs = ["plc"]
url = "mqtt://127.0.0.1:{mqtt}"
keep_alive = "5s"
reconnect_min = "100ms"
reconnect_max = "1s"

[sinks.cloud.buffer]
type = "disk"
"#,
        api = free_port(),
        mqtt = broker.port
    );
    let gateway = Gateway::start(&config).await;
    let telemetry = "gateways/gw-1/devices/plc-w/telemetry";
    assert!(
        subscriber
            .wait_until(Duration::from_secs(20), |msgs| msgs
                .iter()
                .any(|m| m.topic == telemetry))
            .await,
        "no telemetry\n{}",
        gateway.stderr_tail(30)
    );
    subscriber
        .publish(
            "gateways/gw-1/devices/plc-w/commands",
            json!({"id": "w-1", "name": "write", "params": {"setpoint": 21.5, "limit": -3.25}})
                .to_string(),
            false,
        )
        .await;
    let result_topic = "gateways/gw-1/devices/plc-w/command_result";
    assert!(
        subscriber
            .wait_until(Duration::from_secs(20), |msgs| msgs
                .iter()
                .any(|m| m.topic == result_topic
                    && m.text().contains("w-1")
                    && m.text().contains("\"ok\"")))
            .await,
        "no ok result\n{}",
        gateway.stderr_tail(30)
    );
    // The next polls read the written values back (report_on_change sends the change).
    assert!(
        subscriber
            .wait_until(Duration::from_secs(20), |msgs| msgs
                .iter()
                .any(|m| m.topic == telemetry
                    && m.text().contains("\"setpoint\":21.5")
                    && m.text().contains("\"limit\":-3.25")))
            .await,
        "written values not read back\n{}",
        gateway.stderr_tail(30)
    );
    // A bad write is refused as a whole, with a result naming the point.
    subscriber
        .publish(
            "gateways/gw-1/devices/plc-w/commands",
            json!({"id": "w-2", "name": "write", "params": {"setpoint": -1}}).to_string(),
            false,
        )
        .await;
    assert!(
        subscriber
            .wait_until(Duration::from_secs(20), |msgs| msgs
                .iter()
                .any(|m| m.topic == result_topic
                    && m.text().contains("w-2")
                    && m.text().contains("out of range")))
            .await,
        "no error result\n{}",
        gateway.stderr_tail(30)
    );
}
