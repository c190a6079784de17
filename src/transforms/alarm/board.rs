//! The alarm board: every running `alarm` transform's alarms, for `/api/v1/alarms` and
//! `fieldgate alarms`. It holds the rules weakly, so a rule replaced or removed by a
//! reload is gone from the board (and from memory) as soon as the graph drops it.
//!
//! While a reload is being prepared a rule may briefly exist twice (running and
//! prepared); the board answers from the newest one still alive.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where an alarm is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AlarmState {
    /// The condition holds and nobody has acknowledged it.
    Raised,
    /// The condition holds and an operator has acknowledged it.
    Acknowledged,
    /// The condition no longer holds.
    Cleared,
}

impl AlarmState {
    /// Whether the alarm still counts (raised or acknowledged).
    pub fn is_active(self) -> bool {
        !matches!(self, AlarmState::Cleared)
    }
}

/// One alarm of one rule for one device, as listed by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Alarm {
    /// The rule: the `alarm` transform's name.
    pub rule: String,
    /// The device it is about.
    pub device: String,
    /// The detector that raised it (`threshold`, `rate_of_change`, `zscore`, `stuck`,
    /// `missing`).
    pub detector: String,
    /// The payload field the rule watches.
    pub field: String,
    /// `critical`, `major`, `minor`, `warning` or `info`.
    pub severity: String,
    /// Where the alarm is in its life.
    pub state: AlarmState,
    /// The value that raised it (the reading, its rate or its z-score); none for
    /// `missing` and non-numeric stuck values.
    pub value: Option<f64>,
    /// The limit it crossed.
    pub threshold: Option<f64>,
    /// When it was raised, in milliseconds since the Unix epoch.
    pub since: u64,
    /// When it was acknowledged, if it was.
    pub acknowledged_at: Option<u64>,
    /// When it was cleared, if it was.
    pub cleared_at: Option<u64>,
    /// The rule's local actions that failed for this device and have not succeeded
    /// since (one per action, the last failure); absent when there is none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub action_errors: Vec<ActionFailure>,
}

/// The last failure of one local action of an alarm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ActionFailure {
    /// The action's `name` (by default its `type`).
    pub action: String,
    /// The transition it ran for: `raise` or `clear`.
    pub on: String,
    /// What went wrong (with the attempts made, for a webhook).
    pub error: String,
    /// When it failed, in milliseconds since the Unix epoch.
    pub at: u64,
}

/// What a rule offers the board.
pub trait AlarmRule: Send + Sync {
    /// The rule's alarms (active and the last cleared one per device).
    fn alarms(&self) -> Vec<Alarm>;

    /// Acknowledges the alarm of `device` at `now_ms`.
    fn acknowledge(&self, device: &str, now_ms: u64) -> Result<Alarm, AckError>;
}

/// Why an acknowledgement was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// No `alarm` transform has this name.
    #[error("no alarm rule named {0:?}")]
    NoRule(String),
    /// The rule has no alarm for this device.
    #[error("rule {rule:?} has no alarm for device {device:?}")]
    NoAlarm {
        /// The rule.
        rule: String,
        /// The device.
        device: String,
    },
    /// The alarm was cleared already: there is nothing left to acknowledge.
    #[error("the alarm of rule {rule:?} for device {device:?} is cleared")]
    Cleared {
        /// The rule.
        rule: String,
        /// The device.
        device: String,
    },
}

/// Which alarms a listing wants.
#[derive(Debug, Default, Clone)]
pub struct AlarmFilter {
    /// Only alarms in this state; `active` is represented by [`AlarmFilter::active`].
    pub state: Option<AlarmState>,
    /// Only raised or acknowledged alarms.
    pub active: bool,
    /// Only this device's alarms.
    pub device: Option<String>,
    /// Only this rule's alarms.
    pub rule: Option<String>,
}

impl AlarmFilter {
    fn accepts(&self, alarm: &Alarm) -> bool {
        self.state.is_none_or(|state| alarm.state == state)
            && (!self.active || alarm.state.is_active())
            && self
                .device
                .as_ref()
                .is_none_or(|device| alarm.device == *device)
            && self.rule.as_ref().is_none_or(|rule| alarm.rule == *rule)
    }
}

/// The rules by name, weakly.
#[derive(Default)]
pub struct AlarmBoard {
    rules: Mutex<BTreeMap<String, Vec<Weak<dyn AlarmRule>>>>,
}

impl AlarmBoard {
    /// Adds rule `name` (the newest instance of a name wins); dead instances are pruned.
    pub fn attach(&self, name: &str, rule: Weak<dyn AlarmRule>) {
        let mut rules = self.rules.lock().unwrap_or_else(PoisonError::into_inner);
        rules.retain(|_, instances| {
            instances.retain(|instance| instance.strong_count() > 0);
            !instances.is_empty()
        });
        rules.entry(name.to_owned()).or_default().push(rule);
    }

    fn live(&self) -> Vec<(String, Arc<dyn AlarmRule>)> {
        let rules = self.rules.lock().unwrap_or_else(PoisonError::into_inner);
        rules
            .iter()
            .filter_map(|(name, instances)| {
                let newest = instances.iter().rev().find_map(Weak::upgrade)?;
                Some((name.clone(), newest))
            })
            .collect()
    }

    /// How many rules are alive (for the leak tests).
    #[cfg(test)]
    pub fn rules(&self) -> usize {
        self.live().len()
    }

    /// The alarms that `filter` accepts, by rule then device.
    pub fn list(&self, filter: &AlarmFilter) -> Vec<Alarm> {
        let mut alarms: Vec<Alarm> = self
            .live()
            .into_iter()
            .filter(|(name, _)| filter.rule.as_ref().is_none_or(|rule| rule == name))
            .flat_map(|(_, rule)| rule.alarms())
            .filter(|alarm| filter.accepts(alarm))
            .collect();
        alarms.sort_by(|a, b| (&a.rule, &a.device).cmp(&(&b.rule, &b.device)));
        alarms
    }

    /// Acknowledges the alarm of (`rule`, `device`).
    pub fn acknowledge(&self, rule: &str, device: &str, now_ms: u64) -> Result<Alarm, AckError> {
        let found = self
            .live()
            .into_iter()
            .find(|(name, _)| name == rule)
            .map(|(_, rule)| rule);
        match found {
            Some(instance) => instance.acknowledge(device, now_ms),
            None => Err(AckError::NoRule(rule.to_owned())),
        }
    }
}
