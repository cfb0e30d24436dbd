//! The author tools (issue 7): `smsflow chat` driven by in-memory input
//! through the real pipeline and store, `smsflow test` run as the built
//! binary, seeded transcripts, and `smsflow graph` output.

use std::path::{Path, PathBuf};
use std::process::Command;

use smsflow::author::{self, ChatOptions};
use smsflow::flow;

use crate::helpers::flows_dir;

fn shipped_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("flows")
}

fn shipped(name: &str) -> String {
    std::fs::read_to_string(shipped_dir().join(name)).unwrap()
}

fn chat_opts(flows: &Path, data: Option<&Path>) -> ChatOptions {
    ChatOptions {
        flows_dir: flows.to_path_buf(),
        from: "+15551230001".into(),
        to: "+15550001111".into(),
        data_dir: data.map(Path::to_path_buf),
        now: Some(1_700_000_000),
        options: author::server_defaults(),
        echo: true,
    }
}

/// Run a chat over `input`; its output without the two banner lines, whose
/// version hash and paths vary.
fn run_chat(opts: &ChatOptions, input: &str) -> String {
    let mut out = Vec::new();
    author::chat(opts, input.as_bytes(), &mut out).expect("chat runs");
    let text = String::from_utf8(out).unwrap();
    let mut lines = text.lines();
    assert!(lines.next().unwrap().starts_with("# smsflow chat: flows "));
    assert!(lines
        .next()
        .unwrap()
        .starts_with("# from +15551230001 to +15550001111"));
    lines.map(|l| format!("{l}\n")).collect()
}

