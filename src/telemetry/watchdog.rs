//! The memory and resource watchdog: samples the process every `watchdog.interval` and
//! raises a diagnostic when resident memory grows too fast or nears `watchdog.rss_limit`.
//!
//! Each sample holds RSS, open FDs, alive tokio tasks and the events and bytes held by every
//! sink's buffer. The slope of RSS over the last minute of samples is exported as
//! `fieldgate_watchdog_rss_growth_bytes_per_minute`, the task count as `fieldgate_tasks`.
//! A breach (growth above `rss_growth_limit` per minute, or RSS above 90 % of `rss_limit`)
//! logs a warning with the numbers and writes a diagnostic profile to
//! `<data_dir>/profiles/`, at most once per `cooldown`. Deciding is pure
//! ([`RssWindow::growth_per_minute`], [`assess`]); only [`Watchdog::run`] touches the clock,
//! `/proc` and the disk.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::gauge::Gauge;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::Metrics;
use super::process::ProcessStats;
use super::profiling::{CpuProfiler, ProfileFormat};
use crate::config::WatchdogConfig;

/// The slope is fitted over samples spanning at least this long (the newest minute or so).
const WINDOW: Duration = Duration::from_secs(60);
/// Before the samples span this much, start-up allocation would pass for a leak: no slope.
const MIN_SLOPE_SPAN: Duration = Duration::from_secs(30);
/// A hard bound on the history, whatever the interval (100 ms × 1024 > `WINDOW`).
const MAX_SAMPLES: usize = 1024;
/// RSS above this fraction of `rss_limit`, in per mille, is "near the limit".
const NEAR_LIMIT_PER_MILLE: u128 = 900;
/// Diagnostic files kept in `<data_dir>/profiles/`; older ones are deleted.
const MAX_PROFILE_FILES: usize = 20;
/// Length of the CPU profile written beside a diagnostic when the feature is built.
const DIAGNOSTIC_CPU_PROFILE: Duration = Duration::from_secs(10);
/// File name prefix of everything the watchdog writes.
const PROFILE_PREFIX: &str = "watchdog-";

/// One look at the process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Time since the watchdog started.
    pub at: Duration,
    /// Resident set size in bytes.
    pub rss_bytes: i64,
    /// Open file descriptors.
    pub open_fds: i64,
    /// Alive tokio tasks.
    pub tasks: usize,
    /// Events held by all sink buffers together.
    pub buffered_events: i64,
    /// Bytes held by all sink buffers together.
    pub buffered_bytes: i64,
}

/// The newest minute or so of samples, oldest first, bounded by [`MAX_SAMPLES`].
#[derive(Debug, Default)]
pub struct RssWindow {
    samples: VecDeque<Sample>,
}

impl RssWindow {
    /// Adds `sample` and forgets samples no longer needed to span [`WINDOW`].
    pub fn push(&mut self, sample: Sample) {
        self.samples.push_back(sample);
        // Drop the oldest while the rest still reach back a whole window: with a long
        // interval the window keeps at least two samples and so still has a slope.
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|second| sample.at.saturating_sub(second.at) >= WINDOW)
        {
            self.samples.pop_front();
        }
        while self.samples.len() > MAX_SAMPLES {
            self.samples.pop_front();
        }
    }

    /// The samples held, oldest first.
    pub fn samples(&self) -> impl ExactSizeIterator<Item = &Sample> {
        self.samples.iter()
    }

    /// The least-squares slope of RSS in bytes per minute; `None` until the samples span
    /// [`MIN_SLOPE_SPAN`].
    pub fn growth_per_minute(&self) -> Option<f64> {
        let first = self.samples.front()?;
        let last = self.samples.back()?;
        if last.at.saturating_sub(first.at) < MIN_SLOPE_SPAN {
            return None;
        }
        // Fit on times relative to the first sample, in minutes, to keep the sums small.
        let points: Vec<(f64, f64)> = self
            .samples
            .iter()
            .map(|s| {
                (
                    (s.at - first.at).as_secs_f64() / 60.0,
                    // RSS fits an f64 exactly below 2^53 bytes (8 PiB).
                    s.rss_bytes as f64,
                )
            })
            .collect();
        let count = points.len() as f64;
        let mean_t = points.iter().map(|(t, _)| t).sum::<f64>() / count;
        let mean_rss = points.iter().map(|(_, rss)| rss).sum::<f64>() / count;
        let (covariance, variance) =
            points
                .iter()
                .fold((0.0, 0.0), |(covariance, variance), (t, rss)| {
                    let dt = t - mean_t;
                    (covariance + dt * (rss - mean_rss), variance + dt * dt)
                });
        (variance > 0.0).then(|| covariance / variance)
    }
}

