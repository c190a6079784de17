//! Cloud commands: a command published upstream reaches the connected device, the
//! device's result goes back up as a `command_result`; a command for an unknown device
//! gets an error result, never silence.

mod common;

use std::time::Duration;

use common::{Device, Gateway, GatewayConfig, Mosquitto, Msg, Subscriber, free_port};
use serde_json::{Value, json};
use tokio::time::Instant;

/// The envelope payload (or raw object) of a command_result message with `id`.
fn result_with_id(msgs: &[Msg], topic: &str, id: &str) -> Option<Value> {
    msgs.iter()
        .filter(|m| m.topic == topic)
        .flat_map(common::device_objects)
        .find(|p| p.get("id").and_then(Value::as_str) == Some(id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_reaches_device_and_result_goes_up() {
    let broker = Mosquitto::start(free_port()).await;
    let sub = Subscriber::connect(broker.port).await;
    let config = GatewayConfig::new(broker.port);
    let gateway = Gateway::start(&config.render()).await;
    gateway
        .wait_metric(
            "fieldgate_upstream_connected",
            &[("sink", "cloud")],
            Duration::from_secs(30),
            |v| v == 1.0,
        )
        .await;

    let mut device = Device::connect(config.device_addr())
        .await
        .expect("connect");
    let welcome = device.hello("dev-1").await;
    assert_eq!(welcome["device"], "dev-1", "{welcome}");

    // The gateway subscribes to the command topic after connecting; until its
    // subscription is in place a command may be missed, so publish again (same id)
    // until the device gets it, within a deadline.
    let command = json!({"id": "c-1", "name": "reboot", "params": {"delay": 5}});
    let deadline = Instant::now() + Duration::from_secs(30);
    let received = loop {
        sub.publish(
            "gateways/gw-1/devices/dev-1/commands",
            command.to_string(),
            false,
        )
        .await;
        match device.read_json(Duration::from_secs(2)).await {
            Ok(Some(frame)) if frame["type"] == "command" => break frame,
            Ok(Some(other)) => panic!("unexpected frame while waiting for the command: {other}"),
            Ok(None) => panic!("the gateway closed the device connection"),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                assert!(
                    Instant::now() < deadline,
                    "the command never reached the device within 30 s"
                );
            }
            Err(e) => panic!("device read failed: {e}"),
        }
    };
    assert_eq!(received["id"], "c-1", "{received}");
    assert_eq!(received["name"], "reboot", "{received}");
    assert_eq!(received["params"], json!({"delay": 5}), "{received}");

    device
        .send_json(&json!({"type": "command_result", "id": "c-1", "status": "ok", "uptime": 3}))
        .await
        .expect("send result");
    let topic = "gateways/gw-1/devices/dev-1/command_result";
    assert!(
        sub.wait_until(Duration::from_secs(30), |m| result_with_id(m, topic, "c-1")
            .is_some())
            .await,
        "no command_result for c-1 on {topic}; got topics {:?}",
        sub.messages()
            .iter()
            .map(|m| m.topic.clone())
            .collect::<Vec<_>>()
    );
    let result = result_with_id(&sub.messages(), topic, "c-1").expect("result");
    assert_eq!(result["status"], "ok", "{result}");
    assert_eq!(
        result["uptime"], 3,
        "the device's result is forwarded unchanged: {result}"
    );
    let envelope = sub
        .messages()
        .into_iter()
        .find(|m| m.topic == topic)
        .and_then(|m| m.json())
        .expect("envelope");
    assert_eq!(envelope["kind"], "command_result", "{envelope}");
    assert_eq!(envelope["device"], "dev-1", "{envelope}");

    // A command for a device that is not connected: an error result from the gateway.
    let ghost_topic = "gateways/gw-1/devices/ghost-7/command_result";
    sub.publish(
        "gateways/gw-1/devices/ghost-7/commands",
        json!({"id": "c-2", "name": "reboot", "params": {}}).to_string(),
        false,
    )
    .await;
    assert!(
        sub.wait_until(Duration::from_secs(30), |m| result_with_id(
            m,
            ghost_topic,
            "c-2"
        )
        .is_some())
            .await,
        "no command_result for the unknown device on {ghost_topic}; got {:?}",
        sub.messages()
            .iter()
            .map(|m| (m.topic.clone(), m.text()))
            .collect::<Vec<_>>()
    );
    let error = result_with_id(&sub.messages(), ghost_topic, "c-2").expect("result");
    assert_eq!(error["status"], "error", "{error}");
    assert!(
        error.get("error").and_then(Value::as_str).is_some(),
        "the error result says why: {error}"
    );

    // The device that disconnected is offline too.
    drop(device);
    let c3 = json!({"id": "c-3", "name": "reboot", "params": {}}).to_string();
    let dev1_result = "gateways/gw-1/devices/dev-1/command_result";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        sub.publish("gateways/gw-1/devices/dev-1/commands", c3.clone(), false)
            .await;
        if sub
            .wait_until(Duration::from_secs(2), |m| {
                result_with_id(m, dev1_result, "c-3").is_some()
            })
            .await
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no error result for a command to a disconnected device"
        );
    }
    let error = result_with_id(&sub.messages(), dev1_result, "c-3").expect("result");
    assert_eq!(error["status"], "error", "{error}");
}
