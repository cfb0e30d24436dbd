//! The HTTP edge: axum router, request checks, error-to-status mapping.
//!
//! Every webhook goes through the same gate, in this order: header size
//! (→ 431) and declared body size (→ 413, before the body is read), content
//! type, body size (axum's limit → 413), form parsing and its parameter
//! count (→ 400), signature over the configured public URL joined with the
//! raw request target (→ 403), typed parameters (→ 400). Only then does the
//! pipeline run. Client mistakes get a short plain-text reason and a log
//! line; nothing here panics on input and no response body carries
//! internals. Connections themselves (timeouts, the connection limit) are
//! [`serve`]'s. This module knows no sled and no Rhai.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tracing::Instrument;

use crate::clock::unix_now;
use crate::config::{Auth, Config};
use crate::metrics::{self, Endpoint, Metrics, Sample};
use crate::pipeline::{Pipeline, ReplyLink};
use crate::store::{AnyStore, StatusUpdate, StoreHealth};
use crate::telemetry::PhoneLog;
use crate::twilio::{self, InboundMessage, Params, RequestValidator, StatusCallback};

mod broadcasts;
mod contacts;
mod results;
mod serve;
mod starts;
pub use serve::{serve, ConnectionLimits};

/// State shared by all handlers: one `Arc`, so that handing it to each
/// request (axum clones the state per request) is one reference count
/// rather than one per field.
#[derive(Clone)]
pub struct AppState(Arc<AppStateFields>);

impl std::ops::Deref for AppState {
    type Target = AppStateFields;

    fn deref(&self) -> &AppStateFields {
        &self.0
    }
}

/// What [`AppState`] holds.
pub struct AppStateFields {
    pub pipeline: Arc<Pipeline<AnyStore>>,
    pub metrics: Arc<Metrics>,
    /// `None` only in the explicit insecure mode.
    pub validator: Option<Arc<RequestValidator>>,
    pub public_url: Arc<str>,
    /// The detailed status (`/status` with the admin token).
    pub status: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
    /// Bearer token for `/messages` and `/status` detail; `None` turns
    /// `/messages` off.
    pub admin_token: Option<Arc<str>>,
    /// Set when shutdown begins: `/readyz` answers 503 from then on.
    pub shutting_down: Arc<AtomicBool>,
    /// How phone numbers appear in the info-level spans.
    pub phones: Arc<PhoneLog>,
}

impl AppState {
    pub fn new(
        config: &Config,
        pipeline: Arc<Pipeline<AnyStore>>,
        metrics: Arc<Metrics>,
        status: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
        shutting_down: Arc<AtomicBool>,
        phones: Arc<PhoneLog>,
    ) -> Self {
        let validator = match &config.auth {
            Auth::Verify(token) => Some(Arc::new(RequestValidator::new(token.expose()))),
            Auth::Insecure => None,
        };
        AppState(Arc::new(AppStateFields {
            pipeline,
            metrics,
            validator,
            public_url: config.public_url.as_str().into(),
            status,
            admin_token: config.admin_token.as_ref().map(|t| t.expose().into()),
            shutting_down,
            phones,
        }))
    }
}

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// Everything on one address (no `--admin-listen`).
    All,
    /// The webhooks and the probes; admin paths are 404 and `/healthz`
    /// never shows the admin detail.
    Public,
    /// The probes, `/status`, `/metrics`, `/messages` and the admin
    /// endpoints (`/flows/{name}/start`, `/contacts`, `/broadcasts`); no
    /// webhooks.
    Admin,
}

