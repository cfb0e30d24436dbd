//! `http(request)`: a script flow's HTTP call (see "HTTP calls from
//! scripts" in flows/README.md).
//!
//! The sandbox makes no request. A script run is given the answers to the
//! calls made so far for this message (in order); the k-th `http()` of the
//! run returns the k-th answer. Reaching a call with no answer yet, the
//! helper records the request and ends the run with [`CALL_PENDING_TOKEN`]
//! (a termination the script cannot catch); the engine hands the request
//! to the pipeline, which makes it (allow-list, address checks, size cap,
//! the message's `call_budget_ms`: the same client as a YAML `call:`) and
//! runs the engine, and so the script, again with one more answer. The
//! wait for the answer is outside the script's operation and time limits;
//! each run is held to them on its own. A script must therefore reach its
//! calls the same way every time it runs for one message: everything it
//! sees (`msg`, `state`, `now()`, the random stream) is the same.
//!
//! With `after_answer: true` the request is recorded as a durable call job
//! (made after the reply, with retries) and `http()` returns `()` at once.

use rhai::{Dynamic, EvalAltResult, Map, INT};

use crate::flow::calls::{
    header_name_problem, too_many_calls, CallError, CallRequest, CallResponse, HeaderValue,
    MAX_CALL_TIMEOUT_MS, METHODS,
};
use crate::flow::template::is_ident;

use super::helpers::runtime;
use super::limits::Limits;
use super::run::with_run;
use super::values::{dynamic_to_json, json_to_dynamic, state_over_limits, At};

/// The value a run is terminated with when it reached a call that has no
/// answer yet, so that it can be told apart from anything a script could
/// raise itself.
pub(super) const CALL_PENDING_TOKEN: &str = "smsflow: HTTP call pending";

/// A run's calls: the answers it was given, and what it asked for.
#[derive(Debug, Default)]
pub(super) struct RunCalls {
    /// Answers to this run's first calls, in order.
    pub answers: Vec<CallResponse>,
    /// How many more calls the message may make (it makes at most
    /// `MAX_CALLS_PER_MESSAGE`, YAML steps' included); a call past that
    /// fails without a request.
    pub room: usize,
    /// The calls answered so far in this run, in order.
    pub made: Vec<(CallRequest, CallResponse)>,
    /// The call reached without an answer (the run ends there).
    pub pending: Option<CallRequest>,
    /// `after_answer` calls, in order.
    pub after: Vec<CallRequest>,
    /// The sandbox's limits: an answer is measured against them before a
    /// script sees it.
    pub limits: Limits,
}

/// `http(#{method, url, headers, json | form, timeout_ms, after_answer})`.
pub(super) fn http(request: Map) -> Result<Dynamic, Box<EvalAltResult>> {
    let (request, after_answer) = request_from(request)?;
    with_run(|run| {
        let Some(calls) = run.calls.as_mut() else {
            return Err(runtime("http() is only available in script flows"));
        };
        if after_answer {
            calls.after.push(request);
            return Ok(Dynamic::UNIT);
        }
        let index = calls.made.len();
        let answer = if index >= calls.room {
            too_many_calls()
        } else if let Some(answer) = calls.answers.get(index) {
            answer.clone()
        } else {
            calls.pending = Some(request);
            return Err(Box::new(EvalAltResult::ErrorTerminated(
                Dynamic::from(CALL_PENDING_TOKEN),
                rhai::Position::NONE,
            )));
        };
        let value = answer_map(&answer, &calls.limits);
        calls.made.push((request, answer));
        Ok(value)
    })
    .unwrap_or_else(|| Err(runtime("http() is only available while handling a message")))
}

/// `url_encode(text)`: `text` with everything but RFC 3986's unreserved
/// characters percent-encoded, to put a value into a URL's path or query.
pub(super) fn url_encode(text: &str) -> String {
    crate::flow::calls::percent_encode(text)
}

