//! `check_dir` / `load_dir` on deliberately broken flow directories: every
//! expected message at its exact line and column, nothing else, and hostile
//! files rejected quickly with a located error.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use smsflow::flow::{check_dir, load_dir, Diagnostic, FlowSet};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/flows")
        .join(name)
}

/// Diagnostics rendered with the file name only, so the expectations do not
/// depend on where the repository is checked out.
fn rendered(diags: &[Diagnostic]) -> Vec<String> {
    diags
        .iter()
        .map(|d| {
            let file = d.file.file_name().unwrap().to_string_lossy().into_owned();
            let root = Path::new(env!("CARGO_MANIFEST_DIR"))
                .to_string_lossy()
                .into_owned()
                + "/";
            format!(
                "{file}:{}:{}: {}: {}",
                d.line,
                d.column,
                d.severity,
                d.message.replace(&root, "")
            )
        })
        .collect()
}

fn assert_diags(actual: &[Diagnostic], expected: &[&str]) {
    let actual = rendered(actual);
    let missing: Vec<&&str> = expected
        .iter()
        .filter(|e| !actual.iter().any(|a| a == **e))
        .collect();
    let extra: Vec<&String> = actual
        .iter()
        .filter(|a| !expected.contains(&a.as_str()))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing:\n  {}\nunexpected:\n  {}",
        missing
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join("\n  "),
        extra
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join("\n  ")
    );
}

#[test]
fn schema_problems_are_all_reported_with_positions() {
    let diags = check_dir(&fixture("broken/schema"));
    assert_diags(
        &diags,
        &[
            "counts.yaml:3:15: error: invalid duration `2 hours` (use a number and s, m, h or d, like 30m or 2h; at most 365d)",
            "counts.yaml:6:10: error: step `s` sends 11 messages; at most 10 are allowed",
            "counts.yaml:7:12: error: media `ftp://example.com/x.jpg` must be an http(s) URL",
            "graph.yaml:6:11: error: steps loop without waiting for a reply: a -> b -> a",
            "graph.yaml:10:3: error: step `island` is never reached from the start step `a`",
            "graph.yaml:12:3: error: step `trap` is never reached from the start step `a`",
            "graph.yaml:12:3: error: step `trap` can never be left: every route and the retry give-up come back to it",
            "lengths.yaml:2:9: error: reply is 1601 characters; SMS replies are limited to 1600",
            "lengths.yaml:3:8: warning: reply needs 2 SMS segments (GSM-7, 161 units; one segment holds 160)",
            "lengths.yaml:4:10: warning: reply needs 2 SMS segments (UCS-2, 80 units; one segment holds 70)",
            "regex.yaml:2:10: error: invalid regex: unclosed group",
            "regex.yaml:6:16: error: invalid regex: invalid repetition count range, the start must be <= the end",
            "routes.yaml:7:5: error: step `s` waits for a reply, so its routes decide where to go; remove goto/flow/end/silence",
            "routes.yaml:9:9: error: a route has one matcher; this one has `yes` and `no` (use two routes)",
            "routes.yaml:10:9: error: a route needs one matcher: any_of, exact, contains, starts_with, regex, number, yes, no, anything, else, when",
            "routes.yaml:11:17: error: number range is empty: 20 is more than 10",
            "routes.yaml:12:15: error: `else: false` means nothing; remove it",
            "routes.yaml:13:3: error: step `t` is never reached from the start step `s`",
            "routes.yaml:15:5: error: step `t` has both `say` and `silence`; silence sends nothing",
            "routes.yaml:16:5: error: `retry` needs `wait` in step `t`",
            "syntax.yaml:2:10: error: invalid YAML: invalid indentation in quoted scalar",
            "targets.yaml:3:8: error: unknown step `begin` (start)",
            "targets.yaml:9:15: error: unknown step `ag` (goto); did you mean `age`?",
            "targets.yaml:11:15: error: unknown flow `nosuchflow` (flow)",
            "targets.yaml:13:16: error: unknown step `nowhere` (give_up)",
            "templates.yaml:6:9: error: unclosed `{{` in template (add `}}`)",
            "templates.yaml:7:9: error: `{{nmae}}` is never set in flow `templates` (use `save:` or `set:`)",
            "templates.yaml:7:9: error: `{{contact.nickname}}` is never set by any flow (use `contact:` or `set: {contact.nickname: ...}`)",
            "templates.yaml:12:16: error: cannot set `bad key`: use a name or `contact.name`",
            "types.yaml:1:11: error: expected a mapping for `keywords`, found a list",
            "types.yaml:2:5: error: expected text for `to`, found a mapping",
            "unknown_keys.yaml:3:3: error: unknown key `keyword` in `trigger` (expected one of: keywords, regex, catch_all, to)",
            "unknown_keys.yaml:6:5: error: unknown key `sya` in step `one` (expected one of: say, media, set, wait, retry, goto, flow, end, silence, timeout, description, call)",
            "unknown_keys.yaml:9:9: error: unknown key `gotoo` in a route (expected one of: any_of, exact, contains, starts_with, regex, number, yes, no, anything, else, when, save, contact, set, say, media, goto, flow, end, silence, description)",
        ],
    );
    // load_dir refuses the set and reports the same list.
    let err = load_dir(&fixture("broken/schema")).unwrap_err();
    assert_eq!(err, diags);
}

