//! The Rhai sandbox: the one place in smsflow where a Rhai [`Engine`] is built.
//!
//! Operators write whole flows as `.rhai` scripts and embed Rhai expressions in
//! YAML flows (branch conditions, computed values). Both run here, inside a
//! single [`Sandbox`] whose engine is configured once, in [`Sandbox::new`], with
//! every limit the product promises: operations, call depth, expression depth,
//! string/array/map sizes, a wall-clock budget per message, no `eval`, no
//! `sleep`, no real clock, and imports only from the flows directory.
//!
//! Values cross the boundary as plain Rust data ([`ScriptInput`],
//! [`ExprContext`], JSON state in, [`ScriptOutput`] out), so callers never see
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
//! Anything else is a [`ScriptError::BadReturn`]. State must stay a map of
//! JSON-compatible values (strings, numbers, bools, `()`, arrays, maps).
//!
//! Top-level statements of a script (imports, constants) run before every
//! call, inside the same limits.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use regex::{Regex, RegexBuilder};
use rhai::module_resolvers::FileModuleResolver;
use rhai::packages::{
    BasicArrayPackage, BasicMapPackage, BasicMathPackage, BitFieldPackage, CorePackage,
    LogicPackage, MoreStringPackage, Package,
};
use rhai::{
    Array, CallFnOptions, Dynamic, Engine, EvalAltResult, Map, ModuleResolver, ParseError,
    ParseErrorType, Position, Scope, AST, FLOAT, INT,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

// The helper `normalize()` is the matcher's own normal form: a script and a
// keyword must never disagree on a message.
use super::matcher::normalize;

/// The function every script flow must define.
pub const ENTRY_POINT: &str = "on_message";

/// Most replies a script may return for one message (Twilio's per-response
/// `<Message>` limit).
pub const MAX_REPLIES: usize = crate::twilio::limits::MAX_MESSAGES;

/// Most media URLs one reply may carry (Twilio's per-message limit).
pub const MAX_MEDIA: usize = crate::twilio::limits::MAX_MEDIA;

/// How deeply state values may nest. Deeper values would make the JSON
/// conversion (and whoever reads the stored state) recurse without bound.
const MAX_STATE_DEPTH: usize = 32;

/// How often (in Rhai operations) the wall-clock budget is checked. Reading
/// an `Instant` costs tens of nanoseconds; every 64 operations keeps that
/// negligible while bounding the overshoot to a few microseconds of script.
const CLOCK_CHECK_EVERY: u64 = 64;

/// The value `on_progress` terminates a run with, so that a termination can
/// be told apart from anything a script could raise itself.
const TIME_BUDGET_TOKEN: &str = "smsflow: wall-clock budget exceeded";

/// Longest regex pattern a script may use.
const MAX_PATTERN_LEN: usize = 1_024;

/// Compiled-size ceiling for one regex, so a pattern like `a{1000}{1000}`
/// fails to compile instead of eating memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Distinct patterns kept compiled. Scripts use a handful of literal
/// patterns; the bound only matters if one builds patterns from input.
const REGEX_CACHE_CAPACITY: usize = 256;

/// Resource limits applied to every script run and expression evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Rhai operations per run (0 means unlimited; don't).
    pub max_operations: u64,
    /// Nested function calls.
    pub max_call_depth: usize,
    /// Expression nesting, checked at compile time.
    pub max_expr_depth: usize,
    /// Bytes in one string.
    pub max_string_len: usize,
    /// Elements in one array.
    pub max_array_len: usize,
    /// Entries in one map.
    pub max_map_len: usize,
    /// Real time one run may take, checked every few operations.
    pub wall_clock: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_operations: 100_000,
            max_call_depth: 32,
            max_expr_depth: 64,
            max_string_len: 16_384,
            max_array_len: 1_000,
            max_map_len: 1_000,
            wall_clock: Duration::from_millis(50),
        }
    }
}

/// Why a script or expression could not be compiled or run.
///
/// Every variant names the file; all but `BadReturn` carry a 1-based line and
/// column (for an expression embedded in YAML, a position in the YAML file).
/// `Display` reads `flows/quiz.rhai:12:5: error: ...`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScriptError {
    /// The source does not compile, or a script lacks `on_message(msg, state)`.
    #[error("{}:{line}:{column}: error: {message}", file.display())]
    Compile {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// The script raised an error while running.
    #[error("{}:{line}:{column}: error: {message}", file.display())]
    Runtime {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// The script hit one of the sandbox [`Limits`]. `which` is one of
    /// "operations", "call depth", "expression depth", "string size",
    /// "array size", "map size", "time budget".
    #[error("{}:{line}:{column}: error: script exceeded the {which} limit", file.display())]
    Limit {
        file: PathBuf,
        line: usize,
        column: usize,
        which: &'static str,
    },
    /// The script ran but returned (or left in `state`/`contact`) something
    /// the flow engine cannot use.
    #[error("{}: error: {message}", file.display())]
    BadReturn { file: PathBuf, message: String },
}

impl ScriptError {
    /// The file the error is in.
    pub fn file(&self) -> &Path {
        match self {
            ScriptError::Compile { file, .. }
            | ScriptError::Runtime { file, .. }
            | ScriptError::Limit { file, .. }
            | ScriptError::BadReturn { file, .. } => file,
        }
    }

    /// 1-based (line, column), when the error has a position.
    pub fn line_column(&self) -> Option<(usize, usize)> {
        match self {
            ScriptError::Compile { line, column, .. }
            | ScriptError::Runtime { line, column, .. }
            | ScriptError::Limit { line, column, .. } => Some((*line, *column)),
            ScriptError::BadReturn { .. } => None,
        }
    }

    /// The limit that was hit, if this is a [`ScriptError::Limit`].
    pub fn limit(&self) -> Option<&'static str> {
        match self {
            ScriptError::Limit { which, .. } => Some(which),
            _ => None,
        }
    }

    /// What went wrong, without the file and position (for structured logs
    /// that carry those as fields).
    pub fn message(&self) -> String {
        match self {
            ScriptError::Compile { message, .. }
            | ScriptError::Runtime { message, .. }
            | ScriptError::BadReturn { message, .. } => message.clone(),
            ScriptError::Limit { which, .. } => format!("script exceeded the {which} limit"),
        }
    }
}

/// A compiled script flow. Cheap to clone and shared across threads: compile
/// once per load, run for every message.
#[derive(Clone)]
pub struct Script {
    ast: Arc<AST>,
    file: Arc<Path>,
    /// Where `fn on_message` is defined: Rhai reports limit errors raised
    /// inside script functions without a position, and this is the most
    /// useful place to point at instead of 1:1.
    entry: (usize, usize),
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

/// A compiled expression embedded in a YAML flow, with the position it
/// starts at so errors point into the YAML file.
#[derive(Clone)]
pub struct Expr {
    ast: Arc<AST>,
    origin: Origin,
}

impl Expr {
    /// The YAML file the expression came from.
    pub fn file(&self) -> &Path {
        &self.origin.file
    }

    /// Where the expression starts in that file (1-based line, column).
    pub fn line_column(&self) -> (usize, usize) {
        (self.origin.line, self.origin.column)
    }
}

impl fmt::Debug for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Expr")
            .field("file", &self.origin.file)
            .field("line", &self.origin.line)
            .field("column", &self.origin.column)
            .finish()
    }
}

/// The message a script flow is run for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScriptInput {
    pub body: String,
    pub from: String,
    pub to: String,
    pub media: Vec<String>,
    pub message_sid: String,
    /// Unix seconds, from the flow engine's clock; also what `now()` returns.
    pub received_at: i64,
    pub contact: BTreeMap<String, String>,
}

/// What a YAML expression can see. In the expression these are the
/// variables `body`, `from`, `to`, `sid`, `vars` and `contact` (maps of
/// strings); `now` is available as `now()`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExprContext {
    pub body: String,
    pub from: String,
    pub to: String,
    pub message_sid: String,
    /// Unix seconds, from the flow engine's clock.
    pub now: i64,
    pub vars: BTreeMap<String, String>,
    pub contact: BTreeMap<String, String>,
}

/// What a script run produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScriptOutput {
    /// At most [`MAX_REPLIES`]; empty exactly when `silence` is set.
    pub replies: Vec<ScriptReply>,
    /// The conversation state to persist.
    pub state: BTreeMap<String, Value>,
    /// The contact fields to persist (the whole set, not a diff).
    pub contact: BTreeMap<String, String>,
    /// The script chose not to answer.
    pub silence: bool,
}

/// One outgoing message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScriptReply {
    pub body: String,
    pub media: Vec<String>,
}

