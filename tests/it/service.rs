//! Running as a service: systemd's notify protocol against a local socket,
//! credentials from `$CREDENTIALS_DIRECTORY`, JSON log lines read back from
//! the real binary's stderr, the admin port split, the drain at shutdown,
//! the operator's metrics, and the shipped unit file.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::helpers::*;
use crate::process::{spawn_server, spawn_server_env, ChildServer};

const KEYWORDS: &str = "keywords:\n  HOURS: \"We're open 9-5\"\n";

/// A socket standing in for systemd's `$NOTIFY_SOCKET`.
struct NotifySocket {
    socket: UnixDatagram,
    path: std::path::PathBuf,
}

impl NotifySocket {
    fn bind(dir: &std::path::Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        NotifySocket { socket, path }
    }

    /// The next datagram, as its lines (generous bound: a cold start on a
    /// busy machine).
    fn next(&self) -> Vec<String> {
        self.socket
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Nothing more arrives within `wait`.
    fn quiet_for(&self, wait: Duration) -> Option<Vec<String>> {
        self.socket.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(
            String::from_utf8_lossy(&buf[..n])
                .lines()
                .map(str::to_owned)
                .collect(),
        )
    }
}

async fn get(url: &str) -> (u16, String) {
    // A new client each time: a new connection, so a closed listener shows.
    let r = reqwest::Client::new().get(url).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_hears_ready_reloading_and_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(flows.join("k.yaml"), "keywords:\n  HOURS: one\n").unwrap();
    let notify = NotifySocket::bind(tmp.path());
    let mut server = spawn_server_env(
        &flows,
        &tmp.path().join("data"),
        &["--no-watch"],
        &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())],
    );

    // READY=1 once the server answers: /readyz says ready the moment it
    // arrives, and a webhook is served.
    assert_eq!(notify.next(), vec!["READY=1"]);
    let (status, body) = get(&format!("http://{}/readyz", server.addr)).await;
    assert_eq!(status, 200, "{body}");
    let r = server.send("+15550000001", "hours", &new_sid()).await;
    assert_eq!(bodies(&r.unwrap()), vec!["one"]);

    // SIGHUP: RELOADING=1 with the monotonic time, then READY=1 once the
    // new set serves.
    std::fs::write(flows.join("k.yaml"), "keywords:\n  HOURS: two\n").unwrap();
    server.signal("HUP");
    let reloading = notify.next();
    assert_eq!(reloading.len(), 2, "{reloading:?}");
    assert_eq!(reloading[0], "RELOADING=1");
    let usec: u64 = reloading[1]
        .strip_prefix("MONOTONIC_USEC=")
        .unwrap_or_else(|| panic!("{reloading:?}"))
        .parse()
        .unwrap();
    assert!(usec > 0);
    assert_eq!(notify.next(), vec!["READY=1"]);
    let r = server.send("+15550000001", "hours", &new_sid()).await;
    assert_eq!(bodies(&r.unwrap()), vec!["two"]);

    // SIGTERM: STOPPING=1, then a clean exit and nothing more.
    server.signal("TERM");
    assert_eq!(notify.next(), vec!["STOPPING=1"]);
    assert!(server.wait_exit(Duration::from_secs(30)).success());
    assert_eq!(notify.quiet_for(Duration::from_millis(200)), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_auth_token_can_come_from_a_systemd_credential() {
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(flows.join("k.yaml"), KEYWORDS).unwrap();
    let creds = tmp.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    // As `systemd-creds` and editors write it: with a final newline.
    std::fs::write(creds.join("TWILIO_AUTH_TOKEN"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(
        creds.join("SMSFLOW_ADMIN_TOKEN"),
        "admin-token-from-a-credential",
    )
    .unwrap();
    let mut server = spawn_server_env(
        &flows,
        &tmp.path().join("data"),
        &[],
        &[
            // Unset in the environment: the credential is used.
            ("TWILIO_AUTH_TOKEN", ""),
            ("CREDENTIALS_DIRECTORY", creds.to_str().unwrap()),
            // Set but empty, as a wrapper may leave it: not under systemd.
            ("NOTIFY_SOCKET", ""),
        ],
    );
    // Signed with the credential's token (and its newline not part of it).
    let r = server.send("+15550000001", "hours", &new_sid()).await;
    assert_eq!(bodies(&r.unwrap()), vec!["We're open 9-5"]);
    let r = reqwest::Client::new()
        .get(format!("http://{}/messages", server.addr))
        .bearer_auth("admin-token-from-a-credential")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let log = server.stop_and_read_log().await.join("\n");
    assert!(!log.contains("could not notify"), "{log}");
}

/// Every line of `server`'s stderr so far, parsed as JSON.
fn json_lines(server: &ChildServer) -> Vec<serde_json::Value> {
    let log = server.log.lock().unwrap().clone();
    log.iter()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}\n{log:#?}"))
        })
        .collect()
}

/// Wait until a line with this `message` is logged, and return it.
async fn logged(server: &ChildServer, message: &str) -> serde_json::Value {
    let started = Instant::now();
    loop {
        if let Some(line) = json_lines(server)
            .into_iter()
            .find(|l| l["message"] == message)
        {
            return line;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no {message:?} in {:#?}",
            server.log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn stop(mut server: ChildServer) -> Vec<serde_json::Value> {
    server.signal("TERM");
    assert!(server.wait_exit(Duration::from_secs(30)).success());
    logged(&server, "smsflow stopped; store flushed").await;
    json_lines(&server)
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_are_one_object_per_line_with_stable_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(
        flows.join("echo.yaml"),
        "trigger: {regex: \"^ECHO\"}\nscript: echo.rhai\nfallback: \"Sorry!\"\n",
    )
    .unwrap();
    std::fs::write(
        flows.join("echo.rhai"),
        "fn on_message(msg, state) { throw \"cannot \" + msg.body; }\n",
    )
    .unwrap();
    let ask = |step: &str| {
        format!(
            "trigger:\n  keywords: [ASK]\nsteps:\n  {step}:\n    say: \"First?\"\n    wait:\n      - anything: true\n        goto: last\n  last:\n    say: \"Done\"\n"
        )
    };
    std::fs::write(flows.join("ask.yaml"), ask("first")).unwrap();
    let data = tmp.path().join("data");
    let me = "+15550009876";
    let other = "+15550004321";

    // The flag; phone numbers hashed (the default).
    let server = spawn_server(&flows, &data, &["--log-format", "json"]);
    let listening = logged(&server, "smsflow listening").await;
    assert_eq!(listening["level"], "INFO");
    assert_eq!(listening["target"], "smsflow::app");
    assert_eq!(listening["addr"], server.addr.as_str());
    assert!(listening["timestamp"].as_str().unwrap().ends_with('Z'));
    let sid = new_sid();
    server.send(me, "STOP", &sid).await.unwrap();
    let out = logged(&server, "sender opted out").await;
    assert_eq!(out["span"], "sms");
    assert_eq!(out["message_sid"], sid.as_str());
    assert_eq!(out["cause"], "STOP");
    let hashed = out["from"].as_str().unwrap().to_owned();
    assert!(hashed.starts_with("h:") && hashed.len() == 18, "{out}");
    server.send(me, "START", &new_sid()).await.unwrap();
    // Parked at the step `first` of `ask` (edited away below).
    let r = server.send(other, "ASK", &new_sid()).await.unwrap();
    assert_eq!(bodies(&r), vec!["First?"]);
    // A script's failure: flow, file, line and column as fields, the
    // user's text escaped by JSON and not able to break the line.
    let body = "ECHO\n{\"level\":\"INFO\",\"message\":\"forged\"}";
    server.send(me, body, &new_sid()).await.unwrap();
    let failed = logged(&server, "script failed; answered with the flow's fallback").await;
    assert_eq!(failed["level"], "ERROR");
    assert_eq!(failed["flow"], "echo");
    assert!(failed["line"].is_u64(), "{failed}");
    assert!(failed["error"].as_str().unwrap().contains(body), "{failed}");
    let lines = stop(server).await;
    for line in &lines {
        for key in ["timestamp", "level", "target", "message"] {
            assert!(line.get(key).is_some(), "no {key} in {line}");
        }
        // The number itself is in no line at info.
        assert!(!line.to_string().contains("5550009876"), "{line}");
    }
    assert!(!lines.iter().any(|l| l["message"] == "forged"));

    // Restarted on the same data: the same number hashes the same. From
    // the config file key this time, and shown as configured there. The
    // step `first` is gone: its flow and step are fields of their own.
    std::fs::write(flows.join("ask.yaml"), ask("renamed")).unwrap();
    let config = tmp.path().join("smsflow.toml");
    std::fs::write(&config, "log_format = \"json\"\n").unwrap();
    let config_arg = config.to_str().unwrap();
    let server = spawn_server(&flows, &data, &["--config", config_arg]);
    server.send(me, "STOP", &new_sid()).await.unwrap();
    let again = logged(&server, "sender opted out").await;
    assert_eq!(again["from"], hashed.as_str());
    server.send(other, "hello", &new_sid()).await.unwrap();
    let stale = logged(&server, "flow event").await;
    assert_eq!(stale["event"], "stale_step", "{stale}");
    assert_eq!(stale["flow"], "ask", "{stale}");
    assert_eq!(stale["step"], "first", "{stale}");
    assert_eq!(stale["span"], "sms", "{stale}");
    stop(server).await;

    std::fs::write(
        &config,
        "log_format = \"json\"\nlog_phone_numbers = \"show\"\n",
    )
    .unwrap();
    let server = spawn_server(&flows, &data, &["--config", config_arg]);
    server.send(me, "START", &new_sid()).await.unwrap();
    let shown = logged(&server, "sender opted back in").await;
    assert_eq!(shown["from"], me);
    stop(server).await;

    // The environment variable; the text format stays the default.
    let server = spawn_server_env(&flows, &data, &[], &[("SMSFLOW_LOG_FORMAT", "json")]);
    logged(&server, "smsflow listening").await;
    stop(server).await;
    let mut server = spawn_server(&flows, &data, &[]);
    server.signal("TERM");
    assert!(server.wait_exit(Duration::from_secs(30)).success());
    let log = server.log.lock().unwrap().clone();
    assert!(
        log.iter().any(|l| l.contains("smsflow listening addr=")),
        "{log:#?}"
    );
    assert!(log.iter().all(|l| !l.starts_with('{')), "{log:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_port_serves_admin_paths_and_the_public_one_does_not() {
    let app = spawn_configured(&[("keywords.yaml", KEYWORDS)], |c| {
        c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let admin = app.admin_addr.expect("an admin address");
    assert_ne!(admin, app.addr);

    // Public: the webhooks and the probes, nothing else.
    assert_eq!(
        bodies(&app.send_sms("+15550000001", "hours").await.body),
        vec!["We're open 9-5"]
    );
    for path in ["/livez", "/readyz", "/healthz"] {
        assert_eq!(get(&app.url(path)).await.0, 200, "{path}");
    }
    for path in ["/metrics", "/status", "/messages", "/messages?limit=1"] {
        let r = app
            .raw(app.client.get(app.url(path)).bearer_auth(ADMIN_TOKEN))
            .await;
        assert_eq!(r.status, 404, "{path}: {}", r.body);
    }
    // /healthz on the public port never shows the admin detail.
    let r = app
        .raw(app.client.get(app.url("/healthz")).bearer_auth(ADMIN_TOKEN))
        .await;
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v.as_object().unwrap().len(), 2, "{v}");

    // Admin: metrics, status detail and the message log; no webhooks.
    let base = format!("http://{admin}");
    let (status, metrics) = get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("smsflow_messages_received_total 1\n"),
        "{metrics}"
    );
    let detail = app
        .raw(
            app.client
                .get(format!("{base}/status"))
                .bearer_auth(ADMIN_TOKEN),
        )
        .await;
    let v: serde_json::Value = serde_json::from_str(&detail.body).unwrap();
    assert_eq!(v["conversations"], 0, "{v}");
    assert!(v["store"]["dir"].is_string(), "{v}");
    let log = app
        .raw(
            app.client
                .get(format!("{base}/messages"))
                .bearer_auth(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(log.status, 200);
    assert!(log.body.contains("+15550000001"), "{}", log.body);
    for path in ["/livez", "/readyz"] {
        assert_eq!(get(&format!("{base}{path}")).await.0, 200, "{path}");
    }
    let params = sms_params("+15550000001", "hours", &new_sid());
    let sig = app
        .validator
        .compute(&app.signed_url("/twilio/sms"), &params);
    let r = app
        .raw(
            app.client
                .post(format!("{base}/twilio/sms"))
                .header("content-type", "application/x-www-form-urlencoded")
                .header("x-twilio-signature", sig)
                .body(encode_form(&params)),
        )
        .await;
    assert_eq!(r.status, 404);
    app.stop().await;
}

/// With a drain delay, `/readyz` answers 503 on new connections and
/// webhooks are still served; the listener closes only after the delay.
#[tokio::test(flavor = "multi_thread")]
async fn readyz_turns_503_while_the_listener_still_accepts() {
    // Wide: the checks below must fit in it on a busy machine.
    let drain = Duration::from_secs(8);
    let mut app = spawn_configured(&[("keywords.yaml", KEYWORDS)], |c| {
        c.shutdown_drain = drain;
    })
    .await;
    let readyz = app.url("/readyz");
    assert_eq!(get(&readyz).await.0, 200);
    let began = Instant::now();
    app.begin_shutdown();
    let (status, body) = loop {
        let (status, body) = get(&readyz).await;
        if status != 200 {
            break (status, body);
        }
        assert!(began.elapsed() < drain, "still ready after the drain delay");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("shutting_down"), "{body}");
    // Still serving Twilio meanwhile, on a new connection.
    let params = sms_params("+15550000001", "hours", &new_sid());
    let sig = app
        .validator
        .compute(&app.signed_url("/twilio/sms"), &params);
    let r = reqwest::Client::new()
        .post(app.url("/twilio/sms"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-twilio-signature", sig)
        .body(encode_form(&params))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(bodies(&r.text().await.unwrap()), vec!["We're open 9-5"]);
    assert!(
        began.elapsed() < drain,
        "the checks above took the whole drain"
    );
    let addr = app.addr;
    app.stop().await;
    assert!(began.elapsed() >= drain, "stopped before the drain delay");
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "listener still open"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_cover_what_an_operator_dashboards() {
    let app = spawn_app(&[("keywords.yaml", KEYWORDS)]).await;
    app.send_sms("+15550000001", "hours").await;
    app.send_sms("+15550000002", "STOP").await;
    let callback = |sid: &str, status: &str, error: Option<&str>| {
        let mut p: Vec<(String, String)> = [
            ("MessageSid", sid),
            ("MessageStatus", status),
            ("To", "+15550000001"),
            ("From", OUR_NUMBER),
            ("AccountSid", "AC00000000000000000000000000000000"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        if let Some(e) = error {
            p.push(("ErrorCode".into(), e.into()));
        }
        p
    };
    for (sid, status, error) in [
        ("SMm1", "delivered", None),
        ("SMm2", "undelivered", Some("30007")),
        ("SMm3", "undelivered", Some("30007")),
        ("SMm4", "failed", Some("30003")),
    ] {
        let r = app
            .post_signed("/twilio/status", &callback(sid, status, error))
            .await;
        assert_eq!(r.status, 200);
    }
    let r = app.raw(app.client.get(app.url("/metrics"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.content_type, "text/plain; version=0.0.4; charset=utf-8");
    let text = r.body;
    for line in [
        format!(
            "smsflow_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        ),
        "smsflow_delivery_statuses_total{status=\"delivered\"} 1".into(),
        "smsflow_delivery_statuses_total{status=\"undelivered\"} 2".into(),
        "smsflow_delivery_statuses_total{status=\"failed\"} 1".into(),
        "smsflow_delivery_errors_total{code=\"30007\"} 2".into(),
        "smsflow_delivery_errors_total{code=\"30003\"} 1".into(),
        "smsflow_consent_changes_total{action=\"opt_out\"} 1".into(),
        "smsflow_conversations 0".into(),
        "# TYPE smsflow_store_flush_duration_seconds histogram".into(),
        "# TYPE process_cpu_seconds_total counter".into(),
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
    let value = |name: &str| -> f64 {
        metric_in(&text, name)
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            .parse()
            .unwrap()
    };
    // Every message, callback and consent change was flushed.
    assert!(
        value("smsflow_store_flush_duration_seconds_count") >= 6.0,
        "{text}"
    );
    assert!(value("process_resident_memory_bytes") > 0.0);
    assert!(value("process_open_fds") > 0.0);
    assert!(value("process_start_time_seconds") > 1.7e9);
    // Every sample line is a HELP, a TYPE or `name{labels} number`.
    let sample =
        regex::Regex::new(r#"^[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? [0-9.e+-]+$"#)
            .unwrap();
    for line in text.lines() {
        assert!(
            line.starts_with("# HELP ") || line.starts_with("# TYPE ") || sample.is_match(line),
            "{line:?}"
        );
    }
    app.stop().await;
}

/// The shipped unit: Type=notify, reload by SIGHUP, the credentials the
/// binary reads, the state directory, a user of its own and the hardening
/// README.md promises; its ExecStart flags are ones `serve` takes.
#[test]
fn the_shipped_unit_is_notify_hardened_and_matches_the_binary() {
    let unit = std::fs::read_to_string(format!(
        "{}/contrib/smsflow.service",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let joined = unit.replace("\\\n", " ");
    let settings: Vec<(&str, &str)> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .collect();
    let has = |key: &str, value: &str| settings.iter().any(|(k, v)| *k == key && v.trim() == value);
    for (key, value) in [
        ("Type", "notify"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("StateDirectory", "smsflow"),
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("SystemCallFilter", "@system-service"),
        (
            "LoadCredential",
            "TWILIO_AUTH_TOKEN:/etc/smsflow/credentials/TWILIO_AUTH_TOKEN",
        ),
    ] {
        assert!(has(key, value), "no {key}={value} in the unit:\n{unit}");
    }
    let exec = settings
        .iter()
        .find(|(k, _)| *k == "ExecStart")
        .map(|(_, v)| *v)
        .unwrap();
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_smsflow"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let words: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(words[1], "serve", "{exec}");
    for flag in words.iter().filter(|w| w.starts_with("--")) {
        assert!(help.contains(&format!("{flag} ")), "serve takes no {flag}");
    }
    // The data directory is the state directory.
    assert!(exec.contains("--data /var/lib/smsflow"), "{exec}");
}

/// Every series the shipped Grafana dashboard and README's PromQL query is
/// one `/metrics` exports, so a renamed metric cannot leave them blank.
#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_and_the_readme_query_metrics_that_exist() {
    let app = spawn_app(&[("keywords.yaml", KEYWORDS)]).await;
    app.send_sms("+15550000001", "hours").await;
    let exported = app.raw(app.client.get(app.url("/metrics"))).await.body;
    let names: std::collections::BTreeSet<&str> = exported
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    // Families with a label are listed by their HELP line (they have no
    // sample until something is counted).
    let families: Vec<&str> = exported
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let exists = |name: &str| names.contains(name) || families.contains(&name);
    let metric = regex::Regex::new(r"\b(?:smsflow|process)_[a-z_]+").unwrap();

    let root = env!("CARGO_MANIFEST_DIR");
    let dashboard =
        std::fs::read_to_string(format!("{root}/contrib/grafana-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let start = readme
        .find("The four golden signals in PromQL:")
        .expect("the PromQL");
    let block = &readme[start..];
    let open = block.find("```text").unwrap() + "```text".len();
    let close = open + block[open..].find("```").unwrap();
    exprs.push(block[open..close].to_owned());
    assert!(exprs.len() > 10);
    for expr in &exprs {
        for m in metric.find_iter(expr) {
            let name = m.as_str();
            let family = name.strip_suffix("_bucket").unwrap_or(name);
            assert!(
                exists(name) || exists(family),
                "{name} (in {expr}) is not exported"
            );
        }
    }
    app.stop().await;
}
