//! HTTP calls from flows, as the engine sees them: a step's `call:` as
//! loaded (`Call`), the request the engine asks for ([`CallRequest`]),
//! the answer it is given back ([`CallResponse`]), and how an answer
//! becomes `{{call.*}}` variables and a route.
//!
//! The engine makes no request. Reaching a call it has no answer for, it
//! stops and hands the rendered request back in [`Handled::call`]; the
//! caller (the pipeline) makes it and runs the engine again on the same
//! input with the answers so far ([`handle_with_calls`]). The engine is
//! pure, so the second run reaches the same call with the same request
//! and, this time, goes on with its answer. This module knows neither
//! HTTP clients nor secrets' values: a secret header is only its name
//! here, and the caller reads the environment.
//!
//! [`Handled::call`]: super::Handled::call
//! [`handle_with_calls`]: super::handle_with_calls

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde_json::Value;

use super::model::{Pos, Target};
use super::template::{Template, Var};

/// At most this many calls per message (or timer firing); further calls
/// fail without a request (and take their `on_error`). A guard against a
/// `goto` loop through a call, on top of the time budget.
pub const MAX_CALLS_PER_MESSAGE: usize = 8;

/// The longest `timeout:` a call may ask for, in milliseconds. The
/// per-message budget (`call_budget`) caps it further at run time.
pub const MAX_CALL_TIMEOUT_MS: u64 = 10_000;

/// A call's timeout when its `timeout:` is not given, in milliseconds.
pub const DEFAULT_CALL_TIMEOUT_MS: u64 = 5_000;

/// The methods a call may use.
pub(crate) const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE"];

/// A step's `call:`, validated.
#[derive(Clone, Debug)]
pub(crate) struct Call {
    pub method: String,
    pub url: Template,
    pub headers: Vec<(String, HeaderSpec)>,
    pub body: BodySpec,
    pub timeout_ms: u64,
    /// `save:`: a run variable or contact field, and the path of the
    /// answer (`status`, `json.order.eta`) it gets.
    pub save: Vec<(Var, String)>,
    /// `on_error:`; `None` only for an `after_answer` call (it has no
    /// answer to route on).
    pub on_error: Option<Target>,
    /// `after_answer: true`: not awaited; recorded as a durable job and
    /// made after the reply (see `crate::call_jobs`).
    pub after_answer: bool,
    /// `on_status:`: status patterns and the step each goes to, in the
    /// order written; the first that matches wins.
    pub on_status: Vec<(StatusPattern, Target)>,
    /// Every template of the call with where it is written, for `check`.
    pub templates: Vec<(Pos, Template)>,
}

/// One header value as written.
#[derive(Clone, Debug)]
pub(crate) enum HeaderSpec {
    Text(Template),
    /// `{secret: NAME}`: read from the environment variable `NAME` by the
    /// caller, when the call is made.
    Secret(String),
}

/// A call's body as written.
#[derive(Clone, Debug)]
pub(crate) enum BodySpec {
    None,
    /// `json:`: a tree whose text leaves are templates.
    Json(JsonSpec),
    /// `form:`: `application/x-www-form-urlencoded` fields.
    Form(Vec<(String, Template)>),
}

/// A JSON body's shape: text leaves are templates (rendered as strings);
/// plain numbers, `true`, `false` and `null` stay what they are.
#[derive(Clone, Debug)]
pub(crate) enum JsonSpec {
    Literal(Value),
    Text(Template),
    List(Vec<JsonSpec>),
    Object(Vec<(String, JsonSpec)>),
}

/// An `on_status:` key: one status (`404`) or a class (`4xx`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StatusPattern {
    Exact(u16),
    Class(u16),
}

impl StatusPattern {
    pub fn parse(text: &str) -> Option<StatusPattern> {
        let t = text.trim();
        if let Some(class) = t.strip_suffix("xx").or_else(|| t.strip_suffix("XX")) {
            let c: u16 = class.parse().ok()?;
            return (1..=5).contains(&c).then_some(StatusPattern::Class(c));
        }
        let n: u16 = t.parse().ok()?;
        (100..=599).contains(&n).then_some(StatusPattern::Exact(n))
    }

