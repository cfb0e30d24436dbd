//! One backend-conformance suite: the same test functions, each run
//! against the embedded sled store and against PostgreSQL (see `pg.rs`
//! for the database), through the `Store` trait the pipeline uses.
//!
//! Counts that PostgreSQL keeps up to date within a second (its probe
//! counts them, covering every instance's writes) are read after
//! [`settle`].

use smsflow::store::{
    AnyStore, AuditRecord, CallJob, CallJobState, Commit, ConsentChange, ConvKey, DeliveryStatus,
    Forgotten, OptOut, OutboxEntry, OutboxState, OutboxTally, PgConfig, Processed, Purged,
    RecentAnswers, RunResult, SledStore, StartRecord, StateCommit, StatusUpdate, Store,
    StoreConfig,
};

use crate::pg::{test_db, TestDb};

struct Fixture {
    store: AnyStore,
    _dir: Option<tempfile::TempDir>,
    _db: Option<TestDb>,
}

fn sled() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&dir.path().join("data"), &StoreConfig::default()).unwrap();
    Fixture {
        store: store.into(),
        _dir: Some(dir),
        _db: None,
    }
}

fn pg() -> Option<Fixture> {
    let db = test_db()?;
    let store = AnyStore::open_pg(&db.url, &PgConfig::default()).unwrap();
    Some(Fixture {
        store,
        _dir: None,
        _db: Some(db),
    })
}

/// The counts are current (PostgreSQL counts them in the background).
fn settle(store: &AnyStore) {
    if let AnyStore::Pg(p) = store {
        p.recount().unwrap();
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sled {
            $(
                #[test]
                fn $name() {
                    let f = super::sled();
                    super::$name(&f.store);
                }
            )*
        }
        mod postgres {
            $(
                #[test]
                fn $name() {
                    if let Some(f) = super::pg() {
                        super::$name(&f.store);
                    }
                }
            )*
        }
    };
}

conformance!(
    commit_load_and_dedupe,
    consent_and_its_audit,
    statuses_rank_and_stale,
    timers_by_due_time,
    outbox_cas_and_due_order,
    one_claim_of_an_outbox_entry_wins,
    call_jobs_once_and_due_in_order,
    one_claim_of_a_call_job_wins,
    starts_are_idempotent,
    purge_keeps_consent_and_live_state,
    tools_delete_and_put_conversations,
    results_written_with_their_commit,
    purge_removes_old_results_and_finished_call_jobs,
    message_texts_are_kept,
    forget_contact_erases_all_but_consent,
    outbox_tallies_follow_their_entries,
    conversation_keys_in_pages,
);

const US: &str = "+15550001111";

fn processed(outcome: &str, at: i64, from: &str) -> Processed {
    Processed {
        twiml: format!("<Response><Message>{outcome} {at}</Message></Response>"),
        outcome: outcome.into(),
        at,
        from: from.into(),
        to: US.into(),
        flow: Some("signup".into()),
        step: Some("ask_name".into()),
        body: None,
        replies: Vec::new(),
    }
}

/// Commit message `sid` to `key`'s conversation as the pipeline does:
/// read, then write with the answers read.
fn message(
    s: &AnyStore,
    key: &ConvKey,
    sid: &str,
    conversation: Option<&[u8]>,
    at: i64,
    consent: Option<ConsentChange>,
) {
    let record = s.load(key).unwrap();
    s.commit(Commit {
        key,
        conversation,
        ended: conversation.is_none(),
        recent: &record.recent,
        message_sid: sid,
        processed: &processed("reply", at, &key.from),
        consent,
        due: None,
        results: &[],
    })
    .unwrap();
}

fn consent(number: &str, opted_out: bool, at: i64, sid: &str) -> ConsentChange {
    ConsentChange {
        scope: US.into(),
        number: number.into(),
        state: OptOut { opted_out, at },
        audit: AuditRecord {
            at,
            scope: US.into(),
            number: number.into(),
            action: if opted_out { "opt_out" } else { "opt_in" }.into(),
            cause: if opted_out { "STOP" } else { "START" }.into(),
            message_sid: sid.into(),
        },
    }
}

