//! The sending task: claims due outbox entries and sends them through
//! Twilio, once.
//!
//! Each pass (when woken, and at least once a second) reads the due
//! entries from the store's due index and decides, in this order:
//!
//! 1. **too late**: scheduled (`not_before`) more than `max_late` ago →
//!    `Skipped "too_late"`. The time measured from is `not_before`, which
//!    is the due time unless the sender itself pushed it later (quiet
//!    hours, pacing, backoff), so a message deferred by us is never dropped
//!    for the wait we imposed;
//! 2. **opted out**: the recipient opted out within the consent scope
//!    (the Messaging Service, else our number, as for inbound) →
//!    `Skipped "opted_out"`;
//! 3. **quiet hours** of the sending number → `Pending` until the period
//!    ends (deferred);
//! 4. **pace**: one message per `send_interval` per sending number. A slot
//!    within the next second is waited for in memory; a later one is
//!    written as the entry's `not_before`, so the queue and its order
//!    survive a restart.
//!
//! Then, per message: `Sending` is written and flushed BEFORE the request,
//! and what Twilio answered is written after it (see the module doc of
//! `outbound`). An entry found `Sending` at startup may have reached
//! Twilio: it becomes `Unknown` and is never sent again (at most once).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;

use super::client::{Answer, Client, NewMessage};
use super::{quiet, OutboundConfig, Wake};
use crate::clock::{unix_millis, unix_now};
use crate::metrics::{Metrics, Outbound};
use crate::pipeline::{consent_change, consent_scope, Pipeline};
use crate::store::{ConvKey, DeliveryStatus, OutboxEntry, OutboxState, Store, StoreError};
use crate::twilio::MessageStatus;

/// Most entries read from the due index per pass.
const BATCH: usize = 256;
/// Entries a pass reads first (see `pass`).
const WINDOW: usize = 2 * IN_FLIGHT;
/// Sends in flight at once (across numbers; each number is paced).
const IN_FLIGHT: usize = 8;
/// Attempts (requests Twilio refused before processing) before a message
/// fails for good.
pub(crate) const MAX_ATTEMPTS: u32 = 8;
/// The longest wait between two attempts.
const MAX_BACKOFF_SECS: i64 = 300;

/// The running sender: wake it, or stop it at shutdown.
pub(crate) struct SenderHandle {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl SenderHandle {
    /// Stop claiming; wait (bounded by the send timeout) for requests in
    /// flight to be answered and recorded.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Start the sender over `pipeline`'s store. `status_url` is our
/// `/twilio/status` (public URL).
pub(crate) fn spawn<S: Store>(
    pipeline: Arc<Pipeline<S>>,
    config: &OutboundConfig,
    status_url: String,
    metrics: Arc<Metrics>,
    wake: Wake,
) -> anyhow::Result<SenderHandle> {
    let credentials = config
        .credentials
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no outbound credentials"))?;
    let client = Client::new(&config.api_base, credentials, config.send_timeout)?;
    let sender = Arc::new(Sender {
        pipeline,
        client,
        config: config.clone(),
        status_url,
        metrics,
        pacing: Mutex::new(Pacing::default()),
        claimed: Mutex::new(HashSet::new()),
        stopping: AtomicBool::new(false),
    });
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(sender.run(wake, stopped));
    Ok(SenderHandle { stop, task })
}

struct Sender<S: Store> {
    pipeline: Arc<Pipeline<S>>,
    client: Client,
    config: OutboundConfig,
    status_url: String,
    metrics: Arc<Metrics>,
    pacing: Mutex<Pacing>,
    /// Keys handed to a send task and not finished yet; a pass skips them
    /// (they are still `Pending` while the task waits for its slot).
    claimed: Mutex<HashSet<String>>,
    /// Set at shutdown: a task still waiting for its slot leaves its
    /// message pending instead of starting a request.
    stopping: AtomicBool,
}

/// Per sending number, the next free slot (unix ms); per deferred entry,
/// the slot it was given (so it does not take a second one when it comes
/// back). In memory: after a restart the `not_before`s written keep the
/// order and spacing.
#[derive(Default)]
struct Pacing {
    next: HashMap<String, i64>,
    reserved: HashMap<String, i64>,
}

impl Pacing {
    fn slot(&mut self, key: &str, sender: &str, now_ms: i64, interval_ms: i64) -> i64 {
        if let Some(slot) = self.reserved.remove(key) {
            return slot;
        }
        let slot = self.next.get(sender).copied().unwrap_or(now_ms).max(now_ms);
        self.next.insert(sender.to_owned(), slot + interval_ms);
        slot
    }

