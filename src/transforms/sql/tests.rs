//! Rules against recorded inputs with known outputs, state round trips, and properties.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fieldgate_core::{DeviceId, Event, EventKind, PayloadFormat};
use proptest::prelude::*;
use serde_json::{Value as Json, json};

use super::{SqlConfig, SqlTransform};
use crate::config::Context;
use crate::telemetry::Metrics;
use crate::transforms::{Emitted, EventTransform, TransformServices, TransformSpec};

const ISSUE_RULE: &str = "SELECT device, avg(temp) AS avg_temp, max(temp) AS max_temp, \
    count(*) AS n FROM devices WHERE kind = 'telemetry' GROUP BY device, TUMBLINGWINDOW(ss, 2)";

/// A built rule and the metrics it counts into.
struct Rule {
    transform: SqlTransform,
    metrics: Arc<Metrics>,
}

impl Rule {
    fn new(sql: &str) -> Self {
        Self::with(sql, "")
    }

    fn with(sql: &str, extra: &str) -> Self {
        let text = format!("inputs = [\"devices\"]\nsql = {sql:?}\n{extra}");
        let config: SqlConfig = toml::from_str(&text).expect("valid toml");
        let context = Context {
            file: "t",
            text: &text,
        };
        config.check("r", &context).expect("valid rule");
        let metrics = Arc::new(Metrics::new());
        let services = TransformServices {
            registry: None,
            metrics: metrics.clone(),
            alarms: Arc::default(),
            actions: None,
        };
        let transform = config.build_sql("r", &services).expect("builds");
        Self { transform, metrics }
    }

    fn errors(&self, reason: &str) -> u64 {
        self.metrics.transform_error("r", reason).get()
    }

    fn feed(&self, events: &[(&str, u64, Json)]) -> Vec<(String, u64, Json)> {
        let mut out = Emitted::default();
        for (device, time, payload) in events {
            self.transform
                .apply(event(device, *time, payload), &mut out);
        }
        outputs(out)
    }

    fn tick(&self, ms: u64) -> Vec<(String, u64, Json)> {
        let mut out = Emitted::default();
        self.transform
            .tick(SystemTime::UNIX_EPOCH + Duration::from_millis(ms), &mut out);
        outputs(out)
    }

    fn flush(&self) -> Vec<(String, u64, Json)> {
        let mut out = Emitted::default();
        self.transform.flush(&mut out);
        outputs(out)
    }
}

fn event(device: &str, time: u64, payload: &Json) -> Event {
    let kind = payload
        .get("_kind")
        .and_then(Json::as_str)
        .and_then(EventKind::parse)
        .unwrap_or(EventKind::Telemetry);
    Event::new(
        DeviceId::new(device),
        kind,
        Arc::from("devices"),
        time,
        PayloadFormat::Json,
        Bytes::from(serde_json::to_vec(payload).expect("json")),
    )
}

fn outputs(out: Emitted) -> Vec<(String, u64, Json)> {
    out.into_events()
        .into_iter()
        .map(|(port, event)| {
            assert_eq!(port, 0);
            let payload = serde_json::from_slice(&event.payload).expect("json output");
            (event.device.to_string(), event.received_at_ms, payload)
        })
        .collect()
}

fn row(device: &str, time: u64, payload: Json) -> (String, u64, Json) {
    (device.to_owned(), time, payload)
}

