//! Timeouts through the front door: signed webhooks start a waiting step,
//! the running server's scheduler fires its `timeout:`s on the real clock
//! (seconds-long `after:`s, generous deadlines), what they say lands in the
//! store's outbox, keyed once, and the sender delivers it to a fake Twilio
//! REST API (`fake_twilio.rs`), whose status callbacks come back to
//! `/twilio/status`. Across a SIGKILL, a timer that came due while the
//! server was down fires once after the restart, and Twilio receives its
//! message once. Without outbound credentials, a flow set that sends on its
//! own is refused, at startup and on reload.

use std::time::{Duration, Instant};

use smsflow::config::Config;
use smsflow::store::{OutboxEntry, OutboxState, SledStore, Store, StoreConfig};

use crate::fake_twilio::{FakeTwilio, ACCOUNT_SID, API_KEY_SECRET, API_KEY_SID};
use crate::helpers::*;
use crate::outbound::sending_config;
use crate::process::spawn_server_env;

/// A server with `files` as its flows, sending through `fake`.
async fn spawn_sending(
    fake: &FakeTwilio,
    files: &[(&str, &str)],
    edit: impl FnOnce(&mut Config),
) -> TestApp {
    let tmp = tempfile::tempdir().expect("tempdir");
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).expect("flows dir");
    for (name, text) in files {
        std::fs::write(flows.join(name), text).expect("write flow");
    }
    let mut config = sending_config(fake, &flows, &tmp.path().join("data"));
    edit(&mut config);
    let mut app = spawn_with(config).await;
    app.public_url = format!("http://{}", app.addr);
    app.owning(tmp)
}

const NUDGE: &str = r#"
name: nudge
trigger: { keywords: [GO] }
steps:
  ask:
    say: "Reply YES."
    wait:
      - yes: true
        say: "Thanks."
    timeout:
      - after: 1s
        say: "Still there?"
      - after: 2s
        say: "Bye."
        goto: gone
  gone:
    set: { contact.status: "gone" }
    end: true
"#;