/// The thresholds of `[watchdog]`, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `rss_growth_limit`: bytes per minute.
    pub growth_per_minute: u64,
    /// `rss_limit`: bytes, if set.
    pub rss: Option<u64>,
    /// `cooldown`: least time between two diagnostics.
    pub cooldown: Duration,
}

impl Limits {
    /// The limits configured in `[watchdog]`.
    pub fn from_config(config: &WatchdogConfig) -> Self {
        Self {
            growth_per_minute: config.rss_growth_limit.0,
            rss: config.rss_limit.map(|limit| limit.0),
            cooldown: config.cooldown.0,
        }
    }
}

/// A limit the process is over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Breach {
    /// RSS grows faster than `rss_growth_limit`.
    Growth {
        /// Fitted growth, bytes per minute.
        bytes_per_minute: f64,
        /// The configured limit, bytes per minute.
        limit: u64,
    },
    /// RSS is above 90 % of `rss_limit`.
    NearLimit {
        /// Current RSS in bytes.
        rss_bytes: i64,
        /// The configured limit in bytes.
        limit: u64,
    },
}

impl std::fmt::Display for Breach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Self::Growth {
                bytes_per_minute,
                limit,
            } => write!(
                f,
                "RSS grows {:.1} MiB/min, above rss_growth_limit {:.1} MiB/min",
                bytes_per_minute / MIB,
                limit as f64 / MIB
            ),
            Self::NearLimit { rss_bytes, limit } => write!(
                f,
                "RSS {:.1} MiB is above 90% of rss_limit {:.1} MiB",
                rss_bytes as f64 / MIB,
                limit as f64 / MIB
            ),
        }
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// What the watchdog does after a sample.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Every limit holds.
    Healthy,
    /// Over a limit, but a diagnostic was written less than `cooldown` ago.
    CoolingDown(Vec<Breach>),
    /// Over a limit: warn and write a diagnostic.
    Alert(Vec<Breach>),
}

/// Decides from the newest RSS, the fitted growth and when the last alert was (all times
/// since the watchdog started).
pub fn assess(
    limits: &Limits,
    rss_bytes: i64,
    growth_per_minute: Option<f64>,
    last_alert: Option<Duration>,
    now: Duration,
) -> Decision {
    let mut breaches = Vec::new();
    if let Some(bytes_per_minute) = growth_per_minute {
        if bytes_per_minute > limits.growth_per_minute as f64 {
            breaches.push(Breach::Growth {
                bytes_per_minute,
                limit: limits.growth_per_minute,
            });
        }
    }
    if let Some(limit) = limits.rss {
        let rss = u128::try_from(rss_bytes).unwrap_or(0);
        if rss * 1000 > u128::from(limit) * NEAR_LIMIT_PER_MILLE {
            breaches.push(Breach::NearLimit { rss_bytes, limit });
        }
    }
    if breaches.is_empty() {
        Decision::Healthy
    } else if last_alert.is_some_and(|last| now.saturating_sub(last) < limits.cooldown) {
        Decision::CoolingDown(breaches)
    } else {
        Decision::Alert(breaches)
    }
}

