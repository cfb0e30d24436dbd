//! What goes out, over HTTP: a reply longer than one message is
//! split at whitespace into several, counting toward the ten an answer may
//! hold, whether a YAML template or a script made it long.

use crate::helpers::*;

/// Twilio's per-message body limit, in characters.
const LIMIT: usize = 1600;

/// `n` distinct five-character words separated by single spaces.
fn words(n: usize) -> String {
    (0..n)
        .map(|i| format!("w{i:04}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Checks that `parts` are `full` split at whitespace: each part within the
/// limit, no word broken, nothing lost (the parts joined by one space give
/// `full` back).
fn assert_split_at_whitespace(parts: &[String], full: &str) {
    assert!(parts.len() > 1, "not split: {} part(s)", parts.len());
    for p in parts {
        assert!(p.chars().count() <= LIMIT, "part of {} chars", p.len());
        for w in p.split(' ') {
            assert!(
                w.len() == 5 && w.starts_with('w'),
                "broken word {w:?} in a part"
            );
        }
    }
    assert_eq!(parts.join(" "), full, "text lost or changed in the split");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_template_reply_is_split_at_whitespace_not_cut() {
    let app = spawn_app(&[(
        "keywords.yaml",
        "keywords:\n  HOURS: open\ndefault: \"{{message.body}} {{message.body}}\"\n",
    )])
    .await;
    // 300 words of 5 characters: 1,799 characters, twice over: 3,599.
    let body = words(300);
    let r = app.send_sms("+15551200001", &body).await;
    assert_eq!(r.status, 200);
    let parts = bodies(&r.body);
    assert_split_at_whitespace(&parts, &format!("{body} {body}"));
    assert_eq!(parts.len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_script_reply_is_split_at_whitespace_not_cut() {
    let script = r#"
fn on_message(msg, state) {
    let words = [];
    for i in 0..500 {
        let n = `${i}`;
        while n.len() < 4 { n = "0" + n; }
        words.push("w" + n);
    }
    let text = "";
    for w in words {
        if text != "" { text += " "; }
        text += w;
    }
    text
}
"#;
    let app = spawn_app(&[
        (
            "long.yaml",
            "trigger: {keywords: [LONG]}\nscript: long.rhai\n",
        ),
        ("long.rhai", script),
    ])
    .await;
    let r = app.send_sms("+15551200002", "long").await;
    assert_eq!(r.status, 200);
    let parts = bodies(&r.body);
    // 500 words: 2,999 characters, two messages.
    assert_split_at_whitespace(&parts, &words(500));
    assert_eq!(parts.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn split_parts_count_toward_the_ten_messages() {
    let flow = r#"
trigger: {keywords: [MANY]}
steps:
  ask:
    say: "Send words"
    wait:
      - anything: true
        save: w
        goto: many
  many:
    say: ["1", "2", "3", "4", "5", "6", "7", "8", "{{w}} {{w}}", "after"]
"#;
    let app = spawn_app(&[("many.yaml", flow)]).await;
    let me = "+15551200003";
    assert_eq!(bodies(&app.send_sms(me, "many").await.body), ["Send words"]);
    let body = words(200);
    let r = app.send_sms(me, &body).await;
    let got = bodies(&r.body);
    // Eight short messages, the long one as two parts: ten; "after" is the
    // eleventh and is dropped.
    assert_eq!(got.len(), 10, "{got:?}");
    assert_eq!(got[..8], ["1", "2", "3", "4", "5", "6", "7", "8"]);
    assert_split_at_whitespace(&got[8..], &format!("{body} {body}"));
}

/// The `statusCallback` of each `<Message>` in a TwiML document, in order.
fn status_callbacks(twiml: &str) -> Vec<Option<String>> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(twiml);
    let mut out = Vec::new();
    loop {
        match reader.read_event().expect("TwiML parses") {
            Event::Start(e) | Event::Empty(e) if e.name().as_ref() == b"Message" => {
                out.push(
                    e.attributes()
                        .map(|a| a.expect("attribute"))
                        .find(|a| a.key.as_ref() == b"statusCallback")
                        .map(|a| a.unescape_value().expect("value").into_owned()),
                );
            }
            Event::Eof => break,
            _ => {}
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn each_tracked_message_names_the_flow_and_step_that_produced_it() {
    let keywords = "keywords:\n  HELLO: { say: \"Hi!\", flow: intro }\n";
    let intro = "steps:\n  welcome:\n    say: \"Welcome.\"\n    goto: more\n  more:\n    say: \"Let's sign you up.\"\n    flow: signup\n";
    let signup = "steps:\n  ask:\n    say: \"Your name?\"\n    wait:\n      - anything: true\n        say: \"Thanks.\"\n        goto: bye\n  bye:\n    say: \"Bye.\"\n";
    let app = spawn_configured(
        &[
            ("keywords.yaml", keywords),
            ("intro.yaml", intro),
            ("signup.yaml", signup),
        ],
        |c| c.track_delivery = true,
    )
    .await;
    let me = "+15551200004";
    let sid = new_sid();
    let r = app.send_sms_sid(me, "hello", &sid).await;
    assert_eq!(
        bodies(&r.body),
        ["Hi!", "Welcome.", "Let's sign you up.", "Your name?"]
    );
    let base = "http://localhost/twilio/status";
    let tagged =
        |flow: &str, step: &str| Some(format!("{base}?inbound={sid}&flow={flow}&step={step}"));
    assert_eq!(
        status_callbacks(&r.body),
        [
            // A keyword's own reply belongs to no flow.
            Some(format!("{base}?inbound={sid}")),
            tagged("intro", "welcome"),
            tagged("intro", "more"),
            tagged("signup", "ask"),
        ]
    );

    // A route's reply belongs to the waiting step, the next step's to that.
    let sid2 = new_sid();
    let r = app.send_sms_sid(me, "Ann", &sid2).await;
    assert_eq!(bodies(&r.body), ["Thanks.", "Bye."]);
    assert_eq!(
        status_callbacks(&r.body),
        [
            Some(format!("{base}?inbound={sid2}&flow=signup&step=ask")),
            Some(format!("{base}?inbound={sid2}&flow=signup&step=bye")),
        ]
    );
}
