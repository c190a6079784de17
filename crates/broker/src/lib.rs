//! The protocol half of fieldgate's embedded MQTT broker, shared by MQTT 3.1.1 and 5.0:
//! packets in protocol-neutral terms over rumqttc's codec ([`codec`]), topic rules
//! ([`topic`]), the subscription tree ([`tree`]), the QoS state of a session
//! ([`session`]), retained messages ([`retained`]) and the broker state tying them
//! together ([`broker`]).
//!
//! Pure and synchronous: no sockets, no clocks (callers pass milliseconds), no knowledge
//! of the gateway's pipeline. The gateway's `mqtt_broker` source owns the sockets and
//! decides what a publish means to the pipeline.
#![forbid(unsafe_code)]

pub mod broker;
pub mod codec;
pub mod retained;
pub mod session;
pub mod topic;
pub mod tree;

pub use broker::{Broker, BrokerLimits, ConnectOutcome, SessionParams};
pub use codec::{
    Connect, DecodeError, Inbound, Message, MessageProperties, Publish, SubscribeFilter, Version,
};
