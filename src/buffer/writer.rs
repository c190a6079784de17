//! The buffer writer: moves events from a sink's intake into its buffer.
//!
//! Group commit: it takes up to [`BATCH`] items at once (high lane first), appends them,
//! makes them durable per the `fsync` policy with one flush or fsync, and only then
//! confirms their ack tokens. When the buffer is full it applies `when_full`: `block`
//! stops taking from the intake (so sources stop reading devices), the drop policies
//! drop and count. A record that could not fit even the empty buffer is refused
//! (`too_large`) under every policy: waiting for it would block the writer forever.

use std::sync::Arc;
use std::time::Duration;

use fieldgate_core::Priority;
use tokio::sync::mpsc::error::TryRecvError;
use tokio_util::sync::CancellationToken;

use super::{AppendError, SinkBuffer};
use super::{FsyncPolicy, WhenFull};
use crate::pipeline::{AckToken, IntakeReceiver, Item};
use crate::telemetry::Metrics;

/// Items appended per group commit.
const BATCH: usize = 512;
/// Most batches a stopping writer still takes from its intake.
const STOP_DRAIN_BATCHES: usize = 32;
/// How often a blocked writer looks for space even without an ack (a safety net).
const FULL_RETRY: Duration = Duration::from_millis(100);
/// Longest a record no device waits for stays in the writer's memory before it is handed
/// to the OS (a `kill -9` may lose it meanwhile, as it may lose what waits in the intake).
const FLUSH_DELAY: Duration = Duration::from_millis(5);
/// Capacity of the encoding buffer kept between commits; a batch of large records may
/// grow it beyond, and then it is freed.
const SCRATCH_KEEP: usize = 1024 * 1024;

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

/// Runs until every sender of the intake is gone (sources stopped), or `stop` fires and
/// the intake is empty, then syncs.
///
/// `stop` fires once the sources have stopped, or when the shutdown grace ran out: a
/// writer still waiting for room then gives up on what it holds (never acked to a
/// device) instead of holding up shutdown, and a sender still open (a source that did not
/// stop) no longer keeps the writer running. Queued items are stored first.
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
    let mut scratch = Scratch::default();
    // Records no device waits for are handed to the OS within FLUSH_DELAY, together, not
    // one `write` each (see `store`). Armed only while such records are pending.
    let flush_timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(flush_timer);
    let mut flush_pending = false;
    let mut high_open = true;
    let mut normal_open = true;
    while high_open || normal_open {
        tokio::select! {
            biased;
            () = &mut flush_timer, if flush_pending => {
                flush_pending = false;
                if let Err(err) = buffer.commit(false) {
                    tracing::error!(sink = buffer.sink(), error = %err, "buffer flush failed");
                }
                continue;
            }
            received = intake.high.recv_many(&mut batch, BATCH), if high_open => {
                high_open = received > 0;
            }
            received = intake.normal.recv_many(&mut normal_batch, BATCH), if normal_open => {
                normal_open = received > 0;
                batch.append(&mut normal_batch);
            }
            () = stop.cancelled() => {
                // Stopping: store what is queued (bounded: a source that did not stop may
                // still be sending), then end. Anything later is refused as the intake closes.
                for _ in 0..STOP_DRAIN_BATCHES {
                    let before = batch.len();
                    for lane in [&mut intake.high, &mut intake.normal] {
                        while batch.len() < before + BATCH {
                            match lane.try_recv() {
                                Ok(item) => batch.push(item),
                                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                            }
                        }
                    }
                    if batch.is_empty() {
                        break;
                    }
                    store(&buffer, &mut batch, &mut scratch, policy, &metrics, &stop).await;
                }
                break;
            }
            _ = sync_timer.tick(), if policy.fsync == FsyncPolicy::Interval => {
                flush_pending = false;
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
            if store(&buffer, &mut batch, &mut scratch, policy, &metrics, &stop).await {
                flush_pending = false;
            } else if !flush_pending {
                flush_pending = true;
                flush_timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + FLUSH_DELAY);
            }
        }
    }
    if let Err(err) = buffer.commit(true) {
        tracing::error!(sink = buffer.sink(), error = %err, "final buffer sync failed");
    }
    tracing::debug!(sink = buffer.sink(), "buffer writer stopped");
}

