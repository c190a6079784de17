//! Point values: Modbus registers and bits to typed values and back, with the byte order,
//! scale and offset of the point table.
//!
//! Pure functions, no I/O. Registers are 16-bit big-endian on the wire (Modbus Application
//! Protocol 1.1b3, 4.2); a multi-register value's byte order is the device's choice and is
//! named by the letters of a 32-bit value's bytes, most significant `A` first:
//!
//! | order  | registers hold         | 64-bit generalisation                  |
//! |--------|------------------------|----------------------------------------|
//! | `ABCD` | big-endian (the spec)  | `ABCDEFGH`                             |
//! | `CDAB` | words swapped          | `GHEFCDAB` (register order reversed)   |
//! | `BADC` | bytes swapped per word | `BADCFEHG`                             |
//! | `DCBA` | little-endian          | `HGFEDCBA`                             |
//!
//! For one-register types (`u16`, `i16`) and strings only the byte swap applies.

use serde::Deserialize;

/// A point's data type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataType {
    /// One coil or discrete input.
    Bool,
    /// One register, unsigned.
    U16,
    /// One register, two's complement.
    I16,
    /// Two registers, unsigned.
    U32,
    /// Two registers, two's complement.
    I32,
    /// Two registers, IEEE 754 single precision.
    F32,
    /// Four registers, unsigned.
    U64,
    /// Four registers, two's complement.
    I64,
    /// Four registers, IEEE 754 double precision.
    F64,
    /// `count` registers of two bytes each, UTF-8, NULs at the end trimmed.
    String,
}

impl DataType {
    /// Every type name, as the config writes it.
    pub const NAMES: &'static [&'static str] = &[
        "bool", "u16", "i16", "u32", "i32", "f32", "u64", "i64", "f64", "string",
    ];

    /// Parses a config name (`"f32"`).
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "bool" => Self::Bool,
            "u16" => Self::U16,
            "i16" => Self::I16,
            "u32" => Self::U32,
            "i32" => Self::I32,
            "f32" => Self::F32,
            "u64" => Self::U64,
            "i64" => Self::I64,
            "f64" => Self::F64,
            "string" => Self::String,
            _ => return None,
        })
    }

    /// The config name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bool => "bool",
            Self::U16 => "u16",
            Self::I16 => "i16",
            Self::U32 => "u32",
            Self::I32 => "i32",
            Self::F32 => "f32",
            Self::U64 => "u64",
            Self::I64 => "i64",
            Self::F64 => "f64",
            Self::String => "string",
        }
    }

    /// Registers (or bits, for `bool`) one value takes; `string` takes its `count`.
    pub fn width(self, string_registers: u16) -> u16 {
        match self {
            Self::Bool | Self::U16 | Self::I16 => 1,
            Self::U32 | Self::I32 | Self::F32 => 2,
            Self::U64 | Self::I64 | Self::F64 => 4,
            Self::String => string_registers,
        }
    }

    /// Whether the type is numeric (takes scale, offset and a deadband).
    pub fn is_numeric(self) -> bool {
        !matches!(self, Self::Bool | Self::String)
    }
}

/// The byte order of a multi-register value (see the module header).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum ByteOrder {
    /// Big-endian, as the Modbus specification sends single registers.
    #[default]
    #[serde(rename = "ABCD")]
    Abcd,
    /// Registers in reverse order, bytes big-endian within each.
    #[serde(rename = "CDAB")]
    Cdab,
    /// Registers in order, bytes swapped within each.
    #[serde(rename = "BADC")]
    Badc,
    /// Little-endian.
    #[serde(rename = "DCBA")]
    Dcba,
}

