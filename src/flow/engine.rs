//! The step function: (flow set, conversation, inbound message, now) ->
//! (outcome, new conversation, events).
//!
//! Pure and total: no IO, no clock (the caller passes `now` in unix
//! seconds), no panics on any input. The caller owns persistence, dedupe,
//! opt-outs and the wire format; this module does not know Twilio, HTTP or
//! the store. Because the function is pure, a caller can retry it in a
//! compare-and-swap loop without side effects.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::matcher::{normalize, route_match, starts_with_phrase, words};
use super::model::{
    Assign, Flow, FlowSet, KeywordRule, Message, Next, Scope, SetInner, Step, Transition,
};
use super::template::{Var, Vars};

/// At most this many replies per inbound message (Twilio's TwiML limit).
pub const MAX_REPLIES: usize = 10;
/// At most this many step entries per inbound message: a runtime guard
/// against `goto` loops that `check` did not catch.
pub const MAX_TRANSITIONS: u32 = 50;
/// Longest reply body, in characters (Twilio's limit); longer renders are cut.
pub const MAX_BODY_CHARS: usize = 1600;

/// One inbound message, as the caller parsed it.
#[derive(Clone, Copy, Debug)]
pub struct Inbound<'a> {
    pub from: &'a str,
    pub to: &'a str,
    pub body: &'a str,
    pub media: &'a [String],
    pub message_sid: &'a str,
}

/// One outgoing message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub body: String,
    pub media: Vec<String>,
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
}

impl SilenceReason {
    /// Short snake_case label for metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            SilenceReason::NoMatch => "no_match",
            SilenceReason::FlowChose(_) => "flow",
            SilenceReason::EmptyReply => "empty",
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
}

/// A flow in progress, parked at a step that waits for a reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub flow: String,
    pub step: String,
    /// Run variables: cleared whenever a flow starts.
    pub vars: BTreeMap<String, String>,
    /// Unmatched replies so far at this step.
    pub retries: u32,
    pub started_at: i64,
    pub last_active: i64,
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
    pub outcome: Outcome,
    /// The conversation to store (contact fields and the run, if any).
    pub conversation: Conversation,
    /// The flow that handled the message, if a flow did.
    pub flow: Option<String>,
    /// The last step that ran for this message.
    pub step: Option<String>,
    /// What happened, for the caller's logs and metrics.
    pub events: Vec<Event>,
}

/// Notable things that happened while handling a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The active run was idle longer than its flow's `expire_after`.
    Expired { flow: String },
    /// The run's flow or step no longer exists (flows were edited).
    StaleStep { flow: String, step: String },
    /// An interrupt keyword ended the active run.
    Interrupted { keyword: String },
    /// A flow started (trigger, keyword or `flow:`).
    Triggered { flow: String },
    /// More than [`MAX_TRANSITIONS`] steps ran for one message.
    StepLimit { flow: String },
    /// A keyword-file keyword answered.
    Keyword { keyword: String },
    /// The `default:` reply answered.
    DefaultReply,
    /// No route matched; the step asked again.
    Retried {
        flow: String,
        step: String,
        attempt: u32,
    },
    /// The retry limit ran out.
    GaveUp { flow: String, step: String },
    /// Replies beyond [`MAX_REPLIES`] were dropped.
    RepliesDropped { count: usize },
}

/// Handle one inbound message. Pure and total.
pub fn handle(
    set: &FlowSet,
    opts: &EngineOptions,
    conv: Conversation,
    msg: &Inbound<'_>,
    now: i64,
) -> Handled {
    let mut ex = Exec {
        set: &set.inner,
        msg,
        now,
        contact: conv.contact,
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
    };
    let norm = normalize(msg.body);
    let mut run = conv.run;
    if run.is_some() && !norm.is_empty() {
        if let Some(k) = opts
            .interrupt_keywords
            .iter()
            .find(|k| normalize(k) == norm)
        {
            ex.events.push(Event::Interrupted { keyword: k.clone() });
            run = None;
        }
    }
    let consumed = match run {
        Some(run) => ex.resume(run),
        None => false,
    };
    if !consumed {
        ex.handle_new(&norm);
    }
    ex.finish()
}

/// Mutable state of one `handle` call.
struct Exec<'a> {
    set: &'a SetInner,
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
}

