//! The QoS state of one session (MQTT 3.1.1 §4.3-4.4, 5.0 §4.3-4.4, §4.9): messages on
//! their way to the client (queued, in flight awaiting PUBACK/PUBREC, released awaiting
//! PUBCOMP) and QoS 2 packet ids received from it awaiting PUBREL.
//!
//! Invariants: at most `window` (the client's Receive Maximum, capped by the broker's
//! `max_inflight`) QoS 1/2 messages in flight; packet ids in flight are unique and never
//! 0; in-flight messages are resent in their original order, with DUP, on reconnect;
//! the queue holds at most `max_queued` messages and every refused one is reported to
//! the caller (who counts it). Tested against a model by a property test.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use crate::codec::Message;

/// One message for one subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The message as published (shared by every subscriber).
    pub message: Arc<Message>,
    /// QoS after downgrading to the subscription's.
    pub qos: u8,
    /// RETAIN flag as sent to this subscriber.
    pub retain: bool,
    /// Subscription identifiers of the matching subscriptions (MQTT 5).
    pub subscription_ids: Vec<u32>,
    /// When the message expires (MQTT 5 message expiry), in the caller's milliseconds.
    pub expires_at_ms: Option<u64>,
}

/// A packet the session wants sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// A PUBLISH; `id` is 0 for QoS 0.
    Publish {
        /// Packet id.
        id: u16,
        /// Redelivery.
        dup: bool,
        /// What to send.
        delivery: Delivery,
    },
    /// A PUBREL for a QoS 2 message the client acknowledged with PUBREC.
    PubRel {
        /// Packet id.
        id: u16,
    },
}

/// An acknowledgement that does not fit the session's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// No message in flight has this packet id (MQTT 5 reason 0x92).
    #[error("packet id {0} not in flight")]
    UnknownId(u16),
    /// The id is in flight but awaits a different acknowledgement.
    #[error("packet id {0} is awaiting another acknowledgement")]
    WrongState(u16),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Inflight {
    /// Sent; awaiting PUBACK (QoS 1) or PUBREC (QoS 2).
    Sent(Delivery),
    /// PUBREC received and PUBREL sent; awaiting PUBCOMP.
    Released,
}

/// Messages on their way to the client.
#[derive(Debug)]
pub struct OutgoingState {
    inflight: VecDeque<(u16, Inflight)>,
    queue: VecDeque<Delivery>,
    max_queued: usize,
    window: usize,
    next_id: u16,
}

impl OutgoingState {
    /// An empty state: `window` messages in flight at most, `max_queued` waiting.
    pub fn new(window: u16, max_queued: usize) -> Self {
        Self {
            inflight: VecDeque::new(),
            queue: VecDeque::new(),
            max_queued,
            window: usize::from(window.max(1)),
            next_id: 0,
        }
    }

    /// The client's Receive Maximum for this connection (at least 1).
    pub fn set_window(&mut self, window: u16) {
        self.window = usize::from(window.max(1));
    }

    /// Messages in flight.
    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    /// Messages waiting for the window or for the client to come back.
    pub fn queued_len(&self) -> usize {
        self.queue.len()
    }

    /// Queues a message; false when the queue is full and it was refused.
    pub fn enqueue(&mut self, delivery: Delivery) -> bool {
        if self.queue.len() >= self.max_queued {
            return false;
        }
        self.queue.push_back(delivery);
        true
    }

    /// Drops queued QoS 0 messages (the client went offline); returns how many.
    pub fn drop_qos0(&mut self) -> usize {
        let before = self.queue.len();
        self.queue.retain(|delivery| delivery.qos > 0);
        before - self.queue.len()
    }

    fn allocate_id(&mut self) -> u16 {
        loop {
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            let id = self.next_id;
            if !self.inflight.iter().any(|(used, _)| *used == id) {
                return id;
            }
        }
    }