fn commit_load_and_dedupe(s: &AnyStore) {
    let key = ConvKey::new(US, "+15551230001");
    assert_eq!(s.load(&key).unwrap().conversation, None);
    message(s, &key, "SM1", Some(b"state one"), 1000, None);
    let record = s.load(&key).unwrap();
    assert_eq!(record.conversation.as_deref(), Some(&b"state one"[..]));
    let answer = record.answer_to("SM1").expect("the answer is recorded");
    assert_eq!(answer.twiml, processed("reply", 1000, &key.from).twiml);
    assert!(record.answer_to("SM2").is_none());

    // The second message keeps the first one's answer for retries.
    message(s, &key, "SM2", Some(b"state two"), 1001, None);
    let record = s.load(&key).unwrap();
    assert_eq!(record.recent.len(), 2);
    assert!(record.answer_to("SM1").is_some() && record.answer_to("SM2").is_some());
    assert_eq!(
        s.conversation(&key).unwrap().as_deref(),
        Some(&b"state two"[..])
    );

    // The message log.
    let p = s.processed("SM2").unwrap().expect("logged");
    assert_eq!(
        (p.outcome.as_str(), p.at, p.from.as_str(), p.to.as_str()),
        ("reply", 1001, "+15551230001", US)
    );
    assert_eq!(p.flow.as_deref(), Some("signup"));
    assert!(s.processed("SM9").unwrap().is_none());
    let log: Vec<String> = s.inbound_log().unwrap().into_iter().map(|l| l.0).collect();
    assert_eq!(log, ["SM2", "SM1"], "newest first");

    // Another sender, and a record without state.
    let other = ConvKey::new(US, "+15551230002");
    message(s, &other, "SM3", None, 1002, None);
    settle(s);
    assert_eq!(s.conversation_count(), 1);
    let listed: Vec<String> = s
        .conversations_of(US)
        .unwrap()
        .into_iter()
        .map(|(from, _)| from)
        .collect();
    assert_eq!(listed, ["+15551230001"]);
    assert!(s.conversations_of("+15559999999").unwrap().is_empty());
    assert!(s.health().writable);
}

fn consent_and_its_audit(s: &AnyStore) {
    let key = ConvKey::new(US, "+15551230003");
    assert_eq!(s.opt_out(US, &key.from).unwrap(), None);
    message(
        s,
        &key,
        "SMstop",
        None,
        2000,
        Some(consent(&key.from, true, 2000, "SMstop")),
    );
    assert!(s.opt_out(US, &key.from).unwrap().unwrap().opted_out);
    // Atomic with the message: both are there.
    assert!(s.load(&key).unwrap().answer_to("SMstop").is_some());
    s.record_consent(&consent(&key.from, false, 2001, "SMstart"))
        .unwrap();
    assert_eq!(
        s.opt_out(US, &key.from).unwrap(),
        Some(OptOut {
            opted_out: false,
            at: 2001
        })
    );
    // Another scope is another state.
    assert_eq!(s.opt_out("MG123", &key.from).unwrap(), None);
    let audit = s.audit_log().unwrap();
    let actions: Vec<(&str, &str)> = audit
        .iter()
        .map(|a| (a.action.as_str(), a.message_sid.as_str()))
        .collect();
    assert_eq!(actions, [("opt_out", "SMstop"), ("opt_in", "SMstart")]);
}

fn status(name: &str, rank: u8, at: i64, inbound: Option<&str>) -> DeliveryStatus {
    DeliveryStatus {
        status: name.into(),
        rank,
        error_code: None,
        to: Some("+15551230004".into()),
        from: Some(US.into()),
        updated_at: at,
        inbound_sid: inbound.map(Into::into),
        flow: inbound.map(|_| "signup".into()),
        step: None,
    }
}

fn statuses_rank_and_stale(s: &AnyStore) {
    assert_eq!(s.delivery_status("SMout").unwrap(), None);
    let sent = status("sent", 3, 10, Some("SMin"));
    assert_eq!(
        s.record_status("SMout", &sent).unwrap(),
        StatusUpdate::Applied
    );
    let delivered = status("delivered", 5, 12, None);
    assert_eq!(
        s.record_status("SMout", &delivered).unwrap(),
        StatusUpdate::Applied
    );
    // A late, lower-ranked callback changes nothing but the event log.
    let late = status("sent", 3, 13, None);
    assert_eq!(
        s.record_status("SMout", &late).unwrap(),
        StatusUpdate::Stale {
            current: "delivered".into()
        }
    );
    let stored = s.delivery_status("SMout").unwrap().unwrap();
    assert_eq!(stored.status, "delivered");
    assert_eq!(
        stored.inbound_sid.as_deref(),
        Some("SMin"),
        "the link to the conversation is kept"
    );
    let events: Vec<String> = s
        .status_events("SMout")
        .unwrap()
        .into_iter()
        .map(|e| e.status)
        .collect();
    assert_eq!(events, ["sent", "delivered", "sent"]);
    s.record_status("SMother", &status("queued", 1, 20, None))
        .unwrap();
    let log: Vec<String> = s.outbound_log().unwrap().into_iter().map(|l| l.0).collect();
    assert_eq!(log, ["SMother", "SMout"], "newest first");
}

fn state(s: &AnyStore, key: &ConvKey, due: Option<i64>, at: i64) {
    let record = s.load(key).unwrap();
    s.commit_state(StateCommit {
        key,
        conversation: Some(b"waiting"),
        ended: false,
        due,
        recent: &record.recent,
        at,
        results: &[],
    })
    .unwrap();
}

