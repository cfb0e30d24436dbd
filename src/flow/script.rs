//! The Rhai sandbox: the one place in smsflow where a Rhai [`Engine`] is built.
//!
//! Operators write whole flows as `.rhai` scripts and embed Rhai expressions in
//! YAML flows (branch conditions, computed values). Both run here, inside a
//! single `Sandbox` whose engine is configured once, in `Sandbox::new`, with
//! every limit the product promises: operations, call depth, expression depth,
//! string/array/map sizes (map keys included, and checked before a value is
//! built wherever Rhai would only check after), a wall-clock budget per
//! message, no `eval`, no `sleep`, no real clock, and imports only from the
//! flows directory, by paths written in the script.
//!
//! Values cross the boundary as plain Rust data (`ScriptInput`,
//! `ExprContext`, JSON state in, `ScriptOutput` out), so callers never see
//! a Rhai type. This module knows nothing of HTTP, sled, Twilio's wire format
//! or YAML, and it never reads the clock to decide what time it is: the
//! message's time is passed in. (It does read a monotonic `Instant`, but only
//! to enforce the wall-clock budget.)
//!
//! # The script entry point
//!
//! A script flow defines `fn on_message(msg, state)`:
//!
//! - `msg` is a map `#{ body, from, to, media: [urls], sid, received_at,
//!   contact: #{..} }`. `received_at` is the engine-supplied unix time of the
//!   message (the same value `now()` returns).
//! - `state` is this conversation's persistent map (`#{}` at first). It is
//!   passed *by reference*: `state.score += 1`, `state.answers.push(x)` and
//!   even `state = #{}` inside `on_message` are kept after the call. (Rhai
//!   passes arguments by value, so the sandbox hands the script a shared cell
//!   and reads it back afterwards.) A copy (`let s = state;`) or a helper
//!   function's parameter is a copy; call helpers method-style
//!   (`state.bump()` with `fn bump() { this.n += 1 }`) or return values.
//! - `msg.contact` is a snapshot of the sender's persistent contact fields
//!   (strings). To change them call `set_contact("name", "Ann")`; a number or
//!   bool is stored as text and `set_contact("name", ())` deletes the field.
//!   Writes take effect when the run succeeds and are not reflected in
//!   `msg.contact` during the run. (A live shared map nested inside `msg`
//!   is not something Rhai supports, hence the explicit helper.)
//!
//! The return value is the reply: a string (one message), an array of strings
//! and/or maps (up to 10 messages), a map `#{ body: "..", media: ["https://.."] }`
//! (a message with media), or `()` (silence). An empty array is also silence.
//! Anything else is a `ScriptError::BadReturn`. State must stay a map of
//! JSON-compatible values (strings, numbers, bools, `()`, arrays, maps).
//!
//! Top-level statements of a script (imports, constants) run before every
//! call, inside the same limits.
//!
//! # Where things are
//!
//! This file builds the engine (`Sandbox::new`) and compiles and runs
//! script flows. The rest follows the "Rhai" sections of flows/README.md:
//!
//! - `expr`: Rhai in YAML flows (`when:`, `{{= }}`);
//! - `helpers`: the functions registered for scripts and expressions;
//! - `http`: `http()`, a script's HTTP call, answered by re-running the
//!   script with the answers so far (the host makes the request);
//! - `modules`: `import` and the flows-directory resolver;
//! - `limits`: [`Limits`] and the fixed bounds; `bounded`: the standard
//!   functions replaced to refuse before they build an oversized value;
//! - `errors`: `ScriptError` and Rhai positions to `file:line:column`;
//! - `values`: the message, state and replies across the boundary;
//! - `run`: the per-run state (start time, `now()`, random stream) the
//!   shared engine's callbacks read.

mod bounded;
mod errors;
mod expr;
mod helpers;
mod http;
mod limits;
mod modules;
mod run;
#[cfg(test)]
mod testing;
mod values;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rhai::packages::{
    BasicArrayPackage, BasicMapPackage, BasicMathPackage, BitFieldPackage, CorePackage,
    LogicPackage, MoreStringPackage, Package,
};
use rhai::{CallFnOptions, Dynamic, Engine, EvalAltResult, Scope, AST};
use serde_json::Value;

