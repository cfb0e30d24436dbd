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

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::compliance::{ComplianceConfig, Consent, LoopGuard};
use crate::flow::{self, Conversation, EndedRun, EngineOptions, FlowSet, Inbound, Outcome, Reply};
use crate::metrics::Metrics;
use crate::store::{
    AuditRecord, Commit, ConsentChange, ConvKey, DeliveryStatus, Epoch, Forgotten, OptOut,
    Processed, RecentAnswer, RunResult, StateCommit, StatusUpdate, Store, StoreError,
    StoredConversation,
};
use crate::twilio::{self, InboundMessage, OutMessage, StatusCallback};

mod broadcasts;
mod calls;
mod campaigns;
mod contacts;
mod locks;
mod memo;
mod offload;
mod results;
mod starts;
mod timers;
pub use campaigns::Rescheduled;
use locks::KeyLocks;
use memo::DecodeMemo;
use offload::Offload;
pub use timers::{TimerFired, TimerWaker};

/// What the HTTP layer sends back for one inbound webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The TwiML document to answer with.
    pub twiml: String,
    /// `reply` or `silence:<reason>`, for logs.
    pub outcome: String,
    /// True when this MessageSid had been processed before.
    pub duplicate: bool,
}

/// An [`Answer`] together with what the engine decided, for tools that
/// show more than the wire format (the local chat shows the silence reason
/// and the engine's events).
#[derive(Debug, Clone, PartialEq)]
pub struct Detailed {
    /// What goes back on the wire.
    pub answer: Answer,
    /// The replies sent (empty for silence and for duplicates).
    pub replies: Vec<Reply>,
    /// Engine events (empty when no flow ran).
    pub events: Vec<flow::Event>,
    /// Why nothing was sent, if nothing was (never for duplicates).
    pub silence: Option<Silence>,
}

/// An inbound message handled up to its flush (see
/// [`Pipeline::handle_inbound_owned`]).
struct Handled {
    /// The store's epoch when the message was read: the flush must cover
    /// it.
    epoch: Epoch,
    detailed: Detailed,
    /// Call jobs recorded with it.
    jobs: usize,
    /// Its flow and step for the debug line; `None` for a duplicate.
    flow_step: Option<(Option<String>, Option<String>)>,
    /// How many engine events it had.
    events: usize,
}

/// Why a message got no reply: an explicit outcome, logged and counted,
/// never an error. Its [`label`](Silence::label) names it in the metrics
/// (`smsflow_silences_total{reason}`), the message log (`silence:<label>`)
/// and transcripts (`(silence: <label>)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Silence {
    /// A stop word (or Twilio's `OptOutType=STOP`): the sender opts out;
    /// Twilio sends its own confirmation.
    OptOut,
    /// A start word: the sender opts back in (Twilio confirms), or was not
    /// opted out and the word is not one a flow may answer.
    OptIn,
    /// The sender has opted out: nothing is sent until they opt back in.
    OptedOut,
    /// A help word Twilio answers itself (its Advanced Opt-Out said so).
    HelpAnsweredByTwilio,
    /// A help word, and no `help_text` is configured.
    Help,
    /// The loop guard: this conversation got too many replies lately.
    RateLimited,
    /// The flow engine chose silence.
    Flow(flow::SilenceReason),
}

impl Silence {
    /// The short snake_case name of the reason.
    pub fn label(&self) -> &'static str {
        match self {
            Silence::OptOut => "opt_out",
            Silence::OptIn => "opt_in",
            Silence::OptedOut => "opted_out",
            Silence::HelpAnsweredByTwilio => "help_answered_by_twilio",
            Silence::Help => "help",
            Silence::RateLimited => "rate_limited",
            Silence::Flow(reason) => reason.as_str(),
        }
    }

    /// The text a flow gave with an explicit `silence:`.
    pub fn note(&self) -> Option<&str> {
        match self {
            Silence::Flow(flow::SilenceReason::FlowChose(text)) => Some(text),
            _ => None,
        }
    }
}

/// What one message gets, before it is rendered as TwiML.
#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    Reply(Vec<Reply>),
    Silence(Silence),
}

/// The shared, swappable flow set. Every request takes one snapshot with
/// `load()` and uses it throughout, so a reload mid-request is invisible.
pub type SharedFlows = Arc<ArcSwap<FlowSet>>;