fn timers_by_due_time(s: &AnyStore) {
    let (a, b, c) = (
        ConvKey::new(US, "+15551230005"),
        ConvKey::new(US, "+15551230006"),
        ConvKey::new(US, "+15551230007"),
    );
    assert_eq!(s.next_timer().unwrap(), None);
    state(s, &a, Some(100), 1);
    state(s, &b, Some(50), 1);
    state(s, &c, None, 1);
    settle(s);
    assert_eq!(s.pending_timers(), 2);
    let due = |now, limit| -> Vec<(i64, String)> {
        s.due_timers(now, limit)
            .unwrap()
            .into_iter()
            .map(|t| (t.due, t.key.from))
            .collect()
    };
    assert_eq!(due(49, 10), []);
    assert_eq!(due(75, 10), [(50, b.from.clone())]);
    assert_eq!(due(200, 10), [(50, b.from.clone()), (100, a.from.clone())]);
    assert_eq!(due(200, 1), [(50, b.from.clone())]);
    assert_eq!(s.next_timer().unwrap(), Some(50));
    assert_eq!(s.load(&b).unwrap().due, Some(50));
    // Fired: the next commit clears (or moves) the due time.
    state(s, &b, None, 60);
    state(s, &a, Some(300), 60);
    assert_eq!(due(200, 10), []);
    assert_eq!(due(300, 10), [(300, a.from.clone())]);
    assert_eq!(s.load(&b).unwrap().due, None);
    settle(s);
    assert_eq!(s.pending_timers(), 1);
}

fn entry(key: &str, not_before: i64) -> OutboxEntry {
    OutboxEntry {
        key: key.into(),
        to: "+15551230008".into(),
        from: US.into(),
        messaging_service_sid: None,
        body: format!("reminder {key}"),
        media: Vec::new(),
        cause: "timeout".into(),
        flow: Some("appointment".into()),
        step: Some("confirm".into()),
        created_at: 1,
        due_at: not_before,
        state: OutboxState::Pending {
            not_before,
            attempts: 0,
        },
    }
}

fn keys(entries: &[OutboxEntry]) -> Vec<&str> {
    entries.iter().map(|e| e.key.as_str()).collect()
}

fn outbox_cas_and_due_order(s: &AnyStore) {
    let mut sent = entry("done", 10);
    sent.state = OutboxState::Sent {
        sid: "SM1".into(),
        at: 10,
    };
    let batch = [entry("c", 300), entry("a", 100), entry("b", 200), sent];
    assert_eq!(s.enqueue_outbound(&batch).unwrap(), 4);
    assert_eq!(s.enqueue_outbound(&batch).unwrap(), 0, "idempotent");
    settle(s);
    assert_eq!(s.outbox_depth(), 3);
    assert_eq!(keys(&s.due_outbound(99, 10).unwrap()), [""; 0]);
    assert_eq!(keys(&s.due_outbound(150, 10).unwrap()), ["a"]);
    assert_eq!(keys(&s.due_outbound(1000, 10).unwrap()), ["a", "b", "c"]);
    assert_eq!(keys(&s.due_outbound(1000, 2).unwrap()), ["a", "b"]);

    let pending = entry("a", 100).state;
    let sending = OutboxState::Sending {
        since: 101,
        attempts: 1,
    };
    // Compare and swap: the wrong expected state changes nothing.
    assert_eq!(
        s.update_outbound("a", &sending, pending.clone()).unwrap(),
        None
    );
    assert_eq!(
        s.update_outbound("nothing", &pending, sending.clone())
            .unwrap(),
        None
    );
    let moved = s
        .update_outbound("a", &pending, sending.clone())
        .unwrap()
        .unwrap();
    assert_eq!(moved.state, sending);
    assert_eq!(keys(&s.due_outbound(1000, 10).unwrap()), ["b", "c"]);
    assert_eq!(keys(&s.sending_outbound().unwrap()), ["a"]);
    // Deferred.
    let later = OutboxState::Pending {
        not_before: 500,
        attempts: 0,
    };
    let b_pending = entry("b", 200).state;
    s.update_outbound("b", &b_pending, later.clone())
        .unwrap()
        .unwrap();
    assert_eq!(keys(&s.due_outbound(499, 10).unwrap()), ["c"]);
    assert_eq!(keys(&s.due_outbound(500, 10).unwrap()), ["c", "b"]);
    let done = OutboxState::Sent {
        sid: "SM2".into(),
        at: 102,
    };
    s.update_outbound("a", &sending, done.clone())
        .unwrap()
        .unwrap();
    assert!(s.sending_outbound().unwrap().is_empty());
    assert_eq!(s.outbound("a").unwrap().unwrap().state, done);
    assert_eq!(s.outbound("b").unwrap().unwrap().state, later);
    assert_eq!(s.outbound("zzz").unwrap(), None);
    assert_eq!(keys(&s.outbox().unwrap()), ["a", "b", "c", "done"]);
    settle(s);
    assert_eq!(s.outbox_depth(), 2);
}

