//! Flow starts from outside (`POST /flows/{name}/start`) through the front
//! door: the running server with the admin token, sending through the fake
//! Twilio REST API; the contact's replies come back as signed webhooks.

use std::time::Duration;

use smsflow::store::Store;

use crate::fake_twilio::{bodies_sent, FakeTwilio};
use crate::helpers::*;
use crate::outbound::sending_config;

const APPOINTMENT: &str = r#"
name: appointment
fields: [name, appt]
vars: [ref]
steps:
  confirm:
    say: "Hi {{contact.name}}, your appointment is {{contact.appt}} (ref {{ref}}). Reply YES or NO."
    wait:
      - yes: true
        say: "Confirmed: {{contact.appt}}."
      - no: true
        say: "Cancelled."
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
async fn start_app(fake: &FakeTwilio) -> TestApp {
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(flows.join("appointment.yaml"), APPOINTMENT).unwrap();
    std::fs::write(flows.join("survey.yaml"), SURVEY).unwrap();
    let config = sending_config(fake, &flows, &tmp.path().join("data"));
    let mut app = spawn_with(config).await;
    app.public_url = format!("http://{}", app.addr);
    app.owning(tmp)
}

fn request(to: &str, key: &str) -> serde_json::Value {
    serde_json::json!({
        "to": to,
        "from": OUR_NUMBER,
        "fields": { "name": "Ana", "appt": "Tue 3pm" },
        "vars": { "ref": "A-17" },
        "idempotency_key": key,
    })
}

