//! MQTT packets in protocol-neutral terms, encoded and decoded with rumqttc's codec
//! (`rumqttc::mqttbytes` for 3.1.1, `rumqttc::v5::mqttbytes` for 5.0).
//!
//! The sink's state machine speaks only [`Incoming`] and the `Codec::write_*` calls, so
//! its logic is written once and only this module knows the two wire formats. Reason
//! codes are kept as their numeric MQTT 5 values (3.1.1 acks are always `0x00`).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rumqttc::mqttbytes::{QoS as QoS4, v4};
use rumqttc::v5::mqttbytes::{QoS as QoS5, v5};

use super::config::MqttProtocol;

/// Largest packet the gateway accepts from the broker (commands are small).
pub const MAX_INCOMING_PACKET: u32 = 1 << 20;

/// A packet from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// CONNACK.
    ConnAck(ConnAckInfo),
    /// PUBACK with its reason code.
    PubAck {
        /// Packet id.
        id: u16,
        /// Reason code (0x00 success, 0x10 no subscribers, >= 0x80 failure).
        code: u8,
    },
    /// PUBREC with its reason code.
    PubRec {
        /// Packet id.
        id: u16,
        /// Reason code.
        code: u8,
    },
    /// PUBREL (for a QoS 2 message the broker sent us).
    PubRel {
        /// Packet id.
        id: u16,
    },
    /// PUBCOMP with its reason code.
    PubComp {
        /// Packet id.
        id: u16,
        /// Reason code (0x92: packet identifier not found).
        code: u8,
    },
    /// A message on a subscribed topic.
    Publish {
        /// Packet id (0 for QoS 0).
        id: u16,
        /// QoS 0, 1 or 2.
        qos: u8,
        /// Topic name.
        topic: String,
        /// Payload.
        payload: Bytes,
    },
    /// SUBACK with one return code per filter.
    SubAck {
        /// Return codes (>= 0x80 is a failure).
        codes: Vec<u8>,
    },
    /// PINGRESP.
    PingResp,
    /// DISCONNECT from the broker (MQTT 5) with its reason code.
    Disconnect {
        /// Reason code.
        code: u8,
    },
    /// A packet a client never expects (CONNECT, SUBSCRIBE, ...).
    Unexpected(&'static str),
}

/// What the broker said in CONNACK.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnAckInfo {
    /// The broker resumed our session.
    pub session_present: bool,
    /// 0 on success; the 3.1.1 return code or the MQTT 5 reason code otherwise.
    pub code: u8,
    /// MQTT 5: largest packet the broker accepts.
    pub max_packet_size: Option<u32>,
    /// MQTT 5: most unacknowledged QoS 1/2 publishes the broker accepts.
    pub receive_maximum: Option<u16>,
    /// MQTT 5: highest QoS the broker supports.
    pub max_qos: Option<u8>,
    /// MQTT 5: keepalive the broker wants instead of ours.
    pub server_keep_alive: Option<u16>,
}

/// An encoding or decoding failure.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The broker sent bytes that are not MQTT.
    #[error("malformed packet from the broker: {0}")]
    Malformed(String),
    /// A packet to send exceeds the broker's limit.
    #[error("packet of {size} bytes exceeds the broker's maximum of {max}")]
    TooLarge {
        /// Encoded size.
        size: usize,
        /// The limit.
        max: usize,
    },
}

/// One outgoing publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishOut<'a> {
    /// Topic name.
    pub topic: &'a str,
    /// Payload.
    pub payload: &'a [u8],
    /// QoS 0, 1 or 2.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
    /// Redelivery of an unacknowledged publish.
    pub dup: bool,
    /// Packet id (ignored for QoS 0).
    pub id: u16,
    /// Event id, sent as the MQTT 5 user property `id`.
    pub event_id: Option<&'a str>,
}

