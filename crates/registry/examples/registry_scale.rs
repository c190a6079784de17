//! Scale check: N devices (default 100,000). Adds them (bulk, transactions of 10,000), then
//! re-runs itself on the file in a fresh process, so that memory figures are the registry's
//! alone, and reports there: open() time, RSS (`VmRSS`, peak `VmHWM` from /proc/self/status)
//! after open and after every device authenticated once with its secret and marked
//! connected, memory-only auth throughput (secret and JWT, 1 and 4 threads, over a sample
//! of 10,000 devices), a filtered listing and a flush of every device's dirty counters.
//!
//! `cargo run --release -p fieldgate-registry --example registry_scale [DEVICES]`

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

use fieldgate_registry::{DeviceQuery, DeviceStatus, NewDevice, Registry, RegistryOptions};
use tokio::time::Instant;

type Error = Box<dyn std::error::Error>;

/// Devices whose JWTs are kept for the throughput runs (spread over the whole id range).
const SAMPLE: usize = 10_000;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, dir, devices] = args.as_slice() {
        if flag == "--measure" {
            return measure(Path::new(dir), devices.parse()?);
        }
    }
    let devices: usize = args.get(1).map_or(Ok(100_000), |arg| arg.parse())?;
    let dir = tempfile::tempdir()?;
    populate(dir.path(), devices)?;
    let status = std::process::Command::new(std::env::current_exe()?)
        .arg("--measure")
        .arg(dir.path())
        .arg(devices.to_string())
        .status()?;
    if !status.success() {
        return Err(format!("measuring process failed: {status}").into());
    }
    Ok(())
}

fn options(dir: &Path) -> RegistryOptions {
    RegistryOptions::new(dir.join("registry.redb"), "gw-scale")
}

/// Adds `devices` devices and writes their credentials to `secrets.txt` (every device) and
/// `jwts.txt` (the sample), one `id credential` line each.
fn populate(dir: &Path, devices: usize) -> Result<(), Error> {
    let registry = Registry::open(options(dir))?;
    let mut secrets = BufWriter::new(std::fs::File::create(dir.join("secrets.txt"))?);
    let mut jwts = BufWriter::new(std::fs::File::create(dir.join("jwts.txt"))?);
    let every = (devices / SAMPLE).max(1);
    let started = Instant::now();
    let batch = 10_000;
    for start in (0..devices).step_by(batch) {
        let new: Vec<NewDevice> = (start..(start + batch).min(devices))
            .map(|i| NewDevice {
                id: Some(format!("dev-{i:06}")),
                name: Some(format!("Sensor {i}")),
                model: Some(if i % 10 == 0 { "pump" } else { "meter" }.into()),
                mac: Some(format!(
                    "02:00:{:02x}:{:02x}:{:02x}:{:02x}",
                    i >> 24 & 0xff,
                    i >> 16 & 0xff,
                    i >> 8 & 0xff,
                    i & 0xff
                )),
                ..NewDevice::default()
            })
            .collect();
        for (i, provisioned) in (start..).zip(registry.add_devices(new)?) {
            let id = &provisioned.device.id;
            writeln!(secrets, "{id} {}", provisioned.secret.unwrap_or_default())?;
            if i % every == 0 {
                writeln!(jwts, "{id} {}", provisioned.tokens.access_token)?;
            }
        }
    }
    let added = started.elapsed();
    drop(registry);
    secrets.flush()?;
    jwts.flush()?;
    println!("devices: {devices}");
    println!(
        "add (bulk, {} transactions): {:.2?} ({:.0} devices/s)",
        devices.div_ceil(batch),
        added,
        devices as f64 / added.as_secs_f64()
    );
    println!("file: {}", file_usage(&options(dir).path)?);
    Ok(())
}

/// The file's size and how much of it redb has allocated (it grows the file in doubling
/// steps, so the size alone says little).
fn file_usage(path: &Path) -> Result<String, Error> {
    let size = std::fs::metadata(path)?.len();
    let db = redb::Database::open(path)?;
    let txn = db.begin_write()?;
    let stats = txn.stats()?;
    let in_use = stats.allocated_pages() * stats.page_size() as u64;
    txn.abort()?;
    Ok(format!(
        "{:.1} MiB, {:.1} MiB of it in use",
        size as f64 / 1048576.0,
        in_use as f64 / 1048576.0
    ))
}

