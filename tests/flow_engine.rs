//! The step function through its public API: events, limits, reloads, and
//! property tests that `handle` and `load_dir` never panic.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;
use smsflow::flow::script::Limits;
use smsflow::flow::{
    handle, handle_timeout, load_dir, load_dir_with, next_due, Conversation, EngineOptions, Event,
    FlowSet, Handled, Inbound, Outcome, Reply, Run, SilenceReason, Wake,
};

fn load_yaml(files: &[(&str, &str)]) -> FlowSet {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    match load_dir(dir.path()) {
        Ok(l) => l.set,
        Err(d) => panic!("{d:#?}"),
    }
}

fn shipped() -> FlowSet {
    load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("flows"))
        .unwrap()
        .set
}

fn send(set: &FlowSet, conv: Conversation, body: &str, now: i64) -> Handled {
    send_opts(set, &EngineOptions::default(), conv, body, now)
}

fn send_opts(
    set: &FlowSet,
    opts: &EngineOptions,
    conv: Conversation,
    body: &str,
    now: i64,
) -> Handled {
    let msg = Inbound {
        from: "+15551230001",
        to: "+15550001111",
        body,
        media: &[],
        message_sid: "SM1",
    };
    handle(set, opts, conv, &msg, now)
}

fn bodies(outcome: &Outcome) -> Vec<String> {
    match outcome {
        Outcome::Reply(r) => r.iter().map(|r| r.body.clone()).collect(),
        Outcome::Silence(_) => Vec::new(),
    }
}

#[test]
fn a_run_reports_where_it_is_and_what_happened() {
    let set = shipped();
    let h = send(&set, Conversation::default(), "join", 100);
    assert_eq!(h.flow.as_deref(), Some("signup"));
    assert_eq!(h.step.as_deref(), Some("ask_name"));
    assert_eq!(
        h.events,
        vec![Event::Triggered {
            flow: "signup".into()
        }]
    );
    let run = h.conversation.run.clone().unwrap();
    assert_eq!((run.started_at, run.last_active), (100, 100));

    let h = send(&set, h.conversation, "Ann", 101);
    let h = send(&set, h.conversation, "old", 102);
    assert_eq!(
        h.events,
        vec![Event::Retried {
            flow: "signup".into(),
            step: "ask_age".into(),
            attempt: 1
        }]
    );
    let h = send(&set, h.conversation, "older", 103);
    let h = send(&set, h.conversation, "oldest", 104);
    assert!(h.events.contains(&Event::GaveUp {
        flow: "signup".into(),
        step: "ask_age".into()
    }));
    assert_eq!(h.step.as_deref(), Some("done"));
    assert_eq!(h.conversation.run, None);

    let h = send(&set, h.conversation, "hours", 105);
    assert_eq!(
        h.events,
        vec![Event::Keyword {
            keyword: "HOURS".into()
        }]
    );
    assert_eq!(h.flow, None);
    let h = send(&set, h.conversation, "blah", 106);
    assert_eq!(h.events, vec![Event::DefaultReply]);
}

#[test]
fn expiry_and_interrupts_are_events() {
    let set = shipped();
    let h = send(&set, Conversation::default(), "join", 0);
    let h2 = send(&set, h.conversation.clone(), "Ann", 2 * 3600 + 1);
    assert_eq!(
        h2.events[0],
        Event::Expired {
            flow: "signup".into()
        }
    );
    assert_eq!(h2.conversation.run, None);

    let opts = EngineOptions {
        interrupt_keywords: vec!["RESTART".into()],
    };
    let h3 = send_opts(&set, &opts, h.conversation, "restart!", 5);
    assert_eq!(
        h3.events[0],
        Event::Interrupted {
            keyword: "RESTART".into()
        }
    );
    assert_eq!(h3.events.len(), 2);
    assert_eq!(h3.events[1], Event::DefaultReply);
}

#[test]
fn an_edited_flow_ends_a_stale_run_cleanly() {
    let a = load_yaml(&[(
        "poll.yaml",
        "trigger: {keywords: [POLL]}\nsteps:\n  q1:\n    say: Q1\n    wait: [{anything: true, goto: q2}]\n  q2:\n    say: Q2\n    wait: [{anything: true}]\n",
    )]);
    let b = load_yaml(&[
        (
            "poll.yaml",
            "trigger: {keywords: [POLL]}\nsteps:\n  q1:\n    say: New Q1\n",
        ),
        ("k.yaml", "default: fresh start\n"),
    ]);
    let h = send(&a, Conversation::default(), "poll", 1);
    let h = send(&a, h.conversation, "x", 2);
    assert_eq!(h.conversation.run.as_ref().unwrap().step, "q2");
    let h = send(&b, h.conversation, "y", 3);
    assert_eq!(
        h.events[0],
        Event::StaleStep {
            flow: "poll".into(),
            step: "q2".into()
        }
    );
    assert_eq!(bodies(&h.outcome), vec!["fresh start"]);
    assert_eq!(h.conversation.run, None);

    // A run on a flow that disappeared entirely is stale too.
    let gone = Conversation {
        contact: BTreeMap::new(),
        run: Some(Run {
            flow: "deleted".into(),
            step: "s".into(),
            vars: BTreeMap::new(),
            retries: 0,
            started_at: 0,
            last_active: 0,
            waiting_since: 0,
            timeouts_fired: 0,
            wakes: BTreeMap::new(),
            path: Vec::new(),
        }),
        queued: Vec::new(),
    };
    let h = send(&b, gone, "hello", 1);
    assert_eq!(
        h.events[0],
        Event::StaleStep {
            flow: "deleted".into(),
            step: "s".into()
        }
    );
}