impl ByteOrder {
    /// Every order name, as the config writes it.
    pub const NAMES: &'static [&'static str] = &["ABCD", "CDAB", "BADC", "DCBA"];

    /// Parses a config name (`"CDAB"`).
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "ABCD" => Self::Abcd,
            "CDAB" => Self::Cdab,
            "BADC" => Self::Badc,
            "DCBA" => Self::Dcba,
            _ => return None,
        })
    }

    fn swaps_bytes(self) -> bool {
        matches!(self, Self::Badc | Self::Dcba)
    }

    fn reverses_registers(self) -> bool {
        matches!(self, Self::Cdab | Self::Dcba)
    }

    /// The value's bytes, most significant first, from its registers as read. Every step
    /// is its own inverse, so [`ByteOrder::to_registers`] applies the same steps.
    fn to_big_endian(self, registers: &[u16], out: &mut Vec<u8>) {
        out.clear();
        let mut push = |register: u16| {
            let bytes = if self.swaps_bytes() {
                register.swap_bytes().to_be_bytes()
            } else {
                register.to_be_bytes()
            };
            out.extend_from_slice(&bytes);
        };
        if self.reverses_registers() {
            registers.iter().rev().copied().for_each(&mut push);
        } else {
            registers.iter().copied().for_each(&mut push);
        }
    }

    /// The registers to write for a value whose bytes are `big_endian`.
    fn to_registers(self, big_endian: &[u8]) -> Vec<u16> {
        let mut registers: Vec<u16> = big_endian
            .chunks(2)
            .map(|pair| {
                let register = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
                if self.swaps_bytes() {
                    register.swap_bytes()
                } else {
                    register
                }
            })
            .collect();
        if self.reverses_registers() {
            registers.reverse();
        }
        registers
    }
}

/// A decoded value before scale and offset.
#[derive(Debug, Clone, PartialEq)]
pub enum RawValue {
    /// A coil or discrete input.
    Bool(bool),
    /// `u16`, `u32`, `u64`.
    Unsigned(u64),
    /// `i16`, `i32`, `i64`.
    Signed(i64),
    /// `f32`, `f64`.
    Float(f64),
    /// `string`.
    Text(String),
}

/// Why a value could not be decoded or encoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValueError {
    /// The device returned fewer registers than the type needs.
    #[error("{data_type} needs {needed} register(s), got {got}")]
    Short {
        /// The point's type name.
        data_type: &'static str,
        /// Registers needed.
        needed: usize,
        /// Registers there were.
        got: usize,
    },
    /// A float register pair holds NaN or an infinity (JSON cannot carry it).
    #[error("not a finite number")]
    NotFinite,
    /// A value to write does not fit the point's type.
    #[error("{value} is out of range for {data_type}")]
    OutOfRange {
        /// The value, scaled back to raw units.
        value: String,
        /// The point's type name.
        data_type: &'static str,
    },
    /// A value to write has the wrong JSON type.
    #[error("expected {expected} for a {data_type} point")]
    WrongType {
        /// What the point takes.
        expected: &'static str,
        /// The point's type name.
        data_type: &'static str,
    },
}

/// Decodes one value of `data_type` from the registers read at its address.
pub fn decode(
    data_type: DataType,
    order: ByteOrder,
    registers: &[u16],
) -> Result<RawValue, ValueError> {
    let needed = usize::from(data_type.width(u16::try_from(registers.len()).unwrap_or(0)));
    if registers.len() < needed || needed == 0 {
        return Err(ValueError::Short {
            data_type: data_type.name(),
            needed: needed.max(1),
            got: registers.len(),
        });
    }
    let mut bytes = Vec::with_capacity(needed * 2);
    order.to_big_endian(&registers[..needed], &mut bytes);
    let array = |bytes: &[u8]| -> [u8; 8] {
        let mut out = [0u8; 8];
        out[8 - bytes.len()..].copy_from_slice(bytes);
        out
    };
    let unsigned = || u64::from_be_bytes(array(&bytes));
    Ok(match data_type {
        DataType::Bool => {
            return Err(ValueError::WrongType {
                expected: "a coil or discrete input",
                data_type: data_type.name(),
            });
        }
        DataType::U16 | DataType::U32 | DataType::U64 => RawValue::Unsigned(unsigned()),
        DataType::I16 => RawValue::Signed(i64::from(i16::from_be_bytes([bytes[0], bytes[1]]))),
        DataType::I32 => RawValue::Signed(i64::from(i32::from_be_bytes([
            bytes[0], bytes[1], bytes[2], bytes[3],
        ]))),
        DataType::I64 => RawValue::Signed(i64::from_be_bytes(array(&bytes))),
        DataType::F32 => {
            let value = f32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            if !value.is_finite() {
                return Err(ValueError::NotFinite);
            }
            // Through the f32's shortest decimal, so 0.1f32 reports as 0.1, not
            // 0.10000000149011612 (the same f32 either way).
            RawValue::Float(value.to_string().parse::<f64>().unwrap_or(f64::from(value)))
        }
        DataType::F64 => {
            let value = f64::from_be_bytes(array(&bytes));
            if !value.is_finite() {
                return Err(ValueError::NotFinite);
            }
            RawValue::Float(value)
        }
        DataType::String => {
            let end = bytes
                .iter()
                .position(|byte| *byte == 0)
                .unwrap_or(bytes.len());
            RawValue::Text(String::from_utf8_lossy(&bytes[..end]).into_owned())
        }
    })
}

