//! Campaigns through the front door: the running server with a campaign
//! file in its flows, contact fields imported through the admin API, the
//! reminders sent through the fake Twilio REST API. Times are real: each
//! test sets the date field so that its event comes due a few seconds
//! from now.

use std::time::{Duration, Instant};

use smsflow::config::Config;
use smsflow::outbound::RawQuietHours;
use smsflow::store::{OutboxState, Store};

use crate::fake_twilio::{bodies_sent, FakeTwilio};
use crate::helpers::*;
use crate::outbound::sending_config;

const REMINDER: &str = r#"
fields: [appt]
steps:
  ask:
    say: "Reminder: your appointment is {{contact.appt}}. Reply YES or NO."
    wait:
      - yes: true
        say: "Confirmed."
      - no: true
        say: "Cancelled."
"#;

/// The event is the field's time minus a day, so a field a day and a few
/// seconds from now is due in a few seconds.
const CAMPAIGNS: &str = r#"
campaigns:
  appointments:
    field: appt
    events:
      day_before:
        when: 1 day before
        start: reminder
"#;

struct Dirs {
    tmp: tempfile::TempDir,
}

impl Dirs {
    fn new() -> Dirs {
        let tmp = tempfile::tempdir().unwrap();
        let flows = tmp.path().join("flows");
        std::fs::create_dir(&flows).unwrap();
        std::fs::write(flows.join("reminder.yaml"), REMINDER).unwrap();
        std::fs::write(flows.join("campaigns.yaml"), CAMPAIGNS).unwrap();
        Dirs { tmp }
    }

