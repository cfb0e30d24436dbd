//! Runs every command in README.md, so the README cannot rot.
//!
//! The rules, for whoever edits the README:
//!
//! - Every fenced block needs an info string. Blocks marked `sh` are run;
//!   everything else (`text`, `console`, `toml`, `yaml`, `mermaid`, …) is
//!   not. Use `console` for commands a reader runs but a test cannot
//!   (tunnels, deployment); `bash`, `shell` and `zsh` are refused, so a
//!   command cannot look runnable and silently not run.
//! - The `sh` blocks run in order, each as a `bash -euo pipefail` script,
//!   in one temporary directory holding a copy of `flows/`. Exported
//!   variables and the working directory carry over from block to block;
//!   a block's background jobs (`… &`) are waited for at its end.
//! - The block right after an `sh` block, with only blank lines between,
//!   is that block's expected standard output, whatever its info string
//!   (so a `mermaid` block can be both rendered and checked). Lines are
//!   compared one by one after trimming trailing whitespace (trailing blank
//!   lines do not count); `…` in an expected line matches any text within
//!   that line. Standard error is not compared.
//! - `cargo run [--release] [-q|--quiet] -- ARGS` and `smsflow ARGS` run the
//!   binary under test; `cargo test` alone is skipped (it is what runs
//!   this); any other `cargo` command fails.
//! - `smsflow serve` always listens on `127.0.0.1:0`, returns once the
//!   server answers `/healthz`, and keeps running in the background; its
//!   public URL defaults to `http://127.0.0.1:8080` as it would in real
//!   life (unless `--public-url`, `SMSFLOW_PUBLIC_URL` or the config file
//!   sets one). Starting another server stops the previous one first, as
//!   port 8080 would force a reader to. `127.0.0.1:8080` in `curl`
//!   arguments and in `smsflow` arguments (other than `sign`, whose URL is
//!   the one signed) means the running server's real address.
//! - Each block must finish within [`BLOCK_TIME_LIMIT`]. A failure names
//!   the README line of the failing command or of the differing output.

#![cfg(unix)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BLOCK_TIME_LIMIT: Duration = Duration::from_secs(30);

/// Lines the harness puts before each block's own lines (see
/// [`block_script`]); subtracted from `$LINENO` to find the README line.
const PRELUDE_LINES: usize = 2;

#[test]
fn every_command_in_the_readme_runs_and_prints_what_it_shows() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = fs::read_to_string(root.join("README.md")).expect("read README.md");
    let steps = parse(&readme).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        steps.iter().any(|s| s.expected.is_some()),
        "README.md has no checked output: the parser is broken"
    );

    let tmp = tempfile::tempdir().expect("temp dir");
    let sandbox = Sandbox::new(tmp.path(), root);
    for step in &steps {
        sandbox.run(step);
    }
}

/// An `sh` block and the output it should print.
#[derive(Debug)]
struct Step {
    /// README line of the block's first command.
    first_line: usize,
    script: String,
    expected: Option<Expected>,
}

#[derive(Debug)]
struct Expected {
    /// README line of the first expected line.
    first_line: usize,
    text: String,
}

/// A fenced block: its info string, the 0-based indexes of its opening
/// and closing fence lines, and the text between them.
struct Block {
    info: String,
    open: usize,
    close: usize,
    text: String,
}

fn fenced_blocks(readme: &str) -> Result<Vec<Block>, String> {
    let lines: Vec<&str> = readme.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim_start();
        let fence_len = line.chars().take_while(|&c| c == '`').count();
        if fence_len < 3 {
            i += 1;
            continue;
        }
        let fence = &line[..fence_len];
        let info = line[fence_len..].split_whitespace().next().unwrap_or("");
        if info.is_empty() {
            return Err(format!(
                "README.md:{}: a fenced block without an info string: write ```sh to \
                 run it in tests/readme.rs, or ```text / ```console when it must not run",
                i + 1
            ));
        }
        if matches!(info, "bash" | "shell" | "zsh" | "sh-session") {
            return Err(format!(
                "README.md:{}: ```{info} would not run: write ```sh to run it in \
                 tests/readme.rs, or ```console when it must not run",
                i + 1
            ));
        }
        let open = i;
        let close = (open + 1..lines.len())
            .find(|&j| lines[j].trim() == fence)
            .ok_or_else(|| format!("README.md:{}: unclosed fenced block", open + 1))?;
        let text = lines[open + 1..close]
            .iter()
            .map(|l| format!("{l}\n"))
            .collect();
        blocks.push(Block {
            info: info.to_string(),
            open,
            close,
            text,
        });
        i = close + 1;
    }
    Ok(blocks)
}