use crate::flow::calls::{CallRequest, CallResponse};

pub(crate) use errors::ScriptError;
pub(crate) use expr::{Expr, ExprContext};
pub use limits::Limits;
pub(crate) use run::operations;

use bounded::bound_builtins;
use errors::{compile_error, describe, locate_entry_point, lowercase_first, runtime_error, Origin};
use helpers::register_helpers;
use limits::{CLOCK_CHECK_EVERY, TIME_BUDGET_TOKEN};
use modules::{computed_import, FlowsDirResolver, COMPUTED_IMPORT};
use run::{catch_engine_panic, current_file, run_over_budget, RunGuard, RunState};
use values::{
    json_object_to_map, message_map, replies_from, state_from, state_over_limits, state_text,
    stored_state_map, StateOutError,
};

/// The function every script flow must define.
pub(crate) const ENTRY_POINT: &str = "on_message";

/// The function a script flow defines to be woken (`wake_after`).
pub(crate) const TIMEOUT_ENTRY_POINT: &str = "on_timeout";

/// Most replies a script may return for one message (Twilio's per-response
/// `<Message>` limit).
pub(crate) const MAX_REPLIES: usize = crate::twilio::limits::MAX_MESSAGES;

/// Most media URLs one reply may carry (Twilio's per-message limit).
pub(crate) const MAX_MEDIA: usize = crate::twilio::limits::MAX_MEDIA;

/// A compiled script flow. Cheap to clone and shared across threads: compile
/// once per load, run for every message.
#[derive(Clone)]
pub(crate) struct Script {
    ast: Arc<AST>,
    file: Arc<Path>,
    /// Where `fn on_message` is defined: Rhai reports limit errors raised
    /// inside script functions without a position, and this is the most
    /// useful place to point at instead of 1:1.
    entry: (usize, usize),
    /// Whether it defines `fn on_timeout(name, state)`.
    on_timeout: bool,
}

impl Script {
    /// Whether the script can be woken: it defines `fn on_timeout(name,
    /// state)`.
    pub fn has_on_timeout(&self) -> bool {
        self.on_timeout
    }
}

impl Script {
    /// The file the script was compiled from.
    pub fn file(&self) -> &Path {
        &self.file
    }
}

impl fmt::Debug for Script {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Script").field("file", &self.file).finish()
    }
}

/// The message a script flow is run for, borrowed from the engine's own
/// (a run copies only what it keeps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScriptInput<'a> {
    pub body: &'a str,
    pub from: &'a str,
    pub to: &'a str,
    pub media: &'a [String],
    pub message_sid: &'a str,
    /// Unix seconds, from the flow engine's clock; also what `now()` returns.
    pub received_at: i64,
    pub contact: &'a BTreeMap<String, String>,
    /// Answers to the run's first `http()` calls, in order (see `http`).
    pub answers: &'a [CallResponse],
    /// How many more calls the message may make.
    pub call_room: usize,
}

impl Default for ScriptInput<'_> {
    fn default() -> Self {
        static NO_FIELDS: BTreeMap<String, String> = BTreeMap::new();
        ScriptInput {
            body: "",
            from: "",
            to: "",
            media: &[],
            message_sid: "",
            received_at: 0,
            contact: &NO_FIELDS,
            answers: &[],
            call_room: 0,
        }
    }
}

/// The state a script run starts from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum StateIn<'a> {
    /// As a conversation keeps it: the JSON text the last run left. `None`,
    /// or text that is not a JSON object (a hand-edited store), is an
    /// empty state: the script starts over.
    Stored(Option<&'a str>),
    /// Values from elsewhere: the fields a started conversation is given.
    Values(&'a BTreeMap<String, Value>),
}

impl<'a> From<&'a BTreeMap<String, Value>> for StateIn<'a> {
    fn from(values: &'a BTreeMap<String, Value>) -> Self {
        StateIn::Values(values)
    }
}

