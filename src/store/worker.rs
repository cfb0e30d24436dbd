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

type FlushReply = oneshot::Sender<Result<(), StoreError>>;

/// The store's thread. Group commit: every flush request that arrives
/// while a flush runs is answered by the next one, so concurrent webhooks
/// share disk syncs instead of queueing one each. Between requests (and
/// at least every [`TICK`]) it retries a failed store and writes
/// checkpoints.
///
/// It syncs as soon as a request comes, without waiting for more to
/// join the group. Until 2 December 2026 it waited 40 µs under load
/// (`thread::sleep` after a flush that answered more than one caller),
/// which made groups about twice as large. On the 2-core VM the wait
/// cost as much as the syncs it saved, and it cost latency: asked for
/// 40 µs, the sleep took 165 µs on average under load (`perf trace -s`;
/// the timer slack, then a busy vCPU to wake on), and each wake-up from
/// a timer is dear there. Durable multi-step load, 200,000 requests at 32
/// connections, each server thread's on-CPU time from
/// `/proc/<pid>/task/*/schedstat` over 3 s and the webhooks and syncs
/// from `/metrics`; ten alternating runs of an experimental build that
/// read the wait from the environment, medians (ranges):
///
/// | wait | webhooks per sync | store thread's CPU per sync | CPU per message | webhooks a second |
/// | --- | --- | --- | --- | --- |
/// | 40 µs | 11.6 (10.7–14.1) | 126 µs (110–159) | 44.4 µs (40.6–59.2) | 24,600 |
/// | none | 6.1 (5.7–6.7) | 66 µs (59–79) | 41.8 µs (40.4–46.3) | 28,100 |
///
/// Per message the store's thread spent about the same either way (9–13
/// µs); without the wait the webhooks were answered sooner, so the 32
/// connections sent more of them. Earlier sets, which compared the
/// process's CPU time alone, went both ways (`docs/performance-history.md`,
/// releases 722231d, be4dbc7 and 4e5e03b).
///
/// The syncs have a thread of their own rather than being led by the
/// first waiting webhook on its async worker (group commit without the
/// channel and the hand-off): measured that way (an experimental build,
/// four alternating pairs of the same load), the workers alone spent
/// 51–55 µs per message, against 38–43 µs for the workers and this thread
/// together, and the server answered 15,100–22,000 webhooks a second
/// against 24,500–31,500 (`docs/performance-history.md`, "After
/// 9fc3af0").
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
    loop {
        match rx.recv_timeout(TICK) {
            Ok(first) => {
                let mut waiters = vec![first];
                waiters.extend(rx.try_iter());
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
