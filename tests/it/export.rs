//! Getting the data out and letting people leave, through the front door:
//! a flow's results over the admin API, message texts kept by choice and
//! searched, and erasing one contact while their conversation is active
//! and a timer is pending, with signed webhooks against the real server.

use smsflow::store::{ConvKey, Store};

use crate::helpers::*;

/// An appointment that waits for YES with a reminder in two hours, and
/// a one-step flow that completes at once.
const BOOK: &str = r#"
trigger:
  keywords: [BOOK]
expire_after: 48h
steps:
  confirm:
    say: "Reply YES to confirm Tuesday at 10am."
    wait:
      - yes: true
        say: "Booked."
    timeout:
      - after: 2h
        say: "Still there? Reply YES to confirm."
"#;

const NAME: &str = r#"
trigger:
  keywords: [NAME]
steps:
  ask:
    say: "Your name?"
    wait:
      - anything: true
        save: name
        contact: name
        say: "Thanks {{name}}."
"#;

const ANA: &str = "+15557100001";
const BEN: &str = "+15557100002";
const OTHER_NUMBER: &str = "+15550002222";

async fn spawn() -> TestApp {
    spawn_configured(&[("book.yaml", BOOK), ("name.yaml", NAME)], |c| {
        c.store_message_text = true;
    })
    .await
}

/// A text from `from` to our number `to`.
async fn text_to(app: &TestApp, to: &str, from: &str, body: &str) -> Reply {
    let mut params = sms_params(from, body, &new_sid());
    for (k, v) in params.iter_mut() {
        if k == "To" {
            *v = to.to_owned();
        }
    }
    app.post_signed("/twilio/sms", &params).await
}

async fn forget(app: &TestApp, number: &str) -> Reply {
    app.raw(
        app.client
            .delete(app.url(&format!("/contacts/{}", number.replace('+', "%2B"))))
            .bearer_auth(ADMIN_TOKEN),
    )
    .await
}

