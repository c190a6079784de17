//! The embedded MQTT 3.1.1/5.0 broker as a source: `type = "mqtt_broker"`.
//!
//! The protocol (sessions, subscriptions, retained messages, QoS state) lives in the
//! `fieldgate-broker` crate; this module is the glue: the listener, one task per
//! connection ([`connection`]), authentication against the source's `auth`, the default
//! ACL ([`acl`]), and the hand-off of publishes matching `device_topic` to the pipeline,
//! whose acknowledgement gates the PUBACK/PUBREC exactly like TCP ack mode.
//!
//! Invariants: the broker state sits behind one mutex held only for short, bounded
//! operations, never across an await; a connection reads only while fewer than
//! `max_inflight` of its events wait for the pipeline; a session timer task ends
//! expired sessions and publishes delayed wills once a second.

mod acl;
mod config;
mod connection;
mod device_topic;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fieldgate_broker::topic::TopicLimits;
use fieldgate_broker::{Broker, BrokerLimits, Message};
use futures_util::future::BoxFuture;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use self::config::MqttBrokerSourceConfig;
use self::device_topic::DeviceTopic;
use super::tcp::AuthMode;
use super::tcp::stream::DeviceStream;
use super::{RunningSource, SourceContext, SourceSpec};
use crate::config::{ConfigError, Context, ListenerClaims, Settings};
use crate::devices::DeviceServices;
use crate::net::limits::FdUser;
use crate::net::tls::ReloadableTls;
use crate::pipeline::SourceOutput;
use crate::telemetry::Metrics;

/// Settings every connection shares.
pub struct BrokerSettings {
    /// Source name.
    pub name: Arc<str>,
    /// Authentication mode.
    pub auth: AuthMode,
    /// Accepted passwords under `auth = "token"`.
    pub tokens: Vec<String>,
    /// Which publishes become events.
    pub device_topic: DeviceTopic,
    /// Largest inbound packet.
    pub max_packet_size: usize,
    /// QoS 1/2 in flight per client, each way.
    pub max_inflight: u16,
    /// Highest inbound topic alias.
    pub topic_alias_maximum: u16,
    /// Longest session expiry, seconds.
    pub max_session_expiry: u32,
    /// CONNECT deadline.
    pub connect_timeout: Duration,
    /// Topic limits.
    pub topic_limits: TopicLimits,
}

/// How the broker wakes one connection.
#[derive(Default)]
pub struct ConnectionSignal {
    /// Messages are waiting in its session.
    pub wake: Notify,
    /// A new connection took its session: it must close (0x8E).
    pub evict: Notify,
}

/// Shared by the listener, its connections and the session timer.
pub struct BrokerShared {
    /// Settings.
    pub settings: BrokerSettings,
    broker: Mutex<Broker>,
    signals: Mutex<HashMap<u64, Arc<ConnectionSignal>>>,
    /// Where events go.
    pub output: SourceOutput,
    /// Directory, registry, commands, throttle.
    pub services: Arc<DeviceServices>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// `fieldgate_connections{source}`.
    pub connections: Gauge,
    /// `fieldgate_received_events_total{source}`.
    pub received: Counter,
    /// The broker's clock origin (message expiry, session expiry, will delay).
    started: tokio::time::Instant,
}

impl BrokerShared {
    /// The broker state; held only for short operations, never across an await.
    pub fn broker(&self) -> MutexGuard<'_, Broker> {
        self.broker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn signals(&self) -> MutexGuard<'_, HashMap<u64, Arc<ConnectionSignal>>> {
        self.signals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Milliseconds on the broker's clock.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Registers a connection's signal.
    pub fn attach(&self, connection: u64, signal: Arc<ConnectionSignal>) {
        self.signals().insert(connection, signal);
    }

    /// Forgets a closed connection's signal.
    pub fn detach(&self, connection: u64) {
        self.signals().remove(&connection);
    }

    /// Wakes connections that have messages waiting.
    pub fn wake(&self, connections: &[u64]) {
        let signals = self.signals();
        for connection in connections {
            if let Some(signal) = signals.get(connection) {
                signal.wake.notify_one();
            }
        }
    }

    /// Tells a connection to close because its session was taken over.
    pub fn evict(&self, connection: u64) {
        if let Some(signal) = self.signals().get(&connection) {
            signal.evict.notify_one();
        }
    }