/// The watchdog task's inputs.
pub struct Watchdog {
    interval: Duration,
    limits: Limits,
    metrics: Arc<Metrics>,
    /// `(events, bytes)` gauges of every sink buffer, read at each sample.
    buffers: Vec<(Gauge, Gauge)>,
    profiles_dir: PathBuf,
    profiler: Arc<CpuProfiler>,
}

impl Watchdog {
    /// A watchdog over the buffers of `sinks`, writing diagnostics under
    /// `<data_dir>/profiles/`.
    pub fn new<'a>(
        config: &WatchdogConfig,
        metrics: Arc<Metrics>,
        sinks: impl IntoIterator<Item = &'a str>,
        data_dir: &Path,
        profiler: Arc<CpuProfiler>,
    ) -> Self {
        let buffers = sinks
            .into_iter()
            .map(|sink| {
                let label = Metrics::sink(sink);
                (
                    metrics.buffer_events.get_or_create(&label).clone(),
                    metrics.buffer_bytes.get_or_create(&label).clone(),
                )
            })
            .collect();
        Self {
            interval: config.interval.0,
            limits: Limits::from_config(config),
            metrics,
            buffers,
            profiles_dir: data_dir.join("profiles"),
            profiler,
        }
    }

    /// Samples every interval until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let started = Instant::now();
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut window = RssWindow::default();
        let mut last_alert = None;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let now = started.elapsed();
            let Some(sample) = self.sample(now) else {
                // No /proc: nothing to watch on this system.
                tracing::debug!("watchdog stops: process statistics are unavailable");
                return;
            };
            window.push(sample);
            let growth = window.growth_per_minute();
            self.metrics
                .tasks
                .set(i64::try_from(sample.tasks).unwrap_or(i64::MAX));
            // Whole bytes are precise enough, and a saturating float cast cannot fail.
            #[allow(clippy::cast_possible_truncation)]
            self.metrics
                .watchdog_rss_growth
                .set(growth.unwrap_or(0.0) as i64);
            match assess(&self.limits, sample.rss_bytes, growth, last_alert, now) {
                Decision::Healthy => {}
                Decision::CoolingDown(breaches) => {
                    let breaches: Vec<String> = breaches.iter().map(ToString::to_string).collect();
                    tracing::debug!(breaches = %breaches.join("; "), "watchdog limit still exceeded; in cooldown");
                }
                Decision::Alert(breaches) => {
                    last_alert = Some(now);
                    self.alert(&breaches, &sample, growth, &window, &stop).await;
                }
            }
        }
    }

    fn sample(&self, at: Duration) -> Option<Sample> {
        let stats = ProcessStats::read()?;
        let (buffered_events, buffered_bytes) =
            self.buffers
                .iter()
                .fold((0i64, 0i64), |(events, bytes), (e, b)| {
                    (
                        events.saturating_add(e.get()),
                        bytes.saturating_add(b.get()),
                    )
                });
        Some(Sample {
            at,
            rss_bytes: stats.resident_bytes,
            open_fds: stats.open_fds,
            tasks: tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks(),
            buffered_events,
            buffered_bytes,
        })
    }

    async fn alert(
        &self,
        breaches: &[Breach],
        sample: &Sample,
        growth: Option<f64>,
        window: &RssWindow,
        stop: &CancellationToken,
    ) {
        let reasons = breaches
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        let stamp = file_stamp(SystemTime::now());
        let report = diagnostic_report(
            &stamp,
            &reasons,
            &self.limits,
            growth,
            window,
            &self.metrics.encode(),
        );
        let written = write_new(&self.profiles_dir, &stamp, "txt", report.as_bytes()).await;
        tracing::warn!(
            rss_bytes = sample.rss_bytes,
            rss_growth_bytes_per_minute = growth.unwrap_or(0.0),
            open_fds = sample.open_fds,
            tasks = sample.tasks,
            buffered_events = sample.buffered_events,
            buffered_bytes = sample.buffered_bytes,
            profile = %written.as_ref().map_or_else(|err| format!("not written: {err}"), |path| path.display().to_string()),
            "watchdog: {reasons}"
        );
        if CpuProfiler::is_built() {
            self.write_cpu_profile(&stamp, stop).await;
        }
        prune(&self.profiles_dir, MAX_PROFILE_FILES).await;
    }

    async fn write_cpu_profile(&self, stamp: &str, stop: &CancellationToken) {
        let format = ProfileFormat::Flamegraph;
        let captured = tokio::select! {
            () = stop.cancelled() => return,
            captured = self.profiler.capture(DIAGNOSTIC_CPU_PROFILE, format) => captured,
        };
        match captured {
            Ok(svg) => match write_new(&self.profiles_dir, stamp, format.extension(), &svg).await {
                Ok(path) => tracing::info!(path = %path.display(), "watchdog CPU profile written"),
                Err(err) => tracing::warn!(error = %err, "watchdog CPU profile not written"),
            },
            Err(err) => tracing::warn!(error = %err, "watchdog CPU profile not taken"),
        }
    }
}

