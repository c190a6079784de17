//! MQTT packets in protocol-neutral terms, over rumqttc's codec (`rumqttc::mqttbytes::v4`
//! for 3.1.1, `rumqttc::v5::mqttbytes::v5` for 5.0), the same codec the gateway's cloud
//! client uses, read here from the server's side.
//!
//! rumqttc decodes what a client sends to a broker, but a server must check more than a
//! client does, so [`decode`] wraps it: the fixed header is parsed first and a packet
//! larger than the limit is refused before any of it is buffered beyond its header; the
//! first packet must be CONNECT, and its protocol name and level are read here (an
//! unknown level gets CONNACK 0x01/0x84, rumqttc would only fail); reserved flag bits
//! of the fixed header, of CONNECT and of SUBSCRIBE options are checked (3.1.1 §2.2.2,
//! §3.1.2.3, §3.8.3.1; 5.0 §2.1.3, §3.1.2.3, §3.8.3.1); server-to-client packets from a
//! client are protocol errors; v5 topic names are checked to be UTF-8. Arbitrary bytes
//! never panic (a property test feeds it garbage).
//!
//! Reason codes stay numeric (MQTT 5 values; 3.1.1 return codes where a 3.1.1 packet
//! carries one) and are mapped to rumqttc's enums only when encoding.

use bytes::{Buf, Bytes, BytesMut};
use rumqttc::mqttbytes::{QoS as QoS4, v4};
use rumqttc::v5::mqttbytes::{QoS as QoS5, v5};

/// Protocol version of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

/// Why bytes from a client are not a packet the broker accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Larger than the broker's maximum packet size (5.0 reason 0x95).
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Size announced by the fixed header.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Not a well-formed packet (5.0 reason 0x81).
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// Well-formed but not allowed here (5.0 reason 0x82).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A CONNECT with a protocol level the broker does not speak (CONNACK 0x01 / 0x84).
    #[error("unsupported protocol level {0}")]
    UnsupportedVersion(u8),
}

impl DecodeError {
    /// The MQTT 5 reason code for a DISCONNECT or CONNACK reporting this error.
    pub fn reason_code(&self) -> u8 {
        match self {
            DecodeError::TooLarge { .. } => 0x95,
            DecodeError::Malformed(_) => 0x81,
            DecodeError::Protocol(_) => 0x82,
            DecodeError::UnsupportedVersion(_) => 0x84,
        }
    }
}

/// MQTT 5 properties a publish (or will) carries to its subscribers unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageProperties {
    /// Payload format indicator (1 = UTF-8).
    pub payload_format: Option<u8>,
    /// Message expiry interval in seconds, as published.
    pub expiry_interval: Option<u32>,
    /// Content type.
    pub content_type: Option<String>,
    /// Response topic (request/response).
    pub response_topic: Option<String>,
    /// Correlation data (request/response).
    pub correlation_data: Option<Bytes>,
    /// User properties, in order.
    pub user_properties: Vec<(String, String)>,
}

/// An application message: a publish after topic-alias resolution, or a will.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS as published.
    pub qos: u8,
    /// RETAIN flag as published.
    pub retain: bool,
    /// MQTT 5 properties passed through.
    pub properties: MessageProperties,
}

/// A will and its delay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// What to publish.
    pub message: Message,
    /// MQTT 5 will delay interval in seconds.
    pub delay_interval: u32,
}

/// CONNECT of either version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Protocol version.
    pub version: Version,
    /// Client identifier (may be empty).
    pub client_id: String,
    /// Clean session (3.1.1) / clean start (5.0).
    pub clean_start: bool,
    /// Keep alive in seconds (0 = none).
    pub keep_alive: u16,
    /// User name, when given and non-empty.
    pub username: Option<String>,
    /// Password, when given and non-empty.
    pub password: Option<String>,
    /// Will, if any.
    pub will: Option<Will>,
    /// MQTT 5 session expiry interval; `None` on 3.1.1.
    pub session_expiry: Option<u32>,
    /// MQTT 5 receive maximum (65535 when absent).
    pub receive_maximum: u16,
    /// MQTT 5 maximum packet size the client accepts.
    pub max_packet_size: Option<u32>,
    /// MQTT 5 topic alias maximum the client accepts from us.
    pub topic_alias_maximum: u16,
    /// MQTT 5 enhanced authentication method (refused: not supported).
    pub authentication_method: Option<String>,
}

