//! A scripted fake MQTT broker (3.1.1 and 5.0) for black-box tests of the cloud link.
//!
//! It speaks rumqttc's codec (`rumqttc::mqttbytes::v4` and `rumqttc::v5::mqttbytes::v5`)
//! on 127.0.0.1 and misbehaves on purpose, as a [`Script`] says: per received PUBLISH it
//! can ack, withhold, delay, reorder or duplicate the ack, answer with any reason code,
//! or drop the connection; per PUBREL it can complete, ignore, answer with a code or drop
//! the connection; it can refuse connects, enforce a maximum packet size and advertise a
//! Receive Maximum. It records everything for assertions: connects, every packet with
//! its packet id, DUP flag, topic, payload and user properties, and when it came.
//!
//! Invariants:
//! - A broker-side session per client id keeps QoS 2 state (packet ids stored and
//!   PUBREC'd, awaiting PUBREL), so a DUP resend of a stored id is never a second
//!   delivery: [`FakeBroker::deliveries`] counts exactly what a real broker would forward.
//! - A *delivery* of a QoS 1 message is a success PUBACK actually written (a withheld
//!   or rejected one is not delivered); of a QoS 2 message, the first time its packet id
//!   enters the session (method B of MQTT 5 §4.3.3: stored on receipt, released on PUBREL).
//! - Nothing here sleeps to synchronise; every wait has a deadline; dropping the broker
//!   cancels its tasks and closes every socket.
//!
//! Use:
//!
//! ```text
//! let script = Script::new()
//!     .on(Match::topic("gateways/+/devices/+/telemetry").nth(0), Reply::Withhold)
//!     .on(Match::payload("\"seq\":3,"), Reply::Code(0x87))
//!     .on_pubrel(Some(0), RelReply::ReleaseAndDisconnect, Some(1))
//!     .max_packet_size(4096);
//! let broker = FakeBroker::start(script).await;      // 127.0.0.1, free port
//! // ... point the gateway at broker.url() ...
//! broker.wait_for(WAIT, |b| (b.deliveries().len() >= 10).then_some(())).await;
//! broker.behave();                                   // ack everything from now on
//! broker.disconnect_all();                           // drop the link (wills fire)
//! broker.stop().await; broker.start_again().await;   // outage on the same port
//! assert!(broker.violations().is_empty());           // no packet id reused early
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Largest packet the fake reads at all (its own memory cap, not the scripted limit).
const READ_CAP: usize = 64 * 1024 * 1024;
/// Control messages queued per connection.
const CONTROL_QUEUE: usize = 64;

/// MQTT protocol version of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

// ---------------------------------------------------------------------------------------
// script
// ---------------------------------------------------------------------------------------

/// Which received PUBLISH packets a rule applies to. All given conditions must hold.
#[derive(Clone, Default)]
pub struct Match {
    topic: Option<String>,
    payload: Option<String>,
    qos: Option<u8>,
    nth: Option<usize>,
    first_sends_only: bool,
    predicate: Option<Predicate>,
}

/// A condition on a received PUBLISH.
type Predicate = Arc<dyn Fn(&PacketInfo) -> bool + Send + Sync>;

impl fmt::Debug for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Match")
            .field("topic", &self.topic)
            .field("payload", &self.payload)
            .field("qos", &self.qos)
            .field("nth", &self.nth)
            .field("first_sends_only", &self.first_sends_only)
            .field("predicate", &self.predicate.is_some())
            .finish()
    }
}

impl Match {
    /// Every PUBLISH.
    pub fn any() -> Self {
        Self::default()
    }

    /// PUBLISH packets whose topic matches the MQTT filter (`+` and `#` allowed).
    pub fn topic(filter: &str) -> Self {
        Self::any().in_topic(filter)
    }

    /// PUBLISH packets whose payload contains `text`.
    pub fn payload(text: &str) -> Self {
        Self::any().containing(text)
    }

    /// PUBLISH packets for which `predicate` holds.
    pub fn when(predicate: impl Fn(&PacketInfo) -> bool + Send + Sync + 'static) -> Self {
        Self {
            predicate: Some(Arc::new(predicate)),
            ..Self::default()
        }
    }

    /// Also: the topic matches the MQTT filter.
    pub fn in_topic(mut self, filter: &str) -> Self {
        self.topic = Some(filter.to_string());
        self
    }

    /// Also: the payload contains `text`.
    pub fn containing(mut self, text: &str) -> Self {
        self.payload = Some(text.to_string());
        self
    }

    /// Also: the PUBLISH has this QoS.
    pub fn qos(mut self, qos: u8) -> Self {
        self.qos = Some(qos);
        self
    }

    /// Only the `n`-th (0-based) PUBLISH that meets the other conditions.
    pub fn nth(mut self, n: usize) -> Self {
        self.nth = Some(n);
        self
    }

    /// Only first sends (DUP flag clear).
    pub fn first_send(mut self) -> Self {
        self.first_sends_only = true;
        self
    }

    fn conditions_hold(&self, publish: &PacketInfo) -> bool {
        self.topic
            .as_deref()
            .is_none_or(|filter| topic_matches(filter, &publish.topic))
            && self.payload.as_deref().is_none_or(|text| {
                publish
                    .payload
                    .windows(text.len().max(1))
                    .any(|w| w == text.as_bytes())
            })
            && self.qos.is_none_or(|qos| qos == publish.qos)
            && (!self.first_sends_only || !publish.dup)
            && self.predicate.as_ref().is_none_or(|p| p(publish))
    }
}

/// How the broker answers a PUBLISH (QoS 1: PUBACK; QoS 2: PUBREC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Success ack at once.
    Ack,
    /// Never answer (QoS 2: the id is still stored in the session).
    Withhold,
    /// Success ack after this long (if the connection lives that long).
    Delay(Duration),
    /// Answer with this reason code (MQTT 5). A code >= 0x80 rejects: not delivered,
    /// nothing stored. On MQTT 3.1.1, which has no negative acks, a code >= 0x80 closes
    /// the connection instead (what 3.1.1 brokers do), and a code < 0x80 is a success.
    Code(u8),
    /// Success ack, written twice.
    Duplicate,
    /// Hold the success ack back until the next PUBLISH answered with `Ack` has been
    /// acked, then send it: acks out of order.
    Defer,
    /// Process as received (QoS 2: stored in the session; QoS 1: not acked, so not
    /// delivered), answer nothing, close the connection: a disconnect mid-flight.
    Disconnect,
    /// MQTT 5: send DISCONNECT with this reason code, then close (3.1.1: just close).
    /// The PUBLISH is not processed.
    DisconnectWith(u8),
}

/// How the broker answers a PUBREL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelReply {
    /// Release the id and send PUBCOMP (MQTT 5: reason 0x92 for an unknown id).
    Complete,
    /// Release the id and answer PUBCOMP with this reason code.
    Code(u8),
    /// Drop the PUBREL unprocessed: the id stays in the session, no PUBCOMP.
    Ignore,
    /// Release the id but never send its PUBCOMP.
    NoComp,
    /// Release the id and send PUBCOMP after this long.
    Delay(Duration),
    /// Release the id and send PUBCOMP twice.
    Duplicate,
    /// Drop the PUBREL unprocessed and close the connection.
    Disconnect,
    /// Release the id, send no PUBCOMP, close the connection.
    ReleaseAndDisconnect,
}

/// How a refused CONNECT is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refuse {
    /// Close the socket without a CONNACK.
    Close,
    /// CONNACK with this return/reason code (3.1.1: 1..=5; MQTT 5: >= 0x80), then close.
    Code(u8),
}

#[derive(Clone, Debug)]
struct Rule {
    matcher: Match,
    reply: Reply,
    times: Option<usize>,
    seen: usize,
    fired: usize,
}

#[derive(Clone, Debug)]
struct RelRule {
    nth: Option<usize>,
    reply: RelReply,
    times: Option<usize>,
    seen: usize,
    fired: usize,
}