/// `timeout:` on a waiting step: durations, targets, strictly increasing
/// order, only on steps that wait, within `expire_after`, templates; a
/// step reached only by a timeout's `goto` counts as reached (`gave_up`
/// in reached.yaml, `done` here).
#[test]
fn timeout_problems_are_reported_with_positions() {
    assert_diags(
        &check_dir(&fixture("broken/timeouts")),
        &[
            "reached.yaml:8:12: error: `{{nme}}` is never set in flow `reached` (use `save:` or `set:`)",
            "timeouts.yaml:8:16: error: invalid duration `2 hours` (use a number and s, m, h or d, like 30m or 2h; at most 365d)",
            "timeouts.yaml:11:15: error: unknown step `nowhere` (goto)",
            "timeouts.yaml:12:9: error: a timeout needs `after:` (how long after the step started waiting, like 2h)",
            "timeouts.yaml:13:9: error: a timeout with neither `say` nor goto/flow/end/silence does nothing; add one",
            "timeouts.yaml:16:9: error: a timeout has both `say` and `silence`; silence sends nothing",
            "timeouts.yaml:17:16: error: this timeout is due after the run has expired (expire_after 1d); raise the flow's expire_after or shorten `after`",
            "timeouts.yaml:26:16: error: timeouts of step `order` must come in strictly increasing `after` order: 1h is not after 3h",
            "timeouts.yaml:28:16: error: timeouts of step `order` must come in strictly increasing `after` order: 3h is not after 3h",
            "timeouts.yaml:32:5: error: `timeout` needs `wait` in step `no_wait`: only a step that waits for a reply can time out",
            "timeouts.yaml:36:3: error: step `loop` can never be left: every route and the retry give-up come back to it",
            "timeouts.yaml:42:3: error: step `island` is never reached from the start step `ask`",
        ],
    );
}

/// A campaign file: `when:` grammar, exactly one of `start:` and `send:`,
/// `if_busy` only with `start:`, the flow started exists, a `send:` text
/// names contact fields only.
#[test]
fn campaign_problems_are_reported_with_positions() {
    assert_diags(
        &check_dir(&fixture("broken/campaigns")),
        &[
            "campaigns.yaml:6:15: error: unknown unit `fortnights` (minutes, hours, days, weeks); write `when:` like `1 day before at 10:00`, `2 hours before`, `3 days after` or `at 09:00` (the day itself)",
            "campaigns.yaml:11:15: error: event `both` has both `start:` and `send:`: one of them",
            "campaigns.yaml:13:9: error: event `neither` needs `start:` (the flow it starts) or `send:` (the message)",
            "campaigns.yaml:17:9: error: `if_busy` is for `start:` events: a `send:` message goes whatever the contact is doing",
            "campaigns.yaml:20:16: error: event `ghost` starts unknown flow `nowhere` (flows: remind)",
            "campaigns.yaml:23:15: error: `send`: `{{time}}`: only contact fields can be used here, like {{contact.name}} (or {{contact.name|friend}} for a fallback)",
        ],
    );
}

