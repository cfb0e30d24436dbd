//! Firing a due timer under the conversation's lock, and the waker that
//! tells the timer scheduler a commit set an earlier timer.
//!
//! A timer and a reply of one conversation take the same per-conversation
//! lock, and each re-reads the record under it: whichever comes second
//! sees what the first did. A reply that moves the conversation changes
//! (or clears) the record's due time, so a firing that comes second finds
//! its timer no longer due and does nothing; a firing that comes first
//! moves the conversation (or, for a reminder, marks that timeout fired)
//! before the reply is routed. Exactly one of "the reply's route from the
//! waiting step" and "the timeout" runs.
//!
//! A conversation's due time may be its next campaign event instead
//! (`campaigns.rs`): firing first starts the flows of the events due, each
//! under its own key, then records the next due time.

use std::sync::atomic::{AtomicI64, Ordering};

use tokio::sync::Notify;

use super::Pipeline;
use crate::flow::{self, Outcome, Wake};
use crate::metrics::Metrics;
use crate::store::{DueTimer, OutboxEntry, OutboxState, StateCommit, Store, StoreError};

/// Wakes the timer scheduler when a commit sets a timer earlier than the
/// one it sleeps towards. Cheap on the webhook path: one atomic load per
/// commit with a timer, a notification only when the new timer is the
/// earliest.
#[derive(Debug)]
pub struct TimerWaker {
    notify: Notify,
    /// The due time the scheduler sleeps towards (`i64::MAX` while it
    /// looks for the next one, so every commit wakes it then).
    target: AtomicI64,
}

impl Default for TimerWaker {
    fn default() -> Self {
        TimerWaker {
            notify: Notify::new(),
            target: AtomicI64::new(i64::MAX),
        }
    }
}

impl TimerWaker {
    /// A commit set the conversation's next timer to `due`.
    pub(crate) fn set(&self, due: Option<i64>) {
        if let Some(due) = due {
            if due < self.target.fetch_min(due, Ordering::SeqCst) {
                self.notify.notify_one();
            }
        }
    }

    /// The scheduler is about to look for the next timer: every timer set
    /// from now on wakes it (a notification is kept until it waits).
    pub fn arm(&self) {
        self.target.store(i64::MAX, Ordering::SeqCst);
    }

    /// The scheduler found `next` as the earliest timer and sleeps towards
    /// it. A timer set since [`TimerWaker::arm`] has already notified.
    pub fn sleeping_until(&self, next: Option<i64>) {
        self.target
            .fetch_min(next.unwrap_or(i64::MAX), Ordering::SeqCst);
    }

    /// Resolves when a commit set a timer earlier than the target.
    pub async fn notified(&self) {
        self.notify.notified().await
    }
}

/// What firing one timer index entry did.
#[derive(Debug, Clone, PartialEq)]
pub struct TimerFired {
    /// Whether the conversation's timer was due and ran, or a campaign
    /// event due with it started its flow (false: the entry was stale,
    /// e.g. a reply won the race, and was removed).
    pub ran: bool,
    /// The outbox entries this firing created (one per message part), in
    /// order, a campaign's first; empty when it said nothing, or when
    /// they were already enqueued by an earlier firing that crashed
    /// before its commit.
    pub enqueued: Vec<OutboxEntry>,
    /// The engine's events.
    pub events: Vec<flow::Event>,
}

