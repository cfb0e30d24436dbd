//! Flow results end to end over a real store: runs that complete,
//! expire, opt out and give up, through the pipeline with chosen times,
//! exported and compared with a golden CSV; hostile text neutralised;
//! retention purging results and texts.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::*;
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, PipelineOptions};
use crate::store::SledStore;
use crate::twilio::InboundMessage;

/// The README's pizza-order example.
pub(crate) const PIZZA: &str = r#"
trigger:
  keywords: [PIZZA]
expire_after: 1h
steps:
  size:
    say: "Which size: small, medium or large?"
    wait:
      - any_of: [small, medium, large]
        save: size
        goto: address
    retry:
      say: "Please answer small, medium or large."
      limit: 1
  address:
    say: "Where should we deliver it?"
    wait:
      - anything: true
        save: address
        contact: address
        goto: confirm
  confirm:
    say: "A {{size}} pizza to {{address}}. Send YES to order."
    wait:
      - yes: true
        set: { status: ordered }
        say: "Ordered! About 40 minutes."
"#;

const US: &str = "+15550001111";
/// 2026-11-30T08:00:00Z.
const T0: i64 = 1_796_025_600;

struct Harness {
    pipeline: Pipeline<SledStore>,
    n: u32,
    _tmp: tempfile::TempDir,
}

impl Harness {
    fn new(store_message_text: bool) -> Harness {
        Harness::with(PipelineOptions {
            store_message_text,
            ..PipelineOptions::default()
        })
    }

    fn with(options: PipelineOptions) -> Harness {
        let tmp = tempfile::tempdir().unwrap();
        let flows = tmp.path().join("flows");
        std::fs::create_dir(&flows).unwrap();
        std::fs::write(flows.join("pizza.yaml"), PIZZA).unwrap();
        let set = crate::flow::load_flows(&flows).unwrap().set;
        let store = SledStore::open(&tmp.path().join("data"), &Default::default()).unwrap();
        let pipeline = Pipeline::new(
            Arc::new(store),
            Arc::new(ArcSwap::from_pointee(set)),
            options,
            Arc::new(Metrics::default()),
        );
        Harness {
            pipeline,
            n: 0,
            _tmp: tmp,
        }
    }

    async fn send(&mut self, from: &str, body: &str, at: i64) -> String {
        self.n += 1;
        let msg = InboundMessage::from_params(vec![
            ("MessageSid".to_owned(), format!("SM{:032}", self.n)),
            ("From".to_owned(), from.to_owned()),
            ("To".to_owned(), US.to_owned()),
            ("Body".to_owned(), body.to_owned()),
        ])
        .unwrap();
        self.pipeline
            .handle_inbound(&msg, at)
            .await
            .unwrap()
            .outcome
    }
}

const ANA: &str = "+15557000001";
const BEN: &str = "+15557000002";
const CY: &str = "+15557000003";
const DEE: &str = "+15557000004";
const EVE: &str = "+15557000005";

/// Five pizza orders that end five ways (one of them with an address a
/// spreadsheet would run), and one still waiting.
async fn five_orders(h: &mut Harness) {
    // Completed.
    h.send(ANA, "pizza", T0).await;
    h.send(ANA, "large", T0 + 60).await;
    h.send(ANA, "12 Main St, Apt 3", T0 + 120).await;
    h.send(ANA, "yes", T0 + 180).await;
    // Expired: idle past the hour; noticed at the next message.
    h.send(BEN, "pizza", T0 + 200).await;
    h.send(BEN, "small", T0 + 260).await;
    h.send(BEN, "hello?", T0 + 260 + 7200).await;
    // Opted out halfway.
    h.send(CY, "pizza", T0 + 300).await;
    h.send(CY, "medium", T0 + 360).await;
    assert_eq!(h.send(CY, "STOP", T0 + 420).await, "silence:opt_out");
    // Gave up: two answers that are no size.
    h.send(DEE, "pizza", T0 + 500).await;
    h.send(DEE, "pepperoni", T0 + 560).await;
    h.send(DEE, "anchovies", T0 + 620).await;
    // Completed, with hostile text in the address.
    h.send(EVE, "pizza", T0 + 700).await;
    h.send(EVE, "large", T0 + 760).await;
    h.send(
        EVE,
        "=HYPERLINK(\"http://x.example\",\"win\"), \"now\"\nline 2",
        T0 + 820,
    )
    .await;
    h.send(EVE, "yes", T0 + 880).await;
    // Still waiting: not a result yet.
    h.send("+15557000006", "pizza", T0 + 900).await;
}

