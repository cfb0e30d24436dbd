//! A read-only outline of one flow: its entries, steps and the routes
//! between them, as plain strings, for diagrams (`smsflow graph`) and other
//! tools that describe a flow without running it.
//!
//! The model types stay private to `flow`; this is the small, stable view
//! of them that other modules get. It knows nothing of any output format
//! (Mermaid, DOT): the `author` module renders outlines.

use super::model::{FlowSet, Matcher, Message, Next, Route, ScriptFlow, Transition};
use super::script::ENTRY_POINT;

/// One flow, described for a diagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outline {
    pub flow: String,
    /// The step a run starts at.
    pub start: String,
    /// What starts this flow, one label each: `keywords: JOIN, SIGNUP`,
    /// `regex: …`, `catch_all`, `keyword HELLO (keywords.yaml)`,
    /// `flow: other`. Empty when nothing does.
    pub entries: Vec<String>,
    /// Steps in file order.
    pub steps: Vec<OutlineStep>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlineStep {
    pub name: String,
    /// The first message's text as written (templates unrendered); `None`
    /// when the step says nothing.
    pub say: Option<String>,
    /// Whether the step waits for a reply (has `wait:` routes).
    pub waits: bool,
    /// Where the step can go, in route order; the retry give-up last
    /// (absent when an `else` route makes retries impossible).
    pub edges: Vec<Edge>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    /// `any_of: skip, later`, `number 13..120`, `else`, `goto`, …
    pub label: String,
    pub to: EdgeTarget,
    /// A retry give-up or a timeout (no reply came) rather than a matched
    /// route or a plain transition: drawn dashed.
    pub retry: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeTarget {
    /// A step of the same flow.
    Step(String),
    /// Another flow (its start step).
    Flow(String),
    /// The conversation ends.
    End,
    /// `silence: reason`: nothing is sent and the conversation ends.
    Silence(String),
    /// The run ends and the same message is handled as new (a retry that
    /// gives up with nothing to say).
    AsNew,
}

impl FlowSet {
    /// The outline of flow `name`, or `None` when the set has no such flow.
    pub(crate) fn outline(&self, name: &str) -> Option<Outline> {
        let set = &self.inner;
        let flow = set.flows.get(name)?;

        let mut entries = Vec::new();
        let triggers: Vec<&str> = set
            .keywords
            .iter()
            .filter(|k| k.first_word && k.flow.as_ref().is_some_and(|t| t.name == name))
            .map(|k| k.display.as_str())
            .collect();
        if !triggers.is_empty() {
            entries.push(format!("keywords: {}", triggers.join(", ")));
        }
        for k in &set.keywords {
            if !k.first_word && k.flow.as_ref().is_some_and(|t| t.name == name) {
                let file = k
                    .origin
                    .file
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default();
                entries.push(format!("keyword {} ({file})", k.display));
            }
        }
        for r in set.regex_triggers.iter().filter(|r| r.flow == name) {
            entries.push(format!("regex: {}", r.regex.as_str()));
        }
        if set.catch_alls.iter().any(|c| c.flow == name) {
            entries.push("catch_all".to_owned());
        }
        for other in set.flows.values().filter(|f| f.name != name) {
            let enters = other.steps.values().any(|s| {
                let mut ts = vec![];
                match &s.next {
                    Next::Go(t) => ts.push(t),
                    Next::Wait {
                        routes, timeouts, ..
                    } => {
                        ts.extend(routes.iter().map(|r| &r.then));
                        ts.extend(timeouts.iter().filter_map(|t| t.then.as_ref()));
                    }
                }
                ts.iter()
                    .any(|t| matches!(t, Transition::Flow(target) if target.name == name))
            });
            if enters {
                entries.push(format!("flow: {}", other.name));
            }
        }

        if let Some(script) = &flow.script {
            return Some(Outline {
                flow: flow.name.clone(),
                start: flow.start.name.clone(),
                entries,
                steps: vec![script_step(script)],
            });
        }

        let mut steps: Vec<_> = flow.steps.iter().collect();
        steps.sort_by_key(|(_, s)| s.pos);
        let steps = steps
            .into_iter()
            .map(|(step_name, step)| {
                let mut edges = Vec::new();
                // A call's failures and status branches leave the step
                // before it says anything; dashed, like retries.
                if let Some(call) = &step.call {
                    if let Some(on_error) = &call.on_error {
                        edges.push(Edge {
                            label: format!("{} {}: on_error", call.method, call.url.source()),
                            to: EdgeTarget::Step(on_error.name.clone()),
                            retry: true,
                        });
                    }
                    for (status, t) in &call.on_status {
                        edges.push(Edge {
                            label: format!("{} {}: {status}", call.method, call.url.source()),
                            to: EdgeTarget::Step(t.name.clone()),
                            retry: true,
                        });
                    }
                }
                let waits = match &step.next {
                    Next::Go(t) => {
                        let (label, to) = transition(t);
                        edges.push(Edge {
                            label: label.to_owned(),
                            to,
                            retry: false,
                        });
                        false
                    }
                    Next::Wait {
                        routes,
                        retry,
                        timeouts,
                    } => {
                        for r in routes {
                            edges.push(Edge {
                                label: route_label(r),
                                to: transition(&r.then).1,
                                retry: false,
                            });
                        }
                        // Timeouts, dashed like retries: no reply came.
                        for t in timeouts {
                            let after = super::load::show_secs(t.after);
                            let (label, to) = match &t.then {
                                Some(then) => (format!("after {after}"), transition(then).1),
                                None => (
                                    format!("after {after}: reminder"),
                                    EdgeTarget::Step(step_name.clone()),
                                ),
                            };
                            edges.push(Edge {
                                label,
                                to,
                                retry: true,
                            });
                        }
                        // With an `else` route every reply matches: no retries.
                        if !routes.iter().any(|r| matches!(r.matcher, Matcher::Else)) {
                            let to = match (&retry.give_up, retry.give_up_say.is_empty()) {
                                (Some(t), _) => EdgeTarget::Step(t.name.clone()),
                                (None, false) => EdgeTarget::End,
                                (None, true) => EdgeTarget::AsNew,
                            };
                            edges.push(Edge {
                                label: format!("retry ×{}, then give up", retry.limit),
                                to,
                                retry: true,
                            });
                        }
                        true
                    }
                };
                OutlineStep {
                    name: step_name.clone(),
                    say: first_say(&step.say),
                    waits,
                    edges,
                }
            })
            .collect();

        Some(Outline {
            flow: flow.name.clone(),
            start: flow.start.name.clone(),
            entries,
            steps,
        })
    }
}

/// A script flow is one step, `on_message`, run for every message of the
/// run; the run goes on while the script leaves something in `state`.
fn script_step(script: &ScriptFlow) -> OutlineStep {
    let file = script
        .script
        .as_ref()
        .and_then(|s| s.file().file_name())
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    OutlineStep {
        name: ENTRY_POINT.to_owned(),
        say: Some(format!("Rhai script {file}")),
        waits: true,
        edges: vec![
            Edge {
                label: "state not empty: next message".to_owned(),
                to: EdgeTarget::Step(ENTRY_POINT.to_owned()),
                retry: false,
            },
            Edge {
                label: "state empty".to_owned(),
                to: EdgeTarget::End,
                retry: false,
            },
        ],
    }
}

fn first_say(say: &[Message]) -> Option<String> {
    let m = say.first()?;
    let text = m.text.source();
    if text.is_empty() && !m.media.is_empty() {
        return Some("[media]".to_owned());
    }
    Some(text)
}

fn transition(t: &Transition) -> (&'static str, EdgeTarget) {
    match t {
        Transition::Goto(target) => ("goto", EdgeTarget::Step(target.name.clone())),
        Transition::Flow(target) => ("flow", EdgeTarget::Flow(target.name.clone())),
        Transition::End => ("end", EdgeTarget::End),
        Transition::Silence(reason) => ("silence", EdgeTarget::Silence(reason.clone())),
    }
}

fn route_label(r: &Route) -> String {
    let phrases = |list: &[Vec<String>]| {
        list.iter()
            .map(|p| p.join(" "))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match &r.matcher {
        Matcher::AnyOf(list) => format!("any_of: {}", phrases(list)),
        Matcher::Exact(list) => format!("exact: {}", list.join(", ")),
        Matcher::Contains(s) => format!("contains: {s}"),
        Matcher::StartsWith(s) => format!("starts_with: {s}"),
        Matcher::Regex(re) => format!("regex: {}", re.as_str()),
        Matcher::Number { min, max, integer } => {
            let what = if *integer { "whole number" } else { "number" };
            match (min, max) {
                (None, None) => what.to_owned(),
                (min, max) => format!(
                    "{what} {}..{}",
                    min.map(|n| n.to_string()).unwrap_or_default(),
                    max.map(|n| n.to_string()).unwrap_or_default()
                ),
            }
        }
        Matcher::Yes => "yes".to_owned(),
        Matcher::No => "no".to_owned(),
        Matcher::Anything => "anything".to_owned(),
        Matcher::Else => "else".to_owned(),
        Matcher::When(_) => "when (Rhai condition)".to_owned(),
    }
}