/// A diagnostic file that could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}")]
pub struct WriteError {
    /// The file (or directory) that failed.
    pub path: PathBuf,
    /// The I/O error.
    #[source]
    pub source: std::io::Error,
}

/// The diagnostic text: why, the limits, the task count, the sample history and metrics.
fn diagnostic_report(
    stamp: &str,
    reasons: &str,
    limits: &Limits,
    growth: Option<f64>,
    window: &RssWindow,
    metrics_text: &str,
) -> String {
    let mut text = String::with_capacity(4096 + metrics_text.len());
    let written = write_report(
        &mut text,
        stamp,
        reasons,
        limits,
        growth,
        window,
        metrics_text,
    );
    // Writing into a String cannot fail; an error here would be a bug in a Display impl.
    if let Err(err) = written {
        tracing::error!(error = %err, "formatting the watchdog diagnostic failed");
    }
    text
}

fn write_report(
    text: &mut String,
    stamp: &str,
    reasons: &str,
    limits: &Limits,
    growth: Option<f64>,
    window: &RssWindow,
    metrics_text: &str,
) -> std::fmt::Result {
    writeln!(text, "# fieldgate watchdog diagnostic {stamp}")?;
    writeln!(text, "reason: {reasons}")?;
    writeln!(
        text,
        "limits: rss_growth_limit={}B/min rss_limit={} cooldown={}",
        limits.growth_per_minute,
        limits
            .rss
            .map_or_else(|| "none".to_owned(), |limit| format!("{limit}B")),
        humantime::format_duration(limits.cooldown)
    )?;
    writeln!(
        text,
        "rss_growth_bytes_per_minute: {}",
        growth.map_or_else(|| "unknown".to_owned(), |g| format!("{g:.0}"))
    )?;
    if let Some(latest) = window.samples().last() {
        writeln!(text, "tasks: {}", latest.tasks)?;
    }
    writeln!(
        text,
        "\n## samples (oldest first)\nseconds_since_start rss_bytes open_fds tasks buffered_events buffered_bytes"
    )?;
    for sample in window.samples() {
        writeln!(
            text,
            "{:.1} {} {} {} {} {}",
            sample.at.as_secs_f64(),
            sample.rss_bytes,
            sample.open_fds,
            sample.tasks,
            sample.buffered_events,
            sample.buffered_bytes
        )?;
    }
    writeln!(text, "\n## metrics\n{metrics_text}")
}

/// `2026-11-26T08:37:31Z` as `20261126T083731Z`: sortable, and no `:` in file names.
fn file_stamp(now: SystemTime) -> String {
    humantime::format_rfc3339_seconds(now)
        .to_string()
        .replace(['-', ':'], "")
}

