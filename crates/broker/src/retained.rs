//! Retained messages (MQTT 3.1.1 §3.3.1.3, 5.0 §3.3.1.3): the last retained publish per
//! topic, handed to new subscriptions. An empty payload deletes; the store is bounded
//! and a retained publish for a new topic beyond the bound is not kept (counted by the
//! caller). Expired messages (MQTT 5 message expiry) are neither sent nor kept.

use std::collections::HashMap;
use std::sync::Arc;

use crate::codec::Message;
use crate::topic::matches;

/// What storing a retained message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetainOutcome {
    /// Stored (new or replacing).
    Stored,
    /// An empty payload removed the topic's message (or there was none).
    Deleted,
    /// The store is full; the message was not kept.
    Full,
}

/// The retained messages of a broker.
#[derive(Debug)]
pub struct RetainedStore {
    messages: HashMap<String, (Arc<Message>, Option<u64>)>,
    max: usize,
}

impl RetainedStore {
    /// An empty store holding at most `max` topics.
    pub fn new(max: usize) -> Self {
        Self {
            messages: HashMap::new(),
            max,
        }
    }

    /// Stores, replaces or (empty payload) deletes the topic's retained message.
    pub fn set(&mut self, message: Arc<Message>, expires_at_ms: Option<u64>) -> RetainOutcome {
        if message.payload.is_empty() {
            self.messages.remove(&message.topic);
            return RetainOutcome::Deleted;
        }
        if !self.messages.contains_key(&message.topic) && self.messages.len() >= self.max {
            return RetainOutcome::Full;
        }
        self.messages
            .insert(message.topic.clone(), (message, expires_at_ms));
        RetainOutcome::Stored
    }

    /// Unexpired retained messages whose topic matches `filter`, with their expiry.
    pub fn matching(&self, filter: &str, now_ms: u64) -> Vec<(Arc<Message>, Option<u64>)> {
        self.messages
            .values()
            .filter(|(message, expires)| {
                expires.is_none_or(|at| at > now_ms) && matches(filter, &message.topic)
            })
            .map(|(message, expires)| (Arc::clone(message), *expires))
            .collect()
    }

    /// Drops expired messages.
    pub fn expire(&mut self, now_ms: u64) {
        self.messages
            .retain(|_, (_, expires)| expires.is_none_or(|at| at > now_ms));
    }

    /// Topics held.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Whether nothing is retained.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::codec::MessageProperties;

    fn message(topic: &str, payload: &'static [u8]) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            payload: Bytes::from_static(payload),
            qos: 0,
            retain: true,
            properties: MessageProperties::default(),
        })
    }

    #[test]
    fn empty_payload_deletes_and_the_bound_holds() {
        let mut store = RetainedStore::new(2);
        assert_eq!(store.set(message("a", b"1"), None), RetainOutcome::Stored);
        assert_eq!(store.set(message("b", b"1"), None), RetainOutcome::Stored);
        assert_eq!(store.set(message("c", b"1"), None), RetainOutcome::Full);
        assert_eq!(store.set(message("a", b"2"), None), RetainOutcome::Stored);
        assert_eq!(store.matching("#", 0).len(), 2);
        assert_eq!(store.set(message("a", b""), None), RetainOutcome::Deleted);
        assert_eq!(store.matching("a", 0).len(), 0);
        assert_eq!(
            store.set(message("x", b"1"), Some(10)),
            RetainOutcome::Stored
        );
        assert_eq!(store.matching("x", 11).len(), 0);
        store.expire(11);
        assert_eq!(store.len(), 1);
    }
}