#[test]
fn the_issue_rule_emits_one_event_per_device_and_window() {
    let rule = Rule::new(ISSUE_RULE);
    let out = rule.feed(&[
        ("a", 10_000, json!({"temp": 20})),
        ("b", 10_100, json!({"temp": 30})),
        ("a", 10_500, json!({"temp": 22})),
        ("a", 11_000, json!({"temp": 99, "_kind": "status"})),
        ("a", 11_999, json!({"temp": 24})),
    ]);
    assert!(out.is_empty(), "nothing closes inside the window: {out:?}");
    // The next window's first event closes [10000, 12000).
    let out = rule.feed(&[("b", 12_000, json!({"temp": 10}))]);
    assert_eq!(
        out,
        vec![
            row(
                "a",
                12_000,
                json!({"device": "a", "avg_temp": 22, "max_temp": 24, "n": 3})
            ),
            row(
                "b",
                12_000,
                json!({"device": "b", "avg_temp": 30, "max_temp": 30, "n": 1})
            ),
        ]
    );
    assert_eq!(rule.metrics.filtered("r").get(), 1);
    // A tick before the window's end emits nothing; at its end it closes the window.
    assert!(rule.tick(13_999).is_empty());
    assert_eq!(
        rule.tick(14_000),
        vec![row(
            "b",
            14_000,
            json!({"device": "b", "avg_temp": 10, "max_temp": 10, "n": 1})
        )]
    );
    assert!(rule.flush().is_empty());
    let mut out = Emitted::default();
    rule.transform
        .apply(event("a", 20_000, &json!({})), &mut out);
    let events = out.into_events();
    assert!(events.is_empty());
    let closed = rule.flush();
    assert_eq!(closed.len(), 1);
    assert_eq!(
        closed[0].2,
        json!({"device": "a", "avg_temp": null, "max_temp": null, "n": 1})
    );
}

#[test]
fn windows_align_to_multiples_of_their_length() {
    let rule = Rule::new(
        "SELECT window_start() AS s, window_end() AS e, count(*) AS n FROM devices \
         GROUP BY TUMBLINGWINDOW(ss, 10)",
    );
    rule.feed(&[("a", 1_234_567, json!({}))]);
    let out = rule.flush();
    assert_eq!(out[0].2, json!({"s": 1_230_000, "e": 1_240_000, "n": 1}));
    assert_eq!(out[0].0, "r", "no device key: the rule's name");
}

#[test]
fn output_events_are_of_kind_event_or_alarm() {
    for (extra, kind) in [
        ("", EventKind::Event),
        ("output_kind = \"alarm\"", EventKind::Alarm),
    ] {
        let rule = Rule::with(
            "SELECT count(*) AS n FROM devices GROUP BY COUNTWINDOW(1)",
            extra,
        );
        let mut out = Emitted::default();
        rule.transform.apply(event("a", 1, &json!({})), &mut out);
        let events = out.into_events();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].1.kind, kind);
        assert_eq!(&*events[0].1.source, "r");
    }
}

#[test]
fn hopping_windows_overlap() {
    let rule = Rule::new(
        "SELECT window_start() AS s, sum(v) AS total FROM devices GROUP BY HOPPINGWINDOW(ss, 4, 2)",
    );
    let mut out = rule.feed(&[
        ("a", 1_000, json!({"v": 1})),
        ("a", 3_000, json!({"v": 2})),
        ("a", 5_000, json!({"v": 4})),
    ]);
    out.extend(rule.flush());
    let out: Vec<Json> = out.into_iter().map(|(_, _, payload)| payload).collect();
    assert_eq!(
        out,
        vec![
            json!({"s": -2000, "total": 1}),
            json!({"s": 0, "total": 3}),
            json!({"s": 2000, "total": 6}),
            json!({"s": 4000, "total": 4}),
        ]
    );
}

#[test]
fn sliding_windows_emit_per_event_over_the_trailing_length() {
    let rule = Rule::new(
        "SELECT device, count(*) AS n, sum(v) AS total FROM devices \
         GROUP BY device, SLIDINGWINDOW(ss, 2)",
    );
    let out = rule.feed(&[
        ("a", 1_000, json!({"v": 1})),
        ("a", 2_000, json!({"v": 2})),
        ("b", 2_500, json!({"v": 10})),
        ("a", 3_000, json!({"v": 4})),
        ("a", 5_500, json!({"v": 8})),
    ]);
    let payloads: Vec<Json> = out.iter().map(|(_, _, payload)| payload.clone()).collect();
    assert_eq!(
        payloads,
        vec![
            json!({"device": "a", "n": 1, "total": 1}),
            json!({"device": "a", "n": 2, "total": 3}),
            json!({"device": "b", "n": 1, "total": 10}),
            // (1000, 3000]: the event at 1000 has left.
            json!({"device": "a", "n": 2, "total": 6}),
            json!({"device": "a", "n": 1, "total": 8}),
        ]
    );
    assert_eq!(out[4].1, 5_500);
    assert!(rule.flush().is_empty());
}

