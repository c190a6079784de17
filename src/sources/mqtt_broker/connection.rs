//! One MQTT client connection: CONNECT and authentication, then packets both ways
//! until it closes.
//!
//! Invariants: a PUBACK (QoS 1) or PUBREC (QoS 2) for a publish that became a pipeline
//! event is written only once the event is in every target buffer, and acks go out in
//! the order the publishes arrived (3.1.1 §4.6); while `max_inflight` events wait for
//! the pipeline the connection stops reading; a QoS 2 resend whose id awaits PUBREL (or
//! its PUBREC) is not delivered again; nothing larger than the client's Maximum Packet
//! Size is sent to it; no read buffer is held while idle; a client silent for 1.5x its
//! keep alive is closed and its will published.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fieldgate_broker::codec::{
    self, AckKind, ConnAckProperties, ConnectCode, DecodeError, Inbound, PublishOut, Version, Will,
};
use fieldgate_broker::session::Outgoing;
use fieldgate_broker::topic::validate_name;
use fieldgate_broker::{Connect, Message, Publish, SessionParams};
use fieldgate_codec::validate_device_id;
use fieldgate_core::{DeviceId, Event, EventKind, PayloadFormat};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::acl::{Acl, commands_topic, results_topic};
use super::{BrokerShared, ConnectionSignal};
use crate::clock::now_ms;
use crate::devices::directory::ConnectionSignal as DeviceSignal;
use crate::pipeline::{AckOutcome, AckWaiter};
use crate::sources::tcp::AuthMode;
use crate::sources::tcp::stream::DeviceStream;
use crate::telemetry::metrics::ParseLabels;

/// A client that does not read what we send for this long is disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a status event may wait for room in the pipeline.
const STATUS_SEND_TIMEOUT: Duration = Duration::from_secs(1);
/// Packets taken from the session per wake-up before reading again.
const SEND_BATCH: usize = 256;
/// Packets handled from one read before the connection yields to the others.
const YIELD_EVERY: usize = 32;
/// Longest client id accepted.
const MAX_CLIENT_ID: usize = 256;

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// DISCONNECT with reason 0x00 (will suppressed).
    Normal,
    /// DISCONNECT 0x04: publish the will.
    NormalWithWill,
    /// The socket closed or failed without DISCONNECT.
    Lost,
    /// Keep alive expired.
    KeepAlive,
    /// A protocol violation, with the v5 reason code sent.
    Violation(u8),
    /// Taken over by a new connection with the same client id.
    TakenOver,
    /// The device was revoked.
    Revoked,
    /// The gateway is stopping.
    Shutdown,
}

impl Close {
    fn as_str(self) -> &'static str {
        match self {
            Close::Normal | Close::NormalWithWill => "disconnected",
            Close::Lost => "connection_lost",
            Close::KeepAlive => "keepalive_timeout",
            Close::Violation(_) => "protocol_error",
            Close::TakenOver => "session_taken_over",
            Close::Revoked => "revoked",
            Close::Shutdown => "shutdown",
        }
    }

    fn publishes_will(self) -> bool {
        !matches!(self, Close::Normal | Close::Shutdown)
    }
}

/// This connection's share of the gateway-wide partial frame budget (bytes of unfinished
/// packets all device connections together may hold); given back on drop.
struct BudgetShare {
    shared: Arc<BrokerShared>,
    held: usize,
}

impl BudgetShare {
    /// Resizes the share to `bytes`; false when the budget is exhausted.
    fn fit(&mut self, bytes: usize) -> bool {
        bytes == self.held
            || self
                .shared
                .services
                .frame_budget
                .resize(&mut self.held, bytes)
    }
}

impl Drop for BudgetShare {
    fn drop(&mut self) {
        self.shared.services.frame_budget.release(&mut self.held);
    }
}

/// An inbound QoS 1/2 publish waiting to be acknowledged, in arrival order.
struct PendingAck {
    id: u16,
    qos: u8,
    /// `None`: nothing to wait for (acknowledged as soon as it is first in line).
    waiter: Option<AckWaiter>,
    /// A refusal decided on receipt (v5 reason code).
    refused: Option<u8>,
}

struct Connection {
    shared: Arc<BrokerShared>,
    stream: DeviceStream,
    id: u64,
    version: Version,
    client: Arc<str>,
    /// The device a registry client authenticated as.
    device: Option<DeviceId>,
    acl: Acl,
    keep_alive: Option<Duration>,
    will: Option<Will>,
    session_expiry: u32,
    connect_expiry_zero: bool,
    /// The client's Maximum Packet Size.
    client_max_packet: Option<u32>,
    aliases: HashMap<u16, String>,
    pending: VecDeque<PendingAck>,
    /// QoS 2 ids in `pending` (a resend of one is not delivered again).
    pending_qos2: HashSet<u16>,
    signal: Arc<ConnectionSignal>,
    device_signal: Option<Arc<DeviceSignal>>,
    buf: BytesMut,
    budget: BudgetShare,
    out: BytesMut,
    shutdown: CancellationToken,
}

