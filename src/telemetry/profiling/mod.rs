//! CPU profiles of the running gateway, taken one at a time.
//!
//! The sampler (pprof-rs, a `SIGPROF` timer) is process-wide, so a second profile while one
//! runs is refused with [`ProfileError::Busy`] rather than queued. Without the `profiling`
//! cargo feature every capture answers [`ProfileError::NotBuilt`]. A heap profile is never
//! available: the gateway runs on the system allocator, which records no allocation sites.
//! A capture ends early, as [`ProfileError::Cancelled`], when the gateway shuts down.

pub mod http;

#[cfg(feature = "profiling")]
mod pprof_backend;
#[cfg(not(feature = "profiling"))]
mod unavailable;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

#[cfg(feature = "profiling")]
use pprof_backend as backend;
#[cfg(not(feature = "profiling"))]
use unavailable as backend;

/// The longest CPU profile one request may take.
pub const MAX_PROFILE_DURATION: Duration = Duration::from_secs(60);

/// How a finished CPU profile is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfileFormat {
    /// An interactive flamegraph, `image/svg+xml`.
    Flamegraph,
    /// The gzip-free pprof protobuf, for `go tool pprof`.
    Pprof,
}

impl ProfileFormat {
    /// The `format` query value that selects this encoding, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Flamegraph => "flamegraph",
            Self::Pprof => "pprof",
        }
    }

    /// The HTTP `Content-Type` of this encoding.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Flamegraph => "image/svg+xml",
            Self::Pprof => "application/octet-stream",
        }
    }

    /// The file name extension of this encoding.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Flamegraph => "svg",
            Self::Pprof => "pb",
        }
    }
}

/// Why no CPU profile was produced.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The binary was built without the `profiling` cargo feature.
    #[error(
        "CPU profiling is not available: this build lacks the `profiling` feature (rebuild with `cargo build --features profiling`)"
    )]
    NotBuilt,
    /// Another CPU profile is being taken.
    #[error("the CPU profiler is busy with another profile; retry when it ends")]
    Busy,
    /// The gateway began shutting down during the capture.
    // Only the pprof backend can be interrupted; without it these are never built.
    #[cfg_attr(not(feature = "profiling"), allow(dead_code))]
    #[error("the CPU profile was cut short by shutdown")]
    Cancelled,
    /// pprof failed at `stage` (starting, reporting, encoding).
    #[cfg_attr(not(feature = "profiling"), allow(dead_code))]
    #[error("the CPU profiler failed while {stage}")]
    Failed {
        /// What the profiler was doing.
        stage: &'static str,
        /// pprof's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Set while a capture runs. Process-wide, like the `SIGPROF` sampler it guards.
static BUSY: AtomicBool = AtomicBool::new(false);

/// Tests that capture (or claim the sampler) hold this, so parallel tests do not see Busy.
#[cfg(test)]
pub(crate) static TEST_SAMPLER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The gateway's CPU profiler, shared by the admin API and the watchdog.
#[derive(Debug)]
pub struct CpuProfiler {
    shutdown: CancellationToken,
}

/// Holds the busy flag; clears it when dropped, even if the capture panics.
struct Claim(&'static AtomicBool);

impl Drop for Claim {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl CpuProfiler {
    /// A profiler whose captures end when `shutdown` is cancelled.
    pub fn new(shutdown: CancellationToken) -> Self {
        Self { shutdown }
    }

    /// Whether this build can take CPU profiles at all.
    pub fn is_built() -> bool {
        cfg!(feature = "profiling")
    }

    /// Samples the whole process's CPU use for `duration` (capped at
    /// [`MAX_PROFILE_DURATION`]) and encodes it as `format`.
    pub async fn capture(
        &self,
        duration: Duration,
        format: ProfileFormat,
    ) -> Result<Vec<u8>, ProfileError> {
        if !Self::is_built() {
            return Err(ProfileError::NotBuilt);
        }
        let _claim = self.claim()?;
        backend::capture(duration.min(MAX_PROFILE_DURATION), format, &self.shutdown).await
    }

    fn claim(&self) -> Result<Claim, ProfileError> {
        if BUSY.swap(true, Ordering::AcqRel) {
            return Err(ProfileError::Busy);
        }
        Ok(Claim(&BUSY))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_capture_at_a_time_across_profilers() {
        let _sampler = TEST_SAMPLER.lock().await;
        let profiler = CpuProfiler::new(CancellationToken::new());
        let other = CpuProfiler::new(CancellationToken::new());
        let first = profiler.claim().unwrap();
        assert!(matches!(other.claim(), Err(ProfileError::Busy)));
        assert!(matches!(
            profiler
                .capture(Duration::from_secs(1), ProfileFormat::Pprof)
                .await,
            Err(ProfileError::Busy | ProfileError::NotBuilt)
        ));
        drop(first);
        assert!(other.claim().is_ok());
    }

    #[cfg(not(feature = "profiling"))]
    #[tokio::test]
    async fn without_the_feature_nothing_is_captured() {
        let profiler = CpuProfiler::new(CancellationToken::new());
        let err = profiler
            .capture(Duration::from_secs(1), ProfileFormat::Flamegraph)
            .await
            .unwrap_err();
        assert!(matches!(err, ProfileError::NotBuilt));
        assert!(err.to_string().contains("`profiling` feature"), "{err}");
    }

    #[cfg(feature = "profiling")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn captures_a_flamegraph_and_a_pprof_profile() {
        let _sampler = TEST_SAMPLER.lock().await;
        let profiler = CpuProfiler::new(CancellationToken::new());
        // Keep one thread busy so the sampler has something to see.
        let burn_until = tokio::time::Instant::now() + Duration::from_millis(800);
        let burner = tokio::task::spawn_blocking(move || {
            let mut spins = 0u64;
            while tokio::time::Instant::now() < burn_until {
                spins = std::hint::black_box(spins.wrapping_add(1));
            }
            spins
        });
        let svg = profiler
            .capture(Duration::from_millis(300), ProfileFormat::Flamegraph)
            .await
            .unwrap();
        let svg = String::from_utf8_lossy(&svg);
        assert!(
            svg.contains("<svg") && svg.contains("fieldgate CPU"),
            "{svg}"
        );
        let pprof = profiler
            .capture(Duration::from_millis(300), ProfileFormat::Pprof)
            .await
            .unwrap();
        assert!(!pprof.is_empty());
        assert!(burner.await.unwrap() > 0);
    }

    #[cfg(feature = "profiling")]
    #[tokio::test]
    async fn an_idle_process_still_gets_an_image() {
        let _sampler = TEST_SAMPLER.lock().await;
        let profiler = CpuProfiler::new(CancellationToken::new());
        let svg = profiler
            .capture(Duration::from_millis(50), ProfileFormat::Flamegraph)
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&svg).contains("<svg"));
    }

    #[cfg(feature = "profiling")]
    #[tokio::test]
    async fn shutdown_cuts_a_capture_short() {
        let _sampler = TEST_SAMPLER.lock().await;
        let shutdown = CancellationToken::new();
        let profiler = CpuProfiler::new(shutdown.clone());
        shutdown.cancel();
        let err = profiler
            .capture(Duration::from_secs(60), ProfileFormat::Flamegraph)
            .await
            .unwrap_err();
        assert!(matches!(err, ProfileError::Cancelled), "{err}");
        assert!(profiler.claim().is_ok(), "the busy flag must be released");
    }
}