impl<'a> Exec<'a> {
    /// Give the message to the waiting run. Returns false when the message
    /// must be handled as new instead (run gone stale, expired, or gave up
    /// without anything to say).
    fn resume(&mut self, mut run: Run) -> bool {
        let set = self.set;
        let found = set.flows.get(&run.flow).and_then(|flow| {
            let step = flow.steps.get(&run.step)?;
            match &step.next {
                Next::Wait { routes, retry } => Some((flow, step, routes, retry)),
                Next::Go(_) => None,
            }
        });
        let Some((flow, step, routes, retry)) = found else {
            self.events.push(Event::StaleStep {
                flow: run.flow,
                step: run.step,
            });
            return false;
        };
        if self.now.saturating_sub(run.last_active) > flow.expire_after {
            self.events.push(Event::Expired { flow: run.flow });
            return false;
        }
        self.answered = true;
        self.flow = Some(flow.name.clone());
        self.step = Some(run.step.clone());
        let has_media = !self.msg.media.is_empty();
        for route in routes {
            let Some(m) = route_match(&route.matcher, self.msg.body, has_media) else {
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
                self.run = None;
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
            self.run = None;
            return;
        };
        self.events.push(Event::Triggered {
            flow: flow.name.clone(),
        });
        self.run = Some(Run {
            flow: flow.name.clone(),
            step: flow.start.name.clone(),
            vars: BTreeMap::new(),
            retries: 0,
            started_at: self.now,
            last_active: self.now,
        });
        self.run_steps(flow, &flow.start.name);
    }

    fn transition(&mut self, flow: &'a Flow, t: &Transition) {
        match t {
            Transition::Goto(target) => self.run_steps(flow, &target.name),
            Transition::Flow(target) => self.start_flow(&target.name),
            Transition::End => self.run = None,
            Transition::Silence(reason) => {
                self.run = None;
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
                self.run = None;
                return;
            }
            let Some(step): Option<&'a Step> = flow.steps.get(&name) else {
                self.run = None;
                return;
            };
            self.flow = Some(flow.name.clone());
            self.step = Some(name.clone());
            if let Some(run) = &mut self.run {
                run.step.clone_from(&name);
                run.retries = 0;
            }
            self.assign(&step.set);
            self.say(&step.say);
            match &step.next {
                Next::Wait { .. } => return,
                Next::Go(Transition::Goto(t)) => name.clone_from(&t.name),
                Next::Go(Transition::Flow(t)) => {
                    let Some(next) = self.set.flows.get(&t.name) else {
                        self.run = None;
                        return;
                    };
                    self.events.push(Event::Triggered {
                        flow: next.name.clone(),
                    });
                    self.run = Some(Run {
                        flow: next.name.clone(),
                        step: next.start.name.clone(),
                        vars: BTreeMap::new(),
                        retries: 0,
                        started_at: self.now,
                        last_active: self.now,
                    });
                    flow = next;
                    name.clone_from(&next.start.name);
                }
                Next::Go(Transition::End) => {
                    self.run = None;
                    return;
                }
                Next::Go(Transition::Silence(reason)) => {
                    self.run = None;
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
        }
    }

    fn assign(&mut self, assigns: &[Assign]) {
        for a in assigns {
            let value = a.value.render(&self.vars());
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
                Var::Message(_) | Var::Match(_) => {}
            }
        }
    }

    fn say(&mut self, messages: &[Message]) {
        for m in messages {
            let mut body = m.text.render(&self.vars());
            if let Some((cut, _)) = body.char_indices().nth(MAX_BODY_CHARS) {
                body.truncate(cut);
            }
            if body.is_empty() && m.media.is_empty() {
                // Twilio refuses an empty message; a template that rendered
                // to nothing simply sends nothing.
                continue;
            }
            if self.out.len() >= MAX_REPLIES {
                self.dropped += 1;
                continue;
            }
            self.out.push(Reply {
                body,
                media: m.media.clone(),
            });
        }
    }

    fn finish(mut self) -> Handled {
        if self.dropped > 0 {
            self.events.push(Event::RepliesDropped {
                count: self.dropped,
            });
        }
        if let Some(run) = &mut self.run {
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
            },
            flow: self.flow,
            step: self.step,
            events: self.events,
        }
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
