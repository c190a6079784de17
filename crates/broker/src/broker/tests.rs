//! Broker state tests, one behaviour each, named after the specification's sections.

use bytes::Bytes;

use super::*;
use crate::codec::MessageProperties;

fn params(client: &str, connection: u64, clean: bool, expiry: u32) -> SessionParams {
    SessionParams {
        client_id: Arc::from(client),
        connection,
        clean_start: clean,
        session_expiry: expiry,
        receive_maximum: 10,
    }
}

fn filter(text: &str, qos: u8) -> SubscribeFilter {
    SubscribeFilter {
        filter: text.into(),
        qos,
        no_local: false,
        retain_as_published: false,
        retain_handling: 0,
    }
}

fn message(topic: &str, qos: u8, retain: bool) -> Arc<Message> {
    Arc::new(Message {
        topic: topic.into(),
        payload: Bytes::from_static(b"p"),
        qos,
        retain,
        properties: MessageProperties::default(),
    })
}

fn allow(_: &str) -> bool {
    true
}

fn delivered(broker: &mut Broker, client: &str, connection: u64) -> Vec<(u8, bool, Vec<u32>)> {
    broker
        .take(client, connection, 100, 0)
        .unwrap()
        .0
        .into_iter()
        .filter_map(|out| match out {
            Outgoing::Publish { delivery, .. } => {
                Some((delivery.qos, delivery.retain, delivery.subscription_ids))
            }
            Outgoing::PubRel { .. } => None,
        })
        .collect()
}

#[test]
fn mqtt_3_1_4_takeover_names_the_old_connection() {
    let mut broker = Broker::new(BrokerLimits::default());
    assert_eq!(broker.connect(&params("c", 1, true, 0)).taken_over, None);
    let second = broker.connect(&params("c", 2, false, 0));
    assert_eq!(second.taken_over, Some(1));
    assert!(second.session_present);
    // The old connection can no longer act on the session, nor end it.
    assert!(!broker.disconnect("c", 1, 0, 0));
    assert_eq!(broker.session_count(), 1);
    assert!(broker.disconnect("c", 2, 0, 0));
    assert_eq!(broker.session_count(), 0);
}

#[test]
fn mqtt_3_3_5_delivery_downgrades_and_merges_overlapping_subscriptions() {
    let mut broker = Broker::new(BrokerLimits::default());
    broker.connect(&params("s", 1, true, 0));
    broker
        .subscribe("s", 1, Some(7), &[filter("a/+", 0)], &allow, 0)
        .unwrap();
    broker
        .subscribe("s", 1, Some(8), &[filter("a/#", 1)], &allow, 0)
        .unwrap();
    let outcome = broker.publish(None, message("a/b", 2, false), 0);
    assert_eq!(outcome.woken, vec![1]);
    let got = delivered(&mut broker, "s", 1);
    assert_eq!(got.len(), 1, "one copy per client");
    assert_eq!(
        got[0].0, 1,
        "the best subscription QoS, below the publish's"
    );
    let mut ids = got[0].2.clone();
    ids.sort_unstable();
    assert_eq!(ids, vec![7, 8]);
}

#[test]
fn mqtt5_3_8_3_1_no_local_and_retain_as_published() {
    let mut broker = Broker::new(BrokerLimits::default());
    broker.connect(&params("me", 1, true, 0));
    let mut own = filter("t", 1);
    own.no_local = true;
    broker.subscribe("me", 1, None, &[own], &allow, 0).unwrap();
    assert!(
        broker
            .publish(Some("me"), message("t", 1, false), 0)
            .woken
            .is_empty()
    );
    broker.connect(&params("rap", 2, true, 0));
    let mut keep = filter("t", 1);
    keep.retain_as_published = true;
    broker
        .subscribe("rap", 2, None, &[keep], &allow, 0)
        .unwrap();
    broker.publish(Some("me"), message("t", 1, true), 0);
    assert!(delivered(&mut broker, "rap", 2)[0].1);
    let mut plain = filter("u", 1);
    plain.no_local = false;
    broker
        .subscribe("rap", 2, None, &[plain], &allow, 0)
        .unwrap();
    broker.publish(Some("me"), message("u", 1, true), 0);
    assert!(!delivered(&mut broker, "rap", 2)[0].1);
    let mut shared = filter("$share/g/t", 1);
    shared.no_local = true;
    assert_eq!(
        broker.subscribe("rap", 2, None, &[shared], &allow, 0),
        Err(BrokerError::NoLocalOnShared)
    );
}

