//! Verified webhooks in, TwiML out, keyword replies, state in sled.

use crate::helpers::*;
use smsflow::store::Store;

const KEYWORDS: &str = r#"
keywords:
  HOURS: "We're open 9-5"
  ADDRESS:
    - "12 Main Street"
    - "Parking behind the building"
default: "Sorry, I don't know \"{{message.body}}\". Text HOURS."
"#;

const KEYWORDS_SILENT: &str = r#"
keywords:
  HOURS: "We're open 9-5"
"#;

const SILENCE: &str = r#"<?xml version="1.0" encoding="UTF-8"?><Response/>"#;

#[tokio::test(flavor = "multi_thread")]
async fn keyword_gets_its_reply() {
    let app = spawn_app(&[("keywords.yaml", KEYWORDS)]).await;
    let r = app.send_sms("+15557654321", "HOURS").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.content_type, "text/xml; charset=utf-8");
    assert_eq!(
        r.body,
        r#"<?xml version="1.0" encoding="UTF-8"?><Response><Message><Body>We're open 9-5</Body></Message></Response>"#
    );
    // Case, surrounding whitespace and punctuation do not matter.
    let r = app.send_sms("+15557654321", "  hours?! ").await;
    assert_eq!(bodies(&r.body), vec!["We're open 9-5"]);
    // A list is several messages, in order.
    let r = app.send_sms("+15557654321", "address").await;
    assert_eq!(
        bodies(&r.body),
        vec!["12 Main Street", "Parking behind the building"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_match_gets_the_default_reply() {
    let app = spawn_app(&[("keywords.yaml", KEYWORDS)]).await;
    let r = app.send_sms("+15557654321", "what are your hours").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        bodies(&r.body),
        vec![r#"Sorry, I don't know "what are your hours". Text HOURS."#]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_match_without_default_is_exact_silence() {
    let app = spawn_app(&[("keywords.yaml", KEYWORDS_SILENT)]).await;
    let r = app.send_sms("+15557654321", "hello").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.content_type, "text/xml; charset=utf-8");
    assert_eq!(r.body, SILENCE);
    let metrics = app.raw(app.client.get(app.url("/metrics"))).await.body;
    assert!(
        metrics.contains("smsflow_silences_total{reason=\"no_match\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_and_forged_signatures_are_refused() {
    let app = spawn_app(&[("keywords.yaml", KEYWORDS)]).await;
    let params = sms_params("+15557654321", "HOURS", &new_sid());
    let missing = app.post_form("/twilio/sms", &params, None).await;
    assert_eq!(missing.status, 403);
    assert_eq!(missing.body, "forbidden\n");

    let forged = app
        .post_form("/twilio/sms", &params, Some("L/OH5YylLD5NRKLltdqwSvS0BnU="))
        .await;
    assert_eq!(forged.status, 403);
    assert_eq!(forged.body, "forbidden\n");

    // Signed correctly, then one parameter changed in transit.
    let sig = app
        .validator
        .compute(&app.signed_url("/twilio/sms"), &params);
    let mut tampered = params.clone();
    for (k, v) in tampered.iter_mut() {
        if k == "Body" {
            *v = "ADDRESS".into();
        }
    }
    let r = app.post_form("/twilio/sms", &tampered, Some(&sig)).await;
    assert_eq!(r.status, 403);

    // Signed with another token.
    let other = smsflow::twilio::RequestValidator::new("another-token");
    let sig = other.compute(&app.signed_url("/twilio/sms"), &params);
    assert_eq!(
        app.post_form("/twilio/sms", &params, Some(&sig))
            .await
            .status,
        403
    );

    // Signed for another URL (a guessed Host is never trusted).
    let sig = app
        .validator
        .compute(&format!("http://{}/twilio/sms", app.addr), &params);
    assert_eq!(
        app.post_form("/twilio/sms", &params, Some(&sig))
            .await
            .status,
        403
    );

    let metrics = app.raw(app.client.get(app.url("/metrics"))).await.body;
    assert!(
        metrics.contains("smsflow_rejected_signatures_total 5"),
        "{metrics}"
    );
    assert!(
        metrics.contains("smsflow_messages_received_total 0"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn get_webhook_signs_the_full_url() {
    let app = spawn_app(&[("keywords.yaml", KEYWORDS)]).await;
    let params = sms_params("+15557654321", "hours", &new_sid());
    let path = format!("/twilio/sms?{}", encode_form(&params));
    let r = app.get_signed(&path).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(bodies(&r.body), vec!["We're open 9-5"]);

    // Unsigned GET is refused too.
    let r = app.raw(app.client.get(app.url(&path))).await;
    assert_eq!(r.status, 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn query_string_in_the_configured_url_is_signed() {
    let app = spawn_app(&[("keywords.yaml", KEYWORDS)]).await;
    let params = sms_params("+15557654321", "HOURS", &new_sid());
    // The operator configured https://…/twilio/sms?tenant=acme%20co&x=1
    let path = "/twilio/sms?tenant=acme%20co&x=1";
    let r = app.post_signed(path, &params).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(bodies(&r.body), vec!["We're open 9-5"]);
    // The same signature without the query does not verify.
    let sig = app
        .validator
        .compute(&app.signed_url("/twilio/sms"), &params);
    let r = app.post_form(path, &params, Some(&sig)).await;
    assert_eq!(r.status, 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn retried_message_sid_gets_identical_twiml() {
    let app = spawn_app(&[("keywords.yaml", KEYWORDS)]).await;
    let sid = new_sid();
    let first = app.send_sms_sid("+15557654321", "HOURS", &sid).await;
    let again = app.send_sms_sid("+15557654321", "HOURS", &sid).await;
    assert_eq!(first.status, 200);
    assert_eq!(again.status, 200);
    assert_eq!(first.body, again.body);
    // Even a retry whose body differs (impossible from Twilio, but a
    // replay attempt) gets the recorded answer, not a new run.
    let third = app.send_sms_sid("+15557654321", "ADDRESS", &sid).await;
    assert_eq!(third.body, first.body);
    let metrics = app.raw(app.client.get(app.url("/metrics"))).await.body;
    assert!(
        metrics.contains("smsflow_duplicate_messages_total 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn markup_in_user_text_is_escaped() {
    let app = spawn_app(&[("keywords.yaml", KEYWORDS)]).await;
    let evil = "</Body></Message><Message><Body>pwned & <b>\"x\"</b>";
    let r = app.send_sms("+15557654321", evil).await;
    assert_eq!(r.status, 200);
    assert!(!r.body.contains("<b>"), "{}", r.body);
    let got = bodies(&r.body);
    assert_eq!(got.len(), 1, "{}", r.body);
    assert_eq!(
        got[0],
        format!("Sorry, I don't know \"{evil}\". Text HOURS.")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn status_callbacks_are_monotonic() {
    let app = spawn_app(&[("keywords.yaml", KEYWORDS)]).await;
    let cb = |status: &str| -> Vec<(String, String)> {
        [
            ("SmsSid", "SMabc"),
            ("SmsStatus", status),
            ("MessageStatus", status),
            ("To", "+15557654321"),
            ("MessageSid", "SMabc"),
            ("AccountSid", "AC00000000000000000000000000000000"),
            ("From", OUR_NUMBER),
            ("ApiVersion", "2010-04-01"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    };
    for status in ["delivered", "sent", "queued", "sent"] {
        let r = app.post_signed("/twilio/status", &cb(status)).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, SILENCE);
    }
    let stored = app.store.delivery_status("SMabc").unwrap().unwrap();
    assert_eq!(stored.status, "delivered");

    // Failed with an error code on another message.
    let mut failed = cb("failed");
    for (k, v) in failed.iter_mut() {
        if k == "MessageSid" || k == "SmsSid" {
            *v = "SMdef".into();
        }
    }
    failed.push(("ErrorCode".into(), "30003".into()));
    assert_eq!(app.post_signed("/twilio/status", &failed).await.status, 200);
    let stored = app.store.delivery_status("SMdef").unwrap().unwrap();
    assert_eq!(stored.status, "failed");
    assert_eq!(stored.error_code.as_deref(), Some("30003"));

    // Unsigned callbacks are refused.
    assert_eq!(
        app.post_form("/twilio/status", &cb("read"), None)
            .await
            .status,
        403
    );
    // Unknown status value is a 400.
    assert_eq!(
        app.post_signed("/twilio/status", &cb("exploded"))
            .await
            .status,
        400
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_clear_4xx() {
    let app = spawn_app(&[("keywords.yaml", KEYWORDS)]).await;
    let url = app.url("/twilio/sms");
    let post = |ct: &str, body: Vec<u8>| {
        app.client
            .post(url.clone())
            .header("content-type", ct)
            .header("x-twilio-signature", "x")
            .body(body)
    };
    // Not a form.
    let r = app
        .raw(post("application/json", b"{\"Body\":\"hi\"}".to_vec()))
        .await;
    assert_eq!(r.status, 415);
    let r = app.raw(app.client.post(url.clone()).body("Body=hi")).await;
    assert_eq!(r.status, 415);
    // Invalid percent-encoding and invalid UTF-8.
    let r = app
        .raw(post(
            "application/x-www-form-urlencoded",
            b"Body=%zz&From=1".to_vec(),
        ))
        .await;
    assert_eq!(r.status, 400);
    assert!(r.body.starts_with("malformed form body"), "{}", r.body);
    let r = app
        .raw(post(
            "application/x-www-form-urlencoded",
            b"Body=%ff%fe&From=1".to_vec(),
        ))
        .await;
    assert_eq!(r.status, 400);
    // Over the size limit.
    let big = format!("Body={}", "a".repeat(200 * 1024));
    let r = app
        .raw(post("application/x-www-form-urlencoded", big.into_bytes()))
        .await;
    assert_eq!(r.status, 413);
    // Missing From / To / MessageSid, correctly signed.
    for missing in ["From", "To", "MessageSid"] {
        let params: Vec<_> = sms_params("+15557654321", "hi", &new_sid())
            .into_iter()
            .filter(|(k, _)| k != missing)
            .collect();
        let r = app.post_signed("/twilio/sms", &params).await;
        assert_eq!(r.status, 400, "missing {missing}");
        assert!(r.body.contains(missing), "{}", r.body);
    }
    // Unsupported method and unknown path.
    let r = app.raw(app.client.put(url.clone()).body("x")).await;
    assert_eq!(r.status, 405);
    let r = app.raw(app.client.get(app.url("/nope"))).await;
    assert_eq!(r.status, 404);
    // The server is still up and answering.
    assert_eq!(
        bodies(&app.send_sms("+15557654321", "HOURS").await.body),
        vec!["We're open 9-5"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn values_are_decoded_exactly() {
    let app = spawn_app(&[(
        "keywords.yaml",
        "keywords:\n  PING: \"pong {{message.body}}|\"\ndefault: \"[{{message.body}}]\"\n",
    )])
    .await;
    // `+` in the body arrives as %2B, spaces as `+`; nothing is trimmed.
    let r = app.send_sms("+15557654321", "  1+1 = 2  ").await;
    assert_eq!(bodies(&r.body), vec!["[  1+1 = 2  ]"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn healthz_and_metrics_answer() {
    let app = spawn_app(&[("keywords.yaml", KEYWORDS)]).await;
    app.send_sms("+15557654321", "HOURS").await;
    let h = app.raw(app.client.get(app.url("/healthz"))).await;
    assert_eq!(h.status, 200);
    let v: serde_json::Value = serde_json::from_str(&h.body).unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["flows"]["version"].as_str().unwrap().len(), 64);
    let m = app.raw(app.client.get(app.url("/metrics"))).await;
    assert_eq!(m.status, 200);
    assert!(m.body.contains("smsflow_messages_received_total 1"));
    assert!(m.body.contains("smsflow_replies_total 1"));
    assert!(m
        .body
        .contains("smsflow_request_duration_seconds_count{endpoint=\"sms\"} 1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn graceful_shutdown_keeps_the_dedupe_record() {
    let app = spawn_app(&[("keywords.yaml", KEYWORDS)]).await;
    let sid = new_sid();
    let first = app.send_sms_sid("+15557654321", "HOURS", &sid).await;
    let flows = app.flows_dir.clone();
    let data = app.data_dir.clone();
    let tmp = app.stop().await;
    let config = smsflow::config::Config::for_test(&flows, &data, TOKEN);
    let app = spawn_with(config).await.owning(tmp);
    let again = app.send_sms_sid("+15557654321", "HOURS", &sid).await;
    assert_eq!(first.body, again.body);
    let metrics = app.raw(app.client.get(app.url("/metrics"))).await.body;
    assert!(
        metrics.contains("smsflow_duplicate_messages_total 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn arbitrary_bodies_never_get_a_5xx() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let app = std::sync::Arc::new(spawn_app(&[("keywords.yaml", KEYWORDS)]).await);
    let handle = tokio::runtime::Handle::current();
    let a = app.clone();
    tokio::task::spawn_blocking(move || {
        let mut runner = TestRunner::new(Config {
            cases: 128,
            ..Config::default()
        });
        let bodies = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..512),
            // Form-shaped bodies with Twilio's names and hostile values,
            // signed correctly so they reach the flow engine.
            proptest::collection::vec(
                (
                    prop_oneof![
                        Just("Body".to_string()),
                        Just("NumMedia".to_string()),
                        Just("MediaUrl0".to_string()),
                        Just("OptOutType".to_string()),
                        ".{0,8}"
                    ],
                    ".{0,64}"
                ),
                0..8
            )
            .prop_map(|extra| {
                let mut p = sms_params("+15557654321", "x", &new_sid());
                p.extend(extra);
                encode_form(&p).into_bytes()
            }),
        ];
        runner
            .run(&bodies, |body| {
                let status = handle.block_on(async {
                    let params = smsflow::twilio::parse_form(&body).unwrap_or_default();
                    let sig = a.validator.compute(&a.signed_url("/twilio/sms"), &params);
                    a.client
                        .post(a.url("/twilio/sms"))
                        .header("content-type", "application/x-www-form-urlencoded")
                        .header("x-twilio-signature", sig)
                        .body(body.clone())
                        .send()
                        .await
                        .expect("request")
                        .status()
                        .as_u16()
                });
                prop_assert!(
                    status < 500,
                    "status {} for {:?}",
                    status,
                    String::from_utf8_lossy(&body)
                );
                Ok(())
            })
            .unwrap();
    })
    .await
    .unwrap();
    // Still up.
    assert_eq!(
        bodies(&app.send_sms("+15557654321", "HOURS").await.body),
        vec!["We're open 9-5"]
    );
}
