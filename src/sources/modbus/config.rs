//! Configs of the Modbus sources (`type = "modbus_tcp"`, `type = "modbus_rtu"`) and their
//! validation into a [`PollPlan`]: devices, point tables (inline or from CSV), poll groups.
//!
//! `fieldgate check` and the source's `build` run the same [`PollPlan::resolve`], so a
//! point table that passes `check` is the one that runs. Errors name the key path and the
//! line, in the config or in the CSV file.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::plan::{Area, Limits, MAX_BITS, MAX_REGISTERS};
use super::value::{ByteOrder, DataType};
use crate::config::{ConfigError, Context, HumanDuration};

/// Keys of the event payload that are not point names.
pub const RESERVED_NAMES: &[&str] = &["quality", "ts", "units"];

/// Largest point table per device: bounds the event size and the poll's memory.
pub const MAX_POINTS: usize = 10_000;

/// Longest point name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Largest CSV points file read.
pub const MAX_POINTS_FILE: u64 = 4 * 1024 * 1024;

/// `[sources.NAME]` with `type = "modbus_tcp"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusTcpConfig {
    /// The device (or gateway) to connect to, `host:port`.
    pub address: Spanned<String>,
    /// Unit identifier sent in every request (255 or 0 for plain TCP devices; gateways
    /// route by it).
    #[serde(default = "default_unit_id")]
    pub unit_id: u8,
    /// Device id of the events.
    pub device: Spanned<String>,
    /// Inline point table.
    #[serde(default)]
    pub points: Vec<Spanned<PointConfig>>,
    /// Point table from a CSV file (see docs/MODBUS.md for its columns).
    pub points_file: Option<PathBuf>,
    /// Everything about polling.
    #[serde(flatten)]
    pub polling: PollingConfig,
}

/// `[sources.NAME]` with `type = "modbus_rtu"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusRtuConfig {
    /// Serial port device, e.g. `/dev/ttyUSB0`.
    pub port: PathBuf,
    /// Bits per second.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// `none`, `even` (the specification's default) or `odd`.
    #[serde(default)]
    pub parity: Parity,
    /// 1 or 2.
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// 7 or 8 (RTU framing needs 8; 7 only for odd devices).
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    /// The devices on the bus, each with its unit id and point table.
    pub devices: Vec<Spanned<RtuDeviceConfig>>,
    /// Everything about polling.
    #[serde(flatten)]
    pub polling: PollingConfig,
}

/// `[[sources.NAME.devices]]` of a `modbus_rtu` source.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RtuDeviceConfig {
    /// Unit identifier (1-247).
    pub unit_id: u8,
    /// Device id of its events.
    pub device: Spanned<String>,
    /// Inline point table.
    #[serde(default)]
    pub points: Vec<Spanned<PointConfig>>,
    /// Point table from a CSV file.
    pub points_file: Option<PathBuf>,
}

/// Serial parity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    /// No parity bit (use 2 stop bits, per the specification).
    None,
    /// Even parity, the specification's default.
    #[default]
    Even,
    /// Odd parity.
    Odd,
}

/// Polling keys shared by both source types (serde reads them from the same table).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PollingConfig {
    /// Interval of points that name no group.
    #[serde(default = "default_poll_interval")]
    pub poll_interval: HumanDuration,
    /// Poll groups with their own intervals: `[sources.NAME.groups.fast] interval = "100ms"`.
    #[serde(default)]
    pub groups: BTreeMap<String, GroupConfig>,
    /// Time allowed for one request's answer (and for connecting).
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// Extra attempts of a request that timed out or broke the connection.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// First wait after a device stopped answering.
    #[serde(default = "default_backoff_min")]
    pub backoff_min: HumanDuration,
    /// Longest wait between attempts on a dead device.
    #[serde(default = "default_backoff_max")]
    pub backoff_max: HumanDuration,
    /// Unused registers (or bits) read between two points to save a request.
    #[serde(default)]
    pub max_gap: u16,
    /// Registers per read request, at most 125.
    #[serde(default = "default_max_registers")]
    pub max_registers: u16,
    /// Coils or discrete inputs per read request, at most 2000.
    #[serde(default = "default_max_bits")]
    pub max_bits: u16,
    /// Send only points whose value moved by more than their deadband (or whose quality
    /// changed) since they were last sent.
    #[serde(default)]
    pub report_on_change: bool,
}

/// `[sources.NAME.groups.GROUP]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// How often the group's points are read.
    pub interval: HumanDuration,
}

