//! Config values with units: durations (`"30s"`) and byte sizes (`"64KiB"`), parsed by
//! `humantime` and `bytesize` so a bare number without its unit is an error, not a guess.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, de};

/// A duration written with its unit, e.g. `"500ms"`, `"30s"`, `"1h"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration with its unit, such as \"500ms\", \"30s\" or \"1h\"")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<HumanDuration, E> {
                humantime::parse_duration(text)
                    .map(HumanDuration)
                    .map_err(|err| E::custom(format!("invalid duration {text:?}: {err}")))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

/// A byte size written with its unit, e.g. `"64KiB"`, `"1GiB"`, `"500MB"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size with its unit, such as \"64KiB\" or \"1GiB\"")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<ByteSize, E> {
                if !text.chars().any(|c| c.is_ascii_alphabetic()) {
                    return Err(E::custom(format!(
                        "size {text:?} has no unit; write e.g. \"{text}B\" or \"64KiB\""
                    )));
                }
                text.parse::<bytesize::ByteSize>()
                    .map(|size| ByteSize(size.as_u64()))
                    .map_err(|err| E::custom(format!("invalid size {text:?}: {err}")))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Holder {
        duration: Option<HumanDuration>,
        size: Option<ByteSize>,
    }

    fn parse(text: &str) -> Result<Holder, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn parses_units() {
        let holder = parse("duration = \"1m 30s\"\nsize = \"64KiB\"").unwrap();
        assert_eq!(
            holder.duration,
            Some(HumanDuration(Duration::from_secs(90)))
        );
        assert_eq!(holder.size, Some(ByteSize(65536)));
        assert_eq!(
            parse("size = \"1GiB\"").unwrap().size,
            Some(ByteSize(1 << 30))
        );
    }

    #[test]
    fn rejects_missing_units_and_garbage() {
        for bad in [
            "duration = 30",
            "duration = \"30\"",
            "duration = \"soon\"",
            "duration = \"-1s\"",
            "size = 100",
            "size = \"lots\"",
            "size = \"1024\"",
            "size = \"1.5.5GiB\"",
        ] {
            assert!(parse(bad).is_err(), "{bad} should fail");
        }
    }
}
