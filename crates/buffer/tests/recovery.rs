//! Crash recovery and corruption handling of the disk queue: torn tails at every length,
//! flipped bytes, arbitrary files, ack-driven deletion, `max_bytes` and eviction.
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a failed unwrap is a test failure; casts to u8 build test patterns"
)]

use std::fs;
use std::path::{Path, PathBuf};

use fieldgate_buffer::{BufferError, DiskQueue, DiskQueueOptions};
use proptest::prelude::*;

const FIRST_SEGMENT: &str = "00000000000000000000.seg";

fn options(max_bytes: u64, segment_bytes: u64) -> DiskQueueOptions {
    DiskQueueOptions {
        max_bytes,
        segment_bytes,
        max_record_bytes: 4096,
    }
}

fn record(id: u64) -> Vec<u8> {
    let len = (id * 7 % 23) as usize;
    (0..len)
        .map(|i| (id as u8).wrapping_mul(31) ^ i as u8)
        .collect()
}

/// Segment file names in `dir`, sorted.
fn segments(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".seg"))
        .collect();
    names.sort();
    names
}

fn corrupt_files(dir: &Path) -> Vec<PathBuf> {
    match fs::read_dir(dir.join("corrupt")) {
        Ok(entries) => entries.map(|entry| entry.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

fn read_all(queue: &mut DiskQueue) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some((id, bytes)) = queue.read_next().unwrap() {
        out.push((id, bytes.to_vec()));
    }
    out
}

/// Writes `count` records with `opts`, syncs and closes; returns the record end offsets
/// within the first segment (valid when it is the only one).
fn write_records(dir: &Path, count: u64, opts: DiskQueueOptions) -> Vec<u64> {
    let (mut queue, _) = DiskQueue::open(dir, opts).unwrap();
    let mut ends = Vec::new();
    let mut offset = 8;
    for id in 0..count {
        assert_eq!(queue.append(&record(id)).unwrap(), id);
        offset += 8 + record(id).len() as u64;
        ends.push(offset);
    }
    queue.sync().unwrap();
    ends
}

fn flip_byte(path: &Path, offset: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x5a;
    fs::write(path, bytes).unwrap();
}

#[test]
fn recovers_from_every_truncation_point_of_the_last_segment() {
    let source = tempfile::tempdir().unwrap();
    let opts = options(1 << 20, 1 << 20);
    let ends = write_records(source.path(), 12, opts);
    let original = fs::read(source.path().join(FIRST_SEGMENT)).unwrap();
    assert_eq!(original.len() as u64, *ends.last().unwrap());
    for len in 0..=original.len() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FIRST_SEGMENT), &original[..len]).unwrap();
        let (mut queue, report) = DiskQueue::open(dir.path(), opts)
            .unwrap_or_else(|error| panic!("open failed at length {len}: {error}"));
        let whole = ends.iter().filter(|&&end| end <= len as u64).count() as u64;
        assert_eq!(report.records, whole, "length {len}");
        let expected: Vec<(u64, Vec<u8>)> = (0..whole).map(|id| (id, record(id))).collect();
        assert_eq!(read_all(&mut queue), expected, "length {len}");
        let good = if len < 8 {
            0
        } else {
            ends.iter()
                .copied()
                .filter(|&e| e <= len as u64)
                .max()
                .unwrap_or(8)
        };
        if len >= 8 {
            assert_eq!(report.truncated_bytes, len as u64 - good, "length {len}");
        }
        // The cut bytes are kept, not deleted.
        let quarantined: u64 = corrupt_files(dir.path())
            .iter()
            .map(|path| fs::metadata(path).unwrap().len())
            .sum();
        if len >= 8 {
            assert_eq!(quarantined, len as u64 - good, "length {len}");
        } else {
            assert_eq!(quarantined, len as u64, "length {len}");
        }
        // The queue keeps working: new records get fresh ids and survive a reopen.
        let id = queue.append(b"after").unwrap();
        assert!(id >= whole);
        queue.sync().unwrap();
        drop(queue);
        let (mut queue, report) = DiskQueue::open(dir.path(), opts).unwrap();
        assert_eq!(report.truncated_bytes, 0);
        let all = read_all(&mut queue);
        assert_eq!(all.len() as u64, whole + 1);
        assert_eq!(all.last().unwrap(), &(id, b"after".to_vec()));
    }
}

