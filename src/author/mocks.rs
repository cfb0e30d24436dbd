//! Declared answers to flows' HTTP calls for transcripts (`@ http ...`)
//! and `chat` (`/http ...`): a [`Caller`] that makes no request. A call
//! takes the first declared answer that matches its method and URL (each
//! answers once); a call nothing answers fails, and is remembered so the
//! transcript fails at the message that made it.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::calls::{CallFuture, Caller};
use crate::flow::calls::{CallError, CallRequest, CallResponse};
use crate::flow::HttpMock;

#[derive(Default)]
struct State {
    /// Declared answers not used yet, with the line that declared them.
    pending: Vec<(usize, HttpMock)>,
    /// Calls answered so far.
    made: usize,
    /// Calls no declared answer matched (`METHOD URL`), not yet reported.
    unexpected: Vec<String>,
}

/// The mocks of one transcript run or chat session; cheap to clone (one
/// shared state), one clone goes to the pipeline.
#[derive(Clone, Default)]
pub(super) struct Mocks(Arc<Mutex<State>>);

impl Mocks {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Declare `mock` (written at `line`).
    pub(super) fn declare(&self, line: usize, mock: HttpMock) {
        self.state().pending.push((line, mock));
    }

    /// How many calls were answered by a declared answer.
    pub(super) fn made(&self) -> usize {
        self.state().made
    }

    /// Calls no declared answer matched since the last time asked.
    pub(super) fn take_unexpected(&self) -> Vec<String> {
        std::mem::take(&mut self.state().unexpected)
    }

    /// Declared answers no call used, with their lines.
    pub(super) fn unused(&self) -> Vec<(usize, HttpMock)> {
        self.state().pending.clone()
    }
}

impl Caller for Mocks {
    fn call<'a>(&'a self, request: &'a CallRequest, _deadline: Instant) -> CallFuture<'a> {
        let answer = {
            let mut state = self.state();
            match state.pending.iter().position(|(_, m)| m.answers(request)) {
                Some(i) => {
                    state.made += 1;
                    state.pending.remove(i).1.answer
                }
                None => {
                    let call = format!("{} {}", request.method, request.url);
                    state.unexpected.push(call.clone());
                    CallResponse::failed(
                        CallError::Refused,
                        format!("no answer declared for {call}"),
                    )
                }
            }
        };
        Box::pin(async move { answer })
    }
}
