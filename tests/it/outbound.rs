//! Sending on our own, through the running server and a fake Twilio REST
//! API (`fake_twilio.rs`): outbox entries enqueued into the server's store
//! are sent once, retried, failed, skipped, deferred or marked unknown as
//! Twilio answers, and their delivery shows in `/messages`.

use std::path::Path;
use std::time::{Duration, Instant};

use smsflow::config::Config;
use smsflow::outbound::{Credentials, RawQuietHours};
use smsflow::store::{AnyStore, OutboxEntry, OutboxState, SledStore, Store, StoreConfig};

use crate::fake_twilio::{FakeTwilio, Fault, ACCOUNT_SID, API_KEY_SECRET, API_KEY_SID, API_SECRET};
use crate::helpers::*;

const FLOWS: &str = r#"
keywords:
  HOURS: "We're open 9-5"
default: "Text HOURS."
"#;

/// The test config for a server sending through `fake`: credentials as
/// the environment would give them, the fake as API base, a short send
/// timeout, and a public URL the fake can post callbacks to.
pub(crate) fn sending_config(fake: &FakeTwilio, flows: &Path, data: &Path) -> Config {
    let mut config = Config::for_test(flows, data, TOKEN);
    config.admin_token = Some(smsflow::config::AuthToken::new(ADMIN_TOKEN));
    // Port 0: the server puts the port it bound into its public URL.
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.public_url = "http://127.0.0.1:0".into();
    config.outbound.api_base = fake.base();
    config.outbound.credentials = Some(Credentials::with_auth_token(ACCOUNT_SID, API_SECRET));
    config.outbound.send_timeout = Duration::from_millis(1500);
    config
}

struct Dirs {
    tmp: tempfile::TempDir,
}

impl Dirs {
    fn new() -> Dirs {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("flows")).unwrap();
        std::fs::write(tmp.path().join("flows/keywords.yaml"), FLOWS).unwrap();
        Dirs { tmp }
    }
    fn flows(&self) -> std::path::PathBuf {
        self.tmp.path().join("flows")
    }
    fn data(&self) -> std::path::PathBuf {
        self.tmp.path().join("data")
    }
}

async fn start(config: Config) -> TestApp {
    let mut app = spawn_with(config).await;
    app.public_url = format!("http://{}", app.addr);
    app
}

