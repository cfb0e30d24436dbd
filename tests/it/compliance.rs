//! Consent and compliance: opt-out keywords, delivery tracking, the
//! message log, the loop guard and retention — through the front door.

use smsflow::store::Store;

use crate::helpers::*;

const FLOWS: &str = r#"
keywords:
  HOURS: "We're open 9-5"
default: "Text HOURS."
"#;

const SIGNUP: &str = r#"
trigger:
  keywords: [JOIN]
steps:
  ask:
    say: "Name?"
    wait:
      - anything: true
        save: name
        goto: done
  done:
    say: "Thanks {{name}}"
"#;

const SILENCE: &str = r#"<?xml version="1.0" encoding="UTF-8"?><Response/>"#;

async fn spawn_configured(edit: impl FnOnce(&mut smsflow::config::Config)) -> TestApp {
    crate::helpers::spawn_configured(&[("keywords.yaml", FLOWS), ("signup.yaml", SIGNUP)], edit)
        .await
}

fn with_param(mut p: Vec<(String, String)>, k: &str, v: &str) -> Vec<(String, String)> {
    p.push((k.to_string(), v.to_string()));
    p
}

#[tokio::test(flavor = "multi_thread")]
async fn every_stop_keyword_opts_out_and_start_opts_back_in() {
    let app = spawn_configured(|_| {}).await;
    for (i, stop) in [
        "STOP",
        "stopall",
        " Unsubscribe ",
        "cancel",
        "END.",
        "quit",
        "REVOKE",
        "optout",
    ]
    .iter()
    .enumerate()
    {
        let me = format!("+1555100{i:04}");
        assert_eq!(
            bodies(&app.send_sms(&me, "hours").await.body),
            vec!["We're open 9-5"]
        );
        let r = app.send_sms(&me, stop).await;
        assert_eq!(r.body, SILENCE, "{stop}");
        // Opted out: everything is silence, keywords and default included.
        assert_eq!(app.send_sms(&me, "hours").await.body, SILENCE, "{stop}");
        assert_eq!(app.send_sms(&me, "hello?").await.body, SILENCE, "{stop}");
        assert_eq!(app.send_sms(&me, "help").await.body, SILENCE, "{stop}");
    }
    // START-class words opt back in (answered with silence: Twilio confirms).
    for (i, start) in ["START", "yes", "Unstop"].iter().enumerate() {
        let me = format!("+1555100{i:04}");
        assert_eq!(app.send_sms(&me, start).await.body, SILENCE);
        assert_eq!(
            bodies(&app.send_sms(&me, "hours").await.body),
            vec!["We're open 9-5"]
        );
    }
    let audit = app.store.audit_log().unwrap();
    assert_eq!(audit.iter().filter(|a| a.action == "opt_out").count(), 8);
    assert_eq!(audit.iter().filter(|a| a.action == "opt_in").count(), 3);
    let first = &audit[0];
    assert_eq!(first.scope, OUR_NUMBER);
    assert_eq!(first.cause, "STOP");
    assert!(first.message_sid.starts_with("SM"));
    let m = app.raw(app.client.get(app.url("/metrics"))).await.body;
    assert!(
        m.contains("smsflow_silences_total{reason=\"opt_out\"} 8"),
        "{m}"
    );
    assert!(
        m.contains("smsflow_silences_total{reason=\"opted_out\"} 24"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_ends_the_running_conversation_and_yes_stays_an_answer() {
    let app = spawn_configured(|_| {}).await;
    let me = "+15551110000";
    assert_eq!(bodies(&app.send_sms(me, "join").await.body), vec!["Name?"]);
    // YES while not opted out is an ordinary answer.
    assert_eq!(
        bodies(&app.send_sms(me, "yes").await.body),
        vec!["Thanks yes"]
    );
    assert_eq!(bodies(&app.send_sms(me, "join").await.body), vec!["Name?"]);
    assert_eq!(app.send_sms(me, "stop").await.body, SILENCE);
    assert_eq!(app.send_sms(me, "start").await.body, SILENCE);
    // The run ended with STOP: "Ann" is a new message now.
    assert_eq!(
        bodies(&app.send_sms(me, "Ann").await.body),
        vec!["Text HOURS."]
    );
    // START when not opted out: silence (Twilio answers it), nothing recorded.
    assert_eq!(app.send_sms(me, "start").await.body, SILENCE);
    assert_eq!(app.store.audit_log().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn opt_out_is_per_number_or_messaging_service() {
    let app = spawn_configured(|_| {}).await;
    let me = "+15551120000";
    app.send_sms(me, "stop").await;
    // Another of our numbers is a different scope.
    let p = sms_params(me, "hours", &new_sid());
    let p: Vec<_> = p
        .into_iter()
        .map(|(k, v)| {
            if k == "To" {
                (k, "+15550009999".to_string())
            } else {
                (k, v)
            }
        })
        .collect();
    assert_eq!(
        bodies(&app.post_signed("/twilio/sms", &p).await.body),
        vec!["We're open 9-5"]
    );
    // Within a Messaging Service the scope is the service: STOP on one
    // number silences the sender on every number of that service.
    let svc = "MG00000000000000000000000000000001";
    let stop = with_param(
        sms_params("+15551130000", "stop", &new_sid()),
        "MessagingServiceSid",
        svc,
    );
    assert_eq!(app.post_signed("/twilio/sms", &stop).await.body, SILENCE);
    let other: Vec<_> = with_param(
        sms_params("+15551130000", "hours", &new_sid()),
        "MessagingServiceSid",
        svc,
    )
    .into_iter()
    .map(|(k, v)| {
        if k == "To" {
            (k, "+15550008888".to_string())
        } else {
            (k, v)
        }
    })
    .collect();
    assert_eq!(app.post_signed("/twilio/sms", &other).await.body, SILENCE);
}

#[tokio::test(flavor = "multi_thread")]
async fn help_answers_configured_text_unless_twilio_already_did() {
    let app = spawn_configured(|c| {
        c.compliance.help_text = Some(
            "Acme Bakery: text HOURS. Msg&data rates may apply. Reply STOP to opt out.".into(),
        );
    })
    .await;
    let me = "+15551140000";
    let r = app.send_sms(me, "HELP").await;
    assert_eq!(
        bodies(&r.body),
        vec!["Acme Bakery: text HOURS. Msg&data rates may apply. Reply STOP to opt out."]
    );
    assert_eq!(bodies(&app.send_sms(me, "info").await.body).len(), 1);
    // Advanced Opt-Out: Twilio answered already.
    let p = with_param(sms_params(me, "help", &new_sid()), "OptOutType", "HELP");
    assert_eq!(app.post_signed("/twilio/sms", &p).await.body, SILENCE);
    // OptOutType=STOP opts out even for a custom keyword.
    let p = with_param(sms_params(me, "arret", &new_sid()), "OptOutType", "STOP");
    assert_eq!(app.post_signed("/twilio/sms", &p).await.body, SILENCE);
    assert_eq!(app.send_sms(me, "hours").await.body, SILENCE);
    let p = with_param(
        sms_params(me, "commencer", &new_sid()),
        "OptOutType",
        "START",
    );
    assert_eq!(app.post_signed("/twilio/sms", &p).await.body, SILENCE);
    assert_eq!(
        bodies(&app.send_sms(me, "hours").await.body),
        vec!["We're open 9-5"]
    );
    let causes: Vec<String> = app
        .store
        .audit_log()
        .unwrap()
        .into_iter()
        .map(|a| a.cause)
        .collect();
    assert_eq!(causes, vec!["OptOutType=STOP", "OptOutType=START"]);

    // Without help text, HELP is silence (Twilio's own help reply stands).
    let app2 = spawn_configured(|_| {}).await;
    assert_eq!(app2.send_sms(me, "help").await.body, SILENCE);
}

fn callback(sid: &str, status: &str, to: &str, error: Option<&str>) -> Vec<(String, String)> {
    let mut p: Vec<(String, String)> = [
        ("SmsSid", sid),
        ("SmsStatus", status),
        ("MessageStatus", status),
        ("To", to),
        ("MessageSid", sid),
        ("AccountSid", "AC00000000000000000000000000000000"),
        ("From", OUR_NUMBER),
        ("ApiVersion", "2010-04-01"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    if let Some(e) = error {
        p.push(("ErrorCode".into(), e.into()));
    }
    p
}

#[tokio::test(flavor = "multi_thread")]
async fn error_21610_marks_the_recipient_opted_out() {
    let app = spawn_configured(|_| {}).await;
    let me = "+15551150000";
    let r = app
        .post_signed(
            "/twilio/status",
            &callback("SMout1", "failed", me, Some("21610")),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(app.send_sms(me, "hours").await.body, SILENCE);
    let audit = app.store.audit_log().unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].cause, "error 21610");
    assert_eq!(audit[0].number, me);
    // A duplicate callback does not add a second record.
    app.post_signed(
        "/twilio/status",
        &callback("SMout1", "failed", me, Some("21610")),
    )
    .await;
    assert_eq!(app.store.audit_log().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn replies_are_tracked_and_linked_to_their_conversation() {
    let app = spawn_configured(|c| c.track_delivery = true).await;
    let me = "+15551160000";
    let sid = new_sid();
    let r = app.send_sms_sid(me, "join", &sid).await;
    let cb_url =
        format!("http://localhost/twilio/status?inbound={sid}&amp;flow=signup&amp;step=ask");
    assert!(
        r.body.contains(&format!(
            r#"<Message action="{cb_url}" statusCallback="{cb_url}">"#
        )),
        "{}",
        r.body
    );
    // Twilio calls that URL back (signed over it, query included),
    // out of order and duplicated.
    let path = format!("/twilio/status?inbound={sid}&flow=signup&step=ask");
    for status in ["delivered", "sent", "delivered", "queued"] {
        let r = app
            .post_signed(&path, &callback("SMreply1", status, me, None))
            .await;
        assert_eq!(r.status, 200);
    }
    let d = app.store.delivery_status("SMreply1").unwrap().unwrap();
    assert_eq!(d.status, "delivered");
    assert_eq!(d.inbound_sid.as_deref(), Some(sid.as_str()));
    assert_eq!(d.flow.as_deref(), Some("signup"));
    assert_eq!(d.step.as_deref(), Some("ask"));
    let log: Vec<String> = app
        .store
        .status_events("SMreply1")
        .unwrap()
        .into_iter()
        .map(|e| e.status)
        .collect();
    assert_eq!(log, vec!["delivered", "sent", "delivered", "queued"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_endpoint_needs_the_bearer_token() {
    let token = "admin-token-0123456789";
    let app = spawn_configured(|c| {
        c.admin_token = Some(smsflow::config::AuthToken::new(token));
        c.track_delivery = true;
    })
    .await;
    let me = "+15551170000";
    let sid = new_sid();
    app.send_sms_sid(me, "hours", &sid).await;
    app.post_signed(
        &format!("/twilio/status?inbound={sid}"),
        &callback("SMreply2", "undelivered", me, Some("30003")),
    )
    .await;
    app.send_sms("+15551179999", "hours").await;

    let url = app.url("/messages");
    let r = app.raw(app.client.get(&url)).await;
    assert_eq!(r.status, 401);
    let r = app
        .raw(
            app.client
                .get(&url)
                .header("authorization", "Bearer wrong-token-000000000"),
        )
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.body, "unauthorized\n");
    let r = app
        .raw(
            app.client
                .get(format!("{url}?number=%2B15551170000"))
                .header("authorization", format!("Bearer {token}")),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let rows = v["messages"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{rows:#?}");
    let out = rows.iter().find(|r| r["direction"] == "outbound").unwrap();
    assert_eq!(out["status"], "undelivered");
    assert_eq!(out["error_code"], "30003");
    assert_eq!(out["inbound_sid"], sid.as_str());
    let inb = rows.iter().find(|r| r["direction"] == "inbound").unwrap();
    assert_eq!(inb["sid"], sid.as_str());
    assert_eq!(inb["status"], "reply");
    // Filter by status.
    let r = app
        .raw(
            app.client
                .get(format!("{url}?status=undelivered"))
                .header("authorization", format!("Bearer {token}")),
        )
        .await;
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["messages"].as_array().unwrap().len(), 1);

    // Without an admin token configured the endpoint does not exist.
    let plain = spawn_configured(|c| c.admin_token = None).await;
    let r = plain
        .raw(
            plain
                .client
                .get(plain.url("/messages"))
                .header("authorization", format!("Bearer {token}")),
        )
        .await;
    assert_eq!(r.status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_guard_silences_a_bouncing_sender() {
    let app = spawn_configured(|c| {
        c.loop_max_replies = 3;
        c.loop_window_secs = 3600;
    })
    .await;
    let bot = "+15551180000";
    for _ in 0..3 {
        assert_eq!(
            bodies(&app.send_sms(bot, "hello").await.body),
            vec!["Text HOURS."]
        );
    }
    for _ in 0..3 {
        assert_eq!(app.send_sms(bot, "hello").await.body, SILENCE);
    }
    // Other senders are unaffected.
    assert_eq!(
        bodies(&app.send_sms("+15551180001", "hello").await.body),
        vec!["Text HOURS."]
    );
    let m = app.raw(app.client.get(app.url("/metrics"))).await.body;
    assert!(
        m.contains("smsflow_silences_total{reason=\"rate_limited\"} 3"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_removes_old_records_but_keeps_consent() {
    let app = spawn_configured(|_| {}).await;
    let me = "+15551190000";
    let sid = new_sid();
    app.send_sms_sid(me, "hours", &sid).await;
    app.send_sms(me, "stop").await;
    app.post_signed("/twilio/status", &callback("SMold", "delivered", me, None))
        .await;
    assert!(app.store.processed(&sid).unwrap().is_some());
    // Everything so far is older than a cutoff in the future.
    let cutoff = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + 10;
    let purged = app.store.purge(cutoff).unwrap();
    assert_eq!(purged.processed, 2);
    assert_eq!(purged.statuses, 1);
    assert!(app.store.processed(&sid).unwrap().is_none());
    assert!(app.store.delivery_status("SMold").unwrap().is_none());
    // Consent survives: still opted out.
    assert_eq!(app.send_sms(me, "hours").await.body, SILENCE);
    assert_eq!(app.store.audit_log().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn background_purge_runs_on_its_interval() {
    let app = spawn_configured(|c| {
        c.retention_days = 1;
        c.purge_interval = std::time::Duration::from_millis(50);
    })
    .await;
    // A record from two days ago (a stored status with an old timestamp).
    let old = smsflow::store::DeliveryStatus {
        status: "delivered".into(),
        rank: 5,
        error_code: None,
        to: None,
        from: None,
        updated_at: 1_000,
        inbound_sid: None,
        flow: None,
        step: None,
    };
    app.store.record_status("SMancient", &old).unwrap();
    let started = std::time::Instant::now();
    while app.store.delivery_status("SMancient").unwrap().is_some() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "never purged"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
