//! Unit tests of the sled store: records, purging, faults, reopening.

use super::records::{has_conversation, two_part};
use super::*;
use std::io;
use std::path::Path;
use std::thread;
use std::time::Instant;

fn open() -> (tempfile::TempDir, SledStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
    (dir, store)
}

fn status(s: &str, rank: u8) -> DeliveryStatus {
    DeliveryStatus {
        status: s.into(),
        rank,
        error_code: None,
        to: None,
        from: None,
        updated_at: 0,
        inbound_sid: None,
        flow: None,
        step: None,
    }
}

fn processed(at: i64) -> Processed {
    Processed {
        twiml: "<Response/>".into(),
        outcome: "silence".into(),
        at,
        from: "+1666".into(),
        to: "+1555".into(),
        flow: None,
        step: None,
        body: None,
        replies: Vec::new(),
    }
}

static EMPTY: RecentAnswers = RecentAnswers(Vec::new());

fn commit<'a>(
    key: &'a ConvKey,
    conversation: Option<&'a [u8]>,
    sid: &'a str,
    processed: &'a Processed,
) -> Commit<'a> {
    Commit {
        key,
        conversation,
        ended: true,
        recent: &EMPTY,
        message_sid: sid,
        processed,
        consent: None,
        due: None,
        results: &[],
    }
}

#[test]
fn a_commit_records_its_answer_in_the_conversation() {
    let (_d, store) = open();
    let key = ConvKey::new("+1", "+2");
    let mut p = processed(10);
    p.twiml = "<first/>".into();
    store
        .commit(commit(&key, Some(b"{\"a\":1}"), "SM1", &p))
        .unwrap();
    let rec = store.load(&key).unwrap();
    assert_eq!(rec.conversation.as_deref(), Some(&b"{\"a\":1}"[..]));
    assert_eq!(rec.answer_to("SM1").unwrap().twiml, "<first/>");
    // The next commit keeps earlier answers (within the bounds).
    let mut c = commit(&key, None, "SM2", &p);
    c.recent = &rec.recent;
    store.commit(c).unwrap();
    let rec = store.load(&key).unwrap();
    assert_eq!(rec.conversation, None);
    assert!(rec.answer_to("SM1").is_some());
    assert!(rec.answer_to("SM2").is_some());
    assert_eq!(store.conversation_count(), 0);
}

/// Whatever TwiML an answer holds, a retry gets it back byte for byte,
/// and the constant parts of ours are not stored.
#[test]
fn recent_answers_give_back_their_twiml_exactly() {
    let prolog = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>";
    let ours = format!("{prolog}<Response><Message><Body>Hi</Body></Message></Response>");
    let silence = crate::twilio::SILENCE.to_owned();
    let cases = [
        (ours.clone(), 1 + 8 + 4 + 34 + 4 + 5 + 4 + ours.len() - 59),
        (
            silence.clone(),
            1 + 8 + 4 + 34 + 4 + 5 + 4 + silence.len() - 38,
        ),
        (format!("{prolog}<Response>unclosed"), 0),
        (format!("{prolog}<Response></Response>"), 0),
        (prolog.to_owned(), 0),
        ("<Response/>".to_owned(), 0),
        (format!(" {prolog}<Response></Response>"), 0),
        (String::new(), 0),
        ("é<Response>\u{0}</Response>".to_owned(), 0),
    ];
    let mut recent = RecentAnswers::default();
    for (n, (twiml, size)) in cases.iter().enumerate() {
        let a = RecentAnswer {
            sid: format!("SM{n:032}"),
            twiml: twiml.clone(),
            outcome: "reply".into(),
            at: 100 + n as i64,
        };
        let alone = RecentAnswers::default().keep_with(&a);
        if *size > 0 {
            assert_eq!(1 + alone.0.len(), *size, "{twiml:?}");
        }
        assert_eq!(alone.find(&a.sid).as_ref(), Some(&a));
        recent = recent.keep_with(&a);
    }
    // Kept entries are carried over as they are, flags included.
    for (n, (twiml, _)) in cases.iter().enumerate().skip(1) {
        let got = recent.find(&format!("SM{n:032}")).expect("kept");
        assert_eq!(&got.twiml, twiml);
    }
    // A record is well formed only if its flags are: the response flag
    // alone is no layout of ours.
    let mut bad = RecentAnswers::default().keep_with(&RecentAnswer {
        sid: "SM1".into(),
        twiml: ours,
        outcome: "reply".into(),
        at: 1,
    });
    let at = 8 + 4 + 3 + 4 + 5;
    bad.0[at] &= 0x7f;
    assert!(bad.find("SM1").is_none());
}

