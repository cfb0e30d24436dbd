//! Broadcasts through the front door: contacts imported by CSV, one
//! message to those matching a filter, paced through the outbox to the
//! fake Twilio, opted-out contacts skipped, the same broadcast sent again
//! adding nobody twice, progress and cancel; a broadcast that starts a
//! flow for each matching contact.

use std::time::{Duration, Instant};

use crate::fake_twilio::{bodies_sent, FakeTwilio};
use crate::helpers::*;
use crate::outbound::sending_config;

const KEYWORDS: &str = "keywords:\n  HOURS: \"9-5\"\n";

const OFFER: &str = r#"
name: offer
fields: [name]
steps:
  ask:
    say: "Hi {{contact.name}}, two pizzas for one on Friday? Reply YES or NO."
    wait:
      - yes: true
        say: "Booked for Friday."
      - no: true
        say: "Maybe next time."
"#;

const SURVEY: &str = r#"
name: survey
trigger: { keywords: [SURVEY] }
steps:
  ask:
    say: "Rate us 1-5."
    wait:
      - regex: '^[1-5]$'
        say: "Thanks!"
"#;

/// The app owns its directory (`TestApp::owning`).
async fn start_app(fake: &FakeTwilio, interval: Duration) -> TestApp {
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(flows.join("keywords.yaml"), KEYWORDS).unwrap();
    std::fs::write(flows.join("offer.yaml"), OFFER).unwrap();
    std::fs::write(flows.join("survey.yaml"), SURVEY).unwrap();
    let mut config = sending_config(fake, &flows, &tmp.path().join("data"));
    config.outbound.send_interval = interval;
    let mut app = spawn_with(config).await;
    app.public_url = format!("http://{}", app.addr);
    app.owning(tmp)
}

async fn admin_post(
    app: &TestApp,
    path: &str,
    content_type: &str,
    body: String,
) -> (u16, serde_json::Value) {
    let r = app
        .raw(
            app.client
                .post(app.url(path))
                .bearer_auth(ADMIN_TOKEN)
                .header("content-type", content_type)
                .body(body),
        )
        .await;
    let json = serde_json::from_str(&r.body).unwrap_or(serde_json::Value::String(r.body));
    (r.status, json)
}