/// One `[[sources.NAME.points]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointConfig {
    /// Key of the value in the event.
    pub name: String,
    /// `coil`, `discrete`, `holding` or `input`.
    pub area: Area,
    /// First register or bit (0-based, as on the wire).
    pub address: u16,
    /// Data type.
    #[serde(rename = "type")]
    pub data_type: DataType,
    /// Byte order of multi-register values.
    #[serde(default)]
    pub byte_order: ByteOrder,
    /// Multiplier applied to the raw value.
    #[serde(default = "default_scale")]
    pub scale: f64,
    /// Added after scaling.
    #[serde(default)]
    pub offset: f64,
    /// Engineering unit, carried in the event's `units`.
    pub unit: Option<String>,
    /// Registers of a `string` point.
    pub count: Option<u16>,
    /// Poll group; the source's `poll_interval` when absent.
    pub group: Option<String>,
    /// With `report_on_change`: smallest change (after scaling) that is reported.
    pub deadband: Option<f64>,
    /// Commands may write it (coils and holding registers only).
    #[serde(default)]
    pub writable: bool,
}

fn default_unit_id() -> u8 {
    1
}
fn default_baud() -> u32 {
    9600
}
fn default_stop_bits() -> u8 {
    1
}
fn default_data_bits() -> u8 {
    8
}
fn default_poll_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_retries() -> u32 {
    1
}
fn default_backoff_min() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_backoff_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_max_registers() -> u16 {
    MAX_REGISTERS
}
fn default_max_bits() -> u16 {
    MAX_BITS
}
fn default_scale() -> f64 {
    1.0
}

/// A validated point.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Key of the value in the event.
    pub name: String,
    /// Area.
    pub area: Area,
    /// First register or bit.
    pub address: u16,
    /// Registers or bits.
    pub width: u16,
    /// Data type.
    pub data_type: DataType,
    /// Byte order.
    pub byte_order: ByteOrder,
    /// Multiplier.
    pub scale: f64,
    /// Added after scaling.
    pub offset: f64,
    /// Engineering unit.
    pub unit: Option<String>,
    /// Index into [`PollPlan::intervals`].
    pub group: usize,
    /// Smallest reported change (0: any change).
    pub deadband: f64,
    /// Commands may write it.
    pub writable: bool,
}

/// A validated device: its unit id, event device id and points.
#[derive(Debug, Clone, PartialEq)]
pub struct DevicePlan {
    /// Unit identifier.
    pub unit_id: u8,
    /// Device id of its events.
    pub device: String,
    /// Its points.
    pub points: Vec<Point>,
}

/// Everything a poller needs, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct PollPlan {
    /// The devices polled over one connection (one for TCP, the bus's for RTU).
    pub devices: Vec<DevicePlan>,
    /// Poll intervals: 0 is `poll_interval`, then the groups in name order.
    pub intervals: Vec<(String, Duration)>,
    /// Request timeout.
    pub timeout: Duration,
    /// Extra attempts.
    pub retries: u32,
    /// Dead-device backoff, from, to.
    pub backoff: (Duration, Duration),
    /// Merging limits.
    pub limits: Limits,
    /// Report only changes.
    pub report_on_change: bool,
}

/// Where the points of one device come from, for error messages.
struct Table<'a> {
    /// `sources.NAME` or `sources.NAME.devices[i]`.
    path: String,
    points: &'a [Spanned<PointConfig>],
    points_file: Option<&'a Path>,
}

impl ModbusTcpConfig {
    /// Validates the source into its poll plan.
    pub fn resolve(&self, name: &str, context: &Context<'_>) -> Result<PollPlan, ConfigError> {
        let path = format!("sources.{name}");
        let address = self.address.get_ref();
        let port_ok = address
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            return Err(context.error_at(
                self.address.span(),
                &format!("{path}.address"),
                format!("expected host:port, found {address:?}"),
            ));
        }
        let table = Table {
            path: path.clone(),
            points: &self.points,
            points_file: self.points_file.as_deref(),
        };
        PollPlan::resolve(
            &path,
            &self.polling,
            &[(self.unit_id, &self.device, table)],
            context,
        )
    }
}

