//! Scripts over HTTP: a runaway script gets its fallback within the budget
//! while other senders keep getting answers; script state persists across
//! restarts; script errors are counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::helpers::*;

const SPIN_YAML: &str = "trigger: {keywords: [SPIN]}\nscript: spin.rhai\nfallback: \"Sorry!\"\n";
const SPIN_RHAI: &str = "fn on_message(msg, state) { loop {} }\n";
const KEYWORDS: &str = "keywords:\n  HOURS: \"open\"\n";

fn construct(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/flows/constructs/rhai/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_script_gets_the_fallback_while_others_are_answered() {
    let app = Arc::new(
        spawn_app(&[
            ("spin.yaml", SPIN_YAML),
            ("spin.rhai", SPIN_RHAI),
            ("keywords.yaml", KEYWORDS),
        ])
        .await,
    );
    // Several runaway scripts at once, as many as the runtime has workers.
    let mut spinners = Vec::new();
    for i in 0..4 {
        let app = app.clone();
        spinners.push(tokio::spawn(async move {
            let started = Instant::now();
            let r = app.send_sms(&format!("+1555300{i:04}"), "spin").await;
            (r, started.elapsed())
        }));
    }
    // Meanwhile other senders keep getting answers.
    let mut answered = 0;
    for i in 0..20 {
        let r = app.send_sms(&format!("+1555400{i:04}"), "hours").await;
        assert_eq!(bodies(&r.body), vec!["open"]);
        answered += 1;
    }
    for s in spinners {
        let (r, took) = s.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(bodies(&r.body), vec!["Sorry!"]);
        // The budget is 50 ms of script time; this bound only guards
        // against a hang (seconds), it measures nothing.
        assert!(took < Duration::from_secs(10), "took {took:?}");
    }
    assert_eq!(answered, 20);
    let m = app.raw(app.client.get(app.url("/metrics"))).await.body;
    assert!(m.contains("smsflow_script_errors_total 4"), "{m}");
    // The conversation stayed as it was: a later message is new again.
    let r = app.send_sms("+15553000000", "hours").await;
    assert_eq!(bodies(&r.body), vec!["open"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn script_state_persists_across_restarts_and_errors_change_nothing() {
    let app = spawn_app(&[
        ("mute.yaml", &construct("mute.yaml")),
        ("mute.rhai", &construct("mute.rhai")),
    ])
    .await;
    let me = "+15553100000";
    assert_eq!(bodies(&app.send_sms(me, "mute").await.body), vec!["seen 1"]);
    assert_eq!(bodies(&app.send_sms(me, "x").await.body), vec!["seen 2"]);
    let (flows, data) = (app.flows_dir.clone(), app.data_dir.clone());
    let tmp = app.stop().await;
    let app = spawn_with(smsflow::config::Config::for_test(&flows, &data, TOKEN)).await;
    assert_eq!(bodies(&app.send_sms(me, "y").await.body), vec!["seen 3"]);
    // A throwing script: silent fallback, state unchanged, counted.
    let r = app.send_sms(me, "boom").await;
    assert_eq!(
        r.body,
        r#"<?xml version="1.0" encoding="UTF-8"?><Response/>"#
    );
    assert_eq!(bodies(&app.send_sms(me, "z").await.body), vec!["seen 4"]);
    let m = app.raw(app.client.get(app.url("/metrics"))).await.body;
    assert!(m.contains("smsflow_script_errors_total 1"), "{m}");
    assert!(
        m.contains("smsflow_silences_total{reason=\"script_error\"} 1"),
        "{m}"
    );
    drop(tmp);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_message_replays_the_seeded_choice() {
    let files: Vec<(String, String)> = ["quiz.yaml", "quiz.rhai", "keywords.yaml", "signup.yaml"]
        .iter()
        .map(|n| {
            (
                n.to_string(),
                std::fs::read_to_string(format!("{}/flows/{n}", env!("CARGO_MANIFEST_DIR")))
                    .unwrap(),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let app = spawn_app(&refs).await;
    let me = "+15553200000";
    app.send_sms(me, "quiz").await;
    let sid = new_sid();
    let first = app.send_sms_sid(me, "paris", &sid).await;
    let again = app.send_sms_sid(me, "paris", &sid).await;
    assert_eq!(first.body, again.body);
    let b = bodies(&first.body);
    assert!(
        ["Correct!", "Right!", "Nice one!", "Spot on!"].contains(&b[0].as_str()),
        "{b:?}"
    );
    assert_eq!(b[1], "Q2/3: How many legs does a spider have?");
}