    pub fn matches(self, status: u16) -> bool {
        match self {
            StatusPattern::Exact(n) => n == status,
            StatusPattern::Class(c) => status / 100 == c,
        }
    }
}

impl fmt::Display for StatusPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StatusPattern::Exact(n) => write!(f, "{n}"),
            StatusPattern::Class(c) => write!(f, "{c}xx"),
        }
    }
}

/// Is `path` (after `call.`) something an answer can have: `status`,
/// `error`, `ok`, `json`, or `json.` followed by names or list indexes?
pub(crate) fn is_call_path(path: &str) -> bool {
    match path {
        "status" | "error" | "ok" | "json" => true,
        _ => path.strip_prefix("json.").is_some_and(|rest| {
            rest.split('.').all(|seg| {
                !seg.is_empty()
                    && seg
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            })
        }),
    }
}

/// Why `name` cannot be a call's header name, if it cannot: not an HTTP
/// token, or a header the client sets itself (`Host`, `Content-Length`).
/// For YAML's `headers:` and a script's `http()` alike.
pub(crate) fn header_name_problem(name: &str) -> Option<String> {
    let token = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_!#$%&'*+.^`|~".contains(&b));
    if !token {
        return Some(format!("`{name}` is not a header name"));
    }
    if name.eq_ignore_ascii_case("host") || name.eq_ignore_ascii_case("content-length") {
        return Some(format!(
            "the `{name}` header is set from the URL and body; remove it"
        ));
    }
    None
}

/// One header of a request, as the engine hands it to the caller.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderValue {
    /// Rendered text.
    Text(String),
    /// The name of the environment variable holding the value; the caller
    /// reads it when it makes the call. Never the value itself.
    Secret(String),
}

impl fmt::Debug for HeaderValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderValue::Text(t) => write!(f, "{t:?}"),
            HeaderValue::Secret(name) => write!(f, "secret({name})"),
        }
    }
}

/// A request a flow asks for: rendered, not yet made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallRequest {
    /// `GET`, `POST`, `PUT`, `PATCH` or `DELETE`.
    pub method: String,
    /// The rendered URL (not yet checked against the allow-list).
    pub url: String,
    /// Headers in the order written.
    pub headers: Vec<(String, HeaderValue)>,
    /// The body and its content type, if any.
    pub body: Option<(String, String)>,
    /// The call's own timeout (the message's budget may cut it shorter).
    pub timeout: Duration,
    /// The flow and step that make the call, for logs and metrics.
    pub flow: String,
    /// The step that makes the call.
    pub step: String,
}

impl CallRequest {
    /// The URL's host (empty when it has none), for logs and metrics.
    pub fn host(&self) -> &str {
        let rest = self.url.split_once("://").map_or("", |(_, r)| r);
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        if host_port.starts_with('[') {
            return host_port.split(']').next().map_or("", |h| &h[1..]);
        }
        host_port.split(':').next().unwrap_or("")
    }
}

/// Why a call got no usable answer, as flows see it in `{{call.error}}`:
/// a short, stable word. The wording of the resolver, the TLS stack or the
/// allow-list stays in the logs ([`CallResponse::Failed`]'s `detail`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CallError {
    /// The call's `timeout:` or the message's `call_budget_ms` ran out.
    Timeout,
    /// No connection, or it broke: DNS found no address, refused, reset,
    /// TLS failed, the answer was cut short.
    Connection,
    /// Our own checks refused it before any request: not in `http_allow`,
    /// a non-public address, a redirect to another origin with a secret, a
    /// secret that is not set, too many calls, calls not enabled. Never
    /// retried.
    Refused,
    /// The request could not be built (a bad URL or header value). Never
    /// retried.
    Invalid,
    /// The answer was larger than the cap (64 KiB).
    TooLarge,
    /// More redirects than allowed (3).
    Redirects,
    /// The server answered with a status that is not 2xx (only in
    /// `{{call.error}}`: such an answer is [`CallResponse::Answered`]).
    Status,
}

