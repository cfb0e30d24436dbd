//! The numbers a script is held to: [`Limits`] (operations, call and
//! expression depth, string/array/map sizes, the wall-clock budget) and the
//! fixed bounds (state depth, map key length, regex size and cache). The
//! engine is set to them in `Sandbox::new`; `bounded` holds the standard
//! functions replaced so that they refuse before building an oversized
//! value.

use std::time::Duration;

/// How deeply state values may nest. Deeper values would make the JSON
/// conversion (and whoever reads the stored state) recurse without bound.
pub(super) const MAX_STATE_DEPTH: usize = 32;

/// How often (in Rhai operations) the wall-clock budget is checked. Reading
/// an `Instant` costs tens of nanoseconds; every 64 operations keeps that
/// negligible while bounding the overshoot to a few microseconds of script.
pub(super) const CLOCK_CHECK_EVERY: u64 = 64;

/// The value `on_progress` terminates a run with, so that a termination can
/// be told apart from anything a script could raise itself.
pub(super) const TIME_BUDGET_TOKEN: &str = "smsflow: wall-clock budget exceeded";

/// Most wakes a script flow's run may have pending (`wake_after`).
pub(crate) const MAX_WAKES: usize = 10;

/// Longest name of a wake, in bytes.
pub(super) const MAX_WAKE_NAME_BYTES: usize = 64;

/// Longest a script may ask to sleep (`wake_after`): 365 days, like every
/// duration in a flow.
pub(super) const MAX_WAKE_SECS: i64 = 365 * 86_400;

/// Longest regex pattern a script may use.
pub(super) const MAX_PATTERN_LEN: usize = 1_024;

/// Compiled-size ceiling for one regex, so a pattern like `a{1000}{1000}`
/// fails to compile instead of eating memory.
pub(super) const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Longest map key a script may create, in bytes. Rhai does not count keys
/// against any limit, and every copy of a map copies its keys: keys are
/// names, and this keeps a map of 1,000 of them small however often it is
/// copied. All keys of one value together are also held to the string
/// size limit (counted apart from the strings themselves).
pub const MAX_MAP_KEY_BYTES: usize = 256;

/// Distinct patterns kept compiled. Scripts use a handful of literal
/// patterns; the bound only matters if one builds patterns from input.
pub(super) const REGEX_CACHE_CAPACITY: usize = 256;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::script::testing::*;
    use crate::flow::script::Sandbox;
    use std::path::Path;
    use std::time::Instant;

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
        // A value grown by indexed writes is measured when its variable is
        // next used, not on every write.
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
}