/// The sandboxed Rhai engine. Build one per flow set (or per process) and
/// share it: it is `Send + Sync`, and runs on many threads at once keep their
/// per-run data (start time, `now()`, random seed) in thread-locals.
pub struct Sandbox {
    /// The one engine, configured once; never mutated after `new`.
    engine: Engine,
    limits: Limits,
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
            if operations % CLOCK_CHECK_EVERY == 0 && run_over_budget() {
                Some(Dynamic::from(TIME_BUDGET_TOKEN))
            } else {
                None
            }
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

        register_helpers(&mut engine);

        Sandbox { engine, limits }
    }

    /// The limits this sandbox enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
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

    /// Compiles a whole-flow `.rhai` file. Imports are resolved now (and
    /// embedded), so a missing or forbidden module is a load error and no
    /// file is read while handling a message.
    pub fn compile_script(&self, file: &Path, source: &str) -> Result<Script, ScriptError> {
        let file: Arc<Path> = Arc::from(file);
        let origin = Origin::whole_file(file.clone());
        let mut ast = {
            // Imported modules run their top-level code while compiling; keep
            // that inside the same budget as a message.
            let _run = RunGuard::enter(RunState::new(&self.limits, 0, "", file.clone()));
            self.engine
                .compile_into_self_contained(&Scope::new(), source)
                .map_err(|err| compile_error(&origin, source, *err))?
        };
        ast.set_source(file.to_string_lossy().as_ref());

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
        Ok(Script {
            ast: Arc::new(ast),
            file,
            entry,
        })
    }

    /// Compiles an expression that sits in a YAML file at `line`:`column`
    /// (1-based, where the expression text starts). Error positions are
    /// translated into that file: on the expression's first line columns are
    /// offset by `column`; later lines keep their own column, because the
    /// loader cannot know how the YAML scalar was indented.
    pub fn compile_expr(
        &self,
        file: &Path,
        line: usize,
        column: usize,
        source: &str,
    ) -> Result<Expr, ScriptError> {
        let (line, column) = (line.max(1), column.max(1));
        let origin = Origin {
            file: Arc::from(file),
            line,
            column,
            fallback: (line, column),
        };
        let mut ast = self
            .engine
            .compile_expression_with_scope(&expr_scope(&ExprContext::default()), source)
            .map_err(|err| parse_error(&origin, err))?;
        ast.set_source(file.to_string_lossy().as_ref());
        Ok(Expr {
            ast: Arc::new(ast),
            origin,
        })
    }

    /// Runs a script flow's `on_message` for one message. See the module
    /// docs for the contract. Never panics on script or input content.
    pub fn run_script(
        &self,
        script: &Script,
        input: &ScriptInput,
        state: &BTreeMap<String, Value>,
    ) -> Result<ScriptOutput, ScriptError> {
        // A shared cell lets `on_message` mutate `state` in place. It must
        // only ever sit in a variable (the parameter), never inside a map or
        // array: Rhai assumes containers hold no shared values.
        let state_cell = Dynamic::from_map(json_object_to_map(state)).into_shared();
        let msg = message_map(input);

        let mut run = RunState::new(
            &self.limits,
            input.received_at,
            &input.message_sid,
            script.file.clone(),
        );
        run.contact = Some(input.contact.clone());
        let guard = RunGuard::enter(run);
        let result = catch_engine_panic(|| {
            self.engine.call_fn_with_options::<Dynamic>(
                CallFnOptions::new(),
                &mut Scope::new(),
                &script.ast,
                ENTRY_POINT,
                (Dynamic::from_map(msg), state_cell.clone()),
            )
        });
        let run = guard.finish();
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
        let state = state_from(state_cell.flatten_clone()).map_err(bad)?;
        // Rhai checks sizes lazily (an indexed write inside a loop is only
        // measured later), so the state that is about to be persisted is
        // measured again here, the same way Rhai measures a map.
        if let Some(which) = state_over_limits(&state, &self.limits) {
            return Err(ScriptError::Limit {
                file: script.file.to_path_buf(),
                line: script.entry.0,
                column: script.entry.1,
                which,
            });
        }
        let contact = run.and_then(|run| run.contact).unwrap_or_default();
        Ok(ScriptOutput {
            silence: replies.is_empty(),
            replies,
            state,
            contact,
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

    /// Evaluates a branch condition. `()` (e.g. an unset `vars.x`) counts as
    /// false; any other non-bool is a runtime error.
    pub fn eval_bool(&self, expr: &Expr, ctx: &ExprContext) -> Result<bool, ScriptError> {
        let value = self.eval_expr(expr, ctx)?;
        if value.is_unit() {
            return Ok(false);
        }
        value.as_bool().map_err(|_| ScriptError::Runtime {
            file: expr.origin.file.to_path_buf(),
            line: expr.origin.line,
            column: expr.origin.column,
            message: format!("condition must be true or false, not {}", value.type_name()),
        })
    }

    /// Evaluates an expression to text: strings as they are, `()` as "",
    /// anything else as Rhai prints it.
    pub fn eval_string(&self, expr: &Expr, ctx: &ExprContext) -> Result<String, ScriptError> {
        let value = self.eval_expr(expr, ctx)?;
        Ok(if value.is_unit() {
            String::new()
        } else {
            value.to_string()
        })
    }

    fn eval_expr(&self, expr: &Expr, ctx: &ExprContext) -> Result<Dynamic, ScriptError> {
        let mut scope = expr_scope(ctx);
        let _run = RunGuard::enter(RunState::new(
            &self.limits,
            ctx.now,
            &ctx.message_sid,
            expr.origin.file.clone(),
        ));
        match catch_engine_panic(|| {
            self.engine
                .eval_ast_with_scope::<Dynamic>(&mut scope, &expr.ast)
        }) {
            Ok(value) => Ok(value.flatten()),
            Err(err) => match *err {
                EvalAltResult::Exit(value, _) => Ok(value.flatten()),
                err => Err(runtime_error(&expr.origin, err)),
            },
        }
    }
}

/// The wall-clock budget of one message, shared by every script run and
/// expression evaluated for it. See [`Sandbox::message_budget`].
#[derive(Debug, Clone, Copy)]
pub struct MessageBudget {
    started: Instant,
    budget: Duration,
}

impl MessageBudget {
    /// True once the message has used up its budget.
    pub fn exhausted(&self) -> bool {
        self.started.elapsed() > self.budget
    }
}

// ---------------------------------------------------------------------------
// Per-run state. The engine is shared, but `on_progress` and the helpers need
// to know which run they belong to (its start time, `now()`, its random
// stream). A run executes entirely on the calling thread, so a thread-local
// slot set for the duration of the call is exact, and costs no locking.

struct RunState {
    started: Instant,
    budget: Duration,
    now: i64,
    rng: u64,
    file: Arc<Path>,
    /// Contact fields as `set_contact` leaves them; `None` where writing
    /// them makes no sense (YAML expressions).
    contact: Option<BTreeMap<String, String>>,
}

impl RunState {
    fn new(limits: &Limits, now: i64, sid: &str, file: Arc<Path>) -> RunState {
        RunState {
            started: Instant::now(),
            budget: limits.wall_clock,
            now,
            rng: seed_from_sid(sid),
            file,
            contact: None,
        }
    }
}

thread_local! {
    static RUN: RefCell<Option<RunState>> = const { RefCell::new(None) };
}

/// Installs a [`RunState`] for the current thread and restores the previous
/// one on drop (also on unwind), so a forgotten state cannot leak into the
/// next run on this thread.
struct RunGuard {
    /// `Some(previous)` until the state has been put back.
    restore: Option<Option<RunState>>,
}

impl RunGuard {
    fn enter(state: RunState) -> RunGuard {
        let previous = RUN.with(|slot| slot.replace(Some(state)));
        RunGuard {
            restore: Some(previous),
        }
    }

    /// Ends the run and hands back what it accumulated.
    fn finish(mut self) -> Option<RunState> {
        self.swap_back()
    }

    fn swap_back(&mut self) -> Option<RunState> {
        let previous = self.restore.take()?;
        RUN.try_with(|slot| {
            slot.try_borrow_mut()
                .ok()
                .map(|mut s| std::mem::replace(&mut *s, previous))
        })
        .ok()
        .flatten()
        .flatten()
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.swap_back();
    }
}

/// Turns a panic inside Rhai into an ordinary error. Rhai should not panic
/// on any script, but one message must never take a worker thread down with
/// it, so this is a backstop, not a control path.
fn catch_engine_panic<T>(
    f: impl FnOnce() -> Result<T, Box<EvalAltResult>>,
) -> Result<T, Box<EvalAltResult>> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        tracing::error!(script = %current_file(), "the script engine panicked");
        Err(runtime("internal error in the script engine"))
    })
}

