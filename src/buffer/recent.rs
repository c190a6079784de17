//! The hot tail: in-memory copies of a lane's latest appends, so that a sink keeping up
//! takes each event as it was appended instead of reading it back from disk and decoding
//! it (a read, a checksum, a copy and several allocations per event).
//!
//! Only a shortcut: the disk (or memory) queue stays the record of truth. A copy is used
//! only when its id is exactly the next record the queue would return, so rewinds, acks,
//! evictions and corrupt segments change nothing; copies that fall behind the read
//! position are dropped, and what does not fit the bound is simply read from the queue.

use std::collections::VecDeque;

use fieldgate_buffer::{Queue, RecordId};
use fieldgate_core::Event;

/// Most events kept per lane.
const MAX_EVENTS: usize = 2048;
/// Most payload bytes kept per lane.
const MAX_BYTES: usize = 512 * 1024;

/// Copies of one lane's latest appended events, oldest first.
#[derive(Default)]
pub(super) struct RecentEvents {
    entries: VecDeque<(RecordId, Event)>,
    bytes: usize,
}

impl RecentEvents {
    /// Keeps a copy of the event just appended as `id`, unless the bound is reached (the
    /// sink is behind: it reads from the queue until it catches up with the copies).
    pub(super) fn keep(&mut self, id: RecordId, event: &Event) {
        if self.entries.len() >= MAX_EVENTS || self.bytes + event.payload.len() > MAX_BYTES {
            return;
        }
        if self.entries.back().is_some_and(|(last, _)| *last >= id) {
            // Ids only grow within a lane; anything else means the queue was reopened.
            self.clear();
        }
        self.bytes += event.payload.len();
        self.entries.push_back((id, event.clone()));
    }

    /// The queue's next unread record, if a copy of it is here: moves the queue's read
    /// position past it and returns it. Drops copies the queue has already passed.
    pub(super) fn take_next(&mut self, queue: &mut Queue) -> Option<(RecordId, Event)> {
        if self.entries.is_empty() {
            return None;
        }
        let Some(next) = queue.next_unread() else {
            // Everything appended was read or acknowledged: the copies are stale.
            self.clear();
            return None;
        };
        while let Some((id, _)) = self.entries.front() {
            let id = *id;
            if id > next {
                // The queue has older records to deliver first (after a rewind).
                return None;
            }
            let (_, event) = self.pop()?;
            if id == next {
                queue.skip_read(id);
                return Some((id, event));
            }
        }
        None
    }

    fn pop(&mut self) -> Option<(RecordId, Event)> {
        let entry = self.entries.pop_front()?;
        self.bytes -= entry.1.payload.len();
        Some(entry)
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}
