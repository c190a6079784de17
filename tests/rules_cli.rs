//! `fieldgate rules test` on the recorded events in tests/fixtures/rules/, and `fieldgate
//! check` on a malformed rule: the error names the file line, the key and the position
//! inside the SQL.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fieldgate_bin;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/rules")
        .join(name)
}

fn fieldgate(args: &[&str]) -> Output {
    Command::new(fieldgate_bin())
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run fieldgate: {err}"))
}

fn rules_test(extra: &[&str], input: &Path) -> Output {
    let config = fixture("gateway.toml");
    let mut args = vec![
        "rules",
        "test",
        config.to_str().expect("utf-8 path"),
        "--input",
        input.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    fieldgate(&args)
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("utf-8 output")
}

fn expected(name: &str) -> String {
    std::fs::read_to_string(fixture(name)).expect("fixture")
}

#[test]
fn rules_test_prints_each_rules_outputs() {
    let events = fixture("events.ndjson");
    let output = rules_test(&["--transform", "hot"], &events);
    assert_eq!(stdout(&output), expected("hot.expected.ndjson"));
    let summary = String::from_utf8_lossy(&output.stderr);
    assert!(
        summary.contains("7 event(s) in, 5 out, 1 filtered by WHERE"),
        "{summary}"
    );
    let output = rules_test(&["--transform", "spikes"], &events);
    assert_eq!(stdout(&output), expected("spikes.expected.ndjson"));
}

#[test]
fn rules_test_needs_a_rule_name_when_there_are_several() {
    let output = rules_test(&[], &fixture("events.ndjson"));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("several sql transforms [\"hot\", \"spikes\"]: pick one with --transform"),
        "{stderr}"
    );
    let output = rules_test(&["--transform", "cloud"], &fixture("events.ndjson"));
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no sql transform named \"cloud\""));
}

#[test]
fn rules_test_refuses_a_malformed_input_line_with_its_number() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (line, needle) in [
        (
            "{\"device\":\"b1\",\"time\":\"yesterday\"}",
            "`time` must be RFC 3339",
        ),
        (
            "{\"device\":\"b1\",\"time\":1,\"kind\":\"x\"}",
            "unknown kind \"x\"",
        ),
        (
            "{\"device\":\"b1\",\"time\":1,\"extra\":1}",
            "unknown field `extra`",
        ),
        ("not json", "not an event"),
    ] {
        let input = dir.path().join("events.ndjson");
        std::fs::write(&input, format!("{{\"device\":\"a\",\"time\":5}}\n{line}\n"))
            .expect("write");
        let output = rules_test(&["--transform", "hot"], &input);
        assert!(!output.status.success(), "{line}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("events.ndjson:2: "), "{stderr}");
        assert!(stderr.contains(needle), "{stderr}");
    }
}

#[test]
fn rules_test_replays_a_restart_through_saved_state() {
    let dir = tempfile::tempdir().expect("temp dir");
    let all = expected("events.ndjson");
    let lines: Vec<&str> = all.lines().collect();
    let (first, second) = lines.split_at(3);
    let first_path = dir.path().join("first.ndjson");
    let second_path = dir.path().join("second.ndjson");
    std::fs::write(&first_path, first.join("\n")).expect("write");
    std::fs::write(&second_path, second.join("\n")).expect("write");
    let state = dir.path().join("hot.state");
    let state_arg = state.to_str().expect("utf-8 path");
    let mut got = stdout(&rules_test(
        &["--transform", "hot", "--save", state_arg],
        &first_path,
    ));
    got.push_str(&stdout(&rules_test(
        &["--transform", "hot", "--restore", state_arg],
        &second_path,
    )));
    assert_eq!(got, expected("hot.expected.ndjson"));
    // The state of another rule is refused.
    let output = rules_test(
        &["--transform", "spikes", "--restore", state_arg],
        &second_path,
    );
    assert!(!output.status.success());
}

#[test]
fn check_shows_where_a_rule_is_malformed() {
    let path = fixture("malformed.toml");
    let output = fieldgate(&["check", path.to_str().expect("utf-8 path")]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "malformed.toml:14: key `transforms.hot.sql`: SQL error at line 3, column 13: \
             expected an expression, found `>`"
        ),
        "{stderr}"
    );
}
