//! The admin check: `Authorization: Bearer <api.admin_token>`, compared in constant time.
//!
//! Without `api.admin_token` the admin routes answer 404 `admin_disabled`. A wrong or
//! missing token is a 401 problem, counted, and throttled per source address.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;

use super::extract::{ClientIp, bearer};
use super::problem::ApiError;
use super::v1::V1State;

/// Proof that the request carried the admin token; take it as a handler argument.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl FromRequestParts<Arc<V1State>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<V1State>) -> Result<Self, ApiError> {
        let Some(expected) = state.admin_token.as_deref() else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "admin_disabled",
                "Admin routes disabled",
                "set api.admin_token in the config to enable the admin routes",
            ));
        };
        let ClientIp(ip) = match ClientIp::from_request_parts(parts, state).await {
            Ok(ip) => ip,
            Err(never) => match never {},
        };
        state.check_throttle(ip, None)?;
        let Some(presented) = bearer(&parts.headers) else {
            state.auth_failed(ip, None, super::v1::ADMIN_SOURCE);
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing_token",
                "Missing token",
                "this route needs `Authorization: Bearer <admin token>`",
            ));
        };
        if !constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
            state.auth_failed(ip, None, super::v1::ADMIN_SOURCE);
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "bad_admin_token",
                "Bad admin token",
                "the admin token is wrong",
            ));
        }
        Ok(Admin)
    }
}

/// Compares two byte strings in time that depends only on their lengths, never on where
/// they first differ.
pub fn constant_time_eq(left: &[u8], right: &[u8]) -> bool {
    let longest = left.len().max(right.len());
    let mut difference = u8::from(left.len() != right.len());
    for index in 0..longest {
        let a = left.get(index).copied().unwrap_or(0);
        let b = right.get(index).copied().unwrap_or(0);
        difference |= a ^ b;
    }
    // `black_box` keeps the optimiser from turning the loop into an early exit.
    std::hint::black_box(difference) == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn equal_only_when_identical() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret!"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }
}