/// Behaviour settings of the pipeline (from the server config).
#[derive(Debug, Clone, Default)]
pub struct PipelineOptions {
    /// The flow engine's options.
    pub engine: EngineOptions,
    /// Consent keywords and help text.
    pub compliance: ComplianceConfig,
    /// At most this many replies per conversation within `loop_window_secs`
    /// (0 disables the guard).
    pub loop_max_replies: usize,
    /// The window, in seconds, that `loop_max_replies` counts over.
    pub loop_window_secs: i64,
    /// When set, replies carry `action` and `statusCallback` pointing at
    /// this URL (our `/twilio/status`), tagged with the inbound MessageSid
    /// and the flow and step that produced each.
    pub status_callback_url: Option<String>,
    /// The time all HTTP calls of one message share (`None`: the
    /// default, [`crate::calls::DEFAULT_CALL_BUDGET_MS`]).
    pub call_budget: Option<std::time::Duration>,
    /// Keep the text of inbound messages and of our replies in the
    /// message log (`store_message_text`; off by default).
    pub store_message_text: bool,
    /// Our numbers' time zones, for campaign events of contacts without
    /// a zone field of their own (from the `[[quiet_hours]]` rules).
    pub time_zones: flow::NumberZones,
    /// How late a campaign event may still fire, in seconds (the
    /// sender's `max_late_secs`): an event further in the past when its
    /// field is set, or when the server comes back up, is skipped.
    pub campaign_grace_secs: i64,
}

impl PipelineOptions {
    /// The options the server runs with under `config`: `serve` and the
    /// author tools (`chat`, `test`, `--require-tests`) take them from here,
    /// so a transcript runs with the settings the number will.
    pub fn from_config(config: &crate::config::Config) -> PipelineOptions {
        PipelineOptions {
            engine: EngineOptions {
                interrupt_keywords: config.interrupt_keywords.clone(),
            },
            compliance: config.compliance.clone(),
            loop_max_replies: config.loop_max_replies,
            loop_window_secs: config.loop_window_secs,
            status_callback_url: config
                .track_delivery
                .then(|| format!("{}/twilio/status", config.public_url)),
            call_budget: Some(config.call_budget),
            store_message_text: config.store_message_text,
            time_zones: flow::NumberZones::new(
                config
                    .outbound
                    .quiet_hours
                    .iter()
                    .map(|q| (q.raw().number.as_str(), q.raw().time_zone.as_str())),
            ),
            campaign_grace_secs: config.outbound.max_late.as_secs() as i64,
        }
    }
}

/// Where a delivery callback's reply came from (read from the callback
/// URL's query, which we wrote onto the reply).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplyLink {
    /// The inbound MessageSid the reply answered.
    pub inbound_sid: Option<String>,
    /// The flow that produced the reply.
    pub flow: Option<String>,
    /// The step that produced the reply.
    pub step: Option<String>,
}

/// Turns one verified inbound message into its durable answer, over any
/// [`Store`]: the webhook, `chat`, transcript runs and `--require-tests`
/// all go through [`Pipeline::handle_inbound_detailed`], in these phases:
///
/// 1. **dedupe**: under the conversation's lock, load its record; a
///    MessageSid answered before gets the recorded answer again;
/// 2. **consent**: stop, start and help words are decided here, and an
///    opted-out sender gets nothing; no flow sees them;
/// 3. **loop guard**: too many replies to one conversation lately means
///    silence;
/// 4. **engine**: the flow set's step function (Rhai off the async
///    workers), giving replies or a [`Silence`] and the new conversation;
/// 5. **render**: the TwiML answer, counted;
/// 6. **commit**: conversation, answer and any consent change in one
///    atomic write, then the lock is released;
/// 7. **flush**: the answer is returned only once the commit is durable.
///
/// A due timer goes through the same lock and phases without the inbound
/// ones ([`Pipeline::fire_timer`]): its messages go to the outbox, written
/// before the conversation change they come with.
///
/// Also records delivery callbacks ([`Pipeline::record_status`]), and for
/// the tools seeds and forgets conversations under the same lock.
pub struct Pipeline<S: Store> {
    store: Arc<S>,
    /// The live flow set; each message reads one snapshot of it.
    flows: SharedFlows,
    options: PipelineOptions,
    /// One async lock per conversation in flight: its messages run one at
    /// a time, other conversations never wait.
    locks: KeyLocks,
    /// The conversations this process committed last, decoded (`memo.rs`).
    memo: DecodeMemo,
    /// Replies per conversation in the recent window, in memory only.
    loop_guard: LoopGuard,
    /// Whether Rhai runs inline or off the async worker (`offload.rs`).
    offload: Offload,
    metrics: Arc<Metrics>,
    /// Makes flows' HTTP calls (`call:`); fails them until
    /// [`Pipeline::with_caller`] gives a real one.
    caller: Arc<dyn crate::calls::Caller>,
    /// Told when a commit sets a timer earlier than the one the timer
    /// scheduler sleeps towards, so it wakes up early.
    timers: Arc<TimerWaker>,
    /// Notified after a timer's messages were put in the outbox (and
    /// flushed): the sender waits on it rather than poll. The app hands
    /// it to the sender ([`Pipeline::outbox_waker`]).
    outbox: Arc<tokio::sync::Notify>,
    /// Notified after after-answer call jobs were recorded and made
    /// durable ([`Pipeline::call_jobs_waker`]).
    call_jobs: Arc<tokio::sync::Notify>,
}

