//! Where the engine runs when the flow set has Rhai: inline on the async
//! worker, or through `block_in_place`, which hands the worker's other
//! tasks to another thread for the duration.
//!
//! `block_in_place` protects unrelated requests from a slow script (up to
//! its wall-clock budget, 50 ms by default), but each call wakes or
//! spawns a thread to take the worker over: measured, it cost as much CPU
//! as the Rhai it protected, and the threads it spun up held memory. So
//! while the set's runs are quick the engine runs inline, and it goes
//! through `block_in_place` while at least [`SLOW_TO_OFFLOAD`] of the last
//! 32 runs were slow.
//!
//! A run is slow when it took longer than [`INLINE_MAX`] *and* ran at
//! least [`SLOW_OPERATIONS`] Rhai operations. The clock alone also counts
//! the time the thread was preempted: in a 30-s durable Rhai soak on a
//! quiet 2-core machine 116 of 500,000 quick runs (tens of operations
//! each) measured over 1 ms, and far more while other work took the
//! cores. When each such run sent the next 32 through `block_in_place`,
//! the threads that took the workers over held memory: a 30-s relaxed
//! soak grew from 117 to 177 MiB (the same soak with every run inline:
//! 46 to 61 MiB). A script is slow because it works, and Rhai counts its
//! work: each run of the loadgen's script takes fewer than 60 operations,
//! a millisecond of Rhai thousands. What the count misses is a single
//! expensive call (sorting a long array); such a run stays inline and
//! holds its worker, within the wall-clock budget.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::flow::script;

/// A run at most this long counts as quick.
pub(super) const INLINE_MAX: Duration = Duration::from_millis(1);
/// A run of fewer Rhai operations counts as quick however long it took
/// (its thread was preempted).
pub(super) const SLOW_OPERATIONS: u64 = 5_000;
/// Runs go through `block_in_place` while at least this many of the last
/// 32 were slow.
pub(super) const SLOW_TO_OFFLOAD: u32 = 2;

/// Recent engine runs of sets with Rhai: bit `i` of `slow` is set when
/// the run `i` runs ago was slow.
pub(super) struct Offload {
    slow: AtomicU32,
}

impl Default for Offload {
    /// A new set starts offloaded, as if its last 32 runs had been slow.
    fn default() -> Self {
        Offload {
            slow: AtomicU32::new(u32::MAX),
        }
    }
}

impl Offload {
    /// Whether the next run goes inline.
    pub(super) fn inline(&self) -> bool {
        self.slow.load(Ordering::Relaxed).count_ones() < SLOW_TO_OFFLOAD
    }

    /// Run `f` (the engine, on a set with Rhai, on a multi-thread runtime)
    /// inline or through `block_in_place`, and note how long it took.
    pub(super) fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        // `f` runs on this thread either way (`block_in_place` moves the
        // worker's other tasks, not this one).
        let timed = || {
            let started = Instant::now();
            let operations = script::operations();
            let out = f();
            let ran = script::operations().wrapping_sub(operations);
            (out, started.elapsed(), ran)
        };
        let (out, took, ran) = if self.inline() {
            timed()
        } else {
            tokio::task::block_in_place(timed)
        };
        self.record(took, ran);
        out
    }

    /// Notes a run that took `took` and ran `operations` Rhai operations.
    fn record(&self, took: Duration, operations: u64) {
        let slow = took > INLINE_MAX && operations >= SLOW_OPERATIONS;
        // A quick run of a set whose last 32 runs were quick changes
        // nothing: the common path reads the shared word and writes none.
        if !slow && self.slow.load(Ordering::Relaxed) == 0 {
            return;
        }
        let _ = self
            .slow
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                Some((h << 1) | u32::from(slow))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUICK: (Duration, u64) = (Duration::from_micros(50), 64);
    const SLOW: (Duration, u64) = (Duration::from_millis(2), 50_000);

    impl Offload {
        fn note(&self, (took, operations): (Duration, u64)) {
            self.record(took, operations);
        }
    }

    fn quick_streak(o: &Offload) {
        for _ in 0..32 {
            o.note(QUICK);
        }
    }

    #[test]
    fn a_new_set_goes_inline_after_32_quick_runs() {
        let o = Offload::default();
        assert!(!o.inline(), "a new set starts offloaded");
        for _ in 0..30 {
            o.note(QUICK);
        }
        assert!(!o.inline(), "two of the last 32 count as slow still");
        o.note(QUICK);
        assert!(o.inline());
    }

    #[test]
    fn a_long_run_of_few_operations_was_preempted_not_slow() {
        let o = Offload::default();
        quick_streak(&o);
        for _ in 0..32 {
            o.note((Duration::from_millis(20), SLOW_OPERATIONS - 64));
        }
        assert!(o.inline());
        o.note((Duration::from_millis(20), SLOW_OPERATIONS));
        o.note((INLINE_MAX + Duration::from_micros(1), SLOW_OPERATIONS));
        assert!(!o.inline(), "enough work and over the clock: slow");
    }

    #[test]
    fn one_slow_run_among_quick_ones_stays_inline() {
        let o = Offload::default();
        quick_streak(&o);
        o.note(SLOW);
        assert!(o.inline());
        quick_streak(&o);
        o.note(SLOW);
        assert!(o.inline(), "33 runs apart: never two in the window");
    }

    #[test]
    fn two_slow_runs_in_32_offload_until_they_leave_the_window() {
        let o = Offload::default();
        quick_streak(&o);
        o.note(SLOW);
        for _ in 0..30 {
            o.note(QUICK);
        }
        o.note(SLOW);
        assert!(!o.inline(), "the second slow run within 32 offloads");
        o.note(QUICK);
        assert!(o.inline(), "the first slow run left the window");
        quick_streak(&o);
        o.note(SLOW);
        o.note(SLOW);
        for _ in 0..30 {
            o.note(QUICK);
        }
        assert!(!o.inline(), "two slow runs in a row, 30 runs ago");
        o.note(QUICK);
        assert!(o.inline(), "the older one left the window");
    }

    /// Through the real sandbox: Rhai's operations reach the count.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_script_that_works_for_milliseconds_is_offloaded() {
        use crate::flow::script::{Limits, Sandbox, ScriptInput};
        let sandbox = Sandbox::new(
            Limits {
                max_operations: 50_000_000,
                wall_clock: Duration::from_secs(60),
                ..Limits::default()
            },
            None,
        );
        let compile = |source: &str| {
            sandbox
                .compile_script(std::path::Path::new("busy.rhai"), source)
                .unwrap()
        };
        let busy = compile(
            "fn on_message(msg, state) { let n = 0; for i in 0..300000 { n += i; } `${n}` }",
        );
        let quick = compile("fn on_message(msg, state) { \"hi\" }");
        let input = ScriptInput::default();
        let state = std::collections::BTreeMap::new();
        let o = Offload::default();
        for _ in 0..32 {
            assert!(o.run(|| sandbox.run_script(&quick, &input, &state)).is_ok());
        }
        assert!(o.inline());
        for _ in 0..2 {
            assert!(o.run(|| sandbox.run_script(&busy, &input, &state)).is_ok());
        }
        assert!(!o.inline(), "two runs of some 900,000 operations are slow");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_in_both_modes_give_the_result() {
        let o = Offload::default();
        for i in 0..35 {
            assert_eq!(o.run(|| i + 1), i + 1);
        }
        assert!(o.inline());
    }
}
