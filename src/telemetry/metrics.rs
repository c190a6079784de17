//! The gateway's Prometheus metrics, registered once and shared by every component.
//!
//! Names written in issues are contracts (`fieldgate_sent_events_total{sink}`, …).
//! Components resolve their label handles once at start-up, so the hot path is an
//! atomic add, not a label lookup.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use super::process::ProcessCollector;

/// `{source}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    /// Source name from the config.
    pub source: String,
}

/// `{sink}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabel {
    /// Sink name from the config.
    pub sink: String,
}

/// `{sink, reason}` for events that will never be delivered.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    /// Sink the event was meant for.
    pub sink: String,
    /// A closed set: `buffer_full`, `evicted`, `too_large`, `shutting_down`, `storage_error`,
    /// `corrupt`, `encode_failed`, `rejected`.
    pub reason: String,
}

/// `{source, reason}` for frames a device got wrong.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ParseLabels {
    /// Source name from the config.
    pub source: String,
    /// The wire error code (`invalid_json`, `frame_too_large`, …).
    pub reason: String,
}

/// `{source, reason}` for connections a defence refused or cut off.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// Source name from the config, or `api` for the HTTP listener.
    pub source: String,
    /// A closed set: `hello_timeout`, `unauthenticated_frame_too_large`,
    /// `partial_frame_budget`, `fd_reserve`, `max_connections`.
    pub reason: String,
}

/// `{transform}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransformLabel {
    /// Transform name from the config.
    pub transform: String,
}

/// `{transform, reason}` for events a transform could not apply to (passed unchanged).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransformErrorLabels {
    /// Transform name from the config.
    pub transform: String,
    /// A closed set: `not_json`.
    pub reason: String,
}

/// `{transform, severity}` of the alarm series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlarmLabels {
    /// Transform (rule) name from the config.
    pub transform: String,
    /// A closed set: `critical`, `major`, `minor`, `warning`, `info`.
    pub severity: String,
}

/// `{sink, to}` of events a sink handed to its failover sink.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailoverLabels {
    /// The primary sink.
    pub sink: String,
    /// Its failover sink.
    pub to: String,
}

/// `{rule, action}` of the alarm action series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlarmActionLabels {
    /// The rule: the `alarm` transform's name.
    pub rule: String,
    /// The action's `name` (by default its `type`).
    pub action: String,
}

/// `{result}` of a config reload: `applied`, `unchanged` or `failed`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabel {
    /// What the reload did.
    pub result: String,
}

/// `{hash}` of the running config.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HashLabel {
    /// SHA-256 of the config text, hex.
    pub hash: String,
}

/// `{source, kind}` of `fieldgate_modbus_errors_total`.
#[cfg(feature = "modbus")]
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModbusErrorLabels {
    /// Source name from the config.
    pub source: String,
    /// A closed set: `connect`, `timeout`, `exception`, `protocol`, `malformed`, `io`.
    pub kind: String,
}

/// `reason`s of `fieldgate_dropped_events_total`, created at zero for every sink.
pub const DROP_REASONS: &[&str] = &[
    "buffer_full",
    "evicted",
    "too_large",
    "shutting_down",
    "storage_error",
    "corrupt",
    "encode_failed",
    "rejected",
    "intake_full",
];

/// `result`s of `fieldgate_config_reloads_total`, created at zero from start-up.
pub const RELOAD_RESULTS: &[&str] = &["applied", "unchanged", "failed"];

/// `reason`s of `fieldgate_refused_connections_total`, created at zero for every listener.
pub const REFUSAL_REASONS: &[&str] = &[
    "hello_timeout",
    "unauthenticated_frame_too_large",
    "partial_frame_budget",
    "fd_reserve",
    "max_connections",
    "header_timeout",
    "idle_timeout",
];

/// `reason`s of `fieldgate_protocol_parse_failures_total` created at zero for every TCP
/// source: the framing error and the commonest message error. Other reasons (the wire
/// error codes) appear when first counted.
pub const PARSE_REASONS: &[&str] = &["frame_too_large", "invalid_json"];