/// Poll `f` every 50 ms until it returns `Some`, for at most `limit`.
async fn eventually<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let started = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if started.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn to(entries: &[OutboxEntry], number: &str) -> Vec<OutboxEntry> {
    let mut out: Vec<OutboxEntry> = entries.iter().filter(|e| e.to == number).cloned().collect();
    out.sort_by_key(|e| (e.due_at, e.key.clone()));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_are_sent_through_twilio_and_a_reply_cancels_them() {
    let fake = FakeTwilio::start(TOKEN).await;
    fake.callbacks(&["sent", "delivered"]);
    let app = spawn_sending(&fake, &[("nudge.yaml", NUDGE)], |_| {}).await;
    let (silent, answers) = ("+15557300001", "+15557300002");
    assert_eq!(
        bodies(&app.send_sms(silent, "go").await.body),
        ["Reply YES."]
    );
    assert_eq!(
        bodies(&app.send_sms(answers, "go").await.body),
        ["Reply YES."]
    );
    assert_eq!(app.store.pending_timers(), 2);
    // Answered before the first timeout: it never fires.
    assert_eq!(
        bodies(&app.send_sms(answers, "yes").await.body),
        ["Thanks."]
    );

    let store = app.store.clone();
    let sent = eventually(Duration::from_secs(20), || {
        let all = store.outbox().unwrap();
        let mine = to(&all, silent);
        (mine.len() == 2).then_some(mine)
    })
    .await
    .expect("both timeouts fired within 20 s");
    let said: Vec<&str> = sent.iter().map(|e| e.body.as_str()).collect();
    assert_eq!(said, ["Still there?", "Bye."]);
    for (e, after) in sent.iter().zip(["1", "2"]) {
        assert_eq!(e.from, OUR_NUMBER);
        assert_eq!(e.cause, "timeout");
        assert_eq!(e.flow.as_deref(), Some("nudge"));
        assert_eq!(e.step.as_deref(), Some("ask"));
        assert!(e.created_at >= e.due_at, "{e:?}");
        assert!(
            e.key
                .starts_with(&format!("timeout:{OUR_NUMBER}:{silent}:nudge:ask:{after}:")),
            "{}",
            e.key
        );
    }
    assert_eq!(sent[1].due_at - sent[0].due_at, 1);
    // The give-up moved the conversation on and no timer is left.
    assert!(
        eventually(Duration::from_secs(5), || (store.pending_timers() == 0)
            .then_some(()))
        .await
        .is_some()
    );
    // Twilio received each reminder once, from our number, with a status
    // callback that comes back to us; both end delivered in /messages.
    let received = eventually(Duration::from_secs(20), || {
        let r = fake.requests_to(silent);
        (r.len() == 2).then_some(r)
    })
    .await
    .expect("both reminders reached Twilio");
    let bodies_sent: Vec<_> = received.iter().map(|r| r.param("Body").unwrap()).collect();
    assert_eq!(bodies_sent, ["Still there?", "Bye."]);
    for r in &received {
        assert_eq!(r.answered, 201);
        assert_eq!(r.param("From"), Some(OUR_NUMBER));
        assert!(r
            .param("StatusCallback")
            .unwrap()
            .starts_with(&format!("{}/twilio/status", app.public_url)));
    }
    let mut delivered = 0;
    let started = Instant::now();
    while delivered < 2 {
        let rows = app.admin_json("/messages?number=%2B15557300001").await;
        delivered = rows["messages"]
            .as_array()
            .or(rows.as_array())
            .unwrap_or_else(|| panic!("{rows}"))
            .iter()
            .filter(|r| r["status"] == "delivered" && r["flow"] == "nudge")
            .count();
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "not delivered in /messages: {rows}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for e in to(&store.outbox().unwrap(), silent) {
        assert!(matches!(e.state, OutboxState::Sent { .. }), "{e:?}");
    }
    // Well past both timeouts of the one who answered: nothing for them.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(to(&store.outbox().unwrap(), answers).is_empty());
    assert!(fake.requests_to(answers).is_empty());
    let m = app.raw(app.client.get(app.url("/metrics"))).await.body;
    assert!(m.contains("smsflow_timers_pending 0\n"), "{m}");
    assert!(m.contains("smsflow_timers_fired_total 2\n"), "{m}");
    // The next message starts afresh: the run ended at `gone`.
    assert_eq!(
        bodies(&app.send_sms(silent, "go").await.body),
        ["Reply YES."]
    );
    app.stop().await;
}

/// Hot reload: a pending timer whose timeout no longer exists is dropped
/// when it comes due (counted), and nothing is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_whose_timeout_was_edited_away_is_dropped_after_a_reload() {
    let flow = NUDGE
        .replace("after: 2s", "after: 7s")
        .replace("after: 1s", "after: 6s");
    let fake = FakeTwilio::start(TOKEN).await;
    let app = spawn_sending(&fake, &[("nudge.yaml", &flow)], |c| c.watch = true).await;
    assert_eq!(
        bodies(&app.send_sms("+15557300003", "go").await.body),
        ["Reply YES."]
    );
    // The step loses its timeouts (and says so) before the first is due.
    let edited = flow
        .split("    timeout:")
        .next()
        .unwrap()
        .replace("Reply YES.", "Reply YES!");
    std::fs::write(app.flows_dir.join("nudge.yaml"), edited).unwrap();
    let started = Instant::now();
    while bodies(&app.send_sms("+15557300099", "go").await.body) != ["Reply YES!"] {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the edit was not reloaded in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let store = app.store.clone();
    let metrics = || app.raw(app.client.get(app.url("/metrics")));
    let started = Instant::now();
    loop {
        let m = metrics().await.body;
        if m.contains("smsflow_timers_stale_total 1\n") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "not dropped: {m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(store.outbox().unwrap().is_empty());
    assert!(fake.requests().is_empty());
    assert_eq!(store.pending_timers(), 0);
    app.stop().await;
}

/// A timer pending when the server is killed comes due while it is down;
/// the restarted server fires it once and sends it. A second SIGKILL right
/// after Twilio received the message (before or after the server recorded
/// Twilio's answer) and a third start do not fire or send it again: one
/// outbox entry, one request to Twilio.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_pending_across_sigkill_fires_once_after_restart() {
    const SEND_LIMIT_MS: u64 = 500;
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    let data = tmp.path().join("data");
    std::fs::create_dir(&flows).unwrap();
    let flow = "name: remind\ntrigger: { keywords: [GO] }\nsteps:\n  ask:\n    say: \"Reply YES.\"\n    wait: [ { yes: true } ]\n    timeout: { after: 2s, say: \"Reminder: reply YES.\" }\n";
    std::fs::write(flows.join("remind.yaml"), flow).unwrap();
    let from = "+15557300004";
    let fake = FakeTwilio::start(TOKEN).await;
    let config = tmp.path().join("smsflow.toml");
    // A short send limit: a send left `Sending` by the kill is recovered
    // (as `Unknown`) by a start more than the limit plus 2 s later.
    std::fs::write(
        &config,
        format!(
            "twilio_api_base = \"{}\"\nsend_timeout_ms = {SEND_LIMIT_MS}\n",
            fake.base()
        ),
    )
    .unwrap();
    let args = ["--no-watch", "--config", config.to_str().unwrap()];
    let env = [
        ("TWILIO_ACCOUNT_SID", ACCOUNT_SID),
        ("TWILIO_API_KEY_SID", API_KEY_SID),
        ("TWILIO_API_KEY_SECRET", API_KEY_SECRET),
    ];
    let spawn = || spawn_server_env(&flows, &data, &args, &env);

    let first = spawn();
    let answer = first.send(from, "go", &new_sid()).await.unwrap();
    assert_eq!(bodies(&answer), ["Reply YES."]);
    first.signal("KILL");
    drop(first);
    // Due while nobody runs.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let metrics = |server: &crate::process::ChildServer| {
        let url = format!("http://{}/metrics", server.addr);
        let client = server.client.clone();
        async move { client.get(url).send().await.unwrap().text().await.unwrap() }
    };
    let second = spawn();
    let started = Instant::now();
    loop {
        let m = metrics(&second).await;
        if m.contains("smsflow_timers_fired_total 1\n") && m.contains("smsflow_timers_pending 0\n")
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never fired: {m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Killed the moment Twilio has the message: its answer may or may not
    // have been recorded.
    let started = Instant::now();
    while fake.requests_to(from).is_empty() {
        assert!(started.elapsed() < Duration::from_secs(20), "never sent");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    second.signal("KILL");
    drop(second);
    // A send still `Sending` is left alone until it is past the limit
    // (another instance on a shared database may be sending it): the
    // third start comes after that, so it finds the send `Sent` or makes
    // it `Unknown`, never sends it again.
    tokio::time::sleep(Duration::from_millis(SEND_LIMIT_MS + 2500)).await;

    let mut third = spawn();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let m = metrics(&third).await;
    assert!(m.contains("smsflow_timers_fired_total 0\n"), "{m}");
    third.signal("TERM");
    assert!(third.wait_exit(Duration::from_secs(20)).success());
    drop(third);

    let store = SledStore::open(&data, &StoreConfig::default()).unwrap();
    let entries = store.outbox().unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].body, "Reminder: reply YES.");
    assert_eq!(entries[0].to, from);
    // Sent, or (killed before Twilio's answer was recorded) unknown: never
    // sent a second time.
    assert!(
        matches!(
            entries[0].state,
            OutboxState::Sent { .. } | OutboxState::Unknown { .. }
        ),
        "{:?}",
        entries[0].state
    );
    assert_eq!(store.pending_timers(), 0);
    let received = fake.requests_to(from);
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0].param("Body"), Some("Reminder: reply YES."));
}