    fn reserve(&mut self, key: &str, slot: i64) {
        self.reserved.insert(key.to_owned(), slot);
    }

    fn forget(&mut self, key: &str) {
        self.reserved.remove(key);
    }
}

/// How often the sender looks for entries left `Sending` (see
/// `Sender::recover`).
const RECOVER_EVERY: Duration = Duration::from_secs(5);
/// How long after its send time limit a request left `Sending` counts as
/// interrupted.
const STALE_MARGIN_SECS: i64 = 2;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the pass decided for one due entry.
enum Decision {
    /// Leave it as it is.
    Nothing,
    /// Write this state (skipped or deferred), counted as `outcome` if
    /// given (a message paced to a later second is not counted).
    Write(OutboxState, Option<Outbound>),
    /// Hand it to a send task, at this slot (unix ms).
    Send(i64),
}

impl<S: Store> Sender<S> {
    fn store(&self) -> &S {
        self.pipeline.store()
    }

    async fn run(self: Arc<Self>, wake: Wake, mut stopped: watch::Receiver<bool>) {
        tracing::info!(
            api_base = %self.config.api_base,
            account_sid = %self.client_account(),
            "outbound sender started"
        );
        let mut recovered_at = std::time::Instant::now();
        if let Err(e) = self.recover().await {
            tracing::error!(error = %e, "could not check the outbox for interrupted sends");
        }
        let mut tasks = JoinSet::new();
        // A failing store fails every pass: said once, not every second.
        let mut failing = false;
        loop {
            match self.pass(&mut tasks).await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("the outbox can be read again: sending resumes");
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::error!(error = %e, "outbox pass failed; retried every second");
                }
                Err(e) => tracing::debug!(error = %e, "outbox pass failed again"),
            }
            while tasks.try_join_next().is_some() {}
            // Again from time to time: another instance on the same
            // database (PostgreSQL) may have died while sending.
            if recovered_at.elapsed() >= RECOVER_EVERY {
                recovered_at = std::time::Instant::now();
                if let Err(e) = self.recover().await {
                    tracing::debug!(error = %e, "checking for interrupted sends failed");
                }
            }
            // A send that finishes frees a place for the next due message:
            // without this, a full set of sends in flight would wait for
            // the next poll, capping a long queue at IN_FLIGHT per second.
            tokio::select! {
                _ = wake.woken() => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stopped.changed() => break,
            }
        }
        // Requests in flight are answered (or time out) and recorded;
        // none is started any more.
        self.stopping.store(true, Ordering::SeqCst);
        let grace = self.config.send_timeout + Duration::from_secs(2);
        let _ =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        tracing::info!("outbound sender stopped");
    }

    fn client_account(&self) -> String {
        self.config
            .credentials
            .as_ref()
            .map(|c| c.account_sid().to_owned())
            .unwrap_or_default()
    }

