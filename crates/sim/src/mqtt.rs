//! MQTT plumbing shared by the MQTT devices and the upstream subscriber: URL
//! parsing, one client type over both protocol versions, and the device loop.
//!
//! Protocol versions differ only inside [`Client`] and [`EventLoop`]; the
//! device and subscriber logic is written once against [`Notice`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::cli::MqttProtocol;
use crate::pacing::{Backoff, Pacer};
use crate::run::{DeviceModel, RunShared};
use crate::stats::{self, Counters};
use crate::template::{RandomWalk, Vars};

/// Largest packet the clients accept or send.
const MAX_PACKET: usize = 64 * 1024 * 1024;
/// Keep-alive of every client.
const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// A parsed broker URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or address.
    pub host: String,
    /// Port (1883 / 8883 by default).
    pub port: u16,
    /// mqtts://
    pub tls: bool,
    /// user:password from the URL.
    pub credentials: Option<(String, String)>,
}

impl BrokerUrl {
    /// Parses `mqtt://[user[:pass]@]host[:port]` (also tcp://, mqtts://, ssl://).
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let (scheme, rest) = url
            .split_once("://")
            .with_context(|| format!("broker URL {url:?} has no scheme (mqtt:// or mqtts://)"))?;
        let tls = match scheme {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            other => bail!("broker URL {url:?}: unsupported scheme {other:?} (mqtt or mqtts)"),
        };
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        let (credentials, host_port) = match authority.rsplit_once('@') {
            Some((userinfo, host_port)) => {
                let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                (Some((user.to_owned(), pass.to_owned())), host_port)
            }
            None => (None, authority),
        };
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(bracketed) = host_port.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .with_context(|| format!("broker URL {url:?}: unclosed '['"))?;
            let port = match after.strip_prefix(':') {
                Some(port) => port
                    .parse()
                    .with_context(|| format!("broker URL {url:?}: bad port"))?,
                None => default_port,
            };
            (host.to_owned(), port)
        } else {
            match host_port.rsplit_once(':') {
                Some((host, port)) => (
                    host.to_owned(),
                    port.parse()
                        .with_context(|| format!("broker URL {url:?}: bad port {port:?}"))?,
                ),
                None => (host_port.to_owned(), default_port),
            }
        };
        if host.is_empty() {
            bail!("broker URL {url:?} has no host");
        }
        Ok(Self {
            host,
            port,
            tls,
            credentials,
        })
    }

    /// `host:port` for resolution.
    pub fn host_port(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Per-client settings.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Client id.
    pub client_id: String,
    /// Outgoing QoS 1/2 messages in flight.
    pub inflight: u16,
    /// Capacity of the request channel between client handle and event loop.
    pub request_capacity: usize,
}

/// What the event loop reported, independent of the protocol version.
#[derive(Debug)]
pub enum Notice {
    /// Connected (CONNACK).
    Connected,
    /// A subscription was granted (SUBACK).
    Subscribed,
    /// One outgoing QoS 1 or 2 message completed (PUBACK or PUBCOMP).
    Acked,
    /// A PUBLISH went out on the wire (first transmission or retransmission).
    PublishSent,
    /// An incoming message.
    Message(Bytes),
    /// Our DISCONNECT went out: the loop is done.
    Disconnected,
    /// Anything else.
    Other,
}

/// A client handle, either protocol version.
#[derive(Clone)]
pub enum Client {
    /// MQTT 3.1.1.
    V4(rumqttc::AsyncClient),
    /// MQTT 5.
    V5(rumqttc::v5::AsyncClient),
}

/// The event loop of a [`Client`].
pub enum EventLoop {
    /// MQTT 3.1.1.
    V4(Box<rumqttc::EventLoop>),
    /// MQTT 5.
    V5(Box<rumqttc::v5::EventLoop>),
}

/// Creates a client and its event loop (not yet connected: polling connects).
pub fn new_client(
    protocol: MqttProtocol,
    broker: &BrokerUrl,
    tls: Option<&Arc<rustls::ClientConfig>>,
    settings: &ClientSettings,
) -> (Client, EventLoop) {
    let transport = tls.map(|config| {
        rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::clone(config)))
    });
    match protocol {
        MqttProtocol::V311 => {
            let mut options =
                rumqttc::MqttOptions::new(&settings.client_id, &broker.host, broker.port);
            options
                .set_keep_alive(KEEP_ALIVE)
                .set_clean_session(true)
                .set_inflight(settings.inflight.max(1))
                .set_max_packet_size(MAX_PACKET, MAX_PACKET)
                .set_request_channel_capacity(settings.request_capacity);
            if let Some((user, pass)) = &broker.credentials {
                options.set_credentials(user, pass);
            }
            if let Some(transport) = transport {
                options.set_transport(transport);
            }
            let (client, eventloop) = rumqttc::AsyncClient::new(options, settings.request_capacity);
            (Client::V4(client), EventLoop::V4(Box::new(eventloop)))
        }
        MqttProtocol::V5 => {
            let mut options =
                rumqttc::v5::MqttOptions::new(&settings.client_id, &broker.host, broker.port);
            options
                .set_keep_alive(KEEP_ALIVE)
                .set_clean_start(true)
                .set_outgoing_inflight_upper_limit(settings.inflight.max(1))
                .set_max_packet_size(u32::try_from(MAX_PACKET).ok())
                .set_request_channel_capacity(settings.request_capacity);
            if let Some((user, pass)) = &broker.credentials {
                options.set_credentials(user, pass);
            }
            if let Some(transport) = transport {
                options.set_transport(transport);
            }
            let (client, eventloop) =
                rumqttc::v5::AsyncClient::new(options, settings.request_capacity);
            (Client::V5(client), EventLoop::V5(Box::new(eventloop)))
        }
    }
}

