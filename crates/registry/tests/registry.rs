//! Black-box tests of the registry through its public API, on a real redb file in a temp dir.

// The fixture helpers are test code too; a failed setup should panic right there.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signer, SigningKey};
use fieldgate_registry::*;
use serde_json::json;

const T0: u64 = 1_800_000_000_000;
const MAC: &str = "00:11:22:33:44:55";
const IMEI: &str = "356938035643809";

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    clock: Arc<ManualClock>,
    registry: Registry,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data").join("registry.redb");
        let clock = Arc::new(ManualClock::new(T0));
        let registry =
            Registry::open_with_clock(RegistryOptions::new(&path, "gw-test"), clock.clone())
                .unwrap();
        Fixture {
            _dir: dir,
            path,
            clock,
            registry,
        }
    }

    /// Close and open the file again (same clock).
    fn reopen(self) -> Fixture {
        let Fixture {
            _dir,
            path,
            clock,
            registry,
        } = self;
        drop(registry);
        let registry =
            Registry::open_with_clock(RegistryOptions::new(&path, "gw-test"), clock.clone())
                .unwrap();
        Fixture {
            _dir,
            path,
            clock,
            registry,
        }
    }

    fn token(&self, max_uses: u32) -> (ProvisioningToken, String) {
        self.registry
            .create_provisioning_token(NewProvisioningToken {
                label: Some("batch 1".into()),
                max_uses,
                ttl: Duration::from_secs(3600),
            })
            .unwrap()
    }

    fn register_mac(&self, token: &str, mac: &str) -> Result<Provisioned, RegistryError> {
        self.registry.register(Registration {
            provisioning_token: token.into(),
            mac: Some(mac.into()),
            ..Registration::default()
        })
    }

    fn register_key(&self, token: &str, key: &SigningKey) -> Result<Provisioned, RegistryError> {
        let challenge = self.registry.challenge();
        let nonce = STANDARD.decode(&challenge.nonce).unwrap();
        self.registry.register(Registration {
            provisioning_token: token.into(),
            imei: Some(IMEI.into()),
            public_key: Some(STANDARD.encode(key.verifying_key().as_bytes())),
            nonce: Some(challenge.nonce),
            signature: Some(STANDARD.encode(key.sign(&nonce).to_bytes())),
            ..Registration::default()
        })
    }
}

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn forbidden(result: Result<Provisioned, RegistryError>) -> String {
    match result {
        Err(RegistryError::Forbidden { reason }) => reason,
        other => panic!("expected Forbidden, got {other:?}"),
    }
}

// ---------------------------------------------------------------- registration

#[test]
fn register_without_key_gets_secret_and_tokens() {
    let f = Fixture::new();
    let (_, token) = f.token(5);
    let provisioned = f.register_mac(&token, "00-11-22-33-44-55").unwrap();
    assert_eq!(provisioned.device.id, "mac-001122334455");
    assert_eq!(provisioned.device.mac.as_deref(), Some(MAC));
    assert_eq!(provisioned.device.status, DeviceStatus::Offline);
    let secret = provisioned.secret.expect("keyless devices get a secret");
    assert_eq!(secret.len(), 43, "base64url of 32 bytes");
    assert_eq!(provisioned.tokens.expires_in, 3600);
    f.registry
        .authenticate_secret("mac-001122334455", &secret)
        .unwrap();
    assert_eq!(
        f.registry
            .authenticate_jwt(&provisioned.tokens.access_token)
            .unwrap(),
        "mac-001122334455"
    );
    assert_eq!(f.registry.list_provisioning_tokens()[0].uses, 1);
}

#[test]
fn register_with_key_proves_possession_and_gets_no_secret() {
    let f = Fixture::new();
    let (_, token) = f.token(5);
    let provisioned = f.register_key(&token, &key(1)).unwrap();
    assert_eq!(provisioned.device.id, format!("imei-{IMEI}"));
    assert_eq!(provisioned.secret, None);
    assert_eq!(
        provisioned.device.public_key.as_deref(),
        Some(STANDARD.encode(key(1).verifying_key().as_bytes()).as_str())
    );
    assert_eq!(
        f.registry.authenticate_secret(&provisioned.device.id, ""),
        Err(AuthError::BadCredentials)
    );
    assert_eq!(
        f.registry
            .authenticate_jwt(&provisioned.tokens.access_token)
            .unwrap(),
        provisioned.device.id
    );
}

#[test]
fn key_registration_requires_nonce_and_signature() {
    let f = Fixture::new();
    let (_, token) = f.token(5);
    let result = f.registry.register(Registration {
        provisioning_token: token,
        imei: Some(IMEI.into()),
        public_key: Some(STANDARD.encode(key(1).verifying_key().as_bytes())),
        ..Registration::default()
    });
    assert!(
        matches!(result, Err(RegistryError::Invalid { field: "nonce", .. })),
        "{result:?}"
    );
}

#[test]
fn wrong_provisioning_token_is_forbidden() {
    let f = Fixture::new();
    f.token(5);
    let reason = forbidden(f.register_mac("not-a-token", MAC));
    assert!(reason.contains("unknown"), "{reason}");
    forbidden(f.register_mac("", MAC));
    forbidden(f.register_mac(&"x".repeat(1_000_000), MAC));
    assert_eq!(f.registry.len(), 0);
}

#[test]
fn exhausted_provisioning_token_is_forbidden() {
    let f = Fixture::new();
    let (_, token) = f.token(2);
    f.register_mac(&token, "00:00:00:00:00:01").unwrap();
    f.register_mac(&token, "00:00:00:00:00:02").unwrap();
    let reason = forbidden(f.register_mac(&token, "00:00:00:00:00:03"));
    assert!(reason.contains("used up"), "{reason}");
    assert_eq!(f.registry.len(), 2);
    assert_eq!(f.registry.list_provisioning_tokens()[0].uses, 2);
}

#[test]
fn expired_provisioning_token_is_forbidden() {
    let f = Fixture::new();
    let (_, token) = f.token(5);
    f.clock.advance(Duration::from_secs(3599));
    f.register_mac(&token, "00:00:00:00:00:01").unwrap();
    f.clock.advance(Duration::from_secs(1));
    let reason = forbidden(f.register_mac(&token, "00:00:00:00:00:02"));
    assert!(reason.contains("expired"), "{reason}");
}

#[test]
fn revoked_provisioning_token_is_forbidden() {
    let f = Fixture::new();
    let (info, token) = f.token(5);
    f.registry.revoke_provisioning_token(&info.id).unwrap();
    f.registry.revoke_provisioning_token(&info.id).unwrap();
    let reason = forbidden(f.register_mac(&token, MAC));
    assert!(reason.contains("revoked"), "{reason}");
    assert!(f.registry.list_provisioning_tokens()[0].revoked);
    assert!(matches!(
        f.registry.revoke_provisioning_token("pt-nope"),
        Err(RegistryError::NotFound { .. })
    ));
}

#[test]
fn provisioning_token_limits_are_validated() {
    let f = Fixture::new();
    for (max_uses, ttl) in [
        (0, Duration::from_secs(60)),
        (1, Duration::ZERO),
        (1, Duration::from_secs(400 * 24 * 3600)),
    ] {
        let result = f.registry.create_provisioning_token(NewProvisioningToken {
            label: None,
            max_uses,
            ttl,
        });
        assert!(
            matches!(result, Err(RegistryError::Invalid { .. })),
            "{max_uses} {ttl:?}"
        );
    }
}

