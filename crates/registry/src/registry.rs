//! [`Registry`]: the rules for devices, credentials, provisioning tokens and commands, over an
//! in-memory index that mirrors the redb file.
//!
//! Invariants:
//! - Memory holds what the hot paths need ([`crate::index`]); authentication and status
//!   updates read only memory (one `RwLock` read). Names, labels, identifiers and refresh
//!   tokens are read from redb when an admin call or a registration needs them.
//! - Every change is written to redb first and applied to memory only once committed, so
//!   memory never claims what the file lacks. Changes are serialised by one writer mutex and
//!   computed from the state as it is under that mutex; the state lock is held only for the
//!   short in-memory apply, never across a disk write, so authentication never waits on fsync.
//! - Live status and counters (`record_*`) change memory only and mark the device dirty;
//!   [`Registry::flush`] writes them. A change written by an admin call never overwrites newer
//!   live counters in memory (see `State::put_device`).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use tokio::sync::broadcast;

use crate::clock::{Clock, SystemClock};
use crate::crypto::{self, Hash};
use crate::error::{AuthError, RegistryError, truncate_for_display};
use crate::index::{DeviceIndex, Hot};
use crate::jwt;
use crate::record;
use crate::store::{DeviceRecord, Store, TokenRecord, Write};
use crate::types::*;
use crate::validate;

/// Most commands kept per device; beyond it the oldest finished ones are dropped.
pub const MAX_COMMANDS_PER_DEVICE: usize = 256;
/// Longest command TTL.
pub const MAX_COMMAND_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Longest provisioning-token lifetime.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(366 * 24 * 3600);
/// Most uses of one provisioning token.
pub const MAX_TOKEN_USES: u32 = 1_000_000;
/// Most outstanding registration challenges; the oldest is dropped beyond it.
pub const MAX_CHALLENGES: usize = 100_000;
/// Longest secret, token or refresh token accepted on input (ours are 43 characters).
const MAX_CREDENTIAL_LEN: usize = 256;
/// Devices whose status one flush transaction writes: bounds the memory of a large flush.
const FLUSH_CHUNK: usize = 10_000;
/// Capacity of the revocation channel; a lagging receiver should treat `Lagged` as "re-check all".
const REVOCATION_CAPACITY: usize = 4096;

fn ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Everything in memory.
#[derive(Debug, Default)]
struct State {
    devices: DeviceIndex,
    tokens: BTreeMap<String, TokenRecord>,
    token_by_hash: HashMap<Hash, String>,
    /// Per device, oldest first.
    commands: HashMap<String, Vec<Command>>,
    /// Devices whose live status or counters changed since the last flush.
    dirty: HashSet<String>,
    /// The next credential version to hand out (store-wide, never reused).
    next_version: u64,
    /// Signs new JWTs and verifies them.
    jwt_key: [u8; 32],
    /// The signing key before the last rotation: still verifies until the time (ms).
    previous_jwt_key: Option<([u8; 32], u64)>,
}

impl State {
    /// Insert or replace a device (see [`Hot::replacing`]).
    fn put_device(&mut self, record: &DeviceRecord) {
        let id = record.device.id.as_str();
        let hot = Hot::replacing(record, self.devices.get(id));
        self.devices.insert(id.into(), hot);
    }

    fn delete_device(&mut self, id: &str) {
        self.devices.remove(id);
        self.commands.remove(id);
        self.dirty.remove(id);
    }

    fn put_token(&mut self, record: TokenRecord) {
        if let Some(hash) = record.secret_hash {
            self.token_by_hash.insert(hash, record.token.id.clone());
        }
        self.tokens.insert(record.token.id.clone(), record);
    }

    fn put_command(&mut self, command: Command) {
        let list = self.commands.entry(command.device_id.clone()).or_default();
        match list.iter_mut().find(|existing| existing.id == command.id) {
            Some(existing) => *existing = command,
            None => list.push(command),
        }
    }

    fn delete_command(&mut self, device_id: &str, command_id: &str) {
        if let Some(list) = self.commands.get_mut(device_id) {
            list.retain(|command| command.id != command_id);
            if list.is_empty() {
                self.commands.remove(device_id);
            }
        }
    }

    fn apply(&mut self, writes: Vec<Write>) {
        for write in writes {
            match write {
                Write::PutDevice(record) => self.put_device(&record),
                Write::DeleteDevice(id) => self.delete_device(&id),
                // Memory is where live status comes from: nothing to apply.
                Write::PutHead { .. } => {}
                Write::PutToken(record) => self.put_token(record),
                Write::PutCommand(command) => self.put_command(command),
                Write::DeleteCommand {
                    device_id,
                    command_id,
                } => self.delete_command(&device_id, &command_id),
                Write::SetNextVersion(next) => self.next_version = next,
                Write::SetJwtKeys {
                    current,
                    previous,
                    previous_until_ms,
                } => {
                    self.jwt_key = current;
                    self.previous_jwt_key = Some((previous, previous_until_ms));
                }
            }
        }
    }

    fn command(&self, device_id: &str, command_id: &str) -> Option<&Command> {
        self.commands
            .get(device_id)?
            .iter()
            .find(|command| command.id == command_id)
    }
}

/// Outstanding registration nonces, oldest first.
#[derive(Debug, Default)]
struct Challenges {
    expires: HashMap<[u8; 32], u64>,
    order: VecDeque<[u8; 32]>,
}

impl Challenges {
    fn insert(&mut self, nonce: [u8; 32], expires_at_ms: u64, now_ms: u64) {
        // Drop expired and already used nonces from the front, then the oldest if still full.
        while let Some(front) = self.order.front() {
            let stale = self
                .expires
                .get(front)
                .is_none_or(|expiry| *expiry <= now_ms);
            if !stale && self.expires.len() < MAX_CHALLENGES {
                break;
            }
            if let Some(front) = self.order.pop_front() {
                self.expires.remove(&front);
            }
        }
        self.expires.insert(nonce, expires_at_ms);
        self.order.push_back(nonce);
    }

    /// Use a nonce: true once, if it was issued and has not expired.
    fn take(&mut self, nonce: &[u8; 32], now_ms: u64) -> bool {
        match self.expires.remove(nonce) {
            Some(expiry) => expiry > now_ms,
            None => false,
        }
    }
}

