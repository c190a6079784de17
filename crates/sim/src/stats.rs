//! Run-wide counters shared by device tasks, the live progress line, and the
//! JSON summary printed at the end.
//!
//! Device tasks only touch atomics; the first error of each kind is kept (with
//! its subject) so a failing run says why without printing 10,000 lines.

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::tracker::LatencySummary;

/// Microseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Counters for one run; every field is updated with relaxed atomics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Distinct messages sent (first transmissions).
    pub sent: AtomicU64,
    /// Retransmissions after a reconnect (at-least-once).
    pub resent: AtomicU64,
    /// Messages acknowledged (gateway ack, MQTT PUBACK/PUBCOMP).
    pub acked: AtomicU64,
    /// Messages the gateway refused with a nack.
    pub nacked: AtomicU64,
    /// Error frames received from the gateway.
    pub gateway_errors: AtomicU64,
    /// Commands received from the gateway (answered with a command_result).
    pub commands: AtomicU64,
    /// Connections currently open.
    pub connected: AtomicI64,
    /// Highest number of connections open at once.
    pub peak_connected: AtomicI64,
    /// Failed connection attempts.
    pub connect_failures: AtomicU64,
    /// Established connections that were lost.
    pub disconnects: AtomicU64,
    /// Distinct messages received upstream (mirrors the tracker, for the progress line).
    pub received: AtomicU64,
    /// Microseconds from the run start to the last send, for the send rate.
    pub last_send_offset_us: AtomicU64,
}

impl Counters {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Records a new open connection.
    pub fn connection_opened(&self) {
        let now = self.connected.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_connected.fetch_max(now, Ordering::Relaxed);
    }

    /// Records a closed connection.
    pub fn connection_closed(&self) {
        self.connected.fetch_sub(1, Ordering::Relaxed);
    }

    /// Connections open now.
    pub fn connected_now(&self) -> u64 {
        u64::try_from(self.connected.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// Notes that a send happened `offset` after the run start.
    pub fn note_send(&self, offset: Duration) {
        let offset = u64::try_from(offset.as_micros()).unwrap_or(u64::MAX);
        self.last_send_offset_us
            .fetch_max(offset, Ordering::Relaxed);
    }
}

/// The number of sent messages per device, bumped *before* a message is written.
#[derive(Debug)]
pub struct SentSeqs(Vec<AtomicU64>);

impl SentSeqs {
    /// Zeroes for `devices` devices.
    pub fn new(devices: usize) -> Self {
        Self((0..devices).map(|_| AtomicU64::new(0)).collect())
    }

    /// Sets the highest seq sent by device `slot`.
    pub fn set(&self, slot: usize, seq: u64) {
        if let Some(counter) = self.0.get(slot) {
            counter.store(seq, Ordering::Release);
        }
    }

    /// Highest seq sent by device `slot`.
    pub fn get(&self, slot: usize) -> u64 {
        self.0.get(slot).map_or(0, |c| c.load(Ordering::Acquire))
    }

    /// Sum over all devices.
    pub fn total(&self) -> u64 {
        self.0.iter().map(|c| c.load(Ordering::Acquire)).sum()
    }
}

/// The first error of each kind, with how many of that kind happened.
#[derive(Debug, Default)]
pub struct ErrorLog(Mutex<BTreeMap<&'static str, (u64, String)>>);

impl ErrorLog {
    /// Records an error of `kind`; `describe` runs only for the first of a kind.
    pub fn record(&self, kind: &'static str, describe: impl FnOnce() -> String) {
        // A poisoned lock only means another task panicked mid-insert; the map is still usable.
        let mut errors = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        errors
            .entry(kind)
            .and_modify(|(count, _)| *count += 1)
            .or_insert_with(|| (1, describe()));
    }

    /// Snapshot for the summary: kind -> {count, first}.
    pub fn snapshot(&self) -> BTreeMap<String, ErrorSummary> {
        let errors = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        errors
            .iter()
            .map(|(kind, (count, first))| {
                (
                    (*kind).to_owned(),
                    ErrorSummary {
                        count: *count,
                        first: first.clone(),
                    },
                )
            })
            .collect()
    }
}

/// How often one kind of error happened and the first message.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorSummary {
    /// Occurrences.
    pub count: u64,
    /// The first one, naming its subject.
    pub first: String,
}

/// The JSON summary of a tcp or mqtt run.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// "tcp" or "mqtt".
    pub scenario: &'static str,
    /// Simulated devices.
    pub devices: usize,
    /// Distinct messages sent.
    pub sent: u64,
    /// Messages acknowledged (ack mode or MQTT QoS > 0), else null.
    pub acked: Option<u64>,
    /// Distinct messages received upstream (null without --subscribe).
    pub received: Option<u64>,
    /// Sent but never received upstream (null without --subscribe).
    pub lost: Option<u64>,
    /// Redeliveries received upstream (null without --subscribe).
    pub duplicates: Option<u64>,
    /// Failed connection attempts.
    pub connect_failures: u64,
    /// Wall time from the first connection to the last send, seconds.
    pub duration_s: f64,
    /// sent / duration_s.
    pub send_rate: f64,
    /// received / (last arrival - run start), messages per second.
    pub receive_rate: Option<f64>,
    /// Send-to-arrival latency, microseconds (null without --subscribe or arrivals).
    pub latency_us: Option<LatencySummary>,
    /// Retransmissions after reconnects.
    pub resent: u64,
    /// Messages refused by the gateway.
    pub nacked: u64,
    /// Connections lost after they were established.
    pub disconnects: u64,
    /// Upstream messages from before this run (ignored).
    pub stale: Option<u64>,
    /// Upstream messages for device ids that are not ours.
    pub foreign: Option<u64>,
    /// Upstream messages with a seq the device never sent.
    pub unexpected: Option<u64>,
    /// Upstream objects without device/seq/t (status events, other traffic).
    pub unrecognized: Option<u64>,
    /// Seconds spent waiting for stragglers after sending.
    pub drain_s: Option<f64>,
    /// True when the drain timeout ended the wait: "lost" then includes messages
    /// still queued upstream (e.g. in the gateway's buffer), not only dropped ones.
    pub drain_timed_out: Option<bool>,
    /// First error of each kind.
    pub errors: BTreeMap<String, ErrorSummary>,
}

/// Prints a JSON value on stdout.
pub fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    println!("{text}");
    Ok(())
}

