//! User text never forges a log line. The real binary, its stderr
//! read as a log reader reads it (one line per `\n`), and a signed message
//! whose body and sender carry newlines, carriage returns and terminal
//! escapes, handled by a script that fails with that text in its error.

use std::time::{Duration, Instant};

use crate::helpers::*;
use crate::process::spawn_server_env;

/// What an attacker would put after a newline: a whole log line of its own.
const FORGED: &str = "1999-01-01T00:00:00.000000Z  INFO smsflow::pipeline: FORGED";

const ECHO_YAML: &str = "trigger: {catch_all: true}\nscript: echo.rhai\nfallback: \"Sorry!\"\n";
const ECHO_RHAI: &str =
    "fn on_message(msg, state) { throw \"cannot handle \" + msg.body + \" from \" + msg.from; }\n";

/// The level of a line as tracing writes it (timestamp, level, the rest),
/// or `None` when the line is not one.
fn level_of(line: &str) -> Option<&str> {
    let re = regex::Regex::new(
        r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z +(TRACE|DEBUG|INFO|WARN|ERROR) ",
    )
    .unwrap();
    Some(re.captures(line)?.get(2)?.as_str())
}

#[tokio::test(flavor = "multi_thread")]
async fn message_text_cannot_forge_a_log_line() {
    let tmp = tempfile::tempdir().unwrap();
    let flows = tmp.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(flows.join("echo.yaml"), ECHO_YAML).unwrap();
    std::fs::write(flows.join("echo.rhai"), ECHO_RHAI).unwrap();
    // Debug for our own crate: the level where bodies are logged.
    let mut server = spawn_server_env(
        &flows,
        &tmp.path().join("data"),
        &[],
        &[("RUST_LOG", "info,smsflow=debug")],
    );

    let body = format!("hello\n{FORGED}-BODY\r\x1b[2K\u{9b}2K\u{2028}bye");
    let from = format!("+15550001234\n{FORGED}-FROM");
    let answer = server.send(&from, &body, &new_sid()).await.unwrap();
    assert_eq!(bodies(&answer), vec!["Sorry!"]);

    // Wait for the script error's line, then stop so everything is written.
    let started = Instant::now();
    while !server
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("script failed"))
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no script error logged: {:#?}",
            server.log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let log = server.stop_and_read_log().await;
    let all = log.join("\n");

    for line in &log {
        let level = level_of(line);
        assert!(level.is_some(), "not a log line: {line:?}\nlog:\n{all}");
        assert!(!line.starts_with("1999-"), "forged line: {line:?}");
        assert!(
            !line.contains(['\r', '\x1b', '\u{9b}', '\u{2028}']),
            "raw control character in {line:?}"
        );
        // Message text is personal data: never at info level.
        if level == Some("INFO") {
            assert!(!line.contains("FORGED"), "message text at info: {line:?}");
        }
    }
    // The text did reach the log, escaped, where it belongs: the script's
    // error, and the debug line of the inbound message.
    let failed = log
        .iter()
        .find(|l| l.contains("script failed"))
        .expect("script error line");
    assert_eq!(level_of(failed), Some("ERROR"), "{failed}");
    assert!(
        failed.contains(&format!("hello\\n{FORGED}-BODY\\r\\u{{1b}}[2K\\u{{9b}}2K")),
        "{failed}"
    );
    assert!(
        failed.contains(&format!("+15550001234\\n{FORGED}-FROM")),
        "{failed}"
    );
    let inbound = log
        .iter()
        .find(|l| l.contains("inbound message"))
        .expect("debug line of the inbound message");
    assert_eq!(level_of(inbound), Some("DEBUG"), "{inbound}");
    assert!(inbound.contains("\\n1999-"), "{inbound}");
}
