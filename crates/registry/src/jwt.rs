//! HS256 JSON Web Tokens: the gateway's access tokens. Pure: the key and the time are passed in.
//!
//! Only what we issue is accepted: header exactly `{"alg":"HS256","typ":"JWT"}` (any other
//! `alg`, including `none`, is malformed), an HMAC-SHA256 tag checked in constant time before
//! the claims are parsed, then `iss`, `typ`, `exp` and `iat` checked against the caller's
//! clock, and the lifetime `exp - iat` against the configured `jwt_ttl` (a token claiming a
//! longer life was not issued under the current policy). We implement this small subset instead of using the `jsonwebtoken` crate because its
//! crypto backends bring RSA and ECDSA (or a C library) that an edge box would carry unused.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::crypto::{b64url, decode_b64url_strict};
use crate::error::AuthError;

/// Tokens longer than this are rejected before any work.
pub(crate) const MAX_TOKEN_LEN: usize = 4096;
/// How far in the future `iat` may be (clock skew between gateway restarts).
const IAT_LEEWAY_S: u64 = 60;
/// `typ` claim of access tokens.
pub(crate) const ACCESS: &str = "access";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    alg: String,
    typ: String,
}

/// The claims we issue. `ver` is the device's credential version: every rotation, refresh,
/// re-registration and revocation takes a new one, which invalidates every older token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Claims {
    pub(crate) iss: String,
    pub(crate) sub: String,
    pub(crate) iat: u64,
    pub(crate) exp: u64,
    pub(crate) typ: String,
    pub(crate) ver: u64,
}

fn mac(key: &[u8; 32], signing_input: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length; this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(signing_input);
    mac
}

