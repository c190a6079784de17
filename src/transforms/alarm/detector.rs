//! The detectors: pure state machines from one device's readings (and the clock, for
//! `missing`) to "raise" or "clear", with the numbers that decided it.
//!
//! Invariants: a detector says `Raise` only while its alarm is inactive and `Clear` only
//! while it is active (the caller passes which); readings older than the newest one
//! already judged are ignored (a late reading must not clear a newer alarm), except by
//! `rate_of_change`, which files them into its window by time.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Most readings a `rate_of_change` window keeps per device.
pub const MAX_WINDOW_READINGS: usize = 1024;

/// Limits with hysteresis: raise beyond a limit, clear once back past a second one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bands {
    /// Raise above the first, clear below the second.
    pub high: Option<(f64, f64)>,
    /// Raise below the first, clear above the second.
    pub low: Option<(f64, f64)>,
}

/// Which limit raised the alarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The upper limit (`above`).
    High,
    /// The lower limit (`below`).
    Low,
    /// Not a limit (`stuck`, `missing`).
    Condition,
}

/// A compiled detector.
#[derive(Debug, Clone, PartialEq)]
pub enum Detector {
    /// The value against the bands.
    Threshold(Bands),
    /// The value's change per second over `window_ms`, against the bands.
    RateOfChange {
        /// Readings older than the newest minus this are dropped.
        window_ms: u64,
        /// Limits on the rate.
        bands: Bands,
    },
    /// The value's z-score against an EWMA mean and variance, against the bands.
    Zscore {
        /// Weight of a new reading.
        alpha: f64,
        /// Readings seen before the detector judges.
        warmup: u64,
        /// Limits on the absolute z-score.
        bands: Bands,
    },
    /// The same value for `count` readings or for `duration_ms`.
    Stuck {
        /// Readings in a row.
        count: Option<u64>,
        /// Time with the same value.
        duration_ms: Option<u64>,
    },
    /// No reading for `count` intervals of `interval_ms`.
    Missing {
        /// The expected reporting interval.
        interval_ms: u64,
        /// Intervals without a reading that raise the alarm.
        count: u64,
    },
}

/// What a detector decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Raise the alarm.
    Raise {
        /// The judged value.
        value: Option<f64>,
        /// The limit it crossed.
        threshold: Option<f64>,
        /// Which limit.
        side: Side,
    },
    /// Clear the alarm.
    Clear {
        /// The judged value.
        value: Option<f64>,
        /// The limit it came back past.
        threshold: Option<f64>,
    },
}

/// One device's detector state (checkpointed).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DetectorState {
    /// Newest reading time judged, ms.
    pub newest_ms: Option<u64>,
    /// `rate_of_change`: readings in the window, by time.
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    pub window: VecDeque<(u64, f64)>,
    /// `zscore`: EWMA mean, variance and readings seen.
    #[serde(default)]
    pub mean: f64,
    /// `zscore`: EWMA variance.
    #[serde(default)]
    pub variance: f64,
    /// `zscore`: readings seen; `stuck`: readings with the same value in a row.
    #[serde(default)]
    pub seen: u64,
    /// `stuck`: the repeated value and since when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeated: Option<(Value, u64)>,
}

impl Bands {
    /// The verdict for `value`, given whether the alarm is active and which side
    /// raised it.
    pub fn judge(&self, value: f64, active: Option<Side>) -> Option<Verdict> {
        // A rate or z-score that overflowed judges nothing.
        if !value.is_finite() {
            return None;
        }
        match active {
            None => {
                if let Some((above, _)) = self.high.filter(|(above, _)| value > *above) {
                    return Some(Verdict::Raise {
                        value: Some(value),
                        threshold: Some(above),
                        side: Side::High,
                    });
                }
                let (below, _) = self.low.filter(|(below, _)| value < *below)?;
                Some(Verdict::Raise {
                    value: Some(value),
                    threshold: Some(below),
                    side: Side::Low,
                })
            }
            Some(Side::High) => {
                let (_, clear_below) = self.high?;
                (value < clear_below).then_some(Verdict::Clear {
                    value: Some(value),
                    threshold: Some(clear_below),
                })
            }
            Some(Side::Low) => {
                let (_, clear_above) = self.low?;
                (value > clear_above).then_some(Verdict::Clear {
                    value: Some(value),
                    threshold: Some(clear_above),
                })
            }
            Some(Side::Condition) => None,
        }
    }
}

