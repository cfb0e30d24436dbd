//! A broadcast to 10,000 imported contacts through the real binary and
//! the fake Twilio, paced, with the server SIGKILLed midway and started
//! again on the same data: nobody gets a second copy, nobody is left out
//! (beyond the few sends the kill caught in flight, which are reported as
//! `unknown`, never sent twice), opted-out contacts get nothing, and a
//! broadcast from a number in its quiet hours waits.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::fake_twilio::{FakeTwilio, ACCOUNT_SID, API_KEY_SECRET, API_KEY_SID};
use crate::helpers::*;
use crate::process::{spawn_server_env, ChildServer};

const CONTACTS: usize = 10_000;
/// Contacts that text STOP before the broadcast.
const STOPPED: usize = 25;
/// Sends the sender has in flight at most (`IN_FLIGHT` in the sender):
/// what a SIGKILL can catch between "marked sending" and "answer
/// recorded".
const IN_FLIGHT: u64 = 8;
/// Our second number, in quiet hours for the whole test.
const QUIET_NUMBER: &str = "+15550002222";

fn contact(i: usize) -> String {
    format!("+1555{:07}", 3_000_000 + i)
}

fn start(flows: &std::path::Path, data: &std::path::Path, config: &std::path::Path) -> ChildServer {
    let mut server = spawn_server_env(
        flows,
        data,
        &["--config", config.to_str().unwrap(), "--no-watch"],
        &[
            ("SMSFLOW_ADMIN_TOKEN", ADMIN_TOKEN),
            ("TWILIO_ACCOUNT_SID", ACCOUNT_SID),
            ("TWILIO_API_KEY_SID", API_KEY_SID),
            ("TWILIO_API_KEY_SECRET", API_KEY_SECRET),
            ("RUST_LOG", "warn,smsflow=info,smsflow::outbound=warn"),
        ],
    );
    // A liveness bound, not a performance assertion.
    server.client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    server
}

pub(crate) async fn admin(
    server: &ChildServer,
    method: reqwest::Method,
    path: &str,
    content_type: &str,
    body: String,
) -> (u16, serde_json::Value) {
    let r = server
        .client
        .request(method, format!("http://{}{path}", server.addr))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("admin request");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (status, json)
}

