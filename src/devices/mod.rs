//! Devices beyond one connection: the sessions of connected devices, commands to them,
//! and the glue to the registry of known devices. Sources and sinks both use these; none
//! of them imports a source or a sink.

pub mod commands;
pub mod directory;
pub mod local_brokers;
pub mod registry;

use std::sync::Arc;

use fieldgate_registry::{AuthThrottle, Registry};

use self::commands::CommandDispatcher;
use self::directory::DeviceDirectory;
use self::local_brokers::LocalBrokers;
use crate::net::limits::{FdReserve, PartialFrameBudget};

/// What every device-facing source shares about devices beyond its own connections.
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
    /// The embedded brokers, for the gateway's own local publishes (alarm actions).
    pub local_brokers: Arc<LocalBrokers>,
}

impl DeviceServices {
    /// Time since start-up, the throttle's clock.
    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }
}
