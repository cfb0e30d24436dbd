//! Rules that need the whole flow set: targets exist, every step is
//! reachable, waits can be left, no `goto` loop skips every wait, keywords
//! and defaults do not collide, templates only name variables something
//! sets.
//!
//! Works on the model `load` built (positions included) and only adds
//! diagnostics; it does not know YAML or files on disk.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use super::model::{Diagnostic, Flow, Matcher, Message, Next, Pos, SetInner, Severity, Transition};
use super::template::{Template, Var};

fn err(diags: &mut Vec<Diagnostic>, file: &Path, pos: Pos, message: String) {
    diags.push(Diagnostic {
        file: file.to_path_buf(),
        line: pos.line,
        column: pos.column,
        severity: Severity::Error,
        message,
    });
}

fn at(file: &Path, pos: Pos) -> String {
    format!("{}:{}:{}", file.display(), pos.line, pos.column)
}

pub(crate) fn check(set: &SetInner, reserved: &ReservedWords, diags: &mut Vec<Diagnostic>) {
    collisions(set, diags);
    reserved_words(set, reserved, diags);
    invited_reserved_words(set, reserved, diags);
    for flow in set.flows.values() {
        targets(set, flow, diags);
        reachability(flow, diags);
        dead_waits(flow, diags);
    }
    goto_cycles(set, diags);
    variables(set, diags);
}

/// Whole-message words the server acts on before a flow sees them: the
/// consent keywords (STOP/START/HELP classes) and the interrupt keywords,
/// as configured (`stop_keywords`, …, `interrupt_keywords`). `check` warns
/// where a flow waits for one of them.
#[derive(Debug, Clone)]
pub struct ReservedWords {
    /// Opt-out keywords.
    pub stop: Vec<String>,
    /// Opt-in keywords.
    pub start: Vec<String>,
    /// Help keywords.
    pub help: Vec<String>,
    /// End a waiting run; the message is then handled as new, so keyword
    /// replies still see them, but a route never does.
    pub interrupt: Vec<String>,
}

impl Default for ReservedWords {
    /// Twilio's default consent keywords and no interrupt keywords: the
    /// server's defaults.
    fn default() -> Self {
        ReservedWords::new(&crate::compliance::ComplianceConfig::default(), &[])
    }
}

impl ReservedWords {
    /// The reserved words of the consent settings `consent` and the `interrupt` keywords.
    pub fn new(consent: &crate::compliance::ComplianceConfig, interrupt: &[String]) -> Self {
        ReservedWords {
            stop: consent.stop_keywords.clone(),
            start: consent.start_keywords.clone(),
            help: consent.help_keywords.clone(),
            interrupt: interrupt.to_vec(),
        }
    }
}

