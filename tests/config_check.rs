//! `fieldgate check`: bad config files exit non-zero with `FILE:LINE: key `a.b.c`: ...`;
//! the issue's reference config and every file in examples/ pass.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fieldgate_bin;

/// The config from the issue, which must work exactly as written.
const REFERENCE: &str = r#"[gateway]
id = "gw-1"
data_dir = "./data"

[api]
address = "127.0.0.1:8080"

[sources.devices]
type = "tcp"
address = "127.0.0.1:7000"
framing = "lines"            # or "length_prefixed"

[sinks.cloud]
type = "mqtt"
inputs = ["devices"]
url = "mqtt://127.0.0.1:1883"   # mqtts:// for TLS
client_id = "gw-1"
topic = "gateways/{gateway}/devices/{device}/{kind}"
qos = 1

[sinks.cloud.buffer]
type = "disk"
max_size = "1GiB"
when_full = "block"          # or "drop_newest", "drop_oldest"
"#;

fn check(path: &Path, envs: &[(String, String)]) -> Output {
    let mut command = Command::new(fieldgate_bin());
    command.arg("check").arg(path);
    for (key, value) in envs {
        command.env(key, value);
    }
    command.output().expect("run fieldgate check")
}

/// Writes `text` to `name` in a fresh temp dir.
fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

/// 1-based line of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in the test config"))
        + 1
}

/// Replaces the line containing `needle` by `replacement` (one or more lines).
fn replace_line(text: &str, needle: &str, replacement: &str) -> String {
    let mut found = false;
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            if !found && l.contains(needle) {
                found = true;
                replacement.to_string()
            } else {
                l.to_string()
            }
        })
        .collect();
    assert!(found, "{needle:?} not in the test config");
    out.join("\n") + "\n"
}

