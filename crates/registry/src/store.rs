//! The redb file: stored record formats, loading what memory needs at open, reading devices on
//! demand, and applying one batch of writes per transaction. Knows nothing about the rules;
//! [`crate::Registry`] decides what to write.
//!
//! Tables: `device_auth` (id → binary head: secret hash, credential version, live status and
//! counters; loaded at open and rewritten by a status flush), `device_records` (id → binary
//! profile: the rest of the [`DeviceRecord`]; see [`crate::record`] for both),
//! `device_by_mac` and `device_by_imei` (identifier → id), `device_by_legacy_refresh`
//! (SHA-256 of a refresh token issued before tokens named their device → id; filled only by
//! the migration), `provisioning_tokens` (id → JSON [`TokenRecord`]), `commands` ((device
//! id, command id) → JSON [`Command`]), `meta` (`jwt_key` → 32 raw bytes, `schema` →
//! version, `next_credential_version` → u64 big-endian, and after a key rotation
//! `previous_jwt_key` → 32 raw bytes with `previous_jwt_key_until` → u64 big-endian ms since
//! the epoch). The other `device_*` tables are kept in step with `device_records` by
//! [`DeviceTables`], in the same transaction.
//!
//! Schema 1 kept devices as JSON in a `devices` table; [`crate::migrate`] rewrites such a file
//! to schema 2 in one transaction at open.
//!
//! `next_credential_version` is the store-wide generation counter: every credential version
//! handed out comes from it, so a version never repeats for any id, even across delete and
//! re-add (a JWT of a deleted device can never match its successor). A file written before the
//! counter existed starts it at 2^32, above every version the old `u32` counter could reach.
//!
//! redb's page cache is capped at [`CACHE_BYTES`]: the registry keeps its own index of what
//! the hot paths need, so the cache only speeds up admin reads.
//!
//! The file is created 0600 and an existing one is tightened to 0600 (it holds the JWT key).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use redb::{
    Database, Durability, ReadTransaction, ReadableTable, ReadableTableMetadata, Table,
    TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};

use crate::crypto::Hash;
use crate::error::RegistryError;
use crate::index::{DeviceIndex, Hot};
use crate::record::{self, Head};
use crate::types::{Command, Device, ProvisioningToken};

/// Schema 1's JSON device records; only read, by the migration.
pub(crate) const LEGACY_DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
const DEVICE_AUTH: TableDefinition<&str, &[u8]> = TableDefinition::new("device_auth");
const DEVICE_RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("device_records");
const BY_MAC: TableDefinition<&str, &str> = TableDefinition::new("device_by_mac");
const BY_IMEI: TableDefinition<&str, &str> = TableDefinition::new("device_by_imei");
const LEGACY_REFRESH: TableDefinition<&[u8], &str> =
    TableDefinition::new("device_by_legacy_refresh");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("provisioning_tokens");
const COMMANDS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("commands");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const SCHEMA_VERSION: &[u8] = b"2";
/// JSON device records, migrated at open.
pub(crate) const LEGACY_SCHEMA_VERSION: &[u8] = b"1";
const NEXT_VERSION: &str = "next_credential_version";
/// Where the counter starts in a file written before it existed: above every `u32` version.
const MIGRATED_NEXT_VERSION: u64 = 1 << 32;
/// redb's page cache (its default is 1 GiB, which a full scan of a large file would fill).
pub(crate) const CACHE_BYTES: usize = 8 << 20;

/// What the store's internals fail with before [`Store`] names the file.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A device with its credential state: what the registry writes (binary, [`crate::record`]),
/// and the JSON of a schema-1 file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DeviceRecord {
    pub(crate) device: Device,
    /// SHA-256 of the secret's base64url text; `None` for key-based devices.
    #[serde(with = "hash_b64")]
    pub(crate) secret_hash: Option<Hash>,
    /// A fresh value from the store-wide counter at every add, rotation, re-registration,
    /// refresh and revocation; JWTs carry it as `ver`.
    pub(crate) credential_version: u64,
    /// SHA-256 of the one live refresh token.
    #[serde(with = "hash_b64")]
    pub(crate) refresh_hash: Option<Hash>,
    pub(crate) refresh_expires_at_ms: u64,
    /// Open connections (memory only).
    #[serde(skip)]
    pub(crate) connections: u32,
}

