//! Upstream outage: with the broker down, devices in ack mode keep being acknowledged
//! (the disk buffer absorbs the backlog); once the broker is back on the same port,
//! everything arrives, in per-device order.

mod common;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use common::{
    AckSender, BrokerOptions, Collector, Gateway, GatewayConfig, Mosquitto, Subscriber,
    device_names, expected, free_port,
};
use tokio::time::Instant;

const DEVICES: usize = 10;
const PER_DEVICE: u64 = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_messages_sent_during_an_outage_all_arrive() {
    let mut broker = Mosquitto::start_with(
        free_port(),
        BrokerOptions {
            persistence: true,
            ..BrokerOptions::default()
        },
    )
    .await;
    // A persistent session: the broker (persistence on, stopped with SIGTERM) keeps the
    // subscription and queues for it whatever the gateway publishes before the
    // subscriber is back.
    let sub = Subscriber::connect_with(broker.port, "gateways/#", Some("outage-subscriber")).await;
    let config = GatewayConfig::new(broker.port).source("ack = true");
    let gateway = Gateway::start(&config.render()).await;
    let connected = [("sink", "cloud")];
    gateway
        .wait_metric(
            "fieldgate_upstream_connected",
            &connected,
            Duration::from_secs(30),
            |v| v == 1.0,
        )
        .await;

    broker.stop().await;
    gateway
        .wait_metric(
            "fieldgate_upstream_connected",
            &connected,
            Duration::from_secs(30),
            |v| v == 0.0,
        )
        .await;

    // Devices are not blocked while the buffer has room: every message is acked while
    // the upstream is down.
    let started = Instant::now();
    let acks = Arc::new(AtomicU64::new(0));
    let names = device_names("out", DEVICES);
    let senders: Vec<_> = names
        .iter()
        .map(|name| {
            tokio::spawn(
                AckSender {
                    addr: config.device_addr(),
                    device: name.clone(),
                    count: PER_DEVICE,
                    window: 100,
                    pad: 32,
                    acks: Arc::clone(&acks),
                    reconnect: false,
                    limit: Duration::from_secs(60),
                }
                .run(),
            )
        })
        .collect();
    for (name, sender) in names.iter().zip(senders) {
        let report = sender.await.expect("sender task");
        assert_eq!(
            report.acked.len() as u64,
            PER_DEVICE,
            "{name}: only {} of {PER_DEVICE} acked while the upstream was down (nacked {}, errors {:?})",
            report.acked.len(),
            report.nacked.len(),
            &report.errors[..report.errors.len().min(5)]
        );
    }
    eprintln!(
        "{} messages acked during the outage in {:?}",
        DEVICES as u64 * PER_DEVICE,
        started.elapsed()
    );
    assert_eq!(
        gateway
            .metric("fieldgate_upstream_connected", &connected)
            .await,
        Some(0.0),
        "upstream must still be down"
    );
    let buffered = gateway
        .metric("fieldgate_buffer_events", &[("sink", "cloud")])
        .await
        .expect("fieldgate_buffer_events{sink=\"cloud\"}");
    assert!(
        buffered >= (DEVICES as u64 * PER_DEVICE) as f64,
        "fieldgate_buffer_events = {buffered} during the outage"
    );

    let outage_end = Instant::now();
    broker.start_again().await;
    gateway
        .wait_metric(
            "fieldgate_upstream_connected",
            &connected,
            Duration::from_secs(30),
            |v| v == 1.0,
        )
        .await;

    let want = expected(&names, PER_DEVICE);
    let mut collector = Collector::default();
    collector
        .wait_all(&sub, &want, Duration::from_secs(120))
        .await;
    eprintln!(
        "backlog of {} delivered {:?} after the broker came back; {} duplicates",
        DEVICES as u64 * PER_DEVICE,
        outage_end.elapsed(),
        collector.duplicates()
    );
    let violations = collector.order_violations();
    assert!(
        violations.is_empty(),
        "per-device order broken across the outage: {violations:?}"
    );
    gateway
        .wait_metric(
            "fieldgate_buffer_events",
            &[("sink", "cloud")],
            Duration::from_secs(30),
            |v| v == 0.0,
        )
        .await;
}
