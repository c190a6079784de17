//! HTTP ingestion, `POST /api/v1/devices/{id}/telemetry`: the pseudo-source `"http"`.
//!
//! A device with a valid access JWT (`sub` = the path id) posts one JSON object or an array
//! of them; each becomes an [`Event`] of kind `telemetry` (or the object's `"kind"`) that
//! enters the pipeline like a TCP frame, for every sink listing `"http"` in `inputs`.
//!
//! Invariants: authentication comes before the body is read; the body must be declared
//! `application/json` (415 otherwise) and is capped at [`MAX_BODY`] and [`MAX_EVENTS`];
//! `"kind":"status"` is refused (status is the gateway's word); 202 is answered only once
//! every event is in every sink's buffer (ack-driven, like a TCP source with `ack = true`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use bytes::Bytes;
use fieldgate_core::{DeviceId, Event, EventKind, PayloadFormat};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use super::extract::{ApiPath, ClientIp, JsonResponse, bearer};
use super::problem::{ApiError, MAX_ECHO, Problem, truncated};
use super::v1::{DEVICE_SOURCE, V1State};
use crate::clock::now_ms;
use crate::pipeline::{AckOutcome, SourceOutput};

/// The name of the HTTP ingestion source (`POST /api/v1/devices/{id}/telemetry`) that
/// sinks list in `inputs`; there with `[registry]`.
pub const HTTP_SOURCE: &str = "http";
/// Largest request body.
pub const MAX_BODY: usize = 1024 * 1024;
/// Most events in one request.
pub const MAX_EVENTS: usize = 1000;
/// How long the whole request body may take to arrive (1 MiB at 100 KB/s).
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request may wait for room in the pipeline and for the buffers' acks.
const STORE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where HTTP-ingested events go. Empty until the topology has built the sinks' intakes,
/// and emptied again at shutdown so the intakes can close.
#[derive(Default)]
pub struct IngestOutput {
    output: Mutex<Option<SourceOutput>>,
}

impl IngestOutput {
    /// Starts feeding `output` (the intakes of the sinks listing `"http"`).
    pub fn open(&self, output: SourceOutput) {
        if let Ok(mut slot) = self.output.lock() {
            *slot = Some(output);
        }
    }

    /// Stops accepting events; requests in flight finish with their own clone.
    pub fn close(&self) {
        if let Ok(mut slot) = self.output.lock() {
            *slot = None;
        }
    }

    fn current(&self) -> Option<SourceOutput> {
        self.output.lock().ok().and_then(|slot| slot.clone())
    }
}

/// `202` answer of the telemetry route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    /// Events stored.
    pub accepted: usize,
}

/// The fields of an ingested object the gateway reads; the rest is the device's business.
#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    ts: Option<u64>,
    #[serde(default)]
    device: Option<String>,
}

/// One JSON object (`{"temp": 21.5}`) or an array of them; `kind` (default `telemetry`)
/// and `ts` (device time, ms since the epoch) are read, everything is forwarded unchanged.
pub struct TelemetryBody;

impl utoipa::PartialSchema for TelemetryBody {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder};
        OneOfBuilder::new()
            .item(ObjectBuilder::new())
            .item(
                ArrayBuilder::new()
                    .items(ObjectBuilder::new())
                    .max_items(Some(MAX_EVENTS)),
            )
            .description(Some(
                "One event object or an array of them; optional `kind` and `ts` (ms)",
            ))
            .into()
    }
}

impl ToSchema for TelemetryBody {}

/// Sends telemetry for device `id` into the pipeline.
#[utoipa::path(post, path = "/api/v1/devices/{id}/telemetry", tag = "ingestion",
    params(("id" = String, Path, description = "Device id; must be the JWT's `sub`")),
    request_body(content = TelemetryBody, description = "One JSON object or an array of at most 1000 (1 MiB in all)", content_type = "application/json"),
    responses(
        (status = 202, description = "Every event is in every buffer", body = Accepted),
        (status = 400, description = "Not a JSON object or array of objects, or a bad `kind`/`ts`", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, malformed or expired JWT", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The JWT is another device's, or the device is revoked", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No sink lists `http` in `inputs`", body = Problem, content_type = "application/problem+json"),
        (status = 408, description = "The body did not arrive within 10 s", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over 1 MiB or over 1000 events", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not declared `Content-Type: application/json`", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many failed attempts from this address or for this device", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The pipeline did not store the events in time; retry", body = Problem, content_type = "application/problem+json"),
    ),
    security(("device_jwt" = [])))]
