//! The validated flow set: what `load` produces and the engine reads.
//!
//! Every value here has already passed validation (targets exist, regexes
//! compile, templates parse), so the engine never has to handle a broken
//! flow. Positions are kept only where later checks report against them.
//! This module does not know YAML or how files were found.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use regex::Regex;

use super::script::{Expr, Sandbox, Script};
use super::template::{Template, Var};

/// A place in a flow file (1-based line and column).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Pos {
    pub line: usize,
    pub column: usize,
}

/// How bad a diagnostic is: errors stop a load, warnings do not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The flow set is refused.
    Error,
    /// Served as is, but probably not what the author meant.
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

/// One problem found in a flows directory, located in its file.
///
/// `line` and `column` are 1-based; both are 0 when the problem concerns a
/// whole file or directory (it could not be read at all).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file the problem is in.
    pub file: PathBuf,
    /// The line (1-based, 0 for a whole file).
    pub line: usize,
    /// The column (1-based, 0 for a whole file).
    pub column: usize,
    /// Whether it refuses the set or only warns.
    pub severity: Severity,
    /// What is wrong, for the flow author.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(
                f,
                "{}: {}: {}",
                self.file.display(),
                self.severity,
                self.message
            )
        } else {
            write!(
                f,
                "{}:{}:{}: {}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.severity,
                self.message
            )
        }
    }
}

/// A complete, validated set of flows: cheap to clone (one `Arc`), safe to
/// share between request handlers, swapped whole on reload.
#[derive(Clone, Debug)]
pub struct FlowSet {
    pub(crate) inner: Arc<SetInner>,
}

#[derive(Debug, Default)]
pub(crate) struct SetInner {
    pub version: String,
    pub files: Vec<PathBuf>,
    /// Whole-message keywords: keyword files and flow trigger keywords.
    pub keywords: Vec<KeywordRule>,
    pub flows: BTreeMap<String, Flow>,
    /// Regex triggers, ordered by file name.
    pub regex_triggers: Vec<RegexTrigger>,
    /// Catch-all flows, ordered by file name.
    pub catch_alls: Vec<ScopedFlow>,
    pub defaults: Vec<DefaultReply>,
    /// The Rhai sandbox the set's scripts and expressions were compiled
    /// with and run in; `None` when the set has neither.
    pub sandbox: Option<Arc<Sandbox>>,
    /// Some step has a `call:`, or a script flow may call `http()`: the
    /// pipeline then runs the engine in its call loop (pipeline/calls.rs).
    pub has_calls: bool,
    /// Campaigns (from campaign files), in file and name order.
    pub campaigns: Vec<super::campaigns::Campaign>,
}

impl FlowSet {
    /// Hex SHA-256 over every loaded file's name and contents, in name
    /// order: two sets with the same version behave identically.
    pub fn version(&self) -> &str {
        &self.inner.version
    }

    /// The flow files this set was built from, sorted.
    pub fn files(&self) -> &[PathBuf] {
        &self.inner.files
    }

    /// Does the set have campaigns (a file with `campaigns:`)?
    pub fn has_campaigns(&self) -> bool {
        !self.inner.campaigns.is_empty()
    }