/// Fresh credentials for one device, computed before the write that stores their hashes.
struct Issued {
    secret: Option<String>,
    tokens: Tokens,
}

/// The device registry. `Send + Sync`; share it as `Arc<Registry>`. Every call is short: reads
/// come from memory, writes are one redb transaction.
pub struct Registry {
    options: RegistryOptions,
    clock: Arc<dyn Clock>,
    store: Store,
    state: RwLock<State>,
    writer: Mutex<()>,
    challenges: Mutex<Challenges>,
    revocations: broadcast::Sender<String>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("path", &self.options.path)
            .field("gateway_id", &self.options.gateway_id)
            .field("devices", &self.len())
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// Open (or create) the registry file (migrating a schema-1 file) and load what
    /// authentication and status need of every device into memory.
    pub fn open(options: RegistryOptions) -> Result<Registry, RegistryError> {
        Registry::open_with_clock(options, Arc::new(SystemClock))
    }

    /// [`Registry::open`] with an injected clock (tests: expiry without sleeping).
    pub fn open_with_clock(
        options: RegistryOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<Registry, RegistryError> {
        if options.gateway_id.is_empty() || options.gateway_id.len() > 128 {
            return Err(RegistryError::invalid(
                "gateway_id",
                "must be 1..=128 bytes",
            ));
        }
        for (field, ttl) in [
            ("jwt_ttl", options.jwt_ttl),
            ("refresh_ttl", options.refresh_ttl),
            ("challenge_ttl", options.challenge_ttl),
        ] {
            if ttl < Duration::from_secs(1) {
                return Err(RegistryError::invalid(field, "must be at least 1s"));
            }
        }
        let (store, loaded) = Store::open(&options.path)?;
        let mut state = State {
            devices: loaded.devices,
            next_version: loaded.next_version,
            jwt_key: loaded.jwt_key,
            previous_jwt_key: loaded.previous_jwt_key,
            ..State::default()
        };
        for token in loaded.tokens {
            state.put_token(token);
        }
        let mut commands = loaded.commands;
        commands.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        for command in commands {
            state
                .commands
                .entry(command.device_id.clone())
                .or_default()
                .push(command);
        }
        let (revocations, _) = broadcast::channel(REVOCATION_CAPACITY);
        Ok(Registry {
            options,
            clock,
            store,
            state: RwLock::new(state),
            writer: Mutex::new(()),
            challenges: Mutex::new(Challenges::default()),
            revocations,
        })
    }

    /// The options it was opened with.
    pub fn options(&self) -> &RegistryOptions {
        &self.options
    }

    /// Number of registered devices.
    pub fn len(&self) -> usize {
        self.read().devices.len()
    }

    /// No device registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    // Locks: a panic while holding one cannot leave memory ahead of the file (the file is
    // written first), so poisoning is recovered from rather than propagated as a panic.
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_writer(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_challenges(&self) -> MutexGuard<'_, Challenges> {
        self.challenges
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Persist `writes` durably, then apply them to memory. Call with the writer lock held.
    fn commit(&self, writes: Vec<Write>) -> Result<(), RegistryError> {
        self.store.apply(&writes, true)?;
        self.write_state().apply(writes);
        Ok(())
    }

    fn random(&self) -> Result<[u8; 32], RegistryError> {
        crypto::random_32().map_err(|error| RegistryError::Storage {
            path: self.options.path.clone(),
            source: format!("no OS randomness: {error}").into(),
        })
    }

    fn random_id(&self, prefix: &str) -> Result<String, RegistryError> {
        crypto::random_hex_id()
            .map(|hex| format!("{prefix}{hex}"))
            .map_err(|error| RegistryError::Storage {
                path: self.options.path.clone(),
                source: format!("no OS randomness: {error}").into(),
            })
    }

    /// `count` fresh credential versions (the first is returned) and the write that retires
    /// them; commit the write with the records that use them. Call with the writer lock held.
    fn allocate_versions(&self, count: usize) -> Result<(u64, Write), RegistryError> {
        let first = self.read().next_version;
        let next = u64::try_from(count)
            .ok()
            .and_then(|count| first.checked_add(count))
            .ok_or_else(|| RegistryError::Storage {
                path: self.options.path.clone(),
                source: "credential versions exhausted".into(),
            })?;
        Ok((first, Write::SetNextVersion(next)))
    }

    /// Conflict if the MAC or IMEI belongs to a device other than `id` (read from the file).
    fn check_identifiers_free(
        &self,
        id: &str,
        mac: Option<&str>,
        imei: Option<&str>,
    ) -> Result<(), RegistryError> {
        for (what, value, owner) in [
            (
                "mac",
                mac,
                mac.map(|mac| self.store.device_with_mac(mac)).transpose()?,
            ),
            (
                "imei",
                imei,
                imei.map(|imei| self.store.device_with_imei(imei))
                    .transpose()?,
            ),
        ] {
            if let (Some(value), Some(owner)) = (value, owner.flatten()) {
                if owner != id {
                    return Err(RegistryError::Conflict {
                        what,
                        id: value.to_owned(),
                        reason: format!("belongs to device {owner:?}"),
                    });
                }
            }
        }
        Ok(())
    }

    fn broadcast_revocation(&self, id: &str) {
        // No receiver is fine: nobody has a session to close.
        self.revocations.send(id.to_owned()).ok();
    }

    /// New secret (for keyless devices), credential version, access and refresh token, all
    /// stored into `record`; the returned plaintexts are shown once.
    fn issue(
        &self,
        record: &mut DeviceRecord,
        new_secret: bool,
        now_ms: u64,
    ) -> Result<Issued, RegistryError> {
        let secret = if new_secret && record.device.public_key.is_none() {
            let text = crypto::b64url(&self.random()?);
            record.secret_hash = Some(crypto::sha256(text.as_bytes()));
            Some(text)
        } else {
            if record.device.public_key.is_some() {
                record.secret_hash = None;
            }
            None
        };
        // The device id up front lets `refresh` find the record by key; the secret part is
        // base64url, so the id ends at the last '.'.
        let refresh = format!("{}.{}", record.device.id, crypto::b64url(&self.random()?));
        record.refresh_hash = Some(crypto::sha256(refresh.as_bytes()));
        record.refresh_expires_at_ms = now_ms.saturating_add(ms(self.options.refresh_ttl));
        Ok(Issued {
            secret,
            tokens: Tokens {
                access_token: self.access_token(
                    &record.device.id,
                    record.credential_version,
                    now_ms,
                ),
                expires_in: self.options.jwt_ttl.as_secs(),
                refresh_token: refresh,
            },
        })
    }

    fn access_token(&self, device_id: &str, version: u64, now_ms: u64) -> String {
        let iat = now_ms / 1000;
        let claims = jwt::Claims {
            iss: self.options.gateway_id.clone(),
            sub: device_id.to_owned(),
            iat,
            exp: iat.saturating_add(self.options.jwt_ttl.as_secs()),
            typ: jwt::ACCESS.to_owned(),
            ver: version,
        };
        let key = self.read().jwt_key;
        jwt::sign(&claims, &key)
    }

    // ---------------------------------------------------------------- devices (admin)

    /// Add a device. Its id is `new.id`, else derived from the MAC/IMEI, else random (`dev-…`).
    /// Conflict if the id, MAC or IMEI is taken. Keyless devices get a secret.
    pub fn add_device(&self, new: NewDevice) -> Result<Provisioned, RegistryError> {
        let mut added = self.add_devices(vec![new])?;
        added
            .pop()
            .ok_or_else(|| RegistryError::invalid("devices", "nothing added"))
    }

    /// Add many devices in one transaction (bulk import): all or none. Same rules as
    /// [`Registry::add_device`]; ids, MACs and IMEIs must also be unique within the batch.
    pub fn add_devices(&self, new: Vec<NewDevice>) -> Result<Vec<Provisioned>, RegistryError> {
        let mut prepared = Vec::with_capacity(new.len());
        for new in new {
            validate::opt_text("name", new.name.as_deref())?;
            validate::opt_text("model", new.model.as_deref())?;
            validate::labels(&new.labels)?;
            let mac = new.mac.as_deref().map(validate::mac).transpose()?;
            let imei = new.imei.as_deref().map(validate::imei).transpose()?;
            let public_key = normalise_key(new.public_key.as_deref())?;
            let id = match (&new.id, &mac, &imei) {
                (Some(id), _, _) => {
                    validate::device_id(id)?;
                    id.clone()
                }
                (None, Some(mac), _) => validate::id_from_mac(mac),
                (None, None, Some(imei)) => validate::id_from_imei(imei),
                (None, None, None) => self.random_id("dev-")?,
            };
            prepared.push(DeviceRecord::new(Device {
                id,
                name: new.name,
                model: new.model,
                labels: new.labels,
                mac,
                imei,
                public_key,
                created_at_ms: 0,
                last_seen_ms: None,
                status: DeviceStatus::Offline,
                messages: 0,
                bytes: 0,
                errors: 0,
            }));
        }

        let _writer = self.lock_writer();
        let now_ms = self.now_ms();
        {
            let mut ids = HashSet::new();
            let mut identifiers = HashSet::new();
            for record in &prepared {
                let device = &record.device;
                let exists = self.read().devices.contains_key(device.id.as_str());
                if exists || !ids.insert(device.id.as_str()) {
                    return Err(RegistryError::Conflict {
                        what: "device",
                        id: device.id.clone(),
                        reason: "a device with this id exists".into(),
                    });
                }
                self.check_identifiers_free(
                    &device.id,
                    device.mac.as_deref(),
                    device.imei.as_deref(),
                )?;
                for (what, value) in [("mac", &device.mac), ("imei", &device.imei)] {
                    if let Some(value) = value {
                        if !identifiers.insert((what, value.as_str())) {
                            return Err(RegistryError::Conflict {
                                what,
                                id: value.clone(),
                                reason: "given twice in one batch".into(),
                            });
                        }
                    }
                }
            }
        }
        let (first_version, next_version) = self.allocate_versions(prepared.len())?;
        let mut writes = Vec::with_capacity(prepared.len() + 1);
        writes.push(next_version);
        let mut provisioned = Vec::with_capacity(prepared.len());
        for (version, mut record) in (first_version..).zip(prepared) {
            record.device.created_at_ms = now_ms;
            record.credential_version = version;
            let issued = self.issue(&mut record, true, now_ms)?;
            provisioned.push(Provisioned {
                device: record.device.clone(),
                secret: issued.secret,
                tokens: issued.tokens,
            });
            writes.push(Write::PutDevice(Box::new(record)));
        }
        self.commit(writes)?;
        Ok(provisioned)
    }

    /// A device by id. A device whose record cannot be read from the file (an I/O error or
    /// corruption) is reported as absent.
    pub fn get_device(&self, id: &str) -> Option<Device> {
        self.load_record(id)
            .ok()
            .flatten()
            .map(|record| record.device)
    }

    /// The stored record of `id` with the live status and counters from memory; `None` if
    /// memory does not know the device (not added yet, or deleted).
    fn load_record(&self, id: &str) -> Result<Option<DeviceRecord>, RegistryError> {
        let Some(mut record) = self.store.device(id)? else {
            return Ok(None);
        };
        let state = self.read();
        let Some(hot) = state.devices.get(id) else {
            return Ok(None);
        };
        hot.overlay(&mut record.device);
        record.connections = hot.connections;
        Ok(Some(record))
    }

    /// Devices matching `query`, in id order, one page at a time. The cursor is the last id of
    /// the previous page, so paging is stable while devices come and go. Filters on model,
    /// label or search text read every record from the file (to count `total`); without them
    /// the count comes from memory and only the page is read. A storage error ends the
    /// listing early (the page holds what was read before it).
    pub fn list_devices(&self, query: &DeviceQuery) -> DevicePage {
        let limit = query.limit.clamp(1, MAX_PAGE_LIMIT);
        let search = query
            .search
            .as_deref()
            .filter(|search| !search.is_empty())
            .map(str::to_lowercase);
        let reads_records = query.model.is_some() || query.label.is_some() || search.is_some();
        let matches_record = |id: &str, view: &record::View<'_>| {
            query
                .model
                .as_deref()
                .is_none_or(|model| view.model == Some(model))
                && query
                    .label
                    .as_ref()
                    .is_none_or(|(key, value)| view.label(key) == Some(value.as_str()))
                && search.as_deref().is_none_or(|needle| {
                    contains_lowercase(id, needle)
                        || view
                            .name
                            .is_some_and(|name| contains_lowercase(name, needle))
                        || view.mac.is_some_and(|mac| mac.contains(needle))
                        || view.imei.is_some_and(|imei| imei.contains(needle))
                })
        };
        let mut total = 0;
        if !reads_records {
            total = self
                .read()
                .devices
                .values()
                .filter(|hot| query.status.is_none_or(|status| hot.status == status))
                .count();
        }
        let mut devices = Vec::new();
        let mut more = false;
        let cursor = query.cursor.as_deref();
        let scan = |id: &str, view: &record::View<'_>| {
            let Some(hot) = self.read().devices.get(id).copied() else {
                return ControlFlow::Continue(());
            };
            if query.status.is_some_and(|status| hot.status != status) || !matches_record(id, view)
            {
                return ControlFlow::Continue(());
            }
            if reads_records {
                total += 1;
            }
            if cursor.is_none_or(|cursor| id > cursor) {
                if devices.len() < limit {
                    let mut device = view.to_device(id, &hot.head());
                    hot.overlay(&mut device);
                    devices.push(device);
                } else {
                    more = true;
                    if !reads_records {
                        return ControlFlow::Break(());
                    }
                }
            }
            ControlFlow::Continue(())
        };
        let from = if reads_records { None } else { cursor };
        // A read error leaves the page as far as it got; the listing has no error channel.
        self.store.scan_devices(from, scan).ok();
        let next_cursor = if more {
            devices.last().map(|device| device.id.clone())
        } else {
            None
        };
        DevicePage {
            devices,
            next_cursor,
            total,
        }
    }

