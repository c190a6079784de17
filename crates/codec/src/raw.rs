//! One pass over a frame's JSON that pulls out the fields the gateway reads and skips the rest.
//!
//! Invariants: no DOM is built (unknown fields go through `IgnoredAny`); strings borrow from the
//! frame unless they contain escapes; a known field with the wrong JSON type is kept as
//! [`Value::Other`] so validation can name the field. The parse itself fails only on bad JSON
//! syntax or a top level that is not an object.

use std::borrow::Cow;
use std::fmt;

use serde::Deserializer as _;
use serde::de::{self, Deserialize, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// A known field's value, typed just enough for validation.
#[derive(Debug)]
pub(crate) enum Value<'a> {
    /// A JSON string, unescaped.
    Str(Cow<'a, str>),
    /// A JSON integer in `0..=u64::MAX`.
    UInt(u64),
    /// Anything else: negative or fractional numbers, booleans, null, arrays, objects.
    Other,
}

/// The known fields of one device message; `None` when absent.
#[derive(Debug, Default)]
pub(crate) struct Fields<'a> {
    pub(crate) message_type: Option<Value<'a>>,
    pub(crate) device: Option<Value<'a>>,
    pub(crate) token: Option<Value<'a>>,
    pub(crate) kind: Option<Value<'a>>,
    pub(crate) seq: Option<Value<'a>>,
    pub(crate) ts: Option<Value<'a>>,
    pub(crate) id: Option<Value<'a>>,
    /// The first known field that appeared twice; duplicates are rejected by the caller.
    pub(crate) duplicate: Option<&'static str>,
}

/// Reads the known fields of the JSON object in `frame`.
///
/// Errors of category `Data` mean valid JSON that is not an object; all others are bad JSON.
pub(crate) fn read_fields(frame: &str) -> Result<Fields<'_>, serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_str(frame);
    let fields = (&mut deserializer).deserialize_map(FieldsVisitor)?;
    deserializer.end()?;
    Ok(fields)
}

#[derive(Clone, Copy)]
enum Key {
    Type,
    Device,
    Token,
    Kind,
    Seq,
    Ts,
    Id,
    Unknown,
}

impl Key {
    fn name(self) -> &'static str {
        match self {
            Key::Type => "type",
            Key::Device => "device",
            Key::Token => "token",
            Key::Kind => "kind",
            Key::Seq => "seq",
            Key::Ts => "ts",
            Key::Id => "id",
            Key::Unknown => "",
        }
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_identifier(KeyVisitor)
    }
}

struct KeyVisitor;

impl Visitor<'_> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
        Ok(match key {
            "type" => Key::Type,
            "device" => Key::Device,
            "token" => Key::Token,
            "kind" => Key::Kind,
            "seq" => Key::Seq,
            "ts" => Key::Ts,
            "id" => Key::Id,
            _ => Key::Unknown,
        })
    }
}

impl<'de> Deserialize<'de> for Value<'de> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, value: &'de str) -> Result<Self::Value, E> {
        Ok(Value::Str(Cow::Borrowed(value)))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
        Ok(Value::Str(Cow::Owned(value.to_owned())))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Self::Value, E> {
        Ok(Value::UInt(value))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Self::Value, E> {
        Ok(u64::try_from(value).map_or(Value::Other, Value::UInt))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Value::Other)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Value::Other)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Value::Other)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_seq(seq).map(|_| Value::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_map(map).map(|_| Value::Other)
    }
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Fields<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Fields::default();
        while let Some(key) = map.next_key::<Key>()? {
            let slot = match key {
                Key::Type => &mut fields.message_type,
                Key::Device => &mut fields.device,
                Key::Token => &mut fields.token,
                Key::Kind => &mut fields.kind,
                Key::Seq => &mut fields.seq,
                Key::Ts => &mut fields.ts,
                Key::Id => &mut fields.id,
                Key::Unknown => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            let value = map.next_value::<Value<'de>>()?;
            if slot.is_some() {
                fields.duplicate.get_or_insert(key.name());
            } else {
                *slot = Some(value);
            }
        }
        Ok(fields)
    }
}
