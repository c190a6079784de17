//! The values SQL expressions compute: null, booleans, numbers (f64), strings and JSON
//! arrays/objects, borrowed from the event's payload where possible.

use std::borrow::Cow;
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

/// One value; `'a` borrows from the event being evaluated.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Value<'a> {
    /// SQL `NULL`: a missing field, a failed operation.
    Null,
    /// A boolean.
    Bool(bool),
    /// Every number is an f64.
    Num(f64),
    /// A string.
    Str(Cow<'a, str>),
    /// A JSON array or object from the payload.
    Json(Cow<'a, Json>),
}

/// A value that outlives its event (group keys, aggregate state).
pub type OwnedValue = Value<'static>;

impl<'a> Value<'a> {
    /// The value of a JSON payload field, borrowed.
    pub fn from_json(json: &'a Json) -> Self {
        match json {
            Json::Null => Value::Null,
            Json::Bool(flag) => Value::Bool(*flag),
            Json::Number(number) => number.as_f64().map_or(Value::Null, Value::Num),
            Json::String(text) => Value::Str(Cow::Borrowed(text)),
            Json::Array(_) | Json::Object(_) => Value::Json(Cow::Borrowed(json)),
        }
    }

    /// Detaches the value from the event.
    pub fn into_owned(self) -> OwnedValue {
        match self {
            Value::Null => Value::Null,
            Value::Bool(flag) => Value::Bool(flag),
            Value::Num(number) => Value::Num(number),
            Value::Str(text) => Value::Str(Cow::Owned(text.into_owned())),
            Value::Json(json) => Value::Json(Cow::Owned(json.into_owned())),
        }
    }

    /// A copy that outlives the event.
    pub fn to_owned_value(&self) -> OwnedValue {
        self.clone().into_owned()
    }

    /// The value as JSON, for output payloads: integral numbers below 2^53 as integers.
    pub fn to_json(&self) -> Json {
        match self {
            Value::Null => Json::Null,
            Value::Bool(flag) => Json::Bool(*flag),
            Value::Num(number) => number_to_json(*number),
            Value::Str(text) => Json::String(text.to_string()),
            Value::Json(json) => json.as_ref().clone(),
        }
    }

    /// The number, if this is one.
    pub fn as_num(&self) -> Option<f64> {
        match self {
            Value::Num(number) => Some(*number),
            _ => None,
        }
    }

    /// SQL truth: only `TRUE` is true (null and non-booleans are not).
    pub fn is_true(&self) -> bool {
        matches!(self, Value::Bool(true))
    }

    /// The value as text, for a group's device id and `concat`.
    pub fn to_text(&self) -> Option<Cow<'_, str>> {
        match self {
            Value::Null => None,
            Value::Bool(flag) => Some(Cow::Borrowed(if *flag { "true" } else { "false" })),
            Value::Num(number) => Some(Cow::Owned(number_to_json(*number).to_string())),
            Value::Str(text) => Some(Cow::Borrowed(text)),
            Value::Json(json) => Some(Cow::Owned(json.to_string())),
        }
    }
}

/// A number as JSON: integral values below 2^53 as integers, non-finite ones as null.
pub fn number_to_json(number: f64) -> Json {
    const EXACT: f64 = 9_007_199_254_740_992.0;
    if number.fract() == 0.0 && number.abs() < EXACT {
        // In range and integral: the conversion is exact.
        #[allow(clippy::cast_possible_truncation)]
        let integer = number as i64;
        Json::from(integer)
    } else {
        serde_json::Number::from_f64(number).map_or(Json::Null, Json::Number)
    }
}

impl PartialEq for Value<'_> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Value::Null, Value::Null) => true,
            (Value::Bool(a), Value::Bool(b)) => a == b,
            (Value::Num(a), Value::Num(b)) => canonical_bits(*a) == canonical_bits(*b),
            (Value::Str(a), Value::Str(b)) => a == b,
            (Value::Json(a), Value::Json(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Value<'_> {}

impl Hash for Value<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            Value::Null => state.write_u8(0),
            Value::Bool(flag) => {
                state.write_u8(1);
                flag.hash(state);
            }
            Value::Num(number) => {
                state.write_u8(2);
                canonical_bits(*number).hash(state);
            }
            Value::Str(text) => {
                state.write_u8(3);
                text.hash(state);
            }
            Value::Json(json) => {
                state.write_u8(4);
                json.to_string().hash(state);
            }
        }
    }
}

/// Bits that make `0.0 == -0.0` and every NaN one key.
fn canonical_bits(number: f64) -> u64 {
    if number == 0.0 {
        0
    } else if number.is_nan() {
        f64::NAN.to_bits()
    } else {
        number.to_bits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_print_as_integers_when_integral() {
        assert_eq!(number_to_json(3.0), Json::from(3));
        assert_eq!(number_to_json(-0.0), Json::from(0));
        assert_eq!(number_to_json(2.5), Json::from(2.5));
        assert_eq!(number_to_json(f64::NAN), Json::Null);
        assert_eq!(number_to_json(1e300), Json::from(1e300));
    }

    #[test]
    fn keys_compare_numbers_by_value() {
        assert_eq!(Value::Num(0.0), Value::Num(-0.0));
        assert_eq!(Value::Num(f64::NAN), Value::Num(f64::NAN));
        assert_ne!(Value::Num(1.0), Value::Str(Cow::Borrowed("1")));
    }
}
