//! The event type and its small value types.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

use crate::EventId;

/// A device's identity as it named itself (hello frame, message field, or certificate).
///
/// Cheap to clone: one connection's events all share the same allocation.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(Arc<str>);

impl DeviceId {
    /// Wraps a device id; callers validate it first (see `fieldgate_codec`).
    pub fn new(id: &str) -> Self {
        Self(Arc::from(id))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Lets sets and maps of devices be searched by `&str`, without building a `DeviceId`.
impl std::borrow::Borrow<str> for DeviceId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// What an event is about. Decides its default priority and QoS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// Bulk measurements.
    Telemetry,
    /// Online/offline and other device state changes.
    Status,
    /// Something a person or system must react to.
    Alarm,
    /// A device's answer to a command.
    CommandResult,
    /// A discrete device event that is neither telemetry nor an alarm.
    Event,
}

impl EventKind {
    /// Every kind, in wire-code order.
    pub const ALL: [EventKind; 5] = [
        EventKind::Telemetry,
        EventKind::Status,
        EventKind::Alarm,
        EventKind::CommandResult,
        EventKind::Event,
    ];

    /// The name used on the wire, in topics and in config (`"telemetry"`, `"command_result"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Telemetry => "telemetry",
            EventKind::Status => "status",
            EventKind::Alarm => "alarm",
            EventKind::CommandResult => "command_result",
            EventKind::Event => "event",
        }
    }

    /// Parses a wire name; `None` for anything else.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }

    /// The lane this kind travels in unless a stage decides otherwise.
    pub fn default_priority(self) -> Priority {
        match self {
            EventKind::Telemetry | EventKind::Event => Priority::Normal,
            EventKind::Status | EventKind::Alarm | EventKind::CommandResult => Priority::High,
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            EventKind::Telemetry => 0,
            EventKind::Status => 1,
            EventKind::Alarm => 2,
            EventKind::CommandResult => 3,
            EventKind::Event => 4,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.code() == code)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which lane an event takes. High-priority events pass bulk telemetry at every queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    /// Alarms, status changes and command traffic.
    High,
    /// Bulk telemetry.
    Normal,
}

impl Priority {
    /// Both lanes, most urgent first.
    pub const ALL: [Priority; 2] = [Priority::High, Priority::Normal];

    /// Lane name used in metrics and buffer directories.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
        }
    }
}

/// How the payload bytes are to be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadFormat {
    /// One JSON object, exactly as the device sent it.
    Json,
    /// Opaque bytes (a binary `length_prefixed` frame); sinks encode them as base64.
    Binary,
}

/// One thing a device said, as it travels through the gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Set once at receipt, kept in the buffer record: see [`Event::id`].
    pub(crate) id: EventId,
    /// Who sent it.
    pub device: DeviceId,
    /// What it is about.
    pub kind: EventKind,
    /// Lane; starts as `kind.default_priority()`.
    pub priority: Priority,
    /// When the gateway received it, in milliseconds since the Unix epoch.
    pub received_at_ms: u64,
    /// When the device says it happened, in milliseconds since the Unix epoch, if it said.
    pub device_time_ms: Option<u64>,
    /// Name of the source (config key) that received it.
    pub source: Arc<str>,
    /// How to read `payload`.
    pub format: PayloadFormat,
    /// The device's data, unchanged.
    pub payload: Bytes,
}

impl Event {
    /// An event with the kind's default priority, no device time and a new [`EventId`].
    pub fn new(
        device: DeviceId,
        kind: EventKind,
        source: Arc<str>,
        received_at_ms: u64,
        format: PayloadFormat,
        payload: Bytes,
    ) -> Self {
        Self {
            id: EventId::generate(),
            device,
            kind,
            priority: kind.default_priority(),
            received_at_ms,
            device_time_ms: None,
            source,
            format,
            payload,
        }
    }

    /// The event's id: unique per gateway (across restarts too), given at receipt and the
    /// same on every redelivery, so a consumer can drop duplicates exactly. Copies of the
    /// event (one per sink) share it.
    pub fn id(&self) -> EventId {
        self.id
    }
}
