//! The broker's shared state: sessions by client id, the subscription tree, retained
//! messages and delayed wills, with the operations a connection performs on them.
//!
//! Pure and synchronous: the caller holds it behind one lock for short, bounded
//! operations and passes the time in milliseconds. Operations that make messages
//! sendable return the connection ids to wake. Every operation on a session names the
//! connection that owns it, so a connection taken over by a newer one can no longer
//! change the session ([`BrokerError::NotOwner`]).
//!
//! Delivery (MQTT 5 §4.5, §4.8): a publish reaches every matching non-shared
//! subscription of a client once, at the highest QoS among them (downgraded to the
//! publish's), with every matching subscription identifier; a shared subscription
//! (`$share/{group}/{filter}`) reaches one of its members, an online one when there is
//! one, in turn. QoS 0 messages are not queued for offline sessions.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::codec::{Message, SubscribeFilter};
use crate::retained::{RetainOutcome, RetainedStore};
use crate::session::{AckError, Delivery, IncomingQos2, Outgoing, OutgoingState};
use crate::topic::{TopicLimits, parse_filter};
use crate::tree::{SubOptions, SubscriberKey, SubscriptionTree};

/// Limits of one broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokerLimits {
    /// Messages queued per session (offline, or beyond the in-flight window).
    pub max_queued: usize,
    /// QoS 1/2 messages in flight to one client at most (its Receive Maximum is capped
    /// to this).
    pub max_inflight: u16,
    /// Retained topics held.
    pub max_retained: usize,
    /// Subscriptions one session may hold.
    pub max_subscriptions: usize,
    /// Topic name and filter limits.
    pub topic: TopicLimits,
    /// Longest session expiry granted, in seconds (also what a 3.1.1 persistent session
    /// gets).
    pub max_session_expiry: u32,
}

impl Default for BrokerLimits {
    fn default() -> Self {
        Self {
            max_queued: 1000,
            max_inflight: 32,
            max_retained: 10_000,
            max_subscriptions: 100,
            topic: TopicLimits::default(),
            max_session_expiry: 24 * 3600,
        }
    }
}

/// A session operation refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The connection no longer owns the session (taken over, or never had one).
    #[error("the session belongs to another connection")]
    NotOwner,
    /// An acknowledgement that does not fit.
    #[error(transparent)]
    Ack(#[from] AckError),
    /// A protocol error in a SUBSCRIBE (no local on a shared subscription).
    #[error("no local on a shared subscription")]
    NoLocalOnShared,
}

/// What a CONNECT asks of the session store.
#[derive(Debug, Clone)]
pub struct SessionParams {
    /// Client identifier (already assigned when the client sent none).
    pub client_id: Arc<str>,
    /// The connection taking the session.
    pub connection: u64,
    /// Discard any previous session.
    pub clean_start: bool,
    /// Session expiry in seconds once disconnected (already capped).
    pub session_expiry: u32,
    /// The client's Receive Maximum.
    pub receive_maximum: u16,
}

/// What the session store did for a CONNECT.
#[derive(Debug)]
pub struct ConnectOutcome {
    /// A previous session was resumed.
    pub session_present: bool,
    /// The connection that held the client id before, to be closed (0x8E).
    pub taken_over: Option<u64>,
    /// In-flight messages to resend at once, in order.
    pub resend: Vec<Outgoing>,
}

/// What a publish did.
#[derive(Debug, Default)]
pub struct PublishOutcome {
    /// Connections with new messages to send.
    pub woken: Vec<u64>,
    /// Subscriptions (or share groups) it matched.
    pub matched: usize,
    /// Deliveries refused because a session's queue was full.
    pub dropped: usize,
    /// Whether a retained publish could not be kept (store full).
    pub retain_refused: bool,
}

#[derive(Debug)]
struct Session {
    connection: Option<u64>,
    /// Raw filter (as subscribed, `$share/...` included) → its tree filter and key.
    subscriptions: BTreeMap<String, (String, SubscriberKey)>,
    outgoing: OutgoingState,
    incoming: IncomingQos2,
    expiry_secs: u32,
    offline_since_ms: Option<u64>,
}

/// Sessions, subscriptions, retained messages and delayed wills.
#[derive(Debug)]
pub struct Broker {
    limits: BrokerLimits,
    sessions: HashMap<Arc<str>, Session>,
    tree: SubscriptionTree,
    retained: RetainedStore,
    /// Delayed wills by client id: (message, due time).
    wills: HashMap<Arc<str>, (Message, u64)>,
    share_turn: usize,
}