/// What CONNECT carries.
#[derive(Debug, Clone)]
pub struct ConnectOut<'a> {
    /// Client id.
    pub client_id: &'a str,
    /// Keepalive in seconds.
    pub keep_alive: u16,
    /// Clean session (3.1.1) / clean start (5).
    pub clean: bool,
    /// MQTT 5 session expiry in seconds (0 with a clean session).
    pub session_expiry: u32,
    /// User name and password.
    pub credentials: Option<(&'a str, &'a str)>,
    /// Topic of the retained `offline` will.
    pub will_topic: &'a str,
    /// MQTT 5: most QoS 1/2 publishes we accept unacknowledged.
    pub receive_maximum: u16,
}

/// The codec of one protocol version.
#[derive(Debug, Clone, Copy)]
pub struct Codec {
    protocol: MqttProtocol,
}

fn qos_v4(qos: u8) -> QoS4 {
    match qos {
        0 => QoS4::AtMostOnce,
        1 => QoS4::AtLeastOnce,
        _ => QoS4::ExactlyOnce,
    }
}

fn qos_v5(qos: u8) -> QoS5 {
    match qos {
        0 => QoS5::AtMostOnce,
        1 => QoS5::AtLeastOnce,
        _ => QoS5::ExactlyOnce,
    }
}

fn malformed(err: impl std::fmt::Display) -> CodecError {
    CodecError::Malformed(err.to_string())
}

impl Codec {
    /// The codec for `protocol`.
    pub fn new(protocol: MqttProtocol) -> Self {
        Self { protocol }
    }

    /// Decodes the next complete packet from `buffer`, or `None` when more bytes are needed.
    pub fn read(&self, buffer: &mut BytesMut) -> Result<Option<Incoming>, CodecError> {
        if buffer.is_empty() {
            return Ok(None);
        }
        match self.protocol {
            MqttProtocol::V311 => match v4::Packet::read(buffer, MAX_INCOMING_PACKET as usize) {
                Ok(packet) => Ok(Some(incoming_v4(packet))),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                Err(err) => Err(malformed(err)),
            },
            MqttProtocol::V5 => {
                if let Some(disconnect) = short_disconnect_v5(buffer) {
                    return Ok(Some(disconnect));
                }
                match v5::Packet::read(buffer, Some(MAX_INCOMING_PACKET)) {
                    Ok(packet) => Ok(Some(incoming_v5(packet))),
                    Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                    Err(err) => Err(malformed(err)),
                }
            }
        }
    }

    /// Appends CONNECT with a retained QoS 1 `offline` will.
    pub fn write_connect(&self, connect: &ConnectOut<'_>, out: &mut BytesMut) {
        let written = match self.protocol {
            MqttProtocol::V311 => {
                let mut packet = v4::Connect::new(connect.client_id);
                packet.keep_alive = connect.keep_alive;
                packet.clean_session = connect.clean;
                packet.last_will = Some(v4::LastWill::new(
                    connect.will_topic,
                    "offline",
                    QoS4::AtLeastOnce,
                    true,
                ));
                if let Some((user, password)) = connect.credentials {
                    packet.set_login(user, password);
                }
                v4::Packet::Connect(packet)
                    .write(out, usize::MAX)
                    .map_err(malformed)
            }
            MqttProtocol::V5 => {
                let mut properties = v5::ConnectProperties::new();
                properties.session_expiry_interval =
                    (!connect.clean).then_some(connect.session_expiry);
                properties.receive_maximum = Some(connect.receive_maximum);
                properties.max_packet_size = Some(MAX_INCOMING_PACKET);
                let packet = v5::Connect {
                    keep_alive: connect.keep_alive,
                    client_id: connect.client_id.to_owned(),
                    clean_start: connect.clean,
                    properties: Some(properties),
                };
                let will =
                    v5::LastWill::new(connect.will_topic, "offline", QoS5::AtLeastOnce, true, None);
                let login = connect
                    .credentials
                    .map(|(user, password)| v5::Login::new(user, password));
                v5::Packet::Connect(packet, Some(will), login)
                    .write(out, None)
                    .map_err(malformed)
            }
        };
        if let Err(err) = written {
            // Only a client id or credentials beyond 64 KiB can fail here; the broker will
            // then refuse the truncated CONNECT and the sink reports the refusal.
            tracing::error!(error = %err, "cannot encode CONNECT");
        }
    }

