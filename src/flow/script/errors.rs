//! [`ScriptError`] and how Rhai's errors become one: positions translated
//! to `file:line:column` (into the YAML file for an embedded expression),
//! messages without Rhai's own suffix, and which limit an error reports.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use regex::Regex;
use rhai::{EvalAltResult, ParseError, ParseErrorType, Position};

use super::limits::TIME_BUDGET_TOKEN;
use super::ENTRY_POINT;

/// Why a script or expression could not be compiled or run.
///
/// Every variant names the file; all but `BadReturn` carry a 1-based line and
/// column (for an expression embedded in YAML, a position in the YAML file).
/// `Display` reads `flows/quiz.rhai:12:5: error: ...`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScriptError {
    /// The source does not compile, or a script lacks `on_message(msg, state)`.
    #[error("{}:{line}:{column}: error: {message}", file.display())]
    Compile {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// The script raised an error while running.
    #[error("{}:{line}:{column}: error: {message}", file.display())]
    Runtime {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// The script hit one of the sandbox [`Limits`](super::Limits). `which` is one of
    /// "operations", "call depth", "expression depth", "string size",
    /// "array size", "map size", "map key size", "time budget".
    #[error("{}:{line}:{column}: error: script exceeded the {which} limit", file.display())]
    Limit {
        file: PathBuf,
        line: usize,
        column: usize,
        which: &'static str,
    },
    /// The script ran but returned (or left in `state`/`contact`) something
    /// the flow engine cannot use.
    #[error("{}: error: {message}", file.display())]
    BadReturn { file: PathBuf, message: String },
}

impl ScriptError {
    /// The file the error is in.
    pub fn file(&self) -> &Path {
        match self {
            ScriptError::Compile { file, .. }
            | ScriptError::Runtime { file, .. }
            | ScriptError::Limit { file, .. }
            | ScriptError::BadReturn { file, .. } => file,
        }
    }

    /// 1-based (line, column), when the error has a position.
    pub fn line_column(&self) -> Option<(usize, usize)> {
        match self {
            ScriptError::Compile { line, column, .. }
            | ScriptError::Runtime { line, column, .. }
            | ScriptError::Limit { line, column, .. } => Some((*line, *column)),
            ScriptError::BadReturn { .. } => None,
        }
    }

    /// The limit that was hit, if this is a [`ScriptError::Limit`].
    #[cfg(test)]
    pub fn limit(&self) -> Option<&'static str> {
        match self {
            ScriptError::Limit { which, .. } => Some(which),
            _ => None,
        }
    }

    /// What went wrong, without the file and position (for structured logs
    /// that carry those as fields).
    pub fn message(&self) -> String {
        match self {
            ScriptError::Compile { message, .. }
            | ScriptError::Runtime { message, .. }
            | ScriptError::BadReturn { message, .. } => message.clone(),
            ScriptError::Limit { which, .. } => format!("script exceeded the {which} limit"),
        }
    }
}

/// Where a piece of Rhai source starts in its file.
#[derive(Clone)]
pub(super) struct Origin {
    pub(super) file: Arc<Path>,
    pub(super) line: usize,
    pub(super) column: usize,
    /// Reported for errors that carry no position.
    pub(super) fallback: (usize, usize),
}

impl Origin {
    pub(super) fn whole_file(file: Arc<Path>) -> Origin {
        Origin {
            file,
            line: 1,
            column: 1,
            fallback: (1, 1),
        }
    }

    /// Maps a position inside the source to one in the file.
    pub(super) fn translate(&self, pos: Position) -> (usize, usize) {
        let (Some(line), column) = (pos.line(), pos.position()) else {
            return self.fallback;
        };
        let column = column.unwrap_or(1);
        if line == 1 {
            (self.line, self.column + column - 1)
        } else {
            (self.line + line - 1, column)
        }
    }
}

pub(super) fn parse_error(origin: &Origin, err: ParseError) -> ScriptError {
    let ParseError(kind, pos) = err;
    parse_error_kind(origin, *kind, pos)
}