impl ModbusRtuConfig {
    /// Validates the source into its poll plan.
    pub fn resolve(&self, name: &str, context: &Context<'_>) -> Result<PollPlan, ConfigError> {
        let path = format!("sources.{name}");
        let key = |field: &str| format!("{path}.{field}");
        if self.baud == 0 {
            return Err(context.key_error(&key("baud"), "must be above 0"));
        }
        if !(1..=2).contains(&self.stop_bits) {
            return Err(context.key_error(&key("stop_bits"), "must be 1 or 2"));
        }
        if !(7..=8).contains(&self.data_bits) {
            return Err(context.key_error(&key("data_bits"), "must be 7 or 8"));
        }
        if self.devices.is_empty() {
            return Err(context.key_error(&key("devices"), "a bus needs at least one device"));
        }
        let mut units = HashMap::new();
        let mut tables = Vec::new();
        for (index, device) in self.devices.iter().enumerate() {
            let device_path = format!("{path}.devices[{index}]");
            let config = device.get_ref();
            if !(1..=247).contains(&config.unit_id) {
                return Err(context.error_at(
                    device.span(),
                    &format!("{device_path}.unit_id"),
                    "RTU unit ids are 1 to 247 (0 is broadcast, which has no answer)".into(),
                ));
            }
            if let Some(other) = units.insert(config.unit_id, index) {
                return Err(context.error_at(
                    device.span(),
                    &format!("{device_path}.unit_id"),
                    format!(
                        "unit id {} is already used by {path}.devices[{other}]",
                        config.unit_id
                    ),
                ));
            }
            tables.push((
                config.unit_id,
                &config.device,
                Table {
                    path: device_path,
                    points: &config.points,
                    points_file: config.points_file.as_deref(),
                },
            ));
        }
        PollPlan::resolve(&path, &self.polling, &tables, context)
    }
}