/// Keywords and answers that the server's consent handling takes before
/// any flow runs (`YES` is left out: flows see it from senders who are not
/// opted out), and answers an interrupt keyword takes from a waiting run. A
/// flow waiting for `quit` would never get it. Warnings, since the lists
/// are configurable.
fn reserved_words(set: &SetInner, lists: &ReservedWords, diags: &mut Vec<Diagnostic>) {
    use super::matcher::normalize;
    let has = |list: &[String], word: &str| {
        let word = normalize(word);
        list.iter().any(|k| normalize(k) == word)
    };
    let consent = |word: &str| -> Option<&'static str> {
        if has(&lists.stop, word) {
            Some("an opt-out keyword")
        } else if has(&lists.start, word) && normalize(word) != "yes" {
            Some("an opt-in keyword")
        } else if has(&lists.help, word) {
            Some("a help keyword")
        } else {
            None
        }
    };
    let mut warn = |file: &Path, pos: Pos, message: String| {
        diags.push(Diagnostic {
            file: file.to_path_buf(),
            line: pos.line,
            column: pos.column,
            severity: Severity::Warning,
            message,
        })
    };
    let taken = |word: &str, what: &str| {
        format!(
            "`{word}` is {what}: the server answers it before any flow runs, \
             so this never sees it (the lists are configurable)"
        )
    };
    for rule in &set.keywords {
        if let [word] = rule.words.as_slice() {
            if let Some(what) = consent(word) {
                warn(
                    &rule.origin.file,
                    rule.origin.pos,
                    taken(&rule.display, what),
                );
            }
        }
    }
    for flow in set.flows.values() {
        for step in flow.steps.values() {
            let Next::Wait { routes, .. } = &step.next else {
                continue;
            };
            for route in routes {
                let words: Vec<&str> = match &route.matcher {
                    Matcher::AnyOf(phrases) => phrases
                        .iter()
                        .filter(|p| p.len() == 1)
                        .map(|p| p[0].as_str())
                        .collect(),
                    Matcher::Exact(list) => list.iter().map(String::as_str).collect(),
                    _ => Vec::new(),
                };
                for word in words {
                    if let Some(what) = consent(word) {
                        warn(&flow.file, step.pos, taken(word, what));
                    } else if has(&lists.interrupt, word) {
                        warn(
                            &flow.file,
                            step.pos,
                            format!(
                                "`{word}` is an interrupt keyword: it ends the run before \
                                 this route sees it (see `interrupt_keywords`)"
                            ),
                        );
                    }
                }
            }
        }
    }
}

/// Replies that invite a consent word as an answer: "Reply YES or CANCEL"
/// opts out every customer who follows it, and the flow never hears back.
/// Offering the word for what the server does with it is fine ("Reply STOP
/// to unsubscribe", "Text HELP for help"); the answer's purpose (`to …`,
/// `for …`, or its sentence when it is the only answer) must say so.
/// Warnings, like [`reserved_words`].
fn invited_reserved_words(set: &SetInner, lists: &ReservedWords, diags: &mut Vec<Diagnostic>) {
    use super::invitations::invitations;
    use super::matcher::normalize;
    let has = |list: &[String], word: &str| list.iter().any(|k| normalize(k) == word);
    let any_of = |purpose: &str, words: &[&str]| {
        let padded = format!(" {purpose} ");
        words.iter().any(|w| padded.contains(&format!(" {w} ")))
    };
    // Words that say the answer is about the messages themselves.
    const MESSAGES: &[&str] = &[
        "message",
        "messages",
        "text",
        "texts",
        "sms",
        "alerts",
        "notifications",
        "reminders",
        "updates",
        "receiving",
        "subscription",
    ];
    let problem = |word: &str, purpose: &str| -> Option<String> {
        // "to stop", "to unsubscribe": the word's own meaning, nothing else.
        let alone = |verbs: &[&str]| {
            purpose
                .strip_prefix("to ")
                .is_some_and(|verb| verbs.contains(&verb))
        };
        let (what, fits, does) = if has(&lists.stop, word) {
            let fits = any_of(purpose, &["unsubscribe", "opt out", "optout", "opt-out"])
                || any_of(purpose, MESSAGES)
                || alone(&["stop", "end", "cancel", "quit", "unsubscribe"]);
            (
                "an opt-out keyword",
                fits,
                "is opted out, and this flow never sees the answer",
            )
        } else if has(&lists.start, word) && word != "yes" {
            let fits = any_of(
                purpose,
                &[
                    "subscribe",
                    "resubscribe",
                    "opt in",
                    "optin",
                    "opt-in",
                    "unstop",
                ],
            ) || any_of(purpose, MESSAGES);
            (
                "an opt-in keyword",
                fits,
                "gets silence, and this flow never sees the answer",
            )
        } else if has(&lists.help, word) {
            let fits = any_of(
                purpose,
                &[
                    "help",
                    "info",
                    "information",
                    "assistance",
                    "support",
                    "options",
                    "more",
                ],
            );
            (
                "a help keyword",
                fits,
                "gets the help text, and this flow never sees the answer",
            )
        } else {
            return None;
        };
        (!fits).then(|| {
            format!(
                "this reply invites `{}` as an answer, but it is {what}: a sender who sends it {does} \
                 (offer another word, or say what it does, like \"Reply STOP to unsubscribe\")",
                word.to_uppercase()
            )
        })
    };
    let mut check = |msgs: &[Message], file: &Path| {
        for m in msgs {
            let mut warned: Vec<String> = Vec::new();
            for inv in invitations(&m.text.source()) {
                if warned.contains(&inv.word) {
                    continue;
                }
                if let Some(message) = problem(&inv.word, &inv.purpose) {
                    warned.push(inv.word);
                    diags.push(Diagnostic {
                        file: file.to_path_buf(),
                        line: m.pos.line,
                        column: m.pos.column,
                        severity: Severity::Warning,
                        message,
                    });
                }
            }
        }
    };
    for rule in &set.keywords {
        check(&rule.say, &rule.origin.file);
    }
    for d in &set.defaults {
        check(&d.say, &d.origin.file);
    }
    for flow in set.flows.values() {
        check(&flow.fallback, &flow.file);
        for step in flow.steps.values() {
            check(&step.say, &flow.file);
            if let Next::Wait {
                routes,
                retry,
                timeouts,
            } = &step.next
            {
                for r in routes {
                    check(&r.say, &flow.file);
                }
                if let Some(say) = &retry.say {
                    check(say, &flow.file);
                }
                check(&retry.give_up_say, &flow.file);
                for t in timeouts {
                    check(&t.say, &flow.file);
                }
            }
        }
    }
}

