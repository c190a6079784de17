//! The registry API fuzzed from its own OpenAPI document: schemathesis (PyPI) runs against
//! the built gateway and must find no 5xx; the gateway must still be alive afterwards.
//!
//! Python: `$FIELDGATE_PYTHON` (set by `scripts/test.sh` to the virtual environment it
//! installs schemathesis into, `target/pyenv`), else that environment if it exists, else
//! `python3`. Without schemathesis the test fails and says how to install it.
//!
//! Time: a quick profile by default (about 40 s on 2 cores); `FIELDGATE_API_FUZZ=long` (set by CI)
//! runs the long one (about 3 minutes on 2 cores).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{Gateway, free_port, http_get};

const ADMIN: &str = "fuzz-admin-token";

/// Environment variable naming the Python interpreter that has schemathesis.
const PYTHON_ENV: &str = "FIELDGATE_PYTHON";
/// Environment variable choosing the profile: `long`, or the quick default.
const PROFILE_ENV: &str = "FIELDGATE_API_FUZZ";

/// How much fuzzing one schemathesis run (of two) may do.
#[derive(Debug, Clone, Copy)]
struct Profile {
    max_examples: u32,
    max_time_secs: u32,
    /// When a run is cut off, should schemathesis overrun its own budget.
    limit_secs: u64,
}

impl Profile {
    const QUICK: Profile = Profile {
        max_examples: 5,
        max_time_secs: 15,
        limit_secs: 90,
    };
    const LONG: Profile = Profile {
        max_examples: 30,
        max_time_secs: 90,
        limit_secs: 300,
    };

    fn from_env() -> Profile {
        match std::env::var(PROFILE_ENV).as_deref() {
            Ok("long") => Profile::LONG,
            Ok("quick") | Err(_) => Profile::QUICK,
            Ok(other) => panic!("{PROFILE_ENV}={other:?}: expected \"long\" or \"quick\""),
        }
    }
}

/// The Python interpreter to run schemathesis with.
fn python() -> PathBuf {
    if let Some(python) = std::env::var_os(PYTHON_ENV) {
        return PathBuf::from(python);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"),
        PathBuf::from,
    );
    let venv = target.join("pyenv").join("bin").join("python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

fn schemathesis_available(python: &PathBuf) -> bool {
    Command::new(python)
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
    let python = python();
    assert!(
        schemathesis_available(&python),
        "{} cannot import schemathesis: run scripts/test.sh, which installs it into \
         target/pyenv, or point {PYTHON_ENV} at a Python that has it",
        python.display()
    );
    let profile = Profile::from_env();
    println!("schemathesis with {}, {profile:?}", python.display());
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
        let output = schemathesis(&python, profile, api, filter, pattern).await;
        let (stdout, stderr) = (&output.stdout, &output.stderr);
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

/// What one schemathesis run printed, and how it ended.
struct Outcome {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

/// One bounded schemathesis run checking only for server errors; killed when it
/// overruns the profile's limit.
async fn schemathesis(
    python: &PathBuf,
    profile: Profile,
    api: std::net::SocketAddr,
    filter: &'static str,
    pattern: &'static str,
) -> Outcome {
    let report = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
    let file = |name: &str| {
        std::fs::File::create(report.path().join(name)).unwrap_or_else(|err| panic!("{err}"))
    };
    let mut child = Command::new(python)
        .args(["-m", "schemathesis.cli", "run"])
        .arg(format!("http://{api}/api/v1/openapi.json"))
        .args(["--header", &format!("Authorization: Bearer {ADMIN}")])
        .args(["--checks", "not_a_server_error"])
        .args([filter, pattern])
        .args(["--max-examples", &profile.max_examples.to_string()])
        .args(["--max-time", &profile.max_time_secs.to_string()])
        .args(["--request-timeout", "15"])
        .args(["--seed", "7"])
        .arg("--no-color")
        .current_dir(report.path())
        .stdin(std::process::Stdio::null())
        .stdout(file("stdout"))
        .stderr(file("stderr"))
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run schemathesis: {err}"));
    let limit = Duration::from_secs(profile.limit_secs);
    let status = common::eventually(limit, || child.try_wait().ok().flatten()).await;
    let Some(status) = status else {
        if let Err(err) = child.kill() {
            eprintln!("kill schemathesis: {err}");
        }
        // Reaps the killed child.
        let _reaped = child.wait();
        panic!("schemathesis ran longer than {limit:?}");
    };
    let read = |name: &str| {
        std::fs::read_to_string(report.path().join(name)).unwrap_or_else(|err| panic!("{err}"))
    };
    Outcome {
        status,
        stdout: read("stdout"),
        stderr: read("stderr"),
    }
}