#[test]
fn long_goto_chains_stop_at_the_step_limit() {
    // 60 steps in a line: no cycle for `check` to flag, but more than the
    // 50 transitions allowed for one message.
    let mut y = String::from("trigger: {keywords: [GO]}\nsteps:\n");
    for i in 0..60 {
        y.push_str(&format!("  s{i}: {{say: \"{i}\", goto: s{}}}\n", i + 1));
    }
    y.push_str("  s60: {say: end}\n");
    let set = load_yaml(&[("chain.yaml", &y)]);
    let h = send(&set, Conversation::default(), "go", 1);
    assert!(h.events.contains(&Event::StepLimit {
        flow: "chain".into()
    }));
    assert!(h.events.contains(&Event::RepliesDropped { count: 40 }));
    assert_eq!(bodies(&h.outcome).len(), 10);
    assert_eq!(h.conversation.run, None);
}

#[test]
fn huge_and_odd_bodies_are_handled() {
    let set = load_yaml(&[(
        "echo.yaml",
        "trigger: {catch_all: true}\nsteps:\n  s: {say: \"You said: {{message.body}}\"}\n",
    )]);
    let emoji = "😀".repeat(1600);
    let h = send(&set, Conversation::default(), &emoji, 1);
    // 1,610 characters: split at the last whitespace within the limit,
    // nothing cut off.
    assert_eq!(
        bodies(&h.outcome),
        vec!["You said:".to_owned(), emoji.clone()],
        "a long reply is split at whitespace"
    );

    let h = send(&set, Conversation::default(), "\u{0}\u{1b}[2J\r\n\u{7f}", 1);
    assert_eq!(
        bodies(&h.outcome),
        vec!["You said: \u{0}\u{1b}[2J\r\n\u{7f}"]
    );
}

/// Twilio sends at most 1,600 characters; a forged 64 KB body is
/// cut to that before any matcher, variable, expression or script sees it.
#[test]
fn forged_long_bodies_are_cut_before_any_flow_sees_them() {
    let script = script_flow(
        "fn on_message(msg, state) {\n  if state.n == () { state.n = 1; return \"go\"; }\n  `${msg.body.len()} ${msg.media.len()}`\n}\n",
    );
    let conv = started_plain(&script);
    let forged = "é".repeat(64 * 1024);
    let media: Vec<String> = (0..50).map(|i| format!("https://e.com/{i}.jpg")).collect();
    let msg = Inbound {
        from: "+15551230001",
        to: "+15550001111",
        body: &forged,
        media: &media,
        message_sid: "SM2",
    };
    let h = handle(&script, &EngineOptions::default(), conv, &msg, 2);
    assert_eq!(bodies(&h.outcome), ["1600 10"], "{:?}", h.events);

    let yaml = load_yaml(&[(
        "save.yaml",
        "trigger: {keywords: [SAVE]}\nsteps:\n  ask:\n    say: Go\n    wait:\n      - anything: true\n        save: text\n        say: \"{{= vars.text.len() }}\"\n",
    )]);
    let h = send(&yaml, Conversation::default(), "save", 1);
    let h = send(&yaml, h.conversation, &"x".repeat(64 * 1024), 2);
    assert_eq!(bodies(&h.outcome), ["1600"]);
}

fn started_plain(set: &FlowSet) -> Conversation {
    let h = send(set, Conversation::default(), "s", 1);
    assert_eq!(bodies(&h.outcome), ["go"]);
    h.conversation
}

