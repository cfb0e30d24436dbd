//! `{{var}}` templates in replies and `set:` values, and `{{= expr }}`
//! Rhai expressions inside them.
//!
//! Parsed once at load time (so a broken template is a load error, never a
//! runtime surprise) and rendered against a [`Vars`] view. Rendering
//! variables is total: a missing variable renders as its fallback or the
//! empty string. Expressions are compiled by `load` and evaluated through a
//! callback the engine passes in, which is the only way rendering can fail.
//! This module does not know where variables come from or which exist.

use std::collections::BTreeMap;
use std::fmt;

use super::script::{Expr, ScriptError};

/// A variable a template can name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Var {
    /// `{{name}}`: a run variable.
    Run(String),
    /// `{{contact.name}}`: a contact field.
    Contact(String),
    /// `{{message.body}}`, `{{message.from}}`, `{{message.to}}`.
    Message(MessageField),
    /// `{{match.N}}`: a numbered regex capture from this message.
    Match(usize),
    /// `{{call.status}}`, `{{call.json.order.eta}}`: the last HTTP call's
    /// answer (the path after `call.`).
    Call(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum MessageField {
    Body,
    From,
    To,
}

impl fmt::Display for Var {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Var::Run(n) => write!(f, "{n}"),
            Var::Contact(n) => write!(f, "contact.{n}"),
            Var::Message(MessageField::Body) => write!(f, "message.body"),
            Var::Message(MessageField::From) => write!(f, "message.from"),
            Var::Message(MessageField::To) => write!(f, "message.to"),
            Var::Match(i) => write!(f, "match.{i}"),
            Var::Call(path) => write!(f, "call.{path}"),
        }
    }
}

#[derive(Clone, Debug)]
enum Part {
    Lit(String),
    Var {
        var: Var,
        fallback: Option<String>,
    },
    /// `{{= src }}`; `expr` is filled in by `load` once compiled.
    Expr {
        src: String,
        expr: Option<Expr>,
    },
}

/// Compiled expressions compare by their source.
impl PartialEq for Part {
    fn eq(&self, other: &Part) -> bool {
        match (self, other) {
            (Part::Lit(a), Part::Lit(b)) => a == b,
            (
                Part::Var {
                    var: a,
                    fallback: fa,
                },
                Part::Var {
                    var: b,
                    fallback: fb,
                },
            ) => a == b && fa == fb,
            (Part::Expr { src: a, .. }, Part::Expr { src: b, .. }) => a == b,
            _ => false,
        }
    }
}

/// A parsed template.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Template {
    parts: Vec<Part>,
}

/// Why a template did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TemplateError {
    #[error("unclosed `{{{{` in template (add `}}}}`)")]
    Unclosed,
    #[error("empty `{{{{}}}}` in template")]
    Empty,
    #[error("empty `{{{{= }}}}` in template (write a Rhai expression after `=`)")]
    EmptyExpr,
    #[error("invalid variable name `{0}` in template (letters, digits and `_`, optionally `contact.`/`message.`/`match.` prefix)")]
    BadName(String),
    #[error("`{{{{call.{0}}}}}` is not part of a call's answer (use call.status, call.ok, call.error, call.json or call.json.a.b)")]
    BadCallPath(String),
}

/// Is `s` a plain identifier (`[A-Za-z_][A-Za-z0-9_]*`)?
pub(crate) fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parse a variable reference as it appears in a template or a `set:` key.
pub(crate) fn parse_var(name: &str) -> Option<Var> {
    if let Some(rest) = name.strip_prefix("contact.") {
        return is_ident(rest).then(|| Var::Contact(rest.to_owned()));
    }
    if let Some(rest) = name.strip_prefix("message.") {
        return match rest {
            "body" => Some(Var::Message(MessageField::Body)),
            "from" => Some(Var::Message(MessageField::From)),
            "to" => Some(Var::Message(MessageField::To)),
            _ => None,
        };
    }
    if let Some(rest) = name.strip_prefix("match.") {
        return rest.parse::<usize>().ok().map(Var::Match);
    }
    if let Some(rest) = name.strip_prefix("call.") {
        return super::calls::is_call_path(rest).then(|| Var::Call(rest.to_owned()));
    }
    is_ident(name).then(|| Var::Run(name.to_owned()))
}