#[test]
fn cross_file_collisions_name_the_first_definition() {
    assert_diags(
        &check_dir(&fixture("broken/dupes")),
        &[
            "b.yaml:2:3: error: keyword `hours!` is already used at tests/flows/broken/dupes/a.yaml:2:3 (`HOURS`)",
            "b.yaml:3:17: error: unknown flow `missing` (flow)",
            "b.yaml:4:1: error: more than one `default:` reply for the same numbers (first at tests/flows/broken/dupes/a.yaml:3:1)",
            "c.yaml:3:14: error: keyword `Hours` is already used at tests/flows/broken/dupes/a.yaml:2:3 (`HOURS`)",
            "d.yaml:1:7: error: flow `a_flow` is already defined in tests/flows/broken/dupes/c.yaml",
            "e.yaml:2:14: error: keyword `new` is already used at tests/flows/broken/dupes/c.yaml:3:21 (`NEW`)",
            "e.yaml:3:3: error: flow `e` is a second catch_all for the same numbers (`a_flow` at tests/flows/broken/dupes/c.yaml:4:3 already is)",
        ],
    );
}

#[test]
fn rhai_errors_are_located_in_the_rhai_or_yaml_file() {
    let diags = check_dir(&fixture("broken/rhai"));
    assert_diags(
        &diags,
        &[
            // Expressions in YAML: positions inside quoted and block scalars.
            "exprs.yaml:3:31: error: script is incomplete",
            "exprs.yaml:5:30: error: script is incomplete",
            "exprs.yaml:7:16: error: undefined variable: nosuch",
            "exprs.yaml:12:30: error: script is incomplete",
            "exprs.yaml:14:24: error: unknown operator: '++'",
            "keywords.yaml:2:6: error: `{{= }}` expressions are only allowed in flow files, not in keyword replies",
            "missing.yaml:1:9: error: script `nosuch.rhai` not found in the flows directory",
            "missing.yaml:2:1: error: a script flow has no steps; remove `steps` or `script`",
            "noentry.rhai:1:1: error: script must define fn on_message(msg, state)",
            "noentry.yaml:2:11: error: a fallback cannot use `{{= }}`: it is what is sent when expressions fail",
            "nowake.rhai:3:3: error: the script calls wake_after but defines no fn on_timeout(name, state) to be woken in",
            "paths.yaml:1:9: error: `script` names a .rhai file in the flows directory, like quiz.rhai, not `../secret.rhai`",
            // A regex written in a call is compiled at load, at the call.
            "regex.yaml:5:16: error: bad regex \"^[sml\": unclosed character class",
            "regex.rhai:3:15: error: bad regex \"(a|b\": unclosed group",
            // Scripts: positions in the .rhai file.
            "syntax.rhai:2:23: error: unexpected ';'",
            "typo.rhai:3:3: error: undefined variable: mgs",
            "unused.rhai:0:0: warning: not used by any flow (name it with `script: unused.rhai` in a flow file; put modules in a subdirectory such as lib/)",
        ],
    );
    assert_eq!(load_dir(&fixture("broken/rhai")).unwrap_err(), diags);
}

#[test]
fn scripts_and_their_modules_are_part_of_the_version() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    std::fs::create_dir(dir.path().join("lib")).unwrap();
    write("s.yaml", "trigger: { keywords: [S] }\nscript: s.rhai\n");
    write(
        "s.rhai",
        "import \"lib/m\" as m;\nfn on_message(msg, state) { m::hi() }\n",
    );
    write("lib/m.rhai", "fn hi() { \"hi\" }\n");
    let first = load_dir(dir.path()).unwrap().set;
    assert!(first.has_scripts());
    assert!(first.files().iter().any(|f| f.ends_with("lib/m.rhai")));

    write("lib/m.rhai", "fn hi() { \"hello\" }\n");
    let second = load_dir(dir.path()).unwrap().set;
    assert_ne!(first.version(), second.version());

    // A set without Rhai has no sandbox, and no need to leave the runtime.
    let plain = load_dir(&fixture("constructs/variables")).unwrap().set;
    assert!(!plain.has_scripts());
}

#[test]
fn shipped_and_construct_flows_are_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut dirs = vec![root.join("flows")];
    for entry in std::fs::read_dir(root.join("tests/flows/constructs")).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            dirs.push(p);
        }
    }
    for dir in dirs {
        let diags = check_dir(&dir);
        assert!(
            diags.is_empty(),
            "{}: {:#?}",
            dir.display(),
            rendered(&diags)
        );
    }
}

