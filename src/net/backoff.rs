//! Reconnect delays: fast while an outage is young, then capped exponential with jitter.
//!
//! Most outages are short (a broker restart, a load balancer failover), and a user
//! wants data flowing again within a couple of seconds of the broker's return. A long
//! outage is different: thousands of gateways retrying every second would hammer a
//! recovering cloud. So for the first [`FAST_WINDOW`] of an outage the delay stays at
//! `min` (jittered); after that it doubles per attempt up to `max`. Every delay is scaled
//! by a random 50-100 % so a fleet does not reconnect in lockstep. The outage (and the
//! growth) ends only when a connection proved healthy, not at every CONNACK: a broker that
//! accepts and then drops us at once keeps the backoff growing.

use std::time::Duration;

use tokio::time::Instant;

/// How long an outage is retried at the fastest rate before the delay grows.
pub const FAST_WINDOW: Duration = Duration::from_secs(30);

/// Reconnect delays from `min` to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    /// Attempts since the fast window ended.
    slow_attempts: u32,
    /// When the current outage began; `None` while healthy.
    outage_since: Option<Instant>,
}

impl Backoff {
    /// Delays from `min` to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            slow_attempts: 0,
            outage_since: None,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let now = Instant::now();
        let since = *self.outage_since.get_or_insert(now);
        let ceiling = if now.duration_since(since) < FAST_WINDOW {
            self.min
        } else {
            let factor = 2u32.saturating_pow(self.slow_attempts.min(20));
            self.slow_attempts = self.slow_attempts.saturating_add(1);
            self.min.saturating_mul(factor).min(self.max)
        };
        ceiling.mul_f64(0.5 + fastrand::f64() / 2.0)
    }

    /// The connection proved healthy: the next outage starts fast again.
    pub fn reset(&mut self) {
        self.slow_attempts = 0;
        self.outage_since = None;
    }

    /// Whether an outage is under way (no healthy connection since the last failure).
    pub fn in_outage(&self) -> bool {
        self.outage_since.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn fast_while_young_then_grows_to_the_cap_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let mut waited = Duration::ZERO;
        while waited < FAST_WINDOW {
            let delay = backoff.next_delay();
            assert!(delay >= Duration::from_millis(500) && delay <= Duration::from_secs(1));
            tokio::time::advance(delay).await;
            waited += delay;
        }
        let slow: Vec<Duration> = (0..12)
            .map(|_| {
                let delay = backoff.next_delay();
                assert!(delay <= Duration::from_secs(60));
                delay
            })
            .collect();
        assert!(slow[3] >= Duration::from_secs(4) && slow[3] <= Duration::from_secs(8));
        for delay in &slow[7..] {
            assert!(*delay >= Duration::from_secs(30));
        }
        backoff.reset();
        assert!(!backoff.in_outage());
        assert!(backoff.next_delay() <= Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_reset_ends_the_outage() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        backoff.next_delay();
        tokio::time::advance(FAST_WINDOW).await;
        // A CONNACK without a healthy connection does not reset: delays keep growing.
        let first = backoff.next_delay();
        let later: Duration = (0..8)
            .map(|_| backoff.next_delay())
            .max()
            .unwrap_or_default();
        assert!(later > first);
        assert!(backoff.in_outage());
    }
}