/// Duplicate keywords, defaults and catch-alls whose numbers overlap.
fn collisions(set: &SetInner, diags: &mut Vec<Diagnostic>) {
    let mut seen: HashMap<&[String], Vec<usize>> = HashMap::new();
    for (i, rule) in set.keywords.iter().enumerate() {
        let earlier = seen.entry(rule.words.as_slice()).or_default();
        if let Some(&j) = earlier
            .iter()
            .find(|&&j| set.keywords[j].scope.conflicts(&rule.scope))
        {
            let first = &set.keywords[j];
            err(
                diags,
                &rule.origin.file,
                rule.origin.pos,
                format!(
                    "keyword `{}` is already used at {} (`{}`)",
                    rule.display,
                    at(&first.origin.file, first.origin.pos),
                    first.display
                ),
            );
        }
        earlier.push(i);
    }
    for (i, d) in set.defaults.iter().enumerate() {
        if let Some(first) = set.defaults[..i]
            .iter()
            .find(|f| f.scope.conflicts(&d.scope))
        {
            err(
                diags,
                &d.origin.file,
                d.origin.pos,
                format!(
                    "more than one `default:` reply for the same numbers (first at {})",
                    at(&first.origin.file, first.origin.pos)
                ),
            );
        }
    }
    for (i, c) in set.catch_alls.iter().enumerate() {
        if let Some(first) = set.catch_alls[..i]
            .iter()
            .find(|f| f.scope.conflicts(&c.scope))
        {
            err(
                diags,
                &c.origin.file,
                c.origin.pos,
                format!(
                    "flow `{}` is a second catch_all for the same numbers (`{}` at {} already is)",
                    c.flow,
                    first.flow,
                    at(&first.origin.file, first.origin.pos)
                ),
            );
        }
    }
    for rule in set.keywords.iter().filter(|r| !r.first_word) {
        if let Some(t) = &rule.flow {
            if !set.flows.contains_key(&t.name) {
                err(
                    diags,
                    &rule.origin.file,
                    t.pos,
                    format!("unknown flow `{}` (flow)", t.name),
                );
            }
        }
    }
}

