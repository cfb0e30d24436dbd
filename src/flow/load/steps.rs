//! Steps and routes: a step's `say`, `routes`, `retry` and transition
//! keys, a route's matcher (read by `matchers`), `save`, `contact`, `set`
//! and transition (see "Steps", "Routes" and "Retries" in flows/README.md).

use std::collections::BTreeMap;

use crate::flow::model::{
    Assign, Next, Pos, Retry, Route, Step, Timeout, Transition, DEFAULT_RETRY_LIMIT,
};
use crate::flow::template::{parse_var, Var};
use crate::flow::yaml::{Kind, Node};

use super::matchers::MATCHERS;
use super::Cx;

impl Cx<'_> {
    fn assigns(&mut self, node: &Node) -> Vec<Assign> {
        let Some(m) = self.map(node, "`set`", &[]) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (key, (k, v)) in m {
            let target = match parse_var(key) {
                Some(t @ (Var::Run(_) | Var::Contact(_))) => t,
                _ => {
                    self.err(
                        k.pos,
                        format!("cannot set `{key}`: use a name or `contact.name`"),
                    );
                    continue;
                }
            };
            let Some(text) = self.text(v, "a `set` value") else {
                continue;
            };
            if let Some(value) = self.template(&text, v.pos) {
                out.push(Assign {
                    target,
                    value,
                    pos: v.pos,
                });
            }
        }
        out
    }

    /// The transition keys shared by steps and routes.
    fn transition(
        &mut self,
        m: &BTreeMap<&str, (&Node, &Node)>,
        what: &str,
    ) -> Option<Option<Transition>> {
        let present: Vec<&str> = ["goto", "flow", "end", "silence"]
            .into_iter()
            .filter(|k| m.contains_key(k))
            .collect();
        if present.len() > 1 {
            let (k, _) = m[present[1]];
            self.err(
                k.pos,
                format!(
                    "{what} has both `{}` and `{}`; use one",
                    present[0], present[1]
                ),
            );
            return None;
        }
        let Some(key) = present.first() else {
            return Some(None);
        };
        let (_, v) = m[key];
        let t = match *key {
            "goto" => Transition::Goto(self.step_name(v, "`goto`")?),
            "flow" => Transition::Flow(self.step_name(v, "`flow`")?),
            "end" => {
                if !self.must_be_true(v, "end") {
                    return None;
                }
                Transition::End
            }
            _ => {
                let reason = self.text(v, "`silence` (a reason for the logs)")?;
                Transition::Silence(reason)
            }
        };
        Some(Some(t))
    }

    pub(super) fn step(&mut self, node: &Node, key_pos: Pos, name: &str) -> Option<Step> {
        let what = format!("step `{name}`");
        let m = self.map(
            node,
            &what,
            &[
                "say",
                "media",
                "set",
                "wait",
                "retry",
                "goto",
                "flow",
                "end",
                "silence",
                "timeout",
                "description",
                "call",
            ],
        )?;
        let call = match m.get("call") {
            Some((ck, cv)) => {
                if m.contains_key("wait") {
                    self.err(
                        ck.pos,
                        format!("{what} both calls and waits; make the call in the step before or after"),
                    );
                }
                self.call(cv)
            }
            None => None,
        };
        let set = m
            .get("set")
            .map(|(_, v)| self.assigns(v))
            .unwrap_or_default();
        let say = self.say_with_media(m.get("say"), m.get("media"), &what);
        let transition = self.transition(&m, &what);
        if let (Some(Some(Transition::Silence(_))), false) = (&transition, say.is_empty()) {
            let (k, _) = m["silence"];
            self.err(
                k.pos,
                format!("{what} has both `say` and `silence`; silence sends nothing"),
            );
        }
        let next = match (m.get("wait"), transition) {
            (Some((wk, wv)), t) => {
                if let Some(Some(_)) = t {
                    self.err(
                        wk.pos,
                        format!("{what} waits for a reply, so its routes decide where to go; remove goto/flow/end/silence"),
                    );
                }
                let routes = self.routes(wv, name);
                let retry = match m.get("retry") {
                    Some((_, rv)) => self.retry(rv)?,
                    None => Retry {
                        say: None,
                        limit: DEFAULT_RETRY_LIMIT,
                        give_up: None,
                        give_up_say: Vec::new(),
                    },
                };
                let timeouts = match m.get("timeout") {
                    Some((_, tv)) => self.timeouts(tv, &what),
                    None => Vec::new(),
                };
                Next::Wait {
                    routes,
                    retry,
                    timeouts,
                }
            }
            (None, t) => {
                if let Some((rk, _)) = m.get("retry") {
                    self.err(rk.pos, format!("`retry` needs `wait` in {what}"));
                }
                if let Some((tk, _)) = m.get("timeout") {
                    self.err(
                        tk.pos,
                        format!("`timeout` needs `wait` in {what}: only a step that waits for a reply can time out"),
                    );
                }
                Next::Go(t?.unwrap_or(Transition::End))
            }
        };
        Some(Step {
            pos: key_pos,
            set,
            call,
            say,
            next,
        })
    }

    /// `timeout:`: one mapping or a list of them, by strictly increasing
    /// `after`.
    fn timeouts(&mut self, node: &Node, what: &str) -> Vec<Timeout> {
        let items: Vec<&Node> = match &node.kind {
            Kind::Seq(items) => items.iter().collect(),
            _ => vec![node],
        };
        if items.is_empty() {
            self.err(
                node.pos,
                format!("`timeout` in {what} is an empty list; remove it or add `after:`"),
            );
        }
        let mut out: Vec<Timeout> = Vec::new();
        for item in items {
            let Some(t) = self.timeout(item) else {
                continue;
            };
            if let Some(prev) = out.last() {
                if t.after <= prev.after {
                    self.err(
                        t.pos,
                        format!(
                            "timeouts of {what} must come in strictly increasing `after` order: {} is not after {}",
                            show_secs(t.after),
                            show_secs(prev.after)
                        ),
                    );
                    continue;
                }
            }
            out.push(t);
        }
        out
    }

    fn timeout(&mut self, node: &Node) -> Option<Timeout> {
        let m = self.map(
            node,
            "a timeout",
            &[
                "after",
                "say",
                "media",
                "goto",
                "flow",
                "end",
                "silence",
                "description",
            ],
        )?;
        let Some((_, av)) = m.get("after") else {
            self.err(
                node.pos,
                "a timeout needs `after:` (how long after the step started waiting, like 2h)",
            );
            return None;
        };
        let text = self.text(av, "`after`")?;
        let Some(after) = super::parse_duration(&text) else {
            self.err(
                av.pos,
                format!("invalid duration `{text}` (use a number and s, m, h or d, like 30m or 2h; at most 365d)"),
            );
            return None;
        };
        let say = self.say_with_media(m.get("say"), m.get("media"), "a timeout");
        let then = self.transition(&m, "a timeout")?;
        if let (Some(Transition::Silence(_)), false) = (&then, say.is_empty()) {
            let (k, _) = m["silence"];
            self.err(
                k.pos,
                "a timeout has both `say` and `silence`; silence sends nothing",
            );
        }
        if then.is_none() && say.is_empty() {
            self.err(
                node.pos,
                "a timeout with neither `say` nor goto/flow/end/silence does nothing; add one",
            );
        }
        Some(Timeout {
            after,
            say,
            then,
            pos: av.pos,
        })
    }

    fn routes(&mut self, node: &Node, step: &str) -> Vec<Route> {
        let Kind::Seq(items) = &node.kind else {
            self.err(
                node.pos,
                format!(
                    "expected a list of routes for `wait`, found {}",
                    node.describe()
                ),
            );
            return Vec::new();
        };
        if items.is_empty() {
            self.err(
                node.pos,
                format!("`wait` in step `{step}` needs at least one route"),
            );
        }
        items.iter().filter_map(|i| self.route(i)).collect()
    }

    fn route(&mut self, node: &Node) -> Option<Route> {
        let mut allowed: Vec<&str> = MATCHERS.to_vec();
        allowed.extend([
            "save",
            "contact",
            "set",
            "say",
            "media",
            "goto",
            "flow",
            "end",
            "silence",
            "description",
        ]);
        let m = self.map(node, "a route", &allowed)?;
        let present: Vec<&str> = MATCHERS
            .iter()
            .copied()
            .filter(|k| m.contains_key(k))
            .collect();
        if present.is_empty() {
            self.err(
                node.pos,
                format!("a route needs one matcher: {}", MATCHERS.join(", ")),
            );
            return None;
        }
        if present.len() > 1 {
            let (k, _) = m[present[1]];
            self.err(
                k.pos,
                format!(
                    "a route has one matcher; this one has `{}` and `{}` (use two routes)",
                    present[0], present[1]
                ),
            );
            return None;
        }
        let (_, v) = m[present[0]];
        let matcher = self.matcher(present[0], v)?;
        let save = m.get("save").and_then(|(_, v)| self.ident(v, "`save`"));
        let contact = m
            .get("contact")
            .and_then(|(_, v)| self.ident(v, "`contact`"));
        let set = m
            .get("set")
            .map(|(_, v)| self.assigns(v))
            .unwrap_or_default();
        let say = self.say_with_media(m.get("say"), m.get("media"), "a route");
        let then = self.transition(&m, "a route")?;
        if let (Some(Transition::Silence(_)), false) = (&then, say.is_empty()) {
            let (k, _) = m["silence"];
            self.err(
                k.pos,
                "a route has both `say` and `silence`; silence sends nothing",
            );
        }
        Some(Route {
            matcher,
            save,
            contact,
            set,
            say,
            then: then.unwrap_or(Transition::End),
        })
    }

    fn retry(&mut self, node: &Node) -> Option<Retry> {
        let m = self.map(node, "`retry`", &["say", "limit", "give_up", "give_up_say"])?;
        let say = m.get("say").map(|(_, v)| self.messages(v, "`retry`"));
        let limit = match m.get("limit") {
            None => DEFAULT_RETRY_LIMIT,
            Some((_, v)) => {
                let t = self.text(v, "`limit`")?;
                match t.parse::<u32>() {
                    Ok(n) if n <= 100 => n,
                    _ => {
                        self.err(
                            v.pos,
                            format!("`limit` must be a whole number from 0 to 100, got `{t}`"),
                        );
                        return None;
                    }
                }
            }
        };
        let give_up = m
            .get("give_up")
            .and_then(|(_, v)| self.step_name(v, "`give_up`"));
        let give_up_say = m
            .get("give_up_say")
            .map(|(_, v)| self.messages(v, "`give_up_say`"))
            .unwrap_or_default();
        Some(Retry {
            say,
            limit,
            give_up,
            give_up_say,
        })
    }
}

/// Seconds as a duration an author would write (`2h`, `1h30m`, `45s`).
pub(crate) fn show_secs(secs: i64) -> String {
    let mut out = String::new();
    let mut rest = secs;
    for (unit, n) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if rest >= n {
            out.push_str(&format!("{}{unit}", rest / n));
            rest %= n;
        }
    }
    if out.is_empty() {
        out.push_str("0s");
    }
    out
}
