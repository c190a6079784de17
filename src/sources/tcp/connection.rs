//! One device connection: read frames, turn them into events, answer acks and errors,
//! deliver commands, and enforce the limits (frame size, rate, silence, errors).
//!
//! Invariants: the connection reads only while the pipeline accepts (a full buffer with
//! `when_full = "block"` stops it); it holds no read buffer while idle, and the bytes of
//! its unfinished frame are counted in the gateway-wide [`PartialFrameBudget`] (returned
//! when it closes); before a hello authenticates it (`token`, `registry`) its frames are
//! capped at `unauthenticated_max_frame`; a connection that names no device within
//! `hello_timeout` is closed; a bad frame costs an error frame and a counter, never a
//! panic, and never affects another connection.
//!
//! [`PartialFrameBudget`]: crate::net::limits::PartialFrameBudget

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fieldgate_codec::{
    DeviceMessage, FrameDecoder, Reply, encode_reply, parse_message, validate_device_id,
};
use fieldgate_core::{DeviceId, Event, EventKind, PayloadFormat};
use futures_util::future::BoxFuture;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::SourceShared;
use super::config::AuthMode;
use super::stream::DeviceStream;
use crate::clock::now_ms;
use crate::devices::directory::ConnectionSignal;
use crate::pipeline::{AckOutcome, AckWaiter};
use crate::telemetry::metrics::ParseLabels;

/// Acks awaited at once; beyond it the connection stops reading until the oldest resolves.
const MAX_PENDING_ACKS: usize = 4096;
/// Devices one connection may speak for without a hello (a concentrator).
const MAX_DEVICES_PER_CONNECTION: usize = 256;
/// How long a status event may wait for room in the pipeline.
const STATUS_SEND_TIMEOUT: Duration = Duration::from_secs(1);
/// A device that does not read its replies for this long is disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest read buffer an idle connection keeps: about one typical frame.
const KEEP_IDLE_READ_BUFFER: usize = 512;
/// A partial frame's buffer above this size is copied into a fitting one when it holds
/// less than a quarter of its capacity, so a burst does not leave large buffers behind.
const SHRINK_ABOVE: usize = 16 * 1024;

/// Why a connection ended, for the offline status and the log.
#[derive(Debug, Clone, Copy)]
enum CloseReason {
    Disconnected,
    Idle,
    FrameTimeout,
    TooManyErrors,
    Unauthorized,
    FatalFrame,
    WriteFailed,
    Shutdown,
    Revoked,
    HelloTimeout,
    UnauthenticatedFrame,
    FrameBudget,
}

impl CloseReason {
    fn as_str(self) -> &'static str {
        match self {
            CloseReason::Disconnected => "disconnected",
            CloseReason::Idle => "heartbeat_timeout",
            CloseReason::FrameTimeout => "frame_timeout",
            CloseReason::TooManyErrors => "too_many_errors",
            CloseReason::Unauthorized => "unauthorized",
            CloseReason::FatalFrame => "frame_too_large",
            CloseReason::WriteFailed => "write_failed",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Revoked => "revoked",
            CloseReason::HelloTimeout => "hello_timeout",
            CloseReason::UnauthenticatedFrame => "unauthenticated_frame_too_large",
            CloseReason::FrameBudget => "partial_frame_budget",
        }
    }
}

struct Connection {
    shared: Arc<SourceShared>,
    stream: DeviceStream,
    peer: std::net::SocketAddr,
    id: u64,
    decoder: FrameDecoder,
    /// Partial frame bytes; empty (no allocation) between frames.
    buf: BytesMut,
    /// The device named by a hello (or by a client certificate), if any.
    hello_device: Option<DeviceId>,
    /// The device a verified client certificate names, under `auth = "registry"`.
    certified: Option<DeviceId>,
    /// Every device registered for commands by this connection.
    devices: HashSet<DeviceId>,
    /// Set once a device registers: how the directory wakes this connection.
    signal: Option<Arc<ConnectionSignal>>,
    pending_acks: VecDeque<(u64, AckWaiter)>,
    data_frames: u64,
    errors: u32,
    rate_window_start: Instant,
    rate_window_frames: u32,
    out: BytesMut,
    /// The source's shutdown.
    shutdown: CancellationToken,
    /// Bytes this connection holds of the gateway-wide partial frame budget; given back
    /// on drop, whatever way the connection ends.
    budget_held: usize,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shared
            .services
            .frame_budget
            .release(&mut self.budget_held);
    }
}

