//! Hot reload through the front door: files edited on disk, the server
//! watching, webhooks over HTTP; and the flows directory replaced whole, as
//! deploy tools do, keeps being watched.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::helpers::*;

const V1: &str = "keywords:\n  HOURS: \"v1 hours\"\n";
const V2: &str = "keywords:\n  HOURS: \"v2 hours\"\n";
const BROKEN: &str = "keywords:\n  HOURS: \"broken {{\"\n";

async fn spawn_watching(files: &[(&str, &str)]) -> TestApp {
    spawn_configured(files, |c| c.watch = true).await
}

/// Save like an editor does: write a temp file, rename it over the target.
fn rename_save(path: &Path, text: &str) {
    let tmp = path.with_extension("yaml.swp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// How long a test waits for a reload to show: generous, because the
/// machine is shared and noisy; a working watcher takes well under a second.
const PATIENCE: Duration = Duration::from_secs(30);

/// Send HOURS until the reply is `want` (or time runs out).
async fn eventually_replies(app: &TestApp, body: &str, want: &[&str]) -> Duration {
    let started = Instant::now();
    loop {
        let got = bodies(&app.send_sms("+15559990000", body).await.body);
        if got == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < PATIENCE,
            "still {got:?} after {PATIENCE:?}, wanted {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn status(app: &TestApp) -> serde_json::Value {
    app.admin_json("/status").await
}

#[tokio::test(flavor = "multi_thread")]
async fn edit_break_fix_add_delete_rename() {
    let app = spawn_watching(&[("keywords.yaml", V1)]).await;
    let file = app.flows_dir.join("keywords.yaml");
    assert_eq!(
        bodies(&app.send_sms("+15559990000", "hours").await.body),
        vec!["v1 hours"]
    );
    let v1 = status(&app).await["flows"]["version"].clone();

    // Edit in place.
    std::fs::write(&file, V2).unwrap();
    eventually_replies(&app, "hours", &["v2 hours"]).await;
    let s = status(&app).await;
    assert_ne!(s["flows"]["version"], v1);
    assert!(s["flows"]["last_error"].is_null());

    // A broken edit keeps the old set and shows the located error.
    std::fs::write(&file, BROKEN).unwrap();
    let started = Instant::now();
    let err = loop {
        let s = status(&app).await;
        if let Some(e) = s["flows"]["last_error"].as_str() {
            break e.to_string();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no error reported"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert!(err.contains("keywords.yaml:2:"), "{err}");
    assert_eq!(
        bodies(&app.send_sms("+15559990000", "hours").await.body),
        vec!["v2 hours"]
    );
    let m = app.raw(app.client.get(app.url("/metrics"))).await.body;
    assert!(m.contains("smsflow_reload_failures_total 1"), "{m}");

    // Fixing it clears the error and serves the fix.
    rename_save(&file, "keywords:\n  HOURS: \"v3 hours\"\n");
    eventually_replies(&app, "hours", &["v3 hours"]).await;
    assert!(status(&app).await["flows"]["last_error"].is_null());

    // Add a file.
    std::fs::write(app.flows_dir.join("more.yaml"), "keywords:\n  PING: pong\n").unwrap();
    eventually_replies(&app, "ping", &["pong"]).await;
    let files = status(&app).await["flows"]["files"].clone();
    assert_eq!(files.as_array().unwrap().len(), 2, "{files}");

    // Delete it.
    std::fs::remove_file(app.flows_dir.join("more.yaml")).unwrap();
    eventually_replies(&app, "ping", &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_style_reload_reports_outcomes() {
    use smsflow::reload::ReloadOutcome;
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(flows.join("k.yaml"), V1).unwrap();
    let config = smsflow::config::Config::for_test(&flows, &tmp.path().join("data"), TOKEN);
    let app = smsflow::app::App::build(config).await.unwrap();
    let reloader = app.reloader().clone();
    assert_eq!(reloader.reload_now(), ReloadOutcome::Unchanged);
    std::fs::write(flows.join("k.yaml"), BROKEN).unwrap();
    assert!(matches!(
        reloader.reload_now(),
        ReloadOutcome::Refused { .. }
    ));
    std::fs::write(flows.join("k.yaml"), V2).unwrap();
    assert!(matches!(
        reloader.reload_now(),
        ReloadOutcome::Swapped { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn continuous_traffic_during_rewrites_sees_whole_versions() {
    // Two keywords whose replies always change together: a reply mixing
    // versions (HOURS from one set, ADDRESS from another) would show up as
    // a mismatched pair in one answer.
    let version =
        |n: usize| format!("keywords:\n  BOTH:\n    - \"hours v{n}\"\n    - \"address v{n}\"\n");
    let app = spawn_watching(&[("k.yaml", &version(0))]).await;
    let app = std::sync::Arc::new(app);
    let file = app.flows_dir.join("k.yaml");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));

    let mut senders = Vec::new();
    for s in 0..4 {
        let (app, stop) = (app.clone(), stop.clone());
        senders.push(tokio::spawn(async move {
            let mut seen = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = app.send_sms(&format!("+1555777{s:04}"), "both").await;
                assert_eq!(r.status, 200, "{}", r.body);
                let b = bodies(&r.body);
                assert_eq!(b.len(), 2, "{b:?}");
                let v1 = b[0].strip_prefix("hours ").unwrap();
                let v2 = b[1].strip_prefix("address ").unwrap();
                assert_eq!(v1, v2, "one answer mixed two versions: {b:?}");
                seen += 1;
            }
            seen
        }));
    }
    let last_valid = 20;
    for n in 1..=last_valid {
        if n % 2 == 0 {
            rename_save(&file, &version(n));
        } else {
            std::fs::write(&file, BROKEN).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    // After the last valid edit only the new behaviour.
    let want = [
        format!("hours v{last_valid}"),
        format!("address v{last_valid}"),
    ];
    let want: Vec<&str> = want.iter().map(|s| s.as_str()).collect();
    eventually_replies(&app, "both", &want).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for s in senders {
        total += s.await.unwrap();
    }
    assert!(total > 20, "only {total} requests went through");
    for _ in 0..5 {
        assert_eq!(
            bodies(&app.send_sms("+15557770099", "both").await.body),
            want
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn require_tests_refuses_a_set_whose_transcripts_fail() {
    use smsflow::reload::ReloadOutcome;
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(flows.join("k.yaml"), V1).unwrap();
    std::fs::write(flows.join("k.chat"), "> hours\n< v1 hours\n").unwrap();
    let mut config = smsflow::config::Config::for_test(&flows, &tmp.path().join("data"), TOKEN);
    config.require_tests = true;
    let app = smsflow::app::App::build(config).await.unwrap();
    let reloader = app.reloader().clone();
    // The flow changes but its transcript still expects v1: refused.
    std::fs::write(flows.join("k.yaml"), V2).unwrap();
    match reloader.reload_now() {
        ReloadOutcome::Refused { errors } => {
            assert!(errors.contains("k.chat"), "{errors}");
            assert!(errors.contains("v2 hours"), "{errors}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Flow and transcript updated together: accepted.
    std::fs::write(flows.join("k.chat"), "> hours\n< v2 hours\n").unwrap();
    assert!(matches!(
        reloader.reload_now(),
        ReloadOutcome::Swapped { .. }
    ));

    // Startup refuses a failing set too.
    std::fs::write(flows.join("k.chat"), "> hours\n< v9 hours\n").unwrap();
    let mut config = smsflow::config::Config::for_test(&flows, &tmp.path().join("data2"), TOKEN);
    config.require_tests = true;
    let err = smsflow::app::App::build(config)
        .await
        .err()
        .expect("refused");
    assert!(format!("{err:#}").contains("transcripts fail"), "{err:#}");
}

/// Poll `/status` until `flows.watching` is `want`; returns the reason given.
async fn eventually_watching(app: &TestApp, want: bool) -> Option<String> {
    let started = Instant::now();
    loop {
        let s = status(app).await;
        if s["flows"]["watching"] == want {
            return s["flows"]["watching_reason"].as_str().map(str::to_string);
        }
        assert!(
            started.elapsed() < PATIENCE,
            "flows.watching is still not {want} after {PATIENCE:?}: {s}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A complete flows directory written beside `flows` (as a deploy tool
/// stages a release), ready to be swapped in.
fn stage(flows: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let staged = flows.with_file_name(name);
    std::fs::create_dir(&staged).unwrap();
    std::fs::write(staged.join("keywords.yaml"), text).unwrap();
    staged
}

fn hours(n: usize) -> String {
    format!("keywords:\n  HOURS: \"hours v{n}\"\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_directory_removed_and_recreated_is_watched_again() {
    let app = spawn_watching(&[("keywords.yaml", V1)]).await;
    assert_eq!(eventually_watching(&app, true).await, None);
    let m = app.raw(app.client.get(app.url("/metrics"))).await.body;
    assert!(m.contains("smsflow_flows_watching 1"), "{m}");

    // Gone: the last good set keeps serving, and /status says why edits
    // are not being picked up.
    std::fs::remove_dir_all(&app.flows_dir).unwrap();
    let reason = eventually_watching(&app, false).await.expect("a reason");
    assert!(reason.contains("missing"), "{reason}");
    let m = app.raw(app.client.get(app.url("/metrics"))).await.body;
    assert!(m.contains("smsflow_flows_watching 0"), "{m}");
    assert_eq!(
        bodies(&app.send_sms("+15559990000", "hours").await.body),
        vec!["v1 hours"]
    );

    // Back (rm -rf flows && mkdir flows && write the new files).
    std::fs::create_dir(&app.flows_dir).unwrap();
    std::fs::write(app.flows_dir.join("keywords.yaml"), V2).unwrap();
    eventually_replies(&app, "hours", &["v2 hours"]).await;
    assert_eq!(eventually_watching(&app, true).await, None);

    // And the new directory is the one watched: an edit in it shows.
    std::fs::write(app.flows_dir.join("keywords.yaml"), hours(3)).unwrap();
    eventually_replies(&app, "hours", &["hours v3"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_directory_swapped_in_with_mv_is_watched() {
    let app = spawn_watching(&[("keywords.yaml", V1)]).await;
    eventually_watching(&app, true).await;
    let flows = app.flows_dir.clone();

    // mv flows flows.old && mv flows.new flows
    let staged = stage(&flows, "flows.new", V2);
    std::fs::rename(&flows, flows.with_file_name("flows.old")).unwrap();
    std::fs::rename(&staged, &flows).unwrap();
    eventually_replies(&app, "hours", &["v2 hours"]).await;

    // The watch moved to the new directory: an edit in it is served.
    std::fs::write(flows.join("keywords.yaml"), hours(3)).unwrap();
    eventually_replies(&app, "hours", &["hours v3"]).await;
    assert_eq!(eventually_watching(&app, true).await, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_watch_survives_many_replacements() {
    let app = spawn_watching(&[("keywords.yaml", &hours(0))]).await;
    eventually_watching(&app, true).await;
    let flows = app.flows_dir.clone();
    for n in 1..=6 {
        if n % 2 == 0 {
            let staged = stage(&flows, &format!("release{n}"), &hours(n));
            let old = flows.with_file_name(format!("old{n}"));
            std::fs::rename(&flows, &old).unwrap();
            std::fs::rename(&staged, &flows).unwrap();
            std::fs::remove_dir_all(&old).unwrap();
        } else {
            std::fs::remove_dir_all(&flows).unwrap();
            std::fs::create_dir(&flows).unwrap();
            std::fs::write(flows.join("keywords.yaml"), hours(n)).unwrap();
        }
        let want = format!("hours v{n}");
        eventually_replies(&app, "hours", &[want.as_str()]).await;
    }
    // After all that, a plain edit is still seen.
    rename_save(&flows.join("keywords.yaml"), &hours(99));
    eventually_replies(&app, "hours", &["hours v99"]).await;
    assert_eq!(eventually_watching(&app, true).await, None);
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn a_symlink_swap_is_followed() {
    // releases/v1, releases/v2, and `flows` a symlink to the live one,
    // switched as `ln -sfn releases/v2 flows` does: a new link renamed
    // over the old.
    let tmp = tempfile::tempdir().unwrap();
    let releases = tmp.path().join("releases");
    std::fs::create_dir(&releases).unwrap();
    for (v, text) in [("v1", V1), ("v2", V2)] {
        std::fs::create_dir(releases.join(v)).unwrap();
        std::fs::write(releases.join(v).join("keywords.yaml"), text).unwrap();
    }
    let flows = tmp.path().join("flows");
    std::os::unix::fs::symlink("releases/v1", &flows).unwrap();
    let mut config = smsflow::config::Config::for_test(&flows, &tmp.path().join("data"), TOKEN);
    config.watch = true;
    config.admin_token = Some(smsflow::config::AuthToken::new(ADMIN_TOKEN));
    let app = spawn_with(config).await;
    eventually_watching(&app, true).await;
    assert_eq!(
        bodies(&app.send_sms("+15559990000", "hours").await.body),
        vec!["v1 hours"]
    );

    let link = tmp.path().join("flows.tmp");
    std::os::unix::fs::symlink("releases/v2", &link).unwrap();
    std::fs::rename(&link, &flows).unwrap();
    eventually_replies(&app, "hours", &["v2 hours"]).await;

    // The watch moved to the release now live: an edit in it is served.
    std::fs::write(releases.join("v2").join("keywords.yaml"), hours(3)).unwrap();
    eventually_replies(&app, "hours", &["hours v3"]).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn status_says_when_watching_is_off() {
    let app = spawn_app(&[("keywords.yaml", V1)]).await;
    let s = status(&app).await;
    assert_eq!(s["flows"]["watching"], false, "{s}");
    let reason = s["flows"]["watching_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("--no-watch"), "{s}");
}

/// A small file whose aliases expand to gigabytes, saved into a
/// running server's flows directory, used to take the whole process down
/// while reloading. Now the reload is refused at the alias, the server
/// keeps answering with the old flows, and its memory stays bounded.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread")]
async fn an_alias_bomb_is_refused_and_the_server_keeps_serving() {
    use crate::process::spawn_server;
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(flows.join("k.yaml"), V1).unwrap();
    let server = spawn_server(&flows, &tmp.path().join("data"), &["--no-watch"]);
    let hours = || async {
        let r = server.send("+15550000001", "hours", &new_sid()).await;
        bodies(&r.expect("the server answers"))
    };
    assert_eq!(hours().await, vec!["v1 hours"]);

    // 300 KB of text aliased 2,000 times: 600 MB expanded, from 306 KB.
    let bomb = format!(
        "keywords:\n  A: &a \"{}\"\n  B: [{}]\n",
        "x".repeat(300_000),
        vec!["*a"; 2_000].join(",")
    );
    std::fs::write(flows.join("bomb.yaml"), bomb).unwrap();
    server.signal("HUP");
    let failures = || async {
        let m = server
            .client
            .get(format!("http://{}/metrics", server.addr))
            .send()
            .await
            .expect("the server answers /metrics")
            .text()
            .await
            .unwrap();
        metric_in(&m, "smsflow_reload_failures_total").map(str::to_string)
    };
    let started = Instant::now();
    while failures().await.as_deref() != Some("1") {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the reload was not refused"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(hours().await, vec!["v1 hours"]);
    let peak = server.peak_rss_kib();
    assert!(peak < 160 * 1024, "peak memory {peak} KiB");
}