/// `VmRSS` and `VmHWM` of this process, in MiB.
fn memory() -> Result<(f64, f64), Error> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| -> Result<f64, Error> {
        let line = status
            .lines()
            .find(|line| line.starts_with(name))
            .ok_or_else(|| format!("no {name} in /proc/self/status"))?;
        let kib: f64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()?;
        Ok(kib / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

fn print_memory(when: &str) -> Result<(), Error> {
    let (rss, hwm) = memory()?;
    println!("RSS {when}: {rss:.1} MiB (peak {hwm:.1} MiB)");
    Ok(())
}

fn read_pairs(path: &Path) -> Result<Vec<(String, String)>, Error> {
    let mut pairs = Vec::new();
    for line in BufReader::new(std::fs::File::open(path)?).lines() {
        let line = line?;
        let (id, credential) = line.split_once(' ').ok_or("bad credentials line")?;
        pairs.push((id.to_owned(), credential.to_owned()));
    }
    Ok(pairs)
}

fn measure(dir: &Path, devices: usize) -> Result<(), Error> {
    let options = options(dir);
    print_memory("before open")?;
    let started = Instant::now();
    let registry = Arc::new(Registry::open(options.clone())?);
    println!(
        "open() with {} devices: {:.2?}",
        registry.len(),
        started.elapsed()
    );
    print_memory("after open")?;

    // Every device connects once: its secret is checked and it goes online.
    let started = Instant::now();
    let mut checked = 0usize;
    for line in BufReader::new(std::fs::File::open(dir.join("secrets.txt"))?).lines() {
        let line = line?;
        let (id, secret) = line.split_once(' ').ok_or("bad secrets line")?;
        registry
            .authenticate_secret(id, secret)
            .map_err(|e| format!("{id}: {e}"))?;
        registry.record_connected(id, 1);
        checked += 1;
    }
    if checked != devices {
        return Err(format!("{checked} secrets for {devices} devices").into());
    }
    println!(
        "authenticate_secret + record_connected of every device: {:.2?}",
        started.elapsed()
    );
    print_memory(&format!("after {checked} devices connected"))?;

    let every = (devices / SAMPLE).max(1);
    let jwts = read_pairs(&dir.join("jwts.txt"))?;
    let secrets: Vec<(String, String)> = read_pairs(&dir.join("secrets.txt"))?
        .into_iter()
        .step_by(every)
        .collect();
    let sample = secrets.len();

    let lookups = 1_000_000;
    let started = Instant::now();
    for n in 0..lookups {
        let (id, secret) = &secrets[(n * 7919) % sample];
        registry
            .authenticate_secret(id, secret)
            .map_err(|e| format!("{id}: {e}"))?;
    }
    let elapsed = started.elapsed();
    println!(
        "authenticate_secret, 1 thread: {:.0}/s ({:.2} µs each)",
        lookups as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / lookups as f64
    );

    let jwt_lookups = 300_000;
    let started = Instant::now();
    for n in 0..jwt_lookups {
        let (id, token) = &jwts[(n * 7919) % jwts.len()];
        let sub = registry
            .authenticate_jwt(token)
            .map_err(|e| format!("{id}: {e}"))?;
        if &sub != id {
            return Err(format!("JWT of {id} names {sub}").into());
        }
    }
    let elapsed = started.elapsed();
    println!(
        "authenticate_jwt, 1 thread: {:.0}/s ({:.2} µs each)",
        jwt_lookups as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / jwt_lookups as f64
    );

    let threads = 4;
    let started = Instant::now();
    let failures = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let registry = &registry;
                let secrets = &secrets;
                scope.spawn(move || {
                    let mut failures = 0usize;
                    for n in 0..lookups {
                        let (id, secret) = &secrets[(n * 7919 + t * 13) % sample];
                        if registry.authenticate_secret(id, secret).is_err() {
                            failures += 1;
                        }
                        if n % 100 == 0 {
                            registry.record_connected(id, 1);
                        }
                    }
                    failures
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().unwrap_or(usize::MAX))
            .sum::<usize>()
    });
    let elapsed = started.elapsed();
    if failures != 0 {
        return Err(format!("{failures} failed authentications in the threaded run").into());
    }
    println!(
        "authenticate_secret, {threads} threads (+1% record_connected): {:.0}/s",
        (threads * lookups) as f64 / elapsed.as_secs_f64()
    );

    let started = Instant::now();
    let page = registry.list_devices(&DeviceQuery {
        model: Some("pump".into()),
        status: Some(DeviceStatus::Online),
        limit: 100,
        ..DeviceQuery::default()
    });
    println!(
        "list_devices (model + status filter, total {}): {:.2?}",
        page.total,
        started.elapsed()
    );
    let started = Instant::now();
    let page = registry.list_devices(&DeviceQuery {
        search: Some("sensor 9999".into()),
        ..DeviceQuery::default()
    });
    println!(
        "list_devices (search, total {}): {:.2?}",
        page.total,
        started.elapsed()
    );
    let started = Instant::now();
    let page = registry.list_devices(&DeviceQuery {
        cursor: Some("dev-05".into()),
        ..DeviceQuery::default()
    });
    println!(
        "list_devices (no filter, from a cursor, total {}): {:.2?}",
        page.total,
        started.elapsed()
    );

    for (id, _) in &secrets {
        registry.record_message(id, 100, 2);
    }
    let dirty = registry.dirty_count();
    let started = Instant::now();
    registry.flush()?;
    println!(
        "flush() of {dirty} dirty devices: {:.2?}",
        started.elapsed()
    );
    let started = Instant::now();
    registry.record_message("dev-000001", 1, 3);
    registry.flush()?;
    println!("flush() of 1 dirty device: {:.2?}", started.elapsed());
    print_memory("at the end")?;
    drop(registry);
    println!("file after flush: {}", file_usage(&options.path)?);
    Ok(())
}
