//! `POST /flows/{name}/start` (behind the admin token): start a flow for a
//! contact. JSON in ([`crate::starts::StartRequest`]), JSON out (the start
//! record and whether the key was used before).
//!
//! Answers: 201 started; 200 a repeated key (the first result, with
//! `"duplicate": true`) or `skipped_busy`; 409 `opted_out`, or a key
//! already used for a different flow or contact; 400 bad input; 401
//! without the token; 404 unknown flow (or no admin token configured);
//! 503 when the store fails.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{bearer_matches, AppState, HttpError};
use crate::clock::unix_now;
use crate::metrics::Metrics;
use crate::starts::{StartOutcome, StartRequest};

/// The admin token check shared by the admin write endpoints: the
/// refusal, if any: 404 when no token is configured, 401 (with
/// `WWW-Authenticate`) when it does not match.
pub(super) fn admin_refusal(state: &AppState, headers: &HeaderMap, what: &str) -> Option<Response> {
    let Some(expected) = &state.admin_token else {
        return Some(
            HttpError::new(
                StatusCode::NOT_FOUND,
                "not enabled (set SMSFLOW_ADMIN_TOKEN)",
            )
            .into_response(),
        );
    };
    if !bearer_matches(expected, headers) {
        tracing::warn!(
            header_present = headers.contains_key(header::AUTHORIZATION),
            path = what,
            "rejected admin request: bad token"
        );
        let mut r = HttpError::new(StatusCode::UNAUTHORIZED, "unauthorized").into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer"),
        );
        return Some(r);
    }
    None
}

/// A 400 with a reason about the caller's input (no internals).
pub(super) fn bad_input(state: &AppState, detail: String) -> Response {
    Metrics::inc(&state.metrics.bad_requests);
    tracing::warn!(detail = %detail, "rejected admin request: bad input");
    HttpError::new(StatusCode::BAD_REQUEST, "bad request")
        .with_detail(detail)
        .into_response()
}

pub(super) async fn start_flow(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = admin_refusal(&state, &headers, "/flows/{name}/start") {
        return r;
    }
    let mut req: StartRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_input(&state, format!("expected a JSON start request: {e}")),
    };
    if let Err(e) = req.validate() {
        return bad_input(&state, e);
    }
    match state.pipeline.start_flow(&name, &req, unix_now()).await {
        Ok(StartOutcome::UnknownFlow) => HttpError::new(StatusCode::NOT_FOUND, "no such flow")
            .with_detail(name)
            .into_response(),
        Ok(StartOutcome::Done { record, duplicate }) => {
            if duplicate && (record.flow != name || record.to != req.to || record.from != req.from)
            {
                return HttpError::new(
                    StatusCode::CONFLICT,
                    "idempotency_key already used for a different start",
                )
                .with_detail(format!("flow {} to {}", record.flow, record.to))
                .into_response();
            }
            let code = match record.result.as_str() {
                "opted_out" => StatusCode::CONFLICT,
                "started" if !duplicate => StatusCode::CREATED,
                "queued" if !duplicate => StatusCode::ACCEPTED,
                _ => StatusCode::OK,
            };
            let mut body = serde_json::to_value(&record).unwrap_or_default();
            body["duplicate"] = duplicate.into();
            (code, axum::Json(body)).into_response()
        }
        Err(e) => {
            Metrics::inc(&state.metrics.store_errors);
            tracing::error!(error = %e, "store failure starting a flow");
            HttpError::unavailable().into_response()
        }
    }
}
