//! Flows directory -> validated [`FlowSet`], or every problem found.
//!
//! Reads the `*.yaml`/`*.yml` files of one directory (not subdirectories),
//! turns each into model values while reporting schema problems at the exact
//! key or value, then hands the whole set to `check` for cross-file rules.
//! It never stops at the first problem: an author fixes a file in one pass.
//! Rhai is compiled here too, once per load, in one sandbox per set: the
//! `*.rhai` files flows name with `script:`, `when:` conditions and `{{= }}`
//! expressions (errors located in the YAML file). `*.rhai` files anywhere
//! under the directory count towards the set's version, because scripts
//! import them. This module does not know the engine, HTTP or the store.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use regex::{Regex, RegexBuilder};
use sha2::{Digest, Sha256};

use super::check::{self, ReservedWords};
use super::matcher::{normalize, phrase_words};
use super::model::{
    hex, Assign, DefaultReply, Diagnostic, Flow, FlowSet, KeywordRule, Matcher, Message, Next,
    Origin, Pos, RegexTrigger, Retry, Route, Scope, ScopedFlow, ScriptFlow, SetInner, Severity,
    Step, Target, Transition, DEFAULT_RETRY_LIMIT,
};
use super::script::{Expr, Limits, Sandbox, ScriptError, ENTRY_POINT};
use super::segments;
use super::template::{is_ident, parse_var, Template, Var};
use super::yaml::{self, Kind, Node};
use crate::twilio::limits::MAX_MEDIA;

/// Largest flow file we read.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// Most messages one step (or route, or keyword) may send.
pub const MAX_MESSAGES: usize = super::engine::MAX_REPLIES;
/// Longest literal reply, in characters (one SMS message's limit). Replies
/// that only render longer, from templates or scripts, are split instead.
pub const MAX_REPLY_CHARS: usize = super::engine::MAX_BODY_CHARS;
/// Expiry when a flow does not say.
pub const DEFAULT_EXPIRE_SECS: i64 = 24 * 3600;

/// A successfully loaded set plus the warnings worth showing.
#[derive(Debug)]
pub struct Loaded {
    pub set: FlowSet,
    pub warnings: Vec<Diagnostic>,
}

/// Load and validate every flow file in `dir`. On any error, returns every
/// diagnostic found (errors and warnings, sorted by file and position).
/// Scripts run within the default [`Limits`].
pub fn load_dir(dir: &Path) -> Result<Loaded, Vec<Diagnostic>> {
    load_dir_with(dir, Limits::default())
}

/// [`load_dir`], with scripts and expressions running within `limits`.
pub fn load_dir_with(dir: &Path, limits: Limits) -> Result<Loaded, Vec<Diagnostic>> {
    let (set, diags) = build(dir, limits, &ReservedWords::default());
    if diags.iter().any(|d| d.severity == Severity::Error) {
        Err(diags)
    } else {
        Ok(Loaded {
            set,
            warnings: diags,
        })
    }
}

/// Every error and warning for `dir`: what `smsflow check` prints.
pub fn check_dir(dir: &Path) -> Vec<Diagnostic> {
    check_dir_with(dir, &ReservedWords::default())
}

/// [`check_dir`], warning about the words a configured server takes
/// before flows see them (`smsflow check --config`).
pub fn check_dir_with(dir: &Path, reserved: &ReservedWords) -> Vec<Diagnostic> {
    build(dir, Limits::default(), reserved).1
}

/// What compiling Rhai needs across the files of one load.
struct ScriptEnv {
    /// The set's one sandbox; imports resolve inside the flows directory.
    sandbox: Arc<Sandbox>,
    /// Top-level `*.rhai` files by file name, with their text.
    sources: BTreeMap<String, (PathBuf, String)>,
    /// Every `*.rhai` file under the flows directory (modules included) by
    /// its path relative to it, `/`-separated, as `import` names it.
    modules: BTreeMap<String, String>,
    /// File names some flow's `script:` names.
    used: BTreeSet<String>,
    /// Something was compiled, so the set keeps the sandbox.
    compiled: bool,
}

