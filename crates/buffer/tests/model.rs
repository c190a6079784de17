//! Property test: random operation sequences against a `VecDeque`-like model, for the disk
//! queue (with reopens and simulated `kill -9` snapshots) and the memory queue.
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a failed unwrap is a test failure; casts to u8 build test patterns"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use fieldgate_buffer::{BufferError, DiskQueue, DiskQueueOptions, MemoryQueue, Queue};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Append(usize, u8),
    Flush,
    Sync,
    ReadNext,
    /// `next_unread` then `skip_read`: a record taken from the sink's in-memory copy.
    SkipRead,
    AckLive(usize),
    AckAny(u64),
    Rewind,
    Evict,
    Reopen,
    CrashProbe,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0usize..300, any::<u8>()).prop_map(|(len, byte)| Op::Append(len, byte)),
        1 => Just(Op::Flush),
        1 => Just(Op::Sync),
        6 => Just(Op::ReadNext),
        3 => Just(Op::SkipRead),
        4 => any::<usize>().prop_map(Op::AckLive),
        1 => (0u64..200).prop_map(Op::AckAny),
        1 => Just(Op::Rewind),
        1 => Just(Op::Evict),
        1 => Just(Op::Reopen),
        1 => Just(Op::CrashProbe),
    ]
}

/// What the queue should hold.
#[derive(Default)]
struct Model {
    /// Unacked, not evicted records.
    live: BTreeMap<u64, Vec<u8>>,
    /// Every record ever appended.
    all: BTreeMap<u64, Vec<u8>>,
    /// `read_next` returns the first live record with id >= this.
    cursor: u64,
    /// Ids acked or evicted.
    gone: BTreeSet<u64>,
    /// `gone` as of the last sync or clean reopen (what the ack file says).
    gone_persisted: BTreeSet<u64>,
    /// Every id below this was explicitly flushed.
    flushed_below: u64,
    /// Id of the next append.
    next_id: u64,
}

impl Model {
    fn persist(&mut self) {
        self.gone_persisted = self.gone.clone();
        self.flushed_below = self.next_id;
    }
}

fn payload(len: usize, byte: u8, id: u64) -> Vec<u8> {
    (0..len).map(|i| byte ^ (i as u8) ^ (id as u8)).collect()
}