/// What a script run produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ScriptOutput {
    /// At most [`MAX_REPLIES`]; empty exactly when `silence` is set.
    pub replies: Vec<ScriptReply>,
    /// The conversation state to persist: the JSON text of a map, empty
    /// when the map is (the run ends). A run reads it back as
    /// [`StateIn::Stored`].
    pub state: String,
    /// The wakes pending after the run: name → seconds from the run's
    /// time (those it was given, minus none, plus `wake_after` calls).
    pub wakes: BTreeMap<String, i64>,
    /// The contact fields to persist (the whole set, not a diff).
    pub contact: BTreeMap<String, String>,
    /// The script chose not to answer.
    pub silence: bool,
    /// An `http()` call the run reached without an answer: the run ended
    /// there and everything else here is empty; run it again with the
    /// answer.
    pub call: Option<CallRequest>,
    /// The calls the run made with the answers it was given, in order.
    pub made: Vec<(CallRequest, CallResponse)>,
    /// `http()` calls with `after_answer: true`, in order.
    pub after: Vec<CallRequest>,
}

/// One outgoing message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ScriptReply {
    pub body: String,
    pub media: Vec<String>,
}

/// The sandboxed Rhai engine. Build one per flow set (or per process) and
/// share it: it is `Send + Sync`, and runs on many threads at once keep their
/// per-run data (start time, `now()`, random seed) in thread-locals.
pub(crate) struct Sandbox {
    /// The one engine, configured once; never mutated after `new`.
    engine: Engine,
    limits: Limits,
    /// The compiled patterns of `matches` and `captures`.
    regexes: Arc<helpers::RegexCache>,
}