/// Stores `batch` (emptying it), applying the full policy, then commits and confirms.
///
/// A batch that no device waits for (no ack token) and that `fsync = "always"` does not
/// cover is appended but not flushed: the sink takes it from memory at once, and the
/// writer flushes within [`FLUSH_DELAY`]. Returns whether it committed.
async fn store(
    buffer: &SinkBuffer,
    batch: &mut Vec<Item>,
    scratch: &mut Scratch,
    policy: WriterPolicy,
    metrics: &Metrics,
    stop: &CancellationToken,
) -> bool {
    // High lane first within the commit, as in the intake.
    batch.sort_by_key(|item| item.event.priority != Priority::High);
    // Every record of the batch encoded into one reused buffer, and the reused list of
    // where each ends: no allocation per record or per batch.
    let Scratch {
        encoded,
        ends,
        stored_tokens,
    } = scratch;
    encoded.clear();
    ends.clear();
    for item in batch.iter() {
        item.event.encode(&mut *encoded);
        ends.push(encoded.len());
    }
    let mut offset = 0;
    while offset < batch.len() {
        let (stored, error) = {
            let (items, encoded, ends) = (&batch[offset..], &encoded[..], &ends[..]);
            let base = offset;
            buffer.append_with(items.len(), |index| {
                let at = base + index;
                let start = if at == 0 { 0 } else { ends[at - 1] };
                let item = &items[index];
                (
                    item.event.priority,
                    &encoded[start..ends[at]],
                    Some(&item.event),
                )
            })
        };
        stored_tokens.extend(
            batch[offset..offset + stored]
                .iter_mut()
                .filter_map(|item| item.ack.take()),
        );
        offset += stored;
        let reason = match error {
            None => continue,
            Some(AppendError::Full) => match policy.when_full {
                WhenFull::Block if !stop.is_cancelled() => {
                    // Let what is stored go out and be acked while we wait for room.
                    commit(buffer, policy, stored_tokens);
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
                    // Nothing left to evict, yet no room: drop the new record instead.
                    _ => "buffer_full",
                },
            },
            // Whatever the policy: no amount of waiting or evicting makes it fit.
            Some(AppendError::TooLarge { len, max }) => {
                tracing::warn!(
                    sink = buffer.sink(),
                    len,
                    max,
                    "event record larger than the whole buffer (buffer.max_size); dropped"
                );
                "too_large"
            }
            Some(AppendError::Storage(err)) => {
                tracing::error!(sink = buffer.sink(), error = %err, "buffer append failed; event not stored");
                "storage_error"
            }
        };
        metrics.dropped(buffer.sink(), reason, 1);
        if let Some(ack) = batch.get_mut(offset).and_then(|item| item.ack.take()) {
            ack.reject(reason);
        }
        offset += 1;
    }
    batch.clear();
    if encoded.capacity() > SCRATCH_KEEP {
        *encoded = Vec::new();
    }
    if stored_tokens.is_empty() && policy.fsync != FsyncPolicy::Always {
        buffer.announce();
        return false;
    }
    commit(buffer, policy, stored_tokens);
    true
}

/// The writer's working memory, kept from one batch to the next.
#[derive(Default)]
struct Scratch {
    /// The batch's records, encoded back to back.
    encoded: Vec<u8>,
    /// Where each record of `encoded` ends.
    ends: Vec<usize>,
    /// Ack tokens of the records stored and not yet committed.
    stored_tokens: Vec<AckToken>,
}

