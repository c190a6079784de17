//! Access-token verification as the device API sees it: any string as a bearer token. Must not
//! panic. (The parsing behind a valid MAC is covered by the proptests in
//! `crates/registry/src/jwt.rs`, which hold the key.)
#![no_main]

use std::sync::{Arc, LazyLock};

use fieldgate_registry::{ManualClock, Registry, RegistryOptions};
use libfuzzer_sys::fuzz_target;

const T0: u64 = 1_800_000_000_000;

/// One registry per fuzzing process; the temp dir lives as long as the process.
static REGISTRY: LazyLock<(tempfile::TempDir, Registry)> = LazyLock::new(|| {
    let dir = tempfile::tempdir().expect("temp dir");
    let options = RegistryOptions::new(dir.path().join("registry.redb"), "gw-fuzz");
    let registry =
        Registry::open_with_clock(options, Arc::new(ManualClock::new(T0))).expect("open registry");
    (dir, registry)
});

fuzz_target!(|data: &[u8]| {
    let token = String::from_utf8_lossy(data);
    assert!(REGISTRY.1.authenticate_jwt_at(&token, T0).is_err());
});
