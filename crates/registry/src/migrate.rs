//! Upgrades a schema-1 registry file, whose `devices` table holds JSON records, to schema 2
//! (binary records plus identifier and refresh-token tables), inside the caller's write
//! transaction: a crash or an error leaves the old file as it was.

use redb::{ReadableTable, WriteTransaction};

use crate::store::{BoxError, DeviceRecord, DeviceTables, LEGACY_DEVICES};

/// Rewrite every JSON device record in the binary format, then drop the JSON table.
pub(crate) fn devices_to_binary(txn: &WriteTransaction) -> Result<(), BoxError> {
    {
        let mut tables = DeviceTables::open(txn)?;
        let legacy = txn.open_table(LEGACY_DEVICES)?;
        for item in legacy.iter()? {
            let (key, value) = item?;
            let id = key.value();
            let mut record: DeviceRecord = serde_json::from_slice(value.value())
                .map_err(|e| format!("corrupt record {id:?} in table devices: {e}"))?;
            record.device.id = id.to_owned();
            tables.put(&record)?;
            tables.put_legacy_refresh(&record)?;
        }
    }
    txn.delete_table(LEGACY_DEVICES)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use redb::{Database, ReadableTableMetadata, TableDefinition};

    use crate::crypto;
    use crate::store::{DeviceRecord, LEGACY_DEVICES, LEGACY_SCHEMA_VERSION};
    use crate::{
        AuthError, DeviceQuery, DeviceStatus, ManualClock, Registration, Registry, RegistryError,
        RegistryOptions,
    };

    const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

    fn legacy_device(id: &str, mac: &str, secret: &str) -> DeviceRecord {
        let mut record = DeviceRecord::new(crate::Device {
            id: id.into(),
            name: Some(format!("Name of {id}")),
            model: Some("meter".into()),
            labels: BTreeMap::from([("site".to_owned(), "north".to_owned())]),
            mac: Some(mac.into()),
            imei: None,
            public_key: None,
            created_at_ms: 1_000,
            last_seen_ms: Some(2_000),
            status: DeviceStatus::Online,
            messages: 5,
            bytes: 500,
            errors: 1,
        });
        record.secret_hash = Some(crypto::sha256(secret.as_bytes()));
        record.credential_version = 7;
        record.refresh_hash = Some(crypto::sha256(format!("refresh-of-{id}").as_bytes()));
        record.refresh_expires_at_ms = 1_000_000;
        record
    }

    /// A file as the JSON-record code wrote it (schema 1, counter at 9) opens, is migrated,
    /// and behaves as before: secrets check, fields and counters survive, the MAC still
    /// belongs to its device, a refresh token issued then still works once, and versions
    /// keep counting from the stored counter.
    #[test]
    fn a_schema_1_file_is_migrated_at_open() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("registry.redb");
        {
            let db = Database::create(&path)?;
            let txn = db.begin_write()?;
            {
                let mut meta = txn.open_table(META)?;
                meta.insert("schema", LEGACY_SCHEMA_VERSION)?;
                meta.insert("jwt_key", [7u8; 32].as_slice())?;
                meta.insert("next_credential_version", 9u64.to_be_bytes().as_slice())?;
                let mut devices = txn.open_table(LEGACY_DEVICES)?;
                for (id, mac, secret) in [
                    ("dev-a", "02:00:00:00:00:01", "secret-a"),
                    ("dev-b", "02:00:00:00:00:02", "secret-b"),
                ] {
                    let json = serde_json::to_vec(&legacy_device(id, mac, secret))?;
                    devices.insert(id, json.as_slice())?;
                }
            }
            txn.commit()?;
        }

        let clock = Arc::new(ManualClock::new(10_000));
        let options = RegistryOptions::new(&path, "gw-test");
        let registry = Registry::open_with_clock(options.clone(), clock.clone())?;
        assert_eq!(registry.len(), 2);
        registry.authenticate_secret("dev-a", "secret-a")?;
        assert!(matches!(
            registry.authenticate_secret("dev-b", "secret-a"),
            Err(AuthError::BadCredentials)
        ));
        let device = registry.get_device("dev-a").ok_or("dev-a missing")?;
        let mut expected = legacy_device("dev-a", "02:00:00:00:00:01", "secret-a").device;
        expected.status = DeviceStatus::Offline;
        assert_eq!(device, expected);
        let page = registry.list_devices(&DeviceQuery {
            label: Some(("site".into(), "north".into())),
            ..DeviceQuery::default()
        });
        assert_eq!(page.total, 2);

        let (_, token) = registry.create_provisioning_token(crate::NewProvisioningToken {
            label: None,
            max_uses: 1,
            ttl: std::time::Duration::from_secs(60),
        })?;
        let taken = registry.register(Registration {
            provisioning_token: token,
            mac: Some("02:00:00:00:00:02".into()),
            ..Registration::default()
        });
        assert!(
            matches!(taken, Err(RegistryError::Conflict { .. })),
            "{taken:?}"
        );

        let refreshed = registry.refresh("refresh-of-dev-a")?;
        assert!(matches!(
            registry.refresh("refresh-of-dev-a"),
            Err(AuthError::BadCredentials)
        ));
        assert_eq!(registry.authenticate_jwt(&refreshed.access_token)?, "dev-a");
        registry.refresh(&refreshed.refresh_token)?;

        let rotated = registry.rotate_secret("dev-b")?;
        let sub = registry.authenticate_jwt(&rotated.tokens.access_token)?;
        assert_eq!(sub, "dev-b");
        drop(registry);

        // Reopened: schema 2 now, no JSON table left, the rotation kept.
        let registry = Registry::open_with_clock(options, clock)?;
        let secret = rotated.secret.ok_or("no secret")?;
        registry.authenticate_secret("dev-b", &secret)?;
        assert!(registry.authenticate_secret("dev-b", "secret-b").is_err());
        drop(registry);
        let db = Database::create(&path)?;
        let txn = db.begin_read()?;
        assert!(txn.open_table(LEGACY_DEVICES).is_err());
        let meta = txn.open_table(META)?;
        assert_eq!(meta.get("schema")?.ok_or("no schema")?.value(), b"2");
        Ok(())
    }

    /// A JSON record that does not parse stops the open with its id, and the file keeps
    /// schema 1 (nothing half-migrated).
    #[test]
    fn a_corrupt_json_record_fails_the_open_and_changes_nothing()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("registry.redb");
        {
            let db = Database::create(&path)?;
            let txn = db.begin_write()?;
            {
                let mut meta = txn.open_table(META)?;
                meta.insert("schema", LEGACY_SCHEMA_VERSION)?;
                meta.insert("jwt_key", [7u8; 32].as_slice())?;
                let mut devices = txn.open_table(LEGACY_DEVICES)?;
                let json = serde_json::to_vec(&legacy_device("dev-a", "02:00:00:00:00:01", "s"))?;
                devices.insert("dev-a", json.as_slice())?;
                devices.insert("dev-z", b"{not json".as_slice())?;
            }
            txn.commit()?;
        }
        let error = Registry::open(RegistryOptions::new(&path, "gw-test"))
            .err()
            .ok_or("opened a corrupt file")?;
        assert!(error.to_string().contains("dev-z"), "{error}");
        let db = Database::create(&path)?;
        let txn = db.begin_read()?;
        assert_eq!(txn.open_table(LEGACY_DEVICES)?.len()?, 2);
        let meta = txn.open_table(META)?;
        assert_eq!(
            meta.get("schema")?.ok_or("no schema")?.value(),
            LEGACY_SCHEMA_VERSION
        );
        Ok(())
    }
}