/// PUBLISH from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Packet id (0 for QoS 0).
    pub id: u16,
    /// DUP flag.
    pub dup: bool,
    /// QoS.
    pub qos: u8,
    /// RETAIN flag.
    pub retain: bool,
    /// Topic name; empty when a topic alias stands for it.
    pub topic: String,
    /// MQTT 5 topic alias.
    pub topic_alias: Option<u16>,
    /// Payload.
    pub payload: Bytes,
    /// MQTT 5 properties.
    pub properties: MessageProperties,
    /// Whether the client sent a subscription identifier (a protocol error).
    pub has_subscription_ids: bool,
}

/// One filter of a SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeFilter {
    /// Topic filter as sent (may be `$share/...`).
    pub filter: String,
    /// Requested QoS.
    pub qos: u8,
    /// No local (5.0).
    pub no_local: bool,
    /// Retain as published (5.0).
    pub retain_as_published: bool,
    /// Retain handling: 0 send on subscribe, 1 only if new, 2 never (5.0).
    pub retain_handling: u8,
}

/// A packet from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// CONNECT.
    Connect(Box<Connect>),
    /// PUBLISH.
    Publish(Publish),
    /// PUBACK.
    PubAck {
        /// Packet id.
        id: u16,
    },
    /// PUBREC.
    PubRec {
        /// Packet id.
        id: u16,
        /// Reason code (>= 0x80: the client refused the message).
        reason: u8,
    },
    /// PUBREL.
    PubRel {
        /// Packet id.
        id: u16,
    },
    /// PUBCOMP.
    PubComp {
        /// Packet id.
        id: u16,
    },
    /// SUBSCRIBE.
    Subscribe {
        /// Packet id.
        id: u16,
        /// MQTT 5 subscription identifier.
        subscription_id: Option<u32>,
        /// Filters, at least one.
        filters: Vec<SubscribeFilter>,
    },
    /// UNSUBSCRIBE.
    Unsubscribe {
        /// Packet id.
        id: u16,
        /// Filters, at least one.
        filters: Vec<String>,
    },
    /// PINGREQ.
    PingReq,
    /// DISCONNECT.
    Disconnect {
        /// Reason code (0 on 3.1.1).
        reason: u8,
        /// MQTT 5 session expiry interval update.
        session_expiry: Option<u32>,
    },
}

fn malformed(err: impl std::fmt::Display) -> DecodeError {
    DecodeError::Malformed(err.to_string())
}

/// Fixed header: (first byte, header length, remaining length); `Ok(None)` when more
/// bytes are needed.
fn fixed_header(buf: &[u8]) -> Result<Option<(u8, usize, usize)>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut remaining = 0usize;
    for index in 0..4 {
        let Some(&byte) = buf.get(1 + index) else {
            return Ok(None);
        };
        remaining |= usize::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            return Ok(Some((first, 2 + index, remaining)));
        }
    }
    Err(malformed("remaining length longer than 4 bytes"))
}

/// Checks the flag bits of the fixed header (3.1.1 §2.2.2, 5.0 §2.1.3).
fn check_flags(first: u8) -> Result<(), DecodeError> {
    let (kind, flags) = (first >> 4, first & 0x0f);
    match kind {
        3 => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                return Err(malformed("PUBLISH with QoS 3"));
            }
            if qos == 0 && flags & 0b1000 != 0 {
                return Err(malformed("PUBLISH QoS 0 with DUP set"));
            }
            Ok(())
        }
        6 | 8 | 10 if flags == 0b0010 => Ok(()),
        6 | 8 | 10 => Err(malformed("reserved fixed header flags must be 0010")),
        1 | 4 | 5 | 7 | 12 | 14 if flags == 0 => Ok(()),
        1 | 4 | 5 | 7 | 12 | 14 => Err(malformed("reserved fixed header flags must be 0")),
        2 | 9 | 11 | 13 => Err(DecodeError::Protocol(
            "a client sent a packet only a server sends",
        )),
        15 => Err(DecodeError::Protocol(
            "AUTH: enhanced authentication is not supported",
        )),
        _ => Err(malformed("packet type 0 is reserved")),
    }
}

fn read_u16(body: &mut &[u8]) -> Result<u16, DecodeError> {
    if body.len() < 2 {
        return Err(malformed("truncated"));
    }
    Ok(body.get_u16())
}

fn read_string<'a>(body: &mut &'a [u8]) -> Result<&'a [u8], DecodeError> {
    let len = usize::from(read_u16(body)?);
    if body.len() < len {
        return Err(malformed("string crosses the packet end"));
    }
    let (string, rest) = body.split_at(len);
    *body = rest;
    Ok(string)
}

