//! Public device routes: the registration challenge, self-registration with a
//! provisioning token, and refreshing an access token.
//!
//! A refused provisioning token or refresh token is a failed authentication: counted and
//! throttled per source address like any other. So is a registration of an identifier that
//! is already registered without a signature by the device's registered key (409): a
//! provisioning token and a MAC/IMEI prove nothing about who the caller is, and counting
//! these slows down anyone walking the MAC space. An admin re-provisions such a device with
//! `POST /api/v1/devices/{id}/rotate`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use fieldgate_registry::{Challenge, Provisioned, Registration, RegistryError, Tokens};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::extract::{ApiJson, ClientIp, JsonResponse, ok};
use super::problem::{ApiError, Problem};
use super::v1::{DEVICE_SOURCE, V1State};

/// `POST /api/v1/auth/refresh`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    /// The refresh token from the last registration, rotation or refresh (single use).
    pub refresh_token: String,
}

/// A single-use nonce for a key-based registration: sign its decoded bytes with the
/// device's Ed25519 key.
#[utoipa::path(post, path = "/api/v1/devices/register/challenge", tag = "registration",
    responses(
        (status = 200, description = "A fresh nonce", body = Challenge),
        (status = 429, description = "Too many failed attempts from this address", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn challenge(
    State(state): State<Arc<V1State>>,
    ClientIp(ip): ClientIp,
) -> Result<JsonResponse<Challenge>, ApiError> {
    state.check_throttle(ip, None)?;
    Ok(ok(state.registry.challenge()))
}

/// Registers a device by MAC or IMEI with a provisioning token; with a public key, the
/// nonce and its signature prove possession and no secret is issued.
#[utoipa::path(post, path = "/api/v1/devices/register", tag = "registration",
    request_body = Registration,
    responses(
        (status = 201, description = "Registered; again only for a key-based device whose registered key signed the nonce", body = Provisioned),
        (status = 400, description = "Invalid field or malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Bad, exhausted, expired or revoked provisioning token; bad signature; replayed nonce", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The identifier is already registered: keyless, or with another key (an admin re-provisions with POST /api/v1/devices/{id}/rotate)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many failed attempts from this address", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn register(
    State(state): State<Arc<V1State>>,
    ClientIp(ip): ClientIp,
    ApiJson(request): ApiJson<Registration>,
) -> Result<JsonResponse<Provisioned>, ApiError> {
    state.check_throttle(ip, None)?;
    let outcome = state
        .blocking(move |registry| registry.register(request))
        .await?;
    match outcome {
        Ok(provisioned) => {
            tracing::info!(device_id = %provisioned.device.id, peer = %ip, "device registered");
            Ok(JsonResponse(StatusCode::CREATED, provisioned))
        }
        Err(err) => {
            if matches!(
                err,
                RegistryError::Forbidden { .. } | RegistryError::Conflict { .. }
            ) {
                state.auth_failed(ip, None, DEVICE_SOURCE);
                tracing::info!(peer = %ip, error = %err, "registration refused");
            }
            Err(err.into())
        }
    }
}

/// Trades a refresh token (single use) for a new access token and refresh token.
#[utoipa::path(post, path = "/api/v1/auth/refresh", tag = "registration",
    request_body = RefreshRequest,
    responses(
        (status = 200, description = "A new token pair", body = Tokens),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unknown, used or expired refresh token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The device is revoked", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many failed attempts from this address", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn refresh(
    State(state): State<Arc<V1State>>,
    ClientIp(ip): ClientIp,
    ApiJson(request): ApiJson<RefreshRequest>,
) -> Result<JsonResponse<Tokens>, ApiError> {
    state.check_throttle(ip, None)?;
    let outcome = state
        .blocking(move |registry| registry.refresh(&request.refresh_token))
        .await?;
    match outcome {
        Ok(tokens) => Ok(ok(tokens)),
        Err(err) => {
            state.auth_failed(ip, None, DEVICE_SOURCE);
            Err(err.into())
        }
    }
}
