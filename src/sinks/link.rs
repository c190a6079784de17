//! A sink's upstream link health: whether it has a healthy connection now, and since when.
//!
//! Sinks with an upstream (MQTT) report every change; others never do and stay up. The
//! health of a sink is kept per sink name in [`SinkLinks`], so it outlives the sink task
//! (a reload restarting the task, or reopening its buffer, keeps the same health and its
//! "down since"): failover decides on how long the link has been down, not on how long
//! the current task has run.
//!
//! Invariant: `since` changes only on a transition, so a link that fails again and again
//! without ever becoming healthy stays down since its first failure.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::time::Instant;

/// The state of a link at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkState {
    /// Whether the link is healthy (connected, and proven by an ack when it follows an
    /// outage).
    pub up: bool,
    /// When it last became `up` or down.
    pub since: Instant,
}

/// One sink's link health; clones share it.
#[derive(Debug, Clone)]
pub struct LinkHealth {
    state: Arc<watch::Sender<LinkState>>,
}

impl LinkHealth {
    /// A link that is up from now on until told otherwise.
    pub fn new() -> Self {
        Self::starting(true, Instant::now())
    }

    /// A link in a given state (tests).
    pub fn starting(up: bool, since: Instant) -> Self {
        let (state, _) = watch::channel(LinkState { up, since });
        Self {
            state: Arc::new(state),
        }
    }

    /// Reports the link up or down; only a change moves `since` and wakes watchers.
    pub fn report(&self, up: bool) {
        // The sink reports on every ack: a shared read lock in the usual no-change case
        // rather than the write lock of `send_if_modified`.
        if self.state.borrow().up == up {
            return;
        }
        self.state.send_if_modified(|state| {
            if state.up == up {
                return false;
            }
            *state = LinkState {
                up,
                since: Instant::now(),
            };
            true
        });
    }

    /// The state now.
    pub fn current(&self) -> LinkState {
        *self.state.borrow()
    }

    /// A receiver woken on every change.
    pub fn watch(&self) -> watch::Receiver<LinkState> {
        self.state.subscribe()
    }
}

impl Default for LinkHealth {
    fn default() -> Self {
        Self::new()
    }
}

/// The link health of every sink, by name, for the lifetime of the gateway.
#[derive(Debug, Default)]
pub struct SinkLinks {
    links: Mutex<BTreeMap<String, LinkHealth>>,
}

impl SinkLinks {
    /// The health of sink `name` (created up on first use).
    pub fn get(&self, name: &str) -> LinkHealth {
        self.links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// Forgets the sinks not in `keep` (removed by a reload).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|name, _| keep(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn since_moves_only_on_a_change() {
        let link = LinkHealth::new();
        let start = link.current().since;
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        link.report(true);
        assert_eq!(link.current().since, start, "up again is no change");
        link.report(false);
        let down = link.current();
        assert!(!down.up);
        assert_eq!(down.since, start + std::time::Duration::from_secs(1));
        tokio::time::advance(std::time::Duration::from_secs(5)).await;
        link.report(false);
        assert_eq!(link.current(), down, "a failure while down keeps `since`");
    }

    #[tokio::test]
    async fn the_same_name_shares_one_health() {
        let links = SinkLinks::default();
        links.get("eu").report(false);
        assert!(!links.get("eu").current().up);
        assert!(links.get("us").current().up);
        links.retain(|name| name == "us");
        assert!(links.get("eu").current().up, "forgotten, created anew");
    }
}
