//! Golden records: the stored format is a contract.
//!
//! `golden/v0/` holds records exactly as the release before record versions
//! wrote them (a signup conversation waiting at `ask_age`, a sender who
//! texted STOP, a delivery status and its event, the consent state and its
//! audit record, the message log). `golden/v1/` holds the same records as
//! the first versioned release wrote them, `golden/v2/` as the next
//! (version 2: the conversation record's header holds its next timer's
//! due time, and the conversation's run its timer fields), and
//! `golden/v3/` as the one after (the conversation at version 3: its run
//! keeps its path of steps; message log lines at version 2: they may hold
//! texts), and `golden/v4/` as this release writes them (the conversation
//! record's layout at version 3: its recent answers' TwiML without the
//! constant parts; the other records as in `golden/v3/`; kinds added
//! later, such as flow results, start at version 1 in `golden/v1/`).
//! Every version's records must
//! keep decoding to the same values, and this release must write the
//! current version byte for byte. A format change is a new version: see "Format versions" in the
//! store's module doc. `SMSFLOW_WRITE_GOLDEN=1 cargo test --lib golden`
//! writes the files of a new version that are missing; it never overwrites.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::message_log::{LogLine, LogLineRef};
use super::records::{
    conv_due, conv_header, conv_value, decode, decode_conv, encode, prefixed, timer_key, two_part,
};
use super::records::{ENDED, HAS_CONVERSATION, HAS_DUE};
use super::*;
use crate::flow::{Conversation, Run};
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, PipelineOptions};
use crate::twilio::{InboundMessage, SILENCE};

const US: &str = "+15550001111";
const ANA: &str = "+15551230001";
const STOPPED: &str = "+15551230002";

fn sid(n: u32) -> String {
    format!("SM{n:032x}")
}

fn dir(version: u32) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("src/store/golden/v{version}"))
}

