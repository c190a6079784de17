//! Per-device state of the stateful transforms: a table bounded to `max_devices`
//! entries that evicts the least recently seen device (counted), with the pieces every
//! such transform shares (its metrics, the reading time of an event, checkpoints).
//!
//! Invariant: the table never holds more than its bound; every eviction bumps
//! `fieldgate_transform_evicted_devices_total{transform}` and the gauge
//! `fieldgate_transform_state_devices{transform}` follows the table's size.

use std::collections::{BTreeMap, HashMap};

use fieldgate_core::{DeviceId, Event};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, Context};
use crate::telemetry::Metrics;

/// Default `max_devices` of a stateful transform.
pub const DEFAULT_MAX_DEVICES: usize = 10_000;
/// Largest `max_devices` accepted.
pub const MAX_MAX_DEVICES: usize = 1_000_000;

/// `max_devices`' default for serde.
pub fn default_max_devices() -> usize {
    DEFAULT_MAX_DEVICES
}

/// Checks `transforms.NAME.max_devices`.
pub fn check_max_devices(
    name: &str,
    max_devices: usize,
    context: &Context<'_>,
) -> Result<(), ConfigError> {
    if max_devices == 0 || max_devices > MAX_MAX_DEVICES {
        return Err(context.key_error(
            &format!("transforms.{name}.max_devices"),
            format!("must be between 1 and {MAX_MAX_DEVICES}"),
        ));
    }
    Ok(())
}

/// When a reading happened: the device's time if it gave one, else its receipt.
pub fn reading_time_ms(event: &Event) -> u64 {
    event.device_time_ms.unwrap_or(event.received_at_ms)
}

/// The metrics of one stateful transform's table.
#[derive(Clone)]
pub struct TableMetrics {
    devices: Gauge,
    evicted: Counter,
}

impl TableMetrics {
    /// The series of transform `name`.
    pub fn new(metrics: &Metrics, name: &str) -> Self {
        Self {
            devices: metrics.transform_state_devices(name),
            evicted: metrics.transform_evicted_devices(name),
        }
    }
}

/// Per-device values `V`, at most `capacity` of them, least recently seen evicted first.
pub struct DeviceTable<V> {
    entries: HashMap<DeviceId, (u64, V)>,
    /// Last-seen sequence number → device, oldest first.
    order: BTreeMap<u64, DeviceId>,
    next: u64,
    capacity: usize,
    metrics: TableMetrics,
}

/// A table as checkpointed: devices oldest first.
#[derive(Serialize, Deserialize)]
struct Snapshot<V> {
    devices: Vec<(String, V)>,
}

impl<V> DeviceTable<V> {
    /// An empty table of at most `capacity` devices.
    pub fn new(capacity: usize, metrics: TableMetrics) -> Self {
        Self {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            next: 0,
            capacity: capacity.max(1),
            metrics,
        }
    }

    /// The entry of `device`, made with `fresh` if absent (evicting the least recently
    /// seen device when full, handed to `evicted`); marks it most recently seen.
    pub fn entry(
        &mut self,
        device: &DeviceId,
        fresh: impl FnOnce() -> V,
        mut evicted: impl FnMut(V),
    ) -> &mut V {
        let seq = self.next;
        self.next += 1;
        let present = self.entries.contains_key(device);
        if !present {
            while self.entries.len() >= self.capacity {
                let Some((_, oldest)) = self.order.pop_first() else {
                    break;
                };
                if let Some((_, value)) = self.entries.remove(&oldest) {
                    evicted(value);
                }
                self.metrics.evicted.inc();
            }
        }
        let size = self.entries.len() + usize::from(!present);
        self.metrics
            .devices
            .set(i64::try_from(size).unwrap_or(i64::MAX));
        let slot = self
            .entries
            .entry(device.clone())
            .or_insert_with(|| (seq, fresh()));
        self.order.remove(&slot.0);
        slot.0 = seq;
        self.order.insert(seq, device.clone());
        &mut slot.1
    }

    /// The entry of `device`, without touching its recency.
    #[cfg(test)]
    pub fn get(&self, device: &DeviceId) -> Option<&V> {
        self.entries.get(device).map(|(_, value)| value)
    }

    /// The entry of `device`, mutably, without touching its recency.
    pub fn get_mut(&mut self, device: &DeviceId) -> Option<&mut V> {
        self.entries.get_mut(device).map(|(_, value)| value)
    }

