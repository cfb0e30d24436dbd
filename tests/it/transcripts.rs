//! A transcript that passes means the phone behaves the same:
//! every shipped transcript runs through the transcript runner (what
//! `smsflow test` and `--require-tests` use) and, message by message,
//! through the real server over HTTP with webhooks signed as Twilio signs
//! them, with one configuration for both; the replies must be identical.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use smsflow::author;
use smsflow::config::{Auth, AuthToken, Config};
use smsflow::flow::{self, Line, ReplyLine, Transcript};
use smsflow::pipeline::PipelineOptions;
use smsflow::store::{ConvKey, Store};

use crate::helpers::{spawn_with, TestApp, TOKEN};

fn shipped_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("flows")
}

/// The server's default configuration (as `serve` resolves it without a
/// file), listening on port 0 over the shipped flows and a fresh store.
fn server_config(data: &Path, transcript: &Transcript) -> Config {
    let mut config = author::config_for_tools(None).expect("defaults resolve");
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.public_url = "http://localhost".into();
    config.flows_dir = shipped_dir();
    config.data_dir = data.to_path_buf();
    config.auth = Auth::Verify(AuthToken::new(TOKEN));
    config.watch = false;
    config.retention_days = 0;
    if let Some(words) = &transcript.interrupt {
        config.interrupt_keywords.clone_from(words);
    }
    config
}

