//! The engine's side of HTTP calls, through its public API: a flow that
//! reaches a `call:` stops and asks for the rendered request; run again
//! with the answer it goes on (saving, routing on status and failure),
//! and a run with answers repeats the same request it asked for.

use std::collections::BTreeMap;

use smsflow::flow::calls::{CallError, CallResponse, HeaderValue};
use smsflow::flow::{
    handle, handle_with_calls, load_dir, Conversation, EngineOptions, Handled, Inbound, Outcome,
};

const FLOW: &str = r#"
trigger: {keywords: [STATUS]}
steps:
  look:
    set: {asked: "yes"}
    call:
      url: "https://shop.example/orders/{{message.from}}?q={{message.body}}"
      headers:
        Authorization: {secret: SHOP_TOKEN}
        X-Plain: "from {{message.from}}"
      timeout: 1500ms
      save:
        eta: json.order.eta
        contact.last_status: status
      on_error: sorry
      on_status:
        404: unknown
        4xx: client
    say: "Your order is {{call.json.order.state}}, ready in {{eta}}."
    goto: again
  again:
    call:
      method: POST
      url: https://shop.example/seen
      form: {who: "{{message.from}}", eta: "{{eta}}"}
      on_error: sorry
    say: "Noted ({{call.status}})."
  sorry:
    say: "Sorry: {{call.error}}{{call.status}}"
  unknown:
    say: "No order for you."
  client:
    say: "Client error {{call.status}}."
"#;

fn set() -> smsflow::flow::FlowSet {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("status.yaml"), FLOW).unwrap();
    load_dir(dir.path()).unwrap().set
}

fn send(set: &smsflow::flow::FlowSet, calls: &[CallResponse]) -> Handled {
    let msg = Inbound {
        from: "+15550001234",
        to: "+15550009999",
        body: "status now",
        media: &[],
        message_sid: "SM1",
    };
    handle_with_calls(
        set,
        &EngineOptions::default(),
        Conversation::default(),
        &msg,
        100,
        calls,
    )
}

fn replies(h: &Handled) -> Vec<String> {
    match &h.outcome {
        Outcome::Reply(r) => r.iter().map(|r| r.body.clone()).collect(),
        Outcome::Silence(s) => vec![format!("(silence: {s:?})")],
    }
}

fn answered(status: u16, json: serde_json::Value) -> CallResponse {
    CallResponse::Answered {
        status,
        json: Some(json),
    }
}

#[test]
fn a_call_stops_the_run_with_the_rendered_request() {
    let set = set();
    assert!(set.has_calls());
    let h = send(&set, &[]);
    let req = h.call.expect("asks for a call");
    assert_eq!(req.method, "GET");
    // Values are percent-encoded in the URL; the host is as written.
    assert_eq!(
        req.url,
        "https://shop.example/orders/%2B15550001234?q=status%20now"
    );
    assert_eq!(req.host(), "shop.example");
    assert_eq!(
        req.headers,
        vec![
            (
                "Authorization".to_owned(),
                HeaderValue::Secret("SHOP_TOKEN".to_owned())
            ),
            (
                "X-Plain".to_owned(),
                HeaderValue::Text("from +15550001234".to_owned())
            ),
        ]
    );
    assert_eq!(req.timeout, std::time::Duration::from_millis(1500));
    assert_eq!((req.flow.as_str(), req.step.as_str()), ("status", "look"));
    // `handle` without answers is the same first run.
    let msg = Inbound {
        from: "+15550001234",
        to: "+15550009999",
        body: "status now",
        media: &[],
        message_sid: "SM1",
    };
    let plain = handle(
        &set,
        &EngineOptions::default(),
        Conversation::default(),
        &msg,
        100,
    );
    assert_eq!(plain.call, Some(req));
}

#[test]
fn answers_resume_the_flow_in_order() {
    let set = set();
    let first = answered(
        200,
        serde_json::json!({"order": {"state": "in the oven", "eta": "10 min"}}),
    );
    let h = send(&set, std::slice::from_ref(&first));
    let second = h.call.clone().expect("asks for the second call");
    assert_eq!(second.method, "POST");
    assert_eq!(
        second.body,
        Some((
            "application/x-www-form-urlencoded".to_owned(),
            "eta=10%20min&who=%2B15550001234".to_owned()
        ))
    );
    let h = send(&set, &[first, answered(204, serde_json::Value::Null)]);
    assert_eq!(h.call, None);
    assert_eq!(
        replies(&h),
        vec![
            "Your order is in the oven, ready in 10 min.",
            "Noted (204)."
        ]
    );
    assert_eq!(
        h.conversation.contact,
        BTreeMap::from([("last_status".to_owned(), "200".to_owned())])
    );
}

#[test]
fn failures_and_statuses_route() {
    let set = set();
    // The sender sees the category, never the detail (resolver and
    // allow-list wording stay in the logs).
    let h = send(
        &set,
        &[CallResponse::failed(
            CallError::Refused,
            "shop.example resolves to 10.0.0.7 (not a public address; name the address itself in http_allow to allow it)",
        )],
    );
    assert_eq!(replies(&h), vec!["Sorry: refused"]);
    let h = send(
        &set,
        &[CallResponse::failed(
            CallError::Timeout,
            "timed out after 1500 ms",
        )],
    );
    assert_eq!(replies(&h), vec!["Sorry: timeout"]);
    // Nothing is saved from a failed call.
    assert!(h.conversation.contact.is_empty());
    let h = send(&set, &[answered(404, serde_json::json!({}))]);
    assert_eq!(replies(&h), vec!["No order for you."]);
    let h = send(&set, &[answered(422, serde_json::json!({}))]);
    assert_eq!(replies(&h), vec!["Client error 422."]);
    let h = send(&set, &[answered(500, serde_json::json!({}))]);
    assert_eq!(replies(&h), vec!["Sorry: status500"]);
}

/// An `after_answer` call does not stop the run: the flow answers at once
/// and hands the rendered request back in `after`, to be made later.
#[test]
fn an_after_answer_call_is_handed_back_without_stopping() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("order.yaml"),
        r#"
trigger: {keywords: [STATUS]}
steps:
  send:
    call:
      method: POST
      url: https://shop.example/orders
      json: {who: "{{message.from}}"}
      after_answer: true
    say: "Sent."
"#,
    )
    .unwrap();
    let set = load_dir(dir.path()).unwrap().set;
    let h = send(&set, &[]);
    assert_eq!(h.call, None);
    assert_eq!(replies(&h), vec!["Sent."]);
    assert_eq!(h.after.len(), 1);
    assert_eq!(h.after[0].url, "https://shop.example/orders");
    assert_eq!(
        h.after[0].body,
        Some((
            "application/json".to_owned(),
            r#"{"who":"+15550001234"}"#.to_owned()
        ))
    );
}
