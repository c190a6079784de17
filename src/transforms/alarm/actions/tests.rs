//! Action tasks against real peers in-process: a device session in the directory, a
//! stand-in broker, a webhook receiver that never answers; and the bookkeeping of
//! failures (metrics, the alarm's last error, drops when the queue is full).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fieldgate_core::DeviceId;

use super::*;
use crate::config::Context;
use crate::devices::directory::ConnectionSignal;
use crate::devices::local_brokers::LocalPublish;

const WAIT: Duration = Duration::from_secs(10);

fn plans(text: &str) -> Vec<ActionPlan> {
    #[derive(serde::Deserialize)]
    struct Actions {
        actions: Vec<ActionConfig>,
    }
    let actions: Actions = toml::from_str(text).expect("valid toml");
    config::compile("overheat", &actions.actions, &Context::running()).expect("valid actions")
}

fn labels(action: &str) -> AlarmActionLabels {
    AlarmActionLabels {
        rule: "overheat".into(),
        action: action.into(),
    }
}

struct Harness {
    services: ActionServices,
    metrics: Metrics,
    status: Arc<ActionStatus>,
    set: ActionSet,
}

fn harness(text: &str, commands: Option<Arc<CommandDispatcher>>) -> Harness {
    harness_on(text, Arc::new(DeviceDirectory::default()), commands)
}

fn harness_on(
    text: &str,
    directory: Arc<DeviceDirectory>,
    commands: Option<Arc<CommandDispatcher>>,
) -> Harness {
    let services = ActionServices::new(Arc::default(), directory, commands);
    let metrics = Metrics::new();
    let status = Arc::new(ActionStatus::new(100));
    let set = ActionSet::start(
        &Arc::from("overheat"),
        "major",
        plans(text),
        Some(&services),
        &metrics,
        Arc::clone(&status),
    );
    Harness {
        services,
        metrics,
        status,
        set,
    }
}

impl Harness {
    fn count(&self, family: &str, action: &str) -> u64 {
        let family = match family {
            "successes" => &self.metrics.alarm_action_successes,
            "failures" => &self.metrics.alarm_action_failures,
            "dropped" => &self.metrics.alarm_actions_dropped,
            _ => &self.metrics.alarm_action_retries,
        };
        family.get_or_create(&labels(action)).get()
    }

