//! Flow results survive SIGKILL while they move from the database to
//! their files: every run whose last step was acknowledged is exported
//! exactly once after the restart, and a run that was only in flight at
//! most once. A result is made durable just before its step (README,
//! "Flow results"), so a kill between the two keeps an in-flight answer's
//! result without its step: the run is still waiting, and the sender's
//! next message ends it again, its result replacing the kept one.
//!
//! The flow `poll` asks a question and ends on the answer, so every
//! second message of a sender ends a run; the answer carries a number
//! unique to its sender (`a7`), saved as the run's variable. A run is
//! named by its start second, so a sender starts at most one run a
//! second (like a person). The store moves results to their files about
//! once a second, so rounds of a few seconds kill the server before,
//! during and after moves. Bounded by counts: each round ends at its
//! N-th acknowledged answer, each sender sends at most `RUNS` runs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::crash::start;
use crate::helpers::*;
use crate::process::ChildServer;

const SENDERS: usize = 24;
/// Most runs one sender goes through in a round.
const RUNS: usize = 6;
/// The round's server is killed at this many acknowledged answers.
const KILL_AT: [usize; 3] = [40, 70, 55];

const FLOW: &str = "name: poll
trigger:
  keywords: [POLL]
steps:
  ask:
    say: \"Your answer?\"
    wait:
      - anything: true
        save: answer
        goto: done
  done:
    say: \"Thanks.\"
";

fn phone(i: usize) -> String {
    format!("+1555710{i:04}")
}

/// What the client knows about one sender's answers.
#[derive(Debug, Clone, Default)]
struct Known {
    /// Answers acknowledged with the run's last reply.
    acked: BTreeSet<String>,
    /// An answer sent and not answered (the kill): its run may be stored.
    in_flight: Option<String>,
    /// In-flight answers whose result was found after the restart: kept
    /// until the run, if its step was lost, ends again and replaces it.
    kept: BTreeSet<String>,
    /// Answers sent so far (numbers them).
    sent: usize,
}

#[derive(Default)]
struct Round {
    acks: AtomicUsize,
    stop: AtomicBool,
    killed: AtomicBool,
}

async fn drive(
    server: Arc<ChildServer>,
    i: usize,
    mut known: Known,
    round: Arc<Round>,
    at: usize,
) -> Known {
    for _ in 0..RUNS {
        if round.stop.load(Ordering::SeqCst) {
            break;
        }
        // One run start a second per sender: its runs have distinct names.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        tokio::time::sleep(Duration::from_nanos(
            1_000_000_000 - u64::from(now.subsec_nanos()) + 5_000_000,
        ))
        .await;
        let failed = |e: reqwest::Error, round: &Round| {
            assert!(
                round.killed.load(Ordering::SeqCst),
                "sender {i} failed before the kill: {e}"
            );
        };
        // "POLL pK" starts a run, or is the answer of a run a kill
        // left waiting (and ends it).
        known.sent += 1;
        let poll = format!("POLL p{}", known.sent);
        match server.send(&phone(i), &poll, &new_sid()).await {
            Ok(twiml) if bodies(&twiml) == ["Thanks."] => {
                known.acked.insert(poll);
                continue;
            }
            Ok(twiml) => assert_eq!(bodies(&twiml), ["Your answer?"], "sender {i}"),
            Err(e) => {
                failed(e, &round);
                known.in_flight = Some(poll);
                break;
            }
        }
        known.sent += 1;
        let answer = format!("a{}", known.sent);
        match server.send(&phone(i), &answer, &new_sid()).await {
            Ok(twiml) => {
                assert_eq!(bodies(&twiml), ["Thanks."], "sender {i}");
                known.acked.insert(answer);
                if round.acks.fetch_add(1, Ordering::SeqCst) + 1 == at {
                    round.stop.store(true, Ordering::SeqCst);
                    round.killed.store(true, Ordering::SeqCst);
                    server.signal("KILL");
                }
            }
            Err(e) => {
                failed(e, &round);
                known.in_flight = Some(answer);
                break;
            }
        }
    }
    known
}