#[test]
fn recent_answers_are_bounded_by_age_and_count() {
    let answer = |sid: &str, at: i64| RecentAnswer {
        sid: sid.into(),
        twiml: String::new(),
        outcome: String::new(),
        at,
    };
    let mut r = RecentAnswers::default();
    for a in [answer("SMold", 0), answer("SMmid", DEDUPE_WINDOW_SECS)] {
        r = r.keep_with(&a);
    }
    let kept = r.keep_with(&answer("SMnew", DEDUPE_WINDOW_SECS + 10));
    let sids: Vec<String> = kept
        .entries()
        .map(|(_, sid, ..)| String::from_utf8_lossy(sid).into_owned())
        .collect();
    assert_eq!(sids, vec!["SMmid", "SMnew"]);
    let mut r = RecentAnswers::default();
    for i in 0..100 {
        r = r.keep_with(&answer(&format!("SM{i}"), 5));
    }
    let kept = r.keep_with(&answer("SMlast", 6));
    assert_eq!(kept.len(), DEDUPE_MAX_ANSWERS);
    assert!(kept.find("SMlast").is_some());
    assert!(kept.find("SM99").is_some());
    assert!(kept.find("SM0").is_none());
    // A retried sid replaces its entry rather than adding one.
    let again = kept.keep_with(&answer("SMlast", 7));
    assert_eq!(again.len(), DEDUPE_MAX_ANSWERS);
}

#[test]
fn purge_removes_old_records_and_ended_conversations_only() {
    let (_d, store) = open();
    let (old, new) = (processed(100), processed(1000));
    let k_old = ConvKey::new("+1", "+old");
    let k_run = ConvKey::new("+1", "+running");
    let k_new = ConvKey::new("+1", "+new");
    store
        .commit(commit(&k_old, Some(b"{}"), "SM1", &old))
        .unwrap();
    let mut running = commit(&k_run, Some(b"{}"), "SM2", &old);
    running.ended = false;
    running.consent = Some(ConsentChange {
        scope: "+1".into(),
        number: "+running".into(),
        state: OptOut {
            opted_out: true,
            at: 100,
        },
        audit: AuditRecord {
            at: 100,
            scope: "+1".into(),
            number: "+running".into(),
            action: "opt_out".into(),
            cause: "STOP".into(),
            message_sid: "SM2".into(),
        },
    });
    store.commit(running).unwrap();
    store
        .commit(commit(&k_new, Some(b"{}"), "SM3", &new))
        .unwrap();
    let mut st = status("sent", 3);
    st.updated_at = 100;
    store.record_status("SMout", &st).unwrap();

    let purged = store.purge(500).unwrap();
    assert_eq!(
        purged,
        Purged {
            processed: 2,
            statuses: 1,
            status_events: 1,
            conversations: 1,
            call_jobs: 0,
            results: 0,
        }
    );
    assert!(store.conversation(&k_old).unwrap().is_none());
    assert!(store.conversation(&k_run).unwrap().is_some());
    assert!(store.conversation(&k_new).unwrap().is_some());
    assert!(store.processed("SM3").unwrap().is_some());
    // Consent is never purged.
    assert!(store.opt_out("+1", "+running").unwrap().unwrap().opted_out);
    assert_eq!(store.audit_log().unwrap().len(), 1);
}

#[tokio::test]
async fn commit_is_visible_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let key = ConvKey::new("+1555", "+1666");
    let rec = processed(1);
    {
        let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
        store
            .commit(commit(&key, Some(b"{}"), "SM1", &rec))
            .unwrap();
        store.flush(store.epoch()).await.unwrap();
    }
    let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
    assert_eq!(
        store.conversation(&key).unwrap().as_deref(),
        Some(&b"{}"[..])
    );
    // The log keeps everything but the TwiML (the record has that).
    let logged = store.processed("SM1").unwrap().unwrap();
    assert_eq!(logged.outcome, rec.outcome);
    assert_eq!(
        (logged.from, logged.to, logged.at),
        (rec.from, rec.to, rec.at)
    );
    assert_eq!(
        store.load(&key).unwrap().answer_to("SM1").unwrap().twiml,
        rec.twiml
    );
    assert_eq!(store.conversation_count(), 1);
}

