//! What a device id may look like.
//!
//! Ids end up in MQTT topic levels and file names, so they are restricted to 1..=128 bytes of
//! `[A-Za-z0-9._:-]`, and `.` and `..` are refused outright.

use crate::message::MessageError;

/// Longest device id accepted, in bytes.
pub const MAX_DEVICE_ID_LEN: usize = 128;

/// Checks a device id: 1..=[`MAX_DEVICE_ID_LEN`] bytes of `[A-Za-z0-9._:-]`, not `.` or `..`.
///
/// Anything else is [`MessageError::InvalidField`] for field `"device"`.
pub fn validate_device_id(id: &str) -> Result<(), MessageError> {
    let reason = if id.is_empty() {
        "must not be empty"
    } else if id.len() > MAX_DEVICE_ID_LEN {
        "must be at most 128 bytes"
    } else if !id.bytes().all(is_id_byte) {
        "may only contain A-Z a-z 0-9 . _ : -"
    } else if id == "." || id == ".." {
        "must not be \".\" or \"..\""
    } else {
        return Ok(());
    };
    Err(MessageError::InvalidField {
        field: "device",
        reason,
    })
}

fn is_id_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b':' | b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_whole_alphabet() {
        assert_eq!(validate_device_id("Dev_1.line-2:a"), Ok(()));
        assert_eq!(validate_device_id(&"x".repeat(MAX_DEVICE_ID_LEN)), Ok(()));
    }

    #[test]
    fn rejects_topic_and_path_characters() {
        for bad in ["", "a/b", "a+b", "a#", "a b", "..", ".", "dév", "a\0b"] {
            assert!(validate_device_id(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_device_id(&"x".repeat(MAX_DEVICE_ID_LEN + 1)).is_err());
    }
}
