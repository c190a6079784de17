//! Which devices are connected right now, and how to reach their connections.
//!
//! A connection registers each device it speaks for; the newest connection of a device
//! wins. Sinks and the API look devices up here to deliver commands; revocation closes
//! a device's connection. Queued commands live here, not in the connection: an idle
//! connection holds only a small [`ConnectionSignal`], no channel.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fieldgate_core::DeviceId;
use serde_json::value::RawValue;
use tokio::sync::Notify;
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

/// Wakes one connection: commands are waiting for it, or it must close.
#[derive(Default)]
pub struct ConnectionSignal {
    commands: Notify,
    close: Notify,
    closing: AtomicBool,
}

impl ConnectionSignal {
    /// Resolves once commands may be waiting (call [`DeviceDirectory::take_command`]).
    pub async fn commands_waiting(&self) {
        self.commands.notified().await;
    }

    /// Resolves once the connection has been told to close.
    pub async fn close_requested(&self) {
        while !self.closing.load(Ordering::Acquire) {
            self.close.notified().await;
        }
    }

    fn request_close(&self) {
        self.closing.store(true, Ordering::Release);
        // A stored permit: the connection sees it even if it is not waiting right now.
        self.close.notify_one();
    }
}

struct Entry {
    connection: u64,
    signal: Arc<ConnectionSignal>,
}

#[derive(Default)]
struct State {
    devices: HashMap<DeviceId, Entry>,
    /// Commands not yet taken, per connection; absent when none.
    queued: HashMap<u64, VecDeque<DeviceCommand>>,
}

/// The connected devices of every source.
#[derive(Default)]
pub struct DeviceDirectory {
    state: Mutex<State>,
}

impl DeviceDirectory {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Connection `connection` (woken through `signal`) now speaks for `device`.
    pub fn register(&self, device: DeviceId, connection: u64, signal: &Arc<ConnectionSignal>) {
        let entry = Entry {
            connection,
            signal: Arc::clone(signal),
        };
        self.lock().devices.insert(device, entry);
    }

    /// `connection` closed; forget `device` unless a newer connection took it over.
    pub fn unregister(&self, device: &DeviceId, connection: u64) {
        let mut state = self.lock();
        if state
            .devices
            .get(device)
            .is_some_and(|entry| entry.connection == connection)
        {
            state.devices.remove(device);
        }
    }

    /// `connection` is gone: drop what was queued for it.
    pub fn forget_connection(&self, connection: u64) {
        self.lock().queued.remove(&connection);
    }

    /// Queues `command` for the connection of its device and wakes it.
    pub fn send(&self, command: DeviceCommand) -> Result<(), CommandError> {
        let mut state = self.lock();
        let (connection, signal) = match state.devices.get(&command.device) {
            Some(entry) => (entry.connection, Arc::clone(&entry.signal)),
            None => return Err(CommandError::Offline),
        };
        let queue = state.queued.entry(connection).or_default();
        if queue.len() >= COMMAND_QUEUE {
            return Err(CommandError::Busy);
        }
        queue.push_back(command);
        drop(state);
        signal.commands.notify_one();
        Ok(())
    }

    /// The next command queued for `connection`, oldest first.
    pub fn take_command(&self, connection: u64) -> Option<DeviceCommand> {
        let mut state = self.lock();
        let queue = state.queued.get_mut(&connection)?;
        let command = queue.pop_front();
        if queue.is_empty() {
            state.queued.remove(&connection);
        }
        command
    }

    /// Tells the connection speaking for `device` to close; false if it is not connected.
    pub fn close(&self, device: &DeviceId) -> bool {
        match self.lock().devices.get(device) {
            Some(entry) => {
                entry.signal.request_close();
                true
            }
            None => false,
        }
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

    fn command(device: &str) -> DeviceCommand {
        DeviceCommand {
            device: DeviceId::new(device),
            id: "c".into(),
            name: "n".into(),
            params: RawValue::from_string("{}".into()).unwrap(),
        }
    }

    #[tokio::test]
    async fn newest_connection_wins_and_old_close_keeps_it() {
        let directory = DeviceDirectory::default();
        let device = DeviceId::new("d1");
        let old = Arc::new(ConnectionSignal::default());
        let new = Arc::new(ConnectionSignal::default());
        directory.register(device.clone(), 1, &old);
        directory.register(device.clone(), 2, &new);
        directory.unregister(&device, 1);
        directory.send(command("d1")).unwrap();
        new.commands_waiting().await;
        assert!(directory.take_command(2).is_some());
        assert!(directory.take_command(2).is_none());
        assert!(directory.take_command(1).is_none());
        for _ in 0..COMMAND_QUEUE {
            directory.send(command("d1")).unwrap();
        }
        assert_eq!(directory.send(command("d1")), Err(CommandError::Busy));
        directory.forget_connection(2);
        assert!(directory.take_command(2).is_none());
        assert!(directory.close(&device));
        new.close_requested().await;
        assert!(!old.closing.load(Ordering::Acquire));
        directory.unregister(&device, 2);
        assert!(!directory.close(&device));
        assert_eq!(directory.send(command("d1")), Err(CommandError::Offline));
    }
}
