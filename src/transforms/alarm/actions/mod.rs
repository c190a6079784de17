//! Local actions of an alarm rule: on raise and/or clear, publish to the embedded MQTT
//! broker, send a device command, or call a webhook.
//!
//! Actions run off the transform's hot path: each action has a bounded queue and one
//! task (owned by the topology's action tracker) that carries its jobs out in order, so
//! a raise and its clear reach the receiver in that order and a slow webhook never
//! delays a publish. A full queue drops the job (counted, logged, shown on the alarm),
//! never blocks the pipeline. Every outcome is counted
//! (`fieldgate_alarm_action_{successes,failures}_total{rule,action}`); a failure is also
//! logged (throttled per action) and kept on the alarm as its last error, shown by
//! `/api/v1/alarms`, until the same action succeeds for that device.
//!
//! Modules: [`config`] (keys, checks), [`template`] (`{rule}`/`{device}` texts),
//! [`webhook`] (the HTTP client with retries), [`status`] (last errors per alarm).

pub mod config;
mod status;
pub mod template;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fieldgate_core::DeviceId;
use fieldgate_registry::{CommandState, NewCommand};
use prometheus_client::metrics::counter::Counter;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::config::Target;
pub use self::config::{ActionConfig, ActionPlan, Transition};
pub use self::status::ActionStatus;
use self::template::Values;
use crate::devices::commands::CommandDispatcher;
use crate::devices::directory::{DeviceCommand, DeviceDirectory};
use crate::devices::local_brokers::{LocalBrokers, LocalPublishError};
use crate::telemetry::Metrics;
use crate::telemetry::metrics::AlarmActionLabels;

/// Jobs waiting per action; beyond, a job is dropped.
const QUEUE: usize = 256;
/// How often a command's state is looked at while the action waits for its result.
const COMMAND_POLL: Duration = Duration::from_millis(200);
/// Waited for a command's end state beyond its TTL (the expiry sweep runs every second).
const COMMAND_SLACK: Duration = Duration::from_secs(3);
/// At most one failure log line per action in this window.
const LOG_WINDOW: Duration = Duration::from_secs(10);

/// What actions need from the running gateway; `None` in the offline `rules test` tool,
/// where rules raise alarms but run no actions.
#[derive(Clone)]
pub struct ActionServices {
    /// Owns every action task.
    pub tasks: TaskTracker,
    /// Fires at shutdown: the tasks stop taking jobs and abandon retries.
    pub stop: CancellationToken,
    /// The embedded brokers.
    pub brokers: Arc<LocalBrokers>,
    /// Connected devices (commands without a registry).
    pub directory: Arc<DeviceDirectory>,
    /// The command lifecycle, with `[registry]`.
    pub commands: Option<Arc<CommandDispatcher>>,
}

impl ActionServices {
    /// Services over the gateway's brokers, devices and commands.
    pub fn new(
        brokers: Arc<LocalBrokers>,
        directory: Arc<DeviceDirectory>,
        commands: Option<Arc<CommandDispatcher>>,
    ) -> Self {
        Self {
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
            brokers,
            directory,
            commands,
        }
    }

    /// Stops every action task, letting a step under way end within `bound`; what is
    /// still queued is counted as dropped.
    pub async fn shutdown(&self, bound: Duration) {
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(bound, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("alarm actions did not stop in time");
        }
    }
}

/// One alarm transition for the actions.
#[derive(Debug, Clone)]
pub struct Job {
    /// Raise or clear.
    pub transition: Transition,
    /// The alarm's device.
    pub device: DeviceId,
    /// The alarm event's payload (what mqtt and webhook actions send).
    pub payload: Bytes,
    /// When it happened, ms since the epoch (part of a command's id).
    pub at_ms: u64,
}