fn targets(set: &SetInner, flow: &Flow, diags: &mut Vec<Diagnostic>) {
    let file = &flow.file;
    let check_t = |t: &Transition, diags: &mut Vec<Diagnostic>| match t {
        Transition::Goto(s) if !flow.steps.contains_key(&s.name) => err(
            diags,
            file,
            s.pos,
            format!(
                "unknown step `{}` (goto){}",
                s.name,
                suggest(&s.name, flow.steps.keys())
            ),
        ),
        Transition::Flow(f) if !set.flows.contains_key(&f.name) => err(
            diags,
            file,
            f.pos,
            format!(
                "unknown flow `{}` (flow){}",
                f.name,
                suggest(&f.name, set.flows.keys())
            ),
        ),
        _ => {}
    };
    if flow.script.is_none() && !flow.steps.contains_key(&flow.start.name) {
        err(
            diags,
            file,
            flow.start.pos,
            format!("unknown step `{}` (start)", flow.start.name),
        );
    }
    for step in flow.steps.values() {
        if let Some(call) = &step.call {
            let call_targets = call
                .on_error
                .iter()
                .chain(call.on_status.iter().map(|(_, t)| t));
            for t in call_targets {
                if !flow.steps.contains_key(&t.name) {
                    err(
                        diags,
                        file,
                        t.pos,
                        format!(
                            "unknown step `{}` (call){}",
                            t.name,
                            suggest(&t.name, flow.steps.keys())
                        ),
                    );
                }
            }
        }
        match &step.next {
            Next::Go(t) => check_t(t, diags),
            Next::Wait {
                routes,
                retry,
                timeouts,
            } => {
                for r in routes {
                    check_t(&r.then, diags);
                }
                for t in timeouts {
                    if let Some(then) = &t.then {
                        check_t(then, diags);
                    }
                    if t.after > flow.expire_after {
                        err(
                            diags,
                            file,
                            t.pos,
                            format!(
                                "this timeout is due after the run has expired (expire_after {}); \
                                 raise the flow's expire_after or shorten `after`",
                                super::load::show_secs(flow.expire_after)
                            ),
                        );
                    }
                }
                if let Some(g) = &retry.give_up {
                    if !flow.steps.contains_key(&g.name) {
                        err(
                            diags,
                            file,
                            g.pos,
                            format!(
                                "unknown step `{}` (give_up){}",
                                g.name,
                                suggest(&g.name, flow.steps.keys())
                            ),
                        );
                    }
                }
            }
        }
    }
}

/// "; did you mean `age`?" when a name is one edit-ish away.
fn suggest<'a>(name: &str, names: impl Iterator<Item = &'a String>) -> String {
    let lname = name.to_lowercase();
    names
        .filter(|n| {
            let n = n.to_lowercase();
            n.starts_with(&lname) || lname.starts_with(&n)
        })
        .min_by_key(|n| n.len())
        .map(|n| format!("; did you mean `{n}`?"))
        .unwrap_or_default()
}

/// Steps a step can lead to within its flow.
fn successors(step: &super::model::Step) -> Vec<&str> {
    let mut out = Vec::new();
    if let Some(call) = &step.call {
        if let Some(t) = &call.on_error {
            out.push(t.name.as_str());
        }
        out.extend(call.on_status.iter().map(|(_, t)| t.name.as_str()));
    }
    match &step.next {
        Next::Go(Transition::Goto(t)) => out.push(t.name.as_str()),
        Next::Go(_) => {}
        Next::Wait {
            routes,
            retry,
            timeouts,
        } => {
            for r in routes {
                if let Transition::Goto(t) = &r.then {
                    out.push(t.name.as_str());
                }
            }
            for t in timeouts {
                if let Some(Transition::Goto(t)) = &t.then {
                    out.push(t.name.as_str());
                }
            }
            if let Some(g) = &retry.give_up {
                out.push(g.name.as_str());
            }
        }
    }
    out
}

