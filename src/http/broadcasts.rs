//! `POST /broadcasts` (send a message or start a flow; 404 for an unknown
//! flow), `GET /broadcasts` (progress) and `POST /broadcasts/{id}/cancel`,
//! behind the admin token.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::starts::{admin_refusal, bad_input};
use super::{AppState, HttpError};
use crate::broadcasts::BroadcastRequest;
use crate::clock::unix_now;
use crate::metrics::Metrics;

fn store_failure(state: &AppState, e: crate::store::StoreError) -> Response {
    Metrics::inc(&state.metrics.store_errors);
    tracing::error!(error = %e, "store failure with broadcasts");
    HttpError::unavailable().into_response()
}

pub(super) async fn send(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = admin_refusal(&state, &headers, "/broadcasts") {
        return r;
    }
    let mut req: BroadcastRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_input(&state, format!("expected a JSON broadcast: {e}")),
    };
    if let Err(e) = req.validate() {
        return bad_input(&state, e);
    }
    match state.pipeline.broadcast(&req, unix_now()).await {
        Ok(None) => HttpError::new(StatusCode::NOT_FOUND, "no such flow")
            .with_detail(req.flow.unwrap_or_default())
            .into_response(),
        Ok(Some(sent)) => {
            tracing::info!(id = %sent.id, recipients = sent.recipients, enqueued = sent.enqueued, "broadcast");
            axum::Json(sent).into_response()
        }
        Err(e) => store_failure(&state, e),
    }
}

pub(super) async fn list(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(r) = admin_refusal(&state, &headers, "/broadcasts") {
        return r;
    }
    match state.pipeline.broadcasts() {
        Ok(rows) => axum::Json(serde_json::json!({ "broadcasts": rows })).into_response(),
        Err(e) => store_failure(&state, e),
    }
}

pub(super) async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = admin_refusal(&state, &headers, "/broadcasts") {
        return r;
    }
    match state.pipeline.cancel_broadcast(&id, unix_now()).await {
        Ok(Some(n)) => axum::Json(serde_json::json!({ "id": id, "canceled": n })).into_response(),
        Ok(None) => HttpError::new(StatusCode::NOT_FOUND, "no such broadcast")
            .with_detail(id)
            .into_response(),
        Err(e) => store_failure(&state, e),
    }
}
