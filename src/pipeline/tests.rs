//! Unit tests of the pipeline over a real store.

use super::*;

/// Every gate and the engine give their silence its label, in the
/// answer's outcome and in what the tools read.
#[tokio::test]
async fn each_silence_has_its_label() {
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(flows.join("k.yaml"), "keywords:\n  HI: hello\n").unwrap();
    std::fs::write(
        flows.join("quiet.yaml"),
        "trigger:\n  keywords: [QUIET]\nsteps:\n  one:\n    silence: shh\n",
    )
    .unwrap();
    let set = flow::load_flows(&flows).unwrap().set;
    let store =
        crate::store::SledStore::open(&tmp.path().join("data"), &Default::default()).unwrap();
    let pipeline = Pipeline::new(
        Arc::new(store),
        Arc::new(ArcSwap::from_pointee(set)),
        PipelineOptions {
            loop_max_replies: 1,
            loop_window_secs: 60,
            ..PipelineOptions::default()
        },
        Arc::new(Metrics::default()),
    );
    let mut n = 0;
    let mut send = |from: &str, body: &str, extra: Option<(&str, &str)>| {
        n += 1;
        let mut params = vec![
            ("MessageSid".to_owned(), format!("SM{n:032}")),
            ("From".to_owned(), from.to_owned()),
            ("To".to_owned(), "+15550001111".to_owned()),
            ("Body".to_owned(), body.to_owned()),
        ];
        if let Some((k, v)) = extra {
            params.push((k.to_owned(), v.to_owned()));
        }
        InboundMessage::from_params(params).unwrap()
    };
    let mut outcomes = Vec::new();
    for (from, body, extra) in [
        ("+15551230001", "hi", None),
        ("+15551230001", "hi", None),
        ("+15551230002", "nothing", None),
        ("+15551230002", "quiet", None),
        ("+15551230002", "help", None),
        ("+15551230002", "help", Some(("OptOutType", "HELP"))),
        ("+15551230002", "start", None),
        ("+15551230002", "stop", None),
        ("+15551230002", "hi", None),
        ("+15551230002", "start", None),
    ] {
        let d = pipeline
            .handle_inbound_detailed(&send(from, body, extra), 1_700_000_000)
            .await
            .unwrap();
        let label = d.silence.as_ref().map(Silence::label);
        assert_eq!(
            d.answer.outcome,
            label.map_or("reply".to_owned(), |l| format!("silence:{l}"))
        );
        outcomes.push((
            label,
            d.silence.as_ref().and_then(|s| s.note()).map(str::to_owned),
        ));
    }
    let labels: Vec<_> = outcomes.iter().map(|(l, _)| l.unwrap_or("reply")).collect();
    assert_eq!(
        labels,
        [
            "reply",
            "rate_limited",
            "no_match",
            "flow",
            "help",
            "help_answered_by_twilio",
            "opt_in",
            "opt_out",
            "opted_out",
            "opt_in",
        ]
    );
    assert_eq!(outcomes[3].1.as_deref(), Some("shh"));
}

// ---- Timers -----------------------------------------------------------------

use crate::store::{DueTimer, SledStore, StoreConfig};

/// `GO` asks; YES confirms; no answer within 60 s: "Unconfirmed." and the
/// run ends.
const CONFIRM: &str = r#"
name: appt
trigger: { keywords: [GO] }
steps:
  ask:
    say: "Confirm?"
    wait:
      - yes: true
        say: "Confirmed."
    timeout:
      - after: 60s
        say: "Unconfirmed."
        end: true
"#;

const US: &str = "+15550001111";

fn timer_pipeline(dir: &std::path::Path) -> Pipeline<SledStore> {
    let flows = dir.join("flows");
    std::fs::create_dir_all(&flows).unwrap();
    std::fs::write(flows.join("appt.yaml"), CONFIRM).unwrap();
    let set = flow::load_flows(&flows).unwrap().set;
    let store = SledStore::open(
        &dir.join("data"),
        &StoreConfig {
            // The race is decided in memory, under the lock; fsyncs would
            // only slow the cases down.
            durability: crate::store::Durability::Relaxed,
            ..StoreConfig::default()
        },
    )
    .unwrap();
    Pipeline::new(
        Arc::new(store),
        Arc::new(ArcSwap::from_pointee(set)),
        PipelineOptions::default(),
        Arc::new(Metrics::default()),
    )
}

fn sms(sid: &str, from: &str, body: &str) -> InboundMessage {
    InboundMessage::from_params(vec![
        ("MessageSid".to_owned(), sid.to_owned()),
        ("From".to_owned(), from.to_owned()),
        ("To".to_owned(), US.to_owned()),
        ("Body".to_owned(), body.to_owned()),
    ])
    .unwrap()
}