fn golden(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/results/golden")
        .join(name)
}

#[tokio::test]
async fn a_flows_results_export_matches_the_golden_csv() {
    let mut h = Harness::new(false);
    five_orders(&mut h).await;
    let store = h.pipeline.store().clone();
    let csv = export(store.as_ref(), "pizza", 0, Format::Csv).unwrap();
    let path = golden("pizza.csv");
    if std::env::var_os("SMSFLOW_WRITE_GOLDEN").is_some() && !path.exists() {
        std::fs::write(&path, &csv).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        csv,
        expected,
        "the export no longer matches {}",
        path.display()
    );

    // Each run ended its own way, in end-time order.
    let results = store.results("pizza", 0).unwrap();
    let how: Vec<(&str, &str)> = results
        .iter()
        .map(|r| (r.contact.as_str(), r.ended.as_str()))
        .collect();
    assert_eq!(
        how,
        [
            (ANA, "completed"),
            (CY, "opted_out"),
            (DEE, "gave_up"),
            (EVE, "completed"),
            (BEN, "expired"),
        ]
    );
    assert_eq!(results[0].path, ["size", "address", "confirm"]);
    assert_eq!(results[0].vars["status"], "ordered");

    // --since leaves out what ended before it; JSON lines hold the same.
    let later = store.results("pizza", T0 + 880).unwrap();
    assert_eq!(later.len(), 2);
    let jsonl = export(store.as_ref(), "pizza", T0 + 880, Format::Jsonl).unwrap();
    let back: Vec<RunResult> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(back, later);
    // Another flow's results are its own.
    assert!(store.results("piz", 0).unwrap().is_empty());
}

#[test]
fn hostile_text_is_quoted_and_never_a_formula() {
    let hostile = [
        "=1+1",
        "+1 555 0100",
        "-2",
        "@SUM(A1:A9)",
        "'=already quoted",
        "a, b",
        "say \"hi\"",
        "two\nlines",
        "\r\n=cmd|' /C calc'!A0",
    ];
    let vars: BTreeMap<String, String> = hostile
        .iter()
        .enumerate()
        .map(|(i, v)| (format!("v{i}"), (*v).to_owned()))
        .collect();
    let result = RunResult {
        flow: "=flow".into(),
        to: "+15550001111".into(),
        contact: "+15557000001".into(),
        started_at: T0,
        ended_at: T0 + 60,
        ended: "completed".into(),
        path: vec!["-step".into()],
        vars,
        fields: BTreeMap::from([("@field".to_owned(), "+x".to_owned())]),
    };
    let csv = to_csv(std::slice::from_ref(&result));
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(csv.as_bytes());
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 2, "{csv}");
    for cell in rows.iter().flat_map(|r| r.iter()) {
        assert!(
            !cell.starts_with(['=', '+', '-', '@']),
            "{cell:?} would run as a formula in {csv}"
        );
    }
    let row = &rows[1];
    assert_eq!(&row[0], "'=flow");
    assert_eq!(&row[2], "'+15557000001");
    assert_eq!(&row[6], "'-step");
    // After the fixed columns, v0..v8 in order, then the contact field.
    let values: Vec<&str> = row.iter().skip(FIXED_COLUMNS.len()).collect();
    assert_eq!(
        values,
        [
            "'=1+1",
            "'+1 555 0100",
            "'-2",
            "'@SUM(A1:A9)",
            "''=already quoted",
            "a, b",
            "say \"hi\"",
            "two\nlines",
            "\r\n=cmd|' /C calc'!A0",
            "'+x",
        ]
    );
    assert_eq!(&rows[0][FIXED_COLUMNS.len() + 9], "contact.@field");
}

