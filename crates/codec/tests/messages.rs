//! Device message classification: every message type, every error code, device ids.

use std::borrow::Cow;

use fieldgate_codec::{DeviceMessage, MessageError, parse_message, validate_device_id};
use fieldgate_core::EventKind;
use proptest::prelude::*;

fn parse(frame: &str) -> Result<DeviceMessage<'_>, MessageError> {
    parse_message(frame.as_bytes(), false)
}

fn code(frame: &str) -> &'static str {
    parse(frame).expect_err("frame should be rejected").code()
}

#[test]
fn hello_with_type() {
    let message = parse(r#"{"type":"hello","device":"dev-1","token":"secret"}"#).unwrap();
    assert_eq!(
        message,
        DeviceMessage::Hello {
            device: Cow::Borrowed("dev-1"),
            token: Some(Cow::Borrowed("secret"))
        }
    );
}

#[test]
fn hello_without_token() {
    let message = parse(r#"{"type":"hello","device":"dev-1"}"#).unwrap();
    assert_eq!(
        message,
        DeviceMessage::Hello {
            device: "dev-1".into(),
            token: None
        }
    );
}

#[test]
fn token_without_type_is_hello() {
    let message = parse(r#"{"device":"dev-1","token":"secret","temp":1}"#).unwrap();
    assert!(matches!(message, DeviceMessage::Hello { token: Some(t), .. } if t == "secret"));
}

#[test]
fn heartbeat() {
    assert_eq!(
        parse(r#" {"type":"heartbeat"} "#).unwrap(),
        DeviceMessage::Heartbeat
    );
}

#[test]
fn data_defaults() {
    let message = parse(r#"{"device":"dev-1","temp":21.5}"#).unwrap();
    assert_eq!(
        message,
        DeviceMessage::Data {
            device: Some("dev-1".into()),
            kind: EventKind::Telemetry,
            seq: None,
            device_time_ms: None
        }
    );
}

#[test]
fn data_with_every_field() {
    let message = parse(
        r#"{"kind":"alarm","seq":18446744073709551615,"ts":1764143349123,"nested":{"device":[1,{"x":null}]},"device":"d"}"#,
    )
    .unwrap();
    assert_eq!(
        message,
        DeviceMessage::Data {
            device: Some("d".into()),
            kind: EventKind::Alarm,
            seq: Some(u64::MAX),
            device_time_ms: Some(1_764_143_349_123)
        }
    );
}

#[test]
fn data_without_device() {
    let message = parse(r#"{"temp":1}"#).unwrap();
    assert!(matches!(message, DeviceMessage::Data { device: None, .. }));
    assert!(matches!(
        parse("{}").unwrap(),
        DeviceMessage::Data { device: None, .. }
    ));
}

#[test]
fn every_data_kind() {
    for (name, kind) in [
        ("telemetry", EventKind::Telemetry),
        ("alarm", EventKind::Alarm),
        ("event", EventKind::Event),
    ] {
        let frame = format!(r#"{{"kind":"{name}"}}"#);
        assert!(matches!(parse(&frame).unwrap(), DeviceMessage::Data { kind: k, .. } if k == kind));
    }
}

#[test]
fn status_kind_is_the_gateways_word() {
    let err = parse(r#"{"device":"dev-1","kind":"status","status":"online"}"#).unwrap_err();
    assert_eq!(err, MessageError::ReservedKind);
    assert_eq!(err.code(), "reserved_kind");
    assert!(err.to_string().contains("reserved"), "{err}");
}

#[test]
fn command_result() {
    let message =
        parse(r#"{"type":"command_result","id":"c-1","status":"ok","seq":7,"device":"dev-1"}"#)
            .unwrap();
    assert_eq!(
        message,
        DeviceMessage::CommandResult {
            device: Some("dev-1".into()),
            id: "c-1".into(),
            seq: Some(7)
        }
    );
}

#[test]
fn binary_only_when_allowed() {
    assert_eq!(
        parse_message(b"\x01\x02", true).unwrap(),
        DeviceMessage::Binary
    );
    assert_eq!(
        parse_message(b"  [1,2]", true).unwrap(),
        DeviceMessage::Binary
    );
    assert_eq!(
        parse_message(b" \n{\"type\":\"heartbeat\"}", true).unwrap(),
        DeviceMessage::Heartbeat
    );
    assert_eq!(
        parse_message(b"\x01\x02", false).unwrap_err().code(),
        "invalid_json"
    );
}

#[test]
fn error_invalid_json() {
    for frame in [
        "{",
        "{\"a\":}",
        "not json",
        "",
        "{} {}",
        "{\"a\":1,}",
        "{'a':1}",
    ] {
        assert_eq!(code(frame), "invalid_json", "{frame:?}");
    }
    assert_eq!(
        parse_message(b"{\"a\":\"\xff\"}", false)
            .unwrap_err()
            .code(),
        "invalid_json"
    );
}

#[test]
fn deep_nesting_does_not_overflow_the_stack() {
    for (key, expected) in [("x", None), ("device", Some("invalid_field"))] {
        let deep = format!(
            "{{\"{key}\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(parse(&deep).err().map(|err| err.code()), expected);
        let unclosed = format!("{{\"{key}\":{}", "[".repeat(100_000));
        assert_eq!(code(&unclosed), "invalid_json");
    }
}

#[test]
fn error_not_an_object() {
    for frame in ["[1,2]", "42", "\"text\"", "null", "true"] {
        assert_eq!(
            parse(frame).unwrap_err(),
            MessageError::NotAnObject,
            "{frame:?}"
        );
        assert_eq!(code(frame), "not_an_object");
    }
}

#[test]
fn error_invalid_field() {
    let cases = [
        (r#"{"device":5}"#, "device"),
        (r#"{"device":""}"#, "device"),
        (r#"{"device":"a/b"}"#, "device"),
        (r#"{"device":null}"#, "device"),
        (r#"{"kind":"weather"}"#, "kind"),
        (r#"{"kind":"command_result"}"#, "kind"),
        (r#"{"kind":1}"#, "kind"),
        (r#"{"seq":-1}"#, "seq"),
        (r#"{"seq":1.5}"#, "seq"),
        (r#"{"seq":"1"}"#, "seq"),
        (r#"{"seq":18446744073709551616}"#, "seq"),
        (r#"{"ts":-5}"#, "ts"),
        (r#"{"ts":1e3}"#, "ts"),
        (r#"{"type":1}"#, "type"),
        (r#"{"type":"hello","device":"d","token":7}"#, "token"),
        (r#"{"type":"command_result"}"#, "id"),
        (r#"{"type":"command_result","id":3}"#, "id"),
        (r#"{"device":"a","device":"b"}"#, "device"),
    ];
    for (frame, field) in cases {
        let err = parse(frame).unwrap_err();
        assert_eq!(err.code(), "invalid_field", "{frame}");
        assert!(
            matches!(err, MessageError::InvalidField { field: f, .. } if f == field),
            "{frame}: {err}"
        );
    }
}

#[test]
fn error_unknown_type() {
    assert_eq!(
        parse(r#"{"type":"ack","seq":1}"#).unwrap_err(),
        MessageError::UnknownType("ack".into())
    );
    assert_eq!(code(r#"{"type":"data"}"#), "unknown_type");
    let long = format!(r#"{{"type":"{}"}}"#, "é".repeat(100));
    match parse(&long).unwrap_err() {
        MessageError::UnknownType(echoed) => assert_eq!(echoed, "é".repeat(32)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn error_missing_device() {
    assert_eq!(
        parse(r#"{"type":"hello","token":"t"}"#).unwrap_err(),
        MessageError::MissingDevice
    );
    assert_eq!(code(r#"{"token":"t"}"#), "missing_device");
}

#[test]
fn escaped_device_id_is_unescaped() {
    let message = parse(r#"{"device":"dev\u002d1\u003aa","x":1}"#).unwrap();
    match message {
        DeviceMessage::Data {
            device: Some(device),
            ..
        } => {
            assert_eq!(device, "dev-1:a");
            assert!(matches!(device, Cow::Owned(_)));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn escaped_keys_are_recognised() {
    let message = parse(r#"{"\u0064evice":"dev-1","t\u0079pe":"hello"}"#).unwrap();
    assert_eq!(
        message,
        DeviceMessage::Hello {
            device: "dev-1".into(),
            token: None
        }
    );
}

#[test]
fn unicode_device_ids_are_refused() {
    for frame in [
        r#"{"device":"dév-1"}"#,
        r#"{"device":"d\u00e9v"}"#,
        r#"{"device":"温度計"}"#,
        r#"{"device":"a\u0000"}"#,
    ] {
        let err = parse(frame).unwrap_err();
        assert!(
            matches!(
                err,
                MessageError::InvalidField {
                    field: "device",
                    ..
                }
            ),
            "{frame}"
        );
    }
}

#[test]
fn device_id_length_limit() {
    assert_eq!(validate_device_id(&"a".repeat(128)), Ok(()));
    assert!(validate_device_id(&"a".repeat(129)).is_err());
}

#[test]
fn error_messages_name_the_field() {
    let err = parse(r#"{"seq":-1}"#).unwrap_err();
    assert!(err.to_string().contains("\"seq\""), "{err}");
}

const CODES: [&str; 5] = [
    "invalid_json",
    "not_an_object",
    "invalid_field",
    "unknown_type",
    "missing_device",
];

/// A parse result is either a message or an error with one of the documented codes.
fn well_formed(result: &Result<DeviceMessage<'_>, MessageError>) -> bool {
    result
        .as_ref()
        .err()
        .is_none_or(|err| CODES.contains(&err.code()))
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(frame in prop::collection::vec(any::<u8>(), 0..512), allow_binary: bool) {
        prop_assert!(well_formed(&parse_message(&frame, allow_binary)));
    }

    #[test]
    fn json_like_text_never_panics(frame in r#"[{}\[\]":,0-9a-z\\ .eE+-]{0,200}"#) {
        prop_assert!(well_formed(&parse_message(frame.as_bytes(), false)));
    }

    #[test]
    fn known_fields_with_arbitrary_values_never_panic(
        key in prop::sample::select(vec!["type", "device", "token", "kind", "seq", "ts", "id", "x"]),
        value in r#"("[^"\\]{0,20}"|-?[0-9]{1,25}(\.[0-9])?|true|null|\[\]|\{\})"#,
    ) {
        let frame = format!(r#"{{"{key}":{value}}}"#);
        prop_assert!(well_formed(&parse_message(frame.as_bytes(), false)));
    }
}

/// JSON string contents with escapes a device may get wrong or abuse: lone surrogates, `\u0000`,
/// truncated `\u` escapes, raw control bytes.
fn hostile_string() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        r"\\u[0-9a-fA-F]{0,4}".prop_map(String::into_bytes),
        r"\\u[dD][89abAB][0-9a-fA-F]{2}(\\u[dD][c-fC-F][0-9a-fA-F]{2})?"
            .prop_map(String::into_bytes),
        r#"\\["\\/bfnrtx0]"#.prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 1..4),
        "[a-z0-9-]{1,8}".prop_map(String::into_bytes),
    ];
    prop::collection::vec(piece, 0..12).prop_map(|pieces| pieces.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn hostile_escapes_in_known_fields_never_panic(
        key in prop::sample::select(vec!["type", "device", "token", "kind", "id", "x", "dev\\u0069ce"]),
        value in hostile_string(),
        allow_binary: bool,
    ) {
        let mut frame = format!(r#"{{"{key}":""#).into_bytes();
        frame.extend_from_slice(&value);
        frame.extend_from_slice(br#"","seq":1}"#);
        prop_assert!(well_formed(&parse_message(&frame, allow_binary)));
    }

    #[test]
    fn extreme_numbers_never_panic(
        key in prop::sample::select(vec!["seq", "ts", "temp"]),
        number in r"-?[0-9]{0,400}(\.[0-9]{0,40})?([eE][+-]?[0-9]{0,6})?",
    ) {
        let frame = format!(r#"{{"device":"dev-1","{key}":{number}}}"#);
        prop_assert!(well_formed(&parse_message(frame.as_bytes(), false)));
    }
}

#[test]
fn protocol_doc_examples() {
    let alarm = r#"{"device":"dev-1","kind":"alarm","seq":1042,"ts":1764143349123,"code":"overheat","temp":91.2}"#;
    assert_eq!(
        parse(alarm).unwrap(),
        DeviceMessage::Data {
            device: Some("dev-1".into()),
            kind: EventKind::Alarm,
            seq: Some(1042),
            device_time_ms: Some(1_764_143_349_123)
        }
    );
    let failed = r#"{"type":"command_result","id":"c-1","status":"error","error":"busy","retry_after_s":60}"#;
    assert!(
        matches!(parse(failed).unwrap(), DeviceMessage::CommandResult { id, device: None, seq: None } if id == "c-1")
    );
    for (frame, field) in [
        (r#"{"seq":"5"}"#, "seq"),
        (r#"{"ts":1.7e12}"#, "ts"),
        (r#"{"device":null}"#, "device"),
        (r#"{"kind":"weather"}"#, "kind"),
    ] {
        assert!(
            matches!(parse(frame).unwrap_err(), MessageError::InvalidField { field: f, .. } if f == field)
        );
    }
}