fn build(dir: &Path, limits: Limits, reserved: &ReservedWords) -> (FlowSet, Vec<Diagnostic>) {
    let mut diags = Vec::new();
    let mut hasher = Sha256::new();
    let mut files = Vec::new();
    let mut docs = Vec::new();
    // Scripts are read first because flow files name them; they are hashed
    // after the YAML files so that a set without scripts keeps its version.
    let mut rhai = Vec::new();
    for path in rhai_files(dir) {
        if let Some(text) = read_file(&path, &mut diags) {
            rhai.push((path, text));
        }
    }
    let mut env = ScriptEnv {
        sandbox: Arc::new(Sandbox::new(limits, Some(dir))),
        sources: rhai
            .iter()
            .filter(|(path, _)| path.parent() == Some(dir))
            .filter_map(|(path, text)| {
                let name = path.file_name()?.to_string_lossy().into_owned();
                Some((name, (path.clone(), text.clone())))
            })
            .collect(),
        modules: rhai
            .iter()
            .filter_map(|(path, text)| {
                let rel = path.strip_prefix(dir).ok()?;
                let parts: Vec<_> = rel.iter().map(|p| p.to_string_lossy()).collect();
                Some((parts.join("/"), text.clone()))
            })
            .collect(),
        used: BTreeSet::new(),
        compiled: false,
    };
    for path in flow_files(dir, &mut diags) {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some(text) = read_file(&path, &mut diags) else {
            continue;
        };
        // Length-prefixed so that ("ab","c") and ("a","bc") hash differently.
        hasher.update((name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update((text.len() as u64).to_le_bytes());
        hasher.update(text.as_bytes());
        files.push(path.clone());
        let mut cx = Cx {
            file: path.clone(),
            diags: &mut diags,
            source: &text,
            env: &mut env,
            no_exprs: Some(
                "`{{= }}` expressions are only allowed in flow files, not in keyword replies",
            ),
        };
        match yaml::parse(&text) {
            Err(e) => cx.err(e.pos, e.message),
            Ok(None) => cx.warn(Pos { line: 1, column: 1 }, "empty file"),
            Ok(Some(root)) => {
                let stem = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if let Some(doc) = cx.file_doc(&root, &stem) {
                    docs.push(doc);
                }
            }
        }
    }
    for (path, text) in &rhai {
        let name = path
            .strip_prefix(dir)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned();
        hasher.update((name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update((text.len() as u64).to_le_bytes());
        hasher.update(text.as_bytes());
        files.push(path.clone());
    }
    files.sort();
    unused_scripts(&env, &mut diags);
    let mut inner = SetInner {
        version: hex(&hasher.finalize()),
        files,
        sandbox: env.compiled.then(|| env.sandbox.clone()),
        ..SetInner::default()
    };
    assemble(&mut inner, docs, &mut diags);
    check::check(&inner, reserved, &mut diags);
    diags.sort_by(|a, b| {
        (&a.file, a.line, a.column, a.severity).cmp(&(&b.file, b.line, b.column, b.severity))
    });
    diags.dedup();
    (
        FlowSet {
            inner: std::sync::Arc::new(inner),
        },
        diags,
    )
}

/// The flow files of `dir`, sorted by name. Dot-files, other extensions
/// (`.chat` transcripts, `.rhai`, `.md`) and subdirectories are skipped.
fn flow_files(dir: &Path, diags: &mut Vec<Diagnostic>) -> Vec<PathBuf> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            diags.push(whole_file(dir, format!("cannot read flows directory: {e}")));
            return Vec::new();
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            let ext = p
                .extension()
                .map(|e| e.to_string_lossy())
                .unwrap_or_default();
            !name.starts_with('.') && (ext == "yaml" || ext == "yml") && p.is_file()
        })
        .collect();
    paths.sort();
    paths
}

/// Every `*.rhai` file under `dir` (scripts at the top level, modules in
/// subdirectories), sorted. Dot-files and dot-directories are skipped, and
/// the walk stops a few levels down.
fn rhai_files(dir: &Path) -> Vec<PathBuf> {
    const MAX_DEPTH: usize = 8;
    let mut out = Vec::new();
    let mut todo = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for p in entries.filter_map(Result::ok).map(|e| e.path()) {
            let hidden = p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if hidden {
                continue;
            }
            if p.is_dir() {
                if depth < MAX_DEPTH {
                    todo.push((p, depth + 1));
                }
            } else if p.extension().is_some_and(|e| e == "rhai") && p.is_file() {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Warns about top-level scripts that no flow names and no used script
/// imports: probably a forgotten `script:` line.
fn unused_scripts(env: &ScriptEnv, diags: &mut Vec<Diagnostic>) {
    static IMPORT: OnceLock<Option<Regex>> = OnceLock::new();
    let import = IMPORT.get_or_init(|| Regex::new(r#"\bimport\s+"([^"]+)""#).ok());
    let mut used = env.used.clone();
    let mut todo: Vec<String> = used.iter().cloned().collect();
    while let Some(name) = todo.pop() {
        let Some((_, text)) = env.sources.get(&name) else {
            continue;
        };
        for caps in import.iter().flat_map(|re| re.captures_iter(text)) {
            let module = &caps[1];
            let file = if module.ends_with(".rhai") {
                module.to_owned()
            } else {
                format!("{module}.rhai")
            };
            if env.sources.contains_key(&file) && used.insert(file.clone()) {
                todo.push(file);
            }
        }
    }
    for (name, (path, _)) in &env.sources {
        if !used.contains(name) {
            diags.push(Diagnostic {
                file: path.clone(),
                line: 0,
                column: 0,
                severity: Severity::Warning,
                message: format!(
                    "not used by any flow (name it with `script: {name}` in a flow file; \
                     put modules in a subdirectory such as lib/)"
                ),
            });
        }
    }
}

/// Contact fields a script sets with a literal name, following the modules
/// it imports (and theirs), or `None` when it may set fields `check` cannot
/// see: a computed field name, an import whose path is not a literal, or a
/// module not found among `modules` (every `*.rhai` file of the flows
/// directory by relative path). Reads the text only, so it answers for a
/// script that does not compile too.
fn script_contact_fields(source: &str, modules: &BTreeMap<String, String>) -> Option<Vec<String>> {
    static LITERAL: OnceLock<Option<Regex>> = OnceLock::new();
    static ANY: OnceLock<Option<Regex>> = OnceLock::new();
    static IMPORT: OnceLock<Option<Regex>> = OnceLock::new();
    static ANY_IMPORT: OnceLock<Option<Regex>> = OnceLock::new();
    let literal = LITERAL
        .get_or_init(|| Regex::new(r#"\bset_contact\s*\(\s*"([A-Za-z0-9_]+)"\s*,"#).ok())
        .as_ref()?;
    let any = ANY
        .get_or_init(|| Regex::new(r"\bset_contact\b").ok())
        .as_ref()?;
    let import = IMPORT
        .get_or_init(|| Regex::new(r#"\bimport\s+"([^"]+)""#).ok())
        .as_ref()?;
    let any_import = ANY_IMPORT
        .get_or_init(|| Regex::new(r"\bimport\b").ok())
        .as_ref()?;
    let mut fields = Vec::new();
    let mut seen = BTreeSet::new();
    let mut todo = vec![source];
    while let Some(text) = todo.pop() {
        let found: Vec<String> = literal
            .captures_iter(text)
            .map(|c| c[1].to_owned())
            .collect();
        if any.find_iter(text).count() != found.len() {
            return None;
        }
        fields.extend(found);
        let imports: Vec<&str> = import
            .captures_iter(text)
            .filter_map(|c| c.get(1).map(|m| m.as_str()))
            .collect();
        if any_import.find_iter(text).count() != imports.len() {
            return None;
        }
        for module in imports {
            let file = if module.ends_with(".rhai") {
                module.to_owned()
            } else {
                format!("{module}.rhai")
            };
            if seen.insert(file.clone()) {
                todo.push(modules.get(&file)?);
            }
        }
    }
    Some(fields)
}

/// Byte offset of a 1-based line and (character) column in `source`.
fn byte_offset(source: &str, pos: Pos) -> usize {
    let mut start = 0;
    for _ in 1..pos.line {
        match source[start..].find('\n') {
            Some(i) => start += i + 1,
            None => return source.len(),
        }
    }
    source[start..]
        .char_indices()
        .nth(pos.column.saturating_sub(1))
        .map_or(source.len(), |(i, _)| start + i)
}

/// 1-based line and (character) column of a byte offset in `source`.
fn pos_at(source: &str, at: usize) -> Pos {
    let before = &source[..at];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    Pos {
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
    }
}

fn whole_file(path: &Path, message: String) -> Diagnostic {
    Diagnostic {
        file: path.to_path_buf(),
        line: 0,
        column: 0,
        severity: Severity::Error,
        message,
    }
}

fn read_file(path: &Path, diags: &mut Vec<Diagnostic>) -> Option<String> {
    let at_start = |message: String| Diagnostic {
        file: path.to_path_buf(),
        line: 1,
        column: 1,
        severity: Severity::Error,
        message,
    };
    match std::fs::metadata(path) {
        Ok(m) if m.len() > MAX_FILE_BYTES => {
            diags.push(at_start(format!(
                "file is {} bytes; flow files are limited to {MAX_FILE_BYTES} bytes (1 MiB)",
                m.len()
            )));
            return None;
        }
        Ok(_) => {}
        Err(e) => {
            diags.push(whole_file(path, format!("cannot read file: {e}")));
            return None;
        }
    }
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            diags.push(whole_file(path, format!("cannot read file: {e}")));
            return None;
        }
    };
    match String::from_utf8(bytes) {
        Ok(s) => Some(s),
        Err(e) => {
            let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let line = good.iter().filter(|b| **b == b'\n').count() + 1;
            let col_start = good.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            let column = String::from_utf8_lossy(&good[col_start..]).chars().count() + 1;
            diags.push(Diagnostic {
                file: path.to_path_buf(),
                line,
                column,
                severity: Severity::Error,
                message: "file is not valid UTF-8".into(),
            });
            None
        }
    }
}

/// One parsed file, before cross-file assembly.
pub(crate) enum Doc {
    Keywords {
        keywords: Vec<KeywordRule>,
        default: Option<DefaultReply>,
    },
    Flow {
        flow: Box<Flow>,
        name_pos: Pos,
        trigger: Trigger,
    },
}

pub(crate) struct Trigger {
    keywords: Vec<(String, Pos)>,
    regex: Option<Regex>,
    catch_all: Option<Pos>,
    scope: Scope,
}

fn assemble(inner: &mut SetInner, docs: Vec<Doc>, diags: &mut Vec<Diagnostic>) {
    for doc in docs {
        match doc {
            Doc::Keywords {
                keywords, default, ..
            } => {
                inner.keywords.extend(keywords);
                inner.defaults.extend(default);
            }
            Doc::Flow {
                flow,
                name_pos,
                trigger,
            } => {
                if let Some(first) = inner.flows.get(&flow.name) {
                    diags.push(Diagnostic {
                        file: flow.file.clone(),
                        line: name_pos.line,
                        column: name_pos.column,
                        severity: Severity::Error,
                        message: format!(
                            "flow `{}` is already defined in {}",
                            flow.name,
                            first.file.display()
                        ),
                    });
                    continue;
                }
                for (kw, pos) in trigger.keywords {
                    inner.keywords.push(KeywordRule {
                        words: phrase_words(&kw),
                        first_word: true,
                        say: Vec::new(),
                        flow: Some(Target {
                            name: flow.name.clone(),
                            pos,
                        }),
                        scope: trigger.scope.clone(),
                        origin: Origin {
                            file: flow.file.clone(),
                            pos,
                        },
                        display: kw,
                    });
                }
                if let Some(regex) = trigger.regex {
                    inner.regex_triggers.push(RegexTrigger {
                        regex,
                        flow: flow.name.clone(),
                        scope: trigger.scope.clone(),
                    });
                }
                if let Some(pos) = trigger.catch_all {
                    inner.catch_alls.push(ScopedFlow {
                        flow: flow.name.clone(),
                        scope: trigger.scope.clone(),
                        origin: Origin {
                            file: flow.file.clone(),
                            pos,
                        },
                    });
                }
                inner.flows.insert(flow.name.clone(), *flow);
            }
        }
    }
}

/// Per-file conversion context: where diagnostics go, the file's text (to
/// locate expressions inside YAML values) and the set's scripts.
struct Cx<'d> {
    file: PathBuf,
    diags: &'d mut Vec<Diagnostic>,
    source: &'d str,
    env: &'d mut ScriptEnv,
    /// Why `{{= }}` is refused here, or `None` where it is allowed.
    no_exprs: Option<&'static str>,
}

const MATCHERS: &[&str] = &[
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
    fn push(&mut self, pos: Pos, severity: Severity, message: String) {
        self.diags.push(Diagnostic {
            file: self.file.clone(),
            line: pos.line,
            column: pos.column,
            severity,
            message,
        });
    }

    fn err(&mut self, pos: Pos, message: impl Into<String>) {
        self.push(pos, Severity::Error, message.into());
    }

    fn warn(&mut self, pos: Pos, message: impl Into<String>) {
        self.push(pos, Severity::Warning, message.into());
    }

    /// The entries of a mapping whose keys are all in `allowed`; reports
    /// a non-mapping, non-text keys, duplicates and unknown keys.
    fn map<'n>(
        &mut self,
        node: &'n Node,
        what: &str,
        allowed: &[&str],
    ) -> Option<BTreeMap<&'n str, (&'n Node, &'n Node)>> {
        let Kind::Map(entries) = &node.kind else {
            self.err(
                node.pos,
                format!("expected a mapping for {what}, found {}", node.describe()),
            );
            return None;
        };
        let mut out: BTreeMap<&'n str, (&'n Node, &'n Node)> = BTreeMap::new();
        for (k, v) in entries {
            let Kind::Scalar(key, _) = &k.kind else {
                self.err(k.pos, format!("keys in {what} must be text"));
                continue;
            };
            if let Some((first, _)) = out.get(key.as_str()) {
                let msg = format!(
                    "duplicate key `{key}` in {what} (first at line {})",
                    first.pos.line
                );
                self.err(k.pos, msg);
                continue;
            }
            if !allowed.is_empty() && !allowed.contains(&key.as_str()) {
                self.err(
                    k.pos,
                    format!(
                        "unknown key `{key}` in {what} (expected one of: {})",
                        allowed.join(", ")
                    ),
                );
                continue;
            }
            out.insert(key.as_str(), (k, v));
        }
        Some(out)
    }

    fn text(&mut self, node: &Node, what: &str) -> Option<String> {
        match &node.kind {
            Kind::Scalar(s, _) if !node.is_null() => Some(s.clone()),
            _ => {
                self.err(
                    node.pos,
                    format!("expected text for {what}, found {}", node.describe()),
                );
                None
            }
        }
    }

    fn flag(&mut self, node: &Node, what: &str) -> Option<bool> {
        match &node.kind {
            Kind::Scalar(s, _) => match s.as_str() {
                "true" | "True" | "TRUE" => Some(true),
                "false" | "False" | "FALSE" => Some(false),
                _ => {
                    self.err(node.pos, format!("expected true or false for {what}"));
                    None
                }
            },
            _ => {
                self.err(
                    node.pos,
                    format!(
                        "expected true or false for {what}, found {}",
                        node.describe()
                    ),
                );
                None
            }
        }
    }

    /// `true` for matchers like `else: true`.
    fn must_be_true(&mut self, node: &Node, what: &str) -> bool {
        match self.flag(node, what) {
            Some(true) => true,
            Some(false) => {
                self.err(
                    node.pos,
                    format!("`{what}: false` means nothing; remove it"),
                );
                false
            }
            None => false,
        }
    }

    /// A list of text items; a single text is a one-item list.
    fn texts(&mut self, node: &Node, what: &str) -> Option<Vec<(String, Pos)>> {
        match &node.kind {
            Kind::Seq(items) => Some(
                items
                    .iter()
                    .filter_map(|i| self.text(i, what).map(|t| (t, i.pos)))
                    .collect(),
            ),
            _ => self.text(node, what).map(|t| vec![(t, node.pos)]),
        }
    }

    fn ident(&mut self, node: &Node, what: &str) -> Option<String> {
        let t = self.text(node, what)?;
        if is_ident(&t) {
            Some(t)
        } else {
            self.err(
                node.pos,
                format!("{what} must be a name of letters, digits and `_`, got `{t}`"),
            );
            None
        }
    }

    fn step_name(&mut self, node: &Node, what: &str) -> Option<Target> {
        let name = self.text(node, what)?;
        Some(Target {
            name,
            pos: node.pos,
        })
    }

    fn scope(&mut self, node: &Node) -> Scope {
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

    fn template(&mut self, text: &str, pos: Pos) -> Option<Template> {
        let mut template = match Template::parse(text) {
            Ok(t) => t,
            Err(e) => {
                self.err(pos, e.to_string());
                return None;
            }
        };
        if template.has_exprs() {
            if let Some(why) = self.no_exprs {
                self.err(pos, why);
                return None;
            }
            let mut cursor = byte_offset(self.source, pos);
            let mut ok = true;
            for (src, slot) in template.exprs_mut() {
                *slot = self.expr(pos, src, &mut cursor);
                ok &= slot.is_some();
            }
            if !ok {
                return None;
            }
        }
        Some(template)
    }

    /// Compiles a Rhai expression written in the YAML value at `pos`.
    /// Errors point into this file: the expression text is looked up in the
    /// file from `*cursor` on (advanced past it, so that two expressions in
    /// one value get their own positions), which also gets quoted and block
    /// scalars right; when it is not found verbatim (YAML escapes), the
    /// value's own position is used.
    fn expr(&mut self, pos: Pos, src: &str, cursor: &mut usize) -> Option<Expr> {
        /// How far past the value's start an expression is looked for.
        const WINDOW: usize = 64 * 1024;
        let first_line = src.lines().next().unwrap_or("");
        let from = (*cursor).min(self.source.len());
        let window = &self.source[from..self.source.len().min(from + WINDOW + src.len())];
        let at = match window.find(first_line) {
            Some(i) if !first_line.trim().is_empty() => {
                *cursor = from + i + first_line.len();
                pos_at(self.source, from + i)
            }
            _ => pos,
        };
        match self
            .env
            .sandbox
            .compile_expr(&self.file, at.line, at.column, src)
        {
            Ok(expr) => {
                self.env.compiled = true;
                Some(expr)
            }
            Err(e) => {
                self.script_err(&e);
                None
            }
        }
    }

    /// A compile error in Rhai, located in its own file (a `.rhai` file,
    /// or this YAML file for an expression).
    fn script_err(&mut self, e: &ScriptError) {
        let (line, column) = e.line_column().unwrap_or((0, 0));
        self.diags.push(Diagnostic {
            file: e.file().to_path_buf(),
            line,
            column,
            severity: Severity::Error,
            message: e.message(),
        });
    }

    /// `script: quiz.rhai`: compiles that top-level file of the flows
    /// directory. When that fails (the error is reported), the flow still
    /// gets a script without code, so `check` reports only that error and
    /// not, as well, "unknown flow" where the flow is named or "never set"
    /// for the contact fields its script sets.
    fn script(&mut self, node: &Node) -> Option<ScriptFlow> {
        let name = self.text(node, "`script`")?;
        let plain =
            name.ends_with(".rhai") && !name.starts_with('.') && !name.contains(['/', '\\', ':']);
        if !plain {
            self.err(
                node.pos,
                format!("`script` names a .rhai file in the flows directory, like quiz.rhai, not `{name}`"),
            );
            return Some(ScriptFlow::broken(None));
        }
        self.env.used.insert(name.clone());
        let Some((path, text)) = self.env.sources.get(&name) else {
            self.err(
                node.pos,
                format!("script `{name}` not found in the flows directory"),
            );
            return Some(ScriptFlow::broken(None));
        };
        let compiled = self.env.sandbox.compile_script(path, text);
        let contact_fields = script_contact_fields(text, &self.env.modules);
        let script = match compiled {
            Ok(script) => {
                self.env.compiled = true;
                Some(script)
            }
            Err(e) => {
                self.script_err(&e);
                None
            }
        };
        Some(ScriptFlow {
            script,
            contact_fields,
        })
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

    /// One reply message from text; checks its length.
    fn message(&mut self, text: &str, media: Vec<String>, pos: Pos) -> Option<Message> {
        let template = self.template(text, pos)?;
        let literal = template.literal_text();
        let chars = literal.chars().count();
        if chars > MAX_REPLY_CHARS {
            self.err(
                pos,
                format!(
                    "reply is {chars} characters; SMS replies are limited to {MAX_REPLY_CHARS}"
                ),
            );
        } else {
            let seg = segments::count(&literal);
            if seg.count > 1 {
                let (one, enc) = (seg.encoding.single_segment(), seg.encoding.as_str());
                self.warn(
                    pos,
                    format!(
                        "reply needs {} SMS segments ({enc}, {} units; one segment holds {one})",
                        seg.count, seg.units
                    ),
                );
            }
        }
        Some(Message {
            text: template,
            media,
            pos,
        })
    }

    fn media(&mut self, node: &Node) -> Vec<String> {
        let mut out = Vec::new();
        for (url, pos) in self.texts(node, "`media`").unwrap_or_default() {
            if url.starts_with("https://") || url.starts_with("http://") {
                out.push(url);
            } else {
                self.err(pos, format!("media `{url}` must be an http(s) URL"));
            }
        }
        if out.len() > MAX_MEDIA {
            let most = format!("a message can carry at most {MAX_MEDIA} media URLs");
            self.err(node.pos, most);
        }
        out
    }

    /// `say:` -- text, a `{say, media}` mapping, or a list of either.
    fn messages(&mut self, node: &Node, what: &str) -> Vec<Message> {
        let mut out = Vec::new();
        match &node.kind {
            _ if node.is_null() => {}
            Kind::Seq(items) => {
                for item in items {
                    if let Some(m) = self.one_message(item, what) {
                        out.push(m);
                    }
                }
            }
            _ => out.extend(self.one_message(node, what)),
        }
        if out.len() > MAX_MESSAGES {
            self.err(
                node.pos,
                format!(
                    "{what} sends {} messages; at most {MAX_MESSAGES} are allowed",
                    out.len()
                ),
            );
        }
        out
    }

    fn one_message(&mut self, node: &Node, what: &str) -> Option<Message> {
        match &node.kind {
            Kind::Map(_) => {
                let m = self.map(node, "a message", &["say", "media"])?;
                let media = m
                    .get("media")
                    .map(|(_, v)| self.media(v))
                    .unwrap_or_default();
                let text = match m.get("say") {
                    Some((_, v)) if v.is_null() => String::new(),
                    Some((_, v)) => self.text(v, "`say`")?,
                    None => String::new(),
                };
                if text.is_empty() && media.is_empty() {
                    self.err(node.pos, "a message needs `say` text or `media`");
                    return None;
                }
                let pos = m.get("say").map_or(node.pos, |(_, v)| v.pos);
                self.message(&text, media, pos)
            }
            _ => {
                let text = self.text(node, what)?;
                self.message(&text, Vec::new(), node.pos)
            }
        }
    }

    /// `say:` plus an optional `media:` attached to the last message.
    fn say_with_media(
        &mut self,
        say: Option<&(&Node, &Node)>,
        media: Option<&(&Node, &Node)>,
        what: &str,
    ) -> Vec<Message> {
        let mut msgs = say.map(|(_, v)| self.messages(v, what)).unwrap_or_default();
        if let Some((k, v)) = media {
            let urls = self.media(v);
            match msgs.last_mut() {
                Some(last) => last.media.extend(urls),
                None => msgs.push(Message {
                    text: Template::literal(""),
                    media: urls,
                    pos: k.pos,
                }),
            }
        }
        msgs
    }

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

    fn regex(&mut self, node: &Node) -> Option<Regex> {
        let src = self.text(node, "`regex`")?;
        // Bounded so a pathological pattern cannot eat memory at load time;
        // matching itself is linear in Rust's regex engine.
        match RegexBuilder::new(&src)
            .size_limit(1 << 20)
            .dfa_size_limit(1 << 20)
            .build()
        {
            Ok(r) => Some(r),
            Err(e) => {
                let text = e.to_string();
                let last = text
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .trim()
                    .trim_start_matches("error: ")
                    .to_owned();
                self.err(node.pos, format!("invalid regex: {last}"));
                None
            }
        }
    }

    // ---- whole files -------------------------------------------------

    fn file_doc(&mut self, root: &Node, stem: &str) -> Option<Doc> {
        let Kind::Map(entries) = &root.kind else {
            self.err(
                root.pos,
                format!(
                    "a flow file must be a mapping with `keywords:` or `steps:`, found {}",
                    root.describe()
                ),
            );
            return None;
        };
        let has = |k: &str| {
            entries
                .iter()
                .any(|(key, _)| matches!(&key.kind, Kind::Scalar(s, _) if s == k))
        };
        if has("steps") || has("script") {
            self.flow_file(root, stem)
        } else if has("keywords") || has("default") {
            self.keyword_file(root)
        } else {
            self.err(
                root.pos,
                "expected `keywords:` (a keyword file), or `steps:` or `script:` (a flow file)",
            );
            None
        }
    }

    fn keyword_file(&mut self, root: &Node) -> Option<Doc> {
        let m = self.map(
            root,
            "a keyword file",
            &["keywords", "default", "to", "description"],
        )?;
        let scope = m.get("to").map(|(_, v)| self.scope(v)).unwrap_or_default();
        let mut keywords = Vec::new();
        if let Some((_, kws)) = m.get("keywords") {
            if let Some(entries) = self.map(kws, "`keywords`", &[]) {
                for (key, (k, v)) in entries {
                    let words = phrase_words(key);
                    if words.is_empty() {
                        self.err(
                            k.pos,
                            format!("keyword `{key}` is empty after normalisation"),
                        );
                        continue;
                    }
                    let (say, flow) = match &v.kind {
                        Kind::Map(_) => {
                            let Some(vm) =
                                self.map(v, "a keyword reply", &["say", "media", "flow"])
                            else {
                                continue;
                            };
                            let say = self.say_with_media(
                                vm.get("say"),
                                vm.get("media"),
                                "a keyword reply",
                            );
                            let flow = vm
                                .get("flow")
                                .and_then(|(_, f)| self.step_name(f, "`flow`"));
                            if say.is_empty() && flow.is_none() {
                                self.err(v.pos, "a keyword needs `say`, `media` or `flow`");
                                continue;
                            }
                            (say, flow)
                        }
                        _ => (self.messages(v, "a keyword reply"), None),
                    };
                    keywords.push(KeywordRule {
                        words,
                        first_word: false,
                        say,
                        flow,
                        scope: scope.clone(),
                        origin: Origin {
                            file: self.file.clone(),
                            pos: k.pos,
                        },
                        display: key.to_owned(),
                    });
                }
            }
        }
        let default = m.get("default").map(|(k, v)| DefaultReply {
            say: self.messages(v, "`default`"),
            scope: scope.clone(),
            origin: Origin {
                file: self.file.clone(),
                pos: k.pos,
            },
        });
        Some(Doc::Keywords { keywords, default })
    }

    fn flow_file(&mut self, root: &Node, stem: &str) -> Option<Doc> {
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

    fn step(&mut self, node: &Node, key_pos: Pos, name: &str) -> Option<Step> {
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
                "description",
            ],
        )?;
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
                Next::Wait { routes, retry }
            }
            (None, t) => {
                if let Some((rk, _)) = m.get("retry") {
                    self.err(rk.pos, format!("`retry` needs `wait` in {what}"));
                }
                Next::Go(t?.unwrap_or(Transition::End))
            }
        };
        Some(Step {
            pos: key_pos,
            set,
            say,
            next,
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

    fn matcher(&mut self, kind: &str, v: &Node) -> Option<Matcher> {
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
