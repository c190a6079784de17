//! Window state: which windows are open, their groups and aggregates, and when they
//! close. Pure and clock-free: the transform passes every time in (epoch ms), so tests and
//! `fieldgate rules test` drive it deterministically. Serializable for checkpoints.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::aggregate::AggregateState;
use super::plan::{Window, WindowPlan};
use super::value::{OwnedValue, Value};

/// The values of a group's keys, in GROUP BY order.
pub type GroupKey = Vec<OwnedValue>;

/// Caps on what one rule may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Groups per window (sessions and sliding groups in all).
    pub max_groups: usize,
    /// Values kept per percentile and rows per sliding group.
    pub max_samples: usize,
}

/// What the caps refused, for the error counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Overflows {
    /// Rows not added because their window already held `max_groups` groups.
    pub groups: u64,
    /// Values not kept because a buffer held `max_samples`.
    pub samples: u64,
}

/// One group of a closed window, ready to become an output event.
#[derive(Debug, Clone, PartialEq)]
pub struct Closed {
    /// The window's bounds, epoch ms (`[start, end)`).
    pub window: (i64, i64),
    /// The group's keys.
    pub keys: GroupKey,
    /// The aggregates' results, in plan order.
    pub results: Vec<OwnedValue>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Group {
    /// Arrival number of the group's first row: the output order within a window.
    seq: u64,
    aggregates: Vec<AggregateState>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Session {
    seq: u64,
    start: i64,
    last: i64,
    aggregates: Vec<AggregateState>,
}

/// One buffered row (sliding and count windows recompute over their rows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Row {
    time: i64,
    seq: u64,
    keys: GroupKey,
    args: Vec<OwnedValue>,
}

/// A hash map serialized as a list of pairs (keys are not strings).
mod pairs {
    use std::collections::HashMap;
    use std::hash::Hash;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S, K, V>(map: &HashMap<K, V>, serializer: S) -> Result<S::Ok, S::Error>
    where
        S: Serializer,
        K: Serialize,
        V: Serialize,
    {
        serializer.collect_seq(map.iter())
    }

    pub fn deserialize<'de, D, K, V>(deserializer: D) -> Result<HashMap<K, V>, D::Error>
    where
        D: Deserializer<'de>,
        K: Deserialize<'de> + Eq + Hash,
        V: Deserialize<'de>,
    {
        Vec::<(K, V)>::deserialize(deserializer).map(|pairs| pairs.into_iter().collect())
    }
}

/// Everything a windowed rule remembers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowState {
    /// The latest time seen (event or tick), epoch ms.
    pub clock: Option<i64>,
    /// Rows added so far (their arrival numbers).
    seq: u64,
    /// Tumbling and hopping windows by start.
    windows: BTreeMap<i64, WindowGroups>,
    /// Open sessions by group.
    #[serde(with = "pairs")]
    sessions: HashMap<GroupKey, Session>,
    /// No session ends before this (a lower bound; `None`: unknown, scan).
    #[serde(skip)]
    session_horizon: Option<i64>,
    /// Sliding windows' rows by group, in time order.
    #[serde(with = "pairs")]
    sliding: HashMap<GroupKey, VecDeque<Row>>,
    /// The count window's rows, in arrival order.
    counted: VecDeque<Row>,
    /// Rows since the count window last emitted.
    since_emit: usize,
    /// The count window has emitted since it last filled.
    emitted: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct WindowGroups {
    #[serde(with = "pairs")]
    groups: HashMap<GroupKey, Group>,
}

impl WindowState {
    /// Closes every window that ends at or before `watermark`.
    pub fn advance(&mut self, plan: &WindowPlan, watermark: i64, out: &mut Vec<Closed>) {
        match plan.window {
            Window::Tumbling { size } | Window::Hopping { size, .. } => {
                while let Some(entry) = self.windows.first_entry() {
                    if entry.key().saturating_add(size) > watermark {
                        break;
                    }
                    let start = *entry.key();
                    let groups = entry.remove();
                    emit_groups(
                        plan,
                        (start, start.saturating_add(size)),
                        groups.groups,
                        out,
                    );
                }
            }
            Window::Session { timeout, max } => {
                if self
                    .session_horizon
                    .is_some_and(|horizon| horizon > watermark)
                {
                    return;
                }
                let mut ended: Vec<(GroupKey, Session)> = Vec::new();
                let mut horizon = i64::MAX;
                self.sessions.retain(|keys, session| {
                    let end = session_end(session, timeout, max);
                    if end <= watermark {
                        ended.push((keys.clone(), session.clone()));
                        false
                    } else {
                        horizon = horizon.min(end);
                        true
                    }
                });
                self.session_horizon = Some(horizon);
                ended.sort_by_key(|(_, session)| (session_end(session, timeout, max), session.seq));
                for (keys, session) in ended {
                    out.push(close_session(plan, keys, session, timeout, max));
                }
            }
            Window::Sliding { size } => {
                let oldest = watermark.saturating_sub(size);
                self.sliding.retain(|_, rows| {
                    while rows.front().is_some_and(|row| row.time <= oldest) {
                        rows.pop_front();
                    }
                    !rows.is_empty()
                });
            }
            Window::Count { .. } => {}
        }
    }

