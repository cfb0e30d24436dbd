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
//! 32 runs took longer than [`INLINE_MAX`].
//!
//! Why two and not one: a run's wall-clock time also counts the time its
//! thread was preempted. In a 30-s durable Rhai soak on a 2-core machine
//! 116 of 500,000 quick runs measured over 1 ms. When each such run sent
//! the next 32 through `block_in_place`, the threads that took the
//! workers over held memory: a 30-s relaxed soak grew from 117 to 177 MiB
//! (the same soak with every run inline: 46 to 61 MiB). Under this rule
//! the durable soak offloaded 43 of its 500,000 runs and stayed at 45-56
//! MiB. The price: a script that turns slow after a quick streak holds
//! one worker for up to two messages before the next ones move off it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A run at most this long counts as quick.
pub(super) const INLINE_MAX: Duration = Duration::from_millis(1);
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
        let timed = || {
            let started = Instant::now();
            let out = f();
            (out, started.elapsed())
        };
        let (out, took) = if self.inline() {
            timed()
        } else {
            tokio::task::block_in_place(timed)
        };
        self.record(took);
        out
    }

    fn record(&self, took: Duration) {
        let slow = took > INLINE_MAX;
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

    const QUICK: Duration = Duration::from_micros(50);
    const SLOW: Duration = Duration::from_millis(2);

    fn quick_streak(o: &Offload) {
        for _ in 0..32 {
            o.record(QUICK);
        }
    }

    #[test]
    fn a_new_set_goes_inline_after_32_quick_runs() {
        let o = Offload::default();
        assert!(!o.inline(), "a new set starts offloaded");
        for _ in 0..30 {
            o.record(QUICK);
        }
        assert!(!o.inline(), "two of the last 32 count as slow still");
        o.record(QUICK);
        assert!(o.inline());
    }

    #[test]
    fn one_slow_run_among_quick_ones_stays_inline() {
        // A preempted thread makes a quick run look slow.
        let o = Offload::default();
        quick_streak(&o);
        o.record(SLOW);
        assert!(o.inline());
        quick_streak(&o);
        o.record(SLOW);
        assert!(o.inline(), "33 runs apart: never two in the window");
    }

    #[test]
    fn two_slow_runs_in_32_offload_until_they_leave_the_window() {
        let o = Offload::default();
        quick_streak(&o);
        o.record(SLOW);
        for _ in 0..30 {
            o.record(QUICK);
        }
        o.record(SLOW);
        assert!(!o.inline(), "the second slow run within 32 offloads");
        o.record(QUICK);
        assert!(o.inline(), "the first slow run left the window");
        quick_streak(&o);
        o.record(SLOW);
        o.record(SLOW);
        for _ in 0..30 {
            o.record(QUICK);
        }
        assert!(!o.inline(), "two slow runs in a row, 30 runs ago");
        o.record(QUICK);
        assert!(o.inline(), "the older one left the window");
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