/// Serves one connection until it closes or `shutdown` fires.
pub async fn serve(
    shared: Arc<BrokerShared>,
    mut stream: DeviceStream,
    peer: std::net::SocketAddr,
    id: u64,
    shutdown: CancellationToken,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    shared.connections.inc();
    let mut buf = BytesMut::new();
    let mut budget = BudgetShare {
        shared: Arc::clone(&shared),
        held: 0,
    };
    let connect = tokio::time::timeout(
        shared.settings.connect_timeout,
        read_connect(&shared, &mut stream, &mut buf, &mut budget),
    )
    .await;
    match connect {
        Ok(Some(connect)) => {
            let read = (buf, budget);
            if let Some(connection) =
                Box::pin(accept(&shared, stream, peer, id, *connect, read, shutdown)).await
            {
                let mut connection = connection;
                let close = connection.run().await;
                Box::pin(connection.close(close)).await;
            }
        }
        Ok(None) => {}
        Err(_) => {
            shared
                .metrics
                .refused(&shared.settings.name, "connect_timeout");
            tracing::info!("no CONNECT within connect_timeout");
        }
    }
    shared.connections.dec();
    drop(permit);
}

fn count_error(shared: &BrokerShared, reason: &str) {
    shared
        .metrics
        .parse_failures
        .get_or_create(&ParseLabels {
            source: shared.settings.name.to_string(),
            reason: reason.to_owned(),
        })
        .inc();
}

/// Reads until a CONNECT is decoded; answers what can be answered and returns `None`
/// when the connection must close.
async fn read_connect(
    shared: &BrokerShared,
    stream: &mut DeviceStream,
    buf: &mut BytesMut,
    budget: &mut BudgetShare,
) -> Option<Box<Connect>> {
    loop {
        match codec::decode(buf, None, shared.settings.max_packet_size) {
            Ok(Some(Inbound::Connect(connect))) => return Some(connect),
            Ok(Some(_)) => return None,
            Ok(None) => {}
            Err(err) => {
                count_error(shared, "malformed_connect");
                tracing::info!(error = %err, "CONNECT refused");
                if let DecodeError::UnsupportedVersion(_) = err {
                    let mut out = BytesMut::new();
                    if codec::encode_connack(
                        &mut out,
                        Version::V311,
                        false,
                        ConnectCode::UnsupportedVersion,
                        None,
                    )
                    .is_ok()
                    {
                        let _written =
                            tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&out)).await;
                    }
                }
                return None;
            }
        }
        match stream.read_some(buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        if !budget.fit(buf.capacity()) {
            shared
                .metrics
                .refused(&shared.settings.name, "partial_frame_budget");
            tracing::warn!("CONNECT refused: the partial frame budget is exhausted");
            return None;
        }
    }
}

