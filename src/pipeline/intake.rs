//! A sink's intake: two bounded channels, one per priority lane.

use fieldgate_core::{Event, Priority};
use tokio::sync::mpsc;

use super::AckToken;

/// Capacity of the high lane: small, it should never fill.
const HIGH_CAPACITY: usize = 1024;
/// Capacity of the normal lane: enough to absorb bursts between buffer writes.
const NORMAL_CAPACITY: usize = 8192;

/// One event on its way into a buffer.
pub struct Item {
    /// The event.
    pub event: Event,
    /// Set when the source waits for the buffer to store it.
    pub ack: Option<AckToken>,
}

/// The sending side, cloned into every source that feeds the sink.
#[derive(Clone)]
pub struct Intake {
    high: mpsc::Sender<Item>,
    normal: mpsc::Sender<Item>,
}

/// The receiving side, owned by the sink's buffer writer.
pub struct IntakeReceiver {
    /// Alarms, status and command traffic.
    pub high: mpsc::Receiver<Item>,
    /// Telemetry.
    pub normal: mpsc::Receiver<Item>,
}

/// Creates a sink's intake.
pub fn intake() -> (Intake, IntakeReceiver) {
    let (high_tx, high_rx) = mpsc::channel(HIGH_CAPACITY);
    let (normal_tx, normal_rx) = mpsc::channel(NORMAL_CAPACITY);
    (
        Intake {
            high: high_tx,
            normal: normal_tx,
        },
        IntakeReceiver {
            high: high_rx,
            normal: normal_rx,
        },
    )
}

impl Intake {
    /// Queues `item` in its lane, waiting while the lane is full. If the writer is gone
    /// (shutdown), the item is dropped and its ack token reports the rejection.
    pub async fn send(&self, item: Item) {
        let lane = match item.event.priority {
            Priority::High => &self.high,
            Priority::Normal => &self.normal,
        };
        if let Err(mpsc::error::SendError(item)) = lane.send(item).await {
            if let Some(ack) = item.ack {
                ack.reject("shutting_down");
            }
        }
    }
}

impl Intake {
    /// Queues `item` in its lane, waiting while the lane is full; gives it back if the
    /// writer is gone.
    pub async fn deliver(&self, item: Item) -> Result<(), Item> {
        let lane = match item.event.priority {
            Priority::High => &self.high,
            Priority::Normal => &self.normal,
        };
        lane.send(item)
            .await
            .map_err(|mpsc::error::SendError(item)| item)
    }

    /// Queues `item` if its lane has room; gives it back when the lane is full or closed.
    pub fn try_send(&self, item: Item) -> Result<(), Item> {
        let lane = match item.event.priority {
            Priority::High => &self.high,
            Priority::Normal => &self.normal,
        };
        lane.try_send(item).map_err(|err| match err {
            mpsc::error::TrySendError::Full(item) | mpsc::error::TrySendError::Closed(item) => item,
        })
    }
}

/// An intake reference that does not keep the pipeline open (for a sink feeding itself).
#[derive(Clone)]
pub struct WeakIntake {
    high: mpsc::WeakSender<Item>,
    normal: mpsc::WeakSender<Item>,
}

impl Intake {
    /// A reference that lets the intake close once every source is gone.
    pub fn downgrade(&self) -> WeakIntake {
        WeakIntake {
            high: self.high.downgrade(),
            normal: self.normal.downgrade(),
        }
    }
}

impl WeakIntake {
    /// Queues `item` without waiting; false if the lane is full or the intake closed.
    pub fn try_send(&self, item: Item) -> bool {
        let lane = match item.event.priority {
            Priority::High => &self.high,
            Priority::Normal => &self.normal,
        };
        lane.upgrade()
            .is_some_and(|sender| sender.try_send(item).is_ok())
    }
}