impl Detector {
    /// The detector's name in config, events and the API.
    pub fn name(&self) -> &'static str {
        match self {
            Detector::Threshold(_) => "threshold",
            Detector::RateOfChange { .. } => "rate_of_change",
            Detector::Zscore { .. } => "zscore",
            Detector::Stuck { .. } => "stuck",
            Detector::Missing { .. } => "missing",
        }
    }

    /// Judges a reading of `value` at `time_ms`; `active` is the side of the device's
    /// active alarm, if any.
    pub fn reading(
        &self,
        state: &mut DetectorState,
        time_ms: u64,
        value: &Value,
        active: Option<Side>,
    ) -> Option<Verdict> {
        if let Detector::RateOfChange { window_ms, bands } = self {
            return rate_of_change(state, time_ms, value.as_f64()?, *window_ms, bands, active);
        }
        if state.newest_ms.is_some_and(|newest| time_ms < newest) {
            return None;
        }
        state.newest_ms = Some(time_ms);
        match self {
            Detector::Threshold(bands) => bands.judge(value.as_f64()?, active),
            Detector::Zscore {
                alpha,
                warmup,
                bands,
            } => zscore(state, value.as_f64()?, *alpha, *warmup, bands, active),
            Detector::Stuck { count, duration_ms } => {
                stuck(state, time_ms, value, *count, *duration_ms, active)
            }
            // Any reading ends a gap.
            Detector::Missing { .. } => active.map(|_| Verdict::Clear {
                value: value.as_f64(),
                threshold: None,
            }),
            Detector::RateOfChange { .. } => None,
        }
    }

    /// Judges the silence of a device last heard at `last_heard_ms` (wall clock) at
    /// `now_ms`: only `missing` raises here.
    pub fn silence(
        &self,
        last_heard_ms: u64,
        now_ms: u64,
        active: Option<Side>,
    ) -> Option<Verdict> {
        let Detector::Missing { interval_ms, count } = self else {
            return None;
        };
        let limit = interval_ms.saturating_mul(*count);
        (active.is_none() && now_ms.saturating_sub(last_heard_ms) >= limit).then_some(
            Verdict::Raise {
                value: None,
                #[allow(clippy::cast_precision_loss, reason = "seconds, for people")]
                threshold: Some(limit as f64 / 1000.0),
                side: Side::Condition,
            },
        )
    }
}

fn rate_of_change(
    state: &mut DetectorState,
    time_ms: u64,
    value: f64,
    window_ms: u64,
    bands: &Bands,
    active: Option<Side>,
) -> Option<Verdict> {
    let newest = state.newest_ms.unwrap_or(time_ms).max(time_ms);
    let oldest_kept = newest.saturating_sub(window_ms);
    if time_ms < oldest_kept {
        return None;
    }
    // Filed by time: a late reading lands where it belongs.
    let at = state.window.partition_point(|(time, _)| *time <= time_ms);
    state.window.insert(at, (time_ms, value));
    state.newest_ms = Some(newest);
    while state
        .window
        .front()
        .is_some_and(|(time, _)| *time < oldest_kept)
        || state.window.len() > MAX_WINDOW_READINGS
    {
        state.window.pop_front();
    }
    let (first_time, first) = *state.window.front()?;
    let (last_time, last) = *state.window.back()?;
    if last_time <= first_time {
        return None;
    }
    #[allow(clippy::cast_precision_loss, reason = "milliseconds well below 2^52")]
    let seconds = (last_time - first_time) as f64 / 1000.0;
    bands.judge((last - first) / seconds, active)
}

fn zscore(
    state: &mut DetectorState,
    value: f64,
    alpha: f64,
    warmup: u64,
    bands: &Bands,
    active: Option<Side>,
) -> Option<Verdict> {
    let verdict = if state.seen >= warmup && state.variance > 0.0 {
        let z = (value - state.mean).abs() / state.variance.sqrt();
        bands.judge(z, active)
    } else {
        None
    };
    if state.seen == 0 {
        state.mean = value;
        state.variance = 0.0;
    } else {
        let diff = value - state.mean;
        let increment = alpha * diff;
        state.mean += increment;
        state.variance = (1.0 - alpha) * (state.variance + diff * increment);
        if !(state.mean.is_finite() && state.variance.is_finite()) {
            // Readings near f64::MAX overflowed the statistics: start over from this one.
            state.mean = value;
            state.variance = 0.0;
            state.seen = 0;
        }
    }
    state.seen = state.seen.saturating_add(1);
    verdict
}

