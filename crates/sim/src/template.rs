//! Payload templates: a JSON text with `{name}` placeholders, parsed once and
//! rendered per message into a reused buffer, padded to a target size.
//!
//! Invariant: a placeholder is `{` + lowercase identifier + `}`; every other
//! `{` is literal JSON. Unknown placeholder names are rejected at parse time.

use std::fmt::Write as _;
use std::io::Write as _;

/// The default payload, close to the reference benchmark's ~75-byte message.
pub const DEFAULT_TEMPLATE: &str =
    r#"{"device":"{device}","seq":{seq},"t":{send_us},"temp":{walk}}"#;

/// Bytes added by the padding field when the object already has members: `,"pad":""`.
const PAD_OVERHEAD: usize = 9;

/// Why a template was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    /// A `{name}` whose name is not a known variable.
    #[error("unknown placeholder `{{{name}}}` (known: device, seq, send_us, send_ms, walk, rand)")]
    UnknownPlaceholder {
        /// The name between the braces.
        name: String,
    },
    /// Padding needs a JSON object to put the "pad" field in.
    #[error("--payload-size needs a template that ends with `}}` (a JSON object)")]
    NotAnObject,
}

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Device,
    Seq,
    SendUs,
    SendMs,
    Walk,
    Rand,
}

/// The per-message values substituted into a template.
#[derive(Debug, Clone, Copy)]
pub struct Vars<'a> {
    /// Device id, e.g. `dev-7`; inserted verbatim (ids are validated to need no JSON escaping).
    pub device: &'a str,
    /// 1-based sequence number of the message on this device.
    pub seq: u64,
    /// Send time in microseconds since the Unix epoch.
    pub send_us: u64,
    /// Current value of the device's random walk.
    pub walk: f64,
    /// A uniform random number in [0, 1).
    pub rand: f64,
}

/// A parsed payload template plus the size to pad to.
#[derive(Debug, Clone)]
pub struct PayloadTemplate {
    parts: Vec<Part>,
    pad_to: usize,
}

impl PayloadTemplate {
    /// Parses `text`; `pad_to` = 0 disables padding.
    pub fn parse(text: &str, pad_to: usize) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            literal.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let name_len = after
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(after.len());
            if name_len > 0 && after[name_len..].starts_with('}') {
                let name = &after[..name_len];
                let part = match name {
                    "device" => Part::Device,
                    "seq" => Part::Seq,
                    "send_us" => Part::SendUs,
                    "send_ms" => Part::SendMs,
                    "walk" => Part::Walk,
                    "rand" => Part::Rand,
                    other => {
                        return Err(TemplateError::UnknownPlaceholder {
                            name: other.to_owned(),
                        });
                    }
                };
                if !literal.is_empty() {
                    parts.push(Part::Literal(std::mem::take(&mut literal)));
                }
                parts.push(part);
                rest = &after[name_len + 1..];
            } else {
                literal.push('{');
                rest = after;
            }
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        if pad_to > 0 && !text.trim_end().ends_with('}') {
            return Err(TemplateError::NotAnObject);
        }
        Ok(Self { parts, pad_to })
    }

    /// True when the template contains `{seq}` (needed for ack matching and loss accounting).
    pub fn has_seq(&self) -> bool {
        self.parts.contains(&Part::Seq)
    }

    /// True when the template contains `{send_us}` (needed for latency).
    pub fn has_send_us(&self) -> bool {
        self.parts.contains(&Part::SendUs)
    }

    /// True when the template contains `{device}`.
    pub fn has_device(&self) -> bool {
        self.parts.contains(&Part::Device)
    }

    /// Appends the rendered, padded payload to `out`.
    pub fn render(&self, vars: &Vars<'_>, out: &mut Vec<u8>) {
        let start = out.len();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.extend_from_slice(text.as_bytes()),
                Part::Device => out.extend_from_slice(vars.device.as_bytes()),
                Part::Seq => push_fmt(out, format_args!("{}", vars.seq)),
                Part::SendUs => push_fmt(out, format_args!("{}", vars.send_us)),
                Part::SendMs => push_fmt(out, format_args!("{}", vars.send_us / 1000)),
                Part::Walk => push_fmt(out, format_args!("{:.2}", vars.walk)),
                Part::Rand => push_fmt(out, format_args!("{:.6}", vars.rand)),
            }
        }
        self.pad(out, start);
    }

    /// Inserts `,"pad":"xxx"` before the closing `}` so the payload reaches `pad_to` bytes.
    /// A payload already at or above the target is left alone.
    fn pad(&self, out: &mut Vec<u8>, start: usize) {
        if self.pad_to == 0 {
            return;
        }
        let Some(close) = out[start..].iter().rposition(|&b| b == b'}') else {
            return;
        };
        let close = start + close;
        let empty_object = out[start..close]
            .iter()
            .rev()
            .find(|b| !b.is_ascii_whitespace())
            .is_none_or(|&b| b == b'{');
        let overhead = if empty_object {
            PAD_OVERHEAD - 1
        } else {
            PAD_OVERHEAD
        };
        let len = out.len() - start;
        if len + overhead > self.pad_to {
            return;
        }
        let mut field = String::with_capacity(self.pad_to - len);
        if !empty_object {
            field.push(',');
        }
        field.push_str("\"pad\":\"");
        for _ in 0..self.pad_to - len - overhead {
            field.push('x');
        }
        field.push('"');
        out.splice(close..close, field.into_bytes());
    }
}

