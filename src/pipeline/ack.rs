//! Acknowledgements from buffers back to the source that received an event.
//!
//! A source in ack mode creates one [`AckToken`] per event and clones it once per sink.
//! Each buffer writer calls [`AckToken::confirm`] once the event is stored (written, or
//! fsynced under `fsync = "always"`). When every clone is gone the [`AckWaiter`] resolves:
//! stored if all confirmed, otherwise rejected with the first reason. A clone dropped
//! without a word (a task ended) counts as a rejection, so no event is acked by accident.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// The fate of an event as far as its device is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// In every buffer: the device may forget it.
    Stored,
    /// Not stored; the reason is a wire code such as `buffer_full` or `shutting_down`.
    Rejected(&'static str),
}

struct Shared {
    rejected: Mutex<Option<&'static str>>,
    tx: Mutex<Option<oneshot::Sender<AckOutcome>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        let rejected = self
            .rejected
            .lock()
            .map(|guard| *guard)
            .unwrap_or(Some("internal_error"));
        let outcome = rejected.map_or(AckOutcome::Stored, AckOutcome::Rejected);
        if let Some(tx) = self.tx.get_mut().ok().and_then(Option::take) {
            // The waiter may be gone (device disconnected); nobody to tell then.
            let _unused = tx.send(outcome);
        }
    }
}

/// One sink's share of an event's acknowledgement.
pub struct AckToken {
    shared: Arc<Shared>,
    settled: bool,
}

/// Resolves when every sink has stored (or refused) the event.
pub struct AckWaiter(oneshot::Receiver<AckOutcome>);

impl AckToken {
    /// A token and the waiter it reports to.
    pub fn new() -> (AckToken, AckWaiter) {
        let (tx, rx) = oneshot::channel();
        let shared = Arc::new(Shared {
            rejected: Mutex::new(None),
            tx: Mutex::new(Some(tx)),
        });
        (
            AckToken {
                shared,
                settled: false,
            },
            AckWaiter(rx),
        )
    }

    /// This sink stored the event.
    pub fn confirm(mut self) {
        self.settled = true;
    }

    /// This sink will never store the event.
    pub fn reject(mut self, reason: &'static str) {
        self.settled = true;
        self.mark_rejected(reason);
    }

    fn mark_rejected(&self, reason: &'static str) {
        if let Ok(mut rejected) = self.shared.rejected.lock() {
            rejected.get_or_insert(reason);
        }
    }
}

impl Clone for AckToken {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            settled: false,
        }
    }
}

impl Drop for AckToken {
    fn drop(&mut self) {
        if !self.settled {
            self.mark_rejected("shutting_down");
        }
    }
}

impl std::future::Future for AckWaiter {
    type Output = AckOutcome;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<AckOutcome> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|result| result.unwrap_or(AckOutcome::Rejected("internal_error")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stored_when_every_clone_confirms() {
        let (token, waiter) = AckToken::new();
        let second = token.clone();
        token.confirm();
        second.confirm();
        assert_eq!(waiter.await, AckOutcome::Stored);
    }

    #[tokio::test]
    async fn first_rejection_wins() {
        let (token, waiter) = AckToken::new();
        let second = token.clone();
        token.reject("buffer_full");
        second.confirm();
        assert_eq!(waiter.await, AckOutcome::Rejected("buffer_full"));
    }

    #[tokio::test]
    async fn silent_drop_is_a_rejection() {
        let (token, waiter) = AckToken::new();
        drop(token);
        assert_eq!(waiter.await, AckOutcome::Rejected("shutting_down"));
    }
}