impl Broker {
    /// An empty broker.
    pub fn new(limits: BrokerLimits) -> Self {
        Self {
            limits,
            sessions: HashMap::new(),
            tree: SubscriptionTree::default(),
            retained: RetainedStore::new(limits.max_retained),
            wills: HashMap::new(),
            share_turn: 0,
        }
    }

    /// The limits.
    pub fn limits(&self) -> &BrokerLimits {
        &self.limits
    }

    /// Sessions held (online and offline).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Retained topics held.
    pub fn retained_count(&self) -> usize {
        self.retained.len()
    }

    /// Subscriptions held.
    pub fn subscription_count(&self) -> usize {
        self.tree.len()
    }

    fn remove_session(&mut self, client: &str) {
        if let Some(session) = self.sessions.remove(client) {
            for (filter, key) in session.subscriptions.values() {
                self.tree.remove(filter, key);
            }
        }
    }

    /// Attaches `params.connection` to the client's session, resuming or replacing it.
    pub fn connect(&mut self, params: &SessionParams) -> ConnectOutcome {
        // A new connection with the same client id cancels a delayed will (5.0 §3.1.3.2).
        self.wills.remove(&params.client_id);
        let window = params.receive_maximum.min(self.limits.max_inflight);
        let taken_over = self
            .sessions
            .get(&params.client_id)
            .and_then(|session| session.connection);
        if params.clean_start {
            self.remove_session(&params.client_id);
        }
        if let Some(session) = self.sessions.get_mut(&params.client_id) {
            session.connection = Some(params.connection);
            session.offline_since_ms = None;
            session.expiry_secs = params.session_expiry;
            session.outgoing.set_window(window);
            return ConnectOutcome {
                session_present: true,
                taken_over,
                resend: session.outgoing.resend(),
            };
        }
        self.sessions.insert(
            Arc::clone(&params.client_id),
            Session {
                connection: Some(params.connection),
                subscriptions: BTreeMap::new(),
                outgoing: OutgoingState::new(window, self.limits.max_queued),
                incoming: IncomingQos2::default(),
                expiry_secs: params.session_expiry,
                offline_since_ms: None,
            },
        );
        ConnectOutcome {
            session_present: false,
            taken_over,
            resend: Vec::new(),
        }
    }

    fn owned(&mut self, client: &str, connection: u64) -> Result<&mut Session, BrokerError> {
        match self.sessions.get_mut(client) {
            Some(session) if session.connection == Some(connection) => Ok(session),
            _ => Err(BrokerError::NotOwner),
        }
    }

    /// The connection ended. With an expiry of 0 the session ends too; otherwise it is
    /// kept offline (queued QoS 0 dropped). `session_expiry` is the final value (a v5
    /// DISCONNECT may change it). Does nothing when the connection no longer owns it.
    pub fn disconnect(
        &mut self,
        client: &str,
        connection: u64,
        session_expiry: u32,
        now_ms: u64,
    ) -> bool {
        let Ok(session) = self.owned(client, connection) else {
            return false;
        };
        session.connection = None;
        session.offline_since_ms = Some(now_ms);
        session.expiry_secs = session_expiry;
        session.outgoing.drop_qos0();
        if session_expiry == 0 {
            self.remove_session(client);
        }
        true
    }

    /// Holds a will until `delay_secs` pass (or the session ends sooner); the caller
    /// publishes wills without delay itself.
    pub fn delay_will(&mut self, client: &str, will: Message, delay_secs: u32, now_ms: u64) {
        let session_end = self
            .sessions
            .get(client)
            .map_or(0, |session| session.expiry_secs);
        let delay = u64::from(delay_secs.min(session_end));
        self.wills
            .insert(Arc::from(client), (will, now_ms + delay * 1000));
    }

