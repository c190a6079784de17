//! Delivery accounting at the upstream subscriber: which (device, seq) pairs
//! arrived, how often, and how late.
//!
//! Invariants: a seq is accepted only if the device had already sent it
//! (senders bump their counter *before* writing), so every per-device bitset
//! stays within what was sent; messages stamped before this run started
//! (replays from an earlier run's buffer, retained messages) are counted as
//! stale and otherwise ignored.

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::extract::Sample;

/// Highest latency the histogram resolves: one hour, in microseconds.
const LATENCY_MAX_US: u64 = 3_600_000_000;

/// Maps device ids `{prefix}-{n}` (n = 1..=devices) to 0-based slots.
#[derive(Debug, Clone)]
pub struct DeviceIds {
    prefix: String,
    devices: usize,
}

impl DeviceIds {
    /// Ids `{prefix}-1` ..= `{prefix}-{devices}`.
    pub fn new(prefix: &str, devices: usize) -> Self {
        Self {
            prefix: prefix.to_owned(),
            devices,
        }
    }

    /// The id of slot `slot` (0-based).
    pub fn name(&self, slot: usize) -> String {
        format!("{}-{}", self.prefix, slot + 1)
    }

    /// The slot of `id`, or None when it is not one of ours.
    pub fn slot(&self, id: &str) -> Option<usize> {
        let number = id.strip_prefix(self.prefix.as_str())?.strip_prefix('-')?;
        if number.starts_with('0') || number.starts_with('+') {
            return None;
        }
        let number: usize = number.parse().ok()?;
        (1..=self.devices).contains(&number).then(|| number - 1)
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.devices
    }
}

/// A growable bitset of the sequence numbers seen from one device.
#[derive(Debug, Default, Clone)]
struct SeqSet {
    bits: Vec<u64>,
    count: u64,
}

impl SeqSet {
    /// Marks `seq`; true when it was not marked before.
    fn insert(&mut self, seq: u64) -> bool {
        let Ok(index) = usize::try_from(seq / 64) else {
            return false;
        };
        if index >= self.bits.len() {
            self.bits.resize(index + 1, 0);
        }
        let mask = 1u64 << (seq % 64);
        let fresh = self.bits[index] & mask == 0;
        self.bits[index] |= mask;
        if fresh {
            self.count += 1;
        }
        fresh
    }
}

/// What happened to one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// First sighting of this (device, seq).
    New,
    /// Seen before: an at-least-once redelivery.
    Duplicate,
    /// Stamped before this run started.
    Stale,
    /// A device id that is not ours.
    Foreign,
    /// seq 0 or beyond what the device has sent.
    Unexpected,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct LatencySummary {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest value recorded.
    pub max: u64,
}

/// Per-run delivery accounting, owned by the subscriber task.
#[derive(Debug)]
pub struct Tracker {
    ids: DeviceIds,
    run_start_us: u64,
    seen: Vec<SeqSet>,
    latency: Histogram<u64>,
    /// Distinct (device, seq) pairs received.
    pub unique: u64,
    /// Redeliveries of a pair already received.
    pub duplicates: u64,
    /// Messages stamped before the run started.
    pub stale: u64,
    /// Messages from devices that are not ours.
    pub foreign: u64,
    /// Messages with a seq the device never sent.
    pub unexpected: u64,
    /// Objects without (device, seq, t).
    pub unrecognized: u64,
    /// Receive time of the last new message, microseconds since the epoch.
    pub last_receive_us: u64,
}

impl Tracker {
    /// A tracker for `ids`; messages stamped before `run_start_us` are stale.
    pub fn new(ids: DeviceIds, run_start_us: u64) -> anyhow::Result<Self> {
        let latency = Histogram::new_with_bounds(1, LATENCY_MAX_US, 3)
            .map_err(|e| anyhow::anyhow!("creating the latency histogram: {e}"))?;
        Ok(Self {
            seen: vec![SeqSet::default(); ids.len()],
            ids,
            run_start_us,
            latency,
            unique: 0,
            duplicates: 0,
            stale: 0,
            foreign: 0,
            unexpected: 0,
            unrecognized: 0,
            last_receive_us: 0,
        })
    }

    /// Accounts one sample received at `now_us`; `sent(slot)` is how many
    /// messages that device has sent so far.
    pub fn record(&mut self, sample: &Sample, now_us: u64, sent: impl Fn(usize) -> u64) -> Outcome {
        if sample.send_us < self.run_start_us {
            self.stale += 1;
            return Outcome::Stale;
        }
        let Some(slot) = self.ids.slot(&sample.device) else {
            self.foreign += 1;
            return Outcome::Foreign;
        };
        if sample.seq == 0 || sample.seq > sent(slot) {
            self.unexpected += 1;
            return Outcome::Unexpected;
        }
        if !self.seen[slot].insert(sample.seq) {
            self.duplicates += 1;
            return Outcome::Duplicate;
        }
        self.unique += 1;
        self.last_receive_us = self.last_receive_us.max(now_us);
        self.latency
            .saturating_record(now_us.saturating_sub(sample.send_us).max(1));
        Outcome::New
    }

