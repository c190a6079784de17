//! Failover to a backup sink: a sink with `failover = "OTHER"` hands its *new* events to
//! sink `OTHER` while its upstream link has been down longer than `failover_after`, and
//! takes them back as soon as the link is healthy again.
//!
//! Policy and invariants:
//! - The decision is a pure function of the primary's [`LinkState`] and the time
//!   ([`should_fail_over`]); a monitor task per primary re-evaluates it on every link
//!   change and when the `failover_after` deadline passes, and flips the
//!   [`FailoverSwitch`] the routes read. Switching back needs a healthy link (for MQTT:
//!   connected and, after an outage, an ack from the broker or 10 s without trouble).
//! - Every event is queued for exactly one of the two buffers (the router reads the
//!   switch once per event), so an acknowledged event is stored in the buffer that will
//!   deliver it and in no other: it reaches exactly one of the two clouds (the usual
//!   at-least-once duplicates of one cloud aside).
//! - The primary's backlog stays in its own buffer and drains to the primary when it
//!   recovers: nothing moves between buffers, so per-cloud order holds and no event can
//!   be delivered by both. Events in the backlog therefore wait for the primary.
//! - `check` rejects an unknown failover sink, a sink failing over to itself, and a
//!   failover sink that has a failover sink itself (chains and cycles). Which clouds may
//!   carry which data (regions) is the user's choice: the failover sink takes the
//!   primary's events whatever its own labels or region.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::link::{LinkState, SinkLinks};
use crate::config::HumanDuration;
use crate::pipeline::FailoverSwitch;
use crate::telemetry::Metrics;

/// `failover_after` when a sink names a `failover` sink without it.
pub const DEFAULT_FAILOVER_AFTER: Duration = Duration::from_secs(30);

/// `failover` and `failover_after` of one `[sinks.NAME]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverConfig {
    /// The sink that takes new events while this one is unreachable.
    pub to: toml::Spanned<String>,
    /// How long the link must have been down before it does (spanned as written, or
    /// as `to` when defaulted).
    pub after: toml::Spanned<Duration>,
}

impl FailoverConfig {
    /// From the two keys as read from the table; `None` without `failover`.
    pub fn from_keys(
        to: Option<toml::Spanned<String>>,
        after: Option<toml::Spanned<HumanDuration>>,
    ) -> Option<Self> {
        let to = to?;
        let after = match after {
            Some(after) => toml::Spanned::new(after.span(), after.into_inner().0),
            None => toml::Spanned::new(to.span(), DEFAULT_FAILOVER_AFTER),
        };
        Some(Self { to, after })
    }

    /// `failover_after` as a duration.
    pub fn after(&self) -> Duration {
        *self.after.get_ref()
    }
}

/// Whether a primary whose link is in `link` should have failed over at `now`: it has
/// been down for at least `after`.
pub fn should_fail_over(link: LinkState, after: Duration, now: Instant) -> bool {
    !link.up && now.saturating_duration_since(link.since) >= after
}

/// When [`should_fail_over`] turns true if nothing changes (a down link that has not
/// failed over yet), else `None`.
pub fn next_switch(link: LinkState, after: Duration, now: Instant) -> Option<Instant> {
    (!link.up && !should_fail_over(link, after, now)).then(|| link.since + after)
}

/// A primary's failover as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverStatus {
    /// The failover sink.
    pub to: String,
    /// `failover_after` in seconds.
    pub after_seconds: f64,
    /// Whether new events go to the failover sink now.
    pub active: bool,
    /// Events sent to the failover sink since start-up.
    pub redirected_events: u64,
}

#[derive(Clone)]
struct Entry {
    config: FailoverConfig,
    switch: Arc<FailoverSwitch>,
}

/// The failovers of the running config, for the status API: reads the live switches.
#[derive(Clone, Default)]
pub struct FailoverView {
    entries: BTreeMap<String, Entry>,
}

impl FailoverView {
    /// The failover of primary sink `sink`, if it has one.
    pub fn status(&self, sink: &str) -> Option<FailoverStatus> {
        let entry = self.entries.get(sink)?;
        Some(FailoverStatus {
            to: entry.config.to.get_ref().clone(),
            after_seconds: entry.config.after().as_secs_f64(),
            active: entry.switch.is_active(),
            redirected_events: entry.switch.redirected(),
        })
    }

