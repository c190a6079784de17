//! Scale check: 100,000 devices. Adds them (bulk, 10 transactions), reopens the file and
//! reports open() time, memory-only auth throughput (secret and JWT, 1 and 4 threads), a
//! filtered listing and a flush of 100,000 dirty counters.
//!
//! `cargo run --release -p fieldgate-registry --example registry_scale [DEVICES]`

use std::sync::Arc;
use std::time::Duration;

use fieldgate_registry::{DeviceQuery, DeviceStatus, NewDevice, Registry, RegistryOptions};
use tokio::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let devices: usize = std::env::args()
        .nth(1)
        .map_or(Ok(100_000), |arg| arg.parse())?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("registry.redb");
    let options = RegistryOptions::new(&path, "gw-scale");

    let registry = Registry::open(options.clone())?;
    let started = Instant::now();
    let mut credentials = Vec::with_capacity(devices);
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
        for provisioned in registry.add_devices(new)? {
            credentials.push((
                provisioned.device.id,
                provisioned.secret.unwrap_or_default(),
                provisioned.tokens.access_token,
            ));
        }
    }
    let added = started.elapsed();
    drop(registry);
    let size = std::fs::metadata(&path)?.len();
    println!("devices: {devices}");
    println!(
        "add (bulk, {} transactions): {:.2?} ({:.0} devices/s)",
        devices.div_ceil(batch),
        added,
        devices as f64 / added.as_secs_f64()
    );
    println!("file size: {:.1} MiB", size as f64 / 1048576.0);

    let started = Instant::now();
    let registry = Arc::new(Registry::open(options)?);
    println!(
        "open() with {} devices: {:.2?}",
        registry.len(),
        started.elapsed()
    );

    let lookups = 1_000_000;
    let started = Instant::now();
    for n in 0..lookups {
        let (id, secret, _) = &credentials[(n * 7919) % devices];
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
        let (id, _, token) = &credentials[(n * 7919) % devices];
        let sub = registry
            .authenticate_jwt(token)
            .map_err(|e| format!("{id}: {e}"))?;
        assert_eq!(&sub, id);
    }
    let elapsed = started.elapsed();
    println!(
        "authenticate_jwt, 1 thread: {:.0}/s ({:.2} µs each)",
        jwt_lookups as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / jwt_lookups as f64
    );

    let threads = 4;
    let started = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..threads {
            let registry = &registry;
            let credentials = &credentials;
            scope.spawn(move || {
                for n in 0..lookups {
                    let (id, secret, _) = &credentials[(n * 7919 + t * 13) % devices];
                    assert!(registry.authenticate_secret(id, secret).is_ok());
                    if n % 100 == 0 {
                        registry.record_connected(id, 1);
                    }
                }
            });
        }
    });
    let elapsed = started.elapsed();
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

    for (id, _, _) in &credentials {
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
    let _ = Duration::ZERO;
    Ok(())
}
