//! Writes from commands: a `write` command's parameters (point name → value in
//! engineering units) checked against the point table and turned into Modbus write
//! requests, with the point's type conversion, byte order, scale and offset.
//!
//! Pure. Every parameter is checked before anything is written, so a command with one bad
//! value writes nothing.

use serde_json::Value;

use super::client::Operation;
use super::config::DevicePlan;
use super::plan::Area;
use super::value::{encode, from_json};

/// The command name that writes points.
pub const WRITE_COMMAND: &str = "write";

/// Why a command cannot be carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The command is not `write`.
    #[error("unknown command {0:?}; Modbus devices take \"write\"")]
    UnknownCommand(String),
    /// `params` is not an object of point names.
    #[error("params must be an object of point names and values")]
    NotAnObject,
    /// `params` names no point.
    #[error("params name no point")]
    Empty,
    /// No such point.
    #[error("no point {0:?}")]
    UnknownPoint(String),
    /// The point is not `writable = true`.
    #[error("point {0:?} is not writable")]
    NotWritable(String),
    /// The value does not fit the point.
    #[error("point {point:?}: {message}")]
    BadValue {
        /// The point.
        point: String,
        /// What is wrong.
        message: String,
    },
}

/// The writes a command asks for, in the order its parameters name them.
pub fn operations(
    device: &DevicePlan,
    name: &str,
    params: &str,
) -> Result<Vec<(String, Operation)>, WriteError> {
    if name != WRITE_COMMAND {
        return Err(WriteError::UnknownCommand(name.chars().take(64).collect()));
    }
    let params: Value = serde_json::from_str(params).map_err(|_| WriteError::NotAnObject)?;
    let Value::Object(params) = params else {
        return Err(WriteError::NotAnObject);
    };
    if params.is_empty() {
        return Err(WriteError::Empty);
    }
    let mut operations = Vec::with_capacity(params.len());
    for (point_name, value) in &params {
        let point = device
            .points
            .iter()
            .find(|point| point.name == *point_name)
            .ok_or_else(|| WriteError::UnknownPoint(point_name.chars().take(64).collect()))?;
        if !point.writable {
            return Err(WriteError::NotWritable(point.name.clone()));
        }
        let bad = |message: String| WriteError::BadValue {
            point: point.name.clone(),
            message,
        };
        let raw = from_json(point.data_type, value, point.scale, point.offset)
            .map_err(|err| bad(err.to_string()))?;
        let operation = match (point.area, raw) {
            (Area::Coil, super::value::RawValue::Bool(value)) => Operation::WriteCoil {
                address: point.address,
                value,
            },
            (Area::Holding, raw) => Operation::WriteRegisters {
                address: point.address,
                values: encode(point.data_type, point.byte_order, point.width, &raw)
                    .map_err(|err| bad(err.to_string()))?,
            },
            _ => return Err(WriteError::NotWritable(point.name.clone())),
        };
        operations.push((point.name.clone(), operation));
    }
    Ok(operations)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::modbus::config::Point;
    use crate::sources::modbus::value::{ByteOrder, DataType};

    fn device() -> DevicePlan {
        let point = |name: &str, area, address, data_type, writable| Point {
            name: name.into(),
            area,
            address,
            width: DataType::width(data_type, 0),
            data_type,
            byte_order: ByteOrder::Cdab,
            scale: if data_type == DataType::U16 { 0.1 } else { 1.0 },
            offset: 0.0,
            unit: None,
            group: 0,
            deadband: 0.0,
            writable,
        };
        DevicePlan {
            unit_id: 1,
            device: "plc-1".into(),
            points: vec![
                point("setpoint", Area::Holding, 10, DataType::U16, true),
                point("limit", Area::Holding, 20, DataType::F32, true),
                point("pump", Area::Coil, 3, DataType::Bool, true),
                point("reading", Area::Holding, 30, DataType::U16, false),
            ],
        }
    }

    #[test]
    fn writes_convert_like_reads() {
        let ops = operations(
            &device(),
            "write",
            r#"{"setpoint":21.5,"limit":21.5,"pump":true}"#,
        )
        .unwrap();
        assert_eq!(
            ops,
            vec![
                (
                    "limit".to_owned(),
                    Operation::WriteRegisters {
                        address: 20,
                        values: vec![0x0000, 0x41AC]
                    }
                ),
                (
                    "pump".to_owned(),
                    Operation::WriteCoil {
                        address: 3,
                        value: true
                    }
                ),
                (
                    "setpoint".to_owned(),
                    Operation::WriteRegisters {
                        address: 10,
                        values: vec![215]
                    }
                ),
            ]
        );
    }

    #[test]
    fn bad_commands_write_nothing() {
        let device = device();
        for (name, params, expected) in [
            ("reboot", "{}", "unknown command"),
            ("write", "[1]", "params must be an object"),
            ("write", "{}", "name no point"),
            ("write", r#"{"nope":1}"#, "no point"),
            ("write", r#"{"reading":1}"#, "not writable"),
            ("write", r#"{"setpoint":1,"pump":"on"}"#, "pump"),
            ("write", r#"{"setpoint":-5}"#, "out of range"),
            ("write", r#"{"limit":1e300}"#, "out of range"),
        ] {
            let err = operations(&device, name, params).unwrap_err().to_string();
            assert!(err.contains(expected), "{params}: {err}");
        }
    }
}
