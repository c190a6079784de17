//! The one admin check, [`AdminAuth`], behind every admin route: the `/api/v1` admin routes
//! (through the [`Admin`] extractor) and `/debug/pprof/*`.
//!
//! - Off without `api.admin_token`: the routes answer 404.
//! - `Authorization: Bearer <token>`; the token is compared as a SHA-256 digest against every
//!   accepted token with `subtle`, so the time taken depends neither on where the bytes differ
//!   nor on the length of the guess, nor on which token matched.
//! - Accepted tokens: `api.admin_token`, plus `api.previous_admin_token` until
//!   `api.previous_admin_token_until` (rotation without a flag day, see docs/SECURITY.md).
//! - Failures are counted in `fieldgate_auth_failures_total{source="api_admin"}`, logged with
//!   the reason (never the token), and throttled per source address: an attacker's failures
//!   never lock the admin out of another address.
//!
//! Also the admin route over the gateway's own secret: `POST /api/v1/jwt-key/rotate`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use fieldgate_registry::{AuthThrottle, ThrottleConfig};
use prometheus_client::metrics::counter::Counter;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};
use tokio::time::Instant;

use super::extract::{ClientIp, JsonResponse, bearer, ok};
use super::problem::{ApiError, Problem};
use super::v1::V1State;
use crate::telemetry::Metrics;
use crate::telemetry::metrics::SourceLabel;

/// `source` label of `fieldgate_auth_failures_total` for a wrong admin token, on every admin
/// route.
pub const ADMIN_SOURCE: &str = "api_admin";

/// One accepted admin token, as its digest.
struct AcceptedToken {
    digest: [u8; 32],
    /// Refused from this instant on (a previous token during a rotation).
    until: Option<SystemTime>,
}

/// Why an admin request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminDenied {
    /// No admin token configured: the admin routes are off.
    Disabled,
    /// Too many failures from this address; retry after the delay.
    Throttled(Duration),
    /// No bearer token.
    Missing,
    /// A bearer token that is not an accepted admin token.
    Wrong,
}

impl AdminDenied {
    /// The reason, for logs.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Disabled => "admin routes disabled",
            Self::Throttled(_) => "too many failed attempts from this address",
            Self::Missing => "missing admin token",
            Self::Wrong => "wrong admin token",
        }
    }
}

/// The admin check shared by every admin route. Thread-safe; share it as `Arc<AdminAuth>`.
pub struct AdminAuth {
    tokens: Vec<AcceptedToken>,
    throttle: AuthThrottle,
    origin: Instant,
    failures: Counter,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminAuth")
            .field("tokens", &self.tokens.len())
            .finish_non_exhaustive()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl AdminAuth {
    /// The check for `token` (`None`: admin routes off), with the default throttle.
    pub fn new(token: Option<&str>, metrics: &Metrics) -> Self {
        Self::with_throttle(token, metrics, ThrottleConfig::default())
    }

    /// The same with a custom throttle policy (tests).
    pub fn with_throttle(token: Option<&str>, metrics: &Metrics, throttle: ThrottleConfig) -> Self {
        let failures = metrics
            .auth_failures
            .get_or_create(&SourceLabel {
                source: ADMIN_SOURCE.into(),
            })
            .clone();
        Self {
            tokens: token
                .map(|token| AcceptedToken {
                    digest: digest(token),
                    until: None,
                })
                .into_iter()
                .collect(),
            throttle: AuthThrottle::new(throttle),
            origin: Instant::now(),
            failures,
        }
    }

    /// Also accept `token` until `until` (the previous token during a rotation). Ignored
    /// while the admin routes are off.
    #[must_use]
    pub fn with_previous(mut self, token: &str, until: SystemTime) -> Self {
        if !self.tokens.is_empty() {
            self.tokens.push(AcceptedToken {
                digest: digest(token),
                until: Some(until),
            });
        }
        self
    }

    /// Checks the bearer token of a request from `ip`. Counts, logs and throttles a failure.
    pub fn check(&self, ip: IpAddr, headers: &HeaderMap) -> Result<(), AdminDenied> {
        self.check_at(ip, headers, SystemTime::now())
    }

    fn check_at(
        &self,
        ip: IpAddr,
        headers: &HeaderMap,
        now: SystemTime,
    ) -> Result<(), AdminDenied> {
        if self.tokens.is_empty() {
            return Err(AdminDenied::Disabled);
        }
        let elapsed = self.origin.elapsed();
        if let Err(wait) = self.throttle.check(ip, None, elapsed) {
            self.failures.inc();
            tracing::debug!(peer = %ip, retry_after_ms = wait.as_millis(), "admin request refused: throttled");
            return Err(AdminDenied::Throttled(wait));
        }
        let verdict = match bearer(headers) {
            None => Err(AdminDenied::Missing),
            Some(presented) => {
                let presented = digest(presented);
                // Every token is compared, whatever the earlier ones gave.
                let mut matched = Choice::from(0);
                for token in &self.tokens {
                    let live = token.until.is_none_or(|until| now < until);
                    matched |= token.digest.ct_eq(&presented) & Choice::from(u8::from(live));
                }
                if bool::from(matched) {
                    Ok(())
                } else {
                    Err(AdminDenied::Wrong)
                }
            }
        };
        match verdict {
            Ok(()) => self.throttle.success(ip, None),
            Err(denied) => {
                self.throttle.failure(ip, None, elapsed);
                self.failures.inc();
                tracing::warn!(peer = %ip, reason = denied.reason(), "admin request refused");
            }
        }
        verdict
    }
}

/// Proof that the request carried the admin token; take it as a handler argument.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl FromRequestParts<Arc<V1State>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<V1State>) -> Result<Self, ApiError> {
        let ClientIp(ip) = match ClientIp::from_request_parts(parts, state).await {
            Ok(ip) => ip,
            Err(never) => match never {},
        };
        state
            .admin
            .check(ip, &parts.headers)
            .map_err(denied_problem)?;
        Ok(Admin)
    }
}

