//! Stateful and time-driven transforms at run time: which instance of each transform
//! runs, its ticker task, and its checkpoints in `<data_dir>/transforms/NAME.state`.
//!
//! Invariants:
//! - a transform whose config is unchanged keeps its instance (and so its state) across
//!   a reload; a changed one gets a new instance, handed the old one's state when its
//!   `state_on_change` is `keep` (the default) or starting empty with `reset`;
//! - the runtime holds the only long-lived strong reference to an instance besides the
//!   compiled graph and the instance's ticker: once a reload's routes are swapped and
//!   the old tickers stopped, a replaced instance is freed (the alarm board and the
//!   checkpoint list hold it weakly);
//! - a checkpoint file is replaced atomically (temp file, fsync, rename, directory
//!   fsync) and starts with a header naming the config it was written under, so a
//!   restart with a changed config applies `state_on_change` too;
//! - what a tick emits goes to the transform's outputs with backpressure; a copy whose
//!   sink has stopped is counted (`fieldgate_transform_errors_total{reason="undelivered"}`)
//!   and logged, never dropped silently.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use sha2::Digest as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::graph::Components;
use crate::config::ConfigError;
use crate::pipeline::{TransformNode, deliver_emitted};
use crate::telemetry::Metrics;
use crate::transforms::{Emitted, EventTransform, StateOnChange, TransformServices};

/// First line of a checkpoint file.
const MAGIC: &[u8] = b"fieldgate-transform-state 1\n";
/// How long the tickers of a replaced graph may take to finish their delivery.
const TICKER_GOODBYE: Duration = Duration::from_secs(5);

/// One transform instance with the config it was built from.
struct Instance {
    /// Digest of the transform's config, written into its checkpoints.
    fingerprint: String,
    transform: Arc<dyn EventTransform>,
}

/// The instances for a graph, built (or kept) before the graph is compiled.
pub struct Prepared {
    instances: BTreeMap<String, Instance>,
}

impl Prepared {
    /// The instances by name, for [`Components::compile`].
    pub fn transforms(&self) -> BTreeMap<String, Arc<dyn EventTransform>> {
        self.instances
            .iter()
            .map(|(name, instance)| (name.clone(), Arc::clone(&instance.transform)))
            .collect()
    }
}

/// Digest of the last checkpoint written per transform, behind the one-writer lock.
type Written = Arc<Mutex<BTreeMap<String, Vec<u8>>>>;

/// What the periodic checkpoint task writes: each stateful transform, weakly.
type CheckpointList = Arc<Mutex<Vec<(String, String, Weak<dyn EventTransform>)>>>;

/// The running transforms, their tickers and their checkpoints.
pub struct TransformRuntime {
    directory: PathBuf,
    metrics: Arc<Metrics>,
    running: BTreeMap<String, Instance>,
    tickers_stop: CancellationToken,
    tickers: TaskTracker,
    checkpointed: CheckpointList,
    /// One writer at a time (the periodic task and shutdown may overlap), and the digest
    /// of each file last written, so an unchanged state is not rewritten (flash wear).
    writing: Written,
}

impl TransformRuntime {
    /// A runtime keeping its checkpoints under `<data_dir>/transforms`.
    pub fn new(data_dir: &Path, metrics: Arc<Metrics>) -> Self {
        Self {
            directory: data_dir.join("transforms"),
            metrics,
            running: BTreeMap::new(),
            tickers_stop: CancellationToken::new(),
            tickers: TaskTracker::new(),
            checkpointed: Arc::default(),
            writing: Arc::default(),
        }
    }

    /// How many transform instances are alive (running, or still referenced by
    /// something); for leak tests.
    #[cfg(test)]
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Builds the instances of `components`' transforms: an unchanged transform keeps
    /// its running instance; a changed one is built anew and handed the running one's
    /// state (`state_on_change = "keep"`); a transform this process has not run yet is
    /// restored from its checkpoint file. Nothing running is touched.
    pub fn prepare(
        &self,
        components: &Components,
        services: &TransformServices,
    ) -> Result<Prepared, ConfigError> {
        let mut instances = BTreeMap::new();
        for (name, config) in &components.transforms {
            let fingerprint = fingerprint(config);
            let policy = components.state_on_change(name);
            if let Some(running) = self
                .running
                .get(name)
                .filter(|running| running.fingerprint == fingerprint)
            {
                instances.insert(
                    name.clone(),
                    Instance {
                        fingerprint,
                        transform: Arc::clone(&running.transform),
                    },
                );
                continue;
            }
            let transform = config.spec().build(name, services)?;
            let state = match self.running.get(name) {
                Some(running) if policy == StateOnChange::Keep => running.transform.checkpoint(),
                Some(_) => None,
                None => self.read_state(name, &fingerprint, policy),
            };
            if let Some(state) = state {
                match transform.restore(&state) {
                    Ok(()) => {
                        tracing::info!(transform = %name, bytes = state.len(), "transform state restored")
                    }
                    Err(err) => {
                        tracing::warn!(transform = %name, error = %format!("{err:#}"), "transform state unreadable; starting empty")
                    }
                }
            }
            instances.insert(
                name.clone(),
                Instance {
                    fingerprint,
                    transform,
                },
            );
        }
        Ok(Prepared { instances })
    }

