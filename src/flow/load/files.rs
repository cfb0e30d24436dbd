//! The flows directory on disk: which files a load reads, and reading them.
//!
//! Flow files are the `*.yaml`/`*.yml` files at the top level; `*.rhai`
//! files are walked a few levels down (modules live in subdirectories).
//! A file may be a symlink only to a file inside the directory; symlinked
//! directories are not walked. Unreadable, oversized or non-UTF-8 files are
//! reported at the file. Nothing here parses YAML or compiles Rhai.

use std::path::{Path, PathBuf};

use crate::flow::model::{Diagnostic, Severity};

use super::MAX_FILE_BYTES;

/// The flow files of `dir`, sorted by name. Dot-files, other extensions
/// (`.chat` transcripts, `.rhai`, `.md`) and subdirectories are skipped; a
/// flow file that is a symlink leading outside `dir` is refused.
pub(super) fn flow_files(dir: &Path, diags: &mut Vec<Diagnostic>) -> Vec<PathBuf> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            diags.push(whole_file(dir, format!("cannot read flows directory: {e}")));
            return Vec::new();
        }
    };
    let root = real_root(dir);
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            let path = e.path();
            let ext = path.extension().unwrap_or_default();
            !is_hidden(&path) && (ext == "yaml" || ext == "yml") && is_file_inside(e, &root, diags)
        })
        .map(|e| e.path())
        .collect();
    paths.sort();
    paths
}

/// Every `*.rhai` file under `dir` (scripts at the top level, modules in
/// subdirectories), sorted. Dot-files and dot-directories are skipped, the
/// walk stops a few levels down, and it does not follow symlinks to
/// directories (a directory that links back to its parent would be walked
/// forever; one that leads elsewhere in the flows directory is walked where
/// it really is). A file that is a symlink leading outside `dir` is refused.
pub(super) fn rhai_files(dir: &Path, diags: &mut Vec<Diagnostic>) -> Vec<PathBuf> {
    const MAX_DEPTH: usize = 8;
    let root = real_root(dir);
    let mut out = Vec::new();
    let mut todo = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if is_hidden(&path) {
                continue;
            }
            // The entry itself, not what a symlink points to.
            let real_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if real_dir {
                if depth < MAX_DEPTH {
                    todo.push((path, depth + 1));
                }
            } else if path.extension().is_some_and(|e| e == "rhai")
                && is_file_inside(&entry, &root, diags)
            {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The flows directory as the file system resolves it (it may itself be a
/// symlink, as deploy tools make it), to tell where a symlink leads.
fn real_root(dir: &Path) -> PathBuf {
    dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf())
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
}

/// True for a file to read: a plain file, or a symlink to a file inside the
/// flows directory (`root`, resolved). A symlink leading outside it, or to
/// nothing, is reported at the file; a directory is skipped.
fn is_file_inside(entry: &std::fs::DirEntry, root: &Path, diags: &mut Vec<Diagnostic>) -> bool {
    let path = entry.path();
    let is_link = entry.file_type().is_ok_and(|t| t.is_symlink());
    if !is_link {
        return entry.file_type().is_ok_and(|t| t.is_file());
    }
    match path.canonicalize() {
        Ok(real) if !real.is_file() => false,
        Ok(real) if real.starts_with(root) => true,
        Ok(real) => {
            diags.push(at_file_start(
                &path,
                format!(
                    "this file is a symlink to {}, outside the flows directory; \
                     flows, scripts and modules must be inside it",
                    real.display()
                ),
            ));
            false
        }
        Err(e) => {
            diags.push(at_file_start(
                &path,
                format!("this file is a symlink that cannot be followed: {e}"),
            ));
            false
        }
    }
}

fn whole_file(path: &Path, message: String) -> Diagnostic {
    Diagnostic {
        file: path.to_path_buf(),
        line: 0,
        column: 0,
        severity: Severity::Error,
        message,
    }
}

/// An error about a whole file, shown at its start (1:1).
fn at_file_start(path: &Path, message: String) -> Diagnostic {
    Diagnostic {
        file: path.to_path_buf(),
        line: 1,
        column: 1,
        severity: Severity::Error,
        message,
    }
}

pub(super) fn read_file(path: &Path, diags: &mut Vec<Diagnostic>) -> Option<String> {
    let at_start = |message: String| at_file_start(path, message);
    match std::fs::metadata(path) {
        Ok(m) if m.len() > MAX_FILE_BYTES => {
            diags.push(at_start(format!(
                "file is {} bytes; flow files are limited to {MAX_FILE_BYTES} bytes (1 MiB)",
                m.len()
            )));
            return None;
        }
        Ok(_) => {}
        Err(e) => {
            diags.push(whole_file(path, format!("cannot read file: {e}")));
            return None;
        }
    }
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            diags.push(whole_file(path, format!("cannot read file: {e}")));
            return None;
        }
    };
    match String::from_utf8(bytes) {
        Ok(s) => Some(s),
        Err(e) => {
            let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let line = good.iter().filter(|b| **b == b'\n').count() + 1;
            let col_start = good.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            let column = String::from_utf8_lossy(&good[col_start..]).chars().count() + 1;
            diags.push(Diagnostic {
                file: path.to_path_buf(),
                line,
                column,
                severity: Severity::Error,
                message: "file is not valid UTF-8".into(),
            });
            None
        }
    }
}
