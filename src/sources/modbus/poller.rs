//! The poller: one task per link (a TCP connection or a serial bus) that reads each
//! device's poll groups on their intervals and sends one event per poll.
//!
//! Requests on a link go one at a time (Modbus TCP devices often serve one request per
//! connection at a time; a serial bus is half duplex). A device that stops answering is
//! retried `retries` times, then its remaining reads in that poll are skipped and it is
//! left alone for a jittered, growing backoff; other devices on the same bus keep their
//! schedule, and devices of other sources are on other tasks altogether.
//!
//! Backpressure: events are sent without an ack (a poll cannot be repeated later, the
//! next one reads fresh values); `send` waits while a sink's intake is full, and because
//! polls run one after another in this task, missed ticks are skipped rather than queued:
//! at most one poll per link is ever in flight.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fieldgate_core::{DeviceId, Event, EventKind, PayloadFormat};
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::{Answer, Connection, Link, ModbusError, Operation};
use super::config::{DevicePlan, PollPlan};
use super::metrics::SourceMetrics;
use super::plan::{Read, Span, plan};
use super::report::{PointMemory, report};
use super::value::{decode_point, to_json};
use super::write::operations;
use crate::devices::DeviceServices;
use crate::devices::directory::{ConnectionSignal, DeviceCommand};
use crate::net::backoff::Backoff;
use crate::pipeline::SourceOutput;

/// One device's poll group: its reads and points.
struct Job {
    device: usize,
    interval: Duration,
    reads: Vec<Read>,
    /// Indices into the device's points, ascending; `Read::points` index into this.
    points: Vec<usize>,
    next_due: Instant,
}

/// What the poller keeps per device.
struct DeviceState {
    id: DeviceId,
    backoff: Backoff,
    /// While set and in the future, the device's polls are skipped.
    retry_at: Option<Instant>,
    /// Whether the device is currently considered down (for one log line per outage).
    down: bool,
    /// Whether it is in the device directory (reachable for commands).
    registered: bool,
    memory: Vec<PointMemory>,
}

/// Polls every device of one link.
pub struct Poller {
    name: Arc<str>,
    plan: Arc<PollPlan>,
    connection: Connection,
    jobs: Vec<Job>,
    devices: Vec<DeviceState>,
    output: SourceOutput,
    metrics: SourceMetrics,
    services: Arc<DeviceServices>,
    /// This link's id in the device directory, and how commands wake it.
    connection_id: u64,
    signal: Arc<ConnectionSignal>,
}

impl Poller {
    /// A poller for `plan` over `link`; its devices take commands through `services`
    /// while they answer.
    pub fn new(
        name: Arc<str>,
        link: Link,
        plan: Arc<PollPlan>,
        output: SourceOutput,
        metrics: SourceMetrics,
        services: Arc<DeviceServices>,
    ) -> Self {
        let now = Instant::now();
        let mut jobs = Vec::new();
        let mut devices = Vec::new();
        let points: usize = plan.devices.iter().map(|device| device.points.len()).sum();
        metrics
            .points
            .set(i64::try_from(points).unwrap_or(i64::MAX));
        for (index, device) in plan.devices.iter().enumerate() {
            jobs.extend(jobs_of(index, device, &plan, now));
            devices.push(DeviceState {
                id: DeviceId::new(&device.device),
                backoff: Backoff::new(plan.backoff.0, plan.backoff.1),
                retry_at: None,
                down: false,
                registered: false,
                memory: vec![PointMemory::default(); device.points.len()],
            });
        }
        Self {
            name,
            plan,
            connection: Connection::new(link),
            jobs,
            devices,
            output,
            metrics,
            connection_id: services.directory.next_connection_id(),
            signal: Arc::default(),
            services,
        }
    }

