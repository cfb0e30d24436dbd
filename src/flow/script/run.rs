//! Per-run state. The engine is shared, but `on_progress` and the helpers need
//! to know which run they belong to (its start time, `now()`, its random
//! stream). A run executes entirely on the calling thread, so a thread-local
//! slot set for the duration of the call is exact, and costs no locking.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rhai::EvalAltResult;

use super::helpers::runtime;
use super::http::RunCalls;
use super::limits::Limits;

pub(super) struct RunState {
    started: Instant,
    budget: Duration,
    pub(super) now: i64,
    /// The run's MessageSid, which seeds its random stream.
    pub(super) sid: String,
    /// The random stream's state, seeded on the first draw: most scripts
    /// never draw, and the seed is a SHA-256 of the sid.
    pub(super) rng: Option<u64>,
    file: Arc<Path>,
    /// Compiling a script while the flows load, the only time a module
    /// file may be read.
    pub(super) loading: bool,
    /// Contact fields as `set_contact` leaves them; `None` where writing
    /// them makes no sense (YAML expressions).
    pub(super) contact: Option<BTreeMap<String, String>>,
    /// Wakes asked for with `wake_after` (name → seconds from now, the
    /// last call for a name wins); `None` where waking makes no sense
    /// (YAML expressions).
    pub(super) wakes: Option<BTreeMap<String, i64>>,
    /// The run's HTTP calls (`http()`); `None` where calls make no sense
    /// (YAML expressions, loading).
    pub(super) calls: Option<RunCalls>,
}

impl RunState {
    pub(super) fn new(limits: &Limits, now: i64, sid: &str, file: Arc<Path>) -> RunState {
        RunState {
            started: Instant::now(),
            budget: limits.wall_clock,
            now,
            sid: sid.to_owned(),
            rng: None,
            file,
            loading: false,
            contact: None,
            wakes: None,
            calls: None,
        }
    }
}

thread_local! {
    static RUN: RefCell<Option<RunState>> = const { RefCell::new(None) };
    /// Rhai operations run on this thread, in steps of
    /// [`super::limits::CLOCK_CHECK_EVERY`] (see [`operations`]).
    static OPERATIONS: Cell<u64> = const { Cell::new(0) };
}

/// How many Rhai operations this thread has run so far, counted in steps
/// of [`super::limits::CLOCK_CHECK_EVERY`] (a run of fewer adds nothing).
/// Whoever runs the engine reads it before and after to tell a run that
/// was slow because it worked from one whose thread was preempted.
pub(crate) fn operations() -> u64 {
    OPERATIONS.with(Cell::get)
}

/// Counts `n` more operations on this thread (from `on_progress`).
pub(super) fn count_operations(n: u64) {
    OPERATIONS.with(|ops| ops.set(ops.get().wrapping_add(n)));
}

/// Installs a [`RunState`] for the current thread and restores the previous
/// one on drop (also on unwind), so a forgotten state cannot leak into the
/// next run on this thread.
pub(super) struct RunGuard {
    /// `Some(previous)` until the state has been put back.
    restore: Option<Option<RunState>>,
}

impl RunGuard {
    pub(super) fn enter(state: RunState) -> RunGuard {
        let previous = RUN.with(|slot| slot.replace(Some(state)));
        RunGuard {
            restore: Some(previous),
        }
    }

    /// Ends the run and hands back what it accumulated.
    pub(super) fn finish(mut self) -> Option<RunState> {
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
pub(super) fn catch_engine_panic<T>(
    f: impl FnOnce() -> Result<T, Box<EvalAltResult>>,
) -> Result<T, Box<EvalAltResult>> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        tracing::error!(script = %current_file(), "the script engine panicked");
        Err(runtime("internal error in the script engine"))
    })
}

/// Runs `f` on the current run's state, if there is one.
pub(super) fn with_run<T>(f: impl FnOnce(&mut RunState) -> T) -> Option<T> {
    RUN.try_with(|slot| slot.try_borrow_mut().ok()?.as_mut().map(f))
        .ok()
        .flatten()
}

pub(super) fn run_over_budget() -> bool {
    with_run(|run| run.started.elapsed() > run.budget).unwrap_or(false)
}

pub(super) fn current_file() -> String {
    with_run(|run| run.file.display().to_string()).unwrap_or_default()
}