fn reachability(flow: &Flow, diags: &mut Vec<Diagnostic>) {
    if !flow.steps.contains_key(&flow.start.name) {
        return;
    }
    let mut seen = BTreeSet::new();
    let mut todo = vec![flow.start.name.as_str()];
    while let Some(name) = todo.pop() {
        if !seen.insert(name) {
            continue;
        }
        if let Some(step) = flow.steps.get(name) {
            todo.extend(successors(step));
        }
    }
    for (name, step) in &flow.steps {
        if !seen.contains(name.as_str()) {
            err(
                diags,
                &flow.file,
                step.pos,
                format!(
                    "step `{name}` is never reached from the start step `{}`",
                    flow.start.name
                ),
            );
        }
    }
}

/// A waiting step whose every route comes back to it, and which can never
/// give up (an `else` route always matches, or `give_up` is itself), holds
/// the sender until the run expires.
fn dead_waits(flow: &Flow, diags: &mut Vec<Diagnostic>) {
    for (name, step) in &flow.steps {
        let Next::Wait {
            routes,
            retry,
            timeouts,
        } = &step.next
        else {
            continue;
        };
        if routes.is_empty() {
            continue;
        }
        // A timeout that leaves the step is a way out.
        if timeouts.iter().any(|t| {
            t.then
                .as_ref()
                .is_some_and(|then| !matches!(then, Transition::Goto(g) if g.name == *name))
        }) {
            continue;
        }
        let all_loop = routes
            .iter()
            .all(|r| matches!(&r.then, Transition::Goto(t) if t.name == *name));
        let never_gives_up = routes.iter().any(|r| matches!(r.matcher, Matcher::Else))
            || retry.give_up.as_ref().is_some_and(|g| g.name == *name);
        if all_loop && never_gives_up {
            err(
                diags,
                &flow.file,
                step.pos,
                format!("step `{name}` can never be left: every route and the retry give-up come back to it"),
            );
        }
    }
}

/// `goto`/`flow:` chains that come back without a `wait` would loop until
/// the runtime step limit; find them statically.
fn goto_cycles(set: &SetInner, diags: &mut Vec<Diagnostic>) {
    type Key<'a> = (&'a str, &'a str);
    let next = |(f, s): Key<'_>| -> Option<(Key<'_>, Pos)> {
        let flow = set.flows.get(f)?;
        let step = flow.steps.get(s)?;
        match &step.next {
            Next::Go(Transition::Goto(t)) => flow
                .steps
                .contains_key(&t.name)
                .then_some(((flow.name.as_str(), t.name.as_str()), t.pos)),
            Next::Go(Transition::Flow(t)) => {
                let other = set.flows.get(&t.name)?;
                other
                    .steps
                    .contains_key(&other.start.name)
                    .then_some(((other.name.as_str(), other.start.name.as_str()), t.pos))
            }
            _ => None,
        }
    };
    // 0 = unvisited, 1 = on the current path, 2 = finished.
    let mut state: BTreeMap<Key<'_>, u8> = BTreeMap::new();
    for flow in set.flows.values() {
        for sname in flow.steps.keys() {
            let start = (flow.name.as_str(), sname.as_str());
            if state.get(&start).copied().unwrap_or(0) != 0 {
                continue;
            }
            let mut path: Vec<(Key<'_>, Pos)> = Vec::new();
            let mut cur = start;
            loop {
                match state.get(&cur).copied().unwrap_or(0) {
                    0 => {}
                    1 => {
                        if let Some(i) = path.iter().position(|(k, _)| *k == cur) {
                            report_cycle(set, &path[i..], diags);
                        }
                        break;
                    }
                    _ => break,
                }
                state.insert(cur, 1);
                match next(cur) {
                    Some((n, pos)) => {
                        path.push((cur, pos));
                        cur = n;
                    }
                    None => break,
                }
            }
            for (k, _) in &path {
                state.insert(*k, 2);
            }
            state.insert(cur, 2);
        }
    }
}