#[tokio::test]
async fn retention_purges_results_and_texts() {
    let mut h = Harness::new(true);
    five_orders(&mut h).await;
    let store = h.pipeline.store().clone();
    let texts = crate::messages::list(
        store.as_ref(),
        &crate::messages::Filter {
            number: Some(ANA.into()),
            text: Some("main st".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(texts.len(), 1);
    assert_eq!(texts[0].body.as_deref(), Some("12 Main St, Apt 3"));
    assert_eq!(
        texts[0].replies,
        ["A large pizza to 12 Main St, Apt 3. Send YES to order."]
    );
    // Everything before Eve's order (T0 + 700) goes.
    let purged = store.purge(T0 + 700).unwrap();
    assert_eq!(purged.results, 3, "{purged:?}");
    let left: Vec<String> = store
        .results("pizza", 0)
        .unwrap()
        .into_iter()
        .map(|r| r.contact)
        .collect();
    assert_eq!(left, [EVE, BEN]);
    let log = store.inbound_log().unwrap();
    assert!(log.iter().all(|(_, p)| p.at >= T0 + 700), "{log:?}");
    assert!(!log
        .iter()
        .any(|(_, p)| p.body.as_deref().is_some_and(|b| b.contains("Main St"))));
    assert!(log
        .iter()
        .any(|(_, p)| p.body.as_deref() == Some("yes") && p.from == EVE));
}

#[tokio::test]
async fn message_texts_are_kept_only_when_chosen() {
    let mut h = Harness::new(false);
    h.send(ANA, "pizza", T0).await;
    let log = h.pipeline.store().inbound_log().unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].1.body, None);
    assert!(log[0].1.replies.is_empty());
}

#[tokio::test]
async fn an_interrupt_keyword_and_a_new_order_each_end_a_run() {
    let mut h = Harness::with(PipelineOptions {
        engine: crate::flow::EngineOptions {
            interrupt_keywords: vec!["MENU".into()],
        },
        ..PipelineOptions::default()
    });
    h.send(ANA, "pizza", T0).await;
    h.send(ANA, "small", T0 + 10).await;
    h.send(ANA, "menu", T0 + 20).await;
    h.send(ANA, "pizza", T0 + 30).await;
    h.send(ANA, "large", T0 + 40).await;
    h.send(ANA, "menu", T0 + 50).await;
    let results = h.pipeline.store().results("pizza", 0).unwrap();
    let got: Vec<(i64, i64, &str, Vec<&str>)> = results
        .iter()
        .map(|r| {
            (
                r.started_at - T0,
                r.ended_at - T0,
                r.ended.as_str(),
                r.vars.values().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (0, 20, "interrupted", vec!["small"]),
            (30, 50, "interrupted", vec!["large"]),
        ]
    );
}

/// Handling the step that ended a run again (a message Twilio retries
/// after a crash, a timer firing again) ends it at another time, but
/// names the same result: it is replaced, never doubled.
#[test]
fn a_result_written_again_replaces_itself() {
    use crate::store::{ConvKey, RecentAnswers, StateCommit, Store};
    let tmp = tempfile::tempdir().unwrap();
    let store = SledStore::open(&tmp.path().join("data"), &Default::default()).unwrap();
    let key = ConvKey::new(US, ANA);
    let mut result = RunResult {
        flow: "pizza".into(),
        to: US.into(),
        contact: ANA.into(),
        started_at: T0,
        ended_at: T0 + 60,
        ended: "completed".into(),
        path: vec!["size".into()],
        vars: BTreeMap::new(),
        fields: BTreeMap::new(),
    };
    for ended_at in [T0 + 60, T0 + 75] {
        result.ended_at = ended_at;
        store
            .commit_state(StateCommit {
                key: &key,
                conversation: None,
                ended: true,
                due: None,
                recent: &RecentAnswers::default(),
                at: ended_at,
                results: std::slice::from_ref(&result),
            })
            .unwrap();
    }
    assert_eq!(store.results("pizza", 0).unwrap(), [result]);
}
