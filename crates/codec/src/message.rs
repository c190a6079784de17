//! Classifying one frame as a device message (hello, heartbeat, data, command result, binary).
//!
//! Invariants: the frame is read once, without building a JSON DOM; strings borrow from the frame
//! unless escaped; every rejection is a [`MessageError`] whose [`MessageError::code`] is the wire
//! error code. Data frames are not rewritten: the caller forwards the whole frame as the payload.

use std::borrow::Cow;

use fieldgate_core::EventKind;

use crate::device_id::validate_device_id;
use crate::raw::{Fields, Value, read_fields};

/// Longest message `type` echoed back in [`MessageError::UnknownType`], in bytes.
const MAX_ECHOED_TYPE_LEN: usize = 64;

/// What one frame from a device says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceMessage<'a> {
    /// `{"type":"hello","device":..,"token":..}`, or a frame without `type` that has `token`.
    Hello {
        /// The id the device claims, already validated.
        device: Cow<'a, str>,
        /// Its token, if it sent one.
        token: Option<Cow<'a, str>>,
    },
    /// `{"type":"heartbeat"}`.
    Heartbeat,
    /// Any other JSON object; the whole frame is the event payload.
    Data {
        /// `"device"`, validated, if present.
        device: Option<Cow<'a, str>>,
        /// `"kind"`, telemetry when absent.
        kind: EventKind,
        /// `"seq"`, for ack mode.
        seq: Option<u64>,
        /// `"ts"`: device time in milliseconds since the Unix epoch.
        device_time_ms: Option<u64>,
    },
    /// `{"type":"command_result","id":..}`; forwarded as kind `command_result`.
    CommandResult {
        /// `"device"`, validated, if present.
        device: Option<Cow<'a, str>>,
        /// The command's `"id"`.
        id: Cow<'a, str>,
        /// `"seq"`, for ack mode.
        seq: Option<u64>,
    },
    /// A frame whose first non-blank byte is not `{` (only when binary frames are allowed).
    Binary,
}

/// Why a frame is not a valid device message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// Not JSON (syntax error, truncated, trailing bytes, invalid UTF-8, nested too deep).
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    /// Valid JSON, but not an object.
    #[error("not a JSON object")]
    NotAnObject,
    /// A known field has the wrong type or value, or appears twice.
    #[error("invalid field \"{field}\": {reason}")]
    InvalidField {
        /// The field's name.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `type` is a string but not one a device may send (truncated to 64 bytes).
    #[error("unknown message type \"{0}\"")]
    UnknownType(String),
    /// A hello without `device`.
    #[error("hello without \"device\"")]
    MissingDevice,
    /// `"kind":"status"`: status (online/offline) is the gateway's word about a device, so a
    /// device may not publish it (it would overwrite its own retained status).
    #[error("\"kind\":\"status\" is reserved: the gateway reports a device's status itself")]
    ReservedKind,
}

impl MessageError {
    /// The wire error code, also the metric `reason` label.
    pub fn code(&self) -> &'static str {
        match self {
            MessageError::InvalidJson(_) => "invalid_json",
            MessageError::NotAnObject => "not_an_object",
            MessageError::InvalidField { .. } => "invalid_field",
            MessageError::UnknownType(_) => "unknown_type",
            MessageError::MissingDevice => "missing_device",
            MessageError::ReservedKind => "reserved_kind",
        }
    }

    fn from_json(err: &serde_json::Error) -> Self {
        match err.classify() {
            // The field reader accepts any value in a known field, so a data error can only be
            // a top level of the wrong type.
            serde_json::error::Category::Data => MessageError::NotAnObject,
            _ => MessageError::InvalidJson(err.to_string()),
        }
    }
}

