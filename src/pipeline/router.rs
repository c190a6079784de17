//! The router: takes one source's events through its transforms to every sink buffer
//! downstream, as the config's graph says.
//!
//! A source holds a [`SourceOutput`]; the topology compiles the graph into a tree of
//! [`Target`]s per source and swaps it in place on reload, so a source keeps running
//! (and its devices stay connected) while the sinks and transforms behind it change.
//! Transforms run inline in the sending task: they are pure functions of an event, and
//! one hop fewer is one wake-up fewer per event.
//!
//! Delivery to the sinks is independent: the event is offered to every intake at once
//! and only the full ones are waited for, together, so a slow or full sink never
//! delays the write into another. With `ack`, the device's answer still waits for every
//! target buffer; an event that no sink receives (a filter dropped it) is acknowledged
//! as handled. A sink with a failover sink is one hop that picks one of the two intakes
//! per event ([`FailoverRoute`]), so an event is in one of their buffers, never both.

use std::sync::{Arc, RwLock};

use fieldgate_core::Event;

use super::{AckToken, AckWaiter, FailoverRoute, Intake, Item};
use crate::transforms::{Emitted, EventTransform};

/// The next hop of an event.
#[derive(Clone)]
pub enum Target {
    /// A sink's intake (its buffer writer).
    Sink(Intake),
    /// A transform, with the targets of each of its outputs.
    Transform(Arc<TransformNode>),
    /// A sink with a failover sink: one of the two intakes, as its switch says.
    Failover(Arc<FailoverRoute>),
}

/// A transform in the compiled graph.
pub struct TransformNode {
    /// What it does to an event.
    pub transform: Arc<dyn EventTransform>,
    /// Targets per output port, indexed as the transform emits them (0 = the default).
    pub outputs: Vec<Vec<Target>>,
}

/// Where one source's events go. Cloned into every connection of the source; the
/// topology replaces the targets on reload.
#[derive(Clone, Default)]
pub struct SourceOutput {
    targets: Arc<RwLock<Arc<[Target]>>>,
}

impl SourceOutput {
    /// An output feeding `targets`.
    #[cfg(test)]
    pub fn new(targets: Vec<Target>) -> Self {
        Self {
            targets: Arc::new(RwLock::new(targets.into())),
        }
    }

    /// Points this output (and every clone of it) at new targets.
    pub fn replace(&self, targets: Vec<Target>) {
        let targets: Arc<[Target]> = targets.into();
        match self.targets.write() {
            Ok(mut current) => *current = targets,
            Err(poisoned) => *poisoned.into_inner() = targets,
        }
    }

    /// Whether any target reads this output at all.
    pub fn has_targets(&self) -> bool {
        !self.current().is_empty()
    }