/// A conversation's lock, in-process and (PostgreSQL) across processes;
/// released when dropped, the shared one first.
struct ConvGuard {
    _shared: Option<crate::store::ConvLock>,
    local: locks::KeyGuard,
}

/// The locks of a contact's conversations (erasure), in-process and
/// (PostgreSQL) across processes on one session; released when dropped,
/// the shared ones first.
struct ContactGuard {
    _shared: Option<crate::store::ConvLock>,
    _local: Vec<locks::KeyGuard>,
}

/// What the consent phase decided before (or instead of) running a flow.
enum Gate {
    Silence(Silence),
    Help(String),
    Pass,
}

/// What the engine phase (or, without a flow, the gates) decided for one
/// message.
struct Decided {
    verdict: Verdict,
    conversation: Conversation,
    events: Vec<flow::Event>,
    /// The flow and step that answered, for the message log.
    flow: Option<String>,
    step: Option<String>,
    /// `after_answer` calls to record with the state change.
    after: Vec<flow::calls::CallRequest>,
    /// Runs that ended, whose results are stored with the state change.
    ended: Vec<EndedRun>,
}

impl<S: Store> Pipeline<S> {
    /// A pipeline over `store` and the live `flows`, with `options`.
    pub fn new(
        store: Arc<S>,
        flows: SharedFlows,
        options: PipelineOptions,
        metrics: Arc<Metrics>,
    ) -> Self {
        Pipeline {
            store,
            flows,
            loop_guard: LoopGuard::new(options.loop_max_replies, options.loop_window_secs),
            options: PipelineOptions {
                compliance: options.compliance.normalized(),
                ..options
            },
            locks: KeyLocks::default(),
            memo: DecodeMemo::default(),
            offload: Offload::default(),
            metrics,
            timers: Arc::new(TimerWaker::default()),
            outbox: Arc::new(tokio::sync::Notify::new()),
            call_jobs: Arc::new(tokio::sync::Notify::new()),
            caller: calls::no_calls(),
        }
    }

    /// Notified whenever messages were added to the outbox and made
    /// durable (a timer fired and said something): the outbound sender
    /// waits on this between its polls.
    pub fn outbox_waker(&self) -> Arc<tokio::sync::Notify> {
        self.outbox.clone()
    }

    /// What the timer scheduler sleeps on: woken when a commit sets a
    /// timer earlier than the one it waits for.
    pub fn timer_waker(&self) -> Arc<TimerWaker> {
        self.timers.clone()
    }

    /// The store messages are committed to.
    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    pub(crate) fn flows(&self) -> &SharedFlows {
        &self.flows
    }

    pub(crate) fn loop_guard(&self) -> &LoopGuard {
        &self.loop_guard
    }

    /// Take the conversation's lock: this process's first, then, when
    /// the store is shared by several processes (PostgreSQL), the
    /// store's ([`Store::lock_conversation`]). Held until dropped; the
    /// store's conversation writes made meanwhile are fenced by it (they
    /// fail, writing nothing, if the shared lock was lost).
    async fn lock(&self, key: &ConvKey) -> Result<ConvGuard, StoreError> {
        let local = self.locks.lock(key).await;
        let shared = self.store.lock_conversation(key).await?;
        Ok(ConvGuard {
            _shared: shared,
            local,
        })
    }

    /// Handle one verified inbound message at time `now` (unix seconds).
    pub async fn handle_inbound(
        &self,
        msg: &InboundMessage,
        now: i64,
    ) -> Result<Answer, StoreError> {
        Ok(self.handle_inbound_detailed(msg, now).await?.answer)
    }

