//! One tcp or mqtt run: start the subscriber, ramp the devices up, wait for
//! them, drain the upstream, and build the summary.
//!
//! Bounds: each device stops sending at its --duration (or --messages) and
//! gives up at duration + drain timeout; the upstream drain is capped by the
//! drain timeout too, so a run always ends.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::{DeviceArgs, SubscribeArgs};
use crate::net::TlsArgs;
use crate::stats::{self, Counters, ErrorLog, SentSeqs, Summary};
use crate::subscriber::Subscriber;
use crate::template::PayloadTemplate;
use crate::tracker::DeviceIds;

/// How often the drain loop re-checks the received count.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Validated device behaviour shared by every device task.
#[derive(Debug)]
pub struct DeviceModel {
    /// Device ids.
    pub ids: DeviceIds,
    /// Messages per second per device (0 = unpaced).
    pub rate: f64,
    /// Send-time jitter, fraction of the interval.
    pub jitter: f64,
    /// Messages per device.
    pub messages: u64,
    /// How long each device sends.
    pub duration: Duration,
    /// Most unacked messages per device.
    pub window: usize,
    /// Connections per second (0 = at once).
    pub ramp: f64,
    /// Payload template.
    pub template: PayloadTemplate,
    /// How long to wait for acks and upstream arrivals after sending.
    pub drain_timeout: Duration,
}

impl DeviceModel {
    /// Validates the arguments; `needs_seq` when acks or the subscriber match on seq.
    pub fn new(
        args: &DeviceArgs,
        drain_timeout: Duration,
        needs_seq: bool,
        measures: bool,
    ) -> anyhow::Result<Self> {
        let template = PayloadTemplate::parse(&args.template, args.payload_size)?;
        if needs_seq && !template.has_seq() {
            bail!("the payload template needs {{seq}} for ack matching and loss accounting");
        }
        if measures && !(template.has_send_us() && template.has_device()) {
            bail!(
                "with --subscribe the template needs \"device\":\"{{device}}\" and \"t\":{{send_us}}"
            );
        }
        let duration = args.duration.unwrap_or(if args.messages.is_some() {
            Duration::from_secs(600)
        } else {
            Duration::from_secs(10)
        });
        Ok(Self {
            ids: DeviceIds::new(&args.prefix, usize::try_from(args.devices)?),
            rate: args.rate,
            jitter: args.jitter,
            messages: args.messages.unwrap_or(u64::MAX),
            duration,
            window: usize::from(args.window),
            ramp: args.ramp,
            template,
            drain_timeout,
        })
    }

    /// Number of devices.
    pub fn devices(&self) -> usize {
        self.ids.len()
    }
}

/// State shared by every task of a run.
#[derive(Debug)]
pub struct RunShared {
    /// Counters.
    pub counters: Counters,
    /// Highest seq sent per device.
    pub seqs: SentSeqs,
    /// First error of each kind.
    pub errors: ErrorLog,
    /// When the run started (before the first connection).
    pub start: Instant,
    /// Cancelled on Ctrl-C: devices stop and the summary is still printed.
    pub cancel: CancellationToken,
}

impl RunShared {
    /// Fresh state for `devices` devices.
    pub fn new(devices: usize, cancel: CancellationToken) -> Self {
        Self {
            counters: Counters::default(),
            seqs: SentSeqs::new(devices),
            errors: ErrorLog::default(),
            start: Instant::now(),
            cancel,
        }
    }
}

/// Where the subscriber connects.
pub struct SubscribeSpec<'a> {
    /// Subscriber options.
    pub args: &'a SubscribeArgs,
    /// TLS options for mqtts.
    pub tls: &'a TlsArgs,
    /// Whether a non-loopback broker is allowed.
    pub allow_remote: bool,
}

/// Runs the devices produced by `device(slot)` and returns the summary.
pub async fn run_devices<F, Fut>(
    scenario: &'static str,
    model: &DeviceModel,
    acks_expected: bool,
    subscribe: Option<SubscribeSpec<'_>>,
    run: Arc<RunShared>,
    device: F,
) -> anyhow::Result<Summary>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let run_start_us = stats::now_us();
    let subscriber = match &subscribe {
        Some(spec) => Some(
            Subscriber::start(
                spec.args,
                spec.tls,
                spec.allow_remote,
                model.ids.clone(),
                run_start_us,
                Arc::clone(&run),
            )
            .await?,
        ),
        None => None,
    };

    let progress_stop = CancellationToken::new();
    let progress = tokio::spawn({
        let run = Arc::clone(&run);
        let stop = progress_stop.clone();
        let devices = model.devices();
        async move { stats::progress(&run.counters, devices, run.start, stop).await }
    });

    let start = Instant::now();
    let tasks = TaskTracker::new();
    for slot in 0..model.devices() {
        if model.ramp > 0.0 {
            let due = start + Duration::from_secs_f64(slot as f64 / model.ramp);
            tokio::select! {
                () = run.cancel.cancelled() => break,
                () = tokio::time::sleep_until(due) => {}
            }
        }
        tasks.spawn(device(slot));
    }
    tasks.close();
    tasks.wait().await;
    let sending_done = Instant::now();

    let mut drain_s = None;
    let mut drain_timed_out = None;
    let tracker = match subscriber {
        Some(subscriber) => {
            let deadline = sending_done + model.drain_timeout;
            let expected = run.seqs.total();
            while Counters::get(&run.counters.received) < expected
                && Instant::now() < deadline
                && !run.cancel.is_cancelled()
            {
                tokio::time::sleep(DRAIN_POLL).await;
            }
            drain_s = Some(stats::secs(sending_done.elapsed()));
            drain_timed_out = Some(Counters::get(&run.counters.received) < expected);
            Some(subscriber.finish().await?)
        }
        None => None,
    };
    progress_stop.cancel();
    progress.await?;

    let counters = &run.counters;
    let sent = Counters::get(&counters.sent);
    let send_secs = Duration::from_micros(Counters::get(&counters.last_send_offset_us))
        .max(Duration::from_millis(1))
        .as_secs_f64();
    let lost = tracker.as_ref().map(|t| t.lost(|slot| run.seqs.get(slot)));
    let receive_rate = tracker.as_ref().map(|t| {
        let span_us = t.last_receive_us.saturating_sub(run_start_us).max(1);
        stats::round3(t.unique as f64 / (span_us as f64 / 1e6))
    });
    Ok(Summary {
        scenario,
        devices: model.devices(),
        sent,
        acked: acks_expected.then(|| Counters::get(&counters.acked)),
        received: tracker.as_ref().map(|t| t.unique),
        lost,
        duplicates: tracker.as_ref().map(|t| t.duplicates),
        connect_failures: Counters::get(&counters.connect_failures),
        duration_s: stats::round3(send_secs),
        send_rate: stats::round3(sent as f64 / send_secs),
        receive_rate,
        latency_us: tracker.as_ref().and_then(|t| t.latency()),
        resent: Counters::get(&counters.resent),
        nacked: Counters::get(&counters.nacked),
        disconnects: Counters::get(&counters.disconnects),
        stale: tracker.as_ref().map(|t| t.stale),
        foreign: tracker.as_ref().map(|t| t.foreign),
        unexpected: tracker.as_ref().map(|t| t.unexpected),
        unrecognized: tracker.as_ref().map(|t| t.unrecognized),
        drain_s,
        drain_timed_out,
        errors: run.errors.snapshot(),
    })
}
