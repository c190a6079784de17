//! Sources: where events enter the gateway. Each turns device traffic into [`Event`]s
//! and hands them to its [`crate::pipeline::SourceOutput`].
//!
//! [`Event`]: fieldgate_core::Event

pub mod directory;
pub mod limits;
pub mod tcp;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use fieldgate_registry::{AuthThrottle, Registry};

use self::directory::DeviceDirectory;
use self::limits::{FdReserve, PartialFrameBudget};
use crate::commands::CommandDispatcher;

/// What every source shares about devices beyond its own connections.
pub struct DeviceServices {
    /// Connected devices, for commands and revocation.
    pub directory: Arc<DeviceDirectory>,
    /// Registered devices and their credentials, when `[registry]` is configured.
    pub registry: Option<Arc<Registry>>,
    /// Command queue and delivery, when the registry is configured.
    pub commands: Option<Arc<CommandDispatcher>>,
    /// Growing delays after failed authentications, per peer address and per device.
    pub throttle: AuthThrottle,
    /// The throttle's clock origin.
    pub started: tokio::time::Instant,
    /// Bytes all connections together may hold in unfinished frames.
    pub frame_budget: PartialFrameBudget,
    /// File descriptors kept free; shared with the API listener.
    pub fds: Arc<FdReserve>,
}

impl DeviceServices {
    /// Time since start-up, the throttle's clock.
    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }
}

/// Milliseconds since the Unix epoch, the gateway's timestamp for received events.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