/// Encodes `value` (raw units) as the registers to write at the point's address.
pub fn encode(
    data_type: DataType,
    order: ByteOrder,
    string_registers: u16,
    value: &RawValue,
) -> Result<Vec<u16>, ValueError> {
    let name = data_type.name();
    let out_of_range = |value: String| ValueError::OutOfRange {
        value,
        data_type: name,
    };
    let integer = |value: &RawValue| -> Result<i128, ValueError> {
        match value {
            RawValue::Unsigned(value) => Ok(i128::from(*value)),
            RawValue::Signed(value) => Ok(i128::from(*value)),
            RawValue::Float(value) if value.fract() == 0.0 && value.is_finite() => {
                // Exact: a float with no fraction below 2^127 converts losslessly here.
                if value.abs() < 1.7e38 {
                    #[allow(clippy::cast_possible_truncation, reason = "range checked above")]
                    Ok(*value as i128)
                } else {
                    Err(out_of_range(value.to_string()))
                }
            }
            RawValue::Float(value) => Err(out_of_range(value.to_string())),
            _ => Err(ValueError::WrongType {
                expected: "a number",
                data_type: name,
            }),
        }
    };
    let float = |value: &RawValue| -> Result<f64, ValueError> {
        #[allow(clippy::cast_precision_loss, reason = "a float point takes any number")]
        match value {
            RawValue::Unsigned(value) => Ok(*value as f64),
            RawValue::Signed(value) => Ok(*value as f64),
            RawValue::Float(value) if value.is_finite() => Ok(*value),
            RawValue::Float(_) => Err(ValueError::NotFinite),
            _ => Err(ValueError::WrongType {
                expected: "a number",
                data_type: name,
            }),
        }
    };
    let bytes: Vec<u8> = match data_type {
        DataType::Bool => {
            return Err(ValueError::WrongType {
                expected: "a coil",
                data_type: name,
            });
        }
        DataType::U16 => {
            let raw = integer(value)?;
            u16::try_from(raw)
                .map_err(|_| out_of_range(raw.to_string()))?
                .to_be_bytes()
                .to_vec()
        }
        DataType::I16 => {
            let raw = integer(value)?;
            i16::try_from(raw)
                .map_err(|_| out_of_range(raw.to_string()))?
                .to_be_bytes()
                .to_vec()
        }
        DataType::U32 => {
            let raw = integer(value)?;
            u32::try_from(raw)
                .map_err(|_| out_of_range(raw.to_string()))?
                .to_be_bytes()
                .to_vec()
        }
        DataType::I32 => {
            let raw = integer(value)?;
            i32::try_from(raw)
                .map_err(|_| out_of_range(raw.to_string()))?
                .to_be_bytes()
                .to_vec()
        }
        DataType::U64 => {
            let raw = integer(value)?;
            u64::try_from(raw)
                .map_err(|_| out_of_range(raw.to_string()))?
                .to_be_bytes()
                .to_vec()
        }
        DataType::I64 => {
            let raw = integer(value)?;
            i64::try_from(raw)
                .map_err(|_| out_of_range(raw.to_string()))?
                .to_be_bytes()
                .to_vec()
        }
        DataType::F32 => {
            let raw = float(value)?;
            if raw.abs() > f64::from(f32::MAX) {
                return Err(out_of_range(raw.to_string()));
            }
            #[allow(clippy::cast_possible_truncation, reason = "range checked above")]
            (raw as f32).to_be_bytes().to_vec()
        }
        DataType::F64 => float(value)?.to_be_bytes().to_vec(),
        DataType::String => {
            let RawValue::Text(text) = value else {
                return Err(ValueError::WrongType {
                    expected: "a string",
                    data_type: name,
                });
            };
            let capacity = usize::from(string_registers) * 2;
            if text.len() > capacity {
                return Err(out_of_range(format!("{} bytes", text.len())));
            }
            let mut bytes = text.as_bytes().to_vec();
            bytes.resize(capacity, 0);
            // Strings keep their character order: only the byte swap applies.
            let order = if order.swaps_bytes() {
                ByteOrder::Badc
            } else {
                ByteOrder::Abcd
            };
            return Ok(order.to_registers(&bytes));
        }
    };
    let order = if data_type.width(0) == 1 {
        // One register: only the byte swap means something.
        if order.swaps_bytes() {
            ByteOrder::Badc
        } else {
            ByteOrder::Abcd
        }
    } else {
        order
    };
    Ok(order.to_registers(&bytes))
}