impl DeviceRecord {
    /// A new device with no credentials yet and no open connections.
    pub(crate) fn new(device: Device) -> Self {
        Self {
            device,
            secret_hash: None,
            credential_version: 0,
            refresh_hash: None,
            refresh_expires_at_ms: 0,
            connections: 0,
        }
    }
}

/// A provisioning token with the hash of its secret, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TokenRecord {
    pub(crate) token: ProvisioningToken,
    #[serde(with = "hash_b64")]
    pub(crate) secret_hash: Option<Hash>,
}

/// One change to the file.
#[derive(Debug, Clone)]
pub(crate) enum Write {
    PutDevice(Box<DeviceRecord>),
    DeleteDevice(String),
    /// A device's head, with new live status and counters (skipped if the device no longer
    /// exists).
    PutHead {
        id: String,
        head: Head,
    },
    PutToken(TokenRecord),
    PutCommand(Command),
    DeleteCommand {
        device_id: String,
        command_id: String,
    },
    /// The next credential version to hand out.
    SetNextVersion(u64),
    /// A new JWT signing key; the old one still verifies until the given time (ms).
    SetJwtKeys {
        current: [u8; 32],
        previous: [u8; 32],
        previous_until_ms: u64,
    },
}

/// Everything in the file.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    /// Every device's hot fields (the rest stays in the file).
    pub(crate) devices: DeviceIndex,
    pub(crate) tokens: Vec<TokenRecord>,
    pub(crate) commands: Vec<Command>,
    pub(crate) jwt_key: [u8; 32],
    /// The key before the last rotation and until when (ms) it still verifies.
    pub(crate) previous_jwt_key: Option<([u8; 32], u64)>,
    pub(crate) next_version: u64,
}

