//! The client side of an MQTT session: which of our publishes are in flight under which
//! packet id, and at which step of the QoS 1 / QoS 2 handshake.
//!
//! Pure state, no I/O, so it can be driven by a model-based test. Invariants:
//! - a packet id is in use by at most one publish, and is handed out again only after
//!   that publish ended (round-robin over 1..=65535, so a late ack of an old id meets a
//!   fresh publish only after 65,535 others);
//! - a publish leaves only through its own successful ack (`Delivered`) or a failure
//!   reason code (`Rejected`); an ack for an unknown id, or of the wrong kind for the
//!   publish's step, changes nothing;
//! - across a reconnect every publish keeps its id and step: with a resumed session the
//!   unacknowledged PUBLISHes are resent with DUP and PUBREL is resent for those past
//!   PUBREC (MQTT 3.1.1 §4.4, MQTT 5 §4.4); with a new session all of them start over.

use std::collections::BTreeMap;

use tokio::time::Instant;

/// A publish as it is (re)sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// QoS 1 or 2.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
    /// The event id, sent as the MQTT 5 user property `id` (single-event publishes).
    pub event_id: Option<String>,
}

/// Where a publish is in its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published,
    /// QoS 2: PUBREC received, PUBREL sent, waiting for PUBCOMP.
    Released,
}

/// What to put on the wire for one in-flight publish after a reconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resend {
    /// PUBLISH again (with DUP when the session was resumed).
    Publish {
        /// Packet id.
        id: u16,
        /// Set DUP.
        dup: bool,
    },
    /// PUBREL again.
    Release {
        /// Packet id.
        id: u16,
    },
}

/// The result of an ack.
#[derive(Debug, PartialEq, Eq)]
pub enum AckOutcome<T> {
    /// The broker took the message: its records may go.
    Delivered(T),
    /// QoS 2: PUBREC accepted; send PUBREL for this id.
    Release(u16),
    /// The broker refused the message with `code` (>= 0x80).
    Rejected {
        /// What the publish carried.
        carried: T,
        /// The message, for a retry.
        message: Message,
        /// MQTT 5 reason code.
        code: u8,
    },
    /// No publish in flight matches: a duplicate or late ack, ignored.
    Unknown,
}

#[derive(Debug)]
struct Entry<T> {
    /// Send order, to resend in the original order.
    order: u64,
    step: Step,
    message: Message,
    carried: T,
    /// When it was last put on the wire.
    sent_at: Instant,
}

/// Our publishes awaiting acks, by packet id.
#[derive(Debug)]
pub struct Inflight<T> {
    entries: BTreeMap<u16, Entry<T>>,
    next_id: u16,
    next_order: u64,
    limit: usize,
}

impl<T> Inflight<T> {
    /// At most `limit` publishes in flight (at least 1).
    pub fn new(limit: usize) -> Self {
        Self {
            entries: BTreeMap::new(),
            next_id: 1,
            next_order: 0,
            limit: limit.clamp(1, usize::from(u16::MAX)),
        }
    }