/// Classifies one frame.
///
/// With `allow_binary` (connections using `length_prefixed` framing), a frame whose first
/// non-blank byte is not `{` is [`DeviceMessage::Binary`]. Otherwise the frame must be one JSON
/// object: `type` `hello`, `heartbeat` or `command_result`; no `type` but a `token` is a hello;
/// no `type` otherwise is data. Unknown fields are skipped; a known field given twice is refused.
pub fn parse_message(frame: &[u8], allow_binary: bool) -> Result<DeviceMessage<'_>, MessageError> {
    if allow_binary && first_non_blank(frame) != Some(b'{') {
        return Ok(DeviceMessage::Binary);
    }
    // serde_json skips unknown string values without checking their UTF-8, and the frame is
    // forwarded as JSON text, so check the whole frame up front.
    let text = std::str::from_utf8(frame).map_err(|err| {
        MessageError::InvalidJson(format!("invalid UTF-8 at byte {}", err.valid_up_to()))
    })?;
    let mut fields = read_fields(text).map_err(|err| MessageError::from_json(&err))?;
    if let Some(field) = fields.duplicate {
        return Err(MessageError::InvalidField {
            field,
            reason: "appears more than once",
        });
    }
    match fields.message_type.take() {
        None if fields.token.is_some() => hello(fields),
        None => data(fields),
        Some(Value::Str(message_type)) => match &*message_type {
            "hello" => hello(fields),
            "heartbeat" => Ok(DeviceMessage::Heartbeat),
            "command_result" => command_result(fields),
            other => Err(MessageError::UnknownType(truncated(other).to_owned())),
        },
        Some(_) => Err(MessageError::InvalidField {
            field: "type",
            reason: "must be a string",
        }),
    }
}

fn hello(fields: Fields<'_>) -> Result<DeviceMessage<'_>, MessageError> {
    let device = device(fields.device)?.ok_or(MessageError::MissingDevice)?;
    let token = string("token", fields.token)?;
    Ok(DeviceMessage::Hello { device, token })
}

fn data(fields: Fields<'_>) -> Result<DeviceMessage<'_>, MessageError> {
    let kind = match string("kind", fields.kind)? {
        None => EventKind::Telemetry,
        Some(name) => match EventKind::parse(&name) {
            Some(kind @ (EventKind::Telemetry | EventKind::Alarm | EventKind::Event)) => kind,
            Some(EventKind::Status) => return Err(MessageError::ReservedKind),
            Some(EventKind::CommandResult) | None => {
                return Err(MessageError::InvalidField {
                    field: "kind",
                    reason: "must be \"telemetry\", \"alarm\" or \"event\"",
                });
            }
        },
    };
    Ok(DeviceMessage::Data {
        device: device(fields.device)?,
        kind,
        seq: unsigned("seq", fields.seq)?,
        device_time_ms: unsigned("ts", fields.ts)?,
    })
}

fn command_result(fields: Fields<'_>) -> Result<DeviceMessage<'_>, MessageError> {
    let id = string("id", fields.id)?.ok_or(MessageError::InvalidField {
        field: "id",
        reason: "is required in a command_result",
    })?;
    Ok(DeviceMessage::CommandResult {
        device: device(fields.device)?,
        id,
        seq: unsigned("seq", fields.seq)?,
    })
}

fn device(value: Option<Value<'_>>) -> Result<Option<Cow<'_, str>>, MessageError> {
    let device = string("device", value)?;
    if let Some(id) = &device {
        validate_device_id(id)?;
    }
    Ok(device)
}

fn string<'a>(
    field: &'static str,
    value: Option<Value<'a>>,
) -> Result<Option<Cow<'a, str>>, MessageError> {
    match value {
        None => Ok(None),
        Some(Value::Str(text)) => Ok(Some(text)),
        Some(_) => Err(MessageError::InvalidField {
            field,
            reason: "must be a string",
        }),
    }
}

fn unsigned(field: &'static str, value: Option<Value<'_>>) -> Result<Option<u64>, MessageError> {
    match value {
        None => Ok(None),
        Some(Value::UInt(number)) => Ok(Some(number)),
        Some(_) => Err(MessageError::InvalidField {
            field,
            reason: "must be an integer from 0 to 18446744073709551615",
        }),
    }
}

/// JSON's insignificant whitespace.
fn first_non_blank(frame: &[u8]) -> Option<u8> {
    frame
        .iter()
        .copied()
        .find(|byte| !matches!(byte, b' ' | b'\t' | b'\r' | b'\n'))
}

fn truncated(text: &str) -> &str {
    let mut end = text.len().min(MAX_ECHOED_TYPE_LEN);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
