//! Live reload: applies a new config to the running topology, rebuilding only what
//! changed, or leaves everything untouched and says why. Stateful transforms keep or
//! reset their state as `state_on_change` says (see [`super::stateful`]).
//!
//! Order: the new config is loaded and checked; everything that can fail is prepared
//! without touching the running pieces (TLS material read, new sinks opened, the routes
//! compiled with their transforms, new and changed sources bound: a changed source's new listener shares the
//! port with the old one through `SO_REUSEPORT`); then the changes are committed: a
//! changed sink restarts on its existing buffer (its intake swapped first, so nothing
//! sent meanwhile is lost), the routes of every source are swapped in place, new
//! sources start, old ones stop, removed sinks drain and stop with their buffer left on
//! disk. A source whose config is unchanged keeps its listener and its connections, and
//! re-reads its TLS certificate and key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;

use super::Topology;
use super::build::{self, PendingSource, SinkHandle};
use super::graph::Config;
use super::shutdown::TaskGroup;
use crate::api::config::ReloadReport;
use crate::pipeline::intake;
use crate::sinks::SinkConfig;
use crate::sinks::failover::Failovers;

/// How often `--watch` looks at the config file.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// How long an old source may take to close its connections after a reload.
const SOURCE_GOODBYE: Duration = Duration::from_secs(5);

/// Reloads from `path`, logs and counts the outcome.
pub async fn reload(topology: &mut Topology, path: Option<&Path>) -> Result<ReloadReport, String> {
    let started = tokio::time::Instant::now();
    let outcome = apply(topology, path).await;
    let metrics = &topology.shared.metrics;
    match &outcome {
        Ok(report) => {
            metrics.reloaded(report.result);
            tracing::info!(
                result = report.result,
                hash = %report.hash,
                added = ?report.added,
                changed = ?report.changed,
                removed = ?report.removed,
                tls_reloaded = ?report.tls_reloaded,
                took_ms = started.elapsed().as_millis(),
                "config reloaded"
            );
        }
        Err(error) => {
            metrics.reloaded("failed");
            tracing::error!(%error, "config reload failed; the running config is unchanged");
        }
    }
    outcome
}

/// What changed between the running config and the new one.
#[derive(Default)]
struct Plan {
    sources_added: Vec<String>,
    sources_changed: Vec<String>,
    sources_removed: Vec<String>,
    sinks_added: Vec<String>,
    /// Changed with the same buffer settings: only the sink task restarts.
    sinks_restarted: Vec<String>,
    /// Changed buffer settings: buffer and writer reopen too.
    sinks_reopened: Vec<String>,
    sinks_removed: Vec<String>,
}