/// Why an action failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// The local publish failed.
    #[error("publish: {0}")]
    Publish(#[from] LocalPublishError),
    /// The command could not be queued or sent, or ended badly.
    #[error("command {command:?} to device {device:?}: {reason}")]
    Command {
        /// The target device.
        device: String,
        /// The command id.
        command: String,
        /// What went wrong.
        reason: String,
    },
    /// The webhook failed after its retries.
    #[error(transparent)]
    Webhook(#[from] webhook::WebhookError),
    /// The action's queue was full.
    #[error("dropped: the action's queue of {QUEUE} was full")]
    QueueFull,
    /// The gateway stopped first.
    #[error("abandoned at shutdown")]
    Shutdown,
}

/// The counters of one action.
#[derive(Clone)]
struct Counters {
    successes: Counter,
    failures: Counter,
    dropped: Counter,
    retries: Counter,
}

/// What an action task and the rule share about one action.
struct Lane {
    plan: ActionPlan,
    counters: Counters,
    log: status::LogThrottle,
}

/// Everything one rule's action tasks share.
struct Shared {
    rule: Arc<str>,
    severity: &'static str,
    status: Arc<ActionStatus>,
    services: ActionServices,
}

/// The actions of one rule: a queue per action, each drained by its own task.
pub struct ActionSet {
    shared: Arc<Shared>,
    lanes: Vec<(Arc<Lane>, Option<mpsc::Sender<Job>>)>,
}

impl ActionSet {
    /// The actions `plans` of rule `rule`; with `services`, each gets its queue and task
    /// (tasks end once the set is dropped and their queue is empty, or at shutdown).
    pub fn start(
        rule: &Arc<str>,
        severity: &'static str,
        plans: Vec<ActionPlan>,
        services: Option<&ActionServices>,
        metrics: &Metrics,
        status: Arc<ActionStatus>,
    ) -> Self {
        let shared = Arc::new(Shared {
            rule: Arc::clone(rule),
            severity,
            status,
            services: services.cloned().unwrap_or_else(|| {
                ActionServices::new(Arc::default(), Arc::new(DeviceDirectory::default()), None)
            }),
        });
        let lanes = plans
            .into_iter()
            .map(|plan| {
                let labels = AlarmActionLabels {
                    rule: rule.to_string(),
                    action: plan.name.clone(),
                };
                let lane = Arc::new(Lane {
                    counters: Counters {
                        successes: metrics
                            .alarm_action_successes
                            .get_or_create(&labels)
                            .clone(),
                        failures: metrics.alarm_action_failures.get_or_create(&labels).clone(),
                        dropped: metrics.alarm_actions_dropped.get_or_create(&labels).clone(),
                        retries: metrics.alarm_action_retries.get_or_create(&labels).clone(),
                    },
                    plan,
                    log: status::LogThrottle::new(LOG_WINDOW),
                });
                let queue = services.map(|services| {
                    let (sender, receiver) = mpsc::channel(QUEUE);
                    services.tasks.spawn(run(
                        Arc::clone(&shared),
                        Arc::clone(&lane),
                        receiver,
                        services.stop.clone(),
                    ));
                    sender
                });
                (lane, queue)
            })
            .collect();
        Self { shared, lanes }
    }

    /// Whether the rule has actions.
    pub fn is_empty(&self) -> bool {
        self.lanes.is_empty()
    }

    /// Queues `job` for every action that runs on its transition, without waiting.
    pub fn fire(&self, job: &Job) {
        for (lane, queue) in &self.lanes {
            if !lane.plan.runs_on(job.transition) {
                continue;
            }
            let Some(queue) = queue else {
                continue;
            };
            match queue.try_send(job.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(job)) => {
                    lane.counters.dropped.inc();
                    report(&self.shared, lane, &job, Err(ActionError::QueueFull));
                }
                Err(mpsc::error::TrySendError::Closed(job)) => {
                    lane.counters.dropped.inc();
                    report(&self.shared, lane, &job, Err(ActionError::Shutdown));
                }
            }
        }
    }
}

/// Carries out `lane`'s jobs in order until its queue closes or `stop` fires.
async fn run(
    shared: Arc<Shared>,
    lane: Arc<Lane>,
    mut jobs: mpsc::Receiver<Job>,
    stop: CancellationToken,
) {
    loop {
        let job = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            job = jobs.recv() => match job {
                Some(job) => job,
                None => return,
            },
        };
        let outcome = tokio::select! {
            () = stop.cancelled() => Err(ActionError::Shutdown),
            outcome = execute(&shared, &lane, &job) => outcome,
        };
        report(&shared, &lane, &job, outcome);
    }
    jobs.close();
    while let Ok(job) = jobs.try_recv() {
        lane.counters.dropped.inc();
        report(&shared, &lane, &job, Err(ActionError::Shutdown));
    }
}

/// Counts, logs (throttled) and records an action's outcome.
fn report(shared: &Shared, lane: &Lane, job: &Job, outcome: Result<(), ActionError>) {
    let action = lane.plan.name.as_str();
    match outcome {
        Ok(()) => {
            lane.counters.successes.inc();
            shared.status.succeeded(&job.device, action);
            tracing::debug!(rule = %shared.rule, action, device = %job.device, on = job.transition.as_str(), "alarm action done");
        }
        Err(err) => {
            lane.counters.failures.inc();
            let error = err.to_string();
            if let Some(suppressed) = lane.log.allow() {
                tracing::warn!(rule = %shared.rule, action, device = %job.device, on = job.transition.as_str(), error = %error, suppressed, "alarm action failed");
            }
            shared.status.failed(
                &job.device,
                status::Failure {
                    action: action.to_owned(),
                    on: job.transition,
                    error,
                    at: crate::clock::now_ms(),
                },
            );
        }
    }
}

