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