async fn apply(topology: &mut Topology, path: Option<&Path>) -> Result<ReloadReport, String> {
    let Some(path) = path else {
        return Err(
            "the gateway runs on its embedded default config: there is no file to reload \
             (start it with --config FILE)"
                .into(),
        );
    };
    let new: Config = crate::config::load(path).map_err(|err| err.to_string())?;
    if new.settings != topology.config.settings {
        return Err(format!(
            "{} changed, which needs a restart; change only sources, transforms and sinks \
             to reload",
            changed_sections(&new, &topology.config)
        ));
    }
    let plan = plan(topology, &new);
    let shared = std::sync::Arc::clone(&topology.shared);

    // Prepare everything that can fail; the running topology is untouched until commit.
    let mut fresh_tls = Vec::new();
    for (name, source) in &topology.sources {
        if let Some(tls) = source.tls.as_ref().filter(|_| !plan.is_rebuilt(name)) {
            let acceptor = tls
                .prepare()
                .map_err(|err| format!("source `{name}`: TLS: {err}"))?;
            fresh_tls.push((name.clone(), acceptor));
        }
    }
    let mut added_sinks = BTreeMap::new();
    for name in &plan.sinks_added {
        match SinkHandle::start(name, &new.components.sinks[name], &shared) {
            Ok(sink) => {
                added_sinks.insert(name.clone(), sink);
            }
            Err(err) => {
                stop_sinks(added_sinks).await;
                return Err(format!("sink `{name}`: {err:#}"));
            }
        }
    }
    // The routes of the new graph, over the sinks as they will be: the reopened ones get a
    // new intake now, which the routes feed while the old writer drains.
    let reopened: BTreeMap<_, _> = plan
        .sinks_reopened
        .iter()
        .map(|name| (name.clone(), intake()))
        .collect();
    let mut intakes = build::intakes(&topology.sinks);
    for name in &plan.sinks_removed {
        intakes.remove(name);
    }
    intakes.extend(build::intakes(&added_sinks));
    for (name, (sender, _)) in &reopened {
        intakes.insert(name.clone(), sender.clone());
    }
    let prepared = match topology
        .transforms
        .prepare(&new.components, &shared.transforms)
    {
        Ok(prepared) => prepared,
        Err(err) => {
            stop_sinks(added_sinks).await;
            return Err(err.to_string());
        }
    };
    // The new failover monitors run beside the old ones until the commit; a primary in
    // both keeps its switch.
    let failovers = Failovers::start(
        &new.components.failover,
        &shared.links,
        &shared.metrics,
        Some(&topology.failovers),
    );
    let compiled = new.components.compile_with_failover(
        &intakes,
        &failovers.switches(),
        &shared.transforms,
        &prepared.transforms(),
    );
    drop(intakes);
    let (mut routes, nodes) = match compiled {
        Ok(compiled) => (compiled.routes, compiled.nodes),
        Err(err) => {
            failovers.stop().await;
            stop_sinks(added_sinks).await;
            return Err(err.to_string());
        }
    };
    let mut pending = BTreeMap::new();
    for name in plan.sources_added.iter().chain(&plan.sources_changed) {
        match PendingSource::bind(name, &new.components.sources[name], &shared).await {
            Ok(source) => {
                pending.insert(name.clone(), source);
            }
            Err(err) => {
                drop(pending);
                failovers.stop().await;
                stop_sinks(added_sinks).await;
                return Err(format!("{err:#}"));
            }
        }
    }

    // Commit.
    std::mem::replace(&mut topology.failovers, failovers)
        .stop()
        .await;
    for name in &plan.sinks_restarted {
        if let Some(sink) = topology.sinks.get_mut(name) {
            sink.restart_sink(name, &new.components.sinks[name], &shared)
                .await;
        }
    }
    let mut removed_sinks = BTreeMap::new();
    for name in &plan.sinks_removed {
        if let Some(sink) = topology.sinks.remove(name) {
            removed_sinks.insert(name.clone(), sink);
        }
    }
    topology.sinks.extend(added_sinks);
    for (name, source) in &topology.sources {
        if !plan.is_rebuilt(name) && !plan.sources_removed.contains(name) {
            source
                .output
                .replace(routes.remove(name).unwrap_or_default());
        }
    }
    let mut retired = Vec::new();
    for (name, source) in pending {
        source
            .handle
            .output
            .replace(routes.remove(&name).unwrap_or_default());
        if let Some(old) = topology.sources.insert(name, source.start()) {
            retired.push(old);
        }
    }
    for name in &plan.sources_removed {
        retired.extend(topology.sources.remove(name));
    }
    for source in &retired {
        source.stop();
    }
    let retiring = async {
        futures_util::future::join_all(retired.iter().map(|source| source.stopped())).await;
    };
    if tokio::time::timeout(SOURCE_GOODBYE, retiring)
        .await
        .is_err()
    {
        tracing::warn!("replaced sources did not close every connection in time");
    }
    // Their routes hold the intakes of removed and reopened sinks; once they are gone,
    // those sinks' writers see their last sender leave and finish without waiting.
    drop(retired);
    // The old graph's tickers stop (so do their intakes); replaced transforms are freed.
    let transforms = TransformChanges::of(topology, &new);
    topology.transforms.commit(prepared, &nodes).await;
    drop(nodes);
    for (name, (sender, receiver)) in reopened {
        // The old writer drains its queue once its last sender (old routes) is gone.
        if let Some(old) = topology.sinks.remove(&name) {
            old.stop(&name).await;
        }
        match SinkHandle::start_with(
            &name,
            &new.components.sinks[&name],
            &shared,
            (sender, receiver),
        ) {
            Ok(sink) => {
                topology.sinks.insert(name, sink);
            }
            Err(err) => {
                // The buffer reopened a moment ago under the old settings; this is a disk
                // fault, not a config error. Events keep queueing in the intake until
                // the next reload or restart.
                tracing::error!(sink = %name, error = %format!("{err:#}"), "sink could not be reopened");
            }
        }
    }
    for (name, acceptor) in fresh_tls.iter() {
        if let Some(tls) = topology
            .sources
            .get(name)
            .and_then(|source| source.tls.as_ref())
        {
            tls.install(acceptor.clone());
        }
    }
    stop_sinks(removed_sinks).await;
    shared
        .links
        .retain(|name| topology.sinks.contains_key(name));

    let failovers_changed: Vec<String> = failover_changes(&topology.config, &new)
        .into_iter()
        .filter(|name| !plan.sinks_restarted.contains(name) && !plan.sinks_reopened.contains(name))
        .collect();
    let changed = !plan.is_empty() || !transforms.is_empty() || !failovers_changed.is_empty();
    topology.config = std::sync::Arc::new(new);
    build::attach_deadletters(&shared.api, &topology.sinks);
    topology.publish();
    let tls_reloaded: Vec<String> = fresh_tls.into_iter().map(|(name, _)| name).collect();
    let result = if changed || !tls_reloaded.is_empty() {
        "applied"
    } else {
        "unchanged"
    };
    Ok(ReloadReport {
        result,
        hash: topology.config.hash.clone(),
        added: keys("sources", &plan.sources_added)
            .chain(keys("transforms", &transforms.added))
            .chain(keys("sinks", &plan.sinks_added))
            .collect(),
        changed: keys("sources", &plan.sources_changed)
            .chain(keys("transforms", &transforms.changed))
            .chain(keys("sinks", &plan.sinks_restarted))
            .chain(keys("sinks", &plan.sinks_reopened))
            .chain(keys("sinks", &failovers_changed))
            .collect(),
        removed: keys("sources", &plan.sources_removed)
            .chain(keys("transforms", &transforms.removed))
            .chain(keys("sinks", &plan.sinks_removed))
            .collect(),
        tls_reloaded,
    })
}

