//! Attacker-reachable parsers of the registry on hostile input: the access JWT as the device
//! API sees it, and the JSON bodies of the REST API. Each must give an error or a value, never
//! a panic. The same inputs drive the cargo-fuzz targets in `fuzz/` (`jwt`, `api_json`).

// The fixture is test code; a failed setup should panic right there.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use fieldgate_registry::*;
use proptest::prelude::*;

const T0: u64 = 1_800_000_000_000;

fn registry() -> (tempfile::TempDir, Registry) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.redb");
    let registry = Registry::open_with_clock(
        RegistryOptions::new(&path, "gw-test"),
        Arc::new(ManualClock::new(T0)),
    )
    .unwrap();
    (dir, registry)
}

/// Deserialises `body` as every request body the REST API accepts.
fn parse_every_body(body: &[u8]) {
    let _outcome = serde_json::from_slice::<NewDevice>(body);
    let _outcome = serde_json::from_slice::<DevicePatch>(body);
    let _outcome = serde_json::from_slice::<DeviceQuery>(body);
    let _outcome = serde_json::from_slice::<NewProvisioningToken>(body);
    let _outcome = serde_json::from_slice::<Registration>(body);
    let _outcome = serde_json::from_slice::<NewCommand>(body);
}

/// JSON-ish text built from the bodies' own field names, so serde gets past the first key.
fn json_like() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "id",
        "name",
        "model",
        "labels",
        "mac",
        "imei",
        "status",
        "label",
        "search",
        "cursor",
        "limit",
        "max_uses",
        "ttl",
        "provisioning_token",
        "public_key",
        "nonce",
        "signature",
        "params",
        "x",
    ]);
    let value = r#"("[^"\\]{0,20}"|-?[0-9]{1,25}(\.[0-9]+)?([eE][+-]?[0-9]{1,4})?|true|false|null|\[\]|\{\}|"[0-9]+[a-z]{0,3}")"#;
    prop::collection::vec((key, value), 0..6).prop_map(|fields| {
        let body: Vec<String> = fields
            .into_iter()
            .map(|(k, v)| format!("\"{k}\":{v}"))
            .collect();
        format!("{{{}}}", body.join(","))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_as_api_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        parse_every_body(&body);
    }

    #[test]
    fn json_like_api_bodies_never_panic(body in json_like()) {
        parse_every_body(body.as_bytes());
    }
}

#[test]
fn arbitrary_strings_as_a_jwt_are_refused_not_a_panic() {
    // One registry for every case: opening a redb file per case would dominate the run time.
    let (_dir, registry) = registry();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(2000));
    runner
        .run(&"\\PC{0,400}", |token| {
            prop_assert!(registry.authenticate_jwt_at(&token, T0).is_err());
            Ok(())
        })
        .unwrap();
}

#[test]
fn hostile_jwt_shapes_are_refused() {
    let (_dir, registry) = registry();
    let long = "A".repeat(1 << 20);
    for token in [
        String::new(),
        "\0.\0.\0".to_owned(),
        "..".to_owned(),
        format!("{long}.{long}.{long}"),
        format!("eyJhbGciOiJub25lIn0.{long}."),
        "é.ü.\u{FFFF}".to_owned(),
    ] {
        assert!(
            registry.authenticate_jwt_at(&token, T0).is_err(),
            "{token:.40}"
        );
    }
}

#[test]
fn hostile_api_bodies_are_an_error_not_a_panic() {
    let deep_array = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_object = format!(
        "{{\"params\":{}1{}",
        "{\"a\":".repeat(100_000),
        "}".repeat(100_000)
    );
    let deep_command = format!(
        "{{\"id\":\"c-1\",\"name\":\"reboot\",\"params\":{}{}}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let long_name = format!("{{\"name\":\"{}\"}}", "x".repeat(1 << 20));
    let huge_number = format!("{{\"max_uses\":{}}}", "9".repeat(10_000));
    for body in [
        &b""[..],
        b"\0",
        b"\xff\xfe{}",
        b"{\"name\":\"\xff\"}",
        b"{\"name\":\"\\ud800\"}",
        b"{\"ttl\":\"99999999999999999999y\"}",
        b"{\"ttl\":\"-1s\"}",
        b"{\"max_uses\":-1}",
        b"{\"max_uses\":1e400}",
        deep_array.as_bytes(),
        deep_object.as_bytes(),
        deep_command.as_bytes(),
        long_name.as_bytes(),
        huge_number.as_bytes(),
    ] {
        parse_every_body(body);
    }
}