    /// The next publish to send, if the window allows; expired messages are skipped
    /// (counted in the second value).
    pub fn next(&mut self, now_ms: u64) -> (Option<Outgoing>, usize) {
        let mut expired = 0;
        loop {
            let Some(front) = self.queue.front() else {
                return (None, expired);
            };
            if front.expires_at_ms.is_some_and(|at| at <= now_ms) {
                self.queue.pop_front();
                expired += 1;
                continue;
            }
            if front.qos > 0 && self.inflight.len() >= self.window {
                return (None, expired);
            }
            let Some(delivery) = self.queue.pop_front() else {
                return (None, expired);
            };
            if delivery.qos == 0 {
                return (
                    Some(Outgoing::Publish {
                        id: 0,
                        dup: false,
                        delivery,
                    }),
                    expired,
                );
            }
            let id = self.allocate_id();
            self.inflight
                .push_back((id, Inflight::Sent(delivery.clone())));
            return (
                Some(Outgoing::Publish {
                    id,
                    dup: false,
                    delivery,
                }),
                expired,
            );
        }
    }

    fn position(&self, id: u16) -> Result<usize, AckError> {
        self.inflight
            .iter()
            .position(|(used, _)| *used == id)
            .ok_or(AckError::UnknownId(id))
    }

    /// PUBACK for a QoS 1 message.
    pub fn puback(&mut self, id: u16) -> Result<(), AckError> {
        let at = self.position(id)?;
        match &self.inflight[at].1 {
            Inflight::Sent(delivery) if delivery.qos == 1 => {
                self.inflight.remove(at);
                Ok(())
            }
            _ => Err(AckError::WrongState(id)),
        }
    }

    /// PUBREC for a QoS 2 message: `Ok(true)` when a PUBREL must follow, `Ok(false)`
    /// when the client refused it (reason code >= 0x80) and it is done.
    pub fn pubrec(&mut self, id: u16, refused: bool) -> Result<bool, AckError> {
        let at = self.position(id)?;
        match &self.inflight[at].1 {
            Inflight::Sent(delivery) if delivery.qos == 2 => {
                if refused {
                    self.inflight.remove(at);
                    Ok(false)
                } else {
                    self.inflight[at].1 = Inflight::Released;
                    Ok(true)
                }
            }
            // A repeated PUBREC after our PUBREL: answer it again.
            Inflight::Released => Ok(true),
            Inflight::Sent(_) => Err(AckError::WrongState(id)),
        }
    }

    /// PUBCOMP for a released QoS 2 message.
    pub fn pubcomp(&mut self, id: u16) -> Result<(), AckError> {
        let at = self.position(id)?;
        match self.inflight[at].1 {
            Inflight::Released => {
                self.inflight.remove(at);
                Ok(())
            }
            Inflight::Sent(_) => Err(AckError::WrongState(id)),
        }
    }

    /// Forgets an in-flight message the client cannot receive (larger than its Maximum
    /// Packet Size): MQTT 5 §3.1.2.11.4 says to discard it as if it were delivered.
    pub fn discard(&mut self, id: u16) {
        self.inflight.retain(|(used, _)| *used != id);
    }

    /// Everything in flight, in the original order, for a resumed session: publishes
    /// with DUP set, and PUBRELs for released QoS 2 messages.
    pub fn resend(&self) -> Vec<Outgoing> {
        self.inflight
            .iter()
            .map(|(id, state)| match state {
                Inflight::Sent(delivery) => Outgoing::Publish {
                    id: *id,
                    dup: true,
                    delivery: delivery.clone(),
                },
                Inflight::Released => Outgoing::PubRel { id: *id },
            })
            .collect()
    }
}

/// QoS 2 packet ids received from the client and answered with PUBREC, awaiting PUBREL
/// (method B of MQTT 5 §4.3.3: the message was delivered onwards on first receipt).
#[derive(Debug, Default)]
pub struct IncomingQos2 {
    ids: HashSet<u16>,
}

impl IncomingQos2 {
    /// Records a QoS 2 publish; false when the id is already held (a DUP resend that
    /// must not be delivered onwards again).
    pub fn receive(&mut self, id: u16) -> bool {
        self.ids.insert(id)
    }

    /// PUBREL: true when the id was held (reason 0x00), false when unknown (0x92).
    pub fn release(&mut self, id: u16) -> bool {
        self.ids.remove(&id)
    }

    /// Forgets an id whose message was refused (no PUBREL will come).
    pub fn forget(&mut self, id: u16) {
        self.ids.remove(&id);
    }

    /// Ids awaiting PUBREL.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no id awaits PUBREL.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use proptest::prelude::*;

    use super::*;
    use crate::codec::MessageProperties;

