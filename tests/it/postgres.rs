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
            "applied 0001, 0002, 0003; schema at version 3",
            "schema at version 3: nothing to apply"
        ]
    );
    let again = run();
    assert_eq!(
        String::from_utf8_lossy(&again.stdout).trim(),
        "schema at version 3: nothing to apply"
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
            metric_in(&m, "smsflow_timers_fired_total").map_or(0, |n| n.parse::<u64>().unwrap())
        }
    };
    assert_eq!(fired(&a).await + fired(&b).await, senders.len() as u64);
}

/// A PostgreSQL cluster of the test's own (`initdb` in a temporary
/// directory, as `.ci/with-postgres` does it), so stopping it disturbs no
/// other test. Dropping it stops it for good, whatever the test did.
struct OwnCluster {
    dir: tempfile::TempDir,
    /// The directory holding `initdb` and `pg_ctl`.
    bin: std::path::PathBuf,
    /// `runuser -u postgres --` when we are root (PostgreSQL refuses to
    /// run as root), else nothing.
    as_owner: Vec<String>,
    owner: String,
    port: u16,
}

/// Run a PostgreSQL tool to completion (each one is bounded by its own
/// `-t`), with no pipe a leftover server could keep open.
fn run_quietly(mut command: std::process::Command) {
    use std::process::Stdio;
    let out = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(out.success(), "{command:?}: {out}");
}