fn read(version: u32, name: &str) -> Vec<u8> {
    let path = dir(version).join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What the golden records hold, whatever their version.
fn ana() -> Conversation {
    Conversation {
        contact: BTreeMap::from([("name".to_owned(), "Ana".to_owned())]),
        run: Some(Run {
            flow: "signup".into(),
            step: "ask_age".into(),
            vars: BTreeMap::from([("name".to_owned(), "Ana".to_owned())]),
            retries: 1,
            started_at: 1_700_000_000,
            last_active: 1_700_000_002,
            waiting_since: 1_700_000_002,
            timeouts_fired: 0,
            wakes: BTreeMap::new(),
            path: vec!["ask_age".into()],
        }),
        queued: Vec::new(),
    }
}

fn twiml(body: &str) -> String {
    format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Message><Body>{body}</Body></Message></Response>")
}

fn delivery_status() -> DeliveryStatus {
    DeliveryStatus {
        status: "delivered".into(),
        rank: 5,
        error_code: None,
        to: Some(ANA.into()),
        from: Some(US.into()),
        updated_at: 1_700_000_200,
        inbound_sid: Some(sid(3)),
        flow: Some("signup".into()),
        step: Some("ask_age".into()),
    }
}

fn status_event() -> StatusEvent {
    StatusEvent {
        status: "delivered".into(),
        error_code: None,
        at: 1_700_000_200,
    }
}

fn opt_out() -> OptOut {
    OptOut {
        opted_out: true,
        at: 1_700_000_100,
    }
}

fn audit() -> AuditRecord {
    AuditRecord {
        at: 1_700_000_100,
        scope: US.into(),
        number: STOPPED.into(),
        action: "opt_out".into(),
        cause: "STOP".into(),
        message_sid: sid(10),
    }
}

/// The message log: (sid, at, from, step, outcome); the flow is signup
/// wherever there is a step.
fn log_lines() -> Vec<(
    String,
    i64,
    &'static str,
    Option<&'static str>,
    &'static str,
)> {
    vec![
        (sid(1), 1_700_000_000, ANA, Some("ask_name"), "reply"),
        (sid(2), 1_700_000_001, ANA, Some("ask_age"), "reply"),
        (sid(3), 1_700_000_002, ANA, Some("ask_age"), "reply"),
        (sid(10), 1_700_000_100, STOPPED, None, "silence:opt_out"),
    ]
}

/// When Ana's conversation's timer is due in version 2 records (a timeout
/// two hours after the step started waiting); earlier versions had none.
const DUE: i64 = 1_700_007_202;

/// The timer of Ana's conversation in a record of `version`.
fn due_in(version: u32) -> Option<i64> {
    (version >= 2).then_some(DUE)
}

/// Every golden record of `version` decodes to what it holds.
fn check_decodes(version: u32) {
    let at = |name| format!("v{version}/{name}");

    let v = read(version, "conversation.bin");
    let flags = if version >= 2 {
        HAS_CONVERSATION | HAS_DUE
    } else {
        HAS_CONVERSATION
    };
    assert_eq!(conv_header(&v), Some((1_700_000_002, flags)));
    assert_eq!(conv_due(&v), due_in(version));
    let stored = decode_conv(&v).unwrap_or_else(|e| panic!("{}: {e}", at("conversation.bin")));
    assert_eq!(stored.due, due_in(version));
    let conv = Conversation::from_stored(stored.conversation.as_deref().unwrap()).unwrap();
    assert_eq!(conv, ana(), "{}", at("conversation.bin"));
    assert_eq!(stored.recent.len(), 3);
    let answers = [
        "Hi! What's your name?",
        "Thanks Ana! How old are you?",
        "Please send your age as a number, like 34.",
    ];
    for (n, body) in (1..).zip(answers) {
        let a = stored.answer_to(&sid(n)).expect("recorded answer");
        assert_eq!((a.twiml, a.outcome.as_str()), (twiml(body), "reply"));
        assert_eq!(a.at, 1_699_999_999 + i64::from(n));
    }

    let v = read(version, "conversation_opted_out.bin");
    assert_eq!(conv_header(&v), Some((1_700_000_100, ENDED)));
    let stored = decode_conv(&v).unwrap();
    assert_eq!(stored.conversation, None);
    assert_eq!(stored.due, None);
    let a = stored.answer_to(&sid(10)).unwrap();
    assert_eq!(
        (a.twiml.as_str(), a.outcome.as_str()),
        (SILENCE, "silence:opt_out")
    );

    let json = |name: &str| read(version, name);
    assert_eq!(
        decode::<DeliveryStatus>(&json("delivery_status.json")),
        Ok(delivery_status())
    );
    assert_eq!(
        decode::<StatusEvent>(&json("status_event.json")),
        Ok(status_event())
    );
    assert_eq!(decode::<OptOut>(&json("opt_out.json")), Ok(opt_out()));
    assert_eq!(decode::<AuditRecord>(&json("audit.json")), Ok(audit()));

    let log = json("messages.jsonl");
    let lines: Vec<LogLine> = log
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| decode(l).unwrap())
        .collect();
    let got: Vec<_> = lines
        .iter()
        .map(|l| {
            (
                l.sid.clone(),
                l.at,
                l.from.as_str(),
                l.step.as_deref(),
                l.outcome.as_str(),
            )
        })
        .collect();
    assert_eq!(got, log_lines(), "{}", at("messages.jsonl"));
    for l in &lines {
        assert_eq!(l.flow.as_deref(), l.step.as_ref().map(|_| "signup"));
    }
    assert!(lines.iter().all(|l| l.to == US));
}

#[test]
fn records_written_before_versions_still_decode() {
    check_decodes(0);
}

#[test]
fn version_1_records_decode() {
    check_decodes(1);
    // Version 1 is version 0 behind a version byte, and JSON records gain
    // `"v":1` first.
    assert_eq!(read(1, "conversation_opted_out.bin")[0], 1);
    assert_eq!(
        read(1, "conversation_opted_out.bin")[1..],
        read(0, "conversation_opted_out.bin")[..]
    );
    assert!(read(1, "opt_out.json").starts_with(b"{\"v\":1,"));
}

