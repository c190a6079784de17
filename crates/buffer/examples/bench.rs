//! Manual benchmark driver for the disk queue; time each step from the shell, e.g.
//! `time bench fill DIR 1073741824`, `time bench open DIR`, `time bench append DIR 1000000 flush`.
//!
//! Steps: `fill DIR BYTES` appends 100-byte records until the queue holds BYTES (flush every
//! 1000, sync at the end); `open DIR` opens (recovers) and prints the report;
//! `append DIR COUNT flush|sync` appends COUNT 100-byte records with a flush or a sync after
//! every 1000.

use std::path::Path;
use std::process::ExitCode;

use fieldgate_buffer::{BufferError, DiskQueue, DiskQueueOptions};

/// Size of each benchmark record.
const RECORD: [u8; 100] = [0x42; 100];
/// Records between flushes or syncs.
const BATCH: u64 = 1000;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["fill", dir, bytes] => bytes
            .parse()
            .map_err(|_| usage())
            .and_then(|bytes| fill(Path::new(dir), bytes).map_err(|e| e.to_string())),
        ["open", dir] => open(Path::new(dir)).map_err(|e| e.to_string()),
        ["append", dir, count, mode @ ("flush" | "sync")] => {
            count.parse().map_err(|_| usage()).and_then(|count| {
                append(Path::new(dir), count, mode == "sync").map_err(|e| e.to_string())
            })
        }
        _ => Err(usage()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> String {
    "usage: bench fill DIR BYTES | open DIR | append DIR COUNT flush|sync".to_owned()
}

fn options() -> DiskQueueOptions {
    DiskQueueOptions::new(2 * 1024 * 1024 * 1024)
}

fn fill(dir: &Path, bytes: u64) -> Result<(), BufferError> {
    let (mut queue, _) = DiskQueue::open(dir, options())?;
    let mut appended = 0u64;
    while queue.bytes() < bytes {
        queue.append(&RECORD)?;
        appended += 1;
        if appended.is_multiple_of(BATCH) {
            queue.flush()?;
        }
    }
    queue.sync()?;
    println!(
        "appended {appended} records, queue holds {} bytes",
        queue.bytes()
    );
    Ok(())
}

fn open(dir: &Path) -> Result<(), BufferError> {
    let (queue, report) = DiskQueue::open(dir, options())?;
    println!("{report:?}, bytes {}", queue.bytes());
    Ok(())
}

fn append(dir: &Path, count: u64, sync: bool) -> Result<(), BufferError> {
    let (mut queue, _) = DiskQueue::open(dir, options())?;
    for appended in 1..=count {
        queue.append(&RECORD)?;
        if appended.is_multiple_of(BATCH) {
            if sync { queue.sync()? } else { queue.flush()? }
        }
    }
    queue.sync()?;
    println!("appended {count} records");
    Ok(())
}