    /// Appends a PUBLISH unless it exceeds `max_size` bytes; returns its encoded size.
    pub fn write_publish(
        &self,
        publish: &PublishOut<'_>,
        max_size: usize,
        out: &mut BytesMut,
    ) -> Result<usize, CodecError> {
        let size = self.publish_size(publish);
        if size > max_size {
            return Err(CodecError::TooLarge {
                size,
                max: max_size,
            });
        }
        match self.protocol {
            MqttProtocol::V311 => write_publish_v4(publish, size, out)?,
            MqttProtocol::V5 => {
                let packet = self.publish_v5(publish);
                packet.write(out).map_err(malformed)?;
            }
        }
        Ok(size)
    }

    /// Encoded size of a PUBLISH, fixed header included.
    pub fn publish_size(&self, publish: &PublishOut<'_>) -> usize {
        match self.protocol {
            MqttProtocol::V311 => {
                // Topic length prefix + topic + packet id (QoS > 0) + payload.
                let remaining = 2
                    + publish.topic.len()
                    + if publish.qos > 0 { 2 } else { 0 }
                    + publish.payload.len();
                1 + remaining_length_len(remaining) + remaining
            }
            MqttProtocol::V5 => v5::Packet::Publish(self.publish_v5(publish)).size(),
        }
    }

    fn publish_v5(&self, publish: &PublishOut<'_>) -> v5::Publish {
        let properties = publish.event_id.map(|id| v5::PublishProperties {
            user_properties: vec![("id".to_owned(), id.to_owned())],
            ..Default::default()
        });
        v5::Publish {
            dup: publish.dup,
            qos: qos_v5(publish.qos),
            retain: publish.retain,
            topic: Bytes::copy_from_slice(publish.topic.as_bytes()),
            pkid: if publish.qos == 0 { 0 } else { publish.id },
            payload: Bytes::copy_from_slice(publish.payload),
            properties,
        }
    }

    /// Appends PUBACK (success) for a message the broker sent us.
    pub fn write_puback(&self, id: u16, out: &mut BytesMut) {
        let written = match self.protocol {
            MqttProtocol::V311 => v4::PubAck::new(id).write(out).map_err(malformed),
            MqttProtocol::V5 => v5::PubAck::new(id, None).write(out).map_err(malformed),
        };
        log_write_failure("PUBACK", written);
    }

    /// Appends PUBREC (success) for a QoS 2 message the broker sent us.
    pub fn write_pubrec(&self, id: u16, out: &mut BytesMut) {
        let written = match self.protocol {
            MqttProtocol::V311 => v4::PubRec::new(id).write(out).map_err(malformed),
            MqttProtocol::V5 => v5::PubRec::new(id, None).write(out).map_err(malformed),
        };
        log_write_failure("PUBREC", written);
    }

    /// Appends PUBREL for one of our QoS 2 publishes.
    pub fn write_pubrel(&self, id: u16, out: &mut BytesMut) {
        let written = match self.protocol {
            MqttProtocol::V311 => v4::PubRel::new(id).write(out).map_err(malformed),
            MqttProtocol::V5 => v5::PubRel::new(id, None).write(out).map_err(malformed),
        };
        log_write_failure("PUBREL", written);
    }

    /// Appends PUBCOMP for a QoS 2 message the broker sent us.
    pub fn write_pubcomp(&self, id: u16, out: &mut BytesMut) {
        let written = match self.protocol {
            MqttProtocol::V311 => v4::PubComp::new(id).write(out).map_err(malformed),
            MqttProtocol::V5 => v5::PubComp::new(id, None).write(out).map_err(malformed),
        };
        log_write_failure("PUBCOMP", written);
    }

    /// Appends SUBSCRIBE for one filter.
    pub fn write_subscribe(&self, id: u16, filter: &str, qos: u8, out: &mut BytesMut) {
        let written = match self.protocol {
            MqttProtocol::V311 => {
                let mut packet = v4::Subscribe::new(filter, qos_v4(qos));
                packet.pkid = id;
                packet.write(out).map_err(malformed)
            }
            MqttProtocol::V5 => {
                let mut packet = v5::Subscribe::new(v5::Filter::new(filter, qos_v5(qos)), None);
                packet.pkid = id;
                packet.write(out).map_err(malformed)
            }
        };
        log_write_failure("SUBSCRIBE", written);
    }

