//! Gateway replies: exact JSON per the contract, framed, and decodable by the same framing.

use bytes::BytesMut;
use fieldgate_codec::{FrameDecoder, Framing, Reply, encode_reply};
use serde_json::value::RawValue;

fn line(reply: &Reply<'_>) -> String {
    let mut out = BytesMut::new();
    encode_reply(Framing::Lines, reply, &mut out);
    String::from_utf8(out.to_vec()).expect("replies are UTF-8")
}

#[test]
fn every_reply_shape() {
    assert_eq!(
        line(&Reply::Ack { seq: 42 }),
        "{\"type\":\"ack\",\"seq\":42}\n"
    );
    assert_eq!(
        line(&Reply::Nack {
            seq: 3,
            reason: "buffer_full"
        }),
        "{\"type\":\"nack\",\"seq\":3,\"reason\":\"buffer_full\"}\n"
    );
    assert_eq!(
        line(&Reply::Error {
            code: "invalid_json",
            message: "bad \"x\"\n"
        }),
        "{\"type\":\"error\",\"code\":\"invalid_json\",\"message\":\"bad \\\"x\\\"\\n\"}\n"
    );
    assert_eq!(
        line(&Reply::Welcome { device: "dev-1" }),
        "{\"type\":\"welcome\",\"device\":\"dev-1\"}\n"
    );
    let params = RawValue::from_string("{\"delay\":5}".to_owned()).unwrap();
    assert_eq!(
        line(&Reply::Command {
            id: "c-1",
            name: "reboot",
            params: &params
        }),
        "{\"type\":\"command\",\"id\":\"c-1\",\"name\":\"reboot\",\"params\":{\"delay\":5}}\n"
    );
}

#[test]
fn pretty_printed_params_stay_on_one_line() {
    let params =
        RawValue::from_string("{\r\n  \"a\": \"x\\ny\",\n  \"b\": [1,\n2]\n}".to_owned()).unwrap();
    let text = line(&Reply::Command {
        id: "c-2",
        name: "set",
        params: &params,
    });
    assert_eq!(text.matches('\n').count(), 1);
    assert!(text.ends_with('\n'));
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(value["params"]["a"], "x\ny");
    assert_eq!(value["params"]["b"][1], 2);
}

#[test]
fn length_prefixed_reply_round_trips() {
    let mut out = BytesMut::new();
    encode_reply(Framing::LengthPrefixed, &Reply::Ack { seq: 1 }, &mut out);
    assert_eq!(&out[..4], &[0, 0, 0, 22]);
    let mut decoder = FrameDecoder::new(Framing::LengthPrefixed, 1024);
    let frame = decoder.decode(&mut out).unwrap().unwrap();
    assert_eq!(&frame[..], b"{\"type\":\"ack\",\"seq\":1}");
    assert!(out.is_empty());
}