impl fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sandbox")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Sandbox {
    /// Builds the sandboxed engine. This is the only Rhai `Engine`
    /// constructor in the crate: every security control lives here.
    ///
    /// `module_dir` is the flows directory; `import "name"` loads
    /// `<module_dir>/name.rhai` and nothing outside it. With `None`, scripts
    /// cannot import at all.
    pub fn new(limits: Limits, module_dir: Option<&Path>) -> Sandbox {
        // Start from a raw engine and add packages one by one, leaving out the
        // time package: a flow must see the message's time, not the host's.
        let mut engine = Engine::new_raw();
        engine.register_global_module(CorePackage::new().as_shared_module());
        engine.register_global_module(BitFieldPackage::new().as_shared_module());
        engine.register_global_module(LogicPackage::new().as_shared_module());
        engine.register_global_module(BasicMathPackage::new().as_shared_module());
        engine.register_global_module(BasicArrayPackage::new().as_shared_module());
        engine.register_global_module(BasicMapPackage::new().as_shared_module());
        engine.register_global_module(MoreStringPackage::new().as_shared_module());

        engine.set_max_operations(limits.max_operations);
        engine.set_max_call_levels(limits.max_call_depth);
        engine.set_max_expr_depths(limits.max_expr_depth, limits.max_expr_depth);
        engine.set_max_string_size(limits.max_string_len);
        engine.set_max_array_size(limits.max_array_len);
        engine.set_max_map_size(limits.max_map_len);

        // A typo in a variable name is a load-time error, not a silent `()`.
        engine.set_strict_variables(true);
        // `eval` would compile code the loader never checked.
        engine.disable_symbol("eval");

        engine.on_progress(|operations| {
            if operations % CLOCK_CHECK_EVERY != 0 {
                return None;
            }
            run::count_operations(CLOCK_CHECK_EVERY);
            run_over_budget().then(|| Dynamic::from(TIME_BUDGET_TOKEN))
        });
        engine.on_print(|text| {
            tracing::debug!(script = %current_file(), text, "script print");
        });
        engine.on_debug(|text, source, pos| {
            tracing::debug!(
                script = source.unwrap_or_default(),
                line = pos.line(),
                text,
                "script debug"
            );
        });
        engine.set_module_resolver(FlowsDirResolver::new(module_dir));

        bound_builtins(&mut engine, &limits);
        let regexes = register_helpers(&mut engine);

        Sandbox {
            engine,
            limits,
            regexes,
        }
    }

    /// Starts the wall-clock budget of one message. Each run or evaluation
    /// is stopped by the budget on its own; a caller that runs several for
    /// one message (a YAML flow with many expressions) checks this between
    /// them, so the message as a whole stays within about one budget.
    pub fn message_budget(&self) -> MessageBudget {
        MessageBudget {
            started: Instant::now(),
            budget: self.limits.wall_clock,
        }
    }

    /// Compiles now the regex patterns `ast` writes as literals in calls
    /// to `matches` and `captures`: a bad one is an error at load, at its
    /// call, not a fallback at every message; a good one is cached before
    /// the first message, whose budget it would have cost.
    fn compile_patterns(&self, ast: &AST, origin: &Origin) -> Result<(), ScriptError> {
        for (pattern, pos) in helpers::literal_patterns(ast) {
            if let Err(err) = self.regexes.get(&pattern) {
                let (line, column) = origin.translate(pos);
                return Err(ScriptError::Compile {
                    file: origin.file.to_path_buf(),
                    line,
                    column,
                    message: match *err {
                        EvalAltResult::ErrorRuntime(reason, _) => reason.to_string(),
                        err => describe(err),
                    },
                });
            }
        }
        Ok(())
    }

    /// Compiles a whole-flow `.rhai` file. Imports are resolved now (and
    /// embedded), so a missing or forbidden module is a load error and no
    /// file is read while handling a message.
    pub fn compile_script(&self, file: &Path, source: &str) -> Result<Script, ScriptError> {
        let file: Arc<Path> = Arc::from(file);
        let origin = Origin::whole_file(file.clone());
        let mut ast = {
            // Imported modules run their top-level code while compiling; keep
            // that inside the same budget as a message.
            let mut run = RunState::new(&self.limits, 0, "", file.clone());
            run.loading = true;
            let _run = RunGuard::enter(run);
            self.engine
                .compile_into_self_contained(&Scope::new(), source)
                .map_err(|err| compile_error(&origin, source, *err))?
        };
        ast.set_source(file.to_string_lossy().as_ref());
        self.compile_patterns(&ast, &origin)?;
        if let Some(pos) = computed_import(&ast) {
            let (line, column) = origin.translate(pos);
            return Err(ScriptError::Compile {
                file: file.to_path_buf(),
                line,
                column,
                message: COMPUTED_IMPORT.into(),
            });
        }

        let entry = locate_entry_point(source);
        let arities: Vec<usize> = ast
            .iter_functions()
            .filter(|f| f.name == ENTRY_POINT)
            .map(|f| f.params.len())
            .collect();
        if !arities.contains(&2) {
            let (line, column, message) = match arities.first() {
                None => (
                    1,
                    1,
                    format!("script must define fn {ENTRY_POINT}(msg, state)"),
                ),
                Some(n) => {
                    let (line, column) = entry;
                    let message =
                        format!("fn {ENTRY_POINT} must take two parameters (msg, state), not {n}");
                    (line, column, message)
                }
            };
            return Err(ScriptError::Compile {
                file: file.to_path_buf(),
                line,
                column,
                message,
            });
        }
        let on_timeout = ast
            .iter_functions()
            .any(|f| f.name == TIMEOUT_ENTRY_POINT && f.params.len() == 2);
        if !on_timeout {
            // A wake without `on_timeout` would never run: say so at load.
            if let Some(at) = source.find("wake_after") {
                let line = source[..at].matches('\n').count() + 1;
                let column = at - source[..at].rfind('\n').map_or(0, |n| n + 1) + 1;
                return Err(ScriptError::Compile {
                    file: file.to_path_buf(),
                    line,
                    column,
                    message: format!(
                        "the script calls wake_after but defines no fn {TIMEOUT_ENTRY_POINT}(name, state) to be woken in"
                    ),
                });
            }
        }
        Ok(Script {
            ast: Arc::new(ast),
            file,
            entry,
            on_timeout,
        })
    }

    /// Runs a script flow's `on_message` for one message. See the module
    /// docs for the contract. Never panics on script or input content.
    pub fn run_script<'s>(
        &self,
        script: &Script,
        input: &ScriptInput,
        state: impl Into<StateIn<'s>>,
    ) -> Result<ScriptOutput, ScriptError> {
        let msg = Dynamic::from_map(message_map(input));
        self.call(
            script,
            ENTRY_POINT,
            msg,
            input,
            state.into(),
            BTreeMap::new(),
        )
    }

    /// Runs a script flow's `on_timeout(name, state)` for its wake `name`;
    /// `pending` are its other pending wakes (name → seconds from now),
    /// which the run may replace or add to. Same limits and contract as
    /// [`Sandbox::run_script`]; `input` carries the conversation's numbers
    /// and contact fields, with an empty body.
    pub fn run_timeout<'s>(
        &self,
        script: &Script,
        name: &str,
        input: &ScriptInput,
        state: impl Into<StateIn<'s>>,
        pending: BTreeMap<String, i64>,
    ) -> Result<ScriptOutput, ScriptError> {
        let name = Dynamic::from(name.to_owned());
        self.call(
            script,
            TIMEOUT_ENTRY_POINT,
            name,
            input,
            state.into(),
            pending,
        )
    }

    fn call(
        &self,
        script: &Script,
        entry: &str,
        first: Dynamic,
        input: &ScriptInput,
        state: StateIn<'_>,
        pending: BTreeMap<String, i64>,
    ) -> Result<ScriptOutput, ScriptError> {
        let state = match state {
            StateIn::Stored(json) => json.and_then(stored_state_map).unwrap_or_default(),
            StateIn::Values(values) => json_object_to_map(values),
        };
        // A shared cell lets `on_message` mutate `state` in place. It must
        // only ever sit in a variable (the parameter), never inside a map or
        // array: Rhai assumes containers hold no shared values.
        let state_cell = Dynamic::from_map(state).into_shared();

        let mut run = RunState::new(
            &self.limits,
            input.received_at,
            input.message_sid,
            script.file.clone(),
        );
        run.contact = Some(input.contact.clone());
        run.wakes = Some(pending);
        run.calls = Some(http::RunCalls {
            answers: input.answers.to_vec(),
            room: input.call_room,
            limits: self.limits.clone(),
            ..http::RunCalls::default()
        });
        let guard = RunGuard::enter(run);
        let result = catch_engine_panic(|| {
            self.engine.call_fn_with_options::<Dynamic>(
                CallFnOptions::new(),
                &mut Scope::new(),
                &script.ast,
                entry,
                (first, state_cell.clone()),
            )
        });
        let mut run = guard.finish();
        let calls = run
            .as_mut()
            .and_then(|r| r.calls.take())
            .unwrap_or_default();
        if let Some(call) = calls.pending {
            // `http()` reached a call with no answer and ended the run
            // (uncatchably): the caller makes it and runs us again.
            return Ok(ScriptOutput {
                call: Some(call),
                made: calls.made,
                after: calls.after,
                ..ScriptOutput::default()
            });
        }
        let returned = match result {
            Ok(value) => value,
            // `exit(value)` ends the script with that value as its answer.
            Err(err) => match *err {
                EvalAltResult::Exit(value, _) => value,
                err => {
                    let origin = Origin {
                        fallback: script.entry,
                        ..Origin::whole_file(script.file.clone())
                    };
                    return Err(runtime_error(&origin, err));
                }
            },
        };

        let bad = |message: String| ScriptError::BadReturn {
            file: script.file.to_path_buf(),
            message,
        };
        let replies = replies_from(returned).map_err(bad)?;
        // The run is over, so the cell is the map's only owner and is taken,
        // not copied. Rhai checks sizes lazily (an indexed write inside a
        // loop is only measured later), so the state that is about to be
        // persisted is measured again here, the same way Rhai measures a map.
        let state = match state_text(state_cell.flatten(), &self.limits) {
            Ok(text) => text,
            Err(StateOutError::Bad(message)) => return Err(bad(message)),
            Err(StateOutError::Over(which)) => {
                return Err(ScriptError::Limit {
                    file: script.file.to_path_buf(),
                    line: script.entry.0,
                    column: script.entry.1,
                    which,
                })
            }
        };
        let (contact, wakes) = run
            .map(|run| {
                (
                    run.contact.unwrap_or_default(),
                    run.wakes.unwrap_or_default(),
                )
            })
            .unwrap_or_default();
        Ok(ScriptOutput {
            silence: replies.is_empty(),
            replies,
            state,
            contact,
            wakes,
            call: None,
            made: calls.made,
            after: calls.after,
        })
    }

    /// Evaluates a Rhai map literal (`#{question: 1, score: 0}`) into a
    /// script flow's `state`, within this sandbox's limits. For transcript
    /// seeds (`state:` headers); the text is the test author's, not a
    /// sender's.
    pub fn state_literal(&self, source: &str) -> Result<BTreeMap<String, Value>, String> {
        let ast = self
            .engine
            .compile_expression(source)
            .map_err(|err| format!("syntax error: {}", lowercase_first(&err.to_string())))?;
        let file: Arc<Path> = Arc::from(Path::new("state"));
        let _run = RunGuard::enter(RunState::new(&self.limits, 0, "", file));
        let value = catch_engine_panic(|| self.engine.eval_ast::<Dynamic>(&ast))
            .map_err(|err| describe(*err))?;
        let state = state_from(value.flatten())?;
        match state_over_limits(&state, &self.limits) {
            Some(which) => Err(format!("the state is over the {which} limit")),
            None => Ok(state),
        }
    }
}

