//! Rate limiting of failed authentication attempts, for every entry point (TCP hello, HTTP,
//! the admin token): a key gets a few free failures, then must wait a delay that doubles with
//! each further failure, up to a cap. Pure: the caller passes the time, so tests need no
//! sleeping.
//!
//! Keys live in two separate tables, so one kind can never be mistaken for the other (a device
//! may be called `ip:10.0.0.1`) nor evict the other's entries:
//! - **per source address**: every failure from an address, whatever it claimed to be;
//! - **per (device, address)**: failures for one device from one address. There is no table per
//!   device alone: failures from an attacker's address must not lock the real device out when
//!   it connects from another address with correct credentials.
//!
//! Memory is bounded: at most `max_entries` keys per table, least recently failed evicted
//! first, and keys idle for `forget_after` dropped.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::IpAddr;
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

/// Longest device id kept in a key; longer ones are truncated (valid ids are at most 128 bytes).
const MAX_KEY_LEN: usize = 256;

#[derive(Debug)]
struct Entry {
    failures: u32,
    blocked_until: Duration,
    last_failure: Duration,
    order: u64,
}

/// One namespace of keys with its failures, bounded in size.
#[derive(Debug)]
struct Table<K> {
    entries: HashMap<K, Entry>,
    /// Failure order -> key, oldest first, for eviction.
    by_age: BTreeMap<u64, K>,
    next_order: u64,
}

impl<K> Default for Table<K> {
    fn default() -> Self {
        Table {
            entries: HashMap::new(),
            by_age: BTreeMap::new(),
            next_order: 0,
        }
    }
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn check(&mut self, key: &K, now: Duration, config: &ThrottleConfig) -> Result<(), Duration> {
        let Some(entry) = self.entries.get(key) else {
            return Ok(());
        };
        if now.saturating_sub(entry.last_failure) >= config.forget_after {
            let order = entry.order;
            self.entries.remove(key);
            self.by_age.remove(&order);
            return Ok(());
        }
        if now < entry.blocked_until {
            return Err(entry.blocked_until - now);
        }
        Ok(())
    }

