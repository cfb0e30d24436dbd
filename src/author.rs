//! Tools for flow authors, behind `smsflow check`, `chat`, `test` and
//! `graph`: validate flow sets, try a conversation in a terminal, run
//! transcript tests, draw a flow.
//!
//! Everything here works on readers, writers and values, so the test suite
//! drives it without a terminal; `main` only passes stdin and stdout. Chat
//! and transcripts go through the real [`Pipeline`](crate::pipeline::Pipeline)
//! (consent keywords, loop guard, dedupe, engine, commit, flush) over a
//! throwaway [`SledStore`](crate::store::SledStore), with the server's
//! options ([`config_for_tools`]) and a virtual clock, so what an author
//! sees is what the webhook would do, minus HTTP and Twilio. This module
//! knows no HTTP and no terminal; it knows the flow model only through
//! `FlowSet::outline` and
//! [`flow::Transcript`](crate::flow::Transcript).
//!
//! - `session`: the simulated phone `chat` and transcripts share;
//! - `mocks`: declared answers to flows' HTTP calls (`@ http`, `/http`):
//!   these tools make no real request;
//! - `chat`: `smsflow chat`;
//! - `transcripts`: `smsflow test` and the `--require-tests` gate;
//! - `check`: `smsflow check`;
//! - `graph`: `smsflow graph` (Mermaid and DOT).

mod chat;
mod check;
mod graph;
mod mocks;
mod session;
mod transcripts;

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::config::{self, Config, FileConfig, Overrides};
use crate::pipeline::PipelineOptions;

pub use chat::{chat, ChatOptions};
pub use check::{check, CheckSummary};
pub use graph::{dot, mermaid, UnknownFlow};
pub use transcripts::{
    run_parsed, run_tests, run_transcript, transcripts_pass, Exchange, TestSummary, TranscriptRun,
};

/// The server's configuration for the author tools (`check`, `chat`,
/// `test`): the same TOML file as `serve --config`, resolved the same way
/// (defaults, validation), so consent keywords, the help text, interrupt
/// keywords and the loop guard behave as they will on the number. `None`
/// gives the server's defaults. These tools take no webhooks, so no
/// `TWILIO_AUTH_TOKEN` is needed.
pub fn config_for_tools(path: Option<&Path>) -> anyhow::Result<Config> {
    let file = match path {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let overrides = Overrides {
        // Nothing is verified: there are no requests to sign.
        insecure: true,
        // Only names the delivery callback URL; set so that resolving does
        // not warn about signatures no request will carry.
        public_url: Some(
            file.public_url
                .clone()
                .unwrap_or_else(|| "http://localhost".to_owned()),
        ),
        ..Overrides::default()
    };
    let config = config::resolve(overrides, file, None, None);
    match path {
        Some(p) => config.with_context(|| format!("in config file {}", p.display())),
        None => config,
    }
}

/// The pipeline options `serve` runs with when no config file is given.
pub fn server_defaults() -> PipelineOptions {
    let config = config_for_tools(None).expect("the built-in defaults are valid");
    PipelineOptions::from_config(&config)
}

// ---------------------------------------------------------------------------
// the directory walk `check` and `test` share

/// The files directly in `dir` with one of `extensions`, sorted; dot-files
/// are skipped.
fn files_with(dir: &Path, extensions: &[&str]) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let hidden = p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            let wanted = p
                .extension()
                .is_some_and(|e| extensions.iter().any(|x| e == *x));
            !hidden && wanted && p.is_file()
        })
        .collect();
    files.sort();
    files
}

/// Deepest directory level `check` and `test` search.
const MAX_DEPTH: usize = 16;

/// `root` and every directory below it, in depth-first name order. Skips
/// dot-directories and does not follow symlinked directories, so a link
/// loop cannot recurse forever.
fn dirs_under(root: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
        out.push(dir.to_path_buf());
        if depth >= MAX_DEPTH {
            return;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut subdirs: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| e.path())
            .collect();
        subdirs.sort();
        for d in subdirs {
            walk(&d, depth + 1, out);
        }
    }
    let mut out = Vec::new();
    walk(root, 0, &mut out);
    out
}