/// Runs `f` on the current run's state, if there is one.
fn with_run<T>(f: impl FnOnce(&mut RunState) -> T) -> Option<T> {
    RUN.try_with(|slot| slot.try_borrow_mut().ok()?.as_mut().map(f))
        .ok()
        .flatten()
}

fn run_over_budget() -> bool {
    with_run(|run| run.started.elapsed() > run.budget).unwrap_or(false)
}

fn current_file() -> String {
    with_run(|run| run.file.display().to_string()).unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Imports.

/// Resolves `import "name"` to `<flows dir>/name.rhai` and refuses anything
/// that could reach outside the flows directory: absolute paths, `..`,
/// drive prefixes, and symlinks that lead elsewhere.
struct FlowsDirResolver {
    /// Canonical flows directory, compared against canonical module paths.
    root: Option<PathBuf>,
    /// Does the loading; caching is off so a reload sees edited modules.
    files: Option<FileModuleResolver>,
}

impl FlowsDirResolver {
    fn new(module_dir: Option<&Path>) -> FlowsDirResolver {
        match module_dir {
            None => FlowsDirResolver {
                root: None,
                files: None,
            },
            Some(dir) => {
                let root = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
                let mut files = FileModuleResolver::new_with_path(root.clone());
                files.enable_cache(false);
                FlowsDirResolver {
                    root: Some(root),
                    files: Some(files),
                }
            }
        }
    }

    fn check(&self, path: &str, pos: Position) -> Result<&FileModuleResolver, Box<EvalAltResult>> {
        let refuse = |reason: &str| {
            Box::new(EvalAltResult::ErrorInModule(
                path.to_string(),
                Box::new(EvalAltResult::ErrorRuntime(reason.into(), pos)),
                pos,
            ))
        };
        let (Some(root), Some(files)) = (&self.root, &self.files) else {
            return Err(refuse("imports are disabled (no flows directory)"));
        };
        let relative = Path::new(path);
        let stays_inside = !path.is_empty()
            && !path.contains(['\\', ':', '\0'])
            && relative
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !stays_inside {
            return Err(refuse(
                "module paths must be relative to the flows directory, without '..'",
            ));
        }
        let full = files.get_file_path(path, None);
        match full.canonicalize() {
            Ok(real) if real.starts_with(root) => Ok(files),
            Ok(_) => Err(refuse("module resolves outside the flows directory")),
            Err(_) => Err(Box::new(EvalAltResult::ErrorModuleNotFound(
                path.to_string(),
                pos,
            ))),
        }
    }
}

impl ModuleResolver for FlowsDirResolver {
    fn resolve(
        &self,
        engine: &Engine,
        _source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<Arc<rhai::Module>, Box<EvalAltResult>> {
        self.check(path, pos)?.resolve(engine, None, path, pos)
    }

    fn resolve_ast(
        &self,
        engine: &Engine,
        _source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Option<Result<AST, Box<EvalAltResult>>> {
        match self.check(path, pos) {
            Ok(files) => files.resolve_ast(engine, None, path, pos),
            Err(err) => Some(Err(err)),
        }
    }
}

// ---------------------------------------------------------------------------
// Errors: Rhai positions -> file:line:column.

/// Where a piece of Rhai source starts in its file.
#[derive(Clone)]
struct Origin {
    file: Arc<Path>,
    line: usize,
    column: usize,
    /// Reported for errors that carry no position.
    fallback: (usize, usize),
}

impl Origin {
    fn whole_file(file: Arc<Path>) -> Origin {
        Origin {
            file,
            line: 1,
            column: 1,
            fallback: (1, 1),
        }
    }

    /// Maps a position inside the source to one in the file.
    fn translate(&self, pos: Position) -> (usize, usize) {
        let (Some(line), column) = (pos.line(), pos.position()) else {
            return self.fallback;
        };
        let column = column.unwrap_or(1);
        if line == 1 {
            (self.line, self.column + column - 1)
        } else {
            (self.line + line - 1, column)
        }
    }
}

fn parse_error(origin: &Origin, err: ParseError) -> ScriptError {
    let ParseError(kind, pos) = err;
    parse_error_kind(origin, *kind, pos)
}

fn parse_error_kind(origin: &Origin, kind: ParseErrorType, pos: Position) -> ScriptError {
    let (line, column) = origin.translate(pos);
    let file = origin.file.to_path_buf();
    match kind {
        ParseErrorType::ExprTooDeep => ScriptError::Limit {
            file,
            line,
            column,
            which: "expression depth",
        },
        kind => ScriptError::Compile {
            file,
            line,
            column,
            message: lowercase_first(&kind.to_string()),
        },
    }
}

/// Errors from `compile_into_self_contained`: parse errors, or failures to
/// load an imported module (which Rhai reports without a position, so the
/// import is found in the source by its path).
fn compile_error(origin: &Origin, source: &str, err: EvalAltResult) -> ScriptError {
    match err {
        EvalAltResult::ErrorParsing(kind, pos) => parse_error_kind(origin, kind, pos),
        err => {
            let pos = err.position();
            let (line, column) = if pos.is_none() {
                import_path(&err)
                    .and_then(|path| locate(source, &format!("\"{path}\"")))
                    .unwrap_or((1, 1))
            } else {
                origin.translate(pos)
            };
            ScriptError::Compile {
                file: origin.file.to_path_buf(),
                line,
                column,
                message: describe(err),
            }
        }
    }
}

fn import_path(err: &EvalAltResult) -> Option<&str> {
    match err {
        EvalAltResult::ErrorModuleNotFound(path, _) | EvalAltResult::ErrorInModule(path, ..) => {
            Some(path)
        }
        _ => None,
    }
}

/// A human message for an error, without Rhai's own position suffix.
fn describe(err: EvalAltResult) -> String {
    match err {
        EvalAltResult::ErrorInModule(path, inner, _) => match *inner {
            // The resolver's refusals already say what is wrong.
            EvalAltResult::ErrorRuntime(reason, _) => {
                format!("cannot import \"{path}\": {reason}")
            }
            inner => {
                let at = match (inner.position().line(), inner.position().position()) {
                    (Some(l), Some(c)) => format!(" at {l}:{c}"),
                    (Some(l), None) => format!(" at {l}"),
                    _ => String::new(),
                };
                format!("in module \"{path}\"{at}: {}", describe(inner))
            }
        },
        EvalAltResult::ErrorModuleNotFound(path, _) => {
            format!("module \"{path}\" not found in the flows directory")
        }
        EvalAltResult::ErrorParsing(kind, _) => {
            format!("syntax error: {}", lowercase_first(&kind.to_string()))
        }
        mut err => {
            err.clear_position();
            lowercase_first(&err.to_string())
        }
    }
}

fn runtime_error(origin: &Origin, err: EvalAltResult) -> ScriptError {
    let own_source = origin.file.to_string_lossy();
    let mut pos = err.position();
    // Set once the error leads into another file (an imported module): from
    // then on positions are in that file, so the last one in ours is kept.
    let mut foreign: Option<String> = None;
    let mut cur = err;
    loop {
        let inner = match cur {
            EvalAltResult::ErrorInFunctionCall(name, src, inner, _) => {
                if foreign.is_none() && !(src.is_empty() || src == own_source) {
                    foreign = Some(format!("in fn {name} of module \"{src}\""));
                }
                inner
            }
            EvalAltResult::ErrorInModule(path, inner, _) => {
                if foreign.is_none() {
                    foreign = Some(format!("in module \"{path}\""));
                }
                inner
            }
            _ => break,
        };
        cur = *inner;
        if foreign.is_none() && !cur.position().is_none() {
            pos = cur.position();
        }
    }

    let (line, column) = origin.translate(pos);
    let file = origin.file.to_path_buf();
    if let Some(which) = limit_hit(&cur) {
        return ScriptError::Limit {
            file,
            line,
            column,
            which,
        };
    }
    let message = describe(cur);
    let message = match foreign {
        Some(context) => format!("{context}: {message}"),
        None => message,
    };
    ScriptError::Runtime {
        file,
        line,
        column,
        message,
    }
}

/// Which sandbox limit an error reports, if any.
fn limit_hit(err: &EvalAltResult) -> Option<&'static str> {
    match err {
        EvalAltResult::ErrorTooManyOperations(_) => Some("operations"),
        EvalAltResult::ErrorStackOverflow(_) => Some("call depth"),
        EvalAltResult::ErrorTerminated(token, _)
            if token
                .read_lock::<rhai::ImmutableString>()
                .as_deref()
                .map(|s| s.as_str())
                == Some(TIME_BUDGET_TOKEN) =>
        {
            Some("time budget")
        }
        EvalAltResult::ErrorDataTooLarge(what, _) => {
            let what = what.to_ascii_lowercase();
            if what.contains("string") {
                Some("string size")
            } else if what.contains("array") {
                Some("array size")
            } else if what.contains("map") {
                Some("map size")
            } else {
                None
            }
        }
        EvalAltResult::ErrorParsing(ParseErrorType::ExprTooDeep, _) => Some("expression depth"),
        _ => None,
    }
}

/// 1-based line and column (in characters) of the first occurrence of
/// `needle` in `source`.
fn locate(source: &str, needle: &str) -> Option<(usize, usize)> {
    source.find(needle).map(|at| line_column_at(source, at))
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column_at(source: &str, at: usize) -> (usize, usize) {
    let before = source.get(..at).unwrap_or(source);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Where `fn on_message` is defined, or 1:1.
fn locate_entry_point(source: &str) -> (usize, usize) {
    static ENTRY: OnceLock<Option<Regex>> = OnceLock::new();
    let entry = ENTRY.get_or_init(|| {
        Regex::new(&format!(
            r"(?m)^[ \t]*(?:private[ \t]+)?fn[ \t]+{ENTRY_POINT}\b"
        ))
        .ok()
    });
    entry
        .as_ref()
        .and_then(|re| re.find(source))
        .map(|m| {
            let indent = m.as_str().len() - m.as_str().trim_start().len();
            line_column_at(source, m.start() + indent)
        })
        .unwrap_or((1, 1))
}

fn lowercase_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

// ---------------------------------------------------------------------------
// Values across the boundary.

fn message_map(input: &ScriptInput) -> Map {
    let media: Array = input.media.iter().map(|url| url.clone().into()).collect();
    let mut msg = Map::new();
    msg.insert("body".into(), input.body.clone().into());
    msg.insert("from".into(), input.from.clone().into());
    msg.insert("to".into(), input.to.clone().into());
    msg.insert("media".into(), media.into());
    msg.insert("sid".into(), input.message_sid.clone().into());
    msg.insert("received_at".into(), Dynamic::from_int(input.received_at));
    msg.insert("contact".into(), strings_to_map(&input.contact).into());
    msg
}

/// The variables a YAML expression sees. Pushed as plain (not constant)
/// variables so the optimizer cannot fold the empty compile-time values in.
fn expr_scope(ctx: &ExprContext) -> Scope<'static> {
    let mut scope = Scope::new();
    scope.push("body", ctx.body.clone());
    scope.push("from", ctx.from.clone());
    scope.push("to", ctx.to.clone());
    scope.push("sid", ctx.message_sid.clone());
    scope.push("vars", strings_to_map(&ctx.vars));
    scope.push("contact", strings_to_map(&ctx.contact));
    scope
}

fn strings_to_map(fields: &BTreeMap<String, String>) -> Map {
    fields
        .iter()
        .map(|(k, v)| (k.as_str().into(), v.clone().into()))
        .collect()
}

fn json_object_to_map(object: &BTreeMap<String, Value>) -> Map {
    object
        .iter()
        .map(|(k, v)| (k.as_str().into(), json_to_dynamic(v, 0)))
        .collect()
}

fn json_to_dynamic(value: &Value, depth: usize) -> Dynamic {
    // Stored state was written by `dynamic_to_json`, which caps the depth;
    // the cap here only protects against a hand-edited store.
    if depth > MAX_STATE_DEPTH {
        return Dynamic::UNIT;
    }
    match value {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => (*b).into(),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from_int(i),
            None => Dynamic::from_float(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => s.clone().into(),
        Value::Array(items) => items
            .iter()
            .map(|v| json_to_dynamic(v, depth + 1))
            .collect::<Array>()
            .into(),
        Value::Object(fields) => fields
            .iter()
            .map(|(k, v)| (k.as_str().into(), json_to_dynamic(v, depth + 1)))
            .collect::<Map>()
            .into(),
    }
}

fn dynamic_to_json(value: Dynamic, path: &str, depth: usize) -> Result<Value, String> {
    if depth > MAX_STATE_DEPTH {
        return Err(format!("{path} nests deeper than {MAX_STATE_DEPTH} levels"));
    }
    let value = value.flatten();
    if value.is_unit() {
        return Ok(Value::Null);
    }
    if let Ok(b) = value.as_bool() {
        return Ok(Value::Bool(b));
    }
    if let Ok(i) = value.as_int() {
        return Ok(Value::from(i));
    }
    if let Ok(f) = value.as_float() {
        return serde_json::Number::from_f64(f)
            .map(Value::Number)
            .ok_or_else(|| format!("{path} is {f}, which JSON cannot hold"));
    }
    if let Ok(c) = value.as_char() {
        return Ok(Value::String(c.to_string()));
    }
    let type_name = value.type_name();
    if value.is_string() {
        return Ok(Value::String(value.into_string().unwrap_or_default()));
    }
    if value.is_array() {
        let items = value.into_array().unwrap_or_default();
        return items
            .into_iter()
            .enumerate()
            .map(|(i, item)| dynamic_to_json(item, &format!("{path}[{i}]"), depth + 1))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array);
    }
    if let Some(map) = value.try_cast::<Map>() {
        return map
            .into_iter()
            .map(|(k, v)| {
                let child = dynamic_to_json(v, &format!("{path}.{k}"), depth + 1)?;
                Ok((k.to_string(), child))
            })
            .collect::<Result<serde_json::Map<_, _>, String>>()
            .map(Value::Object);
    }
    Err(format!(
        "{path} is a {type_name}; state holds only strings, numbers, bools, arrays and maps"
    ))
}

fn state_from(value: Dynamic) -> Result<BTreeMap<String, Value>, String> {
    let type_name = value.type_name();
    let Some(map) = value.try_cast::<Map>() else {
        return Err(format!("state must stay a map, but it is a {type_name}"));
    };
    map.into_iter()
        .map(|(k, v)| {
            let json = dynamic_to_json(v, &format!("state.{k}"), 1)?;
            Ok((k.to_string(), json))
        })
        .collect()
}

/// Which size limit the state breaks, counting like Rhai does: all array
/// elements, all map entries and all string bytes, nested ones included.
fn state_over_limits(state: &BTreeMap<String, Value>, limits: &Limits) -> Option<&'static str> {
    fn add(value: &Value, totals: &mut (usize, usize, usize)) {
        match value {
            Value::String(s) => totals.2 += s.len(),
            Value::Array(items) => {
                totals.0 += items.len();
                items.iter().for_each(|v| add(v, totals));
            }
            Value::Object(fields) => {
                totals.1 += fields.len();
                fields.values().for_each(|v| add(v, totals));
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
    let mut totals = (0, state.len(), 0);
    state.values().for_each(|v| add(v, &mut totals));
    let (arrays, maps, strings) = totals;
    // Zero means "no limit", as it does for Rhai.
    let over = |count: usize, max: usize| max > 0 && count > max;
    if over(strings, limits.max_string_len) {
        Some("string size")
    } else if over(arrays, limits.max_array_len) {
        Some("array size")
    } else if over(maps, limits.max_map_len) {
        Some("map size")
    } else {
        None
    }
}

fn replies_from(value: Dynamic) -> Result<Vec<ScriptReply>, String> {
    let value = value.flatten();
    if value.is_unit() {
        return Ok(Vec::new());
    }
    if value.is_string() {
        return Ok(vec![ScriptReply {
            body: value.into_string().unwrap_or_default(),
            media: Vec::new(),
        }]);
    }
    if value.is_map() {
        return Ok(vec![reply_from_map(value, "the reply")?]);
    }
    if value.is_array() {
        let items = value.into_array().unwrap_or_default();
        if items.len() > MAX_REPLIES {
            return Err(format!(
                "{ENTRY_POINT} returned {} replies; at most {MAX_REPLIES} are allowed",
                items.len()
            ));
        }
        return items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                let item = item.flatten();
                if item.is_string() {
                    Ok(ScriptReply {
                        body: item.into_string().unwrap_or_default(),
                        media: Vec::new(),
                    })
                } else if item.is_map() {
                    reply_from_map(item, &format!("reply [{i}]"))
                } else {
                    Err(format!(
                        "reply [{i}] is a {}; expected a string or #{{ body, media }}",
                        item.type_name()
                    ))
                }
            })
            .collect();
    }
    Err(format!(
        "{ENTRY_POINT} returned a {}; expected a string, an array of replies, \
         #{{ body, media }} or () for silence",
        value.type_name()
    ))
}

fn reply_from_map(value: Dynamic, what: &str) -> Result<ScriptReply, String> {
    let map = value.try_cast::<Map>().unwrap_or_default();
    let mut reply = ScriptReply::default();
    for (key, field) in map {
        let field = field.flatten();
        match key.as_str() {
            "body" if field.is_string() => reply.body = field.into_string().unwrap_or_default(),
            "body" if field.is_unit() => {}
            "media" if field.is_string() => {
                reply.media = vec![field.into_string().unwrap_or_default()]
            }
            "media" if field.is_unit() => {}
            "media" if field.is_array() => {
                for url in field.into_array().unwrap_or_default() {
                    let url = url.flatten();
                    let type_name = url.type_name();
                    match url.into_string() {
                        Ok(url) => reply.media.push(url),
                        Err(_) => {
                            return Err(format!(
                                "{what}: media entries must be URL strings, not {type_name}"
                            ))
                        }
                    }
                }
            }
            "body" | "media" => {
                return Err(format!(
                    "{what}: {key} must be a string{}, not {}",
                    if key == "media" {
                        " or an array of strings"
                    } else {
                        ""
                    },
                    field.type_name()
                ))
            }
            other => {
                return Err(format!(
                    "{what}: unknown field `{other}` (a reply has `body` and `media`)"
                ))
            }
        }
    }
    if reply.media.len() > MAX_MEDIA {
        return Err(format!(
            "{what} has {} media URLs; at most {MAX_MEDIA} are allowed",
            reply.media.len()
        ));
    }
    if let Some(url) = reply
        .media
        .iter()
        .find(|url| !(url.starts_with("https://") || url.starts_with("http://")))
    {
        return Err(format!("{what}: media URL {url:?} is not an http(s) URL"));
    }
    if reply.body.is_empty() && reply.media.is_empty() {
        return Err(format!("{what} has neither a body nor media"));
    }
    Ok(reply)
}

// ---------------------------------------------------------------------------
// Helpers registered in the engine.

fn register_helpers(engine: &mut Engine) {
    // The language core ships a blocking `sleep`, which the wall-clock check
    // cannot interrupt; shadow it (the engine's own functions win).
    engine.register_fn("sleep", |_: INT| -> Result<(), Box<EvalAltResult>> {
        Err(runtime("sleep is not available in flows"))
    });
    engine.register_fn("sleep", |_: FLOAT| -> Result<(), Box<EvalAltResult>> {
        Err(runtime("sleep is not available in flows"))
    });

    engine.register_fn(
        "set_contact",
        |key: &str, value: Dynamic| -> Result<(), Box<EvalAltResult>> { set_contact(key, value) },
    );

    engine.register_fn("normalize", |s: &str| normalize(s));

    let cache = Arc::new(RegexCache::default());
    let regexes = cache.clone();
    engine.register_fn(
        "matches",
        move |s: &str, pattern: &str| -> Result<bool, Box<EvalAltResult>> {
            Ok(regexes.get(pattern)?.is_match(s))
        },
    );
    let regexes = cache;
    engine.register_fn(
        "captures",
        move |s: &str, pattern: &str| -> Result<Dynamic, Box<EvalAltResult>> {
            let re = regexes.get(pattern)?;
            Ok(match re.captures(s) {
                None => Dynamic::UNIT,
                Some(caps) => caps
                    .iter()
                    .map(|group| group.map_or(Dynamic::UNIT, |m| m.as_str().into()))
                    .collect::<Array>()
                    .into(),
            })
        },
    );

    engine.register_fn("parse_number", |s: &str| parse_number(s));

    engine.register_fn("now", || -> Result<INT, Box<EvalAltResult>> {
        with_run(|run| run.now)
            .ok_or_else(|| runtime("now() is only available while handling a message"))
    });
    engine.register_fn("date", |ts: INT| format_date(ts));
    engine.register_fn("time", |ts: INT| format_time(ts));
    engine.register_fn("weekday", |ts: INT| weekday(ts).to_string());

    engine.register_fn(
        "random_int",
        |low: INT, high: INT| -> Result<INT, Box<EvalAltResult>> {
            if low > high {
                return Err(runtime(&format!(
                    "random_int({low}, {high}): the first bound must not exceed the second"
                )));
            }
            let span = (i128::from(high) - i128::from(low) + 1) as u128;
            let x = next_random()?;
            // Multiply-shift maps 64 random bits onto the span without the
            // bias `%` has; span <= 2^64 so the product fits in u128.
            let offset = (u128::from(x) * span) >> 64;
            Ok((i128::from(low) + offset as i128) as INT)
        },
    );
    engine.register_fn(
        "random_choice",
        |items: &mut Array| -> Result<Dynamic, Box<EvalAltResult>> {
            if items.is_empty() {
                return Ok(Dynamic::UNIT);
            }
            let x = next_random()?;
            let index = ((u128::from(x) * items.len() as u128) >> 64) as usize;
            Ok(items[index].clone())
        },
    );
}

/// Most contact fields one sender may have.
const MAX_CONTACT_FIELDS: usize = 100;

fn set_contact(key: &str, value: Dynamic) -> Result<(), Box<EvalAltResult>> {
    if key.is_empty() {
        return Err(runtime("set_contact: the field name is empty"));
    }
    let value = value.flatten();
    let text = if value.is_unit() {
        None
    } else if value.is_string()
        || value.is_int()
        || value.is_float()
        || value.is_bool()
        || value.is_char()
    {
        Some(value.to_string())
    } else {
        return Err(runtime(&format!(
            "set_contact: contact fields hold text, not {}",
            value.type_name()
        )));
    };
    with_run(|run| {
        let Some(contact) = run.contact.as_mut() else {
            return Err(runtime("set_contact is only available in script flows"));
        };
        match text {
            None => {
                contact.remove(key);
            }
            Some(text) => {
                if contact.len() >= MAX_CONTACT_FIELDS && !contact.contains_key(key) {
                    return Err(runtime(&format!(
                        "set_contact: a contact holds at most {MAX_CONTACT_FIELDS} fields"
                    )));
                }
                contact.insert(key.to_string(), text);
            }
        }
        Ok(())
    })
    .unwrap_or_else(|| {
        Err(runtime(
            "set_contact is only available while handling a message",
        ))
    })
}

fn runtime(message: &str) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorRuntime(message.into(), Position::NONE))
}

/// The first number in `text` ("I'm 42" -> 42, "1.5 kg" -> 1.5), or `()`.
fn parse_number(text: &str) -> Dynamic {
    static NUMBER: OnceLock<Option<Regex>> = OnceLock::new();
    let number = NUMBER.get_or_init(|| Regex::new(r"[-+]?[0-9]+(?:\.[0-9]+)?").ok());
    let Some(found) = number.as_ref().and_then(|re| re.find(text)) else {
        return Dynamic::UNIT;
    };
    let found = found.as_str();
    if !found.contains('.') {
        if let Ok(i) = found.parse::<INT>() {
            return Dynamic::from_int(i);
        }
    }
    found
        .parse::<FLOAT>()
        .map_or(Dynamic::UNIT, Dynamic::from_float)
}

/// Compiled patterns, bounded: when full it is simply emptied, which is
/// cheap and keeps a script that builds patterns from input from growing it.
#[derive(Default)]
struct RegexCache {
    compiled: Mutex<HashMap<String, Arc<Regex>>>,
}

impl RegexCache {
    fn get(&self, pattern: &str) -> Result<Arc<Regex>, Box<EvalAltResult>> {
        if pattern.len() > MAX_PATTERN_LEN {
            return Err(runtime(&format!(
                "regex pattern is longer than {MAX_PATTERN_LEN} bytes"
            )));
        }
        let lock = || self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(re) = lock().get(pattern) {
            return Ok(re.clone());
        }
        let re = RegexBuilder::new(pattern)
            .size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|err| runtime(&format!("bad regex {pattern:?}: {err}")))?;
        let re = Arc::new(re);
        let mut compiled = lock();
        if compiled.len() >= REGEX_CACHE_CAPACITY {
            compiled.clear();
        }
        compiled.insert(pattern.to_string(), re.clone());
        Ok(re)
    }
}

