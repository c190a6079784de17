//! Typed errors: [`RegistryError`] for admin and registration calls, [`AuthError`] for the
//! authentication hot path. Every variant names its subject; none carries a secret.

use std::path::PathBuf;

/// Why a registry call failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The device, token or command does not exist.
    #[error("{what} {id:?} not found")]
    NotFound {
        /// `"device"`, `"provisioning token"` or `"command"`.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// The request clashes with what is stored (existing id, identifier bound to another key,
    /// same command id with another body, illegal state change).
    #[error("{what} {id:?}: {reason}")]
    Conflict {
        /// `"device"`, `"mac"`, `"imei"` or `"command"`.
        what: &'static str,
        /// Its id.
        id: String,
        /// What clashes.
        reason: String,
    },
    /// A field is malformed or out of range.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field name as in JSON.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Refused: bad, exhausted, expired or revoked provisioning token; unknown, expired or
    /// replayed nonce; bad signature; revoked device.
    #[error("forbidden: {reason}")]
    Forbidden {
        /// Why (safe to show to the caller).
        reason: String,
    },
    /// The redb file could not be read or written.
    #[error("registry storage {path}: {source}")]
    Storage {
        /// The redb file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl RegistryError {
    /// A stable machine-readable code for API errors.
    pub fn code(&self) -> &'static str {
        match self {
            RegistryError::NotFound { .. } => "not_found",
            RegistryError::Conflict { .. } => "conflict",
            RegistryError::Invalid { .. } => "invalid",
            RegistryError::Forbidden { .. } => "forbidden",
            RegistryError::Storage { .. } => "storage",
        }
    }

    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> RegistryError {
        RegistryError::Invalid {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn forbidden(reason: impl Into<String>) -> RegistryError {
        RegistryError::Forbidden {
            reason: reason.into(),
        }
    }

    pub(crate) fn device_not_found(id: &str) -> RegistryError {
        RegistryError::NotFound {
            what: "device",
            id: truncate_for_display(id),
        }
    }
}

/// Why an authentication failed. Deliberately coarse: callers reply "unauthorized" and count
/// the failure; the variant is for metrics labels and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum AuthError {
    /// No such device.
    #[error("unknown device")]
    UnknownDevice,
    /// Wrong secret, bad JWT signature, unknown refresh token, or a credential replaced by rotation.
    #[error("bad credentials")]
    BadCredentials,
    /// The device is revoked.
    #[error("device revoked")]
    Revoked,
    /// The JWT or refresh token has expired.
    #[error("credentials expired")]
    Expired,
    /// Not a well-formed credential (wrong shape, encoding, size, algorithm, issuer or type).
    #[error("malformed credentials")]
    Malformed,
}

impl AuthError {
    /// The snake_case name, for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthError::UnknownDevice => "unknown_device",
            AuthError::BadCredentials => "bad_credentials",
            AuthError::Revoked => "revoked",
            AuthError::Expired => "expired",
            AuthError::Malformed => "malformed",
        }
    }
}

/// Ids from hostile input are echoed back in errors; keep them short.
pub(crate) fn truncate_for_display(id: &str) -> String {
    const MAX: usize = 160;
    if id.len() <= MAX {
        return id.to_owned();
    }
    let mut end = MAX;
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &id[..end])
}