    fn current(&self) -> Arc<[Target]> {
        match self.targets.read() {
            Ok(targets) => Arc::clone(&targets),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Sends `event` through the graph, waiting while a target intake is full. With
    /// `ack`, the returned waiter resolves once every target buffer holds the event.
    pub async fn send(&self, event: Event, ack: bool) -> Option<AckWaiter> {
        let (token, waiter) = if ack {
            let (token, waiter) = AckToken::new();
            (Some(token), Some(waiter))
        } else {
            (None, None)
        };
        let targets = self.current();
        // The common case: one sink, no transform. No list, no clone.
        if let [Target::Sink(intake)] = &*targets {
            let item = Item {
                event,
                ack: token.clone(),
            };
            if let Err(item) = intake.try_send(item) {
                intake.send(item).await;
            }
            if let Some(token) = token {
                token.confirm();
            }
            return waiter;
        }
        let mut deliveries = Vec::new();
        route(&targets, event, &mut deliveries);
        drop(targets);
        let mut waiting = Vec::new();
        for (intake, event) in deliveries {
            let item = Item {
                event,
                ack: token.clone(),
            };
            if let Err(item) = intake.try_send(item) {
                waiting.push(async move { intake.send(item).await });
            }
        }
        if !waiting.is_empty() {
            futures_util::future::join_all(waiting).await;
        }
        // The source's own share: the event reached every target it was routed to.
        if let Some(token) = token {
            token.confirm();
        }
        waiter
    }
}

impl SourceOutput {
    /// Sends `event` through the graph without waiting and without an ack: a full or
    /// closed intake loses its copy. Returns how many copies were lost.
    pub fn try_send(&self, event: Event) -> usize {
        let mut deliveries = Vec::new();
        route(&self.current(), event, &mut deliveries);
        deliveries
            .into_iter()
            .filter(|(intake, event)| {
                intake
                    .try_send(Item {
                        event: event.clone(),
                        ack: None,
                    })
                    .is_err()
            })
            .count()
    }
}

/// Delivers what `node`'s transform emitted by itself (on a tick) to that node's outputs,
/// waiting while a target intake is full (no ack: nobody waits for these events).
/// Returns how many copies could not be delivered because their sink had stopped.
pub async fn deliver_emitted(node: &TransformNode, emitted: Emitted) -> usize {
    let mut deliveries = Vec::new();
    for (port, event) in emitted.into_events() {
        if let Some(targets) = node.outputs.get(port) {
            route(targets, event, &mut deliveries);
        }
    }
    let mut lost = 0;
    for (intake, event) in deliveries {
        if intake.deliver(Item { event, ack: None }).await.is_err() {
            lost += 1;
        }
    }
    lost
}

/// Takes `event` through `targets`, collecting one delivery per sink intake reached.
fn route(targets: &[Target], event: Event, deliveries: &mut Vec<(Intake, Event)>) {
    let Some((last, rest)) = targets.split_last() else {
        return;
    };
    for target in rest {
        hop(target, event.clone(), deliveries);
    }
    hop(last, event, deliveries);
}

fn hop(target: &Target, event: Event, deliveries: &mut Vec<(Intake, Event)>) {
    match target {
        Target::Sink(intake) => deliveries.push((intake.clone(), event)),
        Target::Failover(route) => deliveries.push((route.pick().clone(), event)),
        Target::Transform(node) => {
            let mut emitted = Emitted::default();
            node.transform.apply(event, &mut emitted);
            for (port, event) in emitted.into_events() {
                if let Some(targets) = node.outputs.get(port) {
                    route(targets, event, deliveries);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::intake;
    use crate::transforms::filter::FilterConfig;
    use crate::transforms::remap::RemapConfig;
    use crate::transforms::tests::{build, event_json};

    /// Allocations and bytes allocated per event sent through a source output: the plain
    /// path (one sink) and one `filter` plus one `remap` before it. A benchmark, not a
    /// check: `cargo test --release --bin fieldgate allocations_per_event -- --ignored
    /// --nocapture --test-threads 1` (see docs/BENCHMARKS.md).
    #[test]
    #[ignore = "benchmark; run explicitly"]
    fn allocations_per_event() {
        const EVENTS: u64 = 10_000;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let (sender, mut receiver) = intake();
        let filter = build::<FilterConfig>(
            "inputs = [\"d\"]\ncondition = { kind = \"telemetry\", field = \"temp\", gt = -1000.0 }",
        );
        let remap = build::<RemapConfig>(
            "inputs = [\"hot\"]\nset = { site = \"north\" }\nconvert.temp = { from = \"degC\", to = \"degF\" }",
        );
        let remap_node = Arc::new(TransformNode {
            transform: remap,
            outputs: vec![vec![Target::Sink(sender.clone())]],
        });
        let filter_node = Arc::new(TransformNode {
            transform: filter,
            outputs: vec![vec![Target::Transform(remap_node)]],
        });
        let paths = [
            ("one sink", SourceOutput::new(vec![Target::Sink(sender)])),
            (
                "filter + remap + one sink",
                SourceOutput::new(vec![Target::Transform(filter_node)]),
            ),
        ];
        // The simulator's payload shape.
        let event = event_json(br#"{"device":"dev-1","seq":42,"t":1764650000000000,"temp":21.5}"#);
        for (name, output) in paths {
            let mut send = |count: u64| {
                for _ in 0..count {
                    runtime.block_on(output.send(event.clone(), true));
                    while let Ok(item) = receiver.normal.try_recv() {
                        if let Some(ack) = item.ack {
                            ack.confirm();
                        }
                    }
                }
            };
            send(100);
            let profiler = dhat::Profiler::builder().testing().build();
            send(EVENTS);
            let stats = dhat::HeapStats::get();
            drop(profiler);
            #[allow(clippy::cast_precision_loss, reason = "a printed ratio")]
            let per_event = |total: u64| total as f64 / EVENTS as f64;
            println!(
                "{name}: {:.2} allocations, {:.0} bytes allocated per event (ack mode)",
                per_event(stats.total_blocks),
                per_event(stats.total_bytes)
            );
            assert!(
                stats.total_blocks >= EVENTS,
                "the ack costs at least one allocation"
            );
        }
    }
}