fn parse(readme: &str) -> Result<Vec<Step>, String> {
    let lines: Vec<&str> = readme.lines().collect();
    let blocks = fenced_blocks(readme)?;
    let mut steps = Vec::new();
    let mut i = 0;
    while i < blocks.len() {
        let block = &blocks[i];
        i += 1;
        if block.info != "sh" {
            continue;
        }
        let expected = match blocks.get(i) {
            Some(next)
                if next.info != "sh"
                    && lines[block.close + 1..next.open]
                        .iter()
                        .all(|l| l.trim().is_empty()) =>
            {
                i += 1;
                Some(Expected {
                    first_line: next.open + 2,
                    text: next.text.clone(),
                })
            }
            _ => None,
        };
        steps.push(Step {
            first_line: block.open + 2,
            script: block.text.clone(),
            expected,
        });
    }
    Ok(steps)
}

/// Whether `actual` matches the `expected` line, where `…` matches any
/// text within the line.
fn line_matches(expected: &str, actual: &str) -> bool {
    let mut parts = expected.split('…');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = actual.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

fn output_lines(text: &str) -> Vec<&str> {
    let mut lines: Vec<&str> = text.lines().map(str::trim_end).collect();
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    lines
}

/// The first difference between expected and actual output: (index,
/// expected line, actual line), either side `None` past its end.
fn first_difference<'a>(
    expected: &[&'a str],
    actual: &[&'a str],
) -> Option<(usize, Option<&'a str>, Option<&'a str>)> {
    (0..expected.len().max(actual.len())).find_map(|i| {
        let (e, a) = (expected.get(i).copied(), actual.get(i).copied());
        match (e, a) {
            (Some(e), Some(a)) if line_matches(e, a) => None,
            _ => Some((i, e, a)),
        }
    })
}

/// The temporary directory the README's commands run in, the shims that
/// stand in for `cargo`, `smsflow` and `curl`, and the servers they start
/// (all stopped on drop, also when a step panics).
struct Sandbox {
    work: PathBuf,
    state: PathBuf,
}

/// `smsflow`: the binary under test; `serve` in the background on port 0.
const SMSFLOW_SHIM: &str = r#"#!/usr/bin/env bash
# tests/readme.rs: `smsflow` in README.md runs the binary under test.
set -euo pipefail
state=$SMSFLOW_README_STATE
bin=$SMSFLOW_README_BIN
real_addr() {
  cat "$state/addr" 2>/dev/null && return
  echo "tests/readme.rs: 127.0.0.1:8080 is used but no server is running (start one with serve)" >&2
  exit 1
}
stop_current() {
  [ -f "$state/current" ] || return 0
  local n pid log
  n=$(cat "$state/current")
  pid=$(cat "$state/servers/$n.pid")
  log=$state/servers/$n.log
  # Forgotten first, so nothing signals this pid again once it is gone.
  rm -f "$state/current" "$state/servers/$n.pid" "$state/addr"
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 200); do
    kill -0 "$pid" 2>/dev/null || return 0
    grep -q 'smsflow stopped' "$log" && return 0
    sleep 0.05
  done
  kill -KILL "$pid" 2>/dev/null || true
}
fail_serve() {
  echo "$1" > "$state/serve-failed"
  echo "tests/readme.rs: $1" >&2
  exit 1
}
case "${1-}" in
serve)
  shift
  args=() public=${SMSFLOW_PUBLIC_URL-}
  while [ $# -gt 0 ]; do
    case $1 in
      --listen) shift 2 ;;
      --listen=*) shift ;;
      --public-url|--public-url=*) public=given; args+=("$1"); shift ;;
      --config)
        if grep -qE '^[[:space:]]*public_url[[:space:]]*=' "$2" 2>/dev/null; then public=given; fi
        args+=("$1"); shift ;;
      *) args+=("$1"); shift ;;
    esac
  done
  if [ -z "$public" ]; then args+=(--public-url http://127.0.0.1:8080); fi
  stop_current
  n=$(($(cat "$state/servers/count" 2>/dev/null || echo 0) + 1))
  echo "$n" > "$state/servers/count"
  log=$state/servers/$n.log
  : > "$log"
  # The log goes to the file this shim parses and to where the README sends it.
  "$bin" serve ${args[@]+"${args[@]}"} --listen 127.0.0.1:0 </dev/null >/dev/null 2> >(tee -a "$log" >&2) &
  pid=$!
  echo "$pid" > "$state/servers/$n.pid"
  echo "$n" > "$state/current"
  for _ in $(seq 400); do
    if ! kill -0 "$pid" 2>/dev/null; then
      fail_serve "smsflow serve exited before listening; its log: $(cat "$log")"
    fi
    addr=$(grep -o 'addr=[^ ]*' "$log" | head -n 1 | cut -d= -f2 || true)
    if [ -n "$addr" ] && "$SMSFLOW_README_CURL" -fsS -o /dev/null "http://$addr/healthz" 2>/dev/null; then
      echo "$addr" > "$state/addr"
      exit 0
    fi
    sleep 0.05
  done
  fail_serve "smsflow serve did not answer /healthz within 20 s; its log: $(cat "$log")"
  ;;
sign)
  exec "$bin" "$@"
  ;;
