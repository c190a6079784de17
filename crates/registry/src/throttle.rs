//! Rate limiting of failed authentication attempts, for every entry point (TCP hello, HTTP,
//! later MQTT): a key (source address, device id) gets a few free failures, then must wait a
//! delay that doubles with each further failure, up to a cap. Pure: the caller passes the time,
//! so tests need no sleeping. Memory is bounded: at most `max_entries` keys, least recently
//! failed evicted first, and keys idle for `forget_after` dropped.
//!
//! Use one throttle per key kind (one for addresses, one for device ids) so that a flood of
//! addresses cannot evict the entries of the devices under attack.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

/// How an [`AuthThrottle`] grows its delays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// Failures allowed without delay.
    pub free_failures: u32,
    /// Delay after the first failure beyond the free ones; doubles with each further one.
    pub base_delay: Duration,
    /// Largest delay.
    pub max_delay: Duration,
    /// Most keys tracked; the least recently failed key is evicted beyond it.
    pub max_entries: usize,
    /// A key with no failure for this long starts over.
    pub forget_after: Duration,
}

impl Default for ThrottleConfig {
    /// 5 free failures, then 1 s doubling to 5 min; 100,000 keys; forgotten after 15 min.
    fn default() -> ThrottleConfig {
        ThrottleConfig {
            free_failures: 5,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(300),
            max_entries: 100_000,
            forget_after: Duration::from_secs(900),
        }
    }
}

/// Longest key stored; longer keys are truncated (they are addresses and device ids).
const MAX_KEY_LEN: usize = 256;

#[derive(Debug)]
struct Entry {
    failures: u32,
    blocked_until: Duration,
    last_failure: Duration,
    order: u64,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// Failure order -> key, oldest first, for eviction.
    by_age: BTreeMap<u64, String>,
    next_order: u64,
}

/// Growing delays for failed authentication attempts, per key. Thread-safe.
#[derive(Debug, Default)]
pub struct AuthThrottle {
    config: ThrottleConfig,
    state: Mutex<State>,
}

fn bounded_key(key: &str) -> &str {
    if key.len() <= MAX_KEY_LEN {
        return key;
    }
    let mut end = MAX_KEY_LEN;
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    &key[..end]
}

impl AuthThrottle {
    /// A throttle with the given policy.
    pub fn new(config: ThrottleConfig) -> AuthThrottle {
        AuthThrottle {
            config,
            state: Mutex::new(State::default()),
        }
    }

