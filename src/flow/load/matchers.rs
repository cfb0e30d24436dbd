//! Route matchers (`any_of`, `exact`, `contains`, `starts_with`, `regex`,
//! `number`, `yes`, `no`, `anything`, `else`, `when`): the key names a route
//! may use and each one's value, parsed into a [`Matcher`] (see "Matchers"
//! in flows/README.md). How a matcher matches is `flow::matcher`; this file
//! only reads and checks what the author wrote.

use regex::{Regex, RegexBuilder};

use crate::flow::matcher::{normalize, phrase_words};
use crate::flow::model::{Matcher, Pos};
use crate::flow::yaml::{Kind, Node};

use super::templates::byte_offset;
use super::Cx;

/// A flow's `regex:`, or why it is refused.
fn compile_regex(src: &str) -> Result<Regex, String> {
    // Bounded so a pathological pattern cannot eat memory at load time;
    // matching itself is linear in Rust's regex engine.
    RegexBuilder::new(src)
        .size_limit(1 << 20)
        .dfa_size_limit(1 << 20)
        .build()
        .map_err(|e| {
            let text = e.to_string();
            let last = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .trim_start_matches("error: ")
                .to_owned();
            format!("invalid regex: {last}")
        })
}

pub(super) const MATCHERS: &[&str] = &[
    "any_of",
    "exact",
    "contains",
    "starts_with",
    "regex",
    "number",
    "yes",
    "no",
    "anything",
    "else",
    "when",
];

impl Cx<'_> {
    pub(super) fn regex(&mut self, node: &Node) -> Option<Regex> {
        let src = self.text(node, "`regex`")?;
        let compiled = match self.compiled.regexes.get(&src) {
            Some(done) => done.clone(),
            None => {
                let done = compile_regex(&src);
                self.compiled.regexes.insert(src, done.clone());
                done
            }
        };
        compiled.map_err(|e| self.err(node.pos, e)).ok()
    }

    pub(super) fn matcher(&mut self, kind: &str, v: &Node) -> Option<Matcher> {
        Some(match kind {
            "any_of" => {
                let mut phrases = Vec::new();
                for (w, pos) in self.texts(v, "`any_of`")? {
                    let p = phrase_words(&w);
                    if p.is_empty() {
                        self.err(pos, format!("`{w}` has no words to match"));
                    } else {
                        phrases.push(p);
                    }
                }
                Matcher::AnyOf(phrases)
            }
            "exact" => {
                let mut list = Vec::new();
                for (w, pos) in self.texts(v, "`exact`")? {
                    let n = normalize(&w);
                    if n.is_empty() {
                        self.err(pos, format!("`{w}` is empty after normalisation"));
                    } else {
                        list.push(n);
                    }
                }
                Matcher::Exact(list)
            }
            "contains" | "starts_with" => {
                let t = self.text(v, &format!("`{kind}`"))?.to_lowercase();
                if t.is_empty() {
                    self.err(v.pos, format!("`{kind}` needs some text"));
                    return None;
                }
                if kind == "contains" {
                    Matcher::Contains(t)
                } else {
                    Matcher::StartsWith(t)
                }
            }
            "regex" => Matcher::Regex(self.regex(v)?),
            "number" => self.number(v)?,
            "yes" => self.must_be_true(v, "yes").then_some(Matcher::Yes)?,
            "no" => self.must_be_true(v, "no").then_some(Matcher::No)?,
            "anything" => self
                .must_be_true(v, "anything")
                .then_some(Matcher::Anything)?,
            "when" => {
                let src = self.text(v, "`when` (a Rhai condition)")?;
                let mut cursor = byte_offset(self.source, v.pos);
                Matcher::When(self.expr(v.pos, &src, &mut cursor)?)
            }
            _ => self.must_be_true(v, "else").then_some(Matcher::Else)?,
        })
    }

    fn number(&mut self, v: &Node) -> Option<Matcher> {
        let bad = "`number` is true, integer, a range like 13..120, or {min: 13, max: 120, integer: true}";
        match &v.kind {
            Kind::Map(_) => {
                let m = self.map(v, "`number`", &["min", "max", "integer"])?;
                let mut bound = |key: &str| -> Option<Option<f64>> {
                    match m.get(key) {
                        None => Some(None),
                        Some((_, n)) => {
                            let t = self.text(n, &format!("`{key}`"))?;
                            match t.parse::<f64>() {
                                Ok(x) if x.is_finite() => Some(Some(x)),
                                _ => {
                                    self.err(n.pos, format!("`{key}` must be a number, got `{t}`"));
                                    None
                                }
                            }
                        }
                    }
                };
                let (min, max) = (bound("min")?, bound("max")?);
                let integer = match m.get("integer") {
                    None => false,
                    Some((_, n)) => self.flag(n, "`integer`")?,
                };
                if integer {
                    for (key, b) in [("min", min), ("max", max)] {
                        if let (Some(x), Some((_, n))) = (b, m.get(key)) {
                            if x.fract() != 0.0 {
                                self.err(
                                    n.pos,
                                    format!("`{key}` must be a whole number with `integer: true`, got {x}"),
                                );
                                return None;
                            }
                        }
                    }
                }
                self.range(min, max, integer, v.pos)
            }
            Kind::Scalar(s, _) if s == "true" || s == "True" => Some(Matcher::Number {
                min: None,
                max: None,
                integer: false,
            }),
            Kind::Scalar(s, _) if s == "integer" => Some(Matcher::Number {
                min: None,
                max: None,
                integer: true,
            }),
            Kind::Scalar(s, _) => {
                let Some((a, b)) = s.split_once("..") else {
                    self.err(v.pos, bad);
                    return None;
                };
                let parse = |x: &str| -> Result<Option<f64>, ()> {
                    let x = x.trim();
                    if x.is_empty() {
                        return Ok(None);
                    }
                    x.parse::<f64>()
                        .ok()
                        .filter(|f| f.is_finite())
                        .map(Some)
                        .ok_or(())
                };
                match (parse(a), parse(b)) {
                    (Ok(min), Ok(max)) => self.range(min, max, false, v.pos),
                    _ => {
                        self.err(v.pos, format!("invalid number range `{s}`; {bad}"));
                        None
                    }
                }
            }
            Kind::Seq(_) => {
                self.err(v.pos, bad);
                None
            }
        }
    }

    fn range(
        &mut self,
        min: Option<f64>,
        max: Option<f64>,
        integer: bool,
        pos: Pos,
    ) -> Option<Matcher> {
        if let (Some(a), Some(b)) = (min, max) {
            if a > b {
                self.err(pos, format!("number range is empty: {a} is more than {b}"));
                return None;
            }
        }
        Some(Matcher::Number { min, max, integer })
    }
}
