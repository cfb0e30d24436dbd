//! Runs every `.chat` transcript in `flows/` and under `tests/flows/`
//! against the flows in its own directory. A failing transcript fails with
//! its file, line and expected-vs-actual replies.

use std::path::{Path, PathBuf};

use smsflow::flow::{load_dir, run_transcript, EngineOptions};

/// Directories (recursively) that hold at least one `.chat` file.
fn transcript_dirs(root: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let mut has_chat = false;
    let mut paths: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    paths.sort();
    for p in paths {
        if p.is_dir() {
            transcript_dirs(&p, out);
        } else if p.extension().is_some_and(|e| e == "chat") {
            has_chat = true;
        }
    }
    if has_chat {
        out.push(root.to_path_buf());
    }
}

#[test]
fn every_transcript_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut dirs = Vec::new();
    transcript_dirs(&root.join("flows"), &mut dirs);
    transcript_dirs(&root.join("tests/flows"), &mut dirs);
    assert!(!dirs.is_empty(), "no transcripts found");

    let mut failures = Vec::new();
    let mut ran = 0;
    for dir in dirs {
        let set = match load_dir(&dir) {
            Ok(loaded) => loaded.set,
            Err(diags) => {
                let list: Vec<String> = diags.iter().map(ToString::to_string).collect();
                failures.push(format!(
                    "{}: flows do not load:\n{}",
                    dir.display(),
                    list.join("\n")
                ));
                continue;
            }
        };
        let mut chats: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "chat"))
            .collect();
        chats.sort();
        for chat in chats {
            ran += 1;
            if let Err(f) = run_transcript(&set, &EngineOptions::default(), &chat) {
                failures.push(f.to_string());
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {ran} transcripts failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
