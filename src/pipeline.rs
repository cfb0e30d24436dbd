//! The webhook pipeline between the HTTP edge and the store: dedupe by
//! MessageSid, per-conversation serialisation, the flow engine, atomic
//! persistence, durability, TwiML.
//!
//! It knows no axum (the `http` module calls it with typed Twilio values)
//! and no sled (it talks to the [`Store`] trait). Tools without HTTP — the
//! local chat, transcript runs — can drive it directly.
//!
//! Ordering guarantees:
//! - Messages of one conversation (To, From) are processed one at a time
//!   under a per-key async lock; different conversations never share a lock.
//! - The dedupe record and the new conversation are written in one atomic
//!   batch, so a MessageSid is either fully processed or not at all.
//! - The answer is returned only after the flush that covers that batch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::OwnedMutexGuard;

use crate::flow::{self, Conversation, EngineOptions, FlowSet, Inbound, Outcome};
use crate::metrics::Metrics;
use crate::store::{ConvKey, DeliveryStatus, Processed, StatusUpdate, Store, StoreError};
use crate::twilio::{self, InboundMessage, OutMessage, StatusCallback};

/// What the HTTP layer sends back for one inbound webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub twiml: String,
    /// "reply" or "silence:<reason>", for logs.
    pub outcome: String,
    /// True when this MessageSid had been processed before.
    pub duplicate: bool,
}

/// An [`Answer`] together with what the engine decided, for tools that
/// show more than the wire format (the local chat shows replies and the
/// silence reason without parsing TwiML back).
#[derive(Debug, Clone, PartialEq)]
pub struct Detailed {
    pub answer: Answer,
    /// `None` when the MessageSid was a duplicate: the engine did not run.
    pub handled: Option<flow::Handled>,
}

/// The shared, swappable flow set. Every request takes one snapshot with
/// `load()` and uses it throughout, so a reload mid-request is invisible.
pub type SharedFlows = Arc<ArcSwap<FlowSet>>;

pub struct Pipeline<S: Store> {
    store: Arc<S>,
    flows: SharedFlows,
    options: EngineOptions,
    locks: KeyLocks,
    metrics: Arc<Metrics>,
}

impl<S: Store> Pipeline<S> {
    pub fn new(
        store: Arc<S>,
        flows: SharedFlows,
        options: EngineOptions,
        metrics: Arc<Metrics>,
    ) -> Self {
        Pipeline {
            store,
            flows,
            options,
            locks: KeyLocks::default(),
            metrics,
        }
    }

    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    pub fn flows(&self) -> &SharedFlows {
        &self.flows
    }

    /// Handle one verified inbound message at time `now` (unix seconds).
    pub async fn handle_inbound(
        &self,
        msg: &InboundMessage,
        now: i64,
    ) -> Result<Answer, StoreError> {
        Ok(self.handle_inbound_detailed(msg, now).await?.answer)
    }

    /// [`Pipeline::handle_inbound`], also returning the engine's result
    /// (outcome, new conversation, events). Same dedupe, locking, commit
    /// and flush: the HTTP path and the local chat share every step.
    pub async fn handle_inbound_detailed(
        &self,
        msg: &InboundMessage,
        now: i64,
    ) -> Result<Detailed, StoreError> {
        // Fast path for retries, without taking the conversation lock.
        if let Some(done) = self.store.processed(&msg.message_sid)? {
            return Ok(self.duplicate(done));
        }
        let key = ConvKey::new(&msg.to, &msg.from);
        let guard = self.locks.lock(&key).await;
        // A retry may have been processed while we waited for the lock.
        if let Some(done) = self.store.processed(&msg.message_sid)? {
            return Ok(self.duplicate(done));
        }

        let conversation = match self.store.conversation(&key)? {
            Some(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(error = %e, "stored conversation unreadable; starting afresh");
                Conversation::default()
            }),
            None => Conversation::default(),
        };
        let flows = self.flows.load();
        let media: Vec<String> = msg.media.iter().map(|m| m.url.clone()).collect();
        let inbound = Inbound {
            from: &msg.from,
            to: &msg.to,
            body: &msg.body,
            media: &media,
            message_sid: &msg.message_sid,
        };
        let handled = flow::handle(&flows, &self.options, conversation, &inbound, now);
        for event in &handled.events {
            tracing::info!(?event, "flow event");
        }