/// Without outbound credentials a flow set whose timeouts say something is
/// refused: `serve` does not start, naming the flow and what is missing,
/// and a running server refuses a reload that adds one (it keeps serving
/// the set it has).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_credentials_a_set_that_sends_on_its_own_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(flows.join("nudge.yaml"), NUDGE).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smsflow"))
        .args(["serve", "--listen", "127.0.0.1:0", "--flows"])
        .arg(&flows)
        .arg("--data")
        .arg(tmp.path().join("data"))
        .env("TWILIO_AUTH_TOKEN", TOKEN)
        .env_remove("TWILIO_ACCOUNT_SID")
        .env_remove("TWILIO_API_KEY_SID")
        .env_remove("TWILIO_API_KEY_SECRET")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("flow `nudge` sends messages on its own")
            && err.contains("TWILIO_ACCOUNT_SID"),
        "{err}"
    );

    // Running without credentials, a reload that adds a reminder is
    // refused and the set without it stays live.
    let plain = NUDGE.split("    timeout:").next().unwrap().to_owned();
    std::fs::write(flows.join("nudge.yaml"), &plain).unwrap();
    let config = Config::for_test(&flows, &tmp.path().join("data"), TOKEN);
    let app = smsflow::app::App::build(config).await.unwrap();
    let live = app.reloader().status().version;
    std::fs::write(flows.join("nudge.yaml"), NUDGE).unwrap();
    match app.reloader().reload_now() {
        smsflow::reload::ReloadOutcome::Refused { errors } => assert!(
            errors.contains("flow `nudge` sends messages on its own"),
            "{errors}"
        ),
        other => panic!("not refused: {other:?}"),
    }
    assert_eq!(app.reloader().status().version, live);
}