    /// Polls until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        tracing::info!(
            devices = self.devices.len(),
            polls = self.jobs.len(),
            "polling Modbus devices"
        );
        loop {
            let Some(index) = (0..self.jobs.len()).min_by_key(|&index| self.jobs[index].next_due)
            else {
                stop.cancelled().await;
                break;
            };
            let due = self.jobs[index].next_due;
            let signal = Arc::clone(&self.signal);
            let commands = tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep_until(due) => false,
                () = signal.commands_waiting() => true,
            };
            if commands {
                while let Some(command) = self.services.directory.take_command(self.connection_id) {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = self.write(command) => {}
                    }
                }
                continue;
            }
            let now = Instant::now();
            let job = &mut self.jobs[index];
            // Missed ticks (a slow device, a full sink) are skipped, never queued.
            let mut next = due + job.interval;
            if next <= now {
                next = now + job.interval;
            }
            job.next_due = next;
            tokio::select! {
                () = stop.cancelled() => break,
                () = self.poll(index) => {}
            }
        }
        for device in &mut self.devices {
            if device.registered {
                self.services
                    .directory
                    .unregister(&device.id, self.connection_id);
                device.registered = false;
            }
        }
        self.services
            .directory
            .forget_connection(self.connection_id);
        tracing::info!("Modbus poller stopped");
    }

    /// Sends one request, retrying timeouts and broken links `retries` times.
    async fn request(&mut self, unit: u8, operation: &Operation) -> Result<Answer, ModbusError> {
        let mut attempt = 0;
        loop {
            let result = match self.connection.open(self.plan.timeout).await {
                Ok(()) => {
                    self.metrics.requests.inc();
                    self.connection
                        .request(unit, operation, self.plan.timeout)
                        .await
                }
                Err(err) => Err(err),
            };
            match result {
                Ok(answer) => return Ok(answer),
                Err(err) => {
                    self.metrics.error(&err);
                    if err.device_answered() || attempt >= self.plan.retries {
                        return Err(err);
                    }
                    attempt += 1;
                    tracing::debug!(unit, attempt, error = %err, "retrying Modbus request");
                }
            }
        }
    }

    /// Reads one poll group of one device and sends its event.
    async fn poll(&mut self, index: usize) {
        let device_index = self.jobs[index].device;
        if let Some(at) = self.devices[device_index].retry_at {
            if Instant::now() < at {
                return;
            }
        }
        let started = Instant::now();
        let timestamp_ms = crate::clock::now_ms();
        let plan = Arc::clone(&self.plan);
        let device_plan = &plan.devices[device_index];
        let unit = device_plan.unit_id;
        let reads = std::mem::take(&mut self.jobs[index].reads);
        let job_points = self.jobs[index].points.clone();
        let mut readings: Vec<Option<Value>> = vec![None; job_points.len()];
        let mut answered = false;
        let mut failure = None;
        for read in &reads {
            let operation = Operation::Read {
                area: read.area,
                address: read.address,
                count: read.count,
            };
            match self.request(unit, &operation).await {
                Ok(answer) => {
                    answered = true;
                    for &slot in &read.points {
                        let point = &device_plan.points[job_points[slot]];
                        readings[slot] = extract(point, read, &answer);
                    }
                }
                Err(err) if err.device_answered() => {
                    answered = true;
                    tracing::warn!(device = %device_plan.device, unit, area = read.area.name(), address = read.address, count = read.count, error = %err, "Modbus read refused");
                }
                Err(err) => {
                    // The device does not answer: the rest of this poll would only wait
                    // for more timeouts.
                    failure = Some(err);
                    break;
                }
            }
        }
        self.jobs[index].reads = reads;
        self.metrics
            .poll_seconds
            .observe(started.elapsed().as_secs_f64());
        let now = Instant::now();
        let device = &mut self.devices[device_index];
        match failure {
            Some(err) => {
                let delay = device.backoff.next_delay();
                device.retry_at = Some(now + delay);
                if !device.down {
                    tracing::warn!(device = %device_plan.device, unit, error = %err, retry_in = ?delay, "Modbus device not answering");
                }
                device.down = true;
                if device.registered {
                    // Commands for it wait in the registry until it answers again.
                    self.services
                        .directory
                        .unregister(&device.id, self.connection_id);
                    device.registered = false;
                    let id = device.id.clone();
                    self.status(
                        id,
                        format!(r#"{{"status":"offline","reason":"{}"}}"#, err.kind()),
                    )
                    .await;
                }
            }
            None if answered => {
                if device.down {
                    tracing::info!(device = %device_plan.device, unit, "Modbus device answering again");
                }
                device.down = false;
                device.retry_at = None;
                device.backoff.reset();
                if !device.registered {
                    device.registered = true;
                    let id = device.id.clone();
                    self.services
                        .directory
                        .register(id.clone(), self.connection_id, &self.signal);
                    self.status(id.clone(), r#"{"status":"online"}"#.to_owned())
                        .await;
                    if let Some(commands) = &self.services.commands {
                        commands.deliver_pending(&id).await;
                    }
                }
            }
            None => {}
        }
        let device = &mut self.devices[device_index];
        let points: Vec<&super::config::Point> = job_points
            .iter()
            .map(|&point| &device_plan.points[point])
            .collect();
        let mut memory: Vec<&mut PointMemory> = device
            .memory
            .iter_mut()
            .enumerate()
            .filter(|(point, _)| job_points.binary_search(point).is_ok())
            .map(|(_, memory)| memory)
            .collect();
        let interval = self.jobs[index].interval;
        let Some(payload) = report(
            &points,
            &readings,
            &mut memory,
            now,
            interval,
            self.plan.report_on_change,
            timestamp_ms,
        ) else {
            return;
        };
        let mut event = Event::new(
            device.id.clone(),
            EventKind::Telemetry,
            Arc::clone(&self.name),
            crate::clock::now_ms(),
            PayloadFormat::Json,
            Bytes::from(payload),
        );
        event.device_time_ms = Some(timestamp_ms);
        drop(self.output.send(event, false).await);
        self.metrics.received.inc();
    }

    /// Sends a `status` event for a device that started or stopped answering.
    async fn status(&mut self, device: DeviceId, payload: String) {
        let event = Event::new(
            device,
            EventKind::Status,
            Arc::clone(&self.name),
            crate::clock::now_ms(),
            PayloadFormat::Json,
            Bytes::from(payload),
        );
        drop(self.output.send(event, false).await);
        self.metrics.received.inc();
    }

    /// Carries out one write command and sends its `command_result`.
    async fn write(&mut self, command: DeviceCommand) {
        let plan = Arc::clone(&self.plan);
        let Some(device_plan) = plan
            .devices
            .iter()
            .find(|device| device.device == command.device.as_str())
        else {
            return;
        };
        if let Some(commands) = &self.services.commands {
            commands.delivered(&command.device, &command.id).await;
        }
        let outcome = match operations(device_plan, &command.name, command.params.get()) {
            Err(err) => Err(err.to_string()),
            Ok(writes) => {
                let mut outcome = Ok(writes.len());
                for (point, operation) in &writes {
                    if let Err(err) = self.request(device_plan.unit_id, operation).await {
                        outcome = Err(format!("writing {point}: {err}"));
                        break;
                    }
                }
                outcome
            }
        };
        let result = match &outcome {
            Ok(written) => serde_json::json!({
                "type": "command_result", "id": command.id, "status": "ok", "written": written,
            }),
            Err(error) => serde_json::json!({
                "type": "command_result", "id": command.id, "status": "error", "error": error,
            }),
        };
        tracing::info!(device = %command.device, command = %command.id, ok = outcome.is_ok(), "Modbus write command done");
        let frame = Bytes::from(result.to_string());
        if let Some(commands) = &self.services.commands {
            commands.result(&command.device, &command.id, &frame).await;
        }
        let event = Event::new(
            command.device.clone(),
            EventKind::CommandResult,
            Arc::clone(&self.name),
            crate::clock::now_ms(),
            PayloadFormat::Json,
            frame,
        );
        drop(self.output.send(event, false).await);
        self.metrics.received.inc();
    }
}

/// The poll groups of one device, each planned into reads.
fn jobs_of(index: usize, device: &DevicePlan, poll_plan: &PollPlan, now: Instant) -> Vec<Job> {
    let mut jobs = Vec::new();
    for (group, (_, interval)) in poll_plan.intervals.iter().enumerate() {
        let points: Vec<usize> = (0..device.points.len())
            .filter(|&point| device.points[point].group == group)
            .collect();
        if points.is_empty() {
            continue;
        }
        let spans: Vec<Span> = points
            .iter()
            .map(|&point| {
                let point = &device.points[point];
                Span {
                    unit: device.unit_id,
                    area: point.area,
                    address: point.address,
                    width: point.width,
                }
            })
            .collect();
        jobs.push(Job {
            device: index,
            interval: *interval,
            reads: plan(&spans, poll_plan.limits),
            points,
            next_due: now,
        });
    }
    jobs
}

/// A point's value from the answer to the read that covers it.
fn extract(point: &super::config::Point, read: &Read, answer: &Answer) -> Option<Value> {
    let offset = usize::from(point.address.checked_sub(read.address)?);
    match answer {
        Answer::Bits(bits) => bits.get(offset).map(|bit| Value::Bool(*bit)),
        Answer::Registers(registers) => {
            let end = offset + usize::from(point.width);
            let raw = decode_point(
                point.data_type,
                point.byte_order,
                registers.get(offset..end)?,
            );
            match raw {
                Ok(raw) => Some(to_json(&raw, point.scale, point.offset)).filter(|v| !v.is_null()),
                Err(err) => {
                    tracing::debug!(point = %point.name, error = %err, "undecodable value");
                    None
                }
            }
        }
        Answer::Written => None,
    }
}
