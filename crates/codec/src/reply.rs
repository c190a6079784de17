//! Encoding what the gateway says to a device: acks, nacks, errors, welcome, commands.
//!
//! Invariant: a reply is always exactly one frame in the connection's framing; in `lines` mode
//! the JSON never contains a raw `\n` or `\r`, even when command params arrive pretty-printed.

use bytes::BytesMut;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::framing::{Framing, encode_frame};

/// A gateway → device message; serializes as `{"type":"<variant>",...fields}`.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply<'a> {
    /// `{"type":"ack","seq":N}`: the event is in every buffer.
    Ack {
        /// The message's `seq`, or its 1-based data frame count on the connection.
        seq: u64,
    },
    /// `{"type":"nack","seq":N,"reason":".."}`: the event could not be stored.
    Nack {
        /// As for [`Reply::Ack`].
        seq: u64,
        /// Why, e.g. `"buffer_full"` or `"shutting_down"`.
        reason: &'a str,
    },
    /// `{"type":"error","code":"..","message":".."}`.
    Error {
        /// A wire error code (`invalid_json`, `frame_too_large`, …).
        code: &'a str,
        /// Human-readable detail.
        message: &'a str,
    },
    /// `{"type":"welcome","device":".."}`: the hello was accepted.
    Welcome {
        /// The device id the connection is now bound to.
        device: &'a str,
    },
    /// `{"type":"command","id":"..","name":"..","params":{..}}`: a cloud command for the device.
    Command {
        /// Command id; the device's `command_result` repeats it.
        id: &'a str,
        /// What to do, e.g. `"reboot"`.
        name: &'a str,
        /// Arguments, passed through as the cloud sent them.
        params: &'a RawValue,
    },
}

/// Appends `reply` to `out` as one JSON object framed with `framing`.
pub fn encode_reply(framing: Framing, reply: &Reply<'_>, out: &mut BytesMut) {
    let mut json = Vec::with_capacity(64);
    // Serializing string and integer fields into a Vec cannot fail (no I/O, no non-string map
    // keys); should it ever, writing nothing keeps the stream framed.
    if serde_json::to_writer(&mut json, reply).is_err() {
        return;
    }
    if framing == Framing::Lines {
        // Valid JSON can only hold raw CR/LF as whitespace between tokens (inside strings they
        // are escaped), so a space means the same and keeps the reply on one line.
        for byte in &mut json {
            if matches!(*byte, b'\n' | b'\r') {
                *byte = b' ';
            }
        }
    }
    encode_frame(framing, &json, out);
}
