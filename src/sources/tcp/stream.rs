//! A device's byte stream: plain TCP or TLS, with reads that hold no buffer while idle.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// How long closing a connection may wait for the peer to take the last bytes.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes taken per read from a plain socket.
const READ_CHUNK: usize = 16 * 1024;

/// One `read(2)` from the socket (inside `try_io`, which owns the readiness).
#[cfg(unix)]
fn read_socket(stream: &TcpStream, chunk: &mut [u8]) -> io::Result<usize> {
    rustix::io::read(stream, chunk).map_err(io::Error::from)
}

/// One read from the socket (inside `try_io`, which owns the readiness).
#[cfg(not(unix))]
fn read_socket(stream: &TcpStream, chunk: &mut [u8]) -> io::Result<usize> {
    stream.try_read(chunk)
}

/// A device connection's transport.
pub enum DeviceStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP (boxed: the TLS state is large).
    Tls(Box<TlsStream<TcpStream>>),
}

impl DeviceStream {
    /// Waits for data and appends it to `buf`; `Ok(0)` at end of stream.
    ///
    /// A plain socket is awaited with no buffer allocated: only once data is there is it
    /// copied into `buf`, so an idle connection costs no read buffer.
    pub async fn read_some(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            DeviceStream::Plain(stream) => loop {
                stream.readable().await?;
                let mut chunk = [0u8; READ_CHUNK];
                let mut short = None;
                let read = stream.try_io(Interest::READABLE, || {
                    let read = read_socket(stream, &mut chunk)?;
                    if read > 0 && read < READ_CHUNK {
                        // A short read emptied the socket. Said as `WouldBlock`, the runtime
                        // clears the readiness now; otherwise the next read would be a
                        // syscall of its own only to find the socket empty (one per frame
                        // from devices that send one frame at a time). Readiness that came
                        // after this read is kept: the runtime clears only what it saw.
                        short = Some(read);
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    Ok(read)
                });
                match (read, short) {
                    (_, Some(read)) | (Ok(read), None) => {
                        buf.extend_from_slice(&chunk[..read]);
                        return Ok(read);
                    }
                    (Err(err), None) if err.kind() == io::ErrorKind::WouldBlock => continue,
                    (Err(err), None) => return Err(err),
                }
            },
            DeviceStream::Tls(stream) => {
                buf.reserve(READ_CHUNK);
                stream.read_buf(buf).await
            }
        }
    }

    /// The common name of the client certificate, when the peer presented one (mutual
    /// TLS; the listener's verifier has already checked it against `client_ca`).
    pub fn certified_name(&self) -> Option<String> {
        let DeviceStream::Tls(stream) = self else {
            return None;
        };
        let certificate = stream.get_ref().1.peer_certificates()?.first()?;
        let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref()).ok()?;
        let name = parsed
            .subject()
            .iter_common_name()
            .next()?
            .as_str()
            .ok()?
            .to_owned();
        Some(name)
    }

    /// Writes all of `data`.
    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            DeviceStream::Plain(stream) => stream.write_all(data).await,
            DeviceStream::Tls(stream) => {
                stream.write_all(data).await?;
                stream.flush().await
            }
        }
    }

    /// Closes the write side politely, giving up after [`SHUTDOWN_TIMEOUT`]: a TLS close
    /// must send `close_notify` (and whatever is still buffered), which waits forever on a
    /// peer that stopped reading.
    pub async fn shutdown(&mut self) {
        let close = async {
            match self {
                DeviceStream::Plain(stream) => stream.shutdown().await,
                DeviceStream::Tls(stream) => stream.shutdown().await,
            }
        };
        // The peer may already be gone, or not reading; nothing to do about it then.
        let _closed = tokio::time::timeout(SHUTDOWN_TIMEOUT, close).await;
    }
}