/// A firing whose outbox entries were written but whose commit was lost
/// (a crash in between) fires again, and its messages count once.
#[tokio::test]
async fn a_firing_repeated_after_a_lost_commit_enqueues_nothing_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let p = timer_pipeline(tmp.path());
    let from = "+15551230001";
    p.handle_inbound(&sms("SM1", from, "go"), 1_000)
        .await
        .unwrap();
    let key = ConvKey::new(US, from);
    let before = p.store().load(&key).unwrap();
    assert_eq!(before.due, Some(1_060));
    let timers = p.store().due_timers(1_060, 10).unwrap();
    assert_eq!(
        timers,
        [DueTimer {
            due: 1_060,
            key: key.clone()
        }]
    );
    let first = p.fire_timer(&timers[0], 1_061).await.unwrap();
    assert!(first.ran);
    assert_eq!(first.enqueued.len(), 1);
    assert_eq!(first.enqueued[0].body, "Unconfirmed.");
    assert_eq!(p.store().load(&key).unwrap().due, None);
    assert_eq!(p.store().pending_timers(), 0);
    // The commit is lost: the record is back as it was before the firing.
    p.store()
        .commit_state(StateCommit {
            key: &key,
            conversation: before.conversation.as_deref(),
            ended: false,
            due: before.due,
            recent: &before.recent,
            at: 1_000,
            results: &[],
        })
        .unwrap();
    let again = p.store().due_timers(2_000, 10).unwrap();
    assert_eq!(again.len(), 1);
    let second = p.fire_timer(&again[0], 2_000).await.unwrap();
    assert!(second.ran);
    assert!(second.enqueued.is_empty(), "{second:?}");
    let outbox = p.store().outbox().unwrap();
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].key, first.enqueued[0].key);
    // A stale index entry (the record's due time moved) is removed.
    p.handle_inbound(&sms("SM2", from, "go"), 3_000)
        .await
        .unwrap();
    let stale = DueTimer {
        due: 2_999,
        key: key.clone(),
    };
    let fired = p.fire_timer(&stale, 3_001).await.unwrap();
    assert!(!fired.ran);
    assert_eq!(p.store().next_timer().unwrap(), Some(3_060));
}

/// What one sender's race did.
#[derive(Debug, Clone, Copy)]
enum Op {
    Reply { yields: u8, at: i64 },
    Fire { yields: u8, at: i64 },
}

mod race {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        let reply = (0u8..6, 0i64..30).prop_map(|(yields, at)| Op::Reply {
            yields,
            at: 1_060 + at,
        });
        let fire = (0u8..6, 0i64..30).prop_map(|(yields, at)| Op::Fire {
            yields,
            at: 1_060 + at,
        });
        // One reply and one or two firings of the same timer (a second
        // scheduler, a restart), in a random order.
        (
            reply,
            prop::collection::vec(fire, 1..=2),
            any::<prop::sample::Index>(),
        )
            .prop_map(|(reply, fires, at)| {
                let mut ops = fires;
                let i = at.index(ops.len() + 1);
                ops.insert(i, reply);
                ops
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// A reply and its conversation's due timer, racing through the
        /// real pipeline on a multi-threaded runtime: for every sender,
        /// exactly one of "the reply's route" (Confirmed., nothing in the
        /// outbox) or "the timeout" (one Unconfirmed. in the outbox, and
        /// the reply finds no waiting run) happened.
        #[test]
        fn a_reply_and_its_timer_never_both_run(
            senders in prop::collection::vec(ops(), 1..4)
        ) {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(3)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let tmp = tempfile::tempdir().unwrap();
                let p = Arc::new(timer_pipeline(tmp.path()));
                for i in 0..senders.len() {
                    let from = format!("+1555123{i:04}");
                    p.handle_inbound(&sms(&format!("SM{:032x}", i), &from, "go"), 1_000)
                        .await
                        .unwrap();
                }
                let timers = p.store().due_timers(1_060, 100).unwrap();
                assert_eq!(timers.len(), senders.len());
                let mut tasks = tokio::task::JoinSet::new();
                for (i, ops) in senders.iter().enumerate() {
                    let from = format!("+1555123{i:04}");
                    let timer = timers
                        .iter()
                        .find(|t| t.key.from == from)
                        .unwrap()
                        .clone();
                    for op in ops.iter().copied() {
                        let (p, from, timer) = (p.clone(), from.clone(), timer.clone());
                        let i = i as u64;
                        tasks.spawn(async move {
                            let (Op::Reply { yields, .. } | Op::Fire { yields, .. }) = op;
                            for _ in 0..yields {
                                tokio::task::yield_now().await;
                            }
                            match op {
                                Op::Reply { at, .. } => {
                                    let d = p
                                        .handle_inbound_detailed(&sms(&format!("SM{:032x}", 1000 + i), &from, "yes"), at)
                                        .await
                                        .unwrap();
                                    (from, Some(d.replies.iter().map(|r| r.body.clone()).collect::<Vec<_>>()))
                                }
                                Op::Fire { at, .. } => {
                                    p.fire_timer(&timer, at).await.unwrap();
                                    (from, None)
                                }
                            }
                        });
                    }
                }
                let mut replied: BTreeMap<String, Vec<String>> = BTreeMap::new();
                while let Some(done) = tasks.join_next().await {
                    if let (from, Some(bodies)) = done.unwrap() {
                        replied.insert(from, bodies);
                    }
                }
                let outbox = p.store().outbox().unwrap();
                for i in 0..senders.len() {
                    let from = format!("+1555123{i:04}");
                    let sent: Vec<&str> = outbox
                        .iter()
                        .filter(|e| e.to == from)
                        .map(|e| e.body.as_str())
                        .collect();
                    let route = replied[&from] == ["Confirmed."];
                    let timeout = sent == ["Unconfirmed."];
                    assert!(
                        route != timeout,
                        "{from}: reply got {:?}, outbox {sent:?}",
                        replied[&from]
                    );
                    if timeout {
                        assert!(replied[&from].is_empty(), "{:?}", replied[&from]);
                    } else {
                        assert!(sent.is_empty(), "{sent:?}");
                    }
                    let conv = p.store().load(&ConvKey::new(US, &from)).unwrap();
                    assert_eq!(conv.due, None);
                }
                assert_eq!(p.store().pending_timers(), 0);
                assert_eq!(p.store().next_timer().unwrap(), None);
            });
        }
    }
}

