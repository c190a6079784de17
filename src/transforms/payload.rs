//! Reading fields of a JSON payload by dotted path (`"env.temp"`, `"values.0"`).

use bytes::Bytes;
use fieldgate_core::{Event, PayloadFormat};
use serde_json::Value;

/// The payload of `event` as JSON; `None` for binary or malformed payloads.
pub fn parse(event: &Event) -> Option<Value> {
    match event.format {
        PayloadFormat::Json => serde_json::from_slice(&event.payload).ok(),
        PayloadFormat::Binary => None,
    }
}

/// The value at a dotted `path`; array elements by index.
pub fn get<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(value, |value, key| match value {
        Value::Object(map) => map.get(key),
        Value::Array(items) => items.get(key.parse::<usize>().ok()?),
        _ => None,
    })
}

/// The value at a dotted `path`, mutably; objects only.
pub fn get_mut<'a>(value: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter().try_fold(value, |value, key| match value {
        Value::Object(map) => map.get_mut(key),
        Value::Array(items) => items.get_mut(key.parse::<usize>().ok()?),
        _ => None,
    })
}

/// Removes and returns the value at `path`.
pub fn remove(value: &mut Value, path: &[String]) -> Option<Value> {
    let (last, parents) = path.split_last()?;
    match get_mut(value, parents)? {
        Value::Object(map) => map.remove(last),
        _ => None,
    }
}

/// Sets the value at `path`, creating objects on the way; false when a non-object is in
/// the way.
pub fn set(value: &mut Value, path: &[String], new: Value) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut current = value;
    for key in parents {
        let Value::Object(map) = current else {
            return false;
        };
        current = map
            .entry(key.clone())
            .or_insert_with(|| Value::Object(serde_json::Map::new()));
    }
    match current {
        Value::Object(map) => {
            map.insert(last.clone(), new);
            true
        }
        _ => false,
    }
}

/// Splits a dotted path; `None` if a segment is empty.
pub fn split_path(path: &str) -> Option<Vec<String>> {
    let segments: Vec<String> = path.split('.').map(str::to_owned).collect();
    segments
        .iter()
        .all(|segment| !segment.is_empty())
        .then_some(segments)
}

/// Serializes `value` as the event's new payload.
pub fn encode(value: &Value) -> Option<Bytes> {
    serde_json::to_vec(value).ok().map(Bytes::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(text: &str) -> Vec<String> {
        split_path(text).expect("valid path")
    }

    #[test]
    fn nested_paths_read_and_write() {
        let mut value: Value = serde_json::json!({"env": {"temp": 20}, "values": [1, 2]});
        assert_eq!(get(&value, &path("env.temp")), Some(&Value::from(20)));
        assert_eq!(get(&value, &path("values.1")), Some(&Value::from(2)));
        assert_eq!(get(&value, &path("values.x")), None);
        assert!(set(&mut value, &path("a.b"), Value::from(true)));
        assert_eq!(value["a"]["b"], true);
        assert_eq!(remove(&mut value, &path("env.temp")), Some(Value::from(20)));
        assert!(!set(&mut value, &path("values.0.x"), Value::Null));
    }

    #[test]
    fn empty_segments_are_refused() {
        assert!(split_path("a..b").is_none());
        assert!(split_path("").is_none());
        assert!(split_path(".a").is_none());
    }
}
