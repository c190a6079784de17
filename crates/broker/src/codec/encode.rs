//! Encoding the broker's packets with rumqttc's writers; numeric reason codes are mapped
//! to rumqttc's enums here and nowhere else.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{QoS as QoS4, v4};
use rumqttc::v5::mqttbytes::{QoS as QoS5, v5};

use super::{MessageProperties, Version};

/// Why a packet was not encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// Larger than the client's Maximum Packet Size.
    #[error("packet of {size} bytes exceeds the client's maximum of {max}")]
    TooLarge {
        /// Encoded size.
        size: usize,
        /// The client's limit.
        max: usize,
    },
    /// rumqttc refused it (a string longer than 65535 bytes).
    #[error("cannot encode: {0}")]
    Invalid(String),
}

/// The outcome of a CONNECT, in terms both versions can express.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectCode {
    /// Accepted.
    Success,
    /// Protocol level not supported (0x01 / 0x84).
    UnsupportedVersion,
    /// Client identifier refused (0x02 / 0x85).
    BadClientId,
    /// The broker cannot take the client now, e.g. it is stopping (0x03 / 0x88).
    ServerUnavailable,
    /// Too many connections (0x03 / 0x89).
    ServerBusy,
    /// Too many failed attempts from this peer (0x03 / 0x9F).
    ConnectionRateExceeded,
    /// User name or password wrong (0x04 / 0x86).
    BadCredentials,
    /// Not allowed to connect (0x05 / 0x87).
    NotAuthorized,
    /// Enhanced authentication asked for (0x05 / 0x8C).
    BadAuthenticationMethod,
    /// Malformed CONNECT (v5 only: 0x81).
    Malformed,
    /// Protocol error in CONNECT (v5 only: 0x82).
    ProtocolError,
    /// CONNECT larger than allowed (v5 only: 0x95).
    PacketTooLarge,
}

impl ConnectCode {
    /// The 3.1.1 return code, if 3.1.1 has one (otherwise the connection just closes).
    pub fn v311(self) -> Option<u8> {
        Some(match self {
            ConnectCode::Success => 0,
            ConnectCode::UnsupportedVersion => 1,
            ConnectCode::BadClientId => 2,
            ConnectCode::ServerUnavailable
            | ConnectCode::ServerBusy
            | ConnectCode::ConnectionRateExceeded => 3,
            ConnectCode::BadCredentials => 4,
            ConnectCode::NotAuthorized | ConnectCode::BadAuthenticationMethod => 5,
            ConnectCode::Malformed | ConnectCode::ProtocolError | ConnectCode::PacketTooLarge => {
                return None;
            }
        })
    }

    /// The MQTT 5 reason code.
    pub fn v5(self) -> u8 {
        match self {
            ConnectCode::Success => 0x00,
            ConnectCode::UnsupportedVersion => 0x84,
            ConnectCode::BadClientId => 0x85,
            ConnectCode::ServerUnavailable => 0x88,
            ConnectCode::ServerBusy => 0x89,
            ConnectCode::ConnectionRateExceeded => 0x9F,
            ConnectCode::BadCredentials => 0x86,
            ConnectCode::NotAuthorized => 0x87,
            ConnectCode::BadAuthenticationMethod => 0x8C,
            ConnectCode::Malformed => 0x81,
            ConnectCode::ProtocolError => 0x82,
            ConnectCode::PacketTooLarge => 0x95,
        }
    }

    fn rumqttc_v5(self) -> v5::ConnectReturnCode {
        use v5::ConnectReturnCode as C;
        match self {
            ConnectCode::Success => C::Success,
            ConnectCode::UnsupportedVersion => C::UnsupportedProtocolVersion,
            ConnectCode::BadClientId => C::ClientIdentifierNotValid,
            ConnectCode::ServerUnavailable => C::ServerUnavailable,
            ConnectCode::ServerBusy => C::ServerBusy,
            ConnectCode::ConnectionRateExceeded => C::ConnectionRateExceeded,
            ConnectCode::BadCredentials => C::BadUserNamePassword,
            ConnectCode::NotAuthorized => C::NotAuthorized,
            ConnectCode::BadAuthenticationMethod => C::BadAuthenticationMethod,
            ConnectCode::Malformed => C::MalformedPacket,
            ConnectCode::ProtocolError => C::ProtocolError,
            ConnectCode::PacketTooLarge => C::PacketTooLarge,
        }
    }
}

