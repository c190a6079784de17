//! The `profiling` feature's CPU sampler: pprof-rs at 99 Hz, symbolised off the runtime.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{ProfileError, ProfileFormat};

/// Samples per second; 99 rather than 100 so sampling does not beat with periodic work.
const FREQUENCY: i32 = 99;
/// Frames from these libraries are the signal handler's and the unwinder's, not ours.
const BLOCKLIST: [&str; 4] = ["libc", "libgcc", "pthread", "vdso"];

fn failed(stage: &'static str) -> impl FnOnce(pprof::Error) -> ProfileError {
    move |err| ProfileError::Failed {
        stage,
        source: Box::new(err),
    }
}

/// Samples for `duration`, then builds and encodes the report on a blocking thread.
pub(super) async fn capture(
    duration: Duration,
    format: ProfileFormat,
    shutdown: &CancellationToken,
) -> Result<Vec<u8>, ProfileError> {
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(FREQUENCY)
        .blocklist(&BLOCKLIST)
        .build()
        .map_err(failed("starting"))?;
    tokio::select! {
        () = tokio::time::sleep(duration) => {}
        () = shutdown.cancelled() => return Err(ProfileError::Cancelled),
    }
    // Symbolising every sampled frame takes from milliseconds to seconds: keep it off the
    // async workers. The guard moves along and stops sampling when the report is built.
    let encoded = tokio::task::spawn_blocking(move || {
        let report = guard.report().build().map_err(failed("reporting"))?;
        drop(guard);
        let mut out = Vec::new();
        match format {
            // pprof draws nothing for an idle process; say so rather than send no image.
            ProfileFormat::Flamegraph if report.data.is_empty() => {
                out = idle_svg(duration).into_bytes();
            }
            ProfileFormat::Flamegraph => {
                let mut options = pprof::flamegraph::Options::default();
                options.title = format!("fieldgate CPU, {} s", duration.as_secs_f64());
                report
                    .flamegraph_with_options(&mut out, &mut options)
                    .map_err(failed("drawing"))?;
            }
            ProfileFormat::Pprof => {
                use pprof::protos::Message as _;
                let profile = report.pprof().map_err(failed("encoding"))?;
                profile
                    .write_to_vec(&mut out)
                    .map_err(|err| ProfileError::Failed {
                        stage: "encoding",
                        source: Box::new(err),
                    })?;
            }
        }
        Ok(out)
    })
    .await;
    match encoded {
        Ok(result) => result,
        Err(join) => Err(ProfileError::Failed {
            stage: "reporting",
            source: Box::new(join),
        }),
    }
}

/// A small SVG standing in for a flamegraph without a single sample.
fn idle_svg(duration: Duration) -> String {
    format!(
        concat!(
            r#"<?xml version="1.0" standalone="no"?>"#,
            r#"<svg version="1.1" width="600" height="60" xmlns="http://www.w3.org/2000/svg">"#,
            r#"<text x="10" y="35" font-family="monospace" font-size="14">"#,
            "fieldgate CPU, {seconds} s: no samples (the process was idle)",
            "</text></svg>\n"
        ),
        seconds = duration.as_secs_f64()
    )
}