/// Serves one connection until it closes or `shutdown` fires.
///
/// `permit` holds the connection's place under `max_connections` until it ends.
pub async fn serve(
    shared: Arc<SourceShared>,
    stream: DeviceStream,
    peer: std::net::SocketAddr,
    id: u64,
    shutdown: CancellationToken,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    shared.connections.inc();
    let first_limit = if shared.settings.auth == AuthMode::None {
        shared.settings.max_frame
    } else {
        shared.settings.unauthenticated_max_frame
    };
    let decoder = FrameDecoder::new(shared.settings.framing, first_limit);
    let mut connection = Connection {
        shared: Arc::clone(&shared),
        stream,
        peer,
        id,
        decoder,
        buf: BytesMut::new(),
        hello_device: None,
        certified: None,
        devices: HashSet::new(),
        signal: None,
        pending_acks: VecDeque::new(),
        data_frames: 0,
        errors: 0,
        rate_window_start: Instant::now(),
        rate_window_frames: 0,
        out: BytesMut::new(),
        shutdown,
        budget_held: 0,
    };
    let reason = connection.run().await;
    // Boxed, like the other rarely-running paths below: an idle connection's task then
    // holds only the small waiting state, not the largest path's locals.
    Box::pin(connection.close(reason)).await;
    shared.connections.dec();
    drop(permit);
}

impl Connection {
    async fn run(&mut self) -> CloseReason {
        if let Some(reason) = Box::pin(self.accept_certificate()).await {
            return reason;
        }
        let settings_idle = self.shared.settings.idle_timeout;
        let mut last_activity = Instant::now();
        // Absolute: heartbeats (or any frame) before a hello do not move it.
        let hello_deadline = last_activity + self.shared.settings.hello_timeout;
        let mut frame_started: Option<Instant> = None;
        // One timer for the connection's life. Activity only moves the deadline later: the
        // timer then fires early once and is re-armed, instead of being registered anew on
        // every frame (the timer wheel's lock is per event otherwise).
        let timer = sleep_until(hello_deadline.min(last_activity + settings_idle));
        tokio::pin!(timer);
        // Likewise the waits for shutdown, revocation and commands live across frames: made
        // anew in every loop, each would join and leave its wait list (a lock each way) per
        // frame.
        let shutdown = self.shutdown.clone();
        let shutdown_wait = shutdown.cancelled();
        tokio::pin!(shutdown_wait);
        let mut close_wait: Option<BoxFuture<'static, ()>> = None;
        let mut commands_wait: Option<BoxFuture<'static, ()>> = None;
        loop {
            if let Some(signal) = &self.signal {
                if close_wait.is_none() {
                    let signal = Arc::clone(signal);
                    close_wait = Some(Box::pin(async move { signal.close_requested().await }));
                }
                if commands_wait.is_none() {
                    let signal = Arc::clone(signal);
                    commands_wait = Some(Box::pin(async move { signal.commands_waiting().await }));
                }
            }
            let mut deadline = match frame_started {
                Some(started) => (started + self.shared.settings.frame_timeout)
                    .min(last_activity + settings_idle),
                None => last_activity + settings_idle,
            };
            if self.devices.is_empty() {
                deadline = deadline.min(hello_deadline);
            }
            if deadline < timer.deadline() {
                timer.as_mut().reset(deadline);
            }
            let can_read = self.pending_acks.len() < MAX_PENDING_ACKS;
            tokio::select! {
                biased;
                () = &mut shutdown_wait => return CloseReason::Shutdown,
                () = wait_for(&mut close_wait) => return CloseReason::Revoked,
                outcome = front_ack(&mut self.pending_acks) => {
                    if let Some(seq) = self.pending_acks.pop_front().map(|(seq, _)| seq) {
                        let reply = match outcome {
                            AckOutcome::Stored => Reply::Ack { seq },
                            AckOutcome::Rejected(reason) => Reply::Nack { seq, reason },
                        };
                        if !Box::pin(self.reply(&reply)).await {
                            return CloseReason::WriteFailed;
                        }
                    }
                }
                () = wait_for(&mut commands_wait) => {
                    commands_wait = None;
                    while let Some(command) = self.shared.services.directory.take_command(self.id) {
                        let reply = Reply::Command { id: &command.id, name: &command.name, params: &command.params };
                        if !Box::pin(self.reply(&reply)).await {
                            return CloseReason::WriteFailed;
                        }
                        if let Some(commands) = &self.shared.services.commands {
                            commands.delivered(&command.device, &command.id).await;
                        }
                    }
                }
                read = self.stream.read_some(&mut self.buf), if can_read => {
                    match read {
                        Ok(0) | Err(_) => return CloseReason::Disconnected,
                        Ok(_) => {
                            last_activity = Instant::now();
                            if let Some(reason) = Box::pin(self.process_buffer()).await {
                                return reason;
                            }
                            if self.decoder.is_mid_frame(&self.buf) {
                                frame_started.get_or_insert(last_activity);
                            } else {
                                frame_started = None;
                            }
                            if self.buf.is_empty() {
                                // Keep a small read buffer for the next frame (a device's
                                // frame that ended the read was copied out, so this one is
                                // free to reuse); release a large one while idle.
                                if self.buf.capacity() > KEEP_IDLE_READ_BUFFER {
                                    self.buf = BytesMut::new();
                                }
                            } else if self.buf.capacity() > SHRINK_ABOVE
                                && self.buf.capacity() / 4 > self.buf.len()
                            {
                                // Same bytes, so the decoder's scan position stays valid.
                                let mut fitting = BytesMut::with_capacity(self.buf.len());
                                fitting.extend_from_slice(&self.buf);
                                self.buf = fitting;
                            }
                            if !self.resize_budget(self.buf.capacity()) {
                                return Box::pin(self.refuse(
                                    CloseReason::FrameBudget,
                                    "the gateway holds too many unfinished frames; finish frames promptly",
                                ))
                                .await;
                            }
                        }
                    }
                }
                () = &mut timer => {
                    let now = Instant::now();
                    if now < deadline {
                        timer.as_mut().reset(deadline);
                        continue;
                    }
                    if frame_started.is_some_and(|started| now >= started + self.shared.settings.frame_timeout) {
                        Box::pin(self.protocol_error("frame_timeout", "frame not completed in time")).await;
                        return CloseReason::FrameTimeout;
                    }
                    if self.devices.is_empty() && now >= hello_deadline {
                        return Box::pin(self.refuse(
                            CloseReason::HelloTimeout,
                            "no hello (or device) within hello_timeout; heartbeats do not count",
                        ))
                        .await;
                    }
                    return CloseReason::Idle;
                }
            }
        }
    }