/// The messages of a TwiML answer as transcript lines (a test-side
/// parser, independent of the one `smsflow test` uses).
fn wire_lines(twiml: &str) -> Vec<ReplyLine> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(twiml);
    let mut out: Vec<flow::Reply> = Vec::new();
    let mut element = String::new();
    loop {
        match reader.read_event().expect("TwiML parses") {
            Event::Start(e) => {
                element = String::from_utf8(e.name().as_ref().to_vec()).unwrap();
                match element.as_str() {
                    "Message" => out.push(flow::Reply::default()),
                    "Media" => out.last_mut().unwrap().media.push(String::new()),
                    _ => {}
                }
            }
            Event::End(_) => element.clear(),
            Event::Text(t) => {
                let text = t.unescape().unwrap();
                let msg = out.last_mut();
                match (element.as_str(), msg) {
                    ("Body", Some(m)) => m.body.push_str(&text),
                    ("Media", Some(m)) => m.media.last_mut().unwrap().push_str(&text),
                    _ => {}
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    out.into_iter().map(ReplyLine::Reply).collect()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// How far one transcript could be compared.
struct Compared {
    exchanges: usize,
    /// Why the comparison stopped before the end, if it did.
    stopped: Option<String>,
}

/// Replay `transcript` against `app` over HTTP, comparing each answer
/// with the runner's `run`, and each `?` assertion with the server's store.
async fn replay(
    app: &TestApp,
    file: &Path,
    transcript: &Transcript,
    run: &author::TranscriptRun,
) -> Compared {
    let set = flow::load_dir(&shipped_dir()).unwrap().set;
    let (mut from, mut to) = (transcript.from.clone(), transcript.to.clone());
    let key = |to: &str, from: &str| ConvKey::new(to, from);
    if transcript.is_seeded() {
        // The server's clock is the real one: seed as of now.
        let conv = transcript.seed(&set, unix_now()).expect("seed");
        let bytes = serde_json::to_vec(&conv).unwrap();
        app.store
            .put_conversation(&key(&to, &from), &bytes, conv.run.is_none(), unix_now())
            .unwrap();
    }
    let mut exchanges = run.exchanges.iter();
    let mut compared = 0;
    for (line, step) in &transcript.lines {
        let at = format!("{}:{line}", file.display());
        match step {
            Line::Send { body, media, .. } => {
                let ran = exchanges.next().expect("the runner sent this message too");
                assert_eq!(ran.line, *line, "{at}");
                let mut params = vec![
                    ("MessageSid".to_owned(), ran.message_sid.clone()),
                    (
                        "AccountSid".to_owned(),
                        "AC00000000000000000000000000000000".to_owned(),
                    ),
                    ("From".to_owned(), from.clone()),
                    ("To".to_owned(), to.clone()),
                    ("Body".to_owned(), body.clone()),
                    ("NumMedia".to_owned(), media.len().to_string()),
                ];
                for (i, url) in media.iter().enumerate() {
                    params.push((format!("MediaUrl{i}"), url.clone()));
                    params.push((format!("MediaContentType{i}"), "image/jpeg".to_owned()));
                }
                let reply = app.post_signed("/twilio/sms", &params).await;
                assert_eq!(reply.status, 200, "{at}: {}", reply.body);
                let got = wire_lines(&reply.body);
                // Over the wire a silence has no reason; its TwiML is empty.
                let want: Vec<ReplyLine> = ran
                    .actual
                    .iter()
                    .filter(|l| matches!(l, ReplyLine::Reply(_)))
                    .cloned()
                    .collect();
                assert_eq!(
                    got, want,
                    "{at}: `> {body}`: the server (left) and the transcript runner (right) differ"
                );
                compared += 1;
            }
            Line::Wait { .. } => {
                return Compared {
                    exchanges: compared,
                    stopped: Some(format!(
                        "{at}: `@ wait`: the server reads the real clock and has no virtual one"
                    )),
                }
            }
            Line::Start { .. } => {
                return Compared {
                    exchanges: compared,
                    stopped: Some(format!(
                        "{at}: `@ start`: what a start says goes to the outbox, not to a webhook's answer"
                    )),
                }
            }
            Line::Load(_) => {
                return Compared {
                    exchanges: compared,
                    stopped: Some(format!("{at}: `@ load`: the server's flows are fixed here")),
                }
            }
            Line::Http(_) => {
                return Compared {
                    exchanges: compared,
                    stopped: Some(format!(
                        "{at}: `@ http`: the server makes real calls, not declared ones"
                    )),
                }
            }
            Line::Reset => {
                app.store.delete_conversation(&key(&to, &from)).unwrap();
            }
            Line::From(n) => from.clone_from(n),
            Line::To(n) => to.clone_from(n),
            Line::Assert { what, value } => {
                let conv: flow::Conversation = app
                    .store
                    .conversation(&key(&to, &from))
                    .unwrap()
                    .map(|b| flow::Conversation::from_stored(&b).unwrap())
                    .unwrap_or_default();
                let actual = flow::assertion_value(&conv, what).expect("known assertion");
                assert_eq!(&actual, value, "{at}: `? {what}` in the server's store");
            }
        }
    }
    Compared {
        exchanges: compared,
        stopped: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_shipped_transcript_answers_the_same_over_http() {
    let mut chats: Vec<PathBuf> = std::fs::read_dir(shipped_dir())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "chat"))
        .collect();
    chats.sort();
    assert!(chats.len() >= 8, "{chats:?}");
    let set = flow::load_dir(&shipped_dir()).unwrap().set;

    let mut report = Vec::new();
    let mut total = 0;
    for chat in &chats {
        let transcript = Transcript::read(chat).unwrap();
        // One configuration for both sides, and a fresh store (and loop
        // guard) per run, as the runner has.
        let tmp = tempfile::tempdir().unwrap();
        let config = server_config(&tmp.path().join("data"), &transcript);
        let options = PipelineOptions::from_config(&config);
        // The transcript passes as written (its virtual clock starts at its
        // `now:`) …
        let run = author::run_transcript(chat, &set, &options);
        assert!(run.passed(), "{:#?}", run.failures);
        // … and the server, whose clock is the real one, answers as the
        // runner does started now: a reply can depend on the day (order's
        // pickup day). Redone in the rare case the day changed meanwhile.
        let compared = loop {
            let mut now_transcript = transcript.clone();
            now_transcript.start = unix_now();
            let day = now_transcript.start / 86_400;
            let run = author::run_parsed(&now_transcript, chat, &set, &options);
            let data = tempfile::tempdir().unwrap();
            let app = spawn_with(server_config(data.path(), &transcript)).await;
            let compared = replay(&app, chat, &transcript, &run).await;
            app.stop().await;
            if unix_now() / 86_400 == day {
                break compared;
            }
        };
        assert!(
            compared.exchanges > 0,
            "{}: nothing compared",
            chat.display()
        );
        total += compared.exchanges;
        report.push(match compared.stopped {
            None => format!("{}: all {} messages", chat.display(), compared.exchanges),
            Some(why) => format!(
                "{}: first {} messages; {why}",
                chat.display(),
                compared.exchanges
            ),
        });
    }
    // Shown with --nocapture: what was compared, and where and why a file
    // stopped early.
    println!("{total} messages compared:\n{}", report.join("\n"));
    let consent = report
        .iter()
        .find(|r| r.contains("consent.chat"))
        .expect("the consent transcript is shipped");
    assert!(consent.contains(": all "), "{consent}");
}

#[tokio::test(flavor = "multi_thread")]
async fn require_tests_runs_transcripts_with_the_served_configuration() {
    use smsflow::reload::ReloadOutcome;
    const HELP: &str = "Acme Bakery: text STOP to opt out.";
    let chat = format!("> help\n< {HELP}\n> hours\n< Open 9-5\n> cancel\n< (silence: opt_out)\n");
    let files = [
        ("k.yaml", "keywords:\n  HOURS: \"Open 9-5\"\n"),
        ("help.chat", chat.as_str()),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    for (name, text) in files {
        std::fs::write(flows.join(name), text).unwrap();
    }
    // The transcript holds under the served help text, so the server starts.
    let mut config = Config::for_test(&flows, &tmp.path().join("data"), TOKEN);
    config.require_tests = true;
    config.compliance.help_text = Some(HELP.to_owned());
    let app = smsflow::app::App::build(config).await.expect("starts");
    // A reload is judged with the same settings: a transcript expecting
    // the default (silence for HELP) is refused.
    std::fs::write(flows.join("help.chat"), "> help\n< (silence: help)\n").unwrap();
    match app.reloader().reload_now() {
        ReloadOutcome::Refused { errors } => assert!(
            errors.contains(&format!("- < (silence: help)\n  + < {HELP}")),
            "{errors}"
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    drop(app);

    // Without the help text, startup refuses the original transcript.
    std::fs::write(flows.join("help.chat"), &chat).unwrap();
    let mut config = Config::for_test(&flows, &tmp.path().join("data2"), TOKEN);
    config.require_tests = true;
    let err = smsflow::app::App::build(config)
        .await
        .err()
        .expect("refused");
    assert!(
        format!("{err:#}").contains(&format!("- < {HELP}\n  + < (silence: help)")),
        "{err:#}"
    );
}
