//! Contacts from outside through the front door: CSV imports checked whole
//! (every bad line reported, nothing imported), fields landing in the
//! conversations of our number where flows read them, exports back to
//! CSV safe for spreadsheets, and the `smsflow contacts` CLI against the
//! running server.

use crate::helpers::*;

const HELLO: &str = r#"
name: hello
fields: [name, appt]
trigger: { keywords: [APPT] }
steps:
  show:
    say: "{{contact.name}}: {{contact.appt}}"
    end: true
"#;

async fn post_csv(app: &TestApp, from: &str, csv: &str) -> Reply {
    app.raw(
        app.client
            .post(app.url(&format!("/contacts?from={}", from.replace('+', "%2B"))))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "text/csv")
            .body(csv.to_owned()),
    )
    .await
}

async fn export(app: &TestApp, from: &str) -> Reply {
    app.raw(
        app.client
            .get(app.url(&format!("/contacts?from={}", from.replace('+', "%2B"))))
            .bearer_auth(ADMIN_TOKEN),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_import_is_checked_whole_and_its_fields_reach_the_flows() {
    let app = spawn_app(&[("hello.yaml", HELLO)]).await;
    let bad = "phone,name,appt\n+15557500001,Ana,Tue 3pm\n555-750-0002,Ben,Wed\n+15557500003,Cy\n";
    let r = post_csv(&app, OUR_NUMBER, bad).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let json: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let lines: Vec<u64> = json["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, [3, 4], "{json}");
    assert_eq!(json["imported"], 0);
    // Nothing was imported, not even the good first row.
    assert_eq!(export(&app, OUR_NUMBER).await.body, "phone\r\n");

    let good = "phone,name,appt\n+1 (555) 750-0001,Ana,Tue 3pm\n+15557500002,=cmd(),\"Wed, 9am\"\n";
    let r = post_csv(&app, OUR_NUMBER, good).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let summary: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        (&summary["rows"], &summary["created"]),
        (&2.into(), &2.into())
    );
    assert_eq!(
        bodies(&app.send_sms("+15557500001", "appt").await.body),
        ["Ana: Tue 3pm"]
    );
    // Fields belong to the conversation with that number only.
    assert_eq!(export(&app, "+15550009999").await.body, "phone\r\n");
    let csv = export(&app, OUR_NUMBER).await;
    assert_eq!(csv.status, 200);
    assert!(
        csv.content_type.starts_with("text/csv"),
        "{}",
        csv.content_type
    );
    assert_eq!(
        csv.body,
        "phone,appt,name\r\n'+15557500001,Tue 3pm,Ana\r\n'+15557500002,\"Wed, 9am\",'=cmd()\r\n"
    );
    // Importing the export again changes nothing; an empty cell keeps a field.
    let r = post_csv(&app, OUR_NUMBER, &csv.body).await;
    assert!(r.body.contains("\"unchanged\":2"), "{}", r.body);
    let r = post_csv(&app, OUR_NUMBER, "phone,name,appt\n+15557500001,,Fri\n").await;
    assert!(r.body.contains("\"updated\":1"), "{}", r.body);
    assert_eq!(
        bodies(&app.send_sms("+15557500001", "appt").await.body),
        ["Ana: Fri"]
    );
    // Without the token: 401.
    let r = app
        .raw(app.client.get(app.url("/contacts?from=%2B15550001111")))
        .await;
    assert_eq!(r.status, 401);
}

async fn post_json(app: &TestApp, body: &str) -> (u16, serde_json::Value) {
    let r = app
        .raw(
            app.client
                .post(app.url("/contacts?from=%2B15550001111"))
                .bearer_auth(ADMIN_TOKEN)
                .header("content-type", "application/json")
                .body(body.to_owned()),
        )
        .await;
    let json = serde_json::from_str(&r.body).unwrap_or(serde_json::Value::String(r.body));
    (r.status, json)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_json_import_is_checked_whole_with_indexes_like_csv() {
    let app = spawn_app(&[("hello.yaml", HELLO)]).await;
    let bad = r#"[{"phone": "+15557510001", "fields": {"name": "Ana", "appt": "Tue 3pm"}},
                  {"phone": "555-751-0002", "fields": {"name": "Ben"}},
                  {"phone": "+15557510003", "fields": {"bad name": "Cy"}},
                  {"phone": "+15557510001"}]"#;
    let (code, json) = post_json(&app, bad).await;
    assert_eq!(code, 400, "{json}");
    let at: Vec<u64> = json["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    assert_eq!(
        (at, &json["imported"]),
        (vec![1, 2, 3], &0.into()),
        "{json}"
    );
    // Nothing was imported, not even the good first contact.
    assert_eq!(export(&app, OUR_NUMBER).await.body, "phone\r\n");
    let (code, json) = post_json(&app, r#"{"phone": "+15557510001"}"#).await;
    assert_eq!(code, 400, "{json}");
    assert!(json.to_string().contains("JSON list"), "{json}");

    let good = r#"[{"phone": "+1 555 751 0001", "fields": {"name": "Ana", "appt": "Tue 3pm"}},
                   {"phone": "+15557510002", "fields": {"name": "Ben"}}]"#;
    let (code, summary) = post_json(&app, good).await;
    assert_eq!(code, 200, "{summary}");
    assert_eq!(
        (&summary["rows"], &summary["created"]),
        (&2.into(), &2.into())
    );
    assert_eq!(
        bodies(&app.send_sms("+15557510001", "appt").await.body),
        ["Ana: Tue 3pm"]
    );
    // An empty value keeps a field, as an empty CSV cell does.
    let (_, summary) = post_json(
        &app,
        r#"[{"phone": "+15557510001", "fields": {"name": "", "appt": "Fri"}}]"#,
    )
    .await;
    assert_eq!(summary["updated"], 1, "{summary}");
    assert_eq!(
        bodies(&app.send_sms("+15557510001", "appt").await.body),
        ["Ana: Fri"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_imports_and_exports_through_the_running_server() {
    let app = spawn_app(&[("hello.yaml", HELLO)]).await;
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        "phone,name\n+15557600001,Ana\n12345,Ben\n+15557600001,Ana\n",
    )
    .unwrap();
    let good = dir.path().join("good.csv");
    std::fs::write(
        &good,
        "phone,name,appt\n+15557600001,Ana,Tue\n+15557600002,Ben,Wed\n",
    )
    .unwrap();
    let server = format!("http://{}", app.addr);
    let run = move |args: Vec<String>| {
        let server = server.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_smsflow"))
                .args(&args)
                .env("SMSFLOW_ADMIN_TOKEN", ADMIN_TOKEN)
                .env("SMSFLOW_SERVER", server)
                .output()
                .unwrap()
        })
    };
    let s = |x: &str| x.to_owned();
    let out = run(vec![
        s("contacts"),
        s("import"),
        bad.display().to_string(),
        s("--from"),
        s(OUR_NUMBER),
    ])
    .await
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.csv:3: phone:"), "{err}");
    assert!(
        err.contains("bad.csv:4: +15557600001 is already on line 2"),
        "{err}"
    );
    assert!(err.contains("nothing imported"), "{err}");
    let out = run(vec![
        s("contacts"),
        s("import"),
        good.display().to_string(),
        s("--from"),
        s(OUR_NUMBER),
    ])
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "imported 2 rows: 2 new, 0 updated, 0 unchanged\n"
    );
    let out = run(vec![s("contacts"), s("export"), s("--from"), s(OUR_NUMBER)])
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "phone,appt,name\r\n'+15557600001,Tue,Ana\r\n'+15557600002,Wed,Ben\r\n"
    );
    // `smsflow start` through the same server (its message waits in the
    // outbox: this server has no Twilio credentials); the same key
    // answers the same.
    let start = || {
        vec![
            s("start"),
            s("hello"),
            s("--to"),
            s("+15557600001"),
            s("--from"),
            s(OUR_NUMBER),
            s("--key"),
            s("cli-1"),
            s("--field"),
            s("appt=Thu"),
        ]
    };
    let first = run(start()).await.unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let first: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(
        (&first["result"], &first["duplicate"]),
        (&"started".into(), &false.into())
    );
    let again = run(start()).await.unwrap();
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(
        (&again["result"], &again["duplicate"]),
        (&"started".into(), &true.into())
    );
    assert_eq!(first["outbox"], again["outbox"]);
}
