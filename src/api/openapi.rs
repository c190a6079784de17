//! The OpenAPI 3 document of `/api/v1`, generated from the handlers' annotations and the
//! registry's types so it cannot drift from the code; served at `GET /api/v1/openapi.json`.

use axum::http::header;
use axum::response::IntoResponse;
use fieldgate_registry::{
    Challenge, Command, CommandState, Device, DevicePage, DevicePatch, DeviceStatus, NewCommand,
    NewDevice, NewProvisioningToken, Provisioned, ProvisioningToken, Registration, Tokens,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::admin::JwtKeyRotated;
use super::alarms::AlarmList;
use super::devices::DeviceStatusView;
use super::ingest::{Accepted, TelemetryBody};
use super::problem::Problem;
use super::provisioning::CreatedProvisioningToken;
use super::registration::RefreshRequest;
use super::{admin, alarms, commands, devices, ingest, provisioning, registration};
use crate::transforms::alarm::{ActionFailure, Alarm, AlarmState};

/// The document; `ApiDoc::openapi()` builds it.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "fieldgate device registry API",
        description = "Devices, provisioning tokens, self-registration, commands and HTTP ingestion. \
            Errors are `application/problem+json` with a stable `code`.",
    ),
    paths(
        devices::create, devices::list, devices::get, devices::patch, devices::delete,
        devices::rotate, devices::revoke, devices::status,
        commands::submit, commands::list, commands::get,
        provisioning::create, provisioning::list, provisioning::revoke,
        registration::challenge, registration::register, registration::refresh,
        ingest::telemetry,
        admin::rotate_jwt_key,
        alarms::list, alarms::acknowledge,
    ),
    components(schemas(
        Problem, Device, DevicePage, DevicePatch, DeviceStatus, DeviceStatusView, NewDevice,
        Provisioned, Tokens, NewProvisioningToken, ProvisioningToken, CreatedProvisioningToken,
        Challenge, Registration, RefreshRequest, NewCommand, Command, CommandState, Accepted,
        TelemetryBody, JwtKeyRotated, Alarm, AlarmState, AlarmList, ActionFailure,
    )),
    modifiers(&SecuritySchemes),
    tags(
        (name = "devices", description = "Registered devices (admin)"),
        (name = "commands", description = "Commands to devices (admin)"),
        (name = "provisioning", description = "Provisioning tokens (admin)"),
        (name = "registration", description = "Device self-registration and token refresh (public)"),
        (name = "ingestion", description = "Telemetry over HTTP (device JWT)"),
        (name = "alarms", description = "Alarms of the alarm transforms (admin)"),
    ),
)]
pub struct ApiDoc;

/// Declares the two bearer schemes the paths refer to.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("`api.admin_token` from the gateway config"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "device_jwt",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "A device access token from register, rotate or refresh",
                    ))
                    .build(),
            ),
        );
    }
}

/// `GET /api/v1/openapi.json`.
pub async fn document() -> impl IntoResponse {
    let body = ApiDoc::openapi().to_json().unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], body)
}
