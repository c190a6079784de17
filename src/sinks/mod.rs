//! Sinks: where events leave the gateway. Each reads its own buffer and acknowledges
//! records only once its destination has them.

pub mod console;
pub mod deadletter;
pub mod file;
pub mod mqtt;
mod topic;

pub use topic::{TopicTemplate, single_wildcard_match};
