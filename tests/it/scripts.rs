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
    let app = spawn_with(smsflow::config::Config::for_test(&flows, &data, TOKEN))
        .await
        .owning(tmp);
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

/// `s.replace("x", s)` with a 16 KB `s` built a 256 MB string
/// before Rhai measured it (504 MiB and 413 ms for one message; eight at
/// once aborted the server), and a map's keys, which no limit counted, were
/// copied whole by every `let b = a;`. Now both are refused before they are
/// built: each sender gets the flow's fallback, others are answered, and
/// the process stays small.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scripts_that_would_build_huge_values_get_the_fallback_in_bounded_memory() {
    use crate::process::spawn_server;
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    let files = [
        (
            "replace.yaml",
            "trigger: {keywords: [REPLACE]}\nscript: replace.rhai\nfallback: \"Sorry!\"\n",
        ),
        (
            "replace.rhai",
            "fn on_message(msg, state) {\n  let s = msg.body;\n  s.pad(16000, \"x\");\n  s.replace(\"x\", s);\n  s\n}\n",
        ),
        (
            "keys.yaml",
            "trigger: {keywords: [KEYS]}\nscript: keys.rhai\nfallback: \"Sorry!\"\n",
        ),
        (
            "keys.rhai",
            "fn on_message(msg, state) {\n  let k = msg.body;\n  k.pad(16000, \"k\");\n  let m = #{};\n  for i in 0..999 { m[k + i] = i; }\n  let a = m; let b = m; let c = m; let d = m; let e = m; let f = m;\n  \"kept\"\n}\n",
        ),
        ("keywords.yaml", KEYWORDS),
    ];
    for (name, text) in files {
        std::fs::write(flows.join(name), text).unwrap();
    }
    let server = std::sync::Arc::new(spawn_server(&flows, &tmp.path().join("data"), &[]));
    let mut senders = Vec::new();
    for i in 0..10 {
        let server = server.clone();
        let word = if i < 8 { "replace" } else { "keys" };
        senders.push(tokio::spawn(async move {
            server
                .send(&format!("+1555310{i:04}"), word, &new_sid())
                .await
        }));
    }
    for s in senders {
        let body = s.await.unwrap().expect("the server answers");
        assert_eq!(bodies(&body), vec!["Sorry!"]);
    }
    let r = server.send("+15553109999", "hours", &new_sid()).await;
    assert_eq!(bodies(&r.expect("the server answers")), vec!["open"]);
    let peak = server.peak_rss_kib();
    assert!(peak < 200 * 1024, "peak memory {peak} KiB");
}

/// Twilio sends at most 1,600 characters; a forged 60,000-character
/// body reaches a script cut to that.
#[tokio::test(flavor = "multi_thread")]
async fn a_forged_long_body_reaches_scripts_cut_to_1600_characters() {
    let app = spawn_app(&[
        (
            "echo.yaml",
            "trigger: {catch_all: true}\nscript: echo.rhai\nfallback: \"Sorry!\"\n",
        ),
        (
            "echo.rhai",
            "fn on_message(msg, state) { `${msg.body.len()}` }\n",
        ),
    ])
    .await;
    let r = app.send_sms("+15553300000", &"x".repeat(60_000)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(bodies(&r.body), vec!["1600"]);
}

/// `map`, `zip`, `for_each` and a map's `map` collected up to
/// 1,000 closure results of 16 KB each (16 MB per message) before Rhai
/// measured the collection. Now each result is added to a running size and
/// the second one is refused: many such messages at once stay small.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closures_building_collections_stop_at_the_limit_in_bounded_memory() {
    use crate::process::spawn_server;
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    let builds = [
        ("map", "let a = []; a.pad(1000, 0); a.map(|v| s + v);"),
        ("zip", "let a = []; a.pad(1000, 0); a.zip(a, |x, y| s + x);"),
        (
            "each",
            "let a = []; a.pad(1000, 0); a.for_each(|| this = s + this);",
        ),
        (
            "entries",
            "let m = #{}; for i in 0..1000 { m[`${i}`] = i; } m.map(|k, v| s + v);",
        ),
    ];
    for (name, build) in builds {
        std::fs::write(
            flows.join(format!("{name}.yaml")),
            format!("trigger: {{keywords: [{name}]}}\nscript: {name}.rhai\nfallback: \"Sorry!\"\n"),
        )
        .unwrap();
        std::fs::write(
            flows.join(format!("{name}.rhai")),
            format!(
                "fn on_message(msg, state) {{\n  let s = msg.body;\n  s.pad(16000, \"x\");\n  {build}\n  \"kept\"\n}}\n"
            ),
        )
        .unwrap();
    }
    let server = std::sync::Arc::new(spawn_server(&flows, &tmp.path().join("data"), &[]));
    let mut senders = Vec::new();
    for i in 0..32 {
        let server = server.clone();
        let (word, _) = builds[i % builds.len()];
        senders.push(tokio::spawn(async move {
            server
                .send(&format!("+1555320{i:04}"), word, &new_sid())
                .await
        }));
    }
    for s in senders {
        let body = s.await.unwrap().expect("the server answers");
        assert_eq!(bodies(&body), vec!["Sorry!"]);
    }
    let peak = server.peak_rss_kib();
    assert!(peak < 150 * 1024, "peak memory {peak} KiB");
}