#[test]
fn truncated_tail_of_a_multi_segment_queue_keeps_older_segments() {
    let source = tempfile::tempdir().unwrap();
    let opts = options(1 << 20, 64);
    write_records(source.path(), 30, opts);
    let names = segments(source.path());
    assert!(names.len() > 3);
    let last = names.last().unwrap().clone();
    let first_of_last: u64 = last.trim_end_matches(".seg").parse().unwrap();
    let original = fs::read(source.path().join(&last)).unwrap();
    for len in 0..=original.len() {
        let dir = tempfile::tempdir().unwrap();
        for name in &names {
            fs::copy(source.path().join(name), dir.path().join(name)).unwrap();
        }
        fs::write(dir.path().join(&last), &original[..len]).unwrap();
        let (mut queue, _) = DiskQueue::open(dir.path(), opts).unwrap();
        let got = read_all(&mut queue);
        assert!(got.len() as u64 >= first_of_last, "length {len}");
        for (index, (id, bytes)) in got.iter().enumerate() {
            assert_eq!(*id, index as u64);
            assert_eq!(bytes, &record(*id));
        }
        assert_eq!(queue.take_corrupt_skipped(), 0);
    }
}

#[test]
fn flipped_byte_in_the_last_segment_keeps_records_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(1 << 20, 1 << 20);
    let ends = write_records(dir.path(), 10, opts);
    // Flip a payload byte of record 6 (record 6 starts at ends[5]).
    assert!(!record(6).is_empty());
    flip_byte(&dir.path().join(FIRST_SEGMENT), ends[5] + 8);
    let (mut queue, report) = DiskQueue::open(dir.path(), opts).unwrap();
    assert_eq!(report.records, 6);
    assert_eq!(report.truncated_bytes, ends[9] - ends[5]);
    assert_eq!(report.quarantined.len(), 1);
    assert_eq!(
        report.quarantined[0].file_name().unwrap().to_string_lossy(),
        format!("{FIRST_SEGMENT}.{}.bad", ends[5])
    );
    assert_eq!(
        fs::metadata(&report.quarantined[0]).unwrap().len(),
        ends[9] - ends[5]
    );
    let ids: Vec<u64> = read_all(&mut queue).into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, (0..6).collect::<Vec<_>>());
}

#[test]
fn flipped_byte_in_an_older_segment_skips_the_rest_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(1 << 20, 100);
    write_records(dir.path(), 40, opts);
    let names = segments(dir.path());
    assert!(names.len() >= 3);
    let second_first: u64 = names[1].trim_end_matches(".seg").parse().unwrap();
    assert!(second_first >= 3, "first segment holds several records");
    // Flip a payload byte of record 2 in the first segment.
    let offset = 8 + (8 + record(0).len() + 8 + record(1).len()) as u64 + 8;
    assert!(!record(2).is_empty());
    flip_byte(&dir.path().join(&names[0]), offset);
    let (mut queue, report) = DiskQueue::open(dir.path(), opts).unwrap();
    assert_eq!(report.records, 40, "open does not read older segments");
    let got = read_all(&mut queue);
    let expected: Vec<(u64, Vec<u8>)> = (0..2)
        .chain(second_first..40)
        .map(|id| (id, record(id)))
        .collect();
    assert_eq!(got, expected);
    assert_eq!(queue.take_corrupt_skipped(), second_first - 2);
    assert_eq!(queue.take_corrupt_skipped(), 0, "take resets the count");
    assert_eq!(queue.len(), 40 - (second_first - 2));
    assert_eq!(corrupt_files(dir.path()).len(), 1);
    // The skipped records stay gone after a reopen; the good ones are delivered again.
    queue.sync().unwrap();
    drop(queue);
    let (mut queue, _) = DiskQueue::open(dir.path(), opts).unwrap();
    assert_eq!(read_all(&mut queue), expected);
    assert_eq!(queue.take_corrupt_skipped(), 0);
}

