//! One connection to the broker: TCP (or TLS) connect, CONNECT/CONNACK, and the byte
//! buffers the sink reads packets from and coalesces its writes into.
//!
//! Reads and writes are cancel-safe (`read_buf`, `write`), so the sink can wait on both
//! and on its buffer in one `select!` without losing bytes. Outgoing packets are encoded
//! into `outgoing` and written together: many publishes per write syscall.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::address::BrokerAddress;
use super::packet::{Codec, CodecError, ConnAckInfo, ConnectOut, Incoming};

/// Bytes read per `read` at most (more wait in the socket).
const READ_CHUNK: usize = 64 * 1024;

/// A byte stream to the broker, plain or TLS.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Why a connection could not be made or ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// TCP or TLS failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// No CONNACK (or TCP/TLS handshake) within the connect timeout.
    #[error("no CONNACK within {0:?}")]
    Timeout(Duration),
    /// The broker refused the connection.
    #[error("broker refused the connection with code {0:#04x}")]
    Refused(u8),
    /// The broker sent something that is not MQTT or not a CONNACK first.
    #[error(transparent)]
    Protocol(#[from] CodecError),
    /// The broker closed the connection.
    #[error("connection closed by the broker")]
    Closed,
    /// The broker sent DISCONNECT.
    #[error("broker sent DISCONNECT with reason {0:#04x}")]
    Disconnected(u8),
    /// The broker did not answer a PINGREQ, or sat on an ack, for too long.
    #[error("{0}")]
    Unresponsive(&'static str),
    /// The broker sent a packet a client never receives.
    #[error("unexpected {0} from the broker")]
    Unexpected(&'static str),
}

/// An open, accepted connection.
pub struct Connection {
    reader: ReadHalf<Box<dyn Stream>>,
    writer: WriteHalf<Box<dyn Stream>>,
    incoming: BytesMut,
    /// Encoded packets not yet written.
    pub outgoing: BytesMut,
    codec: Codec,
}

impl Connection {
    /// Connects, sends CONNECT and waits for a successful CONNACK, all within `timeout`.
    pub async fn open(
        address: &BrokerAddress,
        tls: Option<&Arc<rustls::ClientConfig>>,
        codec: Codec,
        connect: &ConnectOut<'_>,
        timeout: Duration,
    ) -> Result<(Self, ConnAckInfo), LinkError> {
        let handshake = async {
            let stream = open_stream(address, tls).await?;
            let (reader, writer) = tokio::io::split(stream);
            let mut connection = Self {
                reader,
                writer,
                incoming: BytesMut::with_capacity(4096),
                outgoing: BytesMut::with_capacity(4096),
                codec,
            };
            codec.write_connect(connect, &mut connection.outgoing);
            connection.flush_all().await?;
            let ack = match connection.next_packet().await? {
                Incoming::ConnAck(ack) => ack,
                Incoming::Disconnect { code } => return Err(LinkError::Disconnected(code)),
                other => return Err(LinkError::Unexpected(packet_name(&other))),
            };
            if ack.code != 0 {
                return Err(LinkError::Refused(ack.code));
            }
            Ok((connection, ack))
        };
        tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| LinkError::Timeout(timeout))?
    }

    /// Decodes the next buffered packet, if a whole one is buffered.
    pub fn decode(&mut self) -> Result<Option<Incoming>, LinkError> {
        Ok(self.codec.read(&mut self.incoming)?)
    }

    /// Reads more bytes from the broker; cancel-safe.
    pub async fn read(&mut self) -> Result<(), LinkError> {
        read_more(&mut self.reader, &mut self.incoming).await
    }

    /// Writes some of `outgoing`; cancel-safe (a cancelled write wrote nothing).
    pub async fn write_some(&mut self) -> Result<(), LinkError> {
        write_some(&mut self.writer, &mut self.outgoing).await
    }

    /// Waits for whichever comes first: bytes from the broker, or some of `outgoing`
    /// written (only when there is something to write). Cancel-safe.
    pub async fn read_or_write(&mut self) -> IoDone {
        let pending_write = !self.outgoing.is_empty();
        tokio::select! {
            biased;
            read = read_more(&mut self.reader, &mut self.incoming) => IoDone::Read(read),
            wrote = write_some(&mut self.writer, &mut self.outgoing), if pending_write => IoDone::Wrote(wrote),
        }
    }

    /// Writes all of `outgoing` and flushes (TLS buffers).
    pub async fn flush_all(&mut self) -> Result<(), LinkError> {
        while !self.outgoing.is_empty() {
            self.write_some().await?;
        }
        self.writer.flush().await?;
        Ok(())
    }

    /// Ends the connection (TLS close_notify, TCP FIN).
    pub async fn close(mut self) {
        // Best effort: the broker may already be gone.
        let _closed = self.writer.shutdown().await;
    }

    async fn next_packet(&mut self) -> Result<Incoming, LinkError> {
        loop {
            if let Some(packet) = self.decode()? {
                return Ok(packet);
            }
            self.read().await?;
        }
    }
}

/// Which half of the connection made progress.
pub enum IoDone {
    /// Bytes arrived (or reading failed).
    Read(Result<(), LinkError>),
    /// Bytes were written (or writing failed).
    Wrote(Result<(), LinkError>),
}

async fn read_more(
    reader: &mut ReadHalf<Box<dyn Stream>>,
    incoming: &mut BytesMut,
) -> Result<(), LinkError> {
    incoming.reserve(4096);
    let read = reader.take(READ_CHUNK as u64).read_buf(incoming).await?;
    if read == 0 {
        return Err(LinkError::Closed);
    }
    Ok(())
}

async fn write_some(
    writer: &mut WriteHalf<Box<dyn Stream>>,
    outgoing: &mut BytesMut,
) -> Result<(), LinkError> {
    let written = writer.write(outgoing).await?;
    if written == 0 {
        return Err(LinkError::Closed);
    }
    outgoing.advance(written);
    if outgoing.is_empty() && outgoing.capacity() > 1 << 20 {
        // Give back what a large backlog burst grew.
        *outgoing = BytesMut::with_capacity(64 * 1024);
    }
    Ok(())
}

async fn open_stream(
    address: &BrokerAddress,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Box<dyn Stream>, LinkError> {
    let tcp = TcpStream::connect((address.host.as_str(), address.port)).await?;
    // Publishes are coalesced by the sink; Nagle would only add latency on top.
    tcp.set_nodelay(true)?;
    let Some(config) = tls else {
        return Ok(Box::new(tcp));
    };
    let name = rustls::pki_types::ServerName::try_from(address.host.clone()).map_err(|err| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("invalid TLS server name {:?}: {err}", address.host),
        )
    })?;
    let stream = tokio_rustls::TlsConnector::from(Arc::clone(config))
        .connect(name, tcp)
        .await?;
    Ok(Box::new(stream))
}

/// A packet's name for messages.
pub fn packet_name(packet: &Incoming) -> &'static str {
    match packet {
        Incoming::ConnAck(_) => "CONNACK",
        Incoming::PubAck { .. } => "PUBACK",
        Incoming::PubRec { .. } => "PUBREC",
        Incoming::PubRel { .. } => "PUBREL",
        Incoming::PubComp { .. } => "PUBCOMP",
        Incoming::Publish { .. } => "PUBLISH",
        Incoming::SubAck { .. } => "SUBACK",
        Incoming::PingResp => "PINGRESP",
        Incoming::Disconnect { .. } => "DISCONNECT",
        Incoming::Unexpected(name) => name,
    }
}