    /// Appends PINGREQ.
    pub fn write_pingreq(&self, out: &mut BytesMut) {
        let written = match self.protocol {
            MqttProtocol::V311 => v4::PingReq.write(out).map_err(malformed),
            MqttProtocol::V5 => v5::PingReq::write(out).map_err(malformed),
        };
        log_write_failure("PINGREQ", written);
    }

    /// Appends a normal DISCONNECT (the broker then drops our will).
    pub fn write_disconnect(&self, out: &mut BytesMut) {
        let written = match self.protocol {
            MqttProtocol::V311 => v4::Disconnect.write(out).map_err(malformed),
            MqttProtocol::V5 => v5::Disconnect::new(v5::DisconnectReasonCode::NormalDisconnection)
                .write(out)
                .map_err(malformed),
        };
        log_write_failure("DISCONNECT", written);
    }
}

/// A v5 DISCONNECT with no properties: remaining length 0 (normal disconnection) or 1 (a
/// reason code only), both allowed by MQTT 5 §3.14.2.1 and sent by mosquitto. rumqttc's
/// decoder wants a property length, so these are read here.
fn short_disconnect_v5(buffer: &mut BytesMut) -> Option<Incoming> {
    const DISCONNECT: u8 = 0xE0;
    match buffer.as_ref() {
        [DISCONNECT, 0, ..] => {
            buffer.advance(2);
            Some(Incoming::Disconnect { code: 0 })
        }
        [DISCONNECT, 1, code, ..] => {
            let code = *code;
            buffer.advance(3);
            Some(Incoming::Disconnect { code })
        }
        _ => None,
    }
}

fn log_write_failure(packet: &str, written: Result<usize, CodecError>) {
    if let Err(err) = written {
        tracing::error!(packet, error = %err, "cannot encode packet");
    }
}

/// Writes an MQTT 3.1.1 PUBLISH (§3.3) of `size` bytes in all (from `publish_size`)
/// straight into `out`: the codec crate's `v4::Publish` would need an owned topic `String`
/// and payload `Bytes` per publish, two allocations on the hot path for the same bytes.
fn write_publish_v4(
    publish: &PublishOut<'_>,
    size: usize,
    out: &mut BytesMut,
) -> Result<(), CodecError> {
    let topic_len = u16::try_from(publish.topic.len())
        .map_err(|_| malformed("topic longer than 65,535 bytes"))?;
    let packet_id_len = if publish.qos > 0 { 2 } else { 0 };
    let remaining = 2 + publish.topic.len() + packet_id_len + publish.payload.len();
    let flags =
        (u8::from(publish.dup) << 3) | ((publish.qos & 0b11) << 1) | u8::from(publish.retain);
    out.reserve(size);
    out.put_u8(0x30 | flags);
    write_remaining_length(remaining, out);
    out.put_u16(topic_len);
    out.put_slice(publish.topic.as_bytes());
    if publish.qos > 0 {
        out.put_u16(publish.id);
    }
    out.put_slice(publish.payload);
    Ok(())
}

/// The variable-length "remaining length" of a fixed header (MQTT §2.2.3).
fn write_remaining_length(mut len: usize, out: &mut BytesMut) {
    loop {
        let digit = u8::try_from(len % 128).unwrap_or_default();
        len /= 128;
        if len == 0 {
            out.put_u8(digit);
            return;
        }
        out.put_u8(digit | 0x80);
    }
}

fn remaining_length_len(len: usize) -> usize {
    match len {
        0..128 => 1,
        128..16_384 => 2,
        16_384..2_097_152 => 3,
        _ => 4,
    }
}