/// The open redb database.
pub(crate) struct Store {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Open (or create) the file, create missing tables and the JWT key, migrate a schema-1
    /// file, and load what memory needs.
    pub(crate) fn open(path: &Path) -> Result<(Store, Loaded), RegistryError> {
        let error = |source: BoxError| RegistryError::Storage {
            path: path.to_owned(),
            source,
        };
        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            create_private_dir(parent).map_err(|e| error(e.into()))?;
        }
        create_private_file(path).map_err(|e| error(e.into()))?;
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| error(redb::Error::from(e).into()))?;
        let store = Store {
            db,
            path: path.to_owned(),
        };
        store.init()?;
        let loaded = store.load()?;
        Ok((store, loaded))
    }

    fn error(&self, source: impl Into<BoxError>) -> RegistryError {
        RegistryError::Storage {
            path: self.path.clone(),
            source: source.into(),
        }
    }

    fn redb(&self, source: impl Into<redb::Error>) -> RegistryError {
        self.error(Box::new(source.into()))
    }

    fn corrupt(&self, table: &str, key: &str, error: &dyn std::fmt::Display) -> RegistryError {
        self.error(format!("corrupt record {key:?} in table {table}: {error}"))
    }

    /// Create tables, check the schema version (migrating schema 1), generate the JWT key on
    /// first open.
    fn init(&self) -> Result<(), RegistryError> {
        let txn = self.db.begin_write().map_err(|e| self.redb(e))?;
        {
            DeviceTables::open(&txn).map_err(|e| self.error(e))?;
            txn.open_table(TOKENS).map_err(|e| self.redb(e))?;
            txn.open_table(COMMANDS).map_err(|e| self.redb(e))?;
            let mut meta = txn.open_table(META).map_err(|e| self.redb(e))?;
            let schema = meta
                .get("schema")
                .map_err(|e| self.redb(e))?
                .map(|value| value.value().to_vec());
            match schema.as_deref() {
                None => {
                    meta.insert("schema", SCHEMA_VERSION)
                        .map_err(|e| self.redb(e))?;
                    meta.insert(NEXT_VERSION, 1u64.to_be_bytes().as_slice())
                        .map_err(|e| self.redb(e))?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(LEGACY_SCHEMA_VERSION) => {
                    if meta.get(NEXT_VERSION).map_err(|e| self.redb(e))?.is_none() {
                        meta.insert(NEXT_VERSION, MIGRATED_NEXT_VERSION.to_be_bytes().as_slice())
                            .map_err(|e| self.redb(e))?;
                    }
                    crate::migrate::devices_to_binary(&txn).map_err(|e| self.error(e))?;
                    meta.insert("schema", SCHEMA_VERSION)
                        .map_err(|e| self.redb(e))?;
                }
                Some(other) => {
                    return Err(self.error(format!(
                        "unsupported registry schema {:?} (this build reads {:?} and {:?})",
                        String::from_utf8_lossy(other),
                        String::from_utf8_lossy(SCHEMA_VERSION),
                        String::from_utf8_lossy(LEGACY_SCHEMA_VERSION)
                    )));
                }
            }
            let has_key = meta.get("jwt_key").map_err(|e| self.redb(e))?.is_some();
            if !has_key {
                let key = crate::crypto::random_32().map_err(|e| self.error(e.to_string()))?;
                meta.insert("jwt_key", key.as_slice())
                    .map_err(|e| self.redb(e))?;
            }
        }
        txn.commit().map_err(|e| self.redb(e))
    }

    fn load(&self) -> Result<Loaded, RegistryError> {
        let txn = self.db.begin_read().map_err(|e| self.redb(e))?;
        let mut loaded = Loaded::default();

        let meta = txn.open_table(META).map_err(|e| self.redb(e))?;
        let key = meta
            .get("jwt_key")
            .map_err(|e| self.redb(e))?
            .ok_or_else(|| self.error("missing jwt_key"))?;
        loaded.jwt_key = key
            .value()
            .try_into()
            .map_err(|_| self.error("jwt_key is not 32 bytes"))?;
        let next = meta
            .get(NEXT_VERSION)
            .map_err(|e| self.redb(e))?
            .ok_or_else(|| self.error(format!("missing {NEXT_VERSION}")))?;
        let next: [u8; 8] = next
            .value()
            .try_into()
            .map_err(|_| self.error(format!("{NEXT_VERSION} is not 8 bytes")))?;
        loaded.next_version = u64::from_be_bytes(next);
        let previous = meta
            .get("previous_jwt_key")
            .map_err(|e| self.redb(e))?
            .map(|value| <[u8; 32]>::try_from(value.value()))
            .transpose()
            .map_err(|_| self.error("previous_jwt_key is not 32 bytes"))?;
        let until = meta
            .get("previous_jwt_key_until")
            .map_err(|e| self.redb(e))?
            .map(|value| <[u8; 8]>::try_from(value.value()).map(u64::from_be_bytes))
            .transpose()
            .map_err(|_| self.error("previous_jwt_key_until is not 8 bytes"))?;
        loaded.previous_jwt_key = previous.zip(until);

        let devices = txn.open_table(DEVICE_AUTH).map_err(|e| self.redb(e))?;
        loaded
            .devices
            .reserve(usize::try_from(devices.len().map_err(|e| self.redb(e))?).unwrap_or(0));
        for item in devices.iter().map_err(|e| self.redb(e))? {
            let (key, value) = item.map_err(|e| self.redb(e))?;
            let head = record::decode_head(value.value())
                .map_err(|e| self.corrupt("device_auth", key.value(), &e))?;
            loaded
                .devices
                .insert(key.value().into(), Hot::at_open(&head));
        }

        let tokens = txn.open_table(TOKENS).map_err(|e| self.redb(e))?;
        for item in tokens.iter().map_err(|e| self.redb(e))? {
            let (key, value) = item.map_err(|e| self.redb(e))?;
            let record: TokenRecord = serde_json::from_slice(value.value())
                .map_err(|e| self.corrupt("provisioning_tokens", key.value(), &e))?;
            loaded.tokens.push(record);
        }

        let commands = txn.open_table(COMMANDS).map_err(|e| self.redb(e))?;
        for item in commands.iter().map_err(|e| self.redb(e))? {
            let (key, value) = item.map_err(|e| self.redb(e))?;
            let command: Command = serde_json::from_slice(value.value()).map_err(|e| {
                let (device, id) = key.value();
                self.corrupt("commands", &format!("{device}/{id}"), &e)
            })?;
            loaded.commands.push(command);
        }
        Ok(loaded)
    }

    fn begin_read(&self) -> Result<ReadTransaction, RegistryError> {
        self.db.begin_read().map_err(|e| self.redb(e))
    }

    /// The stored device `id`, with the live status and counters of its last flush.
    pub(crate) fn device(&self, id: &str) -> Result<Option<DeviceRecord>, RegistryError> {
        let txn = self.begin_read()?;
        let heads = txn.open_table(DEVICE_AUTH).map_err(|e| self.redb(e))?;
        let profiles = txn.open_table(DEVICE_RECORDS).map_err(|e| self.redb(e))?;
        let head = heads.get(id).map_err(|e| self.redb(e))?;
        let profile = profiles.get(id).map_err(|e| self.redb(e))?;
        let (Some(head), Some(profile)) = (head, profile) else {
            return Ok(None);
        };
        let head =
            record::decode_head(head.value()).map_err(|e| self.corrupt("device_auth", id, &e))?;
        let view =
            record::view(profile.value()).map_err(|e| self.corrupt("device_records", id, &e))?;
        Ok(Some(view.to_record(id, &head)))
    }

    /// Which device has this (normalised) MAC.
    pub(crate) fn device_with_mac(&self, mac: &str) -> Result<Option<String>, RegistryError> {
        self.owner(BY_MAC, mac)
    }

    /// Which device has this IMEI.
    pub(crate) fn device_with_imei(&self, imei: &str) -> Result<Option<String>, RegistryError> {
        self.owner(BY_IMEI, imei)
    }

    fn owner(
        &self,
        table: TableDefinition<&str, &str>,
        key: &str,
    ) -> Result<Option<String>, RegistryError> {
        let txn = self.begin_read()?;
        let table = txn.open_table(table).map_err(|e| self.redb(e))?;
        Ok(table
            .get(key)
            .map_err(|e| self.redb(e))?
            .map(|id| id.value().to_owned()))
    }

    /// Which device's live refresh token, issued before tokens named their device, hashes
    /// to `hash`.
    pub(crate) fn device_with_legacy_refresh(
        &self,
        hash: &Hash,
    ) -> Result<Option<String>, RegistryError> {
        let txn = self.begin_read()?;
        let table = txn.open_table(LEGACY_REFRESH).map_err(|e| self.redb(e))?;
        Ok(table
            .get(hash.as_slice())
            .map_err(|e| self.redb(e))?
            .map(|id| id.value().to_owned()))
    }

    /// Visit stored devices in id order, starting after `after`, until `visit` breaks.
    pub(crate) fn scan_devices(
        &self,
        after: Option<&str>,
        mut visit: impl FnMut(&str, &record::View<'_>) -> ControlFlow<()>,
    ) -> Result<(), RegistryError> {
        use std::ops::Bound;
        let txn = self.begin_read()?;
        let table = txn.open_table(DEVICE_RECORDS).map_err(|e| self.redb(e))?;
        let range = match after {
            Some(after) => table.range::<&str>((Bound::Excluded(after), Bound::Unbounded)),
            None => table.range::<&str>(..),
        };
        for item in range.map_err(|e| self.redb(e))? {
            let (key, value) = item.map_err(|e| self.redb(e))?;
            let id = key.value();
            let view =
                record::view(value.value()).map_err(|e| self.corrupt("device_records", id, &e))?;
            if visit(id, &view).is_break() {
                break;
            }
        }
        Ok(())
    }

    /// Apply `writes` in one transaction. `durable`: fsync before returning (admin changes,
    /// credentials); otherwise the commit may be lost on power loss (counters and status).
    pub(crate) fn apply(&self, writes: &[Write], durable: bool) -> Result<(), RegistryError> {
        if writes.is_empty() {
            return Ok(());
        }
        let mut txn = self.db.begin_write().map_err(|e| self.redb(e))?;
        txn.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::Eventual
        });
        {
            let mut devices = DeviceTables::open(&txn).map_err(|e| self.error(e))?;
            let mut tokens = txn.open_table(TOKENS).map_err(|e| self.redb(e))?;
            let mut commands = txn.open_table(COMMANDS).map_err(|e| self.redb(e))?;
            let mut meta = txn.open_table(META).map_err(|e| self.redb(e))?;
            for write in writes {
                match write {
                    Write::PutDevice(record) => {
                        devices.put(record).map_err(|e| self.error(e))?;
                    }
                    Write::DeleteDevice(id) => {
                        devices.delete(id).map_err(|e| self.error(e))?;
                    }
                    Write::PutHead { id, head } => {
                        devices.put_head(id, head).map_err(|e| self.error(e))?;
                    }
                    Write::PutToken(record) => {
                        let bytes = serde_json::to_vec(record).map_err(|e| self.error(e))?;
                        tokens
                            .insert(record.token.id.as_str(), bytes.as_slice())
                            .map_err(|e| self.redb(e))?;
                    }
                    Write::PutCommand(command) => {
                        let bytes = serde_json::to_vec(command).map_err(|e| self.error(e))?;
                        commands
                            .insert(
                                (command.device_id.as_str(), command.id.as_str()),
                                bytes.as_slice(),
                            )
                            .map_err(|e| self.redb(e))?;
                    }
                    Write::DeleteCommand {
                        device_id,
                        command_id,
                    } => {
                        commands
                            .remove((device_id.as_str(), command_id.as_str()))
                            .map_err(|e| self.redb(e))?;
                    }
                    Write::SetNextVersion(next) => {
                        meta.insert(NEXT_VERSION, next.to_be_bytes().as_slice())
                            .map_err(|e| self.redb(e))?;
                    }
                    Write::SetJwtKeys {
                        current,
                        previous,
                        previous_until_ms,
                    } => {
                        meta.insert("jwt_key", current.as_slice())
                            .map_err(|e| self.redb(e))?;
                        meta.insert("previous_jwt_key", previous.as_slice())
                            .map_err(|e| self.redb(e))?;
                        meta.insert(
                            "previous_jwt_key_until",
                            previous_until_ms.to_be_bytes().as_slice(),
                        )
                        .map_err(|e| self.redb(e))?;
                    }
                }
            }
        }
        txn.commit().map_err(|e| self.redb(e))
    }
}

