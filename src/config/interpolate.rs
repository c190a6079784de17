//! `${VAR}` interpolation of the raw config text, so secrets stay out of config files.
//!
//! `$${` writes a literal `${`. A missing variable is an error naming its line.

use std::borrow::Cow;

/// A `${VAR}` that could not be resolved.
#[derive(Debug, PartialEq, Eq)]
pub struct InterpolationError {
    /// 1-based line of the reference.
    pub line: usize,
    /// What went wrong, naming the variable.
    pub message: String,
}

/// Replaces every `${NAME}` with `lookup(NAME)`.
pub fn interpolate(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Cow<'_, str>, InterpolationError> {
    if !text.contains('$') {
        return Ok(Cow::Borrowed(text));
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(body) = tail.strip_prefix("${") {
            let line = text[..text.len() - tail.len()].matches('\n').count() + 1;
            let Some(end) = body.find('}') else {
                return Err(InterpolationError {
                    line,
                    message: "unclosed `${`".into(),
                });
            };
            let name = &body[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(InterpolationError {
                    line,
                    message: format!("invalid environment variable name {name:?} in `${{…}}`"),
                });
            }
            let Some(value) = lookup(name) else {
                return Err(InterpolationError {
                    line,
                    message: format!("environment variable {name} is not set"),
                });
            };
            out.push_str(&escape_for_toml(&value));
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(Cow::Owned(out))
}

/// Values land inside TOML strings; escape what would end or break the string.
fn escape_for_toml(value: &str) -> Cow<'_, str> {
    if !value.contains(['"', '\\', '\n', '\r']) {
        return Cow::Borrowed(value);
    }
    let mut escaped = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        match c {
            '"' => escaped.push_str("\\\""),
            '\\' => escaped.push_str("\\\\"),
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            other => escaped.push(other),
        }
    }
    Cow::Owned(escaped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "SECRET" => Some("s3cr\"et".into()),
            "HOST" => Some("broker".into()),
            _ => None,
        }
    }

    #[test]
    fn replaces_and_escapes() {
        let out = interpolate("a = \"${HOST}:1\"\nb = \"${SECRET}\"", env).unwrap();
        assert_eq!(out, "a = \"broker:1\"\nb = \"s3cr\\\"et\"");
    }

    #[test]
    fn literal_dollar_and_escape() {
        assert_eq!(
            interpolate("a = \"$5 $${X}\"", env).unwrap(),
            "a = \"$5 ${X}\""
        );
    }

    #[test]
    fn missing_variable_names_line() {
        let err = interpolate("a = 1\nb = \"${NOPE}\"", env).unwrap_err();
        assert_eq!(err.line, 2);
        assert!(err.message.contains("NOPE"));
    }

    #[test]
    fn malformed_references() {
        assert!(interpolate("a = \"${HOST\"", env).is_err());
        assert!(interpolate("a = \"${}\"", env).is_err());
        assert!(interpolate("a = \"${A-B}\"", env).is_err());
    }
}