#[test]
fn hostile_files_fail_fast_with_located_errors() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| std::fs::write(dir.path().join(name), bytes).unwrap();

    write("big.yaml", &vec![b'#'; 1024 * 1024 + 1]);
    let mut bomb = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..10 {
        let p = format!("*a{}", i - 1);
        bomb.push_str(&format!("a{i}: &a{i} [{}]\n", [p.as_str(); 10].join(", ")));
    }
    write("bomb.yaml", bomb.as_bytes());
    write("deep_flow.yaml", "[".repeat(500_000).as_bytes());
    let block: String = (0..200)
        .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
        .collect();
    write("deep_block.yaml", block.as_bytes());
    write("binary.yaml", b"keywords:\n  A\xff: x\n");
    write("empty.yaml", b"# nothing here\n");
    write("scalar.yaml", b"just text\n");
    write(
        "two_docs.yaml",
        b"keywords: {A: a}\n---\nkeywords: {B: b}\n",
    );
    // Aliases of long text: few values, but megabytes each once expanded.
    let fan = format!(
        "keywords:\n  A: &long \"{}\"\n  B: [{}]\n",
        "x".repeat(100_000),
        vec!["*long"; 100].join(", ")
    );
    write("fan.yaml", fan.as_bytes());
    let mut laughs = format!("l0: &l0 \"{}\"\n", "y".repeat(1_000));
    for i in 1..8 {
        let p = format!("*l{}", i - 1);
        laughs.push_str(&format!("l{i}: &l{i} [{}]\n", [p.as_str(); 10].join(", ")));
    }
    write("laughs.yaml", laughs.as_bytes());
    write(".hidden.yaml", b"{{{{");
    write("notes.txt", b"{{{{");

    let started = Instant::now();
    let diags = check_dir(dir.path());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_diags(
        &diags,
        &[
            "big.yaml:1:1: error: file is 1048577 bytes; flow files are limited to 1048576 bytes (1 MiB)",
            "binary.yaml:2:4: error: file is not valid UTF-8",
            "bomb.yaml:5:45: error: document expands to more than 100000 values (too many aliases?)",
            "deep_block.yaml:33:36: error: values nested more than 32 levels deep",
            "deep_flow.yaml:1:256: error: values nested more than 32 levels deep",
            "empty.yaml:1:1: warning: empty file",
            "fan.yaml:3:581: error: document expands to more than 8 MiB (too many aliases?)",
            "laughs.yaml:5:40: error: document expands to more than 8 MiB (too many aliases?)",
            "scalar.yaml:1:1: error: a flow file must be a mapping with `keywords:` or `steps:`, found text",
            "two_docs.yaml:2:1: error: only one YAML document per file (remove the second `---`)",
        ],
    );
}

/// A hostile file: 300 KB of text anchored once and aliased 5,900
/// times, 309 KB on disk and 1.77 GB once expanded. `smsflow check` must
/// refuse it at the alias that crosses the budget, and do so inside a
/// 256 MiB address space (the loader used to abort on the first failed
/// allocation there).
#[cfg(target_os = "linux")]
#[test]
fn check_refuses_an_alias_bomb_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let bomb = format!(
        "keywords:\n  A: &a \"{}\"\n  B: [{}]\n",
        "x".repeat(300_000),
        vec!["*a"; 5_900].join(",")
    );
    std::fs::write(dir.path().join("bomb.yaml"), &bomb).unwrap();
    let out = std::process::Command::new("sh")
        .args(["-c", "ulimit -v 262144 && exec \"$0\" check \"$1\""])
        .arg(env!("CARGO_BIN_EXE_smsflow"))
        .arg(dir.path())
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{printed}");
    // The 27th alias crosses 8 MiB: column 7 + 3 * 26.
    assert!(
        printed.contains(
            "bomb.yaml:3:85: error: document expands to more than 8 MiB (too many aliases?)"
        ),
        "{printed}"
    );
}

#[test]
fn missing_directory_is_an_error() {
    let diags = load_dir(Path::new("/nonexistent/flows")).unwrap_err();
    assert_eq!(diags.len(), 1);
    assert!(diags[0]
        .to_string()
        .starts_with("/nonexistent/flows: error: cannot read flows directory"));
}

