//! The server on PostgreSQL (`--store postgres://…`): a conversation
//! through signed webhooks, the database going away and coming back, and
//! two instances sharing one database. Each test has a schema of its own
//! (`pg.rs`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smsflow::store::{AnyStore, PgConfig, Store};

use crate::helpers::*;
use crate::pg::test_db;
use crate::process::spawn_server;

fn signup() -> String {
    std::fs::read_to_string(format!("{}/flows/signup.yaml", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_runs_on_postgres_and_survives_a_restart() {
    let Some(db) = test_db() else { return };
    let flows = signup();
    let url = db.url.clone();
    let app = spawn_configured(&[("signup.yaml", &flows)], |c| c.store = Some(url.into())).await;
    assert!(matches!(*app.store, AnyStore::Pg(_)));
    let me = "+15557000001";
    let r = app.send_sms(me, "JOIN").await;
    assert_eq!(bodies(&r.body), ["Hi! What's your name?"]);
    let sid = new_sid();
    let r = app.send_sms_sid(me, "Ada", &sid).await;
    assert_eq!(bodies(&r.body), ["Thanks Ada! How old are you?"]);
    // Twilio retries: the identical TwiML, and the flow does not advance.
    let again = app.send_sms_sid(me, "Ada", &sid).await;
    assert_eq!(again.body, r.body);
    let status = app.admin_json("/status").await;
    assert_eq!(status["store"]["backend"], "postgres");
    assert_eq!(status["store"]["writable"], true);
    let ready = app.raw(app.client.get(app.url("/readyz"))).await;
    assert_eq!(ready.status, 200);
    app.stop().await;

    // Another server on the same database (and a new data directory)
    // carries on where the first one stopped.
    let url = db.url.clone();
    let app = spawn_configured(&[("signup.yaml", &flows)], |c| c.store = Some(url.into())).await;
    let r = app.send_sms(me, "34").await;
    assert_eq!(bodies(&r.body), ["You're signed up, Ada."]);
    let again = app.send_sms_sid(me, "Ada", &sid).await;
    assert_eq!(
        bodies(&again.body),
        ["Thanks Ada! How old are you?"],
        "a retry after the restart still replays"
    );
    let log = app.store.inbound_log().unwrap();
    assert_eq!(log.len(), 3, "each MessageSid logged once: {log:?}");
    app.stop().await;
}

/// A TCP proxy in front of the database that the test can cut: while
/// down it drops every connection and refuses new ones.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (flag, list) = (up.clone(), conns.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if !flag.load(Ordering::SeqCst) {
                    continue;
                }
                let upstream = upstream.clone();
                list.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                }));
            }
        });
        Proxy { addr, up, conns }
    }

    fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// `url` with its `host:port` replaced by `addr`.
fn through(url: &str, addr: SocketAddr) -> (String, String) {
    let start = url.find('@').expect("user@host in the test URL") + 1;
    let end = start + url[start..].find('/').expect("/database in the test URL");
    let upstream = url[start..end].to_string();
    (format!("{}{addr}{}", &url[..start], &url[end..]), upstream)
}

