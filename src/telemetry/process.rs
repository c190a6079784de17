//! Process statistics read from `/proc` at scrape time: RSS, CPU seconds, open FDs.
//!
//! On systems without `/proc` the metrics are simply absent.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Linux reports CPU time in clock ticks; 100 per second on every mainstream architecture.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;
/// Page size used by `/proc/self/statm`.
const PAGE_SIZE: i64 = 4096;

/// Encodes `process_*` metrics on each scrape.
#[derive(Debug)]
pub struct ProcessCollector;

/// A snapshot of the process's resource use.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    /// Resident set size in bytes.
    pub resident_bytes: i64,
    /// User plus system CPU time in seconds.
    pub cpu_seconds: f64,
    /// Open file descriptors.
    pub open_fds: i64,
}

impl ProcessStats {
    /// Reads the current process's statistics; `None` where `/proc` is missing.
    pub fn read() -> Option<Self> {
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let resident_pages: i64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which is in parentheses and may contain spaces.
        let after_name = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat; index 11 and 12 after the name.
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count();
        Some(Self {
            resident_bytes: resident_pages * PAGE_SIZE,
            cpu_seconds: (utime + stime) / CLOCK_TICKS_PER_SECOND,
            open_fds: i64::try_from(open_fds).unwrap_or(i64::MAX),
        })
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(stats) = ProcessStats::read() else {
            return Ok(());
        };
        let rss = ConstGauge::new(stats.resident_bytes);
        rss.encode(encoder.encode_descriptor(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            None,
            rss.metric_type(),
        )?)?;
        let cpu = ConstCounter::new(stats.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time in seconds",
            None,
            cpu.metric_type(),
        )?)?;
        let fds = ConstGauge::new(stats.open_fds);
        fds.encode(encoder.encode_descriptor(
            "process_open_fds",
            "Open file descriptors",
            None,
            fds.metric_type(),
        )?)?;
        Ok(())
    }
}