    fn delivery(seq: u32, qos: u8) -> Delivery {
        Delivery {
            message: Arc::new(Message {
                topic: "t".into(),
                payload: Bytes::from(seq.to_be_bytes().to_vec()),
                qos,
                retain: false,
                properties: MessageProperties::default(),
            }),
            qos,
            retain: false,
            subscription_ids: Vec::new(),
            expires_at_ms: None,
        }
    }

    fn seq_of(delivery: &Delivery) -> u32 {
        let bytes: [u8; 4] = delivery.message.payload[..4].try_into().unwrap();
        u32::from_be_bytes(bytes)
    }

    #[test]
    fn window_limits_inflight_and_qos0_bypasses_it() {
        let mut state = OutgoingState::new(1, 10);
        assert!(state.enqueue(delivery(1, 1)));
        assert!(state.enqueue(delivery(2, 1)));
        assert!(state.enqueue(delivery(3, 0)));
        let (first, _) = state.next(0);
        let Some(Outgoing::Publish { id, .. }) = first else {
            panic!("expected a publish")
        };
        assert_eq!(
            state.next(0).0,
            None,
            "window full; QoS 0 waits behind in order"
        );
        state.puback(id).unwrap();
        assert!(matches!(
            state.next(0).0,
            Some(Outgoing::Publish { id: 2, .. })
        ));
        assert_eq!(state.puback(99), Err(AckError::UnknownId(99)));
    }

    #[test]
    fn expired_messages_are_skipped() {
        let mut state = OutgoingState::new(10, 10);
        let mut old = delivery(1, 1);
        old.expires_at_ms = Some(5);
        state.enqueue(old);
        state.enqueue(delivery(2, 1));
        let (next, expired) = state.next(10);
        assert_eq!(expired, 1);
        let Some(Outgoing::Publish { delivery, .. }) = next else {
            panic!("expected a publish")
        };
        assert_eq!(seq_of(&delivery), 2);
    }

    #[test]
    fn incoming_qos2_dedupes_until_pubrel() {
        let mut incoming = IncomingQos2::default();
        assert!(incoming.receive(7));
        assert!(!incoming.receive(7));
        assert!(incoming.release(7));
        assert!(!incoming.release(7));
        assert!(incoming.receive(7));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Enqueue(u8),
        Next,
        PubAck(usize),
        PubRec(usize, bool),
        PubComp(usize),
        BogusAck(u16),
        Reconnect(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..3).prop_map(Op::Enqueue),
            Just(Op::Next),
            Just(Op::Next),
            (0usize..8).prop_map(Op::PubAck),
            ((0usize..8), any::<bool>()).prop_map(|(at, refused)| Op::PubRec(at, refused)),
            (0usize..8).prop_map(Op::PubComp),
            any::<u16>().prop_map(Op::BogusAck),
            (1u16..5).prop_map(Op::Reconnect),
        ]
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum ModelState {
        Queued,
        Sent(u16),
        Released(u16),
        Done,
        Dropped,
    }