fn report_cycle(set: &SetInner, cycle: &[((&str, &str), Pos)], diags: &mut Vec<Diagnostic>) {
    let Some(((f0, s0), pos)) = cycle.iter().min_by_key(|(k, _)| *k).copied() else {
        return;
    };
    let one_flow = cycle.iter().all(|((f, _), _)| *f == f0);
    let name = |(f, s): (&str, &str)| {
        if one_flow {
            s.to_owned()
        } else {
            format!("{f}/{s}")
        }
    };
    // Start the printed loop at the reported step.
    let i = cycle.iter().position(|(k, _)| *k == (f0, s0)).unwrap_or(0);
    let mut names: Vec<String> = cycle[i..]
        .iter()
        .chain(&cycle[..i])
        .map(|(k, _)| name(*k))
        .collect();
    names.push(name((f0, s0)));
    if let Some(flow) = set.flows.get(f0) {
        err(
            diags,
            &flow.file,
            pos,
            format!(
                "steps loop without waiting for a reply: {}",
                names.join(" -> ")
            ),
        );
    }
}

/// The contact fields some flow declares (`fields:`) or sets; `None`
/// when a script computes field names, so any field may exist.
pub(crate) fn contact_fields(set: &SetInner) -> Option<BTreeSet<&str>> {
    let mut contact_fields: BTreeSet<&str> = BTreeSet::new();
    // A script that computes field names could set any of them.
    let mut any_contact_field = false;
    for flow in set.flows.values() {
        contact_fields.extend(flow.fields.iter().map(String::as_str));
        if let Some(script) = &flow.script {
            match &script.contact_fields {
                Some(fields) => contact_fields.extend(fields.iter().map(String::as_str)),
                None => any_contact_field = true,
            }
        }
        for step in flow.steps.values() {
            for a in &step.set {
                if let Var::Contact(c) = &a.target {
                    contact_fields.insert(c);
                }
            }
            for (var, _) in step.call.iter().flat_map(|c| &c.save) {
                if let Var::Contact(c) = var {
                    contact_fields.insert(c);
                }
            }
            if let Next::Wait { routes, .. } = &step.next {
                for r in routes {
                    contact_fields.extend(r.contact.as_deref());
                    for a in &r.set {
                        if let Var::Contact(c) = &a.target {
                            contact_fields.insert(c);
                        }
                    }
                }
            }
        }
    }

    (!any_contact_field).then_some(contact_fields)
}

