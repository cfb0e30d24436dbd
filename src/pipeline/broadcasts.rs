//! Broadcasts into the outbox (see [`crate::broadcasts`]).

use super::Pipeline;
use crate::broadcasts::{self, BroadcastRequest, Progress, Sent};
use crate::contacts::Contact;
use crate::flow::ContactText;
use crate::starts::{IfBusy, StartOutcome, StartRequest};
use crate::store::{tally_prefixes, ConvKey, OutboxEntry, OutboxState, Store, StoreError};
use crate::twilio::limits::MAX_BODY_CHARS;

impl<S: Store> Pipeline<S> {
    /// Send broadcast `req` (validated) at `now`. A message: one outbox
    /// entry per recipient not already in it, its text rendered with the
    /// recipient's contact fields, then flush, then wake the sender. A
    /// text that renders empty or too long for one message is recorded
    /// `skipped` (`empty_message`, `too_long`) for that recipient. A
    /// flow: one [`Self::start_flow`] per recipient (see
    /// [`crate::broadcasts`]). `None` for an unknown flow.
    pub async fn broadcast(
        &self,
        req: &BroadcastRequest,
        now: i64,
    ) -> Result<Option<Sent>, StoreError> {
        let Some(message) = &req.message else {
            return self.broadcast_flow(req, now).await;
        };
        // Checked by `validate`; a text that does not parse is sent as
        // written rather than not at all.
        let text = ContactText::parse(message, MAX_BODY_CHARS).ok();
        let personal = text.as_ref().is_some_and(|t| !t.is_literal());
        let recipients = self.recipients(req, personal)?;
        let epoch = self.store.epoch();
        let prefix = broadcasts::key_prefix(&req.id);
        let mut enqueued = 0;
        for batch in recipients.chunks(500) {
            let entries: Vec<OutboxEntry> = batch
                .iter()
                .filter(|(to, _)| *to != req.from)
                .map(|(to, fields)| {
                    let body = match &text {
                        Some(t) if personal => t.render(fields),
                        _ => message.clone(),
                    };
                    let state = if body.trim().is_empty() {
                        OutboxState::Skipped {
                            reason: "empty_message".to_owned(),
                            at: now,
                        }
                    } else if body.chars().count() > MAX_BODY_CHARS {
                        OutboxState::Skipped {
                            reason: "too_long".to_owned(),
                            at: now,
                        }
                    } else {
                        OutboxState::Pending {
                            not_before: now,
                            attempts: 0,
                        }
                    };
                    OutboxEntry {
                        key: format!("{prefix}{to}"),
                        to: to.clone(),
                        from: req.from.clone(),
                        messaging_service_sid: req.messaging_service_sid.clone(),
                        body,
                        media: Vec::new(),
                        cause: "broadcast".to_owned(),
                        flow: None,
                        step: None,
                        created_at: now,
                        due_at: now,
                        state,
                    }
                })
                .collect();
            enqueued += self.store.enqueue_outbound(&entries)?;
        }
        self.store.flush(epoch).await?;
        if enqueued > 0 {
            self.outbox.notify_one();
        }
        Ok(Some(Sent {
            id: req.id.clone(),
            recipients: recipients.len(),
            enqueued,
            already: recipients.len() - enqueued,
            ..Sent::default()
        }))
    }

    /// The numbers broadcast `req` goes to, with their contact fields: its
    /// list, or the contacts of `from` its filter matches. A list's
    /// fields are read only when `fields` asks for them (else empty).
    fn recipients(&self, req: &BroadcastRequest, fields: bool) -> Result<Vec<Contact>, StoreError> {
        Ok(match &req.to {
            Some(list) if fields => {
                let mut out = Vec::with_capacity(list.len());
                for to in list {
                    let key = ConvKey::new(req.from.clone(), to.clone());
                    let stored = self.store.load(&key)?;
                    let contact = self.conversation_of(&key, &stored)?.contact;
                    out.push((to.clone(), contact));
                }
                out
            }
            Some(list) => list
                .iter()
                .map(|to| (to.clone(), Default::default()))
                .collect(),
            None => self
                .contacts_of(&req.from)?
                .into_iter()
                .filter(|(_, fields)| req.matches(fields))
                .collect(),
        })
    }