    /// Change a device's name, model or labels.
    pub fn update_device(&self, id: &str, patch: DevicePatch) -> Result<Device, RegistryError> {
        if let Some(name) = &patch.name {
            validate::opt_text("name", name.as_deref())?;
        }
        if let Some(model) = &patch.model {
            validate::opt_text("model", model.as_deref())?;
        }
        if let Some(labels) = &patch.labels {
            validate::labels(labels)?;
        }
        let _writer = self.lock_writer();
        let mut record = self.device_record(id)?;
        if let Some(name) = patch.name {
            record.device.name = name;
        }
        if let Some(model) = patch.model {
            record.device.model = model;
        }
        if let Some(labels) = patch.labels {
            record.device.labels = labels;
        }
        self.commit(vec![Write::PutDevice(Box::new(record))])?;
        self.get_device(id)
            .ok_or_else(|| RegistryError::device_not_found(id))
    }

    fn device_record(&self, id: &str) -> Result<DeviceRecord, RegistryError> {
        self.load_record(id)?
            .ok_or_else(|| RegistryError::device_not_found(id))
    }

    /// Delete a device, its credentials and commands; its sessions are closed (revocations).
    pub fn delete_device(&self, id: &str) -> Result<(), RegistryError> {
        let _writer = self.lock_writer();
        let mut writes = vec![Write::DeleteDevice(id.to_owned())];
        {
            let state = self.read();
            if !state.devices.contains_key(id) {
                return Err(RegistryError::device_not_found(id));
            }
            for command in state.commands.get(id).into_iter().flatten() {
                writes.push(Write::DeleteCommand {
                    device_id: id.to_owned(),
                    command_id: command.id.clone(),
                });
            }
        }
        self.commit(writes)?;
        self.broadcast_revocation(id);
        Ok(())
    }