#[test]
fn media_is_passed_through() {
    let set = load_yaml(&[(
        "k.yaml",
        "keywords:\n  MENU: {say: Menu, media: [\"https://e.com/a.jpg\"]}\n  PIC: {media: \"https://e.com/b.jpg\"}\n",
    )]);
    let h = send(&set, Conversation::default(), "menu", 1);
    assert_eq!(
        h.outcome,
        Outcome::Reply(vec![Reply {
            body: "Menu".into(),
            media: vec!["https://e.com/a.jpg".into()],
            origin: None,
        }])
    );
    let h = send(&set, Conversation::default(), "pic", 1);
    assert_eq!(
        h.outcome,
        Outcome::Reply(vec![Reply {
            body: String::new(),
            media: vec!["https://e.com/b.jpg".into()],
            origin: None,
        }])
    );
    let h = send(&FlowSet::empty(), Conversation::default(), "menu", 1);
    assert_eq!(h.outcome, Outcome::Silence(SilenceReason::NoMatch));
    assert_eq!(SilenceReason::NoMatch.as_str(), "no_match");
}

#[test]
fn conversations_round_trip_through_json() {
    let set = shipped();
    let h = send(&set, Conversation::default(), "join", 1);
    let h = send(&set, h.conversation, "Ann", 2);
    let json = serde_json::to_string(&h.conversation).unwrap();
    let back: Conversation = serde_json::from_str(&json).unwrap();
    assert_eq!(back, h.conversation);
}

// ---- Rhai: script flows and expressions through the engine ---------------

/// A script flow `s` (keyword S) running `source`, with a fallback reply.
fn script_flow(source: &str) -> FlowSet {
    script_flow_with(source, Limits::default())
}

fn script_flow_with(source: &str, limits: Limits) -> FlowSet {
    let dir = tempfile::tempdir().unwrap();
    let files = [
        (
            "s.yaml",
            "trigger: {keywords: [S]}\nscript: s.rhai\nfallback: \"Sorry!\"\n",
        ),
        ("s.rhai", source),
        ("k.yaml", "keywords: {HOURS: 9-5}\n"),
    ];
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    match load_dir_with(dir.path(), limits) {
        Ok(l) => l.set,
        Err(d) => panic!("{d:#?}"),
    }
}

/// A script that starts a run on S, then does what the next message says.
const COMMANDS: &str = r#"
fn down(n) { down(n + 1) }
fn on_message(msg, state) {
    if state.n == () { state.n = 1; return "started"; }
    state.n += 1;
    set_contact("touched", "yes");
    switch msg.body {
        "loop" => loop {},
        "recurse" => down(0),
        "string" => "x".pad(20000, "y"),
        "array" => { let a = []; loop { a.push(1); } },
        "map" => { let m = #{}; for i in 0..1001 { m[`k${i}`] = i; } `${m.len()}` },
        "replace" => { let s = "x"; s.pad(16000, "x"); s.replace("x", s); s },
        "key" => { let k = "k"; k.pad(300, "k"); state[k] = 1; "kept" },
        "throw" => throw "no",
        _ => `n=${state.n}`,
    }
}
"#;

fn started(set: &FlowSet) -> Conversation {
    let mut conv = Conversation::default();
    conv.contact.insert("name".into(), "Al".into());
    let h = send(set, conv, "s", 1_000);
    assert_eq!(bodies(&h.outcome), ["started"]);
    h.conversation
}

#[test]
fn a_looping_script_gets_the_fallback_within_the_budget_and_changes_nothing() {
    let set = script_flow(COMMANDS);
    let conv = started(&set);
    let began = std::time::Instant::now();
    let h = send(&set, conv.clone(), "loop", 1_001);
    // Guards against a hang only (the budget is 50 ms of script time); the
    // machine is shared, so no tighter bound.
    assert!(
        began.elapsed() < std::time::Duration::from_secs(10),
        "took {:?}",
        began.elapsed()
    );
    assert_eq!(bodies(&h.outcome), ["Sorry!"]);
    assert_eq!(h.conversation, conv, "the conversation must not change");
    assert_eq!(h.flow.as_deref(), Some("s"));
    let Some(Event::ScriptError {
        flow,
        file,
        line,
        message,
        ..
    }) = h.events.last()
    else {
        panic!("no script error event: {:?}", h.events);
    };
    assert_eq!(flow, "s");
    assert!(file.ends_with("s.rhai"), "{file:?}");
    assert!(*line > 0);
    assert!(
        message.contains("operations") || message.contains("time budget"),
        "{message}"
    );

    // The run is still there: the next message carries on from before.
    let h = send(&set, h.conversation, "hi", 1_002);
    assert_eq!(bodies(&h.outcome), ["n=2"]);
    assert_eq!(h.conversation.contact["touched"], "yes");
}

#[test]
fn every_runtime_limit_becomes_the_fallback() {
    // Without a wall clock, so that under load the other limits are what
    // stops these; the time budget gets its own set below.
    let patient = Limits {
        wall_clock: Duration::from_secs(60),
        ..Limits::default()
    };
    let impatient = Limits {
        max_operations: u64::MAX,
        ..Limits::default()
    };
    let (set, slow) = (
        script_flow_with(COMMANDS, patient),
        script_flow_with(COMMANDS, impatient),
    );
    let conv = started(&set);
    let h = send(&slow, conv.clone(), "loop", 1_001);
    assert_eq!(bodies(&h.outcome), ["Sorry!"]);
    assert_eq!(h.conversation, conv);
    assert!(
        matches!(h.events.last(), Some(Event::ScriptError { message, .. }) if message.contains("time budget")),
        "{:?}",
        h.events
    );
    for (body, limit) in [
        ("loop", "operations"),
        ("recurse", "call depth"),
        ("string", "string size"),
        ("array", "array size"),
        ("map", "map size"),
        ("replace", "string size"),
        ("key", "map key size"),
        ("throw", "no"),
    ] {
        let h = send(&set, conv.clone(), body, 1_001);
        assert_eq!(bodies(&h.outcome), ["Sorry!"], "{body}");
        assert_eq!(h.conversation, conv, "{body}");
        match h.events.last() {
            Some(Event::ScriptError { message, .. }) => {
                assert!(message.contains(limit), "{body}: {message}")
            }
            other => panic!("{body}: {other:?}"),
        }
    }
}

#[test]
fn expression_depth_is_limited_when_the_flow_loads() {
    let deep = format!("{}1{}", "(".repeat(100), ")".repeat(100));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("d.yaml"),
        format!("steps:\n  a:\n    say: \"{{{{= {deep} }}}}\"\n"),
    )
    .unwrap();
    let diags = load_dir(dir.path()).unwrap_err();
    assert_eq!(diags.len(), 1, "{diags:?}");
    // Located where the nesting goes too deep, inside the expression.
    assert_eq!(diags[0].line, 3, "{}", diags[0]);
    assert!(diags[0].column > 15, "{}", diags[0]);
    assert!(
        diags[0].message.contains("expression depth"),
        "{}",
        diags[0]
    );
}

