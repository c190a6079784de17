//! The runtime of stateful transforms: state across reloads (kept or reset), no
//! instance leaked over 1,000 reloads, checkpoints on disk, and ticks delivered.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fieldgate_core::EventKind;

use super::*;
use crate::pipeline::{Intake, IntakeReceiver, SourceOutput, intake};
use crate::topology::graph::Config;
use crate::transforms::alarm::{AlarmBoard, AlarmFilter};
use crate::transforms::tests::reading;

fn config(transforms: &str) -> Config {
    let text = format!(
        "[gateway]\nid = \"gw\"\n\n[sources.devices]\ntype = \"tcp\"\naddress = \"127.0.0.1:7000\"\n\n\
         {transforms}\n\n[sinks.out]\ntype = \"file\"\ninputs = [\"overheat\"]\n"
    );
    crate::config::parse("test.toml", &text, |_| None).expect("valid config")
}

fn threshold(above: f64, extra: &str) -> String {
    format!(
        "[transforms.overheat]\ntype = \"alarm\"\ninputs = [\"devices\"]\ndetector = \"threshold\"\n\
         field = \"temp\"\nabove = {above}\nclear_below = 75.0\n{extra}"
    )
}

struct Harness {
    runtime: TransformRuntime,
    services: TransformServices,
    intakes: BTreeMap<String, Intake>,
    receiver: IntakeReceiver,
    output: SourceOutput,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::in_dir(dir)
    }

    fn in_dir(dir: tempfile::TempDir) -> Self {
        let metrics = Arc::new(Metrics::new());
        let (sender, receiver) = intake();
        Self {
            runtime: TransformRuntime::new(dir.path(), Arc::clone(&metrics)),
            services: TransformServices {
                registry: None,
                metrics,
                alarms: Arc::new(AlarmBoard::default()),
                actions: None,
            },
            intakes: BTreeMap::from([("out".to_owned(), sender)]),
            receiver,
            output: SourceOutput::default(),
            _dir: dir,
        }
    }

    /// What a reload does: prepare, compile, swap the routes, commit.
    async fn apply(&mut self, config: &Config) -> Vec<Weak<dyn EventTransform>> {
        let prepared = self
            .runtime
            .prepare(&config.components, &self.services)
            .expect("prepared");
        let weak = prepared.transforms().values().map(Arc::downgrade).collect();
        let mut compiled = config
            .components
            .compile(&self.intakes, &self.services, &prepared.transforms())
            .expect("compiled");
        self.output
            .replace(compiled.routes.remove("devices").unwrap_or_default());
        self.runtime.commit(prepared, &compiled.nodes).await;
        weak
    }

    async fn send(&self, device: &str, temp: f64) {
        self.output
            .send(reading(device, 1, &format!("{{\"temp\":{temp}}}")), false)
            .await;
    }

    /// `fieldgate_alarms_active` of the test rule.
    fn active_gauge(&self) -> String {
        let text = self.services.metrics.encode();
        text.lines()
            .find(|line| line.starts_with("fieldgate_alarms_active{transform=\"overheat\""))
            .unwrap_or_default()
            .to_owned()
    }

    fn active(&self) -> usize {
        self.services
            .alarms
            .list(&AlarmFilter {
                active: true,
                ..AlarmFilter::default()
            })
            .len()
    }
}

#[tokio::test]
async fn a_thousand_reloads_keep_the_state_and_leak_no_instance() {
    let mut harness = Harness::new();
    let mut instances = harness.apply(&config(&threshold(80.0, ""))).await;
    harness.send("a", 90.0).await;
    assert_eq!(harness.active(), 1);
    let configs = [config(&threshold(80.0, "")), config(&threshold(81.0, ""))];
    for round in 0..1_000 {
        // Every reload changes the transform: a new instance each time, handed the state.
        instances.extend(harness.apply(&configs[(round + 1) % 2]).await);
    }
    let alive = instances
        .iter()
        .filter(|instance| instance.strong_count() > 0)
        .count();
    assert_eq!(instances.len(), 1_001);
    assert_eq!(alive, 1, "only the running instance is alive");
    assert_eq!(harness.services.alarms.rules(), 1);
    assert_eq!(harness.runtime.running(), 1);
    assert_eq!(harness.active(), 1, "the alarm survived every reload");
    assert!(
        harness.active_gauge().ends_with("} 1"),
        "{}",
        harness.active_gauge()
    );
    // Unchanged config: the same instance keeps running.
    let before = harness.apply(&configs[0]).await;
    let after = harness.apply(&configs[0]).await;
    assert!(Weak::ptr_eq(&before[0], &after[0]));
}

