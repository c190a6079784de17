//! The running config as JSON with its secrets replaced, for `GET /api/v1/config`.

use serde_json::Value;

/// Keys whose values are secrets, wherever they appear.
const SECRET_KEYS: [&str; 4] = ["admin_token", "previous_admin_token", "tokens", "password"];

/// What a secret's value is replaced with.
const REDACTED: &str = "<redacted>";

/// The (already valid) config text as JSON, every value under a secret key redacted.
pub fn redacted(text: &str) -> Value {
    let table: toml::Table = match text.parse() {
        Ok(table) => table,
        // The text was parsed before the config was accepted; this cannot happen, and
        // an empty object leaks nothing if it does.
        Err(_) => return Value::Object(serde_json::Map::new()),
    };
    let mut value = serde_json::to_value(table).unwrap_or(Value::Null);
    redact(&mut value);
    value
}

fn redact(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map.iter_mut() {
                if SECRET_KEYS.contains(&key.as_str()) {
                    *inner = match inner {
                        Value::Array(items) => {
                            Value::Array(items.iter().map(|_| REDACTED.into()).collect())
                        }
                        _ => REDACTED.into(),
                    };
                } else {
                    redact(inner);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_replaced_everywhere() {
        let value = redacted(
            r#"
            [api]
            admin_token = "s3cret"
            [sources.a]
            tokens = ["t1", "t2"]
            [sinks.b]
            password = "pw"
            url = "mqtt://h:1"
            "#,
        );
        let text = value.to_string();
        for secret in ["s3cret", "t1", "t2", "pw"] {
            assert!(!text.contains(secret), "{secret} leaked in {text}");
        }
        assert_eq!(value["sinks"]["b"]["url"], "mqtt://h:1");
        assert_eq!(value["sources"]["a"]["tokens"][1], REDACTED);
    }
}
