//! One interface over rumqttc's MQTT 3.1.1 and 5.0 clients, so the sink's logic is
//! written once and only the codec varies.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{Outgoing, TlsConfiguration, Transport};

use super::address::BrokerAddress;
use crate::config::{MqttProtocol, Qos};

/// Connection settings shared by both protocol versions.
pub struct LinkOptions {
    /// Broker.
    pub address: BrokerAddress,
    /// TLS client configuration for `mqtts://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Stable client id.
    pub client_id: String,
    /// Keepalive interval.
    pub keep_alive: Duration,
    /// Fresh session on every connect.
    pub clean_session: bool,
    /// MQTT 5 session expiry.
    pub session_expiry: Duration,
    /// User name and password.
    pub credentials: Option<(String, String)>,
    /// Publishes awaiting acks at once.
    pub max_inflight: u16,
    /// Where the will (retained `offline`) goes.
    pub will_topic: String,
    /// 3.1.1 or 5.
    pub protocol: MqttProtocol,
}

/// What happened on the link, in protocol-neutral terms.
#[derive(Debug)]
pub enum LinkEvent {
    /// CONNACK received.
    Connected {
        /// The broker kept our session.
        session_present: bool,
    },
    /// A publish was written with this packet id (0 for QoS 0).
    Sent {
        /// Packet id.
        packet_id: u16,
    },
    /// rumqttc holds a publish back until this packet id is acked (out-of-order acks).
    HeldBack {
        /// Packet id.
        packet_id: u16,
    },
    /// PUBACK (QoS 1) or PUBCOMP (QoS 2) received.
    Acked {
        /// Packet id.
        packet_id: u16,
    },
    /// A message on a subscribed topic.
    Message {
        /// Its topic.
        topic: String,
        /// Its payload.
        payload: Bytes,
    },
    /// DISCONNECT written.
    DisconnectSent,
    /// Anything the sink does not act on.
    Other,
}

/// A rumqttc client and event loop of either version.
pub enum Link {
    /// MQTT 3.1.1.
    V4(rumqttc::AsyncClient, Box<rumqttc::EventLoop>),
    /// MQTT 5.0.
    V5(rumqttc::v5::AsyncClient, Box<rumqttc::v5::EventLoop>),
}

fn transport(options: &LinkOptions) -> Transport {
    match &options.tls {
        Some(config) => Transport::tls_with_config(TlsConfiguration::Rustls(Arc::clone(config))),
        None => Transport::tcp(),
    }
}