/// Rounds to 3 decimals for readable JSON.
pub fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// Seconds as f64, rounded to milliseconds.
pub fn secs(duration: Duration) -> f64 {
    round3(duration.as_secs_f64())
}

/// Prints a progress line on stderr once per second while stderr is a
/// terminal, until `stop` is cancelled; then ends the line.
pub async fn progress(
    counters: &Counters,
    devices: usize,
    start: Instant,
    stop: CancellationToken,
) {
    if !std::io::stderr().is_terminal() {
        stop.cancelled().await;
        return;
    }
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_sent = 0;
    let mut printed = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let sent = Counters::get(&counters.sent);
        eprint!(
            "\r[{:>4}s] connected {}/{}  sent {} ({}/s)  acked {}  received {}  failures {}   ",
            start.elapsed().as_secs(),
            counters.connected_now(),
            devices,
            sent,
            sent.saturating_sub(last_sent),
            Counters::get(&counters.acked),
            Counters::get(&counters.received),
            Counters::get(&counters.connect_failures),
        );
        printed = true;
        last_sent = sent;
    }
    if printed {
        eprintln!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_log_keeps_the_first_and_counts_the_rest() {
        let log = ErrorLog::default();
        log.record("connect", || "dev-1: refused".into());
        log.record("connect", || "dev-2: refused".into());
        let snapshot = log.snapshot();
        assert_eq!(snapshot["connect"].count, 2);
        assert_eq!(snapshot["connect"].first, "dev-1: refused");
    }

    #[test]
    fn sent_seqs_sum() {
        let seqs = SentSeqs::new(3);
        seqs.set(0, 5);
        seqs.set(2, 7);
        seqs.set(9, 1); // out of range: ignored
        assert_eq!((seqs.get(0), seqs.get(1), seqs.total()), (5, 0, 12));
    }
}