fn incoming_v4(packet: v4::Packet) -> Incoming {
    match packet {
        v4::Packet::ConnAck(ack) => Incoming::ConnAck(ConnAckInfo {
            session_present: ack.session_present,
            code: ack.code as u8,
            ..ConnAckInfo::default()
        }),
        v4::Packet::PubAck(ack) => Incoming::PubAck {
            id: ack.pkid,
            code: 0,
        },
        v4::Packet::PubRec(ack) => Incoming::PubRec {
            id: ack.pkid,
            code: 0,
        },
        v4::Packet::PubRel(rel) => Incoming::PubRel { id: rel.pkid },
        v4::Packet::PubComp(ack) => Incoming::PubComp {
            id: ack.pkid,
            code: 0,
        },
        v4::Packet::Publish(publish) => Incoming::Publish {
            id: publish.pkid,
            qos: publish.qos as u8,
            topic: publish.topic,
            payload: publish.payload,
        },
        v4::Packet::SubAck(ack) => Incoming::SubAck {
            codes: ack
                .return_codes
                .iter()
                .map(|code| match code {
                    v4::SubscribeReasonCode::Success(qos) => *qos as u8,
                    v4::SubscribeReasonCode::Failure => 0x80,
                })
                .collect(),
        },
        v4::Packet::PingResp => Incoming::PingResp,
        v4::Packet::UnsubAck(_) => Incoming::Unexpected("UNSUBACK"),
        v4::Packet::Connect(_) => Incoming::Unexpected("CONNECT"),
        v4::Packet::Subscribe(_) => Incoming::Unexpected("SUBSCRIBE"),
        v4::Packet::Unsubscribe(_) => Incoming::Unexpected("UNSUBSCRIBE"),
        v4::Packet::PingReq => Incoming::Unexpected("PINGREQ"),
        v4::Packet::Disconnect => Incoming::Unexpected("DISCONNECT"),
    }
}

fn incoming_v5(packet: v5::Packet) -> Incoming {
    match packet {
        v5::Packet::ConnAck(ack) => {
            let mut info = ConnAckInfo {
                session_present: ack.session_present,
                code: connack_code_v5(ack.code),
                ..ConnAckInfo::default()
            };
            if let Some(properties) = ack.properties {
                info.max_packet_size = properties.max_packet_size;
                info.receive_maximum = properties.receive_max;
                info.max_qos = properties.max_qos;
                info.server_keep_alive = properties.server_keep_alive;
            }
            Incoming::ConnAck(info)
        }
        v5::Packet::PubAck(ack) => Incoming::PubAck {
            id: ack.pkid,
            code: puback_code(ack.reason),
        },
        v5::Packet::PubRec(ack) => Incoming::PubRec {
            id: ack.pkid,
            code: pubrec_code(ack.reason),
        },
        v5::Packet::PubRel(rel) => Incoming::PubRel { id: rel.pkid },
        v5::Packet::PubComp(ack) => Incoming::PubComp {
            id: ack.pkid,
            code: match ack.reason {
                v5::PubCompReason::Success => 0x00,
                v5::PubCompReason::PacketIdentifierNotFound => 0x92,
            },
        },
        v5::Packet::Publish(publish) => Incoming::Publish {
            id: publish.pkid,
            qos: publish.qos as u8,
            topic: String::from_utf8_lossy(&publish.topic).into_owned(),
            payload: publish.payload,
        },
        v5::Packet::SubAck(ack) => Incoming::SubAck {
            codes: ack
                .return_codes
                .iter()
                .map(|code| match code {
                    v5::SubscribeReasonCode::Success(qos) => *qos as u8,
                    _ => 0x80,
                })
                .collect(),
        },
        v5::Packet::PingResp(_) => Incoming::PingResp,
        v5::Packet::Disconnect(disconnect) => Incoming::Disconnect {
            code: disconnect.reason_code as u8,
        },
        v5::Packet::UnsubAck(_) => Incoming::Unexpected("UNSUBACK"),
        v5::Packet::Auth(_) => Incoming::Unexpected("AUTH"),
        v5::Packet::Connect(..) => Incoming::Unexpected("CONNECT"),
        v5::Packet::Subscribe(_) => Incoming::Unexpected("SUBSCRIBE"),
        v5::Packet::Unsubscribe(_) => Incoming::Unexpected("UNSUBSCRIBE"),
        v5::Packet::PingReq(_) => Incoming::Unexpected("PINGREQ"),
    }
}

