//! The alarm transform against recorded readings with known alarms, its checkpoint,
//! the board and hostile configs.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fieldgate_core::{DeviceId, EventKind, Priority};

use super::*;
use crate::transforms::tests::{check_error, reading, run};

const CONTRACT: &str = r#"inputs = ["devices"]
detector = "threshold"
field = "temp"
above = 80.0
clear_below = 75.0
severity = "major"
"#;

fn services() -> TransformServices {
    TransformServices {
        registry: None,
        metrics: Arc::new(Metrics::new()),
        alarms: Arc::default(),
        actions: None,
    }
}

fn build_with(text: &str, services: &TransformServices) -> Arc<dyn EventTransform> {
    let spec: AlarmConfig = toml::from_str(text).expect("valid toml");
    spec.check("overheat", &Context { file: "t", text })
        .expect("valid");
    spec.build("overheat", services).expect("builds")
}

/// The alarm payloads among `events`, as JSON.
fn alarms(events: &[(usize, Event)]) -> Vec<serde_json::Value> {
    events
        .iter()
        .filter(|(_, event)| event.kind == EventKind::Alarm)
        .map(|(_, event)| serde_json::from_slice(&event.payload).expect("json"))
        .collect()
}

#[test]
fn contract_raises_and_clears_and_passes_everything_through() {
    let services = services();
    let rule = build_with(CONTRACT, &services);
    let mut raised = Vec::new();
    for (time, temp) in [
        (1_000, 70.0),
        (2_000, 85.5),
        (3_000, 90.0),
        (4_000, 76.0),
        (5_000, 74.0),
    ] {
        let input = reading("dev-1", time, &format!("{{\"temp\":{temp}}}"));
        let events = run(&*rule, input.clone());
        assert!(
            events
                .iter()
                .any(|(port, event)| *port == 0 && *event == input),
            "passed through"
        );
        raised.extend(alarms(&events));
    }
    assert_eq!(raised.len(), 2, "{raised:?}");
    assert_eq!(
        raised[0],
        serde_json::json!({
            "rule": "overheat", "device": "dev-1", "detector": "threshold", "field": "temp",
            "state": "raised", "severity": "major", "value": 85.5, "threshold": 80.0,
            "since": 2000, "at": 2000, "acknowledged": false,
        })
    );
    assert_eq!(raised[1]["state"], "cleared");
    assert_eq!(raised[1]["value"], 74.0);
    assert_eq!(raised[1]["threshold"], 75.0);
    assert_eq!(raised[1]["since"], 2000);
    assert_eq!(raised[1]["at"], 5000);
    let text = services.metrics.encode();
    assert!(
        text.contains("fieldgate_alarms_raised_total{transform=\"overheat\",severity=\"major\"} 1"),
        "{text}"
    );
    assert!(text.contains("fieldgate_alarms_active{transform=\"overheat\",severity=\"major\"} 0"));
}