    /// [`Pipeline::handle_inbound`] for the webhook, which needs nothing
    /// of the message afterwards: the message, and everything handling it
    /// made but the answer, is freed before the wait for the flush. The
    /// task usually resumes on another thread after that wait, and memory
    /// freed by a thread other than the one that allocated it costs the
    /// allocator more (about 3% of the async workers' CPU under the
    /// durable multi-step load went to such frees, `perf record`).
    pub async fn handle_inbound_owned(
        &self,
        msg: InboundMessage,
        now: i64,
    ) -> Result<Answer, StoreError> {
        let mut handled = self.handled(&msg, now).await?;
        drop(msg);
        handled.detailed.replies = Vec::new();
        handled.detailed.events = Vec::new();
        Ok(self.finish(handled).await?.answer)
    }

    /// [`Pipeline::handle_inbound`], also returning the engine's result
    /// (replies, silence, events). Same dedupe, locking, commit and flush:
    /// the HTTP path and the local chat share every phase (see
    /// [`Pipeline`]).
    pub async fn handle_inbound_detailed(
        &self,
        msg: &InboundMessage,
        now: i64,
    ) -> Result<Detailed, StoreError> {
        let handled = self.handled(msg, now).await?;
        self.finish(handled).await
    }

    /// Phase 7, once a message is handled: wait until its state change
    /// is durable, then wake the call job runner if it recorded jobs.
    async fn finish(&self, handled: Handled) -> Result<Detailed, StoreError> {
        self.store.flush(handled.epoch).await?;
        if handled.jobs > 0 {
            self.call_jobs.notify_one();
        }
        if let Some((flow, step)) = &handled.flow_step {
            // Per message only at debug: the message log (`smsflow
            // messages`) is the per-message record, and an info line per
            // message cost about 9% of the server's CPU under load.
            tracing::debug!(
                outcome = %handled.detailed.answer.outcome,
                flow = flow.as_deref().unwrap_or("-"),
                step = step.as_deref().unwrap_or("-"),
                events = handled.events,
                "message handled"
            );
        }
        Ok(handled.detailed)
    }

    /// Phases 1 to 6 of an inbound message: everything but the wait for
    /// the flush.
    async fn handled(&self, msg: &InboundMessage, now: i64) -> Result<Handled, StoreError> {
        let key = ConvKey::new(&msg.to, &msg.from);
        let guard = self.lock(&key).await?;
        // Read before anything the answer depends on: if the store is
        // reopened after a failure in between, the flush below fails
        // rather than acknowledge what may be gone.
        let epoch = self.store.epoch();

        // 1. dedupe. The record holds both the state and the answers given
        // recently, read once under the lock: a retry processed while we
        // waited is seen here.
        let record = self.store.load(&key)?;
        if let Some(done) = record.answer_to(&msg.message_sid) {
            drop(guard);
            // The original may still be waiting for its flush; the replay
            // must not go out before the state it reflects is durable
            // (`finish` waits for it).
            return Ok(Handled {
                epoch,
                detailed: self.duplicate(done),
                jobs: 0,
                flow_step: None,
                events: 0,
            });
        }
        let mut conversation = self.decoded(guard.local.slot(), &key, &record)?;

        // 2. consent, 3. loop guard, 4. engine.
        let (gate, consent, stopped) = self.consent(msg, &mut conversation, now)?;
        let gate = match gate {
            Gate::Pass if self.loop_guard.exceeded(&key, now) => {
                tracing::warn!("loop guard: too many replies to this sender; staying silent");
                Gate::Silence(Silence::RateLimited)
            }
            gate => gate,
        };
        let decided = match gate {
            Gate::Silence(silence) => {
                Decided::without_flow(Verdict::Silence(silence), conversation)
            }
            Gate::Help(text) => Decided::without_flow(
                Verdict::Reply(vec![Reply {
                    body: text,
                    ..Reply::default()
                }]),
                conversation,
            ),
            Gate::Pass => self.run_engine(msg, conversation, now).await,
        };
        let mut ended = decided.ended;
        ended.extend(stopped);
        let results = results::of(&key, &ended, &decided.conversation.contact, now);

        // 5. render, 6. commit.
        let (twiml, outcome) = self.render(&key, &msg.message_sid, &decided.verdict, now);
        let keep_text = self.options.store_message_text;
        let processed = Processed {
            twiml,
            outcome,
            at: now,
            from: msg.from.clone(),
            to: msg.to.clone(),
            flow: decided.flow,
            step: decided.step,
            body: keep_text.then(|| msg.body.clone()),
            replies: match &decided.verdict {
                Verdict::Reply(replies) if keep_text => {
                    replies.iter().map(|r| r.body.clone()).collect()
                }
                _ => Vec::new(),
            },
        };
        let due = self.due_of(&self.flows.load(), &key, &decided.conversation, now);
        // Before the state change: a crash in between leaves the jobs and
        // the message unprocessed, and the retried webhook records the
        // same keys again, which changes nothing.
        let jobs = if decided.after.is_empty() {
            0
        } else {
            self.record_call_jobs(&format!("msg:{}", msg.message_sid), &decided.after, now)?
        };
        let stored = self.commit(
            &key,
            &record,
            &decided.conversation,
            msg,
            &processed,
            (consent, due, &results),
        )?;
        if let Some(bytes) = stored {
            self.memo
                .put(guard.local.slot(), bytes, decided.conversation);
        }
        self.timers.set(due);
        // The next message of this conversation may read the new state now;
        // its own flush covers ours too, and neither is acknowledged before
        // a flush, so releasing before the fsync loses nothing.
        drop(guard);

        // 7. flush: `finish`.
        let (replies, silence) = match decided.verdict {
            Verdict::Reply(replies) => (replies, None),
            Verdict::Silence(silence) => (Vec::new(), Some(silence)),
        };
        Ok(Handled {
            epoch,
            jobs,
            flow_step: Some((processed.flow, processed.step)),
            events: decided.events.len(),
            detailed: Detailed {
                answer: Answer {
                    twiml: processed.twiml,
                    outcome: processed.outcome,
                    duplicate: false,
                },
                replies,
                events: decided.events,
                silence,
            },
        })
    }

