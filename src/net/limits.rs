//! Gateway-wide limits every listener shares: the bytes device connections may hold in
//! unfinished frames, and the file descriptors kept free under `RLIMIT_NOFILE`.
//!
//! Invariants: a connection's share of the frame budget is released when it ends (the
//! holder calls [`PartialFrameBudget::release`] from its close path); the FD check never
//! blocks on anything but a read of `/proc`; without `/proc` it allows everything, and when
//! `/proc` cannot be read for lack of descriptors it counts the table as full.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Bytes all device connections together may hold in partial frames.
#[derive(Debug)]
pub struct PartialFrameBudget {
    limit: usize,
    used: AtomicUsize,
}

impl PartialFrameBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    /// Moves a connection's share from `*held` to `wanted` bytes; false (and `*held`
    /// unchanged) when growing would exceed the budget.
    pub fn resize(&self, held: &mut usize, wanted: usize) -> bool {
        if wanted <= *held {
            self.used.fetch_sub(*held - wanted, Ordering::AcqRel);
            *held = wanted;
            return true;
        }
        let grow = wanted - *held;
        let grown = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(grow).filter(|total| *total <= self.limit)
            });
        if grown.is_ok() {
            *held = wanted;
        }
        grown.is_ok()
    }

    /// Gives a connection's whole share back.
    pub fn release(&self, held: &mut usize) {
        self.resize(held, 0);
    }

    /// Bytes held by every connection now.
    #[cfg(test)]
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// How often the open FD count is taken again while far from the limit.
const RESAMPLE_FAR: Duration = Duration::from_millis(100);
/// How often it may be taken again near the limit (a flood must not turn into a
/// directory scan per refused connection).
const RESAMPLE_NEAR: Duration = Duration::from_millis(5);

/// Which listener asks: the API gives way first, devices keep a smaller margin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdUser {
    /// The HTTP API: needs `reserve` descriptors left.
    Api,
    /// A device listener: needs a quarter of `reserve` left, the rest stays for buffers,
    /// the registry and the sinks.
    Device,
}

#[derive(Debug)]
struct FdSample {
    open: usize,
    limit: Option<usize>,
    /// Descriptors handed out since `open` was counted.
    since: usize,
    at: Option<Instant>,
}

/// Keeps file descriptors free: listeners ask before serving a new connection.
#[derive(Debug)]
pub struct FdReserve {
    reserve: usize,
    sample: Mutex<FdSample>,
}

impl FdReserve {
    /// Keeps `reserve` descriptors free of API connections (a quarter of it free of
    /// device connections).
    pub fn new(reserve: usize) -> Self {
        Self {
            reserve,
            sample: Mutex::new(FdSample {
                open: 0,
                limit: None,
                since: 0,
                at: None,
            }),
        }
    }

    /// Whether `user` may keep one more connection open. Counts it when allowed.
    pub fn admit(&self, user: FdUser) -> bool {
        let margin = match user {
            FdUser::Api => self.reserve,
            FdUser::Device => self.reserve / 4,
        };
        let mut sample = self
            .sample
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let near = |sample: &FdSample| {
            sample
                .limit
                .is_some_and(|limit| sample.open + sample.since + margin + 1 > limit)
        };
        let stale = match sample.at {
            None => true,
            Some(at) => {
                let age = now.duration_since(at);
                age >= RESAMPLE_FAR || (near(&sample) && age >= RESAMPLE_NEAR)
            }
        };
        if stale {
            // Both reads need a descriptor: when they fail at the limit, keep the limit
            // known and count the table as full rather than empty.
            sample.limit = open_files_limit().or(sample.limit);
            sample.open = match (count_open_fds(), sample.limit) {
                (Some(open), _) => open,
                (None, Some(limit)) => limit,
                (None, None) => 0,
            };
            sample.since = 0;
            sample.at = Some(now);
        }
        let allowed = fits(sample.open + sample.since, sample.limit, margin);
        if allowed {
            sample.since += 1;
        }
        allowed
    }
}

/// Whether one more descriptor leaves at least `margin` free under `limit`.
fn fits(open: usize, limit: Option<usize>, margin: usize) -> bool {
    limit.is_none_or(|limit| open + 1 + margin <= limit)
}

/// Open descriptors of this process (entries of `/proc/self/fd`).
fn count_open_fds() -> Option<usize> {
    std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|entries| entries.count())
}

/// The soft `RLIMIT_NOFILE`, read from `/proc/self/limits`; none when unlimited or
/// unreadable.
fn open_files_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_open_files_limit(&text)
}

/// The soft limit on the `Max open files` line of a `/proc/PID/limits` text.
fn parse_open_files_limit(text: &str) -> Option<usize> {
    let line = text
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    soft.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_grows_to_its_limit_and_shrinks() {
        let budget = PartialFrameBudget::new(100);
        let (mut a, mut b) = (0, 0);
        assert!(budget.resize(&mut a, 60));
        assert!(!budget.resize(&mut b, 50));
        assert_eq!(b, 0);
        assert!(budget.resize(&mut b, 40));
        assert_eq!(budget.used(), 100);
        assert!(budget.resize(&mut a, 10));
        assert!(budget.resize(&mut b, 90));
        budget.release(&mut a);
        budget.release(&mut b);
        assert_eq!((a, b, budget.used()), (0, 0, 0));
    }

    #[test]
    fn limits_line_is_parsed() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max processes             63392                63392                processes \n\
                    Max open files            300                  4096                 files     \n";
        assert_eq!(parse_open_files_limit(text), Some(300));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_open_files_limit(unlimited), None);
        assert_eq!(parse_open_files_limit(""), None);
    }

    #[test]
    fn margin_is_kept() {
        assert!(fits(10, Some(100), 89));
        assert!(!fits(10, Some(100), 90));
        assert!(fits(1_000_000, None, 128));
    }

    #[test]
    fn this_process_is_measured() {
        assert!(count_open_fds().is_some_and(|open| open >= 3));
        let reserve = FdReserve::new(16);
        assert!(reserve.admit(FdUser::Api));
        let huge = FdReserve::new(usize::MAX / 4);
        assert_eq!(open_files_limit().is_some(), !huge.admit(FdUser::Api));
    }
}
