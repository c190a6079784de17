//! The MQTT sink: publishes buffered events to a broker, deletes them on PUBACK/PUBCOMP.
//!
//! fieldgate owns the client state machine (see `docs/MQTT-CLIENT.md` for why): one task
//! per sink reads records from the buffer, encodes publishes with rumqttc's codec into
//! one write buffer (many publishes per write syscall), and settles each publish by its
//! own packet id ([`session::Inflight`]). What the broker does decides what happens to a
//! record:
//! - success (PUBACK, PUBCOMP; MQTT 5 reason < 0x80): acknowledged in the buffer, deleted;
//! - a permanent failure code (not authorized, topic name invalid, payload format
//!   invalid): moved to the dead-letter store, counted `rejected`;
//! - a transient failure code (quota exceeded, unspecified, ...): published again after a
//!   delay that grows while the broker keeps refusing;
//! - larger than the broker's maximum packet size: dead-lettered `too_large`, never sent;
//! - no answer: on a reconnect everything in flight is resent, with DUP and the same
//!   packet ids when the broker kept the session (PUBREL for QoS 2 past PUBREC).
//!
//! Nothing leaves the buffer without one of those outcomes, so delivery is at-least-once
//! (exactly-once with QoS 2 as long as the gateway keeps running).

mod address;
mod cloud_commands;
pub mod config;
mod connection;
mod packet;
mod session;
mod session_log;

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fieldgate_buffer::RecordId;
use fieldgate_core::envelope::{write_batch, write_event};
use fieldgate_core::{Event, EventKind, Priority};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use address::BrokerAddress;
use cloud_commands::Accepted;
pub use config::{MqttProtocol, MqttSinkConfig};
use connection::{Connection, IoDone, LinkError};
use packet::{Codec, ConnAckInfo, ConnectOut, Incoming, PublishOut};
use session::{AckOutcome, Inflight, Message, Resend};
use session_log::{RecordRef, Restored, SessionLog};

use super::deadletter::{DeadLetters, DeadReason, NewDeadLetter};
use super::{SinkContext, SinkSpec};
use crate::buffer::{BufferConfig, Delivery, SinkBuffer};
use crate::clock::now_ms;
use crate::devices::commands::CommandDispatcher;
use crate::devices::directory::DeviceDirectory;
use crate::net::backoff::Backoff;
use crate::pipeline::WeakIntake;
use crate::telemetry::Metrics;

/// How long a graceful shutdown waits for the `offline` status to be acked.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);
/// TCP, TLS and CONNACK must complete within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection up this long without trouble ends the outage (resets the backoff).
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// Publishes are not encoded beyond this many unwritten bytes (socket backpressure).
const OUTGOING_HIGH_WATER: usize = 256 * 1024;
/// Packet id of the command subscription (publishes never use it while it is pending).
const SUBSCRIBE_ID: u16 = 1;

/// What a publish carries, to settle it on ack.
#[derive(Debug)]
enum Carried {
    /// Buffer records.
    Records(Vec<Delivery>),
    /// The gateway's own status message.
    Status,
}

/// A refused publish waiting to be tried again.
#[derive(Debug)]
struct Retry {
    due: Instant,
    message: Message,
    carried: Carried,
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
    /// Where refused events are parked.
    pub deadletters: Arc<DeadLetters>,
    /// The gateway's data directory (the QoS 2 session log lives under `sessions/`).
    pub data_dir: PathBuf,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// The link's health, for failover: up while a connection is healthy.
    pub link: crate::sinks::link::LinkHealth,
}

/// The sink's state between events.
struct MqttSink<'a> {
    config: &'a MqttSinkConfig,
    context: MqttSinkContext,
    buffer: Arc<SinkBuffer>,
    address: BrokerAddress,
    tls: Option<Arc<rustls::ClientConfig>>,
    client_id: String,
    codec: Codec,
    inflight: Inflight<Carried>,
    /// Read from the buffer, not yet published (the window filled, or a batch is filling).
    held: VecDeque<Delivery>,
    /// When the oldest held delivery was read (batch deadline).
    held_since: Option<Instant>,
    /// Publishes refused with a transient reason, oldest first.
    retries: VecDeque<Retry>,
    /// Delay before the next retry of a refused publish; grows while refusals continue.
    retry_delay: Duration,
    /// QoS 2 commands received and stored, awaiting PUBREL.
    commands_awaiting_release: HashSet<u16>,
    /// Largest packet the broker accepts (config and CONNACK).
    max_packet: usize,
    /// Records acknowledged by the broker, not yet acknowledged in the buffer.
    settled: Vec<(Priority, RecordId)>,
    /// QoS 2 state on disk, with a persistent session (`clean_session = false`).
    qos2_log: Option<SessionLog>,
    /// Records whose QoS 2 publish completed before a restart: acknowledged, not resent.
    completed_before_restart: HashSet<RecordRef>,
    status_topic: String,
    command_filter: String,
    sent: Counter,
    connected_gauge: Gauge,
    connect_failures: Counter,
    latency: Histogram,
}