    /// The stored conversation, or a fresh one. Never reset silently: a
    /// conversation that does not decode is kept aside first (if that
    /// fails, nothing replaces it and the sender gets 503 until it can be).
    fn conversation_of(
        &self,
        key: &ConvKey,
        record: &StoredConversation,
    ) -> Result<Conversation, StoreError> {
        self.decoded(self.locks.slot(key), key, record)
    }

    /// [`Pipeline::conversation_of`] for a key whose lock slot is known.
    fn decoded(
        &self,
        slot: u64,
        key: &ConvKey,
        record: &StoredConversation,
    ) -> Result<Conversation, StoreError> {
        match &record.conversation {
            Some(bytes) if let Some(c) = self.memo.take(slot, bytes) => Ok(c),
            Some(bytes) => match Conversation::from_stored(bytes) {
                Ok(c) => Ok(c),
                Err(e) => {
                    self.store.keep_aside(key, &format!("conversation: {e}"))?;
                    Ok(Conversation::default())
                }
            },
            None => Ok(Conversation::default()),
        }
    }

    /// Phase 2, consent: stop, start and help words, and an opted-out
    /// sender, decided before any flow runs. A stop or start ends the
    /// conversation's run and returns the consent change to commit.
    fn consent(
        &self,
        msg: &InboundMessage,
        conversation: &mut Conversation,
        now: i64,
    ) -> Result<(Gate, Option<ConsentChange>, Option<EndedRun>), StoreError> {
        let scope = consent_scope(msg.messaging_service_sid.as_deref(), &msg.to);
        let opted_out = self
            .store
            .opt_out(scope, &msg.from)?
            .is_some_and(|o| o.opted_out);
        let mut consent = None;
        let mut stopped = None;
        let change = |opt_out: bool, cause: &str| {
            consent_change(scope, &msg.from, opt_out, cause, &msg.message_sid, now)
        };
        let compliance = &self.options.compliance;
        let gate = match compliance.classify(&msg.body, msg.opt_out_type.as_deref()) {
            Consent::Stop { cause } => {
                // Twilio sends its own confirmation; the conversation ends.
                stopped = conversation.run.take().map(|run| EndedRun {
                    run,
                    how: flow::RunEnd::OptedOut,
                });
                if !opted_out {
                    consent = Some(change(true, &cause));
                    tracing::info!(cause = %cause, "sender opted out");
                }
                Gate::Silence(Silence::OptOut)
            }
            Consent::Start { cause, .. } if opted_out => {
                stopped = conversation.run.take().map(|run| EndedRun {
                    run,
                    how: flow::RunEnd::Interrupted,
                });
                consent = Some(change(false, &cause));
                tracing::info!(cause = %cause, "sender opted back in");
                Gate::Silence(Silence::OptIn)
            }
            Consent::Start {
                only_if_opted_out: false,
                ..
            } => Gate::Silence(Silence::OptIn),
            _ if opted_out => Gate::Silence(Silence::OptedOut),
            Consent::Help {
                twilio_answered: true,
            } => Gate::Silence(Silence::HelpAnsweredByTwilio),
            Consent::Help {
                twilio_answered: false,
            } => match &compliance.help_text {
                Some(text) => Gate::Help(text.clone()),
                None => Gate::Silence(Silence::Help),
            },
            _ => Gate::Pass,
        };
        Ok((gate, consent, stopped))
    }

