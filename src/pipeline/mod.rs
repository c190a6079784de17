//! The pipeline: bounded, two-lane channels from sources to each sink's buffer.
//!
//! A source hands every event to a [`SourceOutput`], which takes it through the
//! transforms downstream of the source and fans it out to the intake of each sink it
//! reaches. Intakes are bounded; a full intake makes
//! the source wait, which stops it reading its sockets: that is how backpressure reaches
//! devices. Alarms, status and command traffic use the high lane and pass telemetry.

mod ack;
mod failover;
mod intake;
mod router;

pub use ack::{AckOutcome, AckToken, AckWaiter};
pub use failover::{FailoverRoute, FailoverSwitch};
pub use intake::{Intake, IntakeReceiver, Item, WeakIntake, intake};
pub use router::{SourceOutput, Target, TransformNode, deliver_emitted};