/// The device tables of one write transaction: every change to a device record updates the
/// identifier and refresh-token tables with it.
pub(crate) struct DeviceTables<'txn> {
    heads: Table<'txn, &'static str, &'static [u8]>,
    records: Table<'txn, &'static str, &'static [u8]>,
    by_mac: Table<'txn, &'static str, &'static str>,
    by_imei: Table<'txn, &'static str, &'static str>,
    legacy_refresh: Table<'txn, &'static [u8], &'static str>,
}

impl<'txn> DeviceTables<'txn> {
    /// Open (creating if missing) the five device tables.
    pub(crate) fn open(txn: &'txn WriteTransaction) -> Result<DeviceTables<'txn>, BoxError> {
        Ok(DeviceTables {
            heads: txn.open_table(DEVICE_AUTH)?,
            records: txn.open_table(DEVICE_RECORDS)?,
            by_mac: txn.open_table(BY_MAC)?,
            by_imei: txn.open_table(BY_IMEI)?,
            legacy_refresh: txn.open_table(LEGACY_REFRESH)?,
        })
    }

    /// Drop the index entries of the stored profile of `id` that still point at it.
    fn unindex(&mut self, id: &str) -> Result<(), BoxError> {
        let (mac, imei, refresh_hash) = {
            let Some(value) = self.records.get(id)? else {
                return Ok(());
            };
            let old = record::view(value.value())
                .map_err(|e| format!("corrupt record {id:?} in table device_records: {e}"))?;
            (
                old.mac.map(str::to_owned),
                old.imei.map(str::to_owned),
                old.refresh_hash(),
            )
        };
        for (table, key) in [(&mut self.by_mac, mac), (&mut self.by_imei, imei)] {
            if let Some(key) = key.as_deref() {
                let owned = table.get(key)?.is_some_and(|owner| owner.value() == id);
                if owned {
                    table.remove(key)?;
                }
            }
        }
        if let Some(hash) = &refresh_hash {
            let owned = self
                .legacy_refresh
                .get(hash.as_slice())?
                .is_some_and(|owner| owner.value() == id);
            if owned {
                self.legacy_refresh.remove(hash.as_slice())?;
            }
        }
        Ok(())
    }

    /// Insert or replace a device (head and profile) and its index entries.
    pub(crate) fn put(&mut self, record: &DeviceRecord) -> Result<(), BoxError> {
        let id = record.device.id.as_str();
        self.unindex(id)?;
        let profile = record::encode_profile(record)
            .map_err(|e| format!("device {id:?} cannot be stored: {e}"))?;
        self.records.insert(id, profile.as_slice())?;
        self.heads
            .insert(id, record::encode_head(&Head::of(record)).as_slice())?;
        if let Some(mac) = &record.device.mac {
            self.by_mac.insert(mac.as_str(), id)?;
        }
        if let Some(imei) = &record.device.imei {
            self.by_imei.insert(imei.as_str(), id)?;
        }
        Ok(())
    }

    /// Index a migrated device's refresh token, which does not name its device.
    pub(crate) fn put_legacy_refresh(&mut self, record: &DeviceRecord) -> Result<(), BoxError> {
        if let Some(hash) = &record.refresh_hash {
            self.legacy_refresh
                .insert(hash.as_slice(), record.device.id.as_str())?;
        }
        Ok(())
    }

    fn delete(&mut self, id: &str) -> Result<(), BoxError> {
        self.unindex(id)?;
        self.records.remove(id)?;
        self.heads.remove(id)?;
        Ok(())
    }

    fn put_head(&mut self, id: &str, head: &Head) -> Result<(), BoxError> {
        if self.heads.get(id)?.is_some() {
            self.heads
                .insert(id, record::encode_head(head).as_slice())?;
        }
        Ok(())
    }
}

/// Creates `dir` (and its parents) owner-only (0700 on Unix); an existing one is left as is
/// (the daemon tightens the data dir, with a log line, before it opens the registry).
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Creates the registry file 0600 if it does not exist, and tightens an existing one to 0600:
/// it holds the JWT signing key and the credential hashes.
fn create_private_file(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let permissions = file.metadata()?.permissions();
        if permissions.mode() & 0o077 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
    }
    drop(file);
    Ok(())
}