    proptest! {
        /// Every QoS 1/2 message is exactly one of queued, in flight, released, done or
        /// refused; ids in flight are unique and non-zero; the window holds; sends and
        /// resends keep the enqueue order; wrong acks change nothing.
        #[test]
        fn outgoing_state_matches_the_model(window in 1u16..4, max_queued in 1usize..6, ops in prop::collection::vec(op(), 0..80)) {
            let mut state = OutgoingState::new(window, max_queued);
            let mut window = usize::from(window);
            // (seq, qos, state) per QoS 1/2 message.
            let mut model: Vec<(u32, u8, ModelState)> = Vec::new();
            let mut queued_qos0 = 0usize;
            let mut seq = 0u32;
            for op in ops {
                let inflight_ids: Vec<u16> = model.iter().filter_map(|(_, _, s)| match s {
                    ModelState::Sent(id) | ModelState::Released(id) => Some(*id),
                    _ => None,
                }).collect();
                match op {
                    Op::Enqueue(qos) => {
                        seq += 1;
                        let queued_now = model.iter().filter(|m| m.2 == ModelState::Queued).count() + queued_qos0;
                        let accepted = state.enqueue(delivery(seq, qos));
                        prop_assert_eq!(accepted, queued_now < max_queued);
                        if qos == 0 {
                            if accepted { queued_qos0 += 1; }
                        } else {
                            model.push((seq, qos, if accepted { ModelState::Queued } else { ModelState::Dropped }));
                        }
                    }
                    Op::Next => {
                        let (next, _) = state.next(0);
                        match next {
                            Some(Outgoing::Publish { id, dup, delivery }) => {
                                prop_assert!(!dup);
                                if delivery.qos == 0 {
                                    prop_assert_eq!(id, 0);
                                    queued_qos0 -= 1;
                                } else {
                                    prop_assert!(id != 0);
                                    prop_assert!(!inflight_ids.contains(&id));
                                    // The oldest queued QoS 1/2 message goes first.
                                    let first = model.iter_mut().find(|m| m.2 == ModelState::Queued);
                                    let Some(first) = first else { return Err(TestCaseError::fail("sent from an empty model queue")); };
                                    prop_assert_eq!(first.0, seq_of(&delivery));
                                    first.2 = ModelState::Sent(id);
                                    prop_assert!(inflight_ids.len() < window);
                                }
                            }
                            Some(Outgoing::PubRel { .. }) => prop_assert!(false, "next never releases"),
                            None => {
                                let front_blocked = inflight_ids.len() >= window;
                                let queued = model.iter().any(|m| m.2 == ModelState::Queued) || queued_qos0 > 0;
                                prop_assert!(!queued || front_blocked);
                            }
                        }
                    }
                    Op::PubAck(at) | Op::PubRec(at, _) | Op::PubComp(at) => {
                        let Some(&id) = inflight_ids.get(at) else { continue };
                        let entry = model.iter_mut().find(|m| matches!(m.2, ModelState::Sent(i) | ModelState::Released(i) if i == id));
                        let Some(entry) = entry else { continue };
                        match (op, entry.1, entry.2) {
                            (Op::PubAck(_), 1, ModelState::Sent(_)) => {
                                prop_assert_eq!(state.puback(id), Ok(()));
                                entry.2 = ModelState::Done;
                            }
                            (Op::PubAck(_), _, _) => prop_assert_eq!(state.puback(id), Err(AckError::WrongState(id))),
                            (Op::PubRec(_, refused), 2, ModelState::Sent(_)) => {
                                prop_assert_eq!(state.pubrec(id, refused), Ok(!refused));
                                entry.2 = if refused { ModelState::Done } else { ModelState::Released(id) };
                            }
                            (Op::PubRec(_, refused), 2, ModelState::Released(_)) => prop_assert_eq!(state.pubrec(id, refused), Ok(true)),
                            (Op::PubRec(_, refused), _, _) => prop_assert_eq!(state.pubrec(id, refused), Err(AckError::WrongState(id))),
                            (Op::PubComp(_), _, ModelState::Released(_)) => {
                                prop_assert_eq!(state.pubcomp(id), Ok(()));
                                entry.2 = ModelState::Done;
                            }
                            (Op::PubComp(_), _, _) => prop_assert_eq!(state.pubcomp(id), Err(AckError::WrongState(id))),
                            _ => {}
                        }
                    }
                    Op::BogusAck(id) => {
                        if !inflight_ids.contains(&id) {
                            prop_assert_eq!(state.puback(id), Err(AckError::UnknownId(id)));
                            prop_assert_eq!(state.pubcomp(id), Err(AckError::UnknownId(id)));
                        }
                    }
                    Op::Reconnect(new_window) => {
                        // Offline: QoS 0 is dropped; back online with a new window.
                        prop_assert_eq!(state.drop_qos0(), queued_qos0);
                        queued_qos0 = 0;
                        state.set_window(new_window);
                        window = usize::from(new_window);
                        let resent = state.resend();
                        let expected: Vec<(u16, bool)> = model.iter().filter_map(|m| match m.2 {
                            ModelState::Sent(id) => Some((id, true)),
                            ModelState::Released(id) => Some((id, false)),
                            _ => None,
                        }).collect();
                        let got: Vec<(u16, bool)> = resent.iter().map(|out| match out {
                            Outgoing::Publish { id, dup, .. } => { assert!(*dup); (*id, true) }
                            Outgoing::PubRel { id } => (*id, false),
                        }).collect();
                        prop_assert_eq!(got, expected);
                    }
                }
                let in_model = model.iter().filter(|m| matches!(m.2, ModelState::Sent(_) | ModelState::Released(_))).count();
                prop_assert_eq!(state.inflight_len(), in_model);
                let queued_model = model.iter().filter(|m| m.2 == ModelState::Queued).count() + queued_qos0;
                prop_assert_eq!(state.queued_len(), queued_model);
            }
        }
    }
}
