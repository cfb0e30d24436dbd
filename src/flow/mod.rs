//! Flows: the operator's keyword replies and scripted conversations.
//!
//! `load` turns a flows directory into a validated [`FlowSet`] (or every
//! problem, located by file, line and column; [`load_flows`] is the form
//! the server and the tools use); [`handle`] is the pure step function the
//! webhook calls for each inbound message, and [`handle_timeout`] the one a
//! due timer calls ([`next_due`] says when that is); `stored` is a [`Conversation`]'s
//! stored form (versioned JSON, migrated on read); `transcript` parses
//! `.chat` conversation tests and compares replies (`author` runs them
//! through the pipeline); `outline` describes one flow's steps and routes
//! for diagrams; `invitations` reads which answers a reply asks for
//! (`check` warns when one is a consent word); `script` is the Rhai sandbox
//! that script flows and expressions run in; `calls` is a step's `call:`
//! and the request the engine hands back instead of making it ([`handle`]
//! stops at a call; [`handle_with_calls`] resumes with the answers). The
//! file format is documented
//! in `flows/README.md`.
//!
//! This module knows nothing of HTTP, Twilio's wire format, the store or the
//! clock: time comes in as unix seconds and state comes in and goes out as a
//! [`Conversation`] value. Only Twilio's message limits (characters per
//! message, messages per answer, media, segment sizes) come from
//! `twilio::limits`, where they are defined once, and a long reply is split
//! as `twilio::twiml` splits it.

pub mod calls;
mod campaigns;
mod check;
mod engine;
mod invitations;
mod load;
mod matcher;
mod model;
mod outline;
pub mod script;
mod segments;
mod stored;
mod template;
mod transcript;
mod yaml;

pub use campaigns::{campaign_events, next_campaign_due, CampaignDue, NumberZones};
pub use check::ReservedWords;
pub use engine::{
    handle, handle_timeout, handle_timeout_with_calls, handle_with_calls, next_due, Conversation,
    EndedRun, EngineOptions, Event, Handled, Inbound, Outcome, QueuedStart, Reply, Run, RunEnd,
    SilenceReason, StepRef, Wake, MAX_BODY_CHARS, MAX_PATH, MAX_REPLIES, MAX_TRANSITIONS,
    SCRIPT_STATE_VAR,
};
pub use engine::{live_run, start_flow, start_flow_with_calls, Start};
pub use load::{check_dir, check_dir_with, load_dir, load_dir_with, Loaded, MAX_FILE_BYTES};
pub(crate) use load::{parse_duration, show_secs};
pub use matcher::normalize;
pub use model::{Diagnostic, FlowSet, Severity};
pub(crate) use outline::{EdgeTarget, Outline};
pub use template::ContactText;
pub use transcript::{
    assertion_value, HttpMock, Line, ReplyLine, Transcript, TranscriptFailure, TRANSCRIPT_EPOCH,
};
pub(crate) use transcript::{compare_replies, escape, parse_start, split_media, unescape};

/// Why [`load_flows`] refused a flows directory.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The directory is not there (or is not a directory).
    #[error("flows directory {} not found (create it, or pass --flows DIR)", .0.display())]
    Missing(std::path::PathBuf),
    /// The flows have errors: every diagnostic, errors and warnings, sorted
    /// by file and position.
    #[error(
        "the flows in {} have {} problem(s):\n{}",
        dir.display(),
        diagnostics.len(),
        diagnostics.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
    )]
    Invalid {
        /// The flows directory.
        dir: std::path::PathBuf,
        /// Every diagnostic, sorted by file and position.
        diagnostics: Vec<Diagnostic>,
    },
}

/// Load and validate the flow set in `dir`, as the server does at startup
/// and on every reload, and as `chat` and `graph` do: a missing directory
/// or any error refuses the whole set, with every problem in one error.
pub fn load_flows(dir: &std::path::Path) -> Result<Loaded, LoadError> {
    if !dir.is_dir() {
        return Err(LoadError::Missing(dir.to_path_buf()));
    }
    load_dir(dir).map_err(|diagnostics| LoadError::Invalid {
        dir: dir.to_path_buf(),
        diagnostics,
    })
}
