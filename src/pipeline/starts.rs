//! Starting a flow on our own (`POST /flows/{name}/start`), under the
//! conversation's lock like a message or a timer.
//!
//! A start with an idempotency key already recorded returns that record
//! and does nothing else. Otherwise, under the lock: an opted-out contact
//! gets nothing (`opted_out`); a contact in a live run
//! ([`flow::live_run`]: not idle past its flow's `expire_after`, its flow
//! and step still there) gets nothing when the request says `skip`
//! (`skipped_busy`); else the engine enters the flow's
//! first step ([`flow::start_flow`]), and its messages (outbox keys
//! `start:` + idempotency key + `:` + part, cause `start`), the
//! conversation and the start record are written in one transaction, then
//! flushed before the answer, and the sender is woken.

use super::Pipeline;
use crate::flow::{self, Conversation, FlowSet, Outcome, QueuedStart, Wake};
use crate::starts::{IfBusy, StartOutcome, StartRequest};
use crate::store::{
    ConvKey, OutboxEntry, OutboxState, StartRecord, StateCommit, Store, StoreError,
};

impl<S: Store> Pipeline<S> {
    /// Start flow `name` for `req` (already validated) at `now`: see the
    /// module doc. Durable before it returns.
    pub async fn start_flow(
        &self,
        name: &str,
        req: &StartRequest,
        now: i64,
    ) -> Result<StartOutcome, StoreError> {
        if let Some(record) = self.store.start_record(&req.idempotency_key)? {
            return Ok(StartOutcome::Done {
                record: Box::new(record),
                duplicate: true,
            });
        }
        let flows = self.flows.load();
        if !flows.flow_names().any(|f| f == name) {
            return Ok(StartOutcome::UnknownFlow);
        }
        let key = ConvKey::new(req.from.clone(), req.to.clone());
        let guard = self.lock(&key).await?;
        let epoch = self.store.epoch();
        let mut record = StartRecord {
            key: req.idempotency_key.clone(),
            result: String::new(),
            flow: name.to_owned(),
            to: req.to.clone(),
            from: req.from.clone(),
            messaging_service_sid: req.messaging_service_sid.clone(),
            busy_with: None,
            outbox: Vec::new(),
            at: now,
        };
        let scope = super::consent_scope(req.messaging_service_sid.as_deref(), &req.from);
        let opted_out = self
            .store
            .opt_out(scope, &req.to)?
            .is_some_and(|o| o.opted_out);
        let stored = self.store.load(&key)?;
        let mut conversation = self.conversation_of(&key, &stored)?;
        record.busy_with = flow::live_run(&flows, &conversation, now).map(str::to_owned);
        // Behind a live run, or behind starts queued before it (they go
        // first, in order).
        let queue = req.if_busy == IfBusy::Queue
            && (record.busy_with.is_some() || !conversation.queued.is_empty());
        if queue && !opted_out {
            conversation.queued.push(QueuedStart {
                flow: name.to_owned(),
                key: req.idempotency_key.clone(),
                fields: req.fields.clone(),
                vars: req.vars.clone(),
                messaging_service_sid: req.messaging_service_sid.clone(),
                at: now,
            });
            record.result = "queued".to_owned();
            let due = flow::next_due(&flows, &conversation);
            let bytes = conversation.to_stored();
            let taken = self.store.commit_start(
                Some(StateCommit {
                    key: &key,
                    conversation: Some(&bytes),
                    ended: false,
                    due,
                    recent: &stored.recent,
                    at: now,
                    // Queueing ends no run.
                    results: &[],
                }),
                &[],
                &record,
            )?;
            drop(guard);
            if taken.is_none() {
                self.timers.set(due);
            }
            self.store.flush(epoch).await?;
            tracing::info!(
                flow = name,
                behind = record.busy_with.as_deref().unwrap_or(""),
                queued = conversation.queued.len(),
                "flow start queued"
            );
            return Ok(done(record, taken));
        }
        if opted_out || (record.busy_with.is_some() && req.if_busy == IfBusy::Skip) {
            record.result = if opted_out {
                "opted_out"
            } else {
                "skipped_busy"
            }
            .to_owned();
            let taken = self.store.commit_start(None, &[], &record)?;
            drop(guard);
            self.store.flush(epoch).await?;
            return Ok(done(record, taken));
        }
        let wake = Wake {
            from: &req.to,
            to: &req.from,
        };
        let start = flow::Start {
            flow: name,
            fields: &req.fields,
            vars: &req.vars,
            wake,
        };
        // A first step may call (the same loop and budget as a message).
        let handled = self
            .with_calls(flows.has_scripts(), |answers| {
                flow::start_flow_with_calls(&flows, conversation.clone(), &start, now, answers)
            })
            .await;
        for event in &handled.events {
            self.log_event(event);
        }
        let entries = start_entries(
            &handled,
            &key,
            &req.idempotency_key,
            req.messaging_service_sid.as_deref(),
            now,
        );
        record.result = "started".to_owned();
        record.outbox = entries.iter().map(|e| e.key.clone()).collect();
        // After-answer calls, recorded before the start like a message's,
        // keyed by its idempotency key: a repeat records nothing new.
        let jobs = self.record_call_jobs(
            &format!("start:{}", req.idempotency_key),
            &handled.after,
            now,
        )?;
        let conversation = &handled.conversation;
        let due = self.due_of(&flows, &key, conversation, now);
        let bytes =
            (*conversation != flow::Conversation::default()).then(|| conversation.to_stored());
        let results = super::results::of(&key, &handled.ended, &conversation.contact, now);
        let taken = self.store.commit_start(
            Some(StateCommit {
                key: &key,
                conversation: bytes.as_deref(),
                ended: conversation.is_ended(due),
                due,
                recent: &stored.recent,
                at: now,
                results: &results,
            }),
            &entries,
            &record,
        )?;
        drop(guard);
        if taken.is_none() {
            self.timers.set(due);
        }
        self.store.flush(epoch).await?;
        if taken.is_none() && !entries.is_empty() {
            self.outbox.notify_one();
        }
        if jobs > 0 {
            self.call_jobs.notify_one();
        }
        tracing::info!(
            flow = name,
            messages = entries.len(),
            interrupted = record.busy_with.as_deref().unwrap_or(""),
            "flow started"
        );
        Ok(done(record, taken))
    }
}