fn options(max_bytes: u64, segment_bytes: u64) -> DiskQueueOptions {
    DiskQueueOptions {
        max_bytes,
        segment_bytes,
        max_record_bytes: 1024,
    }
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

fn run(ops: Vec<Op>, mut queue: Queue, dir: Option<&Path>, opts: DiskQueueOptions) {
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Append(len, byte) => {
                let record = payload(len, byte, model.next_id);
                match queue.append(&record) {
                    Ok(id) => {
                        assert_eq!(id, model.next_id, "ids are consecutive");
                        model.next_id += 1;
                        model.live.insert(id, record.clone());
                        model.all.insert(id, record);
                    }
                    Err(BufferError::Full {
                        needed, available, ..
                    }) => {
                        assert!(needed > available);
                        assert!(queue.bytes() + needed > opts.max_bytes);
                    }
                    Err(other) => panic!("append failed: {other}"),
                }
            }
            Op::Flush => {
                queue.flush().unwrap();
                model.flushed_below = model.next_id;
            }
            Op::Sync => {
                queue.sync().unwrap();
                model.persist();
            }
            Op::ReadNext => {
                let expected = model.live.range(model.cursor..).next();
                let got = queue.read_next().unwrap();
                match (expected, &got) {
                    (None, None) => {}
                    (Some((&id, record)), Some((got_id, got_record))) => {
                        assert_eq!(*got_id, id);
                        assert_eq!(&got_record[..], &record[..]);
                        model.cursor = id + 1;
                    }
                    _ => panic!("read_next: expected {expected:?}, got {got:?}"),
                }
            }
            Op::SkipRead => {
                let expected = model.live.range(model.cursor..).next().map(|(&id, _)| id);
                let got = queue.next_unread();
                assert_eq!(got, expected, "next_unread");
                if let Some(id) = got {
                    queue.skip_read(id);
                    model.cursor = id + 1;
                }
            }
            Op::AckLive(index) => {
                if !model.live.is_empty() {
                    let id = *model.live.keys().nth(index % model.live.len()).unwrap();
                    queue.ack(id).unwrap();
                    model.live.remove(&id);
                    model.gone.insert(id);
                }
            }
            Op::AckAny(id) => {
                queue.ack(id).unwrap();
                if model.live.remove(&id).is_some() {
                    model.gone.insert(id);
                }
            }
            Op::Rewind => {
                queue.rewind();
                model.cursor = 0;
            }
            Op::Evict => {
                let evicted = queue.evict_oldest().unwrap();
                if !model.live.is_empty() {
                    assert!(evicted.records > 0, "eviction must make progress");
                }
                for _ in 0..evicted.records {
                    let (id, _) = model.live.pop_first().expect("evicted more than held");
                    model.gone.insert(id);
                }
            }
            Op::Reopen => {
                if let (Queue::Disk(_), Some(dir)) = (&queue, dir) {
                    drop(queue);
                    let (reopened, report) = DiskQueue::open(dir, opts).unwrap();
                    queue = Queue::Disk(reopened);
                    assert_eq!(report.records, model.live.len() as u64);
                    assert_eq!(report.truncated_bytes, 0);
                    assert!(report.quarantined.is_empty());
                    model.cursor = 0;
                    model.persist();
                }
            }
            Op::CrashProbe => {
                if let Some(dir) = dir {
                    crash_probe(dir, opts, &model);
                }
            }
        }
        assert_eq!(queue.len(), model.live.len() as u64);
        assert_eq!(queue.is_empty(), model.live.is_empty());
        assert!(queue.bytes() <= opts.max_bytes);
    }
    if let (Queue::Disk(_), Some(dir)) = (&queue, dir) {
        queue.sync().unwrap();
        drop(queue);
        let (mut reopened, report) = DiskQueue::open(dir, opts).unwrap();
        assert_eq!(report.records, model.live.len() as u64);
        let mut got = Vec::new();
        while let Some((id, record)) = reopened.read_next().unwrap() {
            got.push((id, record.to_vec()));
        }
        let expected: Vec<(u64, Vec<u8>)> = model.live.into_iter().collect();
        assert_eq!(
            got, expected,
            "reopen after sync keeps exactly the unacked records"
        );
        assert_eq!(reopened.take_corrupt_skipped(), 0);
    }
}

/// Opens a copy of the directory as the disk holds it right now (what a `kill -9` leaves).
fn crash_probe(dir: &Path, opts: DiskQueueOptions, model: &Model) {
    let copy = tempfile::tempdir().unwrap();
    copy_dir(dir, copy.path());
    let (mut recovered, report) = DiskQueue::open(copy.path(), opts).unwrap();
    assert_eq!(report.truncated_bytes, 0, "flushed data is whole");
    let mut got = Vec::new();
    while let Some((id, record)) = recovered.read_next().unwrap() {
        assert_eq!(
            Some(&record.to_vec()),
            model.all.get(&id),
            "record {id} after crash"
        );
        assert!(
            !model.gone_persisted.contains(&id),
            "record {id} was acked and synced, yet came back"
        );
        got.push(id);
    }
    assert!(got.windows(2).all(|pair| pair[0] < pair[1]), "in order");
    let got: BTreeSet<u64> = got.into_iter().collect();
    for &id in model.live.keys().filter(|&&id| id < model.flushed_below) {
        assert!(
            got.contains(&id),
            "flushed unacked record {id} lost in crash"
        );
    }
    assert_eq!(recovered.take_corrupt_skipped(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn disk_queue_matches_model(
        ops in proptest::collection::vec(op(), 1..120),
        max_bytes in 600u64..20_000,
        segment_bytes in 0u64..1500,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(max_bytes, segment_bytes);
        let (queue, report) = DiskQueue::open(dir.path(), opts).unwrap();
        prop_assert_eq!(report.records, 0);
        run(ops, Queue::Disk(queue), Some(dir.path()), opts);
    }

    #[test]
    fn memory_queue_matches_model(
        ops in proptest::collection::vec(op(), 1..120),
        max_bytes in 0u64..5_000,
    ) {
        run(ops, Queue::Memory(MemoryQueue::new(max_bytes)), None, options(max_bytes, 0));
    }
}