    /// Counts a failure; returns the failure count of `key` now.
    fn failure(&mut self, key: &K, now: Duration, config: &ThrottleConfig) -> u32 {
        let order = self.next_order;
        self.next_order += 1;
        let failures = match self.entries.get_mut(key) {
            Some(entry) => {
                self.by_age.remove(&entry.order);
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
                while self.entries.len() >= config.max_entries.max(1) {
                    let Some((_, oldest)) = self.by_age.pop_first() else {
                        break;
                    };
                    self.entries.remove(&oldest);
                }
                self.entries.insert(
                    key.clone(),
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
        self.by_age.insert(order, key.clone());
        let delay = delay_after(config, failures);
        if let Some(entry) = self.entries.get_mut(key) {
            entry.blocked_until = now.saturating_add(delay);
        }
        failures
    }

    fn success(&mut self, key: &K) {
        if let Some(entry) = self.entries.remove(key) {
            self.by_age.remove(&entry.order);
        }
    }
}

#[derive(Debug, Default)]
struct State {
    addresses: Table<IpAddr>,
    devices_at: Table<(String, IpAddr)>,
}

/// Growing delays for failed authentication attempts, per source address and per
/// (device, source address). Thread-safe.
#[derive(Debug, Default)]
pub struct AuthThrottle {
    config: ThrottleConfig,
    state: Mutex<State>,
}

fn device_key(device: &str, address: IpAddr) -> (String, IpAddr) {
    let mut end = device.len().min(MAX_KEY_LEN);
    while !device.is_char_boundary(end) {
        end -= 1;
    }
    (device[..end].to_owned(), address)
}

fn delay_after(config: &ThrottleConfig, failures: u32) -> Duration {
    if failures <= config.free_failures {
        return Duration::ZERO;
    }
    // At most 31 doublings: `1u32 << 32` overflows (a panic in debug builds, and a shift by
    // 0, i.e. the delay falling back to `base_delay`, in release builds).
    let doublings = (failures - config.free_failures - 1).min(31);
    config
        .base_delay
        .saturating_mul(1u32 << doublings)
        .min(config.max_delay)
}

impl AuthThrottle {
    /// A throttle with the given policy (the same for both tables).
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

    /// May `address` try now (for `device`, when the attempt names one)? `Err(retry_after)`
    /// while the address, or this device from this address, is blocked. Failures for the same
    /// device from other addresses do not count. `now` is monotonic time since an origin of
    /// the caller's choice (the same origin for every call).
    pub fn check(
        &self,
        address: IpAddr,
        device: Option<&str>,
        now: Duration,
    ) -> Result<(), Duration> {
        let config = &self.config;
        let mut state = self.lock();
        let by_address = state.addresses.check(&address, now, config).err();
        let by_device = device.and_then(|device| {
            state
                .devices_at
                .check(&device_key(device, address), now, config)
                .err()
        });
        match by_address.max(by_device) {
            Some(wait) => Err(wait),
            None => Ok(()),
        }
    }

    /// Record a failed attempt from `address` (for `device`, when it named one) at `now`.
    pub fn failure(&self, address: IpAddr, device: Option<&str>, now: Duration) {
        let config = &self.config;
        let mut state = self.lock();
        state.addresses.failure(&address, now, config);
        if let Some(device) = device {
            state
                .devices_at
                .failure(&device_key(device, address), now, config);
        }
    }

    /// Forget the failures of `address` and of `device` from it (after a successful
    /// authentication).
    pub fn success(&self, address: IpAddr, device: Option<&str>) {
        let mut state = self.lock();
        state.addresses.success(&address);
        if let Some(device) = device {
            state.devices_at.success(&device_key(device, address));
        }
    }

    /// Keys currently tracked, over both tables.
    pub fn len(&self) -> usize {
        let state = self.lock();
        state.addresses.entries.len() + state.devices_at.entries.len()
    }

    /// No key tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The delay imposed after the `failures`-th consecutive failure.
    pub fn delay_after(&self, failures: u32) -> Duration {
        delay_after(&self.config, failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn free_failures_then_doubling_delays_up_to_the_cap() {
        let throttle = AuthThrottle::default();
        let a = ip("10.0.0.1");
        let mut now = Duration::from_secs(1000);
        for _ in 0..5 {
            assert_eq!(throttle.check(a, None, now), Ok(()));
            throttle.failure(a, None, now);
        }
        assert_eq!(throttle.check(a, None, now), Ok(()), "5 failures are free");
        throttle.failure(a, None, now);
        assert_eq!(throttle.check(a, None, now), Err(S));
        assert_eq!(throttle.check(a, None, now + S / 2), Err(S / 2));
        now += S;
        assert_eq!(throttle.check(a, None, now), Ok(()));
        throttle.failure(a, None, now);
        assert_eq!(throttle.check(a, None, now), Err(2 * S));
        let expected = [4, 8, 16, 32, 64, 128, 256, 300, 300];
        for secs in expected {
            now += Duration::from_secs(400);
            throttle.failure(a, None, now);
            assert_eq!(throttle.check(a, None, now), Err(Duration::from_secs(secs)));
        }
    }

    #[test]
    fn other_addresses_are_unaffected_and_success_resets() {
        let throttle = AuthThrottle::default();
        let now = Duration::from_secs(5);
        for _ in 0..10 {
            throttle.failure(ip("10.0.0.1"), Some("dev-1"), now);
        }
        assert!(throttle.check(ip("10.0.0.1"), Some("dev-1"), now).is_err());
        assert!(throttle.check(ip("10.0.0.1"), None, now).is_err());
        assert_eq!(throttle.check(ip("10.0.0.2"), Some("dev-2"), now), Ok(()));
        throttle.success(ip("10.0.0.1"), Some("dev-1"));
        assert_eq!(throttle.check(ip("10.0.0.1"), Some("dev-1"), now), Ok(()));
    }

    /// Finding 9: a device id that looks like an address key never throttles that address.
    #[test]
    fn finding_9_device_ids_and_addresses_are_separate_namespaces() {
        let throttle = AuthThrottle::default();
        let now = Duration::from_secs(5);
        for _ in 0..20 {
            throttle.failure(ip("127.0.0.1"), Some("ip:127.0.10.50"), now);
            throttle.failure(ip("127.0.0.1"), Some("127.0.10.50"), now);
        }
        assert_eq!(throttle.check(ip("127.0.10.50"), None, now), Ok(()));
        assert_eq!(
            throttle.check(ip("127.0.10.50"), Some("dev-1"), now),
            Ok(())
        );
    }

    /// Finding 10: failures for a device from one address do not lock it out elsewhere.
    #[test]
    fn finding_10_a_device_stays_usable_from_an_address_without_failures() {
        let throttle = AuthThrottle::default();
        let now = Duration::from_secs(5);
        for _ in 0..20 {
            throttle.failure(ip("10.0.0.66"), Some("victim"), now);
        }
        assert!(
            throttle
                .check(ip("10.0.0.66"), Some("victim"), now)
                .is_err()
        );
        assert_eq!(throttle.check(ip("10.0.0.7"), Some("victim"), now), Ok(()));
        // The attacker's address stays blocked for every other device too.
        assert!(throttle.check(ip("10.0.0.66"), Some("other"), now).is_err());
    }

    #[test]
    fn many_failures_keep_the_longest_delay() {
        let throttle = AuthThrottle::default();
        for failures in [37, 38, 40, 1000, u32::MAX] {
            assert_eq!(throttle.delay_after(failures), Duration::from_secs(300));
        }
    }

    #[test]
    fn idle_keys_are_forgotten() {
        let throttle = AuthThrottle::default();
        let a = ip("10.0.0.1");
        for _ in 0..10 {
            throttle.failure(a, Some("dev-1"), Duration::ZERO);
        }
        // 10 failures: 5 free, then 1, 2, 4, 8, 16 s.
        assert_eq!(
            throttle.check(a, Some("dev-1"), Duration::from_secs(10)),
            Err(Duration::from_secs(6))
        );
        assert_eq!(
            throttle.check(a, Some("dev-1"), Duration::from_secs(900)),
            Ok(())
        );
        throttle.failure(a, Some("dev-1"), Duration::from_secs(901));
        assert_eq!(
            throttle.check(a, Some("dev-1"), Duration::from_secs(901)),
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
        let at = |ms: u64| Duration::from_millis(ms);
        for (i, key) in ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
            .iter()
            .enumerate()
        {
            throttle.failure(ip(key), None, at(i as u64));
        }
        assert_eq!(throttle.len(), 3);
        assert_eq!(
            throttle.check(ip("10.0.0.1"), None, at(10)),
            Ok(()),
            "evicted"
        );
        assert!(throttle.check(ip("10.0.0.4"), None, at(10)).is_err());
        // Refreshing .2 makes .3 the oldest.
        throttle.failure(ip("10.0.0.2"), None, at(20));
        throttle.failure(ip("10.0.0.5"), None, at(21));
        assert!(throttle.check(ip("10.0.0.2"), None, at(22)).is_err());
        assert_eq!(throttle.check(ip("10.0.0.3"), None, at(22)), Ok(()));
    }

    #[test]
    fn a_flood_of_device_keys_does_not_evict_addresses() {
        let throttle = AuthThrottle::new(ThrottleConfig {
            max_entries: 3,
            free_failures: 0,
            ..ThrottleConfig::default()
        });
        let now = Duration::from_secs(1);
        throttle.failure(ip("10.0.0.9"), None, now);
        for i in 0..100 {
            throttle.failure(ip("10.0.0.1"), Some(&format!("dev-{i}")), now);
        }
        assert!(throttle.check(ip("10.0.0.9"), None, now).is_err());
    }

    #[test]
    fn huge_device_ids_are_truncated() {
        let throttle = AuthThrottle::new(ThrottleConfig {
            free_failures: 0,
            ..ThrottleConfig::default()
        });
        let key = "é".repeat(100_000);
        throttle.failure(ip("10.0.0.1"), Some(&key), Duration::ZERO);
        assert!(
            throttle
                .check(ip("10.0.0.2"), Some(&key), Duration::ZERO)
                .is_ok()
        );
        throttle.success(ip("10.0.0.1"), None);
        assert!(
            throttle
                .check(ip("10.0.0.1"), Some(&key), Duration::ZERO)
                .is_err()
        );
        assert_eq!(throttle.len(), 1);
    }
}