/// The answer as a script sees it: `#{ok, status, json, error}`.
fn answer_map(answer: &CallResponse, limits: &Limits) -> Dynamic {
    let mut map = Map::new();
    match answer {
        CallResponse::Answered { status, json } => {
            let ok = (200..300).contains(status);
            map.insert("status".into(), Dynamic::from_int(INT::from(*status)));
            let json = json.as_ref().map(|j| {
                let wrapped = std::collections::BTreeMap::from([("json".to_owned(), j.clone())]);
                (j, state_over_limits(&wrapped, limits).is_some())
            });
            match json {
                // Larger than a script may hold: no JSON, and the call
                // counts as failed.
                Some((_, true)) => {
                    map.insert("ok".into(), false.into());
                    map.insert("json".into(), Dynamic::UNIT);
                    map.insert("error".into(), CallError::TooLarge.as_str().into());
                    return map.into();
                }
                Some((j, false)) => map.insert("json".into(), json_to_dynamic(j, 0)),
                None => map.insert("json".into(), Dynamic::UNIT),
            };
            map.insert("ok".into(), ok.into());
            let error = if ok {
                Dynamic::UNIT
            } else {
                CallError::Status.as_str().into()
            };
            map.insert("error".into(), error);
        }
        CallResponse::Failed { error, .. } => {
            map.insert("ok".into(), false.into());
            map.insert("status".into(), Dynamic::UNIT);
            map.insert("json".into(), Dynamic::UNIT);
            map.insert("error".into(), error.as_str().into());
        }
    }
    map.into()
}

/// The request a script's map asks for (flow and step are the engine's to
/// fill in), and whether it is an after-answer call.
fn request_from(map: Map) -> Result<(CallRequest, bool), Box<EvalAltResult>> {
    let bad = |text: String| runtime(&format!("http(): {text}"));
    let mut method = "GET".to_owned();
    let mut url = None;
    let mut headers = Vec::new();
    let mut body = None;
    let mut timeout_ms = crate::flow::calls::DEFAULT_CALL_TIMEOUT_MS;
    let mut after_answer = false;
    for (key, value) in map {
        let value = value.flatten();
        let type_name = value.type_name();
        match key.as_str() {
            "method" => {
                let m = value
                    .into_string()
                    .map_err(|_| bad(format!("method is a {type_name}, not a string")))?;
                method = m.to_ascii_uppercase();
                if !METHODS.contains(&method.as_str()) {
                    return Err(bad(format!(
                        "unknown method `{m}` (use {})",
                        METHODS.join(", ")
                    )));
                }
            }
            "url" => {
                let u = value
                    .into_string()
                    .map_err(|_| bad(format!("url is a {type_name}, not a string")))?;
                let rest = u
                    .strip_prefix("https://")
                    .or_else(|| u.strip_prefix("http://"));
                if rest.is_none_or(|r| r.is_empty() || r.starts_with('/')) {
                    return Err(bad(format!(
                        "`{u}` is not an http:// or https:// URL with a host"
                    )));
                }
                url = Some(u);
            }
            "headers" => {
                let fields = value
                    .try_cast::<Map>()
                    .ok_or_else(|| bad(format!("headers is a {type_name}, not a map")))?;
                for (name, v) in fields {
                    if let Some(problem) = header_name_problem(&name) {
                        return Err(bad(problem));
                    }
                    headers.push((name.to_string(), header_value(&name, v.flatten())?));
                }
            }
            "json" => {
                let json = dynamic_to_json(value, &At::Root("json"), 1).map_err(bad)?;
                body = Some(("application/json".to_owned(), json.to_string()));
            }
            "form" => {
                let fields = value
                    .try_cast::<Map>()
                    .ok_or_else(|| bad(format!("form is a {type_name}, not a map")))?;
                let mut parts = Vec::new();
                for (k, v) in fields {
                    let v = v.flatten();
                    let text = if v.is_unit() { String::new() } else { v.to_string() };
                    parts.push(format!("{}={}", url_encode(&k), url_encode(&text)));
                }
                body = Some((
                    "application/x-www-form-urlencoded".to_owned(),
                    parts.join("&"),
                ));
            }
            "timeout_ms" => {
                let ms = value
                    .as_int()
                    .map_err(|_| bad(format!("timeout_ms is a {type_name}, not a number")))?;
                if !(1..=MAX_CALL_TIMEOUT_MS as INT).contains(&ms) {
                    return Err(bad(format!(
                        "timeout_ms must be from 1 to {MAX_CALL_TIMEOUT_MS}, got {ms}"
                    )));
                }
                timeout_ms = ms as u64;
            }
            "after_answer" => {
                after_answer = value
                    .as_bool()
                    .map_err(|_| bad(format!("after_answer is a {type_name}, not true or false")))?;
            }
            other => {
                return Err(bad(format!(
                    "unknown key `{other}` (use method, url, headers, json, form, timeout_ms, after_answer)"
                )))
            }
        }
    }
    let url = url.ok_or_else(|| bad("the request has no url".to_owned()))?;
    if body.is_some() && method == "GET" {
        return Err(bad("a GET has no body (json or form)".to_owned()));
    }
    let request = CallRequest {
        method,
        url,
        headers,
        body,
        timeout: std::time::Duration::from_millis(timeout_ms),
        flow: String::new(),
        step: String::new(),
    };
    Ok((request, after_answer))
}

