//! The author tools: `smsflow chat` driven by in-memory input
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
        real_calls: None,
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
    smsflow_with_input(args, "")
}

/// Run the binary with `input` on stdin; without TWILIO_AUTH_TOKEN and
/// SMSFLOW_CONFIG, which the author tools must not need.
fn smsflow_with_input(args: &[&str], input: &str) -> (i32, String, String) {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_smsflow"))
        .args(args)
        .env_remove("TWILIO_AUTH_TOKEN")
        .env_remove("SMSFLOW_CONFIG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("binary runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every shipped `*.yaml` and `*.rhai` file, as (name, text).
fn shipped_flows() -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = std::fs::read_dir(shipped_dir())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "rhai"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    files.sort();
    files
}

/// A flows directory holding the shipped flows plus `extra` files.
fn shipped_plus(extra: &[(&str, &str)]) -> tempfile::TempDir {
    let files = shipped_flows();
    let mut refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    refs.extend_from_slice(extra);
    flows_dir(&refs)
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
    let dir = shipped_plus(&[]);
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

/// `/wait` fires the timeouts due meanwhile, in order, and prints what
/// they send; the session still passes as a transcript (`@ wait` then the
/// `<` lines of the timers).
#[test]
fn chat_wait_fires_timeouts_and_prints_what_they_send() {
    let dir = shipped_plus(&[]);
    let mut opts = chat_opts(dir.path(), None);
    opts.now = Some(flow::TRANSCRIPT_EPOCH);
    let session = run_chat(
        &opts,
        "confirm\n/wait 1h\n/wait 2d\n/state\nconfirm\n/wait 2h\nyes\n/wait 1d\n",
    );
    let expected = "\
> confirm
# flow appointment started
< You have an appointment on Tuesday at 10am. Can you make it? Reply YES or NO.
@ wait 1h   # clock now 1700003601
@ wait 2d   # clock now 1700176401
# appointment/ask: no reply after 2h
< Still there? Reply YES to confirm Tuesday at 10am, or NO to pick another day.
# appointment/ask: no reply after 1d
< We'll mark your appointment unconfirmed. Text CONFIRM any time to book again.
? step = (none)
? contact.appointment = unconfirmed
> confirm
# flow appointment started
< You have an appointment on Tuesday at 10am. Can you make it? Reply YES or NO.
@ wait 2h   # clock now 1700183602
# appointment/ask: no reply after 2h
< Still there? Reply YES to confirm Tuesday at 10am, or NO to pick another day.
> yes
< Great, see you Tuesday at 10am!
@ wait 1d   # clock now 1700270003
";
    assert_eq!(session, expected);
    std::fs::write(dir.path().join("session.chat"), &session).unwrap();
    let set = flow::load_dir(dir.path()).unwrap().set;
    author::transcripts_pass(dir.path(), &set, &author::server_defaults())
        .unwrap_or_else(|e| panic!("{e}\n{session}"));
    // A transcript that leaves out what a timer sends fails.
    let missing = session.replace(
        "< Still there? Reply YES to confirm Tuesday at 10am, or NO to pick another day.\n> yes",
        "> yes",
    );
    std::fs::write(dir.path().join("session.chat"), &missing).unwrap();
    let err = author::transcripts_pass(dir.path(), &set, &author::server_defaults()).unwrap_err();
    assert!(
        err.contains("timers sent messages during `@ wait`"),
        "{err}"
    );
}

/// `/start` starts a flow from outside and prints what it sends; a
/// field it sets schedules the shipped campaign, whose reminder `/wait`
/// shows; the session passes as a transcript.
#[test]
fn chat_start_sets_a_field_and_the_campaign_fires_at_wait() {
    let dir = shipped_plus(&[]);
    let mut opts = chat_opts(dir.path(), None);
    opts.now = Some(flow::TRANSCRIPT_EPOCH);
    let session = run_chat(
        &opts,
        "/start booked field.appt=\"2023-11-16 15:00\"\n/start nope\n/wait 12h\nno\n",
    );
    let expected = "\
@ start booked field.appt=\"2023-11-16 15:00\"
< You're booked for 2023-11-16 15:00. We'll remind you the day before.
# no flow `nope` in this set
@ wait 12h   # clock now 1700043202
< Hi there, this is a reminder of your appointment on 2023-11-16 15:00. Reply YES to confirm or NO to cancel.
> no
< Your appointment is cancelled. Call 555-0100 to book another.
";
    assert_eq!(session, expected);
    std::fs::write(dir.path().join("session.chat"), &session).unwrap();
    let set = flow::load_dir(dir.path()).unwrap().set;
    author::transcripts_pass(dir.path(), &set, &author::server_defaults())
        .unwrap_or_else(|e| panic!("{e}\n{session}"));
}

#[test]
fn graph_draws_timeouts_as_dashed_edges() {
    let set = flow::load_dir(&shipped_dir()).unwrap().set;
    let m = author::mermaid(&set, "appointment").unwrap();
    for expected in [
        "    step_ask -.->|\"after 2h: reminder\"| step_ask",
        "    step_ask -.->|\"after 1d\"| step_unconfirmed",
    ] {
        assert!(
            m.lines().any(|l| l == expected),
            "missing {expected:?} in\n{m}"
        );
    }
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
        "no flow named `signpu` (flows: appointment, booked, order, order_status, pizza, quiz, reminder, signup, survey)"
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

#[test]
fn graph_of_a_script_flow_labels_its_on_message_step() {
    let set = flow::load_dir(&shipped_dir()).unwrap().set;
    let m = author::mermaid(&set, "quiz").unwrap();
    assert_eq!(
        m,
        "---\ntitle: quiz\n---\nflowchart TD\n\
         \x20   entry([\"keywords: QUIZ\"])\n\
         \x20   step_on_message(\"on_message<br/>Rhai script quiz.rhai\")\n\
         \x20   finish((\"End\"))\n\
         \x20   entry --> step_on_message\n\
         \x20   step_on_message -->|\"state not empty: next message\"| step_on_message\n\
         \x20   step_on_message -->|\"state empty\"| finish\n"
    );
    let d = author::dot(&set, "quiz").unwrap();
    assert!(
        d.contains(
            "    step_on_message [style=rounded, label=\"on_message\\nRhai script quiz.rhai\"];\n"
        ),
        "{d}"
    );
}

#[test]
fn test_applies_consent_words_as_the_server_does() {
    // CANCEL at a confirmation opts the sender out on the real number;
    // `smsflow test` once handed it to the flow instead.
    let dir = shipped_plus(&[(
        "cancel.chat",
        "> order\n\
         < How many cupcakes would you like? $3 each, or $2 each for 12 or more.\n\
         > 6\n\
         < 6 cupcakes at $3 each come to $18. Confirm? (yes/no)\n\
         > cancel\n\
         < (silence: opt_out)\n\
         ? step = (none)\n\
         > hours\n\
         < (silence: opted_out)\n\
         > help\n\
         < (silence: opted_out)\n\
         > start\n\
         < (silence: opt_in)\n\
         > help\n\
         < (silence: help)\n",
    )]);
    let (code, stdout, stderr) = smsflow(&["test", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.ends_with("1 passed, 0 failed\n"), "{stdout}");
}

/// A config file like an operator's: other consent words, a help text, an
/// interrupt keyword and a tight loop guard.
const OPERATOR_CONFIG: &str = r#"
stop_keywords = ["STOP", "ARRET"]
help_text = "Acme Bakery: text STOP to opt out."
interrupt_keywords = ["MENU"]
loop_max_replies = 3
"#;

const ASK_FLOW: &str = "\
trigger:\n  keywords: [ASK]\nsteps:\n  q:\n    say: \"Continue? Reply GO, ARRET or MENU\"\n    wait:\n      - exact: [go]\n        say: \"Going\"\n      - exact: [arret]\n        say: \"Stopped\"\n      - exact: [menu]\n        say: \"Never seen\"\n";

const ASK_KEYWORDS: &str = "keywords:\n  HOURS: \"Open 9-5\"\n  MENU: \"Menu: HOURS, ASK\"\n";

/// Passes only with OPERATOR_CONFIG.
const CONFIGURED_CHAT: &str = "\
> help\n< Acme Bakery: text STOP to opt out.\n\
> ask\n< Continue? Reply GO, ARRET or MENU\n\
> menu\n< Menu: HOURS, ASK\n? step = (none)\n\
# the fourth reply within a minute\n\
> hours\n< (silence: rate_limited)\n\
@ wait 1m\n\
> ask\n< Continue? Reply GO, ARRET or MENU\n\
> arret\n< (silence: opt_out)\n";

#[test]
fn check_chat_and_test_take_the_servers_config_file() {
    let dir = flows_dir(&[
        ("ask.yaml", ASK_FLOW),
        ("keywords.yaml", ASK_KEYWORDS),
        ("configured.chat", CONFIGURED_CHAT),
    ]);
    let conf_dir = tempfile::tempdir().unwrap();
    let conf = conf_dir.path().join("smsflow.toml");
    std::fs::write(&conf, OPERATOR_CONFIG).unwrap();
    let (d, c) = (dir.path().to_str().unwrap(), conf.to_str().unwrap());

    // test: passes with the operator's settings (and no auth token) …
    let (code, stdout, stderr) = smsflow(&["test", d, "--config", c]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    // … and with the defaults shows what would differ.
    let (code, stdout, _) = smsflow(&["test", d]);
    assert_eq!(code, 1, "{stdout}");
    for expected in [
        "    - < Acme Bakery: text STOP to opt out.\n    + < (silence: help)\n",
        "    - < Menu: HOURS, ASK\n    + < Never seen\n",
        "    - < (silence: rate_limited)\n    + < Open 9-5\n",
        "    - < (silence: opt_out)\n    + < Stopped\n",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in\n{stdout}"
        );
    }

    // chat: the same settings.
    let (code, stdout, stderr) = smsflow_with_input(
        &["chat", "--flows", d, "--config", c, "--now", "1700000000"],
        "help\nask\nmenu\n",
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("> help\n< Acme Bakery: text STOP to opt out.\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("> menu\n# interrupt keyword MENU ended the run\n"),
        "{stdout}"
    );

    // check: warns about routes the configured server never lets through.
    let (code, _, stderr) = smsflow(&["check", d, "--config", c]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("warning: `arret` is an opt-out keyword"),
        "{stderr}"
    );
    assert!(
        stderr.contains("warning: `menu` is an interrupt keyword"),
        "{stderr}"
    );
    let (code, _, stderr) = smsflow(&["check", d]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("`arret`"), "{stderr}");
    assert!(!stderr.contains("`menu`"), "{stderr}");

    // Without DIR, the tools use the config file's flows directory.
    let with_flows = conf_dir.path().join("with_flows.toml");
    std::fs::write(
        &with_flows,
        format!("{OPERATOR_CONFIG}flows = {:?}\n", dir.path()),
    )
    .unwrap();
    let (code, stdout, stderr) = smsflow(&["test", "--config", with_flows.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("configured.chat"), "{stdout}");

    // A broken config file is an error for every tool, naming the file.
    std::fs::write(&conf, "stop_keyword = [\"STOP\"]\n").unwrap();
    for args in [
        vec!["test", d, "--config", c],
        vec!["check", d, "--config", c],
        vec!["chat", "--flows", d, "--config", c],
    ] {
        let (code, _, stderr) = smsflow(&args);
        assert_eq!(code, 1, "{args:?}");
        assert!(stderr.contains("smsflow.toml"), "{args:?}: {stderr}");
        assert!(stderr.contains("stop_keyword"), "{args:?}: {stderr}");
    }
}

#[test]
fn test_reports_every_mismatch_in_a_file() {
    let dir = flows_dir(&[
        ("signup.yaml", &shipped("signup.yaml")),
        (
            "three.chat",
            "> join\n< Hi! What's your name?\n\
             > Ann\n< Thanks Bob! How old are you?\n\
             ? var.name = Bob\n\
             > 34\n< You're signed up, Bob.\n\
             ? step = (none)\n",
        ),
    ]);
    let (code, stdout, _) = smsflow(&["test", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{stdout}");
    let f = dir.path().join("three.chat");
    // Each failure, in file order; the run went on with the actual state
    // (Ann), so the last exchange shows Ann's reply.
    let expected = format!(
        "FAIL {f}\n\
         \x20 {f}:3: reply to `> Ann` differs\n\
         \x20   (- expected, + actual)\n\
         \x20   - < Thanks Bob! How old are you?\n\
         \x20   + < Thanks Ann! How old are you?\n\
         \x20 {f}:5: `var.name` is `Ann`, expected `Bob`\n\
         \x20 {f}:6: reply to `> 34` differs\n\
         \x20   (- expected, + actual)\n\
         \x20   - < You're signed up, Bob.\n\
         \x20   + < You're signed up, Ann.\n\
         0 passed, 1 failed\n",
        f = f.display()
    );
    assert_eq!(stdout, expected);
}

#[test]
fn chat_writes_from_and_to_as_transcript_lines() {
    let dir = shipped_plus(&[]);
    let mut opts = chat_opts(dir.path(), None);
    opts.now = Some(flow::TRANSCRIPT_EPOCH);
    // Two senders interleaved, then one of them texting another number.
    let session = run_chat(
        &opts,
        "join\nAnn\n/from +15559990000\njoin\nBo\n/from +15551230001\n34\n/to +15550002222\nhi\n/state\n",
    );
    assert!(session.contains("\n@ from +15559990000\n"), "{session}");
    assert!(session.contains("\n@ to +15550002222\n"), "{session}");
    assert!(session.contains("< You're signed up, Ann.\n"), "{session}");
    // Saved, it passes as a test: the switches are part of it.
    std::fs::write(dir.path().join("session.chat"), &session).unwrap();
    let set = flow::load_dir(dir.path()).unwrap().set;
    author::transcripts_pass(dir.path(), &set, &author::server_defaults())
        .unwrap_or_else(|e| panic!("{e}\n{session}"));
}

#[test]
fn script_flows_can_be_seeded_with_their_state() {
    let dir = shipped_plus(&[
        (
            "json.chat",
            "step: quiz/on_message\n\
             state: {\"question\": 1, \"score\": 1}\n\
             contact.quiz_best: 1\n\
             ? var.$state = {\"question\":1,\"score\":1}\n\
             > eight\n\
             < Correct!\n\
             < Q3/3: Which planet is called the Red Planet?\n\
             ? var.$state = {\"question\":2,\"score\":2}\n",
        ),
        (
            "rhai.chat",
            "step: quiz/on_message\n\
             state: #{question: 2, score: 2}   # at the last question\n\
             > mars\n\
             < Correct!\n\
             < You scored 3/3. Text QUIZ to play again.\n\
             ? step = (none)\n\
             ? contact.quiz_best = 3\n",
        ),
    ]);
    let set = flow::load_dir(dir.path()).unwrap().set;
    let opts = author::server_defaults();
    for name in ["json.chat", "rhai.chat"] {
        let run = author::run_transcript(&dir.path().join(name), &set, &opts);
        assert!(run.passed(), "{name}: {:#?}", run.failures);
    }

    for (text, line, message) in [
        (
            "step: quiz/on_message\n> x\n< y\n",
            1,
            "needs its state: add a `state: {...}` header",
        ),
        (
            "step: quiz/on_message\nstate: {}\n> x\n< y\n",
            2,
            "an empty state ends a script run",
        ),
        (
            "step: quiz/on_message\nstate: #{question: }\n> x\n< y\n",
            2,
            "`state:` is not a Rhai map: syntax error",
        ),
        (
            "step: quiz/on_message\nstate: [1]\n> x\n< y\n",
            2,
            "write `state:` as a JSON object",
        ),
        (
            "step: quiz/ask\nstate: {\"question\": 1}\n> x\n< y\n",
            1,
            "`quiz` is a script flow: its run waits at `quiz/on_message`",
        ),
        (
            "step: quiz/on_message\nvar.question: 1\nstate: {\"question\": 1}\n> x\n< y\n",
            2,
            "seed its state with a `state:` header, not `var.`",
        ),
        (
            "step: signup/ask_age\nstate: {\"question\": 1}\n> x\n< y\n",
            2,
            "`state:` seeds a script flow; `signup` is a YAML flow",
        ),
        (
            "state: {\"question\": 1}\n> x\n< y\n",
            1,
            "add a `step: flow/on_message` header",
        ),
    ] {
        let path = dir.path().join("bad.chat");
        std::fs::write(&path, text).unwrap();
        let run = author::run_transcript(&path, &set, &opts);
        let [failure] = &run.failures[..] else {
            panic!("{text}: {:#?}", run.failures)
        };
        assert_eq!(failure.line, line, "{text}: {failure}");
        assert!(failure.message.contains(message), "{text}: {failure}");
        assert!(run.exchanges.is_empty(), "nothing is sent after a bad seed");
    }
}

#[test]
fn check_recurses_into_flow_sets_and_refuses_an_empty_directory() {
    let top = flows_dir(&[("keywords.yaml", "keywords:\n  HOURS: \"Open\"\n")]);
    let sub = top.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(sub.join("bad.yaml"), "keywords:\n  HOURS: [\n").unwrap();
    // A module directory (no YAML) is part of the set above, not a set.
    std::fs::create_dir(top.path().join("lib")).unwrap();
    std::fs::write(top.path().join("lib/util.rhai"), "fn twice(x) { x * 2 }\n").unwrap();
    // Dot-directories are skipped, as `test` skips them.
    std::fs::create_dir(top.path().join(".git")).unwrap();
    std::fs::write(top.path().join(".git/x.yaml"), "nonsense: [\n").unwrap();

    let (code, stdout, stderr) = smsflow(&["check", top.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert_eq!(
        stdout,
        format!("{}: ok (0 warning(s))\n", top.path().display())
    );
    assert!(
        stderr.contains(&format!("{}:", sub.join("bad.yaml").display())),
        "{stderr}"
    );
    assert!(
        stderr.ends_with(&format!("{}: 1 error(s), 0 warning(s)\n", sub.display())),
        "{stderr}"
    );
    assert!(!stderr.contains(".git"), "{stderr}");

    // The construct tests are one set per directory; all valid.
    let constructs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/flows/constructs");
    let (code, stdout, stderr) = smsflow(&["check", constructs.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(&format!("{}: ok (", constructs.join("stale/v2").display())),
        "{stdout}"
    );
    assert!(stdout.lines().count() >= 12, "{stdout}");

    let empty = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = smsflow(&["check", empty.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stderr.contains("no flow files (*.yaml)"), "{stderr}");
}