async fn start_with(fake: &FakeTwilio, dirs: &Dirs, edit: impl FnOnce(&mut Config)) -> TestApp {
    let mut config = sending_config(fake, &dirs.flows(), &dirs.data());
    edit(&mut config);
    start(config).await
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A reminder from our number to `to`, due now, as the timers enqueue it.
fn reminder(key: &str, to: &str) -> OutboxEntry {
    let t = now();
    OutboxEntry {
        key: key.into(),
        to: to.into(),
        from: OUR_NUMBER.into(),
        messaging_service_sid: None,
        body: format!("Still there? ({key})"),
        media: Vec::new(),
        cause: "timeout".into(),
        flow: Some("appointment".into()),
        step: Some("confirm".into()),
        created_at: t,
        due_at: t,
        state: OutboxState::Pending {
            not_before: t,
            attempts: 0,
        },
    }
}

fn enqueue(app: &TestApp, entries: &[OutboxEntry]) {
    assert_eq!(app.store.enqueue_outbound(entries).unwrap(), entries.len());
}

/// Wait (at most 20 s) until the entry `key` satisfies `done`.
async fn wait_for(
    store: &AnyStore,
    key: &str,
    what: &str,
    done: impl Fn(&OutboxState) -> bool,
) -> OutboxEntry {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let entry = store.outbound(key).unwrap().expect("entry exists");
        if done(&entry.state) {
            return entry;
        }
        assert!(
            Instant::now() < deadline,
            "{key}: still {:?}, waiting for {what}",
            entry.state
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sent(s: &OutboxState) -> bool {
    matches!(s, OutboxState::Sent { .. })
}

fn sid_of(entry: &OutboxEntry) -> String {
    match &entry.state {
        OutboxState::Sent { sid, .. } => sid.clone(),
        other => panic!("not sent: {other:?}"),
    }
}

async fn metric(app: &TestApp, line_start: &str) -> String {
    let text = app.raw(app.client.get(app.url("/metrics"))).await.body;
    text.lines()
        .find(|l| l.starts_with(line_start))
        .unwrap_or_else(|| panic!("no {line_start} in\n{text}"))
        .to_owned()
}

/// The `/messages` row of `sid`, once its status is `status`.
async fn wait_for_row(app: &TestApp, sid: &str, status: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = app.admin_json("/messages").await;
        let row = rows["messages"]
            .as_array()
            .or(rows.as_array())
            .unwrap_or_else(|| panic!("{rows}"))
            .iter()
            .find(|r| r["sid"] == sid)
            .cloned();
        if let Some(row) = row.filter(|r| r["status"] == status) {
            return row;
        }
        assert!(
            Instant::now() < deadline,
            "{sid} never reached {status}: {rows}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait (up to 20 s) until the fake has recorded `n` status callbacks.
async fn posted_at_least(fake: &FakeTwilio, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while fake.posted().len() < n {
        assert!(Instant::now() < deadline, "{:?}", fake.posted());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_due_message_is_sent_once_and_its_delivery_is_tracked() {
    let fake = FakeTwilio::start(TOKEN).await;
    fake.callbacks(&["sent", "delivered"]);
    let dirs = Dirs::new();
    let app = start_with(&fake, &dirs, |_| {}).await;
    enqueue(&app, &[reminder("r1", "+15551230001")]);
    let entry = wait_for(&app.store, "r1", "sent", sent).await;
    let sid = sid_of(&entry);
    assert!(
        sid.len() == 34 && sid.starts_with("SM"),
        "Twilio's MessageSid: {sid}"
    );
    let row = wait_for_row(&app, &sid, "delivered").await;
    assert_eq!(row["direction"], "outbound");
    assert_eq!(row["to"], "+15551230001");
    assert_eq!(row["from"], OUR_NUMBER);
    assert_eq!(
        (&row["flow"], &row["step"]),
        (&"appointment".into(), &"confirm".into())
    );
    assert_eq!(row["outbox"], "r1");
    // Every callback was accepted: signed as Twilio signs them. The fake
    // records a callback when our answer reaches it, which can be after
    // the row already shows it.
    posted_at_least(&fake, 2).await;
    let posted = fake.posted();
    assert_eq!(posted.len(), 2);
    assert!(posted.iter().all(|c| c.answered == 200), "{posted:?}");
    // One request, as documented: To, From, Body and our status callback.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let requests = fake.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let r = &requests[0];
    assert_eq!(r.answered, 201);
    assert_eq!(
        r.path,
        format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json")
    );
    assert_eq!(r.param("From"), Some(OUR_NUMBER));
    assert_eq!(r.param("Body"), Some("Still there? (r1)"));
    assert_eq!(
        r.param("StatusCallback"),
        Some(
            format!(
                "{}/twilio/status?flow=appointment&step=confirm&outbox=r1",
                app.public_url
            )
            .as_str()
        )
    );
    assert_eq!(
        metric(&app, "smsflow_outbound_total{outcome=\"sent\"}").await,
        "smsflow_outbound_total{outcome=\"sent\"} 1"
    );
    assert_eq!(
        metric(&app, "smsflow_outbox_depth ").await,
        "smsflow_outbox_depth 0"
    );
    assert!(metric(&app, "smsflow_send_duration_seconds_count")
        .await
        .ends_with(" 1"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn callbacks_out_of_order_end_at_the_highest_status() {
    let fake = FakeTwilio::start(TOKEN).await;
    fake.callbacks(&["delivered", "sent", "queued"]);
    let dirs = Dirs::new();
    let app = start_with(&fake, &dirs, |_| {}).await;
    enqueue(&app, &[reminder("r1", "+15551230001")]);
    let sid = sid_of(&wait_for(&app.store, "r1", "sent", sent).await);
    posted_at_least(&fake, 3).await;
    wait_for_row(&app, &sid, "delivered").await;
    let posted: Vec<(String, String, u16)> = fake
        .posted()
        .into_iter()
        .map(|c| (c.message_sid, c.status, c.answered))
        .collect();
    let expected: Vec<(String, String, u16)> = ["delivered", "sent", "queued"]
        .iter()
        .map(|s| (sid.clone(), s.to_string(), 200))
        .collect();
    assert_eq!(
        posted, expected,
        "each late callback is accepted, and ignored"
    );
    assert_eq!(
        app.store.delivery_status(&sid).unwrap().unwrap().status,
        "delivered"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn throttled_twice_then_sent() {
    let fake = FakeTwilio::start(TOKEN).await;
    fake.fault(&[Fault::TooManyRequests, Fault::TooManyRequests]);
    let dirs = Dirs::new();
    let app = start_with(&fake, &dirs, |_| {}).await;
    enqueue(&app, &[reminder("r1", "+15551230001")]);
    wait_for(&app.store, "r1", "sent", sent).await;
    let answered: Vec<u16> = fake.requests().iter().map(|r| r.answered).collect();
    assert_eq!(answered, [429, 429, 201]);
    assert_eq!(
        metric(&app, "smsflow_outbound_total{outcome=\"retried\"}").await,
        "smsflow_outbound_total{outcome=\"retried\"} 2"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_error_is_retried() {
    let fake = FakeTwilio::start(TOKEN).await;
    fake.fault(&[Fault::ServerError]);
    let dirs = Dirs::new();
    let app = start_with(&fake, &dirs, |_| {}).await;
    enqueue(&app, &[reminder("r1", "+15551230001")]);
    wait_for(&app.store, "r1", "sent", sent).await;
    let answered: Vec<u16> = fake.requests().iter().map(|r| r.answered).collect();
    assert_eq!(answered, [500, 201]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unsubscribed_recipient_is_not_retried_and_recorded_opted_out() {
    let fake = FakeTwilio::start(TOKEN).await;
    let gone = "+15551230004";
    fake.refuse(gone, 21610);
    let dirs = Dirs::new();
    let app = start_with(&fake, &dirs, |_| {}).await;
    enqueue(&app, &[reminder("r1", gone)]);
    let entry = wait_for(&app.store, "r1", "failed", |s| {
        matches!(s, OutboxState::Failed { .. })
    })
    .await;
    assert!(
        matches!(
            entry.state,
            OutboxState::Failed {
                code: Some(21610),
                ..
            }
        ),
        "{:?}",
        entry.state
    );
    assert!(
        app.store
            .opt_out(OUR_NUMBER, gone)
            .unwrap()
            .unwrap()
            .opted_out
    );
    let audit = app.store.audit_log().unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(
        (audit[0].cause.as_str(), audit[0].action.as_str()),
        ("error 21610", "opt_out")
    );
    // A later message to them is skipped without asking Twilio.
    enqueue(&app, &[reminder("r2", gone)]);
    let entry = wait_for(&app.store, "r2", "skipped", |s| {
        matches!(s, OutboxState::Skipped { .. })
    })
    .await;
    assert!(
        matches!(&entry.state, OutboxState::Skipped { reason, .. } if reason == "opted_out"),
        "{:?}",
        entry.state
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fake.requests().len(), 1);
    // Both show in the message log, though neither has a MessageSid.
    let rows = app.admin_json("/messages?number=%2B15551230004").await;
    let rows: Vec<(String, String, String)> = rows["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["outbox"].as_str().unwrap_or("").to_owned(),
                r["status"].as_str().unwrap().to_owned(),
                r["error_code"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert!(
        rows.contains(&("r1".into(), "failed".into(), "21610".into())),
        "{rows:?}"
    );
    assert!(
        rows.contains(&("r2".into(), "skipped:opted_out".into(), "".into())),
        "{rows:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_number_fails_that_message_only() {
    let fake = FakeTwilio::start(TOKEN).await;
    fake.refuse("+15551230009", 21211);
    let dirs = Dirs::new();
    let app = start_with(&fake, &dirs, |_| {}).await;
    enqueue(
        &app,
        &[
            reminder("bad", "+15551230009"),
            reminder("good", "+15551230001"),
        ],
    );
    let bad = wait_for(&app.store, "bad", "failed", |s| {
        matches!(s, OutboxState::Failed { .. })
    })
    .await;
    assert!(
        matches!(&bad.state, OutboxState::Failed { code: Some(21211), reason, .. } if reason.contains("not a valid phone number")),
        "{:?}",
        bad.state
    );
    wait_for(&app.store, "good", "sent", sent).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fake.requests_to("+15551230009").len(), 1, "not retried");
    assert!(app
        .store
        .opt_out(OUR_NUMBER, "+15551230009")
        .unwrap()
        .is_none());
    app.stop().await;
}

fn unknown(s: &OutboxState) -> bool {
    matches!(s, OutboxState::Unknown { .. })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_that_hangs_past_the_timeout_is_unknown_and_never_resent() {
    let fake = FakeTwilio::start(TOKEN).await;
    fake.fault(&[Fault::Hang(Duration::from_secs(10))]);
    let dirs = Dirs::new();
    let app = start_with(&fake, &dirs, |_| {}).await;
    enqueue(&app, &[reminder("r1", "+15551230001")]);
    wait_for(&app.store, "r1", "unknown", unknown).await;
    app.stop().await;
    // After a restart it is still not sent again.
    let app = start_with(&fake, &dirs, |_| {}).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(unknown(&app.store.outbound("r1").unwrap().unwrap().state));
    assert_eq!(fake.requests().len(), 1);
    assert_eq!(
        metric(&app, "smsflow_outbox_depth ").await,
        "smsflow_outbox_depth 0"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_dropped_after_the_request_is_unknown() {
    let fake = FakeTwilio::start(TOKEN).await;
    fake.fault(&[Fault::Drop]);
    let dirs = Dirs::new();
    let app = start_with(&fake, &dirs, |_| {}).await;
    enqueue(&app, &[reminder("r1", "+15551230001")]);
    wait_for(&app.store, "r1", "unknown", unknown).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fake.requests().len(), 1);
    assert_eq!(
        metric(&app, "smsflow_outbound_total{outcome=\"unknown\"}").await,
        "smsflow_outbound_total{outcome=\"unknown\"} 1"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_entry_left_sending_by_a_crash_is_unknown_at_startup() {
    let fake = FakeTwilio::start(TOKEN).await;
    let dirs = Dirs::new();
    {
        // What a crash between "Sending" and Twilio's answer leaves.
        let store = SledStore::open(&dirs.data(), &StoreConfig::default()).unwrap();
        let mut entry = reminder("r1", "+15551230001");
        entry.state = OutboxState::Sending {
            since: now(),
            attempts: 1,
        };
        store.enqueue_outbound(&[entry]).unwrap();
        store.flush_blocking().unwrap();
    }
    let app = start_with(&fake, &dirs, |_| {}).await;
    wait_for(&app.store, "r1", "unknown", unknown).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(fake.requests().is_empty(), "never sent again");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sender_who_texted_stop_gets_nothing() {
    let fake = FakeTwilio::start(TOKEN).await;
    let dirs = Dirs::new();
    let app = start_with(&fake, &dirs, |_| {}).await;
    let r = app.send_sms("+15551230002", "STOP").await;
    assert_eq!(r.status, 200, "{}", r.body);
    enqueue(&app, &[reminder("r1", "+15551230002")]);
    let entry = wait_for(&app.store, "r1", "skipped", |s| {
        matches!(s, OutboxState::Skipped { .. })
    })
    .await;
    assert!(
        matches!(&entry.state, OutboxState::Skipped { reason, .. } if reason == "opted_out"),
        "{:?}",
        entry.state
    );
    assert!(fake.requests().is_empty());
    assert_eq!(
        metric(&app, "smsflow_outbound_total{outcome=\"skipped\"}").await,
        "smsflow_outbound_total{outcome=\"skipped\"} 1"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_due_long_ago_is_skipped_as_too_late() {
    let fake = FakeTwilio::start(TOKEN).await;
    let dirs = Dirs::new();
    let app = start_with(&fake, &dirs, |c| {
        c.outbound.max_late = Duration::from_secs(3600)
    })
    .await;
    let mut old = reminder("old", "+15551230001");
    old.due_at -= 7200;
    old.state = OutboxState::Pending {
        not_before: old.due_at,
        attempts: 0,
    };
    enqueue(&app, &[old, reminder("fresh", "+15551230003")]);
    let entry = wait_for(&app.store, "old", "skipped", |s| {
        matches!(s, OutboxState::Skipped { .. })
    })
    .await;
    assert!(
        matches!(&entry.state, OutboxState::Skipped { reason, .. } if reason == "too_late"),
        "{:?}",
        entry.state
    );
    wait_for(&app.store, "fresh", "sent", sent).await;
    assert!(fake.requests_to("+15551230001").is_empty());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn quiet_hours_defer_a_message_to_their_end() {
    let fake = FakeTwilio::start(TOKEN).await;
    let dirs = Dirs::new();
    // Quiet from an hour ago until two hours from now, UTC.
    let minute = now().div_euclid(60);
    let hh_mm = |m: i64| {
        let m = m.rem_euclid(1440);
        format!("{:02}:{:02}", m / 60, m % 60)
    };
    let end = minute * 60 + 120 * 60;
    let app = start_with(&fake, &dirs, |c| {
        c.outbound.quiet_hours = smsflow::outbound::quiet_rules(vec![RawQuietHours {
            number: OUR_NUMBER.into(),
            start: hh_mm(minute - 60),
            end: hh_mm(minute + 120),
            time_zone: "UTC".into(),
        }])
        .unwrap();
    })
    .await;
    enqueue(
        &app,
        &[reminder("r1", "+15551230001"), {
            let mut other = reminder("r2", "+15551230001");
            other.from = "+15550002222".into();
            other
        }],
    );
    let entry = wait_for(
        &app.store,
        "r1",
        "deferred",
        |s| matches!(s, OutboxState::Pending { not_before, .. } if *not_before > now()),
    )
    .await;
    assert_eq!(
        entry.state,
        OutboxState::Pending {
            not_before: end,
            attempts: 0
        }
    );
    // Another of our numbers has no quiet hours.
    wait_for(&app.store, "r2", "sent", sent).await;
    assert_eq!(fake.requests().len(), 1);
    assert_eq!(
        metric(&app, "smsflow_outbound_total{outcome=\"deferred\"}").await,
        "smsflow_outbound_total{outcome=\"deferred\"} 1"
    );
    assert_eq!(
        metric(&app, "smsflow_outbox_depth ").await,
        "smsflow_outbox_depth 1"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_from_one_number_are_paced() {
    let fake = FakeTwilio::start(TOKEN).await;
    let dirs = Dirs::new();
    let app = start_with(&fake, &dirs, |_| {}).await;
    let entries: Vec<OutboxEntry> = (1..=3)
        .map(|n| reminder(&format!("r{n}"), &format!("+1555123000{n}")))
        .collect();
    enqueue(&app, &entries);
    for e in &entries {
        wait_for(&app.store, &e.key, "sent", sent).await;
    }
    let mut times: Vec<Instant> = fake.requests().iter().map(|r| r.at).collect();
    assert_eq!(times.len(), 3);
    times.sort();
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        // One a second (Twilio's long-code pace); wide margins for a
        // busy machine on the upper side.
        assert!(
            gap >= Duration::from_millis(900) && gap < Duration::from_secs(8),
            "gap {gap:?}"
        );
    }
    app.stop().await;
}

/// The fake itself follows Twilio's documented answers.
#[tokio::test(flavor = "multi_thread")]
async fn the_fake_twilio_checks_what_twilio_checks() {
    let fake = FakeTwilio::start(TOKEN).await;
    let client = reqwest::Client::new();
    let post = |url: String, auth: Option<(&str, &str)>, form: &[(&str, &str)]| {
        let mut req = client
            .post(url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(encode_form(
                &form
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<Vec<_>>(),
            ));
        if let Some((u, p)) = auth {
            req = req.basic_auth(u, Some(p));
        }
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (
                status,
                serde_json::from_str::<serde_json::Value>(&r.text().await.unwrap()).unwrap(),
            )
        }
    };
    let good = Some((ACCOUNT_SID, API_SECRET));
    let msg = [("To", "+15551230001"), ("From", OUR_NUMBER), ("Body", "hi")];
    let (status, body) = post(fake.messages_url(), Some((ACCOUNT_SID, "wrong")), &msg).await;
    assert_eq!((status, body["code"].as_u64()), (401, Some(20003)));
    assert_eq!(
        body["more_info"],
        "https://www.twilio.com/docs/errors/20003"
    );
    let (status, _) = post(fake.messages_url(), None, &msg).await;
    assert_eq!(status, 401);
    let other = fake
        .messages_url()
        .replace(ACCOUNT_SID, "AC00000000000000000000000000000000");
    assert_eq!(post(other, good, &msg).await.0, 404);
    let (status, body) = post(fake.messages_url(), good, &msg[1..]).await;
    assert_eq!((status, body["code"].as_u64()), (400, Some(21604)));
    let (status, body) = post(fake.messages_url(), good, &[msg[0], msg[2]]).await;
    assert_eq!((status, body["code"].as_u64()), (400, Some(21603)));
    let (status, body) = post(fake.messages_url(), good, &msg[..2]).await;
    assert_eq!((status, body["code"].as_u64()), (400, Some(21602)));
    let long = "x".repeat(1601);
    let (status, body) = post(
        fake.messages_url(),
        good,
        &[msg[0], msg[1], ("Body", &long)],
    )
    .await;
    assert_eq!((status, body["code"].as_u64()), (400, Some(21617)));
    let (status, body) = post(fake.messages_url(), good, &msg).await;
    assert_eq!(status, 201, "{body}");
    let sid = body["sid"].as_str().unwrap();
    assert!(
        sid.len() == 34 && sid.starts_with("SM") && sid[2..].bytes().all(|b| b.is_ascii_hexdigit()),
        "{sid}"
    );
    assert_eq!(body["status"], "queued");
    assert_eq!(body["account_sid"], ACCOUNT_SID);
    assert_eq!(
        body["uri"],
        format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{sid}.json")
    );
    let (status, body) = post(
        fake.messages_url(),
        good,
        &[
            msg[0],
            ("MessagingServiceSid", "MG00000000000000000000000000000001"),
            msg[2],
        ],
    )
    .await;
    assert_eq!((status, body["status"].as_str()), (201, Some("accepted")));
}

/// The binary reads the credentials from the environment (an API key
/// here) and sends what waits in the outbox at startup.
#[tokio::test(flavor = "multi_thread")]
async fn serve_sends_with_credentials_from_the_environment() {
    let fake = FakeTwilio::start(TOKEN).await;
    let dirs = Dirs::new();
    {
        let store = SledStore::open(&dirs.data(), &StoreConfig::default()).unwrap();
        store
            .enqueue_outbound(&[reminder("r1", "+15551230001")])
            .unwrap();
        store.flush_blocking().unwrap();
    }
    let config = dirs.tmp.path().join("smsflow.toml");
    std::fs::write(&config, format!("twilio_api_base = \"{}\"\n", fake.base())).unwrap();
    let server = crate::process::spawn_server_env(
        &dirs.flows(),
        &dirs.data(),
        &["--config", config.to_str().unwrap()],
        &[
            ("TWILIO_ACCOUNT_SID", ACCOUNT_SID),
            ("TWILIO_API_KEY_SID", API_KEY_SID),
            ("TWILIO_API_KEY_SECRET", API_KEY_SECRET),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while fake.requests().is_empty() {
        assert!(Instant::now() < deadline, "nothing sent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(fake.requests()[0].answered, 201, "the API key was accepted");
    // Secrets never reach the log.
    let deadline = Instant::now() + Duration::from_secs(20);
    let log = loop {
        let log = server.log.lock().unwrap().join("\n");
        if log.contains("outbound message sent") {
            break log;
        }
        assert!(Instant::now() < deadline, "{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!log.contains(API_KEY_SECRET), "{log}");
    drop(server);
}

#[test]
fn serve_refuses_half_set_credentials_naming_the_missing_variable() {
    let dirs = Dirs::new();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smsflow"))
        .args(["serve", "--listen", "127.0.0.1:0", "--flows"])
        .arg(dirs.flows())
        .arg("--data")
        .arg(dirs.data())
        .env("TWILIO_AUTH_TOKEN", TOKEN)
        .env("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
        .env("TWILIO_API_KEY_SID", API_KEY_SID)
        .env_remove("TWILIO_API_KEY_SECRET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("TWILIO_API_KEY_SECRET is not set: TWILIO_API_KEY_SID is set"),
        "{err}"
    );
}

/// Twilio unreachable (no connection made): the request never left, so it
/// is tried again later, never marked unknown.
#[tokio::test(flavor = "multi_thread")]
async fn no_connection_is_retried_not_unknown() {
    let fake = FakeTwilio::start(TOKEN).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let dirs = Dirs::new();
    let app = start_with(&fake, &dirs, |c| {
        c.outbound.api_base = format!("http://127.0.0.1:{port}");
    })
    .await;
    enqueue(&app, &[reminder("r1", "+15551230001")]);
    let entry = wait_for(
        &app.store,
        "r1",
        "a retry",
        |s| matches!(s, OutboxState::Pending { attempts, .. } if *attempts >= 1),
    )
    .await;
    assert!(matches!(entry.state, OutboxState::Pending { .. }));
    assert_eq!(
        metric(&app, "smsflow_outbound_total{outcome=\"unknown\"}").await,
        "smsflow_outbound_total{outcome=\"unknown\"} 0"
    );
    app.stop().await;
}

/// Messages we send count toward the loop guard of their conversation,
/// like replies do.
#[tokio::test(flavor = "multi_thread")]
async fn sent_messages_count_toward_the_loop_guard() {
    let fake = FakeTwilio::start(TOKEN).await;
    let dirs = Dirs::new();
    let app = start_with(&fake, &dirs, |c| {
        c.loop_max_replies = 2;
        c.loop_window_secs = 3600;
    })
    .await;
    let them = "+15551230001";
    enqueue(&app, &[reminder("r1", them), reminder("r2", them)]);
    wait_for(&app.store, "r1", "sent", sent).await;
    wait_for(&app.store, "r2", "sent", sent).await;
    // Two sent already: their next message is not answered.
    let silence = r#"<?xml version="1.0" encoding="UTF-8"?><Response/>"#;
    assert_eq!(app.send_sms(them, "hello").await.body, silence);
    // Another sender is answered.
    assert_eq!(
        bodies(&app.send_sms("+15551230002", "hello").await.body),
        vec!["Text HOURS."]
    );
    app.stop().await;
}

/// A graceful stop leaves the messages still waiting (for their pace
/// slot) pending, and they go out once each after the restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_leaves_waiting_messages_pending_for_the_restart() {
    let fake = FakeTwilio::start(TOKEN).await;
    let dirs = Dirs::new();
    let app = start_with(&fake, &dirs, |c| {
        c.outbound.send_interval = Duration::from_secs(5);
    })
    .await;
    let entries: Vec<OutboxEntry> = (1..=3)
        .map(|n| reminder(&format!("r{n}"), &format!("+1555123000{n}")))
        .collect();
    enqueue(&app, &entries);
    wait_for(&app.store, "r1", "sent", sent).await;
    app.stop().await;
    assert_eq!(fake.requests().len(), 1);
    let store = SledStore::open(&dirs.data(), &StoreConfig::default()).unwrap();
    for key in ["r2", "r3"] {
        let state = store.outbound(key).unwrap().unwrap().state;
        assert!(
            matches!(state, OutboxState::Pending { attempts: 0, .. }),
            "{key}: {state:?}"
        );
    }
    drop(store);
    let app = start_with(&fake, &dirs, |c| {
        c.outbound.send_interval = Duration::from_millis(200);
    })
    .await;
    wait_for(&app.store, "r2", "sent", sent).await;
    wait_for(&app.store, "r3", "sent", sent).await;
    // Each once; r1 before the stop (r2 and r3 in the order of their
    // scheduled times, which depends on when the first pass saw them).
    let mut to: Vec<String> = fake
        .requests()
        .iter()
        .map(|r| r.param("To").unwrap().to_owned())
        .collect();
    assert_eq!(to[0], "+15551230001");
    to.sort();
    assert_eq!(to, ["+15551230001", "+15551230002", "+15551230003"]);
    app.stop().await;
}
