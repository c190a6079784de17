//! The MQTT sink: publishes buffered events to a broker, deletes them on PUBACK/PUBCOMP.
//!
//! The link runs as one task driving rumqttc's event loop and the buffer reader. Each
//! publish is tracked from the moment it is handed to rumqttc until the broker acks it;
//! only then are its records acknowledged to the buffer. On any disconnect, everything
//! unacked is forgotten on the client side and read again from the buffer (at-least-once,
//! in order), so per-device order holds across reconnects and restarts.

mod address;
mod backoff;
mod link;
mod tls;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fieldgate_buffer::RecordId;
use fieldgate_core::envelope::{write_batch, write_event};
use fieldgate_core::{DeviceId, Event, EventKind, PayloadFormat, Priority};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tokio_util::sync::CancellationToken;

pub use address::BrokerAddress;
use backoff::Backoff;
use link::{Link, LinkEvent, LinkOptions};

use super::single_wildcard_match;
use crate::buffer::{Delivery, SinkBuffer};
use crate::commands::CommandDispatcher;
use crate::config::{MqttSinkConfig, Qos};
use crate::pipeline::{Item, WeakIntake};
use crate::sources::directory::{DeviceCommand, DeviceDirectory};
use crate::sources::now_ms;
use crate::telemetry::Metrics;
use fieldgate_registry::NewCommand;

/// How long a cloud command waits for its device unless it says `"ttl"`.
const DEFAULT_COMMAND_TTL: Duration = Duration::from_secs(3600);
/// How long a graceful shutdown waits for the `offline` status to be acked.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);

/// What a publish carries, to settle it on ack.
enum Carried {
    /// Buffer records, with their receive times for the latency histogram.
    Records(Vec<(Priority, RecordId, u64)>),
    /// The gateway's own status message.
    Status,
}

/// Everything the sink needs besides its buffer.
pub struct MqttSinkContext {
    /// Gateway id for topics.
    pub gateway: String,
    /// Connected devices, for commands when there is no registry.
    pub directory: Arc<DeviceDirectory>,
    /// Queued, tracked commands when the registry is configured.
    pub commands: Option<Arc<CommandDispatcher>>,

    /// The sink's own intake, to report command errors; weak so it never keeps the
    /// pipeline open at shutdown.
    pub intake: WeakIntake,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
}

/// The sink's state between events.
struct MqttSink<'a> {
    config: &'a MqttSinkConfig,
    context: MqttSinkContext,
    buffer: Arc<SinkBuffer>,
    link: Link,
    connected: bool,
    /// Handed to rumqttc, packet id not yet known (in request order).
    awaiting_id: VecDeque<Carried>,
    /// Sent with a packet id, awaiting PUBACK/PUBCOMP, oldest first per id. An id can be
    /// in use twice: rumqttc frees a QoS 2 id at PUBREC, before its PUBCOMP arrives.
    by_packet_id: HashMap<u16, VecDeque<Carried>>,
    /// Publishes in `by_packet_id`.
    sent_unacked: usize,
    /// A publish rumqttc is holding back because its packet id is still in use.
    collided: Option<(u16, Carried)>,
    status_topic: String,
    command_filter: String,
    sent: Counter,
    connected_gauge: Gauge,
    connect_failures: Counter,
    latency: Histogram,
    payload: Vec<u8>,
}

/// Runs the sink until `shutdown`; then publishes the clean `offline` and disconnects.
pub async fn run(
    buffer: Arc<SinkBuffer>,
    config: &MqttSinkConfig,
    context: MqttSinkContext,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let address = BrokerAddress::parse(config.url.get_ref()).ok_or_else(|| {
        anyhow::anyhow!(
            "sink `{}`: invalid url {:?}",
            buffer.sink(),
            config.url.get_ref()
        )
    })?;
    let tls = if address.tls {
        Some(
            tls::client_config(config.tls.as_ref())
                .map_err(|err| anyhow::anyhow!("sink `{}`: {err}", buffer.sink()))?,
        )
    } else {
        None
    };
    let status_topic = config.status_topic.render_gateway(&context.gateway);
    let options = LinkOptions {
        address,
        tls,
        client_id: config
            .client_id
            .clone()
            .unwrap_or_else(|| context.gateway.clone()),
        keep_alive: config.keep_alive.0,
        clean_session: config.clean_session,
        session_expiry: config.session_expiry.0,
        credentials: config
            .username
            .clone()
            .map(|user| (user, config.password.clone().unwrap_or_default())),
        max_inflight: config.max_inflight,
        will_topic: status_topic.clone(),
        protocol: config.protocol,
    };
    let label = Metrics::sink(buffer.sink());
    let metrics = Arc::clone(&context.metrics);
    let mut sink = MqttSink {
        config,
        link: Link::new(&options),
        buffer,
        connected: false,
        awaiting_id: VecDeque::new(),
        by_packet_id: HashMap::new(),
        sent_unacked: 0,
        collided: None,
        status_topic,
        command_filter: config.command_topic.render_gateway(&context.gateway),
        sent: metrics.sent_events.get_or_create(&label).clone(),
        connected_gauge: metrics.upstream_connected.get_or_create(&label).clone(),
        connect_failures: metrics
            .upstream_connect_failures
            .get_or_create(&label)
            .clone(),
        latency: metrics.event_latency.get_or_create(&label).clone(),
        context,
        payload: Vec::with_capacity(4096),
    };
    tracing::info!(
        sink = sink.buffer.sink(),
        url = config.url.get_ref(),
        "connecting upstream"
    );
    sink.run(shutdown).await;
    Ok(())
}