#[test]
fn bad_header_of_an_older_segment_quarantines_it_whole() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(1 << 20, 100);
    write_records(dir.path(), 40, opts);
    let names = segments(dir.path());
    let second_first: u64 = names[1].trim_end_matches(".seg").parse().unwrap();
    let third_first: u64 = names[2].trim_end_matches(".seg").parse().unwrap();
    flip_byte(&dir.path().join(&names[1]), 0);
    let (mut queue, report) = DiskQueue::open(dir.path(), opts).unwrap();
    assert_eq!(report.lost_records, third_first - second_first);
    assert_eq!(report.quarantined.len(), 1);
    let ids: Vec<u64> = read_all(&mut queue).into_iter().map(|(id, _)| id).collect();
    let expected: Vec<u64> = (0..second_first).chain(third_first..40).collect();
    assert_eq!(ids, expected);
    assert_eq!(queue.take_corrupt_skipped(), 0, "already reported as lost");
}

#[test]
fn damage_found_while_reading_the_active_segment_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(1 << 20, 1 << 20);
    let (mut queue, _) = DiskQueue::open(dir.path(), opts).unwrap();
    let mut ends = Vec::new();
    let mut offset = 8;
    for id in 0..10 {
        queue.append(&record(id)).unwrap();
        offset += 8 + record(id).len() as u64;
        ends.push(offset);
    }
    queue.flush().unwrap();
    flip_byte(&dir.path().join(FIRST_SEGMENT), ends[3] + 4); // CRC of record 4
    let ids: Vec<u64> = read_all(&mut queue).into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, vec![0, 1, 2, 3]);
    assert_eq!(queue.take_corrupt_skipped(), 6);
    let id = queue.append(b"next").unwrap();
    assert_eq!(id, 10);
    assert_eq!(queue.read_next().unwrap().unwrap().0, 10);
    assert_eq!(queue.read_next().unwrap(), None);
}

#[test]
fn unknown_files_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(1 << 20, 1 << 20);
    write_records(dir.path(), 3, opts);
    fs::write(dir.path().join("notes.txt"), b"hello").unwrap();
    fs::write(dir.path().join("12.seg"), b"not a segment name").unwrap();
    fs::create_dir(dir.path().join("00000000000000000099.seg")).unwrap();
    let (mut queue, report) = DiskQueue::open(dir.path(), opts).unwrap();
    assert!(report.quarantined.is_empty());
    assert_eq!(read_all(&mut queue).len(), 3);
    assert_eq!(fs::read(dir.path().join("notes.txt")).unwrap(), b"hello");
}

#[test]
fn damaged_ack_file_means_redelivery_not_loss() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(1 << 20, 1 << 20);
    write_records(dir.path(), 5, opts);
    {
        let (mut queue, _) = DiskQueue::open(dir.path(), opts).unwrap();
        queue.ack(0).unwrap();
        queue.ack(1).unwrap();
        queue.sync().unwrap();
    }
    flip_byte(&dir.path().join("ack"), 10);
    let (mut queue, report) = DiskQueue::open(dir.path(), opts).unwrap();
    assert!(report.ack_file_unreadable);
    assert_eq!(read_all(&mut queue).len(), 5);
}