fn connack_code_v5(code: v5::ConnectReturnCode) -> u8 {
    use v5::ConnectReturnCode as Code;
    match code {
        Code::Success => 0x00,
        Code::RefusedProtocolVersion => 0x84,
        Code::BadClientId => 0x85,
        Code::ServiceUnavailable => 0x88,
        Code::UnspecifiedError => 0x80,
        Code::MalformedPacket => 0x81,
        Code::ProtocolError => 0x82,
        Code::ImplementationSpecificError => 0x83,
        Code::UnsupportedProtocolVersion => 0x84,
        Code::ClientIdentifierNotValid => 0x85,
        Code::BadUserNamePassword => 0x86,
        Code::NotAuthorized => 0x87,
        Code::ServerUnavailable => 0x88,
        Code::ServerBusy => 0x89,
        Code::Banned => 0x8A,
        Code::BadAuthenticationMethod => 0x8C,
        Code::TopicNameInvalid => 0x90,
        Code::PacketTooLarge => 0x95,
        Code::QuotaExceeded => 0x97,
        Code::PayloadFormatInvalid => 0x99,
        Code::RetainNotSupported => 0x9A,
        Code::QoSNotSupported => 0x9B,
        Code::UseAnotherServer => 0x9C,
        Code::ServerMoved => 0x9D,
        Code::ConnectionRateExceeded => 0x9F,
    }
}

fn puback_code(reason: v5::PubAckReason) -> u8 {
    use v5::PubAckReason as Reason;
    match reason {
        Reason::Success => 0x00,
        Reason::NoMatchingSubscribers => 0x10,
        Reason::UnspecifiedError => 0x80,
        Reason::ImplementationSpecificError => 0x83,
        Reason::NotAuthorized => 0x87,
        Reason::TopicNameInvalid => 0x90,
        Reason::PacketIdentifierInUse => 0x91,
        Reason::QuotaExceeded => 0x97,
        Reason::PayloadFormatInvalid => 0x99,
    }
}