/// Decodes like [`decode`], with strings read in character order (only the byte swap
/// of `order` applies to them, and to one-register types).
pub fn decode_point(
    data_type: DataType,
    order: ByteOrder,
    registers: &[u16],
) -> Result<RawValue, ValueError> {
    let order = if data_type == DataType::String || data_type.width(0) == 1 {
        if order.swaps_bytes() {
            ByteOrder::Badc
        } else {
            ByteOrder::Abcd
        }
    } else {
        order
    };
    decode(data_type, order, registers)
}

/// A value as the event's JSON carries it: `raw × scale + offset` for numbers (an integer
/// stays an integer when scale is 1 and offset 0), booleans and strings as they are.
pub fn to_json(raw: &RawValue, scale: f64, offset: f64) -> serde_json::Value {
    let identity = scale == 1.0 && offset == 0.0;
    #[allow(
        clippy::cast_precision_loss,
        reason = "scaled values are floats by nature"
    )]
    let scaled = |value: f64| {
        let value = if identity {
            value
        } else {
            // 12 significant digits: 126 × 0.1 reports as 12.6, not 12.600000000000001.
            format!("{:.11e}", value * scale + offset)
                .parse::<f64>()
                .unwrap_or(value * scale + offset)
        };
        serde_json::Number::from_f64(value)
            .map_or(serde_json::Value::Null, serde_json::Value::Number)
    };
    #[allow(
        clippy::cast_precision_loss,
        reason = "scaled values are floats by nature"
    )]
    match raw {
        RawValue::Bool(value) => serde_json::Value::Bool(*value),
        RawValue::Unsigned(value) if identity => serde_json::Value::from(*value),
        RawValue::Signed(value) if identity => serde_json::Value::from(*value),
        RawValue::Unsigned(value) => scaled(*value as f64),
        RawValue::Signed(value) => scaled(*value as f64),
        RawValue::Float(value) => scaled(*value),
        RawValue::Text(text) => serde_json::Value::String(text.clone()),
    }
}