#[test]
fn version_tracks_contents_and_files_are_listed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("k.yaml"), "keywords: {A: a}\n").unwrap();
    std::fs::write(dir.path().join("t.chat"), "> a\n< a\n").unwrap();
    let a = load_dir(dir.path()).unwrap();
    let again = load_dir(dir.path()).unwrap();
    assert_eq!(a.set.version(), again.set.version());
    assert_eq!(a.set.version().len(), 64);
    assert_eq!(a.set.files(), &[dir.path().join("k.yaml")]);
    std::fs::write(dir.path().join("k.yaml"), "keywords: {A: b}\n").unwrap();
    let b = load_dir(dir.path()).unwrap();
    assert_ne!(a.set.version(), b.set.version());
    assert_ne!(FlowSet::empty().version(), b.set.version());
    assert!(FlowSet::empty().files().is_empty());

    fn shareable<T: Send + Sync + Clone + 'static>() {}
    shareable::<FlowSet>();
}

#[test]
fn display_format_matches_compilers() {
    let diags = check_dir(&fixture("broken/schema"));
    let d = diags.iter().find(|d| d.message.contains("`ag`")).unwrap();
    let shown = d.to_string();
    assert!(
        shown.ends_with("targets.yaml:9:15: error: unknown step `ag` (goto); did you mean `age`?"),
        "{shown}"
    );
}

#[test]
fn words_the_consent_handling_takes_first_are_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("k.yaml"),
        "keywords:\n  QUIT: bye\n  HOURS: open\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("f.yaml"),
        "trigger: {keywords: [GO]}\nsteps:\n  ask:\n    say: \"Continue?\"\n    wait:\n      - any_of: [help, yes, more]\n        say: \"ok\"\n",
    )
    .unwrap();
    let diags = smsflow::flow::check_dir(dir.path());
    let lines: Vec<String> = diags
        .iter()
        .map(|d| {
            format!(
                "{}:{}:{}: {}",
                d.file.file_name().unwrap().to_string_lossy(),
                d.line,
                d.column,
                d.message
            )
        })
        .collect();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(diags
        .iter()
        .all(|d| d.severity == smsflow::flow::Severity::Warning));
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("k.yaml:2:3: `QUIT` is an opt-out keyword")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("f.yaml:3:3: `help` is a help keyword")),
        "{lines:#?}"
    );
}

/// A flows directory in a temp dir: (relative path, contents).
fn temp_flows(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    dir
}

#[test]
fn contact_fields_set_in_imported_modules_are_known_and_typos_still_reported() {
    let dir = temp_flows(&[
        ("order.yaml", "trigger: {keywords: [ORDER]}\nscript: order.rhai\n"),
        (
            "order.rhai",
            "import \"lib/orders\" as orders;\nfn on_message(msg, state) {\n    set_contact(\"name\", \"Ann\");\n    orders::remember(msg.body)\n}\n",
        ),
        (
            "lib/orders.rhai",
            "import \"lib/util\" as util;\nfn remember(text) { set_contact(\"last_order\", util::clean(text)); \"ok\" }\n",
        ),
        ("lib/util.rhai", "fn clean(t) { t.trim(); t }\n"),
        (
            "keywords.yaml",
            "keywords:\n  LAST: \"{{contact.name}}: {{contact.last_order}}\"\n  TYPO: \"{{contact.last_ordr}}\"\n",
        ),
    ]);
    assert_diags(
        &check_dir(dir.path()),
        &["keywords.yaml:3:9: error: `{{contact.last_ordr}}` is never set by any flow (use `contact:` or `set: {contact.last_ordr: ...}`)"],
    );

    // A field name computed in a module: any field may exist, nothing is
    // reported.
    std::fs::write(
        dir.path().join("lib/util.rhai"),
        "fn clean(t) { set_contact(\"x\" + t, 1); t }\n",
    )
    .unwrap();
    assert_diags(&check_dir(dir.path()), &[]);
}

#[test]
fn a_script_that_does_not_compile_is_the_only_error_reported() {
    let dir = temp_flows(&[
        (
            "quiz.yaml",
            "trigger: {keywords: [QUIZ]}\nscript: quiz.rhai\n",
        ),
        (
            "quiz.rhai",
            "fn on_message(msg, state) {\n    set_contact(\"score\", 1)\n    let x = ;\n}\n",
        ),
        (
            "keywords.yaml",
            "keywords:\n  SCORE: \"Your score: {{contact.score}}\"\n  Q: { flow: quiz }\n",
        ),
    ]);
    let diags = check_dir(dir.path());
    assert_diags(
        &diags,
        &["quiz.rhai:3:5: error: expecting ';' to terminate this statement"],
    );
    assert_eq!(load_dir(dir.path()).unwrap_err(), diags);
}

