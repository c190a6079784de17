//! fieldgate's southbound TCP codec: bytes from a device in, frames and typed messages out,
//! and the gateway's replies back into bytes.
//!
//! Everything here is pure: no sockets, no clocks, no global state. The daemon's TCP source
//! reads into a [`bytes::BytesMut`], asks a [`FrameDecoder`] for whole frames, classifies each
//! with [`parse_message`], and answers with [`encode_reply`]. The wire format is specified for
//! device makers in `docs/PROTOCOL-TCP.md`.
//!
//! Invariants:
//! - every size is capped: a decoder never waits on more than `max_frame` plus a few bytes, and a
//!   hostile length prefix is rejected before anything is allocated;
//! - no input panics: every malformed frame becomes a [`FrameError`] or a [`MessageError`], each
//!   with the wire code the gateway sends back.
//!
//! ```
//! use bytes::BytesMut;
//! use fieldgate_codec::{DeviceMessage, FrameDecoder, Framing, Reply, encode_reply, parse_message};
//!
//! let mut decoder = FrameDecoder::new(Framing::Lines, 64 * 1024);
//! let mut read_buf = BytesMut::from(&b"{\"device\":\"dev-1\",\"seq\":7,\"temp\":21.5}\n"[..]);
//! let mut write_buf = BytesMut::new();
//! while let Some(frame) = decoder.decode(&mut read_buf)? {
//!     if let Ok(DeviceMessage::Data { seq: Some(seq), .. }) = parse_message(&frame, false) {
//!         // ... hand `frame` to the pipeline as the payload, then once it is buffered:
//!         encode_reply(Framing::Lines, &Reply::Ack { seq }, &mut write_buf);
//!     }
//! }
//! assert_eq!(&write_buf[..], b"{\"type\":\"ack\",\"seq\":7}\n");
//! # Ok::<(), fieldgate_codec::FrameError>(())
//! ```
#![forbid(unsafe_code)]

mod decoder;
mod device_id;
mod framing;
mod message;
mod raw;
mod reply;

pub use decoder::{FrameDecoder, FrameError};
pub use device_id::{MAX_DEVICE_ID_LEN, validate_device_id};
pub use framing::{Framing, encode_frame};
pub use message::{DeviceMessage, MessageError, parse_message};
pub use reply::{Reply, encode_reply};
