//! Routing by region, failover to a backup cloud and multi-cloud fan-out, against real
//! mosquitto brokers that are stopped and started under the gateway.
//!
//! - `eu_events_never_leave_the_eu_through_failover_and_kill9`: registry devices labelled
//!   `region = "eu"` / `"us"`, a route sending eu devices to sink `eu` (failing over to
//!   `eu-backup`) and the rest to `us`, three brokers. eu events never reach the us broker:
//!   with everything up, while `eu` is down and failed over, and after a `kill -9` of the
//!   gateway with backlogged buffers on both eu sinks.
//! - `primary_stopped_mid_stream_every_acked_event_reaches_exactly_one_cloud`: a device
//!   streams in ack mode while the primary broker is stopped and started again; every
//!   acked sequence number arrives at exactly one of the two brokers (duplicates within
//!   one broker are counted, none is lost), and new events go back to the primary once it
//!   is healthy.
//! - `a_primary_that_flaps_or_withholds_acks_stays_failed_over`: a scripted fake broker
//!   as the primary that drops every connection right after CONNACK, then stays connected
//!   but withholds every PUBACK: connected is not healthy, so the failover holds; once it
//!   acks, new events go back to it. No event at both clouds, none lost.
//! - `fan_out_feeds_the_up_cloud_and_backfills_the_one_that_was_down`: the same events to
//!   two clouds, one broker down: the other keeps receiving, the down one gets its backlog
//!   when it returns.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::fake_broker::{FakeBroker, Match, Reply, Script};
use common::{
    AckSender, BrokerOptions, Collector, Gateway, GatewayConfig, Mosquitto, Msg, Subscriber,
    api_request, device_objects, eventually, expected, free_port,
};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

const ADMIN: &str = "admin-secret-for-failover-tests";
const WAIT: Duration = Duration::from_secs(30);

/// (device, seq) of every test event a broker delivered, in arrival order.
fn arrivals(sub: &Subscriber) -> Vec<(String, u64)> {
    arrivals_of(&sub.messages())
}

fn arrivals_of(messages: &[Msg]) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for message in messages {
        for object in device_objects(message) {
            if let (Some(device), Some(seq)) = (
                object.get("device").and_then(Value::as_str),
                object.get("seq").and_then(Value::as_u64),
            ) {
                out.push((device.to_owned(), seq));
            }
        }
    }
    out
}

/// Distinct seqs of `device` among `arrivals`.
fn seqs_of(arrivals: &[(String, u64)], device: &str) -> BTreeSet<u64> {
    arrivals
        .iter()
        .filter(|(name, _)| name == device)
        .map(|(_, seq)| *seq)
        .collect()
}

/// A device on the gateway's TCP listener, sending `{"device","seq","temp"}` lines in ack
/// mode; with `hello`, it first authenticates with the registry secret.
struct DeviceRun {
    addr: SocketAddr,
    device: String,
    secret: Option<String>,
    seqs: std::ops::RangeInclusive<u64>,
    /// Pause between two sends (a steady stream); none sends as fast as acks allow.
    pace: Option<Duration>,
    /// Stops sending when set.
    stop: Arc<AtomicBool>,
    /// The last seq written.
    sent: Arc<AtomicU64>,
}

/// What a device run saw.
#[derive(Debug, Default)]
struct Outcome {
    acked: BTreeSet<u64>,
    nacked: BTreeSet<u64>,
    written: u64,
}

impl DeviceRun {
    fn new(addr: SocketAddr, device: &str, seqs: std::ops::RangeInclusive<u64>) -> Self {
        Self {
            addr,
            device: device.to_owned(),
            secret: None,
            seqs,
            pace: None,
            stop: Arc::new(AtomicBool::new(false)),
            sent: Arc::new(AtomicU64::new(0)),
        }
    }

    fn secret(mut self, secret: &str) -> Self {
        self.secret = Some(secret.to_owned());
        self
    }