async fn post_start(
    app: &TestApp,
    flow: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let r = app
        .raw(
            app.client
                .post(app.url(&format!("/flows/{flow}/start")))
                .bearer_auth(ADMIN_TOKEN)
                .header("content-type", "application/json")
                .body(body.to_string()),
        )
        .await;
    let json = serde_json::from_str(&r.body).unwrap_or(serde_json::Value::String(r.body));
    (r.status, json)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_start_sends_the_first_step_once_and_replies_continue_the_flow() {
    let fake = FakeTwilio::start(TOKEN).await;
    let app = start_app(&fake).await;
    let ana = "+15557400001";
    // Spaces and dashes are fine; the number is normalised.
    let (code, first) =
        post_start(&app, "appointment", &request("+1 555-740-0001", "appt-1")).await;
    assert_eq!(code, 201, "{first}");
    assert_eq!(first["result"], "started");
    assert_eq!(first["duplicate"], false);
    assert_eq!(first["to"], ana);
    assert_eq!(first["outbox"], serde_json::json!(["start:appt-1:0"]));
    // The same key again: nothing new, the same result.
    let (code, again) = post_start(&app, "appointment", &request(ana, "appt-1")).await;
    assert_eq!(code, 200, "{again}");
    assert_eq!(again["duplicate"], true);
    assert_eq!(
        (&again["result"], &again["outbox"], &again["at"]),
        (&first["result"], &first["outbox"], &first["at"])
    );
    let sent = bodies_sent(&fake, ana, 1).await;
    assert_eq!(
        sent,
        ["Hi Ana, your appointment is Tue 3pm (ref A-17). Reply YES or NO."]
    );
    // The reply continues the flow through the signed webhook.
    assert_eq!(
        bodies(&app.send_sms(ana, "yes").await.body),
        ["Confirmed: Tue 3pm."]
    );
    // A key reused for another contact is refused, not silently answered.
    let (code, other) = post_start(&app, "appointment", &request("+15557400009", "appt-1")).await;
    assert_eq!(code, 409, "{other}");
    // Still exactly one message, a while later.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(bodies_sent(&fake, ana, 1).await.len(), 1);
    let entry = app.store.outbound("start:appt-1:0").unwrap().unwrap();
    assert_eq!(
        (
            entry.cause.as_str(),
            entry.flow.as_deref(),
            entry.step.as_deref()
        ),
        ("start", Some("appointment"), Some("confirm"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_busy_contact_is_interrupted_or_skipped_as_asked() {
    let fake = FakeTwilio::start(TOKEN).await;
    let app = start_app(&fake).await;
    let (ben, cy) = ("+15557400002", "+15557400003");
    for who in [ben, cy] {
        assert_eq!(
            bodies(&app.send_sms(who, "survey").await.body),
            ["Rate us 1-5."]
        );
    }
    // skip: nothing starts, the survey goes on.
    let mut skip = request(ben, "skip-1");
    skip["if_busy"] = "skip".into();
    let (code, r) = post_start(&app, "appointment", &skip).await;
    assert_eq!(code, 200, "{r}");
    assert_eq!(
        (&r["result"], &r["busy_with"]),
        (&"skipped_busy".into(), &"survey".into())
    );
    assert_eq!(r["outbox"], serde_json::json!([]));
    assert_eq!(bodies(&app.send_sms(ben, "4").await.body), ["Thanks!"]);
    // interrupt (the default): the survey ends, the appointment starts.
    let (code, r) = post_start(&app, "appointment", &request(cy, "int-1")).await;
    assert_eq!(code, 201, "{r}");
    assert_eq!(
        (&r["result"], &r["busy_with"]),
        (&"started".into(), &"survey".into())
    );
    assert_eq!(bodies_sent(&fake, cy, 1).await.len(), 1);
    assert_eq!(bodies(&app.send_sms(cy, "no").await.body), ["Cancelled."]);
    assert!(fake.requests_to(ben).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn starts_are_refused_without_token_for_unknown_flows_bad_input_and_opted_out_contacts() {
    let fake = FakeTwilio::start(TOKEN).await;
    let app = start_app(&fake).await;
    let dee = "+15557400004";
    let r = app
        .raw(
            app.client
                .post(app.url("/flows/appointment/start"))
                .header("content-type", "application/json")
                .body(request(dee, "k").to_string()),
        )
        .await;
    assert_eq!(r.status, 401);
    let r = app
        .raw(
            app.client
                .post(app.url("/flows/appointment/start"))
                .bearer_auth("wrong")
                .header("content-type", "application/json")
                .body(request(dee, "k").to_string()),
        )
        .await;
    assert_eq!(r.status, 401);
    let (code, _) = post_start(&app, "nope", &request(dee, "k")).await;
    assert_eq!(code, 404);
    for (body, reason) in [
        (request("5557400004", "k"), "country code"),
        (request(dee, ""), "idempotency_key"),
        (
            serde_json::json!({ "to": dee, "from": OUR_NUMBER }),
            "idempotency_key",
        ),
        (
            serde_json::json!({ "to": dee, "from": OUR_NUMBER, "idempotency_key": "k", "if_busy": "later" }),
            "unknown variant `later`",
        ),
    ] {
        let (code, answer) = post_start(&app, "appointment", &body).await;
        assert_eq!(code, 400, "{body}: {answer}");
        assert!(
            answer.as_str().unwrap_or("").contains(reason),
            "{body}: {answer}"
        );
    }
    // Nothing was recorded under the refused requests' key.
    assert!(app.store.start_record("k").unwrap().is_none());
    // An opted-out contact gets nothing.
    assert_eq!(app.send_sms(dee, "STOP").await.status, 200);
    let (code, r) = post_start(&app, "appointment", &request(dee, "k")).await;
    assert_eq!(code, 409, "{r}");
    assert_eq!(r["result"], "opted_out");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(fake.requests_to(dee).is_empty());
    assert!(app.store.outbound("start:k:0").unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn with_an_admin_port_starts_and_contacts_are_served_there_only() {
    let app = spawn_configured(&[("appointment.yaml", APPOINTMENT)], |c| {
        c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let admin = format!("http://{}", app.admin_addr.expect("an admin address"));
    let start = |base: &str| {
        app.client
            .post(format!("{base}/flows/appointment/start"))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "application/json")
            .body(request("+15557400010", "admin-1").to_string())
    };
    let contacts = |base: &str| {
        app.client
            .get(format!("{base}/contacts?from=%2B15550001111"))
            .bearer_auth(ADMIN_TOKEN)
    };
    let public = format!("http://{}", app.addr);
    assert_eq!(app.raw(start(&public)).await.status, 404);
    assert_eq!(app.raw(contacts(&public)).await.status, 404);
    let r = app.raw(start(&admin)).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = app.raw(contacts(&admin)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, "phone,appt,name\r\n'+15557400010,Tue 3pm,Ana\r\n");
    // The webhook is the public listener's only, its direct route too.
    let sms = app
        .client
        .post(format!("{admin}/twilio/sms"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("MessageSid=SM1&From=%2B15557400011&To=%2B15550001111&Body=hi");
    assert_eq!(app.raw(sms).await.status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_with_one_key_start_once() {
    let fake = FakeTwilio::start(TOKEN).await;
    let app = start_app(&fake).await;
    let eve = "+15557400005";
    let app = std::sync::Arc::new(app);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            post_start(&app, "appointment", &request(eve, "race-1")).await
        }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        let (code, body) = t.await.unwrap();
        assert_eq!(
            body["outbox"],
            serde_json::json!(["start:race-1:0"]),
            "{body}"
        );
        codes.push(code);
    }
    codes.sort();
    assert_eq!(codes, [200, 200, 200, 200, 200, 200, 200, 201]);
    assert_eq!(bodies_sent(&fake, eve, 1).await.len(), 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fake.requests_to(eve).len(), 1);
}

const SHORT_SURVEY: &str = r#"
name: quick
trigger: { keywords: [QUICK] }
expire_after: 2s
steps:
  ask:
    say: "Quick: 1-5?"
    wait:
      - regex: '^[1-5]$'
        say: "Noted."
"#;

/// `if_busy: queue`: the start waits in the conversation for the run to
/// end (a reply that finishes it, or the run expiring), survives a
/// SIGKILL meanwhile, and then sends its first step once.
#[tokio::test(flavor = "multi_thread")]
async fn a_queued_start_waits_for_the_run_to_end_and_survives_sigkill() {
    use crate::broadcast_crash::admin;
    use crate::fake_twilio::{ACCOUNT_SID, API_KEY_SECRET, API_KEY_SID};
    use crate::process::spawn_server_env;

    let fake = FakeTwilio::start(TOKEN).await;
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(flows.join("appointment.yaml"), APPOINTMENT).unwrap();
    std::fs::write(flows.join("survey.yaml"), SURVEY).unwrap();
    std::fs::write(flows.join("quick.yaml"), SHORT_SURVEY).unwrap();
    let data = tmp.path().join("data");
    let config = tmp.path().join("smsflow.toml");
    std::fs::write(
        &config,
        format!(
            "twilio_api_base = \"{}\"\nsend_interval_ms = 10\n",
            fake.base()
        ),
    )
    .unwrap();
    let args = ["--no-watch", "--config", config.to_str().unwrap()];
    let env = [
        ("SMSFLOW_ADMIN_TOKEN", ADMIN_TOKEN),
        ("TWILIO_ACCOUNT_SID", ACCOUNT_SID),
        ("TWILIO_API_KEY_SID", API_KEY_SID),
        ("TWILIO_API_KEY_SECRET", API_KEY_SECRET),
    ];
    let (ana, ben) = ("+15557410001", "+15557410002");
    let queue = |to: &str, key: &str| {
        let mut body = request(to, key);
        body["if_busy"] = "queue".into();
        body.to_string()
    };
    let post = reqwest::Method::POST;
    let json = "application/json";

    let server = spawn_server_env(&flows, &data, &args, &env);
    let survey = server.send(ana, "survey", &new_sid()).await.unwrap();
    assert_eq!(bodies(&survey), ["Rate us 1-5."]);
    let path = "/flows/appointment/start";
    let (code, queued) = admin(&server, post.clone(), path, json, queue(ana, "q-ana")).await;
    assert_eq!(code, 202, "{queued}");
    assert_eq!(
        (&queued["result"], &queued["busy_with"]),
        (&"queued".into(), &"survey".into()),
        "{queued}"
    );
    // The same key again answers the same, and queues nothing more.
    let (code, again) = admin(&server, post.clone(), path, json, queue(ana, "q-ana")).await;
    assert_eq!((code, &again["duplicate"]), (200, &true.into()), "{again}");
    // A contact with no run starts at once, queue or not.
    let (code, free) = admin(&server, post.clone(), path, json, queue(ben, "q-ben")).await;
    assert_eq!((code, &free["result"]), (201, &"started".into()), "{free}");
    assert_eq!(bodies_sent(&fake, ben, 1).await.len(), 1);
    // Ana's run goes on undisturbed, the start waiting behind it.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(fake.requests_to(ana).is_empty());
    server.signal("KILL");
    let mut server = server;
    assert!(!server.wait_exit(Duration::from_secs(10)).success());
    drop(server);

    let server = spawn_server_env(&flows, &data, &args, &env);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        fake.requests_to(ana).is_empty(),
        "started before the run ended"
    );
    // Her answer ends the survey; the queued start goes then, once.
    let thanks = server.send(ana, "4", &new_sid()).await.unwrap();
    assert_eq!(bodies(&thanks), ["Thanks!"]);
    assert_eq!(
        bodies_sent(&fake, ana, 1).await,
        ["Hi Ana, your appointment is Tue 3pm (ref A-17). Reply YES or NO."]
    );
    let confirmed = server.send(ana, "yes", &new_sid()).await.unwrap();
    assert_eq!(bodies(&confirmed), ["Confirmed: Tue 3pm."]);

    // A run nobody finishes: the start goes when it expires (2s idle).
    let carl = "+15557410003";
    let quick = server.send(carl, "quick", &new_sid()).await.unwrap();
    assert_eq!(bodies(&quick), ["Quick: 1-5?"]);
    let (code, r) = admin(&server, post.clone(), path, json, queue(carl, "q-carl")).await;
    assert_eq!((code, &r["busy_with"]), (202, &"quick".into()), "{r}");
    assert_eq!(bodies_sent(&fake, carl, 1).await.len(), 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fake.requests_to(ana).len(), 1, "a second copy");
    assert_eq!(fake.requests_to(carl).len(), 1, "a second copy");
}
