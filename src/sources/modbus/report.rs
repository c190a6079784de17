//! What one poll reports: each point's value and quality, and, with `report_on_change`,
//! only the points that moved beyond their deadband or changed quality.
//!
//! Pure (the clock is passed in). The payload is one JSON object:
//! `{"temperature":21.5,"pump":true,"quality":{"temperature":"good","pump":"good"},
//! "units":{"temperature":"degC"},"ts":1700000000000}`; see docs/MODBUS.md.
//!
//! Quality: `good` when read in this poll; `stale` when this poll could not read it but a
//! good value from the last three intervals is repeated; `bad` (value `null`) otherwise.

use std::time::Duration;

use serde_json::{Map, Value};
use tokio::time::Instant;

use super::config::Point;

/// A point's quality in one poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quality {
    /// Read in this poll.
    Good,
    /// Not read in this poll; the last good value, still recent, is repeated.
    Stale,
    /// No usable value.
    Bad,
}

impl Quality {
    /// The JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Good => "good",
            Self::Stale => "stale",
            Self::Bad => "bad",
        }
    }
}

/// What the poller remembers of one point between polls.
#[derive(Debug, Clone, Default)]
pub struct PointMemory {
    last_good: Option<(Value, Instant)>,
    last_sent: Option<(Value, Quality)>,
}

/// Builds one poll's payload; `None` when `on_change` left nothing to report.
///
/// `readings[i]` is the value read for `points[i]` (`None`: not read), `memory[i]` its
/// memory, `interval` the group's (for the stale window).
pub fn report(
    points: &[&Point],
    readings: &[Option<Value>],
    memory: &mut [&mut PointMemory],
    now: Instant,
    interval: Duration,
    on_change: bool,
    timestamp_ms: u64,
) -> Option<Vec<u8>> {
    let stale_window = interval.saturating_mul(3);
    let mut values = Map::new();
    let mut qualities = Map::new();
    let mut units = Map::new();
    for ((point, reading), memory) in points.iter().zip(readings).zip(memory.iter_mut()) {
        let (value, quality) = match reading {
            Some(value) => {
                memory.last_good = Some((value.clone(), now));
                (value.clone(), Quality::Good)
            }
            None => match &memory.last_good {
                Some((value, at)) if now.duration_since(*at) <= stale_window => {
                    (value.clone(), Quality::Stale)
                }
                _ => (Value::Null, Quality::Bad),
            },
        };
        if on_change && !changed(memory.last_sent.as_ref(), &value, quality, point.deadband) {
            continue;
        }
        memory.last_sent = Some((value.clone(), quality));
        values.insert(point.name.clone(), value);
        qualities.insert(point.name.clone(), Value::from(quality.as_str()));
        if let Some(unit) = &point.unit {
            units.insert(point.name.clone(), Value::from(unit.as_str()));
        }
    }
    if values.is_empty() {
        return None;
    }
    values.insert("quality".into(), Value::Object(qualities));
    if !units.is_empty() {
        values.insert("units".into(), Value::Object(units));
    }
    values.insert("ts".into(), Value::from(timestamp_ms));
    serde_json::to_vec(&Value::Object(values)).ok()
}