// Deterministic randomness: a run's stream is seeded from its MessageSid, so
// a retried webhook (same sid) gets the same answer and tests can pin it.

fn seed_from_sid(sid: &str) -> u64 {
    let digest = Sha256::digest(sid.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    // xorshift has one fixed point, zero; step off it.
    match u64::from_le_bytes(bytes) {
        0 => 0x9E37_79B9_7F4A_7C15,
        seed => seed,
    }
}

/// xorshift64*: tiny, fast, and plenty for picking a greeting.
fn next_random() -> Result<u64, Box<EvalAltResult>> {
    with_run(|run| {
        let mut x = run.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        run.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
    .ok_or_else(|| runtime("randomness is only available while handling a message"))
}

// Calendar helpers, all UTC. Civil-from-days is Howard Hinnant's algorithm
// (http://howardhinnant.github.io/date_algorithms.html), valid for every i64
// timestamp.

const SECONDS_PER_DAY: i64 = 86_400;

fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// "YYYY-MM-DD" of a unix timestamp, UTC.
pub fn format_date(ts: i64) -> String {
    let (year, month, day) = civil_from_days(ts.div_euclid(SECONDS_PER_DAY));
    format!("{year:04}-{month:02}-{day:02}")
}

/// "HH:MM" of a unix timestamp, UTC.
pub fn format_time(ts: i64) -> String {
    let seconds = ts.rem_euclid(SECONDS_PER_DAY);
    format!("{:02}:{:02}", seconds / 3_600, seconds % 3_600 / 60)
}

/// English day name of a unix timestamp, UTC.
pub fn weekday(ts: i64) -> &'static str {
    const NAMES: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    // Day 0 (1970-01-01) was a Thursday.
    NAMES[ts.div_euclid(SECONDS_PER_DAY).rem_euclid(7) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const FILE: &str = "flows/test.rhai";

    fn sandbox() -> Sandbox {
        Sandbox::new(Limits::default(), None)
    }

    fn compile(sandbox: &Sandbox, source: &str) -> Script {
        sandbox
            .compile_script(Path::new(FILE), source)
            .unwrap_or_else(|err| panic!("{err}"))
    }

    fn input(body: &str) -> ScriptInput {
        ScriptInput {
            body: body.to_string(),
            from: "+15550001111".to_string(),
            to: "+15559990000".to_string(),
            message_sid: "SM0001".to_string(),
            received_at: 1_700_000_000,
            ..ScriptInput::default()
        }
    }

    fn run_with(sandbox: &Sandbox, source: &str, body: &str) -> Result<ScriptOutput, ScriptError> {
        sandbox.run_script(&compile(sandbox, source), &input(body), &BTreeMap::new())
    }

    fn run(source: &str) -> Result<ScriptOutput, ScriptError> {
        run_with(&sandbox(), source, "hi")
    }

    /// Wraps a body in `fn on_message(msg, state) { .. }`.
    fn on_message(body: &str) -> String {
        format!("fn on_message(msg, state) {{\n{body}\n}}")
    }

    fn bodies(output: &ScriptOutput) -> Vec<&str> {
        output.replies.iter().map(|r| r.body.as_str()).collect()
    }

    fn limit_of(result: Result<ScriptOutput, ScriptError>) -> &'static str {
        match result {
            Err(ScriptError::Limit { which, .. }) => which,
            other => panic!("expected a limit error, got {other:?}"),
        }
    }

    fn ctx(body: &str) -> ExprContext {
        ExprContext {
            body: body.to_string(),
            from: "+15550001111".to_string(),
            to: "+15559990000".to_string(),
            message_sid: "SM0001".to_string(),
            now: 0,
            vars: BTreeMap::from([("name".to_string(), "Ann".to_string())]),
            contact: BTreeMap::from([("city".to_string(), "Lyon".to_string())]),
        }
    }

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
        assert_eq!(first.state["question"], json!(1));
        assert_eq!(first.state["score"], json!(0));
        assert_eq!(first.contact["name"], "Ann");

        let second = sandbox
            .run_script(&quiz, &input("  Paris! "), &first.state)
            .unwrap();
        assert_eq!(bodies(&second), ["Noted.", "Q2: 2 + 2?"]);
        assert_eq!(second.state["score"], json!(1));
        assert_eq!(second.state["question"], json!(2));
        // The contact was not touched this time; it is passed through.
        assert!(second.contact.is_empty());

        let mut third_input = input("it is 4");
        third_input.contact = first.contact.clone();
        let third = sandbox
            .run_script(&quiz, &third_input, &second.state)
            .unwrap();
        assert_eq!(bodies(&third), ["Ann, you scored 2/2"]);
        assert!(third.state.is_empty());
        assert_eq!(third.contact["name"], "Ann");
    }

    #[test]
    fn state_round_trips_json_values_and_can_be_replaced() {
        let sandbox = sandbox();
        let script = compile(
            &sandbox,
            &on_message(
                "state.list.push(msg.body); state.n += 0.5; state.flag = !state.flag; \
                 state.nested.inner.x = 1; ()",
            ),
        );
        let state: BTreeMap<String, Value> = serde_json::from_value(json!({
            "list": ["a"], "n": 1, "flag": false, "nested": { "inner": {} }, "none": null
        }))
        .unwrap();
        let out = sandbox.run_script(&script, &input("b"), &state).unwrap();
        assert_eq!(
            serde_json::to_value(&out.state).unwrap(),
            json!({ "list": ["a", "b"], "n": 1.5, "flag": true,
                    "nested": { "inner": { "x": 1 } }, "none": null })
        );

        let out = run(&on_message(
            "state = #{ fresh: true, gone: 1 }; state.remove(\"gone\"); ()",
        ))
        .unwrap();
        assert_eq!(
            serde_json::to_value(&out.state).unwrap(),
            json!({ "fresh": true })
        );

        // A copy is a copy: only mutations of `state` itself are kept.
        let out = run(&on_message("let copy = state; copy.x = 1; ()")).unwrap();
        assert!(out.state.is_empty());
        // Helpers called method-style get `state` by reference.
        let out = run(&format!(
            "fn bump() {{ this.n = (this.n ?? 0) + 1; }}\n{}",
            on_message("state.bump(); state.bump(); ()")
        ))
        .unwrap();
        assert_eq!(out.state["n"], json!(2));
    }

    #[test]
    fn contact_fields_are_read_from_msg_and_written_with_set_contact() {
        let sandbox = sandbox();
        let script = compile(
            &sandbox,
            &on_message(
                r#"set_contact("visits", parse_number(msg.contact.visits) + 1);
                   set_contact("old", ());
                   msg.contact.city"#,
            ),
        );
        let mut message = input("hi");
        message.contact = BTreeMap::from([
            ("visits".to_string(), "41".to_string()),
            ("old".to_string(), "x".to_string()),
            ("city".to_string(), "Lyon".to_string()),
        ]);
        let out = sandbox
            .run_script(&script, &message, &BTreeMap::new())
            .unwrap();
        assert_eq!(bodies(&out), ["Lyon"]);
        assert_eq!(
            out.contact,
            BTreeMap::from([
                ("visits".to_string(), "42".to_string()),
                ("city".to_string(), "Lyon".to_string()),
            ])
        );

        let err = run(&on_message("set_contact(\"tags\", [1]); ()")).unwrap_err();
        assert!(matches!(err, ScriptError::Runtime { .. }), "{err}");
    }

    #[test]
    fn every_return_shape() {
        let out = run(&on_message(r#""hello""#)).unwrap();
        assert_eq!(bodies(&out), ["hello"]);
        assert!(!out.silence);

        let out = run(&on_message(
            r#"["one", #{ body: "two", media: ["https://example.com/a.png"] }]"#,
        ))
        .unwrap();
        assert_eq!(bodies(&out), ["one", "two"]);
        assert_eq!(out.replies[1].media, ["https://example.com/a.png"]);

        let out = run(&on_message(
            r#"#{ body: "pic", media: ["https://example.com/1.jpg", "https://example.com/2.jpg"] }"#,
        ))
        .unwrap();
        assert_eq!(
            out.replies,
            [ScriptReply {
                body: "pic".to_string(),
                media: vec![
                    "https://example.com/1.jpg".to_string(),
                    "https://example.com/2.jpg".to_string()
                ],
            }]
        );

        let out = run(&on_message(r#"#{ media: "https://example.com/only.jpg" }"#)).unwrap();
        assert_eq!(out.replies[0].body, "");
        assert_eq!(out.replies[0].media.len(), 1);

        for silent in ["()", "[]", "if false { \"never\" }"] {
            let out = run(&on_message(silent)).unwrap();
            assert!(out.silence && out.replies.is_empty(), "{silent}");
        }

        let out = run(&on_message(r#"exit("early"); "late""#)).unwrap();
        assert_eq!(bodies(&out), ["early"]);
    }

    #[test]
    fn unusable_results_are_bad_returns() {
        for body in [
            "42",
            "true",
            "[1]",
            "|| 1",
            "let a = []; for i in 0..11 { a.push(`${i}`); } a",
            r#"#{ bdy: "typo" }"#,
            r#"#{ body: 5 }"#,
            r#"#{ body: "x", media: "ftp://example.com/a" }"#,
            "#{}",
            "state.f = Fn(\"normalize\"); ()",
            "state.x = 1.0 / 0.0; ()",
            "state = 5; ()",
        ] {
            match run(&on_message(body)) {
                Err(err @ ScriptError::BadReturn { .. }) => {
                    assert!(
                        err.to_string().starts_with("flows/test.rhai: error: "),
                        "{err}"
                    );
                    assert_eq!(err.line_column(), None);
                }
                other => panic!("{body}: expected BadReturn, got {other:?}"),
            }
        }
    }

    #[test]
    fn operations_limit() {
        assert_eq!(limit_of(run(&on_message("loop {}"))), "operations");
    }

    #[test]
    fn wall_clock_budget_stops_a_loop_when_operations_are_unlimited() {
        let budget = Duration::from_millis(50);
        let sandbox = Sandbox::new(
            Limits {
                max_operations: u64::MAX,
                wall_clock: budget,
                ..Limits::default()
            },
            None,
        );
        let started = Instant::now();
        let err =
            run_with(&sandbox, &on_message("let i = 0;\nloop { i += 1; }"), "hi").unwrap_err();
        let took = started.elapsed();
        assert_eq!(err.limit(), Some("time budget"), "{err}");
        assert!(took >= budget, "stopped before the budget: {took:?}");
        // Only guards against the budget not firing at all (a hang); the
        // machine is shared, so no tighter bound on the time taken.
        assert!(took < budget * 100, "budget overshot: {took:?}");
        // Limit errors raised in a function point at `fn on_message`.
        assert_eq!(err.line_column(), Some((1, 1)));
        assert_eq!(
            err.to_string(),
            "flows/test.rhai:1:1: error: script exceeded the time budget limit"
        );
    }

    #[test]
    fn call_depth_limit() {
        let source = format!("fn down(n) {{ down(n + 1) }}\n\n{}", on_message("down(0)"));
        let err = run(&source).unwrap_err();
        assert_eq!(err.limit(), Some("call depth"), "{err}");
        assert_eq!(err.line_column(), Some((3, 1)));

        // The configured depth itself is usable.
        let source = format!(
            "fn down(n) {{ if n == 0 {{ 0 }} else {{ 1 + down(n - 1) }} }}\n{}",
            on_message("`${down(30)}`")
        );
        assert_eq!(bodies(&run(&source).unwrap()), ["30"]);
    }

    #[test]
    fn size_limits() {
        // Every write re-measures the value it grows, so filling a 1000-entry
        // map takes many operations and, in a debug build, a while; lift
        // those limits so the size limits are what stops these.
        let patient = Sandbox::new(
            Limits {
                max_operations: 50_000_000,
                wall_clock: Duration::from_secs(60),
                ..Limits::default()
            },
            None,
        );
        let limit = |body: &str| limit_of(run_with(&patient, &on_message(body), "hi"));
        assert_eq!(limit(r#"let s = "x"; loop { s += s; }"#), "string size");
        assert_eq!(limit(r#""x".pad(20000, "y")"#), "string size");
        assert_eq!(limit("let a = []; loop { a.push(1); }"), "array size");
        // Nested arrays count all their elements, so nesting is bounded too.
        assert_eq!(limit("let a = []; loop { a = [a]; }"), "array size");
        // Rhai measures a value grown by indexed writes when it is next
        // used, not on every write; a map filled by a loop that never ends
        // is stopped by the operations or time limit instead.
        assert_eq!(
            limit("let m = #{}; for i in 0..5000 { m[`k${i}`] = i; } `${m.len()}`"),
            "map size"
        );
        assert_eq!(
            limit("for i in 0..5000 { state[`k${i}`] = i; } ()"),
            "map size"
        );
        // State grows through the same checks.
        assert_eq!(
            limit("state.log = []; loop { state.log.push(msg.body); }"),
            "array size"
        );
    }

    #[test]
    fn expression_depth_limit() {
        let deep = format!("{}1{}", "(".repeat(100), ")".repeat(100));
        let err = sandbox()
            .compile_script(Path::new(FILE), &on_message(&deep))
            .unwrap_err();
        assert_eq!(err.limit(), Some("expression depth"), "{err}");
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

    fn flows_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("greet.rhai"),
            "fn hello(name) { `hello ${name}` }\n",
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("lib")).unwrap();
        std::fs::write(dir.path().join("lib/math.rhai"), "fn double(x) { x * 2 }\n").unwrap();
        dir
    }

    #[test]
    fn imports_from_the_flows_directory_work() {
        let dir = flows_dir();
        let sandbox = Sandbox::new(Limits::default(), Some(dir.path()));
        let source = format!(
            "import \"greet\" as greet;\nimport \"lib/math\" as math;\n{}",
            on_message("greet::hello(msg.body) + \" \" + math::double(21)")
        );
        let script = sandbox
            .compile_script(&dir.path().join("main.rhai"), &source)
            .unwrap_or_else(|err| panic!("{err}"));
        // The module was embedded at compile time: deleting it changes nothing.
        std::fs::remove_file(dir.path().join("greet.rhai")).unwrap();
        let out = sandbox
            .run_script(&script, &input("Ann"), &BTreeMap::new())
            .unwrap();
        assert_eq!(bodies(&out), ["hello Ann 42"]);
    }

    #[test]
    fn imports_outside_the_flows_directory_are_rejected() {
        let dir = flows_dir();
        let sandbox = Sandbox::new(Limits::default(), Some(dir.path()));
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.rhai"), "fn secret() { 1 }\n").unwrap();
        let absolute = outside.path().join("secret");

        for path in [
            "../etc/passwd".to_string(),
            "lib/../../secret".to_string(),
            "/etc/passwd".to_string(),
            absolute.to_string_lossy().into_owned(),
            "missing".to_string(),
        ] {
            let source = format!("// header\nimport \"{path}\" as m;\n{}", on_message("()"));
            match sandbox.compile_script(Path::new("flows/main.rhai"), &source) {
                Err(err @ ScriptError::Compile { .. }) => {
                    assert_eq!(err.line_column(), Some((2, 8)), "{path}: {err}");
                    assert!(err.to_string().contains(&path), "{err}");
                }
                other => panic!("{path}: expected a compile error, got {other:?}"),
            }
        }

        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(
                outside.path().join("secret.rhai"),
                dir.path().join("sneaky.rhai"),
            )
            .unwrap();
            let source = format!("import \"sneaky\" as m;\n{}", on_message("()"));
            let err = sandbox
                .compile_script(Path::new("flows/main.rhai"), &source)
                .unwrap_err();
            assert!(
                err.to_string().contains("outside the flows directory"),
                "{err}"
            );
        }

        // No flows directory, no imports at all.
        let source = format!("import \"greet\" as m;\n{}", on_message("()"));
        let err = Sandbox::new(Limits::default(), None)
            .compile_script(Path::new("flows/main.rhai"), &source)
            .unwrap_err();
        assert!(err.to_string().contains("imports are disabled"), "{err}");
    }

    #[test]
    fn compile_errors_carry_line_and_column() {
        let sandbox = sandbox();
        let err = sandbox
            .compile_script(
                Path::new("flows/quiz.rhai"),
                "fn on_message(msg, state) {\n    let x = ;\n}\n",
            )
            .unwrap_err();
        assert!(matches!(err, ScriptError::Compile { .. }));
        assert_eq!(err.line_column(), Some((2, 13)), "{err}");
        assert!(
            err.to_string().starts_with("flows/quiz.rhai:2:13: error: "),
            "{err}"
        );

        // Strict variables: a typo is a load error, not a silent ().
        let err = sandbox
            .compile_script(
                Path::new(FILE),
                "fn on_message(msg, state) {\n  mgs.body\n}",
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "flows/test.rhai:2:3: error: undefined variable: mgs"
        );

        let err = sandbox
            .compile_script(Path::new(FILE), "fn reply(msg) { \"hi\" }")
            .unwrap_err();
        assert_eq!(err.line_column(), Some((1, 1)));
        assert!(
            err.to_string().contains("fn on_message(msg, state)"),
            "{err}"
        );

        let err = sandbox
            .compile_script(
                Path::new(FILE),
                "// one arg\n  fn on_message(msg) { \"hi\" }",
            )
            .unwrap_err();
        assert_eq!(err.line_column(), Some((2, 3)), "{err}");
        assert!(err.to_string().contains("two parameters"), "{err}");
    }

    #[test]
    fn runtime_errors_carry_line_and_column() {
        let err = run("fn on_message(msg, state) {\n  let n = 1;\n  n / 0\n}").unwrap_err();
        assert!(matches!(err, ScriptError::Runtime { .. }), "{err}");
        assert_eq!(err.line_column(), Some((3, 5)), "{err}");

        let err = run("fn on_message(msg, state) {\n  throw \"nope\";\n}").unwrap_err();
        assert_eq!(err.line_column(), Some((2, 3)), "{err}");
        assert!(err.to_string().contains("nope"), "{err}");

        // An error inside a helper points at the helper's line.
        let err = run(&format!(
            "fn helper(x) {{\n  x.no_such_method()\n}}\n{}",
            on_message("helper(1)")
        ))
        .unwrap_err();
        assert_eq!(err.line_column(), Some((2, 5)), "{err}");
    }

    #[test]
    fn expression_errors_are_offset_into_the_yaml_file() {
        let sandbox = sandbox();
        let yaml = Path::new("flows/signup.yaml");
        // Syntax error on the expression's first line: the column is shifted.
        let err = sandbox.compile_expr(yaml, 12, 15, "body == ").unwrap_err();
        assert_eq!(err.file(), yaml);
        assert_eq!(err.line_column(), Some((12, 15 + 8)), "{err}");
        assert!(
            err.to_string()
                .starts_with("flows/signup.yaml:12:23: error: "),
            "{err}"
        );

        // On a later line, only the line is shifted.
        let err = sandbox
            .compile_expr(yaml, 12, 15, "body == \"a\" ||\n  nope")
            .unwrap_err();
        assert_eq!(err.line_column(), Some((13, 3)), "{err}");

        // Runtime errors are translated the same way.
        let expr = sandbox
            .compile_expr(yaml, 30, 11, "vars.name + 1 > (1 / 0)")
            .unwrap();
        let err = sandbox.eval_bool(&expr, &ctx("x")).unwrap_err();
        assert!(matches!(err, ScriptError::Runtime { .. }), "{err}");
        assert_eq!(err.line_column().map(|(l, _)| l), Some(30), "{err}");
        assert!(err.line_column().unwrap().1 > 11, "{err}");
    }

    #[test]
    fn expressions_see_the_message_vars_and_contact() {
        let sandbox = sandbox();
        let yaml = Path::new("flows/a.yaml");
        let cond = |src: &str, body: &str| {
            let expr = sandbox
                .compile_expr(yaml, 1, 1, src)
                .unwrap_or_else(|e| panic!("{e}"));
            sandbox
                .eval_bool(&expr, &ctx(body))
                .unwrap_or_else(|e| panic!("{e}"))
        };
        assert!(cond(
            r#"normalize(body) == "yes please""#,
            "  YES   please!! "
        ));
        assert!(cond(r#"matches(body, "(?i)^hours?$")"#, "Hours"));
        assert!(!cond(r#"matches(body, "(?i)^hours?$")"#, "hours please"));
        assert!(cond("parse_number(body) >= 18", "I am 21"));
        assert!(cond(r#"vars.name == "Ann" && contact.city == "Lyon""#, ""));
        assert!(cond(
            r#"from.starts_with("+1") && to != from && sid == "SM0001""#,
            ""
        ));
        // An unset variable is () and counts as false.
        assert!(!cond("vars.missing", ""));

        let expr = sandbox.compile_expr(yaml, 1, 1, "body.len()").unwrap();
        let err = sandbox.eval_bool(&expr, &ctx("abc")).unwrap_err();
        assert!(err.to_string().contains("true or false"), "{err}");

        let text = |src: &str| {
            let expr = sandbox
                .compile_expr(yaml, 1, 1, src)
                .unwrap_or_else(|e| panic!("{e}"));
            sandbox
                .eval_string(&expr, &ctx("Ann"))
                .unwrap_or_else(|e| panic!("{e}"))
        };
        assert_eq!(text("`Hi ${vars.name}!`"), "Hi Ann!");
        assert_eq!(text("40 + 2"), "42");
        assert_eq!(text("vars.missing"), "");
        assert_eq!(text(r#"contact.name ?? "friend""#), "friend");
        assert_eq!(text("date(now())"), "1970-01-01");
        let captured = text(r#"captures("order 12-34", "([0-9]+)-([0-9]+)")[2]"#);
        assert_eq!(captured, "34");
        assert_eq!(text(r#"captures("nothing", "[0-9]+")"#), "");

        // Contact writes belong to scripts.
        let expr = sandbox
            .compile_expr(yaml, 1, 1, r#"set_contact("a", "b")"#)
            .unwrap();
        assert!(sandbox.eval_string(&expr, &ctx("")).is_err());
    }

    #[test]
    fn helpers() {
        assert_eq!(normalize("  ¡Hola,   Mundo!! "), "hola mundo");
        assert_eq!(normalize("\t...STOP...\n"), "stop");
        assert_eq!(normalize(""), "");
        assert!(parse_number("no digits").is_unit());
        assert_eq!(parse_number("I have -3 cats").as_int(), Ok(-3));
        assert_eq!(parse_number("1.5 kg").as_float(), Ok(1.5));
        assert_eq!(
            parse_number("99999999999999999999").as_float(),
            Ok(99_999_999_999_999_999_999.0)
        );

        // A bad pattern is the script's runtime error, not a panic.
        let err = run(&on_message(r#"matches(msg.body, "(unclosed")"#)).unwrap_err();
        assert!(err.to_string().contains("bad regex"), "{err}");
        let huge = "(?:a{1000}){1000}";
        let err = run(&on_message(&format!(r#"matches(msg.body, "{huge}")"#))).unwrap_err();
        assert!(matches!(err, ScriptError::Runtime { .. }), "{err}");

        // print and debug go to tracing and do not disturb the run.
        let out = run(&on_message(r#"print("p"); debug(msg); "ok""#)).unwrap();
        assert_eq!(bodies(&out), ["ok"]);
    }

    #[test]
    fn calendar_helpers_on_known_timestamps() {
        assert_eq!(
            (format_date(0), format_time(0), weekday(0)),
            ("1970-01-01".to_string(), "00:00".to_string(), "Thursday")
        );
        let ts = 1_700_000_000;
        assert_eq!(
            (format_date(ts), format_time(ts), weekday(ts)),
            ("2023-11-14".to_string(), "22:13".to_string(), "Tuesday")
        );
        // Leap day, and before the epoch.
        assert_eq!(format_date(951_782_400), "2000-02-29");
        assert_eq!(weekday(951_782_400), "Tuesday");
        assert_eq!(
            (format_date(-1), format_time(-1)),
            ("1969-12-31".to_string(), "23:59".to_string())
        );
        assert_eq!(weekday(-1), "Wednesday");
        // Extremes do not overflow.
        let _ = (
            format_date(i64::MAX),
            format_date(i64::MIN),
            weekday(i64::MIN),
        );

        let out = run(&on_message(
            "`${date(now())} ${time(now())} ${weekday(now())}`",
        ))
        .unwrap();
        assert_eq!(bodies(&out), ["2023-11-14 22:13 Tuesday"]);
    }

    #[test]
    fn randomness_is_seeded_by_the_message_sid() {
        let sandbox = sandbox();
        let script = compile(
            &sandbox,
            &on_message(
                r#"let words = ["a", "b", "c", "d", "e", "f", "g", "h"];
                   `${random_choice(words)}${random_choice(words)}${random_int(1, 1000)}`"#,
            ),
        );
        let pick = |sid: &str| {
            let mut message = input("hi");
            message.message_sid = sid.to_string();
            let out = sandbox
                .run_script(&script, &message, &BTreeMap::new())
                .unwrap();
            out.replies[0].body.clone()
        };
        assert_eq!(pick("SMaaaa"), pick("SMaaaa"));
        let distinct: std::collections::BTreeSet<String> =
            (0..50).map(|i| pick(&format!("SM{i:032}"))).collect();
        assert!(
            distinct.len() > 40,
            "only {} distinct picks",
            distinct.len()
        );

        // Bounds are inclusive and respected; bad bounds are an error.
        let out = run(&on_message(
            "let seen = #{}; for i in 0..200 { let n = random_int(-2, 2); \
             if n < -2 || n > 2 { throw `out of range: ${n}`; } seen[`${n}`] = true; } \
             `${seen.len()} ${random_choice([])}`",
        ))
        .unwrap();
        assert_eq!(bodies(&out), ["5 "]);
        assert!(run(&on_message("random_int(3, 1)")).is_err());
        let out = run(&on_message(
            "`${random_int(-9223372036854775807 - 1, 9223372036854775807)}`",
        ));
        assert!(out.is_ok(), "{out:?}");
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
                        let mut message = input("paris");
                        message.message_sid = format!("SM{t}-{i}");
                        let first = sandbox.run_script(&quiz, &message, &BTreeMap::new())?;
                        let second = sandbox.run_script(&quiz, &message, &first.state)?;
                        assert_eq!(second.state["score"], json!(1));
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
            prop_assert_eq!(&out.state["last"], &json!(body));
        }
    }
}
