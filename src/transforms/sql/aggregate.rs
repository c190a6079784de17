//! Aggregate functions: their running state (serializable, for checkpoints) and results.
//! Every aggregate skips nulls; numeric ones skip non-numbers.

use serde::{Deserialize, Serialize};

use super::value::{OwnedValue, Value};

/// An aggregate function.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AggregateFunction {
    /// `count(*)`: every row.
    CountAll,
    /// `count(x)`: rows where `x` is not null.
    Count,
    /// `sum(x)`.
    Sum,
    /// `avg(x)`.
    Avg,
    /// `min(x)`.
    Min,
    /// `max(x)`.
    Max,
    /// `stddev(x)`: population standard deviation.
    Stddev,
    /// `percentile(x, p)`, `p` in [0, 1], linear interpolation between samples.
    Percentile(f64),
    /// `first(x)`: the value of the earliest row (by time, then arrival).
    First,
    /// `last(x)`: the value of the latest row (by time, then arrival).
    Last,
}

impl AggregateFunction {
    /// The aggregate called `name`, if any (percentile's `p` is set by the planner).
    pub fn lookup(name: &str) -> Option<Self> {
        Some(match name {
            "count" => AggregateFunction::Count,
            "sum" => AggregateFunction::Sum,
            "avg" => AggregateFunction::Avg,
            "min" => AggregateFunction::Min,
            "max" => AggregateFunction::Max,
            "stddev" => AggregateFunction::Stddev,
            "percentile" => AggregateFunction::Percentile(0.5),
            "first" => AggregateFunction::First,
            "last" => AggregateFunction::Last,
            _ => return None,
        })
    }
}

/// Where a row sits in time: its timestamp, then its arrival number.
pub type RowOrder = (i64, u64);

/// The running state of one aggregate over one group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AggregateState {
    /// Rows counted.
    Count(u64),
    /// Sum and count of numbers (`sum`, `avg`).
    Sum {
        /// Sum.
        sum: f64,
        /// Numbers seen.
        n: u64,
    },
    /// Smallest or largest number seen.
    Extreme(Option<f64>),
    /// Welford's running mean and squared deviations.
    Moments {
        /// Numbers seen.
        n: u64,
        /// Running mean.
        mean: f64,
        /// Sum of squared deviations.
        m2: f64,
    },
    /// Numbers kept for a percentile (capped).
    Samples(Vec<f64>),
    /// The chosen row's order and value (`first`, `last`).
    Pick(Option<(RowOrder, OwnedValue)>),
}

/// The sample buffer is full: the value was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SamplesFull;

impl AggregateState {
    /// The empty state of `function`.
    pub fn new(function: AggregateFunction) -> Self {
        match function {
            AggregateFunction::CountAll | AggregateFunction::Count => AggregateState::Count(0),
            AggregateFunction::Sum | AggregateFunction::Avg => {
                AggregateState::Sum { sum: 0.0, n: 0 }
            }
            AggregateFunction::Min | AggregateFunction::Max => AggregateState::Extreme(None),
            AggregateFunction::Stddev => AggregateState::Moments {
                n: 0,
                mean: 0.0,
                m2: 0.0,
            },
            AggregateFunction::Percentile(_) => AggregateState::Samples(Vec::new()),
            AggregateFunction::First | AggregateFunction::Last => AggregateState::Pick(None),
        }
    }

    /// Adds one row's argument (`Null` for `count(*)`, which counts it anyway).
    pub fn update(
        &mut self,
        function: AggregateFunction,
        value: &Value<'_>,
        order: RowOrder,
        max_samples: usize,
    ) -> Result<(), SamplesFull> {
        let number = value.as_num().filter(|number| number.is_finite());
        match self {
            AggregateState::Count(count) => {
                if function == AggregateFunction::CountAll || !matches!(value, Value::Null) {
                    *count += 1;
                }
            }
            AggregateState::Sum { sum, n } => {
                if let Some(number) = number {
                    *sum += number;
                    *n += 1;
                }
            }
            AggregateState::Extreme(current) => {
                if let Some(number) = number {
                    let better = match current {
                        None => true,
                        Some(current) if function == AggregateFunction::Min => number < *current,
                        Some(current) => number > *current,
                    };
                    if better {
                        *current = Some(number);
                    }
                }
            }
            AggregateState::Moments { n, mean, m2 } => {
                if let Some(number) = number {
                    *n += 1;
                    #[allow(clippy::cast_precision_loss, reason = "counts below 2^53")]
                    let count = *n as f64;
                    let delta = number - *mean;
                    *mean += delta / count;
                    *m2 += delta * (number - *mean);
                }
            }
            AggregateState::Samples(samples) => {
                if let Some(number) = number {
                    if samples.len() >= max_samples {
                        return Err(SamplesFull);
                    }
                    samples.push(number);
                }
            }
            AggregateState::Pick(current) => {
                if !matches!(value, Value::Null) {
                    let replace = match current {
                        None => true,
                        Some((kept, _)) if function == AggregateFunction::First => order < *kept,
                        Some((kept, _)) => order > *kept,
                    };
                    if replace {
                        *current = Some((order, value.to_owned_value()));
                    }
                }
            }
        }
        Ok(())
    }