#[test]
fn sessions_close_on_a_gap_or_at_their_maximum() {
    let rule = Rule::new(
        "SELECT device, window_start() AS s, window_end() AS e, count(*) AS n FROM devices \
         GROUP BY device, SESSIONWINDOW(ss, 2, 5)",
    );
    let out = rule.feed(&[
        ("a", 10_000, json!({})),
        ("a", 11_000, json!({})),
        ("a", 12_500, json!({})),
        // A gap of 2 s since 12500 closes the session at 14500.
        ("b", 14_600, json!({})),
    ]);
    assert_eq!(
        out,
        vec![row(
            "a",
            14_500,
            json!({"device": "a", "s": 10_000, "e": 14_500, "n": 3})
        )]
    );
    // b's session reaches its 5 s maximum though events keep coming.
    let out = rule.feed(&[
        ("b", 16_000, json!({})),
        ("b", 17_500, json!({})),
        ("b", 19_000, json!({})),
        ("b", 19_700, json!({})),
    ]);
    assert_eq!(
        out,
        vec![row(
            "b",
            19_600,
            json!({"device": "b", "s": 14_600, "e": 19_600, "n": 4})
        )]
    );
    assert_eq!(
        rule.flush(),
        vec![row(
            "b",
            21_700,
            json!({"device": "b", "s": 19_700, "e": 21_700, "n": 1})
        )]
    );
}

#[test]
fn count_windows_tumble_and_hop() {
    let rule = Rule::new("SELECT sum(v) AS total FROM devices GROUP BY COUNTWINDOW(3)");
    let out = rule.feed(
        &(1..=7)
            .map(|v| ("a", v, json!({"v": v})))
            .collect::<Vec<_>>(),
    );
    let totals: Vec<Json> = out.into_iter().map(|(_, _, payload)| payload).collect();
    assert_eq!(totals, vec![json!({"total": 6}), json!({"total": 15})]);
    assert!(
        rule.flush().is_empty(),
        "an incomplete count window never emits"
    );

    let rule =
        Rule::new("SELECT device, sum(v) AS total FROM devices GROUP BY device, COUNTWINDOW(3, 1)");
    let out = rule.feed(&[
        ("a", 1, json!({"v": 1})),
        ("b", 2, json!({"v": 2})),
        ("a", 3, json!({"v": 3})),
        ("a", 4, json!({"v": 4})),
    ]);
    let payloads: Vec<Json> = out.into_iter().map(|(_, _, payload)| payload).collect();
    assert_eq!(
        payloads,
        vec![
            json!({"device": "a", "total": 4}),
            json!({"device": "b", "total": 2}),
            json!({"device": "b", "total": 2}),
            json!({"device": "a", "total": 7}),
        ]
    );
}

#[test]
fn event_time_accepts_out_of_order_events_within_the_watermark_and_drops_late_ones() {
    let rule = Rule::with(
        "SELECT count(*) AS n, first(v) AS first, last(v) AS last FROM devices \
         GROUP BY TUMBLINGWINDOW(ss, 10)",
        "event_time = \"ts\"\nwatermark = \"5s\"",
    );
    // Arrival time (the second field) is ignored: the payload's `ts` counts.
    let out = rule.feed(&[
        ("a", 0, json!({"ts": 1_000, "v": "b"})),
        ("a", 0, json!({"ts": 12_000, "v": "x"})),
        // Out of order, within the watermark (12000 - 5000 = 7000): joins [0, 10000).
        ("a", 0, json!({"ts": 8_000, "v": "c"})),
        ("a", 0, json!({"ts": 500, "v": "a"})),
    ]);
    assert!(
        out.is_empty(),
        "the watermark has not passed 10000: {out:?}"
    );
    assert_eq!(rule.errors("late"), 1, "500 < 7000 is late");
    let out = rule.feed(&[("a", 0, json!({"ts": "1970-01-01T00:00:15.000Z", "v": "y"}))]);
    assert_eq!(
        out,
        vec![row("r", 10_000, json!({"n": 2, "first": "b", "last": "c"}))]
    );
    // An event for the closed window is late.
    rule.feed(&[
        ("a", 0, json!({"ts": 9_999, "v": "z"})),
        ("a", 0, json!({"v": 1})),
    ]);
    assert_eq!(rule.errors("late"), 2);
    assert_eq!(rule.errors("no_event_time"), 1);
    assert_eq!(
        rule.flush(),
        vec![row("r", 20_000, json!({"n": 2, "first": "x", "last": "y"}))]
    );
    assert_eq!(rule.transform.tick_interval(), None);
}

