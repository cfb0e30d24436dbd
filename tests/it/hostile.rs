//! Hostile connections and cheap requests: clients that connect and
//! never finish, idle keep-alive connections, declared bodies over the
//! limit, forms with thousands of parameters, HEAD, and what slow clients
//! leave in the log.

use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;

use crate::helpers::*;
use crate::process::spawn_server;

const KEYWORDS: &str = "keywords:\n  HOURS: open\n";

async fn spawn_keywords(edit: impl FnOnce(&mut smsflow::config::Config)) -> TestApp {
    spawn_configured(&[("k.yaml", KEYWORDS)], edit).await
}

/// The start of a request that never gets its last header line.
const PARTIAL_HEAD: &[u8] = b"POST /twilio/sms HTTP/1.1\r\nHost: x\r\nX-Slow: ";

/// Write one more byte of a header to each connection every 50 ms, as a
/// slowloris client does, until the returned sender is dropped.
fn trickle(mut conns: Vec<OwnedWriteHalf>) -> tokio::sync::oneshot::Sender<()> {
    let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        loop {
            for c in &mut conns {
                let _ = c.write_all(b"a").await;
            }
            tokio::select! {
                _ = &mut rx => break,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    });
    tx
}

/// Read until the server closes the connection (EOF or reset).
async fn until_closed(conn: &mut (impl AsyncRead + Unpin)) {
    let mut buf = [0u8; 1024];
    loop {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Whether the server has closed `conn`, waiting at most `wait`.
async fn closed_within(conn: &mut (impl AsyncRead + Unpin), wait: Duration) -> bool {
    tokio::time::timeout(wait, until_closed(conn)).await.is_ok()
}

/// Read one HTTP/1.1 response with a `Content-Length`: (status line, body).
/// Reads until the end of a response head; returns what was read and the
/// head's length (blank line included).
async fn read_head(conn: &mut TcpStream) -> (Vec<u8>, usize) {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            return (data, i + 4);
        }
        let n = conn.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed before a response");
        data.extend_from_slice(&buf[..n]);
    }
}

async fn read_response(conn: &mut TcpStream) -> (String, String) {
    let (mut data, head_end) = read_head(conn).await;
    let mut buf = [0u8; 4096];
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while data.len() < head_end + length {
        let n = conn.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed inside a response");
        data.extend_from_slice(&buf[..n]);
    }
    let status = head.lines().next().unwrap_or("").to_string();
    let body = String::from_utf8_lossy(&data[head_end..head_end + length]).into_owned();
    (status, body)
}

