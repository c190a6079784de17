//! Which metric series a config implies, created at zero before anything happens, so a
//! healthy gateway's dashboard shows 0 from start-up, never "no data".

use crate::sinks::SinkConfig;
use crate::sources::SourceConfig;
use crate::topology::Config;

use super::Metrics;

/// Creates the series of every configured source, sink and listener in `metrics`.
pub fn declare(metrics: &Metrics, config: &Config) {
    metrics.declare_reloads();
    for (name, source) in &config.components.sources {
        if matches!(source, SourceConfig::Tcp(_) | SourceConfig::MqttBroker(_)) {
            metrics.declare_source(name);
        }
        #[cfg(feature = "modbus")]
        if matches!(
            source,
            SourceConfig::ModbusTcp(_) | SourceConfig::ModbusRtu(_)
        ) {
            crate::sources::modbus::declare_metrics(metrics, name);
        }
    }
    for (name, sink) in &config.components.sinks {
        metrics.declare_sink(name, matches!(sink, SinkConfig::Mqtt(_)));
    }
    for (primary, failover) in &config.components.failover {
        drop(metrics.failover_active(primary));
        drop(metrics.failover_switches(primary));
        drop(metrics.failover_events(primary, failover.to.get_ref()));
    }
    if config.settings.api.is_some() {
        metrics.declare_refusals(crate::api::API_SOURCE);
        metrics.declare_auth(crate::api::admin::ADMIN_SOURCE);
    }
    if config.settings.registry.is_some() {
        metrics.declare_auth(crate::api::v1::DEVICE_SOURCE);
    }
}