    /// Run the engine (`f`) for a set that has Rhai (`scripts`) or not.
    /// Rhai runs synchronously for up to its wall-clock budget. On the
    /// multi-thread runtime (the server's) `block_in_place` moves this
    /// worker's other tasks to another thread meanwhile, so a slow script
    /// does not stall unrelated requests; while the set's runs are quick
    /// they run inline instead (`offload.rs` says why). It panics on a
    /// current-thread runtime, where we simply run inline. Messages, timer
    /// firings, flow starts and the call loop all run the engine here.
    pub(crate) fn run_flow<T>(&self, scripts: bool, f: impl FnOnce() -> T) -> T {
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if scripts && multi_thread {
            self.offload.run(f)
        } else {
            f()
        }
    }

    /// Phase 4, engine: run the flow set on the message, log its events.
    async fn run_engine(
        &self,
        msg: &InboundMessage,
        conversation: Conversation,
        now: i64,
    ) -> Decided {
        let flows = self.flows.load_full();
        let media: Vec<String> = msg.media.iter().map(|m| m.url.clone()).collect();
        let inbound = Inbound {
            from: &msg.from,
            to: &msg.to,
            body: &msg.body,
            media: &media,
            message_sid: &msg.message_sid,
        };
        let handled = if flows.has_calls() {
            // A flow may stop at a call: run it again with each answer.
            self.with_calls(flows.has_scripts(), |answers| {
                flow::handle_with_calls(
                    &flows,
                    &self.options.engine,
                    conversation.clone(),
                    &inbound,
                    now,
                    answers,
                )
            })
            .await
        } else {
            self.run_flow(flows.has_scripts(), || {
                flow::handle(&flows, &self.options.engine, conversation, &inbound, now)
            })
        };
        for event in &handled.events {
            self.log_event(event);
        }
        Decided {
            verdict: match handled.outcome {
                Outcome::Reply(replies) => Verdict::Reply(replies),
                Outcome::Silence(reason) => Verdict::Silence(Silence::Flow(reason)),
            },
            conversation: handled.conversation,
            events: handled.events,
            flow: handled.flow,
            step: handled.step,
            after: handled.after,
            ended: handled.ended,
        }
    }

    /// A script error is an error line and a counted metric; ended runs and
    /// dropped timers are worth a line of their own (a dropped timer is
    /// counted too); routine events only at debug (the "message handled"
    /// line counts them).
    fn log_event(&self, event: &flow::Event) {
        match event {
            flow::Event::ScriptError {
                flow,
                file,
                line,
                column,
                message,
            } => {
                Metrics::inc(&self.metrics.script_errors);
                tracing::error!(
                    flow = %flow,
                    file = %file.display(),
                    line,
                    column,
                    error = %message,
                    "script failed; answered with the flow's fallback"
                );
            }
            flow::Event::StaleTimer { flow, step } => {
                Metrics::inc(&self.metrics.timers_stale);
                tracing::info!(event = "stale_timer", flow = %flow, step = %step, "flow event")
            }
            // Fields, not a Debug dump, so a JSON log reader gets `flow`
            // and `step` under the names every other line uses.
            flow::Event::StaleStep { flow, step } => {
                tracing::info!(event = "stale_step", flow = %flow, step = %step, "flow event")
            }
            flow::Event::Expired { flow } => {
                tracing::info!(event = "expired", flow = %flow, "flow event")
            }
            flow::Event::StepLimit { flow } => {
                tracing::info!(event = "step_limit", flow = %flow, "flow event")
            }
            event => tracing::debug!(?event, "flow event"),
        }
    }

    /// Phase 5, render: the TwiML answer and its outcome label ("reply" or
    /// "silence:<reason>"); counts it, and a reply in the loop guard.
    fn render(
        &self,
        key: &ConvKey,
        inbound_sid: &str,
        verdict: &Verdict,
        now: i64,
    ) -> (String, String) {
        match verdict {
            Verdict::Reply(replies) => {
                let out: Vec<OutMessage> = replies
                    .iter()
                    .map(|r| self.out_message(r, inbound_sid))
                    .collect();
                let (twiml, messages) = twilio::render_counted(&out);
                Metrics::add(&self.metrics.replies, messages as u64);
                self.loop_guard.record(key, now);
                (twiml, "reply".to_string())
            }
            Verdict::Silence(silence) => {
                self.metrics.silence(silence.label());
                (
                    twilio::SILENCE.to_string(),
                    format!("silence:{}", silence.label()),
                )
            }
        }
    }