fn stuck(
    state: &mut DetectorState,
    time_ms: u64,
    value: &Value,
    count: Option<u64>,
    duration_ms: Option<u64>,
    active: Option<Side>,
) -> Option<Verdict> {
    let same = state
        .repeated
        .as_ref()
        .is_some_and(|(repeated, _)| repeated == value);
    if !same {
        state.repeated = Some((value.clone(), time_ms));
        state.seen = 1;
        return active.map(|_| Verdict::Clear {
            value: value.as_f64(),
            threshold: None,
        });
    }
    state.seen = state.seen.saturating_add(1);
    let since = state.repeated.as_ref().map_or(time_ms, |(_, since)| *since);
    if active.is_some() {
        return None;
    }
    #[allow(clippy::cast_precision_loss, reason = "counts and seconds, for people")]
    if let Some(count) = count.filter(|count| state.seen >= *count) {
        return Some(Verdict::Raise {
            value: value.as_f64(),
            threshold: Some(count as f64),
            side: Side::Condition,
        });
    }
    #[allow(clippy::cast_precision_loss, reason = "counts and seconds, for people")]
    if let Some(duration) = duration_ms.filter(|duration| time_ms - since >= *duration) {
        return Some(Verdict::Raise {
            value: value.as_f64(),
            threshold: Some(duration as f64 / 1000.0),
            side: Side::Condition,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn high(above: f64, clear_below: f64) -> Bands {
        Bands {
            high: Some((above, clear_below)),
            low: None,
        }
    }

    /// Runs `detector` over `(time, value)` readings, keeping the active side as the
    /// transform would, and returns `r`/`c` per reading that raised/cleared.
    fn run(detector: &Detector, readings: &[(u64, Value)]) -> String {
        let mut state = DetectorState::default();
        let mut active = None;
        let mut out = String::new();
        for (time, value) in readings {
            match detector.reading(&mut state, *time, value, active) {
                Some(Verdict::Raise { side, .. }) => {
                    assert!(active.is_none(), "raise while active");
                    active = Some(side);
                    out.push('r');
                }
                Some(Verdict::Clear { .. }) => {
                    assert!(active.is_some(), "clear while inactive");
                    active = None;
                    out.push('c');
                }
                None => out.push('.'),
            }
        }
        out
    }

    fn series(values: &[f64]) -> Vec<(u64, Value)> {
        (0u64..)
            .zip(values)
            .map(|(index, value)| (index * 1000, Value::from(*value)))
            .collect()
    }

    #[test]
    fn threshold_with_hysteresis() {
        let detector = Detector::Threshold(high(80.0, 75.0));
        let readings = series(&[70.0, 81.0, 90.0, 78.0, 76.0, 74.0, 79.0, 80.5]);
        assert_eq!(run(&detector, &readings), ".r...c.r");
    }

    #[test]
    fn threshold_low_side_clears_above_its_own_limit() {
        let detector = Detector::Threshold(Bands {
            high: None,
            low: Some((10.0, 12.0)),
        });
        assert_eq!(
            run(&detector, &series(&[15.0, 9.0, 11.0, 12.5, 9.9])),
            ".r.cr"
        );
    }

    #[test]
    fn threshold_ignores_late_readings() {
        let detector = Detector::Threshold(high(80.0, 75.0));
        // t=2s raises; the reading of t=1s arrives after it and must not clear it.
        let readings = vec![
            (0, Value::from(70.0)),
            (2000, Value::from(85.0)),
            (1000, Value::from(60.0)),
            (3000, Value::from(60.0)),
        ];
        assert_eq!(run(&detector, &readings), ".r.c");
    }

    #[test]
    fn threshold_ignores_non_numbers() {
        let detector = Detector::Threshold(high(80.0, 75.0));
        let readings = vec![
            (0, Value::from("hot")),
            (1, Value::Null),
            (2, Value::from(81)),
        ];
        assert_eq!(run(&detector, &readings), "..r");
    }

    #[test]
    fn rate_of_change_over_a_window_with_out_of_order_readings() {
        let detector = Detector::RateOfChange {
            window_ms: 2000,
            bands: high(5.0, 1.0),
        };
        // 0s:10, 1s:12 (2/s), 3s:30 arrives before 2s:20 → window [1s..3s]: 18/2s = 9/s.
        let readings = vec![
            (0, Value::from(10.0)),
            (1000, Value::from(12.0)),
            (3000, Value::from(30.0)),
            (2000, Value::from(20.0)),
            // Too old for the window: ignored.
            (500, Value::from(-100.0)),
            (5000, Value::from(30.5)),
        ];
        // Rates: -, 2, 9 (raise), 9 (window 1..3 still), ignored, (30.5-30)/2 = 0.25 (clear).
        assert_eq!(run(&detector, &readings), "..r..c");
    }

    #[test]
    fn zscore_flags_an_outlier_after_warm_up() {
        let detector = Detector::Zscore {
            alpha: 0.1,
            warmup: 10,
            bands: high(3.0, 2.0),
        };
        let mut values: Vec<f64> = (0..30)
            .map(|index| 20.0 + if index % 2 == 0 { 0.5 } else { -0.5 })
            .collect();
        values.push(40.0);
        values.push(20.0);
        let result = run(&detector, &series(&values));
        assert_eq!(&result[..30], &".".repeat(30), "no alarm in normal noise");
        assert_eq!(&result[30..], "rc");
        // During warm-up even a wild value raises nothing.
        assert_eq!(run(&detector, &series(&[1.0, 1000.0, -1000.0])), "...");
    }

    #[test]
    fn stuck_by_count_and_by_duration() {
        let by_count = Detector::Stuck {
            count: Some(3),
            duration_ms: None,
        };
        assert_eq!(
            run(&by_count, &series(&[1.0, 2.0, 2.0, 2.0, 2.0, 3.0])),
            "...r.c"
        );
        let by_time = Detector::Stuck {
            count: None,
            duration_ms: Some(2500),
        };
        assert_eq!(run(&by_time, &series(&[5.0, 5.0, 5.0, 5.0, 6.0])), "...rc");
        // Strings can be stuck too.
        let readings: Vec<(u64, Value)> = (0..3).map(|time| (time, Value::from("E42"))).collect();
        assert_eq!(run(&by_count, &readings), "..r");
    }

    #[test]
    fn missing_raises_on_silence_and_clears_on_a_reading() {
        let detector = Detector::Missing {
            interval_ms: 1000,
            count: 3,
        };
        assert_eq!(detector.silence(10_000, 12_999, None), None);
        let Some(Verdict::Raise { threshold, .. }) = detector.silence(10_000, 13_000, None) else {
            panic!("silence of 3 intervals raises");
        };
        assert_eq!(threshold, Some(3.0));
        assert_eq!(
            detector.silence(10_000, 20_000, Some(Side::Condition)),
            None,
            "raised once"
        );
        let mut state = DetectorState::default();
        assert!(matches!(
            detector.reading(&mut state, 20_000, &Value::from(1), Some(Side::Condition)),
            Some(Verdict::Clear { .. })
        ));
    }

    mod model {
        //! The threshold detector against a model: never two raises without a clear in
        //! between, a clear only after a raise, and raise/clear exactly where the limits
        //! say.

        use proptest::prelude::*;

        use super::*;

        proptest! {
            #[test]
            fn threshold_state_machine_matches_the_model(
                above in -100.0f64..100.0,
                gap in 0.0f64..20.0,
                values in prop::collection::vec(-150.0f64..150.0, 0..200),
            ) {
                let clear_below = above - gap;
                let detector = Detector::Threshold(high(above, clear_below));
                let mut state = DetectorState::default();
                let mut active = None;
                let mut model_active = false;
                for (time, value) in (0u64..).zip(&values) {
                    let verdict = detector.reading(&mut state, time, &Value::from(*value), active);
                    let expected_raise = !model_active && *value > above;
                    let expected_clear = model_active && *value < clear_below;
                    match verdict {
                        Some(Verdict::Raise { side, .. }) => {
                            prop_assert!(expected_raise, "raise at {value} while active={model_active}");
                            prop_assert!(active.is_none());
                            active = Some(side);
                            model_active = true;
                        }
                        Some(Verdict::Clear { .. }) => {
                            prop_assert!(expected_clear, "clear at {value} while active={model_active}");
                            prop_assert!(active.is_some());
                            active = None;
                            model_active = false;
                        }
                        None => prop_assert!(!expected_raise && !expected_clear),
                    }
                }
            }
        }
    }
}