#[tokio::test]
async fn reset_starts_empty_on_change_and_keep_is_the_default() {
    let mut harness = Harness::new();
    harness
        .apply(&config(&threshold(80.0, "state_on_change = \"reset\"")))
        .await;
    harness.send("a", 90.0).await;
    assert_eq!(harness.active(), 1);
    // Same config: nothing changes, the alarm stays.
    harness
        .apply(&config(&threshold(80.0, "state_on_change = \"reset\"")))
        .await;
    assert_eq!(harness.active(), 1);
    harness
        .apply(&config(&threshold(82.0, "state_on_change = \"reset\"")))
        .await;
    assert_eq!(harness.active(), 0);
    assert!(
        harness.active_gauge().ends_with("} 0"),
        "{}",
        harness.active_gauge()
    );
}

#[tokio::test]
async fn checkpoints_restore_at_start_unless_reset_and_changed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().to_owned();
    {
        let mut harness = Harness::in_dir(tempfile::tempdir().expect("temp dir"));
        harness.runtime = TransformRuntime::new(&path, Arc::clone(&harness.services.metrics));
        harness.apply(&config(&threshold(80.0, ""))).await;
        harness.send("a", 90.0).await;
        harness.runtime.checkpoint_all().await;
    }
    let file = path.join("transforms").join("overheat.state");
    let bytes = std::fs::read(&file).expect("checkpoint written");
    assert!(bytes.starts_with(MAGIC));
    let start = |transforms: String| {
        let path = path.clone();
        async move {
            let mut harness = Harness::in_dir(tempfile::tempdir().expect("temp dir"));
            harness.runtime = TransformRuntime::new(&path, Arc::clone(&harness.services.metrics));
            harness.apply(&config(&transforms)).await;
            harness.active()
        }
    };
    assert_eq!(start(threshold(80.0, "")).await, 1, "restored");
    assert_eq!(
        start(threshold(85.0, "")).await,
        1,
        "kept across a config change"
    );
    assert_eq!(
        start(threshold(85.0, "state_on_change = \"reset\"")).await,
        0,
        "reset: changed since the checkpoint"
    );
    assert_eq!(
        start(threshold(80.0, "state_on_change = \"reset\"")).await,
        1,
        "reset, but unchanged"
    );
    // A torn or foreign file: logged, started empty, never a panic.
    std::fs::write(&file, b"garbage").expect("write");
    assert_eq!(start(threshold(80.0, "")).await, 0);
    std::fs::write(&file, [MAGIC, b"abc\n{not json"].concat()).expect("write");
    assert_eq!(start(threshold(80.0, "")).await, 0);
}

#[tokio::test]
async fn ticks_are_delivered_to_the_outputs() {
    let mut harness = Harness::new();
    let missing = "[transforms.overheat]\ntype = \"alarm\"\ninputs = [\"devices\"]\ndetector = \"missing\"\n\
                   field = \"temp\"\ninterval = \"100ms\"\ncount = 1\n";
    harness.apply(&config(missing)).await;
    let mut event = reading("quiet", 1, r#"{"temp":1}"#);
    event.received_at_ms = crate::clock::now_ms();
    harness.output.send(event, false).await;
    let telemetry = harness
        .receiver
        .normal
        .recv()
        .await
        .expect("passed through");
    assert_eq!(telemetry.event.kind, EventKind::Telemetry);
    let alarm = tokio::time::timeout(Duration::from_secs(10), harness.receiver.high.recv())
        .await
        .expect("a missing-data alarm within 10s")
        .expect("an event");
    assert_eq!(alarm.event.kind, EventKind::Alarm);
    let payload: serde_json::Value = serde_json::from_slice(&alarm.event.payload).expect("json");
    assert_eq!(payload["detector"], "missing");
    assert_eq!(payload["device"], "quiet");
    harness.runtime.stop_tickers().await;
}

#[test]
fn hostile_names_stay_in_the_directory() {
    assert_eq!(file_name("overheat"), "overheat.state");
    for name in ["../etc/passwd", "", ".hidden", "a/b", "é"] {
        let file = file_name(name);
        assert!(
            file.starts_with("x-") && !file.contains('/'),
            "{name}: {file}"
        );
    }
}

#[tokio::test]
async fn an_unchanged_state_is_not_written_again() {
    let mut harness = Harness::new();
    harness.apply(&config(&threshold(80.0, ""))).await;
    harness.send("a", 90.0).await;
    let file = harness
        ._dir
        .path()
        .join("transforms")
        .join("overheat.state");
    harness.runtime.checkpoint_all().await;
    let modified = |file: &Path| {
        std::fs::metadata(file)
            .and_then(|meta| meta.modified())
            .expect("written")
    };
    let first = modified(&file);
    harness.runtime.checkpoint_all().await;
    assert_eq!(modified(&file), first, "same state: no write");
    harness.send("a", 10.0).await;
    harness.runtime.checkpoint_all().await;
    let text = std::fs::read_to_string(&file).expect("readable");
    assert!(
        text.contains("cleared"),
        "a changed state is written: {text}"
    );
}