#[test]
fn a_failing_expression_with_a_silent_fallback_is_silence() {
    let set = load_yaml(&[(
        "e.yaml",
        "trigger: {keywords: [E]}\nfallback: {silence: true}\nsteps:\n  a:\n    say: \"{{= 1 / 0 }}\"\n",
    )]);
    let h = send(&set, Conversation::default(), "e", 1);
    assert_eq!(h.outcome, Outcome::Silence(SilenceReason::ScriptError));
    assert_eq!(SilenceReason::ScriptError.as_str(), "script_error");
    assert_eq!(h.conversation, Conversation::default());
    assert!(matches!(
        h.events.last(),
        Some(Event::ScriptError { line: 5, .. })
    ));
}

#[test]
fn seeded_randomness_is_deterministic_per_message_sid() {
    let set = script_flow(
        r#"fn on_message(msg, state) { `${random_choice(["a", "b", "c", "d", "e", "f"])}${random_int(1, 1000)}` }"#,
    );
    let pick = |sid: &str| {
        let msg = Inbound {
            from: "+15551230001",
            to: "+15550001111",
            body: "s",
            media: &[],
            message_sid: sid,
        };
        bodies(
            &handle(
                &set,
                &EngineOptions::default(),
                Conversation::default(),
                &msg,
                1,
            )
            .outcome,
        )
    };
    assert_eq!(pick("SMaaa"), pick("SMaaa"));
    let distinct: std::collections::BTreeSet<Vec<String>> =
        (0..20).map(|i| pick(&format!("SM{i:032}"))).collect();
    assert!(distinct.len() > 10, "{distinct:?}");
}

#[test]
fn script_state_survives_a_store_round_trip() {
    let set = shipped();
    let h = send(&set, Conversation::default(), "quiz", 1);
    // What the store does between messages (and across restarts).
    let stored = h.conversation.to_stored();
    let conv = Conversation::from_stored(&stored).unwrap();
    assert_eq!(
        conv.run.as_ref().unwrap().vars[smsflow::flow::SCRIPT_STATE_VAR],
        r#"{"question":0,"score":0}"#
    );
    let h = send(&set, conv, "paris", 2);
    assert_eq!(
        bodies(&h.outcome)[1],
        "Q2/3: How many legs does a spider have?"
    );
    assert_eq!(
        h.conversation.run.as_ref().unwrap().vars["$state"],
        r#"{"question":1,"score":1}"#
    );
}

