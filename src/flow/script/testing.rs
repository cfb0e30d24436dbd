//! Fixtures shared by the sandbox's unit tests.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use super::errors::ScriptError;
use super::expr::ExprContext;
use super::limits::Limits;
use super::{Sandbox, Script, ScriptInput, ScriptOutput};

pub(super) const FILE: &str = "flows/test.rhai";

/// The default limits, except a wall-clock budget generous enough that a
/// busy test machine never trips it: these tests are about what scripts
/// compute and refuse, not how fast; the budget has its own tests.
pub(super) fn sandbox() -> Sandbox {
    Sandbox::new(
        Limits {
            wall_clock: Duration::from_secs(10),
            ..Limits::default()
        },
        None,
    )
}

pub(super) fn compile(sandbox: &Sandbox, source: &str) -> Script {
    sandbox
        .compile_script(Path::new(FILE), source)
        .unwrap_or_else(|err| panic!("{err}"))
}

pub(super) fn input(body: &str) -> ScriptInput<'_> {
    ScriptInput {
        body,
        from: "+15550001111",
        to: "+15559990000",
        message_sid: "SM0001",
        received_at: 1_700_000_000,
        call_room: crate::flow::calls::MAX_CALLS_PER_MESSAGE,
        ..ScriptInput::default()
    }
}

pub(super) fn run_with(
    sandbox: &Sandbox,
    source: &str,
    body: &str,
) -> Result<ScriptOutput, ScriptError> {
    sandbox.run_script(&compile(sandbox, source), &input(body), &BTreeMap::new())
}

pub(super) fn run(source: &str) -> Result<ScriptOutput, ScriptError> {
    run_with(&sandbox(), source, "hi")
}

/// Wraps a body in `fn on_message(msg, state) { .. }`.
pub(super) fn on_message(body: &str) -> String {
    format!("fn on_message(msg, state) {{\n{body}\n}}")
}

pub(super) fn bodies(output: &ScriptOutput) -> Vec<&str> {
    output.replies.iter().map(|r| r.body.as_str()).collect()
}

pub(super) fn limit_of(result: Result<ScriptOutput, ScriptError>) -> &'static str {
    match result {
        Err(ScriptError::Limit { which, .. }) => which,
        other => panic!("expected a limit error, got {other:?}"),
    }
}

pub(super) fn ctx(body: &str) -> ExprContext {
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

/// Limits where only the size limits stop a script (a debug build is
/// slow), or, with `operations`, where that many operations are the
/// most a script may use.
pub(super) fn sized(operations: u64) -> Sandbox {
    Sandbox::new(
        Limits {
            max_operations: operations,
            wall_clock: Duration::from_secs(60),
            ..Limits::default()
        },
        None,
    )
}