    /// The primaries failing over to `sink`.
    pub fn primaries_of(&self, sink: &str) -> Vec<String> {
        self.entries
            .iter()
            .filter(|(_, entry)| entry.config.to.get_ref() == sink)
            .map(|(primary, _)| primary.clone())
            .collect()
    }
}

/// The failover monitors of a config, one per sink that names a failover sink.
pub struct Failovers {
    entries: BTreeMap<String, Entry>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Failovers {
    /// Starts a monitor for every entry of `configs` (primary sink → its failover).
    /// A primary that `previous` already had keeps its switch, so routes compiled
    /// before and after a reload share one switch and no switch is counted twice.
    pub fn start(
        configs: &BTreeMap<String, FailoverConfig>,
        links: &SinkLinks,
        metrics: &Metrics,
        previous: Option<&Failovers>,
    ) -> Self {
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let mut entries = BTreeMap::new();
        for (primary, config) in configs {
            let to = config.to.get_ref();
            let switch = previous
                .and_then(|previous| previous.entries.get(primary))
                .filter(|entry| entry.config.to.get_ref() == to)
                .map_or_else(
                    || Arc::new(FailoverSwitch::new(metrics.failover_events(primary, to))),
                    |entry| Arc::clone(&entry.switch),
                );
            tasks.spawn(monitor(
                Monitor {
                    primary: primary.clone(),
                    to: to.clone(),
                    after: config.after(),
                    switch: Arc::clone(&switch),
                    active_gauge: metrics.failover_active(primary),
                    switches: metrics.failover_switches(primary),
                },
                links.get(primary).watch(),
                stop.clone(),
            ));
            entries.insert(
                primary.clone(),
                Entry {
                    config: config.clone(),
                    switch,
                },
            );
        }
        tasks.close();
        Self {
            entries,
            stop,
            tasks,
        }
    }

    /// The switch of every primary, for compiling the routes.
    pub fn switches(&self) -> BTreeMap<String, Arc<FailoverSwitch>> {
        self.entries
            .iter()
            .map(|(primary, entry)| (primary.clone(), Arc::clone(&entry.switch)))
            .collect()
    }

    /// A view of the switches for the status API.
    pub fn view(&self) -> FailoverView {
        FailoverView {
            entries: self.entries.clone(),
        }
    }

    /// Stops the monitors (a reload replaced them); the switches stay as they are.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.wait().await;
    }
}

/// What one monitor decides for and reports to.
struct Monitor {
    primary: String,
    to: String,
    after: Duration,
    switch: Arc<FailoverSwitch>,
    active_gauge: Gauge,
    switches: Counter,
}

/// Flips `monitor.switch` as [`should_fail_over`] says, re-evaluating on every change of
/// `link` and at the deadline, until `stop`.
async fn monitor(monitor: Monitor, mut link: watch::Receiver<LinkState>, stop: CancellationToken) {
    loop {
        let state = *link.borrow_and_update();
        let now = Instant::now();
        let active = should_fail_over(state, monitor.after, now);
        let was = monitor.switch.set(active);
        monitor.active_gauge.set(i64::from(active));
        if active && !was {
            monitor.switches.inc();
            tracing::warn!(
                sink = %monitor.primary,
                failover = %monitor.to,
                down_for = ?now.saturating_duration_since(state.since),
                "upstream unreachable: new events go to the failover sink; the backlog waits for this sink"
            );
        } else if was && !active {
            tracing::info!(
                sink = %monitor.primary,
                failover = %monitor.to,
                "upstream healthy again: new events go to this sink"
            );
        }
        let deadline = next_switch(state, monitor.after, now);
        tokio::select! {
            () = stop.cancelled() => return,
            changed = link.changed() => {
                if changed.is_err() {
                    // The health is gone with the gateway; nothing will change any more.
                    stop.cancelled().await;
                    return;
                }
            }
            () = async {
                match deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

#[cfg(test)]
mod tests;