impl Link {
    /// Creates the client; it connects on the first `poll`.
    pub fn new(options: &LinkOptions) -> Self {
        let host = options.address.host.clone();
        let port = options.address.port;
        // Requests beyond the in-flight window wait in this channel; the sink never
        // queues more than max_inflight plus a few control packets.
        let capacity = usize::from(options.max_inflight) * 2 + 16;
        match options.protocol {
            MqttProtocol::V311 => {
                let mut mqtt = rumqttc::MqttOptions::new(&options.client_id, host, port);
                mqtt.set_keep_alive(options.keep_alive)
                    .set_clean_session(options.clean_session)
                    .set_inflight(packet_id_window(options.max_inflight))
                    .set_request_channel_capacity(capacity)
                    .set_max_packet_size(1 << 20, 256 << 20)
                    .set_transport(transport(options))
                    .set_last_will(rumqttc::LastWill::new(
                        &options.will_topic,
                        "offline",
                        rumqttc::QoS::AtLeastOnce,
                        true,
                    ));
                if let Some((user, password)) = &options.credentials {
                    mqtt.set_credentials(user, password);
                }
                let (client, eventloop) = rumqttc::AsyncClient::new(mqtt, capacity);
                Link::V4(client, Box::new(eventloop))
            }
            MqttProtocol::V5 => {
                let mut mqtt = rumqttc::v5::MqttOptions::new(&options.client_id, host, port);
                let expiry = u32::try_from(options.session_expiry.as_secs()).unwrap_or(u32::MAX);
                mqtt.set_keep_alive(options.keep_alive)
                    .set_clean_start(options.clean_session)
                    .set_session_expiry_interval((!options.clean_session).then_some(expiry))
                    .set_outgoing_inflight_upper_limit(packet_id_window(options.max_inflight))
                    .set_request_channel_capacity(capacity)
                    .set_max_packet_size(Some(256 << 20))
                    .set_transport(transport(options))
                    .set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
                        &options.will_topic,
                        "offline",
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                        true,
                        None,
                    ));
                if let Some((user, password)) = &options.credentials {
                    mqtt.set_credentials(user, password);
                }
                let (client, eventloop) = rumqttc::v5::AsyncClient::new(mqtt, capacity);
                Link::V5(client, Box::new(eventloop))
            }
        }
    }

    /// Drives the connection: reconnects, reads, writes; returns the next event.
    pub async fn poll(&mut self) -> Result<LinkEvent, String> {
        match self {
            Link::V4(_, eventloop) => {
                use rumqttc::{Event, Packet};
                let event = eventloop.poll().await.map_err(|err| err.to_string())?;
                Ok(match event {
                    Event::Incoming(Packet::ConnAck(ack)) => LinkEvent::Connected {
                        session_present: ack.session_present,
                    },
                    Event::Incoming(Packet::PubAck(ack)) => LinkEvent::Acked {
                        packet_id: ack.pkid,
                    },
                    Event::Incoming(Packet::PubComp(ack)) => LinkEvent::Acked {
                        packet_id: ack.pkid,
                    },
                    Event::Incoming(Packet::Publish(publish)) => LinkEvent::Message {
                        topic: publish.topic,
                        payload: publish.payload,
                    },
                    Event::Outgoing(outgoing) => outgoing_event(outgoing),
                    Event::Incoming(_) => LinkEvent::Other,
                })
            }
            Link::V5(_, eventloop) => {
                use rumqttc::v5::Event;
                use rumqttc::v5::mqttbytes::v5::Packet;
                let event = eventloop.poll().await.map_err(|err| err.to_string())?;
                Ok(match event {
                    Event::Incoming(Packet::ConnAck(ack)) => LinkEvent::Connected {
                        session_present: ack.session_present,
                    },
                    Event::Incoming(Packet::PubAck(ack)) => LinkEvent::Acked {
                        packet_id: ack.pkid,
                    },
                    Event::Incoming(Packet::PubComp(ack)) => LinkEvent::Acked {
                        packet_id: ack.pkid,
                    },
                    Event::Incoming(Packet::Publish(publish)) => LinkEvent::Message {
                        topic: String::from_utf8_lossy(&publish.topic).into_owned(),
                        payload: publish.payload,
                    },
                    Event::Outgoing(outgoing) => outgoing_event(outgoing),
                    Event::Incoming(_) => LinkEvent::Other,
                })
            }
        }
    }

    /// Queues a publish without waiting (the sink bounds what it queues).
    pub fn publish(
        &self,
        topic: &str,
        qos: Qos,
        retain: bool,
        payload: Bytes,
    ) -> Result<(), String> {
        match self {
            Link::V4(client, _) => client
                .try_publish(topic, qos_v4(qos), retain, payload)
                .map_err(|err| err.to_string()),
            Link::V5(client, _) => client
                .try_publish(topic, qos_v5(qos), retain, payload)
                .map_err(|err| err.to_string()),
        }
    }

    /// Subscribes to a command filter at QoS 1.
    pub fn subscribe(&self, filter: &str) -> Result<(), String> {
        match self {
            Link::V4(client, _) => client
                .try_subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .map_err(|err| err.to_string()),
            Link::V5(client, _) => client
                .try_subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                .map_err(|err| err.to_string()),
        }
    }

    /// Queues a DISCONNECT (no will is sent by the broker after it).
    pub fn disconnect(&self) -> Result<(), String> {
        match self {
            Link::V4(client, _) => client.try_disconnect().map_err(|err| err.to_string()),
            Link::V5(client, _) => client.try_disconnect().map_err(|err| err.to_string()),
        }
    }

    /// After a disconnect: drop the publishes rumqttc would resend and any stale events,
    /// because the sink resends from its buffer. Releases (QoS 2 PUBREL) are kept so the
    /// broker can finish what it already received.
    pub fn forget_publishes(&mut self) {
        match self {
            Link::V4(_, eventloop) => {
                eventloop
                    .pending
                    .retain(|request| !matches!(request, rumqttc::Request::Publish(_)));
                eventloop.state.events.clear();
            }
            Link::V5(_, eventloop) => {
                eventloop
                    .pending
                    .retain(|request| !matches!(request, rumqttc::v5::Request::Publish(_)));
                eventloop.state.events.clear();
            }
        }
    }
}

/// rumqttc hands out packet ids 1..=inflight in a cycle and holds a publish back
/// ("collision") when its id is still unacknowledged. The sink keeps at most
/// `max_inflight` publishes outstanding; giving rumqttc twice that many ids means an id
/// comes round again only after `max_inflight` newer publishes, by which time a broker
/// that acks in order has acked it. (A held-back publish that is never released ends the
/// connection after two keepalives; seen under heavy load with equal windows.)
fn packet_id_window(max_inflight: u16) -> u16 {
    max_inflight.saturating_mul(2)
}

fn outgoing_event(outgoing: Outgoing) -> LinkEvent {
    match outgoing {
        Outgoing::Publish(packet_id) => LinkEvent::Sent { packet_id },
        Outgoing::AwaitAck(packet_id) => LinkEvent::HeldBack { packet_id },
        Outgoing::Disconnect => LinkEvent::DisconnectSent,
        _ => LinkEvent::Other,
    }
}

fn qos_v4(qos: Qos) -> rumqttc::QoS {
    match qos.0 {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn qos_v5(qos: Qos) -> rumqttc::v5::mqttbytes::QoS {
    match qos.0 {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}
