//! Decoder tests: what rumqttc's client-side writers produce decodes on the server side;
//! what a server must refuse is refused; arbitrary bytes never panic.

use bytes::BytesMut;
use proptest::prelude::*;
use rumqttc::mqttbytes::{QoS as QoS4, v4};
use rumqttc::v5::mqttbytes::{QoS as QoS5, v5};

use super::*;

const MAX: usize = 64 * 1024;

fn v4_connect() -> BytesMut {
    let mut connect = v4::Connect::new("client-1");
    connect.keep_alive = 30;
    connect.clean_session = false;
    connect.set_login("dev-1", "secret");
    connect.last_will = Some(v4::LastWill::new("w/t", "gone", QoS4::AtLeastOnce, true));
    let mut buf = BytesMut::new();
    v4::Packet::Connect(connect).write(&mut buf, MAX).unwrap();
    buf
}

#[test]
fn v311_connect_decodes_with_will_and_login() {
    let mut buf = v4_connect();
    let Some(Inbound::Connect(connect)) = decode(&mut buf, None, MAX).unwrap() else {
        panic!("expected CONNECT")
    };
    assert_eq!(connect.version, Version::V311);
    assert_eq!(connect.client_id, "client-1");
    assert!(!connect.clean_start);
    assert_eq!(connect.username.as_deref(), Some("dev-1"));
    assert_eq!(connect.password.as_deref(), Some("secret"));
    let will = connect.will.unwrap();
    assert_eq!(will.message.topic, "w/t");
    assert_eq!(will.message.qos, 1);
    assert!(will.message.retain);
    assert!(buf.is_empty());
}

#[test]
fn v5_connect_decodes_properties() {
    let mut connect = v5::Connect {
        keep_alive: 10,
        client_id: "c5".into(),
        clean_start: true,
        properties: Some(v5::ConnectProperties {
            session_expiry_interval: Some(60),
            receive_maximum: Some(5),
            max_packet_size: Some(1000),
            topic_alias_max: Some(3),
            request_response_info: None,
            request_problem_info: None,
            user_properties: Vec::new(),
            authentication_method: None,
            authentication_data: None,
        }),
    };
    connect.keep_alive = 10;
    let mut buf = BytesMut::new();
    v5::Packet::Connect(connect, None, None)
        .write(&mut buf, None)
        .unwrap();
    let Some(Inbound::Connect(connect)) = decode(&mut buf, None, MAX).unwrap() else {
        panic!("expected CONNECT")
    };
    assert_eq!(connect.version, Version::V5);
    assert_eq!(connect.session_expiry, Some(60));
    assert_eq!(connect.receive_maximum, 5);
    assert_eq!(connect.max_packet_size, Some(1000));
    assert_eq!(connect.topic_alias_maximum, 3);
}

#[test]
fn first_packet_must_be_connect() {
    let mut buf = BytesMut::from(&[0xC0u8, 0x00][..]);
    assert_eq!(
        decode(&mut buf, None, MAX),
        Err(DecodeError::Protocol("the first packet must be CONNECT"))
    );
    let mut second = v4_connect();
    assert!(matches!(
        decode(&mut second, Some(Version::V311), MAX),
        Err(DecodeError::Protocol(_))
    ));
}

#[test]
fn unknown_protocol_level_is_reported_for_connack() {
    let mut buf = v4_connect();
    // Byte 8 is the protocol level (after 0x10, 1-byte length, 00 04 "MQTT").
    buf[8] = 3;
    assert_eq!(
        decode(&mut buf, None, MAX),
        Err(DecodeError::UnsupportedVersion(3))
    );
}