/// What a v5 CONNACK tells the client about the broker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnAckProperties {
    /// The client id the broker chose for an empty one.
    pub assigned_client_id: Option<String>,
    /// Most QoS 1/2 publishes the broker accepts unacknowledged.
    pub receive_maximum: u16,
    /// Largest packet the broker accepts.
    pub max_packet_size: u32,
    /// Highest topic alias the client may use.
    pub topic_alias_maximum: u16,
    /// Session expiry the broker will use, when it differs from the client's.
    pub session_expiry: Option<u32>,
    /// Largest number of retained messages is a broker matter; this says whether
    /// retain is available at all.
    pub retain_available: bool,
}

fn qos4(qos: u8) -> QoS4 {
    match qos {
        0 => QoS4::AtMostOnce,
        1 => QoS4::AtLeastOnce,
        _ => QoS4::ExactlyOnce,
    }
}

fn qos5(qos: u8) -> QoS5 {
    match qos {
        0 => QoS5::AtMostOnce,
        1 => QoS5::AtLeastOnce,
        _ => QoS5::ExactlyOnce,
    }
}

fn write4(buf: &mut BytesMut, packet: &v4::Packet) -> Result<(), EncodeError> {
    packet
        .write(buf, usize::MAX)
        .map(|_| ())
        .map_err(|err| EncodeError::Invalid(err.to_string()))
}

fn write5(buf: &mut BytesMut, packet: &v5::Packet) -> Result<(), EncodeError> {
    packet
        .write(buf, None)
        .map(|_| ())
        .map_err(|err| EncodeError::Invalid(err.to_string()))
}

/// CONNACK; nothing is written for a 3.1.1 refusal that has no return code.
pub fn encode_connack(
    buf: &mut BytesMut,
    version: Version,
    session_present: bool,
    code: ConnectCode,
    properties: Option<&ConnAckProperties>,
) -> Result<(), EncodeError> {
    match version {
        Version::V311 => {
            let Some(return_code) = code.v311() else {
                return Ok(());
            };
            use v4::ConnectReturnCode as C;
            let code = match return_code {
                0 => C::Success,
                1 => C::RefusedProtocolVersion,
                2 => C::BadClientId,
                3 => C::ServiceUnavailable,
                4 => C::BadUserNamePassword,
                _ => C::NotAuthorized,
            };
            write4(
                buf,
                &v4::Packet::ConnAck(v4::ConnAck {
                    session_present,
                    code,
                }),
            )
        }
        Version::V5 => {
            let properties = properties.map(|props| v5::ConnAckProperties {
                session_expiry_interval: props.session_expiry,
                receive_max: Some(props.receive_maximum),
                max_qos: None,
                retain_available: (!props.retain_available).then_some(0),
                max_packet_size: Some(props.max_packet_size),
                assigned_client_identifier: props.assigned_client_id.clone(),
                topic_alias_max: Some(props.topic_alias_maximum),
                reason_string: None,
                user_properties: Vec::new(),
                wildcard_subscription_available: None,
                subscription_identifiers_available: None,
                shared_subscription_available: None,
                server_keep_alive: None,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            });
            write5(
                buf,
                &v5::Packet::ConnAck(v5::ConnAck {
                    session_present,
                    code: code.rumqttc_v5(),
                    properties,
                }),
            )
        }
    }
}

/// One PUBLISH to a subscriber.
#[derive(Debug, Clone)]
pub struct PublishOut<'a> {
    /// Packet id (0 for QoS 0).
    pub id: u16,
    /// Redelivery.
    pub dup: bool,
    /// QoS.
    pub qos: u8,
    /// RETAIN flag.
    pub retain: bool,
    /// Topic name.
    pub topic: &'a str,
    /// Payload.
    pub payload: &'a Bytes,
    /// Properties passed through (v5).
    pub properties: &'a MessageProperties,
    /// Remaining message expiry in seconds, replacing the published one (v5).
    pub expiry_remaining: Option<u32>,
    /// Subscription identifiers (v5).
    pub subscription_ids: &'a [u32],
}

