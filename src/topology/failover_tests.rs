//! `failover` and `failover_after` on sinks: the snippet loads, `check` rejects unknown,
//! self, chained and cyclic failovers, sinks without an upstream and hostile values, and
//! the compiled routes pick one of the two intakes per event.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{ConfigError, parse};
use crate::pipeline::{FailoverSwitch, Item, SourceOutput, Target, intake};
use crate::topology::{Components, Config};
use crate::transforms::TransformServices;
use crate::transforms::alarm::AlarmBoard;
use crate::transforms::tests::event_json;

fn no_env(_: &str) -> Option<String> {
    None
}

/// Devices, a route by region, `eu` failing over to `eu-backup`, everything else to `us`;
/// `eu_extra` goes into `[sinks.eu]`, `tail` at the end.
fn regions(eu_extra: &str, tail: &str) -> String {
    format!(
        "[gateway]\nid = \"gw\"\n\n\
         [sources.devices]\ntype = \"tcp\"\naddress = \"127.0.0.1:7000\"\n\n\
         [transforms.region]\ntype = \"route\"\ninputs = [\"devices\"]\nroutes.eu = {{ labels = {{ region = \"eu\" }} }}\n\n\
         [sinks.eu]\ntype = \"mqtt\"\ninputs = [\"region.eu\"]\nurl = \"mqtt://127.0.0.1:1883\"\n{eu_extra}\n\n\
         [sinks.eu-backup]\ntype = \"mqtt\"\ninputs = []\nurl = \"mqtt://127.0.0.1:1884\"\n\n\
         [sinks.us]\ntype = \"mqtt\"\ninputs = [\"region._unmatched\"]\nurl = \"mqtt://127.0.0.1:1885\"\n\n{tail}"
    )
}

fn parse_ok(text: &str) -> Config {
    parse::<Components>("test.toml", text, no_env).unwrap_or_else(|err| panic!("{err}\n{text}"))
}

fn parse_err(text: &str) -> ConfigError {
    match parse::<Components>("test.toml", text, no_env) {
        Ok(_) => panic!("config should have been rejected:\n{text}"),
        Err(err) => err,
    }
}

#[test]
fn the_region_snippet_loads_with_its_default_delay() {
    let config = parse_ok(&regions("failover = \"eu-backup\"", ""));
    let failover = &config.components.failover["eu"];
    assert_eq!(failover.to.get_ref(), "eu-backup");
    assert_eq!(failover.after(), Duration::from_secs(30));
    assert_eq!(config.components.failover.len(), 1);
    let config = parse_ok(&regions(
        "failover = \"eu-backup\"\nfailover_after = \"2s\"",
        "",
    ));
    assert_eq!(
        config.components.failover["eu"].after(),
        Duration::from_secs(2)
    );
}

#[test]
fn a_sink_with_no_inputs_must_be_a_failover() {
    let err = parse_err(&regions("", ""));
    assert_eq!(err.key.as_deref(), Some("sinks.eu-backup.inputs"), "{err}");
    assert!(err.message.contains("at least one input"), "{err}");
}

#[test]
fn check_rejects_what_cannot_fail_over() {
    let cases = [
        (
            regions("failover = \"eu-bakup\"", ""),
            "sinks.eu.failover",
            "names no sink \"eu-bakup\"",
        ),
        (
            regions("failover = \"eu\"", ""),
            "sinks.eu.failover",
            "cannot fail over to itself",
        ),
        (
            // A chain: eu → eu-backup → us.
            regions("failover = \"eu-backup\"", "").replace(
                "[sinks.eu-backup]\ntype = \"mqtt\"\ninputs = []",
                "[sinks.eu-backup]\ntype = \"mqtt\"\ninputs = []\nfailover = \"us\"",
            ),
            "sinks.eu.failover",
            "does not chain",
        ),
        (
            // A cycle: us → eu → us.
            regions("failover = \"us\"", "")
                .replace(
                    "url = \"mqtt://127.0.0.1:1885\"",
                    "url = \"mqtt://127.0.0.1:1885\"\nfailover = \"eu\"",
                )
                .replace("inputs = []", "inputs = [\"devices\"]"),
            "sinks.eu.failover",
            "does not chain",
        ),
        (
            regions("failover_after = \"10s\"", "")
                .replace("inputs = []", "inputs = [\"devices\"]"),
            "sinks.eu.failover_after",
            "needs `failover`",
        ),
        (
            regions("failover = \"eu-backup\"\nfailover_after = \"0s\"", ""),
            "sinks.eu.failover_after",
            "more than 0s",
        ),
        (
            regions("failover = \"eu-backup\"\nfailover_after = \"soon\"", ""),
            "sinks.eu.failover_after",
            "invalid duration",
        ),
        (
            regions("failover = \"eu-backup\"\nfailover_after = 30", ""),
            "sinks.eu.failover_after",
            "duration with its unit",
        ),
        (
            regions("failover = [\"eu-backup\"]", ""),
            "sinks.eu.failover",
            "string",
        ),
        (
            regions("failover = \"\"", ""),
            "sinks.eu.failover",
            "names no sink \"\"",
        ),
    ];
    for (text, key, message) in cases {
        let err = parse_err(&text);
        assert_eq!(err.key.as_deref(), Some(key), "{err}\n{text}");
        assert!(err.message.contains(message), "{err}\n{text}");
        assert!(err.line.is_some(), "an error names its line: {err}");
    }
}

