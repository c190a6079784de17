//! The buffer's hot path: append 100-byte records, flush them to the OS, read them back and
//! ack them, on disk (in a temporary directory) and in memory. A cycle of 512 is one group
//! of the gateway's buffer writer; a cycle of 1 is the low-load worst case.
//!
//! `cargo bench -p fieldgate-buffer --bench queue`

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput};
use fieldgate_buffer::{DiskQueue, DiskQueueOptions, MemoryQueue, Queue};

const RECORD: [u8; 100] = [0x42; 100];
const MAX_BYTES: u64 = 1024 * 1024 * 1024;

/// Appends `count` records, flushes, then reads and acks all of them.
fn cycle(queue: &mut Queue, count: usize) {
    for _ in 0..count {
        queue.append(black_box(&RECORD)).expect("append");
    }
    queue.flush().expect("flush");
    for _ in 0..count {
        let (id, record) = queue.read_next().expect("read").expect("a record");
        black_box(&record);
        queue.ack(id).expect("ack");
    }
}

fn queue(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut group = c.benchmark_group("queue");
    for count in [1usize, 512] {
        group.throughput(Throughput::Elements(count as u64));
        let (disk, _report) = DiskQueue::open(
            &dir.path().join(format!("disk-{count}")),
            DiskQueueOptions::new(MAX_BYTES),
        )
        .expect("open disk queue");
        let mut disk = Queue::Disk(disk);
        group.bench_with_input(
            BenchmarkId::new("disk_append_flush_read_ack", count),
            &count,
            |b, &count| {
                b.iter(|| cycle(&mut disk, count));
            },
        );
        let mut memory = Queue::Memory(MemoryQueue::new(MAX_BYTES));
        group.bench_with_input(
            BenchmarkId::new("memory_append_flush_read_ack", count),
            &count,
            |b, &count| {
                b.iter(|| cycle(&mut memory, count));
            },
        );
    }
    group.finish();
}

// A plain `main` instead of `criterion_group!`, whose generated function has no doc comment.
fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    queue(&mut criterion);
    criterion.final_summary();
}