#[test]
fn replies_inviting_a_consent_word_as_an_answer_are_warned_about() {
    let dir = temp_flows(&[
        (
            "booking.yaml",
            r#"trigger: {keywords: [BOOK]}
steps:
  confirm:
    say: "Your table for 2 is booked. Reply YES or CANCEL."
    wait:
      - yes: true
        say: "See you! To stop these reminders, reply STOP."
        goto: cancel
      - else: true
        say: "Reply YES to confirm, NO to move it, or STOP to opt out."
    retry:
      say: "Text START to begin again, or HELP for help."
  cancel:
    say: "Reply CANCEL to cancel your booking."
"#,
        ),
        (
            "keywords.yaml",
            "keywords:\n  HOURS: \"9-5. Text INFO for your order status, or END to finish.\"\ndefault: \"Text STOP to unsubscribe, HELP for help.\"\n",
        ),
    ]);
    let diags = check_dir(dir.path());
    let warning = |file: &str, at: &str, word: &str, what: &str, does: &str| {
        format!(
            "{file}:{at}: warning: this reply invites `{word}` as an answer, but it is {what}: \
             a sender who sends it {does} (offer another word, or say what it does, like \
             \"Reply STOP to unsubscribe\")"
        )
    };
    let stop = "is opted out, and this flow never sees the answer";
    let start = "gets silence, and this flow never sees the answer";
    let help = "gets the help text, and this flow never sees the answer";
    assert_diags(
        &diags,
        &[
            &warning("booking.yaml", "4:10", "CANCEL", "an opt-out keyword", stop),
            &warning("booking.yaml", "12:12", "START", "an opt-in keyword", start),
            &warning(
                "booking.yaml",
                "14:10",
                "CANCEL",
                "an opt-out keyword",
                stop,
            ),
            &warning("keywords.yaml", "2:10", "INFO", "a help keyword", help),
            &warning("keywords.yaml", "2:10", "END", "an opt-out keyword", stop),
        ],
    );

    // `check --config`: the configured lists decide.
    let compliance = smsflow::compliance::ComplianceConfig {
        stop_keywords: vec!["STOP".into(), "FINISH".into()],
        ..Default::default()
    };
    std::fs::write(
        dir.path().join("keywords.yaml"),
        "keywords:\n  HOURS: \"9-5. Reply FINISH or CANCEL.\"\n",
    )
    .unwrap();
    let diags = smsflow::flow::check_dir_with(
        dir.path(),
        &smsflow::flow::ReservedWords::new(&compliance, &[]),
    );
    assert_diags(
        &diags,
        &[
            &warning("booking.yaml", "12:12", "START", "an opt-in keyword", start),
            &warning(
                "keywords.yaml",
                "2:10",
                "FINISH",
                "an opt-out keyword",
                stop,
            ),
        ],
    );
}

#[test]
fn whole_number_matchers_are_validated() {
    let dir = temp_flows(&[(
        "f.yaml",
        r#"trigger: {keywords: [GO]}
steps:
  a:
    say: "How many?"
    wait:
      - number: { min: 1.5, integer: true }
        say: x
      - number: { max: 3, integer: yes }
        say: y
      - number: whole
        say: z
      - number: { min: 1, max: 10, integer: true }
        say: ok
      - number: integer
        say: ok
"#,
    )]);
    assert_diags(
        &check_dir(dir.path()),
        &[
            "f.yaml:6:24: error: `min` must be a whole number with `integer: true`, got 1.5",
            "f.yaml:8:36: error: expected true or false for `integer`",
            "f.yaml:10:17: error: `number` is true, integer, a range like 13..120, or {min: 13, max: 120, integer: true}",
        ],
    );
}