    /// Phase 6, commit: the new conversation, the answer (for retries) and
    /// any consent change, in one atomic write. Not yet durable. Returns
    /// the conversation's stored bytes (`None`: nothing is stored).
    fn commit(
        &self,
        key: &ConvKey,
        record: &StoredConversation,
        conversation: &Conversation,
        msg: &InboundMessage,
        processed: &Processed,
        (consent, due, results): (Option<ConsentChange>, Option<i64>, &[RunResult]),
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let stored = if *conversation == Conversation::default() {
            None
        } else {
            Some(conversation.to_stored())
        };
        let action = consent.as_ref().map(|c| c.audit.action.clone());
        self.store.commit(Commit {
            key,
            recent: &record.recent,
            conversation: stored.as_deref(),
            ended: conversation.is_ended(due),
            message_sid: &msg.message_sid,
            processed,
            consent,
            due,
            results,
        })?;
        if let Some(action) = action {
            self.metrics.consent_change(&action);
        }
        Ok(stored)
    }

    /// The TwiML message for `reply`; with delivery tracking, its callback
    /// URL names the inbound MessageSid and the flow and step that said it
    /// (each message its own: one answer can span several steps and flows).
    fn out_message(&self, reply: &Reply, inbound_sid: &str) -> OutMessage {
        let callback = self.options.status_callback_url.as_ref().map(|base| {
            let mut tags = vec![("inbound".to_string(), inbound_sid.to_string())];
            if let Some(origin) = &reply.origin {
                tags.push(("flow".into(), origin.flow.clone()));
                tags.push(("step".into(), origin.step.clone()));
            }
            let sep = if base.contains('?') { '&' } else { '?' };
            format!("{base}{sep}{}", twilio::encode_form(&tags))
        });
        OutMessage {
            body: reply.body.clone(),
            media: reply.media.clone(),
            // Twilio's `<Message>` reference recommends setting both to the
            // same URL.
            action: callback.clone(),
            status_callback: callback,
            ..OutMessage::default()
        }
    }

    fn duplicate(&self, done: RecentAnswer) -> Detailed {
        Metrics::inc(&self.metrics.duplicates);
        tracing::info!(outcome = %done.outcome, "duplicate MessageSid: replaying the recorded answer");
        Detailed {
            answer: Answer {
                twiml: done.twiml,
                outcome: done.outcome,
                duplicate: true,
            },
            replies: Vec::new(),
            events: Vec::new(),
            silence: None,
        }
    }

    /// Forget the conversation of `key` (contact fields and run), under the
    /// same per-conversation lock as messages, and make that durable.
    /// Returns whether there was one. For tools (`smsflow chat`'s `/reset`);
    /// the webhook never deletes conversations this way.
    pub async fn forget(&self, key: &ConvKey) -> Result<bool, StoreError> {
        let guard = self.lock(key).await?;
        let epoch = self.store.epoch();
        let existed = self.store.delete_conversation(key)?;
        drop(guard);
        self.store.flush(epoch).await?;
        Ok(existed)
    }

    /// Erase everything stored about the contact `number` (see
    /// [`Store::forget_contact`] for what is removed and what is kept),
    /// while the server runs: every conversation of the number is locked
    /// first, as a message of it would be, so a message in flight either
    /// commits before the erasure (and is erased) or runs after it on an
    /// empty conversation; none writes back half a state. Idempotent; the
    /// audit log gets a `forget` record (the number, when and `cause`,
    /// with the counts, never the data). Durable when it returns.
    pub async fn forget_contact(
        &self,
        number: &str,
        cause: &str,
        now: i64,
    ) -> Result<Forgotten, StoreError> {
        // Lock every conversation of the number. One may be created
        // between listing and locking (a message to another number of
        // ours): list again under the locks until nothing is new.
        // Across processes (PostgreSQL) they are locked together, on one
        // session, which the erasure then commits on: fenced by them all.
        let mut keys = self.store.contact_conversations(number)?;
        let guards = loop {
            keys.sort();
            keys.dedup();
            let local = self.locks.lock_all(&keys).await;
            let shared = if keys.is_empty() {
                None
            } else {
                self.store.lock_contact(number, &keys).await?
            };
            let guards = ContactGuard {
                _shared: shared,
                _local: local,
            };
            let now_there = self.store.contact_conversations(number)?;
            if now_there.iter().all(|k| keys.contains(k)) {
                break guards;
            }
            drop(guards);
            keys.extend(now_there);
        };
        let epoch = self.store.epoch();
        let audit = AuditRecord {
            at: now,
            scope: "*".into(),
            number: number.to_owned(),
            action: "forget".into(),
            cause: cause.to_owned(),
            message_sid: String::new(),
        };
        let gone = self.store.forget_contact(number, &audit)?;
        drop(guards);
        self.store.flush_durable(epoch).await?;
        tracing::info!(
            conversations = gone.conversations,
            results = gone.results,
            log_lines = gone.log_lines,
            statuses = gone.statuses,
            outbox = gone.outbox,
            cause,
            "contact forgotten"
        );
        Ok(gone)
    }