    /// Entries left `Sending` by a previous run may have reached Twilio:
    /// they become `Unknown`, never sent again. Only once their request
    /// is past the send time limit: until then another instance sharing
    /// the database (PostgreSQL) may still be sending it, and records its
    /// outcome itself.
    async fn recover(&self) -> Result<(), StoreError> {
        let epoch = self.store().epoch();
        let now = unix_now();
        let stale = now - self.config.send_timeout.as_secs() as i64 - STALE_MARGIN_SECS;
        let mut n = 0;
        for entry in self.store().sending_outbound()? {
            if matches!(entry.state, OutboxState::Sending { since, .. } if since > stale) {
                continue;
            }
            let reason =
                "interrupted while sending (its server stopped): it may have reached Twilio";
            let unknown = OutboxState::Unknown {
                reason: reason.into(),
                at: now,
            };
            if self
                .store()
                .update_outbound(&entry.key, &entry.state, unknown)?
                .is_some()
            {
                n += 1;
                self.metrics.outbound(Outbound::Unknown);
                tracing::warn!(
                    key = %short(&entry.key),
                    cause = %entry.cause,
                    "outbound message state unknown: it was being sent when the server stopped; \
                     not sent again (at most once)"
                );
            }
        }
        if n > 0 {
            self.store().flush(epoch).await?;
        }
        Ok(())
    }

    async fn pass(self: &Arc<Self>, tasks: &mut JoinSet<()>) -> Result<(), StoreError> {
        let now_ms = unix_millis();
        let now = now_ms.div_euclid(1000);
        let epoch = self.store().epoch();
        let mut wrote = false;
        // Most passes (one per finished send) have a place or two to fill:
        // a small window of the due index is enough, and reading all of
        // BATCH each time cost more than the sends themselves in a long
        // broadcast. A window that holds only entries already claimed or
        // written away (skipped, deferred) is read again, larger.
        let mut window = WINDOW;
        loop {
            let due = self.store().due_outbound(now, window)?;
            let read = due.len();
            let mut full = false;
            for entry in due {
                if lock(&self.claimed).contains(&entry.key) {
                    continue;
                }
                let decision = self.decide(&entry, now, now_ms)?;
                match decision {
                    Decision::Nothing => {}
                    Decision::Write(state, outcome) => {
                        if self
                            .store()
                            .update_outbound(&entry.key, &entry.state, state)?
                            .is_some()
                        {
                            wrote = true;
                            if let Some(outcome) = outcome {
                                self.metrics.outbound(outcome);
                            }
                        }
                    }
                    Decision::Send(slot) => {
                        if tasks.len() >= IN_FLIGHT {
                            // Its slot is kept; the next pass picks it up.
                            lock(&self.pacing).reserve(&entry.key, slot);
                            full = true;
                            break;
                        }
                        lock(&self.claimed).insert(entry.key.clone());
                        let me = self.clone();
                        tasks.spawn(async move {
                            let key = entry.key.clone();
                            if let Err(e) = me.send(entry, slot).await {
                                tracing::error!(key = %short(&key), error = %e, "outbound send could not be recorded");
                            }
                            lock(&me.claimed).remove(&key);
                        });
                    }
                }
            }
            if full || read < window || window >= BATCH {
                break;
            }
            window = (window * 4).min(BATCH);
        }
        if wrote {
            self.store().flush(epoch).await?;
        }
        Ok(())
    }

