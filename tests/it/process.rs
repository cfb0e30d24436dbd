//! The real binary as a child process: signals (SIGHUP reload, SIGTERM
//! graceful stop) and refusing to start without a token.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::helpers::*;

pub struct ChildServer {
    pub child: Child,
    pub addr: String,
    pub validator: smsflow::twilio::RequestValidator,
    pub client: reqwest::Client,
    /// Every line the server wrote to stderr so far (split on `\n` only,
    /// as a log reader would).
    pub log: Arc<Mutex<Vec<String>>>,
}

/// Start `smsflow serve` on port 0 and read the bound address from its log.
pub fn spawn_server(flows: &Path, data: &Path, extra: &[&str]) -> ChildServer {
    spawn_server_env(flows, data, extra, &[])
}

pub fn spawn_server_env(
    flows: &Path,
    data: &Path,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> ChildServer {
    spawn_server_under(&[], flows, data, extra, envs)
}

/// [`spawn_server_env`] with the binary run by `wrapper` (e.g. `strace`
/// and its options); the wrapper must keep the server its direct child.
pub fn spawn_server_under(
    wrapper: &[&str],
    flows: &Path,
    data: &Path,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> ChildServer {
    let bin = env!("CARGO_BIN_EXE_smsflow");
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let mut child = command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--public-url",
            "http://localhost",
        ])
        .arg("--flows")
        .arg(flows)
        .arg("--data")
        .arg(data)
        .args(extra)
        .env("TWILIO_AUTH_TOKEN", TOKEN)
        .env("RUST_LOG", "info")
        .envs(envs.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn smsflow");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let log = Arc::new(Mutex::new(Vec::new()));
    let kept = log.clone();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).into_owned();
            kept.lock().unwrap().push(line.clone());
            if !sent {
                // `addr=…` in text logs, `"addr":"…"` in JSON ones.
                let found = line
                    .find("addr=")
                    .map(|i| (i + 5, false))
                    .or_else(|| line.find("\"addr\":\"").map(|i| (i + 8, true)));
                if let Some((start, json)) = found {
                    let addr: String = line[start..]
                        .chars()
                        .take_while(|c| !(c.is_whitespace() || (json && *c == '"')))
                        .collect();
                    let _ = tx.send(addr);
                    sent = true;
                }
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("server printed its address");
    ChildServer {
        child,
        addr,
        validator: smsflow::twilio::RequestValidator::new(TOKEN),
        client: reqwest::Client::new(),
        log,
    }
}

impl ChildServer {
    pub async fn send(&self, from: &str, body: &str, sid: &str) -> Result<String, reqwest::Error> {
        let params = sms_params(from, body, sid);
        let sig = self
            .validator
            .compute("http://localhost/twilio/sms", &params);
        let r = self
            .client
            .post(format!("http://{}/twilio/sms", self.addr))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-twilio-signature", sig)
            .body(encode_form(&params))
            .send()
            .await?;
        r.error_for_status()?.text().await
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// The server's peak resident memory so far, in KiB (Linux's VmHWM).
    #[cfg(target_os = "linux")]
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .expect("VmHWM in /proc/<pid>/status");
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// SIGTERM, a clean exit, then every log line up to the last one a
    /// clean stop writes (`smsflow stopped`), so nothing is still in flight.
    pub async fn stop_and_read_log(&mut self) -> Vec<String> {
        self.signal("TERM");
        assert!(self.wait_exit(Duration::from_secs(30)).success());
        let started = Instant::now();
        while !self
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("smsflow stopped"))
        {
            assert!(started.elapsed() < Duration::from_secs(30), "no final line");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        self.log.lock().unwrap().clone()
    }

    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(started.elapsed() < limit, "server did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_and_sigterm_stops_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(flows.join("k.yaml"), "keywords:\n  HOURS: one\n").unwrap();
    let mut server = spawn_server(&flows, &tmp.path().join("data"), &["--no-watch"]);
    let r = server
        .send("+15550000001", "hours", &new_sid())
        .await
        .unwrap();
    assert_eq!(bodies(&r), vec!["one"]);

    std::fs::write(flows.join("k.yaml"), "keywords:\n  HOURS: two\n").unwrap();
    // Not watching: still the old reply until SIGHUP.
    assert_eq!(
        bodies(
            &server
                .send("+15550000001", "hours", &new_sid())
                .await
                .unwrap()
        ),
        vec!["one"]
    );
    server.signal("HUP");
    let started = Instant::now();
    loop {
        let r = server
            .send("+15550000001", "hours", &new_sid())
            .await
            .unwrap();
        if bodies(&r) == vec!["two"] {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no reload after SIGHUP"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
}

/// `--workers` and `SMSFLOW_WORKERS` size the runtime that serves
/// webhooks: the startup line reads the count back from the runtime.
#[tokio::test(flavor = "multi_thread")]
async fn workers_size_the_runtime_and_zero_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(flows.join("k.yaml"), "keywords:\n  HOURS: nine to five\n").unwrap();
    for (flags, envs, want) in [
        (&["--workers", "1"][..], &[][..], "workers=1"),
        (&[][..], &[("SMSFLOW_WORKERS", "3")][..], "workers=3"),
    ] {
        let data = tmp.path().join(want);
        let mut server = spawn_server_env(&flows, &data, flags, envs);
        let r = server
            .send("+15550000001", "hours", &new_sid())
            .await
            .unwrap();
        assert_eq!(bodies(&r), vec!["nine to five"]);
        let log = server.stop_and_read_log().await;
        let started = log
            .iter()
            .find(|l| l.contains("smsflow listening"))
            .expect("startup line");
        assert!(started.contains(want), "{started}");
    }

    let out = Command::new(env!("CARGO_BIN_EXE_smsflow"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "0",
            "--flows",
        ])
        .arg(&flows)
        .arg("--data")
        .arg(tmp.path().join("refused"))
        .env("TWILIO_AUTH_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("workers must be between 1 and 256"), "{err}");
}

#[test]
fn serve_refuses_to_start_without_a_token() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_smsflow"))
        .args(["serve", "--listen", "127.0.0.1:0", "--flows"])
        .arg(format!("{}/flows", env!("CARGO_MANIFEST_DIR")))
        .arg("--data")
        .arg(tmp.path())
        .env_remove("TWILIO_AUTH_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TWILIO_AUTH_TOKEN is not set"), "{err}");
    assert!(err.contains("--insecure-no-signature"), "{err}");
}

#[test]
fn serve_help_lists_every_config_key_and_config_prints_them_all() {
    let bin = env!("CARGO_BIN_EXE_smsflow");
    let tmp = tempfile::tempdir().unwrap();
    // The keys the file accepts, as the binary's own error for an unknown
    // key lists them.
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "no_such_key = 1\n").unwrap();
    let out = Command::new(bin)
        .args(["config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let list = &err[err.find("expected one of").expect("keys listed")..];
    let keys: Vec<&str> = list.split('`').skip(1).step_by(2).collect();
    assert!(keys.len() >= 24, "{err}");

    let help = Command::new(bin)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    for key in &keys {
        assert!(help.contains(key), "serve --help lacks `{key}`:\n{help}");
    }
    assert!(help.contains("smsflow config"), "{help}");

    // `config`: flags over environment over the file over defaults, every
    // key, and no secret.
    let file = tmp.path().join("smsflow.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:7000\"\ncache_mb = 4\ntrack_delivery = true\nadmin_token = \"file-admin-token-0123456\"\nhelp_text = \"Call 555-0100\"\n",
    )
    .unwrap();
    let out = Command::new(bin)
        .args(["config", "--config"])
        .arg(&file)
        .args(["--listen", "127.0.0.1:9000"])
        .env("SMSFLOW_CACHE_MB", "16")
        .env("TWILIO_AUTH_TOKEN", "twilio-secret-value")
        .env_remove("SMSFLOW_ADMIN_TOKEN")
        .env_remove("SMSFLOW_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    for key in &keys {
        assert!(
            printed.lines().any(
                |l| l.starts_with(&format!("{key} = ")) || l.starts_with(&format!("# {key}: "))
            ),
            "config lacks `{key}`:\n{printed}"
        );
    }
    for line in [
        "listen = \"127.0.0.1:9000\"",
        "cache_mb = 16",
        "track_delivery = true",
        "help_text = \"Call 555-0100\"",
        "admin_token = \"<redacted>\"",
        "retention_days = 30",
        "# TWILIO_AUTH_TOKEN: set (not shown)",
    ] {
        assert!(
            printed.lines().any(|l| l == line),
            "no {line:?} in\n{printed}"
        );
    }
    assert!(!printed.contains("secret-value"), "{printed}");
    assert!(!printed.contains("file-admin-token"), "{printed}");

    // Without the auth token it still prints, and says serve would refuse.
    let out = Command::new(bin)
        .arg("config")
        .env_remove("TWILIO_AUTH_TOKEN")
        .env_remove("SMSFLOW_ADMIN_TOKEN")
        .env_remove("SMSFLOW_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("# TWILIO_AUTH_TOKEN: not set: serve refuses to start"),
        "{printed}"
    );
    assert!(printed.contains("# admin_token: not set"), "{printed}");
}

#[test]
fn check_exits_non_zero_with_located_errors() {
    let bad = format!("{}/tests/flows/broken/dupes", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(env!("CARGO_BIN_EXE_smsflow"))
        .args(["check", &bad])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("b.yaml:2:3: error: keyword `hours!` is already used"),
        "{err}"
    );
    let good = format!("{}/flows", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(env!("CARGO_BIN_EXE_smsflow"))
        .args(["check", &good])
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_command_reads_a_running_server_and_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(flows.join("k.yaml"), "keywords:\n  HOURS: open\n").unwrap();
    let data = tmp.path().join("data");
    let admin = "admin-token-for-tests-0001";
    let mut server = spawn_server_env(&flows, &data, &[], &[("SMSFLOW_ADMIN_TOKEN", admin)]);
    let sid = new_sid();
    server.send("+15550000042", "hours", &sid).await.unwrap();

    let bin = env!("CARGO_BIN_EXE_smsflow");
    let base = format!("http://{}", server.addr);
    let out = Command::new(bin)
        .args(["messages", "--server", &base, "--number", "+15550000042"])
        .env("SMSFLOW_ADMIN_TOKEN", admin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains(&sid), "{table}");
    assert!(table.contains("reply"), "{table}");

    let out = Command::new(bin)
        .args(["messages", "--server", &base])
        .env("SMSFLOW_ADMIN_TOKEN", "wrong-token-000000000000")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));

    // After the server stops, the store can be read directly.
    server.signal("TERM");
    server.wait_exit(Duration::from_secs(10));
    let out = Command::new(bin)
        .args(["messages", "--json", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["sid"], sid.as_str());
    assert_eq!(rows[0]["direction"], "inbound");
}