pub async fn telemetry(
    State(state): State<Arc<V1State>>,
    ClientIp(ip): ClientIp,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<JsonResponse<Accepted>, ApiError> {
    state.check_throttle(ip, Some(&id))?;
    authenticate(&state, ip, &id, &headers)?;
    if !is_json(&headers) {
        count_refusal(&state, "unsupported_media_type");
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Unsupported media type",
            "send the body with `Content-Type: application/json`",
        ));
    }

    let Some(output) = state.ingest.current() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "Not ready",
            "the gateway is starting or stopping",
        )
        .with_retry_after(Duration::from_secs(1)));
    };
    if !output.has_targets() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "ingest_disabled",
            "Ingestion disabled",
            format!("no sink or transform lists {HTTP_SOURCE:?} in `inputs`"),
        ));
    }

    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "Payload too large",
            format!("the body exceeds {MAX_BODY} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_BODY as u64) {
        return Err(too_large());
    }
    // A client that stops sending mid-body would otherwise hold this request (and the
    // pipeline's intakes, through `output`) forever.
    let Ok(body) = tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await
    else {
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "Request body timeout",
            format!("the body did not arrive within {BODY_TIMEOUT:?}"),
        ));
    };
    let body = body.map_err(|err| {
        let limited = std::error::Error::source(&err)
            .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
        if limited {
            too_large()
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_request",
                "Malformed request",
                format!("cannot read the body: {err}"),
            )
        }
    })?;

    let received_at_ms = now_ms();
    let events = parse_events(&id, &body, received_at_ms, &state.source_name)
        .inspect_err(|err| count_refusal(&state, err.code()))?;
    let count = events.len();
    let sizes: Vec<u64> = events
        .iter()
        .map(|event| event.payload.len() as u64)
        .collect();
    state.received.inc_by(count as u64);

    let store = async {
        let mut waiters = Vec::with_capacity(count);
        for event in events {
            if let Some(waiter) = output.send(event, true).await {
                waiters.push(waiter);
            }
        }
        for waiter in waiters {
            if let AckOutcome::Rejected(reason) = waiter.await {
                return Err(reason);
            }
        }
        Ok(())
    };
    match tokio::time::timeout(STORE_TIMEOUT, store).await {
        Ok(Ok(())) => {}
        Ok(Err(reason)) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_stored",
                "Not stored",
                format!("a sink's buffer refused the events ({reason}); send them again"),
            )
            .with_retry_after(Duration::from_secs(1)));
        }
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "pipeline_busy",
                "Pipeline busy",
                "the buffers did not take the events in time; send them again",
            )
            .with_retry_after(Duration::from_secs(1)));
        }
    }
    for size in sizes {
        state.registry.record_message(&id, size, received_at_ms);
    }
    Ok(JsonResponse(
        StatusCode::ACCEPTED,
        Accepted { accepted: count },
    ))
}

/// Whether the request declares a JSON body: `application/json`, parameters allowed.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

/// Counts a refused body in `fieldgate_protocol_parse_failures_total{source="http",reason}`
/// (the reason is the problem's stable code) and logs it.
fn count_refusal(state: &V1State, reason: &'static str) {
    state
        .metrics()
        .parse_failures
        .get_or_create(&crate::telemetry::metrics::ParseLabels {
            source: HTTP_SOURCE.to_owned(),
            reason: reason.to_owned(),
        })
        .inc();
    tracing::info!(source = HTTP_SOURCE, reason, "telemetry refused");
}

/// Checks the device JWT; counts and throttles a failure.
fn authenticate(
    state: &V1State,
    ip: std::net::IpAddr,
    id: &str,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    let failed = |err: ApiError| {
        state.auth_failed(ip, Some(id), DEVICE_SOURCE);
        err
    };
    let Some(token) = bearer(headers) else {
        return Err(failed(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing_token",
            "Missing token",
            "this route needs `Authorization: Bearer <device access token>`",
        )));
    };
    let subject = state
        .registry
        .authenticate_jwt(token)
        .map_err(|err| failed(err.into()))?;
    if subject != id {
        return Err(failed(ApiError::new(
            StatusCode::FORBIDDEN,
            "wrong_device",
            "Wrong device",
            format!("the token is not device {:?}'s", truncated(id, MAX_ECHO)),
        )));
    }
    Ok(())
}