#[test]
fn acks_out_of_order_delete_segments_only_when_all_earlier_records_are_acked() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(1 << 20, 44);
    let (mut queue, _) = DiskQueue::open(dir.path(), opts).unwrap();
    for id in 0..20u64 {
        queue.append(&[id as u8; 10]).unwrap(); // 18 bytes framed: two per 44-byte segment
    }
    queue.sync().unwrap();
    let firsts: Vec<u64> = segments(dir.path())
        .iter()
        .map(|name| name.trim_end_matches(".seg").parse().unwrap())
        .collect();
    assert_eq!(firsts, (0..20).step_by(2).collect::<Vec<_>>());
    assert_eq!(read_all(&mut queue).len(), 20);
    let order = [
        5, 3, 19, 4, 1, 0, 2, 7, 6, 10, 8, 9, 12, 11, 18, 17, 16, 13, 15, 14,
    ];
    let mut acked = std::collections::BTreeSet::new();
    for id in order {
        queue.ack(id).unwrap();
        acked.insert(id);
        let floor = (0..).find(|id| !acked.contains(id)).unwrap();
        // A sealed segment [f, f+2) is deleted once every id below f+2 is acked; the active
        // one (the last) stays.
        let expected: Vec<String> = firsts
            .iter()
            .filter(|&&first| first + 2 > floor || first == 18)
            .map(|first| format!("{first:020}.seg"))
            .collect();
        assert_eq!(segments(dir.path()), expected, "after acking {id}");
        assert_eq!(queue.len(), 20 - acked.len() as u64);
        // Acking twice, or an id never appended, changes nothing.
        queue.ack(id).unwrap();
        queue.ack(1000).unwrap();
        assert_eq!(queue.len(), 20 - acked.len() as u64);
    }
    assert!(queue.is_empty());
}

#[test]
fn acks_survive_reopen_and_unsynced_acks_are_redelivered() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(1 << 20, 1 << 20);
    let (mut queue, _) = DiskQueue::open(dir.path(), opts).unwrap();
    for id in 0..6 {
        queue.append(&record(id)).unwrap();
    }
    queue.ack(0).unwrap();
    queue.ack(3).unwrap();
    queue.sync().unwrap();
    queue.ack(1).unwrap();
    // Simulate kill -9: the disk as it is now, without Drop running.
    let crashed = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(dir.path()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            fs::copy(entry.path(), crashed.path().join(entry.file_name())).unwrap();
        }
    }
    let (mut after_crash, _) = DiskQueue::open(crashed.path(), opts).unwrap();
    let ids: Vec<u64> = read_all(&mut after_crash)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(
        ids,
        vec![1, 2, 4, 5],
        "acks since the last sync are redelivered"
    );
    drop(queue); // clean close persists the ack of 1
    let (mut reopened, _) = DiskQueue::open(dir.path(), opts).unwrap();
    let ids: Vec<u64> = read_all(&mut reopened)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ids, vec![2, 4, 5]);
}

#[test]
fn full_queue_rejects_without_writing_and_eviction_makes_room() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(8 * 1024, 1024);
    let (mut queue, _) = DiskQueue::open(dir.path(), opts).unwrap();
    let mut appended = 0u64;
    let error = loop {
        match queue.append(&[7u8; 100]) {
            Ok(_) => appended += 1,
            Err(error) => break error,
        }
    };
    let BufferError::Full {
        needed,
        available,
        queue: ref name,
    } = error
    else {
        panic!("expected Full, got {error}");
    };
    assert!(name.contains(&dir.path().display().to_string()));
    assert!(
        error
            .to_string()
            .contains(&dir.path().display().to_string())
    );
    assert!(needed > available);
    queue.flush().unwrap();
    let bytes = queue.bytes();
    assert!(bytes <= opts.max_bytes);
    let on_disk: u64 = segments(dir.path())
        .iter()
        .map(|name| fs::metadata(dir.path().join(name)).unwrap().len())
        .sum();
    assert_eq!(on_disk, bytes, "bytes() is what is on disk");
    assert!(matches!(
        queue.append(&[7u8; 100]),
        Err(BufferError::Full { .. })
    ));
    assert_eq!(queue.bytes(), bytes, "a rejected append writes nothing");
    assert_eq!(queue.len(), appended);
    let evicted = queue.evict_oldest().unwrap();
    assert!(evicted.records > 0 && evicted.bytes > 0);
    assert_eq!(queue.len(), appended - evicted.records);
    assert_eq!(queue.bytes(), bytes - evicted.bytes);
    queue.append(&[7u8; 100]).unwrap();
    // The oldest remaining record is the first one after the evicted segment.
    assert_eq!(queue.read_next().unwrap().unwrap().0, evicted.records);
}