fn qos_v4(qos: u8) -> rumqttc::QoS {
    match qos {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn qos_v5(qos: u8) -> rumqttc::v5::mqttbytes::QoS {
    match qos {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

impl Client {
    /// Queues a publish; waits while the request channel is full.
    pub async fn publish(&self, topic: &str, qos: u8, payload: Vec<u8>) -> anyhow::Result<()> {
        match self {
            Client::V4(client) => client.publish(topic, qos_v4(qos), false, payload).await?,
            Client::V5(client) => client.publish(topic, qos_v5(qos), false, payload).await?,
        }
        Ok(())
    }

    /// Queues a subscription without waiting (used from inside the event-loop task).
    pub fn try_subscribe(&self, filter: &str, qos: u8) -> anyhow::Result<()> {
        match self {
            Client::V4(client) => client.try_subscribe(filter, qos_v4(qos))?,
            Client::V5(client) => client.try_subscribe(filter, qos_v5(qos))?,
        }
        Ok(())
    }

    /// Queues a DISCONNECT after everything already queued.
    pub async fn disconnect(&self) -> anyhow::Result<()> {
        match self {
            Client::V4(client) => client.disconnect().await?,
            Client::V5(client) => client.disconnect().await?,
        }
        Ok(())
    }
}

impl EventLoop {
    /// Drives the connection one step (connecting or reconnecting first if needed).
    pub async fn poll(&mut self) -> Result<Notice, String> {
        use rumqttc::v5::Event as Event5;
        use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
        use rumqttc::{Event, Outgoing, Packet};
        match self {
            EventLoop::V4(eventloop) => match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => Ok(Notice::Connected),
                Ok(Event::Incoming(Packet::SubAck(_))) => Ok(Notice::Subscribed),
                Ok(Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_))) => Ok(Notice::Acked),
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    Ok(Notice::Message(publish.payload))
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => Ok(Notice::Disconnected),
                Ok(Event::Outgoing(Outgoing::Publish(_))) => Ok(Notice::PublishSent),
                Ok(_) => Ok(Notice::Other),
                Err(e) => Err(e.to_string()),
            },
            EventLoop::V5(eventloop) => match eventloop.poll().await {
                Ok(Event5::Incoming(Packet5::ConnAck(_))) => Ok(Notice::Connected),
                Ok(Event5::Incoming(Packet5::SubAck(_))) => Ok(Notice::Subscribed),
                Ok(Event5::Incoming(Packet5::PubAck(_) | Packet5::PubComp(_))) => Ok(Notice::Acked),
                Ok(Event5::Incoming(Packet5::Publish(publish))) => {
                    Ok(Notice::Message(publish.payload))
                }
                Ok(Event5::Outgoing(Outgoing::Disconnect)) => Ok(Notice::Disconnected),
                Ok(Event5::Outgoing(Outgoing::Publish(_))) => Ok(Notice::PublishSent),
                Ok(_) => Ok(Notice::Other),
                Err(e) => Err(e.to_string()),
            },
        }
    }
}

/// Immutable settings of an MQTT device run.
pub struct MqttPlan {
    /// Device behaviour.
    pub model: DeviceModel,
    /// Broker.
    pub broker: BrokerUrl,
    /// Protocol version.
    pub protocol: MqttProtocol,
    /// TLS configuration for mqtts.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Topic template with {device}.
    pub topic: String,
    /// Publish QoS.
    pub qos: u8,
}

/// One MQTT device: a publisher paced like a TCP device, and its event loop.
pub async fn device(plan: Arc<MqttPlan>, run: Arc<RunShared>, slot: usize) {
    let model = &plan.model;
    let id = model.ids.name(slot);
    let topic = plan.topic.replace("{device}", &id);
    let settings = ClientSettings {
        client_id: id.clone(),
        inflight: u16::try_from(model.window).unwrap_or(u16::MAX),
        request_capacity: model.window.clamp(1, 64),
    };
    let (client, mut eventloop) =
        new_client(plan.protocol, &plan.broker, plan.tls.as_ref(), &settings);
    let started = Instant::now();
    let send_until = started + model.duration;
    let give_up_at = send_until + model.drain_timeout;
    let acked_here = AtomicU64::new(0);
    // Handed to the client vs. seen going out: "sent" counts wire transmissions,
    // anything beyond what was handed over is a retransmission.
    let enqueued = AtomicU64::new(0);
    let ack_signal = Notify::new();
    let stop = run.cancel.child_token();
    let driver_done = CancellationToken::new();

    let driver = async {
        let mut rng = fastrand::Rng::new();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut connected = false;
        let mut on_wire = 0u64;
        loop {
            let polled = tokio::select! {
                () = stop.cancelled() => break,
                polled = eventloop.poll() => polled,
            };
            match polled {
                Ok(Notice::Connected) => {
                    if !connected {
                        connected = true;
                        run.counters.connection_opened();
                    }
                    backoff.reset();
                }
                Ok(Notice::Acked) => {
                    acked_here.fetch_add(1, Ordering::Relaxed);
                    Counters::add(&run.counters.acked, 1);
                    ack_signal.notify_one();
                }
                Ok(Notice::PublishSent) => {
                    if on_wire < enqueued.load(Ordering::Relaxed) {
                        on_wire += 1;
                        Counters::add(&run.counters.sent, 1);
                        run.counters.note_send(Instant::now() - run.start);
                    } else {
                        Counters::add(&run.counters.resent, 1);
                    }
                }
                Ok(Notice::Disconnected) => break,
                Ok(_) => {}
                Err(error) => {
                    if connected {
                        connected = false;
                        run.counters.connection_closed();
                        Counters::add(&run.counters.disconnects, 1);
                        run.errors.record("disconnect", || format!("{id}: {error}"));
                    } else {
                        Counters::add(&run.counters.connect_failures, 1);
                        run.errors.record("connect", || {
                            format!("{id}: connect to {}: {error}", plan.broker.host_port())
                        });
                    }
                    let delay = backoff.next_delay(&mut rng);
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        if connected {
            run.counters.connection_closed();
        }
        driver_done.cancel();
    };

    let publisher = async {
        let mut rng = fastrand::Rng::new();
        let mut walk = RandomWalk::new(&mut rng);
        let mut pacer = Pacer::new(model.rate, model.jitter, started, &mut rng);
        let mut seq = 0u64;
        'send: while seq < model.messages {
            let Some(due) = pacer.next_due(Instant::now(), send_until) else {
                break;
            };
            if due > Instant::now() {
                tokio::select! {
                    () = stop.cancelled() => break 'send,
                    () = sleep_until(due) => {}
                }
            }
            if stop.is_cancelled() {
                break;
            }
            seq += 1;
            run.seqs.set(slot, seq);
            let mut payload = Vec::with_capacity(128);
            model.template.render(
                &Vars {
                    device: &id,
                    seq,
                    send_us: stats::now_us(),
                    walk: walk.step(&mut rng),
                    rand: rng.f64(),
                },
                &mut payload,
            );
            // Counted before the hand-over so the event loop never sees more publishes than this.
            enqueued.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                () = stop.cancelled() => break 'send,
                () = sleep_until(give_up_at) => break 'send,
                published = client.publish(&topic, plan.qos, payload) => {
                    if let Err(error) = published {
                        run.errors.record("publish", || format!("{id}: publish to {topic}: {error}"));
                        break 'send;
                    }
                }
            }
            pacer.advance(&mut rng);
        }
        // At-least-once: wait for the broker to acknowledge what we sent, within the drain budget.
        if plan.qos > 0 {
            while acked_here.load(Ordering::Relaxed) < seq {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = sleep_until(give_up_at) => break,
                    () = ack_signal.notified() => {}
                }
            }
        }
        // DISCONNECT goes out after every queued publish, so QoS 0 messages are flushed first.
        let grace = Instant::now() + Duration::from_secs(5);
        tokio::select! {
            () = stop.cancelled() => {}
            () = sleep_until(grace) => {}
            disconnected = client.disconnect() => {
                if disconnected.is_ok() {
                    tokio::select! {
                        () = driver_done.cancelled() => {}
                        () = sleep_until(grace) => {}
                    }
                }
            }
        }
        stop.cancel();
    };

    tokio::join!(driver, publisher);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let url = BrokerUrl::parse("mqtt://127.0.0.1:1884").unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.tls),
            ("127.0.0.1", 1884, false)
        );
        let url = BrokerUrl::parse("mqtts://user:pw@broker.local/").unwrap();
        assert_eq!((url.port, url.tls), (8883, true));
        assert_eq!(url.credentials, Some(("user".into(), "pw".into())));
        let url = BrokerUrl::parse("tcp://[::1]:1999").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("::1", 1999));
        assert_eq!(url.host_port(), "[::1]:1999");
        assert!(BrokerUrl::parse("localhost").is_err());
        assert!(BrokerUrl::parse("http://x").is_err());
        assert!(BrokerUrl::parse("mqtt://:1883").is_err());
        assert!(BrokerUrl::parse("mqtt://h:port").is_err());
    }
}