/// How a connection ended.
enum Ended {
    /// Shutdown requested; the clean disconnect is done.
    Shutdown,
    /// The connection failed.
    Lost(LinkError),
}

/// What woke the connection loop.
enum Wake {
    Shutdown,
    Read(Result<(), LinkError>),
    Wrote(Result<(), LinkError>),
    Delivery(Delivery),
    Timer,
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
            crate::net::tls::client_config(
                config.tls.as_ref().and_then(|tls| tls.ca.as_deref()),
                config
                    .tls
                    .as_ref()
                    .and_then(|tls| tls.cert.as_deref().zip(tls.key.as_deref())),
            )
            .map_err(|err| anyhow::anyhow!("sink `{}`: {err}", buffer.sink()))?,
        )
    } else {
        None
    };
    let label = Metrics::sink(buffer.sink());
    let metrics = Arc::clone(&context.metrics);
    let mut sink = MqttSink {
        config,
        address,
        tls,
        client_id: config
            .client_id
            .clone()
            .unwrap_or_else(|| context.gateway.clone()),
        codec: Codec::new(config.protocol),
        inflight: Inflight::new(usize::from(config.max_inflight)),
        held: VecDeque::new(),
        held_since: None,
        retries: VecDeque::new(),
        retry_delay: config.reconnect_min.0,
        commands_awaiting_release: HashSet::new(),
        max_packet: configured_max_packet(config),
        settled: Vec::new(),
        qos2_log: None,
        completed_before_restart: HashSet::new(),
        status_topic: config.status_topic.render_gateway(&context.gateway),
        command_filter: config.command_topic.render_gateway(&context.gateway),
        sent: metrics.sent_events.get_or_create(&label).clone(),
        connected_gauge: metrics.upstream_connected.get_or_create(&label).clone(),
        connect_failures: metrics
            .upstream_connect_failures
            .get_or_create(&label)
            .clone(),
        latency: metrics.event_latency.get_or_create(&label).clone(),
        buffer,
        context,
    };
    if !config.clean_session {
        let path = sink
            .context
            .data_dir
            .join("sessions")
            .join(format!("{}.qos2", sink.buffer.sink()));
        let (log, restored) = SessionLog::open(&path).map_err(|err| {
            anyhow::anyhow!(
                "sink `{}`: cannot open the QoS 2 session log {}: {err}",
                sink.buffer.sink(),
                path.display()
            )
        })?;
        sink.qos2_log = Some(log);
        sink.restore(restored);
    }
    tracing::info!(
        sink = sink.buffer.sink(),
        url = config.url.get_ref(),
        "connecting upstream"
    );
    sink.run(shutdown).await;
    Ok(())
}

fn configured_max_packet(config: &MqttSinkConfig) -> usize {
    config.max_packet_size.map_or(usize::MAX, |size| {
        usize::try_from(size.0).unwrap_or(usize::MAX)
    })
}