/// A flow, script or module that is a symlink leading outside the
/// flows directory is refused where it is, as an import leading outside
/// already was; one leading inside is read.
#[cfg(unix)]
#[test]
fn symlinks_leading_outside_the_flows_directory_are_refused() {
    use std::os::unix::fs::symlink;
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(
        outside.path().join("secret.yaml"),
        "keywords: {SECRET: s}\n",
    )
    .unwrap();
    std::fs::write(
        outside.path().join("secret.rhai"),
        "fn on_message(msg, state) { \"s\" }\n",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let flows = dir.path();
    std::fs::write(flows.join("k.yaml"), "keywords: {A: a}\n").unwrap();
    std::fs::create_dir_all(flows.join("lib")).unwrap();
    std::fs::create_dir_all(flows.join("drafts")).unwrap();
    std::fs::write(flows.join("drafts/b.yaml"), "keywords: {B: b}\n").unwrap();
    symlink(
        outside.path().join("secret.yaml"),
        flows.join("linked.yaml"),
    )
    .unwrap();
    symlink(
        outside.path().join("secret.rhai"),
        flows.join("linked.rhai"),
    )
    .unwrap();
    symlink(outside.path().join("secret.rhai"), flows.join("lib/m.rhai")).unwrap();
    symlink(flows.join("missing.yaml"), flows.join("dangling.yaml")).unwrap();
    symlink(flows.join("drafts/b.yaml"), flows.join("b.yaml")).unwrap();

    let diags = check_dir(flows);
    let shown = rendered(&diags);
    for file in ["linked.yaml", "linked.rhai", "m.rhai"] {
        assert!(
            shown.iter().any(|d| d
                .starts_with(&format!("{file}:1:1: error: this file is a symlink to "))
                && d.ends_with(
                    "outside the flows directory; flows, scripts and modules must be inside it"
                )),
            "{file}: {shown:#?}"
        );
    }
    assert!(
        shown.iter().any(|d| d.starts_with(
            "dangling.yaml:1:1: error: this file is a symlink that cannot be followed"
        )),
        "{shown:#?}"
    );
    assert_eq!(shown.len(), 4, "{shown:#?}");

    // Without them, the set loads, the link inside included.
    for file in ["linked.yaml", "linked.rhai", "lib/m.rhai", "dangling.yaml"] {
        std::fs::remove_file(flows.join(file)).unwrap();
    }
    let loaded = load_dir(flows).unwrap_or_else(|d| panic!("{:#?}", rendered(&d)));
    assert_eq!(
        loaded.set.files(),
        &[flows.join("b.yaml"), flows.join("k.yaml")]
    );
}

/// A directory symlink that leads back up is not walked (it was
/// followed eight levels deep, a module counted once per way to reach it).
#[cfg(unix)]
#[test]
fn directory_symlink_loops_are_not_walked() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let flows = dir.path();
    std::fs::write(flows.join("k.yaml"), "keywords: {A: a}\n").unwrap();
    std::fs::create_dir_all(flows.join("lib")).unwrap();
    std::fs::write(flows.join("lib/m.rhai"), "fn x() { 1 }\n").unwrap();
    symlink(flows, flows.join("lib/up")).unwrap();
    symlink(flows.join("lib"), flows.join("lib/again")).unwrap();
    let loaded = load_dir(flows).unwrap_or_else(|d| panic!("{:#?}", rendered(&d)));
    assert_eq!(
        loaded.set.files(),
        &[flows.join("k.yaml"), flows.join("lib/m.rhai")]
    );
}

/// `call:`: methods, URLs whose host is written out, templates, header
/// names, secrets not set here (a warning: the server may have them),
/// timeouts, `save` paths, `on_error` and `on_status` targets.
#[test]
fn call_problems_are_reported_with_positions() {
    assert_diags(
        &check_dir(&fixture("broken/calls")),
        &[
            "shop.yaml:5:15: error: unknown method `FETCH` (use one of: GET, POST, PUT, PATCH, DELETE)",
            "shop.yaml:11:12: error: the host of a call's `url` must be written out (templates only in the path or query)",
            "shop.yaml:17:12: error: `url` must start with https:// or http://, got `ftp://shop.example/x`",
            "shop.yaml:23:12: error: unclosed `{{` in template (add `}}`)",
            "shop.yaml:25:33: warning: secret `SMSFLOW_TEST_SURELY_UNSET_SECRET` is not set in this environment; calls that need it fail (and take on_error) until it is",
            "shop.yaml:26:9: error: `Bad Header` is not a header name",
            "shop.yaml:28:16: error: invalid call timeout `30s` (use milliseconds or seconds, like 800ms or 3s; at most 10s)",
            "shop.yaml:30:19: error: `body.id` is not a path of a call's answer (use status, error, json or json.a.b)",
            "shop.yaml:35:9: error: `7` is not a status: use a code like 404 or a class like 4xx",
            "shop.yaml:39:7: error: a GET call has no body; use `method: POST` (or PUT, PATCH)",
            "shop.yaml:39:7: error: a call needs `on_error:` (the step to go to when it fails: timeout, refused, non-2xx)",
            "shop.yaml:46:38: error: `{{sise}}` is never set in flow `shop` (use `save:` or `set:`)",
            "shop.yaml:50:17: error: unknown step `sorri` (call)",
            "shop.yaml:52:14: error: unknown step `gone` (call)",
        ],
    );
}