fn smsflow(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_smsflow"))
        .args(args)
        .output()
        .expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn chat_runs_signup_with_state_wait_expiry_and_reset() {
    // Only the signup flow: no default reply, so unmatched text is silence.
    let dir = flows_dir(&[("signup.yaml", &shipped("signup.yaml"))]);
    let out = run_chat(
        &chat_opts(dir.path(), None),
        "join\nAnn\n/state\nold\n/wait 3h\n42\n/state\nhello\n/reset\n/state\n/quit\nnever sent\n",
    );
    assert_eq!(
        out,
        "\
> join
# flow signup started
< Hi! What's your name?
> Ann
< Thanks Ann! How old are you?
? step = signup/ask_age   # 0 retries here, idle 0s
? contact.name = Ann
? var.name = Ann
> old
# no route matched at signup/ask_age: retry 1
< Please send your age as a number, like 34.
@ wait 3h   # clock now 1700010803
> 42
# the signup run expired (idle longer than its expire_after)
< (silence: no_match)
? step = (none)
? contact.name = Ann
> hello
< (silence: no_match)
@ reset
? step = (none)   # nothing stored for this sender
"
    );
}

#[test]
fn chat_output_with_shipped_flows_passes_as_a_transcript() {
    // The echoed session is transcript syntax: saved as a .chat file next
    // to the same flows it must pass `smsflow test`.
    let files: Vec<(String, String)> = std::fs::read_dir(shipped_dir())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "rhai"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let dir = flows_dir(&refs);
    let mut opts = chat_opts(dir.path(), None);
    opts.now = Some(flow::TRANSCRIPT_EPOCH);
    let session = run_chat(
        &opts,
        "menu\nSURVEY\nfriend\n/state\nnope\n/wait 2h\n2\nhi\n",
    );
    assert!(session.contains("< Our menu: [media: https://example.com/menu.jpg]\n"));
    std::fs::write(dir.path().join("session.chat"), &session).unwrap();
    let set = flow::load_dir(dir.path()).unwrap().set;
    author::transcripts_pass(dir.path(), &set, &author::server_defaults())
        .unwrap_or_else(|e| panic!("{e}\n{session}"));
}

#[test]
fn chat_keeps_state_in_a_chosen_store_and_separates_senders() {
    let flows = flows_dir(&[("signup.yaml", &shipped("signup.yaml"))]);
    let data = tempfile::tempdir().unwrap();
    let mut opts = chat_opts(flows.path(), Some(data.path()));
    run_chat(&opts, "join\nBo\n");
    // A second session on the same store, a minute later, finds Bo waiting
    // at ask_age.
    opts.now = Some(1_700_000_062);
    let out = run_chat(
        &opts,
        "/state\n/from +15559990000\n/state\n/from\n/wait soon\n/frobnicate\n",
    );
    assert_eq!(
        out,
        "\
? step = signup/ask_age   # 0 retries here, idle 60s
? contact.name = Bo
? var.name = Bo
@ from +15559990000
? step = (none)   # nothing stored for this sender
# usage: /from +15551230001
# bad duration `soon`: write it like 90s, 15m, 2h, 1d or 1h30m
# unknown command /frobnicate; /help lists them
"
    );
}

#[test]
fn chat_refuses_a_broken_flows_directory() {
    let dir = flows_dir(&[("bad.yaml", "steps: [")]);
    let err = author::chat(&chat_opts(dir.path(), None), &b""[..], Vec::new()).unwrap_err();
    assert!(format!("{err:#}").contains("bad.yaml"), "{err:#}");
}

#[test]
fn test_command_passes_on_the_shipped_flows() {
    let dir = shipped_dir();
    let (code, stdout, stderr) = smsflow(&["test", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains(&format!("PASS {}\n", dir.join("signup.chat").display())));
    assert!(stdout.contains(&format!(
        "PASS {}\n",
        dir.join("signup_seeded.chat").display()
    )));
    assert!(stdout.ends_with(" passed, 0 failed\n"), "{stdout}");
}

#[test]
fn test_command_fails_with_a_diff_and_exit_code_1() {
    let dir = flows_dir(&[
        ("signup.yaml", &shipped("signup.yaml")),
        ("good.chat", "> join\n< Hi! What's your name?\n"),
        (
            "bad.chat",
            "# wrong name in the second reply\n> join\n< Hi! What's your name?\n> Ann\n< Thanks Bob! How old are you?\n",
        ),
    ]);
    let (code, stdout, _) = smsflow(&["test", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{stdout}");
    let bad = dir.path().join("bad.chat");
    let expected = format!(
        "FAIL {bad}\n  {bad}:4: reply to `> Ann` differs\n    (- expected, + actual)\n    - < Thanks Bob! How old are you?\n    + < Thanks Ann! How old are you?\n",
        bad = bad.display()
    );
    assert!(stdout.contains(&expected), "{stdout}");
    assert!(stdout.contains(&format!(
        "PASS {}\n",
        dir.path().join("good.chat").display()
    )));
    assert!(stdout.ends_with("1 passed, 1 failed\n"), "{stdout}");
}

#[test]
fn test_command_without_transcripts_is_an_error() {
    let dir = flows_dir(&[("signup.yaml", &shipped("signup.yaml"))]);
    let (code, _, stderr) = smsflow(&["test", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no *.chat transcripts"), "{stderr}");
}

#[test]
fn seeded_transcripts_start_from_the_given_state() {
    let dir = flows_dir(&[
        ("signup.yaml", &shipped("signup.yaml")),
        (
            "seeded.chat",
            "contact.name: Ann\ncontact.vip: yes\nstep: signup/ask_age\nvar.name: Ann\n\
             ? step = signup/ask_age\n? contact.vip = yes\n> skip\n< No problem, we'll skip that.\n< You're signed up, Ann.\n",
        ),
        (
            "no_wait.chat",
            "step: signup/done\n> hi\n< (silence)\n",
        ),
        ("no_flow.chat", "step: nope/x\n> hi\n< (silence)\n"),
    ]);
    let set = flow::load_dir(dir.path()).unwrap().set;
    let opts = author::server_defaults();
    let run = author::run_transcript(&dir.path().join("seeded.chat"), &set, &opts);
    assert!(run.passed(), "{:?}", run.failures);

    let run = author::run_transcript(&dir.path().join("no_wait.chat"), &set, &opts);
    let [err] = &run.failures[..] else {
        panic!("{:?}", run.failures)
    };
    assert_eq!(err.line, 1);
    assert!(err.message.contains("`signup/done` does not wait"), "{err}");
    let run = author::run_transcript(&dir.path().join("no_flow.chat"), &set, &opts);
    let [err] = &run.failures[..] else {
        panic!("{:?}", run.failures)
    };
    assert!(err.message.contains("unknown flow `nope`"), "{err}");

    // The reload hook reports both failures, with file and line.
    let why = author::transcripts_pass(dir.path(), &set, &opts).unwrap_err();
    assert!(why.starts_with("2 of 3 transcript(s) failed:"), "{why}");
    assert!(why.contains("no_wait.chat:1:"), "{why}");
}

#[test]
fn transcripts_pass_accepts_the_shipped_set() {
    let set = flow::load_dir(&shipped_dir()).unwrap().set;
    author::transcripts_pass(&shipped_dir(), &set, &author::server_defaults()).unwrap();
}

#[test]
fn graph_of_signup_has_its_steps_and_routes() {
    let set = flow::load_dir(&shipped_dir()).unwrap().set;
    let m = author::mermaid(&set, "signup").unwrap();
    let lines: Vec<&str> = m.lines().collect();
    for expected in [
        "flowchart TD",
        "    entry([\"keywords: JOIN, SIGNUP<br/>regex: (?i)^sign\\s#42;me\\s#42;up\"])",
        "    step_ask_name(\"ask_name<br/>Hi! What's your name?\")",
        "    step_ask_age(\"ask_age<br/>Thanks {{name}}! How old are you?\")",
        "    step_no_age[\"no_age<br/>No problem, we'll skip that.\"]",
        "    finish((\"End\"))",
        "    entry --> step_ask_name",
        "    step_ask_name -->|\"anything\"| step_ask_age",
        "    step_ask_age -->|\"number 13..120\"| step_done",
        "    step_ask_age -->|\"any_of: skip, later\"| step_no_age",
        "    step_ask_age -.->|\"retry ×2, then give up\"| step_no_age",
        "    step_no_age -->|\"goto\"| step_done",
        "    step_done -->|\"end\"| finish",
    ] {
        assert!(lines.contains(&expected), "missing {expected:?} in\n{m}");
    }

    let d = author::dot(&set, "signup").unwrap();
    assert!(d.starts_with("digraph \"signup\" {\n"), "{d}");
    for expected in [
        "    step_ask_age [style=rounded, label=\"ask_age\\nThanks {{name}}! How old are you?\"];",
        "    step_ask_age -> step_no_age [label=\"retry ×2, then give up\", style=dashed];",
        "    entry [shape=oval, label=\"keywords: JOIN, SIGNUP\\nregex: (?i)^sign\\\\s*me\\\\s*up\"];",
    ] {
        assert!(d.lines().any(|l| l == expected), "missing {expected:?} in\n{d}");
    }
    assert!(d.ends_with("}\n"));

    let err = author::mermaid(&set, "signpu").unwrap_err();
    assert_eq!(
        err.to_string(),
        "no flow named `signpu` (flows: appointment, order, quiz, signup, survey)"
    );
}

#[test]
fn graph_shows_flow_jumps_silence_and_keyword_entries() {
    let dir = flows_dir(&[
        (
            "keywords.yaml",
            "keywords:\n  HELLO: { say: \"Hi\", flow: a }\n",
        ),
        (
            "a.yaml",
            "steps:\n  ask:\n    say: \"Pick\"\n    wait:\n      - exact: [b]\n        flow: b\n      - contains: \"stop\"\n        silence: \"opted out\"\n      - else: true\n        goto: ask\n",
        ),
        ("b.yaml", "steps:\n  hi:\n    say: \"In b\"\n"),
    ]);
    let set = flow::load_dir(dir.path()).unwrap().set;
    let m = author::mermaid(&set, "a").unwrap();
    for expected in [
        "    entry([\"keyword HELLO (keywords.yaml)\"])",
        "    flow_b[[\"flow: b\"]]",
        "    silence_opted_out>\"silence: opted out\"]",
        "    step_ask -->|\"exact: b\"| flow_b",
        "    step_ask -->|\"contains: stop\"| silence_opted_out",
        "    step_ask -->|\"else\"| step_ask",
    ] {
        assert!(
            m.lines().any(|l| l == expected),
            "missing {expected:?} in\n{m}"
        );
    }
    // An `else` route leaves nothing to retry.
    assert!(!m.contains("retry"), "{m}");
    let b = author::mermaid(&set, "b").unwrap();
    assert!(b.contains("    entry([\"flow: a\"])\n"), "{b}");

    let (code, stdout, _) = smsflow(&[
        "graph",
        "b",
        "--flows",
        dir.path().to_str().unwrap(),
        "--format",
        "dot",
    ]);
    assert_eq!(code, 0);
    assert!(stdout.starts_with("digraph \"b\" {"), "{stdout}");
}