    async fn wait_count(&self, family: &str, action: &str, at_least: u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.count(family, action) < at_least {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{family}{{action={action}}} stayed at {}",
                self.count(family, action)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn job(device: &str, transition: Transition, at_ms: u64) -> Job {
    Job {
        transition,
        device: DeviceId::new(device),
        payload: Bytes::from_static(br#"{"rule":"overheat","state":"raised"}"#),
        at_ms,
    }
}

#[tokio::test]
async fn a_command_reaches_the_connected_device_and_an_offline_one_fails() {
    let harness = harness(
        r#"[[actions]]
type = "command"
device = "plc-1"
command = "write"
args = { point = "fan", value = true }
on = ["raise"]"#,
        None,
    );
    let signal = Arc::new(ConnectionSignal::default());
    harness
        .services
        .directory
        .register(DeviceId::new("plc-1"), 7, &signal);
    harness.set.fire(&job("boiler-1", Transition::Raise, 1000));
    // A clear does not run an action that is `on = ["raise"]`.
    harness.set.fire(&job("boiler-1", Transition::Clear, 2000));
    harness.wait_count("successes", "command", 1).await;
    let command = harness.services.directory.take_command(7).expect("queued");
    assert_eq!(command.name, "write");
    assert_eq!(command.id, "alarm.overheat.boiler-1.raise.1000");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(command.params.get()).expect("json"),
        serde_json::json!({"point": "fan", "value": true})
    );
    assert!(harness.services.directory.take_command(7).is_none());

    harness
        .services
        .directory
        .unregister(&DeviceId::new("plc-1"), 7);
    harness.set.fire(&job("boiler-1", Transition::Raise, 3000));
    harness.wait_count("failures", "command", 1).await;
    let shown = harness.status.of(&DeviceId::new("boiler-1"));
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert_eq!(shown[0].action, "command");
    assert_eq!(shown[0].on, "raise");
    assert!(shown[0].error.contains("device offline"), "{shown:?}");
    assert!(shown[0].error.contains("plc-1"), "{shown:?}");

    // The same action succeeding again ends the failure.
    harness
        .services
        .directory
        .register(DeviceId::new("plc-1"), 8, &signal);
    harness.set.fire(&job("boiler-1", Transition::Raise, 4000));
    harness.wait_count("successes", "command", 2).await;
    assert!(harness.status.of(&DeviceId::new("boiler-1")).is_empty());
}

struct Recorder(Mutex<Vec<(String, Bytes, u8, bool)>>);

impl LocalPublish for Recorder {
    fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        qos: u8,
        retain: bool,
    ) -> Result<usize, LocalPublishError> {
        if topic.contains('+') {
            return Err(LocalPublishError::BadTopic {
                topic: topic.into(),
                reason: "wildcard".into(),
            });
        }
        self.0
            .lock()
            .expect("lock")
            .push((topic.to_owned(), payload, qos, retain));
        Ok(1)
    }
}

#[tokio::test]
async fn mqtt_publishes_the_alarm_on_its_topic_and_fails_without_a_broker() {
    let harness = harness(
        r#"[[actions]]
type = "mqtt"
topic = "alarms/{rule}/{device}/{state}"
retain = true"#,
        None,
    );
    harness.set.fire(&job("boiler-1", Transition::Raise, 1));
    harness.wait_count("failures", "mqtt", 1).await;
    let shown = harness.status.of(&DeviceId::new("boiler-1"));
    assert!(
        shown[0].error.contains("0 mqtt_broker sources"),
        "{shown:?}"
    );

    let broker = Arc::new(Recorder(Mutex::default()));
    let local: Arc<dyn LocalPublish> = broker.clone();
    harness
        .services
        .brokers
        .attach("local", Arc::downgrade(&local));
    harness.set.fire(&job("boiler-1", Transition::Raise, 2));
    harness.set.fire(&job("boiler-1", Transition::Clear, 3));
    // A device id that would make a wildcard topic is refused by the broker: a failure.
    harness.set.fire(&job("a+b", Transition::Raise, 4));
    harness.wait_count("successes", "mqtt", 2).await;
    harness.wait_count("failures", "mqtt", 2).await;
    let published = broker.0.lock().expect("lock").clone();
    let topics: Vec<&str> = published.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(
        topics,
        [
            "alarms/overheat/boiler-1/raised",
            "alarms/overheat/boiler-1/cleared"
        ]
    );
    assert!(published.iter().all(|p| p.2 == 1 && p.3));
    assert_eq!(published[0].1, job("x", Transition::Raise, 0).payload);
    assert!(harness.status.of(&DeviceId::new("boiler-1")).is_empty());
}

#[tokio::test]
async fn a_full_queue_drops_counts_and_never_blocks_and_shutdown_counts_the_rest() {
    // A receiver that accepts connections (the kernel's backlog) but never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let harness = harness(
        &format!(
            r#"[[actions]]
type = "webhook"
name = "siren"
url = "http://127.0.0.1:{port}/"
timeout = "30s"
retries = 0"#
        ),
        None,
    );
    let started = tokio::time::Instant::now();
    for at in 0..(QUEUE as u64 + 50) {
        harness.set.fire(&job("boiler-1", Transition::Raise, at));
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "firing waited on the action"
    );
    let dropped = harness.count("dropped", "siren");
    assert!((49..=50).contains(&dropped), "dropped {dropped}");
    assert_eq!(harness.count("failures", "siren"), dropped);
    let shown = harness.status.of(&DeviceId::new("boiler-1"));
    assert!(shown[0].error.contains("queue"), "{shown:?}");

    harness.services.shutdown(Duration::from_secs(5)).await;
    // The one under way (if the task had started) and every queued one are abandoned,
    // counted.
    assert!(
        harness.count("dropped", "siren") + 1 >= QUEUE as u64 + 50,
        "every job is either dropped or was under way: {}",
        harness.count("dropped", "siren")
    );
    assert_eq!(harness.count("failures", "siren"), QUEUE as u64 + 50);
    assert_eq!(harness.count("successes", "siren"), 0);
    drop(silent);
}

#[test]
fn command_ids_stay_in_the_registry_alphabet_and_length() {
    let id = command_id("rule with spaces/é", &job("d", Transition::Clear, 42));
    assert_eq!(id, "alarm.rule_with_spaces__.d.clear.42");
    let long = command_id(&"r".repeat(300), &job("d", Transition::Raise, 7));
    assert_eq!(long.len(), 128);
    assert!(long.ends_with(".d.raise.7"));
}

/// With `[registry]` the command goes through the lifecycle (queued, sent, result) and
/// the action follows it: the device's "ok" is a success, its error and an expiry are
/// failures naming why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_registry_the_command_is_followed_to_its_end_state() {
    use fieldgate_registry::{NewDevice, Registry, RegistryOptions};
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Arc::new(
        Registry::open(RegistryOptions::new(
            dir.path().join("r.redb"),
            "gw".to_owned(),
        ))
        .expect("registry"),
    );
    registry
        .add_device(NewDevice {
            id: Some("plc-1".into()),
            ..NewDevice::default()
        })
        .expect("add plc-1");
    let directory = Arc::new(DeviceDirectory::default());
    let dispatcher = Arc::new(CommandDispatcher::new(
        Arc::clone(&registry),
        Arc::clone(&directory),
    ));
    let expiry = CancellationToken::new();
    let sweeper = tokio::spawn(Arc::clone(&dispatcher).run_expiry(expiry.clone()));
    let harness = harness_on(
        r#"[[actions]]
type = "command"
device = "plc-1"
command = "write"
args = { point = "fan", value = true }
ttl = "1s""#,
        Arc::clone(&directory),
        Some(Arc::clone(&dispatcher)),
    );
    let signal = Arc::new(ConnectionSignal::default());
    let plc = DeviceId::new("plc-1");
    directory.register(plc.clone(), 1, &signal);

