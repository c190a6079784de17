//! `fieldgate modbus read`: reads registers or bits from a device once and prints them,
//! decoded, for commissioning a point table. Uses the sources' own link, codec and errors,
//! so what it prints is what a poll would report.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::sources::modbus::client::{Answer, Connection, Link, Operation, SerialSettings};
use crate::sources::modbus::config::Parity;
use crate::sources::modbus::plan::Area;
use crate::sources::modbus::value::{ByteOrder, DataType, decode_point, to_json};

/// `fieldgate modbus`.
#[derive(Debug, Args)]
pub struct ModbusArgs {
    #[command(subcommand)]
    command: ModbusCommand,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum ModbusCommand {
    /// Read values once and print `ADDRESS: VALUE` lines.
    Read(ReadArgs),
}

/// `fieldgate modbus read`.
#[derive(Debug, Args)]
pub struct ReadArgs {
    /// `host:port` for Modbus TCP, or a serial port path (starting with `/`) for RTU.
    address: String,
    /// Unit id.
    #[arg(long, default_value_t = 1)]
    unit: u8,
    /// coil, discrete, holding or input.
    #[arg(long, default_value = "holding", value_parser = parse_area)]
    area: Area,
    /// First register or bit.
    #[arg(long = "address", default_value_t = 0)]
    start: u16,
    /// How many values of --type to read (for `string`: the string's registers).
    #[arg(long, default_value_t = 1)]
    count: u16,
    /// bool u16 i16 u32 i32 f32 u64 i64 f64 string (bool for coils and discretes).
    #[arg(long = "type", value_parser = parse_type)]
    data_type: Option<DataType>,
    /// ABCD CDAB BADC DCBA.
    #[arg(long, default_value = "ABCD", value_parser = parse_order)]
    byte_order: ByteOrder,
    /// Time allowed for the answer (and for connecting).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// RTU: bits per second.
    #[arg(long, default_value_t = 9600)]
    baud: u32,
    /// RTU: none, even or odd.
    #[arg(long, default_value = "even", value_parser = parse_parity)]
    parity: Parity,
    /// RTU: 1 or 2.
    #[arg(long, default_value_t = 1)]
    stop_bits: u8,
    /// RTU: 7 or 8.
    #[arg(long, default_value_t = 8)]
    data_bits: u8,
}

fn parse_area(text: &str) -> Result<Area, String> {
    Area::parse(text).ok_or_else(|| format!("expected one of {}", Area::NAMES.join(", ")))
}

fn parse_type(text: &str) -> Result<DataType, String> {
    DataType::parse(text).ok_or_else(|| format!("expected one of {}", DataType::NAMES.join(", ")))
}

fn parse_order(text: &str) -> Result<ByteOrder, String> {
    ByteOrder::parse(text).ok_or_else(|| format!("expected one of {}", ByteOrder::NAMES.join(", ")))
}

fn parse_parity(text: &str) -> Result<Parity, String> {
    match text {
        "none" => Ok(Parity::None),
        "even" => Ok(Parity::Even),
        "odd" => Ok(Parity::Odd),
        _ => Err("expected none, even or odd".into()),
    }
}

/// Runs `fieldgate modbus ...`.
pub fn run(args: ModbusArgs) -> ExitCode {
    let ModbusCommand::Read(args) = args.command;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(read(&args)) {
        Ok(lines) => {
            for line in lines {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Reads and decodes; returns the lines to print.
async fn read(args: &ReadArgs) -> Result<Vec<String>, String> {
    let data_type = args.data_type.unwrap_or(if args.area.is_bits() {
        DataType::Bool
    } else {
        DataType::U16
    });
    if args.area.is_bits() != (data_type == DataType::Bool) {
        return Err(format!(
            "--type {} does not fit --area {} (bool is for coils and discretes only)",
            data_type.name(),
            args.area.name()
        ));
    }
    if args.count == 0 {
        return Err("--count must be at least 1".into());
    }
    let width = data_type.width(args.count);
    let values = if data_type == DataType::String {
        1
    } else {
        args.count
    };
    let total = u32::from(width) * u32::from(values);
    if total > u32::from(args.area.spec_limit()) {
        return Err(format!(
            "{total} {} in one request; at most {}",
            if args.area.is_bits() {
                "bits"
            } else {
                "registers"
            },
            args.area.spec_limit()
        ));
    }
    if u32::from(args.start) + total > 0x1_0000 {
        return Err("the read runs past address 65535".into());
    }
    let link = if args.address.starts_with('/') {
        Link::Rtu(SerialSettings {
            port: PathBuf::from(&args.address),
            baud: args.baud,
            parity: args.parity,
            stop_bits: args.stop_bits,
            data_bits: args.data_bits,
        })
    } else {
        Link::Tcp(args.address.clone())
    };
    let mut connection = Connection::new(link);
    // `total` is at most 2000, checked above.
    let count = u16::try_from(total).map_err(|err| err.to_string())?;
    let operation = Operation::Read {
        area: args.area,
        address: args.start,
        count,
    };
    let answer = connection
        .request(args.unit, &operation, args.timeout)
        .await
        .map_err(|err| format!("{} unit {}: {err}", args.address, args.unit))?;
    let mut lines = Vec::new();
    match answer {
        Answer::Bits(bits) => {
            for (offset, bit) in bits.iter().enumerate() {
                lines.push(format!("{}: {bit}", usize::from(args.start) + offset));
            }
        }
        Answer::Registers(registers) => {
            for (index, chunk) in registers.chunks(usize::from(width)).enumerate() {
                let address = usize::from(args.start) + index * usize::from(width);
                let raw: Vec<String> = chunk.iter().map(|word| format!("0x{word:04x}")).collect();
                let value = decode_point(data_type, args.byte_order, chunk)
                    .map(|raw| to_json(&raw, 1.0, 0.0).to_string())
                    .unwrap_or_else(|err| format!("<{err}>"));
                lines.push(format!("{address}: {value} ({})", raw.join(" ")));
            }
        }
        Answer::Written => {}
    }
    Ok(lines)
}
