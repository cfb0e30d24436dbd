//! Timeouts through the front door: signed webhooks start a waiting step,
//! the running server's scheduler fires its `timeout:`s on the real clock
//! (seconds-long `after:`s, generous deadlines), and what they say lands in
//! the store's outbox, keyed once, for the sender to deliver. Across a
//! SIGKILL, a timer that came due while the server was down fires once
//! after the restart.

use std::time::{Duration, Instant};

use smsflow::store::{OutboxEntry, OutboxState, SledStore, Store, StoreConfig};

use crate::helpers::*;
use crate::process::spawn_server;

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
async fn timeouts_fire_into_the_outbox_and_a_reply_cancels_them() {
    let app = spawn_app(&[("nudge.yaml", NUDGE)]).await;
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
        assert_eq!(
            e.state,
            OutboxState::Pending {
                not_before: e.due_at,
                attempts: 0
            }
        );
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
    // Well past both timeouts of the one who answered: nothing for them.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(to(&store.outbox().unwrap(), answers).is_empty());
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
    let app = spawn_configured(&[("nudge.yaml", &flow)], |c| c.watch = true).await;
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
    assert_eq!(store.pending_timers(), 0);
    app.stop().await;
}

/// A timer pending when the server is killed comes due while it is down;
/// the restarted server fires it once. A second SIGKILL after that and a
/// third start do not fire it again: one outbox entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_pending_across_sigkill_fires_once_after_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    let data = tmp.path().join("data");
    std::fs::create_dir(&flows).unwrap();
    let flow = "name: remind\ntrigger: { keywords: [GO] }\nsteps:\n  ask:\n    say: \"Reply YES.\"\n    wait: [ { yes: true } ]\n    timeout: { after: 2s, say: \"Reminder: reply YES.\" }\n";
    std::fs::write(flows.join("remind.yaml"), flow).unwrap();
    let from = "+15557300004";

    let first = spawn_server(&flows, &data, &["--no-watch"]);
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
    let second = spawn_server(&flows, &data, &["--no-watch"]);
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
    second.signal("KILL");
    drop(second);

    let mut third = spawn_server(&flows, &data, &["--no-watch"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
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
    assert_eq!(store.pending_timers(), 0);
}