impl PollPlan {
    fn resolve(
        path: &str,
        polling: &PollingConfig,
        tables: &[(u8, &Spanned<String>, Table<'_>)],
        context: &Context<'_>,
    ) -> Result<PollPlan, ConfigError> {
        let key = |field: &str| format!("{path}.{field}");
        if polling.poll_interval.0.is_zero() {
            return Err(context.key_error(&key("poll_interval"), "must be above 0"));
        }
        let mut intervals = vec![(String::new(), polling.poll_interval.0)];
        for (group, config) in &polling.groups {
            if config.interval.0.is_zero() {
                return Err(
                    context.key_error(&key(&format!("groups.{group}.interval")), "must be above 0")
                );
            }
            intervals.push((group.clone(), config.interval.0));
        }
        if polling.timeout.0.is_zero() {
            return Err(context.key_error(&key("timeout"), "must be above 0"));
        }
        if polling.retries > 10 {
            return Err(context.key_error(&key("retries"), "at most 10"));
        }
        if polling.backoff_min.0.is_zero() || polling.backoff_max.0 < polling.backoff_min.0 {
            return Err(context.key_error(
                &key("backoff_min"),
                "backoff_min must be above 0 and at most backoff_max",
            ));
        }
        if !(1..=MAX_REGISTERS).contains(&polling.max_registers) {
            return Err(context.key_error(&key("max_registers"), "must be 1 to 125"));
        }
        if !(1..=MAX_BITS).contains(&polling.max_bits) {
            return Err(context.key_error(&key("max_bits"), "must be 1 to 2000"));
        }
        let limits = Limits {
            max_gap: polling.max_gap,
            max_registers: polling.max_registers,
            max_bits: polling.max_bits,
        };
        let mut devices = Vec::new();
        let mut device_ids: HashMap<&str, &str> = HashMap::new();
        for (unit_id, device, table) in tables {
            if let Err(err) = fieldgate_codec::validate_device_id(device.get_ref()) {
                return Err(context.error_at(
                    device.span(),
                    &format!("{}.device", table.path),
                    format!("invalid device id {:?}: {err}", device.get_ref()),
                ));
            }
            if let Some(other) = device_ids.insert(device.get_ref(), &table.path) {
                return Err(context.error_at(
                    device.span(),
                    &format!("{}.device", table.path),
                    format!(
                        "device id {:?} is already used by {other}",
                        device.get_ref()
                    ),
                ));
            }
            let points = resolve_points(table, &intervals, limits, context)?;
            devices.push(DevicePlan {
                unit_id: *unit_id,
                device: device.get_ref().clone(),
                points,
            });
        }
        Ok(PollPlan {
            devices,
            intervals,
            timeout: polling.timeout.0,
            retries: polling.retries,
            backoff: (polling.backoff_min.0, polling.backoff_max.0),
            limits,
            report_on_change: polling.report_on_change,
        })
    }
}

/// Where a point was written: a TOML span or a CSV line.
enum Origin<'a> {
    Toml(std::ops::Range<usize>),
    Csv { file: &'a Path, line: u64 },
}

/// Validates one device's point table (inline points, then the CSV file's).
fn resolve_points(
    table: &Table<'_>,
    intervals: &[(String, Duration)],
    limits: Limits,
    context: &Context<'_>,
) -> Result<Vec<Point>, ConfigError> {
    let mut entries: Vec<(PointConfig, Origin<'_>, String)> = table
        .points
        .iter()
        .enumerate()
        .map(|(index, point)| {
            (
                point.get_ref().clone(),
                Origin::Toml(point.span()),
                format!("{}.points[{index}]", table.path),
            )
        })
        .collect();
    if let Some(file) = table.points_file {
        let file_key = format!("{}.points_file", table.path);
        for (point, line) in read_points_file(file).map_err(|err| err.into_config(&file_key))? {
            entries.push((point, Origin::Csv { file, line }, file_key.clone()));
        }
    }
    if entries.is_empty() {
        return Err(context.key_error(
            &format!("{}.points", table.path),
            "no points: add [[points]] tables or a points_file",
        ));
    }
    if entries.len() > MAX_POINTS {
        return Err(context.key_error(
            &format!("{}.points", table.path),
            format!("{} points; at most {MAX_POINTS} per device", entries.len()),
        ));
    }
    let fail = |origin: &Origin<'_>, key: &str, field: &str, message: String| match origin {
        Origin::Toml(span) => context.error_at(span.clone(), &format!("{key}.{field}"), message),
        Origin::Csv { file, line } => ConfigError {
            file: file.display().to_string(),
            line: usize::try_from(*line).ok(),
            key: Some(key.to_owned()),
            message: format!("column {field}: {message}"),
        },
    };
    let mut points: Vec<Point> = Vec::with_capacity(entries.len());
    let mut names: HashMap<String, usize> = HashMap::new();
    for (config, origin, key) in &entries {
        let point = check_point(config, intervals, limits)
            .map_err(|(field, message)| fail(origin, key, field, message))?;
        if let Some(other) = names.insert(point.name.clone(), points.len()) {
            return Err(fail(
                origin,
                key,
                "name",
                format!(
                    "point {:?} is defined twice (first at {})",
                    point.name, entries[other].2
                ),
            ));
        }
        let overlap = points.iter().position(|other| {
            other.area == point.area
                && u32::from(other.address) < u32::from(point.address) + u32::from(point.width)
                && u32::from(point.address) < u32::from(other.address) + u32::from(other.width)
        });
        if let Some(other) = overlap {
            let other = &points[other];
            return Err(fail(
                origin,
                key,
                "address",
                format!(
                    "{} {}..{} overlaps point {:?} ({} {}..{})",
                    point.area.name(),
                    point.address,
                    u32::from(point.address) + u32::from(point.width),
                    other.name,
                    other.area.name(),
                    other.address,
                    u32::from(other.address) + u32::from(other.width),
                ),
            ));
        }
        points.push(point);
    }
    Ok(points)
}

/// Checks one point alone; the error names the offending field.
fn check_point(
    config: &PointConfig,
    intervals: &[(String, Duration)],
    limits: Limits,
) -> Result<Point, (&'static str, String)> {
    let name = config.name.as_str();
    if name.is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err((
            "name",
            format!("point names are 1 to {MAX_NAME_LEN} bytes without control characters"),
        ));
    }
    if RESERVED_NAMES.contains(&name) {
        return Err((
            "name",
            format!("{name:?} is reserved in the event payload; rename the point"),
        ));
    }
    let data_type = config.data_type;
    match (config.area.is_bits(), data_type == DataType::Bool) {
        (true, false) => {
            return Err((
                "type",
                format!(
                    "{} needs registers (area holding or input); a {} holds single bits",
                    data_type.name(),
                    config.area.name()
                ),
            ));
        }
        (false, true) => {
            return Err((
                "type",
                format!(
                    "bool is for coils and discrete inputs; {} registers are 16-bit \
                     (use u16)",
                    config.area.name()
                ),
            ));
        }
        _ => {}
    }
    let width = match (data_type, config.count) {
        (DataType::String, Some(count)) if count >= 1 && count <= limits.max_registers => count,
        (DataType::String, Some(count)) => {
            return Err((
                "count",
                format!(
                    "a string takes 1 to {} registers (max_registers), not {count}",
                    limits.max_registers
                ),
            ));
        }
        (DataType::String, None) => {
            return Err(("count", "a string point needs count (its registers)".into()));
        }
        (_, Some(_)) => return Err(("count", "count is only for string points".into())),
        (data_type, None) => data_type.width(0),
    };
    if u32::from(config.address) + u32::from(width) > 0x1_0000 {
        return Err((
            "address",
            format!(
                "{} at {} takes {width} and runs past the last address 65535",
                data_type.name(),
                config.address
            ),
        ));
    }
    if !config.scale.is_finite() || config.scale == 0.0 {
        return Err(("scale", "must be a finite number other than 0".into()));
    }
    if !config.offset.is_finite() {
        return Err(("offset", "must be a finite number".into()));
    }
    if (config.scale != 1.0 || config.offset != 0.0) && !data_type.is_numeric() {
        return Err((
            "scale",
            format!(
                "scale and offset apply to numbers, not {}",
                data_type.name()
            ),
        ));
    }
    let deadband = match config.deadband {
        None => 0.0,
        Some(_) if !data_type.is_numeric() => {
            return Err((
                "deadband",
                format!("a deadband applies to numbers, not {}", data_type.name()),
            ));
        }
        Some(deadband) if deadband.is_finite() && deadband >= 0.0 => deadband,
        Some(_) => return Err(("deadband", "must be a finite number, 0 or more".into())),
    };
    if config.writable && !matches!(config.area, Area::Coil | Area::Holding) {
        return Err((
            "writable",
            format!(
                "{} is read-only; only coils and holding registers can be written",
                config.area.name()
            ),
        ));
    }
    if let Some(unit) = &config.unit {
        if unit.len() > 32 || unit.chars().any(char::is_control) {
            return Err(("unit", "at most 32 bytes without control characters".into()));
        }
    }
    let group = match &config.group {
        None => 0,
        Some(group) => intervals
            .iter()
            .skip(1)
            .position(|(name, _)| name == group)
            .map(|index| index + 1)
            .ok_or_else(|| {
                (
                    "group",
                    format!("no poll group {group:?}; declare [sources.NAME.groups.{group}]"),
                )
            })?,
    };
    Ok(Point {
        name: config.name.clone(),
        area: config.area,
        address: config.address,
        width,
        data_type,
        byte_order: config.byte_order,
        scale: config.scale,
        offset: config.offset,
        unit: config.unit.clone(),
        group,
        deadband,
        writable: config.writable,
    })
}

/// A problem with a CSV points file.
#[derive(Debug, thiserror::Error)]
pub enum PointsFileError {
    /// It cannot be read.
    #[error("cannot read points file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Larger than [`MAX_POINTS_FILE`].
    #[error("points file {path} is larger than 4MiB")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// A row is not a point.
    #[error("{message}")]
    Row {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: Option<u64>,
        /// What is wrong.
        message: String,
    },
}

impl PointsFileError {
    fn into_config(self, key: &str) -> ConfigError {
        match self {
            Self::Row {
                path,
                line,
                message,
            } => ConfigError {
                file: path.display().to_string(),
                line: line.and_then(|line| usize::try_from(line).ok()),
                key: Some(key.to_owned()),
                message,
            },
            other => ConfigError {
                file: "config".into(),
                line: None,
                key: Some(key.to_owned()),
                message: other.to_string(),
            },
        }
    }
}

/// One CSV row: every column but the first four may be empty (its default).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CsvPoint {
    name: String,
    area: String,
    address: u16,
    #[serde(rename = "type")]
    data_type: String,
    byte_order: Option<String>,
    scale: Option<f64>,
    offset: Option<f64>,
    unit: Option<String>,
    count: Option<u16>,
    group: Option<String>,
    deadband: Option<f64>,
    writable: Option<bool>,
}