    /// Decodes and handles every complete frame in the buffer.
    async fn process_buffer(&mut self) -> Option<CloseReason> {
        loop {
            let frame = match self.decoder.decode(&mut self.buf) {
                Ok(Some(frame)) => frame,
                Ok(None) => return None,
                Err(err) => {
                    if self.awaiting_hello() {
                        return Some(
                            self.refuse(
                                CloseReason::UnauthenticatedFrame,
                                "frame over unauthenticated_max_frame before a hello",
                            )
                            .await,
                        );
                    }
                    let fatal = err.is_fatal();
                    if let Some(reason) = self.protocol_error(err.reason(), &err.to_string()).await
                    {
                        return Some(reason);
                    }
                    if fatal {
                        return Some(CloseReason::FatalFrame);
                    }
                    continue;
                }
            };
            self.throttle().await;
            if let Some(reason) = self.handle_frame(frame).await {
                return Some(reason);
            }
        }
    }

    /// Waits when the device is above `max_frames_per_second`: it is slowed, never dropped.
    async fn throttle(&mut self) {
        let limit = self.shared.settings.max_frames_per_second;
        if limit == 0 {
            return;
        }
        let now = Instant::now();
        if now >= self.rate_window_start + Duration::from_secs(1) {
            self.rate_window_start = now;
            self.rate_window_frames = 0;
        }
        self.rate_window_frames += 1;
        if self.rate_window_frames > limit {
            let resume = self.rate_window_start + Duration::from_secs(1);
            sleep_until(resume).await;
            self.rate_window_start = resume;
            self.rate_window_frames = 1;
        }
    }