    /// Every device and its value, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&DeviceId, &V)> {
        self.entries
            .iter()
            .map(|(device, (_, value))| (device, value))
    }

    /// Every device and its value, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&DeviceId, &mut V)> {
        self.entries
            .iter_mut()
            .map(|(device, (_, value))| (device, value))
    }

    /// How many devices are tracked.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    fn publish(&self) {
        self.metrics
            .devices
            .set(i64::try_from(self.entries.len()).unwrap_or(i64::MAX));
    }
}

impl<V: Serialize + DeserializeOwned> DeviceTable<V> {
    /// The table as checkpoint bytes (JSON), devices oldest first.
    pub fn checkpoint(&self) -> Vec<u8> {
        let devices = self
            .order
            .values()
            .filter_map(|device| {
                let (_, value) = self.entries.get(device)?;
                Some((device.as_str().to_owned(), value))
            })
            .collect::<Vec<_>>();
        serde_json::to_vec(&Snapshot { devices }).unwrap_or_default()
    }

    /// Replaces the table with a checkpoint (the most recent devices kept when it holds
    /// more than the bound).
    pub fn restore(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let snapshot: Snapshot<V> = serde_json::from_slice(bytes)?;
        self.entries.clear();
        self.order.clear();
        let skip = snapshot.devices.len().saturating_sub(self.capacity);
        for (device, value) in snapshot.devices.into_iter().skip(skip) {
            let device = DeviceId::new(&device);
            let seq = self.next;
            self.next += 1;
            if let Some((old, _)) = self.entries.insert(device.clone(), (seq, value)) {
                self.order.remove(&old);
            }
            self.order.insert(seq, device);
        }
        self.publish();
        Ok(())
    }
}

/// A [`DeviceTable`] shared by the tasks that run one transform: the lock, and the
/// checkpoint and restore every per-device transform offers.
pub struct SharedDeviceTable<V>(std::sync::Mutex<DeviceTable<V>>);

impl<V> SharedDeviceTable<V> {
    /// An empty table of at most `capacity` devices.
    pub fn new(capacity: usize, metrics: TableMetrics) -> Self {
        Self(std::sync::Mutex::new(DeviceTable::new(capacity, metrics)))
    }

    /// The table; a panic elsewhere while it was held leaves it usable.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, DeviceTable<V>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<V: Serialize + DeserializeOwned> SharedDeviceTable<V> {
    /// See [`DeviceTable::checkpoint`]; for [`EventTransform::checkpoint`].
    ///
    /// [`EventTransform::checkpoint`]: super::EventTransform::checkpoint
    pub fn checkpoint(&self) -> Option<Vec<u8>> {
        Some(self.lock().checkpoint())
    }