impl OwnCluster {
    /// A new cluster, started; `None` (after saying so) when the tools are
    /// not known and skipping is allowed. `.ci/with-postgres` exports
    /// `SMSFLOW_TEST_PG_BIN`.
    fn start() -> Option<OwnCluster> {
        let Some(bin) = std::env::var_os("SMSFLOW_TEST_PG_BIN").filter(|b| !b.is_empty()) else {
            let reason = "SMSFLOW_TEST_PG_BIN is not set (run the tests under \
                          .ci/with-postgres to include PostgreSQL)";
            if std::env::var_os("SMSFLOW_TEST_NO_SKIP").is_some() {
                panic!("cannot skip under SMSFLOW_TEST_NO_SKIP: {reason}");
            }
            eprintln!("skipped: {reason}");
            return None;
        };
        let id = |arg: &str| {
            let out = std::process::Command::new("id").arg(arg).output().unwrap();
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        };
        let root = id("-u") == "0";
        let (as_owner, owner) = if root {
            (
                vec![
                    "runuser".into(),
                    "-u".into(),
                    "postgres".into(),
                    "--".into(),
                ],
                "postgres".to_string(),
            )
        } else {
            (Vec::new(), id("-un"))
        };
        let dir = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        if root {
            let mut chown = std::process::Command::new("chown");
            chown.arg("postgres:").arg(dir.path());
            run_quietly(chown);
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cluster = OwnCluster {
            dir,
            bin: bin.into(),
            as_owner,
            owner,
            port,
        };
        let mut initdb = cluster.tool("initdb");
        initdb.arg("-D").arg(cluster.data()).args([
            "-U",
            &cluster.owner,
            "--auth=trust",
            "-E",
            "UTF8",
        ]);
        run_quietly(initdb);
        cluster.pg_ctl_start();
        Some(cluster)
    }

    fn data(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    fn url(&self) -> String {
        format!("postgres://{}@127.0.0.1:{}/postgres", self.owner, self.port)
    }

    fn tool(&self, name: &str) -> std::process::Command {
        let program = self.bin.join(name);
        match self.as_owner.split_first() {
            Some((runuser, args)) => {
                let mut c = std::process::Command::new(runuser);
                c.args(args).arg(program);
                c
            }
            None => std::process::Command::new(program),
        }
    }

    /// Start the server and wait (`-w`, at most 30 s) until it accepts
    /// connections; its output goes to a log file, never to a pipe of ours.
    fn pg_ctl_start(&self) {
        let mut pg_ctl = self.tool("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .args(["-w", "-t", "30", "start", "-o"])
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                self.port,
                self.dir.path().display()
            ));
        run_quietly(pg_ctl);
    }

    fn pg_ctl_stop(&self, mode: &str) -> bool {
        let mut pg_ctl = self.tool("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-t", "30", "-m", mode, "stop"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        pg_ctl.status().is_ok_and(|s| s.success())
    }

    /// Its server log, to explain a failure.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        self.pg_ctl_stop("immediate");
    }
}

/// A signed webhook with a time limit: the status and body, or `None`
/// when the server did not answer in time.
async fn post_sms(
    server: &crate::process::ChildServer,
    from: &str,
    body: &str,
    sid: &str,
) -> Option<(u16, String)> {
    let params = sms_params(from, body, sid);
    let sig = server
        .validator
        .compute("http://localhost/twilio/sms", &params);
    let r = server
        .client
        .post(format!("http://{}/twilio/sms", server.addr))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-twilio-signature", sig)
        .body(encode_form(&params))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .ok()?;
    let status = r.status().as_u16();
    Some((status, r.text().await.ok()?))
}

async fn readyz(server: &crate::process::ChildServer) -> Option<u16> {
    let r = server
        .client
        .get(format!("http://{}/readyz", server.addr))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    Some(r.status().as_u16())
}

/// Poll `/readyz` until it answers `want` (at most 30 s).
async fn child_ready(server: &crate::process::ChildServer, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = readyz(server).await;
        if got == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "/readyz stayed {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The real PostgreSQL server stopped and started again under load: every
/// webhook that arrives while it is down is a 503 (never a 200 for what
/// was not committed), `/readyz` fails, and once it is back the same
/// smsflow process serves again. Each sender retries a 503 with the same
/// MessageSid (as Twilio's retry would): the counter's replies are then
/// exactly 1, 2, 3, … per sender, and each MessageSid is logged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_restart_under_load_is_503_then_recovers_without_a_restart() {
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Phase {
        Up,
        Down,
        Back,
    }
    const SENDERS: usize = 4;
    const STEPS: usize = 40;
    let Some(cluster) = OwnCluster::start() else {
        return;
    };
    let cluster = Arc::new(cluster);
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(flows.join("counter.yaml"), COUNTER_YAML).unwrap();
    std::fs::write(flows.join("counter.rhai"), COUNTER_RHAI).unwrap();
    // More replies per sender than the loop guard allows by default.
    let config = tmp.path().join("smsflow.toml");
    std::fs::write(&config, "loop_max_replies = 1000\n").unwrap();
    let url = cluster.url();
    let server = Arc::new(spawn_server(
        &flows,
        &tmp.path().join("data"),
        &["--config", config.to_str().unwrap(), "--store", &url],
    ));
    child_ready(&server, 200).await;

    let phase = Arc::new(Mutex::new(Phase::Up));
    let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let (server, phase, acked) = (server.clone(), phase.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let me = format!("+1555720{s:04}");
            let mut replies = Vec::new();
            // (phase when sent, status) of every answer.
            let mut seen = Vec::new();
            for i in 1..=STEPS {
                let body = if i == 1 {
                    "COUNT".to_string()
                } else {
                    format!("m{i}")
                };
                let sid = new_sid();
                loop {
                    assert!(
                        started.elapsed() < Duration::from_secs(50),
                        "{me}: step {i} never acknowledged: {seen:?}"
                    );
                    let sent_in = *phase.lock().unwrap();
                    let answer = post_sms(&server, &me, &body, &sid).await;
                    seen.push((sent_in, answer.as_ref().map(|(status, _)| *status)));
                    match answer {
                        Some((200, twiml)) => {
                            replies.push(bodies(&twiml).join(""));
                            acked.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        _ => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (me, replies, seen)
        }));
    }

    // Twice: some load acknowledged, then the server goes away, first
    // with a clean shutdown (`fast`: sessions cut, open transactions
    // rolled back), then as if it crashed (`immediate`: the restart
    // recovers from the write-ahead log).
    let mut acked_at_stop = Vec::new();
    for mode in ["fast", "immediate"] {
        let before = acked.load(Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(20);
        while acked.load(Ordering::SeqCst) < before + SENDERS * 3 {
            assert!(Instant::now() < deadline, "no load acknowledged");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let stopper = cluster.clone();
        let stopped = tokio::time::timeout(
            Duration::from_secs(40),
            tokio::task::spawn_blocking(move || stopper.pg_ctl_stop(mode)),
        )
        .await
        .expect("pg_ctl stop within its limit")
        .unwrap();
        assert!(stopped, "pg_ctl stop -m {mode}: {}", cluster.log());
        *phase.lock().unwrap() = Phase::Down;
        acked_at_stop.push(acked.load(Ordering::SeqCst));
        child_ready(&server, 503).await;
        // Long enough for every sender to be refused a few times.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(readyz(&server).await, Some(503));
        *phase.lock().unwrap() = Phase::Back;
        let starter = cluster.clone();
        tokio::time::timeout(
            Duration::from_secs(40),
            tokio::task::spawn_blocking(move || starter.pg_ctl_start()),
        )
        .await
        .expect("pg_ctl start within its limit")
        .unwrap();
        child_ready(&server, 200).await;
    }

    let mut refused = 0;
    for t in tasks {
        let (me, replies, seen) = tokio::time::timeout(Duration::from_secs(50), t)
            .await
            .expect("the senders finish")
            .unwrap();
        for (sent_in, status) in &seen {
            if *sent_in == Phase::Down {
                assert_eq!(
                    *status,
                    Some(503),
                    "{me}: sent while PostgreSQL was down: {seen:?}"
                );
                refused += 1;
            }
        }
        let want: Vec<String> = (1..=STEPS)
            .map(|i| match i {
                1 => "1 COUNT".to_string(),
                _ => format!("{i} m{i}"),
            })
            .collect();
        assert_eq!(replies, want, "{me}: every step once, in order");
    }
    assert!(refused >= 2 * SENDERS, "only {refused} requests while down");
    assert!(
        acked_at_stop.iter().all(|&n| n < SENDERS * STEPS),
        "the load ended before a stop: {acked_at_stop:?}"
    );
    let store = AnyStore::open_pg(&url, &PgConfig::default()).unwrap();
    let log = store.inbound_log().unwrap();
    let mut sids: Vec<&str> = log.iter().map(|(sid, _)| sid.as_str()).collect();
    sids.sort_unstable();
    sids.dedup();
    assert_eq!((log.len(), sids.len()), (SENDERS * STEPS, SENDERS * STEPS));
    let mut server = Arc::try_unwrap(server).ok().expect("the senders are done");
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "smsflow kept running"
    );
}

/// An HTTP upstream on 127.0.0.1 for flows' calls: answers each order
/// with the next id (`{"id": n}`), except that it holds the answer to its
/// first request until the test opens `gate`.
struct GatedShop {
    addr: SocketAddr,
    received: Arc<std::sync::atomic::AtomicUsize>,
    gate: Arc<tokio::sync::Notify>,
}

impl GatedShop {
    async fn start() -> GatedShop {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let shop = GatedShop {
            addr: listener.local_addr().unwrap(),
            received: Arc::default(),
            gate: Arc::new(tokio::sync::Notify::new()),
        };
        let (received, gate) = (shop.received.clone(), shop.gate.clone());
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let (received, gate) = (received.clone(), gate.clone());
                tokio::spawn(async move {
                    // The head, then Content-Length bytes of body.
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(n) = socket.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).to_lowercase();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let len = text[..end]
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            if buf.len() >= end + 4 + len {
                                break;
                            }
                        }
                    }
                    let n = received.fetch_add(1, Ordering::SeqCst) + 1;
                    if n == 1 {
                        gate.notified().await;
                    }
                    let json = format!("{{\"id\": {n}}}");
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
                        json.len()
                    );
                    let _ = socket.write_all(reply.as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        shop
    }
}

/// The lock of a conversation is a session advisory lock: if that one
/// session dies while its holder is between reading the conversation and
/// committing (here: waiting for a flow's HTTP call), PostgreSQL releases
/// the lock and another instance takes it, reads and commits. The first
/// holder must then not commit its step from the same prior state (a lost
/// step, a second reply from one state): it answers 503, and the stored
/// conversation is exactly the other instance's step.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_holder_whose_lock_session_died_cannot_commit() {
    let Some(db) = test_db() else { return };
    let shop = GatedShop::start().await;
    let flow = format!(
        r#"
trigger: {{keywords: [ORDER]}}
start: ask
steps:
  ask:
    say: "What would you like?"
    wait:
      - anything: true
        save: item
        goto: place
  place:
    call:
      method: POST
      url: "http://{}/orders"
      json:
        item: "{{{{item}}}}"
      timeout: 10s
      save:
        order_id: json.id
      on_error: sorry
    say: "Order {{{{order_id}}}} for {{{{item}}}}."
  sorry:
    say: "Sorry ({{{{call.error}}}})."
"#,
        shop.addr
    );
    // A's connections carry a name of their own, to find its lock's.
    let app_name = format!("smsflow_fence_a_{}", std::process::id());
    let url_a = format!("{}&application_name={app_name}", db.url);
    let configure = |url: String| {
        move |c: &mut smsflow::config::Config| {
            c.store = Some(url.into());
            c.http_allow = vec!["127.0.0.1".into()];
            c.call_budget = Duration::from_secs(10);
            c.request_timeout = Duration::from_secs(14);
            c.store_message_text = true;
        }
    };
    let a = Arc::new(spawn_configured(&[("order.yaml", &flow)], configure(url_a)).await);
    let b = spawn_configured(&[("order.yaml", &flow)], configure(db.url.clone())).await;
    let me = "+15557000041";
    let first = new_sid();
    let r = a.send_sms_sid(me, "ORDER", &first).await;
    assert_eq!(bodies(&r.body), ["What would you like?"]);

    // A reads the conversation and waits for the shop, holding the lock.
    let held = new_sid();
    let in_flight = {
        let (a, held) = (a.clone(), held.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let r = a.send_sms_sid(me, "margherita", &held).await;
            (r, started.elapsed())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while shop.received.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "A's call never reached the shop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A's lock session: the one advisory lock A's connections hold.
    let lock_pid = format!(
        "SELECT l.pid::bigint FROM pg_locks l JOIN pg_stat_activity s ON s.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND s.application_name = '{app_name}'"
    );
    let pid = crate::pg::query_i64(&db.url, &lock_pid);
    crate::pg::sql(&db.url, &format!("SELECT pg_terminate_backend({pid})"));

    // B now gets the lock, reads the state A read, and commits its step.
    let next = new_sid();
    let r = b.send_sms_sid(me, "pepperoni", &next).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(bodies(&r.body), ["Order 2 for pepperoni."]);

    // A's call returns: its step must not commit.
    shop.gate.notify_one();
    let (r, took) = in_flight.await.unwrap();
    assert!(
        took < Duration::from_secs(12),
        "A answered only after {took:?}: its request's time limit, not the fence"
    );
    assert_eq!(r.status, 503, "A committed with a lost lock: {}", r.body);

    // Stored: exactly B's step after the first message; A's never.
    let log = b.store.inbound_log().unwrap();
    let mut sids: Vec<&str> = log.iter().map(|(sid, _)| sid.as_str()).collect();
    sids.sort_unstable();
    assert_eq!(sids, [first.as_str(), next.as_str()], "{log:?}");
    let (_, b_step) = log.iter().find(|(sid, _)| *sid == next).unwrap();
    assert_eq!(b_step.replies, ["Order 2 for pepperoni."]);
    // The run B ended is stored once, with what B's step saved.
    let runs = b.store.results("order", 0).unwrap();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].vars.get("order_id").map(String::as_str), Some("2"));
    assert_eq!(
        runs[0].vars.get("item").map(String::as_str),
        Some("pepperoni")
    );

    // Twilio retries A's message: it is handled once, now on B's state
    // (the order is done), and A serves again.
    let r = a.send_sms_sid(me, "margherita", &held).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let log = b.store.inbound_log().unwrap();
    assert_eq!(log.len(), 3, "{log:?}");
    assert_eq!(log.iter().filter(|(sid, _)| *sid == held).count(), 1);
}

/// Every conversation write made under a lock commits on the lock's own
/// session: once that session has ended (and PostgreSQL released the
/// lock), a state change, a flow start, a reset or an erasure fails and
/// changes nothing, without marking the store failed; while it lives
/// they commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_under_a_lost_lock_fail_and_change_nothing() {
    use smsflow::store::{AuditRecord, ConvKey, RecentAnswers, StartRecord, StateCommit};
    let Some(db) = test_db() else { return };
    let app_name = format!("smsflow_lost_{}", std::process::id());
    let url = format!("{}&application_name={app_name}", db.url);
    let AnyStore::Pg(store) = AnyStore::open_pg(&url, &PgConfig::default()).unwrap() else {
        unreachable!()
    };
    // End the session holding the store's one advisory lock, and wait
    // until its backend is gone.
    let kill = || async {
        let pid = crate::pg::query_i64(
            &db.url,
            &format!(
                "SELECT l.pid::bigint FROM pg_locks l JOIN pg_stat_activity s ON s.pid = l.pid \
                 WHERE l.locktype = 'advisory' AND l.granted AND s.application_name = '{app_name}'"
            ),
        );
        crate::pg::sql(&db.url, &format!("SELECT pg_terminate_backend({pid})"));
        let deadline = Instant::now() + Duration::from_secs(15);
        let alive = format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}");
        while crate::pg::query_i64(&db.url, &alive) != 0 {
            assert!(Instant::now() < deadline, "backend {pid} still there");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let ann = "+15557000051";
    let key = ConvKey::new(OUR_NUMBER, ann);
    let recent = RecentAnswers::default();
    let state = |bytes: &'static [u8]| StateCommit {
        key: &key,
        conversation: Some(bytes),
        ended: false,
        due: None,
        recent: &recent,
        at: 20,
        results: &[],
    };
    let start = StartRecord {
        key: "k-lost".into(),
        result: "started".into(),
        flow: "f".into(),
        to: ann.into(),
        from: OUR_NUMBER.into(),
        messaging_service_sid: None,
        busy_with: None,
        outbox: Vec::new(),
        at: 20,
    };
    let audit = AuditRecord {
        at: 30,
        scope: "*".into(),
        number: ann.into(),
        action: "forget".into(),
        cause: "test".into(),
        message_sid: String::new(),
    };
    let stored = |store: &smsflow::store::PgStore| store.load(&key).unwrap().conversation;