    async fn handle_frame(&mut self, frame: Bytes) -> Option<CloseReason> {
        let allow_binary = self.shared.settings.framing == fieldgate_codec::Framing::LengthPrefixed;
        let message = match parse_message(&frame, allow_binary) {
            Ok(message) => message,
            Err(err) => return self.protocol_error(err.code(), &err.to_string()).await,
        };
        let mut command_id = None;
        let (device, kind, seq, device_time_ms, format) = match message {
            DeviceMessage::Hello { device, token } => {
                return self.hello(&device, token.as_deref()).await;
            }
            DeviceMessage::Heartbeat => return None,
            DeviceMessage::Data {
                device,
                kind,
                seq,
                device_time_ms,
            } => (device, kind, seq, device_time_ms, PayloadFormat::Json),
            DeviceMessage::CommandResult { device, seq, id } => {
                command_id = Some(id.into_owned());
                (
                    device,
                    EventKind::CommandResult,
                    seq,
                    None,
                    PayloadFormat::Json,
                )
            }
            DeviceMessage::Binary => (
                None,
                EventKind::Telemetry,
                None,
                None,
                PayloadFormat::Binary,
            ),
        };
        let device = match self.resolve_device(device.as_deref()).await {
            Ok(device) => device,
            Err(close) => return close,
        };
        self.data_frames += 1;
        let seq = seq.unwrap_or(self.data_frames);
        if let Some(registry) = &self.shared.services.registry {
            registry.record_message(device.as_str(), frame.len() as u64, now_ms());
        }
        if let (Some(commands), Some(command_id)) = (&self.shared.services.commands, &command_id) {
            commands.result(&device, command_id, &frame).await;
        }
        let mut event = Event::new(
            device,
            kind,
            Arc::clone(&self.shared.settings.name),
            now_ms(),
            format,
            frame,
        );
        event.device_time_ms = device_time_ms;
        self.shared.received.inc();
        // A full buffer under `block` holds us here; shutdown and revocation must still
        // get through. An event cut off mid-send was not acked: the device sends it again.
        let waiter = tokio::select! {
            biased;
            waiter = self.shared.output.send(event, self.shared.settings.ack) => waiter,
            _ = self.shutdown.cancelled() => return Some(CloseReason::Shutdown),
            () = close_requested(self.signal.as_deref()) => return Some(CloseReason::Revoked),
        };
        if let Some(waiter) = waiter {
            self.pending_acks.push_back((seq, waiter));
        }
        None
    }

    /// Decides whose message this is. `Err(None)` = rejected but keep the connection.
    async fn resolve_device(
        &mut self,
        named: Option<&str>,
    ) -> Result<DeviceId, Option<CloseReason>> {
        match (named, &self.hello_device) {
            (Some(named), Some(hello)) if named != hello.as_str() => Err(self
                .protocol_error(
                    "device_mismatch",
                    "message names another device than the hello",
                )
                .await),
            (_, Some(hello)) => Ok(hello.clone()),
            (None, None) => Err(self
                .protocol_error("missing_device", "send a hello or a \"device\" field")
                .await),
            (Some(named), None) => {
                if self.shared.settings.auth != AuthMode::None {
                    self.auth_failed("a hello with a token is required first")
                        .await;
                    return Err(Some(CloseReason::Unauthorized));
                }
                // Known on this connection: the codec validated it, and no new allocation.
                if let Some(known) = self.devices.get(named) {
                    return Ok(known.clone());
                }
                if let Err(err) = validate_device_id(named) {
                    return Err(self.protocol_error(err.code(), &err.to_string()).await);
                }
                if self.devices.len() >= MAX_DEVICES_PER_CONNECTION {
                    return Err(self
                        .protocol_error("invalid_field", "too many devices on one connection")
                        .await);
                }
                let device = DeviceId::new(named);
                self.register(device.clone()).await;
                Ok(device)
            }
        }
    }

    async fn hello(&mut self, device: &str, token: Option<&str>) -> Option<CloseReason> {
        if let Err(err) = validate_device_id(device) {
            return self.protocol_error(err.code(), &err.to_string()).await;
        }
        if let Err(reason) = self.authenticate(device, token) {
            self.auth_failed(reason).await;
            return Some(CloseReason::Unauthorized);
        }
        let device = DeviceId::new(device);
        self.decoder.set_max_frame(self.shared.settings.max_frame);
        if self.hello_device.as_ref() != Some(&device) {
            self.hello_device = Some(device.clone());
            if !self.devices.contains(&device) {
                self.register(device.clone()).await;
            }
        }
        if self
            .reply(&Reply::Welcome {
                device: device.as_str(),
            })
            .await
        {
            None
        } else {
            Some(CloseReason::WriteFailed)
        }
    }

