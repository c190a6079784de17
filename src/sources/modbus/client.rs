//! The Modbus link: a TCP connection or a serial bus, one request at a time, each under a
//! deadline, every failure a named [`ModbusError`].
//!
//! tokio-modbus frames the requests and answers; this module adds what it leaves to its
//! user: deadlines, the answer's length checked against the request (a short or long
//! answer is `malformed`, never a panic), and for RTU the 3.5-character silence before each
//! frame and a resynchronisation (port reopened, input drained until the line is quiet)
//! after any answer that was lost, late or malformed.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::time::Instant;
use tokio_modbus::client::{Client as _, Context};
use tokio_modbus::slave::SlaveContext as _;
use tokio_modbus::{ExceptionCode, Request, Response, Slave};

use super::config::Parity;
use super::plan::Area;

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ModbusError {
    /// The TCP connection or the serial port could not be opened.
    #[error("cannot connect to {peer}: {source}")]
    Connect {
        /// The address or port.
        peer: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No (complete) answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The device answered with an exception response.
    #[error("exception {code:#04x} ({name})")]
    Exception {
        /// The exception code.
        code: u8,
        /// Its name in the specification, in snake case.
        name: &'static str,
    },
    /// An answer that does not belong to the request (transaction id, unit id or
    /// function code differ).
    #[error("answer does not match the request: {0}")]
    Protocol(String),
    /// An answer that cannot be decoded or has the wrong length.
    #[error("malformed answer: {0}")]
    Malformed(String),
    /// The connection failed under the request.
    #[error("connection lost: {0}")]
    Io(#[source] io::Error),
}

/// `kind` label values of `fieldgate_modbus_errors_total`.
pub const ERROR_KINDS: &[&str] = &[
    "connect",
    "timeout",
    "exception",
    "protocol",
    "malformed",
    "io",
];

impl ModbusError {
    /// The metric's `kind` (one of [`ERROR_KINDS`]).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect",
            Self::Timeout(_) => "timeout",
            Self::Exception { .. } => "exception",
            Self::Protocol(_) => "protocol",
            Self::Malformed(_) => "malformed",
            Self::Io(_) => "io",
        }
    }

    /// Whether the link can no longer be trusted (a late or partial answer may still
    /// arrive): the next request goes over a fresh connection or a resynchronised bus.
    pub fn breaks_link(&self) -> bool {
        !matches!(self, Self::Exception { .. })
    }

    /// Whether the device answered at all (an exception is an answer: the device is alive).
    pub fn device_answered(&self) -> bool {
        matches!(self, Self::Exception { .. })
    }
}

/// The specification's name of an exception code (Modbus Application Protocol 1.1b3, 7).
pub fn exception_name(code: u8) -> &'static str {
    match code {
        0x01 => "illegal_function",
        0x02 => "illegal_data_address",
        0x03 => "illegal_data_value",
        0x04 => "server_device_failure",
        0x05 => "acknowledge",
        0x06 => "server_device_busy",
        0x08 => "memory_parity_error",
        0x0A => "gateway_path_unavailable",
        0x0B => "gateway_target_device_failed_to_respond",
        _ => "unknown_exception",
    }
}

fn exception(code: ExceptionCode) -> ModbusError {
    let code = u8::from(code);
    ModbusError::Exception {
        code,
        name: exception_name(code),
    }
}

fn from_tokio_modbus(err: tokio_modbus::Error) -> ModbusError {
    match err {
        tokio_modbus::Error::Protocol(err) => ModbusError::Protocol(err.to_string()),
        tokio_modbus::Error::Transport(err) if err.kind() == io::ErrorKind::InvalidData => {
            ModbusError::Malformed(err.to_string())
        }
        tokio_modbus::Error::Transport(err) => ModbusError::Io(err),
    }
}

/// Serial line settings of an RTU bus.
#[derive(Debug, Clone, PartialEq)]
pub struct SerialSettings {
    /// The port.
    pub port: PathBuf,
    /// Bits per second.
    pub baud: u32,
    /// Parity.
    pub parity: Parity,
    /// Stop bits (1 or 2).
    pub stop_bits: u8,
    /// Data bits (7 or 8).
    pub data_bits: u8,
}

impl SerialSettings {
    /// The silence that separates two RTU frames: 3.5 character times, a character being
    /// 11 bits (start, 8 data, parity or a second stop, stop); fixed at 1.75 ms above
    /// 19200 baud (Modbus over Serial Line 1.02, 2.5.1.1).
    pub fn frame_silence(&self) -> Duration {
        if self.baud > 19_200 {
            Duration::from_micros(1750)
        } else {
            Duration::from_secs_f64(3.5 * 11.0 / f64::from(self.baud.max(1)))
        }
    }
}