impl Template {
    pub(crate) fn parse(src: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = src;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Lit(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let close = after.find("}}").ok_or(TemplateError::Unclosed)?;
            let inner = &after[..close];
            rest = &after[close + 2..];
            if let Some(src) = inner.trim_start().strip_prefix('=') {
                if src.trim().is_empty() {
                    return Err(TemplateError::EmptyExpr);
                }
                parts.push(Part::Expr {
                    src: src.to_owned(),
                    expr: None,
                });
                continue;
            }
            let (name, fallback) = match inner.split_once('|') {
                Some((n, f)) => (n.trim(), Some(f.trim().to_owned())),
                None => (inner.trim(), None),
            };
            if name.is_empty() {
                return Err(TemplateError::Empty);
            }
            let var = parse_var(name).ok_or_else(|| match name.strip_prefix("call.") {
                Some(path) => TemplateError::BadCallPath(path.to_owned()),
                None => TemplateError::BadName(name.to_owned()),
            })?;
            parts.push(Part::Var { var, fallback });
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_owned()));
        }
        Ok(Template { parts })
    }

    /// A template that is just this text.
    pub(crate) fn literal(text: &str) -> Template {
        Template {
            parts: vec![Part::Lit(text.to_owned())],
        }
    }

    /// The source of each `{{= }}` expression, in order, with the slot its
    /// compiled form goes in.
    pub(crate) fn exprs_mut(&mut self) -> impl Iterator<Item = (&str, &mut Option<Expr>)> {
        self.parts.iter_mut().filter_map(|p| match p {
            Part::Expr { src, expr } => Some((src.as_str(), expr)),
            _ => None,
        })
    }

    /// Does this template contain a `{{= }}` expression?
    pub(crate) fn has_exprs(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Expr { .. }))
    }

    /// The variables this template names.
    pub(crate) fn vars(&self) -> impl Iterator<Item = &Var> {
        self.parts.iter().filter_map(|p| match p {
            Part::Var { var, .. } => Some(var),
            Part::Lit(_) | Part::Expr { .. } => None,
        })
    }

    /// The template as an author would write it (`Thanks {{name}}!`), for
    /// diagrams and tools that show a flow without running it.
    pub(crate) fn source(&self) -> String {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Lit(s) => s.clone(),
                Part::Var {
                    var,
                    fallback: Some(f),
                } => format!("{{{{{var}|{f}}}}}"),
                Part::Var {
                    var,
                    fallback: None,
                } => format!("{{{{{var}}}}}"),
                Part::Expr { src, .. } => format!("{{{{= {src} }}}}"),
            })
            .collect()
    }

    /// The text with every variable replaced by its fallback (or nothing):
    /// the shortest this reply can be, used for length checks at load time.
    pub(crate) fn literal_text(&self) -> String {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Lit(s) => s.as_str(),
                Part::Var { fallback, .. } => fallback.as_deref().unwrap_or(""),
                Part::Expr { .. } => "",
            })
            .collect()
    }

    /// Renders a template without expressions (an expression renders as
    /// nothing; `load` only allows them where [`Template::try_render`] is
    /// used).
    #[cfg(test)]
    pub(crate) fn render(&self, vars: &Vars<'_>) -> String {
        self.try_render(vars, &mut |_| Ok(String::new()))
            .unwrap_or_default()
    }

    /// Renders the template, evaluating each `{{= }}` with `eval`. The
    /// first failing expression fails the whole render.
    pub(crate) fn try_render(
        &self,
        vars: &Vars<'_>,
        eval: &mut dyn FnMut(&Expr) -> Result<String, ScriptError>,
    ) -> Result<String, ScriptError> {
        self.render_parts(vars, eval, None)
    }

    /// [`Template::try_render`], passing what variables and expressions
    /// give through `escape` (the literal text as written is kept): a call's
    /// URL percent-encodes them so that a sender's text stays one value.
    pub(crate) fn try_render_escaped(
        &self,
        vars: &Vars<'_>,
        eval: &mut dyn FnMut(&Expr) -> Result<String, ScriptError>,
        escape: &dyn Fn(&str) -> String,
    ) -> Result<String, ScriptError> {
        self.render_parts(vars, eval, Some(escape))
    }

    /// The rendering, with what variables and expressions give passed
    /// through `escape` when there is one, into a string sized for the
    /// literal text and a short value per variable.
    fn render_parts(
        &self,
        vars: &Vars<'_>,
        eval: &mut dyn FnMut(&Expr) -> Result<String, ScriptError>,
        escape: Option<&dyn Fn(&str) -> String>,
    ) -> Result<String, ScriptError> {
        let size = self.parts.iter().fold(0, |n, part| match part {
            Part::Lit(s) => n + s.len(),
            _ => n + 16,
        });
        let mut out = String::with_capacity(size);
        let put = |out: &mut String, s: &str| match escape {
            Some(escape) => out.push_str(&escape(s)),
            None => out.push_str(s),
        };
        for part in &self.parts {
            match part {
                Part::Lit(s) => out.push_str(s),
                Part::Var { var, fallback } => match vars.lookup(var) {
                    Some(v) if !v.is_empty() => put(&mut out, v),
                    _ => put(&mut out, fallback.as_deref().unwrap_or("")),
                },
                Part::Expr { expr, .. } => {
                    if let Some(expr) = expr {
                        put(&mut out, &eval(expr)?);
                    }
                }
            }
        }
        Ok(out)
    }
}