    /// Changes whenever a campaign's definition does (empty without
    /// campaigns): the timer scheduler reschedules every conversation
    /// when it changes.
    pub fn campaigns_fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        if self.inner.campaigns.is_empty() {
            return String::new();
        }
        hex(&Sha256::digest(format!("{:?}", self.inner.campaigns)))
    }

    /// A set with no flows: every message is answered with silence.
    pub fn empty() -> FlowSet {
        use sha2::{Digest, Sha256};
        FlowSet {
            inner: Arc::new(SetInner {
                version: hex(&Sha256::digest(b"")),
                ..SetInner::default()
            }),
        }
    }

    /// Does any flow run Rhai (a script flow, or an expression in a YAML
    /// flow)? Such a set can spend up to the sandbox's wall-clock budget per
    /// message in [`handle`](super::handle).
    pub fn has_scripts(&self) -> bool {
        self.inner.sandbox.is_some()
    }

    /// The first flow (by name) that sends messages on its own, not as an
    /// answer to a message: a `timeout:` that says something, or a script
    /// flow with an `on_timeout`, or a flow a campaign starts. `None` when
    /// every flow only answers. With such a flow, serving needs the
    /// outbound credentials.
    pub fn sends_on_its_own(&self) -> Option<(&str, &'static str)> {
        let started = self
            .inner
            .campaigns
            .iter()
            .flat_map(|c| &c.events)
            .map(|e| (e.flow.name.as_str(), "a campaign starts it"));
        self.inner
            .flows
            .values()
            .find_map(|flow| {
                let says = flow.steps.values().any(|step| match &step.next {
                    Next::Wait { timeouts, .. } => timeouts.iter().any(|t| !t.say.is_empty()),
                    Next::Go(_) => false,
                });
                let wakes = flow
                    .script
                    .as_ref()
                    .and_then(|s| s.script.as_ref())
                    .is_some_and(|s| s.has_on_timeout());
                match (says, wakes) {
                    (true, _) => Some((flow.name.as_str(), "a timeout: that says something")),
                    (_, true) => Some((flow.name.as_str(), "an on_timeout that may say something")),
                    _ => None,
                }
            })
            .or_else(|| started.min())
    }

    /// May a flow make an HTTP call (a step's `call:`, or a script flow's
    /// `http()`)? A message of such a set may stop at a call
    /// ([`Handled::call`](super::Handled::call)).
    pub fn has_calls(&self) -> bool {
        self.inner.has_calls
    }

    /// Names of the multi-step flows in this set.
    pub fn flow_names(&self) -> impl Iterator<Item = &str> {
        self.inner.flows.keys().map(String::as_str)
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Which of our numbers a rule applies to; empty means all of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Scope(pub Vec<String>);

impl Scope {
    /// `None`: does not apply to this `To`. `Some(true)`: applies because
    /// it names this number (beats `Some(false)`, an unscoped rule).
    pub fn applies(&self, to: &str) -> Option<bool> {
        if self.0.is_empty() {
            Some(false)
        } else if self.0.iter().any(|n| n == to) {
            Some(true)
        } else {
            None
        }
    }

    /// Would two rules with these scopes compete at the same precedence?
    /// Both unscoped, or both naming a common number. A scoped rule and an
    /// unscoped one do not conflict: the scoped one wins for its numbers.
    pub fn conflicts(&self, other: &Scope) -> bool {
        (self.0.is_empty() && other.0.is_empty()) || self.0.iter().any(|n| other.0.contains(n))
    }
}

/// One outgoing message as written in a flow.
#[derive(Clone, Debug)]
pub(crate) struct Message {
    pub text: Template,
    pub media: Vec<String>,
    pub pos: Pos,
}

/// Where an origin was declared, for "first defined at" messages.
#[derive(Clone, Debug)]
pub(crate) struct Origin {
    pub file: PathBuf,
    pub pos: Pos,
}

#[derive(Clone, Debug)]
pub(crate) struct KeywordRule {
    /// Normalised words of the keyword.
    pub words: Vec<String>,
    /// Flow trigger keywords also match on the first word(s).
    pub first_word: bool,
    pub say: Vec<Message>,
    pub flow: Option<Target>,
    pub scope: Scope,
    pub origin: Origin,
    /// The keyword as written, for logs and messages.
    pub display: String,
}

#[derive(Clone, Debug)]
pub(crate) struct RegexTrigger {
    pub regex: Regex,
    pub flow: String,
    pub scope: Scope,
}

#[derive(Clone, Debug)]
pub(crate) struct ScopedFlow {
    pub flow: String,
    pub scope: Scope,
    pub origin: Origin,
}

#[derive(Clone, Debug)]
pub(crate) struct DefaultReply {
    pub say: Vec<Message>,
    pub scope: Scope,
    pub origin: Origin,
}

/// A step or flow name with where it was written.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    pub name: String,
    pub pos: Pos,
}