/// Checks a CONNECT; on success attaches the session, sends CONNACK and returns the
/// connection.
async fn accept(
    shared: &Arc<BrokerShared>,
    mut stream: DeviceStream,
    peer: std::net::SocketAddr,
    id: u64,
    connect: Connect,
    (mut buf, mut budget): (BytesMut, BudgetShare),
    shutdown: CancellationToken,
) -> Option<Connection> {
    if buf.is_empty() {
        // Idle after CONNECT: no read buffer, no share of the budget.
        buf = BytesMut::new();
        budget.fit(0);
    }
    let version = connect.version;
    let settings = &shared.settings;
    let refuse = |code: ConnectCode| {
        let mut out = BytesMut::new();
        let _encoded = codec::encode_connack(&mut out, version, false, code, None);
        out
    };
    let certified = stream.certified_name();
    let verdict = check_connect(shared, &connect, peer, certified.as_deref());
    let (client, device) = match verdict {
        Ok(ok) => ok,
        Err(code) => {
            if matches!(
                code,
                ConnectCode::BadCredentials | ConnectCode::NotAuthorized
            ) {
                shared
                    .metrics
                    .auth_failures
                    .get_or_create(&crate::telemetry::Metrics::source(&settings.name))
                    .inc();
            }
            tracing::info!(?code, "CONNECT refused");
            let out = refuse(code);
            let _written = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&out)).await;
            return None;
        }
    };
    if shutdown.is_cancelled() {
        let out = refuse(ConnectCode::ServerUnavailable);
        let _written = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&out)).await;
        return None;
    }
    let assigned = connect.client_id.is_empty();
    let client: Arc<str> = if assigned {
        Arc::from(format!("fieldgate-{id}"))
    } else {
        Arc::from(client)
    };
    tracing::Span::current().record("client", &*client);
    let requested_expiry = match connect.session_expiry {
        Some(expiry) => expiry,
        None if connect.clean_start => 0,
        None => settings.max_session_expiry,
    };
    let session_expiry = requested_expiry.min(settings.max_session_expiry);
    let signal = Arc::new(ConnectionSignal::default());
    shared.attach(id, Arc::clone(&signal));
    let outcome = shared.broker().connect(&SessionParams {
        client_id: Arc::clone(&client),
        connection: id,
        clean_start: connect.clean_start,
        session_expiry,
        receive_maximum: connect.receive_maximum,
    });
    if let Some(old) = outcome.taken_over {
        tracing::info!(old, "session taken over");
        shared.evict(old);
    }
    let acl = match &device {
        Some(device) => Acl::device(device.as_str(), &settings.device_topic),
        None => Acl::Open,
    };
    let mut connection = Connection {
        shared: Arc::clone(shared),
        stream,
        id,
        version,
        client,
        device,
        acl,
        keep_alive: (connect.keep_alive > 0)
            .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500)),
        will: connect.will,
        session_expiry,
        connect_expiry_zero: connect.session_expiry == Some(0),
        client_max_packet: connect.max_packet_size,
        aliases: HashMap::new(),
        pending: VecDeque::new(),
        pending_qos2: HashSet::new(),
        signal,
        device_signal: None,
        buf,
        budget,
        out: BytesMut::new(),
        shutdown,
    };
    let properties = ConnAckProperties {
        assigned_client_id: assigned.then(|| connection.client.to_string()),
        receive_maximum: settings.max_inflight,
        max_packet_size: u32::try_from(settings.max_packet_size).unwrap_or(u32::MAX),
        topic_alias_maximum: settings.topic_alias_maximum,
        session_expiry: (session_expiry != requested_expiry).then_some(session_expiry),
        retain_available: true,
    };
    let mut out = BytesMut::new();
    if codec::encode_connack(
        &mut out,
        version,
        outcome.session_present,
        ConnectCode::Success,
        Some(&properties),
    )
    .is_err()
        || !connection.write(&out).await
    {
        connection.close(Close::Lost).await;
        return None;
    }
    tracing::info!(
        version = ?version,
        session_present = outcome.session_present,
        "MQTT client connected"
    );
    if connection.device.is_some() {
        connection.register_device().await;
    }
    for packet in outcome.resend {
        if !connection.send_outgoing(packet).await {
            connection.close(Close::Lost).await;
            return None;
        }
    }
    connection.signal.wake.notify_one();
    Some(connection)
}

/// Client id and credentials under the source's auth mode.
fn check_connect(
    shared: &BrokerShared,
    connect: &Connect,
    peer: std::net::SocketAddr,
    certified: Option<&str>,
) -> Result<(String, Option<DeviceId>), ConnectCode> {
    let settings = &shared.settings;
    if connect.authentication_method.is_some() {
        return Err(ConnectCode::BadAuthenticationMethod);
    }
    if connect.client_id.is_empty() && connect.version == Version::V311 && !connect.clean_start {
        return Err(ConnectCode::BadClientId);
    }
    if connect.client_id.len() > MAX_CLIENT_ID || connect.client_id.contains('\0') {
        return Err(ConnectCode::BadClientId);
    }
    if let Some(will) = &connect.will {
        if validate_name(&will.message.topic, settings.topic_limits).is_err() {
            return Err(ConnectCode::ProtocolError);
        }
    }
    let services = &shared.services;
    let device = match settings.auth {
        AuthMode::None => None,
        AuthMode::Token => {
            let valid = connect.password.as_deref().is_some_and(|password| {
                settings
                    .tokens
                    .iter()
                    .any(|token| constant_time_eq(token.as_bytes(), password.as_bytes()))
            });
            if !valid {
                return Err(ConnectCode::BadCredentials);
            }
            None
        }
        AuthMode::Registry => {
            let now = services.uptime();
            // A verified client certificate whose common name is a registered device
            // authenticates as that device (the user name, if any, must agree).
            if let Some(name) = certified {
                let agrees = connect.username.as_deref().is_none_or(|user| user == name);
                if agrees
                    && connect.password.is_none()
                    && validate_device_id(name).is_ok()
                    && services
                        .registry
                        .as_ref()
                        .is_some_and(|registry| registry.authenticate_certificate(name).is_ok())
                {
                    return finish_connect(shared, connect, Some(DeviceId::new(name)));
                }
            }
            let Some(username) = connect.username.as_deref() else {
                return Err(ConnectCode::BadCredentials);
            };
            if validate_device_id(username).is_err() {
                return Err(ConnectCode::BadCredentials);
            }
            if services
                .throttle
                .check(peer.ip(), Some(username), now)
                .is_err()
            {
                return Err(ConnectCode::ConnectionRateExceeded);
            }
            let valid = match (&services.registry, connect.password.as_deref()) {
                (Some(registry), Some(token)) if token.matches('.').count() == 2 => registry
                    .authenticate_jwt(token)
                    .is_ok_and(|subject| subject == username),
                (Some(registry), Some(secret)) => {
                    registry.authenticate_secret(username, secret).is_ok()
                }
                _ => false,
            };
            if !valid {
                services.throttle.failure(peer.ip(), Some(username), now);
                return Err(ConnectCode::BadCredentials);
            }
            services.throttle.success(peer.ip(), Some(username));
            Some(DeviceId::new(username))
        }
    };
    finish_connect(shared, connect, device)
}