async fn wait_ready(app: &TestApp, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = app.raw(app.client.get(app.url("/readyz"))).await;
        if r.status == want {
            return;
        }
        assert!(Instant::now() < deadline, "/readyz stayed {}", r.status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_503_until_it_is_back_without_a_restart() {
    let Some(db) = test_db() else { return };
    let (_, upstream) = through(&db.url, "127.0.0.1:1".parse().unwrap());
    let proxy = Proxy::start(upstream).await;
    let (url, _) = through(&db.url, proxy.addr);
    let flows = signup();
    let app = spawn_configured(&[("signup.yaml", &flows)], |c| c.store = Some(url.into())).await;
    let me = "+15557000002";
    let r = app.send_sms(me, "JOIN").await;
    assert_eq!(bodies(&r.body), ["Hi! What's your name?"]);

    proxy.down();
    let r = app.send_sms(me, "Grace").await;
    assert_eq!(
        r.status, 503,
        "nothing is acknowledged that was not committed"
    );
    wait_ready(&app, 503).await;

    proxy.up();
    wait_ready(&app, 200).await;
    let r = app.send_sms(me, "Grace").await;
    assert_eq!(bodies(&r.body), ["Thanks Grace! How old are you?"]);
    app.stop().await;
}

const COUNTER_YAML: &str =
    "trigger: {keywords: [COUNT]}\nscript: counter.rhai\nfallback: \"Sorry!\"\n";
/// Replies with how many messages the run has had, then the message: a
/// lost update (two instances reading the same state) repeats a number.
const COUNTER_RHAI: &str = "fn on_message(msg, state) {\n  if state.n == () { state.n = 0; }\n  state.n += 1;\n  `${state.n} ${msg.body}`\n}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_database_serialise_each_conversation() {
    let Some(db) = test_db() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(flows.join("counter.yaml"), COUNTER_YAML).unwrap();
    std::fs::write(flows.join("counter.rhai"), COUNTER_RHAI).unwrap();
    let args = ["--store", db.url.as_str()];
    let a = Arc::new(spawn_server(&flows, &tmp.path().join("a"), &args));
    let b = Arc::new(spawn_server(&flows, &tmp.path().join("b"), &args));
    let servers = [a.clone(), b.clone()];
    let me = "+15557000003";

    // Alternated one at a time: strict order across the instances; each
    // one retried on the other instance (as Twilio retries after a
    // timeout) gets the identical TwiML and changes nothing.
    for i in 1..=10 {
        let body = if i == 1 {
            "COUNT".to_string()
        } else {
            format!("m{i}")
        };
        let sid = new_sid();
        let twiml = servers[i % 2].send(me, &body, &sid).await.unwrap();
        assert_eq!(bodies(&twiml), [format!("{i} {body}")]);
        let retried = servers[(i + 1) % 2].send(me, &body, &sid).await.unwrap();
        assert_eq!(retried, twiml);
    }

    // Concurrently, half to each: every message sees the one before it
    // (no number twice), whichever instance it reached.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let server = servers[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            let twiml = server.send(me, &format!("c{i}"), &new_sid()).await.unwrap();
            let reply = bodies(&twiml).join("");
            reply.split(' ').next().unwrap().parse::<u32>().unwrap()
        }));
    }
    let mut counts = Vec::new();
    for t in tasks {
        counts.push(t.await.unwrap());
    }
    counts.sort_unstable();
    assert_eq!(counts, (11..=30).collect::<Vec<u32>>());

    // Each MessageSid was processed once.
    let store = AnyStore::open_pg(&db.url, &PgConfig::default()).unwrap();
    let log = store.inbound_log().unwrap();
    let mut logged: Vec<&str> = log.iter().map(|(sid, _)| sid.as_str()).collect();
    logged.sort_unstable();
    logged.dedup();
    assert_eq!((log.len(), logged.len()), (30, 30));
}