/// Runs `check` on a bad file and asserts exit non-zero and a message naming the file,
/// one of the `(line, key)` pairs, and every word of `also`.
fn assert_rejected(name: &str, text: &str, located: &[(usize, &str)], also: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(&dir, name, text);
    let output = check(&path, &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let file = path.display().to_string();
    assert!(
        !output.status.success(),
        "{name}: `fieldgate check` accepted a bad file (stdout {:?})",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(
        stderr.contains(&file),
        "{name}: stderr does not name the file {file}:\n{stderr}"
    );
    assert!(
        located.iter().any(|(line, key)| {
            stderr.contains(&format!("{file}:{line}:")) && stderr.contains(key)
        }),
        "{name}: stderr does not name the line and key (one of {located:?}):\n{stderr}\n--- file ---\n{text}"
    );
    for word in also {
        assert!(
            stderr.contains(word),
            "{name}: stderr lacks {word:?}:\n{stderr}"
        );
    }
}

#[test]
fn reference_config_from_the_issue_passes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(&dir, "reference.toml", REFERENCE);
    let output = check(&path, &[]);
    assert!(
        output.status.success(),
        "the issue's reference config fails `fieldgate check`:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&format!("{}: ok", path.display())),
        "expected \"FILE: ok\" on stdout, got {stdout:?}"
    );
}

#[test]
fn unknown_key_is_named() {
    let text = replace_line(
        REFERENCE,
        "framing = \"lines\"",
        "framing = \"lines\"\nadress = \"127.0.0.1:7001\"",
    );
    let line = line_of(&text, "adress");
    assert_rejected(
        "unknown_key.toml",
        &text,
        &[(line, "sources.devices.adress")],
        &[],
    );

    let text = replace_line(
        REFERENCE,
        "id = \"gw-1\"",
        "id = \"gw-1\"\nshutdown_grase = \"5s\"",
    );
    let line = line_of(&text, "shutdown_grase");
    assert_rejected(
        "unknown_gateway_key.toml",
        &text,
        &[(line, "gateway.shutdown_grase")],
        &[],
    );

    let text = replace_line(REFERENCE, "when_full", "when_ful = \"block\"");
    let line = line_of(&text, "when_ful ");
    assert_rejected(
        "unknown_buffer_key.toml",
        &text,
        &[(line, "sinks.cloud.buffer.when_ful")],
        &[],
    );
}

#[test]
fn wrong_type_is_named() {
    let text = replace_line(REFERENCE, "qos = 1", "qos = \"one\"");
    let line = line_of(&text, "qos = ");
    assert_rejected("wrong_type.toml", &text, &[(line, "sinks.cloud.qos")], &[]);

    let text = replace_line(
        REFERENCE,
        "framing = \"lines\"",
        "framing = \"lines\"\nmax_errors = \"ten\"",
    );
    let line = line_of(&text, "max_errors");
    assert_rejected(
        "wrong_type_source.toml",
        &text,
        &[(line, "sources.devices.max_errors")],
        &[],
    );

    let text = replace_line(REFERENCE, "max_size", "max_size = \"lots\"");
    let line = line_of(&text, "max_size");
    assert_rejected(
        "bad_size.toml",
        &text,
        &[(line, "sinks.cloud.buffer.max_size")],
        &[],
    );
}

/// `check`'s one-line error for `text`.
fn rejection(name: &str, text: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(&dir, name, text);
    let output = check(&path, &[]);
    assert!(!output.status.success(), "{name}: check accepted:\n{text}");
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    let file = path.display().to_string();
    stderr
        .strip_prefix(&format!("error: {file}:"))
        .unwrap_or_else(|| panic!("{name}: not `error: FILE:...`: {stderr}"))
        .to_owned()
}

/// One test per message shape: the key is named once, and the expected value is said in
/// the config's words, never as a Rust type.
#[test]
fn messages_name_the_key_once_in_config_words() {
    // An unknown table inside a component: the table is the unknown key.
    let text = replace_line(REFERENCE, "[sinks.cloud.buffer]", "[sinks.cloud.bufer]");
    let line = line_of(&text, "[sinks.cloud.bufer]");
    let message = rejection("unknown_table.toml", &text);
    assert!(
        message.starts_with(&format!(
            "{line}: key `sinks.cloud.bufer`: unknown field `bufer`, expected one of "
        )),
        "{message}"
    );

    // An unknown top-level table: the top-level key, not the header.
    let text = replace_line(REFERENCE, "[sources.devices]", "[source.devices]");
    let line = line_of(&text, "[source.devices]");
    let message = rejection("unknown_top_level.toml", &text);
    assert!(
        message.starts_with(&format!("{line}: key `source`: unknown field `source`")),
        "{message}"
    );

    // A wrong type with its own words: QoS.
    let text = replace_line(REFERENCE, "qos = 1", "qos = \"1\"");
    let line = line_of(&text, "qos = ");
    assert_eq!(
        rejection("qos_string.toml", &text),
        format!(
            "{line}: key `sinks.cloud.qos`: invalid type: string \"1\", expected an integer 0, 1 or 2"
        )
    );

    // Wrong types of plain integers and booleans.
    let text = replace_line(
        REFERENCE,
        "framing = \"lines\"",
        "framing = \"lines\"\nmax_errors = \"ten\"",
    );
    let line = line_of(&text, "max_errors");
    assert_eq!(
        rejection("integer_string.toml", &text),
        format!(
            "{line}: key `sources.devices.max_errors`: invalid type: string \"ten\", \
             expected an integer from 0 to 4294967295"
        )
    );
    let text = replace_line(
        REFERENCE,
        "framing = \"lines\"",
        "framing = \"lines\"\nmax_errors = -1",
    );
    let message = rejection("negative.toml", &text);
    assert!(
        message.ends_with("key `sources.devices.max_errors`: invalid value: integer `-1`, expected an integer from 0 to 4294967295"),
        "{message}"
    );
    let text = replace_line(
        REFERENCE,
        "framing = \"lines\"",
        "framing = \"lines\"\nack = \"yes\"",
    );
    let line = line_of(&text, "ack = ");
    assert_eq!(
        rejection("bool_string.toml", &text),
        format!(
            "{line}: key `sources.devices.ack`: invalid type: string \"yes\", \
             expected a boolean (true or false)"
        )
    );

    // A table where a value belongs.
    let text = format!("{REFERENCE}\n[sinks.cloud.qos_by_kind.alarm]\nx = 1\n");
    let message = rejection("table_for_value.toml", &text);
    for rust in ["i64", "u8", "u32", "struct ", "a map"] {
        assert!(!message.contains(rust), "{message}");
    }
}

#[test]
fn input_naming_no_source_is_named() {
    let text = replace_line(
        REFERENCE,
        "inputs = [\"devices\"]",
        "inputs = [\"devicez\"]",
    );
    let line = line_of(&text, "inputs");
    assert_rejected(
        "bad_input.toml",
        &text,
        &[(line, "sinks.cloud.inputs")],
        &["devicez"],
    );
}

#[test]
fn two_listeners_on_one_port_are_named() {
    // The API on the device port.
    let text = replace_line(REFERENCE, "127.0.0.1:8080", "address = \"127.0.0.1:7000\"");
    let api_line = line_of(&text, "address = \"127.0.0.1:7000\"");
    let source_line = line_of(&text, "type = \"tcp\"") + 1;
    assert_rejected(
        "api_on_device_port.toml",
        &text,
        &[
            (api_line, "api.address"),
            (source_line, "sources.devices.address"),
        ],
        &[],
    );

    // Two sources on one port.
    let text =
        format!("{REFERENCE}\n[sources.more]\ntype = \"tcp\"\naddress = \"127.0.0.1:7000\"\n");
    let first = line_of(&text, "address = \"127.0.0.1:7000\"");
    let second = text.lines().count();
    assert_rejected(
        "two_sources_one_port.toml",
        &text,
        &[
            (first, "sources.devices.address"),
            (second, "sources.more.address"),
        ],
        &[],
    );
}

#[test]
fn missing_environment_variable_is_named() {
    let var = "FIELDGATE_TEST_SURELY_UNSET_VARIABLE";
    let text = replace_line(
        REFERENCE,
        "client_id = \"gw-1\"",
        &format!("client_id = \"gw-1\"\nusername = \"gateway\"\npassword = \"${{{var}}}\""),
    );
    let line = line_of(&text, var);
    assert_rejected("missing_env.toml", &text, &[(line, "password")], &[var]);

    // Set on the child only, it resolves; `$${` stays a literal.
    let dir = tempfile::tempdir().expect("tempdir");
    let text = text.replace("client_id = \"gw-1\"", "client_id = \"gw-$${x}\"");
    let path = write(&dir, "with_env.toml", &text);
    let output = check(&path, &[(var.to_string(), "s3cr\"et".to_string())]);
    assert!(
        output.status.success(),
        "${{{var}}} set on the child, yet check fails:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `${NAME}` references in a config text (not `$${`).
fn env_refs(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("${") {
        let start = i + at;
        let escaped = start > 0 && bytes[start - 1] == b'$';
        if let Some(end) = text[start + 2..].find('}') {
            if !escaped {
                out.push(text[start + 2..start + 2 + end].to_string());
            }
            i = start + 2 + end;
        } else {
            break;
        }
    }
    out
}

#[test]
fn every_example_passes_check() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&examples)
        .unwrap_or_else(|e| panic!("{}: {e}", examples.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "examples/ holds no *.toml: the examples must exist and be checked"
    );
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read example");
        let envs: Vec<(String, String)> = env_refs(&text)
            .into_iter()
            .map(|name| (name, "example-value".to_string()))
            .collect();
        let output = check(file, &envs);
        if !output.status.success() {
            failures.push(format!(
                "{}: {}",
                file.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        } else {
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert!(
                stdout.contains("ok"),
                "{}: stdout {stdout:?}",
                file.display()
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} examples fail `fieldgate check`:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

#[test]
fn version_and_help() {
    let version = Command::new(fieldgate_bin())
        .arg("--version")
        .output()
        .expect("run --version");
    assert!(version.status.success());
    assert!(
        String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")),
        "--version: {:?}",
        String::from_utf8_lossy(&version.stdout)
    );
    let help = Command::new(fieldgate_bin())
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("run") && text.contains("check"),
        "--help lists the commands: {text}"
    );
}
