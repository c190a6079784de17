//! The buffer writer: moves events from a sink's intake into its buffer.
//!
//! Group commit: it takes up to [`BATCH`] items at once (high lane first), appends them,
//! makes them durable per the `fsync` policy with one flush or fsync, and only then
//! confirms their ack tokens. When the buffer is full it applies `when_full`: `block`
//! stops taking from the intake (so sources stop reading devices), the drop policies
//! drop and count.

use std::sync::Arc;
use std::time::Duration;

use fieldgate_core::Priority;
use tokio::sync::mpsc::error::TryRecvError;
use tokio_util::sync::CancellationToken;

use super::{AppendError, SinkBuffer};
use crate::config::{FsyncPolicy, WhenFull};
use crate::pipeline::{IntakeReceiver, Item};
use crate::telemetry::Metrics;

/// Items appended per group commit.
const BATCH: usize = 512;
/// How often a blocked writer looks for space even without an ack (a safety net).
const FULL_RETRY: Duration = Duration::from_millis(100);

/// How a writer stores what it receives.
#[derive(Debug, Clone, Copy)]
pub struct WriterPolicy {
    /// What to do when the buffer is full.
    pub when_full: WhenFull,
    /// When to fsync.
    pub fsync: FsyncPolicy,
    /// Period of `FsyncPolicy::Interval`.
    pub fsync_interval: Duration,
}

/// Runs until every sender of the intake is gone (sources stopped), then syncs.
///
/// `stop` fires once the sources have stopped: a writer still waiting for room then
/// gives up on what it holds (never acked to a device) instead of holding up shutdown.
pub async fn run(
    buffer: Arc<SinkBuffer>,
    mut intake: IntakeReceiver,
    policy: WriterPolicy,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut sync_timer = tokio::time::interval(policy.fsync_interval);
    sync_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch: Vec<Item> = Vec::with_capacity(BATCH);
    let mut normal_batch: Vec<Item> = Vec::with_capacity(BATCH);
    let mut high_open = true;
    let mut normal_open = true;
    while high_open || normal_open {
        tokio::select! {
            biased;
            received = intake.high.recv_many(&mut batch, BATCH), if high_open => {
                high_open = received > 0;
            }
            received = intake.normal.recv_many(&mut normal_batch, BATCH), if normal_open => {
                normal_open = received > 0;
                batch.append(&mut normal_batch);
            }
            _ = sync_timer.tick(), if policy.fsync == FsyncPolicy::Interval => {
                if let Err(err) = buffer.commit(true) {
                    tracing::error!(sink = buffer.sink(), error = %err, "periodic buffer sync failed");
                }
                continue;
            }
        }
        // Take whatever urgent items arrived meanwhile, so they are in this commit.
        while batch.len() < BATCH {
            match intake.high.try_recv() {
                Ok(item) => batch.push(item),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        if !batch.is_empty() {
            store(&buffer, &mut batch, policy, &metrics, &stop).await;
        }
    }
    if let Err(err) = buffer.commit(true) {
        tracing::error!(sink = buffer.sink(), error = %err, "final buffer sync failed");
    }
    tracing::debug!(sink = buffer.sink(), "buffer writer stopped");
}

/// Stores `batch` (emptying it), applying the full policy, then commits and confirms.
async fn store(
    buffer: &SinkBuffer,
    batch: &mut Vec<Item>,
    policy: WriterPolicy,
    metrics: &Metrics,
    stop: &CancellationToken,
) {
    // High lane first within the commit, as in the intake.
    batch.sort_by_key(|item| item.event.priority != Priority::High);
    let records: Vec<(Priority, Vec<u8>)> = batch
        .iter()
        .map(|item| {
            let mut record = Vec::with_capacity(item.event.encoded_len());
            item.event.encode(&mut record);
            (item.event.priority, record)
        })
        .collect();
    let mut items = std::mem::take(batch).into_iter();
    let mut stored_tokens = Vec::new();
    let mut offset = 0;
    while offset < records.len() {
        let (stored, error) = buffer.append(&records[offset..]);
        for item in items.by_ref().take(stored) {
            stored_tokens.extend(item.ack);
        }
        offset += stored;
        let reason = match error {
            None => continue,
            Some(AppendError::Full) => match policy.when_full {
                WhenFull::Block if !stop.is_cancelled() => {
                    // Let what is stored go out and be acked while we wait for room.
                    commit(buffer, policy, &mut stored_tokens);
                    tokio::select! {
                        () = stop.cancelled() => {}
                        _timed_out = tokio::time::timeout(FULL_RETRY, buffer.space_freed()) => {}
                    }
                    continue;
                }
                // Shutting down with no room: what was never acked may go.
                WhenFull::Block => "shutting_down",
                WhenFull::DropNewest => "buffer_full",
                WhenFull::DropOldest => match buffer.evict_oldest() {
                    Ok(evicted) if evicted > 0 => {
                        tracing::warn!(
                            sink = buffer.sink(),
                            evicted,
                            "buffer full: oldest events evicted"
                        );
                        metrics.dropped(buffer.sink(), "evicted", evicted);
                        continue;
                    }
                    // Nothing evictable (the record alone exceeds max_size): drop it.
                    _ => "buffer_full",
                },
            },
            Some(AppendError::Storage(err)) => {
                tracing::error!(sink = buffer.sink(), error = %err, "buffer append failed; event not stored");
                "storage_error"
            }
        };
        if let Some(item) = items.next() {
            metrics.dropped(buffer.sink(), reason, 1);
            if let Some(ack) = item.ack {
                ack.reject(reason);
            }
        }
        offset += 1;
    }
    commit(buffer, policy, &mut stored_tokens);
}

/// Flushes (or fsyncs under `always`) and confirms the stored items' acks.
fn commit(buffer: &SinkBuffer, policy: WriterPolicy, tokens: &mut Vec<crate::pipeline::AckToken>) {
    match buffer.commit(policy.fsync == FsyncPolicy::Always) {
        Ok(()) => tokens
            .drain(..)
            .for_each(crate::pipeline::AckToken::confirm),
        Err(err) => {
            tracing::error!(sink = buffer.sink(), error = %err, "buffer commit failed; devices are not acked");
            tokens
                .drain(..)
                .for_each(|token| token.reject("storage_error"));
        }
    }
}
