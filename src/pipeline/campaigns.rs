//! Campaign events: when they are due, firing them, and rescheduling every
//! conversation when the campaign set changes.
//!
//! A contact's next campaign event is part of its conversation's next due
//! time: every commit that may change contact fields (a message, a flow
//! start, an import, a timer) writes the earlier of the run's timer and
//! that event into the record's header, atomically with the fields, so the
//! store's timer index is the campaign schedule and nothing scans contacts
//! to find what is due. A commit counts events up to the grace period
//! (`campaign_grace_secs`, the sender's `max_late_secs`) in the past, so an
//! event not yet fired when the server stopped, or when its field was set
//! a little late, still comes due; one further in the past is skipped.
//!
//! A due event is a flow start keyed `campaign:<campaign>:<event>:<our
//! number>:<contact>:<date>` ([`flow::CampaignDue::key`]): the start
//! record under that key makes it happen at most once per contact and
//! date, across restarts, repeated wake-ups and field changes back and
//! forth. The start goes through [`Pipeline::start_flow`], so an
//! opted-out contact gets nothing, and the sender applies pacing, consent
//! and quiet hours to what it says.

use super::Pipeline;
use crate::flow::{self, Conversation, FlowSet};
use crate::starts::{IfBusy, StartOutcome, StartRequest};
use crate::store::{ConvKey, OutboxEntry, StateCommit, Store, StoreError};

/// Conversations walked per page by [`Pipeline::reschedule_campaigns`].
const PAGE: usize = 512;

/// What [`Pipeline::reschedule_campaigns`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rescheduled {
    /// Conversations looked at.
    pub conversations: usize,
    /// Conversations whose next due time was moved earlier (or set).
    pub moved: usize,
}

impl<S: Store> Pipeline<S> {
    /// The next due time to record for `conversation` of `key` at `now`:
    /// its run's timer, or its next campaign event up to the grace period
    /// in the past (see the module doc).
    pub(crate) fn due_of(
        &self,
        flows: &FlowSet,
        key: &ConvKey,
        conversation: &Conversation,
        now: i64,
    ) -> Option<i64> {
        let after = now.saturating_sub(self.options.campaign_grace_secs.max(0)) - 1;
        self.due_after(flows, key, conversation, after)
    }

    /// The earlier of the run's timer and the first campaign event due
    /// strictly after `after`.
    pub(crate) fn due_after(
        &self,
        flows: &FlowSet,
        key: &ConvKey,
        conversation: &Conversation,
        after: i64,
    ) -> Option<i64> {
        let run = flow::next_due(flows, conversation);
        let campaign = flow::next_campaign_due(
            flows,
            &self.options.time_zones,
            &key.to,
            &conversation.contact,
            after,
        );
        match (run, campaign) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Fire the campaign events of `key` due at `now` (not older than the
    /// grace period), each as a flow start under its own key. Returns the
    /// outbox entries the starts made, in order, and how many events
    /// started something new.
    pub(crate) async fn fire_campaigns(
        &self,
        flows: &FlowSet,
        key: &ConvKey,
        conversation: &Conversation,
        now: i64,
    ) -> Result<(Vec<OutboxEntry>, usize), StoreError> {
        let oldest = now.saturating_sub(self.options.campaign_grace_secs.max(0));
        let mut due: Vec<_> = flow::campaign_events(
            flows,
            &self.options.time_zones,
            &key.to,
            &conversation.contact,
        )
        .into_iter()
        .filter(|e| e.due <= now && e.due >= oldest)
        .collect();
        due.sort_by_key(|e| e.due);
        let mut sent = Vec::new();
        let mut fired = 0;
        for event in due {
            let req = StartRequest {
                to: key.from.clone(),
                from: key.to.clone(),
                messaging_service_sid: None,
                fields: Default::default(),
                vars: Default::default(),
                idempotency_key: event.key(&key.to, &key.from),
                if_busy: if event.interrupt {
                    IfBusy::Interrupt
                } else {
                    IfBusy::Skip
                },
            };
            let StartOutcome::Done { record, duplicate } =
                self.start_flow(&event.flow, &req, now).await?
            else {
                // The flow went away with a reload since the set was read.
                continue;
            };
            if duplicate {
                continue;
            }
            fired += 1;
            tracing::info!(
                campaign = %event.campaign,
                event = %event.event,
                flow = %event.flow,
                result = %record.result,
                "campaign event"
            );
            for k in &record.outbox {
                if let Some(entry) = self.store.outbound(k)? {
                    sent.push(entry);
                }
            }
        }
        Ok((sent, fired))
    }

    /// Walk every stored conversation and move its next due time earlier
    /// where the current campaign set has an event before it (a campaign
    /// was added or moved earlier). A due time later than needed is left:
    /// firing early finds nothing due and records the right time. Run at
    /// startup and whenever the campaign set changes; each conversation is
    /// rewritten under its lock, so a message at the same time waits.
    pub async fn reschedule_campaigns(&self, now: i64) -> Result<Rescheduled, StoreError> {
        let flows = self.flows.load_full();
        let mut done = Rescheduled::default();
        let mut after: Option<ConvKey> = None;
        loop {
            let keys = self.store.conversation_keys(after.as_ref(), PAGE)?;
            let Some(last) = keys.last().cloned() else {
                break;
            };
            let epoch = self.store.epoch();
            let mut moved = false;
            for key in keys {
                done.conversations += 1;
                let guard = self.locks.lock(&key).await;
                let record = self.store.load(&key)?;
                let Some(bytes) = &record.conversation else {
                    continue;
                };
                let conversation = self.conversation_of(&key, &record)?;
                let due = self.due_of(&flows, &key, &conversation, now);
                let earlier = match (due, record.due) {
                    (Some(new), Some(old)) => new < old,
                    (Some(_), None) => true,
                    _ => false,
                };
                if !earlier {
                    continue;
                }
                self.store.commit_state(StateCommit {
                    key: &key,
                    conversation: Some(bytes),
                    ended: conversation.run.is_none() && due.is_none(),
                    due,
                    recent: &record.recent,
                    at: now,
                })?;
                drop(guard);
                self.timers.set(due);
                done.moved += 1;
                moved = true;
            }
            if moved {
                self.store.flush(epoch).await?;
            }
            after = Some(last);
        }
        Ok(done)
    }
}