    /// Routes a message to the subscribers (a client's publish, a will, a command);
    /// returns how many subscriptions it matched.
    pub fn publish_local(&self, from: Option<&str>, message: Message) -> usize {
        let now = self.now_ms();
        let outcome = self.broker().publish(from, Arc::new(message), now);
        self.wake(&outcome.woken);
        if outcome.dropped > 0 {
            self.dropped("queue_full", outcome.dropped);
        }
        if outcome.retain_refused {
            self.dropped("retained_full", 1);
        }
        outcome.matched
    }

    /// Counts messages the broker did not deliver or keep.
    pub fn dropped(&self, reason: &str, count: usize) {
        self.metrics
            .mqtt_dropped_messages
            .get_or_create(&crate::telemetry::metrics::ParseLabels {
                source: self.settings.name.to_string(),
                reason: reason.to_owned(),
            })
            .inc_by(count as u64);
    }
}

impl crate::devices::local_brokers::LocalPublish for BrokerShared {
    fn publish(
        &self,
        topic: &str,
        payload: bytes::Bytes,
        qos: u8,
        retain: bool,
    ) -> Result<usize, crate::devices::local_brokers::LocalPublishError> {
        fieldgate_broker::topic::validate_name(topic, self.settings.topic_limits).map_err(
            |err| crate::devices::local_brokers::LocalPublishError::BadTopic {
                topic: topic.chars().take(256).collect(),
                reason: err.to_string(),
            },
        )?;
        let message = Message {
            topic: topic.to_owned(),
            payload,
            qos: qos.min(2),
            retain,
            properties: fieldgate_broker::MessageProperties::default(),
        };
        Ok(self.publish_local(None, message))
    }
}

/// Pending connections the kernel may queue.
const ACCEPT_BACKLOG: u32 = 4096;

fn listen(address: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(address)?;
    socket.listen(ACCEPT_BACKLOG)
}

impl MqttBrokerSourceConfig {
    fn settings(&self, name: &str) -> anyhow::Result<BrokerSettings> {
        Ok(BrokerSettings {
            name: Arc::from(name),
            auth: self.auth,
            tokens: self.tokens.clone(),
            device_topic: DeviceTopic::parse(&self.device_topic)?,
            max_packet_size: usize::try_from(self.max_packet_size.0).unwrap_or(usize::MAX),
            max_inflight: self.max_inflight.max(1),
            topic_alias_maximum: self.topic_alias_maximum,
            max_session_expiry: u32::try_from(self.max_session_expiry.0.as_secs())
                .unwrap_or(u32::MAX),
            connect_timeout: self.connect_timeout.0,
            topic_limits: TopicLimits {
                max_length: self.max_topic_length,
                max_levels: self.max_topic_levels,
            },
        })
    }

    fn limits(&self) -> BrokerLimits {
        BrokerLimits {
            max_queued: self.max_queued_messages,
            max_inflight: self.max_inflight.max(1),
            max_retained: self.max_retained_messages,
            max_subscriptions: self.max_subscriptions,
            topic: TopicLimits {
                max_length: self.max_topic_length,
                max_levels: self.max_topic_levels,
            },
            max_session_expiry: u32::try_from(self.max_session_expiry.0.as_secs())
                .unwrap_or(u32::MAX),
        }
    }
}

/// Accepts until `stop`, then waits for the connections to close.
async fn run(
    shared: Arc<BrokerShared>,
    listener: TcpListener,
    tls: Option<Arc<ReloadableTls>>,
    max_connections: usize,
    stop: CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(max_connections));
    let connections = TaskTracker::new();
    let name = Arc::clone(&shared.settings.name);
    let address = listener
        .local_addr()
        .map_or_else(|err| format!("unknown ({err})"), |a| a.to_string());
    tracing::info!(source = %name, %address, "MQTT broker accepting clients");
    connections.spawn(session_timer(Arc::clone(&shared), stop.clone()));
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            permit = Arc::clone(&limit).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (socket, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(source = %name, error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if !shared.services.fds.admit(FdUser::Device) {
            shared.metrics.refused(&name, "fd_reserve");
            drop(socket);
            continue;
        }
        if let Err(err) = socket.set_nodelay(true) {
            tracing::debug!(source = %name, %peer, error = %err, "cannot set TCP_NODELAY");
        }
        let id = shared.services.directory.next_connection_id();
        let span = tracing::info_span!("mqtt", source = %name, %peer, conn = id, client = tracing::field::Empty);
        let shared = Arc::clone(&shared);
        let stop = stop.clone();
        // Plain and TLS connections are different futures, so an idle plain connection
        // does not carry the TLS handshake state in its task.
        match &tls {
            None => {
                let stream = DeviceStream::Plain(socket);
                connections.spawn(
                    connection::serve(shared, stream, peer, id, stop, permit).instrument(span),
                );
            }
            Some(tls) => {
                let acceptor = tls.current();
                connections.spawn(
                    async move {
                        let handshake = tokio::time::timeout(
                            shared.settings.connect_timeout,
                            acceptor.accept(socket),
                        );
                        match handshake.await {
                            Ok(Ok(stream)) => {
                                let stream = DeviceStream::Tls(Box::new(stream));
                                Box::pin(connection::serve(shared, stream, peer, id, stop, permit))
                                    .await;
                            }
                            Ok(Err(err)) => {
                                tracing::info!(error = %err, "TLS handshake failed");
                                shared
                                    .metrics
                                    .auth_failures
                                    .get_or_create(&Metrics::source(&shared.settings.name))
                                    .inc();
                            }
                            Err(_) => tracing::info!("TLS handshake timed out"),
                        }
                    }
                    .instrument(span),
                );
            }
        }
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    tracing::info!(source = %name, "MQTT broker stopped");
}

/// Ends expired sessions and publishes due wills, once a second, until `stop`.
async fn session_timer(shared: Arc<BrokerShared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = shared.now_ms();
        let wills = shared.broker().tick(now);
        for will in wills {
            tracing::debug!(topic = %will.topic, "publishing a delayed will");
            shared.publish_local(None, will);
        }
    }
}