fn skip_varint(body: &mut &[u8]) -> Result<usize, DecodeError> {
    let mut value = 0usize;
    for index in 0..4 {
        if body.is_empty() {
            return Err(malformed("truncated property length"));
        }
        let byte = body.get_u8();
        value |= usize::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(malformed("property length longer than 4 bytes"))
}

/// Protocol name/level and connect flags of a CONNECT body; picks the version.
fn connect_version(body: &[u8]) -> Result<Version, DecodeError> {
    let mut cursor = body;
    let name = read_string(&mut cursor)?;
    if cursor.is_empty() {
        return Err(malformed("CONNECT without protocol level"));
    }
    let level = cursor.get_u8();
    match (name, level) {
        (b"MQTT", 4) => {}
        (b"MQTT", 5) => {}
        (b"MQTT" | b"MQIsdp", level) => return Err(DecodeError::UnsupportedVersion(level)),
        _ => return Err(malformed("protocol name is not MQTT")),
    }
    if cursor.is_empty() {
        return Err(malformed("CONNECT without flags"));
    }
    let flags = cursor.get_u8();
    if flags & 0x01 != 0 {
        return Err(malformed("CONNECT reserved flag set"));
    }
    if level == 4 && flags & 0x40 != 0 && flags & 0x80 == 0 {
        return Err(malformed("3.1.1 CONNECT with a password but no user name"));
    }
    Ok(if level == 4 {
        Version::V311
    } else {
        Version::V5
    })
}

/// Checks the reserved bits of every SUBSCRIBE option byte (bits 2-7 on 3.1.1, 6-7 on
/// 5.0, and retain handling 3 on 5.0).
fn check_subscribe_options(body: &[u8], version: Version) -> Result<(), DecodeError> {
    let mut cursor = body;
    read_u16(&mut cursor)?;
    if version == Version::V5 {
        let len = skip_varint(&mut cursor)?;
        if cursor.len() < len {
            return Err(malformed("properties cross the packet end"));
        }
        cursor = &cursor[len..];
    }
    while !cursor.is_empty() {
        read_string(&mut cursor)?;
        if cursor.is_empty() {
            return Err(malformed("SUBSCRIBE filter without options"));
        }
        let options = cursor.get_u8();
        let reserved = match version {
            Version::V311 => options & 0b1111_1100,
            Version::V5 => options & 0b1100_0000,
        };
        if reserved != 0 || (version == Version::V5 && (options >> 4) & 0b11 == 3) {
            return Err(malformed("reserved SUBSCRIBE option bits set"));
        }
    }
    Ok(())
}

/// Decodes the next packet from `buf`, or `Ok(None)` when it is not complete yet.
///
/// `version` is `None` before CONNECT, which must then be the packet. Packets whose
/// fixed header announces more than `max_packet` bytes are refused at once, so a client
/// cannot make the broker buffer more than that.
pub fn decode(
    buf: &mut BytesMut,
    version: Option<Version>,
    max_packet: usize,
) -> Result<Option<Inbound>, DecodeError> {
    let Some((first, header_len, remaining)) = fixed_header(buf)? else {
        return Ok(None);
    };
    let size = header_len + remaining;
    if size > max_packet {
        return Err(DecodeError::TooLarge {
            size,
            max: max_packet,
        });
    }
    check_flags(first)?;
    let kind = first >> 4;
    if version.is_none() && kind != 1 {
        return Err(DecodeError::Protocol("the first packet must be CONNECT"));
    }
    if version.is_some() && kind == 1 {
        return Err(DecodeError::Protocol("a second CONNECT"));
    }
    if buf.len() < size {
        return Ok(None);
    }
    let mut frame = buf.split_to(size);
    let body = &frame[header_len..];
    let version = match version {
        Some(version) => version,
        None => connect_version(body)?,
    };
    if kind == 8 {
        check_subscribe_options(body, version)?;
    }
    match version {
        Version::V311 => {
            let packet = v4::Packet::read(&mut frame, max_packet).map_err(malformed)?;
            from_v4(packet)
        }
        Version::V5 => {
            if kind == 14 && remaining == 0 {
                return Ok(Some(Inbound::Disconnect {
                    reason: 0,
                    session_expiry: None,
                }));
            }
            let max = u32::try_from(max_packet).unwrap_or(u32::MAX);
            let packet = v5::Packet::read(&mut frame, Some(max)).map_err(malformed)?;
            from_v5(packet)
        }
    }
    .map(Some)
}

fn qos4(qos: QoS4) -> u8 {
    qos as u8
}

fn qos5(qos: QoS5) -> u8 {
    qos as u8
}

fn non_empty(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

fn from_v4(packet: v4::Packet) -> Result<Inbound, DecodeError> {
    Ok(match packet {
        v4::Packet::Connect(connect) => {
            let (username, password) = match connect.login {
                Some(login) => (non_empty(login.username), non_empty(login.password)),
                None => (None, None),
            };
            Inbound::Connect(Box::new(Connect {
                version: Version::V311,
                client_id: connect.client_id,
                clean_start: connect.clean_session,
                keep_alive: connect.keep_alive,
                username,
                password,
                will: connect.last_will.map(|will| Will {
                    message: Message {
                        topic: will.topic,
                        payload: will.message,
                        qos: qos4(will.qos),
                        retain: will.retain,
                        properties: MessageProperties::default(),
                    },
                    delay_interval: 0,
                }),
                session_expiry: None,
                receive_maximum: u16::MAX,
                max_packet_size: None,
                topic_alias_maximum: 0,
                authentication_method: None,
            }))
        }
        v4::Packet::Publish(publish) => Inbound::Publish(Publish {
            id: publish.pkid,
            dup: publish.dup,
            qos: qos4(publish.qos),
            retain: publish.retain,
            topic: publish.topic,
            topic_alias: None,
            payload: publish.payload,
            properties: MessageProperties::default(),
            has_subscription_ids: false,
        }),
        v4::Packet::PubAck(ack) => Inbound::PubAck { id: ack.pkid },
        v4::Packet::PubRec(ack) => Inbound::PubRec {
            id: ack.pkid,
            reason: 0,
        },
        v4::Packet::PubRel(ack) => Inbound::PubRel { id: ack.pkid },
        v4::Packet::PubComp(ack) => Inbound::PubComp { id: ack.pkid },
        v4::Packet::Subscribe(subscribe) => Inbound::Subscribe {
            id: nonzero(subscribe.pkid)?,
            subscription_id: None,
            filters: subscribe
                .filters
                .into_iter()
                .map(|filter| SubscribeFilter {
                    filter: filter.path,
                    qos: qos4(filter.qos),
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                })
                .collect(),
        },
        v4::Packet::Unsubscribe(unsubscribe) => {
            if unsubscribe.topics.is_empty() {
                return Err(malformed("UNSUBSCRIBE without a filter"));
            }
            Inbound::Unsubscribe {
                id: nonzero(unsubscribe.pkid)?,
                filters: unsubscribe.topics,
            }
        }
        v4::Packet::PingReq => Inbound::PingReq,
        v4::Packet::Disconnect => Inbound::Disconnect {
            reason: 0,
            session_expiry: None,
        },
        v4::Packet::ConnAck(_)
        | v4::Packet::SubAck(_)
        | v4::Packet::UnsubAck(_)
        | v4::Packet::PingResp => {
            return Err(DecodeError::Protocol(
                "a client sent a packet only a server sends",
            ));
        }
    })
}

fn nonzero(id: u16) -> Result<u16, DecodeError> {
    if id == 0 {
        Err(malformed("packet id 0"))
    } else {
        Ok(id)
    }
}

fn will_v5(will: v5::LastWill) -> Result<Will, DecodeError> {
    let topic = String::from_utf8(will.topic.to_vec()).map_err(malformed)?;
    let (properties, delay_interval) = match will.properties {
        Some(props) => (
            MessageProperties {
                payload_format: props.payload_format_indicator,
                expiry_interval: props.message_expiry_interval,
                content_type: props.content_type,
                response_topic: props.response_topic,
                correlation_data: props.correlation_data,
                user_properties: props.user_properties,
            },
            props.delay_interval.unwrap_or(0),
        ),
        None => (MessageProperties::default(), 0),
    };
    Ok(Will {
        message: Message {
            topic,
            payload: will.message,
            qos: qos5(will.qos),
            retain: will.retain,
            properties,
        },
        delay_interval,
    })
}

fn from_v5(packet: v5::Packet) -> Result<Inbound, DecodeError> {
    Ok(match packet {
        v5::Packet::Connect(connect, will, login) => {
            let props = connect.properties.unwrap_or_default();
            if props.receive_maximum == Some(0) {
                return Err(DecodeError::Protocol("receive maximum 0"));
            }
            if props.max_packet_size == Some(0) {
                return Err(DecodeError::Protocol("maximum packet size 0"));
            }
            let (username, password) = match login {
                Some(login) => (non_empty(login.username), non_empty(login.password)),
                None => (None, None),
            };
            Inbound::Connect(Box::new(Connect {
                version: Version::V5,
                client_id: connect.client_id,
                clean_start: connect.clean_start,
                keep_alive: connect.keep_alive,
                username,
                password,
                will: will.map(will_v5).transpose()?,
                session_expiry: Some(props.session_expiry_interval.unwrap_or(0)),
                receive_maximum: props.receive_maximum.unwrap_or(u16::MAX),
                max_packet_size: props.max_packet_size,
                topic_alias_maximum: props.topic_alias_max.unwrap_or(0),
                authentication_method: props.authentication_method,
            }))
        }
        v5::Packet::Publish(publish) => {
            let topic = String::from_utf8(publish.topic.to_vec())
                .map_err(|_| malformed("topic is not UTF-8"))?;
            let (properties, topic_alias, has_subscription_ids) = match publish.properties {
                Some(props) => (
                    MessageProperties {
                        payload_format: props.payload_format_indicator,
                        expiry_interval: props.message_expiry_interval,
                        content_type: props.content_type,
                        response_topic: props.response_topic,
                        correlation_data: props.correlation_data,
                        user_properties: props.user_properties,
                    },
                    props.topic_alias,
                    !props.subscription_identifiers.is_empty(),
                ),
                None => (MessageProperties::default(), None, false),
            };
            Inbound::Publish(Publish {
                id: publish.pkid,
                dup: publish.dup,
                qos: qos5(publish.qos),
                retain: publish.retain,
                topic,
                topic_alias,
                payload: publish.payload,
                properties,
                has_subscription_ids,
            })
        }
        v5::Packet::PubAck(ack) => Inbound::PubAck { id: ack.pkid },
        v5::Packet::PubRec(ack) => Inbound::PubRec {
            id: ack.pkid,
            reason: pubrec_code(ack.reason),
        },
        v5::Packet::PubRel(ack) => Inbound::PubRel { id: ack.pkid },
        v5::Packet::PubComp(ack) => Inbound::PubComp { id: ack.pkid },
        v5::Packet::Subscribe(subscribe) => {
            let subscription_id = match subscribe.properties.and_then(|props| props.id) {
                Some(0) => return Err(DecodeError::Protocol("subscription identifier 0")),
                Some(id) => Some(u32::try_from(id).map_err(malformed)?),
                None => None,
            };
            Inbound::Subscribe {
                id: nonzero(subscribe.pkid)?,
                subscription_id,
                filters: subscribe
                    .filters
                    .into_iter()
                    .map(|filter| SubscribeFilter {
                        filter: filter.path,
                        qos: qos5(filter.qos),
                        no_local: filter.nolocal,
                        retain_as_published: filter.preserve_retain,
                        retain_handling: match filter.retain_forward_rule {
                            v5::RetainForwardRule::OnEverySubscribe => 0,
                            v5::RetainForwardRule::OnNewSubscribe => 1,
                            v5::RetainForwardRule::Never => 2,
                        },
                    })
                    .collect(),
            }
        }
        v5::Packet::Unsubscribe(unsubscribe) => {
            if unsubscribe.filters.is_empty() {
                return Err(malformed("UNSUBSCRIBE without a filter"));
            }
            Inbound::Unsubscribe {
                id: nonzero(unsubscribe.pkid)?,
                filters: unsubscribe.filters,
            }
        }
        v5::Packet::PingReq(_) => Inbound::PingReq,
        v5::Packet::Disconnect(disconnect) => Inbound::Disconnect {
            reason: disconnect.reason_code as u8,
            session_expiry: disconnect
                .properties
                .and_then(|props| props.session_expiry_interval),
        },
        v5::Packet::Auth(_) => {
            return Err(DecodeError::Protocol(
                "AUTH: enhanced authentication is not supported",
            ));
        }
        v5::Packet::ConnAck(_)
        | v5::Packet::SubAck(_)
        | v5::Packet::UnsubAck(_)
        | v5::Packet::PingResp(_) => {
            return Err(DecodeError::Protocol(
                "a client sent a packet only a server sends",
            ));
        }
    })
}

fn pubrec_code(reason: v5::PubRecReason) -> u8 {
    use v5::PubRecReason as R;
    match reason {
        R::Success => 0x00,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

pub use self::encode::*;

mod encode;

#[cfg(test)]
mod tests;
