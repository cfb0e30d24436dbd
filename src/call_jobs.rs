//! The call worker: makes after-answer calls (a flow's `call:` with
//! `after_answer: true`) from the store's durable call jobs, with retries.
//!
//! The pipeline records a job before the message's state change and its
//! flush, so it is durable before the webhook answers; the worker is woken
//! after that flush (and polls once a second). Each attempt goes through
//! the same [`HttpCaller`] as calls made while a message is handled: the
//! same `http_allow`, address checks, size cap and redirects; its time is
//! the call's own `timeout:` (no message budget applies after the answer).
//!
//! Before an attempt the job's `not_before` is pushed past the attempt's
//! end, so an attempt cut short by a crash or a stop is made again later.
//! Delivery is therefore **at least once**: a crash after the request but
//! before its answer is recorded repeats it. Every attempt carries the
//! job's key as the `Idempotency-Key` header so the receiver can drop the
//! repeats. A 2xx answer delivers the job; 408, 429, 5xx, connection
//! errors and timeouts are retried with exponential backoff and jitter, at
//! most [`MAX_ATTEMPTS`] attempts; any other answer (4xx), and a call our
//! own checks refuse (`http_allow`, a non-public address, a secret that is
//! not set; [`CallError::retryable`]), fails it at once.
//!
//! [`CallError::retryable`]: crate::flow::calls::CallError::retryable

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;

use crate::calls::{Caller, HttpCaller};
use crate::clock::unix_now;
use crate::flow::calls::{CallRequest, CallResponse, HeaderValue};
use crate::metrics::Metrics;
use crate::outbound::backoff_secs;
use crate::store::{CallJob, CallJobState, Store};

/// Attempts before a job fails for good.
pub const MAX_ATTEMPTS: u32 = 8;
/// Jobs read from the due index per pass.
const BATCH: usize = 64;
/// Attempts in flight at once.
const IN_FLIGHT: usize = 8;
/// Seconds past an attempt's timeout before its job is due again (if the
/// attempt never recorded an answer).
const LEASE_MARGIN_SECS: i64 = 5;

/// The running worker: stop it at shutdown.
#[derive(Debug)]
pub struct CallWorker {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl CallWorker {
    /// Stop taking jobs and abandon attempts in flight (they are due again
    /// after their lease, here or after a restart).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Start the worker over `store`, making calls through `caller`, woken by
/// `wake` (the pipeline's [`call_jobs_waker`]).
///
/// [`call_jobs_waker`]: crate::pipeline::Pipeline::call_jobs_waker
pub fn spawn<S: Store + 'static>(
    store: Arc<S>,
    caller: Arc<HttpCaller>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
) -> CallWorker {
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(IN_FLIGHT));
        let mut running = JoinSet::new();
        loop {
            if *stopped.borrow() {
                break;
            }
            pass(&store, &caller, &metrics, &slots, &mut running);
            while running.try_join_next().is_some() {}
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stopped.changed() => {}
                Some(_) = running.join_next(), if !running.is_empty() => {}
            }
        }
        running.abort_all();
        while running.join_next().await.is_some() {}
    });
    CallWorker { stop, task }
}

/// One pass: claim the due jobs there are free slots for and start them.
fn pass<S: Store + 'static>(
    store: &Arc<S>,
    caller: &Arc<HttpCaller>,
    metrics: &Arc<Metrics>,
    slots: &Arc<Semaphore>,
    running: &mut JoinSet<()>,
) {
    let now = unix_now();
    let due = match store.due_call_jobs(now, BATCH) {
        Ok(due) => due,
        Err(e) => {
            tracing::error!(error = %e, "reading due call jobs failed");
            return;
        }
    };
    for mut job in due {
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            return;
        };
        let CallJobState::Pending { attempts, .. } = job.state else {
            continue;
        };
        let from = job.state.clone();
        let attempts = attempts + 1;
        let lease = (job.timeout_ms / 1000) as i64 + 1 + LEASE_MARGIN_SECS;
        job.state = CallJobState::Pending {
            not_before: now + lease,
            attempts,
        };
        match store.claim_call_job(&job, &from) {
            Ok(true) => {}
            // Another instance on the same database claimed it first.
            Ok(false) => continue,
            Err(e) => {
                tracing::error!(error = %e, "claiming a call job failed");
                return;
            }
        }
        let (store, caller, metrics) = (store.clone(), caller.clone(), metrics.clone());
        running.spawn(async move {
            attempt(&*store, &caller, &metrics, job, attempts).await;
            drop(permit);
        });
    }
}