fn arb_conversation() -> impl Strategy<Value = Conversation> {
    let names = prop::sample::select(vec![
        "signup",
        "survey",
        "appointment",
        "quiz",
        "order",
        "gone",
        "",
    ]);
    let steps = prop::sample::select(vec![
        "ask_name",
        "ask_age",
        "done",
        "q1",
        "q3",
        "ask",
        "on_message",
        "confirm",
        "x",
    ]);
    let run = (
        names,
        steps,
        any::<u32>(),
        any::<i64>(),
        any::<i64>(),
        prop::collection::btree_map(
            prop_oneof![Just("$state".to_owned()), ".{0,8}"],
            prop_oneof![
                Just(r#"{"question":1,"score":0}"#.to_owned()),
                Just(r#"{"question":"x"}"#.to_owned()),
                ".{0,8}"
            ],
            0..4,
        ),
    )
        .prop_map(|(flow, step, retries, started_at, last_active, vars)| Run {
            flow: flow.into(),
            step: step.into(),
            vars,
            retries,
            started_at,
            last_active,
            waiting_since: last_active,
            timeouts_fired: 0,
            wakes: BTreeMap::new(),
            path: Vec::new(),
        });
    (
        prop::collection::btree_map(".{0,8}", ".{0,8}", 0..4),
        prop::option::of(run),
    )
        .prop_map(|(contact, run)| Conversation {
            contact,
            run,
            queued: Vec::new(),
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn handle_never_panics(
        conv in arb_conversation(),
        body in prop_oneof![".{0,40}", "(join|quiz|order|yes|no|1|2|skip|hours|[0-9]{1,30}|\\PC{0,5}) ?.{0,5}"],
        to in prop_oneof![Just("+15550001111".to_owned()), ".{0,12}"],
        now in any::<i64>(),
        interrupt in prop::collection::vec(".{0,6}", 0..3),
    ) {
        let set = shipped();
        let opts = EngineOptions { interrupt_keywords: interrupt };
        let msg = Inbound { from: "+1", to: &to, body: &body, media: &[], message_sid: "SM" };
        let h = handle(&set, &opts, conv, &msg, now);
        if let Outcome::Reply(r) = &h.outcome {
            prop_assert!(!r.is_empty() && r.len() <= 10);
        }
    }

    #[test]
    fn load_never_panics(text in prop_oneof![
        ".{0,200}",
        "(keywords|steps|trigger|default|wait|say|goto|- |  |: |\\{|\\}|\\[|\\]|&a |\\*a|\n|\"|'|\\{\\{|x){0,60}",
    ]) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f.yaml"), &text).unwrap();
        let _ = load_dir(dir.path());
    }
}

/// Tricky texts and the one normal form every comparison uses: Unicode
/// punctuation (full-width, CJK, `‼`, guillemets), NBSP and other spaces,
/// zero-width characters, emoji with modifiers, combining marks, Greek
/// final sigma, punctuation inside and between words.
const TRICKY: &[(&str, &str)] = &[
    ("Paris，", "paris"),
    ("「Paris」", "paris"),
    ("¡PARIS!", "paris"),
    ("Paris‼", "paris"),
    ("«Paris»", "paris"),
    ("“Paris”.", "paris"),
    ("Paris\u{a0}", "paris"),
    ("\u{202f}paris\u{3000}", "paris"),
    ("pa\u{200b}ris", "pa ris"),
    ("\u{feff}Paris\u{0}", "paris"),
    ("Yes,  PLEASE!!", "yes please"),
    ("yes… please", "yes please"),
    ("Yes - please", "yes please"),
    ("yes\u{a0}please。", "yes please"),
    ("👍", "👍"),
    ("👍🏽!", "👍🏽"),
    ("👨\u{200d}👩\u{200d}👧", "👨\u{200d}👩\u{200d}👧"),
    ("Café!", "café"),
    ("CAFE\u{301}?", "cafe\u{301}"),
    ("ΟΔΟΣ", "οδος"),
    ("don't", "don't"),
    ("1.5kg", "1.5kg"),
    ("STOP，", "stop"),
    ("\u{a0}stop\u{a0}", "stop"),
    ("Stop‼", "stop"),
];

#[test]
fn keywords_rhai_normalize_and_consent_agree_on_tricky_text() {
    // The Rhai helper, through a script flow that answers with it.
    let rhai = load_yaml(&[
        (
            "echo.yaml",
            "trigger: {catch_all: true}\nscript: echo.rhai\n",
        ),
        (
            "echo.rhai",
            "fn on_message(msg, state) { `[${normalize(msg.body)}]` }\n",
        ),
    ]);
    // Keywords, written in capitals; each answers with its own normal form.
    let mut kw = String::from("keywords:\n");
    let mut forms: Vec<&str> = TRICKY.iter().map(|(_, n)| *n).collect();
    forms.sort();
    forms.dedup();
    for form in &forms {
        if *form == "stop" {
            continue; // a consent word: the pipeline takes it before flows
        }
        let quote = |s: &str| format!("'{}'", s.replace('\'', "''"));
        kw.push_str(&format!(
            "  {}: {}\n",
            quote(&form.to_uppercase()),
            quote(form)
        ));
    }
    let keywords = load_yaml(&[("keywords.yaml", &kw)]);
    let consent = smsflow::compliance::ComplianceConfig::default().normalized();
    for (text, form) in TRICKY {
        assert_eq!(smsflow::flow::normalize(text), *form, "normalize({text:?})");
        assert_eq!(
            bodies(&send(&rhai, Conversation::default(), text, 1).outcome),
            vec![format!("[{form}]")],
            "Rhai normalize({text:?})"
        );
        if *form == "stop" {
            assert!(
                matches!(
                    consent.classify(text, None),
                    smsflow::compliance::Consent::Stop { .. }
                ),
                "{text:?} is an opt-out"
            );
        } else {
            assert_eq!(
                bodies(&send(&keywords, Conversation::default(), text, 1).outcome),
                vec![form.to_string()],
                "keyword for {text:?}"
            );
        }
    }
}

#[test]
fn script_replies_and_fallbacks_name_their_flow_and_step() {
    let set = load_yaml(&[
        (
            "keywords.yaml",
            "keywords:\n  HI: { say: \"Hello\", flow: echo }\n",
        ),
        ("echo.yaml", "script: echo.rhai\nfallback: \"Sorry\"\n"),
        (
            "echo.rhai",
            "fn on_message(msg, state) { if msg.body == \"boom\" { throw \"boom\" } \"echo\" }\n",
        ),
        (
            "boom.yaml",
            "trigger: {keywords: [BOOM]}\nscript: echo.rhai\nfallback: \"Sorry\"\n",
        ),
    ]);
    let origins = |h: &Handled| match &h.outcome {
        Outcome::Reply(r) => r
            .iter()
            .map(|r| r.origin.as_ref().map(|o| format!("{}/{}", o.flow, o.step)))
            .collect::<Vec<_>>(),
        Outcome::Silence(_) => Vec::new(),
    };
    let h = send(&set, Conversation::default(), "hi", 1);
    assert_eq!(bodies(&h.outcome), ["Hello", "echo"]);
    assert_eq!(origins(&h), [None, Some("echo/on_message".to_owned())]);
    let h = send(&set, Conversation::default(), "boom", 1);
    assert_eq!(bodies(&h.outcome), ["Sorry"]);
    assert_eq!(origins(&h), [Some("boom/on_message".to_owned())]);
}

// ---- Timeouts --------------------------------------------------------------

const WAKE: Wake<'static> = Wake {
    from: "+15551230001",
    to: "+15550001111",
};

/// A flow whose `ask` step reminds after 1h, then gives up after 3h.
const REMIND: &str = r#"
trigger: {keywords: [GO]}
steps:
  ask:
    say: "Yes or no, {{contact.state|friend}}?"
    wait:
      - yes: true
        say: "Good."
      - no: true
        goto: ask
    retry: { say: "Yes or no?", limit: 5 }
    timeout:
      - after: 1h
        say: "Still there, {{contact.state|friend}}?"
      - after: 3h
        say: "Giving up."
        goto: gave_up
  gave_up:
    set: { contact.state: "gave up" }
    end: true
"#;

fn timeout(set: &FlowSet, conv: Conversation, now: i64) -> Handled {
    handle_timeout(set, conv, &WAKE, now)
}

#[test]
fn a_due_timeout_reminds_then_gives_up() {
    let set = load_yaml(&[("r.yaml", REMIND)]);
    let h = send(&set, Conversation::default(), "go", 1_000);
    assert_eq!(next_due(&set, &h.conversation), Some(1_000 + 3600));
    // Not due yet: nothing runs, nothing changes.
    let early = timeout(&set, h.conversation.clone(), 1_000 + 3599);
    assert!(early.events.is_empty());
    assert_eq!(early.conversation, h.conversation);

    let r = timeout(&set, h.conversation, 1_000 + 3600);
    assert_eq!(bodies(&r.outcome), ["Still there, friend?"]);
    assert_eq!(
        r.events,
        [Event::TimedOut {
            flow: "r".into(),
            step: "ask".into(),
            timeout: "3600".into(),
            waiting_since: 1_000,
        }]
    );
    let run = r.conversation.run.clone().unwrap();
    assert_eq!((run.step.as_str(), run.timeouts_fired), ("ask", 3600));
    // A reminder is not the sender's activity.
    assert_eq!(run.last_active, 1_000);
    assert_eq!(next_due(&set, &r.conversation), Some(1_000 + 3 * 3600));

    let g = timeout(&set, r.conversation, 1_000 + 3 * 3600);
    assert_eq!(bodies(&g.outcome), ["Giving up."]);
    assert_eq!(g.conversation.run, None);
    assert_eq!(g.conversation.contact["state"], "gave up");
    assert_eq!(next_due(&set, &g.conversation), None);
}

#[test]
fn entering_a_step_restarts_its_clock_and_a_retry_does_not() {
    let set = load_yaml(&[("r.yaml", REMIND)]);
    let h = send(&set, Conversation::default(), "go", 1_000);
    // A retry (no route matched) keeps the clock.
    let retry = send(&set, h.conversation, "hmm", 2_000);
    assert_eq!(bodies(&retry.outcome), ["Yes or no?"]);
    assert_eq!(next_due(&set, &retry.conversation), Some(1_000 + 3600));
    // `no` goes to the same step again: a new wait, a new clock.
    let again = send(&set, retry.conversation, "no", 3_000);
    assert_eq!(next_due(&set, &again.conversation), Some(3_000 + 3600));
    // A timeout that already fired fires again after re-entering.
    let r = timeout(&set, again.conversation, 3_000 + 3600);
    assert_eq!(bodies(&r.outcome), ["Still there, friend?"]);
    let back = send(&set, r.conversation, "no", 9_000);
    assert_eq!(back.conversation.run.as_ref().unwrap().timeouts_fired, 0);
    // Leaving the step cancels its timeouts.
    let done = send(&set, back.conversation, "yes", 9_500);
    assert_eq!(done.conversation.run, None);
    assert_eq!(next_due(&set, &done.conversation), None);
}

#[test]
fn a_timer_whose_step_or_timeout_was_edited_away_is_dropped() {
    let set = load_yaml(&[("r.yaml", REMIND)]);
    let h = send(&set, Conversation::default(), "go", 1_000);
    // The step is gone after a reload.
    let renamed = load_yaml(&[("r.yaml", &REMIND.replace("ask", "asked"))]);
    assert_eq!(next_due(&renamed, &h.conversation), None);
    let r = timeout(&renamed, h.conversation.clone(), 1_000 + 3600);
    assert_eq!(
        r.events,
        [Event::StaleTimer {
            flow: "r".into(),
            step: "ask".into(),
        }]
    );
    assert_eq!(r.outcome, Outcome::Silence(SilenceReason::NoMatch));
    assert_eq!(r.conversation, h.conversation);
    // The timeout due next is gone (the reminder fired, the give-up was
    // removed).
    let reminded = timeout(&set, h.conversation.clone(), 1_000 + 3600).conversation;
    let fewer = load_yaml(&[(
        "r.yaml",
        &REMIND
            .replace(
                "      - after: 3h\n        say: \"Giving up.\"\n        goto: gave_up\n",
                "",
            )
            .replace("goto: ask", "goto: gave_up"),
    )]);
    assert_eq!(next_due(&fewer, &reminded), None);
    let r = timeout(&fewer, reminded.clone(), 1_000 + 3 * 3600);
    assert!(matches!(r.events[..], [Event::StaleTimer { .. }]));
    assert_eq!(r.conversation, reminded);
    // The flow is gone entirely.
    let other = load_yaml(&[("k.yaml", "keywords: {HOURS: 9-5}\n")]);
    let r = timeout(&other, h.conversation.clone(), 1_000 + 3600);
    assert!(matches!(r.events[..], [Event::StaleTimer { .. }]));
    // An `after:` made longer: not due yet, nothing runs.
    let later = load_yaml(&[("r.yaml", &REMIND.replace("after: 1h", "after: 2h"))]);
    assert_eq!(next_due(&later, &h.conversation), Some(1_000 + 7200));
    let r = timeout(&later, h.conversation, 1_000 + 3600);
    assert!(r.events.is_empty());
}

#[test]
fn an_expired_run_ends_when_its_timer_fires_late() {
    let set = load_yaml(&[(
        "r.yaml",
        &format!(
            "expire_after: 2h\n{}",
            REMIND.replace("after: 3h", "after: 2h")
        ),
    )]);
    let h = send(&set, Conversation::default(), "go", 1_000);
    let r = timeout(&set, h.conversation, 1_000 + 7201 + 3600);
    assert_eq!(r.events, [Event::Expired { flow: "r".into() }]);
    assert_eq!(r.conversation.run, None);
}

/// A script that asks to be woken, and answers the wake.
const WAKER: &str = r#"
fn on_message(msg, state) {
    if msg.body == "stop" { return (); }
    state.asked = msg.body;
    wake_after(600, "nudge");
    "Tell me more."
}
fn on_timeout(name, state) {
    state.nudged = true;
    set_contact("nudged", "yes");
    if state.asked == "boom" { throw "no"; }
    `${name}: still thinking about ${state.asked}?`
}
"#;

#[test]
fn a_script_is_woken_with_on_timeout_and_a_reply_clears_its_wakes() {
    let set = script_flow(WAKER);
    let h = send(&set, Conversation::default(), "s", 1_000);
    assert_eq!(next_due(&set, &h.conversation), Some(1_600));
    let r = timeout(&set, h.conversation.clone(), 1_600);
    assert_eq!(bodies(&r.outcome), ["nudge: still thinking about s?"]);
    assert_eq!(r.conversation.contact["nudged"], "yes");
    assert_eq!(next_due(&set, &r.conversation), None);
    // A message before the wake: `on_message` runs and asks again.
    let m = send(&set, h.conversation, "later", 1_100);
    assert_eq!(next_due(&set, &m.conversation), Some(1_700));
    // A failing `on_timeout`: the fallback, the conversation unchanged,
    // but the wake is spent.
    let b = send(&set, Conversation::default(), "s", 1_000);
    let b = send(&set, b.conversation, "boom", 1_001);
    let f = timeout(&set, b.conversation, 1_601);
    assert_eq!(bodies(&f.outcome), ["Sorry!"]);
    assert!(matches!(f.events.last(), Some(Event::ScriptError { .. })));
    assert_eq!(next_due(&set, &f.conversation), None);
    assert_eq!(f.conversation.run.unwrap().vars.len(), 1);
}

#[test]
fn wake_after_is_bounded() {
    for (call, why) in [
        ("wake_after(0, \"x\")", "seconds must be from 1"),
        ("wake_after(40000000, \"x\")", "seconds must be from 1"),
        ("wake_after(5, \"\")", "the name must be"),
        (
            "for i in 0..11 { wake_after(5, `w${i}`); }",
            "at most 10 wakes",
        ),
    ] {
        let set = script_flow(&format!(
            "fn on_message(msg, state) {{ state.n = 1; {call}; \"ok\" }}\nfn on_timeout(name, state) {{ () }}\n"
        ));
        let h = send(&set, Conversation::default(), "s", 1_000);
        assert_eq!(bodies(&h.outcome), ["Sorry!"], "{call}");
        match &h.events[..] {
            [.., Event::ScriptError { message, .. }] => {
                assert!(message.contains(why), "{call}: {message}")
            }
            other => panic!("{call}: {other:?}"),
        }
    }
    // In a YAML expression there is nothing to wake.
    let set = load_yaml(&[("w.yaml", "trigger: {keywords: [W]}\nfallback: \"no\"\nsteps:\n  s:\n    say: \"{{= wake_after(5, `x`) }}\"\n")]);
    let h = send(&set, Conversation::default(), "w", 1_000);
    assert_eq!(bodies(&h.outcome), ["no"]);
}

#[test]
fn a_start_enters_the_first_step_with_fields_and_vars_and_ends_any_run() {
    let set = load_yaml(&[
        (
            "remind.yaml",
            "name: remind\nfields: [appt]\nvars: [ref]\nexpire_after: 1h\nsteps:\n  intro:\n    say: \"Ref {{ref}}\"\n    goto: ask\n  ask:\n    say: \"{{contact.appt}}? YES or NO\"\n    wait:\n      - yes: true\n        say: \"Booked {{ref}}\"\n",
        ),
        (
            "other.yaml",
            "name: other\ntrigger: { keywords: [OTHER] }\nsteps:\n  a:\n    say: \"a?\"\n    wait:\n      - yes: true\n        say: ok\n",
        ),
    ]);
    let busy = send(&set, Conversation::default(), "other", 1000).conversation;
    assert_eq!(smsflow::flow::live_run(&set, &busy, 1000), Some("other"));
    let fields = BTreeMap::from([("appt".to_owned(), "Tue".to_owned())]);
    let vars = BTreeMap::from([("ref".to_owned(), "A1".to_owned())]);
    let start = smsflow::flow::Start {
        flow: "remind",
        fields: &fields,
        vars: &vars,
        wake: Wake {
            from: "+15551230001",
            to: "+15550001111",
        },
    };
    let h = smsflow::flow::start_flow(&set, busy, &start, 2000);
    assert_eq!(bodies(&h.outcome), ["Ref A1", "Tue? YES or NO"]);
    let run = h.conversation.run.clone().unwrap();
    assert_eq!(
        (run.flow.as_str(), run.step.as_str(), run.started_at),
        ("remind", "ask", 2000)
    );
    assert_eq!(h.conversation.contact["appt"], "Tue");
    // The run goes on with the contact's reply, its variables kept.
    let h2 = send(&set, h.conversation.clone(), "yes", 2100);
    assert_eq!(bodies(&h2.outcome), ["Booked A1"]);
    // Live until idle past expire_after.
    assert_eq!(
        smsflow::flow::live_run(&set, &h.conversation, 2000 + 3600),
        Some("remind")
    );
    assert_eq!(
        smsflow::flow::live_run(&set, &h.conversation, 2000 + 3601),
        None
    );
    // An unknown flow starts nothing but keeps the fields.
    let none = smsflow::flow::Start {
        flow: "nope",
        ..start
    };
    let h = smsflow::flow::start_flow(&set, Conversation::default(), &none, 1);
    assert!(h.conversation.run.is_none() && bodies(&h.outcome).is_empty());
}
