//! fieldgate's event model: the types every stage shares, and nothing that does I/O.
//!
//! An [`Event`] is what a device said, plus what the gateway knows about it (who, when,
//! from which source, how urgent). Its payload is a [`bytes::Bytes`], so passing an event
//! from source to pipeline to buffer never copies the device's data. [`envelope`] is how
//! sinks write an event out (pure encoding, so it can be benchmarked and shared).
#![forbid(unsafe_code)]

pub mod envelope;
mod event;
mod id;
mod record;

pub use event::{DeviceId, Event, EventKind, PayloadFormat, Priority};
pub use id::{EVENT_ID_TEXT_LEN, EventId};
pub use record::DecodeError;