/// A function called with every packet the broker receives, before it is answered.
#[derive(Clone)]
pub struct Hook(Arc<dyn Fn(&PacketInfo) + Send + Sync>);

impl fmt::Debug for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Hook")
    }
}

/// What the broker does; change it at any time with [`FakeBroker::script`].
#[derive(Clone, Debug)]
pub struct Script {
    hook: Option<Hook>,
    rules: Vec<Rule>,
    rel_rules: Vec<RelRule>,
    refuse_connects: u64,
    refuse_how: Refuse,
    drop_after_connack: u64,
    max_packet_size: Option<u32>,
    receive_maximum: Option<u16>,
    answer_pings: bool,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            hook: None,
            rules: Vec::new(),
            rel_rules: Vec::new(),
            refuse_connects: 0,
            refuse_how: Refuse::Close,
            drop_after_connack: 0,
            max_packet_size: None,
            receive_maximum: None,
            answer_pings: true,
        }
    }
}

impl Script {
    /// A well-behaved broker: every PUBLISH acked at once, every connect accepted.
    pub fn new() -> Self {
        Self::default()
    }

    /// Answers every PUBLISH matching `matcher` with `reply`. Rules are tried in order;
    /// the first one that matches and has firings left decides; default: [`Reply::Ack`].
    pub fn on(self, matcher: Match, reply: Reply) -> Self {
        self.on_times(matcher, reply, None)
    }

    /// Like [`Script::on`], but for at most `times` matching publishes.
    pub fn on_times(mut self, matcher: Match, reply: Reply, times: Option<usize>) -> Self {
        self.rules.push(Rule {
            matcher,
            reply,
            times,
            seen: 0,
            fired: 0,
        });
        self
    }

    /// Answers PUBREL packets with `reply`: only the `nth` (0-based) PUBREL when given,
    /// at most `times` times when given. Default: [`RelReply::Complete`].
    pub fn on_pubrel(mut self, nth: Option<usize>, reply: RelReply, times: Option<usize>) -> Self {
        self.rel_rules.push(RelRule {
            nth,
            reply,
            times,
            seen: 0,
            fired: 0,
        });
        self
    }

    /// Accepts the next `n` connects (`u64::MAX`: until told otherwise) and closes each
    /// right after its CONNACK: a link that flaps before anything can flow.
    pub fn drop_after_connack(mut self, n: u64) -> Self {
        self.drop_after_connack = n;
        self
    }

    /// Refuses the next `n` connects (`u64::MAX`: until told otherwise).
    pub fn refuse_connects(mut self, n: u64, how: Refuse) -> Self {
        self.refuse_connects = n;
        self.refuse_how = how;
        self
    }

    /// Enforces a maximum packet size: MQTT 5 advertises it in CONNACK and answers a
    /// larger packet with DISCONNECT 0x95; 3.1.1 just closes the connection.
    pub fn max_packet_size(mut self, bytes: u32) -> Self {
        self.max_packet_size = Some(bytes);
        self
    }

    /// MQTT 5: advertises a Receive Maximum in CONNACK and disconnects with 0x93 when a
    /// client has more unacknowledged QoS 1/2 publishes outstanding.
    pub fn receive_maximum(mut self, n: u16) -> Self {
        self.receive_maximum = Some(n);
        self
    }

    /// Calls `hook` with every received packet (after decoding, before answering), e.g.
    /// to kill the gateway at the exact moment an ack arrives.
    pub fn on_packet(mut self, hook: impl Fn(&PacketInfo) + Send + Sync + 'static) -> Self {
        self.hook = Some(Hook(Arc::new(hook)));
        self
    }

    /// Stops answering PINGREQ (a half-dead link).
    pub fn no_pings(mut self) -> Self {
        self.answer_pings = false;
        self
    }

    fn reply_for(&mut self, publish: &PacketInfo) -> Reply {
        let mut chosen = None;
        for rule in &mut self.rules {
            if !rule.matcher.conditions_hold(publish) {
                continue;
            }
            let index = rule.seen;
            rule.seen += 1;
            if chosen.is_some() {
                continue;
            }
            if rule.matcher.nth.is_some_and(|n| n != index) {
                continue;
            }
            if rule.times.is_some_and(|t| rule.fired >= t) {
                continue;
            }
            rule.fired += 1;
            chosen = Some(rule.reply);
        }
        chosen.unwrap_or(Reply::Ack)
    }

    fn rel_reply(&mut self) -> RelReply {
        let mut chosen = None;
        for rule in &mut self.rel_rules {
            let index = rule.seen;
            rule.seen += 1;
            if chosen.is_some()
                || rule.nth.is_some_and(|n| n != index)
                || rule.times.is_some_and(|t| rule.fired >= t)
            {
                continue;
            }
            rule.fired += 1;
            chosen = Some(rule.reply);
        }
        chosen.unwrap_or(RelReply::Complete)
    }
}

// ---------------------------------------------------------------------------------------
// records
// ---------------------------------------------------------------------------------------

/// A will message (from CONNECT).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Will {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
}

/// One CONNECT the broker received.
#[derive(Clone, Debug)]
pub struct ConnectInfo {
    /// Connection number (0, 1, ... over the broker's life).
    pub conn: usize,
    /// When it arrived.
    pub at: Instant,
    /// Protocol version.
    pub protocol: Protocol,
    /// Client id.
    pub client_id: String,
    /// Clean session (3.1.1) / clean start (5).
    pub clean: bool,
    /// Keepalive in seconds.
    pub keep_alive: u16,
    /// MQTT 5 session expiry interval.
    pub session_expiry: Option<u32>,
    /// Will message.
    pub will: Option<Will>,
    /// Whether the broker accepted it (CONNACK success).
    pub accepted: bool,
    /// Session present flag sent in CONNACK.
    pub session_present: bool,
}

/// Kind of a received packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// CONNECT.
    Connect,
    /// PUBLISH.
    Publish,
    /// PUBACK.
    PubAck,
    /// PUBREC.
    PubRec,
    /// PUBREL.
    PubRel,
    /// PUBCOMP.
    PubComp,
    /// SUBSCRIBE.
    Subscribe,
    /// UNSUBSCRIBE.
    Unsubscribe,
    /// PINGREQ.
    PingReq,
    /// DISCONNECT.
    Disconnect,
    /// Anything else a client should not send.
    Other,
}

/// One packet the broker received.
#[derive(Clone, Debug)]
pub struct PacketInfo {
    /// Connection number.
    pub conn: usize,
    /// Client id of the connection.
    pub client_id: String,
    /// When it arrived.
    pub at: Instant,
    /// Kind.
    pub kind: Kind,
    /// Packet id (0 when the packet has none, or QoS 0).
    pub packet_id: u16,
    /// DUP flag (PUBLISH).
    pub dup: bool,
    /// QoS (PUBLISH).
    pub qos: u8,
    /// Retain flag (PUBLISH).
    pub retain: bool,
    /// Topic (PUBLISH) or first filter (SUBSCRIBE).
    pub topic: String,
    /// Payload (PUBLISH).
    pub payload: Bytes,
    /// MQTT 5 user properties (PUBLISH).
    pub user_properties: Vec<(String, String)>,
    /// Reason code (MQTT 5 acks, DISCONNECT).
    pub reason: Option<u8>,
    /// Size of the whole packet in bytes.
    pub size: usize,
    /// What the broker answered (PUBLISH, PUBREL).
    pub answer: String,
}

