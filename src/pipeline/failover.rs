//! The routing half of sink failover: a hop that hands each event to exactly one of two
//! sink intakes, the primary's or its failover sink's, as a shared switch says.
//!
//! The switch is flipped by the failover monitor ([`crate::sinks::failover`]); the router
//! reads it once per event, so an event is queued for one buffer only and can never be
//! in both. An event already queued for the primary when the switch flips stays with the
//! primary (it is its backlog).

use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::metrics::counter::Counter;

use super::Intake;

/// Whether a primary sink's new events go to its failover sink, shared by the monitor
/// that decides and every route that reads it.
#[derive(Debug, Default)]
pub struct FailoverSwitch {
    active: AtomicBool,
    /// `fieldgate_failover_events_total{sink,to}`: events sent to the failover sink.
    redirected: Counter,
}

impl FailoverSwitch {
    /// A switch, inactive, counting redirected events in `redirected`.
    pub fn new(redirected: Counter) -> Self {
        Self {
            active: AtomicBool::new(false),
            redirected,
        }
    }

    /// Whether new events go to the failover sink.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Sets the switch; answers its previous position.
    pub fn set(&self, active: bool) -> bool {
        self.active.swap(active, Ordering::AcqRel)
    }

    /// Events redirected so far.
    pub fn redirected(&self) -> u64 {
        self.redirected.get()
    }
}

/// A sink with a failover sink, as a hop of the routing tree.
pub struct FailoverRoute {
    /// The primary sink's intake.
    pub primary: Intake,
    /// The failover sink's intake.
    pub backup: Intake,
    /// Which of the two takes new events.
    pub switch: std::sync::Arc<FailoverSwitch>,
}

impl FailoverRoute {
    /// The intake for the next event (counted when it is the failover sink's).
    pub fn pick(&self) -> &Intake {
        if self.switch.is_active() {
            self.switch.redirected.inc();
            &self.backup
        } else {
            &self.primary
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::pipeline::{Item, intake};
    use crate::transforms::tests::event_json;

    #[test]
    fn each_event_goes_to_exactly_one_intake() {
        let (primary, mut primary_rx) = intake();
        let (backup, mut backup_rx) = intake();
        let switch = Arc::new(FailoverSwitch::default());
        let route = FailoverRoute {
            primary,
            backup,
            switch: Arc::clone(&switch),
        };
        let event = event_json(br#"{"device":"d","seq":1}"#);
        for active in [false, true, true, false] {
            switch.set(active);
            let sent = route.pick().try_send(Item {
                event: event.clone(),
                ack: None,
            });
            assert!(sent.is_ok());
        }
        let count = |rx: &mut crate::pipeline::IntakeReceiver| {
            std::iter::from_fn(|| rx.normal.try_recv().ok()).count()
        };
        assert_eq!(count(&mut primary_rx), 2);
        assert_eq!(count(&mut backup_rx), 2);
        assert_eq!(switch.redirected(), 2);
    }
}
