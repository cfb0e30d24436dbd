//! Conversations over HTTP: concurrent messages from one sender, restarts.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::helpers::*;

fn shipped(name: &str) -> String {
    std::fs::read_to_string(format!("{}/flows/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn shipped_flows() -> Vec<(&'static str, String)> {
    [
        "keywords.yaml",
        "signup.yaml",
        "survey.yaml",
        "appointment.yaml",
    ]
    .into_iter()
    .map(|n| (n, shipped(n)))
    .collect()
}

async fn spawn_shipped() -> TestApp {
    let files = shipped_flows();
    let refs: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
    spawn_app(&refs).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_simultaneous_messages_from_one_sender_stay_consistent() {
    let app = Arc::new(spawn_shipped().await);
    let me = "+15557650000";
    let r = app.send_sms(me, "JOIN").await;
    assert_eq!(bodies(&r.body), vec!["Hi! What's your name?"]);

    let mut tasks = Vec::new();
    for i in 0..50 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            // Letters only: a digit would be read as an age.
            let name: String = [b'a' + (i / 26) as u8, b'a' + (i % 26) as u8]
                .iter()
                .map(|b| *b as char)
                .collect();
            let r = app.send_sms(me, &format!("name{name}")).await;
            assert_eq!(r.status, 200);
            bodies(&r.body).join(" | ")
        }));
    }
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut thanks = 0;
    for t in tasks {
        let reply = t.await.unwrap();
        if reply.starts_with("Thanks name") {
            thanks += 1;
            *counts.entry("thanks".into()).or_default() += 1;
        } else {
            *counts.entry(reply).or_default() += 1;
        }
    }
    // Whatever the order, processed one at a time the conversation goes:
    // one name accepted, two retries, one give-up, then 46 new messages.
    assert_eq!(thanks, 1, "{counts:#?}");
    assert_eq!(
        counts.get("Please send your age as a number, like 34."),
        Some(&2),
        "{counts:#?}"
    );
    let gave_up = counts
        .keys()
        .filter(|k| k.starts_with("No problem, we'll skip that. | You're signed up, name"))
        .count();
    assert_eq!(gave_up, 1, "{counts:#?}");
    assert_eq!(
        counts.get("Sorry, I didn't understand. Text HOURS, ADDRESS or MENU."),
        Some(&46),
        "{counts:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn different_senders_are_independent() {
    let app = Arc::new(spawn_shipped().await);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let me = format!("+1555800{i:04}");
            let a = bodies(&app.send_sms(&me, "join").await.body);
            let b = bodies(&app.send_sms(&me, &format!("P{i}")).await.body);
            let c = bodies(&app.send_sms(&me, "30").await.body);
            (i, a, b, c)
        }));
    }
    for t in tasks {
        let (i, a, b, c) = t.await.unwrap();
        assert_eq!(a, vec!["Hi! What's your name?"]);
        assert_eq!(b, vec![format!("Thanks P{i}! How old are you?")]);
        assert_eq!(c, vec![format!("You're signed up, P{i}.")]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn conversation_survives_a_restart() {
    let app = spawn_shipped().await;
    let me = "+15557651111";
    assert_eq!(
        bodies(&app.send_sms(me, "join").await.body),
        vec!["Hi! What's your name?"]
    );
    assert_eq!(
        bodies(&app.send_sms(me, "Dee").await.body),
        vec!["Thanks Dee! How old are you?"]
    );
    let (flows, data) = (app.flows_dir.clone(), app.data_dir.clone());
    let tmp = app.stop().await;
    let app = spawn_with(smsflow::config::Config::for_test(&flows, &data, TOKEN))
        .await
        .owning(tmp);
    assert_eq!(
        bodies(&app.send_sms(me, "51").await.body),
        vec!["You're signed up, Dee."]
    );
    // The contact field persists too.
    assert_eq!(
        bodies(&app.send_sms(me, "hi").await.body),
        vec!["Hi Dee! Text HOURS, ADDRESS, MENU, JOIN, SURVEY, CONFIRM, QUIZ or ORDER."]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_does_not_advance_the_conversation() {
    let app = spawn_shipped().await;
    let me = "+15557652222";
    app.send_sms(me, "join").await;
    let sid = new_sid();
    let first = app.send_sms_sid(me, "Eve", &sid).await;
    let retry = app.send_sms_sid(me, "Eve", &sid).await;
    assert_eq!(first.body, retry.body);
    // Still waiting for the age: the retry did not count as an answer.
    assert_eq!(
        bodies(&app.send_sms(me, "40").await.body),
        vec!["You're signed up, Eve."]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn each_of_our_numbers_holds_its_own_conversation() {
    let app = spawn_shipped().await;
    let me = "+15557653333";
    app.send_sms(me, "join").await;
    // Same sender texting another of our numbers starts fresh there.
    let mut params = sms_params(me, "Zed", &new_sid());
    for (k, v) in params.iter_mut() {
        if k == "To" {
            *v = "+15550002222".into();
        }
    }
    let r = app.post_signed("/twilio/sms", &params).await;
    assert_eq!(
        bodies(&r.body),
        vec!["Sorry, I didn't understand. Text HOURS, ADDRESS or MENU."]
    );
    assert_eq!(
        bodies(&app.send_sms(me, "Zed").await.body),
        vec!["Thanks Zed! How old are you?"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_message_bodies_go_through() {
    let app = spawn_shipped().await;
    let emoji = "😀".repeat(1600);
    let r = app.send_sms("+15557654444", &emoji).await;
    assert_eq!(r.status, 200);
    let controls: String = (0u8..32).map(|b| b as char).cycle().take(1600).collect();
    let r = app.send_sms("+15557654444", &controls).await;
    assert_eq!(r.status, 200);
    // The default reply does not echo the body, so it is the same reply.
    assert_eq!(
        bodies(&r.body),
        vec!["Sorry, I didn't understand. Text HOURS, ADDRESS or MENU."]
    );
}