#[test]
fn keys_do_not_collide_across_numbers() {
    let (_d, store) = open();
    let rec = processed(0);
    let (k1, k2) = (ConvKey::new("+1", "+23"), ConvKey::new("+12", "+3"));
    store.commit(commit(&k1, Some(b"a"), "SM1", &rec)).unwrap();
    store.commit(commit(&k2, Some(b"b"), "SM2", &rec)).unwrap();
    assert_eq!(
        store.conversation(&ConvKey::new("+1", "+23")).unwrap(),
        Some(b"a".to_vec())
    );
    assert_eq!(
        store.conversation(&ConvKey::new("+12", "+3")).unwrap(),
        Some(b"b".to_vec())
    );
}

#[test]
fn delete_conversation_removes_only_that_key() {
    let (_d, store) = open();
    let rec = processed(0);
    let a = ConvKey::new("+1", "+2");
    let b = ConvKey::new("+1", "+3");
    store.commit(commit(&a, Some(b"a"), "SM1", &rec)).unwrap();
    store.commit(commit(&b, Some(b"b"), "SM2", &rec)).unwrap();
    assert!(store.delete_conversation(&a).unwrap());
    assert!(!store.delete_conversation(&a).unwrap());
    assert_eq!(store.conversation(&a).unwrap(), None);
    assert_eq!(store.conversation(&b).unwrap(), Some(b"b".to_vec()));
    // The dedupe record outlives the conversation.
    assert!(store.processed("SM1").unwrap().is_some());
}

#[test]
fn status_is_monotonic() {
    let (_d, store) = open();
    assert_eq!(
        store.record_status("SM1", &status("sent", 3)).unwrap(),
        StatusUpdate::Applied
    );
    assert_eq!(
        store.record_status("SM1", &status("delivered", 5)).unwrap(),
        StatusUpdate::Applied
    );
    assert_eq!(
        store.record_status("SM1", &status("sent", 3)).unwrap(),
        StatusUpdate::Stale {
            current: "delivered".into()
        }
    );
    assert_eq!(
        store.delivery_status("SM1").unwrap().unwrap().status,
        "delivered"
    );
}