    /// Under `auth = "registry"`, a client certificate whose common name is a registered,
    /// unrevoked device authenticates the connection as that device: no hello needed.
    async fn accept_certificate(&mut self) -> Option<CloseReason> {
        if self.shared.settings.auth != AuthMode::Registry {
            return None;
        }
        let name = self.stream.certified_name()?;
        let registry = self.shared.services.registry.as_ref()?;
        let valid =
            validate_device_id(&name).is_ok() && registry.authenticate_certificate(&name).is_ok();
        if !valid {
            self.auth_failed("the client certificate names no registered device")
                .await;
            return Some(CloseReason::Unauthorized);
        }
        let device = DeviceId::new(&name);
        self.decoder.set_max_frame(self.shared.settings.max_frame);
        self.certified = Some(device.clone());
        self.hello_device = Some(device.clone());
        self.register(device).await;
        None
    }

    /// Checks a hello's credentials under the source's auth mode, with growing delays
    /// after failures per peer address and per (device, peer address).
    fn authenticate(&self, device: &str, token: Option<&str>) -> Result<(), &'static str> {
        let services = &self.shared.services;
        let settings = &self.shared.settings;
        let now = services.uptime();
        let peer = self.peer.ip();
        if settings.auth == AuthMode::None
            || self
                .certified
                .as_ref()
                .is_some_and(|certified| certified.as_str() == device)
        {
            return Ok(());
        }
        if services.throttle.check(peer, Some(device), now).is_err() {
            return Err("too many failed attempts; retry later");
        }
        let valid = match (settings.auth, token) {
            (_, None) => false,
            (AuthMode::Token, Some(token)) => settings
                .tokens
                .iter()
                .any(|known| constant_time_eq(known.as_bytes(), token.as_bytes())),
            (AuthMode::Registry, Some(token)) => match &services.registry {
                // A JWT has two dots; anything else is the device secret.
                Some(registry) if token.matches('.').count() == 2 => registry
                    .authenticate_jwt(token)
                    .is_ok_and(|subject| subject == device),
                Some(registry) => registry.authenticate_secret(device, token).is_ok(),
                None => false,
            },
            (AuthMode::None, Some(_)) => true,
        };
        if valid {
            services.throttle.success(peer, Some(device));
            Ok(())
        } else {
            services.throttle.failure(peer, Some(device), now);
            Err("invalid credentials")
        }
    }

    /// Resizes this connection's share of the partial frame budget to `wanted` bytes;
    /// false when the budget is exhausted.
    fn resize_budget(&mut self, wanted: usize) -> bool {
        wanted == self.budget_held
            || self
                .shared
                .services
                .frame_budget
                .resize(&mut self.budget_held, wanted)
    }

    /// Whether the source wants a hello and none has authenticated this connection yet.
    fn awaiting_hello(&self) -> bool {
        self.shared.settings.auth != AuthMode::None && self.hello_device.is_none()
    }

    /// Ends the connection for a defence: counted by reason, logged, answered with an
    /// error frame whose code is the reason.
    async fn refuse(&mut self, reason: CloseReason, message: &str) -> CloseReason {
        self.shared
            .metrics
            .refused(&self.shared.settings.name, reason.as_str());
        tracing::warn!(
            reason = reason.as_str(),
            held = self.buf.len(),
            "connection closed by a defence"
        );
        self.buf = BytesMut::new();
        self.resize_budget(0);
        let _sent = self
            .reply(&Reply::Error {
                code: reason.as_str(),
                message,
            })
            .await;
        reason
    }

    /// Makes the device reachable for commands and announces it online.
    async fn register(&mut self, device: DeviceId) {
        let signal = self.signal.get_or_insert_with(Arc::default);
        let services = &self.shared.services;
        services.directory.register(device.clone(), self.id, signal);
        if let Some(registry) = &services.registry {
            registry.record_connected(device.as_str(), now_ms());
        }
        if self.devices.is_empty() {
            // Name the connection's span after its (first) device: every later line says whose it is.
            tracing::Span::current().record("device", device.as_str());
        }
        self.devices.insert(device.clone());
        tracing::info!(device = %device, "device online");
        self.status_event(
            device.clone(),
            Bytes::from_static(br#"{"status":"online"}"#),
        )
        .await;
        if let Some(commands) = &self.shared.services.commands {
            commands.deliver_pending(&device).await;
        }
    }

    async fn status_event(&self, device: DeviceId, payload: Bytes) {
        let event = Event::new(
            device,
            EventKind::Status,
            Arc::clone(&self.shared.settings.name),
            now_ms(),
            PayloadFormat::Json,
            payload,
        );
        // Status is not acked to anyone. A buffer full under `block` must not keep a
        // closing connection (or shutdown) waiting forever: give up after a while.
        let sent =
            tokio::time::timeout(STATUS_SEND_TIMEOUT, self.shared.output.send(event, false)).await;
        if sent.is_err() {
            tracing::warn!("status event not buffered: the pipeline is full");
        }
    }

    async fn auth_failed(&mut self, message: &str) {
        self.shared
            .metrics
            .auth_failures
            .get_or_create(&crate::telemetry::Metrics::source(
                &self.shared.settings.name,
            ))
            .inc();
        tracing::warn!(message, "device authentication failed");
        let _sent = self
            .reply(&Reply::Error {
                code: "unauthorized",
                message,
            })
            .await;
    }

    /// Counts and answers a protocol error; `Some` when the connection must close.
    async fn protocol_error(&mut self, code: &'static str, message: &str) -> Option<CloseReason> {
        let labels = ParseLabels {
            source: self.shared.settings.name.to_string(),
            reason: code.to_owned(),
        };
        self.shared
            .metrics
            .parse_failures
            .get_or_create(&labels)
            .inc();
        tracing::debug!(code, message, "protocol error");
        self.errors += 1;
        if !self.reply(&Reply::Error { code, message }).await {
            return Some(CloseReason::WriteFailed);
        }
        if self.errors >= self.shared.settings.max_errors {
            tracing::info!(
                errors = self.errors,
                "closing connection after too many protocol errors"
            );
            let _sent = self
                .reply(&Reply::Error {
                    code: "too_many_errors",
                    message: "too many protocol errors; closing",
                })
                .await;
            return Some(CloseReason::TooManyErrors);
        }
        None
    }

    /// Writes one reply frame; false when the device cannot be written to.
    async fn reply(&mut self, reply: &Reply<'_>) -> bool {
        self.out.clear();
        encode_reply(self.shared.settings.framing, reply, &mut self.out);
        let written = tokio::time::timeout(WRITE_TIMEOUT, self.stream.write_all(&self.out)).await;
        if self.out.capacity() > 4096 {
            self.out = BytesMut::new();
        }
        matches!(written, Ok(Ok(())))
    }

    /// Answers what can still be answered, unregisters the devices, reports them offline.
    async fn close(&mut self, reason: CloseReason) {
        if matches!(reason, CloseReason::Shutdown | CloseReason::Disconnected) {
            // Acks for events already handed to the pipeline: answer them if they resolve
            // quickly, so a device does not resend what is stored.
            while let Some((seq, waiter)) = self.pending_acks.pop_front() {
                let Ok(outcome) = tokio::time::timeout(Duration::from_secs(1), waiter).await else {
                    break;
                };
                let reply = match outcome {
                    AckOutcome::Stored => Reply::Ack { seq },
                    AckOutcome::Rejected(reason) => Reply::Nack { seq, reason },
                };
                if !Box::pin(self.reply(&reply)).await {
                    break;
                }
            }
        }
        self.stream.shutdown().await;
        self.shared.services.directory.forget_connection(self.id);
        for device in std::mem::take(&mut self.devices) {
            self.shared.services.directory.unregister(&device, self.id);
            if let Some(registry) = &self.shared.services.registry {
                registry.record_disconnected(device.as_str(), now_ms());
            }
            tracing::info!(device = %device, reason = reason.as_str(), "device offline");
            let payload = format!(r#"{{"status":"offline","reason":"{}"}}"#, reason.as_str());
            self.status_event(device, Bytes::from(payload)).await;
        }
    }
}

/// Resolves with the oldest pending ack's outcome; never resolves when none is pending.
async fn front_ack(pending: &mut VecDeque<(u64, AckWaiter)>) -> AckOutcome {
    match pending.front_mut() {
        Some((_, waiter)) => waiter.await,
        None => std::future::pending().await,
    }
}

/// Resolves when `wait` does; never when there is none (no device registered yet).
async fn wait_for(wait: &mut Option<BoxFuture<'static, ()>>) {
    match wait {
        Some(wait) => wait.await,
        None => std::future::pending().await,
    }
}

/// Resolves when the directory closes this connection; never before a device registered.
async fn close_requested(signal: Option<&ConnectionSignal>) {
    match signal {
        Some(signal) => signal.close_requested().await,
        None => std::future::pending().await,
    }
}

/// Compares secrets without revealing where they differ through timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