/// Whether a point is worth reporting under `report_on_change`.
fn changed(
    last: Option<&(Value, Quality)>,
    value: &Value,
    quality: Quality,
    deadband: f64,
) -> bool {
    let Some((last_value, last_quality)) = last else {
        return true;
    };
    if *last_quality != quality {
        return true;
    }
    match (last_value.as_f64(), value.as_f64()) {
        (Some(before), Some(now)) if deadband > 0.0 => (now - before).abs() > deadband,
        _ => last_value != value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::modbus::plan::Area;
    use crate::sources::modbus::value::{ByteOrder, DataType};

    fn point(name: &str, deadband: f64) -> Point {
        Point {
            name: name.into(),
            area: Area::Holding,
            address: 0,
            width: 1,
            data_type: DataType::U16,
            byte_order: ByteOrder::Abcd,
            scale: 1.0,
            offset: 0.0,
            unit: Some("degC".into()),
            group: 0,
            deadband,
            writable: false,
        }
    }

    fn run(
        points: &[Point],
        memory: &mut [PointMemory],
        readings: &[Option<Value>],
        now: Instant,
        on_change: bool,
    ) -> Option<Value> {
        let refs: Vec<&Point> = points.iter().collect();
        let mut memory: Vec<&mut PointMemory> = memory.iter_mut().collect();
        report(
            &refs,
            readings,
            &mut memory,
            now,
            Duration::from_secs(1),
            on_change,
            42,
        )
        .map(|bytes| serde_json::from_slice(&bytes).unwrap())
    }

    #[test]
    fn good_then_stale_then_bad() {
        let points = [point("t", 0.0)];
        let mut memory = vec![PointMemory::default()];
        let start = Instant::now();
        let payload = run(&points, &mut memory, &[Some(21.into())], start, false).unwrap();
        assert_eq!(
            payload,
            serde_json::json!({"t": 21, "quality": {"t": "good"}, "units": {"t": "degC"}, "ts": 42})
        );
        let payload = run(
            &points,
            &mut memory,
            &[None],
            start + Duration::from_secs(2),
            false,
        );
        assert_eq!(payload.unwrap()["quality"]["t"], "stale");
        let payload = run(
            &points,
            &mut memory,
            &[None],
            start + Duration::from_secs(4),
            false,
        );
        let payload = payload.unwrap();
        assert_eq!(payload["quality"]["t"], "bad");
        assert_eq!(payload["t"], Value::Null);
    }

    #[test]
    fn on_change_respects_the_deadband_and_quality() {
        let points = [point("a", 0.5), point("b", 0.0)];
        let mut memory = vec![PointMemory::default(), PointMemory::default()];
        let now = Instant::now();
        let first = run(
            &points,
            &mut memory,
            &[Some(10.0.into()), Some(1.into())],
            now,
            true,
        );
        assert!(first.unwrap().get("a").is_some());
        // a moves within its deadband, b does not move: nothing to report.
        assert_eq!(
            run(
                &points,
                &mut memory,
                &[Some(10.4.into()), Some(1.into())],
                now,
                true
            ),
            None
        );
        // a moves beyond it (from the last *sent* value), b changes.
        let payload = run(
            &points,
            &mut memory,
            &[Some(10.6.into()), Some(2.into())],
            now,
            true,
        )
        .unwrap();
        assert_eq!(payload["a"], 10.6);
        assert_eq!(payload["b"], 2);
        // A failed read changes the quality, which is reported.
        let payload = run(&points, &mut memory, &[None, Some(2.into())], now, true).unwrap();
        assert_eq!(payload["quality"]["a"], "stale");
        assert!(payload.get("b").is_none());
    }

    /// The model: per point, the last good value with its time and the last (value,
    /// quality) sent; qualities and on-change decisions follow from it alone.
    #[derive(Default, Clone)]
    struct Model {
        last_good: Option<(i64, u64)>,
        last_sent: Option<(Option<i64>, &'static str)>,
    }

    proptest::proptest! {
        #[test]
        fn reports_follow_the_model(
            steps in proptest::collection::vec(
                (proptest::collection::vec(proptest::option::of(0i64..5), 2), 0u64..2500),
                1..40,
            ),
            on_change: bool,
        ) {
            let points = [point("a", 0.0), point("b", 1.5)];
            let deadbands = [0.0, 1.5];
            let mut memory = vec![PointMemory::default(), PointMemory::default()];
            let mut model = [Model::default(), Model::default()];
            let start = Instant::now();
            let mut elapsed_ms = 0u64;
            for (readings, advance) in steps {
                elapsed_ms += advance;
                let now = start + Duration::from_millis(elapsed_ms);
                let values: Vec<Option<Value>> =
                    readings.iter().map(|r| r.map(Value::from)).collect();
                let payload = run(&points, &mut memory, &values, now, on_change);
                let mut expected_any = false;
                for (index, name) in ["a", "b"].into_iter().enumerate() {
                    let state = &mut model[index];
                    let (value, quality) = match readings[index] {
                        Some(value) => {
                            state.last_good = Some((value, elapsed_ms));
                            (Some(value), "good")
                        }
                        None => match state.last_good {
                            Some((value, at)) if elapsed_ms - at <= 3000 => (Some(value), "stale"),
                            _ => (None, "bad"),
                        },
                    };
                    let send = !on_change
                        || match state.last_sent {
                            None => true,
                            Some((_, sent_quality)) if sent_quality != quality => true,
                            Some((Some(before), _)) if deadbands[index] > 0.0 => {
                                value.is_some_and(|now| (now - before).abs() as f64 > deadbands[index])
                            }
                            Some((before, _)) => before != value,
                        };
                    let reported = payload.as_ref().and_then(|p| p.get(name).cloned());
                    if send {
                        expected_any = true;
                        state.last_sent = Some((value, quality));
                        let payload = payload.as_ref().expect("a payload");
                        proptest::prop_assert_eq!(reported, Some(value.map_or(Value::Null, Value::from)));
                        proptest::prop_assert_eq!(&payload["quality"][name], quality);
                    } else {
                        proptest::prop_assert_eq!(reported, None);
                    }
                }
                proptest::prop_assert_eq!(payload.is_some(), expected_any);
            }
        }
    }
}
