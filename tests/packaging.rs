//! The Debian package and its systemd unit: contents, a `dpkg -i` / `-r` / `-P` round
//! trip, `systemd-analyze verify` and `systemd-analyze security`.
//!
//! The package is built from the binary cargo built for these tests by
//! scripts/package-deb.sh (the script scripts/release.sh uses), so no release build is
//! needed. The round trip installs into a temporary root with its own dpkg database
//! (`dpkg --root DIR --force-script-chrootless`; the maintainer scripts honour
//! `$DPKG_ROOT`), so it never touches the machine's packages, users or services, and
//! starts no service.

mod common;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Runs a command; panics with its output unless it succeeds.
fn run(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("cannot run {command:?}: {err}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Whether `program` runs (with `arg`, e.g. `--version`).
fn available(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .output()
        .is_ok_and(|output| output.status.success())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
}

/// Builds the amd64 package from the test binary into `dir`; returns its path.
fn build_deb(dir: &Path) -> PathBuf {
    let output = run(Command::new(Path::new(ROOT).join("scripts/package-deb.sh"))
        // xz would take minutes on the unstripped debug binary.
        .env("FIELDGATE_DEB_COMPRESSION", "none")
        .arg(common::fieldgate_bin())
        .arg("amd64")
        .arg(dir));
    let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    assert!(
        path.ends_with(format!("fieldgate_{}_amd64.deb", env!("CARGO_PKG_VERSION"))),
        "{}",
        path.display()
    );
    path
}

#[test]
fn deb_carries_binary_conffile_unit_and_maintainer_scripts() {
    if !available("dpkg-deb", "--version") {
        eprintln!("SKIPPED deb_carries_binary_conffile_unit_and_maintainer_scripts: no dpkg-deb");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let deb = build_deb(dir.path());
    let field = |name: &str| {
        String::from_utf8(run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name)).stdout)
            .expect("utf-8")
            .trim()
            .to_owned()
    };
    assert_eq!(field("Package"), "fieldgate");
    assert_eq!(field("Version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(field("Architecture"), "amd64");

    let tree = dir.path().join("tree");
    run(Command::new("dpkg-deb").arg("-R").arg(&deb).arg(&tree));
    let binary = tree.join("usr/bin/fieldgate");
    assert_eq!(
        std::fs::metadata(&binary)
            .expect("binary")
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    assert_eq!(
        std::fs::read_to_string(tree.join("DEBIAN/conffiles")).expect("conffiles"),
        "/etc/fieldgate/fieldgate.toml\n"
    );
    for script in ["postinst", "prerm", "postrm"] {
        let mode = std::fs::metadata(tree.join("DEBIAN").join(script))
            .unwrap_or_else(|err| panic!("{script}: {err}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755, "{script}");
    }
    let unit =
        std::fs::read_to_string(tree.join("lib/systemd/system/fieldgate.service")).expect("unit");
    assert_eq!(
        unit,
        std::fs::read_to_string(Path::new(ROOT).join("deploy/systemd/fieldgate.service"))
            .expect("deploy unit")
    );

    // The conffile is the embedded default, with the package's data dir, and valid.
    let config = tree.join("etc/fieldgate/fieldgate.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    assert!(
        text.lines()
            .any(|line| line == "data_dir = \"/var/lib/fieldgate\""),
        "{text}"
    );
    let default =
        String::from_utf8(run(Command::new(common::fieldgate_bin()).arg("default-config")).stdout)
            .expect("utf-8");
    let expected = default.replace("data_dir = \"./data\"", "data_dir = \"/var/lib/fieldgate\"");
    assert!(
        text.ends_with(&expected),
        "not the embedded default:\n{text}"
    );
    run(Command::new(&binary).arg("check").arg(&config));
}

#[test]
fn dpkg_round_trip_keeps_buffers_on_remove_and_deletes_them_on_purge() {
    if !available("dpkg", "--version") || !available("useradd", "--help") {
        eprintln!("SKIPPED dpkg round trip: dpkg or useradd is missing");
        return;
    }
    if !is_root() {
        eprintln!("SKIPPED dpkg round trip: needs root (dpkg sets file owners)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let deb = build_deb(dir.path());
    let root = dir.path().join("root");
    for sub in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "etc"] {
        std::fs::create_dir_all(root.join(sub)).expect("mkdir");
    }
    let files = [
        ("var/lib/dpkg/status", ""),
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/group", "root:x:0:\n"),
        ("etc/shadow", "root:*:19000:0:99999:7:::\n"),
        ("etc/gshadow", "root:*::\n"),
    ];
    for (path, text) in files {
        std::fs::write(root.join(path), text).expect("write");
    }
    let dpkg = |args: &[&str]| {
        run(Command::new("dpkg")
            .arg(format!("--root={}", root.display()))
            .arg("--force-script-chrootless")
            // The temporary root has no `passwd` package installed.
            .arg("--force-depends")
            .args(args))
    };

    dpkg(&["-i", deb.to_str().expect("utf-8 path")]);
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).expect("passwd");
    let user = passwd
        .lines()
        .find(|line| line.starts_with("fieldgate:"))
        .unwrap_or_else(|| panic!("no fieldgate user:\n{passwd}"));
    let uid: u32 = user.split(':').nth(2).expect("uid").parse().expect("uid");
    assert!(
        user.ends_with(":/var/lib/fieldgate:/usr/sbin/nologin"),
        "{user}"
    );
    let data = root.join("var/lib/fieldgate");
    let meta = std::fs::metadata(&data).expect("data dir");
    assert_eq!(meta.permissions().mode() & 0o777, 0o700, "data dir mode");
    assert_eq!(meta.uid(), uid, "data dir owner");
    let config = root.join("etc/fieldgate/fieldgate.toml");
    assert_eq!(
        std::fs::metadata(&config)
            .expect("config")
            .permissions()
            .mode()
            & 0o777,
        0o640
    );
    run(Command::new(root.join("usr/bin/fieldgate"))
        .arg("check")
        .arg(&config));

    // Buffers written by the service survive `dpkg -r`, with the config.
    let segment = data.join("buffers/local/normal/00000001.seg");
    std::fs::create_dir_all(segment.parent().expect("parent")).expect("mkdir");
    std::fs::write(&segment, b"buffered events").expect("segment");
    dpkg(&["-r", "fieldgate"]);
    assert!(!root.join("usr/bin/fieldgate").exists(), "binary removed");
    assert!(!root.join("lib/systemd/system/fieldgate.service").exists());
    assert_eq!(
        std::fs::read(&segment).expect("buffers kept on remove"),
        b"buffered events"
    );
    assert!(config.exists(), "conffile kept on remove");

    // `dpkg -P` deletes them, the config and the user.
    dpkg(&["-P", "fieldgate"]);
    assert!(!data.exists(), "data dir deleted on purge");
    assert!(!config.exists(), "conffile deleted on purge");
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).expect("passwd");
    let group = std::fs::read_to_string(root.join("etc/group")).expect("group");
    assert!(!passwd.contains("fieldgate:"), "{passwd}");
    assert!(!group.contains("fieldgate:"), "{group}");
}

/// The unit with its paths pointing at the test binary, in `dir`.
fn unit_for_test_binary(dir: &Path) -> PathBuf {
    let unit = std::fs::read_to_string(Path::new(ROOT).join("deploy/systemd/fieldgate.service"))
        .expect("unit");
    let path = dir.join("fieldgate.service");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/fieldgate", common::fieldgate_bin()),
    )
    .expect("write unit");
    path
}

#[test]
fn systemd_unit_verifies_and_is_hardened() {
    if !available("systemd-analyze", "--version") {
        eprintln!(
            "SKIPPED systemd_unit_verifies_and_is_hardened: systemd-analyze is not installed"
        );
        return;
    }
    let unit_text =
        std::fs::read_to_string(Path::new(ROOT).join("deploy/systemd/fieldgate.service"))
            .expect("unit");
    for line in [
        "Type=notify",
        "WatchdogSec=30s",
        "Restart=on-failure",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/fieldgate",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "SystemCallFilter=@system-service",
    ] {
        assert!(unit_text.lines().any(|l| l == line), "unit lacks {line}");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = unit_for_test_binary(dir.path());
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && !stderr.contains("fieldgate.service:"),
        "systemd-analyze verify: {}\n{stderr}",
        verify.status
    );
    // Exposure 2.0 or less is "OK" in systemd's scale (10 = unprotected).
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=20", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze security");
    let report = String::from_utf8_lossy(&security.stdout);
    assert!(
        security.status.success(),
        "systemd-analyze security above 2.0: {}\n{report}{}",
        security.status,
        String::from_utf8_lossy(&security.stderr)
    );
    let level = report
        .lines()
        .find(|line| line.contains("Overall exposure level"))
        .unwrap_or_default();
    eprintln!("{}", level.trim());
}
