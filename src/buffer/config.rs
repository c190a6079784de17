//! `[sinks.NAME.buffer]`: the store-and-forward buffer in front of every sink.

use std::time::Duration;

use serde::Deserialize;

use crate::config::{ByteSize, ConfigError, Context, HumanDuration};

/// `[sinks.NAME.buffer]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    /// Disk (default) or memory.
    #[serde(default, rename = "type")]
    pub kind: BufferKind,
    /// Largest size of the buffer's data.
    #[serde(default = "default_max_size")]
    pub max_size: ByteSize,
    /// What happens to new events when the buffer is full.
    #[serde(default)]
    pub when_full: WhenFull,
    /// When appends are forced to stable storage.
    #[serde(default)]
    pub fsync: FsyncPolicy,
    /// The period of `fsync = "interval"`.
    #[serde(default = "default_fsync_interval")]
    pub fsync_interval: HumanDuration,
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            kind: BufferKind::Disk,
            max_size: default_max_size(),
            when_full: WhenFull::Block,
            fsync: FsyncPolicy::Interval,
            fsync_interval: default_fsync_interval(),
        }
    }
}

/// The smallest buffer that can hold a largest frame with room to spare.
const MIN_BUFFER_SIZE: u64 = 1024 * 1024;

impl BufferConfig {
    pub fn check(&self, context: &Context<'_>, sink: &str) -> Result<(), ConfigError> {
        let whole = |field: &str, message: &str| {
            context
                .error_at(
                    0..0,
                    &format!("sinks.{sink}.buffer.{field}"),
                    message.into(),
                )
                .without_line()
        };
        if self.max_size.0 < MIN_BUFFER_SIZE {
            return Err(whole("max_size", "must be at least 1MiB"));
        }
        if self.fsync_interval.0 < Duration::from_millis(1) {
            return Err(whole("fsync_interval", "must be at least 1ms"));
        }
        Ok(())
    }
}

fn default_max_size() -> ByteSize {
    ByteSize(1 << 30)
}
fn default_fsync_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}

/// Buffer storage.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BufferKind {
    /// Segment files in the data dir: survives restarts and crashes.
    #[default]
    Disk,
    /// RAM only: lost on restart.
    Memory,
}

/// What a full buffer does with a new event.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Wait for room: backpressure reaches the devices.
    #[default]
    Block,
    /// Drop the new event and count it.
    DropNewest,
    /// Evict the oldest buffered events and count them.
    DropOldest,
}

/// When buffer appends reach stable storage.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// Before a device is acked: nothing acked is lost even on power loss.
    Always,
    /// Every `fsync_interval`: power loss may lose up to that much.
    #[default]
    Interval,
    /// Never forced: the OS decides.
    Never,
}