#[cfg(test)]
impl ScriptOutput {
    /// The state the run left, as the map its text holds.
    pub(crate) fn state_map(&self) -> BTreeMap<String, Value> {
        if self.state.is_empty() {
            return BTreeMap::new();
        }
        serde_json::from_str(&self.state).expect("a run leaves the text of a JSON object")
    }

    /// The state the run left, as the next run reads it.
    pub(crate) fn state_in(&self) -> StateIn<'_> {
        StateIn::Stored(Some(&self.state))
    }
}

/// The wall-clock budget of one message, shared by every script run and
/// expression evaluated for it. See [`Sandbox::message_budget`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct MessageBudget {
    started: Instant,
    budget: Duration,
}

impl MessageBudget {
    /// True once the message has used up its budget.
    pub fn exhausted(&self) -> bool {
        self.started.elapsed() > self.budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::script::testing::*;
    use proptest::prelude::*;
    use serde_json::json;

    const QUIZ: &str = r#"
// Two questions; the score lives in `state`, the player's name in the contact.
fn on_message(msg, state) {
    let answer = normalize(msg.body);
    if state.question == () {
        state.question = 1;
        state.score = 0;
        set_contact("name", "Ann");
        return "Q1: capital of France?";
    }
    if state.question == 1 {
        if answer == "paris" { state.score += 1; }
        state.question = 2;
        return ["Noted.", "Q2: 2 + 2?"];
    }
    if parse_number(answer) == 4 { state.score += 1; }
    let score = state.score;
    state.clear();
    `${msg.contact.name}, you scored ${score}/2`
}
"#;

    #[test]
    fn quiz_keeps_score_in_state_and_sets_a_contact_field() {
        let sandbox = sandbox();
        let quiz = compile(&sandbox, QUIZ);

        let first = sandbox
            .run_script(&quiz, &input("quiz"), &BTreeMap::new())
            .unwrap();
        assert_eq!(bodies(&first), ["Q1: capital of France?"]);
        assert_eq!(first.state_map()["question"], json!(1));
        assert_eq!(first.state_map()["score"], json!(0));
        assert_eq!(first.contact["name"], "Ann");

        let second = sandbox
            .run_script(&quiz, &input("  Paris! "), first.state_in())
            .unwrap();
        assert_eq!(bodies(&second), ["Noted.", "Q2: 2 + 2?"]);
        assert_eq!(second.state_map()["score"], json!(1));
        assert_eq!(second.state_map()["question"], json!(2));
        // The contact was not touched this time; it is passed through.
        assert!(second.contact.is_empty());

        let mut third_input = input("it is 4");
        third_input.contact = &first.contact;
        let third = sandbox
            .run_script(&quiz, &third_input, second.state_in())
            .unwrap();
        assert_eq!(bodies(&third), ["Ann, you scored 2/2"]);
        assert!(third.state.is_empty());
        assert_eq!(third.contact["name"], "Ann");
    }

    #[test]
    fn eval_is_rejected_before_anything_runs() {
        let sandbox = sandbox();
        let err = sandbox
            .compile_script(
                Path::new(FILE),
                &on_message(r#"eval("state.pwned = true"); "done""#),
            )
            .unwrap_err();
        assert!(matches!(err, ScriptError::Compile { .. }), "{err}");
        assert_eq!(err.line_column(), Some((2, 1)));

        // Nor through a function pointer.
        let out = run(&on_message(
            r#"let f = Fn("eval"); f.call("state.pwned = true"); "done""#,
        ));
        assert!(matches!(out, Err(ScriptError::Runtime { .. })), "{out:?}");

        // Nor in YAML expressions.
        assert!(sandbox
            .compile_expr(Path::new("flows/a.yaml"), 3, 9, r#"eval("1")"#)
            .is_err());
    }

    #[test]
    fn no_real_clock_and_no_sleep() {
        let err = run(&on_message("sleep(10); ()")).unwrap_err();
        assert!(err.to_string().contains("sleep is not available"), "{err}");
        assert!(run(&on_message("timestamp()")).is_err());
        let out = run(&on_message("`${now()} ${msg.received_at}`")).unwrap();
        assert_eq!(bodies(&out), ["1700000000 1700000000"]);
    }

    #[test]
    fn many_threads_share_one_script_while_one_loops_forever() {
        let sandbox = Arc::new(Sandbox::new(
            Limits {
                // Only the wall clock stops the loop, so it runs for the
                // whole budget while the others work.
                max_operations: u64::MAX,
                wall_clock: Duration::from_millis(500),
                ..Limits::default()
            },
            None,
        ));
        let quiz = compile(&sandbox, QUIZ);
        let spinner = compile(&sandbox, &on_message("loop {}"));

        let looping = {
            let sandbox = sandbox.clone();
            std::thread::spawn(move || {
                sandbox.run_script(&spinner, &input("spin"), &BTreeMap::new())
            })
        };
        let workers: Vec<_> = (0..8)
            .map(|t| {
                let (sandbox, quiz) = (sandbox.clone(), quiz.clone());
                std::thread::spawn(move || {
                    for i in 0..20 {
                        let sid = format!("SM{t}-{i}");
                        let mut message = input("paris");
                        message.message_sid = &sid;
                        let first = sandbox.run_script(&quiz, &message, &BTreeMap::new())?;
                        let second = sandbox.run_script(&quiz, &message, first.state_in())?;
                        assert_eq!(second.state_map()["score"], json!(1));
                    }
                    Ok::<_, ScriptError>(())
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap().unwrap();
        }
        let err = looping.join().unwrap().unwrap_err();
        assert_eq!(err.limit(), Some("time budget"));
    }

    #[test]
    fn sandbox_and_compiled_code_are_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Sandbox>();
        assert_send_sync::<Script>();
        assert_send_sync::<Expr>();
        assert_send_sync::<ScriptError>();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn echo_never_panics(body in prop_oneof![
            any::<String>(),
            "\\PC{0,1600}",
            "[\\x00-\\x1f\\x7f]{0,200}",
            (1usize..=1600).prop_map(|n| "😀".repeat(n)),
        ]) {
            let sandbox = sandbox();
            let script = compile(&sandbox, &on_message(
                "state.count = (state.count ?? 0) + 1; state.last = msg.body; \
                 set_contact(\"last\", normalize(msg.body)); \
                 [\"you said: \" + msg.body, `${parse_number(msg.body)}`, `${matches(msg.body, \"^[0-9]\")}`]",
            ));
            let out = sandbox.run_script(&script, &input(&body), &BTreeMap::new());
            let out = out.map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&out.replies[0].body, &format!("you said: {body}"));
            prop_assert_eq!(&out.state_map()["last"], &json!(body));
        }
    }
}
