//! How the gateway reports on itself: Prometheus metrics, process statistics and logs.

pub mod logging;
pub mod metrics;
mod process;

pub use metrics::Metrics;