/// Reads a CSV point table: a header row naming the columns (any order; `name`, `area`,
/// `address` and `type` required), then one point per row. `#` starts a comment line.
pub fn read_points_file(path: &Path) -> Result<Vec<(PointConfig, u64)>, PointsFileError> {
    let io = |source| PointsFileError::Io {
        path: path.to_owned(),
        source,
    };
    let size = std::fs::metadata(path).map_err(io)?.len();
    if size > MAX_POINTS_FILE {
        return Err(PointsFileError::TooLarge {
            path: path.to_owned(),
        });
    }
    let text = std::fs::read(path).map_err(io)?;
    parse_points_csv(path, &text)
}

/// Parses CSV point-table text (see [`read_points_file`]); `path` names it in errors.
pub fn parse_points_csv(
    path: &Path,
    text: &[u8],
) -> Result<Vec<(PointConfig, u64)>, PointsFileError> {
    let row_error = |line: Option<u64>, message: String| PointsFileError::Row {
        path: path.to_owned(),
        line,
        message,
    };
    let mut reader = csv::ReaderBuilder::new()
        .comment(Some(b'#'))
        .trim(csv::Trim::All)
        .from_reader(text);
    let mut points = Vec::new();
    for row in reader.deserialize::<CsvPoint>() {
        let row = row.map_err(|err| {
            let line = err.position().map(csv::Position::line);
            let message = match err.kind() {
                csv::ErrorKind::Deserialize { err, .. } => match err.field() {
                    Some(field) => format!("column {}: {}", field + 1, err.kind()),
                    None => err.to_string(),
                },
                _ => err.to_string(),
            };
            row_error(line, message)
        })?;
        if points.len() >= MAX_POINTS {
            return Err(row_error(None, format!("more than {MAX_POINTS} points")));
        }
        let line = u64::try_from(points.len()).unwrap_or(u64::MAX) + 2;
        let area = Area::parse(&row.area).ok_or_else(|| {
            row_error(
                Some(line),
                format!(
                    "column area: unknown area {:?}; expected one of {}",
                    row.area,
                    Area::NAMES.join(", ")
                ),
            )
        })?;
        let data_type = DataType::parse(&row.data_type).ok_or_else(|| {
            row_error(
                Some(line),
                format!(
                    "column type: unknown type {:?}; expected one of {}",
                    row.data_type,
                    DataType::NAMES.join(", ")
                ),
            )
        })?;
        let byte_order = match row.byte_order.as_deref() {
            None | Some("") => ByteOrder::default(),
            Some(name) => ByteOrder::parse(name).ok_or_else(|| {
                row_error(
                    Some(line),
                    format!(
                        "column byte_order: unknown byte order {name:?}; expected one of {}",
                        ByteOrder::NAMES.join(", ")
                    ),
                )
            })?,
        };
        let empty_to_none = |value: Option<String>| value.filter(|value| !value.is_empty());
        points.push((
            PointConfig {
                name: row.name,
                area,
                address: row.address,
                data_type,
                byte_order,
                scale: row.scale.unwrap_or(1.0),
                offset: row.offset.unwrap_or(0.0),
                unit: empty_to_none(row.unit),
                count: row.count,
                group: empty_to_none(row.group),
                deadband: row.deadband,
                writable: row.writable.unwrap_or(false),
            },
            line,
        ));
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csv(text: &str) -> Result<Vec<(PointConfig, u64)>, PointsFileError> {
        parse_points_csv(Path::new("points.csv"), text.as_bytes())
    }

    #[test]
    fn csv_rows_with_defaults() {
        let points = csv(
            "name,area,address,type,byte_order,scale,offset,unit,count,group,deadband,writable\n\
             temperature,holding,0,f32,CDAB,0.1,,degC,,,0.5,\n\
             # a comment\n\
             label,input,10,string,,,,,4,,,\n\
             pump,coil,3,bool,,,,,,,,true\n",
        )
        .unwrap();
        assert_eq!(points.len(), 3);
        assert_eq!(points[0].0.byte_order, ByteOrder::Cdab);
        assert_eq!(points[0].0.scale, 0.1);
        assert_eq!(points[0].0.deadband, Some(0.5));
        assert_eq!(points[1].0.count, Some(4));
        assert!(points[2].0.writable);
        let minimal = csv("name,area,address,type\nx,holding,1,u16\n").unwrap();
        assert_eq!(minimal[0].0.scale, 1.0);
    }

    #[test]
    fn csv_errors_name_the_line_and_column() {
        for (text, needle) in [
            (
                "name,area,address,type\nx,holding,1,f31\n",
                "unknown type \"f31\"",
            ),
            ("name,area,address,type\nx,register,1,u16\n", "unknown area"),
            ("name,area,address,type\nx,holding,70000,u16\n", "column 3"),
            (
                "name,area,address,type,byte_order\nx,holding,1,u32,ABDC\n",
                "unknown byte order",
            ),
            (
                "name,area,address,type,colour\nx,holding,1,u16,red\n",
                "colour",
            ),
            ("name,area\nx,holding\n", "address"),
            (
                "name,area,address,type\nx,holding,1\n",
                "found record with 3 fields",
            ),
        ] {
            let err = csv(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
        let Err(PointsFileError::Row { line, .. }) =
            csv("name,area,address,type\nok,holding,1,u16\nx,holding,1,f31\n")
        else {
            panic!("expected a row error");
        };
        assert_eq!(line, Some(3));
    }

    #[test]
    fn hostile_csv_never_panics() {
        for text in [
            "",
            "\u{0}\u{1}",
            "name\n\"",
            "a,b,c,d\n1,2,3,4,5,6,7,8,9,10,11,12,13\n",
        ] {
            drop(csv(text));
        }
    }
}

#[cfg(test)]
mod check_tests {
    use crate::config::ConfigError;

    const HEAD: &str = "[gateway]\nid = \"gw-1\"\n\n";

    /// The issue's example, verbatim.
    const ISSUE: &str = r#"[sources.plc1]
type = "modbus_tcp"
address = "127.0.0.1:5020"
unit_id = 1
poll_interval = "1s"
device = "plc-1"

[[sources.plc1.points]]
name = "temperature"
area = "holding"        # coil | discrete | holding | input
address = 0
type = "f32"            # bool u16 i16 u32 i32 f32 u64 i64 f64 string
byte_order = "ABCD"     # ABCD CDAB BADC DCBA
scale = 0.1
"#;

    const SINK: &str = "\n[sinks.out]\ntype = \"console\"\ninputs = [\"plc1\"]\n";

    fn check(source: &str) -> Result<(), ConfigError> {
        let text = format!("{HEAD}{source}{SINK}");
        crate::config::parse::<crate::topology::Components>("gw.toml", &text, |_| None).map(drop)
    }

    fn line_of(source: &str, needle: &str) -> usize {
        let text = format!("{HEAD}{source}");
        text.lines().position(|line| line.contains(needle)).unwrap() + 1
    }

    #[test]
    fn the_issue_example_is_valid() {
        check(ISSUE).unwrap();
    }

    #[test]
    fn bad_point_tables_are_rejected_with_key_and_line() {
        let point =
            |extra: &str| format!("{ISSUE}\n[[sources.plc1.points]]\nname = \"x\"\n{extra}\n");
        let cases: Vec<(String, &str, &str, &str)> = vec![
            (
                point("area = \"coil\"\naddress = 5\ntype = \"f32\""),
                "sources.plc1.points[1].type",
                "f32 needs registers",
                "name = \"x\"",
            ),
            (
                point("area = \"holding\"\naddress = 5\ntype = \"bool\""),
                "sources.plc1.points[1].type",
                "bool is for coils",
                "name = \"x\"",
            ),
            (
                point("area = \"holding\"\naddress = 1\ntype = \"u16\""),
                "sources.plc1.points[1].address",
                "overlaps point \"temperature\"",
                "name = \"x\"",
            ),
            (
                point("area = \"holding\"\naddress = 65535\ntype = \"u32\""),
                "sources.plc1.points[1].address",
                "runs past the last address",
                "name = \"x\"",
            ),
            (
                point("area = \"holding\"\naddress = 5\ntype = \"u32\"\nbyte_order = \"ABDC\""),
                "sources.plc1.points",
                "unknown variant `ABDC`",
                "byte_order = \"ABDC\"",
            ),
            (
                point("area = \"holding\"\naddress = 5\ntype = \"string\""),
                "sources.plc1.points[1].count",
                "needs count",
                "name = \"x\"",
            ),
            (
                point("area = \"input\"\naddress = 5\ntype = \"u16\"\nwritable = true"),
                "sources.plc1.points[1].writable",
                "read-only",
                "name = \"x\"",
            ),
            (
                point("area = \"input\"\naddress = 5\ntype = \"u16\"\ngroup = \"fast\""),
                "sources.plc1.points[1].group",
                "no poll group",
                "name = \"x\"",
            ),
            (
                point("area = \"input\"\naddress = 5\ntype = \"u16\"\nscale = 0.0"),
                "sources.plc1.points[1].scale",
                "other than 0",
                "name = \"x\"",
            ),
        ];
        for (source, key, message, line_needle) in cases {
            let err = check(&source).unwrap_err();
            assert_eq!(
                err.key.as_deref().map(|k| k.starts_with(key)),
                Some(true),
                "{err}"
            );
            assert!(err.message.contains(message), "{err}");
            // The line of the point's `[[...points]]` header (inline tables: the field's).
            let line = line_of(&source, line_needle);
            assert!(
                err.line == Some(line) || err.line == Some(line - 1),
                "{err}"
            );
        }
        let duplicate = format!(
            "{ISSUE}\n[[sources.plc1.points]]\nname = \"temperature\"\narea = \"input\"\naddress = 0\ntype = \"u16\"\n"
        );
        let err = check(&duplicate).unwrap_err();
        assert!(err.message.contains("defined twice"), "{err}");
        let reserved = format!(
            "{ISSUE}\n[[sources.plc1.points]]\nname = \"quality\"\narea = \"input\"\naddress = 0\ntype = \"u16\"\n"
        );
        assert!(check(&reserved).unwrap_err().message.contains("reserved"));
    }

    #[test]
    fn bad_source_keys_are_rejected() {
        for (from, to, key) in [
            (
                "poll_interval = \"1s\"",
                "poll_interval = \"0s\"",
                "sources.plc1.poll_interval",
            ),
            (
                "address = \"127.0.0.1:5020\"",
                "address = \"127.0.0.1\"",
                "sources.plc1.address",
            ),
            (
                "device = \"plc-1\"",
                "device = \"plc 1\"",
                "sources.plc1.device",
            ),
            (
                "unit_id = 1",
                "unit_id = 1\nmax_registers = 126",
                "sources.plc1.max_registers",
            ),
            (
                "unit_id = 1",
                "unit_id = 1\ncolour = 1",
                "sources.plc1.colour",
            ),
        ] {
            let err = check(&ISSUE.replace(from, to)).unwrap_err();
            assert_eq!(err.key.as_deref(), Some(key), "{err}");
        }
        let zero_group = format!("{ISSUE}\n[sources.plc1.groups.fast]\ninterval = \"0ms\"\n");
        let err = check(&zero_group).unwrap_err();
        assert_eq!(
            err.key.as_deref(),
            Some("sources.plc1.groups.fast.interval"),
            "{err}"
        );
        let no_points = ISSUE.split("[[sources").next().unwrap();
        assert!(check(no_points).unwrap_err().message.contains("no points"));
    }

    #[test]
    fn points_files_are_checked_with_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("points.csv");
        std::fs::write(
            &file,
            "name,area,address,type,byte_order,scale,unit\n\
             flow,input,0,f32,CDAB,1.5,m3/h\n\
             valve,coil,0,f32,,,\n",
        )
        .unwrap();
        let source = ISSUE.replace(
            "device = \"plc-1\"",
            &format!(
                "device = \"plc-1\"\npoints_file = {:?}",
                file.display().to_string()
            ),
        );
        let err = check(&source).unwrap_err();
        assert_eq!(err.file, file.display().to_string());
        assert_eq!(err.line, Some(3), "{err}");
        assert_eq!(err.key.as_deref(), Some("sources.plc1.points_file"));
        assert!(
            err.message.contains("column type: f32 needs registers"),
            "{err}"
        );
        std::fs::write(&file, "name,area,address,type\nflow,input,0,f32\n").unwrap();
        check(&source).unwrap();
        std::fs::remove_file(&file).unwrap();
        assert!(
            check(&source)
                .unwrap_err()
                .message
                .contains("cannot read points file")
        );
    }

    #[test]
    fn rtu_buses_check_their_devices() {
        let bus = |devices: &str| {
            format!(
                "[sources.plc1]\ntype = \"modbus_rtu\"\nport = \"/dev/ttyUSB0\"\nbaud = 19200\nparity = \"none\"\n{devices}"
            )
        };
        let device = |unit: u8, id: &str| {
            format!(
                "[[sources.plc1.devices]]\nunit_id = {unit}\ndevice = {id:?}\n\
                 [[sources.plc1.devices.points]]\nname = \"p\"\narea = \"input\"\naddress = 0\ntype = \"u16\"\n"
            )
        };
        check(&bus(&format!("{}{}", device(1, "m-1"), device(2, "m-2")))).unwrap();
        let err = check(&bus(&format!("{}{}", device(1, "m-1"), device(1, "m-2")))).unwrap_err();
        assert!(err.message.contains("already used"), "{err}");
        let err = check(&bus(&device(0, "m-1"))).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("sources.plc1.devices[0].unit_id"));
        let err = check(&bus(&format!("{}{}", device(1, "m-1"), device(2, "m-1")))).unwrap_err();
        assert!(
            err.message.contains("device id \"m-1\" is already used"),
            "{err}"
        );
        let err = check(&bus(&format!("stop_bits = 3\n{}", device(1, "m-1")))).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("sources.plc1.stop_bits"), "{err}");
    }
}
