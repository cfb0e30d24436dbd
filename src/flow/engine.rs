//! The step function: (flow set, conversation, inbound message, now) ->
//! (outcome, new conversation, events).
//!
//! Pure and total: no IO, no clock (the caller passes `now` in unix
//! seconds), no panics on any input. The caller owns persistence, dedupe,
//! opt-outs and the wire format; this module does not know Twilio (beyond
//! its message limits), HTTP or the store. Because the function is pure, a
//! caller can retry it in a compare-and-swap loop without side effects.
//!
//! Rhai (script flows, `when:`, `{{= }}`) runs synchronously through the
//! set's sandbox, within one wall-clock budget per message (the sandbox's
//! monotonic timer, not a clock the flow can see). Any script error turns
//! the whole message into the failing flow's fallback: the conversation
//! comes back exactly as it came in, and an [`Event::ScriptError`] says why.
//!
//! At about 900 lines this file is longer than most, on purpose: after the
//! public types comes one state machine, `Exec`, whose methods call one
//! another in the order a message is handled (resume, new message, steps,
//! scripts, render, finish). Kept in one file, that order reads top to
//! bottom; its tests are in tests/flow_engine.rs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::calls::{
    self, BodySpec, Call, CallRequest, CallResponse, HeaderSpec, HeaderValue, JsonSpec,
};
use super::matcher::{normalize, route_match, starts_with_phrase, words, RouteMatch};
use super::model::{
    Assign, Flow, FlowSet, KeywordRule, Matcher, Message, Next, Scope, SetInner, Step, Timeout,
    Transition,
};
use super::script::{
    Expr, ExprContext, MessageBudget, Sandbox, ScriptError, ScriptInput, ScriptOutput, StateIn,
    ENTRY_POINT, MAX_MEDIA,
};
use super::template::{Template, Var, Vars};
// Twilio's message limits are defined once, in `twilio::limits`; long
// replies are split exactly as the renderer splits them.
use crate::twilio::{limits, twiml};

mod start;
pub use start::{live_run, start_flow, start_flow_with_calls, Start};

/// The run variable a script flow's `state` map is kept in, as JSON text.
/// YAML flows cannot name it (`$` is not allowed in variable names), and
/// keeping it in `vars` means stored conversations keep their shape.
pub const SCRIPT_STATE_VAR: &str = "$state";

/// At most this many replies per inbound message (Twilio's TwiML limit),
/// the parts of a split reply included.
pub const MAX_REPLIES: usize = limits::MAX_MESSAGES;
/// At most this many step entries per inbound message: a runtime guard
/// against `goto` loops that `check` did not catch.
pub const MAX_TRANSITIONS: u32 = 50;
/// Longest message body, in characters (Twilio's limit), both ways: a
/// longer reply is split at whitespace into several messages
/// ([`twiml::split_body`]), and an inbound body longer than this (only a
/// forged request can carry one) is cut to it before any flow or script
/// sees it.
pub const MAX_BODY_CHARS: usize = limits::MAX_BODY_CHARS;

/// One inbound message, as the caller parsed it.
#[derive(Clone, Copy, Debug)]
pub struct Inbound<'a> {
    /// The sender's number.
    pub from: &'a str,
    /// Our number that received the message.
    pub to: &'a str,
    /// The message text, as received.
    pub body: &'a str,
    /// Media URLs attached to the message.
    pub media: &'a [String],
    /// Twilio's id of the message.
    pub message_sid: &'a str,
}

/// One outgoing message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reply {
    /// The message text.
    pub body: String,
    /// Media URLs to attach.
    pub media: Vec<String>,
    /// The flow step that said it; `None` for a keyword's or the
    /// `default:` reply (and for a message read back from TwiML). One
    /// answer can hold messages of several steps and flows.
    pub origin: Option<StepRef>,
}

/// A step of a flow (`on_message` for a script flow).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepRef {
    /// The flow's name.
    pub flow: String,
    /// The step's name within the flow.
    pub step: String,
}

/// What to answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// One to ten messages, in order.
    Reply(Vec<Reply>),
    /// Answer with nothing, for a reason worth logging and counting.
    Silence(SilenceReason),
}

/// Why the bot stays silent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SilenceReason {
    /// Nothing matched and there is no `default:` reply.
    NoMatch,
    /// A flow said `silence: reason`.
    FlowChose(String),
    /// A step ran but produced no message (e.g. a step with only `wait`).
    EmptyReply,
    /// A script or expression failed and the flow's fallback is silence.
    ScriptError,
}

impl SilenceReason {
    /// Short snake_case label for metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            SilenceReason::NoMatch => "no_match",
            SilenceReason::FlowChose(_) => "flow",
            SilenceReason::EmptyReply => "empty",
            SilenceReason::ScriptError => "script_error",
        }
    }
}

/// Everything the engine remembers about one (our number, sender) pair.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    /// Contact fields: persist across runs.
    pub contact: BTreeMap<String, String>,
    /// The flow run waiting for this sender's next message, if any.
    pub run: Option<Run>,
    /// Flow starts waiting for the run to end (`if_busy: queue`), oldest
    /// first. The engine carries them through unchanged; the pipeline
    /// starts the first when no run is live ([`next_due`] makes it due).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queued: Vec<QueuedStart>,
}

impl Conversation {
    /// Whether nothing is running or waiting to run: no live run and no
    /// queued start. Only such a conversation is stored as ended (and may
    /// be purged once idle past `retention_days`).
    pub fn is_idle(&self) -> bool {
        self.run.is_none() && self.queued.is_empty()
    }

    /// Whether it is stored as ended when its next due time is `due`:
    /// idle, and nothing due (a campaign event to come keeps it).
    pub fn is_ended(&self, due: Option<i64>) -> bool {
        self.is_idle() && due.is_none()
    }
}

/// A flow start from outside that waits for the conversation's run to
/// end (`if_busy: queue`), kept in the conversation until it starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedStart {
    /// The flow to start.
    pub flow: String,
    /// The start's idempotency key (its messages' outbox keys derive from
    /// it, as a start's do).
    pub key: String,
    /// Contact fields to set before the first step.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, String>,
    /// Run variables the run begins with.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vars: BTreeMap<String, String>,
    /// The Messaging Service to send through, if the request named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messaging_service_sid: Option<String>,
    /// Unix seconds when it was queued.
    pub at: i64,
}