    async fn start(&self, fake: &FakeTwilio, edit: impl FnOnce(&mut Config)) -> TestApp {
        let mut config = sending_config(
            fake,
            &self.tmp.path().join("flows"),
            &self.tmp.path().join("data"),
        );
        edit(&mut config);
        let mut app = spawn_with(config).await;
        app.public_url = format!("http://{}", app.addr);
        app
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// An `appt` value (UTC, as an instant) whose day-before event is due
/// `secs` from now.
fn appt_due_in(secs: i64) -> String {
    jiff::Timestamp::from_second(now() + 86_400 + secs)
        .unwrap()
        .to_string()
}

async fn import(app: &TestApp, csv: &str) {
    let r = app
        .raw(
            app.client
                .post(app.url("/contacts?from=%2B15550001111"))
                .bearer_auth(ADMIN_TOKEN)
                .header("content-type", "text/csv")
                .body(csv.to_owned()),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

fn key(contact: &str, appt: &str) -> String {
    format!("campaign:appointments:day_before:{OUR_NUMBER}:{contact}:{appt}")
}

/// The start record of an event, once it is there.
async fn fired(app: &TestApp, key: &str) -> smsflow::store::StartRecord {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(r) = app.store.start_record(key).unwrap() {
            return r;
        }
        assert!(Instant::now() < deadline, "{key} never fired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_field_change_schedules_the_event_which_fires_once_per_date_across_a_restart() {
    let fake = FakeTwilio::start(TOKEN).await;
    let dirs = Dirs::new();
    let app = dirs.start(&fake, |_| {}).await;
    let ana = "+15557600001";
    let first = appt_due_in(2);
    import(&app, &format!("phone,appt\n{ana},{first}\n")).await;
    let sent = bodies_sent(&fake, ana, 1).await;
    assert_eq!(
        sent,
        [format!(
            "Reminder: your appointment is {first}. Reply YES or NO."
        )]
    );
    assert_eq!(fired(&app, &key(ana, &first)).await.result, "started");
    // The reply goes on in the flow the campaign started.
    assert_eq!(bodies(&app.send_sms(ana, "yes").await.body), ["Confirmed."]);
    app.stop().await;

    // After a restart (the startup pass over every conversation included),
    // the event that fired is not fired again.
    let app = dirs.start(&fake, |_| {}).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(fake.requests_to(ana).len(), 1);

    // A new date is a new event: scheduled by the field change.
    let second = appt_due_in(2);
    assert_ne!(first, second);
    import(&app, &format!("phone,appt\n{ana},{second}\n")).await;
    let sent = bodies_sent(&fake, ana, 2).await;
    assert_eq!(
        sent[1],
        format!("Reminder: your appointment is {second}. Reply YES or NO.")
    );
    // Back to the first date (its time still within the grace period):
    // that event was sent, so nothing is sent again.
    import(&app, &format!("phone,appt\n{ana},{first}\n")).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(fake.requests_to(ana).len(), 2);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_opted_out_contact_gets_no_campaign_message() {
    let fake = FakeTwilio::start(TOKEN).await;
    let dirs = Dirs::new();
    let app = dirs.start(&fake, |_| {}).await;
    let ben = "+15557600002";
    let cy = "+15557600003";
    app.send_sms(ben, "STOP").await;
    let appt = appt_due_in(1);
    import(&app, &format!("phone,appt\n{ben},{appt}\n{cy},{appt}\n")).await;
    // Cy, who did not opt out, gets the reminder; Ben's event is spent
    // without a message.
    bodies_sent(&fake, cy, 1).await;
    assert_eq!(fired(&app, &key(ben, &appt)).await.result, "opted_out");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(fake.requests_to(ben).is_empty());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn quiet_hours_defer_a_campaign_message_to_their_end() {
    let fake = FakeTwilio::start(TOKEN).await;
    let dirs = Dirs::new();
    // Quiet from an hour ago until two hours from now, UTC.
    let minute = now().div_euclid(60);
    let hh_mm = |m: i64| {
        let m = m.rem_euclid(1440);
        format!("{:02}:{:02}", m / 60, m % 60)
    };
    let end = minute * 60 + 120 * 60;
    let app = dirs
        .start(&fake, |c| {
            c.outbound.quiet_hours = smsflow::outbound::quiet_rules(vec![RawQuietHours {
                number: OUR_NUMBER.into(),
                start: hh_mm(minute - 60),
                end: hh_mm(minute + 120),
                time_zone: "UTC".into(),
            }])
            .unwrap();
        })
        .await;
    let dee = "+15557600004";
    let appt = appt_due_in(1);
    import(&app, &format!("phone,appt\n{dee},{appt}\n")).await;
    let record = fired(&app, &key(dee, &appt)).await;
    assert_eq!(record.result, "started");
    let outbox = &record.outbox[0];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let entry = app.store.outbound(outbox).unwrap().unwrap();
        if let OutboxState::Pending { not_before, .. } = entry.state {
            if not_before == end {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "never deferred: {:?}",
            entry.state
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(fake.requests_to(dee).is_empty());
    app.stop().await;
}

/// A campaign sends on its own even when the flow it starts has no
/// timeout: without outbound credentials, a reload that adds one is
/// refused, naming the flow, and the set without it stays live.
#[tokio::test(flavor = "multi_thread")]
async fn without_credentials_a_campaign_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(flows.join("reminder.yaml"), REMINDER).unwrap();
    let config = Config::for_test(&flows, &tmp.path().join("data"), TOKEN);
    let app = smsflow::app::App::build(config).await.unwrap();
    let live = app.reloader().status().version;
    std::fs::write(flows.join("campaigns.yaml"), CAMPAIGNS).unwrap();
    match app.reloader().reload_now() {
        smsflow::reload::ReloadOutcome::Refused { errors } => assert!(
            errors.contains("flow `reminder` sends messages on its own (a campaign starts it)"),
            "{errors}"
        ),
        other => panic!("not refused: {other:?}"),
    }
    assert_eq!(app.reloader().status().version, live);
}

/// README's appointment reminder, end to end with the shipped flows
/// (campaigns.yaml, reminder.yaml): contacts imported from CSV with an
/// appointment tomorrow, the reminder sent "the day before at 10:00" in
/// each contact's time zone, YES confirming and NO cancelling, and the
/// message log showing each message with its delivery status. The
/// contacts' zone is one where it is now past noon, so 10:00 today has
/// passed by less than the grace period and the reminder goes out at
/// once. (The no-answer reminder three hours later is the shipped
/// transcript's, on the virtual clock.)
#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_appointment_reminder_runs_end_to_end() {
    let fake = FakeTwilio::start(TOKEN).await;
    fake.callbacks(&["sent", "delivered"]);
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("flows");
    for e in std::fs::read_dir(&shipped).unwrap().flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), flows.join(e.file_name())).unwrap();
        }
    }
    let config = sending_config(&fake, &flows, &tmp.path().join("data"));
    let mut app = spawn_with(config).await;
    app.public_url = format!("http://{}", app.addr);

    // A fixed-offset zone where it is now 12:xx.
    let utc_hour = i64::from(
        jiff::Timestamp::now()
            .to_zoned(jiff::tz::TimeZone::UTC)
            .hour(),
    );
    let offset = 12 - utc_hour;
    let tz = match offset {
        0 => "Etc/GMT".to_owned(),
        o if o > 0 => format!("Etc/GMT-{o}"),
        o => format!("Etc/GMT+{}", -o),
    };
    let zone = jiff::tz::TimeZone::get(&tz).unwrap();
    let today = jiff::Timestamp::now().to_zoned(zone).date();
    let appt = format!("{} 15:00", today.tomorrow().unwrap());
    let (ana, ben) = ("+15557600011", "+15557600012");
    import(
        &app,
        &format!("phone,name,appt,tz\n{ana},Ana,{appt},{tz}\n{ben},Ben,{appt},{tz}\n"),
    )
    .await;
    let reminder = |name: &str| {
        format!("Hi {name}, this is a reminder of your appointment on {appt}. Reply YES to confirm or NO to cancel.")
    };
    assert_eq!(bodies_sent(&fake, ana, 1).await, [reminder("Ana")]);
    assert_eq!(bodies_sent(&fake, ben, 1).await, [reminder("Ben")]);
    assert_eq!(
        bodies(&app.send_sms(ana, "Yes").await.body),
        ["Thank you, see you then!"]
    );
    assert_eq!(
        bodies(&app.send_sms(ben, "no").await.body),
        ["Your appointment is cancelled. Call 555-0100 to book another."]
    );
    let fields = |who: &str| {
        let bytes = app
            .store
            .conversation(&smsflow::store::ConvKey::new(OUR_NUMBER, who))
            .unwrap()
            .unwrap();
        smsflow::flow::Conversation::from_stored(&bytes)
            .unwrap()
            .contact
    };
    assert_eq!(fields(ana)["appt_status"], "confirmed");
    assert_eq!(fields(ben)["appt_status"], "cancelled");

    // The message log: each reminder with its delivery status (from the
    // fake's callbacks), each reply and the answer to it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let rows = loop {
        let log = app
            .admin_json(&format!("/messages?number=%2B{}", &ana[1..]))
            .await;
        let rows = log["messages"].as_array().cloned().unwrap_or_default();
        let delivered = rows.iter().any(|r| {
            r["direction"] == "outbound"
                && r["status"] == "delivered"
                && r["outbox"]
                    .as_str()
                    .is_some_and(|k| k.starts_with("start:campaign:appointments:day_before:"))
        });
        if delivered {
            break rows;
        }
        assert!(Instant::now() < deadline, "not delivered: {log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        rows.iter()
            .any(|r| r["direction"] == "inbound" && r["status"] == "reply"),
        "{rows:?}"
    );
    app.stop().await;
}

/// An event that came due while the server was down fires when it is back
/// (within `max_late_secs`), once.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_due_while_the_server_was_down_fires_at_startup() {
    let fake = FakeTwilio::start(TOKEN).await;
    let dirs = Dirs::new();
    let app = dirs.start(&fake, |_| {}).await;
    let eve = "+15557600005";
    // Due after the server stopped (a stop takes well under a second).
    let appt = appt_due_in(4);
    import(&app, &format!("phone,appt\n{eve},{appt}\n")).await;
    app.stop().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(fake.requests_to(eve).is_empty());
    let app = dirs.start(&fake, |_| {}).await;
    bodies_sent(&fake, eve, 1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fake.requests_to(eve).len(), 1);
    app.stop().await;
}