    /// Store `conversation` as the state of `key` at time `now`, under the
    /// same per-conversation lock as messages, and make that durable. For
    /// tools (a transcript's seeded state); the webhook changes state only
    /// by handling messages.
    pub async fn seed(
        &self,
        key: &ConvKey,
        conversation: &Conversation,
        now: i64,
    ) -> Result<(), StoreError> {
        let bytes = conversation.to_stored();
        let due = self.due_of(&self.flows.load(), key, conversation, now);
        let guard = self.lock(key).await?;
        let epoch = self.store.epoch();
        let record = self.store.load(key)?;
        self.store.commit_state(StateCommit {
            key,
            conversation: Some(&bytes),
            ended: conversation.is_ended(due),
            due,
            recent: &record.recent,
            at: now,
            results: &[],
        })?;
        drop(guard);
        self.timers.set(due);
        self.store.flush(epoch).await
    }

    /// Record a delivery status callback, keeping the latest status
    /// monotonic. Error 21610 (the recipient has opted out at Twilio) marks
    /// the recipient opted out here too.
    pub async fn record_status(
        &self,
        cb: &StatusCallback,
        link: ReplyLink,
        now: i64,
    ) -> Result<StatusUpdate, StoreError> {
        let status = DeliveryStatus {
            status: cb.status.as_str().to_string(),
            rank: cb.status.rank(),
            error_code: cb.error_code.clone(),
            to: cb.to.clone(),
            from: cb.from.clone(),
            updated_at: now,
            inbound_sid: link.inbound_sid,
            flow: link.flow,
            step: link.step,
        };
        let epoch = self.store.epoch();
        let update = self.store.record_status(&cb.message_sid, &status)?;
        if cb.error_code.as_deref() == Some("21610") {
            if let (Some(to), Some(from)) = (&cb.to, &cb.from) {
                let scope = consent_scope(cb.messaging_service_sid.as_deref(), from);
                if !self.store.opt_out(scope, to)?.is_some_and(|o| o.opted_out) {
                    tracing::info!("error 21610: recipient opted out at Twilio");
                    self.store.record_consent(&consent_change(
                        scope,
                        to,
                        true,
                        "error 21610",
                        &cb.message_sid,
                        now,
                    ))?;
                    self.metrics.consent_change("opt_out");
                }
            }
        }
        self.store.flush(epoch).await?;
        Ok(update)
    }
}

/// A consent state change with its audit record.
pub(crate) fn consent_change(
    scope: &str,
    number: &str,
    opted_out: bool,
    cause: &str,
    message_sid: &str,
    now: i64,
) -> ConsentChange {
    ConsentChange {
        scope: scope.to_string(),
        number: number.to_string(),
        state: OptOut { opted_out, at: now },
        audit: AuditRecord {
            at: now,
            scope: scope.to_string(),
            number: number.to_string(),
            action: if opted_out { "opt_out" } else { "opt_in" }.into(),
            cause: cause.to_string(),
            message_sid: message_sid.to_string(),
        },
    }
}

/// Twilio applies opt-outs per Messaging Service when the number is in one,
/// otherwise per our number.
pub(crate) fn consent_scope<'a>(
    messaging_service_sid: Option<&'a str>,
    our_number: &'a str,
) -> &'a str {
    match messaging_service_sid {
        Some(s) if !s.is_empty() => s,
        _ => our_number,
    }
}

impl Decided {
    /// A verdict reached without running a flow: the conversation as the
    /// gates left it.
    fn without_flow(verdict: Verdict, conversation: Conversation) -> Decided {
        Decided {
            verdict,
            conversation,
            events: Vec::new(),
            flow: None,
            step: None,
            after: Vec::new(),
            ended: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests;