/// A flow in progress, parked at a step that waits for a reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// The flow that is running.
    pub flow: String,
    /// The step it waits at.
    pub step: String,
    /// Run variables: cleared whenever a flow starts.
    pub vars: BTreeMap<String, String>,
    /// Unmatched replies so far at this step.
    pub retries: u32,
    /// Unix seconds when the flow started.
    pub started_at: i64,
    /// Unix seconds of the last message handled in this run.
    pub last_active: i64,
    /// Unix seconds when the run started waiting at `step`: its
    /// `timeout:`s count from here. Entering a step (even the same one
    /// again by `goto`) restarts it; a retry at the step does not.
    pub waiting_since: i64,
    /// The `after` (seconds) of the last of this step's timeouts that
    /// fired, 0 when none has: the next one due is the first with a
    /// larger `after`.
    pub timeouts_fired: i64,
    /// A script flow's pending wakes (`wake_after`): name → due, unix
    /// seconds. A message handled by `on_message` clears them (the script
    /// asks again if it still wants one).
    pub wakes: BTreeMap<String, i64>,
    /// The steps the run entered, in order (a `goto` back to a step
    /// enters it again), at most [`MAX_PATH`] (the earliest dropped
    /// first). Empty for a script flow. Version 3 of the stored
    /// conversation added it; older runs read with their current step.
    pub path: Vec<String>,
}

/// A run's [`Run::path`] keeps at most this many steps: the record is
/// rewritten on every message, so it must not grow without bound.
pub const MAX_PATH: usize = 50;

/// How a flow run ended, as its result records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunEnd {
    /// It reached an end (`end`, `silence:`, a step with nothing after
    /// it, or it went on into another flow), or a script left no state.
    Completed,
    /// It was idle longer than its flow's `expire_after` (noticed at the
    /// contact's next message or at a timer).
    Expired,
    /// An interrupt keyword, or a flow start from outside, ended it.
    Interrupted,
    /// The contact opted out (STOP) while it ran.
    OptedOut,
    /// Its retries ran out without a `give_up` step, or it ran into the
    /// step limit of one message.
    GaveUp,
    /// Its flow or step no longer exists (the flows were edited).
    Stale,
}

impl RunEnd {
    /// The snake_case name used in exports.
    pub fn as_str(self) -> &'static str {
        match self {
            RunEnd::Completed => "completed",
            RunEnd::Expired => "expired",
            RunEnd::Interrupted => "interrupted",
            RunEnd::OptedOut => "opted_out",
            RunEnd::GaveUp => "gave_up",
            RunEnd::Stale => "stale",
        }
    }
}

/// A run that ended while handling one input: what its result records.
#[derive(Clone, Debug, PartialEq)]
pub struct EndedRun {
    /// The run as it was when it ended (its variables and path).
    pub run: Run,
    /// How it ended.
    pub how: RunEnd,
}

impl Run {
    /// A run of `flow` that has just entered `step` at `now`.
    fn entering(flow: &str, step: &str, now: i64) -> Run {
        Run {
            flow: flow.to_owned(),
            step: step.to_owned(),
            vars: BTreeMap::new(),
            retries: 0,
            started_at: now,
            last_active: now,
            waiting_since: now,
            timeouts_fired: 0,
            wakes: BTreeMap::new(),
            path: Vec::new(),
        }
    }

    /// Record that the run entered `step`.
    fn entered(&mut self, step: &str) {
        if self.path.len() >= MAX_PATH {
            self.path.remove(0);
        }
        self.path.push(step.to_owned());
    }
}

/// Operator settings that change how messages are routed.
#[derive(Clone, Debug, Default)]
pub struct EngineOptions {
    /// Whole-message keywords (e.g. `MENU`, `RESTART`) that end any active
    /// run before the message is handled as new. Empty by default: only the
    /// operator knows which words their users may also send as answers.
    pub interrupt_keywords: Vec<String>,
}

/// The result of [`handle`].
#[derive(Clone, Debug, PartialEq)]
pub struct Handled {
    /// What to answer.
    pub outcome: Outcome,
    /// The conversation to store (contact fields and the run, if any).
    pub conversation: Conversation,
    /// The flow that handled the message, if a flow did.
    pub flow: Option<String>,
    /// The last step that ran for this message.
    pub step: Option<String>,
    /// What happened, for the caller's logs and metrics.
    pub events: Vec<Event>,
    /// A `call:` the flow reached without an answer: everything else here
    /// is incomplete and must be dropped. The caller makes the request and
    /// runs the engine again on the same input with the answers so far
    /// ([`handle_with_calls`]).
    pub call: Option<CallRequest>,
    /// `after_answer` calls the flow reached, in order: not made by the
    /// engine's caller but recorded as durable jobs with the state change
    /// and made after the answer (see `crate::call_jobs`).
    pub after: Vec<CallRequest>,
    /// The runs that ended while handling this input, in order (a run
    /// that goes on into another flow ends as completed, and the new one
    /// may end too). Their results are stored with the state change.
    pub ended: Vec<EndedRun>,
}

/// Notable things that happened while handling a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The active run was idle longer than its flow's `expire_after`.
    Expired {
        /// The flow whose run expired.
        flow: String,
    },
    /// The run's flow or step no longer exists (flows were edited).
    StaleStep {
        /// The run's flow.
        flow: String,
        /// The step it was parked at.
        step: String,
    },
    /// An interrupt keyword ended the active run.
    Interrupted {
        /// The interrupt keyword received.
        keyword: String,
    },
    /// A flow started (trigger, keyword or `flow:`).
    Triggered {
        /// The flow that started.
        flow: String,
    },
    /// More than [`MAX_TRANSITIONS`] steps ran for one message.
    StepLimit {
        /// The flow that was stopped.
        flow: String,
    },
    /// A keyword-file keyword answered.
    Keyword {
        /// The keyword that answered.
        keyword: String,
    },
    /// The `default:` reply answered.
    DefaultReply,
    /// No route matched; the step asked again.
    Retried {
        /// The flow that is running.
        flow: String,
        /// The step that asked again.
        step: String,
        /// Which retry this is (1 for the first).
        attempt: u32,
    },
    /// The retry limit ran out.
    GaveUp {
        /// The flow that gave up.
        flow: String,
        /// The step whose retries ran out.
        step: String,
    },
    /// Replies beyond [`MAX_REPLIES`] were dropped.
    RepliesDropped {
        /// How many replies were dropped.
        count: usize,
    },
    /// A timeout of a waiting step (or a script's wake) came due and ran.
    TimedOut {
        /// The flow of the waiting run.
        flow: String,
        /// The step that was waiting (`on_message` for a script flow).
        step: String,
        /// Which timeout: its `after` as written in seconds (`7200`), or
        /// the wake's name for a script flow.
        timeout: String,
        /// When the step started waiting (unix seconds; for a script's
        /// wake, when the wake was due); with the rest, this names the
        /// firing uniquely (the outbox keys its messages by it).
        waiting_since: i64,
    },
    /// A step's `call:` was answered (or failed) and the flow went on.
    Call {
        /// The flow that made the call.
        flow: String,
        /// The step that made it.
        step: String,
        /// The method.
        method: String,
        /// The URL's host.
        host: String,
        /// The HTTP status, when the server answered.
        status: Option<u16>,
        /// Why it failed, when it did (never holds a secret).
        error: Option<String>,
    },
    /// A timer came due but its flow, step, timeout or `on_timeout` no
    /// longer exists (flows were edited): it was dropped, nothing sent.
    StaleTimer {
        /// The run's flow.
        flow: String,
        /// The step it waited at.
        step: String,
    },
    /// A script or Rhai expression failed (error, limit, time budget, or a
    /// return value the engine cannot use): the flow's fallback answered
    /// and the conversation was left as it was. `line` and `column` are 0
    /// when the error has no position.
    ScriptError {
        /// The flow the script belongs to.
        flow: String,
        /// The file the error is in.
        file: PathBuf,
        /// Its line (1-based, 0 when unknown).
        line: usize,
        /// Its column (1-based, 0 when unknown).
        column: usize,
        /// What went wrong.
        message: String,
    },
}