    // Held: the write commits (on the lock's session).
    let lock = store.lock_conversation(&key).await.unwrap();
    store.commit_state(state(b"held")).unwrap();
    drop(lock);
    assert_eq!(stored(&store).as_deref(), Some(&b"held"[..]));

    // Lost: nothing the holder writes reaches the database.
    let lock = store.lock_conversation(&key).await.unwrap();
    kill().await;
    let e = store.commit_state(state(b"stale")).unwrap_err();
    assert!(e.to_string().contains("lock was lost"), "{e}");
    assert!(store
        .commit_start(Some(state(b"stale")), &[], &start)
        .is_err());
    assert!(store.commit_start(None, &[], &start).is_err());
    assert!(store.delete_conversation(&key).is_err());
    assert!(
        store.health().writable,
        "a lost lock is not the database failing"
    );
    drop(lock);
    assert_eq!(stored(&store).as_deref(), Some(&b"held"[..]));
    assert!(store.start_record("k-lost").unwrap().is_none());

    // An erasure locks the contact's conversations on one session and
    // commits on it: not once that session is gone; then it does.
    let lock = store
        .lock_contact(ann, std::slice::from_ref(&key))
        .await
        .unwrap();
    kill().await;
    assert!(store.forget_contact(ann, &audit).is_err());
    drop(lock);
    assert_eq!(stored(&store).as_deref(), Some(&b"held"[..]));
    let lock = store
        .lock_contact(ann, std::slice::from_ref(&key))
        .await
        .unwrap();
    assert_eq!(store.forget_contact(ann, &audit).unwrap().conversations, 1);
    drop(lock);
    assert_eq!(stored(&store), None);
}

