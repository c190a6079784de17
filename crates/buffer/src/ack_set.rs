//! Which record ids are acked: a floor (every id below it is acked) plus disjoint ranges of
//! ids acked out of order above it. Pure data structure, no I/O.
//!
//! Invariant: every range `[start, end)` in `beyond` has `floor < start < end`, and ranges
//! neither overlap nor touch, so the floor is always the oldest unacked id.

use std::collections::BTreeMap;

/// The set of acked record ids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct AckSet {
    /// Every id below this is acked; this id itself is not.
    floor: u64,
    /// Out-of-order acked ranges above the floor: start -> end (exclusive).
    beyond: BTreeMap<u64, u64>,
}

impl AckSet {
    /// A set in which exactly the ids below `floor` are acked.
    pub(crate) fn new(floor: u64) -> Self {
        AckSet {
            floor,
            beyond: BTreeMap::new(),
        }
    }

    /// Builds a set from a floor and ranges of any shape (e.g. read from disk), normalising them.
    pub(crate) fn from_parts(floor: u64, ranges: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut set = AckSet::new(floor);
        for (start, end) in ranges {
            set.ack_range(start, end);
        }
        set
    }

    /// The oldest unacked id.
    pub(crate) fn floor(&self) -> u64 {
        self.floor
    }

    /// The out-of-order acked ranges above the floor, ascending.
    pub(crate) fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.beyond.iter().map(|(&start, &end)| (start, end))
    }

    /// Whether `id` is acked.
    pub(crate) fn is_acked(&self, id: u64) -> bool {
        id < self.floor
            || self
                .beyond
                .range(..=id)
                .next_back()
                .is_some_and(|(_, &end)| id < end)
    }

    /// How many ids in `[start, end)` are not acked.
    pub(crate) fn unacked_in(&self, start: u64, end: u64) -> u64 {
        let start = start.max(self.floor);
        if start >= end {
            return 0;
        }
        let mut acked = 0;
        for (&range_start, &range_end) in self.beyond.range(..end).rev() {
            if range_end <= start {
                break;
            }
            acked += range_end.min(end) - range_start.max(start);
        }
        end - start - acked
    }

    /// Marks `id` acked; returns whether it was unacked before.
    pub(crate) fn ack(&mut self, id: u64) -> bool {
        self.ack_range(id, id.saturating_add(1)) > 0
    }

    /// Marks every id in `[start, end)` acked; returns how many were unacked before.
    pub(crate) fn ack_range(&mut self, start: u64, end: u64) -> u64 {
        let newly = self.unacked_in(start, end);
        if newly == 0 {
            return 0;
        }
        let start = start.max(self.floor);
        if start == self.floor {
            self.floor = end;
        } else {
            // Merge with every range that overlaps or touches [start, end).
            let touching: Vec<(u64, u64)> = self
                .beyond
                .range(..=end)
                .rev()
                .take_while(|&(_, &range_end)| range_end >= start)
                .map(|(&s, &e)| (s, e))
                .collect();
            let (mut merged_start, mut merged_end) = (start, end);
            for (s, e) in touching {
                self.beyond.remove(&s);
                merged_start = merged_start.min(s);
                merged_end = merged_end.max(e);
            }
            self.beyond.insert(merged_start, merged_end);
        }
        self.absorb_ranges_at_floor();
        newly
    }

    /// Raises the floor to at least `min_floor` (ids below it are gone) and forgets acks at or
    /// beyond `limit` (ids never assigned), e.g. after recovery.
    pub(crate) fn clamp(&mut self, min_floor: u64, limit: u64) {
        self.floor = self.floor.max(min_floor);
        self.beyond.retain(|_, end| *end <= limit);
        self.absorb_ranges_at_floor();
    }

    /// Restores the invariant after the floor moved: ranges at or below it join it.
    fn absorb_ranges_at_floor(&mut self) {
        while let Some((&start, &end)) = self.beyond.first_key_value() {
            if start > self.floor {
                break;
            }
            self.beyond.remove(&start);
            self.floor = self.floor.max(end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn in_order_acks_move_the_floor() {
        let mut set = AckSet::new(5);
        assert!(!set.ack(4));
        assert!(set.ack(5));
        assert!(!set.ack(5));
        assert_eq!(set.floor(), 6);
    }

    #[test]
    fn out_of_order_acks_join_the_floor_when_the_gap_closes() {
        let mut set = AckSet::new(0);
        set.ack(2);
        set.ack(1);
        set.ack(4);
        assert_eq!(set.floor(), 0);
        assert_eq!(set.ranges().collect::<Vec<_>>(), vec![(1, 3), (4, 5)]);
        set.ack(0);
        assert_eq!(set.floor(), 3);
        set.ack(3);
        assert_eq!(set.floor(), 5);
        assert_eq!(set.ranges().count(), 0);
    }

    proptest! {
        #[test]
        fn matches_a_set_of_ids(floor in 0u64..20, ops in proptest::collection::vec((0u64..60, 1u64..6), 0..40)) {
            let mut set = AckSet::new(floor);
            let mut model: BTreeSet<u64> = (0..floor).collect();
            for (start, width) in ops {
                let end = start + width;
                let newly = (start..end).filter(|id| !model.contains(id)).count() as u64;
                prop_assert_eq!(set.ack_range(start, end), newly);
                model.extend(start..end);
                let model_floor = (0..).find(|id| !model.contains(id)).unwrap_or(0);
                prop_assert_eq!(set.floor(), model_floor);
                for id in 0..70 {
                    prop_assert_eq!(set.is_acked(id), model.contains(&id), "id {}", id);
                }
                for (a, b) in [(0, 70), (3, 9), (10, 11), (30, 20)] {
                    let unacked = (a..b).filter(|id| !model.contains(id)).count() as u64;
                    prop_assert_eq!(set.unacked_in(a, b), unacked);
                }
                let mut last_end = set.floor();
                for (s, e) in set.ranges() {
                    prop_assert!(s > last_end && e > s);
                    last_end = e;
                }
            }
            prop_assert_eq!(AckSet::from_parts(set.floor(), set.ranges().collect::<Vec<_>>()), set);
        }
    }
}