/// Handle one inbound message. Pure and total. A flow that reaches a
/// `call:` stops there ([`Handled::call`]); see [`handle_with_calls`].
pub fn handle(
    set: &FlowSet,
    opts: &EngineOptions,
    conv: Conversation,
    msg: &Inbound<'_>,
    now: i64,
) -> Handled {
    handle_with_calls(set, opts, conv, msg, now, &[])
}

/// [`handle`], given the answers to the first `calls.len()` calls the flow
/// makes for this message, in order. The caller runs it again with one
/// more answer each time [`Handled::call`] asks for a request; because the
/// engine is pure, each run reaches the same calls with the same requests.
pub fn handle_with_calls(
    set: &FlowSet,
    opts: &EngineOptions,
    conv: Conversation,
    msg: &Inbound<'_>,
    now: i64,
    calls: &[CallResponse],
) -> Handled {
    // Twilio sends at most 1,600 characters and 10 media URLs; more can only
    // be forged, and is cut here so that no matcher, variable or script
    // ever holds more than a real message.
    let msg = &Inbound {
        body: prefix_chars(msg.body, MAX_BODY_CHARS),
        media: &msg.media[..msg.media.len().min(MAX_MEDIA)],
        ..*msg
    };
    // Handed back untouched if a script or expression fails.
    let original = set.has_scripts().then(|| conv.clone());
    let mut ex = Exec::new(set, msg, now, conv.contact);
    ex.queued = conv.queued;
    ex.responses = calls;
    let norm = normalize(msg.body);
    let mut run = conv.run;
    if run.is_some() && !norm.is_empty() {
        if let Some(k) = opts
            .interrupt_keywords
            .iter()
            .find(|k| normalize(k) == norm)
        {
            ex.events.push(Event::Interrupted { keyword: k.clone() });
            if let Some(run) = run.take() {
                ex.ended.push(EndedRun {
                    run,
                    how: RunEnd::Interrupted,
                });
            }
        }
    }
    let consumed = match run {
        Some(run) => ex.resume(run),
        None => false,
    };
    if !consumed {
        ex.handle_new(&norm);
    }
    match original {
        Some(original) => ex.finish_or_fall_back(original),
        None => ex.finish(),
    }
}

/// Who a timer belongs to: the conversation's two numbers.
#[derive(Clone, Copy, Debug)]
pub struct Wake<'a> {
    /// The sender's number (the conversation's `From`).
    pub from: &'a str,
    /// Our number (the conversation's `To`).
    pub to: &'a str,
}

/// Run the conversation's timer that is due at `now`: the first of its
/// waiting step's `timeout:`s not yet fired (its messages, then its
/// transition, or keep waiting), or a script flow's earliest due wake
/// (`on_timeout`). Pure and total, like [`handle`]. Templates see the
/// run's variables and an empty message body.
///
/// Nothing runs, and the conversation comes back as it was, when nothing
/// is due yet (an edited `after:` moved the timeout later), or when the
/// timer's flow, step or timeout no longer exists ([`Event::StaleTimer`]).
/// A run idle past its flow's `expire_after` ends ([`Event::Expired`]).
pub fn handle_timeout(set: &FlowSet, conv: Conversation, wake: &Wake<'_>, now: i64) -> Handled {
    handle_timeout_with_calls(set, conv, wake, now, &[])
}

/// [`handle_timeout`], given the answers to the calls made so far (see
/// [`handle_with_calls`]).
pub fn handle_timeout_with_calls(
    set: &FlowSet,
    conv: Conversation,
    wake: &Wake<'_>,
    now: i64,
    calls: &[CallResponse],
) -> Handled {
    let msg = &Inbound {
        from: wake.from,
        to: wake.to,
        body: "",
        media: &[],
        message_sid: "",
    };
    let original = set.has_scripts().then(|| conv.clone());
    let mut ex = Exec::new(set, msg, now, conv.contact);
    ex.queued = conv.queued;
    ex.responses = calls;
    ex.touch = false;
    if let Some(run) = conv.run {
        ex.timeout(run);
    }
    let mut handled = match original {
        Some(original) => ex.finish_or_fall_back(original),
        None => ex.finish(),
    };
    // A failing `on_timeout` leaves the conversation as it was, except
    // that its wake is spent: it must not fire again and again.
    let failed = handled
        .events
        .iter()
        .any(|e| matches!(e, Event::ScriptError { .. }));
    let fired = handled.events.iter().find_map(|e| match e {
        Event::TimedOut { timeout, .. } => Some(timeout.clone()),
        _ => None,
    });
    if let (true, Some(name), Some(run)) = (failed, fired, handled.conversation.run.as_mut()) {
        run.wakes.remove(&name);
    }
    handled
}

/// When the conversation's next timer is due under `set` (unix seconds):
/// the waiting step's next timeout, or a script flow's earliest wake;
/// with a queued start, no later than when the run stops being live
/// ([`live_run`]: at once without a run, else when it expires). `None`
/// when nothing is pending (no run, no timeout left, or the run's flow or
/// step no longer exists, and nothing queued). The store indexes
/// conversations by this time.
pub fn next_due(set: &FlowSet, conv: &Conversation) -> Option<i64> {
    let timer = run_due(set, conv);
    let Some(first) = conv.queued.first() else {
        return timer;
    };
    // A queued start is due when no run is live: now (the time it was
    // queued) without one, else the moment the run expires.
    let free = conv
        .run
        .as_ref()
        .and_then(|run| {
            let flow = set.inner.flows.get(&run.flow)?;
            let step_there = flow.script.is_some() || flow.steps.contains_key(&run.step);
            step_there.then(|| {
                run.last_active
                    .saturating_add(flow.expire_after)
                    .saturating_add(1)
            })
        })
        .unwrap_or(first.at);
    Some(timer.map_or(free, |t| t.min(free)))
}

/// The run's own next timer (see [`next_due`]).
fn run_due(set: &FlowSet, conv: &Conversation) -> Option<i64> {
    let run = conv.run.as_ref()?;
    let flow = set.inner.flows.get(&run.flow)?;
    if flow.script.is_some() {
        return run.wakes.values().min().copied();
    }
    let t = pending_timeout(flow, run)?;
    Some(run.waiting_since.saturating_add(t.after))
}

/// The waiting step's first timeout that has not fired yet.
fn pending_timeout<'f>(flow: &'f Flow, run: &Run) -> Option<&'f Timeout> {
    match &flow.steps.get(&run.step)?.next {
        Next::Wait { timeouts, .. } => timeouts.iter().find(|t| t.after > run.timeouts_fired),
        Next::Go(_) => None,
    }
}