#[test]
fn processing_time_is_never_late() {
    let rule = Rule::new("SELECT count(*) AS n FROM devices GROUP BY TUMBLINGWINDOW(ss, 1)");
    assert_eq!(
        rule.transform.tick_interval(),
        Some(Duration::from_millis(100))
    );
    rule.feed(&[("a", 5_500, json!({})), ("a", 3_000, json!({}))]);
    assert_eq!(rule.errors("late"), 0);
    assert_eq!(rule.flush(), vec![row("r", 6_000, json!({"n": 2}))]);
}

#[test]
fn caps_on_groups_and_samples_are_counted() {
    let rule = Rule::with(
        "SELECT device, percentile(v, 0.5) AS p FROM devices GROUP BY device, COUNTWINDOW(6)",
        "max_groups = 2\nmax_samples = 2",
    );
    let out = rule.feed(&[
        ("a", 1, json!({"v": 1})),
        ("b", 2, json!({"v": 2})),
        ("c", 3, json!({"v": 3})),
        ("a", 4, json!({"v": 5})),
        ("a", 5, json!({"v": 7})),
        ("b", 6, json!({"v": 4})),
    ]);
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].2, json!({"device": "a", "p": 3}));
    assert_eq!(rule.errors("group_overflow"), 1);
    assert_eq!(rule.errors("sample_overflow"), 1);

    let rule = Rule::with(
        "SELECT device, count(*) AS n FROM devices GROUP BY device, TUMBLINGWINDOW(ss, 1)",
        "max_groups = 1",
    );
    rule.feed(&[
        ("a", 1, json!({})),
        ("b", 2, json!({})),
        ("a", 3, json!({})),
    ]);
    assert_eq!(
        rule.flush(),
        vec![row("a", 1000, json!({"device": "a", "n": 2}))]
    );
    assert_eq!(rule.errors("group_overflow"), 1);
}

#[test]
fn having_filters_groups() {
    let rule = Rule::new(
        "SELECT device, avg(v) AS a FROM devices GROUP BY device, TUMBLINGWINDOW(ss, 1) \
         HAVING avg(v) > 10 AND count(*) >= 2",
    );
    rule.feed(&[
        ("a", 1, json!({"v": 20})),
        ("a", 2, json!({"v": 30})),
        ("b", 3, json!({"v": 50})),
        ("c", 4, json!({"v": 1})),
        ("c", 5, json!({"v": 2})),
    ]);
    assert_eq!(
        rule.flush(),
        vec![row("a", 1000, json!({"device": "a", "a": 25}))]
    );
}

#[test]
fn star_passes_events_through_and_projections_make_new_ones() {
    let rule = Rule::new("SELECT * FROM devices WHERE temp > 30 AND device != 'x'");
    let passing = event("a", 7, &json!({"temp": 31}));
    let id = passing.id();
    let mut out = Emitted::default();
    rule.transform.apply(passing, &mut out);
    rule.transform
        .apply(event("a", 8, &json!({"temp": 29})), &mut out);
    rule.transform
        .apply(event("x", 9, &json!({"temp": 40})), &mut out);
    let events = out.into_events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].1.id(), id);
    assert_eq!(events[0].1.kind, EventKind::Telemetry);
    assert_eq!(rule.transform.checkpoint(), None);
    assert_eq!(rule.transform.tick_interval(), None);

    let rule = Rule::new(
        "SELECT device, kind, round(temp * 1.8 + 32, 1) AS f, upper(site) AS site, \
         CASE WHEN temp > 30 THEN 'hot' WHEN temp > 10 THEN 'warm' ELSE 'cold' END AS level, \
         concat(site, '-', env.room) AS place, length(site) AS len, substring(site, 2, 2) AS mid, \
         trim('  x ') AS t, abs(-2) AS abs, floor(2.5) AS fl, ceil(2.1) AS ce, sqrt(16) AS sq, \
         power(2, 10) AS pw, ln(1) AS ln, log10(1000) AS lg, lower('AB') AS lo, \
         temp / 0 AS nothing, site || '!' AS bang, now() AS now, missing IS NULL AS gone \
         FROM devices",
    );
    let out = rule.feed(&[(
        "a",
        42,
        json!({"temp": 20.5, "site": "north", "env": {"room": 3}}),
    )]);
    assert_eq!(
        out,
        vec![row(
            "a",
            42,
            json!({
                "device": "a", "kind": "telemetry", "f": 68.9, "site": "NORTH", "level": "warm",
                "place": "north-3", "len": 5, "mid": "or", "t": "x", "abs": 2, "fl": 2, "ce": 3,
                "sq": 4, "pw": 1024, "ln": 0, "lg": 3, "lo": "ab", "nothing": null,
                "bang": "north!", "now": 42, "gone": true
            })
        )]
    );
}

