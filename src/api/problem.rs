//! RFC 7807 errors: every failure of the `/api/v1` routes is an `application/problem+json`
//! body `{type, title, status, detail, code}` whose `code` is stable and documented.
//!
//! Invariant: bad input is a 4xx; only a failing disk (registry storage) or a stalled
//! pipeline answers 5xx. `detail` never contains a secret, a token or a hash, and never
//! more than [`MAX_DETAIL`] bytes: what a client sent (an id from a 10 kB path) is echoed
//! cut to [`MAX_ECHO`] bytes.

use std::time::Duration;

use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fieldgate_registry::{AuthError, RegistryError};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";
/// Most bytes of a client's input (an id, a path) echoed in a `detail`.
pub const MAX_ECHO: usize = 256;
/// Most bytes of a `detail`.
pub const MAX_DETAIL: usize = 1024;

/// `text` cut to at most `limit` bytes at a character boundary, marked when cut.
pub fn truncated(text: &str, limit: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= limit {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}… ({} bytes)", &text[..end], text.len()))
}

/// An RFC 7807 problem document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem: `urn:fieldgate:problem:<code>`.
    #[serde(rename = "type")]
    pub problem_type: String,
    /// A short summary of the kind of problem, the same for every occurrence.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong this time, naming the subject (device id, field, …).
    pub detail: String,
    /// A stable machine-readable code, e.g. `not_found`, `invalid_field`, `token_expired`.
    pub code: String,
}

/// An error response: a problem plus its status and, for 429/503, a `Retry-After`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    title: &'static str,
    detail: String,
    retry_after: Option<Duration>,
}

impl ApiError {
    /// A problem with `status`, a stable `code`, a fixed `title` and this occurrence's `detail`.
    pub fn new(
        status: StatusCode,
        code: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        let detail = detail.into();
        let detail = match truncated(&detail, MAX_DETAIL) {
            std::borrow::Cow::Borrowed(_) => detail,
            std::borrow::Cow::Owned(cut) => cut,
        };
        Self {
            status,
            code,
            title,
            detail,
            retry_after: None,
        }
    }

    /// 400 `invalid_field`: a field's value is not acceptable.
    pub fn invalid(field: &str, reason: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "Invalid field",
            format!("{field}: {reason}"),
        )
    }

    /// 404 `not_found`.
    pub fn not_found(what: &str, id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "Not found",
            format!("{what} {:?} does not exist", truncated(id, MAX_ECHO)),
        )
    }

    /// 429 `too_many_attempts` with `Retry-After`.
    pub fn throttled(retry_after: Duration) -> Self {
        let seconds = ceil_secs(retry_after);
        Self {
            retry_after: Some(Duration::from_secs(seconds)),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_attempts",
                "Too many failed attempts",
                format!("too many failed authentication attempts; retry in {seconds} s"),
            )
        }
    }

    /// Adds a `Retry-After` header.
    pub fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = Some(retry_after);
        self
    }

    /// The status code.
    #[cfg(test)]
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stable code.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The problem document this error answers with.
    pub fn problem(&self) -> Problem {
        Problem {
            problem_type: format!("urn:fieldgate:problem:{}", self.code),
            title: self.title.to_owned(),
            status: self.status.as_u16(),
            detail: self.detail.clone(),
            code: self.code.to_owned(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.problem()).unwrap_or_default();
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON))],
            body,
        )
            .into_response();
        if let Some(retry_after) = self.retry_after {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(ceil_secs(retry_after)),
            );
        }
        response
    }
}

