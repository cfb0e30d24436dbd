//! `smsflow check`: validate every flow set in a directory tree, the way
//! the server loads one, and report every diagnostic.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{dirs_under, files_with};
use crate::flow;

/// What [`check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckSummary {
    /// Flow sets (directories) checked.
    pub sets: usize,
    /// Errors found.
    pub errors: usize,
    /// Warnings found.
    pub warnings: usize,
}

/// `smsflow check DIR`: validate every flow set in `dir` and below, the
/// way the server loads one. A flow set is a directory holding `*.yaml`
/// (or `*.yml`) files, so subdirectories can hold their own sets, the same
/// rule by which `test` runs each directory's transcripts against its own
/// flows (`*.rhai` modules in a subdirectory belong to the set above).
/// `reserved` are the words the configured server takes before any flow
/// sees them. Every diagnostic goes to `err`, with a summary line per set
/// with errors; sets without errors get an `ok` line on `out`.
///
/// Errors when `dir` is not a directory or holds no flow file at all: a
/// check that checked nothing most likely pointed at the wrong directory.
pub fn check(
    dir: &Path,
    reserved: &flow::ReservedWords,
    out: &mut impl Write,
    err: &mut impl Write,
) -> anyhow::Result<CheckSummary> {
    if !dir.is_dir() {
        anyhow::bail!("{} is not a directory", dir.display());
    }
    let sets: Vec<PathBuf> = dirs_under(dir)
        .into_iter()
        .filter(|d| !files_with(d, &["yaml", "yml"]).is_empty())
        .collect();
    if sets.is_empty() {
        anyhow::bail!(
            "no flow files (*.yaml) in {} or below (see flows/README.md)",
            dir.display()
        );
    }
    let mut summary = CheckSummary {
        sets: sets.len(),
        errors: 0,
        warnings: 0,
    };
    for set in &sets {
        let diags = flow::check_dir_with(set, reserved);
        let errors = diags
            .iter()
            .filter(|d| d.severity == flow::Severity::Error)
            .count();
        let warnings = diags.len() - errors;
        for d in &diags {
            writeln!(err, "{d}")?;
        }
        if errors > 0 {
            writeln!(
                err,
                "{}: {errors} error(s), {warnings} warning(s)",
                set.display()
            )?;
        } else {
            writeln!(out, "{}: ok ({warnings} warning(s))", set.display())?;
        }
        summary.errors += errors;
        summary.warnings += warnings;
    }
    Ok(summary)
}
