//! Text with placeholders (`alarms/{rule}/{device}`), parsed once at config check and
//! filled per alarm. Pure.
//!
//! Placeholders: `{rule}`, `{device}`, `{state}` (`raised` / `cleared`), `{severity}`.
//! `{{` and `}}` are literal braces; anything else in braces is refused at check.

/// Longest template.
const MAX_TEMPLATE: usize = 1024;

/// What a placeholder stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// The rule's name.
    Rule,
    /// The alarm's device.
    Device,
    /// `raised` or `cleared`.
    State,
    /// The rule's severity.
    Severity,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(Field),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

/// The values a template is filled with.
pub struct Values<'a> {
    /// `{rule}`.
    pub rule: &'a str,
    /// `{device}`.
    pub device: &'a str,
    /// `{state}`.
    pub state: &'a str,
    /// `{severity}`.
    pub severity: &'a str,
}

impl Template {
    /// Parses `text`, or says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("must not be empty".into());
        }
        if text.len() > MAX_TEMPLATE {
            return Err(format!("longer than {MAX_TEMPLATE} bytes"));
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(at) = rest.find(['{', '}']) {
            literal.push_str(&rest[..at]);
            let tail = &rest[at..];
            if let Some(after) = tail.strip_prefix("{{") {
                literal.push('{');
                rest = after;
            } else if let Some(after) = tail.strip_prefix("}}") {
                literal.push('}');
                rest = after;
            } else if tail.starts_with('}') {
                return Err("a lone `}`: write `}}` for a brace".into());
            } else {
                let Some(end) = tail.find('}') else {
                    return Err("a `{` without its `}`".into());
                };
                let field = match &tail[1..end] {
                    "rule" => Field::Rule,
                    "device" => Field::Device,
                    "state" => Field::State,
                    "severity" => Field::Severity,
                    other => {
                        return Err(format!(
                            "unknown placeholder {{{}}}: use {{rule}}, {{device}}, {{state}} or {{severity}}",
                            other.chars().take(32).collect::<String>()
                        ));
                    }
                };
                if !literal.is_empty() {
                    parts.push(Part::Text(std::mem::take(&mut literal)));
                }
                parts.push(Part::Field(field));
                rest = &tail[end + 1..];
            }
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Ok(Self { parts })
    }

    /// The literal pieces, for checks on what the user wrote.
    pub fn literals(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|part| match part {
            Part::Text(text) => Some(text.as_str()),
            Part::Field(_) => None,
        })
    }

    /// The text when it has no placeholder.
    pub fn as_literal(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [Part::Text(text)] => Some(text),
            _ => None,
        }
    }

    /// The template filled with `values`.
    pub fn render(&self, values: &Values<'_>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            out.push_str(match part {
                Part::Text(text) => text,
                Part::Field(Field::Rule) => values.rule,
                Part::Field(Field::Device) => values.device,
                Part::Field(Field::State) => values.state,
                Part::Field(Field::Severity) => values.severity,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const VALUES: Values<'static> = Values {
        rule: "overheat",
        device: "boiler-1",
        state: "raised",
        severity: "major",
    };

    #[test]
    fn fills_placeholders_and_keeps_escaped_braces() {
        let template = Template::parse("alarms/{rule}/{device}/{state}").expect("valid");
        assert_eq!(template.render(&VALUES), "alarms/overheat/boiler-1/raised");
        let template = Template::parse("{{x}}-{severity}").expect("valid");
        assert_eq!(template.render(&VALUES), "{x}-major");
        assert_eq!(
            Template::parse("plc-1").expect("valid").as_literal(),
            Some("plc-1")
        );
        assert_eq!(
            Template::parse("{device}").expect("valid").as_literal(),
            None
        );
    }

    #[test]
    fn refuses_malformed_templates() {
        for bad in ["", "a/{nope}", "a/{device", "a/}", "{}", &"x".repeat(2000)] {
            assert!(Template::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,64}") {
            if let Ok(template) = Template::parse(&text) {
                let _rendered = template.render(&VALUES);
            }
        }

        #[test]
        fn text_without_braces_renders_as_written(text in "[a-z/_-]{1,40}") {
            let template = Template::parse(&text).expect("no braces");
            prop_assert_eq!(template.render(&VALUES), text);
        }
    }
}