    /// Messages sent (per `sent(slot)`) that never arrived.
    pub fn lost(&self, sent: impl Fn(usize) -> u64) -> u64 {
        self.seen
            .iter()
            .enumerate()
            .map(|(slot, seen)| sent(slot).saturating_sub(seen.count))
            .sum()
    }

    /// Latency percentiles, or None when nothing arrived.
    pub fn latency(&self) -> Option<LatencySummary> {
        if self.latency.is_empty() {
            return None;
        }
        Some(LatencySummary {
            p50: self.latency.value_at_quantile(0.50),
            p90: self.latency.value_at_quantile(0.90),
            p99: self.latency.value_at_quantile(0.99),
            p999: self.latency.value_at_quantile(0.999),
            max: self.latency.max(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(device: &str, seq: u64, send_us: u64) -> Sample {
        Sample {
            device: device.into(),
            seq,
            send_us,
        }
    }

    #[test]
    fn device_ids_round_trip_and_reject_others() {
        let ids = DeviceIds::new("dev", 10);
        assert_eq!(ids.name(0), "dev-1");
        assert_eq!(ids.slot("dev-1"), Some(0));
        assert_eq!(ids.slot("dev-10"), Some(9));
        for other in [
            "dev-0", "dev-11", "dev-01", "dev-+1", "dev1", "devx-1", "dev-", "gw-1",
        ] {
            assert_eq!(ids.slot(other), None, "{other}");
        }
        let dashed = DeviceIds::new("a-b", 2);
        assert_eq!(dashed.slot("a-b-2"), Some(1));
    }

    #[test]
    fn loss_and_duplicates_per_device() {
        let mut tracker = Tracker::new(DeviceIds::new("dev", 2), 1_000).unwrap();
        let sent = |slot: usize| [5, 3][slot];
        // dev-1: 1,2,2,4 (3 and 5 lost, 2 duplicated); dev-2: 1,2,3 complete, 3 twice.
        for (device, seq) in [("dev-1", 1), ("dev-1", 2), ("dev-1", 2), ("dev-1", 4)] {
            tracker.record(&sample(device, seq, 1_000), 1_500, sent);
        }
        for seq in [3, 1, 2, 3] {
            tracker.record(&sample("dev-2", seq, 2_000), 2_100, sent);
        }
        assert_eq!(tracker.unique, 6);
        assert_eq!(tracker.duplicates, 2);
        assert_eq!(tracker.lost(sent), 2);
        assert_eq!(tracker.last_receive_us, 2_100);
    }

    #[test]
    fn stale_foreign_and_unexpected_are_kept_apart() {
        let mut tracker = Tracker::new(DeviceIds::new("dev", 1), 1_000).unwrap();
        let sent = |_: usize| 3;
        assert_eq!(
            tracker.record(&sample("dev-1", 1, 999), 2_000, sent),
            Outcome::Stale
        );
        assert_eq!(
            tracker.record(&sample("other", 1, 1_000), 2_000, sent),
            Outcome::Foreign
        );
        assert_eq!(
            tracker.record(&sample("dev-1", 0, 1_000), 2_000, sent),
            Outcome::Unexpected
        );
        assert_eq!(
            tracker.record(&sample("dev-1", 4, 1_000), 2_000, sent),
            Outcome::Unexpected
        );
        assert_eq!(
            tracker.record(&sample("dev-1", 3, 1_000), 2_000, sent),
            Outcome::New
        );
        assert_eq!(
            (tracker.stale, tracker.foreign, tracker.unexpected),
            (1, 1, 2)
        );
        assert_eq!(tracker.lost(sent), 2);
    }

    #[test]
    fn latency_percentiles_in_microseconds() {
        let mut tracker = Tracker::new(DeviceIds::new("dev", 1), 0).unwrap();
        assert_eq!(tracker.latency(), None);
        for seq in 1..=100u64 {
            tracker.record(&sample("dev-1", seq, 10_000), 10_000 + seq * 100, |_| 100);
        }
        let latency = tracker.latency().unwrap();
        assert!((4_990..=5_010).contains(&latency.p50), "{latency:?}");
        assert!((9_890..=9_910).contains(&latency.p99), "{latency:?}");
        assert!((9_990..=10_010).contains(&latency.max), "{latency:?}");
    }

    #[test]
    fn clock_skew_records_at_least_one_microsecond() {
        let mut tracker = Tracker::new(DeviceIds::new("dev", 1), 0).unwrap();
        tracker.record(&sample("dev-1", 1, 5_000), 4_000, |_| 1);
        assert_eq!(tracker.latency().unwrap().max, 1);
    }
}
