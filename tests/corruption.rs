//! Damaged buffer segments: a segment truncated mid-record, or with flipped bytes, must
//! not stop the gateway: it starts, reports the damage (log and `corrupt/` directory),
//! and forwards the good records once the upstream is reachable.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

use common::{
    AckSender, BrokerOptions, Collector, Gateway, GatewayConfig, Mosquitto, Subscriber, free_port,
};

const MESSAGES: u64 = 500;
const DEVICE: &str = "corr-dev";

#[derive(Clone, Copy, Debug)]
enum Damage {
    /// Cut the last segment in the middle of a record.
    Truncate,
    /// Flip 8 bytes in the middle of the last segment.
    Flip,
}

async fn damaged_segment_is_survived(damage: Damage) {
    // A persistent subscriber session, saved while the broker is stopped, so nothing the
    // gateway publishes right after the broker comes back is missed.
    let mut broker = Mosquitto::start_with(
        free_port(),
        BrokerOptions {
            persistence: true,
            ..BrokerOptions::default()
        },
    )
    .await;
    let sub = Subscriber::connect_with(broker.port, "gateways/#", Some("corruption-sub")).await;
    broker.stop().await;

    // Build a backlog while the upstream is down, then crash.
    let config = GatewayConfig::new(broker.port).source("ack = true");
    let mut gateway = Gateway::start(&config.render()).await;
    let report = AckSender {
        window: 50,
        pad: 100,
        ..AckSender::new(config.device_addr(), DEVICE, MESSAGES)
    }
    .run()
    .await;
    assert_eq!(
        report.acked.len() as u64,
        MESSAGES,
        "not every message was acked before the crash: {:?}",
        &report.errors[..report.errors.len().min(5)]
    );
    gateway.kill9();

    let segments = gateway.segments("cloud", "normal");
    assert!(
        !segments.is_empty(),
        "no segment files under {}/buffers/cloud/normal/ after {MESSAGES} buffered events",
        gateway.data_dir.display()
    );
    let sizes: Vec<u64> = segments
        .iter()
        .map(|p| std::fs::metadata(p).expect("segment metadata").len())
        .collect();
    let total: u64 = sizes.iter().sum();
    let target = segments.last().expect("a segment");
    let target_len = *sizes.last().expect("a size");
    let before_target: u64 = total - target_len;
    // Odd offset in the middle of the file: inside a record.
    let offset = target_len / 2 + 3;
    match damage {
        Damage::Truncate => {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(target)
                .expect("open segment");
            file.set_len(offset).expect("truncate segment");
        }
        Damage::Flip => {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(target)
                .expect("open segment");
            let mut bytes = [0u8; 8];
            file.seek(SeekFrom::Start(offset)).expect("seek");
            file.read_exact(&mut bytes).expect("read");
            for b in &mut bytes {
                *b ^= 0xA5;
            }
            file.seek(SeekFrom::Start(offset)).expect("seek");
            file.write_all(&bytes).expect("write");
        }
    }
    eprintln!(
        "{damage:?}: {} segment(s), {total} bytes; damaged {} at offset {offset} of {target_len}",
        segments.len(),
        target.display()
    );

    // Restart on the damaged buffer, upstream still down: the gateway must start.
    gateway.restart().await;
    let stderr = gateway.stderr();
    let restart_log = stderr
        .rsplit("===== fieldgate run #2")
        .next()
        .unwrap_or("")
        .to_lowercase();
    assert!(
        ["corrupt", "torn", "truncat", "checksum", "crc"]
            .iter()
            .any(|w| restart_log.contains(w)),
        "the restart log does not report the damaged segment:\n{restart_log}"
    );
    let corrupt_dir = target.parent().expect("lane dir").join("corrupt");
    let kept: u64 = std::fs::read_dir(&corrupt_dir)
        .unwrap_or_else(|e| panic!("{} not created: {e}", corrupt_dir.display()))
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    assert!(
        kept > 0,
        "no bad bytes kept aside in {}",
        corrupt_dir.display()
    );
    let metrics = gateway.metrics().await;
    let reported: Vec<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && l.to_lowercase().contains("corrupt"))
        .collect();
    eprintln!("corruption metrics: {reported:?}; {kept} bytes in corrupt/");

    // Records wholly before the damage are good and must arrive. Records are of nearly
    // equal size (same device, same padding), so the damage offset tells how many.
    let good = ((before_target + offset) * MESSAGES / total).saturating_sub(2);
    assert!(
        good > 0,
        "{total} bytes for {MESSAGES} records leave no good record"
    );
    broker.start_again().await;
    let want: HashMap<String, BTreeSet<u64>> =
        HashMap::from([(DEVICE.to_string(), (1..=good).collect())]);
    let mut collector = Collector::default();
    collector
        .wait_all(&sub, &want, Duration::from_secs(60))
        .await;
    let arrived = collector.seen.get(DEVICE).cloned().unwrap_or_default();
    assert!(
        arrived.iter().all(|s| (1..=MESSAGES).contains(s)),
        "records that were never sent arrived: {:?}",
        arrived
            .iter()
            .filter(|s| !(1..=MESSAGES).contains(*s))
            .take(10)
            .collect::<Vec<_>>()
    );
    assert!(
        collector.order_violations().is_empty(),
        "{:?}",
        collector.order_violations()
    );
    eprintln!(
        "{damage:?}: {} of {MESSAGES} records forwarded (at least {good} expected), {} duplicates",
        arrived.len(),
        collector.duplicates()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_truncated_mid_record() {
    damaged_segment_is_survived(Damage::Truncate).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_with_flipped_bytes() {
    damaged_segment_is_survived(Damage::Flip).await;
}
