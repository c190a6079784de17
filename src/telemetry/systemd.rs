//! systemd's service notifications (`sd_notify`): `READY=1` once listeners are bound and
//! buffers open, `WATCHDOG=1` pings while the runtime runs, `STOPPING=1` when shutdown
//! starts.
//!
//! The protocol is one datagram per notification to the Unix socket named by
//! `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket). Without that variable,
//! i.e. when not started by systemd as `Type=notify`, every call does nothing. A failed
//! notification is logged and never stops the gateway.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use thiserror::Error;
use tokio_util::sync::CancellationToken;

/// The environment variable naming the notification socket.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// The watchdog period systemd expects pings within (`WatchdogSec=`), in microseconds.
const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
/// The process the watchdog period is meant for; absent means this one.
const WATCHDOG_PID: &str = "WATCHDOG_PID";

/// A notification that could not be sent.
#[derive(Debug, Error)]
#[error("cannot notify systemd at {socket:?}")]
pub struct NotifyError {
    socket: String,
    #[source]
    source: io::Error,
}

/// Where notifications go: the socket from `$NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct Notifier {
    socket: String,
    addr: SocketAddr,
}

impl Notifier {
    /// The notifier for `$NOTIFY_SOCKET`; `None` when the variable is unset or empty.
    pub fn from_env() -> Option<Result<Self, NotifyError>> {
        let socket = std::env::var(NOTIFY_SOCKET).ok()?;
        (!socket.is_empty()).then(|| Self::new(&socket))
    }

    /// A notifier for `socket`: a filesystem path, or `@name` for an abstract socket.
    pub fn new(socket: &str) -> Result<Self, NotifyError> {
        let addr = socket_addr(socket).map_err(|source| NotifyError {
            socket: socket.to_owned(),
            source,
        })?;
        Ok(Self {
            socket: socket.to_owned(),
            addr,
        })
    }

    /// Sends one notification, e.g. `READY=1`.
    pub fn send(&self, state: &str) -> Result<(), NotifyError> {
        let error = |source| NotifyError {
            socket: self.socket.clone(),
            source,
        };
        let socket = UnixDatagram::unbound().map_err(error)?;
        socket
            .send_to_addr(state.as_bytes(), &self.addr)
            .map_err(error)?;
        Ok(())
    }
}

#[cfg(target_os = "linux")]
fn socket_addr(socket: &str) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt as _;
    match socket.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(socket),
    }
}

#[cfg(not(target_os = "linux"))]
fn socket_addr(socket: &str) -> io::Result<SocketAddr> {
    SocketAddr::from_pathname(socket)
}

/// Sends `state` to `$NOTIFY_SOCKET` if set; failures are logged.
fn notify(state: &str) {
    match Notifier::from_env() {
        None => {}
        Some(Ok(notifier)) => {
            if let Err(err) = notifier.send(state) {
                tracing::warn!(error = %err, state, "systemd notification failed");
            }
        }
        Some(Err(err)) => tracing::warn!(error = %err, state, "systemd notification failed"),
    }
}

/// Tells systemd the gateway is ready: listeners are bound and buffers are open.
pub fn notify_ready() {
    notify("READY=1\nSTATUS=ready");
}

/// Tells systemd the gateway has begun its graceful shutdown.
pub fn notify_stopping() {
    notify("STOPPING=1\nSTATUS=shutting down");
}

/// The watchdog period systemd set for this process, if any.
fn watchdog_period() -> Option<Duration> {
    let for_us = std::env::var(WATCHDOG_PID)
        .map_or(true, |pid| pid.trim() == std::process::id().to_string());
    if !for_us {
        return None;
    }
    let usec: u64 = std::env::var(WATCHDOG_USEC).ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Pings systemd's watchdog at half its period until `stop` is cancelled; returns at
/// once when no watchdog is set. Running as a task on the gateway's runtime, the pings
/// stop when the runtime stops scheduling, and systemd restarts the service.
pub async fn watchdog(stop: CancellationToken) {
    let Some(period) = watchdog_period() else {
        return;
    };
    let Some(Ok(notifier)) = Notifier::from_env() else {
        tracing::warn!(
            ?period,
            "WATCHDOG_USEC is set but NOTIFY_SOCKET is not usable; no watchdog pings"
        );
        return;
    };
    tracing::info!(?period, "pinging the systemd watchdog");
    let mut ticks = tokio::time::interval(period / 2);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {
                if let Err(err) = notifier.send("WATCHDOG=1") {
                    tracing::warn!(error = %err, "systemd watchdog ping failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_one_datagram_per_notification() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let receiver = UnixDatagram::bind(&path).expect("bind");
        let notifier = Notifier::new(path.to_str().expect("utf-8 path")).expect("notifier");
        notifier.send("READY=1").expect("send");
        notifier.send("WATCHDOG=1").expect("send");
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1");
        let n = receiver.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn abstract_socket_names_start_with_at() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("fieldgate-test-{}", std::process::id());
        let receiver =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).expect("addr"))
                .expect("bind");
        Notifier::new(&format!("@{name}"))
            .expect("notifier")
            .send("STOPPING=1")
            .expect("send");
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn a_missing_socket_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("absent.sock");
        let path = path.to_str().expect("utf-8 path");
        let err = Notifier::new(path)
            .expect("notifier")
            .send("READY=1")
            .expect_err("no socket there");
        assert!(err.to_string().contains(path), "{err}");
    }
}