/// PUBLISH, refused when it would exceed `max_size` (the client's Maximum Packet Size).
pub fn encode_publish(
    buf: &mut BytesMut,
    version: Version,
    out: &PublishOut<'_>,
    max_size: Option<u32>,
) -> Result<(), EncodeError> {
    let start = buf.len();
    match version {
        Version::V311 => write4(
            buf,
            &v4::Packet::Publish(v4::Publish {
                dup: out.dup,
                qos: qos4(out.qos),
                retain: out.retain,
                topic: out.topic.to_owned(),
                pkid: out.id,
                payload: out.payload.clone(),
            }),
        )?,
        Version::V5 => {
            let props = out.properties;
            let any = props.payload_format.is_some()
                || out.expiry_remaining.is_some()
                || props.content_type.is_some()
                || props.response_topic.is_some()
                || props.correlation_data.is_some()
                || !props.user_properties.is_empty()
                || !out.subscription_ids.is_empty();
            let properties = any.then(|| v5::PublishProperties {
                payload_format_indicator: props.payload_format,
                message_expiry_interval: out.expiry_remaining,
                topic_alias: None,
                response_topic: props.response_topic.clone(),
                correlation_data: props.correlation_data.clone(),
                user_properties: props.user_properties.clone(),
                subscription_identifiers: out
                    .subscription_ids
                    .iter()
                    .map(|id| usize::try_from(*id).unwrap_or(usize::MAX))
                    .collect(),
                content_type: props.content_type.clone(),
            });
            write5(
                buf,
                &v5::Packet::Publish(v5::Publish {
                    dup: out.dup,
                    qos: qos5(out.qos),
                    retain: out.retain,
                    topic: Bytes::copy_from_slice(out.topic.as_bytes()),
                    pkid: out.id,
                    payload: out.payload.clone(),
                    properties,
                }),
            )?;
        }
    }
    let size = buf.len() - start;
    if let Some(max) = max_size {
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        if size > max {
            buf.truncate(start);
            return Err(EncodeError::TooLarge { size, max });
        }
    }
    Ok(())
}

/// Which QoS acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    /// PUBACK.
    PubAck,
    /// PUBREC.
    PubRec,
    /// PUBREL.
    PubRel,
    /// PUBCOMP.
    PubComp,
}

/// PUBACK/PUBREC/PUBREL/PUBCOMP; `reason` is dropped on 3.1.1.
pub fn encode_ack(
    buf: &mut BytesMut,
    version: Version,
    kind: AckKind,
    id: u16,
    reason: u8,
) -> Result<(), EncodeError> {
    match version {
        Version::V311 => write4(
            buf,
            &match kind {
                AckKind::PubAck => v4::Packet::PubAck(v4::PubAck { pkid: id }),
                AckKind::PubRec => v4::Packet::PubRec(v4::PubRec { pkid: id }),
                AckKind::PubRel => v4::Packet::PubRel(v4::PubRel { pkid: id }),
                AckKind::PubComp => v4::Packet::PubComp(v4::PubComp { pkid: id }),
            },
        ),
        Version::V5 => {
            let packet = match kind {
                AckKind::PubAck => v5::Packet::PubAck(v5::PubAck {
                    pkid: id,
                    reason: puback_reason(reason),
                    properties: None,
                }),
                AckKind::PubRec => v5::Packet::PubRec(v5::PubRec {
                    pkid: id,
                    reason: pubrec_reason(reason),
                    properties: None,
                }),
                AckKind::PubRel => v5::Packet::PubRel(v5::PubRel {
                    pkid: id,
                    reason: if reason == 0 {
                        v5::PubRelReason::Success
                    } else {
                        v5::PubRelReason::PacketIdentifierNotFound
                    },
                    properties: None,
                }),
                AckKind::PubComp => v5::Packet::PubComp(v5::PubComp {
                    pkid: id,
                    reason: if reason == 0 {
                        v5::PubCompReason::Success
                    } else {
                        v5::PubCompReason::PacketIdentifierNotFound
                    },
                    properties: None,
                }),
            };
            write5(buf, &packet)
        }
    }
}

fn puback_reason(code: u8) -> v5::PubAckReason {
    use v5::PubAckReason as R;
    match code {
        0x00 => R::Success,
        0x10 => R::NoMatchingSubscribers,
        0x83 => R::ImplementationSpecificError,
        0x87 => R::NotAuthorized,
        0x90 => R::TopicNameInvalid,
        0x91 => R::PacketIdentifierInUse,
        0x97 => R::QuotaExceeded,
        0x99 => R::PayloadFormatInvalid,
        _ => R::UnspecifiedError,
    }
}

fn pubrec_reason(code: u8) -> v5::PubRecReason {
    use v5::PubRecReason as R;
    match code {
        0x00 => R::Success,
        0x10 => R::NoMatchingSubscribers,
        0x83 => R::ImplementationSpecificError,
        0x87 => R::NotAuthorized,
        0x90 => R::TopicNameInvalid,
        0x91 => R::PacketIdentifierInUse,
        0x97 => R::QuotaExceeded,
        0x99 => R::PayloadFormatInvalid,
        _ => R::UnspecifiedError,
    }
}

