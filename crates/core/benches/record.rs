//! The buffer record form of an event: `Event::encode` on the way into the buffer,
//! `Event::decode` on the way out to a sink (75-byte JSON payload).
//!
//! `cargo bench -p fieldgate-core --bench record`

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput};
use fieldgate_core::{DeviceId, Event, EventKind, PayloadFormat};

const PAYLOAD: &[u8] =
    b"{\"device\":\"dev-0001\",\"kind\":\"telemetry\",\"seq\":123456,\"temp\":21.5,\"rh\":405}\n";

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

fn record(c: &mut Criterion) {
    let event = event();
    let mut group = c.benchmark_group("record");
    group.throughput(Throughput::Elements(1));
    let mut out = BytesMut::with_capacity(1024);
    group.bench_function("encode", |b| {
        b.iter(|| {
            out.clear();
            black_box(&event).encode(&mut out);
            black_box(out.len())
        });
    });
    let mut encoded = BytesMut::new();
    event.encode(&mut encoded);
    let encoded = encoded.freeze();
    group.bench_function("decode", |b| {
        b.iter(|| Event::decode(black_box(encoded.clone())));
    });
    group.finish();
}

// A plain `main` instead of `criterion_group!`, whose generated function has no doc comment.
fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    record(&mut criterion);
    criterion.final_summary();
}