    /// New secret (keyless devices) and tokens; the old secret, JWTs and refresh token stop
    /// working at once, and open sessions are closed (revocations). Forbidden for a revoked device.
    pub fn rotate_secret(&self, id: &str) -> Result<Provisioned, RegistryError> {
        let _writer = self.lock_writer();
        let now_ms = self.now_ms();
        let mut record = self.device_record(id)?;
        if record.device.status == DeviceStatus::Revoked {
            return Err(RegistryError::forbidden(format!(
                "device {id:?} is revoked"
            )));
        }
        let (version, next_version) = self.allocate_versions(1)?;
        record.credential_version = version;
        let issued = self.issue(&mut record, true, now_ms)?;
        self.commit(vec![next_version, Write::PutDevice(Box::new(record))])?;
        self.broadcast_revocation(id);
        let device = self
            .get_device(id)
            .ok_or_else(|| RegistryError::device_not_found(id))?;
        Ok(Provisioned {
            device,
            secret: issued.secret,
            tokens: issued.tokens,
        })
    }

    /// Revoke a device: status `revoked`, every authentication fails, sessions are closed.
    /// Idempotent.
    pub fn revoke_device(&self, id: &str) -> Result<Device, RegistryError> {
        let _writer = self.lock_writer();
        let mut record = self.device_record(id)?;
        record.device.status = DeviceStatus::Revoked;
        record.secret_hash = None;
        record.refresh_hash = None;
        let (version, next_version) = self.allocate_versions(1)?;
        record.credential_version = version;
        self.commit(vec![next_version, Write::PutDevice(Box::new(record))])?;
        self.broadcast_revocation(id);
        self.get_device(id)
            .ok_or_else(|| RegistryError::device_not_found(id))
    }

    /// Ids of devices revoked, deleted, rotated or re-registered, from now on: every session
    /// of such a device must close (and may re-authenticate with new credentials). On
    /// `RecvError::Lagged`, re-check every session with [`Registry::session_valid`].
    pub fn revocations(&self) -> broadcast::Receiver<String> {
        self.revocations.subscribe()
    }

    /// Replace the JWT signing key with a fresh random one. New tokens are signed with the new
    /// key at once; tokens signed with the old one keep verifying for `jwt_ttl` (by then every
    /// one of them has expired), so no device notices. Only the last old key is kept: a second
    /// rotation within `jwt_ttl` ends the first one's grace period early. Returns the end of
    /// the grace period (ms since the epoch).
    pub fn rotate_jwt_key(&self) -> Result<u64, RegistryError> {
        let current = self.random()?;
        let _writer = self.lock_writer();
        let previous = self.read().jwt_key;
        let previous_until_ms = self.now_ms().saturating_add(ms(self.options.jwt_ttl));
        self.commit(vec![Write::SetJwtKeys {
            current,
            previous,
            previous_until_ms,
        }])?;
        Ok(previous_until_ms)
    }