/// The will's ACL check for an authenticated device, then the accepted identity.
fn finish_connect(
    shared: &BrokerShared,
    connect: &Connect,
    device: Option<DeviceId>,
) -> Result<(String, Option<DeviceId>), ConnectCode> {
    if let (Some(device), Some(will)) = (&device, &connect.will) {
        if !Acl::device(device.as_str(), &shared.settings.device_topic)
            .may_publish(&will.message.topic)
        {
            return Err(ConnectCode::NotAuthorized);
        }
    }
    Ok((connect.client_id.clone(), device))
}

impl Connection {
    /// Serves the connection until it must close. Every branch but the waits is boxed:
    /// an idle connection's task then holds only the small waiting state, not the
    /// largest path's locals (the pipeline hand-off, encoding).
    async fn run(&mut self) -> Close {
        let mut last_read = Instant::now();
        loop {
            let can_read = self.pending.len() < usize::from(self.shared.settings.max_inflight);
            // While the pipeline holds us back, the client's packets wait in the socket:
            // its silence is ours, not its.
            if !can_read {
                last_read = Instant::now();
            }
            let keep_alive_deadline = self.keep_alive.map(|keep_alive| last_read + keep_alive);
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    Box::pin(self.disconnect_with(0x8B)).await;
                    return Close::Shutdown;
                }
                () = self.signal.evict.notified() => {
                    Box::pin(self.disconnect_with(0x8E)).await;
                    return Close::TakenOver;
                }
                () = revoked(self.device_signal.as_deref()) => {
                    Box::pin(self.disconnect_with(0x98)).await;
                    return Close::Revoked;
                }
                outcome = front_ack(&mut self.pending) => {
                    if let Some(close) = Box::pin(self.answer_front(outcome)).await {
                        return close;
                    }
                    // Packets held back at the in-flight bound.
                    if !self.buf.is_empty() {
                        if let Some(close) = Box::pin(self.process_buffer()).await {
                            return close;
                        }
                    }
                }
                () = commands_waiting(self.device_signal.as_deref()) => Box::pin(self.deliver_commands()).await,
                () = self.signal.wake.notified() => {
                    if !Box::pin(self.flush_session()).await {
                        return Close::Lost;
                    }
                }
                read = self.stream.read_some(&mut self.buf), if can_read => {
                    match read {
                        Ok(0) | Err(_) => return Close::Lost,
                        Ok(_) => {
                            last_read = Instant::now();
                            if let Some(close) = Box::pin(self.process_buffer()).await {
                                return close;
                            }
                            if self.buf.is_empty() {
                                self.buf = BytesMut::new();
                            }
                            if !self.budget.fit(self.buf.capacity()) {
                                self.shared
                                    .metrics
                                    .refused(&self.shared.settings.name, "partial_frame_budget");
                                tracing::warn!("closed: the partial frame budget is exhausted");
                                Box::pin(self.disconnect_with(0x97)).await;
                                return Close::Violation(0x97);
                            }
                        }
                    }
                }
                () = sleep_until_opt(keep_alive_deadline) => {
                    tracing::info!("keep alive expired");
                    Box::pin(self.disconnect_with(0x8D)).await;
                    return Close::KeepAlive;
                }
            }
        }
    }

    /// Sends a v5 DISCONNECT with `reason` (nothing on 3.1.1).
    async fn disconnect_with(&mut self, reason: u8) {
        let mut out = BytesMut::new();
        if codec::encode_disconnect(&mut out, self.version, reason).is_ok() && !out.is_empty() {
            let _written = self.write(&out).await;
        }
    }

    /// A protocol violation: DISCONNECT with `reason` on v5, then close.
    async fn violation(&mut self, reason: u8) -> Option<Close> {
        self.disconnect_with(reason).await;
        Some(Close::Violation(reason))
    }

    async fn process_buffer(&mut self) -> Option<Close> {
        let mut handled = 0usize;
        loop {
            // A burst of packets in one read must not starve the subscribers it feeds:
            // every so often let the other connections run.
            handled += 1;
            if handled % YIELD_EVERY == 0 {
                tokio::task::yield_now().await;
            }
            // At the bound, the rest waits in the buffer (and the socket) until the
            // pipeline acknowledges: backpressure, not an error (3.1.1 has no quota).
            if self.pending.len() >= usize::from(self.shared.settings.max_inflight) {
                return None;
            }
            let packet = match codec::decode(
                &mut self.buf,
                Some(self.version),
                self.shared.settings.max_packet_size,
            ) {
                Ok(Some(packet)) => packet,
                Ok(None) => return None,
                Err(err) => {
                    count_error(&self.shared, "malformed_packet");
                    tracing::info!(error = %err, "closing on a bad packet");
                    self.buf = BytesMut::new();
                    return self.violation(err.reason_code()).await;
                }
            };
            if let Some(close) = self.handle(packet).await {
                return Some(close);
            }
        }
    }

    async fn handle(&mut self, packet: Inbound) -> Option<Close> {
        let now = self.shared.now_ms();
        match packet {
            Inbound::Connect(_) => self.violation(0x82).await,
            Inbound::Publish(publish) => self.publish(publish).await,
            Inbound::PubAck { id } => {
                let acked = self.shared.broker().puback(&self.client, self.id, id);
                self.after_ack(acked.map(|()| false), id).await
            }
            Inbound::PubRec { id, reason } => {
                let acked = self
                    .shared
                    .broker()
                    .pubrec(&self.client, self.id, id, reason >= 0x80);
                self.after_ack(acked, id).await
            }
            Inbound::PubComp { id } => {
                let acked = self.shared.broker().pubcomp(&self.client, self.id, id);
                self.after_ack(acked.map(|()| false), id).await
            }
            Inbound::PubRel { id } => {
                let known = self
                    .shared
                    .broker()
                    .release_qos2(&self.client, self.id, id)
                    .unwrap_or(false);
                let reason = if known { 0x00 } else { 0x92 };
                self.ack(AckKind::PubComp, id, reason).await
            }
            Inbound::Subscribe {
                id,
                subscription_id,
                filters,
            } => {
                let acl = self.acl.clone();
                let authorized = move |filter: &str| acl.may_subscribe(filter);
                let result = self.shared.broker().subscribe(
                    &self.client,
                    self.id,
                    subscription_id,
                    &filters,
                    &authorized,
                    now,
                );
                let codes = match result {
                    Ok((codes, _)) => codes,
                    Err(fieldgate_broker::broker::BrokerError::NotOwner) => {
                        return Some(Close::TakenOver);
                    }
                    Err(_) => return self.violation(0x82).await,
                };
                let mut out = BytesMut::new();
                if codec::encode_suback(&mut out, self.version, id, &codes).is_err()
                    || !self.write(&out).await
                {
                    return Some(Close::Lost);
                }
                self.flush_session()
                    .await
                    .then_some(())
                    .map_or(Some(Close::Lost), |()| None)
            }
            Inbound::Unsubscribe { id, filters } => {
                let Ok(codes) = self
                    .shared
                    .broker()
                    .unsubscribe(&self.client, self.id, &filters)
                else {
                    return Some(Close::TakenOver);
                };
                let mut out = BytesMut::new();
                if codec::encode_unsuback(&mut out, self.version, id, &codes).is_err()
                    || !self.write(&out).await
                {
                    return Some(Close::Lost);
                }
                None
            }
            Inbound::PingReq => {
                let mut out = BytesMut::new();
                if codec::encode_pingresp(&mut out, self.version).is_err()
                    || !self.write(&out).await
                {
                    return Some(Close::Lost);
                }
                None
            }
            Inbound::Disconnect {
                reason,
                session_expiry,
            } => {
                if let Some(expiry) = session_expiry {
                    if self.connect_expiry_zero && expiry != 0 {
                        return self.violation(0x82).await;
                    }
                    self.session_expiry = expiry.min(self.shared.settings.max_session_expiry);
                }
                Some(if reason == 0x04 {
                    Close::NormalWithWill
                } else {
                    Close::Normal
                })
            }
        }
    }

    /// After an ack from the client: an unknown id is logged (a late ack after a
    /// resend); a PUBREL follows an accepted PUBREC; the window may have opened.
    async fn after_ack(
        &mut self,
        acked: Result<bool, fieldgate_broker::broker::BrokerError>,
        id: u16,
    ) -> Option<Close> {
        match acked {
            Ok(true) => {
                if let Some(close) = self.ack(AckKind::PubRel, id, 0).await {
                    return Some(close);
                }
            }
            Ok(false) => {}
            Err(fieldgate_broker::broker::BrokerError::NotOwner) => return Some(Close::TakenOver),
            Err(err) => tracing::debug!(error = %err, id, "acknowledgement ignored"),
        }
        if self.flush_session().await {
            None
        } else {
            Some(Close::Lost)
        }
    }

    async fn ack(&mut self, kind: AckKind, id: u16, reason: u8) -> Option<Close> {
        let mut out = BytesMut::new();
        if codec::encode_ack(&mut out, self.version, kind, id, reason).is_err()
            || !self.write(&out).await
        {
            return Some(Close::Lost);
        }
        None
    }

    /// An inbound PUBLISH: resolve the alias, check, route to subscribers, hand to the
    /// pipeline when it matches `device_topic`, queue its acknowledgement.
    async fn publish(&mut self, mut publish: Publish) -> Option<Close> {
        if publish.has_subscription_ids {
            return self.violation(0x82).await;
        }
        if let Some(alias) = publish.topic_alias {
            if alias == 0 || alias > self.shared.settings.topic_alias_maximum {
                return self.violation(0x94).await;
            }
            if publish.topic.is_empty() {
                match self.aliases.get(&alias) {
                    Some(topic) => publish.topic.clone_from(topic),
                    None => return self.violation(0x82).await,
                }
            } else {
                self.aliases.insert(alias, publish.topic.clone());
            }
        }
        if validate_name(&publish.topic, self.shared.settings.topic_limits).is_err() {
            count_error(&self.shared, "invalid_topic");
            return self.violation(0x90).await;
        }
        if publish.qos == 2 && self.pending_qos2.contains(&publish.id) {
            // A resend of one still waiting for the pipeline: its PUBREC follows once stored.
            return None;
        }
        if publish.qos > 0 && self.version == Version::V5 {
            // Our Receive Maximum counts QoS 2 ids awaiting PUBREL too (5.0 §4.9).
            let awaiting = self.shared.broker().awaiting_release(&self.client);
            // QoS 2 publishes still waiting for the pipeline are in both counts.
            let unacknowledged = self.pending.len() - self.pending_qos2.len() + awaiting;
            if unacknowledged >= usize::from(self.shared.settings.max_inflight) {
                return self.violation(0x93).await;
            }
        }
        if publish.qos == 2 {
            let first = self
                .shared
                .broker()
                .receive_qos2(&self.client, self.id, publish.id);
            match first {
                Ok(true) => {}
                Ok(false) => return self.ack(AckKind::PubRec, publish.id, 0).await,
                Err(_) => return Some(Close::TakenOver),
            }
        }
        if !self.acl.may_publish(&publish.topic) {
            count_error(&self.shared, "not_authorized");
            tracing::info!(topic = %publish.topic, "publish not authorized");
            if self.version == Version::V311 {
                return Some(Close::Violation(0x87));
            }
            return self.queue_ack(publish.id, publish.qos, None, Some(0x87));
        }
        let event = self.event_for(&publish).await;
        let message = Message {
            topic: publish.topic,
            payload: publish.payload,
            qos: publish.qos,
            retain: publish.retain,
            properties: publish.properties,
        };
        let matched = self.shared.publish_local(Some(&self.client), message);
        tracing::trace!(matched, "publish routed");
        let waiter = match event {
            None => None,
            Some(event) if publish.qos == 0 => {
                let lost = self.shared.output.try_send(event);
                if lost > 0 {
                    self.shared.dropped("qos0_not_stored", lost);
                }
                None
            }
            Some(event) => {
                let sent = tokio::select! {
                    biased;
                    waiter = self.shared.output.send(event, true) => waiter,
                    _ = self.shutdown.cancelled() => return Some(Close::Shutdown),
                    () = self.signal.evict.notified() => return Some(Close::TakenOver),
                    () = revoked(self.device_signal.as_deref()) => return Some(Close::Revoked),
                };
                sent
            }
        };
        self.queue_ack(publish.id, publish.qos, waiter, None)
    }

    fn queue_ack(
        &mut self,
        id: u16,
        qos: u8,
        waiter: Option<AckWaiter>,
        refused: Option<u8>,
    ) -> Option<Close> {
        if qos == 0 {
            return None;
        }
        if qos == 2 {
            self.pending_qos2.insert(id);
        }
        self.pending.push_back(PendingAck {
            id,
            qos,
            waiter,
            refused,
        });
        None
    }

    /// The pipeline event of a publish on the device topic, if it is one.
    async fn event_for(&mut self, publish: &Publish) -> Option<Event> {
        let settings = &self.shared.settings;
        let (device, kind) = match settings.device_topic.matches(&publish.topic) {
            Some(found) => found,
            None => {
                let device = self.device.clone()?;
                if publish.topic != results_topic(device.as_str()) {
                    return None;
                }
                (device, EventKind::CommandResult)
            }
        };
        if kind == EventKind::CommandResult {
            if let Some(commands) = &self.shared.services.commands {
                let id = serde_json::from_slice::<serde_json::Value>(&publish.payload)
                    .ok()
                    .and_then(|value| value.get("id")?.as_str().map(str::to_owned));
                if let Some(id) = id {
                    commands.result(&device, &id, &publish.payload).await;
                }
            }
        }
        if let Some(registry) = &self.shared.services.registry {
            registry.record_message(device.as_str(), publish.payload.len() as u64, now_ms());
        }
        let format = if serde_json::from_slice::<serde::de::IgnoredAny>(&publish.payload).is_ok()
            && publish.payload.first() == Some(&b'{')
        {
            PayloadFormat::Json
        } else {
            PayloadFormat::Binary
        };
        self.shared.received.inc();
        Some(Event::new(
            device,
            kind,
            Arc::clone(&settings.name),
            now_ms(),
            format,
            publish.payload.clone(),
        ))
    }

    /// Writes the first pending acknowledgement once its event is stored (or refused).
    async fn answer_front(&mut self, outcome: AckOutcome) -> Option<Close> {
        let front = self.pending.pop_front()?;
        let reason = match (front.refused, outcome) {
            (Some(code), _) => code,
            (None, AckOutcome::Stored) => 0x00,
            (None, AckOutcome::Rejected(why)) => {
                tracing::warn!(reason = why, id = front.id, "publish not stored");
                if self.version == Version::V311 {
                    // 3.1.1 has no negative ack: closing makes the client resend it.
                    return Some(Close::Violation(0x80));
                }
                if why == "buffer_full" { 0x97 } else { 0x80 }
            }
        };
        if front.qos == 2 {
            self.pending_qos2.remove(&front.id);
            if reason >= 0x80 {
                self.shared
                    .broker()
                    .forget_qos2(&self.client, self.id, front.id);
            }
        }
        let kind = if front.qos == 2 {
            AckKind::PubRec
        } else {
            AckKind::PubAck
        };
        self.ack(kind, front.id, reason).await
    }

    /// Sends what the session holds for the client, as the window allows: each batch
    /// encoded into one buffer and written at once.
    async fn flush_session(&mut self) -> bool {
        loop {
            let now = self.shared.now_ms();
            let taken = self
                .shared
                .broker()
                .take(&self.client, self.id, SEND_BATCH, now);
            let Ok((packets, expired)) = taken else {
                return true;
            };
            if expired > 0 {
                self.shared.dropped("expired", expired);
            }
            if packets.is_empty() {
                return true;
            }
            self.out.clear();
            for packet in packets {
                self.encode_outgoing(packet);
            }
            if !self.write_out().await {
                return false;
            }
        }
    }

    /// Encodes and writes one packet from the session.
    async fn send_outgoing(&mut self, packet: Outgoing) -> bool {
        self.out.clear();
        self.encode_outgoing(packet);
        self.write_out().await
    }

    /// Appends one packet from the session to the output buffer; a publish too large for
    /// the client is discarded as if delivered (MQTT 5 §3.1.2.11.4) and counted.
    fn encode_outgoing(&mut self, packet: Outgoing) {
        match packet {
            Outgoing::PubRel { id } => {
                if let Err(err) =
                    codec::encode_ack(&mut self.out, self.version, AckKind::PubRel, id, 0)
                {
                    tracing::warn!(error = %err, "PUBREL not encoded");
                }
            }
            Outgoing::Publish { id, dup, delivery } => {
                let now = self.shared.now_ms();
                let expiry_remaining = delivery.expires_at_ms.map(|at| {
                    u32::try_from(at.saturating_sub(now).div_ceil(1000)).unwrap_or(u32::MAX)
                });
                let message = &delivery.message;
                let out = PublishOut {
                    id,
                    dup,
                    qos: delivery.qos,
                    retain: delivery.retain,
                    topic: &message.topic,
                    payload: &message.payload,
                    properties: &message.properties,
                    expiry_remaining,
                    subscription_ids: &delivery.subscription_ids,
                };
                let result = codec::encode_publish(
                    &mut self.out,
                    self.version,
                    &out,
                    self.client_max_packet,
                );
                if let Err(err) = result {
                    tracing::debug!(error = %err, "publish not sent to this client");
                    self.shared.dropped("too_large", 1);
                    if id != 0 {
                        self.shared.broker().discard(&self.client, self.id, id);
                    }
                }
            }
        }
    }

    /// Writes the output buffer; large buffers are not kept between bursts.
    async fn write_out(&mut self) -> bool {
        let out = std::mem::take(&mut self.out);
        let written = out.is_empty() || self.write(&out).await;
        self.out = out;
        if self.out.capacity() > 64 * 1024 {
            self.out = BytesMut::new();
        }
        written
    }

    async fn write(&mut self, bytes: &[u8]) -> bool {
        matches!(
            tokio::time::timeout(WRITE_TIMEOUT, self.stream.write_all(bytes)).await,
            Ok(Ok(()))
        )
    }

    /// A registry device: reachable for commands, announced online.
    async fn register_device(&mut self) {
        let Some(device) = self.device.clone() else {
            return;
        };
        let signal = Arc::new(DeviceSignal::default());
        let services = &self.shared.services;
        services
            .directory
            .register(device.clone(), self.id, &signal);
        self.device_signal = Some(signal);
        if let Some(registry) = &services.registry {
            registry.record_connected(device.as_str(), now_ms());
        }
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

    /// Publishes queued cloud commands on the device's commands topic.
    async fn deliver_commands(&mut self) {
        while let Some(command) = self.shared.services.directory.take_command(self.id) {
            let payload = serde_json::json!({
                "type": "command",
                "id": command.id,
                "name": command.name,
                "params": command.params,
            });
            let message = Message {
                topic: commands_topic(command.device.as_str()),
                payload: Bytes::from(payload.to_string()),
                qos: 1,
                retain: false,
                properties: fieldgate_broker::MessageProperties::default(),
            };
            let matched = self.shared.publish_local(None, message);
            if matched == 0 {
                tracing::warn!(device = %command.device, command = %command.id, "command published but the device has not subscribed to its commands topic");
            } else if let Some(commands) = &self.shared.services.commands {
                commands.delivered(&command.device, &command.id).await;
            }
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
        let sent =
            tokio::time::timeout(STATUS_SEND_TIMEOUT, self.shared.output.send(event, false)).await;
        if sent.is_err() {
            tracing::warn!("status event not buffered: the pipeline is full");
        }
    }

    /// Answers acks that resolve quickly, ends or parks the session, publishes the will
    /// when the close was abnormal, reports a device offline.
    async fn close(&mut self, close: Close) {
        if matches!(
            close,
            Close::Normal | Close::NormalWithWill | Close::Shutdown
        ) {
            while let Some(front) = self.pending.front_mut() {
                let outcome = match front.waiter.as_mut() {
                    None => AckOutcome::Stored,
                    Some(waiter) => {
                        match tokio::time::timeout(Duration::from_secs(1), waiter).await {
                            Ok(outcome) => outcome,
                            Err(_) => break,
                        }
                    }
                };
                if self.answer_front(outcome).await.is_some() {
                    break;
                }
            }
        }
        self.stream.shutdown().await;
        let now = self.shared.now_ms();
        let owned =
            self.shared
                .broker()
                .disconnect(&self.client, self.id, self.session_expiry, now);
        self.shared.detach(self.id);
        if close.publishes_will() {
            if let Some(will) = self.will.take() {
                let delayed = will.delay_interval > 0 && owned && close != Close::TakenOver;
                if delayed {
                    self.shared.broker().delay_will(
                        &self.client,
                        will.message,
                        will.delay_interval,
                        now,
                    );
                } else if close != Close::TakenOver || will.delay_interval == 0 {
                    self.shared.publish_local(None, will.message);
                }
            }
        }
        tracing::info!(reason = close.as_str(), "MQTT client disconnected");
        if let Some(device) = self.device.clone() {
            self.shared.services.directory.forget_connection(self.id);
            self.shared.services.directory.unregister(&device, self.id);
            if let Some(registry) = &self.shared.services.registry {
                registry.record_disconnected(device.as_str(), now_ms());
            }
            let payload = format!(r#"{{"status":"offline","reason":"{}"}}"#, close.as_str());
            self.status_event(device, Bytes::from(payload)).await;
        }
    }
}

async fn front_ack(pending: &mut VecDeque<PendingAck>) -> AckOutcome {
    match pending.front_mut() {
        Some(PendingAck {
            waiter: Some(waiter),
            ..
        }) => waiter.await,
        Some(_) => AckOutcome::Stored,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn commands_waiting(signal: Option<&DeviceSignal>) {
    match signal {
        Some(signal) => signal.commands_waiting().await,
        None => std::future::pending().await,
    }
}

async fn revoked(signal: Option<&DeviceSignal>) {
    match signal {
        Some(signal) => signal.close_requested().await,
        None => std::future::pending().await,
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}