/// Every metric the gateway exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Open device connections per source.
    pub connections: Family<SourceLabel, Gauge>,
    /// Events accepted from devices per source.
    pub received_events: Family<SourceLabel, Counter>,
    /// Events acknowledged by the upstream per sink.
    pub sent_events: Family<SinkLabel, Counter>,
    /// Events given up on, by sink and reason.
    pub dropped_events: Family<DropLabels, Counter>,
    /// Bad frames per source and reason.
    pub parse_failures: Family<ParseLabels, Counter>,
    /// Connections refused or closed for authentication failures.
    pub auth_failures: Family<SourceLabel, Counter>,
    /// Events waiting in each sink's buffer.
    pub buffer_events: Family<SinkLabel, Gauge>,
    /// Bytes held by each sink's buffer.
    pub buffer_bytes: Family<SinkLabel, Gauge>,
    /// When the oldest event in each sink's buffer was stored (Unix seconds; 0 when empty).
    pub buffer_oldest_event: Family<SinkLabel, Gauge>,
    /// Corrupt buffer bytes cut away at start-up or found while reading.
    pub buffer_corrupt_bytes: Family<SinkLabel, Counter>,
    /// 1 while the sink's upstream connection is up.
    pub upstream_connected: Family<SinkLabel, Gauge>,
    /// Upstream connection attempts that failed.
    pub upstream_connect_failures: Family<SinkLabel, Counter>,
    /// Receipt to upstream acknowledgement.
    pub event_latency: Family<SinkLabel, Histogram, fn() -> Histogram>,
    /// RSS slope over the watchdog's last minute of samples, in bytes per minute.
    pub watchdog_rss_growth: Gauge,
    /// Tokio tasks alive at the watchdog's last sample.
    pub tasks: Gauge,
    /// Connections refused or closed by a defence, by source and reason.
    pub refused_connections: Family<RefusalLabels, Counter>,
    /// `fieldgate_filtered_events_total{transform}`: events a filter dropped on purpose.
    pub filtered_events: Family<TransformLabel, Counter>,
    /// `fieldgate_transform_errors_total{transform,reason}`.
    pub transform_errors: Family<TransformErrorLabels, Counter>,
    /// `fieldgate_alarms_raised_total{transform,severity}`.
    pub alarms_raised: Family<AlarmLabels, Counter>,
    /// `fieldgate_alarms_cleared_total{transform,severity}`.
    pub alarms_cleared: Family<AlarmLabels, Counter>,
    /// `fieldgate_alarms_active{transform,severity}`: raised or acknowledged, not cleared.
    pub alarms_active: Family<AlarmLabels, Gauge>,
    /// `fieldgate_alarm_action_successes_total{rule,action}`: alarm actions carried out.
    pub alarm_action_successes: Family<AlarmActionLabels, Counter>,
    /// `fieldgate_alarm_action_failures_total{rule,action}`: alarm actions that failed for
    /// good (after their retries) or were dropped.
    pub alarm_action_failures: Family<AlarmActionLabels, Counter>,
    /// `fieldgate_alarm_actions_dropped_total{rule,action}`: alarm actions not queued (the
    /// action's queue was full) or abandoned at shutdown.
    pub alarm_actions_dropped: Family<AlarmActionLabels, Counter>,
    /// `fieldgate_alarm_action_retries_total{rule,action}`: webhook attempts that failed
    /// and were tried again.
    pub alarm_action_retries: Family<AlarmActionLabels, Counter>,
    /// `fieldgate_transform_state_devices{transform}`: devices a stateful transform tracks.
    pub transform_state_devices: Family<TransformLabel, Gauge>,
    /// `fieldgate_transform_evicted_devices_total{transform}`: devices dropped from a full
    /// per-device table (least recently seen first).
    pub transform_evicted_devices: Family<TransformLabel, Counter>,
    /// `fieldgate_transform_checkpoint_failures_total{transform}`.
    pub transform_checkpoint_failures: Family<TransformLabel, Counter>,
    /// `fieldgate_config_reloads_total{result}`.
    pub config_reloads: Family<ReloadLabel, Counter>,
    /// `fieldgate_config_hash{hash}`: 1 for the running config.
    pub config_hash: Family<HashLabel, Gauge>,
    /// `fieldgate_detached_buffer_bytes{sink}`: buffers of sinks no longer configured.
    pub detached_buffer_bytes: Family<SinkLabel, Gauge>,
    /// `fieldgate_failover_active{sink}`: 1 while the sink's new events go to its failover.
    pub failover_active: Family<SinkLabel, Gauge>,
    /// `fieldgate_failover_switches_total{sink}`: times the sink failed over.
    pub failover_switches: Family<SinkLabel, Counter>,
    /// `fieldgate_failover_events_total{sink,to}`: events the sink's failover took.
    pub failover_events: Family<FailoverLabels, Counter>,
    /// `fieldgate_modbus_requests_total{source}`: Modbus requests sent.
    #[cfg(feature = "modbus")]
    pub modbus_requests: Family<SourceLabel, Counter>,
    /// `fieldgate_modbus_errors_total{source,kind}`: Modbus requests without a usable answer.
    #[cfg(feature = "modbus")]
    pub modbus_errors: Family<ModbusErrorLabels, Counter>,
    /// `fieldgate_modbus_poll_seconds{source}`: time of one poll (all its requests).
    #[cfg(feature = "modbus")]
    pub modbus_poll_seconds: Family<SourceLabel, Histogram, fn() -> Histogram>,
    /// `fieldgate_modbus_points{source}`: configured points.
    #[cfg(feature = "modbus")]
    pub modbus_points: Family<SourceLabel, Gauge>,
    /// `fieldgate_mqtt_dropped_messages_total{source,reason}`: messages the embedded MQTT
    /// broker did not deliver or keep (`queue_full`, `retained_full`, `too_large`,
    /// `expired`, `qos0_not_stored`).
    pub mqtt_dropped_messages: Family<ParseLabels, Counter>,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0, 300.0,
    ])
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let metrics = Self {
            connections: Family::default(),
            received_events: Family::default(),
            sent_events: Family::default(),
            dropped_events: Family::default(),
            parse_failures: Family::default(),
            auth_failures: Family::default(),
            buffer_events: Family::default(),
            buffer_bytes: Family::default(),
            buffer_oldest_event: Family::default(),
            buffer_corrupt_bytes: Family::default(),
            upstream_connected: Family::default(),
            upstream_connect_failures: Family::default(),
            event_latency: Family::new_with_constructor(latency_histogram),
            watchdog_rss_growth: Gauge::default(),
            tasks: Gauge::default(),
            refused_connections: Family::default(),
            filtered_events: Family::default(),
            transform_errors: Family::default(),
            alarms_raised: Family::default(),
            alarms_cleared: Family::default(),
            alarms_active: Family::default(),
            alarm_action_successes: Family::default(),
            alarm_action_failures: Family::default(),
            alarm_actions_dropped: Family::default(),
            alarm_action_retries: Family::default(),
            transform_state_devices: Family::default(),
            transform_evicted_devices: Family::default(),
            transform_checkpoint_failures: Family::default(),
            config_reloads: Family::default(),
            config_hash: Family::default(),
            detached_buffer_bytes: Family::default(),
            failover_active: Family::default(),
            failover_switches: Family::default(),
            failover_events: Family::default(),
            #[cfg(feature = "modbus")]
            modbus_requests: Family::default(),
            #[cfg(feature = "modbus")]
            modbus_errors: Family::default(),
            #[cfg(feature = "modbus")]
            modbus_poll_seconds: Family::new_with_constructor(latency_histogram),
            #[cfg(feature = "modbus")]
            modbus_points: Family::default(),
            mqtt_dropped_messages: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "fieldgate_connections",
            "Open device connections",
            metrics.connections.clone(),
        );
        registry.register(
            "fieldgate_received_events",
            "Events accepted from devices",
            metrics.received_events.clone(),
        );
        registry.register(
            "fieldgate_sent_events",
            "Events acknowledged by the sink's upstream",
            metrics.sent_events.clone(),
        );
        registry.register(
            "fieldgate_dropped_events",
            "Events that will never be delivered, by reason",
            metrics.dropped_events.clone(),
        );
        registry.register(
            "fieldgate_protocol_parse_failures",
            "Frames rejected as malformed, oversize or out of protocol",
            metrics.parse_failures.clone(),
        );
        registry.register(
            "fieldgate_mqtt_dropped_messages",
            "Messages the embedded MQTT broker did not deliver to a subscriber or keep, by reason",
            metrics.mqtt_dropped_messages.clone(),
        );
        registry.register(
            "fieldgate_auth_failures",
            "Device authentication failures",
            metrics.auth_failures.clone(),
        );
        registry.register(
            "fieldgate_buffer_events",
            "Events held in the sink's buffer",
            metrics.buffer_events.clone(),
        );
        registry.register(
            "fieldgate_buffer_bytes",
            "Bytes held by the sink's buffer",
            metrics.buffer_bytes.clone(),
        );
        registry.register_with_unit(
            "fieldgate_buffer_oldest_event_timestamp",
            "When the oldest event in the sink's buffer was stored, as Unix time; 0 when empty",
            Unit::Seconds,
            metrics.buffer_oldest_event.clone(),
        );
        registry.register(
            "fieldgate_buffer_corrupt_bytes",
            "Corrupt buffer bytes moved aside",
            metrics.buffer_corrupt_bytes.clone(),
        );
        registry.register(
            "fieldgate_upstream_connected",
            "1 while the sink is connected upstream",
            metrics.upstream_connected.clone(),
        );
        registry.register(
            "fieldgate_upstream_connect_failures",
            "Failed upstream connection attempts",
            metrics.upstream_connect_failures.clone(),
        );
        registry.register_with_unit(
            "fieldgate_event_latency",
            "Time from receipt at the gateway to the upstream's acknowledgement",
            Unit::Seconds,
            metrics.event_latency.clone(),
        );
        registry.register(
            "fieldgate_watchdog_rss_growth_bytes_per_minute",
            "Resident memory growth over the last minute of watchdog samples",
            metrics.watchdog_rss_growth.clone(),
        );
        registry.register(
            "fieldgate_tasks",
            "Tokio tasks alive",
            metrics.tasks.clone(),
        );
        registry.register(
            "fieldgate_refused_connections",
            "Connections refused or closed by a defence (hello deadline, frame budget, FD reserve, connection cap)",
            metrics.refused_connections.clone(),
        );
        registry.register(
            "fieldgate_filtered_events",
            "Events a filter transform dropped on purpose",
            metrics.filtered_events.clone(),
        );
        registry.register(
            "fieldgate_transform_errors",
            "Events a transform could not apply to (passed on unchanged), by reason",
            metrics.transform_errors.clone(),
        );
        registry.register(
            "fieldgate_alarms_raised",
            "Alarms raised, by rule (transform) and severity",
            metrics.alarms_raised.clone(),
        );
        registry.register(
            "fieldgate_alarms_cleared",
            "Alarms cleared, by rule (transform) and severity",
            metrics.alarms_cleared.clone(),
        );
        registry.register(
            "fieldgate_alarms_active",
            "Alarms raised or acknowledged and not yet cleared, by rule (transform) and severity",
            metrics.alarms_active.clone(),
        );
        registry.register(
            "fieldgate_alarm_action_successes",
            "Alarm actions (mqtt, command, webhook) carried out, by rule and action",
            metrics.alarm_action_successes.clone(),
        );
        registry.register(
            "fieldgate_alarm_action_failures",
            "Alarm actions that failed after their retries or were dropped, by rule and action",
            metrics.alarm_action_failures.clone(),
        );
        registry.register(
            "fieldgate_alarm_actions_dropped",
            "Alarm actions dropped: their queue was full, or shutdown came first",
            metrics.alarm_actions_dropped.clone(),
        );
        registry.register(
            "fieldgate_alarm_action_retries",
            "Failed webhook attempts of alarm actions that were tried again",
            metrics.alarm_action_retries.clone(),
        );
        registry.register(
            "fieldgate_transform_state_devices",
            "Devices a stateful transform keeps state for",
            metrics.transform_state_devices.clone(),
        );
        registry.register(
            "fieldgate_transform_evicted_devices",
            "Devices dropped from a stateful transform's full table, least recently seen first",
            metrics.transform_evicted_devices.clone(),
        );
        registry.register(
            "fieldgate_transform_checkpoint_failures",
            "Checkpoints of a stateful transform's state that could not be written",
            metrics.transform_checkpoint_failures.clone(),
        );
        registry.register(
            "fieldgate_config_reloads",
            "Config reloads by result: applied, unchanged, failed",
            metrics.config_reloads.clone(),
        );
        registry.register(
            "fieldgate_config_hash",
            "1 for the SHA-256 of the running config",
            metrics.config_hash.clone(),
        );
        registry.register(
            "fieldgate_detached_buffer_bytes",
            "Bytes on disk in buffers of sinks no longer in the config (delete by hand)",
            metrics.detached_buffer_bytes.clone(),
        );
        registry.register(
            "fieldgate_failover_active",
            "1 while the sink's upstream is unreachable and its new events go to its failover sink",
            metrics.failover_active.clone(),
        );
        registry.register(
            "fieldgate_failover_switches",
            "Times the sink failed over to its failover sink",
            metrics.failover_switches.clone(),
        );
        registry.register(
            "fieldgate_failover_events",
            "Events of the sink that its failover sink took while it was unreachable",
            metrics.failover_events.clone(),
        );
        #[cfg(feature = "modbus")]
        {
            registry.register(
                "fieldgate_modbus_requests",
                "Modbus requests sent (every attempt)",
                metrics.modbus_requests.clone(),
            );
            registry.register(
                "fieldgate_modbus_errors",
                "Modbus requests without a usable answer, by kind",
                metrics.modbus_errors.clone(),
            );
            registry.register_with_unit(
                "fieldgate_modbus_poll",
                "Time to poll one group of points of a device",
                Unit::Seconds,
                metrics.modbus_poll_seconds.clone(),
            );
            registry.register(
                "fieldgate_modbus_points",
                "Points polled by the Modbus source",
                metrics.modbus_points.clone(),
            );
        }
        registry.register_collector(Box::new(ProcessCollector));
        #[cfg(all(feature = "count-allocations", not(test)))]
        registry.register_collector(Box::new(super::allocations::AllocationCollector));
        Self {
            registry,
            ..metrics
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail; an error here would be a bug in a metric's encoder.
        if let Err(err) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(error = %err, "encoding metrics failed");
        }
        text
    }

    /// The label handle for one source.
    pub fn source(name: &str) -> SourceLabel {
        SourceLabel {
            source: name.to_owned(),
        }
    }

    /// The label handle for one sink.
    pub fn sink(name: &str) -> SinkLabel {
        SinkLabel {
            sink: name.to_owned(),
        }
    }

    /// `fieldgate_failover_active{sink}` of primary `sink`.
    pub fn failover_active(&self, sink: &str) -> Gauge {
        self.failover_active
            .get_or_create(&Self::sink(sink))
            .clone()
    }

    /// `fieldgate_failover_switches_total{sink}` of primary `sink`.
    pub fn failover_switches(&self, sink: &str) -> Counter {
        self.failover_switches
            .get_or_create(&Self::sink(sink))
            .clone()
    }

    /// `fieldgate_failover_events_total{sink,to}`: events `sink` handed to `to`.
    pub fn failover_events(&self, sink: &str, to: &str) -> Counter {
        self.failover_events
            .get_or_create(&FailoverLabels {
                sink: sink.to_owned(),
                to: to.to_owned(),
            })
            .clone()
    }

    /// The counter of events the filter `transform` dropped.
    pub fn filtered(&self, transform: &str) -> Counter {
        self.filtered_events
            .get_or_create(&TransformLabel {
                transform: transform.to_owned(),
            })
            .clone()
    }

    /// The alarm series' labels of rule `transform` with `severity`.
    pub fn alarm(transform: &str, severity: &str) -> AlarmLabels {
        AlarmLabels {
            transform: transform.to_owned(),
            severity: severity.to_owned(),
        }
    }

    /// `fieldgate_transform_state_devices{transform}`.
    pub fn transform_state_devices(&self, transform: &str) -> Gauge {
        self.transform_state_devices
            .get_or_create(&TransformLabel {
                transform: transform.to_owned(),
            })
            .clone()
    }

    /// `fieldgate_transform_evicted_devices_total{transform}`.
    pub fn transform_evicted_devices(&self, transform: &str) -> Counter {
        self.transform_evicted_devices
            .get_or_create(&TransformLabel {
                transform: transform.to_owned(),
            })
            .clone()
    }

    /// Creates `fieldgate_transform_checkpoint_failures_total{transform}` at zero.
    pub fn declare_transform_checkpoints(&self, transform: &str) {
        drop(
            self.transform_checkpoint_failures
                .get_or_create(&TransformLabel {
                    transform: transform.to_owned(),
                }),
        );
    }

    /// `fieldgate_transform_checkpoint_failures_total{transform}`.
    pub fn transform_checkpoint_failed(&self, transform: &str) {
        self.transform_checkpoint_failures
            .get_or_create(&TransformLabel {
                transform: transform.to_owned(),
            })
            .inc();
    }

    /// The counter of events `transform` could not apply to, for `reason`.
    pub fn transform_error(&self, transform: &str, reason: &str) -> Counter {
        self.transform_errors
            .get_or_create(&TransformErrorLabels {
                transform: transform.to_owned(),
                reason: reason.to_owned(),
            })
            .clone()
    }

    /// Counts one reload with `result` (one of [`RELOAD_RESULTS`]).
    pub fn reloaded(&self, result: &str) {
        self.config_reloads
            .get_or_create(&ReloadLabel {
                result: result.to_owned(),
            })
            .inc();
    }

    /// Creates `fieldgate_config_reloads_total` at zero for every result.
    pub fn declare_reloads(&self) {
        for result in RELOAD_RESULTS {
            drop(self.config_reloads.get_or_create(&ReloadLabel {
                result: (*result).to_owned(),
            }));
        }
    }

    /// Shows `hash` as the running config's (and no other).
    pub fn set_config_hash(&self, hash: &str) {
        self.config_hash.clear();
        self.config_hash
            .get_or_create(&HashLabel {
                hash: hash.to_owned(),
            })
            .set(1);
    }

    /// Counts one connection of `source` refused or closed by a defence, for `reason`.
    pub fn refused(&self, source: &str, reason: &'static str) {
        self.refused_connections
            .get_or_create(&RefusalLabels {
                source: source.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Creates, at zero, every series of a TCP source, so dashboards show 0 from
    /// start-up instead of no data.
    pub fn declare_source(&self, source: &str) {
        let label = Self::source(source);
        drop(self.connections.get_or_create(&label));
        drop(self.received_events.get_or_create(&label));
        drop(self.auth_failures.get_or_create(&label));
        for reason in PARSE_REASONS {
            drop(self.parse_failures.get_or_create(&ParseLabels {
                source: source.to_owned(),
                reason: (*reason).to_owned(),
            }));
        }
        self.declare_refusals(source);
    }

    /// Creates, at zero, the refusal series of a listener (a TCP source or `api`).
    pub fn declare_refusals(&self, source: &str) {
        for reason in REFUSAL_REASONS {
            drop(self.refused_connections.get_or_create(&RefusalLabels {
                source: source.to_owned(),
                reason: (*reason).to_owned(),
            }));
        }
    }

    /// Creates, at zero, the authentication failure series of a non-TCP `source`
    /// (`http`, `api_admin`).
    pub fn declare_auth(&self, source: &str) {
        drop(self.auth_failures.get_or_create(&Self::source(source)));
    }

    /// Creates, at zero, every series of a sink; `upstream` for sinks with an upstream
    /// connection (MQTT), which also get the connection and latency series.
    pub fn declare_sink(&self, sink: &str, upstream: bool) {
        let label = Self::sink(sink);
        drop(self.sent_events.get_or_create(&label));
        drop(self.buffer_events.get_or_create(&label));
        drop(self.buffer_bytes.get_or_create(&label));
        drop(self.buffer_oldest_event.get_or_create(&label));
        drop(self.buffer_corrupt_bytes.get_or_create(&label));
        for reason in DROP_REASONS {
            self.dropped(sink, reason, 0);
        }
        if upstream {
            drop(self.upstream_connected.get_or_create(&label));
            drop(self.upstream_connect_failures.get_or_create(&label));
            drop(self.event_latency.get_or_create(&label));
        }
    }

    /// Counts `count` events for `sink` that will never be delivered.
    pub fn dropped(&self, sink: &str, reason: &str, count: u64) {
        self.dropped_events
            .get_or_create(&DropLabels {
                sink: sink.to_owned(),
                reason: reason.to_owned(),
            })
            .inc_by(count);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_names_are_exported() {
        let metrics = Metrics::new();
        metrics
            .connections
            .get_or_create(&Metrics::source("devices"))
            .set(1);
        metrics
            .received_events
            .get_or_create(&Metrics::source("devices"))
            .inc();
        metrics
            .sent_events
            .get_or_create(&Metrics::sink("cloud"))
            .inc();
        metrics.dropped("cloud", "buffer_full", 2);
        metrics
            .parse_failures
            .get_or_create(&ParseLabels {
                source: "devices".into(),
                reason: "invalid_json".into(),
            })
            .inc();
        metrics
            .buffer_events
            .get_or_create(&Metrics::sink("cloud"))
            .set(3);
        metrics
            .buffer_bytes
            .get_or_create(&Metrics::sink("cloud"))
            .set(4);
        metrics
            .upstream_connected
            .get_or_create(&Metrics::sink("cloud"))
            .set(1);
        metrics
            .event_latency
            .get_or_create(&Metrics::sink("cloud"))
            .observe(0.002);
        let text = metrics.encode();
        for name in [
            "fieldgate_connections{source=\"devices\"} 1",
            "fieldgate_received_events_total{source=\"devices\"} 1",
            "fieldgate_sent_events_total{sink=\"cloud\"} 1",
            "fieldgate_dropped_events_total{sink=\"cloud\",reason=\"buffer_full\"} 2",
            "fieldgate_protocol_parse_failures_total{source=\"devices\",reason=\"invalid_json\"} 1",
            "fieldgate_buffer_events{sink=\"cloud\"} 3",
            "fieldgate_buffer_bytes{sink=\"cloud\"} 4",
            "fieldgate_upstream_connected{sink=\"cloud\"} 1",
            "fieldgate_event_latency_seconds_count{sink=\"cloud\"} 1",
            "fieldgate_watchdog_rss_growth_bytes_per_minute 0",
            "fieldgate_tasks 0",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_cpu_seconds_total ",
        ] {
            assert!(text.contains(name), "missing {name} in:\n{text}");
        }
    }
}