/// `smsflow migrate`, twice at once on a fresh database (as two
/// instances starting together would), then again: each migration is
/// applied exactly once.
#[test]
fn migrate_applies_each_migration_once_even_when_run_together() {
    let Some(db) = test_db() else { return };
    let bin = env!("CARGO_BIN_EXE_smsflow");
    let run = || {
        std::process::Command::new(bin)
            .args(["migrate", "--store", &db.url])
            .output()
            .unwrap()
    };
    let (first, second) = std::thread::scope(|s| {
        let a = s.spawn(run);
        let b = s.spawn(run);
        (a.join().unwrap(), b.join().unwrap())
    });
    let mut said: Vec<String> = [&first, &second]
        .iter()
        .map(|o| {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            String::from_utf8_lossy(&o.stdout).trim().to_string()
        })
        .collect();
    said.sort();
    assert_eq!(
        said,
        [
            "applied 0001, 0002; schema at version 2",
            "schema at version 2: nothing to apply"
        ]
    );
    let again = run();
    assert_eq!(
        String::from_utf8_lossy(&again.stdout).trim(),
        "schema at version 2: nothing to apply"
    );

    let bad = std::process::Command::new(bin)
        .args(["migrate", "--store", "/var/lib/smsflow"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("PostgreSQL URL"));
}

/// `smsflow store copy` moves a sled store into PostgreSQL: a server on
/// the database carries on the conversations, replays recorded answers,
/// keeps consent and its audit, the message log and the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_copy_moves_a_sled_store_to_postgres() {
    let Some(db) = test_db() else { return };
    let flows = signup();
    let app = spawn_app(&[("signup.yaml", &flows)]).await;
    let (ada, bob) = ("+15557000011", "+15557000012");
    app.send_sms(ada, "JOIN").await;
    let sid = new_sid();
    let asked = app.send_sms_sid(ada, "Ada", &sid).await;
    assert_eq!(bodies(&asked.body), ["Thanks Ada! How old are you?"]);
    assert_eq!(app.send_sms(bob, "STOP").await.status, 200);
    let entry = smsflow::store::OutboxEntry {
        key: "sent-one".into(),
        to: ada.into(),
        from: OUR_NUMBER.into(),
        messaging_service_sid: None,
        body: "Reminder".into(),
        media: Vec::new(),
        cause: "timeout".into(),
        flow: None,
        step: None,
        created_at: 1,
        due_at: 1,
        state: smsflow::store::OutboxState::Sent {
            sid: "SMsent".into(),
            at: 2,
        },
    };
    let broadcast = smsflow::store::OutboxEntry {
        key: format!("broadcast:b9:{bob}"),
        to: bob.into(),
        ..entry.clone()
    };
    app.store
        .enqueue_outbound(&[entry.clone(), broadcast])
        .unwrap();
    // A flow result (written with its conversation change, as a step
    // that ends a run writes it).
    let result = smsflow::store::RunResult {
        flow: "survey".into(),
        to: OUR_NUMBER.into(),
        contact: bob.into(),
        started_at: 10,
        ended_at: 20,
        ended: "completed".into(),
        path: vec!["ask".into()],
        vars: [("answer".to_string(), "yes".to_string())].into(),
        fields: Default::default(),
    };
    let bob_key = smsflow::store::ConvKey::new(OUR_NUMBER, bob);
    let record = app.store.load(&bob_key).unwrap();
    app.store
        .commit_state(smsflow::store::StateCommit {
            key: &bob_key,
            conversation: None,
            ended: true,
            due: None,
            recent: &record.recent,
            at: 20,
            results: std::slice::from_ref(&result),
        })
        .unwrap();
    let data = app.data_dir.clone();
    let _tmp = app.stop().await;

    let copy = |to: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_smsflow"))
            .args(["store", "copy", "--from"])
            .arg(&data)
            .args(["--to", to])
            .output()
            .unwrap()
    };
    let out = copy(&db.url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with("copied 2 conversations, 3 messages,"),
        "{said}"
    );
    // A second copy would mix two stores: refused.
    let again = copy(&db.url);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("copy into an empty one"));

    let url = db.url.clone();
    let app = spawn_configured(&[("signup.yaml", &flows)], |c| c.store = Some(url.into())).await;
    let replay = app.send_sms_sid(ada, "Ada", &sid).await;
    assert_eq!(replay.body, asked.body, "a retry replays the copied answer");
    let r = app.send_sms(ada, "34").await;
    assert_eq!(bodies(&r.body), ["You're signed up, Ada."]);
    assert_eq!(
        bodies(&app.send_sms(bob, "JOIN").await.body),
        Vec::<String>::new()
    );
    let audit = app.store.audit_log().unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].number, bob);
    assert_eq!(app.store.outbound("sent-one").unwrap(), Some(entry));
    assert_eq!(app.store.inbound_log().unwrap().len(), 5);
    assert_eq!(app.store.results("survey", 0).unwrap(), [result]);
    let tallies = app.store.outbox_tallies().unwrap();
    assert_eq!(tallies.len(), 1);
    assert_eq!((tallies[0].0.as_str(), tallies[0].1.sent), ("b9", 1));
    app.stop().await;
}