    /// Changes the window (the broker's Receive Maximum); entries beyond it stay.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit.clamp(1, usize::from(u16::MAX));
    }

    /// Publishes in flight.
    pub fn count(&self) -> usize {
        self.entries.len()
    }

    /// Free slots in the window.
    pub fn room(&self) -> usize {
        self.limit.saturating_sub(self.entries.len())
    }

    /// Takes a packet id for `message`; when the window is full, hands both back.
    pub fn insert(&mut self, message: Message, carried: T) -> Result<u16, (Message, T)> {
        if self.room() == 0 {
            return Err((message, carried));
        }
        // The window is below 65,535, so a free id exists and the loop ends.
        let id = loop {
            let candidate = self.next_id;
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            if !self.entries.contains_key(&candidate) {
                break candidate;
            }
        };
        let order = self.next_order;
        self.next_order += 1;
        self.entries.insert(
            id,
            Entry {
                order,
                step: Step::Published,
                message,
                carried,
                sent_at: Instant::now(),
            },
        );
        Ok(id)
    }

    /// Puts back a publish that was in flight under `id` before a restart.
    pub fn restore(&mut self, id: u16, step: Step, message: Message, carried: T) {
        let order = self.next_order;
        self.next_order += 1;
        self.entries.insert(
            id,
            Entry {
                order,
                step,
                message,
                carried,
                sent_at: Instant::now(),
            },
        );
    }

    /// The message in flight under `id`.
    pub fn message(&self, id: u16) -> Option<&Message> {
        self.entries.get(&id).map(|entry| &entry.message)
    }

    /// PUBACK for `id` with reason `code`.
    pub fn on_puback(&mut self, id: u16, code: u8) -> AckOutcome<T> {
        let matches = self
            .entries
            .get(&id)
            .is_some_and(|entry| entry.message.qos == 1 && entry.step == Step::Published);
        if !matches {
            return AckOutcome::Unknown;
        }
        self.finish(id, code)
    }

    /// PUBREC for `id` with reason `code`.
    pub fn on_pubrec(&mut self, id: u16, code: u8) -> AckOutcome<T> {
        let Some(entry) = self.entries.get_mut(&id) else {
            return AckOutcome::Unknown;
        };
        if entry.message.qos != 2 {
            return AckOutcome::Unknown;
        }
        if code >= 0x80 {
            return self.finish(id, code);
        }
        // A repeated PUBREC for a released id is answered with PUBREL again.
        entry.step = Step::Released;
        AckOutcome::Release(id)
    }

    /// PUBCOMP for `id` with reason `code`.
    pub fn on_pubcomp(&mut self, id: u16, code: u8) -> AckOutcome<T> {
        let matches = self
            .entries
            .get(&id)
            .is_some_and(|entry| entry.step == Step::Released);
        if !matches {
            return AckOutcome::Unknown;
        }
        // 0x92 (packet identifier not found) after PUBREC: the broker already owned the
        // message and has forgotten the id; there is nothing left to deliver.
        self.finish(id, if code == 0x92 { 0 } else { code })
    }

    fn finish(&mut self, id: u16, code: u8) -> AckOutcome<T> {
        let Some(entry) = self.entries.remove(&id) else {
            return AckOutcome::Unknown;
        };
        if code >= 0x80 {
            AckOutcome::Rejected {
                carried: entry.carried,
                message: entry.message,
                code,
            }
        } else {
            AckOutcome::Delivered(entry.carried)
        }
    }

    /// After a reconnect: what to send again, oldest first. Without a resumed session the
    /// broker knows none of our ids, so every publish starts over from PUBLISH.
    pub fn resend(&mut self, session_present: bool) -> Vec<Resend> {
        let now = Instant::now();
        let mut entries: Vec<(&u16, &mut Entry<T>)> = self.entries.iter_mut().collect();
        entries.sort_by_key(|(_, entry)| entry.order);
        entries
            .into_iter()
            .map(|(&id, entry)| {
                entry.sent_at = now;
                (id, entry)
            })
            .map(|(id, entry)| match (session_present, entry.step) {
                (true, Step::Released) => Resend::Release { id },
                (true, Step::Published) => Resend::Publish { id, dup: true },
                (false, _) => {
                    entry.step = Step::Published;
                    Resend::Publish { id, dup: false }
                }
            })
            .collect()
    }

    /// When the longest-waiting publish was last sent.
    pub fn oldest_sent_at(&self) -> Option<Instant> {
        self.entries.values().map(|entry| entry.sent_at).min()
    }

    /// The step of `id`, if in flight.
    #[cfg(test)]
    fn step(&self, id: u16) -> Option<Step> {
        self.entries.get(&id).map(|entry| entry.step)
    }

    /// Whatever is in flight that satisfies `predicate`.
    pub fn any(&self, mut predicate: impl FnMut(&T) -> bool) -> bool {
        self.entries.values().any(|entry| predicate(&entry.carried))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use proptest::prelude::*;

    use super::*;

    fn message(qos: u8) -> Message {
        Message {
            topic: "t".into(),
            payload: b"x".to_vec(),
            qos,
            retain: false,
            event_id: None,
        }
    }

    #[test]
    fn ids_are_not_reused_while_in_flight() {
        let mut inflight = Inflight::new(3);
        let a = inflight.insert(message(1), 'a').expect("room");
        let b = inflight.insert(message(1), 'b').expect("room");
        assert_eq!(inflight.on_puback(a, 0), AckOutcome::Delivered('a'));
        let c = inflight.insert(message(1), 'c').expect("room");
        assert!(c != a && c != b);
        // A late duplicate PUBACK for `a` does not touch `c`.
        assert_eq!(inflight.on_puback(a, 0), AckOutcome::Unknown);
        assert_eq!(inflight.count(), 2);
    }

    #[test]
    fn a_withheld_ack_holds_one_slot_not_the_link() {
        let mut inflight = Inflight::new(2);
        let stuck = inflight.insert(message(1), 0).expect("room");
        for n in 1..100 {
            let id = inflight.insert(message(1), n).expect("one slot stays free");
            assert_ne!(id, stuck);
            assert_eq!(inflight.on_puback(id, 0), AckOutcome::Delivered(n));
        }
        assert_eq!(inflight.step(stuck), Some(Step::Published));
    }

    #[test]
    fn qos2_resumes_with_dup_and_release() {
        let mut inflight = Inflight::new(10);
        let published = inflight.insert(message(2), 1).expect("room");
        let released = inflight.insert(message(2), 2).expect("room");
        assert_eq!(
            inflight.on_pubrec(released, 0),
            AckOutcome::Release(released)
        );
        // A PUBCOMP for a publish not yet released is not credited to it.
        assert_eq!(inflight.on_pubcomp(published, 0), AckOutcome::Unknown);
        assert_eq!(
            inflight.resend(true),
            vec![
                Resend::Publish {
                    id: published,
                    dup: true
                },
                Resend::Release { id: released }
            ]
        );
        assert_eq!(inflight.on_pubcomp(released, 0), AckOutcome::Delivered(2));
        // A new session knows nothing: start over from PUBLISH.
        assert_eq!(
            inflight.resend(false),
            vec![Resend::Publish {
                id: published,
                dup: false
            }]
        );
    }

    #[test]
    fn restored_publishes_resume_in_their_step_and_keep_their_ids() {
        let mut inflight = Inflight::new(4);
        inflight.restore(9, Step::Released, message(2), 'a');
        inflight.restore(3, Step::Published, message(2), 'b');
        assert_eq!(
            inflight.resend(true),
            vec![
                Resend::Release { id: 9 },
                Resend::Publish { id: 3, dup: true }
            ]
        );
        let fresh = inflight.insert(message(2), 'c').expect("room");
        assert!(fresh != 9 && fresh != 3);
        assert_eq!(inflight.on_pubcomp(9, 0), AckOutcome::Delivered('a'));
    }

    #[test]
    fn failure_codes_reject_and_free_the_slot() {
        let mut inflight = Inflight::new(1);
        let id = inflight.insert(message(2), 'q').expect("room");
        assert!(inflight.insert(message(1), 'r').is_err());
        assert!(matches!(
            inflight.on_pubrec(id, 0x87),
            AckOutcome::Rejected {
                carried: 'q',
                code: 0x87,
                ..
            }
        ));
        assert_eq!(inflight.room(), 1);
        let id = inflight.insert(message(1), 'r').expect("room again");
        // 0x10 (no matching subscribers) is a success.
        assert_eq!(inflight.on_puback(id, 0x10), AckOutcome::Delivered('r'));
    }

    /// One step of the model test.
    #[derive(Debug, Clone)]
    enum Op {
        Publish {
            qos: u8,
        },
        /// Ack the n-th in-flight id (modulo), or a random id.
        PubAck {
            pick: usize,
            code: u8,
            random_id: Option<u16>,
        },
        PubRec {
            pick: usize,
            code: u8,
        },
        PubComp {
            pick: usize,
            code: u8,
        },
        Reconnect {
            session_present: bool,
        },
    }

    fn code() -> impl Strategy<Value = u8> {
        prop_oneof![
            6 => Just(0x00u8),
            1 => Just(0x10u8),
            1 => Just(0x80u8),
            1 => Just(0x87u8),
            1 => Just(0x97u8),
            1 => Just(0x92u8),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u8..=2).prop_map(|qos| Op::Publish { qos }),
            3 => (any::<usize>(), code(), proptest::option::weighted(0.2, any::<u16>()))
                .prop_map(|(pick, code, random_id)| Op::PubAck { pick, code, random_id }),
            2 => (any::<usize>(), code()).prop_map(|(pick, code)| Op::PubRec { pick, code }),
            2 => (any::<usize>(), code()).prop_map(|(pick, code)| Op::PubComp { pick, code }),
            1 => any::<bool>().prop_map(|session_present| Op::Reconnect { session_present }),
        ]
    }

    proptest! {
        /// Random ack orders, reason codes, duplicate and stale acks, and reconnects:
        /// every publish ends delivered (only by its own success ack), rejected (only by
        /// a failure code), or still in flight; never two of these; and once the broker
        /// behaves, nothing is stuck.
        #[test]
        fn every_publish_is_delivered_rejected_or_in_flight(
            limit in 1usize..6,
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let mut inflight: Inflight<u32> = Inflight::new(limit);
            let mut next = 0u32;
            let mut qos_of: HashMap<u32, u8> = HashMap::new();
            let mut delivered = BTreeSet::new();
            let mut rejected = BTreeSet::new();
            // Model: id -> (carried, step) of what the broker may legitimately ack.
            let mut model: BTreeMap<u16, (u32, Step)> = BTreeMap::new();
            for op in ops {
                let ids: Vec<u16> = model.keys().copied().collect();
                let pick = |n: usize| (!ids.is_empty()).then(|| ids[n % ids.len()]);
                match op {
                    Op::Publish { qos } => {
                        let inserted = inflight.insert(message(qos), next).ok();
                        prop_assert_eq!(inserted.is_some(), model.len() < limit);
                        if let Some(id) = inserted {
                            prop_assert!(!model.contains_key(&id), "id {} reused", id);
                            model.insert(id, (next, Step::Published));
                            qos_of.insert(next, qos);
                            next += 1;
                        }
                    }
                    Op::PubAck { pick: n, code, random_id } => {
                        let Some(id) = random_id.or_else(|| pick(n)) else { continue };
                        let outcome = inflight.on_puback(id, code);
                        match model.get(&id).copied() {
                            Some((carried, Step::Published)) if qos_of[&carried] == 1 => {
                                model.remove(&id);
                                if code >= 0x80 {
                                    let rejected_as_itself = matches!(outcome, AckOutcome::Rejected { carried: c, .. } if c == carried);
                                    prop_assert!(rejected_as_itself, "not rejected as itself");
                                    prop_assert!(rejected.insert(carried));
                                } else {
                                    prop_assert_eq!(outcome, AckOutcome::Delivered(carried));
                                    prop_assert!(delivered.insert(carried));
                                }
                            }
                            _ => prop_assert_eq!(outcome, AckOutcome::Unknown),
                        }
                    }
                    Op::PubRec { pick: n, code } => {
                        let Some(id) = pick(n) else { continue };
                        let outcome = inflight.on_pubrec(id, code);
                        let (carried, _) = model[&id];
                        if qos_of[&carried] != 2 {
                            prop_assert_eq!(outcome, AckOutcome::Unknown);
                        } else if code >= 0x80 {
                            model.remove(&id);
                            let is_rejected = matches!(outcome, AckOutcome::Rejected { .. });
                            prop_assert!(is_rejected, "not rejected");
                            prop_assert!(rejected.insert(carried));
                        } else {
                            model.insert(id, (carried, Step::Released));
                            prop_assert_eq!(outcome, AckOutcome::Release(id));
                        }
                    }
                    Op::PubComp { pick: n, code } => {
                        let Some(id) = pick(n) else { continue };
                        let outcome = inflight.on_pubcomp(id, code);
                        let (carried, step) = model[&id];
                        if step != Step::Released {
                            prop_assert_eq!(outcome, AckOutcome::Unknown);
                        } else {
                            model.remove(&id);
                            if code >= 0x80 && code != 0x92 {
                                prop_assert!(rejected.insert(carried));
                            } else {
                                prop_assert_eq!(outcome, AckOutcome::Delivered(carried));
                                prop_assert!(delivered.insert(carried));
                            }
                        }
                    }
                    Op::Reconnect { session_present } => {
                        let plan = inflight.resend(session_present);
                        prop_assert_eq!(plan.len(), model.len());
                        for resend in plan {
                            match resend {
                                Resend::Release { id } => {
                                    prop_assert!(session_present);
                                    prop_assert_eq!(model[&id].1, Step::Released);
                                }
                                Resend::Publish { id, dup } => {
                                    prop_assert_eq!(dup, session_present);
                                    let entry = model.get_mut(&id).expect("in flight");
                                    if session_present {
                                        prop_assert_eq!(entry.1, Step::Published);
                                    }
                                    entry.1 = Step::Published;
                                }
                            }
                        }
                    }
                }
                prop_assert_eq!(inflight.count(), model.len());
            }
            prop_assert!(delivered.is_disjoint(&rejected));
            // The broker behaves again: ack everything in flight with success.
            for resend in inflight.resend(true) {
                let outcome = match resend {
                    Resend::Release { id } => inflight.on_pubcomp(id, 0),
                    Resend::Publish { id, .. } => match inflight.message(id).map(|m| m.qos) {
                        Some(1) => inflight.on_puback(id, 0),
                        _ => {
                            prop_assert_eq!(inflight.on_pubrec(id, 0), AckOutcome::Release(id));
                            inflight.on_pubcomp(id, 0)
                        }
                    },
                };
                let AckOutcome::Delivered(carried) = outcome else {
                    return Err(TestCaseError::fail(format!("{resend:?} not delivered")));
                };
                prop_assert!(delivered.insert(carried));
            }
            prop_assert_eq!(inflight.count(), 0);
            prop_assert_eq!(delivered.len() + rejected.len(), next as usize);
        }
    }
}