impl PacketInfo {
    /// The payload as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// The value of the first user property `key`.
    pub fn user_property(&self, key: &str) -> Option<&str> {
        self.user_properties
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// An application message the broker took responsibility for (see the module header).
#[derive(Clone, Debug)]
pub struct Delivery {
    /// Connection number.
    pub conn: usize,
    /// When.
    pub at: Instant,
    /// QoS.
    pub qos: u8,
    /// Packet id it came with.
    pub packet_id: u16,
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// MQTT 5 user properties.
    pub user_properties: Vec<(String, String)>,
}

/// A PUBLISH the broker sent to a client, and what came back.
#[derive(Clone, Debug)]
pub struct Outbound {
    /// Connection number.
    pub conn: usize,
    /// Client id.
    pub client_id: String,
    /// Packet id (0 for QoS 0).
    pub packet_id: u16,
    /// QoS.
    pub qos: u8,
    /// Topic.
    pub topic: String,
    /// When it was written.
    pub sent_at: Instant,
    /// When the PUBREC came back (QoS 2).
    pub pubrec_at: Option<Instant>,
    /// When the PUBACK (QoS 1) or PUBCOMP (QoS 2) came back.
    pub acked_at: Option<Instant>,
    /// Reason code of that ack (MQTT 5).
    pub ack_reason: Option<u8>,
}

/// A packet larger than the scripted maximum packet size.
#[derive(Clone, Debug)]
pub struct Oversized {
    /// Connection number.
    pub conn: usize,
    /// When.
    pub at: Instant,
    /// Packet size in bytes.
    pub size: usize,
}

/// A connection that ended.
#[derive(Clone, Debug)]
pub struct Closed {
    /// Connection number.
    pub conn: usize,
    /// When.
    pub at: Instant,
    /// Why (client DISCONNECT, EOF, scripted, takeover, ...).
    pub why: String,
}

// ---------------------------------------------------------------------------------------
// state
// ---------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Session {
    /// QoS 2 packet ids stored and PUBREC'd (or withheld), awaiting PUBREL.
    qos2: HashSet<u16>,
    /// Subscribed filters.
    filters: Vec<String>,
    /// Next packet id for broker-to-client publishes.
    next_packet_id: u16,
    /// Whether to keep it after the connection ends.
    persistent: bool,
}

#[derive(Debug)]
enum Control {
    /// PUBLISH packets (topic, payload, qos, packet id), written in one write.
    Publish(Vec<(String, Bytes, u8, u16)>),
    Close(String),
}

#[derive(Debug)]
struct Live {
    client_id: String,
    control: mpsc::Sender<Control>,
}

#[derive(Debug, Default)]
struct State {
    script: Script,
    next_conn: usize,
    connects: Vec<ConnectInfo>,
    packets: Vec<PacketInfo>,
    deliveries: Vec<Delivery>,
    outbound: Vec<Outbound>,
    oversized: Vec<Oversized>,
    closed: Vec<Closed>,
    wills: Vec<Will>,
    retained: BTreeMap<String, Bytes>,
    sessions: HashMap<String, Session>,
    live: HashMap<usize, Live>,
    max_outstanding: usize,
    socket_accepts: usize,
    violations: Vec<String>,
}

type Shared = Arc<Mutex<State>>;

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // A panicking test thread may poison the lock; the records are still worth reading.
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------
// the broker
// ---------------------------------------------------------------------------------------

/// The running fake broker. Dropping it stops it.
pub struct FakeBroker {
    /// Port on 127.0.0.1.
    pub port: u16,
    shared: Shared,
    running: Option<(CancellationToken, JoinHandle<()>)>,
}

impl FakeBroker {
    /// Starts on a free port with `script`.
    pub async fn start(script: Script) -> Self {
        Self::start_on(0, script).await
    }

    /// Starts on `port` (0: a free one) with `script`.
    pub async fn start_on(port: u16, script: Script) -> Self {
        let shared = Arc::new(Mutex::new(State {
            script,
            ..State::default()
        }));
        let mut broker = FakeBroker {
            port,
            shared,
            running: None,
        };
        broker.listen().await;
        broker
    }

