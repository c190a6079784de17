//! The last failure of each action per device, for `/api/v1/alarms`, and the throttle
//! of the failure log line.
//!
//! A failure stays until the same action succeeds for the same device. The table holds
//! at most the rule's `max_devices` devices; beyond, the device whose last failure is
//! oldest is forgotten. It lives in memory only: after a restart, an alarm shows the
//! failures of actions run since.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use fieldgate_core::DeviceId;
use tokio::time::Instant;

use super::Transition;
pub use crate::transforms::alarm::board::ActionFailure;

/// One failure as the action task reports it.
pub struct Failure {
    /// The action's name.
    pub action: String,
    /// The transition it ran for.
    pub on: Transition,
    /// What went wrong.
    pub error: String,
    /// When, ms since the epoch.
    pub at: u64,
}

/// Last failures per device and action.
pub struct ActionStatus {
    max_devices: usize,
    failures: Mutex<HashMap<DeviceId, Vec<ActionFailure>>>,
}

impl ActionStatus {
    /// A table of at most `max_devices` devices.
    pub fn new(max_devices: usize) -> Self {
        Self {
            max_devices: max_devices.max(1),
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, Vec<ActionFailure>>> {
        self.failures.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `failure` of an action for `device`, replacing that action's previous one.
    pub fn failed(&self, device: &DeviceId, failure: Failure) {
        let mut failures = self.lock();
        if !failures.contains_key(device) && failures.len() >= self.max_devices {
            let oldest = failures
                .iter()
                .min_by_key(|(_, list)| list.iter().map(|failure| failure.at).max())
                .map(|(device, _)| device.clone());
            if let Some(oldest) = oldest {
                failures.remove(&oldest);
            }
        }
        let list = failures.entry(device.clone()).or_default();
        list.retain(|old| old.action != failure.action);
        list.push(ActionFailure {
            action: failure.action,
            on: failure.on.as_str().to_owned(),
            error: failure.error,
            at: failure.at,
        });
    }

    /// `action` succeeded for `device`: its failure is over.
    pub fn succeeded(&self, device: &DeviceId, action: &str) {
        let mut failures = self.lock();
        if let Some(list) = failures.get_mut(device) {
            list.retain(|failure| failure.action != action);
            if list.is_empty() {
                failures.remove(device);
            }
        }
    }

    /// The failures standing for `device`, by action name.
    pub fn of(&self, device: &DeviceId) -> Vec<ActionFailure> {
        let mut list = self.lock().get(device).cloned().unwrap_or_default();
        list.sort_by(|a, b| a.action.cmp(&b.action));
        list
    }

    /// Devices with a failure (for the tests).
    #[cfg(test)]
    pub fn devices(&self) -> usize {
        self.lock().len()
    }
}

/// Lets one log line through per window and counts the ones held back.
pub struct LogThrottle {
    window: Duration,
    next: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl LogThrottle {
    /// At most one line per `window`.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            next: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one)` when a line may be written now.
    pub fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
        if next.is_some_and(|next| now < next) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *next = Some(now + self.window);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn failure(action: &str, at: u64) -> Failure {
        Failure {
            action: action.into(),
            on: Transition::Raise,
            error: format!("e{at}"),
            at,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_throttle_lets_one_line_per_window_and_counts_the_rest() {
        let throttle = LogThrottle::new(Duration::from_secs(10));
        assert_eq!(throttle.allow(), Some(0));
        assert_eq!(throttle.allow(), None);
        assert_eq!(throttle.allow(), None);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(throttle.allow(), Some(2));
        assert_eq!(throttle.allow(), None);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Fail(u8, u8),
        Succeed(u8, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..6u8, 0..3u8).prop_map(|(d, a)| Op::Fail(d, a)),
            (0..6u8, 0..3u8).prop_map(|(d, a)| Op::Succeed(d, a)),
        ]
    }

    proptest! {
        /// Against a model without a bound: the table never holds more than its bound,
        /// and every failure it shows is the model's last failure of that action.
        #[test]
        fn matches_a_model_within_its_bound(ops in proptest::collection::vec(op(), 0..80)) {
            let status = ActionStatus::new(4);
            let mut model: BTreeMap<(u8, u8), u64> = BTreeMap::new();
            let mut touched = std::collections::BTreeSet::new();
            for (at, op) in ops.into_iter().enumerate() {
                let at = at as u64;
                match op {
                    Op::Fail(device, action) => {
                        status.failed(&DeviceId::new(&format!("d{device}")), failure(&format!("a{action}"), at));
                        model.insert((device, action), at);
                        touched.insert(device);
                    }
                    Op::Succeed(device, action) => {
                        status.succeeded(&DeviceId::new(&format!("d{device}")), &format!("a{action}"));
                        model.remove(&(device, action));
                    }
                }
                prop_assert!(status.devices() <= 4);
                for device in 0..6u8 {
                    for shown in status.of(&DeviceId::new(&format!("d{device}"))) {
                        let action: u8 = shown.action[1..].parse().expect("a<n>");
                        prop_assert_eq!(model.get(&(device, action)), Some(&shown.at));
                        prop_assert_eq!(shown.error, format!("e{}", shown.at));
                    }
                }
            }
            // While no more devices than the bound ever failed, nothing is forgotten.
            if touched.len() <= 4 {
                for ((device, action), at) in &model {
                    let shown = status.of(&DeviceId::new(&format!("d{device}")));
                    let name = format!("a{action}");
                    prop_assert!(shown.iter().any(|f| f.action == name && f.at == *at));
                }
            }
        }
    }
}
