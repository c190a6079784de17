//! The registry API fuzzed from its own OpenAPI document: schemathesis (PyPI) runs against
//! the built gateway and must find no 5xx; the gateway must still be alive afterwards.
//!
//! `scripts/test.sh` installs schemathesis when missing; without it this test says so and
//! passes, so a bare `cargo test` still works on a machine without Python packages.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Gateway, free_port, http_get};

const ADMIN: &str = "fuzz-admin-token";

fn schemathesis_available() -> bool {
    Command::new("python3")
        .args(["-c", "import schemathesis"])
        .output()
        .is_ok_and(|output| output.status.success())
}

/// A gateway with the registry, an admin token and a file sink fed by HTTP ingestion.
pub fn registry_config(api_port: u16) -> String {
    format!(
        "[gateway]\nid = \"gw-fuzz\"\n\n[api]\naddress = \"127.0.0.1:{api_port}\"\n\
         admin_token = \"{ADMIN}\"\n\n[registry]\njwt_ttl = \"5m\"\n\n\
         [sinks.local]\ntype = \"file\"\ninputs = [\"http\"]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error() {
    assert!(
        schemathesis_available(),
        "schemathesis is not installed: run scripts/test.sh, which installs it"
    );
    let mut gateway = Gateway::start(&registry_config(free_port())).await;
    let api = gateway.api;
    let (status, document) = http_get(api, "/api/v1/openapi.json")
        .await
        .unwrap_or_else(|err| panic!("openapi.json: {err}"));
    assert_eq!(status, 200, "{document}");

    // Failed device authentications throttle the fuzzer's address, which would hide the
    // admin routes behind 429s: fuzz the admin routes (always the right admin token) first,
    // then the device-credential routes.
    let device_routes = "/api/v1/(devices/register|auth/refresh|devices/[^/]+/telemetry)";
    for (filter, pattern) in [
        ("--exclude-path-regex", device_routes),
        ("--include-path-regex", device_routes),
    ] {
        let output = schemathesis(api, filter, pattern).await;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "schemathesis {filter} failed ({}):\n{stdout}\n{stderr}\ngateway log:\n{}",
            output.status,
            gateway.stderr_tail(40)
        );
        let summary: Vec<&str> = stdout
            .lines()
            .filter(|line| line.contains("generated") || line.contains("Tested:"))
            .collect();
        println!("schemathesis {filter}: {summary:?}");
    }
    assert!(
        gateway.exited().is_none(),
        "the gateway died under fuzzing:\n{}",
        gateway.stderr_tail(40)
    );
    let (status, _) = http_get(api, "/healthz")
        .await
        .unwrap_or_else(|err| panic!("healthz after fuzzing: {err}"));
    assert_eq!(status, 200);
}

/// One bounded schemathesis run checking only for server errors.
async fn schemathesis(
    api: std::net::SocketAddr,
    filter: &'static str,
    pattern: &'static str,
) -> std::process::Output {
    let run = tokio::task::spawn_blocking(move || {
        let report = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
        Command::new("python3")
            .args(["-m", "schemathesis.cli", "run"])
            .arg(format!("http://{api}/api/v1/openapi.json"))
            .args(["--header", &format!("Authorization: Bearer {ADMIN}")])
            .args(["--checks", "not_a_server_error"])
            .args([filter, pattern])
            .args(["--max-examples", "30"])
            .args(["--max-time", "90"])
            .args(["--request-timeout", "15"])
            .args(["--seed", "7"])
            .arg("--no-color")
            .current_dir(report.path())
            .output()
    });
    tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .unwrap_or_else(|_| panic!("schemathesis ran longer than 300 s"))
        .unwrap_or_else(|err| panic!("{err}"))
        .unwrap_or_else(|err| panic!("cannot run schemathesis: {err}"))
}