    /// Whether a session opened for `device_id` may stay open (device exists, not revoked).
    pub fn session_valid(&self, device_id: &str) -> bool {
        self.read()
            .devices
            .get(device_id)
            .is_some_and(|hot| !hot.revoked())
    }

    // ---------------------------------------------------------------- provisioning tokens

    /// Create a provisioning token; returns it and its secret (shown once, stored hashed).
    pub fn create_provisioning_token(
        &self,
        new: NewProvisioningToken,
    ) -> Result<(ProvisioningToken, String), RegistryError> {
        validate::opt_text("label", new.label.as_deref())?;
        if new.max_uses == 0 || new.max_uses > MAX_TOKEN_USES {
            return Err(RegistryError::invalid(
                "max_uses",
                format!("must be 1..={MAX_TOKEN_USES}"),
            ));
        }
        if new.ttl < Duration::from_secs(1) || new.ttl > MAX_TOKEN_TTL {
            return Err(RegistryError::invalid(
                "ttl",
                "must be between 1s and 366 days",
            ));
        }
        let secret = crypto::b64url(&self.random()?);
        let id = self.random_id("pt-")?;
        let _writer = self.lock_writer();
        let now_ms = self.now_ms();
        let token = ProvisioningToken {
            id,
            label: new.label,
            max_uses: new.max_uses,
            uses: 0,
            expires_at_ms: now_ms.saturating_add(ms(new.ttl)),
            revoked: false,
            created_at_ms: now_ms,
        };
        self.commit(vec![Write::PutToken(TokenRecord {
            token: token.clone(),
            secret_hash: Some(crypto::sha256(secret.as_bytes())),
        })])?;
        Ok((token, secret))
    }

    /// Every provisioning token (without secrets), oldest first.
    pub fn list_provisioning_tokens(&self) -> Vec<ProvisioningToken> {
        let mut tokens: Vec<ProvisioningToken> = self
            .read()
            .tokens
            .values()
            .map(|record| record.token.clone())
            .collect();
        tokens.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        tokens
    }

    /// Revoke a provisioning token (idempotent). Devices it registered are unaffected.
    pub fn revoke_provisioning_token(&self, id: &str) -> Result<(), RegistryError> {
        let _writer = self.lock_writer();
        let mut record =
            self.read()
                .tokens
                .get(id)
                .cloned()
                .ok_or_else(|| RegistryError::NotFound {
                    what: "provisioning token",
                    id: truncate_for_display(id),
                })?;
        if record.token.revoked {
            return Ok(());
        }
        record.token.revoked = true;
        self.commit(vec![Write::PutToken(record)])
    }

    // ---------------------------------------------------------------- self-registration

    /// A single-use nonce for a key-based registration, valid for `challenge_ttl`. Not
    /// persisted: a restart invalidates outstanding challenges.
    pub fn challenge(&self) -> Challenge {
        let now_ms = self.now_ms();
        // Without OS randomness we hand out a nonce that can never be redeemed (it is not stored)
        // rather than panic; the registration then fails with "unknown nonce".
        let Ok(nonce) = crypto::random_32() else {
            return Challenge {
                nonce: crypto::b64std(&[0u8; 32]),
                expires_at_ms: now_ms,
            };
        };
        let expires_at_ms = now_ms.saturating_add(ms(self.options.challenge_ttl));
        self.lock_challenges().insert(nonce, expires_at_ms, now_ms);
        Challenge {
            nonce: crypto::b64std(&nonce),
            expires_at_ms,
        }
    }

