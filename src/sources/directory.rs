//! Which devices are connected right now, and how to reach their connections.
//!
//! A connection registers each device it speaks for; the newest connection of a device
//! wins. Sinks and the API look devices up here to deliver commands; revocation closes
//! a device's connection through its close token.

use std::collections::HashMap;
use std::sync::Mutex;

use fieldgate_core::DeviceId;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Commands queued per connection before `send` reports the device busy.
pub const COMMAND_QUEUE: usize = 16;

/// A command on its way to a device.
#[derive(Debug)]
pub struct DeviceCommand {
    /// The device it is for (a connection may speak for several).
    pub device: DeviceId,
    /// Command id chosen by the sender; the device's result carries it back.
    pub id: String,
    /// What to do.
    pub name: String,
    /// Arguments, passed to the device unchanged.
    pub params: Box<RawValue>,
}

/// Why a command could not be handed to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// No connection speaks for this device.
    #[error("device offline")]
    Offline,
    /// The device has too many commands queued.
    #[error("device busy: too many queued commands")]
    Busy,
}

struct Entry {
    connection: u64,
    commands: mpsc::Sender<Box<DeviceCommand>>,
    close: CancellationToken,
}

/// How to reach one connection.
pub struct ConnectionHandle {
    /// The connection's id, unique within the process.
    pub connection: u64,
    /// Commands for the connection's devices.
    pub commands: mpsc::Sender<Box<DeviceCommand>>,
    /// Cancelled to close the connection (credentials revoked).
    pub close: CancellationToken,
}

/// The connected devices of every source.
#[derive(Default)]
pub struct DeviceDirectory {
    devices: Mutex<HashMap<DeviceId, Entry>>,
}

impl DeviceDirectory {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, Entry>> {
        self.devices
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The connection of `handle` now speaks for `device`.
    pub fn register(&self, device: DeviceId, handle: &ConnectionHandle) {
        let entry = Entry {
            connection: handle.connection,
            commands: handle.commands.clone(),
            close: handle.close.clone(),
        };
        self.lock().insert(device, entry);
    }

    /// Closes the connection speaking for `device`; false if it is not connected.
    pub fn close(&self, device: &DeviceId) -> bool {
        match self.lock().get(device) {
            Some(entry) => {
                entry.close.cancel();
                true
            }
            None => false,
        }
    }

    /// `connection` closed; forget `device` unless a newer connection took it over.
    pub fn unregister(&self, device: &DeviceId, connection: u64) {
        let mut devices = self.lock();
        if devices
            .get(device)
            .is_some_and(|entry| entry.connection == connection)
        {
            devices.remove(device);
        }
    }

    /// Queues `command` for `device`.
    pub fn send(&self, device: &DeviceId, command: DeviceCommand) -> Result<(), CommandError> {
        let devices = self.lock();
        let entry = devices.get(device).ok_or(CommandError::Offline)?;
        entry
            .commands
            .try_send(Box::new(command))
            .map_err(|err| match err {
                mpsc::error::TrySendError::Full(_) => CommandError::Busy,
                mpsc::error::TrySendError::Closed(_) => CommandError::Offline,
            })
    }
}

/// Closes the connection of every device whose id arrives on `revoked` (registry
/// revocations, deletions, secret rotations) until `stop`.
pub async fn close_revoked(
    directory: std::sync::Arc<DeviceDirectory>,
    mut revoked: tokio::sync::broadcast::Receiver<String>,
    stop: CancellationToken,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let id = tokio::select! {
            _ = stop.cancelled() => return,
            id = revoked.recv() => id,
        };
        match id {
            Ok(id) => {
                if directory.close(&DeviceId::new(&id)) {
                    tracing::info!(device = %id, "credentials revoked: connection closed");
                }
            }
            // Missed ids after a burst: their next authentication fails anyway.
            Err(RecvError::Lagged(missed)) => tracing::warn!(missed, "revocation notices missed"),
            Err(RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command() -> DeviceCommand {
        DeviceCommand {
            device: DeviceId::new("d1"),
            id: "c".into(),
            name: "n".into(),
            params: RawValue::from_string("{}".into()).unwrap(),
        }
    }

    #[test]
    fn newest_connection_wins_and_old_close_keeps_it() {
        let directory = DeviceDirectory::default();
        let device = DeviceId::new("d1");
        let (old_tx, _old_rx) = mpsc::channel(1);
        let (new_tx, mut new_rx) = mpsc::channel(1);
        let old = ConnectionHandle {
            connection: 1,
            commands: old_tx,
            close: CancellationToken::new(),
        };
        let new = ConnectionHandle {
            connection: 2,
            commands: new_tx,
            close: CancellationToken::new(),
        };
        directory.register(device.clone(), &old);
        directory.register(device.clone(), &new);
        directory.unregister(&device, 1);
        directory.send(&device, command()).unwrap();
        assert!(new_rx.try_recv().is_ok());
        assert_eq!(directory.send(&device, command()), Ok(()));
        assert_eq!(directory.send(&device, command()), Err(CommandError::Busy));
        assert!(directory.close(&device));
        assert!(new.close.is_cancelled() && !old.close.is_cancelled());
        directory.unregister(&device, 2);
        assert!(!directory.close(&device));
        assert_eq!(
            directory.send(&device, command()),
            Err(CommandError::Offline)
        );
    }
}