    /// The aggregate's result; null when it saw nothing to aggregate (except counts: 0).
    pub fn result(&self, function: AggregateFunction) -> OwnedValue {
        match self {
            #[allow(clippy::cast_precision_loss, reason = "counts below 2^53")]
            AggregateState::Count(count) => Value::Num(*count as f64),
            AggregateState::Sum { n: 0, .. } => Value::Null,
            AggregateState::Sum { sum, n } => {
                if function == AggregateFunction::Avg {
                    #[allow(clippy::cast_precision_loss, reason = "counts below 2^53")]
                    let count = *n as f64;
                    Value::Num(sum / count)
                } else {
                    Value::Num(*sum)
                }
            }
            AggregateState::Extreme(value) => value.map_or(Value::Null, Value::Num),
            AggregateState::Moments { n: 0, .. } => Value::Null,
            AggregateState::Moments { n, m2, .. } => {
                #[allow(clippy::cast_precision_loss, reason = "counts below 2^53")]
                let count = *n as f64;
                Value::Num((m2 / count).max(0.0).sqrt())
            }
            AggregateState::Samples(samples) => {
                let AggregateFunction::Percentile(p) = function else {
                    return Value::Null;
                };
                percentile(samples, p).map_or(Value::Null, Value::Num)
            }
            AggregateState::Pick(picked) => picked
                .as_ref()
                .map_or(Value::Null, |(_, value)| value.clone()),
        }
    }
}

/// The `p` percentile (0..=1) of `samples`, interpolating linearly between ranks.
fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    #[allow(clippy::cast_precision_loss, reason = "sample counts are capped")]
    let rank = p.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let below = rank.floor();
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "0 <= rank < len"
    )]
    let index = below as usize;
    let low = sorted[index];
    let high = sorted.get(index + 1).copied().unwrap_or(low);
    Some(low + (high - low) * (rank - below))
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    fn run(function: AggregateFunction, values: &[Value<'_>]) -> OwnedValue {
        let mut state = AggregateState::new(function);
        for (index, value) in values.iter().enumerate() {
            let time = i64::try_from(index).expect("small");
            state
                .update(function, value, (time, 0), 1000)
                .expect("room");
        }
        state.result(function)
    }

    fn nums(values: &[f64]) -> Vec<Value<'static>> {
        values.iter().copied().map(Value::Num).collect()
    }

    #[test]
    fn each_aggregate_against_known_results() {
        let mut values = nums(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        values.push(Value::Null);
        values.push(Value::Str(Cow::Borrowed("x")));
        assert_eq!(run(AggregateFunction::CountAll, &values), Value::Num(10.0));
        assert_eq!(run(AggregateFunction::Count, &values), Value::Num(9.0));
        assert_eq!(run(AggregateFunction::Sum, &values), Value::Num(40.0));
        assert_eq!(run(AggregateFunction::Avg, &values), Value::Num(5.0));
        assert_eq!(run(AggregateFunction::Min, &values), Value::Num(2.0));
        assert_eq!(run(AggregateFunction::Max, &values), Value::Num(9.0));
        assert_eq!(run(AggregateFunction::Stddev, &values), Value::Num(2.0));
        assert_eq!(
            run(AggregateFunction::Percentile(0.5), &values),
            Value::Num(4.5)
        );
        assert_eq!(
            run(AggregateFunction::Percentile(1.0), &values),
            Value::Num(9.0)
        );
        assert_eq!(
            run(AggregateFunction::Percentile(0.0), &values),
            Value::Num(2.0)
        );
        assert_eq!(run(AggregateFunction::First, &values), Value::Num(2.0));
        assert_eq!(
            run(AggregateFunction::Last, &values),
            Value::Str(Cow::Borrowed("x"))
        );
    }

    #[test]
    fn empty_groups_give_null_but_zero_counts() {
        for function in [
            AggregateFunction::Sum,
            AggregateFunction::Avg,
            AggregateFunction::Min,
            AggregateFunction::Max,
            AggregateFunction::Stddev,
            AggregateFunction::Percentile(0.9),
            AggregateFunction::First,
            AggregateFunction::Last,
        ] {
            assert_eq!(run(function, &[Value::Null]), Value::Null, "{function:?}");
        }
        assert_eq!(
            run(AggregateFunction::Count, &[Value::Null]),
            Value::Num(0.0)
        );
    }

    #[test]
    fn first_and_last_follow_time_not_arrival() {
        let mut first = AggregateState::new(AggregateFunction::First);
        let mut last = AggregateState::new(AggregateFunction::Last);
        for (time, value) in [(20, 2.0), (10, 1.0), (30, 3.0), (25, 2.5)] {
            let value = Value::Num(value);
            first
                .update(AggregateFunction::First, &value, (time, 0), 10)
                .expect("room");
            last.update(AggregateFunction::Last, &value, (time, 0), 10)
                .expect("room");
        }
        assert_eq!(first.result(AggregateFunction::First), Value::Num(1.0));
        assert_eq!(last.result(AggregateFunction::Last), Value::Num(3.0));
    }

    #[test]
    fn percentile_samples_are_capped() {
        let mut state = AggregateState::new(AggregateFunction::Percentile(0.5));
        let function = AggregateFunction::Percentile(0.5);
        for value in 0..3 {
            state
                .update(function, &Value::Num(f64::from(value)), (0, 0), 3)
                .expect("room");
        }
        assert_eq!(
            state.update(function, &Value::Num(9.0), (0, 0), 3),
            Err(SamplesFull)
        );
        assert_eq!(state.result(function), Value::Num(1.0));
    }
}
