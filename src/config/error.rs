//! Config errors that say where: file, line and key path.

use std::fmt;
use std::ops::Range;

/// A config problem, located as precisely as the input allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file's name as given.
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// Dotted key path, e.g. `sources.devices.max_frame`, when known.
    pub key: Option<String>,
    /// What is wrong and, where possible, what would be right.
    pub message: String,
}

impl ConfigError {
    /// Drops the line for errors about the whole document (a span of 0..0 means "nowhere").
    pub fn without_line(mut self) -> Self {
        self.line = None;
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        f.write_str(": ")?;
        if let Some(key) = &self.key {
            write!(f, "key `{key}`: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The text being parsed, to turn byte spans into lines and keys.
pub struct Context<'a> {
    /// The file's name, as errors show it.
    pub file: &'a str,
    /// The text after `${VAR}` interpolation.
    pub text: &'a str,
}

impl Context<'static> {
    /// A context for errors found after loading (while building the running graph).
    pub fn running() -> Self {
        Context {
            file: "running config",
            text: "",
        }
    }
}

impl Context<'_> {
    /// An error about `key` as a whole, without a line (the key may be a default).
    pub fn key_error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        self.error_at(0..0, key, message.into()).without_line()
    }

    /// An error at `span` about `key`.
    pub fn error_at(&self, span: Range<usize>, key: &str, message: String) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            line: Some(self.line_of(span.start)),
            key: (!key.is_empty()).then(|| key.to_owned()),
            message,
        }
    }

    /// Converts a TOML/serde error inside the component at `prefix` (e.g. `sources.devices`).
    ///
    /// The key is named once: an unknown `[table]` header (`[sinks.cloud.bufer]`) is the
    /// unknown key itself, not a field inside it. The message says what was expected in the
    /// config's words (`an integer`), not Rust's (`i64`).
    pub fn toml_error(&self, err: &toml::de::Error, prefix: &str) -> ConfigError {
        let message = in_config_words(err.message().trim());
        let line = err.span().map(|span| self.line_of(span.start));
        let table = err
            .span()
            .and_then(|span| self.enclosing_table(span.start))
            .filter(|table| table.starts_with(prefix))
            .unwrap_or_else(|| prefix.to_owned());
        let unknown_header = err
            .span()
            .and_then(|span| self.header_on_line(span.start))
            .zip(unknown_field_in(&message))
            .and_then(|(header, field)| header_up_to(&header, prefix, &field));
        let key = unknown_header
            .or_else(|| {
                field_named_in(&message)
                    .or_else(|| err.span().and_then(|span| self.key_on_line(span.start)))
                    .map(|field| join_key(&table, &field))
            })
            .or_else(|| (!table.is_empty()).then_some(table));
        ConfigError {
            file: self.file.to_owned(),
            line,
            key,
            message,
        }
    }

    fn line_of(&self, offset: usize) -> usize {
        let offset = offset.min(self.text.len());
        self.text.as_bytes()[..offset]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    /// The full key path (`table.key`) of a `key = value` line, 1-based.
    pub fn key_path_on_line(&self, line: usize) -> Option<String> {
        let offset: usize = self
            .text
            .split_inclusive('\n')
            .take(line.saturating_sub(1))
            .map(str::len)
            .sum();
        let key = self.key_on_line(offset)?;
        Some(match self.enclosing_table(offset) {
            Some(table) => join_key(&table, &key),
            None => key,
        })
    }

    /// The `[table]` header above `offset`, if any.
    fn enclosing_table(&self, offset: usize) -> Option<String> {
        // Include the line holding `offset`: the span may start at a `[table]` header.
        let offset = offset.min(self.text.len());
        let line_end = self.text[offset..]
            .find('\n')
            .map_or(self.text.len(), |at| offset + at);
        self.text[..line_end]
            .lines()
            .rev()
            .map(str::trim)
            .find(|line| line.starts_with('['))
            .map(|header| {
                header
                    .trim_matches(|c| c == '[' || c == ']')
                    .trim()
                    .to_owned()
            })
    }

    /// The path of the `[table]` header written on the line holding `offset`, if it is one.
    fn header_on_line(&self, offset: usize) -> Option<String> {
        let offset = offset.min(self.text.len());
        let start = self.text[..offset].rfind('\n').map_or(0, |at| at + 1);
        let line = self.text[start..].lines().next()?.trim();
        let header = line.strip_prefix('[')?;
        let end = header.find(']')?;
        Some(header[..end].trim_matches('[').trim().to_owned())
    }

    /// The key written on the line holding `offset` (`key = value` lines only).
    fn key_on_line(&self, offset: usize) -> Option<String> {
        let offset = offset.min(self.text.len());
        let start = self.text[..offset].rfind('\n').map_or(0, |at| at + 1);
        let line = self.text[start..].lines().next()?;
        let (key, _) = line.split_once('=')?;
        let key = key.trim().trim_matches('"');
        (!key.is_empty() && !key.starts_with('[')).then(|| key.to_owned())
    }
}