    /// The state in `name`'s checkpoint file if there is one it may use.
    fn read_state(&self, name: &str, fingerprint: &str, policy: StateOnChange) -> Option<Vec<u8>> {
        let path = self.path(name);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return None,
            Err(err) => {
                tracing::warn!(transform = name, path = %path.display(), error = %err, "cannot read transform state; starting empty");
                return None;
            }
        };
        let Some((written_under, state)) = parse_file(&bytes) else {
            tracing::warn!(transform = name, path = %path.display(), "transform state file is not a checkpoint; starting empty");
            return None;
        };
        if written_under != fingerprint && policy == StateOnChange::Reset {
            tracing::info!(
                transform = name,
                "config changed since the checkpoint and state_on_change = \"reset\": starting empty"
            );
            return None;
        }
        Some(state.to_vec())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.directory.join(file_name(name))
    }

    /// Runs `prepared` from now on: stops the tickers of the previous graph (bounded),
    /// checkpoints the transforms that are gone, and starts a ticker for each node of
    /// `nodes` whose transform asks for ticks.
    pub async fn commit(
        &mut self,
        prepared: Prepared,
        nodes: &BTreeMap<String, Arc<TransformNode>>,
    ) {
        self.stop_tickers().await;
        let removed: Vec<(String, Instance)> = std::mem::take(&mut self.running)
            .into_iter()
            .filter(|(name, _)| !prepared.instances.contains_key(name))
            .collect();
        for (name, instance) in removed {
            self.write(&name, &instance.fingerprint, &instance.transform)
                .await;
        }
        self.running = prepared.instances;
        let mut list = Vec::new();
        for (name, instance) in &self.running {
            if instance.transform.checkpoint().is_some() {
                // At zero from the start, like every other series.
                self.metrics.declare_transform_checkpoints(name);
                list.push((
                    name.clone(),
                    instance.fingerprint.clone(),
                    Arc::downgrade(&instance.transform),
                ));
            }
        }
        *self
            .checkpointed
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = list;
        self.tickers_stop = CancellationToken::new();
        self.tickers = TaskTracker::new();
        for (name, node) in nodes {
            if let Some(period) = node.transform.tick_interval() {
                self.tickers.spawn(tick(
                    name.clone(),
                    Arc::clone(node),
                    period,
                    Arc::clone(&self.metrics),
                    self.tickers_stop.clone(),
                ));
            }
        }
        self.tickers.close();
    }

    /// Stops every ticker, letting a delivery under way finish (bounded).
    pub async fn stop_tickers(&self) {
        self.tickers_stop.cancel();
        self.tickers.close();
        if tokio::time::timeout(TICKER_GOODBYE, self.tickers.wait())
            .await
            .is_err()
        {
            tracing::warn!("a transform ticker did not stop in time");
        }
    }

    /// Writes the checkpoint of every stateful transform (at shutdown).
    pub async fn checkpoint_all(&self) {
        for (name, instance) in &self.running {
            self.write(name, &instance.fingerprint, &instance.transform)
                .await;
        }
    }

    async fn write(&self, name: &str, fingerprint: &str, transform: &Arc<dyn EventTransform>) {
        if let Some(state) = transform.checkpoint() {
            write_checkpoint(
                self.directory.clone(),
                name.to_owned(),
                fingerprint.to_owned(),
                state,
                Arc::clone(&self.writing),
                Arc::clone(&self.metrics),
            )
            .await;
        }
    }

    /// The periodic checkpoint task: every `period` until `stop`, writes each stateful
    /// transform running at that moment.
    pub fn checkpoint_task(
        &self,
        period: Duration,
        stop: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let list = Arc::clone(&self.checkpointed);
        let directory = self.directory.clone();
        let writing = Arc::clone(&self.writing);
        let metrics = Arc::clone(&self.metrics);
        async move {
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval.tick().await;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = interval.tick() => {}
                }
                let due: Vec<_> = list
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .iter()
                    .filter_map(|(name, fingerprint, transform)| {
                        Some((name.clone(), fingerprint.clone(), transform.upgrade()?))
                    })
                    .collect();
                for (name, fingerprint, transform) in due {
                    let Some(state) = transform.checkpoint() else {
                        continue;
                    };
                    drop(transform);
                    write_checkpoint(
                        directory.clone(),
                        name,
                        fingerprint,
                        state,
                        Arc::clone(&writing),
                        Arc::clone(&metrics),
                    )
                    .await;
                }
            }
        }
    }
}