    /// Register a device with a provisioning token (see the crate docs for the rules).
    pub fn register(&self, request: Registration) -> Result<Provisioned, RegistryError> {
        // 1. Shape of the request (Invalid).
        if request.provisioning_token.len() > MAX_CREDENTIAL_LEN {
            return Err(RegistryError::forbidden("unknown provisioning token"));
        }
        validate::opt_text("name", request.name.as_deref())?;
        validate::opt_text("model", request.model.as_deref())?;
        let mac = request.mac.as_deref().map(validate::mac).transpose()?;
        let imei = request.imei.as_deref().map(validate::imei).transpose()?;
        let derived_id = match (&mac, &imei) {
            (Some(mac), _) => validate::id_from_mac(mac),
            (None, Some(imei)) => validate::id_from_imei(imei),
            (None, None) => {
                return Err(RegistryError::invalid(
                    "mac",
                    "a MAC or an IMEI is required",
                ));
            }
        };
        let public_key = normalise_key(request.public_key.as_deref())?;

        // 2. Proof of possession (Forbidden): the nonce is used up whatever happens next.
        if let Some(key) = &public_key {
            let nonce_text = request
                .nonce
                .as_deref()
                .ok_or_else(|| RegistryError::invalid("nonce", "required with a public_key"))?;
            let signature = request
                .signature
                .as_deref()
                .ok_or_else(|| RegistryError::invalid("signature", "required with a public_key"))?;
            let nonce: [u8; 32] = crypto::decode_b64_lenient(nonce_text)
                .and_then(|bytes| bytes.try_into().ok())
                .ok_or_else(|| {
                    RegistryError::invalid("nonce", "not a nonce from the challenge endpoint")
                })?;
            if !self.lock_challenges().take(&nonce, self.now_ms()) {
                return Err(RegistryError::forbidden(
                    "unknown, expired or already used nonce",
                ));
            }
            let key = crypto::parse_public_key(key)
                .map_err(|reason| RegistryError::invalid("public_key", reason))?;
            if !crypto::verify_signature(&key, &nonce, signature) {
                return Err(RegistryError::forbidden("bad signature over the nonce"));
            }
        }

        // 3. Token and device (Forbidden / Conflict), then one transaction.
        let _writer = self.lock_writer();
        let now_ms = self.now_ms();
        let (mut token, existing) = {
            let token = {
                let state = self.read();
                state
                    .token_by_hash
                    .get(&crypto::sha256(request.provisioning_token.as_bytes()))
                    .and_then(|id| state.tokens.get(id))
                    .cloned()
                    .ok_or_else(|| RegistryError::forbidden("unknown provisioning token"))?
            };
            if token.token.revoked {
                return Err(RegistryError::forbidden("provisioning token revoked"));
            }
            if now_ms >= token.token.expires_at_ms {
                return Err(RegistryError::forbidden("provisioning token expired"));
            }
            if token.token.uses >= token.token.max_uses {
                return Err(RegistryError::forbidden("provisioning token used up"));
            }
            let by_mac = match &mac {
                Some(mac) => self.store.device_with_mac(mac)?,
                None => None,
            };
            let by_imei = match &imei {
                Some(imei) => self.store.device_with_imei(imei)?,
                None => None,
            };
            let target = match (by_mac, by_imei) {
                (Some(a), Some(b)) if a != b => {
                    return Err(RegistryError::Conflict {
                        what: "device",
                        id: a.clone(),
                        reason: format!("the MAC belongs to {a:?} and the IMEI to {b:?}"),
                    });
                }
                (Some(id), _) | (None, Some(id)) => id,
                (None, None) => derived_id,
            };
            self.check_identifiers_free(&target, mac.as_deref(), imei.as_deref())?;
            let existing = self.load_record(&target)?;
            (token, existing.ok_or(target))
        };

        let (mut record, re_registered) = match existing {
            Ok(mut record) => {
                if record.device.status == DeviceStatus::Revoked {
                    return Err(RegistryError::forbidden(format!(
                        "device {:?} is revoked",
                        record.device.id
                    )));
                }
                if record.device.public_key != public_key {
                    return Err(RegistryError::Conflict {
                        what: "device",
                        id: record.device.id.clone(),
                        reason: "already registered with a different public key".into(),
                    });
                }
                // A provisioning token and a MAC/IMEI are not proof of identity: only a
                // signature by the registered key (checked above) is.
                if record.device.public_key.is_none() {
                    return Err(RegistryError::Conflict {
                        what: "device",
                        id: record.device.id.clone(),
                        reason: "already registered; re-registering needs a signature by the \
                                 device's registered key, or an admin re-provision \
                                 (POST /api/v1/devices/{id}/rotate)"
                            .into(),
                    });
                }
                for (stored, given, field) in [
                    (&record.device.mac, &mac, "MAC"),
                    (&record.device.imei, &imei, "IMEI"),
                ] {
                    if let (Some(stored), Some(given)) = (stored, given) {
                        if stored != given {
                            return Err(RegistryError::Conflict {
                                what: "device",
                                id: record.device.id.clone(),
                                reason: format!("already registered with a different {field}"),
                            });
                        }
                    }
                }
                if record.device.mac.is_none() {
                    record.device.mac = mac;
                }
                if record.device.imei.is_none() {
                    record.device.imei = imei;
                }
                if request.name.is_some() {
                    record.device.name = request.name;
                }
                if request.model.is_some() {
                    record.device.model = request.model;
                }
                (record, true)
            }
            Err(id) => (
                DeviceRecord::new(Device {
                    id,
                    name: request.name,
                    model: request.model,
                    labels: BTreeMap::new(),
                    mac,
                    imei,
                    public_key,
                    created_at_ms: now_ms,
                    last_seen_ms: None,
                    status: DeviceStatus::Offline,
                    messages: 0,
                    bytes: 0,
                    errors: 0,
                }),
                false,
            ),
        };
        let (version, next_version) = self.allocate_versions(1)?;
        record.credential_version = version;
        let issued = self.issue(&mut record, true, now_ms)?;
        token.token.uses += 1;
        let id = record.device.id.clone();
        self.commit(vec![
            next_version,
            Write::PutToken(token),
            Write::PutDevice(Box::new(record)),
        ])?;
        if re_registered {
            self.broadcast_revocation(&id);
        }
        let device = self
            .get_device(&id)
            .ok_or_else(|| RegistryError::device_not_found(&id))?;
        Ok(Provisioned {
            device,
            secret: issued.secret,
            tokens: issued.tokens,
        })
    }

    // ---------------------------------------------------------------- authentication

    /// Check a device secret. Memory only; constant-time comparison of SHA-256 digests.
    pub fn authenticate_secret(&self, device_id: &str, secret: &str) -> Result<(), AuthError> {
        if secret.len() > MAX_CREDENTIAL_LEN || device_id.len() > 128 {
            return Err(AuthError::Malformed);
        }
        let presented = crypto::sha256(secret.as_bytes());
        let state = self.read();
        let hot = state
            .devices
            .get(device_id)
            .ok_or(AuthError::UnknownDevice)?;
        if hot.revoked() {
            return Err(AuthError::Revoked);
        }
        let stored = hot.secret_hash.ok_or(AuthError::BadCredentials)?;
        if crypto::ct_eq(&stored, &presented) {
            Ok(())
        } else {
            Err(AuthError::BadCredentials)
        }
    }

    /// Check an access JWT; returns the device id. Memory only.
    pub fn authenticate_jwt(&self, token: &str) -> Result<String, AuthError> {
        self.authenticate_jwt_at(token, self.now_ms())
    }

    /// [`Registry::authenticate_jwt`] at a given time (ms since the epoch).
    pub fn authenticate_jwt_at(&self, token: &str, now_ms: u64) -> Result<String, AuthError> {
        let state = self.read();
        let verify = |key: &[u8; 32]| {
            jwt::verify(
                token,
                key,
                &self.options.gateway_id,
                now_ms / 1000,
                self.options.jwt_ttl.as_secs(),
            )
        };
        let claims = match (verify(&state.jwt_key), state.previous_jwt_key) {
            (Err(AuthError::BadCredentials), Some((previous, until_ms))) if now_ms < until_ms => {
                verify(&previous)?
            }
            (verified, _) => verified?,
        };
        let hot = state
            .devices
            .get(claims.sub.as_str())
            .ok_or(AuthError::UnknownDevice)?;
        if hot.revoked() {
            return Err(AuthError::Revoked);
        }
        if hot.credential_version != claims.ver {
            return Err(AuthError::BadCredentials);
        }
        Ok(claims.sub)
    }

    /// mTLS: the certificate (already verified against the client CA by TLS) names a device
    /// by its CN; the device must exist and not be revoked.
    pub fn authenticate_certificate(&self, common_name: &str) -> Result<(), AuthError> {
        let state = self.read();
        let hot = state
            .devices
            .get(common_name)
            .ok_or(AuthError::UnknownDevice)?;
        if hot.revoked() {
            return Err(AuthError::Revoked);
        }
        Ok(())
    }

