//! Small cryptographic helpers: OS randomness, SHA-256 of secrets, constant-time comparison,
//! base64 decoding of untrusted input, and Ed25519 signature checks. No state.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A SHA-256 digest.
pub(crate) type Hash = [u8; 32];

/// Largest base64 text we decode (keys, signatures, nonces are all far below this).
const MAX_BASE64_LEN: usize = 512;

/// 32 bytes from the OS CSPRNG. Failure means the OS has no entropy source, which no caller
/// can recover from; we still return it as an error rather than panic.
pub(crate) fn random_32() -> Result<[u8; 32], getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes)?;
    Ok(bytes)
}

/// 8 random bytes as 16 lowercase hex digits, for non-secret ids.
pub(crate) fn random_hex_id() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 8];
    getrandom::getrandom(&mut bytes)?;
    Ok(hex(&bytes))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// SHA-256 of a secret. The secrets we hash are 256-bit random values, so a fast hash is
/// enough: there is nothing to brute-force, unlike a human password.
pub(crate) fn sha256(data: &[u8]) -> Hash {
    Sha256::digest(data).into()
}

/// Equality whose time does not depend on where the inputs differ.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

pub(crate) fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub(crate) fn b64std(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Decode base64 from an untrusted party: standard or URL-safe alphabet, padded or not,
/// bounded length. `None` on anything else.
pub(crate) fn decode_b64_lenient(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if text.is_empty() || text.len() > MAX_BASE64_LEN {
        return None;
    }
    [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(text).ok())
}

/// Parse a base64 Ed25519 public key (32 bytes, a valid curve point, not a weak key).
pub(crate) fn parse_public_key(text: &str) -> Result<VerifyingKey, &'static str> {
    let bytes = decode_b64_lenient(text).ok_or("not base64 (or longer than 512 bytes)")?;
    let bytes: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| "an Ed25519 public key is 32 bytes")?;
    let key = VerifyingKey::from_bytes(&bytes).map_err(|_| "not a valid Ed25519 point")?;
    if key.is_weak() {
        return Err("weak Ed25519 key (small order)");
    }
    Ok(key)
}

/// Verify a base64 Ed25519 signature over `message` with `verify_strict` (no malleable
/// signatures, no small-order components).
pub(crate) fn verify_signature(key: &VerifyingKey, message: &[u8], signature_b64: &str) -> bool {
    let Some(bytes) = decode_b64_lenient(signature_b64) else {
        return false;
    };
    let Ok(signature) = Signature::from_slice(&bytes) else {
        return false;
    };
    key.verify_strict(message, &signature).is_ok()
}

/// Decode unpadded base64url (JWT segments), bounded by the JWT size cap.
pub(crate) fn decode_b64url_strict(text: &str) -> Option<Vec<u8>> {
    if text.len() > crate::jwt::MAX_TOKEN_LEN {
        return None;
    }
    URL_SAFE_NO_PAD.decode(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenient_base64_accepts_both_alphabets_and_rejects_junk() {
        let bytes = [0xfbu8, 0xff, 0x01];
        assert_eq!(decode_b64_lenient("+/8B").as_deref(), Some(&bytes[..]));
        assert_eq!(decode_b64_lenient("-_8B").as_deref(), Some(&bytes[..]));
        assert_eq!(decode_b64_lenient("!!!"), None);
        assert_eq!(decode_b64_lenient(""), None);
        assert_eq!(decode_b64_lenient(&"A".repeat(10_000)), None);
    }

    #[test]
    fn ct_eq_compares() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }

    #[test]
    fn public_keys_must_be_32_byte_points() {
        assert!(parse_public_key("AAAA").is_err());
        assert!(
            parse_public_key(&b64std(&[0u8; 32])).is_err(),
            "identity is weak"
        );
        let signing = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let public = b64std(signing.verifying_key().as_bytes());
        assert!(parse_public_key(&public).is_ok());
    }
}
