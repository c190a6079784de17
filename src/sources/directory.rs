//! Which devices are connected right now, and how to send them a command.
//!
//! A connection registers each device it speaks for; the newest connection of a device
//! wins. Sinks look devices up here to deliver commands from the cloud.

use std::collections::HashMap;
use std::sync::Mutex;

use fieldgate_core::DeviceId;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

/// Commands queued per connection before `send` reports the device busy.
pub const COMMAND_QUEUE: usize = 16;

/// A command on its way to a device.
#[derive(Debug)]
pub struct DeviceCommand {
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

    /// `connection` now speaks for `device`.
    pub fn register(
        &self,
        device: DeviceId,
        connection: u64,
        commands: mpsc::Sender<Box<DeviceCommand>>,
    ) {
        self.lock().insert(
            device,
            Entry {
                connection,
                commands,
            },
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    fn command() -> DeviceCommand {
        DeviceCommand {
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
        directory.register(device.clone(), 1, old_tx);
        directory.register(device.clone(), 2, new_tx);
        directory.unregister(&device, 1);
        directory.send(&device, command()).unwrap();
        assert!(new_rx.try_recv().is_ok());
        assert_eq!(directory.send(&device, command()), Ok(()));
        assert_eq!(directory.send(&device, command()), Err(CommandError::Busy));
        directory.unregister(&device, 2);
        assert_eq!(
            directory.send(&device, command()),
            Err(CommandError::Offline)
        );
    }
}