#[test]
fn version_2_records_decode() {
    check_decodes(2);
}

#[test]
fn version_3_records_decode() {
    check_decodes(3);
}

#[test]
fn version_4_records_decode() {
    check_decodes(4);
}

/// The recent answers of a golden conversation record, encoded by this
/// release (answer by answer, as commits write them).
fn reencoded(stored: &StoredConversation, sids: &[u32]) -> RecentAnswers {
    sids.iter().fold(RecentAnswers::default(), |recent, n| {
        recent.keep_with(&stored.answer_to(&sid(*n)).expect("golden answer"))
    })
}

/// The bytes this release writes for the golden values: the current
/// version, exactly. A test failing here means the format changed: give
/// it a new version instead (see the store's module doc).
#[test]
fn this_release_writes_version_4_exactly() {
    let v0 = decode_conv(&read(0, "conversation.bin")).unwrap();
    let conversation = Conversation::from_stored(v0.conversation.as_deref().unwrap()).unwrap();
    let stopped = decode_conv(&read(0, "conversation_opted_out.bin")).unwrap();
    let mut log = Vec::new();
    for (s, at, from, step, outcome) in log_lines() {
        // Written as the store writes each line.
        log.extend(
            LogLineRef {
                sid: &s,
                at,
                from,
                to: US,
                outcome,
                flow: step.map(|_| "signup"),
                step,
                body: None,
                replies: &[],
            }
            .bytes(),
        );
    }
    let written: [(&str, Vec<u8>); 7] = [
        (
            "conversation.bin",
            conv_value(
                1_700_000_002,
                false,
                Some(&conversation.to_stored()),
                Some(DUE),
                &reencoded(&v0, &[1, 2, 3]),
            ),
        ),
        (
            "conversation_opted_out.bin",
            conv_value(1_700_000_100, true, None, None, &reencoded(&stopped, &[10])),
        ),
        ("delivery_status.json", encode(&delivery_status())),
        ("status_event.json", encode(&status_event())),
        ("opt_out.json", encode(&opt_out())),
        ("audit.json", encode(&audit())),
        ("messages.jsonl", log),
    ];
    let write = std::env::var_os("SMSFLOW_WRITE_GOLDEN").is_some();
    for (name, bytes) in written {
        let path = dir(4).join(name);
        if write && !path.exists() {
            std::fs::create_dir_all(dir(4)).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        assert_eq!(
            read(4, name),
            bytes,
            "v4/{name}: this release no longer writes version 4 as committed"
        );
    }
    // The JSON records other than the conversation and the message log
    // lines are still version 1, those two as in v3; the conversation
    // record's layout is at version 3, and smaller: each answer's TwiML
    // lost its 59 constant bytes (38 for a silence).
    assert_eq!(read(4, "opt_out.json"), read(1, "opt_out.json"));
    assert_eq!(read(4, "messages.jsonl"), read(3, "messages.jsonl"));
    assert!(read(3, "conversation.bin")[0] == 2);
    assert!(read(4, "conversation.bin")[0] == 3);
    assert_eq!(
        read(3, "conversation.bin").len() - read(4, "conversation.bin").len(),
        3 * 59
    );
    assert_eq!(
        read(3, "conversation_opted_out.bin").len() - read(4, "conversation_opted_out.bin").len(),
        38
    );
}

#[test]
fn keys_are_part_of_the_format() {
    assert_eq!(
        ConvKey::new(US, ANA).db_key(),
        b"c\0+15550001111\0+15551230001"
    );
    assert_eq!(
        prefixed(b"s\0", &sid(100)),
        b"s\0SM00000000000000000000000000000064"
    );
    assert_eq!(
        two_part(b"o\0", US, STOPPED),
        b"o\0+15550001111\0+15551230002"
    );
    assert_eq!(
        timer_key(0x0102, &ConvKey::new(US, ANA)),
        b"t\0\0\0\0\0\0\0\x01\x02+15550001111\0+15551230001"
    );
}

/// Records from a newer release are errors (the store keeps them aside),
/// never read as empty.
#[test]
fn newer_records_do_not_decode() {
    let mut v = read(2, "conversation.bin");
    v[0] = 4;
    assert!(decode_conv(&v).is_err());
    assert!(Conversation::from_stored(br#"{"v":4,"contact":{},"run":null}"#).is_err());
    assert!(decode::<OptOut>(br#"{"v":2,"opted_out":true,"at":1}"#).is_err());
}

/// A data directory holding the previous release's records, opened by
/// this one: the conversation goes on where it stopped, a retry is
/// answered as it was, consent and delivery records are read.
#[tokio::test]
async fn a_store_written_before_versions_keeps_working() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    {
        let db = sled::open(&data).unwrap();
        let mut audit_key = b"a\0".to_vec();
        audit_key.extend_from_slice(&1_700_000_100_i64.to_be_bytes());
        audit_key.extend_from_slice(&0_u64.to_be_bytes());
        let mut event_key = two_part(b"l\0", &sid(100), "");
        event_key.extend_from_slice(&1_u64.to_be_bytes());
        let records: [(Vec<u8>, &str); 6] = [
            (ConvKey::new(US, ANA).db_key(), "conversation.bin"),
            (
                ConvKey::new(US, STOPPED).db_key(),
                "conversation_opted_out.bin",
            ),
            (prefixed(b"s\0", &sid(100)), "delivery_status.json"),
            (event_key, "status_event.json"),
            (two_part(b"o\0", US, STOPPED), "opt_out.json"),
            (audit_key, "audit.json"),
        ];
        for (key, name) in records {
            db.insert(key, read(0, name)).unwrap();
        }
        db.flush().unwrap();
    }
    std::fs::write(data.join("messages.jsonl"), read(0, "messages.jsonl")).unwrap();

    let store = Arc::new(SledStore::open(&data, &StoreConfig::default()).unwrap());
    assert_eq!(store.conversation_count(), 1);
    let flows = Path::new(env!("CARGO_MANIFEST_DIR")).join("flows");
    let set = crate::flow::load_flows(&flows).unwrap().set;
    let pipeline = Pipeline::new(
        store.clone(),
        Arc::new(ArcSwap::from_pointee(set)),
        PipelineOptions::default(),
        Arc::new(Metrics::default()),
    );
    let send = |n: u32, from: &str, body: &str| {
        InboundMessage::from_params(vec![
            ("MessageSid".into(), sid(n)),
            ("From".into(), from.into()),
            ("To".into(), US.into()),
            ("Body".into(), body.into()),
        ])
        .unwrap()
    };
    let now = 1_700_000_300;
    // A retry of the last message gets the answer recorded then.
    let retry = pipeline
        .handle_inbound(&send(3, ANA, "abc"), now)
        .await
        .unwrap();
    assert!(retry.duplicate);
    assert_eq!(
        retry.twiml,
        twiml("Please send your age as a number, like 34.")
    );
    // The conversation waits at ask_age with Ana's name.
    let answer = pipeline
        .handle_inbound(&send(4, ANA, "34"), now)
        .await
        .unwrap();
    assert_eq!(answer.twiml, twiml("You're signed up, Ana."));
    // The run that ended has its result, with the path its old record
    // is known to have taken (it waited at ask_age).
    let results = store.results("signup", 0).unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].ended, "completed");
    assert_eq!(results[0].path, ["ask_age", "done"]);
    assert_eq!(results[0].vars["name"], "Ana");
    assert_eq!(results[0].vars["age"], "34");
    assert_eq!(results[0].fields["member"], "yes");
    // Written back in the current version.
    let raw = store.load(&ConvKey::new(US, ANA)).unwrap();
    let conv = Conversation::from_stored(raw.conversation.as_deref().unwrap()).unwrap();
    assert_eq!(conv.contact["member"], "yes");
    // The sender who texted STOP is still opted out.
    let answer = pipeline
        .handle_inbound(&send(11, STOPPED, "hi"), now)
        .await
        .unwrap();
    assert_eq!(answer.outcome, "silence:opted_out");
    assert_eq!(store.opt_out(US, STOPPED).unwrap(), Some(opt_out()));
    assert_eq!(store.audit_log().unwrap(), vec![audit()]);
    assert_eq!(
        store.delivery_status(&sid(100)).unwrap(),
        Some(delivery_status())
    );
    assert_eq!(
        store.status_events(&sid(100)).unwrap(),
        vec![status_event()]
    );
    let log = store.inbound_log().unwrap();
    assert_eq!(log.len(), 6);
    assert!(log
        .iter()
        .any(|(s, p)| *s == sid(1) && p.outcome == "reply"));
    assert_eq!(store.health().quarantined, 0);
}

/// The outbox entries the golden files hold: one waiting, one sent.
fn outbox_entries() -> [(&'static str, OutboxEntry); 2] {
    let pending = OutboxEntry {
        key: "timeout:+15550001111:+15551230001:appointment/confirm:0:1700000000:0".into(),
        to: ANA.into(),
        from: US.into(),
        messaging_service_sid: None,
        body: "Still there? Reply YES to confirm Tuesday 3pm.".into(),
        media: Vec::new(),
        cause: "timeout".into(),
        flow: Some("appointment".into()),
        step: Some("confirm".into()),
        created_at: 1_700_000_000,
        due_at: 1_700_007_200,
        state: OutboxState::Pending {
            not_before: 1_700_007_200,
            attempts: 0,
        },
    };
    let sent = OutboxEntry {
        messaging_service_sid: Some("MG00000000000000000000000000000001".into()),
        media: vec!["https://example.com/map.png".into()],
        state: OutboxState::Sent {
            sid: sid(20),
            at: 1_700_007_201,
        },
        ..pending.clone()
    };
    [
        ("outbox_entry.json", pending),
        ("outbox_entry_sent.json", sent),
    ]
}

/// Outbox entries of version 1 decode, and this release writes them byte
/// for byte (`SMSFLOW_WRITE_GOLDEN=1` writes missing files).
#[test]
fn outbox_entries_of_version_1_decode_and_are_written_exactly() {
    let write = std::env::var_os("SMSFLOW_WRITE_GOLDEN").is_some();
    for (name, entry) in outbox_entries() {
        let path = dir(1).join(name);
        if write && !path.exists() {
            std::fs::write(&path, encode(&entry)).unwrap();
        }
        assert_eq!(decode::<OutboxEntry>(&read(1, name)), Ok(entry.clone()));
        assert_eq!(
            read(1, name),
            encode(&entry),
            "v1/{name}: this release no longer writes version 1 as committed"
        );
    }
    assert_eq!(
        super::outbox::db_key("k"),
        b"x\0k",
        "outbox keys are part of the format"
    );
    assert_eq!(
        super::outbox::due_key(1, "k"),
        b"y\0\0\0\0\0\0\0\0\x01k",
        "the due index's keys are part of the format"
    );
}

/// Call jobs of version 1 (one pending with a secret header, one
/// delivered) decode, and this release writes them byte for byte
/// (`SMSFLOW_WRITE_GOLDEN=1` writes missing files).
#[test]
fn call_jobs_of_version_1_decode_and_are_written_exactly() {
    use crate::flow::calls::HeaderValue;
    let pending = CallJob {
        key: format!("msg:{}:pizza:send:0", sid(30)),
        method: "POST".into(),
        url: "https://shop.example/orders".into(),
        headers: vec![
            (
                "Authorization".into(),
                HeaderValue::Secret("SHOP_TOKEN".into()),
            ),
            ("X-Source".into(), HeaderValue::Text("smsflow".into())),
        ],
        body: Some(("application/json".into(), r#"{"item":"pizza"}"#.into())),
        timeout_ms: 5000,
        flow: "pizza".into(),
        step: "send".into(),
        created_at: 1_700_000_000,
        state: CallJobState::Pending {
            not_before: 1_700_000_002,
            attempts: 1,
        },
    };
    let delivered = CallJob {
        body: None,
        state: CallJobState::Delivered {
            status: 201,
            attempts: 2,
            at: 1_700_000_003,
        },
        ..pending.clone()
    };
    let write = std::env::var_os("SMSFLOW_WRITE_GOLDEN").is_some();
    for (name, job) in [
        ("call_job.json", pending),
        ("call_job_delivered.json", delivered),
    ] {
        let path = dir(1).join(name);
        if write && !path.exists() {
            std::fs::write(&path, encode(&job)).unwrap();
        }
        assert_eq!(decode::<CallJob>(&read(1, name)), Ok(job.clone()));
        assert_eq!(
            read(1, name),
            encode(&job),
            "v1/{name}: this release no longer writes version 1 as committed"
        );
    }
    assert_eq!(
        super::call_jobs::db_key("k"),
        b"h\0k",
        "call job keys are part of the format"
    );
    assert_eq!(
        super::call_jobs::due_key(1, "k"),
        b"i\0\0\0\0\0\0\0\0\x01k",
        "the due index's keys are part of the format"
    );
}

/// A flow start record of version 1 decodes, and this release writes it
/// byte for byte (`SMSFLOW_WRITE_GOLDEN=1` writes it when missing).
#[test]
fn start_records_of_version_1_decode_and_are_written_exactly() {
    let record = StartRecord {
        key: "appt-2026-12-01-ana".into(),
        result: "started".into(),
        flow: "appointment".into(),
        to: ANA.into(),
        from: US.into(),
        messaging_service_sid: None,
        busy_with: Some("survey".into()),
        outbox: vec!["start:appt-2026-12-01-ana:0".into()],
        at: 1_700_007_200,
    };
    let name = "start_record.json";
    let path = dir(1).join(name);
    if std::env::var_os("SMSFLOW_WRITE_GOLDEN").is_some() && !path.exists() {
        std::fs::write(&path, encode(&record)).unwrap();
    }
    assert_eq!(decode::<StartRecord>(&read(1, name)), Ok(record.clone()));
    assert_eq!(
        read(1, name),
        encode(&record),
        "v1/{name}: this release no longer writes version 1 as committed"
    );
    assert_eq!(
        super::starts::db_key("k"),
        b"f\0k",
        "start record keys are part of the format"
    );
}

/// A flow result of version 1 decodes, and this release writes it byte
/// for byte (`SMSFLOW_WRITE_GOLDEN=1` writes it when missing).
#[test]
fn run_results_of_version_1_decode_and_are_written_exactly() {
    let result = RunResult {
        flow: "signup".into(),
        to: US.into(),
        contact: ANA.into(),
        started_at: 1_700_000_000,
        ended_at: 1_700_000_300,
        ended: "completed".into(),
        path: vec!["ask_name".into(), "ask_age".into(), "done".into()],
        vars: BTreeMap::from([
            ("name".to_owned(), "Ana".to_owned()),
            ("age".to_owned(), "34".to_owned()),
        ]),
        fields: BTreeMap::from([
            ("name".to_owned(), "Ana".to_owned()),
            ("member".to_owned(), "yes".to_owned()),
        ]),
    };
    let name = "run_result.json";
    let path = dir(1).join(name);
    if std::env::var_os("SMSFLOW_WRITE_GOLDEN").is_some() && !path.exists() {
        std::fs::write(&path, encode(&result)).unwrap();
    }
    assert_eq!(decode::<RunResult>(&read(1, name)), Ok(result.clone()));
    assert_eq!(
        read(1, name),
        encode(&result),
        "v1/{name}: this release no longer writes version 1 as committed"
    );
    let mut key = b"r\0signup\0".to_vec();
    key.extend_from_slice(&1_700_000_000_u64.to_be_bytes());
    key.extend_from_slice(format!("{US}\0{ANA}\0").as_bytes());
    key.extend_from_slice(&[0, 1]);
    assert_eq!(
        super::results::db_key(&result, 1),
        key,
        "result keys are part of the format"
    );
}