pub fn router(state: AppState, max_body_bytes: usize, surface: Surface) -> Router {
    let mut router = Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz));
    if surface != Surface::Admin {
        router = router
            // axum would answer HEAD with the GET handler minus the body, which
            // here means running a flow; HEAD and other methods get 405.
            .route(
                SMS_PATH,
                get(sms_get)
                    .post(sms_post)
                    .head(sms_other_method)
                    .fallback(sms_other_method),
            )
            .route("/twilio/status", axum::routing::post(status_post));
    }
    if surface == Surface::Public {
        router = router.route("/healthz", get(status_brief));
    } else {
        router = router
            .route("/healthz", get(status_json))
            .route("/status", get(status_json))
            .route("/metrics", get(metrics))
            .route("/messages", get(messages))
            .route(
                "/flows/{name}/start",
                axum::routing::post(starts::start_flow),
            )
            .route("/contacts", get(contacts::export).post(contacts::import))
            .route("/flows/{name}/results", get(results::export))
            .route("/contacts/{number}", axum::routing::delete(results::forget))
            .route("/broadcasts", get(broadcasts::list).post(broadcasts::send))
            .route(
                "/broadcasts/{id}/cancel",
                axum::routing::post(broadcasts::cancel),
            );
    }
    router
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// The webhook Twilio posts every inbound message to.
const SMS_PATH: &str = "/twilio/sms";

/// What one listener serves: its router, with [`with_hygiene`] applied,
/// and unless it is the admin listener, the inbound webhook's POST called
/// directly. The direct route runs the same hygiene and the same handler
/// (`sms_post`) with the same body limit and the same refusals as the
/// router would, without the router's work per request (boxing and
/// cloning the route and the middleware, copying the head for the
/// extractors): 5% of the instructions of a message (callgrind, README
/// "Performance"). Every other request, including other methods on the
/// webhook's path, goes through the router.
#[derive(Clone)]
pub struct Routes {
    router: Router,
    /// The direct webhook route's state and hygiene; `None` on the admin
    /// listener.
    sms: Option<(AppState, Hygiene)>,
}

impl Routes {
    /// The routes of `surface`: [`router`] within [`with_hygiene`], and
    /// the direct webhook route where the surface has the webhook.
    pub fn new(state: AppState, hygiene: Hygiene, surface: Surface) -> Routes {
        let router = with_hygiene(
            router(state.clone(), hygiene.max_body_bytes, surface),
            hygiene,
        );
        let sms = (surface != Surface::Admin).then_some((state, hygiene));
        Routes { router, sms }
    }

    /// The response to `req`. Only what answers it is cloned: the state
    /// for the webhook, the router for everything else.
    pub(crate) fn respond(
        &self,
        req: axum::extract::Request,
    ) -> impl Future<Output = Response> + Send + 'static {
        enum To {
            Webhook(AppState, Hygiene),
            Router(Router),
        }
        let to = match &self.sms {
            Some((state, hygiene))
                if req.method() == axum::http::Method::POST && req.uri().path() == SMS_PATH =>
            {
                To::Webhook(state.clone(), *hygiene)
            }
            _ => To::Router(self.router.clone()),
        };
        async move {
            match to {
                To::Webhook(state, hygiene) => {
                    let limit = hygiene.max_body_bytes;
                    hygienic(req, hygiene, move |req| sms_direct(state, limit, req)).await
                }
                To::Router(router) => match tower::ServiceExt::oneshot(router, req).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                },
            }
        }
    }
}

/// `POST /twilio/sms` as the router runs it: the body read by axum's own
/// extractor under the router's body limit layer (the limit, and the
/// router's 413 past it), then [`sms_post`].
async fn sms_direct(state: AppState, limit: usize, req: axum::extract::Request) -> Response {
    use axum::extract::FromRequest;
    use tower::{Layer, ServiceExt};
    let (parts, body) = req.into_parts();
    let read = DefaultBodyLimit::max(limit).layer(tower::service_fn(
        |req: axum::extract::Request| async move {
            Ok::<_, std::convert::Infallible>(Bytes::from_request(req, &()).await)
        },
    ));
    let body = match read.oneshot(axum::extract::Request::new(body)).await {
        Ok(Ok(body)) => body,
        Ok(Err(rejection)) => return rejection.into_response(),
        Err(never) => match never {},
    };
    // Boxed, as the router boxes a handler: the handler's future holds the
    // whole pipeline's, and moving it inline through the hygiene and the
    // connection's futures cost more (memcpy) than the router saved.
    Box::pin(sms_post(State(state), parts.uri, parts.headers, body))
        .await
        .into_response()
}