/// The problem answered for a refused admin request.
pub fn denied_problem(denied: AdminDenied) -> ApiError {
    match denied {
        AdminDenied::Disabled => ApiError::new(
            StatusCode::NOT_FOUND,
            "admin_disabled",
            "Admin routes disabled",
            "set api.admin_token in the config to enable the admin routes",
        ),
        AdminDenied::Throttled(wait) => ApiError::throttled(wait),
        AdminDenied::Missing => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing_token",
            "Missing token",
            "this route needs `Authorization: Bearer <admin token>`",
        ),
        AdminDenied::Wrong => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "bad_admin_token",
            "Bad admin token",
            "the admin token is wrong",
        ),
    }
}

/// The answer of `POST /api/v1/jwt-key/rotate`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct JwtKeyRotated {
    /// Until when (ms since the Unix epoch) tokens signed with the previous key still verify.
    pub previous_key_valid_until_ms: u64,
}

/// Replaces the JWT signing key: new tokens are signed with a fresh key at once; tokens signed
/// with the previous one keep working for `registry.jwt_ttl`, so no device notices.
#[utoipa::path(post, path = "/api/v1/jwt-key/rotate", tag = "devices",
    responses(
        (status = 200, description = "Rotated", body = JwtKeyRotated),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin_token" = [])))]
pub async fn rotate_jwt_key(
    _admin: Admin,
    State(state): State<Arc<V1State>>,
) -> Result<JsonResponse<JwtKeyRotated>, ApiError> {
    let until = state
        .blocking(|registry| registry.rotate_jwt_key())
        .await??;
    tracing::info!(
        previous_key_valid_until_ms = until,
        "JWT signing key rotated"
    );
    Ok(ok(JwtKeyRotated {
        previous_key_valid_until_ms: until,
    }))
}

#[cfg(test)]
mod tests {
    use axum::http::{HeaderValue, header};

    use super::*;

    fn headers(token: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(token) = token {
            headers.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
            );
        }
        headers
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[tokio::test]
    async fn right_token_passes_wrong_ones_are_counted_and_throttled_per_address() {
        let metrics = Metrics::new();
        let auth = AdminAuth::new(Some("s3cret"), &metrics);
        assert_eq!(auth.check(ip(1), &headers(Some("s3cret"))), Ok(()));
        for guess in ["", "s", "s3cre", "s3creT", "s3cret-but-longer", "x"] {
            let denied = auth.check(ip(1), &headers(Some(guess))).unwrap_err();
            assert!(
                matches!(denied, AdminDenied::Wrong | AdminDenied::Missing),
                "{guess:?}: {denied:?}"
            );
        }
        // Five failures are free; the sixth started a delay, even for the right token.
        assert!(matches!(
            auth.check(ip(1), &headers(Some("s3cret"))),
            Err(AdminDenied::Throttled(_))
        ));
        // Finding 10: another address is not locked out.
        assert_eq!(auth.check(ip(2), &headers(Some("s3cret"))), Ok(()));
        let counted = metrics.auth_failures.get_or_create(&SourceLabel {
            source: ADMIN_SOURCE.into(),
        });
        assert_eq!(counted.get(), 7);
    }

    #[tokio::test]
    async fn disabled_without_a_token() {
        let auth = AdminAuth::new(None, &Metrics::new());
        assert_eq!(
            auth.check(ip(1), &headers(Some("anything"))),
            Err(AdminDenied::Disabled)
        );
    }

    #[tokio::test]
    async fn the_previous_token_works_until_its_deadline() {
        let now = SystemTime::now();
        let auth = AdminAuth::new(Some("new"), &Metrics::new())
            .with_previous("old", now + Duration::from_secs(60));
        assert_eq!(auth.check_at(ip(1), &headers(Some("new")), now), Ok(()));
        assert_eq!(auth.check_at(ip(1), &headers(Some("old")), now), Ok(()));
        assert_eq!(
            auth.check_at(ip(1), &headers(Some("old")), now + Duration::from_secs(60)),
            Err(AdminDenied::Wrong)
        );
        assert_eq!(
            auth.check_at(
                ip(1),
                &headers(Some("new")),
                now + Duration::from_secs(3600)
            ),
            Ok(())
        );
    }
}
