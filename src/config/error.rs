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
    pub fn toml_error(&self, err: &toml::de::Error, prefix: &str) -> ConfigError {
        let message = err.message().trim().to_owned();
        let line = err.span().map(|span| self.line_of(span.start));
        let table = err
            .span()
            .and_then(|span| self.enclosing_table(span.start))
            .filter(|table| table.starts_with(prefix))
            .unwrap_or_else(|| prefix.to_owned());
        let key = field_named_in(&message)
            .or_else(|| err.span().and_then(|span| self.key_on_line(span.start)))
            .map(|field| join_key(&table, &field))
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

fn join_key(prefix: &str, field: &str) -> String {
    if prefix.is_empty() || field.starts_with(&format!("{prefix}.")) {
        field.to_owned()
    } else {
        format!("{prefix}.{field}")
    }
}
