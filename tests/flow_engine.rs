//! The step function through its public API: events, limits, reloads, and
//! property tests that `handle` and `load_dir` never panic.

use std::collections::BTreeMap;
use std::path::Path;

use proptest::prelude::*;
use smsflow::flow::{
    handle, load_dir, Conversation, EngineOptions, Event, FlowSet, Handled, Inbound, Outcome,
    Reply, Run, SilenceReason,
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
        }),
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
    let out = bodies(&h.outcome);
    assert_eq!(
        out[0].chars().count(),
        1600,
        "reply is cut to 1600 characters"
    );
    assert!(out[0].starts_with("You said: 😀"));

    let h = send(&set, Conversation::default(), "\u{0}\u{1b}[2J\r\n\u{7f}", 1);
    assert_eq!(
        bodies(&h.outcome),
        vec!["You said: \u{0}\u{1b}[2J\r\n\u{7f}"]
    );
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
            media: vec!["https://e.com/a.jpg".into()]
        }])
    );
    let h = send(&set, Conversation::default(), "pic", 1);
    assert_eq!(
        h.outcome,
        Outcome::Reply(vec![Reply {
            body: String::new(),
            media: vec!["https://e.com/b.jpg".into()]
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

fn arb_conversation() -> impl Strategy<Value = Conversation> {
    let names = prop::sample::select(vec!["signup", "survey", "appointment", "gone", ""]);
    let steps = prop::sample::select(vec!["ask_name", "ask_age", "done", "q1", "q3", "ask", "x"]);
    let run = (
        names,
        steps,
        any::<u32>(),
        any::<i64>(),
        any::<i64>(),
        prop::collection::btree_map(".{0,8}", ".{0,8}", 0..4),
    )
        .prop_map(|(flow, step, retries, started_at, last_active, vars)| Run {
            flow: flow.into(),
            step: step.into(),
            vars,
            retries,
            started_at,
            last_active,
        });
    (
        prop::collection::btree_map(".{0,8}", ".{0,8}", 0..4),
        prop::option::of(run),
    )
        .prop_map(|(contact, run)| Conversation { contact, run })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn handle_never_panics(
        conv in arb_conversation(),
        body in prop_oneof![".{0,40}", "(join|yes|no|1|2|skip|hours|[0-9]{1,30}|\\PC{0,5}) ?.{0,5}"],
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