#[test]
fn replayed_challenge_is_forbidden() {
    let f = Fixture::new();
    let (_, token) = f.token(5);
    let signing = key(1);
    let challenge = f.registry.challenge();
    let nonce = STANDARD.decode(&challenge.nonce).unwrap();
    let request = Registration {
        provisioning_token: token,
        imei: Some(IMEI.into()),
        public_key: Some(STANDARD.encode(signing.verifying_key().as_bytes())),
        nonce: Some(challenge.nonce.clone()),
        signature: Some(STANDARD.encode(signing.sign(&nonce).to_bytes())),
        ..Registration::default()
    };
    f.registry.register(request.clone()).unwrap();
    let reason = forbidden(f.registry.register(request));
    assert!(reason.contains("nonce"), "{reason}");
    assert_eq!(
        f.registry.list_provisioning_tokens()[0].uses,
        1,
        "replay used no token"
    );
}

#[test]
fn expired_or_unknown_challenge_is_forbidden() {
    let f = Fixture::new();
    let (_, token) = f.token(5);
    let signing = key(1);
    let challenge = f.registry.challenge();
    let nonce = STANDARD.decode(&challenge.nonce).unwrap();
    f.clock.advance(Duration::from_secs(300));
    let request = Registration {
        provisioning_token: token.clone(),
        imei: Some(IMEI.into()),
        public_key: Some(STANDARD.encode(signing.verifying_key().as_bytes())),
        nonce: Some(challenge.nonce),
        signature: Some(STANDARD.encode(signing.sign(&nonce).to_bytes())),
        ..Registration::default()
    };
    forbidden(f.registry.register(request.clone()));
    // A nonce the gateway never issued, correctly signed.
    let made_up = [42u8; 32];
    let request = Registration {
        nonce: Some(STANDARD.encode(made_up)),
        signature: Some(STANDARD.encode(signing.sign(&made_up).to_bytes())),
        ..request
    };
    forbidden(f.registry.register(request));
}

#[test]
fn bad_signature_is_forbidden_and_burns_the_nonce() {
    let f = Fixture::new();
    let (_, token) = f.token(5);
    let challenge = f.registry.challenge();
    let nonce = STANDARD.decode(&challenge.nonce).unwrap();
    let request = Registration {
        provisioning_token: token,
        imei: Some(IMEI.into()),
        public_key: Some(STANDARD.encode(key(1).verifying_key().as_bytes())),
        nonce: Some(challenge.nonce),
        // Signed by another key.
        signature: Some(STANDARD.encode(key(2).sign(&nonce).to_bytes())),
        ..Registration::default()
    };
    let reason = forbidden(f.registry.register(request.clone()));
    assert!(reason.contains("signature"), "{reason}");
    // The right signature on the burnt nonce no longer works.
    let request = Registration {
        signature: Some(STANDARD.encode(key(1).sign(&nonce).to_bytes())),
        ..request
    };
    forbidden(f.registry.register(request));
    assert_eq!(f.registry.len(), 0);
}

#[test]
fn re_registration_with_same_key_is_idempotent_different_key_conflicts() {
    let f = Fixture::new();
    let (_, token) = f.token(10);
    let first = f.register_key(&token, &key(1)).unwrap();
    let mut revocations = f.registry.revocations();
    let second = f.register_key(&token, &key(1)).unwrap();
    assert_eq!(first.device.id, second.device.id);
    assert_eq!(first.device.created_at_ms, second.device.created_at_ms);
    assert_eq!(f.registry.len(), 1);
    // Old tokens are replaced and old sessions closed.
    assert_eq!(revocations.try_recv().unwrap(), first.device.id);
    assert_eq!(
        f.registry.authenticate_jwt(&first.tokens.access_token),
        Err(AuthError::BadCredentials)
    );
    f.registry
        .authenticate_jwt(&second.tokens.access_token)
        .unwrap();

    let conflict = f.register_key(&token, &key(2));
    assert!(
        matches!(conflict, Err(RegistryError::Conflict { .. })),
        "{conflict:?}"
    );
    // A keyless registration of a key-based device is a different key too.
    let keyless = f.registry.register(Registration {
        provisioning_token: token.clone(),
        imei: Some(IMEI.into()),
        ..Registration::default()
    });
    assert!(
        matches!(keyless, Err(RegistryError::Conflict { .. })),
        "{keyless:?}"
    );
    f.registry
        .authenticate_jwt(&second.tokens.access_token)
        .unwrap();
}

