//! The embedded MQTT brokers running in this gateway, by source name, for messages the
//! gateway itself publishes to local subscribers (alarm actions).
//!
//! A broker source attaches itself when it starts; the map holds it weakly, so a source
//! stopped or replaced by a reload is gone as soon as its task drops it, and a publish
//! to it fails with "not running" instead of keeping a dead broker alive. While a reload
//! is under way a name may have two instances (running and prepared): the newest alive
//! answers, so a prepared one that is thrown away leaves the running one reachable.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use bytes::Bytes;

/// Why a local publish did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalPublishError {
    /// No broker source of this name is running.
    #[error("the mqtt_broker source {0:?} is not running")]
    NotRunning(String),
    /// No broker was named and not exactly one is running.
    #[error("no broker named and {0} mqtt_broker sources are running, not one")]
    NotOne(usize),
    /// The topic is not a valid topic name for that broker.
    #[error("topic {topic:?} refused: {reason}")]
    BadTopic {
        /// The topic.
        topic: String,
        /// Why.
        reason: String,
    },
}

/// What a running embedded broker offers the rest of the gateway.
pub trait LocalPublish: Send + Sync {
    /// Publishes `payload` on `topic` to the broker's subscribers (`from` none: no
    /// client's no-local option applies); returns how many subscriptions it matched.
    fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        qos: u8,
        retain: bool,
    ) -> Result<usize, LocalPublishError>;
}

/// The running brokers by source name, weakly.
#[derive(Default)]
pub struct LocalBrokers {
    brokers: Mutex<BTreeMap<String, Vec<Weak<dyn LocalPublish>>>>,
}

impl LocalBrokers {
    /// Makes broker source `name` reachable (a restarted source replaces its old self).
    pub fn attach(&self, name: &str, broker: Weak<dyn LocalPublish>) {
        let mut brokers = self.brokers.lock().unwrap_or_else(PoisonError::into_inner);
        brokers.retain(|_, instances| {
            instances.retain(|instance| instance.strong_count() > 0);
            !instances.is_empty()
        });
        brokers.entry(name.to_owned()).or_default().push(broker);
    }

    /// The newest live instance of each broker, by name.
    fn live(&self) -> BTreeMap<String, Arc<dyn LocalPublish>> {
        self.brokers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(|(name, instances)| {
                Some((
                    name.clone(),
                    instances.iter().rev().find_map(Weak::upgrade)?,
                ))
            })
            .collect()
    }

    /// Publishes through broker source `name`.
    pub fn publish(
        &self,
        name: &str,
        topic: &str,
        payload: Bytes,
        qos: u8,
        retain: bool,
    ) -> Result<usize, LocalPublishError> {
        let broker = self
            .live()
            .remove(name)
            .ok_or_else(|| LocalPublishError::NotRunning(name.to_owned()))?;
        broker.publish(topic, payload, qos, retain)
    }

    /// Publishes through the only broker running.
    pub fn publish_to_only(
        &self,
        topic: &str,
        payload: Bytes,
        qos: u8,
        retain: bool,
    ) -> Result<usize, LocalPublishError> {
        let running: Vec<Arc<dyn LocalPublish>> = self.live().into_values().collect();
        match running.as_slice() {
            [broker] => broker.publish(topic, payload, qos, retain),
            _ => Err(LocalPublishError::NotOne(running.len())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counting(Mutex<Vec<String>>);

    impl LocalPublish for Counting {
        fn publish(
            &self,
            topic: &str,
            _payload: Bytes,
            _qos: u8,
            _retain: bool,
        ) -> Result<usize, LocalPublishError> {
            self.0.lock().expect("lock").push(topic.to_owned());
            Ok(1)
        }
    }

    #[test]
    fn a_dropped_broker_is_not_running() {
        let brokers = LocalBrokers::default();
        assert_eq!(
            brokers.publish("local", "a", Bytes::new(), 0, false),
            Err(LocalPublishError::NotRunning("local".into()))
        );
        let broker: Arc<dyn LocalPublish> = Arc::new(Counting(Mutex::default()));
        brokers.attach("local", Arc::downgrade(&broker));
        assert_eq!(
            brokers.publish("local", "a/b", Bytes::new(), 1, false),
            Ok(1)
        );
        assert_eq!(
            brokers.publish_to_only("a/c", Bytes::new(), 1, false),
            Ok(1)
        );
        drop(broker);
        assert_eq!(
            brokers.publish_to_only("a/c", Bytes::new(), 1, false),
            Err(LocalPublishError::NotOne(0))
        );
        assert!(matches!(
            brokers.publish("local", "a/b", Bytes::new(), 1, false),
            Err(LocalPublishError::NotRunning(_))
        ));
    }
}