/// Templates may only name run variables their flow sets, contact fields
/// some flow sets, and the built-ins. A fallback (`{{x|friend}}`) does not
/// exempt a name: a typo would otherwise silently always print the fallback.
fn variables(set: &SetInner, diags: &mut Vec<Diagnostic>) {
    let known = contact_fields(set);
    let any_contact_field = known.is_none();
    let contact_fields = known.unwrap_or_default();

    // Flows where a call's answer can be there: those that make a call
    // (an awaited one: an after-answer call sets no `{{call.*}}`), and
    // those another flow enters with `flow:` in the same message.
    let mut after_call: BTreeSet<String> = BTreeSet::new();
    for flow in set.flows.values() {
        let calls = flow
            .steps
            .values()
            .any(|s| s.call.as_ref().is_some_and(|c| !c.after_answer));
        if calls {
            after_call.insert(flow.name.clone());
        }
        for step in flow.steps.values() {
            let mut entered = |t: &Transition| {
                if let Transition::Flow(f) = t {
                    after_call.insert(f.name.clone());
                }
            };
            match &step.next {
                Next::Go(t) => entered(t),
                Next::Wait {
                    routes, timeouts, ..
                } => {
                    routes.iter().for_each(|r| entered(&r.then));
                    timeouts
                        .iter()
                        .filter_map(|t| t.then.as_ref())
                        .for_each(entered);
                }
            }
        }
    }

    let check_template = |t: &Template,
                          pos: Pos,
                          file: &Path,
                          run_vars: Option<(&str, &BTreeSet<String>)>,
                          diags: &mut Vec<Diagnostic>| {
        for var in t.vars() {
            match var {
                Var::Call(path) => match run_vars {
                    Some((flow, _)) if after_call.contains(flow) => {}
                    Some((flow, _)) => err(
                        diags,
                        file,
                        pos,
                        format!("`{{{{call.{path}}}}}`: no step of flow `{flow}` makes a call (`call:` without `after_answer`), so it is always empty"),
                    ),
                    None => err(
                        diags,
                        file,
                        pos,
                        format!("`{{{{call.{path}}}}}`: keyword replies make no calls (use a flow step with `call:`)"),
                    ),
                },
                Var::Run(n) => match run_vars {
                    Some((_, vars)) if vars.contains(n) => {}
                    Some((flow, _)) => err(
                        diags,
                        file,
                        pos,
                        format!("`{{{{{n}}}}}` is never set in flow `{flow}` (use `save:` or `set:`)"),
                    ),
                    None => err(
                        diags,
                        file,
                        pos,
                        format!("`{{{{{n}}}}}`: keyword replies have no run variables (use `contact.` or `message.` fields)"),
                    ),
                },
                Var::Contact(c) if !any_contact_field && !contact_fields.contains(c.as_str()) => err(
                    diags,
                    file,
                    pos,
                    format!("`{{{{contact.{c}}}}}` is never set by any flow (use `contact:` or `set: {{contact.{c}: ...}}`)"),
                ),
                _ => {}
            }
        }
    };
    let check_msgs = |msgs: &[Message],
                      file: &Path,
                      run_vars: Option<(&str, &BTreeSet<String>)>,
                      diags: &mut Vec<Diagnostic>| {
        for m in msgs {
            check_template(&m.text, m.pos, file, run_vars, diags);
        }
    };

    for rule in set.keywords.iter().filter(|r| !r.first_word) {
        check_msgs(&rule.say, &rule.origin.file, None, diags);
    }
    for d in &set.defaults {
        check_msgs(&d.say, &d.origin.file, None, diags);
    }
    for flow in set.flows.values() {
        let mut vars: BTreeSet<String> = flow.vars.iter().cloned().collect();
        for step in flow.steps.values() {
            for a in &step.set {
                if let Var::Run(n) = &a.target {
                    vars.insert(n.clone());
                }
            }
            for (var, _) in step.call.iter().flat_map(|c| &c.save) {
                if let Var::Run(n) = var {
                    vars.insert(n.clone());
                }
            }
            if let Next::Wait { routes, .. } = &step.next {
                for r in routes {
                    vars.extend(r.save.clone());
                    for a in &r.set {
                        if let Var::Run(n) = &a.target {
                            vars.insert(n.clone());
                        }
                    }
                    if let Matcher::Regex(re) = &r.matcher {
                        vars.extend(re.capture_names().flatten().map(str::to_owned));
                    }
                }
            }
        }
        let rv = Some((flow.name.as_str(), &vars));
        let file = flow.file.as_path();
        check_msgs(&flow.fallback, file, rv, diags);
        for step in flow.steps.values() {
            for a in &step.set {
                check_template(&a.value, a.pos, file, rv, diags);
            }
            check_msgs(&step.say, file, rv, diags);
            for (pos, t) in step.call.iter().flat_map(|c| &c.templates) {
                check_template(t, *pos, file, rv, diags);
            }
            if let Next::Wait {
                routes,
                retry,
                timeouts,
            } = &step.next
            {
                for t in timeouts {
                    check_msgs(&t.say, file, rv, diags);
                }
                for r in routes {
                    for a in &r.set {
                        check_template(&a.value, a.pos, file, rv, diags);
                    }
                    check_msgs(&r.say, file, rv, diags);
                }
                if let Some(say) = &retry.say {
                    check_msgs(say, file, rv, diags);
                }
                check_msgs(&retry.give_up_say, file, rv, diags);
            }
        }
    }
}