/// Sinks kept by `new` whose `failover` or `failover_after` changed (a routing change,
/// applied by the new routes without touching the sink).
fn failover_changes(old: &Config, new: &Config) -> Vec<String> {
    let (old, new) = (&old.components, &new.components);
    new.sinks
        .keys()
        .filter(|name| old.sinks.contains_key(*name))
        .filter(|name| old.failover.get(*name) != new.failover.get(*name))
        .cloned()
        .collect()
}

/// Transforms added, changed and removed by `new` (for the report).
#[derive(Default)]
struct TransformChanges {
    added: Vec<String>,
    changed: Vec<String>,
    removed: Vec<String>,
}

impl TransformChanges {
    fn of(topology: &Topology, new: &Config) -> Self {
        let (old, new) = (&topology.config.components, &new.components);
        let mut changes = TransformChanges::default();
        for (name, config) in &new.transforms {
            match old.transforms.get(name) {
                None => changes.added.push(name.clone()),
                Some(running) if running != config => changes.changed.push(name.clone()),
                Some(_) => {}
            }
        }
        changes.removed = old
            .transforms
            .keys()
            .filter(|name| !new.transforms.contains_key(*name))
            .cloned()
            .collect();
        changes
    }

    fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

fn keys<'a>(kind: &'a str, names: &'a [String]) -> impl Iterator<Item = String> + 'a {
    names.iter().map(move |name| format!("{kind}.{name}"))
}

async fn stop_sinks(sinks: BTreeMap<String, SinkHandle>) {
    for (name, sink) in sinks {
        sink.stop(&name).await;
    }
}

impl Plan {
    fn is_rebuilt(&self, source: &str) -> bool {
        self.sources_changed.iter().any(|name| name == source)
    }