/// Mutable state of one `handle` call.
struct Exec<'a> {
    set: &'a SetInner,
    /// The set's Rhai sandbox, when it has scripts or expressions.
    sandbox: Option<&'a Sandbox>,
    /// Started by the first Rhai evaluation of this message.
    budget: Option<MessageBudget>,
    /// The first script error and the flow it happened in. Once set, no
    /// more Rhai runs and the message gets that flow's fallback.
    failed: Option<(String, ScriptError)>,
    /// The step that was running when `failed` was set.
    failed_at: Option<String>,
    msg: &'a Inbound<'a>,
    now: i64,
    contact: BTreeMap<String, String>,
    run: Option<Run>,
    out: Vec<Reply>,
    dropped: usize,
    events: Vec<Event>,
    /// Captures of the route regex that matched this message.
    captures: Vec<String>,
    transitions: u32,
    silence: Option<String>,
    /// Something (keyword, default, flow) took the message.
    answered: bool,
    flow: Option<String>,
    step: Option<String>,
    /// Whether the run's `last_active` becomes `now`: a message is
    /// activity; a reminder that keeps waiting is not.
    touch: bool,
    /// Answers to this message's calls so far, in order.
    responses: &'a [CallResponse],
    /// Calls reached so far (answered or not).
    calls_reached: usize,
    /// The last answered call's `{{call.*}}` variables.
    call_vars: BTreeMap<String, String>,
    /// The call reached without an answer: the run stops here.
    pending: Option<CallRequest>,
    /// `after_answer` calls reached so far.
    after: Vec<CallRequest>,
    /// The conversation's queued starts, handed back as they came.
    queued: Vec<QueuedStart>,
    /// Runs ended so far (see [`Handled::ended`]).
    ended: Vec<EndedRun>,
}

