//! Which devices are connected right now, and how to reach their connections.
//!
//! A connection registers each device it speaks for. A device may have several sessions
//! at once (a reconnect racing the old connection's timeout, two listeners): every one is
//! kept, commands go to the newest, and revocation closes them all. Sinks and the API look
//! devices up here to deliver commands. Queued commands live here, not in the connection:
//! an idle connection holds only a small [`ConnectionSignal`], no channel.
//!
//! Invariant: a session leaves only through its own `unregister`, so an older session
//! closing never takes a newer one's place.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fieldgate_core::DeviceId;
use serde_json::value::RawValue;
use tokio::sync::Notify;

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
    /// Every open session per device, oldest first; never an empty list.
    devices: HashMap<DeviceId, Vec<Entry>>,
    /// Commands not yet taken, per connection; absent when none.
    queued: HashMap<u64, VecDeque<DeviceCommand>>,
}

/// The connected devices of every source.
#[derive(Default)]
pub struct DeviceDirectory {
    state: Mutex<State>,
    /// The last connection id handed out.
    last_connection: AtomicU64,
}

impl DeviceDirectory {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A connection id no other connection of any source has: sessions and their queued
    /// commands are keyed by it.
    pub fn next_connection_id(&self) -> u64 {
        self.last_connection.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Connection `connection` (woken through `signal`) now speaks for `device`, as its
    /// newest session; the device's older sessions stay registered.
    pub fn register(&self, device: DeviceId, connection: u64, signal: &Arc<ConnectionSignal>) {
        let mut state = self.lock();
        let sessions = state.devices.entry(device).or_default();
        // Registering again (a repeated hello) makes the session the newest, once.
        sessions.retain(|entry| entry.connection != connection);
        sessions.push(Entry {
            connection,
            signal: Arc::clone(signal),
        });
    }

    /// `connection` closed: forget its session of `device`, and only that one.
    pub fn unregister(&self, device: &DeviceId, connection: u64) {
        let mut state = self.lock();
        if let Some(sessions) = state.devices.get_mut(device) {
            sessions.retain(|entry| entry.connection != connection);
            if sessions.is_empty() {
                state.devices.remove(device);
            }
        }
    }

    /// Open sessions of `device`.
    #[cfg(test)]
    pub fn sessions(&self, device: &DeviceId) -> usize {
        self.lock().devices.get(device).map_or(0, Vec::len)
    }

    /// `connection` is gone: drop what was queued for it.
    pub fn forget_connection(&self, connection: u64) {
        self.lock().queued.remove(&connection);
    }

    /// Queues `command` for the newest session of its device and wakes it.
    pub fn send(&self, command: DeviceCommand) -> Result<(), CommandError> {
        let mut state = self.lock();
        let (connection, signal) = match state
            .devices
            .get(&command.device)
            .and_then(|sessions| sessions.last())
        {
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

    /// Tells every session of `device` to close; returns how many were told (0 when the
    /// device is not connected).
    pub fn close(&self, device: &DeviceId) -> usize {
        let state = self.lock();
        let Some(sessions) = state.devices.get(device) else {
            return 0;
        };
        for entry in sessions {
            entry.signal.request_close();
        }
        sessions.len()
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
        assert_eq!(directory.close(&device), 1);
        new.close_requested().await;
        assert!(!old.closing.load(Ordering::Acquire));
        directory.unregister(&device, 2);
        assert_eq!(directory.close(&device), 0);
        assert_eq!(directory.send(command("d1")), Err(CommandError::Offline));
    }

    #[tokio::test]
    async fn close_reaches_every_session_and_the_newest_gets_commands() {
        let directory = DeviceDirectory::default();
        let device = DeviceId::new("d1");
        let other = DeviceId::new("d2");
        let first = Arc::new(ConnectionSignal::default());
        let second = Arc::new(ConnectionSignal::default());
        let bystander = Arc::new(ConnectionSignal::default());
        directory.register(device.clone(), 1, &first);
        directory.register(device.clone(), 2, &second);
        directory.register(other.clone(), 3, &bystander);
        assert_eq!(directory.sessions(&device), 2);
        directory.send(command("d1")).unwrap();
        assert!(directory.take_command(2).is_some());
        assert!(directory.take_command(1).is_none());

        assert_eq!(directory.close(&device), 2);
        first.close_requested().await;
        second.close_requested().await;
        assert!(!bystander.closing.load(Ordering::Acquire));
    }

    #[test]
    fn connection_ids_are_unique() {
        let directory = DeviceDirectory::default();
        let first = directory.next_connection_id();
        assert_ne!(first, directory.next_connection_id());
    }

    #[test]
    fn an_older_session_closing_keeps_the_newer_one() {
        let directory = DeviceDirectory::default();
        let device = DeviceId::new("d1");
        let old = Arc::new(ConnectionSignal::default());
        let new = Arc::new(ConnectionSignal::default());
        directory.register(device.clone(), 1, &old);
        directory.register(device.clone(), 2, &new);
        // A repeated hello on the old session makes it the newest; once, not twice.
        directory.register(device.clone(), 1, &old);
        assert_eq!(directory.sessions(&device), 2);
        directory.send(command("d1")).unwrap();
        assert!(directory.take_command(1).is_some());
        directory.unregister(&device, 1);
        assert_eq!(directory.sessions(&device), 1);
        directory.send(command("d1")).unwrap();
        assert!(directory.take_command(2).is_some());
        directory.unregister(&device, 2);
        assert_eq!(directory.sessions(&device), 0);
        assert_eq!(directory.send(command("d1")), Err(CommandError::Offline));
    }
}