/// A text whose only variables are contact fields (`{{contact.name}}`,
/// `{{contact.name|friend}}`): a broadcast's message, checked once when
/// the broadcast is made and rendered per contact.
#[derive(Clone, Debug, PartialEq)]
pub struct ContactText(Template);

impl ContactText {
    /// Check `src`: a template as in flows, with contact fields only (no
    /// run variables, `message.`, `match.`, `call.` or `{{= }}`), whose
    /// shortest rendering fits in `max_chars`. The error says why.
    pub fn parse(src: &str, max_chars: usize) -> Result<ContactText, String> {
        let t = Template::parse(src).map_err(|e| e.to_string())?;
        if t.has_exprs() {
            return Err(
                "`{{= }}` expressions are not allowed here: use contact fields, \
                        like {{contact.name}}"
                    .into(),
            );
        }
        if let Some(var) = t.vars().find(|v| !matches!(v, Var::Contact(_))) {
            return Err(format!(
                "`{{{{{var}}}}}`: only contact fields can be used here, like {{{{contact.name}}}} \
                 (or {{{{contact.name|friend}}}} for a fallback)"
            ));
        }
        let shortest = t.literal_text().chars().count();
        if shortest > max_chars {
            return Err(format!(
                "{shortest} characters without its fields: at most {max_chars}"
            ));
        }
        Ok(ContactText(t))
    }

    /// Whether it names no field (the same text for everyone).
    pub fn is_literal(&self) -> bool {
        self.0.vars().next().is_none()
    }

    /// The text for a contact with these fields (a missing or empty field
    /// renders as its fallback, or nothing).
    pub fn render(&self, contact: &BTreeMap<String, String>) -> String {
        let vars = Vars {
            run: None,
            contact,
            body: "",
            from: "",
            to: "",
            captures: &[],
            call: &BTreeMap::new(),
        };
        self.0
            .try_render(&vars, &mut |_| Ok(String::new()))
            .unwrap_or_default()
    }
}

/// What a template can see while rendering.
pub(crate) struct Vars<'a> {
    pub run: Option<&'a BTreeMap<String, String>>,
    pub contact: &'a BTreeMap<String, String>,
    pub body: &'a str,
    pub from: &'a str,
    pub to: &'a str,
    /// Numbered captures of the route regex that matched this message.
    pub captures: &'a [String],
    /// The last HTTP call's answer, flattened (`status`, `json.order.eta`);
    /// empty before any call of this message.
    pub call: &'a BTreeMap<String, String>,
}