    /// See [`DeviceTable::restore`].
    pub fn restore(&self, state: &[u8]) -> anyhow::Result<()> {
        self.lock().restore(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(capacity: usize) -> (DeviceTable<u32>, Metrics) {
        let metrics = Metrics::new();
        let table = DeviceTable::new(capacity, TableMetrics::new(&metrics, "t"));
        (table, metrics)
    }

    #[test]
    fn least_recently_seen_device_is_evicted_and_counted() {
        let (mut table, metrics) = table(2);
        let mut gone = Vec::new();
        *table.entry(&DeviceId::new("a"), || 1, drop) += 0;
        *table.entry(&DeviceId::new("b"), || 2, drop) += 0;
        // `a` seen again: `b` is now the oldest.
        *table.entry(&DeviceId::new("a"), || 0, drop) += 10;
        table.entry(&DeviceId::new("c"), || 3, |value| gone.push(value));
        assert_eq!(gone, vec![2]);
        assert_eq!(table.len(), 2);
        assert!(table.get(&DeviceId::new("b")).is_none());
        assert_eq!(table.get(&DeviceId::new("a")), Some(&11));
        let text = metrics.encode();
        assert!(text.contains("fieldgate_transform_evicted_devices_total{transform=\"t\"} 1"));
        assert!(text.contains("fieldgate_transform_state_devices{transform=\"t\"} 2"));
    }

    #[test]
    fn checkpoint_round_trips_and_respects_the_bound() {
        let (mut table, _metrics) = table(3);
        for (index, device) in ["a", "b", "c"].into_iter().enumerate() {
            table.entry(
                &DeviceId::new(device),
                || u32::try_from(index).unwrap_or(0),
                drop,
            );
        }
        let bytes = table.checkpoint();
        let (mut small, _metrics) = self::table(2);
        small.restore(&bytes).expect("restores");
        assert_eq!(small.len(), 2);
        assert!(small.get(&DeviceId::new("a")).is_none(), "oldest dropped");
        assert_eq!(small.get(&DeviceId::new("c")), Some(&2));
        assert!(small.restore(b"garbage").is_err());
    }
}

#[cfg(test)]
mod hostile {
    //! Every stateful transform against hostile payloads: arbitrary bytes, deep and odd
    //! JSON, huge and tiny numbers, for many devices. Nothing panics, every reading-judging
    //! transform still passes what it cannot judge, and checkpoints stay restorable.

    use proptest::prelude::*;

    use crate::transforms::EventTransform;
    use crate::transforms::alarm::AlarmConfig;
    use crate::transforms::deadband::DeadbandConfig;
    use crate::transforms::dedup::DedupConfig;
    use crate::transforms::downsample::DownsampleConfig;
    use crate::transforms::smooth::SmoothConfig;
    use crate::transforms::tests::{build, reading, run};

    fn transforms() -> Vec<std::sync::Arc<dyn EventTransform>> {
        vec![
            build::<AlarmConfig>(
                "inputs = [\"d\"]\ndetector = \"threshold\"\nfield = \"temp\"\nabove = 1.0",
            ),
            build::<AlarmConfig>(
                "inputs = [\"d\"]\ndetector = \"rate_of_change\"\nfield = \"temp\"\nabove = 1.0",
            ),
            build::<AlarmConfig>(
                "inputs = [\"d\"]\ndetector = \"zscore\"\nfield = \"temp\"\nwarmup = 2",
            ),
            build::<AlarmConfig>(
                "inputs = [\"d\"]\ndetector = \"stuck\"\nfield = \"temp\"\ncount = 2",
            ),
            build::<AlarmConfig>(
                "inputs = [\"d\"]\ndetector = \"missing\"\nfield = \"temp\"\ninterval = \"1s\"",
            ),
            build::<DeadbandConfig>("inputs = [\"d\"]\nfields = { temp = { percent = 1.0 } }"),
            build::<SmoothConfig>(
                "inputs = [\"d\"]\nfield = \"temp\"\nmethod = \"median\"\nwindow = 4",
            ),
            build::<SmoothConfig>(
                "inputs = [\"d\"]\nfield = \"temp\"\nmethod = \"ewma\"\nalpha = 1.0",
            ),
            build::<DownsampleConfig>("inputs = [\"d\"]\ninterval = \"1s\""),
            build::<DedupConfig>("inputs = [\"d\"]\nwindow = \"1s\"\nfields = [\"temp\"]"),
        ]
    }

    fn payload() -> impl Strategy<Value = String> {
        prop_oneof![
            "\\PC{0,64}",
            prop::num::f64::ANY.prop_map(|value| format!("{{\"temp\":{value}}}")),
            any::<i64>().prop_map(|value| format!("{{\"temp\":{value}}}")),
            Just("{\"temp\":1e308}".to_owned()),
            Just("{\"temp\":-1e308}".to_owned()),
            Just("{\"temp\":5e-324}".to_owned()),
            Just("{\"temp\":{\"temp\":[1,2,{}]}}".to_owned()),
            Just(format!("{}{}", "[".repeat(200), "]".repeat(200))),
            "[a-z]{0,8}".prop_map(|text| format!("{{\"temp\":\"{text}\"}}")),
        ]
    }

    proptest! {
        #[test]
        fn hostile_readings_never_panic(
            readings in prop::collection::vec(("[a-c]", any::<u64>(), payload()), 1..40),
        ) {
            for transform in transforms() {
                for (device, time, payload) in &readings {
                    let event = reading(device, *time, payload);
                    let out = run(&*transform, event.clone());
                    prop_assert!(out.len() <= 2);
                }
                let mut emitted = crate::transforms::Emitted::default();
                transform.tick(std::time::SystemTime::now(), &mut emitted);
                let state = transform.checkpoint().unwrap_or_default();
                prop_assert!(transform.restore(&state).is_ok());
            }
        }
    }
}