        let (twiml, outcome) = match &handled.outcome {
            Outcome::Reply(replies) => {
                let out: Vec<OutMessage> = replies
                    .iter()
                    .map(|r| OutMessage {
                        body: r.body.clone(),
                        media: r.media.clone(),
                        ..OutMessage::default()
                    })
                    .collect();
                let twiml = twilio::render(&out);
                Metrics::add(
                    &self.metrics.replies,
                    twiml.matches("<Message").count() as u64,
                );
                (twiml, "reply".to_string())
            }
            Outcome::Silence(reason) => {
                self.metrics.silence(reason.as_str());
                (
                    twilio::SILENCE.to_string(),
                    format!("silence:{}", reason.as_str()),
                )
            }
        };

        let stored = if handled.conversation == Conversation::default() {
            None
        } else {
            Some(serde_json::to_vec(&handled.conversation).unwrap_or_default())
        };
        let processed = Processed {
            twiml,
            outcome,
            at: now,
        };
        self.store
            .commit(&key, stored.as_deref(), &msg.message_sid, &processed)?;
        // The next message of this conversation may read the new state now;
        // its own flush covers ours too, and neither is acknowledged before
        // a flush, so releasing before the fsync loses nothing.
        drop(guard);
        self.store.flush().await?;
        tracing::info!(
            outcome = %processed.outcome,
            flow = handled.flow.as_deref().unwrap_or("-"),
            step = handled.step.as_deref().unwrap_or("-"),
            "message handled"
        );
        Ok(Detailed {
            answer: Answer {
                twiml: processed.twiml,
                outcome: processed.outcome,
                duplicate: false,
            },
            handled: Some(handled),
        })
    }

    fn duplicate(&self, done: Processed) -> Detailed {
        Metrics::inc(&self.metrics.duplicates);
        tracing::info!(outcome = %done.outcome, "duplicate MessageSid: replaying the recorded answer");
        Detailed {
            answer: Answer {
                twiml: done.twiml,
                outcome: done.outcome,
                duplicate: true,
            },
            handled: None,
        }
    }

    /// Forget the conversation of `key` (contact fields and run), under the
    /// same per-conversation lock as messages, and make that durable.
    /// Returns whether there was one. For tools (`smsflow chat`'s `/reset`);
    /// the webhook never deletes conversations this way.
    pub async fn forget(&self, key: &ConvKey) -> Result<bool, StoreError> {
        let guard = self.locks.lock(key).await;
        let existed = self.store.delete_conversation(key)?;
        drop(guard);
        self.store.flush().await?;
        Ok(existed)
    }

    /// Record a delivery status callback, keeping the latest status
    /// monotonic. Returns whether it advanced the stored status.
    pub async fn record_status(
        &self,
        cb: &StatusCallback,
        now: i64,
    ) -> Result<StatusUpdate, StoreError> {
        let status = DeliveryStatus {
            status: cb.status.as_str().to_string(),
            rank: cb.status.rank(),
            error_code: cb.error_code.clone(),
            to: cb.to.clone(),
            from: cb.from.clone(),
            updated_at: now,
        };
        let update = self.store.record_status(&cb.message_sid, &status)?;
        self.store.flush().await?;
        Ok(update)
    }
}

/// Per-conversation async locks. An entry exists only while some request
/// holds or waits for it, so the map stays as small as the set of
/// conversations in flight.
#[derive(Default)]
struct KeyLocks {
    map: Arc<Mutex<HashMap<ConvKey, Arc<tokio::sync::Mutex<()>>>>>,
}

struct KeyGuard {
    guard: Option<OwnedMutexGuard<()>>,
    key: ConvKey,
    map: Arc<Mutex<HashMap<ConvKey, Arc<tokio::sync::Mutex<()>>>>>,
}

impl KeyLocks {
    async fn lock(&self, key: &ConvKey) -> KeyGuard {
        let lock = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        let guard = lock.lock_owned().await;
        KeyGuard {
            guard: Some(guard),
            key: key.clone(),
            map: self.map.clone(),
        }
    }
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        // Release the lock first, so the count below sees only the map's
        // reference and those of waiters.
        self.guard.take();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lock) = map.get(&self.key) {
            if Arc::strong_count(lock) == 1 {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn key_locks_serialise_one_key_and_clean_up() {
        let locks = Arc::new(KeyLocks::default());
        let key = ConvKey::new("a", "b");
        let g1 = locks.lock(&key).await;
        let l2 = locks.clone();
        let k2 = key.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock(&k2).await;
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        // A different key is not blocked.
        let _other = locks.lock(&ConvKey::new("a", "c")).await;
        drop(_other);
        drop(g1);
        waiter.await.unwrap();
        assert!(locks.map.lock().unwrap().is_empty());
    }
}