    /// Ends offline sessions whose expiry passed and returns the wills now due.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Message> {
        let expired: Vec<Arc<str>> = self
            .sessions
            .iter()
            .filter(|(_, session)| {
                session
                    .offline_since_ms
                    .is_some_and(|since| since + u64::from(session.expiry_secs) * 1000 <= now_ms)
            })
            .map(|(client, _)| Arc::clone(client))
            .collect();
        for client in expired {
            self.remove_session(&client);
        }
        self.retained.expire(now_ms);
        let due: Vec<Arc<str>> = self
            .wills
            .iter()
            .filter(|(_, (_, at))| *at <= now_ms)
            .map(|(client, _)| Arc::clone(client))
            .collect();
        due.into_iter()
            .filter_map(|client| self.wills.remove(&client).map(|(will, _)| will))
            .collect()
    }

    /// Subscribes; one code per filter (granted QoS, or 0x87 not authorized, 0x8F
    /// invalid filter, 0x97 quota exceeded). Matching retained messages are queued
    /// as the retain handling option says. `authorized` is the ACL check of a filter.
    pub fn subscribe(
        &mut self,
        client: &str,
        connection: u64,
        subscription_id: Option<u32>,
        filters: &[SubscribeFilter],
        authorized: &dyn Fn(&str) -> bool,
        now_ms: u64,
    ) -> Result<(Vec<u8>, bool), BrokerError> {
        let limits = self.limits;
        self.owned(client, connection)?;
        if filters
            .iter()
            .any(|f| f.no_local && f.filter.starts_with("$share/"))
        {
            return Err(BrokerError::NoLocalOnShared);
        }
        let client_key: Arc<str> = Arc::from(client);
        let mut codes = Vec::with_capacity(filters.len());
        let mut queued_any = false;
        for request in filters {
            let Ok(parsed) = parse_filter(&request.filter, limits.topic) else {
                codes.push(0x8F);
                continue;
            };
            if !authorized(parsed.filter) {
                codes.push(0x87);
                continue;
            }
            let key = SubscriberKey {
                group: parsed.group.map(|_| Arc::from(request.filter.as_str())),
                client: Arc::clone(&client_key),
            };
            let filter = parsed.filter.to_owned();
            let is_shared = parsed.group.is_some();
            let session = self.owned(client, connection)?;
            let existed = session.subscriptions.contains_key(&request.filter);
            if !existed && session.subscriptions.len() >= limits.max_subscriptions {
                codes.push(0x97);
                continue;
            }
            session
                .subscriptions
                .insert(request.filter.clone(), (filter.clone(), key.clone()));
            let options = SubOptions {
                qos: request.qos,
                no_local: request.no_local,
                retain_as_published: request.retain_as_published,
                subscription_id,
            };
            self.tree.insert(&filter, key, options);
            codes.push(request.qos);
            let send_retained = !is_shared
                && (request.retain_handling == 0 || (request.retain_handling == 1 && !existed));
            if send_retained {
                let retained = self.retained.matching(&filter, now_ms);
                let session = self.owned(client, connection)?;
                for (message, expires_at_ms) in retained {
                    let qos = message.qos.min(request.qos);
                    queued_any |= session.outgoing.enqueue(Delivery {
                        message,
                        qos,
                        retain: true,
                        subscription_ids: subscription_id.into_iter().collect(),
                        expires_at_ms,
                    });
                }
            }
        }
        Ok((codes, queued_any))
    }

    /// Unsubscribes; one code per filter: 0x00, or 0x11 when there was no such
    /// subscription.
    pub fn unsubscribe(
        &mut self,
        client: &str,
        connection: u64,
        filters: &[String],
    ) -> Result<Vec<u8>, BrokerError> {
        let mut codes = Vec::with_capacity(filters.len());
        for raw in filters {
            let session = self.owned(client, connection)?;
            match session.subscriptions.remove(raw) {
                Some((filter, key)) => {
                    self.tree.remove(&filter, &key);
                    codes.push(0x00);
                }
                None => codes.push(0x11),
            }
        }
        Ok(codes)
    }

    /// Routes a message to every matching subscription and updates the retained
    /// store when RETAIN is set. `from` is the publishing client (for no local).
    pub fn publish(
        &mut self,
        from: Option<&str>,
        message: Arc<Message>,
        now_ms: u64,
    ) -> PublishOutcome {
        let mut outcome = PublishOutcome::default();
        let expires_at_ms = message
            .properties
            .expiry_interval
            .map(|secs| now_ms + u64::from(secs) * 1000);
        if message.retain {
            outcome.retain_refused =
                self.retained.set(Arc::clone(&message), expires_at_ms) == RetainOutcome::Full;
        }
        // Per client: the best QoS, RETAIN kept if any subscription keeps it, every id.
        let mut direct: BTreeMap<Arc<str>, (u8, bool, Vec<u32>)> = BTreeMap::new();
        let mut shared: BTreeMap<Arc<str>, Vec<(Arc<str>, SubOptions)>> = BTreeMap::new();
        for (key, options) in self.tree.matching(&message.topic) {
            match key.group {
                None => {
                    if options.no_local && from == Some(&*key.client) {
                        continue;
                    }
                    let entry = direct.entry(key.client).or_insert((0, false, Vec::new()));
                    entry.0 = entry.0.max(options.qos.min(message.qos));
                    entry.1 |= options.retain_as_published && message.retain;
                    entry.2.extend(options.subscription_id);
                }
                Some(group) => shared.entry(group).or_default().push((key.client, options)),
            }
        }
        outcome.matched = direct.len() + shared.len();
        let mut targets: Vec<(Arc<str>, u8, bool, Vec<u32>)> = direct
            .into_iter()
            .map(|(client, (qos, retain, ids))| (client, qos, retain, ids))
            .collect();
        for (_, members) in shared {
            let online: Vec<&(Arc<str>, SubOptions)> = members
                .iter()
                .filter(|(client, _)| {
                    self.sessions
                        .get(client)
                        .is_some_and(|session| session.connection.is_some())
                })
                .collect();
            let pool: Vec<&(Arc<str>, SubOptions)> = if online.is_empty() {
                members.iter().collect()
            } else {
                online
            };
            self.share_turn = self.share_turn.wrapping_add(1);
            let Some((client, options)) = pool.get(self.share_turn % pool.len().max(1)) else {
                continue;
            };
            targets.push((
                Arc::clone(client),
                options.qos.min(message.qos),
                options.retain_as_published && message.retain,
                options.subscription_id.into_iter().collect(),
            ));
        }
        for (client, qos, retain, subscription_ids) in targets {
            let Some(session) = self.sessions.get_mut(&client) else {
                continue;
            };
            if qos == 0 && session.connection.is_none() {
                continue;
            }
            let queued = session.outgoing.enqueue(Delivery {
                message: Arc::clone(&message),
                qos,
                retain,
                subscription_ids,
                expires_at_ms,
            });
            if !queued {
                outcome.dropped += 1;
            } else if let Some(connection) = session.connection {
                outcome.woken.push(connection);
            }
        }
        outcome
    }

    /// Up to `limit` packets the connection may send now (the window permitting);
    /// the second value counts messages that expired while queued.
    pub fn take(
        &mut self,
        client: &str,
        connection: u64,
        limit: usize,
        now_ms: u64,
    ) -> Result<(Vec<Outgoing>, usize), BrokerError> {
        let session = self.owned(client, connection)?;
        let mut sendable = Vec::new();
        let mut expired = 0;
        while sendable.len() < limit {
            let (next, gone) = session.outgoing.next(now_ms);
            expired += gone;
            match next {
                Some(packet) => sendable.push(packet),
                None => break,
            }
        }
        Ok((sendable, expired))
    }

    /// PUBACK from the client.
    pub fn puback(&mut self, client: &str, connection: u64, id: u16) -> Result<(), BrokerError> {
        Ok(self.owned(client, connection)?.outgoing.puback(id)?)
    }

    /// PUBREC from the client: true when a PUBREL must follow.
    pub fn pubrec(
        &mut self,
        client: &str,
        connection: u64,
        id: u16,
        refused: bool,
    ) -> Result<bool, BrokerError> {
        Ok(self
            .owned(client, connection)?
            .outgoing
            .pubrec(id, refused)?)
    }

    /// PUBCOMP from the client.
    pub fn pubcomp(&mut self, client: &str, connection: u64, id: u16) -> Result<(), BrokerError> {
        Ok(self.owned(client, connection)?.outgoing.pubcomp(id)?)
    }

    /// A message the client cannot receive (too large): forgotten as if delivered.
    pub fn discard(&mut self, client: &str, connection: u64, id: u16) {
        if let Ok(session) = self.owned(client, connection) {
            session.outgoing.discard(id);
        }
    }

    /// An inbound QoS 2 publish: true the first time its id is seen (deliver it),
    /// false for a resend before PUBREL (answer PUBREC only).
    pub fn receive_qos2(
        &mut self,
        client: &str,
        connection: u64,
        id: u16,
    ) -> Result<bool, BrokerError> {
        Ok(self.owned(client, connection)?.incoming.receive(id))
    }

    /// PUBREL from the client: true when the id was awaiting it.
    pub fn release_qos2(
        &mut self,
        client: &str,
        connection: u64,
        id: u16,
    ) -> Result<bool, BrokerError> {
        Ok(self.owned(client, connection)?.incoming.release(id))
    }

    /// Forgets an inbound QoS 2 id whose message was refused with PUBREC >= 0x80.
    pub fn forget_qos2(&mut self, client: &str, connection: u64, id: u16) {
        if let Ok(session) = self.owned(client, connection) {
            session.incoming.forget(id);
        }
    }

    /// Inbound QoS 2 ids awaiting PUBREL.
    pub fn awaiting_release(&self, client: &str) -> usize {
        self.sessions
            .get(client)
            .map_or(0, |session| session.incoming.len())
    }
}

#[cfg(test)]
mod tests;