/// Finding 3: a provisioning token and a known MAC do not take over a keyless device.
#[test]
fn finding_3_keyless_re_registration_conflicts_and_keeps_the_device() {
    let f = Fixture::new();
    let (_, token) = f.token(10);
    let first = f.register_mac(&token, MAC).unwrap();
    let mut revocations = f.registry.revocations();
    let takeover = f.register_mac(&token, "00-11-22-33-44-55");
    match &takeover {
        Err(RegistryError::Conflict { id, reason, .. }) => {
            assert_eq!(id, &first.device.id);
            assert!(reason.contains("rotate"), "{reason}");
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    // The real device keeps its credentials, and no session was closed.
    f.registry
        .authenticate_secret(&first.device.id, first.secret.as_deref().unwrap())
        .unwrap();
    f.registry
        .authenticate_jwt(&first.tokens.access_token)
        .unwrap();
    assert!(revocations.try_recv().is_err());
    assert_eq!(f.registry.list_provisioning_tokens()[0].uses, 1);
    // The admin re-provision is a rotation.
    let rotated = f.registry.rotate_secret(&first.device.id).unwrap();
    f.registry
        .authenticate_secret(&first.device.id, rotated.secret.as_deref().unwrap())
        .unwrap();
}

/// Finding 3: a keyless request for a key-based device, or a request signed by another key,
/// is a Conflict; the registered key's signature re-registers.
#[test]
fn finding_3_only_the_registered_key_re_registers() {
    let f = Fixture::new();
    let (_, token) = f.token(10);
    let first = f.register_key(&token, &key(7)).unwrap();
    for attempt in [
        f.registry.register(Registration {
            provisioning_token: token.clone(),
            imei: Some(IMEI.into()),
            ..Registration::default()
        }),
        f.register_key(&token, &key(8)),
    ] {
        assert!(
            matches!(attempt, Err(RegistryError::Conflict { .. })),
            "{attempt:?}"
        );
    }
    f.registry
        .authenticate_jwt(&first.tokens.access_token)
        .unwrap();
    let again = f.register_key(&token, &key(7)).unwrap();
    assert_eq!(again.device.id, first.device.id);
}

#[test]
fn revoked_device_cannot_re_register() {
    let f = Fixture::new();
    let (_, token) = f.token(10);
    let first = f.register_mac(&token, MAC).unwrap();
    f.registry.revoke_device(&first.device.id).unwrap();
    forbidden(f.register_mac(&token, MAC));
}

#[test]
fn registration_finds_admin_added_device_by_identifier() {
    let f = Fixture::new();
    f.registry
        .add_device(NewDevice {
            id: Some("pump-1".into()),
            mac: Some("AA:BB:CC:DD:EE:FF".into()),
            ..NewDevice::default()
        })
        .unwrap();
    let (_, token) = f.token(1);
    // The identifier finds the device; without its key the registration is refused.
    match f.register_mac(&token, "aabbccddeeff") {
        Err(RegistryError::Conflict { id, .. }) => assert_eq!(id, "pump-1"),
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert_eq!(f.registry.len(), 1);
}

#[test]
fn identifiers_are_validated() {
    let f = Fixture::new();
    let (_, token) = f.token(10);
    for mac in [
        "",
        "00:11:22:33:44",
        "00:11:22:33:44:zz",
        "00:11-22:33:44:55",
        "0011223344556",
    ] {
        let result = f.register_mac(&token, mac);
        assert!(
            matches!(result, Err(RegistryError::Invalid { field: "mac", .. })),
            "{mac:?}: {result:?}"
        );
    }
    for imei in [
        "356938035643808",
        "35693803564380",
        "abcdefghijklmno",
        "3569380356438090",
    ] {
        let result = f.registry.register(Registration {
            provisioning_token: token.clone(),
            imei: Some(imei.into()),
            ..Registration::default()
        });
        assert!(
            matches!(result, Err(RegistryError::Invalid { field: "imei", .. })),
            "{imei:?}: {result:?}"
        );
    }
    let none = f.registry.register(Registration {
        provisioning_token: token.clone(),
        ..Registration::default()
    });
    assert!(matches!(none, Err(RegistryError::Invalid { .. })));
    let ok = f
        .registry
        .register(Registration {
            provisioning_token: token,
            imei: Some("490154203237518".into()),
            ..Registration::default()
        })
        .unwrap();
    assert_eq!(ok.device.id, "imei-490154203237518");
    assert_eq!(
        f.registry.list_provisioning_tokens()[0].uses,
        1,
        "invalid requests use nothing"
    );
}

// ---------------------------------------------------------------- JWT and secrets

#[test]
fn expired_jwt_is_rejected() {
    let f = Fixture::new();
    let device = f.registry.add_device(NewDevice::default()).unwrap();
    let token = &device.tokens.access_token;
    assert!(
        f.registry
            .authenticate_jwt_at(token, T0 + 3_599_000)
            .is_ok()
    );
    assert_eq!(
        f.registry.authenticate_jwt_at(token, T0 + 3_600_000),
        Err(AuthError::Expired)
    );
    f.clock.advance(Duration::from_secs(3600));
    assert_eq!(f.registry.authenticate_jwt(token), Err(AuthError::Expired));
}

#[test]
fn short_ttl_jwt_expires() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let options = RegistryOptions {
        jwt_ttl: Duration::from_secs(2),
        ..RegistryOptions::new(dir.path().join("r.redb"), "gw-test")
    };
    let registry = Registry::open_with_clock(options, clock.clone()).unwrap();
    let device = registry.add_device(NewDevice::default()).unwrap();
    assert_eq!(device.tokens.expires_in, 2);
    registry
        .authenticate_jwt(&device.tokens.access_token)
        .unwrap();
    clock.advance(Duration::from_secs(2));
    assert_eq!(
        registry.authenticate_jwt(&device.tokens.access_token),
        Err(AuthError::Expired)
    );
}

#[test]
fn tampered_jwt_is_rejected() {
    let f = Fixture::new();
    let a = f.registry.add_device(NewDevice::default()).unwrap();
    let b = f.registry.add_device(NewDevice::default()).unwrap();
    let parts: Vec<&str> = a.tokens.access_token.split('.').collect();
    let other: Vec<&str> = b.tokens.access_token.split('.').collect();
    // a's signature on b's claims.
    let swapped = format!("{}.{}.{}", parts[0], other[1], parts[2]);
    assert_eq!(
        f.registry.authenticate_jwt(&swapped),
        Err(AuthError::BadCredentials)
    );
    // alg=none with the signature stripped.
    let none =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    assert_eq!(
        f.registry
            .authenticate_jwt(&format!("{none}.{}.", parts[1])),
        Err(AuthError::Malformed)
    );
    // A token from another gateway (another key) fails.
    let g = Fixture::new();
    let foreign = g.registry.add_device(NewDevice::default()).unwrap();
    assert!(
        f.registry
            .authenticate_jwt(&foreign.tokens.access_token)
            .is_err()
    );
}

#[test]
fn revoked_device_fails_every_auth_and_is_announced() {
    let f = Fixture::new();
    let provisioned = f.registry.add_device(NewDevice::default()).unwrap();
    let id = provisioned.device.id.clone();
    let secret = provisioned.secret.clone().unwrap();
    let mut revocations = f.registry.revocations();
    f.registry.record_connected(&id, T0);
    let device = f.registry.revoke_device(&id).unwrap();
    assert_eq!(device.status, DeviceStatus::Revoked);
    assert_eq!(revocations.try_recv().unwrap(), id);
    assert_eq!(
        f.registry.authenticate_secret(&id, &secret),
        Err(AuthError::Revoked)
    );
    assert_eq!(
        f.registry
            .authenticate_jwt(&provisioned.tokens.access_token),
        Err(AuthError::Revoked)
    );
    assert_eq!(
        f.registry.authenticate_certificate(&id),
        Err(AuthError::Revoked)
    );
    assert!(
        f.registry
            .refresh(&provisioned.tokens.refresh_token)
            .is_err()
    );
    assert!(!f.registry.session_valid(&id));
    // Status stays revoked whatever the transports report.
    f.registry.record_disconnected(&id, T0);
    f.registry.record_connected(&id, T0);
    assert_eq!(
        f.registry.get_device(&id).unwrap().status,
        DeviceStatus::Revoked
    );
    assert!(matches!(
        f.registry.rotate_secret(&id),
        Err(RegistryError::Forbidden { .. })
    ));
}

#[test]
fn rotation_replaces_secret_and_tokens() {
    let f = Fixture::new();
    let first = f.registry.add_device(NewDevice::default()).unwrap();
    let id = first.device.id.clone();
    let mut revocations = f.registry.revocations();
    let rotated = f.registry.rotate_secret(&id).unwrap();
    assert_eq!(revocations.try_recv().unwrap(), id);
    assert_eq!(
        f.registry
            .authenticate_secret(&id, first.secret.as_deref().unwrap()),
        Err(AuthError::BadCredentials)
    );
    f.registry
        .authenticate_secret(&id, rotated.secret.as_deref().unwrap())
        .unwrap();
    assert_eq!(
        f.registry.authenticate_jwt(&first.tokens.access_token),
        Err(AuthError::BadCredentials)
    );
    f.registry
        .authenticate_jwt(&rotated.tokens.access_token)
        .unwrap();
    assert_eq!(
        f.registry.refresh(&first.tokens.refresh_token),
        Err(AuthError::BadCredentials)
    );
    assert!(matches!(
        f.registry.rotate_secret("nope"),
        Err(RegistryError::NotFound { .. })
    ));
}

#[test]
fn refresh_is_single_use_and_expires() {
    let f = Fixture::new();
    let provisioned = f.registry.add_device(NewDevice::default()).unwrap();
    let id = provisioned.device.id;
    f.clock.advance(Duration::from_secs(10));
    let renewed = f
        .registry
        .refresh(&provisioned.tokens.refresh_token)
        .unwrap();
    assert_eq!(
        f.registry.authenticate_jwt(&renewed.access_token).unwrap(),
        id
    );
    // Finding 12: the access token it replaced stops working.
    assert_eq!(
        f.registry
            .authenticate_jwt(&provisioned.tokens.access_token),
        Err(AuthError::BadCredentials)
    );
    assert_eq!(
        f.registry.refresh(&provisioned.tokens.refresh_token),
        Err(AuthError::BadCredentials),
        "single use"
    );
    f.clock.advance(Duration::from_secs(30 * 24 * 3600));
    assert_eq!(
        f.registry.refresh(&renewed.refresh_token),
        Err(AuthError::Expired)
    );
    assert_eq!(f.registry.refresh(""), Err(AuthError::Malformed));
    assert_eq!(
        f.registry.refresh(&"r".repeat(100_000)),
        Err(AuthError::Malformed)
    );
}

#[test]
fn certificates_name_existing_devices() {
    let f = Fixture::new();
    f.registry
        .add_device(NewDevice {
            id: Some("dev-1".into()),
            ..NewDevice::default()
        })
        .unwrap();
    f.registry.authenticate_certificate("dev-1").unwrap();
    assert_eq!(
        f.registry.authenticate_certificate("dev-2"),
        Err(AuthError::UnknownDevice)
    );
}

#[test]
fn secrets_are_never_serialised_in_devices() {
    let f = Fixture::new();
    let provisioned = f.registry.add_device(NewDevice::default()).unwrap();
    let secret = provisioned.secret.unwrap();
    let json =
        serde_json::to_string(&f.registry.get_device(&provisioned.device.id).unwrap()).unwrap();
    assert!(!json.contains(&secret));
    assert!(!json.contains("secret"), "{json}");
    let file = std::fs::read(&f.path).unwrap();
    assert!(
        !file
            .windows(secret.len())
            .any(|window| window == secret.as_bytes()),
        "plaintext secret on disk"
    );
}

// ---------------------------------------------------------------- admin

#[test]
fn add_device_conflicts_on_id_and_identifiers() {
    let f = Fixture::new();
    let new = NewDevice {
        id: Some("dev-1".into()),
        mac: Some(MAC.into()),
        imei: Some(IMEI.into()),
        ..NewDevice::default()
    };
    f.registry.add_device(new.clone()).unwrap();
    assert!(matches!(
        f.registry.add_device(new),
        Err(RegistryError::Conflict { what: "device", .. })
    ));
    let same_mac = f.registry.add_device(NewDevice {
        id: Some("dev-2".into()),
        mac: Some("00-11-22-33-44-55".into()),
        ..NewDevice::default()
    });
    assert!(
        matches!(same_mac, Err(RegistryError::Conflict { what: "mac", .. })),
        "{same_mac:?}"
    );
    let same_imei = f.registry.add_device(NewDevice {
        imei: Some(IMEI.into()),
        ..NewDevice::default()
    });
    assert!(
        matches!(same_imei, Err(RegistryError::Conflict { .. })),
        "{same_imei:?}"
    );
    let derived = f
        .registry
        .add_device(NewDevice {
            mac: Some("00:00:00:00:00:01".into()),
            ..NewDevice::default()
        })
        .unwrap();
    assert_eq!(derived.device.id, "mac-000000000001");
    let random = f.registry.add_device(NewDevice::default()).unwrap();
    assert!(random.device.id.starts_with("dev-"), "{}", random.device.id);
}

#[test]
fn update_and_delete_devices() {
    let f = Fixture::new();
    let id = f
        .registry
        .add_device(NewDevice {
            name: Some("old".into()),
            model: Some("m1".into()),
            ..NewDevice::default()
        })
        .unwrap()
        .device
        .id;
    let device = f
        .registry
        .update_device(
            &id,
            DevicePatch {
                name: Some(Some("new".into())),
                model: Some(None),
                labels: Some(BTreeMap::from([("site".into(), "north".into())])),
            },
        )
        .unwrap();
    assert_eq!(device.name.as_deref(), Some("new"));
    assert_eq!(device.model, None);
    assert_eq!(device.labels["site"], "north");
    let unchanged = f
        .registry
        .update_device(&id, DevicePatch::default())
        .unwrap();
    assert_eq!(unchanged, device);
    let bad = f.registry.update_device(
        &id,
        DevicePatch {
            name: Some(Some("x".repeat(10_000))),
            ..DevicePatch::default()
        },
    );
    assert!(matches!(
        bad,
        Err(RegistryError::Invalid { field: "name", .. })
    ));

    let mut revocations = f.registry.revocations();
    f.registry
        .submit_command(&id, command("c-1", Duration::from_secs(60)), T0)
        .unwrap();
    f.registry.delete_device(&id).unwrap();
    assert_eq!(revocations.try_recv().unwrap(), id);
    assert_eq!(f.registry.get_device(&id), None);
    assert!(f.registry.list_commands(&id).is_empty());
    assert!(matches!(
        f.registry.delete_device(&id),
        Err(RegistryError::NotFound { .. })
    ));
    assert!(matches!(
        f.registry.update_device(&id, DevicePatch::default()),
        Err(RegistryError::NotFound { .. })
    ));
}

#[test]
fn device_patch_json_distinguishes_null_from_absent() {
    let patch: DevicePatch = serde_json::from_str(r#"{"name": null}"#).unwrap();
    assert_eq!(patch.name, Some(None));
    assert_eq!(patch.model, None);
    assert!(serde_json::from_str::<DevicePatch>(r#"{"colour": "red"}"#).is_err());
    let new: NewCommand =
        serde_json::from_str(r#"{"id": "c-1", "name": "reboot", "ttl": "5m"}"#).unwrap();
    assert_eq!(new.ttl, Duration::from_secs(300));
    assert_eq!(new.params, json!({}));
    let new: NewCommand = serde_json::from_str(r#"{"id": "c-1", "name": "reboot"}"#).unwrap();
    assert_eq!(new.ttl, Duration::from_secs(3600));
    let new: NewCommand =
        serde_json::from_str(r#"{"id": "c-1", "name": "reboot", "ttl": 90}"#).unwrap();
    assert_eq!(new.ttl, Duration::from_secs(90));
    assert!(
        serde_json::from_str::<NewCommand>(r#"{"id": "c-1", "name": "x", "ttl": "soon"}"#).is_err()
    );
    let status: DeviceStatus = serde_json::from_str(r#""online""#).unwrap();
    assert_eq!(status, DeviceStatus::Online);
    assert_eq!(
        serde_json::to_string(&CommandState::Succeeded).unwrap(),
        r#""succeeded""#
    );
}

#[test]
fn pagination_and_filters() {
    let f = Fixture::new();
    for i in 0..250 {
        let mut labels = BTreeMap::new();
        labels.insert(
            "site".to_owned(),
            if i % 2 == 0 { "north" } else { "south" }.to_owned(),
        );
        f.registry
            .add_device(NewDevice {
                id: Some(format!("dev-{i:04}")),
                name: Some(format!("Sensor {i}")),
                model: Some(if i % 5 == 0 { "pump" } else { "meter" }.into()),
                labels,
                ..NewDevice::default()
            })
            .unwrap();
    }
    // Walk all pages.
    let mut query = DeviceQuery {
        limit: 100,
        ..DeviceQuery::default()
    };
    let mut seen = Vec::new();
    loop {
        let page = f.registry.list_devices(&query);
        assert_eq!(page.total, 250);
        seen.extend(page.devices.iter().map(|device| device.id.clone()));
        match page.next_cursor {
            Some(cursor) => query.cursor = Some(cursor),
            None => break,
        }
    }
    let expected: Vec<String> = (0..250).map(|i| format!("dev-{i:04}")).collect();
    assert_eq!(seen, expected);

    // A cursor stays valid while devices are added and removed around it.
    let first = f.registry.list_devices(&DeviceQuery {
        limit: 10,
        ..DeviceQuery::default()
    });
    assert_eq!(first.next_cursor.as_deref(), Some("dev-0009"));
    f.registry.delete_device("dev-0005").unwrap();
    f.registry.delete_device("dev-0010").unwrap();
    f.registry
        .add_device(NewDevice {
            id: Some("dev-0000a".into()),
            ..NewDevice::default()
        })
        .unwrap();
    let second = f.registry.list_devices(&DeviceQuery {
        limit: 3,
        cursor: first.next_cursor,
        ..DeviceQuery::default()
    });
    let ids: Vec<&str> = second
        .devices
        .iter()
        .map(|device| device.id.as_str())
        .collect();
    assert_eq!(ids, ["dev-0011", "dev-0012", "dev-0013"]);
    assert_eq!(second.total, 249);

    // Filters, each with the right total.
    let pumps = f.registry.list_devices(&DeviceQuery {
        model: Some("pump".into()),
        limit: 1000,
        ..DeviceQuery::default()
    });
    assert_eq!(pumps.total, 48, "50 pumps minus dev-0005 and dev-0010");
    assert_eq!(pumps.devices.len(), 48);
    assert_eq!(pumps.next_cursor, None);
    let north_pumps = f.registry.list_devices(&DeviceQuery {
        model: Some("pump".into()),
        label: Some(("site".into(), "north".into())),
        limit: 5,
        ..DeviceQuery::default()
    });
    assert_eq!(north_pumps.total, 24);
    assert_eq!(north_pumps.devices.len(), 5);
    assert!(north_pumps.next_cursor.is_some());
    let search = f.registry.list_devices(&DeviceQuery {
        search: Some("SENSOR 12".into()),
        ..DeviceQuery::default()
    });
    let ids: Vec<&str> = search
        .devices
        .iter()
        .map(|device| device.id.as_str())
        .collect();
    assert_eq!(
        ids,
        [
            "dev-0012", "dev-0120", "dev-0121", "dev-0122", "dev-0123", "dev-0124", "dev-0125",
            "dev-0126", "dev-0127", "dev-0128", "dev-0129"
        ]
    );
    f.registry.record_connected("dev-0001", T0);
    let online = f.registry.list_devices(&DeviceQuery {
        status: Some(DeviceStatus::Online),
        ..DeviceQuery::default()
    });
    assert_eq!(online.total, 1);
    // Limits are clamped, cursors past the end give an empty last page.
    assert_eq!(
        f.registry
            .list_devices(&DeviceQuery {
                limit: 0,
                ..DeviceQuery::default()
            })
            .devices
            .len(),
        1
    );
    assert_eq!(
        f.registry
            .list_devices(&DeviceQuery {
                limit: 1_000_000,
                ..DeviceQuery::default()
            })
            .devices
            .len(),
        249
    );
    let past = f.registry.list_devices(&DeviceQuery {
        cursor: Some("zzz".into()),
        ..DeviceQuery::default()
    });
    assert!(past.devices.is_empty());
    assert_eq!(past.next_cursor, None);
    assert_eq!(past.total, 249);
}

// ---------------------------------------------------------------- status

#[test]
fn status_follows_connections_and_counters_accumulate() {
    let f = Fixture::new();
    let id = f
        .registry
        .add_device(NewDevice::default())
        .unwrap()
        .device
        .id;
    f.registry.record_connected(&id, T0 + 1);
    f.registry.record_connected(&id, T0 + 2);
    f.registry.record_message(&id, 100, T0 + 3);
    f.registry.record_message(&id, 50, T0 + 4);
    f.registry.record_error(&id);
    f.registry.record_disconnected(&id, T0 + 5);
    let device = f.registry.get_device(&id).unwrap();
    assert_eq!(device.status, DeviceStatus::Online, "one connection left");
    assert_eq!((device.messages, device.bytes, device.errors), (2, 150, 1));
    assert_eq!(device.last_seen_ms, Some(T0 + 5));
    f.registry.record_disconnected(&id, T0 + 6);
    assert_eq!(
        f.registry.get_device(&id).unwrap().status,
        DeviceStatus::Offline
    );
    // Unknown devices are ignored.
    f.registry.record_connected("ghost", T0);
    f.registry.record_error("ghost");
    assert_eq!(f.registry.get_device("ghost"), None);
}

#[test]
fn admin_changes_do_not_lose_live_counters() {
    let f = Fixture::new();
    let id = f
        .registry
        .add_device(NewDevice::default())
        .unwrap()
        .device
        .id;
    f.registry.record_connected(&id, T0);
    f.registry.record_message(&id, 10, T0);
    f.registry
        .update_device(
            &id,
            DevicePatch {
                name: Some(Some("n".into())),
                ..DevicePatch::default()
            },
        )
        .unwrap();
    f.registry.rotate_secret(&id).unwrap();
    let device = f.registry.get_device(&id).unwrap();
    assert_eq!(device.status, DeviceStatus::Online);
    assert_eq!(device.messages, 1);
}

// ---------------------------------------------------------------- commands

fn command(id: &str, ttl: Duration) -> NewCommand {
    NewCommand {
        id: id.into(),
        name: "reboot".into(),
        params: json!({"delay": 5}),
        ttl,
    }
}

#[test]
fn commands_are_idempotent_by_id() {
    let f = Fixture::new();
    let id = f
        .registry
        .add_device(NewDevice::default())
        .unwrap()
        .device
        .id;
    let first = f
        .registry
        .submit_command(&id, command("c-1", Duration::from_secs(60)), T0)
        .unwrap();
    assert_eq!(first.state, CommandState::Queued);
    assert_eq!(first.expires_at_ms, T0 + 60_000);
    let again = f
        .registry
        .submit_command(&id, command("c-1", Duration::from_secs(60)), T0 + 5_000)
        .unwrap();
    assert_eq!(again, first, "same body, same command");
    assert_eq!(f.registry.list_commands(&id).len(), 1);
    let mut different = command("c-1", Duration::from_secs(60));
    different.params = json!({"delay": 6});
    assert!(matches!(
        f.registry.submit_command(&id, different, T0),
        Err(RegistryError::Conflict {
            what: "command",
            ..
        })
    ));
    assert!(matches!(
        f.registry
            .submit_command("ghost", command("c-1", Duration::from_secs(60)), T0),
        Err(RegistryError::NotFound { .. })
    ));
    for bad in [
        command("", Duration::from_secs(60)),
        command("c 1", Duration::from_secs(60)),
        command("c-2", Duration::ZERO),
        command("c-2", Duration::from_secs(31 * 24 * 3600)),
        NewCommand {
            params: json!("x".repeat(100_000)),
            ..command("c-2", Duration::from_secs(60))
        },
        NewCommand {
            name: String::new(),
            ..command("c-2", Duration::from_secs(60))
        },
    ] {
        assert!(
            matches!(
                f.registry.submit_command(&id, bad.clone(), T0),
                Err(RegistryError::Invalid { .. })
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn command_state_machine() {
    let f = Fixture::new();
    let id = f
        .registry
        .add_device(NewDevice::default())
        .unwrap()
        .device
        .id;
    let ttl = Duration::from_secs(60);
    f.registry
        .submit_command(&id, command("c-1", ttl), T0)
        .unwrap();
    f.registry
        .submit_command(&id, command("c-2", ttl), T0 + 1)
        .unwrap();
    let pending: Vec<String> = f
        .registry
        .pending_commands(&id, T0 + 2)
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(pending, ["c-1", "c-2"], "oldest first");

    let sent = f
        .registry
        .mark_command(&id, "c-1", CommandState::Sent, None, T0 + 10)
        .unwrap();
    assert_eq!(
        (sent.state, sent.updated_at_ms),
        (CommandState::Sent, T0 + 10)
    );
    assert_eq!(f.registry.pending_commands(&id, T0 + 10).len(), 1);
    f.registry
        .mark_command(&id, "c-1", CommandState::Delivered, None, T0 + 11)
        .unwrap();
    let done = f
        .registry
        .mark_command(
            &id,
            "c-1",
            CommandState::Succeeded,
            Some(json!({"uptime": 0})),
            T0 + 12,
        )
        .unwrap();
    assert_eq!(done.result, Some(json!({"uptime": 0})));
    // Terminal: no way back, and no expiry.
    for state in [
        CommandState::Queued,
        CommandState::Sent,
        CommandState::Failed,
        CommandState::Expired,
    ] {
        assert!(
            matches!(
                f.registry.mark_command(&id, "c-1", state, None, T0 + 13),
                Err(RegistryError::Conflict { .. })
            ),
            "{state:?}"
        );
    }
    // Repeating the current state is a no-op.
    assert_eq!(
        f.registry
            .mark_command(&id, "c-1", CommandState::Succeeded, None, T0 + 14)
            .unwrap(),
        done
    );
    f.registry
        .mark_command(&id, "c-2", CommandState::Sent, None, T0 + 20)
        .unwrap();
    f.registry
        .mark_command(
            &id,
            "c-2",
            CommandState::Failed,
            Some(json!({"error": "busy"})),
            T0 + 21,
        )
        .unwrap();
    assert!(matches!(
        f.registry
            .mark_command(&id, "c-9", CommandState::Sent, None, T0),
        Err(RegistryError::NotFound { .. })
    ));
    assert_eq!(
        f.registry.get_command(&id, "c-2").unwrap().state,
        CommandState::Failed
    );
    assert_eq!(f.registry.get_command(&id, "c-9"), None);
}

#[test]
fn commands_expire_only_from_queued_or_sent() {
    let f = Fixture::new();
    let id = f
        .registry
        .add_device(NewDevice::default())
        .unwrap()
        .device
        .id;
    let ttl = Duration::from_secs(60);
    for cid in ["queued", "sent", "delivered", "done"] {
        f.registry
            .submit_command(&id, command(cid, ttl), T0)
            .unwrap();
    }
    f.registry
        .mark_command(&id, "sent", CommandState::Sent, None, T0 + 1)
        .unwrap();
    f.registry
        .mark_command(&id, "delivered", CommandState::Delivered, None, T0 + 1)
        .unwrap();
    f.registry
        .mark_command(&id, "done", CommandState::Succeeded, None, T0 + 1)
        .unwrap();

    assert!(f.registry.expire_commands(T0 + 59_999).is_empty());
    assert_eq!(
        f.registry.pending_commands(&id, T0 + 60_000),
        vec![],
        "past TTL is not pending"
    );
    assert!(matches!(
        f.registry
            .mark_command(&id, "queued", CommandState::Sent, None, T0 + 60_000),
        Err(RegistryError::Conflict { .. })
    ));
    let mut expired: Vec<String> = f
        .registry
        .expire_commands(T0 + 60_000)
        .into_iter()
        .map(|c| c.id)
        .collect();
    expired.sort();
    assert_eq!(expired, ["queued", "sent"]);
    assert!(f.registry.expire_commands(T0 + 120_000).is_empty(), "once");
    assert_eq!(
        f.registry.get_command(&id, "queued").unwrap().state,
        CommandState::Expired
    );
    assert_eq!(
        f.registry.get_command(&id, "queued").unwrap().updated_at_ms,
        T0 + 60_000
    );
    assert_eq!(
        f.registry.get_command(&id, "delivered").unwrap().state,
        CommandState::Delivered
    );
    // A late result for a delivered command is still accepted.
    f.registry
        .mark_command(
            &id,
            "delivered",
            CommandState::Succeeded,
            None,
            T0 + 120_000,
        )
        .unwrap();
}

#[test]
fn commands_per_device_are_bounded() {
    let f = Fixture::new();
    let id = f
        .registry
        .add_device(NewDevice::default())
        .unwrap()
        .device
        .id;
    let ttl = Duration::from_secs(60);
    for i in 0..MAX_COMMANDS_PER_DEVICE {
        f.registry
            .submit_command(&id, command(&format!("c-{i}"), ttl), T0)
            .unwrap();
    }
    assert!(matches!(
        f.registry.submit_command(&id, command("one-more", ttl), T0),
        Err(RegistryError::Conflict { .. })
    ));
    f.registry
        .mark_command(&id, "c-3", CommandState::Failed, None, T0)
        .unwrap();
    f.registry
        .submit_command(&id, command("one-more", ttl), T0)
        .unwrap();
    assert_eq!(
        f.registry.get_command(&id, "c-3"),
        None,
        "oldest finished dropped"
    );
    assert_eq!(f.registry.list_commands(&id).len(), MAX_COMMANDS_PER_DEVICE);
}

// ---------------------------------------------------------------- persistence

#[test]
fn everything_survives_reopen() {
    let f = Fixture::new();
    let (token_info, token) = f.token(3);
    let keyless = f.register_mac(&token, MAC).unwrap();
    let keyed = f.register_key(&token, &key(1)).unwrap();
    let admin = f
        .registry
        .add_device(NewDevice {
            id: Some("dev-admin".into()),
            labels: BTreeMap::from([("site".into(), "north".into())]),
            ..NewDevice::default()
        })
        .unwrap();
    f.registry.revoke_device("dev-admin").unwrap();
    let cid = &keyless.device.id;
    f.registry
        .submit_command(cid, command("c-1", Duration::from_secs(600)), T0)
        .unwrap();
    f.registry
        .submit_command(cid, command("c-2", Duration::from_secs(600)), T0 + 1)
        .unwrap();
    f.registry
        .mark_command(cid, "c-2", CommandState::Sent, None, T0 + 2)
        .unwrap();
    f.registry.record_connected(cid, T0 + 3);
    f.registry.record_message(cid, 42, T0 + 4);
    f.registry.flush().unwrap();
    assert_eq!(f.registry.dirty_count(), 0);
    let refreshed = f.registry.refresh(&keyed.tokens.refresh_token).unwrap();

    let f = f.reopen();
    assert_eq!(f.registry.len(), 3);
    // Devices and live counters (online becomes offline at start-up).
    let device = f.registry.get_device(cid).unwrap();
    assert_eq!(device.status, DeviceStatus::Offline);
    assert_eq!(
        (device.messages, device.bytes, device.last_seen_ms),
        (1, 42, Some(T0 + 4))
    );
    assert_eq!(
        f.registry.get_device("dev-admin").unwrap().status,
        DeviceStatus::Revoked
    );
    assert_eq!(
        f.registry.get_device("dev-admin").unwrap().labels["site"],
        "north"
    );
    // Secrets still authenticate; the revoked one still does not.
    f.registry
        .authenticate_secret(cid, keyless.secret.as_deref().unwrap())
        .unwrap();
    assert_eq!(
        f.registry
            .authenticate_secret("dev-admin", admin.secret.as_deref().unwrap()),
        Err(AuthError::Revoked)
    );
    // The JWT key survived: old JWTs still verify; refresh tokens too, and stay single-use.
    assert_eq!(
        f.registry
            .authenticate_jwt(&keyless.tokens.access_token)
            .unwrap(),
        *cid
    );
    assert_eq!(
        f.registry
            .authenticate_jwt(&refreshed.access_token)
            .unwrap(),
        keyed.device.id
    );
    assert_eq!(
        f.registry.refresh(&keyed.tokens.refresh_token),
        Err(AuthError::BadCredentials)
    );
    f.registry.refresh(&refreshed.refresh_token).unwrap();
    // Token use counts: 2 of 3 used, one more works, then used up.
    let tokens = f.registry.list_provisioning_tokens();
    assert_eq!(tokens.len(), 1);
    assert_eq!(
        (tokens[0].id.as_str(), tokens[0].uses, tokens[0].max_uses),
        (token_info.id.as_str(), 2, 3)
    );
    f.register_mac(&token, "00:00:00:00:00:09").unwrap();
    forbidden(f.register_mac(&token, "00:00:00:00:00:0a"));
    // Commands with their states, oldest first.
    let commands = f.registry.list_commands(cid);
    let states: Vec<(&str, CommandState)> =
        commands.iter().map(|c| (c.id.as_str(), c.state)).collect();
    assert_eq!(
        states,
        [("c-1", CommandState::Queued), ("c-2", CommandState::Sent)]
    );
    // Identifier index rebuilt: a keyless re-registration finds the device (and is refused
    // without proof of possession), a different key conflicts.
    let (_, token2) = f.token(5);
    match f.register_mac(&token2, MAC) {
        Err(RegistryError::Conflict { id, .. }) => assert_eq!(id, *cid),
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert!(matches!(
        f.register_key(&token2, &key(2)),
        Err(RegistryError::Conflict { .. })
    ));

    // Unflushed counters are lost on reopen, but nothing else.
    f.registry.record_message(cid, 1, T0 + 10);
    let f = f.reopen();
    assert_eq!(f.registry.get_device(cid).unwrap().messages, 1);
}

#[test]
fn deletions_survive_reopen() {
    let f = Fixture::new();
    let id = f
        .registry
        .add_device(NewDevice {
            mac: Some(MAC.into()),
            ..NewDevice::default()
        })
        .unwrap()
        .device
        .id;
    f.registry
        .submit_command(&id, command("c-1", Duration::from_secs(60)), T0)
        .unwrap();
    f.registry.delete_device(&id).unwrap();
    let f = f.reopen();
    assert_eq!(f.registry.len(), 0);
    assert!(f.registry.list_commands(&id).is_empty());
    // The MAC is free again.
    f.registry
        .add_device(NewDevice {
            mac: Some(MAC.into()),
            ..NewDevice::default()
        })
        .unwrap();
}

/// Finding 2: a JWT issued before a delete never works for the re-added device, not even
/// after a restart, and credential versions never repeat for an id.
#[test]
fn finding_2_readd_does_not_revive_old_jwts() {
    let f = Fixture::new();
    let new = || NewDevice {
        id: Some("dev-1".into()),
        ..NewDevice::default()
    };
    let first = f.registry.add_device(new()).unwrap();
    f.registry.delete_device("dev-1").unwrap();
    let second = f.registry.add_device(new()).unwrap();
    assert_eq!(
        f.registry.authenticate_jwt(&first.tokens.access_token),
        Err(AuthError::BadCredentials)
    );
    f.registry
        .authenticate_jwt(&second.tokens.access_token)
        .unwrap();
    // Rotate, revoke, delete, restart, re-add: none of the earlier tokens comes back.
    let rotated = f.registry.rotate_secret("dev-1").unwrap();
    f.registry.revoke_device("dev-1").unwrap();
    f.registry.delete_device("dev-1").unwrap();
    let f = f.reopen();
    let third = f.registry.add_device(new()).unwrap();
    for old in [&first, &second, &rotated] {
        assert_eq!(
            f.registry.authenticate_jwt(&old.tokens.access_token),
            Err(AuthError::BadCredentials)
        );
    }
    f.registry
        .authenticate_jwt(&third.tokens.access_token)
        .unwrap();
    // Self-registration after a delete likewise.
    let (_, token) = f.token(10);
    let registered = f.register_mac(&token, MAC).unwrap();
    f.registry.delete_device(&registered.device.id).unwrap();
    let again = f.register_mac(&token, MAC).unwrap();
    assert_eq!(again.device.id, registered.device.id);
    assert_eq!(
        f.registry.authenticate_jwt(&registered.tokens.access_token),
        Err(AuthError::BadCredentials)
    );
}

/// Finding 4: a token issued under a longer `jwt_ttl` is refused once the TTL is shortened.
#[test]
fn finding_4_jwt_lifetime_above_jwt_ttl_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.redb");
    let clock = Arc::new(ManualClock::new(T0));
    let registry =
        Registry::open_with_clock(RegistryOptions::new(&path, "gw-test"), clock.clone()).unwrap();
    let issued = registry.add_device(NewDevice::default()).unwrap();
    registry
        .authenticate_jwt(&issued.tokens.access_token)
        .unwrap();
    drop(registry);
    let mut options = RegistryOptions::new(&path, "gw-test");
    options.jwt_ttl = Duration::from_secs(600);
    let registry = Registry::open_with_clock(options, clock).unwrap();
    assert_eq!(
        registry.authenticate_jwt(&issued.tokens.access_token),
        Err(AuthError::Malformed)
    );
}

/// Finding 4: the registry file (it holds the JWT key) is 0600 and its new directory 0700,
/// whatever the umask; an existing looser file is tightened.
#[cfg(unix)]
#[test]
fn finding_4_registry_file_is_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    let path = dir.path().join("fresh").join("registry.redb");
    drop(Registry::open(RegistryOptions::new(&path, "gw-test")).unwrap());
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(path.parent().unwrap()), 0o700);

    let loose = dir.path().join("loose.redb");
    drop(Registry::open(RegistryOptions::new(&loose, "gw-test")).unwrap());
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    drop(Registry::open(RegistryOptions::new(&loose, "gw-test")).unwrap());
    assert_eq!(mode(&loose), 0o600);
}

/// Key rotation: the old key verifies for `jwt_ttl` (also after a restart), new tokens use
/// the new key, and after the grace period only the new key verifies.
#[test]
fn jwt_key_rotation_has_a_grace_period() {
    let f = Fixture::new();
    let before = f.registry.add_device(NewDevice::default()).unwrap();
    let until = f.registry.rotate_jwt_key().unwrap();
    assert_eq!(until, T0 + 3_600_000);
    let after = f.registry.add_device(NewDevice::default()).unwrap();
    let f = f.reopen();
    f.registry
        .authenticate_jwt(&before.tokens.access_token)
        .unwrap();
    f.registry
        .authenticate_jwt(&after.tokens.access_token)
        .unwrap();
    // The new key really is new: a refresh issues tokens that verify after the grace period.
    f.clock.advance(Duration::from_secs(3000));
    let renewed = f.registry.refresh(&after.tokens.refresh_token).unwrap();
    f.clock.advance(Duration::from_secs(601));
    assert_eq!(
        f.registry.authenticate_jwt(&before.tokens.access_token),
        Err(AuthError::BadCredentials),
        "the old key no longer verifies"
    );
    f.registry.authenticate_jwt(&renewed.access_token).unwrap();
}

#[test]
fn a_file_that_is_not_redb_is_a_storage_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.redb");
    std::fs::write(&path, b"this is not a database").unwrap();
    let error = Registry::open(RegistryOptions::new(&path, "gw-test")).unwrap_err();
    assert!(matches!(error, RegistryError::Storage { .. }), "{error:?}");
    assert!(error.to_string().contains("registry.redb"), "{error}");
}

// ---------------------------------------------------------------- hostile input

#[test]
fn hostile_input_is_an_error_not_a_panic() {
    let f = Fixture::new();
    let (_, token) = f.token(100);
    let huge = "x".repeat(1 << 20);
    let bad_strings = [
        huge.as_str(),
        "",
        "\0",
        "é",
        "../../etc/passwd",
        "!!!notbase64!!!",
        "AAAA",
        "////////////////////////////////////////////////////////////////////////",
    ];
    for bad in bad_strings {
        assert!(f.registry.authenticate_secret(bad, bad).is_err());
        assert!(f.registry.authenticate_jwt(bad).is_err());
        assert!(f.registry.authenticate_certificate(bad).is_err());
        assert!(f.registry.refresh(bad).is_err());
        assert!(f.registry.get_device(bad).is_none());
        assert!(
            bad == "AAAA" // a valid id
                || f.registry
                .add_device(NewDevice {
                    id: Some(bad.into()),
                    ..NewDevice::default()
                })
                .is_err()
        );
        let result = f.registry.register(Registration {
            provisioning_token: token.clone(),
            mac: Some(MAC.into()),
            public_key: Some(bad.into()),
            nonce: Some(bad.into()),
            signature: Some(bad.into()),
            name: Some(bad.into()),
            model: Some(bad.into()),
            ..Registration::default()
        });
        assert!(result.is_err(), "{bad:.20}");
        let result = f.registry.register(Registration {
            provisioning_token: bad.into(),
            mac: Some(bad.into()),
            imei: Some(bad.into()),
            ..Registration::default()
        });
        assert!(result.is_err());
        f.registry.record_connected(bad, T0);
        f.registry.record_message(bad, u64::MAX, u64::MAX);
        assert!(
            f.registry
                .mark_command(bad, bad, CommandState::Sent, None, T0)
                .is_err()
        );
        assert!(
            f.registry
                .submit_command(bad, command(bad, Duration::from_secs(1)), T0)
                .is_err()
        );
        let _ = f.registry.list_devices(&DeviceQuery {
            search: Some(bad.into()),
            cursor: Some(bad.into()),
            model: Some(bad.into()),
            label: Some((bad.into(), bad.into())),
            ..DeviceQuery::default()
        });
    }
    // A good key with signatures of every wrong shape.
    let signing = key(3);
    for signature in [
        "",
        "AAAA",
        huge.as_str(),
        &STANDARD.encode([0u8; 64]),
        &STANDARD.encode([0xffu8; 64]),
    ] {
        let challenge = f.registry.challenge();
        let result = f.registry.register(Registration {
            provisioning_token: token.clone(),
            mac: Some(MAC.into()),
            public_key: Some(STANDARD.encode(signing.verifying_key().as_bytes())),
            nonce: Some(challenge.nonce),
            signature: Some(signature.into()),
            ..Registration::default()
        });
        assert!(
            matches!(result, Err(RegistryError::Forbidden { .. })),
            "{result:?}"
        );
    }
    // Keys that are base64 of the wrong length, or not points.
    for public_key in [
        STANDARD.encode([1u8; 31]),
        STANDARD.encode([1u8; 33]),
        STANDARD.encode([0u8; 32]),
    ] {
        let result = f.registry.register(Registration {
            provisioning_token: token.clone(),
            mac: Some(MAC.into()),
            public_key: Some(public_key),
            nonce: Some(f.registry.challenge().nonce),
            signature: Some(STANDARD.encode([0u8; 64])),
            ..Registration::default()
        });
        assert!(
            matches!(
                result,
                Err(RegistryError::Invalid {
                    field: "public_key",
                    ..
                })
            ),
            "{result:?}"
        );
    }
    // Extreme counters saturate.
    let id = f
        .registry
        .add_device(NewDevice::default())
        .unwrap()
        .device
        .id;
    f.registry.record_message(&id, u64::MAX, T0);
    f.registry.record_message(&id, u64::MAX, T0);
    assert_eq!(f.registry.get_device(&id).unwrap().bytes, u64::MAX);
    f.registry.record_disconnected(&id, T0);
    assert_eq!(f.registry.len(), 1);
}

#[test]
fn registry_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Registry>();
    assert_send_sync::<AuthThrottle>();
}

#[test]
fn concurrent_auth_and_writes() {
    let f = Fixture::new();
    let provisioned = f.registry.add_device(NewDevice::default()).unwrap();
    let id = provisioned.device.id.clone();
    let secret = provisioned.secret.unwrap();
    let registry = &f.registry;
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for _ in 0..2000 {
                    registry.authenticate_secret(&id, &secret).unwrap();
                    registry.record_message(&id, 1, T0);
                }
            });
        }
        scope.spawn(|| {
            for i in 0..20 {
                registry
                    .update_device(
                        &id,
                        DevicePatch {
                            name: Some(Some(format!("n{i}"))),
                            ..DevicePatch::default()
                        },
                    )
                    .unwrap();
            }
        });
    });
    assert_eq!(
        f.registry.get_device(&id).unwrap().messages,
        8000,
        "no counter lost to admin writes"
    );
}

#[test]
fn bulk_add_is_all_or_nothing() {
    let f = Fixture::new();
    let added = f
        .registry
        .add_devices(
            (0..3)
                .map(|i| NewDevice {
                    id: Some(format!("bulk-{i}")),
                    ..NewDevice::default()
                })
                .collect(),
        )
        .unwrap();
    assert_eq!(added.len(), 3);
    f.registry
        .authenticate_secret("bulk-2", added[2].secret.as_deref().unwrap())
        .unwrap();
    let duplicate_in_batch = f.registry.add_devices(vec![
        NewDevice {
            id: Some("a".into()),
            mac: Some(MAC.into()),
            ..NewDevice::default()
        },
        NewDevice {
            id: Some("b".into()),
            mac: Some("001122334455".into()),
            ..NewDevice::default()
        },
    ]);
    assert!(matches!(
        duplicate_in_batch,
        Err(RegistryError::Conflict { what: "mac", .. })
    ));
    let clashes_with_stored = f.registry.add_devices(vec![
        NewDevice {
            id: Some("c".into()),
            ..NewDevice::default()
        },
        NewDevice {
            id: Some("bulk-0".into()),
            ..NewDevice::default()
        },
    ]);
    assert!(matches!(
        clashes_with_stored,
        Err(RegistryError::Conflict { what: "device", .. })
    ));
    assert_eq!(f.registry.get_device("a"), None);
    assert_eq!(f.registry.get_device("c"), None);
    assert_eq!(f.registry.len(), 3);
    assert_eq!(f.registry.add_devices(Vec::new()).unwrap(), vec![]);
}

#[test]
fn revocations_reach_every_subscriber() {
    let f = Fixture::new();
    let id = f
        .registry
        .add_device(NewDevice::default())
        .unwrap()
        .device
        .id;
    let mut first = f.registry.revocations();
    let mut second = f.registry.revocations();
    f.registry.revoke_device(&id).unwrap();
    assert_eq!(first.try_recv().unwrap(), id);
    assert_eq!(second.try_recv().unwrap(), id);
    assert!(first.try_recv().is_err(), "exactly one message");
}
