//! Admin routes over provisioning tokens: create (secret shown once), list, revoke.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use fieldgate_registry::{NewProvisioningToken, ProvisioningToken};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::admin::Admin;
use super::extract::{ApiJson, ApiPath, JsonResponse, ok};
use super::problem::{ApiError, Problem};
use super::v1::V1State;

/// Longest lifetime of a provisioning token: a year covers a production run.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(366 * 24 * 3600);
/// Most registrations one token may allow.
const MAX_USES: u32 = 1_000_000;

/// A new provisioning token and its secret, which is shown only this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreatedProvisioningToken {
    /// The token, without its secret.
    pub token: ProvisioningToken,
    /// The value devices send as `provisioning_token` when they register.
    pub secret: String,
}

/// Creates a provisioning token.
#[utoipa::path(post, path = "/api/v1/provisioning-tokens", tag = "provisioning",
    request_body = NewProvisioningToken,
    responses(
        (status = 201, description = "Token created; `secret` is shown only once", body = CreatedProvisioningToken),
        (status = 400, description = "Invalid field or malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin_token" = [])))]
pub async fn create(
    _admin: Admin,
    State(state): State<Arc<V1State>>,
    ApiJson(new): ApiJson<NewProvisioningToken>,
) -> Result<JsonResponse<CreatedProvisioningToken>, ApiError> {
    if new.max_uses == 0 || new.max_uses > MAX_USES {
        return Err(ApiError::invalid(
            "max_uses",
            format_args!("must be between 1 and {MAX_USES}"),
        ));
    }
    if new.ttl.is_zero() || new.ttl > MAX_TOKEN_TTL {
        return Err(ApiError::invalid(
            "ttl",
            "must be above 0 and at most 366 days",
        ));
    }
    let (token, secret) = state
        .blocking(move |registry| registry.create_provisioning_token(new))
        .await??;
    tracing::info!(token_id = %token.id, max_uses = token.max_uses, "provisioning token created");
    Ok(JsonResponse(
        StatusCode::CREATED,
        CreatedProvisioningToken { token, secret },
    ))
}

/// Lists provisioning tokens, without their secrets.
#[utoipa::path(get, path = "/api/v1/provisioning-tokens", tag = "provisioning",
    responses(
        (status = 200, description = "Every token", body = Vec<ProvisioningToken>),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin_token" = [])))]
pub async fn list(
    _admin: Admin,
    State(state): State<Arc<V1State>>,
) -> JsonResponse<Vec<ProvisioningToken>> {
    ok(state.registry.list_provisioning_tokens())
}

/// Revokes a provisioning token: no more registrations with it.
#[utoipa::path(delete, path = "/api/v1/provisioning-tokens/{id}", tag = "provisioning",
    params(("id" = String, Path, description = "Token id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, description = "Missing or wrong admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such token", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin_token" = [])))]
pub async fn revoke(
    _admin: Admin,
    State(state): State<Arc<V1State>>,
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    state
        .blocking(move |registry| registry.revoke_provisioning_token(&id))
        .await??;
    Ok(StatusCode::NO_CONTENT)
}