#[test]
fn only_sinks_with_an_upstream_fail_over() {
    let text = "[gateway]\nid = \"gw\"\n\n[sources.devices]\ntype = \"tcp\"\naddress = \"127.0.0.1:7000\"\n\n\
                [sinks.local]\ntype = \"file\"\ninputs = [\"devices\"]\nfailover = \"other\"\n\n\
                [sinks.other]\ntype = \"console\"\ninputs = []\n";
    let err = parse_err(text);
    assert_eq!(err.key.as_deref(), Some("sinks.local.failover"), "{err}");
    assert!(
        err.message.contains("\"file\" sink has no upstream"),
        "{err}"
    );
    assert_eq!(err.line, Some(11), "{err}");
}

#[test]
fn hostile_failover_values_are_errors_not_panics() {
    let long = "x".repeat(100_000);
    for value in [
        format!("\"{long}\""),
        "\"\\u0000\"".to_owned(),
        "{ to = \"eu-backup\" }".to_owned(),
        "true".to_owned(),
        "-1".to_owned(),
    ] {
        let err = parse_err(&regions(&format!("failover = {value}"), ""));
        assert_eq!(err.key.as_deref(), Some("sinks.eu.failover"), "{err}");
    }
    for value in ["\"99999999999999999999h\"", "\"-5s\"", "\"1\"", "\"\""] {
        let err = parse_err(&regions(
            &format!("failover = \"eu-backup\"\nfailover_after = {value}"),
            "",
        ));
        assert_eq!(err.key.as_deref(), Some("sinks.eu.failover_after"), "{err}");
    }
}

#[tokio::test]
async fn routes_pick_one_of_the_two_intakes_per_event() {
    let config = parse_ok(&regions("failover = \"eu-backup\"", ""));
    let (eu, mut eu_rx) = intake();
    let (backup, mut backup_rx) = intake();
    let (us, mut us_rx) = intake();
    let intakes = BTreeMap::from([
        ("eu".to_owned(), eu),
        ("eu-backup".to_owned(), backup),
        ("us".to_owned(), us),
    ]);
    let metrics = Arc::new(crate::telemetry::Metrics::new());
    let services = TransformServices {
        registry: None,
        metrics: Arc::clone(&metrics),
        alarms: Arc::new(AlarmBoard::default()),
        actions: None,
    };
    let switch = Arc::new(FailoverSwitch::new(
        metrics.failover_events("eu", "eu-backup"),
    ));
    let switches = BTreeMap::from([("eu".to_owned(), Arc::clone(&switch))]);
    let mut compiled = config
        .components
        .compile_with_failover(&intakes, &switches, &services, &BTreeMap::new())
        .expect("compiled");
    let targets = compiled.routes.remove("devices").expect("devices routed");
    let Target::Transform(region) = &targets[0] else {
        panic!("the route transform first")
    };
    assert!(
        region
            .outputs
            .iter()
            .flatten()
            .any(|target| matches!(target, Target::Failover(_))),
        "eu is a failover hop"
    );
    // Without a registry no device has the label: everything is `_unmatched` (us). Send
    // straight through the eu output's targets instead.
    let eu_targets: Vec<Target> = region.outputs[0].clone();
    let output = SourceOutput::new(eu_targets);
    let event = event_json(br#"{"device":"eu-1","seq":1}"#);
    let count = |rx: &mut crate::pipeline::IntakeReceiver| {
        std::iter::from_fn(|| rx.normal.try_recv().ok())
            .map(|item: Item| drop(item))
            .count()
    };
    output.send(event.clone(), false).await;
    switch.set(true);
    output.send(event.clone(), false).await;
    output.send(event.clone(), false).await;
    switch.set(false);
    output.send(event, false).await;
    assert_eq!(count(&mut eu_rx), 2);
    assert_eq!(count(&mut backup_rx), 2);
    assert_eq!(count(&mut us_rx), 0);
    assert_eq!(switch.redirected(), 2);
}
