//! The timer scheduler: one task that sleeps until the next timer is due,
//! then fires every due timer through [`Pipeline::fire_timer`].
//!
//! It reads only the store's index by due time (never every
//! conversation): the earliest entry says how long to sleep, and a commit
//! that sets an earlier timer wakes it early ([`TimerWaker`]). At startup
//! it first fires whatever came due while the server was down, oldest
//! first. A store error is logged and retried a second later; firing never
//! takes the server down. Sending what the timers said is the outbound
//! sender's work (the outbox); this module knows nothing of Twilio.

use std::sync::Arc;
use std::time::Duration;

use crate::clock::unix_millis;
use crate::pipeline::{Pipeline, TimerWaker};
use crate::store::Store;

/// At most this many due timers are fired at once (each batch runs
/// concurrently: different conversations never wait on each other, and
/// their flushes are grouped).
const BATCH: usize = 256;

/// The longest the scheduler sleeps without looking at the index again:
/// a backstop against a missed wake-up or a wall clock that jumped.
const MAX_SLEEP: Duration = Duration::from_secs(30);

/// Run the scheduler until `stop` turns true. A batch of firings under
/// way when it does is finished first (each is short: the engine and a
/// commit), so the store is no longer in use when this returns.
pub async fn run<S: Store>(
    pipeline: Arc<Pipeline<S>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let waker: Arc<TimerWaker> = pipeline.timer_waker();
    loop {
        if *stop.borrow() {
            return;
        }
        waker.arm();
        let now_ms = unix_millis();
        let now = now_ms.div_euclid(1000);
        match fire_due(&pipeline, now).await {
            Ok(0) => {}
            // More may be due (a batch was full, or a firing set the next
            // timeout of the same step, already due).
            Ok(_) => continue,
            Err(e) => {
                tracing::error!(error = %e, "firing timers failed; retrying in a second");
                pause(&mut stop, Duration::from_secs(1)).await;
                continue;
            }
        }
        let next = match pipeline.store().next_timer() {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(error = %e, "reading the timer index failed; retrying in a second");
                pause(&mut stop, Duration::from_secs(1)).await;
                continue;
            }
        };
        waker.sleeping_until(next);
        let sleep = match next {
            // A timer is due once its second has begun.
            Some(due) => {
                Duration::from_millis(due.saturating_mul(1000).saturating_sub(now_ms).max(0) as u64)
                    .min(MAX_SLEEP)
            }
            None => MAX_SLEEP,
        };
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = waker.notified() => {}
            _ = stop.changed() => {}
        }
    }
}

/// Sleep for `d`, or until `stop` changes.
async fn pause(stop: &mut tokio::sync::watch::Receiver<bool>, d: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = stop.changed() => {}
    }
}

/// Fire the timers due at `now`, one batch; how many index entries were
/// looked at.
pub async fn fire_due<S: Store>(
    pipeline: &Arc<Pipeline<S>>,
    now: i64,
) -> Result<usize, crate::store::StoreError> {
    let due = pipeline.store().due_timers(now, BATCH)?;
    let n = due.len();
    let mut tasks = tokio::task::JoinSet::new();
    for timer in due {
        let pipeline = pipeline.clone();
        tasks.spawn(async move { pipeline.fire_timer(&timer, now).await });
    }
    let mut first_error = None;
    while let Some(result) = tasks.join_next().await {
        match result {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => tracing::error!(error = %e, "a timer firing task failed"),
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(n),
    }
}