    fn is_empty(&self) -> bool {
        self.sources_added.is_empty()
            && self.sources_changed.is_empty()
            && self.sources_removed.is_empty()
            && self.sinks_added.is_empty()
            && self.sinks_restarted.is_empty()
            && self.sinks_reopened.is_empty()
            && self.sinks_removed.is_empty()
    }
}

fn plan(topology: &Topology, new: &Config) -> Plan {
    let mut plan = Plan::default();
    let (old, new) = (&topology.config.components, &new.components);
    for (name, config) in &new.sources {
        match old.sources.get(name) {
            None => plan.sources_added.push(name.clone()),
            Some(running) if running != config => plan.sources_changed.push(name.clone()),
            Some(_) => {}
        }
    }
    plan.sources_removed = old
        .sources
        .keys()
        .filter(|name| !new.sources.contains_key(*name))
        .cloned()
        .collect();
    for (name, config) in &new.sinks {
        let Some(running) = topology.sinks.get(name) else {
            plan.sinks_added.push(name.clone());
            continue;
        };
        let files = build::fingerprint(&config.spec().watched_files());
        if running.config.spec().buffer() != config.spec().buffer() {
            plan.sinks_reopened.push(name.clone());
        } else if !same_but_inputs(&running.config, config) || files != running.files {
            plan.sinks_restarted.push(name.clone());
        }
    }
    plan.sinks_removed = old
        .sinks
        .keys()
        .filter(|name| !new.sinks.contains_key(*name))
        .cloned()
        .collect();
    plan
}

/// Whether two sink configs differ at most in their inputs (a routing change, applied
/// without touching the sink).
fn same_but_inputs(running: &SinkConfig, new: &SinkConfig) -> bool {
    let mut comparable = new.clone();
    *comparable.spec_mut().inputs_mut() = running.spec().inputs().clone();
    &comparable == running
}

fn changed_sections(new: &Config, old: &Config) -> String {
    let (new, old) = (&new.settings, &old.settings);
    let mut changed = Vec::new();
    if new.gateway != old.gateway {
        changed.push("[gateway]");
    }
    if new.log != old.log {
        changed.push("[log]");
    }
    if new.api != old.api {
        changed.push("[api]");
    }
    if new.watchdog != old.watchdog {
        changed.push("[watchdog]");
    }
    if new.registry != old.registry {
        changed.push("[registry]");
    }
    changed.join(", ")
}

/// Watches `path` for changes (`--watch`): its metadata and content are compared every
/// second, following symlinks, so an editor's rename-over and a Kubernetes ConfigMap's
/// symlink swap are seen as well as an in-place write. Sends one message per change.
pub fn watch(path: PathBuf, tasks: TaskGroup) -> mpsc::Receiver<()> {
    let (changes, receiver) = mpsc::channel(1);
    let stop = tasks.token();
    tasks.spawn(async move {
        let mut last = snapshot(&path).await;
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = snapshot(&path).await;
            if now != last && now.is_some() {
                last = now;
                // A change already pending covers this one.
                let _pending = changes.try_send(());
            }
        }
    });
    receiver
}

/// The file's content, or none while it is missing (mid-replace).
async fn snapshot(path: &Path) -> Option<Vec<u8>> {
    tokio::fs::read(path).await.ok()
}
