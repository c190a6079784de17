//! The `device_topic` pattern (`devices/{device}/{kind}`): which publishes become
//! pipeline events, and for which device and kind.
//!
//! `{device}` and `{kind}` each stand for one whole level; `{kind}` must name an event
//! kind (`telemetry`, `status`, `alarm`, `command_result`, `event`); `{device}` must be
//! a valid device id. Everything else in the pattern is matched literally.

use fieldgate_codec::validate_device_id;
use fieldgate_core::{DeviceId, EventKind};

/// Why a pattern is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// `{device}` or `{kind}` missing, repeated or not a whole level.
    #[error(
        "device_topic needs `{{device}}` and `{{kind}}` once each, each a whole level (e.g. \"devices/{{device}}/{{kind}}\")"
    )]
    Placeholders,
    /// A literal level with a wildcard, or an empty pattern.
    #[error("device_topic must be a topic name: no `+`, `#` or empty pattern")]
    NotATopic,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    Device,
    Kind,
}

/// A parsed `device_topic`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTopic {
    levels: Vec<Level>,
}

impl DeviceTopic {
    /// Parses and checks a pattern.
    pub fn parse(pattern: &str) -> Result<Self, PatternError> {
        if pattern.is_empty() || pattern.contains(['+', '#', '\0']) {
            return Err(PatternError::NotATopic);
        }
        let levels: Vec<Level> = pattern
            .split('/')
            .map(|level| match level {
                "{device}" => Level::Device,
                "{kind}" => Level::Kind,
                other => Level::Literal(other.to_owned()),
            })
            .collect();
        let count = |wanted: &Level| levels.iter().filter(|level| *level == wanted).count();
        let stray = levels
            .iter()
            .any(|level| matches!(level, Level::Literal(text) if text.contains('{') || text.contains('}')));
        if count(&Level::Device) != 1 || count(&Level::Kind) != 1 || stray {
            return Err(PatternError::Placeholders);
        }
        Ok(Self { levels })
    }

    /// The device and kind a topic names, when it matches the pattern.
    pub fn matches(&self, topic: &str) -> Option<(DeviceId, EventKind)> {
        let mut device = None;
        let mut kind = None;
        let mut parts = topic.split('/');
        for level in &self.levels {
            let part = parts.next()?;
            match level {
                Level::Literal(text) if text == part => {}
                Level::Literal(_) => return None,
                Level::Device => {
                    validate_device_id(part).ok()?;
                    device = Some(part);
                }
                Level::Kind => kind = Some(EventKind::parse(part)?),
            }
        }
        if parts.next().is_some() {
            return None;
        }
        Some((DeviceId::new(device?), kind?))
    }

    /// The pattern with `{device}` filled in and `{kind}` as `+`: the filter of every
    /// topic a device may publish its events on.
    pub fn filter_for(&self, device: &str) -> String {
        self.levels
            .iter()
            .map(|level| match level {
                Level::Literal(text) => text.as_str(),
                Level::Device => device,
                Level::Kind => "+",
            })
            .collect::<Vec<_>>()
            .join("/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_parse_and_match() {
        let pattern = DeviceTopic::parse("devices/{device}/{kind}").unwrap();
        assert_eq!(
            pattern.matches("devices/d1/telemetry"),
            Some((DeviceId::new("d1"), EventKind::Telemetry))
        );
        assert_eq!(
            pattern
                .matches("devices/d1/command_result")
                .map(|(_, kind)| kind),
            Some(EventKind::CommandResult)
        );
        assert_eq!(pattern.matches("devices/d1/nope"), None);
        assert_eq!(pattern.matches("devices/d1/telemetry/x"), None);
        assert_eq!(pattern.matches("devices/d1"), None);
        assert_eq!(pattern.matches("other/d1/telemetry"), None);
        assert_eq!(pattern.filter_for("d1"), "devices/d1/+");
        let reversed = DeviceTopic::parse("{kind}/x/{device}").unwrap();
        assert_eq!(
            reversed.matches("alarm/x/d2"),
            Some((DeviceId::new("d2"), EventKind::Alarm))
        );
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "",
            "devices/+/{kind}",
            "devices/{device}",
            "a/{device}x/{kind}",
            "{device}/{device}/{kind}",
            "a/#",
        ] {
            assert!(DeviceTopic::parse(bad).is_err(), "{bad}");
        }
    }
}