/// SUBACK with one code per filter: the granted QoS (0-2) or a failure (>= 0x80; on
/// 3.1.1 every failure is 0x80).
pub fn encode_suback(
    buf: &mut BytesMut,
    version: Version,
    id: u16,
    codes: &[u8],
) -> Result<(), EncodeError> {
    match version {
        Version::V311 => write4(
            buf,
            &v4::Packet::SubAck(v4::SubAck {
                pkid: id,
                return_codes: codes
                    .iter()
                    .map(|code| match code {
                        0..=2 => v4::SubscribeReasonCode::Success(qos4(*code)),
                        _ => v4::SubscribeReasonCode::Failure,
                    })
                    .collect(),
            }),
        ),
        Version::V5 => {
            use v5::SubscribeReasonCode as R;
            write5(
                buf,
                &v5::Packet::SubAck(v5::SubAck {
                    pkid: id,
                    return_codes: codes
                        .iter()
                        .map(|code| match code {
                            0..=2 => R::Success(qos5(*code)),
                            0x83 => R::ImplementationSpecific,
                            0x87 => R::NotAuthorized,
                            0x8F => R::TopicFilterInvalid,
                            0x91 => R::PkidInUse,
                            0x97 => R::QuotaExceeded,
                            0x9E => R::SharedSubscriptionsNotSupported,
                            0xA1 => R::SubscriptionIdNotSupported,
                            0xA2 => R::WildcardSubscriptionsNotSupported,
                            _ => R::Unspecified,
                        })
                        .collect(),
                    properties: None,
                }),
            )
        }
    }
}

/// UNSUBACK; `codes` (0x00, 0x11 no subscription, 0x87, 0x8F) only on 5.0.
pub fn encode_unsuback(
    buf: &mut BytesMut,
    version: Version,
    id: u16,
    codes: &[u8],
) -> Result<(), EncodeError> {
    match version {
        Version::V311 => write4(buf, &v4::Packet::UnsubAck(v4::UnsubAck { pkid: id })),
        Version::V5 => {
            use v5::UnsubAckReason as R;
            write5(
                buf,
                &v5::Packet::UnsubAck(v5::UnsubAck {
                    pkid: id,
                    reasons: codes
                        .iter()
                        .map(|code| match code {
                            0x00 => R::Success,
                            0x11 => R::NoSubscriptionExisted,
                            0x87 => R::NotAuthorized,
                            0x8F => R::TopicFilterInvalid,
                            _ => R::UnspecifiedError,
                        })
                        .collect(),
                    properties: None,
                }),
            )
        }
    }
}

/// PINGRESP.
pub fn encode_pingresp(buf: &mut BytesMut, version: Version) -> Result<(), EncodeError> {
    match version {
        Version::V311 => write4(buf, &v4::Packet::PingResp),
        Version::V5 => write5(buf, &v5::Packet::PingResp(v5::PingResp)),
    }
}

/// DISCONNECT from the server with a reason code: 5.0 only (3.1.1 just closes).
pub fn encode_disconnect(
    buf: &mut BytesMut,
    version: Version,
    reason: u8,
) -> Result<(), EncodeError> {
    if version == Version::V311 {
        return Ok(());
    }
    let code = v5::DisconnectReasonCode::try_from(reason)
        .unwrap_or(v5::DisconnectReasonCode::UnspecifiedError);
    // A reason string, not `None` or empty properties: rumqttc 0.25 writes a DISCONNECT
    // with a reason code and no (or empty) properties with a wrong remaining length.
    write5(
        buf,
        &v5::Packet::Disconnect(v5::Disconnect {
            reason_code: code,
            properties: Some(v5::DisconnectProperties {
                session_expiry_interval: None,
                reason_string: Some(disconnect_reason_text(reason).to_owned()),
                user_properties: Vec::new(),
                server_reference: None,
            }),
        }),
    )
}

/// A short text for a server DISCONNECT reason code.
fn disconnect_reason_text(reason: u8) -> &'static str {
    match reason {
        0x00 => "normal disconnection",
        0x81 => "malformed packet",
        0x82 => "protocol error",
        0x87 => "not authorized",
        0x8B => "server shutting down",
        0x8D => "keep alive timeout",
        0x8E => "session taken over",
        0x90 => "topic name invalid",
        0x93 => "receive maximum exceeded",
        0x94 => "topic alias invalid",
        0x95 => "packet too large",
        0x97 => "quota exceeded",
        0x98 => "administrative action",
        _ => "unspecified error",
    }
}