    fn decide(&self, entry: &OutboxEntry, now: i64, now_ms: i64) -> Result<Decision, StoreError> {
        let OutboxState::Pending {
            not_before,
            attempts,
        } = entry.state
        else {
            return Ok(Decision::Nothing);
        };
        let service = entry.messaging_service_sid.as_deref();
        let skip = |reason: &str| {
            lock(&self.pacing).forget(&entry.key);
            Decision::Write(
                OutboxState::Skipped {
                    reason: reason.into(),
                    at: now,
                },
                Some(Outbound::Skipped),
            )
        };
        let late = now - not_before;
        if late > self.config.max_late.as_secs() as i64 {
            tracing::warn!(
                key = %short(&entry.key),
                cause = %entry.cause,
                late_secs = late,
                max_late_secs = self.config.max_late.as_secs(),
                "outbound message skipped: it would arrive too late"
            );
            return Ok(skip("too_late"));
        }
        let scope = consent_scope(service, &entry.from);
        if self
            .store()
            .opt_out(scope, &entry.to)?
            .is_some_and(|o| o.opted_out)
        {
            tracing::info!(key = %short(&entry.key), "outbound message skipped: the recipient opted out");
            return Ok(skip("opted_out"));
        }
        if let Some(end) = quiet::quiet_until(&self.config.quiet_hours, &entry.from, service, now) {
            lock(&self.pacing).forget(&entry.key);
            tracing::info!(key = %short(&entry.key), until = end, "outbound message deferred: quiet hours");
            return Ok(Decision::Write(
                OutboxState::Pending {
                    not_before: end,
                    attempts,
                },
                Some(Outbound::Deferred),
            ));
        }
        let interval = self.config.send_interval.as_millis() as i64;
        let mut pacing = lock(&self.pacing);
        let slot = pacing.slot(&entry.key, scope, now_ms, interval);
        if slot <= now_ms + 1000 {
            return Ok(Decision::Send(slot));
        }
        // Later than the next pass: written down, so the queue's spacing
        // survives a restart.
        pacing.reserve(&entry.key, slot);
        let not_before = slot.div_euclid(1000);
        if not_before == not_before_of(&entry.state) {
            return Ok(Decision::Nothing);
        }
        Ok(Decision::Write(
            OutboxState::Pending {
                not_before,
                attempts,
            },
            None,
        ))
    }