    async fn listen(&mut self) {
        assert!(self.running.is_none(), "fake broker already running");
        let listener = TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap_or_else(|e| panic!("fake broker: bind 127.0.0.1:{}: {e}", self.port));
        self.port = listener.local_addr().expect("local address").port();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(accept_loop(
            listener,
            Arc::clone(&self.shared),
            cancel.clone(),
        ));
        self.running = Some((cancel, task));
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Stops listening and closes every connection (wills are published); sessions,
    /// retained messages and records are kept for [`FakeBroker::start_again`].
    pub async fn stop(&mut self) {
        if let Some((cancel, task)) = self.running.take() {
            cancel.cancel();
            if tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .is_err()
            {
                panic!("fake broker did not stop within 10 s");
            }
        }
    }

    /// Listens again on the same port after [`FakeBroker::stop`].
    pub async fn start_again(&mut self) {
        self.listen().await;
    }

    /// Changes the script in place (rule counters included).
    pub fn script(&self, change: impl FnOnce(&mut Script)) {
        change(&mut lock(&self.shared).script);
    }

    /// Replaces the script.
    pub fn set_script(&self, script: Script) {
        lock(&self.shared).script = script;
    }

    /// From now on: ack everything at once, accept every connect, answer pings (limits
    /// such as the maximum packet size stay).
    pub fn behave(&self) {
        self.script(|s| {
            s.rules.clear();
            s.rel_rules.clear();
            s.refuse_connects = 0;
            s.drop_after_connack = 0;
            s.answer_pings = true;
        });
    }

    /// Closes every live connection now (no DISCONNECT; wills are published).
    pub fn disconnect_all(&self) {
        let state = lock(&self.shared);
        for live in state.live.values() {
            // A full or closed queue means the connection is busy closing anyway.
            let _sent = live
                .control
                .try_send(Control::Close("disconnect_all".into()));
        }
    }

    /// Every CONNECT so far (refused ones included).
    pub fn connects(&self) -> Vec<ConnectInfo> {
        lock(&self.shared).connects.clone()
    }

    /// Accepted CONNECTs so far.
    pub fn accepted_connects(&self) -> usize {
        lock(&self.shared)
            .connects
            .iter()
            .filter(|c| c.accepted)
            .count()
    }

    /// TCP connections accepted so far (including those closed before a CONNECT).
    pub fn socket_accepts(&self) -> usize {
        lock(&self.shared).socket_accepts
    }

    /// Every packet received so far.
    pub fn packets(&self) -> Vec<PacketInfo> {
        lock(&self.shared).packets.clone()
    }

    /// Every PUBLISH received so far (resends included).
    pub fn publishes(&self) -> Vec<PacketInfo> {
        lock(&self.shared)
            .packets
            .iter()
            .filter(|p| p.kind == Kind::Publish)
            .cloned()
            .collect()
    }

    /// Application messages delivered (see the module header).
    pub fn deliveries(&self) -> Vec<Delivery> {
        lock(&self.shared).deliveries.clone()
    }

    /// PUBLISH packets the broker sent to clients.
    pub fn outbound(&self) -> Vec<Outbound> {
        lock(&self.shared).outbound.clone()
    }

    /// Packets refused for exceeding the maximum packet size.
    pub fn oversized(&self) -> Vec<Oversized> {
        lock(&self.shared).oversized.clone()
    }

    /// Connections that ended.
    pub fn closed(&self) -> Vec<Closed> {
        lock(&self.shared).closed.clone()
    }

    /// Wills the broker published.
    pub fn wills(&self) -> Vec<Will> {
        lock(&self.shared).wills.clone()
    }

    /// The retained message on `topic`.
    pub fn retained(&self, topic: &str) -> Option<Bytes> {
        lock(&self.shared).retained.get(topic).cloned()
    }

    /// The most QoS 1/2 publishes one connection had outstanding (received, not yet
    /// answered with PUBACK / PUBCOMP / a failing PUBREC) at any moment.
    pub fn max_outstanding(&self) -> usize {
        lock(&self.shared).max_outstanding
    }

    /// Protocol violations by clients: a packet id reused while its flow is unfinished
    /// (QoS 1 unacked, QoS 2 awaiting PUBREL or PUBCOMP), or a resend without DUP.
    pub fn violations(&self) -> Vec<String> {
        lock(&self.shared).violations.clone()
    }

    /// Restarts the [`FakeBroker::max_outstanding`] measurement.
    pub fn reset_max_outstanding(&self) {
        lock(&self.shared).max_outstanding = 0;
    }

    /// QoS 2 packet ids stored in `client_id`'s session, awaiting PUBREL.
    pub fn qos2_pending(&self, client_id: &str) -> Vec<u16> {
        let state = lock(&self.shared);
        let mut ids: Vec<u16> = state
            .sessions
            .get(client_id)
            .map(|s| s.qos2.iter().copied().collect())
            .unwrap_or_default();
        ids.sort_unstable();
        ids
    }

    /// Whether `client_id` has a live, accepted connection.
    pub fn is_connected(&self, client_id: &str) -> bool {
        lock(&self.shared)
            .live
            .values()
            .any(|l| l.client_id == client_id)
    }

    /// Whether `client_id`'s session has subscribed `filter`.
    pub fn is_subscribed(&self, client_id: &str, filter: &str) -> bool {
        lock(&self.shared)
            .sessions
            .get(client_id)
            .is_some_and(|s| s.filters.iter().any(|f| f == filter))
    }

    /// Sends a PUBLISH to `client_id`'s live connection; returns its packet id (0 for
    /// QoS 0), or None when the client is not connected.
    pub fn publish_to(&self, client_id: &str, topic: &str, payload: &[u8], qos: u8) -> Option<u16> {
        self.publish_burst_to(client_id, &[(topic, payload, qos)])
            .and_then(|ids| ids.first().copied())
    }

    /// Sends several PUBLISH packets (topic, payload, qos) to `client_id` in one socket
    /// write, so the client reads them together; returns their packet ids.
    pub fn publish_burst_to(
        &self,
        client_id: &str,
        messages: &[(&str, &[u8], u8)],
    ) -> Option<Vec<u16>> {
        let mut state = lock(&self.shared);
        let (&conn, live) = state.live.iter().find(|(_, l)| l.client_id == client_id)?;
        let control = live.control.clone();
        let mut burst = Vec::new();
        for (topic, payload, qos) in messages {
            let packet_id = if *qos == 0 {
                0
            } else {
                let session = state.sessions.entry(client_id.to_string()).or_default();
                session.next_packet_id = session.next_packet_id.checked_add(1).unwrap_or(1);
                session.next_packet_id
            };
            burst.push((
                topic.to_string(),
                Bytes::copy_from_slice(payload),
                *qos,
                packet_id,
            ));
        }
        let ids: Vec<u16> = burst.iter().map(|m| m.3).collect();
        let now = Instant::now();
        for (topic, _, qos, packet_id) in &burst {
            state.outbound.push(Outbound {
                conn,
                client_id: client_id.to_string(),
                packet_id: *packet_id,
                qos: *qos,
                topic: topic.clone(),
                sent_at: now,
                pubrec_at: None,
                acked_at: None,
                ack_reason: None,
            });
        }
        control.try_send(Control::Publish(burst)).ok()?;
        Some(ids)
    }

    /// Polls `check` over the broker's records until it returns `Some`, up to `limit`.
    pub async fn wait_for<T>(
        &self,
        limit: Duration,
        mut check: impl FnMut(&FakeBroker) -> Option<T>,
    ) -> Option<T> {
        super::eventually(limit, || check(self)).await
    }
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        if let Some((cancel, task)) = self.running.take() {
            cancel.cancel();
            task.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Shared, cancel: CancellationToken) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let conn = {
                        let mut state = lock(&shared);
                        state.socket_accepts += 1;
                        state.next_conn += 1;
                        state.next_conn - 1
                    };
                    connections.spawn(serve(stream, conn, Arc::clone(&shared), cancel.child_token()));
                }
                Err(err) => eprintln!("fake broker: accept: {err}"),
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    // Every connection sees the cancellation and closes (publishing its will); wait.
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        connections.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------
// one connection
// ---------------------------------------------------------------------------------------

/// A decoded client packet, protocol-neutral.
#[derive(Debug)]
enum Incoming {
    Connect {
        protocol: Protocol,
        client_id: String,
        clean: bool,
        keep_alive: u16,
        session_expiry: Option<u32>,
        will: Option<Will>,
    },
    Publish {
        dup: bool,
        qos: u8,
        retain: bool,
        topic: String,
        packet_id: u16,
        payload: Bytes,
        user_properties: Vec<(String, String)>,
    },
    PubAck {
        packet_id: u16,
        reason: Option<u8>,
    },
    PubRec {
        packet_id: u16,
        reason: Option<u8>,
    },
    PubRel {
        packet_id: u16,
    },
    PubComp {
        packet_id: u16,
        reason: Option<u8>,
    },
    Subscribe {
        packet_id: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        packet_id: u16,
        count: usize,
    },
    PingReq,
    Disconnect {
        reason: Option<u8>,
    },
    Other(String),
}

/// A write to do later (delayed acks), with the delivery it completes.
struct Scheduled {
    due: Instant,
    bytes: Vec<u8>,
    delivery: Option<Delivery>,
    completes: Option<u16>,
}

/// Per-connection state.
struct Conn {
    id: usize,
    protocol: Protocol,
    client_id: String,
    writer: OwnedWriteHalf,
    shared: Shared,
    /// QoS 1/2 packet ids received and not yet answered with a final ack.
    outstanding: HashSet<u16>,
    /// QoS 2 ids released (PUBREL received) whose PUBCOMP has not been written.
    owed_comp: HashSet<u16>,
    /// Acks held back by `Reply::Defer`, with their deliveries.
    deferred: Vec<(Vec<u8>, Option<Delivery>, u16)>,
    scheduled: Vec<Scheduled>,
    /// Whether the will is discarded (client sent a normal DISCONNECT).
    will_discarded: bool,
    will: Option<Will>,
}

/// Reads one whole frame from the front of `buf`: (header length, total length).
fn frame_bounds(buf: &[u8]) -> Result<Option<(usize, usize)>, String> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let mut remaining = 0usize;
    for i in 1..5 {
        let Some(&byte) = buf.get(i) else {
            return Ok(None);
        };
        remaining |= usize::from(byte & 0x7f) << (7 * (i - 1));
        if byte & 0x80 == 0 {
            return Ok(Some((i + 1, i + 1 + remaining)));
        }
    }
    Err("malformed remaining length".into())
}

/// The protocol level of a CONNECT frame.
fn connect_protocol(frame: &[u8], header: usize) -> Result<Protocol, String> {
    if frame.first().map(|b| b >> 4) != Some(1) {
        return Err(format!("first packet is not CONNECT: {:?}", frame.first()));
    }
    match frame.get(header + 6) {
        Some(4) => Ok(Protocol::V311),
        Some(5) => Ok(Protocol::V5),
        other => Err(format!("unsupported protocol level {other:?}")),
    }
}

fn decode(protocol: Protocol, frame: &mut BytesMut) -> Result<Incoming, String> {
    match protocol {
        Protocol::V311 => decode_v4(frame),
        Protocol::V5 => decode_v5(frame),
    }
}

fn decode_v4(frame: &mut BytesMut) -> Result<Incoming, String> {
    use rumqttc::mqttbytes::v4::Packet;
    let packet = Packet::read(frame, READ_CAP).map_err(|e| format!("3.1.1 decode: {e}"))?;
    Ok(match packet {
        Packet::Connect(c) => Incoming::Connect {
            protocol: Protocol::V311,
            client_id: c.client_id,
            clean: c.clean_session,
            keep_alive: c.keep_alive,
            session_expiry: None,
            will: c.last_will.map(|w| Will {
                topic: w.topic,
                payload: w.message,
                qos: w.qos as u8,
                retain: w.retain,
            }),
        },
        Packet::Publish(p) => Incoming::Publish {
            dup: p.dup,
            qos: p.qos as u8,
            retain: p.retain,
            topic: p.topic,
            packet_id: p.pkid,
            payload: p.payload,
            user_properties: Vec::new(),
        },
        Packet::PubAck(a) => Incoming::PubAck {
            packet_id: a.pkid,
            reason: None,
        },
        Packet::PubRec(a) => Incoming::PubRec {
            packet_id: a.pkid,
            reason: None,
        },
        Packet::PubRel(a) => Incoming::PubRel { packet_id: a.pkid },
        Packet::PubComp(a) => Incoming::PubComp {
            packet_id: a.pkid,
            reason: None,
        },
        Packet::Subscribe(s) => Incoming::Subscribe {
            packet_id: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, f.qos as u8))
                .collect(),
        },
        Packet::Unsubscribe(u) => Incoming::Unsubscribe {
            packet_id: u.pkid,
            count: u.topics.len(),
        },
        Packet::PingReq => Incoming::PingReq,
        Packet::Disconnect => Incoming::Disconnect { reason: None },
        other => Incoming::Other(format!("{other:?}")),
    })
}

