//! When the oldest event still in a sink's buffer was stored, tracked without reading
//! the disk (`fieldgate_buffer_oldest_event_timestamp_seconds{sink}`).
//!
//! Records leave a buffer (acked, evicted, skipped as corrupt) in about the order they
//! came in, so the oldest one held is record number `appended - held`. A bounded list of
//! checkpoints (how many records had been appended when a second began) maps that number
//! back to a time. Two approximations, both making the age look older, never younger:
//! high-lane records may leave before older normal-lane ones, and past
//! [`MAX_CHECKPOINTS`] the list keeps every other checkpoint. Records recovered from disk
//! at start-up count as stored at start-up: their receipt times are not read back.

use std::collections::VecDeque;

/// Checkpoints kept at most: one per second covers 68 minutes of backlog exactly, longer
/// backlogs at a coarser step (halved each time the list fills), in 64 KiB.
const MAX_CHECKPOINTS: usize = 4096;

/// Record `first` and the ones after it were appended at `stored_at` or later.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Checkpoint {
    first: u64,
    stored_at: u64,
}

/// Tracks the store time (Unix seconds) of a buffer's oldest record.
#[derive(Debug, Default)]
pub struct OldestRecord {
    /// Records appended since start-up, counting those recovered at start-up.
    appended: u64,
    checkpoints: VecDeque<Checkpoint>,
}

impl OldestRecord {
    /// Starts with the `recovered` records a buffer reopened with, stored as of `now`.
    pub fn new(recovered: u64, now: u64) -> Self {
        let mut oldest = Self::default();
        oldest.appended(recovered, now);
        oldest
    }

    /// Notes `count` records appended at `now` (Unix seconds).
    pub fn appended(&mut self, count: u64, now: u64) {
        if count == 0 {
            return;
        }
        if self
            .checkpoints
            .back()
            .is_none_or(|last| last.stored_at < now)
        {
            if self.checkpoints.len() == MAX_CHECKPOINTS {
                // Keep every other checkpoint (always the first, the oldest one).
                let mut index = 0;
                self.checkpoints.retain(|_| {
                    index += 1;
                    index % 2 == 1
                });
            }
            self.checkpoints.push_back(Checkpoint {
                first: self.appended,
                stored_at: now,
            });
        }
        self.appended += count;
    }

    /// The store time of the oldest of the `held` records still in the buffer; `None`
    /// when it is empty. Forgets the checkpoints of records that have left.
    pub fn oldest(&mut self, held: u64) -> Option<u64> {
        if held == 0 {
            self.checkpoints.clear();
            return None;
        }
        let oldest = self.appended.saturating_sub(held);
        while self
            .checkpoints
            .get(1)
            .is_some_and(|next| next.first <= oldest)
        {
            self.checkpoints.pop_front();
        }
        self.checkpoints
            .front()
            .map(|checkpoint| checkpoint.stored_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_buffer_has_no_oldest_record() {
        let mut oldest = OldestRecord::new(0, 100);
        assert_eq!(oldest.oldest(0), None);
    }

    #[test]
    fn the_oldest_time_advances_as_records_leave() {
        let mut oldest = OldestRecord::new(0, 100);
        oldest.appended(10, 100);
        oldest.appended(5, 101);
        oldest.appended(5, 105);
        assert_eq!(oldest.oldest(20), Some(100));
        // 10 left: the oldest held is record 10, appended at 101.
        assert_eq!(oldest.oldest(10), Some(101));
        assert_eq!(oldest.oldest(5), Some(105));
        assert_eq!(oldest.oldest(0), None);
        oldest.appended(1, 200);
        assert_eq!(oldest.oldest(1), Some(200));
    }

    #[test]
    fn recovered_records_count_from_start_up() {
        let mut oldest = OldestRecord::new(7, 50);
        oldest.appended(3, 60);
        assert_eq!(oldest.oldest(10), Some(50));
        assert_eq!(oldest.oldest(3), Some(60));
    }

    #[test]
    fn a_long_backlog_keeps_a_bounded_list_and_never_looks_younger() {
        let mut oldest = OldestRecord::new(0, 0);
        let seconds = u64::try_from(3 * MAX_CHECKPOINTS).expect("fits");
        for second in 0..seconds {
            oldest.appended(2, second);
            assert!(oldest.checkpoints.len() <= MAX_CHECKPOINTS);
        }
        // Everything still held: the very first second.
        assert_eq!(oldest.oldest(2 * seconds), Some(0));
        // Half has left: the oldest held record was appended at seconds / 2; a thinned
        // list may name an earlier second, never a later one.
        let found = oldest.oldest(seconds).expect("records held");
        assert!(found <= seconds / 2, "{found} > {}", seconds / 2);
        assert!(found + 8 >= seconds / 2, "{found} too old");
    }
}