/// An entry another instance is sending (marked `Sending` moments ago)
/// is left to it: only past the send time limit does an instance take it
/// over as interrupted (`unknown`, never sent again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instances_send_in_flight_is_not_taken_over_before_its_time_limit() {
    use smsflow::store::{OutboxEntry, OutboxState};
    let Some(db) = test_db() else { return };
    let other = AnyStore::open_pg(&db.url, &PgConfig::default()).unwrap();
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let entry = OutboxEntry {
        key: "in-flight".into(),
        to: "+15557000021".into(),
        from: OUR_NUMBER.into(),
        messaging_service_sid: None,
        body: "Reminder".into(),
        media: Vec::new(),
        cause: "timeout".into(),
        flow: None,
        step: None,
        created_at: since,
        due_at: since,
        state: OutboxState::Sending { since, attempts: 1 },
    };
    other.enqueue_outbound(&[entry]).unwrap();
    let url = db.url.clone();
    let app = spawn_configured(&[], |c| {
        c.store = Some(url.into());
        c.outbound.send_timeout = Duration::from_secs(2);
    })
    .await;
    let state = || app.store.outbound("in-flight").unwrap().unwrap().state;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        matches!(state(), OutboxState::Sending { .. }),
        "{:?}",
        state()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(state(), OutboxState::Unknown { .. }) {
        assert!(Instant::now() < deadline, "{:?}", state());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app.stop().await;
}

