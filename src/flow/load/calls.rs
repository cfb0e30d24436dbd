//! A step's `call:`: method, URL, headers (with `{secret: NAME}`), a
//! `json:` or `form:` body, `timeout`, `save`, `on_error` and `on_status`
//! (see "HTTP calls" in flows/README.md). Only the shape is checked here;
//! that `on_error` and `on_status` name steps is `check`'s.

use crate::flow::calls::{
    header_name_problem, is_call_path, BodySpec, Call, HeaderSpec, JsonSpec, StatusPattern,
    DEFAULT_CALL_TIMEOUT_MS, MAX_CALL_TIMEOUT_MS, METHODS,
};
use crate::flow::model::Pos;
use crate::flow::template::{is_ident, parse_var, Template, Var};
use crate::flow::yaml::{Kind, Node};

use super::Cx;

/// Longest `json:` body nesting, so a body cannot be built to any depth.
const MAX_JSON_DEPTH: usize = 8;

impl Cx<'_> {
    pub(super) fn call(&mut self, node: &Node) -> Option<Call> {
        self.call_templates.clear();
        let m = self.map(
            node,
            "`call`",
            &[
                "method",
                "url",
                "headers",
                "json",
                "form",
                "timeout",
                "save",
                "on_error",
                "on_status",
                "after_answer",
            ],
        )?;
        let method = match m.get("method") {
            Some((_, v)) => {
                let text = self.text(v, "`method`")?;
                let upper = text.to_ascii_uppercase();
                if !METHODS.contains(&upper.as_str()) {
                    self.err(
                        v.pos,
                        format!(
                            "unknown method `{text}` (use one of: {})",
                            METHODS.join(", ")
                        ),
                    );
                    return None;
                }
                upper
            }
            None => "GET".to_owned(),
        };
        let Some((_, uv)) = m.get("url") else {
            self.err(node.pos, "a call needs `url:`");
            return None;
        };
        let url = self.call_url(uv);
        let headers = match m.get("headers") {
            Some((_, hv)) => self.headers(hv),
            None => Some(Vec::new()),
        };
        let body = match (m.get("json"), m.get("form")) {
            (Some((jk, _)), Some(_)) => {
                self.err(jk.pos, "a call has both `json` and `form`; use one");
                return None;
            }
            (Some((_, jv)), None) => self.json_spec(jv, 0).map(BodySpec::Json),
            (None, Some((_, fv))) => self.form(fv).map(BodySpec::Form),
            (None, None) => Some(BodySpec::None),
        };
        if !matches!(body, Some(BodySpec::None)) && method == "GET" {
            self.err(
                node.pos,
                "a GET call has no body; use `method: POST` (or PUT, PATCH)",
            );
        }
        let timeout_ms = match m.get("timeout") {
            Some((_, tv)) => self.call_timeout(tv),
            None => Some(DEFAULT_CALL_TIMEOUT_MS),
        };
        let save = match m.get("save") {
            Some((_, sv)) => self.call_save(sv),
            None => Some(Vec::new()),
        };
        let after_answer = match m.get("after_answer") {
            Some((_, av)) => self.flag(av, "`after_answer`")?,
            None => false,
        };
        if after_answer {
            for key in ["save", "on_error", "on_status"] {
                if let Some((k, _)) = m.get(key) {
                    self.err(
                        k.pos,
                        format!("an `after_answer` call is made after the reply and has no answer for the flow: remove `{key}`"),
                    );
                    return None;
                }
            }
        }
        let on_error = match m.get("on_error") {
            Some((_, ev)) => self.step_name(ev, "`on_error`").map(Some),
            None if after_answer => Some(None),
            None => {
                self.err(
                    node.pos,
                    "a call needs `on_error:` (the step to go to when it fails: timeout, refused, non-2xx)",
                );
                None
            }
        };
        let mut on_status = Vec::new();
        if let Some((_, sv)) = m.get("on_status") {
            let entries = self.map(sv, "`on_status`", &[]).unwrap_or_default();
            for (key, (k, v)) in entries {
                let Some(p) = StatusPattern::parse(key) else {
                    self.err(
                        k.pos,
                        format!("`{key}` is not a status: use a code like 404 or a class like 4xx"),
                    );
                    continue;
                };
                if let Some(t) = self.step_name(v, "an `on_status` step") {
                    on_status.push((p, t));
                }
            }
            // Exact codes are tried before classes, whatever the order.
            on_status.sort_by_key(|(p, _)| matches!(p, StatusPattern::Class(_)));
        }
        Some(Call {
            method,
            url: url?,
            headers: headers?,
            body: body?,
            timeout_ms: timeout_ms?,
            save: save?,
            on_error: on_error?,
            after_answer,
            on_status,
            templates: std::mem::take(&mut self.call_templates),
        })
    }

    /// The URL: a template whose scheme and host are written out, so that
    /// what a sender types can change the path or query, never the host.
    fn call_url(&mut self, node: &Node) -> Option<Template> {
        let text = self.text(node, "`url`")?;
        let rest = text
            .strip_prefix("https://")
            .or_else(|| text.strip_prefix("http://"));
        let Some(rest) = rest else {
            self.err(
                node.pos,
                format!("`url` must start with https:// or http://, got `{text}`"),
            );
            return None;
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if authority.is_empty() || authority.contains("{{") || authority.contains('@') {
            self.err(
                node.pos,
                "the host of a call's `url` must be written out (templates only in the path or query)",
            );
            return None;
        }
        self.call_template(&text, node.pos)
    }

    fn headers(&mut self, node: &Node) -> Option<Vec<(String, HeaderSpec)>> {
        let entries = self.map(node, "`headers`", &[])?;
        let mut out = Vec::new();
        for (name, (k, v)) in entries {
            if let Some(problem) = header_name_problem(name) {
                self.err(k.pos, problem);
                continue;
            }
            let spec = match &v.kind {
                Kind::Map(_) => {
                    let Some(sm) = self.map(v, "a secret header", &["secret"]) else {
                        continue;
                    };
                    let Some((_, nv)) = sm.get("secret") else {
                        self.err(v.pos, "expected `{secret: NAME}` for a header value");
                        continue;
                    };
                    let Some(var) = self.text(nv, "`secret`") else {
                        continue;
                    };
                    if !is_ident(&var) {
                        self.err(
                            nv.pos,
                            format!("`{var}` is not an environment variable name"),
                        );
                        continue;
                    }
                    if std::env::var_os(&var).is_none() {
                        self.warn(
                            nv.pos,
                            format!("secret `{var}` is not set in this environment; calls that need it fail (and take on_error) until it is"),
                        );
                    }
                    HeaderSpec::Secret(var)
                }
                _ => {
                    let Some(text) = self.text(v, "a header value") else {
                        continue;
                    };
                    let Some(t) = self.call_template(&text, v.pos) else {
                        continue;
                    };
                    HeaderSpec::Text(t)
                }
            };
            out.push((name.to_owned(), spec));
        }
        Some(out)
    }

    fn json_spec(&mut self, node: &Node, depth: usize) -> Option<JsonSpec> {
        if depth > MAX_JSON_DEPTH {
            self.err(
                node.pos,
                format!("`json` is nested deeper than {MAX_JSON_DEPTH} levels"),
            );
            return None;
        }
        match &node.kind {
            Kind::Scalar(s, plain) => {
                if node.is_null() {
                    return Some(JsonSpec::Literal(serde_json::Value::Null));
                }
                if *plain {
                    if let Ok(v @ (serde_json::Value::Bool(_) | serde_json::Value::Number(_))) =
                        serde_json::from_str::<serde_json::Value>(s)
                    {
                        return Some(JsonSpec::Literal(v));
                    }
                }
                self.call_template(s, node.pos).map(JsonSpec::Text)
            }
            Kind::Seq(items) => {
                let mut out = Vec::new();
                for item in items {
                    out.push(self.json_spec(item, depth + 1)?);
                }
                Some(JsonSpec::List(out))
            }
            Kind::Map(_) => {
                let entries = self.map(node, "`json`", &[])?;
                let mut out = Vec::new();
                for (key, (_, v)) in entries {
                    out.push((key.to_owned(), self.json_spec(v, depth + 1)?));
                }
                Some(JsonSpec::Object(out))
            }
        }
    }

    fn form(&mut self, node: &Node) -> Option<Vec<(String, Template)>> {
        let entries = self.map(node, "`form`", &[])?;
        let mut out = Vec::new();
        for (key, (_, v)) in entries {
            let text = self.text(v, "a `form` value")?;
            out.push((key.to_owned(), self.call_template(&text, v.pos)?));
        }
        Some(out)
    }

    /// A template of a call, remembered with its position so that `check`
    /// can report the variables it names that are never set.
    fn call_template(&mut self, text: &str, pos: Pos) -> Option<Template> {
        let t = self.template(text, pos)?;
        self.call_templates.push((pos, t.clone()));
        Some(t)
    }

    fn call_timeout(&mut self, node: &Node) -> Option<u64> {
        let text = self.text(node, "`timeout`")?;
        let ms = parse_ms(&text);
        match ms {
            Some(ms) if (1..=MAX_CALL_TIMEOUT_MS).contains(&ms) => Some(ms),
            _ => {
                self.err(
                    node.pos,
                    format!(
                        "invalid call timeout `{text}` (use milliseconds or seconds, like 800ms or 3s; at most {}s)",
                        MAX_CALL_TIMEOUT_MS / 1000
                    ),
                );
                None
            }
        }
    }

    fn call_save(&mut self, node: &Node) -> Option<Vec<(Var, String)>> {
        let entries = self.map(node, "`save`", &[])?;
        let mut out = Vec::new();
        for (key, (k, v)) in entries {
            let target = match parse_var(key) {
                Some(t @ (Var::Run(_) | Var::Contact(_))) => t,
                _ => {
                    self.err(
                        k.pos,
                        format!("cannot save into `{key}`: use a name or `contact.name`"),
                    );
                    continue;
                }
            };
            let Some(path) = self.text(v, "a `save` path") else {
                continue;
            };
            let path = path.strip_prefix("call.").unwrap_or(&path).to_owned();
            if !is_call_path(&path) {
                self.err(
                    v.pos,
                    format!("`{path}` is not a path of a call's answer (use status, error, json or json.a.b)"),
                );
                continue;
            }
            out.push((target, path));
        }
        Some(out)
    }
}

/// `800ms`, `3s` or `3` (seconds), in milliseconds.
fn parse_ms(text: &str) -> Option<u64> {
    let t = text.trim();
    if let Some(ms) = t.strip_suffix("ms") {
        return ms.trim().parse().ok();
    }
    let secs: u64 = t.strip_suffix('s').unwrap_or(t).trim().parse().ok()?;
    secs.checked_mul(1000)
}