/// Flushes (or fsyncs under `always`) and confirms the stored items' acks.
fn commit(buffer: &SinkBuffer, policy: WriterPolicy, tokens: &mut Vec<AckToken>) {
    match buffer.commit(policy.fsync == FsyncPolicy::Always) {
        Ok(()) => tokens.drain(..).for_each(AckToken::confirm),
        Err(err) => {
            tracing::error!(sink = buffer.sink(), error = %err, "buffer commit failed; devices are not acked");
            tokens
                .drain(..)
                .for_each(|token| token.reject("storage_error"));
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use fieldgate_core::{DeviceId, Event, EventKind, PayloadFormat};
    use tokio::task::JoinHandle;

    use super::*;
    use crate::buffer::{BufferConfig, BufferKind};
    use crate::pipeline::{AckOutcome, AckToken, AckWaiter, Intake, intake};

    /// Payload bytes of the test events: four of them fit a 1 KiB memory buffer, five not.
    const PAYLOAD: usize = 200;
    const MAX_SIZE: u64 = 1024;
    const WAIT: Duration = Duration::from_secs(60);
    /// How long a blocked event is watched to stay blocked: five of the writer's retries.
    const PENDING: Duration = Duration::from_millis(500);

    struct Harness {
        buffer: Arc<SinkBuffer>,
        metrics: Arc<Metrics>,
        intake: Option<Intake>,
        stop: CancellationToken,
        writer: JoinHandle<()>,
        _dir: tempfile::TempDir,
    }

    fn policy(when_full: WhenFull) -> WriterPolicy {
        WriterPolicy {
            when_full,
            fsync: FsyncPolicy::Never,
            fsync_interval: Duration::from_secs(1),
        }
    }

    fn start(kind: BufferKind, max_size: u64, policy: WriterPolicy) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let mut config = BufferConfig {
            kind,
            ..BufferConfig::default()
        };
        config.max_size.0 = max_size;
        let metrics = Arc::new(Metrics::new());
        let buffer =
            Arc::new(SinkBuffer::open("cloud", &config, dir.path(), Arc::clone(&metrics)).unwrap());
        let (sender, receiver) = intake();
        let stop = CancellationToken::new();
        let writer = tokio::spawn(run(
            Arc::clone(&buffer),
            receiver,
            policy,
            Arc::clone(&metrics),
            stop.clone(),
        ));
        Harness {
            buffer,
            metrics,
            intake: Some(sender),
            stop,
            writer,
            _dir: dir,
        }
    }

    fn event(len: usize, fill: u8) -> Event {
        Event::new(
            DeviceId::new("dev-1"),
            EventKind::Telemetry,
            Arc::from("devices"),
            1_764_143_349_123,
            PayloadFormat::Binary,
            Bytes::from(vec![fill; len]),
        )
    }

    impl Harness {
        async fn send(&self, len: usize, fill: u8) -> AckWaiter {
            let (token, waiter) = AckToken::new();
            let intake = self.intake.as_ref().unwrap();
            intake
                .send(crate::pipeline::Item {
                    event: event(len, fill),
                    ack: Some(token),
                })
                .await;
            waiter
        }

        fn dropped(&self, reason: &str) -> u64 {
            self.metrics
                .dropped_events
                .get_or_create(&crate::telemetry::metrics::DropLabels {
                    sink: "cloud".into(),
                    reason: reason.into(),
                })
                .get()
        }

        /// Payload fills of every stored record, read and acked.
        fn drain(&self) -> Vec<u8> {
            let mut fills = Vec::new();
            while let Some(delivery) = self.buffer.try_next() {
                fills.push(delivery.event.payload[0]);
                self.buffer.ack([(delivery.lane, delivery.id)]);
            }
            fills
        }

        /// Closes the intake, waits for the writer to end; returns the data dir.
        async fn finish(self) -> tempfile::TempDir {
            let Harness {
                intake,
                writer,
                _dir,
                ..
            } = self;
            drop(intake);
            tokio::time::timeout(WAIT, writer)
                .await
                .expect("the writer ends once its intake closes")
                .unwrap();
            _dir
        }
    }

    async fn outcome(waiter: AckWaiter) -> AckOutcome {
        tokio::time::timeout(WAIT, waiter)
            .await
            .expect("the ack resolves")
    }

    /// Whether `waiter` is still pending after `time` (several of the writer's retries).
    async fn still_pending(waiter: &mut AckWaiter, time: Duration) -> bool {
        tokio::time::timeout(time, waiter).await.is_err()
    }

    #[tokio::test]
    async fn block_waits_for_room_then_stores() {
        let harness = start(BufferKind::Memory, MAX_SIZE, policy(WhenFull::Block));
        for fill in 1..=4 {
            let waiter = harness.send(PAYLOAD, fill).await;
            assert_eq!(outcome(waiter).await, AckOutcome::Stored);
        }
        let mut fifth = harness.send(PAYLOAD, 5).await;
        assert!(still_pending(&mut fifth, PENDING).await);
        assert_eq!(harness.dropped("buffer_full"), 0);
        // The sink delivers: room again, and the blocked event goes in.
        assert_eq!(harness.drain(), [1, 2, 3, 4]);
        assert_eq!(outcome(fifth).await, AckOutcome::Stored);
        assert_eq!(harness.drain(), [5]);
        let _dir = harness.finish().await;
    }

    #[tokio::test]
    async fn drop_newest_refuses_and_counts() {
        let harness = start(BufferKind::Memory, MAX_SIZE, policy(WhenFull::DropNewest));
        for fill in 1..=4 {
            assert_eq!(
                outcome(harness.send(PAYLOAD, fill).await).await,
                AckOutcome::Stored
            );
        }
        for fill in 5..=6 {
            assert_eq!(
                outcome(harness.send(PAYLOAD, fill).await).await,
                AckOutcome::Rejected("buffer_full")
            );
        }
        assert_eq!(harness.dropped("buffer_full"), 2);
        assert_eq!(harness.drain(), [1, 2, 3, 4]);
        let _dir = harness.finish().await;
    }

    #[tokio::test]
    async fn drop_oldest_evicts_and_counts() {
        let harness = start(BufferKind::Memory, MAX_SIZE, policy(WhenFull::DropOldest));
        for fill in 1..=6 {
            assert_eq!(
                outcome(harness.send(PAYLOAD, fill).await).await,
                AckOutcome::Stored
            );
        }
        assert_eq!(harness.dropped("evicted"), 2);
        assert_eq!(harness.dropped("buffer_full"), 0);
        assert_eq!(harness.drain(), [3, 4, 5, 6]);
        let _dir = harness.finish().await;
    }

    #[tokio::test]
    async fn shutdown_releases_a_blocked_writer() {
        let harness = start(BufferKind::Memory, MAX_SIZE, policy(WhenFull::Block));
        for fill in 1..=4 {
            assert_eq!(
                outcome(harness.send(PAYLOAD, fill).await).await,
                AckOutcome::Stored
            );
        }
        let mut blocked = harness.send(PAYLOAD, 5).await;
        assert!(still_pending(&mut blocked, PENDING).await);
        harness.stop.cancel();
        assert_eq!(
            outcome(blocked).await,
            AckOutcome::Rejected("shutting_down")
        );
        assert_eq!(harness.dropped("shutting_down"), 1);
        // Stopped and still full: later events are refused at once, never waited for.
        assert_eq!(
            outcome(harness.send(PAYLOAD, 6).await).await,
            AckOutcome::Rejected("shutting_down")
        );
        assert_eq!(harness.drain(), [1, 2, 3, 4]);
        let _dir = harness.finish().await;
    }

    #[tokio::test]
    async fn a_record_too_large_for_the_buffer_is_refused_under_every_policy() {
        for when_full in [WhenFull::Block, WhenFull::DropNewest, WhenFull::DropOldest] {
            for kind in [BufferKind::Memory, BufferKind::Disk] {
                let harness = start(kind, 64 * 1024, policy(when_full));
                assert_eq!(
                    outcome(harness.send(PAYLOAD, 1).await).await,
                    AckOutcome::Stored
                );
                // Larger than the whole (empty) buffer: no wait, no eviction makes it fit.
                let huge = harness.send(64 * 1024, 2).await;
                assert_eq!(
                    outcome(huge).await,
                    AckOutcome::Rejected("too_large"),
                    "{when_full:?} {kind:?}"
                );
                assert_eq!(harness.dropped("too_large"), 1, "{when_full:?} {kind:?}");
                // The writer goes on: the next device's event is stored and acked.
                assert_eq!(
                    outcome(harness.send(PAYLOAD, 3).await).await,
                    AckOutcome::Stored,
                    "{when_full:?} {kind:?}"
                );
                assert_eq!(harness.dropped("evicted"), 0, "{when_full:?} {kind:?}");
                assert_eq!(harness.drain(), [1, 3], "{when_full:?} {kind:?}");
                let _dir = harness.finish().await;
            }
        }
    }

    #[tokio::test]
    async fn stores_once_the_intake_closes_and_syncs() {
        let mut always = policy(WhenFull::Block);
        always.fsync = FsyncPolicy::Always;
        let harness = start(BufferKind::Disk, 1 << 20, always);
        let waiters = [
            harness.send(PAYLOAD, 1).await,
            harness.send(PAYLOAD, 2).await,
        ];
        for waiter in waiters {
            assert_eq!(outcome(waiter).await, AckOutcome::Stored);
        }
        let dir = harness.finish().await;
        // What was acked is on disk: a fresh open finds it.
        let reopened = SinkBuffer::open(
            "cloud",
            &BufferConfig::default(),
            dir.path(),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let fills: Vec<u8> = std::iter::from_fn(|| reopened.try_next())
            .map(|delivery| delivery.event.payload[0])
            .collect();
        assert_eq!(fills, [1, 2]);
    }
}