    /// Adds one row at `time` (never before the watermark) with its group keys and
    /// aggregate arguments; sliding and count windows emit here.
    #[allow(clippy::too_many_arguments, reason = "one row's parts, each needed")]
    pub fn add(
        &mut self,
        plan: &WindowPlan,
        limits: Limits,
        watermark: i64,
        time: i64,
        keys: GroupKey,
        args: &[Value<'_>],
        overflows: &mut Overflows,
        out: &mut Vec<Closed>,
    ) {
        let seq = self.seq;
        self.seq += 1;
        match plan.window {
            Window::Tumbling { size } => {
                let start = time.div_euclid(size) * size;
                self.add_to_window(plan, limits, start, time, seq, keys, args, overflows);
            }
            Window::Hopping { size, hop } => {
                let mut start = time.div_euclid(hop) * hop;
                while start.saturating_add(size) > time {
                    self.add_to_window(
                        plan,
                        limits,
                        start,
                        time,
                        seq,
                        keys.clone(),
                        args,
                        overflows,
                    );
                    start -= hop;
                }
            }
            Window::Session { timeout, max } => {
                if let Some(session) = self.sessions.get(&keys) {
                    if time >= session.last.saturating_add(timeout)
                        || time >= session.start.saturating_add(max)
                    {
                        if let Some(session) = self.sessions.remove(&keys) {
                            out.push(close_session(plan, keys.clone(), session, timeout, max));
                        }
                    }
                }
                if !self.sessions.contains_key(&keys) && self.sessions.len() >= limits.max_groups {
                    overflows.groups += 1;
                    return;
                }
                let session = self.sessions.entry(keys).or_insert_with(|| Session {
                    seq,
                    start: time,
                    last: time,
                    aggregates: new_states(plan),
                });
                session.start = session.start.min(time);
                session.last = session.last.max(time);
                update(
                    plan,
                    limits,
                    &mut session.aggregates,
                    args,
                    (time, seq),
                    overflows,
                );
                let end = session_end(session, timeout, max);
                self.session_horizon = self.session_horizon.map(|horizon| horizon.min(end));
            }
            Window::Sliding { size } => {
                if !self.sliding.contains_key(&keys) && self.sliding.len() >= limits.max_groups {
                    overflows.groups += 1;
                    return;
                }
                let rows = self.sliding.entry(keys.clone()).or_default();
                let oldest = watermark.saturating_sub(size);
                while rows.front().is_some_and(|row| row.time <= oldest) {
                    rows.pop_front();
                }
                let at = rows.partition_point(|row| (row.time, row.seq) <= (time, seq));
                rows.insert(
                    at,
                    Row {
                        time,
                        seq,
                        keys: keys.clone(),
                        args: args.iter().map(Value::to_owned_value).collect(),
                    },
                );
                if rows.len() > limits.max_samples {
                    rows.pop_front();
                    overflows.samples += 1;
                }
                let from = time.saturating_sub(size);
                let mut aggregates = new_states(plan);
                for row in rows
                    .iter()
                    .filter(|row| row.time > from && row.time <= time)
                {
                    update(
                        plan,
                        limits,
                        &mut aggregates,
                        &row.args,
                        (row.time, row.seq),
                        overflows,
                    );
                }
                out.push(Closed {
                    window: (from, time),
                    keys,
                    results: results(plan, &aggregates),
                });
            }
            Window::Count { size, hop } => {
                self.counted.push_back(Row {
                    time,
                    seq,
                    keys,
                    args: args.iter().map(Value::to_owned_value).collect(),
                });
                if self.counted.len() > size {
                    self.counted.pop_front();
                }
                self.since_emit += 1;
                if self.counted.len() == size && (!self.emitted || self.since_emit >= hop) {
                    self.emit_counted(plan, limits, overflows, out);
                    self.since_emit = 0;
                    self.emitted = true;
                    if hop == size {
                        self.counted.clear();
                        self.emitted = false;
                    }
                }
            }
        }
    }

    /// Closes every open time window and session (the end of a `rules test` input).
    /// Count windows emit only when full, and sliding windows have emitted already.
    pub fn flush(&mut self, plan: &WindowPlan, out: &mut Vec<Closed>) {
        match plan.window {
            Window::Tumbling { .. } | Window::Hopping { .. } | Window::Session { .. } => {
                self.advance(plan, i64::MAX, out);
            }
            Window::Sliding { .. } | Window::Count { .. } => {}
        }
    }

    #[allow(clippy::too_many_arguments, reason = "one row's parts, each needed")]
    fn add_to_window(
        &mut self,
        plan: &WindowPlan,
        limits: Limits,
        start: i64,
        time: i64,
        seq: u64,
        keys: GroupKey,
        args: &[Value<'_>],
        overflows: &mut Overflows,
    ) {
        let window = self.windows.entry(start).or_default();
        let full = window.groups.len() >= limits.max_groups;
        let group = match window.groups.get_mut(&keys) {
            Some(group) => group,
            None if full => {
                overflows.groups += 1;
                return;
            }
            None => window.groups.entry(keys).or_insert_with(|| Group {
                seq,
                aggregates: new_states(plan),
            }),
        };
        update(
            plan,
            limits,
            &mut group.aggregates,
            args,
            (time, seq),
            overflows,
        );
    }

    fn emit_counted(
        &self,
        plan: &WindowPlan,
        limits: Limits,
        overflows: &mut Overflows,
        out: &mut Vec<Closed>,
    ) {
        let start = self.counted.iter().map(|row| row.time).min().unwrap_or(0);
        let end = self.counted.iter().map(|row| row.time).max().unwrap_or(0);
        let mut groups: HashMap<&GroupKey, Group> = HashMap::new();
        for row in &self.counted {
            let full = groups.len() >= limits.max_groups;
            let group = match groups.get_mut(&row.keys) {
                Some(group) => group,
                None if full => {
                    overflows.groups += 1;
                    continue;
                }
                None => groups.entry(&row.keys).or_insert_with(|| Group {
                    seq: row.seq,
                    aggregates: new_states(plan),
                }),
            };
            update(
                plan,
                limits,
                &mut group.aggregates,
                &row.args,
                (row.time, row.seq),
                overflows,
            );
        }
        let mut groups: Vec<(&GroupKey, Group)> = groups.into_iter().collect();
        groups.sort_by_key(|(_, group)| group.seq);
        for (keys, group) in groups {
            out.push(Closed {
                window: (start, end),
                keys: keys.clone(),
                results: results(plan, &group.aggregates),
            });
        }
    }
}

fn new_states(plan: &WindowPlan) -> Vec<AggregateState> {
    plan.aggregates
        .iter()
        .map(|(function, _)| AggregateState::new(*function))
        .collect()
}

fn update(
    plan: &WindowPlan,
    limits: Limits,
    states: &mut [AggregateState],
    args: &[Value<'_>],
    order: (i64, u64),
    overflows: &mut Overflows,
) {
    for ((state, (function, _)), arg) in states.iter_mut().zip(&plan.aggregates).zip(args) {
        if state
            .update(*function, arg, order, limits.max_samples)
            .is_err()
        {
            overflows.samples += 1;
        }
    }
}

fn results(plan: &WindowPlan, states: &[AggregateState]) -> Vec<OwnedValue> {
    states
        .iter()
        .zip(&plan.aggregates)
        .map(|(state, (function, _))| state.result(*function))
        .collect()
}

fn emit_groups(
    plan: &WindowPlan,
    window: (i64, i64),
    groups: HashMap<GroupKey, Group>,
    out: &mut Vec<Closed>,
) {
    let mut groups: Vec<(GroupKey, Group)> = groups.into_iter().collect();
    groups.sort_by_key(|(_, group)| group.seq);
    for (keys, group) in groups {
        out.push(Closed {
            window,
            keys,
            results: results(plan, &group.aggregates),
        });
    }
}

fn session_end(session: &Session, timeout: i64, max: i64) -> i64 {
    session
        .last
        .saturating_add(timeout)
        .min(session.start.saturating_add(max))
}

fn close_session(
    plan: &WindowPlan,
    keys: GroupKey,
    session: Session,
    timeout: i64,
    max: i64,
) -> Closed {
    Closed {
        window: (session.start, session_end(&session, timeout, max)),
        keys,
        results: results(plan, &session.aggregates),
    }
}