#[test]
fn non_json_payloads_have_no_fields() {
    let rule = Rule::new("SELECT device, v FROM devices WHERE v IS NULL");
    let mut out = Emitted::default();
    let mut binary = event("a", 1, &json!({}));
    binary.format = PayloadFormat::Binary;
    rule.transform.apply(binary, &mut out);
    assert_eq!(
        outputs(out),
        vec![row("a", 1, json!({"device": "a", "v": null}))]
    );
    assert_eq!(rule.errors("not_json"), 1);
}

/// Events of a recorded stream, with out-of-order and late ones, for the round trips.
fn recorded() -> Vec<(&'static str, u64, Json)> {
    let mut events = Vec::new();
    for index in 0..60u64 {
        let device = ["a", "b", "c"][usize::try_from(index % 3).expect("small")];
        let jitter = (index * 7919) % 1500;
        let ts = 1_000 + index * 400 - jitter.min(index * 400);
        events.push((
            device,
            1_000 + index * 400,
            json!({"ts": ts, "v": index % 11}),
        ));
    }
    events
}

fn round_trip(sql: &str, extra: &str) {
    let events = recorded();
    let uninterrupted = Rule::with(sql, extra);
    let mut expected = uninterrupted.feed(&events);
    expected.extend(uninterrupted.flush());
    assert!(!expected.is_empty(), "{sql}");
    for split in [1, 17, 30, 59] {
        let first = Rule::with(sql, extra);
        let mut got = first.feed(&events[..split]);
        let state = first.transform.checkpoint().expect("stateful");
        let second = Rule::with(sql, extra);
        second.transform.restore(&state).expect("restores");
        got.extend(second.feed(&events[split..]));
        got.extend(second.flush());
        assert_eq!(got, expected, "{sql} split at {split}");
        assert_eq!(first.errors("late"), 0);
    }
}

#[test]
fn state_restored_mid_window_gives_the_uninterrupted_output() {
    let group = "device, count(*) AS n, avg(v) AS a, stddev(v) AS s, percentile(v, 0.9) AS p, \
                 first(v) AS f, last(v) AS l, min(v) AS lo, max(v) AS hi, sum(v) AS t";
    for window in [
        "TUMBLINGWINDOW(ss, 3)",
        "HOPPINGWINDOW(ss, 4, 2)",
        "SLIDINGWINDOW(ss, 2)",
        "SESSIONWINDOW(ms, 1000, 4000)",
        "COUNTWINDOW(7, 3)",
    ] {
        let sql = format!("SELECT {group} FROM devices GROUP BY device, {window}");
        round_trip(&sql, "");
        round_trip(&sql, "event_time = \"ts\"\nwatermark = \"2s\"");
    }
}

#[test]
fn restore_refuses_foreign_or_broken_state() {
    let rule = Rule::new("SELECT count(*) AS n FROM devices GROUP BY TUMBLINGWINDOW(ss, 1)");
    rule.feed(&[("a", 1, json!({}))]);
    let state = rule.transform.checkpoint().expect("stateful");
    let other = Rule::new("SELECT count(*) AS n FROM devices GROUP BY TUMBLINGWINDOW(ss, 2)");
    let err = other.transform.restore(&state).expect_err("another rule");
    assert!(err.to_string().contains("different SQL"), "{err}");
    assert!(other.transform.restore(b"{not json").is_err());
    assert!(other.transform.restore(&state[..state.len() / 2]).is_err());
    let versioned = String::from_utf8(state.clone())
        .expect("utf8")
        .replace("\"version\":1", "\"version\":9");
    let err = rule
        .transform
        .restore(versioned.as_bytes())
        .expect_err("version");
    assert!(err.to_string().contains("version 9"), "{err}");
    // The failed restores left the state alone.
    assert_eq!(rule.flush(), vec![row("r", 1000, json!({"n": 1}))]);
}