#[tokio::test]
async fn concurrent_flushes_all_complete() {
    let (_d, store) = open();
    let store = std::sync::Arc::new(store);
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move { s.flush(s.epoch()).await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

/// Count conversations the slow way, for comparison.
fn recount(store: &SledStore) -> usize {
    store
        .shared
        .with_db(|db| {
            Ok(db
                .scan_prefix(b"c\0")
                .filter_map(Result::ok)
                .filter(|(_, v)| has_conversation(v))
                .count())
        })
        .unwrap()
}

fn opt_out_change(number: &str) -> ConsentChange {
    ConsentChange {
        scope: "+1".into(),
        number: number.into(),
        state: OptOut {
            opted_out: true,
            at: 1,
        },
        audit: AuditRecord {
            at: 1,
            scope: "+1".into(),
            number: number.into(),
            action: "opt_out".into(),
            cause: "STOP".into(),
            message_sid: "SMx".into(),
        },
    }
}

#[test]
fn the_conversation_count_is_maintained_not_scanned() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
    let (old, new) = (processed(100), processed(1000));
    let keys: Vec<ConvKey> = (0..6)
        .map(|i| ConvKey::new("+1", format!("+{i}")))
        .collect();
    for (i, k) in keys.iter().enumerate() {
        let mut c = commit(k, Some(b"{}"), "SMa", if i < 3 { &old } else { &new });
        c.ended = i % 2 == 0;
        store.commit(c).unwrap();
    }
    assert_eq!(store.conversation_count(), 6);
    // A commit without state, one with a consent change, a rewrite.
    store.commit(commit(&keys[0], None, "SMb", &old)).unwrap();
    let mut stop = commit(&keys[1], None, "SMc", &old);
    stop.consent = Some(opt_out_change("+1"));
    store.commit(stop).unwrap();
    store
        .commit(commit(&keys[3], Some(b"{}"), "SMd", &new))
        .unwrap();
    assert_eq!(store.conversation_count(), 4);
    assert_eq!(store.conversation_count(), recount(&store));
    assert!(store.delete_conversation(&keys[4]).unwrap());
    assert_eq!(store.conversation_count(), 3);
    store.purge(500).unwrap();
    assert_eq!(store.conversation_count(), recount(&store));
    assert_eq!(store.conversation_count(), 2);
    drop(store);
    let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
    assert_eq!(store.conversation_count(), 2);
    assert_eq!(store.health().conversations, 2);
}

/// Rewrite one raw record with sled itself, as a damaged disk or a
/// buggy older version would have left it.
fn damage(dir: &Path, key: &[u8], edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let db = (0..500)
        .find_map(|_| match sled::Config::new().path(dir).open() {
            Ok(db) => Some(db),
            Err(_) => {
                thread::sleep(Duration::from_millis(20));
                None
            }
        })
        .expect("sled reopens");
    let mut v = db.get(key).unwrap().expect("record present").to_vec();
    edit(&mut v);
    db.insert(key, v.as_slice()).unwrap();
    db.flush().unwrap();
    v
}

#[test]
fn an_undecodable_record_is_kept_aside_before_it_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let key = ConvKey::new("+1555", "+1666");
    {
        let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
        store
            .commit(commit(
                &key,
                Some(b"{\"name\":\"Ada\"}"),
                "SM1",
                &processed(1),
            ))
            .unwrap();
    }
    // An unknown flag bit (after the version byte and the 8-byte time):
    // the layout does not decode.
    let damaged = damage(dir.path(), &key.db_key(), |v| v[1 + 8] |= 0x80);
    let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
    // Found while counting at open, kept aside, still in place.
    assert_eq!(store.health().quarantined, 1);
    let kept = std::fs::read_dir(dir.path().join("quarantine"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect::<Vec<_>>();
    assert_eq!(kept.len(), 1);
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&kept[0]).unwrap()).unwrap();
    use base64::Engine as _;
    let value = base64::engine::general_purpose::STANDARD
        .decode(record["value_base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(value, damaged);
    assert_eq!(record["reason"], "unknown flags");
    // Reading it again keeps nothing twice; the conversation reads as
    // empty only now that its bytes are safe.
    assert_eq!(store.load(&key).unwrap(), StoredConversation::default());
    assert_eq!(store.health().quarantined, 1);
    store
        .commit(commit(&key, Some(b"{}"), "SM2", &processed(2)))
        .unwrap();
    assert_eq!(
        store.conversation(&key).unwrap().as_deref(),
        Some(&b"{}"[..])
    );
}

/// The store answers "no consent record" from its filter without reading
/// sled (`consent_filter.rs`): every way a record is written, and every
/// record on disk at open, must reach the filter.
#[test]
fn consent_records_are_found_whatever_wrote_them_and_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let check = |store: &SledStore| {
        assert!(store.opt_out("+1", "+a").unwrap().unwrap().opted_out);
        assert!(store.opt_out("+1", "+b").unwrap().unwrap().opted_out);
        assert!(!store.opt_out("+1", "+c").unwrap().unwrap().opted_out);
        assert_eq!(store.opt_out("+1", "+d").unwrap(), None);
        // The same number under another scope is another record.
        assert_eq!(store.opt_out("+2", "+a").unwrap(), None);
    };
    {
        let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
        store.record_consent(&opt_out_change("+a")).unwrap();
        let (key, rec) = (ConvKey::new("+1", "+b"), processed(1));
        let mut stop = commit(&key, None, "SMb", &rec);
        stop.consent = Some(opt_out_change("+b"));
        store.commit(stop).unwrap();
        let mut start = opt_out_change("+c");
        start.state.opted_out = false;
        store.record_consent(&start).unwrap();
        check(&store);
    }
    let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
    check(&store);
}

#[test]
fn an_unreadable_consent_record_counts_as_an_opt_out() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
        let mut change = opt_out_change("+1666");
        change.state.opted_out = false;
        store.record_consent(&change).unwrap();
    }
    damage(dir.path(), &two_part(b"o\0", "+1", "+1666"), |v| {
        v.truncate(3)
    });
    let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
    assert!(store.opt_out("+1", "+1666").unwrap().unwrap().opted_out);
    assert_eq!(store.health().quarantined, 1);
}

