//! Broadcasts into the outbox (see [`crate::broadcasts`]).

use super::Pipeline;
use crate::broadcasts::{self, BroadcastRequest, Progress, Sent};
use crate::store::{OutboxEntry, OutboxState, Store, StoreError};

impl<S: Store> Pipeline<S> {
    /// Put broadcast `req` (validated) in the outbox at `now`: one entry
    /// per recipient not already in it, then flush, then wake the sender.
    pub async fn broadcast(&self, req: &BroadcastRequest, now: i64) -> Result<Sent, StoreError> {
        let recipients: Vec<String> = match &req.to {
            Some(list) => list.clone(),
            None => self
                .contacts_of(&req.from)?
                .into_iter()
                .filter(|(_, fields)| req.matches(fields))
                .map(|(phone, _)| phone)
                .collect(),
        };
        let epoch = self.store.epoch();
        let prefix = broadcasts::key_prefix(&req.id);
        let mut enqueued = 0;
        for batch in recipients.chunks(500) {
            let entries: Vec<OutboxEntry> = batch
                .iter()
                .filter(|to| **to != req.from)
                .map(|to| OutboxEntry {
                    key: format!("{prefix}{to}"),
                    to: to.clone(),
                    from: req.from.clone(),
                    messaging_service_sid: req.messaging_service_sid.clone(),
                    body: req.message.clone(),
                    media: Vec::new(),
                    cause: "broadcast".to_owned(),
                    flow: None,
                    step: None,
                    created_at: now,
                    due_at: now,
                    state: OutboxState::Pending {
                        not_before: now,
                        attempts: 0,
                    },
                })
                .collect();
            enqueued += self.store.enqueue_outbound(&entries)?;
        }
        self.store.flush(epoch).await?;
        if enqueued > 0 {
            self.outbox.notify_one();
        }
        Ok(Sent {
            id: req.id.clone(),
            recipients: recipients.len(),
            enqueued,
            already: recipients.len() - enqueued,
        })
    }

    /// Every broadcast's progress. Reads the whole outbox.
    pub fn broadcasts(&self) -> Result<Vec<Progress>, StoreError> {
        Ok(broadcasts::progress(&self.store.outbox()?))
    }

    /// Cancel broadcast `id`: its entries still pending become skipped
    /// (`canceled`); one being sent finishes. Returns how many were
    /// canceled, or `None` when there is no such broadcast.
    pub async fn cancel_broadcast(&self, id: &str, now: i64) -> Result<Option<usize>, StoreError> {
        let prefix = broadcasts::key_prefix(id);
        let entries: Vec<OutboxEntry> = self
            .store
            .outbox()?
            .into_iter()
            .filter(|e| e.cause == "broadcast" && e.key.starts_with(&prefix))
            .collect();
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