/// Where requests go.
#[derive(Debug, Clone, PartialEq)]
pub enum Link {
    /// Modbus TCP to `host:port`.
    Tcp(String),
    /// Modbus RTU on a serial bus.
    Rtu(SerialSettings),
}

impl Link {
    /// The peer, for logs and errors.
    pub fn peer(&self) -> String {
        match self {
            Self::Tcp(address) => address.clone(),
            Self::Rtu(serial) => serial.port.display().to_string(),
        }
    }
}

/// What one request reads or writes.
#[derive(Debug, Clone, PartialEq)]
pub enum Operation {
    /// Read `count` registers or bits of `area` from `address`.
    Read {
        /// Area.
        area: Area,
        /// First register or bit.
        address: u16,
        /// How many.
        count: u16,
    },
    /// Write registers (function code 16, or 6 for one).
    WriteRegisters {
        /// First register.
        address: u16,
        /// Values.
        values: Vec<u16>,
    },
    /// Write a coil (function code 5).
    WriteCoil {
        /// The coil.
        address: u16,
        /// On or off.
        value: bool,
    },
}

/// What a successful request returned.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Registers read.
    Registers(Vec<u16>),
    /// Bits read.
    Bits(Vec<bool>),
    /// A write was confirmed.
    Written,
}

/// One open link with its request discipline.
pub struct Connection {
    link: Link,
    context: Option<Context>,
    /// When the bus last carried a frame (RTU silence).
    last_activity: Option<Instant>,
}

impl Connection {
    /// A link not yet opened; the first request opens it.
    pub fn new(link: Link) -> Self {
        Self {
            link,
            context: None,
            last_activity: None,
        }
    }

    /// Closes the link; the next request reopens (and for RTU resynchronises) it.
    pub fn close(&mut self) {
        self.context = None;
    }

    /// Opens the link within `deadline`.
    pub async fn open(&mut self, deadline: Duration) -> Result<(), ModbusError> {
        if self.context.is_some() {
            return Ok(());
        }
        let peer = self.link.peer();
        let connect_error = |source| ModbusError::Connect {
            peer: peer.clone(),
            source,
        };
        let context = match &self.link {
            Link::Tcp(address) => {
                let stream =
                    tokio::time::timeout(deadline, tokio::net::TcpStream::connect(address))
                        .await
                        .map_err(|_| {
                            connect_error(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "connect timed out",
                            ))
                        })?
                        .map_err(connect_error)?;
                if let Err(err) = stream.set_nodelay(true) {
                    tracing::debug!(error = %err, "cannot set TCP_NODELAY");
                }
                tokio_modbus::client::tcp::attach_slave(stream, Slave(1))
            }
            Link::Rtu(serial) => {
                let mut port = open_serial(serial).map_err(connect_error)?;
                // Resynchronise: whatever is on the line (a late answer, noise, half a
                // frame) is read and dropped until the bus has been quiet for a frame gap.
                drain_until_quiet(&mut port, serial.frame_silence(), deadline).await;
                self.last_activity = Some(Instant::now());
                tokio_modbus::client::rtu::attach_slave(port, Slave(1))
            }
        };
        self.context = Some(context);
        Ok(())
    }

    /// Sends one request to `unit` and waits up to `deadline` for its answer.
    pub async fn request(
        &mut self,
        unit: u8,
        operation: &Operation,
        deadline: Duration,
    ) -> Result<Answer, ModbusError> {
        self.open(deadline).await?;
        if let Link::Rtu(serial) = &self.link {
            // The 3.5-character silence before a new frame.
            let silence = serial.frame_silence();
            if let Some(last) = self.last_activity {
                tokio::time::sleep_until(last + silence).await;
            }
        }
        let Some(context) = self.context.as_mut() else {
            return Err(ModbusError::Io(io::Error::new(
                io::ErrorKind::NotConnected,
                "link closed",
            )));
        };
        context.set_slave(Slave(unit));
        let request = match operation {
            Operation::Read {
                area,
                address,
                count,
            } => match area {
                Area::Coil => Request::ReadCoils(*address, *count),
                Area::Discrete => Request::ReadDiscreteInputs(*address, *count),
                Area::Holding => Request::ReadHoldingRegisters(*address, *count),
                Area::Input => Request::ReadInputRegisters(*address, *count),
            },
            Operation::WriteRegisters { address, values } if values.len() == 1 => {
                Request::WriteSingleRegister(*address, values[0])
            }
            Operation::WriteRegisters { address, values } => {
                Request::WriteMultipleRegisters(*address, values.into())
            }
            Operation::WriteCoil { address, value } => Request::WriteSingleCoil(*address, *value),
        };
        let outcome = tokio::time::timeout(deadline, context.call(request)).await;
        self.last_activity = Some(Instant::now());
        let result = match outcome {
            Err(_) => Err(ModbusError::Timeout(deadline)),
            Ok(Err(err)) => Err(from_tokio_modbus(err)),
            Ok(Ok(Err(code))) => Err(exception(code)),
            Ok(Ok(Ok(response))) => check_answer(operation, response),
        };
        if result.as_ref().is_err_and(ModbusError::breaks_link) {
            self.close();
        }
        result
    }
}