/// A refusal with a short, safe reason.
#[derive(Debug)]
pub struct HttpError {
    status: StatusCode,
    reason: &'static str,
    detail: Option<String>,
}

impl HttpError {
    /// 503 for our own failures (store, time limit): the client may retry;
    /// nothing about the cause is revealed.
    fn unavailable() -> Self {
        HttpError::new(StatusCode::SERVICE_UNAVAILABLE, "temporarily unavailable")
    }

    fn new(status: StatusCode, reason: &'static str) -> Self {
        HttpError {
            status,
            reason,
            detail: None,
        }
    }
    fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = match &self.detail {
            // Details are our own parser messages about the client's input
            // (e.g. "missing parameter From"), never internals.
            Some(d) => format!("{}: {}\n", self.reason, d),
            None => format!("{}\n", self.reason),
        };
        (
            self.status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            body,
        )
            .into_response()
    }
}

fn twiml_response(twiml: String) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/xml; charset=utf-8")],
        twiml,
    )
        .into_response()
}

impl AppState {
    /// The URL Twilio signed: the configured public base joined with the raw
    /// path and query exactly as received (never re-encoded).
    fn signed_url(&self, uri: &Uri) -> String {
        let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        format!("{}{}", self.public_url, pq)
    }

    fn verify(&self, uri: &Uri, headers: &HeaderMap, params: &Params) -> Result<(), HttpError> {
        let Some(validator) = &self.validator else {
            return Ok(());
        };
        let signature = headers
            .get("x-twilio-signature")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if signature.is_empty() || !validator.validate(&self.signed_url(uri), params, signature) {
            Metrics::inc(&self.metrics.rejected_signatures);
            tracing::warn!(
                path = uri.path(),
                header_present = !signature.is_empty(),
                "rejected webhook: signature missing or invalid"
            );
            return Err(HttpError::new(StatusCode::FORBIDDEN, "forbidden"));
        }
        Ok(())
    }

    fn bad_request(&self, reason: &'static str, detail: String) -> HttpError {
        Metrics::inc(&self.metrics.bad_requests);
        tracing::warn!(reason, detail = %detail, "rejected webhook: bad request");
        HttpError::new(StatusCode::BAD_REQUEST, reason).with_detail(detail)
    }
}

fn require_form(state: &AppState, headers: &HeaderMap) -> Result<(), HttpError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if mime.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Ok(());
    }
    Metrics::inc(&state.metrics.bad_requests);
    tracing::warn!(
        content_type = ct,
        "rejected webhook: unsupported content type"
    );
    Err(HttpError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "expected application/x-www-form-urlencoded",
    ))
}