fn check_error(text: &str) -> crate::config::ConfigError {
    let config: SqlConfig = toml::from_str(text).expect("valid toml");
    let context = Context {
        file: "g.toml",
        text,
    };
    config.check("hot", &context).expect_err("refused")
}

#[test]
fn check_refuses_malformed_rules_with_their_position() {
    let err = check_error("inputs = [\"devices\"]\nsql = \"SELECT avg(temp FROM devices\"\n");
    assert_eq!(err.line, Some(2));
    assert_eq!(err.key.as_deref(), Some("transforms.hot.sql"));
    assert_eq!(
        err.message,
        "SQL error at line 1, column 17: expected `)`, found `FROM`"
    );
    let err = check_error(
        "inputs = [\"devices\"]\nsql = \"\"\"\nSELECT temp\nFROM devices\nWHERE temp >> 1\"\"\"\n",
    );
    assert_eq!(err.line, Some(5));
    assert!(
        err.message.starts_with("SQL error at line 3, column 13"),
        "{}",
        err.message
    );
    let err = check_error("inputs = [\"devices\"]\nsql = \"SELECT * FROM other\"\n");
    assert!(
        err.message.contains("not one of the transform's inputs"),
        "{}",
        err.message
    );
    assert!(err.message.contains("column 15"), "{}", err.message);
    let err = check_error("inputs = [\"d\"]\nsql = \"SELECT * FROM d\"\nwatermark = \"1s\"\n");
    assert_eq!(err.key.as_deref(), Some("transforms.hot.watermark"));
    let err = check_error("inputs = [\"d\"]\nsql = \"SELECT * FROM d\"\nmax_groups = 0\n");
    assert_eq!(err.key.as_deref(), Some("transforms.hot.max_groups"));
    let err = check_error("inputs = [\"d\"]\nsql = \"SELECT * FROM d\"\nevent_time = \"a..b\"\n");
    assert_eq!(err.key.as_deref(), Some("transforms.hot.event_time"));
    assert!(toml::from_str::<SqlConfig>("inputs = [\"d\"]\nsql = \"x\"\nbogus = 1\n").is_err());
    assert!(
        toml::from_str::<SqlConfig>("inputs = [\"d\"]\nsql = \"x\"\noutput_kind = \"status\"\n")
            .is_err()
    );
}

fn sqlish() -> impl Strategy<Value = String> {
    let words = prop::sample::select(vec![
        "SELECT",
        "FROM",
        "WHERE",
        "GROUP",
        "BY",
        "HAVING",
        "AS",
        "AND",
        "OR",
        "NOT",
        "CASE",
        "WHEN",
        "THEN",
        "ELSE",
        "END",
        "IS",
        "NULL",
        "*",
        "(",
        ")",
        ",",
        ".",
        "+",
        "-",
        "/",
        "%",
        "=",
        "<>",
        "<=",
        "||",
        "'s'",
        "'",
        "\"q\"",
        "1",
        "2.5",
        "1e3",
        "device",
        "kind",
        "temp",
        "count",
        "avg",
        "percentile",
        "TUMBLINGWINDOW",
        "COUNTWINDOW",
        "SESSIONWINDOW",
        "HOPPINGWINDOW",
        "SLIDINGWINDOW",
        "ss",
        "ms",
        "window_start",
        "now",
        "devices",
        "é",
        "\n",
        "--",
        ";",
        "substring",
        "round",
    ]);
    prop::collection::vec(words, 0..40).prop_map(|words| words.join(" "))
}