/// serde names the field in "unknown field `x`" and "missing field `x`".
fn field_named_in(message: &str) -> Option<String> {
    for marker in ["unknown field `", "missing field `", "duplicate field `"] {
        if let Some(rest) = message.split(marker).nth(1) {
            return rest.split('`').next().map(str::to_owned);
        }
    }
    None
}

/// The field of serde's "unknown field `x`" only.
fn unknown_field_in(message: &str) -> Option<String> {
    let rest = message.split("unknown field `").nth(1)?;
    rest.split('`').next().map(str::to_owned)
}

/// `header` cut after its first segment below `prefix` that is `field`: in
/// `[sinks.cloud.bufer.x]` read at `sinks.cloud`, the unknown `bufer` is the key
/// `sinks.cloud.bufer`.
fn header_up_to(header: &str, prefix: &str, field: &str) -> Option<String> {
    let segments: Vec<&str> = header
        .split('.')
        .map(|segment| segment.trim().trim_matches('"'))
        .collect();
    let below = if prefix.is_empty() {
        0
    } else {
        prefix.split('.').count()
    };
    let at = segments
        .iter()
        .skip(below)
        .position(|segment| *segment == field)?;
    Some(segments[..=below + at].join("."))
}

/// serde's expectations with Rust type names (`expected i64`, `expected struct X`) in the
/// config's words (`expected an integer`, `expected a table`).
fn in_config_words(message: &str) -> String {
    const MARKER: &str = "expected ";
    let Some(at) = message.rfind(MARKER) else {
        return message.to_owned();
    };
    let (head, expected) = message.split_at(at + MARKER.len());
    let words = match expected {
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "an integer",
        "u8" => "an integer from 0 to 255",
        "u16" => "an integer from 0 to 65535",
        "u32" => "an integer from 0 to 4294967295",
        "u64" | "u128" | "usize" => "an integer, 0 or more",
        "f32" | "f64" => "a number",
        "a sequence" => "an array",
        "a map" => "a table",
        "a boolean" => "a boolean (true or false)",
        other if other.starts_with("struct ") => "a table",
        _ => return message.to_owned(),
    };
    format!("{head}{words}")
}

fn join_key(prefix: &str, field: &str) -> String {
    if prefix.is_empty() || field.starts_with(&format!("{prefix}.")) {
        field.to_owned()
    } else {
        format!("{prefix}.{field}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_type_names_become_config_words() {
        assert_eq!(
            in_config_words("invalid type: string \"1\", expected i64"),
            "invalid type: string \"1\", expected an integer"
        );
        assert_eq!(
            in_config_words("invalid value: integer `-1`, expected u32"),
            "invalid value: integer `-1`, expected an integer from 0 to 4294967295"
        );
        assert_eq!(
            in_config_words("invalid type: integer `1`, expected struct BufferConfig"),
            "invalid type: integer `1`, expected a table"
        );
        assert_eq!(
            in_config_words("invalid type: string \"x\", expected a sequence"),
            "invalid type: string \"x\", expected an array"
        );
        // Messages already in the config's words are left alone.
        let custom = "invalid type: integer `30`, expected a duration with its unit";
        assert_eq!(in_config_words(custom), custom);
    }

    #[test]
    fn an_unknown_header_is_the_key_itself() {
        assert_eq!(
            header_up_to("sinks.cloud.bufer", "sinks.cloud", "bufer").as_deref(),
            Some("sinks.cloud.bufer")
        );
        assert_eq!(
            header_up_to("source.devices", "", "source").as_deref(),
            Some("source")
        );
        assert_eq!(
            header_up_to("sinks.cloud.buffer.extra", "sinks.cloud", "extra").as_deref(),
            Some("sinks.cloud.buffer.extra")
        );
        // The component's own name is not below the prefix.
        assert_eq!(header_up_to("sinks.cloud", "sinks.cloud", "cloud"), None);
    }
}
