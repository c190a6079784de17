//! When to send the next message, and how long to wait before reconnecting.
//!
//! Pacing follows a fixed schedule (message k is due at origin + k/rate, plus
//! jitter), so a late send is caught up rather than silently lowering the rate.
//! Each device starts at a random phase so devices do not fire in lockstep.
//!
//! A run sends exactly the messages whose slot (due time without jitter) lies
//! inside it: `rate × duration` per device when that is a whole number, however
//! late a timer fires. Only a device more than [`LATE_SEND_GRACE`] behind its
//! schedule at the end (a target that cannot keep up) sends fewer.

use std::time::Duration;

use tokio::time::Instant;

/// How long past its end a run still sends messages whose slots lie inside it.
pub const LATE_SEND_GRACE: Duration = Duration::from_secs(1);

/// The send schedule of one device.
#[derive(Debug, Clone)]
pub struct Pacer {
    interval: Option<Duration>,
    jitter: f64,
    origin: Instant,
    index: u32,
    slot: Instant,
    due: Instant,
}

impl Pacer {
    /// `rate` messages per second (0 = no pacing), `jitter` as a fraction of the
    /// interval (0..=1), starting at `start` plus a random phase.
    pub fn new(rate: f64, jitter: f64, start: Instant, rng: &mut fastrand::Rng) -> Self {
        let interval = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
        let origin = interval.map_or(start, |interval| start + interval.mul_f64(rng.f64()));
        Self {
            interval,
            jitter: jitter.clamp(0.0, 1.0),
            origin,
            index: 0,
            slot: origin,
            due: origin,
        }
    }

    /// When the next message is due in a run that ends at `end`, or `None` when it
    /// does not belong to the run. Paced, it belongs when its slot lies before `end`
    /// (jitter never moves it past `end`); unpaced, while `now` is before `end`.
    /// Nothing belongs once `now` is [`LATE_SEND_GRACE`] past `end`.
    pub fn next_due(&self, now: Instant, end: Instant) -> Option<Instant> {
        if now >= end + LATE_SEND_GRACE {
            return None;
        }
        match self.interval {
            Some(_) => (self.slot < end).then(|| self.due.min(end)),
            None => (now < end).then_some(self.due),
        }
    }

    /// True when sends are unpaced (rate 0).
    pub fn unpaced(&self) -> bool {
        self.interval.is_none()
    }

    /// Moves to the next message.
    pub fn advance(&mut self, rng: &mut fastrand::Rng) {
        let Some(interval) = self.interval else {
            return;
        };
        self.index = self.index.saturating_add(1);
        let nominal = self.origin + interval * self.index;
        self.slot = nominal;
        let offset = interval.mul_f64(self.jitter * rng.f64());
        // Jitter moves a send up to ±jitter·interval around its slot; the mean rate is unchanged.
        self.due = if rng.bool() {
            nominal + offset
        } else {
            nominal
                .checked_sub(offset)
                .unwrap_or(nominal)
                .max(self.origin)
        };
    }
}

/// Capped, jittered exponential backoff for reconnects.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// Starts at `min`, doubles up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            current: min,
        }
    }

    /// The next wait: the current step scaled by a random factor in [0.5, 1).
    pub fn next_delay(&mut self, rng: &mut fastrand::Rng) -> Duration {
        let delay = self.current.mul_f64(0.5 + rng.f64() / 2.0);
        self.current = (self.current * 2).min(self.max);
        delay
    }

    /// Back to the first step after a successful connection.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn schedule_keeps_the_mean_rate() {
        let mut rng = fastrand::Rng::with_seed(1);
        let start = Instant::now();
        let mut pacer = Pacer::new(10.0, 0.5, start, &mut rng);
        let far = start + Duration::from_secs(86_400);
        let due = |pacer: &Pacer| pacer.next_due(start, far).unwrap();
        let first = due(&pacer);
        assert!(first >= start && first < start + Duration::from_millis(100));
        for _ in 0..1000 {
            pacer.advance(&mut rng);
        }
        let elapsed = due(&pacer) - first;
        assert!(
            elapsed > Duration::from_millis(99_950) && elapsed < Duration::from_millis(100_050)
        );
    }

    /// Sends every message the schedule allows, each `lateness` after it is due.
    fn messages_in_run(
        rate: f64,
        jitter: f64,
        run: Duration,
        lateness: Duration,
        seed: u64,
    ) -> u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let start = Instant::now();
        let end = start + run;
        let mut pacer = Pacer::new(rate, jitter, start, &mut rng);
        let mut now = start;
        let mut sent = 0;
        while let Some(due) = pacer.next_due(now, end) {
            now = now.max(due) + lateness;
            if pacer.next_due(now, end).is_none() {
                break;
            }
            sent += 1;
            pacer.advance(&mut rng);
        }
        sent
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_sends_exactly_rate_times_duration() {
        // The summary's `sent` is devices × rate × duration: timers that fire late (up
        // to the grace) and jitter change when messages go, not how many.
        let run = Duration::from_secs(20);
        for seed in 0..200 {
            for (jitter, lateness) in [
                (0.0, Duration::ZERO),
                (0.0, Duration::from_millis(2)),
                (0.5, Duration::from_millis(1)),
            ] {
                assert_eq!(
                    messages_in_run(10.0, jitter, run, lateness, seed),
                    200,
                    "seed {seed}, jitter {jitter}, lateness {lateness:?}"
                );
            }
        }
        // A device that falls further behind than the grace stops at the end plus the grace.
        let behind = messages_in_run(10.0, 0.0, run, Duration::from_millis(150), 1);
        assert!((100..190).contains(&behind), "{behind}");
    }

    #[tokio::test(start_paused = true)]
    async fn unpaced_is_always_due() {
        let mut rng = fastrand::Rng::with_seed(1);
        let start = Instant::now();
        let mut pacer = Pacer::new(0.0, 0.0, start, &mut rng);
        pacer.advance(&mut rng);
        assert!(pacer.unpaced());
        assert_eq!(
            pacer.next_due(start, start + Duration::from_secs(1)),
            Some(start)
        );
    }

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut rng = fastrand::Rng::with_seed(3);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<_> = (0..8).map(|_| backoff.next_delay(&mut rng)).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] < Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d < Duration::from_secs(1)));
        assert!(delays[7] >= Duration::from_millis(500));
        backoff.reset();
        assert!(backoff.next_delay(&mut rng) < Duration::from_millis(100));
    }
}