/// `Option<[u8; 32]>` as base64 text in JSON.
mod hash_b64 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    use crate::crypto::Hash;

    pub(crate) fn serialize<S: Serializer>(
        value: &Option<Hash>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(hash) => serializer.serialize_some(&crate::crypto::b64url(hash)),
            None => serializer.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Hash>, D::Error> {
        let Some(text) = Option::<String>::deserialize(deserializer)? else {
            return Ok(None);
        };
        let bytes = crate::crypto::decode_b64url_strict(&text)
            .ok_or_else(|| D::Error::custom("bad base64 hash"))?;
        let hash: Hash = bytes
            .as_slice()
            .try_into()
            .map_err(|_| D::Error::custom("hash is not 32 bytes"))?;
        Ok(Some(hash))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file written before the version counter existed: the counter starts above every
    /// version the old `u32` counter could have issued, so no pre-upgrade JWT of a deleted
    /// device can match a version issued after the upgrade.
    #[test]
    fn a_file_without_the_counter_starts_it_at_2_pow_32() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("registry.redb");
        {
            let db = Database::create(&path)?;
            let txn = db.begin_write()?;
            {
                let mut meta = txn.open_table(META)?;
                meta.insert("schema", LEGACY_SCHEMA_VERSION)?;
                meta.insert("jwt_key", [7u8; 32].as_slice())?;
            }
            txn.commit()?;
        }
        let (store, loaded) = Store::open(&path)?;
        assert_eq!(loaded.next_version, 1 << 32);
        assert_eq!(loaded.jwt_key, [7u8; 32]);
        assert_eq!(loaded.previous_jwt_key, None);
        drop(store);

        let fresh = dir.path().join("fresh.redb");
        let (_, loaded) = Store::open(&fresh)?;
        assert_eq!(loaded.next_version, 1);
        Ok(())
    }
}