/// Writes `watchdog-<stamp>.<extension>` (or `-2`, `-3`, … if taken) under `dir`.
async fn write_new(
    dir: &Path,
    stamp: &str,
    extension: &str,
    contents: &[u8],
) -> Result<PathBuf, WriteError> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|source| WriteError {
            path: dir.to_owned(),
            source,
        })?;
    let mut attempt = 1;
    loop {
        let name = if attempt == 1 {
            format!("{PROFILE_PREFIX}{stamp}.{extension}")
        } else {
            format!("{PROFILE_PREFIX}{stamp}-{attempt}.{extension}")
        };
        let path = dir.join(name);
        let created = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await;
        match created {
            Ok(mut file) => {
                use tokio::io::AsyncWriteExt as _;
                let written = async {
                    file.write_all(contents).await?;
                    file.flush().await
                }
                .await;
                return written
                    .map(|()| path.clone())
                    .map_err(|source| WriteError { path, source });
            }
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => {
                attempt += 1;
            }
            Err(source) => return Err(WriteError { path, source }),
        }
    }
}

/// Deletes the oldest watchdog files in `dir` beyond `keep`; names sort by time.
async fn prune(dir: &Path, keep: usize) {
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
        return;
    };
    let mut names = Vec::new();
    while let Ok(Some(entry)) = entries.next_entry().await {
        if let Some(name) = entry.file_name().to_str() {
            if name.starts_with(PROFILE_PREFIX) {
                names.push(name.to_owned());
            }
        }
    }
    names.sort();
    let excess = names.len().saturating_sub(keep);
    for name in names.into_iter().take(excess) {
        let path = dir.join(&name);
        if let Err(err) = tokio::fs::remove_file(&path).await {
            tracing::warn!(path = %path.display(), error = %err, "cannot delete an old watchdog profile");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB_BYTES: i64 = 1024 * 1024;

    fn sample(seconds: u64, rss_bytes: i64) -> Sample {
        Sample {
            at: Duration::from_secs(seconds),
            rss_bytes,
            open_fds: 10,
            tasks: 5,
            buffered_events: 0,
            buffered_bytes: 0,
        }
    }

    fn window_of(samples: impl IntoIterator<Item = Sample>) -> RssWindow {
        let mut window = RssWindow::default();
        for s in samples {
            window.push(s);
        }
        window
    }

    fn limits() -> Limits {
        Limits {
            growth_per_minute: 50 * 1024 * 1024,
            rss: None,
            cooldown: Duration::from_secs(600),
        }
    }

    #[test]
    fn slope_of_steady_growth() {
        // 1 MiB every 10 s is 6 MiB per minute.
        let window =
            window_of((0..=6).map(|i| sample(i * 10, 100 * MIB_BYTES + i as i64 * MIB_BYTES)));
        let slope = window.growth_per_minute().unwrap();
        assert!((slope - 6.0 * MIB).abs() < 1.0, "{slope}");
    }

    #[test]
    fn slope_of_flat_and_shrinking_memory() {
        let flat = window_of((0..=6).map(|i| sample(i * 10, 80 * MIB_BYTES)));
        assert_eq!(flat.growth_per_minute(), Some(0.0));
        let shrinking =
            window_of((0..=6).map(|i| sample(i * 10, 80 * MIB_BYTES - i as i64 * MIB_BYTES)));
        assert!(shrinking.growth_per_minute().unwrap() < 0.0);
    }

    #[test]
    fn slope_ignores_noise_better_than_the_endpoints() {
        // Flat memory with one spike in the last sample: the fit moves far less than the
        // 60 MiB/min that the first and last samples alone would suggest.
        let mut samples: Vec<Sample> = (0..=6).map(|i| sample(i * 10, 100 * MIB_BYTES)).collect();
        samples[6].rss_bytes += 60 * MIB_BYTES;
        let slope = window_of(samples).growth_per_minute().unwrap();
        assert!(slope > 0.0 && slope < 40.0 * MIB, "{slope}");
    }

    #[test]
    fn no_slope_until_the_samples_span_half_a_minute() {
        assert_eq!(RssWindow::default().growth_per_minute(), None);
        let young = window_of([
            sample(0, 0),
            sample(10, MIB_BYTES),
            sample(20, 2 * MIB_BYTES),
        ]);
        assert_eq!(young.growth_per_minute(), None);
        let grown = window_of([sample(0, 0), sample(30, MIB_BYTES)]);
        assert!(grown.growth_per_minute().is_some());
    }

    #[test]
    fn window_keeps_the_last_minute_only() {
        // A burst long ago leaves the window: growth then flat for two minutes.
        let mut samples: Vec<Sample> = (0..=6)
            .map(|i| sample(i * 10, i as i64 * 100 * MIB_BYTES))
            .collect();
        samples.extend((7..=18).map(|i| sample(i * 10, 600 * MIB_BYTES)));
        let window = window_of(samples);
        let held: Vec<Duration> = window.samples().map(|s| s.at).collect();
        assert_eq!(held.first(), Some(&Duration::from_secs(120)));
        assert_eq!(held.last(), Some(&Duration::from_secs(180)));
        assert_eq!(window.growth_per_minute(), Some(0.0));
    }

    #[test]
    fn window_with_a_long_interval_keeps_two_samples() {
        let window = window_of([
            sample(0, 0),
            sample(300, 50 * MIB_BYTES),
            sample(600, 100 * MIB_BYTES),
        ]);
        assert_eq!(window.samples().len(), 2);
        let slope = window.growth_per_minute().unwrap();
        assert!((slope - 10.0 * MIB).abs() < 1.0, "{slope}");
    }

    #[test]
    fn window_is_bounded_whatever_the_interval() {
        let window = window_of((0..5000).map(|i| Sample {
            at: Duration::from_millis(i),
            ..sample(0, 0)
        }));
        assert_eq!(window.samples().len(), MAX_SAMPLES);
    }

    #[test]
    fn growth_above_the_limit_alerts() {
        let now = Duration::from_secs(60);
        assert_eq!(
            assess(&limits(), 0, Some(10.0 * MIB), None, now),
            Decision::Healthy
        );
        assert_eq!(assess(&limits(), 0, None, None, now), Decision::Healthy);
        assert_eq!(
            assess(&limits(), 0, Some(50.0 * MIB), None, now),
            Decision::Healthy,
            "exactly at the limit is allowed"
        );
        let Decision::Alert(breaches) = assess(&limits(), 0, Some(51.0 * MIB), None, now) else {
            panic!("expected an alert")
        };
        assert!(
            matches!(breaches[..], [Breach::Growth { limit, .. }] if limit == 50 * 1024 * 1024)
        );
        assert!(
            breaches[0].to_string().contains("51.0 MiB/min"),
            "{}",
            breaches[0]
        );
    }

    #[test]
    fn nearing_the_rss_limit_alerts() {
        let limits = Limits {
            rss: Some(100 * 1024 * 1024),
            ..limits()
        };
        let now = Duration::from_secs(60);
        assert_eq!(
            assess(&limits, 90 * MIB_BYTES, None, None, now),
            Decision::Healthy
        );
        let Decision::Alert(breaches) = assess(&limits, 91 * MIB_BYTES, None, None, now) else {
            panic!("expected an alert")
        };
        assert!(matches!(breaches[..], [Breach::NearLimit { .. }]));
        // Both at once are both reported.
        let Decision::Alert(breaches) =
            assess(&limits, 95 * MIB_BYTES, Some(60.0 * MIB), None, now)
        else {
            panic!("expected an alert")
        };
        assert_eq!(breaches.len(), 2);
    }

    #[test]
    fn cooldown_holds_back_repeated_alerts() {
        let fast = Some(100.0 * MIB);
        let last = Some(Duration::from_secs(100));
        assert!(matches!(
            assess(&limits(), 0, fast, last, Duration::from_secs(100 + 599)),
            Decision::CoolingDown(_)
        ));
        assert!(matches!(
            assess(&limits(), 0, fast, last, Duration::from_secs(100 + 600)),
            Decision::Alert(_)
        ));
        assert_eq!(
            assess(&limits(), 0, Some(0.0), last, Duration::from_secs(101)),
            Decision::Healthy
        );
    }

    #[test]
    fn report_holds_reason_tasks_history_and_metrics() {
        let window = window_of([sample(0, MIB_BYTES), sample(10, 2 * MIB_BYTES)]);
        let text = diagnostic_report(
            "20260101T000000Z",
            "RSS grows",
            &limits(),
            Some(6.0 * MIB),
            &window,
            "fieldgate_tasks 5\n",
        );
        for needle in [
            "reason: RSS grows",
            "tasks: 5",
            "10.0 2097152 10 5 0 0",
            "fieldgate_tasks 5",
            "rss_limit=none",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    #[test]
    fn stamps_sort_and_avoid_colons() {
        let stamp = file_stamp(SystemTime::UNIX_EPOCH + Duration::from_secs(86_400 + 3661));
        assert_eq!(stamp, "19700102T010101Z");
    }

    #[tokio::test]
    async fn files_are_never_overwritten_and_old_ones_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let profiles = dir.path().join("profiles");
        let first = write_new(&profiles, "20260101T000000Z", "txt", b"one")
            .await
            .unwrap();
        let second = write_new(&profiles, "20260101T000000Z", "txt", b"two")
            .await
            .unwrap();
        assert_ne!(first, second);
        assert_eq!(std::fs::read(&first).unwrap(), b"one");
        for stamp in ["20260101T000001Z", "20260101T000002Z"] {
            write_new(&profiles, stamp, "txt", b"x").await.unwrap();
        }
        std::fs::write(profiles.join("keep-me.txt"), b"not ours").unwrap();
        prune(&profiles, 2).await;
        let mut left: Vec<String> = std::fs::read_dir(&profiles)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "keep-me.txt",
                "watchdog-20260101T000001Z.txt",
                "watchdog-20260101T000002Z.txt"
            ]
        );
    }

    #[tokio::test]
    async fn an_alerting_watchdog_writes_a_profile_and_sets_gauges() {
        // With the `profiling` feature the alert also takes a CPU profile.
        let _sampler = super::super::profiling::TEST_SAMPLER.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        // rss_limit of 1 byte: any real RSS is near it, so the first sample alerts.
        let config: WatchdogConfig = toml::from_str("rss_limit = \"1B\"").unwrap();
        let profiler = Arc::new(CpuProfiler::new(CancellationToken::new()));
        let watchdog = Watchdog::new(
            &config,
            Arc::clone(&metrics),
            ["cloud"],
            dir.path(),
            profiler,
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(watchdog.run(stop.clone()));
        let profiles = dir.path().join("profiles");
        let deadline = Instant::now() + Duration::from_secs(30);
        let report = loop {
            let found = std::fs::read_dir(&profiles)
                .into_iter()
                .flatten()
                .flatten()
                .find(|e| e.file_name().to_string_lossy().ends_with(".txt"));
            if let Some(entry) = found {
                let text = std::fs::read_to_string(entry.path()).unwrap();
                if text.contains("## metrics") {
                    break text;
                }
            }
            assert!(Instant::now() < deadline, "no diagnostic profile written");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        stop.cancel();
        task.await.unwrap();
        assert!(report.contains("above 90% of rss_limit"), "{report}");
        assert!(report.contains("## samples"), "{report}");
        assert!(metrics.encode().contains("fieldgate_tasks "));
        assert!(metrics.tasks.get() >= 1);
    }
}
