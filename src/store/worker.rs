//! The store's own thread: grouped flushes, checkpoints, and reopening
//! the database after a failure.

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::sled_store::{reopened, Shared};
use super::{Epoch, StoreError};

/// How often the worker wakes when idle, retries a failed store, and
/// writes a checkpoint (if anything was written).
const TICK: Duration = Duration::from_millis(250);
const HEAL_EVERY: Duration = Duration::from_secs(1);
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Under concurrent load (the last flush answered more than one caller),
/// the worker waits this long after the first request of a group before
/// it syncs, so more of the webhooks already under way join the group.
/// Each sync costs this thread a write, a `sync_file_range` and an
/// `fdatasync` (about 45 µs of CPU for a 40 KB group, measured alone), so
/// larger groups cost less CPU per message; every microsecond waited is
/// also latency, and with a fixed number of connections, requests a
/// second. `thread::sleep` asks Linux for at least this long, and with
/// the default timer slack of 50 µs a thread sleeps up to 50 µs more: the
/// waits below are what was asked. Measured on the 2-core VM (durable
/// multi-step loadgen, 32 connections, 50,000 requests, alternating
/// runs, medians):
///
/// | wait | webhooks per sync | CPU µs/msg | req/s | share of the bare handler's |
/// | --- | --- | --- | --- | --- |
/// | 100 µs | 24.5 | 25.7 | 38,162 | 30.9% |
/// | 60 µs | 17.3 | 26.5 | 41,136 | 32.4% |
/// | 40 µs | 13.6 | 25.3 | 42,216 | 34.1% |
/// | 0 | 7.4 | 27.3 | 43,582 | 34.6% |
///
/// (ten rounds, 1 December 2026). An earlier machine, where a sync cost
/// more, favoured 100 µs over 150, 200 and 300 µs (groups of 19–28,
/// 40.3–42.0 µs per message). On this one the CPU per message hardly
/// moves between groups of 13 and 25, and the shorter wait answers
/// sooner; without a wait the groups fall to 7 and the CPU rises. A lone
/// caller (one webhook at a time) never waits.
const GATHER: Duration = Duration::from_micros(40);

type FlushReply = oneshot::Sender<Result<(), StoreError>>;

/// The store's thread. Group commit: every flush request that arrives
/// while a flush runs (or, under load, during [`GATHER`] before it) is
/// answered by the next one, so concurrent webhooks share disk syncs
/// instead of queueing one each. Between requests (and at
/// least every [`TICK`]) it retries a failed store and writes checkpoints.
pub(super) struct Worker {
    /// `None` once dropped, which ends the thread's loop.
    tx: Option<mpsc::Sender<(Epoch, FlushReply)>>,
    /// Joined on drop: the thread's last act is a clean close.
    thread: Option<thread::JoinHandle<()>>,
}

impl Worker {
    pub(super) fn start(shared: Arc<Shared>) -> Self {
        let (tx, rx) = mpsc::channel::<(Epoch, FlushReply)>();
        // Without the thread every flush reports FlusherGone, which the
        // pipeline turns into a 503: loud, and nothing is acknowledged.
        let thread = spawn("smsflow-store", move || run_worker(&shared, &rx));
        Worker {
            tx: Some(tx),
            thread,
        }
    }

    pub(super) async fn flush(&self, since: Epoch) -> Result<(), StoreError> {
        let (reply, wait) = oneshot::channel();
        self.tx
            .as_ref()
            .ok_or(StoreError::FlusherGone)?
            .send((since, reply))
            .map_err(|_| StoreError::FlusherGone)?;
        wait.await.unwrap_or(Err(StoreError::FlusherGone))
    }
}

fn run_worker(shared: &Shared, rx: &mpsc::Receiver<(Epoch, FlushReply)>) {
    let mut last_heal: Option<Instant> = None;
    let mut heal_failures = 0u64;
    let mut last_checkpoint = Instant::now();
    let mut last_group = 0;
    loop {
        match rx.recv_timeout(TICK) {
            Ok(first) => {
                if last_group > 1 {
                    thread::sleep(GATHER);
                }
                let mut waiters = vec![first];
                waiters.extend(rx.try_iter());
                last_group = waiters.len();
                let synced = shared.sync();
                for (epoch, reply) in waiters {
                    let result = match &synced {
                        Ok(generation) if *generation == epoch.0 => Ok(()),
                        Ok(_) => Err(reopened()),
                        Err(e) => Err(StoreError::Unavailable(e.to_string())),
                    };
                    let _ = reply.send(result);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if shared.failed.load(Ordering::SeqCst) {
            if last_heal.is_none_or(|t| t.elapsed() >= HEAL_EVERY) {
                last_heal = Some(Instant::now());
                match shared.heal() {
                    Ok(()) => heal_failures = 0,
                    Err(e) => {
                        heal_failures += 1;
                        // Once at warn, then every minute or so.
                        if heal_failures % 60 == 1 {
                            tracing::warn!(error = %e, attempts = heal_failures, "store still failing");
                        } else {
                            tracing::debug!(error = %e, "store still failing");
                        }
                    }
                }
            }
        } else if shared.writes.load(Ordering::Relaxed) > 0
            && last_checkpoint.elapsed() >= CHECKPOINT_EVERY
        {
            last_checkpoint = Instant::now();
            if let Err(e) = shared.checkpoint() {
                tracing::warn!(error = %e, "checkpoint failed");
            }
        }
    }
    shared.close();
}

/// How often the results thread moves flow results out of sled.
const MOVE_RESULTS_EVERY: Duration = Duration::from_secs(1);

/// The store's results thread: about once a second it moves the flow
/// results sled holds into their files (`result_files.rs`), off the
/// flushing thread so a large move never delays a flush.
pub(super) struct ResultsMover {
    /// `None` once dropped, which ends the thread's loop.
    stop: Option<mpsc::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ResultsMover {
    pub(super) fn start(shared: Arc<Shared>) -> Self {
        let (stop, rx) = mpsc::channel::<()>();
        // Without the thread results stay in the database, as before
        // their files.
        let thread = spawn("smsflow-results", move || {
            let mut failures = 0u64;
            while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(MOVE_RESULTS_EVERY) {
                match shared.move_results() {
                    Ok(_) => failures = 0,
                    Err(e) => {
                        failures += 1;
                        // Nothing is lost (the rows stay in the
                        // database): once at warn, then every minute.
                        if failures % 60 == 1 {
                            tracing::warn!(error = %e, attempts = failures, "moving flow results to their files failed; they stay in the database");
                        }
                    }
                }
            }
        });
        ResultsMover {
            stop: Some(stop),
            thread,
        }
    }
}

/// Start the store's thread `name`, or say at error why it could not.
fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Option<thread::JoinHandle<()>> {
    match thread::Builder::new().name(name.into()).spawn(f) {
        Ok(handle) => Some(handle),
        Err(e) => {
            tracing::error!(error = %e, thread = name, "could not start a thread of the store");
            None
        }
    }
}

impl Drop for ResultsMover {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