/// The request a job makes: its own, plus the `Idempotency-Key` header.
fn request_of(job: &CallJob) -> CallRequest {
    let mut headers = job.headers.clone();
    headers.push((
        "Idempotency-Key".to_owned(),
        HeaderValue::Text(job.key.clone()),
    ));
    CallRequest {
        method: job.method.clone(),
        url: job.url.clone(),
        headers,
        body: job.body.clone(),
        timeout: Duration::from_millis(job.timeout_ms),
        flow: job.flow.clone(),
        step: job.step.clone(),
    }
}

/// Make one attempt of `job` and record what became of it.
async fn attempt<S: Store>(
    store: &S,
    caller: &HttpCaller,
    metrics: &Metrics,
    mut job: CallJob,
    attempts: u32,
) {
    let request = request_of(&job);
    let started = Instant::now();
    let answer = caller
        .call(&request, started + Duration::from_millis(job.timeout_ms))
        .await;
    let elapsed = started.elapsed();
    metrics.observe_call(request.host(), answer.outcome(), elapsed);
    let now = unix_now();
    let retry = match &answer {
        CallResponse::Answered { status, .. } if (200..300).contains(status) => {
            job.state = CallJobState::Delivered {
                status: *status,
                attempts,
                at: now,
            };
            None
        }
        CallResponse::Answered { status, .. }
            if !matches!(status, 408 | 429) && (400..500).contains(status) =>
        {
            job.state = CallJobState::Failed {
                reason: format!("answered {status}"),
                attempts,
                at: now,
            };
            None
        }
        CallResponse::Answered { status, .. } => Some(format!("answered {status}")),
        // Our own checks refused it (host not allowed, a non-public
        // address, a secret not set) or it cannot be built: the same
        // request would be refused again, so it fails now.
        CallResponse::Failed { error, detail } if !error.retryable() => {
            job.state = CallJobState::Failed {
                reason: format!("{error}: {detail}"),
                attempts,
                at: now,
            };
            None
        }
        CallResponse::Failed { error, detail } => Some(format!("{error}: {detail}")),
    };
    if let Some(reason) = retry {
        if attempts >= MAX_ATTEMPTS {
            job.state = CallJobState::Failed {
                reason: format!("{reason} ({attempts} attempts)"),
                attempts,
                at: now,
            };
        } else {
            let wait = backoff_secs(&job.key, attempts);
            tracing::warn!(
                flow = %job.flow,
                step = %job.step,
                host = %request.host(),
                attempts,
                retry_in_secs = wait,
                error = %reason,
                "after-answer call failed; retrying later"
            );
            job.state = CallJobState::Pending {
                not_before: now + wait,
                attempts,
            };
        }
    }
    match &job.state {
        CallJobState::Delivered { status, .. } => tracing::info!(
            flow = %job.flow,
            step = %job.step,
            host = %request.host(),
            status,
            attempts,
            "after-answer call delivered"
        ),
        CallJobState::Failed { reason, .. } => tracing::warn!(
            flow = %job.flow,
            step = %job.step,
            host = %request.host(),
            error = %reason,
            "after-answer call given up"
        ),
        CallJobState::Pending { .. } => {}
    }
    if let Err(e) = store.update_call_job(&job) {
        tracing::error!(error = %e, "recording a call job's outcome failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        for _ in 0..50 {
            assert_eq!(backoff_secs("k", 1), 1);
            assert!((1..=2).contains(&backoff_secs("k", 2)));
            assert!((4..=8).contains(&backoff_secs("k", 4)));
            assert!((150..=300).contains(&backoff_secs("k", 30)));
        }
    }
}