    /// Wait for the slot, mark `Sending` durably, send, record the answer.
    async fn send(&self, entry: OutboxEntry, slot_ms: i64) -> Result<(), StoreError> {
        let wait = slot_ms - unix_millis();
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait as u64)).await;
        }
        let OutboxState::Pending { attempts, .. } = entry.state else {
            return Ok(());
        };
        if self.stopping.load(Ordering::SeqCst) {
            return Ok(()); // still pending: sent after the restart
        }
        let now = unix_now();
        // A STOP may have come in while this waited for its slot.
        let scope = consent_scope(entry.messaging_service_sid.as_deref(), &entry.from);
        if self
            .store()
            .opt_out(scope, &entry.to)?
            .is_some_and(|o| o.opted_out)
        {
            let epoch = self.store().epoch();
            let skipped = OutboxState::Skipped {
                reason: "opted_out".into(),
                at: now,
            };
            if self
                .store()
                .update_outbound(&entry.key, &entry.state, skipped)?
                .is_some()
            {
                self.metrics.outbound(Outbound::Skipped);
            }
            return self.store().flush(epoch).await;
        }
        let sending = OutboxState::Sending {
            since: now,
            attempts: attempts + 1,
        };
        let epoch = self.store().epoch();
        let Some(entry) =
            self.store()
                .update_outbound(&entry.key, &entry.state, sending.clone())?
        else {
            return Ok(()); // changed meanwhile: not ours to send
        };
        // On disk before the request leaves, even with relaxed durability:
        // a crash after this point can never send it a second time.
        if let Err(e) = self.store().flush_durable(epoch).await {
            // Not durably claimed: do not send; put it back.
            let back = OutboxState::Pending {
                not_before: now + 1,
                attempts,
            };
            let _ = self.store().update_outbound(&entry.key, &sending, back);
            return Err(e);
        }

        let callback = self.callback_url(&entry);
        let message = NewMessage {
            to: &entry.to,
            from: &entry.from,
            messaging_service_sid: entry.messaging_service_sid.as_deref(),
            body: &entry.body,
            media: &entry.media,
            status_callback: Some(&callback),
        };
        let started = Instant::now();
        let answer = self.client.send(&message).await;
        self.metrics.observe_send(started.elapsed());

        let now = unix_now();
        let attempts = attempts + 1;
        let service = entry.messaging_service_sid.as_deref();
        let scope = consent_scope(service, &entry.from);
        let epoch = self.store().epoch();
        let (next, outcome) = match &answer {
            Answer::Accepted { sid, .. } => (
                OutboxState::Sent {
                    sid: sid.clone(),
                    at: now,
                },
                Outbound::Sent,
            ),
            Answer::Refused {
                http,
                code,
                message,
                ..
            } if retryable(*http, *code) => {
                tracing::warn!(key = %short(&entry.key), http, code, message = %short(message), attempts, "Twilio refused the message for now");
                self.retry_or_fail(&entry, attempts, *code, message, now)
            }
            Answer::Refused { code, message, .. } => {
                tracing::warn!(key = %short(&entry.key), code, message = %short(message), "Twilio refused the message");
                (
                    OutboxState::Failed {
                        code: *code,
                        reason: message.clone(),
                        at: now,
                    },
                    Outbound::Failed,
                )
            }
            Answer::NotSent(reason) => {
                tracing::warn!(key = %short(&entry.key), reason = %short(reason), attempts, "could not reach Twilio");
                self.retry_or_fail(&entry, attempts, None, reason, now)
            }
            Answer::Ambiguous(reason) => {
                tracing::error!(
                    key = %short(&entry.key),
                    reason = %short(reason),
                    "outbound message state unknown: the request may have reached Twilio; \
                     not sent again (at most once)"
                );
                (
                    OutboxState::Unknown {
                        reason: reason.clone(),
                        at: now,
                    },
                    Outbound::Unknown,
                )
            }
        };
        self.store().update_outbound(&entry.key, &sending, next)?;
        self.metrics.outbound(outcome);
        match &answer {
            Answer::Accepted { sid, status } => {
                tracing::info!(key = %short(&entry.key), message_sid = %sid, cause = %entry.cause, "outbound message sent");
                let status = status.parse().unwrap_or(MessageStatus::Queued);
                self.store().record_status(
                    sid,
                    &DeliveryStatus {
                        status: status.as_str().to_owned(),
                        rank: status.rank(),
                        error_code: None,
                        to: Some(entry.to.clone()),
                        from: Some(entry.from.clone()),
                        updated_at: now,
                        inbound_sid: None,
                        flow: entry.flow.clone(),
                        step: entry.step.clone(),
                    },
                )?;
                self.pipeline
                    .loop_guard()
                    .record(&ConvKey::new(entry.from.clone(), entry.to.clone()), now);
            }
            // Twilio has the recipient opted out: so do we, as the
            // status-callback path does.
            Answer::Refused {
                code: Some(21610), ..
            } if !self
                .store()
                .opt_out(scope, &entry.to)?
                .is_some_and(|o| o.opted_out) =>
            {
                tracing::info!(key = %short(&entry.key), "error 21610: recipient opted out at Twilio");
                self.store().record_consent(&consent_change(
                    scope,
                    &entry.to,
                    true,
                    "error 21610",
                    &format!("outbox:{}", entry.key),
                    now,
                ))?;
            }
            _ => {}
        }
        self.store().flush(epoch).await
    }

    fn retry_or_fail(
        &self,
        entry: &OutboxEntry,
        attempts: u32,
        code: Option<u32>,
        reason: &str,
        now: i64,
    ) -> (OutboxState, Outbound) {
        if attempts >= MAX_ATTEMPTS {
            return (
                OutboxState::Failed {
                    code,
                    reason: format!("gave up after {attempts} attempts: {reason}"),
                    at: now,
                },
                Outbound::Failed,
            );
        }
        (
            OutboxState::Pending {
                not_before: now + backoff_secs(&entry.key, attempts),
                attempts,
            },
            Outbound::Retried,
        )
    }

    /// Our `/twilio/status`, tagged with the flow, step and outbox key so
    /// the delivery record is linked (as replies' callbacks are).
    fn callback_url(&self, entry: &OutboxEntry) -> String {
        let mut tags = Vec::new();
        if let Some(flow) = &entry.flow {
            tags.push(("flow".to_owned(), flow.clone()));
        }
        if let Some(step) = &entry.step {
            tags.push(("step".to_owned(), step.clone()));
        }
        tags.push(("outbox".to_owned(), entry.key.clone()));
        let base = &self.status_url;
        let sep = if base.contains('?') { '&' } else { '?' };
        format!("{base}{sep}{}", crate::twilio::encode_form(&tags))
    }
}

