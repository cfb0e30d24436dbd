//! Where the engine runs when the flow set has Rhai: inline on the async
//! worker, or through `block_in_place`, which hands the worker's other
//! tasks to another thread for the duration.
//!
//! `block_in_place` protects unrelated requests from a slow script (up to
//! its wall-clock budget, 50 ms by default), but each call wakes or
//! spawns a thread to take the worker over: measured, it cost as much CPU
//! as the Rhai it protected, and the threads it spun up held memory. So
//! while the set's runs have been quick (each under [`INLINE_MAX`] for the
//! last [`FAST_STREAK`] messages) the engine runs inline; one slow run
//! sends the following messages back through `block_in_place` until runs
//! are quick again. The price: a script that turns slow after a quick
//! streak holds one worker for that one message.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A run at most this long counts as quick.
pub(super) const INLINE_MAX: Duration = Duration::from_millis(1);
/// Quick runs in a row before the engine runs inline.
pub(super) const FAST_STREAK: u32 = 32;

/// Recent engine runs of sets with Rhai: how many in a row were quick.
#[derive(Default)]
pub(super) struct Offload {
    streak: AtomicU32,
}

impl Offload {
    /// Whether the next run goes inline.
    pub(super) fn inline(&self) -> bool {
        self.streak.load(Ordering::Relaxed) >= FAST_STREAK
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
        if took > INLINE_MAX {
            self.streak.store(0, Ordering::Relaxed);
        } else if self.streak.load(Ordering::Relaxed) < FAST_STREAK {
            self.streak.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_runs_go_inline_and_one_slow_run_offloads_again() {
        let o = Offload::default();
        assert!(!o.inline(), "a new set starts offloaded");
        for _ in 0..FAST_STREAK - 1 {
            o.record(Duration::from_micros(50));
        }
        assert!(!o.inline());
        o.record(Duration::from_micros(50));
        assert!(o.inline());
        o.record(INLINE_MAX + Duration::from_micros(1));
        assert!(!o.inline(), "a slow run sends the next ones off the worker");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_in_both_modes_give_the_result() {
        let o = Offload::default();
        for i in 0..FAST_STREAK + 3 {
            assert_eq!(o.run(|| i + 1), i + 1);
        }
        assert!(o.inline());
    }
}
