//! `POST /contacts?from=OUR_NUMBER` (a CSV file, or with `Content-Type:
//! application/json` a JSON list of `{phone, fields}`: import) and
//! `GET /contacts?from=OUR_NUMBER` (CSV: export), behind the admin token.
//! `GET /contacts` without `from` exports every contact of every number of
//! ours, with consent state and last activity (`format=csv|jsonl`).
//!
//! Answers: 200 JSON summary / CSV; 400 with every bad line or contact
//! (`{"errors":[{"line":N,"message":…}]}`, for JSON `{"index":N,…}`,
//! nothing imported); 401 without the token; 503 when the store fails.

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::starts::{admin_refusal, bad_input};
use super::{AppState, HttpError};
use crate::clock::unix_now;
use crate::contacts;
use crate::metrics::Metrics;
use crate::starts::normalize_phone;

/// The query both routes take.
#[derive(Debug, serde::Deserialize)]
pub(super) struct Our {
    from: Option<String>,
    /// The whole export's format (`csv`, `jsonl`), without `from`.
    format: Option<String>,
}

fn our_number(q: &Our) -> Result<String, String> {
    let raw = q.from.as_deref().unwrap_or("");
    normalize_phone(raw).map_err(|e| format!("from (our number): {e}"))
}

fn store_failure(state: &AppState, e: crate::store::StoreError) -> Response {
    Metrics::inc(&state.metrics.store_errors);
    tracing::error!(error = %e, "store failure with contacts");
    HttpError::unavailable().into_response()
}

pub(super) async fn import(
    State(state): State<AppState>,
    Query(q): Query<Our>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = admin_refusal(&state, &headers, "/contacts") {
        return r;
    }
    let our = match our_number(&q) {
        Ok(n) => n,
        Err(e) => return bad_input(&state, e),
    };
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
    let parsed = if json {
        contacts::parse_json(&body).map_err(|e| match e {
            contacts::JsonImportError::Body(reason) => Err(reason),
            contacts::JsonImportError::Items(errors) => Ok(serde_json::json!(errors)),
        })
    } else {
        contacts::parse_csv(&body).map_err(|errors| Ok(serde_json::json!(errors)))
    };
    let rows = match parsed {
        Ok(rows) => rows,
        Err(Err(reason)) => return bad_input(&state, reason),
        Err(Ok(errors)) => {
            Metrics::inc(&state.metrics.bad_requests);
            tracing::warn!(
                errors = errors.as_array().map_or(0, Vec::len),
                "rejected contact import"
            );
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(serde_json::json!({ "imported": 0, "errors": errors })),
            )
                .into_response();
        }
    };
    match state
        .pipeline
        .import_contacts(&our, &rows, unix_now())
        .await
    {
        Ok(summary) => {
            tracing::info!(rows = summary.rows, "contacts imported");
            axum::Json(summary).into_response()
        }
        Err(e) => store_failure(&state, e),
    }
}

pub(super) async fn export(
    State(state): State<AppState>,
    Query(q): Query<Our>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = admin_refusal(&state, &headers, "/contacts") {
        return r;
    }
    if q.from.is_none() {
        return export_all(&state, q.format.as_deref()).await;
    }
    let our = match our_number(&q) {
        Ok(n) => n,
        Err(e) => return bad_input(&state, e),
    };
    match state.pipeline.contacts_of(&our) {
        Ok(rows) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            contacts::export_csv(&rows),
        )
            .into_response(),
        Err(e) => store_failure(&state, e),
    }
}

/// Every contact of every number of ours (`GET /contacts` without `from`).
async fn export_all(state: &AppState, format: Option<&str>) -> Response {
    let jsonl = match format {
        None | Some("csv") => false,
        Some("jsonl") => true,
        Some(other) => return bad_input(state, format!("format {other:?}: csv or jsonl")),
    };
    let store = state.pipeline.store().clone();
    let rows = tokio::task::spawn_blocking(move || contacts::export_all(store.as_ref())).await;
    match rows {
        Ok(Ok(rows)) if jsonl => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/x-ndjson")],
            contacts::export_all_jsonl(&rows),
        )
            .into_response(),
        Ok(Ok(rows)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            contacts::export_all_csv(&rows),
        )
            .into_response(),
        Ok(Err(e)) => store_failure(state, e),
        Err(_) => HttpError::unavailable().into_response(),
    }
}