/// A conversation with no run but a start queued is not "ended": stored
/// as ended, a purge could remove the queued start with it.
#[tokio::test]
async fn a_queued_start_keeps_its_conversation_from_the_purge() {
    let tmp = tempfile::tempdir().unwrap();
    let pipeline = timer_pipeline(tmp.path());
    let key = ConvKey::new(US, "+15551239876");
    let waiting = flow::Conversation {
        queued: vec![flow::QueuedStart {
            flow: "appt".to_owned(),
            key: "queued-1".to_owned(),
            fields: Default::default(),
            vars: Default::default(),
            messaging_service_sid: None,
            at: 1_000,
        }],
        ..Default::default()
    };
    pipeline
        .store
        .put_conversation(&key, &waiting.to_stored(), false, 1_000)
        .unwrap();
    // An import touches the conversation (and rewrites its record) while
    // the start still waits.
    let row = crate::contacts::ContactRow {
        line: 2,
        phone: "+15551239876".to_owned(),
        fields: [("name".to_owned(), "Ada".to_owned())].into(),
    };
    pipeline.import_contacts(US, &[row], 1_000).await.unwrap();
    pipeline.store.purge(2_000).unwrap();
    let kept = pipeline.store.conversation(&key).unwrap();
    assert!(kept.is_some(), "the queued start was purged");
}

/// The decoded conversations the pipeline keeps (`memo.rs`) never stand
/// in for what the store holds: a conversation rewritten behind its back
/// (another instance, an import) is read as stored.
#[tokio::test]
async fn a_conversation_rewritten_in_the_store_is_read_as_stored() {
    const SIGNUP: &str = r#"
name: signup
trigger:
  keywords: [JOIN]
steps:
  ask_name:
    say: "Name?"
    wait:
      - anything: true
        save: name
        goto: ask_age
  ask_age:
    say: "Thanks {{name}}! Age?"
    wait:
      - anything: true
        save: age
        goto: done
  done:
    say: "All set, {{name}} ({{age}})."
"#;
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir_all(&flows).unwrap();
    std::fs::write(flows.join("signup.yaml"), SIGNUP).unwrap();
    let set = flow::load_flows(&flows).unwrap().set;
    let store = SledStore::open(&tmp.path().join("data"), &StoreConfig::default()).unwrap();
    let pipeline = Pipeline::new(
        Arc::new(store),
        Arc::new(ArcSwap::from_pointee(set)),
        PipelineOptions::default(),
        Arc::new(Metrics::default()),
    );
    let from = "+15551230077";
    let key = ConvKey::new(US, from);
    let say = |n: usize, body: &'static str| {
        let pipeline = &pipeline;
        async move {
            let sid = format!("SM{n:032}");
            let msg = sms(&sid, from, body);
            let answer = pipeline.handle_inbound(&msg, 1_000 + n as i64).await;
            answer.unwrap().twiml
        }
    };
    // Twice over: once as this process left it, once rewritten.
    for (round, rewrite) in [(0, None), (1, Some("Bea"))] {
        let n = 10 * round;
        assert!(say(n + 1, "JOIN").await.contains("Name?"));
        assert!(say(n + 2, "Ana").await.contains("Thanks Ana!"));
        let want = match rewrite {
            None => "All set, Ana (30).",
            Some(name) => {
                let stored = pipeline.store.conversation(&key).unwrap().unwrap();
                let mut conversation = flow::Conversation::from_stored(&stored).unwrap();
                let run = conversation.run.as_mut().unwrap();
                run.vars.insert("name".to_owned(), name.to_owned());
                pipeline
                    .store
                    .put_conversation(&key, &conversation.to_stored(), false, 1_000)
                    .unwrap();
                "All set, Bea (30)."
            }
        };
        let twiml = say(n + 3, "30").await;
        assert!(twiml.contains(want), "{twiml}");
    }
}
