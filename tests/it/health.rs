//! Health endpoints: `/livez`, `/readyz`, and `/status`
//! (`/healthz`) whose detail needs the admin token. All constant time.

use std::io::{Read, Write};
use std::time::Duration;

use crate::helpers::*;

const KEYWORDS: &str = "keywords:\n  HOURS: \"We're open 9-5\"\n";

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn livez_and_readyz_say_up_and_ready() {
    let app = spawn_app(&[("keywords.yaml", KEYWORDS)]).await;
    let live = app.raw(app.client.get(app.url("/livez"))).await;
    assert_eq!(live.status, 200);
    assert_eq!(json(&live.body), serde_json::json!({ "status": "ok" }));
    let ready = app.raw(app.client.get(app.url("/readyz"))).await;
    assert_eq!(ready.status, 200);
    assert_eq!(
        json(&ready.body),
        serde_json::json!({
            "status": "ready",
            "problems": [],
            "flows_loaded": true,
            "store": { "writable": true, "quarantined_records": 0 },
        })
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn status_detail_needs_the_admin_token() {
    let signup =
        std::fs::read_to_string(format!("{}/flows/signup.yaml", env!("CARGO_MANIFEST_DIR")))
            .unwrap();
    let app = spawn_app(&[("signup.yaml", &signup)]).await;
    for sender in ["+15550000001", "+15550000002"] {
        app.send_sms(sender, "JOIN").await;
    }
    for path in ["/status", "/healthz"] {
        // Without the token, or with a wrong one: ok or not, and the
        // version; no paths, no reload errors, no counts.
        for token in [None, Some("wrong-token")] {
            let mut req = app.client.get(app.url(path));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let r = app.raw(req).await;
            assert_eq!(r.status, 200);
            let v = json(&r.body);
            assert_eq!(v["status"], "ok");
            assert_eq!(v["flows"]["version"].as_str().unwrap().len(), 64);
            assert_eq!(v.as_object().unwrap().len(), 2, "{path}: {v}");
            assert_eq!(v["flows"].as_object().unwrap().len(), 1, "{path}: {v}");
        }
        let v = app.admin_json(path).await;
        assert_eq!(v["status"], "ok");
        assert_eq!(v["conversations"], 2, "{v}");
        assert!(v["flows"]["last_error"].is_null());
        let file = v["flows"]["files"][0].as_str().unwrap();
        assert!(file.ends_with("signup.yaml"), "{v}");
        let dir = v["store"]["dir"].as_str().unwrap();
        assert!(std::path::Path::new(dir).is_absolute(), "{v}");
        assert_eq!(v["store"]["writable"], true);
        assert_eq!(v["store"]["quarantined_records"], 0);
    }
}

/// Once shutdown begins, a request still being read is answered, and
/// `/readyz` in it says 503 so a balancer stops sending traffic.
#[tokio::test(flavor = "multi_thread")]
async fn readyz_is_503_once_shutdown_begins() {
    let mut app = spawn_app(&[("keywords.yaml", KEYWORDS)]).await;
    let addr = app.addr;
    let mut conn = tokio::task::spawn_blocking(move || {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // Half a request: the connection is busy, not idle.
        c.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n").unwrap();
        c
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answer = tokio::task::spawn_blocking(move || {
        conn.write_all(b"\r\n").unwrap();
        let mut text = String::new();
        let _ = conn.read_to_string(&mut text);
        text
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("shutting_down"), "{answer}");
    app.stop().await;
}