    // The device answers ok: success.
    let answer = |status: &'static str| {
        let (directory, dispatcher, signal, plc) = (
            Arc::clone(&directory),
            Arc::clone(&dispatcher),
            Arc::clone(&signal),
            plc.clone(),
        );
        async move {
            let command = loop {
                match directory.take_command(1) {
                    Some(command) => break command,
                    None => signal.commands_waiting().await,
                }
            };
            dispatcher.delivered(&plc, &command.id).await;
            let frame = serde_json::json!({"type": "command_result", "id": command.id, "status": status, "error": "coil jammed"});
            dispatcher
                .result(&plc, &command.id, frame.to_string().as_bytes())
                .await;
            command.id
        }
    };
    harness.set.fire(&job("boiler-1", Transition::Raise, 1000));
    let id = tokio::time::timeout(WAIT, answer("ok"))
        .await
        .expect("command");
    harness.wait_count("successes", "command", 1).await;
    assert_eq!(
        registry.get_command("plc-1", &id).map(|c| c.state),
        Some(CommandState::Succeeded)
    );

    // The device answers with an error: a failure with the device's reason.
    harness.set.fire(&job("boiler-1", Transition::Clear, 2000));
    tokio::time::timeout(WAIT, answer("error"))
        .await
        .expect("command");
    harness.wait_count("failures", "command", 1).await;
    let shown = harness.status.of(&DeviceId::new("boiler-1"));
    assert!(shown[0].error.contains("coil jammed"), "{shown:?}");
    assert_eq!(shown[0].on, "clear");

    // Offline past the TTL: queued, then expired, a failure.
    directory.unregister(&plc, 1);
    harness.set.fire(&job("boiler-2", Transition::Raise, 3000));
    harness.wait_count("failures", "command", 2).await;
    let shown = harness.status.of(&DeviceId::new("boiler-2"));
    assert!(shown[0].error.contains("expired"), "{shown:?}");

    // An unknown target device is refused by the registry at once.
    let unknown = harness_on(
        "[[actions]]\ntype = \"command\"\ncommand = \"reboot\"",
        Arc::clone(&directory),
        Some(Arc::clone(&dispatcher)),
    );
    unknown.set.fire(&job("ghost-9", Transition::Raise, 4000));
    unknown.wait_count("failures", "command", 1).await;
    let shown = unknown.status.of(&DeviceId::new("ghost-9"));
    assert!(shown[0].error.contains("ghost-9"), "{shown:?}");
    expiry.cancel();
    sweeper.await.expect("sweeper");
}