*)
  args=()
  for a in "$@"; do
    if [[ $a == *127.0.0.1:8080* ]]; then a=${a//127.0.0.1:8080/$(real_addr)}; fi
    args+=("$a")
  done
  exec "$bin" ${args[@]+"${args[@]}"}
  ;;
esac
"#;

/// `cargo`: `cargo run … -- ARGS` is `smsflow ARGS`; `cargo test` is skipped.
const CARGO_SHIM: &str = r#"#!/usr/bin/env bash
# tests/readme.rs: `cargo` in README.md.
set -euo pipefail
if [ "$*" = test ]; then
  echo "tests/readme.rs: skipping \`cargo test\` (it is what runs this test)" >&2
  exit 0
fi
if [ "${1-}" = run ]; then
  shift
  while [ $# -gt 0 ]; do
    case $1 in
      --release|-q|--quiet) shift ;;
      --) shift; exec "$SMSFLOW_README_STATE/bin/smsflow" "$@" ;;
      *) break ;;
    esac
  done
fi
echo "tests/readme.rs: README.md may only use \`cargo run [--release] [-q] -- ARGS\` and \`cargo test\` in sh blocks, not \`cargo $*\`; mark the block console if it must not run" >&2
exit 2
"#;

/// `curl`: the real one, with `127.0.0.1:8080` meaning the running server.
const CURL_SHIM: &str = r#"#!/usr/bin/env bash
# tests/readme.rs: `curl` in README.md (also inside `smsflow sign … | sh`).
set -euo pipefail
args=()
for a in "$@"; do
  if [[ $a == *127.0.0.1:8080* ]]; then
    addr=$(cat "$SMSFLOW_README_STATE/addr" 2>/dev/null) || {
      echo "tests/readme.rs: curl to 127.0.0.1:8080 but no server is running" >&2
      exit 7
    }
    a=${a//127.0.0.1:8080/$addr}
  fi
  args+=("$a")
done
exec "$SMSFLOW_README_CURL" ${args[@]+"${args[@]}"}
"#;

impl Sandbox {
    fn new(tmp: &Path, repo: &Path) -> Sandbox {
        let work = tmp.join("work");
        let state = tmp.join("state");
        let home = tmp.join("home");
        for dir in [&work, &home, &state.join("bin"), &state.join("servers")] {
            fs::create_dir_all(dir).expect("create sandbox dirs");
        }
        copy_dir(&repo.join("flows"), &work.join("flows"));
        for (name, text) in [
            ("smsflow", SMSFLOW_SHIM),
            ("cargo", CARGO_SHIM),
            ("curl", CURL_SHIM),
        ] {
            let path = state.join("bin").join(name);
            fs::write(&path, text).expect("write shim");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod shim");
        }
        let path = std::env::var("PATH").unwrap_or_default();
        let curl = std::env::split_paths(&path)
            .map(|d| d.join("curl"))
            .find(|p| p.is_file())
            .expect("README.md uses curl: install it");

        // A clean environment, so the developer's own TWILIO_AUTH_TOKEN,
        // SMSFLOW_*, RUST_LOG or ~/.curlrc cannot change what runs.
        let mut env = BTreeMap::new();
        for (k, v) in [
            ("PATH", format!("{}:{path}", state.join("bin").display())),
            ("HOME", home.display().to_string()),
            ("SMSFLOW_README_STATE", state.display().to_string()),
            (
                "SMSFLOW_README_BIN",
                env!("CARGO_BIN_EXE_smsflow").to_string(),
            ),
            ("SMSFLOW_README_CURL", curl.display().to_string()),
            ("PWD", work.display().to_string()),
        ] {
            env.insert(k.to_string(), v);
        }
        write_env(&state.join("env"), &env);
        Sandbox { work, state }
    }

    /// The environment and working directory the previous block left.
    fn carried_env(&self) -> (BTreeMap<String, String>, PathBuf) {
        let raw = fs::read(self.state.join("env")).expect("read carried environment");
        let env: BTreeMap<String, String> = raw
            .split(|&b| b == 0)
            .filter_map(|kv| {
                let kv = String::from_utf8_lossy(kv);
                let (k, v) = kv.split_once('=')?;
                Some((k.to_string(), v.to_string()))
            })
            .collect();
        let cwd = env
            .get("PWD")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(|| self.work.clone());
        (env, cwd)
    }

    fn run(&self, step: &Step) {
        let (env, cwd) = self.carried_env();
        let script_path = self.state.join(format!("block-{}.sh", step.first_line));
        fs::write(&script_path, block_script(&step.script)).expect("write block script");
        // Per block: a server a block started keeps writing to its stderr.
        let stdout_path = self.state.join(format!("block-{}.stdout", step.first_line));
        let stderr_path = self.state.join(format!("block-{}.stderr", step.first_line));
        let _ = fs::remove_file(self.state.join("failed_line"));

        let mut child = Command::new("bash")
            .args(["-euo", "pipefail"])
            .arg(&script_path)
            .env_clear()
            .envs(&env)
            .current_dir(&cwd)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout_path).expect("stdout file"))
            .stderr(fs::File::create(&stderr_path).expect("stderr file"))
            .process_group(0)
            .spawn()
            .expect("run bash");
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for bash") {
                break Some(status);
            }
            if started.elapsed() > BLOCK_TIME_LIMIT {
                kill(&format!("-{}", child.id()), "KILL");
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = fs::read_to_string(&stdout_path).unwrap_or_default();
        let stderr = fs::read_to_string(&stderr_path).unwrap_or_default();
        let context = format!("--- stdout ---\n{stdout}--- stderr ---\n{stderr}");

        let Some(status) = status else {
            panic!(
                "README.md:{}: the block did not finish within {} s\n{context}",
                step.first_line,
                BLOCK_TIME_LIMIT.as_secs()
            );
        };
        let failed_line = fs::read_to_string(self.state.join("failed_line"))
            .ok()
            .and_then(|l| l.trim().parse::<usize>().ok())
            .and_then(|l| l.checked_sub(PRELUDE_LINES + 1))
            .filter(|&offset| offset < step.script.lines().count())
            .map(|offset| step.first_line + offset);
        if let Ok(why) = fs::read_to_string(self.state.join("serve-failed")) {
            // A backgrounded `serve &` fails no line of the block itself.
            let line = failed_line.unwrap_or_else(|| {
                let offset = step.script.lines().position(|l| l.contains(" serve"));
                step.first_line + offset.unwrap_or(0)
            });
            panic!("README.md:{line}: {}\n{context}", why.trim_end());
        }
        if !status.success() {
            let line = failed_line.unwrap_or(step.first_line);
            let command = step
                .script
                .lines()
                .nth(line - step.first_line)
                .unwrap_or("");
            panic!("README.md:{line}: `{command}` failed ({status})\n{context}");
        }
        if let Some(expected) = &step.expected {
            let want = output_lines(&expected.text);
            let got = output_lines(&stdout);
            if let Some((i, e, a)) = first_difference(&want, &got) {
                panic!(
                    "README.md:{}: the output of the block at README.md:{} differs \
                     (`…` matches any text within a line)\n  expected: {}\n  actual:   {}\n{context}",
                    expected.first_line + i,
                    step.first_line,
                    e.unwrap_or("(end of output)"),
                    a.unwrap_or("(end of output)"),
                );
            }
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let servers = self.state.join("servers");
        let Ok(entries) = fs::read_dir(&servers) else {
            return;
        };
        // (pid, log) of every server a shim started.
        let started: Vec<(String, PathBuf)> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "pid"))
            .filter_map(|p| Some((fs::read_to_string(&p).ok()?, p.with_extension("log"))))
            .map(|(pid, log)| (pid.trim().to_string(), log))
            .collect();
        for (pid, _) in started.iter().filter(|(pid, _)| alive(pid)) {
            kill(pid, "TERM");
        }
        // Let them flush and exit before their data directory is removed.
        // An exited server whose parent has not reaped it still answers
        // `kill -0`, so its last log line counts too.
        let running = |(pid, log): &&(String, PathBuf)| {
            alive(pid) && !fs::read_to_string(log).is_ok_and(|l| l.contains("smsflow stopped"))
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && started.iter().any(|s| running(&s)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        for (pid, _) in started.iter().filter(running) {
            kill(pid, "KILL");
        }
    }
}