/// Checks that an answer is the one the request asked for, with the right length.
fn check_answer(operation: &Operation, response: Response) -> Result<Answer, ModbusError> {
    let wrong = |what: String| Err(ModbusError::Malformed(what));
    match (operation, response) {
        (
            Operation::Read {
                area: Area::Coil | Area::Discrete,
                count,
                ..
            },
            Response::ReadCoils(mut bits) | Response::ReadDiscreteInputs(mut bits),
        ) => {
            // Bits come in whole bytes: up to 7 padding bits, never fewer than asked.
            let count = usize::from(*count);
            if bits.len() < count || bits.len() >= count + 8 {
                return wrong(format!("{} bits for a read of {count}", bits.len()));
            }
            bits.truncate(count);
            Ok(Answer::Bits(bits))
        }
        (
            Operation::Read {
                area: Area::Holding | Area::Input,
                count,
                ..
            },
            Response::ReadHoldingRegisters(registers) | Response::ReadInputRegisters(registers),
        ) => {
            if registers.len() != usize::from(*count) {
                return wrong(format!(
                    "{} registers for a read of {count}",
                    registers.len()
                ));
            }
            Ok(Answer::Registers(registers))
        }
        (
            Operation::WriteRegisters { address, values },
            Response::WriteSingleRegister(at, value),
        ) if values.len() == 1 => {
            if at != *address || value != values[0] {
                return wrong(format!("write echo {at}={value} differs from the request"));
            }
            Ok(Answer::Written)
        }
        (
            Operation::WriteRegisters { address, values },
            Response::WriteMultipleRegisters(at, n),
        ) => {
            if at != *address || usize::from(n) != values.len() {
                return wrong(format!("write echo {at}+{n} differs from the request"));
            }
            Ok(Answer::Written)
        }
        (Operation::WriteCoil { address, value }, Response::WriteSingleCoil(at, echoed)) => {
            if at != *address || echoed != *value {
                return wrong(format!(
                    "coil write echo {at}={echoed} differs from the request"
                ));
            }
            Ok(Answer::Written)
        }
        (_, other) => Err(ModbusError::Protocol(format!(
            "answer {:?} to another request",
            other.function_code()
        ))),
    }
}

fn open_serial(serial: &SerialSettings) -> io::Result<tokio_serial::SerialStream> {
    use tokio_serial::{DataBits, SerialPortBuilderExt as _, StopBits};
    let parity = match serial.parity {
        Parity::None => tokio_serial::Parity::None,
        Parity::Even => tokio_serial::Parity::Even,
        Parity::Odd => tokio_serial::Parity::Odd,
    };
    let stop_bits = if serial.stop_bits == 2 {
        StopBits::Two
    } else {
        StopBits::One
    };
    let data_bits = if serial.data_bits == 7 {
        DataBits::Seven
    } else {
        DataBits::Eight
    };
    tokio_serial::new(serial.port.to_string_lossy(), serial.baud)
        .parity(parity)
        .stop_bits(stop_bits)
        .data_bits(data_bits)
        .open_native_async()
        .map_err(io::Error::from)
}