#[test]
fn a_database_that_lost_checkpointed_data_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
        for i in 0..300 {
            let key = ConvKey::new("+1555", format!("+1{i:09}"));
            store
                .commit(commit(&key, Some(b"{\"fields\":{}}"), "SM1", &processed(1)))
                .unwrap();
        }
    }
    // sled's recovery stops at the first damaged entry and drops the
    // rest without a word; the checkpoint notices.
    let db = dir.path().join("db");
    let len = std::fs::metadata(&db).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let err = SledStore::open(dir.path(), &StoreConfig::default())
        .err()
        .expect("a truncated store is refused");
    assert!(
        matches!(err, OpenError::LostData { .. } | OpenError::Damaged { .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("restore the directory from a backup"),
        "{err}"
    );
    // Refused again: nothing was reset by the first attempt.
    assert!(SledStore::open(dir.path(), &StoreConfig::default()).is_err());
}

#[test]
fn open_failures_name_their_cause() {
    let dir = tempfile::tempdir().unwrap();
    let first = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
    let started = Instant::now();
    let err = SledStore::open(dir.path(), &StoreConfig::default())
        .err()
        .expect("a held store is refused");
    assert!(matches!(err, OpenError::Locked { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a lock held by someone else fails fast"
    );
    drop(first);

    let denied = OpenError::from_sled(
        dir.path(),
        sled::Error::Io(io::Error::from(io::ErrorKind::PermissionDenied)),
    );
    assert!(
        denied.to_string().starts_with("permission denied on"),
        "{denied}"
    );
    let damaged = OpenError::from_sled(
        dir.path(),
        sled::Error::Corruption {
            at: None,
            bt: Default::default(),
        },
    );
    assert!(damaged.to_string().contains("is damaged"), "{damaged}");

    // A recovery that does not end is an error, not a hung start.
    let config = StoreConfig {
        open_timeout: Duration::ZERO,
        ..StoreConfig::default()
    };
    let other = tempfile::tempdir().unwrap();
    let err = SledStore::open(other.path(), &config)
        .err()
        .expect("times out");
    assert!(matches!(err, OpenError::TimedOut { .. }), "{err}");
    // The open goes on in its own thread past the limit and creates the
    // database: wait until that thread has let go of it (its lock is
    // free), or removing the directory races its files and leaves it.
    let released = (0..500).any(|_| match sled::Config::new().path(other.path()).open() {
        Ok(db) => {
            drop(db);
            true
        }
        Err(_) => {
            std::thread::sleep(Duration::from_millis(20));
            false
        }
    });
    assert!(released, "the timed-out open never let go of the database");
}

fn outbox_entry(key: &str, body: &str) -> OutboxEntry {
    OutboxEntry {
        key: key.into(),
        to: "+15551230001".into(),
        from: "+15550001111".into(),
        messaging_service_sid: None,
        body: body.into(),
        media: Vec::new(),
        cause: "timeout".into(),
        flow: Some("appointment".into()),
        step: Some("confirm".into()),
        created_at: 100,
        due_at: 100,
        state: OutboxState::Pending {
            not_before: 100,
            attempts: 0,
        },
    }
}

#[test]
fn enqueueing_a_key_twice_keeps_the_first_entry() {
    let (dir, store) = open();
    let first = outbox_entry("k1", "first");
    assert_eq!(
        store
            .enqueue_outbound(std::slice::from_ref(&first))
            .unwrap(),
        1
    );
    let again = [outbox_entry("k1", "second"), outbox_entry("k2", "other")];
    assert_eq!(store.enqueue_outbound(&again).unwrap(), 1);
    assert_eq!(store.outbound("k1").unwrap(), Some(first.clone()));
    store.flush_blocking().unwrap();
    drop(store);
    let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
    let keys: Vec<_> = store.outbox().unwrap().into_iter().map(|e| e.key).collect();
    assert_eq!(keys, ["k1", "k2"]);
    assert_eq!(store.outbound("k1").unwrap(), Some(first));
    assert_eq!(store.outbound("k3").unwrap(), None);
}

/// The timer index follows the records' due times: a commit indexes its
/// due time and drops the one it replaced; due timers come earliest
/// first and only up to `now`; the pending count is kept without scans and
/// recounted the same on reopen; a stale entry can be removed.
#[test]
fn the_timer_index_follows_commits_and_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        ConvKey::new("+1", "+2"),
        ConvKey::new("+1", "+3"),
        ConvKey::new("+1", "+4"),
    );
    {
        let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
        let p = processed(10);
        let with_due = |key: &ConvKey, sid: &str, due: Option<i64>| {
            let mut c = commit(key, Some(b"{}"), sid, &p);
            c.due = due;
            c.ended = due.is_none();
            store.commit(c).unwrap();
        };
        with_due(&a, "SM1", Some(300));
        with_due(&b, "SM2", Some(100));
        with_due(&c, "SM3", Some(200));
        assert_eq!(store.pending_timers(), 3);
        assert_eq!(store.next_timer().unwrap(), Some(100));
        // `a` moves later; `c`'s timer is cancelled.
        with_due(&a, "SM4", Some(400));
        with_due(&c, "SM5", None);
        assert_eq!(store.pending_timers(), 2);
        let due = store.due_timers(1_000, 10).unwrap();
        assert_eq!(
            due,
            [
                DueTimer {
                    due: 100,
                    key: b.clone()
                },
                DueTimer {
                    due: 400,
                    key: a.clone()
                }
            ]
        );
        assert_eq!(store.due_timers(399, 10).unwrap().len(), 1);
        assert_eq!(store.due_timers(1_000, 1).unwrap().len(), 1);
        assert_eq!(store.load(&a).unwrap().due, Some(400));
        // A timer commit without an inbound message keeps the answers.
        let before = store.load(&b).unwrap();
        store
            .commit_state(StateCommit {
                key: &b,
                conversation: Some(b"{\"x\":1}"),
                ended: false,
                due: Some(150),
                recent: &before.recent,
                at: 100,
                results: &[],
            })
            .unwrap();
        let after = store.load(&b).unwrap();
        assert_eq!((after.due, after.recent), (Some(150), before.recent));
        assert_eq!(store.next_timer().unwrap(), Some(150));
        // A stale entry (as a crash between index and record leaves).
        let stale = DueTimer {
            due: 50,
            key: c.clone(),
        };
        store
            .shared
            .with_db(|db| Ok(db.insert(super::records::timer_key(50, &c), &[])?))
            .unwrap();
        assert_eq!(store.next_timer().unwrap(), Some(50));
        store.remove_timer(&stale).unwrap();
        assert_eq!(store.next_timer().unwrap(), Some(150));
        // Forgetting a conversation drops its timer.
        assert!(store.delete_conversation(&b).unwrap());
        assert_eq!(store.pending_timers(), 1);
        assert_eq!(store.next_timer().unwrap(), Some(400));
        store.flush_blocking().unwrap();
    }
    let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
    assert_eq!(store.pending_timers(), 1);
    assert_eq!(store.health().pending_timers, 1);
    assert_eq!(
        store.due_timers(i64::MAX, 10).unwrap(),
        [DueTimer { due: 400, key: a }]
    );
}

fn run_result(flow: &str, contact: &str, started_at: i64, ended_at: i64) -> RunResult {
    RunResult {
        flow: flow.into(),
        to: "+1555".into(),
        contact: contact.into(),
        started_at,
        ended_at,
        ended: "completed".into(),
        path: vec!["ask".into(), "done".into()],
        vars: [("name".to_owned(), format!("n{ended_at}"))].into(),
        fields: Default::default(),
    }
}

/// Commit `results` with a step of `contact`'s conversation.
fn commit_results(store: &SledStore, contact: &str, sid: &str, results: &[RunResult]) {
    let key = ConvKey::new("+1555", contact);
    let p = processed(results.first().map_or(0, |r| r.ended_at));
    let mut c = commit(&key, None, sid, &p);
    c.results = results;
    store.commit(c).unwrap();
}

fn result_rows_in_sled(store: &SledStore) -> usize {
    result_rows_by_tree(store).iter().sum()
}

/// Results leave sled for their flows' files and read the same from
/// there: one line each, the stored record with its position.
#[test]
fn results_move_to_their_flows_files_and_read_the_same() {
    let (dir, store) = open();
    let a1 = run_result("signup", "+1666", 100, 110);
    let a2 = run_result("signup", "+1777", 100, 120);
    let b = run_result("quiz", "+1666", 200, 210);
    commit_results(&store, "+1666", "SM1", &[a1.clone(), b.clone()]);
    commit_results(&store, "+1777", "SM2", std::slice::from_ref(&a2));
    let before = (
        store.results("signup", 0).unwrap(),
        store.results("quiz", 0).unwrap(),
    );
    assert_eq!(before.0, vec![a1.clone(), a2.clone()]);

    store.move_results().unwrap();
    assert_eq!(result_rows_in_sled(&store), 0);
    assert_eq!(
        (
            store.results("signup", 0).unwrap(),
            store.results("quiz", 0).unwrap()
        ),
        before
    );
    assert_eq!(store.results("signup", 115).unwrap(), vec![a2]);
    let quiz = std::fs::read_to_string(dir.path().join("results/quiz.jsonl")).unwrap();
    assert!(
        quiz.starts_with("{\"v\":1,\"n\":1,\"flow\":\"quiz\""),
        "{quiz}"
    );
    assert_eq!(quiz.lines().count(), 1);
    // And over a reopen.
    drop(store);
    let store = SledStore::open(dir.path(), &StoreConfig::default()).unwrap();
    assert_eq!(store.results("quiz", 0).unwrap(), vec![b]);
}

/// A step handled again (a retry after a crash) writes its run's key
/// again: read once, the last copy, whether the first was moved or not.
#[test]
fn a_run_written_again_is_read_once_and_last() {
    let (dir, store) = open();
    let first = run_result("signup", "+1666", 100, 110);
    commit_results(&store, "+1666", "SM1", std::slice::from_ref(&first));
    store.move_results().unwrap();
    let again = run_result("signup", "+1666", 100, 130);
    commit_results(&store, "+1666", "SM1", std::slice::from_ref(&again));
    assert_eq!(store.results("signup", 0).unwrap(), vec![again.clone()]);
    store.move_results().unwrap();
    assert_eq!(store.results("signup", 0).unwrap(), vec![again.clone()]);
    let file = std::fs::read_to_string(dir.path().join("results/signup.jsonl")).unwrap();
    assert_eq!(file.lines().count(), 2, "{file}");
    // `store copy` reads the same.
    assert_eq!(store.all_results().unwrap(), vec![(again, 0)]);
}

/// Rows in the results' tree and in the default tree.
fn result_rows_by_tree(store: &SledStore) -> [usize; 2] {
    store
        .shared
        .with_trees(|db, tree| {
            Ok(results::trees(db, tree).map(|rows| rows.scan_prefix(results::PREFIX).count()))
        })
        .unwrap()
}

/// Results are written to a tree of their own; rows an older release left
/// in the default tree are still read (a newer copy of a run winning),
/// purged, erased and moved to the files.
#[test]
fn results_left_in_the_default_tree_are_read_purged_erased_and_moved() {
    let (dir, store) = open();
    // As a release before the results' own tree wrote them.
    let old = run_result("signup", "+1666", 1, 5);
    let kept = run_result("signup", "+1777", 2, 50);
    let replaced = run_result("signup", "+1888", 3, 60);
    let forgotten = run_result("quiz", "+1999", 4, 70);
    let rows = results::rows(&[old.clone(), kept.clone(), replaced.clone()])
        .into_iter()
        .chain(results::rows(std::slice::from_ref(&forgotten)));
    store
        .shared
        .with_db(|db| {
            for (k, v) in rows {
                db.insert(k, v)?;
            }
            Ok(())
        })
        .unwrap();
    // `replaced` written again by this release (a step handled again):
    // the same key, third of its commit, in the results' tree.
    let anew = RunResult {
        ended_at: 65,
        ..replaced.clone()
    };
    store
        .shared
        .with_trees(|_, tree| {
            let again = [old.clone(), kept.clone(), anew.clone()];
            for (k, v) in results::rows(&again).into_iter().skip(2) {
                tree.insert(k, v)?;
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(result_rows_by_tree(&store), [4, 1]);
    assert_eq!(
        store.results("signup", 0).unwrap(),
        vec![old.clone(), kept.clone(), anew.clone()]
    );
    assert_eq!(store.results("quiz", 0).unwrap(), vec![forgotten.clone()]);
    assert_eq!(store.all_results().unwrap().len(), 4);

    assert_eq!(store.purge(10).unwrap().results, 1);
    let audit = AuditRecord {
        at: 80,
        scope: "*".into(),
        number: "+1999".into(),
        action: "forget".into(),
        cause: "test".into(),
        message_sid: String::new(),
    };
    assert_eq!(store.forget_contact("+1999", &audit).unwrap().results, 1);
    assert_eq!(result_rows_by_tree(&store), [2, 1]);

    assert_eq!(store.move_results().unwrap(), 3);
    assert_eq!(result_rows_by_tree(&store), [0, 0]);
    assert_eq!(
        store.results("signup", 0).unwrap(),
        vec![kept.clone(), anew.clone()]
    );
    let file = std::fs::read_to_string(dir.path().join("results/signup.jsonl")).unwrap();
    assert_eq!(file.lines().count(), 3, "{file}");
    // New results go to the results' tree only.
    commit_results(
        &store,
        "+1777",
        "SM2",
        &[run_result("signup", "+1777", 90, 95)],
    );
    assert_eq!(result_rows_by_tree(&store), [0, 1]);
}

/// Retention and erasing a contact reach the files; a line that does not
/// decode is said and kept, never dropped.
#[test]
fn retention_and_erasure_reach_the_results_files() {
    let (dir, store) = open();
    commit_results(
        &store,
        "+1666",
        "SM1",
        &[run_result("signup", "+1666", 1, 5)],
    );
    commit_results(
        &store,
        "+1777",
        "SM2",
        &[run_result("signup", "+1777", 1, 50)],
    );
    commit_results(
        &store,
        "+1888",
        "SM3",
        &[run_result("signup", "+1888", 1, 60)],
    );
    store.move_results().unwrap();
    let path = dir.path().join("results/signup.jsonl");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    io::Write::write_all(&mut file, b"{\"v\":99,\"n\":0,\"flow\":\"signup\"}\n").unwrap();

    assert_eq!(store.purge(10).unwrap().results, 1);
    let audit = AuditRecord {
        at: 70,
        scope: "*".into(),
        number: "+1777".into(),
        action: "forget".into(),
        cause: "test".into(),
        message_sid: String::new(),
    };
    assert_eq!(store.forget_contact("+1777", &audit).unwrap().results, 1);
    let left = store.results("signup", 0).unwrap();
    assert_eq!(left, vec![run_result("signup", "+1888", 1, 60)]);
    let file = std::fs::read_to_string(&path).unwrap();
    assert_eq!(file.lines().count(), 2, "{file}");
    assert!(file.contains("\"v\":99"), "{file}");
}

/// An append cut short (a crash, a full disk) leaves part of a line whose
/// rows are still in sled: it is cut off before the next append, and
/// nothing is lost or doubled.
#[test]
fn a_line_cut_short_is_cut_off_before_the_next_move() {
    let (dir, store) = open();
    let one = run_result("signup", "+1666", 1, 10);
    let two = run_result("signup", "+1777", 2, 20);
    commit_results(&store, "+1666", "SM1", std::slice::from_ref(&one));
    store.move_results().unwrap();
    let path = dir.path().join("results/signup.jsonl");
    let whole = std::fs::read(&path).unwrap();
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    io::Write::write_all(&mut file, b"{\"v\":1,\"n\":0,\"flow\":\"sig").unwrap();
    assert_eq!(store.results("signup", 0).unwrap(), vec![one.clone()]);

    commit_results(&store, "+1777", "SM2", std::slice::from_ref(&two));
    store.move_results().unwrap();
    assert_eq!(store.results("signup", 0).unwrap(), vec![one, two]);
    let file = std::fs::read(&path).unwrap();
    assert!(file.starts_with(&whole));
    assert_eq!(file.iter().filter(|b| **b == b'\n').count(), 2);
    assert!(file.ends_with(b"}\n"));
}

/// A file that cannot be written keeps its flow's rows in sled (read as
/// before); another flow's move is not held up.
#[test]
fn a_failed_move_keeps_the_rows_in_sled() {
    let (dir, store) = open();
    // A directory where the file should be: every open fails.
    std::fs::create_dir(dir.path().join("results/signup.jsonl")).unwrap();
    let r = run_result("signup", "+1666", 1, 10);
    let q = run_result("quiz", "+1666", 1, 10);
    commit_results(&store, "+1666", "SM1", &[r.clone(), q.clone()]);
    assert!(store.move_results().is_err());
    assert_eq!(result_rows_in_sled(&store), 1);
    assert_eq!(store.results("quiz", 0).unwrap(), vec![q]);
    // Counted for /metrics (the results thread may have tried too).
    let health = store.health();
    assert!(health.results_move_failures >= 1, "{health:?}");
    assert_eq!(health.results_moved, 1, "{health:?}");

    std::fs::remove_dir(dir.path().join("results/signup.jsonl")).unwrap();
    assert_eq!(store.results("signup", 0).unwrap(), vec![r.clone()]);
    store.move_results().unwrap();
    assert_eq!(result_rows_in_sled(&store), 0);
    assert_eq!(store.results("signup", 0).unwrap(), vec![r]);
    assert_eq!(store.health().results_moved, 2);
}