/// Several senders (threads here; instances on PostgreSQL) claiming one
/// entry at once: exactly one moves it.
fn one_claim_of_an_outbox_entry_wins(s: &AnyStore) {
    s.enqueue_outbound(&[entry("race", 10)]).unwrap();
    let pending = entry("race", 10).state;
    let wins: usize = std::thread::scope(|scope| {
        let claims: Vec<_> = (0..8)
            .map(|i| {
                let pending = pending.clone();
                scope.spawn(move || {
                    let to = OutboxState::Sending {
                        since: 11,
                        attempts: i,
                    };
                    usize::from(s.update_outbound("race", &pending, to).unwrap().is_some())
                })
            })
            .collect();
        claims.into_iter().map(|c| c.join().unwrap()).sum()
    });
    assert_eq!(wins, 1);
}

fn job(key: &str, not_before: i64) -> CallJob {
    CallJob {
        key: key.into(),
        method: "POST".into(),
        url: "https://shop.example/orders".into(),
        headers: Vec::new(),
        body: Some(("application/json".into(), r#"{"item":"pizza"}"#.into())),
        timeout_ms: 5000,
        flow: "pizza".into(),
        step: "send".into(),
        created_at: 1,
        state: CallJobState::Pending {
            not_before,
            attempts: 0,
        },
    }
}

fn call_jobs_once_and_due_in_order(s: &AnyStore) {
    let batch = [job("b", 200), job("a", 100)];
    assert_eq!(s.enqueue_call_jobs(&batch).unwrap(), 2);
    assert_eq!(s.enqueue_call_jobs(&batch).unwrap(), 0);
    let due = |now| -> Vec<String> {
        s.due_call_jobs(now, 10)
            .unwrap()
            .into_iter()
            .map(|j| j.key)
            .collect()
    };
    assert!(due(99).is_empty());
    assert_eq!(due(150), ["a"]);
    assert_eq!(due(1000), ["a", "b"]);
    let mut a = job("a", 500);
    s.update_call_job(&a).unwrap();
    assert_eq!(due(300), ["b"]);
    a.state = CallJobState::Delivered {
        status: 201,
        attempts: 1,
        at: 3,
    };
    s.update_call_job(&a).unwrap();
    assert_eq!(due(1000), ["b"]);
    assert_eq!(s.call_job("a").unwrap(), Some(a));
    assert_eq!(s.call_job("none").unwrap(), None);
}

/// Several call workers (instances on PostgreSQL) claiming one due job
/// at once: exactly one gets it.
fn one_claim_of_a_call_job_wins(s: &AnyStore) {
    s.enqueue_call_jobs(&[job("race", 10)]).unwrap();
    let from = job("race", 10).state;
    let wins: usize = std::thread::scope(|scope| {
        let claims: Vec<_> = (0..8)
            .map(|i| {
                let from = from.clone();
                scope.spawn(move || {
                    let mut claimed = job("race", 100 + i);
                    claimed.state = CallJobState::Pending {
                        not_before: 100 + i,
                        attempts: 1,
                    };
                    usize::from(s.claim_call_job(&claimed, &from).unwrap())
                })
            })
            .collect();
        claims.into_iter().map(|c| c.join().unwrap()).sum()
    });
    assert_eq!(wins, 1);
    assert!(
        s.due_call_jobs(99, 10).unwrap().is_empty(),
        "claimed: due later"
    );
    assert!(!s.claim_call_job(&job("none", 1), &from).unwrap());
}

fn start(key: &str, result: &str) -> StartRecord {
    StartRecord {
        key: key.into(),
        result: result.into(),
        flow: "appointment".into(),
        to: "+15551230009".into(),
        from: US.into(),
        messaging_service_sid: None,
        busy_with: None,
        outbox: vec!["start:k1:0".into()],
        at: 5,
    }
}

fn starts_are_idempotent(s: &AnyStore) {
    let key = ConvKey::new(US, "+15551230009");
    let recent = RecentAnswers::default();
    let change = StateCommit {
        key: &key,
        conversation: Some(b"started"),
        ended: false,
        due: Some(900),
        recent: &recent,
        at: 5,
        results: &[],
    };
    let first = start("k1", "started");
    assert_eq!(s.start_record("k1").unwrap(), None);
    assert_eq!(
        s.commit_start(Some(change.clone()), &[entry("start:k1:0", 5)], &first)
            .unwrap(),
        None
    );
    assert_eq!(s.start_record("k1").unwrap(), Some(first.clone()));
    assert_eq!(s.load(&key).unwrap().due, Some(900));
    assert!(s.outbound("start:k1:0").unwrap().is_some());
    // The same key again: nothing written, the first record returned.
    let again = StateCommit {
        conversation: Some(b"other"),
        ..change
    };
    assert_eq!(
        s.commit_start(
            Some(again),
            &[entry("start:k1:other", 5)],
            &start("k1", "skipped_busy")
        )
        .unwrap(),
        Some(first)
    );
    assert_eq!(
        s.conversation(&key).unwrap().as_deref(),
        Some(&b"started"[..])
    );
    assert_eq!(s.outbound("start:k1:other").unwrap(), None);
    // A start that changes no conversation.
    let opted = start("k2", "opted_out");
    assert_eq!(s.commit_start(None, &[], &opted).unwrap(), None);
    assert_eq!(s.start_record("k2").unwrap(), Some(opted));
}

fn purge_keeps_consent_and_live_state(s: &AnyStore) {
    let old = ConvKey::new(US, "+15551230010");
    let live = ConvKey::new(US, "+15551230011");
    // An ended conversation last touched at 100, with its message and a
    // consent change; a running one touched at 100 too; new records.
    message(
        s,
        &old,
        "SMold",
        None,
        100,
        Some(consent(&old.from, true, 100, "SMold")),
    );
    state(s, &live, None, 100);
    message(
        s,
        &ConvKey::new(US, "+15551230012"),
        "SMnew",
        None,
        1000,
        None,
    );
    s.record_status("SMgone", &status("delivered", 5, 100, None))
        .unwrap();
    s.record_status("SMkept", &status("delivered", 5, 1000, None))
        .unwrap();
    let purged = s.purge(500).unwrap();
    assert_eq!(
        purged,
        Purged {
            processed: 1,
            statuses: 1,
            status_events: 1,
            conversations: 1,
            call_jobs: 0,
            results: 0,
        }
    );
    assert!(s.processed("SMold").unwrap().is_none());
    assert!(s.processed("SMnew").unwrap().is_some());
    assert!(s.delivery_status("SMgone").unwrap().is_none());
    assert!(s.delivery_status("SMkept").unwrap().is_some());
    assert_eq!(s.load(&old).unwrap(), Default::default());
    assert!(
        s.conversation(&live).unwrap().is_some(),
        "a running flow stays"
    );
    assert!(s.opt_out(US, &old.from).unwrap().unwrap().opted_out);
    assert_eq!(s.audit_log().unwrap().len(), 1, "the audit is never purged");
    assert_eq!(s.purge(500).unwrap(), Purged::default());
}

fn tools_delete_and_put_conversations(s: &AnyStore) {
    let key = ConvKey::new(US, "+15551230013");
    assert!(!s.delete_conversation(&key).unwrap());
    s.put_conversation(&key, b"seeded", false, 10).unwrap();
    assert_eq!(
        s.conversation(&key).unwrap().as_deref(),
        Some(&b"seeded"[..])
    );
    message(s, &key, "SMt", Some(b"answered"), 11, None);
    assert!(s.delete_conversation(&key).unwrap());
    let record = s.load(&key).unwrap();
    assert_eq!(record.conversation, None);
    assert!(
        record.answer_to("SMt").is_some(),
        "a retry still gets its answer"
    );
    settle(s);
    assert_eq!(s.conversation_count(), 0);
    // Put keeps the recorded answers too.
    s.put_conversation(&key, b"again", true, 12).unwrap();
    assert!(s.load(&key).unwrap().answer_to("SMt").is_some());
}

fn result(flow: &str, contact: &str, started: i64, ended: i64, step: &str) -> RunResult {
    RunResult {
        flow: flow.into(),
        to: US.into(),
        contact: contact.into(),
        started_at: started,
        ended_at: ended,
        ended: "completed".into(),
        path: vec!["ask".into(), step.into()],
        vars: [("size".to_string(), step.to_string())].into(),
        fields: Default::default(),
    }
}

/// A conversation change carrying run results (`commit`, `commit_state`,
/// `commit_start`); `results` reads one flow's, by end time; the same
/// run written again replaces itself.
fn results_written_with_their_commit(s: &AnyStore) {
    let a = ConvKey::new(US, "+15551230020");
    let b = ConvKey::new(US, "+15551230021");
    let first = result("pizza", &a.from, 10, 50, "large");
    let record = s.load(&a).unwrap();
    s.commit(Commit {
        key: &a,
        conversation: None,
        ended: true,
        recent: &record.recent,
        message_sid: "SMres1",
        processed: &processed("reply", 50, &a.from),
        consent: None,
        due: None,
        results: std::slice::from_ref(&first),
    })
    .unwrap();
    let other_flow = result("survey", &b.from, 5, 40, "yes");
    let earlier = result("pizza", &b.from, 20, 30, "small");
    let recent = RecentAnswers::default();
    s.commit_state(StateCommit {
        key: &b,
        conversation: None,
        ended: true,
        due: None,
        recent: &recent,
        at: 40,
        results: &[other_flow.clone(), earlier.clone()],
    })
    .unwrap();
    assert_eq!(
        s.results("pizza", 0).unwrap(),
        [earlier.clone(), first.clone()]
    );
    assert_eq!(
        s.results("pizza", 31).unwrap(),
        std::slice::from_ref(&first)
    );
    assert_eq!(s.results("survey", 0).unwrap(), [other_flow]);
    assert!(s.results("none", 0).unwrap().is_empty());

    // The same step handled again (a retried message) ends the run later
    // but writes the same result: replaced, not doubled.
    let again = result("pizza", &a.from, 10, 60, "medium");
    s.commit_state(StateCommit {
        key: &a,
        conversation: None,
        ended: true,
        due: None,
        recent: &recent,
        at: 60,
        results: std::slice::from_ref(&again),
    })
    .unwrap();
    assert_eq!(s.results("pizza", 0).unwrap(), [earlier, again]);

    // A flow start that replaces a run keeps that run's result.
    let c = ConvKey::new(US, "+15551230009");
    let replaced = result("pizza", &c.from, 3, 5, "small");
    let change = StateCommit {
        key: &c,
        conversation: Some(b"started"),
        ended: false,
        due: None,
        recent: &recent,
        at: 5,
        results: std::slice::from_ref(&replaced),
    };
    assert_eq!(
        s.commit_start(Some(change), &[], &start("kres", "started"))
            .unwrap(),
        None
    );
    assert!(s.results("pizza", 0).unwrap().contains(&replaced));
}

/// Purge: results of runs that ended before the cutoff, and call jobs
/// delivered or failed before it; a pending job stays however old.
fn purge_removes_old_results_and_finished_call_jobs(s: &AnyStore) {
    let key = ConvKey::new(US, "+15551230030");
    let recent = RecentAnswers::default();
    let old = result("pizza", &key.from, 10, 100, "small");
    let new = result("pizza", &key.from, 900, 1000, "large");
    s.commit_state(StateCommit {
        key: &key,
        conversation: Some(b"running"),
        ended: false,
        due: None,
        recent: &recent,
        at: 1000,
        results: &[old, new.clone()],
    })
    .unwrap();
    let mut delivered = job("delivered", 1);
    delivered.state = CallJobState::Delivered {
        status: 200,
        attempts: 1,
        at: 100,
    };
    let mut failed = job("failed", 1);
    failed.state = CallJobState::Failed {
        reason: "404".into(),
        attempts: 1,
        at: 100,
    };
    let mut late = job("late", 1);
    late.state = CallJobState::Delivered {
        status: 200,
        attempts: 1,
        at: 1000,
    };
    let pending = job("pending", 1);
    s.enqueue_call_jobs(&[delivered, failed, late.clone(), pending.clone()])
        .unwrap();
    assert_eq!(s.call_jobs_pending(), 1);
    let purged = s.purge(500).unwrap();
    assert_eq!(
        purged,
        Purged {
            call_jobs: 2,
            results: 1,
            ..Purged::default()
        }
    );
    assert_eq!(s.results("pizza", 0).unwrap(), [new]);
    assert_eq!(s.call_job("delivered").unwrap(), None);
    assert_eq!(s.call_job("failed").unwrap(), None);
    assert_eq!(s.call_job("late").unwrap(), Some(late));
    assert_eq!(s.call_job("pending").unwrap(), Some(pending));
    assert_eq!(s.call_jobs_pending(), 1);
    assert_eq!(s.purge(500).unwrap(), Purged::default());
}

/// The texts of a message and our replies, when the pipeline keeps them,
/// come back from `processed` and `inbound_log`.
fn message_texts_are_kept(s: &AnyStore) {
    let key = ConvKey::new(US, "+15551230040");
    let mut p = processed("reply", 70, &key.from);
    p.body = Some("LARGE please".into());
    p.replies = vec!["Got it.".into(), "Anything else?".into()];
    let record = s.load(&key).unwrap();
    s.commit(Commit {
        key: &key,
        conversation: None,
        ended: true,
        recent: &record.recent,
        message_sid: "SMtext",
        processed: &p,
        consent: None,
        due: None,
        results: &[],
    })
    .unwrap();
    let back = s.processed("SMtext").unwrap().unwrap();
    assert_eq!(back.body.as_deref(), Some("LARGE please"));
    assert_eq!(back.replies, p.replies);
    let (sid, logged) = s.inbound_log().unwrap().remove(0);
    assert_eq!(sid, "SMtext");
    assert_eq!((logged.body, logged.replies), (p.body, p.replies));
    // Without texts: none.
    message(s, &key, "SMbare", None, 80, None);
    let bare = s.processed("SMbare").unwrap().unwrap();
    assert_eq!((bare.body, bare.replies.len()), (None, 0));
}

fn forget_audit(number: &str, at: i64) -> AuditRecord {
    AuditRecord {
        at,
        scope: "*".into(),
        number: number.into(),
        action: "forget".into(),
        cause: "request".into(),
        message_sid: String::new(),
    }
}

/// Erasure: the contact's conversations on every number of ours (with
/// their timers), results, log lines, delivery records and events of
/// messages to it, outbox entries to it, start records naming it; its
/// consent and audit stay; someone else's data stays; idempotent.
fn forget_contact_erases_all_but_consent(s: &AnyStore) {
    const GONE: &str = "+15551230050";
    const KEPT: &str = "+15551230051";
    const OTHER_US: &str = "+15550002222";
    let conv = |to: &str, from: &str, due: Option<i64>| {
        let key = ConvKey::new(to, from);
        let record = s.load(&key).unwrap();
        s.commit_state(StateCommit {
            key: &key,
            conversation: Some(b"running"),
            ended: false,
            due,
            recent: &record.recent,
            at: 10,
            results: &[RunResult {
                to: to.into(),
                ..result("pizza", from, 1, 2, "large")
            }],
        })
        .unwrap();
    };
    message(
        s,
        &ConvKey::new(US, GONE),
        "SMgone",
        Some(b"running"),
        20,
        Some(consent(GONE, true, 20, "SMgone")),
    );
    message(
        s,
        &ConvKey::new(US, KEPT),
        "SMkept",
        Some(b"running"),
        20,
        None,
    );
    conv(US, GONE, Some(100));
    conv(OTHER_US, GONE, None);
    conv(US, KEPT, Some(100));
    let mut to_gone = status("delivered", 5, 30, None);
    to_gone.to = Some(GONE.into());
    s.record_status("SMtogone", &to_gone).unwrap();
    let mut to_kept = status("delivered", 5, 30, None);
    to_kept.to = Some(KEPT.into());
    s.record_status("SMtokept", &to_kept).unwrap();
    let mut out_gone = entry("broadcast:b1:gone", 5);
    out_gone.to = GONE.into();
    let mut out_kept = entry("broadcast:b1:kept", 5);
    out_kept.to = KEPT.into();
    s.enqueue_outbound(&[out_gone, out_kept]).unwrap();
    let mut start_gone = start("kgone", "opted_out");
    start_gone.to = GONE.into();
    let mut start_kept = start("kkept", "opted_out");
    start_kept.to = KEPT.into();
    s.commit_start(None, &[], &start_gone).unwrap();
    s.commit_start(None, &[], &start_kept).unwrap();

    assert_eq!(
        s.contact_conversations(GONE).unwrap(),
        [ConvKey::new(US, GONE), ConvKey::new(OTHER_US, GONE)]
    );
    let gone = s.forget_contact(GONE, &forget_audit(GONE, 40)).unwrap();
    assert_eq!(
        gone,
        Forgotten {
            conversations: 2,
            results: 2,
            log_lines: 1,
            statuses: 1,
            status_events: 1,
            outbox: 1,
            starts: 1,
        }
    );
    assert!(s.contact_conversations(GONE).unwrap().is_empty());
    assert_eq!(s.load(&ConvKey::new(US, GONE)).unwrap(), Default::default());
    let due: Vec<String> = s
        .due_timers(1000, 10)
        .unwrap()
        .into_iter()
        .map(|t| t.key.from)
        .collect();
    assert_eq!(due, [KEPT], "the erased conversation's timer is gone");
    assert!(s
        .results("pizza", 0)
        .unwrap()
        .iter()
        .all(|r| r.contact == KEPT));
    assert_eq!(s.processed("SMgone").unwrap(), None);
    assert!(s.processed("SMkept").unwrap().is_some());
    assert_eq!(s.delivery_status("SMtogone").unwrap(), None);
    assert!(s.status_events("SMtogone").unwrap().is_empty());
    assert!(s.delivery_status("SMtokept").unwrap().is_some());
    assert_eq!(keys(&s.outbox().unwrap()), ["broadcast:b1:kept"]);
    // The broadcast no longer waits for the erased recipient.
    settle(s);
    assert_eq!(
        s.outbox_tallies().unwrap(),
        [(
            "b1".to_string(),
            OutboxTally {
                pending: 1,
                ..OutboxTally::default()
            }
        )]
    );
    assert_eq!(s.start_record("kgone").unwrap(), None);
    assert!(s.start_record("kkept").unwrap().is_some());
    // Kept: the consent state and its audit, with the erasure's record.
    assert!(s.opt_out(US, GONE).unwrap().unwrap().opted_out);
    let actions: Vec<String> = s
        .audit_log()
        .unwrap()
        .into_iter()
        .map(|a| a.action)
        .collect();
    assert_eq!(actions.len(), 2);
    assert_eq!(actions.last().map(String::as_str), Some("forget"));

    // Again: nothing left to remove, one more audit record.
    let again = s.forget_contact(GONE, &forget_audit(GONE, 50)).unwrap();
    assert_eq!(again, Forgotten::default());
    assert_eq!(s.audit_log().unwrap().len(), 3);
}

/// Per-broadcast counts change with every enqueue and state change of a
/// counted entry (and with the entries of a flow start's first message).
fn outbox_tallies_follow_their_entries(s: &AnyStore) {
    assert!(s.outbox_tallies().unwrap().is_empty());
    s.enqueue_outbound(&[
        entry("broadcast:b1:+1", 5),
        entry("broadcast:b1:+2", 5),
        entry("broadcast:b2:+1", 5),
        entry("reminder:x", 5),
    ])
    .unwrap();
    let tally = |pending, sending, sent| OutboxTally {
        pending,
        sending,
        sent,
        ..OutboxTally::default()
    };
    assert_eq!(
        s.outbox_tallies().unwrap(),
        [
            ("b1".to_string(), tally(2, 0, 0)),
            ("b2".to_string(), tally(1, 0, 0))
        ]
    );
    let pending = entry("broadcast:b1:+1", 5).state;
    let sending = OutboxState::Sending {
        since: 6,
        attempts: 1,
    };
    s.update_outbound("broadcast:b1:+1", &pending, sending.clone())
        .unwrap()
        .unwrap();
    s.update_outbound(
        "broadcast:b1:+1",
        &sending,
        OutboxState::Sent {
            sid: "SM1".into(),
            at: 7,
        },
    )
    .unwrap()
    .unwrap();
    // A refused transition changes nothing.
    assert_eq!(
        s.update_outbound("broadcast:b1:+1", &pending, sending.clone())
            .unwrap(),
        None
    );
    s.update_outbound("broadcast:b1:+2", &pending, sending)
        .unwrap()
        .unwrap();
    // A flow broadcast's start: its first message counts, not the others.
    let record = start("start:broadcast:b3:+1", "started");
    s.commit_start(
        None,
        &[
            entry("start:broadcast:b3:+1:0", 5),
            entry("start:broadcast:b3:+1:1", 5),
        ],
        &record,
    )
    .unwrap();
    assert_eq!(
        s.outbox_tallies().unwrap(),
        [
            ("b1".to_string(), tally(0, 1, 1)),
            ("b2".to_string(), tally(1, 0, 0)),
            ("b3".to_string(), tally(1, 0, 0)),
        ]
    );
    assert_eq!(
        keys(&s.outbox_with_prefix("broadcast:b1:").unwrap()),
        ["broadcast:b1:+1", "broadcast:b1:+2"]
    );
    assert_eq!(
        keys(&s.outbox_with_prefix("start:broadcast:b3:").unwrap()),
        ["start:broadcast:b3:+1:0", "start:broadcast:b3:+1:1"]
    );
}

/// Walking every conversation in pages, in key order (our number, then
/// the contact), with `all_conversations` seeing the same records.
fn conversation_keys_in_pages(s: &AnyStore) {
    let ours = ["+15550001111", "+15550002222"];
    let theirs = ["+15551230060", "+15551230061", "+15551230062"];
    for to in ours.iter().rev() {
        for from in theirs.iter().rev() {
            state(s, &ConvKey::new(*to, *from), None, 10);
        }
    }
    let mut all = Vec::new();
    let mut after: Option<ConvKey> = None;
    loop {
        let page = s.conversation_keys(after.as_ref(), 4).unwrap();
        assert!(page.len() <= 4);
        let Some(last) = page.last().cloned() else {
            break;
        };
        all.extend(page);
        after = Some(last);
    }
    let expected: Vec<ConvKey> = ours
        .iter()
        .flat_map(|to| theirs.iter().map(move |from| ConvKey::new(*to, *from)))
        .collect();
    assert_eq!(all, expected);
    let listed: Vec<ConvKey> = s
        .all_conversations()
        .unwrap()
        .into_iter()
        .map(|(k, at, stored)| {
            assert_eq!(at, 10);
            assert_eq!(stored.conversation.as_deref(), Some(&b"waiting"[..]));
            k
        })
        .collect();
    assert_eq!(listed, expected);
    assert_eq!(
        s.conversation_keys(Some(&expected[5]), 4).unwrap(),
        Vec::<ConvKey>::new()
    );
}