/// Splits a body into events: pure, so it is tested without a server.
fn parse_events(
    id: &str,
    body: &Bytes,
    received_at_ms: u64,
    source: &Arc<str>,
) -> Result<Vec<Event>, ApiError> {
    let text = std::str::from_utf8(body).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "Invalid JSON",
            "the body is not UTF-8",
        )
    })?;
    let invalid_json = |err: serde_json::Error| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "Invalid JSON",
            format!("the body is not valid JSON: {err}"),
        )
    };
    let objects: Vec<&RawValue> = match text.trim_start().as_bytes().first() {
        Some(b'[') => serde_json::from_str(text).map_err(invalid_json)?,
        Some(b'{') => vec![serde_json::from_str(text).map_err(invalid_json)?],
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                "Invalid JSON",
                "the body must be a JSON object or an array of objects",
            ));
        }
    };
    if objects.len() > MAX_EVENTS {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_events",
            "Too many events",
            format!(
                "{} events in one request; at most {MAX_EVENTS}",
                objects.len()
            ),
        ));
    }
    let device = DeviceId::new(id);
    let mut events = Vec::with_capacity(objects.len());
    for (index, raw) in objects.into_iter().enumerate() {
        let field = |name: &str| format!("events[{index}].{name}");
        if !raw.get().starts_with('{') {
            return Err(ApiError::invalid(
                &format!("events[{index}]"),
                "not a JSON object",
            ));
        }
        let envelope: Envelope = serde_json::from_str(raw.get())
            .map_err(|err| ApiError::invalid(&format!("events[{index}]"), err))?;
        let kind = match envelope.kind.as_deref() {
            None => EventKind::Telemetry,
            Some("status") => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "reserved_kind",
                    "Reserved kind",
                    format!(
                        "{}: \"status\" is reserved: the gateway reports a device's status itself",
                        field("kind")
                    ),
                ));
            }
            Some(name) => EventKind::parse(name).ok_or_else(|| {
                ApiError::invalid(
                    &field("kind"),
                    "expected telemetry, alarm, command_result or event",
                )
            })?,
        };
        if envelope.device.as_deref().is_some_and(|named| named != id) {
            return Err(ApiError::invalid(
                &field("device"),
                format_args!("names another device than {id:?}"),
            ));
        }
        let payload = body.slice_ref(raw.get().as_bytes());
        let mut event = Event::new(
            device.clone(),
            kind,
            Arc::clone(source),
            received_at_ms,
            PayloadFormat::Json,
            payload,
        );
        event.device_time_ms = envelope.ts;
        events.push(event);
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Vec<Event>, ApiError> {
        parse_events(
            "dev-1",
            &Bytes::from(body.to_owned()),
            5,
            &Arc::from("http"),
        )
    }

    #[test]
    fn one_object_is_one_telemetry_event_with_its_bytes() {
        let events = parse(r#" {"temp": 21.5, "ts": 17} "#).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, EventKind::Telemetry);
        assert_eq!(events[0].device_time_ms, Some(17));
        assert_eq!(&events[0].payload[..], br#"{"temp": 21.5, "ts": 17}"#);
        assert_eq!(&*events[0].source, "http");
    }

    #[test]
    fn array_keeps_order_and_kinds() {
        let events =
            parse(r#"[{"a":1},{"kind":"alarm","b":2}]"#).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].kind, EventKind::Alarm);
        assert_eq!(&events[1].payload[..], br#"{"kind":"alarm","b":2}"#);
    }

    #[test]
    fn bad_bodies_are_400_with_codes() {
        for (body, code) in [
            ("", "invalid_json"),
            ("42", "invalid_json"),
            ("[1]", "invalid_field"),
            ("{\"kind\":\"nope\"}", "invalid_field"),
            ("{\"kind\":5}", "invalid_field"),
            ("{\"ts\":-1}", "invalid_field"),
            ("{\"device\":\"other\"}", "invalid_field"),
            ("{\"kind\":\"status\"}", "reserved_kind"),
            ("{", "invalid_json"),
        ] {
            let err = parse(body)
                .err()
                .unwrap_or_else(|| panic!("{body} accepted"));
            assert_eq!(err.code(), code, "{body}");
            assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{body}");
        }
    }

    #[test]
    fn only_a_json_content_type_is_json() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::CONTENT_TYPE,
                value.parse().unwrap_or_else(|e| panic!("{e}")),
            );
            is_json(&headers)
        };
        assert!(with("application/json"));
        assert!(with("Application/JSON; charset=utf-8"));
        assert!(!with("text/plain"));
        assert!(!with("application/jsonx"));
        assert!(!is_json(&HeaderMap::new()));
    }

    #[test]
    fn too_many_events_is_413() {
        let body = format!("[{}]", vec!["{}"; MAX_EVENTS + 1].join(","));
        let err = parse(&body).err().unwrap_or_else(|| panic!("accepted"));
        assert_eq!(err.code(), "too_many_events");
    }
}
