//! Validation and normalisation of untrusted fields: device and command ids, MAC, IMEI (Luhn),
//! names, labels. Pure; every size is capped.

use std::collections::BTreeMap;

use crate::error::RegistryError;

/// Longest name, model, label value or token label.
pub(crate) const MAX_TEXT_LEN: usize = 256;
/// Most labels on one device.
pub(crate) const MAX_LABELS: usize = 64;
/// Longest label key.
pub(crate) const MAX_LABEL_KEY_LEN: usize = 64;
/// Longest serialised command params.
pub(crate) const MAX_PARAMS_LEN: usize = 64 * 1024;

/// Device ids follow `fieldgate_codec::validate_device_id`: 1..=128 of `[A-Za-z0-9._:-]`, not `.`/`..`.
pub(crate) fn device_id(id: &str) -> Result<(), RegistryError> {
    fieldgate_codec::validate_device_id(id).map_err(|_| {
        RegistryError::invalid(
            "id",
            "must be 1..=128 of A-Z a-z 0-9 . _ : - (and not \".\" or \"..\")",
        )
    })
}

/// Command ids use the same alphabet as device ids.
pub(crate) fn command_id(id: &str) -> Result<(), RegistryError> {
    fieldgate_codec::validate_device_id(id).map_err(|_| {
        RegistryError::invalid("id", "command id must be 1..=128 of A-Z a-z 0-9 . _ : -")
    })
}

/// Normalise a MAC: 6 hex octets separated by `:` or `-` (consistently) or nothing.
/// Returns `00:11:22:33:44:55`.
pub(crate) fn mac(text: &str) -> Result<String, RegistryError> {
    let invalid = || {
        RegistryError::invalid(
            "mac",
            "expected 6 hex octets like 00:11:22:33:44:55, 00-11-22-33-44-55 or 001122334455",
        )
    };
    if text.len() > 17 {
        return Err(invalid());
    }
    let digits: String = match text.len() {
        12 => text.to_owned(),
        17 => {
            let separator = text.as_bytes()[2];
            if separator != b':' && separator != b'-' {
                return Err(invalid());
            }
            let bytes = text.as_bytes();
            for (index, byte) in bytes.iter().enumerate() {
                if index % 3 == 2 && *byte != separator {
                    return Err(invalid());
                }
            }
            text.chars().filter(|c| *c != separator as char).collect()
        }
        _ => return Err(invalid()),
    };
    if digits.len() != 12 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid());
    }
    let digits = digits.to_ascii_lowercase();
    let octets: Vec<&str> = (0..6).map(|i| &digits[i * 2..i * 2 + 2]).collect();
    Ok(octets.join(":"))
}

/// An IMEI: exactly 15 ASCII digits whose last is the Luhn check digit.
pub(crate) fn imei(text: &str) -> Result<String, RegistryError> {
    if text.len() != 15 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RegistryError::invalid("imei", "expected 15 digits"));
    }
    if !luhn_valid(text) {
        return Err(RegistryError::invalid(
            "imei",
            "Luhn check digit does not match",
        ));
    }
    Ok(text.to_owned())
}

/// Luhn checksum over ASCII digits (caller checked they are digits).
pub(crate) fn luhn_valid(digits: &str) -> bool {
    let sum: u32 = digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(index, byte)| {
            let digit = u32::from(byte - b'0');
            if index % 2 == 1 {
                let doubled = digit * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                digit
            }
        })
        .sum();
    sum % 10 == 0
}

/// The id of a self-registered device: `mac-001122334455` or `imei-<digits>`.
pub(crate) fn id_from_mac(normalised_mac: &str) -> String {
    format!("mac-{}", normalised_mac.replace(':', ""))
}

/// The id of a self-registered device with an IMEI and no MAC.
pub(crate) fn id_from_imei(imei: &str) -> String {
    format!("imei-{imei}")
}

/// A free-text field: at most 256 bytes, no control characters.
pub(crate) fn text(field: &'static str, value: &str) -> Result<(), RegistryError> {
    if value.len() > MAX_TEXT_LEN {
        return Err(RegistryError::invalid(
            field,
            format!("longer than {MAX_TEXT_LEN} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(RegistryError::invalid(field, "contains control characters"));
    }
    Ok(())
}

/// Optional free text.
pub(crate) fn opt_text(field: &'static str, value: Option<&str>) -> Result<(), RegistryError> {
    value.map_or(Ok(()), |value| text(field, value))
}

/// Labels: at most 64, keys 1..=64 of `[A-Za-z0-9._/-]`, values free text.
pub(crate) fn labels(labels: &BTreeMap<String, String>) -> Result<(), RegistryError> {
    if labels.len() > MAX_LABELS {
        return Err(RegistryError::invalid(
            "labels",
            format!("more than {MAX_LABELS} labels"),
        ));
    }
    for (key, value) in labels {
        if key.is_empty()
            || key.len() > MAX_LABEL_KEY_LEN
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
        {
            return Err(RegistryError::invalid(
                "labels",
                format!("label keys are 1..={MAX_LABEL_KEY_LEN} of A-Z a-z 0-9 . _ - /"),
            ));
        }
        text("labels", value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_normalise() {
        for text in ["00:11:22:33:44:55", "00-11-22-33-44-55", "001122334455"] {
            assert_eq!(mac(text).unwrap(), "00:11:22:33:44:55");
        }
        assert_eq!(mac("AA:BB:CC:DD:EE:FF").unwrap(), "aa:bb:cc:dd:ee:ff");
        assert_eq!(
            id_from_mac(&mac("AA-BB-CC-DD-EE-0F").unwrap()),
            "mac-aabbccddee0f"
        );
    }

    #[test]
    fn bad_macs_are_invalid() {
        for text in [
            "",
            "00:11:22:33:44",
            "00:11:22:33:44:5g",
            "00:11-22:33:44:55",
            "0011.2233.4455",
            "00:11:22:33:44:55:66",
            "001122334455aa",
            "0:011:22:33:44:55",
            "ｆｆ:11:22:33:44:55",
            "00:11:22:33:44:555",
        ] {
            assert!(mac(text).is_err(), "{text:?}");
        }
        assert!(mac(&"0".repeat(1_000_000)).is_err());
    }

    #[test]
    fn imeis_need_luhn() {
        assert_eq!(imei("356938035643809").unwrap(), "356938035643809");
        assert_eq!(imei("490154203237518").unwrap(), "490154203237518");
        assert!(imei("356938035643808").is_err(), "wrong check digit");
        assert!(imei("35693803564380").is_err(), "14 digits");
        assert!(imei("3569380356438090").is_err(), "16 digits");
        assert!(imei("35693803564380a").is_err());
        assert!(imei("").is_err());
    }

    #[test]
    fn luhn_known_values() {
        assert!(luhn_valid("79927398713"));
        assert!(!luhn_valid("79927398710"));
        assert!(luhn_valid("0"));
    }

    #[test]
    fn text_and_labels_are_capped() {
        assert!(text("name", &"x".repeat(257)).is_err());
        assert!(text("name", "line\nbreak").is_err());
        assert!(text("name", "Pump 3 – Hall B").is_ok());
        let mut many = BTreeMap::new();
        for i in 0..65 {
            many.insert(format!("k{i}"), "v".into());
        }
        assert!(labels(&many).is_err());
        assert!(labels(&BTreeMap::from([("".into(), "v".into())])).is_err());
        assert!(labels(&BTreeMap::from([("a b".into(), "v".into())])).is_err());
        assert!(labels(&BTreeMap::from([("site/zone".into(), "north".into())])).is_ok());
    }
}