/// `s` with phone numbers (runs of 7 or more digits) shortened to their
/// last 4 digits: keys and Twilio's messages name recipients, and logs
/// carry no full numbers.
fn short(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut digits = String::new();
    let flush = |digits: &mut String, out: &mut String| {
        if digits.len() >= 7 {
            out.push('…');
            out.push_str(&digits[digits.len() - 4..]);
        } else {
            out.push_str(digits);
        }
        digits.clear();
    };
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
        } else {
            flush(&mut digits, &mut out);
            out.push(c);
        }
    }
    flush(&mut digits, &mut out);
    out
}

fn not_before_of(state: &OutboxState) -> i64 {
    match state {
        OutboxState::Pending { not_before, .. } => *not_before,
        _ => i64::MIN,
    }
}

/// Refusals Twilio documents as not processed, safe to try again: too
/// many requests (429, 20429), the sending number's queue is full (21611:
/// over 10 hours of messages queued), its own failures (5xx), and
/// credentials it did not accept (401/403, 20003: an operator can fix
/// them meanwhile).
fn retryable(http: u16, code: Option<u32>) -> bool {
    matches!(code, Some(20429 | 21611)) || matches!(http, 401 | 403 | 429 | 500..)
}

/// Exponential backoff with jitter: attempt n waits between half of and
/// the whole of 2^(n-1) seconds, at most five minutes, at least one second.
/// Also the retry schedule of flows' after-answer calls (`call_jobs.rs`).
pub(crate) fn backoff_secs(key: &str, attempts: u32) -> i64 {
    let full = (1_i64 << attempts.saturating_sub(1).min(16)).min(MAX_BACKOFF_SECS);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write(key.as_bytes());
    h.write_u32(attempts);
    let jitter = (h.finish() % (full as u64 / 2 + 1)) as i64;
    (full - full / 2 + jitter).clamp(1, MAX_BACKOFF_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logged_keys_carry_no_full_numbers() {
        assert_eq!(
            short("timeout:+15550001111:+15551230001:appointment/confirm:1700000000:0"),
            "timeout:+…1111:+…0001:appointment/confirm:…0000:0"
        );
        assert_eq!(short("r12"), "r12");
    }

    #[test]
    fn backoff_grows_with_jitter_and_a_cap() {
        for attempts in 1..=12 {
            let full = (1_i64 << (attempts - 1)).min(MAX_BACKOFF_SECS);
            for _ in 0..20 {
                let b = backoff_secs("k", attempts);
                assert!(
                    b >= (full / 2).max(1) && b <= full.max(1),
                    "{attempts}: {b}"
                );
            }
        }
    }

    #[test]
    fn pacing_spaces_one_number_and_keeps_a_reserved_slot() {
        let mut p = Pacing::default();
        assert_eq!(p.slot("a", "+1", 10_000, 1000), 10_000);
        assert_eq!(p.slot("b", "+1", 10_000, 1000), 11_000);
        let c = p.slot("c", "+1", 10_000, 1000);
        assert_eq!(c, 12_000);
        p.reserve("c", c);
        assert_eq!(p.slot("d", "+2", 10_000, 1000), 10_000);
        // When c comes back it keeps its slot rather than taking 13_000.
        assert_eq!(p.slot("c", "+1", 12_000, 1000), 12_000);
        assert_eq!(p.slot("e", "+1", 12_000, 1000), 13_000);
    }

    #[test]
    fn only_refusals_twilio_did_not_process_are_retried() {
        assert!(retryable(429, Some(20429)));
        assert!(retryable(503, None));
        assert!(retryable(401, Some(20003)));
        assert!(retryable(400, Some(21611)));
        assert!(!retryable(400, Some(21610)));
        assert!(!retryable(400, Some(21211)));
    }
}