impl MqttSink<'_> {
    /// After a restart: puts the QoS 2 publishes that were in flight back under their
    /// packet ids, and lets records whose publish had completed leave the buffer unsent.
    fn restore(&mut self, restored: Restored) {
        if restored.inflight.is_empty() && restored.completed.is_empty() {
            return;
        }
        let mut wanted: HashMap<RecordRef, u16> = HashMap::new();
        for (id, publish) in &restored.inflight {
            for record in &publish.records {
                wanted.insert(*record, *id);
            }
        }
        let mut gathered: HashMap<u16, Vec<Delivery>> = HashMap::new();
        self.completed_before_restart = restored.completed;
        // Unfinished publishes were among the oldest unacknowledged records (at most a
        // window of publishes per lane); a bounded scan of the buffer's head finds them.
        // What else it reads is published normally.
        let window = usize::from(self.config.max_inflight) * self.config.batch_max_events.max(1);
        let mut budget = wanted.len() + 2 * window + 1000;
        while !wanted.is_empty() && budget > 0 {
            budget -= 1;
            let Some(delivery) = self.buffer.try_next() else {
                break;
            };
            if let Some(id) = wanted.remove(&(delivery.lane, delivery.id)) {
                gathered.entry(id).or_default().push(delivery);
            } else {
                self.take(delivery);
            }
        }
        let mut resumed = 0;
        for (id, publish) in restored.inflight {
            let Some(deliveries) = gathered.remove(&id) else {
                tracing::warn!(
                    sink = self.buffer.sink(),
                    packet_id = id,
                    "a logged QoS 2 publish has no records left in the buffer; dropped from the session"
                );
                if let Some(log) = &mut self.qos2_log {
                    log.forget(id);
                }
                continue;
            };
            if deliveries.len() != publish.records.len() {
                // Part of it is gone (evicted): publish the rest as new.
                for delivery in deliveries {
                    self.hold(delivery);
                }
                if let Some(log) = &mut self.qos2_log {
                    log.forget(id);
                }
                continue;
            }
            let message = self.message_for(&deliveries, 2);
            self.inflight
                .restore(id, publish.step, message, Carried::Records(deliveries));
            resumed += 1;
        }
        if let Some(log) = &mut self.qos2_log
            && let Err(err) = log.flush()
        {
            tracing::error!(sink = self.buffer.sink(), error = %err, "cannot write the QoS 2 session log");
        }
        self.flush_settled();
        tracing::info!(
            sink = self.buffer.sink(),
            resumed,
            completed = self.completed_before_restart.len(),
            "QoS 2 session restored from disk"
        );
    }

    /// The publish that carries `deliveries`: one event on its own topic (always without
    /// batching, and for status events, which are retained per device), or else a batch, a
    /// JSON array on the batch topic of its first event (a run shares that topic).
    fn message_for(&self, deliveries: &[Delivery], qos: u8) -> Message {
        let first = &deliveries[0].event;
        let single = self.config.batch_max_events <= 1 || first.kind == EventKind::Status;
        let mut payload = Vec::with_capacity(first.payload.len() + 160);
        if single {
            write_event(self.config.format, first, &mut payload);
            return Message {
                topic: self.config.topic.render(&self.context.gateway, first),
                payload,
                qos,
                retain: first.kind == EventKind::Status,
                event_id: self.user_property_id(first),
            };
        }
        write_batch(
            self.config.format,
            deliveries.iter().map(|delivery| &delivery.event),
            &mut payload,
        );
        Message {
            topic: self.batch_topic(first),
            payload,
            qos,
            retain: false,
            event_id: None,
        }
    }

    /// The topic of a batch starting with `event`.
    fn batch_topic(&self, event: &Event) -> String {
        match &self.config.batch_topic {
            Some(template) => template.render(&self.context.gateway, event),
            None => self.config.topic.render(&self.context.gateway, event),
        }
    }

    /// The event id as it travels in the MQTT 5 user property `id` (3.1.1 has none).
    fn user_property_id(&self, event: &Event) -> Option<String> {
        (self.config.protocol == MqttProtocol::V5).then(|| event.id().to_string())
    }

    /// Writes pending session-log lines; called before the packets they describe go out
    /// and before settled records are acknowledged in the buffer.
    fn flush_log(&mut self) {
        let Some(log) = &mut self.qos2_log else {
            return;
        };
        if let Err(err) = log.flush() {
            tracing::error!(sink = self.buffer.sink(), error = %err, "cannot write the QoS 2 session log; exactly-once after a crash is not assured");
        }
        if log.wants_compaction() {
            // Completed records may be forgotten only once their buffer acks are durable.
            match self.buffer.commit(true) {
                Ok(()) => {
                    if let Err(err) = log.compact() {
                        tracing::error!(sink = self.buffer.sink(), error = %err, "cannot compact the QoS 2 session log");
                    }
                }
                Err(err) => {
                    tracing::error!(sink = self.buffer.sink(), error = %err, "buffer sync before session-log compaction failed");
                }
            }
        }
    }

    async fn run(&mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(self.config.reconnect_min.0, self.config.reconnect_max.0);
        // Not connected yet; a link already down (a restart on reload) stays down since
        // its failure.
        self.context.link.report(false);
        while !shutdown.is_cancelled() {
            let connect = ConnectOut {
                client_id: &self.client_id,
                keep_alive: u16::try_from(self.config.keep_alive.0.as_secs()).unwrap_or(u16::MAX),
                clean: self.config.clean_session,
                session_expiry: u32::try_from(self.config.session_expiry.0.as_secs())
                    .unwrap_or(u32::MAX),
                credentials: self
                    .config
                    .username
                    .as_deref()
                    .map(|user| (user, self.config.password.as_deref().unwrap_or_default())),
                will_topic: &self.status_topic,
                receive_maximum: 64,
            };
            let opened = tokio::select! {
                _ = shutdown.cancelled() => break,
                opened = Connection::open(&self.address, self.tls.as_ref(), self.codec, &connect, CONNECT_TIMEOUT) => opened,
            };
            match opened {
                Ok((connection, ack)) => {
                    match self
                        .connected(connection, &ack, &mut backoff, &shutdown)
                        .await
                    {
                        Ended::Shutdown => return,
                        Ended::Lost(err) => {
                            tracing::warn!(sink = self.buffer.sink(), error = %err, in_flight = self.inflight.count(), "upstream connection lost; buffering");
                        }
                    }
                }
                Err(err) => {
                    self.connect_failures.inc();
                    tracing::warn!(sink = self.buffer.sink(), error = %err, "upstream connection failed");
                }
            }
            self.connected_gauge.set(0);
            self.context.link.report(false);
            let delay = backoff.next_delay();
            tracing::debug!(
                sink = self.buffer.sink(),
                ?delay,
                "reconnecting after backoff"
            );
            tokio::select! {
                _ = shutdown.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        self.connected_gauge.set(0);
    }

    /// Serves one accepted connection until it fails or the gateway shuts down.
    async fn connected(
        &mut self,
        mut connection: Connection,
        ack: &ConnAckInfo,
        backoff: &mut Backoff,
        shutdown: &CancellationToken,
    ) -> Ended {
        let connected_at = Instant::now();
        self.on_connack(ack);
        let keep_alive = ack
            .server_keep_alive
            .map_or(self.config.keep_alive.0, |secs| {
                Duration::from_secs(u64::from(secs.max(1)))
            });
        // Resume what is in flight before anything new.
        for resend in self.inflight.resend(ack.session_present) {
            self.write_resend(resend, &mut connection);
        }
        self.codec.write_subscribe(
            SUBSCRIBE_ID,
            &self.command_filter,
            1,
            &mut connection.outgoing,
        );
        if !self.publish_status(b"online", &mut connection) {
            tracing::debug!(
                sink = self.buffer.sink(),
                "in-flight window full of resent publishes; `online` waits for the next connect"
            );
        }
        let mut last_sent = Instant::now();
        let mut ping_sent: Option<Instant> = None;
        let mut healthy = !backoff.in_outage();
        if healthy {
            self.context.link.report(true);
        }
        // Long-lived waits: made anew in every loop, each would be registered and dropped
        // once per event.
        let shutdown_wait = shutdown.cancelled();
        tokio::pin!(shutdown_wait);
        let timer = tokio::time::sleep_until(last_sent + keep_alive);
        tokio::pin!(timer);
        loop {
            self.fill(&mut connection).await;
            self.flush_log();
            let can_take = self.held.is_empty()
                && self.inflight.room() > 0
                && connection.outgoing.len() < OUTGOING_HIGH_WATER;
            let now = Instant::now();
            let mut deadline = last_sent + keep_alive;
            if let Some(sent) = ping_sent {
                deadline = deadline.min(sent + keep_alive);
            }
            if let Some(oldest) = self.inflight.oldest_sent_at() {
                deadline = deadline.min(oldest + self.config.ack_timeout.0);
            }
            if let Some(retry) = self.retries.front() {
                deadline = deadline.min(retry.due);
            }
            if let Some(since) = self.held_since {
                deadline = deadline.min(since + self.config.batch_max_delay.0);
            }
            if !healthy {
                deadline = deadline.min(connected_at + HEALTHY_AFTER);
            }
            let deadline = deadline.max(now);
            // Deadlines mostly move later (acks arrive): the timer is moved only when the
            // new one is earlier, and re-checked when it fires.
            if deadline < timer.deadline() {
                timer.as_mut().reset(deadline);
            }
            let wake = tokio::select! {
                biased;
                () = &mut shutdown_wait => Wake::Shutdown,
                io = connection.read_or_write() => match io {
                    IoDone::Read(read) => Wake::Read(read),
                    IoDone::Wrote(wrote) => Wake::Wrote(wrote),
                },
                delivery = self.buffer.next(), if can_take => Wake::Delivery(delivery),
                () = &mut timer => {
                    timer.as_mut().reset(Instant::now() + keep_alive);
                    Wake::Timer
                }
            };
            match wake {
                Wake::Shutdown => {
                    self.shutdown(connection).await;
                    return Ended::Shutdown;
                }
                Wake::Read(Err(err)) | Wake::Wrote(Err(err)) => return Ended::Lost(err),
                Wake::Read(Ok(())) => {
                    ping_sent = None;
                    match self.on_readable(&mut connection).await {
                        Ok(acked) => {
                            if acked {
                                // An ack proves the link (failover's notion of healthy).
                                self.context.link.report(true);
                            }
                            if acked && !healthy {
                                healthy = true;
                                backoff.reset();
                            }
                        }
                        Err(err) => return Ended::Lost(err),
                    }
                }
                Wake::Wrote(Ok(())) => last_sent = Instant::now(),
                Wake::Delivery(delivery) => self.take(delivery),
                Wake::Timer => {
                    let now = Instant::now();
                    if !healthy && now >= connected_at + HEALTHY_AFTER {
                        healthy = true;
                        backoff.reset();
                    }
                    // Quiet time proves the link only when nothing waits for an ack: a
                    // broker that accepts connects but withholds acks stays down.
                    if healthy && self.inflight.count() == 0 {
                        self.context.link.report(true);
                    }
                    if ping_sent.is_some_and(|sent| now >= sent + keep_alive) {
                        return Ended::Lost(LinkError::Unresponsive(
                            "no PINGRESP within the keepalive",
                        ));
                    }
                    if self
                        .inflight
                        .oldest_sent_at()
                        .is_some_and(|oldest| now >= oldest + self.config.ack_timeout.0)
                    {
                        return Ended::Lost(LinkError::Unresponsive(
                            "a publish stayed unacknowledged beyond ack_timeout",
                        ));
                    }
                    if ping_sent.is_none() && now >= last_sent + keep_alive {
                        self.codec.write_pingreq(&mut connection.outgoing);
                        ping_sent = Some(now);
                    }
                }
            }
        }
    }

    fn on_connack(&mut self, ack: &ConnAckInfo) {
        self.max_packet = configured_max_packet(self.config).min(
            ack.max_packet_size
                .map_or(usize::MAX, |max| usize::try_from(max).unwrap_or(usize::MAX)),
        );
        let window = ack.receive_maximum.map_or(self.config.max_inflight, |max| {
            max.min(self.config.max_inflight)
        });
        self.inflight.set_limit(usize::from(window));
        self.connected_gauge.set(1);
        tracing::info!(
            sink = self.buffer.sink(),
            session_present = ack.session_present,
            max_packet_size = ack.max_packet_size,
            receive_maximum = ack.receive_maximum,
            resending = self.inflight.count(),
            "connected upstream"
        );
    }

    /// Encodes the PUBLISH (first send or resend) or PUBREL of an in-flight publish.
    fn write_resend(&mut self, resend: Resend, connection: &mut Connection) {
        match resend {
            Resend::Release { id } => self.codec.write_pubrel(id, &mut connection.outgoing),
            Resend::Publish { id, dup } => {
                let Some(message) = self.inflight.message(id) else {
                    return;
                };
                let publish = PublishOut {
                    topic: &message.topic,
                    payload: &message.payload,
                    qos: message.qos,
                    retain: message.retain,
                    dup,
                    id,
                    event_id: message.event_id.as_deref(),
                };
                // Its size was checked against the limit before its first send; a smaller
                // limit now is the broker's change of mind, and a refusal comes back as a
                // reason code or a disconnect.
                if let Err(err) =
                    self.codec
                        .write_publish(&publish, usize::MAX, &mut connection.outgoing)
                {
                    tracing::error!(sink = self.buffer.sink(), error = %err, "cannot encode publish");
                }
            }
        }
    }

    /// Reads the packets that arrived; returns whether one acknowledged a publish.
    async fn on_readable(&mut self, connection: &mut Connection) -> Result<bool, LinkError> {
        let mut acked = false;
        while let Some(packet) = connection.decode()? {
            match packet {
                Incoming::PubAck { id, code } => {
                    acked = true;
                    let outcome = self.inflight.on_puback(id, code);
                    self.on_outcome(id, outcome).await;
                }
                Incoming::PubRec { id, code } => {
                    acked = true;
                    match self.inflight.on_pubrec(id, code) {
                        AckOutcome::Release(id) => {
                            if let Some(log) = &mut self.qos2_log {
                                log.released(id);
                            }
                            self.codec.write_pubrel(id, &mut connection.outgoing);
                        }
                        AckOutcome::Unknown => {
                            // The broker holds state for an id we do not: release it so
                            // the broker can free the id (MQTT 5 §4.3.3).
                            if code < 0x80 {
                                self.codec.write_pubrel(id, &mut connection.outgoing);
                            }
                        }
                        outcome => self.on_outcome(id, outcome).await,
                    }
                }
                Incoming::PubComp { id, code } => {
                    acked = true;
                    let outcome = self.inflight.on_pubcomp(id, code);
                    self.on_outcome(id, outcome).await;
                }
                Incoming::Publish {
                    id,
                    qos,
                    topic,
                    payload,
                } => self.on_command(id, qos, &topic, payload, connection).await,
                Incoming::PubRel { id } => {
                    self.commands_awaiting_release.remove(&id);
                    self.codec.write_pubcomp(id, &mut connection.outgoing);
                }
                Incoming::SubAck { codes } => {
                    if codes.iter().any(|code| *code >= 0x80) {
                        tracing::warn!(sink = self.buffer.sink(), filter = %self.command_filter, "broker refused the command subscription; no cloud commands");
                    }
                }
                Incoming::PingResp => {}
                Incoming::Disconnect { code } => return Err(LinkError::Disconnected(code)),
                Incoming::ConnAck(_) => return Err(LinkError::Unexpected("second CONNACK")),
                Incoming::Unexpected(name) => return Err(LinkError::Unexpected(name)),
            }
        }
        self.flush_log();
        self.flush_settled();
        Ok(acked)
    }

    async fn on_outcome(&mut self, id: u16, outcome: AckOutcome<Carried>) {
        if let Some(log) = &mut self.qos2_log {
            match &outcome {
                AckOutcome::Delivered(_) => log.completed(id),
                AckOutcome::Rejected { .. } => log.forget(id),
                AckOutcome::Release(_) | AckOutcome::Unknown => {}
            }
        }
        match outcome {
            AckOutcome::Delivered(Carried::Records(deliveries)) => {
                self.retry_delay = self.config.reconnect_min.0;
                let now = now_ms();
                for delivery in &deliveries {
                    self.latency
                        .observe(now.saturating_sub(delivery.event.received_at_ms) as f64 / 1000.0);
                }
                self.sent.inc_by(deliveries.len() as u64);
                self.settled.extend(
                    deliveries
                        .iter()
                        .map(|delivery| (delivery.lane, delivery.id)),
                );
            }
            AckOutcome::Delivered(Carried::Status)
            | AckOutcome::Release(_)
            | AckOutcome::Unknown => {}
            AckOutcome::Rejected {
                carried,
                message,
                code,
            } => {
                let Carried::Records(deliveries) = carried else {
                    tracing::warn!(sink = self.buffer.sink(), code = format_args!("{code:#04x}"), topic = %message.topic, "broker refused the gateway status");
                    return;
                };
                if is_permanent(code) {
                    tracing::warn!(sink = self.buffer.sink(), code = format_args!("{code:#04x}"), topic = %message.topic, events = deliveries.len(), "broker refused events for good; dead-lettered");
                    self.dead_letter(&deliveries, DeadReason::Rejected, Some(code))
                        .await;
                } else {
                    tracing::warn!(sink = self.buffer.sink(), code = format_args!("{code:#04x}"), topic = %message.topic, retry_in = ?self.retry_delay, "broker refused events for now; will retry");
                    self.retries.push_back(Retry {
                        due: Instant::now() + self.retry_delay,
                        message,
                        carried: Carried::Records(deliveries),
                    });
                    self.retry_delay = (self.retry_delay * 2).min(self.config.reconnect_max.0);
                }
            }
        }
    }

    /// Parks `deliveries` in the dead-letter store, then lets them leave the buffer.
    async fn dead_letter(&mut self, deliveries: &[Delivery], reason: DeadReason, code: Option<u8>) {
        let events: Vec<Event> = deliveries.iter().map(|d| d.event.clone()).collect();
        let letters = Arc::clone(&self.context.deadletters);
        let stored = tokio::task::spawn_blocking(move || {
            let letters_in: Vec<NewDeadLetter<'_>> = events
                .iter()
                .map(|event| NewDeadLetter {
                    reason,
                    code,
                    event,
                })
                .collect();
            letters.store(&letters_in, now_ms())
        })
        .await;
        match stored {
            Ok(Ok(())) => {
                self.context.metrics.dropped(
                    self.buffer.sink(),
                    reason.as_str(),
                    deliveries.len() as u64,
                );
                self.settled.extend(
                    deliveries
                        .iter()
                        .map(|delivery| (delivery.lane, delivery.id)),
                );
            }
            Ok(Err(err)) => {
                // Not parked: keep them in the buffer; they are read again after a restart.
                tracing::error!(sink = self.buffer.sink(), error = %err, "cannot store dead letters; events stay in the buffer");
            }
            Err(err) => {
                tracing::error!(sink = self.buffer.sink(), error = %err, "dead-letter task failed; events stay in the buffer");
            }
        }
    }

    fn flush_settled(&mut self) {
        if !self.settled.is_empty() {
            self.buffer.ack(self.settled.drain(..));
        }
    }

    /// A message from the broker: a command. Acknowledged only once stored.
    async fn on_command(
        &mut self,
        id: u16,
        qos: u8,
        topic: &str,
        payload: Bytes,
        connection: &mut Connection,
    ) {
        if qos == 2 && self.commands_awaiting_release.contains(&id) {
            // A redelivery of a command already stored: acknowledge again, store once.
            self.codec.write_pubrec(id, &mut connection.outgoing);
            return;
        }
        let accepted = cloud_commands::accept(
            &self.context,
            self.buffer.sink(),
            &self.command_filter,
            topic,
            payload,
        )
        .await;
        if accepted == Accepted::Retry {
            return;
        }
        match qos {
            1 => self.codec.write_puback(id, &mut connection.outgoing),
            2 => {
                self.commands_awaiting_release.insert(id);
                self.codec.write_pubrec(id, &mut connection.outgoing);
            }
            _ => {}
        }
    }

    /// A record read from the buffer: held for publishing, unless its QoS 2 publish
    /// completed before a restart (then it only leaves the buffer).
    fn take(&mut self, delivery: Delivery) {
        if !self.completed_before_restart.is_empty()
            && self
                .completed_before_restart
                .remove(&(delivery.lane, delivery.id))
        {
            self.settled.push((delivery.lane, delivery.id));
            return;
        }
        self.hold(delivery);
    }

    /// Keeps a delivery for the next [`Self::fill`].
    fn hold(&mut self, delivery: Delivery) {
        if self.held.is_empty() {
            self.held_since = Some(Instant::now());
        }
        self.held.push_back(delivery);
    }

    /// Encodes publishes while the window and the write buffer have room: due retries,
    /// then held deliveries, then whatever the buffer has ready (without waiting).
    async fn fill(&mut self, connection: &mut Connection) {
        let limit = self.config.batch_max_events.max(1);
        while self.inflight.room() > 0 && connection.outgoing.len() < OUTGOING_HIGH_WATER {
            if self
                .retries
                .front()
                .is_some_and(|retry| retry.due <= Instant::now())
            {
                if let Some(retry) = self.retries.pop_front() {
                    self.send(retry.message, retry.carried, connection);
                }
                continue;
            }
            // Top up what is held, up to one batch.
            while self.held.len() < limit {
                match self.buffer.try_next() {
                    Some(delivery) => self.take(delivery),
                    None => break,
                }
            }
            if self.held.is_empty() {
                break;
            }
            let batch_ready = limit == 1
                || self.held.len() >= limit
                || self
                    .held_since
                    .is_some_and(|since| since + self.config.batch_max_delay.0 <= Instant::now());
            if !batch_ready {
                break;
            }
            if limit == 1 {
                if let Some(delivery) = self.held.pop_front() {
                    self.publish_one(delivery, connection).await;
                }
            } else {
                self.publish_batch(connection).await;
            }
            // What is still held (the window filled) keeps its age: it goes out first.
            if self.held.is_empty() {
                self.held_since = None;
            } else {
                self.held_since.get_or_insert_with(Instant::now);
            }
        }
        self.flush_settled();
    }

    /// Publishes one event on its own topic.
    async fn publish_one(&mut self, delivery: Delivery, connection: &mut Connection) {
        let qos = self.config.qos_for(delivery.event.kind).0;
        let message = self.message_for(std::slice::from_ref(&delivery), qos);
        self.publish(message, vec![delivery], connection).await;
    }

    /// Publishes up to one batch of held deliveries, one publish per topic run; stops
    /// (keeping the rest held) when the window is full.
    async fn publish_batch(&mut self, connection: &mut Connection) {
        let limit = self.config.batch_max_events;
        let mut group: Vec<Delivery> = Vec::new();
        let mut group_topic = String::new();
        let mut taken = 0;
        while taken < limit {
            let Some(delivery) = self.held.pop_front() else {
                break;
            };
            if delivery.event.kind == EventKind::Status {
                // Status events are retained per device and never batched.
                if !group.is_empty() {
                    self.publish_group(std::mem::take(&mut group), connection)
                        .await;
                }
                if self.inflight.room() == 0 {
                    self.held.push_front(delivery);
                    return;
                }
                self.publish_one(delivery, connection).await;
                taken += 1;
                continue;
            }
            let topic = self.batch_topic(&delivery.event);
            if !group.is_empty() && topic != group_topic {
                self.publish_group(std::mem::take(&mut group), connection)
                    .await;
                if self.inflight.room() == 0 {
                    self.held.push_front(delivery);
                    return;
                }
            }
            group_topic = topic;
            group.push(delivery);
            taken += 1;
        }
        if !group.is_empty() {
            self.publish_group(group, connection).await;
        }
    }

    async fn publish_group(&mut self, group: Vec<Delivery>, connection: &mut Connection) {
        let qos = group
            .iter()
            .map(|delivery| self.config.qos_for(delivery.event.kind).0)
            .max()
            .unwrap_or(self.config.qos.0);
        let message = self.message_for(&group, qos);
        self.publish(message, group, connection).await;
    }

    /// Sends records, unless they can never fit the broker's packet size limit.
    async fn publish(
        &mut self,
        message: Message,
        deliveries: Vec<Delivery>,
        connection: &mut Connection,
    ) {
        let size = self.codec.publish_size(&PublishOut {
            topic: &message.topic,
            payload: &message.payload,
            qos: message.qos,
            retain: message.retain,
            dup: false,
            id: 1,
            event_id: message.event_id.as_deref(),
        });
        if size > self.max_packet {
            tracing::warn!(
                sink = self.buffer.sink(),
                size,
                max = self.max_packet,
                topic = %message.topic,
                events = deliveries.len(),
                "publish exceeds the broker's maximum packet size; dead-lettered"
            );
            self.dead_letter(&deliveries, DeadReason::TooLarge, None)
                .await;
            return;
        }
        self.send(message, Carried::Records(deliveries), connection);
    }

    /// Encodes a publish; QoS 0 is settled at once, QoS 1/2 take a packet id.
    fn send(&mut self, message: Message, carried: Carried, connection: &mut Connection) {
        if message.qos == 0 {
            let publish = PublishOut {
                topic: &message.topic,
                payload: &message.payload,
                qos: 0,
                retain: message.retain,
                dup: false,
                id: 0,
                event_id: message.event_id.as_deref(),
            };
            if let Err(err) =
                self.codec
                    .write_publish(&publish, usize::MAX, &mut connection.outgoing)
            {
                tracing::error!(sink = self.buffer.sink(), error = %err, "cannot encode publish");
            }
            // QoS 0 is done once handed to the connection.
            if let Carried::Records(deliveries) = carried {
                self.sent.inc_by(deliveries.len() as u64);
                self.settled.extend(
                    deliveries
                        .iter()
                        .map(|delivery| (delivery.lane, delivery.id)),
                );
            }
            return;
        }
        let records: Vec<RecordRef> = match (&carried, &self.qos2_log) {
            (Carried::Records(deliveries), Some(_)) if message.qos == 2 => deliveries
                .iter()
                .map(|delivery| (delivery.lane, delivery.id))
                .collect(),
            _ => Vec::new(),
        };
        let id = match self.inflight.insert(message, carried) {
            Ok(id) => id,
            Err((_, Carried::Records(deliveries))) => {
                // The window filled within a batch: the records wait, in order, for a slot.
                for delivery in deliveries.into_iter().rev() {
                    self.held.push_front(delivery);
                }
                self.held_since.get_or_insert_with(Instant::now);
                return;
            }
            // The next connection publishes a fresh status.
            Err((_, Carried::Status)) => return,
        };
        if let Some(log) = self.qos2_log.as_mut().filter(|_| !records.is_empty()) {
            log.sent(id, &records);
        }
        // Encoded from the in-flight entry, as a resend would be: no copy of the message.
        self.write_resend(Resend::Publish { id, dup: false }, connection);
    }

    /// Queues the retained gateway status; false when the window is full.
    fn publish_status(&mut self, status: &'static [u8], connection: &mut Connection) -> bool {
        if self.inflight.room() == 0 {
            // Resent publishes fill the window; the will already says `offline` and the
            // next status goes out with the next connection.
            return false;
        }
        let message = Message {
            topic: self.status_topic.clone(),
            payload: status.to_vec(),
            qos: 1,
            retain: true,
            event_id: None,
        };
        self.send(message, Carried::Status, connection);
        true
    }

    /// Publishes the clean `offline`, waits briefly for its ack, then disconnects.
    async fn shutdown(&mut self, mut connection: Connection) {
        if !self.publish_status(b"offline", &mut connection) {
            // No slot for `offline`: leave without DISCONNECT, so the broker publishes the
            // will (`offline`) instead of keeping the retained `online`.
            tracing::warn!(
                sink = self.buffer.sink(),
                "in-flight window full at shutdown; leaving the `offline` to the will"
            );
            self.flush_settled();
            self.connected_gauge.set(0);
            return;
        }
        let deadline = Instant::now() + SHUTDOWN_FLUSH;
        let flush = async {
            while self
                .inflight
                .any(|carried| matches!(carried, Carried::Status))
            {
                if !connection.outgoing.is_empty() {
                    connection.write_some().await?;
                    continue;
                }
                connection.read().await?;
                self.on_readable(&mut connection).await?;
            }
            self.codec.write_disconnect(&mut connection.outgoing);
            connection.flush_all().await?;
            Ok::<(), LinkError>(())
        };
        match tokio::time::timeout_at(deadline, flush).await {
            Ok(Ok(())) => {
                let _closed =
                    tokio::time::timeout(Duration::from_secs(1), connection.close()).await;
                tracing::info!(sink = self.buffer.sink(), "disconnected upstream");
            }
            Ok(Err(err)) => {
                tracing::warn!(sink = self.buffer.sink(), error = %err, "upstream lost during shutdown; the will says offline");
            }
            Err(_) => {
                tracing::warn!(
                    sink = self.buffer.sink(),
                    "upstream did not ack the offline status in time; the will says offline"
                );
            }
        }
        self.flush_settled();
        self.connected_gauge.set(0);
    }
}

/// MQTT 5 reason codes that will not change on a retry: the message is parked.
fn is_permanent(code: u8) -> bool {
    matches!(
        code,
        0x87 // not authorized
        | 0x90 // topic name invalid
        | 0x95 // packet too large
        | 0x99 // payload format invalid
    )
}

impl SinkSpec for MqttSinkConfig {
    fn inputs(&self) -> &toml::Spanned<Vec<String>> {
        &self.inputs
    }

    fn inputs_mut(&mut self) -> &mut toml::Spanned<Vec<String>> {
        &mut self.inputs
    }

    fn buffer(&self) -> &BufferConfig {
        &self.buffer
    }

    fn check(
        &self,
        name: &str,
        context: &crate::config::Context<'_>,
    ) -> Result<(), crate::config::ConfigError> {
        self.check_fields(context, name)
    }

    fn dead_letters(&self) -> bool {
        true
    }

    fn has_upstream(&self) -> bool {
        true
    }

    fn watched_files(&self) -> Vec<PathBuf> {
        self.tls
            .iter()
            .flat_map(|tls| [&tls.ca, &tls.cert, &tls.key])
            .flatten()
            .cloned()
            .collect()
    }

    fn build(&self, context: SinkContext) -> futures_util::future::BoxFuture<'static, ()> {
        let config = self.clone();
        Box::pin(async move {
            let Some(deadletters) = context.deadletters else {
                tracing::error!(sink = %context.name, "sink has no dead-letter store");
                return;
            };
            let sink_context = MqttSinkContext {
                gateway: context.gateway,
                directory: context.directory,
                commands: context.commands,
                intake: context.intake,
                deadletters,
                data_dir: context.data_dir,
                metrics: context.metrics,
                link: context.link,
            };
            if let Err(err) = run(context.buffer, &config, sink_context, context.stop).await {
                tracing::error!(sink = %context.name, error = %err, "sink failed");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_codes_that_cannot_change_are_permanent() {
        for code in [0x87, 0x90, 0x95, 0x99] {
            assert!(is_permanent(code), "{code:#04x}");
        }
        for code in [0x80, 0x83, 0x91, 0x97] {
            assert!(!is_permanent(code), "{code:#04x}");
        }
    }
}