/// A value from a command (engineering units) back to raw units for [`encode`]:
/// `(value − offset) / scale`, rounded to the nearest integer for integer types.
pub fn from_json(
    data_type: DataType,
    value: &serde_json::Value,
    scale: f64,
    offset: f64,
) -> Result<RawValue, ValueError> {
    let name = data_type.name();
    match (data_type, value) {
        (DataType::Bool, serde_json::Value::Bool(value)) => Ok(RawValue::Bool(*value)),
        (DataType::Bool, serde_json::Value::Number(number)) => match number.as_u64() {
            Some(0) => Ok(RawValue::Bool(false)),
            Some(1) => Ok(RawValue::Bool(true)),
            _ => Err(ValueError::WrongType {
                expected: "true, false, 0 or 1",
                data_type: name,
            }),
        },
        (DataType::String, serde_json::Value::String(text)) => Ok(RawValue::Text(text.clone())),
        (data_type, serde_json::Value::Number(number)) if data_type.is_numeric() => {
            if scale == 1.0 && offset == 0.0 {
                if let Some(value) = number.as_u64() {
                    return Ok(RawValue::Unsigned(value));
                }
                if let Some(value) = number.as_i64() {
                    return Ok(RawValue::Signed(value));
                }
            }
            let engineering = number.as_f64().ok_or(ValueError::NotFinite)?;
            let raw = (engineering - offset) / scale;
            if matches!(data_type, DataType::F32 | DataType::F64) {
                Ok(RawValue::Float(raw))
            } else {
                Ok(RawValue::Float(raw.round()))
            }
        }
        (DataType::Bool, _) => Err(ValueError::WrongType {
            expected: "true or false",
            data_type: name,
        }),
        (DataType::String, _) => Err(ValueError::WrongType {
            expected: "a string",
            data_type: name,
        }),
        _ => Err(ValueError::WrongType {
            expected: "a number",
            data_type: name,
        }),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const ORDERS: [ByteOrder; 4] = [
        ByteOrder::Abcd,
        ByteOrder::Cdab,
        ByteOrder::Badc,
        ByteOrder::Dcba,
    ];

    #[test]
    fn f32_in_every_byte_order_matches_the_spec_examples() {
        // 21.5f32 = 0x41AC0000: A=41 B=AC C=00 D=00.
        let cases = [
            (ByteOrder::Abcd, [0x41AC, 0x0000]),
            (ByteOrder::Cdab, [0x0000, 0x41AC]),
            (ByteOrder::Badc, [0xAC41, 0x0000]),
            (ByteOrder::Dcba, [0x0000, 0xAC41]),
        ];
        for (order, registers) in cases {
            assert_eq!(
                decode_point(DataType::F32, order, &registers),
                Ok(RawValue::Float(21.5)),
                "{order:?}"
            );
            assert_eq!(
                encode(DataType::F32, order, 0, &RawValue::Float(21.5)).unwrap(),
                registers.to_vec()
            );
        }
    }

    #[test]
    fn u64_orders_generalise_to_eight_bytes() {
        let value = 0x0102_0304_0506_0708u64;
        let cases = [
            (ByteOrder::Abcd, [0x0102, 0x0304, 0x0506, 0x0708]),
            (ByteOrder::Cdab, [0x0708, 0x0506, 0x0304, 0x0102]),
            (ByteOrder::Badc, [0x0201, 0x0403, 0x0605, 0x0807]),
            (ByteOrder::Dcba, [0x0807, 0x0605, 0x0403, 0x0201]),
        ];
        for (order, registers) in cases {
            assert_eq!(
                decode_point(DataType::U64, order, &registers),
                Ok(RawValue::Unsigned(value))
            );
        }
    }

    #[test]
    fn signed_and_short_and_special_values() {
        assert_eq!(
            decode_point(DataType::I16, ByteOrder::Abcd, &[0xFFFE]),
            Ok(RawValue::Signed(-2))
        );
        assert_eq!(
            decode_point(DataType::I16, ByteOrder::Dcba, &[0xFEFF]),
            Ok(RawValue::Signed(-2))
        );
        assert!(matches!(
            decode_point(DataType::U32, ByteOrder::Abcd, &[1]),
            Err(ValueError::Short { .. })
        ));
        assert_eq!(
            decode_point(DataType::F32, ByteOrder::Abcd, &[0x7FC0, 0]),
            Err(ValueError::NotFinite)
        );
        assert_eq!(
            decode_point(DataType::String, ByteOrder::Abcd, &[0x4142, 0x4300]),
            Ok(RawValue::Text("ABC".into()))
        );
        assert_eq!(
            decode_point(DataType::String, ByteOrder::Badc, &[0x4241, 0x0043]),
            Ok(RawValue::Text("ABC".into()))
        );
        assert!(decode_point(DataType::Bool, ByteOrder::Abcd, &[1]).is_err());
        assert!(decode_point(DataType::String, ByteOrder::Abcd, &[]).is_err());
    }

    #[test]
    fn scale_offset_and_json() {
        assert_eq!(
            to_json(&RawValue::Unsigned(215), 0.1, 0.0),
            serde_json::json!(21.5)
        );
        assert_eq!(
            to_json(&RawValue::Signed(-3), 1.0, 0.0),
            serde_json::json!(-3)
        );
        assert_eq!(
            to_json(&RawValue::Signed(10), 2.0, 1.0),
            serde_json::json!(21.0)
        );
        assert_eq!(
            to_json(&RawValue::Unsigned(126), 0.1, 0.0),
            serde_json::json!(12.6)
        );
        assert_eq!(
            decode_point(DataType::F32, ByteOrder::Abcd, &[0x3DCC, 0xCCCD]),
            Ok(RawValue::Float(0.1))
        );
        let raw = from_json(DataType::U16, &serde_json::json!(21.5), 0.1, 0.0).unwrap();
        assert_eq!(raw, RawValue::Float(215.0));
        assert_eq!(
            encode(DataType::U16, ByteOrder::Abcd, 0, &raw).unwrap(),
            vec![215]
        );
        assert!(encode(DataType::U16, ByteOrder::Abcd, 0, &RawValue::Signed(-1)).is_err());
        assert!(
            encode(
                DataType::I16,
                ByteOrder::Abcd,
                0,
                &RawValue::Unsigned(40_000)
            )
            .is_err()
        );
        assert!(encode(DataType::U16, ByteOrder::Abcd, 0, &RawValue::Float(1.5)).is_err());
        assert!(from_json(DataType::U16, &serde_json::json!("x"), 1.0, 0.0).is_err());
        assert!(
            encode(
                DataType::String,
                ByteOrder::Abcd,
                1,
                &RawValue::Text("abc".into())
            )
            .is_err()
        );
    }

    fn raw_for(data_type: DataType) -> BoxedStrategy<RawValue> {
        match data_type {
            DataType::U16 => any::<u16>()
                .prop_map(|v| RawValue::Unsigned(v.into()))
                .boxed(),
            DataType::I16 => any::<i16>()
                .prop_map(|v| RawValue::Signed(v.into()))
                .boxed(),
            DataType::U32 => any::<u32>()
                .prop_map(|v| RawValue::Unsigned(v.into()))
                .boxed(),
            DataType::I32 => any::<i32>()
                .prop_map(|v| RawValue::Signed(v.into()))
                .boxed(),
            DataType::U64 => any::<u64>().prop_map(RawValue::Unsigned).boxed(),
            DataType::I64 => any::<i64>().prop_map(RawValue::Signed).boxed(),
            // As the decoder reports an f32: its shortest decimal, as f64.
            DataType::F32 => any::<f32>()
                .prop_filter("finite", |v| v.is_finite())
                .prop_map(|v| RawValue::Float(v.to_string().parse().unwrap()))
                .boxed(),
            DataType::F64 => any::<f64>()
                .prop_filter("finite", |v| v.is_finite())
                .prop_map(RawValue::Float)
                .boxed(),
            DataType::String | DataType::Bool => {
                "[a-zA-Z0-9 ]{1,12}".prop_map(RawValue::Text).boxed()
            }
        }
    }

    proptest! {
        #[test]
        fn every_type_and_order_round_trips(
            (data_type, raw) in prop_oneof![
                Just(DataType::U16), Just(DataType::I16), Just(DataType::U32),
                Just(DataType::I32), Just(DataType::F32), Just(DataType::U64),
                Just(DataType::I64), Just(DataType::F64), Just(DataType::String),
            ].prop_flat_map(|t| (Just(t), raw_for(t))),
            order in 0usize..4,
        ) {
            let order = ORDERS[order];
            let registers = encode(data_type, order, 6, &raw).unwrap();
            prop_assert_eq!(registers.len(), usize::from(data_type.width(6)));
            prop_assert_eq!(decode_point(data_type, order, &registers).unwrap(), raw);
        }

        #[test]
        fn arbitrary_registers_never_panic(
            registers in proptest::collection::vec(any::<u16>(), 0..8),
            order in 0usize..4,
        ) {
            for name in DataType::NAMES {
                let data_type = DataType::parse(name).unwrap();
                drop(decode_point(data_type, ORDERS[order], &registers));
            }
        }
    }
}