/// The block as a script: record the failing line, save the environment
/// for the next block, wait for background jobs.
fn block_script(block: &str) -> String {
    let prelude = "trap 'echo \"$LINENO\" > \"$SMSFLOW_README_STATE/failed_line\"' ERR\n\
                   trap 'env -0 > \"$SMSFLOW_README_STATE/env\"' EXIT\n";
    debug_assert_eq!(prelude.lines().count(), PRELUDE_LINES);
    format!("{prelude}{block}wait\n")
}

fn write_env(path: &Path, env: &BTreeMap<String, String>) {
    let mut raw = Vec::new();
    for (k, v) in env {
        raw.extend_from_slice(format!("{k}={v}").as_bytes());
        raw.push(0);
    }
    fs::write(path, raw).expect("write environment");
}

fn kill(pid: &str, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(pid)
        .stderr(Stdio::null())
        .status();
}

/// Whether `pid` is still running, and (where `/proc` tells) is still ours
/// rather than a reused pid.
fn alive(pid: &str) -> bool {
    let proc_dir = Path::new("/proc").join(pid);
    if Path::new("/proc/self").exists() {
        return fs::read(proc_dir.join("cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("smsflow"));
    }
    Command::new("kill")
        .args(["-0", pid])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("create dir");
    for entry in fs::read_dir(from).expect("read dir").flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

mod rules {
    use super::*;

    #[test]
    fn ellipsis_matches_any_text_within_a_line() {
        assert!(line_matches("abc", "abc"));
        assert!(!line_matches("abc", "abcd"));
        assert!(line_matches("a…c", "abbbc"));
        assert!(line_matches("a…c", "ac"));
        assert!(line_matches("…", "anything"));
        assert!(line_matches("x…y…z", "x1y2z"));
        assert!(!line_matches("x…y…z", "x1z"));
        assert!(!line_matches("ab…ba", "aba"));
    }

    #[test]
    fn the_block_right_after_an_sh_block_is_its_output() {
        let readme = "```sh\necho hi\n```\n\n```text\nhi\n```\n\nprose\n\n```sh\ntrue\n```\nsays\n```text\nnot output\n```\n";
        let steps = parse(readme).unwrap();
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0].first_line, 2);
        let expected = steps[0].expected.as_ref().unwrap();
        assert_eq!((expected.first_line, expected.text.as_str()), (6, "hi\n"));
        assert!(steps[1].expected.is_none());
    }

    #[test]
    fn blocks_that_would_silently_not_run_are_refused() {
        assert!(parse("```\nls\n```\n").unwrap_err().contains("README.md:1"));
        assert!(parse("text\n\n```bash\nls\n```\n")
            .unwrap_err()
            .contains("README.md:3"));
    }
}