impl Vars<'_> {
    fn lookup(&self, var: &Var) -> Option<&str> {
        match var {
            Var::Run(n) => self.run.and_then(|r| r.get(n)).map(String::as_str),
            Var::Contact(n) => self.contact.get(n).map(String::as_str),
            Var::Message(MessageField::Body) => Some(self.body),
            Var::Message(MessageField::From) => Some(self.from),
            Var::Message(MessageField::To) => Some(self.to),
            Var::Match(i) => self.captures.get(*i).map(String::as_str),
            Var::Call(path) => self.call.get(path).map(String::as_str),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(t: &str, run: &[(&str, &str)]) -> String {
        let run: BTreeMap<String, String> = run
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let contact = BTreeMap::from([("name".to_owned(), "Ann".to_owned())]);
        let caps = vec!["whole".to_owned(), "one".to_owned()];
        let vars = Vars {
            run: Some(&run),
            contact: &contact,
            body: "hi",
            from: "+1",
            to: "+2",
            captures: &caps,
            call: &BTreeMap::new(),
        };
        Template::parse(t).unwrap().render(&vars)
    }

    #[test]
    fn renders_every_kind() {
        assert_eq!(render("Hi {{ x }}!", &[("x", "Bo")]), "Hi Bo!");
        assert_eq!(render("{{contact.name}}", &[]), "Ann");
        assert_eq!(
            render("{{message.body}}/{{message.from}}/{{message.to}}", &[]),
            "hi/+1/+2"
        );
        assert_eq!(render("{{match.1}}{{match.9}}", &[]), "one");
        assert_eq!(render("Hi {{missing}}.", &[]), "Hi .");
        assert_eq!(render("Hi {{missing|friend}}.", &[]), "Hi friend.");
        assert_eq!(render("Hi {{x|friend}}.", &[("x", "")]), "Hi friend.");
        assert_eq!(render("a }} b { c", &[]), "a }} b { c");
    }

    #[test]
    fn contact_texts_take_contact_fields_only() {
        let t = ContactText::parse("Hi {{contact.name|friend}}, {{ contact.day }}!", 1600).unwrap();
        assert!(!t.is_literal());
        let ana = BTreeMap::from([("name".to_owned(), "Ana".to_owned())]);
        assert_eq!(t.render(&ana), "Hi Ana, !");
        assert_eq!(t.render(&BTreeMap::new()), "Hi friend, !");
        assert!(ContactText::parse("plain", 1600).unwrap().is_literal());
        for (src, why) in [
            ("Hi {{name}}", "only contact fields"),
            ("Hi {{message.body}}", "only contact fields"),
            ("{{= 1 + 1 }}", "expressions"),
            ("Hi {{contact.name", "unclosed"),
            ("{{contact.na me}}", "invalid variable name"),
            ("12345{{contact.x|678}}", "at most 6"),
        ] {
            let e = ContactText::parse(src, 6).unwrap_err();
            assert!(e.contains(why), "{src}: {e}");
        }
    }

    #[test]
    fn rejects_broken() {
        assert_eq!(Template::parse("Hi {{name"), Err(TemplateError::Unclosed));
        assert_eq!(Template::parse("{{ }}"), Err(TemplateError::Empty));
        assert_eq!(Template::parse("{{= }}"), Err(TemplateError::EmptyExpr));
        assert!(matches!(
            Template::parse("{{a b}}"),
            Err(TemplateError::BadName(_))
        ));
        assert!(matches!(
            Template::parse("{{message.x}}"),
            Err(TemplateError::BadName(_))
        ));
    }

    #[test]
    fn expressions_are_parts_of_their_own() {
        let mut t = Template::parse("Total: {{= vars.a * 2 }} for {{name}}{{=1}}").unwrap();
        assert!(t.has_exprs());
        let srcs: Vec<String> = t.exprs_mut().map(|(s, _)| s.to_owned()).collect();
        assert_eq!(srcs, [" vars.a * 2 ", "1"]);
        assert_eq!(t.literal_text(), "Total:  for ");
        assert_eq!(t.vars().count(), 1);
        assert!(!Template::parse("{{x}}").unwrap().has_exprs());
    }

    proptest::proptest! {
        #[test]
        fn parse_and_render_never_panic(src in "(\\{\\{|\\}\\}|\\||contact\\.|match\\.|message\\.|[a-z0-9 ]|\\PC){0,40}") {
            if let Ok(t) = Template::parse(&src) {
                let _ = t.render(&Vars {
                    run: None,
                    contact: &BTreeMap::new(),
                    body: "b",
                    from: "f",
                    to: "t",
                    captures: &[],
                    call: &BTreeMap::new(),
                });
                let _ = t.literal_text();
            }
        }
    }
}
