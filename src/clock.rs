//! The gateway's wall clock for timestamps it records.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, the gateway's timestamp for received events.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