async fn progress(app: &TestApp, id: &str) -> serde_json::Value {
    let all = app.admin_json("/broadcasts").await;
    all["broadcasts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("{all}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broadcast_reaches_each_matching_contact_once_skipping_opted_out() {
    let fake = FakeTwilio::start(TOKEN).await;
    let app = start_app(&fake, Duration::from_millis(20)).await;
    let mut csv = String::from("phone,list\n");
    for i in 0..10 {
        let list = if i < 8 { "pizza" } else { "other" };
        csv.push_str(&format!("+1555770{i:04},{list}\n"));
    }
    let (code, r) = admin_post(&app, "/contacts?from=%2B15550001111", "text/csv", csv).await;
    assert_eq!(code, 200, "{r}");
    let stopped = "+15557700003";
    assert_eq!(app.send_sms(stopped, "STOP").await.status, 200);
    let body = serde_json::json!({
        "id": "friday", "from": OUR_NUMBER, "message": "Friday: 2 for 1",
        "where": { "field": "list", "equals": "pizza" },
    });
    let (code, sent) = admin_post(&app, "/broadcasts", "application/json", body.to_string()).await;
    assert_eq!(code, 200, "{sent}");
    assert_eq!(
        (&sent["recipients"], &sent["enqueued"]),
        (&8.into(), &8.into())
    );
    // Sent again (a retry, a restart): nobody is added twice.
    let (_, again) = admin_post(&app, "/broadcasts", "application/json", body.to_string()).await;
    assert_eq!(
        (&again["enqueued"], &again["already"]),
        (&0.into(), &8.into())
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let p = loop {
        let p = progress(&app, "friday").await;
        if p["remaining"] == 0 {
            break p;
        }
        assert!(Instant::now() < deadline, "{p}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (&p["total"], &p["sent"], &p["skipped"]),
        (&8.into(), &7.into(), &1.into()),
        "{p}"
    );
    let to: Vec<String> = fake
        .requests()
        .iter()
        .filter(|r| r.answered == 201)
        .map(|r| r.param("To").unwrap().to_owned())
        .collect();
    assert_eq!(to.len(), 7, "{to:?}");
    let mut unique = to.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 7, "a second copy: {to:?}");
    assert!(!to
        .iter()
        .any(|t| t == stopped || t.starts_with("+155577000") && t.ends_with(['8', '9'])));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_canceled_broadcast_sends_no_more_and_bad_requests_are_refused() {
    let fake = FakeTwilio::start(TOKEN).await;
    // Paced at one a minute: after the first, everything waits.
    let app = start_app(&fake, Duration::from_secs(60)).await;
    let list: Vec<String> = (0..5).map(|i| format!("+1555780{i:04}")).collect();
    let body = serde_json::json!({ "id": "b2", "from": OUR_NUMBER, "message": "hi", "to": list });
    let (code, sent) = admin_post(&app, "/broadcasts", "application/json", body.to_string()).await;
    assert_eq!(code, 200, "{sent}");
    let (code, c) = admin_post(
        &app,
        "/broadcasts/b2/cancel",
        "application/json",
        String::new(),
    )
    .await;
    assert_eq!(code, 200, "{c}");
    let canceled = c["canceled"].as_u64().unwrap();
    assert!((4..=5).contains(&canceled), "{c}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let p = progress(&app, "b2").await;
    assert_eq!(p["remaining"], 0, "{p}");
    assert_eq!(p["skipped"].as_u64().unwrap(), canceled);
    assert!(fake.requests().len() as u64 <= 5 - canceled);
    let (code, _) = admin_post(
        &app,
        "/broadcasts/nope/cancel",
        "application/json",
        String::new(),
    )
    .await;
    assert_eq!(code, 404);
    for bad in [
        serde_json::json!({ "id": "x", "from": OUR_NUMBER, "message": "hi" }),
        serde_json::json!({ "id": "a b", "from": OUR_NUMBER, "message": "hi", "to": ["+15557800001"] }),
        serde_json::json!({ "id": "x", "from": OUR_NUMBER, "message": "hi", "to": ["5557800001"] }),
    ] {
        let (code, r) = admin_post(&app, "/broadcasts", "application/json", bad.to_string()).await;
        assert_eq!(code, 400, "{bad}: {r}");
    }
    let r = app.raw(app.client.get(app.url("/broadcasts"))).await;
    assert_eq!(r.status, 401);
    // The CLI lists it, and sends another through the same API.
    let server = format!("http://{}", app.addr);
    let run = move |args: &'static [&'static str]| {
        let server = server.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_smsflow"))
                .args(args)
                .env("SMSFLOW_ADMIN_TOKEN", ADMIN_TOKEN)
                .env("SMSFLOW_SERVER", server)
                .output()
                .unwrap()
        })
    };
    let out = run(&[
        "broadcasts",
        "send",
        "--id",
        "b3",
        "--from",
        "+15550001111",
        "--message",
        "yo",
        "--to",
        "+15557809999",
    ])
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["broadcasts"]).await.unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with("b2 "))
        .unwrap_or_else(|| panic!("{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!((cells[1], cells[6]), ("5", "0"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("b3 ")), "{table}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flow_broadcast_starts_each_matching_contact_once_and_replies_continue_it() {
    let fake = FakeTwilio::start(TOKEN).await;
    let app = start_app(&fake, Duration::from_millis(20)).await;
    let mut csv = String::from("phone,list,name\n");
    let names = ["Ana", "Ben", "Cy", "Dee"];
    for (i, name) in names.iter().enumerate() {
        let list = if i < 3 { "pizza" } else { "other" };
        csv.push_str(&format!("+1555771{i:04},{list},{name}\n"));
    }
    let (code, r) = admin_post(&app, "/contacts?from=%2B15550001111", "text/csv", csv).await;
    assert_eq!(code, 200, "{r}");
    let body = serde_json::json!({
        "id": "fri-flow", "from": OUR_NUMBER, "flow": "offer",
        "where": { "field": "list", "equals": "pizza" },
    });
    let (code, sent) = admin_post(&app, "/broadcasts", "application/json", body.to_string()).await;
    assert_eq!(code, 200, "{sent}");
    assert_eq!(
        (&sent["recipients"], &sent["started"], &sent["already"]),
        (&3.into(), &3.into(), &0.into()),
        "{sent}"
    );
    // The same broadcast again starts nobody twice.
    let (code, again) = admin_post(&app, "/broadcasts", "application/json", body.to_string()).await;
    assert_eq!(code, 200, "{again}");
    assert_eq!(
        (&again["started"], &again["already"]),
        (&0.into(), &3.into()),
        "{again}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let p = loop {
        let p = progress(&app, "fri-flow").await;
        if p["remaining"] == 0 {
            break p;
        }
        assert!(Instant::now() < deadline, "{p}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!((&p["total"], &p["sent"]), (&3.into(), &3.into()), "{p}");
    for (i, name) in names.iter().take(3).enumerate() {
        let to = format!("+1555771{i:04}");
        assert_eq!(
            bodies_sent(&fake, &to, 1).await,
            [format!(
                "Hi {name}, two pizzas for one on Friday? Reply YES or NO."
            )]
        );
    }
    // A reply continues the flow through the signed webhook.
    assert_eq!(
        bodies(&app.send_sms("+15557710001", "yes").await.body),
        ["Booked for Friday."]
    );
    // Still one first message each, and nothing to the non-matching one.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let accepted = fake.requests().iter().filter(|r| r.answered == 201).count();
    assert_eq!(accepted, 3, "{:?}", fake.requests());
    assert!(fake.requests_to("+15557710003").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flow_broadcast_skips_busy_contacts_by_default_and_refuses_bad_requests() {
    let fake = FakeTwilio::start(TOKEN).await;
    let app = start_app(&fake, Duration::from_millis(20)).await;
    let (ben, cy, dee) = ("+15557720001", "+15557720002", "+15557720003");
    for who in [ben, dee] {
        assert_eq!(
            bodies(&app.send_sms(who, "survey").await.body),
            ["Rate us 1-5."]
        );
    }
    let body = serde_json::json!({
        "id": "busy", "from": OUR_NUMBER, "flow": "offer", "to": [ben, cy],
    });
    let (code, sent) = admin_post(&app, "/broadcasts", "application/json", body.to_string()).await;
    assert_eq!(code, 200, "{sent}");
    assert_eq!(
        (&sent["started"], &sent["skipped_busy"]),
        (&1.into(), &1.into()),
        "{sent}"
    );
    // Ben's survey goes on; Cy got the offer.
    assert_eq!(bodies(&app.send_sms(ben, "4").await.body), ["Thanks!"]);
    assert_eq!(bodies_sent(&fake, cy, 1).await.len(), 1);
    // `interrupt` when asked: Dee's survey ends, the offer starts.
    let body = serde_json::json!({
        "id": "int", "from": OUR_NUMBER, "flow": "offer", "to": [dee],
        "if_busy": "interrupt",
    });
    let (code, sent) = admin_post(&app, "/broadcasts", "application/json", body.to_string()).await;
    assert_eq!((code, &sent["started"]), (200, &1.into()), "{sent}");
    assert_eq!(
        bodies(&app.send_sms(dee, "no").await.body),
        ["Maybe next time."]
    );
    assert!(fake.requests_to(ben).is_empty());
    for bad in [
        serde_json::json!({ "id": "x", "from": OUR_NUMBER, "message": "hi", "flow": "offer", "to": [cy] }),
        serde_json::json!({ "id": "x", "from": OUR_NUMBER, "to": [cy] }),
        serde_json::json!({ "id": "x", "from": OUR_NUMBER, "message": "hi", "if_busy": "skip", "to": [cy] }),
    ] {
        let (code, r) = admin_post(&app, "/broadcasts", "application/json", bad.to_string()).await;
        assert_eq!(code, 400, "{bad}: {r}");
    }
    let unknown = serde_json::json!({ "id": "x", "from": OUR_NUMBER, "flow": "nope", "to": [cy] });
    let (code, r) = admin_post(&app, "/broadcasts", "application/json", unknown.to_string()).await;
    assert_eq!(code, 404, "{r}");
    // The CLI starts a flow broadcast through the same API.
    let server = format!("http://{}", app.addr);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_smsflow"))
            .args([
                "broadcasts",
                "send",
                "--id",
                "cli-flow",
                "--from",
                "+15550001111",
                "--flow",
                "offer",
                "--to",
                "+15557720009",
            ])
            .env("SMSFLOW_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("SMSFLOW_SERVER", server)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["started"], 1, "{answer}");
    assert_eq!(bodies_sent(&fake, "+15557720009", 1).await.len(), 1);
}

/// A measurement, not a check: how close a broadcast gets to its pace
/// (one sending number: the pace is per number), from a realistic pace
/// up to none at all (the sender's own ceiling).
/// `cargo test --release --test it -- --ignored broadcast_rate --nocapture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn broadcast_rate_against_the_pace() {
    for (n, interval_ms) in [(300, 10), (2000, 2), (3000, 1), (3000, 0)] {
        let fake = FakeTwilio::start(TOKEN).await;
        let interval = Duration::from_millis(interval_ms);
        let app = start_app(&fake, interval).await;
        let list: Vec<String> = (0..n).map(|i| format!("+1555790{i:04}")).collect();
        let body =
            serde_json::json!({ "id": "rate", "from": OUR_NUMBER, "message": "hi", "to": list });
        let started = Instant::now();
        let (code, _) = admin_post(&app, "/broadcasts", "application/json", body.to_string()).await;
        assert_eq!(code, 200);
        let enqueued = started.elapsed();
        loop {
            if progress(&app, "rate").await["remaining"] == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let took = started.elapsed();
        let p = progress(&app, "rate").await;
        let pace = if interval_ms == 0 {
            "no pace".to_owned()
        } else {
            format!("a pace of {:.0}/s", 1000.0 / interval_ms as f64)
        };
        println!(
            "{n} recipients, send_interval_ms = {interval_ms}: enqueued in {enqueued:?}, all sent \
             in {took:?}: {:.0}/s against {pace}; sent {}",
            n as f64 / took.as_secs_f64(),
            p["sent"]
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_broadcast_speaks_to_each_contact_by_name_and_bad_templates_are_refused() {
    let fake = FakeTwilio::start(TOKEN).await;
    let app = start_app(&fake, Duration::from_millis(20)).await;
    let csv =
        "phone,name,list\n+15557730001,Ana,pizza\n+15557730002,,pizza\n+15557730003,Cy,other\n";
    let (code, r) = admin_post(
        &app,
        "/contacts?from=%2B15550001111",
        "text/csv",
        csv.into(),
    )
    .await;
    assert_eq!(code, 200, "{r}");
    let body = serde_json::json!({
        "id": "named", "from": OUR_NUMBER,
        "message": "Hi {{contact.name|there}}, Friday: 2 for 1",
        "where": { "field": "list", "equals": "pizza" },
    });
    let (code, sent) = admin_post(&app, "/broadcasts", "application/json", body.to_string()).await;
    assert_eq!((code, &sent["enqueued"]), (200, &2.into()), "{sent}");
    assert_eq!(
        bodies_sent(&fake, "+15557730001", 1).await,
        ["Hi Ana, Friday: 2 for 1"]
    );
    assert_eq!(
        bodies_sent(&fake, "+15557730002", 1).await,
        ["Hi there, Friday: 2 for 1"]
    );
    // An explicit list reads each contact's fields too; a text that
    // renders empty is skipped, not sent.
    let body = serde_json::json!({
        "id": "listed", "from": OUR_NUMBER, "message": "{{contact.name}}",
        "to": ["+15557730003", "+15557730002"],
    });
    let (code, sent) = admin_post(&app, "/broadcasts", "application/json", body.to_string()).await;
    assert_eq!((code, &sent["enqueued"]), (200, &2.into()), "{sent}");
    assert_eq!(bodies_sent(&fake, "+15557730003", 1).await, ["Cy"]);
    let p = progress(&app, "listed").await;
    assert_eq!((&p["sent"], &p["skipped"]), (&1.into(), &1.into()), "{p}");
    for (message, why) in [
        ("Hi {{name}}", "only contact fields"),
        ("Hi {{contact.name", "unclosed"),
        ("{{= 1 + 1 }}", "expressions"),
    ] {
        let body = serde_json::json!({
            "id": "bad", "from": OUR_NUMBER, "message": message, "to": ["+15557730001"],
        });
        let (code, r) = admin_post(&app, "/broadcasts", "application/json", body.to_string()).await;
        assert_eq!(code, 400, "{message}: {r}");
        assert!(r.to_string().contains(why), "{message}: {r}");
    }
    assert!(app.admin_json("/broadcasts").await["broadcasts"]
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["id"] != "bad"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flow_broadcast_gives_fields_and_vars_and_queues_behind_busy_contacts() {
    let fake = FakeTwilio::start(TOKEN).await;
    let app = start_app(&fake, Duration::from_millis(20)).await;
    let (ana, ben) = ("+15557740001", "+15557740002");
    assert_eq!(
        bodies(&app.send_sms(ben, "survey").await.body),
        ["Rate us 1-5."]
    );
    let body = serde_json::json!({
        "id": "fri-queue", "from": OUR_NUMBER, "flow": "offer", "to": [ana, ben],
        "fields": { "name": "friend" }, "if_busy": "queue",
    });
    let (code, sent) = admin_post(&app, "/broadcasts", "application/json", body.to_string()).await;
    assert_eq!(code, 200, "{sent}");
    assert_eq!(
        (&sent["started"], &sent["queued"]),
        (&1.into(), &1.into()),
        "{sent}"
    );
    assert_eq!(
        bodies_sent(&fake, ana, 1).await,
        ["Hi friend, two pizzas for one on Friday? Reply YES or NO."]
    );
    assert!(fake.requests_to(ben).is_empty());
    // Ben finishes his survey: his offer follows.
    assert_eq!(bodies(&app.send_sms(ben, "5").await.body), ["Thanks!"]);
    assert_eq!(bodies_sent(&fake, ben, 1).await.len(), 1);
    let p = progress(&app, "fri-queue").await;
    assert_eq!(p["total"], 2, "{p}");
    // The CLI says the same with --field and --if-busy queue (Ben is in
    // his offer now).
    let server = format!("http://{}", app.addr);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_smsflow"))
            .args([
                "broadcasts",
                "send",
                "--id",
                "cli-queue",
                "--from",
                "+15550001111",
            ])
            .args([
                "--flow",
                "offer",
                "--if-busy",
                "queue",
                "--field",
                "name=pal",
            ])
            .args(["--to", "+15557740002", "--to", "+15557740003"])
            .env("SMSFLOW_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("SMSFLOW_SERVER", server)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(
        (&answer["started"], &answer["queued"]),
        (&1.into(), &1.into()),
        "{answer}"
    );
    assert_eq!(
        bodies_sent(&fake, "+15557740003", 1).await,
        ["Hi pal, two pizzas for one on Friday? Reply YES or NO."]
    );
    // Fields and vars are for flows only.
    let bad = serde_json::json!({
        "id": "x", "from": OUR_NUMBER, "message": "hi", "to": [ana], "fields": { "a": "b" },
    });
    let (code, r) = admin_post(&app, "/broadcasts", "application/json", bad.to_string()).await;
    assert_eq!(code, 400, "{r}");
}