impl From<RegistryError> for ApiError {
    fn from(err: RegistryError) -> Self {
        match &err {
            RegistryError::NotFound { what, id } => Self::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "Not found",
                format!("{what} {:?} not found", truncated(id, MAX_ECHO)),
            ),
            RegistryError::Conflict { .. } => Self::new(
                StatusCode::CONFLICT,
                "conflict",
                "Conflict",
                err.to_string(),
            ),
            RegistryError::Invalid { .. } => Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                "Invalid field",
                err.to_string(),
            ),
            RegistryError::Forbidden { .. } => Self::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "Forbidden",
                err.to_string(),
            ),
            // Keep the path out of the answer: it is the log's business.
            _ => {
                tracing::error!(error = %err, "registry storage failed");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "storage_error",
                    "Storage error",
                    "the device registry could not be written; see the gateway log",
                )
            }
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        let (status, code, title, detail) = match err {
            AuthError::UnknownDevice => (
                StatusCode::UNAUTHORIZED,
                "unknown_device",
                "Unknown device",
                "the credentials name no registered device",
            ),
            AuthError::BadCredentials => (
                StatusCode::UNAUTHORIZED,
                "bad_credentials",
                "Bad credentials",
                "the credentials are wrong or were already used",
            ),
            AuthError::Revoked => (
                StatusCode::FORBIDDEN,
                "device_revoked",
                "Device revoked",
                "the device is revoked",
            ),
            AuthError::Expired => (
                StatusCode::UNAUTHORIZED,
                "token_expired",
                "Token expired",
                "the token has expired; refresh it",
            ),
            _ => (
                StatusCode::UNAUTHORIZED,
                "malformed_token",
                "Malformed token",
                "the token cannot be read",
            ),
        };
        Self::new(status, code, title, detail)
    }
}

/// Whole seconds, rounded up, at least 1: `Retry-After` must not invite an early retry.
fn ceil_secs(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis().div_ceil(1000))
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Maps an axum rejection (status + text) to a problem.
fn rejection(status: StatusCode, text: String) -> ApiError {
    let (code, title) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "Payload too large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported_media_type", "Unsupported media type"),
        StatusCode::UNPROCESSABLE_ENTITY => ("invalid_body", "Invalid body"),
        _ => ("malformed_request", "Malformed request"),
    };
    // Everything an extractor refuses is the client's fault, whatever axum thinks.
    let status = if status.is_server_error() {
        StatusCode::BAD_REQUEST
    } else {
        status
    };
    ApiError::new(status, code, title, text)
}

impl From<JsonRejection> for ApiError {
    fn from(err: JsonRejection) -> Self {
        rejection(err.status(), err.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(err: QueryRejection) -> Self {
        rejection(err.status(), err.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(err: PathRejection) -> Self {
        rejection(err.status(), err.body_text())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(err: BytesRejection) -> Self {
        rejection(err.status(), err.body_text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_errors_have_distinct_stable_codes() {
        let codes: Vec<&str> = [
            AuthError::UnknownDevice,
            AuthError::BadCredentials,
            AuthError::Revoked,
            AuthError::Expired,
            AuthError::Malformed,
        ]
        .into_iter()
        .map(|err| ApiError::from(err).code())
        .collect();
        assert_eq!(
            codes,
            [
                "unknown_device",
                "bad_credentials",
                "device_revoked",
                "token_expired",
                "malformed_token"
            ]
        );
    }

    #[test]
    fn echoed_input_is_cut() {
        let long = "é".repeat(5000);
        let err = ApiError::not_found("device", &long);
        let detail = err.problem().detail;
        assert!(detail.len() < MAX_ECHO + 64, "{} bytes", detail.len());
        assert!(detail.contains("(10000 bytes)"), "{detail}");
        let err = ApiError::new(StatusCode::BAD_REQUEST, "x", "X", "a".repeat(50_000));
        assert!(err.problem().detail.len() <= MAX_DETAIL + 32);
        assert_eq!(truncated("short", MAX_ECHO), "short");
    }

    #[test]
    fn problem_has_type_and_retry_after() {
        let err = ApiError::throttled(Duration::from_millis(2500));
        assert_eq!(
            err.problem().problem_type,
            "urn:fieldgate:problem:too_many_attempts"
        );
        let response = err.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
        assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
    }
}
