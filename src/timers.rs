//! The timer scheduler: one task that sleeps until the next timer is due,
//! then fires every due timer through [`Pipeline::fire_timer`].
//!
//! It reads only the store's index by due time (never every
//! conversation): the earliest entry says how long to sleep, and a commit
//! that sets an earlier timer wakes it early ([`TimerWaker`]). At startup
//! it first fires whatever came due while the server was down, oldest
//! first. A store error is logged and retried a second later; firing never
//! takes the server down. Campaign events are timers too (see
//! `pipeline/campaigns.rs`); at startup and after a reload that changed the
//! campaigns (noticed within `MAX_SLEEP`), every conversation's next due
//! time is brought forward where a campaign event comes earlier. Sending what the timers said is the outbound
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
    // The flow set version and campaigns last scheduled for.
    let mut scheduled: Option<(String, String)> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        waker.arm();
        let now_ms = unix_millis();
        let now = now_ms.div_euclid(1000);
        if let Err(e) = campaigns_changed(&pipeline, &mut scheduled, now).await {
            tracing::error!(error = %e, "rescheduling campaigns failed; retrying in a second");
            pause(&mut stop, Duration::from_secs(1)).await;
            continue;
        }
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

/// At startup, and when a reload changed the campaigns, move every
/// conversation's next due time to its first campaign event where that is
/// earlier (see [`Pipeline::reschedule_campaigns`]). A set without
/// campaigns costs a string comparison per loop.
async fn campaigns_changed<S: Store>(
    pipeline: &Arc<Pipeline<S>>,
    scheduled: &mut Option<(String, String)>,
    now: i64,
) -> Result<(), crate::store::StoreError> {
    let set = pipeline.flows().load_full();
    if scheduled.as_ref().is_some_and(|(v, _)| v == set.version()) {
        return Ok(());
    }
    let fingerprint = set.campaigns_fingerprint();
    let same = scheduled.as_ref().is_some_and(|(_, f)| *f == fingerprint);
    if !same && !fingerprint.is_empty() {
        let started = std::time::Instant::now();
        let done = pipeline.reschedule_campaigns(now).await?;
        tracing::info!(
            conversations = done.conversations,
            moved = done.moved,
            ms = started.elapsed().as_millis() as u64,
            "campaigns scheduled"
        );
    }
    *scheduled = Some((set.version().to_owned(), fingerprint));
    Ok(())
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
