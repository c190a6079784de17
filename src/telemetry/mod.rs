//! How the gateway reports on itself: Prometheus metrics, process statistics, logs, the
//! resource watchdog, CPU profiles and systemd notifications.

#[cfg(all(feature = "count-allocations", not(test)))]
mod allocations;
pub mod inventory;
pub mod logging;
pub mod metrics;
mod process;
pub mod profiling;
pub mod systemd;
pub mod watchdog;

pub use metrics::Metrics;