/// A signed webhook on a connection of its own (as a new caller would
/// come), answered within a second or failing the test.
async fn webhook_within_a_second(app: &TestApp, from: &str, body: &str) -> Reply {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let params = sms_params(from, body, &new_sid());
    let sig = app
        .validator
        .compute(&app.signed_url("/twilio/sms"), &params);
    let request = client
        .post(app.url("/twilio/sms"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-twilio-signature", sig)
        .body(encode_form(&params));
    tokio::time::timeout(Duration::from_secs(1), app.raw(request))
        .await
        .expect("the webhook was not answered within a second")
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_and_slowloris_connections_past_the_limit_do_not_stop_webhooks() {
    // Timeouts far longer than the test: only making room can help here.
    let app = spawn_keywords(|c| {
        c.max_connections = 16;
        c.header_read_timeout = Duration::from_secs(60);
        c.idle_timeout = Duration::from_secs(60);
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(TcpStream::connect(app.addr).await.unwrap());
    }
    let mut slow = Vec::new();
    for _ in 0..8 {
        let mut c = TcpStream::connect(app.addr).await.unwrap();
        c.write_all(PARTIAL_HEAD).await.unwrap();
        slow.push(c.into_split().1);
    }
    let stop_trickling = trickle(slow);
    for i in 0..3 {
        let r = webhook_within_a_second(&app, &format!("+1555300000{i}"), "hours").await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(bodies(&r.body), vec!["open"]);
        // More idle connections between webhooks: each is answered anyway.
        for _ in 0..10 {
            held.push(TcpStream::connect(app.addr).await.unwrap());
        }
    }
    drop(stop_trickling);
    // The limit still holds: the server closed all but 16 of those it took.
    let mut still_open = 0;
    for c in &mut held {
        if !closed_within(c, Duration::from_millis(20)).await {
            still_open += 1;
        }
    }
    assert!(still_open <= 16, "{still_open} idle connections still open");
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_that_never_complete_a_head_are_closed_after_the_header_read_timeout() {
    let app = spawn_keywords(|c| c.header_read_timeout = Duration::from_millis(300)).await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(app.addr).await.unwrap();
    let mut slow = TcpStream::connect(app.addr).await.unwrap();
    slow.write_all(PARTIAL_HEAD).await.unwrap();
    let (mut slow_read, slow_write) = slow.into_split();
    let stop_trickling = trickle(vec![slow_write]);
    assert!(
        closed_within(&mut silent, Duration::from_secs(5)).await,
        "a connection that sent nothing is still open"
    );
    assert!(started.elapsed() >= Duration::from_millis(290));
    assert!(
        closed_within(&mut slow_read, Duration::from_secs(5)).await,
        "a connection trickling its head is still open"
    );
    drop(stop_trickling);
    // Real requests are unaffected.
    assert_eq!(
        bodies(&app.send_sms("+15553100000", "hours").await.body),
        vec!["open"]
    );
}

const GET_METRICS: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";

/// A server with these timeouts and a connection to it that has had one
/// answered request, so it is now kept alive.
async fn kept_alive(header_read: Duration, idle: Duration) -> (TestApp, TcpStream) {
    let app = spawn_keywords(|c| {
        c.header_read_timeout = header_read;
        c.idle_timeout = idle;
    })
    .await;
    let mut conn = TcpStream::connect(app.addr).await.unwrap();
    conn.write_all(GET_METRICS).await.unwrap();
    assert!(read_response(&mut conn).await.0.starts_with("HTTP/1.1 200"));
    (app, conn)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kept_alive_connection_is_closed_after_the_idle_timeout() {
    let (_app, mut conn) =
        kept_alive(Duration::from_millis(300), Duration::from_millis(1500)).await;
    // A pause longer than the header-read timeout but within the idle
    // timeout: the same connection serves the next request.
    tokio::time::sleep(Duration::from_millis(700)).await;
    conn.write_all(GET_METRICS).await.unwrap();
    assert!(read_response(&mut conn).await.0.starts_with("HTTP/1.1 200"));
    let idle_from = Instant::now();
    assert!(
        closed_within(&mut conn, Duration::from_secs(6)).await,
        "an idle keep-alive connection is still open"
    );
    assert!(idle_from.elapsed() >= Duration::from_millis(1400));
}

/// After a keep-alive pause, a head that trickles in is cut at the
/// header-read timeout from its first byte, not at the (much longer) idle
/// timeout: the connection's timer is not re-armed by every phase change,
/// so this holds that it is never armed too late either.
#[tokio::test(flavor = "multi_thread")]
async fn a_head_trickled_after_a_keep_alive_pause_is_cut_at_the_header_read_timeout() {
    let (_app, mut conn) = kept_alive(Duration::from_millis(400), Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    conn.write_all(PARTIAL_HEAD).await.unwrap();
    let first_byte = Instant::now();
    let (mut read, write) = conn.into_split();
    let stop_trickling = trickle(vec![write]);
    assert!(
        closed_within(&mut read, Duration::from_secs(5)).await,
        "a head trickled after a keep-alive pause is still open"
    );
    let took = first_byte.elapsed();
    drop(stop_trickling);
    assert!(took >= Duration::from_millis(390), "cut after {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_finishes_requests_in_flight_without_waiting_for_slow_heads() {
    let app = spawn_keywords(|c| c.header_read_timeout = Duration::from_secs(1)).await;
    let mut slow = TcpStream::connect(app.addr).await.unwrap();
    slow.write_all(PARTIAL_HEAD).await.unwrap();
    let _silent = TcpStream::connect(app.addr).await.unwrap();

    // A webhook whose body is still arriving when shutdown begins.
    let params = sms_params("+15553200000", "hours", &new_sid());
    let sig = app
        .validator
        .compute(&app.signed_url("/twilio/sms"), &params);
    let body = encode_form(&params);
    let (first, rest) = body.as_bytes().split_at(body.len() / 2);
    let mut in_flight = TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /twilio/sms HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         X-Twilio-Signature: {sig}\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    in_flight.write_all(head.as_bytes()).await.unwrap();
    // `100 Continue` comes when the handler starts reading the body.
    let mut buf = [0u8; 64];
    let n = in_flight.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 100"));
    in_flight.write_all(first).await.unwrap();

    let stopping = tokio::spawn(app.stop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !stopping.is_finished(),
        "shutdown did not wait for a request"
    );
    in_flight.write_all(rest).await.unwrap();
    let (status, answer) = read_response(&mut in_flight).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(bodies(&answer), vec!["open"]);
    // The trickling head is cut at its header-read timeout, not waited for.
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shutdown waited for a connection that never sent a request")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_declared_body_over_the_limit_gets_413_at_once() {
    // The request time limit (10 s) is what used to end this.
    let app = spawn_keywords(|_| {}).await;
    let (status, body) = answer_to_declared_length(app.addr, 10_000_000).await;
    assert!(status.starts_with("HTTP/1.1 413"), "{status}");
    assert_eq!(body, "request body too large\n");
    // A body within the limit is unaffected.
    assert_eq!(
        bodies(&app.send_sms("+15553300000", "hours").await.body),
        vec!["open"]
    );
}

/// A `max_body_bytes` above axum's own default body limit (2 MiB) is the
/// limit on the webhook: its direct route reads the body under the
/// configured limit, as the router does.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_limit_above_two_mib_is_the_limit() {
    let app = spawn_keywords(|c| c.max_body_bytes = 3 << 20).await;
    let text = "a".repeat((2 << 20) + 4096);
    let r = app.send_sms("+15553300002", &text).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Past it, refused (the head alone: the server answers before the body).
    let (status, _) = answer_to_declared_length(app.addr, (3 << 20) + 1).await;
    assert!(status.starts_with("HTTP/1.1 413"), "{status}");
}

/// Send a webhook's head declaring a body of `length` bytes, and none of
/// the body; the answer, which must come within 3 s.
async fn answer_to_declared_length(addr: std::net::SocketAddr, length: usize) -> (String, String) {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /twilio/sms HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: {length}\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(3), read_response(&mut conn))
        .await
        .expect("no prompt answer")
}

/// A body refused before it was read to its end ends its connection, and
/// the answer says so: a client that kept the connection would write its
/// next request into a socket the server has closed (a broken pipe, seen
/// now and then in `webhook::bad_input_gets_clear_4xx` before).
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_body_closes_its_connection_and_says_so() {
    let app = spawn_keywords(|_| {}).await;
    let big = format!("Body={}", "a".repeat(200 * 1024));
    // Declared too large: refused at once.
    let resp = app
        .client
        .post(app.url("/twilio/sms"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    assert_eq!(
        resp.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    // The same client's next request is served.
    assert_eq!(
        bodies(&app.send_sms("+15553300001", "hours").await.body),
        vec!["open"]
    );

    // Sent in chunks, with no length: the body limit stops reading it.
    let mut conn = TcpStream::connect(app.addr).await.unwrap();
    conn.write_all(
        b"POST /twilio/sms HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
          X-Twilio-Signature: x\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .await
    .unwrap();
    for chunk in big.as_bytes().chunks(16 * 1024) {
        let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
        framed.extend_from_slice(chunk);
        framed.extend_from_slice(b"\r\n");
        if conn.write_all(&framed).await.is_err() {
            break; // the server has answered and closed
        }
    }
    let (data, head_end) = tokio::time::timeout(Duration::from_secs(5), read_head(&mut conn))
        .await
        .expect("no answer");
    let head = String::from_utf8_lossy(&data[..head_end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 413"), "{head}");
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
}

#[tokio::test(flavor = "multi_thread")]
async fn thousands_of_parameters_are_refused_before_the_signature_is_checked() {
    let app = spawn_keywords(|_| {}).await;
    let mut params = sms_params("+15553400000", "hours", &new_sid());
    params.extend((0..5000).map(|i| (format!("P{i}"), "x".to_string())));
    // Unsigned, and signed: the count is refused either way, first.
    let r = app
        .post_form("/twilio/sms", &params, Some("bm90IGEgc2lnbmF0dXJl"))
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body, "malformed form body: more than 256 parameters\n");
    let r = app.post_signed("/twilio/sms", &params).await;
    assert_eq!(r.status, 400, "{}", r.body);
    // In the query string too.
    let path = format!("/twilio/sms?{}", encode_form(&params));
    let r = app.raw(app.client.get(app.url(&path))).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let metrics = app.raw(app.client.get(app.url("/metrics"))).await.body;
    assert!(
        metrics.contains("smsflow_rejected_signatures_total 0"),
        "{metrics}"
    );

    // A real message with many extra parameters is still served.
    let mut params = sms_params("+15553400001", "hours", &new_sid());
    params.extend((0..200).map(|i| (format!("AddOn{i}"), "x".to_string())));
    let r = app.post_signed("/twilio/sms", &params).await;
    assert_eq!(bodies(&r.body), vec!["open"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn head_does_not_run_a_flow() {
    let signup =
        std::fs::read_to_string(format!("{}/flows/signup.yaml", env!("CARGO_MANIFEST_DIR")))
            .unwrap();
    let app = spawn_configured(
        &[
            ("signup.yaml", &signup),
            ("k.yaml", "default: \"Text JOIN\"\n"),
        ],
        |_| {},
    )
    .await;
    let me = "+15553500000";
    let path = format!(
        "/twilio/sms?{}",
        encode_form(&sms_params(me, "join", &new_sid()))
    );
    let sig = app.validator.compute(&app.signed_url(&path), &[]);
    let r = app
        .client
        .head(app.url(&path))
        .header("x-twilio-signature", sig)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET, POST");
    // The conversation did not start: this is not taken as the name.
    assert_eq!(
        bodies(&app.send_sms(me, "Dee").await.body),
        vec!["Text JOIN"]
    );
    // Other methods get the same answer.
    let r = app
        .raw(app.client.put(app.url("/twilio/sms")).body("x"))
        .await;
    assert_eq!(r.status, 405);
    // GET itself still runs the flow.
    let sid = new_sid();
    let path = format!("/twilio/sms?{}", encode_form(&sms_params(me, "join", &sid)));
    let r = app.get_signed(&path).await;
    assert_eq!(bodies(&r.body), vec!["Hi! What's your name?"]);
}

#[test]
fn a_slow_client_cut_by_the_time_limit_is_a_warning_not_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(flows.join("k.yaml"), KEYWORDS).unwrap();
    let config = tmp.path().join("smsflow.toml");
    std::fs::write(&config, "request_timeout_ms = 300\n").unwrap();
    let server = spawn_server(
        &flows,
        &tmp.path().join("data"),
        &["--no-watch", "--config", config.to_str().unwrap()],
    );
    let next_line_with = |needle: &str| -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let found = server
                .log
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
                .cloned();
            if let Some(line) = found {
                return line;
            }
            assert!(Instant::now() < deadline, "no log line with {needle:?}");
            std::thread::sleep(Duration::from_millis(25));
        }
    };

    let mut conn = std::net::TcpStream::connect(&server.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    std::io::Write::write_all(
        &mut conn,
        b"POST /twilio/sms HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
          Content-Length: 100\r\n\r\nBody=hi",
    )
    .unwrap();
    let mut answer = [0u8; 12];
    std::io::Read::read_exact(&mut conn, &mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 503");

    let line = next_line_with("request time limit exceeded");
    assert!(line.contains(" WARN "), "{line}");
    assert!(!line.contains("ERROR"), "{line}");
}
