//! Self-tests of the scripted fake broker (tests/common/fake_broker.rs) against rumqttc's
//! clients (a well-behaved peer) and a raw codec client, so that a failing cloud-link
//! test can be trusted to point at the gateway, not at the fake.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use common::eventually;
use common::fake_broker::{FakeBroker, Kind, Match, Protocol, Refuse, RelReply, Reply, Script};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

const LIMIT: Duration = Duration::from_secs(10);

/// A rumqttc 3.1.1 client whose event loop runs in a task, recording events as text.
struct V4 {
    client: rumqttc::AsyncClient,
    events: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl V4 {
    fn start(
        broker: &FakeBroker,
        id: &str,
        clean: bool,
        configure: impl FnOnce(&mut rumqttc::MqttOptions),
    ) -> Self {
        let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", broker.port);
        options.set_keep_alive(Duration::from_secs(5));
        options.set_clean_session(clean);
        configure(&mut options);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 100);
        let events = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let events = Arc::clone(&events);
            tokio::spawn(async move {
                loop {
                    let event = eventloop.poll().await;
                    let failed = event.is_err();
                    events.lock().expect("lock").push(match event {
                        Ok(event) => format!("{event:?}"),
                        Err(err) => format!("error: {err}"),
                    });
                    if failed {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            })
        };
        V4 {
            client,
            events,
            task,
        }
    }

    /// Waits until some event's text contains `needle`.
    async fn saw(&self, needle: &str) -> bool {
        eventually(LIMIT, || {
            self.events
                .lock()
                .expect("lock")
                .iter()
                .any(|e| e.contains(needle))
                .then_some(())
        })
        .await
        .is_some()
    }

    fn events(&self) -> Vec<String> {
        self.events.lock().expect("lock").clone()
    }
}

impl Drop for V4 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A rumqttc MQTT 5 client, same shape.
struct V5 {
    client: rumqttc::v5::AsyncClient,
    events: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl V5 {
    fn start(
        broker: &FakeBroker,
        id: &str,
        configure: impl FnOnce(&mut rumqttc::v5::MqttOptions),
    ) -> Self {
        let mut options = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", broker.port);
        options.set_keep_alive(Duration::from_secs(5));
        configure(&mut options);
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 100);
        let events = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let events = Arc::clone(&events);
            tokio::spawn(async move {
                loop {
                    let event = eventloop.poll().await;
                    let failed = event.is_err();
                    events.lock().expect("lock").push(match event {
                        Ok(event) => format!("{event:?}"),
                        Err(err) => format!("error: {err}"),
                    });
                    if failed {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            })
        };
        V5 {
            client,
            events,
            task,
        }
    }

    async fn saw(&self, needle: &str) -> bool {
        eventually(LIMIT, || {
            self.events
                .lock()
                .expect("lock")
                .iter()
                .any(|e| e.contains(needle))
                .then_some(())
        })
        .await
        .is_some()
    }

    fn events(&self) -> Vec<String> {
        self.events.lock().expect("lock").clone()
    }
}

impl Drop for V5 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A raw MQTT 5 client on the codec: for what rumqttc's client will not do (send a
/// packet larger than the broker's limit, see a duplicated ack).
struct Raw {
    stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    async fn connect_v5(
        broker: &FakeBroker,
        id: &str,
    ) -> (Self, rumqttc::v5::mqttbytes::v5::ConnAck) {
        use rumqttc::v5::mqttbytes::v5::{Connect, Packet};
        let stream = TcpStream::connect(broker.addr()).await.expect("connect");
        let mut raw = Raw {
            stream,
            buf: BytesMut::new(),
        };
        let connect = Connect {
            keep_alive: 30,
            client_id: id.to_string(),
            clean_start: true,
            properties: None,
        };
        raw.send(Packet::Connect(connect, None, None)).await;
        match raw.recv().await {
            Some(Packet::ConnAck(ack)) => (raw, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn send(&mut self, packet: rumqttc::v5::mqttbytes::v5::Packet) {
        let mut out = BytesMut::new();
        packet.write(&mut out, None).expect("encode");
        self.stream.write_all(&out).await.expect("write");
    }

    /// The next packet, or None on EOF; panics after 10 s.
    async fn recv(&mut self) -> Option<rumqttc::v5::mqttbytes::v5::Packet> {
        use rumqttc::v5::mqttbytes::v5::Packet;
        loop {
            // DISCONNECT with a reason code and no property length (remaining length 1,
            // what mosquitto sends): legal MQTT 5, but rumqttc's reader waits for more.
            if self.buf.len() >= 3 && self.buf[0] == 0xE0 && self.buf[1] == 1 {
                let code = self.buf[2];
                self.buf.advance(3);
                let reason_code = code.try_into().expect("a known reason code");
                return Some(Packet::Disconnect(rumqttc::v5::mqttbytes::v5::Disconnect {
                    reason_code,
                    properties: None,
                }));
            }
            match Packet::read(&mut self.buf.clone(), None) {
                Ok(_) => return Some(Packet::read(&mut self.buf, None).expect("decode")),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(err) => panic!("decode: {err}"),
            }
            let read = tokio::time::timeout(LIMIT, self.stream.read_buf(&mut self.buf))
                .await
                .expect("a packet within 10 s")
                .expect("read");
            if read == 0 {
                return None;
            }
        }
    }
}

fn v5_publish(
    topic: &str,
    qos: rumqttc::v5::mqttbytes::QoS,
    id: u16,
    payload: Vec<u8>,
) -> rumqttc::v5::mqttbytes::v5::Packet {
    let mut publish = rumqttc::v5::mqttbytes::v5::Publish::new(topic, qos, payload, None);
    publish.pkid = id;
    rumqttc::v5::mqttbytes::v5::Packet::Publish(publish)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_connects_and_acks_qos1_and_qos2_on_3_1_1() {
    let broker = FakeBroker::start(Script::new()).await;
    let client = V4::start(&broker, "self-v4", false, |_| {});
    for i in 0..3 {
        client
            .client
            .publish("t/one", rumqttc::QoS::AtLeastOnce, false, format!("q1-{i}"))
            .await
            .expect("publish");
    }
    for i in 0..2 {
        client
            .client
            .publish("t/two", rumqttc::QoS::ExactlyOnce, true, format!("q2-{i}"))
            .await
            .expect("publish");
    }
    let done = broker
        .wait_for(LIMIT, |b| {
            let comps = b
                .packets()
                .iter()
                .filter(|p| p.kind == Kind::PubRel)
                .count();
            (b.deliveries().len() == 5 && comps == 2).then_some(())
        })
        .await;
    assert!(done.is_some(), "deliveries: {:?}", broker.deliveries());
    assert!(client.saw("PubComp").await, "{:?}", client.events());

    let connects = broker.connects();
    assert_eq!(connects.len(), 1);
    assert_eq!(connects[0].client_id, "self-v4");
    assert_eq!(connects[0].protocol, Protocol::V311);
    assert!(!connects[0].clean);
    assert!(connects[0].accepted);
    assert!(!connects[0].session_present);
    let publishes = broker.publishes();
    assert_eq!(publishes.len(), 5);
    assert!(publishes.iter().all(|p| p.packet_id != 0 && !p.dup));
    assert_eq!(publishes[3].qos, 2);
    assert_eq!(publishes[3].text(), "q2-0");
    assert_eq!(broker.retained("t/two"), Some(Bytes::from("q2-1")));
    assert!(broker.qos2_pending("self-v4").is_empty());
    assert_eq!(broker.max_outstanding().min(5), broker.max_outstanding());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_reason_codes_connack_limits_and_user_properties() {
    let script = Script::new()
        .on(Match::payload("bad"), Reply::Code(0x87))
        .on_times(Match::topic("quota/#"), Reply::Code(0x97), Some(1))
        .max_packet_size(1000)
        .receive_maximum(7);
    let broker = FakeBroker::start(script).await;
    let client = V5::start(&broker, "self-v5", |_| {});
    assert!(client.saw("ConnAck").await, "{:?}", client.events());
    let connack = client
        .events()
        .into_iter()
        .find(|e| e.contains("ConnAck"))
        .expect("connack");
    assert!(connack.contains("max_packet_size: Some(1000)"), "{connack}");
    assert!(connack.contains("receive_max: Some(7)"), "{connack}");

    let properties = rumqttc::v5::mqttbytes::v5::PublishProperties {
        user_properties: vec![("id".into(), "ev-1".into())],
        ..Default::default()
    };
    client
        .client
        .publish_with_properties(
            "t/a",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "good",
            properties,
        )
        .await
        .expect("publish");
    client
        .client
        .publish(
            "t/b",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "bad",
        )
        .await
        .expect("publish");
    client
        .client
        .publish(
            "quota/x",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "q",
        )
        .await
        .expect("publish");
    client
        .client
        .publish(
            "quota/x",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "q",
        )
        .await
        .expect("publish");
    assert!(client.saw("NotAuthorized").await, "{:?}", client.events());
    assert!(client.saw("QuotaExceeded").await, "{:?}", client.events());
    let delivered = broker
        .wait_for(LIMIT, |b| {
            (b.deliveries().len() == 2).then(|| b.deliveries())
        })
        .await
        .expect("two deliveries");
    assert_eq!(delivered[0].payload, Bytes::from("good"));
    assert_eq!(
        delivered[0].user_properties,
        vec![("id".to_string(), "ev-1".to_string())]
    );
    assert_eq!(delivered[1].topic, "quota/x");
    let publishes = broker.publishes();
    assert_eq!(publishes[0].user_property("id"), Some("ev-1"));
    assert_eq!(broker.connects()[0].protocol, Protocol::V5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_packet_gets_disconnect_0x95_on_v5() {
    let broker = FakeBroker::start(Script::new().max_packet_size(1000)).await;
    let (mut raw, connack) = Raw::connect_v5(&broker, "raw-big").await;
    let max = connack.properties.and_then(|p| p.max_packet_size);
    assert_eq!(max, Some(1000));
    raw.send(v5_publish(
        "t/big",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        1,
        vec![b'x'; 2000],
    ))
    .await;
    match raw.recv().await {
        Some(rumqttc::v5::mqttbytes::v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code as u8, 0x95);
        }
        other => panic!("expected DISCONNECT 0x95, got {other:?}"),
    }
    assert!(raw.recv().await.is_none(), "closed after DISCONNECT");
    let oversized = broker.oversized();
    assert_eq!(oversized.len(), 1);
    assert!(oversized[0].size > 2000);
    assert!(broker.deliveries().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_packet_closes_a_3_1_1_connection() {
    let broker = FakeBroker::start(Script::new().max_packet_size(1000)).await;
    let client = V4::start(&broker, "big-v4", true, |_| {});
    client
        .client
        .publish("t/big", rumqttc::QoS::AtLeastOnce, false, vec![b'x'; 2000])
        .await
        .expect("publish");
    let closed = broker
        .wait_for(LIMIT, |b| (!b.oversized().is_empty()).then_some(()))
        .await;
    assert!(closed.is_some());
    assert!(client.saw("error").await, "{:?}", client.events());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_deferred_and_delayed_acks_on_the_wire() {
    let script = Script::new()
        .on(Match::payload("dup"), Reply::Duplicate)
        .on(Match::payload("defer"), Reply::Defer)
        .on(
            Match::payload("slow"),
            Reply::Delay(Duration::from_millis(300)),
        );
    let broker = FakeBroker::start(script).await;
    let (mut raw, _) = Raw::connect_v5(&broker, "raw-acks").await;
    use rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
    use rumqttc::v5::mqttbytes::v5::Packet;
    raw.send(v5_publish("t", AtLeastOnce, 1, b"dup".to_vec()))
        .await;
    for _ in 0..2 {
        match raw.recv().await {
            Some(Packet::PubAck(ack)) => assert_eq!(ack.pkid, 1),
            other => panic!("expected PUBACK 1, got {other:?}"),
        }
    }
    raw.send(v5_publish("t", AtLeastOnce, 2, b"defer".to_vec()))
        .await;
    raw.send(v5_publish("t", AtLeastOnce, 3, b"slow".to_vec()))
        .await;
    raw.send(v5_publish("t", AtLeastOnce, 4, b"plain".to_vec()))
        .await;
    let mut order = Vec::new();
    for _ in 0..3 {
        match raw.recv().await {
            Some(Packet::PubAck(ack)) => order.push(ack.pkid),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    // 4 is acked at once, the deferred 2 right after it, the delayed 3 last.
    assert_eq!(order, vec![4, 2, 3]);
    assert_eq!(broker.deliveries().len(), 4);
    assert_eq!(broker.max_outstanding(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_session_survives_a_disconnect_at_pubrel_and_counts_once() {
    // The first PUBREL is dropped with the connection: rumqttc reconnects with its
    // session and resends the PUBREL; the message is delivered exactly once.
    let script = Script::new().on_pubrel(Some(0), RelReply::Disconnect, None);
    let broker = FakeBroker::start(script).await;
    let client = V4::start(&broker, "self-q2", false, |_| {});
    client
        .client
        .publish("t/q2", rumqttc::QoS::ExactlyOnce, false, "once")
        .await
        .expect("publish");
    assert!(client.saw("PubComp").await, "{:?}", client.events());
    let connects = broker.connects();
    assert_eq!(connects.len(), 2, "{connects:?}");
    assert!(connects[1].session_present, "{connects:?}");
    let rels: Vec<_> = broker
        .packets()
        .into_iter()
        .filter(|p| p.kind == Kind::PubRel)
        .collect();
    assert_eq!(rels.len(), 2);
    assert_eq!(rels[0].packet_id, rels[1].packet_id);
    assert_eq!(broker.deliveries().len(), 1);
    assert!(broker.qos2_pending("self-q2").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_resend_of_a_stored_id_is_not_a_second_delivery() {
    let broker = FakeBroker::start(Script::new().on(Match::any().nth(0), Reply::Disconnect)).await;
    let (mut raw, _) = Raw::connect_v5(&broker, "raw-q2").await;
    use rumqttc::v5::mqttbytes::QoS::ExactlyOnce;
    use rumqttc::v5::mqttbytes::v5::Packet;
    raw.send(v5_publish("t", ExactlyOnce, 9, b"x".to_vec()))
        .await;
    assert!(raw.recv().await.is_none(), "scripted disconnect");
    assert_eq!(
        broker.deliveries().len(),
        1,
        "stored on receipt, then disconnected"
    );

    let broker = FakeBroker::start(Script::new().on(Match::any().nth(0), Reply::Withhold)).await;
    let (mut raw, _) = Raw::connect_v5(&broker, "raw-q2b").await;
    raw.send(v5_publish("t", ExactlyOnce, 9, b"x".to_vec()))
        .await;
    let mut dup = v5_publish("t", ExactlyOnce, 9, b"x".to_vec());
    if let Packet::Publish(p) = &mut dup {
        p.dup = true;
    }
    raw.send(dup).await;
    match raw.recv().await {
        Some(Packet::PubRec(rec)) => assert_eq!(rec.pkid, 9),
        other => panic!("expected PUBREC 9, got {other:?}"),
    }
    assert_eq!(broker.deliveries().len(), 1);
    assert_eq!(broker.qos2_pending("raw-q2b"), vec![9]);
    raw.send(Packet::PubRel(rumqttc::v5::mqttbytes::v5::PubRel::new(
        9, None,
    )))
    .await;
    match raw.recv().await {
        Some(Packet::PubComp(comp)) => assert_eq!(comp.pkid, 9),
        other => panic!("expected PUBCOMP 9, got {other:?}"),
    }
    assert!(broker.qos2_pending("raw-q2b").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_connects_then_accepts_and_restarts_on_the_same_port() {
    let mut broker = FakeBroker::start(Script::new().refuse_connects(2, Refuse::Code(5))).await;
    let client = V4::start(&broker, "self-refused", true, |o| {
        o.set_last_will(rumqttc::LastWill::new(
            "will/t",
            "gone",
            rumqttc::QoS::AtLeastOnce,
            true,
        ));
    });
    assert!(client.saw("ConnAck").await, "{:?}", client.events());
    let connects = broker.connects();
    assert_eq!(connects.len(), 3, "{connects:?}");
    assert!(!connects[0].accepted && !connects[1].accepted && connects[2].accepted);
    assert!(
        client.events().iter().any(|e| e.contains("refused")),
        "{:?}",
        client.events()
    );
    assert_eq!(
        connects[2].will.as_ref().map(|w| w.topic.as_str()),
        Some("will/t")
    );

    let port = broker.port;
    broker.stop().await;
    assert_eq!(
        broker.wills().len(),
        1,
        "the will is published when the broker drops the link"
    );
    assert_eq!(broker.retained("will/t"), Some(Bytes::from("gone")));
    broker.start_again().await;
    assert_eq!(broker.port, port);
    let back = broker
        .wait_for(LIMIT, |b| (b.accepted_connects() == 2).then_some(()))
        .await;
    assert!(back.is_some(), "{:?}", broker.connects());

    // Accepting, then dropping at once.
    broker.script(|s| *s = Script::new().drop_after_connack(2));
    broker.disconnect_all();
    let flapped = broker
        .wait_for(LIMIT, |b| (b.accepted_connects() >= 5).then_some(()))
        .await;
    assert!(flapped.is_some(), "{:?}", broker.connects());
    let drops = broker
        .closed()
        .iter()
        .filter(|c| c.why.contains("after CONNACK"))
        .count();
    assert_eq!(drops, 2, "{:?}", broker.closed());

    // Refusing by closing the socket.
    broker.script(|s| *s = Script::new().refuse_connects(u64::MAX, Refuse::Close));
    broker.disconnect_all();
    let refused = broker
        .wait_for(LIMIT, |b| {
            (b.connects().iter().filter(|c| !c.accepted).count() >= 4).then_some(())
        })
        .await;
    assert!(refused.is_some(), "{:?}", broker.connects());
    broker.behave();
    let back = broker
        .wait_for(LIMIT, |b| (b.accepted_connects() == 6).then_some(()))
        .await;
    assert!(back.is_some(), "{:?}", broker.connects());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withheld_acks_measure_the_clients_window() {
    let broker = FakeBroker::start(Script::new().on(Match::any(), Reply::Withhold)).await;
    let client = V4::start(&broker, "self-window", false, |o| {
        o.set_inflight(10);
    });
    for i in 0..20 {
        client
            .client
            .publish("t", rumqttc::QoS::AtLeastOnce, false, format!("{i}"))
            .await
            .expect("publish");
    }
    let ten = broker
        .wait_for(LIMIT, |b| (b.publishes().len() >= 10).then_some(()))
        .await;
    assert!(ten.is_some());
    assert_eq!(broker.max_outstanding(), 10, "rumqttc keeps 10 in flight");
    assert!(
        broker.deliveries().is_empty(),
        "withheld QoS 1 is not delivered"
    );
    broker.behave();
    broker.disconnect_all();
    // With its session kept, rumqttc resends the 10 and sends the rest. (With a clean
    // session, rumqttc 0.25 drops the 10 and then sends nothing more: not the fake's
    // doing, and one more reason the sink owns its client state.)
    let all = broker
        .wait_for(Duration::from_secs(20), |b| {
            let mut payloads: Vec<String> = b
                .deliveries()
                .iter()
                .map(|d| String::from_utf8_lossy(&d.payload).into_owned())
                .collect();
            payloads.sort();
            payloads.dedup();
            (payloads.len() == 20).then_some(())
        })
        .await;
    assert!(
        all.is_some(),
        "{} deliveries; packets: {:?}; client: {:?}",
        broker.deliveries().len(),
        broker
            .packets()
            .iter()
            .map(|p| format!(
                "#{} {:?} {} dup={} {} {}",
                p.conn,
                p.kind,
                p.packet_id,
                p.dup,
                p.text(),
                p.answer
            ))
            .collect::<Vec<_>>(),
        client.events()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_publishes_to_a_client_and_records_its_acks() {
    let broker = FakeBroker::start(Script::new()).await;
    let client = V4::start(&broker, "self-cmd", true, |_| {});
    client
        .client
        .subscribe("cmd/#", rumqttc::QoS::ExactlyOnce)
        .await
        .expect("subscribe");
    let subscribed = broker
        .wait_for(LIMIT, |b| {
            b.is_subscribed("self-cmd", "cmd/#").then_some(())
        })
        .await;
    assert!(subscribed.is_some());
    let id1 = broker
        .publish_to("self-cmd", "cmd/a", b"one", 1)
        .expect("connected");
    let id2 = broker
        .publish_to("self-cmd", "cmd/b", b"two", 2)
        .expect("connected");
    assert_ne!(id1, id2);
    let acked = broker
        .wait_for(LIMIT, |b| {
            let out = b.outbound();
            out.iter().all(|o| o.acked_at.is_some()).then_some(out)
        })
        .await
        .expect("both acked");
    assert!(acked[1].pubrec_at.is_some(), "QoS 2 went through PUBREC");
    assert!(client.saw("cmd/a").await && client.saw("cmd/b").await);
    assert!(broker.publish_to("nobody", "cmd/c", b"x", 1).is_none());
}

#[test]
fn topic_filters_match_like_mqtt() {
    use common::fake_broker::topic_matches;
    assert!(topic_matches("a/+/c", "a/b/c"));
    assert!(topic_matches("a/#", "a/b/c"));
    assert!(topic_matches("#", "a"));
    assert!(!topic_matches("a/+", "a/b/c"));
    assert!(!topic_matches("a/b", "a"));
    assert!(topic_matches(
        "gateways/+/devices/+/telemetry",
        "gateways/gw-1/devices/d/telemetry"
    ));
}

/// A raw MQTT 5 PUBLISH at QoS 2 with the DUP flag as given.
fn q2(id: u16, dup: bool) -> rumqttc::v5::mqttbytes::v5::Packet {
    let mut packet = v5_publish(
        "t",
        rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
        id,
        format!("m{id}").into_bytes(),
    );
    if let rumqttc::v5::mqttbytes::v5::Packet::Publish(p) = &mut packet {
        p.dup = dup;
    }
    packet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubrel_replies_and_ping_suppression_on_the_wire() {
    use rumqttc::v5::mqttbytes::v5::{Packet, PingReq, PubRel};
    let script = Script::new()
        .on_pubrel(Some(0), RelReply::NoComp, None)
        .on_pubrel(Some(1), RelReply::Code(0x92), None)
        .on_pubrel(Some(2), RelReply::Duplicate, None)
        .on_pubrel(Some(3), RelReply::Delay(Duration::from_millis(200)), None)
        .no_pings();
    let broker = FakeBroker::start(script).await;
    let (mut raw, _) = Raw::connect_v5(&broker, "raw-rel").await;
    for id in 1..=4 {
        raw.send(q2(id, false)).await;
        match raw.recv().await {
            Some(Packet::PubRec(rec)) => assert_eq!(rec.pkid, id),
            other => panic!("expected PUBREC {id}, got {other:?}"),
        }
    }
    // No PUBCOMP for 1: the PUBCOMP for 2 (reason 0x92) is the next packet.
    raw.send(Packet::PubRel(PubRel::new(1, None))).await;
    raw.send(Packet::PubRel(PubRel::new(2, None))).await;
    match raw.recv().await {
        Some(Packet::PubComp(comp)) => assert_eq!(
            (comp.pkid, format!("{:?}", comp.reason)),
            (2, "PacketIdentifierNotFound".into())
        ),
        other => panic!("expected PUBCOMP 2, got {other:?}"),
    }
    raw.send(Packet::PubRel(PubRel::new(3, None))).await;
    for _ in 0..2 {
        match raw.recv().await {
            Some(Packet::PubComp(comp)) => assert_eq!(comp.pkid, 3),
            other => panic!("expected PUBCOMP 3 twice, got {other:?}"),
        }
    }
    // A PINGREQ gets no answer: the delayed PUBCOMP for 4 is the next packet.
    let sent = tokio::time::Instant::now();
    raw.send(Packet::PubRel(PubRel::new(4, None))).await;
    raw.send(Packet::PingReq(PingReq)).await;
    match raw.recv().await {
        Some(Packet::PubComp(comp)) => assert_eq!(comp.pkid, 4),
        other => panic!("expected PUBCOMP 4, got {other:?}"),
    }
    assert!(sent.elapsed() >= Duration::from_millis(200));
    // Id 1 was released without PUBCOMP: reusing it now is a violation.
    assert!(broker.violations().is_empty());
    raw.send(q2(1, false)).await;
    match raw.recv().await {
        Some(Packet::PubRec(rec)) => assert_eq!(rec.pkid, 1),
        other => panic!("expected PUBREC 1, got {other:?}"),
    }
    let violations = broker.violations();
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert!(
        violations[0].contains("PUBCOMP is still owed"),
        "{violations:?}"
    );
    assert!(broker.qos2_pending("raw-rel").contains(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_maximum_and_packet_id_reuse_are_enforced() {
    use rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
    use rumqttc::v5::mqttbytes::v5::Packet;
    let script = Script::new()
        .receive_maximum(2)
        .on(Match::any(), Reply::Withhold);
    let broker = FakeBroker::start(script).await;
    let (mut raw, connack) = Raw::connect_v5(&broker, "raw-rmax").await;
    assert_eq!(connack.properties.and_then(|p| p.receive_max), Some(2));
    raw.send(v5_publish("t", AtLeastOnce, 1, b"a".to_vec()))
        .await;
    // The same id again with DUP is a resend, without DUP a reuse.
    let mut resend = v5_publish("t", AtLeastOnce, 1, b"a".to_vec());
    if let Packet::Publish(p) = &mut resend {
        p.dup = true;
    }
    raw.send(resend).await;
    raw.send(v5_publish("t", AtLeastOnce, 1, b"a".to_vec()))
        .await;
    raw.send(v5_publish("t", AtLeastOnce, 2, b"b".to_vec()))
        .await;
    raw.send(v5_publish("t", AtLeastOnce, 3, b"c".to_vec()))
        .await;
    match raw.recv().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason_code as u8, 0x93),
        other => panic!("expected DISCONNECT 0x93, got {other:?}"),
    }
    assert!(raw.recv().await.is_none());
    assert_eq!(broker.max_outstanding(), 3);
    let violations = broker.violations();
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert!(violations[0].contains("unfinished"), "{violations:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_code_closes_a_3_1_1_link_and_disconnect_with_sends_a_reason() {
    let broker = FakeBroker::start(Script::new().on(Match::any(), Reply::Code(0x87))).await;
    let client = V4::start(&broker, "self-neg", true, |_| {});
    client
        .client
        .publish("t", rumqttc::QoS::AtLeastOnce, false, "x")
        .await
        .expect("publish");
    let closed = broker
        .wait_for(LIMIT, |b| {
            b.closed()
                .iter()
                .any(|c| c.why.contains("no negative ack"))
                .then_some(())
        })
        .await;
    assert!(closed.is_some(), "{:?}", broker.closed());
    assert!(broker.deliveries().is_empty());

    let broker =
        FakeBroker::start(Script::new().on(Match::any(), Reply::DisconnectWith(0x89))).await;
    let (mut raw, _) = Raw::connect_v5(&broker, "raw-busy").await;
    raw.send(v5_publish(
        "t",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        1,
        b"x".to_vec(),
    ))
    .await;
    match raw.recv().await {
        Some(rumqttc::v5::mqttbytes::v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code as u8, 0x89);
        }
        other => panic!("expected DISCONNECT 0x89, got {other:?}"),
    }
    assert!(broker.deliveries().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_session_lives_by_its_expiry_and_a_second_client_takes_it_over() {
    // Clean start off but no session expiry: the session ends with the connection.
    let broker = FakeBroker::start(Script::new()).await;
    let first = V5::start(&broker, "self-exp", |o| {
        o.set_clean_start(false);
    });
    assert!(first.saw("ConnAck").await);
    drop(first);
    let closed = broker
        .wait_for(LIMIT, |b| (!b.closed().is_empty()).then_some(()))
        .await;
    assert!(closed.is_some());
    let second = V5::start(&broker, "self-exp", |o| {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(60));
    });
    assert!(second.saw("ConnAck").await);
    let third = V5::start(&broker, "self-exp", |o| {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(60));
    });
    assert!(
        third.saw("session_present: true").await,
        "{:?}",
        third.events()
    );
    let connects = broker.connects();
    assert!(!connects[1].session_present, "{connects:?}");
    let taken = broker
        .wait_for(LIMIT, |b| {
            b.closed()
                .iter()
                .any(|c| c.why == "session taken over")
                .then_some(())
        })
        .await;
    assert!(taken.is_some(), "{:?}", broker.closed());
    drop(second);
}
