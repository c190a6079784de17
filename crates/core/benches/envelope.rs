//! The northbound hot path: the JSON envelope (or raw payload) a sink publishes, one event
//! or a batch of 200, and rumqttc's MQTT 3.1.1 PUBLISH packet serialization around it.
//!
//! `cargo bench -p fieldgate-core --bench envelope`

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput};
use fieldgate_core::envelope::{OutputFormat, write_batch, write_event};
use fieldgate_core::{DeviceId, Event, EventKind, PayloadFormat};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::Publish;

const PAYLOAD: &[u8] =
    b"{\"device\":\"dev-0001\",\"kind\":\"telemetry\",\"seq\":123456,\"temp\":21.5,\"rh\":405}";
const TOPIC: &str = "gateways/gw-1/devices/dev-0001/telemetry";
const BATCH: usize = 200;

fn event() -> Event {
    let mut event = Event::new(
        DeviceId::new("dev-0001"),
        EventKind::Telemetry,
        "devices".into(),
        1_764_143_349_123,
        PayloadFormat::Json,
        Bytes::from_static(PAYLOAD),
    );
    event.device_time_ms = Some(1_764_143_349_000);
    event
}

fn envelope(c: &mut Criterion) {
    let event = event();
    let events = vec![event.clone(); BATCH];
    let mut out = Vec::with_capacity(64 * 1024);

    let mut group = c.benchmark_group("envelope");
    group.throughput(Throughput::Elements(1));
    group.bench_function("write_event/envelope", |b| {
        b.iter(|| {
            out.clear();
            write_event(OutputFormat::Envelope, black_box(&event), &mut out);
            out.len()
        });
    });
    group.bench_function("write_event/raw", |b| {
        b.iter(|| {
            out.clear();
            write_event(OutputFormat::Raw, black_box(&event), &mut out);
            out.len()
        });
    });
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("write_batch_200/envelope", |b| {
        b.iter(|| {
            out.clear();
            write_batch(OutputFormat::Envelope, black_box(&events), &mut out);
            out.len()
        });
    });
    group.finish();

    out.clear();
    write_event(OutputFormat::Envelope, &event, &mut out);
    let single = Bytes::copy_from_slice(&out);
    out.clear();
    write_batch(OutputFormat::Envelope, &events, &mut out);
    let batch = Bytes::copy_from_slice(&out);

    let mut group = c.benchmark_group("mqtt_v4_publish");
    group.throughput(Throughput::Elements(1));
    let mut wire = BytesMut::with_capacity(64 * 1024);
    for (name, payload) in [("one_event", &single), ("batch_200", &batch)] {
        let mut packet = Publish::new(TOPIC, QoS::AtLeastOnce, payload.to_vec());
        packet.pkid = 42;
        group.bench_function(format!("write/{name}"), |b| {
            b.iter(|| {
                wire.clear();
                black_box(&packet).write(&mut wire)
            });
        });
    }
    // What the sink does per event: envelope, copy into `Bytes`, a packet owning its topic,
    // then the event loop serializes it (the socket write is not included).
    group.bench_function("envelope_and_write/one_event", |b| {
        b.iter(|| {
            out.clear();
            write_event(OutputFormat::Envelope, black_box(&event), &mut out);
            let mut packet =
                Publish::from_bytes(TOPIC, QoS::AtLeastOnce, Bytes::copy_from_slice(&out));
            packet.pkid = 42;
            wire.clear();
            packet.write(&mut wire)
        });
    });
    group.finish();
}

// A plain `main` instead of `criterion_group!`, whose generated function has no doc comment.
fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    envelope(&mut criterion);
    criterion.final_summary();
}