#[test]
fn reserved_connect_flag_is_malformed() {
    let mut buf = v4_connect();
    buf[9] |= 0x01;
    assert!(matches!(
        decode(&mut buf, None, MAX),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn oversize_is_refused_from_the_header_alone() {
    // A PUBLISH announcing 200 MB: refused with two bytes of it buffered.
    let mut buf = BytesMut::from(&[0x30u8, 0xff, 0xff, 0xff, 0x7f][..]);
    assert!(matches!(
        decode(&mut buf, Some(Version::V311), MAX),
        Err(DecodeError::TooLarge { .. })
    ));
    let mut five = BytesMut::from(&[0x30u8, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
    assert!(matches!(
        decode(&mut five, Some(Version::V311), MAX),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn fixed_header_flags_are_checked() {
    // SUBSCRIBE with flags 0000 instead of 0010.
    let mut buf = BytesMut::from(&[0x80u8, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00][..]);
    assert!(matches!(
        decode(&mut buf, Some(Version::V311), MAX),
        Err(DecodeError::Malformed(_))
    ));
    // PUBLISH QoS 3.
    let mut buf = BytesMut::from(&[0x36u8, 0x03, 0x00, 0x01, b'a'][..]);
    assert!(decode(&mut buf, Some(Version::V311), MAX).is_err());
    // A CONNACK from a client.
    let mut buf = BytesMut::from(&[0x20u8, 0x02, 0x00, 0x00][..]);
    assert!(matches!(
        decode(&mut buf, Some(Version::V311), MAX),
        Err(DecodeError::Protocol(_))
    ));
    // SUBSCRIBE 3.1.1 with reserved option bits.
    let mut buf = BytesMut::from(&[0x82u8, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x04][..]);
    assert!(matches!(
        decode(&mut buf, Some(Version::V311), MAX),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn v5_publish_subscribe_and_short_disconnect_decode() {
    let mut buf = BytesMut::new();
    let mut publish = v5::Publish::new("a/b", QoS5::ExactlyOnce, "x", None);
    publish.pkid = 9;
    publish.properties = Some(v5::PublishProperties {
        topic_alias: Some(2),
        response_topic: Some("r".into()),
        correlation_data: Some(Bytes::from_static(b"c")),
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    });
    v5::Packet::Publish(publish).write(&mut buf, None).unwrap();
    let Some(Inbound::Publish(publish)) = decode(&mut buf, Some(Version::V5), MAX).unwrap() else {
        panic!("expected PUBLISH")
    };
    assert_eq!(
        (publish.id, publish.qos, publish.topic_alias),
        (9, 2, Some(2))
    );
    assert_eq!(publish.properties.response_topic.as_deref(), Some("r"));
    assert_eq!(publish.properties.user_properties.len(), 1);

    let mut buf = BytesMut::from(&[0xE0u8, 0x00][..]);
    assert_eq!(
        decode(&mut buf, Some(Version::V5), MAX).unwrap(),
        Some(Inbound::Disconnect {
            reason: 0,
            session_expiry: None
        })
    );
}

#[test]
fn encoded_publish_respects_the_client_maximum() {
    let payload = Bytes::from(vec![0u8; 100]);
    let properties = MessageProperties::default();
    let out = PublishOut {
        id: 1,
        dup: false,
        qos: 1,
        retain: false,
        topic: "t",
        payload: &payload,
        properties: &properties,
        expiry_remaining: None,
        subscription_ids: &[3],
    };
    let mut buf = BytesMut::new();
    assert!(matches!(
        encode_publish(&mut buf, Version::V5, &out, Some(50)),
        Err(EncodeError::TooLarge { .. })
    ));
    assert!(buf.is_empty());
    encode_publish(&mut buf, Version::V5, &out, Some(500)).unwrap();
    let packet = v5::Packet::read(&mut buf, None).unwrap();
    let v5::Packet::Publish(publish) = packet else {
        panic!("expected PUBLISH")
    };
    assert_eq!(
        publish.properties.unwrap().subscription_identifiers,
        vec![3]
    );
}

proptest! {
    /// Garbage never panics, in any state, and never yields more than it was given.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300), state in 0u8..3) {
        let version = match state { 0 => None, 1 => Some(Version::V311), _ => Some(Version::V5) };
        let mut buf = BytesMut::from(&bytes[..]);
        for _ in 0..8 {
            match decode(&mut buf, version, 256) {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
    }

    /// Garbage behind a plausible fixed header (so the body parsers run) never panics.
    #[test]
    fn arbitrary_bodies_never_panic(kind in 1u8..15, flags in 0u8..16, body in prop::collection::vec(any::<u8>(), 0..120), v5 in any::<bool>()) {
        let version = if v5 { Version::V5 } else { Version::V311 };
        let mut bytes = vec![(kind << 4) | flags, u8::try_from(body.len()).unwrap()];
        bytes.extend_from_slice(&body);
        let mut buf = BytesMut::from(&bytes[..]);
        let _ignored = decode(&mut buf, Some(version), 1024);
        let mut connect = vec![0x10, u8::try_from(body.len() + 7).unwrap(), 0, 4, b'M', b'Q', b'T', b'T', if v5 { 5 } else { 4 }];
        connect.extend_from_slice(&body);
        let mut buf = BytesMut::from(&connect[..]);
        let _ignored = decode(&mut buf, None, 1024);
    }
}

#[test]
fn server_disconnect_and_connack_decode_on_the_client_side() {
    let mut buf = BytesMut::new();
    encode_disconnect(&mut buf, Version::V5, 0x95).unwrap();
    assert!(!buf.is_empty());
    let packet = v5::Packet::read(&mut buf, None).unwrap();
    let v5::Packet::Disconnect(disconnect) = packet else {
        panic!("expected DISCONNECT")
    };
    assert_eq!(
        disconnect.reason_code,
        v5::DisconnectReasonCode::PacketTooLarge
    );
    let mut buf = BytesMut::new();
    encode_disconnect(&mut buf, Version::V311, 0x95).unwrap();
    assert!(buf.is_empty(), "3.1.1 has no server DISCONNECT");
}

/// Every packet the server writes reads back on a client with rumqttc, in both versions.
#[test]
fn every_server_packet_reads_back_on_a_client() {
    let props = ConnAckProperties {
        assigned_client_id: Some("fieldgate-1".into()),
        receive_maximum: 8,
        max_packet_size: 4096,
        topic_alias_maximum: 4,
        session_expiry: Some(60),
        retain_available: true,
    };
    for code in [0x00u8, 0x10, 0x80, 0x87, 0x97] {
        for kind in [AckKind::PubAck, AckKind::PubRec] {
            let mut buf = BytesMut::new();
            encode_ack(&mut buf, Version::V5, kind, 3, code).unwrap();
            v5::Packet::read(&mut buf, None).unwrap();
            assert!(buf.is_empty(), "{kind:?} {code:#x} left bytes");
        }
    }
    for (kind, code) in [
        (AckKind::PubRel, 0x92u8),
        (AckKind::PubComp, 0x92),
        (AckKind::PubComp, 0),
    ] {
        let mut buf = BytesMut::new();
        encode_ack(&mut buf, Version::V5, kind, 3, code).unwrap();
        v5::Packet::read(&mut buf, None).unwrap();
        assert!(buf.is_empty());
    }
    let mut buf = BytesMut::new();
    encode_connack(
        &mut buf,
        Version::V5,
        true,
        ConnectCode::Success,
        Some(&props),
    )
    .unwrap();
    let v5::Packet::ConnAck(ack) = v5::Packet::read(&mut buf, None).unwrap() else {
        panic!("expected CONNACK")
    };
    let read = ack.properties.unwrap();
    assert_eq!(
        read.assigned_client_identifier.as_deref(),
        Some("fieldgate-1")
    );
    assert_eq!(read.receive_max, Some(8));
    for code in [
        ConnectCode::BadCredentials,
        ConnectCode::UnsupportedVersion,
        ConnectCode::ServerUnavailable,
    ] {
        let mut buf = BytesMut::new();
        encode_connack(&mut buf, Version::V311, false, code, None).unwrap();
        let v4::Packet::ConnAck(ack) = v4::Packet::read(&mut buf, MAX).unwrap() else {
            panic!("expected CONNACK")
        };
        assert_eq!(ack.code as u8, code.v311().unwrap());
        let mut buf = BytesMut::new();
        encode_connack(&mut buf, Version::V5, false, code, None).unwrap();
        v5::Packet::read(&mut buf, None).unwrap();
    }
    let mut buf = BytesMut::new();
    encode_connack(&mut buf, Version::V311, false, ConnectCode::Malformed, None).unwrap();
    assert!(
        buf.is_empty(),
        "3.1.1 has no CONNACK code for a malformed CONNECT"
    );
    for version in [Version::V311, Version::V5] {
        let mut buf = BytesMut::new();
        encode_suback(&mut buf, version, 4, &[0, 1, 2, 0x80, 0x87]).unwrap();
        encode_unsuback(&mut buf, version, 5, &[0x00, 0x11]).unwrap();
        encode_pingresp(&mut buf, version).unwrap();
        for _ in 0..3 {
            match version {
                Version::V311 => drop(v4::Packet::read(&mut buf, MAX).unwrap()),
                Version::V5 => drop(v5::Packet::read(&mut buf, None).unwrap()),
            }
        }
        assert!(buf.is_empty());
    }
}
