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
//! import them. A file may be a symlink only to a file inside the
//! directory; symlinked directories are not walked. This module does not
//! know the engine, HTTP or the store.
//!
//! The files below follow the sections of flows/README.md, so that each
//! part of the format has one place:
//!
//! - `files`: the directory walk, symlinks, reading a file;
//! - `keywords`: keyword files;
//! - `flows`: flow files (trigger, `expire_after`, `fallback`);
//! - `steps`: steps, routes, retries and transitions;
//! - `matchers`: the route matchers;
//! - `templates`: reply messages, templates and `{{= }}` expressions;
//! - `scripts`: `script:` flows and the set's `*.rhai` files;
//! - `campaigns`: campaign files (`campaigns:`).
//!
//! This file runs a load ([`load_dir`]): it reads the files, hands each
//! to the per-file context `Cx` (whose YAML accessors are here), puts
//! the documents together and runs `check`.

mod calls;
mod campaigns;
mod files;
mod flows;
mod keywords;
mod matchers;
mod scripts;
mod steps;
mod templates;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use regex::Regex;
use sha2::{Digest, Sha256};

use super::check::{self, ReservedWords};
use super::matcher::phrase_words;
use super::model::{
    hex, DefaultReply, Diagnostic, Flow, FlowSet, KeywordRule, Origin, Pos, RegexTrigger, Scope,
    ScopedFlow, SetInner, Severity, Target,
};
use super::script::{Expr, Limits, Sandbox};
use super::template::is_ident;
use super::yaml::{self, Kind, Node};

use files::{flow_files, read_file, rhai_files};
use scripts::unused_scripts;

pub(crate) use flows::parse_duration;
pub(crate) use steps::show_secs;

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
    /// The validated flow set.
    pub set: FlowSet,
    /// Warnings found while loading (no errors: those refuse the set).
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
    for path in rhai_files(dir, &mut diags) {
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
            compiled: Compiled::default(),
            call_templates: Vec::new(),
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
    // A script flow may call `http()`.
    inner.has_calls = inner
        .flows
        .values()
        .any(|f| f.script.is_some() || f.steps.values().any(|s| s.call.is_some()));
    check::check(&inner, reserved, &mut diags);
    campaigns::check_campaigns(&inner, &mut diags);
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
    /// A campaign file's campaigns.
    Campaigns(Vec<super::campaigns::Campaign>),
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
            Doc::Campaigns(campaigns) => inner.campaigns.extend(campaigns),
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
    /// What this file compiled so far, by source text.
    compiled: Compiled,
    /// The templates of the `call:` being read (see `load/calls.rs`).
    call_templates: Vec<(Pos, super::template::Template)>,
}

/// Rhai expressions and regexes one file compiled, by their text. A YAML
/// alias repeats a value without repeating its text, and a compiled
/// expression or regex can be many times larger and slower to build than
/// its source; reusing the first compilation keeps a file's cost to what
/// its distinct text costs, however often it is aliased.
#[derive(Default)]
struct Compiled {
    exprs: HashMap<String, Expr>,
    /// Failures too: a pattern that is too big fails only after the work.
    regexes: HashMap<String, Result<Regex, String>>,
}

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
        if has("campaigns") {
            self.campaign_file(root)
        } else if has("steps") || has("script") {
            self.flow_file(root, stem)
        } else if has("keywords") || has("default") {
            self.keyword_file(root)
        } else {
            self.err(
                root.pos,
                "expected `keywords:` (a keyword file), `steps:` or `script:` (a flow file), or `campaigns:` (a campaign file)",
            );
            None
        }
    }
}
