//! Heap allocation counters for the per-event benchmark (cargo feature `count-allocations`):
//! the process's allocator wrapped by `stats_alloc`, exported as
//! `fieldgate_heap_allocations_total` and `fieldgate_heap_allocated_bytes_total`.
//!
//! Dividing their increase over a steady-state window by the events delivered in it gives
//! allocations per event for the whole process (every task, thread and library), which is
//! what `scripts/bench/per_event.py` reports.

use std::alloc::System;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};

/// The process's allocator: the system allocator, counting.
#[global_allocator]
static COUNTING: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Encodes the allocation counters on each scrape.
#[derive(Debug)]
pub struct AllocationCollector;

impl Collector for AllocationCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = COUNTING.stats();
        // A reallocation may move the block: count it as an allocation too.
        let allocations = counter(stats.allocations.saturating_add(stats.reallocations));
        allocations.encode(encoder.encode_descriptor(
            "fieldgate_heap_allocations",
            "Heap allocations and reallocations since start (feature count-allocations)",
            None,
            allocations.metric_type(),
        )?)?;
        let grown = usize::try_from(stats.bytes_reallocated.max(0)).unwrap_or(0);
        let bytes = counter(stats.bytes_allocated.saturating_add(grown));
        bytes.encode(encoder.encode_descriptor(
            "fieldgate_heap_allocated_bytes",
            "Bytes allocated (plus bytes grown by reallocation) since start",
            None,
            bytes.metric_type(),
        )?)?;
        Ok(())
    }
}

fn counter(value: usize) -> ConstCounter<u64> {
    ConstCounter::new(u64::try_from(value).unwrap_or(u64::MAX))
}
