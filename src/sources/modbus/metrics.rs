//! The metric handles of one Modbus source, resolved once so a poll bumps atomics only.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use super::client::{ERROR_KINDS, ModbusError};
use crate::telemetry::Metrics;
use crate::telemetry::metrics::ModbusErrorLabels;

/// Creates every series of a Modbus source at zero.
pub fn declare_metrics(metrics: &Metrics, source: &str) {
    drop(SourceMetrics::new(metrics, source));
}

/// Handles for `fieldgate_modbus_*{source}` and `fieldgate_received_events_total{source}`.
#[derive(Clone)]
pub struct SourceMetrics {
    /// Requests sent.
    pub requests: Counter,
    /// Errors, indexed like [`ERROR_KINDS`].
    errors: Vec<Counter>,
    /// Poll durations.
    pub poll_seconds: Histogram,
    /// Configured points.
    pub points: Gauge,
    /// Events sent.
    pub received: Counter,
}

impl SourceMetrics {
    /// Resolves (and so creates at zero) every series of `source`.
    pub fn new(metrics: &Metrics, source: &str) -> Self {
        let label = Metrics::source(source);
        Self {
            requests: metrics.modbus_requests.get_or_create(&label).clone(),
            errors: ERROR_KINDS
                .iter()
                .map(|kind| {
                    metrics
                        .modbus_errors
                        .get_or_create(&ModbusErrorLabels {
                            source: source.to_owned(),
                            kind: (*kind).to_owned(),
                        })
                        .clone()
                })
                .collect(),
            poll_seconds: metrics.modbus_poll_seconds.get_or_create(&label).clone(),
            points: metrics.modbus_points.get_or_create(&label).clone(),
            received: metrics.received_events.get_or_create(&label).clone(),
        }
    }

    /// Counts one failed request.
    pub fn error(&self, err: &ModbusError) {
        let kind = err.kind();
        if let Some(index) = ERROR_KINDS.iter().position(|known| *known == kind) {
            self.errors[index].inc();
        }
    }
}
