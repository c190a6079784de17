//! How the gateway reports on itself: Prometheus metrics, process statistics, logs, the
//! resource watchdog and CPU profiles.

pub mod logging;
pub mod metrics;
mod process;
pub mod profiling;
pub mod watchdog;

pub use metrics::Metrics;