#[test]
fn alarm_events_ride_the_high_lane_and_keep_the_device() {
    let rule = build_with(CONTRACT, &services());
    let events = run(&*rule, reading("dev-9", 1, r#"{"temp":99}"#));
    let (_, alarm) = events
        .iter()
        .find(|(_, event)| event.kind == EventKind::Alarm)
        .expect("an alarm");
    assert_eq!(alarm.priority, Priority::High);
    assert_eq!(alarm.device, DeviceId::new("dev-9"));
}

#[test]
fn devices_have_their_own_alarms_and_acknowledgement_sticks_until_clear() {
    let services = services();
    let rule = build_with(CONTRACT, &services);
    run(&*rule, reading("a", 1, r#"{"temp":81}"#));
    run(&*rule, reading("b", 1, r#"{"temp":20}"#));
    let board = &services.alarms;
    let active = board.list(&AlarmFilter {
        active: true,
        ..AlarmFilter::default()
    });
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].device, "a");
    assert_eq!(
        board.acknowledge("overheat", "b", 5),
        Err(AckError::NoAlarm {
            rule: "overheat".into(),
            device: "b".into()
        })
    );
    assert_eq!(
        board.acknowledge("nope", "a", 5),
        Err(AckError::NoRule("nope".into()))
    );
    let acked = board.acknowledge("overheat", "a", 5).expect("acked");
    assert_eq!(acked.state, AlarmState::Acknowledged);
    assert_eq!(acked.acknowledged_at, Some(5));
    // Still above the clear limit: stays acknowledged, no new alarm event.
    assert!(alarms(&run(&*rule, reading("a", 2, r#"{"temp":79}"#))).is_empty());
    let cleared = alarms(&run(&*rule, reading("a", 3, r#"{"temp":70}"#)));
    assert_eq!(cleared[0]["state"], "cleared");
    assert_eq!(cleared[0]["acknowledged"], true);
    assert!(matches!(
        board.acknowledge("overheat", "a", 6),
        Err(AckError::Cleared { .. })
    ));
    let listed = board.list(&AlarmFilter {
        state: Some(AlarmState::Cleared),
        device: Some("a".into()),
        ..AlarmFilter::default()
    });
    assert_eq!(listed.len(), 1);
}

#[test]
fn alarm_state_survives_a_checkpoint() {
    let services = services();
    let rule = build_with(CONTRACT, &services);
    run(&*rule, reading("a", 1, r#"{"temp":81}"#));
    services
        .alarms
        .acknowledge("overheat", "a", 2)
        .expect("acked");
    let state = rule.checkpoint().expect("stateful");
    drop(rule);
    let restored = build_with(CONTRACT, &services);
    restored.restore(&state).expect("restores");
    let listed = services.alarms.list(&AlarmFilter::default());
    assert_eq!(listed[0].state, AlarmState::Acknowledged);
    // No second raise: the alarm is still active after the restart.
    assert!(alarms(&run(&*restored, reading("a", 3, r#"{"temp":95}"#))).is_empty());
    assert_eq!(
        alarms(&run(&*restored, reading("a", 4, r#"{"temp":10}"#)))[0]["state"],
        "cleared"
    );
    assert!(restored.restore(b"not a checkpoint").is_err());
}

#[test]
fn missing_detector_raises_on_tick_and_clears_on_a_reading() {
    let rule = build_with(
        "inputs = [\"d\"]\ndetector = \"missing\"\nfield = \"temp\"\ninterval = \"1s\"\ncount = 3\nseverity = \"critical\"",
        &services(),
    );
    assert_eq!(rule.tick_interval(), Some(Duration::from_secs(1)));
    let mut event = reading("a", 0, r#"{"temp":1}"#);
    event.received_at_ms = 1_000_000;
    run(&*rule, event);
    let at = |ms: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
    let mut emitted = Emitted::default();
    rule.tick(at(1_002_999), &mut emitted);
    assert!(emitted.into_events().is_empty());
    let mut emitted = Emitted::default();
    rule.tick(at(1_003_000), &mut emitted);
    let raised = alarms(&emitted.into_events());
    assert_eq!(raised.len(), 1);
    assert_eq!(raised[0]["detector"], "missing");
    assert_eq!(raised[0]["value"], serde_json::Value::Null);
    assert_eq!(raised[0]["severity"], "critical");
    let mut emitted = Emitted::default();
    rule.tick(at(1_010_000), &mut emitted);
    assert!(emitted.into_events().is_empty(), "raised once");
    let mut event = reading("a", 1, r#"{"temp":1}"#);
    event.received_at_ms = 1_011_000;
    assert_eq!(alarms(&run(&*rule, event))[0]["state"], "cleared");
}

#[test]
fn other_detectors_through_the_transform() {
    let rate = build_with(
        "inputs = [\"d\"]\ndetector = \"rate_of_change\"\nfield = \"p\"\nwindow = \"10s\"\nabove = 2.0\nclear_below = 1.0",
        &services(),
    );
    run(&*rate, reading("a", 0, r#"{"p":0}"#));
    assert_eq!(
        alarms(&run(&*rate, reading("a", 1_000, r#"{"p":5}"#)))[0]["value"],
        5.0
    );
    let stuck = build_with(
        "inputs = [\"d\"]\ndetector = \"stuck\"\nfield = \"v\"\ncount = 2",
        &services(),
    );
    run(&*stuck, reading("a", 0, r#"{"v":"E1"}"#));
    assert_eq!(
        alarms(&run(&*stuck, reading("a", 1, r#"{"v":"E1"}"#)))[0]["threshold"],
        2.0
    );
    let zscore = build_with(
        "inputs = [\"d\"]\ndetector = \"zscore\"\nfield = \"v\"\nwarmup = 5",
        &services(),
    );
    for time in 0..20 {
        let value = if time % 2 == 0 { 10.0 } else { 11.0 };
        assert!(
            alarms(&run(
                &*zscore,
                reading("a", time, &format!("{{\"v\":{value}}}"))
            ))
            .is_empty()
        );
    }
    assert_eq!(
        alarms(&run(&*zscore, reading("a", 20, r#"{"v":50}"#)))[0]["state"],
        "raised"
    );
}

#[test]
fn the_board_forgets_dropped_rules() {
    let services = services();
    let rule = build_with(CONTRACT, &services);
    assert_eq!(services.alarms.rules(), 1);
    drop(rule);
    assert_eq!(services.alarms.rules(), 0);
}

#[test]
fn per_device_state_is_bounded() {
    let services = services();
    let rule = build_with(&format!("{CONTRACT}max_devices = 100\n"), &services);
    for device in 0..1_000 {
        run(&*rule, reading(&format!("d{device}"), 1, r#"{"temp":90}"#));
    }
    assert_eq!(services.alarms.list(&AlarmFilter::default()).len(), 100);
    let text = services.metrics.encode();
    assert!(text.contains("fieldgate_transform_state_devices{transform=\"overheat\"} 100"));
    assert!(text.contains("fieldgate_transform_evicted_devices_total{transform=\"overheat\"} 900"));
    assert!(
        text.contains("fieldgate_alarms_active{transform=\"overheat\",severity=\"major\"} 100"),
        "{text}"
    );
}

#[test]
fn hostile_configs_are_refused_with_their_key() {
    let base = "inputs = [\"d\"]\nfield = \"temp\"\n";
    for (text, key) in [
        (
            "detector = \"threshold\"\nabove = nan",
            "transforms.t.above",
        ),
        (
            "detector = \"threshold\"\nabove = inf",
            "transforms.t.above",
        ),
        (
            "detector = \"threshold\"\nabove = 80.0\nclear_below = 85.0",
            "transforms.t.clear_below",
        ),
        (
            "detector = \"threshold\"\nbelow = 10.0\nclear_above = 5.0",
            "transforms.t.clear_above",
        ),
        (
            "detector = \"threshold\"\nabove = 10.0\nbelow = 20.0",
            "transforms.t.below",
        ),
        ("detector = \"threshold\"", "transforms.t.above"),
        (
            "detector = \"threshold\"\nclear_below = 3.0\nbelow = 1.0",
            "transforms.t.clear_below",
        ),
        (
            "detector = \"threshold\"\nabove = 1.0\nwindow = \"1s\"",
            "transforms.t.window",
        ),
        (
            "detector = \"rate_of_change\"\nabove = 1.0\nwindow = \"100000d\"",
            "transforms.t.window",
        ),
        (
            "detector = \"rate_of_change\"\nabove = 1.0\nwindow = \"0s\"",
            "transforms.t.window",
        ),
        ("detector = \"zscore\"\nalpha = 0.0", "transforms.t.alpha"),
        ("detector = \"zscore\"\nalpha = nan", "transforms.t.alpha"),
        (
            "detector = \"zscore\"\nwarmup = 1000000000",
            "transforms.t.warmup",
        ),
        ("detector = \"zscore\"\nabove = -1.0", "transforms.t.above"),
        ("detector = \"stuck\"", "transforms.t.count"),
        ("detector = \"stuck\"\ncount = 1", "transforms.t.count"),
        (
            "detector = \"stuck\"\ncount = 99999999999",
            "transforms.t.count",
        ),
        ("detector = \"missing\"", "transforms.t.interval"),
        (
            "detector = \"missing\"\ninterval = \"1ms\"",
            "transforms.t.interval",
        ),
        (
            "detector = \"missing\"\ninterval = \"1s\"\ncount = 0",
            "transforms.t.count",
        ),
        (
            "detector = \"missing\"\ninterval = \"1s\"\nabove = 1.0",
            "transforms.t.above",
        ),
        (
            "detector = \"threshold\"\nabove = 1.0\nmax_devices = 0",
            "transforms.t.max_devices",
        ),
    ] {
        let error = check_error::<AlarmConfig>(&format!("{base}{text}"));
        assert!(error.contains(key), "{text}: {error}");
    }
    for field in ["", ".", "a..b"] {
        let error = check_error::<AlarmConfig>(&format!(
            "inputs = [\"d\"]\nfield = \"{field}\"\ndetector = \"threshold\"\nabove = 1.0"
        ));
        assert!(error.contains("transforms.t.field"), "{error}");
    }
    let error = check_error::<AlarmConfig>(&format!("{base}detector = \"nope\"\nabove = 1.0"));
    assert!(error.contains("detector"), "{error}");
    let error = check_error::<AlarmConfig>(&format!(
        "{base}detector = \"threshold\"\nabove = 1.0\nseverity = \"huge\""
    ));
    assert!(error.contains("severity"), "{error}");
}

/// Found by the hostile-readings proptest: -1e308 then 0 overflowed the z-score's EWMA
/// variance to infinity, which a JSON checkpoint cannot hold, so the restore failed.
#[test]
fn readings_near_f64_max_keep_the_state_checkpointable() {
    let zscore = build_with(
        "inputs = [\"d\"]\ndetector = \"zscore\"\nfield = \"temp\"\nwarmup = 1",
        &services(),
    );
    for (time, temp) in [(0, "-1e308"), (1, "0"), (2, "1e308"), (3, "-1e308")] {
        run(
            &*zscore,
            reading("b", time, &format!("{{\"temp\":{temp}}}")),
        );
    }
    let state = zscore.checkpoint().expect("stateful");
    zscore.restore(&state).expect("a finite state restores");
}

/// Malformed, oversize and hostile action configs are refused with their key path.
#[test]
fn hostile_action_configs_are_refused_with_their_key() {
    let base = format!("{CONTRACT}\n");
    let action = |body: &str| format!("{base}[[actions]]\n{body}\n");
    for (body, key) in [
        ("type = \"webhook\"", "transforms.t.actions[0].url"),
        (
            "type = \"webhook\"\nurl = \"https://x/\"\nca = \"/nonexistent/ca.pem\"",
            "transforms.t.actions[0].ca",
        ),
        (
            "type = \"webhook\"\nurl = \"http://x/\"\nca = \"/etc/hostname\"",
            "transforms.t.actions[0].ca",
        ),
        (
            "type = \"webhook\"\nurl = \"ftp://x/\"",
            "transforms.t.actions[0].url",
        ),
        (
            "type = \"webhook\"\nurl = \"http://h/\\r\\nX: 1\"",
            "transforms.t.actions[0].url",
        ),
        (
            "type = \"webhook\"\nurl = \"http://h:0/\"",
            "transforms.t.actions[0].url",
        ),
        (
            "type = \"webhook\"\nurl = \"http://h/\"\nretries = 1000",
            "transforms.t.actions[0].retries",
        ),
        (
            "type = \"webhook\"\nurl = \"http://h/\"\ntimeout = \"0s\"",
            "transforms.t.actions[0].timeout",
        ),
        (
            "type = \"webhook\"\nurl = \"http://h/\"\nbackoff = \"2h\"",
            "transforms.t.actions[0].backoff",
        ),
        (
            "type = \"webhook\"\nurl = \"http://h/\"\ntopic = \"a\"",
            "transforms.t.actions[0].topic",
        ),
        ("type = \"mqtt\"", "transforms.t.actions[0].topic"),
        (
            "type = \"mqtt\"\ntopic = \"a/{nope}\"",
            "transforms.t.actions[0].topic",
        ),
        (
            "type = \"mqtt\"\ntopic = \"a/{device\"",
            "transforms.t.actions[0].topic",
        ),
        (
            "type = \"mqtt\"\ntopic = \"a/#\"",
            "transforms.t.actions[0].topic",
        ),
        (
            "type = \"mqtt\"\ntopic = \"a\"\nqos = 3",
            "transforms.t.actions[0].qos",
        ),
        (
            "type = \"mqtt\"\ntopic = \"a\"\nurl = \"http://h/\"",
            "transforms.t.actions[0].url",
        ),
        ("type = \"command\"", "transforms.t.actions[0].command"),
        (
            "type = \"command\"\ncommand = \"\"",
            "transforms.t.actions[0].command",
        ),
        (
            "type = \"command\"\ncommand = \"write\"\ndevice = \"bad device\"",
            "transforms.t.actions[0].device",
        ),
        (
            "type = \"command\"\ncommand = \"write\"\nargs = [1, 2]",
            "transforms.t.actions[0].args",
        ),
        (
            "type = \"command\"\ncommand = \"write\"\nttl = \"90d\"",
            "transforms.t.actions[0].ttl",
        ),
        (
            "type = \"mqtt\"\ntopic = \"a\"\non = []",
            "transforms.t.actions[0].on",
        ),
        (
            "type = \"mqtt\"\ntopic = \"a\"\non = [\"raise\", \"raise\"]",
            "transforms.t.actions[0].on",
        ),
        (
            "type = \"mqtt\"\ntopic = \"a\"\nname = \"has space\"",
            "transforms.t.actions[0].name",
        ),
        (
            "type = \"mqtt\"\ntopic = \"a\"\n[[actions]]\ntype = \"mqtt\"\ntopic = \"b\"",
            "transforms.t.actions[1].name",
        ),
    ] {
        let error = check_error::<AlarmConfig>(&action(body));
        assert!(error.contains(key), "{body}: {error}");
    }
    // What serde refuses names the key too.
    for (body, word) in [
        ("type = \"sms\"", "sms"),
        ("type = \"webhook\"\nurll = \"http://h/\"", "urll"),
        ("type = \"mqtt\"\ntopic = \"a\"\non = [\"ack\"]", "ack"),
        (
            "type = \"webhook\"\nurl = \"http://h/\"\nretries = -1",
            "retries",
        ),
    ] {
        let error = check_error::<AlarmConfig>(&action(body));
        assert!(error.contains(word), "{body}: {error}");
    }
    let many = (0..17)
        .map(|i| format!("[[actions]]\ntype = \"mqtt\"\nname = \"m{i}\"\ntopic = \"a\"\n"))
        .collect::<String>();
    let error = check_error::<AlarmConfig>(&format!("{base}{many}"));
    assert!(error.contains("transforms.t.actions"), "{error}");
}

/// Raising and clearing feed the actions once each; the offline tool (no services)
/// builds the same rule and runs none.
#[tokio::test]
async fn raise_and_clear_fire_the_actions_off_the_hot_path() {
    use crate::devices::directory::{ConnectionSignal, DeviceDirectory};
    let directory = Arc::new(DeviceDirectory::default());
    let action_services = ActionServices::new(Arc::default(), Arc::clone(&directory), None);
    let metrics = Arc::new(Metrics::new());
    let services = TransformServices {
        registry: None,
        metrics: Arc::clone(&metrics),
        alarms: Arc::default(),
        actions: Some(action_services.clone()),
    };
    let text = format!(
        "{CONTRACT}\n[[actions]]\ntype = \"command\"\nname = \"fan\"\ncommand = \"write\"\nargs = {{ point = \"fan\", value = true }}\n"
    );
    let rule = build_with(&text, &services);
    let signal = Arc::new(ConnectionSignal::default());
    directory.register(DeviceId::new("dev-1"), 1, &signal);
    for (time, temp) in [(1_000, 85.0), (2_000, 86.0), (3_000, 70.0)] {
        run(
            &*rule,
            reading("dev-1", time, &format!("{{\"temp\":{temp}}}")),
        );
    }
    let mut ids = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while ids.len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "commands: {ids:?}");
        match directory.take_command(1) {
            Some(command) => ids.push(command.id),
            None => signal.commands_waiting().await,
        }
    }
    assert_eq!(
        ids,
        [
            "alarm.overheat.dev-1.raise.1000",
            "alarm.overheat.dev-1.clear.3000"
        ]
    );
    let labels = crate::telemetry::metrics::AlarmActionLabels {
        rule: "overheat".into(),
        action: "fan".into(),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metrics.alarm_action_successes.get_or_create(&labels).get() < 2 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Offline: the same rule raises its alarm and queues nothing.
    let offline = build_with(&text, &services_without_actions());
    let events = run(&*offline, reading("dev-1", 5_000, "{\"temp\":99}"));
    assert_eq!(alarms(&events).len(), 1);
    assert!(directory.take_command(1).is_none());
    action_services.shutdown(Duration::from_secs(1)).await;
}

fn services_without_actions() -> TransformServices {
    services()
}