/// Appends formatted text to a byte buffer.
fn push_fmt(out: &mut Vec<u8>, args: std::fmt::Arguments<'_>) {
    // io::Write for Vec<u8> never fails.
    if out.write_fmt(args).is_err() {
        debug_assert!(false, "writing to a Vec failed");
    }
}

/// A bounded random walk, like a slowly drifting sensor reading.
#[derive(Debug, Clone)]
pub struct RandomWalk {
    value: f64,
}

impl RandomWalk {
    /// Starts near room temperature, spread a little per device.
    pub fn new(rng: &mut fastrand::Rng) -> Self {
        Self {
            value: 18.0 + rng.f64() * 6.0,
        }
    }

    /// Takes one step of at most ±0.5 and returns the new value, kept within -40..=85.
    pub fn step(&mut self, rng: &mut fastrand::Rng) -> f64 {
        self.value = (self.value + rng.f64() - 0.5).clamp(-40.0, 85.0);
        self.value
    }
}

/// Renders a hello frame body: `{"type":"hello","device":ID[,"token":T]}`.
pub fn hello_json(device: &str, token: Option<&str>) -> String {
    let mut hello = String::from("{\"type\":\"hello\",\"device\":");
    hello.push_str(&json_string(device));
    if let Some(token) = token {
        hello.push_str(",\"token\":");
        hello.push_str(&json_string(token));
    }
    hello.push('}');
    hello
}

/// Quotes and escapes `text` as a JSON string.
pub fn json_string(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            c if u32::from(c) < 0x20 => {
                // fmt::Write for String never fails.
                if write!(quoted, "\\u{:04x}", u32::from(c)).is_err() {
                    debug_assert!(false, "writing to a String failed");
                }
            }
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(seq: u64) -> Vars<'static> {
        Vars {
            device: "dev-1",
            seq,
            send_us: 1_764_143_349_123_456,
            walk: 21.456,
            rand: 0.5,
        }
    }

    fn render(template: &PayloadTemplate, seq: u64) -> String {
        let mut out = Vec::new();
        template.render(&vars(seq), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn default_template_renders_valid_json_with_all_variables() {
        let template = PayloadTemplate::parse(DEFAULT_TEMPLATE, 0).unwrap();
        let text = render(&template, 42);
        assert_eq!(
            text,
            r#"{"device":"dev-1","seq":42,"t":1764143349123456,"temp":21.46}"#
        );
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["seq"], 42);
        assert!(template.has_seq() && template.has_send_us() && template.has_device());
    }

    #[test]
    fn padding_reaches_the_exact_size_and_stays_valid_json() {
        let template = PayloadTemplate::parse(DEFAULT_TEMPLATE, 100).unwrap();
        for seq in [1, 99, 123_456_789] {
            let text = render(&template, seq);
            assert_eq!(text.len(), 100, "{text}");
            let value: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(value["seq"], seq);
            assert!(value["pad"].as_str().unwrap().chars().all(|c| c == 'x'));
        }
    }

    #[test]
    fn padding_smaller_than_the_payload_leaves_it_alone() {
        let template = PayloadTemplate::parse(DEFAULT_TEMPLATE, 10).unwrap();
        let text = render(&template, 1);
        assert!(!text.contains("pad"));
    }

    #[test]
    fn padding_an_empty_object_has_no_leading_comma() {
        let template = PayloadTemplate::parse("{}", 20).unwrap();
        let text = render(&template, 1);
        assert_eq!(text.len(), 20);
        serde_json::from_str::<serde_json::Value>(&text).unwrap();
    }

    #[test]
    fn json_braces_are_literal_and_unknown_names_are_rejected() {
        let template = PayloadTemplate::parse(r#"{"a":{"b":{seq}},"ms":{send_ms}}"#, 0).unwrap();
        assert_eq!(render(&template, 7), r#"{"a":{"b":7},"ms":1764143349123}"#);
        assert_eq!(
            PayloadTemplate::parse(r#"{"x":{nope}}"#, 0).unwrap_err(),
            TemplateError::UnknownPlaceholder {
                name: "nope".into()
            }
        );
        assert_eq!(
            PayloadTemplate::parse("plain", 80).unwrap_err(),
            TemplateError::NotAnObject
        );
    }

    #[test]
    fn random_walk_stays_in_range() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut walk = RandomWalk::new(&mut rng);
        for _ in 0..100_000 {
            let v = walk.step(&mut rng);
            assert!((-40.0..=85.0).contains(&v));
        }
    }

    #[test]
    fn hello_escapes_its_fields() {
        assert_eq!(
            hello_json("dev-1", Some("s\"x")),
            r#"{"type":"hello","device":"dev-1","token":"s\"x"}"#
        );
        assert_eq!(hello_json("d", None), r#"{"type":"hello","device":"d"}"#);
    }
}
