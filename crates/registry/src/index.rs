//! The in-memory device index: per device id, only what authentication and live status need
//! ([`Hot`]: secret hash, credential version, status, open connections, counters). Names,
//! labels, identifiers and refresh tokens stay in the redb file and are read on demand.

use std::collections::HashMap;

use crate::crypto::Hash;
use crate::record::{Head, Live};
use crate::store::DeviceRecord;
use crate::types::{Device, DeviceStatus};

/// Device id → its hot fields.
pub(crate) type DeviceIndex = HashMap<Box<str>, Hot>;

/// What the hot paths read and write for one device, without touching the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hot {
    /// SHA-256 of the secret; `None` for key-based and revoked devices.
    pub(crate) secret_hash: Option<Hash>,
    /// The credential version JWTs must carry.
    pub(crate) credential_version: u64,
    /// Online, offline or revoked.
    pub(crate) status: DeviceStatus,
    /// Open connections (never stored).
    pub(crate) connections: u32,
    /// Last seen and counters, newer than the file until the next flush.
    pub(crate) live: Live,
}

impl Hot {
    /// A device as stored, at open: nobody is connected to a gateway that just started.
    pub(crate) fn at_open(head: &Head) -> Hot {
        Hot {
            secret_hash: head.secret_hash,
            credential_version: head.credential_version,
            status: if head.revoked {
                DeviceStatus::Revoked
            } else {
                DeviceStatus::Offline
            },
            connections: 0,
            live: head.live,
        }
    }

    /// The hot fields of a record about to replace `old` (if any). A replacement keeps the
    /// live status and counters in memory (they may be newer than the snapshot the change was
    /// computed from), except that a revocation always wins.
    pub(crate) fn replacing(record: &DeviceRecord, old: Option<&Hot>) -> Hot {
        let device = &record.device;
        let mut hot = Hot {
            secret_hash: record.secret_hash,
            credential_version: record.credential_version,
            status: device.status,
            connections: 0,
            live: Live::of(device),
        };
        if let Some(old) = old {
            hot.live = Live {
                last_seen_ms: old.live.last_seen_ms.max(hot.live.last_seen_ms),
                messages: old.live.messages.max(hot.live.messages),
                bytes: old.live.bytes.max(hot.live.bytes),
                errors: old.live.errors.max(hot.live.errors),
            };
            hot.connections = old.connections;
            if hot.status != DeviceStatus::Revoked {
                hot.status = old.status;
            }
        }
        hot
    }

    /// Copy the live status and counters into a device read from the file.
    pub(crate) fn overlay(&self, device: &mut Device) {
        device.status = self.status;
        self.live.apply_to(device);
    }

    /// The stored form: what a status flush writes.
    pub(crate) fn head(&self) -> Head {
        Head {
            revoked: self.revoked(),
            secret_hash: self.secret_hash,
            credential_version: self.credential_version,
            live: self.live,
        }
    }

    /// Revoked by an admin.
    pub(crate) fn revoked(&self) -> bool {
        self.status == DeviceStatus::Revoked
    }
}
