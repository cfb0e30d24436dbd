//! Runs every `.chat` transcript in `flows/` and under `tests/flows/`
//! against the flows in its own directory, with the same code as
//! `smsflow test`: through the server's pipeline with its default settings.
//! A failing transcript fails with its file, line and a diff of expected
//! and actual replies.

use std::path::Path;

use smsflow::author::{run_tests, server_defaults};

fn assert_transcripts_pass(dir: &Path) {
    let mut out = Vec::new();
    let summary = run_tests(dir, &server_defaults(), &mut out).unwrap_or_else(|e| panic!("{e:#}"));
    let out = String::from_utf8_lossy(&out);
    assert!(
        summary.passed > 0,
        "no transcripts ran in {}",
        dir.display()
    );
    assert_eq!(summary.failed, 0, "{out}");
}

#[test]
fn every_shipped_transcript_passes() {
    assert_transcripts_pass(&Path::new(env!("CARGO_MANIFEST_DIR")).join("flows"));
}

#[test]
fn every_construct_transcript_passes() {
    assert_transcripts_pass(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/flows"));
}