fn decode_v5(frame: &mut BytesMut) -> Result<Incoming, String> {
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, PubCompReason, PubRecReason};
    // rumqttc's v5 reader refuses a DISCONNECT without a reason code, which MQTT 5
    // allows (remaining length 0 = normal disconnection).
    if frame.len() == 2 && frame[0] == 0xE0 && frame[1] == 0 {
        return Ok(Incoming::Disconnect { reason: Some(0) });
    }
    let packet = Packet::read(frame, None).map_err(|e| format!("5.0 decode: {e}"))?;
    let puback_code = |r: PubAckReason| match r {
        PubAckReason::Success => 0x00,
        PubAckReason::NoMatchingSubscribers => 0x10,
        PubAckReason::UnspecifiedError => 0x80,
        PubAckReason::ImplementationSpecificError => 0x83,
        PubAckReason::NotAuthorized => 0x87,
        PubAckReason::TopicNameInvalid => 0x90,
        PubAckReason::PacketIdentifierInUse => 0x91,
        PubAckReason::QuotaExceeded => 0x97,
        PubAckReason::PayloadFormatInvalid => 0x99,
    };
    let pubrec_code = |r: PubRecReason| match r {
        PubRecReason::Success => 0x00,
        PubRecReason::NoMatchingSubscribers => 0x10,
        PubRecReason::UnspecifiedError => 0x80,
        PubRecReason::ImplementationSpecificError => 0x83,
        PubRecReason::NotAuthorized => 0x87,
        PubRecReason::TopicNameInvalid => 0x90,
        PubRecReason::PacketIdentifierInUse => 0x91,
        PubRecReason::QuotaExceeded => 0x97,
        PubRecReason::PayloadFormatInvalid => 0x99,
    };
    Ok(match packet {
        Packet::Connect(c, will, _login) => Incoming::Connect {
            protocol: Protocol::V5,
            client_id: c.client_id,
            clean: c.clean_start,
            keep_alive: c.keep_alive,
            session_expiry: c.properties.and_then(|p| p.session_expiry_interval),
            will: will.map(|w| Will {
                topic: String::from_utf8_lossy(&w.topic).into_owned(),
                payload: w.message,
                qos: w.qos as u8,
                retain: w.retain,
            }),
        },
        Packet::Publish(p) => Incoming::Publish {
            dup: p.dup,
            qos: p.qos as u8,
            retain: p.retain,
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            packet_id: p.pkid,
            payload: p.payload,
            user_properties: p.properties.map(|p| p.user_properties).unwrap_or_default(),
        },
        Packet::PubAck(a) => Incoming::PubAck {
            packet_id: a.pkid,
            reason: Some(puback_code(a.reason)),
        },
        Packet::PubRec(a) => Incoming::PubRec {
            packet_id: a.pkid,
            reason: Some(pubrec_code(a.reason)),
        },
        Packet::PubRel(a) => Incoming::PubRel { packet_id: a.pkid },
        Packet::PubComp(a) => Incoming::PubComp {
            packet_id: a.pkid,
            reason: Some(match a.reason {
                PubCompReason::Success => 0x00,
                PubCompReason::PacketIdentifierNotFound => 0x92,
            }),
        },
        Packet::Subscribe(s) => Incoming::Subscribe {
            packet_id: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, f.qos as u8))
                .collect(),
        },
        Packet::Unsubscribe(u) => Incoming::Unsubscribe {
            packet_id: u.pkid,
            count: u.filters.len(),
        },
        Packet::PingReq(_) => Incoming::PingReq,
        Packet::Disconnect(d) => Incoming::Disconnect {
            reason: Some(d.reason_code as u8),
        },
        other => Incoming::Other(format!("{other:?}")),
    })
}

/// Appends an MQTT variable-length integer.
fn put_varint(out: &mut Vec<u8>, mut value: usize) {
    loop {
        // Truncation is the point: the low 7 bits of the value.
        #[allow(clippy::cast_possible_truncation)]
        let mut byte = (value & 0x7f) as u8;
        value >>= 7;
        if value > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if value == 0 {
            return;
        }
    }
}

/// PUBACK (0x40), PUBREC (0x50), PUBREL (0x62) or PUBCOMP (0x70) with a reason code:
/// hand-encoded so any code, valid or not, can be sent.
fn ack_bytes(protocol: Protocol, first: u8, packet_id: u16, code: u8) -> Vec<u8> {
    let id = packet_id.to_be_bytes();
    if protocol == Protocol::V311 || code == 0 {
        vec![first, 2, id[0], id[1]]
    } else {
        vec![first, 3, id[0], id[1], code]
    }
}

fn connack_bytes(
    protocol: Protocol,
    session_present: bool,
    code: u8,
    max_packet_size: Option<u32>,
    receive_maximum: Option<u16>,
) -> Vec<u8> {
    match protocol {
        Protocol::V311 => vec![0x20, 2, u8::from(session_present), code],
        Protocol::V5 => {
            let mut props = Vec::new();
            if let Some(max) = max_packet_size {
                props.push(0x27);
                props.extend_from_slice(&max.to_be_bytes());
            }
            if let Some(max) = receive_maximum {
                props.push(0x21);
                props.extend_from_slice(&max.to_be_bytes());
            }
            let mut body = vec![u8::from(session_present), code];
            put_varint(&mut body, props.len());
            body.extend_from_slice(&props);
            let mut out = vec![0x20];
            put_varint(&mut out, body.len());
            out.extend_from_slice(&body);
            out
        }
    }
}

