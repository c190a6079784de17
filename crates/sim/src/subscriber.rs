//! The upstream subscriber: an MQTT 3.1.1 client (QoS 1, clean session) that
//! feeds every received payload through [`extract`] into a [`Tracker`].
//!
//! It is started, and its subscription granted, before any device connects,
//! so nothing a device sends can be missed for lack of a subscription. It
//! re-subscribes after every reconnect (clean sessions forget subscriptions).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cli::{MqttProtocol, SubscribeArgs};
use crate::extract::{Sample, extract};
use crate::mqtt::{BrokerUrl, ClientSettings, Notice, new_client};
use crate::net::{TlsArgs, client_tls_config, resolve};
use crate::run::RunShared;
use crate::stats::{self, Counters};
use crate::tracker::{DeviceIds, Outcome, Tracker};

/// How long the subscriber may take to connect and be granted its subscription.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between reconnect attempts once running.
const RECONNECT_DELAY: Duration = Duration::from_millis(500);

/// A running subscriber; [`Subscriber::finish`] stops it and returns its tracker.
pub struct Subscriber {
    task: JoinHandle<Tracker>,
    stop: CancellationToken,
}

impl Subscriber {
    /// Connects, subscribes, and waits for the SUBACK.
    pub async fn start(
        args: &SubscribeArgs,
        tls_args: &TlsArgs,
        allow_remote: bool,
        ids: DeviceIds,
        run_start_us: u64,
        run: Arc<RunShared>,
    ) -> anyhow::Result<Self> {
        let url = args.subscribe.as_deref().context("no --subscribe URL")?;
        let broker = BrokerUrl::parse(url)?;
        resolve(&broker.host_port(), allow_remote).await?;
        let tls = broker
            .tls
            .then(|| client_tls_config(tls_args))
            .transpose()?;
        let settings = ClientSettings {
            client_id: format!(
                "fieldgate-sim-sub-{}-{}",
                std::process::id(),
                fastrand::u32(..)
            ),
            inflight: 100,
            request_capacity: 16,
        };
        let (client, mut eventloop) =
            new_client(MqttProtocol::V311, &broker, tls.as_ref(), &settings);
        let mut tracker = Tracker::new(ids, run_start_us)?;
        let stop = CancellationToken::new();
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), String>>();
        let filter = args.sub_topic.clone();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut ready = Some(ready_tx);
                let mut samples: Vec<Sample> = Vec::new();
                loop {
                    let polled = tokio::select! {
                        biased;
                        () = stop.cancelled() => break,
                        polled = eventloop.poll() => polled,
                    };
                    match polled {
                        Ok(Notice::Connected) => {
                            if let Err(error) = client.try_subscribe(&filter, 1) {
                                run.errors.record("subscriber", || {
                                    format!("subscribe {filter}: {error}")
                                });
                            }
                        }
                        Ok(Notice::Subscribed) => {
                            if let Some(ready) = ready.take() {
                                // The receiver only goes away if start() already gave up.
                                if ready.send(Ok(())).is_err() {
                                    break;
                                }
                            }
                        }
                        Ok(Notice::Message(payload)) => {
                            let now_us = stats::now_us();
                            samples.clear();
                            tracker.unrecognized += extract(&payload, &mut samples).unrecognized;
                            for sample in &samples {
                                let outcome =
                                    tracker.record(sample, now_us, |slot| run.seqs.get(slot));
                                if outcome == Outcome::New {
                                    Counters::add(&run.counters.received, 1);
                                }
                            }
                        }
                        Ok(_) => {}
                        Err(error) => {
                            if let Some(ready) = ready.take() {
                                // Not connected yet: fail the run instead of measuring nothing.
                                // (If start() already gave up, nobody is listening; stop either way.)
                                ready.send(Err(error)).ok();
                                break;
                            }
                            run.errors
                                .record("subscriber", || format!("subscriber connection: {error}"));
                            tokio::select! {
                                () = stop.cancelled() => break,
                                () = tokio::time::sleep(RECONNECT_DELAY) => {}
                            }
                        }
                    }
                }
                tracker
            }
        });
        let ready = tokio::time::timeout(READY_TIMEOUT, ready_rx).await;
        let failure = match ready {
            Ok(Ok(Ok(()))) => None,
            Ok(Ok(Err(error))) => Some(error),
            Ok(Err(_closed)) => Some("subscriber task ended".to_owned()),
            Err(_elapsed) => Some(format!("no SUBACK within {READY_TIMEOUT:?}")),
        };
        if let Some(error) = failure {
            stop.cancel();
            task.abort();
            anyhow::bail!("subscriber: {url} (topic {}): {error}", args.sub_topic);
        }
        Ok(Self { task, stop })
    }

    /// Stops the subscriber and returns what it measured.
    pub async fn finish(self) -> anyhow::Result<Tracker> {
        self.stop.cancel();
        self.task.await.context("subscriber task failed")
    }
}