    /// The policy.
    pub fn config(&self) -> &ThrottleConfig {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the maps inconsistent in a way that
        // matters (worst case one stale entry), so recover from poisoning.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// May `key` try now? `Err(retry_after)` while it is blocked. `now` is monotonic time since
    /// an origin of the caller's choice (the same origin for every call).
    pub fn check(&self, key: &str, now: Duration) -> Result<(), Duration> {
        let key = bounded_key(key);
        let mut state = self.lock();
        let Some(entry) = state.entries.get(key) else {
            return Ok(());
        };
        if now.saturating_sub(entry.last_failure) >= self.config.forget_after {
            let order = entry.order;
            state.entries.remove(key);
            state.by_age.remove(&order);
            return Ok(());
        }
        if now < entry.blocked_until {
            return Err(entry.blocked_until - now);
        }
        Ok(())
    }

    /// Record a failed attempt by `key` at `now`.
    pub fn failure(&self, key: &str, now: Duration) {
        let key = bounded_key(key);
        let config = &self.config;
        let mut guard = self.lock();
        let state = &mut *guard;
        let order = state.next_order;
        state.next_order += 1;
        let failures = match state.entries.get_mut(key) {
            Some(entry) => {
                state.by_age.remove(&entry.order);
                let forgotten = now.saturating_sub(entry.last_failure) >= config.forget_after;
                entry.failures = if forgotten {
                    1
                } else {
                    entry.failures.saturating_add(1)
                };
                entry.last_failure = now;
                entry.order = order;
                entry.failures
            }
            None => {
                while state.entries.len() >= config.max_entries.max(1) {
                    let Some((_, oldest)) = state.by_age.pop_first() else {
                        break;
                    };
                    state.entries.remove(&oldest);
                }
                state.entries.insert(
                    key.to_owned(),
                    Entry {
                        failures: 1,
                        blocked_until: Duration::ZERO,
                        last_failure: now,
                        order,
                    },
                );
                1
            }
        };
        state.by_age.insert(order, key.to_owned());
        let delay = self.delay_after(failures);
        if let Some(entry) = state.entries.get_mut(key) {
            entry.blocked_until = now.saturating_add(delay);
        }
    }

    /// Forget `key`'s failures (call after a successful authentication).
    pub fn success(&self, key: &str) {
        let key = bounded_key(key);
        let mut state = self.lock();
        if let Some(entry) = state.entries.remove(key) {
            state.by_age.remove(&entry.order);
        }
    }

    /// Keys currently tracked.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// No key tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The delay imposed after the `failures`-th consecutive failure.
    pub fn delay_after(&self, failures: u32) -> Duration {
        let config = &self.config;
        if failures <= config.free_failures {
            return Duration::ZERO;
        }
        let doublings = (failures - config.free_failures - 1).min(32);
        config
            .base_delay
            .saturating_mul(1u32 << doublings)
            .min(config.max_delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn free_failures_then_doubling_delays_up_to_the_cap() {
        let throttle = AuthThrottle::default();
        let mut now = Duration::from_secs(1000);
        for _ in 0..5 {
            assert_eq!(throttle.check("10.0.0.1", now), Ok(()));
            throttle.failure("10.0.0.1", now);
        }
        assert_eq!(
            throttle.check("10.0.0.1", now),
            Ok(()),
            "5 failures are free"
        );
        throttle.failure("10.0.0.1", now);
        assert_eq!(throttle.check("10.0.0.1", now), Err(S));
        assert_eq!(throttle.check("10.0.0.1", now + S / 2), Err(S / 2));
        now += S;
        assert_eq!(throttle.check("10.0.0.1", now), Ok(()));
        throttle.failure("10.0.0.1", now);
        assert_eq!(throttle.check("10.0.0.1", now), Err(2 * S));
        let expected = [4, 8, 16, 32, 64, 128, 256, 300, 300];
        for secs in expected {
            now += Duration::from_secs(400);
            throttle.failure("10.0.0.1", now);
            assert_eq!(
                throttle.check("10.0.0.1", now),
                Err(Duration::from_secs(secs))
            );
        }
    }

    #[test]
    fn other_keys_are_unaffected_and_success_resets() {
        let throttle = AuthThrottle::default();
        let now = Duration::from_secs(5);
        for _ in 0..10 {
            throttle.failure("dev-1", now);
        }
        assert!(throttle.check("dev-1", now).is_err());
        assert_eq!(throttle.check("dev-2", now), Ok(()));
        throttle.success("dev-1");
        assert_eq!(throttle.check("dev-1", now), Ok(()));
    }

    #[test]
    fn idle_keys_are_forgotten() {
        let throttle = AuthThrottle::default();
        for _ in 0..10 {
            throttle.failure("dev-1", Duration::ZERO);
        }
        // 10 failures: 5 free, then 1, 2, 4, 8, 16 s.
        assert_eq!(
            throttle.check("dev-1", Duration::from_secs(10)),
            Err(Duration::from_secs(6))
        );
        assert_eq!(throttle.check("dev-1", Duration::from_secs(900)), Ok(()));
        throttle.failure("dev-1", Duration::from_secs(901));
        assert_eq!(
            throttle.check("dev-1", Duration::from_secs(901)),
            Ok(()),
            "starts over"
        );
    }

    #[test]
    fn memory_is_bounded_and_oldest_is_evicted() {
        let throttle = AuthThrottle::new(ThrottleConfig {
            max_entries: 3,
            free_failures: 0,
            ..ThrottleConfig::default()
        });
        for (i, key) in ["a", "b", "c", "d"].iter().enumerate() {
            throttle.failure(key, Duration::from_millis(i as u64));
        }
        assert_eq!(throttle.len(), 3);
        assert_eq!(
            throttle.check("a", Duration::from_millis(10)),
            Ok(()),
            "evicted"
        );
        assert!(throttle.check("d", Duration::from_millis(10)).is_err());
        // Refreshing "b" makes "c" the oldest.
        throttle.failure("b", Duration::from_millis(20));
        throttle.failure("e", Duration::from_millis(21));
        assert!(throttle.check("b", Duration::from_millis(22)).is_err());
        assert_eq!(throttle.check("c", Duration::from_millis(22)), Ok(()));
    }

    #[test]
    fn huge_keys_are_truncated() {
        let throttle = AuthThrottle::new(ThrottleConfig {
            free_failures: 0,
            ..ThrottleConfig::default()
        });
        let key = "é".repeat(100_000);
        throttle.failure(&key, Duration::ZERO);
        assert!(throttle.check(&key, Duration::ZERO).is_err());
        assert_eq!(throttle.len(), 1);
    }
}
