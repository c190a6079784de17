//! `idle`: open N connections, optionally say hello or send one message each,
//! hold them, and report how many stayed up (for RSS per idle connection).
//!
//! Phases: connect all (ramped) -> hold for --hold -> close all. Each phase is
//! bounded; a connection the gateway closes during the hold is counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::IdleArgs;
use crate::net::{self, Connector};
use crate::stats::{self, Counters, ErrorLog, ErrorSummary};
use crate::template::{DEFAULT_TEMPLATE, PayloadTemplate, Vars, hello_json};
use crate::tokens::HelloTokens;

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the connect phase checks whether every attempt has finished.
const POLL: Duration = Duration::from_millis(20);

/// The JSON summary of an idle run.
#[derive(Debug, Serialize)]
pub struct IdleSummary {
    /// "idle".
    pub scenario: &'static str,
    /// Connections requested.
    pub devices: usize,
    /// Connections open at the end of the hold.
    pub connected: u64,
    /// Most connections open at once.
    pub peak_connected: u64,
    /// Failed connection attempts.
    pub connect_failures: u64,
    /// Connections the peer closed during the hold.
    pub closed_by_peer: u64,
    /// Seconds to open every connection.
    pub connect_s: f64,
    /// Seconds held.
    pub hold_s: f64,
    /// First error of each kind.
    pub errors: std::collections::BTreeMap<String, ErrorSummary>,
}

/// Shared state of an idle run.
struct Idle {
    args: IdleArgs,
    connector: Connector,
    tokens: HelloTokens,
    counters: Counters,
    errors: ErrorLog,
    attempts_done: AtomicU64,
    closed_by_peer: AtomicU64,
    release: CancellationToken,
}

/// Runs the idle scenario.
pub async fn run(args: IdleArgs, cancel: CancellationToken) -> anyhow::Result<IdleSummary> {
    let devices = usize::try_from(args.devices)?;
    net::warn_if_fd_limit_low(devices);
    let tokens = HelloTokens::load(&args.target)?;
    tokens.check_covers((1..=devices).map(|n| format!("{}-{n}", args.prefix)))?;
    let connector = Connector::new(
        &args.target.target,
        args.target.tls(),
        args.target.allow_remote,
    )
    .await?;
    let idle = Arc::new(Idle {
        args,
        connector,
        tokens,
        counters: Counters::default(),
        errors: ErrorLog::default(),
        attempts_done: AtomicU64::new(0),
        closed_by_peer: AtomicU64::new(0),
        release: cancel.child_token(),
    });
    let progress_stop = CancellationToken::new();
    let start = Instant::now();
    let tasks = TaskTracker::new();
    let progress = tasks.spawn({
        let idle = Arc::clone(&idle);
        let stop = progress_stop.clone();
        async move { stats::progress(&idle.counters, devices, start, stop).await }
    });

    // Phase 1: connect everything.
    for slot in 0..devices {
        if idle.args.ramp > 0.0 {
            let due = start + Duration::from_secs_f64(slot as f64 / idle.args.ramp);
            tokio::select! {
                () = cancel.cancelled() => break,
                () = sleep_until(due) => {}
            }
        }
        tasks.spawn(connection(Arc::clone(&idle), slot));
    }
    let total = u64::try_from(devices)?;
    while idle.attempts_done.load(Ordering::Relaxed) < total && !cancel.is_cancelled() {
        tokio::time::sleep(POLL).await;
    }
    let connect_s = stats::secs(start.elapsed());

    // Phase 2: hold.
    let connected = idle.counters.connected_now();
    eprintln!(
        "idle: {connected}/{devices} connections open after {connect_s}s; holding for {:?}",
        idle.args.hold
    );
    let hold_start = Instant::now();
    tokio::select! {
        () = cancel.cancelled() => {}
        () = tokio::time::sleep(idle.args.hold) => {}
    }
    let hold_s = stats::secs(hold_start.elapsed());
    let connected_at_end = idle.counters.connected_now();

    // Phase 3: close.
    idle.release.cancel();
    progress_stop.cancel();
    tasks.close();
    tasks.wait().await;
    progress.await?;

    Ok(IdleSummary {
        scenario: "idle",
        devices,
        connected: connected_at_end,
        peak_connected: u64::try_from(idle.counters.peak_connected.load(Ordering::Relaxed))
            .unwrap_or(0),
        connect_failures: Counters::get(&idle.counters.connect_failures),
        closed_by_peer: idle.closed_by_peer.load(Ordering::Relaxed),
        connect_s,
        hold_s,
        errors: idle.errors.snapshot(),
    })
}