impl<'a> Exec<'a> {
    fn new(
        set: &'a FlowSet,
        msg: &'a Inbound<'a>,
        now: i64,
        contact: BTreeMap<String, String>,
    ) -> Exec<'a> {
        Exec {
            set: &set.inner,
            sandbox: set.inner.sandbox.as_deref(),
            budget: None,
            failed: None,
            failed_at: None,
            msg,
            now,
            contact,
            run: None,
            out: Vec::new(),
            dropped: 0,
            events: Vec::new(),
            captures: Vec::new(),
            transitions: 0,
            silence: None,
            answered: false,
            flow: None,
            step: None,
            touch: true,
            responses: &[],
            calls_reached: 0,
            call_vars: BTreeMap::new(),
            pending: None,
            after: Vec::new(),
            queued: Vec::new(),
            ended: Vec::new(),
        }
    }

    /// End the current run, if there is one, recording how.
    fn end_run(&mut self, how: RunEnd) {
        if let Some(run) = self.run.take() {
            self.ended.push(EndedRun { run, how });
        }
    }

    /// Record that `run` (already taken out of `self.run`) ended.
    fn ended(&mut self, run: Run, how: RunEnd) {
        self.ended.push(EndedRun { run, how });
    }

    /// Run the timer of `run` that is due (see [`handle_timeout`]).
    fn timeout(&mut self, mut run: Run) {
        let set = self.set;
        let stale = |run: &Run| Event::StaleTimer {
            flow: run.flow.clone(),
            step: run.step.clone(),
        };
        let Some(flow) = set.flows.get(&run.flow) else {
            self.events.push(stale(&run));
            self.run = Some(run);
            return;
        };
        if self.now.saturating_sub(run.last_active) > flow.expire_after {
            self.events.push(Event::Expired {
                flow: run.flow.clone(),
            });
            self.ended(run, RunEnd::Expired);
            return;
        }
        if flow.script.is_some() {
            self.script_timeout(flow, run);
            return;
        }
        let Some(t) = pending_timeout(flow, &run) else {
            self.events.push(stale(&run));
            self.run = Some(run);
            return;
        };
        if run.waiting_since.saturating_add(t.after) > self.now {
            // Not due: an edited `after:` moved it later.
            self.run = Some(run);
            return;
        }
        self.events.push(Event::TimedOut {
            flow: flow.name.clone(),
            step: run.step.clone(),
            timeout: t.after.to_string(),
            waiting_since: run.waiting_since,
        });
        run.timeouts_fired = t.after;
        self.answered = true;
        self.flow = Some(flow.name.clone());
        self.step = Some(run.step.clone());
        self.run = Some(run);
        self.say(&t.say);
        if let Some(then) = &t.then {
            self.touch = true;
            self.transition(flow, then);
        }
    }

    /// A script flow's earliest due wake: `on_timeout(name, state)`.
    fn script_timeout(&mut self, flow: &'a Flow, mut run: Run) {
        let due = run
            .wakes
            .iter()
            .filter(|(_, due)| **due <= self.now)
            .min_by_key(|(name, due)| (**due, (*name).clone()))
            .map(|(name, due)| (name.clone(), *due));
        let Some((name, due)) = due else {
            self.run = Some(run);
            return;
        };
        run.wakes.remove(&name);
        let script = flow.script.as_ref().and_then(|s| s.script.as_ref());
        let Some(script) = script.filter(|s| s.has_on_timeout()) else {
            self.events.push(Event::StaleTimer {
                flow: run.flow.clone(),
                step: run.step.clone(),
            });
            self.run = Some(run);
            return;
        };
        self.events.push(Event::TimedOut {
            flow: flow.name.clone(),
            step: ENTRY_POINT.to_owned(),
            timeout: name.clone(),
            waiting_since: due,
        });
        self.answered = true;
        self.flow = Some(flow.name.clone());
        self.step = Some(ENTRY_POINT.to_owned());
        let state = StateIn::Stored(run.vars.get(SCRIPT_STATE_VAR).map(String::as_str));
        let at = (script.file(), (1, 1));
        let now = self.now;
        let pending = run
            .wakes
            .iter()
            .map(|(n, due)| (n.clone(), due.saturating_sub(now)))
            .collect();
        let Some(mut out) = self.run_in_sandbox(at, |sandbox, input| {
            sandbox.run_timeout(script, &name, input, state, pending)
        }) else {
            // A script error: the caller hands the conversation back as
            // it came in, so nothing ended.
            self.run = None;
            return;
        };
        if self.script_calls(&mut out) {
            return;
        }
        self.script_done(flow, out, (run.started_at, run.last_active));
        if self.run.is_none() {
            self.ended(run, RunEnd::Completed);
        }
    }

    /// Give the message to the waiting run. Returns false when the message
    /// must be handled as new instead (run gone stale, expired, or gave up
    /// without anything to say).
    fn resume(&mut self, mut run: Run) -> bool {
        let set = self.set;
        let script_flow = set
            .flows
            .get(&run.flow)
            .filter(|f| f.script.is_some() && run.step == ENTRY_POINT);
        if let Some(flow) = script_flow {
            if self.now.saturating_sub(run.last_active) > flow.expire_after {
                self.events.push(Event::Expired {
                    flow: run.flow.clone(),
                });
                self.ended(run, RunEnd::Expired);
                return false;
            }
            // Unreadable state (a hand-edited store) starts the script over.
            let state = StateIn::Stored(run.vars.get(SCRIPT_STATE_VAR).map(String::as_str));
            self.run_script(flow, state, run.started_at);
            if self.run.is_none() && self.failed.is_none() {
                // The script left no state: its run is done.
                self.ended(run, RunEnd::Completed);
            }
            return true;
        }
        let found = set.flows.get(&run.flow).and_then(|flow| {
            let step = flow.steps.get(&run.step)?;
            match &step.next {
                Next::Wait { routes, retry, .. } => Some((flow, step, routes, retry)),
                Next::Go(_) => None,
            }
        });
        let Some((flow, step, routes, retry)) = found else {
            self.events.push(Event::StaleStep {
                flow: run.flow.clone(),
                step: run.step.clone(),
            });
            self.ended(run, RunEnd::Stale);
            return false;
        };
        if self.now.saturating_sub(run.last_active) > flow.expire_after {
            self.events.push(Event::Expired {
                flow: run.flow.clone(),
            });
            self.ended(run, RunEnd::Expired);
            return false;
        }
        self.answered = true;
        self.flow = Some(flow.name.clone());
        self.step = Some(run.step.clone());
        let has_media = !self.msg.media.is_empty();
        for route in routes {
            let m = match &route.matcher {
                Matcher::When(expr) => self.when(expr, &run.vars).then(|| RouteMatch {
                    value: self.msg.body.trim().to_owned(),
                    ..RouteMatch::default()
                }),
                matcher => route_match(matcher, self.msg.body, has_media),
            };
            let Some(m) = m else {
                continue;
            };
            for (name, value) in &m.named {
                run.vars.insert(name.clone(), value.clone());
            }
            if let Some(var) = &route.save {
                run.vars.insert(var.clone(), m.value.clone());
            }
            if let Some(field) = &route.contact {
                self.contact.insert(field.clone(), m.value.clone());
            }
            self.captures = m.captures;
            self.run = Some(run);
            self.assign(&route.set);
            self.say(&route.say);
            self.transition(flow, &route.then);
            return true;
        }
        // No route matched: ask again, or give up.
        if run.retries < retry.limit {
            run.retries += 1;
            self.events.push(Event::Retried {
                flow: flow.name.clone(),
                step: run.step.clone(),
                attempt: run.retries,
            });
            self.run = Some(run);
            self.say(retry.say.as_ref().unwrap_or(&step.say));
            return true;
        }
        self.events.push(Event::GaveUp {
            flow: flow.name.clone(),
            step: run.step.clone(),
        });
        self.run = Some(run);
        self.say(&retry.give_up_say);
        match &retry.give_up {
            Some(target) => {
                self.run_steps(flow, &target.name);
                true
            }
            None => {
                self.end_run(RunEnd::GaveUp);
                if retry.give_up_say.is_empty() {
                    // Nothing left to say in this flow: let keywords or the
                    // default reply answer the message instead.
                    self.answered = false;
                    self.flow = None;
                    self.step = None;
                    false
                } else {
                    true
                }
            }
        }
    }

    fn handle_new(&mut self, norm: &str) {
        let set = self.set;
        let to = self.msg.to;
        let ws = words(norm);

        // Tier 1: the whole message is a keyword.
        let whole = best_keyword(set.keywords.iter().filter(|k| k.words == ws), to);
        // Tier 2: the first word(s) are a flow trigger keyword.
        let rule = whole.or_else(|| {
            best_keyword(
                set.keywords
                    .iter()
                    .filter(|k| k.first_word && starts_with_phrase(&ws, &k.words)),
                to,
            )
        });
        if let Some(rule) = rule {
            self.answered = true;
            if rule.flow.is_none() {
                self.events.push(Event::Keyword {
                    keyword: rule.display.clone(),
                });
            }
            self.say(&rule.say);
            if let Some(flow) = &rule.flow {
                self.start_flow(&flow.name);
            }
            return;
        }

        // Tier 3: regex triggers, in file order; scoped ones first.
        let body = self.msg.body.trim();
        let regex = best_scoped(
            set.regex_triggers
                .iter()
                .filter(|t| t.regex.is_match(body))
                .map(|t| (&t.scope, &t.flow)),
            to,
        );
        // Tier 4: catch-all flows.
        let flow =
            regex.or_else(|| best_scoped(set.catch_alls.iter().map(|c| (&c.scope, &c.flow)), to));
        if let Some(flow) = flow {
            self.answered = true;
            self.start_flow(flow);
            return;
        }

        // Tier 5: the default reply.
        if let Some(default) = best_scoped(set.defaults.iter().map(|d| (&d.scope, d)), to) {
            self.answered = true;
            self.events.push(Event::DefaultReply);
            self.say(&default.say);
        }
    }

    fn start_flow(&mut self, name: &str) {
        let Some(flow) = self.set.flows.get(name) else {
            // Validation guarantees flow targets exist; end cleanly anyway.
            self.end_run(RunEnd::Stale);
            return;
        };
        // The run that led here (`then: {flow: …}`) is done.
        self.end_run(RunEnd::Completed);
        self.events.push(Event::Triggered {
            flow: flow.name.clone(),
        });
        if flow.script.is_some() {
            self.run_script(flow, StateIn::Stored(None), self.now);
            return;
        }
        self.run = Some(Run::entering(&flow.name, &flow.start.name, self.now));
        self.run_steps(flow, &flow.start.name);
    }

    fn transition(&mut self, flow: &'a Flow, t: &Transition) {
        match t {
            Transition::Goto(target) => self.run_steps(flow, &target.name),
            Transition::Flow(target) => self.start_flow(&target.name),
            Transition::End => self.end_run(RunEnd::Completed),
            Transition::Silence(reason) => {
                self.end_run(RunEnd::Completed);
                self.silence = Some(reason.clone());
            }
        }
    }

    /// Enter `step` of `flow` and keep going through steps that do not wait.
    fn run_steps(&mut self, flow: &'a Flow, step: &str) {
        let mut flow = flow;
        let mut name = step.to_owned();
        loop {
            self.transitions += 1;
            if self.transitions > MAX_TRANSITIONS {
                self.events.push(Event::StepLimit {
                    flow: flow.name.clone(),
                });
                self.end_run(RunEnd::GaveUp);
                return;
            }
            let Some(step): Option<&'a Step> = flow.steps.get(&name) else {
                self.end_run(RunEnd::Stale);
                return;
            };
            self.flow = Some(flow.name.clone());
            self.step = Some(name.clone());
            if let Some(run) = &mut self.run {
                run.entered(&name);
                run.step.clone_from(&name);
                run.retries = 0;
                run.waiting_since = self.now;
                run.timeouts_fired = 0;
            }
            self.assign(&step.set);
            if let Some(call) = &step.call {
                match self.call(call) {
                    CallNext::Stop => return,
                    CallNext::Goto(target) => {
                        target.clone_into(&mut name);
                        continue;
                    }
                    CallNext::On => {}
                }
            }
            self.say(&step.say);
            match &step.next {
                Next::Wait { .. } => return,
                Next::Go(Transition::Goto(t)) => name.clone_from(&t.name),
                Next::Go(Transition::Flow(t)) => {
                    let Some(next) = self.set.flows.get(&t.name) else {
                        self.end_run(RunEnd::Stale);
                        return;
                    };
                    if next.script.is_some() {
                        self.start_flow(&next.name);
                        return;
                    }
                    self.events.push(Event::Triggered {
                        flow: next.name.clone(),
                    });
                    self.end_run(RunEnd::Completed);
                    self.run = Some(Run::entering(&next.name, &next.start.name, self.now));
                    flow = next;
                    name.clone_from(&next.start.name);
                }
                Next::Go(Transition::End) => {
                    self.end_run(RunEnd::Completed);
                    return;
                }
                Next::Go(Transition::Silence(reason)) => {
                    self.end_run(RunEnd::Completed);
                    self.silence = Some(reason.clone());
                    return;
                }
            }
        }
    }

    fn vars(&self) -> Vars<'_> {
        Vars {
            run: self.run.as_ref().map(|r| &r.vars),
            contact: &self.contact,
            body: self.msg.body,
            from: self.msg.from,
            to: self.msg.to,
            captures: &self.captures,
            call: &self.call_vars,
        }
    }

    /// A step's `call:`: with its answer, save what it says and tell where
    /// to go; without one, render the request and stop the run there.
    fn call(&mut self, call: &'a Call) -> CallNext<'a> {
        if call.after_answer {
            // Made after the answer: recorded, never awaited; the flow
            // goes on as if it had succeeded.
            if self.after.len() < calls::MAX_CALLS_PER_MESSAGE {
                let request = self.call_request(call);
                self.after.push(request);
            }
            return CallNext::On;
        }
        let index = self.calls_reached;
        self.calls_reached += 1;
        let request = self.call_request(call);
        let response = match self.responses.get(index) {
            Some(r) => r.clone(),
            None if index >= calls::MAX_CALLS_PER_MESSAGE => calls::too_many_calls(),
            None => {
                self.pending = Some(request);
                return CallNext::Stop;
            }
        };
        let (status, error) = match &response {
            CallResponse::Answered { status, .. } => (Some(*status), None),
            CallResponse::Failed { error, detail } => (None, Some(format!("{error}: {detail}"))),
        };
        self.events.push(Event::Call {
            flow: request.flow.clone(),
            step: request.step.clone(),
            method: request.method.clone(),
            host: request.host().to_owned(),
            status,
            error,
        });
        self.call_vars = response.vars();
        let target = calls::route(call, &response);
        if target.is_none_or(|t| !call.on_error.as_ref().is_some_and(|e| std::ptr::eq(t, e))) {
            for (var, path) in &call.save {
                let value = self.call_vars.get(path).cloned().unwrap_or_default();
                match var {
                    Var::Contact(field) => {
                        self.contact.insert(field.clone(), value);
                    }
                    Var::Run(name) => {
                        if let Some(run) = &mut self.run {
                            run.vars.insert(name.clone(), value);
                        }
                    }
                    _ => {}
                }
            }
        }
        match target {
            Some(t) => CallNext::Goto(&t.name),
            None => CallNext::On,
        }
    }

    /// The request a call asks for, rendered with this message's variables.
    fn call_request(&mut self, call: &Call) -> CallRequest {
        let url = {
            let no_exprs = &mut |_: &Expr| Ok(String::new());
            if call.url.has_exprs() {
                // `{{= }}` in a URL: render it escaped through the sandbox.
                self.render_escaped(&call.url)
            } else {
                call.url
                    .try_render_escaped(&self.vars(), no_exprs, &calls::percent_encode)
                    .unwrap_or_default()
            }
        };
        let mut headers = Vec::new();
        for (name, spec) in &call.headers {
            let value = match spec {
                HeaderSpec::Text(t) => HeaderValue::Text(self.render(t)),
                HeaderSpec::Secret(var) => HeaderValue::Secret(var.clone()),
            };
            headers.push((name.clone(), value));
        }
        let body = match &call.body {
            BodySpec::None => None,
            BodySpec::Json(spec) => Some((
                "application/json".to_owned(),
                self.render_json(spec).to_string(),
            )),
            BodySpec::Form(fields) => {
                let mut parts = Vec::new();
                for (k, t) in fields {
                    let v = self.render(t);
                    parts.push(format!(
                        "{}={}",
                        calls::percent_encode(k),
                        calls::percent_encode(&v)
                    ));
                }
                Some((
                    "application/x-www-form-urlencoded".to_owned(),
                    parts.join("&"),
                ))
            }
        };
        CallRequest {
            method: call.method.clone(),
            url,
            headers,
            body,
            timeout: std::time::Duration::from_millis(call.timeout_ms),
            flow: self.flow.clone().unwrap_or_default(),
            step: self.step.clone().unwrap_or_default(),
        }
    }

    fn render_json(&mut self, spec: &JsonSpec) -> Value {
        match spec {
            JsonSpec::Literal(v) => v.clone(),
            JsonSpec::Text(t) => Value::String(self.render(t)),
            JsonSpec::List(items) => {
                Value::Array(items.iter().map(|i| self.render_json(i)).collect())
            }
            JsonSpec::Object(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), self.render_json(v)))
                    .collect(),
            ),
        }
    }

    /// A URL template with `{{= }}` expressions: each value is encoded.
    fn render_escaped(&mut self, t: &Template) -> String {
        let (Some(sandbox), None) = (self.sandbox, &self.failed) else {
            return String::new();
        };
        let budget = *self.budget.get_or_insert_with(|| sandbox.message_budget());
        let vars = self
            .run
            .as_ref()
            .map(|r| r.vars.clone())
            .unwrap_or_default();
        let ctx = self.expr_ctx(&vars);
        let result = t.try_render_escaped(
            &self.vars(),
            &mut |expr| {
                if budget.exhausted() {
                    return Err(over_budget(expr.file(), expr.line_column()));
                }
                sandbox.eval_string(expr, &ctx)
            },
            &calls::percent_encode,
        );
        result.unwrap_or_else(|e| {
            self.fail(e);
            String::new()
        })
    }

    /// Runs a script flow's `on_message` for this message. The run lasts
    /// while the script leaves something in `state`; its pending wakes are
    /// replaced by those this call asks for.
    fn run_script(&mut self, flow: &'a Flow, state: StateIn<'_>, started_at: i64) {
        // A set whose script did not compile has an error and is never
        // served; nothing to run.
        let Some(script) = flow.script.as_ref().and_then(|s| s.script.as_ref()) else {
            return;
        };
        self.answered = true;
        self.flow = Some(flow.name.clone());
        self.step = Some(ENTRY_POINT.to_owned());
        let at = (script.file(), (1, 1));
        let Some(mut out) = self.run_in_sandbox(at, |sandbox, input| {
            sandbox.run_script(script, input, state)
        }) else {
            self.run = None;
            return;
        };
        if self.script_calls(&mut out) {
            return;
        }
        self.script_done(flow, out, (started_at, self.now));
    }

    fn script_input(&self) -> ScriptInput<'_> {
        ScriptInput {
            body: self.msg.body,
            from: self.msg.from,
            to: self.msg.to,
            media: self.msg.media,
            message_sid: self.msg.message_sid,
            received_at: self.now,
            contact: &self.contact,
            answers: self.responses.get(self.calls_reached..).unwrap_or_default(),
            call_room: calls::MAX_CALLS_PER_MESSAGE.saturating_sub(self.calls_reached),
        }
    }

    /// The `http()` calls a script run made (events, `after_answer` jobs),
    /// and whether it stopped at one with no answer yet: then the message
    /// stops there too ([`Handled::call`]).
    fn script_calls(&mut self, out: &mut ScriptOutput) -> bool {
        if out.made.is_empty() && out.after.is_empty() && out.call.is_none() {
            return false;
        }
        let flow = self.flow.clone().unwrap_or_default();
        let step = self.step.clone().unwrap_or_default();
        let stamp = |mut r: CallRequest| {
            r.flow.clone_from(&flow);
            r.step.clone_from(&step);
            r
        };
        for (request, response) in std::mem::take(&mut out.made) {
            self.calls_reached += 1;
            let (status, error) = match &response {
                CallResponse::Answered { status, .. } => (Some(*status), None),
                CallResponse::Failed { error, detail } => {
                    (None, Some(format!("{error}: {detail}")))
                }
            };
            self.events.push(Event::Call {
                flow: flow.clone(),
                step: step.clone(),
                method: request.method.clone(),
                host: request.host().to_owned(),
                status,
                error,
            });
        }
        for request in std::mem::take(&mut out.after) {
            if self.after.len() < calls::MAX_CALLS_PER_MESSAGE {
                self.after.push(stamp(request));
            }
        }
        match out.call.take() {
            Some(request) => {
                self.calls_reached += 1;
                self.pending = Some(stamp(request));
                true
            }
            None => false,
        }
    }

    /// What a script run leaves: contact fields, the run (while `state`
    /// holds something, with its start and last activity times) with the
    /// wakes pending after it, and its replies.
    fn script_done(
        &mut self,
        flow: &'a Flow,
        out: ScriptOutput,
        (started_at, last_active): (i64, i64),
    ) {
        self.contact = out.contact;
        let now = self.now;
        let wakes = out
            .wakes
            .into_iter()
            .map(|(name, secs)| (name, now.saturating_add(secs)))
            .collect();
        self.run = (!out.state.is_empty()).then(|| Run {
            vars: BTreeMap::from([(SCRIPT_STATE_VAR.to_owned(), out.state)]),
            started_at,
            last_active,
            wakes,
            ..Run::entering(&flow.name, ENTRY_POINT, self.now)
        });
        if out.silence && self.out.is_empty() {
            self.silence = Some("script returned no reply".to_owned());
        }
        for reply in out.replies {
            self.push(reply.body, reply.media);
        }
    }

    /// Runs `f` in the sandbox, unless an earlier evaluation of this message
    /// failed or the message's time budget is spent (then the error is
    /// located at `at`). A failure is recorded and yields `None`.
    fn rhai<T>(
        &mut self,
        at: (&Path, (usize, usize)),
        f: impl FnOnce(&Sandbox) -> Result<T, ScriptError>,
    ) -> Option<T> {
        let sandbox = self.sandbox_for(at)?;
        f(sandbox).map_err(|e| self.fail(e)).ok()
    }

    /// [`Exec::rhai`] for a script run, which also reads the message
    /// ([`Exec::script_input`], borrowed from `self`).
    fn run_in_sandbox<T>(
        &mut self,
        at: (&Path, (usize, usize)),
        f: impl FnOnce(&Sandbox, &ScriptInput<'_>) -> Result<T, ScriptError>,
    ) -> Option<T> {
        let sandbox = self.sandbox_for(at)?;
        let result = f(sandbox, &self.script_input());
        result.map_err(|e| self.fail(e)).ok()
    }

    /// The sandbox to evaluate in, unless an earlier evaluation of this
    /// message failed or its time budget is spent (then recorded).
    fn sandbox_for(&mut self, at: (&Path, (usize, usize))) -> Option<&'a Sandbox> {
        if self.failed.is_some() {
            return None;
        }
        let sandbox = self.sandbox?;
        let budget = *self.budget.get_or_insert_with(|| sandbox.message_budget());
        if budget.exhausted() {
            self.fail(over_budget(at.0, at.1));
            return None;
        }
        Some(sandbox)
    }

    fn fail(&mut self, err: ScriptError) {
        if self.failed.is_none() {
            self.failed = Some((self.flow.clone().unwrap_or_default(), err));
            self.failed_at.clone_from(&self.step);
        }
    }

    fn expr_ctx(&self, vars: &BTreeMap<String, String>) -> ExprContext {
        ExprContext {
            body: self.msg.body.to_owned(),
            from: self.msg.from.to_owned(),
            to: self.msg.to.to_owned(),
            message_sid: self.msg.message_sid.to_owned(),
            now: self.now,
            vars: vars.clone(),
            contact: self.contact.clone(),
        }
    }

    /// A `when:` condition, seeing the waiting run's variables.
    fn when(&mut self, expr: &Expr, vars: &BTreeMap<String, String>) -> bool {
        let ctx = self.expr_ctx(vars);
        self.rhai((expr.file(), expr.line_column()), |sandbox| {
            sandbox.eval_bool(expr, &ctx)
        })
        .unwrap_or(false)
    }

    /// Renders a template, evaluating its `{{= }}` expressions.
    fn render(&mut self, t: &Template) -> String {
        let no_exprs = &mut |_: &Expr| Ok(String::new());
        if !t.has_exprs() {
            return t.try_render(&self.vars(), no_exprs).unwrap_or_default();
        }
        let (Some(sandbox), None) = (self.sandbox, &self.failed) else {
            return String::new();
        };
        let budget = *self.budget.get_or_insert_with(|| sandbox.message_budget());
        let vars = self
            .run
            .as_ref()
            .map(|r| r.vars.clone())
            .unwrap_or_default();
        let ctx = self.expr_ctx(&vars);
        let result = t.try_render(&self.vars(), &mut |expr| {
            if budget.exhausted() {
                return Err(over_budget(expr.file(), expr.line_column()));
            }
            sandbox.eval_string(expr, &ctx)
        });
        result.unwrap_or_else(|e| {
            self.fail(e);
            String::new()
        })
    }

    fn assign(&mut self, assigns: &[Assign]) {
        for a in assigns {
            let value = self.render(&a.value);
            match &a.target {
                Var::Contact(field) => {
                    self.contact.insert(field.clone(), value);
                }
                Var::Run(var) => {
                    if let Some(run) = &mut self.run {
                        run.vars.insert(var.clone(), value);
                    }
                }
                // Load rejects other targets.
                Var::Message(_) | Var::Match(_) | Var::Call(_) => {}
            }
        }
    }

    fn say(&mut self, messages: &[Message]) {
        for m in messages {
            let body = self.render(&m.text);
            self.push(body, m.media.clone());
        }
    }

    /// Adds a message said by the current step (or by no flow, when none
    /// runs: keywords and the default reply).
    fn push(&mut self, body: String, media: Vec<String>) {
        let origin = step_ref(&self.flow, &self.step);
        for reply in split_reply(body, media, origin) {
            if self.out.len() >= MAX_REPLIES {
                self.dropped += 1;
                continue;
            }
            self.out.push(reply);
        }
    }

    /// Like [`Exec::finish`], unless a script failed: then the failing
    /// flow's fallback answers and `original` is handed back unchanged.
    fn finish_or_fall_back(mut self, original: Conversation) -> Handled {
        let Some((flow, err)) = self.failed.take() else {
            return self.finish();
        };
        let (line, column) = err.line_column().unwrap_or((0, 0));
        self.events.push(Event::ScriptError {
            flow: flow.clone(),
            file: err.file().to_path_buf(),
            line,
            column,
            message: err.message(),
        });
        let fallback = self
            .set
            .flows
            .get(&flow)
            .map(|f| f.fallback.as_slice())
            .unwrap_or_default();
        let vars = Vars {
            run: original
                .run
                .as_ref()
                .filter(|r| r.flow == flow)
                .map(|r| &r.vars),
            contact: &original.contact,
            body: self.msg.body,
            from: self.msg.from,
            to: self.msg.to,
            captures: &[],
            call: &BTreeMap::new(),
        };
        let origin = step_ref(&Some(flow.clone()), &self.failed_at);
        let replies: Vec<Reply> = fallback
            .iter()
            .filter_map(|m| {
                // Load refuses expressions in a fallback.
                let body = m.text.try_render(&vars, &mut |_| Ok(String::new())).ok()?;
                Some(split_reply(body, m.media.clone(), origin.clone()))
            })
            .flatten()
            .take(MAX_REPLIES)
            .collect();
        let outcome = if replies.is_empty() {
            Outcome::Silence(SilenceReason::ScriptError)
        } else {
            Outcome::Reply(replies)
        };
        Handled {
            outcome,
            conversation: original,
            flow: Some(flow),
            step: self.step,
            events: self.events,
            call: None,
            after: Vec::new(),
            // The conversation comes back as it came in: no run ended.
            ended: Vec::new(),
        }
    }

    fn finish(mut self) -> Handled {
        if self.dropped > 0 {
            self.events.push(Event::RepliesDropped {
                count: self.dropped,
            });
        }
        if let Some(run) = self.run.as_mut().filter(|_| self.touch) {
            run.last_active = self.now;
        }
        let outcome = if let Some(reason) = self.silence {
            Outcome::Silence(SilenceReason::FlowChose(reason))
        } else if !self.out.is_empty() {
            Outcome::Reply(self.out)
        } else if self.answered {
            Outcome::Silence(SilenceReason::EmptyReply)
        } else {
            Outcome::Silence(SilenceReason::NoMatch)
        };
        Handled {
            outcome,
            conversation: Conversation {
                contact: self.contact,
                run: self.run,
                queued: self.queued,
            },
            flow: self.flow,
            step: self.step,
            events: self.events,
            after: if self.pending.is_some() {
                Vec::new()
            } else {
                self.after
            },
            ended: if self.pending.is_some() {
                Vec::new()
            } else {
                self.ended
            },
            call: self.pending,
        }
    }
}