#[test]
fn mqtt5_3_3_1_3_retained_messages_and_retain_handling() {
    let mut broker = Broker::new(BrokerLimits::default());
    broker.publish(None, message("r/1", 1, true), 0);
    broker.connect(&params("s", 1, true, 0));
    let (codes, queued) = broker
        .subscribe("s", 1, None, &[filter("r/#", 1)], &allow, 0)
        .unwrap();
    assert_eq!(codes, vec![1]);
    assert!(queued);
    assert_eq!(delivered(&mut broker, "s", 1), vec![(1, true, vec![])]);
    // Retain handling 1: only for a new subscription.
    let mut again = filter("r/#", 1);
    again.retain_handling = 1;
    let (_, queued) = broker.subscribe("s", 1, None, &[again], &allow, 0).unwrap();
    assert!(!queued);
    let mut never = filter("r/+", 1);
    never.retain_handling = 2;
    let (_, queued) = broker.subscribe("s", 1, None, &[never], &allow, 0).unwrap();
    assert!(!queued);
    // An empty retained payload deletes (and is still forwarded).
    let empty = Arc::new(Message {
        payload: Bytes::new(),
        ..(*message("r/1", 0, true)).clone()
    });
    broker.publish(None, empty, 0);
    assert_eq!(broker.retained_count(), 0);
}

#[test]
fn mqtt_4_1_offline_persistent_session_queues_qos1_not_qos0_and_is_bounded() {
    let limits = BrokerLimits {
        max_queued: 2,
        ..BrokerLimits::default()
    };
    let mut broker = Broker::new(limits);
    broker.connect(&params("p", 1, true, 60));
    broker
        .subscribe("p", 1, None, &[filter("t", 1)], &allow, 0)
        .unwrap();
    assert!(broker.disconnect("p", 1, 60, 0));
    broker.publish(None, message("t", 0, false), 0);
    broker.publish(None, message("t", 1, false), 0);
    broker.publish(None, message("t", 1, false), 0);
    let outcome = broker.publish(None, message("t", 1, false), 0);
    assert_eq!(
        outcome.dropped, 1,
        "the third QoS 1 message exceeds the queue"
    );
    let resumed = broker.connect(&params("p", 2, false, 60));
    assert!(resumed.session_present);
    assert_eq!(delivered(&mut broker, "p", 2).len(), 2);
}

#[test]
fn mqtt5_3_1_2_11_2_session_expiry_ends_offline_sessions() {
    let mut broker = Broker::new(BrokerLimits::default());
    broker.connect(&params("p", 1, true, 2));
    broker
        .subscribe("p", 1, None, &[filter("t", 1)], &allow, 0)
        .unwrap();
    broker.disconnect("p", 1, 2, 1000);
    broker.tick(2999);
    assert_eq!(broker.session_count(), 1);
    broker.tick(3000);
    assert_eq!(broker.session_count(), 0);
    assert_eq!(broker.subscription_count(), 0);
}

#[test]
fn mqtt5_3_1_3_2_2_delayed_will_is_cancelled_by_a_reconnect() {
    let mut broker = Broker::new(BrokerLimits::default());
    broker.connect(&params("w", 1, true, 100));
    broker.disconnect("w", 1, 100, 0);
    broker.delay_will("w", (*message("will", 0, false)).clone(), 5, 0);
    assert!(broker.tick(4000).is_empty());
    broker.connect(&params("w", 2, false, 100));
    assert!(broker.tick(6000).is_empty());
    broker.disconnect("w", 2, 100, 6000);
    broker.delay_will("w", (*message("will", 0, false)).clone(), 5, 6000);
    assert_eq!(broker.tick(11_000).len(), 1);
}

#[test]
fn mqtt5_4_8_2_shared_subscription_reaches_one_member_in_turn() {
    let mut broker = Broker::new(BrokerLimits::default());
    for (client, connection) in [("a", 1), ("b", 2)] {
        broker.connect(&params(client, connection, true, 0));
        broker
            .subscribe(
                client,
                connection,
                None,
                &[filter("$share/g/t", 1)],
                &allow,
                0,
            )
            .unwrap();
    }
    let mut reached = Vec::new();
    for _ in 0..4 {
        let outcome = broker.publish(None, message("t", 1, false), 0);
        assert_eq!(outcome.woken.len(), 1);
        reached.push(outcome.woken[0]);
    }
    assert!(reached.contains(&1) && reached.contains(&2));
}

#[test]
fn subscription_quota_and_acl_codes() {
    let limits = BrokerLimits {
        max_subscriptions: 1,
        ..BrokerLimits::default()
    };
    let mut broker = Broker::new(limits);
    broker.connect(&params("s", 1, true, 0));
    let deny = |filter: &str| filter != "secret";
    let (codes, _) = broker
        .subscribe(
            "s",
            1,
            None,
            &[
                filter("a", 1),
                filter("b", 1),
                filter("secret", 1),
                filter("a/#/b", 0),
            ],
            &deny,
            0,
        )
        .unwrap();
    assert_eq!(codes, vec![1, 0x97, 0x87, 0x8F]);
    assert_eq!(
        broker
            .unsubscribe("s", 1, &["a".into(), "zzz".into()])
            .unwrap(),
        vec![0x00, 0x11]
    );
}