/// One idle connection: open, greet, hold until released, close.
async fn connection(idle: Arc<Idle>, slot: usize) {
    let id = format!("{}-{}", idle.args.prefix, slot + 1);
    let connected = tokio::select! {
        () = idle.release.cancelled() => None,
        connected = timeout(CONNECT_TIMEOUT, idle.connector.connect()) => Some(connected),
    };
    idle.attempts_done.fetch_add(1, Ordering::Relaxed);
    let mut conn = match connected {
        None => return,
        Some(Ok(Ok(conn))) => conn,
        Some(Ok(Err(error))) => {
            Counters::add(&idle.counters.connect_failures, 1);
            if net::is_fd_exhaustion(&error) {
                net::report_fd_exhaustion("connect", &error);
                idle.errors.record("fd_exhausted", || {
                    format!(
                        "{id}: connect to {}: {error}; {}",
                        idle.connector.addr,
                        net::FD_HINT
                    )
                });
            } else {
                idle.errors.record("connect", || {
                    format!("{id}: connect to {}: {error}", idle.connector.addr)
                });
            }
            return;
        }
        Some(Err(_elapsed)) => {
            Counters::add(&idle.counters.connect_failures, 1);
            idle.errors.record("connect", || {
                format!(
                    "{id}: connect to {} timed out after {CONNECT_TIMEOUT:?}",
                    idle.connector.addr
                )
            });
            return;
        }
    };
    idle.counters.connection_opened();
    let framing = idle.args.target.framing;
    let mut out = Vec::new();
    if idle.args.target.sends_hello() {
        framing.encode(hello_json(&id, idle.tokens.get(&id)).as_bytes(), &mut out);
    }
    if idle.args.message {
        if let Ok(template) = PayloadTemplate::parse(DEFAULT_TEMPLATE, 0) {
            let header = framing.begin(&mut out);
            let vars = Vars {
                device: &id,
                seq: 1,
                send_us: stats::now_us(),
                walk: 20.0,
                rand: 0.0,
            };
            template.render(&vars, &mut out);
            framing.finish(&mut out, header);
        }
    }
    let heartbeat = idle.args.heartbeat.unwrap_or(Duration::MAX);
    let mut next_heartbeat = Instant::now().checked_add(heartbeat);
    let mut chunk = [0u8; 256];
    loop {
        if !out.is_empty() {
            if let Err(error) = conn.write_all(&out).await {
                idle.closed_by_peer.fetch_add(1, Ordering::Relaxed);
                idle.errors
                    .record("write", || format!("{id}: write: {error}"));
                break;
            }
            out.clear();
        }
        tokio::select! {
            () = idle.release.cancelled() => {
                // Best effort close; the run is over either way.
                if timeout(Duration::from_secs(1), conn.shutdown()).await.is_err() {
                    idle.errors.record("close", || format!("{id}: shutdown timed out"));
                }
                break;
            }
            read = conn.read(&mut chunk) => match read {
                // Replies (welcome, acks) are read and discarded so the gateway never blocks on us.
                Ok(n) if n > 0 => {}
                Ok(_) => {
                    idle.closed_by_peer.fetch_add(1, Ordering::Relaxed);
                    idle.errors.record("closed_by_peer", || format!("{id}: closed by the gateway"));
                    break;
                }
                Err(error) => {
                    idle.closed_by_peer.fetch_add(1, Ordering::Relaxed);
                    idle.errors.record("closed_by_peer", || format!("{id}: read: {error}"));
                    break;
                }
            },
            () = sleep_until(next_heartbeat.unwrap_or_else(Instant::now)), if next_heartbeat.is_some() => {
                framing.encode(br#"{"type":"heartbeat"}"#, &mut out);
                next_heartbeat = Instant::now().checked_add(heartbeat);
            }
        }
    }
    idle.counters.connection_closed();
}
