//! Slow-client and abuse hygiene: header size, whole-request time limit,
//! connection limit.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::helpers::*;

async fn spawn_limited(edit: impl FnOnce(&mut smsflow::config::Config)) -> TestApp {
    spawn_configured(
        &[(
            "k.yaml",
            "keywords:
  HOURS: open
",
        )],
        edit,
    )
    .await
}

fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_headers_get_431() {
    let app = spawn_limited(|_| {}).await;
    let r = app
        .raw(
            app.client
                .get(app.url("/healthz"))
                .header("x-junk", "a".repeat(20 * 1024)),
        )
        .await;
    assert_eq!(r.status, 431);
    assert_eq!(
        app.raw(app.client.get(app.url("/healthz"))).await.status,
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_that_never_finishes_gets_503_at_the_time_limit() {
    let app = spawn_limited(|c| c.request_timeout = Duration::from_millis(300)).await;
    let addr = app.addr;
    let answer = tokio::task::spawn_blocking(move || {
        raw_exchange(
            addr,
            b"POST /twilio/sms HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\nConnection: close\r\n\r\nBody=hi",
        )
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    // The server still serves others.
    assert_eq!(
        bodies(&app.send_sms("+15552220000", "hours").await.body),
        vec!["open"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_past_the_limit_wait_while_every_place_serves_a_request() {
    let app = spawn_limited(|c| c.max_connections = 2).await;
    // Two requests whose bodies are still arriving take both places (idle
    // connections would be closed to make room; see hostile.rs).
    let serving = || {
        let mut s = TcpStream::connect(app.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(
            b"POST /twilio/sms HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
              Content-Length: 100\r\nExpect: 100-continue\r\n\r\n",
        )
        .unwrap();
        // `100 Continue` once the handler reads the body: it is serving.
        let mut continue_line = [0u8; 12];
        s.read_exact(&mut continue_line).unwrap();
        assert_eq!(&continue_line, b"HTTP/1.1 100");
        s.write_all(b"Body=hi").unwrap();
        s
    };
    let a = tokio::task::block_in_place(serving);
    let b = tokio::task::block_in_place(serving);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    assert!(
        client.get(app.url("/metrics")).send().await.is_err(),
        "a third connection was served"
    );
    drop(a);
    let r = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    drop(b);
}