#[derive(Clone, Debug)]
pub(crate) struct Flow {
    pub name: String,
    pub file: PathBuf,
    /// Idle seconds after which a run ends.
    pub expire_after: i64,
    pub start: Target,
    /// Empty for a script flow.
    pub steps: BTreeMap<String, Step>,
    /// `script:`: the whole flow is this Rhai script's `on_message`.
    pub script: Option<ScriptFlow>,
    /// What to answer when a script or expression of this flow fails;
    /// empty means silence.
    pub fallback: Vec<Message>,
    /// `fields:`: contact fields set from outside (flow starts, imported
    /// contacts) that its templates may name.
    pub fields: Vec<String>,
    /// `vars:`: run variables a flow start gives it.
    pub vars: Vec<String>,
}

#[derive(Clone, Debug)]
pub(crate) struct ScriptFlow {
    /// `None` when the script is missing or does not compile: the set then
    /// has an error and is never served; the flow is kept so that `check`
    /// still knows it exists and what it sets.
    pub script: Option<Script>,
    /// Contact fields the script (with the modules it imports) sets with a
    /// literal name; `None` when it may set others (a computed name or
    /// import), so `check` cannot tell which fields exist.
    pub contact_fields: Option<Vec<String>>,
}

impl ScriptFlow {
    /// A script flow whose script could not be compiled.
    pub fn broken(contact_fields: Option<Vec<String>>) -> ScriptFlow {
        ScriptFlow {
            script: None,
            contact_fields,
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Step {
    pub pos: Pos,
    pub set: Vec<Assign>,
    /// `call:`, made after `set` and before `say` (flow/calls.rs).
    pub call: Option<super::calls::Call>,
    pub say: Vec<Message>,
    pub next: Next,
}

#[derive(Clone, Debug)]
pub(crate) enum Next {
    Wait {
        routes: Vec<Route>,
        retry: Retry,
        /// `timeout:`, by strictly increasing `after`.
        timeouts: Vec<Timeout>,
    },
    Go(Transition),
}

/// One `timeout:` of a waiting step: `after` seconds after the step
/// started waiting, say `say` and take `then` (none: keep waiting, a
/// reminder). A timeout is identified by its `after`, which is unique
/// within its step (strictly increasing), so a reload that keeps a
/// timeout keeps its identity.
#[derive(Clone, Debug)]
pub(crate) struct Timeout {
    pub after: i64,
    pub say: Vec<Message>,
    pub then: Option<Transition>,
    /// Where its `after` is written.
    pub pos: Pos,
}

/// What happens after a step or route has spoken.
#[derive(Clone, Debug)]
pub(crate) enum Transition {
    Goto(Target),
    Flow(Target),
    End,
    Silence(String),
}

#[derive(Clone, Debug)]
pub(crate) struct Assign {
    /// `Var::Run` or `Var::Contact`.
    pub target: Var,
    pub value: Template,
    pub pos: Pos,
}

#[derive(Clone, Debug)]
pub(crate) struct Route {
    pub matcher: Matcher,
    pub save: Option<String>,
    pub contact: Option<String>,
    pub set: Vec<Assign>,
    pub say: Vec<Message>,
    pub then: Transition,
}

#[derive(Clone, Debug)]
pub(crate) struct Retry {
    /// `None`: repeat the step's own messages.
    pub say: Option<Vec<Message>>,
    pub limit: u32,
    pub give_up: Option<Target>,
    pub give_up_say: Vec<Message>,
}

/// Default re-asks when a waiting step has no `retry:`.
pub(crate) const DEFAULT_RETRY_LIMIT: u32 = 3;

#[derive(Clone, Debug)]
pub(crate) enum Matcher {
    /// Each entry is a phrase of normalised words.
    AnyOf(Vec<Vec<String>>),
    /// Normalised whole messages.
    Exact(Vec<String>),
    /// Lowercased needle.
    Contains(String),
    /// Lowercased prefix.
    StartsWith(String),
    Regex(Regex),
    Number {
        min: Option<f64>,
        max: Option<f64>,
        /// Only a whole number counts (`3`, `3.0`; not `3.5`).
        integer: bool,
    },
    Yes,
    No,
    Anything,
    Else,
    /// `when:`, a Rhai condition.
    When(Expr),
}
