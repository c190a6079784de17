//! kill -9 of the gateway process mid-stream: devices in ack mode reconnect after the
//! restart and resend what was not acknowledged; every acknowledged message arrives
//! upstream (at-least-once: loss 0, duplicates counted and reported).

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{
    AckSender, Collector, Gateway, GatewayConfig, Mosquitto, Subscriber, device_names, eventually,
    free_port,
};
use tokio::time::Instant;

const DEVICES: usize = 4;
const PER_DEVICE: u64 = 5_000;
const KILL_AFTER_ACKS: u64 = 5_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acked_message_survives_kill_9() {
    let broker = Mosquitto::start(free_port()).await;
    let sub = Subscriber::connect(broker.port).await;
    let config = GatewayConfig::new(broker.port).source("ack = true");
    let mut gateway = Gateway::start(&config.render()).await;

    let started = Instant::now();
    let acks = Arc::new(AtomicU64::new(0));
    let names = device_names("k9", DEVICES);
    let senders: Vec<_> = names
        .iter()
        .map(|name| {
            tokio::spawn(
                AckSender {
                    addr: config.device_addr(),
                    device: name.clone(),
                    count: PER_DEVICE,
                    window: 200,
                    pad: 64,
                    acks: Arc::clone(&acks),
                    reconnect: true,
                    limit: Duration::from_secs(180),
                }
                .run(),
            )
        })
        .collect();

    let reached = eventually(Duration::from_secs(60), || {
        (acks.load(Ordering::SeqCst) >= KILL_AFTER_ACKS).then_some(())
    })
    .await;
    assert!(
        reached.is_some(),
        "only {} acks within 60 s, wanted {KILL_AFTER_ACKS} before the kill",
        acks.load(Ordering::SeqCst)
    );
    gateway.kill9();
    let acked_at_kill = acks.load(Ordering::SeqCst);
    let total = DEVICES as u64 * PER_DEVICE;
    eprintln!("kill -9 after {acked_at_kill} of {total} acks");
    assert!(
        acked_at_kill < total,
        "the stream finished before the kill; the test did not kill mid-stream"
    );

    gateway.restart().await;

    let mut acked: HashMap<String, BTreeSet<u64>> = HashMap::new();
    let mut connections = 0;
    let mut sent = 0;
    for (name, sender) in names.iter().zip(senders) {
        let report = sender.await.expect("sender task");
        assert_eq!(
            report.acked.len() as u64,
            PER_DEVICE,
            "{name}: only {} of {PER_DEVICE} acked after the restart (nacked {}, errors {:?})",
            report.acked.len(),
            report.nacked.len(),
            &report.errors[..report.errors.len().min(5)]
        );
        connections += report.connections;
        sent += report.sent;
        acked.insert(name.clone(), report.acked);
    }
    assert!(
        connections as usize > DEVICES,
        "devices never had to reconnect: was the gateway really killed?"
    );

    // Loss 0: every acknowledged message arrives upstream.
    let mut collector = Collector::default();
    collector
        .wait_all(&sub, &acked, Duration::from_secs(120))
        .await;
    let duplicates = collector.duplicates();
    eprintln!(
        "kill -9 test: {total} acked, {sent} written by devices ({} resent), {} distinct upstream, \
         {duplicates} duplicates upstream, loss 0, {connections} connections, {:?}",
        sent.saturating_sub(total),
        collector.distinct(),
        started.elapsed()
    );
    let violations = collector.order_violations();
    assert!(
        violations.is_empty(),
        "per-device order of first arrivals broken: {violations:?}"
    );
}
