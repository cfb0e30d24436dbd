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
use crate::flow::{self, Outcome, Wake};
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
        let conversation = self.conversation_of(&key, &stored)?;
        record.busy_with = flow::live_run(&flows, &conversation, now).map(str::to_owned);
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
        let handled = self.run_flow(flows.has_scripts(), || {
            flow::start_flow(&flows, conversation, &start, now)
        });
        for event in &handled.events {
            self.log_event(event);
        }
        let mut entries = Vec::new();
        if let Outcome::Reply(replies) = &handled.outcome {
            for (part, reply) in replies.iter().enumerate() {
                entries.push(OutboxEntry {
                    key: format!("start:{}:{part}", req.idempotency_key),
                    to: req.to.clone(),
                    from: req.from.clone(),
                    messaging_service_sid: req.messaging_service_sid.clone(),
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
                });
            }
        }
        record.result = "started".to_owned();
        record.outbox = entries.iter().map(|e| e.key.clone()).collect();
        let conversation = &handled.conversation;
        let due = flow::next_due(&flows, conversation);
        let bytes =
            (*conversation != flow::Conversation::default()).then(|| conversation.to_stored());
        let taken = self.store.commit_start(
            Some(StateCommit {
                key: &key,
                conversation: bytes.as_deref(),
                ended: conversation.run.is_none(),
                due,
                recent: &stored.recent,
                at: now,
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
        tracing::info!(
            flow = name,
            messages = entries.len(),
            interrupted = record.busy_with.as_deref().unwrap_or(""),
            "flow started"
        );
        Ok(done(record, taken))
    }
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
