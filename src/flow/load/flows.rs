//! Flow files: `name`, `description`, `trigger`, `expire_after`, `start`,
//! `fields`, `vars` (given from outside by a flow start),
//! `steps`, `script` and `fallback` (see "Flow files" in flows/README.md),
//! and the duration syntax `expire_after` uses. Each step is read by
//! `steps`; a `script:` flow by `scripts`.

use std::collections::BTreeMap;

use crate::flow::matcher::normalize;
use crate::flow::model::{Flow, Message, Pos, Scope, Target};
use crate::flow::script::ENTRY_POINT;
use crate::flow::yaml::{Kind, Node};

use super::{Cx, Doc, Trigger, DEFAULT_EXPIRE_SECS};

impl Cx<'_> {
    pub(super) fn scope(&mut self, node: &Node) -> Scope {
        let mut numbers = Vec::new();
        for (n, pos) in self.texts(node, "`to`").unwrap_or_default() {
            let digits = n.strip_prefix('+').unwrap_or(&n);
            if (3..=15).contains(&digits.len()) && digits.chars().all(|c| c.is_ascii_digit()) {
                numbers.push(n);
            } else {
                self.err(
                    pos,
                    format!("`{n}` is not a phone number (write it like +15550001111)"),
                );
            }
        }
        Scope(numbers)
    }

    /// `fallback:` -- messages like `say:` (no expressions: the fallback is
    /// what goes out when those fail), or `{ silence: true }`.
    fn fallback(&mut self, node: &Node) -> Vec<Message> {
        if let Kind::Map(entries) = &node.kind {
            let silence = entries
                .iter()
                .any(|(k, _)| matches!(&k.kind, Kind::Scalar(s, _) if s == "silence"));
            if silence {
                if let Some(m) = self.map(node, "`fallback`", &["silence"]) {
                    if let Some((_, v)) = m.get("silence") {
                        self.must_be_true(v, "silence");
                    }
                }
                return Vec::new();
            }
        }
        let outer = self
            .no_exprs
            .replace("a fallback cannot use `{{= }}`: it is what is sent when expressions fail");
        let msgs = self.messages(node, "`fallback`");
        self.no_exprs = outer;
        msgs
    }

    pub(super) fn flow_file(&mut self, root: &Node, stem: &str) -> Option<Doc> {
        let m = self.map(
            root,
            "a flow file",
            &[
                "name",
                "description",
                "trigger",
                "expire_after",
                "start",
                "steps",
                "script",
                "fallback",
                "fields",
                "vars",
            ],
        )?;
        self.no_exprs = None;
        let (name, name_pos) = match m.get("name") {
            Some((_, v)) => (self.text(v, "`name`")?, v.pos),
            None => (stem.to_owned(), Pos { line: 1, column: 1 }),
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
        {
            self.err(
                name_pos,
                format!("flow name `{name}` must be letters, digits, `_` or `-`"),
            );
        }
        let trigger = match m.get("trigger") {
            Some((_, v)) => self.trigger(v),
            None => Trigger {
                keywords: Vec::new(),
                regex: None,
                catch_all: None,
                scope: Scope::default(),
            },
        };
        let expire_after = match m.get("expire_after") {
            Some((_, v)) => self
                .text(v, "`expire_after`")
                .and_then(|t| match parse_duration(&t) {
                    Some(d) => Some(d),
                    None => {
                        self.err(
                            v.pos,
                            format!("invalid duration `{t}` (use a number and s, m, h or d, like 30m or 2h; at most 365d)"),
                        );
                        None
                    }
                })
                .unwrap_or(DEFAULT_EXPIRE_SECS),
            None => DEFAULT_EXPIRE_SECS,
        };
        let fallback = m
            .get("fallback")
            .map(|(_, v)| self.fallback(v))
            .unwrap_or_default();
        // Contact fields and run variables given from outside (a flow
        // start's `fields` and `vars`, imported contacts).
        let mut idents = |key: &str| -> Vec<String> {
            let Some((_, v)) = m.get(key) else {
                return Vec::new();
            };
            let items = match &v.kind {
                Kind::Seq(items) => items.iter().collect(),
                _ => vec![*v],
            };
            items
                .into_iter()
                .filter_map(|i| self.ident(i, &format!("`{key}`")))
                .collect()
        };
        let fields = idents("fields");
        let vars = idents("vars");
        if let Some((script_key, script_node)) = m.get("script") {
            for key in ["steps", "start"] {
                if let Some((k, _)) = m.get(key) {
                    self.err(
                        k.pos,
                        format!("a script flow has no steps; remove `{key}` or `script`"),
                    );
                }
            }
            let script = self.script(script_node)?;
            return Some(Doc::Flow {
                flow: Box::new(Flow {
                    name,
                    file: self.file.clone(),
                    expire_after,
                    start: Target {
                        name: ENTRY_POINT.to_owned(),
                        pos: script_key.pos,
                    },
                    steps: BTreeMap::new(),
                    script: Some(script),
                    fallback,
                    fields,
                    vars,
                }),
                name_pos,
                trigger,
            });
        }
        let (steps_key, steps_node) = *m.get("steps")?;
        let mut steps = BTreeMap::new();
        let mut first: Option<Target> = None;
        if let Some(entries) = self.map(steps_node, "`steps`", &[]) {
            // BTreeMap loses file order; the first step is the earliest key.
            let mut ordered: Vec<_> = entries.into_iter().collect();
            ordered.sort_by_key(|(_, (k, _))| k.pos);
            for (sname, (k, v)) in ordered {
                if !sname
                    .chars()
                    .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
                    || sname.is_empty()
                {
                    self.err(
                        k.pos,
                        format!("step name `{sname}` must be letters, digits, `_` or `-`"),
                    );
                }
                if first.is_none() {
                    first = Some(Target {
                        name: sname.to_owned(),
                        pos: k.pos,
                    });
                }
                if let Some(step) = self.step(v, k.pos, sname) {
                    steps.insert(sname.to_owned(), step);
                }
            }
        }
        let start = match m.get("start") {
            Some((_, v)) => self.step_name(v, "`start`")?,
            None => match first {
                Some(t) => t,
                None => {
                    self.err(steps_key.pos, "a flow needs at least one step");
                    return None;
                }
            },
        };
        Some(Doc::Flow {
            flow: Box::new(Flow {
                name,
                file: self.file.clone(),
                expire_after,
                start,
                steps,
                script: None,
                fallback,
                fields,
                vars,
            }),
            name_pos,
            trigger,
        })
    }

    fn trigger(&mut self, node: &Node) -> Trigger {
        let mut t = Trigger {
            keywords: Vec::new(),
            regex: None,
            catch_all: None,
            scope: Scope::default(),
        };
        let Some(m) = self.map(node, "`trigger`", &["keywords", "regex", "catch_all", "to"]) else {
            return t;
        };
        if let Some((_, v)) = m.get("keywords") {
            for (kw, pos) in self.texts(v, "a trigger keyword").unwrap_or_default() {
                if normalize(&kw).is_empty() {
                    self.err(pos, format!("keyword `{kw}` is empty after normalisation"));
                } else {
                    t.keywords.push((kw, pos));
                }
            }
        }
        if let Some((_, v)) = m.get("regex") {
            t.regex = self.regex(v);
        }
        if let Some((k, v)) = m.get("catch_all") {
            if self.flag(v, "`catch_all`") == Some(true) {
                t.catch_all = Some(k.pos);
            }
        }
        if let Some((_, v)) = m.get("to") {
            t.scope = self.scope(v);
        }
        t
    }
}

/// `30s`, `15m`, `2h`, `1d`, or combinations like `1h30m`; at most 365 days.
pub(crate) fn parse_duration(text: &str) -> Option<i64> {
    let t = text.trim();
    if t.is_empty() {
        return None;
    }
    let mut total: i64 = 0;
    let mut num = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return None,
        };
        let n: i64 = num.parse().ok()?;
        num.clear();
        total = total.checked_add(n.checked_mul(unit)?)?;
    }
    if !num.is_empty() || total <= 0 || total > 365 * 86_400 {
        return None;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2h"), Some(7200));
        assert_eq!(parse_duration("1h30m"), Some(5400));
        assert_eq!(parse_duration("45s"), Some(45));
        assert_eq!(parse_duration("1d"), Some(86_400));
        for bad in [
            "",
            "2",
            "h",
            "2x",
            "0m",
            "-1h",
            "366d",
            "99999999999999999999d",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