impl<S: Store> Pipeline<S> {
    /// Under the conversation's lock (the caller holds it): when
    /// `conversation` has a queued start and no live run, take the first
    /// out and start it at `now` (or drop it, when the contact opted out
    /// meanwhile). Returns the conversation after it and the start's
    /// outbox entries, keyed as a start's (`start:<key>:<part>`: started
    /// again after a crash, it records nothing twice), and the runs it
    /// ended (an expired one it replaced); `None` when nothing was due.
    /// Its first steps make their calls like any start's, and its
    /// after-answer calls are recorded keyed by the start.
    pub(super) async fn start_queued(
        &self,
        flows: &FlowSet,
        key: &ConvKey,
        conversation: &Conversation,
        now: i64,
    ) -> Result<Option<QueuedStarted>, StoreError> {
        if conversation.queued.is_empty() || flow::live_run(flows, conversation, now).is_some() {
            return Ok(None);
        }
        let mut conversation = conversation.clone();
        let queued = conversation.queued.remove(0);
        let scope = super::consent_scope(queued.messaging_service_sid.as_deref(), &key.to);
        if self
            .store
            .opt_out(scope, &key.from)?
            .is_some_and(|o| o.opted_out)
        {
            tracing::info!(flow = %queued.flow, "queued flow start dropped: the contact opted out");
            return Ok(Some(QueuedStarted {
                conversation,
                entries: Vec::new(),
                ended: Vec::new(),
                jobs: 0,
            }));
        }
        let wake = Wake {
            from: &key.from,
            to: &key.to,
        };
        let start = flow::Start {
            flow: &queued.flow,
            fields: &queued.fields,
            vars: &queued.vars,
            wake,
        };
        let handled = self
            .with_calls(flows.has_scripts(), |answers| {
                flow::start_flow_with_calls(flows, conversation.clone(), &start, now, answers)
            })
            .await;
        let jobs = self.record_call_jobs(&format!("start:{}", queued.key), &handled.after, now)?;
        for event in &handled.events {
            self.log_event(event);
        }
        let entries = start_entries(
            &handled,
            key,
            &queued.key,
            queued.messaging_service_sid.as_deref(),
            now,
        );
        tracing::info!(
            flow = %queued.flow,
            messages = entries.len(),
            waited_secs = now - queued.at,
            "queued flow started"
        );
        Ok(Some(QueuedStarted {
            conversation: handled.conversation,
            entries,
            ended: handled.ended,
            jobs,
        }))
    }
}

/// What starting a queued start did (see `Pipeline::start_queued`).
pub(super) struct QueuedStarted {
    /// The conversation after it.
    pub conversation: Conversation,
    /// Its first messages, to enqueue.
    pub entries: Vec<OutboxEntry>,
    /// The runs it ended (an expired run it replaced).
    pub ended: Vec<flow::EndedRun>,
    /// After-answer call jobs it recorded.
    pub jobs: usize,
}

/// The outbox entries of a start's first messages: keys `start:` +
/// idempotency key + `:` + part, cause `start`.
fn start_entries(
    handled: &flow::Handled,
    key: &ConvKey,
    idempotency_key: &str,
    messaging_service_sid: Option<&str>,
    now: i64,
) -> Vec<OutboxEntry> {
    let Outcome::Reply(replies) = &handled.outcome else {
        return Vec::new();
    };
    replies
        .iter()
        .enumerate()
        .map(|(part, reply)| OutboxEntry {
            key: format!("start:{idempotency_key}:{part}"),
            to: key.from.clone(),
            from: key.to.clone(),
            messaging_service_sid: messaging_service_sid.map(str::to_owned),
            body: reply.body.clone(),
            media: reply.media.clone(),
            cause: "start".to_owned(),
            flow: reply
                .origin
                .as_ref()
                .map(|o| o.flow.clone())
                .or_else(|| handled.flow.clone()),
            step: reply
                .origin
                .as_ref()
                .map(|o| o.step.clone())
                .or_else(|| handled.step.clone()),
            created_at: now,
            due_at: now,
            state: OutboxState::Pending {
                not_before: now,
                attempts: 0,
            },
        })
        .collect()
}

/// This start's record, or the one an earlier request with the same key
/// recorded first.
fn done(record: StartRecord, taken: Option<StartRecord>) -> StartOutcome {
    match taken {
        Some(record) => StartOutcome::Done {
            record: Box::new(record),
            duplicate: true,
        },
        None => StartOutcome::Done {
            record: Box::new(record),
            duplicate: false,
        },
    }
}