    /// Sends every seq (or until stopped) and waits for their acks, within 60 s.
    async fn run(self) -> Outcome {
        let deadline = Instant::now() + Duration::from_secs(60);
        let stream = timeout(Duration::from_secs(5), TcpStream::connect(self.addr))
            .await
            .expect("connect in time")
            .expect("connect to the device listener");
        stream.set_nodelay(true).expect("nodelay");
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        if let Some(secret) = &self.secret {
            let hello = json!({"type": "hello", "device": self.device, "token": secret});
            write
                .write_all(format!("{hello}\n").as_bytes())
                .await
                .expect("send hello");
            let reply = timeout(Duration::from_secs(10), lines.next_line())
                .await
                .expect("welcome in time")
                .expect("read welcome")
                .expect("welcome, not closed");
            assert!(reply.contains("\"welcome\""), "{}: {reply}", self.device);
        }
        let written = Arc::new(AtomicU64::new(0));
        let writer_done = Arc::new(AtomicBool::new(false));
        let writer = {
            let (device, seqs, pace, stop, sent) = (
                self.device.clone(),
                self.seqs.clone(),
                self.pace,
                Arc::clone(&self.stop),
                Arc::clone(&self.sent),
            );
            let (written, writer_done) = (Arc::clone(&written), Arc::clone(&writer_done));
            tokio::spawn(async move {
                for seq in seqs {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let line = json!({"device": device, "seq": seq, "temp": 21.5});
                    if write
                        .write_all(format!("{line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        break;
                    }
                    sent.store(seq, Ordering::SeqCst);
                    written.fetch_add(1, Ordering::SeqCst);
                    if let Some(pace) = pace {
                        // A device's send rate, not a synchronisation.
                        tokio::time::sleep(pace).await;
                    }
                }
                writer_done.store(true, Ordering::SeqCst);
                // Keep the write half open until the reader is done.
                std::future::pending::<()>().await;
            })
        };
        let mut outcome = Outcome::default();
        loop {
            let answered = (outcome.acked.len() + outcome.nacked.len()) as u64;
            if writer_done.load(Ordering::SeqCst) && answered >= written.load(Ordering::SeqCst) {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Ok(Some(line))) =
                timeout(left.min(Duration::from_secs(1)), lines.next_line()).await
            else {
                if Instant::now() >= deadline {
                    break;
                }
                continue;
            };
            let frame: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            match (frame["type"].as_str(), frame["seq"].as_u64()) {
                (Some("ack"), Some(seq)) => {
                    outcome.acked.insert(seq);
                }
                (Some("nack"), Some(seq)) => {
                    outcome.nacked.insert(seq);
                }
                _ => {}
            }
        }
        writer.abort();
        outcome.written = written.load(Ordering::SeqCst);
        outcome
    }
}

/// A persistent-session broker and its subscriber, so what the gateway publishes right
/// after a restart of the broker is queued for the subscriber.
async fn persistent_broker(name: &str) -> (Mosquitto, Subscriber) {
    let broker = Mosquitto::start_with(
        free_port(),
        BrokerOptions {
            persistence: true,
            ..BrokerOptions::default()
        },
    )
    .await;
    let sub = Subscriber::connect_with(
        broker.port,
        "gateways/#",
        Some(&format!("failover-test-{name}-{}", std::process::id())),
    )
    .await;
    (broker, sub)
}

/// An MQTT sink table on `port` with the test's quick reconnects.
fn mqtt_sink(name: &str, inputs: &str, port: u16, extra: &str) -> String {
    format!(
        "[sinks.{name}]\ntype = \"mqtt\"\ninputs = {inputs}\nurl = \"mqtt://127.0.0.1:{port}\"\n\
         keep_alive = \"5s\"\nreconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\n{extra}\n\n\
         [sinks.{name}.buffer]\ntype = \"disk\"\n"
    )
}

async fn wait_failover(gateway: &Gateway, sink: &str, active: bool) {
    gateway
        .wait_metric(
            "fieldgate_failover_active",
            &[("sink", sink)],
            WAIT,
            |value| value == f64::from(u8::from(active)),
        )
        .await;
}

async fn sinks_status(gateway: &Gateway) -> Value {
    let (status, body) = api_request(gateway.api, "GET", "/api/v1/sinks", Some(ADMIN), None).await;
    assert_eq!(status, 200, "{body}");
    body
}

fn sink_entry<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["sinks"]
        .as_array()
        .and_then(|sinks| sinks.iter().find(|sink| sink["name"] == name))
        .unwrap_or_else(|| panic!("sink {name} in {status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eu_events_never_leave_the_eu_through_failover_and_kill9() {
    let (mut eu, eu_sub) = persistent_broker("eu").await;
    let (mut backup, backup_sub) = persistent_broker("eu-backup").await;
    let us = Mosquitto::start(free_port()).await;
    let us_sub = Subscriber::connect(us.port).await;

    let (api_port, device_port) = (free_port(), free_port());
    let config = format!(
        "[gateway]\nid = \"gw-1\"\nshutdown_grace = \"5s\"\n\n\
         [api]\naddress = \"127.0.0.1:{api_port}\"\nadmin_token = \"{ADMIN}\"\n\n[registry]\n\n\
         [sources.devices]\ntype = \"tcp\"\naddress = \"127.0.0.1:{device_port}\"\nframing = \"lines\"\n\
         auth = \"registry\"\nack = true\n\n\
         [transforms.region]\ntype = \"route\"\ninputs = [\"devices\"]\n\
         routes.eu = {{ labels = {{ region = \"eu\" }} }}\n\n{}{}{}",
        mqtt_sink(
            "eu",
            "[\"region.eu\"]",
            eu.port,
            "failover = \"eu-backup\"\nfailover_after = \"1s\""
        ),
        mqtt_sink("eu-backup", "[]", backup.port, ""),
        mqtt_sink("us", "[\"region._unmatched\"]", us.port, ""),
    );
    let mut gateway = Gateway::start(&config).await;
    let devices: SocketAddr = ([127, 0, 0, 1], device_port).into();
    let mut secrets = HashMap::new();
    for (id, region) in [("eu-1", "eu"), ("eu-2", "eu"), ("us-1", "us")] {
        let (status, body) = api_request(
            gateway.api,
            "POST",
            "/api/v1/devices",
            Some(ADMIN),
            Some(&json!({"id": id, "labels": {"region": region}})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        secrets.insert(id, body["secret"].as_str().expect("secret").to_owned());
    }
    let mut acked: HashMap<&str, BTreeSet<u64>> = HashMap::new();
    // One phase: every device sends `seqs`, all must be acked.
    let phase = |seqs: std::ops::RangeInclusive<u64>| {
        let secrets = &secrets;
        async move {
            let runs = ["eu-1", "eu-2", "us-1"].map(|id| {
                DeviceRun::new(devices, id, seqs.clone())
                    .secret(&secrets[id])
                    .run()
            });
            let outcomes = futures_util::future::join_all(runs).await;
            for outcome in &outcomes {
                assert_eq!(outcome.acked.len() as u64, outcome.written, "{outcome:?}");
                assert_eq!(outcome.written, seqs.clone().count() as u64);
            }
            outcomes
        }
    };
    let mut record = |outcomes: Vec<Outcome>| {
        for (id, outcome) in ["eu-1", "eu-2", "us-1"].into_iter().zip(outcomes) {
            acked.entry(id).or_default().extend(outcome.acked);
        }
    };

    // 1. Everything up: eu devices to eu, us-1 to us.
    wait_failover(&gateway, "eu", false).await;
    record(phase(1..=200).await);
    // 2. eu stopped: after failover_after, eu events go to eu-backup, never to us.
    eu.stop().await;
    wait_failover(&gateway, "eu", true).await;
    let status = sinks_status(&gateway).await;
    assert_eq!(
        sink_entry(&status, "eu")["failover"]["active"],
        true,
        "{status}"
    );
    assert_eq!(sink_entry(&status, "eu")["link"]["up"], false, "{status}");
    assert_eq!(
        sink_entry(&status, "eu-backup")["failover_for"],
        json!(["eu"])
    );
    assert_eq!(sink_entry(&status, "us").get("failover"), None, "{status}");
    let (denied, _) = api_request(gateway.api, "GET", "/api/v1/sinks", None, None).await;
    assert_eq!(denied, 401, "the sinks' state is admin-only");
    record(phase(201..=400).await);
    // 3. eu-backup stopped too: its buffer backlogs; then kill -9 with both eu sinks
    //    holding undelivered events.
    backup.stop().await;
    gateway
        .wait_metric(
            "fieldgate_upstream_connected",
            &[("sink", "eu-backup")],
            WAIT,
            |value| value == 0.0,
        )
        .await;
    record(phase(401..=1400).await);
    let backlog = gateway
        .metric("fieldgate_buffer_events", &[("sink", "eu-backup")])
        .await
        .unwrap_or(0.0);
    assert!(backlog >= 2000.0, "eu-backup holds the backlog: {backlog}");
    gateway.kill9();
    // 4. Restart with eu still down: the first events of the new run wait in eu's own
    //    buffer until failover_after passes again, later ones go to eu-backup's.
    gateway.restart().await;
    record(phase(1401..=1600).await);
    wait_failover(&gateway, "eu", true).await;
    record(phase(1601..=1800).await);
    // 5. The backup returns and drains its backlog; then eu returns, drains its own and
    //    takes new events again.
    backup.start_again().await;
    eu.start_again().await;
    wait_failover(&gateway, "eu", false).await;
    record(phase(1801..=2000).await);

    let expected: HashMap<String, BTreeSet<u64>> = ["eu-1", "eu-2", "us-1"]
        .iter()
        .map(|id| ((*id).to_owned(), (1..=2000).collect()))
        .collect();
    for (id, seqs) in &acked {
        assert_eq!(seqs, &expected[*id], "{id}: every event was acked");
    }
    let all_arrived = eventually(Duration::from_secs(60), || {
        let (eu_arrivals, backup_arrivals, us_arrivals) =
            (arrivals(&eu_sub), arrivals(&backup_sub), arrivals(&us_sub));
        let eu_done = ["eu-1", "eu-2"].iter().all(|id| {
            seqs_of(&eu_arrivals, id)
                .union(&seqs_of(&backup_arrivals, id))
                .count()
                == 2000
        });
        (eu_done && seqs_of(&us_arrivals, "us-1").len() == 2000).then_some(())
    })
    .await;
    let (eu_arrivals, backup_arrivals, us_arrivals) =
        (arrivals(&eu_sub), arrivals(&backup_sub), arrivals(&us_sub));
    let leaked: Vec<&(String, u64)> = us_arrivals
        .iter()
        .filter(|(device, _)| device != "us-1")
        .collect();
    assert!(
        leaked.is_empty(),
        "eu events reached the us broker: {leaked:?}"
    );
    let strays: Vec<&(String, u64)> = eu_arrivals
        .iter()
        .chain(&backup_arrivals)
        .filter(|(device, _)| device == "us-1")
        .collect();
    assert!(
        strays.is_empty(),
        "us events reached an eu broker: {strays:?}"
    );
    assert!(
        all_arrived.is_some(),
        "not every event arrived: eu {} / eu-backup {} / us {}",
        eu_arrivals.len(),
        backup_arrivals.len(),
        us_arrivals.len()
    );
    for id in ["eu-1", "eu-2"] {
        let (at_eu, at_backup) = (seqs_of(&eu_arrivals, id), seqs_of(&backup_arrivals, id));
        let both: Vec<&u64> = at_eu.intersection(&at_backup).collect();
        assert!(
            both.is_empty(),
            "{id}: seqs delivered by both eu clouds: {both:?}"
        );
        // Phases 1 and 5 ran with eu healthy: all at eu. Phases 2 and 3 ran failed over:
        // all at eu-backup.
        assert!(
            (1..=200).chain(1801..=2000).all(|seq| at_eu.contains(&seq)),
            "{id}"
        );
        assert!((201..=1400).all(|seq| at_backup.contains(&seq)), "{id}");
    }
    gateway.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn primary_stopped_mid_stream_every_acked_event_reaches_exactly_one_cloud() {
    let (mut primary, primary_sub) = persistent_broker("primary").await;
    let (backup, backup_sub) = persistent_broker("backup").await;
    let config = GatewayConfig::new(primary.port)
        .source("ack = true")
        .sink("failover = \"backup\"")
        .sink("failover_after = \"1s\"")
        .tail(&mqtt_sink("backup", "[]", backup.port, ""));
    let text = config.render().replacen(
        &format!("address = \"127.0.0.1:{}\"", config.api_port),
        &format!(
            "address = \"127.0.0.1:{}\"\nadmin_token = \"{ADMIN}\"",
            config.api_port
        ),
        1,
    );
    let gateway = Gateway::start(&text).await;
    wait_failover(&gateway, "cloud", false).await;
    gateway
        .wait_metric(
            "fieldgate_upstream_connected",
            &[("sink", "cloud")],
            WAIT,
            |value| value == 1.0,
        )
        .await;

    // One device streams 500 events a second for the whole test.
    let mut device = DeviceRun::new(config.device_addr(), "streamer", 1..=1_000_000);
    device.pace = Some(Duration::from_millis(2));
    let (stop, sent) = (Arc::clone(&device.stop), Arc::clone(&device.sent));
    let stream = tokio::spawn(device.run());
    let sent_at = || sent.load(Ordering::SeqCst);
    assert!(
        eventually(WAIT, || (sent_at() >= 500).then_some(()))
            .await
            .is_some()
    );

    primary.stop().await;
    wait_failover(&gateway, "cloud", true).await;
    // +2: the seq being written while the metric was read may have been routed before.
    let failed_over_from = sent_at() + 2;
    assert!(
        eventually(WAIT, || (sent_at() >= failed_over_from + 1000)
            .then_some(()))
        .await
        .is_some()
    );
    // Less a margin for events still in the socket when the primary returns.
    let failed_over_until = sent_at().saturating_sub(25);
    primary.start_again().await;
    wait_failover(&gateway, "cloud", false).await;
    let back_from = sent_at() + 2;
    assert!(
        eventually(WAIT, || (sent_at() >= back_from + 500).then_some(()))
            .await
            .is_some()
    );
    stop.store(true, Ordering::SeqCst);
    let outcome = stream.await.expect("device task");
    assert!(
        outcome.nacked.is_empty(),
        "nothing refused: {:?}",
        outcome.nacked
    );
    assert_eq!(
        outcome.acked.len() as u64,
        outcome.written,
        "every event acked"
    );

    let done = eventually(Duration::from_secs(60), || {
        let union: BTreeSet<u64> = seqs_of(&arrivals(&primary_sub), "streamer")
            .union(&seqs_of(&arrivals(&backup_sub), "streamer"))
            .copied()
            .collect();
        outcome.acked.is_subset(&union).then_some(())
    })
    .await;
    let (at_primary_all, at_backup_all) = (arrivals(&primary_sub), arrivals(&backup_sub));
    let (at_primary, at_backup) = (
        seqs_of(&at_primary_all, "streamer"),
        seqs_of(&at_backup_all, "streamer"),
    );
    let lost: Vec<&u64> = outcome
        .acked
        .iter()
        .filter(|seq| !at_primary.contains(seq) && !at_backup.contains(seq))
        .collect();
    assert!(
        done.is_some(),
        "{} acked events lost, first {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    let both: Vec<&u64> = at_primary.intersection(&at_backup).collect();
    assert!(both.is_empty(), "delivered by both clouds: {both:?}");
    let duplicates =
        at_primary_all.len() - at_primary.len() + at_backup_all.len() - at_backup.len();
    println!(
        "acked {}, at primary {}, at backup {}, duplicates within one cloud {duplicates}",
        outcome.acked.len(),
        at_primary.len(),
        at_backup.len()
    );
    // While failed over, new events went to the backup only; once the primary was healthy
    // again, to the primary only.
    assert!((failed_over_from..=failed_over_until).all(|seq| at_backup.contains(&seq)));
    assert!(
        at_backup.iter().all(|seq| *seq < back_from),
        "back to the primary"
    );
    assert!((back_from..=outcome.written).all(|seq| at_primary.contains(&seq)));
    let switched = gateway
        .metric("fieldgate_failover_switches_total", &[("sink", "cloud")])
        .await;
    assert_eq!(switched, Some(1.0));
    let redirected = gateway
        .metric(
            "fieldgate_failover_events_total",
            &[("sink", "cloud"), ("to", "backup")],
        )
        .await
        .unwrap_or(0.0);
    assert_eq!(
        redirected,
        at_backup.len() as f64,
        "each failed-over event counted once"
    );

    // A reload that changes only failover_after is a routing change: applied, reported,
    // and the switch's counters carry on.
    gateway.rewrite_config(&text.replace("failover_after = \"1s\"", "failover_after = \"2s\""));
    let (status, report) = api_request(
        gateway.api,
        "POST",
        "/api/v1/config/reload",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["result"], "applied", "{report}");
    assert_eq!(report["changed"], json!(["sinks.cloud"]), "{report}");
    let status = sinks_status(&gateway).await;
    let failover = &sink_entry(&status, "cloud")["failover"];
    assert_eq!(failover["after_seconds"], 2.0, "{status}");
    assert_eq!(failover["active"], false, "{status}");
    assert_eq!(failover["redirected_events"], at_backup.len(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fan_out_feeds_the_up_cloud_and_backfills_the_one_that_was_down() {
    let (mut down, down_sub) = persistent_broker("fanout-down").await;
    let up = Mosquitto::start(free_port()).await;
    let up_sub = Subscriber::connect(up.port).await;
    let config = GatewayConfig::new(down.port)
        .source("ack = true")
        .tail(&mqtt_sink("second", "[\"devices\"]", up.port, ""));
    let gateway = Gateway::start(&config.render()).await;
    for sink in ["cloud", "second"] {
        gateway
            .wait_metric(
                "fieldgate_upstream_connected",
                &[("sink", sink)],
                WAIT,
                |value| value == 1.0,
            )
            .await;
    }
    down.stop().await;
    let names = vec!["fan-a".to_owned(), "fan-b".to_owned()];
    let runs = names
        .iter()
        .map(|name| AckSender::new(config.device_addr(), name, 1000).run());
    for report in futures_util::future::join_all(runs).await {
        assert_eq!(report.acked.len(), 1000, "acked while one cloud is down");
    }
    let wanted = expected(&names, 1000);
    let mut up_seen = Collector::default();
    up_seen.wait_all(&up_sub, &wanted, WAIT).await;
    assert!(
        gateway
            .metric("fieldgate_buffer_events", &[("sink", "cloud")])
            .await
            .unwrap_or(0.0)
            >= 2000.0,
        "the down cloud's events wait in its buffer"
    );
    down.start_again().await;
    let mut down_seen = Collector::default();
    down_seen
        .wait_all(&down_sub, &wanted, Duration::from_secs(60))
        .await;
    assert!(
        up_seen.order_violations().is_empty(),
        "{:?}",
        up_seen.order_violations()
    );
    assert!(
        down_seen.order_violations().is_empty(),
        "{:?}",
        down_seen.order_violations()
    );
}

/// (device, seq) of the test events a fake broker delivered (acked).
fn fake_arrivals(broker: &FakeBroker) -> Vec<(String, u64)> {
    let messages: Vec<Msg> = broker
        .deliveries()
        .into_iter()
        .map(|delivery| Msg {
            topic: delivery.topic,
            payload: delivery.payload,
            retain: false,
        })
        .collect();
    arrivals_of(&messages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_that_flaps_or_withholds_acks_stays_failed_over() {
    let fake = FakeBroker::start(Script::new().drop_after_connack(u64::MAX)).await;
    let (backup, backup_sub) = persistent_broker("flap-backup").await;
    let config = GatewayConfig::new(fake.port)
        .source("ack = true")
        .sink("failover = \"backup\"")
        .sink("failover_after = \"1s\"")
        .sink("ack_timeout = \"2s\"")
        .tail(&mqtt_sink("backup", "[]", backup.port, ""));
    let gateway = Gateway::start(&config.render()).await;
    let cloud = [("sink", "cloud")];

    // Connects succeed and are dropped at once: the link never becomes healthy.
    wait_failover(&gateway, "cloud", true).await;
    assert!(
        fake.wait_for(WAIT, |broker| (broker.accepted_connects() >= 3)
            .then_some(()))
            .await
            .is_some(),
        "the gateway keeps reconnecting"
    );
    let flapping = AckSender::new(config.device_addr(), "flap-1", 300)
        .run()
        .await;
    assert_eq!(flapping.acked.len(), 300);

    // Connected, but every PUBACK withheld: still not healthy, still failed over.
    fake.set_script(Script::new().on(Match::any(), Reply::Withhold));
    gateway
        .wait_metric("fieldgate_upstream_connected", &cloud, WAIT, |v| v == 1.0)
        .await;
    let silent = AckSender::new(config.device_addr(), "flap-2", 300)
        .run()
        .await;
    assert_eq!(silent.acked.len(), 300);
    assert_eq!(
        gateway.metric("fieldgate_failover_active", &cloud).await,
        Some(1.0),
        "a connection without acks is not a healthy link"
    );

    // It behaves: the first ack proves the link, new events go back to it.
    fake.behave();
    wait_failover(&gateway, "cloud", false).await;
    let healthy = AckSender::new(config.device_addr(), "flap-3", 300)
        .run()
        .await;
    assert_eq!(healthy.acked.len(), 300);

    let all = |device: &str, arrivals: &[(String, u64)]| seqs_of(arrivals, device).len() == 300;
    let arrived = eventually(WAIT, || {
        let (at_backup, at_fake) = (arrivals(&backup_sub), fake_arrivals(&fake));
        (all("flap-1", &at_backup) && all("flap-2", &at_backup) && all("flap-3", &at_fake))
            .then_some(())
    })
    .await;
    let (at_backup, at_fake) = (arrivals(&backup_sub), fake_arrivals(&fake));
    assert!(
        arrived.is_some(),
        "backup has flap-1 {} flap-2 {}, fake primary has flap-3 {}",
        seqs_of(&at_backup, "flap-1").len(),
        seqs_of(&at_backup, "flap-2").len(),
        seqs_of(&at_fake, "flap-3").len()
    );
    for device in ["flap-1", "flap-2", "flap-3"] {
        let both = seqs_of(&at_backup, device)
            .intersection(&seqs_of(&at_fake, device))
            .count();
        assert_eq!(both, 0, "{device}: {both} delivered by both clouds");
    }
    assert!(
        seqs_of(&at_backup, "flap-3").is_empty(),
        "back on the primary"
    );
    assert_eq!(
        gateway
            .metric("fieldgate_failover_switches_total", &cloud)
            .await,
        Some(1.0),
        "one failover, held through flapping and silence"
    );
}
