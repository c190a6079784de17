//! Topic templates: `gateways/{gateway}/devices/{device}/{kind}` and friends.
//!
//! Parsed once at config load, so an unknown placeholder is a config error and
//! rendering per event is a few string pushes.

use std::fmt;

use fieldgate_core::Event;
use serde::{Deserialize, Deserializer};

/// A placeholder in a topic template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placeholder {
    Gateway,
    Device,
    Kind,
    Source,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Placeholder(Placeholder),
}

/// A parsed topic template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    parts: Vec<Part>,
    text: String,
}

/// Why a template is invalid.
#[derive(Debug, PartialEq, Eq)]
pub struct TemplateError(String);

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TopicTemplate {
    /// Parses `text`; placeholders are `{gateway}`, `{device}`, `{kind}` and `{source}`.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        if text.is_empty() {
            return Err(TemplateError("a topic cannot be empty".into()));
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err(TemplateError(format!("unclosed `{{` in topic {text:?}")));
            };
            let name = &rest[open + 1..open + close];
            let placeholder = match name {
                "gateway" => Placeholder::Gateway,
                "device" => Placeholder::Device,
                "kind" => Placeholder::Kind,
                "source" => Placeholder::Source,
                other => {
                    return Err(TemplateError(format!(
                        "unknown placeholder {{{other}}} in topic {text:?}; use {{gateway}}, {{device}}, {{kind}} or {{source}}"
                    )));
                }
            };
            parts.push(Part::Placeholder(placeholder));
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(TemplateError(format!("unmatched `}}` in topic {text:?}")));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        Ok(Self {
            parts,
            text: text.to_owned(),
        })
    }

    /// Whether the template (outside placeholders) contains MQTT wildcards.
    pub fn has_wildcards(&self) -> bool {
        self.parts
            .iter()
            .any(|part| matches!(part, Part::Literal(text) if text.contains(['+', '#'])))
    }

    /// Whether the template uses per-event placeholders (`{device}`, `{kind}`).
    pub fn is_per_event(&self) -> bool {
        self.parts.iter().any(|part| {
            matches!(
                part,
                Part::Placeholder(Placeholder::Device | Placeholder::Kind)
            )
        })
    }

    /// Whether `{gateway}` is the only placeholder used (status and command topics).
    pub fn uses_only_gateway(&self) -> bool {
        self.parts.iter().all(|part| {
            matches!(
                part,
                Part::Literal(_) | Part::Placeholder(Placeholder::Gateway)
            )
        })
    }

    /// Renders the topic for one event.
    pub fn render(&self, gateway: &str, event: &Event) -> String {
        self.render_with(
            gateway,
            Some(event.device.as_str()),
            Some(event.kind.as_str()),
            &event.source,
        )
    }

    /// Renders with only the gateway known (status and command topics); per-event
    /// placeholders render empty.
    pub fn render_gateway(&self, gateway: &str) -> String {
        self.render_with(gateway, None, None, "")
    }

    fn render_with(
        &self,
        gateway: &str,
        device: Option<&str>,
        kind: Option<&str>,
        source: &str,
    ) -> String {
        let mut topic = String::with_capacity(self.text.len() + 32);
        for part in &self.parts {
            match part {
                Part::Literal(text) => topic.push_str(text),
                Part::Placeholder(Placeholder::Gateway) => topic.push_str(gateway),
                Part::Placeholder(Placeholder::Device) => {
                    topic.push_str(device.unwrap_or_default())
                }
                Part::Placeholder(Placeholder::Kind) => topic.push_str(kind.unwrap_or_default()),
                Part::Placeholder(Placeholder::Source) => topic.push_str(source),
            }
        }
        topic
    }
}

/// Matches a topic against a filter with exactly one `+`, returning what the `+` matched.
pub fn single_wildcard_match<'t>(filter: &str, topic: &'t str) -> Option<&'t str> {
    let mut filter_levels = filter.split('/');
    let mut captured = None;
    for level in topic.split('/') {
        match filter_levels.next()? {
            "+" => captured = Some(level),
            literal if literal == level => {}
            _ => return None,
        }
    }
    if filter_levels.next().is_some() {
        return None;
    }
    captured
}

impl<'de> Deserialize<'de> for TopicTemplate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        TopicTemplate::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use fieldgate_core::{DeviceId, EventKind, PayloadFormat};

    #[test]
    fn renders_placeholders() {
        let template = TopicTemplate::parse("gateways/{gateway}/devices/{device}/{kind}").unwrap();
        let event = Event::new(
            DeviceId::new("dev-1"),
            EventKind::Alarm,
            "devices".into(),
            0,
            PayloadFormat::Json,
            Bytes::new(),
        );
        assert_eq!(
            template.render("gw-1", &event),
            "gateways/gw-1/devices/dev-1/alarm"
        );
        assert!(template.is_per_event());
        assert!(!template.has_wildcards());
    }

    #[test]
    fn rejects_bad_templates() {
        for bad in ["", "a/{nope}", "a/{device", "a/device}", "{}"] {
            assert!(TopicTemplate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn matches_single_wildcard() {
        let filter = "gateways/gw-1/devices/+/commands";
        assert_eq!(
            single_wildcard_match(filter, "gateways/gw-1/devices/d7/commands"),
            Some("d7")
        );
        assert_eq!(
            single_wildcard_match(filter, "gateways/gw-1/devices/d7/other"),
            None
        );
        assert_eq!(
            single_wildcard_match(filter, "gateways/gw-1/devices/d7"),
            None
        );
        assert_eq!(
            single_wildcard_match(filter, "gateways/gw-1/devices/d7/commands/x"),
            None
        );
    }
}
