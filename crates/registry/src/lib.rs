//! fieldgate's device registry: who may connect, with which credentials, what state each
//! device is in, and which commands wait for it. Synchronous and thread-safe; no HTTP.
//! The contract is `notes/REGISTRY.md`; see [`Registry`].
//!
//! # Choices
//! - **Storage: redb**, one file at `<data_dir>/registry.redb`: pure Rust (no C toolchain to
//!   cross-compile for ARM), ACID with copy-on-write pages (a power cut leaves the last commit),
//!   one writer and lock-free readers. Device records are binary, in two parts
//!   (`record.rs`): a fixed-size head (secret hash, credential version, status, counters) that
//!   [`Registry::open`] loads into a compact in-memory index, so authentication and status
//!   updates never read the disk, and a profile (name, model, labels, identifiers, refresh
//!   token) read from the file on demand. Tokens and commands are JSON. A file with JSON
//!   device records (schema 1) is migrated at open.
//! - **Secrets: 32 random bytes (base64url), stored as SHA-256, compared in constant time.**
//!   They are machine-generated and high-entropy, so a slow password hash (argon2) would add
//!   no security and cost milliseconds of CPU per connect: at 1,000 connects/s on a Pi that
//!   is the whole CPU. Refresh tokens and provisioning-token secrets are handled the same way;
//!   a refresh token is `<device id>.<secret>`, so its record is found by key.
//! - **Proof of possession: Ed25519** (`ed25519-dalek`, `verify_strict`) over a single-use
//!   32-byte nonce from [`Registry::challenge`]; key-based devices get no shared secret.
//! - **JWT: HS256 only**, in a small module (`hmac` + `sha2`), because `jsonwebtoken`'s crypto
//!   backends pull RSA/ECDSA or a C library. Fixed header, any other `alg` rejected, MAC
//!   checked in constant time before the claims are read, then `iss`, `typ`, `exp`, `iat`.
//!   The signing key is 32 random bytes generated at first open and kept in the redb file,
//!   so tokens survive restarts. Claims carry `ver`, the device's credential version: add,
//!   rotation, refresh, re-registration and revocation each take a fresh one from a store-wide
//!   counter kept in the file, which kills every older JWT at once, and a version never repeats
//!   for an id, even after delete and re-add. A JWT whose lifetime `exp - iat` exceeds
//!   `jwt_ttl` is refused. [`Registry::rotate_jwt_key`] replaces the key; the previous one
//!   keeps verifying for `jwt_ttl` (both are in the file).
//! - **Randomness: `getrandom`** (already in the tree through `ring`).
//! - **Time** comes from a [`Clock`] ([`SystemClock`], or [`ManualClock`] in tests); calls that
//!   the daemon drives take `now_ms` explicitly.
//!
//! # Rules
//! - Self-registered ids derive from the identifier: `mac-001122334455`, `imei-<15 digits>`
//!   (the MAC wins when both are given). A provisioning token must exist, not be revoked or
//!   expired, and have uses left; each successful registration uses one.
//! - Registering an identifier that is already registered is a Conflict, unless the device has
//!   an Ed25519 key and the request signs a fresh nonce with that same key (proof of
//!   possession): then it gets new credentials (the old ones stop working and its sessions
//!   close). A keyless device is re-provisioned only by an admin ([`Registry::rotate_secret`]).
//!   A revoked device cannot re-register.
//! - The registry file is created 0600 (its directory 0700) and an existing file is tightened.
//! - With a public key, `nonce` and `signature` are required; the signature is over the 32
//!   decoded nonce bytes; a nonce works once, before its expiry (replay: Forbidden).
//! - Revoked devices fail every authentication; [`Registry::revocations`] carries the ids of
//!   devices revoked, deleted, rotated or re-registered so their sessions can be closed.
//! - Live status and counters are memory-first and persisted by [`Registry::flush`].
//! - Commands: queued → sent → delivered → succeeded | failed; queued | sent → expired.
//!
//! [`AuthThrottle`] rate-limits failed authentication for every entry point.

#![forbid(unsafe_code)]

mod clock;
mod crypto;
mod error;
mod index;
mod jwt;
mod migrate;
mod record;
mod registry;
mod store;
mod throttle;
mod types;
mod validate;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{AuthError, RegistryError};
pub use registry::{
    MAX_CHALLENGES, MAX_COMMAND_TTL, MAX_COMMANDS_PER_DEVICE, MAX_TOKEN_TTL, MAX_TOKEN_USES,
    Registry,
};
pub use throttle::{AuthThrottle, ThrottleConfig};
pub use types::{
    Challenge, Command, CommandState, DEFAULT_PAGE_LIMIT, Device, DevicePage, DevicePatch,
    DeviceQuery, DeviceStatus, MAX_PAGE_LIMIT, NewCommand, NewDevice, NewProvisioningToken,
    Provisioned, ProvisioningToken, Registration, RegistryOptions, Tokens,
};