#[test]
fn eviction_rolls_a_lone_active_segment() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(1 << 20, 1 << 20);
    let (mut queue, _) = DiskQueue::open(dir.path(), opts).unwrap();
    assert_eq!(queue.evict_oldest().unwrap().records, 0);
    for id in 0..5 {
        queue.append(&record(id)).unwrap();
    }
    assert_eq!(queue.evict_oldest().unwrap().records, 5);
    assert!(queue.is_empty());
    assert_eq!(queue.read_next().unwrap(), None);
    assert_eq!(
        segments(dir.path()),
        vec!["00000000000000000005.seg".to_owned()]
    );
    assert_eq!(queue.append(b"x").unwrap(), 5);
}

#[test]
fn fully_acked_active_segment_does_not_block_appends() {
    let dir = tempfile::tempdir().unwrap();
    // max_bytes below the segment size: only reclaiming the acked active segment frees space.
    let opts = options(4096, 1 << 20);
    let (mut queue, _) = DiskQueue::open(dir.path(), opts).unwrap();
    for _ in 0..200 {
        let id = queue.append(&[1u8; 100]).unwrap();
        let (read, _) = queue.read_next().unwrap().unwrap();
        assert_eq!(read, id);
        queue.ack(id).unwrap();
    }
}

#[test]
fn oversized_record_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (mut queue, _) = DiskQueue::open(dir.path(), options(1 << 20, 1 << 20)).unwrap();
    let error = queue.append(&[0u8; 4097]).unwrap_err();
    assert!(matches!(
        error,
        BufferError::RecordTooLarge {
            len: 4097,
            max: 4096,
            ..
        }
    ));
    assert_eq!(queue.len(), 0);
}

#[test]
fn rewind_redelivers_unacked_records() {
    let dir = tempfile::tempdir().unwrap();
    let (mut queue, _) = DiskQueue::open(dir.path(), options(1 << 20, 64)).unwrap();
    for id in 0..10 {
        queue.append(&record(id)).unwrap();
    }
    assert_eq!(read_all(&mut queue).len(), 10);
    for id in [0, 1, 2, 5, 8] {
        queue.ack(id).unwrap();
    }
    queue.rewind();
    let ids: Vec<u64> = read_all(&mut queue).into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, vec![3, 4, 6, 7, 9]);
}

proptest! {
    #[test]
    fn arbitrary_bytes_as_the_last_segment_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400), valid_header in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let mut content = bytes;
        if valid_header && content.len() >= 8 {
            content[..8].copy_from_slice(b"FGBUF\0\x01\0");
        }
        fs::write(dir.path().join(FIRST_SEGMENT), &content).unwrap();
        let (mut queue, report) = DiskQueue::open(dir.path(), options(1 << 20, 1 << 20)).unwrap();
        let got = read_all(&mut queue);
        prop_assert_eq!(got.len() as u64, report.records);
        queue.append(b"still works").unwrap();
    }

    #[test]
    fn arbitrary_bytes_as_an_older_segment_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400), ack in proptest::collection::vec(any::<u8>(), 0..64)) {
        let dir = tempfile::tempdir().unwrap();
        let mut content = bytes;
        if content.len() >= 8 {
            content[..8].copy_from_slice(b"FGBUF\0\x01\0");
        }
        fs::write(dir.path().join(FIRST_SEGMENT), &content).unwrap();
        fs::write(dir.path().join("00000000000000000050.seg"), b"FGBUF\0\x01\0").unwrap();
        fs::write(dir.path().join("ack"), &ack).unwrap();
        let (mut queue, _) = DiskQueue::open(dir.path(), options(1 << 20, 1 << 20)).unwrap();
        let got = read_all(&mut queue);
        prop_assert!(got.len() <= 50);
        prop_assert!(got.windows(2).all(|pair| pair[0].0 < pair[1].0));
        prop_assert_eq!(queue.len(), got.len() as u64, "records read stay unacked, the rest was skipped");
        let skipped = queue.take_corrupt_skipped();
        prop_assert!(skipped <= 50);
    }
}
