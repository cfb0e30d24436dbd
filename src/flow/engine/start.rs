//! Starting a flow on our own: an operator's start (`POST /flows/{name}/start`,
//! `smsflow start`), not an inbound message. Pure and total, like
//! [`super::handle`]: the caller decides whether a busy conversation may be
//! interrupted, and owns the outbox, the store and the clock.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{Conversation, Event, Exec, Handled, Inbound, Run, Wake};
use crate::flow::FlowSet;

/// What to start, for whom.
#[derive(Clone, Copy, Debug)]
pub struct Start<'a> {
    /// The flow to start (its name).
    pub flow: &'a str,
    /// Contact fields to set before the first step runs (kept after the
    /// run, like `set: { contact.x: … }`).
    pub fields: &'a BTreeMap<String, String>,
    /// Run variables the new run begins with (a script flow's initial
    /// `state`, as strings).
    pub vars: &'a BTreeMap<String, String>,
    /// The conversation: the contact (`from`) and our number (`to`).
    pub wake: Wake<'a>,
}

/// Start `start.flow` in `conv` at `now`: set the contact fields, end any
/// active run, and enter the flow's first step exactly as a trigger would
/// (its `set:` and `say:`, then on through steps that do not wait). What
/// it says is the [`Handled::outcome`]; templates see an empty message
/// body. A flow the set does not have starts nothing (the conversation
/// comes back with only the fields set and no run). A script error gives
/// the flow's fallback and the conversation as it came in.
pub fn start_flow(set: &FlowSet, conv: Conversation, start: &Start<'_>, now: i64) -> Handled {
    start_flow_with_calls(set, conv, start, now, &[])
}

/// [`start_flow`], given the answers to the calls made so far (see
/// [`handle_with_calls`](super::handle_with_calls)): a first step may call.
pub fn start_flow_with_calls(
    set: &FlowSet,
    conv: Conversation,
    start: &Start<'_>,
    now: i64,
    calls: &[crate::flow::calls::CallResponse],
) -> Handled {
    let msg = &Inbound {
        from: start.wake.from,
        to: start.wake.to,
        body: "",
        media: &[],
        message_sid: "",
    };
    let original = set.has_scripts().then(|| conv.clone());
    let mut contact = conv.contact;
    contact.extend(start.fields.iter().map(|(k, v)| (k.clone(), v.clone())));
    let mut ex = Exec::new(set, msg, now, contact);
    ex.responses = calls;
    ex.queued = conv.queued;
    ex.answered = true;
    // The caller decided a busy conversation may be interrupted.
    if let Some(run) = conv.run {
        ex.ended(run, super::RunEnd::Interrupted);
    }
    if let Some(flow) = set.inner.flows.get(start.flow) {
        ex.events.push(Event::Triggered {
            flow: flow.name.clone(),
        });
        if flow.script.is_some() {
            let state: BTreeMap<String, Value> = start
                .vars
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            ex.run_script(flow, (&state).into(), now);
        } else {
            let mut run = Run::entering(&flow.name, &flow.start.name, now);
            run.vars.clone_from(start.vars);
            ex.run = Some(run);
            ex.run_steps(flow, &flow.start.name);
        }
    }
    match original {
        Some(original) => ex.finish_or_fall_back(original),
        None => ex.finish(),
    }
}

/// The flow of `conv`'s run, when the run is live under `set` at `now`:
/// its flow and step still exist and it has not been idle past the
/// flow's `expire_after` (such a run would end at the next message
/// anyway). What a start's `if_busy` looks at.
pub fn live_run<'c>(set: &FlowSet, conv: &'c Conversation, now: i64) -> Option<&'c str> {
    let run = conv.run.as_ref()?;
    let flow = set.inner.flows.get(&run.flow)?;
    if flow.script.is_none() && !flow.steps.contains_key(&run.step) {
        return None;
    }
    (now.saturating_sub(run.last_active) <= flow.expire_after).then_some(run.flow.as_str())
}