/// `{{call.*}}` names what a call's answer has, and only where a call's
/// answer can be: in a flow that makes a call, or one such a flow enters
/// with `flow:`; never in keyword replies.
#[test]
fn call_answer_names_are_checked_where_a_call_precedes_them() {
    let dir = temp_flows(&[
        (
            "look.yaml",
            "trigger: {keywords: [LOOK]}\nsteps:\n  look:\n    call:\n      url: https://shop.example/x\n      on_error: sorry\n    say: \"{{call.stauts}} {{call.status}} {{call.json.order.eta}}\"\n    flow: after\n  sorry:\n    say: \"{{call.error}}\"\n",
        ),
        (
            "after.yaml",
            "steps:\n  show:\n    say: \"{{call.ok}}\"\n",
        ),
        (
            "plain.yaml",
            "trigger: {keywords: [PLAIN]}\nsteps:\n  a:\n    say: \"{{call.status}}\"\n    goto: b\n  b:\n    call:\n      method: POST\n      url: https://shop.example/x\n      after_answer: true\n    say: \"{{call.json.id}}\"\n",
        ),
        ("keywords.yaml", "keywords:\n  HI: \"{{call.ok}}\"\n"),
    ]);
    assert_diags(
        &check_dir(dir.path()),
        &[
            "look.yaml:7:10: error: `{{call.stauts}}` is not part of a call's answer (use call.status, call.ok, call.error, call.json or call.json.a.b)",
            "plain.yaml:4:10: error: `{{call.status}}`: no step of flow `plain` makes a call (`call:` without `after_answer`), so it is always empty",
            "plain.yaml:11:10: error: `{{call.json.id}}`: no step of flow `plain` makes a call (`call:` without `after_answer`), so it is always empty",
            "keywords.yaml:2:7: error: `{{call.ok}}`: keyword replies make no calls (use a flow step with `call:`)",
        ],
    );
}

#[test]
fn fields_and_vars_given_from_outside_are_declared_by_the_flow() {
    let flow = |decl: &str| {
        format!(
            "name: remind\n{decl}steps:\n  ask:\n    say: \"{{{{contact.appt}}}} {{{{ref}}}}\"\n    wait:\n      - yes: true\n        say: ok\n"
        )
    };
    let dir = temp_flows(&[("remind.yaml", &flow(""))]);
    assert_diags(
        &check_dir(dir.path()),
        &[
            "remind.yaml:4:10: error: `{{contact.appt}}` is never set by any flow (use `contact:` or `set: {contact.appt: ...}`)",
            "remind.yaml:4:10: error: `{{ref}}` is never set in flow `remind` (use `save:` or `set:`)",
        ],
    );
    let dir = temp_flows(&[("remind.yaml", &flow("fields: [appt]\nvars: [ref]\n"))]);
    assert_diags(&check_dir(dir.path()), &[]);
    let dir = temp_flows(&[("remind.yaml", &flow("fields: [\"not ok\"]\nvars: ref\n"))]);
    assert_diags(
        &check_dir(dir.path()),
        &[
            "remind.yaml:2:10: error: `fields` must be a name of letters, digits and `_`, got `not ok`",
            "remind.yaml:6:10: error: `{{contact.appt}}` is never set by any flow (use `contact:` or `set: {contact.appt: ...}`)",
        ],
    );
}

/// An `after_answer` call has no answer for the flow: `save`, `on_error`
/// and `on_status` are refused there, and `on_error` is not required.
#[test]
fn after_answer_calls_have_no_answer_paths() {
    let flow = |extra: &str| {
        format!(
            "trigger: {{keywords: [GO]}}\nsteps:\n  send:\n    call:\n      method: POST\n      url: https://shop.example/orders\n      after_answer: true\n{extra}    say: ok\n"
        )
    };
    let dir = temp_flows(&[("shop.yaml", &flow(""))]);
    assert_diags(&check_dir(dir.path()), &[]);
    let dir = temp_flows(&[("shop.yaml", &flow("      on_error: send\n"))]);
    assert_diags(
        &check_dir(dir.path()),
        &["shop.yaml:8:7: error: an `after_answer` call is made after the reply and has no answer for the flow: remove `on_error`"],
    );
}