/// Reads and drops input until the line has been silent for `silence` (or `limit`
/// passed: a device babbling forever must not hold the bus task).
async fn drain_until_quiet(
    port: &mut tokio_serial::SerialStream,
    silence: Duration,
    limit: Duration,
) {
    let give_up = Instant::now() + limit;
    let mut scratch = [0u8; 256];
    let quiet = silence.max(Duration::from_millis(2));
    loop {
        let read = tokio::time::timeout(quiet, port.read(&mut scratch)).await;
        match read {
            // Quiet for a whole frame gap, or the port closed: resynchronised.
            Err(_) | Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(dropped)) => {
                tracing::debug!(dropped, "dropped stray bytes on the bus");
                if Instant::now() >= give_up {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tokio::io::AsyncWriteExt as _;

    use super::*;

    impl Connection {
        /// A TCP connection over an in-memory transport.
        fn attached(transport: tokio::io::DuplexStream) -> Self {
            Self {
                link: Link::Tcp("in-memory".into()),
                context: Some(tokio_modbus::client::tcp::attach_slave(transport, Slave(1))),
                last_activity: None,
            }
        }
    }

    /// Answers the first request on `server` with an MBAP frame of the request's
    /// transaction and unit id around `pdu`; returns the server side, still open.
    async fn answer(mut server: tokio::io::DuplexStream, pdu: Vec<u8>) -> tokio::io::DuplexStream {
        let mut request = [0u8; 12];
        if server.read_exact(&mut request).await.is_err() {
            return server;
        }
        let mut frame = vec![request[0], request[1], 0, 0];
        let length = u16::try_from(pdu.len() + 1).unwrap_or(u16::MAX);
        frame.extend_from_slice(&length.to_be_bytes());
        frame.push(request[6]);
        frame.extend_from_slice(&pdu);
        drop(server.write_all(&frame).await);
        server
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// Any answer to a read (valid function codes with random bodies, exception
        /// codes, garbage) ends as an answer or a named error, never a panic or a hang.
        #[test]
        fn hostile_answers_never_panic(
            function in prop_oneof![
                Just(1u8), Just(2), Just(3), Just(4), Just(5), Just(6), Just(16),
                Just(0x81), Just(0x83), any::<u8>()
            ],
            body in proptest::collection::vec(any::<u8>(), 0..300),
            area in 0usize..4,
            count in 1u16..20,
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let areas = [Area::Coil, Area::Discrete, Area::Holding, Area::Input];
            runtime.block_on(async {
                let (client, server) = tokio::io::duplex(4096);
                let mut connection = Connection::attached(client);
                let mut pdu = vec![function];
                pdu.extend_from_slice(&body);
                let operation = Operation::Read { area: areas[area], address: 0, count };
                let (result, _server) = tokio::join!(
                    connection.request(1, &operation, Duration::from_millis(50)),
                    answer(server, pdu),
                );
                if let Ok(answer) = result {
                    // Whatever was accepted has exactly the length asked for.
                    match answer {
                        Answer::Registers(registers) => assert_eq!(registers.len(), usize::from(count)),
                        Answer::Bits(bits) => assert_eq!(bits.len(), usize::from(count)),
                        Answer::Written => panic!("a read answered as a write"),
                    }
                }
            });
        }
    }

    #[test]
    fn frame_silence_follows_the_serial_line_spec() {
        let serial = |baud| SerialSettings {
            port: PathBuf::from("/dev/null"),
            baud,
            parity: Parity::Even,
            stop_bits: 1,
            data_bits: 8,
        };
        // 9600 baud: 3.5 × 11 bits / 9600 ≈ 4.01 ms.
        let at_9600 = serial(9600).frame_silence();
        assert!(at_9600 > Duration::from_micros(4000) && at_9600 < Duration::from_micros(4020));
        assert_eq!(serial(115_200).frame_silence(), Duration::from_micros(1750));
    }

    #[test]
    fn answers_of_the_wrong_length_are_malformed() {
        let read = Operation::Read {
            area: Area::Holding,
            address: 0,
            count: 2,
        };
        assert!(matches!(
            check_answer(&read, Response::ReadHoldingRegisters(vec![1])),
            Err(ModbusError::Malformed(_))
        ));
        assert!(matches!(
            check_answer(&read, Response::ReadHoldingRegisters(vec![1, 2, 3])),
            Err(ModbusError::Malformed(_))
        ));
        assert!(matches!(
            check_answer(&read, Response::ReadCoils(vec![true; 8])),
            Err(ModbusError::Protocol(_))
        ));
        let coils = Operation::Read {
            area: Area::Coil,
            address: 0,
            count: 3,
        };
        assert_eq!(
            check_answer(
                &coils,
                Response::ReadCoils(vec![true, false, true, false, false, false, false, false])
            )
            .unwrap(),
            Answer::Bits(vec![true, false, true])
        );
        assert!(check_answer(&coils, Response::ReadCoils(vec![true; 2])).is_err());
        assert!(check_answer(&coils, Response::ReadCoils(vec![true; 16])).is_err());
    }

    #[test]
    fn exception_codes_have_names() {
        assert_eq!(exception_name(2), "illegal_data_address");
        assert_eq!(
            exception_name(0x0B),
            "gateway_target_device_failed_to_respond"
        );
        assert_eq!(exception_name(0x42), "unknown_exception");
        let err = exception(ExceptionCode::IllegalDataAddress);
        assert_eq!(err.to_string(), "exception 0x02 (illegal_data_address)");
        assert_eq!(err.kind(), "exception");
        assert!(!err.breaks_link());
    }
}