/// Sign `claims` with `key`.
pub(crate) fn sign(claims: &Claims, key: &[u8; 32]) -> String {
    let header = b64url(br#"{"alg":"HS256","typ":"JWT"}"#);
    // Serialising a struct of strings and integers cannot fail.
    let payload = b64url(&serde_json::to_vec(claims).unwrap_or_default());
    let signing_input = format!("{header}.{payload}");
    let tag = mac(key, signing_input.as_bytes()).finalize().into_bytes();
    format!("{signing_input}.{}", b64url(&tag))
}

/// Check a token's shape, signature, issuer, type and times (a lifetime `exp - iat` above
/// `max_lifetime_s` is malformed); return its claims.
pub(crate) fn verify(
    token: &str,
    key: &[u8; 32],
    issuer: &str,
    now_s: u64,
    max_lifetime_s: u64,
) -> Result<Claims, AuthError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(AuthError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(tag), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let signing_input_len = header.len() + 1 + payload.len();
    let header_bytes = decode_b64url_strict(header).ok_or(AuthError::Malformed)?;
    let header: Header = serde_json::from_slice(&header_bytes).map_err(|_| AuthError::Malformed)?;
    if header.alg != "HS256" || header.typ != "JWT" {
        return Err(AuthError::Malformed);
    }
    let tag = decode_b64url_strict(tag).ok_or(AuthError::Malformed)?;
    mac(key, &token.as_bytes()[..signing_input_len])
        .verify_slice(&tag) // constant time
        .map_err(|_| AuthError::BadCredentials)?;
    let payload = decode_b64url_strict(payload).ok_or(AuthError::Malformed)?;
    let claims: Claims = serde_json::from_slice(&payload).map_err(|_| AuthError::Malformed)?;
    if claims.iss != issuer || claims.typ != ACCESS {
        return Err(AuthError::Malformed);
    }
    if claims.iat > now_s.saturating_add(IAT_LEEWAY_S)
        || claims.exp.saturating_sub(claims.iat) > max_lifetime_s
    {
        return Err(AuthError::Malformed);
    }
    if now_s >= claims.exp {
        return Err(AuthError::Expired);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [9u8; 32];
    const TTL: u64 = 3600;

    fn claims(iat: u64, exp: u64) -> Claims {
        Claims {
            iss: "gw-1".into(),
            sub: "dev-1".into(),
            iat,
            exp,
            typ: ACCESS.into(),
            ver: 0,
        }
    }

    #[test]
    fn round_trip_within_lifetime() {
        let token = sign(&claims(1000, 4600), &KEY);
        assert_eq!(
            verify(&token, &KEY, "gw-1", 1000, TTL),
            Ok(claims(1000, 4600))
        );
        assert_eq!(
            verify(&token, &KEY, "gw-1", 4599, TTL),
            Ok(claims(1000, 4600))
        );
    }

    #[test]
    fn expired_at_exp() {
        let token = sign(&claims(1000, 4600), &KEY);
        assert_eq!(
            verify(&token, &KEY, "gw-1", 4600, TTL),
            Err(AuthError::Expired)
        );
        assert_eq!(
            verify(&token, &KEY, "gw-1", u64::MAX, TTL),
            Err(AuthError::Expired)
        );
    }

    /// Finding 4: a token living longer than `jwt_ttl` is refused, even when well signed.
    #[test]
    fn finding_4_lifetime_above_jwt_ttl_is_refused() {
        let token = sign(&claims(1000, 1000 + TTL + 1), &KEY);
        assert_eq!(
            verify(&token, &KEY, "gw-1", 1000, TTL),
            Err(AuthError::Malformed)
        );
        let token = sign(&claims(1000, 1000 + TTL), &KEY);
        assert!(verify(&token, &KEY, "gw-1", 1000, TTL).is_ok());
    }

    #[test]
    fn issued_in_the_future_is_rejected() {
        let token = sign(&claims(10_000, 20_000), &KEY);
        assert_eq!(
            verify(&token, &KEY, "gw-1", 1000, TTL),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn wrong_key_issuer_or_type_fail() {
        let token = sign(&claims(1000, 4600), &KEY);
        assert_eq!(
            verify(&token, &[8u8; 32], "gw-1", 1000, TTL),
            Err(AuthError::BadCredentials)
        );
        assert_eq!(
            verify(&token, &KEY, "gw-2", 1000, TTL),
            Err(AuthError::Malformed)
        );
        let mut refresh = claims(1000, 4600);
        refresh.typ = "refresh".into();
        assert_eq!(
            verify(&sign(&refresh, &KEY), &KEY, "gw-1", 1000, TTL),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn tampered_payload_or_tag_fails() {
        let token = sign(&claims(1000, 4600), &KEY);
        let parts: Vec<&str> = token.split('.').collect();
        let mut forged = claims(1000, 4600);
        forged.sub = "dev-2".into();
        let forged_payload = b64url(&serde_json::to_vec(&forged).unwrap());
        let tampered = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert_eq!(
            verify(&tampered, &KEY, "gw-1", 1000, TTL),
            Err(AuthError::BadCredentials)
        );
        let mut tag = parts[2].to_owned();
        let last = if tag.ends_with('A') { 'B' } else { 'A' };
        tag.pop();
        tag.push(last);
        let tampered = format!("{}.{}.{}", parts[0], parts[1], tag);
        assert!(verify(&tampered, &KEY, "gw-1", 1000, TTL).is_err());
    }

    #[test]
    fn other_algorithms_are_rejected() {
        let token = sign(&claims(1000, 4600), &KEY);
        let parts: Vec<&str> = token.split('.').collect();
        for header in [
            r#"{"alg":"none","typ":"JWT"}"#,
            r#"{"alg":"HS512","typ":"JWT"}"#,
            r#"{"alg":"RS256","typ":"JWT"}"#,
        ] {
            let forged = format!("{}.{}.{}", b64url(header.as_bytes()), parts[1], parts[2]);
            assert_eq!(
                verify(&forged, &KEY, "gw-1", 1000, TTL),
                Err(AuthError::Malformed),
                "{header}"
            );
            let unsigned = format!("{}.{}.", b64url(header.as_bytes()), parts[1]);
            assert_eq!(
                verify(&unsigned, &KEY, "gw-1", 1000, TTL),
                Err(AuthError::Malformed),
                "{header}"
            );
        }
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for token in [
            "",
            ".",
            "..",
            "...",
            "a.b.c",
            "a.b.c.d",
            "é.é.é",
            "eyJ.eyJ.x",
        ] {
            assert!(verify(token, &KEY, "gw-1", 1000, TTL).is_err(), "{token:?}");
        }
        assert_eq!(
            verify(&"a".repeat(100_000), &KEY, "gw-1", 1000, TTL),
            Err(AuthError::Malformed)
        );
    }

    /// A token correctly signed with `KEY` over arbitrary header and payload bytes.
    fn signed(header: &[u8], payload: &[u8]) -> String {
        let input = format!("{}.{}", b64url(header), b64url(payload));
        let tag = mac(&KEY, input.as_bytes()).finalize().into_bytes();
        format!("{input}.{}", b64url(&tag))
    }

    const HEADER: &[u8] = br#"{"alg":"HS256","typ":"JWT"}"#;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// The unauthenticated surface: any string is an error, never a panic.
        #[test]
        fn arbitrary_strings_are_an_error_not_a_panic(token in "\\PC{0,300}", now in proptest::prelude::any::<u64>()) {
            proptest::prop_assert!(verify(&token, &KEY, "gw-1", now, TTL).is_err());
        }

        /// Three base64url-ish segments reach the header decoder and the MAC check.
        #[test]
        fn jwt_shaped_strings_are_an_error_not_a_panic(
            header in "[A-Za-z0-9_=+/-]{0,80}",
            payload in "[A-Za-z0-9_=+/-]{0,200}",
            tag in "[A-Za-z0-9_=+/-]{0,60}",
        ) {
            let token = format!("{header}.{payload}.{tag}");
            proptest::prop_assert!(verify(&token, &KEY, "gw-1", 1000, TTL).is_err());
        }

        /// Behind a valid MAC (reachable only with the key), arbitrary header and claims
        /// bytes still give an error or claims, never a panic.
        #[test]
        fn signed_arbitrary_bytes_never_panic(
            header in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            now in proptest::prelude::any::<u64>(),
        ) {
            let _outcome = verify(&signed(&header, &payload), &KEY, "gw-1", now, TTL);
            let _outcome = verify(&signed(HEADER, &payload), &KEY, "gw-1", now, TTL);
        }

        /// Extreme `iat`, `exp`, clock and lifetime values: no overflow panics.
        #[test]
        fn signed_extreme_times_never_panic(
            iat in proptest::prelude::any::<u64>(),
            exp in proptest::prelude::any::<u64>(),
            now in proptest::prelude::any::<u64>(),
            max_lifetime in proptest::prelude::any::<u64>(),
        ) {
            let token = sign(&claims(iat, exp), &KEY);
            if let Ok(verified) = verify(&token, &KEY, "gw-1", now, max_lifetime) {
                proptest::prop_assert!(now < verified.exp);
            }
        }
    }
}