impl CallError {
    /// Every category, in the order the docs list them.
    pub const ALL: [CallError; 7] = [
        CallError::Timeout,
        CallError::Connection,
        CallError::Refused,
        CallError::Invalid,
        CallError::TooLarge,
        CallError::Redirects,
        CallError::Status,
    ];

    /// The word flows see (`timeout`, `too_large`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            CallError::Timeout => "timeout",
            CallError::Connection => "connection",
            CallError::Refused => "refused",
            CallError::Invalid => "invalid",
            CallError::TooLarge => "too_large",
            CallError::Redirects => "redirects",
            CallError::Status => "status",
        }
    }

    /// The category a word names.
    pub fn parse(word: &str) -> Option<CallError> {
        CallError::ALL.into_iter().find(|e| e.as_str() == word)
    }

    /// Whether trying again later can help: not when our own checks
    /// refused the call or it cannot be built.
    pub fn retryable(self) -> bool {
        !matches!(self, CallError::Refused | CallError::Invalid)
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What became of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallResponse {
    /// The server answered (any status).
    Answered {
        /// The HTTP status.
        status: u16,
        /// The body, when it is JSON.
        json: Option<Value>,
    },
    /// No answer: refused (allow-list, private address, missing secret),
    /// connection error, timeout or budget spent, too large an answer.
    Failed {
        /// The category, for `{{call.error}}`, retries and metrics.
        error: CallError,
        /// What happened, in words, for logs and `chat`; never holds a
        /// secret, never shown to the sender.
        detail: String,
    },
}

impl CallResponse {
    /// A failure of category `error`, described by `detail`.
    pub fn failed(error: CallError, detail: impl Into<String>) -> CallResponse {
        CallResponse::Failed {
            error,
            detail: detail.into(),
        }
    }

    /// The outcome label for metrics and logs: `ok` (2xx), `status`
    /// (another status), or `error`.
    pub fn outcome(&self) -> &'static str {
        match self {
            CallResponse::Answered { status, .. } if (200..300).contains(status) => "ok",
            CallResponse::Answered { .. } => "status",
            CallResponse::Failed { .. } => "error",
        }
    }

    /// The answer as `{{call.*}}` variables: `status`, `ok` (`true` or
    /// `false`), `error` (a [`CallError`] word: set on a failure and on a
    /// status that is not 2xx), and every leaf of the JSON under `json.`
    /// (list items by index); `json` itself is the compact JSON text.
    pub(crate) fn vars(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        match self {
            CallResponse::Answered { status, json } => {
                let ok = (200..300).contains(status);
                out.insert("status".to_owned(), status.to_string());
                out.insert("ok".to_owned(), ok.to_string());
                if !ok {
                    out.insert("error".to_owned(), CallError::Status.to_string());
                }
                if let Some(json) = json {
                    out.insert("json".to_owned(), json.to_string());
                    flatten("json", json, &mut out);
                }
            }
            CallResponse::Failed { error, .. } => {
                out.insert("ok".to_owned(), "false".to_owned());
                out.insert("error".to_owned(), error.to_string());
            }
        }
        out
    }
}

/// The answer a call past [`MAX_CALLS_PER_MESSAGE`] gets, without a
/// request.
pub(crate) fn too_many_calls() -> CallResponse {
    CallResponse::failed(
        CallError::Refused,
        format!("more than {MAX_CALLS_PER_MESSAGE} calls for one message"),
    )
}