/// The gate every POST webhook passes: form content type, decodable body,
/// valid signature over the public URL and the raw request target.
fn signed_form(
    state: &AppState,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Params, HttpError> {
    require_form(state, headers)?;
    let params = twilio::parse_form(body)
        .map_err(|e| state.bad_request("malformed form body", e.to_string()))?;
    state.verify(uri, headers, &params)?;
    Ok(params)
}

async fn sms_post(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, HttpError> {
    let params = signed_form(&state, &uri, &headers, &body)?;
    // Freed here, by the thread that read the request, rather than after
    // the flush by whichever thread resumes (see
    // `Pipeline::handle_inbound_owned`).
    drop((uri, headers, body));
    inbound(state, params).await
}

async fn sms_get(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    let query = uri.query().unwrap_or("");
    let params = twilio::parse_form(query.as_bytes())
        .map_err(|e| state.bad_request("malformed query string", e.to_string()))?;
    // For GET, Twilio's parameters are part of the signed URL; no POST
    // parameters are appended to the signed string.
    state.verify(&uri, &headers, &Vec::new())?;
    inbound(state, params).await
}

/// 405 with the methods `/twilio/sms` does accept.
async fn sms_other_method() -> Response {
    let mut r =
        HttpError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed").into_response();
    r.headers_mut().insert(
        header::ALLOW,
        axum::http::HeaderValue::from_static("GET, POST"),
    );
    r
}

async fn inbound(state: AppState, params: Params) -> Result<Response, HttpError> {
    let started = Instant::now();
    let msg = InboundMessage::from_params(params)
        .map_err(|e| state.bad_request("invalid webhook parameters", e.to_string()))?;
    Metrics::inc(&state.metrics.messages_received);
    let span = tracing::info_span!(
        "sms",
        message_sid = %msg.message_sid,
        from = %state.phones.show(&msg.from),
    );
    let result = async {
        tracing::debug!(from = %msg.from, to = %msg.to, body = %msg.body, "inbound message");
        state
            .pipeline
            .handle_inbound_owned(msg, unix_now())
            .await
            .inspect_err(|e| {
                Metrics::inc(&state.metrics.store_errors);
                // The span names the message.
                tracing::error!(error = %e, "store failure");
            })
    }
    .instrument(span)
    .await;
    state.metrics.observe(Endpoint::Sms, started.elapsed());
    match result {
        Ok(answer) => Ok(twiml_response(answer.twiml)),
        Err(_) => Err(HttpError::unavailable()),
    }
}

async fn status_post(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, HttpError> {
    let started = Instant::now();
    let params = signed_form(&state, &uri, &headers, &body)?;
    let cb = StatusCallback::from_params(params)
        .map_err(|e| state.bad_request("invalid status callback", e.to_string()))?;
    Metrics::inc(&state.metrics.status_callbacks);
    state
        .metrics
        .delivery_status(cb.status.as_str(), cb.error_code.as_deref());
    let span = tracing::info_span!(
        "status",
        message_sid = %cb.message_sid,
        to = %state.phones.show(cb.to.as_deref().unwrap_or("")),
    );
    // The reply's origin, which we put in the callback URL's query.
    let query = twilio::parse_form(uri.query().unwrap_or("").as_bytes()).unwrap_or_default();
    let tag = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let link = ReplyLink {
        inbound_sid: tag("inbound"),
        flow: tag("flow"),
        step: tag("step"),
    };
    let result = state
        .pipeline
        .record_status(&cb, link, unix_now())
        .instrument(span)
        .await;
    state.metrics.observe(Endpoint::Status, started.elapsed());
    match result {
        Ok(update) => {
            match update {
                StatusUpdate::Applied => tracing::info!(
                    message_sid = %cb.message_sid,
                    status = cb.status.as_str(),
                    error_code = cb.error_code.as_deref().unwrap_or(""),
                    "delivery status recorded"
                ),
                StatusUpdate::Stale { current } => tracing::info!(
                    message_sid = %cb.message_sid,
                    status = cb.status.as_str(),
                    current = %current,
                    "late status callback ignored"
                ),
            }
            Ok(twiml_response(twilio::SILENCE.to_string()))
        }
        Err(e) => {
            Metrics::inc(&state.metrics.store_errors);
            tracing::error!(error = %e, "store failure recording status");
            Err(HttpError::unavailable())
        }
    }
}

/// `GET /livez`: the process is up and serving HTTP. Touches nothing.
async fn livez() -> Response {
    axum::Json(serde_json::json!({ "status": "ok" })).into_response()
}

/// Whether this server should be sent traffic, and why not; constant time
/// (no store access beyond counters the store maintains).
struct Readiness {
    problems: Vec<&'static str>,
    store: StoreHealth,
}

impl Readiness {
    fn of(state: &AppState) -> Self {
        let store = state.pipeline.store().health();
        let mut problems = Vec::new();
        if state.shutting_down.load(Ordering::SeqCst) {
            problems.push("shutting_down");
        }
        if !store.writable {
            problems.push("store_failed");
        }
        Readiness { problems, store }
    }

    fn code(&self) -> StatusCode {
        if self.problems.is_empty() {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

/// `GET /readyz`: 200 when a flow set is live and the store takes writes;
/// 503 while shutting down or while the store is failing. Records kept
/// aside because they did not decode are reported (they need an
/// operator's look) without taking the server out of service.
async fn readyz(State(state): State<AppState>) -> Response {
    let r = Readiness::of(&state);
    let body = serde_json::json!({
        "status": if r.problems.is_empty() { "ready" } else { "not_ready" },
        "problems": r.problems,
        "flows_loaded": true,
        "store": {
            "writable": r.store.writable,
            "quarantined_records": r.store.quarantined,
        },
    });
    (r.code(), axum::Json(body)).into_response()
}

/// `GET /status` and `GET /healthz`: ok or not, and the flow set version;
/// with the admin token (`Authorization: Bearer`), the full detail (paths,
/// reload errors, store state). Constant time either way.
async fn status_json(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let admin = state
        .admin_token
        .as_deref()
        .is_some_and(|expected| bearer_matches(expected, &headers));
    status_response(&state, admin)
}

/// `GET /healthz` on the public address when the admin routes have their
/// own: ok or not and the flow set version, whatever the headers say.
async fn status_brief(State(state): State<AppState>) -> Response {
    status_response(&state, false)
}

fn status_response(state: &AppState, admin: bool) -> Response {
    let r = Readiness::of(state);
    let status = if r.problems.is_empty() {
        "ok"
    } else {
        "unavailable"
    };
    let body = if admin {
        let mut detail = (state.status)();
        detail["status"] = status.into();
        detail["problems"] = r.problems.clone().into();
        detail
    } else {
        let version = state.pipeline.flows().load().version().to_string();
        serde_json::json!({ "status": status, "flows": { "version": version } })
    };
    (r.code(), axum::Json(body)).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    let store = state.pipeline.store().health();
    let samples = [
        Sample::gauge(
            "smsflow_store_writable",
            "1 while the store takes writes; 0 after a failure, until it has reopened itself.",
            u64::from(store.writable),
        ),
        Sample::gauge(
            "smsflow_store_quarantined_records",
            "Undecodable records kept aside in the data directory's quarantine/.",
            store.quarantined,
        ),
        Sample::gauge(
            "smsflow_conversations",
            "Stored conversations holding state.",
            store.conversations as u64,
        ),
        Sample::gauge(
            "smsflow_timers_pending",
            "Conversations with a pending timer (a waiting step's timeout or a script's wake).",
            store.pending_timers as u64,
        ),
        Sample::counter(
            "smsflow_store_reopens_total",
            "Times the store reopened itself after a failure.",
            store.reopens,
        ),
        Sample::counter(
            "smsflow_store_fsyncs_total",
            "Grouped fsyncs of the store's files.",
            store.fsyncs,
        ),
        Sample::counter(
            "smsflow_results_moved_total",
            "Flow results the embedded store moved from its database to their files.",
            store.results_moved,
        ),
        Sample::counter(
            "smsflow_results_move_failures_total",
            "Moves of flow results to their files that failed (the results stay in the database).",
            store.results_move_failures,
        ),
        Sample::gauge(
            "smsflow_outbox_depth",
            "Messages we send on our own that wait in the outbox or are being sent.",
            crate::store::Store::outbox_depth(state.pipeline.store().as_ref()) as u64,
        ),
        Sample::gauge(
            "smsflow_call_jobs_pending",
            "After-answer HTTP calls recorded and not yet delivered or given up.",
            crate::store::Store::call_jobs_pending(state.pipeline.store().as_ref()) as u64,
        ),
    ];
    let mut text = state.metrics.render(&samples);
    state.pipeline.store().flush_latency().write(
        &mut text,
        "smsflow_store_flush_duration_seconds",
        "Time each grouped store flush (sled's flush and the fsyncs) took.",
    );
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        text,
    )
        .into_response()
}

/// Whether the request carries `Authorization: Bearer <expected>`
/// (compared in constant time).
fn bearer_matches(expected: &str, headers: &HeaderMap) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    use subtle::ConstantTimeEq;
    bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

/// `GET /messages?number=&status=&limit=`: the message log as JSON, behind
/// `Authorization: Bearer <admin token>`.
async fn messages(
    State(state): State<AppState>,
    headers: HeaderMap,
    axum::extract::Query(filter): axum::extract::Query<crate::messages::Filter>,
) -> Result<Response, HttpError> {
    let Some(expected) = &state.admin_token else {
        return Err(HttpError::new(
            StatusCode::NOT_FOUND,
            "not enabled (set SMSFLOW_ADMIN_TOKEN)",
        ));
    };
    if !bearer_matches(expected, &headers) {
        tracing::warn!(
            header_present = headers.contains_key(header::AUTHORIZATION),
            "rejected /messages: bad token"
        );
        let mut r = HttpError::new(StatusCode::UNAUTHORIZED, "unauthorized").into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer"),
        );
        return Ok(r);
    }
    match crate::messages::list(state.pipeline.store().as_ref(), &filter) {
        Ok(rows) => Ok(axum::Json(serde_json::json!({ "messages": rows })).into_response()),
        Err(e) => {
            tracing::error!(error = %e, "store failure listing messages");
            Err(HttpError::unavailable())
        }
    }
}

/// Bounds for slow or abusive clients, applied around every route.
#[derive(Debug, Clone, Copy)]
pub struct Hygiene {
    /// Whole-request time limit (reading the body included), well under
    /// Twilio's 15 s; past it the client gets 503 and the work is dropped
    /// before anything is committed or answered.
    pub request_timeout: std::time::Duration,
    /// Largest total size of request headers; Twilio sends about 1 KiB.
    pub max_header_bytes: usize,
    /// Largest request body (the router's body limit enforces it as the
    /// body arrives; a larger declared `Content-Length` is refused before).
    pub max_body_bytes: usize,
}

pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Apply [`Hygiene`] to a router: 431 for oversized headers, 413 for a
/// declared body over the limit (without waiting for it), 503 when the time
/// limit passes.
///
/// A 413 or 431, from these checks or from the body limit part way
/// through a body, leaves the rest of the request unread: hyper closes the
/// connection after it, and `Connection: close` says so. Otherwise a
/// client that reuses the connection writes its next request into a
/// socket the server has already closed (a broken pipe).
pub fn with_hygiene(router: Router, h: Hygiene) -> Router {
    router.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            hygienic(req, h, move |req| next.run(req))
        },
    ))
}

/// [`Hygiene`] around `route`, for [`with_hygiene`] and the webhook's
/// direct route ([`Routes`]).
async fn hygienic<F, Fut>(req: axum::extract::Request, h: Hygiene, route: F) -> Response
where
    F: FnOnce(axum::extract::Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let mut resp = hygiene(req, h, route).await;
    if matches!(
        resp.status(),
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    ) {
        resp.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    resp
}

/// The checks of [`with_hygiene`], then the route within the time limit.
async fn hygiene<F, Fut>(req: axum::extract::Request, h: Hygiene, route: F) -> Response
where
    F: FnOnce(axum::extract::Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if header_bytes > h.max_header_bytes {
        tracing::warn!(header_bytes, "rejected request: headers too large");
        return HttpError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request headers too large",
        )
        .into_response();
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > h.max_body_bytes as u64) {
        tracing::warn!(
            content_length = declared,
            "rejected request: declared body too large"
        );
        return HttpError::new(StatusCode::PAYLOAD_TOO_LARGE, "request body too large")
            .into_response();
    }
    let method = req.method().clone();
    let uri = req.uri().clone();
    match tokio::time::timeout(h.request_timeout, route(req)).await {
        Ok(resp) => resp,
        Err(_) => {
            // A slow or stalled client, not a fault of ours: one
            // warning each, never an error.
            tracing::warn!(%method, path = uri.path(), "request time limit exceeded");
            HttpError::unavailable().into_response()
        }
    }
}
