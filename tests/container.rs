//! The scratch container image (Containerfile): built from the static x86_64 binary in
//! dist/, run with its API published on a free loopback port, ready, then stopped.
//!
//! Skipped, with a message, without a working container engine (podman or docker with a
//! running daemon) or without dist/fieldgate-VERSION-x86_64-linux (scripts/release.sh).

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The first engine whose `info` succeeds (a docker client without a daemon fails).
fn engine() -> Option<&'static str> {
    ["podman", "docker"].into_iter().find(|engine| {
        Command::new(engine)
            .arg("info")
            .output()
            .is_ok_and(|output| output.status.success())
    })
}

fn run(engine: &str, args: &[&str]) -> Output {
    Command::new(engine)
        .args(args)
        .current_dir(ROOT)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {engine}: {err}"))
}

/// Removes the container and the image when the test ends, however it ends.
struct Cleanup {
    engine: &'static str,
    container: String,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _removed = run(self.engine, &["rm", "-f", &self.container]);
        let _untagged = run(self.engine, &["rmi", "-f", &self.image]);
    }
}

#[tokio::test]
async fn scratch_image_runs_the_static_binary() {
    let version = env!("CARGO_PKG_VERSION");
    let binary = format!("dist/fieldgate-{version}-x86_64-linux");
    let Some(engine) = engine() else {
        eprintln!("SKIPPED container image: no container engine (podman or docker daemon)");
        return;
    };
    if !Path::new(ROOT).join(&binary).is_file() {
        eprintln!("SKIPPED container image: no {binary} (run scripts/release.sh x86_64)");
        return;
    }
    let tag = format!("fieldgate-test:{}", std::process::id());
    let container = format!("fieldgate-test-{}", std::process::id());
    let _cleanup = Cleanup {
        engine,
        container: container.clone(),
        image: tag.clone(),
    };
    let built = run(
        engine,
        &[
            "build",
            "-f",
            "Containerfile",
            "--build-arg",
            &format!("VERSION={version}"),
            "-t",
            &tag,
            ".",
        ],
    );
    assert!(
        built.status.success(),
        "{engine} build: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let port = common::free_port();
    let started = run(
        engine,
        &[
            "run",
            "-d",
            "--name",
            &container,
            "-p",
            &format!("127.0.0.1:{port}:8080"),
            &tag,
        ],
    );
    assert!(
        started.status.success(),
        "{engine} run: {}",
        String::from_utf8_lossy(&started.stderr)
    );
    let addr = ([127, 0, 0, 1], port).into();
    let ready = common::eventually_async(Duration::from_secs(30), || async move {
        matches!(common::http_get(addr, "/readyz").await, Ok((200, _))).then_some(())
    })
    .await;
    let logs = run(engine, &["logs", &container]);
    assert!(
        ready.is_some(),
        "the container's /readyz never answered 200:\n{}",
        String::from_utf8_lossy(&logs.stderr)
    );
    let stopped = run(engine, &["stop", "-t", "20", &container]);
    assert!(stopped.status.success(), "{engine} stop failed");
}