impl<S: Store> Pipeline<S> {
    /// Fire the timer of index entry `timer` at `now` (unix seconds),
    /// under the conversation's lock: re-read the record; if its due time
    /// is no longer `timer.due` the entry is stale (a reply or an earlier
    /// firing moved it) and is removed; otherwise run the engine's
    /// timeout, then, when no run is live any more and a start is queued
    /// (`if_busy: queue`), start the first queued flow; put what they say
    /// in the outbox, then commit the conversation with its next due
    /// time, then flush.
    ///
    /// The outbox entries are written before the conversation: a crash in
    /// between fires the timer again after restart, and the entries' keys
    /// (conversation, flow, step, timeout, when the step started waiting,
    /// part) make the second enqueue a no-op, so each message is recorded
    /// once.
    pub async fn fire_timer(&self, timer: &DueTimer, now: i64) -> Result<TimerFired, StoreError> {
        let key = &timer.key;
        // Campaign events first, each a flow start under its own key (it
        // takes the conversation's lock itself): a crash after one leaves
        // the index entry, and firing again starts nothing twice.
        let mut campaign_sent = Vec::new();
        let mut campaigns_fired = 0;
        let flows = self.flows.load_full();
        if flows.has_campaigns() && timer.due <= now {
            let record = self.store.load(key)?;
            if record.due == Some(timer.due) && record.conversation.is_some() {
                let conversation = self.conversation_of(key, &record)?;
                (campaign_sent, campaigns_fired) =
                    self.fire_campaigns(&flows, key, &conversation, now).await?;
            }
        }
        let guard = self.lock(key).await?;
        let epoch = self.store.epoch();
        let record = self.store.load(key)?;
        if record.due != Some(timer.due) || timer.due > now {
            if record.due != Some(timer.due) {
                self.store.remove_timer(timer)?;
            }
            drop(guard);
            return Ok(TimerFired {
                ran: campaigns_fired > 0,
                enqueued: campaign_sent,
                events: Vec::new(),
            });
        }
        let conversation = self.conversation_of(key, &record)?;
        if flows.has_campaigns() && flow::next_due(&flows, &conversation).is_none_or(|d| d > now) {
            // Only campaign events were due (fired above), not the run's
            // own timer: the engine is not asked (it would count a stale
            // timer); the record gets its next due time.
            let due = self.due_after(&flows, key, &conversation, now);
            let stored =
                (conversation != flow::Conversation::default()).then(|| conversation.to_stored());
            self.store.commit_state(StateCommit {
                key,
                conversation: stored.as_deref(),
                ended: conversation.is_ended(due),
                due,
                recent: &record.recent,
                at: now,
                results: &[],
            })?;
            drop(guard);
            self.timers.set(due);
            self.store.flush(epoch).await?;
            return Ok(TimerFired {
                ran: campaigns_fired > 0,
                enqueued: campaign_sent,
                events: Vec::new(),
            });
        }
        let wake = Wake {
            from: &key.from,
            to: &key.to,
        };
        // A timeout path may make calls too (same loop and budget as a
        // message; see pipeline/calls.rs).
        let handled = self
            .with_calls(flows.has_scripts(), |answers| {
                flow::handle_timeout_with_calls(&flows, conversation.clone(), &wake, now, answers)
            })
            .await;
        for event in &handled.events {
            self.log_event(event);
        }
        let fired = handled.events.iter().find_map(|e| match e {
            flow::Event::TimedOut {
                flow,
                step,
                timeout,
                waiting_since,
            } => Some((flow, step, timeout, waiting_since)),
            _ => None,
        });
        let mut entries = Vec::new();
        if let (Some((flow, step, timeout, since)), Outcome::Reply(replies)) =
            (fired, &handled.outcome)
        {
            Metrics::inc(&self.metrics.timers_fired);
            for (part, reply) in replies.iter().enumerate() {
                entries.push(OutboxEntry {
                    key: format!(
                        "timeout:{}:{}:{flow}:{step}:{timeout}:{since}:{part}",
                        key.to, key.from
                    ),
                    to: key.from.clone(),
                    from: key.to.clone(),
                    messaging_service_sid: None,
                    body: reply.body.clone(),
                    media: reply.media.clone(),
                    cause: "timeout".to_owned(),
                    flow: Some(
                        reply
                            .origin
                            .as_ref()
                            .map_or_else(|| flow.clone(), |o| o.flow.clone()),
                    ),
                    step: Some(
                        reply
                            .origin
                            .as_ref()
                            .map_or_else(|| step.clone(), |o| o.step.clone()),
                    ),
                    created_at: now,
                    due_at: timer.due,
                    state: OutboxState::Pending {
                        not_before: timer.due,
                        attempts: 0,
                    },
                });
            }
        } else if fired.is_some() {
            Metrics::inc(&self.metrics.timers_fired);
        }
        // The run may have ended (or expired) with a start queued behind
        // it: that start goes now, its messages after the timeout's.
        let mut conversation = handled.conversation.clone();
        let mut ended = handled.ended.clone();
        let mut started = false;
        let mut start_jobs = 0;
        if let Some(start) = self.start_queued(&flows, key, &conversation, now).await? {
            conversation = start.conversation;
            entries.extend(start.entries);
            ended.extend(start.ended);
            start_jobs = start.jobs;
            started = true;
        }
        let mut enqueued = campaign_sent;
        if !entries.is_empty() {
            // Only the entries this firing added count as sent by it.
            for entry in entries {
                if self.store.enqueue_outbound(std::slice::from_ref(&entry))? == 1 {
                    enqueued.push(entry);
                }
            }
        }
        // Like a message's: recorded before the state change, keyed by
        // this firing, so firing again after a crash records nothing new.
        let jobs = self.record_call_jobs(
            &format!("timer:{}:{}:{}", key.to, key.from, timer.due),
            &handled.after,
            now,
        )?;
        // Campaign events due by now were fired above: the next is later.
        let due = self.due_after(&flows, key, &conversation, now);
        let stored =
            (conversation != flow::Conversation::default()).then(|| conversation.to_stored());
        let results = super::results::of(key, &ended, &conversation.contact, now);
        self.store.commit_state(StateCommit {
            key,
            conversation: stored.as_deref(),
            ended: conversation.is_ended(due),
            due,
            recent: &record.recent,
            at: now,
            results: &results,
        })?;
        drop(guard);
        self.timers.set(due);
        self.store.flush(epoch).await?;
        if !enqueued.is_empty() {
            self.outbox.notify_one();
        }
        if jobs + start_jobs > 0 {
            self.call_jobs.notify_one();
        }
        tracing::debug!(
            due = timer.due,
            messages = enqueued.len(),
            next_due = due,
            "timer fired"
        );
        Ok(TimerFired {
            ran: fired.is_some() || started || campaigns_fired > 0,
            enqueued,
            events: handled.events,
        })
    }
}
