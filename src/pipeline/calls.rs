//! The engine's call loop: a flow that reaches a `call:` stops and asks
//! for a request; the pipeline, still under the conversation's lock,
//! makes it through its [`Caller`] and runs the engine again with the
//! answers so far, until the engine asks for nothing more. All calls of
//! one message (or timer firing) share one deadline, `call_budget_ms`
//! from the first call on, so the webhook still answers in time when an
//! upstream hangs: the call that runs out fails and takes its `on_error`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::calls::{Caller, NoCalls};
use crate::flow::calls::{CallRequest, CallResponse};
use crate::flow::Handled;
use crate::store::{CallJob, CallJobState, Store, StoreError};

use super::Pipeline;

/// The caller a pipeline has until it is given one: calls fail.
pub(super) fn no_calls() -> Arc<dyn Caller> {
    Arc::new(NoCalls("HTTP calls are not enabled here".to_owned()))
}

impl<S: Store> Pipeline<S> {
    /// This pipeline, making flows' HTTP calls through `caller` (the
    /// real client in `serve`, declared answers in transcripts).
    pub fn with_caller(mut self, caller: Arc<dyn Caller>) -> Self {
        self.caller = caller;
        self
    }

    /// Notified whenever after-answer call jobs were recorded and made
    /// durable: the call worker waits on it rather than poll.
    pub fn call_jobs_waker(&self) -> Arc<tokio::sync::Notify> {
        self.call_jobs.clone()
    }

    /// Record `after` (a message's or timer firing's `after_answer` calls)
    /// as call jobs keyed by `origin`, the flow, step and position, so
    /// running the same input again records nothing new. Returns how many
    /// were new.
    pub(super) fn record_call_jobs(
        &self,
        origin: &str,
        after: &[CallRequest],
        now: i64,
    ) -> Result<usize, StoreError> {
        if after.is_empty() {
            return Ok(0);
        }
        let jobs: Vec<CallJob> = after
            .iter()
            .enumerate()
            .map(|(i, r)| CallJob {
                key: format!("{origin}:{}:{}:{i}", r.flow, r.step),
                method: r.method.clone(),
                url: r.url.clone(),
                headers: r.headers.clone(),
                body: r.body.clone(),
                timeout_ms: r.timeout.as_millis() as u64,
                flow: r.flow.clone(),
                step: r.step.clone(),
                created_at: now,
                state: CallJobState::Pending {
                    not_before: now,
                    attempts: 0,
                },
            })
            .collect();
        self.store.enqueue_call_jobs(&jobs)
    }

    /// Makes later calls through `caller` (the author tools' mocks).
    pub(crate) fn set_caller(&mut self, caller: Arc<dyn Caller>) {
        self.caller = caller;
    }

    /// Runs `engine` with the answers so far until it asks for no call;
    /// each call it asks for is made here, within the message's budget.
    pub(super) async fn with_calls(
        &self,
        scripts: bool,
        engine: impl Fn(&[CallResponse]) -> Handled + Send + Sync,
    ) -> Handled {
        let mut answers: Vec<CallResponse> = Vec::new();
        let mut deadline: Option<Instant> = None;
        loop {
            let handled = self.run_flow(scripts, || engine(&answers));
            let Some(request) = &handled.call else {
                return handled;
            };
            let budget = self
                .options
                .call_budget
                .unwrap_or(Duration::from_millis(crate::calls::DEFAULT_CALL_BUDGET_MS));
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + budget);
            let started = Instant::now();
            let answer = self.caller.call(request, deadline).await;
            let elapsed = started.elapsed();
            self.metrics
                .observe_call(request.host(), answer.outcome(), elapsed);
            match &answer {
                CallResponse::Answered { status, .. } => tracing::info!(
                    flow = %request.flow,
                    step = %request.step,
                    method = %request.method,
                    host = %request.host(),
                    status,
                    ms = elapsed.as_millis() as u64,
                    "flow call answered"
                ),
                CallResponse::Failed { error, detail } => tracing::warn!(
                    flow = %request.flow,
                    step = %request.step,
                    method = %request.method,
                    host = %request.host(),
                    error = %error,
                    detail = %detail,
                    ms = elapsed.as_millis() as u64,
                    "flow call failed; the flow takes its on_error"
                ),
            }
            answers.push(answer);
        }
    }
}