fn pubrec_code(reason: v5::PubRecReason) -> u8 {
    use v5::PubRecReason as Reason;
    match reason {
        Reason::Success => 0x00,
        Reason::NoMatchingSubscribers => 0x10,
        Reason::UnspecifiedError => 0x80,
        Reason::ImplementationSpecificError => 0x83,
        Reason::NotAuthorized => 0x87,
        Reason::TopicNameInvalid => 0x90,
        Reason::PacketIdentifierInUse => 0x91,
        Reason::QuotaExceeded => 0x97,
        Reason::PayloadFormatInvalid => 0x99,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(topic: &str, payload: &Bytes, qos: u8) -> PublishOut<'static> {
        PublishOut {
            topic: Box::leak(topic.to_owned().into_boxed_str()),
            payload: Box::leak(payload.to_vec().into_boxed_slice()),
            qos,
            retain: false,
            dup: true,
            id: 7,
            event_id: Some("ev-1"),
        }
    }

    #[test]
    fn publish_size_matches_the_encoding() {
        for protocol in [MqttProtocol::V311, MqttProtocol::V5] {
            let codec = Codec::new(protocol);
            for len in [0, 1, 100, 127, 128, 5000, 20_000] {
                let payload = Bytes::from(vec![b'x'; len]);
                for qos in 0..=2 {
                    let out = publish("a/b", &payload, qos);
                    let mut buffer = BytesMut::new();
                    let size = codec
                        .write_publish(&out, usize::MAX, &mut buffer)
                        .expect("fits");
                    assert_eq!(size, buffer.len(), "{protocol:?} len {len} qos {qos}");
                }
            }
        }
    }

    #[test]
    fn v311_publish_is_byte_for_byte_the_codec_crates() {
        let codec = Codec::new(MqttProtocol::V311);
        let long_topic = "t/".repeat(100);
        // Remaining lengths of one to three bytes; every flag combination.
        for (topic, len) in [
            ("a/b", 0),
            ("a/b", 120),
            (long_topic.as_str(), 16_300),
            ("x", 20_000),
        ] {
            let payload = Bytes::from(vec![b'p'; len]);
            for qos in 0..=2u8 {
                for (dup, retain) in [(false, false), (true, false), (false, true), (true, true)] {
                    let mut ours = BytesMut::new();
                    let out = PublishOut {
                        dup,
                        retain,
                        ..publish(topic, &payload, qos)
                    };
                    codec
                        .write_publish(&out, usize::MAX, &mut ours)
                        .expect("fits");
                    let mut theirs = BytesMut::new();
                    v4::Publish {
                        dup,
                        qos: qos_v4(qos),
                        retain,
                        topic: topic.to_owned(),
                        pkid: if qos == 0 { 0 } else { 7 },
                        payload: payload.clone(),
                    }
                    .write(&mut theirs)
                    .expect("encodes");
                    assert_eq!(
                        ours, theirs,
                        "len {len} qos {qos} dup {dup} retain {retain}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_publish_over_the_limit_is_refused_before_writing() {
        let codec = Codec::new(MqttProtocol::V5);
        let payload = Bytes::from(vec![b'x'; 6000]);
        let mut buffer = BytesMut::new();
        let err = codec
            .write_publish(&publish("t", &payload, 1), 4000, &mut buffer)
            .expect_err("too large");
        assert!(matches!(err, CodecError::TooLarge { max: 4000, .. }));
        assert!(buffer.is_empty());
    }

    #[test]
    fn v5_acks_keep_their_reason_codes() {
        let codec = Codec::new(MqttProtocol::V5);
        let mut wire = BytesMut::new();
        let mut ack = v5::PubAck::new(3, None);
        ack.reason = v5::PubAckReason::NotAuthorized;
        ack.write(&mut wire).expect("encodes");
        let mut rec = v5::PubRec::new(4, None);
        rec.reason = v5::PubRecReason::QuotaExceeded;
        rec.write(&mut wire).expect("encodes");
        assert_eq!(
            codec.read(&mut wire).expect("valid"),
            Some(Incoming::PubAck { id: 3, code: 0x87 })
        );
        assert_eq!(
            codec.read(&mut wire).expect("valid"),
            Some(Incoming::PubRec { id: 4, code: 0x97 })
        );
        assert_eq!(codec.read(&mut wire).expect("empty"), None);
    }

    #[test]
    fn a_v5_disconnect_without_properties_is_read() {
        let codec = Codec::new(MqttProtocol::V5);
        let mut wire = BytesMut::from(&[0xE0u8, 0x01, 0x95, 0xE0, 0x00][..]);
        assert_eq!(
            codec.read(&mut wire).expect("valid"),
            Some(Incoming::Disconnect { code: 0x95 })
        );
        assert_eq!(
            codec.read(&mut wire).expect("valid"),
            Some(Incoming::Disconnect { code: 0 })
        );
        // A DISCONNECT whose reason code has not arrived yet waits for it.
        let mut partial = BytesMut::from(&[0xE0u8, 0x01][..]);
        assert_eq!(codec.read(&mut partial).expect("incomplete"), None);
    }

    #[test]
    fn partial_packets_wait_for_more_bytes_and_garbage_is_an_error() {
        let codec = Codec::new(MqttProtocol::V311);
        let mut wire = BytesMut::new();
        v4::PubAck::new(9).write(&mut wire).expect("encodes");
        let mut partial = BytesMut::from(&wire[..2]);
        assert_eq!(codec.read(&mut partial).expect("incomplete"), None);
        partial.extend_from_slice(&wire[2..]);
        assert_eq!(
            codec.read(&mut partial).expect("complete"),
            Some(Incoming::PubAck { id: 9, code: 0 })
        );
        let mut garbage = BytesMut::from(&[0x00u8, 0x02, 0xff, 0xff][..]);
        assert!(codec.read(&mut garbage).is_err());
    }
}
