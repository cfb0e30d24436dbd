//! `GET /flows/{name}/results?format=csv|jsonl&since=…` (the flow's
//! results export) and `DELETE /contacts/{number}` (erase one contact),
//! behind the admin token.
//!
//! Answers: 200 with CSV or JSON lines / a JSON summary of what was
//! erased; 400 for a bad `since`, `format` or number; 401 without the
//! token; 503 when the store fails.

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::starts::{admin_refusal, bad_input};
use super::{AppState, HttpError};
use crate::clock::unix_now;
use crate::metrics::Metrics;
use crate::results::{self, Format};
use crate::starts::normalize_phone;

/// The query of the results export.
#[derive(Debug, serde::Deserialize)]
pub(super) struct ResultsQuery {
    format: Option<String>,
    since: Option<String>,
}

fn store_failure(state: &AppState, e: crate::store::StoreError, what: &str) -> Response {
    Metrics::inc(&state.metrics.store_errors);
    tracing::error!(error = %e, what, "store failure");
    HttpError::unavailable().into_response()
}

pub(super) async fn export(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<ResultsQuery>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = admin_refusal(&state, &headers, "/flows/{name}/results") {
        return r;
    }
    let format = match q.format.as_deref() {
        None | Some("csv") => Format::Csv,
        Some("jsonl") => Format::Jsonl,
        Some(other) => return bad_input(&state, format!("format {other:?}: csv or jsonl")),
    };
    let since = match q.since.as_deref().map(results::parse_since) {
        None => 0,
        Some(Ok(t)) => t,
        Some(Err(e)) => return bad_input(&state, format!("since: {e}")),
    };
    let store = state.pipeline.store().clone();
    let exported =
        tokio::task::spawn_blocking(move || results::export(store.as_ref(), &name, since, format))
            .await;
    match exported {
        Ok(Ok(body)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, format.content_type())],
            body,
        )
            .into_response(),
        Ok(Err(e)) => store_failure(&state, e, "exporting results"),
        Err(_) => HttpError::unavailable().into_response(),
    }
}

pub(super) async fn forget(
    State(state): State<AppState>,
    Path(number): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = admin_refusal(&state, &headers, "/contacts/{number}") {
        return r;
    }
    let number = match normalize_phone(&number) {
        Ok(n) => n,
        Err(e) => return bad_input(&state, format!("number: {e}")),
    };
    match state
        .pipeline
        .forget_contact(&number, "admin api", unix_now())
        .await
    {
        Ok(gone) => axum::Json(serde_json::json!({ "forgotten": gone })).into_response(),
        Err(e) => store_failure(&state, e, "forgetting a contact"),
    }
}