/// Where a step goes after its call.
enum CallNext<'a> {
    /// No answer yet: the run stops.
    Stop,
    /// Carry on with the step's `say` and transition.
    On,
    /// To this step (`on_error`, `on_status`).
    Goto(&'a str),
}

/// The messages one reply goes out as: none when it has neither text nor
/// media (Twilio refuses an empty message, so a template that rendered to
/// nothing sends nothing); several when its text is longer than
/// [`MAX_BODY_CHARS`], split at whitespace exactly as the TwiML renderer
/// splits, with the media on the first. Splitting here rather than only
/// in the renderer makes every part count toward [`MAX_REPLIES`] in the
/// engine's own account (events, replies handed to the caller).
fn split_reply(body: String, media: Vec<String>, origin: Option<StepRef>) -> Vec<Reply> {
    if body.chars().count() <= MAX_BODY_CHARS {
        if body.is_empty() && media.is_empty() {
            return Vec::new();
        }
        return vec![Reply {
            body,
            media,
            origin,
        }];
    }
    let mut media = Some(media);
    twiml::split_body(&body, MAX_BODY_CHARS)
        .into_iter()
        .map(|part| Reply {
            body: part,
            media: media.take().unwrap_or_default(),
            origin: origin.clone(),
        })
        .collect()
}