/// Each sender's exported answers (completed runs), in export order.
async fn exported(server: &ChildServer) -> BTreeMap<String, Vec<String>> {
    let reply = server
        .client
        .get(format!(
            "http://{}/flows/poll/results?format=jsonl",
            server.addr
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("export answered");
    assert_eq!(reply.status(), 200);
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in reply.text().await.unwrap().lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        // A run a kill left waiting ends when that sender's next POLL
        // interrupts it: no answer to count.
        if r["ended"] != "completed" {
            continue;
        }
        out.entry(r["contact"].as_str().unwrap().to_owned())
            .or_default()
            .push(r["vars"]["answer"].as_str().unwrap().to_owned());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flow_results_survive_sigkill_while_they_move_to_their_files() {
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(flows.join("poll.yaml"), FLOW).unwrap();
    let data = tmp.path().join("data");

    let mut known = vec![Known::default(); SENDERS];
    let mut server = Arc::new(start(&flows, &data));
    for (n, &at) in KILL_AT.iter().enumerate() {
        let round = Arc::new(Round::default());
        let tasks: Vec<_> = known
            .iter()
            .enumerate()
            .map(|(i, k)| tokio::spawn(drive(server.clone(), i, k.clone(), round.clone(), at)))
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            known[i] = t.await.expect("sender task");
        }
        assert!(round.killed.load(Ordering::SeqCst), "round {n}: no kill");
        let mut old = Arc::try_unwrap(server)
            .ok()
            .expect("no sender holds the server");
        assert!(!old.wait_exit(Duration::from_secs(10)).success());
        drop(old);
        server = Arc::new(start(&flows, &data));

        let got = exported(&server).await;
        let mut in_flight_stored = 0;
        for (i, k) in known.iter_mut().enumerate() {
            let answers = got.get(&phone(i)).cloned().unwrap_or_default();
            let unique: BTreeSet<String> = answers.iter().cloned().collect();
            assert_eq!(
                unique.len(),
                answers.len(),
                "round {n}: sender {i}: a run twice: {answers:?}"
            );
            if let Some(a) = k.in_flight.take() {
                if unique.contains(&a) {
                    in_flight_stored += 1;
                    k.kept.insert(a);
                }
            }
            // Every acknowledged run, and besides them only kept answers
            // not replaced yet; one replaced does not come back.
            let missing: BTreeSet<&String> = k.acked.difference(&unique).collect();
            assert!(
                missing.is_empty(),
                "round {n}: sender {i}: lost {missing:?} of {unique:?}"
            );
            let unknown: BTreeSet<&String> = unique
                .iter()
                .filter(|a| !k.acked.contains(*a) && !k.kept.contains(*a))
                .collect();
            assert!(
                unknown.is_empty(),
                "round {n}: sender {i}: never sent or acknowledged {unknown:?}"
            );
            k.kept.retain(|a| unique.contains(a));
        }
        eprintln!(
            "round {n}: {} answers acknowledged, {in_flight_stored} in flight stored",
            round.acks.load(Ordering::SeqCst)
        );
    }
    // The last server's results reach their file, one run of its own
    // included (so that this server surely moves something).
    let late = phone(SENDERS);
    assert_eq!(
        bodies(&server.send(&late, "POLL", &new_sid()).await.unwrap()),
        ["Your answer?"]
    );
    assert_eq!(
        bodies(&server.send(&late, "late", &new_sid()).await.unwrap()),
        ["Thanks."]
    );
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let file = std::fs::read_to_string(data.join("results/poll.jsonl")).expect("results file");
    let total: usize = known
        .iter()
        .map(|k| k.acked.len() + k.kept.len())
        .sum::<usize>()
        + 1;
    assert!(
        file.lines().count() >= total,
        "{} lines for {total} runs",
        file.lines().count()
    );
    let again = exported(&server).await;
    assert_eq!(again.values().map(Vec::len).sum::<usize>(), total);
    // And /metrics says so.
    let metrics = server
        .client
        .get(format!("http://{}/metrics", server.addr))
        .send()
        .await
        .expect("metrics answered")
        .text()
        .await
        .unwrap();
    let value = |name: &str| -> u64 {
        metric_in(&metrics, name)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics"))
    };
    assert!(value("smsflow_results_moved_total") > 0, "{metrics}");
    assert_eq!(value("smsflow_results_move_failures_total"), 0);
}