/// Calls `node`'s tick every `period` and delivers what it emits, until `stop`.
async fn tick(
    name: String,
    node: Arc<TransformNode>,
    period: Duration,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        let mut emitted = Emitted::default();
        node.transform.tick(SystemTime::now(), &mut emitted);
        // Not raced against `stop`: what a tick emitted is delivered before the ticker
        // ends (the sinks' writers outlive the tickers).
        let lost = deliver_emitted(&node, emitted).await;
        if lost > 0 {
            metrics
                .transform_error(&name, "undelivered")
                .inc_by(u64::try_from(lost).unwrap_or(u64::MAX));
            tracing::warn!(transform = %name, events = lost, "events a transform emitted on a tick found their sink stopped");
        }
    }
}

/// A digest of a transform's config (its `Debug` form: every field, stable within a
/// version).
fn fingerprint(config: &crate::transforms::TransformConfig) -> String {
    crate::config::hex(&sha2::Sha256::digest(format!("{config:?}").as_bytes()))
}

/// `NAME.state`; a name that is not a plain file name (`/`, a leading dot, anything
/// beyond `A-Z a-z 0-9 _ - .`) is written in hex, so no config key escapes the directory.
fn file_name(name: &str) -> String {
    let plain = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.'));
    if plain {
        format!("{name}.state")
    } else {
        format!("x-{}.state", crate::config::hex(name.as_bytes()))
    }
}

/// The file's config fingerprint and state, or `None` if it is not a checkpoint.
fn parse_file(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let rest = bytes.strip_prefix(MAGIC)?;
    let end = rest.iter().position(|byte| *byte == b'\n')?;
    let fingerprint = std::str::from_utf8(&rest[..end]).ok()?;
    Some((fingerprint, &rest[end + 1..]))
}

/// Writes a checkpoint atomically off the async threads; failures are logged and counted.
async fn write_checkpoint(
    directory: PathBuf,
    name: String,
    fingerprint: String,
    state: Vec<u8>,
    writing: Written,
    metrics: Arc<Metrics>,
) {
    let path = directory.join(file_name(&name));
    let key = name.clone();
    let written = tokio::task::spawn_blocking(move || {
        let mut last = writing.lock().unwrap_or_else(PoisonError::into_inner);
        let mut digest = sha2::Sha256::new();
        digest.update(fingerprint.as_bytes());
        digest.update(&state);
        let digest = digest.finalize().to_vec();
        if last.get(&key) == Some(&digest) && path.exists() {
            return Ok(());
        }
        write_atomically(&directory, &path, &fingerprint, &state)
            .map_err(|err| format!("{}: {err}", path.display()))?;
        last.insert(key, digest);
        Ok(())
    })
    .await;
    let error = match written {
        Ok(Ok(())) => return,
        Ok(Err(err)) => err,
        Err(err) => err.to_string(),
    };
    metrics.transform_checkpoint_failed(&name);
    tracing::error!(transform = %name, error = %error, "transform checkpoint failed; the previous one is kept");
}

/// Temp file, fsync, rename over `path`, fsync of the directory.
fn write_atomically(
    directory: &Path,
    path: &Path,
    fingerprint: &str,
    state: &[u8],
) -> std::io::Result<()> {
    use std::io::Write as _;
    std::fs::create_dir_all(directory)?;
    let temp = path.with_extension("state.tmp");
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(MAGIC)?;
    file.write_all(fingerprint.as_bytes())?;
    file.write_all(b"\n")?;
    file.write_all(state)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temp, path)?;
    std::fs::File::open(directory)?.sync_all()
}

#[cfg(test)]
mod tests;