    /// Trade a refresh token (single use) for a new access and refresh token. The device's
    /// older access tokens stop working (its credential version moves on); open sessions stay.
    /// A storage failure is reported as `BadCredentials` and leaves the old tokens valid.
    pub fn refresh(&self, refresh_token: &str) -> Result<Tokens, AuthError> {
        if refresh_token.is_empty() || refresh_token.len() > MAX_CREDENTIAL_LEN {
            return Err(AuthError::Malformed);
        }
        let presented = crypto::sha256(refresh_token.as_bytes());
        let _writer = self.lock_writer();
        let now_ms = self.now_ms();
        let id = match refresh_token.rsplit_once('.') {
            Some((id, _)) => id.to_owned(),
            // Issued before refresh tokens carried their device id (a migrated schema-1 file).
            None => self
                .store
                .device_with_legacy_refresh(&presented)
                .map_err(|_| AuthError::BadCredentials)?
                .ok_or(AuthError::BadCredentials)?,
        };
        let mut record = self
            .load_record(&id)
            .map_err(|_| AuthError::BadCredentials)?
            .ok_or(AuthError::BadCredentials)?;
        let stored = record.refresh_hash.ok_or(AuthError::BadCredentials)?;
        if !crypto::ct_eq(&stored, &presented) {
            return Err(AuthError::BadCredentials);
        }
        if record.device.status == DeviceStatus::Revoked {
            return Err(AuthError::Revoked);
        }
        if now_ms >= record.refresh_expires_at_ms {
            return Err(AuthError::Expired);
        }
        let (version, next_version) = self
            .allocate_versions(1)
            .map_err(|_| AuthError::BadCredentials)?;
        record.credential_version = version;
        let issued = self
            .issue(&mut record, false, now_ms)
            .map_err(|_| AuthError::BadCredentials)?;
        self.commit(vec![next_version, Write::PutDevice(Box::new(record))])
            .map_err(|_| AuthError::BadCredentials)?;
        Ok(issued.tokens)
    }

    // ---------------------------------------------------------------- status

    fn update_live(&self, id: &str, change: impl FnOnce(&mut Hot)) {
        let mut state = self.write_state();
        let Some(hot) = state.devices.get_mut(id) else {
            return;
        };
        change(hot);
        if !state.dirty.contains(id) {
            state.dirty.insert(id.to_owned());
        }
    }

    /// A connection of device `id` opened (authenticated). Unknown devices are ignored.
    pub fn record_connected(&self, id: &str, now_ms: u64) {
        self.update_live(id, |hot| {
            hot.connections = hot.connections.saturating_add(1);
            hot.live.last_seen_ms = Some(now_ms);
            if !hot.revoked() {
                hot.status = DeviceStatus::Online;
            }
        });
    }

    /// A connection of device `id` closed; offline when it was the last.
    pub fn record_disconnected(&self, id: &str, now_ms: u64) {
        self.update_live(id, |hot| {
            hot.connections = hot.connections.saturating_sub(1);
            hot.live.last_seen_ms = Some(now_ms);
            if hot.connections == 0 && hot.status == DeviceStatus::Online {
                hot.status = DeviceStatus::Offline;
            }
        });
    }

    /// A message of `bytes` payload bytes arrived from device `id`.
    pub fn record_message(&self, id: &str, bytes: u64, now_ms: u64) {
        self.update_live(id, |hot| {
            hot.live.messages = hot.live.messages.saturating_add(1);
            hot.live.bytes = hot.live.bytes.saturating_add(bytes);
            hot.live.last_seen_ms = Some(now_ms);
        });
    }

    /// An error was counted against device `id`.
    pub fn record_error(&self, id: &str) {
        self.update_live(id, |hot| {
            hot.live.errors = hot.live.errors.saturating_add(1);
        });
    }

    /// Devices whose status or counters changed since the last flush.
    pub fn dirty_count(&self) -> usize {
        self.read().dirty.len()
    }