async fn progress(server: &ChildServer, id: &str) -> serde_json::Value {
    let (code, all) = admin(
        server,
        reqwest::Method::GET,
        "/broadcasts",
        "application/json",
        String::new(),
    )
    .await;
    assert_eq!(code, 200, "{all}");
    all["broadcasts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("no {id} in {all}"))
}

/// Messages the fake received, by recipient.
fn received(fake: &FakeTwilio, from: &str) -> HashMap<String, usize> {
    let mut by_to = HashMap::new();
    for r in fake.requests() {
        if r.param("From") == Some(from) {
            *by_to
                .entry(r.param("To").unwrap_or("").to_owned())
                .or_insert(0) += 1;
        }
    }
    by_to
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ten_thousand_contact_broadcast_survives_sigkill_without_duplicates() {
    let fake = FakeTwilio::start(TOKEN).await;
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(flows.join("keywords.yaml"), "keywords:\n  HOURS: \"9-5\"\n").unwrap();
    let data = tmp.path().join("data");
    // Quiet hours of the second number cover the whole test: from an
    // hour ago to two hours on (UTC).
    let hour = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 3600)
        % 24;
    let config = tmp.path().join("smsflow.toml");
    std::fs::write(
        &config,
        format!(
            "twilio_api_base = \"{}\"\nsend_interval_ms = 1\nsend_timeout_ms = 5000\n\n\
             [[quiet_hours]]\nnumber = \"{QUIET_NUMBER}\"\nstart = \"{:02}:00\"\nend = \"{:02}:00\"\n\
             time_zone = \"UTC\"\n",
            fake.base(),
            (hour + 23) % 24,
            (hour + 2) % 24,
        ),
    )
    .unwrap();

    let server = start(&flows, &data, &config);
    let mut csv = String::from("phone,list\n");
    for i in 0..CONTACTS {
        csv.push_str(&format!("{},members\n", contact(i)));
    }
    // The CLI sends a file bigger than one request in parts.
    let file = tmp.path().join("members.csv");
    std::fs::write(&file, csv).unwrap();
    let addr = format!("http://{}", server.addr);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_smsflow"))
            .args(["contacts", "import"])
            .arg(&file)
            .args(["--from", OUR_NUMBER])
            .env("SMSFLOW_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("SMSFLOW_SERVER", addr)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains(&format!("{CONTACTS} new")),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stopped: Vec<String> = (0..STOPPED).map(|k| contact(k * 397 + 11)).collect();
    for who in &stopped {
        server.send(who, "STOP", &new_sid()).await.unwrap();
    }
    let body = serde_json::json!({
        "id": "members", "from": OUR_NUMBER, "message": "The gym opens at 6 tomorrow.",
        "where": { "field": "list", "equals": "members" },
    });
    let started = Instant::now();
    let (code, sent) = admin(
        &server,
        reqwest::Method::POST,
        "/broadcasts",
        "application/json",
        body.to_string(),
    )
    .await;
    assert_eq!(code, 200, "{sent}");
    assert_eq!(sent["enqueued"], CONTACTS, "{sent}");
    let quiet_list: Vec<String> = (0..5).map(contact).collect();
    let quiet = serde_json::json!({
        "id": "quiet", "from": QUIET_NUMBER, "message": "Not at night.", "to": quiet_list,
    });
    let (code, r) = admin(
        &server,
        reqwest::Method::POST,
        "/broadcasts",
        "application/json",
        quiet.to_string(),
    )
    .await;
    assert_eq!(code, 200, "{r}");

    // Kill it once about a third has gone out.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = fake.requests().len();
        if n >= CONTACTS / 3 {
            break;
        }
        assert!(Instant::now() < deadline, "only {n} sent before the kill");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed_after = started.elapsed();
    server.signal("KILL");
    let mut server = server;
    assert!(!server.wait_exit(Duration::from_secs(10)).success());
    let at_kill = fake.requests().len();
    drop(server);

    let server = start(&flows, &data, &config);
    let p = loop {
        let p = progress(&server, "members").await;
        if p["remaining"] == 0 {
            break p;
        }
        assert!(Instant::now() < deadline, "{p}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let took = started.elapsed();

    let by_to = received(&fake, OUR_NUMBER);
    let twice: Vec<_> = by_to.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "second copies: {twice:?}");
    for who in &stopped {
        assert!(!by_to.contains_key(who), "{who} opted out but got it");
    }
    let missing: Vec<String> = (0..CONTACTS)
        .map(contact)
        .filter(|c| !stopped.contains(c) && !by_to.contains_key(c))
        .collect();
    let as_u64 = |k: &str| p[k].as_u64().unwrap_or_else(|| panic!("{k} in {p}"));
    let (sent, skipped, failed, unknown) = (
        as_u64("sent"),
        as_u64("skipped"),
        as_u64("failed"),
        as_u64("unknown"),
    );
    assert_eq!(as_u64("total"), CONTACTS as u64, "{p}");
    assert_eq!((skipped, failed), (STOPPED as u64, 0), "{p}");
    assert_eq!(sent + unknown, (CONTACTS - STOPPED) as u64, "{p}");
    // A send the kill caught between "sending" (durable) and its answer
    // is `unknown`, never sent again: at most those few are missing.
    assert!(unknown <= IN_FLIGHT, "{p}");
    assert!(missing.len() as u64 <= unknown, "{missing:?} missing; {p}");
    assert_eq!(
        by_to.values().sum::<usize>() as u64,
        sent + unknown - missing.len() as u64
    );

    // The quiet number's broadcast waits for the end of its quiet hours:
    // deferred, not skipped, nothing sent, across the restart too.
    let q = progress(&server, "quiet").await;
    assert_eq!(
        (&q["total"], &q["remaining"]),
        (&5.into(), &5.into()),
        "{q}"
    );
    assert!(received(&fake, QUIET_NUMBER).is_empty());
    // CPU the restarted server used (user + system, in clock ticks).
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", server.child.id())).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    eprintln!(
        "{CONTACTS} contacts: {at_kill} requests before the kill ({:?}), all done {took:?} after \
         the broadcast was sent ({:.0}/s overall, pace 1000/s); the second server used {:.1} s \
         of CPU for {} sends; {unknown} unknown, {} missing",
        killed_after,
        CONTACTS as f64 / took.as_secs_f64(),
        ticks as f64 / 100.0,
        CONTACTS - at_kill,
        missing.len()
    );
}
