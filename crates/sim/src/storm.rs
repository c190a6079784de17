//! `storm`: connect and disconnect as fast as possible with a fixed number of
//! connections in flight; reports accepted connections per second.
//!
//! With --hello a connection counts as accepted only once the gateway's
//! welcome arrives (proof that it accepted and served it, not merely that the
//! kernel completed the handshake into the listen backlog).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::StormArgs;
use crate::framing::MAX_REPLY;
use crate::net::{self, BoxConn, Connector};
use crate::stats::{self, ErrorLog, ErrorSummary};
use crate::template::hello_json;
use crate::tokens::HelloTokens;
use crate::tracker::LatencySummary;

/// How long one connect (or welcome) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after running out of file descriptors, so we do not spin.
const FD_PAUSE: Duration = Duration::from_millis(100);

/// The JSON summary of a storm run.
#[derive(Debug, Serialize)]
pub struct StormSummary {
    /// "storm".
    pub scenario: &'static str,
    /// Connections in flight at once.
    pub concurrency: u32,
    /// Accepted connections (welcomed, with --hello).
    pub connects: u64,
    /// Failed attempts (refused, timed out, no welcome).
    pub connect_failures: u64,
    /// Seconds stormed.
    pub duration_s: f64,
    /// connects / duration_s.
    pub connects_per_s: f64,
    /// Time to establish each accepted connection (TCP + TLS + welcome), microseconds;
    /// values near 1 s or 3 s are SYN retransmits after the listener's accept queue overflowed.
    pub connect_us: Option<LatencySummary>,
    /// First error of each kind.
    pub errors: std::collections::BTreeMap<String, ErrorSummary>,
}

struct Storm {
    args: StormArgs,
    connector: Connector,
    tokens: HelloTokens,
    /// With --tokens, the devices cycled through (else PREFIX-1, PREFIX-2, ...).
    devices: Vec<String>,
    connects: AtomicU64,
    failures: AtomicU64,
    attempts: AtomicU64,
    errors: ErrorLog,
}

/// Runs the storm scenario.
pub async fn run(args: StormArgs, cancel: CancellationToken) -> anyhow::Result<StormSummary> {
    let connector = Connector::new(
        &args.target.target,
        args.target.tls(),
        args.target.allow_remote,
    )
    .await?;
    let tokens = HelloTokens::load(&args.target)?;
    let concurrency = args.concurrency;
    let storm = Arc::new(Storm {
        args,
        connector,
        devices: tokens.devices(),
        tokens,
        connects: AtomicU64::new(0),
        failures: AtomicU64::new(0),
        attempts: AtomicU64::new(0),
        errors: ErrorLog::default(),
    });
    let start = Instant::now();
    let deadline = start + storm.args.duration;
    let tasks = TaskTracker::new();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let storm = Arc::clone(&storm);
        let cancel = cancel.clone();
        workers.push(tasks.spawn(async move {
            let mut connect_us = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            while Instant::now() < deadline && !cancel.is_cancelled() {
                let began = Instant::now();
                let accepted = tokio::select! {
                    () = cancel.cancelled() => break,
                    accepted = storm.once() => accepted,
                };
                if accepted {
                    let micros = u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX);
                    connect_us.saturating_record(micros.max(1));
                }
            }
            Ok::<_, hdrhistogram::CreationError>(connect_us)
        }));
    }
    tasks.close();
    let mut connect_us = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for worker in workers {
        connect_us
            .add(worker.await??)
            .map_err(|e| anyhow::anyhow!("merging connect histograms: {e}"))?;
    }
    tasks.wait().await;
    let elapsed = start.elapsed().as_secs_f64().max(1e-3);
    let connects = storm.connects.load(Ordering::Relaxed);
    Ok(StormSummary {
        scenario: "storm",
        concurrency,
        connects,
        connect_failures: storm.failures.load(Ordering::Relaxed),
        duration_s: stats::round3(elapsed),
        connects_per_s: stats::round3(connects as f64 / elapsed),
        connect_us: (!connect_us.is_empty()).then(|| LatencySummary {
            p50: connect_us.value_at_quantile(0.5),
            p90: connect_us.value_at_quantile(0.9),
            p99: connect_us.value_at_quantile(0.99),
            p999: connect_us.value_at_quantile(0.999),
            max: connect_us.max(),
        }),
        errors: storm.errors.snapshot(),
    })
}

impl Storm {
    /// One connect (+ hello/welcome) + close; true when it counted as accepted.
    async fn once(&self) -> bool {
        let n = self.attempts.fetch_add(1, Ordering::Relaxed);
        let id = match u64::try_from(self.devices.len()) {
            Ok(len) if len > 0 => self.devices[usize::try_from(n % len).unwrap_or(0)].clone(),
            _ => format!("{}-{}", self.args.prefix, n % 1_000_000 + 1),
        };
        let mut conn = match timeout(STEP_TIMEOUT, self.connector.connect()).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(error)) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                if net::is_fd_exhaustion(&error) {
                    net::report_fd_exhaustion("connect", &error);
                    self.errors.record("fd_exhausted", || {
                        format!("{id}: {error}; {}", net::FD_HINT)
                    });
                    tokio::time::sleep(FD_PAUSE).await;
                } else {
                    self.errors.record("connect", || {
                        format!("{id}: connect to {}: {error}", self.connector.addr)
                    });
                }
                return false;
            }
            Err(_elapsed) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                self.errors.record("connect", || {
                    format!(
                        "{id}: connect to {} timed out after {STEP_TIMEOUT:?}",
                        self.connector.addr
                    )
                });
                return false;
            }
        };
        if self.args.target.sends_hello() {
            match timeout(STEP_TIMEOUT, self.hello(&id, &mut conn)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    self.errors.record("hello", || format!("{id}: {error}"));
                    return false;
                }
                Err(_elapsed) => {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    self.errors.record("hello", || {
                        format!("{id}: no welcome within {STEP_TIMEOUT:?}")
                    });
                    return false;
                }
            }
        }
        self.connects.fetch_add(1, Ordering::Relaxed);
        if timeout(STEP_TIMEOUT, conn.shutdown()).await.is_err() {
            self.errors
                .record("close", || format!("{id}: shutdown timed out"));
        }
        true
    }

    /// Sends a hello and waits for the first reply frame, which must be a welcome.
    async fn hello(&self, id: &str, conn: &mut BoxConn) -> Result<(), String> {
        let framing = self.args.target.framing;
        let mut out = Vec::new();
        framing.encode(hello_json(id, self.tokens.get(id)).as_bytes(), &mut out);
        conn.write_all(&out)
            .await
            .map_err(|e| format!("write hello: {e}"))?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 512];
        loop {
            if let Some(frame) = framing.next_frame(&mut buf).map_err(|e| e.to_string())? {
                let reply: serde_json::Value =
                    serde_json::from_slice(&frame).map_err(|e| format!("unparsable reply: {e}"))?;
                return if reply["type"] == "welcome" {
                    Ok(())
                } else {
                    Err(format!("expected a welcome, got {reply}"))
                };
            }
            if buf.len() > MAX_REPLY {
                return Err("reply too large".to_owned());
            }
            match conn.read(&mut chunk).await {
                Ok(0) => return Err("closed by the gateway before the welcome".to_owned()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }
}