/// Carries out one job of one action.
async fn execute(shared: &Shared, lane: &Lane, job: &Job) -> Result<(), ActionError> {
    let values = Values {
        rule: &shared.rule,
        device: job.device.as_str(),
        state: job.transition.state(),
        severity: shared.severity,
    };
    match &lane.plan.target {
        Target::Mqtt {
            broker,
            topic,
            qos,
            retain,
        } => {
            let topic = topic.render(&values);
            let brokers = &shared.services.brokers;
            let matched = match broker {
                Some(broker) => {
                    brokers.publish(broker, &topic, job.payload.clone(), *qos, *retain)?
                }
                None => brokers.publish_to_only(&topic, job.payload.clone(), *qos, *retain)?,
            };
            tracing::debug!(rule = %shared.rule, topic, matched, "alarm published locally");
            Ok(())
        }
        Target::Command {
            device,
            name,
            args,
            ttl,
        } => {
            let device = device.render(&values);
            let id = command_id(&shared.rule, job);
            let failed = |reason: String| ActionError::Command {
                device: device.clone(),
                command: id.clone(),
                reason,
            };
            fieldgate_codec::validate_device_id(&device)
                .map_err(|err| failed(format!("not a device id: {err}")))?;
            match &shared.services.commands {
                Some(commands) => command_with_registry(commands, &device, &id, name, args, *ttl)
                    .await
                    .map_err(failed),
                None => {
                    let params = RawValue::from_string(args.to_string())
                        .map_err(|err| failed(err.to_string()))?;
                    shared
                        .services
                        .directory
                        .send(DeviceCommand {
                            device: DeviceId::new(&device),
                            id: id.clone(),
                            name: name.clone(),
                            params,
                        })
                        .map_err(|err| failed(err.to_string()))
                }
            }
        }
        Target::Webhook(endpoint) => {
            endpoint
                .deliver(&job.payload, &shared.services.stop, || {
                    lane.counters.retries.inc();
                })
                .await?;
            Ok(())
        }
    }
}

/// Queues the command in the registry (idempotent by id) and follows it to its end
/// state: success only when the device answered `ok`.
async fn command_with_registry(
    commands: &Arc<CommandDispatcher>,
    device: &str,
    id: &str,
    name: &str,
    args: &serde_json::Value,
    ttl: Duration,
) -> Result<(), String> {
    let new = NewCommand {
        id: id.to_owned(),
        name: name.to_owned(),
        params: args.clone(),
        ttl,
    };
    let dispatcher = Arc::clone(commands);
    let target = device.to_owned();
    // Registry commits block on the disk: off the async workers.
    let queued = tokio::task::spawn_blocking(move || dispatcher.submit(&target, new))
        .await
        .map_err(|err| format!("submission did not finish: {err}"))?
        .map_err(|err| err.to_string())?;
    tracing::info!(
        device,
        command = id,
        state = queued.state.as_str(),
        "alarm command queued"
    );
    let deadline = tokio::time::Instant::now() + ttl + COMMAND_SLACK;
    let mut poll = tokio::time::interval(COMMAND_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        poll.tick().await;
        let Some(command) = commands.status(device, id) else {
            return Err("the registry lost the command".into());
        };
        match command.state {
            CommandState::Succeeded => return Ok(()),
            CommandState::Failed => {
                let why = command
                    .result
                    .as_ref()
                    .and_then(|result| result.get("error"))
                    .and_then(serde_json::Value::as_str)
                    .map_or_else(
                        || "the device answered with a failure".to_owned(),
                        |error| format!("the device answered: {error}"),
                    );
                return Err(why);
            }
            CommandState::Expired => {
                return Err("expired before the device answered".into());
            }
            CommandState::Queued | CommandState::Sent | CommandState::Delivered => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("still {} after its TTL", command.state.as_str()));
        }
    }
}

/// The command id of `job` under `rule`: the same transition always gets the same id
/// (the registry's idempotency key), within the registry's id alphabet and length.
fn command_id(rule: &str, job: &Job) -> String {
    let raw = format!(
        "alarm.{rule}.{}.{}.{}",
        job.device.as_str(),
        job.transition.as_str(),
        job.at_ms
    );
    let mut id: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if id.len() > 128 {
        // Keep the distinguishing tail (transition and time).
        id = id.split_off(id.len() - 128);
    }
    id
}

#[cfg(test)]
mod tests;
