//! The pipeline: bounded, two-lane channels from sources to each sink's buffer.
//!
//! A source hands every event to a [`SourceOutput`], which fans it out to the intake of
//! each sink that lists the source in `inputs`. Intakes are bounded; a full intake makes
//! the source wait, which stops it reading its sockets: that is how backpressure reaches
//! devices. Alarms, status and command traffic use the high lane and pass telemetry.

mod ack;
mod intake;

pub use ack::{AckOutcome, AckToken, AckWaiter};
pub use intake::{Intake, IntakeReceiver, Item, WeakIntake, intake};

use fieldgate_core::Event;

/// Where one source's events go: the intakes of every sink reading it.
#[derive(Clone, Default)]
pub struct SourceOutput {
    intakes: Vec<Intake>,
}

impl SourceOutput {
    /// An output feeding `intakes`.
    pub fn new(intakes: Vec<Intake>) -> Self {
        Self { intakes }
    }

    /// Sends `event` to every sink, waiting while an intake is full. With `ack`, the
    /// returned waiter resolves once every sink's buffer holds the event.
    pub async fn send(&self, event: Event, ack: bool) -> Option<AckWaiter> {
        let (token, waiter) = if ack {
            let (token, waiter) = AckToken::new();
            (Some(token), Some(waiter))
        } else {
            (None, None)
        };
        let Some((last, rest)) = self.intakes.split_last() else {
            // No sink reads this source: nothing will ever store it.
            return waiter;
        };
        for intake in rest {
            intake
                .send(Item {
                    event: event.clone(),
                    ack: token.clone(),
                })
                .await;
        }
        last.send(Item { event, ack: token }).await;
        waiter
    }
}