impl MqttSink<'_> {
    async fn run(&mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(self.config.reconnect_min.0, self.config.reconnect_max.0);
        loop {
            let can_publish =
                self.connected && self.outstanding() < usize::from(self.config.max_inflight);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                event = self.link.poll() => match event {
                    Ok(event) => self.on_link_event(event, &mut backoff),
                    Err(err) => {
                        self.on_disconnect(&err);
                        let delay = backoff.next_delay();
                        tracing::debug!(sink = self.buffer.sink(), ?delay, "reconnecting after backoff");
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            () = tokio::time::sleep(delay) => {}
                        }
                    }
                },
                first = self.buffer.next(), if can_publish => self.publish_from(first).await,
            }
        }
        self.shutdown().await;
    }

    fn outstanding(&self) -> usize {
        self.awaiting_id.len() + self.sent_unacked + usize::from(self.collided.is_some())
    }

    fn on_link_event(&mut self, event: LinkEvent, backoff: &mut Backoff) {
        match event {
            LinkEvent::Connected { session_present } => {
                tracing::info!(
                    sink = self.buffer.sink(),
                    session_present,
                    "connected upstream"
                );
                self.connected = true;
                self.connected_gauge.set(1);
                backoff.reset();
                self.publish_status(b"online");
                if let Err(err) = self.link.subscribe(&self.command_filter) {
                    tracing::warn!(sink = self.buffer.sink(), error = %err, "cannot subscribe to commands");
                }
            }
            LinkEvent::Sent { packet_id } => {
                // While a publish is held back rumqttc sends nothing new, so the next
                // publish written with that id is the held-back one.
                let carried = match self.collided.take() {
                    Some((id, carried)) if id == packet_id => Some(carried),
                    other => {
                        self.collided = other;
                        self.awaiting_id.pop_front()
                    }
                };
                if let Some(carried) = carried {
                    if packet_id == 0 {
                        // QoS 0: done once written.
                        self.settle(carried);
                    } else {
                        self.by_packet_id
                            .entry(packet_id)
                            .or_default()
                            .push_back(carried);
                        self.sent_unacked += 1;
                    }
                }
            }
            LinkEvent::HeldBack { packet_id } => {
                if let Some(carried) = self.awaiting_id.pop_front() {
                    self.collided = Some((packet_id, carried));
                }
            }
            LinkEvent::Acked { packet_id } => {
                // Acks for one id come in the order its publishes were sent.
                let carried = self
                    .by_packet_id
                    .get_mut(&packet_id)
                    .and_then(VecDeque::pop_front);
                if self
                    .by_packet_id
                    .get(&packet_id)
                    .is_some_and(VecDeque::is_empty)
                {
                    self.by_packet_id.remove(&packet_id);
                }
                if let Some(carried) = carried {
                    self.sent_unacked -= 1;
                    self.settle(carried);
                }
            }
            LinkEvent::Message { topic, payload } => self.on_message(&topic, payload),
            LinkEvent::DisconnectSent | LinkEvent::Other => {}
        }
    }

    /// The upstream acknowledged a publish: its records may leave the buffer.
    fn settle(&mut self, carried: Carried) {
        let Carried::Records(records) = carried else {
            return;
        };
        let now = now_ms();
        for (_, _, received_at) in &records {
            self.latency
                .observe(now.saturating_sub(*received_at) as f64 / 1000.0);
        }
        self.sent.inc_by(records.len() as u64);
        self.buffer
            .ack(records.into_iter().map(|(lane, id, _)| (lane, id)));
    }

    fn on_disconnect(&mut self, err: &str) {
        if self.connected {
            tracing::warn!(
                sink = self.buffer.sink(),
                error = err,
                "upstream connection lost; buffering"
            );
        } else {
            tracing::warn!(
                sink = self.buffer.sink(),
                error = err,
                "upstream connection failed"
            );
            self.connect_failures.inc();
        }
        self.connected = false;
        self.connected_gauge.set(0);
        // Forget every unacked publish on the client side; the buffer still has them.
        self.link.forget_publishes();
        self.awaiting_id.clear();
        self.by_packet_id.clear();
        self.sent_unacked = 0;
        self.collided = None;
        self.buffer.rewind();
    }

    fn publish_status(&mut self, status: &'static [u8]) {
        let topic = self.status_topic.clone();
        if self
            .link
            .publish(&topic, Qos(1), true, Bytes::from_static(status))
            .is_ok()
        {
            self.awaiting_id.push_back(Carried::Status);
        }
    }

    /// Publishes `first` and, when batching, what follows it within the batch window.
    async fn publish_from(&mut self, first: Delivery) {
        let limit = self.config.batch_max_events;
        let mut batch = vec![first];
        if limit > 1 && batch[0].event.kind != EventKind::Status {
            let deadline = tokio::time::Instant::now() + self.config.batch_max_delay.0;
            while batch.len() < limit {
                if let Some(next) = self.buffer.try_next() {
                    batch.push(next);
                    continue;
                }
                match tokio::time::timeout_at(deadline, self.buffer.next()).await {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
        }
        if limit <= 1 {
            for delivery in batch {
                self.publish_one(delivery);
            }
            return;
        }
        // Status events are retained per device and never batched.
        let (status, rest): (Vec<Delivery>, Vec<Delivery>) = batch
            .into_iter()
            .partition(|delivery| delivery.event.kind == EventKind::Status);
        for delivery in status {
            self.publish_one(delivery);
        }
        let mut group: Vec<Delivery> = Vec::new();
        let mut group_topic = String::new();
        for delivery in rest {
            let topic = self.batch_topic_for(&delivery.event);
            if !group.is_empty() && topic != group_topic {
                self.publish_group(&group_topic, std::mem::take(&mut group));
            }
            group_topic = topic;
            group.push(delivery);
        }
        if !group.is_empty() {
            self.publish_group(&group_topic, group);
        }
    }

    fn batch_topic_for(&self, event: &Event) -> String {
        match &self.config.batch_topic {
            Some(template) => template.render(&self.context.gateway, event),
            None => self.config.topic.render(&self.context.gateway, event),
        }
    }

    fn publish_one(&mut self, delivery: Delivery) {
        let topic = self
            .config
            .topic
            .render(&self.context.gateway, &delivery.event);
        let retain = delivery.event.kind == EventKind::Status;
        let qos = self.config.qos_for(delivery.event.kind);
        self.payload.clear();
        write_event(self.config.format, &delivery.event, &mut self.payload);
        let payload = Bytes::copy_from_slice(&self.payload);
        let carried = vec![(delivery.lane, delivery.id, delivery.event.received_at_ms)];
        self.send(&topic, qos, retain, payload, carried);
    }

    fn publish_group(&mut self, topic: &str, group: Vec<Delivery>) {
        let qos = group
            .iter()
            .map(|delivery| self.config.qos_for(delivery.event.kind))
            .max_by_key(|qos| qos.0);
        let qos = qos.unwrap_or(self.config.qos);
        self.payload.clear();
        write_batch(
            self.config.format,
            group.iter().map(|delivery| &delivery.event),
            &mut self.payload,
        );
        let payload = Bytes::copy_from_slice(&self.payload);
        let carried = group
            .iter()
            .map(|d| (d.lane, d.id, d.event.received_at_ms))
            .collect();
        self.send(topic, qos, false, payload, carried);
    }

    fn send(
        &mut self,
        topic: &str,
        qos: Qos,
        retain: bool,
        payload: Bytes,
        carried: Vec<(Priority, RecordId, u64)>,
    ) {
        match self.link.publish(topic, qos, retain, payload) {
            Ok(()) => self.awaiting_id.push_back(Carried::Records(carried)),
            Err(err) => {
                // Not handed over: it stays in the buffer and is read again after a rewind.
                tracing::warn!(sink = self.buffer.sink(), error = %err, "publish not queued; will retry");
                self.buffer.rewind();
            }
        }
    }

    /// A message on the command topic: deliver it to the device or answer with an error.
    fn on_message(&mut self, topic: &str, payload: Bytes) {
        let Some(device) = single_wildcard_match(&self.command_filter, topic) else {
            tracing::debug!(
                sink = self.buffer.sink(),
                topic,
                "ignoring message outside the command topic"
            );
            return;
        };
        if fieldgate_codec::validate_device_id(device).is_err() {
            tracing::warn!(
                sink = self.buffer.sink(),
                topic,
                "command for an invalid device id ignored"
            );
            return;
        }
        let device = DeviceId::new(device);
        #[derive(serde::Deserialize)]
        struct CommandMessage {
            id: String,
            name: String,
            #[serde(default)]
            params: Option<Box<serde_json::value::RawValue>>,
            #[serde(default)]
            ttl: Option<String>,
        }
        let command: CommandMessage = match serde_json::from_slice(&payload) {
            Ok(command) => command,
            Err(err) => {
                tracing::warn!(sink = self.buffer.sink(), %device, error = %err, "malformed command ignored");
                let id = serde_json::from_slice::<serde_json::Value>(&payload)
                    .ok()
                    .and_then(|value| {
                        value
                            .get("id")
                            .and_then(|id| id.as_str())
                            .map(str::to_owned)
                    });
                if let Some(id) = id {
                    self.command_error(device, &id, &format!("malformed command: {err}"));
                }
                return;
            }
        };
        let params = command.params.unwrap_or_else(|| {
            serde_json::value::RawValue::from_string("{}".into()).expect("`{}` is valid JSON")
        });
        let id = command.id.clone();
        if let Some(commands) = &self.context.commands {
            // With a registry the command is queued (TTL, retries on reconnect) and tracked.
            let ttl = match command.ttl.as_deref().map(humantime::parse_duration) {
                None => DEFAULT_COMMAND_TTL,
                Some(Ok(ttl)) => ttl,
                Some(Err(err)) => {
                    return self.command_error(device, &id, &format!("invalid ttl: {err}"));
                }
            };
            let params = serde_json::from_str(params.get()).unwrap_or(serde_json::Value::Null);
            let new = NewCommand {
                id: command.id,
                name: command.name,
                params,
                ttl,
            };
            match commands.submit(device.as_str(), new) {
                Ok(queued) => {
                    tracing::info!(sink = self.buffer.sink(), %device, command = id, state = ?queued.state, "command accepted")
                }
                Err(err) => self.command_error(device, &id, &err.to_string()),
            }
            return;
        }
        let delivered = self.context.directory.send(DeviceCommand {
            device: device.clone(),
            id: command.id,
            name: command.name,
            params,
        });
        match delivered {
            Ok(()) => {
                tracing::info!(sink = self.buffer.sink(), %device, command = id, "command sent to device")
            }
            Err(err) => self.command_error(device, &id, &err.to_string()),
        }
    }

    fn command_error(&self, device: DeviceId, id: &str, error: &str) {
        tracing::info!(sink = self.buffer.sink(), %device, command = id, error, "command failed");
        let payload = serde_json::json!({ "type": "command_result", "id": id, "status": "error", "error": error });
        let event = Event::new(
            device,
            EventKind::CommandResult,
            Arc::from("gateway"),
            now_ms(),
            PayloadFormat::Json,
            Bytes::from(payload.to_string()),
        );
        // The sink must not wait on its own intake; a full or closed lane drops the result.
        if !self.context.intake.try_send(Item { event, ack: None }) {
            self.context
                .metrics
                .dropped(self.buffer.sink(), "intake_full", 1);
        }
    }

    /// Publishes the clean `offline`, waits briefly for its ack, then disconnects.
    async fn shutdown(&mut self) {
        if !self.connected {
            self.connected_gauge.set(0);
            return;
        }
        self.publish_status(b"offline");
        let deadline = tokio::time::Instant::now() + SHUTDOWN_FLUSH;
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        while self
            .awaiting_id
            .iter()
            .chain(self.by_packet_id.values().flatten())
            .any(|c| matches!(c, Carried::Status))
        {
            match tokio::time::timeout_at(deadline, self.link.poll()).await {
                Ok(Ok(event)) => self.on_link_event(event, &mut backoff),
                Ok(Err(_)) | Err(_) => break,
            }
        }
        if self.link.disconnect().is_ok() {
            while let Ok(Ok(event)) = tokio::time::timeout_at(deadline, self.link.poll()).await {
                if matches!(event, LinkEvent::DisconnectSent) {
                    break;
                }
                self.on_link_event(event, &mut backoff);
            }
        }
        self.connected_gauge.set(0);
        tracing::info!(sink = self.buffer.sink(), "disconnected upstream");
    }
}