async fn status_callback(app: &TestApp, sid: &str, to: &str) {
    let params: Vec<(String, String)> = [
        ("SmsSid", sid),
        ("SmsStatus", "delivered"),
        ("MessageStatus", "delivered"),
        ("To", to),
        ("MessageSid", sid),
        ("AccountSid", "AC00000000000000000000000000000000"),
        ("From", OUR_NUMBER),
        ("ApiVersion", "2010-04-01"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(app.post_signed("/twilio/status", &params).await.status, 200);
}

fn mentions(app: &TestApp, number: &str) -> Vec<String> {
    let s = &app.store;
    let mut found = Vec::new();
    if !s.contact_conversations(number).unwrap().is_empty() {
        found.push("conversation".to_owned());
    }
    if s.inbound_log()
        .unwrap()
        .iter()
        .any(|(_, p)| p.from == number || p.to == number)
    {
        found.push("message log".to_owned());
    }
    if s.outbound_log()
        .unwrap()
        .iter()
        .any(|(_, d)| d.to.as_deref() == Some(number))
    {
        found.push("delivery record".to_owned());
    }
    if s.outbox().unwrap().iter().any(|e| e.to == number) {
        found.push("outbox".to_owned());
    }
    for flow in ["book", "name"] {
        if s.results(flow, 0)
            .unwrap()
            .iter()
            .any(|r| r.contact == number)
        {
            found.push(format!("{flow} result"));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn forgetting_a_contact_erases_an_active_conversation_and_its_pending_timer() {
    let app = spawn().await;
    // Ana: a finished run with a contact field, an appointment waiting
    // for YES (a reminder pending) on our number and another on a second
    // number, a STOP on that second number, a delivery record, and a
    // message we send her on our own (pending in the outbox).
    for (from, body) in [(ANA, "NAME"), (ANA, "Ana"), (ANA, "BOOK"), (BEN, "BOOK")] {
        assert_eq!(text_to(&app, OUR_NUMBER, from, body).await.status, 200);
    }
    assert_eq!(text_to(&app, OTHER_NUMBER, ANA, "BOOK").await.status, 200);
    assert_eq!(text_to(&app, OTHER_NUMBER, ANA, "STOP").await.status, 200);
    assert_eq!(text_to(&app, OTHER_NUMBER, ANA, "START").await.status, 200);
    assert_eq!(text_to(&app, OTHER_NUMBER, ANA, "BOOK").await.status, 200);
    status_callback(&app, "SMforget0001", ANA).await;
    let start = app
        .raw(
            app.client
                .post(app.url("/flows/name/start"))
                .bearer_auth(ADMIN_TOKEN)
                .header("content-type", "application/json")
                .body(
                    serde_json::json!({
                        "to": ANA,
                        "from": OUR_NUMBER,
                        "idempotency_key": "ana-name",
                        "if_busy": "interrupt",
                    })
                    .to_string(),
                ),
        )
        .await;
    assert!(start.status == 200 || start.status == 201, "{}", start.body);
    // The start interrupted Ana's appointment: it has a result too.
    assert_eq!(app.store.health().pending_timers, 2, "Ben's, Ana's on 2222");
    assert_eq!(
        mentions(&app, ANA),
        [
            "conversation",
            "message log",
            "delivery record",
            "outbox",
            "book result",
            "name result"
        ]
    );
    let ben_before = mentions(&app, BEN);

    let r = forget(&app, ANA).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let json: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let gone = &json["forgotten"];
    assert_eq!(gone["conversations"], 2, "{json}");
    assert_eq!(gone["statuses"], 1, "{json}");
    assert!(gone["log_lines"].as_u64().unwrap() >= 7, "{json}");
    assert!(gone["outbox"].as_u64().unwrap() >= 1, "{json}");
    assert_eq!(gone["starts"], 1, "{json}");

    // Nothing about Ana is left, and her reminder will never fire;
    // Ben's conversation and timer are untouched.
    assert_eq!(mentions(&app, ANA), Vec::<String>::new());
    assert_eq!(app.store.health().pending_timers, 1);
    let due = app.store.due_timers(i64::MAX, 10).unwrap();
    assert!(due.iter().all(|t| t.key.from != ANA), "{due:?}");
    assert_eq!(mentions(&app, BEN), ben_before);
    assert!(app
        .store
        .conversation(&ConvKey::new(OUR_NUMBER, BEN))
        .unwrap()
        .is_some());
    // Her consent record is kept (the legal record), and the erasure is
    // in the audit log with no data but the number.
    assert!(app.store.opt_out(OTHER_NUMBER, ANA).unwrap().is_some());
    let audit = app.store.audit_log().unwrap();
    let actions: Vec<&str> = audit
        .iter()
        .filter(|a| a.number == ANA)
        .map(|a| a.action.as_str())
        .collect();
    assert_eq!(actions, ["opt_out", "opt_in", "forget"]);

    // Idempotent: again, nothing is left to remove (and it is audited).
    let r = forget(&app, ANA).await;
    assert_eq!(r.status, 200);
    let json: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(json["forgotten"]["conversations"], 0);
    assert_eq!(json["forgotten"]["log_lines"], 0);

    // Her next message starts afresh: YES answers no waiting step.
    let r = text_to(&app, OUR_NUMBER, ANA, "YES").await;
    assert_eq!(r.status, 200);
    assert!(bodies(&r.body).is_empty(), "{}", r.body);
    // A bad number or no token is refused.
    assert_eq!(forget(&app, "not-a-number").await.status, 400);
    let r = app
        .raw(app.client.delete(app.url("/contacts/%2B15557100001")))
        .await;
    assert_eq!(r.status, 401);
}

/// A message racing the erasure either lands before it (and is erased)
/// or after it (a fresh conversation with its log line): never a
/// conversation without the message that made it.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_racing_an_erasure_never_leaves_half_a_state() {
    let app = spawn().await;
    for round in 0..20 {
        let from = format!("+155571002{round:02}");
        assert_eq!(text_to(&app, OUR_NUMBER, &from, "BOOK").await.status, 200);
        let (a, b) = tokio::join!(
            text_to(&app, OUR_NUMBER, &from, "BOOK"),
            forget(&app, &from)
        );
        assert_eq!((a.status, b.status), (200, 200));
        let conversation = app
            .store
            .conversation(&ConvKey::new(OUR_NUMBER, &from))
            .unwrap();
        let lines = app
            .store
            .inbound_log()
            .unwrap()
            .into_iter()
            .filter(|(_, p)| p.from == from)
            .count();
        match conversation {
            None => assert_eq!(lines, 0, "round {round}"),
            Some(_) => assert_eq!(lines, 1, "round {round}: the message after the erasure"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn results_and_texts_are_served_to_the_admin() {
    let app = spawn().await;
    for body in ["NAME", "=SUM(A1), \"Ana\""] {
        text_to(&app, OUR_NUMBER, ANA, body).await;
    }
    let r = app
        .raw(
            app.client
                .get(app.url("/flows/name/results?format=csv"))
                .bearer_auth(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.content_type.starts_with("text/csv"), "{}", r.content_type);
    let mut lines = r.body.lines();
    assert_eq!(
        lines.next(),
        Some("flow,our_number,contact,started_at,ended_at,ended,path,var.name,contact.name")
    );
    let row = lines.next().unwrap();
    assert!(
        row.ends_with(",completed,ask,\"'=SUM(A1), \"\"Ana\"\"\",\"'=SUM(A1), \"\"Ana\"\"\""),
        "{row}"
    );
    let r = app
        .raw(
            app.client
                .get(app.url("/flows/name/results?format=jsonl&since=2000-01-01"))
                .bearer_auth(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(r.status, 200);
    let result: serde_json::Value = serde_json::from_str(r.body.trim()).unwrap();
    assert_eq!(result["vars"]["name"], "=SUM(A1), \"Ana\"");
    for bad in ["format=xls", "since=yesterday"] {
        let r = app
            .raw(
                app.client
                    .get(app.url(&format!("/flows/name/results?{bad}")))
                    .bearer_auth(ADMIN_TOKEN),
            )
            .await;
        assert_eq!(r.status, 400, "{bad}");
    }

    // The texts, searched by text, number and time.
    let found = app
        .admin_json(&format!(
            "/messages?number={}&text=sum(a1)",
            ANA.replace('+', "%2B")
        ))
        .await;
    let rows = found["messages"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{found}");
    assert_eq!(rows[0]["body"], "=SUM(A1), \"Ana\"");
    assert_eq!(rows[0]["replies"][0], "Thanks =SUM(A1), \"Ana\".");
    let none = app.admin_json("/messages?until=946684800").await;
    assert!(none["messages"].as_array().unwrap().is_empty(), "{none}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_contact_is_exported_with_consent_and_last_activity() {
    let app = spawn().await;
    text_to(&app, OUR_NUMBER, ANA, "NAME").await;
    text_to(&app, OUR_NUMBER, ANA, "@Ana, \"the\" first").await;
    text_to(&app, OTHER_NUMBER, ANA, "STOP").await;
    text_to(&app, OUR_NUMBER, BEN, "BOOK").await;
    let get = |query: &'static str| {
        app.raw(
            app.client
                .get(app.url(&format!("/contacts{query}")))
                .bearer_auth(ADMIN_TOKEN),
        )
    };
    let r = get("").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.content_type.starts_with("text/csv"));
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(r.body.as_bytes());
    let rows: Vec<Vec<String>> = reader
        .records()
        .map(|r| r.unwrap().iter().map(str::to_owned).collect())
        .collect();
    assert_eq!(
        rows[0],
        [
            "our_number",
            "phone",
            "consent",
            "consent_changed_at",
            "last_activity",
            "contact.name"
        ]
    );
    let summary: Vec<(&str, &str, &str, &str)> = rows[1..]
        .iter()
        .map(|r| (r[0].as_str(), r[1].as_str(), r[2].as_str(), r[5].as_str()))
        .collect();
    let q = |n: &str| format!("'{n}");
    let (us, other, ana, ben) = (q(OUR_NUMBER), q(OTHER_NUMBER), q(ANA), q(BEN));
    assert_eq!(
        summary,
        [
            (us.as_str(), ana.as_str(), "", "'@Ana, \"the\" first"),
            (us.as_str(), ben.as_str(), "", ""),
            (other.as_str(), ana.as_str(), "opted_out", ""),
        ]
    );
    assert!(rows[1..].iter().all(|r| r[4].starts_with("20")), "{rows:?}");
    let r = get("?format=jsonl").await;
    assert_eq!(r.status, 200);
    let first: serde_json::Value = serde_json::from_str(r.body.lines().next().unwrap()).unwrap();
    assert_eq!(first["fields"]["name"], "@Ana, \"the\" first");
    assert_eq!(get("?format=xml").await.status, 400);
}