/// `smsflow messages`, `export results|contacts` and `forget` with
/// `--store` (or SMSFLOW_DATABASE_URL) use the database directly while a
/// server runs on it; a database not at this release's schema is refused
/// and left as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_commands_use_the_database_while_a_server_runs() {
    let Some(db) = test_db() else { return };
    let flows = signup();
    let url = db.url.clone();
    let app = spawn_configured(&[("signup.yaml", &flows)], |c| {
        c.store = Some(url.into());
        c.store_message_text = true;
    })
    .await;
    let me = "+15557000061";
    for (text, reply) in [
        ("JOIN", "Hi! What's your name?"),
        ("Ada", "Thanks Ada! How old are you?"),
        ("34", "You're signed up, Ada."),
    ] {
        assert_eq!(bodies(&app.send_sms(me, text).await.body), [reply]);
    }
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_smsflow"))
            .args(args)
            .env_remove("SMSFLOW_DATABASE_URL")
            .env_remove("SMSFLOW_ADMIN_TOKEN")
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    };
    let (ok, out, err) = cli(&["messages", "--store", &db.url, "--json", "--number", me]);
    assert!(ok, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let bodies_in: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["body"].as_str())
        .collect();
    assert_eq!(bodies_in, ["34", "Ada", "JOIN"], "{out}");

    let (ok, out, err) = cli(&["export", "results", "signup", "--store", &db.url]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(out.contains(me) && out.contains("completed"), "{out}");

    // The environment variable names the database too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smsflow"))
        .args(["export", "contacts"])
        .env("SMSFLOW_DATABASE_URL", &db.url)
        .output()
        .unwrap();
    let csv = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(csv.contains(me) && csv.contains("Ada"), "{csv}");

    // An erasure takes the server's conversation locks: the server then
    // greets the number as new.
    let (ok, out, err) = cli(&["forget", me, "--store", &db.url]);
    assert!(ok, "{err}");
    assert!(out.contains("1 conversations"), "{out}");
    let (_, out, _) = cli(&["messages", "--store", &db.url, "--json", "--number", me]);
    assert_eq!(out.trim(), "[]");
    assert_eq!(
        bodies(&app.send_sms(me, "JOIN").await.body),
        ["Hi! What's your name?"]
    );
    let (ok, csv, err) = cli(&["export", "contacts", "--store", &db.url]);
    assert!(ok, "{err}");
    assert!(csv.contains(me) && !csv.contains("Ada"), "{csv}");

    // Not this release's schema: refused, nothing created.
    let other = test_db().unwrap();
    // (The cluster trusts local connections: the password is only there
    // to be hidden.)
    let with_password = other.url.replacen('@', ":secret@", 1);
    let (ok, _, err) = cli(&["messages", "--store", &with_password]);
    assert!(!ok);
    assert!(err.contains("schema is at version 0"), "{err}");
    assert!(err.contains("smsflow migrate"), "{err}");
    assert!(!err.contains("secret"), "{err}");
    let tables = crate::pg::query_i64(
        &other.url,
        "SELECT count(*) FROM pg_tables WHERE tablename = 'schema_migrations' \
         AND schemaname = current_schema()",
    );
    assert_eq!(tables, 0);
    let (ok, _, err) = cli(&["messages", "--store", "mysql://x"]);
    assert!(!ok);
    assert!(err.contains("not a database URL"), "{err}");
    // --help never shows the URL (and its password) the environment holds.
    for command in [
        &["messages"][..],
        &["export", "results"],
        &["forget"],
        &["serve"],
        &["migrate"],
        &["store", "copy"],
    ] {
        let help = std::process::Command::new(env!("CARGO_BIN_EXE_smsflow"))
            .args(command)
            .arg("--help")
            .env("SMSFLOW_DATABASE_URL", &with_password)
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        assert!(help.contains("SMSFLOW_DATABASE_URL"), "{command:?}: {help}");
        assert!(!help.contains("secret"), "{command:?}: {help}");
    }
}