    /// Start flow broadcast `req` (validated, `req.flow` set) at `now`:
    /// one [`Self::start_flow`] per recipient, idempotency key
    /// `broadcast:<id>:<number>`, `if_busy` as asked (default skip), one
    /// after the other, each durable before the next. `None` when there
    /// is no such flow (nothing started; a flow removed midway stops it
    /// there, and the same request again goes on).
    async fn broadcast_flow(
        &self,
        req: &BroadcastRequest,
        now: i64,
    ) -> Result<Option<Sent>, StoreError> {
        let Some(flow) = &req.flow else {
            return Ok(None);
        };
        if !self.flows.load().flow_names().any(|f| f == flow) {
            return Ok(None);
        }
        let recipients = self.recipients(req, false)?;
        let prefix = broadcasts::key_prefix(&req.id);
        let mut sent = Sent {
            id: req.id.clone(),
            ..Sent::default()
        };
        for (to, _) in recipients.iter().filter(|(to, _)| *to != req.from) {
            let start = StartRequest {
                to: to.clone(),
                from: req.from.clone(),
                messaging_service_sid: req.messaging_service_sid.clone(),
                fields: req.fields.clone(),
                vars: req.vars.clone(),
                idempotency_key: format!("{prefix}{to}"),
                if_busy: req.if_busy.unwrap_or(IfBusy::Skip),
            };
            match self.start_flow(flow, &start, now).await? {
                StartOutcome::UnknownFlow => return Ok(None),
                StartOutcome::Done {
                    duplicate: true, ..
                } => sent.already += 1,
                StartOutcome::Done { record, .. } => match record.result.as_str() {
                    "started" => sent.started += 1,
                    "skipped_busy" => sent.skipped_busy += 1,
                    "queued" => sent.queued += 1,
                    _ => sent.opted_out += 1,
                },
            }
        }
        sent.recipients = recipients.len();
        sent.enqueued = sent.started;
        Ok(Some(sent))
    }

    /// Every broadcast's progress, from the store's tallies (one record
    /// per broadcast, never the whole outbox).
    pub fn broadcasts(&self) -> Result<Vec<Progress>, StoreError> {
        Ok(broadcasts::progress(self.store.outbox_tallies()?))
    }

    /// Cancel broadcast `id`: its entries still pending become skipped
    /// (`canceled`); one being sent finishes. For a flow broadcast these
    /// are its starts' messages; the runs stay where they are. Returns
    /// how many were canceled, or `None` when there is no such broadcast.
    /// Reads the broadcast's own key ranges only.
    pub async fn cancel_broadcast(&self, id: &str, now: i64) -> Result<Option<usize>, StoreError> {
        let mut entries = Vec::new();
        for prefix in tally_prefixes(id) {
            entries.extend(self.store.outbox_with_prefix(&prefix)?);
        }
        if entries.is_empty() {
            return Ok(None);
        }
        let epoch = self.store.epoch();
        let mut canceled = 0;
        for e in entries {
            let mut state = e.state;
            // A compare and swap: the sender may move a pending entry
            // (pace, quiet hours) meanwhile; one it claimed stays.
            for _ in 0..5 {
                if !matches!(state, OutboxState::Pending { .. }) {
                    break;
                }
                let to = OutboxState::Skipped {
                    reason: "canceled".to_owned(),
                    at: now,
                };
                if self.store.update_outbound(&e.key, &state, to)?.is_some() {
                    canceled += 1;
                    break;
                }
                match self.store.outbound(&e.key)? {
                    Some(now_there) => state = now_there.state,
                    None => break,
                }
            }
        }
        self.store.flush(epoch).await?;
        Ok(Some(canceled))
    }
}