/// SIGKILL one of two instances in the middle of load: what it
/// acknowledged is in the database, the other instance keeps serving,
/// and a message the killed one never answered, sent again to the other
/// (as a balancer would), is processed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_one_instance_loses_nothing_acknowledged() {
    let Some(db) = test_db() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(flows.join("counter.yaml"), COUNTER_YAML).unwrap();
    std::fs::write(flows.join("counter.rhai"), COUNTER_RHAI).unwrap();
    let args = ["--store", db.url.as_str()];
    let a = Arc::new(spawn_server(&flows, &tmp.path().join("a"), &args));
    let b = Arc::new(spawn_server(&flows, &tmp.path().join("b"), &args));
    const SENDERS: usize = 8;
    const STEPS: usize = 15;
    let killed = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let (a, b, killed) = (a.clone(), b.clone(), killed.clone());
        tasks.push(tokio::spawn(async move {
            let me = format!("+1555710{s:04}");
            let mut replies = Vec::new();
            for i in 1..=STEPS {
                let body = if i == 1 {
                    "COUNT".to_string()
                } else {
                    format!("m{i}")
                };
                let sid = new_sid();
                let first = if i % 2 == 0 && !killed.load(Ordering::SeqCst) {
                    a.send(&me, &body, &sid).await.ok()
                } else {
                    None
                };
                let twiml = match first {
                    Some(t) => t,
                    // A refused or never answered: the balancer sends it
                    // to B, with the same MessageSid.
                    None => b.send(&me, &body, &sid).await.expect("B keeps serving"),
                };
                replies.push(bodies(&twiml).join(""));
            }
            replies
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.signal("KILL");
    killed.store(true, Ordering::SeqCst);
    for t in tasks {
        let replies = t.await.unwrap();
        let want: Vec<String> = (1..=STEPS)
            .map(|i| {
                let body = if i == 1 {
                    "COUNT".to_string()
                } else {
                    format!("m{i}")
                };
                format!("{i} {body}")
            })
            .collect();
        assert_eq!(replies, want, "every step once, in order");
    }
    let store = AnyStore::open_pg(&db.url, &PgConfig::default()).unwrap();
    assert_eq!(store.inbound_log().unwrap().len(), SENDERS * STEPS);
}

/// A request that stops waiting for a conversation's lock (its time
/// limit ran out) leaves no lock behind: once the holder is done, the
/// conversation is free again for every instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_wait_for_a_conversation_lock_leaves_no_lock_behind() {
    let Some(db) = test_db() else { return };
    let app_name = format!("smsflow_locktest_{}", std::process::id());
    let url = format!("{}&application_name={app_name}", db.url);
    let AnyStore::Pg(store) = AnyStore::open_pg(&url, &PgConfig::default()).unwrap() else {
        unreachable!()
    };
    let held = || {
        crate::pg::query_i64(
            &db.url,
            &format!(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = '{app_name}'"
            ),
        )
    };
    let key = smsflow::store::ConvKey::new(OUR_NUMBER, "+15557000031");
    let first = store.lock_conversation(&key).await.unwrap();
    assert_eq!(held(), 1);
    let abandoned =
        tokio::time::timeout(Duration::from_millis(300), store.lock_conversation(&key)).await;
    assert!(
        abandoned.is_err(),
        "the second waits while the first holds it"
    );
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(15);
    while held() != 0 {
        assert!(Instant::now() < deadline, "a lock is still held");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = tokio::time::timeout(Duration::from_secs(5), store.lock_conversation(&key))
        .await
        .expect("free again")
        .unwrap();
    drop(again);
}

/// Two instances on one database, each with its timer scheduler and its
/// sender: every reminder is fired once and reaches Twilio once, whichever
/// instance set it and whichever finds it due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_fire_and_send_each_reminder_once() {
    use crate::fake_twilio::{FakeTwilio, ACCOUNT_SID, API_KEY_SECRET, API_KEY_SID};
    use crate::process::spawn_server_env;
    let Some(db) = test_db() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    let flow = "name: remind\ntrigger: { keywords: [GO] }\nsteps:\n  ask:\n    say: \"Reply YES.\"\n    wait: [ { yes: true } ]\n    timeout: { after: 2s, say: \"Reminder: reply YES.\" }\n";
    std::fs::write(flows.join("remind.yaml"), flow).unwrap();
    let fake = FakeTwilio::start(TOKEN).await;
    let config = tmp.path().join("smsflow.toml");
    std::fs::write(
        &config,
        format!(
            "twilio_api_base = \"{}\"\nsend_interval_ms = 1\n",
            fake.base()
        ),
    )
    .unwrap();
    let args = [
        "--no-watch",
        "--config",
        config.to_str().unwrap(),
        "--store",
        db.url.as_str(),
    ];
    let env = [
        ("TWILIO_ACCOUNT_SID", ACCOUNT_SID),
        ("TWILIO_API_KEY_SID", API_KEY_SID),
        ("TWILIO_API_KEY_SECRET", API_KEY_SECRET),
    ];
    let a = spawn_server_env(&flows, &tmp.path().join("a"), &args, &env);
    let b = spawn_server_env(&flows, &tmp.path().join("b"), &args, &env);
    let senders: Vec<String> = (0..6).map(|i| format!("+155573100{i:02}")).collect();
    for (i, from) in senders.iter().enumerate() {
        let server = if i % 2 == 0 { &a } else { &b };
        let answer = server.send(from, "go", &new_sid()).await.unwrap();
        assert_eq!(bodies(&answer), ["Reply YES."]);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while senders.iter().any(|s| fake.requests_to(s).is_empty()) {
        assert!(Instant::now() < deadline, "not every reminder was sent");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Time for a second firing or a second send, if either could happen.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for s in &senders {
        let got = fake.requests_to(s);
        assert_eq!(got.len(), 1, "{s}: {got:?}");
        assert_eq!(got[0].param("Body"), Some("Reminder: reply YES."));
    }
    let fired = |server: &crate::process::ChildServer| {
        let url = format!("http://{}/metrics", server.addr);
        let client = server.client.clone();
        async move {
            let m = client.get(url).send().await.unwrap().text().await.unwrap();
            m.lines()
                .find_map(|l| l.strip_prefix("smsflow_timers_fired_total "))
                .map_or(0, |n| n.trim().parse::<u64>().unwrap())
        }
    };
    assert_eq!(fired(&a).await + fired(&b).await, senders.len() as u64);
}