/// Every leaf of `value` under `prefix` (`json.order.eta`, `json.items.0`).
fn flatten(prefix: &str, value: &Value, out: &mut BTreeMap<String, String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                flatten(&format!("{prefix}.{k}"), v, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                flatten(&format!("{prefix}.{i}"), v, out);
            }
        }
        Value::String(s) => {
            out.insert(prefix.to_owned(), s.clone());
        }
        Value::Null => {
            out.insert(prefix.to_owned(), String::new());
        }
        other => {
            out.insert(prefix.to_owned(), other.to_string());
        }
    }
}

/// `text` with everything but RFC 3986's unreserved characters
/// percent-encoded: a value put into a URL's path or query.
pub(crate) fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Where a call's answer sends the step: on (`None`, the step goes on
/// with its `say` and transition), or to a step.
pub(crate) fn route<'c>(call: &'c Call, response: &CallResponse) -> Option<&'c Target> {
    match response {
        CallResponse::Failed { .. } => call.on_error.as_ref(),
        CallResponse::Answered { status, .. } => {
            if let Some((_, t)) = call.on_status.iter().find(|(p, _)| p.matches(*status)) {
                return Some(t);
            }
            if (200..300).contains(status) {
                None
            } else {
                call.on_error.as_ref()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_paths() {
        for ok in [
            "status",
            "json",
            "json.id",
            "json.items.0.name",
            "error",
            "ok",
        ] {
            assert!(is_call_path(ok), "{ok}");
        }
        for bad in ["", "json.", "json..x", "body", "json.a b", "statuses"] {
            assert!(!is_call_path(bad), "{bad}");
        }
    }

    #[test]
    fn answers_flatten_into_variables() {
        let r = CallResponse::Answered {
            status: 201,
            json: Some(
                serde_json::json!({"id": 42, "order": {"eta": "20 min"}, "items": ["a", null]}),
            ),
        };
        let v = r.vars();
        assert_eq!(v["status"], "201");
        assert_eq!(v["ok"], "true");
        assert_eq!(v["json.id"], "42");
        assert_eq!(v["json.order.eta"], "20 min");
        assert_eq!(v["json.items.0"], "a");
        assert_eq!(v["json.items.1"], "");
        assert!(!v.contains_key("error"));
        let f = CallResponse::failed(CallError::Timeout, "timed out after 3000 ms").vars();
        assert_eq!(f["error"], "timeout");
        assert_eq!(f["ok"], "false");
        let s = CallResponse::Answered {
            status: 503,
            json: None,
        }
        .vars();
        assert_eq!((s["error"].as_str(), s["ok"].as_str()), ("status", "false"));
        for e in CallError::ALL {
            assert_eq!(CallError::parse(e.as_str()), Some(e));
        }
    }

    #[test]
    fn values_in_urls_are_encoded() {
        assert_eq!(percent_encode("a b/c?d#é"), "a%20b%2Fc%3Fd%23%C3%A9");
        assert_eq!(percent_encode("A-z_0.9~"), "A-z_0.9~");
    }

    #[test]
    fn status_patterns() {
        assert_eq!(StatusPattern::parse("404"), Some(StatusPattern::Exact(404)));
        assert_eq!(StatusPattern::parse("4xx"), Some(StatusPattern::Class(4)));
        assert!(StatusPattern::parse("700").is_none());
        assert!(StatusPattern::parse("6xx").is_none());
        assert!(StatusPattern::Class(5).matches(503));
        assert!(!StatusPattern::Exact(404).matches(400));
    }

    #[test]
    fn hosts_of_urls() {
        let req = |url: &str| CallRequest {
            method: "GET".into(),
            url: url.into(),
            headers: vec![],
            body: None,
            timeout: Duration::from_secs(1),
            flow: String::new(),
            step: String::new(),
        };
        assert_eq!(req("https://shop.example/orders").host(), "shop.example");
        assert_eq!(req("http://u:p@127.0.0.1:8080/x").host(), "127.0.0.1");
        assert_eq!(req("http://[::1]:80/").host(), "::1");
        assert_eq!(req("nonsense").host(), "");
    }
}
