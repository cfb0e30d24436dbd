//! HTTP calls from flows, through the front door: the real server on
//! 127.0.0.1:0, a signed message, and "the shop", a real HTTP server on
//! 127.0.0.1:0 that records what it receives and answers as told (JSON,
//! a status, a hang, an oversized body, a redirect).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::helpers::*;
use crate::process::spawn_server_env;

/// What the shop does with the next requests.
#[derive(Clone, Debug)]
enum Answer {
    Json(u16, String),
    /// JSON after this many milliseconds.
    Slow(u64, String),
    Hang,
    Big,
    Redirect(String),
}

/// One request the shop received: its head (request line and headers)
/// and body.
#[derive(Clone, Debug)]
struct Received {
    head: String,
    body: String,
}

#[derive(Clone)]
struct Shop {
    addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    /// Answers for the next requests, before `answer`.
    next: Arc<Mutex<std::collections::VecDeque<Answer>>>,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Shop {
    async fn start(answer: Answer) -> Shop {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let shop = Shop {
            addr: listener.local_addr().unwrap(),
            answer: Arc::new(Mutex::new(answer)),
            next: Arc::default(),
            received: Arc::default(),
        };
        let me = shop.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let me = me.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // Read the head, then Content-Length bytes of body.
                    let (head, body) = loop {
                        let Ok(n) = socket.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).into_owned();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let head = text[..end].to_owned();
                            let len = head
                                .lines()
                                .find_map(|l| {
                                    let (k, v) = l.split_once(':')?;
                                    k.eq_ignore_ascii_case("content-length")
                                        .then(|| v.trim().parse::<usize>().ok())?
                                })
                                .unwrap_or(0);
                            if buf.len() >= end + 4 + len {
                                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len])
                                    .into_owned();
                                break (head, body);
                            }
                        }
                    };
                    me.received.lock().unwrap().push(Received { head, body });
                    let next = me.next.lock().unwrap().pop_front();
                    let answer = next.unwrap_or_else(|| me.answer.lock().unwrap().clone());
                    let reply = match answer {
                        Answer::Json(status, json) => format!(
                            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
                            json.len()
                        ),
                        Answer::Slow(ms, json) => {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
                                json.len()
                            )
                        }
                        Answer::Hang => {
                            tokio::time::sleep(Duration::from_secs(60)).await;
                            return;
                        }
                        Answer::Big => {
                            let body = format!("\"{}\"", "x".repeat(100 * 1024));
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{body}"
                            )
                        }
                        Answer::Redirect(to) => format!(
                            "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        ),
                    };
                    let _ = socket.write_all(reply.as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        shop
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

/// A pizza order: asks what to order, POSTs it to `url` as JSON with the
/// secret header, and answers with the shop's order id.
fn pizza(url: &str) -> String {
    format!(
        r#"
trigger: {{keywords: [PIZZA]}}
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
      url: "{url}/orders?item={{{{item}}}}"
      headers:
        Authorization: {{secret: SHOP_TOKEN}}
      json:
        item: "{{{{item}}}}"
        phone: "{{{{message.from}}}}"
        quantity: 1
      timeout: 8s
      save:
        order_id: json.id
      on_error: sorry
      on_status:
        409: sold_out
    say: "Order {{{{call.json.id}}}} placed ({{{{order_id}}}}), ready in {{{{call.json.eta}}}}."
  sorry:
    say: "Sorry, the shop cannot take orders right now ({{{{call.error}}}}{{{{call.status}}}})."
  sold_out:
    say: "Sold out, sorry."
"#
    )
}

const FROM: &str = "+15557654321";

/// The flow with its secret read from `CARGO_PKG_NAME` (`smsflow`), which
/// cargo sets for every test process: tests in this process never change
/// the environment (other threads read it).
fn in_process(flow: String) -> String {
    flow.replace("SHOP_TOKEN", "CARGO_PKG_NAME")
}

async fn order(app: &TestApp, item: &str) -> (Vec<String>, Duration) {
    assert_eq!(
        bodies(&app.send_sms(FROM, "pizza").await.body),
        vec!["What would you like?"]
    );
    let started = Instant::now();
    let reply = app.send_sms(FROM, item).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    (bodies(&reply.body), started.elapsed())
}

async fn shop_app(shop: &Shop, allow: &[&str], budget_ms: u64) -> TestApp {
    let flow = in_process(pizza(&format!("http://{}", shop.addr)));
    let allow: Vec<String> = allow.iter().map(|a| (*a).to_owned()).collect();
    spawn_configured(&[("pizza.yaml", &flow)], |c| {
        c.http_allow = allow;
        c.call_budget = Duration::from_millis(budget_ms);
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flow_posts_the_order_and_replies_with_the_shops_id() {
    let shop = Shop::start(Answer::Json(201, r#"{"id": 42, "eta": "20 min"}"#.into())).await;
    let app = shop_app(&shop, &["127.0.0.1"], 5000).await;
    let (replies, _) = order(&app, "margherita & co").await;
    assert_eq!(replies, vec!["Order 42 placed (42), ready in 20 min."]);
    let got = shop.received();
    assert_eq!(got.len(), 1);
    let head = &got[0].head;
    assert!(
        head.starts_with("POST /orders?item=margherita%20%26%20co HTTP/1.1"),
        "{head}"
    );
    assert!(head.contains("authorization: smsflow"), "{head}");
    assert!(head.contains("content-type: application/json"), "{head}");
    let body: serde_json::Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"item": "margherita & co", "phone": FROM, "quantity": 1})
    );
    let metrics = app.raw(app.client.get(app.url("/metrics"))).await.body;
    assert!(
        metrics.contains("smsflow_flow_calls_total{host=\"127.0.0.1\",outcome=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("smsflow_flow_call_duration_seconds_count 1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_status_branch_and_a_server_error() {
    let shop = Shop::start(Answer::Json(409, "{}".into())).await;
    let app = shop_app(&shop, &["127.0.0.1"], 5000).await;
    assert_eq!(order(&app, "calzone").await.0, vec!["Sold out, sorry."]);
    *shop.answer.lock().unwrap() = Answer::Json(503, r#"{"error": "busy"}"#.into());
    assert_eq!(
        order(&app, "calzone").await.0,
        vec!["Sorry, the shop cannot take orders right now (status503)."]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_shop_costs_the_budget_and_the_webhook_still_answers() {
    let shop = Shop::start(Answer::Hang).await;
    let app = shop_app(&shop, &["127.0.0.1"], 1000).await;
    let (replies, took) = order(&app, "margherita").await;
    assert_eq!(
        replies,
        vec!["Sorry, the shop cannot take orders right now (timeout)."]
    );
    // The budget is 1 s (the call's own timeout 8 s); wide margin for a
    // busy machine, far below the hang and Twilio's 15 s.
    assert!(took < Duration::from_secs(6), "took {took:?}");
    assert_eq!(shop.received().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_not_in_the_allow_list_is_refused() {
    let shop = Shop::start(Answer::Json(201, r#"{"id": 1}"#.into())).await;
    let app = shop_app(&shop, &["shop.example"], 5000).await;
    assert_eq!(
        order(&app, "margherita").await.0,
        vec!["Sorry, the shop cannot take orders right now (refused)."]
    );
    assert!(shop.received().is_empty());
}

/// A name that resolves to a loopback address is refused even when the
/// name is listed: only the address itself, listed, reaches a private
/// network. `localhost` is the name every machine resolves so.
#[tokio::test(flavor = "multi_thread")]
async fn a_name_resolving_to_loopback_is_refused() {
    let shop = Shop::start(Answer::Json(201, r#"{"id": 1}"#.into())).await;
    let flow = in_process(pizza(&format!("http://localhost:{}", shop.addr.port())));
    let app = spawn_configured(&[("pizza.yaml", &flow)], |c| {
        c.http_allow = vec!["localhost".into()];
    })
    .await;
    // The sender's flow sees the category; the resolver's words (which
    // name the address) stay in the log.
    assert_eq!(
        order(&app, "margherita").await.0,
        vec!["Sorry, the shop cannot take orders right now (refused)."]
    );
    assert!(shop.received().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_answers_and_redirects_fail() {
    let shop = Shop::start(Answer::Big).await;
    let app = shop_app(&shop, &["127.0.0.1"], 5000).await;
    assert_eq!(
        order(&app, "margherita").await.0,
        vec!["Sorry, the shop cannot take orders right now (too_large)."]
    );
    // Redirects are followed (same origin here) at most 3 times.
    *shop.answer.lock().unwrap() = Answer::Redirect("/elsewhere".into());
    assert_eq!(
        order(&app, "margherita").await.0,
        vec!["Sorry, the shop cannot take orders right now (redirects)."]
    );
    assert_eq!(shop.received().len(), 1 + 4);
    assert!(shop.received()[4].head.starts_with("GET /elsewhere "));
    // A redirect elsewhere is never followed with a secret header.
    *shop.answer.lock().unwrap() =
        Answer::Redirect(format!("http://localhost:{}/elsewhere", shop.addr.port()));
    assert_eq!(
        order(&app, "margherita").await.0,
        vec!["Sorry, the shop cannot take orders right now (refused)."]
    );
    assert_eq!(shop.received().len(), 6);
}

/// The real binary with debug logs: a call with a secret header leaves the
/// secret out of every log line.
#[tokio::test(flavor = "multi_thread")]
async fn secrets_are_not_logged() {
    let shop = Shop::start(Answer::Json(201, r#"{"id": 7, "eta": "5 min"}"#.into())).await;
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(
        flows.join("pizza.yaml"),
        pizza(&format!("http://{}", shop.addr)),
    )
    .unwrap();
    let config = tmp.path().join("smsflow.toml");
    std::fs::write(&config, "http_allow = [\"127.0.0.1\"]\n").unwrap();
    let mut server = spawn_server_env(
        &flows,
        &tmp.path().join("data"),
        &["--config", config.to_str().unwrap()],
        &[
            ("RUST_LOG", "debug"),
            ("SHOP_TOKEN", "tok-LOGGED-NEVER-999"),
        ],
    );
    assert_eq!(
        bodies(&server.send(FROM, "pizza", &new_sid()).await.unwrap()),
        vec!["What would you like?"]
    );
    assert_eq!(
        bodies(&server.send(FROM, "margherita", &new_sid()).await.unwrap()),
        vec!["Order 7 placed (7), ready in 5 min."]
    );
    assert!(shop.received()[0].head.contains("tok-LOGGED-NEVER-999"));
    let log = server.stop_and_read_log().await.join("\n");
    assert!(log.contains("flow call answered"), "{log}");
    assert!(!log.contains("tok-LOGGED-NEVER"), "{log}");
}

/// `smsflow graph` shows a call's failure and status branches, dashed and
/// labelled with the method and URL.
#[test]
fn graph_draws_calls() {
    let dir = flows_dir(&[("pizza.yaml", &pizza("https://shop.example"))]);
    let set = smsflow::flow::load_dir(dir.path()).unwrap().set;
    let m = smsflow::author::mermaid(&set, "pizza").unwrap();
    for expected in [
        "    step_place -.->|\"POST https://shop.example/orders?item={{item}}: on_error\"| step_sorry",
        "    step_place -.->|\"POST https://shop.example/orders?item={{item}}: 409\"| step_sold_out",
    ] {
        assert!(
            m.lines().any(|l| l == expected),
            "missing {expected:?} in\n{m}"
        );
    }
}

fn calls_fixture() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/flows/calls")
}

/// `@ http` lines answer a transcript's calls (a message's, and a
/// timer's in remind.chat): no network in `test`.
#[test]
fn transcripts_declare_the_answers_to_calls() {
    let set = smsflow::flow::load_dir(&calls_fixture()).unwrap().set;
    for chat in ["pizza.chat", "remind.chat"] {
        let run = smsflow::author::run_transcript(
            &calls_fixture().join(chat),
            &set,
            &smsflow::author::server_defaults(),
        );
        assert!(run.failures.is_empty(), "{chat}: {:#?}", run.failures);
        assert!(!run.exchanges.is_empty(), "{chat}");
    }
}

/// A call nothing declared fails the transcript at the message that made
/// it, and so does a declared answer no call used.
#[test]
fn unexpected_and_unused_calls_fail_a_transcript() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        calls_fixture().join("pizza.yaml"),
        dir.path().join("pizza.yaml"),
    )
    .unwrap();
    let chat = dir.path().join("pizza.chat");
    std::fs::write(
        &chat,
        "> pizza\n< What would you like?\n> margherita\n< Sorry, the shop cannot take orders right now.\n\
         @ http GET https://shop.example/status -> 200 {}\n? call.count = 1\n",
    )
    .unwrap();
    let set = smsflow::flow::load_dir(dir.path()).unwrap().set;
    let run = smsflow::author::run_transcript(&chat, &set, &smsflow::author::server_defaults());
    let failures: Vec<String> = run
        .failures
        .iter()
        .map(|f| format!("{}: {}", f.line, f.message))
        .collect();
    assert_eq!(
        failures,
        vec![
            "3: unexpected call POST https://shop.example/orders (declare its answer with `@ http POST https://shop.example/orders -> 200 {...}` before the message)".to_owned(),
            "6: `call.count` is `0`, expected `1`".to_owned(),
            "5: the answer declared for GET https://shop.example/status was never used: no such call was made".to_owned(),
        ]
    );
}

fn chat_with(flows: &std::path::Path, real_calls: Option<Vec<String>>, input: &str) -> String {
    let opts = smsflow::author::ChatOptions {
        flows_dir: flows.to_path_buf(),
        from: FROM.into(),
        to: OUR_NUMBER.into(),
        data_dir: None,
        now: Some(1_700_000_000),
        options: smsflow::author::server_defaults(),
        echo: true,
        real_calls,
    };
    let mut out = Vec::new();
    smsflow::author::chat(&opts, input.as_bytes(), &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

/// `chat` makes no call unless told to: `/http` declares answers, an
/// undeclared call fails (and says how to declare it), and
/// `--real-calls` reaches the shop through the allow-list.
#[tokio::test(flavor = "multi_thread")]
async fn chat_mocks_calls_or_makes_them_for_real() {
    let shop = Shop::start(Answer::Json(201, r#"{"id": 9, "eta": "1 min"}"#.into())).await;
    let dir = flows_dir(&[(
        "pizza.yaml",
        &in_process(pizza(&format!("http://{}", shop.addr))),
    )]);
    let url = format!("http://{}/orders?item=", shop.addr);
    let out = tokio::task::block_in_place(|| {
        chat_with(
            dir.path(),
            None,
            &format!("pizza\nmargherita\npizza\n/http POST {url}* -> 201 {{\"id\": 5, \"eta\": \"now\"}}\nfunghi\n"),
        )
    });
    assert!(
        out.contains(&format!(
            "# no answer declared for POST {url}margherita: it failed"
        )),
        "{out}"
    );
    assert!(out.contains("< Order 5 placed (5), ready in now."), "{out}");
    assert!(shop.received().is_empty(), "no call left the machine");

    let out = tokio::task::block_in_place(|| {
        chat_with(
            dir.path(),
            Some(vec!["127.0.0.1".into()]),
            "pizza\nmargherita\n",
        )
    });
    assert!(
        out.contains("< Order 9 placed (9), ready in 1 min."),
        "{out}"
    );
    assert_eq!(shop.received().len(), 1);
}

/// A redirect is checked like the first request: to a name that resolves
/// to loopback it is refused before any connection, even when the name
/// is listed.
#[tokio::test(flavor = "multi_thread")]
async fn a_redirect_to_a_private_address_is_refused() {
    let shop = Shop::start(Answer::Redirect("/".into())).await;
    let port = shop.addr.port();
    *shop.answer.lock().unwrap() = Answer::Redirect(format!("http://localhost:{port}/inside"));
    let flow = format!(
        r#"
trigger: {{keywords: [STATUS]}}
steps:
  look:
    call:
      url: "http://127.0.0.1:{port}/status"
      on_error: sorry
    say: "ok {{{{call.status}}}}"
  sorry:
    say: "failed: {{{{call.error}}}}"
"#
    );
    let app = spawn_configured(&[("status.yaml", &flow)], |c| {
        c.http_allow = vec!["127.0.0.1".into(), "localhost".into()];
    })
    .await;
    let replies = bodies(&app.send_sms(FROM, "status").await.body);
    assert_eq!(replies, vec!["failed: refused"]);
    let got = shop.received();
    assert_eq!(got.len(), 1, "the redirect was not followed");
    assert!(got[0].head.starts_with("GET /status "));
}

/// An order sent to the shop after the answer: the sender never waits.
fn pizza_after(url: &str) -> String {
    format!(
        r#"
trigger: {{keywords: [PIZZA]}}
start: ask
steps:
  ask:
    say: "What would you like?"
    wait:
      - anything: true
        save: item
        goto: send
  send:
    call:
      method: POST
      url: "{url}/orders"
      json:
        item: "{{{{item}}}}"
      timeout: 2s
      after_answer: true
    say: "Thanks, your {{{{item}}}} is on its way to the shop."
"#
    )
}

fn after_config() -> impl FnOnce(&mut smsflow::config::Config) {
    |c: &mut smsflow::config::Config| {
        c.http_allow = vec!["127.0.0.1".into()];
        c.call_budget = Duration::from_millis(1000);
    }
}

/// Waits (generously) until the shop has received `n` requests.
async fn received_at_least(shop: &Shop, n: usize) -> Vec<Received> {
    let until = Instant::now() + Duration::from_secs(40);
    loop {
        let got = shop.received();
        if got.len() >= n || Instant::now() > until {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn idempotency_key(r: &Received) -> Option<String> {
    r.head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("idempotency-key")
            .then(|| v.trim().to_owned())
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn an_after_answer_call_does_not_keep_the_sender_waiting() {
    let shop = Shop::start(Answer::Hang).await;
    let flow = pizza_after(&format!("http://{}", shop.addr));
    let app = spawn_configured(&[("pizza.yaml", &flow)], after_config()).await;
    let (replies, took) = order(&app, "margherita").await;
    assert_eq!(
        replies,
        vec!["Thanks, your margherita is on its way to the shop."]
    );
    // The shop hangs for 60 s; the answer did not wait for it (nor for
    // the call budget: the call is not made while the message is handled).
    assert!(took < Duration::from_secs(20), "took {took:?}");
    // The job was recorded, and the worker makes it.
    let got = received_at_least(&shop, 1).await;
    assert!(!got.is_empty(), "the shop got no request");
    assert!(got[0].head.starts_with("POST /orders "), "{}", got[0].head);
    assert_eq!(got[0].body, r#"{"item":"margherita"}"#);
    assert!(idempotency_key(&got[0]).is_some_and(|k| k.starts_with("msg:")));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_after_answer_call_is_retried_until_delivered() {
    let shop = Shop::start(Answer::Json(201, r#"{"id": 42}"#.into())).await;
    shop.next.lock().unwrap().extend([
        Answer::Json(500, "{}".into()),
        Answer::Json(500, "{}".into()),
    ]);
    let flow = pizza_after(&format!("http://{}", shop.addr));
    let app = spawn_configured(&[("pizza.yaml", &flow)], after_config()).await;
    let (replies, _) = order(&app, "calzone").await;
    assert_eq!(
        replies,
        vec!["Thanks, your calzone is on its way to the shop."]
    );
    let got = received_at_least(&shop, 3).await;
    assert_eq!(got.len(), 3, "{got:?}");
    // Delivered on the third: no fourth request.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let got = shop.received();
    assert_eq!(got.len(), 3, "{got:?}");
    let keys: Vec<_> = got.iter().map(idempotency_key).collect();
    assert!(keys[0].is_some());
    assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pending_after_answer_call_is_delivered_after_a_restart() {
    let shop = Shop::start(Answer::Json(503, "{}".into())).await;
    let flow = pizza_after(&format!("http://{}", shop.addr));
    let app = spawn_configured(&[("pizza.yaml", &flow)], after_config()).await;
    order(&app, "funghi").await;
    assert!(!received_at_least(&shop, 1).await.is_empty());
    let (flows, data) = (app.flows_dir.clone(), app.data_dir.clone());
    let tmp = app.stop().await;
    // Let a request the stop cut short reach the shop's log first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = shop.received().len();
    // The shop is back; the job is still pending in the store.
    *shop.answer.lock().unwrap() = Answer::Json(201, "{}".into());
    let mut config = smsflow::config::Config::for_test(&flows, &data, TOKEN);
    after_config()(&mut config);
    let app = spawn_with(config).await;
    let got = received_at_least(&shop, before + 1).await;
    assert_eq!(got.len(), before + 1, "not delivered after the restart");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let got = shop.received();
    assert_eq!(got.len(), before + 1, "delivered, then sent again: {got:?}");
    assert_eq!(got[0].body, r#"{"item":"funghi"}"#);
    assert_eq!(idempotency_key(&got[0]), idempotency_key(&got[before]));
    app.stop().await;
    drop(tmp);
}

/// An after-answer call pending when the server is SIGKILLed (the shop was
/// failing) is delivered once after the restart, with the same
/// Idempotency-Key: the job was on disk before the webhook answered.
#[tokio::test(flavor = "multi_thread")]
async fn an_after_answer_call_pending_across_sigkill_is_delivered_after_restart() {
    let shop = Shop::start(Answer::Json(503, "{}".into())).await;
    let tmp = tempfile::tempdir().unwrap();
    let (flows, data) = (tmp.path().join("flows"), tmp.path().join("data"));
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(
        flows.join("pizza.yaml"),
        pizza_after(&format!("http://{}", shop.addr)),
    )
    .unwrap();
    let config = tmp.path().join("smsflow.toml");
    std::fs::write(&config, "http_allow = [\"127.0.0.1\"]\n").unwrap();
    let args = ["--no-watch", "--config", config.to_str().unwrap()];
    let first = spawn_server_env(&flows, &data, &args, &[]);
    first.send(FROM, "pizza", &new_sid()).await.unwrap();
    assert_eq!(
        bodies(&first.send(FROM, "funghi", &new_sid()).await.unwrap()),
        vec!["Thanks, your funghi is on its way to the shop."]
    );
    assert!(!received_at_least(&shop, 1).await.is_empty());
    first.signal("KILL");
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = shop.received().len();
    *shop.answer.lock().unwrap() = Answer::Json(201, "{}".into());

    let mut second = spawn_server_env(&flows, &data, &args, &[]);
    let got = received_at_least(&shop, before + 1).await;
    assert_eq!(got.len(), before + 1, "not delivered after the restart");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let got = shop.received();
    assert_eq!(got.len(), before + 1, "delivered, then sent again: {got:?}");
    assert_eq!(got[before].body, r#"{"item":"funghi"}"#);
    assert_eq!(idempotency_key(&got[0]), idempotency_key(&got[before]));
    second.signal("TERM");
    assert!(second.wait_exit(Duration::from_secs(30)).success());
}

/// The text of the `/metrics` line starting with `start`, if any.
async fn metric_line(app: &TestApp, start: &str) -> Option<String> {
    let text = app.raw(app.client.get(app.url("/metrics"))).await.body;
    text.lines()
        .find(|l| l.starts_with(start))
        .map(str::to_owned)
}

/// An after-answer call our own checks refuse (its host is not in
/// `http_allow`) fails at once instead of being retried: the same request
/// would be refused again. The pending gauge counts the job while it
/// waits and drops when it is given up.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_after_answer_call_fails_at_once() {
    let shop = Shop::start(Answer::Json(201, "{}".into())).await;
    let flow = pizza_after(&format!("http://{}", shop.addr));
    let app = spawn_configured(&[("pizza.yaml", &flow)], |c| {
        c.http_allow = vec!["shop.example".into()];
    })
    .await;
    assert_eq!(
        metric_line(&app, "smsflow_call_jobs_pending ")
            .await
            .as_deref(),
        Some("smsflow_call_jobs_pending 0")
    );
    order(&app, "margherita").await;
    let attempts = "smsflow_flow_calls_total{host=\"127.0.0.1\",outcome=\"error\"}";
    let until = Instant::now() + Duration::from_secs(20);
    while metric_line(&app, attempts).await.is_none() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A retry would come about 1 s after the first attempt; wait past it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        metric_line(&app, attempts).await,
        Some(format!("{attempts} 1"))
    );
    assert_eq!(
        metric_line(&app, "smsflow_call_jobs_pending ")
            .await
            .as_deref(),
        Some("smsflow_call_jobs_pending 0")
    );
    assert!(shop.received().is_empty());
    app.stop().await;
}

/// The gauge counts a job while the shop keeps failing (it is retried).
#[tokio::test(flavor = "multi_thread")]
async fn a_retried_after_answer_call_is_counted_as_pending() {
    let shop = Shop::start(Answer::Json(503, "{}".into())).await;
    let flow = pizza_after(&format!("http://{}", shop.addr));
    let app = spawn_configured(&[("pizza.yaml", &flow)], after_config()).await;
    order(&app, "margherita").await;
    assert!(!received_at_least(&shop, 1).await.is_empty());
    assert_eq!(
        metric_line(&app, "smsflow_call_jobs_pending ")
            .await
            .as_deref(),
        Some("smsflow_call_jobs_pending 1")
    );
    app.stop().await;
}

/// A script flow asking the shop with `http()`: the order's state, and
/// an after-answer call telling the shop the sender asked.
fn lookup_script(url: &str) -> String {
    format!(
        r#"
fn on_message(msg, state) {{
    let r = http(#{{
        url: "{url}/orders/" + url_encode(msg.body),
        headers: #{{ Authorization: #{{ secret: "CARGO_PKG_NAME" }} }},
        timeout_ms: 8000,
    }});
    if !r.ok {{ return `failed: ${{r.error}}`; }}
    http(#{{ method: "POST", url: "{url}/seen", json: #{{ order: msg.body }}, after_answer: true }});
    `Order ${{msg.body}}: ${{r.json.state}}`
}}
"#
    )
}

const LOOKUP_YAML: &str =
    "trigger: {regex: '^A\\d+$'}\nscript: lookup.rhai\nfallback: \"script failed\"\n";

/// A script's `http()` is made by the server between runs of the script,
/// outside its limits: a shop slower than the script's 50 ms time budget
/// still answers it; a hanging one costs the call budget and the script
/// sees `timeout`; the after-answer call is made after the reply.
#[tokio::test(flavor = "multi_thread")]
async fn a_script_flow_calls_through_the_server_outside_its_time_budget() {
    let shop = Shop::start(Answer::Json(201, "{}".into())).await;
    shop.next
        .lock()
        .unwrap()
        .push_back(Answer::Slow(800, r#"{"state": "baking"}"#.into()));
    let url = format!("http://{}", shop.addr);
    let app = spawn_configured(
        &[
            ("lookup.yaml", LOOKUP_YAML),
            ("lookup.rhai", &lookup_script(&url)),
        ],
        |c| {
            c.http_allow = vec!["127.0.0.1".into()];
            c.call_budget = Duration::from_millis(1500);
        },
    )
    .await;
    let reply = app.send_sms(FROM, "A17").await;
    assert_eq!(bodies(&reply.body), vec!["Order A17: baking"]);
    let got = received_at_least(&shop, 2).await;
    assert!(
        got[0].head.starts_with("GET /orders/A17 "),
        "{}",
        got[0].head
    );
    assert!(
        got[0].head.contains("authorization: smsflow"),
        "{}",
        got[0].head
    );
    assert!(got[1].head.starts_with("POST /seen "), "{}", got[1].head);
    assert_eq!(got[1].body, r#"{"order":"A17"}"#);

    *shop.answer.lock().unwrap() = Answer::Hang;
    let started = Instant::now();
    let reply = app.send_sms(FROM, "A18").await;
    assert_eq!(bodies(&reply.body), vec!["failed: timeout"]);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    app.stop().await;
}

/// A flow started from outside (`POST /flows/{name}/start`) whose first
/// step calls: the call is made (through the same loop and budget as a
/// message's) and what the step says with its answer is sent; an
/// after-answer call of the start is made after it.
#[tokio::test(flavor = "multi_thread")]
async fn a_started_flow_makes_its_first_steps_calls() {
    use crate::fake_twilio::{bodies_sent, FakeTwilio};
    let shop = Shop::start(Answer::Json(200, r#"{"slot": "Tue 3pm"}"#.into())).await;
    let fake = FakeTwilio::start(TOKEN).await;
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(
        flows.join("remind.yaml"),
        format!(
            r#"
name: remind
steps:
  look:
    call:
      url: "http://{addr}/slots/{{{{message.from}}}}"
      on_error: sorry
    say: "Your appointment is {{{{call.json.slot}}}}."
    goto: tell
  tell:
    call:
      method: POST
      url: "http://{addr}/reminded"
      json: {{who: "{{{{message.from}}}}"}}
      after_answer: true
    end: true
  sorry:
    say: "Please call us about your appointment."
"#,
            addr = shop.addr
        ),
    )
    .unwrap();
    let mut config = crate::outbound::sending_config(&fake, &flows, &tmp.path().join("data"));
    config.http_allow = vec!["127.0.0.1".into()];
    let app = spawn_with(config).await;
    let ana = "+15557400031";
    let r = app
        .raw(
            app.client
                .post(app.url("/flows/remind/start"))
                .bearer_auth(ADMIN_TOKEN)
                .header("content-type", "application/json")
                .body(
                    serde_json::json!({"to": ana, "from": OUR_NUMBER, "idempotency_key": "r-1"})
                        .to_string(),
                ),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        bodies_sent(&fake, ana, 1).await,
        ["Your appointment is Tue 3pm."]
    );
    let got = received_at_least(&shop, 2).await;
    assert!(
        got[0].head.starts_with("GET /slots/%2B15557400031 "),
        "{}",
        got[0].head
    );
    assert!(
        got[1].head.starts_with("POST /reminded "),
        "{}",
        got[1].head
    );
    assert!(idempotency_key(&got[1]).is_some_and(|k| k.starts_with("start:r-1:")));
    app.stop().await;
}

/// A start queued behind a running conversation makes its first step's
/// calls when it starts (after the run ends), like a start made at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_queued_start_makes_its_first_steps_calls() {
    use crate::fake_twilio::{bodies_sent, FakeTwilio};
    let shop = Shop::start(Answer::Json(200, r#"{"slot": "Wed 9am"}"#.into())).await;
    let fake = FakeTwilio::start(TOKEN).await;
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(
        flows.join("remind.yaml"),
        format!(
            r#"
name: remind
steps:
  look:
    call:
      url: "http://{addr}/slots/{{{{message.from}}}}"
      on_error: sorry
    say: "Your appointment is {{{{call.json.slot}}}}."
    end: true
  sorry:
    say: "Please call us about your appointment."
"#,
            addr = shop.addr
        ),
    )
    .unwrap();
    std::fs::write(
        flows.join("busy.yaml"),
        "name: busy\ntrigger:\n  keywords: [BUSY]\nsteps:\n  ask:\n    say: Which day?\n    \
         wait:\n      - anything: true\n        goto: done\n  done:\n    say: Noted.\n",
    )
    .unwrap();
    let mut config = crate::outbound::sending_config(&fake, &flows, &tmp.path().join("data"));
    config.http_allow = vec!["127.0.0.1".into()];
    let mut app = spawn_with(config).await;
    app.public_url = format!("http://{}", app.addr);
    let ana = "+15557400032";
    let r = app.send_sms(ana, "busy").await;
    assert!(r.body.contains("Which day?"), "{}", r.body);
    let r = app
        .raw(
            app.client
                .post(app.url("/flows/remind/start"))
                .bearer_auth(ADMIN_TOKEN)
                .header("content-type", "application/json")
                .body(
                    serde_json::json!({"to": ana, "from": OUR_NUMBER,
                        "idempotency_key": "q-1", "if_busy": "queue"})
                    .to_string(),
                ),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(app.send_sms(ana, "monday").await.body.contains("Noted."));
    assert_eq!(
        bodies_sent(&fake, ana, 1).await,
        ["Your appointment is Wed 9am."]
    );
    let got = received_at_least(&shop, 1).await;
    assert!(
        got[0].head.starts_with("GET /slots/%2B15557400032 "),
        "{}",
        got[0].head
    );
    app.stop().await;
}

/// The sender's flow sees only the category of a failure; the detail
/// (here the allow-list's wording, naming the address) is in the log.
#[tokio::test(flavor = "multi_thread")]
async fn a_failures_detail_is_logged_not_shown() {
    let shop = Shop::start(Answer::Json(201, r#"{"id": 7}"#.into())).await;
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(
        flows.join("pizza.yaml"),
        in_process(pizza(&format!("http://{}", shop.addr))),
    )
    .unwrap();
    let config = tmp.path().join("smsflow.toml");
    std::fs::write(&config, "http_allow = [\"shop.example\"]\n").unwrap();
    let mut server = spawn_server_env(
        &flows,
        &tmp.path().join("data"),
        &["--config", config.to_str().unwrap()],
        &[],
    );
    server.send(FROM, "pizza", &new_sid()).await.unwrap();
    assert_eq!(
        bodies(&server.send(FROM, "margherita", &new_sid()).await.unwrap()),
        vec!["Sorry, the shop cannot take orders right now (refused)."]
    );
    let log = server.stop_and_read_log().await.join("\n");
    let line = log
        .lines()
        .find(|l| l.contains("flow call failed"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("error=refused"), "{line}");
    assert!(line.contains("127.0.0.1 is not in http_allow"), "{line}");
    assert!(shop.received().is_empty());
}