fn parse_error_kind(origin: &Origin, kind: ParseErrorType, pos: Position) -> ScriptError {
    let (line, column) = origin.translate(pos);
    let file = origin.file.to_path_buf();
    match kind {
        ParseErrorType::ExprTooDeep => ScriptError::Limit {
            file,
            line,
            column,
            which: "expression depth",
        },
        kind => ScriptError::Compile {
            file,
            line,
            column,
            message: lowercase_first(&kind.to_string()),
        },
    }
}

/// Errors from `compile_into_self_contained`: parse errors, or failures to
/// load an imported module (which Rhai reports without a position, so the
/// import is found in the source by its path).
pub(super) fn compile_error(origin: &Origin, source: &str, err: EvalAltResult) -> ScriptError {
    match err {
        EvalAltResult::ErrorParsing(kind, pos) => parse_error_kind(origin, kind, pos),
        err => {
            let pos = err.position();
            let (line, column) = if pos.is_none() {
                import_path(&err)
                    .and_then(|path| locate(source, &format!("\"{path}\"")))
                    .unwrap_or((1, 1))
            } else {
                origin.translate(pos)
            };
            ScriptError::Compile {
                file: origin.file.to_path_buf(),
                line,
                column,
                message: describe(err),
            }
        }
    }
}

fn import_path(err: &EvalAltResult) -> Option<&str> {
    match err {
        EvalAltResult::ErrorModuleNotFound(path, _) | EvalAltResult::ErrorInModule(path, ..) => {
            Some(path)
        }
        _ => None,
    }
}

/// A human message for an error, without Rhai's own position suffix.
pub(super) fn describe(err: EvalAltResult) -> String {
    match err {
        EvalAltResult::ErrorInModule(path, inner, _) => match *inner {
            // The resolver's refusals already say what is wrong.
            EvalAltResult::ErrorRuntime(reason, _) => {
                format!("cannot import \"{path}\": {reason}")
            }
            inner => {
                let at = match (inner.position().line(), inner.position().position()) {
                    (Some(l), Some(c)) => format!(" at {l}:{c}"),
                    (Some(l), None) => format!(" at {l}"),
                    _ => String::new(),
                };
                format!("in module \"{path}\"{at}: {}", describe(inner))
            }
        },
        EvalAltResult::ErrorModuleNotFound(path, _) => {
            format!("module \"{path}\" not found in the flows directory")
        }
        EvalAltResult::ErrorParsing(kind, _) => {
            format!("syntax error: {}", lowercase_first(&kind.to_string()))
        }
        mut err => {
            err.clear_position();
            lowercase_first(&err.to_string())
        }
    }
}

pub(super) fn runtime_error(origin: &Origin, err: EvalAltResult) -> ScriptError {
    let own_source = origin.file.to_string_lossy();
    let mut pos = err.position();
    // Set once the error leads into another file (an imported module): from
    // then on positions are in that file, so the last one in ours is kept.
    let mut foreign: Option<String> = None;
    let mut cur = err;
    loop {
        let inner = match cur {
            EvalAltResult::ErrorInFunctionCall(name, src, inner, _) => {
                if foreign.is_none() && !(src.is_empty() || src == own_source) {
                    foreign = Some(format!("in fn {name} of module \"{src}\""));
                }
                inner
            }
            EvalAltResult::ErrorInModule(path, inner, _) => {
                if foreign.is_none() {
                    foreign = Some(format!("in module \"{path}\""));
                }
                inner
            }
            _ => break,
        };
        cur = *inner;
        if foreign.is_none() && !cur.position().is_none() {
            pos = cur.position();
        }
    }

    let (line, column) = origin.translate(pos);
    let file = origin.file.to_path_buf();
    if let Some(which) = limit_hit(&cur) {
        return ScriptError::Limit {
            file,
            line,
            column,
            which,
        };
    }
    let message = describe(cur);
    let message = match foreign {
        Some(context) => format!("{context}: {message}"),
        None => message,
    };
    ScriptError::Runtime {
        file,
        line,
        column,
        message,
    }
}