fn arbitrary_json() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::from),
        any::<i64>().prop_map(Json::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number)),
        "[a-z0-9 ]{0,6}".prop_map(Json::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
            prop::collection::btree_map(
                prop::sample::select(vec!["temp", "v", "ts", "site", "env"])
                    .prop_map(str::to_owned),
                inner,
                0..4
            )
            .prop_map(|map| Json::Object(map.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn sql_ish_text_never_panics(sql in sqlish()) {
        let text = format!("inputs = [\"devices\"]\nsql = {sql:?}\n");
        if let Ok(config) = toml::from_str::<SqlConfig>(&text) {
            let context = Context { file: "t", text: &text };
            if config.check("r", &context).is_ok() {
                let rule = Rule::new(&sql);
                rule.feed(&[("a", 1, json!({"temp": 1, "v": "x"})), ("b", 5_000, json!({}))]);
                rule.flush();
            }
        }
    }

    #[test]
    fn arbitrary_payloads_never_panic(payloads in prop::collection::vec((arbitrary_json(), 0u64..20_000), 1..20)) {
        let rules = [
            "SELECT device, avg(temp) AS a, stddev(temp) AS s, percentile(temp, 0.5) AS p, \
             first(site) AS f, last(env) AS l, min(v) AS lo, count(v) AS n FROM devices \
             WHERE temp > -1e300 OR site IS NOT NULL GROUP BY device, site, TUMBLINGWINDOW(ss, 1)",
            "SELECT concat(site, temp, env) AS c, substring(site, temp) AS s, round(temp, v) AS r, \
             temp % v AS m, upper(site) AS u FROM devices",
            "SELECT env, count(*) AS n FROM devices GROUP BY env, SESSIONWINDOW(ms, 100, 1000)",
        ];
        for sql in rules {
            for extra in ["", "event_time = \"ts\"\nwatermark = \"1s\""] {
                let rule = Rule::with(sql, extra);
                let events: Vec<(&str, u64, Json)> = payloads
                    .iter()
                    .map(|(payload, time)| ("a", *time, payload.clone()))
                    .collect();
                rule.feed(&events);
                rule.tick(30_000);
                let state = rule.transform.checkpoint();
                if let Some(state) = state {
                    rule.transform.restore(&state).expect("own state restores");
                }
                rule.flush();
            }
        }
    }

    #[test]
    fn tumbling_counts_match_a_naive_model(
        events in prop::collection::vec((0u64..3, 0u64..10_000), 0..200),
        size in 1u64..3_000,
    ) {
        let rule = Rule::new(&format!(
            "SELECT device, window_start() AS s, count(*) AS n FROM devices \
             GROUP BY device, TUMBLINGWINDOW(ms, {size})"
        ));
        let mut sorted = events.clone();
        sorted.sort_by_key(|(_, time)| *time);
        let names = ["a", "b", "c"];
        let recorded: Vec<(&str, u64, Json)> = sorted
            .iter()
            .map(|(device, time)| (names[usize::try_from(*device).expect("small")], *time, json!({})))
            .collect();
        let mut got = rule.feed(&recorded);
        got.extend(rule.flush());
        let mut model = std::collections::BTreeMap::<(u64, String), u64>::new();
        for (device, time, _) in &recorded {
            *model.entry((time / size * size, (*device).to_owned())).or_default() += 1;
        }
        let mut found = std::collections::BTreeMap::<(u64, String), u64>::new();
        for (device, _, payload) in &got {
            let start = payload["s"].as_u64().expect("start");
            let n = payload["n"].as_u64().expect("count");
            prop_assert!(found.insert((start, device.clone()), n).is_none());
        }
        prop_assert_eq!(found, model);
    }
}

/// Events of 100 devices shaped like the simulator's, 1 ms apart.
fn bench_events(count: u64) -> Vec<Event> {
    (0..count)
        .map(|index| {
            let device = format!("dev-{}", index % 100);
            #[allow(clippy::cast_precision_loss, reason = "small")]
            let temp = 20.0 + (index % 17) as f64 * 0.5;
            let payload = json!({"device": device, "seq": index, "t": 1_764_650_000_000u64 + index, "temp": temp});
            event(&device, 1_764_650_000_000 + index, &payload)
        })
        .collect()
}

/// Rule throughput per core and allocations per event: a filter, the issue's tumbling
/// average, and a set of 5 rules on every event. A benchmark, not a check: `cargo test
/// --release --bin fieldgate sql_rule_throughput -- --ignored --nocapture --test-threads 1`
/// (numbers in docs/BENCHMARKS.md).
#[test]
#[ignore = "benchmark; run explicitly"]
fn sql_rule_throughput() {
    const EVENTS: u64 = 200_000;
    let events = bench_events(EVENTS);
    let sets: [(&str, Vec<&str>); 3] = [
        (
            "filter",
            vec!["SELECT * FROM devices WHERE kind = 'telemetry' AND temp > 25"],
        ),
        ("tumbling avg (issue rule)", vec![ISSUE_RULE]),
        (
            "5-rule set",
            vec![
                "SELECT * FROM devices WHERE kind = 'telemetry' AND temp > 25",
                ISSUE_RULE,
                "SELECT device, round(temp * 1.8 + 32, 1) AS temp_f, \
                 CASE WHEN temp > 25 THEN 'hot' ELSE 'ok' END AS level FROM devices",
                "SELECT device, percentile(temp, 0.95) AS p95, stddev(temp) AS sd FROM devices \
                 GROUP BY device, HOPPINGWINDOW(ss, 10, 5)",
                "SELECT device, count(*) AS n, last(seq) AS seq FROM devices \
                 GROUP BY device, SESSIONWINDOW(ss, 1, 60)",
            ],
        ),
    ];
    for (name, sqls) in sets {
        let rules: Vec<Rule> = sqls.iter().map(|sql| Rule::new(sql)).collect();
        let run = |events: &[Event]| {
            let mut emitted = 0usize;
            for event in events {
                for rule in &rules {
                    let mut out = Emitted::default();
                    rule.transform.apply(event.clone(), &mut out);
                    emitted += out.into_events().len();
                }
            }
            emitted
        };
        let warm = usize::try_from(EVENTS / 10).expect("small");
        run(&events[..warm]);
        let started = tokio::time::Instant::now();
        let emitted = run(&events[warm..]);
        let elapsed = started.elapsed().as_secs_f64();
        #[allow(clippy::cast_precision_loss, reason = "a printed ratio")]
        let measured = (events.len() - warm) as f64;
        let profiler = dhat::Profiler::builder().testing().build();
        run(&events[..warm]);
        let stats = dhat::HeapStats::get();
        drop(profiler);
        #[allow(clippy::cast_precision_loss, reason = "a printed ratio")]
        let per_event = |total: u64| total as f64 / warm as f64;
        println!(
            "{name}: {:.0} events/s on one core ({emitted} outputs); {:.1} allocations, {:.0} bytes per event",
            measured / elapsed,
            per_event(stats.total_blocks),
            per_event(stats.total_bytes),
        );
    }
}

/// Heap held per built rule, with 1, 100 and 10,000 rules (parse, plan, build; the
/// `fieldgate check` and reload path), and after 1,000 rebuilds of one rule.
#[test]
#[ignore = "benchmark; run explicitly"]
fn sql_rule_memory() {
    let metrics = Arc::new(Metrics::new());
    let services = TransformServices {
        registry: None,
        metrics: metrics.clone(),
        alarms: Arc::default(),
        actions: None,
    };
    let build = |index: usize| {
        let text = format!("inputs = [\"devices\"]\nsql = {ISSUE_RULE:?}\n");
        let config: SqlConfig = toml::from_str(&text).expect("valid toml");
        config
            .build_sql(&format!("rule-{index}"), &services)
            .expect("builds")
    };
    for count in [1usize, 100, 10_000] {
        let profiler = dhat::Profiler::builder().testing().build();
        let before = dhat::HeapStats::get().curr_bytes;
        let rules: Vec<SqlTransform> = (0..count).map(build).collect();
        let held = dhat::HeapStats::get().curr_bytes - before;
        drop(rules);
        drop(profiler);
        #[allow(clippy::cast_precision_loss, reason = "a printed ratio")]
        let per_rule = held as f64 / count as f64;
        println!("{count} rule(s): {per_rule:.0} bytes of heap per rule (idle, no open window)");
    }
    let profiler = dhat::Profiler::builder().testing().build();
    let mut rule = build(0);
    let before = dhat::HeapStats::get().curr_bytes;
    for _ in 0..1_000 {
        rule = build(0);
    }
    let after = dhat::HeapStats::get().curr_bytes;
    drop(rule);
    drop(profiler);
    println!(
        "1,000 rebuilds of one rule: heap {before} -> {after} bytes ({} bytes growth)",
        after.saturating_sub(before)
    );
}