/// A header's value: text (a string, number or bool), or `#{secret:
/// "NAME"}`, the server's environment variable read when the call is made.
fn header_value(name: &str, value: Dynamic) -> Result<HeaderValue, Box<EvalAltResult>> {
    let type_name = value.type_name();
    if value.is_string() || value.is_int() || value.is_float() || value.is_bool() {
        return Ok(HeaderValue::Text(value.to_string()));
    }
    if let Some(map) = value.try_cast::<Map>() {
        let secret = (map.len() == 1)
            .then(|| map.get("secret"))
            .flatten()
            .and_then(|v| v.clone().into_string().ok());
        return match secret {
            Some(var) if is_ident(&var) => Ok(HeaderValue::Secret(var)),
            Some(var) => Err(runtime(&format!(
                "http(): `{var}` is not an environment variable name"
            ))),
            None => Err(runtime(&format!(
                "http(): header `{name}` must be text or #{{secret: \"NAME\"}}"
            ))),
        };
    }
    Err(runtime(&format!(
        "http(): header `{name}` is a {type_name}; expected text or #{{secret: \"NAME\"}}"
    )))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde_json::json;

    use super::super::testing::*;
    use super::super::ScriptOutput;
    use crate::flow::calls::{CallError, CallResponse, HeaderValue};

    const LOOKUP: &str = r#"
fn on_message(msg, state) {
    state.asked = true;
    let r = http(#{
        url: "https://shop.example/orders/" + url_encode(msg.body),
        headers: #{ Authorization: #{ secret: "SHOP_TOKEN" }, "X-From": msg.from },
        timeout_ms: 2000,
    });
    if r.ok { return `${r.status}: ${r.json.order.state}`; }
    `failed: ${r.error} ${r.status}`
}
"#;

    fn run_with_answers(source: &str, body: &str, answers: Vec<CallResponse>) -> ScriptOutput {
        let sandbox = sandbox();
        let script = compile(&sandbox, source);
        let mut message = input(body);
        message.answers = &answers;
        sandbox
            .run_script(&script, &message, &BTreeMap::new())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_call_without_an_answer_ends_the_run_with_the_request() {
        let out = run_with_answers(LOOKUP, "a/b 1", vec![]);
        let call = out.call.expect("a pending call");
        assert_eq!(call.method, "GET");
        assert_eq!(call.url, "https://shop.example/orders/a%2Fb%201");
        assert_eq!(
            call.headers,
            vec![
                (
                    "Authorization".to_owned(),
                    HeaderValue::Secret("SHOP_TOKEN".into())
                ),
                (
                    "X-From".to_owned(),
                    HeaderValue::Text("+15550001111".into())
                ),
            ]
        );
        assert_eq!(call.timeout, Duration::from_millis(2000));
        // Nothing else of the run is kept: it runs again with the answer.
        assert!(out.replies.is_empty() && out.state.is_empty() && out.made.is_empty());
    }

    #[test]
    fn the_run_again_with_the_answer_goes_on() {
        let answer = CallResponse::Answered {
            status: 200,
            json: Some(json!({"order": {"state": "baking"}})),
        };
        let out = run_with_answers(LOOKUP, "42", vec![answer.clone()]);
        assert_eq!(out.call, None);
        assert_eq!(bodies(&out), ["200: baking"]);
        assert_eq!(out.state_map()["asked"], json!(true));
        assert_eq!(out.made.len(), 1);
        assert_eq!(out.made[0].1, answer);

        let failed = CallResponse::failed(CallError::Timeout, "timed out after 2000 ms");
        let out = run_with_answers(LOOKUP, "42", vec![failed]);
        assert_eq!(bodies(&out), ["failed: timeout "]);
        let status = CallResponse::Answered {
            status: 503,
            json: None,
        };
        let out = run_with_answers(LOOKUP, "42", vec![status]);
        assert_eq!(bodies(&out), ["failed: status 503"]);
    }

    #[test]
    fn a_script_cannot_catch_the_pending_call() {
        let source = on_message(
            r#"try { http(#{url: "https://shop.example/"}); } catch (e) { return "caught"; } "after""#,
        );
        let out = run_with_answers(&source, "x", vec![]);
        assert!(out.call.is_some());
        assert!(out.replies.is_empty());
    }

    #[test]
    fn bodies_after_answer_calls_and_the_call_limit() {
        let source = on_message(
            r#"
            http(#{method: "post", url: "https://shop.example/o", json: #{n: 1, who: msg.from, tags: ["a"]}, after_answer: true});
            http(#{method: "PUT", url: "https://shop.example/f", form: #{b: "x y", a: 2}, after_answer: true});
            let r = http(#{url: "https://shop.example/s"});
            `${r.ok} ${r.error}`
            "#,
        );
        let sandbox = sandbox();
        let script = compile(&sandbox, &source);
        let mut message = input("x");
        message.call_room = 0;
        let out = sandbox
            .run_script(&script, &message, &BTreeMap::new())
            .unwrap();
        assert_eq!(out.after.len(), 2);
        assert_eq!(out.after[0].method, "POST");
        assert_eq!(
            out.after[0].body,
            Some((
                "application/json".to_owned(),
                r#"{"n":1,"tags":["a"],"who":"+15550001111"}"#.to_owned()
            ))
        );
        assert_eq!(
            out.after[1].body,
            Some((
                "application/x-www-form-urlencoded".to_owned(),
                "a=2&b=x%20y".to_owned()
            ))
        );
        // No room left for a call this message: it fails without a request.
        assert_eq!(out.call, None);
        assert_eq!(bodies(&out), ["false refused"]);
    }

    #[test]
    fn bad_requests_are_script_errors() {
        for (code, expected) in [
            (r#"http(#{})"#, "the request has no url"),
            (
                r#"http(#{url: "ftp://x/"})"#,
                "is not an http:// or https:// URL",
            ),
            (r#"http(#{url: "https:///x"})"#, "with a host"),
            (
                r#"http(#{url: "https://x/", method: "FETCH"})"#,
                "unknown method",
            ),
            (
                r#"http(#{url: "https://x/", json: #{a: 1}})"#,
                "a GET has no body",
            ),
            (
                r#"http(#{url: "https://x/", timeout_ms: 60000})"#,
                "timeout_ms must be",
            ),
            (
                r#"http(#{url: "https://x/", headers: #{Host: "y"}})"#,
                "set from the URL",
            ),
            (
                r#"http(#{url: "https://x/", headers: #{a: #{secret: "no way"}}})"#,
                "not an environment variable",
            ),
            (
                r#"http(#{url: "https://x/", tiemout_ms: 5})"#,
                "unknown key `tiemout_ms`",
            ),
        ] {
            let err = run(&on_message(code)).unwrap_err();
            assert!(err.to_string().contains(expected), "{code}: {err}");
        }
    }

    #[test]
    fn an_answer_larger_than_the_limits_is_too_large() {
        let sandbox = sized(1_000_000);
        let script = compile(
            &sandbox,
            &on_message(
                r#"let r = http(#{url: "https://x/"}); `${r.ok} ${r.error} ${r.status} ${r.json}`"#,
            ),
        );
        let answers = [CallResponse::Answered {
            status: 200,
            json: Some(json!(vec![1; 100_000])),
        }];
        let mut message = input("x");
        message.answers = &answers;
        let out = sandbox
            .run_script(&script, &message, &BTreeMap::new())
            .unwrap();
        assert_eq!(bodies(&out), ["false too_large 200 "]);
    }

    #[test]
    fn yaml_expressions_cannot_call() {
        let sandbox = sandbox();
        let expr = sandbox
            .compile_expr(
                std::path::Path::new("flows/a.yaml"),
                3,
                9,
                r#"http(#{url: "https://x/"})"#,
            )
            .unwrap();
        let err = sandbox.eval_string(&expr, &ctx("x")).unwrap_err();
        assert!(
            err.to_string().contains("only available in script flows"),
            "{err}"
        );
    }
}