/// Which sandbox limit an error reports, if any.
pub(super) fn limit_hit(err: &EvalAltResult) -> Option<&'static str> {
    match err {
        EvalAltResult::ErrorTooManyOperations(_) => Some("operations"),
        EvalAltResult::ErrorStackOverflow(_) => Some("call depth"),
        EvalAltResult::ErrorTerminated(token, _)
            if token
                .read_lock::<rhai::ImmutableString>()
                .as_deref()
                .map(|s| s.as_str())
                == Some(TIME_BUDGET_TOKEN) =>
        {
            Some("time budget")
        }
        EvalAltResult::ErrorDataTooLarge(what, _) => {
            let what = what.to_ascii_lowercase();
            if what.contains("map key") {
                Some("map key size")
            } else if what.contains("string") {
                Some("string size")
            } else if what.contains("array") {
                Some("array size")
            } else if what.contains("map") {
                Some("map size")
            } else {
                None
            }
        }
        EvalAltResult::ErrorParsing(ParseErrorType::ExprTooDeep, _) => Some("expression depth"),
        _ => None,
    }
}

/// 1-based line and column (in characters) of the first occurrence of
/// `needle` in `source`.
fn locate(source: &str, needle: &str) -> Option<(usize, usize)> {
    source.find(needle).map(|at| line_column_at(source, at))
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column_at(source: &str, at: usize) -> (usize, usize) {
    let before = source.get(..at).unwrap_or(source);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Where `fn on_message` is defined, or 1:1.
pub(super) fn locate_entry_point(source: &str) -> (usize, usize) {
    static ENTRY: OnceLock<Option<Regex>> = OnceLock::new();
    let entry = ENTRY.get_or_init(|| {
        Regex::new(&format!(
            r"(?m)^[ \t]*(?:private[ \t]+)?fn[ \t]+{ENTRY_POINT}\b"
        ))
        .ok()
    });
    entry
        .as_ref()
        .and_then(|re| re.find(source))
        .map(|m| {
            let indent = m.as_str().len() - m.as_str().trim_start().len();
            line_column_at(source, m.start() + indent)
        })
        .unwrap_or((1, 1))
}

pub(super) fn lowercase_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::script::testing::*;

    #[test]
    fn compile_errors_carry_line_and_column() {
        let sandbox = sandbox();
        let err = sandbox
            .compile_script(
                Path::new("flows/quiz.rhai"),
                "fn on_message(msg, state) {\n    let x = ;\n}\n",
            )
            .unwrap_err();
        assert!(matches!(err, ScriptError::Compile { .. }));
        assert_eq!(err.line_column(), Some((2, 13)), "{err}");
        assert!(
            err.to_string().starts_with("flows/quiz.rhai:2:13: error: "),
            "{err}"
        );

        // Strict variables: a typo is a load error, not a silent ().
        let err = sandbox
            .compile_script(
                Path::new(FILE),
                "fn on_message(msg, state) {\n  mgs.body\n}",
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "flows/test.rhai:2:3: error: undefined variable: mgs"
        );

        let err = sandbox
            .compile_script(Path::new(FILE), "fn reply(msg) { \"hi\" }")
            .unwrap_err();
        assert_eq!(err.line_column(), Some((1, 1)));
        assert!(
            err.to_string().contains("fn on_message(msg, state)"),
            "{err}"
        );

        let err = sandbox
            .compile_script(
                Path::new(FILE),
                "// one arg\n  fn on_message(msg) { \"hi\" }",
            )
            .unwrap_err();
        assert_eq!(err.line_column(), Some((2, 3)), "{err}");
        assert!(err.to_string().contains("two parameters"), "{err}");
    }

    #[test]
    fn runtime_errors_carry_line_and_column() {
        let err = run("fn on_message(msg, state) {\n  let n = 1;\n  n / 0\n}").unwrap_err();
        assert!(matches!(err, ScriptError::Runtime { .. }), "{err}");
        assert_eq!(err.line_column(), Some((3, 5)), "{err}");

        let err = run("fn on_message(msg, state) {\n  throw \"nope\";\n}").unwrap_err();
        assert_eq!(err.line_column(), Some((2, 3)), "{err}");
        assert!(err.to_string().contains("nope"), "{err}");

        // An error inside a helper points at the helper's line.
        let err = run(&format!(
            "fn helper(x) {{\n  x.no_such_method()\n}}\n{}",
            on_message("helper(1)")
        ))
        .unwrap_err();
        assert_eq!(err.line_column(), Some((2, 5)), "{err}");
    }
}