impl SourceSpec for MqttBrokerSourceConfig {
    fn check(
        &self,
        name: &str,
        settings: &Settings,
        listeners: &mut ListenerClaims<'_>,
        context: &Context<'_>,
    ) -> Result<(), ConfigError> {
        listeners.claim(&self.address, format!("sources.{name}.address"))?;
        self.check_fields(context, name)?;
        let key = |field: &str| format!("sources.{name}.{field}");
        if self.auth == AuthMode::Registry && settings.registry.is_none() {
            return Err(
                context.key_error(&key("auth"), "auth = \"registry\" needs a [registry] table")
            );
        }
        if settings.registry.is_some() && self.auth != AuthMode::Registry {
            return Err(context.key_error(
                &key("auth"),
                "only auth = \"registry\" can be used beside [registry]: other clients name \
                 their devices without proof and could speak for a registered device",
            ));
        }
        if self.auth == AuthMode::Token && self.tokens.is_empty() {
            return Err(
                context.key_error(&key("tokens"), "auth = \"token\" needs at least one token")
            );
        }
        if settings.gateway.partial_frame_budget.0 < self.max_packet_size.0 {
            return Err(context.key_error(
                "gateway.partial_frame_budget",
                "must be at least 64KiB and at least the largest max_frame or max_packet_size of a source",
            ));
        }
        Ok(())
    }

    fn largest_event(&self) -> u64 {
        self.max_packet_size.0
    }

    fn build<'a>(
        &'a self,
        name: &'a str,
        context: SourceContext,
    ) -> BoxFuture<'a, anyhow::Result<RunningSource>> {
        Box::pin(async move {
            use anyhow::Context as _;
            let address = *self.address.get_ref();
            let tls = self
                .tls
                .as_ref()
                .map(|tls| ReloadableTls::load(&tls.cert, &tls.key, tls.client_ca.as_deref()))
                .transpose()
                .with_context(|| format!("source `{name}`: TLS set-up failed"))?
                .map(Arc::new);
            let listener = listen(address)
                .with_context(|| format!("source `{name}`: cannot listen on {address}"))?;
            let label = Metrics::source(name);
            let connections = context.metrics.connections.get_or_create(&label).clone();
            let received = context
                .metrics
                .received_events
                .get_or_create(&label)
                .clone();
            let shared = Arc::new(BrokerShared {
                settings: self.settings(name)?,
                broker: Mutex::new(Broker::new(self.limits())),
                signals: Mutex::new(HashMap::new()),
                output: context.output,
                services: context.services,
                connections,
                received,
                metrics: context.metrics,
                started: tokio::time::Instant::now(),
            });
            // The gateway's own publishes (alarm actions) reach this broker by its name.
            let local: Arc<dyn crate::devices::local_brokers::LocalPublish> = shared.clone();
            shared
                .services
                .local_brokers
                .attach(name, Arc::downgrade(&local));
            Ok(RunningSource {
                task: Box::pin(run(
                    shared,
                    listener,
                    tls.clone(),
                    self.max_connections.max(1),
                    context.stop,
                )),
                tls,
            })
        })
    }
}