    /// Write changed status and counters to disk (durable transactions of up to
    /// 10,000 devices, in id order). The daemon calls this every few seconds from a
    /// blocking task, and on shutdown; `record_*` never touch disk. On an error, devices not
    /// yet written stay dirty.
    pub fn flush(&self) -> Result<(), RegistryError> {
        let _writer = self.lock_writer();
        let mut ids: Vec<String> = std::mem::take(&mut self.write_state().dirty)
            .into_iter()
            .collect();
        // In key order, each B-tree page is written once per flush.
        ids.sort_unstable();
        for (n, chunk) in ids.chunks(FLUSH_CHUNK).enumerate() {
            // A change after this read marks the device dirty again: the next flush has it.
            let writes: Vec<Write> = {
                let state = self.read();
                chunk
                    .iter()
                    .filter_map(|id| {
                        let hot = state.devices.get(id.as_str())?;
                        Some(Write::PutHead {
                            id: id.clone(),
                            head: hot.head(),
                        })
                    })
                    .collect()
            };
            if let Err(error) = self.store.apply(&writes, true) {
                let mut state = self.write_state();
                for id in ids.into_iter().skip(n * FLUSH_CHUNK) {
                    if state.devices.contains_key(id.as_str()) {
                        state.dirty.insert(id);
                    }
                }
                return Err(error);
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- commands

    /// Queue a command for a device. Idempotent by command id: the same id with the same name,
    /// params and TTL returns the stored command; with a different body, Conflict.
    pub fn submit_command(
        &self,
        device_id: &str,
        new: NewCommand,
        now_ms: u64,
    ) -> Result<Command, RegistryError> {
        validate::command_id(&new.id)?;
        if new.name.is_empty() || new.name.len() > 128 || new.name.chars().any(char::is_control) {
            return Err(RegistryError::invalid(
                "name",
                "must be 1..=128 bytes without control characters",
            ));
        }
        let params_len = serde_json::to_vec(&new.params).map_or(usize::MAX, |bytes| bytes.len());
        if params_len > validate::MAX_PARAMS_LEN {
            return Err(RegistryError::invalid("params", "larger than 64 KiB"));
        }
        if new.ttl < Duration::from_secs(1) || new.ttl > MAX_COMMAND_TTL {
            return Err(RegistryError::invalid(
                "ttl",
                "must be between 1s and 30 days",
            ));
        }
        let _writer = self.lock_writer();
        let mut writes = Vec::new();
        let command = {
            let state = self.read();
            let hot = state
                .devices
                .get(device_id)
                .ok_or_else(|| RegistryError::device_not_found(device_id))?;
            if hot.revoked() {
                return Err(RegistryError::forbidden(format!(
                    "device {device_id:?} is revoked"
                )));
            }
            if let Some(existing) = state.command(device_id, &new.id) {
                let same = existing.name == new.name
                    && existing.params == new.params
                    && existing
                        .expires_at_ms
                        .saturating_sub(existing.created_at_ms)
                        == ms(new.ttl);
                if same {
                    return Ok(existing.clone());
                }
                return Err(RegistryError::Conflict {
                    what: "command",
                    id: new.id,
                    reason: "a different command with this id exists".into(),
                });
            }
            let list = state.commands.get(device_id).map_or(&[][..], Vec::as_slice);
            if list.len() >= MAX_COMMANDS_PER_DEVICE {
                let oldest_finished = list
                    .iter()
                    .find(|command| command.state.is_terminal())
                    .ok_or_else(|| RegistryError::Conflict {
                        what: "command",
                        id: new.id.clone(),
                        reason: format!("device has {MAX_COMMANDS_PER_DEVICE} unfinished commands"),
                    })?;
                writes.push(Write::DeleteCommand {
                    device_id: device_id.to_owned(),
                    command_id: oldest_finished.id.clone(),
                });
            }
            Command {
                id: new.id,
                device_id: device_id.to_owned(),
                name: new.name,
                params: new.params,
                state: CommandState::Queued,
                created_at_ms: now_ms,
                expires_at_ms: now_ms.saturating_add(ms(new.ttl)),
                updated_at_ms: now_ms,
                result: None,
            }
        };
        writes.push(Write::PutCommand(command.clone()));
        self.commit(writes)?;
        Ok(command)
    }

    /// Queued, unexpired commands of a device, oldest first (what to send when it connects).
    pub fn pending_commands(&self, device_id: &str, now_ms: u64) -> Vec<Command> {
        self.read()
            .commands
            .get(device_id)
            .into_iter()
            .flatten()
            .filter(|command| {
                command.state == CommandState::Queued && now_ms < command.expires_at_ms
            })
            .cloned()
            .collect()
    }

    /// Move a command to `state` (see [`CommandState::can_become`]); `result` is kept when
    /// given. Marking the state it already has is a no-op. A queued command past its TTL
    /// cannot be sent (Conflict).
    pub fn mark_command(
        &self,
        device_id: &str,
        command_id: &str,
        state: CommandState,
        result: Option<serde_json::Value>,
        now_ms: u64,
    ) -> Result<Command, RegistryError> {
        if let Some(result) = &result {
            let len = serde_json::to_vec(result).map_or(usize::MAX, |bytes| bytes.len());
            if len > validate::MAX_PARAMS_LEN {
                return Err(RegistryError::invalid("result", "larger than 64 KiB"));
            }
        }
        let _writer = self.lock_writer();
        let mut command = self
            .read()
            .command(device_id, command_id)
            .cloned()
            .ok_or_else(|| RegistryError::NotFound {
                what: "command",
                id: truncate_for_display(command_id),
            })?;
        if command.state == state {
            return Ok(command);
        }
        if !command.state.can_become(state) {
            return Err(RegistryError::Conflict {
                what: "command",
                id: command.id,
                reason: format!(
                    "cannot go from {} to {}",
                    command.state.as_str(),
                    state.as_str()
                ),
            });
        }
        if command.state == CommandState::Queued
            && state == CommandState::Sent
            && now_ms >= command.expires_at_ms
        {
            return Err(RegistryError::Conflict {
                what: "command",
                id: command.id,
                reason: "expired before it was sent".into(),
            });
        }
        command.state = state;
        command.updated_at_ms = now_ms;
        if result.is_some() {
            command.result = result;
        }
        self.commit(vec![Write::PutCommand(command.clone())])?;
        Ok(command)
    }

    /// A command by device and id.
    pub fn get_command(&self, device_id: &str, command_id: &str) -> Option<Command> {
        self.read().command(device_id, command_id).cloned()
    }

    /// Every kept command of a device, oldest first.
    pub fn list_commands(&self, device_id: &str) -> Vec<Command> {
        self.read()
            .commands
            .get(device_id)
            .cloned()
            .unwrap_or_default()
    }

    /// Expire queued and sent commands past their TTL; returns them (to report upstream).
    /// A storage failure leaves them unexpired (they are retried on the next call) and
    /// returns nothing.
    pub fn expire_commands(&self, now_ms: u64) -> Vec<Command> {
        let _writer = self.lock_writer();
        let expired: Vec<Command> = self
            .read()
            .commands
            .values()
            .flatten()
            .filter(|command| {
                matches!(command.state, CommandState::Queued | CommandState::Sent)
                    && now_ms >= command.expires_at_ms
            })
            .map(|command| Command {
                state: CommandState::Expired,
                updated_at_ms: now_ms,
                ..command.clone()
            })
            .collect();
        if expired.is_empty() {
            return expired;
        }
        let writes = expired.iter().cloned().map(Write::PutCommand).collect();
        match self.commit(writes) {
            Ok(()) => expired,
            Err(_) => Vec::new(),
        }
    }
}

/// Parse and re-encode a public key as standard base64, so the same key always compares equal.
fn normalise_key(key: Option<&str>) -> Result<Option<String>, RegistryError> {
    key.map(|text| {
        crypto::parse_public_key(text)
            .map(|key| crypto::b64std(key.as_bytes()))
            .map_err(|reason| RegistryError::invalid("public_key", reason))
    })
    .transpose()
}

/// Whether `haystack` contains `needle` (already lowercase), ignoring case; without allocating
/// when both are ASCII.
fn contains_lowercase(haystack: &str, needle: &str) -> bool {
    if needle.is_empty() {
        return true;
    }
    if haystack.is_ascii() && needle.is_ascii() {
        haystack
            .as_bytes()
            .windows(needle.len())
            .any(|window| window.eq_ignore_ascii_case(needle.as_bytes()))
    } else {
        haystack.to_lowercase().contains(needle)
    }
}
