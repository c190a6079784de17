//! The scratch container image (Containerfile): built from the static x86_64 binary in
//! dist/, run with its API published on a free loopback port, ready, then stopped.
//!
//! Skipped, with a message, without a working container engine (podman or docker with a
//! running daemon) or without dist/fieldgate-VERSION-x86_64-linux (scripts/release.sh).
//! Where the engine builds images but cannot start containers (a sandbox), the image's
//! contents are checked and the run is skipped with a message.

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
    // The image holds the binary, the config and a data dir the gateway's user owns.
    let created = run(engine, &["create", "--name", &container, &tag]);
    assert!(created.status.success(), "{engine} create failed");
    let tar = tempfile::NamedTempFile::new().expect("temp file");
    let tar_path = tar.path().to_str().expect("utf-8 path");
    let exported = run(engine, &["export", "-o", tar_path, &container]);
    assert!(exported.status.success(), "{engine} export failed");
    let listing = Command::new("tar")
        .args(["-tvf", tar_path])
        .output()
        .expect("tar -t");
    let listing = String::from_utf8_lossy(&listing.stdout);
    for wanted in ["usr/bin/fieldgate", "etc/fieldgate/fieldgate.toml"] {
        assert!(
            listing.lines().any(|line| line.ends_with(wanted)),
            "{wanted} not in the image:\n{listing}"
        );
    }
    assert!(
        listing
            .lines()
            .any(|line| line.contains("65532/65532") && line.ends_with("var/lib/fieldgate/")),
        "/var/lib/fieldgate not owned by 65532:\n{listing}"
    );
    let _removed = run(engine, &["rm", "-f", &container]);

    let port = common::free_port();
    let publish = format!("127.0.0.1:{port}:8080");
    let mut args = vec!["run", "-d", "--name", &container, "-p", &publish];
    if engine == "podman" {
        // podman raises the container's limits (open files, processes) by default, which
        // a process without CAP_SYS_RESOURCE (a sandbox's root) may not; keep the host's.
        args.push("--ulimit=host");
    }
    args.push(&tag);
    let started = run(engine, &args);
    let stderr = String::from_utf8_lossy(&started.stderr);
    if !started.status.success() && stderr.contains("OCI permission denied") {
        // The engine builds but cannot start any container here (a sandbox forbidding
        // its runtime's setrlimit, say): the image was checked above; say so.
        eprintln!(
            "SKIPPED running the container image: {engine} cannot start containers here: {stderr}"
        );
        return;
    }
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