fn suback_bytes(protocol: Protocol, packet_id: u16, granted: &[u8]) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    if protocol == Protocol::V5 {
        body.push(0);
    }
    body.extend_from_slice(granted);
    let mut out = vec![0x90];
    put_varint(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

fn unsuback_bytes(protocol: Protocol, packet_id: u16, count: usize) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    if protocol == Protocol::V5 {
        body.push(0);
        body.extend(std::iter::repeat_n(0u8, count));
    }
    let mut out = vec![0xB0];
    put_varint(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

fn publish_bytes(
    protocol: Protocol,
    topic: &str,
    payload: &Bytes,
    qos: u8,
    packet_id: u16,
) -> Result<Vec<u8>, String> {
    let mut out = BytesMut::new();
    match protocol {
        Protocol::V311 => {
            let qos = rumqttc::mqttbytes::qos(qos).map_err(|e| e.to_string())?;
            let mut publish =
                rumqttc::mqttbytes::v4::Publish::from_bytes(topic, qos, payload.clone());
            publish.pkid = packet_id;
            rumqttc::mqttbytes::v4::Packet::Publish(publish)
                .write(&mut out, READ_CAP)
                .map_err(|e| e.to_string())?;
        }
        Protocol::V5 => {
            let qos = rumqttc::v5::mqttbytes::qos(qos).ok_or("bad qos")?;
            let mut publish =
                rumqttc::v5::mqttbytes::v5::Publish::new(topic, qos, payload.clone(), None);
            publish.pkid = packet_id;
            rumqttc::v5::mqttbytes::v5::Packet::Publish(publish)
                .write(&mut out, None)
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(out.to_vec())
}

async fn serve(stream: TcpStream, id: usize, shared: Shared, cancel: CancellationToken) {
    if let Err(err) = stream.set_nodelay(true) {
        eprintln!("fake broker: conn {id}: nodelay: {err}");
    }
    let (mut reader, writer) = stream.into_split();
    let mut buf = BytesMut::with_capacity(16 * 1024);

    // The CONNECT.
    let first = tokio::select! {
        () = cancel.cancelled() => return,
        first = read_frame(&mut reader, &mut buf, None) => first,
    };
    let (mut frame, size) = match first {
        Ok(Some(frame)) => frame,
        Ok(None) | Err(_) => {
            record_close(&shared, id, "closed before CONNECT");
            return;
        }
    };
    let protocol = match frame_bounds(&frame)
        .ok()
        .flatten()
        .ok_or_else(|| "bad header".to_string())
        .and_then(|(header, _)| connect_protocol(&frame, header))
    {
        Ok(p) => p,
        Err(err) => {
            eprintln!("fake broker: conn {id}: {err}");
            record_close(&shared, id, &err);
            return;
        }
    };
    let Ok(Incoming::Connect {
        protocol,
        client_id,
        clean,
        keep_alive,
        session_expiry,
        will,
    }) = decode(protocol, &mut frame)
    else {
        record_close(&shared, id, "undecodable CONNECT");
        return;
    };
    let (control_tx, mut control_rx) = mpsc::channel(CONTROL_QUEUE);
    let now = Instant::now();
    let (connack, accepted, takeover, drop_now) = {
        let mut state = lock(&shared);
        let refused = state.script.refuse_connects > 0;
        let mut info = ConnectInfo {
            conn: id,
            at: now,
            protocol,
            client_id: client_id.clone(),
            clean,
            keep_alive,
            session_expiry,
            will: will.clone(),
            accepted: !refused,
            session_present: false,
        };
        state.packets.push(PacketInfo {
            conn: id,
            client_id: client_id.clone(),
            at: now,
            kind: Kind::Connect,
            packet_id: 0,
            dup: false,
            qos: 0,
            retain: false,
            topic: String::new(),
            payload: Bytes::new(),
            user_properties: Vec::new(),
            reason: None,
            size,
            answer: if refused { "refused" } else { "accepted" }.into(),
        });
        if refused {
            state.script.refuse_connects = state.script.refuse_connects.saturating_sub(1);
            let how = state.script.refuse_how;
            state.connects.push(info);
            let connack = match how {
                Refuse::Close => None,
                Refuse::Code(code) => Some(connack_bytes(protocol, false, code, None, None)),
            };
            (connack, false, Vec::new(), false)
        } else {
            // Session takeover: an older connection of the same client id is closed.
            let takeover: Vec<mpsc::Sender<Control>> = state
                .live
                .values()
                .filter(|l| l.client_id == client_id)
                .map(|l| l.control.clone())
                .collect();
            if clean {
                state.sessions.remove(&client_id);
            }
            let session_present = state.sessions.contains_key(&client_id);
            let persistent = match protocol {
                Protocol::V311 => !clean,
                Protocol::V5 => session_expiry.unwrap_or(0) > 0,
            };
            state
                .sessions
                .entry(client_id.clone())
                .or_default()
                .persistent = persistent;
            info.session_present = session_present;
            state.connects.push(info);
            state.live.insert(
                id,
                Live {
                    client_id: client_id.clone(),
                    control: control_tx.clone(),
                },
            );
            let connack = connack_bytes(
                protocol,
                session_present,
                0,
                state.script.max_packet_size,
                state.script.receive_maximum,
            );
            let drop_now = state.script.drop_after_connack > 0;
            state.script.drop_after_connack = state.script.drop_after_connack.saturating_sub(1);
            (Some(connack), true, takeover, drop_now)
        }
    };
    for old in takeover {
        // A closed queue: the old connection is already gone.
        let _sent = old.try_send(Control::Close("session taken over".into()));
    }
    let mut conn = Conn {
        id,
        protocol,
        client_id,
        writer,
        shared: Arc::clone(&shared),
        outstanding: HashSet::new(),
        owed_comp: HashSet::new(),
        deferred: Vec::new(),
        scheduled: Vec::new(),
        will_discarded: false,
        will,
    };
    if let Some(connack) = connack {
        if conn.write(&connack).await.is_err() {
            conn.finish("write CONNACK failed", accepted).await;
            return;
        }
    }
    if !accepted {
        conn.finish("connect refused", false).await;
        return;
    }
    if drop_now {
        conn.finish("scripted drop after CONNACK", true).await;
        return;
    }

    let why = loop {
        let next_due = conn.scheduled.iter().map(|s| s.due).min();
        let max_size = lock(&shared).script.max_packet_size;
        tokio::select! {
            () = cancel.cancelled() => break "broker stopped".to_string(),
            control = control_rx.recv() => match control {
                Some(Control::Close(why)) => break why,
                Some(Control::Publish(burst)) => {
                    let mut bytes = Vec::new();
                    for (topic, payload, qos, packet_id) in burst {
                        match publish_bytes(protocol, &topic, &payload, qos, packet_id) {
                            Ok(encoded) => bytes.extend_from_slice(&encoded),
                            Err(err) => eprintln!("fake broker: encode publish: {err}"),
                        }
                    }
                    if conn.write(&bytes).await.is_err() {
                        break "write failed".into();
                    }
                }
                None => break "control closed".into(),
            },
            () = sleep_until_opt(next_due) => {
                if let Err(why) = conn.run_due().await {
                    break why;
                }
            }
            read = read_frame(&mut reader, &mut buf, max_size) => match read {
                Ok(Some((mut frame, size))) => {
                    let incoming = match decode(protocol, &mut frame) {
                        Ok(incoming) => incoming,
                        Err(err) => break format!("decode error: {err}"),
                    };
                    match conn.handle(incoming, size).await {
                        Ok(true) => {}
                        Ok(false) => break "client DISCONNECT".into(),
                        Err(why) => break why,
                    }
                }
                Ok(None) => break "EOF".into(),
                Err(ReadError::TooLarge(size)) => {
                    lock(&shared).oversized.push(Oversized { conn: id, at: Instant::now(), size });
                    if protocol == Protocol::V5 {
                        // DISCONNECT 0x95 (packet too large); the socket closes anyway.
                        let _written = conn.write(&[0xE0, 1, 0x95]).await;
                    }
                    break format!("packet of {size} bytes exceeds the maximum packet size");
                }
                Err(ReadError::Io(err)) => break format!("read error: {err}"),
            }
        }
    };
    conn.finish(&why, true).await;
}

async fn sleep_until_opt(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

enum ReadError {
    TooLarge(usize),
    Io(String),
}

/// Reads until `buf` holds one whole frame and splits it off: (frame, size); `None` on
/// a clean EOF. Cancel-safe: bytes read stay in `buf`.
async fn read_frame(
    reader: &mut tokio::net::tcp::OwnedReadHalf,
    buf: &mut BytesMut,
    max_size: Option<u32>,
) -> Result<Option<(BytesMut, usize)>, ReadError> {
    loop {
        match frame_bounds(buf) {
            Err(err) => return Err(ReadError::Io(err)),
            Ok(Some((_, total))) => {
                let limit = max_size.map_or(READ_CAP, |m| usize::try_from(m).unwrap_or(usize::MAX));
                if total > limit.min(READ_CAP) {
                    return Err(ReadError::TooLarge(total));
                }
                if buf.len() >= total {
                    return Ok(Some((buf.split_to(total), total)));
                }
            }
            Ok(None) => {}
        }
        buf.reserve(16 * 1024);
        match reader.read_buf(buf).await {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(err) => return Err(ReadError::Io(err.to_string())),
        }
    }
}

fn run_hook(hook: Option<&Hook>, info: &PacketInfo) {
    if let Some(hook) = hook {
        (hook.0)(info);
    }
}

fn record_close(shared: &Shared, conn: usize, why: &str) {
    lock(shared).closed.push(Closed {
        conn,
        at: Instant::now(),
        why: why.to_string(),
    });
}

impl Conn {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        match tokio::time::timeout(Duration::from_secs(10), self.writer.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(format!("write error: {err}")),
            Err(_) => Err("write timed out (client not reading)".into()),
        }
    }

    /// A client's PUBACK (`qos` 1) or PUBCOMP (`qos` 2) for a broker-sent PUBLISH.
    fn outbound_done(&self, info: PacketInfo, qos: u8) {
        let mut state = lock(&self.shared);
        let id = info.packet_id;
        if let Some(out) = state.outbound.iter_mut().rev().find(|o| {
            o.conn == self.id && o.packet_id == id && o.qos == qos && o.acked_at.is_none()
        }) {
            out.acked_at = Some(info.at);
            out.ack_reason = info.reason;
        }
        state.packets.push(info);
    }

    /// A packet id got its final answer: no longer outstanding.
    fn complete(&mut self, packet_id: u16) {
        self.outstanding.remove(&packet_id);
        self.owed_comp.remove(&packet_id);
    }

    fn deliver(&self, delivery: Option<Delivery>) {
        if let Some(delivery) = delivery {
            lock(&self.shared).deliveries.push(delivery);
        }
    }

    async fn run_due(&mut self) -> Result<(), String> {
        let now = Instant::now();
        let (due, later): (Vec<Scheduled>, Vec<Scheduled>) = std::mem::take(&mut self.scheduled)
            .into_iter()
            .partition(|s| s.due <= now);
        self.scheduled = later;
        for item in due {
            self.write(&item.bytes).await?;
            self.deliver(item.delivery);
            if let Some(id) = item.completes {
                self.complete(id);
            }
        }
        Ok(())
    }

    /// Handles one packet; `Ok(false)` after a client DISCONNECT, `Err(why)` to close.
    async fn handle(&mut self, incoming: Incoming, size: usize) -> Result<bool, String> {
        let now = Instant::now();
        let hook = lock(&self.shared).script.hook.clone();
        let mut info = PacketInfo {
            conn: self.id,
            client_id: self.client_id.clone(),
            at: now,
            kind: Kind::Other,
            packet_id: 0,
            dup: false,
            qos: 0,
            retain: false,
            topic: String::new(),
            payload: Bytes::new(),
            user_properties: Vec::new(),
            reason: None,
            size,
            answer: String::new(),
        };
        match incoming {
            Incoming::Publish {
                dup,
                qos,
                retain,
                topic,
                packet_id,
                payload,
                user_properties,
            } => {
                info.kind = Kind::Publish;
                info.packet_id = packet_id;
                info.dup = dup;
                info.qos = qos;
                info.retain = retain;
                info.topic = topic;
                info.payload = payload;
                info.user_properties = user_properties;
                run_hook(hook.as_ref(), &info);
                self.on_publish(info).await
            }
            Incoming::PubRel { packet_id } => {
                info.kind = Kind::PubRel;
                info.packet_id = packet_id;
                run_hook(hook.as_ref(), &info);
                self.on_pubrel(info).await
            }
            Incoming::PubAck { packet_id, reason } => {
                info.kind = Kind::PubAck;
                info.packet_id = packet_id;
                info.reason = reason;
                run_hook(hook.as_ref(), &info);
                self.outbound_done(info, 1);
                Ok(true)
            }
            Incoming::PubComp { packet_id, reason } => {
                info.kind = Kind::PubComp;
                info.packet_id = packet_id;
                info.reason = reason;
                run_hook(hook.as_ref(), &info);
                self.outbound_done(info, 2);
                Ok(true)
            }
            Incoming::PubRec { packet_id, reason } => {
                info.kind = Kind::PubRec;
                info.packet_id = packet_id;
                info.reason = reason;
                run_hook(hook.as_ref(), &info);
                {
                    let mut state = lock(&self.shared);
                    if let Some(out) = state.outbound.iter_mut().rev().find(|o| {
                        o.conn == self.id && o.packet_id == packet_id && o.pubrec_at.is_none()
                    }) {
                        out.pubrec_at = Some(now);
                    }
                    state.packets.push(info);
                }
                if reason.unwrap_or(0) < 0x80 {
                    let rel = ack_bytes(self.protocol, 0x62, packet_id, 0);
                    self.write(&rel).await?;
                }
                Ok(true)
            }
            Incoming::Subscribe { packet_id, filters } => {
                info.kind = Kind::Subscribe;
                info.packet_id = packet_id;
                info.topic = filters.first().map(|f| f.0.clone()).unwrap_or_default();
                let granted: Vec<u8> = filters.iter().map(|f| f.1.min(2)).collect();
                run_hook(hook.as_ref(), &info);
                {
                    let mut state = lock(&self.shared);
                    let session = state.sessions.entry(self.client_id.clone()).or_default();
                    for (filter, _) in &filters {
                        if !session.filters.contains(filter) {
                            session.filters.push(filter.clone());
                        }
                    }
                    state.packets.push(info);
                }
                self.write(&suback_bytes(self.protocol, packet_id, &granted))
                    .await?;
                Ok(true)
            }
            Incoming::Unsubscribe { packet_id, count } => {
                info.kind = Kind::Unsubscribe;
                info.packet_id = packet_id;
                run_hook(hook.as_ref(), &info);
                lock(&self.shared).packets.push(info);
                self.write(&unsuback_bytes(self.protocol, packet_id, count))
                    .await?;
                Ok(true)
            }
            Incoming::PingReq => {
                info.kind = Kind::PingReq;
                run_hook(hook.as_ref(), &info);
                let answer = {
                    let mut state = lock(&self.shared);
                    state.packets.push(info);
                    state.script.answer_pings
                };
                if answer {
                    self.write(&[0xD0, 0]).await?;
                }
                Ok(true)
            }
            Incoming::Disconnect { reason } => {
                info.kind = Kind::Disconnect;
                info.reason = reason;
                run_hook(hook.as_ref(), &info);
                lock(&self.shared).packets.push(info);
                // MQTT 5: 0x04 = disconnect with will message.
                self.will_discarded = reason != Some(0x04);
                Ok(false)
            }
            Incoming::Connect { .. } => {
                info.kind = Kind::Connect;
                lock(&self.shared).packets.push(info);
                Err("second CONNECT (protocol error)".into())
            }
            Incoming::Other(what) => {
                lock(&self.shared).packets.push(info);
                Err(format!("unexpected packet from a client: {what}"))
            }
        }
    }

    async fn on_publish(&mut self, mut info: PacketInfo) -> Result<bool, String> {
        let packet_id = info.packet_id;
        let qos = info.qos;
        let protocol = self.protocol;
        // Decide and account under the lock; write afterwards.
        let (reply, receive_max_exceeded) = {
            let mut state = lock(&self.shared);
            let reply = if qos == 0 {
                Reply::Ack
            } else {
                state.script.reply_for(&info)
            };
            let mut receive_max_exceeded = false;
            if qos > 0 && !info.dup {
                let in_session = qos == 2
                    && state
                        .sessions
                        .get(&self.client_id)
                        .is_some_and(|s| s.qos2.contains(&packet_id));
                let why = if self.owed_comp.contains(&packet_id) {
                    Some("its PUBCOMP is still owed")
                } else if self.outstanding.contains(&packet_id) {
                    Some("its earlier flow on this connection is unfinished")
                } else if in_session {
                    Some("it awaits PUBREL in the session")
                } else {
                    None
                };
                if let Some(why) = why {
                    let text = format!(
                        "conn {}: PUBLISH id {packet_id} without DUP while {why} ({})",
                        self.id,
                        info.text().chars().take(120).collect::<String>()
                    );
                    state.violations.push(text);
                }
            }
            if qos > 0 {
                self.outstanding.insert(packet_id);
                state.max_outstanding = state.max_outstanding.max(self.outstanding.len());
                if let Some(max) = state.script.receive_maximum {
                    receive_max_exceeded =
                        protocol == Protocol::V5 && self.outstanding.len() > usize::from(max);
                }
            }
            let rejected = match reply {
                Reply::Code(code) => code >= 0x80,
                Reply::DisconnectWith(_) => true,
                _ => false,
            };
            // QoS 2 state: stored on receipt unless rejected.
            let mut new_qos2 = false;
            if qos == 2 && !rejected {
                let session = state.sessions.entry(self.client_id.clone()).or_default();
                new_qos2 = session.qos2.insert(packet_id);
            }
            if info.retain && !rejected {
                if info.payload.is_empty() {
                    state.retained.remove(&info.topic);
                } else {
                    state
                        .retained
                        .insert(info.topic.clone(), info.payload.clone());
                }
            }
            info.answer = format!("{reply:?}");
            let delivery = Delivery {
                conn: self.id,
                at: info.at,
                qos,
                packet_id,
                topic: info.topic.clone(),
                payload: info.payload.clone(),
                user_properties: info.user_properties.clone(),
            };
            if qos == 0 || new_qos2 {
                state.deliveries.push(delivery);
            }
            state.packets.push(info.clone());
            (reply, receive_max_exceeded)
        };
        if receive_max_exceeded {
            // DISCONNECT 0x93 (receive maximum exceeded).
            let _written = self.write(&[0xE0, 1, 0x93]).await;
            return Err("receive maximum exceeded".into());
        }
        if qos == 0 {
            return Ok(true);
        }
        let first = if qos == 1 { 0x40 } else { 0x50 };
        let ack = ack_bytes(protocol, first, packet_id, 0);
        // A QoS 1 message is delivered when its success PUBACK is written.
        let delivery = (qos == 1).then(|| Delivery {
            conn: self.id,
            at: info.at,
            qos,
            packet_id,
            topic: info.topic.clone(),
            payload: info.payload.clone(),
            user_properties: info.user_properties.clone(),
        });
        // The final answer for QoS 1 is the PUBACK; QoS 2 stays outstanding until PUBCOMP.
        let completes = (qos == 1).then_some(packet_id);
        match reply {
            Reply::Ack => {
                self.write(&ack).await?;
                self.deliver(delivery);
                if let Some(id) = completes {
                    self.complete(id);
                }
                for (bytes, delivery, id) in std::mem::take(&mut self.deferred) {
                    self.write(&bytes).await?;
                    self.deliver(delivery);
                    // A deferred PUBACK ends its flow; a PUBREC'd id waits for PUBCOMP.
                    if is_puback(&bytes) {
                        self.complete(id);
                    }
                }
                Ok(true)
            }
            Reply::Withhold => Ok(true),
            Reply::Delay(delay) => {
                self.scheduled.push(Scheduled {
                    due: Instant::now() + delay,
                    bytes: ack,
                    delivery,
                    completes,
                });
                Ok(true)
            }
            Reply::Code(code) => {
                if protocol == Protocol::V311 {
                    if code >= 0x80 {
                        return Err(format!(
                            "3.1.1 has no negative ack: closing for code {code:#04x}"
                        ));
                    }
                    self.write(&ack).await?;
                    self.deliver(delivery);
                    if let Some(id) = completes {
                        self.complete(id);
                    }
                    return Ok(true);
                }
                self.write(&ack_bytes(protocol, first, packet_id, code))
                    .await?;
                if code >= 0x80 {
                    // A failing PUBACK or PUBREC ends the flow.
                    self.complete(packet_id);
                } else {
                    self.deliver(delivery);
                    if let Some(id) = completes {
                        self.complete(id);
                    }
                }
                Ok(true)
            }
            Reply::Duplicate => {
                self.write(&ack).await?;
                self.write(&ack).await?;
                self.deliver(delivery);
                if let Some(id) = completes {
                    self.complete(id);
                }
                Ok(true)
            }
            Reply::Defer => {
                self.deferred.push((ack, delivery, packet_id));
                Ok(true)
            }
            Reply::Disconnect => Err(format!("scripted disconnect after PUBLISH id {packet_id}")),
            Reply::DisconnectWith(code) => {
                if protocol == Protocol::V5 {
                    let _written = self.write(&[0xE0, 1, code]).await;
                }
                Err(format!(
                    "scripted DISCONNECT {code:#04x} after PUBLISH id {packet_id}"
                ))
            }
        }
    }

    async fn on_pubrel(&mut self, mut info: PacketInfo) -> Result<bool, String> {
        let packet_id = info.packet_id;
        let (reply, known) = {
            let mut state = lock(&self.shared);
            let reply = state.script.rel_reply();
            let releases = !matches!(reply, RelReply::Ignore | RelReply::Disconnect);
            let session = state.sessions.entry(self.client_id.clone()).or_default();
            let known = if releases {
                session.qos2.remove(&packet_id)
            } else {
                session.qos2.contains(&packet_id)
            };
            info.answer = format!("{reply:?}");
            state.packets.push(info);
            (reply, known)
        };
        let default_code = if known || self.protocol == Protocol::V311 {
            0
        } else {
            0x92
        };
        let comp = ack_bytes(self.protocol, 0x70, packet_id, default_code);
        match reply {
            RelReply::Complete => {
                self.write(&comp).await?;
                self.complete(packet_id);
            }
            RelReply::Code(code) => {
                self.write(&ack_bytes(self.protocol, 0x70, packet_id, code))
                    .await?;
                self.complete(packet_id);
            }
            RelReply::Ignore => {}
            RelReply::NoComp => {
                self.owed_comp.insert(packet_id);
            }
            RelReply::Delay(delay) => {
                self.owed_comp.insert(packet_id);
                self.scheduled.push(Scheduled {
                    due: Instant::now() + delay,
                    bytes: comp,
                    delivery: None,
                    completes: Some(packet_id),
                });
            }
            RelReply::Duplicate => {
                self.write(&comp).await?;
                self.write(&comp).await?;
                self.complete(packet_id);
            }
            RelReply::Disconnect | RelReply::ReleaseAndDisconnect => {
                return Err(format!("scripted disconnect at PUBREL id {packet_id}"));
            }
        }
        Ok(true)
    }

    /// Ends the connection: records it, publishes the will when due, drops the session
    /// when it is not persistent.
    async fn finish(mut self, why: &str, accepted: bool) {
        // Best effort: the peer may already be gone.
        let _shutdown = self.writer.shutdown().await;
        let mut state = lock(&self.shared);
        state.closed.push(Closed {
            conn: self.id,
            at: Instant::now(),
            why: why.to_string(),
        });
        if !accepted {
            return;
        }
        state.live.remove(&self.id);
        let still_live = state.live.values().any(|l| l.client_id == self.client_id);
        if !self.will_discarded {
            if let Some(will) = self.will.take() {
                if will.retain {
                    state
                        .retained
                        .insert(will.topic.clone(), will.payload.clone());
                }
                state.wills.push(will);
            }
        }
        if !still_live
            && !state
                .sessions
                .get(&self.client_id)
                .is_some_and(|s| s.persistent)
        {
            state.sessions.remove(&self.client_id);
        }
    }
}

/// Whether a written ack ends its flow for the sender's window (PUBACK), as opposed to
/// a PUBREC, after which the QoS 2 flow waits for PUBREL/PUBCOMP.
fn is_puback(ack: &[u8]) -> bool {
    ack.first().is_some_and(|b| b >> 4 == 4)
}

/// MQTT topic filter matching (`+` one level, `#` the rest).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut levels = topic.split('/');
    for part in filter.split('/') {
        match part {
            "#" => return true,
            "+" => {
                if levels.next().is_none() {
                    return false;
                }
            }
            exact => {
                if levels.next() != Some(exact) {
                    return false;
                }
            }
        }
    }
    levels.next().is_none()
}