fn step_ref(flow: &Option<String>, step: &Option<String>) -> Option<StepRef> {
    match (flow, step) {
        (Some(flow), Some(step)) => Some(StepRef {
            flow: flow.clone(),
            step: step.clone(),
        }),
        _ => None,
    }
}

/// The first `n` characters of `text`.
fn prefix_chars(text: &str, n: usize) -> &str {
    match text.char_indices().nth(n) {
        Some((cut, _)) => &text[..cut],
        None => text,
    }
}

/// The error for a message whose Rhai has used up its time budget.
fn over_budget(file: &Path, (line, column): (usize, usize)) -> ScriptError {
    ScriptError::Limit {
        file: file.to_path_buf(),
        line,
        column,
        which: "time budget",
    }
}

/// Among matching keyword rules: one scoped to this `To` beats an unscoped
/// one; then the longest keyword; then the first declared.
fn best_keyword<'r>(
    rules: impl Iterator<Item = &'r KeywordRule>,
    to: &str,
) -> Option<&'r KeywordRule> {
    let mut best: Option<(&KeywordRule, bool)> = None;
    for r in rules {
        let Some(scoped) = r.scope.applies(to) else {
            continue;
        };
        let better = match best {
            None => true,
            Some((b, b_scoped)) => (scoped, r.words.len()) > (b_scoped, b.words.len()),
        };
        if better {
            best = Some((r, scoped));
        }
    }
    best.map(|(r, _)| r)
}

/// The first item whose scope names `to`, else the first unscoped one.
fn best_scoped<'r, T>(items: impl Iterator<Item = (&'r Scope, T)>, to: &str) -> Option<T> {
    let mut unscoped = None;
    for (scope, item) in items {
        match scope.applies(to) {
            Some(true) => return Some(item),
            Some(false) if unscoped.is_none() => unscoped = Some(item),
            _ => {}
        }
    }
    unscoped
}
